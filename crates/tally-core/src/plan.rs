//! Plans and subscriptions: credits allocated per period, rollover, and the
//! renewal of a subscription at each period boundary.
//!
//! A renewal is a pure function of the subscription, its plan and the
//! customer's ledger at the boundary instant, so the store makes it exactly
//! once simply by committing the subscription's new state in the same
//! transaction as the grants and entries it produced: a crash before the
//! commit leaves the period un-renewed, and the next tick renews it again at
//! the same instant with the same ids.

use serde::{Deserialize, Serialize};

use crate::{Amount, CustomerLedger, EntryDraft, Grant, GrantStatus, Id, LedgerError, Source};
use crate::{OveragePolicy, Timestamp};

const MICROS_PER_DAY: i64 = 86_400 * Timestamp::MICROS_PER_SECOND;

/// The longest custom period and the furthest an upgrade's grace may look back.
pub const MAX_PERIOD_DAYS: u32 = 3660;
pub const MAX_GRACE_DAYS: u32 = 90;
/// The most periods a rollover lot or an allocation may outlive its period by.
pub const MAX_EXPIRES_AFTER_PERIODS: u32 = 120;

/// The length of a plan's period: calendar months and years keep the
/// subscription's day of month (clamped to the month's last day, always
/// counted from the anchor, so Jan 31 renews on Feb 28 and then Mar 31).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Month,
    Year,
    Days(u32),
}

impl Period {
    /// The start of the `k`-th period after one that starts at `anchor`.
    pub fn boundary(self, anchor: Timestamp, k: i64) -> Option<Timestamp> {
        match self {
            Period::Days(days) => k
                .checked_mul(i64::from(days))?
                .checked_mul(MICROS_PER_DAY)
                .and_then(|delta| anchor.micros().checked_add(delta))
                .map(Timestamp),
            Period::Month => add_months(anchor, k),
            Period::Year => add_months(anchor, k.checked_mul(12)?),
        }
    }

    /// How long a period lasts on average, in millionths of a day (to
    /// compare plans, never to date): a year of the Gregorian calendar is
    /// 365.2425 days and a month a twelfth of it, so twelve months are a
    /// year exactly (with 30 and 365 days, a monthly plan and a yearly one
    /// within 1.4% of each other compared the wrong way round).
    pub fn average_micro_days(self) -> i64 {
        const YEAR: i64 = 365_242_500;
        match self {
            Period::Month => YEAR / 12,
            Period::Year => YEAR,
            Period::Days(days) => i64::from(days) * 1_000_000,
        }
    }

    pub fn validate(self) -> Result<(), &'static str> {
        match self {
            Period::Days(days) if days == 0 || days > MAX_PERIOD_DAYS => {
                Err("a period of days must be 1 to 3660 days")
            }
            _ => Ok(()),
        }
    }
}

fn add_months(anchor: Timestamp, months: i64) -> Option<Timestamp> {
    let nanos = i128::from(anchor.micros()) * 1000;
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()?;
    let index = i64::from(at.year()) * 12 + i64::from(u8::from(at.month())) - 1 + months;
    let year = i32::try_from(index.div_euclid(12)).ok()?;
    let month = time::Month::try_from(u8::try_from(index.rem_euclid(12) + 1).ok()?).ok()?;
    let day = at.day().min(month.length(year));
    let date = time::Date::from_calendar_date(year, month, day).ok()?;
    let moved = time::PrimitiveDateTime::new(date, at.time()).assume_utc();
    i64::try_from(moved.unix_timestamp_nanos() / 1000)
        .ok()
        .map(Timestamp)
}

/// What of a period's unused allocation carries into the next period.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollover {
    /// At most this percentage of the plan's included credits rolls over.
    pub max_percent: Option<u32>,
    /// At most this many credits roll over.
    pub max_amount: Option<Amount>,
    /// The rolled-over lot expires this many periods after it is created
    /// (1: at the end of the next period).
    pub expires_after_periods: u32,
}

impl Rollover {
    /// What rolls over from `unused` credits of a plan including `included`.
    pub fn amount(&self, unused: Amount, included: Amount) -> Amount {
        let mut rolled = unused;
        if let Some(percent) = self.max_percent {
            let cap = i128::from(included.micros()) * i128::from(percent) / 100;
            let cap =
                Amount::from_micros(i64::try_from(cap).unwrap_or(i64::MAX)).unwrap_or(included);
            rolled = rolled.min(cap);
        }
        if let Some(cap) = self.max_amount {
            rolled = rolled.min(cap);
        }
        rolled
    }
}

/// A plan: credits included per period and what happens to them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub key: String,
    pub name: String,
    pub period: Period,
    /// Granted at the start of every period (may be zero: a pay-as-you-go plan).
    pub included_credits: Amount,
    /// Each allocation expires this many periods after its period starts (1:
    /// at the end of its own period); `None`: never.
    pub allocation_expires_after_periods: Option<u32>,
    pub rollover: Option<Rollover>,
    /// The overage policy of subscribers without one of their own.
    pub overage: Option<OveragePolicy>,
    /// On an upgrade to this plan, lots that expired within this many days
    /// before it are reinstated.
    pub upgrade_grace_days: u32,
}

/// Why a plan is not valid.
pub fn validate_plan(plan: &Plan) -> Result<(), (&'static str, &'static str)> {
    plan.period.validate().map_err(|m| ("period", m))?;
    if plan.included_credits.is_negative() {
        return Err(("included_credits", "included_credits must not be negative"));
    }
    if plan.upgrade_grace_days > MAX_GRACE_DAYS {
        return Err((
            "upgrade_grace_days",
            "upgrade_grace_days must be 0 to 90 (expired lots can be reinstated for 90 days)",
        ));
    }
    if plan
        .allocation_expires_after_periods
        .is_some_and(|n| n == 0 || n > MAX_EXPIRES_AFTER_PERIODS)
    {
        return Err((
            "allocation_expires_after_periods",
            "allocation_expires_after_periods must be 1 to 120",
        ));
    }
    if let Some(rollover) = &plan.rollover {
        // Rollover carries what an allocation leaves when its period ends;
        // an allocation that outlives its period is still there to spend,
        // and expired later with nothing carried (a probe found such a plan
        // accepted and its rollover never applied).
        if plan.allocation_expires_after_periods != Some(1) {
            return Err((
                "rollover",
                "rollover carries what an allocation leaves at the end of its period: it needs allocation_expires_after_periods 1 (the default); remove the rollover or set allocation_expires_after_periods to 1",
            ));
        }
        if rollover.max_percent.is_some_and(|p| p > 100) {
            return Err(("rollover.max_percent", "max_percent must be 0 to 100"));
        }
        if rollover.max_amount.is_some_and(Amount::is_negative) {
            return Err(("rollover.max_amount", "max_amount must not be negative"));
        }
        if rollover.expires_after_periods == 0
            || rollover.expires_after_periods > MAX_EXPIRES_AFTER_PERIODS
        {
            return Err((
                "rollover.expires_after_periods",
                "expires_after_periods must be 1 to 120",
            ));
        }
    }
    Ok(())
}

impl Plan {
    /// Whether moving from `from` to this plan is an upgrade: more credits
    /// per day of period, on average ([`Period::average_micro_days`]).
    pub fn is_upgrade_from(&self, from: &Plan) -> bool {
        i128::from(self.included_credits.micros()) * i128::from(from.period.average_micro_days())
            > i128::from(from.included_credits.micros())
                * i128::from(self.period.average_micro_days())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionStatus {
    Active,
    Canceled,
}

impl SubscriptionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionStatus::Active => "active",
            SubscriptionStatus::Canceled => "canceled",
        }
    }
}

/// A customer's subscription to a plan.
///
/// Periods are numbered: period `n` starts at `anchor` moved by
/// `n - anchor_period` plan periods. Before a subscription starts it is in
/// period -1, which ends at the start instant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    /// The id of the request that started it: the root of its grant ids.
    pub id: Id,
    pub customer_id: Id,
    pub plan: String,
    pub status: SubscriptionStatus,
    pub anchor: Timestamp,
    pub anchor_period: i64,
    pub period: i64,
    pub period_start: Timestamp,
    pub period_end: Timestamp,
    /// The plan that takes over at the end of this period.
    pub next_plan: Option<String>,
    pub cancel_at_period_end: bool,
    pub started_at: Timestamp,
    pub canceled_at: Option<Timestamp>,
    /// When the subscription started or last moved to a plan that is not an
    /// upgrade (a downgrade now, or one taking effect at a period's end). An
    /// upgrade's grace reinstates only lots that expired after it: a lot that
    /// expired before a downgrade expired under a plan at least as high as
    /// the one an upgrade back leaves, and one that expired before the
    /// subscription started (say, under a subscription cancelled since) was
    /// not this subscription's; otherwise a downgrade (or a cancellation and
    /// a new subscription) and an upgrade back, after each renewal, revived
    /// every earlier allocation again. Absent in subscriptions stored before
    /// it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_changed_at: Option<Timestamp>,
    /// The terms the current period's allocation was granted under: its
    /// rollover follows them though the plan was changed since (a change
    /// applies from the next period). Absent before the first period, and
    /// in subscriptions stored before it was kept (the plan's terms of the
    /// boundary then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_terms: Option<PeriodTerms>,
}

/// What of a plan decides what becomes of a period's allocation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeriodTerms {
    pub included_credits: Amount,
    pub rollover: Option<Rollover>,
}

impl PeriodTerms {
    pub fn of(plan: &Plan) -> PeriodTerms {
        PeriodTerms {
            included_credits: plan.included_credits,
            rollover: plan.rollover.clone(),
        }
    }
}

impl Subscription {
    /// A subscription that starts at `start` (its first allocation then).
    pub fn starting(id: Id, customer_id: Id, plan: String, start: Timestamp) -> Subscription {
        Subscription {
            id,
            customer_id,
            plan,
            status: SubscriptionStatus::Active,
            anchor: start,
            anchor_period: 0,
            period: -1,
            period_start: start,
            period_end: start,
            next_plan: None,
            cancel_at_period_end: false,
            started_at: start,
            canceled_at: None,
            plan_changed_at: Some(start),
            period_terms: None,
        }
    }

    /// Whether a renewal (or the start) is due at `now`.
    pub fn due(&self, now: Timestamp) -> bool {
        self.status == SubscriptionStatus::Active && self.period_end <= now
    }

    /// When its renewal number `k` from now takes place (0: the end of this
    /// period, or the start of one not started), under `current` (its plan)
    /// and then `next` (the plan scheduled for the period's end, else
    /// `current`), as `renew_due` would date it. `None` if there is no such
    /// renewal (the subscription ends at this period's end, or is not
    /// active) or it lies past what the calendar reaches.
    pub fn renewal_at(&self, current: &Plan, next: &Plan, k: i64) -> Option<Timestamp> {
        if self.status != SubscriptionStatus::Active || k < 0 {
            return None;
        }
        if k == 0 {
            return Some(self.period_end);
        }
        if self.cancel_at_period_end {
            return None;
        }
        if self.period < 0 || next.period != current.period {
            // The first renewal starts a period anchored at its own instant.
            next.period.boundary(self.period_end, k)
        } else {
            next.period
                .boundary(self.anchor, self.period + 1 + k - self.anchor_period)
        }
    }

    /// How many of its renewals fall at or before `at` (`renewal_at` from
    /// 0 on): those already due and not applied (a renewal the writer
    /// refused stays due).
    pub fn renewals_by(&self, current: &Plan, next: &Plan, at: Timestamp) -> i64 {
        let by = |k: i64| self.renewal_at(current, next, k).is_some_and(|t| t <= at);
        if !by(0) {
            return 0;
        }
        // Renewal instants grow with k: double past `at`, then halve back.
        let (mut low, mut high) = (0_i64, 1_i64);
        while by(high) {
            low = high;
            match high.checked_mul(2) {
                Some(next) => high = next,
                None => return high,
            }
        }
        // by(low) and not by(high).
        while high - low > 1 {
            let middle = low + (high - low) / 2;
            if by(middle) {
                low = middle;
            } else {
                high = middle;
            }
        }
        low + 1
    }

    /// The id of period `n`'s allocation.
    pub fn allocation_id(&self, n: i64) -> Id {
        Id::derived(&format!("plan:{}:{n}", self.id))
    }

    /// The id of the lot rolled over into period `n`.
    pub fn rollover_id(&self, n: i64) -> Id {
        Id::derived(&format!("rollover:{}:{n}", self.id))
    }

    fn boundary(&self, plan: &Plan, n: i64) -> Result<Timestamp, LedgerError> {
        plan.period
            .boundary(self.anchor, n - self.anchor_period)
            .ok_or(LedgerError::AmountOverflow)
    }

    /// Start a new period `period + 1` at `at` under `plan` (re-anchored there).
    fn begin_period(&mut self, plan: &Plan, at: Timestamp) -> Result<(), LedgerError> {
        self.period += 1;
        self.anchor = at;
        self.anchor_period = self.period;
        self.period_start = at;
        self.period_end = self.boundary(plan, self.period + 1)?;
        Ok(())
    }
}

/// What a renewal or a plan change did, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// An entry that changed no grant's existence (an expiry, a rollover, a reinstatement).
    Entry(EntryDraft),
    /// An entry that created this grant.
    NewGrant(EntryDraft, Grant),
    /// A period began (the subscription renewed, or started).
    Renewed { period: i64, at: Timestamp },
    /// The subscription ended at its period end.
    Ended { at: Timestamp },
}

/// Supplies what a renewal needs from the store: plans by key and grant sequence numbers.
pub trait RenewalContext {
    fn plan(&self, key: &str) -> Option<&Plan>;
    fn next_grant_sequence(&mut self) -> i64;
}

/// Renew every period boundary due at or before `now`, in time order: the
/// things due before a boundary happen first, then the ending allocation's
/// rollover (just before the boundary), the cancellation or plan switch
/// scheduled for the period end, what expires at the boundary (the rest of
/// the ending allocation), and the next period's allocation.
pub fn renew_due(
    ledger: &mut CustomerLedger,
    subscription: &mut Subscription,
    context: &mut dyn RenewalContext,
    now: Timestamp,
) -> Result<Vec<Step>, LedgerError> {
    let mut reached = subscription.period_end;
    renew_until(ledger, subscription, context, now, &mut reached)
}

/// [`renew_due`], whose refusal also names the boundary refused. Every
/// boundary before that one renews: [`renew_due`] on fresh copies with
/// `now` a microsecond before it applies them (a long catch-up is not
/// all or nothing because one late period cannot be granted).
pub fn renew_due_or_refused_at(
    ledger: &mut CustomerLedger,
    subscription: &mut Subscription,
    context: &mut dyn RenewalContext,
    now: Timestamp,
) -> Result<Vec<Step>, (Timestamp, LedgerError)> {
    let mut reached = subscription.period_end;
    renew_until(ledger, subscription, context, now, &mut reached).map_err(|e| (reached, e))
}

/// The renewals of [`renew_due`]; `reached` is the boundary being renewed.
fn renew_until(
    ledger: &mut CustomerLedger,
    subscription: &mut Subscription,
    context: &mut dyn RenewalContext,
    now: Timestamp,
    reached: &mut Timestamp,
) -> Result<Vec<Step>, LedgerError> {
    let mut steps = Vec::new();
    while subscription.due(now) {
        let at = subscription.period_end;
        *reached = at;
        let before = Timestamp(at.micros() - 1);
        steps.extend(ledger.expire_due(before).into_iter().map(Step::Entry));
        let Some(plan) = context.plan(&subscription.plan).cloned() else {
            // A plan is never deleted; a missing one is a broken store.
            panic!(
                "plan {} of subscription {} is missing",
                subscription.plan, subscription.id
            );
        };
        if subscription.cancel_at_period_end {
            subscription.status = SubscriptionStatus::Canceled;
            subscription.canceled_at = Some(at);
            subscription.next_plan = None;
            steps.push(Step::Ended { at });
            break;
        }
        let ending = subscription.period;
        let next_plan = match subscription.next_plan.take() {
            Some(key) => context
                .plan(&key)
                .cloned()
                .unwrap_or_else(|| panic!("plan {key} is missing")),
            None => plan.clone(),
        };
        // Rollover of the ending allocation, by the rule of the plan as it
        // was when the allocation was granted.
        let terms = subscription
            .period_terms
            .take()
            .unwrap_or_else(|| PeriodTerms::of(&plan));
        let rolled = match (&terms.rollover, ending >= 0) {
            (Some(rule), true) => {
                let allocation = subscription.allocation_id(ending);
                // Only credits about to expire at this boundary roll over: an
                // allocation that lasts longer (or was extended) keeps them.
                let unused = ledger
                    .grant(&allocation)
                    .filter(|g| g.status == GrantStatus::Active && g.in_effect(before))
                    .filter(|g| g.expires_at == Some(at))
                    .map_or(Amount::ZERO, |g| g.remaining);
                let amount = rule.amount(unused, terms.included_credits);
                amount
                    .is_positive()
                    .then(|| (allocation, amount, rule.clone()))
            }
            _ => None,
        };
        // A change scheduled for the period's end that is an upgrade gets
        // the new plan's grace, as a change now does (below, once the
        // boundary's expiries are in); any other change moves the bound.
        let changes = subscription.period >= 0 && next_plan.key != plan.key;
        let upgrade = changes && next_plan.is_upgrade_from(&plan);
        let grace_since = subscription.plan_changed_at;
        if changes && !upgrade {
            subscription.plan_changed_at = Some(at);
        }
        subscription.plan = next_plan.key.clone();
        if subscription.period < 0 || next_plan.period != plan.period {
            subscription.begin_period(&next_plan, at)?;
        } else {
            subscription.period += 1;
            subscription.period_start = at;
            subscription.period_end = subscription.boundary(&next_plan, subscription.period + 1)?;
        }
        let period = subscription.period;
        subscription.period_terms = Some(PeriodTerms::of(&next_plan));
        if let Some((from, amount, rule)) = rolled {
            let expires = subscription
                .boundary(&next_plan, period + i64::from(rule.expires_after_periods))?;
            // Carved out of the ending allocation a microsecond before the
            // boundary, while it is still in effect: the balance does not
            // move, and the rest of the allocation then expires at the boundary.
            let lot = plan_lot(
                ledger,
                subscription.rollover_id(period),
                Source::Rollover,
                amount,
                before,
                Some(expires),
                context,
            );
            let reason = format!(
                "rollover of {amount} unused credits of {from} into period {period}, by the rollover rule of plan {}",
                plan.key
            );
            let entry = ledger.roll_over(&from, lot.clone(), Some(reason), before)?;
            steps.push(Step::NewGrant(entry, lot));
        }
        // What falls due at the boundary (the ending allocation's rest) expires
        // before the new period's credits arrive.
        steps.extend(ledger.expire_due(at).into_iter().map(Step::Entry));
        steps.push(Step::Renewed { period, at });
        if next_plan.included_credits.is_positive() {
            let expires = match next_plan.allocation_expires_after_periods {
                Some(n) => Some(subscription.boundary(&next_plan, period + i64::from(n))?),
                None => None,
            };
            let lot = plan_lot(
                ledger,
                subscription.allocation_id(period),
                Source::PlanAllocation,
                next_plan.included_credits,
                at,
                expires,
                context,
            );
            let switched = if changes {
                format!(
                    ", on the switch from plan {} scheduled for the end of period {ending}",
                    plan.key
                )
            } else {
                String::new()
            };
            let reason = format!(
                "plan {} allocation for period {period} ({} to {}){switched}",
                next_plan.key,
                at.rfc3339(),
                subscription.period_end.rfc3339()
            );
            let entry = ledger.add_grant(lot.clone(), Some(reason), at)?;
            steps.push(Step::NewGrant(entry, lot));
        }
        if upgrade && next_plan.upgrade_grace_days > 0 {
            // Not the allocation the boundary just ended: its unused credits
            // are the rollover's to decide, as a change now ends it.
            let ended = (ending >= 0).then(|| subscription.allocation_id(ending));
            let lots: Vec<Id> = graced(ledger, &next_plan, grace_since, at)
                .into_iter()
                .filter(|id| Some(id) != ended.as_ref())
                .collect();
            let reason = format!(
                "upgrade grace: {} to {} at the end of period {ending} reinstates credits expired within {} days",
                plan.key, next_plan.key, next_plan.upgrade_grace_days
            );
            let until = subscription.period_end;
            let reference = subscription.id.clone();
            steps.extend(reinstate(ledger, lots, until, &reference, &reason, at)?);
        }
    }
    Ok(steps)
}

/// Reinstate the expired `lots` until `until`, at `at`, each in an entry
/// belonging to `reference` that gives `reason`.
fn reinstate(
    ledger: &mut CustomerLedger,
    lots: Vec<Id>,
    until: Timestamp,
    reference: &Id,
    reason: &str,
    at: Timestamp,
) -> Result<Vec<Step>, LedgerError> {
    lots.iter()
        .map(|grant_id| {
            let (_, entry) = ledger.change_expiry(
                grant_id,
                Some(until),
                reference,
                Some(reason.to_owned()),
                at,
            )?;
            Ok(Step::Entry(entry))
        })
        .collect()
}

/// The lots an upgrade to `to` at `at` reinstates: those that expired by
/// time within its `upgrade_grace_days` before `at`, and since the
/// subscription last moved to a plan that is not an upgrade (`changed_at`,
/// [`Subscription::plan_changed_at`]): not lots a change or cancellation
/// ended early (changing plans back and forth would bring them back), and
/// nothing a downgrade and an upgrade back would revive from before the
/// downgrade.
fn graced(
    ledger: &CustomerLedger,
    to: &Plan,
    changed_at: Option<Timestamp>,
    at: Timestamp,
) -> Vec<Id> {
    let since = at.micros() - i64::from(to.upgrade_grace_days) * MICROS_PER_DAY;
    let since = match changed_at {
        Some(changed) => since.max(changed.micros() + 1),
        None => since,
    };
    ledger
        .grants()
        .iter()
        .filter(|g| g.status == GrantStatus::Expired && !g.ended_early())
        .filter(|g| g.expired_at.is_some_and(|at| at.micros() >= since))
        .filter(|g| g.expired_amount.is_positive())
        .map(|g| g.id.clone())
        .collect()
}

fn plan_lot(
    ledger: &CustomerLedger,
    id: Id,
    source: Source,
    amount: Amount,
    at: Timestamp,
    expires_at: Option<Timestamp>,
    context: &mut dyn RenewalContext,
) -> Grant {
    Grant {
        id,
        customer_id: ledger.customer_id().clone(),
        amount,
        remaining: amount,
        source,
        paid: false,
        cost_basis: None,
        priority: 0,
        effective_at: at,
        expires_at,
        scope: None,
        status: GrantStatus::Active,
        expired_amount: Amount::ZERO,
        expired_at: None,
        sequence: context.next_grant_sequence(),
        awaiting_effect: false,
        origin: None,
    }
}

/// End what is left of the current period's plan allocation now, because the
/// period ends early (a plan change now, or a cancellation now): it expires
/// in an entry with `reason`. Allocations of earlier periods that live on
/// (`allocation_expires_after_periods` above 1, or never), rollover lots and
/// every other grant are untouched. Without this, changing plans back and
/// forth, or cancelling and subscribing again, would add a whole allocation
/// each time.
pub fn end_allocation(
    ledger: &mut CustomerLedger,
    subscription: &Subscription,
    reason: &str,
    now: Timestamp,
) -> Result<Vec<Step>, LedgerError> {
    if subscription.period < 0 {
        return Ok(Vec::new());
    }
    let id = subscription.allocation_id(subscription.period);
    match ledger.grant(&id) {
        Some(lot) if lot.status == GrantStatus::Active => ledger
            .end_grant(&id, reason.to_string(), now)
            .map(|entry| vec![Step::Entry(entry)]),
        _ => Ok(Vec::new()),
    }
}

/// Change an active subscription's plan at `now`: the old period ends now,
/// and so does what is left of its allocation ([`end_allocation`]; nothing
/// of it rolls over), and the new plan's first period starts now with its
/// full allocation. Other credits (purchases, rollover lots, promotions,
/// earlier periods' allocations) keep their expiry. On an upgrade, lots that
/// expired by time within the new plan's `upgrade_grace_days` before now are
/// reinstated until the new period ends. The caller has renewed what was due
/// first.
pub fn change_plan_now(
    ledger: &mut CustomerLedger,
    subscription: &mut Subscription,
    to: &Plan,
    reference: &Id,
    context: &mut dyn RenewalContext,
    now: Timestamp,
) -> Result<Vec<Step>, LedgerError> {
    let from = context
        .plan(&subscription.plan)
        .cloned()
        .unwrap_or_else(|| panic!("plan {} is missing", subscription.plan));
    let upgrade = to.is_upgrade_from(&from);
    if subscription.period < 0 {
        // Not started yet: it will start on the new plan.
        subscription.plan = to.key.clone();
        subscription.next_plan = None;
        return Ok(Vec::new());
    }
    assert!(!subscription.due(now), "renew what is due first");
    // What the grace may reinstate is what expired by time before the change
    // ([`graced`]), not the allocation this change ends.
    let grace: Vec<Id> = if upgrade && to.upgrade_grace_days > 0 {
        graced(ledger, to, subscription.plan_changed_at, now)
    } else {
        Vec::new()
    };
    let mut steps = end_allocation(
        ledger,
        subscription,
        &format!(
            "plan change from {} to {} ({reference}) ends period {}",
            from.key, to.key, subscription.period
        ),
        now,
    )?;
    subscription.plan = to.key.clone();
    if !upgrade {
        subscription.plan_changed_at = Some(now);
    }
    subscription.next_plan = None;
    subscription.cancel_at_period_end = false;
    subscription.begin_period(to, now)?;
    subscription.period_terms = Some(PeriodTerms::of(to));
    let period = subscription.period;
    steps.push(Step::Renewed { period, at: now });
    if to.included_credits.is_positive() {
        let expires = match to.allocation_expires_after_periods {
            Some(n) => Some(subscription.boundary(to, period + i64::from(n))?),
            None => None,
        };
        let lot = plan_lot(
            ledger,
            subscription.allocation_id(period),
            Source::PlanAllocation,
            to.included_credits,
            now,
            expires,
            context,
        );
        let reason = format!(
            "plan change from {} to {} ({reference}): allocation for period {period}",
            from.key, to.key
        );
        let entry = ledger.add_grant(lot.clone(), Some(reason), now)?;
        steps.push(Step::NewGrant(entry, lot));
    }
    let reason = format!(
        "upgrade grace: {} to {} reinstates credits expired within {} days",
        from.key, to.key, to.upgrade_grace_days
    );
    steps.extend(reinstate(
        ledger,
        grace,
        subscription.period_end,
        reference,
        &reason,
        now,
    )?);
    Ok(steps)
}
