//! One customer's ledger: the state machine every operation goes through.
//!
//! [`CustomerLedger`] holds a customer's grants (all of them, live and dead) and
//! its active holds. Each operation checks its preconditions, changes the state
//! and returns the journal entry that explains the change; a refused operation
//! changes nothing. Every operation first applies what fell due (holds that
//! timed out, grants that expired) at `now`, in time order, so a charge never
//! sees credits that have already expired.
//!
//! Invariants kept here and checked by [`CustomerLedger::check_invariants`]:
//! every grant's `remaining` stays within `[0, amount]`; an expired or voided
//! grant has nothing remaining; every active hold's reservations add up to its
//! amount; the credits outstanding (every lot's remaining plus what active holds
//! reserve) stay within the maximum amount, so that returning held credits can
//! never overflow, and a refund or reinstatement that would exceed it is refused.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::amount::checked_sum;
use crate::member::{Budget, Member};
use crate::{
    Account, Amount, CostBasis, Draw, EntryDraft, EntryKind, Grant, GrantStatus, Hold, HoldStatus,
    Id, LedgerError, OveragePolicy, Posting, Source, Timestamp,
};

mod transfer;
pub use transfer::TransferredLot;

/// How long after expiring a grant may still be reinstated.
pub const REINSTATE_WINDOW_MICROS: i64 = 90 * 24 * 3600 * Timestamp::MICROS_PER_SECOND;

/// A request to spend credits, by charge or by hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spend {
    /// The charge or hold id.
    pub reference: Id,
    pub amount: Amount,
    /// The feature paid for; decides which scoped grants may pay.
    pub feature: Option<String>,
    pub member_id: Option<Id>,
    pub reason: Option<String>,
}

/// A charge (or captured hold) as a refund sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChargeRecord {
    pub reference: Id,
    pub customer_id: Id,
    pub amount: Amount,
    pub drawn: Vec<Draw>,
    pub refunded: Amount,
    pub feature: Option<String>,
    /// The part of the charge taken as debt (an overage), drawn after `drawn`.
    pub on_debt: Amount,
}

/// What a capture did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Captured {
    pub captured: Amount,
    pub drawn: Vec<Draw>,
    pub released: Amount,
}

/// What a refund did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refunded {
    pub amount: Amount,
    /// Credits returned to the grants the charge drew on, or to new refund grants.
    pub returned: Vec<Draw>,
    /// Grants created because the original lot was no longer live.
    pub new_grants: Vec<Id>,
}

/// What a void did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Voided {
    pub voided: Amount,
    /// The money value of the voided credits at the grant's cost basis.
    pub refundable_money: Option<(Amount, String)>,
}

/// A customer's balance at an instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Balance {
    /// Spendable now: the remaining of every grant in effect.
    pub available: Amount,
    /// Reserved by active holds.
    pub held: Amount,
    /// Granted but not yet in effect.
    pub pending: Amount,
    /// Owed beyond zero: overage spent past the credits, repaid by the next credits.
    pub debt: Amount,
    /// The next instant some remaining credits expire, and how many.
    pub next_expiry: Option<(Timestamp, Amount)>,
}

/// What changed since the store last asked: rows to write.
#[derive(Clone, Debug, Default)]
pub struct Changes {
    pub grants: Vec<Grant>,
    pub holds: Vec<Hold>,
    /// The customer's debt, when it changed.
    pub debt: Option<Amount>,
    /// Members whose budget or spend changed.
    pub members: Vec<Member>,
}

/// The sequence of a lot the ledger made on its own until the store numbers
/// it: after every other, as the number it gets will be.
pub const UNNUMBERED: i64 = i64::MAX;

/// The id of a lot Tally makes from another operation's id:
/// `<prefix>:<reference>:<n>`. When that would pass the length of an id a
/// request may name (so that the lot could not be voided or extended), it is
/// `<prefix>:<hash>.<n>` instead, with a 64-bit FNV-1a hash of the
/// reference in hex: after its last `:` it is not all digits, so it is never
/// the plain id of another reference (say, a hold whose id is that hash).
pub fn derived_lot_id(prefix: &str, reference: &Id, n: usize) -> Id {
    let plain = format!("{prefix}:{reference}:{n}");
    if plain.len() <= crate::id::MAX_ID_LENGTH {
        return Id::derived(&plain);
    }
    let hash = reference
        .as_str()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    Id::derived(&format!("{prefix}:{hash:016x}.{n}"))
}

/// One customer's grants and active holds.
#[derive(Clone, Debug)]
pub struct CustomerLedger {
    customer_id: Id,
    /// Every grant of the customer, sorted by burn order.
    grants: Vec<Grant>,
    active_holds: HashMap<Id, Hold>,
    /// No grant or hold falls due before this instant (a lower bound).
    next_due: Option<Timestamp>,
    dirty_grants: BTreeSet<Id>,
    changed_holds: Vec<Hold>,
    /// Owed beyond zero; never negative.
    debt: Amount,
    debt_changed: bool,
    overage: OveragePolicy,
    /// Members with a budget or a name (spends may name any member).
    members: BTreeMap<Id, Member>,
    dirty_members: BTreeSet<Id>,
    /// Lots made here with sequence [`UNNUMBERED`], not yet numbered by the store.
    unnumbered: Vec<Id>,
}

impl CustomerLedger {
    pub fn new(customer_id: Id) -> CustomerLedger {
        CustomerLedger::from_parts(customer_id, Vec::new(), Vec::new())
    }

    /// Rebuild from stored rows: all grants and the active holds.
    pub fn from_parts(customer_id: Id, mut grants: Vec<Grant>, holds: Vec<Hold>) -> CustomerLedger {
        grants.sort_by_key(Grant::burn_key);
        let active_holds = holds
            .into_iter()
            .filter(|h| h.status == HoldStatus::Active)
            .map(|h| (h.id.clone(), h))
            .collect();
        let mut ledger = CustomerLedger {
            customer_id,
            grants,
            active_holds,
            next_due: None,
            dirty_grants: BTreeSet::new(),
            changed_holds: Vec::new(),
            debt: Amount::ZERO,
            debt_changed: false,
            overage: OveragePolicy::Block,
            members: BTreeMap::new(),
            dirty_members: BTreeSet::new(),
            unnumbered: Vec::new(),
        };
        ledger.next_due = ledger.compute_next_due();
        ledger
    }

    /// The stored debt of a ledger rebuilt from rows.
    pub fn with_debt(mut self, debt: Amount) -> CustomerLedger {
        assert!(!debt.is_negative(), "debt is never negative");
        self.debt = debt;
        self.next_due = self.compute_next_due();
        self
    }

    pub fn debt(&self) -> Amount {
        self.debt
    }

    /// The policy for spends from now on; the debt already owed stays.
    pub fn set_overage(&mut self, policy: OveragePolicy) {
        self.overage = policy;
    }

    pub fn customer_id(&self) -> &Id {
        &self.customer_id
    }

    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }

    pub fn grant(&self, grant_id: &Id) -> Option<&Grant> {
        self.grants.iter().find(|g| &g.id == grant_id)
    }

    pub fn active_hold(&self, hold_id: &Id) -> Option<&Hold> {
        self.active_holds.get(hold_id)
    }

    pub fn active_holds(&self) -> impl Iterator<Item = &Hold> {
        self.active_holds.values()
    }

    /// Number the lots the ledger made on its own (credits released into a
    /// voided lot: sequence [`UNNUMBERED`]) from `next`, in burn order, and
    /// put them in their place in it. Whether there were any.
    pub fn number_new_lots(&mut self, next: &mut i64) -> bool {
        if self.unnumbered.is_empty() {
            return false;
        }
        let new = std::mem::take(&mut self.unnumbered);
        for grant in self.grants.iter_mut().filter(|g| new.contains(&g.id)) {
            grant.sequence = *next;
            *next += 1;
        }
        self.grants.sort_by_key(Grant::burn_key);
        true
    }

    /// The rows changed since the last call.
    pub fn take_changes(&mut self) -> Changes {
        let dirty = std::mem::take(&mut self.dirty_grants);
        let grants = self
            .grants
            .iter()
            .filter(|g| dirty.contains(&g.id))
            .cloned()
            .collect();
        let members = std::mem::take(&mut self.dirty_members)
            .iter()
            .filter_map(|id| self.members.get(id).cloned())
            .collect();
        Changes {
            grants,
            holds: std::mem::take(&mut self.changed_holds),
            debt: std::mem::take(&mut self.debt_changed).then_some(self.debt),
            members,
        }
    }

    /// With its members as stored.
    pub fn with_members(mut self, members: Vec<Member>) -> CustomerLedger {
        self.members = members.into_iter().map(|m| (m.id.clone(), m)).collect();
        self
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    /// Add or update a member (its name and budget); what it spent in the
    /// current window stays counted (a new period counts its own window).
    pub fn set_member(
        &mut self,
        member_id: &Id,
        name: Option<String>,
        budget: Option<Budget>,
        now: Timestamp,
    ) -> Member {
        let member = self
            .members
            .entry(member_id.clone())
            .or_insert_with(|| Member {
                id: member_id.clone(),
                name: None,
                budget: None,
                window_start: Timestamp(i64::MIN),
                counting_since: Timestamp(i64::MIN),
                spent: Amount::ZERO,
                holds: BTreeMap::new(),
                extra: Amount::ZERO,
                counted_days: BTreeMap::new(),
                counted_months: BTreeMap::new(),
                hold_days: BTreeMap::new(),
                counted_from: None,
            });
        member.name = name;
        match (member.budget, budget) {
            // A new budget counts from now on; spends before it were not counted.
            (None, Some(new)) => {
                member.window_start = new.period.window_start(now);
                member.counting_since = now;
                member.counted_from = Some(now);
                member.spent = Amount::ZERO;
                member.holds.clear();
                member.hold_days.clear();
                member.counted_days.clear();
                member.counted_months.clear();
            }
            (Some(_), None) => {
                member.window_start = Timestamp(i64::MIN);
                member.counted_from = None;
                member.spent = Amount::ZERO;
                member.holds.clear();
                member.hold_days.clear();
                member.counted_days.clear();
                member.counted_months.clear();
            }
            // Another period: what was spent in the new period's current
            // window counts (see `Member::change_period`).
            (Some(old), Some(new)) if old.period != new.period => {
                member.change_period(old.period, new.period, now);
            }
            _ => {}
        }
        member.budget = budget;
        member.roll(now);
        self.dirty_members.insert(member_id.clone());
        member.clone()
    }

    /// Refuse a spend that would take its member past the budget.
    fn check_budget(&self, spend: &Spend, now: Timestamp) -> Result<(), LedgerError> {
        let Some(member) = spend.member_id.as_ref().and_then(|m| self.members.get(m)) else {
            return Ok(());
        };
        let (Some(budget), Some(room)) = (member.budget, member.room_at(now)) else {
            return Ok(());
        };
        if spend.amount > room {
            return Err(LedgerError::MemberBudgetExceeded {
                member_id: member.id.clone(),
                budget: budget.amount,
                spent: member.spent_at(now),
                moved: member.extra_at(now),
                remaining: room,
                required: spend.amount,
            });
        }
        Ok(())
    }

    /// Count a spend (or the hold `hold`) against its member's budget.
    fn count_member_spend(
        &mut self,
        member_id: Option<&Id>,
        amount: Amount,
        hold: Option<&Id>,
        now: Timestamp,
    ) {
        if let Some(member) = member_id.and_then(|m| self.members.get_mut(m)) {
            if member.budget.is_some() {
                member.roll(now);
                member.count(amount, hold, now);
                self.dirty_members.insert(member.id.clone());
            }
        }
    }

    /// When hold `hold` ends: give back to its member's budget what it
    /// reserved and did not use, if the budget counted it (in this window).
    fn return_member_spend(
        &mut self,
        member_id: Option<&Id>,
        hold: &Id,
        unused: Amount,
        now: Timestamp,
    ) {
        if let Some(member) = member_id.and_then(|m| self.members.get_mut(m)) {
            member.roll(now);
            let in_window = member.holds.remove(hold).is_some();
            // The day it was counted on (none for a hold placed before the
            // budget existed, or before the counts were kept).
            let day = member.hold_days.remove(hold);
            if in_window || day.is_some() {
                let at = day.unwrap_or(member.window_start);
                member.give_back(unused, at, in_window, day.is_some());
                self.dirty_members.insert(member.id.clone());
            }
        }
    }

    /// A refund of `amount` of a spend member `member_id` made at `spent_at`:
    /// give it back to the member's budget if the budget counted that spend
    /// in the window holding `now` (a spend of an earlier window, or from
    /// before the budget existed, was never counted in this one). Returns
    /// what was given back; never more than the window's counted spend.
    pub fn refund_member_spend(
        &mut self,
        member_id: &Id,
        amount: Amount,
        spent_at: Timestamp,
        now: Timestamp,
    ) -> Amount {
        let Some(member) = self.members.get_mut(member_id) else {
            return Amount::ZERO;
        };
        if member.budget.is_none() {
            return Amount::ZERO;
        }
        member.roll(now);
        if spent_at < member.counting_since {
            return Amount::ZERO;
        }
        // Always to its day's count (a longer period may count that day
        // again); to `spent` only if this window counted it.
        let in_window = spent_at >= member.window_start;
        let counted = member.counted_from.is_some_and(|from| spent_at >= from);
        let give = member.give_back(amount, spent_at, in_window, counted);
        self.dirty_members.insert(member.id.clone());
        give
    }

    /// The balance at `now`; call [`CustomerLedger::expire_due`] first.
    pub fn balance(&self, now: Timestamp) -> Balance {
        let mut available = Amount::ZERO;
        let mut pending = Amount::ZERO;
        let mut next_expiry: Option<(Timestamp, Amount)> = None;
        for grant in self
            .grants
            .iter()
            .filter(|g| g.status == GrantStatus::Active)
        {
            if grant.in_effect(now) {
                available = add(available, grant.remaining);
            } else {
                if now < grant.effective_at {
                    pending = add(pending, grant.remaining);
                }
                // Only credits the customer can spend now count toward
                // the next expiry: a pending lot's are not theirs yet.
                continue;
            }
            if let (Some(expiry), true) = (grant.expires_at, grant.remaining.is_positive()) {
                next_expiry = match next_expiry {
                    Some((at, total)) if at == expiry => Some((at, add(total, grant.remaining))),
                    Some((at, _)) if at < expiry => next_expiry,
                    _ => Some((expiry, grant.remaining)),
                };
            }
        }
        let held =
            checked_sum(self.active_holds.values().map(|h| h.amount)).expect("held within range");
        Balance {
            available,
            held,
            pending,
            debt: self.debt,
            next_expiry,
        }
    }

    fn available(&self, now: Timestamp) -> Amount {
        checked_sum(
            self.grants
                .iter()
                .filter(|g| g.in_effect(now))
                .map(|g| g.remaining),
        )
        .expect("balance within range")
    }

    /// The balance an entry reports: the credits available less the debt.
    pub fn net(&self, now: Timestamp) -> Amount {
        self.available(now)
            .checked_sub(self.debt)
            .expect("balance within range")
    }

    /// How much more debt a spend may take on: the policy's limit less what
    /// is owed and what holds have reserved beyond the credits.
    fn debt_room(&self, metered: bool) -> Amount {
        let limit = self.overage.debt_limit(metered);
        let reserved = checked_sum(self.active_holds.values().map(|h| h.overdraft))
            .expect("held within range");
        let used = self.debt.checked_add(reserved).expect("debt within range");
        limit
            .checked_sub(used)
            .map_or(Amount::ZERO, |room| room.max(Amount::ZERO))
    }

    /// Pay debt back from the credits available to any feature at `at`, in
    /// burn order; returns what was repaid and adds its postings.
    fn repay_debt(&mut self, at: Timestamp, postings: &mut Vec<Posting>) -> Amount {
        let mut repaid = Amount::ZERO;
        if !self.debt.is_positive() {
            return repaid;
        }
        for grant in self.grants.iter_mut() {
            if self.debt.is_zero() {
                break;
            }
            if grant.scope.is_some() || !grant.in_effect(at) || !grant.remaining.is_positive() {
                continue;
            }
            let take = grant.remaining.min(self.debt);
            grant.remaining = grant.remaining.checked_sub(take).expect("take fits");
            self.debt = self.debt.checked_sub(take).expect("take fits");
            repaid = add(repaid, take);
            postings.push(Posting {
                from: Account::Grant(grant.id.clone()),
                to: Account::Debt,
                amount: take,
            });
            self.dirty_grants.insert(grant.id.clone());
        }
        if repaid.is_positive() {
            self.debt_changed = true;
        }
        repaid
    }

    /// Add `amount` to the debt; credits that take effect later repay it
    /// when they do.
    fn owe(&mut self, amount: Amount) {
        if amount.is_positive() {
            self.debt = add(self.debt, amount);
            self.debt_changed = true;
            self.lower_next_due(self.repayers().map(|g| g.effective_at).min());
        }
    }

    /// The available balance in the middle of a sweep of what fell due by
    /// `now`: lots not yet swept still count, and lots not yet swept into
    /// effect do not, so each entry's `balance_after` follows from the one
    /// before (several lots expiring or taking effect in one sweep each take
    /// their own step), and the last one equals the balance at `now`.
    fn available_while_sweeping(&self, now: Timestamp) -> Amount {
        checked_sum(
            self.grants
                .iter()
                .filter(|g| {
                    g.status == GrantStatus::Active && g.effective_at <= now && !g.awaiting_effect
                })
                .map(|g| g.remaining),
        )
        .expect("balance within range")
    }

    /// In a sweep: the lot `grant_id`, issued with `effective_at` ahead, took
    /// effect at `at`; its credits move from `pending:` into the lot.
    fn take_effect(&mut self, grant_id: &Id, at: Timestamp, now: Timestamp) -> EntryDraft {
        let index = self.grant_index(grant_id).expect("due grant exists");
        let grant = &mut self.grants[index];
        grant.awaiting_effect = false;
        let amount = grant.remaining;
        let postings = if amount.is_positive() {
            vec![Posting {
                from: Account::Pending(grant.id.clone()),
                to: Account::Grant(grant.id.clone()),
                amount,
            }]
        } else {
            Vec::new()
        };
        self.dirty_grants.insert(grant_id.clone());
        EntryDraft {
            kind: EntryKind::GrantEffective,
            customer_id: self.customer_id.clone(),
            amount,
            postings,
            reference: Some(grant_id.clone()),
            member_id: None,
            feature: None,
            reason: Some("grant reached effective_at".into()),
            effective_at: at,
            balance_after: self.net_while_sweeping(now),
        }
    }

    /// Every lot's remaining plus what active holds reserve: what the balance
    /// can grow back to without new credits. `None` beyond the maximum amount.
    fn outstanding(&self) -> Option<Amount> {
        checked_sum(self.grants.iter().map(|g| g.remaining))?
            .checked_add(checked_sum(self.active_holds.values().map(|h| h.amount))?)
    }

    /// Refuse adding `amount` new credits when the outstanding total would pass the maximum.
    pub fn room_for(&self, amount: Amount) -> Result<(), LedgerError> {
        match self
            .outstanding()
            .and_then(|total| total.checked_add(amount))
        {
            Some(_) => Ok(()),
            None => Err(LedgerError::AmountOverflow),
        }
    }

    fn compute_next_due(&self) -> Option<Timestamp> {
        let grant_due = self
            .grants
            .iter()
            .filter(|g| g.status == GrantStatus::Active)
            .filter_map(|g| g.expires_at);
        let hold_due = self.active_holds.values().map(|h| h.expires_at);
        let repay_due = self.repayers().map(|g| g.effective_at);
        let effect_due = self.awaiting().map(|g| g.effective_at);
        grant_due
            .chain(hold_due)
            .chain(repay_due)
            .chain(effect_due)
            .min()
    }

    /// The lots issued with an `effective_at` ahead whose taking effect the
    /// ledger has not recorded yet.
    fn awaiting(&self) -> impl Iterator<Item = &Grant> {
        self.grants
            .iter()
            .filter(|g| g.status == GrantStatus::Active && g.awaiting_effect)
    }

    /// While in debt: the grants whose credits repay it once in effect.
    fn repayers(&self) -> impl Iterator<Item = &Grant> {
        let in_debt = self.debt.is_positive();
        self.grants.iter().filter(move |g| {
            in_debt
                && g.status == GrantStatus::Active
                && g.scope.is_none()
                && g.remaining.is_positive()
        })
    }

    fn lower_next_due(&mut self, at: Option<Timestamp>) {
        if let Some(at) = at {
            self.next_due = Some(self.next_due.map_or(at, |due| due.min(at)));
        }
    }

    fn grant_index(&self, grant_id: &Id) -> Option<usize> {
        self.grants.iter().position(|g| &g.id == grant_id)
    }

    /// Apply every hold timeout and grant expiry due at or before `now`, in time
    /// order (a hold before a grant at the same instant).
    pub fn expire_due(&mut self, now: Timestamp) -> Vec<EntryDraft> {
        if self.next_due.is_none_or(|due| due > now) {
            return Vec::new();
        }
        // (instant, 0 = hold / 1 = grant expiring / 2 = grant taking effect /
        // 3 = grant taking effect while in debt, id)
        let mut due: Vec<(Timestamp, u8, Id)> = self
            .active_holds
            .values()
            .filter(|h| h.expires_at <= now)
            .map(|h| (h.expires_at, 0, h.id.clone()))
            .collect();
        due.extend(
            self.grants
                .iter()
                .filter(|g| g.status == GrantStatus::Active)
                .filter_map(|g| {
                    g.expires_at
                        .filter(|at| *at <= now)
                        .map(|at| (at, 1, g.id.clone()))
                }),
        );
        due.extend(
            self.awaiting()
                .filter(|g| g.effective_at <= now)
                .map(|g| (g.effective_at, 2, g.id.clone())),
        );
        due.extend(
            self.repayers()
                .filter(|g| g.effective_at <= now)
                .map(|g| (g.effective_at, 3, g.id.clone())),
        );
        let mut entries = Vec::with_capacity(due.len());
        let mut due: std::collections::BinaryHeap<std::cmp::Reverse<(Timestamp, u8, Id)>> =
            due.into_iter().map(std::cmp::Reverse).collect();
        while let Some(std::cmp::Reverse((at, what, id))) = due.pop() {
            let made = self.unnumbered.len();
            let entry = match what {
                0 => Some(self.expire_hold(&id, at, now)),
                1 => Some(self.expire_grant(&id, at, now)),
                2 => Some(self.take_effect(&id, at, now)),
                _ => self.repay_from_sweep(&id, at, now),
            };
            // A lot the step made (a hold's credits given back, at `at`, to
            // a lot voided meanwhile) that expires by `now` expires in this
            // sweep, in its turn: a late sweep books what a timely one would.
            for lot in &self.unnumbered[made..] {
                let expiry = self.grant(lot).and_then(|g| g.expires_at);
                if let Some(expiry) = expiry.filter(|expiry| *expiry <= now) {
                    due.push(std::cmp::Reverse((expiry, 1, lot.clone())));
                }
            }
            entries.extend(entry);
        }
        self.next_due = self.compute_next_due();
        entries
    }

    /// In a sweep: debt repaid by credits that took effect at `at`; `None`
    /// when nothing is left to repay (an earlier step of the sweep did it).
    fn repay_from_sweep(
        &mut self,
        grant_id: &Id,
        at: Timestamp,
        now: Timestamp,
    ) -> Option<EntryDraft> {
        let mut postings = Vec::new();
        let repaid = self.repay_debt(at, &mut postings);
        if repaid.is_zero() {
            return None;
        }
        Some(EntryDraft {
            kind: EntryKind::DebtRepaid,
            customer_id: self.customer_id.clone(),
            amount: repaid,
            postings,
            reference: Some(grant_id.clone()),
            member_id: None,
            feature: None,
            reason: Some("credits took effect while the customer owed".into()),
            effective_at: at,
            balance_after: self.net_while_sweeping(now),
        })
    }

    fn net_while_sweeping(&self, now: Timestamp) -> Amount {
        self.available_while_sweeping(now)
            .checked_sub(self.debt)
            .expect("balance within range")
    }

    fn expire_hold(&mut self, hold_id: &Id, at: Timestamp, now: Timestamp) -> EntryDraft {
        let mut hold = self
            .active_holds
            .remove(hold_id)
            .expect("due hold is active");
        let mut postings = self.return_reservations(&hold, at);
        self.repay_debt(at, &mut postings);
        self.return_member_spend(hold.member_id.as_ref(), &hold.id, hold.amount, at);
        hold.status = HoldStatus::Expired;
        let entry = EntryDraft {
            kind: EntryKind::HoldExpired,
            customer_id: self.customer_id.clone(),
            amount: hold.amount,
            postings,
            reference: Some(hold.id.clone()),
            member_id: hold.member_id.clone(),
            feature: hold.feature.clone(),
            reason: Some("hold timed out".into()),
            effective_at: at,
            balance_after: self.net_while_sweeping(now),
        };
        self.changed_holds.push(hold);
        entry
    }

    /// End an active grant before its time: what remains expires now, in an
    /// `expire` entry with `reason` (a plan's allocation when its period ends
    /// early, by a plan change or a cancellation). Credits a hold reserved
    /// from it follow to `expired` when the hold gives them back, as for any
    /// expired grant.
    pub fn end_grant(
        &mut self,
        grant_id: &Id,
        reason: String,
        now: Timestamp,
    ) -> Result<EntryDraft, LedgerError> {
        let index = self
            .grant_index(grant_id)
            .ok_or_else(|| LedgerError::GrantNotFound(grant_id.clone()))?;
        let grant = &self.grants[index];
        if grant.status != GrantStatus::Active {
            return Err(LedgerError::GrantNotActive {
                grant_id: grant_id.clone(),
                status: grant.status.as_str(),
            });
        }
        // `expires_at` stays as it was: an `expired_at` before it says the
        // grant ended early ([`Grant::ended_early`]).
        let mut entry = self.expire_grant(grant_id, now, now);
        entry.reason = Some(reason);
        entry.balance_after = self.net(now);
        self.next_due = self.compute_next_due();
        Ok(entry)
    }

    fn expire_grant(&mut self, grant_id: &Id, at: Timestamp, now: Timestamp) -> EntryDraft {
        let index = self.grant_index(grant_id).expect("due grant exists");
        let grant = &mut self.grants[index];
        let expired = grant.remaining;
        grant.status = GrantStatus::Expired;
        grant.expired_amount = expired;
        grant.expired_at = Some(at);
        grant.remaining = Amount::ZERO;
        // A lot ended before it took effect (no caller does this today):
        // its credits are still pending.
        let from = if std::mem::take(&mut grant.awaiting_effect) {
            Account::Pending(grant.id.clone())
        } else {
            Account::Grant(grant.id.clone())
        };
        let postings = if expired.is_positive() {
            vec![Posting {
                from,
                to: Account::Expired,
                amount: expired,
            }]
        } else {
            Vec::new()
        };
        self.dirty_grants.insert(grant_id.clone());
        EntryDraft {
            kind: EntryKind::Expire,
            customer_id: self.customer_id.clone(),
            amount: expired,
            postings,
            reference: Some(grant_id.clone()),
            member_id: None,
            feature: None,
            reason: Some("grant reached expires_at".into()),
            effective_at: at,
            balance_after: self.net_while_sweeping(now),
        }
    }

    /// Return every credit a hold reserved to the grants it came from.
    /// The credits `hold` reserved come back at `at`.
    fn return_reservations(&mut self, hold: &Hold, at: Timestamp) -> Vec<Posting> {
        let mut postings = Vec::with_capacity(hold.reservations.len());
        for draw in &hold.reservations {
            self.return_credits(&hold.id, &draw.grant_id, draw.amount, at, &mut postings);
        }
        postings
    }

    /// Credits a hold reserved from `grant_id` come back at `at` (released,
    /// timed out, or not captured). To
    /// the lot while it is active; into its expiry if it expired meanwhile
    /// (they would have expired with it). If it was voided meanwhile (a
    /// purchase refunded while the hold was open) and its expiry, if any, is
    /// still ahead of `at`, they come back as a new lot
    /// `release:<hold>:<n>` with the voided
    /// lot's source, paid flag, cost basis, priority, scope and expiry: the
    /// void took back and reported the money of what was left then, and
    /// voiding these too would destroy paid credits without reporting their
    /// money (a capture and a refund give them back as a refund lot, so both
    /// ways now leave the customer the credits, with their cost basis). Its `sequence` is [`UNNUMBERED`] (it burns
    /// after every lot like it, as it will once numbered) until the store
    /// numbers it ([`CustomerLedger::number_new_lots`]). If the voided lot's
    /// expiry had passed by `at`, they would have expired with it: they go
    /// to `expired` (breakage), not to `voided` unreported. (A sweep that
    /// comes late makes the new lot all the same, and expires it at its
    /// expiry in the same sweep: see [`CustomerLedger::expire_due`].)
    fn return_credits(
        &mut self,
        hold_id: &Id,
        grant_id: &Id,
        amount: Amount,
        at: Timestamp,
        postings: &mut Vec<Posting>,
    ) {
        let from = Account::Hold(hold_id.clone());
        let index = self.grant_index(grant_id).expect("reserved grant exists");
        let grant = &mut self.grants[index];
        let to = Account::Grant(grant.id.clone());
        match grant.status {
            GrantStatus::Active => {
                postings.push(Posting { from, to, amount });
                grant.remaining = add(grant.remaining, amount);
                assert!(
                    grant.remaining <= grant.amount,
                    "grant {} over its amount",
                    grant.id
                );
                self.dirty_grants.insert(grant_id.clone());
            }
            GrantStatus::Expired => {
                postings.push(Posting {
                    from,
                    to: to.clone(),
                    amount,
                });
                postings.push(Posting {
                    from: to,
                    to: Account::Expired,
                    amount,
                });
                grant.expired_amount = add(grant.expired_amount, amount);
                self.dirty_grants.insert(grant_id.clone());
            }
            // They would have expired with the lot by the time they come back:
            // breakage, not a void. (Judged at `at`, not at the sweep's `now`:
            // a late sweep makes the lot too, and expires it in its turn.)
            GrantStatus::Voided if grant.expires_at.is_some_and(|t| t <= at) => {
                postings.push(Posting {
                    from,
                    to: Account::Expired,
                    amount,
                });
            }
            GrantStatus::Voided => {
                let id = self.released_lot(index, hold_id, amount, at);
                postings.push(Posting {
                    from,
                    to: Account::Grant(id),
                    amount,
                });
            }
        }
    }

    /// A new lot `release:<hold>:<n>` of `amount` credits `hold_id` gave
    /// back at `at` to the voided lot at `index`, like it (see
    /// [`CustomerLedger::return_credits`]).
    fn released_lot(&mut self, index: usize, hold_id: &Id, amount: Amount, at: Timestamp) -> Id {
        let id = (1..)
            .map(|n| derived_lot_id("release", hold_id, n))
            .find(|id| self.grant_index(id).is_none())
            .expect("a free id");
        let voided = &self.grants[index];
        let lot = Grant {
            id: id.clone(),
            customer_id: self.customer_id.clone(),
            amount,
            remaining: amount,
            source: voided.source,
            paid: voided.paid,
            cost_basis: voided.cost_basis.clone(),
            priority: voided.priority,
            effective_at: at,
            expires_at: voided.expires_at,
            scope: voided.scope.clone(),
            status: GrantStatus::Active,
            expired_amount: Amount::ZERO,
            expired_at: None,
            sequence: UNNUMBERED,
            awaiting_effect: false,
            origin: Some(voided.root().clone()),
        };
        self.lower_next_due(lot.expires_at);
        self.insert_sorted(lot);
        self.dirty_grants.insert(id.clone());
        self.unnumbered.push(id.clone());
        id
    }

    /// Add a grant. The caller sets `sequence`; `remaining` starts at `amount`.
    pub fn add_grant(
        &mut self,
        mut grant: Grant,
        reason: Option<String>,
        now: Timestamp,
    ) -> Result<EntryDraft, LedgerError> {
        assert_eq!(grant.customer_id, self.customer_id);
        assert!(self.grant_index(&grant.id).is_none(), "grant id reused");
        if !grant.amount.is_positive() {
            return Err(LedgerError::AmountNotPositive);
        }
        // The money value of the whole lot must be representable, so a void
        // (which values at most this much) can always report it.
        if let Some(basis) = &grant.cost_basis {
            if basis.value_of(grant.amount).is_none() {
                return Err(LedgerError::CostBasisOverflow);
            }
        }
        if let Some(expiry) = grant.expires_at {
            // The clock first: without an `effective_at` (now), an expiry in the
            // past is "in the past", not "before effective_at".
            if expiry <= now {
                return Err(LedgerError::InvalidExpiry(
                    "expires_at must be in the future",
                ));
            }
            if expiry <= grant.effective_at {
                return Err(LedgerError::InvalidExpiry(
                    "expires_at must be after effective_at",
                ));
            }
        }
        self.room_for(grant.amount)?;
        grant.remaining = grant.amount;
        grant.status = GrantStatus::Active;
        grant.expired_amount = Amount::ZERO;
        grant.expired_at = None;
        // Credits that take effect later wait in their own account; the
        // sweep at `effective_at` moves them into the lot ([`Self::expire_due`]).
        grant.awaiting_effect = grant.effective_at > now;
        let mut postings = vec![Posting {
            from: Account::Issued(grant.source),
            to: if grant.awaiting_effect {
                Account::Pending(grant.id.clone())
            } else {
                Account::Grant(grant.id.clone())
            },
            amount: grant.amount,
        }];
        let entry_amount = grant.amount;
        let grant_id = grant.id.clone();
        self.lower_next_due(grant.expires_at);
        if grant.awaiting_effect {
            self.lower_next_due(Some(grant.effective_at));
        }
        self.insert_sorted(grant);
        self.dirty_grants.insert(grant_id.clone());
        // Debt is repaid first; a grant that takes effect later repays it then.
        self.repay_debt(now, &mut postings);
        self.lower_next_due(self.repayers().map(|g| g.effective_at).min());
        Ok(EntryDraft {
            kind: EntryKind::Grant,
            customer_id: self.customer_id.clone(),
            amount: entry_amount,
            postings,
            reference: Some(grant_id),
            member_id: None,
            feature: None,
            reason,
            effective_at: now,
            balance_after: self.net(now),
        })
    }

    /// Move `amount` of lot `from`'s remaining credits into a new lot `into`
    /// (a plan's rollover into the next period), in one entry. `from` must be
    /// active; it may be at its expiry instant (the rollover happens just
    /// before the rest of it expires).
    pub fn roll_over(
        &mut self,
        from: &Id,
        mut into: Grant,
        reason: Option<String>,
        now: Timestamp,
    ) -> Result<EntryDraft, LedgerError> {
        assert_eq!(into.customer_id, self.customer_id);
        assert!(self.grant_index(&into.id).is_none(), "grant id reused");
        let amount = into.amount;
        if !amount.is_positive() {
            return Err(LedgerError::AmountNotPositive);
        }
        if into.expires_at.is_some_and(|at| at <= now) {
            return Err(LedgerError::InvalidExpiry(
                "expires_at must be in the future",
            ));
        }
        let index = self
            .grant_index(from)
            .ok_or_else(|| LedgerError::GrantNotFound(from.clone()))?;
        let source = &mut self.grants[index];
        if source.status != GrantStatus::Active {
            return Err(LedgerError::GrantNotActive {
                grant_id: from.clone(),
                status: source.status.as_str(),
            });
        }
        source.remaining = source
            .remaining
            .checked_sub(amount)
            .filter(|left| !left.is_negative())
            .ok_or(LedgerError::InsufficientCredits {
                available: source.remaining,
                required: amount,
            })?;
        self.dirty_grants.insert(from.clone());
        into.remaining = amount;
        into.status = GrantStatus::Active;
        into.expired_amount = Amount::ZERO;
        into.expired_at = None;
        let to = into.id.clone();
        self.lower_next_due(into.expires_at);
        self.insert_sorted(into);
        self.dirty_grants.insert(to.clone());
        Ok(EntryDraft {
            kind: EntryKind::Rollover,
            customer_id: self.customer_id.clone(),
            amount,
            postings: vec![Posting {
                from: Account::Grant(from.clone()),
                to: Account::Grant(to.clone()),
                amount,
            }],
            reference: Some(to),
            member_id: None,
            feature: None,
            reason,
            effective_at: now,
            balance_after: self.net(now),
        })
    }

    fn insert_sorted(&mut self, grant: Grant) {
        let key = grant.burn_key();
        let at = self.grants.partition_point(|g| g.burn_key() <= key);
        self.grants.insert(at, grant);
    }

    /// Choose the grants that pay `amount` for `feature`, in burn order, and
    /// what the overage policy lets go beyond them (the overdraft).
    fn plan_draws(
        &self,
        amount: Amount,
        feature: Option<&str>,
        now: Timestamp,
        metered: bool,
    ) -> Result<(Vec<(usize, Amount)>, Amount), LedgerError> {
        if !amount.is_positive() {
            return Err(LedgerError::AmountNotPositive);
        }
        let mut left = amount;
        let mut draws = Vec::new();
        for (index, grant) in self.grants.iter().enumerate() {
            if left.is_zero() {
                break;
            }
            if !grant.in_effect(now) || !grant.covers(feature) || !grant.remaining.is_positive() {
                continue;
            }
            let take = grant.remaining.min(left);
            left = left.checked_sub(take).expect("take is at most left");
            draws.push((index, take));
        }
        let room = if left.is_positive() {
            self.debt_room(metered)
        } else {
            Amount::ZERO
        };
        if left > room {
            let eligible = checked_sum(
                self.grants
                    .iter()
                    .filter(|g| g.in_effect(now) && g.covers(feature))
                    .map(|g| g.remaining),
            )
            .expect("balance within range");
            return Err(LedgerError::InsufficientCredits {
                available: eligible.checked_add(room).unwrap_or(eligible),
                required: amount,
            });
        }
        Ok((draws, left))
    }

    /// Take the planned draws out of their grants into `to`.
    fn take_draws(&mut self, draws: &[(usize, Amount)], to: &Account) -> (Vec<Draw>, Vec<Posting>) {
        let mut drawn = Vec::with_capacity(draws.len());
        let mut postings = Vec::with_capacity(draws.len());
        for &(index, take) in draws {
            let grant = &mut self.grants[index];
            grant.remaining = grant
                .remaining
                .checked_sub(take)
                .expect("planned draw fits");
            assert!(!grant.remaining.is_negative());
            drawn.push(Draw {
                grant_id: grant.id.clone(),
                amount: take,
            });
            postings.push(Posting {
                from: Account::Grant(grant.id.clone()),
                to: to.clone(),
                amount: take,
            });
            self.dirty_grants.insert(grant.id.clone());
        }
        (drawn, postings)
    }

    /// Spend credits now: a synchronous charge, which the overage policy
    /// `metered_only` refuses beyond the credits. What went into debt is the
    /// entry's [`EntryDraft::debt_drawn`].
    pub fn charge(
        &mut self,
        spend: &Spend,
        now: Timestamp,
    ) -> Result<(Vec<Draw>, EntryDraft), LedgerError> {
        self.charge_with(spend, now, false)
    }

    /// Record metered usage (an event reported after the fact): the overage
    /// policy `metered_only` lets it go into debt.
    pub fn charge_metered(
        &mut self,
        spend: &Spend,
        now: Timestamp,
    ) -> Result<(Vec<Draw>, EntryDraft), LedgerError> {
        self.charge_with(spend, now, true)
    }

    fn charge_with(
        &mut self,
        spend: &Spend,
        now: Timestamp,
        metered: bool,
    ) -> Result<(Vec<Draw>, EntryDraft), LedgerError> {
        self.check_budget(spend, now)?;
        let (draws, overdraft) =
            self.plan_draws(spend.amount, spend.feature.as_deref(), now, metered)?;
        self.count_member_spend(spend.member_id.as_ref(), spend.amount, None, now);
        let consumed = Account::Consumed(spend.feature.clone());
        let (drawn, mut postings) = self.take_draws(&draws, &consumed);
        if overdraft.is_positive() {
            postings.push(Posting {
                from: Account::Debt,
                to: consumed,
                amount: overdraft,
            });
            self.owe(overdraft);
        }
        let entry = self.spend_entry(EntryKind::Charge, spend, postings, now);
        Ok((drawn, entry))
    }

    /// Record usage that costs nothing (a free tier, a zero price): a charge
    /// entry of 0 credits without postings, so the usage still has its entry.
    pub fn free_use(&self, spend: &Spend, now: Timestamp) -> EntryDraft {
        debug_assert!(spend.amount.is_zero());
        self.spend_entry(EntryKind::Charge, spend, Vec::new(), now)
    }

    fn spend_entry(
        &self,
        kind: EntryKind,
        spend: &Spend,
        postings: Vec<Posting>,
        now: Timestamp,
    ) -> EntryDraft {
        EntryDraft {
            kind,
            customer_id: self.customer_id.clone(),
            amount: spend.amount,
            postings,
            reference: Some(spend.reference.clone()),
            member_id: spend.member_id.clone(),
            feature: spend.feature.clone(),
            reason: spend.reason.clone(),
            effective_at: now,
            balance_after: self.net(now),
        }
    }

    /// Reserve credits until `expires_at`.
    pub fn place_hold(
        &mut self,
        spend: &Spend,
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(Hold, EntryDraft), LedgerError> {
        if expires_at <= now {
            return Err(LedgerError::InvalidExpiry(
                "a hold's timeout must be in the future",
            ));
        }
        assert!(
            !self.active_holds.contains_key(&spend.reference),
            "hold id reused"
        );
        self.check_budget(spend, now)?;
        let (draws, overdraft) =
            self.plan_draws(spend.amount, spend.feature.as_deref(), now, false)?;
        // What a hold reserves past the credits counts in the outstanding
        // total (held credits must stay representable).
        self.room_for(overdraft)?;
        self.count_member_spend(
            spend.member_id.as_ref(),
            spend.amount,
            Some(&spend.reference),
            now,
        );
        let (reservations, postings) =
            self.take_draws(&draws, &Account::Hold(spend.reference.clone()));
        let hold = Hold {
            id: spend.reference.clone(),
            customer_id: self.customer_id.clone(),
            amount: spend.amount,
            reservations,
            status: HoldStatus::Active,
            created_at: now,
            expires_at,
            captured: Amount::ZERO,
            feature: spend.feature.clone(),
            member_id: spend.member_id.clone(),
            overdraft,
        };
        self.active_holds.insert(hold.id.clone(), hold.clone());
        self.changed_holds.push(hold.clone());
        self.lower_next_due(Some(expires_at));
        let entry = self.spend_entry(EntryKind::Hold, spend, postings, now);
        Ok((hold, entry))
    }

    fn take_active_hold(&mut self, hold_id: &Id) -> Result<Hold, LedgerError> {
        self.active_holds
            .remove(hold_id)
            .ok_or_else(|| LedgerError::HoldNotFound(hold_id.clone()))
    }

    /// Capture `amount` (default: all) of a hold; the rest goes back to its grants.
    pub fn capture(
        &mut self,
        hold_id: &Id,
        amount: Option<Amount>,
        reason: Option<String>,
        now: Timestamp,
    ) -> Result<(Captured, EntryDraft), LedgerError> {
        let held = self
            .active_hold(hold_id)
            .ok_or_else(|| LedgerError::HoldNotFound(hold_id.clone()))?
            .amount;
        let capture = amount.unwrap_or(held);
        if !capture.is_positive() {
            return Err(LedgerError::AmountNotPositive);
        }
        if capture > held {
            return Err(LedgerError::CaptureExceedsHold {
                requested: capture,
                held,
            });
        }
        let mut hold = self.take_active_hold(hold_id)?;
        let hold_account = Account::Hold(hold.id.clone());
        let consumed = Account::Consumed(hold.feature.clone());
        let (takes, left) = hold.takes(capture);
        let mut drawn = Vec::new();
        let mut postings = Vec::new();
        let mut releases = Vec::new();
        for (draw, take) in hold.reservations.iter().zip(takes) {
            if take.is_positive() {
                drawn.push(Draw {
                    grant_id: draw.grant_id.clone(),
                    amount: take,
                });
                postings.push(Posting {
                    from: hold_account.clone(),
                    to: consumed.clone(),
                    amount: take,
                });
            }
            let rest = draw
                .amount
                .checked_sub(take)
                .expect("take is at most the draw");
            if rest.is_positive() {
                releases.push((draw.grant_id.clone(), rest));
            }
        }
        // What the reservations did not cover comes from the overdraft: debt.
        if left.is_positive() {
            debug_assert!(left <= hold.overdraft);
            postings.push(Posting {
                from: Account::Debt,
                to: consumed.clone(),
                amount: left,
            });
            self.owe(left);
        }
        for (grant_id, rest) in &releases {
            self.return_credits(&hold.id, grant_id, *rest, now, &mut postings);
        }
        self.repay_debt(now, &mut postings);
        let released = held.checked_sub(capture).expect("capture is at most held");
        self.return_member_spend(hold.member_id.as_ref(), &hold.id, released, now);
        hold.status = HoldStatus::Captured;
        hold.captured = capture;
        let entry = EntryDraft {
            kind: EntryKind::Capture,
            customer_id: self.customer_id.clone(),
            amount: capture,
            postings,
            reference: Some(hold.id.clone()),
            member_id: hold.member_id.clone(),
            feature: hold.feature.clone(),
            reason,
            effective_at: now,
            balance_after: self.net(now),
        };
        self.changed_holds.push(hold);
        Ok((
            Captured {
                captured: capture,
                drawn,
                released,
            },
            entry,
        ))
    }

    /// Release a hold: every reserved credit goes back to its grant.
    pub fn release(
        &mut self,
        hold_id: &Id,
        reason: Option<String>,
        now: Timestamp,
    ) -> Result<(Amount, EntryDraft), LedgerError> {
        let mut hold = self.take_active_hold(hold_id)?;
        let mut postings = self.return_reservations(&hold, now);
        self.repay_debt(now, &mut postings);
        self.return_member_spend(hold.member_id.as_ref(), &hold.id, hold.amount, now);
        hold.status = HoldStatus::Released;
        let entry = EntryDraft {
            kind: EntryKind::Release,
            customer_id: self.customer_id.clone(),
            amount: hold.amount,
            postings,
            reference: Some(hold.id.clone()),
            member_id: hold.member_id.clone(),
            feature: hold.feature.clone(),
            reason,
            effective_at: now,
            balance_after: self.net(now),
        };
        let amount = hold.amount;
        self.changed_holds.push(hold);
        Ok((amount, entry))
    }

    /// Give back `amount` (default: all that is left) of a charge.
    ///
    /// Policy: credits return to the grants the charge drew on, the last drawn
    /// first, while those grants are active. The part whose grant has since
    /// expired or been voided becomes a new grant (source `refund`, never
    /// expiring) that keeps the original lot's paid flag, cost basis, priority
    /// and scope, so finance can still reconcile it with the payment.
    /// The part the charge took as debt (drawn last, so refunded first)
    /// cancels debt still owed; what of it was already repaid becomes a new
    /// unpaid, unscoped refund grant. Credits returned while the customer is
    /// in debt repay it. `next_sequence` numbers the grants this creates.
    pub fn refund(
        &mut self,
        charge: &ChargeRecord,
        refund_id: &Id,
        amount: Option<Amount>,
        reason: Option<String>,
        next_sequence: &mut i64,
        now: Timestamp,
    ) -> Result<(Refunded, EntryDraft), LedgerError> {
        assert_eq!(charge.customer_id, self.customer_id);
        let refundable = charge
            .amount
            .checked_sub(charge.refunded)
            .expect("refunded is at most charged");
        let requested = amount.unwrap_or(refundable);
        if !requested.is_positive() && amount.is_some() {
            return Err(LedgerError::AmountNotPositive);
        }
        if requested > refundable || !requested.is_positive() {
            return Err(LedgerError::RefundExceedsCharge {
                requested,
                refundable,
            });
        }
        self.room_for(requested)?;
        let consumed = Account::Consumed(charge.feature.clone());
        let mut already = charge.refunded;
        let mut left = requested;
        let mut returned = Vec::new();
        let mut postings = Vec::new();
        let mut new_grants = Vec::new();
        // What the charge drew, in order: its grants (`Some`), then its debt
        // part (`None`); refunded from the end.
        let pieces: Vec<(Option<&Id>, Amount)> = charge
            .drawn
            .iter()
            .map(|d| (Some(&d.grant_id), d.amount))
            .chain(std::iter::once((None, charge.on_debt)))
            .filter(|(_, amount)| amount.is_positive())
            .collect();
        for (grant_id, drawn) in pieces.into_iter().rev() {
            if left.is_zero() {
                break;
            }
            let skip = already.min(drawn);
            already = already.checked_sub(skip).expect("skip is at most already");
            let open = drawn.checked_sub(skip).expect("skip is at most the draw");
            let give = open.min(left);
            if give.is_zero() {
                continue;
            }
            left = left.checked_sub(give).expect("give is at most left");
            let Some(grant_id) = grant_id else {
                let cancel = give.min(self.debt);
                if cancel.is_positive() {
                    self.debt = self.debt.checked_sub(cancel).expect("cancel fits");
                    self.debt_changed = true;
                    postings.push(Posting {
                        from: consumed.clone(),
                        to: Account::Debt,
                        amount: cancel,
                    });
                }
                let rest = give.checked_sub(cancel).expect("cancel is at most give");
                if rest.is_positive() {
                    // What was repaid comes back as credits: an unpaid, unscoped lot.
                    let id = self.refund_lot(
                        refund_id,
                        new_grants.len() + 1,
                        rest,
                        None,
                        next_sequence,
                        now,
                    );
                    postings.push(Posting {
                        from: consumed.clone(),
                        to: Account::Grant(id.clone()),
                        amount: rest,
                    });
                    returned.push(Draw {
                        grant_id: id.clone(),
                        amount: rest,
                    });
                    new_grants.push(id);
                }
                continue;
            };
            let index = self.grant_index(grant_id).expect("drawn grant exists");
            if self.grants[index].status == GrantStatus::Active {
                let grant = &mut self.grants[index];
                grant.remaining = add(grant.remaining, give);
                assert!(grant.remaining <= grant.amount, "refund over grant amount");
                postings.push(Posting {
                    from: consumed.clone(),
                    to: Account::Grant(grant.id.clone()),
                    amount: give,
                });
                returned.push(Draw {
                    grant_id: grant.id.clone(),
                    amount: give,
                });
                self.dirty_grants.insert(grant_id.clone());
            } else {
                let original = self.grants[index].clone();
                let id = self.refund_lot(
                    refund_id,
                    new_grants.len() + 1,
                    give,
                    Some(&original),
                    next_sequence,
                    now,
                );
                postings.push(Posting {
                    from: consumed.clone(),
                    to: Account::Grant(id.clone()),
                    amount: give,
                });
                returned.push(Draw {
                    grant_id: id.clone(),
                    amount: give,
                });
                new_grants.push(id);
            }
        }
        assert!(
            left.is_zero(),
            "refund within the charge always finds its draws"
        );
        self.repay_debt(now, &mut postings);
        let entry = EntryDraft {
            kind: EntryKind::Refund,
            customer_id: self.customer_id.clone(),
            amount: requested,
            postings,
            reference: Some(refund_id.clone()),
            member_id: None,
            feature: charge.feature.clone(),
            reason,
            effective_at: now,
            balance_after: self.net(now),
        };
        Ok((
            Refunded {
                amount: requested,
                returned,
                new_grants,
            },
            entry,
        ))
    }

    /// A new lot `refund:<refund id>:<n>` of `amount`, never expiring, that
    /// keeps the paid flag, cost basis, priority and scope of `like` (the
    /// lot the refunded credits came from), or none of them.
    fn refund_lot(
        &mut self,
        refund_id: &Id,
        n: usize,
        amount: Amount,
        like: Option<&Grant>,
        next_sequence: &mut i64,
        now: Timestamp,
    ) -> Id {
        let id = derived_lot_id("refund", refund_id, n);
        let grant = Grant {
            id: id.clone(),
            customer_id: self.customer_id.clone(),
            amount,
            remaining: amount,
            source: Source::Refund,
            paid: like.is_some_and(|g| g.paid),
            cost_basis: like.and_then(|g| g.cost_basis.clone()),
            priority: like.map_or(0, |g| g.priority),
            effective_at: now,
            expires_at: None,
            scope: like.and_then(|g| g.scope.clone()),
            status: GrantStatus::Active,
            expired_amount: Amount::ZERO,
            expired_at: None,
            sequence: *next_sequence,
            awaiting_effect: false,
            origin: like.map(|g| g.root().clone()),
        };
        *next_sequence += 1;
        self.insert_sorted(grant);
        self.dirty_grants.insert(id.clone());
        id
    }

    /// Take back what remains of a grant.
    pub fn void(
        &mut self,
        grant_id: &Id,
        reference: &Id,
        reason: Option<String>,
        now: Timestamp,
    ) -> Result<(Voided, EntryDraft), LedgerError> {
        let index = self
            .grant_index(grant_id)
            .ok_or_else(|| LedgerError::GrantNotFound(grant_id.clone()))?;
        let grant = &mut self.grants[index];
        if grant.status != GrantStatus::Active {
            return Err(LedgerError::GrantNotActive {
                grant_id: grant_id.clone(),
                status: grant.status.as_str(),
            });
        }
        let voided = grant.remaining;
        grant.remaining = Amount::ZERO;
        grant.status = GrantStatus::Voided;
        // A lot voided before it took effect: its credits are still pending.
        let from = if std::mem::take(&mut grant.awaiting_effect) {
            Account::Pending(grant_id.clone())
        } else {
            Account::Grant(grant_id.clone())
        };
        // Unpaid credits are never refundable (the API refuses a cost basis
        // on them; a lot stored before that may have one).
        let paid_basis = grant.cost_basis.as_ref().filter(|_| grant.paid);
        let refundable_money = paid_basis.map(|basis: &CostBasis| {
            (
                basis.value_of(voided).expect("money value within range"),
                basis.currency.clone(),
            )
        });
        let postings = if voided.is_positive() {
            vec![Posting {
                from,
                to: Account::Voided,
                amount: voided,
            }]
        } else {
            Vec::new()
        };
        self.dirty_grants.insert(grant_id.clone());
        self.next_due = self.compute_next_due();
        let entry = EntryDraft {
            kind: EntryKind::Void,
            customer_id: self.customer_id.clone(),
            amount: voided,
            postings,
            reference: Some(reference.clone()),
            member_id: None,
            feature: None,
            reason,
            effective_at: now,
            balance_after: self.net(now),
        };
        Ok((
            Voided {
                voided,
                refundable_money,
            },
            entry,
        ))
    }

    /// Extend an active grant's expiry, or reinstate an expired one (within
    /// [`REINSTATE_WINDOW_MICROS`] of its expiry) with what expired.
    /// `expires_at: None` means never.
    pub fn change_expiry(
        &mut self,
        grant_id: &Id,
        expires_at: Option<Timestamp>,
        reference: &Id,
        reason: Option<String>,
        now: Timestamp,
    ) -> Result<(Amount, EntryDraft), LedgerError> {
        let index = self
            .grant_index(grant_id)
            .ok_or_else(|| LedgerError::GrantNotFound(grant_id.clone()))?;
        if expires_at.is_some_and(|at| at <= now) {
            return Err(LedgerError::InvalidExpiry(
                "the new expires_at must be in the future",
            ));
        }
        let mut grant = self.grants.remove(index);
        let outcome = match grant.status {
            GrantStatus::Voided => Err(LedgerError::GrantNotActive {
                grant_id: grant_id.clone(),
                status: grant.status.as_str(),
            }),
            GrantStatus::Active => {
                let later = match (grant.expires_at, expires_at) {
                    (None, _) => false,
                    (Some(_), None) => true,
                    (Some(old), Some(new)) => new > old,
                };
                if later {
                    grant.expires_at = expires_at;
                    Ok((EntryKind::ExpiryExtended, Amount::ZERO, Vec::new()))
                } else {
                    Err(LedgerError::InvalidExpiry(
                        "the new expires_at must be later than the current one",
                    ))
                }
            }
            GrantStatus::Expired => {
                let expired_at = grant.expired_at.expect("expired grant has expired_at");
                if now.micros() - expired_at.micros() > REINSTATE_WINDOW_MICROS {
                    Err(LedgerError::ReinstateWindowPassed(grant_id.clone()))
                } else if let Err(error) = self.room_for(grant.expired_amount) {
                    Err(error)
                } else {
                    let restored = grant.expired_amount;
                    grant.remaining = restored;
                    grant.expired_amount = Amount::ZERO;
                    grant.expired_at = None;
                    grant.status = GrantStatus::Active;
                    grant.expires_at = expires_at;
                    let postings = if restored.is_positive() {
                        vec![Posting {
                            from: Account::Expired,
                            to: Account::Grant(grant_id.clone()),
                            amount: restored,
                        }]
                    } else {
                        Vec::new()
                    };
                    Ok((EntryKind::Reinstate, restored, postings))
                }
            }
        };
        let new_expiry = grant.expires_at;
        self.insert_sorted(grant);
        let (kind, amount, mut postings) = outcome?;
        self.lower_next_due(new_expiry);
        self.repay_debt(now, &mut postings);
        self.dirty_grants.insert(grant_id.clone());
        let entry = EntryDraft {
            kind,
            customer_id: self.customer_id.clone(),
            amount,
            postings,
            reference: Some(reference.clone()),
            member_id: None,
            feature: None,
            reason,
            effective_at: now,
            balance_after: self.net(now),
        };
        Ok((amount, entry))
    }

    /// The invariants that need the instant: while the customer owes, no
    /// credit available to every feature is left unspent (it repays first).
    pub fn check_invariants_at(&self, now: Timestamp) -> Result<(), String> {
        self.check_invariants()?;
        if self.debt.is_positive() {
            if let Some(grant) = self
                .grants
                .iter()
                .find(|g| g.scope.is_none() && g.in_effect(now) && g.remaining.is_positive())
            {
                return Err(format!(
                    "debt {} owed while grant {} has {} available",
                    self.debt, grant.id, grant.remaining
                ));
            }
        }
        Ok(())
    }

    /// Assert the per-customer invariants; for tests and debug builds.
    pub fn check_invariants(&self) -> Result<(), String> {
        for grant in &self.grants {
            if grant.remaining.is_negative() || grant.remaining > grant.amount {
                return Err(format!(
                    "grant {} remaining {} outside [0, {}]",
                    grant.id, grant.remaining, grant.amount
                ));
            }
            if grant.status != GrantStatus::Active && !grant.remaining.is_zero() {
                return Err(format!(
                    "{} grant {} still has {}",
                    grant.status.as_str(),
                    grant.id,
                    grant.remaining
                ));
            }
            if grant.awaiting_effect
                && (grant.status != GrantStatus::Active || grant.remaining != grant.amount)
            {
                return Err(format!(
                    "grant {} is {} with {} of {} while its taking effect is still to record",
                    grant.id,
                    grant.status.as_str(),
                    grant.remaining,
                    grant.amount
                ));
            }
        }
        if self.outstanding().is_none() {
            return Err("remaining plus held credits exceed the maximum amount".to_string());
        }
        if self.debt.is_negative() {
            return Err(format!("debt {} is negative", self.debt));
        }
        for hold in self.active_holds.values() {
            let reserved = checked_sum(hold.reservations.iter().map(|d| d.amount))
                .and_then(|r| r.checked_add(hold.overdraft));
            if hold.overdraft.is_negative() || reserved != Some(hold.amount) {
                return Err(format!(
                    "hold {} reserves {:?} for {}",
                    hold.id, reserved, hold.amount
                ));
            }
        }
        Ok(())
    }
}

fn add(a: Amount, b: Amount) -> Amount {
    a.checked_add(b).expect("amounts within range")
}
