//! Charges, holds (place, capture, release) and refunds.

use axum::extract::State;
use axum::response::Response;
use axum::Json;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tally_core::{Amount, Id};
use tally_store::{Command, NewCharge, NewHold, NewRefund, Outcome, UsageInput};
use utoipa::ToSchema;

use super::customers::{required_reason, unexpected};
use crate::auth::{Caller, Scope};
use crate::dto::{amount, draws, entry_id, DrawBody, HoldBody};
use crate::edge::{self, AmountInput, ApiJson, Path};
use crate::error::{ApiError, ErrorBody};
use crate::{reply, AppState};

/// The longest a hold may last: 30 days.
pub const MAX_HOLD_SECONDS: i64 = 30 * 24 * 3600;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCharge {
    /// The charge id: also its idempotency key, forever.
    pub id: String,
    pub customer_id: String,
    /// Credits to charge. Or give `feature` and `quantity` to have the price book price it.
    #[schema(value_type = Option<AmountInput>, example = "1.5")]
    pub amount: Option<AmountInput>,
    /// The feature paid for: decides which scoped grants may pay, and the price with `quantity`.
    pub feature: Option<String>,
    #[schema(value_type = Option<AmountInput>)]
    pub quantity: Option<AmountInput>,
    #[schema(value_type = Option<Object>)]
    #[serde(default, deserialize_with = "crate::edge::strict_opt")]
    pub properties: Option<serde_json::Value>,
    /// The teammate who spent it.
    pub member_id: Option<String>,
    pub reason: Option<String>,
    #[schema(value_type = Option<Object>)]
    #[serde(default, deserialize_with = "crate::edge::strict_opt")]
    pub metadata: Option<serde_json::Value>,
}

#[derive(Serialize, ToSchema)]
pub struct ChargeBody {
    pub id: String,
    pub customer_id: String,
    pub amount: String,
    /// Which grants paid, in burn order.
    pub drawn: Vec<DrawBody>,
    /// The part taken as debt, past the credits, under the customer's overage policy.
    pub on_debt: String,
    /// The balance right after this charge: available credits less any debt.
    pub balance_after: String,
    pub feature: Option<String>,
    pub member_id: Option<String>,
    /// The price book version that priced it (charges by feature and quantity).
    pub pricebook: Option<String>,
    /// The rule that priced it: `<version> rule <n>` or `contract <id> rule <n>`.
    pub rule: Option<String>,
    /// The quantity priced (charges by feature and quantity).
    pub quantity: Option<String>,
    pub entry_id: String,
}

/// The amount to spend: given directly, or usage for the price book to price.
pub fn spend_amount(
    amount: Option<AmountInput>,
    feature: &Option<String>,
    quantity: Option<AmountInput>,
    properties: Option<serde_json::Value>,
) -> Result<(Option<Amount>, Option<UsageInput>), ApiError> {
    match (amount, quantity) {
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "quantity",
            "give either amount, or feature and quantity, not both",
        )),
        (Some(amount), None) => {
            if properties.is_some() {
                return Err(ApiError::invalid(
                    "properties",
                    "properties price usage: give them with feature and quantity, not with amount",
                ));
            }
            Ok((Some(edge::positive(amount, "amount")?), None))
        }
        (None, Some(quantity)) => {
            let quantity = edge::positive(quantity, "quantity")?;
            let feature = feature
                .clone()
                .ok_or_else(|| ApiError::invalid("feature", "quantity needs a feature"))?;
            Ok((
                None,
                Some(UsageInput {
                    feature,
                    quantity,
                    properties: properties_of(properties)?,
                }),
            ))
        }
        (None, None) => Err(ApiError::invalid(
            "amount",
            "give amount, or feature and quantity",
        )),
    }
}

/// At most this many event properties, each key and value at most 256 characters.
const MAX_PROPERTIES: usize = 32;

/// Event properties: a JSON object of strings (numbers and booleans are taken
/// as their JSON text, so `{"model": "gpt-4", "tier": 2}` matches `"2"`).
pub fn properties_of(
    value: Option<serde_json::Value>,
) -> Result<std::collections::BTreeMap<String, String>, ApiError> {
    let mut properties = std::collections::BTreeMap::new();
    let Some(value) = value else {
        return Ok(properties);
    };
    let serde_json::Value::Object(map) = value else {
        return Err(ApiError::invalid(
            "properties",
            "properties must be a JSON object such as {\"model\": \"gpt-4\"}",
        ));
    };
    if map.len() > MAX_PROPERTIES {
        return Err(ApiError::invalid(
            "properties",
            format!("properties may hold at most {MAX_PROPERTIES} entries"),
        ));
    }
    for (key, value) in map {
        let text = match value {
            serde_json::Value::String(text) => text,
            serde_json::Value::Number(number) => number.to_string(),
            serde_json::Value::Bool(flag) => flag.to_string(),
            _ => {
                return Err(ApiError::invalid(
                    "properties",
                    format!("properties: {key} must be a string, number or boolean"),
                ))
            }
        };
        if key.is_empty() || key.len() > 256 || text.len() > 256 {
            return Err(ApiError::invalid(
                "properties",
                "properties: names must be 1 to 256 characters and values at most 256",
            ));
        }
        properties.insert(key, text);
    }
    Ok(properties)
}

fn feature(value: Option<String>) -> Result<Option<String>, ApiError> {
    value
        .map(|f| edge::id(&f, "feature").map(|_| f))
        .transpose()
}

fn member(value: Option<String>) -> Result<Option<Id>, ApiError> {
    value.map(|m| edge::id(&m, "member_id")).transpose()
}

/// Spend credits now.
#[utoipa::path(post, path = "/v1/charges", tag = "charges", request_body = CreateCharge,
    responses((status = 200, body = ChargeBody), (status = 400, body = ErrorBody), (status = 402, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, description = "unknown_feature or no_price", body = ErrorBody)), security(("bearer" = ["write"])))]
pub async fn create_charge(
    State(state): State<AppState>,
    caller: Caller,
    body: ApiJson<CreateCharge>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let body = body.read()?;
    let id = edge::id(&body.id, "id")?;
    let customer_id = edge::id(&body.customer_id, "customer_id")?;
    let feature = feature(body.feature)?;
    let (amount, usage) = spend_amount(body.amount, &feature, body.quantity, body.properties)?;
    let command = Command::Charge(NewCharge {
        id,
        customer_id,
        amount,
        feature,
        usage,
        member_id: member(body.member_id)?,
        reason: edge::text(body.reason, "reason", 1024)?,
        metadata: edge::metadata(body.metadata)?,
    });
    let executed = state.execute(command, &caller).await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::Charge(c) => Ok(ChargeBody {
            id: c.id.to_string(),
            customer_id: c.customer_id.to_string(),
            amount: amount_text(c.amount),
            drawn: draws(&c.drawn),
            on_debt: amount_text(c.on_debt),
            balance_after: amount_text(c.balance_after),
            feature: c.feature.clone(),
            member_id: c.member_id.as_ref().map(ToString::to_string),
            pricebook: c
                .pricing
                .as_ref()
                .and_then(|p| p.pricebook().map(str::to_owned)),
            rule: c.pricing.as_ref().map(|p| p.rule_label()),
            quantity: c.pricing.as_ref().map(|p| amount_text(p.quantity)),
            entry_id: entry_id(c.entry_id),
        }),
        _ => Err(unexpected()),
    }))
}

fn amount_text(a: Amount) -> String {
    amount(a)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateHold {
    pub id: String,
    pub customer_id: String,
    #[schema(value_type = Option<AmountInput>)]
    pub amount: Option<AmountInput>,
    pub feature: Option<String>,
    #[schema(value_type = Option<AmountInput>)]
    pub quantity: Option<AmountInput>,
    #[schema(value_type = Option<Object>)]
    #[serde(default, deserialize_with = "crate::edge::strict_opt")]
    pub properties: Option<serde_json::Value>,
    /// After this many seconds the hold releases itself (1 to 2592000).
    #[schema(minimum = 1, maximum = 2592000)]
    pub timeout_seconds: i64,
    pub member_id: Option<String>,
    pub reason: Option<String>,
}

/// Reserve credits; they count against the available balance at once.
#[utoipa::path(post, path = "/v1/holds", tag = "holds", request_body = CreateHold,
    responses((status = 200, body = HoldBody), (status = 400, body = ErrorBody), (status = 402, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, description = "unknown_feature or no_price", body = ErrorBody)), security(("bearer" = ["write"])))]
pub async fn create_hold(
    State(state): State<AppState>,
    caller: Caller,
    body: ApiJson<CreateHold>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let body = body.read()?;
    let id = edge::id(&body.id, "id")?;
    let customer_id = edge::id(&body.customer_id, "customer_id")?;
    if !(1..=MAX_HOLD_SECONDS).contains(&body.timeout_seconds) {
        return Err(ApiError::invalid(
            "timeout_seconds",
            format!("timeout_seconds must be between 1 and {MAX_HOLD_SECONDS}"),
        ));
    }
    let feature = feature(body.feature)?;
    let (amount, usage) = spend_amount(body.amount, &feature, body.quantity, body.properties)?;
    let command = Command::Hold(NewHold {
        id,
        customer_id,
        amount,
        feature,
        usage,
        timeout_seconds: body.timeout_seconds,
        member_id: member(body.member_id)?,
        reason: edge::text(body.reason, "reason", 1024)?,
    });
    let executed = state.execute(command, &caller).await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::Hold(h) => {
            let mut body = HoldBody::render(&h.hold, Some(h.balance_after));
            body.price(h.pricing.as_ref());
            Ok(body)
        }
        _ => Err(unexpected()),
    }))
}

/// Get a hold.
#[utoipa::path(get, path = "/v1/holds/{id}", tag = "holds",
    responses((status = 200, body = HoldBody), (status = 404, body = ErrorBody)), security(("bearer" = ["read"])))]
pub async fn get_hold(
    State(state): State<AppState>,
    caller: Caller,
    Path(hold_id): Path<String>,
) -> Result<Json<HoldBody>, ApiError> {
    caller.require(Scope::Read)?;
    let id = edge::id(&hold_id, "id")?;
    let mut hold = state
        .store
        .hold(id.clone())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("hold {id}")))?;
    if hold.status == tally_core::HoldStatus::Active && hold.expires_at <= state.store.now() {
        hold.status = tally_core::HoldStatus::Expired;
    }
    let pricing = state.store.hold_pricing(id).await?;
    let mut body = HoldBody::render(&hold, None);
    body.price(pricing.as_ref());
    Ok(Json(body))
}

/// Parse an optional JSON body: empty means the default.
pub fn optional_body<T: DeserializeOwned + Default>(
    body: crate::edge::JsonBytes,
) -> Result<T, ApiError> {
    let bytes = body.bytes()?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    crate::edge::parse_body(&bytes)
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CaptureHold {
    /// What to capture; default all. The rest is released.
    #[schema(value_type = Option<AmountInput>)]
    pub amount: Option<AmountInput>,
    /// For a hold placed by feature and quantity: the quantity actually used,
    /// priced at the price the hold locked.
    #[schema(value_type = Option<AmountInput>)]
    pub quantity: Option<AmountInput>,
    pub reason: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct CaptureBody {
    pub id: String,
    pub customer_id: String,
    /// `captured`.
    pub status: String,
    pub captured: String,
    pub released: String,
    pub drawn: Vec<DrawBody>,
    /// The part captured beyond the held credits, taken as debt.
    pub on_debt: String,
    pub balance_after: String,
    pub entry_id: String,
    /// The version and rule the hold locked (holds by feature and quantity).
    pub pricebook: Option<String>,
    pub rule: Option<String>,
    /// The quantity captured, priced by the locked rule; null for a capture
    /// by amount, whose units are not known (the usage report counts none).
    pub quantity: Option<String>,
}

/// Capture a hold (all, or part: the rest is released).
#[utoipa::path(post, path = "/v1/holds/{id}/capture", tag = "holds", request_body = CaptureHold,
    responses((status = 200, body = CaptureBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody)), security(("bearer" = ["write"])))]
pub async fn capture_hold(
    State(state): State<AppState>,
    caller: Caller,
    Path(hold_id): Path<String>,
    body: crate::edge::JsonBytes,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let body: CaptureHold = optional_body(body)?;
    let command = Command::Capture {
        hold_id: edge::id(&hold_id, "id")?,
        amount: body
            .amount
            .map(|a| edge::positive(a, "amount"))
            .transpose()?,
        quantity: body
            .quantity
            .map(|q| edge::positive(q, "quantity"))
            .transpose()?,
        reason: edge::text(body.reason, "reason", 1024)?,
    };
    if matches!(
        &command,
        Command::Capture {
            amount: Some(_),
            quantity: Some(_),
            ..
        }
    ) {
        return Err(ApiError::invalid(
            "quantity",
            "give either amount or quantity, not both",
        ));
    }
    let executed = state.execute(command, &caller).await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::Capture(c) => Ok(CaptureBody {
            id: c.hold_id.to_string(),
            customer_id: c.customer_id.to_string(),
            status: "captured".into(),
            captured: amount(c.captured),
            released: amount(c.released),
            drawn: draws(&c.drawn),
            on_debt: amount(c.on_debt),
            balance_after: amount(c.balance_after),
            entry_id: entry_id(c.entry_id),
            pricebook: c
                .pricing
                .as_ref()
                .and_then(|p| p.pricebook().map(str::to_owned)),
            rule: c.pricing.as_ref().map(|p| p.rule_label()),
            quantity: c
                .pricing
                .as_ref()
                .and_then(|p| p.used_quantity())
                .map(amount),
        }),
        _ => Err(unexpected()),
    }))
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ReleaseHold {
    pub reason: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ReleaseBody {
    pub id: String,
    pub customer_id: String,
    /// `released`.
    pub status: String,
    pub released: String,
    pub balance_after: String,
    pub entry_id: String,
}

/// Release a hold: every reserved credit goes back.
#[utoipa::path(post, path = "/v1/holds/{id}/release", tag = "holds", request_body = ReleaseHold,
    responses((status = 200, body = ReleaseBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = ["write"])))]
pub async fn release_hold(
    State(state): State<AppState>,
    caller: Caller,
    Path(hold_id): Path<String>,
    body: crate::edge::JsonBytes,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let body: ReleaseHold = optional_body(body)?;
    let command = Command::Release {
        hold_id: edge::id(&hold_id, "id")?,
        reason: edge::text(body.reason, "reason", 1024)?,
    };
    let executed = state.execute(command, &caller).await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::Release(r) => Ok(ReleaseBody {
            id: r.hold_id.to_string(),
            customer_id: r.customer_id.to_string(),
            status: "released".into(),
            released: amount(r.released),
            balance_after: amount(r.balance_after),
            entry_id: entry_id(r.entry_id),
        }),
        _ => Err(unexpected()),
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRefund {
    pub id: String,
    /// The charge to refund. Give `hold_id` instead to refund a captured hold.
    pub charge_id: Option<String>,
    pub hold_id: Option<String>,
    /// Default: all that is still refundable.
    #[schema(value_type = Option<AmountInput>)]
    pub amount: Option<AmountInput>,
    pub reason: String,
}

#[derive(Serialize, ToSchema)]
pub struct RefundBody {
    pub id: String,
    /// The refunded charge (or usage event) id; null when the refund named a
    /// captured hold.
    pub charge_id: Option<String>,
    /// The refunded captured hold, when the refund named one.
    pub hold_id: Option<String>,
    pub customer_id: String,
    pub amount: String,
    /// Where the credits went back: the original grants while they are active,
    /// otherwise new `refund:` grants.
    pub returned: Vec<DrawBody>,
    pub new_grants: Vec<String>,
    pub balance_after: String,
    pub entry_id: String,
}

/// Give back all or part of a charge, at most what was charged.
#[utoipa::path(post, path = "/v1/refunds", tag = "refunds", request_body = CreateRefund,
    responses((status = 200, body = RefundBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)), security(("bearer" = ["write"])))]
pub async fn create_refund(
    State(state): State<AppState>,
    caller: Caller,
    body: ApiJson<CreateRefund>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let body = body.read()?;
    let (charge_id, hold_id) = match (body.charge_id, body.hold_id) {
        (Some(charge), None) => (Some(edge::id(&charge, "charge_id")?), None),
        (None, Some(hold)) => (None, Some(edge::id(&hold, "hold_id")?)),
        _ => {
            return Err(ApiError::invalid(
                "charge_id",
                "give exactly one of charge_id and hold_id",
            ))
        }
    };
    let command = Command::Refund(NewRefund {
        id: edge::id(&body.id, "id")?,
        charge_id,
        hold_id,
        amount: body
            .amount
            .map(|a| edge::positive(a, "amount"))
            .transpose()?,
        reason: required_reason(body.reason)?,
    });
    let executed = state.execute(command, &caller).await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::Refund(r) => Ok(RefundBody {
            id: r.id.to_string(),
            charge_id: r.hold_id.is_none().then(|| r.charge_id.to_string()),
            hold_id: r.hold_id.as_ref().map(ToString::to_string),
            customer_id: r.customer_id.to_string(),
            amount: amount(r.amount),
            returned: draws(&r.returned),
            new_grants: r.new_grants.iter().map(ToString::to_string).collect(),
            balance_after: amount(r.balance_after),
            entry_id: entry_id(r.entry_id),
        }),
        _ => Err(unexpected()),
    }))
}
