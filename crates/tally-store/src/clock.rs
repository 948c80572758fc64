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
}

impl ManualClock {
    pub fn new(start: Timestamp) -> ManualClock {
        ManualClock {
            micros: AtomicI64::new(start.micros()),
        }
    }

    /// Move forward; the clock never goes back. Returns the new instant.
    pub fn advance_to(&self, to: Timestamp) -> Timestamp {
        let previous = self.micros.fetch_max(to.micros(), Ordering::SeqCst);
        Timestamp(previous.max(to.micros()))
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.micros.load(Ordering::SeqCst))
    }
}
