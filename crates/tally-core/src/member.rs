//! Members of a customer (its users) and their budgets inside the shared
//! balance: a member's spend in the current window (a UTC calendar day,
//! month or year) may not pass its budget. The check runs in the same step
//! as the pool and grant-scope checks of a charge or hold, so two teammates
//! can never both pass a budget or the pool at once.

use serde::{Deserialize, Serialize};

use crate::{Amount, Id, Timestamp};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetPeriod {
    Day,
    Month,
    Year,
}

impl BudgetPeriod {
    pub fn parse(text: &str) -> Option<BudgetPeriod> {
        Some(match text {
            "day" => BudgetPeriod::Day,
            "month" => BudgetPeriod::Month,
            "year" => BudgetPeriod::Year,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Day => "day",
            BudgetPeriod::Month => "month",
            BudgetPeriod::Year => "year",
        }
    }

    /// The start of the UTC window holding `now`.
    pub fn window_start(self, now: Timestamp) -> Timestamp {
        // Past what calendars here represent, one window that never ends
        // (so a budget keeps being enforced rather than resetting).
        let never = Timestamp(i64::MIN);
        let Ok(at) =
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(now.micros()) * 1000)
        else {
            return never;
        };
        let date = match self {
            BudgetPeriod::Day => Some(at.date()),
            BudgetPeriod::Month => at.date().replace_day(1).ok(),
            BudgetPeriod::Year => {
                time::Date::from_calendar_date(at.year(), time::Month::January, 1).ok()
            }
        };
        date.map_or(never, |d| {
            Timestamp(d.midnight().assume_utc().unix_timestamp() * Timestamp::MICROS_PER_SECOND)
        })
    }
}

/// At most `amount` credits per window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    pub amount: Amount,
    pub period: BudgetPeriod,
}

/// A member and what it spent in its budget's current window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: Id,
    pub name: Option<String>,
    pub budget: Option<Budget>,
    /// The window `spent` counts in.
    pub window_start: Timestamp,
    /// Charged, captured and held by this member in the window.
    pub spent: Amount,
    /// The holds counted in `spent` (what each reserved): only these give
    /// back to the budget when released or timed out.
    #[serde(default)]
    pub holds: std::collections::BTreeMap<Id, Amount>,
    /// Budget moved to (positive) or from (negative) this member for the
    /// current window by transfers.
    #[serde(default)]
    pub extra: Amount,
    /// When its budget started counting spends (a refund gives back only
    /// spends counted since).
    #[serde(default = "the_beginning")]
    pub counting_since: Timestamp,
}

fn the_beginning() -> Timestamp {
    Timestamp(i64::MIN)
}

impl Member {
    /// What the member has spent in the window holding `now`.
    pub fn spent_at(&self, now: Timestamp) -> Amount {
        match self.budget {
            Some(budget) if budget.period.window_start(now) > self.window_start => Amount::ZERO,
            _ => self.spent,
        }
    }

    /// Budget moved in or out by transfers, in the window holding `now`.
    pub fn extra_at(&self, now: Timestamp) -> Amount {
        match self.budget {
            Some(budget) if budget.period.window_start(now) > self.window_start => Amount::ZERO,
            _ => self.extra,
        }
    }

    /// What the budget still allows at `now` (`None`: no budget).
    pub fn room_at(&self, now: Timestamp) -> Option<Amount> {
        self.budget.map(|b| {
            b.amount
                .checked_add(self.extra_at(now))
                .and_then(|limit| limit.checked_sub(self.spent_at(now)))
                .filter(|room| !room.is_negative())
                .unwrap_or(Amount::ZERO)
        })
    }

    /// Move the window to the one holding `now` (what was spent before is forgotten).
    pub(crate) fn roll(&mut self, now: Timestamp) {
        if let Some(budget) = self.budget {
            let start = budget.period.window_start(now);
            if start > self.window_start {
                self.window_start = start;
                self.spent = Amount::ZERO;
                self.extra = Amount::ZERO;
                self.holds.clear();
            }
        }
    }
}
