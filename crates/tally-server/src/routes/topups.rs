//! Credit packs, top-ups (manual and automatic) and their payment step.

use axum::extract::State;
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use tally_core::{AutoTopup, AutoTopupState, CreditPack, Timestamp};
use tally_store::{Command, NewTopup, Outcome, TopupRecord};
use utoipa::ToSchema;

use super::customers::unexpected;
use super::spend::optional_body;
use crate::auth::{Caller, Scope};
use crate::dto::{amount, entry_id};
use crate::edge::{self, AmountInput, ApiJson, Path};
use crate::error::{ApiError, ErrorBody};
use crate::{reply, AppState};

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutCreditPack {
    pub name: String,
    /// Credits in one pack.
    #[schema(value_type = AmountInput, example = "1000")]
    pub credits: AmountInput,
    /// What one pack costs, in `currency` (a decimal string, never rounded).
    #[schema(value_type = AmountInput, example = "10.00")]
    pub price: AmountInput,
    /// ISO 4217, upper case.
    #[schema(example = "USD")]
    pub currency: String,
    /// The credits expire this many days after the payment is confirmed
    /// (default: never).
    #[schema(minimum = 1, maximum = 3660)]
    pub expires_after_days: Option<u32>,
    /// The burn-order priority of the credits (default 0).
    #[serde(default)]
    pub priority: i32,
}

#[derive(Serialize, ToSchema)]
pub struct CreditPackBody {
    pub key: String,
    pub name: String,
    pub credits: String,
    pub price: String,
    pub currency: String,
    pub expires_after_days: Option<u32>,
    pub priority: i32,
    /// The cost basis its credits get: price per credit, rounded half up to 6 digits.
    pub price_per_credit: String,
}

impl From<&CreditPack> for CreditPackBody {
    fn from(pack: &CreditPack) -> CreditPackBody {
        CreditPackBody {
            key: pack.key.clone(),
            name: pack.name.clone(),
            credits: amount(pack.credits),
            price: amount(pack.price),
            currency: pack.currency.clone(),
            expires_after_days: pack.expires_after_days,
            priority: pack.priority,
            price_per_credit: pack
                .cost_basis()
                .map(|c| amount(c.per_credit))
                .unwrap_or_default(),
        }
    }
}

/// Create or update a credit pack. A top-up keeps the terms of the pack
/// when it started (credits, price, expiry, priority).
#[utoipa::path(put, path = "/v1/credit-packs/{key}", tag = "top-ups", request_body = PutCreditPack,
    responses((status = 200, body = CreditPackBody), (status = 400, body = ErrorBody)),
    security(("bearer" = ["admin"])))]
pub async fn put_credit_pack(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    body: ApiJson<PutCreditPack>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let body = body.read()?;
    let key = edge::id(&key, "key")?.to_string();
    if body.name.trim().is_empty() {
        return Err(ApiError::invalid("name", "name must not be blank"));
    }
    let pack = CreditPack {
        key,
        name: edge::text(Some(body.name), "name", 256)?.unwrap_or_default(),
        credits: body.credits.0,
        price: body.price.0,
        currency: body.currency,
        expires_after_days: body.expires_after_days,
        priority: body.priority,
    };
    tally_core::topup::validate_pack(&pack)
        .map_err(|(param, message)| ApiError::invalid(param, message))?;
    let executed = state.execute(Command::PutCreditPack(pack), &caller).await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::CreditPack(pack) => Ok(CreditPackBody::from(pack)),
        _ => Err(unexpected()),
    }))
}

/// One credit pack.
#[utoipa::path(get, path = "/v1/credit-packs/{key}", tag = "top-ups",
    responses((status = 200, body = CreditPackBody), (status = 404, body = ErrorBody)),
    security(("bearer" = ["read"])))]
pub async fn get_credit_pack(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> Result<Json<CreditPackBody>, ApiError> {
    caller.require(Scope::Read)?;
    let key = edge::id(&key, "key")?.to_string();
    let packs = state.store.credit_packs().await?;
    packs
        .iter()
        .find(|pack| pack.key == key)
        .map(|pack| Json(CreditPackBody::from(pack)))
        .ok_or_else(|| ApiError::not_found(format!("credit pack {key}")))
}

#[derive(Serialize, ToSchema)]
pub struct CreditPackList {
    pub data: Vec<CreditPackBody>,
    pub next_cursor: Option<String>,
}

/// Every credit pack.
#[utoipa::path(get, path = "/v1/credit-packs", tag = "top-ups", params(edge::ListParams),
    responses((status = 200, body = CreditPackList)), security(("bearer" = ["read"])))]
pub async fn list_credit_packs(
    State(state): State<AppState>,
    caller: Caller,
    params: edge::ApiQuery<edge::ListParams>,
) -> Result<Json<CreditPackList>, ApiError> {
    caller.require(Scope::Read)?;
    let params = params.read()?;
    let packs = state.store.credit_packs().await?;
    let (data, next_cursor) = edge::page(
        packs.iter().map(CreditPackBody::from).collect(),
        |p| &p.key,
        &params,
    )?;
    Ok(Json(CreditPackList { data, next_cursor }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTopup {
    /// The top-up's id (idempotency key; at most 100 characters, not
    /// starting with `auto_`).
    pub id: String,
    /// The credit pack to buy.
    pub pack: String,
    /// How many packs (default 1).
    #[schema(minimum = 1, maximum = 10000)]
    pub quantity: Option<u32>,
    /// The top-up fails (`payment_timeout`) if its payment is not confirmed
    /// within this long (default 86400, at most 30 days).
    #[schema(minimum = 1, maximum = 2592000)]
    pub payment_timeout_seconds: Option<u32>,
}

#[derive(Serialize, ToSchema)]
pub struct TopupBody {
    pub id: String,
    pub customer_id: String,
    /// `manual` or `auto`.
    pub origin: String,
    pub pack: String,
    pub quantity: u32,
    pub credits: String,
    /// The exact money to collect, in `currency`.
    pub price: String,
    pub currency: String,
    /// `pending_payment`, `succeeded` or `failed`.
    pub status: String,
    pub payment_due_at: String,
    pub payment_reference: Option<String>,
    /// Why it failed (`payment_timeout`, or the reason given).
    pub failure_reason: Option<String>,
    /// The purchase lot its credits went to (`topup:<id>`), once paid.
    pub grant_id: Option<String>,
    pub entry_id: Option<String>,
    /// After a confirmation: the customer's balance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance_after: Option<String>,
    pub created_at: String,
    pub resolved_at: Option<String>,
}

fn topup_body(topup: &TopupRecord, balance_after: Option<tally_core::Amount>) -> TopupBody {
    TopupBody {
        id: topup.id.to_string(),
        customer_id: topup.customer_id.to_string(),
        origin: topup.origin.clone(),
        pack: topup.pack.clone(),
        quantity: topup.quantity,
        credits: amount(topup.credits),
        price: amount(topup.price),
        currency: topup.currency.clone(),
        status: topup.status.clone(),
        payment_due_at: edge::rfc3339(topup.payment_due_at),
        payment_reference: topup.payment_reference.clone(),
        failure_reason: topup.failure_reason.clone(),
        grant_id: topup.grant_id.as_ref().map(ToString::to_string),
        entry_id: topup.entry_id.map(entry_id),
        balance_after: balance_after.map(amount),
        created_at: edge::rfc3339(topup.created_at),
        resolved_at: topup.resolved_at.map(edge::rfc3339),
    }
}

fn render_topup(outcome: &Outcome) -> Result<TopupBody, ApiError> {
    match outcome {
        Outcome::Topup {
            topup,
            balance_after,
        } => Ok(topup_body(topup, *balance_after)),
        _ => Err(unexpected()),
    }
}

/// Start a manual top-up: the top-up waits for its payment (a
/// `topup.created` notification is the payment step's hook); confirm it to
/// grant the credits. Exactly once by its id.
#[utoipa::path(post, path = "/v1/customers/{id}/topups", tag = "top-ups", request_body = CreateTopup,
    responses((status = 200, body = TopupBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("bearer" = ["write"])))]
pub async fn create_topup(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
    body: ApiJson<CreateTopup>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let body = body.read()?;
    let id = edge::id(&body.id, "id")?;
    let quantity = body.quantity.unwrap_or(1);
    let timeout = body
        .payment_timeout_seconds
        .unwrap_or(tally_core::topup::DEFAULT_PAYMENT_TIMEOUT_SECONDS);
    tally_core::topup::validate_request(id.as_str(), quantity, timeout)
        .map_err(|(param, message)| ApiError::invalid(param, message))?;
    let command = Command::CreateTopup(NewTopup {
        id,
        customer_id: edge::id(&customer_id, "customer_id")?,
        pack: edge::id(&body.pack, "pack")?.to_string(),
        quantity,
        payment_timeout_seconds: body.payment_timeout_seconds,
    });
    let executed = state.execute(command, &caller).await?;
    Ok(reply(executed, render_topup))
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ConfirmTopup {
    /// The payment's id in the payment system (kept as the lot's external reference).
    pub payment_reference: Option<String>,
}

/// The payment step succeeded: the pack's credits are granted as a paid
/// purchase lot `topup:<id>` with the pack's price per credit as its cost
/// basis. A retry returns the same answer. A top-up declined with `fail`
/// cannot be confirmed (409 `topup_not_pending`); one whose payment timed
/// out still can (the money came late: `"late":true` in `topup.succeeded`).
/// The body may be left out.
#[utoipa::path(post, path = "/v1/topups/{id}/confirm", tag = "top-ups", request_body = ConfirmTopup,
    responses((status = 200, body = TopupBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = ["write"])))]
pub async fn confirm_topup(
    State(state): State<AppState>,
    caller: Caller,
    Path(topup_id): Path<String>,
    body: crate::edge::JsonBytes,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let body: ConfirmTopup = optional_body(body)?;
    let command = Command::ConfirmTopup {
        topup_id: edge::id(&topup_id, "id")?,
        payment_reference: edge::text(body.payment_reference, "payment_reference", 256)?,
    };
    let executed = state.execute(command, &caller).await?;
    Ok(reply(executed, render_topup))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailTopup {
    /// Why the payment failed (e.g. `card_declined`); sent in `topup.failed`.
    pub reason: String,
}

/// The payment step failed: `topup.failed` is sent, and for an automatic
/// top-up the failure counts towards its suspension.
#[utoipa::path(post, path = "/v1/topups/{id}/fail", tag = "top-ups", request_body = FailTopup,
    responses((status = 200, body = TopupBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("bearer" = ["write"])))]
pub async fn fail_topup(
    State(state): State<AppState>,
    caller: Caller,
    Path(topup_id): Path<String>,
    body: ApiJson<FailTopup>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let body = body.read()?;
    let reason = edge::text(Some(body.reason), "reason", 1024)?
        .filter(|r| !r.trim().is_empty())
        .ok_or_else(|| ApiError::invalid("reason", "reason must not be empty"))?;
    let command = Command::FailTopup {
        topup_id: edge::id(&topup_id, "id")?,
        reason,
    };
    let executed = state.execute(command, &caller).await?;
    Ok(reply(executed, render_topup))
}

/// A top-up.
#[utoipa::path(get, path = "/v1/topups/{id}", tag = "top-ups",
    responses((status = 200, body = TopupBody), (status = 404, body = ErrorBody)), security(("bearer" = ["read"])))]
pub async fn get_topup(
    State(state): State<AppState>,
    caller: Caller,
    Path(topup_id): Path<String>,
) -> Result<Json<TopupBody>, ApiError> {
    caller.require(Scope::Read)?;
    let id = edge::id(&topup_id, "id")?;
    let topup = state
        .store
        .topup(id.clone())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("top-up {id}")))?;
    Ok(Json(topup_body(&topup, None)))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TopupListParams {
    /// 1 to 1000, default 50.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A customer's top-ups, newest first.
#[utoipa::path(get, path = "/v1/customers/{id}/topups", tag = "top-ups", params(TopupListParams),
    responses((status = 200, body = crate::dto::Page<TopupBody>), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)), security(("bearer" = ["read"])))]
pub async fn list_topups(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
    params: edge::ApiQuery<TopupListParams>,
) -> Result<Json<crate::dto::Page<TopupBody>>, ApiError> {
    caller.require(Scope::Read)?;
    let params = params.read()?;
    let id = edge::id(&customer_id, "id")?;
    let limit = edge::limit(params.limit)?;
    let before = edge::cursor(params.cursor.as_deref(), "tpu_")?;
    let mut rows = state
        .store
        .topups(id.clone(), before, limit + 1)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("customer {id}")))?;
    let next_cursor = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|(_, sequence)| format!("tpu_{sequence}"))
    } else {
        None
    };
    Ok(Json(crate::dto::Page {
        data: rows.iter().map(|(t, _)| topup_body(t, None)).collect(),
        next_cursor,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutAutoTopup {
    /// The credit pack it buys.
    pub pack: String,
    /// When the balance (available less debt) falls below this...
    #[schema(value_type = AmountInput, example = "500")]
    pub threshold: AmountInput,
    /// ...buy enough packs to bring it to at least this.
    #[schema(value_type = AmountInput, example = "5000")]
    pub target: AmountInput,
    /// At most this many automatic top-ups start in any 24 hours (default 3).
    #[schema(minimum = 1, maximum = 1000)]
    pub max_per_day: Option<u32>,
    /// Suspended after this many failed payments in a row (default 3);
    /// setting it again resumes it.
    #[schema(minimum = 1, maximum = 100)]
    pub max_failures: Option<u32>,
    /// An automatic top-up's payment fails if not confirmed within this long
    /// (default 3600).
    #[schema(minimum = 1, maximum = 2592000)]
    pub payment_timeout_seconds: Option<u32>,
    /// Default true.
    pub enabled: Option<bool>,
}

#[derive(Serialize, ToSchema)]
pub struct AutoTopupBody {
    pub customer_id: String,
    pub pack: String,
    pub threshold: String,
    pub target: String,
    pub max_per_day: u32,
    pub max_failures: u32,
    pub payment_timeout_seconds: u32,
    pub enabled: bool,
    /// `active`, `suspended` (after `max_failures` failed payments in a row)
    /// or `disabled`.
    pub status: String,
    pub consecutive_failures: u32,
    /// The automatic top-up awaiting its payment (one at a time).
    pub pending_topup: Option<String>,
    /// Automatic top-ups started in the last 24 hours (the rate limit counts these).
    pub started_last_24h: usize,
    /// Why the last top-up that was due could not start (its order past the
    /// largest amount, its pack gone); cleared when one starts.
    pub last_refusal: Option<AutoTopupRefusalBody>,
}

#[derive(Serialize, ToSchema)]
pub struct AutoTopupRefusalBody {
    pub at: String,
    pub message: String,
}

fn auto_body(customer_id: &str, state: &AutoTopupState, now: Timestamp) -> AutoTopupBody {
    AutoTopupBody {
        customer_id: customer_id.to_string(),
        pack: state.config.pack.clone(),
        threshold: amount(state.config.threshold),
        target: amount(state.config.target),
        max_per_day: state.config.max_per_day,
        max_failures: state.config.max_failures,
        payment_timeout_seconds: state.config.payment_timeout_seconds,
        enabled: state.config.enabled,
        status: state.status.as_str().to_string(),
        consecutive_failures: state.consecutive_failures,
        pending_topup: state.pending.as_ref().map(ToString::to_string),
        started_last_24h: state.started_in_window(now),
        last_refusal: state.last_refusal.as_ref().map(|r| AutoTopupRefusalBody {
            at: edge::rfc3339(r.at),
            message: r.message.clone(),
        }),
    }
}

/// Set a customer's automatic top-up. Setting it again clears a suspension;
/// if the balance is already below the threshold, a top-up starts at once.
#[utoipa::path(put, path = "/v1/customers/{id}/auto-topup", tag = "top-ups", request_body = PutAutoTopup,
    responses((status = 200, body = AutoTopupBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = ["write"])))]
pub async fn put_auto_topup(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
    body: ApiJson<PutAutoTopup>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let body = body.read()?;
    let customer = edge::id(&customer_id, "id")?;
    let config = AutoTopup {
        pack: edge::id(&body.pack, "pack")?.to_string(),
        threshold: body.threshold.0,
        target: body.target.0,
        max_per_day: body.max_per_day.unwrap_or(3),
        max_failures: body.max_failures.unwrap_or(3),
        payment_timeout_seconds: body.payment_timeout_seconds.unwrap_or(3600),
        enabled: body.enabled.unwrap_or(true),
    };
    tally_core::topup::validate_auto_topup(&config)
        .map_err(|(param, message)| ApiError::invalid(param, message))?;
    let command = Command::PutAutoTopup {
        customer_id: customer.clone(),
        config,
    };
    let now = state.store.now();
    let executed = state.execute(command, &caller).await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::AutoTopup { customer_id, state } => {
            Ok(auto_body(customer_id.as_str(), state, now))
        }
        _ => Err(unexpected()),
    }))
}

/// A customer's automatic top-up and where it stands.
#[utoipa::path(get, path = "/v1/customers/{id}/auto-topup", tag = "top-ups",
    responses((status = 200, body = AutoTopupBody), (status = 404, body = ErrorBody)), security(("bearer" = ["read"])))]
pub async fn get_auto_topup(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
) -> Result<Json<AutoTopupBody>, ApiError> {
    caller.require(Scope::Read)?;
    let id = edge::id(&customer_id, "id")?;
    let found = state
        .store
        .auto_topup(id.clone())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("customer {id}")))?
        .ok_or_else(|| ApiError::not_found(format!("automatic top-up of customer {id}")))?;
    Ok(Json(auto_body(id.as_str(), &found, state.store.now())))
}
