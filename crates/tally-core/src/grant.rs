//! Credit lots (grants) and the burn order that decides which lot pays first.

use std::cmp::Reverse;

use serde::{Deserialize, Serialize};

use crate::{Amount, Id, Timestamp};

/// Where a grant's credits came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Purchase,
    PlanAllocation,
    Promotion,
    Refund,
    Adjustment,
    Transfer,
    /// Unused plan credits carried into the next period.
    Rollover,
}

impl Source {
    pub const ALL: [Source; 7] = [
        Source::Purchase,
        Source::PlanAllocation,
        Source::Promotion,
        Source::Refund,
        Source::Adjustment,
        Source::Transfer,
        Source::Rollover,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Purchase => "purchase",
            Source::PlanAllocation => "plan_allocation",
            Source::Promotion => "promotion",
            Source::Refund => "refund",
            Source::Adjustment => "adjustment",
            Source::Transfer => "transfer",
            Source::Rollover => "rollover",
        }
    }

    pub fn parse(text: &str) -> Option<Source> {
        Source::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// Money paid per credit, in micro-units of `currency`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CostBasis {
    pub per_credit: Amount,
    pub currency: String,
}

impl CostBasis {
    /// The money value of `credits` at this cost basis, rounded half up to
    /// the currency's smallest unit (a cent, a yen); `None` on overflow.
    /// What voiding the credits of one purchase gives back is the difference
    /// of two such values (all its credits voided so far, with and without
    /// these), so that its voids add up to the purchase's value.
    pub fn payable_value_of(&self, credits: Amount) -> Option<Amount> {
        let product =
            i128::from(credits.micros()).checked_mul(i128::from(self.per_credit.micros()))?;
        let micros = crate::currency::round_to_minor_unit(
            product,
            i128::from(crate::amount::MICROS_PER_UNIT),
            &self.currency,
        )?;
        Amount::from_micros(i64::try_from(micros).ok()?)
    }

    /// The money value of `credits` at this cost basis, rounded half up to the
    /// micro-unit of the currency; `None` on overflow.
    pub fn value_of(&self, credits: Amount) -> Option<Amount> {
        let product =
            i128::from(credits.micros()).checked_mul(i128::from(self.per_credit.micros()))?;
        let micro = i128::from(crate::amount::MICROS_PER_UNIT);
        let rounded = (product + micro / 2).div_euclid(micro);
        Amount::from_micros(i64::try_from(rounded).ok()?)
    }
}

/// The life of a grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantStatus {
    Active,
    Expired,
    Voided,
}

impl GrantStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantStatus::Active => "active",
            GrantStatus::Expired => "expired",
            GrantStatus::Voided => "voided",
        }
    }

    pub fn parse(text: &str) -> Option<GrantStatus> {
        [
            GrantStatus::Active,
            GrantStatus::Expired,
            GrantStatus::Voided,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

/// A lot of credits held by one customer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub id: Id,
    pub customer_id: Id,
    /// What was granted; never changes.
    pub amount: Amount,
    /// What is left to spend or hold; always within `[0, amount]`.
    pub remaining: Amount,
    pub source: Source,
    pub paid: bool,
    pub cost_basis: Option<CostBasis>,
    pub priority: i32,
    pub effective_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    /// The features this grant may pay for; `None` pays for anything.
    pub scope: Option<Vec<String>>,
    pub status: GrantStatus,
    /// What expired when the grant expired; what a reinstatement gives back.
    pub expired_amount: Amount,
    pub expired_at: Option<Timestamp>,
    /// Creation order within the whole ledger: the last tie-break of the burn order.
    pub sequence: i64,
    /// Issued with `effective_at` ahead and not yet taken effect in the
    /// ledger: its credits sit in `pending:<id>` until a sweep at or after
    /// `effective_at` moves them to `grant:<id>` in a `grant_effective` entry
    /// (so the balance history shows when they came). Lots stored before
    /// this existed read as false.
    #[serde(default)]
    pub awaiting_effect: bool,
    /// For a lot the ledger made from another's credits (a refund's or a
    /// hold's return to a lot voided or expired meanwhile): the lot they were
    /// bought or granted in, the first of such a chain. Its payment (a
    /// top-up's) prices what voiding this lot gives back, with the lot's own,
    /// so the refunds of a purchase add up to its payment exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Id>,
}

impl Grant {
    /// The lot this one's credits were first granted in: its `origin`, or
    /// itself.
    pub fn root(&self) -> &Id {
        self.origin.as_ref().unwrap_or(&self.id)
    }
}

/// The sort key of the burn order: higher priority first, then the earliest
/// expiry (never-expiring last), then free before paid, then oldest.
pub type BurnKey = (Reverse<i32>, i64, bool, i64);

impl Grant {
    /// Expired before its `expires_at`: ended early by a plan change or a
    /// cancellation ([`crate::CustomerLedger::end_grant`]), not by time.
    pub fn ended_early(&self) -> bool {
        match (self.expired_at, self.expires_at) {
            (Some(expired), Some(expires)) => expired < expires,
            (Some(_), None) => true,
            _ => false,
        }
    }

    pub fn burn_key(&self) -> BurnKey {
        (
            Reverse(self.priority),
            self.expires_at.map_or(i64::MAX, Timestamp::micros),
            self.paid,
            self.sequence,
        )
    }

    /// Whether this grant may pay for `feature` (`None`: a charge by amount).
    pub fn covers(&self, feature: Option<&str>) -> bool {
        match (&self.scope, feature) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(scope), Some(feature)) => scope.iter().any(|f| f == feature),
        }
    }

    /// Active, already in effect and not yet expired at `now`. A lot whose
    /// taking effect the ledger has not recorded yet (`awaiting_effect`) is
    /// not: its credits are still in `pending:` until the sweep moves them
    /// (every command sweeps first, so this only orders a sweep's steps).
    pub fn in_effect(&self, now: Timestamp) -> bool {
        self.status == GrantStatus::Active
            && !self.awaiting_effect
            && self.effective_at <= now
            && self.expires_at.is_none_or(|expiry| now < expiry)
    }

    /// The status a client sees: `pending` before effective_at.
    pub fn display_status(&self, now: Timestamp) -> &'static str {
        if self.status == GrantStatus::Active && now < self.effective_at {
            "pending"
        } else {
            self.status.as_str()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(id: &str, priority: i32, expires: Option<i64>, paid: bool, sequence: i64) -> Grant {
        Grant {
            id: Id::parse(id).unwrap(),
            customer_id: Id::parse("c").unwrap(),
            amount: Amount::from_units(1).unwrap(),
            remaining: Amount::from_units(1).unwrap(),
            source: Source::Purchase,
            paid,
            cost_basis: None,
            priority,
            effective_at: Timestamp(0),
            expires_at: expires.map(Timestamp),
            scope: None,
            status: GrantStatus::Active,
            expired_amount: Amount::ZERO,
            expired_at: None,
            sequence,
            awaiting_effect: false,
            origin: None,
        }
    }

    #[test]
    fn burn_order_follows_the_product_rules() {
        let mut grants = [
            grant("never_free_old", 0, None, false, 1),
            grant("soon_paid", 0, Some(10), true, 2),
            grant("soon_free", 0, Some(10), false, 3),
            grant("later", 0, Some(20), false, 4),
            grant("priority", 5, None, true, 5),
            grant("soon_free_newer", 0, Some(10), false, 6),
        ];
        grants.sort_by_key(Grant::burn_key);
        let order: Vec<&str> = grants.iter().map(|g| g.id.as_str()).collect();
        assert_eq!(
            order,
            [
                "priority",
                "soon_free",
                "soon_free_newer",
                "soon_paid",
                "later",
                "never_free_old"
            ]
        );
    }

    #[test]
    fn cost_basis_values_credits_exactly() {
        let basis = CostBasis {
            per_credit: Amount::parse("0.01").unwrap(),
            currency: "USD".into(),
        };
        assert_eq!(
            basis.value_of(Amount::from_units(8000).unwrap()),
            Amount::parse("80").ok()
        );
        let odd = CostBasis {
            per_credit: Amount::parse("0.333333").unwrap(),
            currency: "USD".into(),
        };
        assert_eq!(
            odd.value_of(Amount::parse("0.5").unwrap()),
            Amount::parse("0.166667").ok()
        );
    }
}
