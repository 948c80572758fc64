//! Plans and subscriptions.

use axum::extract::State;
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use tally_core::{Period, Plan, Rollover, Subscription};
use tally_store::{Command, NewSubscription, Outcome, PlanChange};
use utoipa::ToSchema;

use crate::auth::{Caller, Scope};
use crate::dto::{amount, OverageBody};
use crate::edge::{self, AmountInput, ApiJson, ApiQuery, Path};
use crate::error::{ApiError, ErrorBody};
use crate::routes::customers::unexpected;
use crate::{reply, AppState};

fn one() -> Option<u32> {
    Some(1)
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloverBody {
    /// At most this percentage (0–100) of the plan's included credits rolls over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 100)]
    pub max_percent: Option<u32>,
    /// At most this many credits roll over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<AmountInput>)]
    pub max_amount: Option<AmountInput>,
    /// The rolled-over credits expire this many periods later (default 1:
    /// at the end of the next period). They never roll over again.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 120)]
    pub expires_after_periods: Option<u32>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutPlan {
    pub name: String,
    /// `"month"`, `"year"` or `{"days": n}`. Fixed once the plan exists.
    #[schema(value_type = Value, example = "month")]
    #[serde(deserialize_with = "crate::edge::strict")]
    pub period: serde_json::Value,
    /// Credits granted at the start of every period (0 for pay as you go).
    #[schema(value_type = AmountInput, example = "10000")]
    pub included_credits: AmountInput,
    /// Each allocation expires this many periods after its period starts
    /// (default 1: at the end of its period; `null`: never).
    #[serde(default = "one")]
    #[schema(minimum = 1, maximum = 120)]
    pub allocation_expires_after_periods: Option<u32>,
    pub rollover: Option<RolloverBody>,
    /// The overage policy of subscribers that have none of their own.
    pub overage: Option<OverageBody>,
    /// On an upgrade to this plan, credits that expired within this many
    /// days before it are reinstated (0–90, default 0).
    #[serde(default)]
    #[schema(maximum = 90)]
    pub upgrade_grace_days: u32,
}

#[derive(Serialize, ToSchema)]
pub struct PlanBody {
    pub key: String,
    pub name: String,
    /// `"month"`, `"year"` or `{"days": n}`.
    #[schema(value_type = Value)]
    pub period: serde_json::Value,
    pub included_credits: String,
    pub allocation_expires_after_periods: Option<u32>,
    pub rollover: Option<RolloverBody>,
    pub overage: Option<OverageBody>,
    pub upgrade_grace_days: u32,
}

impl From<&Plan> for PlanBody {
    fn from(plan: &Plan) -> PlanBody {
        PlanBody {
            key: plan.key.clone(),
            name: plan.name.clone(),
            period: serde_json::to_value(plan.period).expect("period serializes"),
            included_credits: amount(plan.included_credits),
            allocation_expires_after_periods: plan.allocation_expires_after_periods,
            rollover: plan.rollover.as_ref().map(|r| RolloverBody {
                max_percent: r.max_percent,
                max_amount: r.max_amount.map(AmountInput),
                expires_after_periods: Some(r.expires_after_periods),
            }),
            overage: plan.overage.map(OverageBody::from),
            upgrade_grace_days: plan.upgrade_grace_days,
        }
    }
}

fn period(value: &serde_json::Value) -> Result<Period, ApiError> {
    let period: Period = serde_json::from_value(value.clone()).map_err(|_| {
        ApiError::invalid(
            "period",
            "period must be \"month\", \"year\" or {\"days\": n}",
        )
    })?;
    period
        .validate()
        .map_err(|message| ApiError::invalid("period", message))?;
    Ok(period)
}

fn plan_key(text: &str) -> Result<String, ApiError> {
    Ok(edge::id(text, "key")
        .map_err(|_| {
            ApiError::invalid(
                "key",
                "a plan key must be 1 to 128 characters of A-Z, a-z, 0-9, '_', '.', ':' or '-'",
            )
        })?
        .to_string())
}

/// Create or update a plan. Changes apply to subscribers from their next
/// period (the overage policy at once); the period itself is fixed.
#[utoipa::path(put, path = "/v1/plans/{key}", tag = "plans", request_body = PutPlan,
    responses((status = 200, body = PlanBody), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = ["admin"])))]
pub async fn put_plan(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    body: ApiJson<PutPlan>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let body = body.read()?;
    let key = plan_key(&key)?;
    let rollover = body.rollover.map(|r| Rollover {
        max_percent: r.max_percent,
        max_amount: r.max_amount.map(|a| a.0),
        expires_after_periods: r.expires_after_periods.unwrap_or(1),
    });
    let plan = Plan {
        key,
        // A plan's name shows on invoices and pages: not blank (as a feature's).
        name: super::pricebook::required_text(body.name, "name")?,
        period: period(&body.period)?,
        included_credits: body.included_credits.0,
        allocation_expires_after_periods: body.allocation_expires_after_periods,
        rollover,
        overage: body
            .overage
            .as_ref()
            .map(|o| o.policy("overage"))
            .transpose()?,
        upgrade_grace_days: body.upgrade_grace_days,
    };
    tally_core::plan::validate_plan(&plan)
        .map_err(|(param, message)| ApiError::invalid(param, message))?;
    let executed = state.execute(Command::PutPlan(plan), &caller).await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::Plan(plan) => Ok(PlanBody::from(plan)),
        _ => Err(unexpected()),
    }))
}

/// A plan.
#[utoipa::path(get, path = "/v1/plans/{key}", tag = "plans",
    responses((status = 200, body = PlanBody), (status = 404, body = ErrorBody)), security(("bearer" = ["read"])))]
pub async fn get_plan(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> Result<Json<PlanBody>, ApiError> {
    caller.require(Scope::Read)?;
    let key = plan_key(&key)?;
    let plan = state
        .store
        .plan(key.clone())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("plan {key}")))?;
    Ok(Json(PlanBody::from(&plan)))
}

#[derive(Serialize, ToSchema)]
pub struct PlanList {
    pub data: Vec<PlanBody>,
    pub next_cursor: Option<String>,
}

/// Every plan.
#[utoipa::path(get, path = "/v1/plans", tag = "plans", params(edge::ListParams),
    responses((status = 200, body = PlanList)), security(("bearer" = ["read"])))]
pub async fn list_plans(
    State(state): State<AppState>,
    caller: Caller,
    params: edge::ApiQuery<edge::ListParams>,
) -> Result<Json<PlanList>, ApiError> {
    caller.require(Scope::Read)?;
    let params = params.read()?;
    let plans = state.store.plans().await?;
    let (data, next_cursor) = edge::page(
        plans.iter().map(PlanBody::from).collect(),
        |p| &p.key,
        &params,
    )?;
    Ok(Json(PlanList { data, next_cursor }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutSubscription {
    /// This request's id (idempotency key); the subscription's id when it
    /// starts one.
    pub id: String,
    pub plan: String,
    /// When a new subscription starts (default now; not in the past).
    pub start_at: Option<String>,
    /// For a change of plan: `now` (default: a new period starts now with
    /// the new plan's full allocation) or `period_end`.
    pub change: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct SubscriptionBody {
    pub id: String,
    pub customer_id: String,
    pub plan: String,
    /// `scheduled` (starts later), `active`, or `canceled`.
    pub status: String,
    /// The current period, numbered from 0 (-1 before the start).
    pub period: i64,
    pub current_period_start: String,
    pub current_period_end: String,
    /// The plan that takes over at the period end.
    pub next_plan: Option<String>,
    pub cancel_at_period_end: bool,
    pub started_at: String,
    pub canceled_at: Option<String>,
}

impl From<&Subscription> for SubscriptionBody {
    fn from(s: &Subscription) -> SubscriptionBody {
        let status = match s.status {
            tally_core::SubscriptionStatus::Active if s.period < 0 => "scheduled",
            other => other.as_str(),
        };
        SubscriptionBody {
            id: s.id.to_string(),
            customer_id: s.customer_id.to_string(),
            plan: s.plan.clone(),
            status: status.to_string(),
            period: s.period,
            current_period_start: edge::rfc3339(s.period_start),
            current_period_end: edge::rfc3339(s.period_end),
            next_plan: s.next_plan.clone(),
            cancel_at_period_end: s.cancel_at_period_end,
            started_at: edge::rfc3339(s.started_at),
            canceled_at: s.canceled_at.map(edge::rfc3339),
        }
    }
}

/// Start a subscription, or change the plan of the active one.
///
/// A start grants the plan's first allocation at `start_at`. A change `now`
/// ends the current period and what is left of its allocation (an `expire`
/// entry), and starts a new period at once with the new plan's full
/// allocation; other credits keep their expiry. On an upgrade, the new plan's
/// `upgrade_grace_days` reinstates credits that expired by time within that
/// many days, since the subscription started or last moved to a lower plan.
/// A change at `period_end` takes effect at the next renewal. The
/// body's `id` is the change's own idempotency key; the subscription keeps its id.
#[utoipa::path(put, path = "/v1/customers/{id}/subscription", tag = "plans", request_body = PutSubscription,
    responses((status = 200, body = SubscriptionBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("bearer" = ["write"])))]
pub async fn put_subscription(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
    body: ApiJson<PutSubscription>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let body = body.read()?;
    let change = match body.change.as_deref() {
        None | Some("now") => PlanChange::Now,
        Some("period_end") => PlanChange::PeriodEnd,
        Some(_) => {
            return Err(ApiError::invalid(
                "change",
                "change must be \"now\" or \"period_end\"",
            ))
        }
    };
    let command = Command::Subscribe(NewSubscription {
        id: edge::id(&body.id, "id")?,
        customer_id: edge::id(&customer_id, "customer_id")?,
        plan: plan_key(&body.plan)
            .map_err(|_| ApiError::invalid("plan", "plan is not a valid plan key"))?,
        start_at: body
            .start_at
            .as_deref()
            .map(|t| edge::instant(t, "start_at"))
            .transpose()?,
        change,
    });
    let executed = state.execute(command, &caller).await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::Subscription(s) => Ok(SubscriptionBody::from(s)),
        _ => Err(unexpected()),
    }))
}

/// A customer's subscription: the active (or scheduled) one, else the latest.
#[utoipa::path(get, path = "/v1/customers/{id}/subscription", tag = "plans",
    responses((status = 200, body = SubscriptionBody), (status = 404, body = ErrorBody)), security(("bearer" = ["read"])))]
pub async fn get_subscription(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
) -> Result<Json<SubscriptionBody>, ApiError> {
    caller.require(Scope::Read)?;
    let id = edge::id(&customer_id, "id")?;
    let subscriptions = state.store.subscriptions(id.clone()).await?;
    let latest = subscriptions
        .first()
        .ok_or_else(|| ApiError::not_found(format!("subscription of customer {id}")))?;
    Ok(Json(SubscriptionBody::from(latest)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelParams {
    /// `true`: cancel at the end of the current period (no further renewal);
    /// `false` (default): now, and what is left of the current period's plan
    /// allocation expires with it; other credits keep their expiry.
    pub at_period_end: Option<bool>,
}

/// Cancel the active subscription.
#[utoipa::path(delete, path = "/v1/customers/{id}/subscription", tag = "plans",
    params(("at_period_end" = Option<bool>, Query, description = "cancel at the period end instead of now")),
    responses((status = 200, body = SubscriptionBody), (status = 404, body = ErrorBody)), security(("bearer" = ["write"])))]
pub async fn cancel_subscription(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
    params: ApiQuery<CancelParams>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let params = params.read()?;
    let command = Command::CancelSubscription {
        customer_id: edge::id(&customer_id, "id")?,
        at_period_end: params.at_period_end.unwrap_or(false),
    };
    let executed = state.execute(command, &caller).await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::Subscription(s) => Ok(SubscriptionBody::from(s)),
        _ => Err(unexpected()),
    }))
}
