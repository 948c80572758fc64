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
