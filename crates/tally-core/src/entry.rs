//! Double-entry journal entries: every movement of credits between accounts.
//!
//! A posting moves a positive amount `from` one account `to` another, so every
//! entry sums to zero by construction. Accounts are per grant lot and per hold,
//! plus system accounts that record where credits came from and went.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Amount, Id, Source, Timestamp};

/// An account of the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Account {
    /// A customer's lot of credits.
    Grant(Id),
    /// A lot's credits before it takes effect (issued with an `effective_at`
    /// ahead): they move to the lot's `grant:` account, in a
    /// `grant_effective` entry, when it takes effect.
    Pending(Id),
    /// Credits reserved by a hold.
    Hold(Id),
    /// Where granted credits come from, per source.
    Issued(Source),
    /// Credits spent, per feature when the charge named one.
    Consumed(Option<String>),
    /// Credits on their way from one customer to another (a transfer).
    Transfer(Id),
    /// Credits that expired unused.
    Expired,
    /// Credits taken back by a void.
    Voided,
    /// What the customer owes beyond zero (overage): spends past the credits
    /// draw from it, and the next credits repay it.
    Debt,
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Account::Grant(id) => write!(f, "grant:{id}"),
            Account::Pending(id) => write!(f, "pending:{id}"),
            Account::Hold(id) => write!(f, "hold:{id}"),
            Account::Issued(source) => write!(f, "issued:{}", source.as_str()),
            Account::Consumed(None) => f.write_str("consumed"),
            Account::Consumed(Some(feature)) => write!(f, "consumed:{feature}"),
            Account::Transfer(id) => write!(f, "transfer:{id}"),
            Account::Expired => f.write_str("expired"),
            Account::Voided => f.write_str("voided"),
            Account::Debt => f.write_str("debt"),
        }
    }
}

impl From<Account> for String {
    fn from(account: Account) -> String {
        account.to_string()
    }
}

impl TryFrom<String> for Account {
    type Error = String;

    fn try_from(text: String) -> Result<Account, String> {
        let bad = || format!("unknown account {text:?}");
        Ok(match text.split_once(':') {
            None if text == "consumed" => Account::Consumed(None),
            None if text == "expired" => Account::Expired,
            None if text == "voided" => Account::Voided,
            None if text == "debt" => Account::Debt,
            Some(("grant", id)) => Account::Grant(Id::derived(id)),
            Some(("pending", id)) => Account::Pending(Id::derived(id)),
            Some(("hold", id)) => Account::Hold(Id::derived(id)),
            Some(("transfer", id)) => Account::Transfer(Id::derived(id)),
            Some(("issued", source)) => Account::Issued(Source::parse(source).ok_or_else(bad)?),
            Some(("consumed", feature)) => Account::Consumed(Some(feature.to_string())),
            _ => return Err(bad()),
        })
    }
}

/// One movement of a positive amount between two accounts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posting {
    pub from: Account,
    pub to: Account,
    pub amount: Amount,
}

/// What an entry records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    Grant,
    Charge,
    Hold,
    Capture,
    Release,
    HoldExpired,
    Refund,
    Void,
    Expire,
    ExpiryExtended,
    Reinstate,
    /// Credits that became available paid back debt.
    DebtRepaid,
    /// Unused plan credits carried into the next period.
    Rollover,
    /// Credits sent to another customer.
    TransferOut,
    /// Credits received from another customer.
    TransferIn,
    /// Budget moved between two members (no credits move).
    BudgetTransfer,
    /// A lot issued with an `effective_at` ahead took effect: its credits
    /// move from `pending:` to `grant:` and count in the balance from then.
    GrantEffective,
}

impl EntryKind {
    pub const ALL: [EntryKind; 17] = [
        EntryKind::Grant,
        EntryKind::Charge,
        EntryKind::Hold,
        EntryKind::Capture,
        EntryKind::Release,
        EntryKind::HoldExpired,
        EntryKind::Refund,
        EntryKind::Void,
        EntryKind::Expire,
        EntryKind::ExpiryExtended,
        EntryKind::Reinstate,
        EntryKind::DebtRepaid,
        EntryKind::Rollover,
        EntryKind::TransferOut,
        EntryKind::TransferIn,
        EntryKind::BudgetTransfer,
        EntryKind::GrantEffective,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Grant => "grant",
            EntryKind::Charge => "charge",
            EntryKind::Hold => "hold",
            EntryKind::Capture => "capture",
            EntryKind::Release => "release",
            EntryKind::HoldExpired => "hold_expired",
            EntryKind::Refund => "refund",
            EntryKind::Void => "void",
            EntryKind::Expire => "expire",
            EntryKind::ExpiryExtended => "expiry_extended",
            EntryKind::Reinstate => "reinstate",
            EntryKind::DebtRepaid => "debt_repaid",
            EntryKind::Rollover => "rollover",
            EntryKind::TransferOut => "transfer_out",
            EntryKind::TransferIn => "transfer_in",
            EntryKind::BudgetTransfer => "budget_transfer",
            EntryKind::GrantEffective => "grant_effective",
        }
    }

    pub fn parse(text: &str) -> Option<EntryKind> {
        EntryKind::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

/// A journal entry as the core produces it; the store gives it an id, the
/// actor and a strictly increasing `recorded_at`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryDraft {
    pub kind: EntryKind,
    pub customer_id: Id,
    /// The size of the movement this entry records (for a capture, what was consumed).
    pub amount: Amount,
    pub postings: Vec<Posting>,
    /// The charge, hold, refund, grant or operation this entry belongs to.
    pub reference: Option<Id>,
    pub member_id: Option<Id>,
    pub feature: Option<String>,
    pub reason: Option<String>,
    /// When the movement took effect (a hold's or grant's expiry instant for expiries).
    pub effective_at: Timestamp,
    /// The customer's balance after this entry: the credits available
    /// less any debt (negative while the customer owes).
    pub balance_after: Amount,
}

impl EntryDraft {
    /// What this entry added to the customer's debt (an overage spend).
    pub fn debt_drawn(&self) -> Amount {
        crate::amount::checked_sum(
            self.postings
                .iter()
                .filter(|p| p.from == Account::Debt)
                .map(|p| p.amount),
        )
        .expect("entry amounts within range")
    }

    /// What of a hold's amount (on its `hold`, `release` or `hold_expired`
    /// entry) is reserved against the overage limit rather than taken from
    /// lots: the amount less the credits moved into (or out of) the hold's
    /// account. Zero for any other entry.
    pub fn overage_reserved(&self) -> Amount {
        let into = match self.kind {
            EntryKind::Hold => true,
            EntryKind::Release | EntryKind::HoldExpired => false,
            _ => return Amount::ZERO,
        };
        let Some(hold) = self.reference.clone().map(Account::Hold) else {
            return Amount::ZERO;
        };
        let moved = crate::amount::checked_sum(
            self.postings
                .iter()
                .filter(|p| if into { p.to == hold } else { p.from == hold })
                .map(|p| p.amount),
        )
        .expect("entry amounts within range");
        self.amount
            .checked_sub(moved)
            .expect("entry amounts within range")
    }

    /// The grant lots this entry touches, in posting order, without repeats.
    pub fn grant_ids(&self) -> Vec<Id> {
        let mut ids: Vec<Id> = Vec::new();
        for posting in &self.postings {
            for account in [&posting.from, &posting.to] {
                if let Account::Grant(id) | Account::Pending(id) = account {
                    if !ids.contains(id) {
                        ids.push(id.clone());
                    }
                }
            }
        }
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_round_trip_through_text() {
        let accounts = [
            Account::Grant(Id::parse("g:1").unwrap()),
            Account::Hold(Id::parse("h").unwrap()),
            Account::Issued(Source::PlanAllocation),
            Account::Consumed(None),
            Account::Consumed(Some("ai_message".into())),
            Account::Expired,
            Account::Voided,
            Account::Debt,
            Account::Transfer(Id::parse("t1").unwrap()),
            Account::Pending(Id::parse("g:2").unwrap()),
        ];
        for account in accounts {
            assert_eq!(Account::try_from(account.to_string()), Ok(account));
        }
        assert!(Account::try_from("bogus".to_string()).is_err());
    }
}
