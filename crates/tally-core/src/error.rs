//! Business outcomes that refuse an operation.
//!
//! These are results a client can cause and must be told about; programmer
//! errors are assertions instead.

use crate::{Amount, Id};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("insufficient credits: {required} required, {available} available")]
    InsufficientCredits { available: Amount, required: Amount },
    #[error("grant {0} not found")]
    GrantNotFound(Id),
    #[error("grant {grant_id} is {status} and cannot be changed this way")]
    GrantNotActive { grant_id: Id, status: &'static str },
    #[error("hold {0} not found")]
    HoldNotFound(Id),
    #[error("hold {0} has expired and its credits were released")]
    HoldExpired(Id),
    #[error("hold {0} is already resolved")]
    HoldAlreadyResolved(Id),
    #[error("capture of {requested} exceeds the {held} held")]
    CaptureExceedsHold { requested: Amount, held: Amount },
    #[error("{}", refund_exceeds(*requested, *refundable))]
    RefundExceedsCharge {
        requested: Amount,
        refundable: Amount,
    },
    #[error("{0}")]
    InvalidExpiry(&'static str),
    #[error("grant {0} expired too long ago to be reinstated")]
    ReinstateWindowPassed(Id),
    #[error("amount must be greater than zero")]
    AmountNotPositive,
    #[error("the resulting balance would exceed the maximum amount")]
    AmountOverflow,
    #[error(
        "the lot's money value (amount times cost_basis.amount) would exceed the maximum amount"
    )]
    CostBasisOverflow,
    #[error("both members need a budget to move budget between them")]
    NoBudget,
    #[error("member {member_id} has spent {spent} of its {budget} budget in this period; {required} more would pass it")]
    MemberBudgetExceeded {
        member_id: Id,
        budget: Amount,
        spent: Amount,
        required: Amount,
    },
}

/// The message of [`LedgerError::RefundExceedsCharge`].
fn refund_exceeds(requested: Amount, refundable: Amount) -> String {
    if refundable.is_zero() {
        return "this charge has nothing left to refund: it was refunded in full".into();
    }
    format!("refund of {requested} exceeds the {refundable} still refundable on this charge")
}
