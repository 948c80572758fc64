//! The single writer: applies commands in order and commits them in groups.
//!
//! One OS thread owns the only write connection. It takes every command
//! waiting in its queue (up to a batch limit), applies each through the pure
//! core against an in-memory cache of customer ledgers, writes the resulting
//! rows inside one transaction and commits without an fsync. The syncer
//! thread then fsyncs the write-ahead log once for the whole group and only
//! then answers its callers, while the writer already applies the next group.
//! Throughput therefore grows with load instead of being capped by the fsync
//! rate.
//!
//! If any write fails the whole group is rolled back and the cache is
//! dropped (it may hold changes that never reached the disk); nothing was
//! acknowledged, so nothing is lost. The group's commands are then applied
//! again in halves, so that only a command the database refuses by itself
//! is told the store is unavailable (`Writer::split_for_retry`); a retry
//! with its id starts afresh.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use crate::clock::SystemClock;
use crate::db::{self, params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};
use tally_core::{
    ChargeRecord, Clock, CustomerLedger, Draw, EntryDraft, Grant, GrantStatus, HoldStatus, Id,
    LedgerError, Spend, Timestamp,
};
use tokio::sync::{mpsc, oneshot};

use crate::catalog::{
    self, Catalog, ContractRecord, FeatureRecord, PricebookRecord, PricebookStatus,
};
use crate::model::*;
use crate::rows;

mod notify;
mod subscriptions;
mod topups;

use tally_core::pricebook::{self, Contract, Pricing, Usage};
use tally_core::PricingError;

/// The writer's maps keyed by ids (looked up several times per command):
/// aHash, randomly keyed per process, instead of SipHash.
type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;

/// The most commands committed in one transaction.
pub const MAX_BATCH: usize = 4096;
/// The most customer ledgers kept in memory before the cache is emptied.
const MAX_CACHED_CUSTOMERS: usize = 200_000;
/// The most refused renewals remembered for logging once (see
/// `Writer::refused_renewals`).
const REFUSED_RENEWALS_KEPT: usize = 10_000;
/// The most customers one tick expires (the next tick continues).
const MAX_TICK_CUSTOMERS: i64 = 1000;

/// The journal entries and renewals one tick writes, about, before it leaves
/// the customers still due to the next tick (it finishes the customer it is
/// at): a clock step that renewed a year of daily plans for 57 customers took
/// 8.3 s on PostgreSQL, and a charge sent meanwhile waited 8.2 s (a probe).
const MAX_TICK_WORK: usize = 1000;
/// Record the writer's instant as the engine's clock (never moving it back).
const RECORD_ENGINE_CLOCK: &str = "INSERT INTO engine_clock (id, micros) VALUES (1, ?1) \
     ON CONFLICT (id) DO UPDATE SET micros = excluded.micros WHERE engine_clock.micros < excluded.micros";
/// Operation kinds that resolve something (a hold, a top-up's payment): a
/// refusal is not their id's outcome, since the id names the thing resolved.
const RESOLUTIONS: [&str; 2] = ["hold_resolution", "topup_resolution"];

pub struct Job {
    pub command: Command,
    pub actor: Option<String>,
    /// The request's fingerprint, computed by the caller so the writer does not.
    pub hash: Vec<u8>,
    pub reply: oneshot::Sender<Result<Executed, StoreError>>,
}

impl Job {
    pub fn new(
        command: Command,
        actor: Option<String>,
        reply: oneshot::Sender<Result<Executed, StoreError>>,
    ) -> Job {
        let hash = request_hash(&command);
        Job {
            command,
            actor,
            hash,
            reply,
        }
    }
}

/// An answer waiting for the fsync that makes its group durable.
pub type Answer = (
    oneshot::Sender<Result<Executed, StoreError>>,
    Result<Executed, StoreError>,
);

/// Why [`Writer::run`] returned.
pub enum Stopped {
    /// The store closed (its command channel), or the syncer stopped.
    Closed,
    /// PostgreSQL: the writer's connection is gone. Every caller of a
    /// command not known committed was answered `Unavailable`; the server
    /// may lead again on a new connection.
    ConnectionLost(db::Error),
}

/// Answer each job `Unavailable` without applying it.
pub fn fail_jobs(jobs: impl IntoIterator<Item = Job>, why: &str) {
    for job in jobs {
        let _ = job.reply.send(Err(StoreError::Unavailable(why.to_owned())));
    }
}

fn drain(receiver: &mut mpsc::Receiver<Job>, batch: &mut Vec<Job>) {
    drain_up_to(receiver, batch, MAX_BATCH);
}

/// Take waiting commands until `batch` holds `limit`; true once every
/// sender is gone.
fn drain_up_to(receiver: &mut mpsc::Receiver<Job>, batch: &mut Vec<Job>, limit: usize) -> bool {
    while batch.len() < limit {
        match receiver.try_recv() {
            Ok(job) => batch.push(job),
            Err(mpsc::error::TryRecvError::Empty) => return false,
            Err(mpsc::error::TryRecvError::Disconnected) => return true,
        }
    }
    false
}

/// How long a group under sustained load stays open at least (SQLite; see
/// `run`): a bigger group shares its page writes among more commands
/// (BENCHMARKS.md).
const LINGER: std::time::Duration = std::time::Duration::from_micros(500);
/// PostgreSQL: how long an idle writer goes without a statement (see
/// `Writer::idle_until_a_command`).
const KEEPALIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// Groups of at least this many commands mean sustained load (see `run`).
const LINGER_ABOVE: usize = 32;
/// A group this large commits as soon as the syncer is free.
const LINGER_UNTIL: usize = 512;
/// PostgreSQL: a group of at least this many commands commits without
/// waiting for the answer, and the writer applies the next group meanwhile
/// (see `run`). Smaller groups wait: measured with 64 clients, sending them
/// ahead gained nothing (the answer is read only between two commands
/// applied, and applying competes with PostgreSQL for the two cores), while
/// groups of thousands of events gained 14–30% (BENCHMARKS.md).
const SEND_AHEAD_FROM: usize = 256;
/// An operation's row (deferred: set-based with the group's other
/// operations on PostgreSQL, or a binary `COPY` for a large group; every
/// value a parameter, so that it has a `COPY` form).
const INSERT_OPERATION: &str = "INSERT INTO operations (sequence, kind, id, request_hash, ok, \
     response, customer_id, amount, refunded, feature, recorded_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";
/// Commands waiting beyond the open group that make it grow on.
const BACKLOG: usize = 512;

/// Balance changes (over all customers) a live-stream subscriber may lag
/// behind by: room for several of the largest event batches at once (4,096
/// dropped streams of idle customers whenever two batches of 10,000 events
/// came in together).
const LIVE_CAPACITY: usize = 65_536;

/// Groups committed but not yet fsynced, at most; then the writer waits.
pub const MAX_GROUPS_IN_FLIGHT: usize = 16;

/// Groups handed to the syncer and not yet answered, shared by the writer
/// (which counts them up) and the syncer (which counts them down and wakes
/// the writer once the log is durable).
pub struct SyncState {
    pending: std::sync::atomic::AtomicUsize,
    writer: std::sync::OnceLock<std::thread::Thread>,
    /// Balance changes, published once durable (the customers' live
    /// streams). Replaced by [`SyncState::end_live_streams`].
    live: std::sync::RwLock<tokio::sync::broadcast::Sender<BalanceChange>>,
    /// The last notification known durable: webhooks are sent only up to it,
    /// so none reports a change a crash could still lose.
    pub durable_notification: std::sync::atomic::AtomicI64,
    /// Frames in the SQLite write-ahead log at the checkpointer's last pass
    /// (see `Writer::restart_log_if_long`).
    pub wal_frames: std::sync::atomic::AtomicI64,
    /// Write groups that failed as they first ran (their commands were
    /// applied again in smaller groups), since the store opened.
    pub failed_groups: std::sync::atomic::AtomicU64,
    /// Commands answered `Unavailable` because they failed even on their
    /// own, since the store opened.
    pub failed_commands: std::sync::atomic::AtomicU64,
    /// Customers whose part of a tick failed on its own, left out of ticks
    /// for now (see `TickScope`).
    pub quarantined: std::sync::atomic::AtomicUsize,
}

/// A committed group waiting for its fsync: the answers, and the balance
/// changes to publish once it is durable.
pub struct Durable {
    answers: Vec<Answer>,
    changes: Vec<BalanceChange>,
    /// The group's last notification, if it wrote any.
    last_notification: Option<i64>,
}

impl SyncState {
    /// `durable_notification`: the last notification on disk at start.
    pub fn new(durable_notification: i64) -> Arc<SyncState> {
        Arc::new(SyncState {
            pending: std::sync::atomic::AtomicUsize::new(0),
            writer: std::sync::OnceLock::new(),
            live: std::sync::RwLock::new(tokio::sync::broadcast::channel(LIVE_CAPACITY).0),
            durable_notification: std::sync::atomic::AtomicI64::new(durable_notification),
            failed_groups: std::sync::atomic::AtomicU64::new(0),
            failed_commands: std::sync::atomic::AtomicU64::new(0),
            quarantined: std::sync::atomic::AtomicUsize::new(0),
            wal_frames: std::sync::atomic::AtomicI64::new(0),
        })
    }

    /// Follow the balance changes published from now on.
    pub fn subscribe_live(&self) -> tokio::sync::broadcast::Receiver<BalanceChange> {
        self.live.read().expect("live channel").subscribe()
    }

    fn live_sender(&self) -> tokio::sync::broadcast::Sender<BalanceChange> {
        self.live.read().expect("live channel").clone()
    }

    /// End every live stream (its receiver reads `Closed` once the writer
    /// that published to it is gone too), and publish on a new channel from
    /// now on. For a writer that lost its connection: a group may have
    /// committed without its answer, and so without its changes published;
    /// a stream that went on would miss them for good, whereas a client
    /// that opens a new one reads the balance afresh.
    pub fn end_live_streams(&self) {
        *self.live.write().expect("live channel") =
            tokio::sync::broadcast::channel(LIVE_CAPACITY).0;
    }

    fn busy(&self) -> bool {
        self.pending.load(std::sync::atomic::Ordering::Acquire) > 0
    }
}

/// The syncer: fsyncs the write-ahead log, then answers every group committed
/// before that fsync began. Running it beside the writer lets the next group
/// be applied while the previous one is made durable (pipelined group commit).
///
/// A failed fsync may have lost data the kernel already dropped; the only safe
/// answer is to stop the process so that recovery rebuilds from what is on disk.
pub fn run_syncer(
    wal_path: Option<std::path::PathBuf>,
    groups: std::sync::mpsc::Receiver<Durable>,
    state: Arc<SyncState>,
) {
    let mut wal: Option<std::fs::File> = None;
    let mut stats = SyncStats::new();
    while let Ok(first) = groups.recv() {
        let mut ready = vec![first];
        while let Ok(more) = groups.try_recv() {
            ready.push(more);
        }
        // PostgreSQL (no log file here) made each group durable before its
        // COMMIT returned.
        if let Some(wal_path) = &wal_path {
            if wal.is_none() {
                wal = std::fs::OpenOptions::new().write(true).open(wal_path).ok();
            }
            let started = std::time::Instant::now();
            let synced = wal.as_ref().map(std::fs::File::sync_data);
            stats.record(started.elapsed());
            if !matches!(synced, Some(Ok(()))) {
                tracing::error!(?synced, wal = ?wal_path, "fsync of the write-ahead log failed; stopping");
                std::process::abort();
            }
        }
        // Durable now: the writer may commit its next group while these
        // answers go out (delivering hundreds of them takes a while).
        state
            .pending
            .fetch_sub(ready.len(), std::sync::atomic::Ordering::AcqRel);
        if let Some(writer) = state.writer.get() {
            writer.unpark();
        }
        for group in ready {
            deliver(group, &state);
        }
    }
}

/// The syncer's fsyncs of the last second, logged at debug level: a long
/// one holds every answer behind it (the tail of `tally bench`'s latency).
struct SyncStats {
    since: std::time::Instant,
    syncs: u64,
    longest: std::time::Duration,
    over_5ms: u64,
}

impl SyncStats {
    fn new() -> SyncStats {
        SyncStats {
            since: std::time::Instant::now(),
            syncs: 0,
            longest: std::time::Duration::ZERO,
            over_5ms: 0,
        }
    }

    fn record(&mut self, took: std::time::Duration) {
        self.syncs += 1;
        self.longest = self.longest.max(took);
        self.over_5ms += u64::from(took > std::time::Duration::from_millis(5));
        if self.since.elapsed() >= std::time::Duration::from_secs(1) {
            tracing::debug!(
                syncs = self.syncs,
                longest_us = self.longest.as_micros() as u64,
                over_5ms = self.over_5ms,
                "fsyncs of the write-ahead log in the last second"
            );
            *self = SyncStats::new();
        }
    }
}

/// Answer a durable group's callers and publish what it changed.
fn deliver(group: Durable, state: &SyncState) {
    for (reply, result) in group.answers {
        let _ = reply.send(result);
    }
    let live = state.live.read().expect("live channel");
    if live.receiver_count() > 0 {
        for change in group.changes {
            let _ = live.send(change);
        }
    }
    drop(live);
    if let Some(last) = group.last_notification {
        state
            .durable_notification
            .fetch_max(last, std::sync::atomic::Ordering::AcqRel);
    }
}

/// A group whose commit was sent to PostgreSQL ahead of its answer.
struct Committing {
    durable: Durable,
    /// The group's commands, applied again if its commit fails.
    parked: Vec<Parked>,
    commands: usize,
    started: std::time::Instant,
    applied: std::time::Duration,
    /// How many of the operation index's pending rows are this group's
    /// (the oldest ones): kept once it commits, forgotten if it fails.
    operations: usize,
}

/// A group being applied: its transaction is open until the group commits.
struct Group {
    replies: Vec<oneshot::Sender<Result<Executed, StoreError>>>,
    results: Vec<Result<Executed, StoreError>>,
    /// Each command as it came, kept until the group is durable: if the
    /// group fails, its commands are applied again in smaller groups
    /// (`Writer::retries`).
    parked: Vec<Parked>,
    started: std::time::Instant,
    /// The first database failure: the group is rolled back, and its
    /// commands are applied again in smaller groups.
    failed: Option<db::Error>,
    /// A part of a failed group applied again: committed at once (never
    /// sent ahead), and split in two again if it fails.
    retry: Option<TickScope>,
}

/// A command of a group, without its reply (see `Group::parked`).
struct Parked {
    command: Command,
    actor: Option<String>,
    hash: Vec<u8>,
}

/// Rebuild the jobs of a failed group from its replies and commands.
fn unpark(
    replies: impl IntoIterator<Item = oneshot::Sender<Result<Executed, StoreError>>>,
    parked: Vec<Parked>,
) -> Vec<Job> {
    replies
        .into_iter()
        .zip(parked)
        .map(|(reply, p)| Job {
            command: p.command,
            actor: p.actor,
            hash: p.hash,
            reply,
        })
        .collect()
}

/// What a tick applied again after a failure covers. A tick's group that
/// fails by itself is applied again for its due customers in halves, so
/// that one customer whose expiry or renewal cannot be written (a defect,
/// a constraint the data breaks) does not stop every other customer's; that
/// customer is then left out of ticks for [`QUARANTINE_MICROS`].
#[derive(Clone, PartialEq, Eq, Debug)]
enum TickScope {
    /// Not a tick, or the whole tick.
    Whole,
    /// Only these customers' due holds, lots and renewals.
    Customers(Vec<String>),
    /// Only the work that belongs to no customer (overdue top-up payments,
    /// `grant.expiring` warnings, pruning).
    Housekeeping,
}

/// A tick for a part of a split tick: its answer goes nowhere (the tick's
/// caller is answered by the housekeeping part).
fn tick_job() -> Job {
    Job {
        command: Command::Tick,
        actor: None,
        hash: Vec::new(),
        reply: oneshot::channel().0,
    }
}

/// What happened since a group first failed, until every part of it has
/// been applied again (see `Writer::split_for_retry`).
#[derive(Default)]
struct Round {
    /// Parts that committed.
    committed: usize,
    /// Commands (and tick parts) that failed by themselves.
    alone: usize,
    /// Customers (and [`HOUSEKEEPING`]) whose tick part failed by itself:
    /// left out of ticks once the round ends, if some part committed.
    suspects: Vec<String>,
    /// Customers a split tick visits (its caller's `entries`).
    visited: usize,
}

/// `items` in two halves, in order (the first the smaller).
fn halve<T>(mut items: Vec<T>) -> [Vec<T>; 2] {
    let second = items.split_off(items.len() / 2);
    [items, second]
}

/// Commands that fail by themselves, with no part committed, after which
/// the fault is taken for the store's, not theirs.
const GIVE_UP_AFTER: usize = 3;

/// A part of a failed group waiting to be applied again.
struct Retry {
    jobs: Vec<Job>,
    scope: TickScope,
}

/// How long (engine time) a customer whose tick failed on its own is left
/// out of ticks before it is tried again: ten minutes.
const QUARANTINE_MICROS: i64 = 10 * 60 * 1_000_000;
/// The key of the housekeeping part of a tick in `Writer::quarantine`.
const HOUSEKEEPING: &str = "";

/// Why one command did not produce an outcome.
enum Failure {
    /// A business refusal from the core.
    Refused(LedgerError),
    /// Not found, conflict: answered, never stored.
    Store(StoreError),
    /// A refusal outside the ledger (pricing, the price book): stored like
    /// a ledger refusal when the command has an id.
    Rejected(Refusal),
    /// The database failed: the whole group is abandoned.
    Fatal(db::Error),
}

impl From<db::Error> for Failure {
    fn from(error: db::Error) -> Failure {
        Failure::Fatal(error)
    }
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Failure {
        Failure::Store(error)
    }
}

/// What one command writes to the operations table.
struct ChargeColumns {
    customer_id: Id,
    amount: i64,
    feature: Option<String>,
}

/// Where numbering continues, as the database holds it.
struct Sequences {
    next_entry: i64,
    last_recorded_micros: i64,
    next_grant: i64,
    next_operation: i64,
    next_notification: i64,
}

impl Sequences {
    fn read(connection: &Connection) -> db::Result<Sequences> {
        let (last_entry, last_recorded_micros): (i64, i64) = connection.query_row(
            "SELECT COALESCE(MAX(sequence), 0), COALESCE(MAX(recorded_at), 0) FROM entries",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        let last_grant: i64 =
            connection.query_row("SELECT COALESCE(MAX(sequence), 0) FROM grants", [], |row| {
                row.get(0)
            })?;
        let next = |table: &str| -> db::Result<i64> {
            connection.query_row(
                &format!("SELECT COALESCE(MAX(sequence), 0) + 1 FROM {table}"),
                [],
                |row| row.get(0),
            )
        };
        Ok(Sequences {
            next_entry: last_entry + 1,
            last_recorded_micros,
            next_grant: last_grant + 1,
            next_operation: next("operations")?,
            next_notification: next("notifications")?,
        })
    }
}

/// A customer's ledger as the writer keeps it, with the head of its entry chain.
struct Cached {
    ledger: CustomerLedger,
    head: Option<i64>,
    head_changed: bool,
    /// Each grant's status and expiry as its row last stored them.
    stored: FastMap<Id, rows::GrantLifecycle>,
    /// The customer's plan and region, which pricing resolves by.
    plan: Option<String>,
    region: Option<String>,
    /// The plans it was on (a late event is priced by the plan at its time).
    plan_history: crate::model::PlanHistory,
    /// The active subscription (started or scheduled), renewed when due.
    subscription: Option<tally_core::Subscription>,
    /// The overage policy the customer set itself (else its plan's applies).
    overage_override: Option<tally_core::OveragePolicy>,
    /// Its alert thresholds.
    alerts: Option<Alerts>,
    /// The balance (net of debt) after its last entry: what a threshold is crossed from.
    last_net: tally_core::Amount,
    /// Its automatic top-up, if it has one.
    auto: Option<tally_core::AutoTopupState>,
}

pub struct Writer {
    connection: Connection,
    /// When the writer last made the write-ahead log start over (or tried).
    last_log_restart: std::time::Instant,
    clock: Arc<dyn Clock>,
    cache: FastMap<Id, Cached>,
    touched: HashSet<Id, ahash::RandomState>,
    now: Timestamp,
    last_recorded_micros: i64,
    next_entry_sequence: i64,
    next_grant_sequence: i64,
    next_operation_sequence: i64,
    next_notification_sequence: i64,
    stats: GroupStats,
    /// PostgreSQL: the group whose commit was sent ahead and is not yet
    /// answered (see `run`).
    committing: Option<Committing>,
    /// PostgreSQL: a commit sent ahead failed; the group open on top of it
    /// must fail too (its effects build on the lost group).
    lost: Option<db::Error>,
    /// PostgreSQL: the state could not be read back after a failed group
    /// because the connection is gone (or for another reason a new one may
    /// not have, `reset_after_failure`): `run` returns, and the server leads
    /// again on a new connection (lib.rs, `write_postgres`).
    gone: Option<db::Error>,
    /// Every plan, by key.
    plans: HashMap<String, tally_core::Plan>,
    /// Every credit pack, by key.
    packs: HashMap<String, tally_core::CreditPack>,
    /// Every webhook endpoint and what it subscribed to.
    endpoints: Vec<notify::Endpoint>,
    /// Where durable balance changes are published (set when the writer runs).
    live: Option<tokio::sync::broadcast::Sender<BalanceChange>>,
    /// The open group's balance changes (only while someone listens).
    group_changes: Vec<BalanceChange>,
    /// Subscriptions renewed since the tick began.
    renewals: usize,
    /// Renewals the core refused, by subscription and the period end they are
    /// due at: each is logged once, not at every tick while it stays due.
    /// At most [`REFUSED_RENEWALS_KEPT`].
    refused_renewals: std::collections::HashSet<(Id, i64)>,
    /// Customers with an automatic top-up whose balance changed in the
    /// command being applied: checked once it is complete.
    topup_checks: Vec<Id>,
    /// Customers whose balance the command being applied changed (while a
    /// webhook endpoint exists): the balance before its first entry and its
    /// last entry, for the threshold alerts checked once it is complete.
    balance_checks: FastMap<Id, (tally_core::Amount, i64)>,
    /// The last notification the open group wrote.
    group_notification: Option<i64>,
    /// When the tick next prunes old notifications (engine time, µs).
    next_prune_at: i64,
    /// Where the sweep for `grant.expiring` goes on: the last lot the last
    /// tick looked at (its expiry and id), or `None` to start from the soonest.
    expiring_sweep: Option<(i64, String)>,
    /// For each `grant_expiring_days` a customer has set: how far the tick
    /// has looked for lots coming within that many days of expiry (the
    /// last lot's expiry and id), or `None` until the next tick starts it
    /// at its horizon (see `notify_expiring`).
    expiring_frontiers: FastMap<i64, Option<(i64, String)>>,
    /// Lots made, or whose expiry changed, since the last tick, expiring
    /// within 90 days: the tick checks them for `grant.expiring`, a chunk a
    /// tick (a lot made inside its warning window is behind every
    /// frontier). At most `EXPIRING_RECENT_CAP`; beyond that, the sweep
    /// finds them.
    expiring_recent: std::collections::VecDeque<Id>,
    /// Parts of failed groups, to be applied again before anything new
    /// (see `split_for_retry`).
    retries: std::collections::VecDeque<Retry>,
    /// What the tick being applied covers (see [`TickScope`]).
    tick_scope: TickScope,
    /// Customers (and [`HOUSEKEEPING`]) whose part of a tick failed on its
    /// own, left out of ticks until the engine time given.
    quarantine: HashMap<String, i64>,
    /// Since a group first failed, until its parts are all applied again.
    round: Option<Round>,
    /// The state shared with the store (its failure counters), once `run`
    /// has started.
    shared: Option<Arc<SyncState>>,
    operations: OperationIndex,
    catalog: Catalog,
    /// Set by a command that found its work already done (a repeated publish).
    already_done: bool,
    options: crate::Options,
    /// Event ids that may have a pending dead letter (a superset: a charge
    /// of one of them settles it; no other charge pays for a lookup).
    letter_events: HashSet<String>,
}

/// Where each (kind, id) is in the operations table: a 64-bit fingerprint
/// to the row's sequence, always confirmed against the stored (kind, id), so
/// a fingerprint collision costs a second look, never a wrong answer.
///
/// The map is split into [`INDEX_SHARDS`] maps by the fingerprint's top
/// bits: a map grows by rehashing all it holds at once, and one map of
/// millions of operations stalled the writer for about 450 ms each time it
/// doubled (the whole group's latency); a shard rehashes a 256th of that.
struct OperationIndex {
    hasher: ahash::RandomState,
    first: Vec<HashMap<u64, i64, Mix>>,
    /// Further rows whose fingerprint collides with one in `first`.
    more: HashMap<u64, Vec<i64>, Mix>,
    /// Rows added by the group being written, forgotten if it rolls back.
    pending: Vec<(u64, i64)>,
}

/// Hashes a fingerprint (already a keyed hash) by one multiplication
/// instead of SipHash. The map takes its bucket from the low bits and its
/// tag from the top bits; the product's top bits depend on every bit, so
/// the shard bits (the fingerprint's top bits) leave both well spread.
type Mix = std::hash::BuildHasherDefault<MixHasher>;

#[derive(Default)]
struct MixHasher(u64);

impl std::hash::Hasher for MixHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; anything else still works.
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0 ^ value).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

impl OperationIndex {
    fn load(connection: &Connection) -> db::Result<OperationIndex> {
        let mut index = OperationIndex {
            hasher: ahash::RandomState::new(),
            first: (0..INDEX_SHARDS).map(|_| HashMap::default()).collect(),
            more: HashMap::default(),
            pending: Vec::new(),
        };
        let mut statement = connection.prepare("SELECT sequence, kind, id FROM operations")?;
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            let (sequence, kind, id): (i64, String, String) =
                (row.get(0)?, row.get(1)?, row.get(2)?);
            let fingerprint = index.fingerprint(&kind, &id);
            index.add(fingerprint, sequence);
        }
        index.pending.clear();
        Ok(index)
    }

    fn fingerprint(&self, kind: &str, id: &str) -> u64 {
        self.hasher.hash_one((kind, id))
    }

    fn shard(fingerprint: u64) -> usize {
        (fingerprint >> (64 - INDEX_SHARDS.trailing_zeros())) as usize
    }

    fn candidates(&self, fingerprint: u64) -> impl Iterator<Item = i64> + '_ {
        let more = self.more.get(&fingerprint).into_iter().flatten().copied();
        self.first[Self::shard(fingerprint)]
            .get(&fingerprint)
            .copied()
            .into_iter()
            .chain(more)
    }

    /// Grow the fullest shard past three quarters of its capacity, ahead of
    /// need; called once per turn of the writer's loop. The fingerprints
    /// spread evenly, so every shard fills at the same pace: left to grow
    /// when full, all 256 would rehash within the same half second (at 3.7
    /// million operations, then 7.3 million, ...), and the writer stalled for
    /// tens of milliseconds.
    /// Grown one per group instead, each growth happens while its shard still
    /// has room for an eighth of its capacity more, seconds of inserts at any
    /// rate the writer sustains.
    fn grow_ahead(&mut self) {
        let fullest = self
            .first
            .iter()
            .enumerate()
            .filter(|(_, shard)| !shard.is_empty() && shard.len() * 4 >= shard.capacity() * 3)
            .max_by_key(|(_, shard)| shard.len() * 1024 / shard.capacity())
            .map(|(index, _)| index);
        if let Some(index) = fullest {
            let shard = &mut self.first[index];
            shard.reserve(shard.capacity());
        }
    }

    fn add(&mut self, fingerprint: u64, sequence: i64) {
        match self.first[Self::shard(fingerprint)].entry(fingerprint) {
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(sequence);
            }
            std::collections::hash_map::Entry::Occupied(_) => {
                self.more.entry(fingerprint).or_default().push(sequence)
            }
        }
        self.pending.push((fingerprint, sequence));
    }

    /// The oldest `count` pending rows are committed: a rollback keeps them.
    fn keep_oldest(&mut self, count: usize) {
        self.pending.drain(..count);
    }

    fn rollback(&mut self) {
        for (fingerprint, sequence) in std::mem::take(&mut self.pending) {
            let shard = &mut self.first[Self::shard(fingerprint)];
            if shard.get(&fingerprint) == Some(&sequence) {
                shard.remove(&fingerprint);
            }
            if let Some(list) = self.more.get_mut(&fingerprint) {
                list.retain(|s| *s != sequence);
            }
        }
    }
}

/// Frames of the write-ahead log (4 KiB pages) beyond which the writer
/// makes it start over (64 MiB).
pub const WAL_RESTART_FRAMES: i64 = 16_384;
/// Active lots a tick looks at for `grant.expiring` (see `notify_expiring`).
pub const EXPIRING_CHUNK: usize = 1_000;
/// Lots made or moved between two ticks that the next ticks check for
/// `grant.expiring`, a chunk a tick; more are left to the sweep.
const EXPIRING_RECENT_CAP: usize = 10 * EXPIRING_CHUNK;

/// List `grant_id` in `list` (a writer's `expiring_recent`) for the next
/// tick to check for `grant.expiring`, if it expires within the horizon a
/// warning can come ahead ([`notify::WARNING_HORIZON`]) and the list has room.
fn list_expiring(
    list: &mut std::collections::VecDeque<Id>,
    grant_id: &Id,
    expires_at: Option<Timestamp>,
    now: Timestamp,
) {
    let soon = expires_at
        .is_some_and(|at| at.micros() <= now.micros().saturating_add(notify::WARNING_HORIZON));
    if soon && list.len() < EXPIRING_RECENT_CAP {
        list.push_back(grant_id.clone());
    }
}
/// How often the writer tries again when a reader kept the log from restarting.
const WAL_RESTART_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// How many maps the operation index is split into (a power of two).
const INDEX_SHARDS: usize = 256;

/// Per-second figures of the group commit, logged at debug level.
struct GroupStats {
    since: std::time::Instant,
    groups: u64,
    commands: u64,
    apply: std::time::Duration,
    total: std::time::Duration,
    longest: std::time::Duration,
    largest: usize,
}

impl GroupStats {
    fn new() -> GroupStats {
        GroupStats {
            since: std::time::Instant::now(),
            groups: 0,
            commands: 0,
            apply: std::time::Duration::ZERO,
            total: std::time::Duration::ZERO,
            longest: std::time::Duration::ZERO,
            largest: 0,
        }
    }

    fn record(&mut self, commands: usize, apply: std::time::Duration, total: std::time::Duration) {
        self.groups += 1;
        self.commands += commands as u64;
        self.apply += apply;
        self.total += total;
        self.longest = self.longest.max(total);
        self.largest = self.largest.max(commands);
        if self.since.elapsed() >= std::time::Duration::from_secs(1) {
            tracing::debug!(
                groups = self.groups,
                commands = self.commands,
                apply_ms = self.apply.as_millis() as u64,
                commit_ms = (self.total - self.apply).as_millis() as u64,
                longest_us = self.longest.as_micros() as u64,
                largest = self.largest,
                "write groups in the last second"
            );
            *self = GroupStats::new();
        }
    }
}

impl Writer {
    pub fn new(
        connection: Connection,
        clock: Arc<dyn Clock>,
        options: crate::Options,
    ) -> db::Result<Writer> {
        let sequences = Sequences::read(&connection)?;
        let operations = OperationIndex::load(&connection)?;
        let catalog = Catalog::load(&connection)?;
        let letter_events = pending_letter_events(&connection)?;
        let plans = load_plans(&connection)?;
        let packs = load_packs(&connection)?;
        let endpoints = notify::load_endpoints(&connection)?;
        let expiring_frontiers = notify::load_expiring_days(&connection)?
            .into_iter()
            .map(|days| (days, None))
            .collect();
        // A manual clock resumes where the last writer's was (a restart, or
        // another server taking over a shared database); a real clock far
        // behind it refuses to write (`check_engine_clock`).
        if let Some(instant) = check_engine_clock(&connection, &*clock)? {
            clock.catch_up(instant);
        }
        // Recorded at once, not only at the first tick: a server that opens
        // the database meanwhile starts its manual clock there (`resume`),
        // not at its own later start.
        connection.execute(RECORD_ENGINE_CLOCK, [clock.now().micros()])?;
        if connection.is_postgres() {
            connection.execute(
                RECORD_CLOCK_MODE,
                [i64::from(clock.is_manual()), SystemClock.now().micros()],
            )?;
        }
        connection.execute(
            "INSERT INTO event_window (id, seconds) VALUES (1, ?1) ON CONFLICT (id) \
             DO UPDATE SET seconds = excluded.seconds WHERE event_window.seconds < excluded.seconds",
            [options.event_window_seconds],
        )?;
        Ok(Writer {
            plans,
            packs,
            endpoints,
            live: None,
            group_changes: Vec::new(),
            renewals: 0,
            refused_renewals: std::collections::HashSet::new(),
            topup_checks: Vec::new(),
            balance_checks: FastMap::default(),
            group_notification: None,
            next_prune_at: 0,
            expiring_sweep: None,
            expiring_frontiers,
            expiring_recent: std::collections::VecDeque::new(),
            retries: std::collections::VecDeque::new(),
            tick_scope: TickScope::Whole,
            quarantine: HashMap::new(),
            round: None,
            shared: None,
            connection,
            clock,
            cache: FastMap::default(),
            touched: HashSet::default(),
            last_log_restart: std::time::Instant::now(),
            now: Timestamp(0),
            last_recorded_micros: sequences.last_recorded_micros,
            next_entry_sequence: sequences.next_entry,
            next_grant_sequence: sequences.next_grant,
            next_operation_sequence: sequences.next_operation,
            next_notification_sequence: sequences.next_notification,
            stats: GroupStats::new(),
            committing: None,
            lost: None,
            gone: None,
            operations,
            catalog,
            already_done: false,
            options,
            letter_events,
        })
    }

    /// The writer's own connection (setting up before it runs).
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// The last notification written (0 if none).
    pub fn last_notification(&self) -> i64 {
        self.next_notification_sequence - 1
    }

    /// Serve until every sender is dropped.
    ///
    /// Commands are applied as they arrive, into an open transaction. The
    /// group commits as soon as the syncer is free (nothing committed is
    /// waiting for an fsync), or when it is full. While the syncer is still
    /// making the previous group durable, a commit now would only wait for
    /// the next fsync anyway: the writer keeps applying into the same group
    /// instead, so there is one commit per fsync and each group shares its
    /// page writes among as many commands as arrived meanwhile, without any
    /// added wait.
    pub fn run(
        mut self,
        receiver: &mut mpsc::Receiver<Job>,
        syncer: &std::sync::mpsc::SyncSender<Durable>,
        state: &Arc<SyncState>,
    ) -> Stopped {
        let _ = state.writer.set(std::thread::current());
        self.live = Some(state.live_sender());
        self.shared = Some(state.clone());
        self.show_quarantine();
        let postgres = self.connection.dialect() == db::Dialect::Postgres;
        let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
        let mut previous_group = 0;
        loop {
            // Between groups, after the last one's answers were handed on.
            self.operations.grow_ahead();
            if self.committing.is_some() {
                // PostgreSQL: the last group's commit is in flight. Answer
                // its callers as soon as it returns, or start the next
                // group with the first command that comes meanwhile.
                match self.connection.commit_outcome_or(receiver.recv()) {
                    db::Waited::Committed(outcome) => self.settled(outcome, state),
                    db::Waited::Other(Some(job)) => batch.push(job),
                    db::Waited::Other(None) if self.retries.is_empty() => {
                        self.settle_commit(state, true);
                        return Stopped::Closed;
                    }
                    // Closed, but failed commands wait to be applied again.
                    db::Waited::Other(None) => {}
                }
                if let Some(error) = self.lost.take() {
                    tracing::error!(%error, "a write group failed; rolled back");
                    self.reset_after_failure();
                }
                if let Some(error) = self.gone.take() {
                    fail_jobs(batch, &error.to_string());
                    self.fail_retries(&error.to_string());
                    return Stopped::ConnectionLost(error);
                }
            }
            // The parts of failed groups go first, each committed before
            // the next (none is in flight once a group has failed).
            if let Some(retry) = self.retries.pop_front() {
                self.settle_commit(state, true);
                if let Some(stopped) = self.run_retry(retry, state, syncer) {
                    if let Stopped::ConnectionLost(error) = &stopped {
                        fail_jobs(batch, &error.to_string());
                    }
                    return stopped;
                }
                if self.retries.is_empty() {
                    self.end_round();
                }
                continue;
            }
            if batch.is_empty() {
                let first = match postgres {
                    // (No retry is left here: they go first, above.)
                    true => match self.idle_until_a_command(receiver) {
                        Ok(first) => first,
                        Err(error) => return Stopped::ConnectionLost(error),
                    },
                    false => receiver.blocking_recv(),
                };
                let Some(first) = first else {
                    return Stopped::Closed;
                };
                batch.push(first);
            }
            drain(receiver, &mut batch);
            self.restart_log_if_long(state);
            let mut group = self.begin_group();
            let mut closed = false;
            // SQLite: under sustained load a group also stays open for at
            // least LINGER, so that it shares its page writes among more
            // commands, but only while commands keep coming: once a wait
            // brought nothing (every client is waiting for this group, as
            // closed-loop clients do), lingering would only add latency.
            // Not on PostgreSQL: there the group waits for the last one's
            // COMMIT, and commands keep coming all the while (the callers the
            // last group answered), so a linger held every group open for
            // up to LINGER after that, one group after another; without it,
            // 13% more single charges over HTTP on one hot customer
            // (BENCHMARKS.md, 2026-12-06, fourteenth session).
            let linger = !postgres && previous_group >= LINGER_ABOVE;
            let mut quiet = false;
            loop {
                self.apply_jobs(&mut group, &mut batch);
                if group.replies.len() >= MAX_BATCH || group.failed.is_some() || closed {
                    break;
                }
                let ripe = !linger
                    || quiet
                    || group.replies.len() >= LINGER_UNTIL
                    || group.started.elapsed() >= LINGER;
                // A backlog means the writer is the bottleneck: the group then
                // grows (to MAX_BATCH at most), which costs the waiting
                // commands nothing and spends fewer page writes on each.
                let backlog = receiver.len() >= BACKLOG;
                // Is the last group still being made durable? (SQLite: its
                // fsync; PostgreSQL: its commit, sent ahead.)
                let busy = match postgres {
                    true => !self.settle_commit(state, false),
                    false => state.busy(),
                };
                if let Some(error) = self.lost.take() {
                    group.failed = Some(error);
                    break;
                }
                if ripe && !backlog && !busy {
                    // Take what arrived while the last commands applied, then commit.
                    drain_up_to(receiver, &mut batch, MAX_BATCH - group.replies.len());
                    self.apply_jobs(&mut group, &mut batch);
                    break;
                }
                if backlog {
                    drain_up_to(receiver, &mut batch, MAX_BATCH - group.replies.len());
                    continue;
                }
                if postgres && busy {
                    // Wake on the last group's answer or on a new command.
                    match self.connection.commit_outcome_or(receiver.recv()) {
                        db::Waited::Committed(outcome) => self.settled(outcome, state),
                        db::Waited::Other(Some(job)) => batch.push(job),
                        db::Waited::Other(None) => closed = true,
                    }
                } else {
                    // The syncer wakes this thread when it is done.
                    std::thread::park_timeout(std::time::Duration::from_micros(100));
                }
                closed |= drain_up_to(receiver, &mut batch, MAX_BATCH - group.replies.len());
                quiet = batch.is_empty();
            }
            previous_group = group.replies.len();
            let finished = self.finish_group(group, state);
            if let Some(stopped) = self.hand_on(finished, state, syncer) {
                if let Stopped::ConnectionLost(error) = &stopped {
                    fail_jobs(batch, &error.to_string());
                }
                return stopped;
            }
        }
    }

    /// PostgreSQL: wait for the next command (`None`: the store closed),
    /// showing the database this writer is alive meanwhile: a statement
    /// every [`KEEPALIVE_EVERY`] while no command comes. A follower ends a
    /// leader's session that waits on its server for 10 s
    /// (`SilentLeaderWatch`), as a stalled server's would.
    fn idle_until_a_command(
        &mut self,
        receiver: &mut mpsc::Receiver<Job>,
    ) -> db::Result<Option<Job>> {
        loop {
            if let Some(received) = self
                .connection
                .wait_at_most(receiver.recv(), KEEPALIVE_EVERY)
            {
                return Ok(received);
            }
            self.connection.execute_batch("SELECT 1")?;
        }
    }

    /// PostgreSQL: take the outcome of the commit sent ahead, if it has come
    /// (with `wait`, wait for it). Whether no commit is in flight any more.
    fn settle_commit(&mut self, state: &SyncState, wait: bool) -> bool {
        if self.committing.is_none() {
            return true;
        }
        match self.connection.commit_outcome(wait) {
            Some(outcome) => {
                self.settled(outcome, state);
                true
            }
            None => false,
        }
    }

    /// The group sent ahead committed (answer its callers) or failed (queue
    /// its commands to be applied again, and fail the group applied on top
    /// of it: `lost`).
    fn settled(&mut self, outcome: db::Result<()>, state: &SyncState) {
        let committing = self
            .committing
            .take()
            .expect("an outcome comes only for a commit in flight");
        self.stats.record(
            committing.commands,
            committing.applied,
            committing.started.elapsed(),
        );
        match outcome {
            Ok(()) => {
                self.operations.keep_oldest(committing.operations);
                deliver(committing.durable, state);
            }
            Err(error) => {
                tracing::error!(%error, group = committing.commands, "a write group sent ahead failed; its commands are applied again in smaller groups");
                self.count_failure(|shared| {
                    shared.failed_groups.fetch_add(1, Relaxed);
                });
                let replies = committing
                    .durable
                    .answers
                    .into_iter()
                    .map(|(reply, _)| reply);
                self.split_for_retry(unpark(replies, committing.parked), None, &error);
                self.lost = Some(error);
            }
        }
    }

    /// Keep SQLite's write-ahead log from growing without bound.
    ///
    /// SQLite starts the log over only when a write transaction begins while
    /// every frame in it has been copied into the database file. The
    /// checkpointer thread copies in the background, but with groups
    /// committing back to back there are always newer frames than its last
    /// pass, so under any steady load the log never restarted: it grew by
    /// about 50 MB/s at 10,000 charges/s. Once the log is longer than
    /// [`WAL_RESTART_FRAMES`], the writer copies the few frames the last
    /// pass left (and syncs the database file) itself, between two groups,
    /// which takes 2–7 ms (BENCHMARKS.md),
    /// so that the next group writes the log from its start again, over
    /// blocks the file already has. A reader holding an older snapshot can
    /// stop this; it is tried again at most every [`WAL_RESTART_RETRY`].
    fn restart_log_if_long(&mut self, state: &SyncState) {
        use std::sync::atomic::Ordering;
        if self.connection.dialect() != db::Dialect::Sqlite
            || state.wal_frames.load(Ordering::Acquire) < self.options.wal_restart_frames
            || self.last_log_restart.elapsed() < WAL_RESTART_RETRY
        {
            return;
        }
        let started = std::time::Instant::now();
        self.last_log_restart = started;
        let checkpoint = self
            .connection
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, i64>(2)?,
                ))
            });
        match checkpoint {
            Ok((busy, frames, copied)) => {
                if busy == 0 && frames == copied {
                    state.wal_frames.store(0, Ordering::Release);
                }
                tracing::debug!(
                    busy,
                    frames,
                    copied,
                    took_us = started.elapsed().as_micros() as u64,
                    "write-ahead log copied for a restart"
                );
            }
            Err(error) => tracing::warn!(%error, "cannot checkpoint the write-ahead log"),
        }
    }

    fn begin_group(&mut self) -> Group {
        let started = std::time::Instant::now();
        self.now = self.clock.now();
        let failed = self.connection.begin().err();
        Group {
            replies: Vec::new(),
            results: Vec::new(),
            parked: Vec::new(),
            started,
            failed,
            retry: None,
        }
    }

    /// Apply `batch` into the open group.
    fn apply_jobs(&mut self, group: &mut Group, batch: &mut Vec<Job>) {
        if batch.is_empty() {
            return;
        }
        // The clock moves on while a group stays open (never backwards).
        self.now = self.now.max(self.clock.now());
        for job in batch.drain(..) {
            if group.failed.is_none() {
                match self.apply(&job.command, &job.hash, job.actor.as_deref()) {
                    Ok(executed) => group.results.push(Ok(executed)),
                    Err(Failure::Store(error)) => group.results.push(Err(error)),
                    Err(Failure::Refused(error)) => unreachable!("refusal escaped apply: {error}"),
                    Err(Failure::Rejected(error)) => unreachable!("refusal escaped apply: {error}"),
                    Err(Failure::Fatal(error)) => group.failed = Some(error),
                }
            }
            group.replies.push(job.reply);
            group.parked.push(Parked {
                command: job.command,
                actor: job.actor,
                hash: job.hash,
            });
        }
    }

    /// Commit the group; what to answer and publish once it is durable, or
    /// `None` when the group failed (its commands are queued to be applied
    /// again, `split_for_retry`), or
    /// when its commit was sent ahead (PostgreSQL: `self.committing`
    /// answers it when the COMMIT returns). A group is committed or sent
    /// only once the group before it has committed.
    fn finish_group(&mut self, mut group: Group, state: &SyncState) -> Option<Durable> {
        let mut applied = std::time::Duration::ZERO;
        let postgres = self.connection.dialect() == db::Dialect::Postgres;
        let mut sent = false;
        let outcome = match group.failed.take() {
            Some(error) => Err(error),
            None => (|| -> db::Result<()> {
                self.flush()?;
                applied = group.started.elapsed();
                if !postgres {
                    return self.connection.commit();
                }
                // This group builds on the one in flight: it may commit only
                // once that one has.
                self.settle_commit(state, true);
                if let Some(error) = self.lost.take() {
                    return Err(error);
                }
                if group.replies.len() < SEND_AHEAD_FROM || group.retry.is_some() {
                    return self.connection.commit();
                }
                sent = self.connection.commit_async()?;
                Ok(())
            })(),
        };
        if !sent {
            self.stats
                .record(group.replies.len(), applied, group.started.elapsed());
        }
        if self.cache.len() > MAX_CACHED_CUSTOMERS {
            self.cache.clear();
        }
        match outcome {
            Ok(()) => {
                let commands = group.replies.len();
                let durable = Durable {
                    answers: group.replies.into_iter().zip(group.results).collect(),
                    changes: std::mem::take(&mut self.group_changes),
                    last_notification: self.group_notification.take(),
                };
                if !sent {
                    self.operations.pending.clear();
                    return Some(durable);
                }
                self.committing = Some(Committing {
                    durable,
                    parked: group.parked,
                    commands,
                    started: group.started,
                    applied,
                    operations: self.operations.pending.len(),
                });
                None
            }
            Err(error) => {
                // A group sent ahead fails with it if it has not committed
                // (its callers are told in `settled`).
                self.settle_commit(state, true);
                self.lost = None;
                tracing::error!(%error, group = group.replies.len(), "write group failed; rolled back");
                self.reset_after_failure();
                if group.retry.is_none() {
                    self.count_failure(|shared| {
                        shared.failed_groups.fetch_add(1, Relaxed);
                    });
                }
                let jobs = unpark(group.replies, group.parked);
                self.split_for_retry(jobs, group.retry, &error);
                None
            }
        }
    }

    /// After a failed group: forget everything not known committed, and
    /// continue from what the database holds. On PostgreSQL, if the state
    /// cannot be read back because the connection is gone (closed, reset,
    /// or out of step after a refused `COPY`), or for another reason a new
    /// connection may not have (`Error::is_transient`: a cancelled
    /// statement, a server turned read-only), set `gone`: `run` returns and
    /// the server leads again on a new connection, loading its state
    /// afresh. Any other failure to read it back stops the process (a
    /// broken invariant; a restart recovers), as it does on SQLite.
    fn reset_after_failure(&mut self) {
        let _ = self.connection.rollback();
        self.cache.clear();
        self.touched.clear();
        self.operations.rollback();
        self.group_changes.clear();
        self.group_notification = None;
        self.topup_checks.clear();
        self.balance_checks.clear();
        self.next_prune_at = 0;
        self.expiring_sweep = None;
        // The frontiers start again at their horizons (lots that came
        // within their window meanwhile are the sweep's).
        for frontier in self.expiring_frontiers.values_mut() {
            *frontier = None;
        }
        // `expiring_recent` stays: an id of a lot rolled back reads no row.
        if let Err(error) = self.reload() {
            // Anything else (a corrupt row, say) is a broken invariant.
            let lost = self.connection.dialect() == db::Dialect::Postgres
                && (error.is_transient() || self.connection.is_stale());
            if !lost {
                panic!("cannot read the writer's state back after a rollback: {error}");
            }
            self.gone = Some(error);
        }
    }

    /// After a rollback: the sequences, price book, dead letters, plans and
    /// webhook endpoints as the database holds them (the group may have
    /// changed them).
    fn reload(&mut self) -> db::Result<()> {
        let sequences = Sequences::read(&self.connection)?;
        self.next_entry_sequence = sequences.next_entry;
        self.last_recorded_micros = sequences.last_recorded_micros;
        self.next_grant_sequence = sequences.next_grant;
        self.next_operation_sequence = sequences.next_operation;
        self.next_notification_sequence = sequences.next_notification;
        // What this writer priced stays counted (a publication after it
        // takes effect after it); what the database holds is reread.
        let priced = self.catalog.priced_through;
        self.catalog = Catalog::load(&self.connection)?;
        if let Some(at) = priced {
            self.catalog.priced(at);
        }
        self.letter_events = pending_letter_events(&self.connection)?;
        self.plans = load_plans(&self.connection)?;
        self.packs = load_packs(&self.connection)?;
        self.endpoints = notify::load_endpoints(&self.connection)?;
        Ok(())
    }

    /// Write every grant and hold the group changed.
    fn flush(&mut self) -> db::Result<()> {
        // The latest instant usage was priced at is kept with it, so that a
        // publication after a restart, or on another server taking over
        // (whose clock may be behind this one's), still takes effect after
        // it: one single-row update in a group that priced usage.
        if let Some(through) = self.catalog.priced_through {
            if self.catalog.priced_mark.is_none_or(|mark| mark < through) {
                self.connection
                    .prepare_cached(
                        "UPDATE engine_clock SET priced_through = ?1 WHERE id = 1 \
                         AND (priced_through IS NULL OR priced_through < ?1)",
                    )?
                    .execute([through.micros()])?;
                self.catalog.priced_mark = Some(through);
            }
        }
        // Drained, not replaced: a fresh set would regrow (rehashing) in
        // every group.
        let mut touched = std::mem::take(&mut self.touched);
        for customer_id in touched.drain() {
            let Some(cached) = self.cache.get_mut(&customer_id) else {
                continue;
            };
            cached.ledger.number_new_lots(&mut self.next_grant_sequence);
            let changes = cached.ledger.take_changes();
            for grant in &changes.grants {
                let lifecycle = rows::lifecycle(grant);
                match cached.stored.get(&grant.id) {
                    // A lot the core made (a refund's, a rollover, a
                    // transfer's): its rows are written now.
                    None => {
                        rows::insert_grant(&self.connection, grant, None, self.now)?;
                        rows::update_grant(&self.connection, grant, cached.head, false)?;
                        list_expiring(
                            &mut self.expiring_recent,
                            &grant.id,
                            grant.expires_at,
                            self.now,
                        );
                    }
                    Some(stored) => {
                        let lifecycle_changed = *stored != lifecycle;
                        rows::update_grant(
                            &self.connection,
                            grant,
                            cached.head,
                            lifecycle_changed,
                        )?;
                    }
                }
                cached.stored.insert(grant.id.clone(), lifecycle);
            }
            if cached.head_changed && changes.grants.is_empty() {
                // No grant row changed (a full capture, free usage, usage on
                // debt): carry the head on any grant, or on the customer row
                // of a customer without grants.
                match cached.ledger.grants().first() {
                    // The same deferred statement as every balance row, so
                    // the last write of a row in the group wins.
                    Some(any) => rows::update_grant(&self.connection, any, cached.head, false)?,
                    None => self.connection.defer(
                        db::Shape::UpdateByFirst,
                        "UPDATE customers SET last_entry = ?2 WHERE id = ?1",
                        params![customer_id.as_str(), cached.head],
                    )?,
                };
            }
            cached.head_changed = false;
            for hold in &changes.holds {
                rows::upsert_hold(&self.connection, hold)?;
            }
            for member in &changes.members {
                rows::upsert_member(&self.connection, customer_id.as_str(), member, self.now)?;
            }
            if let Some(debt) = changes.debt {
                self.connection
                    .prepare_cached("UPDATE customers SET debt = ?1 WHERE id = ?2")?
                    .execute(params![debt.micros(), customer_id.as_str()])?;
            }
        }
        self.touched = touched;
        Ok(())
    }

    fn apply(
        &mut self,
        command: &Command,
        hash: &[u8],
        actor: Option<&str>,
    ) -> Result<Executed, Failure> {
        let executed = self.apply_command(command, hash, actor);
        if matches!(executed, Err(Failure::Fatal(_))) {
            // The group rolls back: nothing it saw may start a top-up.
            self.topup_checks.clear();
            self.balance_checks.clear();
            return executed;
        }
        // Automatic top-ups and balance alerts look at the balance a whole
        // command left (a renewal's expiry and grant, or several expiries,
        // pass through balances no reader ever sees). The alert first: it is
        // what a top-up it starts answers.
        self.check_balance_alerts().map_err(Failure::Fatal)?;
        self.check_topups().map_err(Failure::Fatal)?;
        executed
    }

    fn apply_command(
        &mut self,
        command: &Command,
        hash: &[u8],
        actor: Option<&str>,
    ) -> Result<Executed, Failure> {
        let Some((kind, id)) = command.operation_key() else {
            let result = match command {
                Command::Tick => self.tick().map_err(Failure::Fatal)?,
                _ => match self.perform(command, actor) {
                    Ok((outcome, _)) => outcome,
                    Err(Failure::Refused(error)) => {
                        return Err(Failure::Store(refusal_to_store_error(&error)))
                    }
                    Err(Failure::Rejected(refusal)) => {
                        return Err(Failure::Store(StoreError::Rejected(refusal)))
                    }
                    Err(other) => return Err(other),
                },
            };
            return Ok(Executed {
                result: Ok(result),
                replayed: std::mem::take(&mut self.already_done),
            });
        };
        if let Some((_, stored_hash, response)) = self.find_operation(kind, id)? {
            if stored_hash != *hash {
                let error = if kind == "hold_resolution" {
                    StoreError::HoldAlreadyResolved(id.to_string())
                } else if kind == "topup_resolution" {
                    StoreError::Rejected(Refusal {
                        code: "topup_not_pending".into(),
                        message: format!("top-up {id} is already resolved"),
                        available: None,
                    })
                } else {
                    StoreError::IdempotencyConflict(id.to_string())
                };
                return Err(Failure::Store(error));
            }
            let result: Result<Outcome, Refusal> = serde_json::from_str(&response)
                .map_err(|_| Failure::Fatal(db::Error::Corrupt("a stored answer".into())))?;
            return Ok(Executed {
                result,
                replayed: true,
            });
        }
        // A usage event and a single charge are both charges, and a refund
        // names either by its id: one id is one of them, or a second request
        // would charge again under an id already charged (and only one of the
        // two could ever be refunded).
        let other = match kind {
            "charge" => Some(("event", "a usage event's")),
            "event" => Some(("charge", "a charge's")),
            _ => None,
        };
        if let Some((other, whose)) = other {
            if self.find_operation(other, id)?.is_some() {
                return Err(Failure::Store(StoreError::IdempotencyConflict(format!(
                    "{id} ({whose})"
                ))));
            }
        }
        if let Command::Event(event) = command {
            return self.apply_event(event, hash, actor);
        }
        let (result, charge) = match self.perform(command, actor) {
            Ok((outcome, charge)) => (Ok(outcome), charge),
            Err(Failure::Refused(error)) => {
                let refusal = Refusal::from(&error);
                let permanent = !RESOLUTIONS.contains(&kind)
                    && !matches!(
                        error,
                        LedgerError::GrantNotFound(_) | LedgerError::HoldNotFound(_)
                    );
                if !permanent {
                    return Err(Failure::Store(refusal_to_store_error(&error)));
                }
                (Err(refusal), None)
            }
            // A refused capture or release leaves the hold to be resolved later.
            Err(Failure::Rejected(refusal)) if RESOLUTIONS.contains(&kind) => {
                return Err(Failure::Store(StoreError::Rejected(refusal)))
            }
            Err(Failure::Rejected(refusal)) => (Err(refusal), None),
            // What the command names does not exist (the customer, the
            // plan, the pack...): kept as the id's outcome like any refusal,
            // so that a retry after it was created still fails the same way
            // (API.md: an id whose first attempt failed keeps failing the
            // same way). Not for a capture, release or top-up resolution,
            // whose id is the hold's or top-up's own, nor for a refund: the
            // charge it names may be a usage event still on its way from a
            // stream, and the refund's retry must work once it is charged.
            Err(Failure::Store(StoreError::NotFound(what)))
                if !RESOLUTIONS.contains(&kind) && kind != "refund" =>
            {
                (
                    Err(Refusal {
                        code: "not_found".into(),
                        message: format!("{what} not found"),
                        available: None,
                    }),
                    None,
                )
            }
            Err(other) => return Err(other),
        };
        self.insert_operation(kind, id, hash, &result, charge)?;
        Ok(Executed {
            result,
            replayed: false,
        })
    }

    /// The stored request hash and answer of `(kind, id)`, with its row.
    fn find_operation(&self, kind: &str, id: &Id) -> db::Result<Option<(i64, Vec<u8>, String)>> {
        let fingerprint = self.operations.fingerprint(kind, id.as_str());
        for sequence in self.operations.candidates(fingerprint) {
            let (stored_kind, stored_id, hash, response): (String, String, Vec<u8>, String) = self
                .connection
                .prepare_cached(
                    "SELECT kind, id, request_hash, response FROM operations WHERE sequence = ?1",
                )?
                .query_row([sequence], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                })?;
            if stored_kind == kind && stored_id == id.as_str() {
                return Ok(Some((sequence, hash, response)));
            }
        }
        Ok(None)
    }

    fn insert_operation(
        &mut self,
        kind: &str,
        id: &Id,
        hash: &[u8],
        result: &Result<Outcome, Refusal>,
        charge: Option<ChargeColumns>,
    ) -> db::Result<()> {
        let response = serde_json::to_string(result).expect("outcome serializes");
        let (customer_id, amount, feature) = match &charge {
            Some(c) => (
                Some(c.customer_id.as_str()),
                Some(c.amount),
                c.feature.as_deref(),
            ),
            None => (None, None, None),
        };
        // Deferred: set-based with the group's other operations on PostgreSQL.
        self.connection.defer(
            db::Shape::Insert,
            INSERT_OPERATION,
            params![
                self.next_operation_sequence,
                kind,
                id.as_str(),
                hash,
                result.is_ok(),
                response,
                customer_id,
                amount,
                0i64,
                feature,
                self.now.micros()
            ],
        )?;
        let sequence = self.next_operation_sequence;
        self.next_operation_sequence += 1;
        let fingerprint = self.operations.fingerprint(kind, id.as_str());
        self.operations.add(fingerprint, sequence);
        Ok(())
    }

    /// Load a customer's ledger into the cache (if needed) and apply what is due.
    fn prepare(&mut self, customer_id: &Id) -> Result<(), Failure> {
        self.load(customer_id)?;
        self.renew_due(customer_id)?;
        let now = self.now;
        let due = self.ledger(customer_id).expire_due(now);
        for draft in &due {
            self.record_entry(draft, None)?;
        }
        self.touched.insert(customer_id.clone());
        Ok(())
    }

    /// Load a customer's ledger into the cache, if it is not there yet.
    fn load(&mut self, customer_id: &Id) -> Result<(), Failure> {
        if !self.cache.contains_key(customer_id) {
            let Some((
                rows::LoadedLedger {
                    ledger,
                    customer,
                    head,
                    ..
                },
                settings,
                // What the last entry reported: lots that expired since but
                // are not swept yet still count, so their expiry crosses
                // thresholds.
                last_net,
            )) = rows::load_ledger_with_settings(&self.connection, customer_id)?
            else {
                return Err(Failure::Store(StoreError::NotFound(format!(
                    "customer {customer_id}"
                ))));
            };
            let stored = ledger
                .grants()
                .iter()
                .map(|g| (g.id.clone(), rows::lifecycle(g)))
                .collect();
            self.cache.insert(
                customer_id.clone(),
                Cached {
                    ledger,
                    head,
                    head_changed: false,
                    stored,
                    plan: customer.plan,
                    region: customer.region,
                    plan_history: settings.plan_history,
                    subscription: settings.subscription,
                    overage_override: settings.overage_override,
                    alerts: settings.alerts,
                    last_net,
                    auto: settings.auto_topup,
                },
            );
            self.refresh_overage(customer_id);
        }
        Ok(())
    }

    /// Note that `grant`'s rows were just written as it is now.
    fn stored(&mut self, customer_id: &Id, grant: &Grant) {
        self.cache
            .get_mut(customer_id)
            .expect("prepared")
            .stored
            .insert(grant.id.clone(), rows::lifecycle(grant));
        list_expiring(
            &mut self.expiring_recent,
            &grant.id,
            grant.expires_at,
            self.now,
        );
    }

    fn ledger(&mut self, customer_id: &Id) -> &mut CustomerLedger {
        &mut self.cache.get_mut(customer_id).expect("prepared").ledger
    }

    /// Append a journal entry; returns its sequence number.
    fn record_entry(&mut self, draft: &EntryDraft, actor: Option<&str>) -> db::Result<i64> {
        self.record_priced_entry(draft, actor, None)
    }

    /// Append a journal entry with what priced it.
    fn record_priced_entry(
        &mut self,
        draft: &EntryDraft,
        actor: Option<&str>,
        pricing: Option<&Pricing>,
    ) -> db::Result<i64> {
        self.record_entry_with(draft, actor, pricing, None)
    }

    /// Append a journal entry with what it is about beyond its postings.
    fn record_entry_about(
        &mut self,
        draft: &EntryDraft,
        actor: Option<&str>,
        facts: crate::model::EntryFacts,
    ) -> db::Result<i64> {
        self.record_entry_with(draft, actor, None, Some(&facts))
    }

    fn record_entry_with(
        &mut self,
        draft: &EntryDraft,
        actor: Option<&str>,
        pricing: Option<&Pricing>,
        facts: Option<&crate::model::EntryFacts>,
    ) -> db::Result<i64> {
        let recorded = self.now.micros().max(self.last_recorded_micros + 1);
        self.last_recorded_micros = recorded;
        let sequence = self.next_entry_sequence;
        self.next_entry_sequence += 1;
        let cached = self
            .cache
            .get_mut(&draft.customer_id)
            .expect("entries are for prepared customers");
        let previous = cached.head.replace(sequence);
        cached.head_changed = true;
        let before = std::mem::replace(&mut cached.last_net, draft.balance_after);
        let auto_topup = cached.auto.is_some();
        rows::insert_entry(
            &self.connection,
            sequence,
            draft,
            actor,
            Timestamp(recorded),
            previous,
            (pricing, facts),
        )?;
        self.after_entry(draft, sequence, Timestamp(recorded), before, auto_topup)?;
        Ok(sequence)
    }

    fn perform(
        &mut self,
        command: &Command,
        actor: Option<&str>,
    ) -> Result<(Outcome, Option<ChargeColumns>), Failure> {
        let now = self.now;
        match command {
            Command::CreateCustomer(customer) => Ok((self.create_customer(customer)?, None)),
            Command::Grant(grant) => Ok((self.grant(grant, actor)?, None)),
            Command::Charge(charge) => {
                self.prepare(&charge.customer_id)?;
                let pricing = match &charge.usage {
                    Some(usage) => Some(self.price_use(&charge.customer_id, usage, now)?),
                    None => None,
                };
                let amount = pricing
                    .as_ref()
                    .map(|p| p.cost)
                    .or(charge.amount)
                    .ok_or(Failure::Refused(LedgerError::AmountNotPositive))?;
                let spend = Spend {
                    reference: charge.id.clone(),
                    amount,
                    feature: charge.feature.clone(),
                    member_id: charge.member_id.clone(),
                    reason: charge.reason.clone(),
                };
                let (drawn, draft) = self.spend(&charge.customer_id, &spend, now, false)?;
                let entry_id = self.record_priced_entry(&draft, actor, pricing.as_ref())?;
                let columns = ChargeColumns {
                    customer_id: charge.customer_id.clone(),
                    amount: amount.micros(),
                    feature: charge.feature.clone(),
                };
                let outcome = Outcome::Charge(ChargeOutcome {
                    id: charge.id.clone(),
                    customer_id: charge.customer_id.clone(),
                    amount,
                    drawn,
                    balance_after: draft.balance_after,
                    entry_id,
                    feature: charge.feature.clone(),
                    member_id: charge.member_id.clone(),
                    pricing,
                    on_debt: draft.debt_drawn(),
                });
                Ok((outcome, Some(columns)))
            }
            Command::Hold(hold) => Ok((self.hold(hold, actor)?, None)),
            Command::Capture {
                hold_id,
                amount,
                quantity,
                reason,
            } => self.capture(hold_id, *amount, *quantity, reason.clone(), actor),
            Command::Release { hold_id, reason } => {
                Ok((self.release(hold_id, reason.clone(), actor)?, None))
            }
            Command::Refund(refund) => Ok((self.refund(refund, actor)?, None)),
            Command::Void {
                id,
                grant_id,
                reason,
            } => {
                let customer_id = self.grant_customer(grant_id)?;
                self.prepare(&customer_id)?;
                let ledger = self.ledger(&customer_id);
                let lot = ledger
                    .grant(grant_id)
                    .map(|g| (g.root().clone(), g.cost_basis.clone()));
                let (voided, draft) = ledger
                    .void(grant_id, id, Some(reason.clone()), now)
                    .map_err(Failure::Refused)?;
                let facts = crate::model::EntryFacts {
                    grant_id: Some(grant_id.to_string()),
                    ..Default::default()
                };
                let entry_id = self.record_entry_about(&draft, actor, facts)?;
                let paid = voided.refundable_money.is_some();
                let exact = match (&lot, paid) {
                    (Some((root, Some(basis))), true) => {
                        self.purchase_refund(root, voided.voided, basis)?
                    }
                    _ => None,
                };
                let refundable_money = exact.or(voided.refundable_money);
                Ok((
                    Outcome::Void(VoidOutcome {
                        id: id.clone(),
                        grant_id: grant_id.clone(),
                        customer_id,
                        voided: voided.voided,
                        refundable_money,
                        balance_after: draft.balance_after,
                        entry_id,
                    }),
                    None,
                ))
            }
            Command::ChangeExpiry {
                id,
                grant_id,
                expires_at,
                reason,
            } => {
                let customer_id = self.grant_customer(grant_id)?;
                self.prepare(&customer_id)?;
                let (before, expired_at) = self
                    .ledger(&customer_id)
                    .grant(grant_id)
                    .map_or((None, None), |g| (g.expires_at, g.expired_at));
                let (reinstated, draft) = self
                    .ledger(&customer_id)
                    .change_expiry(grant_id, *expires_at, id, Some(reason.clone()), now)
                    .map_err(Failure::Refused)?;
                let facts = crate::model::EntryFacts {
                    grant_id: Some(grant_id.to_string()),
                    expiry: Some(crate::model::ExpiryFacts {
                        before,
                        after: *expires_at,
                        expired_at,
                    }),
                    ..Default::default()
                };
                let entry_id = self.record_entry_about(&draft, actor, facts)?;
                // A lot warned about before its old expiry is warned again
                // ahead of the new one (`grant.expiring` is once per expiry).
                self.connection
                    .prepare_cached("DELETE FROM expiring_notices WHERE grant_id = ?1")?
                    .execute([grant_id.as_str()])?;
                list_expiring(&mut self.expiring_recent, grant_id, *expires_at, now);
                Ok((
                    Outcome::Expiry(ExpiryOutcome {
                        id: id.clone(),
                        grant_id: grant_id.clone(),
                        customer_id,
                        expires_at: *expires_at,
                        reinstated,
                        balance_after: draft.balance_after,
                        entry_id,
                    }),
                    None,
                ))
            }
            Command::CreateApiKey {
                id,
                key_hash,
                scope,
            } => {
                // Keys created by the CLI have no operation row, only a key row.
                self.ensure_unused("api_keys", id)?;
                self.connection
                    .prepare_cached("INSERT INTO api_keys (id, key_hash, scope, created_at) VALUES (?1, ?2, ?3, ?4)")?
                    .execute(params![id.as_str(), key_hash, scope, now.micros()])?;
                Ok((
                    Outcome::ApiKey {
                        id: id.clone(),
                        scope: scope.clone(),
                    },
                    None,
                ))
            }
            Command::Tick => unreachable!("tick has no operation key"),
            Command::SetOverage {
                customer_id,
                overage,
            } => Ok((self.set_overage(customer_id, *overage)?, None)),
            Command::PutFeature { key, name, unit } => Ok((
                self.put_feature(key, name, unit).map_err(Failure::Fatal)?,
                None,
            )),
            Command::CreatePricebook { id, from } => {
                Ok((self.create_pricebook(id, from.as_deref(), actor)?, None))
            }
            Command::PutRules { id, rules } => Ok((self.put_rules(id, rules)?, None)),
            Command::Publish { id, effective_at } => {
                Ok((self.publish(id, *effective_at, actor)?, None))
            }
            Command::PutContract {
                customer_id,
                contract,
                lock_rates,
                ..
            } => Ok((
                self.put_contract(customer_id, contract, *lock_rates, actor)?,
                None,
            )),
            Command::Quote {
                customer_id,
                usage,
                member_id,
            } => Ok((self.quote(customer_id, usage, member_id.as_ref())?, None)),
            Command::PutPlan(plan) => Ok((self.put_plan(plan, actor)?, None)),
            Command::Subscribe(request) => Ok((self.subscribe(request, actor)?, None)),
            Command::CancelSubscription {
                customer_id,
                at_period_end,
            } => Ok((
                self.cancel_subscription(customer_id, *at_period_end, actor)?,
                None,
            )),
            Command::ApplyDue { customer_id } => {
                let before = self.next_entry_sequence;
                self.prepare(customer_id)?;
                let entries = usize::try_from(self.next_entry_sequence - before).unwrap_or(0);
                Ok((Outcome::Tick { entries }, None))
            }
            Command::PutAlerts {
                customer_id,
                alerts,
            } => Ok((self.put_alerts(customer_id, alerts)?, None)),
            Command::Transfer(request) => Ok((self.transfer(request, actor)?, None)),
            Command::PutMember {
                customer_id,
                member_id,
                name,
                budget,
            } => {
                self.prepare(customer_id)?;
                let ledger = self.ledger(customer_id);
                let current = ledger.members().find(|m| &m.id == member_id);
                let name = match name {
                    Some(name) => name.clone(),
                    None => current.and_then(|m| m.name.clone()),
                };
                let budget = match budget {
                    Some(budget) => *budget,
                    None => current.and_then(|m| m.budget),
                };
                let member = ledger.set_member(member_id, name, budget, now);
                Ok((Outcome::Member(member), None))
            }
            Command::CreateWebhookEndpoint(endpoint) => {
                Ok((self.create_webhook_endpoint(endpoint)?, None))
            }
            Command::UpdateWebhookEndpoint { id, url, events } => Ok((
                self.update_webhook_endpoint(id, url.as_deref(), events.as_deref())?,
                None,
            )),
            Command::DeleteWebhookEndpoint { id } => Ok((self.delete_webhook_endpoint(id)?, None)),
            Command::RotateWebhookSecret {
                endpoint_id,
                secret,
                previous_valid_seconds,
                ..
            } => Ok((
                self.rotate_webhook_secret(endpoint_id, secret, *previous_valid_seconds)?,
                None,
            )),
            Command::UpdateCustomer(update) => Ok((self.update_customer(update)?, None)),
            Command::RevokeApiKey { id } => {
                match rows::revoke_api_key(&self.connection, id.as_str(), now)? {
                    Some(key) => Ok((Outcome::ApiKeyInfo(key), None)),
                    None => Err(Failure::Store(StoreError::NotFound(format!(
                        "API key {id}"
                    )))),
                }
            }
            Command::RecordDelivery {
                delivery_id,
                ok,
                status,
                error,
            } => Ok((
                self.record_delivery(delivery_id, *ok, *status, error.as_deref())?,
                None,
            )),
            Command::PutCreditPack(pack) => Ok((self.put_credit_pack(pack)?, None)),
            Command::CreateTopup(request) => Ok((self.create_topup(request)?, None)),
            Command::ConfirmTopup {
                topup_id,
                payment_reference,
            } => Ok((
                self.confirm_topup(topup_id, payment_reference.as_deref(), actor)?,
                None,
            )),
            Command::FailTopup { topup_id, reason } => {
                Ok((self.fail_topup(topup_id, reason)?, None))
            }
            Command::PutAutoTopup {
                customer_id,
                config,
            } => Ok((self.put_auto_topup(customer_id, config)?, None)),
            Command::Event(_) => unreachable!("events are applied by apply_event"),
            Command::DeadLetter(letter) => {
                Ok((Outcome::DeadLetter(self.dead_letter(letter)?), None))
            }
            Command::ResolveDeadLetter {
                dead_letter,
                resolution,
                note,
            } => Ok((
                self.resolve_dead_letter(*dead_letter, *resolution, note.as_deref())?,
                None,
            )),
        }
    }

    fn create_customer(&mut self, customer: &NewCustomer) -> Result<Outcome, Failure> {
        let exists = rows::customer(&self.connection, customer.id.as_str())?.is_some();
        if exists {
            return Err(Failure::Store(StoreError::IdempotencyConflict(
                customer.id.to_string(),
            )));
        }
        let overage = customer.overage.unwrap_or_default();
        self.connection
            .prepare_cached(
                "INSERT INTO customers (id, name, plan, region, currency, metadata, created_at, overage) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                customer.id.as_str(),
                customer.name,
                customer.plan,
                customer.region,
                customer.currency,
                customer.metadata,
                self.now.micros(),
                overage_column(customer.overage),
            ])?;
        // The new customer has nothing else yet (no lots, holds, members,
        // subscription, alerts, top-up or entries, and customers are never
        // deleted, so nothing is left from an earlier one): its ledger goes
        // into the cache as `load` would read it back, which saves its first
        // command the reads of a customer not cached (five round trips on
        // PostgreSQL). A rollback of the group clears the cache.
        self.cache.insert(
            customer.id.clone(),
            Cached {
                ledger: CustomerLedger::new(customer.id.clone()),
                head: None,
                head_changed: false,
                stored: FastMap::default(),
                plan: customer.plan.clone(),
                region: customer.region.clone(),
                plan_history: crate::model::PlanHistory::default(),
                subscription: None,
                overage_override: customer.overage,
                alerts: None,
                last_net: tally_core::Amount::ZERO,
                auto: None,
            },
        );
        self.refresh_overage(&customer.id);
        Ok(Outcome::Customer(CustomerRecord {
            id: customer.id.clone(),
            name: customer.name.clone(),
            plan: customer.plan.clone(),
            region: customer.region.clone(),
            currency: customer.currency.clone(),
            metadata: customer.metadata.clone(),
            created_at: self.now,
            overage,
        }))
    }

    /// Change a customer's name, plan, region or metadata. The plan follows
    /// a subscription while there is one (refused here); a new plan prices
    /// what happens from now on (a late event by the plan at its time), a
    /// new region everything priced from now on.
    fn update_customer(
        &mut self,
        update: &crate::model::CustomerUpdate,
    ) -> Result<Outcome, Failure> {
        let customer_id = &update.customer_id;
        self.load(customer_id)?;
        let now = self.now;
        let mut record = rows::customer(&self.connection, customer_id.as_str())?
            .expect("the customer was just loaded");
        let cached = self.cache.get_mut(customer_id).expect("loaded");
        if let Some(plan) = &update.plan {
            if let Some(subscription) = &cached.subscription {
                return Err(Failure::Rejected(Refusal {
                    code: "plan_set_by_subscription".into(),
                    message: format!(
                        "customer {customer_id}'s plan follows its subscription {} (plan {}); change the subscription (PUT /v1/customers/{customer_id}/subscription) instead",
                        subscription.id, subscription.plan
                    ),
                    available: None,
                }));
            }
            if *plan != cached.plan {
                cached
                    .plan_history
                    .change(now, cached.plan.clone(), plan.clone());
                cached.plan = plan.clone();
            }
        }
        if let Some(region) = &update.region {
            cached.region = region.clone();
        }
        let changed = |field: &Option<Option<String>>, old: &mut Option<String>| {
            if let Some(new) = field {
                *old = new.clone();
            }
        };
        changed(&update.name, &mut record.name);
        changed(&update.metadata, &mut record.metadata);
        record.plan = cached.plan.clone();
        record.region = cached.region.clone();
        let history = serde_json::to_string(&cached.plan_history).expect("history serializes");
        self.connection
            .prepare_cached(
                "UPDATE customers SET name = ?1, plan = ?2, plan_history = ?3, region = ?4, \
                 metadata = ?5 WHERE id = ?6",
            )?
            .execute(params![
                record.name,
                record.plan,
                history,
                record.region,
                record.metadata,
                customer_id.as_str()
            ])?;
        Ok(Outcome::Customer(record))
    }

    /// Set a customer's overage policy, or remove it (`None`: its plan's,
    /// else block, governs again); the debt already owed stays owed.
    fn set_overage(
        &mut self,
        customer_id: &Id,
        overage: Option<tally_core::OveragePolicy>,
    ) -> Result<Outcome, Failure> {
        let changed = self
            .connection
            .prepare_cached("UPDATE customers SET overage = ?1 WHERE id = ?2")?
            .execute(params![overage_column(overage), customer_id.as_str()])?;
        if changed == 0 {
            return Err(Failure::Store(StoreError::NotFound(format!(
                "customer {customer_id}"
            ))));
        }
        if let Some(cached) = self.cache.get_mut(customer_id) {
            cached.overage_override = overage;
        }
        self.refresh_overage(customer_id);
        let record = rows::customer(&self.connection, customer_id.as_str())?
            .expect("the customer was just updated");
        Ok(Outcome::Customer(record))
    }

    /// A grant, hold or API key id used by no row yet (ids of derived rows, like refund
    /// grants, share the namespace of client-chosen ones).
    fn ensure_unused(&self, table: &'static str, id: &Id) -> Result<(), Failure> {
        let sql = match table {
            "grants" => "SELECT EXISTS(SELECT 1 FROM grants WHERE id = ?1)",
            "holds" => "SELECT EXISTS(SELECT 1 FROM holds WHERE id = ?1)",
            "api_keys" => "SELECT EXISTS(SELECT 1 FROM api_keys WHERE id = ?1)",
            other => unreachable!("no id check for table {other}"),
        };
        let taken: bool = self
            .connection
            .prepare_cached(sql)?
            .query_row([id.as_str()], |row| row.get(0))?;
        if taken {
            return Err(Failure::Store(StoreError::IdempotencyConflict(
                id.to_string(),
            )));
        }
        Ok(())
    }

    fn grant(&mut self, request: &NewGrant, actor: Option<&str>) -> Result<Outcome, Failure> {
        self.ensure_unused("grants", &request.id)?;
        self.prepare(&request.customer_id)?;
        let now = self.now;
        // The ledger is not backdated: a grant that said it took effect
        // yesterday counted from now in the ledger, and the two disagreed
        // about yesterday's balance. A client's "now", a little behind the
        // engine's by the time it is applied (latency, forwarding, clocks a
        // little apart), is now.
        let effective_at = match request.effective_at {
            Some(at) if now.micros().saturating_sub(at.micros()) > PAST_AS_NOW => {
                return Err(Failure::Rejected(Refusal {
                    code: "invalid_request".into(),
                    message: format!(
                        "effective_at must not be in the past (the engine's clock is at {}): \
                         the ledger is never backdated; leave effective_at out for now",
                        now.rfc3339()
                    ),
                    available: None,
                }));
            }
            Some(at) => at.max(now),
            None => now,
        };
        let grant = Grant {
            id: request.id.clone(),
            customer_id: request.customer_id.clone(),
            amount: request.amount,
            remaining: request.amount,
            source: request.source,
            paid: request.paid,
            cost_basis: request.cost_basis.clone(),
            priority: request.priority,
            effective_at,
            expires_at: request.expires_at,
            scope: request.scope.clone(),
            status: GrantStatus::Active,
            expired_amount: tally_core::Amount::ZERO,
            expired_at: None,
            sequence: self.next_grant_sequence,
            awaiting_effect: false,
            origin: None,
        };
        let draft = self
            .ledger(&request.customer_id)
            .add_grant(grant.clone(), request.reason.clone(), now)
            .map_err(Failure::Refused)?;
        self.next_grant_sequence += 1;
        // As the ledger holds it now: a grant that repaid debt has less remaining.
        let grant = self
            .ledger(&request.customer_id)
            .grant(&grant.id)
            .expect("just added")
            .clone();
        let record = GrantRecord {
            grant,
            metadata: request.metadata.clone(),
            external_reference: request.external_reference.clone(),
            created_at: now,
        };
        rows::insert_grant(&self.connection, &record.grant, Some(&record), now)?;
        self.stored(&request.customer_id, &record.grant);
        let entry_id = self.record_entry(&draft, actor)?;
        Ok(Outcome::Grant {
            grant: record,
            balance_after: draft.balance_after,
            entry_id,
        })
    }

    fn hold(&mut self, request: &NewHold, actor: Option<&str>) -> Result<Outcome, Failure> {
        self.ensure_unused("holds", &request.id)?;
        self.prepare(&request.customer_id)?;
        let now = self.now;
        let expires_at = now
            .plus_seconds(request.timeout_seconds)
            .ok_or(Failure::Refused(LedgerError::InvalidExpiry(
                "timeout_seconds is too large",
            )))?;
        let pricing = match &request.usage {
            Some(usage) => Some(self.price_use(&request.customer_id, usage, now)?),
            None => None,
        };
        let amount = pricing
            .as_ref()
            .map(|p| p.cost)
            .or(request.amount)
            .ok_or(Failure::Refused(LedgerError::AmountNotPositive))?;
        if amount.is_zero() {
            return Err(Failure::Rejected(Refusal {
                code: "invalid_request".into(),
                message:
                    "this usage costs 0 credits, so there is nothing to hold; charge it instead"
                        .into(),
                available: None,
            }));
        }
        let spend = Spend {
            reference: request.id.clone(),
            amount,
            feature: request.feature.clone(),
            member_id: request.member_id.clone(),
            reason: request.reason.clone(),
        };
        let placed = self
            .ledger(&request.customer_id)
            .place_hold(&spend, expires_at, now);
        let (hold, draft) = match placed {
            Ok(placed) => placed,
            Err(error) => return Err(self.refused(&request.customer_id, error)),
        };
        rows::upsert_hold(&self.connection, &hold)?;
        if let Some(pricing) = &pricing {
            catalog::save_hold_pricing(&self.connection, hold.id.as_str(), pricing)?;
        }
        let entry_id = self.record_priced_entry(&draft, actor, pricing.as_ref())?;
        Ok(Outcome::Hold(HoldOutcome {
            hold,
            balance_after: draft.balance_after,
            entry_id,
            pricing,
        }))
    }

    /// Find an active hold's customer and make sure it is still active now.
    fn active_hold_customer(&mut self, hold_id: &Id) -> Result<Id, Failure> {
        let Some(stored) = rows::hold_by_id(&self.connection, hold_id.as_str())? else {
            return Err(Failure::Store(StoreError::NotFound(format!(
                "hold {hold_id}"
            ))));
        };
        match stored.status {
            HoldStatus::Active => {}
            HoldStatus::Expired => {
                return Err(Failure::Refused(LedgerError::HoldExpired(hold_id.clone())))
            }
            _ => {
                return Err(Failure::Store(StoreError::HoldAlreadyResolved(
                    hold_id.to_string(),
                )))
            }
        }
        self.prepare(&stored.customer_id)?;
        if self
            .ledger(&stored.customer_id)
            .active_hold(hold_id)
            .is_none()
        {
            return Err(Failure::Refused(LedgerError::HoldExpired(hold_id.clone())));
        }
        Ok(stored.customer_id)
    }

    fn capture(
        &mut self,
        hold_id: &Id,
        amount: Option<tally_core::Amount>,
        quantity: Option<tally_core::Amount>,
        reason: Option<String>,
        actor: Option<&str>,
    ) -> Result<(Outcome, Option<ChargeColumns>), Failure> {
        let customer_id = self.active_hold_customer(hold_id)?;
        let now = self.now;
        let locked = catalog::hold_pricing(&self.connection, hold_id.as_str())?;
        let held = self
            .cache
            .get(&customer_id)
            .and_then(|c| c.ledger.active_hold(hold_id))
            .map(|h| h.amount);
        let refuse = |message: String| {
            Failure::Rejected(Refusal {
                code: "capture_exceeds_hold".into(),
                message,
                available: None,
            })
        };
        let (amount, pricing) = match (amount, quantity, locked) {
            (_, Some(quantity), Some(locked)) => {
                if quantity > locked.quantity {
                    return Err(refuse(format!(
                        "capture of {quantity} units exceeds the {} units held",
                        locked.quantity
                    )));
                }
                let mut pricing = locked.reprice(quantity).map_err(pricing_refusal)?;
                // Fewer units can cost more under volume tiers: the hold's
                // amount is the most its usage is charged.
                if let Some(held) = held.filter(|held| *held < pricing.cost) {
                    pricing.uncapped = Some(pricing.cost);
                    pricing.cost = held;
                }
                (Some(pricing.cost), Some(pricing))
            }
            (_, Some(_), None) => {
                return Err(Failure::Rejected(Refusal {
                    code: "invalid_request".into(),
                    message: format!(
                        "hold {hold_id} was placed for an amount, not a feature and quantity: capture an amount"
                    ),
                    available: None,
                }))
            }
            // An explicit amount: the entry keeps the version and rule the
            // hold locked, and says the amount was given rather than priced.
            (amount, None, locked) => {
                let pricing = locked.map(|mut l| {
                    if let Some(a) = amount.filter(|a| *a != l.cost) {
                        l.cost = a;
                        l.by_amount = true;
                    }
                    l
                });
                (amount, pricing)
            }
        };
        let ledger = self.ledger(&customer_id);
        let feature = ledger.active_hold(hold_id).and_then(|h| h.feature.clone());
        let (captured, draft) = ledger
            .capture(hold_id, amount, reason, now)
            .map_err(Failure::Refused)?;
        // A full capture of a priced hold keeps the price and quantity it
        // locked, and its entry names the lots it spent from.
        let facts = crate::model::EntryFacts {
            spent_from: captured
                .drawn
                .iter()
                .map(|d| d.grant_id.to_string())
                .collect(),
            ..Default::default()
        };
        let entry_id = self.record_entry_with(&draft, actor, pricing.as_ref(), Some(&facts))?;
        let columns = ChargeColumns {
            customer_id: customer_id.clone(),
            amount: captured.captured.micros(),
            feature,
        };
        let outcome = Outcome::Capture(CaptureOutcome {
            hold_id: hold_id.clone(),
            customer_id,
            captured: captured.captured,
            released: captured.released,
            drawn: captured.drawn,
            balance_after: draft.balance_after,
            entry_id,
            pricing,
            on_debt: draft.debt_drawn(),
        });
        Ok((outcome, Some(columns)))
    }

    fn release(
        &mut self,
        hold_id: &Id,
        reason: Option<String>,
        actor: Option<&str>,
    ) -> Result<Outcome, Failure> {
        let customer_id = self.active_hold_customer(hold_id)?;
        let now = self.now;
        let (released, draft) = self
            .ledger(&customer_id)
            .release(hold_id, reason, now)
            .map_err(Failure::Refused)?;
        let entry_id = self.record_entry(&draft, actor)?;
        Ok(Outcome::Release(ReleaseOutcome {
            hold_id: hold_id.clone(),
            customer_id,
            released,
            balance_after: draft.balance_after,
            entry_id,
        }))
    }

    fn refund(&mut self, request: &NewRefund, actor: Option<&str>) -> Result<Outcome, Failure> {
        let (kind, charge_id) = match (&request.charge_id, &request.hold_id) {
            (Some(charge_id), None) => ("charge", charge_id),
            (None, Some(hold_id)) => ("hold_resolution", hold_id),
            _ => unreachable!("the server requires exactly one of charge_id and hold_id"),
        };
        let mut operation = self.find_operation(kind, charge_id)?;
        if operation.is_none() && kind == "charge" {
            // A usage event's charge is refunded by the event's id.
            operation = self.find_operation("event", charge_id)?;
        }
        let found = match operation {
            Some((sequence, _, _)) => self
                .connection
                .prepare_cached(
                    "SELECT customer_id, amount, response, refunded, feature, recorded_at FROM operations \
                     WHERE sequence = ?1 AND ok = 1 AND amount IS NOT NULL",
                )?
                .query_row([sequence], |row| {
                    Ok((
                        sequence,
                        row.get::<_, String>(0)?,
                        row.get::<_, i64>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, i64>(3)?,
                        row.get::<_, Option<String>>(4)?,
                        Timestamp(row.get::<_, i64>(5)?),
                    ))
                })
                .optional()?,
            None => None,
        };
        let Some((operation, customer_id, amount, response, refunded, feature, recorded_at)) =
            found
        else {
            let what = if kind == "charge" {
                "charge"
            } else {
                "captured hold"
            };
            return Err(Failure::Store(StoreError::NotFound(format!(
                "{what} {charge_id}"
            ))));
        };
        let customer_id = Id::derived(&customer_id);
        let (drawn, on_debt, member_id) = charged_draws(&response)
            .ok_or(Failure::Fatal(db::Error::Corrupt("a stored answer".into())))?;
        // Whose budget the spend counted against, and when: a charge or an
        // event when it was recorded; a captured hold when it was placed
        // (a hold counts against the budget at once).
        let spender = match (member_id, kind) {
            (Some(member_id), _) => Some((member_id, recorded_at)),
            (None, "hold_resolution") => self
                .connection
                .prepare_cached("SELECT member_id, created_at FROM holds WHERE id = ?1")?
                .query_row([charge_id.as_str()], |row| {
                    Ok((row.get::<_, Option<String>>(0)?, row.get::<_, i64>(1)?))
                })
                .optional()?
                .and_then(|(member, placed)| member.map(|m| (Id::derived(&m), Timestamp(placed)))),
            (None, _) => None,
        };
        let record = ChargeRecord {
            reference: charge_id.clone(),
            customer_id: customer_id.clone(),
            amount: tally_core::Amount::from_micros(amount).expect("stored amount"),
            drawn,
            refunded: tally_core::Amount::from_micros(refunded).expect("stored amount"),
            feature,
            on_debt,
        };
        self.prepare(&customer_id)?;
        let now = self.now;
        let mut next_sequence = self.next_grant_sequence;
        let (refunded_now, mut draft) = self
            .ledger(&customer_id)
            .refund(
                &record,
                &request.id,
                request.amount,
                Some(request.reason.clone()),
                &mut next_sequence,
                now,
            )
            .map_err(Failure::Refused)?;
        self.next_grant_sequence = next_sequence;
        // The refund belongs to the member the spend was attributed to (its
        // budget gets the credits back), and names what it gave back.
        draft.member_id = spender.as_ref().map(|(member_id, _)| member_id.clone());
        if let Some((member_id, spent_at)) = spender {
            self.ledger(&customer_id).refund_member_spend(
                &member_id,
                refunded_now.amount,
                spent_at,
                now,
            );
        }
        // Rows for grants the refund created, now, so that an id check later in
        // this group sees them.
        for grant_id in &refunded_now.new_grants {
            let grant = self
                .ledger(&customer_id)
                .grant(grant_id)
                .expect("refund created it")
                .clone();
            rows::insert_grant(&self.connection, &grant, None, now)?;
            self.stored(&customer_id, &grant);
        }
        self.connection
            .prepare_cached("UPDATE operations SET refunded = refunded + ?1 WHERE sequence = ?2")?
            .execute(params![refunded_now.amount.micros(), operation])?;
        let facts = crate::model::EntryFacts {
            refund_of: Some(charge_id.to_string()),
            refund_of_hold: Some(kind == "hold_resolution"),
            ..Default::default()
        };
        let entry_id = self.record_entry_about(&draft, actor, facts)?;
        Ok(Outcome::Refund(RefundOutcome {
            id: request.id.clone(),
            charge_id: charge_id.clone(),
            hold_id: (kind == "hold_resolution").then(|| charge_id.clone()),
            customer_id,
            amount: refunded_now.amount,
            returned: refunded_now.returned,
            new_grants: refunded_now.new_grants,
            balance_after: draft.balance_after,
            entry_id,
        }))
    }

    fn grant_customer(&self, grant_id: &Id) -> Result<Id, Failure> {
        let customer: Option<String> = self
            .connection
            .prepare_cached("SELECT customer_id FROM grants WHERE id = ?1")?
            .query_row([grant_id.as_str()], |row| row.get(0))
            .optional()?;
        if let Some(customer) = customer {
            return Ok(Id::derived(&customer));
        }
        // A lot the core made earlier in this group (a transfer's, a hold's
        // returned credits, a renewal's) has its row written when the group
        // is: it is in the ledger of a customer the group touched.
        // Only customers with lots not written yet are looked into.
        if let Some(customer) = self.touched.iter().find(|customer| {
            self.cache.get(*customer).is_some_and(|cached| {
                cached.ledger.grants().len() != cached.stored.len()
                    && !cached.stored.contains_key(grant_id)
                    && cached.ledger.grant(grant_id).is_some()
            })
        }) {
            return Ok(customer.clone());
        }
        // The ledger's own "no such lot", which is not kept as the id's
        // outcome: a void or expiry change sent before its lot's grant
        // works on a retry (README, ARCHITECTURE).
        Err(Failure::Refused(LedgerError::GrantNotFound(
            grant_id.clone(),
        )))
    }

    /// An event not seen before: charged and recorded under its id, or
    /// refused without being recorded (once the cause is fixed, a replay can
    /// still charge it; the caller keeps the refused event as a dead letter).
    fn apply_event(
        &mut self,
        event: &NewEvent,
        hash: &[u8],
        actor: Option<&str>,
    ) -> Result<Executed, Failure> {
        let refusal = match self.charge_event(event, actor) {
            Ok((outcome, columns)) => {
                let result = Ok(outcome);
                self.insert_operation("event", &event.id, hash, &result, Some(columns))?;
                // A dead letter of this event is settled by its charge: a
                // later delivery of the same event, not another customer's
                // event that reuses the id.
                if self.letter_events.remove(event.id.as_str()) {
                    self.connection
                        .prepare_cached(
                            "UPDATE dead_letters SET status = 'replayed', resolved_at = ?2, note = 'charged' \
                             WHERE key = ?1 AND status = 'pending' AND customer_id = ?3",
                        )?
                        .execute(params![
                            format!("event:{}", event.id),
                            self.now.micros(),
                            event.customer_id.as_str()
                        ])?;
                }
                return Ok(Executed {
                    result,
                    replayed: false,
                });
            }
            Err(Failure::Fatal(error)) => return Err(Failure::Fatal(error)),
            Err(Failure::Refused(error)) => Refusal::from(&error),
            Err(Failure::Rejected(refusal)) => refusal,
            Err(Failure::Store(error)) => store_error_refusal(&error),
        };
        Ok(Executed {
            result: Err(refusal),
            replayed: false,
        })
    }

    fn charge_event(
        &mut self,
        event: &NewEvent,
        actor: Option<&str>,
    ) -> Result<(Outcome, ChargeColumns), Failure> {
        let now = self.now;
        let at = event.timestamp.or(event.received_at).unwrap_or(now);
        let refuse = |code: &str, message: String| {
            Failure::Rejected(Refusal {
                code: code.into(),
                message,
                available: None,
            })
        };
        let window = self.options.event_window_seconds;
        if now.plus_seconds(-window).is_some_and(|oldest| at < oldest) {
            return Err(refuse(
                "event_too_old",
                format!(
                    "the event's timestamp is more than {window} seconds before the engine's clock"
                ),
            ));
        }
        if now
            .plus_seconds(crate::EVENT_FUTURE_SKEW_SECONDS)
            .is_some_and(|latest| at > latest)
        {
            return Err(refuse(
                "event_in_future",
                format!(
                    "the event's timestamp is more than {} seconds ahead of the engine's clock",
                    crate::EVENT_FUTURE_SKEW_SECONDS
                ),
            ));
        }
        self.prepare(&event.customer_id)?;
        let usage = UsageInput {
            feature: event.feature.clone(),
            quantity: event.quantity,
            properties: event.properties.clone(),
        };
        let pricing = self.price_use(&event.customer_id, &usage, at)?;
        let spend = Spend {
            reference: event.id.clone(),
            amount: pricing.cost,
            feature: Some(event.feature.clone()),
            member_id: event.member_id.clone(),
            reason: None,
        };
        let (drawn, draft) = self.spend(&event.customer_id, &spend, now, true)?;
        let entry_id = self.record_priced_entry(&draft, actor, Some(&pricing))?;
        let columns = ChargeColumns {
            customer_id: event.customer_id.clone(),
            amount: pricing.cost.micros(),
            feature: Some(event.feature.clone()),
        };
        Ok((
            Outcome::Event(EventOutcome {
                id: event.id.clone(),
                customer_id: event.customer_id.clone(),
                cost: pricing.cost,
                drawn,
                balance_after: draft.balance_after,
                entry_id,
                member_id: event.member_id.clone(),
                pricebook: pricing.pricebook().map(str::to_owned),
                rule: pricing.rule_label(),
                on_debt: draft.debt_drawn(),
            }),
            columns,
        ))
    }

    /// Keep an event that could not be charged; a repeat of the same event
    /// (or the same unreadable payload) counts as another attempt.
    fn dead_letter(&mut self, letter: &NewDeadLetter) -> db::Result<DeadLetterRecord> {
        // What a stream brought is kept whatever it holds, but PostgreSQL's
        // text cannot hold the NUL character (a message that held one was
        // refused by the database, and delivered again for ever): it is
        // kept as U+FFFD, on both stores alike.
        let clean = |text: &str| match text.contains('\0') {
            true => text.replace('\0', "\u{FFFD}"),
            false => text.to_owned(),
        };
        let letter = &NewDeadLetter {
            source: clean(&letter.source),
            event_id: letter.event_id.as_deref().map(clean),
            customer_id: letter.customer_id.as_deref().map(clean),
            payload: clean(&letter.payload),
            code: clean(&letter.code),
            message: clean(&letter.message),
        };
        if let Some(id) = &letter.event_id {
            self.letter_events.insert(id.clone());
        }
        let payload_key = || hex::encode(Sha256::digest(letter.payload.as_bytes()));
        let key = match &letter.event_id {
            Some(id) => {
                let key = format!("event:{id}");
                // A letter whose event was charged stays as it was settled:
                // the id is taken for good, so what is refused under it now
                // is another event (a conflict), kept as a letter of its own
                // (one per payload, so its redeliveries count as attempts).
                match rows::dead_letter_by_key(&self.connection, &key)? {
                    Some(settled) if settled.status == DeadLetterStatus::Replayed => {
                        format!("{key}:{}", &payload_key()[..32])
                    }
                    _ => key,
                }
            }
            None => format!("payload:{}", payload_key()),
        };
        let now = self.now.micros();
        // The letter of an event seen before is updated in place, and only a
        // new one is inserted: an insert that turns into an update would use
        // up a number of PostgreSQL's identity sequence, and the letters'
        // ids would drift from SQLite's.
        let updated = self
            .connection
            .prepare_cached(
                "UPDATE dead_letters SET payload = ?2, \
                 first_seen = CASE WHEN COALESCE(customer_id, '') = COALESCE(?4, '') \
                   THEN first_seen ELSE ?7 END, \
                 customer_id = ?4, source = ?1, code = ?5, message = ?6, attempts = attempts + 1, \
                 last_seen = ?7, status = 'pending', resolved_at = NULL, note = NULL WHERE key = ?3",
            )?
            .execute(params![
                letter.source,
                letter.payload,
                key,
                letter.customer_id,
                letter.code,
                letter.message,
                now
            ])?;
        if updated == 0 {
            self.connection
                .prepare_cached(
                    "INSERT INTO dead_letters (key, source, event_id, customer_id, payload, code, \
                     message, attempts, first_seen, last_seen, status) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 1, ?8, ?8, 'pending')",
                )?
                .execute(params![
                    key,
                    letter.source,
                    letter.event_id,
                    letter.customer_id,
                    letter.payload,
                    letter.code,
                    letter.message,
                    now
                ])?;
        }
        let record = rows::dead_letter_by_key(&self.connection, &key)?
            .expect("the dead letter was just written");
        Ok(record)
    }

    fn resolve_dead_letter(
        &mut self,
        id: i64,
        resolution: DeadLetterStatus,
        note: Option<&str>,
    ) -> Result<Outcome, Failure> {
        let Some(record) = rows::dead_letter(&self.connection, id)? else {
            return Err(Failure::Store(StoreError::NotFound(format!(
                "dead letter dl_{id}"
            ))));
        };
        if record.status != DeadLetterStatus::Pending {
            if record.status == resolution {
                self.already_done = true;
                return Ok(Outcome::DeadLetter(record));
            }
            return Err(Failure::Rejected(Refusal {
                code: "dead_letter_resolved".into(),
                message: format!("dead letter dl_{id} is already {}", record.status.as_str()),
                available: None,
            }));
        }
        self.connection
            .prepare_cached(
                "UPDATE dead_letters SET status = ?2, resolved_at = ?3, note = ?4 WHERE id = ?1",
            )?
            .execute(params![id, resolution.as_str(), self.now.micros(), note])?;
        let record = rows::dead_letter(&self.connection, id)?.expect("it exists");
        Ok(Outcome::DeadLetter(record))
    }

    /// Spend for a prepared customer: a charge, or, for usage priced at 0, an
    /// entry that records it without moving credits. `metered` usage (events)
    /// may go into debt under the `metered_only` overage policy.
    fn spend(
        &mut self,
        customer_id: &Id,
        spend: &Spend,
        now: Timestamp,
        metered: bool,
    ) -> Result<(Vec<Draw>, EntryDraft), Failure> {
        let ledger = self.ledger(customer_id);
        if spend.amount.is_zero() {
            return Ok((Vec::new(), ledger.free_use(spend, now)));
        }
        let result = if metered {
            ledger.charge_metered(spend, now)
        } else {
            ledger.charge(spend, now)
        };
        result.map_err(|error| self.refused(customer_id, error))
    }

    /// A spend the ledger refused: one refused for want of credits may start
    /// an automatic top-up (the balance may not have crossed the threshold
    /// by an entry, e.g. right after a failed payment).
    fn refused(&mut self, customer_id: &Id, error: LedgerError) -> Failure {
        if matches!(error, LedgerError::InsufficientCredits { .. }) {
            self.check_topup_later(customer_id);
        }
        Failure::Refused(error)
    }

    /// Price usage for a customer now, by the version in effect and its
    /// contract, without recording it (a quote).
    fn price(&self, customer_id: &Id, usage: &UsageInput) -> Result<Pricing, Failure> {
        self.price_at(customer_id, usage, self.now)
    }

    /// Price usage that happened at `at` and is being spent (a charge, a
    /// hold, an event): the instant counts as priced, so that a version
    /// published later takes effect after it (`Catalog::priced_through`).
    fn price_use(
        &mut self,
        customer_id: &Id,
        usage: &UsageInput,
        at: Timestamp,
    ) -> Result<Pricing, Failure> {
        let pricing = self.price_at(customer_id, usage, at)?;
        self.catalog.priced(at);
        Ok(pricing)
    }

    /// Price usage that happened at `at`.
    fn price_at(
        &self,
        customer_id: &Id,
        usage: &UsageInput,
        at: Timestamp,
    ) -> Result<Pricing, Failure> {
        if !self.catalog.features.contains_key(&usage.feature) {
            return Err(Failure::Rejected(Refusal {
                code: "unknown_feature".into(),
                message: format!(
                    "feature {} is not defined; create it with PUT /v1/features/{}",
                    usage.feature, usage.feature
                ),
                available: None,
            }));
        }
        // Usage is priced for a customer already loaded (prepared).
        let Some(customer) = self.cache.get(customer_id) else {
            return Err(Failure::Store(StoreError::NotFound(format!(
                "customer {customer_id}"
            ))));
        };
        let contract = self
            .catalog
            .contracts
            .get(customer_id.as_str())
            .and_then(|all| catalog::contract_at(all, at))
            .map(|c| &c.contract);
        let request = Usage {
            feature: &usage.feature,
            quantity: usage.quantity,
            properties: &usage.properties,
            // The plan it was on when the usage happened (a late event's);
            // usage now is priced by the present plan, whatever a clock
            // behind the last writer's says.
            plan: match at < self.now {
                true => customer.plan_history.at(at, customer.plan.as_deref()),
                false => customer.plan.as_deref(),
            },
            region: customer.region.as_deref(),
            at,
        };
        pricebook::price_usage(&self.catalog.published, None, contract, &request)
            .map_err(pricing_refusal)
    }

    fn put_feature(&mut self, key: &str, name: &str, unit: &str) -> db::Result<Outcome> {
        let now = self.now;
        let record = FeatureRecord {
            key: key.to_owned(),
            name: name.to_owned(),
            unit: unit.to_owned(),
            created_at: self.catalog.features.get(key).map_or(now, |f| f.created_at),
            updated_at: now,
        };
        catalog::upsert_feature(&self.connection, &record)?;
        self.catalog.features.insert(key.to_owned(), record.clone());
        Ok(Outcome::Feature(record))
    }

    fn create_pricebook(
        &mut self,
        id: &Id,
        from: Option<&str>,
        actor: Option<&str>,
    ) -> Result<Outcome, Failure> {
        if self.catalog.books.contains_key(id.as_str()) {
            return Err(Failure::Store(StoreError::IdempotencyConflict(
                id.to_string(),
            )));
        }
        let rules = match from {
            Some(from) => self
                .catalog
                .books
                .get(from)
                .ok_or_else(|| Failure::Store(StoreError::NotFound(format!("price book {from}"))))?
                .rules
                .clone(),
            None => Vec::new(),
        };
        // Each version is created after every other, by at least a microsecond, so that
        // the list's creation order is strict: two versions made in one group, on a frozen
        // manual clock or after a takeover by a server whose clock lags, still list in the
        // order they were made, and a new one always lists after the last page a client read.
        let after = self
            .catalog
            .books
            .values()
            .map(|b| b.created_at.micros())
            .max()
            .and_then(|last| last.checked_add(1))
            .unwrap_or(i64::MIN);
        let created_at = Timestamp(self.now.micros().max(after));
        let record = PricebookRecord {
            id: id.to_string(),
            status: PricebookStatus::Draft,
            copied_from: from.map(str::to_owned),
            rules,
            created_at,
            created_by: actor.map(str::to_owned),
            updated_at: created_at,
            effective_at: None,
            published_at: None,
            published_by: None,
            published_seq: None,
        };
        catalog::save_pricebook(&self.connection, &record)?;
        self.catalog.books.insert(record.id.clone(), record.clone());
        Ok(Outcome::Pricebook(record))
    }

    /// Rules must be well formed, unambiguous and name defined features.
    fn check_rules(&self, rules: &[tally_core::Rule], whose: &str) -> Result<(), Failure> {
        let mut problems: Vec<String> = match tally_core::pricing::validate(rules) {
            Ok(()) => Vec::new(),
            Err(found) => found.into_iter().map(|p| p.message).collect(),
        };
        for (index, rule) in rules.iter().enumerate() {
            if !rule.feature.trim().is_empty() && !self.catalog.features.contains_key(&rule.feature)
            {
                problems.push(format!(
                    "Rule {index} prices feature {}, which is not defined; create it with PUT /v1/features/{}.",
                    rule.feature, rule.feature
                ));
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(Failure::Rejected(Refusal {
            code: "invalid_rules".into(),
            message: format!("{whose} cannot be accepted: {}", problems.join(" ")),
            available: None,
        }))
    }

    fn draft(&self, id: &str) -> Result<&PricebookRecord, Failure> {
        let book = self
            .catalog
            .books
            .get(id)
            .ok_or_else(|| Failure::Store(StoreError::NotFound(format!("price book {id}"))))?;
        Ok(book)
    }

    fn put_rules(&mut self, id: &str, rules: &[tally_core::Rule]) -> Result<Outcome, Failure> {
        let book = self.draft(id)?;
        if book.status == PricebookStatus::Published {
            return Err(not_draft(id));
        }
        self.check_rules(rules, &format!("The rules of price book {id}"))?;
        let mut record = book.clone();
        record.rules = rules.to_vec();
        // Never before its creation, which may run a microsecond or more
        // ahead of the clock (see `create_pricebook`).
        record.updated_at = self.now.max(record.created_at);
        catalog::save_pricebook(&self.connection, &record)?;
        self.catalog.books.insert(record.id.clone(), record.clone());
        Ok(Outcome::Pricebook(record))
    }

    fn publish(
        &mut self,
        id: &str,
        effective_at: Option<Timestamp>,
        actor: Option<&str>,
    ) -> Result<Outcome, Failure> {
        let book = self.draft(id)?.clone();
        if book.status == PricebookStatus::Published {
            // A retry of the same publication answers as the first did.
            if effective_at.is_none() || effective_at == book.effective_at {
                self.already_done = true;
                return Ok(Outcome::Pricebook(book));
            }
            return Err(not_draft(id));
        }
        let now = self.now;
        // Now, or just after the latest instant usage was priced at (an
        // event stamped ahead of the clock, or a charge at this very
        // instant): no use already priced falls under the new version.
        let after_priced = self
            .catalog
            .priced_through
            .and_then(|through| through.plus_micros(1));
        let effective_at =
            effective_at.unwrap_or_else(|| after_priced.map_or(now, |after| after.max(now)));
        if let Some(through) = self.catalog.priced_through {
            if effective_at <= through && effective_at >= now {
                return Err(Failure::Rejected(Refusal {
                    code: "invalid_request".into(),
                    message: format!(
                        "effective_at must be after {}: usage stamped up to then is already priced \
                         (events may be stamped ahead of the clock); give none to take effect just after it",
                        through.rfc3339()
                    ),
                    available: None,
                }));
            }
        }
        if effective_at < now {
            return Err(Failure::Rejected(Refusal {
                code: "invalid_request".into(),
                message: format!(
                    "effective_at is in the past (the engine's clock is at {}); publish now or later, \
                     since charges already made cannot be repriced",
                    now.rfc3339()
                ),
                available: None,
            }));
        }
        if book.rules.is_empty() {
            return Err(Failure::Rejected(Refusal {
                code: "invalid_rules".into(),
                message: format!(
                    "price book {id} has no rules; add them with PUT /v1/pricebooks/{id}/rules"
                ),
                available: None,
            }));
        }
        self.check_rules(&book.rules, &format!("Price book {id}"))?;
        let mut record = book;
        record.status = PricebookStatus::Published;
        record.effective_at = Some(effective_at);
        record.published_at = Some(now);
        record.published_by = actor.map(str::to_owned);
        record.published_seq = Some(self.catalog.next_published_seq());
        record.updated_at = now.max(record.created_at);
        catalog::save_pricebook(&self.connection, &record)?;
        self.catalog.published.publish(
            record
                .version()
                .expect("a published version has its fields"),
        );
        self.catalog.books.insert(record.id.clone(), record.clone());
        Ok(Outcome::Pricebook(record))
    }

    fn put_contract(
        &mut self,
        customer_id: &Id,
        contract: &Contract,
        lock_rates: bool,
        actor: Option<&str>,
    ) -> Result<Outcome, Failure> {
        if rows::customer(&self.connection, customer_id.as_str())?.is_none() {
            return Err(Failure::Store(StoreError::NotFound(format!(
                "customer {customer_id}"
            ))));
        }
        let refuse = |message: String| {
            Failure::Rejected(Refusal {
                code: "invalid_request".into(),
                message,
                available: None,
            })
        };
        // The HTTP handler refuses these first (so that the id stays free);
        // the store keeps its own guard for every other caller.
        if let Some((_, problem)) = contract.fault() {
            return Err(refuse(problem.into()));
        }
        self.check_rules(
            &contract.rules,
            &format!("The rules of contract {}", contract.id),
        )?;
        let mut contract = contract.clone();
        if lock_rates {
            if contract.pinned_pricebook.is_some() {
                return Err(refuse(
                    "give lock_rates or pinned_pricebook, not both".into(),
                ));
            }
            // The version in effect when the contract starts. A start now
            // or past pins what applied then, which no later publication
            // can change; a start to come is resolved when prices are taken
            // (`Contract::lock_rates`), since a version may still be
            // published to take effect before it.
            let start = contract.effective_from.unwrap_or(self.now);
            let version = self.catalog.published.in_effect(start).ok_or_else(|| {
                refuse(
                    "lock_rates needs a price book version in effect at the contract's start"
                        .into(),
                )
            })?;
            if start <= self.now {
                contract.pinned_pricebook = Some(version.id.clone());
            } else {
                contract.lock_rates = true;
            }
        }
        if let Some(pinned) = &contract.pinned_pricebook {
            if self.catalog.published.get(pinned).is_none() {
                return Err(refuse(format!(
                    "pinned_pricebook {pinned} is not a published price book version"
                )));
            }
        }
        let record = ContractRecord {
            customer_id: customer_id.to_string(),
            contract,
            updated_at: self.now,
            updated_by: actor.map(str::to_owned),
        };
        catalog::save_contract(&self.connection, &record)?;
        self.catalog
            .contracts
            .entry(record.customer_id.clone())
            .or_default()
            .push(record.clone());
        Ok(Outcome::Contract(record))
    }

    /// The charge path on a copy of the customer's ledger: priced and drawn
    /// exactly as a charge made now would be, with nothing written.
    fn quote(
        &mut self,
        customer_id: &Id,
        usage: &UsageInput,
        member_id: Option<&Id>,
    ) -> Result<Outcome, Failure> {
        // A renewal that is due is applied (it is due anyway, and changes
        // the credits and maybe the plan); expiries and hold timeouts are
        // applied to a copy below.
        self.load(customer_id)?;
        self.renew_due(customer_id)?;
        let pricing = self.price(customer_id, usage)?;
        let now = self.now;
        let mut copy = self
            .cache
            .get(customer_id)
            .expect("prepared")
            .ledger
            .clone();
        let _ = copy.expire_due(now);
        let balance = copy.balance(now);
        let available = balance.available;
        let net = available
            .checked_sub(balance.debt)
            .expect("balance within range");
        let spend = Spend {
            reference: Id::derived("quote"),
            amount: pricing.cost,
            feature: Some(usage.feature.clone()),
            member_id: member_id.cloned(),
            reason: None,
        };
        let charged = if pricing.cost.is_zero() {
            Ok((Vec::new(), copy.free_use(&spend, now)))
        } else {
            copy.charge(&spend, now)
        };
        let (refusal, drawn, balance_after) = match charged {
            Ok((drawn, draft)) => (None, drawn, draft.balance_after),
            Err(
                error @ (LedgerError::InsufficientCredits { .. }
                | LedgerError::MemberBudgetExceeded { .. }),
            ) => (Some(Refusal::from(&error)), Vec::new(), net),
            Err(other) => return Err(Failure::Refused(other)),
        };
        Ok(Outcome::Quote(QuoteOutcome {
            customer_id: customer_id.clone(),
            pricing,
            drawn,
            balance_after,
            available,
            refusal,
        }))
    }

    /// Expire what is due for customers with due holds or grants
    /// ([`DUE_CUSTOMERS`]).
    ///
    /// Applied again after a failure (`tick_scope`), it covers some of the
    /// customers, or only the housekeeping; a whole tick leaves out the
    /// customers (and the housekeeping) whose part failed on its own in the
    /// last [`QUARANTINE_MICROS`].
    fn tick(&mut self) -> db::Result<Outcome> {
        let now = self.now.micros();
        self.connection
            .prepare_cached(RECORD_ENGINE_CLOCK)?
            .execute([now])?;
        if self.connection.is_postgres() {
            self.connection
                .prepare_cached(RECORD_CLOCK_MODE)?
                .execute([
                    i64::from(self.clock.is_manual()),
                    SystemClock.now().micros(),
                ])?;
        }
        if !self.quarantine.is_empty() {
            self.quarantine.retain(|_, until| *until > now);
            self.show_quarantine();
        }
        let scope = self.tick_scope.clone();
        let due: Vec<String> = match &scope {
            TickScope::Whole => self.due_customers()?,
            TickScope::Customers(customers) => customers.clone(),
            TickScope::Housekeeping => Vec::new(),
        };
        let before = self.next_entry_sequence;
        self.renewals = 0;
        for customer_id in due {
            // A group holds every command queued behind it: once this tick
            // has done a group's worth, the customers left stay due for the
            // next tick (`run_due` ticks again while ticks do work), and
            // the commands queued meanwhile go between.
            let done =
                usize::try_from(self.next_entry_sequence - before).unwrap_or(0) + self.renewals;
            if done >= MAX_TICK_WORK {
                break;
            }
            match self.prepare(&Id::derived(&customer_id)) {
                Ok(()) | Err(Failure::Store(_) | Failure::Refused(_) | Failure::Rejected(_)) => {}
                Err(Failure::Fatal(error)) => return Err(error),
            }
        }
        let housekeeping = match scope {
            TickScope::Customers(_) => false,
            TickScope::Whole | TickScope::Housekeeping => {
                !self.quarantine.contains_key(HOUSEKEEPING)
            }
        };
        let overdue = match housekeeping {
            true => self.expire_topup_payments()?,
            false => 0,
        };
        // Renewals of plans without credits write no entry, but are work done.
        let mut entries = usize::try_from(self.next_entry_sequence - before).unwrap_or(0)
            + self.renewals
            + overdue;
        if scope == TickScope::Housekeeping {
            // The customers the split tick visited: its caller (`run_due`)
            // then ticks again, as after a whole tick that did work.
            entries += self.round.as_ref().map_or(0, |round| round.visited);
        }
        if housekeeping {
            self.notify_expiring()?;
            self.prune_notifications()?;
        }
        Ok(Outcome::Tick { entries })
    }

    /// What voiding `voided` credits of a paid lot first granted in `root`
    /// gives back: the part of the purchase's value that brings what its
    /// voids gave back so far to the value of all its credits voided so far,
    /// in the currency's smallest unit (a cent, a yen). For a top-up's lot,
    /// the value is its exact price times those credits over its credits
    /// (`topups.voided_credits`); for another, their value at the cost basis
    /// (`lot_voids`). So voiding all of an unused top-up refunds exactly its
    /// payment, and so do its lot and the lots made from it (a hold's return
    /// after the void, a refund, a transfer to another customer) voided one
    /// after another: each void rounding its own part gave 0.333333 and
    /// 0.666666 of 1 USD, 666.666667 JPY, and two halves of one micro-unit
    /// each rounded up. The lots' cost basis is the price per credit rounded
    /// to the micro-unit (3 credits for 1 USD gave 0.999999). `None` if a
    /// value overflows (the lot's own rounded one is given then).
    fn purchase_refund(
        &self,
        root: &Id,
        voided: tally_core::Amount,
        basis: &tally_core::CostBasis,
    ) -> Result<Option<(tally_core::Amount, String)>, Failure> {
        if let Some(exact) = self.topup_refund(root, voided)? {
            return Ok(Some(exact));
        }
        let before: i64 = self
            .connection
            .prepare_cached("SELECT voided_credits FROM lot_voids WHERE root = ?1")?
            .query_row([root.as_str()], |row| row.get(0))
            .optional()?
            .unwrap_or(0);
        let after = before.saturating_add(voided.micros());
        let worth = |voided: i64| {
            tally_core::Amount::from_micros(voided).and_then(|v| basis.payable_value_of(v))
        };
        let (Some(was), Some(is)) = (worth(before), worth(after)) else {
            return Ok(None);
        };
        self.connection
            .prepare_cached(
                "INSERT INTO lot_voids (root, voided_credits) VALUES (?1, ?2) \
                 ON CONFLICT (root) DO UPDATE SET voided_credits = excluded.voided_credits",
            )?
            .execute(params![root.as_str(), after])?;
        Ok(is
            .checked_sub(was)
            .map(|money| (money, basis.currency.clone())))
    }

    /// [`Self::purchase_refund`] for a lot bought in a top-up; `None` if
    /// `root` is not a top-up's lot.
    fn topup_refund(
        &self,
        root: &Id,
        voided: tally_core::Amount,
    ) -> Result<Option<(tally_core::Amount, String)>, Failure> {
        let Some(topup_id) = root.as_str().strip_prefix("topup:") else {
            return Ok(None);
        };
        let Some(topup) = rows::topup(&self.connection, topup_id)? else {
            return Ok(None);
        };
        if topup.grant_id.as_ref() != Some(root) || !topup.credits.is_positive() {
            return Ok(None);
        }
        let before: i64 = self.connection.query_row(
            "SELECT voided_credits FROM topups WHERE id = ?1",
            params![topup_id],
            |row| row.get(0),
        )?;
        let after = before.saturating_add(voided.micros());
        let credits = i128::from(topup.credits.micros());
        let price = i128::from(topup.price.micros());
        // In the currency's smallest unit, rounded half up.
        let worth = |voided: i64| {
            tally_core::currency::round_to_minor_unit(
                price.checked_mul(i128::from(voided))?,
                credits,
                &topup.currency,
            )
        };
        let (Some(is), Some(was)) = (worth(after), worth(before)) else {
            return Ok(None);
        };
        let value = is - was;
        self.connection.execute(
            "UPDATE topups SET voided_credits = ?2 WHERE id = ?1",
            params![topup_id, after],
        )?;
        Ok(i64::try_from(value)
            .ok()
            .and_then(tally_core::Amount::from_micros)
            .map(|money| (money, topup.currency)))
    }

    /// The customers a whole tick visits now ([`DUE_CUSTOMERS`]), less the
    /// quarantined ones (which stay due, so the query takes that many more).
    fn due_customers(&mut self) -> db::Result<Vec<String>> {
        let now = self.now.micros();
        let limit = MAX_TICK_CUSTOMERS.saturating_add(self.quarantine.len() as i64);
        let mut statement = self.connection.prepare_cached(DUE_CUSTOMERS)?;
        let rows = statement.query_map(params![now, limit], |row| row.get(0))?;
        let mut due = rows.collect::<db::Result<Vec<String>>>()?;
        due.retain(|customer| !self.quarantine.contains_key(customer));
        due.truncate(MAX_TICK_CUSTOMERS as usize);
        Ok(due)
    }

    /// A failed group's commands, to be applied again in smaller groups
    /// (`retries`), so that one command the database refuses (a defect, a
    /// constraint its data breaks) fails alone instead of failing every
    /// command that shared its group, again and again as callers retry.
    ///
    /// A group that failed as it first ran goes to the back of the queue
    /// whole if it held one command (it may have failed only because the
    /// group under it did), else in two halves, so that the commands keep
    /// the order they came in. A part of a failed group that fails again is
    /// halved in its place at the front; a command that fails by itself is
    /// answered `Unavailable`, except a whole tick, whose customers are
    /// then applied in halves the same way, then its housekeeping (see
    /// [`TickScope`]). One poisoned command in a group of `n` costs about
    /// `2 log2 n` more commits.
    ///
    /// Until some part commits, a fault may not be any one command's (a
    /// full disk, a table that cannot be written): once [`GIVE_UP_AFTER`]
    /// commands have failed by themselves with no part committed, every
    /// command still waiting is answered `Unavailable` at once.
    fn split_for_retry(&mut self, mut jobs: Vec<Job>, scope: Option<TickScope>, error: &db::Error) {
        let first_run = scope.is_none();
        let scope = scope.unwrap_or(TickScope::Whole);
        self.round.get_or_insert_with(Round::default);
        // A tick part of several customers is halved by its customers.
        let parts: Vec<Retry> = match scope {
            TickScope::Customers(customers) if customers.len() > 1 => halve(customers)
                .into_iter()
                .map(|customers| Retry {
                    jobs: vec![tick_job()],
                    scope: TickScope::Customers(customers),
                })
                .collect(),
            // As it first ran: applied again whole if alone (it may have
            // failed only because the group under it did), else halved.
            scope if jobs.len() > 1 || (first_run && !jobs.is_empty()) => {
                let halves = match jobs.len() {
                    1 => vec![jobs],
                    _ => halve(jobs).into(),
                };
                halves
                    .into_iter()
                    .map(|jobs| Retry {
                        jobs,
                        scope: scope.clone(),
                    })
                    .collect()
            }
            scope => {
                let Some(job) = jobs.pop() else { return };
                return self.failed_alone(job, scope, error);
            }
        };
        if first_run {
            // Behind the parts of earlier groups: the commands keep their order.
            self.retries.extend(parts);
        } else {
            // In the place of the part that failed.
            for part in parts.into_iter().rev() {
                self.retries.push_front(part);
            }
        }
    }

    /// A command (or tick part) that failed by itself: answered, unless so
    /// many have failed with nothing committed that every command waiting
    /// is given up.
    fn failed_alone(&mut self, job: Job, scope: TickScope, error: &db::Error) {
        let round = self.round.get_or_insert_with(Round::default);
        round.alone += 1;
        if round.committed == 0 && round.alone >= GIVE_UP_AFTER {
            tracing::error!(%error, "commands keep failing by themselves and nothing commits: every command waiting to be applied again is answered unavailable");
            let waiting: Vec<Job> = std::iter::once(job)
                .chain(self.retries.drain(..).flat_map(|retry| retry.jobs))
                .collect();
            let answered = waiting.iter().filter(|job| !job.reply.is_closed()).count();
            self.count_failure(|shared| {
                shared.failed_commands.fetch_add(answered as u64, Relaxed);
            });
            fail_jobs(waiting, &error.to_string());
            return;
        }
        match scope {
            TickScope::Whole if matches!(job.command, Command::Tick) => self.tick_apart(job, error),
            TickScope::Whole => {
                tracing::error!(%error, "a command failed by itself; answered unavailable");
                self.count_failure(|shared| {
                    shared.failed_commands.fetch_add(1, Relaxed);
                });
                let _ = job
                    .reply
                    .send(Err(StoreError::Unavailable(error.to_string())));
            }
            TickScope::Customers(customers) => {
                tracing::error!(%error, customer = %customers[0], "this customer's expiries and renewals cannot be written");
                round.suspects.extend(customers);
            }
            TickScope::Housekeeping => {
                tracing::error!(%error, "a tick's housekeeping (overdue top-up payments, expiry warnings, pruning) cannot be written");
                round.suspects.push(HOUSEKEEPING.to_owned());
                self.count_failure(|shared| {
                    shared.failed_commands.fetch_add(1, Relaxed);
                });
                let _ = job
                    .reply
                    .send(Err(StoreError::Unavailable(error.to_string())));
            }
        }
    }

    /// A tick failed by itself: apply its due customers again in halves,
    /// then its housekeeping, which answers the tick's caller.
    fn tick_apart(&mut self, job: Job, error: &db::Error) {
        tracing::warn!(%error, "a tick failed by itself; applying its customers again in smaller groups");
        self.now = self.now.max(self.clock.now());
        let due = match self.due_customers() {
            Ok(due) => due,
            Err(error) => {
                let _ = job
                    .reply
                    .send(Err(StoreError::Unavailable(error.to_string())));
                return;
            }
        };
        if let Some(round) = &mut self.round {
            round.visited = round.visited.max(due.len());
        }
        self.retries.push_front(Retry {
            jobs: vec![job],
            scope: TickScope::Housekeeping,
        });
        if !due.is_empty() {
            self.retries.push_front(Retry {
                jobs: vec![tick_job()],
                scope: TickScope::Customers(due),
            });
        }
    }

    /// Every part of the failed groups has been applied again (or given
    /// up): quarantine the customers (and housekeeping) whose part failed by
    /// itself, if anything else committed meanwhile; if nothing did, the
    /// fault was not theirs, and they are tried again at the next tick.
    fn end_round(&mut self) {
        let Some(round) = self.round.take() else {
            return;
        };
        if round.committed == 0 {
            if !round.suspects.is_empty() {
                tracing::error!(
                    parts = round.alone,
                    "no part of the failed write groups committed; nobody is left out of ticks"
                );
            }
            return;
        }
        let until = self.now.micros().saturating_add(QUARANTINE_MICROS);
        for suspect in round.suspects {
            tracing::error!(customer = %suspect, "left out of ticks for ten minutes (empty: the housekeeping)");
            self.quarantine.insert(suspect, until);
        }
        self.show_quarantine();
    }

    /// Apply one part of a failed group again as a group of its own
    /// (committed before the next begins), and hand on its answers.
    fn run_retry(
        &mut self,
        retry: Retry,
        state: &Arc<SyncState>,
        syncer: &std::sync::mpsc::SyncSender<Durable>,
    ) -> Option<Stopped> {
        let Retry { mut jobs, scope } = retry;
        let mut group = self.begin_group();
        group.retry = Some(scope.clone());
        self.tick_scope = scope;
        self.apply_jobs(&mut group, &mut jobs);
        self.tick_scope = TickScope::Whole;
        let finished = self.finish_group(group, state);
        if finished.is_some() {
            if let Some(round) = &mut self.round {
                round.committed += 1;
            }
        }
        self.hand_on(finished, state, syncer)
    }

    /// After a group: answer its callers (PostgreSQL) or pass it to the
    /// syncer (SQLite), or stop if the connection is gone.
    fn hand_on(
        &mut self,
        finished: Option<Durable>,
        state: &Arc<SyncState>,
        syncer: &std::sync::mpsc::SyncSender<Durable>,
    ) -> Option<Stopped> {
        if let Some(error) = self.gone.take() {
            self.fail_retries(&error.to_string());
            return Some(Stopped::ConnectionLost(error));
        }
        let durable = finished?;
        // PostgreSQL made the group durable before its COMMIT returned:
        // answer at once, without a hop to the syncer.
        if self.connection.dialect() == db::Dialect::Postgres {
            deliver(durable, state);
            return None;
        }
        state
            .pending
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if syncer.send(durable).is_err() {
            tracing::error!("the syncer has stopped; stopping the writer");
            self.fail_retries("the syncer has stopped");
            return Some(Stopped::Closed);
        }
        None
    }

    /// Answer every command waiting to be applied again `Unavailable`.
    fn fail_retries(&mut self, why: &str) {
        fail_jobs(self.retries.drain(..).flat_map(|retry| retry.jobs), why);
        self.round = None;
    }

    /// Count a failure in the figures the store shows (`Store::write_failures`).
    fn count_failure(&self, counter: impl FnOnce(&SyncState)) {
        if let Some(shared) = &self.shared {
            counter(shared);
        }
    }

    /// Show how many customers are left out of ticks now.
    fn show_quarantine(&self) {
        if let Some(shared) = &self.shared {
            let customers =
                self.quarantine.len() - usize::from(self.quarantine.contains_key(HOUSEKEEPING));
            shared.quarantined.store(customers, Relaxed);
        }
    }
}

/// The customers a tick visits (at most `?2`, due at `?1`): due holds,
/// due lots, renewals, and customers in debt with credits that could repay it
/// (a lot that took effect since).
///
/// The debtors are found from `customers_in_debt` (a partial index), each
/// checked through its own lots (`grants_by_customer`): the cost grows with
/// the debtors, not with every active lot. Joined the other way round, both
/// SQLite and PostgreSQL (before its first `ANALYZE`) walked every active lot
/// through `grants_due` on every tick: 13.6 ms with 8,434 lots on
/// PostgreSQL, 147 ms with 200,000 on SQLite, on the writer's thread, twice
/// a second. The subquery's `LIMIT 1` keeps PostgreSQL from turning it into
/// a join, and `status || ''` keeps both planners off `grants_due`.
pub(crate) const DUE_CUSTOMERS: &str = "\
     SELECT customer_id FROM holds WHERE status = 'active' AND expires_at <= ?1 \
     UNION SELECT customer_id FROM grants WHERE status = 'active' AND expires_at <= ?1 \
     UNION SELECT customer_id FROM grants WHERE awaiting_effect = 1 AND status || '' = 'active' \
       AND effective_at <= ?1 \
     UNION SELECT c.id FROM customers c WHERE c.debt > 0 \
       AND (SELECT 1 FROM grants g JOIN grant_balances b ON b.sequence = g.sequence \
         WHERE g.customer_id = c.id AND g.status || '' = 'active' AND g.scope IS NULL \
         AND g.effective_at <= ?1 AND b.remaining > 0 LIMIT 1) IS NOT NULL \
     UNION SELECT customer_id FROM subscriptions WHERE status = 'active' AND period_end <= ?1 \
     LIMIT ?2";

/// How far the engine's recorded clock may run ahead of a server's real
/// clock: the clocks of servers sharing a database differ a little; a
/// manual clock run ahead differs by days.
pub(crate) const CLOCK_AHEAD_TOLERANCE: i64 = 5 * 60 * 1_000_000;

/// How far behind the engine's clock a grant's `effective_at` may be and
/// still be taken as now (a minute, in microseconds); further back is a 400.
const PAST_AS_NOW: i64 = 60 * 1_000_000;

/// How long after a writer on PostgreSQL last said which clock it runs on
/// (each tick) a server on the other clock is refused, at its start and
/// before it would take over (a minute, in microseconds).
pub const CLOCK_MODE_FRESH: i64 = 60 * 1_000_000;

/// The writer's clock, as [`check_clock_mode`] reads it.
const RECORD_CLOCK_MODE: &str =
    "UPDATE engine_clock SET manual = ?1, mode_seen_at = ?2 WHERE id = 1";

/// The engine's clock as the last tick recorded it, or
/// [`db::Error::ClockBehind`] when `clock` is a real clock more than
/// [`CLOCK_AHEAD_TOLERANCE`] behind it: a server started without
/// `--manual-clock` on a database a manual clock ran ahead (a probe saw a
/// takeover by one move the engine four days back: grants already in effect
/// became pending again, and a balance of 999 read 0).
pub(crate) fn check_engine_clock(
    connection: &Connection,
    clock: &dyn Clock,
) -> db::Result<Option<Timestamp>> {
    let recorded = engine_clock(connection)?;
    if let Some(engine) = recorded {
        let now = clock.now();
        if !clock.is_manual()
            && engine.micros() > now.micros().saturating_add(CLOCK_AHEAD_TOLERANCE)
        {
            return Err(db::Error::ClockBehind {
                engine: engine.rfc3339(),
                now: now.rfc3339(),
            });
        }
    }
    check_clock_mode(connection, clock)?;
    Ok(recorded)
}

/// On PostgreSQL, [`db::Error::ClockModeDiffers`] when the writer said, less
/// than [`CLOCK_MODE_FRESH`] ago, that it runs on the other clock than
/// `clock`. Checked at start, before a takeover, and by followers at each
/// tick (two servers started at the same instant both pass the start).
pub(crate) fn check_clock_mode(connection: &Connection, clock: &dyn Clock) -> db::Result<()> {
    if connection.is_postgres() {
        let mode: Option<(Option<i64>, Option<i64>)> = connection
            .query_row(
                "SELECT manual, mode_seen_at FROM engine_clock WHERE id = 1",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        if let Some((Some(manual), Some(seen_at))) = mode {
            let wall = SystemClock.now().micros();
            let name = |manual: bool| match manual {
                true => "a manual clock (--manual-clock)",
                false => "the real clock",
            };
            if (manual == 1) != clock.is_manual() && wall.saturating_sub(seen_at) < CLOCK_MODE_FRESH
            {
                return Err(db::Error::ClockModeDiffers {
                    writer: name(manual == 1),
                    this: name(clock.is_manual()),
                    fresh_seconds: CLOCK_MODE_FRESH / 1_000_000,
                });
            }
        }
    }
    Ok(())
}

/// The engine's clock as the last tick recorded it.
pub(crate) fn engine_clock(connection: &Connection) -> db::Result<Option<Timestamp>> {
    let micros: Option<i64> = connection
        .query_row("SELECT micros FROM engine_clock WHERE id = 1", [], |row| {
            row.get(0)
        })
        .optional()?;
    Ok(micros.map(Timestamp))
}

fn load_packs(connection: &Connection) -> db::Result<HashMap<String, tally_core::CreditPack>> {
    Ok(rows::credit_packs(connection)?
        .into_iter()
        .map(|p| (p.key.clone(), p))
        .collect())
}

fn load_plans(connection: &Connection) -> db::Result<HashMap<String, tally_core::Plan>> {
    let plans = rows::plans(connection)?;
    for plan in &plans {
        // Stored before such plans were refused: the rollover never applies.
        if plan.rollover.is_some() && plan.allocation_expires_after_periods != Some(1) {
            tracing::warn!(plan = %plan.key, "this plan's rollover never applies: its allocations do not end with their period (set allocation_expires_after_periods to 1, or remove the rollover)");
        }
    }
    Ok(plans
        .into_iter()
        .map(|plan| (plan.key.clone(), plan))
        .collect())
}

/// The event ids with a pending dead letter.
fn pending_letter_events(connection: &Connection) -> db::Result<HashSet<String>> {
    let mut statement = connection.prepare(
        "SELECT event_id FROM dead_letters WHERE status = 'pending' AND event_id IS NOT NULL",
    )?;
    let ids = statement.query_map([], |row| row.get::<_, String>(0))?;
    ids.collect()
}

fn not_draft(id: &str) -> Failure {
    Failure::Rejected(Refusal {
        code: "pricebook_not_draft".into(),
        message: format!(
            "price book {id} is published and never changes; create a new version with POST /v1/pricebooks {{\"id\": ..., \"from\": \"{id}\"}}"
        ),
        available: None,
    })
}

/// A pricing error as the API reports it.
fn pricing_refusal(error: PricingError) -> Failure {
    let code = match &error {
        PricingError::UnknownFeature { .. }
        | PricingError::NoPrice { .. }
        | PricingError::NoVersion { .. } => "no_price",
        PricingError::Overflow => "amount_too_large",
        PricingError::InvalidQuantity { .. } | PricingError::InvalidMultiplier { .. } => {
            "invalid_request"
        }
        PricingError::InvalidPrice { .. } | PricingError::Ambiguous { .. } => "no_price",
    };
    let message = match &error {
        PricingError::UnknownFeature { feature } => {
            format!("feature {feature} has no price in the price book version in effect")
        }
        other => other.to_string(),
    };
    Failure::Rejected(Refusal {
        code: code.into(),
        message,
        available: None,
    })
}

/// A store error as an event's refusal (an event's result is always a code).
fn store_error_refusal(error: &StoreError) -> Refusal {
    let code = match error {
        StoreError::NotFound(_) => "not_found",
        StoreError::IdempotencyConflict(_) => "idempotency_conflict",
        StoreError::HoldAlreadyResolved(_) => "hold_already_resolved",
        StoreError::Rejected(refusal) => return refusal.clone(),
        StoreError::BadCursor => "invalid_request",
        StoreError::Unavailable(_) => "unavailable",
    };
    Refusal {
        code: code.into(),
        message: error.to_string(),
        available: None,
    }
}

fn refusal_to_store_error(error: &LedgerError) -> StoreError {
    match error {
        LedgerError::HoldNotFound(id) => StoreError::NotFound(format!("hold {id}")),
        LedgerError::GrantNotFound(id) => StoreError::NotFound(format!("grant {id}")),
        other => StoreError::Rejected(Refusal::from(other)),
    }
}

/// What a stored charge, capture or event drew, its part on debt, and the
/// member it named (a capture's member is its hold's).
fn charged_draws(response: &str) -> Option<(Vec<Draw>, tally_core::Amount, Option<Id>)> {
    match serde_json::from_str::<Result<Outcome, Refusal>>(response).ok()? {
        Ok(Outcome::Charge(charge)) => Some((charge.drawn, charge.on_debt, charge.member_id)),
        Ok(Outcome::Capture(capture)) => Some((capture.drawn, capture.on_debt, None)),
        Ok(Outcome::Event(event)) => Some((event.drawn, event.on_debt, event.member_id)),
        _ => None,
    }
}

/// A policy the customer chose, stored as JSON (even `block`, which then
/// wins over a plan's); NULL only when it never chose one.
fn overage_column(overage: Option<tally_core::OveragePolicy>) -> Option<String> {
    overage.map(|o| serde_json::to_string(&o).expect("policy serializes"))
}

/// The fingerprint of a request's content, for idempotency checks.
fn request_hash(command: &Command) -> Vec<u8> {
    let bytes = match command {
        // The key itself is generated per attempt; the request is its id and scope.
        Command::CreateApiKey { id, scope, .. } => serde_json::to_vec(&Command::CreateApiKey {
            id: id.clone(),
            key_hash: String::new(),
            scope: scope.clone(),
        }),
        // The secret is generated per attempt; the request is the rest.
        Command::CreateWebhookEndpoint(endpoint) => {
            serde_json::to_vec(&Command::CreateWebhookEndpoint(NewWebhookEndpoint {
                secret: String::new(),
                ..endpoint.clone()
            }))
        }
        Command::RotateWebhookSecret {
            id,
            endpoint_id,
            previous_valid_seconds,
            ..
        } => serde_json::to_vec(&Command::RotateWebhookSecret {
            id: id.clone(),
            endpoint_id: endpoint_id.clone(),
            secret: String::new(),
            previous_valid_seconds: *previous_valid_seconds,
        }),
        // An event is the same event whatever its source or wire form.
        Command::Event(event) => serde_json::to_vec(&Command::Event(NewEvent {
            source: String::new(),
            received_at: None,
            ..event.clone()
        })),
        other => serde_json::to_vec(other),
    }
    .expect("command serializes");
    Sha256::digest(bytes).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty_index() -> OperationIndex {
        OperationIndex {
            hasher: ahash::RandomState::new(),
            first: (0..INDEX_SHARDS).map(|_| HashMap::default()).collect(),
            more: HashMap::default(),
            pending: Vec::new(),
        }
    }

    /// SQL for customers `c1` to `c2000`, with `debt` (an SQL expression of
    /// `i`), each with an active lot `g<i>` of 10 credits (sequence `i`,
    /// expiring at `expires_at`, an expression of `i`).
    fn two_thousand_lots(debt: &str, expires_at: &str) -> String {
        let numbers =
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)";
        format!(
            "{numbers} INSERT INTO customers (id, created_at, debt) SELECT 'c' || i, 0, {debt} FROM n; \
             {numbers} INSERT INTO grants (id, customer_id, amount, source, paid, priority, \
               effective_at, expires_at, status, sequence, created_at) \
             SELECT 'g' || i, 'c' || i, 10, 'promotional', 0, 0, 0, {expires_at}, 'active', i, 0 \
             FROM n; \
             {numbers} INSERT INTO grant_balances (sequence, remaining, expired_amount) \
             SELECT i, 10, 0 FROM n;"
        )
    }

    /// The tick's query of due customers reaches the customers in debt
    /// through their partial index, and each one's lots by customer: never
    /// every active lot, which both planners walked (through `grants_due`)
    /// while the debt branch was a join. Checked on a new database without
    /// statistics, where PostgreSQL went wrong too; with
    /// `TALLY_TEST_DATABASE=postgres` on both stores.
    #[test]
    fn the_tick_reaches_debtors_without_walking_every_lot() {
        for (connection, place) in crate::db::tests::connections("tick_plan") {
            crate::schema::migrate(&connection).unwrap();
            connection
                .execute_batch(&two_thousand_lots(
                    "CASE WHEN i = 7 THEN 5 ELSE 0 END",
                    "NULL",
                ))
                .unwrap();
            // The query finds the debtor whose lot can repay.
            let due: Vec<String> = {
                let mut statement = connection.prepare(DUE_CUSTOMERS).unwrap();
                let rows = statement
                    .query_map(params![1_000i64, 100i64], |row| row.get(0))
                    .unwrap();
                rows.collect::<db::Result<_>>().unwrap()
            };
            assert_eq!(due, ["c7"]);
            // SQLite plans each statement once; PostgreSQL may use a custom
            // plan (the first runs) or a generic one (later): both are checked.
            let explain = |prefix: &str, column: usize| -> Vec<String> {
                let mut statement = connection
                    .prepare(&format!("{prefix} {DUE_CUSTOMERS}"))
                    .unwrap();
                let rows = statement
                    .query_map(params![1_000i64, 100i64], |row| row.get(column))
                    .unwrap();
                rows.collect::<db::Result<_>>().unwrap()
            };
            let plans = match connection.dialect() {
                db::Dialect::Sqlite => vec![explain("EXPLAIN QUERY PLAN", 3)],
                db::Dialect::Postgres => {
                    let custom = explain("EXPLAIN", 0);
                    connection
                        .execute_batch("SET plan_cache_mode = force_generic_plan")
                        .unwrap();
                    let generic = explain("EXPLAIN", 0);
                    connection.execute_batch("RESET plan_cache_mode").unwrap();
                    vec![custom, generic]
                }
            };
            for plan in plans {
                let text = plan.join("\n");
                assert!(text.contains("customers_in_debt"), "{text}");
                assert!(text.contains("grants_by_customer"), "{text}");
                // Lots still to take effect through their own partial index.
                assert!(text.contains("grants_taking_effect"), "{text}");
                assert!(!text.contains("Seq Scan on grants"), "{text}");
                // `grants_due` only ever narrowed by expiry (the due lots): on
                // SQLite in the same line, on PostgreSQL in the line below.
                for (at, line) in plan.iter().enumerate() {
                    if line.contains("grants_due") {
                        let condition = match connection.dialect() {
                            db::Dialect::Sqlite => line,
                            db::Dialect::Postgres => &plan[at + 1],
                        };
                        assert!(condition.contains("expires_at"), "{text}");
                    }
                }
            }
            drop(connection);
            crate::db::tests::drop_database(place);
        }
    }

    /// The lots listed for `grant.expiring` are read by id, not by walking
    /// the active lots (2,000 of them here; 200,000 in a large book).
    #[test]
    fn the_listed_lots_are_read_by_id() {
        for (connection, place) in crate::db::tests::connections("recent_plan") {
            crate::schema::migrate(&connection).unwrap();
            connection
                .execute_batch(&two_thousand_lots("0", "100 + i"))
                .unwrap();
            let sql = match connection.dialect() {
                db::Dialect::Sqlite => notify::RECENT_LOTS_SQLITE,
                db::Dialect::Postgres => notify::RECENT_LOTS_POSTGRES,
            };
            let ids = r#"["g7", "g1999", "nope"]"#;
            let found: Vec<String> = {
                let mut statement = connection.prepare(sql).unwrap();
                let rows = statement
                    .query_map(params![ids, 500i64], |row| row.get(0))
                    .unwrap();
                rows.collect::<db::Result<_>>().unwrap()
            };
            // g7 expired at 107, before the instant asked about.
            assert_eq!(found, ["g1999"]);
            let (prefix, column) = match connection.dialect() {
                db::Dialect::Sqlite => ("EXPLAIN QUERY PLAN", 3),
                db::Dialect::Postgres => ("EXPLAIN", 0),
            };
            let plan: Vec<String> = {
                let mut statement = connection.prepare(&format!("{prefix} {sql}")).unwrap();
                let rows = statement
                    .query_map(params![ids, 500i64], |row| row.get(column))
                    .unwrap();
                rows.collect::<db::Result<_>>().unwrap()
            };
            let text = plan.join("\n");
            assert!(!text.contains("grants_due"), "{text}");
            assert!(!text.contains("Seq Scan on grants"), "{text}");
            match connection.dialect() {
                db::Dialect::Sqlite => {
                    assert!(text.contains("SEARCH g USING PRIMARY KEY (id=?)"), "{text}")
                }
                db::Dialect::Postgres => assert!(text.contains("grants_pkey"), "{text}"),
            }
            drop(connection);
            crate::db::tests::drop_database(place);
        }
    }

    /// The two inserts of every charge have a binary `COPY` form (a
    /// constant among their values would silently keep them set-based).
    #[test]
    fn the_deferred_inserts_have_a_copy_form() {
        for sql in [
            crate::rows::INSERT_ENTRY,
            INSERT_OPERATION,
            notify::INSERT_NOTIFICATION,
            notify::INSERT_DELIVERY,
        ] {
            let numbered = crate::db::placeholders(sql);
            let params = numbered.matches('$').count();
            assert!(crate::db::copy_sql(&numbered, params).is_some(), "{sql}");
        }
    }

    #[test]
    fn fingerprints_spread_over_every_shard() {
        assert_eq!(OperationIndex::shard(0), 0);
        assert_eq!(OperationIndex::shard(u64::MAX), INDEX_SHARDS - 1);
        assert_eq!(OperationIndex::shard(1 << 63), INDEX_SHARDS / 2);
        let mut index = empty_index();
        for n in 0..4096u64 {
            index.add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15), n as i64);
        }
        assert!(index.first.iter().all(|shard| !shard.is_empty()));
        assert_eq!(index.first.iter().map(HashMap::len).sum::<usize>(), 4096);
    }

    #[test]
    fn colliding_fingerprints_keep_every_row() {
        let mut index = empty_index();
        index.add(7, 1);
        index.add(7, 2);
        index.add(9, 3);
        assert_eq!(index.candidates(7).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(index.candidates(9).collect::<Vec<_>>(), [3]);
        assert_eq!(index.candidates(8).count(), 0);
    }

    #[test]
    fn a_rolled_back_group_is_forgotten_and_earlier_groups_are_kept() {
        let mut index = empty_index();
        index.add(7, 1);
        index.pending.clear(); // committed
        index.add(7, 2);
        index.add(5, 3);
        index.rollback();
        assert_eq!(index.candidates(7).collect::<Vec<_>>(), [1]);
        assert_eq!(index.candidates(5).count(), 0);
        assert!(index.pending.is_empty());
    }

    /// PostgreSQL: group 1 was sent ahead and group 2 applied on top of it.
    /// Group 1 commits (its rows are kept), then group 2 fails (its rows go).
    #[test]
    fn a_group_sent_ahead_keeps_its_rows_and_the_next_one_can_still_roll_back() {
        let mut index = empty_index();
        index.add(7, 1);
        index.add(9, 2);
        let first = index.pending.len();
        index.add(7, 3);
        index.add(5, 4);
        index.keep_oldest(first);
        index.rollback();
        assert_eq!(index.candidates(7).collect::<Vec<_>>(), [1]);
        assert_eq!(index.candidates(9).collect::<Vec<_>>(), [2]);
        assert_eq!(index.candidates(5).count(), 0);
        assert!(index.pending.is_empty());
    }

    #[test]
    fn a_filling_shard_grows_ahead_one_per_call() {
        let mut index = empty_index();
        // Fill two shards (fingerprints whose top byte is 0 and 1) past three
        // quarters of their capacity; the others stay empty.
        for shard in 0..2u64 {
            let mut n = 0u64;
            loop {
                let map = &index.first[shard as usize];
                if map.capacity() > 0 && map.len() * 4 >= map.capacity() * 3 {
                    break;
                }
                index.add((shard << 56) | n, n as i64);
                n += 1;
            }
        }
        let before: Vec<usize> = index.first.iter().map(|m| m.capacity()).collect();
        index.grow_ahead();
        let after: Vec<usize> = index.first.iter().map(|m| m.capacity()).collect();
        let grown: Vec<usize> = (0..INDEX_SHARDS)
            .filter(|&i| after[i] > before[i])
            .collect();
        assert_eq!(grown.len(), 1, "one shard per call: {grown:?}");
        assert!(grown[0] < 2);
        assert!(after[grown[0]] >= 2 * before[grown[0]]);
        index.grow_ahead();
        let last: Vec<usize> = index.first.iter().map(|m| m.capacity()).collect();
        assert!(last[0] >= 2 * before[0] && last[1] >= 2 * before[1]);
        // Nothing past three quarters any more: nothing grows.
        index.grow_ahead();
        assert_eq!(
            index.first.iter().map(|m| m.capacity()).collect::<Vec<_>>(),
            last
        );
        // Every entry is still found.
        assert_eq!(index.candidates(1 << 56).collect::<Vec<_>>(), vec![0]);
    }

    #[test]
    fn the_index_is_rebuilt_from_the_table() {
        let connection = Connection::sqlite(rusqlite::Connection::open_in_memory().unwrap());
        crate::schema::migrate(&connection).unwrap();
        for (sequence, (kind, id)) in [("charge", "a"), ("hold", "a"), ("charge", "b")]
            .into_iter()
            .enumerate()
        {
            connection
                .execute(
                    "INSERT INTO operations (sequence, kind, id, request_hash, ok, response, recorded_at) \
                     VALUES (?1, ?2, ?3, x'00', 1, '{}', 0)",
                    params![sequence + 1, kind, id],
                )
                .unwrap();
        }
        let index = OperationIndex::load(&connection).unwrap();
        let find = |kind: &str, id: &str| {
            index
                .candidates(index.fingerprint(kind, id))
                .collect::<Vec<_>>()
        };
        assert_eq!(find("charge", "a"), [1]);
        assert_eq!(find("hold", "a"), [2]);
        assert_eq!(find("charge", "b"), [3]);
        assert!(find("charge", "c").is_empty());
        assert!(index.pending.is_empty());
    }
}
