//! Starting the real `tally serve` for a test, and talking to it.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const ADMIN_KEY: &str = "test-admin-key";

/// Poll `done` (an expression, `.await` allowed) every 100 ms until it holds,
/// or fail after `limit` saying `what` did not happen within it.
macro_rules! wait_until {
    ($limit:expr, $what:expr, $done:expr) => {{
        let deadline = std::time::Instant::now() + $limit;
        loop {
            if $done {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} within {:?}",
                $what,
                $limit
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }};
}
pub(crate) use wait_until;

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// A fresh, empty directory under the system temp dir, removed by [`TestApp`]'s drop.
pub fn fresh_dir() -> PathBuf {
    let n = NEXT_DIR.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("tally-it-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create test dir");
    dir
}

/// The PostgreSQL server the tests use (`TALLY_TEST_POSTGRES`).
fn postgres_url() -> String {
    std::env::var("TALLY_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// The PostgreSQL server the suite runs against when `TALLY_TEST_DATABASE`
/// is `postgres` (scripts/test.sh runs the suite once on each store).
pub fn postgres_server() -> Option<String> {
    match std::env::var("TALLY_TEST_DATABASE").as_deref() {
        Ok("postgres") => Some(postgres_url()),
        Ok("sqlite") | Err(_) => None,
        Ok(other) => panic!("TALLY_TEST_DATABASE must be sqlite or postgres, not {other:?}"),
    }
}

/// Run one statement on `server`'s `postgres` database. The sync client runs
/// its own runtime, so it runs on a thread of its own (callable from async
/// code and from Drop alike). Fails loudly when the server is unreachable.
fn postgres_admin(server: &str, sql: String) {
    on_postgres(server, move |client| {
        client
            .batch_execute(&sql)
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
    });
}

/// Run `work` with a client of `server`'s `postgres` database, on a thread
/// of its own (see [`postgres_admin`]).
fn on_postgres<T: Send + 'static>(
    server: &str,
    work: impl FnOnce(&mut postgres::Client) -> T + Send + 'static,
) -> T {
    on_database(&format!("{server}/postgres"), work)
}

/// Run `work` with a client of the database at `url`, on a thread of its
/// own (see [`postgres_admin`]).
fn on_database<T: Send + 'static>(
    url: &str,
    work: impl FnOnce(&mut postgres::Client) -> T + Send + 'static,
) -> T {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls)
            .unwrap_or_else(|e| panic!("PostgreSQL at {url} is unreachable: {e}"));
        work(&mut client)
    })
    .join()
    .expect("the PostgreSQL statement failed")
}

/// A fresh PostgreSQL database for one test (dropped by [`TestApp`]'s drop);
/// its URL.
pub fn fresh_database(server: &str) -> String {
    let n = NEXT_DIR.fetch_add(1, Ordering::SeqCst);
    let name = format!("tally_it_{}_{n}", std::process::id());
    postgres_admin(
        server,
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
    );
    postgres_admin(server, format!("CREATE DATABASE {name}"));
    format!("{server}/{name}")
}

/// Run `sql` on the PostgreSQL database at `database_url` (a test's own).
pub fn run_on_database(database_url: &str, sql: &str) {
    let sql = sql.to_owned();
    on_database(database_url, move |client| {
        client
            .batch_execute(&sql)
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
    });
}

/// End (`pg_terminate_backend`) the sessions on `database_url`'s database
/// that `condition` selects (SQL on `pg_stat_activity`'s `pid`, with `$db`
/// for the database's name), as a PostgreSQL restart or a dropped network
/// ends them; how many it ended. Fails loudly when PostgreSQL is
/// unreachable.
pub fn terminate_sessions(database_url: &str, condition: &str) -> i64 {
    sessions(database_url, condition, "count(pg_terminate_backend(pid))")
}

/// Let `database_url`'s database take new connections or not (`ALTER
/// DATABASE ... ALLOW_CONNECTIONS`), as an operator's maintenance does.
pub fn allow_connections(database_url: &str, allow: bool) {
    let (server, name) = database_url.rsplit_once('/').expect("a database url");
    postgres_admin(
        server,
        format!("ALTER DATABASE {name} ALLOW_CONNECTIONS {allow}"),
    );
}

/// How many sessions on `database_url`'s database `condition` selects (as
/// for [`terminate_sessions`]).
pub fn count_sessions(database_url: &str, condition: &str) -> i64 {
    sessions(database_url, condition, "count(*)")
}

fn sessions(database_url: &str, condition: &str, select: &str) -> i64 {
    let (server, name) = database_url.rsplit_once('/').expect("a database url");
    let sql = format!(
        "SELECT {select} FROM pg_stat_activity \
         WHERE datname = '{name}' AND pid <> pg_backend_pid() AND ({})",
        condition.replace("$db", &format!("'{name}'"))
    );
    on_postgres(server, move |client| {
        let row = client
            .query_one(&sql, &[])
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        row.get::<_, i64>(0)
    })
}

/// The condition of [`terminate_sessions`] for the session that holds
/// Tally's leader lock (the writer's), or waits for it (a follower's).
pub fn leader_lock_sessions(granted: bool) -> String {
    format!(
        "pid IN (SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
         WHERE d.datname = $db AND l.locktype = 'advisory' AND l.granted = {granted})"
    )
}

fn drop_database(url: &str) {
    let (server, name) = url.rsplit_once('/').expect("a database url");
    postgres_admin(
        server,
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
    );
}

/// A private PostgreSQL cluster on one end of a virtual link, and a network
/// namespace holding the link's other end. A server started in the namespace
/// ([`Partition::options`]) reaches the database only over that link, which
/// [`Partition::cut`] takes down: from then on every packet either way is
/// dropped, with no reset, as when a host is cut off or loses power.
/// PostgreSQL then sees that server's sessions only as quiet. Servers started
/// outside the namespace reach the cluster's address locally and are not
/// cut off.
///
/// The cluster is made with `initdb` in `/tmp/tally-lab-<pid>-<n>` and run as the
/// `postgres` user (with `runuser`), listening only on the link's address, in
/// a 10.251.x.0/24 that nothing on the machine uses; the link is a `veth`
/// pair, made and dropped with `ip`. That needs root, `ip`, a `postgres`
/// user and PostgreSQL's server programs (`TALLY_TEST_PG_BIN`, or the newest
/// `/usr/lib/postgresql/*/bin`): without them the test fails, saying which.
/// Everything is removed on drop, and what a killed run left (its process
/// gone) when the next one starts. The names hold the process id and the
/// lab's number in it.
pub struct Partition {
    namespace: String,
    /// The link's end inside the namespace.
    inside: String,
    outside: String,
    dir: PathBuf,
    bin: PathBuf,
    /// The cluster's address (outside) and the namespace's.
    host: String,
    guest: String,
}

const PARTITION_PORT: u16 = 55432;

fn run(program: &str, args: &[&str]) {
    check(std::process::Command::new(program).args(args));
}

/// Run `command`; fail the test unless it succeeds.
fn check(command: &mut std::process::Command) {
    let status = command
        .status()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    assert!(status.success(), "{command:?}: {status}");
}

impl Partition {
    /// The lab number `n` of process `pid`.
    fn named(pid: u32, n: u32, bin: PathBuf, subnet: &str) -> Partition {
        Partition {
            namespace: format!("tally-lab-{pid}-{n}"),
            inside: format!("tl{pid}x{n}i"),
            outside: format!("tl{pid}x{n}o"),
            dir: PathBuf::from(format!("/tmp/tally-lab-{pid}-{n}")),
            bin,
            host: format!("{subnet}.1"),
            guest: format!("{subnet}.2"),
        }
    }

    pub fn new() -> Partition {
        // One lab is made at a time (the choice of a free subnet looks at
        // the addresses the others added), each with its own number.
        static MADE: std::sync::Mutex<u32> = std::sync::Mutex::new(0);
        let mut counter = MADE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *counter += 1;
        let n = *counter;
        let pid = std::process::id();
        let bin = match std::env::var_os("TALLY_TEST_PG_BIN") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
                    .expect("PostgreSQL's server programs under /usr/lib/postgresql (or set TALLY_TEST_PG_BIN)")
                    .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
                    .filter(|bin| bin.join("initdb").exists())
                    .collect();
                found.sort_by_key(|bin| {
                    bin.parent()
                        .and_then(|v| v.file_name())
                        .and_then(|v| v.to_str())
                        .and_then(|v| v.parse::<u32>().ok())
                });
                found
                    .pop()
                    .expect("no /usr/lib/postgresql/*/bin/initdb (set TALLY_TEST_PG_BIN)")
            }
        };
        // What runs of this test that were killed left behind: their
        // clusters, links, namespaces and directories.
        let netns = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
            .unwrap_or_default();
        let dirs = std::fs::read_dir("/tmp")
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let leftovers = netns
            .split_whitespace()
            .chain(dirs.iter().map(String::as_str))
            .filter_map(|name| {
                let (other, number) = name.strip_prefix("tally-lab-")?.split_once('-')?;
                Some((other.parse::<u32>().ok()?, number.parse::<u32>().ok()?))
            })
            .filter(|&(other, _)| {
                other != pid && !PathBuf::from(format!("/proc/{other}")).exists()
            });
        for (other, number) in leftovers.collect::<HashSet<_>>() {
            Partition::named(other, number, bin.clone(), "").remove();
        }
        // A /24 that no address or route of this machine is in.
        let taken = ["addr", "route"]
            .map(|what| {
                std::process::Command::new("ip")
                    .args(["-4", "-o", what, "show"])
                    .output()
                    .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
                    .unwrap_or_default()
            })
            .concat();
        let subnet = (0..250)
            .map(|k| format!("10.251.{}", (pid + n + k) % 250))
            .find(|subnet| !taken.contains(&format!("{subnet}.")))
            .expect("a free 10.251.x.0/24 for the partition test");
        let lab = Partition::named(pid, n, bin, &subnet);
        lab.remove();
        let made = std::process::Command::new("ip")
            .args(["netns", "add", &lab.namespace])
            .status();
        assert!(
            made.as_ref().is_ok_and(|status| status.success()),
            "a network namespace for the partition test ({made:?}): it needs root and `ip` (iproute2)"
        );
        run(
            "ip",
            &[
                "link",
                "add",
                &lab.outside,
                "type",
                "veth",
                "peer",
                "name",
                &lab.inside,
            ],
        );
        run("ip", &["link", "set", &lab.inside, "netns", &lab.namespace]);
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", lab.host),
                "dev",
                &lab.outside,
            ],
        );
        run("ip", &["link", "set", &lab.outside, "up"]);
        let ns = ["netns", "exec", lab.namespace.as_str(), "ip"];
        let inside_address = format!("{}/24", lab.guest);
        run(
            "ip",
            &[
                &ns[..],
                &["addr", "add", &inside_address, "dev", &lab.inside],
            ]
            .concat(),
        );
        run(
            "ip",
            &[&ns[..], &["link", "set", &lab.inside, "up"]].concat(),
        );
        run("ip", &[&ns[..], &["link", "set", "lo", "up"]].concat());

        std::fs::create_dir_all(&lab.dir).expect("the cluster's directory");
        run("chown", &["postgres", lab.dir.to_str().unwrap()]);
        let data = lab.data();
        check(&mut lab.as_postgres(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"],
        ));
        let mut hba = std::fs::OpenOptions::new()
            .append(true)
            .open(format!("{data}/pg_hba.conf"))
            .expect("pg_hba.conf");
        use std::io::Write;
        writeln!(hba, "host all all {subnet}.0/24 trust").expect("write pg_hba.conf");
        let settings = format!(
            "-p {PARTITION_PORT} -k {} -c listen_addresses={} -c fsync=off",
            lab.dir.display(),
            lab.host
        );
        let log = format!("{}/log", lab.dir.display());
        check(&mut lab.as_postgres(
            "pg_ctl",
            &["-D", &data, "-w", "-o", &settings, "-l", &log, "start"],
        ));
        postgres_admin(&lab.server(), "CREATE DATABASE tally".into());
        lab
    }

    /// `program` of PostgreSQL's, run as the `postgres` user.
    fn as_postgres(&self, program: &str, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new("runuser");
        command
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(program))
            .args(args);
        command
    }

    /// The cluster's data directory.
    fn data(&self) -> String {
        format!("{}/data", self.dir.display())
    }

    fn server(&self) -> String {
        format!("postgres://postgres@{}:{PARTITION_PORT}", self.host)
    }

    /// The database's URL.
    pub fn url(&self) -> String {
        format!("{}/tally", self.server())
    }

    /// Options that start a server inside the namespace, listening on its
    /// address (where the test and the other servers reach it).
    pub fn options(&self) -> Options {
        Options {
            launcher: vec![
                "ip".into(),
                "netns".into(),
                "exec".into(),
                self.namespace.clone(),
            ],
            listen: Some(format!("{}:0", self.guest)),
            ..Options::default()
        }
    }

    /// Options that start a server outside the namespace, listening on the
    /// cluster's address, which the servers inside reach over the link.
    pub fn outside_options(&self) -> Options {
        Options {
            listen: Some(format!("{}:0", self.host)),
            ..Options::default()
        }
    }

    /// Take the link down (from inside): nothing crosses it either way.
    pub fn cut(&self) {
        self.set_link("down");
    }

    /// Bring the link back up.
    pub fn mend(&self) {
        self.set_link("up");
    }

    fn set_link(&self, state: &str) {
        let ip = ["netns", "exec", &self.namespace, "ip", "link", "set"];
        run("ip", &[&ip[..], &[&self.inside, state]].concat());
    }

    /// Stop the cluster and remove the link, the namespace and the directory
    /// (what is there: also what an earlier run left).
    fn remove(&self) {
        let quiet = |command: &mut std::process::Command| {
            let _ = command.stdout(Stdio::null()).stderr(Stdio::null()).status();
        };
        if self.dir.join("data").exists() {
            quiet(
                &mut self.as_postgres("pg_ctl", &["-D", &self.data(), "-m", "immediate", "stop"]),
            );
        }
        quiet(std::process::Command::new("ip").args(["link", "del", &self.outside]));
        quiet(std::process::Command::new("ip").args(["netns", "del", &self.namespace]));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.remove();
    }
}

#[derive(Clone, Debug, Default)]
pub struct Options {
    pub manual_clock: bool,
    /// More `tally serve` arguments (`--pubsub-token`, `--max-in-flight`...).
    pub extra_args: Vec<String>,
    /// A command the server runs under (`ip netns exec <namespace>`), if any.
    pub launcher: Vec<String>,
    /// The address to listen on, if not `127.0.0.1:0`.
    pub listen: Option<String>,
}

/// A running `tally serve` with its own data directory.
pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub data_dir: PathBuf,
    /// The test's own PostgreSQL database, when the suite runs on PostgreSQL.
    pub database_url: Option<String>,
    /// Whether this app created its database (and drops it).
    owns_database: bool,
    /// Whether a (re)start waits until this server runs the writer.
    pub wait_for_writer_on_start: bool,
    pub options: Options,
    child: Option<Child>,
}

/// A response: status, headers and JSON body (Null when the body is not JSON).
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Reply {
    /// Send `request` and read its answer (JSON, or Null when it is not JSON).
    pub async fn of(request: reqwest::RequestBuilder, path: &str) -> Reply {
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("request {path}: {e}"));
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("body");
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            body,
        }
    }

    pub fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    /// The stable error code, when the body is an error.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    /// A string field of the body.
    pub fn str(&self, field: &str) -> &str {
        self.body[field]
            .as_str()
            .unwrap_or_else(|| panic!("no string {field} in {}", self.body))
    }
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        TestApp::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(options: Options) -> TestApp {
        let database_url = postgres_server().map(|server| fresh_database(&server));
        TestApp::spawn_on(options, database_url).await
    }

    /// A server on a fresh PostgreSQL database whichever store the suite
    /// runs on (tests of several servers over one database).
    pub async fn spawn_postgres(options: Options) -> TestApp {
        TestApp::spawn_on(options, Some(fresh_database(&postgres_url()))).await
    }

    async fn spawn_on(options: Options, database_url: Option<String>) -> TestApp {
        let owns = database_url.is_some();
        TestApp::spawn_with_database(options, database_url, owns, true).await
    }

    /// A server on the PostgreSQL database at `url`, which the test owns
    /// otherwise (it is not dropped); it waits to run the writer if `lead`.
    pub async fn spawn_on_database(options: Options, url: String, lead: bool) -> TestApp {
        TestApp::spawn_with_database(options, Some(url), false, lead).await
    }

    async fn spawn_with_database(
        options: Options,
        database_url: Option<String>,
        owns_database: bool,
        wait_for_writer_on_start: bool,
    ) -> TestApp {
        let data_dir = fresh_dir();
        let mut app = TestApp {
            owns_database,
            wait_for_writer_on_start,
            database_url,
            base: String::new(),
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()
                .expect("client"),
            data_dir,
            options,
            child: None,
        };
        app.start().await;
        app
    }

    /// Start (or restart) the server process on the same data directory.
    pub async fn start(&mut self) {
        let mut command = match self.options.launcher.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(env!("CARGO_BIN_EXE_tally"));
                command
            }
            None => Command::new(env!("CARGO_BIN_EXE_tally")),
        };
        command
            .arg("serve")
            .arg("--listen")
            .arg(self.options.listen.as_deref().unwrap_or("127.0.0.1:0"))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("TALLY_ADMIN_KEY", ADMIN_KEY)
            // The servers' log filter: warnings, or `TALLY_TEST_LOG` when set
            // (`info`, `debug`...) to see what a failing test's servers did.
            .env(
                "RUST_LOG",
                std::env::var("TALLY_TEST_LOG").unwrap_or("warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if self.options.manual_clock {
            command.arg("--manual-clock");
        }
        command.args(&self.options.extra_args);
        if let Some(url) = &self.database_url {
            command.arg("--database-url").arg(url);
        }
        let mut child = command.spawn().expect("spawn tally serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("tally serve did not start within 60 s")
            .expect("read stdout")
            .expect("tally serve exited before listening");
        let address = line
            .strip_prefix("tally listening on ")
            .unwrap_or_else(|| panic!("unexpected line {line:?}"));
        self.base = address.trim().to_string();
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
        if self.database_url.is_some() && self.wait_for_writer_on_start {
            self.wait_for_writer().await;
        }
    }

    /// Two servers over one fresh PostgreSQL database, both started with
    /// `extra_args`; the first runs the writer. With the database's URL.
    pub async fn pair_on_postgres(extra_args: Vec<String>) -> (TestApp, TestApp, String) {
        let first = TestApp::spawn_postgres(Options {
            extra_args,
            ..Options::default()
        })
        .await;
        let second = TestApp::spawn_beside(&first).await;
        assert!(!second.is_writer().await, "the second server follows");
        let database = first.database_url.clone().expect("a PostgreSQL app");
        // Only once the second server waits for the leader lock can it take
        // over when the first's session ends.
        wait_until!(
            Duration::from_secs(10),
            "the second server waits for the lock",
            count_sessions(&database, &leader_lock_sessions(false)) == 1
        );
        (first, second, database)
    }

    /// Another server over `first`'s PostgreSQL database (which `first` owns
    /// and drops); it does not wait to run the writer.
    pub async fn spawn_beside(first: &TestApp) -> TestApp {
        let mut app = TestApp {
            base: String::new(),
            client: first.client.clone(),
            data_dir: fresh_dir(),
            database_url: Some(first.database_url.clone().expect("a PostgreSQL app")),
            owns_database: false,
            wait_for_writer_on_start: false,
            options: first.options.clone(),
            child: None,
        };
        app.start().await;
        app
    }

    /// Whether this server runs the writer now.
    pub async fn is_writer(&self) -> bool {
        let health = self
            .send(reqwest::Method::GET, "/healthz", None, None)
            .await;
        health.body["writer"] == true
    }

    /// Wait until this server runs the writer (PostgreSQL: it holds the
    /// leader lock, which a killed predecessor's session may still hold for
    /// a moment).
    pub async fn wait_for_writer(&self) {
        for _ in 0..600 {
            let health = self
                .send(reqwest::Method::GET, "/healthz", None, None)
                .await;
            if health.body["writer"] == true {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the server did not start its writer within 30 s");
    }

    /// Wait until this server no longer runs the writer (another server took
    /// over, and this one follows it), for at most 10 s.
    pub async fn wait_until_follower(&self) {
        wait_until!(
            Duration::from_secs(10),
            "the server stops running the writer",
            !self.is_writer().await
        );
    }

    /// The arguments that point a `tally` command at this test's store.
    pub fn storage_args(&self) -> Vec<std::ffi::OsString> {
        match &self.database_url {
            Some(url) => vec!["--database-url".into(), url.into()],
            None => vec!["--data-dir".into(), self.data_dir.clone().into()],
        }
    }

    /// Send SIGKILL to the server without waiting (a server shared behind an `Arc`).
    pub fn sigkill(&self) {
        self.signal("KILL");
    }

    /// Freeze the server (SIGSTOP: its connections stay open, it does
    /// nothing), or let it go on (`false`, SIGCONT).
    pub fn freeze(&self, frozen: bool) {
        self.signal(if frozen { "STOP" } else { "CONT" });
    }

    fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .expect("a running server");
        let sent = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{signal} {pid}");
    }

    /// How the server process exited, if it has (without waiting).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut().expect("a started server");
        child.try_wait().expect("poll the server")
    }

    /// Kill the server with SIGKILL (no graceful shutdown) and wait for it to die.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("kill");
            let _ = child.wait().await;
        }
    }

    /// Stop the server with SIGTERM (a graceful shutdown) and wait for it to
    /// exit; how it exited. Fails if it has not exited within 60 s: a
    /// shutdown that never ends.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("a running server");
        let pid = child.id().expect("the server's pid");
        let sent = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid}");
        tokio::time::timeout(Duration::from_secs(60), child.wait())
            .await
            .expect("the server did not exit within 60 s of SIGTERM")
            .expect("wait for the server")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The text of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<&Value>,
    ) -> Reply {
        let mut request = self.client.request(method, self.url(path));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        Reply::of(request, path).await
    }

    /// POST as the admin.
    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.send(reqwest::Method::POST, path, Some(ADMIN_KEY), Some(&body))
            .await
    }

    /// GET as the admin.
    pub async fn get(&self, path: &str) -> Reply {
        self.send(reqwest::Method::GET, path, Some(ADMIN_KEY), None)
            .await
    }

    /// PUT as admin.
    pub async fn put(&self, path: &str, body: Value) -> Reply {
        self.send(reqwest::Method::PUT, path, Some(ADMIN_KEY), Some(&body))
            .await
    }

    /// Move the manual clock `seconds` ahead (running what is due), asserting
    /// success; the engine's time after it.
    pub async fn advance(&self, seconds: i64) -> String {
        let reply = self
            .post(
                "/v1/clock/advance",
                serde_json::json!({ "seconds": seconds }),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "advance: {}", reply.body);
        reply.str("now").to_string()
    }

    /// The engine's clock as it reads now, as a function of hours from it to
    /// an RFC 3339 instant (a manual-clock app: `at(0)` stays that instant).
    pub async fn hours_from_now(&self) -> impl Fn(i64) -> String {
        let rfc3339 = &time::format_description::well_known::Rfc3339;
        let start = time::OffsetDateTime::parse(self.get("/v1/clock").await.str("now"), rfc3339)
            .expect("the clock's time");
        move |hours| {
            (start + time::Duration::hours(hours))
                .format(rfc3339)
                .expect("an instant within years 0000-9999")
        }
    }

    /// Charge `amount` credits to `customer` under `id`.
    pub async fn charge(&self, customer: &str, id: &str, amount: &str) -> Reply {
        let body = serde_json::json!({ "id": id, "customer_id": customer, "amount": amount });
        self.post("/v1/charges", body).await
    }

    /// Send each body to `path` with `method` as admin, asserting each is
    /// answered `status`.
    pub async fn assert_each_answered(
        &self,
        method: reqwest::Method,
        path: &str,
        status: StatusCode,
        bodies: &[Value],
    ) {
        for body in bodies {
            let reply = self
                .send(method.clone(), path, Some(ADMIN_KEY), Some(body))
                .await;
            assert_eq!(reply.status, status, "{body}: {}", reply.body);
        }
    }

    /// Create a customer, asserting success.
    pub async fn customer(&self, id: &str) {
        let reply = self
            .post("/v1/customers", serde_json::json!({ "id": id }))
            .await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "create customer: {}",
            reply.body
        );
    }

    /// Grant `amount` credits, asserting success.
    pub async fn grant(&self, customer: &str, id: &str, amount: &str) {
        let body =
            serde_json::json!({ "id": id, "amount": amount, "source": "purchase", "paid": true });
        let reply = self
            .post(&format!("/v1/customers/{customer}/grants"), body)
            .await;
        assert_eq!(reply.status, StatusCode::OK, "grant: {}", reply.body);
    }

    /// Define features (name = key, unit "unit"), asserting success.
    pub async fn features(&self, keys: &[&str]) {
        for key in keys {
            let body = serde_json::json!({ "name": key, "unit": "unit" });
            let reply = self
                .send(
                    reqwest::Method::PUT,
                    &format!("/v1/features/{key}"),
                    Some(ADMIN_KEY),
                    Some(&body),
                )
                .await;
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "feature {key}: {}",
                reply.body
            );
        }
    }

    /// Create version `id` with `rules` (a JSON array) and publish it, now or
    /// at `effective_at`, asserting each step.
    pub async fn publish_version(&self, id: &str, rules: Value, effective_at: Option<&str>) {
        let reply = self
            .post("/v1/pricebooks", serde_json::json!({ "id": id }))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "draft {id}: {}", reply.body);
        let reply = self
            .send(
                reqwest::Method::PUT,
                &format!("/v1/pricebooks/{id}/rules"),
                Some(ADMIN_KEY),
                Some(&serde_json::json!({ "rules": rules })),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "rules of {id}: {}",
            reply.body
        );
        let body = match effective_at {
            Some(at) => serde_json::json!({ "effective_at": at }),
            None => serde_json::json!({}),
        };
        let reply = self
            .post(&format!("/v1/pricebooks/{id}/publish"), body)
            .await;
        assert_eq!(reply.status, StatusCode::OK, "publish {id}: {}", reply.body);
    }

    /// The customer's balance body, asserting success.
    pub async fn balance(&self, customer: &str) -> Value {
        let reply = self.get(&format!("/v1/customers/{customer}/balance")).await;
        assert_eq!(reply.status, StatusCode::OK, "balance: {}", reply.body);
        reply.body
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
        match &self.database_url {
            Some(url) if self.owns_database => drop_database(url),
            _ => {}
        }
    }
}

/// An exact decimal string (`"1.5"`, `"-3"`, `"0.000001"`) as integer
/// micro-credits; panics on anything else (more than 6 fractional digits,
/// exponents, stray characters), so a malformed amount fails the test.
pub fn micros(text: &str) -> i64 {
    let bad = || panic!("not an exact decimal amount: {text:?}");
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !all_digits(whole) || !all_digits(fraction) || fraction.len() > 6 {
        bad();
    }
    if digits.contains('.') && fraction.is_empty() {
        bad();
    }
    let whole: i64 = whole.parse().unwrap_or_else(|_| bad());
    let fraction: i64 = format!("{fraction:0<6}").parse().unwrap_or_else(|_| bad());
    let magnitude = whole
        .checked_mul(1_000_000)
        .and_then(|w| w.checked_add(fraction))
        .unwrap_or_else(bad);
    if negative {
        -magnitude
    } else {
        magnitude
    }
}

/// A JSON string field holding an amount, as micro-credits.
pub fn micros_of(value: &Value) -> i64 {
    micros(
        value
            .as_str()
            .unwrap_or_else(|| panic!("amount is not a string: {value}")),
    )
}

/// Micro-credits as the shortest exact decimal string (`1500000` → `"1.5"`).
pub fn decimal(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let magnitude = micros.unsigned_abs();
    let (whole, fraction) = (magnitude / 1_000_000, magnitude % 1_000_000);
    if fraction == 0 {
        format!("{sign}{whole}")
    } else {
        let digits = format!("{fraction:06}");
        format!("{sign}{whole}.{}", digits.trim_end_matches('0'))
    }
}

/// Check one ledger entry's postings: every amount positive, a charge moves
/// credits from `grant:` accounts (or, past the credits under an overage
/// policy, from `debt`) to `consumed` (`consumed:<feature>` when it names a
/// feature) and its postings sum to its amount.
pub fn assert_entry_postings(entry: &Value) {
    let postings = entry["postings"]
        .as_array()
        .unwrap_or_else(|| panic!("entry without postings: {entry}"));
    for posting in postings {
        assert!(
            micros_of(&posting["amount"]) > 0,
            "posting amount not positive in {entry}"
        );
        assert_ne!(
            posting["from"], posting["to"],
            "posting to itself in {entry}"
        );
    }
    if entry["kind"] == "charge" {
        // Usage priced at 0 is recorded without moving credits.
        assert!(
            !postings.is_empty() || entry["amount"] == "0",
            "charge without postings: {entry}"
        );
        let mut total = 0;
        for posting in postings {
            let from = posting["from"].as_str().unwrap_or("");
            assert!(
                from.starts_with("grant:") || from == "debt",
                "charge not from a grant or debt: {entry}"
            );
            // A charge naming a feature is consumed on that feature's account.
            let consumed = match entry["feature"].as_str() {
                Some(feature) => format!("consumed:{feature}"),
                None => "consumed".to_string(),
            };
            assert_eq!(
                posting["to"],
                consumed.as_str(),
                "charge not to its consumed account: {entry}"
            );
            total += micros_of(&posting["amount"]);
        }
        assert_eq!(
            total,
            micros_of(&entry["amount"]),
            "charge postings do not sum to its amount: {entry}"
        );
    }
}

impl TestApp {
    /// Every ledger entry of a customer, newest first, walking every page.
    pub async fn ledger_all(&self, customer: &str) -> Vec<Value> {
        let mut entries = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/v1/customers/{customer}/ledger?limit=1000");
            if let Some(cursor) = &cursor {
                path.push_str(&format!("&cursor={cursor}"));
            }
            let reply = self.get(&path).await;
            assert_eq!(reply.status, StatusCode::OK, "ledger: {}", reply.body);
            let page = reply.body["data"]
                .as_array()
                .unwrap_or_else(|| panic!("ledger page without data: {}", reply.body));
            entries.extend(page.iter().cloned());
            match reply.body["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_string()),
                None => return entries,
            }
        }
    }
}

/// Replay a customer's whole ledger (as [`TestApp::ledger_all`] returns it,
/// newest first) from zero: entry ids strictly ordered, every entry's postings
/// sound, and each entry's `balance_after` equal to the running sum of what
/// flowed into and out of the customer's grant accounts less its debt; the
/// grants never below zero, nor the debt.
/// Returns the final replayed balance (available less debt) in micro-credits.
pub fn assert_replayable(entries: &[Value]) -> i64 {
    let mut running: i64 = 0;
    let mut debt: i64 = 0;
    let mut last_sequence = 0;
    for entry in entries.iter().rev() {
        let sequence: i64 = entry["id"]
            .as_str()
            .and_then(|id| id.strip_prefix("ent_"))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad entry id in {entry}"));
        assert!(
            sequence > last_sequence,
            "ledger order broken: ent_{sequence} after ent_{last_sequence}"
        );
        last_sequence = sequence;
        assert_entry_postings(entry);
        for posting in entry["postings"].as_array().expect("postings") {
            let amount = micros_of(&posting["amount"]);
            if posting["to"].as_str().unwrap_or("").starts_with("grant:") {
                running += amount;
            }
            if posting["from"].as_str().unwrap_or("").starts_with("grant:") {
                running -= amount;
            }
            if posting["from"] == "debt" {
                debt += amount;
            }
            if posting["to"] == "debt" {
                debt -= amount;
            }
        }
        assert!(running >= 0, "available went negative at {entry}");
        assert!(debt >= 0, "debt went negative at {entry}");
        assert_eq!(
            micros_of(&entry["balance_after"]),
            running - debt,
            "balance_after does not replay at {entry}"
        );
    }
    running - debt
}
