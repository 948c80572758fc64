//! Where a benchmark run's CPU went, read from Linux's `/proc`: the CPU
//! time of PostgreSQL (every process named `postgres`), of the `tally
//! serve` child process, and of the bench process itself (the baseline's
//! client threads, or the HTTP load generator), each per charge, and how
//! much of the machine sat idle. Everything shares the same cores, so a
//! run's rate is only half the story: a run short of CPU and a run that
//! waits with the cores idle call for different changes, and a machine-wide
//! `vmstat` cannot say which run of the bench it is looking at.

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
    /// Each PostgreSQL process's, by pid: processes come and go (a
    /// connection's backend ends some time after its client left), so a
    /// run counts what each process spent between the two samples.
    postgres: HashMap<u32, u64>,
    server: u64,
    bench: u64,
}

/// One run's CPU per charge, and the machine's idle share.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spent {
    pub postgres_us: f64,
    pub server_us: f64,
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
            if let Some(("postgres", ticks)) = process(&stat) {
                postgres.insert(pid, ticks);
            }
        }
        let ticks_of =
            |path: &str| -> Option<u64> { Some(process(&std::fs::read_to_string(path).ok()?)?.1) };
        let server = match server {
            Some(pid) => ticks_of(&format!("/proc/{pid}/stat"))?,
            None => 0,
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
    /// connections are still open.
    pub fn until(&self, later: &Sample, charges: u64) -> Spent {
        let per_charge = |before: u64, after: u64| -> f64 {
            let ticks = after.saturating_sub(before);
            ticks as f64 * 1e6 / TICKS_PER_SECOND as f64 / charges.max(1) as f64
        };
        let postgres: u64 = later
            .postgres
            .iter()
            .map(|(pid, after)| after.saturating_sub(*self.postgres.get(pid).unwrap_or(&0)))
            .sum();
        let total = later.machine_total.saturating_sub(self.machine_total);
        let idle = later.machine_idle.saturating_sub(self.machine_idle);
        Spent {
            postgres_us: per_charge(0, postgres),
            server_us: per_charge(self.server, later.server),
            bench_us: per_charge(self.bench, later.bench),
            idle_percent: idle as f64 * 100.0 / total.max(1) as f64,
        }
    }
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

/// A process's name and its CPU time (user and system, every thread), in
/// ticks, from its `/proc/<pid>/stat`. The name is in parentheses and may
/// itself hold spaces or parentheses, so the fields are counted from the
/// last `)`.
fn process(stat: &str) -> Option<(&str, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?;
    // After the name: state (field 3), ..., utime (14), stime (15).
    let mut fields = stat.get(close + 1..)?.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((name, user + system))
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
        let fields = "S 1 2 3 4 5 6 7 8 9 10 1234 567 11 12 20 0 1 0";
        let plain = format!("4242 (postgres) {fields}");
        assert_eq!(process(&plain), Some(("postgres", 1801)));
        let odd = format!("77 (tokio (rt) 2) {fields}");
        assert_eq!(process(&odd), Some(("tokio (rt) 2", 1801)));
        assert_eq!(process("77 (cut) S 1 2"), None);
    }

    #[test]
    fn spent_is_per_charge_and_idle_is_a_share_of_the_whole_machine() {
        let before = Sample {
            machine_total: 1_000,
            machine_idle: 300,
            // 7 ends before the run does: its time is not counted (nor
            // subtracted, as a sum over every process would).
            postgres: HashMap::from([(5, 10), (7, 900)]),
            server: 20,
            bench: 30,
        };
        let after = Sample {
            machine_total: 1_400,
            machine_idle: 400,
            // 5 spent 60 ticks, 9 started during the run and spent 40.
            postgres: HashMap::from([(5, 70), (9, 40)]),
            server: 170,
            bench: 80,
        };
        // 100 ticks = 1 s of PostgreSQL over 20,000 charges: 50 µs each.
        let spent = before.until(&after, 20_000);
        assert_eq!(spent.postgres_us, 50.0);
        assert_eq!(spent.server_us, 75.0);
        assert_eq!(spent.bench_us, 25.0);
        assert_eq!(spent.idle_percent, 25.0);
    }

    #[test]
    fn this_process_is_sampled_and_its_time_moves_forward() {
        let before = Sample::now(None).expect("/proc is readable on Linux");
        let mut spin = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(100) {
            spin = spin.wrapping_add(std::hint::black_box(1));
        }
        let after = Sample::now(Some(std::process::id())).expect("/proc is readable");
        assert!(spin > 0);
        assert!(after.bench > before.bench, "{before:?} then {after:?}");
        assert!(after.machine_total > before.machine_total);
    }
}
