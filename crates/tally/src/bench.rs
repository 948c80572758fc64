//! `tally bench`: durable charges per second through the engine, and latency.
//!
//! Opens a fresh store in a temporary directory (the same `Store` that `tally
//! serve` uses: every answer waits for the fsync of its group), gives every customer a large grant, then
//! drives charges from many concurrent tasks: uniform over all customers and
//! all on one hot customer. Last, it issues charges at half the best measured
//! rate, open loop, and reports p50 and p99 latency from send to durable answer.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tally_core::{Amount, Id, Source};
use tally_store::{Command, NewCharge, NewCustomer, NewGrant, Store, SystemClock, UsageInput};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Customers for the uniform run.
    #[arg(long, default_value_t = 10_000)]
    customers: usize,
    /// Seconds per throughput run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Charges in flight at once.
    #[arg(long, default_value_t = 4096)]
    concurrency: usize,
    /// Offer this many charges/s in the latency run (default: half the lower measured rate).
    #[arg(long)]
    latency_rate: Option<f64>,
    /// Give charges random ids (like UUIDs from real clients) instead of sequential ones.
    #[arg(long)]
    random_ids: bool,
    /// Charge by feature and quantity, priced by a published price book
    /// (3 units at 0.5 credits), instead of by amount.
    #[arg(long)]
    priced: bool,
    /// Measure usage events through `POST /v1/events` instead: a real server on
    /// 127.0.0.1 and HTTP clients posting batches, in this process.
    #[arg(long)]
    http_events: bool,
    /// Events per batch (with --http-events).
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Where to put the temporary database (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    RANDOM_IDS.store(args.random_ids, Ordering::Relaxed);
    PRICED.store(args.priced, Ordering::Relaxed);
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("tally-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(&dir, Arc::new(SystemClock)).context("open bench store")?;
    eprintln!("setting up {} customers in {dir:?}", args.customers);
    setup(&store, args.customers).await?;
    if args.priced || args.http_events {
        publish_price(&store).await?;
    }
    if args.http_events {
        let result = http_events(&store, &args).await;
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
        return result;
    }
    let uniform = throughput(
        &store,
        args.customers,
        args.seconds,
        args.concurrency,
        "uniform",
    )
    .await?;
    let hot = throughput(&store, 1, args.seconds, args.concurrency, "hot").await?;
    let rate = args.latency_rate.unwrap_or(uniform.min(hot) / 2.0);
    // Start the latency run from a checkpointed database, not from the backlog
    // of write-ahead log the throughput runs left behind.
    store.checkpoint().await.context("checkpoint")?;
    let (p50, p99, achieved) = latency(&store, args.customers, rate, args.seconds).await?;
    println!("| run | result |");
    println!("|---|---|");
    println!(
        "| durable charges/s, uniform over {} customers | {:.0} |",
        args.customers, uniform
    );
    println!("| durable charges/s, one hot customer | {hot:.0} |");
    println!(
        "| latency at {rate:.0}/s offered ({achieved:.0}/s achieved), p50 | {:.2} ms |",
        p50.as_secs_f64() * 1e3
    );
    println!(
        "| latency at {rate:.0}/s offered, p99 | {:.2} ms |",
        p99.as_secs_f64() * 1e3
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn customer(index: usize) -> Id {
    Id::parse(&format!("bench_{index}")).expect("valid id")
}

async fn setup(store: &Store, customers: usize) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for index in 0..customers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let id = customer(index);
            let create = NewCustomer {
                id: id.clone(),
                name: None,
                plan: None,
                region: None,
                currency: None,
                metadata: None,
            };
            store.execute(Command::CreateCustomer(create), None).await?;
            let grant = NewGrant {
                id: Id::parse(&format!("grant_{index}")).expect("valid id"),
                customer_id: id,
                amount: Amount::from_units(1_000_000_000).expect("in range"),
                source: Source::Purchase,
                paid: true,
                cost_basis: None,
                priority: 0,
                effective_at: None,
                expires_at: None,
                scope: None,
                metadata: None,
                external_reference: None,
                reason: None,
            };
            store.execute(Command::Grant(grant), None).await
        }));
    }
    for task in tasks {
        let executed = task.await?.context("setup")?;
        anyhow::ensure!(
            executed.result.is_ok(),
            "setup refused: {:?}",
            executed.result
        );
    }
    Ok(())
}

/// One feature at 0.5 credits per unit, published now.
async fn publish_price(store: &Store) -> anyhow::Result<()> {
    let rules = serde_json::from_value(serde_json::json!([
        {"feature": "api_call", "credits_per_unit": "0.5"}
    ]))?;
    let commands = [
        Command::PutFeature {
            key: "api_call".into(),
            name: "API call".into(),
            unit: "call".into(),
        },
        Command::CreatePricebook {
            id: Id::parse("bench_v1").expect("valid id"),
            from: None,
        },
        Command::PutRules {
            id: "bench_v1".into(),
            rules,
        },
        Command::Publish {
            id: "bench_v1".into(),
            effective_at: None,
        },
    ];
    for command in commands {
        let executed = store.execute(command, None).await?;
        anyhow::ensure!(
            executed.result.is_ok(),
            "price book set-up refused: {:?}",
            executed.result
        );
    }
    Ok(())
}

static NEXT_CHARGE: AtomicU64 = AtomicU64::new(0);
static PRICED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static RANDOM_IDS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn charge(customers: usize) -> Command {
    let n = NEXT_CHARGE.fetch_add(1, Ordering::Relaxed);
    let id = if RANDOM_IDS.load(Ordering::Relaxed) {
        // A bijective scramble of n: unique, but in no order (as UUIDs are).
        let scrambled =
            n.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) ^ 0x5851_F42D_4C95_7F2D;
        format!("ch_{scrambled:016x}")
    } else {
        format!("ch_{n}")
    };
    // A cheap deterministic spread over customers (Knuth's multiplicative hash).
    let index = (n.wrapping_mul(2_654_435_761) % customers as u64) as usize;
    let priced = PRICED.load(Ordering::Relaxed);
    Command::Charge(NewCharge {
        id: Id::parse(&id).expect("valid id"),
        customer_id: customer(if customers == 1 { 0 } else { index }),
        amount: (!priced).then(|| Amount::parse("1.5").expect("valid")),
        feature: priced.then(|| "api_call".to_string()),
        usage: priced.then(|| UsageInput {
            feature: "api_call".into(),
            quantity: Amount::from_units(3).expect("in range"),
            properties: Default::default(),
        }),
        member_id: None,
        reason: None,
        metadata: None,
    })
}

async fn throughput(
    store: &Store,
    customers: usize,
    seconds: u64,
    concurrency: usize,
    label: &str,
) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let store = store.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let executed = store.execute(charge(customers), None).await?;
                anyhow::ensure!(
                    executed.result.is_ok(),
                    "charge refused: {:?}",
                    executed.result
                );
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    eprintln!(
        "{label}: {} charges in {:.1}s = {rate:.0}/s",
        done.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    Ok(rate)
}

/// Seconds of load at the target rate before latencies are recorded, so the
/// measurement starts from the steady state of that rate rather than from the
/// backlog (checkpointing) the throughput runs left behind.
const WARM_UP_SECONDS: u64 = 2;

async fn latency(
    store: &Store,
    customers: usize,
    rate: f64,
    seconds: u64,
) -> anyhow::Result<(Duration, Duration, f64)> {
    let total = (rate * (seconds + WARM_UP_SECONDS) as f64) as u64;
    let warm_up = (rate * WARM_UP_SECONDS as f64) as u64;
    let mut tasks = Vec::with_capacity(total as usize);
    // Open loop: charges are sent on schedule whether or not earlier ones
    // answered, in ticks of 1 ms; a charge's latency counts from the moment it
    // was due to be sent, so a stalled sender cannot hide a stall.
    let per_tick = (rate / 1000.0).max(1.0);
    let mut sent: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut owed = 0.0;
    let mut measured_from = Instant::now();
    while sent < total {
        let due = tick.tick().await.into_std();
        owed += per_tick;
        while owed >= 1.0 && sent < total {
            owed -= 1.0;
            sent += 1;
            if sent == warm_up {
                measured_from = due;
            }
            let store = store.clone();
            let command = charge(customers);
            let recorded = sent > warm_up;
            tasks.push(tokio::spawn(async move {
                let executed = store.execute(command, None).await?;
                anyhow::ensure!(executed.result.is_ok(), "charge refused");
                Ok(recorded.then(|| due.elapsed()))
            }));
        }
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    for task in tasks {
        if let Some(latency) = task.await?? {
            latencies.push(latency);
        }
    }
    let achieved = latencies.len() as f64 / measured_from.elapsed().as_secs_f64();
    latencies.sort();
    let pick = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q) as usize];
    Ok((pick(0.50), pick(0.99), achieved))
}

/// Usage events end to end through HTTP: parse, auth, price, charge, fsync,
/// answer. The clients share the machine with the server, as a co-located
/// producer would.
async fn http_events(store: &Store, args: &BenchArgs) -> anyhow::Result<()> {
    let key = "bench-admin-key";
    let state = tally_server::AppState::new(store.clone(), Some(key), None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, tally_server::router(state)).await;
    });
    let url = format!("http://{address}/v1/events");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let clients = (args.concurrency / args.batch.max(1)).clamp(1, 64);
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, url, next) = (client.clone(), url.clone(), next.clone());
        let (customers, batch) = (args.customers as u64, args.batch as u64);
        tasks.push(tokio::spawn(async move {
            let mut charged = 0u64;
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let first = next.fetch_add(batch, Ordering::Relaxed);
                // The body is written as text, as a producer would send it.
                let mut body = String::with_capacity(96 * batch as usize + 16);
                body.push_str(r#"{"events":["#);
                for n in first..first + batch {
                    let customer = n.wrapping_mul(2_654_435_761) % customers;
                    if n != first {
                        body.push(',');
                    }
                    body.push_str(&format!(
                        r#"{{"id":"ev_{n}","customer_id":"bench_{customer}","feature":"api_call","quantity":3}}"#
                    ));
                }
                body.push_str("]}");
                let sent = Instant::now();
                let response = client
                    .post(&url)
                    .bearer_auth(key)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                anyhow::ensure!(
                    response.status().is_success(),
                    "batch answered {}",
                    response.status()
                );
                let answer: BatchAnswer = serde_json::from_slice(&response.bytes().await?)?;
                latencies.push(sent.elapsed());
                anyhow::ensure!(
                    answer.results.len() as u64 == batch
                        && answer.results.iter().all(|r| r.status == "charged"),
                    "an event was not charged"
                );
                charged += answer.results.len() as u64;
            }
            Ok::<_, anyhow::Error>((charged, latencies))
        }));
    }
    let mut charged = 0;
    let mut latencies = Vec::new();
    for task in tasks {
        let (n, l) = task.await??;
        charged += n;
        latencies.extend(l);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let pick = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q) as usize];
    println!("| run | result |");
    println!("|---|---|");
    println!(
        "| durable events/s through POST /v1/events, batches of {}, {clients} clients, {} customers | {:.0} |",
        args.batch,
        args.customers,
        charged as f64 / elapsed
    );
    println!(
        "| batch latency p50 / p99 | {:.1} / {:.1} ms |",
        pick(0.5).as_secs_f64() * 1e3,
        pick(0.99).as_secs_f64() * 1e3
    );
    Ok(())
}

#[derive(serde::Deserialize)]
struct BatchAnswer {
    results: Vec<EventStatus>,
}

#[derive(serde::Deserialize)]
struct EventStatus {
    status: String,
}
