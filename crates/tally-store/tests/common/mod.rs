//! Where a store test keeps its data: a fresh directory (the embedded store),
//! or, with `TALLY_TEST_DATABASE=postgres`, a fresh PostgreSQL database on
//! `TALLY_TEST_POSTGRES` (default postgres://postgres@127.0.0.1:5432), so
//! every store test runs on both stores. Both are removed on drop.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tally_core::{Amount, Clock, Id, Source, Timestamp};
use tally_store::{Command, NewCharge, NewCustomer, NewGrant, Outcome, Store};

static NEXT: AtomicU64 = AtomicU64::new(0);

// Builders the store tests share (each test file uses some of them).

#[allow(dead_code)]
pub fn id(text: &str) -> Id {
    Id::parse(text).unwrap()
}

#[allow(dead_code)]
pub fn amount(text: &str) -> Amount {
    Amount::parse(text).unwrap()
}

/// Execute `command`; panics unless it succeeded.
#[allow(dead_code)]
pub async fn ok(store: &Store, command: Command) -> Outcome {
    let executed = store.execute(command, None).await.expect("store answers");
    executed
        .result
        .unwrap_or_else(|refusal| panic!("refused: {refusal:?}"))
}

/// Create customer `c` (no name, plan or overage policy).
#[allow(dead_code)]
pub fn customer() -> Command {
    Command::CreateCustomer(NewCustomer::with_id(id("c")))
}

/// A paid purchase of `credits` for customer `c`.
#[allow(dead_code)]
pub fn grant(grant_id: &str, credits: &str, expires_at: Option<Timestamp>) -> Command {
    Command::Grant(NewGrant {
        id: id(grant_id),
        customer_id: id("c"),
        amount: amount(credits),
        source: Source::Purchase,
        paid: true,
        cost_basis: None,
        priority: 0,
        effective_at: None,
        expires_at,
        scope: None,
        metadata: None,
        external_reference: None,
        reason: None,
    })
}

/// A charge of `credits` to customer `c`.
#[allow(dead_code)]
pub fn charge(charge_id: &str, credits: &str) -> Command {
    Command::Charge(NewCharge {
        id: id(charge_id),
        customer_id: id("c"),
        amount: Some(amount(credits)),
        feature: None,
        usage: None,
        member_id: None,
        reason: None,
        metadata: None,
    })
}

/// How many cases a property test runs: `embedded` on the embedded store, an
/// eighth of it on PostgreSQL, where each case creates a database (about half
/// a second each).
#[allow(dead_code)]
pub fn cases(embedded: u32) -> u32 {
    match std::env::var("TALLY_TEST_DATABASE").as_deref() {
        Ok("postgres") => (embedded / 8).max(1),
        _ => embedded,
    }
}

pub struct TestStore {
    dir: PathBuf,
    /// The server URL and the database's name.
    postgres: Option<(String, String)>,
}

fn admin(server: &str, sql: String) {
    run_sql(format!("{server}/postgres"), sql);
}

/// Run `sql` on the database at `url`.
fn run_sql(url: String, sql: String) {
    // The sync client runs its own runtime: off the test's async threads.
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap_or_else(|e| {
            panic!("PostgreSQL at {url} (TALLY_TEST_POSTGRES) is unreachable: {e}")
        });
        client
            .batch_execute(&sql)
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    })
    .join()
    .expect("admin thread");
}

impl TestStore {
    pub fn new(name: &str) -> TestStore {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir =
            std::env::temp_dir().join(format!("tally-store-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let postgres = match std::env::var("TALLY_TEST_DATABASE").as_deref() {
            Ok("postgres") => {
                let server = std::env::var("TALLY_TEST_POSTGRES")
                    .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
                let database = format!("tally_store_{name}_{}_{n}", std::process::id());
                admin(
                    &server,
                    format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"),
                );
                admin(&server, format!("CREATE DATABASE {database}"));
                Some((server, database))
            }
            Ok("sqlite") | Err(_) => None,
            Ok(other) => panic!("TALLY_TEST_DATABASE must be sqlite or postgres, not {other:?}"),
        };
        TestStore { dir, postgres }
    }

    /// Open (or reopen) the store, ready to write.
    #[allow(dead_code)]
    pub async fn open(&self, clock: Arc<dyn Clock>) -> Store {
        self.open_with(clock, tally_store::Options::default()).await
    }

    /// Open (or reopen) the store with `options`, ready to write.
    pub async fn open_with(&self, clock: Arc<dyn Clock>, options: tally_store::Options) -> Store {
        match &self.postgres {
            None => Store::open_with(&self.dir, clock, options).expect("open the store"),
            Some((server, database)) => {
                let store = Store::open_postgres(&format!("{server}/{database}"), clock, options)
                    .expect("open the store");
                store.advertise("http://127.0.0.1:9".into());
                tokio::time::timeout(
                    std::time::Duration::from_secs(30),
                    store.wait_until_leader(),
                )
                .await
                .expect("the store's writer started within 30 s");
                store
            }
        }
    }
}

impl TestStore {
    /// PostgreSQL only: a second store over the test's database on `clock`,
    /// which follows the one opened first (it does not run the writer);
    /// `None` on the embedded store, which one process alone opens.
    #[allow(dead_code)]
    pub fn open_follower(&self, clock: Arc<dyn Clock>) -> Option<Store> {
        let (server, database) = self.postgres.as_ref()?;
        let store = Store::open_postgres(
            &format!("{server}/{database}"),
            clock,
            tally_store::Options::default(),
        )
        .expect("open a second store");
        assert!(!store.is_leader(), "the first store runs the writer");
        Some(store)
    }

    /// Run `sqlite` (on the embedded store's file) or `postgres` (on the
    /// test's database) from a connection of the test's own, beside the
    /// store's: to change the database under a running store.
    #[allow(dead_code)]
    pub fn tamper(&self, sqlite: &str, postgres: &str) {
        match &self.postgres {
            None => {
                let connection = rusqlite::Connection::open(self.dir.join("tally.db"))
                    .expect("open the store's file");
                connection
                    .busy_timeout(std::time::Duration::from_secs(10))
                    .unwrap();
                connection
                    .execute_batch(sqlite)
                    .unwrap_or_else(|e| panic!("{sqlite}: {e}"));
            }
            Some((server, database)) => {
                run_sql(format!("{server}/{database}"), postgres.to_owned())
            }
        }
    }

    /// PostgreSQL only: the single `bigint` that `sql` selects, from a
    /// connection of the test's own; `None` on the embedded store.
    #[allow(dead_code)]
    pub fn count(&self, sql: &str) -> Option<i64> {
        let (server, database) = self.postgres.as_ref()?;
        let url = format!("{server}/{database}");
        let sql = sql.to_owned();
        let value = std::thread::spawn(move || {
            let mut client = postgres::Client::connect(&url, postgres::NoTls)
                .unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}"));
            let row = client
                .query_one(sql.as_str(), &[])
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            row.get::<_, i64>(0)
        })
        .join()
        .expect("admin thread");
        Some(value)
    }

    /// PostgreSQL only: hold an `EXCLUSIVE` lock on `table` for `hold` from
    /// a session of the test's own (writes to it wait, reads do not).
    /// Returns once the lock is taken; `None` on the embedded store.
    #[allow(dead_code)]
    pub fn lock_for(
        &self,
        table: &str,
        hold: std::time::Duration,
    ) -> Option<std::thread::JoinHandle<()>> {
        let (server, database) = self.postgres.as_ref()?;
        let url = format!("{server}/{database}");
        let sql = format!("LOCK TABLE {table} IN EXCLUSIVE MODE");
        let (taken, wait) = std::sync::mpsc::channel();
        let holder = std::thread::spawn(move || {
            let mut client = postgres::Client::connect(&url, postgres::NoTls)
                .unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}"));
            let mut transaction = client.transaction().expect("begin");
            transaction.batch_execute(&sql).expect("lock");
            taken.send(()).expect("the test waits");
            std::thread::sleep(hold);
            transaction.commit().expect("release");
        });
        wait.recv().expect("the lock was taken");
        Some(holder)
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some((server, database)) = &self.postgres {
            admin(
                server,
                format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"),
            );
        }
    }
}
