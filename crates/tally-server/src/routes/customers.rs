//! Customers, their balance and their grants.

use axum::extract::State;
use axum::response::Response;
use axum::Json;
use serde::Deserialize;
use tally_core::{CostBasis, Source};
use tally_store::{Command, NewCustomer, NewGrant, Outcome};
use utoipa::ToSchema;

use crate::auth::{Caller, Scope};
use crate::dto::{amount, CustomerBody, GrantBody, MoneyBody, OverageBody};
use crate::edge::{self, AmountInput, ApiJson, Path};
use crate::error::{ApiError, ErrorBody};
use crate::{reply, AppState};

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCustomer {
    /// The customer's id in your system; also the idempotency key.
    pub id: String,
    pub name: Option<String>,
    pub plan: Option<String>,
    pub region: Option<String>,
    /// ISO 4217 code of the money the customer pays in.
    pub currency: Option<String>,
    #[schema(value_type = Option<Object>)]
    #[serde(default, deserialize_with = "crate::edge::strict_opt")]
    pub metadata: Option<serde_json::Value>,
    /// The overage policy (default: block).
    pub overage: Option<OverageBody>,
}

/// Create a customer.
#[utoipa::path(post, path = "/v1/customers", tag = "customers", request_body = CreateCustomer,
    responses((status = 200, body = CustomerBody), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = ["write"])))]
pub async fn create_customer(
    State(state): State<AppState>,
    caller: Caller,
    body: ApiJson<CreateCustomer>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let body = body.read()?;
    let command = Command::CreateCustomer(NewCustomer {
        id: edge::id(&body.id, "id")?,
        name: edge::text(body.name, "name", 256)?,
        plan: label(body.plan, "plan")?,
        region: label(body.region, "region")?,
        currency: currency(body.currency, "currency")?,
        metadata: edge::metadata(body.metadata)?,
        overage: body
            .overage
            .as_ref()
            .map(|o| o.policy("overage"))
            .transpose()?,
    });
    let executed = state.execute(command, &caller).await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::Customer(customer) => Ok(CustomerBody::from(customer)),
        _ => Err(unexpected()),
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateCustomer {
    /// A field left out is kept; `null` removes it.
    #[serde(default, deserialize_with = "crate::edge::present")]
    pub name: Option<Option<String>>,
    /// The plan that prices the customer (a subscription sets it while it
    /// runs: refused then, 409 `plan_set_by_subscription`).
    #[serde(default, deserialize_with = "crate::edge::present")]
    pub plan: Option<Option<String>>,
    #[serde(default, deserialize_with = "crate::edge::present")]
    pub region: Option<Option<String>>,
    #[schema(value_type = Option<Object>)]
    #[serde(default, deserialize_with = "crate::edge::present")]
    pub metadata: Option<Option<crate::edge::StrictValue>>,
}

/// Change a customer's name, plan, region or metadata: a field left out is
/// kept, `null` removes it. A new plan prices what happens from now on (a
/// late event is priced by the plan it happened on); a new region prices
/// everything priced from now on. The currency and id never change.
#[utoipa::path(patch, path = "/v1/customers/{id}", tag = "customers", request_body = UpdateCustomer,
    responses((status = 200, body = CustomerBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "plan_set_by_subscription: the customer has a subscription", body = ErrorBody)),
    security(("bearer" = ["write"])))]
pub async fn update_customer(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
    body: ApiJson<UpdateCustomer>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let body = body.read()?;
    let text = |value: Option<Option<String>>, param: &str, max: usize| {
        value.map(|inner| edge::text(inner, param, max)).transpose()
    };
    let command = Command::UpdateCustomer(tally_store::CustomerUpdate {
        customer_id: edge::id(&customer_id, "id")?,
        name: text(body.name, "name", 256)?,
        plan: body.plan.map(|v| label(v, "plan")).transpose()?,
        region: body.region.map(|v| label(v, "region")).transpose()?,
        metadata: body
            .metadata
            .map(|value| edge::metadata(value.map(|v| v.0)))
            .transpose()?,
    });
    let executed = state.execute(command, &caller).await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::Customer(customer) => Ok(CustomerBody::from(customer)),
        _ => Err(unexpected()),
    }))
}

/// A customer's plan or region, matched against price book rules and plan
/// keys: written as a key is (`edge::id`'s characters), not free text.
fn label(value: Option<String>, param: &str) -> Result<Option<String>, ApiError> {
    value
        .map(|text| {
            edge::id(&text, param).map(|_| text).map_err(|_| {
                ApiError::invalid(
                    param,
                    format!(
                        "{param} must be 1 to 128 characters of A-Z, a-z, 0-9, '_', '.', ':' or '-' (as a plan key)"
                    ),
                )
            })
        })
        .transpose()
}

fn currency(value: Option<String>, param: &str) -> Result<Option<String>, ApiError> {
    match value {
        Some(code) if !tally_core::currency::is_iso_4217(&code) => Err(ApiError::invalid(
            param,
            format!("{param} must be an ISO 4217 currency code in upper case, such as USD (not {code:?})"),
        )),
        other => Ok(other),
    }
}

/// Set a customer's overage policy. The debt already owed stays owed and is
/// repaid by the next credits; the policy governs spends from now on.
#[utoipa::path(put, path = "/v1/customers/{id}/overage", tag = "customers", request_body = OverageBody,
    responses((status = 200, body = CustomerBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = ["write"])))]
pub async fn set_overage(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
    body: ApiJson<OverageBody>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let body = body.read()?;
    let overage = body.policy("policy")?;
    overage_command(&state, &caller, &customer_id, Some(overage)).await
}

/// Set (`Some`) or remove (`None`) a customer's own overage policy.
async fn overage_command(
    state: &AppState,
    caller: &Caller,
    customer_id: &str,
    overage: Option<tally_core::OveragePolicy>,
) -> Result<Response, ApiError> {
    let command = Command::SetOverage {
        customer_id: edge::id(customer_id, "id")?,
        overage,
    };
    let executed = state.execute(command, caller).await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::Customer(customer) => Ok(CustomerBody::from(customer)),
        _ => Err(unexpected()),
    }))
}

/// Remove a customer's own overage policy: its plan's (else `block`)
/// governs spends from now on. The debt already owed stays owed.
#[utoipa::path(delete, path = "/v1/customers/{id}/overage", tag = "customers",
    responses((status = 200, body = CustomerBody), (status = 404, body = ErrorBody)),
    security(("bearer" = ["write"])))]
pub async fn clear_overage(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    overage_command(&state, &caller, &customer_id, None).await
}

/// The prefixes of grant ids Tally derives itself: refund grants, plan
/// allocations, rolled-over plan credits, transferred credits, top-ups and
/// credits a hold gave back to a voided lot.
pub const DERIVED_GRANT_PREFIXES: [&str; 6] = [
    "refund:",
    "plan:",
    "rollover:",
    "transfer:",
    "topup:",
    "release:",
];

pub fn unexpected() -> ApiError {
    ApiError::new("internal", "unexpected outcome for this request")
}

/// Get a customer.
#[utoipa::path(get, path = "/v1/customers/{id}", tag = "customers",
    responses((status = 200, body = CustomerBody), (status = 404, body = ErrorBody)), security(("bearer" = ["read"])))]
pub async fn get_customer(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
) -> Result<Json<CustomerBody>, ApiError> {
    caller.require(Scope::Read)?;
    let id = edge::id(&customer_id, "id")?;
    let customer = state
        .store
        .customer(id.clone())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("customer {id}")))?;
    Ok(Json(CustomerBody::from(&customer)))
}

/// The earliest instant at which credits in effect expire, and how many
/// of them (pending grants do not count until they take effect).
#[derive(serde::Serialize, ToSchema)]
pub struct NextExpiry {
    pub at: String,
    pub amount: String,
}

#[derive(serde::Serialize, ToSchema)]
pub struct BalanceBody {
    pub customer_id: String,
    /// Spendable now.
    pub available: String,
    /// Reserved by active holds.
    pub held: String,
    /// Granted but not yet in effect.
    pub pending: String,
    /// Owed below zero under an overage policy.
    pub debt: String,
    /// The active and pending grants with something remaining.
    pub grants: Vec<GrantBody>,
    pub next_expiry: Option<NextExpiry>,
    /// The engine instant this balance is computed at: expiries and pending
    /// grants are judged then, and it counts every entry committed when it
    /// was read. A write being committed at that moment may carry an instant
    /// a few milliseconds before it (its group's), so the ledger read later
    /// at `to=as_of` can hold one more entry; a past balance read from the
    /// ledger a second or more back does not change.
    pub as_of: String,
    /// The customer's last ledger entry recorded when this balance was read
    /// (null before the first). Expiries and grants taking effect that are
    /// due but not yet swept count in the balance before their entries are
    /// recorded.
    pub last_entry_id: Option<String>,
}

/// The balance takes no query parameters: one sent is a 400, not ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalanceParams {}

/// A customer's balance now. (A past balance, as recorded: `balance_after`
/// of the first entry of `GET /v1/customers/{id}/ledger?to=<instant>`.)
#[utoipa::path(get, path = "/v1/customers/{id}/balance", tag = "customers",
    responses((status = 200, body = BalanceBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = ["read"])))]
pub async fn balance(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
    params: edge::ApiQuery<BalanceParams>,
) -> Result<Json<BalanceBody>, ApiError> {
    caller.require(Scope::Read)?;
    params
        .read()
        .map_err(|error| {
            match error.param.as_deref() {
        Some("as_of") => ApiError::invalid(
            "as_of",
            "the balance is the balance now; a past balance, as recorded, is the balance_after \
             of the first entry of GET /v1/customers/{id}/ledger?to=<instant>",
        ),
        _ => error,
    }
        })?;
    let id = edge::id(&customer_id, "id")?;
    let view = state
        .store
        .balance(id.clone())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("customer {id}")))?;
    let grants = view
        .grants
        .iter()
        .filter(|r| {
            r.grant.status == tally_core::GrantStatus::Active && r.grant.remaining.is_positive()
        })
        .map(|r| GrantBody::render(r, view.now))
        .collect();
    let b = &view.balance;
    Ok(Json(BalanceBody {
        customer_id: id.to_string(),
        available: amount(b.available),
        held: amount(b.held),
        pending: amount(b.pending),
        debt: amount(b.debt),
        grants,
        next_expiry: b.next_expiry.map(|(at, total)| NextExpiry {
            at: edge::rfc3339(at),
            amount: amount(total),
        }),
        as_of: edge::rfc3339(view.now),
        last_entry_id: view.last_entry.map(crate::dto::entry_id),
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CostBasisInput {
    /// Money paid per credit.
    #[schema(value_type = AmountInput)]
    pub amount: AmountInput,
    pub currency: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGrant {
    pub id: String,
    #[schema(value_type = AmountInput, example = "10000")]
    pub amount: AmountInput,
    /// `purchase`, `plan_allocation`, `promotion`, `refund`, `adjustment` or `transfer`.
    pub source: String,
    pub paid: bool,
    /// Money paid per credit (paid grants only): a void reports what it
    /// is worth as refundable.
    pub cost_basis: Option<CostBasisInput>,
    /// Higher is spent first. Default 0.
    pub priority: Option<i32>,
    /// Default: now.
    pub effective_at: Option<String>,
    /// Default: never.
    pub expires_at: Option<String>,
    /// Feature keys this grant may pay for; default: anything.
    pub scope: Option<Vec<String>>,
    #[schema(value_type = Option<Object>)]
    #[serde(default, deserialize_with = "crate::edge::strict_opt")]
    pub metadata: Option<serde_json::Value>,
    /// E.g. the payment id.
    pub external_reference: Option<String>,
    pub reason: Option<String>,
}

/// Grant credits to a customer.
#[utoipa::path(post, path = "/v1/customers/{id}/grants", tag = "grants", request_body = CreateGrant,
    responses((status = 200, body = GrantBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)), security(("bearer" = ["write"])))]
pub async fn create_grant(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
    body: ApiJson<CreateGrant>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let body = body.read()?;
    // `rollover` lots are the engine's own (a plan's renewal makes them).
    let source = Source::parse(&body.source)
        .filter(|source| *source != Source::Rollover)
        .ok_or_else(|| {
            ApiError::invalid(
                "source",
                "source must be one of purchase, plan_allocation, promotion, refund, adjustment, transfer",
            )
        })?;
    let cost_basis = match body.cost_basis {
        Some(basis) => {
            if basis.amount.0.is_negative() {
                return Err(ApiError::invalid(
                    "cost_basis.amount",
                    "cost_basis.amount must not be negative",
                ));
            }
            let currency = currency(Some(basis.currency), "cost_basis.currency")?.expect("given");
            // A cost basis is money paid per credit: a void reports it as
            // refundable, which unpaid credits never are.
            if !body.paid {
                return Err(ApiError::invalid(
                    "cost_basis",
                    "cost_basis is what was paid per credit; a grant with \"paid\": false has none",
                ));
            }
            Some(CostBasis {
                per_credit: basis.amount.0,
                currency,
            })
        }
        None => None,
    };
    if let Some(scope) = &body.scope {
        if scope.is_empty()
            || scope.len() > 100
            || scope.iter().any(|f| edge::id(f, "scope").is_err())
        {
            return Err(ApiError::invalid(
                "scope",
                "scope must be a non-empty list of up to 100 feature keys",
            ));
        }
    }
    let grant_id = edge::id(&body.id, "id")?;
    if let Some(prefix) = DERIVED_GRANT_PREFIXES
        .iter()
        .find(|p| grant_id.as_str().starts_with(**p))
    {
        return Err(ApiError::invalid(
            "id",
            format!("grant ids starting with {prefix:?} are reserved for grants Tally creates"),
        ));
    }
    let instant = |value: Option<String>, param: &str| {
        value
            .as_deref()
            .map(|t| edge::instant(t, param))
            .transpose()
    };
    let effective_at = instant(body.effective_at, "effective_at")?;
    let expires_at = instant(body.expires_at, "expires_at")?;
    // Checked on the request alone, so that it is bad input (the id stays free). An expiry
    // in the past is the engine's to refuse, by its clock, and that refusal is the id's.
    if let (Some(from), Some(to)) = (effective_at, expires_at) {
        if to <= from {
            return Err(ApiError {
                param: Some("expires_at".into()),
                ..ApiError::new("invalid_expiry", "expires_at must be after effective_at")
            });
        }
    }
    let command = Command::Grant(NewGrant {
        id: grant_id,
        customer_id: edge::id(&customer_id, "customer_id")?,
        amount: edge::positive(body.amount, "amount")?,
        source,
        paid: body.paid,
        cost_basis,
        priority: body.priority.unwrap_or(0),
        effective_at,
        expires_at,
        scope: body.scope,
        metadata: edge::metadata(body.metadata)?,
        external_reference: edge::text(body.external_reference, "external_reference", 256)?,
        reason: edge::text(body.reason, "reason", 1024)?,
    });
    let executed = state.execute(command, &caller).await?;
    // As of when it was granted, so that a retry gets the first answer
    // again (`pending` for a lot that takes effect later), not the stored
    // lot seen at another time.
    Ok(reply(executed, |outcome| match outcome {
        Outcome::Grant { grant, .. } => Ok(GrantBody::render(grant, grant.created_at)),
        _ => Err(unexpected()),
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct GrantListParams {
    /// 1 to 1000, default 50.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A customer's grants, oldest first, with remaining and status.
#[utoipa::path(get, path = "/v1/customers/{id}/grants", tag = "grants", params(GrantListParams),
    responses((status = 200, body = crate::dto::Page<GrantBody>), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)), security(("bearer" = ["read"])))]
pub async fn list_grants(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
    params: edge::ApiQuery<GrantListParams>,
) -> Result<Json<crate::dto::Page<GrantBody>>, ApiError> {
    caller.require(Scope::Read)?;
    let params = params.read()?;
    let id = edge::id(&customer_id, "id")?;
    let limit = edge::limit(params.limit)?;
    // The cursor is the creation sequence of the first grant of the page.
    let start = edge::cursor(params.cursor.as_deref(), "grs_")?;
    let view = state
        .store
        .balance(id.clone())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("customer {id}")))?;
    let mut grants: Vec<_> = view
        .grants
        .iter()
        .filter(|r| start.is_none_or(|start| r.grant.sequence >= start))
        .collect();
    grants.sort_by_key(|r| r.grant.sequence);
    let next_cursor = grants
        .get(limit)
        .map(|r| format!("grs_{}", r.grant.sequence));
    let data = grants
        .into_iter()
        .take(limit)
        .map(|r| GrantBody::render(r, view.now))
        .collect();
    Ok(Json(crate::dto::Page { data, next_cursor }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VoidGrant {
    /// The id of this void (idempotency key).
    pub id: String,
    pub reason: String,
}

#[derive(serde::Serialize, ToSchema)]
pub struct VoidBody {
    pub id: String,
    pub grant_id: String,
    pub customer_id: String,
    /// Credits taken back.
    pub voided: String,
    /// Their value at the grant's cost basis: what to refund to the payer.
    /// Credits a hold reserves from the lot are not taken: when the hold
    /// gives them back, they come back as a lot `release:<hold>:<n>` like
    /// this one, which can be voided in turn.
    pub refundable_money: Option<MoneyBody>,
    pub balance_after: String,
    pub entry_id: String,
}

/// Take back what remains of a grant (e.g. refund the unused part of a purchase).
#[utoipa::path(post, path = "/v1/grants/{grant_id}/void", tag = "grants", request_body = VoidGrant,
    responses((status = 200, body = VoidBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = ["write"])))]
pub async fn void_grant(
    State(state): State<AppState>,
    caller: Caller,
    Path(grant_id): Path<String>,
    body: ApiJson<VoidGrant>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let body = body.read()?;
    let command = Command::Void {
        id: edge::id(&body.id, "id")?,
        grant_id: edge::id(&grant_id, "grant_id")?,
        reason: required_reason(body.reason)?,
    };
    let executed = state.execute(command, &caller).await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::Void(v) => Ok(VoidBody {
            id: v.id.to_string(),
            grant_id: v.grant_id.to_string(),
            customer_id: v.customer_id.to_string(),
            voided: amount(v.voided),
            refundable_money: v
                .refundable_money
                .as_ref()
                .map(|(money, currency)| MoneyBody {
                    amount: amount(*money),
                    currency: currency.clone(),
                }),
            balance_after: amount(v.balance_after),
            entry_id: crate::dto::entry_id(v.entry_id),
        }),
        _ => Err(unexpected()),
    }))
}

pub fn required_reason(reason: String) -> Result<String, ApiError> {
    if reason.trim().is_empty() {
        return Err(ApiError::invalid("reason", "reason must not be empty"));
    }
    Ok(edge::text(Some(reason), "reason", 1024)?.expect("given"))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeExpiry {
    /// The id of this change (idempotency key).
    pub id: String,
    /// The new expiry; null for never. Must be in the future and later than
    /// the current one. Required: left out, the request is refused (400), so
    /// that a forgotten field never makes a lot last forever.
    #[serde(default, deserialize_with = "crate::edge::present")]
    #[schema(value_type = Option<String>, required = true)]
    pub expires_at: Option<Option<String>>,
    pub reason: String,
}

#[derive(serde::Serialize, ToSchema)]
pub struct ExpiryBody {
    pub id: String,
    pub grant_id: String,
    pub customer_id: String,
    pub expires_at: Option<String>,
    /// Credits restored when an expired grant was reinstated; 0 for an extension.
    pub reinstated: String,
    pub balance_after: String,
    pub entry_id: String,
}

/// Extend a grant's expiry, or reinstate an expired grant (within 90 days of its expiry).
#[utoipa::path(post, path = "/v1/grants/{grant_id}/expiry", tag = "grants", request_body = ChangeExpiry,
    responses((status = 200, body = ExpiryBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)), security(("bearer" = ["write"])))]
pub async fn change_expiry(
    State(state): State<AppState>,
    caller: Caller,
    Path(grant_id): Path<String>,
    body: ApiJson<ChangeExpiry>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let body = body.read()?;
    let command = Command::ChangeExpiry {
        id: edge::id(&body.id, "id")?,
        grant_id: edge::id(&grant_id, "grant_id")?,
        expires_at: body
            .expires_at
            .ok_or_else(|| {
                ApiError::invalid(
                    "expires_at",
                    "expires_at is required: the new expiry, or null for never",
                )
            })?
            .as_deref()
            .map(|t| edge::instant(t, "expires_at"))
            .transpose()?,
        reason: required_reason(body.reason)?,
    };
    let executed = state.execute(command, &caller).await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::Expiry(e) => Ok(ExpiryBody {
            id: e.id.to_string(),
            grant_id: e.grant_id.to_string(),
            customer_id: e.customer_id.to_string(),
            expires_at: e.expires_at.map(edge::rfc3339),
            reinstated: amount(e.reinstated),
            balance_after: amount(e.balance_after),
            entry_id: crate::dto::entry_id(e.entry_id),
        }),
        _ => Err(unexpected()),
    }))
}
