//! Holds: credits reserved from specific grants until captured, released or expired.

use serde::{Deserialize, Serialize};

use crate::{Amount, Id, Timestamp};

/// Credits taken from (or returned to) one grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Draw {
    pub grant_id: Id,
    pub amount: Amount,
}

/// How a hold ended, or that it has not yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldStatus {
    Active,
    Captured,
    Released,
    Expired,
}

impl HoldStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldStatus::Active => "active",
            HoldStatus::Captured => "captured",
            HoldStatus::Released => "released",
            HoldStatus::Expired => "expired",
        }
    }

    pub fn parse(text: &str) -> Option<HoldStatus> {
        [
            HoldStatus::Active,
            HoldStatus::Captured,
            HoldStatus::Released,
            HoldStatus::Expired,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

/// A reservation of credits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub id: Id,
    pub customer_id: Id,
    pub amount: Amount,
    /// Which grants the reserved credits came from, in burn order.
    pub reservations: Vec<Draw>,
    pub status: HoldStatus,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub captured: Amount,
    pub feature: Option<String>,
    pub member_id: Option<Id>,
    /// The part of `amount` reserved beyond the credits, against the overage
    /// allowance: a capture that uses it becomes debt.
    #[serde(default)]
    pub overdraft: Amount,
}

impl Hold {
    /// How a capture of `capture` takes from the reservations, in their
    /// (burn) order: what it takes from each (zero past the capture), and
    /// what is left beyond them all (taken from the overdraft as debt).
    pub fn takes(&self, capture: Amount) -> (Vec<Amount>, Amount) {
        let mut left = capture;
        let takes = self
            .reservations
            .iter()
            .map(|draw| {
                let take = draw.amount.min(left);
                left = left.checked_sub(take).expect("take is at most left");
                take
            })
            .collect();
        (takes, left)
    }

    /// The lots a captured hold's credits were spent from, and how much of
    /// each (what the capture's answer called `drawn`); empty unless captured.
    pub fn captured_draws(&self) -> Vec<Draw> {
        if self.status != HoldStatus::Captured {
            return Vec::new();
        }
        let (takes, _) = self.takes(self.captured);
        self.reservations
            .iter()
            .zip(takes)
            .filter(|(_, take)| take.is_positive())
            .map(|(draw, take)| Draw {
                grant_id: draw.grant_id.clone(),
                amount: take,
            })
            .collect()
    }
}
