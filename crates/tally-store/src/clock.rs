//! The two clocks: the system clock for production, a manual clock for tests.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tally_core::{Clock, Timestamp};

/// Reads the operating system's clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970");
        Timestamp(i64::try_from(since_epoch.as_micros()).expect("clock before year 294247"))
    }
}

/// A clock that only moves when told to (`--manual-clock`, tests).
pub struct ManualClock {
    micros: AtomicI64,
    /// Where the instant is kept across restarts, if anywhere (the lock
    /// keeps concurrent advances from writing it out of order).
    file: Option<std::sync::Mutex<std::path::PathBuf>>,
}

impl ManualClock {
    pub fn new(start: Timestamp) -> ManualClock {
        ManualClock {
            micros: AtomicI64::new(start.micros()),
            file: None,
        }
    }

    /// A manual clock kept in `file`: it starts at the instant it last
    /// reached, so a restarted test server neither goes back in time
    /// (renewals and expiries already applied stay in the past) nor jumps
    /// to the real time (it moves only when told to); at `start` when the
    /// file does not exist yet, which it then records.
    pub fn persistent(file: std::path::PathBuf, start: Timestamp) -> std::io::Result<ManualClock> {
        let stored = match std::fs::read_to_string(&file) {
            Ok(text) => text.trim().parse::<i64>().map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{file:?} does not hold an instant"),
                )
            })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let clock = ManualClock {
                    micros: AtomicI64::new(start.micros()),
                    file: Some(std::sync::Mutex::new(file)),
                };
                // Written now, or refused: without it the next start would
                // take the real time again.
                clock.write()?;
                return Ok(clock);
            }
            Err(error) => return Err(error),
        };
        Ok(ManualClock {
            micros: AtomicI64::new(stored),
            file: Some(std::sync::Mutex::new(file)),
        })
    }

    /// Move forward; the clock never goes back. Returns the new instant.
    pub fn advance_to(&self, to: Timestamp) -> Timestamp {
        let previous = self.micros.fetch_max(to.micros(), Ordering::SeqCst);
        let now = Timestamp(previous.max(to.micros()));
        self.keep();
        now
    }

    /// Write the instant to the clock's file, if it has one; a failure is
    /// logged (the clock goes on).
    fn keep(&self) {
        if let Err(error) = self.write() {
            tracing::warn!(%error, "could not keep the manual clock's instant");
        }
    }

    /// Write the instant to the clock's file, if it has one.
    fn write(&self) -> std::io::Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let file = file.lock().expect("manual clock file");
        let latest = self.micros.load(Ordering::SeqCst);
        let temporary = file.with_extension("tmp");
        std::fs::write(&temporary, latest.to_string())
            .and_then(|()| std::fs::rename(&temporary, &*file))
            .map_err(|error| std::io::Error::new(error.kind(), format!("{file:?}: {error}")))
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.micros.load(Ordering::SeqCst))
    }

    fn catch_up(&self, instant: Timestamp) {
        if instant.micros() > self.micros.load(Ordering::SeqCst) {
            self.advance_to(instant);
        }
    }

    fn resume(&self, instant: Timestamp) {
        self.micros.store(instant.micros(), Ordering::SeqCst);
        self.keep();
    }

    fn is_manual(&self) -> bool {
        true
    }
}
