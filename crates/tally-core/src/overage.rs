//! Overage policies: what happens when a spend needs more credits than a
//! customer has.
//!
//! - `block`: nothing is spent beyond the credits in effect (the default).
//! - `allow_negative`: charges, holds and metered usage may go on past zero,
//!   down to `limit` of debt.
//! - `metered_only`: metered usage (events) is always recorded, going into
//!   debt down to `limit` if one is set (unbounded otherwise), while
//!   synchronous charges and holds are refused as under `block`, so the
//!   product's "may I?" checks still say no.
//!
//! Debt is repaid first, by the next credits that become available to any
//! feature: a new or newly effective unscoped grant, a released hold, a
//! refund, a reinstated grant.

use serde::{Deserialize, Serialize};

use crate::amount::MAX_AMOUNT_MICROS;
use crate::Amount;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "snake_case")]
pub enum OveragePolicy {
    #[default]
    Block,
    AllowNegative {
        limit: Amount,
    },
    MeteredOnly {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<Amount>,
    },
}

impl OveragePolicy {
    /// The most debt a spend may leave: `metered` is usage reported after the
    /// fact (an event), as opposed to a synchronous charge or hold.
    pub fn debt_limit(&self, metered: bool) -> Amount {
        match *self {
            OveragePolicy::Block => Amount::ZERO,
            OveragePolicy::AllowNegative { limit } => limit,
            OveragePolicy::MeteredOnly { limit } if metered => {
                limit.unwrap_or(Amount::from_micros(MAX_AMOUNT_MICROS).expect("maximum"))
            }
            OveragePolicy::MeteredOnly { .. } => Amount::ZERO,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            OveragePolicy::Block => "block",
            OveragePolicy::AllowNegative { .. } => "allow_negative",
            OveragePolicy::MeteredOnly { .. } => "metered_only",
        }
    }

    /// The configured limit, if the policy has one.
    pub fn limit(&self) -> Option<Amount> {
        match *self {
            OveragePolicy::Block => None,
            OveragePolicy::AllowNegative { limit } => Some(limit),
            OveragePolicy::MeteredOnly { limit } => limit,
        }
    }

    /// Build a policy from its name and limit, as an API receives them.
    pub fn from_parts(policy: &str, limit: Option<Amount>) -> Result<OveragePolicy, String> {
        if limit.is_some_and(|l| l.is_negative()) {
            return Err("the overage limit must not be negative".into());
        }
        match (policy, limit) {
            ("block", None) => Ok(OveragePolicy::Block),
            ("block", Some(_)) => Err("the block policy takes no limit".into()),
            ("allow_negative", Some(limit)) => Ok(OveragePolicy::AllowNegative { limit }),
            ("allow_negative", None) => {
                Err("the allow_negative policy needs a limit: how far below zero".into())
            }
            ("metered_only", limit) => Ok(OveragePolicy::MeteredOnly { limit }),
            (other, _) => Err(format!(
                "unknown overage policy {other:?}: use block, allow_negative or metered_only"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credits(units: i64) -> Amount {
        Amount::from_units(units).unwrap()
    }

    #[test]
    fn limits_per_policy_and_kind_of_spend() {
        let cases = [
            (OveragePolicy::Block, false, credits(0)),
            (OveragePolicy::Block, true, credits(0)),
            (
                OveragePolicy::AllowNegative { limit: credits(50) },
                false,
                credits(50),
            ),
            (
                OveragePolicy::AllowNegative { limit: credits(50) },
                true,
                credits(50),
            ),
            (
                OveragePolicy::MeteredOnly { limit: None },
                false,
                credits(0),
            ),
            (
                OveragePolicy::MeteredOnly { limit: None },
                true,
                Amount::from_micros(MAX_AMOUNT_MICROS).unwrap(),
            ),
            (
                OveragePolicy::MeteredOnly {
                    limit: Some(credits(7)),
                },
                true,
                credits(7),
            ),
        ];
        for (policy, metered, expected) in cases {
            assert_eq!(policy.debt_limit(metered), expected, "{policy:?} {metered}");
        }
    }

    #[test]
    fn parts_are_validated() {
        assert_eq!(
            OveragePolicy::from_parts("allow_negative", Some(credits(5))),
            Ok(OveragePolicy::AllowNegative { limit: credits(5) })
        );
        assert!(OveragePolicy::from_parts("allow_negative", None).is_err());
        assert!(OveragePolicy::from_parts("block", Some(credits(1))).is_err());
        assert!(OveragePolicy::from_parts("metered_only", Some(credits(-1))).is_err());
        assert!(OveragePolicy::from_parts("sometimes", None).is_err());
        let json = serde_json::to_string(&OveragePolicy::MeteredOnly { limit: None }).unwrap();
        assert_eq!(json, r#"{"policy":"metered_only"}"#);
    }
}
