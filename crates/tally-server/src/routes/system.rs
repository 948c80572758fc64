//! Health, metrics, the engine clock and API keys.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use tally_core::{Id, Timestamp};
use tally_store::{Command, Outcome};
use utoipa::ToSchema;

use crate::auth::{generate_key, hash_key, Caller, Scope};
use crate::edge::{self, ApiJson};
use crate::error::{ApiError, ErrorBody};
use crate::{reply, AppState};

#[derive(Serialize, ToSchema)]
pub struct Health {
    pub status: String,
    /// Whether this server runs the writer. Always true for the embedded
    /// store; over a shared PostgreSQL database, true on the one server
    /// holding the leader lock (the others forward writes to it).
    pub writer: bool,
}

/// Liveness.
#[utoipa::path(get, path = "/healthz", tag = "system", responses((status = 200, body = Health)))]
pub async fn healthz(State(state): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        writer: state.store.is_leader(),
    })
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "system", responses((status = 200, description = "Prometheus text format")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    state.metrics.write_failures(state.store.write_failures());
    let text = state.metrics.render();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[derive(Serialize, ToSchema)]
pub struct ClockBody {
    pub now: String,
    /// Whether the clock only moves through `POST /v1/clock/advance`.
    pub manual: bool,
}

/// The engine's time.
#[utoipa::path(get, path = "/v1/clock", tag = "system", responses((status = 200, body = ClockBody)), security(("bearer" = ["read"])))]
pub async fn clock(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<ClockBody>, ApiError> {
    caller.require(Scope::Read)?;
    Ok(Json(ClockBody {
        now: edge::rfc3339(state.store.now()),
        manual: state.manual_clock.is_some(),
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdvanceClock {
    /// Move forward this many seconds.
    pub seconds: Option<i64>,
    /// Or move to this instant (RFC 3339); never backwards.
    pub to: Option<String>,
}

/// The most renewals of one subscription a step of the manual clock may
/// cross (`POST /v1/clock/advance`): over two and a half years of a daily plan.
pub const MAX_RENEWALS_PER_ADVANCE: i64 = 1_000;

/// The furthest the manual clock goes, 9000-01-01T00:00:00Z: every instant
/// the engine computes from it (a hold's timeout, a period's end, a top-up's
/// payment deadline) is then still a date the API can write.
const MAX_MANUAL_CLOCK: tally_core::Timestamp = tally_core::Timestamp(221_845_392_000 * 1_000_000);

/// Move the manual clock forward and apply everything that fell due.
///
/// A step renews any one subscription at most 1,000 times: a longer step is
/// refused (400, naming the subscription and the instant to stop before).
#[utoipa::path(post, path = "/v1/clock/advance", tag = "system", request_body = AdvanceClock,
    responses((status = 200, body = ClockBody), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = ["admin"])))]
pub async fn advance_clock(
    State(state): State<AppState>,
    caller: Caller,
    body: ApiJson<AdvanceClock>,
) -> Result<Json<ClockBody>, ApiError> {
    caller.require(Scope::Admin)?;
    let body = body.read()?;
    let Some(clock) = state.manual_clock.clone() else {
        return Err(ApiError::new(
            "manual_clock_disabled",
            "the clock can only be advanced when tally serve runs with --manual-clock",
        ));
    };
    let _step = state.clock_steps.lock().await;
    let now = state.store.now();
    let (target, param) = match (body.seconds, body.to) {
        (Some(seconds), None) if seconds >= 0 => (
            now.plus_seconds(seconds)
                .filter(|target| *target <= MAX_MANUAL_CLOCK)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "seconds",
                        "seconds is too large: the clock cannot pass 9000-01-01T00:00:00Z",
                    )
                })?,
            "seconds",
        ),
        (Some(_), None) => {
            return Err(ApiError::invalid("seconds", "seconds must not be negative"))
        }
        (None, Some(to)) => {
            let to = edge::instant(&to, "to")?;
            if to < now {
                return Err(ApiError::invalid("to", "the clock never moves backwards"));
            }
            if to > MAX_MANUAL_CLOCK {
                return Err(ApiError::invalid(
                    "to",
                    "the clock cannot pass 9000-01-01T00:00:00Z",
                ));
            }
            (to, "to")
        }
        _ => {
            return Err(ApiError::invalid(
                "seconds",
                "give exactly one of seconds and to",
            ))
        }
    };
    // Every renewal a step crosses is applied in the writer, one customer's
    // at a time: a daily plan moved to year 9999 made one catch-up of
    // millions of periods, holding every write behind it. Like Stripe's test
    // clocks, a step is bounded.
    if let Some((subscription, at)) = state
        .store
        .renewing_more_than(MAX_RENEWALS_PER_ADVANCE, target)
        .await?
    {
        return Err(ApiError::invalid(
            param,
            format!(
                "the clock moves at most {MAX_RENEWALS_PER_ADVANCE} renewals of any subscription in one step: \
                 subscription {} (plan {}) would renew more often; advance to before {} first, then again",
                subscription.id,
                subscription.plan,
                edge::rfc3339(at)
            ),
        ));
    }
    let now: Timestamp = clock.advance_to(target);
    state.run_due().await?;
    Ok(Json(ClockBody {
        now: edge::rfc3339(now),
        manual: true,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    /// The key's id (idempotency key).
    pub id: String,
    /// `admin`, `write`, `ingest` or `read`.
    pub scope: String,
}

#[derive(Serialize, ToSchema)]
pub struct ApiKeyBody {
    pub id: String,
    pub scope: String,
    /// The key itself: shown only in the first response (null when a retry
    /// replays it), stored only as a hash.
    pub key: Option<String>,
}

/// Create an API key (admin).
#[utoipa::path(post, path = "/v1/api-keys", tag = "system", request_body = CreateApiKey,
    responses((status = 200, body = ApiKeyBody), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, description = "idempotency_conflict: the key id is taken with another scope", body = ErrorBody)),
    security(("bearer" = ["admin"])))]
pub async fn create_api_key(
    State(state): State<AppState>,
    caller: Caller,
    body: ApiJson<CreateApiKey>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let body = body.read()?;
    let id: Id = edge::id(&body.id, "id")?;
    if id.as_str() == crate::auth::BOOTSTRAP_ADMIN {
        return Err(ApiError::invalid(
            "id",
            format!(
                "id {id} names TALLY_ADMIN_KEY in the audit trail (actor key:{id}); choose another id"
            ),
        ));
    }
    let scope = Scope::parse(&body.scope)
        .ok_or_else(|| ApiError::invalid("scope", "scope must be admin, write, ingest or read"))?;
    let key = generate_key();
    let command = Command::CreateApiKey {
        id,
        key_hash: hash_key(&key),
        scope: scope.as_str().to_string(),
    };
    let executed = state.execute(command, &caller).await?;
    // A replay must not show the key generated for this retry: it was never stored.
    let replayed = executed.replayed;
    Ok(reply(executed, |outcome| match outcome {
        Outcome::ApiKey { id, scope } => Ok(ApiKeyBody {
            id: id.to_string(),
            scope: scope.clone(),
            key: (!replayed).then(|| key.clone()),
        }),
        _ => Err(super::customers::unexpected()),
    }))
}

#[derive(Serialize, ToSchema)]
pub struct ApiKeyInfoBody {
    pub id: String,
    pub scope: String,
    pub created_at: String,
    /// When it was revoked; null while it is valid.
    pub revoked_at: Option<String>,
}

impl From<&tally_store::ApiKeyInfo> for ApiKeyInfoBody {
    fn from(key: &tally_store::ApiKeyInfo) -> Self {
        ApiKeyInfoBody {
            id: key.id.clone(),
            scope: key.scope.clone(),
            created_at: edge::rfc3339(key.created_at),
            revoked_at: key.revoked_at.map(edge::rfc3339),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct ApiKeyList {
    pub data: Vec<ApiKeyInfoBody>,
    pub next_cursor: Option<String>,
}

/// The API keys, oldest first, a page at a time: id, scope and when it was
/// created and revoked (never the key itself, which is stored only as a
/// hash). Admin.
#[utoipa::path(get, path = "/v1/api-keys", tag = "system", params(edge::ListParams),
    responses((status = 200, body = ApiKeyList), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = ["admin"])))]
pub async fn list_api_keys(
    State(state): State<AppState>,
    caller: Caller,
    params: edge::ApiQuery<edge::ListParams>,
) -> Result<Json<ApiKeyList>, ApiError> {
    caller.require(Scope::Admin)?;
    let params = params.read()?;
    let keys = state.store.api_keys().await?;
    let (data, next_cursor) = edge::page(
        keys.iter().map(ApiKeyInfoBody::from).collect(),
        |k| &k.id,
        &params,
    )?;
    Ok(Json(ApiKeyList { data, next_cursor }))
}

/// Revoke an API key: it authenticates nothing from then on (on this
/// server at once; on the others of a PostgreSQL deployment within 10 s,
/// as they cache keys they looked up that long). Revoking it again answers
/// the same. Admin. The bootstrap admin key (`TALLY_ADMIN_KEY`) is not
/// stored and cannot be revoked: change the variable and restart.
#[utoipa::path(delete, path = "/v1/api-keys/{id}", tag = "system",
    responses((status = 200, body = ApiKeyInfoBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = ["admin"])))]
pub async fn revoke_api_key(
    State(state): State<AppState>,
    caller: Caller,
    edge::Path(id): edge::Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    let command = Command::RevokeApiKey {
        id: edge::id(&id, "id")?,
    };
    let executed = state.execute(command, &caller).await?;
    state.key_cache.clear();
    Ok(reply(executed, |outcome| match outcome {
        Outcome::ApiKeyInfo(key) => Ok(ApiKeyInfoBody::from(key)),
        _ => Err(super::customers::unexpected()),
    }))
}
