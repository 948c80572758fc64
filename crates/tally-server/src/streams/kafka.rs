//! The Kafka consumer: usage events from one topic, in a consumer group.
//!
//! Each message is one event (JSON, the shape of an element of
//! `POST /v1/events`), charged through [`ingest`] exactly once per event id.
//! Many messages are in flight at once (so the store's group commit shares
//! one fsync among them), but a partition's offset is committed only up to
//! the first message that is not yet durable: everything below a committed
//! offset has been charged or kept as a dead letter. A crash or a rebalance
//! can therefore deliver a message again, never lose one; a message delivered
//! again is a duplicate that charges nothing.
//!
//! - Offsets are committed every [`COMMIT_EVERY`], and synchronously for the
//!   partitions being revoked in a rebalance (before they go). A partition's
//!   messages still in flight when it is revoked complete, but no longer move
//!   its offset: whoever gets the partition reads them again.
//! - When the store is unavailable, the message is retried (with backoff) and
//!   its partition's offset stays below it. Retries hold their slots, so the
//!   consumer fills up and pauses its partitions; it keeps polling Kafka
//!   meanwhile, so it stays in the group and answers rebalances.
//! - A message that is not an event (no payload, not JSON, missing fields,
//!   unknown customer or feature...) is a dead letter with its reason, and its
//!   offset is committed like any other: it never blocks its partition.
//! - On a graceful shutdown (SIGTERM), or when a server sharing a PostgreSQL
//!   database stops running the writer, the consumer stops taking messages,
//!   lets the ones being charged finish (up to [`STOP_WAIT`]), commits their
//!   offsets synchronously and leaves the group, so a restart or another
//!   member reads nothing again that was already charged, and the
//!   partitions move at once instead of after the session timeout.
//! - Consumer lag (`consumer_lag{source="kafka"}`) is the sum over assigned
//!   partitions of the high watermark minus the committed offset, from
//!   librdkafka's statistics every second.
//!
//! `TALLY_KAFKA_CONFIG` (`key=value,key=value`) passes more librdkafka
//! settings (TLS, SASL, timeouts...); they override the defaults set here.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::{Notify, Semaphore};

use super::StreamArgs;
use crate::ingest;
use crate::metrics::SourceLabels;
use crate::AppState;

const SOURCE: &str = "kafka";
/// Messages being charged at once.
const MAX_IN_FLIGHT: usize = 4096;
/// Messages received and waiting for a slot before the partitions pause...
const PAUSE_AT: usize = 50_000;
/// ...and resume when that backlog is back to this.
const RESUME_AT: usize = 10_000;
/// How often done offsets are committed.
const COMMIT_EVERY: Duration = Duration::from_millis(100);
/// How long a graceful shutdown waits for the messages being charged.
const STOP_WAIT: Duration = Duration::from_secs(10);
/// How long the receiving loop waits for room in the writer's queue before
/// it polls Kafka again (and then tries again).
const SEND_WAIT: Duration = Duration::from_millis(50);
/// Retry backoff when the store is unavailable.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(5);

type Kafka = StreamConsumer<Context>;

/// Start consuming `--kafka-topic` from `--kafka-brokers` on the current
/// tokio runtime. Fails at once on bad flags or a bad configuration; a broker
/// that cannot be reached is retried in the background (and logged). The
/// task returned ends after a graceful stop (see the module's notes).
pub fn start(
    state: AppState,
    args: &StreamArgs,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let Configured {
        config,
        brokers,
        topic,
        group,
    } = configure(args)?;
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| anyhow::anyhow!("the Kafka consumer needs a tokio runtime"))?;

    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let context = Context {
        state: state.clone(),
        topic: topic.clone(),
        tracker: tracker.clone(),
        errors: Mutex::default(),
    };
    let consumer: Kafka = config
        .create_with_context(context)
        .map_err(|e| anyhow::anyhow!("the Kafka consumer configuration is not valid: {e}"))?;
    consumer
        .subscribe(&[&topic])
        .map_err(|e| anyhow::anyhow!("cannot subscribe to Kafka topic {topic:?}: {e}"))?;
    let consumer = Arc::new(consumer);
    tracing::info!(%brokers, %topic, %group, "consuming usage events from Kafka");
    runtime.spawn(commit_loop(
        consumer.clone(),
        tracker.clone(),
        stopping.clone(),
    ));
    Ok(runtime.spawn(consume(state, consumer, tracker, stopping)))
}

/// The consumer's settings from the flags and `TALLY_KAFKA_CONFIG`.
pub(super) struct Configured {
    config: ClientConfig,
    brokers: String,
    topic: String,
    group: String,
}

/// Check the Kafka flags and `TALLY_KAFKA_CONFIG`, and build the consumer's
/// settings (nothing is connected).
pub(super) fn configure(args: &StreamArgs) -> anyhow::Result<Configured> {
    let brokers = match args.kafka_brokers.as_deref().map(str::trim) {
        Some(brokers) if !brokers.is_empty() => brokers.to_owned(),
        _ => anyhow::bail!("--kafka-topic needs --kafka-brokers (host:port[,host:port])"),
    };
    let topic = match args.kafka_topic.as_deref().map(str::trim) {
        Some(topic) if !topic.is_empty() => topic.to_owned(),
        _ => anyhow::bail!("--kafka-brokers needs --kafka-topic (the topic of usage events)"),
    };
    let group = args.kafka_group.trim().to_owned();
    anyhow::ensure!(!group.is_empty(), "--kafka-group must not be empty");

    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &brokers)
        .set("group.id", &group)
        .set("client.id", "tally")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // A consumer that died (SIGKILL) leaves the group after this, so its
        // partitions move to the living within seconds rather than 45.
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        // Prefetch a bounded amount: the backlog above is bounded too.
        .set("queued.min.messages", "10000")
        // An idle partition's fetch returns within 100 ms (latency), not 500.
        .set("fetch.wait.max.ms", "100")
        // Bigger fetches per partition: measured 32k -> 43k events/s on tansu.
        .set("fetch.message.max.bytes", "8388608")
        .set("queued.max.messages.kbytes", "16384")
        .set("statistics.interval.ms", "1000");
    if let Ok(extra) = std::env::var("TALLY_KAFKA_CONFIG") {
        for pair in extra.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("TALLY_KAFKA_CONFIG: {pair:?} is not key=value"))?;
            let key = key.trim();
            // What exactly-once rests on, or what the flags already say.
            anyhow::ensure!(
                !OWN_KAFKA_SETTINGS.contains(&key),
                "TALLY_KAFKA_CONFIG cannot set {key}: Tally sets it itself ({})",
                match key {
                    "bootstrap.servers" | "metadata.broker.list" => "use --kafka-brokers",
                    "group.id" => "use --kafka-group",
                    "statistics.interval.ms" => {
                        "the consumer's lag and its no-partition alert are read from its statistics"
                    }
                    _ => "offsets are stored and committed only once their events are durable",
                }
            );
            config.set(key, value.trim());
        }
    }
    Ok(Configured {
        config,
        brokers,
        topic,
        group,
    })
}

/// What is known of one assigned partition.
struct Partition {
    /// Changes with every assignment, so that a message from an earlier
    /// assignment never moves this one's offset.
    epoch: u64,
    /// Offsets received and not yet committable, and whether each is done.
    pending: BTreeMap<i64, bool>,
    /// The offset to commit: every message below it is done.
    done_to: Option<i64>,
    /// The offset last committed (or being committed).
    committed: Option<i64>,
}

/// The partitions this consumer holds, and how far each is done.
#[derive(Default)]
struct Tracker {
    partitions: HashMap<i32, Partition>,
    /// Bumped on every assignment change.
    generation: u64,
    /// Since when this consumer has held no partition (as the statistics
    /// saw it; reset at each warning), `None` while it holds some.
    unassigned_since: Option<std::time::Instant>,
}

/// A consumer that holds no partition this long is counted in
/// `tally_stream_errors_total` and warned about, again every such period:
/// the one consumer of Tally's group should hold every partition, and one
/// without any consumes nothing while its lag reads 0 (a rebalance stuck
/// at the broker, a topic deleted and made again).
const UNASSIGNED_ALERT: std::time::Duration = std::time::Duration::from_secs(30);

static NEXT_EPOCH: AtomicU64 = AtomicU64::new(1);

impl Tracker {
    fn assign(&mut self, partitions: impl IntoIterator<Item = i32>) {
        for partition in partitions {
            self.partitions
                .entry(partition)
                .or_insert_with(|| Partition {
                    epoch: NEXT_EPOCH.fetch_add(1, Ordering::Relaxed),
                    pending: BTreeMap::new(),
                    done_to: None,
                    committed: None,
                });
        }
        self.generation += 1;
    }

    /// Whether this consumer has now held no partition for
    /// [`UNASSIGNED_ALERT`] (since it was last told so).
    fn unassigned_too_long(&mut self, now: std::time::Instant) -> bool {
        if !self.partitions.is_empty() {
            self.unassigned_since = None;
            return false;
        }
        let since = *self.unassigned_since.get_or_insert(now);
        if now.duration_since(since) < UNASSIGNED_ALERT {
            return false;
        }
        self.unassigned_since = Some(now);
        true
    }

    fn revoke(&mut self, partitions: impl IntoIterator<Item = i32>) {
        for partition in partitions {
            self.partitions.remove(&partition);
        }
        self.generation += 1;
    }

    /// A message was received: its epoch, or None when its partition is not
    /// (or no longer) assigned here; it is then charged but never committed.
    fn received(&mut self, partition: i32, offset: i64) -> Option<u64> {
        let state = self.partitions.get_mut(&partition)?;
        state.pending.insert(offset, false);
        Some(state.epoch)
    }

    /// A message is durable: move its partition's offset past every done one.
    fn done(&mut self, partition: i32, epoch: u64, offset: i64) {
        let Some(state) = self.partitions.get_mut(&partition) else {
            return;
        };
        if state.epoch != epoch {
            return;
        }
        if let Some(done) = state.pending.get_mut(&offset) {
            *done = true;
        }
        while let Some(entry) = state.pending.first_entry() {
            if !*entry.get() {
                break;
            }
            state.done_to = Some(entry.key() + 1);
            entry.remove();
        }
    }

    /// The offsets to commit now (done further than last committed), marked
    /// as committed; `only` limits it to some partitions.
    fn take_commit(&mut self, topic: &str, only: Option<&[i32]>) -> Option<TopicPartitionList> {
        let mut list = TopicPartitionList::new();
        for (&partition, state) in &mut self.partitions {
            if only.is_some_and(|only| !only.contains(&partition)) {
                continue;
            }
            let Some(done_to) = state.done_to else {
                continue;
            };
            if state.committed.is_some_and(|c| c >= done_to) {
                continue;
            }
            if list
                .add_partition_offset(topic, partition, Offset::Offset(done_to))
                .is_ok()
            {
                state.committed = Some(done_to);
            }
        }
        (list.count() > 0).then_some(list)
    }

    /// A commit failed: commit these partitions again next time.
    fn commit_failed(&mut self, partitions: impl IntoIterator<Item = i32>) {
        for partition in partitions {
            if let Some(state) = self.partitions.get_mut(&partition) {
                state.committed = None;
            }
        }
    }
}

/// Consumer settings `TALLY_KAFKA_CONFIG` may not change.
const OWN_KAFKA_SETTINGS: [&str; 6] = [
    "bootstrap.servers",
    "metadata.broker.list",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "statistics.interval.ms",
];

/// librdkafka's callbacks: rebalances, commit results, statistics.
struct Context {
    state: AppState,
    topic: String,
    tracker: Arc<Mutex<Tracker>>,
    /// The last client error logged, when, and how many like it since.
    errors: Mutex<ErrorLog>,
}

/// librdkafka reports an unreachable broker about every 100 ms: each kind
/// of error (its code; the texts carry changing counts and times) is logged
/// at once, then at most every [`ERROR_LOG_EVERY`] with how many of that
/// kind came in between (all of them count in `tally_stream_errors`).
#[derive(Default)]
struct ErrorLog {
    /// By kind: when it was last logged, and how many since.
    kinds: std::collections::HashMap<String, (std::time::Instant, u64)>,
}

const ERROR_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

impl ErrorLog {
    /// Whether to log an error of `kind` now, and how many of that kind
    /// went unlogged before it.
    fn note(&mut self, kind: String, now: std::time::Instant) -> Option<u64> {
        match self.kinds.get_mut(&kind) {
            Some((at, repeated)) if now.duration_since(*at) < ERROR_LOG_EVERY => {
                *repeated += 1;
                None
            }
            Some((at, repeated)) => {
                *at = now;
                Some(std::mem::take(repeated))
            }
            None => {
                self.kinds.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}

impl Context {
    fn tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn partitions_of(list: &TopicPartitionList, topic: &str) -> Vec<i32> {
    list.elements()
        .iter()
        .filter(|e| e.topic() == topic)
        .map(|e| e.partition())
        .collect()
}

impl ClientContext for Context {
    fn stats(&self, statistics: Statistics) {
        self.check_assignment(std::time::Instant::now());
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let assigned: Vec<i32> = self.tracker().partitions.keys().copied().collect();
        let mut lag = 0i64;
        for partition in assigned {
            let Some(p) = topic.partitions.get(&partition) else {
                continue;
            };
            let high = if p.hi_offset >= 0 {
                p.hi_offset
            } else {
                continue;
            };
            let base = if p.committed_offset >= 0 {
                p.committed_offset
            } else {
                p.lo_offset.max(0)
            };
            lag += (high - base).max(0);
        }
        self.state
            .metrics
            .consumer_lag
            .get_or_create(&SourceLabels { source: SOURCE })
            .set(lag);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.state.metrics.stream_error(SOURCE);
        let kind = format!("{:?}", error.rdkafka_error_code());
        let logged = self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .note(kind, std::time::Instant::now());
        if let Some(repeated) = logged {
            tracing::warn!(%error, reason, repeated_since_last_logged = repeated, "kafka client error");
        }
    }
}

impl Context {
    /// Count and warn about a consumer that has held no partition for
    /// [`UNASSIGNED_ALERT`] (see there).
    fn check_assignment(&self, now: std::time::Instant) {
        if !self.tracker().unassigned_too_long(now) {
            return;
        }
        self.state.metrics.stream_error(SOURCE);
        tracing::warn!(
            topic = %self.topic,
            seconds = UNASSIGNED_ALERT.as_secs(),
            "kafka consumer holds no partition of its topic: nothing is consumed (the group's \
             rebalance may be stuck at the broker, or the topic was made again); a restart of \
             this server joins the group afresh"
        );
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let partitions = partitions_of(list, &self.topic);
                // Commit what is done before the partitions go; messages still
                // in flight will be read again by their next owner.
                let commit = if consumer.assignment_lost() {
                    None
                } else {
                    self.tracker().take_commit(&self.topic, Some(&partitions))
                };
                if let Some(commit) = commit {
                    if let Err(error) = consumer.commit(&commit, CommitMode::Sync) {
                        tracing::warn!(%error, "commit before a rebalance failed; those messages will be read again");
                    }
                }
                self.tracker().revoke(partitions.iter().copied());
                tracing::info!(?partitions, "kafka partitions revoked");
            }
            Rebalance::Assign(list) => {
                let partitions = partitions_of(list, &self.topic);
                self.tracker().assign(partitions.iter().copied());
                tracing::info!(?partitions, "kafka partitions assigned");
            }
            Rebalance::Error(error) => tracing::warn!(%error, "kafka rebalance failed"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(error) = result {
            tracing::warn!(%error, "kafka offset commit failed; retrying");
            self.tracker()
                .commit_failed(partitions_of(offsets, &self.topic));
        }
    }
}

fn lock(tracker: &Mutex<Tracker>) -> std::sync::MutexGuard<'_, Tracker> {
    tracker.lock().unwrap_or_else(|e| e.into_inner())
}

/// Commit done offsets every [`COMMIT_EVERY`] (asynchronously: the answer
/// comes to [`Context::commit_callback`]).
/// It stops on a graceful shutdown, when the final commit takes over.
async fn commit_loop(
    consumer: Arc<Kafka>,
    tracker: Arc<Mutex<Tracker>>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let topic = consumer.context().topic.clone();
    let mut every = tokio::time::interval(COMMIT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = super::stopped(&mut stopping) => return,
        }
        let commit = lock(&tracker).take_commit(&topic, None);
        if let Some(commit) = commit {
            if let Err(error) = consumer.commit(&commit, CommitMode::Async) {
                tracing::warn!(%error, "kafka offset commit failed; retrying");
                lock(&tracker).commit_failed(partitions_of(&commit, &topic));
            }
        }
    }
}

/// Receive messages and charge them, at most [`MAX_IN_FLIGHT`] at once,
/// until `stopping` turns true (see [`start`]); then [`stop`].
async fn consume(
    state: AppState,
    consumer: Arc<Kafka>,
    tracker: Arc<Mutex<Tracker>>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let _running = super::Running::new(&state, SOURCE);
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let freed = Arc::new(Notify::new());
    let mut backlog: VecDeque<(OwnedMessage, Option<u64>)> = VecDeque::new();
    // The assignment generation the partitions were paused at, when paused.
    let mut paused: Option<u64> = None;
    let mut errors = 0u32;
    loop {
        if *stopping.borrow_and_update() {
            stop(consumer, tracker, slots, backlog.len()).await;
            return;
        }
        let mut writer_full = false;
        while !backlog.is_empty() {
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                break;
            };
            let (message, epoch) = backlog.pop_front().expect("not empty");
            // Into the writer's queue here, in the order of the partition,
            // and only then waited for on a task of its own. A full queue
            // is waited for only briefly: then the message goes back to the
            // head of the backlog and the loop polls Kafka (rebalances,
            // `stopping`) before it tries again.
            let sent = match message.payload() {
                Some(bytes) => {
                    let send = ingest::send_bytes(&state, bytes, SOURCE);
                    match tokio::time::timeout(SEND_WAIT, send).await {
                        Ok(sent) => Some(sent),
                        // Not queued: a send cut short queues nothing.
                        Err(_) => {
                            backlog.push_front((message, epoch));
                            writer_full = true;
                            break;
                        }
                    }
                }
                None => None,
            };
            let (state, tracker, freed) = (state.clone(), tracker.clone(), freed.clone());
            let mut stopping = stopping.clone();
            tokio::spawn(async move {
                let charged = process(&state, &message, sent, &mut stopping).await;
                if let (true, Some(epoch)) = (charged, epoch) {
                    lock(&tracker).done(message.partition(), epoch, message.offset());
                }
                drop(slot);
                freed.notify_one();
            });
        }

        // Pause fetching while too much waits for a slot (the store is slow or
        // unavailable), and keep polling: rebalances are served meanwhile.
        let generation = lock(&tracker).generation;
        let pause = backlog.len() >= PAUSE_AT || (paused.is_some() && backlog.len() > RESUME_AT);
        if pause && paused != Some(generation) {
            if let Err(error) = consumer.assignment().and_then(|a| consumer.pause(&a)) {
                tracing::warn!(%error, "could not pause kafka partitions");
            } else {
                tracing::debug!(backlog = backlog.len(), "kafka consumer paused");
            }
            paused = Some(generation);
        } else if !pause && paused.is_some() {
            if let Err(error) = consumer.assignment().and_then(|a| consumer.resume(&a)) {
                tracing::warn!(%error, "could not resume kafka partitions");
            } else {
                tracing::debug!("kafka consumer resumed");
            }
            paused = None;
        }

        tokio::select! {
            received = consumer.recv() => match received {
                Ok(message) => {
                    errors = 0;
                    let message = message.detach();
                    let epoch = lock(&tracker).received(message.partition(), message.offset());
                    if epoch.is_none() {
                        tracing::debug!(partition = message.partition(), offset = message.offset(),
                            "message from a partition not assigned here: charged, not committed");
                    }
                    backlog.push_back((message, epoch));
                }
                Err(error) => {
                    errors = errors.saturating_add(1);
                    if errors <= 3 || errors.is_power_of_two() {
                        tracing::warn!(%error, errors, "kafka consumer error");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = freed.notified(), if !backlog.is_empty() => {}
            _ = tokio::time::sleep(SEND_WAIT), if writer_full => {}
            _ = stopping.changed() => {}
        }
    }
}

/// A graceful stop: take no more messages, let the ones being charged
/// finish, commit every done offset synchronously, and leave the group.
/// Messages received but not started are not charged here: their offsets
/// stay uncommitted, so whoever reads the partition next charges them.
async fn stop(
    consumer: Arc<Kafka>,
    tracker: Arc<Mutex<Tracker>>,
    slots: Arc<Semaphore>,
    not_started: usize,
) {
    let all = MAX_IN_FLIGHT as u32;
    let finished = tokio::time::timeout(STOP_WAIT, slots.acquire_many(all))
        .await
        .is_ok();
    if !finished {
        tracing::warn!(
            wait_s = STOP_WAIT.as_secs(),
            "kafka messages still being charged at shutdown; their offsets stay uncommitted"
        );
    }
    let topic = consumer.context().topic.clone();
    // Every done offset, also those an asynchronous commit already sent: its
    // answer is never served once polling stops, so it may have failed
    // unseen (committing an offset again is harmless).
    let commit = {
        let mut tracker = lock(&tracker);
        let partitions: Vec<i32> = tracker.partitions.keys().copied().collect();
        tracker.commit_failed(partitions);
        tracker.take_commit(&topic, None)
    };
    let committed = tokio::task::spawn_blocking(move || {
        if let Some(commit) = &commit {
            if let Err(error) = consumer.commit(commit, CommitMode::Sync) {
                // (For instance a rebalance under way during the wait.) Leave
                // the offsets to the revocation, which commits what is done.
                tracing::warn!(%error, "final kafka offset commit failed; retrying as the consumer leaves the group");
                lock(&consumer.context().tracker).commit_failed(partitions_of(commit, &topic));
            }
        }
        consumer.unsubscribe();
        commit.map(|c| c.count()).unwrap_or(0)
    })
    .await
    .unwrap_or(0);
    tracing::info!(
        partitions_committed = committed,
        not_started,
        "kafka consumer stopped"
    );
}

/// Charge one message (`sent`: already in the writer's queue, or kept as a
/// dead letter), retrying while the store is unavailable, until the outcome is durable (true) or the consumer
/// stops (false: the message is not done, and its offset stays
/// uncommitted).
async fn process(
    state: &AppState,
    message: &OwnedMessage,
    mut sent: Option<ingest::Sent<'static>>,
    stopping: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    let mut backoff = RETRY_FIRST;
    let mut attempt = 1u32;
    loop {
        let result = match message.payload() {
            // The first attempt was sent in order by the receiving loop.
            Some(_) if sent.is_some() => sent.take().expect("sent").finish(state).await,
            Some(bytes) => ingest::ingest_bytes(state, bytes, SOURCE).await,
            None => {
                let key = message
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default();
                let payload = format!(
                    "kafka message {}/{}@{} key={key:?} without a payload",
                    message.topic(),
                    message.partition(),
                    message.offset()
                );
                ingest::ingest_invalid(state, payload, SOURCE, "the message has no payload").await
            }
        };
        match result {
            Ok(result) => {
                let status = result.status();
                state.metrics.events(SOURCE, status);
                return true;
            }
            Err(error) => {
                if attempt <= 3 || attempt.is_power_of_two() {
                    tracing::warn!(
                        partition = message.partition(),
                        offset = message.offset(),
                        attempt,
                        code = %error.code,
                        message = %error.message,
                        "kafka message not charged (store unavailable); retrying"
                    );
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = super::stopped(stopping) => return false,
                }
                backoff = (backoff * 2).min(RETRY_MAX);
                attempt = attempt.saturating_add(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each kind of client error is logged at once, then once per
    /// [`ERROR_LOG_EVERY`] with the count of those not logged; kinds
    /// interleaving do not reset each other.
    #[test]
    fn client_errors_are_logged_once_per_kind_and_interval() {
        let mut log = ErrorLog::default();
        let start = std::time::Instant::now();
        let at = |ms: u64| start + std::time::Duration::from_millis(ms);
        assert_eq!(log.note("Transport".into(), at(0)), Some(0));
        assert_eq!(log.note("AllBrokersDown".into(), at(1)), Some(0));
        for ms in (100..29_900).step_by(100) {
            assert_eq!(log.note("Transport".into(), at(ms)), None);
            assert_eq!(log.note("AllBrokersDown".into(), at(ms + 1)), None);
        }
        assert_eq!(log.note("Transport".into(), at(30_000)), Some(298));
        assert_eq!(log.note("Transport".into(), at(30_100)), None);
        assert_eq!(log.note("AllBrokersDown".into(), at(30_001)), Some(298));
    }

    fn offsets(list: Option<TopicPartitionList>) -> Vec<(i32, i64)> {
        let mut out: Vec<(i32, i64)> = list
            .map(|l| {
                l.elements()
                    .iter()
                    .map(|e| match e.offset() {
                        Offset::Offset(n) => (e.partition(), n),
                        other => panic!("unexpected offset {other:?}"),
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    #[test]
    fn a_consumer_without_partitions_is_told_every_alert_period() {
        let start = std::time::Instant::now();
        let at = |s: u64| start + std::time::Duration::from_secs(s);
        let mut tracker = Tracker::default();
        assert!(!tracker.unassigned_too_long(at(0)));
        assert!(!tracker.unassigned_too_long(at(29)));
        assert!(tracker.unassigned_too_long(at(30)));
        assert!(!tracker.unassigned_too_long(at(31)), "once per period");
        assert!(tracker.unassigned_too_long(at(60)));
        // Holding a partition clears it; losing them all starts over.
        tracker.assign([0]);
        assert!(!tracker.unassigned_too_long(at(100)));
        tracker.revoke([0]);
        assert!(!tracker.unassigned_too_long(at(101)));
        assert!(!tracker.unassigned_too_long(at(130)));
        assert!(tracker.unassigned_too_long(at(131)));
    }

    #[test]
    fn commits_only_below_the_first_message_not_done() {
        let mut tracker = Tracker::default();
        tracker.assign([0, 1]);
        let e0 = tracker.received(0, 10).unwrap();
        for offset in 11..15 {
            assert_eq!(tracker.received(0, offset), Some(e0));
        }
        let e1 = tracker.received(1, 0).unwrap();
        // Done out of order: 11, 12 and 14 but not 10.
        for offset in [11, 12, 14] {
            tracker.done(0, e0, offset);
        }
        assert_eq!(offsets(tracker.take_commit("t", None)), vec![]);
        tracker.done(0, e0, 10);
        tracker.done(1, e1, 0);
        assert_eq!(
            offsets(tracker.take_commit("t", None)),
            vec![(0, 13), (1, 1)]
        );
        // Nothing new: nothing to commit again.
        assert_eq!(offsets(tracker.take_commit("t", None)), vec![]);
        tracker.done(0, e0, 13);
        assert_eq!(offsets(tracker.take_commit("t", None)), vec![(0, 15)]);
        // A failed commit is tried again.
        tracker.commit_failed([0]);
        assert_eq!(offsets(tracker.take_commit("t", None)), vec![(0, 15)]);
    }

    #[test]
    fn a_revoked_partition_forgets_its_messages_in_flight() {
        let mut tracker = Tracker::default();
        tracker.assign([0, 1]);
        let old = tracker.received(0, 5).unwrap();
        tracker.received(0, 6).unwrap();
        let other = tracker.received(1, 0).unwrap();
        tracker.done(0, old, 5);
        // Revoke commits what is done for those partitions only.
        assert_eq!(offsets(tracker.take_commit("t", Some(&[0]))), vec![(0, 6)]);
        tracker.revoke([0]);
        assert_eq!(
            tracker.received(0, 7),
            None,
            "not assigned: never committed"
        );
        // Assigned again: a message of the earlier assignment moves nothing.
        tracker.assign([0]);
        let new = tracker.received(0, 6).unwrap();
        assert_ne!(new, old);
        tracker.done(0, old, 6);
        assert_eq!(offsets(tracker.take_commit("t", Some(&[0]))), vec![]);
        tracker.done(0, new, 6);
        tracker.done(1, other, 0);
        assert_eq!(
            offsets(tracker.take_commit("t", None)),
            vec![(0, 7), (1, 1)]
        );
    }
}
