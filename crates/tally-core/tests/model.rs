//! Property tests of one customer's ledger against the invariants of PRODUCT.md
//! and a small reference model.
//!
//! Each case runs a random sequence of grants, charges, holds, captures,
//! releases, refunds, voids, expiry changes, clock steps and restarts (the
//! ledger rebuilt from the rows `take_changes` handed out, as the store does).
//! Before every operation `expire_due(now)` runs, exactly as the store calls
//! it. After every step the test checks conservation by replaying every
//! posting, no overspend, that refused operations change nothing, that holds
//! resolve once, that grants stay within `[0, amount]` and expired lots are
//! never drawn, and that the ledger agrees with the reference model: a plain
//! list of lots whose remaining is kept by simple arithmetic and whose burn
//! order is written out from PRODUCT.md.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::FileFailurePersistence;
use tally_core::amount::MAX_AMOUNT_MICROS;
use tally_core::ledger::REINSTATE_WINDOW_MICROS;
use tally_core::{
    Account, Amount, Balance, Captured, ChargeRecord, CostBasis, CustomerLedger, Draw, EntryDraft,
    EntryKind, Grant, GrantStatus, Hold, HoldStatus, Id, LedgerError, Refunded, Source, Spend,
    Timestamp, Voided,
};

const MICROS: i64 = 1_000_000;
const SECOND: i64 = 1_000_000;
const DAY_SECONDS: i64 = 86_400;
/// 2023-11-14, an arbitrary start of the clock.
const START: i64 = 1_700_000_000 * SECOND;

fn amount(micros: i64) -> Amount {
    Amount::from_micros(micros).expect("test amounts are in range")
}

fn id(text: &str) -> Id {
    Id::parse(text).expect("test ids are valid")
}

// ---------------------------------------------------------------------------
// Operations and their strategies
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Part {
    /// No amount: everything.
    Full,
    /// This many thousandths of what is left (at least one micro-credit).
    PerMille(i64),
    /// One micro-credit more than is left.
    Over,
    /// An explicit zero.
    Zero,
}

impl Part {
    /// The amount to ask for out of `left` micro-credits; `None` asks for all.
    fn of(&self, left: i64) -> Option<i64> {
        match self {
            Part::Full => None,
            Part::PerMille(per_mille) => Some(
                i64::try_from(i128::from(left) * i128::from(*per_mille) / 1000)
                    .unwrap()
                    .max(1),
            ),
            Part::Over => Some(left + 1),
            Part::Zero => Some(0),
        }
    }
}

#[derive(Clone, Debug)]
enum NewExpiry {
    Never,
    InSeconds(i64),
    /// Exactly `now`: never in the future.
    Now,
}

#[derive(Clone, Debug)]
enum Op {
    Grant {
        micros: i64,
        priority: i32,
        paid: bool,
        cost_basis: Option<(&'static str, &'static str)>,
        /// Seconds from now; may be zero (refused) or before `effective_at`.
        expires_in: Option<i64>,
        /// Seconds from now; negative in the past, positive not yet in effect.
        starts_in: i64,
        scope: Option<Vec<&'static str>>,
    },
    Charge {
        micros: i64,
        feature: Option<&'static str>,
    },
    Hold {
        micros: i64,
        feature: Option<&'static str>,
        timeout_seconds: i64,
    },
    Capture {
        hold: Index,
        part: Part,
        /// Prefer a hold that is still active; otherwise any hold ever tried.
        prefer_active: bool,
    },
    Release {
        hold: Index,
        prefer_active: bool,
    },
    Refund {
        charge: Index,
        part: Part,
    },
    Void {
        grant: Index,
    },
    ChangeExpiry {
        grant: Index,
        to: NewExpiry,
        /// Prefer a grant that has expired, to exercise reinstatement.
        prefer_expired: bool,
    },
    Advance {
        seconds: i64,
    },
    Restart,
}

/// Near the maximum of one amount (one trillion credits), so that a few of
/// these together reach it.
fn huge_micros_strategy() -> impl Strategy<Value = i64> {
    (1..=5i64).prop_map(|fifths| fifths * MAX_AMOUNT_MICROS / 5 - 1)
}

/// Spend amounts; `huge` weighs amounts near the maximum against 34 ordinary ones.
fn micros_strategy(huge: u32) -> impl Strategy<Value = i64> {
    prop_oneof![
        24 => (1..=60i64).prop_map(|units| units * MICROS),
        8 => 1..=60 * MICROS,
        2 => Just(0i64),
        huge => huge_micros_strategy(),
    ]
}

fn feature_strategy() -> impl Strategy<Value = Option<&'static str>> {
    prop_oneof![3 => Just(None), 2 => Just(Some("a")), 2 => Just(Some("b")), 1 => Just(Some("c"))]
}

fn scope_strategy() -> impl Strategy<Value = Option<Vec<&'static str>>> {
    prop_oneof![
        4 => Just(None),
        1 => Just(Some(vec!["a"])),
        1 => Just(Some(vec!["b"])),
        1 => Just(Some(vec!["a", "b"])),
    ]
}

fn part_strategy() -> impl Strategy<Value = Part> {
    prop_oneof![
        4 => Just(Part::Full),
        4 => (1..=1000i64).prop_map(Part::PerMille),
        1 => Just(Part::Over),
        1 => Just(Part::Zero),
    ]
}

fn grant_strategy(huge: u32) -> impl Strategy<Value = Op> {
    let cost_basis = prop_oneof![
        1 => Just(None),
        2 => Just(Some(("0.01", "USD"))),
        1 => Just(Some(("0.333333", "EUR"))),
    ];
    let expires_in = prop_oneof![
        2 => Just(None),
        4 => (0..=40 * DAY_SECONDS).prop_map(Some),
        1 => (0..=3600i64).prop_map(Some),
    ];
    let starts_in = prop_oneof![
        6 => Just(0i64),
        1 => -DAY_SECONDS..0,
        2 => 1..=5 * DAY_SECONDS,
    ];
    let micros = prop_oneof![
        30 => (1..=120i64).prop_map(|units| units * MICROS),
        huge => huge_micros_strategy(),
    ];
    (
        micros,
        0..=2i32,
        any::<bool>(),
        cost_basis,
        expires_in,
        starts_in,
        scope_strategy(),
    )
        .prop_map(
            |(micros, priority, paid, cost_basis, expires_in, starts_in, scope)| Op::Grant {
                micros,
                priority,
                paid,
                cost_basis: if paid { cost_basis } else { None },
                expires_in,
                starts_in,
                scope,
            },
        )
}

fn prefer_active() -> impl Strategy<Value = bool> {
    prop::bool::weighted(0.75)
}

fn op_strategy(huge: u32) -> impl Strategy<Value = Op> {
    let advance = prop_oneof![
        3 => 0..=60i64,
        3 => 60..=DAY_SECONDS,
        2 => DAY_SECONDS..=30 * DAY_SECONDS,
        1 => 30 * DAY_SECONDS..=100 * DAY_SECONDS,
    ];
    let new_expiry = prop_oneof![
        1 => Just(NewExpiry::Never),
        4 => (1..=60 * DAY_SECONDS).prop_map(NewExpiry::InSeconds),
        1 => Just(NewExpiry::Now),
    ];
    prop_oneof![
        5 => grant_strategy(huge),
        6 => (micros_strategy(huge), feature_strategy()).prop_map(|(micros, feature)| Op::Charge { micros, feature }),
        4 => (micros_strategy(huge), feature_strategy(), prop_oneof![1 => Just(0i64), 12 => 1..=2 * DAY_SECONDS])
            .prop_map(|(micros, feature, timeout_seconds)| Op::Hold { micros, feature, timeout_seconds }),
        4 => (any::<Index>(), part_strategy(), prefer_active())
            .prop_map(|(hold, part, prefer_active)| Op::Capture { hold, part, prefer_active }),
        3 => (any::<Index>(), prefer_active()).prop_map(|(hold, prefer_active)| Op::Release { hold, prefer_active }),
        3 => (any::<Index>(), part_strategy()).prop_map(|(charge, part)| Op::Refund { charge, part }),
        1 => any::<Index>().prop_map(|grant| Op::Void { grant }),
        2 => (any::<Index>(), new_expiry, any::<bool>())
            .prop_map(|(grant, to, prefer_expired)| Op::ChangeExpiry { grant, to, prefer_expired }),
        4 => advance.prop_map(|seconds| Op::Advance { seconds }),
        1 => Just(Op::Restart),
    ]
}

// ---------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------

/// The burn order as PRODUCT.md states it, written independently of
/// `Grant::burn_key`: higher priority first, then the earliest expiry
/// (never-expiring last), then free before paid, then oldest.
fn burns_before(a: &Grant, b: &Grant) -> Ordering {
    let by_priority = b.priority.cmp(&a.priority);
    let by_expiry = match (a.expires_at, b.expires_at) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    };
    let free_first = match (a.paid, b.paid) {
        (false, true) => Ordering::Less,
        (true, false) => Ordering::Greater,
        _ => Ordering::Equal,
    };
    by_priority
        .then(by_expiry)
        .then(free_first)
        .then(a.sequence.cmp(&b.sequence))
}

fn may_pay(grant: &Grant, feature: Option<&str>, now: i64) -> bool {
    let in_effect = grant.status == GrantStatus::Active
        && grant.effective_at.0 <= now
        && grant.expires_at.is_none_or(|expiry| now < expiry.0);
    let in_scope = match (&grant.scope, feature) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(scope), Some(feature)) => scope.iter().any(|f| f == feature),
    };
    in_effect && in_scope
}

/// Money for `credits` at `per_credit`, rounded half up to the micro-unit.
fn money(credits: i64, per_credit: i64) -> i64 {
    let product = i128::from(credits) * i128::from(per_credit);
    i64::try_from((product + i128::from(MICROS / 2)) / i128::from(MICROS)).unwrap()
}

/// A charge (or captured hold) as the store keeps it for refunds.
#[derive(Clone, Debug)]
struct ChargeRow {
    reference: Id,
    amount: i64,
    drawn: Vec<Draw>,
    refunded: i64,
    feature: Option<String>,
}

#[derive(Clone, Debug, Default)]
struct Model {
    /// Every grant, in creation order.
    grants: Vec<Grant>,
    /// Active holds.
    holds: BTreeMap<Id, Hold>,
    next_sequence: i64,
    /// Lots made by a hold giving back to a voided lot, not yet numbered.
    new_lots: Vec<Id>,
}

impl Model {
    fn grant_mut(&mut self, grant_id: &Id) -> &mut Grant {
        self.grants
            .iter_mut()
            .find(|g| &g.id == grant_id)
            .expect("model knows the grant")
    }

    fn grant(&self, grant_id: &Id) -> &Grant {
        self.grants
            .iter()
            .find(|g| &g.id == grant_id)
            .expect("model knows the grant")
    }

    fn balance(&self, now: i64) -> Balance {
        let mut available = 0;
        let mut pending = 0;
        let mut expiries: BTreeMap<i64, i64> = BTreeMap::new();
        for grant in self
            .grants
            .iter()
            .filter(|g| g.status == GrantStatus::Active)
        {
            let remaining = grant.remaining.micros();
            if grant.effective_at.0 > now {
                pending += remaining;
                continue;
            }
            available += remaining;
            if let (Some(expiry), true) = (grant.expires_at, remaining > 0) {
                *expiries.entry(expiry.0).or_default() += remaining;
            }
        }
        let held = self.holds.values().map(|h| h.amount.micros()).sum();
        Balance {
            available: amount(available),
            held: amount(held),
            pending: amount(pending),
            debt: Amount::ZERO,
            next_expiry: expiries
                .into_iter()
                .next()
                .map(|(at, total)| (Timestamp(at), amount(total))),
        }
    }

    /// Refuse `micros` more credits when every lot's remaining plus what holds
    /// reserve (all that can come back without new credits) would pass the maximum.
    fn room_for(&self, micros: i64) -> Result<(), LedgerError> {
        let remaining: i64 = self.grants.iter().map(|g| g.remaining.micros()).sum();
        let held: i64 = self.holds.values().map(|h| h.amount.micros()).sum();
        if remaining + held + micros > MAX_AMOUNT_MICROS {
            return Err(LedgerError::AmountOverflow);
        }
        Ok(())
    }

    /// Credits a hold gives back to a lot at `at`: spendable again while it
    /// is active; if it expired, they follow its remaining to `expired`
    /// (counted for a reinstatement); if it was voided, they come back as a
    /// new lot `release:<hold>:<n>` like it (unnumbered until the store numbers it),
    /// unless its expiry had passed by `at` (then they expire with it).
    fn give_back(&mut self, hold_id: &Id, grant_id: &Id, micros: i64, at: i64) {
        let grant = self.grant_mut(grant_id);
        match grant.status {
            GrantStatus::Active => grant.remaining = amount(grant.remaining.micros() + micros),
            GrantStatus::Expired => {
                grant.expired_amount = amount(grant.expired_amount.micros() + micros)
            }
            GrantStatus::Voided if grant.expires_at.is_none_or(|t| t.0 > at) => {
                let like = grant.clone();
                let id = (1..)
                    .map(|n| tally_core::ledger::derived_lot_id("release", hold_id, n))
                    .find(|id| self.grants.iter().all(|g| &g.id != id))
                    .expect("a free id");
                self.new_lots.push(id.clone());
                self.grants.push(Grant {
                    id,
                    amount: amount(micros),
                    remaining: amount(micros),
                    effective_at: Timestamp(at),
                    status: GrantStatus::Active,
                    expired_amount: Amount::ZERO,
                    expired_at: None,
                    sequence: tally_core::ledger::UNNUMBERED,
                    // Made from the voided lot's credits: priced by its payment.
                    origin: Some(like.root().clone()),
                    ..like
                });
            }
            GrantStatus::Voided => {}
        }
    }

    /// As the store numbers the ledger's new lots: in burn order.
    fn number_new_lots(&mut self, next: &mut i64) {
        let lots = std::mem::take(&mut self.new_lots);
        let mut new: Vec<usize> = (0..self.grants.len())
            .filter(|&i| lots.contains(&self.grants[i].id))
            .collect();
        new.sort_by(|&a, &b| burns_before(&self.grants[a], &self.grants[b]));
        for i in new {
            self.grants[i].sequence = *next;
            *next += 1;
        }
    }

    /// What falls due at `now`, in time order (a hold before a grant at the
    /// same instant): the (kind, reference, amount) of each entry.
    fn expire_due(&mut self, now: i64) -> Vec<(EntryKind, Id, Amount)> {
        let mut due: Vec<(i64, u8, String)> = Vec::new();
        for hold in self.holds.values().filter(|h| h.expires_at.0 <= now) {
            due.push((hold.expires_at.0, 0, hold.id.to_string()));
        }
        for grant in self
            .grants
            .iter()
            .filter(|g| g.status == GrantStatus::Active)
        {
            if let Some(expiry) = grant.expires_at.filter(|e| e.0 <= now) {
                due.push((expiry.0, 1, grant.id.to_string()));
            }
            if grant.awaiting_effect && grant.effective_at.0 <= now {
                due.push((grant.effective_at.0, 2, grant.id.to_string()));
            }
        }
        let mut due: std::collections::BinaryHeap<std::cmp::Reverse<(i64, u8, String)>> =
            due.into_iter().map(std::cmp::Reverse).collect();
        let mut entries = Vec::new();
        while let Some(std::cmp::Reverse((at, what, text))) = due.pop() {
            let due_id = Id::derived(&text);
            if what == 0 {
                let hold = self.holds.remove(&due_id).unwrap();
                let made = self.new_lots.len();
                for draw in &hold.reservations {
                    self.give_back(&hold.id, &draw.grant_id, draw.amount.micros(), at);
                }
                // A lot the timeout made that expires by now expires in this
                // sweep, in its turn.
                for lot in &self.new_lots[made..] {
                    let expiry = self
                        .grants
                        .iter()
                        .find(|g| &g.id == lot)
                        .and_then(|g| g.expires_at);
                    if let Some(expiry) = expiry.filter(|e| e.0 <= now) {
                        due.push(std::cmp::Reverse((expiry.0, 1, lot.to_string())));
                    }
                }
                entries.push((EntryKind::HoldExpired, due_id, hold.amount));
            } else if what == 2 {
                let grant = self.grant_mut(&due_id);
                grant.awaiting_effect = false;
                entries.push((EntryKind::GrantEffective, due_id, grant.remaining));
            } else {
                let grant = self.grant_mut(&due_id);
                let expired = grant.remaining;
                grant.status = GrantStatus::Expired;
                grant.expired_amount = expired;
                grant.expired_at = Some(Timestamp(at));
                grant.remaining = Amount::ZERO;
                entries.push((EntryKind::Expire, due_id, expired));
            }
        }
        entries
    }

    fn add_grant(&mut self, grant: &Grant, now: i64) -> Result<(), LedgerError> {
        if grant.amount.micros() <= 0 {
            return Err(LedgerError::AmountNotPositive);
        }
        if let Some(expiry) = grant.expires_at {
            if expiry.0 <= now {
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
        self.room_for(grant.amount.micros())?;
        // A lot that takes effect later waits for a sweep to record it.
        let mut grant = grant.clone();
        grant.awaiting_effect = grant.effective_at.0 > now;
        self.grants.push(grant);
        Ok(())
    }

    /// Which lots pay `micros` for `feature`, in burn order; nothing changes.
    fn plan(&self, micros: i64, feature: Option<&str>, now: i64) -> Result<Vec<Draw>, LedgerError> {
        if micros <= 0 {
            return Err(LedgerError::AmountNotPositive);
        }
        let mut payers: Vec<&Grant> = self
            .grants
            .iter()
            .filter(|g| may_pay(g, feature, now))
            .collect();
        payers.sort_by(|a, b| burns_before(a, b));
        let eligible: i64 = payers.iter().map(|g| g.remaining.micros()).sum();
        if eligible < micros {
            return Err(LedgerError::InsufficientCredits {
                available: amount(eligible),
                required: amount(micros),
            });
        }
        let mut left = micros;
        let mut draws = Vec::new();
        for grant in payers {
            let take = grant.remaining.micros().min(left);
            if take > 0 {
                draws.push(Draw {
                    grant_id: grant.id.clone(),
                    amount: amount(take),
                });
                left -= take;
            }
        }
        assert_eq!(left, 0);
        Ok(draws)
    }

    fn take(&mut self, draws: &[Draw]) {
        for draw in draws {
            let grant = self.grant_mut(&draw.grant_id);
            grant.remaining = amount(grant.remaining.micros() - draw.amount.micros());
        }
    }

    fn capture(
        &mut self,
        hold_id: &Id,
        requested: Option<i64>,
        now: i64,
    ) -> Result<Captured, LedgerError> {
        let held = match self.holds.get(hold_id) {
            Some(hold) => hold.amount.micros(),
            None => return Err(LedgerError::HoldNotFound(hold_id.clone())),
        };
        let capture = requested.unwrap_or(held);
        if capture <= 0 {
            return Err(LedgerError::AmountNotPositive);
        }
        if capture > held {
            return Err(LedgerError::CaptureExceedsHold {
                requested: amount(capture),
                held: amount(held),
            });
        }
        let hold = self.holds.remove(hold_id).unwrap();
        let mut left = capture;
        let mut drawn = Vec::new();
        for draw in &hold.reservations {
            let take = draw.amount.micros().min(left);
            left -= take;
            if take > 0 {
                drawn.push(Draw {
                    grant_id: draw.grant_id.clone(),
                    amount: amount(take),
                });
            }
            if draw.amount.micros() > take {
                self.give_back(hold_id, &draw.grant_id, draw.amount.micros() - take, now);
            }
        }
        Ok(Captured {
            captured: amount(capture),
            drawn,
            released: amount(held - capture),
        })
    }

    fn release(&mut self, hold_id: &Id, now: i64) -> Result<Amount, LedgerError> {
        let hold = self
            .holds
            .remove(hold_id)
            .ok_or_else(|| LedgerError::HoldNotFound(hold_id.clone()))?;
        for draw in &hold.reservations {
            self.give_back(hold_id, &draw.grant_id, draw.amount.micros(), now);
        }
        Ok(hold.amount)
    }

    /// Policy (ledger.rs): the last drawn credits go back first, to their lot
    /// while it is active, else to a new never-expiring `refund:` lot that
    /// keeps the original's paid flag, cost basis, priority and scope.
    fn refund(
        &mut self,
        charge: &ChargeRow,
        refund_id: &Id,
        requested: Option<i64>,
        now: i64,
    ) -> Result<Refunded, LedgerError> {
        let refundable = charge.amount - charge.refunded;
        let wanted = requested.unwrap_or(refundable);
        if requested.is_some() && wanted <= 0 {
            return Err(LedgerError::AmountNotPositive);
        }
        if wanted > refundable || wanted <= 0 {
            return Err(LedgerError::RefundExceedsCharge {
                requested: amount(wanted),
                refundable: amount(refundable),
            });
        }
        self.room_for(wanted)?;
        let mut already = charge.refunded;
        let mut left = wanted;
        let mut returned = Vec::new();
        let mut new_grants = Vec::new();
        for draw in charge.drawn.iter().rev() {
            let skip = already.min(draw.amount.micros());
            already -= skip;
            let give = (draw.amount.micros() - skip).min(left);
            if give == 0 {
                continue;
            }
            left -= give;
            let original = self.grant(&draw.grant_id).clone();
            if original.status == GrantStatus::Active {
                let grant = self.grant_mut(&draw.grant_id);
                grant.remaining = amount(grant.remaining.micros() + give);
                returned.push(Draw {
                    grant_id: draw.grant_id.clone(),
                    amount: amount(give),
                });
            } else {
                let new_id = Id::derived(&format!("refund:{refund_id}:{}", new_grants.len() + 1));
                self.grants.push(Grant {
                    id: new_id.clone(),
                    amount: amount(give),
                    remaining: amount(give),
                    source: Source::Refund,
                    effective_at: Timestamp(now),
                    expires_at: None,
                    status: GrantStatus::Active,
                    expired_amount: Amount::ZERO,
                    expired_at: None,
                    sequence: self.next_sequence,
                    origin: Some(original.root().clone()),
                    ..original
                });
                self.next_sequence += 1;
                returned.push(Draw {
                    grant_id: new_id.clone(),
                    amount: amount(give),
                });
                new_grants.push(new_id);
            }
        }
        assert_eq!(left, 0, "model refund found its draws");
        Ok(Refunded {
            amount: amount(wanted),
            returned,
            new_grants,
        })
    }

    fn void(&mut self, grant_id: &Id) -> Result<Voided, LedgerError> {
        let grant = self.grant_mut(grant_id);
        if grant.status != GrantStatus::Active {
            return Err(LedgerError::GrantNotActive {
                grant_id: grant_id.clone(),
                status: grant.status.as_str(),
            });
        }
        let voided = grant.remaining;
        grant.remaining = Amount::ZERO;
        grant.status = GrantStatus::Voided;
        // Voided before it took effect: nothing is left to take effect.
        grant.awaiting_effect = false;
        let refundable_money = grant.cost_basis.as_ref().map(|basis| {
            (
                amount(money(voided.micros(), basis.per_credit.micros())),
                basis.currency.clone(),
            )
        });
        Ok(Voided {
            voided,
            refundable_money,
        })
    }

    fn change_expiry(
        &mut self,
        grant_id: &Id,
        to: Option<i64>,
        now: i64,
    ) -> Result<(EntryKind, Amount), LedgerError> {
        if to.is_some_and(|at| at <= now) {
            return Err(LedgerError::InvalidExpiry(
                "the new expires_at must be in the future",
            ));
        }
        let room = self.room_for(self.grant(grant_id).expired_amount.micros());
        let grant = self.grant_mut(grant_id);
        match grant.status {
            GrantStatus::Voided => Err(LedgerError::GrantNotActive {
                grant_id: grant_id.clone(),
                status: "voided",
            }),
            GrantStatus::Active => {
                let later = match (grant.expires_at, to) {
                    (None, _) => false,
                    (Some(_), None) => true,
                    (Some(old), Some(new)) => new > old.0,
                };
                if !later {
                    return Err(LedgerError::InvalidExpiry(
                        "the new expires_at must be later than the current one",
                    ));
                }
                grant.expires_at = to.map(Timestamp);
                Ok((EntryKind::ExpiryExtended, Amount::ZERO))
            }
            GrantStatus::Expired => {
                let expired_at = grant.expired_at.expect("expired grants know when");
                if now - expired_at.0 > REINSTATE_WINDOW_MICROS {
                    return Err(LedgerError::ReinstateWindowPassed(grant_id.clone()));
                }
                room?;
                let restored = grant.expired_amount;
                grant.remaining = restored;
                grant.expired_amount = Amount::ZERO;
                grant.expired_at = None;
                grant.status = GrantStatus::Active;
                grant.expires_at = to.map(Timestamp);
                Ok((EntryKind::Reinstate, restored))
            }
        }
    }
}

/// The same refusal; the wording of `InvalidExpiry` is not compared.
fn assert_same_refusal(actual: &LedgerError, expected: &LedgerError, what: &str) {
    match (actual, expected) {
        (LedgerError::InvalidExpiry(_), LedgerError::InvalidExpiry(_)) => {}
        _ => assert_eq!(
            actual, expected,
            "{what}: refused differently than the model"
        ),
    }
}

// ---------------------------------------------------------------------------
// The harness: the ledger under test, the model, the journal and the store's rows
// ---------------------------------------------------------------------------

struct Harness {
    customer: Id,
    now: i64,
    ledger: CustomerLedger,
    model: Model,
    /// Every posting replayed: the balance of each account.
    accounts: HashMap<Account, i64>,
    /// The rows `take_changes` handed out, as a store would keep them.
    stored_grants: HashMap<Id, Grant>,
    stored_holds: HashMap<Id, Hold>,
    /// The store's sequence counter (the model keeps its own).
    next_sequence: i64,
    counter: u64,
    grant_ids: Vec<Id>,
    /// Every hold id ever tried, with its amount.
    holds_tried: Vec<(Id, i64)>,
    charges: Vec<ChargeRow>,
}

/// The ledger's observable state, to show a refused operation changed nothing.
#[derive(Debug, PartialEq)]
struct Snapshot {
    grants: Vec<Grant>,
    holds: Vec<Hold>,
    balance: Balance,
}

impl Harness {
    fn new() -> Harness {
        let customer = id("cus_1");
        Harness {
            ledger: CustomerLedger::new(customer.clone()),
            customer,
            now: START,
            model: Model::default(),
            accounts: HashMap::new(),
            stored_grants: HashMap::new(),
            stored_holds: HashMap::new(),
            next_sequence: 0,
            counter: 0,
            grant_ids: Vec::new(),
            holds_tried: Vec::new(),
            charges: Vec::new(),
        }
    }

    fn fresh_id(&mut self, prefix: &str) -> Id {
        self.counter += 1;
        id(&format!("{prefix}{}", self.counter))
    }

    fn snapshot(&self) -> Snapshot {
        let mut holds: Vec<Hold> = self.ledger.active_holds().cloned().collect();
        holds.sort_by(|a, b| a.id.cmp(&b.id));
        Snapshot {
            grants: self.ledger.grants().to_vec(),
            holds,
            balance: self.ledger.balance(Timestamp(self.now)),
        }
    }

    /// Replay an entry's postings into the account balances.
    fn post(&mut self, entry: &EntryDraft) {
        assert_eq!(entry.customer_id, self.customer);
        for posting in &entry.postings {
            assert!(
                posting.amount.is_positive(),
                "posting of {} in {entry:?}",
                posting.amount
            );
            assert_ne!(posting.from, posting.to, "posting to itself in {entry:?}");
            *self.accounts.entry(posting.from.clone()).or_default() -= posting.amount.micros();
            *self.accounts.entry(posting.to.clone()).or_default() += posting.amount.micros();
        }
    }

    /// Apply the rows the ledger reports changed; with `refused`, a row that
    /// differs from what the store already holds is an error.
    fn store_changes(&mut self, refused: bool) {
        // The store numbers the lots the ledger made on its own, and so does the model.
        let first = self.next_sequence;
        self.ledger.number_new_lots(&mut self.next_sequence);
        let mut model_next = first;
        self.model.number_new_lots(&mut model_next);
        assert_eq!(model_next, self.next_sequence, "new lots numbered alike");
        self.model.next_sequence = self.next_sequence;
        let changes = self.ledger.take_changes();
        for grant in changes.grants {
            if refused {
                assert_eq!(
                    self.stored_grants.get(&grant.id),
                    Some(&grant),
                    "a refused operation changed a grant"
                );
            }
            self.stored_grants.insert(grant.id.clone(), grant);
        }
        for hold in changes.holds {
            if refused {
                assert_eq!(
                    self.stored_holds.get(&hold.id),
                    Some(&hold),
                    "a refused operation changed a hold"
                );
            }
            self.stored_holds.insert(hold.id.clone(), hold);
        }
    }

    fn step(&mut self, op: &Op) {
        if let Op::Advance { seconds } = op {
            self.now += seconds * SECOND;
        }
        let now = Timestamp(self.now);

        let due = self.ledger.expire_due(now);
        let expected_due = self.model.expire_due(self.now);
        let got_due: Vec<(EntryKind, Id, Amount)> = due
            .iter()
            .map(|e| (e.kind, e.reference.clone().unwrap(), e.amount))
            .collect();
        assert_eq!(
            got_due, expected_due,
            "expire_due at {} disagrees with the model",
            self.now
        );
        for entry in &due {
            self.post(entry);
            assert!(
                entry.effective_at.0 <= self.now,
                "expiry effective in the future: {entry:?}"
            );
        }
        if let Some(last) = due.last() {
            assert_eq!(
                last.balance_after,
                self.ledger.balance(now).available,
                "balance_after of the last expiry"
            );
        }
        // Each expiry steps the balance down by what it expired (a hold's
        // timeout returns its credits and moves nothing out of the balance's
        // lots, unless they expired in the same sweep).
        for pair in due.windows(2) {
            if pair[1].kind == EntryKind::Expire {
                assert_eq!(
                    pair[1].balance_after.checked_add(pair[1].amount),
                    Some(pair[0].balance_after),
                    "consecutive expiries in one sweep: {pair:?}"
                );
            }
        }
        assert!(
            self.ledger.expire_due(now).is_empty(),
            "expire_due twice at one instant did something"
        );
        self.store_changes(false);

        let before = self.snapshot();
        let outcome = self.apply(op);
        match outcome {
            Some(Ok(entry)) => {
                self.post(&entry);
                assert_eq!(
                    entry.balance_after,
                    self.ledger.balance(now).available,
                    "balance_after of {entry:?}"
                );
                self.store_changes(false);
            }
            Some(Err(error)) => {
                assert_eq!(
                    self.snapshot(),
                    before,
                    "refused with {error:?} but the ledger changed"
                );
                self.store_changes(true);
            }
            None => self.store_changes(false),
        }
        self.check();
    }

    /// Run one operation on the ledger and on the model, compare their
    /// answers and return the ledger's entry or refusal (`None`: nothing to do).
    fn apply(&mut self, op: &Op) -> Option<Result<EntryDraft, LedgerError>> {
        let now = self.now;
        match op {
            Op::Advance { .. } => None,
            Op::Restart => {
                let grants = self.stored_grants.values().cloned().collect();
                let holds = self.stored_holds.values().cloned().collect();
                self.ledger = CustomerLedger::from_parts(self.customer.clone(), grants, holds);
                None
            }
            Op::Grant {
                micros,
                priority,
                paid,
                cost_basis,
                expires_in,
                starts_in,
                scope,
            } => {
                let grant_id = self.fresh_id("g");
                let grant = Grant {
                    id: grant_id.clone(),
                    customer_id: self.customer.clone(),
                    amount: amount(*micros),
                    remaining: amount(*micros),
                    source: if *paid {
                        Source::Purchase
                    } else {
                        Source::Promotion
                    },
                    paid: *paid,
                    cost_basis: cost_basis.map(|(per_credit, currency)| CostBasis {
                        per_credit: Amount::parse(per_credit).unwrap(),
                        currency: currency.to_string(),
                    }),
                    priority: *priority,
                    effective_at: Timestamp(now + starts_in * SECOND),
                    expires_at: expires_in.map(|seconds| Timestamp(now + seconds * SECOND)),
                    scope: scope
                        .as_ref()
                        .map(|s| s.iter().map(|f| f.to_string()).collect()),
                    status: GrantStatus::Active,
                    expired_amount: Amount::ZERO,
                    expired_at: None,
                    sequence: self.next_sequence,
                    awaiting_effect: false,
                    origin: None,
                };
                let expected = self.model.add_grant(&grant, now);
                let actual =
                    self.ledger
                        .add_grant(grant.clone(), Some("test".into()), Timestamp(now));
                self.next_sequence += 1;
                self.model.next_sequence = self.next_sequence;
                Some(match (actual, expected) {
                    (Ok(entry), Ok(())) => {
                        self.grant_ids.push(grant_id.clone());
                        assert_eq!(entry.kind, EntryKind::Grant);
                        assert_eq!(entry.amount, grant.amount);
                        assert_eq!(entry.postings.len(), 1);
                        assert_eq!(entry.postings[0].from, Account::Issued(grant.source));
                        // Credits that take effect later wait in `pending:`.
                        let into = if grant.effective_at.0 > now {
                            Account::Pending(grant_id)
                        } else {
                            Account::Grant(grant_id)
                        };
                        assert_eq!(entry.postings[0].to, into);
                        Ok(entry)
                    }
                    (Err(actual), Err(expected)) => {
                        assert_same_refusal(&actual, &expected, "add_grant");
                        Err(actual)
                    }
                    (actual, expected) => {
                        panic!("add_grant: ledger {actual:?}, model {expected:?}")
                    }
                })
            }
            Op::Charge { micros, feature } => {
                let spend = self.spend("c", *micros, *feature);
                let expected = self.model.plan(*micros, *feature, now);
                let actual = self.ledger.charge(&spend, Timestamp(now));
                Some(match (actual, expected) {
                    (Ok((drawn, entry)), Ok(planned)) => {
                        assert_eq!(
                            drawn, planned,
                            "charge {micros} for {feature:?}: drawn differs from burn order"
                        );
                        self.model.take(&planned);
                        self.check_spend_entry(&entry, EntryKind::Charge, &spend, &drawn);
                        self.charges.push(ChargeRow {
                            reference: spend.reference.clone(),
                            amount: *micros,
                            drawn,
                            refunded: 0,
                            feature: spend.feature.clone(),
                        });
                        Ok(entry)
                    }
                    (Err(actual), Err(expected)) => {
                        assert_same_refusal(&actual, &expected, "charge");
                        Err(actual)
                    }
                    (actual, expected) => {
                        panic!("charge {micros}: ledger {actual:?}, model {expected:?}")
                    }
                })
            }
            Op::Hold {
                micros,
                feature,
                timeout_seconds,
            } => {
                let spend = self.spend("h", *micros, *feature);
                self.holds_tried.push((spend.reference.clone(), *micros));
                let expires_at = Timestamp(now + timeout_seconds * SECOND);
                let expected = if expires_at.0 <= now {
                    Err(LedgerError::InvalidExpiry(
                        "a hold's timeout must be in the future",
                    ))
                } else {
                    self.model.plan(*micros, *feature, now)
                };
                let actual = self.ledger.place_hold(&spend, expires_at, Timestamp(now));
                Some(match (actual, expected) {
                    (Ok((hold, entry)), Ok(planned)) => {
                        assert_eq!(
                            hold.reservations, planned,
                            "hold {micros} for {feature:?}: reserved differs"
                        );
                        assert_eq!(hold.status, HoldStatus::Active);
                        assert_eq!(hold.amount, spend.amount);
                        assert_eq!(hold.expires_at, expires_at);
                        self.model.take(&planned);
                        self.model.holds.insert(hold.id.clone(), hold.clone());
                        self.check_spend_entry(&entry, EntryKind::Hold, &spend, &planned);
                        Ok(entry)
                    }
                    (Err(actual), Err(expected)) => {
                        assert_same_refusal(&actual, &expected, "place_hold");
                        Err(actual)
                    }
                    (actual, expected) => {
                        panic!("hold {micros}: ledger {actual:?}, model {expected:?}")
                    }
                })
            }
            Op::Capture {
                hold,
                part,
                prefer_active,
            } => {
                let (hold_id, held) = self.pick_hold(hold, *prefer_active)?;
                let requested = part.of(held);
                let expected = self.model.capture(&hold_id, requested, now);
                let actual =
                    self.ledger
                        .capture(&hold_id, requested.map(amount), None, Timestamp(now));
                Some(match (actual, expected) {
                    (Ok((captured, entry)), Ok(model_captured)) => {
                        assert_eq!(captured, model_captured, "capture of {hold_id}");
                        assert_eq!(entry.kind, EntryKind::Capture);
                        assert_eq!(entry.amount, captured.captured);
                        let feature = self.stored_holds[&hold_id].feature.clone();
                        self.charges.push(ChargeRow {
                            reference: hold_id,
                            amount: captured.captured.micros(),
                            drawn: captured.drawn,
                            refunded: 0,
                            feature,
                        });
                        Ok(entry)
                    }
                    (Err(actual), Err(expected)) => {
                        assert_same_refusal(&actual, &expected, "capture");
                        Err(actual)
                    }
                    (actual, expected) => {
                        panic!("capture {hold_id}: ledger {actual:?}, model {expected:?}")
                    }
                })
            }
            Op::Release {
                hold,
                prefer_active,
            } => {
                let (hold_id, _) = self.pick_hold(hold, *prefer_active)?;
                let expected = self.model.release(&hold_id, now);
                let actual = self.ledger.release(&hold_id, None, Timestamp(now));
                Some(match (actual, expected) {
                    (Ok((released, entry)), Ok(model_released)) => {
                        assert_eq!(released, model_released);
                        assert_eq!((entry.kind, entry.amount), (EntryKind::Release, released));
                        Ok(entry)
                    }
                    (Err(actual), Err(expected)) => {
                        assert_same_refusal(&actual, &expected, "release");
                        Err(actual)
                    }
                    (actual, expected) => {
                        panic!("release {hold_id}: ledger {actual:?}, model {expected:?}")
                    }
                })
            }
            Op::Refund { charge, part } => {
                if self.charges.is_empty() {
                    return None;
                }
                let index = charge.index(self.charges.len());
                let row = self.charges[index].clone();
                let refundable = row.amount - row.refunded;
                let requested = part.of(refundable);
                let refund_id = self.fresh_id("r");
                let record = ChargeRecord {
                    reference: row.reference.clone(),
                    customer_id: self.customer.clone(),
                    amount: amount(row.amount),
                    drawn: row.drawn.clone(),
                    refunded: amount(row.refunded),
                    feature: row.feature.clone(),
                    on_debt: Amount::ZERO,
                };
                let expected = self.model.refund(&row, &refund_id, requested, now);
                let actual = self.ledger.refund(
                    &record,
                    &refund_id,
                    requested.map(amount),
                    None,
                    &mut self.next_sequence,
                    Timestamp(now),
                );
                assert_eq!(
                    self.next_sequence, self.model.next_sequence,
                    "refund numbered its grants differently"
                );
                Some(match (actual, expected) {
                    (Ok((refunded, entry)), Ok(model_refunded)) => {
                        assert_eq!(refunded, model_refunded, "refund of {}", row.reference);
                        assert_eq!(
                            (entry.kind, entry.amount),
                            (EntryKind::Refund, refunded.amount)
                        );
                        let consumed = Account::Consumed(row.feature.clone());
                        let postings: Vec<(Account, Account, Amount)> = entry
                            .postings
                            .iter()
                            .map(|p| (p.from.clone(), p.to.clone(), p.amount))
                            .collect();
                        let expected_postings: Vec<(Account, Account, Amount)> = refunded
                            .returned
                            .iter()
                            .map(|d| {
                                (
                                    consumed.clone(),
                                    Account::Grant(d.grant_id.clone()),
                                    d.amount,
                                )
                            })
                            .collect();
                        assert_eq!(postings, expected_postings);
                        self.grant_ids.extend(refunded.new_grants.iter().cloned());
                        self.charges[index].refunded += refunded.amount.micros();
                        Ok(entry)
                    }
                    (Err(actual), Err(expected)) => {
                        assert_same_refusal(&actual, &expected, "refund");
                        Err(actual)
                    }
                    (actual, expected) => panic!(
                        "refund of {}: ledger {actual:?}, model {expected:?}",
                        row.reference
                    ),
                })
            }
            Op::Void { grant } => {
                if self.grant_ids.is_empty() {
                    return None;
                }
                let grant_id = self.grant_ids[grant.index(self.grant_ids.len())].clone();
                let reference = self.fresh_id("v");
                let expected = self.model.void(&grant_id);
                let actual = self
                    .ledger
                    .void(&grant_id, &reference, None, Timestamp(now));
                Some(match (actual, expected) {
                    (Ok((voided, entry)), Ok(model_voided)) => {
                        assert_eq!(voided, model_voided, "void of {grant_id}");
                        assert_eq!((entry.kind, entry.amount), (EntryKind::Void, voided.voided));
                        Ok(entry)
                    }
                    (Err(actual), Err(expected)) => {
                        assert_same_refusal(&actual, &expected, "void");
                        Err(actual)
                    }
                    (actual, expected) => {
                        panic!("void {grant_id}: ledger {actual:?}, model {expected:?}")
                    }
                })
            }
            Op::ChangeExpiry {
                grant,
                to,
                prefer_expired,
            } => {
                let expired: Vec<Id> = self
                    .grant_ids
                    .iter()
                    .filter(|g| self.model.grant(g).status == GrantStatus::Expired)
                    .cloned()
                    .collect();
                let candidates = if *prefer_expired && !expired.is_empty() {
                    &expired
                } else {
                    &self.grant_ids
                };
                if candidates.is_empty() {
                    return None;
                }
                let grant_id = candidates[grant.index(candidates.len())].clone();
                let new_expiry = match to {
                    NewExpiry::Never => None,
                    NewExpiry::InSeconds(seconds) => Some(now + seconds * SECOND),
                    NewExpiry::Now => Some(now),
                };
                let reference = self.fresh_id("x");
                let expected = self.model.change_expiry(&grant_id, new_expiry, now);
                let actual = self.ledger.change_expiry(
                    &grant_id,
                    new_expiry.map(Timestamp),
                    &reference,
                    None,
                    Timestamp(now),
                );
                Some(match (actual, expected) {
                    (Ok((restored, entry)), Ok((kind, model_restored))) => {
                        assert_eq!(
                            (entry.kind, restored, entry.amount),
                            (kind, model_restored, model_restored)
                        );
                        Ok(entry)
                    }
                    (Err(actual), Err(expected)) => {
                        assert_same_refusal(&actual, &expected, "change_expiry");
                        Err(actual)
                    }
                    (actual, expected) => {
                        panic!("change_expiry {grant_id}: ledger {actual:?}, model {expected:?}")
                    }
                })
            }
        }
    }

    /// A hold id and its amount: one still active, or any ever tried (placed,
    /// refused, resolved or timed out), which the ledger must not find.
    fn pick_hold(&self, index: &Index, prefer_active: bool) -> Option<(Id, i64)> {
        let active: Vec<(Id, i64)> = self
            .holds_tried
            .iter()
            .filter(|(h, _)| self.model.holds.contains_key(h))
            .cloned()
            .collect();
        let candidates = if prefer_active && !active.is_empty() {
            &active
        } else {
            &self.holds_tried
        };
        (!candidates.is_empty()).then(|| candidates[index.index(candidates.len())].clone())
    }

    fn spend(&mut self, prefix: &str, micros: i64, feature: Option<&str>) -> Spend {
        Spend {
            reference: self.fresh_id(prefix),
            amount: amount(micros),
            feature: feature.map(str::to_string),
            member_id: None,
            reason: None,
        }
    }

    /// A charge or hold entry moves exactly what was drawn, only out of lots
    /// in effect at `now` that may pay for the feature.
    fn check_spend_entry(
        &self,
        entry: &EntryDraft,
        kind: EntryKind,
        spend: &Spend,
        drawn: &[Draw],
    ) {
        assert_eq!(entry.kind, kind);
        assert_eq!(entry.amount, spend.amount);
        assert_eq!(entry.reference.as_ref(), Some(&spend.reference));
        let to = match kind {
            EntryKind::Hold => Account::Hold(spend.reference.clone()),
            _ => Account::Consumed(spend.feature.clone()),
        };
        let expected: Vec<(Account, Account, Amount)> = drawn
            .iter()
            .map(|d| (Account::Grant(d.grant_id.clone()), to.clone(), d.amount))
            .collect();
        let postings: Vec<(Account, Account, Amount)> = entry
            .postings
            .iter()
            .map(|p| (p.from.clone(), p.to.clone(), p.amount))
            .collect();
        assert_eq!(postings, expected);
        let total: i64 = entry.postings.iter().map(|p| p.amount.micros()).sum();
        assert_eq!(total, spend.amount.micros());
        for posting in &entry.postings {
            let Account::Grant(grant_id) = &posting.from else {
                panic!("spend from {:?}", posting.from)
            };
            let grant = self.ledger.grant(grant_id).expect("drawn grant exists");
            assert_eq!(
                grant.status,
                GrantStatus::Active,
                "drew on {} grant {grant_id}",
                grant.status.as_str()
            );
            assert!(
                grant.effective_at.0 <= self.now,
                "drew on {grant_id} before its effective_at"
            );
            assert!(
                grant.expires_at.is_none_or(|e| self.now < e.0),
                "drew on expired {grant_id}"
            );
            assert!(
                grant.covers(spend.feature.as_deref()),
                "drew on {grant_id} outside its scope"
            );
        }
    }

    fn balance_of(&self, account: &Account) -> i64 {
        self.accounts.get(account).copied().unwrap_or(0)
    }

    /// Every invariant of PRODUCT.md that concerns one customer.
    fn check(&self) {
        let now = Timestamp(self.now);
        self.ledger.check_invariants().unwrap();
        let balance = self.ledger.balance(now);

        // The model agrees on the balance, every grant and every active hold.
        assert_eq!(
            balance,
            self.model.balance(self.now),
            "balance differs from the model"
        );
        assert_eq!(self.ledger.grants().len(), self.model.grants.len());
        for grant in &self.model.grants {
            assert_eq!(
                self.ledger.grant(&grant.id),
                Some(grant),
                "grant differs from the model"
            );
        }
        let mut holds: Vec<&Hold> = self.ledger.active_holds().collect();
        holds.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(
            holds,
            self.model.holds.values().collect::<Vec<_>>(),
            "active holds differ from the model"
        );

        // No overspend; grants within [0, amount].
        assert!(
            !balance.available.is_negative()
                && !balance.pending.is_negative()
                && !balance.held.is_negative()
        );
        for grant in self.ledger.grants() {
            assert!(
                !grant.remaining.is_negative() && grant.remaining <= grant.amount,
                "grant {grant:?}"
            );
            if grant.status != GrantStatus::Active {
                assert!(
                    grant.remaining.is_zero(),
                    "dead grant keeps credits: {grant:?}"
                );
            }
        }

        // Conservation, from the postings alone.
        let mut grant_total = 0;
        let mut hold_total = 0;
        let (mut issued, mut consumed) = (0, 0);
        for (account, &micros) in &self.accounts {
            match account {
                Account::Grant(grant_id) | Account::Pending(grant_id) => {
                    let grant = self.ledger.grant(grant_id).expect("posted grant exists");
                    // A lot's credits wait in `pending:` until the ledger
                    // records it taking effect, then sit in `grant:`.
                    let waiting = matches!(account, Account::Pending(_));
                    let expected = if grant.status == GrantStatus::Active
                        && grant.awaiting_effect == waiting
                    {
                        grant.remaining.micros()
                    } else {
                        0
                    };
                    assert_eq!(
                        micros, expected,
                        "account of {:?} grant {grant_id}",
                        grant.status
                    );
                    grant_total += micros;
                }
                Account::Hold(hold_id) => {
                    let expected = self
                        .ledger
                        .active_hold(hold_id)
                        .map_or(0, |h| h.amount.micros());
                    assert_eq!(micros, expected, "account of hold {hold_id}");
                    hold_total += micros;
                }
                Account::Issued(_) => issued -= micros,
                Account::Consumed(_) => consumed += micros,
                Account::Expired | Account::Voided => assert!(micros >= 0, "{account} is {micros}"),
                // The block policy of these cases never lends.
                Account::Debt => assert_eq!(micros, 0, "debt under the block policy"),
                // The model never transfers between customers.
                Account::Transfer(_) => panic!("no transfers in the model: {account}"),
            }
        }
        for grant in self
            .ledger
            .grants()
            .iter()
            .filter(|g| g.status == GrantStatus::Active)
        {
            assert_eq!(
                grant.remaining.micros(),
                self.balance_of(&Account::Grant(grant.id.clone()))
                    + self.balance_of(&Account::Pending(grant.id.clone()))
            );
        }
        for hold in self.ledger.active_holds() {
            assert_eq!(
                hold.amount.micros(),
                self.balance_of(&Account::Hold(hold.id.clone()))
            );
        }
        assert_eq!(
            grant_total,
            balance.available.micros() + balance.pending.micros(),
            "grants vs balance"
        );
        assert_eq!(hold_total, balance.held.micros(), "holds vs balance");
        let expired = self.balance_of(&Account::Expired);
        let voided = self.balance_of(&Account::Voided);
        assert!(consumed >= 0);
        assert_eq!(
            issued - consumed - expired - voided,
            balance.available.micros() + balance.pending.micros() + balance.held.micros(),
            "issued - consumed - expired - voided is not the balance"
        );
        assert_eq!(self.accounts.values().sum::<i64>(), 0);

        // The rows handed out by take_changes are the ledger's state.
        assert_eq!(self.stored_grants.len(), self.ledger.grants().len());
        for grant in self.ledger.grants() {
            assert_eq!(
                self.stored_grants.get(&grant.id),
                Some(grant),
                "stored grant row is stale"
            );
        }
        let stored_active: BTreeMap<&Id, &Hold> = self
            .stored_holds
            .iter()
            .filter(|(_, h)| h.status == HoldStatus::Active)
            .collect();
        let active: BTreeMap<&Id, &Hold> = self.ledger.active_holds().map(|h| (&h.id, h)).collect();
        assert_eq!(stored_active, active, "stored hold rows are stale");
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        // Integration tests have no lib.rs beside them: keep regressions next to this file.
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_operations_keep_every_invariant(ops in prop::collection::vec(op_strategy(1), 1..=60)) {
        let mut harness = Harness::new();
        for op in &ops {
            harness.step(op);
        }
    }

    /// The same, with many amounts near the one-trillion maximum, so that held,
    /// refunded and reinstated credits meet it.
    #[test]
    fn operations_near_the_maximum_keep_every_invariant(ops in prop::collection::vec(op_strategy(20), 1..=60)) {
        let mut harness = Harness::new();
        for op in &ops {
            harness.step(op);
        }
    }
}

/// A hold resolves once: after a capture, a release or a timeout, neither a
/// capture nor a release finds it again, and the balance does not move.
#[test]
fn a_resolved_hold_cannot_be_resolved_again() {
    let mut harness = Harness::new();
    let grant = Op::Grant {
        micros: 100 * MICROS,
        priority: 0,
        paid: false,
        cost_basis: None,
        expires_in: None,
        starts_in: 0,
        scope: None,
    };
    harness.step(&grant);
    let hold = |timeout_seconds| Op::Hold {
        micros: 10 * MICROS,
        feature: None,
        timeout_seconds,
    };
    for op in [hold(60), hold(60), hold(60)] {
        harness.step(&op);
    }
    // Resolve each hold one way, then try every way again on each.
    let (captured, released, timed_out) = (
        harness.holds_tried[0].0.clone(),
        harness.holds_tried[1].0.clone(),
        harness.holds_tried[2].0.clone(),
    );
    harness
        .ledger
        .capture(&captured, None, None, Timestamp(harness.now))
        .unwrap();
    harness
        .ledger
        .release(&released, None, Timestamp(harness.now))
        .unwrap();
    let later = Timestamp(harness.now + 61 * SECOND);
    assert_eq!(harness.ledger.expire_due(later).len(), 1);
    let before = harness.ledger.balance(later);
    for hold_id in [&captured, &released, &timed_out] {
        assert_eq!(
            harness.ledger.capture(hold_id, None, None, later),
            Err(LedgerError::HoldNotFound(hold_id.clone()))
        );
        assert_eq!(
            harness.ledger.release(hold_id, None, later),
            Err(LedgerError::HoldNotFound(hold_id.clone()))
        );
    }
    assert_eq!(harness.ledger.balance(later), before);
    assert_eq!(before.available, amount(90 * MICROS));
}
