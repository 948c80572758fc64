//! Members of a customer and their budgets inside the shared balance.

use axum::extract::State;
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use tally_core::{Budget, BudgetPeriod, Member, Timestamp};
use tally_store::{Command, Outcome};
use utoipa::ToSchema;

use crate::auth::{Caller, Scope};
use crate::dto::amount;
use crate::edge::{self, AmountInput, ApiJson, Path};
use crate::error::{ApiError, ErrorBody};
use crate::routes::customers::unexpected;
use crate::{reply, AppState};

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetInput {
    #[schema(value_type = AmountInput, example = "3000")]
    pub amount: AmountInput,
    /// `day`, `month` or `year`: UTC calendar windows.
    pub period: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutMember {
    /// Omitted: kept as it is; `null`: removed.
    #[serde(default, deserialize_with = "crate::edge::present")]
    #[schema(value_type = Option<String>)]
    pub name: Option<Option<String>>,
    /// At most this much per window, inside the customer's shared balance.
    /// Omitted: kept as it is (with what it counted); `null`: no budget.
    #[serde(default, deserialize_with = "crate::edge::present")]
    #[schema(value_type = Option<BudgetInput>)]
    pub budget: Option<Option<BudgetInput>>,
}

#[derive(Serialize, ToSchema)]
pub struct BudgetBody {
    pub amount: String,
    pub period: String,
    /// Spent (charged, captured or held) in the current window.
    pub spent: String,
    /// What the budget still allows in the current window.
    pub remaining: String,
    pub window_start: String,
}

#[derive(Serialize, ToSchema)]
pub struct MemberBody {
    pub id: String,
    pub customer_id: String,
    pub name: Option<String>,
    pub budget: Option<BudgetBody>,
}

fn member_body(customer_id: &str, member: &Member, now: Timestamp) -> MemberBody {
    MemberBody {
        id: member.id.to_string(),
        customer_id: customer_id.to_string(),
        name: member.name.clone(),
        budget: member.budget.map(|b| BudgetBody {
            amount: amount(b.amount),
            period: b.period.as_str().to_string(),
            spent: amount(member.spent_at(now)),
            remaining: amount(member.room_at(now).unwrap_or_default()),
            window_start: edge::rfc3339(b.period.window_start(now)),
        }),
    }
}

/// Add or update a member and its budget: a field left out keeps its value, a
/// `null` removes it (a rename keeps the budget and what it counted). Every
/// charge, hold or event that names the member counts against its budget in
/// the same step that checks
/// the shared balance; past it the spend is refused with 402
/// `member_budget_exceeded`. A released or timed-out hold gives its credits
/// back to the budget, and so does a refund, of what it refunds, if the
/// budget counted that spend in its current window.
#[utoipa::path(put, path = "/v1/customers/{id}/members/{member_id}", tag = "members", request_body = PutMember,
    responses((status = 200, body = MemberBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = ["write"])))]
pub async fn put_member(
    State(state): State<AppState>,
    caller: Caller,
    Path((customer_id, member_id)): Path<(String, String)>,
    body: ApiJson<PutMember>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let body = body.read()?;
    let budget = match body.budget {
        Some(Some(b)) => Some(Some(Budget {
            amount: edge::positive(b.amount, "budget.amount")?,
            period: BudgetPeriod::parse(&b.period).ok_or_else(|| {
                ApiError::invalid("budget.period", "budget.period must be day, month or year")
            })?,
        })),
        Some(None) => Some(None),
        None => None,
    };
    let customer = edge::id(&customer_id, "id")?;
    let command = Command::PutMember {
        customer_id: customer.clone(),
        member_id: edge::id(&member_id, "member_id")?,
        name: match body.name {
            Some(name) => Some(edge::text(name, "name", 256)?),
            None => None,
        },
        budget,
    };
    let now = state.store.now();
    let executed = state.execute(command, &caller).await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::Member(member) => Ok(member_body(customer.as_str(), member, now)),
        _ => Err(unexpected()),
    }))
}

#[derive(Serialize, ToSchema)]
pub struct MemberList {
    pub data: Vec<MemberBody>,
    pub next_cursor: Option<String>,
}

/// A customer's members with what each spent of its budget.
#[utoipa::path(get, path = "/v1/customers/{id}/members", tag = "members", params(edge::ListParams),
    responses((status = 200, body = MemberList), (status = 404, body = ErrorBody)), security(("bearer" = ["read"])))]
pub async fn list_members(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
    params: edge::ApiQuery<edge::ListParams>,
) -> Result<Json<MemberList>, ApiError> {
    caller.require(Scope::Read)?;
    let params = params.read()?;
    let id = edge::id(&customer_id, "id")?;
    let now = state.store.now();
    let members = state
        .store
        .members(id.clone())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("customer {id}")))?;
    let (data, next_cursor) = edge::page(
        members
            .iter()
            .map(|m| member_body(id.as_str(), m, now))
            .collect(),
        |m| &m.id,
        &params,
    )?;
    Ok(Json(MemberList { data, next_cursor }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferParty {
    pub customer_id: String,
    pub member_id: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTransfer {
    /// The transfer's id (idempotency key).
    pub id: String,
    pub from: TransferParty,
    pub to: TransferParty,
    #[schema(value_type = AmountInput, example = "500")]
    pub amount: AmountInput,
    pub reason: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct TransferSide {
    pub customer_id: String,
    pub member_id: Option<String>,
    pub entry_id: String,
    pub balance_after: String,
}

#[derive(Serialize, ToSchema)]
pub struct TransferBody {
    pub id: String,
    /// `credits`: between two customers (one entry on each side, the
    /// receiver gets lots keeping the paid flag, cost basis, priority and
    /// expiry of the credits sent); `budget`: between two members of one
    /// customer, for the current budget window (no credits move).
    pub kind: String,
    pub amount: String,
    pub from: TransferSide,
    pub to: TransferSide,
    /// The lots the receiving customer got.
    pub grants: Vec<String>,
}

/// Transfer credits between customers, or budget between two members of
/// one customer; exactly once by its id.
#[utoipa::path(post, path = "/v1/transfers", tag = "members", request_body = CreateTransfer,
    responses((status = 200, body = TransferBody), (status = 400, body = ErrorBody), (status = 402, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, description = "member_without_budget", body = ErrorBody)),
    security(("bearer" = ["write"])))]
pub async fn create_transfer(
    State(state): State<AppState>,
    caller: Caller,
    body: ApiJson<CreateTransfer>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let body = body.read()?;
    let member = |m: Option<String>, param: &str| m.map(|m| edge::id(&m, param)).transpose();
    let transfer = tally_store::NewTransfer {
        id: edge::id(&body.id, "id")?,
        from_customer: edge::id(&body.from.customer_id, "from.customer_id")?,
        from_member: member(body.from.member_id, "from.member_id")?,
        to_customer: edge::id(&body.to.customer_id, "to.customer_id")?,
        to_member: member(body.to.member_id, "to.member_id")?,
        amount: edge::positive(body.amount, "amount")?,
        reason: edge::text(body.reason, "reason", 1024)?,
    };
    // Wrong on its own, so refused here, before the writer: the id stays
    // free for the corrected request (README).
    if transfer.from_customer == transfer.to_customer {
        match (&transfer.from_member, &transfer.to_member) {
            (Some(from), Some(to)) if from == to => {
                return Err(ApiError::invalid(
                    "to.member_id",
                    "from and to are the same member",
                ))
            }
            (Some(_), Some(_)) => {}
            (from, _) => {
                return Err(ApiError::invalid(
                    if from.is_none() {
                        "from.member_id"
                    } else {
                        "to.member_id"
                    },
                    "a transfer within one customer moves budget between two members: \
                     give from.member_id and to.member_id",
                ))
            }
        }
    }
    let command = Command::Transfer(transfer);
    let executed = state.execute(command, &caller).await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::Transfer(t) => Ok(TransferBody {
            id: t.id.to_string(),
            kind: t.kind.clone(),
            amount: amount(t.amount),
            from: TransferSide {
                customer_id: t.from_customer.to_string(),
                member_id: t.from_member.as_ref().map(ToString::to_string),
                entry_id: format!("ent_{}", t.from_entry),
                balance_after: amount(t.from_balance_after),
            },
            to: TransferSide {
                customer_id: t.to_customer.to_string(),
                member_id: t.to_member.as_ref().map(ToString::to_string),
                entry_id: format!("ent_{}", t.to_entry),
                balance_after: amount(t.to_balance_after),
            },
            grants: t.grants.iter().map(ToString::to_string).collect(),
        }),
        _ => Err(unexpected()),
    }))
}
