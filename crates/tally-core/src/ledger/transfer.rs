//! Transfers: credits from one customer to another (one entry on each side,
//! through the account `transfer:<id>`), and budget between two members of
//! one customer (an entry without postings: budgets are limits, not credits).

use super::*;

/// A lot a transfer takes credits from, as the receiving side recreates it:
/// the credits keep their paid flag, cost basis, priority and expiry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferredLot {
    pub from_grant: Id,
    pub amount: Amount,
    pub paid: bool,
    pub cost_basis: Option<CostBasis>,
    pub priority: i32,
    pub expires_at: Option<Timestamp>,
    /// The lot the credits were first granted in (`Grant::root`): the
    /// receiving lot's `origin`, so that voiding it is priced by that lot's
    /// payment (a top-up's) and its voids count with the others of the same
    /// purchase.
    pub root: Id,
}

impl CustomerLedger {
    /// Take `amount` of credits available to every feature, in burn order,
    /// out to `transfer:<id>`. Never past the credits (no overage), and
    /// within `member`'s budget when it has one.
    pub fn transfer_out(
        &mut self,
        transfer_id: &Id,
        amount: Amount,
        member: Option<&Id>,
        reason: Option<String>,
        now: Timestamp,
    ) -> Result<(Vec<TransferredLot>, EntryDraft), LedgerError> {
        let spend = Spend {
            reference: transfer_id.clone(),
            amount,
            feature: None,
            member_id: member.cloned(),
            reason,
        };
        self.check_budget(&spend, now)?;
        let (draws, overdraft) = self.plan_draws(amount, None, now, false)?;
        if overdraft.is_positive() {
            return Err(LedgerError::InsufficientCredits {
                available: amount
                    .checked_sub(overdraft)
                    .expect("overdraft within amount"),
                required: amount,
            });
        }
        self.count_member_spend(member, amount, None, now);
        let lots = draws
            .iter()
            .map(|&(index, take)| {
                let grant = &self.grants[index];
                TransferredLot {
                    from_grant: grant.id.clone(),
                    amount: take,
                    paid: grant.paid,
                    cost_basis: grant.cost_basis.clone(),
                    priority: grant.priority,
                    expires_at: grant.expires_at,
                    root: grant.root().clone(),
                }
            })
            .collect();
        let (_, postings) = self.take_draws(&draws, &Account::Transfer(transfer_id.clone()));
        let entry = self.spend_entry(EntryKind::TransferOut, &spend, postings, now);
        Ok((lots, entry))
    }

    /// Receive the lots of transfer `transfer_id` as new grants (ids given
    /// by the caller), in one entry; they repay debt first.
    pub fn transfer_in(
        &mut self,
        transfer_id: &Id,
        lots: Vec<Grant>,
        member: Option<&Id>,
        reason: Option<String>,
        now: Timestamp,
    ) -> Result<EntryDraft, LedgerError> {
        let total =
            checked_sum(lots.iter().map(|g| g.amount)).ok_or(LedgerError::AmountOverflow)?;
        self.room_for(total)?;
        let mut postings = Vec::with_capacity(lots.len());
        for mut grant in lots {
            assert_eq!(grant.customer_id, self.customer_id);
            assert!(self.grant_index(&grant.id).is_none(), "grant id reused");
            grant.remaining = grant.amount;
            grant.status = GrantStatus::Active;
            grant.expired_amount = Amount::ZERO;
            grant.expired_at = None;
            postings.push(Posting {
                from: Account::Transfer(transfer_id.clone()),
                to: Account::Grant(grant.id.clone()),
                amount: grant.amount,
            });
            self.lower_next_due(grant.expires_at);
            self.dirty_grants.insert(grant.id.clone());
            self.insert_sorted(grant);
        }
        self.repay_debt(now, &mut postings);
        Ok(EntryDraft {
            kind: EntryKind::TransferIn,
            customer_id: self.customer_id.clone(),
            amount: total,
            postings,
            reference: Some(transfer_id.clone()),
            member_id: member.cloned(),
            feature: None,
            reason,
            effective_at: now,
            balance_after: self.net(now),
        })
    }

    /// Move `amount` of this window's budget from member `from` to member
    /// `to` (both with budgets): `from` may spend that much less, `to` that
    /// much more, until the window ends.
    pub fn transfer_budget(
        &mut self,
        transfer_id: &Id,
        from: &Id,
        to: &Id,
        amount: Amount,
        reason: Option<String>,
        now: Timestamp,
    ) -> Result<EntryDraft, LedgerError> {
        if !amount.is_positive() {
            return Err(LedgerError::AmountNotPositive);
        }
        let room = |member: Option<&Member>| member.and_then(|m| m.room_at(now));
        let (Some(from_room), Some(_)) = (room(self.members.get(from)), room(self.members.get(to)))
        else {
            return Err(LedgerError::NoBudget);
        };
        if amount > from_room {
            let member = &self.members[from];
            return Err(LedgerError::MemberBudgetExceeded {
                member_id: from.clone(),
                budget: member.budget.map_or(Amount::ZERO, |b| b.amount),
                spent: member.spent_at(now),
                moved: member.extra_at(now),
                remaining: from_room,
                required: amount,
            });
        }
        // Both new values first: a refusal changes nothing.
        let mut moved = Vec::with_capacity(2);
        for (id, delta) in [
            (from, amount.checked_neg().expect("negatable")),
            (to, amount),
        ] {
            let mut member = self.members[id].clone();
            member.roll(now);
            member.extra = member
                .extra
                .checked_add(delta)
                .ok_or(LedgerError::AmountOverflow)?;
            moved.push(member);
        }
        for member in moved {
            self.dirty_members.insert(member.id.clone());
            self.members.insert(member.id.clone(), member);
        }
        Ok(EntryDraft {
            kind: EntryKind::BudgetTransfer,
            customer_id: self.customer_id.clone(),
            amount,
            postings: Vec::new(),
            reference: Some(transfer_id.clone()),
            member_id: Some(from.clone()),
            feature: None,
            reason: Some(
                reason.unwrap_or_else(|| format!("budget moved from member {from} to member {to}")),
            ),
            effective_at: now,
            balance_after: self.net(now),
        })
    }
}
