//! Notifications: balance alerts, webhook endpoints and their delivery log,
//! and the customer's live stream of balance changes (server-sent events).

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::Response;
use axum::Json;
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use tally_store::{Alerts, Command, NewWebhookEndpoint, Outcome, NOTIFICATION_TYPES};
use utoipa::ToSchema;

use crate::auth::{Caller, Scope};
use crate::dto::amount;
use crate::edge::{self, AmountInput, ApiJson, ApiQuery, Path};
use crate::error::{ApiError, ErrorBody};
use crate::routes::customers::unexpected;
use crate::{reply, AppState};

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutAlerts {
    /// `balance.low` is sent each time the balance falls below one of these (at most 10).
    #[serde(default)]
    #[schema(value_type = Vec<AmountInput>)]
    pub low_balance: Vec<AmountInput>,
    /// `grant.expiring` is sent this many days (1–90) before a lot expires, once per lot.
    #[schema(minimum = 1, maximum = 90)]
    pub grant_expiring_days: Option<u32>,
}

#[derive(Serialize, ToSchema)]
pub struct AlertsBody {
    pub customer_id: String,
    pub low_balance: Vec<String>,
    pub grant_expiring_days: Option<u32>,
}

/// Set a customer's alert thresholds (replacing the ones before).
#[utoipa::path(put, path = "/v1/customers/{id}/alerts", tag = "notifications", request_body = PutAlerts,
    responses((status = 200, body = AlertsBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = ["write"])))]
pub async fn put_alerts(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
    body: ApiJson<PutAlerts>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Write)?;
    let body = body.read()?;
    if body.low_balance.len() > 10 {
        return Err(ApiError::invalid(
            "low_balance",
            "at most 10 low_balance thresholds",
        ));
    }
    if body.low_balance.iter().any(|t| t.0.is_negative()) {
        return Err(ApiError::invalid(
            "low_balance",
            "a low_balance threshold must not be negative",
        ));
    }
    if body.grant_expiring_days.is_some_and(|d| d == 0 || d > 90) {
        return Err(ApiError::invalid(
            "grant_expiring_days",
            "grant_expiring_days must be 1 to 90",
        ));
    }
    let mut low_balance: Vec<_> = body.low_balance.iter().map(|t| t.0).collect();
    low_balance.sort();
    low_balance.dedup();
    let command = Command::PutAlerts {
        customer_id: edge::id(&customer_id, "id")?,
        alerts: Alerts {
            low_balance,
            grant_expiring_days: body.grant_expiring_days,
        },
    };
    let executed = state.execute(command, &caller).await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::Alerts {
            customer_id,
            alerts,
        } => Ok(alerts_body(customer_id.as_str(), alerts)),
        _ => Err(unexpected()),
    }))
}

fn alerts_body(customer_id: &str, alerts: &Alerts) -> AlertsBody {
    AlertsBody {
        customer_id: customer_id.to_owned(),
        low_balance: alerts.low_balance.iter().copied().map(amount).collect(),
        grant_expiring_days: alerts.grant_expiring_days,
    }
}

/// A customer's alert settings: no thresholds and no expiry warning until
/// it sets some. (A `PUT` replaces them all: read them first to change one.)
#[utoipa::path(get, path = "/v1/customers/{id}/alerts", tag = "notifications",
    responses((status = 200, body = AlertsBody), (status = 404, body = ErrorBody)),
    security(("bearer" = ["read"])))]
pub async fn get_alerts(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
) -> Result<Json<AlertsBody>, ApiError> {
    caller.require(Scope::Read)?;
    let id = edge::id(&customer_id, "id")?;
    let alerts = state
        .store
        .alerts(id.clone())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("customer {id}")))?
        .unwrap_or_default();
    Ok(Json(alerts_body(id.as_str(), &alerts)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhookEndpoint {
    /// The endpoint's id (idempotency key).
    pub id: String,
    /// `http://` or `https://` URL that receives the POSTs.
    pub url: String,
    /// Notification types: `balance.low`, `balance.depleted`, `grant.expiring`,
    /// `grant.expired`, `hold.expired`, `subscription.renewed`, `topup.created`,
    /// `topup.succeeded`, `topup.failed`, or `*`.
    pub events: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct WebhookEndpointBody {
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    /// The signing secret: shown when the endpoint is created (and on a replay
    /// of that request), never in lists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    pub created_at: String,
    /// Until when the secret before the last rotation signs deliveries too
    /// (a second `v1` in `Tally-Signature`); null when none does.
    pub previous_secret_expires_at: Option<String>,
}

/// An endpoint as the API shows it; its rotated-out secret's expiry only
/// while that is ahead of `now` (it no longer signs after).
fn endpoint_body(
    e: &tally_store::WebhookEndpointRecord,
    secret: bool,
    now: tally_core::Timestamp,
) -> WebhookEndpointBody {
    WebhookEndpointBody {
        id: e.id.to_string(),
        url: e.url.clone(),
        events: e.events.clone(),
        secret: secret.then(|| e.secret.clone()),
        created_at: edge::rfc3339(e.created_at),
        previous_secret_expires_at: e
            .previous_secret_expires_at
            .filter(|until| *until > now)
            .map(edge::rfc3339),
    }
}

/// The longest a rotated-out secret may keep signing: a week.
const MAX_PREVIOUS_VALID_SECONDS: u32 = 7 * 24 * 3600;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateWebhookSecret {
    /// The rotation's id (idempotency key): a retry with it gets the same
    /// new secret back, and rotates nothing again.
    pub id: String,
    /// How long the secret in use until now keeps signing deliveries beside
    /// the new one, in seconds of the engine's clock: 0 to 604800 (a week),
    /// 86400 when left out. 0 stops it at once.
    #[schema(minimum = 0, maximum = 604800)]
    pub previous_valid_seconds: Option<i64>,
}

/// Give an endpoint a new signing secret, shown only in this answer (and in
/// a replay of this same request). While the previous one is still valid,
/// every delivery's `Tally-Signature` carries two `v1` signatures, one under
/// each secret (`t=<t>,v1=<new>,v1=<previous>`): a receiver that accepts any
/// `v1` it can verify switches secrets without refusing a delivery. A secret
/// rotated out by an earlier rotation and still valid stops at once.
#[utoipa::path(post, path = "/v1/webhook-endpoints/{id}/rotate-secret", tag = "notifications",
    request_body = RotateWebhookSecret,
    responses((status = 200, body = WebhookEndpointBody), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = ["admin"])))]
pub async fn rotate_webhook_secret(
    State(state): State<AppState>,
    caller: Caller,
    Path(endpoint_id): Path<String>,
    body: ApiJson<RotateWebhookSecret>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let body = body.read()?;
    let previous_valid_seconds = body
        .previous_valid_seconds
        .map_or(Ok(24 * 3600), u32::try_from)
        .ok()
        .filter(|v| *v <= MAX_PREVIOUS_VALID_SECONDS)
        .ok_or_else(|| {
            ApiError::invalid(
                "previous_valid_seconds",
                format!("previous_valid_seconds must be from 0 to {MAX_PREVIOUS_VALID_SECONDS}"),
            )
        })?;
    let command = Command::RotateWebhookSecret {
        id: edge::id(&body.id, "id")?,
        endpoint_id: edge::id(&endpoint_id, "id")?,
        secret: new_secret(),
        previous_valid_seconds,
    };
    let executed = state.execute(command, &caller).await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::WebhookEndpoint(e) => Ok(endpoint_body(e, true, state.store.now())),
        _ => Err(unexpected()),
    }))
}

/// A new signing secret: `whsec_` and 32 random bytes' worth of key.
fn new_secret() -> String {
    format!("whsec_{}", &crate::auth::generate_key()[3..])
}

/// Register a webhook endpoint. Deliveries are POSTs with the headers
/// `Tally-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`
/// and `Tally-Delivery-Id` (stable across retries), retried with backoff
/// until a 2xx answer (20 attempts at most, about 8 hours).
#[utoipa::path(post, path = "/v1/webhook-endpoints", tag = "notifications", request_body = CreateWebhookEndpoint,
    responses((status = 200, body = WebhookEndpointBody), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = ["admin"])))]
pub async fn create_webhook_endpoint(
    State(state): State<AppState>,
    caller: Caller,
    body: ApiJson<CreateWebhookEndpoint>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let body = body.read()?;
    let url = endpoint_url(&body.url)?;
    let events = endpoint_events(body.events)?;
    let command = Command::CreateWebhookEndpoint(NewWebhookEndpoint {
        id: edge::id(&body.id, "id")?,
        url,
        events,
        secret: new_secret(),
    });
    let executed = state.execute(command, &caller).await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::WebhookEndpoint(e) => Ok(endpoint_body(e, true, state.store.now())),
        _ => Err(unexpected()),
    }))
}

/// An endpoint's URL, or a 400 naming `url`.
fn endpoint_url(text: &str) -> Result<String, ApiError> {
    // As browsers and most servers take: every delivery row repeats it.
    const MAX_URL: usize = 2048;
    if text.len() > MAX_URL {
        return Err(ApiError::invalid(
            "url",
            format!("url must be at most {MAX_URL} characters"),
        ));
    }
    // As written, not as a URL parser repairs it (`http:x`, `https:\\host`
    // and `http:///x` all parse to some `http://x/`).
    let lower = text.get(..8).unwrap_or(text).to_ascii_lowercase();
    let written = (lower.starts_with("http://") || lower.starts_with("https://"))
        && !text.contains('\\')
        && !text.contains(char::is_whitespace)
        && !text[text.find("//").map_or(0, |at| at + 2)..].starts_with('/');
    reqwest::Url::parse(text)
        .ok()
        .filter(|u| {
            written
                && matches!(u.scheme(), "http" | "https")
                && u.host().is_some()
                && u.port() != Some(0)
        })
        .map(|u| u.to_string())
        .ok_or_else(|| {
            ApiError::invalid(
                "url",
                "url must be an absolute http:// or https:// URL with a host (and a port from 1)",
            )
        })
}

/// An endpoint's notification types, sorted and without repeats, or a 400
/// naming `events`.
fn endpoint_events(mut events: Vec<String>) -> Result<Vec<String>, ApiError> {
    if events.is_empty()
        || events
            .iter()
            .any(|e| e != "*" && !NOTIFICATION_TYPES.contains(&e.as_str()))
    {
        return Err(ApiError::invalid(
            "events",
            format!(
                "events must be a non-empty list of {} or *",
                NOTIFICATION_TYPES.join(", ")
            ),
        ));
    }
    events.sort();
    events.dedup();
    Ok(events)
}

/// One webhook endpoint (without its secret).
#[utoipa::path(get, path = "/v1/webhook-endpoints/{id}", tag = "notifications",
    responses((status = 200, body = WebhookEndpointBody), (status = 404, body = ErrorBody)),
    security(("bearer" = ["admin"])))]
pub async fn get_webhook_endpoint(
    State(state): State<AppState>,
    caller: Caller,
    Path(endpoint_id): Path<String>,
) -> Result<Json<WebhookEndpointBody>, ApiError> {
    caller.require(Scope::Admin)?;
    let id = edge::id(&endpoint_id, "id")?;
    let endpoints = state.store.webhook_endpoints().await?;
    endpoints
        .iter()
        .find(|e| e.id == id)
        .map(|e| Json(endpoint_body(e, false, state.store.now())))
        .ok_or_else(|| ApiError::not_found(format!("webhook endpoint {id}")))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateWebhookEndpoint {
    /// A new URL; its pending deliveries go there. Not null.
    #[serde(default, deserialize_with = "crate::edge::present")]
    #[schema(value_type = Option<String>)]
    pub url: Option<Option<String>>,
    /// New notification types (as when created), for notifications made
    /// from now on. Not null.
    #[serde(default, deserialize_with = "crate::edge::present")]
    #[schema(value_type = Option<Vec<String>>)]
    pub events: Option<Option<Vec<String>>>,
}

/// Change an endpoint's URL or notification types; what is left out is kept.
#[utoipa::path(patch, path = "/v1/webhook-endpoints/{id}", tag = "notifications",
    request_body = UpdateWebhookEndpoint,
    responses((status = 200, body = WebhookEndpointBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = ["admin"])))]
pub async fn update_webhook_endpoint(
    State(state): State<AppState>,
    caller: Caller,
    Path(endpoint_id): Path<String>,
    body: ApiJson<UpdateWebhookEndpoint>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let body = body.read()?;
    let command = Command::UpdateWebhookEndpoint {
        id: edge::id(&endpoint_id, "id")?,
        url: edge::not_null(body.url, "url")?
            .as_deref()
            .map(endpoint_url)
            .transpose()?,
        events: edge::not_null(body.events, "events")?
            .map(endpoint_events)
            .transpose()?,
    };
    let executed = state.execute(command, &caller).await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::WebhookEndpoint(e) => Ok(endpoint_body(e, false, state.store.now())),
        _ => Err(unexpected()),
    }))
}

/// Delete an endpoint: no notification goes to it any more, and its pending
/// deliveries are given up. Its id stays taken, and its delivery log is no
/// longer listed.
#[utoipa::path(delete, path = "/v1/webhook-endpoints/{id}", tag = "notifications",
    responses((status = 200, body = WebhookEndpointBody), (status = 404, body = ErrorBody)),
    security(("bearer" = ["admin"])))]
pub async fn delete_webhook_endpoint(
    State(state): State<AppState>,
    caller: Caller,
    Path(endpoint_id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let command = Command::DeleteWebhookEndpoint {
        id: edge::id(&endpoint_id, "id")?,
    };
    let executed = state.execute(command, &caller).await?;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::WebhookEndpoint(e) => Ok(endpoint_body(e, false, state.store.now())),
        _ => Err(unexpected()),
    }))
}

#[derive(Serialize, ToSchema)]
pub struct WebhookEndpointList {
    pub data: Vec<WebhookEndpointBody>,
    pub next_cursor: Option<String>,
}

/// The webhook endpoints (without their secrets).
#[utoipa::path(get, path = "/v1/webhook-endpoints", tag = "notifications", params(edge::ListParams),
    responses((status = 200, body = WebhookEndpointList)), security(("bearer" = ["admin"])))]
pub async fn list_webhook_endpoints(
    State(state): State<AppState>,
    caller: Caller,
    params: edge::ApiQuery<edge::ListParams>,
) -> Result<Json<WebhookEndpointList>, ApiError> {
    caller.require(Scope::Admin)?;
    let params = params.read()?;
    let endpoints = state.store.webhook_endpoints().await?;
    let (data, next_cursor) = edge::page(
        endpoints
            .iter()
            .map(|e| endpoint_body(e, false, state.store.now()))
            .collect(),
        |e| &e.id,
        &params,
    )?;
    Ok(Json(WebhookEndpointList { data, next_cursor }))
}

#[derive(Serialize, ToSchema)]
pub struct DeliveryBody {
    /// Stable across retries: the `Tally-Delivery-Id` header.
    pub id: String,
    /// The notification's id (`evt_<n>`), the body's `id`.
    pub event_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub customer_id: Option<String>,
    /// `pending`, `delivered` or `failed` (gave up after 20 attempts).
    pub status: String,
    pub attempts: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<String>,
    pub delivered_at: Option<String>,
    pub created_at: String,
}

#[derive(Serialize, ToSchema)]
pub struct DeliveryList {
    pub data: Vec<DeliveryBody>,
    pub next_cursor: Option<String>,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeliveryParams {
    /// 1 to 1000, default 50.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// An endpoint's delivery log, newest first, a page at a time.
#[utoipa::path(get, path = "/v1/webhook-endpoints/{id}/deliveries", tag = "notifications",
    params(DeliveryParams),
    responses((status = 200, body = DeliveryList), (status = 404, body = ErrorBody)), security(("bearer" = ["admin"])))]
pub async fn list_deliveries(
    State(state): State<AppState>,
    caller: Caller,
    Path(endpoint_id): Path<String>,
    params: ApiQuery<DeliveryParams>,
) -> Result<Json<DeliveryList>, ApiError> {
    caller.require(Scope::Admin)?;
    let params = params.read()?;
    let limit = edge::limit(params.limit)?;
    let id = edge::id(&endpoint_id, "id")?;
    let endpoints = state.store.webhook_endpoints().await?;
    if !endpoints.iter().any(|e| e.id == id) {
        return Err(ApiError::not_found(format!("webhook endpoint {id}")));
    }
    let before = edge::cursor(params.cursor.as_deref(), "evt_")?.unwrap_or(i64::MAX);
    let mut deliveries = state
        .store
        .deliveries(id.to_string(), before, limit as i64 + 1)
        .await?;
    let more = deliveries.len() > limit;
    deliveries.truncate(limit);
    let next_cursor = more
        .then(|| deliveries.last().map(|d| format!("evt_{}", d.notification)))
        .flatten();
    Ok(Json(DeliveryList {
        data: deliveries
            .into_iter()
            .map(|d| DeliveryBody {
                id: d.id,
                event_id: format!("evt_{}", d.notification),
                kind: d.kind,
                customer_id: d.customer_id,
                status: d.status,
                attempts: d.attempts,
                last_status: d.last_status,
                last_error: d.last_error,
                next_attempt_at: d.next_attempt_at.map(edge::rfc3339),
                delivered_at: d.delivered_at.map(edge::rfc3339),
                created_at: edge::rfc3339(d.created_at),
            })
            .collect(),
        next_cursor,
    }))
}

#[derive(Serialize, ToSchema)]
pub struct BalanceChangeBody {
    pub entry_id: String,
    pub kind: String,
    pub amount: String,
    pub balance_after: String,
    pub recorded_at: String,
}

/// How often a live stream checks that its key is still valid.
const KEY_RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// Returns once the key of `headers` is refused (revoked: at most
/// [`KEY_RECHECK`] after its revocation over HTTP, which reaches the writer's
/// server where every stream runs and clears its key cache; the cache's 10 s
/// more after `tally keys revoke`), or no longer has the read scope. A store
/// that cannot answer for now ends nothing.
async fn key_revoked(state: AppState, headers: axum::http::HeaderMap) {
    loop {
        tokio::time::sleep(KEY_RECHECK).await;
        match crate::auth::authenticate(&headers, &state).await {
            Ok(caller) if caller.scope.allows(Scope::Read) => {}
            Ok(_) => return,
            Err(error) if error.status == axum::http::StatusCode::UNAUTHORIZED => return,
            Err(_) => {}
        }
    }
}

/// The customer's balance changes as they happen (server-sent events).
///
/// The first event, `balance`, is the balance now (with `last_entry_id`,
/// the last entry it includes, also its event id); then one
/// `balance.changed` per journal entry once it is durable, with the entry
/// id as the event id. A client too slow to keep up gets `lagged` and
/// should read the balance again. A client that reconnects with
/// `Last-Event-ID` (as a browser's `EventSource` does) gets the changes it
/// missed, oldest first, instead of `balance`, then the live ones; when it
/// missed more than 1,000 (or the id is not one of this customer's
/// entries) it gets `balance` as on a first connection.
#[utoipa::path(get, path = "/v1/customers/{id}/stream", tag = "notifications",
    responses((status = 200, description = "server-sent events, one per change of the customer's balance",
        content_type = "text/event-stream", body = String), (status = 404, body = ErrorBody)),
    security(("bearer" = ["read"])))]
pub async fn stream(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
    headers: axum::http::HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    caller.require(Scope::Read)?;
    let id = edge::id(&customer_id, "id")?;
    // `ent_<n>`: the last change a reconnecting client saw.
    let resume_after = headers
        .get("last-event-id")
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.trim().strip_prefix("ent_"))
        .and_then(|n| n.parse::<i64>().ok())
        .filter(|n| *n > 0);
    // Subscribe before reading the balance, so no change falls in between.
    // The writer queues changes only while someone listens: a round trip
    // through it makes sure a group that was open before this subscription
    // has committed, so what it changed shows in the balance read below.
    let receiver = state.store.subscribe_changes();
    state
        .store
        .execute(
            tally_store::Command::ApplyDue {
                customer_id: id.clone(),
            },
            None,
        )
        .await?;
    let view = state
        .store
        .balance(id.clone())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("customer {id}")))?;
    // The changes a reconnecting client missed, oldest first, when they are
    // few enough to send; else the balance, as on a first connection.
    let missed = match (resume_after, view.last_entry) {
        (Some(after), Some(last)) if after <= last => {
            missed_changes(&state, &id, after, last).await?
        }
        _ => None,
    };
    let first = Event::default().event("balance").data(
        serde_json::json!({
            "customer_id": id.to_string(),
            "available": amount(view.balance.available),
            "held": amount(view.balance.held),
            "pending": amount(view.balance.pending),
            "debt": amount(view.balance.debt),
            "as_of": edge::rfc3339(view.now),
            "last_entry_id": view.last_entry.map(|e| format!("ent_{e}")),
        })
        .to_string(),
    );
    let first = match view.last_entry {
        Some(last) => first.id(crate::dto::entry_id(last)),
        None => first,
    };
    let opening: Vec<Event> = match missed {
        Some(missed) => missed,
        None => vec![first],
    };
    // Changes this balance already includes are not sent again.
    let seen = view.last_entry.unwrap_or(0);
    let changes = futures_util::stream::unfold(receiver, move |mut receiver| {
        let id = id.clone();
        async move {
            loop {
                match receiver.recv().await {
                    Ok(change) if change.customer_id == id && change.entry_id > seen => {
                        let event = change_event(BalanceChangeBody {
                            entry_id: crate::dto::entry_id(change.entry_id),
                            kind: change.kind.as_str().to_string(),
                            amount: amount(change.amount),
                            balance_after: amount(change.balance_after),
                            recorded_at: edge::rfc3339(change.recorded_at),
                        });
                        return Some((Ok(event), receiver));
                    }
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        let event = Event::default().event("lagged").data(missed.to_string());
                        return Some((Ok(event), receiver));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    let mut shutdown = state.shutdown.subscribe();
    let stream = futures_util::StreamExt::chain(
        futures_util::stream::iter(opening.into_iter().map(Ok)),
        changes,
    );
    // The stream ends when the server shuts down, or when its key no longer
    // authenticates (revoked) or no longer reads.
    let revoked = key_revoked(state.clone(), headers);
    let stream = futures_util::StreamExt::take_until(stream, async move {
        tokio::select! {
            _ = shutdown.wait_for(|stopping| *stopping) => {}
            () = revoked => {}
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// At most this many missed changes are sent to a reconnecting client.
const MAX_MISSED_CHANGES: usize = 1_000;

fn change_event(body: BalanceChangeBody) -> Event {
    Event::default()
        .event("balance.changed")
        .id(body.entry_id.clone())
        .data(serde_json::to_string(&body).expect("serializes"))
}

/// The customer's entries after `after` up to `last`, oldest first, as the
/// changes the stream sent for them; `None` when there are more than
/// [`MAX_MISSED_CHANGES`] or `after` is not one of the customer's entries
/// (a client of another database, or one that made its id up).
async fn missed_changes(
    state: &AppState,
    customer_id: &tally_core::Id,
    after: i64,
    last: i64,
) -> Result<Option<Vec<Event>>, ApiError> {
    if after == last {
        return Ok(Some(Vec::new()));
    }
    let page = state
        .store
        .ledger(
            customer_id.clone(),
            tally_store::LedgerQuery {
                start: Some(last),
                limit: MAX_MISSED_CHANGES + 1,
                ..tally_store::LedgerQuery::default()
            },
        )
        .await?;
    let Some(page) = page else {
        return Ok(None);
    };
    // Newest first: the walk must reach `after` itself (a page of more than
    // the limit's worth of later entries does not, and says so).
    let Some(reached) = page.entries.iter().position(|e| e.sequence <= after) else {
        return Ok(None);
    };
    if page.entries[reached].sequence != after {
        return Ok(None);
    }
    Ok(Some(
        page.entries[..reached]
            .iter()
            .rev()
            .map(|record| {
                change_event(BalanceChangeBody {
                    entry_id: crate::dto::entry_id(record.sequence),
                    kind: record.draft.kind.as_str().to_string(),
                    amount: amount(record.draft.amount),
                    balance_after: amount(record.draft.balance_after),
                    recorded_at: edge::rfc3339(record.recorded_at),
                })
            })
            .collect(),
    ))
}
