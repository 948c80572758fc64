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
    #[error("member {member_id} has {remaining} of its budget left in this period ({budget} a period, {spent} spent{moved}); {required} would pass it", moved = moved_text(*moved))]
    MemberBudgetExceeded {
        member_id: Id,
        budget: Amount,
        spent: Amount,
        /// Budget moved in (positive) or out (negative) by transfers.
        moved: Amount,
        /// What the member may still spend: the budget and what transfers
        /// moved, less what it spent (never below zero).
        remaining: Amount,
        required: Amount,
    },
}

/// The message of [`LedgerError::RefundExceedsCharge`].
fn refund_exceeds(requested: Amount, refundable: Amount) -> String {
    if refundable.is_zero() {
        return "this charge has nothing left to refund: it cost no credits, or was refunded in full"
            .into();
    }
    format!("refund of {requested} exceeds the {refundable} still refundable on this charge")
}

/// ", 40 moved out by transfers" when a budget transfer moved some of the
/// member's budget in or out in this period, else nothing.
fn moved_text(moved: Amount) -> String {
    if moved.is_positive() {
        format!(", {moved} moved in by transfers")
    } else if moved.is_negative() {
        let out = moved.checked_neg().unwrap_or(Amount::ZERO);
        format!(", {out} moved out by transfers")
    } else {
        String::new()
    }
}
