//! The NATS JetStream consumer: usage events from one stream, through a
//! durable pull consumer.
//!
//! Each message is one event (JSON, the shape of an element of
//! `POST /v1/events`), charged through [`ingest`] exactly once per event id.
//!
//! - The consumer is durable ([`DURABLE`]), with explicit acks: a message is
//!   acked only once its outcome is durable (charged, a duplicate, or kept as
//!   a dead letter). A crash, a lost ack or a reconnect can deliver a message
//!   again, never lose one; a message delivered again charges nothing.
//! - Tally creates the durable consumer when it is not there. An existing one
//!   is used as it is (an operator may tune its ack wait or max ack pending),
//!   provided it is a pull consumer with explicit acks; its subject filter
//!   follows `--nats-subject`.
//! - Up to [`MAX_IN_FLIGHT`] messages are charged at once, so the store's
//!   group commit shares one fsync among many of them. The server never has
//!   more than [`MAX_ACK_PENDING`] messages delivered and unacked: that is the
//!   backpressure, with [`ACK_WAIT`] before a message is delivered again.
//! - A message that is not an event (no payload, not JSON, missing fields,
//!   unknown customer or feature...) is a dead letter with its reason, and is
//!   acked like any other: it never blocks the stream.
//! - When the store is unavailable, the message is not acked: it is nak'ed
//!   with a delay that grows with its delivery count, and the server
//!   delivers it again later.
//! - The stream must exist (whoever produces creates it). Until it does, and
//!   whenever the server cannot be reached or the consumer cannot be set up,
//!   the consumer logs and retries with backoff; the HTTP server keeps
//!   serving. The client reconnects by itself after a connection loss, and
//!   the pull is set up again.
//! - Consumer lag (`consumer_lag{source="nats"}`) is the consumer's
//!   `num_pending` (not yet delivered) plus `num_ack_pending` (delivered, not
//!   yet acked), read every [`LAG_EVERY`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, FromConsumer, PullConsumer};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, AckKind};
use async_nats::ServerAddr;
use futures_util::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::StreamArgs;
use crate::ingest;
use crate::metrics::SourceLabels;
use crate::AppState;

const SOURCE: &str = "nats";
/// The durable consumer's name on the stream.
pub const DURABLE: &str = "tally";
/// Messages being charged at once.
const MAX_IN_FLIGHT: usize = 1024;
/// Messages delivered and not yet acked, at most (the server holds the rest).
const MAX_ACK_PENDING: i64 = 10_000;
/// How long the server waits for an ack before it delivers a message again.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// Messages asked for per pull request.
const PULL_BATCH: usize = 512;
/// How long one pull request waits for messages, and the server's idle
/// heartbeat meanwhile (a missed heartbeat sets the pull up again).
const PULL_EXPIRES: Duration = Duration::from_secs(30);
const PULL_HEARTBEAT: Duration = Duration::from_secs(5);
/// How long a graceful shutdown waits for the messages being charged.
const STOP_WAIT: Duration = Duration::from_secs(10);
/// How long a graceful shutdown waits for the last acks to reach the server.
const FLUSH_WAIT: Duration = Duration::from_secs(2);
/// How often the consumer lag is read.
const LAG_EVERY: Duration = Duration::from_secs(1);
/// Backoff while the server, the stream or the consumer is not there.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Redelivery delay of a message the store could not take (doubling with
/// each delivery), and how long its slot stays taken meanwhile.
const NAK_FIRST: Duration = Duration::from_secs(1);
const NAK_MAX: Duration = Duration::from_secs(30);
const UNAVAILABLE_PAUSE: Duration = Duration::from_millis(200);

/// What the flags ask for, checked.
#[derive(Clone, Debug)]
pub(super) struct Settings {
    servers: Vec<ServerAddr>,
    /// `host:port` of each server, for logs (never credentials).
    display: String,
    stream: String,
    subject: Option<String>,
}

/// Check `--nats-url`, `--nats-stream` and `--nats-subject`, and start
/// consuming on the current tokio runtime. Fails at once on bad flags; a
/// server or a stream that is not there yet is retried in the background.
/// The task returned ends after a graceful stop (see [`run`]).
pub fn start(
    state: AppState,
    args: &StreamArgs,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let settings = settings(args)?;
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| anyhow::anyhow!("the NATS consumer needs a tokio runtime"))?;
    tracing::info!(
        servers = %settings.display,
        stream = %settings.stream,
        subject = settings.subject.as_deref().unwrap_or("(every subject)"),
        durable = DURABLE,
        "consuming usage events from NATS JetStream"
    );
    Ok(runtime.spawn(run(state, settings, stopping)))
}

pub(super) fn settings(args: &StreamArgs) -> anyhow::Result<Settings> {
    let url = match args.nats_url.as_deref().map(str::trim) {
        Some(url) if !url.is_empty() => url,
        _ => anyhow::bail!("--nats-stream needs --nats-url (nats://host:port[,nats://host:port])"),
    };
    let stream = match args.nats_stream.as_deref().map(str::trim) {
        Some(stream) if !stream.is_empty() => stream.to_owned(),
        _ => anyhow::bail!("--nats-url needs --nats-stream (the JetStream stream of usage events)"),
    };
    anyhow::ensure!(
        !stream
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\')),
        "--nats-stream {stream:?} is not a valid stream name (no spaces, '.', '*', '>', '/' or '\\')"
    );
    let subject = match args.nats_subject.as_deref().map(str::trim) {
        None => None,
        Some("") => {
            anyhow::bail!("--nats-subject must not be empty (leave it out for every subject)")
        }
        Some(subject) => {
            let bad_token = subject.split('.').any(|token| {
                token.is_empty()
                    || (token.len() > 1 && (token.contains('*') || token.contains('>')))
            });
            let bad_tail = subject.split('.').rev().skip(1).any(|token| token == ">");
            anyhow::ensure!(
                !bad_token
                    && !bad_tail
                    && !subject.chars().any(|c| c.is_whitespace() || c.is_control()),
                "--nats-subject {subject:?} is not a valid subject filter"
            );
            Some(subject.to_owned())
        }
    };
    let mut servers = Vec::new();
    for part in url.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let server: ServerAddr = part
            .parse()
            .map_err(|e| anyhow::anyhow!("--nats-url {part:?} is not a NATS server URL: {e}"))?;
        servers.push(server);
    }
    anyhow::ensure!(!servers.is_empty(), "--nats-url names no server");
    let display = servers
        .iter()
        .map(|s| format!("{}://{}:{}", s.scheme(), s.host(), s.port()))
        .collect::<Vec<_>>()
        .join(",");
    Ok(Settings {
        servers,
        display,
        stream,
        subject,
    })
}

/// Log a repeated failure only on its first tries, then ever more rarely.
fn worth_logging(attempt: u64) -> bool {
    attempt <= 3 || attempt.is_power_of_two()
}

/// Connect (retrying until it works), then consume until `stopping` turns
/// true (a graceful shutdown, or this server no longer running the writer
/// of a shared PostgreSQL database): set the pull consumer up, take
/// messages, and set it up again after any failure. On a graceful stop it
/// takes no more messages, lets the ones being charged finish and ack (up to
/// [`STOP_WAIT`]), and flushes the acks to the server; messages pulled but
/// not started are not acked, so the server delivers them again after the
/// ack wait.
async fn run(
    state: AppState,
    settings: Settings,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let _running = super::Running::new(&state, SOURCE);
    let client = tokio::select! {
        client = connect(&state, &settings) => client,
        _ = super::stopped(&mut stopping) => return,
    };
    let context = jetstream::new(client.clone());
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut backoff = RETRY_FIRST;
    let mut failures = 0u64;
    loop {
        let error = tokio::select! {
            error = consume(&state, &context, &settings, &slots, &mut failures) => error,
            _ = super::stopped(&mut stopping) => return finish(&slots, &client, &settings).await,
        };
        failures += 1;
        state.metrics.stream_error(SOURCE);
        if failures == 1 {
            backoff = RETRY_FIRST;
        }
        if worth_logging(failures) {
            tracing::warn!(
                stream = %settings.stream,
                attempt = failures,
                retry_in_ms = backoff.as_millis() as u64,
                "NATS consumer not consuming: {error}"
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            // Messages of the failed pull may still be being charged.
            _ = super::stopped(&mut stopping) => return finish(&slots, &client, &settings).await,
        }
        backoff = (backoff * 2).min(RETRY_MAX);
    }
}

/// A graceful stop: wait (up to [`STOP_WAIT`]) until every message taken is
/// charged and acked, then make sure the server has read the acks (up to
/// [`FLUSH_WAIT`]: a server that is gone cannot take them anyway).
///
/// Flushing only hands the acks to the client's socket. Closing the
/// connection right after, with messages the server pushed meanwhile still
/// unread, resets it, and what had not left the client (or not yet been
/// read by the server) is lost: acks of messages already charged, which
/// then come again as duplicates. So a request follows the flush (the
/// consumer's info, which the consumer may already ask for; only that an
/// answer comes matters): the server reads a connection in order, so its
/// answer means it has read every ack sent before.
async fn finish(slots: &Semaphore, client: &async_nats::Client, settings: &Settings) {
    let all = MAX_IN_FLIGHT as u32;
    if tokio::time::timeout(STOP_WAIT, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            wait_s = STOP_WAIT.as_secs(),
            "NATS messages still being charged at shutdown; they will be delivered again"
        );
    }
    let confirmed = tokio::time::timeout(FLUSH_WAIT, async {
        client.flush().await.map_err(|error| error.to_string())?;
        let info = format!("$JS.API.CONSUMER.INFO.{}.{DURABLE}", settings.stream);
        match client.request(info, Default::default()).await {
            Ok(_) => Ok(()),
            Err(error) if error.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
            Err(error) => Err(error.to_string()),
        }
    })
    .await;
    match confirmed {
        Ok(Ok(())) => tracing::info!("NATS consumer stopped"),
        Ok(Err(error)) => tracing::warn!(
            %error,
            "cannot confirm the server took the last NATS acks; those messages may be delivered again"
        ),
        Err(_) => tracing::warn!(
            "the server did not confirm the last NATS acks within {FLUSH_WAIT:?}; those messages may be delivered again"
        ),
    }
}

/// Connect to the servers, retrying with backoff until one answers. The
/// client then reconnects by itself after a connection loss.
async fn connect(state: &AppState, settings: &Settings) -> async_nats::Client {
    let mut backoff = RETRY_FIRST;
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        let options = async_nats::ConnectOptions::new()
            .name("tally")
            .max_reconnects(None)
            .event_callback(|event| async move {
                // One warning per outage, not one per reconnect attempt.
                static QUIET: AtomicBool = AtomicBool::new(false);
                match event {
                    async_nats::Event::Connected => {
                        QUIET.store(false, Ordering::Relaxed);
                        tracing::info!("NATS connection (re)established")
                    }
                    async_nats::Event::Disconnected => {
                        QUIET.store(true, Ordering::Relaxed);
                        tracing::warn!("NATS connection lost; reconnecting")
                    }
                    async_nats::Event::ClientError(error) if QUIET.load(Ordering::Relaxed) => {
                        tracing::debug!(%error, "NATS reconnect attempt failed")
                    }
                    other => tracing::warn!(event = %other, "NATS client event"),
                }
            });
        match options.connect(settings.servers.as_slice()).await {
            Ok(client) => {
                tracing::info!(servers = %settings.display, "connected to NATS");
                return client;
            }
            Err(error) => {
                // A consumer that cannot reach its broker shows in the
                // metrics from its first attempt, not only once it had
                // connected.
                state.metrics.stream_error(SOURCE);
                if worth_logging(attempt) {
                    tracing::warn!(
                        servers = %settings.display,
                        attempt,
                        retry_in_ms = backoff.as_millis() as u64,
                        %error,
                        "cannot connect to NATS; retrying"
                    );
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
    }
}

/// The durable pull consumer's configuration.
fn consumer_config(settings: &Settings) -> pull::Config {
    pull::Config {
        durable_name: Some(DURABLE.to_owned()),
        description: Some("tally: usage events to charge".to_owned()),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        max_ack_pending: MAX_ACK_PENDING,
        // Redeliver for as long as it takes: a message is acked once durable,
        // and a poison one becomes a dead letter (and is acked).
        max_deliver: -1,
        filter_subject: settings.subject.clone().unwrap_or_default(),
        ..Default::default()
    }
}

/// The durable consumer: created with [`consumer_config`] when it is not
/// there; when it is, it is used as it is (an operator may have tuned its
/// ack wait, max ack pending, backoff...), except that it must be a pull
/// consumer with explicit acks, and its filter is set to `--nats-subject`.
async fn open_consumer(
    context: &jetstream::Context,
    stream: &jetstream::stream::Stream,
    settings: &Settings,
) -> Result<PullConsumer, String> {
    let name = &settings.stream;
    let info = match stream.consumer_info(DURABLE).await {
        Ok(info) => info,
        Err(error) if error.kind() == ConsumerInfoErrorKind::NotFound => {
            let consumer = stream
                .create_consumer(consumer_config(settings))
                .await
                .map_err(|error| {
                    format!(
                        "cannot create durable consumer {DURABLE:?} on stream {name:?}: {error}"
                    )
                })?;
            tracing::info!(stream = %name, durable = DURABLE, "created the durable NATS consumer");
            return Ok(consumer);
        }
        Err(error) => {
            return Err(format!(
                "cannot read durable consumer {DURABLE:?} on stream {name:?}: {error}"
            ))
        }
    };
    let existing = &info.config;
    if existing.deliver_subject.is_some() {
        return Err(format!(
            "consumer {DURABLE:?} on stream {name:?} is a push consumer; tally needs a pull \
             consumer of that name (delete it to let tally create it)"
        ));
    }
    if existing.ack_policy != AckPolicy::Explicit {
        return Err(format!(
            "consumer {DURABLE:?} on stream {name:?} has ack policy {:?}; tally acks each \
             message once it is durable and needs explicit acks (delete it to let tally create it)",
            existing.ack_policy
        ));
    }
    if existing.max_deliver > 0 {
        tracing::warn!(
            stream = %name,
            durable = DURABLE,
            max_deliver = existing.max_deliver,
            "the NATS consumer limits deliveries: a message the store could not take that many \
             times is dropped by the server, not charged (tally creates its consumer unlimited)"
        );
    }
    let filter = settings.subject.clone().unwrap_or_default();
    if existing.filter_subject == filter && existing.filter_subjects.is_empty() {
        let config = pull::Config::try_from_consumer_config(info.config.clone())
            .map_err(|error| format!("consumer {DURABLE:?} on stream {name:?}: {error}"))?;
        return Ok(PullConsumer::new(config, info, context.clone()));
    }
    // The flag changed: move the consumer's filter, keeping the rest.
    let mut config = pull::Config::try_from_consumer_config(info.config.clone())
        .map_err(|error| format!("consumer {DURABLE:?} on stream {name:?}: {error}"))?;
    tracing::info!(
        stream = %name,
        durable = DURABLE,
        from = %existing.filter_subject,
        to = %filter,
        "changing the NATS consumer's subject filter"
    );
    config.filter_subject = filter;
    config.filter_subjects = Vec::new();
    stream.create_consumer(config).await.map_err(|error| {
        format!(
            "cannot change the subject filter of consumer {DURABLE:?} on stream {name:?}: {error}"
        )
    })
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Set the consumer up and take messages until something fails; returns
/// what failed. `failures` is reset once messages can be pulled.
async fn consume(
    state: &AppState,
    context: &jetstream::Context,
    settings: &Settings,
    slots: &Arc<Semaphore>,
    failures: &mut u64,
) -> String {
    let stream = match context.get_stream(&settings.stream).await {
        Ok(stream) => stream,
        Err(error) => {
            return format!(
                "cannot get JetStream stream {:?} (it must exist; whoever produces creates it): {error}",
                settings.stream
            )
        }
    };
    let consumer = match open_consumer(context, &stream, settings).await {
        Ok(consumer) => consumer,
        Err(error) => return error,
    };
    let _lag = AbortOnDrop(tokio::spawn(lag_loop(state.clone(), consumer.clone())));
    // Within the consumer's own request limits, when it has some.
    let limits = &consumer.cached_info().config;
    let batch = match usize::try_from(limits.max_batch) {
        Ok(max) if max > 0 => PULL_BATCH.min(max),
        _ => PULL_BATCH,
    };
    let expires = match limits.max_expires {
        max if max.is_zero() => PULL_EXPIRES,
        max => PULL_EXPIRES.min(max),
    };
    let heartbeat = PULL_HEARTBEAT.min(expires / 2);
    let mut messages = match consumer
        .stream()
        .max_messages_per_batch(batch)
        .expires(expires)
        .heartbeat(heartbeat)
        .messages()
        .await
    {
        Ok(messages) => messages,
        Err(error) => return format!("cannot pull from consumer {DURABLE:?}: {error}"),
    };
    if *failures > 0 {
        tracing::info!(stream = %settings.stream, "NATS consumer consuming again");
    }
    *failures = 0;
    loop {
        // A slot first: while every slot is taken, no message is taken off
        // the pull, and the server stops delivering at MAX_ACK_PENDING.
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        match messages.next().await {
            Some(Ok(message)) => {
                // Into the writer's queue here, in the order the stream
                // delivers, and only then waited for on a task of its own.
                let sent = match message.payload.is_empty() {
                    true => None,
                    false => Some(ingest::send_bytes(state, &message.payload, SOURCE).await),
                };
                tokio::spawn(process(state.clone(), message, sent, slot));
            }
            Some(Err(error)) => return format!("pulling messages failed: {error}"),
            None => return "the pull ended".to_owned(),
        }
    }
}

/// Keep `consumer_lag{source="nats"}` up to date.
async fn lag_loop(state: AppState, consumer: PullConsumer) {
    let mut every = tokio::time::interval(LAG_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        match consumer.get_info().await {
            Ok(info) => {
                let lag = info
                    .num_pending
                    .saturating_add(info.num_ack_pending as u64)
                    .min(i64::MAX as u64) as i64;
                state
                    .metrics
                    .consumer_lag
                    .get_or_create(&SourceLabels { source: SOURCE })
                    .set(lag);
            }
            Err(error) => tracing::debug!(%error, "cannot read the NATS consumer's info"),
        }
    }
}

/// Messages the store could not take (for rate-limited logs).
static UNAVAILABLE: AtomicU64 = AtomicU64::new(0);

/// Charge one message (or keep it as a dead letter) and ack it once that is
/// durable; when the store is unavailable, nak it with a delay instead.
async fn process(
    state: AppState,
    message: jetstream::Message,
    sent: Option<ingest::Sent<'static>>,
    slot: OwnedSemaphorePermit,
) {
    let (sequence, delivered) = match message.info() {
        Ok(info) => (info.stream_sequence, info.delivered.max(1)),
        Err(_) => (0, 1),
    };
    let result = match sent {
        Some(sent) => sent.finish(&state).await,
        None => {
            let payload = format!(
                "nats message {}#{sequence} on {} without a payload",
                message.info().map(|i| i.stream).unwrap_or("?"),
                message.subject
            );
            ingest::ingest_invalid(&state, payload, SOURCE, "the message has no payload").await
        }
    };
    match result {
        Ok(result) => {
            let status = result.status();
            state.metrics.events(SOURCE, status);
            if let Err(error) = message.ack().await {
                // Durable already: a redelivery is a duplicate, charged nothing.
                tracing::debug!(sequence, %error, "NATS ack failed; the message will come again");
            }
        }
        Err(error) => {
            let shift = (delivered - 1).clamp(0, 5) as u32;
            let delay = (NAK_FIRST * 2u32.pow(shift)).min(NAK_MAX);
            let count = UNAVAILABLE.fetch_add(1, Ordering::Relaxed) + 1;
            if worth_logging(count) {
                tracing::warn!(
                    sequence,
                    delivered,
                    redeliver_in_ms = delay.as_millis() as u64,
                    code = %error.code,
                    message = %error.message,
                    unavailable_so_far = count,
                    "NATS message not charged (store unavailable); it will be delivered again"
                );
            }
            if let Err(error) = message.ack_with(AckKind::Nak(Some(delay))).await {
                tracing::debug!(sequence, %error, "NATS nak failed; the ack wait will redeliver it");
            }
            // Keep the slot a moment, so an outage does not spin through the stream.
            tokio::time::sleep(UNAVAILABLE_PAUSE).await;
        }
    }
    drop(slot);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: Option<&str>, stream: Option<&str>, subject: Option<&str>) -> StreamArgs {
        StreamArgs {
            nats_url: url.map(str::to_owned),
            nats_stream: stream.map(str::to_owned),
            nats_subject: subject.map(str::to_owned),
            ..Default::default()
        }
    }

    #[test]
    fn flags_are_checked() {
        let ok = settings(&args(Some("nats://127.0.0.1:4222"), Some("EVENTS"), None)).unwrap();
        assert_eq!(ok.display, "nats://127.0.0.1:4222");
        assert_eq!(ok.stream, "EVENTS");
        assert_eq!(ok.subject, None);
        let many = settings(&args(
            Some("nats://u:secret@a:1, b:2"),
            Some("S"),
            Some("usage.>"),
        ))
        .unwrap();
        assert_eq!(
            many.display, "nats://a:1,nats://b:2",
            "no credentials in logs"
        );
        assert_eq!(many.subject.as_deref(), Some("usage.>"));

        let error = |a: StreamArgs| settings(&a).unwrap_err().to_string();
        assert!(error(args(Some("nats://x:1"), None, None)).contains("--nats-stream"));
        assert!(error(args(None, Some("S"), None)).contains("--nats-url"));
        assert!(error(args(Some(" "), Some("S"), None)).contains("--nats-url"));
        assert!(error(args(Some("nats://x:1"), Some("a.b"), None)).contains("stream name"));
        assert!(error(args(Some("nats://x:1"), Some("S"), Some(""))).contains("--nats-subject"));
        for bad in ["a..b", "a.>.b", "a b", "a.b*", ".a"] {
            assert!(
                error(args(Some("nats://x:1"), Some("S"), Some(bad))).contains("--nats-subject"),
                "{bad}"
            );
        }
        assert!(error(args(Some("nats://[::1"), Some("S"), None)).contains("--nats-url"));
    }
}
