//! Response bodies and their rendering from store outcomes.
//!
//! Request bodies live next to their handlers; responses are shared because
//! several routes render the same resource.

use serde::Serialize;
use tally_core::{Amount, Draw, Grant, Hold};
use tally_store::{CustomerRecord, EntryRecord, GrantRecord};
use utoipa::ToSchema;

use crate::edge::{metadata_value, rfc3339};

pub fn amount(a: Amount) -> String {
    a.to_string()
}

/// Millionths (of a credit or a unit), of any size, as a decimal string.
pub fn micros(micros: i128) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let magnitude = micros.unsigned_abs();
    let (whole, fraction) = (magnitude / 1_000_000, magnitude % 1_000_000);
    if fraction == 0 {
        format!("{sign}{whole}")
    } else {
        let digits = format!("{fraction:06}");
        format!("{sign}{whole}.{}", digits.trim_end_matches('0'))
    }
}

#[derive(Serialize, ToSchema)]
pub struct CustomerBody {
    pub id: String,
    pub name: Option<String>,
    pub plan: Option<String>,
    pub region: Option<String>,
    pub currency: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    pub created_at: String,
    pub overage: OverageBody,
}

/// What happens when a spend needs more credits than the customer has.
#[derive(Serialize, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OverageBody {
    /// `block` (the default), `allow_negative` (charges, holds and usage may
    /// go below zero down to `limit`) or `metered_only` (usage events may go
    /// below zero, down to `limit` if given; synchronous charges and holds are
    /// refused past the credits).
    pub policy: String,
    /// How far below zero, in credits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub limit: Option<crate::edge::AmountInput>,
}

impl From<tally_core::OveragePolicy> for OverageBody {
    fn from(policy: tally_core::OveragePolicy) -> Self {
        OverageBody {
            policy: policy.name().to_string(),
            limit: policy.limit().map(crate::edge::AmountInput),
        }
    }
}

impl OverageBody {
    /// The policy this body describes, or a 400 naming `param`.
    pub fn policy(&self, param: &str) -> Result<tally_core::OveragePolicy, crate::error::ApiError> {
        // A limit negative, missing where the policy needs one or given
        // where it takes none is the limit's fault, not the policy's.
        let limit_param;
        let about_limit = match (self.policy.as_str(), self.limit) {
            (_, Some(limit)) if limit.0.is_negative() => true,
            ("allow_negative", None) | ("block", Some(_)) => true,
            _ => false,
        };
        let param = match about_limit {
            false => param,
            true if param == "policy" => "limit",
            true => {
                limit_param = format!("{param}.limit");
                &limit_param
            }
        };
        tally_core::OveragePolicy::from_parts(&self.policy, self.limit.map(|l| l.0))
            .map_err(|message| crate::error::ApiError::invalid(param, message))
    }
}

impl From<&CustomerRecord> for CustomerBody {
    fn from(c: &CustomerRecord) -> Self {
        CustomerBody {
            id: c.id.to_string(),
            name: c.name.clone(),
            plan: c.plan.clone(),
            region: c.region.clone(),
            currency: c.currency.clone(),
            metadata: metadata_value(&c.metadata),
            created_at: rfc3339(c.created_at),
            overage: OverageBody::from(c.overage),
        }
    }
}

/// Money: a decimal amount in a currency.
#[derive(Serialize, ToSchema)]
pub struct MoneyBody {
    pub amount: String,
    pub currency: String,
}

#[derive(Serialize, ToSchema)]
pub struct GrantBody {
    pub id: String,
    pub customer_id: String,
    pub amount: String,
    pub remaining: String,
    /// `purchase`, `plan_allocation`, `promotion`, `refund`, `adjustment`, `transfer` or `rollover`.
    pub source: String,
    pub paid: bool,
    /// Money paid per credit.
    pub cost_basis: Option<MoneyBody>,
    pub priority: i32,
    pub effective_at: String,
    pub expires_at: Option<String>,
    pub scope: Option<Vec<String>>,
    /// `pending`, `active`, `expired` or `voided`.
    pub status: String,
    /// What expired when the grant expired (what a reinstatement restores).
    pub expired_amount: String,
    /// When an expired lot expired: its `expires_at`, or earlier when a plan
    /// change or a cancellation ended it (null unless `status` is `expired`).
    pub expired_at: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    /// The payment or other outside reference (a top-up's payment; a lot made
    /// from another's credits carries that lot's).
    pub external_reference: Option<String>,
    pub created_at: String,
    /// For a lot the ledger made from another's credits (a refund, or a
    /// hold's return, after that lot was voided or expired): the lot they
    /// were first granted in. A void of it is priced by that lot's payment.
    pub origin: Option<String>,
}

impl GrantBody {
    pub fn render(record: &GrantRecord, now: tally_core::Timestamp) -> GrantBody {
        let g: &Grant = &record.grant;
        GrantBody {
            id: g.id.to_string(),
            customer_id: g.customer_id.to_string(),
            amount: amount(g.amount),
            remaining: amount(g.remaining),
            source: g.source.as_str().to_string(),
            paid: g.paid,
            cost_basis: g.cost_basis.as_ref().map(|c| MoneyBody {
                amount: amount(c.per_credit),
                currency: c.currency.clone(),
            }),
            priority: g.priority,
            effective_at: rfc3339(g.effective_at),
            expires_at: g.expires_at.map(rfc3339),
            scope: g.scope.clone(),
            status: g.display_status(now).to_string(),
            expired_amount: amount(g.expired_amount),
            expired_at: match g.status {
                tally_core::GrantStatus::Expired => g.expired_at.or(g.expires_at).map(rfc3339),
                _ => None,
            },
            metadata: metadata_value(&record.metadata),
            external_reference: record.external_reference.clone(),
            created_at: rfc3339(record.created_at),
            origin: g.origin.as_ref().map(ToString::to_string),
        }
    }
}

/// Credits taken from or returned to one grant.
#[derive(Serialize, ToSchema)]
pub struct DrawBody {
    pub grant_id: String,
    pub amount: String,
}

pub fn draws(list: &[Draw]) -> Vec<DrawBody> {
    list.iter()
        .map(|d| DrawBody {
            grant_id: d.grant_id.to_string(),
            amount: amount(d.amount),
        })
        .collect()
}

#[derive(Serialize, ToSchema)]
pub struct HoldBody {
    pub id: String,
    pub customer_id: String,
    pub amount: String,
    /// `active`, `captured`, `released` or `expired`.
    pub status: String,
    pub captured: String,
    /// What went back to the balance: the rest of a partial capture, or
    /// all of a released or expired hold (`0` while active).
    pub released: String,
    /// The grants the held credits were reserved from (when the hold was
    /// placed; a capture draws on them in this order).
    pub drawn: Vec<DrawBody>,
    pub feature: Option<String>,
    pub member_id: Option<String>,
    pub created_at: String,
    pub expires_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance_after: Option<String>,
    /// The version and rule whose price the hold locked (holds by feature and quantity).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pricebook: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantity: Option<String>,
}

impl HoldBody {
    pub fn render(hold: &Hold, balance_after: Option<Amount>) -> HoldBody {
        HoldBody {
            id: hold.id.to_string(),
            customer_id: hold.customer_id.to_string(),
            amount: amount(hold.amount),
            status: hold.status.as_str().to_string(),
            captured: amount(hold.captured),
            released: amount(match hold.status {
                tally_core::HoldStatus::Active => Amount::ZERO,
                _ => hold
                    .amount
                    .checked_sub(hold.captured)
                    .expect("captured is at most held"),
            }),
            drawn: draws(&hold.reservations),
            feature: hold.feature.clone(),
            member_id: hold.member_id.as_ref().map(ToString::to_string),
            created_at: rfc3339(hold.created_at),
            expires_at: rfc3339(hold.expires_at),
            balance_after: balance_after.map(amount),
            pricebook: None,
            rule: None,
            quantity: None,
        }
    }

    /// Show the price the hold locked.
    pub fn price(&mut self, pricing: Option<&tally_core::pricebook::Pricing>) {
        if let Some(p) = pricing {
            self.pricebook = p.pricebook().map(str::to_owned);
            self.rule = Some(p.rule_label());
            self.quantity = Some(amount(p.quantity));
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct PostingBody {
    pub from: String,
    pub to: String,
    pub amount: String,
}

#[derive(Serialize, ToSchema)]
pub struct EntryBody {
    /// `ent_<sequence>`.
    pub id: String,
    /// `grant`, `grant_effective` (a lot issued with its `effective_at` ahead took effect),
    /// `charge`, `hold`, `capture`, `release`, `hold_expired`, `refund`, `void`, `expire`,
    /// `expiry_extended`, `reinstate`, `debt_repaid`, `rollover`, `transfer_out`, `transfer_in`
    /// or `budget_transfer`.
    pub kind: String,
    pub customer_id: String,
    pub amount: String,
    /// The charge, hold, refund, grant, void or expiry change this entry belongs to.
    pub reference: Option<String>,
    /// The lots the entry moved credits into or out of, the lot an expiry
    /// change or void changed, and for a capture the lots it spent from
    /// (through the hold).
    pub grant_ids: Vec<String>,
    pub member_id: Option<String>,
    pub feature: Option<String>,
    pub reason: Option<String>,
    /// Who caused it: `key:<id>` (the API key that sent it), `source:<name>` for usage
    /// events from a stream (`kafka`, `nats`, `pubsub`), or null for the engine itself
    /// (expiries).
    pub actor: Option<String>,
    pub effective_at: String,
    pub recorded_at: String,
    /// The customer's available balance after this entry.
    pub balance_after: String,
    pub postings: Vec<PostingBody>,
    /// The price book version and rule that priced it (charges by feature).
    pub pricebook: Option<String>,
    pub rule: Option<String>,
    /// The quantity priced.
    pub quantity: Option<String>,
    /// A transfer's other customer (only on `transfer_out` and `transfer_in`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counterparty_customer_id: Option<String>,
    /// What a refund gave back: the charge, usage event or captured hold
    /// it named (only on `refund` entries).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refund_of: Option<String>,
    /// A budget transfer's receiving member (only on `budget_transfer`
    /// entries; `member_id` is the sending one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counterparty_member_id: Option<String>,
    /// What `refund_of` names: `charge` (a charge or usage event) or `hold`
    /// (a captured hold; a hold and a charge may share an id). Only on
    /// `refund` entries recorded since it is kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refund_of_kind: Option<String>,
    /// An expiry change (only on `expiry_extended` and `reinstate` entries
    /// made by one): the lot's expiry before and after it, null for never.
    /// The lot is in `grant_ids`, even when the entry moved no credits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expiry_change: Option<ExpiryChangeBody>,
}

#[derive(Serialize, ToSchema)]
pub struct ExpiryChangeBody {
    pub before: Option<String>,
    pub after: Option<String>,
}

pub fn entry_id(sequence: i64) -> String {
    format!("ent_{sequence}")
}

impl From<&EntryRecord> for EntryBody {
    fn from(record: &EntryRecord) -> Self {
        let d = &record.draft;
        EntryBody {
            id: entry_id(record.sequence),
            kind: d.kind.as_str().to_string(),
            customer_id: d.customer_id.to_string(),
            amount: amount(d.amount),
            reference: d.reference.as_ref().map(ToString::to_string),
            grant_ids: record.lots(),
            member_id: d.member_id.as_ref().map(ToString::to_string),
            feature: d.feature.clone(),
            reason: d.reason.clone(),
            actor: record.actor.clone(),
            effective_at: rfc3339(d.effective_at),
            recorded_at: rfc3339(record.recorded_at),
            balance_after: amount(d.balance_after),
            postings: d
                .postings
                .iter()
                .map(|p| PostingBody {
                    from: p.from.to_string(),
                    to: p.to.to_string(),
                    amount: amount(p.amount),
                })
                .collect(),
            pricebook: record
                .pricing
                .as_ref()
                .and_then(|p| p.pricebook().map(str::to_owned)),
            rule: record.pricing.as_ref().map(|p| p.rule_label()),
            // A capture by amount says which rule the hold locked, but not
            // how many units it used (as the usage report counts none).
            quantity: record
                .pricing
                .as_ref()
                .and_then(|p| p.used_quantity())
                .map(amount),
            counterparty_customer_id: record.facts.as_ref().and_then(|f| f.counterparty.clone()),
            refund_of: record.facts.as_ref().and_then(|f| f.refund_of.clone()),
            counterparty_member_id: record
                .facts
                .as_ref()
                .and_then(|f| f.counterparty_member.clone()),
            refund_of_kind: record
                .facts
                .as_ref()
                .filter(|f| f.refund_of.is_some())
                .and_then(|f| f.refund_of_hold)
                .map(|hold| if hold { "hold" } else { "charge" }.to_owned()),
            expiry_change: record
                .facts
                .as_ref()
                .and_then(|f| f.expiry.as_ref())
                .map(|e| ExpiryChangeBody {
                    before: e.before.map(rfc3339),
                    after: e.after.map(rfc3339),
                }),
        }
    }
}

/// A page of a list.
#[derive(Serialize, ToSchema)]
pub struct Page<T: ToSchema> {
    pub data: Vec<T>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}
