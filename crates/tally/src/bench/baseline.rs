//! `tally bench --postgres URL --baseline`: Tally over HTTP against the
//! baseline a team writes first, side by side on the same PostgreSQL.
//!
//! The baseline is one transaction per charge, from one connection per
//! client: insert the charge under its unique id, then
//! `UPDATE ... SET balance = balance - cost WHERE id = ... AND balance >= cost`,
//! then commit. The row lock taken by the update is held until the commit
//! returns, so charges of one customer commit one after another.
//!
//! Tally runs as a real `tally serve` child process over its own fresh
//! database on the same server, and clients send `POST /v1/charges` over
//! keep-alive HTTP connections. Both sides use the same customers, the same
//! charge (1.5 credits) and the same client counts, for `--seconds` each,
//! uniform over `--customers` and all on one hot customer. A third column
//! sends the same charges as usage events, `POST /v1/events` batches of
//! [`EVENTS_PER_BATCH`], over the same number of connections: how a product
//! reports metered usage. After every run the balances are checked against
//! the charges acknowledged.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};

use super::{cpu, postgres_admin, BenchArgs};

/// Clients per run, as the issue asks.
const CLIENTS: [usize; 3] = [1, 16, 64];
/// What one charge costs, in micro-credits (1.5 credits).
const CHARGE_MICROS: i64 = 1_500_000;
/// Every customer's starting balance, in credits: more than any run spends.
const START_CREDITS: i64 = 1_000_000_000;
const KEY: &str = "bench-admin-key";
/// Events per `POST /v1/events` request in the batch column.
const EVENTS_PER_BATCH: u64 = 100;

pub async fn run(server: &str, args: &BenchArgs) -> anyhow::Result<()> {
    let pid = std::process::id();
    let baseline_db = format!("tally_bench_baseline_{pid}");
    let tally_db = format!("tally_bench_http_{pid}");
    for name in [&baseline_db, &tally_db] {
        postgres_admin(
            server,
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        )?;
        postgres_admin(server, format!("CREATE DATABASE {name}"))?;
    }
    let result = compare(
        &format!("{server}/{baseline_db}"),
        &format!("{server}/{tally_db}"),
        args,
    )
    .await;
    for name in [&baseline_db, &tally_db] {
        let _ = postgres_admin(
            server,
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        );
    }
    result
}

async fn compare(baseline_url: &str, tally_url: &str, args: &BenchArgs) -> anyhow::Result<()> {
    let customers = args.customers;
    let seconds = args.seconds;
    let baseline = Baseline::new(baseline_url.to_owned());
    baseline.setup(customers).await?;
    let mut tally = TallyServer::start(tally_url).await?;
    eprintln!("setting up {customers} customers in Tally");
    tally.setup(customers).await?;

    let mut rows = Vec::new();
    let counts = if args.clients.is_empty() {
        CLIENTS.to_vec()
    } else {
        args.clients.clone()
    };
    for (workload, spread) in [("hot", 1), ("uniform", customers)] {
        if args.workload.as_deref().is_some_and(|w| w != workload) {
            continue;
        }
        for &clients in &counts {
            let base = baseline.run(clients, spread, seconds).await?;
            eprintln!("baseline {workload} {clients} clients: {:.0}/s", base.rate);
            let ours = tally.run(clients, spread, seconds).await?;
            eprintln!("tally {workload} {clients} clients: {:.0}/s", ours.rate);
            let batched = tally.run_batches(clients, spread, seconds).await?;
            eprintln!(
                "tally events {workload} {clients} clients: {:.0}/s",
                batched.rate
            );
            rows.push((workload, clients, base, ours, batched));
        }
    }
    baseline.check().await?;
    tally.check().await?;
    drop(tally);

    println!(
        "| workload | clients | baseline charges/s | Tally, POST /v1/charges | Tally / baseline \
         | Tally, POST /v1/events ({EVENTS_PER_BATCH} per request) | events / baseline |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (workload, clients, base, ours, batched) in &rows {
        println!(
            "| {workload} | {clients} | {:.0} | {:.0} | {:.1}x | {:.0} | {:.1}x |",
            base.rate,
            ours.rate,
            ours.rate / base.rate.max(1.0),
            batched.rate,
            batched.rate / base.rate.max(1.0),
        );
    }
    print_cpu(&rows);
    Ok(())
}

/// One run: charges (or events) per second, and where its CPU went.
struct Measured {
    rate: f64,
    /// `None` where `/proc` cannot be read.
    spent: Option<cpu::Spent>,
}

impl Measured {
    fn new(charges: u64, elapsed: f64, cpu: Option<(cpu::Sample, cpu::Sample)>) -> Measured {
        Measured {
            rate: charges as f64 / elapsed,
            spent: cpu.map(|(before, after)| before.until(&after, charges)),
        }
    }
}

/// The CPU table: for each run, CPU time per charge (per event for the
/// batches) of PostgreSQL, the Tally server and the bench process, and the
/// machine's idle share (see [`cpu`]).
fn print_cpu(rows: &[(&str, usize, Measured, Measured, Measured)]) {
    let runs: Option<Vec<_>> = rows
        .iter()
        .flat_map(|(workload, clients, base, ours, batched)| {
            [
                ("baseline", base),
                ("Tally, charges", ours),
                ("Tally, events", batched),
            ]
            .map(|(run, measured)| Some((workload, clients, run, measured.rate, measured.spent?)))
        })
        .collect();
    let Some(runs) = runs else {
        eprintln!("CPU per charge not measured: /proc cannot be read here");
        return;
    };
    println!();
    println!(
        "| workload | clients | run | per second | CPU µs per charge: PostgreSQL | Tally server \
         | bench process (baseline clients or HTTP load generator) | all three | machine idle |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let shown = |us: Option<f64>| us.map_or("–".to_owned(), |us| format!("{us:.1}"));
    for (workload, clients, run, rate, spent) in runs {
        let all =
            spent.postgres_us.unwrap_or(0.0) + spent.server_us.unwrap_or(0.0) + spent.bench_us;
        println!(
            "| {workload} | {clients} | {run} | {rate:.0} | {} | {} | {:.1} | {all:.1} | {:.0}% |",
            shown(spent.postgres_us),
            shown(spent.server_us),
            spent.bench_us,
            spent.idle_percent,
        );
    }
}

fn customer(index: usize) -> String {
    format!("bench_{index}")
}

/// The n-th charge's customer among `spread` (Knuth's multiplicative hash).
fn customer_of(n: u64, spread: usize) -> usize {
    (n.wrapping_mul(2_654_435_761) % spread as u64) as usize
}

/// The one-transaction-per-charge baseline.
struct Baseline {
    url: String,
    next: Arc<AtomicU64>,
}

impl Baseline {
    fn new(url: String) -> Baseline {
        Baseline {
            url,
            next: Arc::new(AtomicU64::new(0)),
        }
    }

    async fn setup(&self, customers: usize) -> anyhow::Result<()> {
        let url = self.url.clone();
        blocking(move || {
            let mut client = postgres::Client::connect(&url, postgres::NoTls)?;
            client.batch_execute(
                "CREATE TABLE baseline_customers (id TEXT PRIMARY KEY, balance BIGINT NOT NULL);
                 CREATE TABLE baseline_charges (id TEXT PRIMARY KEY, customer_id TEXT NOT NULL,
                     amount BIGINT NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now());",
            )?;
            client.execute(
                "INSERT INTO baseline_customers (id, balance) \
                 SELECT 'bench_' || n, $1::bigint FROM generate_series(0, $2::bigint - 1) AS n",
                &[&(START_CREDITS * 1_000_000), &(customers as i64)],
            )?;
            Ok(())
        })
        .await
    }

    /// Charges per second with `clients` connections over `spread` customers.
    async fn run(&self, clients: usize, spread: usize, seconds: u64) -> anyhow::Result<Measured> {
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        // Connect every client before the clock starts.
        let ready = Arc::new(std::sync::Barrier::new(clients + 1));
        for _ in 0..clients {
            let (url, next, done, stop, ready) = (
                self.url.clone(),
                self.next.clone(),
                done.clone(),
                stop.clone(),
                ready.clone(),
            );
            threads.push(std::thread::spawn(move || -> anyhow::Result<()> {
                let connected = postgres::Client::connect(&url, postgres::NoTls);
                ready.wait();
                let mut client = connected?;
                let insert = client.prepare(
                    "INSERT INTO baseline_charges (id, customer_id, amount) VALUES ($1, $2, $3)",
                )?;
                let update = client.prepare(
                    "UPDATE baseline_customers SET balance = balance - $2 \
                     WHERE id = $1 AND balance >= $2",
                )?;
                while !stop.load(Ordering::Relaxed) {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let id = format!("ch_{n}");
                    let customer = customer(customer_of(n, spread));
                    let mut transaction = client.transaction()?;
                    transaction.execute(&insert, &[&id, &customer, &CHARGE_MICROS])?;
                    let updated = transaction.execute(&update, &[&customer, &CHARGE_MICROS])?;
                    ensure!(updated == 1, "the baseline refused a charge");
                    transaction.commit()?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }));
        }
        let started = blocking({
            let ready = ready.clone();
            move || {
                ready.wait();
                Ok(Instant::now())
            }
        })
        .await?;
        let before = cpu::Sample::now(None);
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let counted = done.load(Ordering::Relaxed);
        let elapsed = started.elapsed().as_secs_f64();
        // While the clients' database connections are still open:
        // PostgreSQL's part is read from its backends, which end with them.
        let after = cpu::Sample::now(None);
        stop.store(true, Ordering::Relaxed);
        for thread in threads {
            blocking(move || {
                thread
                    .join()
                    .map_err(|_| anyhow::anyhow!("a client panicked"))?
            })
            .await?;
        }
        Ok(Measured::new(counted, elapsed, before.zip(after)))
    }

    /// Every committed charge is in exactly one balance.
    async fn check(&self) -> anyhow::Result<()> {
        let url = self.url.clone();
        blocking(move || {
            let mut client = postgres::Client::connect(&url, postgres::NoTls)?;
            let row = client.query_one(
                "SELECT (SELECT SUM($1::bigint - balance)::bigint FROM baseline_customers), \
                        (SELECT COALESCE(SUM(amount), 0)::bigint FROM baseline_charges)",
                &[&(START_CREDITS * 1_000_000)],
            )?;
            let (spent, charged): (i64, i64) = (row.get(0), row.get(1));
            ensure!(
                spent == charged,
                "baseline balances moved {spent} but charges sum to {charged}"
            );
            eprintln!(
                "baseline check: {} micro-credits charged and spent",
                charged
            );
            Ok(())
        })
        .await
    }
}

/// A `tally serve` child process on its own database.
struct TallyServer {
    child: std::process::Child,
    base: String,
    client: reqwest::Client,
    next: Arc<AtomicU64>,
    acknowledged: Arc<AtomicU64>,
    customers: usize,
}

impl Drop for TallyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TallyServer {
    async fn start(database_url: &str) -> anyhow::Result<TallyServer> {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            listener.local_addr()?.port()
        };
        let child = std::process::Command::new(std::env::current_exe()?)
            .args(["serve", "--database-url", database_url, "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .env("TALLY_ADMIN_KEY", KEY)
            // The server's log (e.g. `tally_store=debug` for its write groups).
            .env(
                "RUST_LOG",
                std::env::var("TALLY_BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("start tally serve")?;
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()?;
        let server = TallyServer {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client,
            next: Arc::new(AtomicU64::new(0)),
            acknowledged: Arc::new(AtomicU64::new(0)),
            customers: 0,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let health = server
                .client
                .get(format!("{}/healthz", server.base))
                .send()
                .await;
            if let Ok(response) = health {
                let body: serde_json::Value = response.json().await?;
                if body["writer"] == true {
                    return Ok(server);
                }
            }
            if Instant::now() > deadline {
                bail!("tally serve did not become the writer within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn setup(&mut self, customers: usize) -> anyhow::Result<()> {
        self.customers = customers;
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        let this = Arc::new(self.shallow());
        for _ in 0..64 {
            let (this, next) = (this.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if index >= customers {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let id = customer(index);
                    this.post("/v1/customers", format!(r#"{{"id":"{id}"}}"#))
                        .await?;
                    this.post(
                        &format!("/v1/customers/{id}/grants"),
                        format!(
                            r#"{{"id":"grant_{index}","amount":"{START_CREDITS}","source":"purchase","paid":true}}"#
                        ),
                    )
                    .await?;
                }
            }));
        }
        for task in tasks {
            task.await??;
        }
        // Events are priced: 1.5 credits per call, like the charges.
        let this = self.shallow();
        let put = self
            .client
            .put(format!("{}/v1/features/api_call", self.base))
            .bearer_auth(KEY)
            .json(&serde_json::json!({"name": "API call", "unit": "call"}))
            .send()
            .await?;
        ensure!(put.status().is_success(), "feature: {}", put.status());
        this.post("/v1/pricebooks", r#"{"id":"bench_v1"}"#.into())
            .await?;
        let put = self
            .client
            .put(format!("{}/v1/pricebooks/bench_v1/rules", self.base))
            .bearer_auth(KEY)
            .json(
                &serde_json::json!({"rules": [{"feature": "api_call", "credits_per_unit": "1.5"}]}),
            )
            .send()
            .await?;
        ensure!(put.status().is_success(), "rules: {}", put.status());
        this.post("/v1/pricebooks/bench_v1/publish", "{}".into())
            .await?;
        Ok(())
    }

    /// Events per second through `POST /v1/events`, `clients` connections
    /// each sending one batch at a time.
    async fn run_batches(
        &self,
        clients: usize,
        spread: usize,
        seconds: u64,
    ) -> anyhow::Result<Measured> {
        self.closed_loop(
            clients,
            seconds,
            "/v1/events",
            EVENTS_PER_BATCH,
            move |first| {
                let mut body = String::with_capacity(96 * EVENTS_PER_BATCH as usize + 16);
                body.push_str(r#"{"events":["#);
                for n in first..first + EVENTS_PER_BATCH {
                    if n != first {
                        body.push(',');
                    }
                    body.push_str(&format!(
                        r#"{{"id":"ev_{n}","customer_id":"{}","feature":"api_call","quantity":1}}"#,
                        customer(customer_of(n, spread))
                    ));
                }
                body.push_str("]}");
                body
            },
        )
        .await
    }

    /// Charges per second through `POST /v1/charges`, `clients` connections
    /// each sending one charge at a time.
    async fn run(&self, clients: usize, spread: usize, seconds: u64) -> anyhow::Result<Measured> {
        self.closed_loop(clients, seconds, "/v1/charges", 1, move |n| {
            format!(
                r#"{{"id":"ch_{n}","customer_id":"{}","amount":"1.5"}}"#,
                customer(customer_of(n, spread))
            )
        })
        .await
    }

    /// `clients` tasks, each posting `body(n)` to `path` and waiting for its
    /// answer, again and again for `seconds`; a request carries `per_request`
    /// charges numbered from `n`, all of which must be charged. Charges per
    /// second.
    ///
    /// Each client is one keep-alive HTTP/1.1 connection driven by hyper in
    /// the client's own task, with its headers built once: the load
    /// generator shares the machine's two cores with the server and
    /// PostgreSQL, and a general-purpose client (a connection pool, a URL
    /// parsed per request, its connection in another task, the answer
    /// parsed into a `serde_json::Value`) cost as much CPU as the server
    /// itself (BENCHMARKS.md, 2026-12-05, later). All the clients run on one
    /// thread of their own (a current-thread runtime), which took about a
    /// tenth less CPU than the two shared workers of the bench's runtime
    /// (BENCHMARKS.md, 2026-12-06, thirteenth session).
    async fn closed_loop(
        &self,
        clients: usize,
        seconds: u64,
        path: &str,
        per_request: u64,
        body: impl Fn(u64) -> String + Clone + Send + Sync + 'static,
    ) -> anyhow::Result<Measured> {
        let done = Arc::new(AtomicU64::new(0));
        let server = Some(self.child.id());
        let before = cpu::Sample::now(server);
        let started = Instant::now();
        let address = self
            .base
            .strip_prefix("http://")
            .context("the server's base URL")?
            .to_owned();
        let client = LoopClient {
            host: hyper::header::HeaderValue::from_str(&address)?,
            bearer: hyper::header::HeaderValue::from_str(&format!("Bearer {KEY}"))?,
            address,
            path: path.to_owned(),
            per_request,
            deadline: started + Duration::from_secs(seconds),
            next: self.next.clone(),
            done: done.clone(),
            acknowledged: self.acknowledged.clone(),
            body,
        };
        blocking(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async move {
                    let tasks: Vec<_> = (0..clients)
                        .map(|_| tokio::spawn(client.clone().run()))
                        .collect();
                    for task in tasks {
                        task.await??;
                    }
                    Ok(())
                })
        })
        .await?;
        let elapsed = started.elapsed().as_secs_f64();
        let after = cpu::Sample::now(server);
        Ok(Measured::new(
            done.load(Ordering::Relaxed),
            elapsed,
            before.zip(after),
        ))
    }

    /// A handle sharing the client (not the child process).
    fn shallow(&self) -> Shallow {
        Shallow {
            base: self.base.clone(),
            client: self.client.clone(),
        }
    }

    /// The balances the server reports sum to what the acknowledged charges spent.
    async fn check(&self) -> anyhow::Result<()> {
        let mut spent: i128 = 0;
        for index in 0..self.customers {
            let body: serde_json::Value = self
                .client
                .get(format!(
                    "{}/v1/customers/{}/balance",
                    self.base,
                    customer(index)
                ))
                .bearer_auth(KEY)
                .send()
                .await?
                .json()
                .await?;
            let available = tally_core::Amount::parse(
                body["available"]
                    .as_str()
                    .context("a balance's available")?,
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            spent += i128::from(START_CREDITS) * 1_000_000 - i128::from(available.micros());
        }
        let charged =
            i128::from(self.acknowledged.load(Ordering::Relaxed)) * i128::from(CHARGE_MICROS);
        ensure!(
            spent == charged,
            "Tally balances moved {spent} but acknowledged charges sum to {charged}"
        );
        eprintln!("tally check: {charged} micro-credits acknowledged and spent");
        Ok(())
    }
}

/// One client of [`TallyServer::closed_loop`]: a keep-alive HTTP/1.1
/// connection posting `body(n)` to `path` until `deadline`, one request at
/// a time, each of `per_request` charges numbered from `n`.
#[derive(Clone)]
struct LoopClient<B> {
    address: String,
    host: hyper::header::HeaderValue,
    bearer: hyper::header::HeaderValue,
    path: String,
    per_request: u64,
    deadline: Instant,
    next: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
    acknowledged: Arc<AtomicU64>,
    body: B,
}

impl<B: Fn(u64) -> String> LoopClient<B> {
    async fn run(self) -> anyhow::Result<()> {
        let stream = tokio::net::TcpStream::connect(&self.address).await?;
        stream.set_nodelay(true)?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        let requests = async move {
            while Instant::now() < self.deadline {
                self.one(&mut sender).await?;
            }
            // Dropping the sender ends the connection.
            Ok::<_, anyhow::Error>(())
        };
        let (connection, requests) = tokio::join!(connection, requests);
        requests?;
        connection?;
        Ok(())
    }

    /// Send one request and check its answer: every charge in it charged.
    async fn one(
        &self,
        sender: &mut hyper::client::conn::http1::SendRequest<
            http_body_util::Full<hyper::body::Bytes>,
        >,
    ) -> anyhow::Result<()> {
        use http_body_util::BodyExt;
        use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};

        /// What the bench reads of an answer: each event's status, for a
        /// batch (`POST /v1/events`).
        #[derive(serde::Deserialize)]
        struct Answer {
            results: Option<Vec<EventResult>>,
        }
        #[derive(serde::Deserialize)]
        struct EventResult {
            status: String,
        }

        let first = self.next.fetch_add(self.per_request, Ordering::Relaxed);
        let mut request = hyper::Request::post(self.path.as_str()).body(
            http_body_util::Full::new(hyper::body::Bytes::from((self.body)(first))),
        )?;
        let headers = request.headers_mut();
        headers.insert(HOST, self.host.clone());
        headers.insert(AUTHORIZATION, self.bearer.clone());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let answer = response.into_body().collect().await?.to_bytes();
        ensure!(
            status.is_success(),
            "{} answered {status}: {}",
            self.path,
            String::from_utf8_lossy(&answer)
        );
        // A batch answers each event; every one must be charged.
        if self.per_request > 1 {
            let parsed: Answer = serde_json::from_slice(&answer)?;
            let results = parsed.results.unwrap_or_default();
            ensure!(
                results.len() as u64 == self.per_request
                    && results.iter().all(|r| r.status == "charged"),
                "an event was not charged: {}",
                String::from_utf8_lossy(&answer)
            );
        }
        self.done.fetch_add(self.per_request, Ordering::Relaxed);
        self.acknowledged
            .fetch_add(self.per_request, Ordering::Relaxed);
        Ok(())
    }
}

struct Shallow {
    base: String,
    client: reqwest::Client,
}

impl Shallow {
    async fn post(&self, path: &str, body: String) -> anyhow::Result<()> {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        let status = response.status();
        if !status.is_success() {
            bail!("{path} answered {status}: {}", response.text().await?);
        }
        Ok(())
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await?
}
