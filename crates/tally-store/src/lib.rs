//! Durable storage for Tally: the embedded SQLite store.
//!
//! Architecture invariant: only the writer thread ([`writer`]) changes the
//! database, and a caller is answered only after the caller's change is
//! committed and the write-ahead log holding it is fsynced (by the syncer
//! thread). Reads use their own connections in WAL mode, so they never wait
//! for the writer and only ever see committed data (a committed group can be
//! visible a moment before its fsync; ARCHITECTURE.md says why that is safe).
//!
//! API boundary: [`Store`] takes [`Command`]s and answers [`Executed`]
//! outcomes or [`StoreError`]s; no rusqlite type crosses it.

pub mod catalog;
pub mod clock;
mod db;
pub mod model;
mod rows;
pub mod schema;
mod writer;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::db::{params, Connection, OptionalExtension};
use fs2::FileExt;
use tally_core::{Clock, Hold, Id, Timestamp};
use tokio::sync::{mpsc, oneshot};

pub use clock::{ManualClock, SystemClock};
pub use model::*;
pub use writer::MAX_BATCH;

/// The most entries one ledger page walks.
pub const MAX_LEDGER_WALK: usize = 10_000;
/// Commands waiting for the writer before callers are made to wait.
const QUEUE_CAPACITY: usize = 65_536;
/// Reads running at once on the embedded store, and its read connections
/// kept open.
const SQLITE_READS: usize = 16;

/// The database file inside a data directory.
pub fn database_path(data_dir: &Path) -> PathBuf {
    data_dir.join("tally.db")
}

/// Open a connection with Tally's settings: WAL, fsync on every commit (the
/// writer's own connection turns that off: its syncer thread fsyncs instead).
fn connect(path: &Path) -> db::Result<Connection> {
    let connection = Connection::sqlite(rusqlite::Connection::open(path)?);
    connection.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; \
         PRAGMA busy_timeout = 10000; PRAGMA cache_size = -65536;",
    )?;
    Ok(connection)
}

/// Where a store lives, for what works without a server (the CLI).
#[derive(Clone, Copy, Debug)]
pub enum Location<'a> {
    /// The embedded database in this data directory (created if needed).
    Embedded(&'a Path),
    /// A PostgreSQL database (`postgres://...`).
    Postgres(&'a str),
}

impl std::fmt::Display for Location<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Embedded(data_dir) => write!(f, "{data_dir:?}"),
            // Not the URL: it may hold a password.
            Location::Postgres(_) => f.write_str("the PostgreSQL database"),
        }
    }
}

impl Location<'_> {
    /// A connection to the store, its schema migrated; how many migrations ran.
    fn connect_migrated(self) -> Result<(Connection, usize), StoreError> {
        let connection = match self {
            Location::Embedded(data_dir) => {
                std::fs::create_dir_all(data_dir)
                    .map_err(|e| StoreError::Unavailable(format!("create {data_dir:?}: {e}")))?;
                connect(&database_path(data_dir)).map_err(unavailable)?
            }
            Location::Postgres(url) => Connection::postgres(url).map_err(unavailable)?,
        };
        let applied = schema::migrate(&connection).map_err(unavailable)?;
        Ok((connection, applied))
    }
}

/// Create or upgrade the schema; returns how many migrations ran.
pub fn migrate(location: Location<'_>) -> Result<usize, StoreError> {
    location.connect_migrated().map(|(_, applied)| applied)
}

/// Insert an API key directly (the CLI, with or without a server running).
pub fn insert_api_key(
    location: Location<'_>,
    id: &str,
    key_hash: &str,
    scope: &str,
    now: Timestamp,
) -> Result<(), StoreError> {
    let (connection, _) = location.connect_migrated()?;
    connection
        .execute(
            "INSERT INTO api_keys (id, key_hash, scope, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![id, key_hash, scope, now.micros()],
        )
        .map_err(unavailable)?;
    Ok(())
}

/// Every API key, read directly (the CLI, with or without a server running).
pub fn list_api_keys(location: Location<'_>) -> Result<Vec<ApiKeyInfo>, StoreError> {
    let (connection, _) = location.connect_migrated()?;
    rows::api_keys(&connection).map_err(unavailable)
}

/// Revoke an API key directly (the CLI); `None` if there is no such key.
/// Servers that looked the key up in the last 10 s may still take it
/// until their cache of keys expires.
pub fn revoke_api_key(
    location: Location<'_>,
    id: &str,
    now: Timestamp,
) -> Result<Option<ApiKeyInfo>, StoreError> {
    let (connection, _) = location.connect_migrated()?;
    rows::revoke_api_key(&connection, id, now).map_err(unavailable)
}

/// The PostgreSQL writer's thread: lead, write until the store closes, and
/// lead again whenever the writer's connection is lost (the database
/// restarted or failed over, the network dropped, a refused `COPY` left the
/// connection out of step).
///
/// While it does not lead, this server answers writes 503 (`Store::execute`
/// and the forwarding layer), and each command already queued is answered
/// `Unavailable` unapplied. Nothing acknowledged is lost: a group counts
/// only once its `COMMIT` returned, and the new writer loads its state from
/// what is committed. If another server took the leader lock meanwhile, this
/// one follows it: it waits for the lock like any follower, and its stream
/// consumers and webhook deliveries, which run only while it leads, stop
/// until it leads again. An error that is not about the connection (the
/// state it loads is corrupt, say) stops the process, as before it ever led.
fn write_postgres(
    url: &str,
    leader: &Leadership,
    clock: Arc<dyn Clock>,
    options: Options,
    sync: &Arc<writer::SyncState>,
    mut receiver: mpsc::Receiver<writer::Job>,
    syncer: &std::sync::mpsc::SyncSender<writer::Durable>,
) {
    let mut lead_state = LeadState::default();
    let mut pause = LEAD_RETRY_FIRST;
    loop {
        let led = lead(
            url,
            leader,
            clock.clone(),
            options,
            sync,
            &mut lead_state,
            &mut || refuse_queued(&mut receiver, "this server does not run the writer"),
        );
        let retry = match led {
            Ok(Led::Writer(writer)) => {
                pause = LEAD_RETRY_FIRST;
                match writer.run(&mut receiver, syncer, sync) {
                    writer::Stopped::Closed => return,
                    writer::Stopped::ConnectionLost(error) => {
                        leader.is_leader.send_replace(false);
                        sync.end_live_streams();
                        tracing::error!(
                            %error,
                            "the writer lost its connection to PostgreSQL; writes are answered 503 until it leads again"
                        );
                    }
                }
                false
            }
            Ok(Led::Closed) => return,
            Err(error) if error.is_transient() => {
                tracing::warn!(%error, retry_in_ms = pause.as_millis() as u64, "cannot lead the PostgreSQL database yet");
                true
            }
            // A refusal this server expects (a newer schema, the engine's
            // clock ahead of its own): it stops with the reason and exit
            // status 1, not by a panic's abort (status 134, a core dump).
            Err(error) => {
                tracing::error!(%error, "cannot become the writer; stopping the process");
                eprintln!("Error: cannot become the writer: {error}");
                std::process::exit(1);
            }
        };
        if refuse_queued(&mut receiver, "the writer is reconnecting to PostgreSQL") {
            return;
        }
        if retry {
            std::thread::sleep(pause);
            pause = (pause * 2).min(LEAD_RETRY_MAX);
        }
    }
}

/// First and longest pause between two attempts to lead the database.
const LEAD_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(100);
const LEAD_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// How long leading again may spend ending this server's own lost session
/// before it gives up: the process stops then, and a restart waits for the
/// lock like any follower (ending a session takes milliseconds; one that
/// outlives this is not PostgreSQL's usual behaviour).
const END_LOST_SESSION_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Answer every queued command `Unavailable`, unapplied; whether the store
/// has closed (no command can come any more).
fn refuse_queued(receiver: &mut mpsc::Receiver<writer::Job>, why: &str) -> bool {
    loop {
        match receiver.try_recv() {
            Ok(job) => writer::fail_jobs([job], why),
            Err(mpsc::error::TryRecvError::Empty) => return false,
            Err(mpsc::error::TryRecvError::Disconnected) => return true,
        }
    }
}

/// What this server's writer thread knows of its own leading.
#[derive(Default)]
struct LeadState {
    /// The last session of this server that held the leader lock, recorded
    /// as soon as it took it: if the connection is lost, PostgreSQL may not
    /// have seen it end yet, and that session still holds the lock.
    previous: Option<Session>,
    /// Whether this server has led before (for the log).
    has_led: bool,
}

/// A PostgreSQL session, told apart from a later one that reuses its
/// process id by when it started. On a direct connection (a pooler that
/// hands one server session to several clients would defeat this, as it
/// would the session-level leader lock itself).
#[derive(Clone, Debug, PartialEq)]
struct Session {
    pid: i64,
    /// `pg_stat_activity.backend_start` in µs since the epoch; `None` when
    /// it is not visible (another role's session).
    started: Option<i64>,
}

const SESSION_SQL: &str =
    "SELECT pid, CAST(EXTRACT(EPOCH FROM backend_start) * 1000000 AS bigint) \
     FROM pg_stat_activity WHERE pid = pg_backend_pid()";

/// The sessions holding advisory lock `(?1, ?2)` in this database, joined
/// to their activity (`a`): the rest of a statement that reads the leader
/// lock's holder.
macro_rules! lock_holder_from {
    () => {
        " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND CAST(l.classid AS bigint) = ?1 AND CAST(l.objid AS bigint) = ?2"
    };
}

/// The session holding the leader lock in this database, if any.
const LOCK_HOLDER_SQL: &str = concat!(
    "SELECT a.pid, CAST(EXTRACT(EPOCH FROM a.backend_start) * 1000000 AS bigint)",
    lock_holder_from!()
);

fn read_session(row: &db::Row<'_>) -> db::Result<Session> {
    Ok(Session {
        pid: row.get(0)?,
        started: row.get(1)?,
    })
}

enum Led {
    /// This server leads, with this writer.
    Writer(Box<writer::Writer>),
    /// The store closed while this server waited for the lock.
    Closed,
}

/// How often a server waiting for the leader lock answers the commands
/// queued meanwhile (`Unavailable`: a request that saw this server lead just
/// before it stopped leading).
const ANSWER_QUEUED_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Become the writer of a PostgreSQL database: take the leader lock (held by
/// this connection's session for as long as it lives, so a writer whose
/// connection is gone can no longer commit), record where this server
/// listens, and load the writer's state from what is committed.
///
/// The first time, it waits for the lock: one `pg_advisory_lock`, pending for
/// as long as another session holds it, while `between_waits` answers the
/// commands queued meanwhile every [`ANSWER_QUEUED_EVERY`] and says whether
/// the store has closed ([`Led::Closed`]). After its
/// connection was lost it does not wait at first: if the lock is free it
/// leads again; if its own last session still holds it (PostgreSQL has not
/// yet seen that connection end), it ends that session and tries again
/// (when another server is waiting for the lock, that server gets it then);
/// if another server holds it, this server follows that one and waits for
/// the lock like any follower.
fn lead(
    url: &str,
    leader: &Leadership,
    clock: Arc<dyn Clock>,
    options: Options,
    sync: &writer::SyncState,
    state: &mut LeadState,
    between_waits: &mut dyn FnMut() -> bool,
) -> db::Result<Led> {
    let connection = Connection::postgres(url)?;
    // Waiting for the lock may take as long as another server lives, and the
    // session then holds it for this server's life: no timeout may end either.
    connection.execute_batch(&format!(
        "SET lock_timeout = 0; SET statement_timeout = 0; \
         SET idle_in_transaction_session_timeout = 0; SET application_name = '{STARTING_APPLICATION}'"
    ))?;
    // A group's callers are answered once its COMMIT returns, which must
    // mean the commit is durable: with `synchronous_commit = off` (set for
    // the server, the database or the role) PostgreSQL answers before the
    // WAL is flushed, and a crash could lose charges already acknowledged.
    // Every other value (`local`, `on`, `remote_write`, `remote_apply`)
    // flushes locally first, and is kept.
    let synchronous: String =
        connection.query_row("SELECT current_setting('synchronous_commit')", [], |row| {
            row.get(0)
        })?;
    if synchronous == "off" {
        tracing::warn!(
            "synchronous_commit is off for this database or role; the writer's session sets it on, \
             so that nothing acknowledged can be lost in a crash"
        );
        connection.execute_batch("SET synchronous_commit = on")?;
    }
    let session = connection.query_row(SESSION_SQL, [], read_session)?;
    let deadline = std::time::Instant::now() + END_LOST_SESSION_WITHIN;
    loop {
        if state.previous.is_none() {
            let _watch = SilentLeaderWatch::start(url);
            if !connection.wait_for_advisory_lock(
                LEADER_LOCK,
                ANSWER_QUEUED_EVERY,
                between_waits,
            )? {
                return Ok(Led::Closed);
            }
            break;
        }
        let locked: bool =
            connection.query_row("SELECT pg_try_advisory_lock(?1)", [LEADER_LOCK], |row| {
                row.get(0)
            })?;
        if locked {
            break;
        }
        let holder = connection
            .query_row(
                LOCK_HOLDER_SQL,
                [LEADER_LOCK >> 32, LEADER_LOCK & 0xffff_ffff],
                read_session,
            )
            .optional()?;
        match holder {
            Some(holder)
                if Some(&holder) == state.previous.as_ref() && holder.started.is_some() =>
            {
                if std::time::Instant::now() >= deadline {
                    panic!(
                        "this server's lost writer session {} still holds the leader lock after {:?}",
                        holder.pid, END_LOST_SESSION_WITHIN
                    );
                }
                tracing::warn!(
                    pid = holder.pid,
                    "this server's lost writer session still holds the leader lock; ending it"
                );
                connection.query_row(
                    "SELECT pg_terminate_backend(?1)",
                    [holder.pid],
                    |_| Ok(()),
                )?;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            // Another server's session: follow it, and wait for the lock.
            Some(_) => {
                if state.has_led {
                    tracing::warn!(
                        "another server took over the writer while this server's connection was lost; \
                         this server follows it and waits for the leader lock"
                    );
                }
                state.previous = None;
            }
            // Released between the two statements: try again.
            None => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
    // The lock is this session's from here until the connection ends.
    state.previous = Some(session);
    // Newer servers may have migrated the database while this one ran (a
    // rolling upgrade): this build must not write to it. The error stops the
    // process, which releases the lock to a server that knows the schema.
    schema::refuse_newer(&connection)?;
    let advertise = loop {
        if let Some(url) = leader.advertise.get() {
            break url.clone();
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let now = clock.now().micros();
    let writer = writer::Writer::new(connection, clock, options)?;
    // Every committed notification is durable on PostgreSQL.
    sync.durable_notification.fetch_max(
        writer.last_notification(),
        std::sync::atomic::Ordering::AcqRel,
    );
    // Only now, ready to take commands, does this server ask for them.
    writer.connection().execute(
        "INSERT INTO leader (id, url, since) VALUES (1, ?1, ?2) \
         ON CONFLICT (id) DO UPDATE SET url = excluded.url, since = excluded.since",
        params![advertise, now],
    )?;
    // From here the followers' watch judges this session as a leader's (10 s
    // silent), no longer as a starting one's (60 s: loading may keep this
    // process busy between two statements for longer).
    writer
        .connection()
        .execute_batch(&format!("SET application_name = '{WRITER_APPLICATION}'"))?;
    match state.has_led {
        false => tracing::info!(advertise, "this server now runs the writer (leader)"),
        true => tracing::warn!(
            advertise,
            "this server runs the writer again, on a new connection"
        ),
    }
    state.has_led = true;
    leader.is_leader.send_replace(true);
    Ok(Led::Writer(Box::new(writer)))
}

/// How long the leader's session may wait on its server, unchanged, before
/// a follower ends it and takes the lock. A live leader is never this quiet:
/// its writer speaks to the database at least once a second.
const LEADER_SILENT_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The `application_name` of a writer's session once it has loaded its
/// state and leads.
const WRITER_APPLICATION: &str = "tally-writer";

/// The `application_name` of a session that waits for the leader lock, or
/// has taken it and loads the writer's state.
const STARTING_APPLICATION: &str = "tally-writer-starting";

/// How long a session that took the lock but does not lead yet may wait on
/// its server, unchanged: loading a large database may keep its server busy
/// between two statements for longer than [`LEADER_SILENT_LIMIT`]. A
/// follower whose process stopped while it waited in the lock's queue is
/// granted the lock all the same, and holds it this long at most.
const STARTING_SILENT_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// How often a waiting follower looks at the leader's session.
const WATCH_LEADER_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The session holding the leader lock, if it is a Tally writer's: its
/// process, when it started and when its state last changed (µs since the
/// epoch, told apart only by equality), whether it is waiting for its
/// client (idle, in a transaction or not, or in a statement waiting for the
/// client's next bytes: a `COPY` or a message cut off), and whether it leads
/// (else it took the lock and loads, or has yet to).
const LEADER_SESSION_SQL: &str = concat!(
    "SELECT a.pid, CAST(EXTRACT(EPOCH FROM a.backend_start) * 1000000 AS bigint), \
     CAST(EXTRACT(EPOCH FROM a.state_change) * 1000000 AS bigint), \
     (a.state LIKE 'idle%' OR (a.state = 'active' AND a.wait_event = 'ClientRead')), \
     a.application_name = ?3",
    lock_holder_from!(),
    " AND a.application_name IN (?3, ?4)"
);

/// End session `?1` only if it is still the one seen: the same start and
/// the same last change of state.
const END_SILENT_SESSION_SQL: &str =
    "SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a WHERE a.pid = ?1 \
     AND CAST(EXTRACT(EPOCH FROM a.backend_start) * 1000000 AS bigint) = ?2 \
     AND CAST(EXTRACT(EPOCH FROM a.state_change) * 1000000 AS bigint) = ?3";

/// A follower's watch on the leader, while it waits for the leader lock.
///
/// A leader whose process stalled (stopped, a paused VM, cut off from the
/// network) keeps its PostgreSQL session, and with it the lock, for as long
/// as its kernel answers, or until TCP gives up: no other server could write
/// meanwhile. A live leader speaks to the database at least once a second
/// (its writer pings when idle). So a follower that sees the leader's session
/// waiting on its client with the same state, unchanged, for
/// [`LEADER_SILENT_LIMIT`] by this follower's own monotonic clock (no wall
/// clock is involved, the database's included) ends that session. This is
/// safe whatever the leader was doing: the lock is the session's, so the
/// ended session can no longer commit (a group it had open rolls back,
/// unanswered, and its callers' retries go to the new leader), and when the
/// stalled process goes on it finds its connection gone and follows like any
/// server whose connection was lost.
struct SilentLeaderWatch {
    url: String,
    connection: Option<Connection>,
    /// The leader's session as last seen waiting on its client
    /// `(pid, started, state changed)`, and since when (this server's clock).
    seen: Option<((i64, i64, i64), std::time::Instant)>,
    /// The last error logged, so that a lasting one is logged once.
    logged: Option<String>,
}

/// Ends the watch's thread when dropped (the wait for the lock is over).
struct WatchGuard {
    _stop: std::sync::mpsc::Sender<()>,
}

impl SilentLeaderWatch {
    /// Watch from a thread of its own (the waiting connection's thread is
    /// inside its runtime), until the guard is dropped.
    fn start(url: &str) -> WatchGuard {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let mut watch = SilentLeaderWatch {
            url: url.to_owned(),
            connection: None,
            seen: None,
            logged: None,
        };
        let spawned = std::thread::Builder::new()
            .name("tally-leader-watch".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(WATCH_LEADER_EVERY)
                {
                    watch.look();
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start the thread that watches the leader");
        }
        WatchGuard { _stop: stop }
    }

    fn look(&mut self) {
        match self.end_silent_leader() {
            Ok(()) => self.logged = None,
            Err(error) => {
                let lost = error.is_transient()
                    || self.connection.as_ref().is_none_or(Connection::is_stale);
                if lost {
                    // Looked at again next time, on a new connection.
                    self.connection = None;
                }
                let message = error.to_string();
                if self.logged.as_ref() != Some(&message) {
                    tracing::warn!(%error, "cannot look at the leader's session (a stalled leader would not be replaced)");
                    self.logged = Some(message);
                }
            }
        }
    }

    fn end_silent_leader(&mut self) -> db::Result<()> {
        let connection = match &mut self.connection {
            Some(connection) => connection,
            empty => empty.insert(Connection::postgres(&self.url)?),
        };
        type Seen = (i64, Option<i64>, Option<i64>, Option<bool>, bool);
        let session: Option<Seen> = connection
            .query_row(
                LEADER_SESSION_SQL,
                params![
                    LEADER_LOCK >> 32,
                    LEADER_LOCK & 0xffff_ffff,
                    WRITER_APPLICATION,
                    STARTING_APPLICATION
                ],
                |row| {
                    Ok((
                        row.get(0)?,
                        row.get(1)?,
                        row.get(2)?,
                        row.get(3)?,
                        row.get(4)?,
                    ))
                },
            )
            .optional()?;
        // Another role's session shows no state: it cannot be judged.
        let Some((pid, Some(started), Some(changed), Some(true), leads)) = session else {
            self.seen = None;
            return Ok(());
        };
        let now = std::time::Instant::now();
        let since = match self.seen {
            Some((seen, since)) if seen == (pid, started, changed) => since,
            _ => {
                self.seen = Some(((pid, started, changed), now));
                return Ok(());
            }
        };
        let silent = now.duration_since(since);
        let limit = match leads {
            true => LEADER_SILENT_LIMIT,
            false => STARTING_SILENT_LIMIT,
        };
        if silent < limit {
            return Ok(());
        }
        tracing::warn!(
            pid,
            silent_ms = silent.as_millis() as u64,
            "the leader's PostgreSQL session has been waiting on its server too long (the server stalled or is cut off); ending it so that a live server takes over"
        );
        connection
            .query_row(
                END_SILENT_SESSION_SQL,
                params![pid, started, changed],
                |_| Ok(()),
            )
            .optional()?;
        self.seen = None;
        Ok(())
    }
}

fn unavailable(error: db::Error) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

/// Where the data lives.
enum Backend {
    /// The embedded database file, locked by this process.
    Sqlite { path: PathBuf, _lock: File },
    /// A PostgreSQL database that several servers may share: one of them
    /// (the leader) runs the writer at a time.
    Postgres {
        url: String,
        leader: Arc<Leadership>,
    },
}

/// This server's part in a shared PostgreSQL database: only the holder of
/// the leader lock writes (see ARCHITECTURE.md, "Several servers").
struct Leadership {
    /// Set once this server's writer holds the lock and has loaded its state.
    is_leader: tokio::sync::watch::Sender<bool>,
    /// The URL other servers forward writes to, given once the server listens.
    advertise: std::sync::OnceLock<String>,
}

/// The advisory lock whose holder is the one writer of a PostgreSQL database.
const LEADER_LOCK: i64 = 0x7461_6c6c_0002;

/// Reads running at once on PostgreSQL, and its read connections kept open
/// (the server's `max_connections` is shared by every Tally server).
const POSTGRES_READS: usize = 16;

struct Inner {
    sender: mpsc::Sender<writer::Job>,
    /// Read connections kept open: as many as reads may run at once, so that
    /// no read under load pays for a new connection (a PostgreSQL connection
    /// is a new server process).
    readers: Mutex<Vec<Connection>>,
    /// Bounds the reads running at once, each on a connection of `readers`.
    reads: Arc<tokio::sync::Semaphore>,
    /// The permits of `reads`, and so the connections `readers` keeps.
    max_readers: usize,
    /// Read connections opened so far (see `read_connections_opened`).
    opened_readers: std::sync::atomic::AtomicUsize,
    backend: Backend,
    clock: Arc<dyn Clock>,
    /// How late a usage event may come (`Options::event_window_seconds`):
    /// how far after a window a price simulation looks for its usage.
    event_window_seconds: i64,
    /// Shared with the writer and the syncer: the live stream's channel and
    /// the last durable notification (the webhook worker reads up to it).
    sync: Arc<writer::SyncState>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A PostgreSQL client closes by blocking on its own runtime, which
        // panics on an async thread (where the last handle may be dropped).
        let readers = std::mem::take(&mut *self.readers.lock().expect("reader pool"));
        if !readers.is_empty() {
            let _ = std::thread::Builder::new()
                .name("tally-close".into())
                .spawn(move || drop(readers));
        }
    }
}

/// Run a thread's body; if it panics (a broken invariant), stop the process.
/// A store whose writer died would otherwise answer 503 forever while looking
/// alive; a restart recovers from what is durable.
fn abort_on_panic(thread: &str, body: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).is_err() {
        // Even if writing the log fails too: the process must stop, not go
        // on without its writer.
        let _ = std::panic::catch_unwind(|| {
            tracing::error!(thread, "a store thread panicked; stopping the process");
        });
        std::process::abort();
    }
}

/// Copy the write-ahead log into the database file in the background until
/// the store is dropped: every [`CHECKPOINT_BUSY`] while the log changes
/// between passes, backing off to [`CHECKPOINT_IDLE`] while it does not. PASSIVE
/// never blocks the writer or readers. Each pass tells the writer how long
/// the log is (it makes the log start over once it is long:
/// `restart_log_if_long`).
///
/// Short passes keep the log's fsyncs short. The sync of the database file
/// and the syncer's fsync of the log share one device queue: with a pass
/// every 250 ms, each sync took 8–21 ms at 55,000 charges/s (with fewer
/// pages to write than now, in a throwaway build), and the log's fsync that
/// ran beside it waited about as long, four times a second, holding every
/// answer behind it. With a pass every 10 ms, a sync took 0.08 ms at the
/// median and about 2 ms at p90 (BENCHMARKS.md).
///
/// Each pass that copied pages also syncs the database file. SQLite syncs it
/// only in a pass that copies the whole log, and under steady load that is
/// only the writer's own pass before the log starts over: that pass then
/// paid for every page the background passes had copied since the last
/// restart, 11–15 ms on the writer's thread every half second at 71,000
/// charges/s (BENCHMARKS.md). A failed sync stops the process, as a failed
/// sync of the log does: the kernel may have dropped the pages, and a later
/// sync would report success.
fn spawn_checkpointer(
    store: std::sync::Weak<Inner>,
    path: PathBuf,
    restart_frames: i64,
) -> Result<(), StoreError> {
    let connection = connect(&path).map_err(unavailable)?;
    let database =
        file_to_sync(&path).map_err(|e| StoreError::Unavailable(format!("open {path:?}: {e}")))?;
    // SQLite reports the frames copied since the log last started over, so a
    // pass copied something when that (or the log) changed since the last.
    let mut last = (0, 0);
    // One pass: copy what the log holds, sync the file if that copied
    // anything; the log's length, and whether the log changed since the
    // last pass (it grew, or started over).
    let mut pass = move || -> Option<(i64, bool)> {
        let checkpoint = connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
        });
        match checkpoint {
            Ok((frames, copied)) => {
                let changed = (frames, copied) != last;
                // Only when this pass copied pages: a log that grew while a
                // reader's snapshot kept the pass from copying has nothing
                // new in the file to sync.
                let copied_more = copied != last.1 || frames < last.0;
                if copied > 0 && copied_more {
                    if let Err(error) = database.sync_data() {
                        tracing::error!(%error, database = ?path, "fsync of the database file failed; stopping");
                        std::process::abort();
                    }
                }
                last = (frames, copied);
                Some((frames, changed))
            }
            Err(error) => {
                tracing::warn!(%error, "checkpoint failed");
                None
            }
        }
    };
    std::thread::Builder::new()
        .name("tally-checkpoint".into())
        .spawn(move || {
            let mut interval = CHECKPOINT_BUSY;
            loop {
                std::thread::sleep(interval);
                // Not holding the store while checkpointing: its last handle
                // may be dropped meanwhile (and its directory reopened).
                let Some(sync) = store.upgrade().map(|inner| inner.sync.clone()) else {
                    break;
                };
                let started = std::time::Instant::now();
                let Some((mut frames, changed)) = pass() else {
                    // A failing pass backs off like an idle one, so that its
                    // warning is not logged a hundred times a second.
                    interval = next_checkpoint_interval(interval, false);
                    continue;
                };
                if changed {
                    tracing::debug!(
                        took_us = started.elapsed().as_micros() as u64,
                        frames,
                        "checkpoint pass"
                    );
                }
                interval = next_checkpoint_interval(interval, changed);
                // A long log is about to start over, in the writer's own
                // pass: copy at once what was committed during this pass, so
                // that the writer's pass is left with a group or two.
                if frames >= restart_frames {
                    frames = pass().map_or(frames, |(frames, _)| frames);
                }
                sync.wal_frames
                    .store(frames, std::sync::atomic::Ordering::Release);
            }
        })
        .map_err(|e| StoreError::Unavailable(format!("spawn checkpointer: {e}")))?;
    Ok(())
}

/// A descriptor of the database file to sync it with: one per file per
/// process, never closed. Closing any descriptor of a file drops every POSIX
/// lock the process holds on it, SQLite's included, and another process
/// could then think itself the file's last user and remove the log.
fn file_to_sync(path: &Path) -> std::io::Result<&'static File> {
    use std::os::unix::fs::MetadataExt;
    type Files = Vec<((u64, u64), &'static File)>;
    static FILES: Mutex<Files> = Mutex::new(Vec::new());
    let metadata = std::fs::metadata(path)?;
    let key = (metadata.dev(), metadata.ino());
    let mut files = FILES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, file)) = files.iter().find(|(k, _)| *k == key) {
        return Ok(file);
    }
    let file: &'static File = Box::leak(Box::new(File::options().write(true).open(path)?));
    files.push((key, file));
    Ok(file)
}

/// The pause between checkpoint passes while the log grows.
const CHECKPOINT_BUSY: std::time::Duration = std::time::Duration::from_millis(10);

/// The longest pause between passes, reached by doubling while passes find
/// the log unchanged (an idle store wakes the thread four times a second).
const CHECKPOINT_IDLE: std::time::Duration = std::time::Duration::from_millis(250);

/// The pause before the next checkpoint pass: short again as soon as a pass
/// finds the log changed, doubling up to [`CHECKPOINT_IDLE`] while it does
/// not (or while passes fail).
fn next_checkpoint_interval(
    interval: std::time::Duration,
    log_changed: bool,
) -> std::time::Duration {
    if log_changed {
        CHECKPOINT_BUSY
    } else {
        (interval * 2).min(CHECKPOINT_IDLE)
    }
}

/// Failures of the writer since the store opened. A write group the
/// database refuses is applied again in smaller groups, so that only the
/// command it cannot take fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteFailures {
    /// Write groups that failed as they first ran.
    pub groups: u64,
    /// Commands that failed even on their own (answered `Unavailable`).
    pub commands: u64,
    /// Customers left out of ticks for now, because writing their
    /// expiries or renewals failed on its own (retried after ten minutes).
    pub quarantined: usize,
}

/// A command in the writer's queue ([`Store::submit`]).
pub struct Pending(oneshot::Receiver<Result<Executed, StoreError>>);

impl Pending {
    /// The command's outcome, once durable (or refused).
    pub async fn answer(self) -> Result<Executed, StoreError> {
        self.0
            .await
            .map_err(|_| StoreError::Unavailable("the writer has stopped".into()))?
    }
}

/// The handle to an open store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// Settings of the engine.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Usage events older than this (by their timestamp, on the engine's
    /// clock) are refused with `event_too_old`.
    pub event_window_seconds: i64,
    /// Frames of the embedded store's write-ahead log beyond which the
    /// writer makes it start over (tests set it low).
    pub wal_restart_frames: i64,
    /// Active lots each tick looks at for `grant.expiring` warnings (tests
    /// set it low).
    pub expiring_chunk: usize,
}

/// How far ahead of the engine's clock an event's timestamp may be (clock skew).
pub const EVENT_FUTURE_SKEW_SECONDS: i64 = 300;

impl Default for Options {
    fn default() -> Options {
        Options {
            event_window_seconds: 30 * 24 * 3600,
            wal_restart_frames: writer::WAL_RESTART_FRAMES,
            expiring_chunk: writer::EXPIRING_CHUNK,
        }
    }
}

impl Store {
    /// Open (creating and migrating) the store in `data_dir`. Only one process
    /// may open a data directory at a time.
    pub fn open(data_dir: &Path, clock: Arc<dyn Clock>) -> Result<Store, StoreError> {
        Store::open_with(data_dir, clock, Options::default())
    }

    /// [`Store::open`] with settings.
    pub fn open_with(
        data_dir: &Path,
        clock: Arc<dyn Clock>,
        options: Options,
    ) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| StoreError::Unavailable(format!("create {data_dir:?}: {e}")))?;
        // Lock first: never migrate a database another server is running on.
        let lock_path = data_dir.join("tally.lock");
        let lock = File::create(&lock_path)
            .map_err(|e| StoreError::Unavailable(format!("{lock_path:?}: {e}")))?;
        lock.try_lock_exclusive().map_err(|_| {
            StoreError::Unavailable(format!(
                "another tally process is using the data directory {data_dir:?}"
            ))
        })?;
        migrate(Location::Embedded(data_dir))?;
        let path = database_path(data_dir);
        let connection = connect(&path).map_err(unavailable)?;
        // Checkpoints run on their own thread so the writer never pays for them,
        // and commits do not fsync: the syncer thread does, before any answer.
        connection
            .execute_batch("PRAGMA wal_autocheckpoint = 0; PRAGMA synchronous = NORMAL")
            .map_err(unavailable)?;
        let mut wal_path = path.clone().into_os_string();
        wal_path.push("-wal");
        let wal_path = PathBuf::from(wal_path);
        // What a crashed process left in the log may not be on disk yet:
        // make it so before counting its notifications as durable.
        if let Ok(wal) = std::fs::OpenOptions::new().write(true).open(&wal_path) {
            wal.sync_data()
                .map_err(|e| StoreError::Unavailable(format!("fsync {wal_path:?}: {e}")))?;
        }
        let writer =
            writer::Writer::new(connection, clock.clone(), options).map_err(unavailable)?;
        let on_disk = writer.last_notification();
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let (to_syncer, syncer_groups) =
            std::sync::mpsc::sync_channel(writer::MAX_GROUPS_IN_FLIGHT);
        let sync_state = writer::SyncState::new(on_disk);
        let sync = sync_state.clone();
        let for_syncer = sync_state.clone();
        std::thread::Builder::new()
            .name("tally-sync".into())
            .spawn(move || {
                abort_on_panic("syncer", || {
                    writer::run_syncer(Some(wal_path), syncer_groups, for_syncer)
                })
            })
            .map_err(|e| StoreError::Unavailable(format!("spawn syncer: {e}")))?;
        std::thread::Builder::new()
            .name("tally-writer".into())
            .spawn(move || {
                abort_on_panic("writer", || {
                    let mut receiver = receiver;
                    // Only a PostgreSQL writer loses its connection.
                    let _ = writer.run(&mut receiver, &to_syncer, &sync_state);
                })
            })
            .map_err(|e| StoreError::Unavailable(format!("spawn writer: {e}")))?;
        let inner = Arc::new(Inner {
            sender,
            readers: Mutex::new(Vec::new()),
            reads: Arc::new(tokio::sync::Semaphore::new(SQLITE_READS)),
            max_readers: SQLITE_READS,
            opened_readers: std::sync::atomic::AtomicUsize::new(0),
            backend: Backend::Sqlite {
                path: path.clone(),
                _lock: lock,
            },
            clock,
            event_window_seconds: options.event_window_seconds,
            sync,
        });
        spawn_checkpointer(Arc::downgrade(&inner), path, options.wal_restart_frames)?;
        Ok(Store { inner })
    }

    /// Open (migrating) the store in a PostgreSQL database, which other
    /// servers may share. The writer starts once this server holds the
    /// leader lock and [`Store::advertise`] has told it where it listens;
    /// until then [`Store::execute`] answers `Unavailable` and writes are for
    /// the leader (the HTTP server forwards them).
    pub fn open_postgres(
        url: &str,
        clock: Arc<dyn Clock>,
        options: Options,
    ) -> Result<Store, StoreError> {
        // The sync client runs its own runtime: keep it off the caller's
        // (which may be async).
        let migrate_url = url.to_owned();
        let start_clock = clock.clone();
        std::thread::spawn(move || {
            let (connection, _) = Location::Postgres(&migrate_url).connect_migrated()?;
            // A real clock far behind the engine's (a server without
            // --manual-clock joining a manual-clock database) is refused
            // now, not at the takeover that would move time back.
            let recorded =
                writer::check_engine_clock(&connection, &*start_clock).map_err(unavailable)?;
            // A manual clock starts where the servers over this database
            // have taken it (README: a server starting resumes from it),
            // even when that is behind the instant this one started at.
            if let Some(instant) = recorded {
                start_clock.resume(instant);
            }
            Ok::<_, StoreError>(())
        })
        .join()
        .map_err(|_| StoreError::Unavailable("migration thread panicked".into()))??;
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let (to_syncer, syncer_groups) =
            std::sync::mpsc::sync_channel(writer::MAX_GROUPS_IN_FLIGHT);
        let sync_state = writer::SyncState::new(0);
        let leader = Arc::new(Leadership {
            is_leader: tokio::sync::watch::channel(false).0,
            advertise: std::sync::OnceLock::new(),
        });
        let for_syncer = sync_state.clone();
        std::thread::Builder::new()
            .name("tally-sync".into())
            .spawn(move || {
                abort_on_panic("syncer", || {
                    writer::run_syncer(None, syncer_groups, for_syncer)
                })
            })
            .map_err(|e| StoreError::Unavailable(format!("spawn syncer: {e}")))?;
        let (writer_url, writer_leader, writer_clock, writer_sync) = (
            url.to_owned(),
            leader.clone(),
            clock.clone(),
            sync_state.clone(),
        );
        std::thread::Builder::new()
            .name("tally-writer".into())
            .spawn(move || {
                abort_on_panic("writer", || {
                    write_postgres(
                        &writer_url,
                        &writer_leader,
                        writer_clock,
                        options,
                        &writer_sync,
                        receiver,
                        &to_syncer,
                    )
                })
            })
            .map_err(|e| StoreError::Unavailable(format!("spawn writer: {e}")))?;
        Ok(Store {
            inner: Arc::new(Inner {
                sender,
                readers: Mutex::new(Vec::new()),
                reads: Arc::new(tokio::sync::Semaphore::new(POSTGRES_READS)),
                max_readers: POSTGRES_READS,
                opened_readers: std::sync::atomic::AtomicUsize::new(0),
                backend: Backend::Postgres {
                    url: url.to_owned(),
                    leader,
                },
                clock,
                event_window_seconds: options.event_window_seconds,
                sync: sync_state,
            }),
        })
    }

    /// Whether this server runs the writer: always for the embedded store;
    /// on PostgreSQL, once it holds the leader lock.
    pub fn is_leader(&self) -> bool {
        match &self.inner.backend {
            Backend::Sqlite { .. } => true,
            Backend::Postgres { leader, .. } => *leader.is_leader.borrow(),
        }
    }

    /// Wait until this server runs the writer (at once for the embedded store).
    pub async fn wait_until_leader(&self) {
        if let Backend::Postgres { leader, .. } = &self.inner.backend {
            let mut watch = leader.is_leader.subscribe();
            let _ = watch.wait_for(|leading| *leading).await;
        }
    }

    /// Wait until this server no longer runs the writer (on PostgreSQL, its
    /// connection was lost; never for the embedded store).
    pub async fn wait_until_follower(&self) {
        match &self.inner.backend {
            Backend::Postgres { leader, .. } => {
                let mut watch = leader.is_leader.subscribe();
                let _ = watch.wait_for(|leading| !*leading).await;
            }
            Backend::Sqlite { .. } => std::future::pending().await,
        }
    }

    /// Whether the store is a PostgreSQL database other servers may share.
    pub fn is_shared(&self) -> bool {
        matches!(self.inner.backend, Backend::Postgres { .. })
    }

    /// Where this server listens, for the others to forward writes to once it
    /// leads (PostgreSQL; ignored for the embedded store).
    pub fn advertise(&self, url: String) {
        if let Backend::Postgres { leader, .. } = &self.inner.backend {
            let _ = leader.advertise.set(url);
        }
    }

    /// The URL this server gave in [`Store::advertise`], if any.
    pub fn advertised(&self) -> Option<&str> {
        match &self.inner.backend {
            Backend::Postgres { leader, .. } => leader.advertise.get().map(String::as_str),
            _ => None,
        }
    }

    /// The URL of the server that runs the writer, as the database records it.
    pub async fn leader_url(&self) -> Result<Option<String>, StoreError> {
        self.read(|c| {
            c.query_row("SELECT url FROM leader WHERE id = 1", [], |row| row.get(0))
                .optional()
        })
        .await
    }

    /// On a server that does not run the writer: why it must not run beside
    /// the writer, when the writer said in the last minute that it runs on
    /// the other clock (real or manual) than this server. Two servers
    /// started at the same instant both pass the check at start.
    pub async fn clock_mode_conflict(&self) -> Result<Option<String>, StoreError> {
        let clock = self.inner.clock.clone();
        self.read(move |c| match writer::check_clock_mode(c, &*clock) {
            Ok(()) => Ok(None),
            Err(error @ db::Error::ClockModeDiffers { .. }) => Ok(Some(error.to_string())),
            Err(error) => Err(error),
        })
        .await
    }

    /// On a server that does not run the writer: move a manual clock up to
    /// the writer's, as its last tick recorded it (a system clock ignores
    /// it), so that reads here see what the writer sees.
    pub async fn follow_clock(&self) -> Result<(), StoreError> {
        let instant = self.read(writer::engine_clock).await?;
        if let Some(instant) = instant {
            self.inner.clock.catch_up(instant);
        }
        Ok(())
    }

    /// The engine's clock.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// What failed in the writer since this store opened (see
    /// [`WriteFailures`]).
    pub fn write_failures(&self) -> WriteFailures {
        use std::sync::atomic::Ordering::Relaxed;
        let sync = &self.inner.sync;
        WriteFailures {
            groups: sync.failed_groups.load(Relaxed),
            commands: sync.failed_commands.load(Relaxed),
            quarantined: sync.quarantined.load(Relaxed),
        }
    }

    /// Apply one command; answers once it is durable (or refused).
    pub async fn execute(
        &self,
        command: Command,
        actor: Option<String>,
    ) -> Result<Executed, StoreError> {
        self.submit(command, actor).await?.answer().await
    }

    /// Put one command in the writer's queue, and return once it is there:
    /// commands submitted one after another (each awaited before the next)
    /// are applied in that order. [`Pending::answer`] waits for the outcome,
    /// as [`Store::execute`] does.
    pub async fn submit(
        &self,
        command: Command,
        actor: Option<String>,
    ) -> Result<Pending, StoreError> {
        if !self.is_leader() {
            return Err(StoreError::Unavailable(
                "this server does not run the writer; send writes to the leader".into(),
            ));
        }
        let (reply, answer) = oneshot::channel();
        self.inner
            .sender
            .send(writer::Job::new(command, actor, reply))
            .await
            .map_err(|_| StoreError::Unavailable("the writer has stopped".into()))?;
        Ok(Pending(answer))
    }

    /// Read connections this store has opened since it opened: at most one
    /// per read that may run at once (16) while none breaks.
    pub fn read_connections_opened(&self) -> usize {
        self.inner
            .opened_readers
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Run a read on a pooled read connection, off the async threads.
    async fn read<T, F>(&self, read: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> db::Result<T> + Send + 'static,
    {
        // Held by the read's task until its connection is back in the pool,
        // even when the caller gives up meanwhile: no more reads run, and no
        // more connections are open, than there are permits.
        let permit = self
            .inner
            .reads
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable("the store is closing".into()))?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            // A connection the server closed meanwhile (PostgreSQL
            // restarted) is dropped, not tried.
            let pooled = loop {
                let next = inner.readers.lock().expect("reader pool").pop();
                match next {
                    Some(connection) if connection.is_stale() => drop(connection),
                    next => break next,
                }
            };
            let connection = match pooled {
                Some(connection) => connection,
                None => {
                    inner
                        .opened_readers
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    match &inner.backend {
                        Backend::Sqlite { path, .. } => {
                            let connection = connect(path).map_err(unavailable)?;
                            connection
                                .execute_batch("PRAGMA query_only = ON")
                                .map_err(unavailable)?;
                            connection
                        }
                        Backend::Postgres { url, .. } => {
                            Connection::postgres(url).map_err(unavailable)?
                        }
                    }
                }
            };
            // One snapshot for everything the read looks at (grants and holds
            // read in separate statements would otherwise see different groups).
            let result = connection.snapshot(read);
            let mut pool = inner.readers.lock().expect("reader pool");
            // The database went away (a failover to another host, say): the
            // other pooled connections are likely gone too, and one to a
            // vanished host would fail only after its timeouts.
            if result.as_ref().is_err_and(db::Error::is_connection_lost) {
                let stale = std::mem::take(&mut *pool);
                drop(pool);
                drop(stale);
                pool = inner.readers.lock().expect("reader pool");
            }
            let result = result.map_err(unavailable);
            // A broken connection is dropped, not pooled.
            if pool.len() < inner.max_readers && !connection.is_broken() {
                pool.push(connection);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("read task: {e}")))?
    }

    /// Copy the whole write-ahead log into the database and truncate it
    /// (benchmarks and maintenance; normal operation checkpoints on its own).
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        // Not through `read`: a checkpoint cannot run inside a read snapshot.
        let Backend::Sqlite { path, .. } = &self.inner.backend else {
            return Ok(());
        };
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            let connection = connect(&path)?;
            connection.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("checkpoint task: {e}")))?
        .map_err(unavailable)
    }

    pub async fn customer(&self, customer_id: Id) -> Result<Option<CustomerRecord>, StoreError> {
        self.read(move |c| rows::customer(c, customer_id.as_str()))
            .await
    }

    /// Every balance change from now on, as each becomes durable. A receiver
    /// that falls more than 4,096 changes behind gets `Lagged` and should
    /// re-read the balance.
    pub fn subscribe_changes(&self) -> tokio::sync::broadcast::Receiver<BalanceChange> {
        self.inner.sync.subscribe_live()
    }

    /// The endpoints with deliveries due now (of notifications already
    /// durable: a read can see a group committed but not yet fsynced).
    pub async fn due_endpoints(&self) -> Result<Vec<String>, StoreError> {
        let (now, durable) = (self.now(), self.durable_notification());
        self.read(move |c| rows::due_endpoints(c, now, durable))
            .await
    }

    /// The last notification made durable: deliveries of later ones wait.
    fn durable_notification(&self) -> i64 {
        self.inner
            .sync
            .durable_notification
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// One endpoint's deliveries due now (of notifications made durable),
    /// the oldest first.
    pub async fn due_deliveries_of(
        &self,
        endpoint_id: String,
        limit: i64,
    ) -> Result<Vec<DueDelivery>, StoreError> {
        let (now, durable) = (self.now(), self.durable_notification());
        self.read(move |c| rows::due_deliveries_of(c, &endpoint_id, now, durable, limit))
            .await
    }

    /// An endpoint's deliveries, the newest first.
    pub async fn deliveries(
        &self,
        endpoint_id: String,
        before: i64,
        limit: i64,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        self.read(move |c| rows::deliveries(c, &endpoint_id, before, limit))
            .await
    }

    /// Every webhook endpoint.
    pub async fn webhook_endpoints(&self) -> Result<Vec<WebhookEndpointRecord>, StoreError> {
        self.read(rows::webhook_endpoints).await
    }

    /// A customer's members (`None`: no such customer).
    pub async fn members(
        &self,
        customer_id: Id,
    ) -> Result<Option<Vec<tally_core::Member>>, StoreError> {
        let now = self.now();
        self.read(move |c| {
            let Some(rows::LoadedLedger { mut ledger, .. }) = rows::load_ledger(c, &customer_id)?
            else {
                return Ok(None);
            };
            // Hold timeouts that are due give back to the budgets first.
            ledger.expire_due(now);
            Ok(Some(ledger.members().cloned().collect()))
        })
        .await
    }

    /// Every credit pack, by key.
    pub async fn credit_packs(&self) -> Result<Vec<tally_core::CreditPack>, StoreError> {
        self.read(rows::credit_packs).await
    }

    /// A top-up by id.
    pub async fn topup(&self, id: Id) -> Result<Option<TopupRecord>, StoreError> {
        self.read(move |c| rows::topup(c, id.as_str())).await
    }

    /// A customer's top-ups, newest first, from before the `before` cursor;
    /// each with its cursor. `None`: no such customer.
    pub async fn topups(
        &self,
        customer_id: Id,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Option<Vec<(TopupRecord, i64)>>, StoreError> {
        self.read(move |c| {
            if rows::customer(c, customer_id.as_str())?.is_none() {
                return Ok(None);
            }
            rows::topups(c, customer_id.as_str(), before, limit).map(Some)
        })
        .await
    }

    /// A customer's automatic top-up. `None`: no such customer.
    pub async fn auto_topup(
        &self,
        customer_id: Id,
    ) -> Result<Option<Option<tally_core::AutoTopupState>>, StoreError> {
        self.read(move |c| {
            if rows::customer(c, customer_id.as_str())?.is_none() {
                return Ok(None);
            }
            rows::auto_topup(c, customer_id.as_str()).map(Some)
        })
        .await
    }

    /// A customer's alert settings (`Some(None)`: it set none). `None`: no
    /// such customer.
    pub async fn alerts(
        &self,
        customer_id: Id,
    ) -> Result<Option<Option<crate::model::Alerts>>, StoreError> {
        self.read(move |c| {
            if rows::customer(c, customer_id.as_str())?.is_none() {
                return Ok(None);
            }
            rows::alerts(c, customer_id.as_str()).map(Some)
        })
        .await
    }

    /// A plan by key.
    pub async fn plan(&self, key: String) -> Result<Option<tally_core::Plan>, StoreError> {
        self.read(move |c| rows::plan(c, &key)).await
    }

    /// Every plan, by key.
    pub async fn plans(&self) -> Result<Vec<tally_core::Plan>, StoreError> {
        self.read(rows::plans).await
    }

    /// The active subscription that would renew more than `limit` times by
    /// `to`, soonest, and the instant of its renewal past the limit (see
    /// `rows::renewing_more_than`): a manual clock moves in steps that
    /// renew no subscription more than so many times.
    pub async fn renewing_more_than(
        &self,
        limit: i64,
        to: Timestamp,
    ) -> Result<Option<(tally_core::Subscription, Timestamp)>, StoreError> {
        let now = self.now();
        self.read(move |c| rows::renewing_more_than(c, limit, now, to))
            .await
    }

    /// A customer's subscriptions (renewed if due), the active one first, then the latest.
    pub async fn subscriptions(
        &self,
        customer_id: Id,
    ) -> Result<Vec<tally_core::Subscription>, StoreError> {
        // A period that ended is renewed before it is shown.
        let key = customer_id.clone();
        self.read_renewed(&customer_id, self.now(), move |c| {
            rows::subscriptions(c, key.as_str())
        })
        .await
    }

    /// `read`, after renewing a subscription whose period has ended: the
    /// renewal writes (a grant), so it goes through the writer; between two
    /// ticks this makes a read of the customer's credits exact. The check is
    /// made in the read's own snapshot, so a read with nothing due costs one
    /// trip to a read connection; only a renewal reads twice.
    async fn read_renewed<T, F>(
        &self,
        customer_id: &Id,
        now: Timestamp,
        read: F,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> db::Result<T> + Clone + Send + 'static,
    {
        // A server that does not run the writer cannot renew: its read shows
        // the renewal once the writer's tick (every 500 ms) has applied it.
        if self.is_leader() {
            let (key, first) = (customer_id.clone(), read.clone());
            let unless_due = self
                .read(move |c| {
                    if rows::unrenewed_boundary(c, key.as_str(), now)?.is_some() {
                        return Ok(None);
                    }
                    first(c).map(Some)
                })
                .await?;
            if let Some(value) = unless_due {
                return Ok(value);
            }
            self.execute(
                Command::ApplyDue {
                    customer_id: customer_id.clone(),
                },
                None,
            )
            .await?;
        }
        self.read(read).await
    }

    /// The balance at the engine's now, with what is due already applied.
    pub async fn balance(&self, customer_id: Id) -> Result<Option<BalanceView>, StoreError> {
        // One instant for both: a boundary passing between them would show
        // the ending allocation expired without the next one.
        let now = self.now();
        let key = customer_id.clone();
        let follower = !self.is_leader();
        self.read_renewed(&customer_id, now, move |connection| {
            let Some(rows::LoadedLedger {
                mut ledger,
                grants: records,
                head: last_entry,
                ..
            }) = rows::load_ledger(connection, &key)?
            else {
                return Ok(None);
            };
            // Not before an expiry the rows already show: a server whose
            // clock trails the writer's (a follower, until its next tick
            // brings a manual clock's step; real clocks skewed by a few
            // milliseconds) would otherwise see the allocation that ended at
            // a boundary expired and the next one not yet in effect.
            let expired = records
                .iter()
                .filter_map(|record| record.grant.expired_at)
                .max();
            // Nor before the customer's last entry took effect: a follower
            // whose clock trails the writer's would otherwise show a grant
            // just made through it (or one the writer just put in effect)
            // as pending, against the entry the balance names. (Its
            // `effective_at`, never ahead of the writer's clock, unlike its
            // `recorded_at`, which moves a microsecond an entry.)
            let mut floor = expired;
            if follower {
                if let Some(sequence) = last_entry {
                    let effective: Option<i64> = connection
                        .prepare_cached("SELECT effective_at FROM entries WHERE sequence = ?1")?
                        .query_row([sequence], |row| row.get(0))
                        .optional()?;
                    floor = floor.max(effective.map(Timestamp));
                }
            }
            let mut now = floor.map_or(now, |floor| floor.max(now));
            // Nor after a renewal the rows do not show yet. Only the writer
            // renews (the leader's read has it renew first); a follower's
            // read past a boundary whose renewal is still to come (its
            // clock ahead of the writer's ticks, which take customers a
            // batch at a time) would show the ending allocation expired and
            // no next one: it is read as of just before the boundary.
            if follower {
                if let Some(boundary) = rows::unrenewed_boundary(connection, key.as_str(), now)? {
                    let before = Timestamp(boundary.micros() - 1);
                    now = expired.map_or(before, |floor| floor.max(before));
                }
            }
            ledger.expire_due(now);
            let grants = records
                .into_iter()
                .map(|mut record| {
                    if let Some(current) = ledger.grant(&record.grant.id) {
                        record.grant = current.clone();
                    }
                    record
                })
                .collect();
            Ok(Some(BalanceView {
                balance: ledger.balance(now),
                grants,
                now,
                last_entry,
            }))
        })
        .await
    }

    /// A customer's journal entries, newest first.
    /// A page of a customer's journal entries, newest first: a walk down the
    /// customer's chain of entries by primary key, at most [`MAX_LEDGER_WALK`]
    /// entries per page (a page of a sparse filter may hold fewer than `limit`
    /// entries and still have a next page).
    pub async fn ledger(
        &self,
        customer_id: Id,
        query: LedgerQuery,
    ) -> Result<Option<LedgerPage>, StoreError> {
        let page = self
            .read(move |connection| {
                let Some(head) = rows::customer_head(connection, customer_id.as_str())? else {
                    return Ok(Ok(None));
                };
                let mut at = query.start.or(head);
                let mut entries = Vec::new();
                let mut walked = 0;
                while let Some(sequence) = at {
                    if entries.len() >= query.limit || walked >= MAX_LEDGER_WALK {
                        break;
                    }
                    let Some((record, previous)) = rows::entry_link(connection, sequence)? else {
                        return Ok(Err(StoreError::BadCursor));
                    };
                    if record.draft.customer_id != customer_id {
                        return Ok(Err(StoreError::BadCursor));
                    }
                    walked += 1;
                    at = previous;
                    // effective_at <= recorded_at, and recorded_at falls along the walk.
                    if query.from.is_some_and(|from| record.recorded_at < from) {
                        at = None;
                        break;
                    }
                    let in_window = query
                        .from
                        .is_none_or(|from| record.draft.effective_at >= from)
                        && query.to.is_none_or(|to| record.draft.effective_at < to);
                    if in_window && query.matches(&record) {
                        entries.push(record);
                    }
                }
                Ok(Ok(Some(LedgerPage { entries, next: at })))
            })
            .await?;
        page
    }

    pub async fn entry(&self, sequence: i64) -> Result<Option<EntryRecord>, StoreError> {
        self.read(move |connection| {
            let sql = format!(
                "SELECT {} FROM entries WHERE sequence = ?1",
                rows::ENTRY_COLUMNS
            );
            connection
                .prepare_cached(&sql)?
                .query_row([sequence], rows::entry)
                .optional()
        })
        .await
    }

    pub async fn hold(&self, hold_id: Id) -> Result<Option<Hold>, StoreError> {
        self.read(move |connection| rows::hold_by_id(connection, hold_id.as_str()))
            .await
    }

    pub async fn api_key(&self, key_hash: String) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.read(move |connection| {
            connection
                .prepare_cached(
                    "SELECT id, scope FROM api_keys WHERE key_hash = ?1 AND revoked_at IS NULL",
                )?
                .query_row([key_hash], |row| {
                    Ok(ApiKeyRecord {
                        id: row.get(0)?,
                        scope: row.get(1)?,
                    })
                })
                .optional()
        })
        .await
    }

    /// Every API key (never the keys themselves), oldest first.
    pub async fn api_keys(&self) -> Result<Vec<ApiKeyInfo>, StoreError> {
        self.read(rows::api_keys).await
    }

    /// The price a hold placed by feature and quantity locked.
    pub async fn hold_pricing(
        &self,
        hold_id: Id,
    ) -> Result<Option<tally_core::pricebook::Pricing>, StoreError> {
        self.read(move |connection| catalog::hold_pricing(connection, hold_id.as_str()))
            .await
    }

    /// Dead letters by id after `after`, optionally of one status and source.
    pub async fn dead_letters(
        &self,
        status: Option<DeadLetterStatus>,
        source: Option<String>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<DeadLetterRecord>, StoreError> {
        self.read(move |connection| {
            rows::dead_letters(connection, status, source.as_deref(), after, limit)
        })
        .await
    }

    pub async fn dead_letter(&self, id: i64) -> Result<Option<DeadLetterRecord>, StoreError> {
        self.read(move |connection| rows::dead_letter(connection, id))
            .await
    }

    pub async fn features(&self) -> Result<Vec<catalog::FeatureRecord>, StoreError> {
        self.read(catalog::features).await
    }

    pub async fn pricebooks(&self) -> Result<Vec<catalog::PricebookRecord>, StoreError> {
        self.read(catalog::pricebooks).await
    }

    pub async fn pricebook(
        &self,
        id: String,
    ) -> Result<Option<catalog::PricebookRecord>, StoreError> {
        self.read(move |connection| catalog::pricebook(connection, &id))
            .await
    }

    /// A customer's contracts, in the order they were set.
    pub async fn contracts(
        &self,
        customer_id: Id,
    ) -> Result<Vec<catalog::ContractRecord>, StoreError> {
        self.read(move |connection| catalog::customer_contracts(connection, customer_id.as_str()))
            .await
    }

    /// Reprice the usage recorded in `[from, to)` (charges and captures by
    /// feature and quantity) as if version `id` had been in effect, each
    /// customer's contract still applying, and total the difference per feature
    /// and per customer. Reads only; `None` when the version does not exist.
    ///
    /// Usage counts at its own time, as in [`Store::usage`]: a late event's
    /// timestamp, not when it was recorded. It scans the journal's priced
    /// entries recorded from the window's start to the event window after its
    /// end: the cost grows with the size of the journal, so keep windows to
    /// what a decision needs.
    pub async fn simulate(
        &self,
        id: String,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Option<Simulation>, StoreError> {
        let late = self.inner.event_window_seconds;
        self.read(move |connection| simulate(connection, &id, from, to, late))
            .await
    }

    /// A customer's usage in `[query.from, query.to)`: the quantity and
    /// credits of its charges and captures, per feature or member, per
    /// bucket. `None` when the customer does not exist; `Err(TooMuchUsage)`
    /// when the window lies behind more than [`MAX_USAGE_WALK`] entries.
    ///
    /// Usage counts at its own time: an event's timestamp (a late event's
    /// usage falls in the bucket of when it happened), a capture's when it
    /// captured, a charge's when it was charged.
    /// Refunds are not netted out: usage is what was consumed (a refund is in
    /// the journal, against its charge). One statement walks the customer's
    /// chain of entries from the newest, by primary key, until entries
    /// recorded before the window could hold no usage in it.
    pub async fn usage(
        &self,
        customer_id: Id,
        query: UsageQuery,
    ) -> Result<Option<Result<UsageReport, TooMuchUsage>>, StoreError> {
        self.read(move |connection| usage(connection, &customer_id, query))
            .await
    }

    /// Every grant and every journal entry of a customer, oldest first (audits, tests).
    pub async fn audit(
        &self,
        customer_id: Id,
    ) -> Result<(Vec<GrantRecord>, Vec<EntryRecord>), StoreError> {
        self.read(move |connection| {
            let grants = rows::customer_grants(connection, customer_id.as_str())?;
            let mut at = rows::customer_head(connection, customer_id.as_str())?.flatten();
            let mut entries = Vec::new();
            while let Some(sequence) = at {
                let (record, previous) =
                    rows::entry_link(connection, sequence)?.expect("chain is intact");
                entries.push(record);
                at = previous;
            }
            entries.reverse();
            Ok((grants, entries))
        })
        .await
    }
}

/// At most this many journal entries are walked for one usage report.
pub const MAX_USAGE_WALK: i64 = 200_000;

/// A usage report whose window reaches past [`MAX_USAGE_WALK`] entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooMuchUsage;

fn usage(
    connection: &Connection,
    customer_id: &Id,
    query: UsageQuery,
) -> db::Result<Option<Result<UsageReport, TooMuchUsage>>> {
    use std::collections::BTreeMap;
    use tally_core::pricebook::Pricing;
    let Some(head) = rows::customer_head(connection, customer_id.as_str())? else {
        return Ok(None);
    };
    let Some(head) = head else {
        return Ok(Some(Ok(UsageReport { lines: Vec::new() })));
    };
    let mut lines: BTreeMap<(Timestamp, Option<String>), UsageLine> = BTreeMap::new();
    // An event may be up to EVENT_FUTURE_SKEW_SECONDS ahead of the clock that
    // recorded it, and an entry takes effect no later than it is recorded:
    // entries recorded before `stop` hold no usage at or after `from`.
    let stop = query
        .from
        .plus_seconds(-EVENT_FUTURE_SKEW_SECONDS)
        .unwrap_or(Timestamp(i64::MIN));
    let mut statement = connection.prepare(
        "WITH RECURSIVE chain(sequence, previous, kind, feature, member_id, effective_at, \
             recorded_at, pricing, amount, depth) AS ( \
           SELECT sequence, previous, kind, feature, member_id, effective_at, recorded_at, \
             pricing, amount, 1 FROM entries WHERE sequence = ?1 \
           UNION ALL \
           SELECT e.sequence, e.previous, e.kind, e.feature, e.member_id, e.effective_at, \
             e.recorded_at, e.pricing, e.amount, c.depth + 1 \
           FROM entries e JOIN chain c ON e.sequence = c.previous \
           WHERE c.recorded_at >= ?2 AND c.depth <= ?3) \
         SELECT kind, feature, member_id, effective_at, recorded_at, pricing, depth, amount \
         FROM chain",
    )?;
    let mut rows = statement.query(params![head, stop.0, MAX_USAGE_WALK])?;
    while let Some(row) = rows.next()? {
        let depth: i64 = row.get(6)?;
        let recorded_at: i64 = row.get(4)?;
        if depth > MAX_USAGE_WALK {
            if recorded_at >= stop.0 {
                return Ok(Some(Err(TooMuchUsage)));
            }
            continue;
        }
        let kind: String = row.get(0)?;
        if kind != "charge" && kind != "capture" {
            continue;
        }
        let pricing: Option<Pricing> = row
            .get::<_, Option<String>>(5)?
            .map(|text| {
                serde_json::from_str(&text)
                    .map_err(|_| db::Error::Corrupt("bad pricing json".into()))
            })
            .transpose()?;
        // A capture counts when it captured (its pricing's time is the
        // hold's, whose price it locked).
        let at = match kind.as_str() {
            "capture" => None,
            _ => pricing.as_ref().and_then(|p| p.priced_at),
        }
        .unwrap_or(Timestamp(row.get(3)?));
        if at < query.from || at >= query.to {
            continue;
        }
        let group = match query.group_by {
            UsageGroup::Feature => row
                .get::<_, Option<String>>(1)?
                .or_else(|| pricing.as_ref().map(|p| p.feature.clone())),
            UsageGroup::Member => row.get::<_, Option<String>>(2)?,
        };
        // The entry's amount: the credits the charge or capture consumed.
        let bucket = query.granularity.bucket(at);
        let line = lines
            .entry((bucket, group.clone()))
            .or_insert_with(|| UsageLine {
                bucket,
                group,
                quantity_micros: 0,
                credits_micros: 0,
                records: 0,
            });
        line.records += 1;
        line.credits_micros += i128::from(row.get::<_, i64>(7)?);
        if let Some(quantity) = pricing.and_then(|p| p.used_quantity()) {
            line.quantity_micros += i128::from(quantity.micros());
        }
    }
    Ok(Some(Ok(UsageReport {
        lines: lines.into_values().collect(),
    })))
}

/// Usage repriced under another version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Simulation {
    pub pricebook: String,
    pub from: Timestamp,
    pub to: Timestamp,
    pub total: SimulationLine,
    pub by_feature: Vec<SimulationLine>,
    pub by_customer: Vec<SimulationLine>,
}

/// Totals of one group. Credits in micro-credits (`i128`, so no sum overflows).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimulationLine {
    pub key: String,
    /// Priced entries repriced.
    pub events: u64,
    /// Entries the simulated version cannot price (no rule for them).
    pub unpriced: u64,
    pub quantity_micros: i128,
    pub recorded_micros: i128,
    pub simulated_micros: i128,
}

impl SimulationLine {
    fn add(&mut self, quantity: i128, recorded: i128, simulated: Option<i128>) {
        self.events += 1;
        self.quantity_micros += quantity;
        self.recorded_micros += recorded;
        match simulated {
            Some(cost) => self.simulated_micros += cost,
            None => {
                self.unpriced += 1;
                // Unpriced usage keeps its recorded cost in the simulated total.
                self.simulated_micros += recorded;
            }
        }
    }
}

fn simulate(
    connection: &Connection,
    id: &str,
    from: Timestamp,
    to: Timestamp,
    late_seconds: i64,
) -> db::Result<Option<Simulation>> {
    use std::collections::{BTreeMap, HashMap};
    use tally_core::pricebook::{price_usage, PriceBook, Pricing, Usage, Version};
    // Late events a longer window let in, before it was shortened, count too.
    let widest: Option<i64> = connection
        .query_row("SELECT seconds FROM event_window WHERE id = 1", [], |row| {
            row.get(0)
        })
        .optional()?;
    let late_seconds = late_seconds.max(widest.unwrap_or(0));
    let Some(book) = catalog::pricebook(connection, id)? else {
        return Ok(None);
    };
    let simulated = Version {
        id: book.id.clone(),
        effective_at: from,
        published_seq: i64::MAX,
        rules: book.rules.clone(),
    };
    let published = PriceBook::new(
        catalog::pricebooks(connection)?
            .iter()
            .filter_map(catalog::PricebookRecord::version)
            .collect(),
    );
    let contracts = catalog::contracts_by_customer(connection)?;
    type Terms = (Option<String>, Option<String>, model::PlanHistory);
    let mut terms: HashMap<String, Terms> = HashMap::new();
    let mut total = SimulationLine {
        key: "total".into(),
        ..Default::default()
    };
    let mut by_feature: BTreeMap<String, SimulationLine> = BTreeMap::new();
    let mut by_customer: BTreeMap<String, SimulationLine> = BTreeMap::new();
    // Usage is selected and repriced at its own time (a late event's, not its
    // entry's). An event is at most EVENT_FUTURE_SKEW_SECONDS ahead of the
    // entry that charged it, and at most the event window behind it.
    let first = from
        .plus_seconds(-EVENT_FUTURE_SKEW_SECONDS)
        .unwrap_or(Timestamp(i64::MIN));
    let last = to
        .plus_seconds(late_seconds.saturating_add(EVENT_FUTURE_SKEW_SECONDS))
        .unwrap_or(Timestamp(i64::MAX));
    let mut statement = connection.prepare(
        "SELECT customer_id, effective_at, pricing, kind, recorded_at FROM entries \
         WHERE pricing IS NOT NULL AND kind IN ('charge', 'capture') AND effective_at >= ?1 AND effective_at <= ?2",
    )?;
    let mut rows = statement.query(params![first.0, last.0])?;
    while let Some(row) = rows.next()? {
        let customer_id: String = row.get(0)?;
        let text: String = row.get(2)?;
        let recorded: Pricing = serde_json::from_str(&text)
            .map_err(|_| db::Error::Corrupt("bad pricing json".into()))?;
        let effective = Timestamp(row.get(1)?);
        let at = recorded.priced_at.unwrap_or(effective);
        // A capture counts when it captured (its price is the hold's, from
        // when it was placed), as in the usage report.
        let counted = match row.get::<_, String>(3)?.as_str() {
            "capture" => effective,
            _ => at,
        };
        if counted < from || counted >= to {
            continue;
        }
        if !terms.contains_key(&customer_id) {
            let customer = rows::customer(connection, &customer_id)?;
            let history = rows::plan_history(connection, &customer_id)?;
            let (plan, region) = customer.map_or((None, None), |c| (c.plan, c.region));
            terms.insert(customer_id.clone(), (plan, region, history));
        }
        let (plan, region, history) = &terms[&customer_id];
        let usage = Usage {
            feature: &recorded.feature,
            quantity: recorded.quantity,
            properties: &recorded.properties,
            // The plan the customer was on when the usage happened, as the
            // writer priced it: an event stamped ahead of the clock (by up
            // to EVENT_FUTURE_SKEW_SECONDS) by the plan when it came.
            plan: history.at(at.min(Timestamp(row.get(4)?)), plan.as_deref()),
            region: region.as_deref(),
            at,
        };
        // The contract in force when the usage happened.
        let contract = contracts
            .get(&customer_id)
            .and_then(|all| catalog::contract_at(all, at))
            .map(|c| &c.contract);
        // A capture by amount was not priced from a quantity: it stays as recorded.
        let cost = if recorded.by_amount {
            Some(i128::from(recorded.cost.micros()))
        } else {
            price_usage(&published, Some(&simulated), contract, &usage)
                .ok()
                .map(|p| i128::from(p.cost.micros()))
        };
        let quantity = i128::from(recorded.quantity.micros());
        let was = i128::from(recorded.cost.micros());
        total.add(quantity, was, cost);
        by_feature
            .entry(recorded.feature.clone())
            .or_insert_with(|| SimulationLine {
                key: recorded.feature.clone(),
                ..Default::default()
            })
            .add(quantity, was, cost);
        by_customer
            .entry(customer_id.clone())
            .or_insert_with(|| SimulationLine {
                key: customer_id.clone(),
                ..Default::default()
            })
            .add(quantity, was, cost);
    }
    Ok(Some(Simulation {
        pricebook: book.id,
        from,
        to,
        total,
        by_feature: by_feature.into_values().collect(),
        by_customer: by_customer.into_values().collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server's leadership as `lead` takes it, not leading yet, advertising
    /// an address nothing listens on.
    fn test_leadership() -> Leadership {
        let leadership = Leadership {
            is_leader: tokio::sync::watch::channel(false).0,
            advertise: std::sync::OnceLock::new(),
        };
        leadership
            .advertise
            .set("http://127.0.0.1:9".into())
            .unwrap();
        leadership
    }

    /// A writer that lost its connection leads again without waiting when it
    /// can: if its old session still holds the leader lock (PostgreSQL has
    /// not seen that connection end), it ends that session and leads. If
    /// another session holds the lock, it follows that server: it waits for
    /// the lock, answering queued commands while it waits, and leads once
    /// the lock is free, as a server that never led does. A store that
    /// closes while its server waits ends the wait.
    /// PostgreSQL only (`TALLY_TEST_DATABASE=postgres`).
    #[test]
    fn leading_again_ends_the_lost_session_and_follows_another_server() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        for (connection, place) in db::tests::connections("lead_again") {
            let Some(url) = place.url() else {
                continue;
            };
            drop(connection);
            migrate(Location::Postgres(&url)).unwrap();
            let leadership = test_leadership;
            // Lead, in a thread of its own, as a server whose last session
            // was `previous` (`None`: it never led); `between` is what it
            // does every so often while it waits for the lock. What came of
            // it: "leads" or "closed", each only with the leadership flag to
            // match.
            let lead_in_thread =
                |previous: Option<Session>, between: Box<dyn FnMut() -> bool + Send>| {
                    let url = url.clone();
                    std::thread::spawn(move || {
                        let mut between = between;
                        let leadership = leadership();
                        let mut state = LeadState {
                            has_led: previous.is_some(),
                            previous,
                        };
                        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
                        let sync = writer::SyncState::new(0);
                        let led = lead(
                            &url,
                            &leadership,
                            clock,
                            Options::default(),
                            &sync,
                            &mut state,
                            &mut *between,
                        );
                        let leading = *leadership.is_leader.borrow();
                        match led {
                            Ok(Led::Writer(writer)) if leading => ("leads", Some(writer)),
                            Ok(Led::Closed) if !leading => ("closed", None),
                            Ok(_) => ("leadership flag out of step", None),
                            Err(error) => panic!("lead: {error}"),
                        }
                    })
                };

            // The lost session: alive, holding the lock.
            let old = Connection::postgres(&url).unwrap();
            old.query_row("SELECT pg_advisory_lock(?1)", [LEADER_LOCK], |_| Ok(()))
                .unwrap();
            let lost = old.query_row(SESSION_SQL, [], read_session).unwrap();
            assert!(lost.started.is_some());
            let (led, writer) = lead_in_thread(Some(lost.clone()), Box::new(|| false))
                .join()
                .unwrap();
            assert_eq!(led, "leads", "it leads again");
            let writer = writer.unwrap();
            let new = writer
                .connection()
                .query_row(SESSION_SQL, [], read_session)
                .unwrap();
            assert_ne!(new, lost, "on a new session");
            let ended: db::Result<i64> = old.query_row("SELECT 1", [], |row| row.get(0));
            assert!(ended.is_err(), "the lost session was ended: {ended:?}");

            // Now another session holds the lock: a server that lost its
            // own session neither takes it nor ends that one; it waits,
            // answering queued commands while it waits. So does a server
            // that never led, until its store closes.
            let waits = Arc::new(AtomicUsize::new(0));
            let follower = lead_in_thread(
                Some(lost),
                Box::new({
                    let waits = waits.clone();
                    move || {
                        waits.fetch_add(1, Ordering::SeqCst);
                        false
                    }
                }),
            );
            let close = Arc::new(AtomicBool::new(false));
            let closing = lead_in_thread(
                None,
                Box::new({
                    let close = close.clone();
                    move || close.load(Ordering::SeqCst)
                }),
            );
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while waits.load(Ordering::SeqCst) < 2 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "queued commands are answered while it waits"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            assert!(
                !follower.is_finished() && !closing.is_finished(),
                "both wait"
            );
            let queued: i64 = writer
                .connection()
                .query_row(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                     AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                    [],
                    |row| row.get(0),
                )
                .unwrap();
            assert_eq!(queued, 2, "both wait in the lock's queue, in one wait each");
            let alive: i64 = writer
                .connection()
                .query_row("SELECT 1", [], |row| row.get(0))
                .unwrap();
            assert_eq!(alive, 1, "the leader's session lives on");
            close.store(true, Ordering::SeqCst);
            assert_eq!(
                closing.join().unwrap().0,
                "closed",
                "a closed store stops waiting"
            );
            drop(writer);
            assert_eq!(
                follower.join().unwrap().0,
                "leads",
                "and the follower leads once the lock is free"
            );
            drop(old);
            db::tests::drop_database(place);
        }
    }

    /// The writer answers a group's callers once its COMMIT returns, so its
    /// session commits durably even where the database turns
    /// `synchronous_commit` off. PostgreSQL only
    /// (`TALLY_TEST_DATABASE=postgres`).
    #[test]
    fn the_writer_commits_durably_whatever_the_database_says() {
        let setting = |connection: &Connection| -> String {
            connection
                .query_row("SELECT current_setting('synchronous_commit')", [], |row| {
                    row.get(0)
                })
                .unwrap()
        };
        for (connection, place) in db::tests::connections("sync_commit") {
            let Some(url) = place.url() else {
                continue;
            };
            let database = url.rsplit('/').next().unwrap().to_owned();
            connection
                .execute_batch(&format!(
                    "ALTER DATABASE {database} SET synchronous_commit = off"
                ))
                .unwrap();
            drop(connection);
            migrate(Location::Postgres(&url)).unwrap();
            let other = Connection::postgres(&url).unwrap();
            assert_eq!(setting(&other), "off", "the database's own setting");
            let leadership = test_leadership();
            let mut state = LeadState {
                has_led: false,
                previous: None,
            };
            let sync = writer::SyncState::new(0);
            let led = lead(
                &url,
                &leadership,
                Arc::new(SystemClock),
                Options::default(),
                &sync,
                &mut state,
                &mut || false,
            )
            .unwrap();
            let Led::Writer(writer) = led else {
                panic!("a lone server leads");
            };
            assert_eq!(setting(writer.connection()), "on", "the writer's session");
            assert_eq!(setting(&other), "off", "other sessions keep theirs");
            drop((writer, other));
            db::tests::drop_database(place);
        }
    }

    #[test]
    fn checkpoints_back_off_while_idle_and_speed_up_once_the_log_grows() {
        let mut interval = CHECKPOINT_BUSY;
        let mut idle = Vec::new();
        for _ in 0..7 {
            interval = next_checkpoint_interval(interval, false);
            idle.push(interval.as_millis());
        }
        assert_eq!(idle, [20, 40, 80, 160, 250, 250, 250]);
        assert_eq!(next_checkpoint_interval(interval, true), CHECKPOINT_BUSY);
    }
}
