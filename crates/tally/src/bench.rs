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
    #[arg(long, default_value_t = 10_000, value_parser = at_least_one)]
    customers: usize,
    /// Seconds per throughput run.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    seconds: u64,
    /// Charges in flight at once.
    #[arg(long, default_value_t = 4096, value_parser = at_least_one)]
    concurrency: usize,
    /// Offer this many charges/s in the latency run (default: half the lower
    /// measured rate; with --kafka-events, events/s).
    #[arg(long, value_parser = positive_rate)]
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
    /// Measure usage events through Kafka instead: a real broker (start one with
    /// `bash scripts/kafka.sh`), a fresh topic of 4 partitions, and the
    /// consumer of `tally serve --kafka-brokers` in this process. Reports the
    /// durable events/s of a pre-produced backlog, then p50 and p99 from
    /// produce to balance visible at `--latency-rate` (default: half the
    /// measured rate) for `--seconds`.
    #[arg(long, conflicts_with = "http_events")]
    kafka_events: bool,
    /// Kafka bootstrap brokers (with --kafka-events).
    #[arg(long, default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    /// Events produced before the consumer starts (with --kafka-events).
    #[arg(long, default_value_t = 100_000)]
    kafka_messages: u64,
    /// Measure produce-to-visible latency on one event in this many (with --kafka-events).
    #[arg(long, default_value_t = 50)]
    kafka_sample: u64,
    /// Events per batch (with --http-events).
    #[arg(long, default_value_t = 1000, value_parser = at_least_one)]
    batch: usize,
    /// Where to put the temporary database (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Run on PostgreSQL instead of the embedded store: a fresh database
    /// `tally_bench_<pid>` is created on this server (for instance
    /// `postgres://postgres@127.0.0.1:5432`) and dropped at the end.
    #[arg(long)]
    postgres: Option<String>,
    /// With --postgres: Tally over HTTP (a `tally serve` child process)
    /// against the one-transaction-per-charge baseline, 1, 16 and 64
    /// clients, hot and uniform, side by side on that server; then each
    /// run's CPU per charge and the machine's idle share (Linux).
    #[arg(long, requires = "postgres")]
    baseline: bool,
    /// With --baseline: the client counts to run (default 1,16,64).
    #[arg(long, value_delimiter = ',', requires = "baseline", value_parser = at_least_one)]
    clients: Vec<usize>,
    /// With --baseline: only this workload (hot or uniform; default both).
    #[arg(long, requires = "baseline", value_parser = ["hot", "uniform"])]
    workload: Option<String>,
}

/// A count of at least one (0 customers, clients or charges in flight
/// measured nothing, or divided by zero).
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// A rate above zero (a rate, not an amount: a float is fine here).
fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 1.0 => Ok(rate),
        Ok(_) => Err("must be at least 1 per second".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The store under measurement and how to remove it afterwards.
struct Bench {
    store: Store,
    dir: Option<PathBuf>,
    database: Option<(String, String)>,
}

impl Bench {
    async fn open(args: &BenchArgs) -> anyhow::Result<Bench> {
        if let Some(server) = &args.postgres {
            let name = format!("tally_bench_{}", std::process::id());
            postgres_admin(
                server,
                format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            )?;
            postgres_admin(server, format!("CREATE DATABASE {name}"))?;
            let url = format!("{server}/{name}");
            let store = Store::open_postgres(&url, Arc::new(SystemClock), Default::default())
                .context("open the bench store on PostgreSQL")?;
            // No server listens: nobody forwards to this one.
            store.advertise("http://127.0.0.1:9".into());
            store.wait_until_leader().await;
            eprintln!("bench database {url}");
            return Ok(Bench {
                store,
                dir: None,
                database: Some((server.clone(), name)),
            });
        }
        let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("tally-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir, Arc::new(SystemClock)).context("open bench store")?;
        eprintln!("bench data directory {dir:?}");
        Ok(Bench {
            store,
            dir: Some(dir),
            database: None,
        })
    }

    fn remove(self) {
        drop(self.store);
        if let Some(dir) = self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        if let Some((server, name)) = self.database {
            let _ = postgres_admin(
                &server,
                format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            );
        }
    }
}

/// One statement on `server`'s `postgres` database, on a thread of its own
/// (the sync client runs its own runtime).
pub(crate) fn postgres_admin(server: &str, sql: String) -> anyhow::Result<()> {
    let server = server.to_owned();
    std::thread::spawn(move || -> anyhow::Result<()> {
        let mut client = postgres::Client::connect(&format!("{server}/postgres"), postgres::NoTls)
            .with_context(|| format!("connect to PostgreSQL at {server}"))?;
        client.batch_execute(&sql).with_context(|| sql.clone())?;
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the PostgreSQL admin thread panicked"))?
}

mod baseline;
mod cpu;

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let (true, Some(server)) = (args.baseline, &args.postgres) {
        return baseline::run(server, &args).await;
    }
    RANDOM_IDS.store(args.random_ids, Ordering::Relaxed);
    PRICED.store(args.priced, Ordering::Relaxed);
    let bench = Bench::open(&args).await?;
    let result = measure(&bench.store, &args).await;
    bench.remove();
    result
}

async fn measure(store: &Store, args: &BenchArgs) -> anyhow::Result<()> {
    eprintln!("setting up {} customers", args.customers);
    setup(store, args.customers).await?;
    if args.priced || args.http_events || args.kafka_events {
        publish_price(store).await?;
    }
    if args.kafka_events {
        return kafka::run(store, args).await;
    }
    if args.http_events {
        return http_events(store, args).await;
    }
    let uniform = throughput(
        store,
        args.customers,
        args.seconds,
        args.concurrency,
        "uniform",
    )
    .await?;
    let hot = throughput(store, 1, args.seconds, args.concurrency, "hot").await?;
    let rate = args.latency_rate.unwrap_or(uniform.min(hot) / 2.0);
    // Start the latency run from a checkpointed database, not from the backlog
    // of write-ahead log the throughput runs left behind.
    store.checkpoint().await.context("checkpoint")?;
    let measured = latency(store, args.customers, rate, args.seconds).await?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("| run | result |");
    println!("|---|---|");
    println!(
        "| durable charges/s, uniform over {} customers | {:.0} |",
        args.customers, uniform
    );
    println!("| durable charges/s, one hot customer | {hot:.0} |");
    println!(
        "| latency at {rate:.0}/s offered ({:.0}/s achieved), p50 | {:.2} ms |",
        measured.achieved,
        ms(measured.p50)
    );
    println!(
        "| latency at {rate:.0}/s offered, p99 | {:.2} ms |",
        ms(measured.p99)
    );
    println!(
        "| latency at {rate:.0}/s offered, p90 / p99.9 / max | {:.2} / {:.2} / {:.2} ms |",
        ms(measured.p90),
        ms(measured.p999),
        ms(measured.max)
    );
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
            let create = NewCustomer::with_id(id.clone());
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

/// What the latency run measured: quantiles from due to durable answer, and
/// the rate achieved.
struct Latencies {
    p50: Duration,
    p90: Duration,
    p99: Duration,
    p999: Duration,
    max: Duration,
    achieved: f64,
}

async fn latency(
    store: &Store,
    customers: usize,
    rate: f64,
    seconds: u64,
) -> anyhow::Result<Latencies> {
    let total = (rate * (seconds + WARM_UP_SECONDS) as f64) as u64;
    let warm_up = (rate * WARM_UP_SECONDS as f64) as u64;
    // Each charge's task reports its latency and ends at once: holding every
    // task until the run ends kept hundreds of megabytes of finished tasks
    // alive, and the harness then spent its time faulting in fresh memory
    // (BENCHMARKS.md).
    let (report, mut reports) =
        tokio::sync::mpsc::unbounded_channel::<anyhow::Result<Option<Duration>>>();
    let collector = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity((total - warm_up) as usize);
        let mut answered = 0u64;
        while let Some(result) = reports.recv().await {
            if let Some(latency) = result? {
                latencies.push(latency);
            }
            answered += 1;
        }
        // Every task reports once, even a refused charge; a task that
        // panicked dropped its sender unreported.
        anyhow::ensure!(
            answered == total,
            "{} charges never answered",
            total - answered
        );
        anyhow::Ok(latencies)
    });
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
            let (store, report) = (store.clone(), report.clone());
            let command = charge(customers);
            let recorded = sent > warm_up;
            tokio::spawn(async move {
                let result = match store.execute(command, None).await {
                    Ok(executed) if executed.result.is_ok() => Ok(recorded.then(|| due.elapsed())),
                    Ok(_) => Err(anyhow::anyhow!("charge refused")),
                    Err(error) => Err(error.into()),
                };
                let _ = report.send(result);
            });
        }
    }
    drop(report);
    let mut latencies = collector.await??;
    let achieved = latencies.len() as f64 / measured_from.elapsed().as_secs_f64();
    latencies.sort();
    let pick = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q) as usize];
    Ok(Latencies {
        p50: pick(0.50),
        p90: pick(0.90),
        p99: pick(0.99),
        p999: pick(0.999),
        max: pick(1.0),
        achieved,
    })
}

/// Usage events end to end through HTTP: parse, auth, price, charge, fsync,
/// answer. The clients share the machine with the server, as a co-located
/// producer would.
async fn http_events(store: &Store, args: &BenchArgs) -> anyhow::Result<()> {
    let key = "bench-admin-key";
    let state = tally_server::AppState::new(store.clone(), Some(key), None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    // As `tally serve` does.
    tokio::spawn(tally_server::serve::serve(
        listener,
        tally_server::router(state),
        tally_server::serve::READ_TIMEOUT,
        std::future::pending(),
    ));
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

/// Usage events through Kafka (`--kafka-events`): the consumer of `tally
/// serve --kafka-brokers` in this process, against a real broker.
///
/// 1. Throughput: a fresh topic of 4 partitions is filled with
///    `--kafka-messages` events keyed by customer, then the consumer starts
///    (a new group, from the earliest offset) and drains it. Events are
///    counted when the consumer's `ingest` returned, that is once durable, by
///    the in-process `tally_events_total{source="kafka"}` counter.
/// 2. Latency: with the consumer caught up, events are produced open loop at
///    `--latency-rate` (default: half the drain rate) for `--seconds` (after
///    a warm-up), each to the next customer in rotation. For one event in
///    `--kafka-sample`, a task polls that customer's balance every
///    millisecond (less often past 50 ms) and records the time from
///    just before the event was handed to the producer to the first read that
///    shows its charge.
mod kafka {
    use std::collections::HashMap;
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use anyhow::Context;
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
    use tally_server::streams::StreamArgs;
    use tally_server::AppState;
    use tally_store::Store;

    use super::{customer, BenchArgs, WARM_UP_SECONDS};

    const PARTITIONS: i32 = 4;
    /// What one event costs: 3 units at 0.5 credits, in micro-credits.
    const EVENT_MICROS: i64 = 1_500_000;
    /// Give up when the consumer makes no progress for this long.
    const STALL: Duration = Duration::from_secs(60);

    pub async fn run(store: &Store, args: &BenchArgs) -> anyhow::Result<()> {
        let brokers = args.kafka_brokers.as_str();
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
        let name = format!("tally-bench-{}-{nanos}", std::process::id());
        // The topic is left on the broker: deleting it under the running
        // consumer crashed librdkafka (a segfault in its metadata cache).
        create_topic(brokers, &name).await?;
        measure(store, args, &name).await
    }

    async fn measure(store: &Store, args: &BenchArgs, topic: &str) -> anyhow::Result<()> {
        let brokers = args.kafka_brokers.as_str();
        let customers = args.customers as u64;
        let messages = args.kafka_messages;
        anyhow::ensure!(messages > 0, "--kafka-messages must be at least 1");

        // 1. The backlog, produced before the consumer exists.
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "20")
            .set("batch.num.messages", "10000")
            .set("batch.size", "4000000")
            .set("queue.buffering.max.messages", "2000000")
            .set("queue.buffering.max.kbytes", "2097151")
            .set("message.timeout.ms", "60000")
            .create()
            .context("create the Kafka producer")?;
        eprintln!("producing {messages} events to {topic} on {brokers}");
        let produced_from = Instant::now();
        let mut deliveries = Vec::with_capacity(messages as usize);
        for n in 0..messages {
            let index = n.wrapping_mul(2_654_435_761) % customers;
            deliveries.push(send(&producer, topic, n, index).await?);
        }
        await_deliveries(deliveries).await?;
        let produce_seconds = produced_from.elapsed().as_secs_f64();
        eprintln!(
            "produced {messages} events in {produce_seconds:.2}s = {:.0}/s",
            messages as f64 / produce_seconds
        );

        // 2. The consumer of `tally serve`, in a new group: it drains the backlog.
        let state = AppState::new(store.clone(), None, None);
        let cpu_before = super::cpu::own_seconds();
        let started = Instant::now();
        tally_server::streams::start(
            state.clone(),
            &StreamArgs {
                kafka_brokers: Some(brokers.to_owned()),
                kafka_topic: Some(topic.to_owned()),
                kafka_group: topic.to_owned(),
                ..Default::default()
            },
            &state.shutdown.subscribe(),
        )?;
        let mut first_charge = None;
        let mut progress = (0, Instant::now());
        let mut second = (0, Instant::now());
        let drained = loop {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let counts = counts(&state);
            counts.check()?;
            let now = Instant::now();
            if counts.charged > 0 && first_charge.is_none() {
                first_charge = Some(now);
                second = (counts.charged, now);
                eprintln!(
                    "first charge {:.2}s after the consumer started",
                    (now - started).as_secs_f64()
                );
            }
            if counts.charged >= messages {
                break now;
            }
            if counts.charged > progress.0 {
                progress = (counts.charged, now);
            } else if now - progress.1 > STALL {
                anyhow::bail!(
                    "the consumer charged nothing for {STALL:?} ({} of {messages} charged)",
                    counts.charged
                );
            }
            if first_charge.is_some() && now - second.1 >= Duration::from_secs(1) {
                eprintln!(
                    "  {} charged, {:.0}/s over the last second",
                    counts.charged,
                    (counts.charged - second.0) as f64 / (now - second.1).as_secs_f64()
                );
                second = (counts.charged, now);
            }
        };
        let cpu = super::cpu::own_seconds()
            .zip(cpu_before)
            .map(|(after, before)| after - before);
        let first_charge = first_charge.expect("charged");
        let join = (first_charge - started).as_secs_f64();
        let drain = (drained - first_charge).as_secs_f64();
        let overall = (drained - started).as_secs_f64();
        // CPU of this process (store, consumer, librdkafka) from the start of
        // the consumer, so it includes the join, when it is nearly idle.
        let cores = cpu.map(|cpu| cpu / overall);

        // 3. Latency, with the consumer caught up.
        store.checkpoint().await.context("checkpoint")?;
        // Half the rate the consumer drained at, like the latency run of the
        // charge benchmark: a rate it can sustain, so that the latency is not
        // that of a growing backlog.
        let rate = args
            .latency_rate
            .unwrap_or((messages as f64 / drain / 2.0).round());
        let latency = latency(store, &state, args, topic, rate).await?;

        let parallelism = std::thread::available_parallelism().map_or(0, |n| n.get());
        println!("| run | result |");
        println!("|---|---|");
        println!(
            "| produce {messages} events ({PARTITIONS} partitions, keyed by customer, acks=all, linger 20 ms) | {produce_seconds:.2} s = {:.0}/s |",
            messages as f64 / produce_seconds
        );
        println!("| consumer group join: start to first charge | {join:.2} s |");
        println!(
            "| durable events/s through Kafka, first to last charge, {} customers | {:.0} |",
            args.customers,
            messages as f64 / drain
        );
        println!(
            "| durable events/s including the group join | {:.0} |",
            messages as f64 / overall
        );
        if let Some(cores) = cores {
            println!(
                "| CPU of this process from consumer start to last charge | {cores:.2} of {parallelism} cores |"
            );
        }
        println!(
            "| produce to balance visible at {rate:.0}/s offered ({:.0}/s achieved), p50 | {:.2} ms |",
            latency.achieved,
            latency.p50.as_secs_f64() * 1e3
        );
        println!(
            "| produce to balance visible, p99 / max ({} sampled events) | {:.2} / {:.2} ms |",
            latency.samples,
            latency.p99.as_secs_f64() * 1e3,
            latency.max.as_secs_f64() * 1e3
        );
        println!(
            "| last event produced to every event charged | {:.2} ms |",
            latency.caught_up.as_secs_f64() * 1e3
        );
        Ok(())
    }

    struct Latency {
        p50: Duration,
        p99: Duration,
        max: Duration,
        samples: usize,
        /// Events/s produced while recorded.
        achieved: f64,
        /// From the last event produced to every event charged.
        caught_up: Duration,
    }

    /// Events produced open loop at `rate`, each to the next customer; one in
    /// `--kafka-sample` timed from the producer to a balance read showing it.
    async fn latency(
        store: &Store,
        state: &AppState,
        args: &BenchArgs,
        topic: &str,
        rate: f64,
    ) -> anyhow::Result<Latency> {
        anyhow::ensure!(rate > 0.0, "--latency-rate must be positive");
        let customers = args.customers as u64;
        let sample = args.kafka_sample.max(1);
        let first = args.kafka_messages;
        let total = (rate * (args.seconds + WARM_UP_SECONDS) as f64) as u64;
        let warm_up = (rate * WARM_UP_SECONDS as f64) as u64;
        // What each sampled customer has before this run (the backlog is all
        // charged), in micro-credits.
        let mut baseline: HashMap<u64, i64> = HashMap::new();
        for j in (0..total).step_by(sample as usize) {
            let index = j % customers;
            if let std::collections::hash_map::Entry::Vacant(entry) = baseline.entry(index) {
                let balance = store
                    .balance(customer(index as usize))
                    .await?
                    .context("bench customer missing")?;
                entry.insert(balance.balance.available.micros());
            }
        }
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &args.kafka_brokers)
            .set("linger.ms", "1")
            .set("message.timeout.ms", "60000")
            .create()
            .context("create the Kafka producer")?;
        eprintln!(
            "latency: {total} events at {rate:.0}/s ({warm_up} of warm-up), one in {sample} timed"
        );
        let mut sent_to = vec![0i64; customers as usize];
        let mut deliveries = Vec::with_capacity(total as usize);
        let mut pollers = Vec::new();
        let per_tick = rate / 1000.0;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut owed = 0.0;
        let mut sent = 0u64;
        let mut measured_from = Instant::now();
        while sent < total {
            tick.tick().await;
            owed += per_tick;
            while owed >= 1.0 && sent < total {
                owed -= 1.0;
                let j = sent;
                sent += 1;
                let index = j % customers;
                sent_to[index as usize] += 1;
                let timed = j.is_multiple_of(sample);
                if j == warm_up {
                    measured_from = Instant::now();
                }
                let at = Instant::now();
                deliveries.push(send(&producer, topic, first + j, index).await?);
                if timed && j >= warm_up {
                    let visible_at = baseline[&index] - EVENT_MICROS * sent_to[index as usize];
                    let store = store.clone();
                    pollers.push(tokio::spawn(async move {
                        visible(&store, index, visible_at, at).await
                    }));
                }
            }
        }
        let achieved = (total - warm_up) as f64 / measured_from.elapsed().as_secs_f64();
        let last_sent = Instant::now();
        await_deliveries(deliveries).await?;
        let mut latencies = Vec::with_capacity(pollers.len());
        for poller in pollers {
            latencies.push(poller.await??);
        }
        // Every event of this run is charged, and nothing else happened.
        let expected = first + total;
        let waiting = Instant::now();
        let caught_up;
        loop {
            let counts = counts(state);
            counts.check()?;
            if counts.charged >= expected {
                caught_up = last_sent.elapsed();
                anyhow::ensure!(
                    counts.charged == expected && counts.duplicate == 0,
                    "expected {expected} charged events, counted {counts:?}"
                );
                break;
            }
            anyhow::ensure!(
                waiting.elapsed() < STALL,
                "only {} of {expected} events charged",
                counts.charged
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        anyhow::ensure!(!latencies.is_empty(), "no event was timed");
        latencies.sort();
        let pick = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q) as usize];
        Ok(Latency {
            p50: pick(0.5),
            p99: pick(0.99),
            max: latencies[latencies.len() - 1],
            samples: latencies.len(),
            achieved,
            caught_up,
        })
    }

    /// Poll a customer's balance every millisecond until it is at most
    /// `visible_at` micro-credits; the time since `at`. After the first 50 ms
    /// the pause between reads grows to 2% of the time waited so far (so the
    /// error stays under 2%), so that the pollers of a backlog do not take the
    /// CPU from the consumer they are measuring.
    async fn visible(
        store: &Store,
        index: u64,
        visible_at: i64,
        at: Instant,
    ) -> anyhow::Result<Duration> {
        let id = customer(index as usize);
        let mut every = tokio::time::interval(Duration::from_millis(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            every.tick().await;
            let waited = at.elapsed();
            if waited > Duration::from_millis(50) {
                tokio::time::sleep(waited / 50).await;
            }
            let balance = store
                .balance(id.clone())
                .await?
                .context("bench customer missing")?;
            if balance.balance.available.micros() <= visible_at {
                return Ok(at.elapsed());
            }
            anyhow::ensure!(
                at.elapsed() < STALL,
                "an event to {id} was not visible after {STALL:?}"
            );
        }
    }

    /// Hand one event to the producer (waiting while its queue is full).
    async fn send(
        producer: &FutureProducer,
        topic: &str,
        n: u64,
        index: u64,
    ) -> anyhow::Result<DeliveryFuture> {
        let key = format!("bench_{index}");
        let payload = format!(
            r#"{{"id":"kev_{n}","customer_id":"bench_{index}","feature":"api_call","quantity":3}}"#
        );
        loop {
            let record = FutureRecord::to(topic).key(&key).payload(&payload);
            match producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((error, _)) => anyhow::bail!("produce to {topic}: {error}"),
            }
        }
    }

    async fn await_deliveries(deliveries: Vec<DeliveryFuture>) -> anyhow::Result<()> {
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((error, _))) => anyhow::bail!("an event was not delivered: {error}"),
                Err(_) => anyhow::bail!("the producer went away before a delivery report"),
            }
        }
        Ok(())
    }

    async fn create_topic(brokers: &str, topic: &str) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .context("create the Kafka admin client")?;
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = tokio::time::timeout(
            Duration::from_secs(20),
            admin.create_topics(
                &[NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1))],
                &options,
            ),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no Kafka broker answered on {brokers} in 20 s (start one with `bash scripts/kafka.sh`)"
            )
        })?
        .with_context(|| format!("create topic {topic} on {brokers}"))?;
        for result in results {
            result.map_err(|(name, code)| anyhow::anyhow!("create topic {name}: {code}"))?;
        }
        Ok(())
    }

    /// Kafka events counted by the consumer, by result.
    #[derive(Debug, Default)]
    struct Counts {
        charged: u64,
        duplicate: u64,
        rejected: u64,
    }

    impl Counts {
        fn check(&self) -> anyhow::Result<()> {
            anyhow::ensure!(
                self.rejected == 0,
                "the consumer rejected {} event(s) (dead letters)",
                self.rejected
            );
            Ok(())
        }
    }

    /// `tally_events_total{source="kafka",status=...}` from the in-process metrics.
    fn counts(state: &AppState) -> Counts {
        let mut counts = Counts::default();
        for line in state.metrics.render().lines() {
            let Some(labels) = line.strip_prefix("tally_events_total{") else {
                continue;
            };
            if !labels.contains(r#"source="kafka""#) {
                continue;
            }
            let value = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0) as u64;
            if labels.contains(r#"status="charged""#) {
                counts.charged = value;
            } else if labels.contains(r#"status="duplicate""#) {
                counts.duplicate = value;
            } else if labels.contains(r#"status="rejected""#) {
                counts.rejected = value;
            }
        }
        counts
    }
}
