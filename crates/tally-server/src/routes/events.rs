//! Usage events over HTTP (batches and Google Pub/Sub push) and the dead
//! letters of every source.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use tally_store::{Command, DeadLetterRecord, DeadLetterStatus, Outcome};
use utoipa::{IntoParams, ToSchema};

use crate::auth::{Caller, Scope};
use crate::dto::{amount, draws, entry_id, DrawBody, Page};
use crate::edge::{self, rfc3339, ApiQuery, Path};
use crate::error::{ApiError, ErrorBody};
use crate::ingest::{self, EventResult};
use crate::AppState;

/// The most events in one `POST /v1/events`.
pub const MAX_BATCH_EVENTS: usize = 10_000;

/// A batch as read: each event's own JSON text.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch<'a> {
    #[serde(borrow)]
    events: Vec<&'a serde_json::value::RawValue>,
}

/// The id of a rejected event, when it has one.
fn event_id(text: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Id {
        id: Option<serde_json::Value>,
    }
    serde_json::from_str::<Id>(text)
        .ok()
        .and_then(|i| i.id)
        .and_then(|v| v.as_str().map(str::to_owned))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventBatch {
    /// Up to 10,000 events: `{id, customer_id, feature, quantity, member_id?, timestamp?, properties?}`.
    /// Each is priced at its `timestamp` (default: when it arrived): by the price book version, the
    /// customer's contract and the customer's plan in force then.
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<serde_json::Value>,
}

#[derive(Serialize, ToSchema)]
pub struct EventResultBody {
    /// The event's id (null when the event had none).
    pub id: Option<String>,
    /// `charged`, `duplicate` (charged before: the original result) or `rejected`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance_after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drawn: Option<Vec<DrawBody>>,
    /// The part of the cost taken as debt under the customer's overage policy
    /// (present only when some was).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_debt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pricebook: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry_id: Option<String>,
    /// Why it was rejected: `{code, message, param?}` (`param`: the event's field it is about,
    /// where known). Rejected events are kept as dead letters.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub error: Option<serde_json::Value>,
}

/// The field of the event a rejection is about, where its code and message
/// tell (a rejection is kept, as a dead letter and as a retry's answer, with
/// only the two).
fn event_param(code: &str, message: &str) -> Option<String> {
    const FIELDS: [&str; 7] = [
        "id",
        "customer_id",
        "feature",
        "quantity",
        "member_id",
        "timestamp",
        "properties",
    ];
    let named = |text: &str| FIELDS.into_iter().find(|field| text == *field);
    let param = match code {
        "event_too_old" | "event_in_future" => Some("timestamp"),
        "idempotency_conflict" => Some("id"),
        "not_found" if message.starts_with("customer ") => Some("customer_id"),
        // A field the event has no use for is named as sent.
        "invalid_event" if message.contains("unknown field `") => {
            return message
                .split('`')
                .nth(1)
                .filter(|field| !field.is_empty())
                .map(str::to_owned);
        }
        // A field's own check names it first (`quantity must be ...`); serde
        // names it in backquotes (missing field `feature`).
        "invalid_event" => {
            let text = message
                .strip_prefix("the event is not valid: ")
                .unwrap_or(message);
            let first = text.split([' ', ':']).next().unwrap_or_default();
            named(first).or_else(|| {
                let quoted = text.split('`').nth(1)?;
                named(quoted)
            })
        }
        _ => crate::error::refusal_param(code, message),
    };
    param.map(str::to_owned)
}

pub fn render_result(id: Option<String>, result: &EventResult) -> EventResultBody {
    match result {
        EventResult::Charged(o) | EventResult::Duplicate(o) => EventResultBody {
            id: Some(o.id.to_string()),
            status: if matches!(result, EventResult::Charged(_)) {
                "charged"
            } else {
                "duplicate"
            },
            cost: Some(amount(o.cost)),
            balance_after: Some(amount(o.balance_after)),
            drawn: Some(draws(&o.drawn)),
            on_debt: o.on_debt.is_positive().then(|| amount(o.on_debt)),
            pricebook: o.pricebook.clone(),
            rule: Some(o.rule.clone()),
            entry_id: Some(entry_id(o.entry_id)),
            error: None,
        },
        EventResult::Rejected { code, message } => EventResultBody {
            id,
            status: "rejected",
            cost: None,
            balance_after: None,
            drawn: None,
            on_debt: None,
            pricebook: None,
            rule: None,
            entry_id: None,
            error: Some(match event_param(code, message) {
                Some(param) => {
                    serde_json::json!({ "code": code, "message": message, "param": param })
                }
                None => serde_json::json!({ "code": code, "message": message }),
            }),
        },
    }
}

#[derive(Serialize, ToSchema)]
pub struct EventBatchBody {
    /// One result per event, in request order.
    pub results: Vec<EventResultBody>,
}

/// Charge a batch of usage events: one result per event, in order. One bad
/// event never fails its neighbours, and no event is half applied.
#[utoipa::path(post, path = "/v1/events", tag = "events", request_body = EventBatch,
    responses((status = 200, body = EventBatchBody), (status = 400, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = ["ingest"])))]
pub async fn post_events(
    State(state): State<AppState>,
    caller: Caller,
    body: crate::edge::JsonBytes,
) -> Result<Json<EventBatchBody>, ApiError> {
    caller.require(Scope::Ingest)?;
    let bytes = body.bytes_as_sent()?;
    // On a task of its own: once an event is in the writer's queue it is
    // charged whether or not the client still waits, so a refused one must
    // still become a dead letter if the client goes away meanwhile.
    tokio::spawn(charge_batch(state, bytes, caller.actor()))
        .await
        .map_err(|_| ApiError::new("unavailable", "the batch's task failed"))?
}

async fn charge_batch(
    state: AppState,
    bytes: axum::body::Bytes,
    actor: Option<String>,
) -> Result<Json<EventBatchBody>, ApiError> {
    // Each event is kept as its own text and read once, by the ingest path.
    let body: RawBatch<'_> = crate::objects::from_slice_untracked(&bytes).map_err(|e| {
        let message = format!("the body is not a batch of events ({{\"events\": [...]}}): {e}");
        // The field at fault: the path where reading stopped, else the
        // field serde names (a missing or unknown one).
        let path = crate::objects::from_slice::<RawBatch<'_>>(&bytes)
            .err()
            .map(|e| e.path().to_string())
            .filter(|path| !path.is_empty() && path != "." && !path.contains('?'));
        // serde names a missing or unknown field in backquotes (and quotes
        // other things, such as the type it found, the same way).
        let text = e.to_string();
        let quoted = (text.starts_with("missing field") || text.starts_with("unknown field"))
            .then(|| text.split('`').nth(1).map(str::to_owned))
            .flatten();
        match path.or(quoted) {
            Some(param) => ApiError::invalid(&param, message),
            None => ApiError::new("invalid_request", message),
        }
    })?;
    if body.events.len() > MAX_BATCH_EVENTS {
        return Err(ApiError::invalid(
            "events",
            format!("at most {MAX_BATCH_EVENTS} events per batch"),
        ));
    }
    // Room for the whole batch, or nothing is applied.
    let _permit = state.admit(body.events.len())?;
    // Every event goes into the writer's queue in request order (each send
    // awaited before the next: the first of two with one id is the one
    // charged), and then all are awaited together, so a batch shares its
    // group commits.
    let mut sent = Vec::with_capacity(body.events.len());
    for event in &body.events {
        sent.push(ingest::send_text(&state, event.get(), "http", None, actor.clone()).await);
    }
    let results =
        futures_util::future::join_all(sent.into_iter().map(|sent| sent.finish(&state))).await;
    let mut rendered = Vec::with_capacity(results.len());
    for (raw, result) in body.events.iter().zip(results) {
        let id = match &result {
            Ok(EventResult::Rejected { .. }) => event_id(raw.get()),
            _ => None,
        };
        // The store is unavailable: the batch is answered 503. Events before
        // the failure may have been charged or dead-lettered durably; sending
        // the batch again is safe (they then answer `duplicate`).
        let result = result?;
        state.metrics.events("http", result.status());
        rendered.push(render_result(id, &result));
    }
    Ok(Json(EventBatchBody { results: rendered }))
}

// ---------------------------------------------------------------------------
// Google Pub/Sub push
// ---------------------------------------------------------------------------

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PubsubParams {
    /// Must equal the server's `--pubsub-token`.
    pub token: Option<String>,
}

#[derive(Deserialize, ToSchema)]
pub struct PubsubEnvelope {
    #[schema(value_type = Object)]
    pub message: PubsubMessage,
    pub subscription: Option<String>,
}

#[derive(Deserialize, ToSchema)]
pub struct PubsubMessage {
    /// The event as base64 JSON.
    pub data: Option<String>,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub attributes: std::collections::BTreeMap<String, String>,
    #[serde(rename = "messageId", alias = "message_id")]
    pub message_id: Option<String>,
}

/// Google Pub/Sub push: one event per message. Answers 2xx only once the
/// event is charged (or kept as a dead letter), so Pub/Sub redelivers on
/// anything else.
#[utoipa::path(post, path = "/v1/ingest/pubsub", tag = "events", params(PubsubParams), request_body = PubsubEnvelope,
    responses((status = 204), (status = 401, body = ErrorBody),
        (status = 404, description = "Pub/Sub push is not enabled on this server (no --pubsub-token)", body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn pubsub_push(
    State(state): State<AppState>,
    params: ApiQuery<PubsubParams>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let params = params.read()?;
    let Some(expected) = state.pubsub_token.as_deref() else {
        return Err(ApiError::new(
            "not_found",
            "Pub/Sub push is not enabled on this server (start it with --pubsub-token)",
        ));
    };
    let given = params.token.unwrap_or_default();
    if !crate::auth::constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        return Err(ApiError::new(
            "unauthorized",
            "the push token is missing or wrong",
        ));
    }
    let _permit = state.admit(1)?;
    use base64::Engine;
    let data = crate::objects::from_slice_untracked::<PubsubEnvelope>(&body)
        .ok()
        .and_then(|envelope| envelope.message.data)
        .and_then(|data| base64::engine::general_purpose::STANDARD.decode(data).ok());
    let result = match data {
        Some(bytes) => ingest::ingest_bytes(&state, &bytes, "pubsub").await?,
        // A malformed envelope would be redelivered forever: keep it and acknowledge.
        None => {
            let payload = String::from_utf8_lossy(&body).into_owned();
            ingest::ingest_invalid(
                &state,
                payload,
                "pubsub",
                "not a Pub/Sub push envelope with base64 data",
            )
            .await?
        }
    };
    state.metrics.events("pubsub", result.status());
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---------------------------------------------------------------------------
// Dead letters
// ---------------------------------------------------------------------------

#[derive(Serialize, ToSchema)]
pub struct DeadLetterBody {
    pub id: String,
    /// `http`, `kafka`, `nats`, `pubsub` or `replay`.
    pub source: String,
    pub event_id: Option<String>,
    pub customer_id: Option<String>,
    /// The event as received.
    pub payload: String,
    pub code: String,
    pub message: String,
    pub attempts: i64,
    pub first_seen: String,
    pub last_seen: String,
    /// `pending`, `replayed` or `discarded`.
    pub status: String,
    pub resolved_at: Option<String>,
    pub note: Option<String>,
}

pub fn render_dead_letter(d: &DeadLetterRecord) -> DeadLetterBody {
    DeadLetterBody {
        id: format!("dl_{}", d.id),
        source: d.source.clone(),
        event_id: d.event_id.clone(),
        customer_id: d.customer_id.clone(),
        payload: d.payload.clone(),
        code: d.code.clone(),
        message: d.message.clone(),
        attempts: d.attempts,
        first_seen: rfc3339(d.first_seen),
        last_seen: rfc3339(d.last_seen),
        status: d.status.as_str().to_owned(),
        resolved_at: d.resolved_at.map(rfc3339),
        note: d.note.clone(),
    }
}

/// Where a dead letter can come from (its `source`).
const DEAD_LETTER_SOURCES: [&str; 5] = ["http", "kafka", "nats", "pubsub", "replay"];

fn dead_letter_id(text: &str) -> Result<i64, ApiError> {
    text.strip_prefix("dl_")
        .and_then(|n| n.parse::<i64>().ok())
        .ok_or_else(|| ApiError::not_found(format!("dead letter {text}")))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterParams {
    /// `pending` (default), `replayed`, `discarded` or `all`.
    pub status: Option<String>,
    /// Only letters from this source: `http`, `kafka`, `nats`, `pubsub` or `replay`.
    pub source: Option<String>,
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    pub cursor: Option<String>,
}

/// Dead letters, oldest first.
#[utoipa::path(get, path = "/v1/dead-letters", tag = "events", params(DeadLetterParams),
    responses((status = 200, body = Page<DeadLetterBody>), (status = 400, body = ErrorBody)), security(("bearer" = ["read"])))]
pub async fn list_dead_letters(
    State(state): State<AppState>,
    caller: Caller,
    params: ApiQuery<DeadLetterParams>,
) -> Result<Json<Page<DeadLetterBody>>, ApiError> {
    caller.require(Scope::Read)?;
    let params = params.read()?;
    let status = match params.status.as_deref().unwrap_or("pending") {
        "all" => None,
        text => Some(DeadLetterStatus::parse(text).ok_or_else(|| {
            ApiError::invalid(
                "status",
                "status must be pending, replayed, discarded or all",
            )
        })?),
    };
    if let Some(source) = params.source.as_deref() {
        if !DEAD_LETTER_SOURCES.contains(&source) {
            return Err(ApiError::invalid(
                "source",
                "source must be http, kafka, nats, pubsub or replay",
            ));
        }
    }
    let limit = edge::limit(params.limit)?;
    let after = edge::cursor(params.cursor.as_deref(), "dl_")?.unwrap_or(0);
    let letters = state
        .store
        .dead_letters(status, params.source, after, limit + 1)
        .await?;
    let next = (letters.len() > limit).then(|| format!("dl_{}", letters[limit - 1].id));
    Ok(Json(Page {
        data: letters.iter().take(limit).map(render_dead_letter).collect(),
        next_cursor: next,
    }))
}

/// One dead letter.
#[utoipa::path(get, path = "/v1/dead-letters/{id}", tag = "events",
    responses((status = 200, body = DeadLetterBody), (status = 404, body = ErrorBody)), security(("bearer" = ["read"])))]
pub async fn get_dead_letter(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<DeadLetterBody>, ApiError> {
    caller.require(Scope::Read)?;
    let number = dead_letter_id(&id)?;
    let letter = state
        .store
        .dead_letter(number)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("dead letter {id}")))?;
    Ok(Json(render_dead_letter(&letter)))
}

#[derive(Serialize, ToSchema)]
pub struct ReplayBody {
    /// The dead letter after the replay (`replayed` when the event was charged).
    pub dead_letter: DeadLetterBody,
    /// What the event did this time.
    pub result: EventResultBody,
}

/// Send a dead letter's event through again (after fixing its cause: creating
/// the customer or feature, publishing a price, adding credits). An event
/// without a `timestamp` is charged as of when it first arrived.
#[utoipa::path(post, path = "/v1/dead-letters/{id}/replay", tag = "events",
    responses((status = 200, body = ReplayBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = ["write"])))]
pub async fn replay_dead_letter(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<ReplayBody>, ApiError> {
    caller.require(Scope::Write)?;
    let number = dead_letter_id(&id)?;
    let letter = state
        .store
        .dead_letter(number)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("dead letter {id}")))?;
    if letter.status == DeadLetterStatus::Discarded {
        return Err(ApiError::new(
            "dead_letter_resolved",
            format!("dead letter {id} was discarded"),
        ));
    }
    if letter.code == ingest::UNREADABLE {
        return Err(ApiError::new(
            "dead_letter_not_replayable",
            format!(
                "dead letter {id} holds no event to charge ({}); discard it, and send the event \
                 again if it can be had",
                letter.message
            ),
        ));
    }
    // An event without a timestamp is charged as of when it first arrived.
    // Refused again, its letter keeps the source it came from.
    let result = ingest::ingest_text_received(
        &state,
        &letter.payload,
        &letter.source,
        Some(letter.first_seen),
        caller.actor(),
    )
    .await?;
    state.metrics.events("replay", result.status());
    let event_id = letter.event_id.clone();
    if let EventResult::Charged(_) | EventResult::Duplicate(_) = &result {
        // A charge settles its dead letter in the same commit; an unreadable
        // payload has no event id to settle by, and a duplicate was charged before.
        let _ = state
            .store
            .execute(
                Command::ResolveDeadLetter {
                    dead_letter: number,
                    resolution: DeadLetterStatus::Replayed,
                    note: Some("replayed".into()),
                },
                caller.actor(),
            )
            .await
            .map_err(ApiError::from)?;
    }
    let after = state
        .store
        .dead_letter(number)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("dead letter {id}")))?;
    Ok(Json(ReplayBody {
        dead_letter: render_dead_letter(&after),
        result: render_result(event_id, &result),
    }))
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct DiscardBody {
    pub note: Option<String>,
}

/// Give up on a dead letter (it stays listed with `status=discarded`).
#[utoipa::path(post, path = "/v1/dead-letters/{id}/discard", tag = "events", request_body = DiscardBody,
    responses((status = 200, body = DeadLetterBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = ["write"])))]
pub async fn discard_dead_letter(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: crate::edge::JsonBytes,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let number = dead_letter_id(&id)?;
    let body: DiscardBody = super::spend::optional_body(body)?;
    let executed = state
        .execute(
            Command::ResolveDeadLetter {
                dead_letter: number,
                resolution: DeadLetterStatus::Discarded,
                note: edge::text(body.note, "note", 1024)?,
            },
            &caller,
        )
        .await?;
    Ok(crate::reply(executed, |outcome| match outcome {
        Outcome::DeadLetter(d) => Ok(render_dead_letter(d)),
        _ => Err(super::customers::unexpected()),
    }))
}
