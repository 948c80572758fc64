//! Top-ups: credit packs bought manually or automatically, gated by a payment.
//!
//! A top-up is written as `pending_payment` with a `topup.created`
//! notification: that is the payment step's hook (a webhook endpoint charges
//! the card, then calls confirm or fail; the Stripe integration will fill
//! it in). Confirming grants the pack's credits as a paid purchase lot
//! `topup:<id>` in the same transaction that marks the top-up succeeded, so
//! the credits come exactly once; failing it (or its payment deadline
//! passing on the engine's clock) sends `topup.failed`.
//!
//! An automatic top-up starts when an entry leaves the customer's balance
//! below its threshold, or a spend is refused for want of credits: one at a
//! time, at most `max_per_day` in any 24 hours, and suspended after
//! `max_failures` failed payments in a row. Its state lives in the
//! customer's cached ledger and is written with the top-up it starts.

use crate::db;
use serde_json::json;
use tally_core::topup::{self, Decision};
use tally_core::{Amount, AutoTopup, AutoTopupState, CreditPack, Id, Source, Timestamp};

use super::{Failure, Writer};
use crate::model::{NewGrant, NewTopup, Outcome, Refusal, StoreError, TopupRecord};
use crate::rows;

/// The failure reason of a payment not confirmed in time.
const PAYMENT_TIMEOUT: &str = "payment_timeout";
/// Overdue payments failed per tick.
const MAX_OVERDUE_PER_TICK: i64 = 1000;

fn refusal(code: &str, message: impl Into<String>) -> Failure {
    Failure::Rejected(Refusal {
        code: code.into(),
        message: message.into(),
        available: None,
    })
}

fn topup_payload(topup: &TopupRecord) -> serde_json::Value {
    json!({
        "topup_id": topup.id.as_str(),
        "customer_id": topup.customer_id.as_str(),
        "origin": topup.origin,
        "pack": topup.pack,
        "quantity": topup.quantity,
        "credits": topup.credits.to_string(),
        "price": topup.price.to_string(),
        "currency": topup.currency,
        "payment_due_at": topup.payment_due_at.rfc3339(),
    })
}

impl Writer {
    pub(super) fn put_credit_pack(&mut self, pack: &CreditPack) -> Result<Outcome, Failure> {
        topup::validate_pack(pack).map_err(|(field, message)| {
            refusal("invalid_request", format!("{field}: {message}"))
        })?;
        rows::upsert_credit_pack(&self.connection, pack, self.now)?;
        self.packs.insert(pack.key.clone(), pack.clone());
        Ok(Outcome::CreditPack(pack.clone()))
    }

    fn pack(&self, key: &str) -> Result<CreditPack, Failure> {
        self.packs
            .get(key)
            .cloned()
            .ok_or_else(|| Failure::Store(StoreError::NotFound(format!("credit pack {key}"))))
    }

    /// Write a new top-up awaiting its payment, and ask for the payment.
    fn start_topup(
        &mut self,
        id: Id,
        customer_id: &Id,
        origin: &str,
        pack: &CreditPack,
        quantity: u32,
        timeout_seconds: u32,
    ) -> Result<TopupRecord, Failure> {
        let order = pack.order(quantity).ok_or_else(|| {
            refusal(
                "amount_too_large",
                "quantity times the pack's credits or price is too large",
            )
        })?;
        let now = self.now;
        // Refuse now what the grant would refuse once the money is taken:
        // its lot id taken, the lot's money value past the largest amount,
        // or the credits past it once added to everything the customer
        // holds or may still be granted (every lot's remaining, pending
        // ones too, what holds reserve, and the other top-ups that a
        // payment may still complete). Grants made while the payment is
        // under way can still use the room up: the confirmation then
        // refuses, and the top-up stays unresolved.
        self.ensure_unused("grants", &Id::derived(&format!("topup:{id}")))?;
        let terms = CreditPack {
            credits: order.credits,
            price: order.price,
            ..pack.clone()
        };
        if terms
            .cost_basis()
            .is_some_and(|basis| basis.value_of(order.credits).is_none())
        {
            return Err(refusal(
                "amount_too_large",
                "the lot's money value (credits times the price per credit) would pass the largest amount",
            ));
        }
        let unresolved = rows::unresolved_topup_credits(&self.connection, customer_id.as_str())?
            .into_iter()
            .try_fold(order.credits, |total, micros| {
                Amount::from_micros(micros).and_then(|credits| total.checked_add(credits))
            });
        let room = unresolved
            .zip(self.cache.get(customer_id))
            .is_some_and(|(credits, customer)| customer.ledger.room_for(credits).is_ok());
        if !room {
            return Err(refusal(
                "amount_too_large",
                "these credits, with the customer's lots, holds and unresolved top-ups, would pass the largest amount",
            ));
        }
        let record = TopupRecord {
            id,
            customer_id: customer_id.clone(),
            origin: origin.to_string(),
            pack: pack.key.clone(),
            quantity,
            credits: order.credits,
            price: order.price,
            currency: pack.currency.clone(),
            expires_after_days: pack.expires_after_days,
            priority: pack.priority,
            status: "pending_payment".into(),
            payment_due_at: now
                .plus_seconds(i64::from(timeout_seconds))
                .unwrap_or(Timestamp(i64::MAX)),
            payment_reference: None,
            failure_reason: None,
            grant_id: None,
            entry_id: None,
            created_at: now,
            resolved_at: None,
        };
        rows::insert_topup(&self.connection, &record)?;
        self.notify("topup.created", Some(customer_id), topup_payload(&record))?;
        Ok(record)
    }

    pub(super) fn create_topup(&mut self, request: &NewTopup) -> Result<Outcome, Failure> {
        let timeout = request
            .payment_timeout_seconds
            .unwrap_or(topup::DEFAULT_PAYMENT_TIMEOUT_SECONDS);
        topup::validate_request(request.id.as_str(), request.quantity, timeout).map_err(
            |(field, message)| refusal("invalid_request", format!("{field}: {message}")),
        )?;
        let pack = self.pack(&request.pack)?;
        self.load(&request.customer_id)?;
        let record = self.start_topup(
            request.id.clone(),
            &request.customer_id,
            "manual",
            &pack,
            request.quantity,
            timeout,
        )?;
        Ok(Outcome::Topup {
            topup: record,
            balance_after: None,
        })
    }

    /// A top-up that can be resolved now, or why not: a pending one, or for
    /// a confirmation also one whose payment deadline passed (the money
    /// came late: the credits are still owed).
    fn resolvable_topup(&self, topup_id: &Id, confirming: bool) -> Result<TopupRecord, Failure> {
        let record = rows::topup(&self.connection, topup_id.as_str())?
            .ok_or_else(|| Failure::Store(StoreError::NotFound(format!("top-up {topup_id}"))))?;
        let late = confirming
            && record.status == "failed"
            && record.failure_reason.as_deref() == Some(PAYMENT_TIMEOUT);
        if record.status != "pending_payment" && !late {
            return Err(refusal(
                "topup_not_pending",
                format!(
                    "top-up {topup_id} is {}{}; it cannot be resolved again",
                    record.status,
                    record
                        .failure_reason
                        .as_ref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                ),
            ));
        }
        Ok(record)
    }

    /// The payment succeeded: grant the credits, exactly once.
    pub(super) fn confirm_topup(
        &mut self,
        topup_id: &Id,
        payment_reference: Option<&str>,
        actor: Option<&str>,
    ) -> Result<Outcome, Failure> {
        let mut record = self.resolvable_topup(topup_id, true)?;
        let late = record.status == "failed";
        let customer_id = record.customer_id.clone();
        self.prepare(&customer_id)?;
        let pack_terms = CreditPack {
            key: record.pack.clone(),
            name: String::new(),
            credits: record.credits,
            price: record.price,
            currency: record.currency.clone(),
            expires_after_days: record.expires_after_days,
            priority: record.priority,
        };
        let now = self.now;
        let expires_at = record
            .expires_after_days
            .and_then(|days| now.plus_seconds(i64::from(days) * 86_400));
        let grant = NewGrant {
            id: Id::derived(&format!("topup:{topup_id}")),
            customer_id: customer_id.clone(),
            amount: record.credits,
            source: Source::Purchase,
            paid: true,
            cost_basis: pack_terms.cost_basis(),
            priority: record.priority,
            effective_at: None,
            expires_at,
            scope: None,
            metadata: Some(
                json!({ "topup_id": topup_id.as_str(), "pack": record.pack, "quantity": record.quantity,
                        "price": record.price.to_string(), "currency": record.currency })
                .to_string(),
            ),
            external_reference: payment_reference.map(str::to_string),
            reason: Some(if late {
                format!("top-up {topup_id} paid after its payment deadline")
            } else {
                format!("top-up {topup_id} paid")
            }),
        };
        let Outcome::Grant {
            balance_after,
            entry_id,
            ..
        } = self.grant(&grant, actor)?
        else {
            unreachable!("a grant's outcome is a grant");
        };
        record.status = "succeeded".into();
        record.failure_reason = None;
        record.payment_reference = payment_reference.map(str::to_string);
        record.grant_id = Some(grant.id.clone());
        record.entry_id = Some(entry_id);
        record.resolved_at = Some(now);
        rows::resolve_topup(&self.connection, &record)?;
        let mut payload = topup_payload(&record);
        payload["grant_id"] = json!(grant.id.as_str());
        payload["balance"] = json!(balance_after.to_string());
        payload["payment_reference"] = json!(record.payment_reference);
        payload["late"] = json!(late);
        self.notify("topup.succeeded", Some(&customer_id), payload)?;
        // An automatic one's success clears the failures; with its credits
        // in, the next may start (checked once this command is complete)
        // if the balance is still below the threshold.
        if record.origin == "auto" {
            if let Some(state) = self.auto_state_mut(&customer_id) {
                state.succeeded(topup_id);
                self.save_auto_topup(&customer_id)?;
                self.check_topup_later(&customer_id);
            }
        }
        Ok(Outcome::Topup {
            topup: record,
            balance_after: Some(balance_after),
        })
    }

    /// The payment failed (or was never confirmed in time).
    pub(super) fn fail_topup(&mut self, topup_id: &Id, reason: &str) -> Result<Outcome, Failure> {
        let mut record = self.resolvable_topup(topup_id, false)?;
        let customer_id = record.customer_id.clone();
        self.load(&customer_id)?;
        record.status = "failed".into();
        record.failure_reason = Some(reason.to_string());
        record.resolved_at = Some(self.now);
        rows::resolve_topup(&self.connection, &record)?;
        let mut suspended = false;
        let mut failures = None;
        if record.origin == "auto" {
            if let Some(state) = self.auto_state_mut(&customer_id) {
                suspended = state.failed(topup_id);
                failures = Some(state.consecutive_failures);
                self.save_auto_topup(&customer_id)?;
            }
        }
        let mut payload = topup_payload(&record);
        payload["reason"] = json!(reason);
        payload["consecutive_failures"] = json!(failures);
        payload["auto_topup_suspended"] = json!(suspended);
        self.notify("topup.failed", Some(&customer_id), payload)?;
        if suspended {
            tracing::warn!(customer = %customer_id, "automatic top-up suspended after repeated payment failures");
        }
        Ok(Outcome::Topup {
            topup: record,
            balance_after: None,
        })
    }

    /// Set a customer's automatic top-up: a new setting clears a suspension
    /// and the failure count, keeps a pending top-up pending and the rate
    /// limit's history, and starts a top-up at once if the balance is low.
    pub(super) fn put_auto_topup(
        &mut self,
        customer_id: &Id,
        config: &AutoTopup,
    ) -> Result<Outcome, Failure> {
        topup::validate_auto_topup(config).map_err(|(field, message)| {
            refusal("invalid_request", format!("{field}: {message}"))
        })?;
        self.pack(&config.pack)?;
        self.prepare(customer_id)?;
        let previous = self.cache.get(customer_id).and_then(|c| c.auto.clone());
        let mut state = AutoTopupState::new(config.clone());
        if let Some(previous) = previous {
            state.pending = previous.pending;
            state.recent = previous.recent;
        }
        self.cache.get_mut(customer_id).expect("prepared").auto = Some(state);
        self.save_auto_topup(customer_id)?;
        self.check_topup_later(customer_id);
        self.check_topups()?;
        let state = self
            .cache
            .get(customer_id)
            .and_then(|c| c.auto.clone())
            .expect("just set");
        Ok(Outcome::AutoTopup {
            customer_id: customer_id.clone(),
            state,
        })
    }

    /// Check the customer's automatic top-up once the command is complete.
    pub(super) fn check_topup_later(&mut self, customer_id: &Id) {
        if self
            .cache
            .get(customer_id)
            .is_some_and(|c| c.auto.is_some())
        {
            self.topup_checks.push(customer_id.clone());
        }
    }

    /// Start the automatic top-ups that the balances after the command call for.
    pub(super) fn check_topups(&mut self) -> db::Result<()> {
        if self.topup_checks.is_empty() {
            return Ok(());
        }
        let mut customers = std::mem::take(&mut self.topup_checks);
        customers.sort();
        customers.dedup();
        let now = self.now;
        for customer_id in customers {
            let Some(cached) = self.cache.get(&customer_id) else {
                continue;
            };
            if cached.auto.as_ref().is_some_and(AutoTopupState::armed) {
                let balance = cached.ledger.net(now);
                self.maybe_auto_topup(&customer_id, balance)?;
            }
        }
        Ok(())
    }

    fn auto_state_mut(&mut self, customer_id: &Id) -> Option<&mut AutoTopupState> {
        self.cache
            .get_mut(customer_id)
            .and_then(|c| c.auto.as_mut())
    }

    fn save_auto_topup(&mut self, customer_id: &Id) -> db::Result<()> {
        if let Some(state) = self.cache.get(customer_id).and_then(|c| c.auto.as_ref()) {
            rows::upsert_auto_topup(&self.connection, customer_id.as_str(), state, self.now)?;
        }
        Ok(())
    }

    /// Start an automatic top-up if the customer's balance (available less
    /// debt) is below its threshold and the rules allow one now.
    pub(super) fn maybe_auto_topup(&mut self, customer_id: &Id, balance: Amount) -> db::Result<()> {
        let Some(state) = self
            .cache
            .get(customer_id)
            .and_then(|c| c.auto.as_ref())
            .filter(|s| s.armed())
        else {
            return Ok(());
        };
        let Some(pack) = self.packs.get(&state.config.pack).cloned() else {
            let message = format!("credit pack {} does not exist", state.config.pack);
            return self.auto_topup_refused(customer_id, message);
        };
        let now = self.now;
        let quantity = match state.decide(&pack, balance, now) {
            Decision::Buy(quantity) => quantity,
            Decision::Idle => return Ok(()),
            Decision::RateLimited => {
                tracing::debug!(customer = %customer_id, "automatic top-up due but rate-limited");
                return Ok(());
            }
        };
        let timeout = state.config.payment_timeout_seconds;
        let id = Id::derived(&format!(
            "{}{}",
            topup::AUTO_PREFIX,
            rows::next_topup_sequence(&self.connection)?
        ));
        match self.start_topup(id.clone(), customer_id, "auto", &pack, quantity, timeout) {
            Ok(_) => {}
            Err(Failure::Fatal(error)) => return Err(error),
            Err(other) => {
                // Only an order past the largest amount: nothing to buy.
                return self.auto_topup_refused(customer_id, failure_text(&other));
            }
        }
        if let Some(state) = self.auto_state_mut(customer_id) {
            state.started(id, now);
        }
        self.save_auto_topup(customer_id)
    }

    /// A due automatic top-up could not start: say why in its state (shown
    /// by `GET /v1/customers/{id}/auto-topup`) and in the log.
    fn auto_topup_refused(&mut self, customer_id: &Id, message: String) -> db::Result<()> {
        let now = self.now;
        let news = self
            .auto_state_mut(customer_id)
            .is_some_and(|state| state.refused(message.clone(), now));
        if !news {
            return Ok(());
        }
        tracing::warn!(customer = %customer_id, "automatic top-up not started: {message}");
        self.save_auto_topup(customer_id)
    }

    /// Fail the top-ups whose payment deadline passed (from the tick).
    pub(super) fn expire_topup_payments(&mut self) -> db::Result<usize> {
        let overdue = rows::overdue_topups(&self.connection, self.now, MAX_OVERDUE_PER_TICK)?;
        let mut count = 0;
        for id in overdue {
            match self.fail_topup(&Id::derived(&id), PAYMENT_TIMEOUT) {
                Ok(_) => count += 1,
                Err(Failure::Fatal(error)) => return Err(error),
                Err(other) => {
                    tracing::warn!(topup = %id, "overdue top-up not failed: {}", failure_text(&other))
                }
            }
        }
        Ok(count)
    }
}

fn failure_text(failure: &Failure) -> String {
    match failure {
        Failure::Store(error) => error.to_string(),
        Failure::Refused(error) => error.to_string(),
        Failure::Rejected(refusal) => refusal.message.clone(),
        Failure::Fatal(error) => error.to_string(),
    }
}
