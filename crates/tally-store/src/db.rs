//! One connection API over SQLite (rusqlite) and PostgreSQL (postgres).
//!
//! The store's SQL is written once, in the subset both databases accept, with
//! `?N` placeholders; on PostgreSQL each statement is rewritten to `$N` once
//! and kept prepared. Values cross as four kinds (null, 64-bit integer, text,
//! bytes), as SQLite stores them; on PostgreSQL a parameter is encoded as the
//! type the server infers for it, and a result column of any integer or
//! boolean type reads as an integer. Where the dialects differ
//! (JSON access in two reads, the schema itself) the caller asks
//! [`Connection::dialect`].
//!
//! The API mirrors rusqlite's (`prepare_cached`, `query_row`, `query_map`,
//! `params!`, `optional`) so the store reads the same on either database.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use bytes::BufMut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;

/// Which SQL the connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgres: {}", postgres_message(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("the query returned no rows")]
    NoRows,
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// A database URL that is not PostgreSQL's.
    #[error("{0}")]
    BadUrl(String),
    #[error("column {0}: {1}")]
    Type(usize, String),
    /// A commit sent ahead ([`Connection::commit_async`]) failed: nothing
    /// more runs on the connection until [`Connection::rollback`].
    #[error("an earlier group's commit failed: {0}")]
    EarlierCommit(String),
    /// The task sending a commit ahead panicked or was cancelled.
    #[error("the task sending a commit ended without an answer: {0}")]
    CommitTask(String),
    /// The database was migrated by a newer build, whose schema this one
    /// does not know.
    #[error(
        "the database's schema is at version {found}, and this build of Tally knows versions up \
         to {known}: a newer Tally migrated it, so run that version or a newer one"
    )]
    NewerSchema { found: i64, known: i64 },
    /// The engine's clock recorded in the database is ahead of this server's
    /// real clock by more than [`crate::writer::CLOCK_AHEAD_TOLERANCE`]:
    /// writing on would move the engine's time back.
    #[error(
        "the database's engine clock is at {engine}, ahead of this server's clock ({now}): it was \
         run with --manual-clock, so start this server with --manual-clock too (or the clock of \
         the server that last ran its writer was fast); going on would move the engine's time back"
    )]
    ClockBehind { engine: String, now: String },
    /// A server on one clock over a PostgreSQL database whose writer ran on
    /// the other within [`crate::writer::CLOCK_MODE_FRESH`]: a manual clock
    /// taking over from a real one stops the engine's time, and followers
    /// on the real clock would not follow it.
    #[error(
        "the server that runs this database's writer is on {writer}, and this one on {this}: \
         servers sharing a database must all be started with --manual-clock or all without it \
         (to switch, stop every server for {fresh_seconds} s first)"
    )]
    ClockModeDiffers {
        writer: &'static str,
        this: &'static str,
        fresh_seconds: i64,
    },
    /// No PostgreSQL finished the start-up exchange in time (an address
    /// that accepts and never answers, or none reachable).
    #[error("postgres: no PostgreSQL answered within {0:?} (connect_timeout in the URL bounds each address tried)")]
    ConnectTimeout(std::time::Duration),
    /// The database refused a new connection for now (55000 at connect:
    /// `ALTER DATABASE ... ALLOW_CONNECTIONS false`, an operator's
    /// maintenance). Told apart at connect, whatever the server's language.
    #[error("postgres: the database takes no new connections for now: {0}")]
    NotAccepting(String),
}

/// The server's own message (the client's Display says only "db error").
fn postgres_message(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{} ({}): {detail}", db.message(), db.code().code()),
            None => format!("{} ({})", db.message(), db.code().code()),
        },
        // The client's own errors say what failed ("error connecting to
        // server"), their source why ("Connection refused").
        None => match std::error::Error::source(error) {
            Some(source) => format!("{error}: {source}"),
            None => error.to_string(),
        },
    }
}

impl Error {
    /// Whether the error says the database could not be reached or the
    /// connection went away (closed, reset, timed out; the server shutting
    /// down, refusing connections or out of them), rather than anything
    /// about the data or a statement.
    pub fn is_connection_lost(&self) -> bool {
        let error = match self {
            Error::Postgres(error) => error,
            Error::ConnectTimeout(_) | Error::NotAccepting(_) => return true,
            _ => return false,
        };
        if error.is_closed() {
            return true;
        }
        if let Some(code) = error.code() {
            // Class 08: connection exception; 57P: the server shutting down
            // or not accepting connections yet; 53300: too many connections.
            let code = code.code();
            return code.starts_with("08") || code.starts_with("57P") || code == "53300";
        }
        // Reaching the server, or reading from or writing to its socket,
        // failed (tokio-postgres's `Kind::Connect` and `Kind::Io`, a connect
        // timeout among them).
        let text = error.to_string();
        text.starts_with("error connecting to server")
            || text.starts_with("error communicating with the server")
    }

    /// Whether trying again on a new connection may succeed: the connection
    /// was lost ([`Error::is_connection_lost`]), or the statement was
    /// cancelled (an operator's `pg_cancel_backend`), or the server is a
    /// read-only standby (a failover reached the old primary, or one not
    /// yet promoted).
    pub fn is_transient(&self) -> bool {
        if self.is_connection_lost() {
            return true;
        }
        let Error::Postgres(error) = self else {
            return false;
        };
        error
            .code()
            .is_some_and(|code| ["57014", "25006"].contains(&code.code()))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A value as a parameter.
#[derive(Clone, Copy, Debug)]
pub enum Value<'a> {
    Null,
    Int(i64),
    Text(&'a str),
    Blob(&'a [u8]),
}

/// A value as read from a column.
#[derive(Clone, Copy, Debug)]
pub enum ValueRef<'a> {
    Null,
    Int(i64),
    Real(f64),
    Text(&'a str),
    Blob(&'a [u8]),
}

pub trait ToValue {
    fn to_value(&self) -> Value<'_>;
}

macro_rules! int_value {
    ($($t:ty)*) => {$(
        impl ToValue for $t {
            fn to_value(&self) -> Value<'_> {
                Value::Int(i64::from(*self))
            }
        }
    )*};
}
int_value!(i64 i32 i16 u32 u16 u8 bool);

impl ToValue for usize {
    fn to_value(&self) -> Value<'_> {
        Value::Int(i64::try_from(*self).expect("a count fits in i64"))
    }
}
impl ToValue for str {
    fn to_value(&self) -> Value<'_> {
        Value::Text(self)
    }
}
impl ToValue for String {
    fn to_value(&self) -> Value<'_> {
        Value::Text(self)
    }
}
impl ToValue for [u8] {
    fn to_value(&self) -> Value<'_> {
        Value::Blob(self)
    }
}
impl ToValue for Vec<u8> {
    fn to_value(&self) -> Value<'_> {
        Value::Blob(self)
    }
}
impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value<'_> {
        (**self).to_value()
    }
}
impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Value<'_> {
        match self {
            Some(value) => value.to_value(),
            None => Value::Null,
        }
    }
}

/// What a statement's parameters can be given as: `params![...]`, an array
/// of one type, or `[]`.
/// (Values are produced as they are bound: no allocation per statement.)
pub trait Params {
    fn values(&self) -> impl Iterator<Item = Value<'_>>;
}

impl Params for &[&dyn ToValue] {
    fn values(&self) -> impl Iterator<Item = Value<'_>> {
        self.iter().map(|v| v.to_value())
    }
}

impl Params for [&dyn ToValue; 0] {
    fn values(&self) -> impl Iterator<Item = Value<'_>> {
        std::iter::empty()
    }
}

macro_rules! array_params {
    ($($n:literal)*) => {$(
        impl<T: ToValue> Params for [T; $n] {
            fn values(&self) -> impl Iterator<Item = Value<'_>> {
                self.iter().map(|v| v.to_value())
            }
        }
    )*};
}
array_params!(1 2 3 4 5 6 7 8);

/// `params![a, b, ...]`: parameters of different types.
macro_rules! params {
    () => {
        &[] as &[&dyn $crate::db::ToValue]
    };
    ($($param:expr),+ $(,)?) => {
        &[$(&$param as &dyn $crate::db::ToValue),+] as &[&dyn $crate::db::ToValue]
    };
}
pub(crate) use params;

pub trait FromValue: Sized {
    fn from_value(value: ValueRef<'_>) -> Result<Self, String>;
}

impl FromValue for i64 {
    fn from_value(value: ValueRef<'_>) -> Result<Self, String> {
        match value {
            ValueRef::Int(v) => Ok(v),
            other => Err(format!("expected an integer, found {other:?}")),
        }
    }
}
macro_rules! narrow_int {
    ($($t:ty)*) => {$(
        impl FromValue for $t {
            fn from_value(value: ValueRef<'_>) -> Result<Self, String> {
                let wide = i64::from_value(value)?;
                <$t>::try_from(wide).map_err(|_| format!("{wide} out of range"))
            }
        }
    )*};
}
narrow_int!(i32 u32 u64 usize u8 i16);

impl FromValue for bool {
    fn from_value(value: ValueRef<'_>) -> Result<Self, String> {
        Ok(i64::from_value(value)? != 0)
    }
}
impl FromValue for String {
    fn from_value(value: ValueRef<'_>) -> Result<Self, String> {
        match value {
            ValueRef::Text(v) => Ok(v.to_owned()),
            other => Err(format!("expected text, found {other:?}")),
        }
    }
}
impl FromValue for Vec<u8> {
    fn from_value(value: ValueRef<'_>) -> Result<Self, String> {
        match value {
            ValueRef::Blob(v) => Ok(v.to_vec()),
            ValueRef::Text(v) => Ok(v.as_bytes().to_vec()),
            other => Err(format!("expected bytes, found {other:?}")),
        }
    }
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(value: ValueRef<'_>) -> Result<Self, String> {
        match value {
            ValueRef::Null => Ok(None),
            other => T::from_value(other).map(Some),
        }
    }
}

/// `.optional()`: no row is `None`.
pub trait OptionalExtension<T> {
    fn optional(self) -> Result<Option<T>>;
}

impl<T> OptionalExtension<T> for Result<T> {
    fn optional(self) -> Result<Option<T>> {
        match self {
            Ok(value) => Ok(Some(value)),
            Err(Error::NoRows) => Ok(None),
            Err(error) => Err(error),
        }
    }
}

/// A PostgreSQL connection with its prepared statements. The client is
/// tokio-postgres on a runtime of the connection's own, driven only while a
/// call blocks on it (the store's connections live on plain threads), so that
/// several statements can be sent in one round trip (see [`Pg::pipeline`]).
pub struct Pg {
    /// (Declared before the runtime, so that it is dropped first.) Shared
    /// with a commit sent ahead, which runs as a task of the runtime.
    client: std::sync::Arc<tokio_postgres::Client>,
    runtime: tokio::runtime::Runtime,
    /// A commit sent ahead and not yet answered (see
    /// [`Connection::commit_async`]).
    in_flight: RefCell<Option<tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>>>,
    /// Its outcome once answered, until the writer takes it.
    outcome: RefCell<Option<Result<()>>>,
    /// Why a commit sent ahead failed: every statement fails until
    /// [`Connection::rollback`], so that nothing written on top of the
    /// failed group reaches the database.
    failed: RefCell<Option<String>>,
    statements: RefCell<HashMap<String, tokio_postgres::Statement>>,
    /// `BEGIN` is owed: it goes out with the next statements, in the same
    /// round trip (a group that only defers writes costs one round trip).
    begin_pending: Cell<bool>,
    /// Deferred writes not yet sent, one batch per statement, in the order
    /// each statement was first deferred on this connection (`ranks`).
    deferred: RefCell<Vec<Batch>>,
    /// Every statement ever deferred on this connection, in the order it
    /// first was: a batch begun after a send (a full batch sends the queue
    /// at any point) takes its place by it, not at the queue's end, so a
    /// statement whose rows reference another's (a webhook delivery its
    /// notification) still goes out after it.
    ranks: RefCell<Vec<&'static str>>,
    /// The set-based form of each deferred statement, prepared.
    bulk: RefCell<HashMap<&'static str, tokio_postgres::Statement>>,
    /// The checked one-row form of each deferred update ([`checked_sql`]),
    /// prepared, and how many times it has been sent since.
    checked: RefCell<HashMap<&'static str, (tokio_postgres::Statement, u32)>>,
    /// The `COPY` form of each deferred insert ([`copy_sql`]), prepared,
    /// with its columns' types; `None` for an insert that has none.
    copies: RefCell<HashMap<&'static str, Option<CopyForm>>>,
    /// Set when a `COPY` was refused before its rows were taken, or given
    /// up before the server answered: tokio-postgres then sends a second
    /// `Sync` (rust-postgres issue 789), the server answers it with a
    /// second `ReadyForQuery`, and every later answer on this connection
    /// would go to the request after the one it belongs to. The connection
    /// is then broken for good ([`Connection::is_broken`]): every call on
    /// it fails. Also set when a commit sent ahead ended without an answer
    /// (`Pg::settle`).
    lost_place: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Rows read ahead by [`Connection::prefetch`]: for each statement (by
    /// its SQL) and parameter, its rows, each taken once by the
    /// next read of that statement with that parameter.
    prefetched: RefCell<Vec<Prefetched>>,
}

/// One statement's rows read ahead ([`Connection::prefetch`]).
struct Prefetched {
    /// Its SQL, as given to [`Connection::prepare_cached`].
    statement: String,
    param: String,
    rows: Vec<tokio_postgres::Row>,
}

/// A prepared `COPY ... FROM STDIN (FORMAT BINARY)` and its columns' types.
#[derive(Clone)]
struct CopyForm {
    statement: tokio_postgres::Statement,
    types: Vec<tokio_postgres::types::Type>,
}

/// Marks a connection out of step (`Pg::lost_place`) when dropped while
/// it still holds the flag: a `COPY` refused, or given up, before the
/// server took it.
struct LostPlace(Option<std::sync::Arc<std::sync::atomic::AtomicBool>>);

impl LostPlace {
    /// The server took the `COPY`: the connection keeps its place.
    fn clear(mut self) {
        self.0 = None;
    }
}

impl Drop for LostPlace {
    fn drop(&mut self) {
        if let Some(flag) = self.0.take() {
            flag.store(true, std::sync::atomic::Ordering::Release);
        }
    }
}

/// How one deferred batch goes out.
enum Outgoing {
    /// A statement run once with the batch's parameters.
    Execute(tokio_postgres::Statement),
    /// Its rows streamed through a binary `COPY`.
    Copy(CopyForm),
}

/// A prepared one-row update is prepared again after this many runs.
/// PostgreSQL keeps one generic plan for a prepared statement after five
/// runs, costed for the table of that moment: made while the table held a
/// page, it scans the table, and it would stay that way as the table grows
/// (until an `ANALYZE` invalidates it). Prepared again, it is planned for
/// the table as it is. (Small under test, so that a test can reach it.)
const REPREPARE_AFTER: u32 = if cfg!(test) { 16 } else { 4096 };

/// How a deferred statement is merged with others of its kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// `INSERT INTO t (...) VALUES (?1, ...) [...]`: every row is inserted.
    Insert,
    /// `UPDATE t SET ... WHERE key = ?1`: one row per key, the last deferred
    /// for a key wins (as if they ran in order).
    UpdateByFirst,
}

/// The deferred rows of one statement.
struct Batch {
    sql: &'static str,
    shape: Shape,
    rows: Vec<Vec<Owned>>,
    /// For `UpdateByFirst`: the row of each key.
    keys: HashMap<Owned, usize>,
}

/// A parameter value kept until its batch is sent.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Owned {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl Owned {
    fn of(value: Value<'_>) -> Owned {
        match value {
            Value::Null => Owned::Null,
            Value::Int(v) => Owned::Int(v),
            Value::Text(v) => Owned::Text(v.to_owned()),
            Value::Blob(v) => Owned::Blob(v.to_vec()),
        }
    }

    fn value(&self) -> Value<'_> {
        match self {
            Owned::Null => Value::Null,
            Owned::Int(v) => Value::Int(*v),
            Owned::Text(v) => Value::Text(v),
            Owned::Blob(v) => Value::Blob(v),
        }
    }
}

/// The most rows one set-based statement sends (bounds its message size).
const MAX_BULK_ROWS: usize = 8192;

/// A deferred insert of at least this many rows goes out as a binary `COPY`
/// (where its statement has a `COPY` form, [`copy_sql`], and it is the first
/// batch of its round trip: see [`Pg::batch_statement`]) instead of the
/// set-based `INSERT ... SELECT ... FROM unnest(...)`. PostgreSQL inserts
/// the rows of a `COPY` in batches (one WAL record per page of rows), at
/// a little over half the backend's CPU per row (ARCHITECTURE.md,
/// "Set-based writes"; BENCHMARKS.md, 2026-12-05, ninth session). A
/// `COPY` costs one more round trip inside the group's pipeline: the rows
/// go out once the server has answered that it is ready for them.
const COPY_MIN_ROWS: usize = if cfg!(test) { 4 } else { 16 };

enum Kind {
    Sqlite(rusqlite::Connection),
    Postgres(Box<Pg>),
}

pub struct Connection {
    kind: Kind,
}

impl Connection {
    /// Whether this is a connection to PostgreSQL (a database several
    /// servers may share).
    pub fn is_postgres(&self) -> bool {
        matches!(self.kind, Kind::Postgres(_))
    }
}

/// How long connecting may take, unless the URL says (`connect_timeout`).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long data sent may go unacknowledged before the connection counts as
/// lost, unless the URL says (`tcp_user_timeout`). Without it, a writer
/// whose network to the database vanished without a reset (a partition,
/// a host gone) would wait for its `COMMIT` until TCP gives up
/// retransmitting, about 15 minutes on Linux, holding every write; with
/// it, the group fails after this long and the writer leads again on a new
/// connection. The database's own host acknowledges what it receives
/// however busy the server is, so a slow statement does not trip it.
const TCP_USER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Idle time before TCP keepalive probes start, and between two probes,
/// unless the URL says (`keepalives_idle`, `keepalives_interval`;
/// otherwise two hours and the system's 75 s): with [`TCP_USER_TIMEOUT`],
/// an idle connection to a vanished host is closed after about 35 s (the
/// first probe left unanswered past the user timeout).
const KEEPALIVES_IDLE: std::time::Duration = std::time::Duration::from_secs(30);
const KEEPALIVES_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// What PostgreSQL's end of every store connection is told, unless something
/// else set it for the session (the URL's `options`, `ALTER ROLE` or `ALTER
/// DATABASE ... SET`, the server's configuration): TCP keepalive probes after
/// 10 s without traffic, every 5 s; the connection closed once what the
/// server sent (data or a probe) has gone unacknowledged for 30 s; and a
/// running statement checking every 5 s whether its client's connection has
/// closed.
///
/// These are the server's side of [`TCP_USER_TIMEOUT`] and the keepalives:
/// the client's settings only make Tally give up on a connection. When the
/// writer's host vanishes without a reset (a partition, a host that lost
/// power), PostgreSQL keeps its session, and with it the leader lock, until
/// its own end of the connection fails, which with the system's defaults
/// (`tcp_keepalives_idle` 0: two hours, then nine probes 75 s apart) leaves
/// every server without a writer for over two hours. With these, the
/// session ends and the lock passes to a waiting server about 30 s after
/// the last traffic (Linux applies the user timeout to unanswered keepalive
/// probes too). The first three apply to TCP connections only (PostgreSQL
/// ignores them on a Unix socket). The last does not probe anything itself:
/// it lets a statement that is running, such as a follower's wait for the
/// lock, notice a connection that the keepalives (or a reset) have closed,
/// so a follower whose host vanished leaves the lock's queue.
const SERVER_SIDE_SETTINGS: &[(&str, &str)] = &[
    ("tcp_keepalives_idle", "10"),
    ("tcp_keepalives_interval", "5"),
    ("tcp_keepalives_count", "3"),
    ("tcp_user_timeout", "30000"),
    ("client_connection_check_interval", "5000"),
];

/// The statement that applies [`SERVER_SIDE_SETTINGS`] to a new session: each
/// one still at its built-in default (`pg_settings.source`), and known to
/// the server; one the server refuses (`client_connection_check_interval`
/// where it cannot check a socket, such as Windows) is left as it was rather
/// than failing the connection.
fn server_side_settings() -> String {
    let values: Vec<String> = SERVER_SIDE_SETTINGS
        .iter()
        .map(|(name, value)| format!("('{name}', '{value}')"))
        .collect();
    format!(
        "DO $tally$ DECLARE s record; BEGIN \
         FOR s IN SELECT v.name, v.value FROM (VALUES {}) AS v(name, value) \
         JOIN pg_settings p ON p.name = v.name WHERE p.source = 'default' LOOP \
         BEGIN PERFORM set_config(s.name, s.value, false); \
         EXCEPTION WHEN OTHERS THEN NULL; END; \
         END LOOP; END $tally$",
        values.join(", ")
    )
}

/// `url` as a client configuration, with Tally's defaults for what the URL
/// leaves unset: [`CONNECT_TIMEOUT`], [`TCP_USER_TIMEOUT`],
/// [`KEEPALIVES_IDLE`] and [`KEEPALIVES_INTERVAL`].
fn postgres_config(url: &str) -> Result<tokio_postgres::Config> {
    // The client's own message for another scheme is "unexpected EOF".
    if let Some((scheme, _)) = url.split_once("://") {
        if !matches!(scheme, "postgres" | "postgresql") {
            return Err(Error::BadUrl(format!(
                "the database URL must be a PostgreSQL one, postgres://user@host:port/database \
                 (its scheme is {scheme:?})"
            )));
        }
    }
    let mut config: tokio_postgres::Config = url.parse()?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    // tokio-postgres's default: the URL did not set it.
    if config.get_keepalives_idle() == std::time::Duration::from_secs(2 * 60 * 60) {
        config.keepalives_idle(KEEPALIVES_IDLE);
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(KEEPALIVES_INTERVAL);
    }
    Ok(config)
}

impl Connection {
    pub fn sqlite(connection: rusqlite::Connection) -> Connection {
        Connection {
            kind: Kind::Sqlite(connection),
        }
    }

    /// Connect to PostgreSQL (`postgres://user@host:port/database`). Not
    /// from an async thread: every call blocks on the connection's runtime.
    pub fn postgres(url: &str) -> Result<Connection> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Corrupt(format!("a runtime for the connection: {e}")))?;
        let config = postgres_config(url)?;
        // `connect_timeout` bounds reaching each address, in turn; the whole
        // start-up exchange is bounded too, or a port that accepts and never
        // answers would hold the caller (`tally migrate`) for ever. The bound
        // leaves each host (of a multi-host URL, tried one after another)
        // two addresses' worth of time and the exchange as long again.
        let each = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(CONNECT_TIMEOUT);
        let hosts = u32::try_from(config.get_hosts().len().max(1)).unwrap_or(u32::MAX);
        let limit = each.saturating_mul(hosts.saturating_mul(2).saturating_add(1));
        let (client, connection) = runtime
            .block_on(async {
                tokio::time::timeout(limit, config.connect(tokio_postgres::NoTls)).await
            })
            .map_err(|_| Error::ConnectTimeout(limit))?
            .map_err(|error| match error.code() {
                // At connect, 55000 is the database taking no new
                // connections for now (from a statement it means others).
                Some(code) if code.code() == "55000" => {
                    Error::NotAccepting(postgres_message(&error))
                }
                _ => Error::from(error),
            })?;
        runtime.spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(
                    error = postgres_message(&error),
                    "a PostgreSQL connection ended"
                );
            }
        });
        // No JIT compilation: the store's statements are short, and a plan
        // costed from missing statistics (a new database, before its first
        // ANALYZE) can cross `jit_above_cost` and spend 10-15 ms compiling
        // a statement that runs in microseconds, on the writer's thread.
        // And PostgreSQL's end of the connection is told to notice a client
        // that vanished (`SERVER_SIDE_SETTINGS`).
        // Notices ("relation ... already exists, skipping" from every
        // migration check) are not worth a log line each: warnings are.
        let setup = format!(
            "SET jit = off; SET client_min_messages = warning; {}",
            server_side_settings()
        );
        runtime.block_on(client.batch_execute(&setup))?;
        Ok(Connection {
            kind: Kind::Postgres(Box::new(Pg {
                runtime,
                client: std::sync::Arc::new(client),
                in_flight: RefCell::new(None),
                outcome: RefCell::new(None),
                failed: RefCell::new(None),
                statements: RefCell::new(HashMap::new()),
                begin_pending: Cell::new(false),
                deferred: RefCell::new(Vec::new()),
                ranks: RefCell::new(Vec::new()),
                bulk: RefCell::new(HashMap::new()),
                checked: RefCell::new(HashMap::new()),
                copies: RefCell::new(HashMap::new()),
                lost_place: Default::default(),
                prefetched: RefCell::new(Vec::new()),
            })),
        })
    }

    /// A PostgreSQL connection the server closed (it is not reused).
    pub fn is_broken(&self) -> bool {
        match &self.kind {
            Kind::Sqlite(_) => false,
            Kind::Postgres(pg) => pg.client.is_closed() || pg.lost(),
        }
    }

    /// Like [`Connection::is_broken`], after letting the connection read
    /// what the server sent while it sat idle (a PostgreSQL connection
    /// learns that the server closed it only when its runtime runs): for a
    /// pooled connection before it is used.
    pub fn is_stale(&self) -> bool {
        if let Kind::Postgres(pg) = &self.kind {
            pg.turn();
        }
        self.is_broken()
    }

    pub fn dialect(&self) -> Dialect {
        match self.kind {
            Kind::Sqlite(_) => Dialect::Sqlite,
            Kind::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Run `read` in one read-only snapshot: every statement in it sees the
    /// same committed state.
    pub fn snapshot<T>(&self, read: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let begin = match self.dialect() {
            Dialect::Sqlite => "BEGIN",
            Dialect::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        };
        self.execute_batch(begin)?;
        match read(self) {
            Ok(value) => {
                self.execute_batch("COMMIT")?;
                Ok(value)
            }
            Err(error) => {
                let _ = self.execute_batch("ROLLBACK");
                Err(error)
            }
        }
    }

    /// Statements without parameters or results, separated by `;`.
    pub fn execute_batch(&self, sql: &str) -> Result<()> {
        match &self.kind {
            Kind::Sqlite(connection) => Ok(connection.execute_batch(sql)?),
            Kind::Postgres(pg) => pg.pipeline(Some(sql)),
        }
    }

    /// Open the writer's transaction. On PostgreSQL the `BEGIN` is sent
    /// with whatever statement comes next, in the same round trip.
    pub fn begin(&self) -> Result<()> {
        match &self.kind {
            Kind::Sqlite(connection) => Ok(connection.execute_batch("BEGIN IMMEDIATE")?),
            Kind::Postgres(pg) => {
                assert!(!pg.begin_pending.get(), "a transaction is already open");
                pg.begin_pending.set(true);
                Ok(())
            }
        }
    }

    /// Commit the writer's transaction: on PostgreSQL the owed `BEGIN`, the
    /// deferred writes and the `COMMIT` go out in one round trip (nothing at
    /// all for a transaction that wrote and read nothing).
    pub fn commit(&self) -> Result<()> {
        match &self.kind {
            Kind::Sqlite(connection) => Ok(connection.execute_batch("COMMIT")?),
            Kind::Postgres(pg) => {
                if pg.nothing_to_commit()? {
                    return Ok(());
                }
                pg.pipeline(Some("COMMIT"))
            }
        }
    }

    /// Commit the writer's transaction without waiting for the answer
    /// (PostgreSQL): the owed `BEGIN`, the deferred writes and the `COMMIT`
    /// are sent, and the caller goes on (applying the next group) while
    /// PostgreSQL runs them. Returns whether a commit is now in flight
    /// (`false`: the transaction wrote and read nothing, nothing was sent).
    /// Its outcome comes from [`Connection::commit_outcome`] or
    /// [`Connection::commit_outcome_or`]. Until it is known, nothing else
    /// goes out on the connection: any other statement first waits for it,
    /// and if it failed, that statement and every later one fail with
    /// [`Error::EarlierCommit`] until [`Connection::rollback`]. So nothing
    /// built on a group reaches the database unless that group committed.
    /// On SQLite this is [`Connection::commit`] (and returns `false`).
    pub fn commit_async(&self) -> Result<bool> {
        let pg = match &self.kind {
            Kind::Sqlite(_) => return self.commit().map(|()| false),
            Kind::Postgres(pg) => pg,
        };
        if pg.nothing_to_commit()? {
            return Ok(false);
        }
        assert!(
            pg.outcome.borrow().is_none(),
            "the last commit's outcome was not taken"
        );
        let Some(commit) = pg.pipeline_future(Some("COMMIT".to_owned()))? else {
            return Ok(false);
        };
        let handle = pg.runtime.spawn(commit);
        *pg.in_flight.borrow_mut() = Some(handle);
        // Let the task queue its statements and the connection write them
        // out, so that PostgreSQL works on them while the caller goes on.
        pg.turn();
        Ok(true)
    }

    /// The outcome of the commit sent ahead, once it is known (taken: the
    /// next call returns `None`). With `wait`, waits for it; without, only
    /// reads what has arrived. `None` when no commit was sent ahead.
    pub fn commit_outcome(&self, wait: bool) -> Option<Result<()>> {
        let Kind::Postgres(pg) = &self.kind else {
            return None;
        };
        let handle = pg.in_flight.borrow_mut().take();
        if let Some(mut handle) = handle {
            if !wait {
                pg.turn();
            }
            if wait || handle.is_finished() {
                let joined = pg.runtime.block_on(&mut handle);
                pg.settle(joined);
            } else {
                *pg.in_flight.borrow_mut() = Some(handle);
            }
        }
        pg.outcome.borrow_mut().take()
    }

    /// Wait for whichever comes first: the outcome of the commit sent ahead
    /// (taken, as [`Connection::commit_outcome`]), or `other`. With no
    /// commit in flight, waits for `other`. PostgreSQL only (SQLite never
    /// sends a commit ahead).
    pub fn commit_outcome_or<F: Future>(&self, other: F) -> Waited<F::Output> {
        let Kind::Postgres(pg) = &self.kind else {
            panic!("commit_outcome_or on SQLite: no commit is ever sent ahead there");
        };
        if let Some(outcome) = pg.outcome.borrow_mut().take() {
            return Waited::Committed(outcome);
        }
        let handle = pg.in_flight.borrow_mut().take();
        let Some(mut handle) = handle else {
            return Waited::Other(pg.runtime.block_on(other));
        };
        let other = std::pin::pin!(other);
        match pg
            .runtime
            .block_on(futures_util::future::select(&mut handle, other))
        {
            futures_util::future::Either::Left((joined, _)) => {
                pg.settle(joined);
                Waited::Committed(pg.outcome.borrow_mut().take().expect("just settled"))
            }
            futures_util::future::Either::Right((output, _)) => {
                *pg.in_flight.borrow_mut() = Some(handle);
                Waited::Other(output)
            }
        }
    }

    /// PostgreSQL: wait for `future` on this connection's runtime, at most
    /// `limit` (`None`: the limit passed first). No commit may be in flight.
    pub fn wait_at_most<F: Future>(
        &self,
        future: F,
        limit: std::time::Duration,
    ) -> Option<F::Output> {
        let Kind::Postgres(pg) = &self.kind else {
            panic!("wait_at_most on SQLite: it has no runtime of its own");
        };
        assert!(
            pg.in_flight.borrow().is_none(),
            "wait_at_most with a commit in flight"
        );
        pg.runtime
            .block_on(async { tokio::time::timeout(limit, future).await.ok() })
    }

    /// Roll back the open transaction, dropping deferred writes unsent.
    /// On PostgreSQL, a commit sent ahead must have been settled (its
    /// outcome taken with [`Connection::commit_outcome`]); a failed one no
    /// longer blocks the connection after this.
    pub fn rollback(&self) -> Result<()> {
        if let Kind::Postgres(pg) = &self.kind {
            assert!(
                pg.in_flight.borrow().is_none(),
                "rollback with a commit in flight"
            );
            let after_failed_commit = pg.failed.borrow_mut().take().is_some();
            pg.deferred.borrow_mut().clear();
            // Nothing was sent: nothing to roll back. Unless a commit sent
            // ahead failed part-way through its pipeline (its COMMIT may
            // never have gone out): end its transaction too.
            if pg.begin_pending.replace(false) && !after_failed_commit {
                return Ok(());
            }
        }
        self.execute_batch("ROLLBACK")
    }

    /// A write whose row count nobody reads. SQLite (in process) runs it at
    /// once. PostgreSQL queues it, and sends each statement's queued rows as
    /// one set-based statement (`unnest` of one array per parameter) before
    /// any other statement runs on this connection, the commit included: the
    /// connection reads its own writes, and a group of many commands costs
    /// a few round trips instead of one per row. Batches of different
    /// statements are sent in the order each statement was first deferred
    /// on this connection (even after a full batch sent the queue midway),
    /// so a deferred statement may depend only on statements deferred
    /// before it the first time (a delivery on its notification).
    pub fn defer(&self, shape: Shape, sql: &'static str, params: impl Params) -> Result<()> {
        let pg = match &self.kind {
            Kind::Sqlite(_) => {
                let changed = self.execute(sql, params)?;
                if shape == Shape::UpdateByFirst && changed != 1 {
                    return Err(Error::Corrupt(format!(
                        "a deferred update changed {changed} rows instead of one: {sql}"
                    )));
                }
                return Ok(());
            }
            Kind::Postgres(pg) => pg,
        };
        let row: Vec<Owned> = params.values().map(Owned::of).collect();
        let full = {
            let mut deferred = pg.deferred.borrow_mut();
            let index = match deferred.iter().position(|b| b.sql == sql) {
                Some(index) => index,
                None => {
                    let mut ranks = pg.ranks.borrow_mut();
                    let mine = match ranks.iter().position(|known| *known == sql) {
                        Some(mine) => mine,
                        None => {
                            ranks.push(sql);
                            ranks.len() - 1
                        }
                    };
                    // Before the first batch of a statement first deferred
                    // later (a few statements: a short walk).
                    let at = deferred
                        .iter()
                        .position(|b| ranks.iter().position(|k| *k == b.sql) > Some(mine))
                        .unwrap_or(deferred.len());
                    deferred.insert(
                        at,
                        Batch {
                            sql,
                            shape,
                            rows: Vec::new(),
                            keys: HashMap::new(),
                        },
                    );
                    at
                }
            };
            let batch = &mut deferred[index];
            assert_eq!(batch.shape, shape, "one shape per deferred statement");
            match shape {
                Shape::Insert => batch.rows.push(row),
                Shape::UpdateByFirst => {
                    let key = row.first().expect("an update has its key first").clone();
                    match batch.keys.get(&key) {
                        Some(&at) => batch.rows[at] = row,
                        None => {
                            batch.keys.insert(key, batch.rows.len());
                            batch.rows.push(row);
                        }
                    }
                }
            }
            batch.rows.len() >= MAX_BULK_ROWS
        };
        if full {
            pg.flush()?;
        }
        Ok(())
    }

    pub fn execute(&self, sql: &str, params: impl Params) -> Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    pub fn query_row<T>(
        &self,
        sql: &str,
        params: impl Params,
        f: impl FnOnce(&Row<'_>) -> Result<T>,
    ) -> Result<T> {
        self.prepare_cached(sql)?.query_row(params, f)
    }

    /// PostgreSQL: take the session advisory lock `key`, waiting for as long
    /// as another session holds it. Every `every` while it waits, `between`
    /// runs on this thread; when it says to stop, the wait is given up
    /// (false) and the connection must be dropped (the lock may have been
    /// granted meanwhile). True once this session holds the lock. One wait
    /// from start to end: no statement times out, so nothing lands in the
    /// server's log, and the session keeps its place in the lock's queue.
    pub fn wait_for_advisory_lock(
        &self,
        key: i64,
        every: std::time::Duration,
        between: &mut dyn FnMut() -> bool,
    ) -> Result<bool> {
        let Kind::Postgres(pg) = &self.kind else {
            return Err(Error::Corrupt(
                "advisory locks are PostgreSQL's, not SQLite's".into(),
            ));
        };
        pg.flush()?;
        pg.ready()?;
        pg.runtime.block_on(async {
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&key];
            let lock = pg.client.query_one("SELECT pg_advisory_lock($1)", &params);
            let mut lock = std::pin::pin!(lock);
            loop {
                tokio::select! {
                    locked = &mut lock => return Ok(locked.map(|_| true)?),
                    _ = tokio::time::sleep(every) => {
                        if between() {
                            return Ok(false);
                        }
                    }
                }
            }
        })
    }

    /// PostgreSQL: run the `queries` (each a statement as given to
    /// [`Connection::prepare_cached`], with the one parameter `param`)
    /// together, in the same round trip as the owed `BEGIN` and deferred
    /// writes, and keep their rows: the next read of each (the same
    /// statement and parameter) takes them instead of a round trip of its
    /// own. Whatever the connection sends next that is not a read (deferred
    /// writes, sent before the next read is prepared; a statement run with
    /// [`Statement::execute`]; a batch such as `COMMIT` or `ROLLBACK`;
    /// another `prefetch`), or
    /// [`Connection::forget_prefetched`], drops what was not taken. (A write
    /// sent as a query, with `RETURNING`, would not: the one caller,
    /// `rows::read_ahead`, sends none in between.) SQLite reads in process:
    /// nothing is done.
    pub fn prefetch(&self, queries: &[&str], param: &str) -> Result<()> {
        let Kind::Postgres(pg) = &self.kind else {
            return Ok(());
        };
        pg.prefetched.borrow_mut().clear();
        pg.ready()?;
        let statements = queries
            .iter()
            .map(|sql| pg.prepared(sql))
            .collect::<Result<Vec<_>>>()?;
        let owed = pg.pipeline_future(None)?;
        let value = PgParam(Value::Text(param));
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&value];
        let client = &*pg.client;
        let reads = futures_util::future::try_join_all(
            statements
                .iter()
                .map(|statement| client.query(statement, &params)),
        );
        let rows = pg.block_on(async {
            match owed {
                // Both go out in one round trip, what is owed first.
                Some(owed) => {
                    let (owed, reads) = futures_util::future::join(owed, reads).await;
                    owed?;
                    reads
                }
                None => reads.await,
            }
        })?;
        let mut prefetched = pg.prefetched.borrow_mut();
        for (sql, rows) in queries.iter().zip(rows) {
            prefetched.push(Prefetched {
                statement: (*sql).to_owned(),
                param: param.to_owned(),
                rows,
            });
        }
        Ok(())
    }

    /// Drop the rows [`Connection::prefetch`] read that were not taken.
    pub fn forget_prefetched(&self) {
        if let Kind::Postgres(pg) = &self.kind {
            pg.prefetched.borrow_mut().clear();
        }
    }

    /// A statement kept prepared on this connection.
    pub fn prepare_cached(&self, sql: &str) -> Result<Statement<'_>> {
        match &self.kind {
            Kind::Sqlite(connection) => Ok(Statement::Sqlite(connection.prepare_cached(sql)?)),
            Kind::Postgres(pg) => {
                pg.flush()?;
                let prefetched = pg
                    .prefetched
                    .borrow()
                    .iter()
                    .any(|p| p.statement == sql)
                    .then(|| sql.to_owned());
                Ok(Statement::Postgres(pg, pg.prepared(sql)?, prefetched))
            }
        }
    }

    /// A statement prepared once (SQL built at run time).
    pub fn prepare(&self, sql: &str) -> Result<Statement<'_>> {
        match &self.kind {
            Kind::Sqlite(connection) => Ok(Statement::SqliteOnce(connection.prepare(sql)?)),
            Kind::Postgres(pg) => {
                pg.flush()?;
                let statement = pg.block_on(pg.client.prepare(&placeholders(sql)))?;
                Ok(Statement::Postgres(pg, statement, None))
            }
        }
    }
}

/// What [`Connection::commit_outcome_or`] waited for.
pub enum Waited<T> {
    Committed(Result<()>),
    Other(T),
}

type Pending<'a> = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a>>;

impl Pg {
    /// Run `future` to its end, once a commit sent ahead is known to have
    /// succeeded (see [`Connection::commit_async`]).
    fn block_on<T>(
        &self,
        future: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T> {
        self.ready()?;
        Ok(self.runtime.block_on(future)?)
    }

    /// Once a commit sent ahead is known to have succeeded: whether the
    /// open transaction wrote and read nothing, so that its `COMMIT` is
    /// skipped (and the transaction closed).
    fn nothing_to_commit(&self) -> Result<bool> {
        self.ready()?;
        let empty = self.begin_pending.get() && self.deferred.borrow().is_empty();
        if empty {
            self.begin_pending.set(false);
        }
        Ok(empty)
    }

    /// Wait for a commit sent ahead; fail if it failed (or an earlier one
    /// did and the writer has not rolled back since).
    fn ready(&self) -> Result<()> {
        let handle = self.in_flight.borrow_mut().take();
        if let Some(handle) = handle {
            let joined = self.runtime.block_on(handle);
            self.settle(joined);
        }
        if self.lost() {
            return Err(Error::Corrupt(
                "this PostgreSQL connection lost its place (after a refused COPY, or a commit whose outcome is unknown); it is not used again"
                    .into(),
            ));
        }
        match &*self.failed.borrow() {
            Some(why) => Err(Error::EarlierCommit(why.clone())),
            None => Ok(()),
        }
    }

    /// Record the outcome of the commit sent ahead.
    fn settle(
        &self,
        joined: std::result::Result<Result<(), tokio_postgres::Error>, tokio::task::JoinError>,
    ) {
        let outcome = match joined {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(Error::from(error)),
            Err(error) => {
                // The task ended without an answer (it panicked, or was
                // cancelled): whether its COMMIT took effect is unknown, so
                // the connection is not trusted again. The writer then
                // cannot read its state back on it and leads again on a new
                // one, rebuilding what it holds in memory (the operation
                // index among it) from what the database committed.
                self.lost_place
                    .store(true, std::sync::atomic::Ordering::Release);
                Err(Error::CommitTask(error.to_string()))
            }
        };
        if let Err(error) = &outcome {
            *self.failed.borrow_mut() = Some(error.to_string());
        }
        *self.outcome.borrow_mut() = Some(outcome);
    }

    /// Whether a refused `COPY` left the connection out of step (see
    /// `lost_place`).
    fn lost(&self) -> bool {
        self.lost_place.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A few turns of the connection's runtime: tasks that are ready run
    /// (a commit sent ahead queues its statements, the connection writes
    /// them out, or reads what came back), and nothing waits.
    fn turn(&self) {
        self.runtime.block_on(async {
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
        });
    }

    /// `sql` prepared on this connection, once.
    fn prepared(&self, sql: &str) -> Result<tokio_postgres::Statement> {
        if let Some(statement) = self.statements.borrow().get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.prepare_text(&placeholders(sql))?;
        self.statements
            .borrow_mut()
            .insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    /// How `batch` goes out: an insert of [`COPY_MIN_ROWS`] rows or more
    /// by its `COPY` form where it has one and it is the `first` statement
    /// of its round trip (after the owed `BEGIN`), else one statement
    /// ([`Pg::execute_statement`]). Only the first: a `COPY` that the server
    /// refuses before taking its rows (as it refuses every statement after
    /// a failed one in the transaction) leaves the connection out of step
    /// (see `lost_place`), whereas every statement sent in an earlier round
    /// trip of the transaction is known to have succeeded.
    fn batch_statement(&self, batch: &Batch, first: bool) -> Result<Outgoing> {
        if first && batch.shape == Shape::Insert && batch.rows.len() >= COPY_MIN_ROWS {
            if let Some(copy) = self.copy_form(batch.sql)? {
                return Ok(Outgoing::Copy(copy));
            }
        }
        self.execute_statement(batch).map(Outgoing::Execute)
    }

    /// The `COPY` form of the insert `sql`, prepared once (`None` if it has
    /// none, [`copy_sql`]).
    fn copy_form(&self, sql: &'static str) -> Result<Option<CopyForm>> {
        if let Some(copy) = self.copies.borrow().get(sql) {
            return Ok(copy.clone());
        }
        let single = self.prepared(sql)?;
        let copy = match copy_sql(&placeholders(sql), single.params().len()) {
            // If PostgreSQL will not prepare it, the insert keeps its
            // set-based form (`prepare_text` logged why).
            Some(text) => self.prepare_text(&text).ok().map(|statement| CopyForm {
                statement,
                // The insert's parameters are its columns, in order: their
                // types are the columns' (what a binary COPY must send).
                types: single.params().to_vec(),
            }),
            None => None,
        };
        self.copies.borrow_mut().insert(sql, copy.clone());
        Ok(copy)
    }

    /// The statement that runs `batch` in one execution: its one-row form
    /// for one row (an update checked to change its row, [`checked_sql`],
    /// prepared again every [`REPREPARE_AFTER`] runs), else its set-based
    /// form (prepared once).
    fn execute_statement(&self, batch: &Batch) -> Result<tokio_postgres::Statement> {
        let single = self.prepared(batch.sql)?;
        let one = one_row(batch);
        if one && batch.shape == Shape::Insert {
            return Ok(single);
        }
        if one {
            if let Some((statement, runs)) = self.checked.borrow_mut().get_mut(batch.sql) {
                if *runs < REPREPARE_AFTER {
                    *runs += 1;
                    return Ok(statement.clone());
                }
            }
            let text = checked_sql(&placeholders(batch.sql), single.params().len())
                .ok_or_else(|| Error::Corrupt(format!("no checked form of {}", batch.sql)))?;
            let statement = self.prepare_text(&text)?;
            self.checked
                .borrow_mut()
                .insert(batch.sql, (statement.clone(), 1));
            return Ok(statement);
        }
        if let Some(statement) = self.bulk.borrow().get(batch.sql) {
            return Ok(statement.clone());
        }
        let text = bulk_sql(&placeholders(batch.sql), batch.shape, single.params())
            .ok_or_else(|| Error::Corrupt(format!("no set-based form of {}", batch.sql)))?;
        let statement = self.prepare_text(&text)?;
        self.bulk.borrow_mut().insert(batch.sql, statement.clone());
        Ok(statement)
    }

    /// Prepare `text` (`$N` placeholders) on this connection.
    fn prepare_text(&self, text: &str) -> Result<tokio_postgres::Statement> {
        self.block_on(self.client.prepare(text))
            .inspect_err(|error| {
                if let Error::Postgres(error) = error {
                    tracing::error!(
                        sql = text,
                        error = postgres_message(error),
                        "cannot prepare"
                    )
                }
            })
    }

    /// The rows [`Connection::prefetch`] read for `statement` with
    /// `params` (one text parameter), taken.
    fn take_prefetched(&self, sql: &str, params: &impl Params) -> Option<Vec<tokio_postgres::Row>> {
        let mut prefetched = self.prefetched.borrow_mut();
        if prefetched.is_empty() {
            return None;
        }
        let mut values = params.values();
        let Some(Value::Text(param)) = values.next() else {
            return None;
        };
        if values.next().is_some() {
            return None;
        }
        let at = prefetched
            .iter()
            .position(|p| p.statement == sql && p.param == param)?;
        Some(prefetched.swap_remove(at).rows)
    }

    /// Send what is owed before any other statement: the `BEGIN`, every
    /// deferred write (see [`Connection::defer`]).
    fn flush(&self) -> Result<()> {
        self.pipeline(None)
    }

    /// Send, in one round trip: the owed `BEGIN`, each deferred batch as one
    /// statement, then `last` (simple-protocol SQL such as `COMMIT`).
    /// PostgreSQL runs them in order; once one fails, the ones after it in
    /// the transaction fail too (and a `COMMIT` there rolls back), and the
    /// first error is returned.
    fn pipeline(&self, last: Option<&str>) -> Result<()> {
        self.ready()?;
        match self.pipeline_future(last.map(str::to_owned))? {
            Some(future) => self.block_on(future),
            None => Ok(()),
        }
    }

    /// What [`Pg::pipeline`] sends, as a future that owns its statements
    /// and rows (it may run as a task: [`Connection::commit_async`]);
    /// `None` when nothing is owed.
    fn pipeline_future(
        &self,
        last: Option<String>,
    ) -> Result<Option<impl Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static>>
    {
        let begin = self.begin_pending.replace(false);
        let batches = std::mem::take(&mut *self.deferred.borrow_mut());
        if !begin && batches.is_empty() && last.is_none() {
            return Ok(None);
        }
        // Rows read ahead are not read after anything else is sent.
        self.prefetched.borrow_mut().clear();
        let statements = batches
            .iter()
            .enumerate()
            .map(|(at, batch)| self.batch_statement(batch, at == 0))
            .collect::<Result<Vec<_>>>()?;
        let client = self.client.clone();
        let lost_place = std::sync::Arc::clone(&self.lost_place);
        Ok(Some(async move {
            // Each batch's parameters: one value per column for a single
            // row, else one array per column (and, for an update, how many
            // rows it must change).
            let singles: Vec<Vec<PgParam<'_>>> = batches
                .iter()
                .map(|batch| match one_row(batch) {
                    true => batch.rows[0].iter().map(|v| PgParam(v.value())).collect(),
                    false => Vec::new(),
                })
                .collect();
            let columns: Vec<Vec<Vec<PgParam<'_>>>> = batches
                .iter()
                .zip(&statements)
                .map(|(batch, outgoing)| {
                    match one_row(batch) || matches!(outgoing, Outgoing::Copy(_)) {
                        true => Vec::new(),
                        false => (0..batch.rows[0].len())
                            .map(|column| {
                                batch
                                    .rows
                                    .iter()
                                    .map(|row| PgParam(row[column].value()))
                                    .collect()
                            })
                            .collect(),
                    }
                })
                .collect();
            let expected: Vec<i64> = batches.iter().map(|b| b.rows.len() as i64).collect();
            let params: Vec<Vec<&(dyn tokio_postgres::types::ToSql + Sync)>> = batches
                .iter()
                .enumerate()
                .map(|(at, batch)| {
                    if one_row(batch) {
                        return pg_refs(&singles[at]);
                    }
                    let mut refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = columns[at]
                        .iter()
                        .map(|c| c as &(dyn tokio_postgres::types::ToSql + Sync))
                        .collect();
                    if batch.shape == Shape::UpdateByFirst {
                        refs.push(&expected[at]);
                    }
                    refs
                })
                .collect();
            let client = &*client;
            // A simple-protocol statement (no parameters) in the pipeline.
            let simple = |sql: &str| -> Pending<'_> {
                let sql = sql.to_owned();
                Box::pin(async move { client.batch_execute(&sql).await.map(|()| 0) })
            };
            let mut pending: Vec<Pending<'_>> = Vec::with_capacity(batches.len() + 4);
            if begin {
                pending.push(simple("BEGIN"));
            }
            // The set-based updates are planned for the arrays they run
            // with: by default PostgreSQL settles on one generic plan per
            // statement after five runs, costed with the statistics of that
            // moment, and on a new database (near-empty tables) the balance
            // update kept a sequential scan of `grant_balances` in every
            // group until the next ANALYZE (0.85 ms to update one row of
            // 10,000; BENCHMARKS.md, 2026-12-04, late). Only around them:
            // the set-based inserts (whose plan has no choice to make) and
            // the writer's other statements (loading a customer) keep their
            // generic plans, which cost less to run than to plan (planning
            // each insert cost about 30 µs a group; BENCHMARKS.md,
            // 2026-12-05, later). They also cost a random page read like a
            // sequential one ([`SET_FOR_UPDATES`]): with the default, groups
            // of a few dozen keys scanned the whole balance table. RESET
            // restores the session's defaults (the server's, the role's or
            // the database's settings). A SET in a transaction that fails is
            // undone with it; outside a transaction, a batch that fails
            // before it is sent would leave both settings on for the
            // connection's later statements (custom plans, and plans costed
            // for data in memory), but the writer defers only inside its
            // group's transaction.
            // (One SET and one RESET around each run of updates in a row.)
            let mut custom = false;
            // A one-row update goes by its key (through the primary key,
            // in any plan made for a table of more than a page or so; see
            // REPREPARE_AFTER): it needs neither setting.
            for ((outgoing, params), batch) in statements.iter().zip(&params).zip(&batches) {
                let update = batch.shape == Shape::UpdateByFirst && !one_row(batch);
                if update != custom {
                    pending.push(simple(match update {
                        true => SET_FOR_UPDATES,
                        false => RESET_AFTER_UPDATES,
                    }));
                    custom = update;
                }
                match outgoing {
                    Outgoing::Execute(statement) => {
                        pending.push(Box::pin(client.execute(statement, params)))
                    }
                    // The connection sends nothing queued after the COPY
                    // until its rows and its end have gone out, so the
                    // statements after it keep their order.
                    Outgoing::Copy(copy) => pending.push(Box::pin({
                        let lost_place = std::sync::Arc::clone(&lost_place);
                        async move {
                            // Until the server has taken the COPY (or if it
                            // refuses it), the connection's place is in doubt.
                            let doubt = LostPlace(Some(lost_place));
                            let sink = client.copy_in::<_, bytes::Bytes>(&copy.statement).await?;
                            doubt.clear();
                            let writer = BinaryCopyInWriter::new(sink, &copy.types);
                            futures_util::pin_mut!(writer);
                            for row in &batch.rows {
                                let values: Vec<PgParam<'_>> =
                                    row.iter().map(|value| PgParam(value.value())).collect();
                                writer.as_mut().write_raw(values).await?;
                            }
                            writer.finish().await
                        }
                    })),
                }
            }
            if custom {
                pending.push(simple(RESET_AFTER_UPDATES));
            }
            if let Some(last) = &last {
                pending.push(simple(last));
            }
            if let Err(error) = futures_util::future::try_join_all(pending).await {
                // The statements after the failed one may not have gone out
                // (a parameter that cannot be encoded fails before it is
                // sent), the COMMIT among them: end the transaction here, or
                // the next group's would carry this one's rows. After a
                // COMMIT that did go out this only draws a warning.
                if last.as_deref() == Some("COMMIT") {
                    let _ = client.batch_execute("ROLLBACK").await;
                }
                return Err(error);
            }
            Ok(())
        }))
    }
}

/// What the set-based updates run with (see [`Pg::pipeline`]): a plan made
/// for their arrays, and the cost of a random page read as cheap as a
/// sequential one is on a working set in memory. With the default (4), a
/// custom plan for an update of 33 keys of `grant_balances` (10,000 rows)
/// hashed the keys and scanned the whole table: 1.5-1.9 ms, against
/// 0.4-0.6 ms through the primary key (BENCHMARKS.md, 2026-12-05, fourth
/// session). Large groups still get a hash join where it is cheaper.
const SET_FOR_UPDATES: &str = "SET plan_cache_mode = force_custom_plan; SET random_page_cost = 1.1";
/// Back to the session's own defaults after the set-based updates.
const RESET_AFTER_UPDATES: &str = "RESET plan_cache_mode; RESET random_page_cost";

/// The set-based form of a one-row statement (`$N` placeholders): each
/// parameter becomes an array (of the type PostgreSQL inferred for it),
/// unnested into a row source `v(p1, ..., pk)`.
/// `INSERT ... VALUES (e1, ..., en) rest` becomes
/// `INSERT ... SELECT e1', ..., en' FROM unnest(...) AS v(...) rest`;
/// `UPDATE t SET ... WHERE ...` becomes `UPDATE t SET ... FROM unnest(...)
/// AS v(...) WHERE ...`, where `e'` is `e` with each `$N` read as `v.pN`.
fn bulk_sql(sql: &str, shape: Shape, types: &[tokio_postgres::types::Type]) -> Option<String> {
    // Only the two plain shapes are rewritten: no string literal (a `$` in
    // it would be read as a parameter), no FROM or subquery of its own.
    if sql.contains('\'') || sql.contains(" FROM ") || sql.contains("SELECT") {
        return None;
    }
    let arrays: Vec<String> = types
        .iter()
        .enumerate()
        .map(|(i, ty)| format!("${}::{}[]", i + 1, ty.name()))
        .collect();
    let names: Vec<String> = (1..=types.len()).map(|i| format!("p{i}")).collect();
    let source = format!("unnest({}) AS v({})", arrays.join(", "), names.join(", "));
    let column = |text: &str| -> String {
        let mut out = String::with_capacity(text.len() + 16);
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '$' {
                out.push_str("v.p");
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    out.push(*d);
                    chars.next();
                }
            } else {
                out.push(c);
            }
        }
        out
    };
    match shape {
        Shape::Insert => {
            let at = sql.find(" VALUES (")?;
            let open = at + " VALUES (".len();
            let mut depth = 1;
            let mut close = None;
            for (i, c) in sql[open..].char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            close = Some(open + i);
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let close = close?;
            // A parameter after the values (`ON CONFLICT ... SET x = $3`)
            // would read a whole array.
            if sql[close..].contains('$') {
                return None;
            }
            Some(format!(
                "{} SELECT {} FROM {source}{}",
                &sql[..at],
                column(&sql[open..close]),
                &sql[close + 1..]
            ))
        }
        // The update asserts inside the transaction that it changed one row
        // per key (the last parameter is how many): a missing row fails the
        // statement, so the COMMIT sent after it in the same round trip
        // rolls back instead of committing half a group.
        Shape::UpdateByFirst => {
            let at = sql.find(" WHERE ")?;
            Some(format!(
                "WITH changed AS ({} FROM {source}{} RETURNING 1) \
                 SELECT CAST(CASE WHEN count(*) = ${}::int8 THEN '0' \
                 ELSE 'a deferred update did not find one row per key' END AS int8) FROM changed",
                column(&sql[..at]),
                column(&sql[at..]),
                types.len() + 1
            ))
        }
    }
}

/// Whether `batch` goes out in its one-row form (one value per parameter).
fn one_row(batch: &Batch) -> bool {
    batch.rows.len() == 1
}

/// The one-row form of a deferred update (`$N` placeholders, `params` of
/// them), checked inside the transaction as the set-based form is: if it
/// does not change exactly one row, the statement fails, and so does the
/// group's `COMMIT` sent after it.
fn checked_sql(sql: &str, params: usize) -> Option<String> {
    // As `bulk_sql`: a `$` in a string literal would be read as a parameter.
    if sql.contains('\'') || !sql.starts_with("UPDATE ") || params == 0 {
        return None;
    }
    Some(format!(
        "WITH changed AS ({sql} RETURNING 1) \
         SELECT CAST(CASE WHEN count(*) = 1 THEN '0' \
         ELSE 'a deferred update did not find its row' END AS int8) FROM changed"
    ))
}

/// The binary `COPY` form of a plain insert (`$N` placeholders, `params` of
/// them): `INSERT INTO t (c1, ..., cn) VALUES ($1, ..., $n)`, each column
/// given its own parameter in order and nothing after, becomes
/// `COPY t (c1, ..., cn) FROM STDIN (FORMAT BINARY)`. `None` for any other
/// insert (a constant or an expression among the values, `ON CONFLICT`,
/// `RETURNING`), which keeps its set-based form.
pub(crate) fn copy_sql(sql: &str, params: usize) -> Option<String> {
    let target = sql.strip_prefix("INSERT INTO ")?;
    let (target, values) = target.split_once(" VALUES (")?;
    let values = values.trim_end().strip_suffix(')')?;
    let numbered = values
        .split(',')
        .map(str::trim)
        .enumerate()
        .all(|(i, value)| value.strip_prefix('$') == Some(&(i + 1).to_string()));
    let (table, columns) = target.split_once(" (")?;
    let columns = columns.strip_suffix(')')?;
    // Plain names only: an alias (`t AS x`), a subscript or a field
    // (`b[1]`, `b.f`) or a quoted name would not make a valid COPY.
    let plain = |name: &str| {
        let name = name.trim();
        name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    if params == 0
        || !numbered
        || values.split(',').count() != params
        || columns.split(',').count() != params
        || !plain(table)
        || !columns.split(',').all(plain)
        || sql.contains('\'')
    {
        return None;
    }
    Some(format!("COPY {target} FROM STDIN (FORMAT BINARY)"))
}

/// `?N` to `$N` (and a bare `?` to the next number), outside string literals.
pub(crate) fn placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    // SQLite numbers a bare `?` one past the largest number seen so far.
    let mut largest = 0u32;
    let mut in_string = false;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_string = !in_string;
                out.push(c);
            }
            '?' if !in_string => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    digits.push(*d);
                    chars.next();
                }
                if digits.is_empty() {
                    digits = (largest + 1).to_string();
                }
                largest = largest.max(digits.parse().unwrap_or(0));
                out.push('$');
                out.push_str(&digits);
            }
            _ => out.push(c),
        }
    }
    out
}

pub enum Statement<'c> {
    Sqlite(rusqlite::CachedStatement<'c>),
    SqliteOnce(rusqlite::Statement<'c>),
    /// With the statement's SQL while rows read ahead for it may be waiting
    /// ([`Connection::prefetch`]).
    Postgres(&'c Pg, tokio_postgres::Statement, Option<String>),
}

/// The parameters as the postgres client takes them.
fn pg_params(params: &impl Params) -> Vec<PgParam<'_>> {
    params.values().map(PgParam).collect()
}

fn pg_refs<'p>(params: &'p [PgParam<'_>]) -> Vec<&'p (dyn tokio_postgres::types::ToSql + Sync)> {
    params
        .iter()
        .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect()
}

impl<'c> Statement<'c> {
    /// The SQLite statement, cached or not; `None` on PostgreSQL.
    fn sqlite(&mut self) -> Option<&mut rusqlite::Statement<'c>> {
        match self {
            Statement::Sqlite(statement) => Some(statement),
            Statement::SqliteOnce(statement) => Some(statement),
            Statement::Postgres(..) => None,
        }
    }

    pub fn execute(&mut self, params: impl Params) -> Result<usize> {
        if let Some(statement) = self.sqlite() {
            return Ok(
                statement.execute(rusqlite::params_from_iter(params.values().map(SqliteParam)))?
            );
        }
        let Statement::Postgres(pg, statement, _) = self else {
            unreachable!("not SQLite")
        };
        pg.prefetched.borrow_mut().clear();
        let values = pg_params(&params);
        let count = pg.block_on(pg.client.execute(&*statement, &pg_refs(&values)))?;
        Ok(usize::try_from(count).unwrap_or(usize::MAX))
    }

    pub fn query(&mut self, params: impl Params) -> Result<Rows<'_>> {
        if let Statement::Postgres(pg, statement, sql) = self {
            if let Some(rows) = sql
                .as_deref()
                .and_then(|sql| pg.take_prefetched(sql, &params))
            {
                return Ok(Rows::Postgres(rows.into_iter(), None));
            }
            let values = pg_params(&params);
            let rows = pg.block_on(pg.client.query(&*statement, &pg_refs(&values)))?;
            return Ok(Rows::Postgres(rows.into_iter(), None));
        }
        let statement = self.sqlite().expect("not PostgreSQL");
        Ok(Rows::Sqlite(statement.query(
            rusqlite::params_from_iter(params.values().map(SqliteParam)),
        )?))
    }

    pub fn query_row<T>(
        &mut self,
        params: impl Params,
        f: impl FnOnce(&Row<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut rows = self.query(params)?;
        match rows.next()? {
            Some(row) => f(&row),
            None => Err(Error::NoRows),
        }
    }

    /// Every row, mapped (read eagerly).
    pub fn query_map<T>(
        &mut self,
        params: impl Params,
        mut f: impl FnMut(&Row<'_>) -> Result<T>,
    ) -> Result<std::vec::IntoIter<Result<T>>> {
        let mut rows = self.query(params)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(f(&row));
        }
        Ok(out.into_iter())
    }
}

pub enum Rows<'s> {
    Sqlite(rusqlite::Rows<'s>),
    Postgres(
        std::vec::IntoIter<tokio_postgres::Row>,
        Option<tokio_postgres::Row>,
    ),
}

impl Rows<'_> {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Row<'_>>> {
        match self {
            Rows::Sqlite(rows) => Ok(rows.next()?.map(Row::Sqlite)),
            Rows::Postgres(rows, current) => {
                *current = rows.next();
                Ok(current.as_ref().map(Row::Postgres))
            }
        }
    }
}

/// A column's position (only `usize`, so a literal needs no annotation).
pub trait RowIndex {
    fn index(self) -> usize;
}

impl RowIndex for usize {
    fn index(self) -> usize {
        self
    }
}

pub enum Row<'r> {
    Sqlite(&'r rusqlite::Row<'r>),
    Postgres(&'r tokio_postgres::Row),
}

impl Row<'_> {
    pub fn get<I: RowIndex, T: FromValue>(&self, index: I) -> Result<T> {
        let index = index.index();
        match self {
            Row::Sqlite(row) => {
                let value = match row.get_ref(index)? {
                    rusqlite::types::ValueRef::Null => ValueRef::Null,
                    rusqlite::types::ValueRef::Integer(v) => ValueRef::Int(v),
                    rusqlite::types::ValueRef::Real(v) => ValueRef::Real(v),
                    rusqlite::types::ValueRef::Text(v) => ValueRef::Text(
                        std::str::from_utf8(v).map_err(|e| Error::Type(index, e.to_string()))?,
                    ),
                    rusqlite::types::ValueRef::Blob(v) => ValueRef::Blob(v),
                };
                T::from_value(value).map_err(|e| Error::Type(index, e))
            }
            Row::Postgres(row) => {
                let owned: PgValue = row.try_get(index)?;
                T::from_value(owned.as_ref()).map_err(|e| Error::Type(index, e))
            }
        }
    }
}

struct SqliteParam<'a>(Value<'a>);

impl rusqlite::ToSql for SqliteParam<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef as V};
        Ok(ToSqlOutput::Borrowed(match self.0 {
            Value::Null => V::Null,
            Value::Int(v) => V::Integer(v),
            Value::Text(v) => V::Text(v.as_bytes()),
            Value::Blob(v) => V::Blob(v),
        }))
    }
}

type BoxError = Box<dyn std::error::Error + Sync + Send>;

/// A parameter encoded as the type PostgreSQL inferred for it.
#[derive(Debug)]
struct PgParam<'a>(Value<'a>);

impl tokio_postgres::types::ToSql for PgParam<'_> {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, BoxError> {
        use tokio_postgres::types::{IsNull, Type};
        match self.0 {
            Value::Null => return Ok(IsNull::Yes),
            Value::Int(v) => match *ty {
                Type::INT8 => out.put_i64(v),
                Type::INT4 => out.put_i32(i32::try_from(v)?),
                Type::INT2 => out.put_i16(i16::try_from(v)?),
                Type::BOOL => out.put_u8(u8::from(v != 0)),
                Type::TEXT | Type::VARCHAR | Type::UNKNOWN => {
                    out.put_slice(v.to_string().as_bytes())
                }
                _ => return Err(format!("an integer cannot be sent as {ty}").into()),
            },
            Value::Text(v) => match *ty {
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                    out.put_slice(v.as_bytes())
                }
                Type::JSON => out.put_slice(v.as_bytes()),
                Type::JSONB => {
                    out.put_u8(1);
                    out.put_slice(v.as_bytes())
                }
                Type::BYTEA => out.put_slice(v.as_bytes()),
                _ => return Err(format!("text cannot be sent as {ty}").into()),
            },
            Value::Blob(v) => match *ty {
                Type::BYTEA => out.put_slice(v),
                _ => return Err(format!("bytes cannot be sent as {ty}").into()),
            },
        }
        Ok(IsNull::No)
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

/// A column read from PostgreSQL, whatever its type.
enum PgValue {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl PgValue {
    fn as_ref(&self) -> ValueRef<'_> {
        match self {
            PgValue::Null => ValueRef::Null,
            PgValue::Int(v) => ValueRef::Int(*v),
            PgValue::Text(v) => ValueRef::Text(v),
            PgValue::Blob(v) => ValueRef::Blob(v),
        }
    }
}

impl<'a> tokio_postgres::types::FromSql<'a> for PgValue {
    fn from_sql(ty: &tokio_postgres::types::Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        use tokio_postgres::types::Type;
        Ok(match *ty {
            Type::INT8 => PgValue::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => PgValue::Int(i64::from(i32::from_sql(ty, raw)?)),
            Type::INT2 => PgValue::Int(i64::from(i16::from_sql(ty, raw)?)),
            Type::OID => PgValue::Int(i64::from(u32::from_sql(ty, raw)?)),
            Type::BOOL => PgValue::Int(i64::from(bool::from_sql(ty, raw)?)),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN | Type::JSON => {
                PgValue::Text(std::str::from_utf8(raw)?.to_owned())
            }
            Type::JSONB => {
                PgValue::Text(std::str::from_utf8(raw.get(1..).unwrap_or(&[]))?.to_owned())
            }
            Type::BYTEA => PgValue::Blob(raw.to_vec()),
            _ => return Err(format!("cannot read a column of type {ty}").into()),
        })
    }

    fn from_sql_null(_: &tokio_postgres::types::Type) -> Result<Self, BoxError> {
        Ok(PgValue::Null)
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn set_based_forms_read_each_parameter_from_its_array() {
        use tokio_postgres::types::Type;
        assert_eq!(
            bulk_sql(
                "INSERT INTO t (a, b, c) VALUES ($1, 0, lower($2)) ON CONFLICT DO NOTHING",
                Shape::Insert,
                &[Type::INT8, Type::TEXT]
            )
            .as_deref(),
            Some(
                "INSERT INTO t (a, b, c) SELECT v.p1, 0, lower(v.p2) FROM \
                 unnest($1::int8[], $2::text[]) AS v(p1, p2) ON CONFLICT DO NOTHING"
            )
        );
        assert_eq!(
            bulk_sql(
                "UPDATE t SET a = $2, b = $3 WHERE id = $1",
                Shape::UpdateByFirst,
                &[Type::INT8, Type::INT8, Type::BYTEA]
            )
            .as_deref(),
            Some(
                "WITH changed AS (UPDATE t SET a = v.p2, b = v.p3 FROM \
                 unnest($1::int8[], $2::int8[], $3::bytea[]) AS v(p1, p2, p3) WHERE id = v.p1 \
                 RETURNING 1) SELECT CAST(CASE WHEN count(*) = $4::int8 THEN '0' \
                 ELSE 'a deferred update did not find one row per key' END AS int8) FROM changed"
            )
        );
        // Shapes it does not rewrite.
        for (sql, shape) in [
            ("DELETE FROM t", Shape::Insert),
            (
                "INSERT INTO t (a) VALUES ($1) ON CONFLICT (a) DO UPDATE SET b = $2",
                Shape::Insert,
            ),
            ("INSERT INTO t (a) VALUES ('$1')", Shape::Insert),
            (
                "UPDATE t SET a = $2 FROM u WHERE id = $1",
                Shape::UpdateByFirst,
            ),
        ] {
            assert_eq!(
                bulk_sql(sql, shape, &[Type::INT8, Type::INT8]),
                None,
                "{sql}"
            );
        }
    }

    #[test]
    fn plain_inserts_have_a_copy_form_and_others_do_not() {
        assert_eq!(
            copy_sql("INSERT INTO t (a, b, c) VALUES ($1, $2, $3)", 3).as_deref(),
            Some("COPY t (a, b, c) FROM STDIN (FORMAT BINARY)")
        );
        assert_eq!(
            copy_sql("INSERT INTO t (a,b) VALUES ($1,$2)", 2).as_deref(),
            Some("COPY t (a,b) FROM STDIN (FORMAT BINARY)")
        );
        for sql in [
            // a constant or an expression among the values
            "INSERT INTO t (a, b, c) VALUES ($1, 0, $2)",
            "INSERT INTO t (a, b) VALUES ($1, lower($2))",
            // parameters out of the columns' order
            "INSERT INTO t (a, b) VALUES ($2, $1)",
            // anything after the values
            "INSERT INTO t (a, b) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            "INSERT INTO t (a, b) VALUES ($1, $2) RETURNING a",
            // no column list
            "INSERT INTO t VALUES ($1, $2)",
            // a string literal
            "INSERT INTO t (a, b) VALUES ($1, 'x')",
            // an alias, a subscript, a field, a quoted name
            "INSERT INTO t AS x (a, b) VALUES ($1, $2)",
            "INSERT INTO t (a, b[1]) VALUES ($1, $2)",
            "INSERT INTO t (a, b.f) VALUES ($1, $2)",
            "INSERT INTO t (a, \"B\") VALUES ($1, $2)",
            "INSERT INTO s.t (a, b) VALUES ($1, $2)",
            "UPDATE t SET a = $2 WHERE b = $1",
        ] {
            assert_eq!(copy_sql(sql, 2), None, "{sql}");
        }
        assert_eq!(
            copy_sql("INSERT INTO t (a, b, c) VALUES ($1, $2)", 2),
            None,
            "fewer values than columns"
        );
    }

    /// A deferred insert of [`COPY_MIN_ROWS`] rows or more goes out by
    /// binary `COPY` on PostgreSQL when it is the first batch of its round
    /// trip, and what it wrote reads back exactly (null, extreme integers,
    /// text with tabs, newlines, backslashes and non-ASCII, a text longer
    /// than one `CopyData` message, bytes). A group whose `COPY` fails (a
    /// duplicate key), or whose first statement fails before an insert that
    /// would qualify, commits nothing, and the connection goes on.
    #[test]
    fn a_large_deferred_insert_is_copied_and_reads_back_exactly() {
        const INSERT: &str = "INSERT INTO c (k, n, t, b) VALUES (?1, ?2, ?3, ?4)";
        const INSERT_D: &str = "INSERT INTO d (k, n, t, b) VALUES (?1, ?2, ?3, ?4)";
        const UPDATE: &str = "UPDATE u SET v = ?2 WHERE k = ?1";
        let long = "long ".repeat(2_000);
        let texts = [
            "plain",
            "tab\there",
            "new\nline",
            "back\\slash \\N",
            "ünïcödé ✓",
            "",
            long.as_str(),
        ];
        type Copied = (i64, Option<i64>, Option<String>, Vec<u8>);
        let row = |k: i64| -> Copied {
            let n = match k % 4 {
                0 => None,
                1 => Some(i64::MAX),
                2 => Some(i64::MIN),
                _ => Some(-k),
            };
            let t = (k % 5 != 0).then(|| texts[k as usize % texts.len()].to_owned());
            (k, n, t, vec![0, 255, k as u8, b'\\', b'\n'])
        };
        // Defer the rows of these keys (the first error ends it).
        let insert = |connection: &Connection,
                      sql: &'static str,
                      keys: std::ops::RangeInclusive<i64>|
         -> Result<()> {
            keys.into_iter().try_for_each(|k| {
                let (k, n, t, b) = row(k);
                connection.defer(
                    Shape::Insert,
                    sql,
                    params![k, n, t.as_deref(), b.as_slice()],
                )
            })
        };
        // The rows in each table, and the value the groups' update sets.
        let counts = |connection: &Connection| -> (i64, i64, i64) {
            connection
                .query_row(
                    "SELECT (SELECT COUNT(*) FROM c), (SELECT COUNT(*) FROM d), \
                     (SELECT v FROM u WHERE k = 2)",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .unwrap()
        };
        let n = COPY_MIN_ROWS as i64;
        for (connection, place) in connections("copy") {
            connection
                .execute_batch(
                    "CREATE TABLE c (k BIGINT PRIMARY KEY, n BIGINT, t TEXT, b BYTEA NOT NULL); \
                     CREATE TABLE d (k BIGINT PRIMARY KEY, n BIGINT, t TEXT, b BYTEA NOT NULL); \
                     CREATE TABLE u (k BIGINT PRIMARY KEY, v BIGINT NOT NULL); \
                     INSERT INTO u VALUES (1, 0), (2, 0)",
                )
                .unwrap();
            let rows = n * 3;
            connection.begin().unwrap();
            insert(&connection, INSERT, 1..=rows).unwrap();
            if let Kind::Postgres(pg) = &connection.kind {
                let deferred = pg.deferred.borrow();
                let first = pg.batch_statement(&deferred[0], true).unwrap();
                assert!(
                    matches!(first, Outgoing::Copy(_)),
                    "a batch of {rows} rows first in its round trip goes out by COPY"
                );
                let later = pg.batch_statement(&deferred[0], false).unwrap();
                assert!(
                    matches!(later, Outgoing::Execute(_)),
                    "the same batch after another statement does not"
                );
            }
            connection
                .defer(Shape::UpdateByFirst, UPDATE, params![1i64, 11i64])
                .unwrap();
            connection.commit().unwrap();
            let mut statement = connection
                .prepare("SELECT k, n, t, b FROM c ORDER BY k")
                .unwrap();
            let read: Vec<Copied> = statement
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .unwrap()
                .collect::<Result<_>>()
                .unwrap();
            drop(statement);
            let expected: Vec<_> = (1..=rows).map(row).collect();
            assert_eq!(read, expected, "every copied row reads back as it was sent");
            let v1: i64 = connection
                .query_row("SELECT v FROM u WHERE k = 1", [], |r| r.get(0))
                .unwrap();
            assert_eq!(v1, 11, "the update after the COPY committed with it");

            // A group that must fail, and leave nothing behind.
            let failed_whole = |connection: &Connection, failed: Result<()>, why: &str| {
                assert!(failed.is_err(), "{why}");
                let _ = connection.rollback();
                assert_eq!(
                    counts(connection),
                    (rows, 0, 0),
                    "nothing of the failed group committed"
                );
            };

            // A duplicate key among the copied rows: the group fails and
            // nothing of it commits, neither the rows, nor the second insert
            // (sent after the COPY as a set-based insert), nor the update.
            // (SQLite runs each deferred write at once: its error comes there.)
            connection.begin().unwrap();
            let failed = insert(&connection, INSERT, rows..=rows + n - 1)
                .and_then(|()| insert(&connection, INSERT_D, 1..=n))
                .and_then(|()| connection.defer(Shape::UpdateByFirst, UPDATE, params![2i64, 22i64]))
                .and_then(|()| connection.commit());
            failed_whole(&connection, failed, "a duplicate key fails the group");

            // An update of a missing row first, then an insert that would
            // qualify for a COPY (it goes out set-based, after the update).
            connection.begin().unwrap();
            let failed = connection
                .defer(Shape::UpdateByFirst, UPDATE, params![99i64, 1i64])
                .and_then(|()| connection.defer(Shape::UpdateByFirst, UPDATE, params![2i64, 5i64]))
                .and_then(|()| insert(&connection, INSERT, rows + 1..=rows + n))
                .and_then(|()| connection.commit());
            failed_whole(
                &connection,
                failed,
                "an update of a missing row fails the group",
            );

            // The connection goes on: the next group commits, both inserts.
            connection.begin().unwrap();
            insert(&connection, INSERT, rows + 1..=rows + n).unwrap();
            insert(&connection, INSERT_D, 1..=n).unwrap();
            connection
                .defer(Shape::UpdateByFirst, UPDATE, params![2i64, 22i64])
                .unwrap();
            connection.commit().unwrap();
            assert!(!connection.is_broken());
            assert_eq!(counts(&connection), (rows + n, n, 22));

            // PostgreSQL: a COPY refused before it takes its rows (its table
            // renamed away) leaves the connection out of step. It says so,
            // and every later call on it fails instead of reading answers
            // meant for other statements.
            if connection.dialect() == Dialect::Postgres {
                connection
                    .execute_batch("ALTER TABLE c RENAME TO c_gone")
                    .unwrap();
                connection.begin().unwrap();
                let refused = insert(&connection, INSERT, 1_000..=1_000 + n)
                    .and_then(|()| connection.commit());
                assert!(refused.is_err(), "a COPY into a missing table fails");
                assert!(
                    connection.is_broken(),
                    "the connection says it lost its place"
                );
                let later: Result<i64> = connection.query_row("SELECT 1", [], |r| r.get(0));
                assert!(later.is_err(), "and is not used again: {later:?}");
            }
            drop(connection);
            drop_database(place);
        }
    }

    /// A URL's own timeouts are kept; what it leaves unset gets Tally's
    /// defaults, so a connection to a vanished host fails in bounded time.
    #[test]
    fn postgres_connections_get_timeouts_unless_the_url_sets_them() {
        let plain = postgres_config("postgres://tally@db.internal:5432/tally").unwrap();
        assert_eq!(plain.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert_eq!(plain.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
        assert_eq!(plain.get_keepalives_idle(), KEEPALIVES_IDLE);
        assert_eq!(plain.get_keepalives_interval(), Some(KEEPALIVES_INTERVAL));
        let set = postgres_config(
            "postgres://tally@db.internal:5432/tally?connect_timeout=3&tcp_user_timeout=7&keepalives_idle=90&keepalives_interval=11",
        )
        .unwrap();
        assert_eq!(
            set.get_keepalives_interval(),
            Some(std::time::Duration::from_secs(11))
        );
        assert_eq!(
            set.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(3))
        );
        assert_eq!(
            set.get_tcp_user_timeout(),
            Some(&std::time::Duration::from_secs(7))
        );
        assert_eq!(
            set.get_keepalives_idle(),
            std::time::Duration::from_secs(90)
        );
        assert!(postgres_config("postgres://tally@db:5432/tally?connect_timeout=soon").is_err());
    }

    /// PostgreSQL's end of a store connection is told to notice a client
    /// that vanished (keepalives, a user timeout, checks while a statement
    /// runs), but for what something else set for the session: the URL's
    /// `options`, or the database's own settings. Read back from sessions on
    /// the PostgreSQL pass of the suite.
    #[test]
    fn postgres_sessions_notice_a_vanished_client_unless_set_otherwise() {
        for (connection, place) in connections("vanished") {
            if connection.dialect() != Dialect::Postgres {
                continue;
            }
            // A setting's value, or None where the server does not know it.
            let read = |connection: &Connection, name: &str| -> Option<String> {
                connection
                    .query_row(
                        "SELECT max(setting) FROM pg_settings WHERE name = ?1",
                        params![name],
                        |row| row.get(0),
                    )
                    .unwrap()
            };
            // PostgreSQL reads the TCP settings as 0 on a Unix socket.
            let tcp: bool = connection
                .query_row("SELECT inet_client_addr() IS NOT NULL", [], |row| {
                    row.get(0)
                })
                .unwrap();
            for (name, value) in SERVER_SIDE_SETTINGS {
                if !tcp && name.starts_with("tcp_") {
                    continue;
                }
                if let Some(setting) = read(&connection, name) {
                    assert_eq!(&setting, value, "{name}");
                }
            }
            if !tcp {
                eprintln!("the suite's PostgreSQL is on a Unix socket: its TCP settings unchecked");
                continue;
            }
            let url = place.url().expect("a PostgreSQL database");
            let database = url.rsplit('/').next().unwrap().to_owned();
            connection
                .execute_batch(&format!(
                    "ALTER DATABASE {database} SET tcp_keepalives_count = 7"
                ))
                .unwrap();
            let separator = if url.contains('?') { '&' } else { '?' };
            let own = Connection::postgres(&format!(
                "{url}{separator}options=-c%20tcp_keepalives_idle%3D60"
            ))
            .unwrap();
            assert_eq!(read(&own, "tcp_keepalives_idle").unwrap(), "60");
            assert_eq!(read(&own, "tcp_keepalives_count").unwrap(), "7");
            assert_eq!(read(&own, "tcp_keepalives_interval").unwrap(), "5");
            assert_eq!(read(&own, "tcp_user_timeout").unwrap(), "30000");
            drop(own);
            drop(connection);
            drop_database(place);
        }
    }

    /// The connections the suite runs on: SQLite always, and a fresh
    /// PostgreSQL database with `TALLY_TEST_DATABASE=postgres`, dropped when
    /// its [`Place`] is (also when the test fails).
    pub(crate) fn connections(name: &str) -> Vec<(Connection, Place)> {
        let mut all = vec![(
            Connection::sqlite(rusqlite::Connection::open_in_memory().unwrap()),
            Place(None),
        )];
        if std::env::var("TALLY_TEST_DATABASE").as_deref() == Ok("postgres") {
            let server = std::env::var("TALLY_TEST_POSTGRES")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
            let database = format!("tally_db_{name}_{}", std::process::id());
            let admin = Connection::postgres(&format!("{server}/postgres"))
                .unwrap_or_else(|e| panic!("PostgreSQL at {server} is unreachable: {e}"));
            admin
                .execute_batch(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
                .unwrap();
            admin
                .execute_batch(&format!("CREATE DATABASE {database}"))
                .unwrap();
            let place = Place(Some((server.clone(), database.clone())));
            let connection = Connection::postgres(&format!("{server}/{database}")).unwrap();
            all.push((connection, place));
        }
        all
    }

    /// A test's PostgreSQL database (server, name), dropped with this value:
    /// at the test's end, or while a failed test unwinds.
    pub(crate) struct Place(Option<(String, String)>);

    impl Place {
        /// The URL of the test's PostgreSQL database, if it has one.
        pub(crate) fn url(&self) -> Option<String> {
            self.0
                .as_ref()
                .map(|(server, database)| format!("{server}/{database}"))
        }
    }

    impl Drop for Place {
        fn drop(&mut self) {
            let Some((server, database)) = self.0.take() else {
                return;
            };
            // No panic here: this may run while a failed test unwinds.
            let dropped = Connection::postgres(&format!("{server}/postgres")).and_then(|admin| {
                admin.execute_batch(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
            });
            if let Err(error) = dropped {
                eprintln!("could not drop the test database {database}: {error}");
            }
        }
    }

    /// Drop a test's database now (after its connection is closed).
    pub(crate) fn drop_database(place: Place) {
        drop(place);
    }

    /// On PostgreSQL the set-based batches run with custom plans (a generic
    /// plan made on a new, near-empty table kept a sequential scan), and the
    /// session is back to its own default right after them: the server's,
    /// or one an operator set on the database. SQLite has no plan cache:
    /// only the PostgreSQL pass of the suite (`TALLY_TEST_DATABASE=postgres`)
    /// runs this.
    #[test]
    fn set_based_updates_alone_are_planned_for_their_values() {
        const INSERT: &str = "INSERT INTO modes (k, mode) VALUES (?1, current_setting(?2))";
        const UPDATE: &str = "UPDATE modes SET mode = current_setting(?2) WHERE k = ?1";
        let setting = |connection: &Connection| -> String {
            connection
                .query_row("SELECT current_setting('plan_cache_mode')", [], |row| {
                    row.get(0)
                })
                .unwrap()
        };
        // One group with one set-based update: rows 1 and 2 record `name`.
        let update = |connection: &Connection, name: &str| {
            connection.begin().unwrap();
            for k in 1..=2i64 {
                connection
                    .defer(Shape::UpdateByFirst, UPDATE, params![k, name])
                    .unwrap();
            }
            connection.commit().unwrap();
        };
        let modes = |connection: &Connection| -> Vec<String> {
            let mut statement = connection
                .prepare("SELECT mode FROM modes ORDER BY k")
                .unwrap();
            statement
                .query_map([], |row| row.get(0))
                .unwrap()
                .collect::<Result<_>>()
                .unwrap()
        };
        for (connection, place) in connections("plans") {
            if connection.dialect() != Dialect::Postgres {
                continue;
            }
            let (server, database) = place.0.clone().expect("a PostgreSQL database");
            let default = setting(&connection);
            assert_ne!(default, "force_custom_plan", "the server's default");
            // Every store connection compiles nothing just in time.
            let jit: String = connection
                .query_row("SELECT current_setting('jit')", [], |row| row.get(0))
                .unwrap();
            assert_eq!(jit, "off");
            connection
                .execute_batch("CREATE TABLE modes (k BIGINT PRIMARY KEY, mode TEXT NOT NULL)")
                .unwrap();
            connection.begin().unwrap();
            for k in 1..=2i64 {
                connection
                    .defer(Shape::Insert, INSERT, params![k, "plan_cache_mode"])
                    .unwrap();
            }
            // A read sends the batches first; the session is back after them.
            assert_eq!(setting(&connection), default);
            connection.commit().unwrap();
            // Set-based inserts keep the session's plans.
            assert_eq!(modes(&connection), [default.clone(), default.clone()]);
            assert_eq!(setting(&connection), default);

            // A set-based update is planned for its values; an insert sent
            // after it in the same round trip is not.
            connection.begin().unwrap();
            for k in 1..=2i64 {
                connection
                    .defer(Shape::UpdateByFirst, UPDATE, params![k, "plan_cache_mode"])
                    .unwrap();
            }
            connection
                .defer(Shape::Insert, INSERT, params![3i64, "plan_cache_mode"])
                .unwrap();
            connection.commit().unwrap();
            assert_eq!(
                modes(&connection),
                [
                    "force_custom_plan".to_owned(),
                    "force_custom_plan".to_owned(),
                    default.clone()
                ]
            );
            assert_eq!(setting(&connection), default);

            // ... and costs a random page read like a sequential one; the
            // session's own cost is back after it.
            let page_cost = |connection: &Connection| -> String {
                connection
                    .query_row("SELECT current_setting('random_page_cost')", [], |row| {
                        row.get(0)
                    })
                    .unwrap()
            };
            let default_cost = page_cost(&connection);
            update(&connection, "random_page_cost");
            assert_eq!(modes(&connection)[..2], ["1.1", "1.1"]);
            assert_eq!(page_cost(&connection), default_cost);

            // A one-row update goes by its key with the session's settings
            // (every plan of it reads the primary key).
            connection.begin().unwrap();
            connection
                .defer(
                    Shape::UpdateByFirst,
                    UPDATE,
                    params![2i64, "plan_cache_mode"],
                )
                .unwrap();
            connection.commit().unwrap();
            assert_eq!(modes(&connection)[..2], ["1.1".to_owned(), default.clone()]);

            // A group whose set-based batch fails leaves the session as it
            // was.
            connection.begin().unwrap();
            let failed = connection
                .defer(
                    Shape::UpdateByFirst,
                    UPDATE,
                    params![1i64, "plan_cache_mode"],
                )
                .and_then(|()| {
                    connection.defer(
                        Shape::UpdateByFirst,
                        UPDATE,
                        params![99i64, "plan_cache_mode"],
                    )
                })
                .and_then(|()| connection.commit());
            assert!(failed.is_err(), "an update of a missing row must fail");
            let _ = connection.rollback();
            assert_eq!(setting(&connection), default);
            assert_eq!(page_cost(&connection), default_cost);

            // An operator's default for the database is what comes back.
            connection
                .execute_batch(&format!(
                    "ALTER DATABASE {database} SET plan_cache_mode = force_generic_plan; \
                     ALTER DATABASE {database} SET random_page_cost = 3"
                ))
                .unwrap();
            let configured = Connection::postgres(&format!("{server}/{database}")).unwrap();
            assert_eq!(setting(&configured), "force_generic_plan");
            assert_eq!(page_cost(&configured), "3");
            update(&configured, "random_page_cost");
            assert_eq!(modes(&configured)[..2], ["1.1", "1.1"]);
            assert_eq!(page_cost(&configured), "3");
            update(&configured, "plan_cache_mode");
            assert_eq!(
                modes(&configured)[..2],
                ["force_custom_plan", "force_custom_plan"]
            );
            assert_eq!(setting(&configured), "force_generic_plan");
            drop(configured);
            drop(connection);
            drop_database(place);
        }
    }

    /// Rows read ahead (`prefetch`) are what a read of the same statement
    /// and parameter then gets, once, without a round trip; they include the
    /// writes owed before them; a write, or `forget_prefetched`, drops them.
    /// On SQLite `prefetch` does nothing and every read reads.
    #[test]
    fn prefetched_rows_are_read_once_and_dropped_by_a_write() {
        const READ: &str = "SELECT v FROM kv WHERE k = ?1 ORDER BY v";
        const INSERT: &str = "INSERT INTO kv (k, v) VALUES (?1, ?2)";
        for (connection, place) in connections("prefetch") {
            connection
                .execute_batch("CREATE TABLE kv (k TEXT NOT NULL, v BIGINT NOT NULL)")
                .unwrap();
            let values = |connection: &Connection| -> Vec<i64> {
                let mut statement = connection.prepare_cached(READ).unwrap();
                let rows = statement.query_map(["a"], |row| row.get(0)).unwrap();
                rows.collect::<Result<_>>().unwrap()
            };
            // Another session's commit, seen by the next statement that
            // reads (READ COMMITTED), not by rows already read.
            let other = place.url().map(|url| Connection::postgres(&url).unwrap());
            let insert_elsewhere = |v: i64| match &other {
                Some(other) => {
                    other.execute(INSERT, params!["a", v]).unwrap();
                }
                None => {
                    connection.execute(INSERT, params!["a", v]).unwrap();
                }
            };

            connection.begin().unwrap();
            connection
                .defer(Shape::Insert, INSERT, params!["a", 1i64])
                .unwrap();
            connection.prefetch(&[READ], "a").unwrap();
            insert_elsewhere(2);
            match connection.dialect() {
                // Read ahead with the owed write, before the other commit;
                // taken once, then read again.
                Dialect::Postgres => {
                    assert_eq!(values(&connection), [1]);
                    assert_eq!(values(&connection), [1, 2]);
                }
                Dialect::Sqlite => assert_eq!(values(&connection), [1, 2]),
            }

            // Dropped by a write on this connection, and by forgetting.
            connection.prefetch(&[READ], "a").unwrap();
            connection
                .defer(Shape::Insert, INSERT, params!["a", 3i64])
                .unwrap();
            assert_eq!(values(&connection), [1, 2, 3]);
            connection.prefetch(&[READ], "a").unwrap();
            insert_elsewhere(4);
            connection.forget_prefetched();
            assert_eq!(values(&connection), [1, 2, 3, 4]);
            connection.prefetch(&[READ], "a").unwrap();
            connection.execute(INSERT, params!["a", 5i64]).unwrap();
            assert_eq!(values(&connection), [1, 2, 3, 4, 5]);

            // Several statements read ahead together, each served once.
            const COUNT: &str = "SELECT count(*) FROM kv WHERE k = ?1";
            let count = |connection: &Connection| -> i64 {
                connection
                    .query_row(COUNT, ["a"], |row| row.get(0))
                    .unwrap()
            };
            connection.prefetch(&[READ, COUNT], "a").unwrap();
            insert_elsewhere(6);
            match connection.dialect() {
                Dialect::Postgres => {
                    assert_eq!(count(&connection), 5);
                    assert_eq!(values(&connection), [1, 2, 3, 4, 5]);
                }
                Dialect::Sqlite => {
                    assert_eq!(count(&connection), 6);
                    assert_eq!(values(&connection), [1, 2, 3, 4, 5, 6]);
                }
            }
            assert_eq!(count(&connection), 6);

            // Another parameter is not served from what was read for "a".
            connection.prefetch(&[READ], "a").unwrap();
            let mut statement = connection.prepare_cached(READ).unwrap();
            let b: Vec<i64> = statement
                .query_map(["b"], |row| row.get(0))
                .unwrap()
                .collect::<Result<_>>()
                .unwrap();
            assert!(b.is_empty());
            drop(statement);
            connection.forget_prefetched();
            connection.commit().unwrap();
            drop(other);
            drop(connection);
            drop_database(place);
        }
    }

    /// A commit sent ahead (`commit_async`) is on its way when the call
    /// returns, without the connection being driven again; its outcome is
    /// taken once. If it fails, nothing sent after it reaches the database
    /// (every statement fails until `rollback`). PostgreSQL only: SQLite
    /// never sends a commit ahead.
    #[test]
    fn a_commit_sent_ahead_goes_out_and_what_follows_a_failed_one_never_does() {
        const INSERT: &str = "INSERT INTO sent (k) VALUES (?1)";
        for (connection, place) in connections("ahead") {
            if connection.dialect() != Dialect::Postgres {
                continue;
            }
            let (server, database) = place.0.clone().expect("a PostgreSQL database");
            let observer = Connection::postgres(&format!("{server}/{database}")).unwrap();
            let count = |k: i64| -> i64 {
                observer
                    .query_row(
                        "SELECT count(*) FROM sent WHERE k = ?1",
                        params![k],
                        |row| row.get(0),
                    )
                    .unwrap()
            };
            connection
                .execute_batch("CREATE TABLE sent (k BIGINT PRIMARY KEY)")
                .unwrap();

            // Sent and committed while this connection is left alone.
            connection.begin().unwrap();
            connection
                .defer(Shape::Insert, INSERT, params![1i64])
                .unwrap();
            assert!(connection.commit_async().unwrap(), "a commit in flight");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while count(1) == 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the commit sent ahead never reached PostgreSQL"
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            assert!(matches!(connection.commit_outcome(true), Some(Ok(()))));
            assert!(connection.commit_outcome(true).is_none(), "taken once");

            // Nothing to send: nothing in flight.
            connection.begin().unwrap();
            assert!(!connection.commit_async().unwrap());
            assert!(connection.commit_outcome(true).is_none());

            // A failed commit sent ahead: the next group (k = 2) fails
            // before any of it is sent, and so does a read.
            connection.begin().unwrap();
            connection
                .defer(Shape::Insert, INSERT, params![1i64])
                .unwrap();
            assert!(connection.commit_async().unwrap());
            connection.begin().unwrap();
            connection
                .defer(Shape::Insert, INSERT, params![2i64])
                .unwrap();
            let next = connection.commit();
            assert!(
                matches!(next, Err(Error::EarlierCommit(_))),
                "the group after a failed one: {next:?}"
            );
            let read = connection.query_row("SELECT 1", [], |row| row.get::<_, i64>(0));
            assert!(matches!(read, Err(Error::EarlierCommit(_))), "{read:?}");
            assert!(matches!(connection.commit_outcome(false), Some(Err(_))));
            connection.rollback().unwrap();
            assert_eq!(count(2), 0, "nothing built on the failed group was sent");

            // After the rollback the connection works again, and waiting
            // for either the outcome or something else takes the outcome.
            connection.begin().unwrap();
            connection
                .defer(Shape::Insert, INSERT, params![3i64])
                .unwrap();
            assert!(connection.commit_async().unwrap());
            match connection.commit_outcome_or(std::future::pending::<()>()) {
                Waited::Committed(outcome) => outcome.unwrap(),
                Waited::Other(()) => unreachable!("a pending future never ends"),
            }
            assert_eq!(count(3), 1);
            drop(observer);
            drop(connection);
            drop_database(place);
        }
    }

    /// Deferred writes are read back by the same connection, the last update
    /// of a key wins, and an update that does not find its row fails the
    /// transaction before it commits: nothing of it stays.
    #[test]
    fn deferred_writes_are_read_back_and_a_missed_update_commits_nothing() {
        const INSERT: &str = "INSERT INTO t (k, v) VALUES (?1, ?2)";
        const UPDATE: &str = "UPDATE t SET v = ?2 WHERE k = ?1";
        for (connection, place) in connections("deferred") {
            connection
                .execute_batch("CREATE TABLE t (k BIGINT PRIMARY KEY, v BIGINT NOT NULL)")
                .unwrap();
            connection.begin().unwrap();
            for k in 1..=3i64 {
                connection
                    .defer(Shape::Insert, INSERT, params![k, 0i64])
                    .unwrap();
            }
            connection
                .defer(Shape::UpdateByFirst, UPDATE, params![2i64, 5i64])
                .unwrap();
            connection
                .defer(Shape::UpdateByFirst, UPDATE, params![2i64, 7i64])
                .unwrap();
            connection
                .defer(Shape::UpdateByFirst, UPDATE, params![3i64, 9i64])
                .unwrap();
            let sum: i64 = connection
                .query_row("SELECT CAST(SUM(v) AS BIGINT) FROM t", [], |row| row.get(0))
                .unwrap();
            assert_eq!(
                sum, 16,
                "the connection reads its deferred writes, the last update wins"
            );
            connection.commit().unwrap();

            connection.begin().unwrap();
            connection
                .defer(Shape::Insert, INSERT, params![4i64, 100i64])
                .unwrap();
            let deferred = connection
                .defer(Shape::UpdateByFirst, UPDATE, params![1i64, 50i64])
                .and_then(|()| connection.defer(Shape::UpdateByFirst, UPDATE, params![99i64, 1i64]))
                .and_then(|()| connection.commit());
            assert!(deferred.is_err(), "an update of a missing row must fail");
            let _ = connection.rollback();
            let (count, sum): (i64, i64) = connection
                .query_row(
                    "SELECT COUNT(*), CAST(SUM(v) AS BIGINT) FROM t",
                    [],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .unwrap();
            assert_eq!(
                (count, sum),
                (3, 16),
                "nothing of the failed group committed"
            );
            // The same with the missed update alone in its batch (its
            // one-row form on PostgreSQL).
            connection.begin().unwrap();
            let deferred = connection
                .defer(Shape::Insert, INSERT, params![4i64, 100i64])
                .and_then(|()| connection.defer(Shape::UpdateByFirst, UPDATE, params![99i64, 1i64]))
                .and_then(|()| connection.commit());
            assert!(deferred.is_err(), "an update of a missing row must fail");
            let _ = connection.rollback();
            let count: i64 = connection
                .query_row("SELECT COUNT(*) FROM t", [], |row| row.get(0))
                .unwrap();
            assert_eq!(count, 3, "nothing of the failed group committed");
            connection.begin().unwrap();
            connection
                .defer(Shape::UpdateByFirst, UPDATE, params![3i64, 10i64])
                .unwrap();
            connection.commit().unwrap();
            let sum: i64 = connection
                .query_row("SELECT CAST(SUM(v) AS BIGINT) FROM t", [], |row| row.get(0))
                .unwrap();
            assert_eq!(sum, 17, "a one-row update changes its row");
            drop(connection);
            drop_database(place);
        }
    }

    /// A full batch sends the queue midway through a group, and the batches
    /// begun after it keep each statement's first place: rows that
    /// reference another deferred statement's rows (a webhook delivery, its
    /// notification) still go out after them. Without it the child batch,
    /// begun first after the send, went out first and broke the foreign key.
    #[test]
    fn batches_begun_after_a_full_one_was_sent_keep_their_order() {
        const PARENT: &str = "INSERT INTO parent (id) VALUES (?1)";
        const CHILD: &str = "INSERT INTO child (id, parent) VALUES (?1, ?2)";
        for (connection, place) in connections("deferred_order") {
            connection
                .execute_batch(
                    "CREATE TABLE parent (id BIGINT PRIMARY KEY); \
                     CREATE TABLE child (id BIGINT PRIMARY KEY, parent BIGINT NOT NULL REFERENCES parent(id))",
                )
                .unwrap();
            connection.begin().unwrap();
            // The parent batch fills at its MAX_BULK_ROWS-th row and sends
            // the queue before that parent's child is deferred.
            let rows = MAX_BULK_ROWS as i64 + 10;
            for k in 0..rows {
                connection.defer(Shape::Insert, PARENT, params![k]).unwrap();
                connection
                    .defer(Shape::Insert, CHILD, params![k, k])
                    .unwrap();
            }
            connection.commit().unwrap();
            let children: i64 = connection
                .query_row("SELECT COUNT(*) FROM child", [], |row| row.get(0))
                .unwrap();
            assert_eq!(children, rows, "{:?}", connection.dialect());
            drop(connection);
            drop_database(place);
        }
    }

    /// A one-row update is prepared again every [`REPREPARE_AFTER`] runs:
    /// its first eight run while the table holds two rows (PostgreSQL then
    /// keeps a generic plan that scans the table), the table grows to
    /// 10,000 rows, and within that many more runs the update reads its row
    /// through the primary key again. PostgreSQL only.
    #[test]
    fn a_one_row_update_is_planned_again_as_its_table_grows() {
        const UPDATE: &str = "UPDATE grown SET v = ?2 WHERE k = ?1";
        // One group with one one-row update.
        let update = |connection: &Connection, k: i64| {
            connection.begin().unwrap();
            connection
                .defer(Shape::UpdateByFirst, UPDATE, params![k, 1i64])
                .unwrap();
            connection.commit().unwrap();
        };
        // The scans of the table (sequential, by its primary key): those
        // the statistics hold plus those this session has not reported
        // yet. The session reports when idle, at most once a second, moving
        // its counts from the one to the other; one query sees either.
        let scans = |connection: &Connection| -> (i64, i64) {
            connection
                .query_row(
                    "SELECT pg_stat_get_numscans('grown'::regclass) \
                       + pg_stat_get_xact_numscans('grown'::regclass), \
                     pg_stat_get_numscans('grown_pkey'::regclass) \
                       + pg_stat_get_xact_numscans('grown_pkey'::regclass)",
                    [],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .unwrap()
        };
        for (connection, place) in connections("grown") {
            if connection.dialect() != Dialect::Postgres {
                continue;
            }
            connection
                .execute_batch(
                    // No autovacuum: its ANALYZE would replace the stale
                    // plan this test needs.
                    "CREATE TABLE grown (k BIGINT PRIMARY KEY, v BIGINT NOT NULL) \
                       WITH (autovacuum_enabled = false); \
                     INSERT INTO grown VALUES (1, 0), (2, 0); ANALYZE grown",
                )
                .unwrap();
            for _ in 0..8 {
                update(&connection, 1);
            }
            connection
                .execute_batch("INSERT INTO grown SELECT g, 0 FROM generate_series(3, 10002) AS g")
                .unwrap();
            // The plan made for two rows, still in use.
            let before = scans(&connection);
            update(&connection, 5000);
            let after = scans(&connection);
            assert_eq!(
                (after.0 - before.0, after.1 - before.1),
                (1, 0),
                "the generic plan made for two rows scans the table"
            );
            for _ in 0..REPREPARE_AFTER {
                update(&connection, 5000);
            }
            let before = scans(&connection);
            for k in 100..110 {
                update(&connection, k);
            }
            let after = scans(&connection);
            assert_eq!(
                (after.0 - before.0, after.1 - before.1),
                (0, 10),
                "prepared again, the update reads its row through the primary key"
            );
            drop(connection);
            drop_database(place);
        }
    }

    #[test]
    fn placeholders_are_numbered_outside_strings() {
        assert_eq!(
            placeholders("SELECT ?1, ?, '?x', ?2 WHERE a = ?"),
            "SELECT $1, $2, '?x', $2 WHERE a = $3"
        );
    }
}
