//! Members of a customer (its users) and their budgets inside the shared
//! balance: a member's spend in the current window (a UTC calendar day,
//! month or year) may not pass its budget. The check runs in the same step
//! as the pool and grant-scope checks of a charge or hold, so two teammates
//! can never both pass a budget or the pool at once.

use std::collections::BTreeMap;

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
    /// What the budget counted (less what it gave back), by UTC day for
    /// the current month (keyed by the day's start), and by month for the
    /// current year's earlier months (keyed by the month's start): a change
    /// of period recounts the new period's window from them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counted_days: BTreeMap<Timestamp, Amount>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counted_months: BTreeMap<Timestamp, Amount>,
    /// The day each hold in `holds` was counted on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hold_days: BTreeMap<Id, Timestamp>,
    /// Since when the day and month counts are complete (`None`: a member
    /// stored before they were kept).
    #[serde(default)]
    pub counted_from: Option<Timestamp>,
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

    /// What the budget still allows at `now` (`None`: no budget): its
    /// amount plus what transfers moved in (less what they moved out) less
    /// what was spent, never below zero, and never more than takes what was
    /// spent in the window to the largest amount (a budget of 10^12 with
    /// more moved in is not a sum out of range, nor room for a spend the
    /// window's count could not hold).
    pub fn room_at(&self, now: Timestamp) -> Option<Amount> {
        self.budget.map(|b| {
            let spent = i128::from(self.spent_at(now).micros());
            let room =
                i128::from(b.amount.micros()) + i128::from(self.extra_at(now).micros()) - spent;
            let room = room.clamp(0, i128::from(crate::amount::MAX_AMOUNT_MICROS) - spent);
            Amount::from_micros(i64::try_from(room).expect("clamped to the amount range"))
                .expect("clamped to the amount range")
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
                // They no longer give back to `spent`, but still to their
                // day's count (`hold_days` stays until each hold ends).
                self.holds.clear();
                // A member stored before the counts were kept: nothing is
                // counted in the new window yet, so from here they are
                // complete.
                if self.counted_from.is_none() {
                    self.counted_from = Some(start);
                }
            }
        }
    }

    /// Count `amount` spent at `now` (its day's count; `roll` first).
    pub(crate) fn count(&mut self, amount: Amount, hold: Option<&Id>, now: Timestamp) {
        self.spent = self.spent.checked_add(amount).expect("spent within range");
        self.fold_counts(now);
        let day = BudgetPeriod::Day.window_start(now);
        let counted = self.counted_days.entry(day).or_insert(Amount::ZERO);
        *counted = capped_sum(*counted, amount);
        if let Some(hold) = hold {
            self.holds.insert(hold.clone(), amount);
            self.hold_days.insert(hold.clone(), day);
        }
    }

    /// Give back up to `amount` of a spend made at `spent_at`: to `spent`
    /// if it was counted in this window (`in_window`), and to its day's (or
    /// month's) count if the counts hold it (`counted`: it was made since
    /// the budget started counting). What went back to `spent`.
    pub(crate) fn give_back(
        &mut self,
        amount: Amount,
        spent_at: Timestamp,
        in_window: bool,
        counted: bool,
    ) -> Amount {
        let give = match in_window {
            true => amount.min(self.spent),
            false => Amount::ZERO,
        };
        self.spent = self.spent.checked_sub(give).expect("at most spent");
        if counted {
            let day = BudgetPeriod::Day.window_start(spent_at);
            let month = BudgetPeriod::Month.window_start(spent_at);
            let count = match self.counted_days.get_mut(&day) {
                Some(count) => Some(count),
                None => self.counted_months.get_mut(&month),
            };
            if let Some(count) = count {
                *count = count
                    .checked_sub(amount.min(*count))
                    .expect("at most counted");
            }
        }
        give
    }

    /// Keep the day counts of `now`'s month only (earlier days of the year
    /// add to their month's count) and the month counts of its year only.
    fn fold_counts(&mut self, now: Timestamp) {
        let month = BudgetPeriod::Month.window_start(now);
        let year = BudgetPeriod::Year.window_start(now);
        while let Some(entry) = self.counted_days.first_entry() {
            if *entry.key() >= month {
                break;
            }
            let (day, counted) = entry.remove_entry();
            let into = self
                .counted_months
                .entry(BudgetPeriod::Month.window_start(day))
                .or_insert(Amount::ZERO);
            *into = capped_sum(*into, counted);
        }
        self.counted_months.retain(|start, _| *start >= year);
        self.hold_days.retain(|_, day| *day >= year);
    }

    /// What the day and month counts hold for `period`'s window at `now`
    /// (`None` unless they are complete for it).
    fn recount(&mut self, period: BudgetPeriod, now: Timestamp) -> Option<Amount> {
        let start = period.window_start(now);
        let complete = self
            .counted_from
            .is_some_and(|from| from <= start.max(self.counting_since));
        if !complete {
            return None;
        }
        self.fold_counts(now);
        let days = self.counted_days.range(start..).map(|(_, amount)| *amount);
        let months = self
            .counted_months
            .range(start..)
            .map(|(_, amount)| *amount);
        Some(days.chain(months).fold(Amount::ZERO, capped_sum))
    }

    /// The budget's period changes at `now` (from `old`): count what was
    /// spent in the new period's window, from the day and month counts
    /// where they are complete for it (a member stored before they were
    /// kept carries what it counted in the old window, until its window
    /// next rolls). Budget moved in by transfers was for the old window;
    /// budget moved out stays moved, so that a change of period never
    /// gives it back. Holds placed before the new window no longer give
    /// back to it (only to their day's count).
    pub(crate) fn change_period(&mut self, old: BudgetPeriod, new: BudgetPeriod, now: Timestamp) {
        let old_start = old.window_start(now);
        let in_old_window = old_start <= self.window_start;
        let start = new.window_start(now);
        match self.recount(new, now) {
            Some(spent) => {
                self.spent = spent;
                let hold_days = &self.hold_days;
                self.holds
                    .retain(|hold, _| hold_days.get(hold).is_some_and(|day| *day >= start));
            }
            None if !in_old_window => {
                // The old window ended unseen: nothing of it counts.
                self.spent = Amount::ZERO;
                self.holds.clear();
            }
            None => {}
        }
        self.extra = match in_old_window {
            true => self.extra.min(Amount::ZERO),
            false => Amount::ZERO,
        };
        self.window_start = start;
    }
}

/// `a + b`, at most the largest amount: a count of several days may pass
/// what one amount can be, and an overstated count only refuses more.
fn capped_sum(a: Amount, b: Amount) -> Amount {
    a.checked_add(b).unwrap_or_else(|| {
        Amount::from_micros(crate::amount::MAX_AMOUNT_MICROS).expect("the largest amount")
    })
}
