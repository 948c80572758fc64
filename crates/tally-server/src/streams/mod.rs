//! Stream consumers: usage events from Kafka and NATS JetStream, each message
//! one event in the shape of an element of `POST /v1/events`, acknowledged
//! only after the event is durably charged or kept as a dead letter.

use crate::AppState;

pub mod kafka;
pub mod nats;

/// The stream flags of `tally serve` (API.md).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct StreamArgs {
    /// Kafka bootstrap brokers (`host:port[,host:port]`): consume usage events.
    #[arg(long, env = "TALLY_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// The Kafka topic of usage events.
    #[arg(long, env = "TALLY_KAFKA_TOPIC")]
    pub kafka_topic: Option<String>,
    /// The Kafka consumer group.
    #[arg(long, env = "TALLY_KAFKA_GROUP", default_value = "tally")]
    pub kafka_group: String,
    /// NATS server URL (`nats://host:port`): consume usage events from JetStream.
    #[arg(long, env = "TALLY_NATS_URL")]
    pub nats_url: Option<String>,
    /// The JetStream stream of usage events.
    #[arg(long, env = "TALLY_NATS_STREAM")]
    pub nats_stream: Option<String>,
    /// The subject filter (default: every subject of the stream).
    #[arg(long, env = "TALLY_NATS_SUBJECT")]
    pub nats_subject: Option<String>,
}

/// Start the consumers the flags ask for, to run until `stop` turns true
/// (a graceful shutdown, [`AppState::shutdown`]; or, on PostgreSQL, this
/// server no longer running the writer: [`while_leading`]). Each returns a
/// task that ends once its consumer has stopped, having committed or acked
/// what it charged: wait for them.
pub fn start(
    state: AppState,
    args: &StreamArgs,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    if args.kafka_brokers.is_some() || args.kafka_topic.is_some() {
        tasks.push(kafka::start(state.clone(), args, stop.clone())?);
    }
    if args.nats_url.is_some() || args.nats_stream.is_some() {
        tasks.push(nats::start(state, args, stop.clone())?);
    }
    Ok(tasks)
}

/// The stream flags with empty values taken as left out (an empty
/// `TALLY_NATS_URL`, as an empty `TALLY_DATABASE_URL`, means none), checked
/// as the consumers will read them: a mistake is refused when the server
/// starts, not when it first runs the writer (on PostgreSQL, perhaps at a
/// takeover long after).
pub fn check(mut args: StreamArgs) -> anyhow::Result<StreamArgs> {
    for value in [
        &mut args.kafka_brokers,
        &mut args.kafka_topic,
        &mut args.nats_url,
        &mut args.nats_stream,
        &mut args.nats_subject,
    ] {
        if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
            *value = None;
        }
    }
    if args.kafka_brokers.is_some() || args.kafka_topic.is_some() {
        kafka::configure(&args)?;
    }
    if args.nats_url.is_some() || args.nats_stream.is_some() {
        nats::settings(&args)?;
    } else if args.nats_subject.is_some() {
        anyhow::bail!("--nats-subject needs --nats-url and --nats-stream");
    }
    Ok(args)
}

/// How long [`wait_stopped`] waits for the consumers to stop (each waits up
/// to 10 s for what it is charging, then commits or confirms its acks).
const STOP_WITHIN: std::time::Duration = std::time::Duration::from_secs(15);

/// Wait, for at most [`STOP_WITHIN`] in all, until the consumers' tasks
/// (told to stop) have ended; one still running then is left to finish on
/// its own, and what it did not commit or ack is delivered again.
pub async fn wait_stopped(tasks: Vec<tokio::task::JoinHandle<()>>) {
    let deadline = tokio::time::Instant::now() + STOP_WITHIN;
    for task in tasks {
        if tokio::time::timeout_at(deadline, task).await.is_err() {
            tracing::warn!(
                "a stream consumer did not stop within {STOP_WITHIN:?}; what it did not commit or ack will be delivered again"
            );
            return;
        }
    }
}

/// Several servers over one PostgreSQL database: run the consumers only
/// while this server runs the writer. They start once it leads, stop (as on
/// a graceful shutdown) when it stops leading (its database connection was
/// lost, or another server took over), and start again when it leads again.
/// A loss ridden out before this task looks may go unseen: the consumers
/// then run on, and what they charged meanwhile was refused and is retried.
/// Returns after a graceful shutdown, once the consumers have stopped (or
/// after [`STOP_WITHIN`]).
///
/// A consumer that cannot start (bad flags) stops the process: this is
/// found only once the server first leads.
pub async fn while_leading(state: AppState, args: StreamArgs) {
    let mut shutdown = state.shutdown.subscribe();
    loop {
        tokio::select! {
            biased;
            _ = stopped(&mut shutdown) => return,
            _ = state.store.wait_until_leader() => {}
        }
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let tasks = match start(state.clone(), &args, &stopping) {
            Ok(tasks) => tasks,
            Err(error) => {
                tracing::error!(%error, "cannot start the stream consumers");
                std::process::exit(2);
            }
        };
        let shutting_down = tokio::select! {
            biased;
            _ = stopped(&mut shutdown) => true,
            _ = state.store.wait_until_follower() => false,
        };
        if !shutting_down && !tasks.is_empty() {
            tracing::warn!(
                "this server no longer runs the writer: its stream consumers stop until it leads again"
            );
        }
        stop.send_replace(true);
        wait_stopped(tasks).await;
        if shutting_down {
            return;
        }
    }
}

/// `stream_consumers{source}` is 1 while this lives: from a consumer's start
/// until it has stopped (acked or committed what it charged, and left its
/// group).
pub(crate) struct Running(prometheus_client::metrics::gauge::Gauge);

impl Running {
    pub(crate) fn new(state: &AppState, source: &'static str) -> Running {
        let gauge = state
            .metrics
            .stream_consumers
            .get_or_create(&crate::metrics::SourceLabels { source })
            .clone();
        gauge.set(1);
        Running(gauge)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.set(0);
    }
}

/// Resolves once `stopping` turns true (or its sender is gone): a graceful
/// shutdown has begun, or the consumers are to stop.
pub(crate) async fn stopped(stopping: &mut tokio::sync::watch::Receiver<bool>) {
    // (The guard `wait_for` returns is dropped here, not held across awaits.)
    let _ = stopping.wait_for(|stopping| *stopping).await;
}
