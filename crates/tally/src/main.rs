//! The `tally` binary: `serve`, `migrate`, `keys create` and `bench`.

/// mimalloc instead of the system allocator: requests are parsed on the
/// async threads and freed on the writer's, and glibc's allocator made those
/// threads wait on each other's arena locks (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod dead_letters;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tally_core::Clock;
use tally_server::AppState;
use tally_store::{ManualClock, Store, SystemClock};

#[derive(Parser)]
#[command(name = "tally", version, about = "Tally, the credits engine")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(clap::Args, Clone)]
struct StorageArgs {
    /// Where the embedded database lives.
    #[arg(long, env = "TALLY_DATA_DIR", default_value = "./tally-data")]
    data_dir: PathBuf,
    /// Use PostgreSQL instead of the embedded database
    /// (postgres://user@host:port/database); several servers may share it.
    #[arg(long, env = "TALLY_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

impl StorageArgs {
    /// The PostgreSQL URL, if one is given: an empty `TALLY_DATABASE_URL`
    /// (as compose files leave unset variables) counts as none.
    fn postgres_url(&self) -> Option<&str> {
        self.database_url
            .as_deref()
            .map(str::trim)
            .filter(|url| !url.is_empty())
    }

    fn location(&self) -> tally_store::Location<'_> {
        match self.postgres_url() {
            Some(url) => tally_store::Location::Postgres(url),
            None => tally_store::Location::Embedded(&self.data_dir),
        }
    }

    /// The location of a database that must exist already (to list or
    /// revoke keys): a mistyped `--data-dir` is refused rather than given
    /// a new, empty database.
    fn existing(&self) -> anyhow::Result<tally_store::Location<'_>> {
        if self.postgres_url().is_none() && !tally_store::database_path(&self.data_dir).exists() {
            bail!(
                "there is no Tally database in {:?} (--data-dir, TALLY_DATA_DIR); tally serve or tally migrate creates one",
                self.data_dir
            );
        }
        Ok(self.location())
    }
}

#[derive(clap::Args)]
struct ServeArgs {
    #[arg(long, env = "TALLY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// With --database-url: the URL the other servers reach this one at, to
    /// forward writes while it runs the writer (default: http://<listen address>).
    #[arg(long, env = "TALLY_ADVERTISE_URL")]
    advertise_url: Option<String>,
    #[command(flatten)]
    storage: StorageArgs,
    /// The engine's clock moves only through POST /v1/clock/advance (tests, staging).
    #[arg(long)]
    manual_clock: bool,
    /// Usage events older than this many seconds are refused (`event_too_old`).
    #[arg(long, env = "TALLY_EVENT_WINDOW_SECONDS", default_value_t = 30 * 24 * 3600)]
    event_window_seconds: i64,
    /// Writes accepted over HTTP and not yet answered, at most; beyond it
    /// requests get 503 `overloaded` with Retry-After.
    #[arg(long, env = "TALLY_MAX_IN_FLIGHT", default_value_t = tally_server::MAX_IN_FLIGHT)]
    max_in_flight: usize,
    /// Accept Google Pub/Sub push at POST /v1/ingest/pubsub?token=<this>.
    #[arg(long, env = "TALLY_PUBSUB_TOKEN", hide_env_values = true)]
    pubsub_token: Option<String>,
    /// A request's line and headers must arrive within this many seconds of
    /// its connection falling idle (an idle keep-alive connection is closed
    /// then), and its body must not pause longer (408 `request_timeout`).
    #[arg(long, env = "TALLY_READ_TIMEOUT_SECONDS", default_value_t = tally_server::serve::READ_TIMEOUT.as_secs())]
    read_timeout_seconds: u64,
    #[command(flatten)]
    streams: tally_server::streams::StreamArgs,
}

#[derive(Subcommand)]
enum Commands {
    /// Run the HTTP API (and the stream consumers given).
    #[command(after_help = "Environment:\n  \
        TALLY_ADMIN_KEY     a key with the admin scope, not stored (every server of a \
        database needs the same one)\n  \
        TALLY_KAFKA_CONFIG  more librdkafka settings, key=value,... (TLS, SASL)\n  \
        RUST_LOG            the log's filter (default info)")]
    Serve(ServeArgs),
    /// Create or upgrade the database schema.
    Migrate {
        #[command(flatten)]
        storage: StorageArgs,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeyCommands,
    },
    /// Measure durable charges per second through the engine and the latency of one charge.
    Bench(bench::BenchArgs),
    /// List, replay or discard usage events that could not be charged (through a running server).
    DeadLetters(dead_letters::DeadLetterArgs),
}

#[derive(Subcommand)]
enum KeyCommands {
    /// Create a key and print it (shown only once).
    Create {
        /// admin, write, ingest or read.
        #[arg(long)]
        scope: String,
        /// The key's id; default: a random one.
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        storage: StorageArgs,
    },
    /// List the keys: id, scope, created, revoked (never the keys themselves).
    List {
        #[command(flatten)]
        storage: StorageArgs,
    },
    /// Revoke a key: it authenticates nothing from then on (servers that
    /// looked it up in the last 10 s may take it until then).
    Revoke {
        /// The key's id.
        id: String,
        #[command(flatten)]
        storage: StorageArgs,
    },
}

/// Print a line of a listing. A reader that went away (`tally ... | head`)
/// ends the command quietly, as it does any Unix tool (`println!` panics).
pub(crate) fn print_line(text: impl std::fmt::Display) {
    if !written(text) {
        std::process::exit(0);
    }
}

/// Print a line of a command that changes things (`replay`), whether or not
/// anyone reads it: the command goes on, and its summary and exit status
/// still tell how it went.
pub(crate) fn print_report(text: impl std::fmt::Display) {
    written(text);
}

/// Write a line to stdout; false when the reader went away.
fn written(text: impl std::fmt::Display) -> bool {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{text}") {
        Ok(()) => true,
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => false,
        // Another failure (a full disk): the line is lost, as a log line
        // would be; the command goes on.
        Err(_) => true,
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tally=info,async_nats=warn".into()),
        )
        .with_writer(std::io::stderr)
        // A log line that cannot be written (a full disk, a reader gone) is
        // dropped: by default the library reports it with `eprintln!`,
        // which panics, and took down whichever thread was logging (the
        // writer's, logging its failed writes on a full disk).
        .log_internal_errors(false)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the runtime")?;
    match cli.command {
        Commands::Serve(args) => runtime.block_on(serve(args)),
        Commands::DeadLetters(args) => runtime.block_on(dead_letters::run(args)),
        Commands::Migrate { storage } => {
            let applied = tally_store::migrate(storage.location()).context("migrate")?;
            println!(
                "migrated {}: {applied} migration(s) applied, schema version {}",
                storage.location(),
                tally_store::schema::latest_version()
            );
            Ok(())
        }
        Commands::Keys {
            command: KeyCommands::Create { scope, id, storage },
        } => {
            let Some(scope) = tally_server::auth::Scope::parse(&scope) else {
                bail!("--scope must be one of admin, write, ingest, read");
            };
            let key = tally_server::auth::generate_key();
            let id =
                id.unwrap_or_else(|| format!("key_{}", &tally_server::auth::hash_key(&key)[..12]));
            if tally_core::Id::parse(&id).is_err() {
                bail!("--id must be 1 to 128 characters of A-Z, a-z, 0-9, '_', '.', ':' or '-'");
            }
            if id == tally_server::auth::BOOTSTRAP_ADMIN {
                bail!("--id {id} names TALLY_ADMIN_KEY in the audit trail; choose another id");
            }
            if tally_store::list_api_keys(storage.location())
                .context("read the keys")?
                .iter()
                .any(|key| key.id == id)
            {
                bail!("a key with id {id} exists; choose another id (tally keys list shows them)");
            }
            let now = SystemClock.now();
            tally_store::insert_api_key(
                storage.location(),
                &id,
                &tally_server::auth::hash_key(&key),
                scope.as_str(),
                now,
            )
            .context("store the key")?;
            println!("{key}");
            eprintln!(
                "created key {id} with scope {} in {}; it is shown only once",
                scope.as_str(),
                storage.location()
            );
            Ok(())
        }
        Commands::Keys {
            command: KeyCommands::List { storage },
        } => {
            let keys = tally_store::list_api_keys(storage.existing()?).context("list the keys")?;
            print_line("id\tscope\tcreated_at\trevoked_at");
            for key in keys {
                print_line(format_args!(
                    "{}\t{}\t{}\t{}",
                    key.id,
                    key.scope,
                    key.created_at.rfc3339(),
                    key.revoked_at.map_or("-".to_owned(), |t| t.rfc3339())
                ));
            }
            Ok(())
        }
        Commands::Keys {
            command: KeyCommands::Revoke { id, storage },
        } => {
            let now = SystemClock.now();
            match tally_store::revoke_api_key(storage.existing()?, &id, now)
                .context("revoke the key")?
            {
                Some(key) => {
                    eprintln!(
                        "key {} ({}) is revoked since {}",
                        key.id,
                        key.scope,
                        key.revoked_at.map_or("now".to_owned(), |t| t.rfc3339())
                    );
                    Ok(())
                }
                None => bail!("there is no key {id}"),
            }
        }
        Commands::Bench(args) => runtime.block_on(bench::run(args)),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let ServeArgs {
        listen,
        advertise_url,
        storage,
        manual_clock,
        event_window_seconds,
        pubsub_token,
        max_in_flight,
        read_timeout_seconds,
        streams,
    } = args;
    // Empty counts as none, as for TALLY_DATABASE_URL.
    let advertise_url = advertise_url.filter(|url| !url.trim().is_empty());
    let streams = tally_server::streams::check(streams)?;
    anyhow::ensure!(
        event_window_seconds > 0,
        "--event-window-seconds must be greater than zero"
    );
    anyhow::ensure!(
        (1..=3600).contains(&read_timeout_seconds),
        "--read-timeout-seconds must be from 1 to 3600 (got {read_timeout_seconds})"
    );
    if let Some(url) = &advertise_url {
        // Followers forward writes there: a URL they cannot use would turn
        // every forwarded write into a 503 long after the start.
        let usable = reqwest::Url::parse(url).is_ok_and(|u| {
            matches!(u.scheme(), "http" | "https")
                && u.host().is_some()
                && u.path() == "/"
                && u.query().is_none()
                && u.fragment().is_none()
                && u.username().is_empty()
                && u.password().is_none()
        });
        anyhow::ensure!(
            usable,
            "--advertise-url must be an http:// or https:// URL with a host and no path, such as http://10.0.0.5:8080 (got {url:?})"
        );
    }
    // A fleet whose database URL went missing (an empty TALLY_DATABASE_URL
    // counts as none) would run one embedded ledger per server, silently.
    anyhow::ensure!(
        advertise_url.is_none() || storage.postgres_url().is_some(),
        "--advertise-url is for servers sharing a PostgreSQL database, and no --database-url \
         (TALLY_DATABASE_URL) is set: this server would keep its own ledger in {:?}",
        storage.data_dir
    );
    // Forwarded paths are appended to it.
    let advertise_url = advertise_url.map(|url| url.trim_end_matches('/').to_owned());
    // The address first: a port in use is refused before the data
    // directory is created or any database is opened and migrated.
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("listen on {listen}"))?;
    let manual = if manual_clock && storage.postgres_url().is_some() {
        // The database records the clock (`engine_clock`) and every server
        // over it resumes from there: a file in the data directory, which
        // another database's servers may share, would carry its instant to
        // them.
        Some(Arc::new(ManualClock::new(SystemClock.now())))
    } else if manual_clock {
        std::fs::create_dir_all(&storage.data_dir)
            .with_context(|| format!("create the data directory {:?}", storage.data_dir))?;
        let file = storage.data_dir.join("manual-clock");
        let clock = ManualClock::persistent(file.clone(), SystemClock.now())
            .with_context(|| format!("read the manual clock {file:?}"))?;
        Some(Arc::new(clock))
    } else {
        None
    };
    let clock: Arc<dyn Clock> = match &manual {
        Some(manual) => manual.clone(),
        None => Arc::new(SystemClock),
    };
    let options = tally_store::Options {
        event_window_seconds,
        ..tally_store::Options::default()
    };
    let store = match storage.postgres_url() {
        Some(url) => Store::open_postgres(url, clock, options)
            .context("open the PostgreSQL database (--database-url)")?,
        None => Store::open_with(&storage.data_dir, clock, options)
            .with_context(|| format!("open the data directory {:?}", storage.data_dir))?,
    };
    let admin_key = std::env::var("TALLY_ADMIN_KEY").ok();
    anyhow::ensure!(
        (1..=1 << 24).contains(&max_in_flight),
        "--max-in-flight must be between 1 and 16777216"
    );
    let mut state = AppState::new(store, admin_key.as_deref(), manual);
    let settings = state.configure();
    settings.pubsub_token = pubsub_token.filter(|t| !t.is_empty());
    settings.in_flight = Arc::new(tokio::sync::Semaphore::new(max_in_flight));
    settings.max_in_flight = max_in_flight;
    tally_server::spawn_ticker(state.clone());
    tally_server::webhooks::spawn_deliveries(state.clone());
    // The consumers' tasks, awaited after a graceful shutdown so that each
    // commits or acks what it charged before the process exits. Several
    // servers over one database: only the server that runs the writer
    // consumes the streams, while it runs it.
    let consumer_tasks = if state.store.is_shared() {
        vec![tokio::spawn(tally_server::streams::while_leading(
            state.clone(),
            streams,
        ))]
    } else {
        tally_server::streams::start(state.clone(), &streams, &state.shutdown.subscribe())?
    };
    let address = listener.local_addr()?;
    anyhow::ensure!(
        advertise_url.is_some() || !state.store.is_shared() || !address.ip().is_unspecified(),
        "--listen {address} with --database-url needs --advertise-url: the URL the other servers reach this one at"
    );
    state
        .store
        .advertise(advertise_url.unwrap_or_else(|| format!("http://{address}")));
    print_report(format_args!("tally listening on http://{address}"));
    tracing::info!(%address, store = %storage.location(), manual_clock, "serving");
    let shutdown = state.shutdown.clone();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listen for SIGTERM")?;
    tally_server::serve::serve(
        listener,
        tally_server::router(state),
        std::time::Duration::from_secs(read_timeout_seconds),
        async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            tracing::info!("shutting down: finishing requests in progress");
            shutdown.send_replace(true);
            // A request that never finishes must not keep the process up:
            // give up after 30 s, or at once on a second signal.
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => {
                        tracing::error!("requests still running 30 s after the shutdown signal; exiting");
                    }
                    _ = tokio::signal::ctrl_c() => {
                        tracing::error!("second signal: exiting without waiting");
                    }
                    _ = terminate.recv() => {
                        tracing::error!("second signal: exiting without waiting");
                    }
                }
                std::process::exit(1);
            });
        },
    )
    .await;
    // The stream consumers stop on the same signal: wait for their last
    // commits and acks (bounded by the exit timer above).
    tally_server::streams::wait_stopped(consumer_tasks).await;
    Ok(())
}
