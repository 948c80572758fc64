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

/// Start the consumers the flags ask for. Each returns a task that ends
/// once the consumer has stopped after a graceful shutdown
/// ([`AppState::shutdown`]): wait for them before the process exits.
pub fn start(
    state: AppState,
    args: StreamArgs,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    if args.kafka_brokers.is_some() || args.kafka_topic.is_some() {
        tasks.push(kafka::start(state.clone(), &args)?);
    }
    if args.nats_url.is_some() || args.nats_stream.is_some() {
        tasks.push(nats::start(state, &args)?);
    }
    Ok(tasks)
}

/// Resolves once a graceful shutdown has begun.
pub(crate) async fn stopped(stopping: &mut tokio::sync::watch::Receiver<bool>) {
    // (The guard `wait_for` returns is dropped here, not held across awaits.)
    let _ = stopping.wait_for(|stopping| *stopping).await;
}
