//! Where a benchmark run's CPU went, read from Linux's `/proc`: the CPU
//! time of PostgreSQL (every process named `postgres` on this machine), of
//! the `tally serve` child process, and of the bench process itself (the
//! baseline's client threads, or the HTTP load generator), each per charge,
//! and how much of the machine sat idle. Everything shares the same cores,
//! so a run's rate is only half the story: a run short of CPU and a run
//! that waits with the cores idle call for different changes, and a
//! machine-wide `vmstat` cannot say which run of the bench it is looking at.

use std::collections::HashMap;

/// Clock ticks per second in `/proc`'s CPU times (`USER_HZ`: 100 on every
/// Linux architecture's user ABI that this project builds for).
const TICKS_PER_SECOND: u64 = 100;

/// CPU time so far, in clock ticks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// The machine: every CPU's time, and the part of it idle (or waiting
    /// for IO with nothing else to run).
    machine_total: u64,
    machine_idle: u64,
    /// Each PostgreSQL process's, by pid and start time (a pid can be used
    /// again): processes come and go (a connection's backend ends some time
    /// after its client left), so a run counts what each process spent
    /// between the two samples.
    postgres: HashMap<(u32, u64), u64>,
    /// The `tally serve` process, if the run has one.
    server: Option<u64>,
    bench: u64,
}

/// One run's CPU per charge, and the machine's idle share.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spent {
    /// `None` when no PostgreSQL process ran on this machine (a server
    /// elsewhere, or in another pid namespace).
    pub postgres_us: Option<f64>,
    /// `None` for a run without a `tally serve` process (the baseline).
    pub server_us: Option<f64>,
    pub bench_us: f64,
    /// Idle share of every CPU over the run, in percent.
    pub idle_percent: f64,
}

impl Sample {
    /// Now, with `server` the `tally serve` process (none for a run without
    /// one). `None` where `/proc` cannot be read (not Linux).
    pub fn now(server: Option<u32>) -> Option<Sample> {
        let (machine_total, machine_idle) = machine(&std::fs::read_to_string("/proc/stat").ok()?)?;
        let mut postgres = HashMap::new();
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            // A process may end between the listing and the read.
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            if let Some(process) = Process::read(&stat) {
                if process.name == "postgres" {
                    postgres.insert((pid, process.started), process.ticks);
                }
            }
        }
        let ticks_of = |path: &str| -> Option<u64> {
            Some(Process::read(&std::fs::read_to_string(path).ok()?)?.ticks)
        };
        let server = match server {
            Some(pid) => Some(ticks_of(&format!("/proc/{pid}/stat"))?),
            None => None,
        };
        Some(Sample {
            machine_total,
            machine_idle,
            postgres,
            server,
            bench: ticks_of("/proc/self/stat")?,
        })
    }

    /// What was spent from `self` until `later`, per charge of `charges`.
    /// PostgreSQL's part is what each of its processes alive at `later`
    /// spent since `self` (all of it for one started since): a process that
    /// ended in between is not counted, so take `later` while the run's
    /// database connections are still open. Work a run leaves behind (a
    /// checkpoint, a vacuum) counts in the run during which it happens.
    pub fn until(&self, later: &Sample, charges: u64) -> Spent {
        let per_charge = |ticks: u64| -> f64 {
            ticks as f64 * 1e6 / TICKS_PER_SECOND as f64 / charges.max(1) as f64
        };
        let postgres: u64 = later
            .postgres
            .iter()
            .map(|(process, after)| after.saturating_sub(*self.postgres.get(process).unwrap_or(&0)))
            .sum();
        let total = later.machine_total.saturating_sub(self.machine_total);
        let idle = later.machine_idle.saturating_sub(self.machine_idle);
        Spent {
            postgres_us: (!later.postgres.is_empty()).then(|| per_charge(postgres)),
            server_us: self
                .server
                .zip(later.server)
                .map(|(before, after)| per_charge(after.saturating_sub(before))),
            bench_us: per_charge(later.bench.saturating_sub(self.bench)),
            idle_percent: idle as f64 * 100.0 / total.max(1) as f64,
        }
    }
}

/// This process's user and system CPU time so far, in seconds (Linux).
pub fn own_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    Some(Process::read(&stat)?.ticks as f64 / TICKS_PER_SECOND as f64)
}

/// Every CPU's time and its idle part (`idle` and `iowait`), in ticks, from
/// `/proc/stat`'s first line.
fn machine(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?;
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is
    // already counted in user).
    let values: Vec<u64> = fields
        .take(8)
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    if values.len() < 8 {
        return None;
    }
    Some((values.iter().sum(), values[3] + values[4]))
}

/// What the bench reads of a process's `/proc/<pid>/stat`.
#[derive(Debug, PartialEq, Eq)]
struct Process<'s> {
    name: &'s str,
    /// User and system CPU time, every thread, in ticks.
    ticks: u64,
    /// When it started, in ticks since boot: with the pid, it names one
    /// process.
    started: u64,
}

impl Process<'_> {
    /// The name is in parentheses and may itself hold spaces or
    /// parentheses, so the fields are counted from the last `)`.
    fn read(stat: &str) -> Option<Process<'_>> {
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let name = stat.get(open + 1..close)?;
        // After the name, from the state (field 3): utime (14), stime (15),
        // starttime (22).
        let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
        let field = |number: usize| -> Option<u64> { fields.get(number - 3)?.parse().ok() };
        Some(Process {
            name,
            ticks: field(14)? + field(15)?,
            started: field(22)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_line_sums_every_cpu_time_and_counts_iowait_as_idle() {
        let stat = "cpu  100 5 50 800 40 3 2 1 7 0\ncpu0 50 2 25 400 20 1 1 0 3 0\nintr 1\n";
        // user+nice+system+idle+iowait+irq+softirq+steal; guest is in user.
        assert_eq!(machine(stat), Some((1001, 840)));
        assert_eq!(machine("cpu0 1 2 3 4 5 6 7 8\n"), None);
        assert_eq!(machine("cpu 1 2 3\n"), None);
    }

    #[test]
    fn a_process_line_is_read_past_a_name_with_spaces_and_parentheses() {
        // Fields 3 to 22: state, ppid, ..., utime 1234, stime 567, ...,
        // starttime 98765.
        let fields = "S 1 2 3 4 5 6 7 8 9 10 1234 567 11 12 20 0 1 0 98765 4096";
        let plain = format!("4242 (postgres) {fields}");
        let read = Process::read(&plain).expect("a whole line");
        assert_eq!(
            read,
            Process {
                name: "postgres",
                ticks: 1801,
                started: 98765
            }
        );
        let odd = format!("77 (tokio (rt) 2) {fields}");
        assert_eq!(Process::read(&odd).map(|p| p.name), Some("tokio (rt) 2"));
        assert_eq!(Process::read(&odd).map(|p| p.ticks), Some(1801));
        assert_eq!(Process::read("77 (cut) S 1 2"), None);
    }

    #[test]
    fn spent_is_per_charge_by_process_and_idle_is_a_share_of_the_whole_machine() {
        let before = Sample {
            machine_total: 1_000,
            machine_idle: 300,
            // (7, 1) ends before the run does: its time is not counted (nor
            // subtracted, as a sum over every process would). So does
            // (8, 1), and pid 8 is used again by a process started at 50.
            postgres: HashMap::from([((5, 1), 10), ((7, 1), 900), ((8, 1), 400)]),
            server: None,
            bench: 30,
        };
        let after = Sample {
            machine_total: 1_400,
            machine_idle: 400,
            // (5, 1) spent 60 ticks, (9, 2) started during the run and
            // spent 40, and (8, 50) is new too: 10.
            postgres: HashMap::from([((5, 1), 70), ((9, 2), 40), ((8, 50), 10)]),
            server: None,
            bench: 80,
        };
        // 110 ticks = 1.1 s of PostgreSQL over 20,000 charges: 55 µs each.
        let spent = before.until(&after, 20_000);
        assert_eq!(spent.postgres_us, Some(55.0));
        assert_eq!(spent.server_us, None);
        assert_eq!(spent.bench_us, 25.0);
        assert_eq!(spent.idle_percent, 25.0);

        let with_server = |ticks| Sample {
            server: Some(ticks),
            postgres: HashMap::new(),
            ..before.clone()
        };
        let spent = with_server(20).until(&with_server(170), 20_000);
        assert_eq!(spent.server_us, Some(75.0));
        // No PostgreSQL process on this machine: not measured, not 0.
        assert_eq!(spent.postgres_us, None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_is_sampled_and_its_time_moves_forward() {
        let pid = std::process::id();
        let before = Sample::now(Some(pid)).expect("/proc is readable on Linux");
        // Spin until the kernel has accounted at least one more tick of
        // this process's CPU time (10 ms), however slowly the machine
        // gives it CPU; the cap only stops a broken reading from hanging.
        let cap = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let after = loop {
            let mut spin = 0u64;
            for _ in 0..1_000_000 {
                spin = std::hint::black_box(spin.wrapping_add(1));
            }
            let now = Sample::now(Some(pid)).expect("/proc is readable");
            if now.bench > before.bench || std::time::Instant::now() > cap {
                break now;
            }
        };
        assert!(after.bench > before.bench, "{before:?} then {after:?}");
        // The same process read by pid: the same ticks as /proc/self.
        assert!(after.server.is_some_and(|ticks| ticks >= before.bench));
        assert!(after.machine_total > before.machine_total);
        let own = own_seconds().expect("/proc/self/stat");
        assert!(own >= after.bench as f64 / TICKS_PER_SECOND as f64);
    }
}
