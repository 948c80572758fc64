//! The price book: features, versions (draft, publish, history, diff,
//! simulate), customer contracts and quotes.

use axum::extract::State;
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use tally_core::pricebook::{diff, Contract, RuleChange};
use tally_core::Rule;
use tally_store::catalog::{ContractRecord, FeatureRecord, PricebookRecord, PricebookStatus};
use tally_store::{Command, Outcome, SimulationLine, UsageInput};
use utoipa::{IntoParams, ToSchema};

use super::customers::unexpected;
use super::spend::properties_of;
use crate::auth::{Caller, Scope};
use crate::dto::{amount, draws, DrawBody, Page};
use crate::edge::{self, rfc3339, AmountInput, ApiJson, ApiQuery, Path};
use crate::error::{ApiError, ErrorBody};
use crate::{reply, AppState};

// ---------------------------------------------------------------------------
// Features
// ---------------------------------------------------------------------------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutFeature {
    /// What people call it: "AI message".
    pub name: String,
    /// What a quantity counts: "message", "row", "token".
    pub unit: String,
}

#[derive(Serialize, ToSchema)]
pub struct FeatureBody {
    pub key: String,
    pub name: String,
    pub unit: String,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&FeatureRecord> for FeatureBody {
    fn from(f: &FeatureRecord) -> Self {
        FeatureBody {
            key: f.key.clone(),
            name: f.name.clone(),
            unit: f.unit.clone(),
            created_at: rfc3339(f.created_at),
            updated_at: rfc3339(f.updated_at),
        }
    }
}

/// Create or update a feature.
#[utoipa::path(put, path = "/v1/features/{key}", tag = "price book", request_body = PutFeature,
    responses((status = 200, body = FeatureBody), (status = 400, body = ErrorBody)), security(("bearer" = ["admin"])))]
pub async fn put_feature(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    body: ApiJson<PutFeature>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let body = body.read()?;
    let key = edge::id(&key, "key")?.to_string();
    let name = required_text(body.name, "name")?;
    let unit = required_text(body.unit, "unit")?;
    let executed = state
        .execute(Command::PutFeature { key, name, unit }, &caller)
        .await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::Feature(f) => Ok(FeatureBody::from(f)),
        _ => Err(unexpected()),
    }))
}

pub(crate) fn required_text(text: String, param: &str) -> Result<String, ApiError> {
    edge::text(Some(text), param, 256)?
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| ApiError::invalid(param, format!("{param} must not be blank")))
}

/// Every feature.
#[utoipa::path(get, path = "/v1/features", tag = "price book", params(edge::ListParams),
    responses((status = 200, body = Page<FeatureBody>)), security(("bearer" = ["read"])))]
pub async fn list_features(
    State(state): State<AppState>,
    caller: Caller,
    params: edge::ApiQuery<edge::ListParams>,
) -> Result<Json<Page<FeatureBody>>, ApiError> {
    caller.require(Scope::Read)?;
    let params = params.read()?;
    let features = state.store.features().await?;
    let (data, next_cursor) = edge::page(
        features.iter().map(FeatureBody::from).collect(),
        |f| &f.key,
        &params,
    )?;
    Ok(Json(Page { data, next_cursor }))
}

// ---------------------------------------------------------------------------
// Versions
// ---------------------------------------------------------------------------

#[derive(Serialize, ToSchema)]
pub struct PricebookBody {
    pub id: String,
    /// `draft` (editable) or `published` (never changes again).
    pub status: String,
    /// Whether this is the version pricing usage now.
    pub in_effect: bool,
    /// The version whose rules the draft started from.
    pub copied_from: Option<String>,
    #[schema(value_type = Vec<Object>)]
    pub rules: Vec<Rule>,
    pub created_at: String,
    /// `key:<id>` of the API key that created it.
    pub created_by: Option<String>,
    pub updated_at: String,
    pub effective_at: Option<String>,
    pub published_at: Option<String>,
    /// `key:<id>` of the API key that published it.
    pub published_by: Option<String>,
}

fn render_book(book: &PricebookRecord, in_effect: Option<&str>) -> PricebookBody {
    PricebookBody {
        id: book.id.clone(),
        status: match book.status {
            PricebookStatus::Draft => "draft".into(),
            PricebookStatus::Published => "published".into(),
        },
        in_effect: in_effect == Some(book.id.as_str()),
        copied_from: book.copied_from.clone(),
        rules: book.rules.clone(),
        created_at: rfc3339(book.created_at),
        created_by: book.created_by.clone(),
        updated_at: rfc3339(book.updated_at),
        effective_at: book.effective_at.map(rfc3339),
        published_at: book.published_at.map(rfc3339),
        published_by: book.published_by.clone(),
    }
}

/// The id of the version in effect now, from every version.
fn in_effect_now(state: &AppState, books: &[PricebookRecord]) -> Option<String> {
    let published = tally_core::pricebook::PriceBook::new(
        books.iter().filter_map(PricebookRecord::version).collect(),
    );
    published.in_effect(state.store.now()).map(|v| v.id.clone())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePricebook {
    /// The version's id ("2026-12", "v3"): also its idempotency key.
    pub id: String,
    /// Copy the rules of this version into the new draft.
    pub from: Option<String>,
}

/// Start a draft version.
#[utoipa::path(post, path = "/v1/pricebooks", tag = "price book", request_body = CreatePricebook,
    responses((status = 200, body = PricebookBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)), security(("bearer" = ["admin"])))]
pub async fn create_pricebook(
    State(state): State<AppState>,
    caller: Caller,
    body: ApiJson<CreatePricebook>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let body = body.read()?;
    let id = edge::id(&body.id, "id")?;
    let from = body
        .from
        .map(|f| edge::id(&f, "from").map(|f| f.to_string()))
        .transpose()?;
    let executed = state
        .execute(Command::CreatePricebook { id, from }, &caller)
        .await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::Pricebook(b) => Ok(render_book(b, None)),
        _ => Err(unexpected()),
    }))
}

/// Every version, drafts and published alike, in order of creation (a draft published while a
/// client pages keeps its place).
#[utoipa::path(get, path = "/v1/pricebooks", tag = "price book", params(edge::ListParams),
    responses((status = 200, body = Page<PricebookBody>)), security(("bearer" = ["read"])))]
pub async fn list_pricebooks(
    State(state): State<AppState>,
    caller: Caller,
    params: edge::ApiQuery<edge::ListParams>,
) -> Result<Json<Page<PricebookBody>>, ApiError> {
    caller.require(Scope::Read)?;
    let params = params.read()?;
    let books = state.store.pricebooks().await?;
    let current = in_effect_now(&state, &books);
    let (data, next_cursor) = edge::page(
        books
            .iter()
            .map(|b| render_book(b, current.as_deref()))
            .collect(),
        |b| &b.id,
        &params,
    )?;
    Ok(Json(Page { data, next_cursor }))
}

/// One version with its rules.
#[utoipa::path(get, path = "/v1/pricebooks/{id}", tag = "price book",
    responses((status = 200, body = PricebookBody), (status = 404, body = ErrorBody)), security(("bearer" = ["read"])))]
pub async fn get_pricebook(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<PricebookBody>, ApiError> {
    caller.require(Scope::Read)?;
    let books = state.store.pricebooks().await?;
    let current = in_effect_now(&state, &books);
    let book = books
        .iter()
        .find(|b| b.id == id)
        .ok_or_else(|| ApiError::not_found(format!("price book {id}")))?;
    Ok(Json(render_book(book, current.as_deref())))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutRules {
    /// Each rule: `{"feature", "plan"?, "region"?, "match"?: {...}}` and one price:
    /// `"credits_per_unit"`, `"block": {"size", "credits"}` or `"tiers": {"mode", "steps"}`.
    #[schema(value_type = Vec<Object>)]
    #[serde(deserialize_with = "crate::edge::strict_vec")]
    pub rules: Vec<serde_json::Value>,
}

/// Read rules one by one, so an error names the rule.
fn parse_rules(values: Vec<serde_json::Value>, param: &str) -> Result<Vec<Rule>, ApiError> {
    if values.len() > 10_000 {
        return Err(ApiError::invalid(param, "at most 10000 rules"));
    }
    values
        .into_iter()
        .enumerate()
        .map(|(index, value)| {
            // From the rule's text, not the value: a number such as 1.5 that
            // a float renders exactly would reach the amount as an `f64`
            // (which amounts refuse); read from text it keeps its digits.
            let text = value.to_string();
            let rule: Rule = crate::objects::from_slice_untracked(text.as_bytes()).map_err(|e| {
                ApiError::invalid(param, format!("rule {index} is not a valid rule: {e}"))
            })?;
            edge::id(&rule.feature, param).map_err(|_| {
                ApiError::invalid(
                    param,
                    format!("rule {index}: feature must be a feature key (1-128 of A-Z a-z 0-9 _ . : -)"),
                )
            })?;
            Ok(rule)
        })
        .collect()
}

/// Replace a draft's rules (published versions never change).
#[utoipa::path(put, path = "/v1/pricebooks/{id}/rules", tag = "price book", request_body = PutRules,
    responses((status = 200, body = PricebookBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)), security(("bearer" = ["admin"])))]
pub async fn put_rules(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: ApiJson<PutRules>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let body = body.read()?;
    let id = edge::id(&id, "id")?.to_string();
    let rules = parse_rules(body.rules, "rules")?;
    let executed = state
        .execute(Command::PutRules { id, rules }, &caller)
        .await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::Pricebook(b) => Ok(render_book(b, None)),
        _ => Err(unexpected()),
    }))
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    /// When the version starts pricing usage (RFC 3339); default now, never in the past.
    pub effective_at: Option<String>,
}

/// Publish a draft: from `effective_at` it prices all usage.
#[utoipa::path(post, path = "/v1/pricebooks/{id}/publish", tag = "price book", request_body = Publish,
    responses((status = 200, body = PricebookBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)), security(("bearer" = ["admin"])))]
pub async fn publish(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: crate::edge::JsonBytes,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let id = edge::id(&id, "id")?.to_string();
    let body: Publish = super::spend::optional_body(body)?;
    let effective_at = body
        .effective_at
        .as_deref()
        .map(|t| edge::instant(t, "effective_at"))
        .transpose()?;
    let executed = state
        .execute(Command::Publish { id, effective_at }, &caller)
        .await?;
    let books = state.store.pricebooks().await?;
    let current = in_effect_now(&state, &books);
    Ok(reply(executed, |outcome| match outcome {
        Outcome::Pricebook(b) => Ok(render_book(b, current.as_deref())),
        _ => Err(unexpected()),
    }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DiffParams {
    /// The version to compare with (the "before").
    pub against: String,
}

#[derive(Serialize, ToSchema)]
pub struct DiffBody {
    /// The version compared with.
    pub from: String,
    /// This version.
    pub to: String,
    /// Rules added, removed and re-priced, matched by feature, plan, region and `match`.
    #[schema(value_type = Vec<Object>)]
    pub changes: Vec<RuleChange>,
}

/// What changed between two versions.
#[utoipa::path(get, path = "/v1/pricebooks/{id}/diff", tag = "price book", params(DiffParams),
    responses((status = 200, body = DiffBody), (status = 404, body = ErrorBody)), security(("bearer" = ["read"])))]
pub async fn diff_pricebooks(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    params: ApiQuery<DiffParams>,
) -> Result<Json<DiffBody>, ApiError> {
    caller.require(Scope::Read)?;
    let params = params.read()?;
    let books = state.store.pricebooks().await?;
    let find = |wanted: &str| {
        books
            .iter()
            .find(|b| b.id == wanted)
            .ok_or_else(|| ApiError::not_found(format!("price book {wanted}")))
    };
    let (after, before) = (find(&id)?, find(&params.against)?);
    Ok(Json(DiffBody {
        from: before.id.clone(),
        to: after.id.clone(),
        changes: diff(&before.rules, &after.rules),
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Simulate {
    /// Start of the window of recorded usage (RFC 3339, inclusive). Usage
    /// counts at its own time, as in the usage report: a late event's
    /// timestamp, not when it was recorded.
    pub from: String,
    /// End of the window (exclusive).
    pub to: String,
}

#[derive(Serialize, ToSchema)]
pub struct SimulationLineBody {
    /// The feature or customer id (or `total`).
    pub key: String,
    /// Priced charges and captures repriced.
    pub events: u64,
    /// Of those, how many this version cannot price (counted at their recorded cost).
    pub unpriced: u64,
    pub quantity: String,
    /// Credits the usage cost when it was recorded.
    pub recorded: String,
    /// Credits it would cost under this version.
    pub simulated: String,
    /// `simulated - recorded`.
    pub difference: String,
}

#[derive(Serialize, ToSchema)]
pub struct SimulationBody {
    pub pricebook: String,
    pub from: String,
    pub to: String,
    pub total: SimulationLineBody,
    pub by_feature: Vec<SimulationLineBody>,
    pub by_customer: Vec<SimulationLineBody>,
}

fn render_line(line: &SimulationLine) -> SimulationLineBody {
    SimulationLineBody {
        key: line.key.clone(),
        events: line.events,
        unpriced: line.unpriced,
        quantity: crate::dto::micros(line.quantity_micros),
        recorded: crate::dto::micros(line.recorded_micros),
        simulated: crate::dto::micros(line.simulated_micros),
        difference: crate::dto::micros(line.simulated_micros - line.recorded_micros),
    }
}

/// Reprice recorded usage under this version (a draft, usually), touching nothing.
#[utoipa::path(post, path = "/v1/pricebooks/{id}/simulate", tag = "price book", request_body = Simulate,
    responses((status = 200, body = SimulationBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = ["read"])))]
pub async fn simulate(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: ApiJson<Simulate>,
) -> Result<Json<SimulationBody>, ApiError> {
    caller.require(Scope::Read)?;
    let body = body.read()?;
    let from = edge::instant(&body.from, "from")?;
    let to = edge::instant(&body.to, "to")?;
    if to <= from {
        return Err(ApiError::invalid("to", "to must be after from"));
    }
    let simulation = state
        .store
        .simulate(id.clone(), from, to)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("price book {id}")))?;
    Ok(Json(SimulationBody {
        pricebook: simulation.pricebook,
        from: rfc3339(simulation.from),
        to: rfc3339(simulation.to),
        total: render_line(&simulation.total),
        by_feature: simulation.by_feature.iter().map(render_line).collect(),
        by_customer: simulation.by_customer.iter().map(render_line).collect(),
    }))
}

// ---------------------------------------------------------------------------
// Contracts
// ---------------------------------------------------------------------------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutContract {
    /// The contract's id: its idempotency key (a changed contract takes a new id).
    pub id: String,
    pub effective_from: Option<String>,
    /// Exclusive end.
    pub effective_to: Option<String>,
    /// The customer's own prices, which win over every price book rule (no plan or region).
    /// A fixed price per N actions is a `block` rule.
    #[schema(value_type = Option<Vec<Object>>)]
    #[serde(default, deserialize_with = "crate::edge::strict_opt_vec")]
    pub rules: Option<Vec<serde_json::Value>>,
    /// Multiplies price book prices (not the contract's own rules): "0.8" is 20% off.
    #[schema(value_type = Option<AmountInput>)]
    pub multiplier: Option<AmountInput>,
    /// Price by this published version for the contract's window (rates locked).
    pub pinned_pricebook: Option<String>,
    /// Pin the version in effect when the contract starts.
    #[serde(default)]
    pub lock_rates: bool,
}

#[derive(Serialize, ToSchema)]
pub struct ContractBody {
    pub id: String,
    pub customer_id: String,
    pub effective_from: Option<String>,
    pub effective_to: Option<String>,
    #[schema(value_type = Vec<Object>)]
    pub rules: Vec<Rule>,
    pub multiplier: Option<String>,
    /// The version whose rates the contract locks (with `lock_rates`, the
    /// version in effect at its start, shown once the start has come).
    pub pinned_pricebook: Option<String>,
    /// Rates locked to the version in effect at `effective_from`, a start
    /// still to come when the contract was set.
    pub lock_rates: bool,
    pub updated_at: String,
    pub updated_by: Option<String>,
}

fn render_contract(record: &ContractRecord) -> ContractBody {
    let c = &record.contract;
    ContractBody {
        id: c.id.clone(),
        customer_id: record.customer_id.clone(),
        effective_from: c.effective_from.map(rfc3339),
        effective_to: c.effective_to.map(rfc3339),
        rules: c.rules.clone(),
        multiplier: c.multiplier.map(amount),
        pinned_pricebook: c.pinned_pricebook.clone(),
        lock_rates: c.lock_rates,
        updated_at: rfc3339(record.updated_at),
        updated_by: record.updated_by.clone(),
    }
}

/// Add a contract to a customer's schedule. At any instant the most recently
/// set contract whose window contains it applies, so a renewal can be set
/// before it starts and a new open-ended contract replaces the ones before.
#[utoipa::path(put, path = "/v1/customers/{id}/contract", tag = "price book", request_body = PutContract,
    responses((status = 200, body = ContractBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)), security(("bearer" = ["admin"])))]
pub async fn put_contract(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
    body: ApiJson<PutContract>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let body = body.read()?;
    let customer_id = edge::id(&customer_id, "id")?;
    let id = edge::id(&body.id, "id")?;
    let instant = |value: Option<String>, param: &str| {
        value
            .as_deref()
            .map(|t| edge::instant(t, param))
            .transpose()
    };
    let multiplier = match body.multiplier {
        Some(m) if m.0.is_negative() => {
            return Err(ApiError::invalid(
                "multiplier",
                "multiplier must be zero or more",
            ))
        }
        Some(m) => Some(m.0),
        None => None,
    };
    let contract = Contract {
        id: id.to_string(),
        effective_from: instant(body.effective_from, "effective_from")?,
        effective_to: instant(body.effective_to, "effective_to")?,
        rules: parse_rules(body.rules.unwrap_or_default(), "rules")?,
        multiplier,
        pinned_pricebook: body
            .pinned_pricebook
            .map(|p| edge::id(&p, "pinned_pricebook").map(|p| p.to_string()))
            .transpose()?,
        lock_rates: false,
    };
    // Checked here, on the request alone, so that it is bad input (the id stays free) and
    // not a refusal kept under the id.
    if let Some((param, problem)) = contract.fault() {
        return Err(ApiError::invalid(&param, problem));
    }
    let command = Command::PutContract {
        id,
        customer_id,
        contract,
        lock_rates: body.lock_rates,
    };
    let executed = state.execute(command, &caller).await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::Contract(c) => Ok(render_contract(c)),
        _ => Err(unexpected()),
    }))
}

/// The contract that applies to a customer now: the most recently set one
/// whose window contains now.
#[utoipa::path(get, path = "/v1/customers/{id}/contract", tag = "price book",
    responses((status = 200, body = ContractBody), (status = 404, body = ErrorBody)), security(("bearer" = ["read"])))]
pub async fn get_contract(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
) -> Result<Json<ContractBody>, ApiError> {
    caller.require(Scope::Read)?;
    let id = edge::id(&customer_id, "id")?;
    let all = state.store.contracts(id.clone()).await?;
    let record = tally_store::catalog::contract_at(&all, state.store.now())
        .ok_or_else(|| ApiError::not_found(format!("contract in effect for customer {id}")))?;
    let mut body = render_contract(record);
    show_locks(
        &state,
        std::slice::from_mut(&mut body),
        std::slice::from_ref(record),
    )
    .await?;
    Ok(Json(body))
}

/// A `lock_rates` contract whose start has come shows the version it locks
/// as `pinned_pricebook` (no version can take effect before now any more).
async fn show_locks(
    state: &AppState,
    bodies: &mut [ContractBody],
    records: &[ContractRecord],
) -> Result<(), ApiError> {
    let now = state.store.now();
    let started = |record: &ContractRecord| {
        record.contract.lock_rates
            && record
                .contract
                .effective_from
                .is_some_and(|from| from <= now)
    };
    if !records.iter().any(started) {
        return Ok(());
    }
    let books = state.store.pricebooks().await?;
    for (body, record) in bodies.iter_mut().zip(records) {
        let Some(from) = record.contract.effective_from.filter(|_| started(record)) else {
            continue;
        };
        body.pinned_pricebook = books
            .iter()
            .filter(|b| b.status == tally_store::catalog::PricebookStatus::Published)
            .filter_map(|b| Some((b.effective_at?, b.published_seq, b)))
            .filter(|(at, _, _)| *at <= from)
            .max_by_key(|(at, seq, _)| (*at, *seq))
            .map(|(_, _, b)| b.id.clone());
    }
    Ok(())
}

/// Every contract of a customer, in the order they were set (past, current
/// and scheduled).
#[utoipa::path(get, path = "/v1/customers/{id}/contracts", tag = "price book", params(edge::ListParams),
    responses((status = 200, body = Page<ContractBody>), (status = 404, body = ErrorBody)), security(("bearer" = ["read"])))]
pub async fn list_contracts(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
    params: edge::ApiQuery<edge::ListParams>,
) -> Result<Json<Page<ContractBody>>, ApiError> {
    caller.require(Scope::Read)?;
    let params = params.read()?;
    let id = edge::id(&customer_id, "id")?;
    let all = state.store.contracts(id.clone()).await?;
    if all.is_empty() && state.store.customer(id.clone()).await?.is_none() {
        return Err(ApiError::not_found(format!("customer {id}")));
    }
    let mut bodies: Vec<ContractBody> = all.iter().map(render_contract).collect();
    show_locks(&state, &mut bodies, &all).await?;
    let (data, next_cursor) = edge::page(bodies, |c| &c.id, &params)?;
    Ok(Json(Page { data, next_cursor }))
}

// ---------------------------------------------------------------------------
// Quotes
// ---------------------------------------------------------------------------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateQuote {
    pub customer_id: String,
    pub feature: String,
    #[schema(value_type = AmountInput)]
    pub quantity: AmountInput,
    #[schema(value_type = Option<Object>)]
    #[serde(default, deserialize_with = "crate::edge::strict_opt")]
    pub properties: Option<serde_json::Value>,
    pub member_id: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct QuoteBody {
    pub customer_id: String,
    pub feature: String,
    pub quantity: String,
    /// What the charge would cost.
    pub cost: String,
    /// Whether it would be accepted now.
    pub fits: bool,
    /// Why it would be refused, when it does not fit: the charge's error
    /// (`insufficient_credits`, `member_budget_exceeded`) as `{code,
    /// message}`; null when it fits.
    #[schema(value_type = Option<Object>)]
    pub refusal: Option<serde_json::Value>,
    /// The version that would price it (null when the contract's own rule does).
    pub pricebook: Option<String>,
    pub rule: String,
    /// The grants it would draw on, in burn order.
    pub drawn: Vec<DrawBody>,
    /// The balance after it, as every entry's `balance_after`: the credits
    /// available less any debt, negative while the customer owes
    /// (unchanged when it does not fit).
    pub balance_after: String,
    /// Available now.
    pub available: String,
    /// How the price was found, in words.
    pub explanation: String,
}

fn render_quote(q: &tally_store::QuoteOutcome) -> QuoteBody {
    let (customer_id, pricing, drawn, after, available) = (
        &q.customer_id,
        &q.pricing,
        &q.drawn,
        q.balance_after,
        q.available,
    );
    QuoteBody {
        customer_id: customer_id.to_string(),
        feature: pricing.feature.clone(),
        quantity: amount(pricing.quantity),
        cost: amount(pricing.cost),
        fits: q.refusal.is_none(),
        refusal: q
            .refusal
            .as_ref()
            .map(|r| serde_json::json!({ "code": r.code, "message": r.message })),
        pricebook: pricing.pricebook().map(str::to_owned),
        rule: pricing.rule_label(),
        drawn: draws(drawn),
        balance_after: amount(after),
        available: amount(available),
        explanation: pricing.describe(),
    }
}

/// What a charge would do now: cost, rule, version, grants and balance after. Writes nothing.
#[utoipa::path(post, path = "/v1/quotes", tag = "charges", request_body = CreateQuote,
    responses((status = 200, body = QuoteBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)), security(("bearer" = ["read"])))]
pub async fn create_quote(
    State(state): State<AppState>,
    caller: Caller,
    body: ApiJson<CreateQuote>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let body = body.read()?;
    let customer_id = edge::id(&body.customer_id, "customer_id")?;
    let feature = edge::id(&body.feature, "feature")?.to_string();
    let quantity = edge::positive(body.quantity, "quantity")?;
    let usage = UsageInput {
        feature,
        quantity,
        properties: properties_of(body.properties)?,
    };
    let member_id = body
        .member_id
        .map(|m| edge::id(&m, "member_id"))
        .transpose()?;
    let command = Command::Quote {
        customer_id,
        usage,
        member_id,
    };
    let executed = state.execute(command, &caller).await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::Quote(q) => Ok(render_quote(q)),
        _ => Err(unexpected()),
    }))
}
