//! The pure domain of Tally: credit amounts, grants and their burn order,
//! double-entry postings, holds, refunds and expiry.
//!
//! Architecture invariant: this crate does no IO and has no async. It never
//! reads the clock (every operation takes `now`), never touches a database or
//! the network, and so cannot fail for those reasons. Refused operations are
//! [`LedgerError`] values; broken invariants are assertions.

pub mod amount;
pub mod currency;
pub mod entry;
pub mod error;
pub mod grant;
pub mod hold;
pub mod id;
pub mod ledger;
pub mod member;
pub mod overage;
pub mod plan;
pub mod pricebook;
pub mod pricing;
pub mod time;
pub mod topup;

pub use amount::{Amount, AmountParseError};
pub use entry::{Account, EntryDraft, EntryKind, Posting};
pub use error::LedgerError;
pub use grant::{CostBasis, Grant, GrantStatus, Source};
pub use hold::{Draw, Hold, HoldStatus};
pub use id::{Id, IdError};
pub use ledger::{
    Balance, Captured, Changes, ChargeRecord, CustomerLedger, Refunded, Spend, Voided,
};
pub use member::{Budget, BudgetPeriod, Member};
pub use overage::OveragePolicy;
pub use plan::{Period, Plan, Rollover, Subscription, SubscriptionStatus};
pub use pricing::{
    Price, Priced, PricingContext, PricingError, Quantity, Rule, RuleProblem, RuleProblemKind,
    Step, TierMode,
};
pub use time::{Clock, Timestamp};
pub use topup::{AutoTopup, AutoTopupState, AutoTopupStatus, CreditPack, Decision};
