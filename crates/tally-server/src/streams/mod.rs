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

/// Start the consumers the flags ask for.
pub fn start(state: AppState, args: StreamArgs) -> anyhow::Result<()> {
    if args.kafka_brokers.is_some() || args.kafka_topic.is_some() {
        kafka::start(state.clone(), &args)?;
    }
    if args.nats_url.is_some() || args.nats_stream.is_some() {
        nats::start(state, &args)?;
    }
    Ok(())
}
