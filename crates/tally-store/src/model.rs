//! What the store accepts (commands) and answers (outcomes and refusals).
//!
//! Outcomes are serialized into the operations table so that a retry of the
//! same id returns exactly what the first attempt returned.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tally_core::pricebook::{Contract, Pricing};
use tally_core::{
    Amount, Balance, CostBasis, Draw, Grant, Hold, Id, LedgerError, OveragePolicy, Source,
    Timestamp,
};

fn is_zero(amount: &Amount) -> bool {
    amount.is_zero()
}

/// A change to the ledger; each carries the id that makes it idempotent.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    CreateCustomer(NewCustomer),
    Grant(NewGrant),
    Charge(NewCharge),
    Hold(NewHold),
    Capture {
        hold_id: Id,
        amount: Option<Amount>,
        /// For a hold placed by feature and quantity: the quantity used,
        /// priced by the rule the hold locked.
        #[serde(default)]
        quantity: Option<Amount>,
        reason: Option<String>,
    },
    Release {
        hold_id: Id,
        reason: Option<String>,
    },
    Refund(NewRefund),
    Void {
        id: Id,
        grant_id: Id,
        reason: String,
    },
    ChangeExpiry {
        id: Id,
        grant_id: Id,
        expires_at: Option<Timestamp>,
        reason: String,
    },
    CreateApiKey {
        id: Id,
        key_hash: String,
        scope: String,
    },
    /// Apply hold timeouts and grant expiries that are due.
    Tick,
    /// Set a customer's overage policy (idempotent by nature: a PUT), or
    /// with `None` remove it: the plan's (else block) governs again.
    SetOverage {
        customer_id: Id,
        overage: Option<OveragePolicy>,
    },
    /// Create or update a feature.
    PutFeature {
        key: String,
        name: String,
        unit: String,
    },
    /// A new draft version, maybe with the rules of another version.
    CreatePricebook {
        id: Id,
        from: Option<String>,
    },
    /// Replace a draft's rules.
    PutRules {
        id: String,
        rules: Vec<tally_core::Rule>,
    },
    /// Publish a draft (effective now, or later).
    Publish {
        id: String,
        effective_at: Option<Timestamp>,
    },
    /// Set a customer's contract (replacing the one before).
    PutContract {
        /// The contract's id (also `contract.id`): its idempotency key.
        id: Id,
        customer_id: Id,
        contract: Contract,
        /// Pin the version in effect at the contract's start (rates locked).
        lock_rates: bool,
    },
    /// A usage event: priced at its own timestamp and charged, exactly once
    /// per id. A refused event is not recorded under its id, so that it can
    /// be replayed once the cause is fixed (the caller keeps it as a dead
    /// letter).
    Event(NewEvent),
    /// An event that could not even be read: kept as a dead letter.
    DeadLetter(NewDeadLetter),
    /// Mark a dead letter replayed (its event was charged) or discarded.
    ResolveDeadLetter {
        dead_letter: i64,
        resolution: DeadLetterStatus,
        note: Option<String>,
    },
    /// Create or update a plan (a PUT: idempotent by nature).
    PutPlan(tally_core::Plan),
    /// Start a subscription, or change the plan of the active one.
    Subscribe(NewSubscription),
    /// Cancel the active subscription now or at the end of its period.
    CancelSubscription {
        customer_id: Id,
        at_period_end: bool,
    },
    /// Apply what is due for one customer (renewals, expiries) before a read.
    ApplyDue {
        customer_id: Id,
    },
    /// Move credits between customers, or budget between two members of one.
    Transfer(NewTransfer),
    /// Add or update a member of a customer (a PUT).
    PutMember {
        customer_id: Id,
        member_id: Id,
        /// `None`: kept as it is; `Some(None)`: removed.
        name: Option<Option<String>>,
        /// `None`: kept as it is (with what it counted); `Some(None)`: removed.
        budget: Option<Option<tally_core::Budget>>,
    },
    /// Set a customer's alert thresholds (a PUT).
    PutAlerts {
        customer_id: Id,
        alerts: Alerts,
    },
    /// Register a webhook endpoint.
    CreateWebhookEndpoint(NewWebhookEndpoint),
    /// Change an endpoint's URL or notification types (`None`: kept as it
    /// is). Its pending deliveries go to the new URL.
    UpdateWebhookEndpoint {
        id: Id,
        url: Option<String>,
        events: Option<Vec<String>>,
    },
    /// Delete an endpoint: no notification goes to it any more, and its
    /// pending deliveries fail. Its id stays taken.
    DeleteWebhookEndpoint {
        id: Id,
    },
    /// Give an endpoint a new signing secret, exactly once by `id`. The one
    /// it had signs deliveries too (a second `v1`) for `previous_valid_seconds`
    /// more on the engine's clock (0: it stops at once), so that receivers
    /// can switch without refusing a delivery; one that was still valid from
    /// an earlier rotation stops at once.
    RotateWebhookSecret {
        id: Id,
        endpoint_id: Id,
        /// The new secret (generated by the caller, per attempt).
        secret: String,
        previous_valid_seconds: u32,
    },
    /// Revoke an API key: it authenticates nothing from then on (a
    /// revoked key stays revoked; revoking it again changes nothing).
    RevokeApiKey {
        id: Id,
    },
    /// Change a customer's name, plan, region or metadata (`None`: kept;
    /// `Some(None)`: removed).
    UpdateCustomer(CustomerUpdate),
    /// The result of one delivery attempt (sent by the delivery worker).
    RecordDelivery {
        delivery_id: String,
        /// The receiver answered 2xx.
        ok: bool,
        status: Option<u16>,
        error: Option<String>,
    },
    /// Create or update a credit pack (a PUT).
    PutCreditPack(tally_core::CreditPack),
    /// Start a top-up: a payment is asked for (`topup.created`); the credits
    /// come when it is confirmed.
    CreateTopup(NewTopup),
    /// The payment step succeeded: grant the top-up's credits.
    ConfirmTopup {
        topup_id: Id,
        payment_reference: Option<String>,
    },
    /// The payment step failed (`topup.failed`).
    FailTopup {
        topup_id: Id,
        reason: String,
    },
    /// Set a customer's automatic top-up (a PUT).
    PutAutoTopup {
        customer_id: Id,
        config: tally_core::AutoTopup,
    },
    /// What a charge would do now, writing nothing.
    Quote {
        customer_id: Id,
        usage: UsageInput,
        member_id: Option<Id>,
    },
}

/// A usage event (`feature_used`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEvent {
    pub id: Id,
    pub customer_id: Id,
    pub feature: String,
    pub quantity: Amount,
    pub member_id: Option<Id>,
    /// When the usage happened (default: when it arrived, see `received_at`).
    pub timestamp: Option<Timestamp>,
    /// When an event without a `timestamp` first arrived, if that was before
    /// it is charged now (a dead letter's replay): what its timestamp
    /// defaults to, so that it is priced, checked for age and reported as of
    /// its arrival, not of the replay. Not part of the event's identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_at: Option<Timestamp>,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Where it came from: `http`, `kafka`, `nats`, `pubsub`, `replay`. Not
    /// part of the event's identity: the same event from two sources is one.
    #[serde(default)]
    pub source: String,
}

/// An event that cannot be charged, with why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewDeadLetter {
    pub source: String,
    pub event_id: Option<String>,
    pub customer_id: Option<String>,
    pub payload: String,
    pub code: String,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterStatus {
    Pending,
    Replayed,
    Discarded,
}

impl DeadLetterStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterStatus::Pending => "pending",
            DeadLetterStatus::Replayed => "replayed",
            DeadLetterStatus::Discarded => "discarded",
        }
    }

    pub fn parse(text: &str) -> Option<DeadLetterStatus> {
        Some(match text {
            "pending" => DeadLetterStatus::Pending,
            "replayed" => DeadLetterStatus::Replayed,
            "discarded" => DeadLetterStatus::Discarded,
            _ => return None,
        })
    }
}

/// A stored dead letter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterRecord {
    pub id: i64,
    pub source: String,
    pub event_id: Option<String>,
    pub customer_id: Option<String>,
    pub payload: String,
    pub code: String,
    pub message: String,
    /// How many times this event was refused.
    pub attempts: i64,
    pub first_seen: Timestamp,
    pub last_seen: Timestamp,
    pub status: DeadLetterStatus,
    pub resolved_at: Option<Timestamp>,
    pub note: Option<String>,
}

/// Usage to be priced by the price book.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageInput {
    pub feature: String,
    pub quantity: Amount,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

impl Command {
    /// The idempotency namespace and id of this command, if it has one.
    pub fn operation_key(&self) -> Option<(&'static str, &Id)> {
        Some(match self {
            Command::CreateCustomer(c) => ("customer", &c.id),
            Command::Grant(g) => ("grant", &g.id),
            Command::Charge(c) => ("charge", &c.id),
            Command::Hold(h) => ("hold", &h.id),
            Command::Capture { hold_id, .. } | Command::Release { hold_id, .. } => {
                ("hold_resolution", hold_id)
            }
            Command::Refund(r) => ("refund", &r.id),
            Command::Void { id, .. } => ("void", id),
            Command::ChangeExpiry { id, .. } => ("expiry", id),
            Command::CreateApiKey { id, .. } => ("api_key", id),
            Command::CreatePricebook { id, .. } => ("pricebook", id),
            Command::Event(event) => ("event", &event.id),
            Command::PutContract { id, .. } => ("contract", id),
            Command::Subscribe(s) => ("subscription", &s.id),
            Command::CreateWebhookEndpoint(e) => ("webhook_endpoint", &e.id),
            Command::RotateWebhookSecret { id, .. } => ("webhook_secret_rotation", id),
            Command::Transfer(t) => ("transfer", &t.id),
            Command::CreateTopup(t) => ("topup", &t.id),
            Command::ConfirmTopup { topup_id, .. } | Command::FailTopup { topup_id, .. } => {
                ("topup_resolution", topup_id)
            }
            Command::Tick
            | Command::PutFeature { .. }
            | Command::PutRules { .. }
            | Command::Publish { .. }
            | Command::DeadLetter(_)
            | Command::ResolveDeadLetter { .. }
            | Command::SetOverage { .. }
            | Command::PutPlan(_)
            | Command::CancelSubscription { .. }
            | Command::ApplyDue { .. }
            | Command::PutAlerts { .. }
            | Command::PutMember { .. }
            | Command::UpdateWebhookEndpoint { .. }
            | Command::DeleteWebhookEndpoint { .. }
            | Command::RevokeApiKey { .. }
            | Command::UpdateCustomer(_)
            | Command::RecordDelivery { .. }
            | Command::PutCreditPack(_)
            | Command::PutAutoTopup { .. }
            | Command::Quote { .. } => return None,
        })
    }
}

/// The notification types a webhook endpoint may subscribe to (`*`: all).
pub const NOTIFICATION_TYPES: [&str; 9] = [
    "balance.low",
    "balance.depleted",
    "grant.expiring",
    "grant.expired",
    "hold.expired",
    "subscription.renewed",
    "topup.created",
    "topup.succeeded",
    "topup.failed",
];

/// A manual top-up: `quantity` of a credit pack for a customer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewTopup {
    /// Its id (idempotency key); `auto_` starts the ids of automatic ones.
    pub id: Id,
    pub customer_id: Id,
    pub pack: String,
    pub quantity: u32,
    /// The payment fails if it is not confirmed within this long (default a day).
    pub payment_timeout_seconds: Option<u32>,
}

/// A top-up and where its payment stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopupRecord {
    pub id: Id,
    pub customer_id: Id,
    /// `manual` or `auto`.
    pub origin: String,
    pub pack: String,
    pub quantity: u32,
    pub credits: Amount,
    /// The exact money asked for, in `currency`.
    pub price: Amount,
    pub currency: String,
    pub expires_after_days: Option<u32>,
    pub priority: i32,
    /// `pending_payment`, `succeeded` or `failed`.
    pub status: String,
    pub payment_due_at: Timestamp,
    pub payment_reference: Option<String>,
    pub failure_reason: Option<String>,
    /// The lot its credits went to, and that grant's entry.
    pub grant_id: Option<Id>,
    pub entry_id: Option<i64>,
    pub created_at: Timestamp,
    pub resolved_at: Option<Timestamp>,
}

/// The plans a customer was on over time, which price its usage by the
/// usage's own timestamp (a late event by the plan it was on then). Empty
/// until its plan first changes: the present plan applies at every time.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PlanHistory(Vec<PlanSpan>);

/// From `since` on (until the next span; `None`: from the start), the
/// customer was on `plan`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSpan {
    pub since: Option<Timestamp>,
    pub plan: Option<String>,
}

impl PlanHistory {
    /// The plan in force at `at`; `present` when the plan never changed.
    pub fn at<'a>(&'a self, at: Timestamp, present: Option<&'a str>) -> Option<&'a str> {
        match self
            .0
            .iter()
            .rev()
            .find(|span| span.since.is_none_or(|since| since <= at))
        {
            Some(span) => span.plan.as_deref(),
            None => present,
        }
    }

    /// The plan changed from `before` to `after` at `at` (a renewal applied
    /// late changes it at its boundary, in the past). Never before the last
    /// change (a writer whose clock is behind the last one's): the spans
    /// stay in order, and a change at the same instant as the last replaces
    /// it.
    pub fn change(&mut self, at: Timestamp, before: Option<String>, after: Option<String>) {
        let at = match self.0.last().and_then(|span| span.since) {
            Some(last) => at.max(last),
            None => at,
        };
        if self.0.is_empty() {
            self.0.push(PlanSpan {
                since: None,
                plan: before,
            });
        }
        self.0
            .retain(|span| span.since.is_none_or(|since| since < at));
        self.0.push(PlanSpan {
            since: Some(at),
            plan: after,
        });
    }
}

/// A customer's alert settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alerts {
    /// `balance.low` is sent when the balance falls below each of these.
    pub low_balance: Vec<Amount>,
    /// `grant.expiring` is sent this many days before a lot expires.
    pub grant_expiring_days: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewWebhookEndpoint {
    pub id: Id,
    pub url: String,
    /// Notification types, or `*`.
    pub events: Vec<String>,
    /// The signing secret (generated by the caller; kept with the endpoint).
    pub secret: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookEndpointRecord {
    pub id: Id,
    pub url: String,
    pub events: Vec<String>,
    pub secret: String,
    pub created_at: Timestamp,
    /// Until when the secret before the last rotation signs deliveries too
    /// (`None`: no earlier secret is in use).
    #[serde(default)]
    pub previous_secret_expires_at: Option<Timestamp>,
}

/// A delivery the worker should attempt now: the signed body is the same on
/// every attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DueDelivery {
    pub id: String,
    pub endpoint_id: String,
    pub attempts: i64,
    pub url: String,
    pub secret: String,
    /// The secret before the last rotation, while it still signs.
    pub previous_secret: Option<String>,
    pub body: String,
}

/// One delivery in an endpoint's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub id: String,
    pub endpoint_id: String,
    pub notification: i64,
    pub kind: String,
    pub customer_id: Option<String>,
    /// `pending`, `delivered` or `failed` (gave up).
    pub status: String,
    pub attempts: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<Timestamp>,
    pub delivered_at: Option<Timestamp>,
    pub created_at: Timestamp,
}

/// A change of a customer's balance, published once it is durable (the
/// customer's live stream).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceChange {
    pub customer_id: Id,
    pub entry_id: i64,
    pub kind: tally_core::EntryKind,
    pub amount: Amount,
    pub balance_after: Amount,
    pub recorded_at: Timestamp,
}

/// A transfer: credits from one customer to another (`from.customer_id !=
/// to.customer_id`), or budget between two members of one customer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewTransfer {
    pub id: Id,
    pub from_customer: Id,
    pub from_member: Option<Id>,
    pub to_customer: Id,
    pub to_member: Option<Id>,
    pub amount: Amount,
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferOutcome {
    pub id: Id,
    /// `credits` (between customers) or `budget` (between members).
    pub kind: String,
    pub amount: Amount,
    pub from_customer: Id,
    pub from_member: Option<Id>,
    pub to_customer: Id,
    pub to_member: Option<Id>,
    /// The entry on the sending side, and the customer's balance after it.
    pub from_entry: i64,
    pub from_balance_after: Amount,
    /// The entry on the receiving side (the same entry for a budget move).
    pub to_entry: i64,
    pub to_balance_after: Amount,
    /// The lots the receiver got.
    pub grants: Vec<Id>,
}

/// When a plan change takes effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanChange {
    Now,
    PeriodEnd,
}

/// Start a subscription (no active one) or change its plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewSubscription {
    /// This request's id: its idempotency key, and the subscription's id
    /// when it starts one.
    pub id: Id,
    pub customer_id: Id,
    pub plan: String,
    /// When a new subscription starts (default: now; never in the past).
    pub start_at: Option<Timestamp>,
    pub change: PlanChange,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewCustomer {
    pub id: Id,
    pub name: Option<String>,
    pub plan: Option<String>,
    pub region: Option<String>,
    pub currency: Option<String>,
    /// JSON object text, stored as given.
    pub metadata: Option<String>,
    /// The customer's overage policy (none: block).
    #[serde(default)]
    pub overage: Option<OveragePolicy>,
}

/// What `PATCH /v1/customers/{id}` changes: each field left out (`None`)
/// is kept, and `Some(None)` removes it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CustomerUpdate {
    pub customer_id: Id,
    pub name: Option<Option<String>>,
    pub plan: Option<Option<String>>,
    pub region: Option<Option<String>>,
    /// JSON object text.
    pub metadata: Option<Option<String>>,
}

impl NewCustomer {
    /// A customer with only its id: no name, plan, region, currency,
    /// metadata or overage policy of its own.
    pub fn with_id(id: Id) -> NewCustomer {
        NewCustomer {
            id,
            name: None,
            plan: None,
            region: None,
            currency: None,
            metadata: None,
            overage: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewGrant {
    pub id: Id,
    pub customer_id: Id,
    pub amount: Amount,
    pub source: Source,
    pub paid: bool,
    pub cost_basis: Option<CostBasis>,
    pub priority: i32,
    pub effective_at: Option<Timestamp>,
    pub expires_at: Option<Timestamp>,
    pub scope: Option<Vec<String>>,
    pub metadata: Option<String>,
    pub external_reference: Option<String>,
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewCharge {
    pub id: Id,
    pub customer_id: Id,
    /// Credits to charge; `None` when `usage` is priced by the price book.
    pub amount: Option<Amount>,
    pub feature: Option<String>,
    /// Feature, quantity and properties to price (the feature is `feature`).
    #[serde(default)]
    pub usage: Option<UsageInput>,
    pub member_id: Option<Id>,
    pub reason: Option<String>,
    pub metadata: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewHold {
    pub id: Id,
    pub customer_id: Id,
    /// Credits to hold; `None` when `usage` is priced by the price book.
    pub amount: Option<Amount>,
    pub feature: Option<String>,
    #[serde(default)]
    pub usage: Option<UsageInput>,
    pub timeout_seconds: i64,
    pub member_id: Option<Id>,
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewRefund {
    pub id: Id,
    /// The charge to refund, or the captured hold (`hold_id`).
    pub charge_id: Option<Id>,
    pub hold_id: Option<Id>,
    pub amount: Option<Amount>,
    pub reason: String,
}

/// A customer as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerRecord {
    pub id: Id,
    pub name: Option<String>,
    pub plan: Option<String>,
    pub region: Option<String>,
    pub currency: Option<String>,
    pub metadata: Option<String>,
    pub created_at: Timestamp,
    #[serde(default)]
    pub overage: OveragePolicy,
}

/// A grant with the fields the core does not need.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRecord {
    pub grant: Grant,
    pub metadata: Option<String>,
    pub external_reference: Option<String>,
    pub created_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeOutcome {
    pub id: Id,
    pub customer_id: Id,
    pub amount: Amount,
    pub drawn: Vec<Draw>,
    pub balance_after: Amount,
    pub entry_id: i64,
    pub feature: Option<String>,
    pub member_id: Option<Id>,
    #[serde(default)]
    pub pricing: Option<Pricing>,
    /// What went into debt under the overage policy.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub on_debt: Amount,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldOutcome {
    pub hold: Hold,
    pub balance_after: Amount,
    pub entry_id: i64,
    /// The price the hold locked (holds by feature and quantity).
    #[serde(default)]
    pub pricing: Option<Pricing>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureOutcome {
    pub hold_id: Id,
    pub customer_id: Id,
    pub captured: Amount,
    pub released: Amount,
    pub drawn: Vec<Draw>,
    pub balance_after: Amount,
    pub entry_id: i64,
    #[serde(default)]
    pub pricing: Option<Pricing>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub on_debt: Amount,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseOutcome {
    pub hold_id: Id,
    pub customer_id: Id,
    pub released: Amount,
    pub balance_after: Amount,
    pub entry_id: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundOutcome {
    pub id: Id,
    /// What was refunded: the charge or event id, or the captured hold's id
    /// (then `hold_id` is set too).
    pub charge_id: Id,
    /// The captured hold refunded, when the refund named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_id: Option<Id>,
    pub customer_id: Id,
    pub amount: Amount,
    pub returned: Vec<Draw>,
    pub new_grants: Vec<Id>,
    pub balance_after: Amount,
    pub entry_id: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoidOutcome {
    pub id: Id,
    pub grant_id: Id,
    pub customer_id: Id,
    pub voided: Amount,
    pub refundable_money: Option<(Amount, String)>,
    pub balance_after: Amount,
    pub entry_id: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpiryOutcome {
    pub id: Id,
    pub grant_id: Id,
    pub customer_id: Id,
    pub expires_at: Option<Timestamp>,
    pub reinstated: Amount,
    pub balance_after: Amount,
    pub entry_id: i64,
}

/// The result of a command that took effect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Customer(CustomerRecord),
    Grant {
        grant: GrantRecord,
        balance_after: Amount,
        entry_id: i64,
    },
    Charge(ChargeOutcome),
    Hold(HoldOutcome),
    Capture(CaptureOutcome),
    Release(ReleaseOutcome),
    Refund(RefundOutcome),
    Void(VoidOutcome),
    Expiry(ExpiryOutcome),
    ApiKey {
        id: Id,
        scope: String,
    },
    ApiKeyInfo(ApiKeyInfo),
    Tick {
        entries: usize,
    },
    Feature(crate::catalog::FeatureRecord),
    Pricebook(crate::catalog::PricebookRecord),
    Contract(crate::catalog::ContractRecord),
    Quote(QuoteOutcome),
    Event(EventOutcome),
    DeadLetter(DeadLetterRecord),
    Plan(tally_core::Plan),
    Subscription(tally_core::Subscription),
    Alerts {
        customer_id: Id,
        alerts: Alerts,
    },
    WebhookEndpoint(WebhookEndpointRecord),
    Member(tally_core::Member),
    Transfer(TransferOutcome),
    CreditPack(tally_core::CreditPack),
    Topup {
        topup: TopupRecord,
        /// After a confirmation: the customer's balance after the grant.
        balance_after: Option<Amount>,
    },
    AutoTopup {
        customer_id: Id,
        state: tally_core::AutoTopupState,
    },
    /// A delivery attempt recorded: the delivery's status now.
    Delivery {
        status: String,
    },
}

/// A charged usage event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventOutcome {
    pub id: Id,
    pub customer_id: Id,
    pub cost: Amount,
    pub drawn: Vec<Draw>,
    pub balance_after: Amount,
    pub entry_id: i64,
    pub member_id: Option<Id>,
    /// The version that priced it (none when the customer's contract did).
    pub pricebook: Option<String>,
    /// The rule that priced it (the whole pricing is on its ledger entry).
    pub rule: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub on_debt: Amount,
}

/// What a charge would do, were it made now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuoteOutcome {
    pub customer_id: Id,
    pub pricing: Pricing,
    /// The grants it would draw on, in burn order (empty when it does not fit).
    pub drawn: Vec<Draw>,
    /// Available credits after it (unchanged when it does not fit).
    pub balance_after: Amount,
    pub available: Amount,
    /// Why it would be refused (the charge's answer); `None`: it fits.
    pub refusal: Option<Refusal>,
}

/// A refusal that is part of an id's permanent history (a retry gets it again).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// The stable error code (`insufficient_credits`, ...).
    pub code: String,
    pub message: String,
    pub available: Option<Amount>,
}

impl From<&LedgerError> for Refusal {
    fn from(error: &LedgerError) -> Refusal {
        let code = match error {
            LedgerError::InsufficientCredits { .. } => "insufficient_credits",
            LedgerError::GrantNotFound(_) | LedgerError::HoldNotFound(_) => "not_found",
            LedgerError::GrantNotActive { .. } => "grant_not_active",
            LedgerError::HoldExpired(_) => "hold_expired",
            LedgerError::HoldAlreadyResolved(_) => "hold_already_resolved",
            LedgerError::CaptureExceedsHold { .. } => "capture_exceeds_hold",
            LedgerError::RefundExceedsCharge { .. } => "refund_exceeds_charge",
            LedgerError::InvalidExpiry(_) => "invalid_expiry",
            LedgerError::ReinstateWindowPassed(_) => "reinstate_window_passed",
            LedgerError::AmountNotPositive => "invalid_amount",
            LedgerError::AmountOverflow | LedgerError::CostBasisOverflow => "amount_too_large",
            LedgerError::MemberBudgetExceeded { .. } => "member_budget_exceeded",
            LedgerError::NoBudget => "member_without_budget",
        };
        let available = match error {
            LedgerError::InsufficientCredits { available, .. } => Some(*available),
            _ => None,
        };
        Refusal {
            code: code.to_string(),
            message: error.to_string(),
            available,
        }
    }
}

/// What the store answers for a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Executed {
    pub result: Result<Outcome, Refusal>,
    /// True when this answer is the stored result of an earlier attempt.
    pub replayed: bool,
}

/// Why the store could not answer with an outcome or a refusal.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("id {0} was already used with different content")]
    IdempotencyConflict(String),
    #[error("hold {0} is already resolved")]
    HoldAlreadyResolved(String),
    /// A refusal that is not kept as the id's outcome (the id may succeed later).
    #[error("{0}")]
    Rejected(Refusal),
    /// A cursor that does not belong to this list.
    #[error("cursor is not one this API returned for this list")]
    BadCursor,
    #[error("storage unavailable: {0}")]
    Unavailable(String),
}

/// A customer's balance with its grants, as reads see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalanceView {
    pub balance: Balance,
    pub grants: Vec<GrantRecord>,
    pub now: Timestamp,
    /// The customer's last journal entry in this view (its sequence).
    pub last_entry: Option<i64>,
}

/// A stored journal entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryRecord {
    pub sequence: i64,
    pub draft: tally_core::EntryDraft,
    pub actor: Option<String>,
    pub recorded_at: Timestamp,
    /// What priced it (charges and captures by feature and quantity).
    pub pricing: Option<Pricing>,
    /// What the entry is about beyond its postings (support's audit trail).
    pub facts: Option<EntryFacts>,
}

impl EntryRecord {
    /// The lots the entry moved credits into or out of, then the lot it
    /// changed without moving credits (an expiry change, a void of an empty
    /// lot, an expiry of a lot whose credits were all held: an `expire`
    /// entry's reference is its lot) and the lots a capture spent from
    /// (through the hold).
    pub fn lots(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .draft
            .grant_ids()
            .iter()
            .map(ToString::to_string)
            .collect();
        let expired = match self.draft.kind {
            tally_core::EntryKind::Expire => self.draft.reference.as_ref().map(ToString::to_string),
            _ => None,
        };
        let facts = self.facts.as_ref();
        let named = facts.and_then(|f| f.grant_id.clone());
        let spent = facts.map_or(&[][..], |f| f.spent_from.as_slice());
        for id in expired
            .into_iter()
            .chain(named)
            .chain(spent.iter().cloned())
        {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }
}

/// What an entry is about that its postings do not say: the lot an expiry
/// change or a void of an empty lot changed (they move no credits), the
/// expiry before and after a change, the other side of a transfer, what a
/// refund gave back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryFacts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry: Option<ExpiryFacts>,
    /// A transfer's other customer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counterparty: Option<String>,
    /// The charge, usage event or captured hold a refund gave back (by the
    /// id the refund named it with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund_of: Option<String>,
    /// A budget transfer's receiving member (the entry's `member_id` is the
    /// sending one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counterparty_member: Option<String>,
    /// Whether `refund_of` names a captured hold (a hold and a charge may
    /// share an id); `None` on entries recorded before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund_of_hold: Option<bool>,
    /// The lots a capture spent from (its postings move credits out of the
    /// hold, which took them from these lots when it was placed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spent_from: Vec<String>,
}

/// A lot's expiry before and after an expiry change (`None`: never), and
/// for a reinstatement when it expired (a lot ended early, by a plan change
/// or a cancellation, expired before its `expires_at`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpiryFacts {
    pub before: Option<Timestamp>,
    pub after: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_at: Option<Timestamp>,
}

/// Filters for a customer's ledger.
#[derive(Clone, Debug, Default)]
pub struct LedgerQuery {
    pub from: Option<Timestamp>,
    pub to: Option<Timestamp>,
    pub kind: Option<tally_core::EntryKind>,
    /// Only entries of this member (a budget transfer is the entry of both
    /// its members).
    pub member_id: Option<Id>,
    /// Only entries priced for this feature.
    pub feature: Option<String>,
    /// Only entries that moved credits into or out of this lot, or changed it.
    pub grant_id: Option<String>,
    /// Start the walk at this entry (a cursor from an earlier page); default: the newest.
    pub start: Option<i64>,
    pub limit: usize,
}

impl LedgerQuery {
    /// Whether an entry passes the kind, member, feature and lot filters
    /// (the time window is the walk's).
    pub fn matches(&self, record: &EntryRecord) -> bool {
        let draft = &record.draft;
        self.kind.is_none_or(|kind| draft.kind == kind)
            && self.member_id.as_ref().is_none_or(|member| {
                draft.member_id.as_ref() == Some(member)
                    || record
                        .facts
                        .as_ref()
                        .and_then(|f| f.counterparty_member.as_deref())
                        == Some(member.as_str())
            })
            && self
                .feature
                .as_ref()
                .is_none_or(|feature| draft.feature.as_ref() == Some(feature))
            && self
                .grant_id
                .as_ref()
                .is_none_or(|lot| record.lots().contains(lot))
    }
}

/// A page of a customer's journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerPage {
    pub entries: Vec<EntryRecord>,
    /// Where the next page starts; `None` when the history is exhausted.
    pub next: Option<i64>,
}

/// An API key as stored (the key itself is never stored, only its hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: String,
    pub scope: String,
}

/// An API key as listed (never the key itself: only its hash is stored).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyInfo {
    pub id: String,
    pub scope: String,
    pub created_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

/// What a usage report groups by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageGroup {
    Feature,
    Member,
}

/// The width of a usage report's buckets (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    Hour,
    Day,
    Month,
}

impl Granularity {
    /// The start of the bucket that holds `at`: the hour, the day or the
    /// first day of the month, in UTC (days and months as a member budget's
    /// windows are: [`tally_core::BudgetPeriod::window_start`]).
    pub fn bucket(self, at: Timestamp) -> Timestamp {
        const HOUR: i64 = 3_600 * Timestamp::MICROS_PER_SECOND;
        match self {
            Granularity::Hour => Timestamp(at.0.div_euclid(HOUR) * HOUR),
            Granularity::Day => tally_core::BudgetPeriod::Day.window_start(at),
            Granularity::Month => tally_core::BudgetPeriod::Month.window_start(at),
        }
    }

    /// The start of the bucket after the one that holds `at`.
    pub fn next(self, at: Timestamp) -> Timestamp {
        const DAY: i64 = 86_400 * Timestamp::MICROS_PER_SECOND;
        let start = self.bucket(at);
        match self {
            Granularity::Hour => Timestamp(start.0.saturating_add(DAY / 24)),
            Granularity::Day => Timestamp(start.0.saturating_add(DAY)),
            // Past the month's last day, then back to that month's first.
            Granularity::Month => self.bucket(Timestamp(start.0.saturating_add(32 * DAY))),
        }
    }
}

/// A usage report's window and shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsageQuery {
    pub group_by: UsageGroup,
    pub granularity: Granularity,
    /// Usage at or after this instant...
    pub from: Timestamp,
    /// ...and before this one.
    pub to: Timestamp,
}

/// One group's usage in one bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageLine {
    /// The bucket's start.
    pub bucket: Timestamp,
    /// The feature or member; `None` for usage without one (a charge by
    /// amount without a feature, spend by no member).
    pub group: Option<String>,
    /// Units used, in millionths: the quantities of the charges and captures
    /// priced from a quantity (by feature). Micro-units, `i128` so that no
    /// sum overflows.
    pub quantity_micros: i128,
    /// Credits consumed by the charges and captures, in micro-credits.
    pub credits_micros: i128,
    /// Charges and captures counted.
    pub records: u64,
}

/// A customer's usage, bucket by bucket (oldest first), each bucket's
/// groups in order of their key (no group first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageReport {
    pub lines: Vec<UsageLine>,
}

#[cfg(test)]
mod usage_tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        let parsed =
            time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                .unwrap();
        Timestamp((parsed.unix_timestamp_nanos() / 1_000) as i64)
    }

    #[test]
    fn buckets_start_on_the_hour_the_day_and_the_first_of_the_month_in_utc() {
        use Granularity::*;
        for (granularity, instant, start, next) in [
            (
                Hour,
                "2040-01-01T00:59:59.999999Z",
                "2040-01-01T00:00:00Z",
                "2040-01-01T01:00:00Z",
            ),
            (
                Hour,
                "2040-01-01T01:00:00Z",
                "2040-01-01T01:00:00Z",
                "2040-01-01T02:00:00Z",
            ),
            (
                Day,
                "2039-12-31T23:59:59Z",
                "2039-12-31T00:00:00Z",
                "2040-01-01T00:00:00Z",
            ),
            (
                Month,
                "2040-02-29T12:00:00Z",
                "2040-02-01T00:00:00Z",
                "2040-03-01T00:00:00Z",
            ),
            (
                Month,
                "2041-02-28T23:59:59Z",
                "2041-02-01T00:00:00Z",
                "2041-03-01T00:00:00Z",
            ),
            (
                Month,
                "2040-12-31T23:59:59Z",
                "2040-12-01T00:00:00Z",
                "2041-01-01T00:00:00Z",
            ),
            (
                Month,
                "2100-03-01T00:00:00Z",
                "2100-03-01T00:00:00Z",
                "2100-04-01T00:00:00Z",
            ),
            (
                Month,
                "1969-12-31T23:00:00Z",
                "1969-12-01T00:00:00Z",
                "1970-01-01T00:00:00Z",
            ),
            (
                Day,
                "1969-12-31T23:00:00Z",
                "1969-12-31T00:00:00Z",
                "1970-01-01T00:00:00Z",
            ),
            (
                Month,
                "2000-02-29T00:00:00Z",
                "2000-02-01T00:00:00Z",
                "2000-03-01T00:00:00Z",
            ),
        ] {
            assert_eq!(
                granularity.bucket(at(instant)),
                at(start),
                "{granularity:?} {instant}"
            );
            assert_eq!(
                granularity.next(at(instant)),
                at(next),
                "{granularity:?} {instant}"
            );
        }
        // Every day of four years lands in its own month's bucket.
        let mut day = at("2039-01-01T00:00:00Z");
        let end = at("2043-01-01T00:00:00Z");
        while day < end {
            let start = Month.bucket(day);
            let parsed = time::OffsetDateTime::from_unix_timestamp(day.0 / 1_000_000).unwrap();
            let first = time::OffsetDateTime::from_unix_timestamp(start.0 / 1_000_000).unwrap();
            assert_eq!(
                (first.year(), first.month(), first.day()),
                (parsed.year(), parsed.month(), 1)
            );
            assert_eq!(first.time(), time::Time::MIDNIGHT);
            day = Timestamp(day.0 + 86_400 * 1_000_000);
        }
    }
}
