//! The writer's plans and subscriptions: renewals on the engine's clock.
//!
//! A renewal runs inside the group that first touches the customer after the
//! period boundary (any operation on it, the tick, or a balance read), and
//! writes the subscription's new state in the same transaction as the
//! allocation it grants. The allocation's id names the subscription and the
//! period (`plan:<subscription>:<n>`), so a period is granted at most once:
//! a crash before the commit leaves the period un-renewed, and the next
//! group renews it again at the same boundary instant.

use std::collections::HashMap;

use crate::db::params;
use tally_core::plan::{self, RenewalContext, Step};
use tally_core::{Id, Plan, Subscription, SubscriptionStatus, Timestamp};

use super::{Failure, Writer, REFUSED_RENEWALS_KEPT};
use crate::model::{NewSubscription, Outcome, PlanChange, Refusal, StoreError};
use crate::rows;

struct Renewals<'a> {
    plans: &'a HashMap<String, Plan>,
    next_grant_sequence: &'a mut i64,
}

impl RenewalContext for Renewals<'_> {
    fn plan(&self, key: &str) -> Option<&Plan> {
        self.plans.get(key)
    }

    fn next_grant_sequence(&mut self) -> i64 {
        let sequence = *self.next_grant_sequence;
        *self.next_grant_sequence += 1;
        sequence
    }
}

fn invalid(message: impl Into<String>) -> Failure {
    Failure::Rejected(Refusal {
        code: "invalid_request".into(),
        message: message.into(),
        available: None,
    })
}

/// A subscription whose renewal is due but refused by the ledger: its
/// period end is past, so what would take effect there cannot be asked for.
fn renewal_refused(subscription: &Subscription, what: &str) -> Failure {
    Failure::Rejected(Refusal {
        code: "renewal_refused".into(),
        message: format!(
            "subscription {}'s renewal at {} is refused by the ledger (see the server's log), so {what}; \
             cancel it now, or make room for the renewal",
            subscription.id,
            subscription.period_end.rfc3339()
        ),
        available: None,
    })
}

/// The longest id that starts a subscription: its lots' ids
/// (`rollover:<id>:<period>`) must stay within the 128 characters the API
/// takes back in `/v1/grants/{id}/...`.
const MAX_SUBSCRIPTION_ID: usize = 100;

impl Writer {
    /// Renew what is due for a loaded customer, before its expiries apply.
    pub(super) fn renew_due(&mut self, customer_id: &Id) -> Result<(), Failure> {
        let now = self.now;
        let cached = self.cache.get_mut(customer_id).expect("loaded");
        let Some(subscription) = cached.subscription.as_ref() else {
            return Ok(());
        };
        if !subscription.due(now) {
            return Ok(());
        }
        // On copies: a renewal the core refuses (an allocation past the
        // maximum balance, a boundary past year 9999) changes nothing, and
        // neither blocks the customer's other operations nor the tick. The
        // boundaries before a refused one still renew.
        let original = subscription.clone();
        let mut subscription = original.clone();
        let mut ledger = cached.ledger.clone();
        let mut context = Renewals {
            plans: &self.plans,
            next_grant_sequence: &mut self.next_grant_sequence,
        };
        let (renewed, refused) = match plan::renew_due_or_refused_at(
            &mut ledger,
            &mut subscription,
            &mut context,
            now,
        ) {
            Ok(steps) => (Some((ledger, subscription, steps)), None),
            Err((at, error)) if at > original.period_end => {
                // Again on fresh copies, up to just before the refused
                // boundary: the same renewals, which the core granted.
                let mut subscription = original.clone();
                let mut ledger = cached.ledger.clone();
                let before = Timestamp(at.micros() - 1);
                match plan::renew_due(&mut ledger, &mut subscription, &mut context, before) {
                    Ok(steps) => (Some((ledger, subscription, steps)), Some((at, error))),
                    Err(again) => (None, Some((original.period_end, again))),
                }
            }
            Err(refusal) => (None, Some(refusal)),
        };
        if let Some((at, error)) = refused {
            let key = (original.id.clone(), at.micros());
            // Bounded: past this many, each is logged once more.
            if self.refused_renewals.len() >= REFUSED_RENEWALS_KEPT {
                self.refused_renewals.clear();
            }
            if self.refused_renewals.insert(key) {
                tracing::error!(subscription = %original.id, at = %at.rfc3339(), %error,
                    "a subscription renewal was refused; it stays due (logged once per period)");
            }
        }
        let Some((ledger, subscription, steps)) = renewed else {
            return Ok(());
        };
        let cached = self.cache.get_mut(customer_id).expect("loaded");
        cached.ledger = ledger;
        cached.subscription = Some(subscription);
        // Work done, for the tick's bound: each period renewed (with its
        // notification), even of a plan without credits.
        self.renewals += steps
            .iter()
            .filter(|step| matches!(step, Step::Renewed { .. } | Step::Ended { .. }))
            .count()
            .max(1);
        self.subscription_changed(customer_id, steps, None)
    }

    /// Record what a renewal or plan change did, store the subscription, and
    /// keep the customer's plan (pricing) and inherited overage policy in step.
    fn subscription_changed(
        &mut self,
        customer_id: &Id,
        steps: Vec<Step>,
        actor: Option<&str>,
    ) -> Result<(), Failure> {
        // When the plan changed: at the first period boundary the steps
        // crossed (a renewal applied late changes it at its boundary), else
        // now (a change or cancellation applied at once).
        let changed_at = steps
            .iter()
            .find_map(|step| match step {
                Step::Renewed { at, .. } | Step::Ended { at } => Some(*at),
                _ => None,
            })
            .unwrap_or(self.now);
        for step in steps {
            match step {
                Step::Entry(draft) | Step::NewGrant(draft, _) => {
                    self.record_entry(&draft, actor)?;
                }
                Step::Renewed { period, at } => {
                    let subscription = self.cache[customer_id]
                        .subscription
                        .clone()
                        .expect("renewed");
                    self.notify(
                        "subscription.renewed",
                        Some(customer_id),
                        serde_json::json!({
                            "subscription_id": subscription.id.to_string(),
                            "plan": subscription.plan,
                            "period": period,
                            "period_start": at.rfc3339(),
                        }),
                    )?;
                }
                Step::Ended { at } => {
                    tracing::debug!(%customer_id, at = at.micros(), "subscription ended");
                }
            }
        }
        let cached = self.cache.get_mut(customer_id).expect("loaded");
        let subscription = cached.subscription.clone().expect("changed");
        rows::upsert_subscription(&self.connection, &subscription, self.now)?;
        // The plan prices the customer while the subscription runs; one
        // canceled before it started never set it, and leaves it alone.
        let plan = match (subscription.status, subscription.period >= 0) {
            (SubscriptionStatus::Active, true) => Some(Some(subscription.plan.clone())),
            (SubscriptionStatus::Canceled, true) => Some(None),
            (_, false) => None,
        };
        if let Some(plan) = plan.filter(|p| *p != cached.plan) {
            cached
                .plan_history
                .change(changed_at, cached.plan.clone(), plan.clone());
            let history = serde_json::to_string(&cached.plan_history).expect("history serializes");
            self.connection
                .prepare_cached("UPDATE customers SET plan = ?1, plan_history = ?2 WHERE id = ?3")?
                .execute(params![plan, history, customer_id.as_str()])?;
            cached.plan = plan;
        }
        if subscription.status == SubscriptionStatus::Canceled {
            cached.subscription = None;
        }
        self.touched.insert(customer_id.clone());
        self.refresh_overage(customer_id);
        Ok(())
    }

    /// The customer's own overage policy, or else its plan's, or else block.
    pub(super) fn refresh_overage(&mut self, customer_id: &Id) {
        let Some(cached) = self.cache.get_mut(customer_id) else {
            return;
        };
        let inherited = cached
            .subscription
            .as_ref()
            .filter(|s| s.period >= 0)
            .and_then(|s| self.plans.get(&s.plan))
            .and_then(|p| p.overage);
        let policy = cached.overage_override.or(inherited).unwrap_or_default();
        cached.ledger.set_overage(policy);
    }

    pub(super) fn put_plan(
        &mut self,
        plan: &Plan,
        actor: Option<&str>,
    ) -> Result<Outcome, Failure> {
        plan::validate_plan(plan)
            .map_err(|(param, message)| invalid(format!("{param}: {message}")))?;
        if let Some(old) = self.plans.get(&plan.key) {
            if old.period != plan.period {
                return Err(Failure::Rejected(Refusal {
                    code: "plan_period_fixed".into(),
                    message: format!(
                        "plan {}'s period cannot change (subscriptions count their periods by it); create a new plan and move subscribers to it",
                        plan.key
                    ),
                    available: None,
                }));
            }
        }
        rows::upsert_plan(&self.connection, plan, self.now, actor)?;
        self.plans.insert(plan.key.clone(), plan.clone());
        let subscribers: Vec<Id> = self
            .cache
            .iter()
            .filter(|(_, c)| c.subscription.as_ref().is_some_and(|s| s.plan == plan.key))
            .map(|(id, _)| id.clone())
            .collect();
        for customer_id in subscribers {
            self.refresh_overage(&customer_id);
        }
        Ok(Outcome::Plan(plan.clone()))
    }

    pub(super) fn subscribe(
        &mut self,
        request: &NewSubscription,
        actor: Option<&str>,
    ) -> Result<Outcome, Failure> {
        let Some(plan) = self.plans.get(&request.plan).cloned() else {
            return Err(Failure::Store(StoreError::NotFound(format!(
                "plan {}",
                request.plan
            ))));
        };
        let customer_id = &request.customer_id;
        self.prepare(customer_id)?;
        let now = self.now;
        let cached = self.cache.get_mut(customer_id).expect("prepared");
        let mut context = Renewals {
            plans: &self.plans,
            next_grant_sequence: &mut self.next_grant_sequence,
        };
        // On copies: a change the core refuses changes nothing.
        let mut ledger = cached.ledger.clone();
        let mut current = cached.subscription.clone();
        let steps = match current.as_mut() {
            None => {
                if request.id.as_str().len() > MAX_SUBSCRIPTION_ID {
                    // Wrong on its own: not kept as the id's outcome.
                    return Err(Failure::Store(StoreError::Rejected(Refusal {
                        code: "invalid_request".into(),
                        message: "the id that starts a subscription must be at most 100 characters (its grants are named after it)".into(),
                        available: None,
                    })));
                }
                if request.change == PlanChange::PeriodEnd {
                    // Not kept as the id's outcome: the same id may start
                    // the subscription once `change` is left out.
                    return Err(Failure::Store(StoreError::Rejected(Refusal {
                        code: "invalid_request".into(),
                        message: format!(
                            "change: period_end changes a subscription at its period's end, and customer {customer_id} has none; leave change out to start one"
                        ),
                        available: None,
                    })));
                }
                let start = request.start_at.unwrap_or(now);
                if start < now {
                    return Err(invalid("start_at must not be in the past"));
                }
                let subscription = current.insert(Subscription::starting(
                    request.id.clone(),
                    customer_id.clone(),
                    plan.key.clone(),
                    start,
                ));
                plan::renew_due(&mut ledger, subscription, &mut context, now)
                    .map_err(Failure::Refused)?
            }
            Some(subscription) => {
                if request.start_at.is_some() {
                    return Err(invalid(
                        "start_at applies to a new subscription; this customer already has one (change its plan without start_at)",
                    ));
                }
                match request.change {
                    PlanChange::Now
                        if subscription.plan == plan.key && subscription.period >= 0 =>
                    {
                        subscription.next_plan = None;
                        subscription.cancel_at_period_end = false;
                        Vec::new()
                    }
                    // Its renewal is due but the ledger refused it (say, the
                    // allocation would pass the maximum balance): a change
                    // now would end a period that has not begun, and one at
                    // the period end would take effect at that boundary, in
                    // the past, repricing usage already charged.
                    _ if subscription.period >= 0 && subscription.due(now) => {
                        return Err(renewal_refused(subscription, "its plan cannot change"));
                    }
                    PlanChange::Now => plan::change_plan_now(
                        &mut ledger,
                        subscription,
                        &plan,
                        &request.id,
                        &mut context,
                        now,
                    )
                    .map_err(Failure::Refused)?,
                    PlanChange::PeriodEnd => {
                        subscription.next_plan =
                            (subscription.plan != plan.key).then(|| plan.key.clone());
                        subscription.cancel_at_period_end = false;
                        Vec::new()
                    }
                }
            }
        };
        cached.ledger = ledger;
        cached.subscription = current;
        let subscription = cached.subscription.clone().expect("just set");
        self.subscription_changed(customer_id, steps, actor)?;
        Ok(Outcome::Subscription(subscription))
    }

    pub(super) fn cancel_subscription(
        &mut self,
        customer_id: &Id,
        at_period_end: bool,
        actor: Option<&str>,
    ) -> Result<Outcome, Failure> {
        self.prepare(customer_id)?;
        let now = self.now;
        let cached = self.cache.get_mut(customer_id).expect("prepared");
        let Some(subscription) = cached.subscription.as_mut() else {
            return Err(Failure::Store(StoreError::NotFound(format!(
                "active subscription of customer {customer_id}"
            ))));
        };
        if at_period_end && subscription.period >= 0 && subscription.due(now) {
            return Err(renewal_refused(
                subscription,
                "it cannot be canceled at the period end (that is past)",
            ));
        }
        subscription.next_plan = None;
        let mut steps = Vec::new();
        if at_period_end && subscription.period >= 0 {
            subscription.cancel_at_period_end = true;
        } else {
            // The period ends now, and with it what is left of its allocation.
            steps = plan::end_allocation(
                &mut cached.ledger,
                subscription,
                &format!("subscription {} canceled now", subscription.id),
                now,
            )
            .map_err(Failure::Refused)?;
            subscription.status = SubscriptionStatus::Canceled;
            subscription.canceled_at = Some(now);
        }
        let subscription = subscription.clone();
        self.subscription_changed(customer_id, steps, actor)?;
        Ok(Outcome::Subscription(subscription))
    }
}

impl Writer {
    /// Credits from one customer to another, or budget between two members
    /// of one customer: exactly once by its id, all or nothing.
    pub(super) fn transfer(
        &mut self,
        request: &crate::model::NewTransfer,
        actor: Option<&str>,
    ) -> Result<Outcome, Failure> {
        let now = self.now;
        let reason = request.reason.clone();
        if request.from_customer == request.to_customer {
            let (Some(from), Some(to)) = (&request.from_member, &request.to_member) else {
                return Err(invalid(
                    "a transfer within one customer moves budget between two members: give from.member_id and to.member_id",
                ));
            };
            if from == to {
                return Err(invalid("from and to are the same member"));
            }
            self.prepare(&request.from_customer)?;
            let draft = self
                .ledger(&request.from_customer)
                .transfer_budget(&request.id, from, to, request.amount, reason, now)
                .map_err(Failure::Refused)?;
            // The entry is the sending member's; it names the receiving one.
            let facts = crate::model::EntryFacts {
                counterparty_member: Some(to.to_string()),
                ..Default::default()
            };
            let entry = self.record_entry_about(&draft, actor, facts)?;
            return Ok(Outcome::Transfer(crate::model::TransferOutcome {
                id: request.id.clone(),
                kind: "budget".into(),
                amount: request.amount,
                from_customer: request.from_customer.clone(),
                from_member: request.from_member.clone(),
                to_customer: request.to_customer.clone(),
                to_member: request.to_member.clone(),
                from_entry: entry,
                from_balance_after: draft.balance_after,
                to_entry: entry,
                to_balance_after: draft.balance_after,
                grants: Vec::new(),
            }));
        }
        self.prepare(&request.from_customer)?;
        self.prepare(&request.to_customer)?;
        // On copies: both sides apply, or neither.
        let mut sender = self.cache[&request.from_customer].ledger.clone();
        let mut receiver = self.cache[&request.to_customer].ledger.clone();
        let (lots, out) = sender
            .transfer_out(
                &request.id,
                request.amount,
                request.from_member.as_ref(),
                reason.clone(),
                now,
            )
            // Refused for want of credits: the sender's automatic top-up
            // looks at it, as after a refused charge.
            .map_err(|error| self.refused(&request.from_customer, error))?;
        let grants: Vec<tally_core::Grant> = lots
            .iter()
            .enumerate()
            .map(|(n, lot)| {
                let sequence = self.next_grant_sequence;
                self.next_grant_sequence += 1;
                tally_core::Grant {
                    id: tally_core::ledger::derived_lot_id("transfer", &request.id, n),
                    customer_id: request.to_customer.clone(),
                    amount: lot.amount,
                    remaining: lot.amount,
                    source: tally_core::Source::Transfer,
                    paid: lot.paid,
                    cost_basis: lot.cost_basis.clone(),
                    priority: lot.priority,
                    effective_at: now,
                    expires_at: lot.expires_at,
                    scope: None,
                    status: tally_core::GrantStatus::Active,
                    expired_amount: tally_core::Amount::ZERO,
                    expired_at: None,
                    sequence,
                    awaiting_effect: false,
                    origin: Some(lot.root.clone()),
                }
            })
            .collect();
        let ids = grants.iter().map(|g| g.id.clone()).collect();
        let into = receiver
            .transfer_in(&request.id, grants, request.to_member.as_ref(), reason, now)
            .map_err(Failure::Refused)?;
        self.cache
            .get_mut(&request.from_customer)
            .expect("prepared")
            .ledger = sender;
        self.cache
            .get_mut(&request.to_customer)
            .expect("prepared")
            .ledger = receiver;
        let counterparty = |customer: &Id| crate::model::EntryFacts {
            counterparty: Some(customer.to_string()),
            ..Default::default()
        };
        let from_entry =
            self.record_entry_about(&out, actor, counterparty(&request.to_customer))?;
        let to_entry =
            self.record_entry_about(&into, actor, counterparty(&request.from_customer))?;
        Ok(Outcome::Transfer(crate::model::TransferOutcome {
            id: request.id.clone(),
            kind: "credits".into(),
            amount: request.amount,
            from_customer: request.from_customer.clone(),
            from_member: request.from_member.clone(),
            to_customer: request.to_customer.clone(),
            to_member: request.to_member.clone(),
            from_entry,
            from_balance_after: out.balance_after,
            to_entry,
            to_balance_after: into.balance_after,
            grants: ids,
        }))
    }
}
