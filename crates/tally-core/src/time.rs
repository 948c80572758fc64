//! Instants on the engine's clock, and the clock itself.
//!
//! The core never reads the operating system's clock: every operation takes
//! `now` as an argument, so a test can replay any sequence from a seed.

use serde::{Deserialize, Serialize};

/// Microseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub const MICROS_PER_SECOND: i64 = 1_000_000;

    pub fn micros(self) -> i64 {
        self.0
    }

    /// RFC 3339 text in UTC (`2026-11-25T08:00:00Z`), with six digits of
    /// microseconds when they are not zero (`2026-11-25T08:00:00.500000Z`):
    /// one width for every fraction. An instant outside years 0000-9999
    /// (one computed past them, say a period end) shows its raw
    /// microseconds (`@<micros>us`) rather than a wrong date.
    pub fn rfc3339(self) -> String {
        let fraction = self.0.rem_euclid(Self::MICROS_PER_SECOND);
        let seconds = self.0.div_euclid(Self::MICROS_PER_SECOND);
        let whole = time::OffsetDateTime::from_unix_timestamp(seconds)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            });
        let Some(mut text) = whole else {
            return format!("@{}us", self.0);
        };
        let offset = text
            .strip_suffix("+00:00")
            .or_else(|| text.strip_suffix('Z'));
        if let Some(stripped) = offset {
            text.truncate(stripped.len());
        }
        if fraction != 0 {
            text.push_str(&format!(".{fraction:06}"));
        }
        text.push('Z');
        text
    }

    /// `micros` microseconds later, `None` past the end of time.
    pub fn plus_micros(self, micros: i64) -> Option<Timestamp> {
        self.0.checked_add(micros).map(Timestamp)
    }

    pub fn plus_seconds(self, seconds: i64) -> Option<Timestamp> {
        seconds
            .checked_mul(Self::MICROS_PER_SECOND)
            .and_then(|delta| self.0.checked_add(delta))
            .map(Timestamp)
    }
}

/// A source of the current instant.
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;

    /// Move forward to at least `instant`, if this clock only moves when
    /// told to (a manual clock resuming where another server's left off);
    /// a real clock ignores it.
    fn catch_up(&self, _instant: Timestamp) {}

    /// Start at `instant`, earlier or later than now, if this clock only
    /// moves when told to: a server joining a database whose servers share a
    /// manual clock takes theirs, not the instant it happened to start at
    /// (ahead of theirs, it would see their lots expired and their pending
    /// grants in effect). Called once, before the clock is used; a real
    /// clock ignores it.
    fn resume(&self, _instant: Timestamp) {}

    /// Whether this clock moves only when told to (`--manual-clock`).
    fn is_manual(&self) -> bool {
        false
    }
}
