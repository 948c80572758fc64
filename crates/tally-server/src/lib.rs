//! Tally's HTTP API: routes, authentication, OpenAPI and metrics.
//!
//! Architecture invariant: handlers only parse and check input, call the
//! store, and render the answer; no business rule lives here (those are in
//! `tally-core`), and no SQL (that is in `tally-store`). Every error leaves
//! through the one table in [`error`].

pub mod auth;
pub mod dto;
pub mod edge;
pub mod error;
pub mod forward;
pub mod ingest;
pub mod metrics;
pub mod objects;
pub mod openapi;
pub mod routes;
pub mod serve;
pub mod streams;
pub mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Serialize;
use tally_store::{Command, Executed, ManualClock, Outcome, Store};

use crate::auth::{hash_key, Caller, KeyCache};
use crate::error::ApiError;

/// How often the engine applies hold timeouts and grant expiries on its own.
pub const TICK_INTERVAL: Duration = Duration::from_millis(500);

/// Everything a handler can reach: one shared [`Shared`]. The state is
/// cloned for every request (by the router, the middleware and the
/// extractors), so a clone is one reference count, not one per field.
#[derive(Clone)]
pub struct AppState {
    shared: Arc<Shared>,
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.shared
    }
}

/// What [`AppState`] shares.
pub struct Shared {
    pub store: Store,
    pub admin_key_hash: Option<String>,
    pub manual_clock: Option<Arc<ManualClock>>,
    pub key_cache: KeyCache,
    pub metrics: metrics::Metrics,
    /// The token Google Pub/Sub push must present (`--pubsub-token`); push is off without it.
    pub pubsub_token: Option<String>,
    /// Writes accepted over HTTP and not yet answered, at most: beyond it a
    /// request is answered 503 `overloaded` with `Retry-After`, having changed
    /// nothing (stream consumers are not limited here: they wait instead).
    pub in_flight: Arc<tokio::sync::Semaphore>,
    /// The bound of `in_flight`.
    pub max_in_flight: usize,
    /// Set when the server shuts down: open live streams end, so a graceful
    /// shutdown does not wait for clients that never leave.
    pub shutdown: Arc<tokio::sync::watch::Sender<bool>>,
    /// Sends writes to the server that runs the writer (several servers over
    /// one PostgreSQL database; see [`forward`]).
    pub forwarder: reqwest::Client,
    /// Where that server listens, as last read from the database.
    pub leader_url: std::sync::RwLock<Option<String>>,
    /// When a forward waiting on a silent leader last read the leader from
    /// the database (`forward::latest_leader`).
    pub leader_read_at: std::sync::Mutex<Option<std::time::Instant>>,
    /// Held by a step of the manual clock from reading the clock to having
    /// applied what fell due: concurrent steps of `seconds` add up instead
    /// of each moving from the same instant.
    pub clock_steps: tokio::sync::Mutex<()>,
}

/// Default bound of [`AppState::in_flight`]: the writer's queue.
pub const MAX_IN_FLIGHT: usize = 65_536;

impl AppState {
    pub fn new(
        store: Store,
        admin_key: Option<&str>,
        manual_clock: Option<Arc<ManualClock>>,
    ) -> AppState {
        let shared = Shared {
            store,
            admin_key_hash: admin_key.filter(|k| !k.is_empty()).map(hash_key),
            manual_clock,
            key_cache: KeyCache::default(),
            metrics: metrics::Metrics::default(),
            pubsub_token: None,
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
            max_in_flight: MAX_IN_FLIGHT,
            shutdown: Arc::new(tokio::sync::watch::channel(false).0),
            // A leader that vanished without a reset (a partition, a host
            // gone) fails a forwarded request after 30 s of its data going
            // unacknowledged, instead of after Linux's 15 minutes of
            // retransmissions, and a pooled connection to it is closed
            // likewise once keepalive probes (after 10 s idle, every 5 s)
            // go unanswered for 30 s. A slow or quiet leader that is there
            // acknowledges all the same: a live stream is not cut.
            forwarder: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .tcp_keepalive(Duration::from_secs(10))
                .tcp_keepalive_interval(Duration::from_secs(5))
                .tcp_user_timeout(Duration::from_secs(30))
                .build()
                .expect("an HTTP client with default settings"),
            leader_url: std::sync::RwLock::default(),
            leader_read_at: std::sync::Mutex::default(),
            clock_steps: tokio::sync::Mutex::new(()),
        };
        AppState {
            shared: Arc::new(shared),
        }
    }

    /// Change the settings before the state is first cloned (at start-up).
    pub fn configure(&mut self) -> &mut Shared {
        Arc::get_mut(&mut self.shared).expect("the state is configured before it is shared")
    }

    /// Reserve room for `writes` writes, or answer 503 `overloaded`.
    pub fn admit(&self, writes: usize) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        if writes > self.max_in_flight {
            // It could never be admitted: retrying would not help.
            return Err(ApiError::invalid(
                "events",
                format!(
                    "this server takes at most {} writes at once (--max-in-flight); send smaller batches",
                    self.max_in_flight
                ),
            ));
        }
        let writes = u32::try_from(writes.max(1)).unwrap_or(u32::MAX);
        self.in_flight
            .clone()
            .try_acquire_many_owned(writes)
            .map_err(|_| ApiError {
                retry_after_seconds: Some(1),
                ..ApiError::new(
                    "overloaded",
                    "the engine is saturated; nothing was applied: retry after a moment",
                )
            })
    }

    /// Send a command to the store on behalf of `caller`.
    pub async fn execute(&self, command: Command, caller: &Caller) -> Result<Executed, ApiError> {
        let _permit = self.admit(1)?;
        self.store
            .execute(command, caller.actor())
            .await
            .map_err(ApiError::from)
    }

    /// Apply every hold timeout and grant expiry due at the engine's now.
    pub async fn run_due(&self) -> Result<(), ApiError> {
        // Each tick handles a bounded amount of work (about 1,000 entries
        // and renewed periods, at most 1,000 customers); repeat until quiet.
        // Every tick that reports work made progress, so the bound only
        // stops a defect from looping for ever.
        for _ in 0..1_000_000 {
            let executed = self.store.execute(Command::Tick, None).await?;
            match executed.result {
                Ok(Outcome::Tick { entries: 0 }) => return Ok(()),
                Ok(_) => continue,
                Err(refusal) => return Err(ApiError::from(&refusal)),
            }
        }
        Ok(())
    }
}

/// Render a store answer: the outcome, or the stored refusal, with
/// `Idempotent-Replayed: true` when it is the answer of an earlier attempt.
pub fn reply<T: Serialize>(
    executed: Executed,
    render: impl FnOnce(&Outcome) -> Result<T, ApiError>,
) -> Response {
    let mut response = match &executed.result {
        Ok(outcome) => match render(outcome) {
            Ok(body) => Json(body).into_response(),
            Err(error) => error.into_response(),
        },
        Err(refusal) => ApiError::from(refusal).into_response(),
    };
    if executed.replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// The whole HTTP API.
pub fn router(state: AppState) -> Router {
    use routes::{
        customers, events, ledger, members, notify, plans, pricebook, spend, system, topups,
    };
    let api = Router::new()
        .route("/healthz", get(system::healthz))
        .route("/metrics", get(system::metrics))
        .route("/v1/customers", post(customers::create_customer))
        .route(
            "/v1/customers/{id}",
            get(customers::get_customer).patch(customers::update_customer),
        )
        .route("/v1/customers/{id}/balance", get(customers::balance))
        .route(
            "/v1/customers/{id}/overage",
            put(customers::set_overage).delete(customers::clear_overage),
        )
        .route(
            "/v1/customers/{id}/grants",
            post(customers::create_grant).get(customers::list_grants),
        )
        .route("/v1/customers/{id}/ledger", get(ledger::customer_ledger))
        .route("/v1/customers/{id}/usage", get(ledger::customer_usage))
        .route("/v1/grants/{grant_id}/void", post(customers::void_grant))
        .route(
            "/v1/grants/{grant_id}/expiry",
            post(customers::change_expiry),
        )
        .route("/v1/charges", post(spend::create_charge))
        .route("/v1/holds", post(spend::create_hold))
        .route("/v1/holds/{id}", get(spend::get_hold))
        .route("/v1/holds/{id}/capture", post(spend::capture_hold))
        .route("/v1/holds/{id}/release", post(spend::release_hold))
        .route("/v1/refunds", post(spend::create_refund))
        .route("/v1/ledger/{entry_id}", get(ledger::get_entry))
        .route("/v1/quotes", post(pricebook::create_quote))
        .route("/v1/events", post(events::post_events))
        .route("/v1/ingest/pubsub", post(events::pubsub_push))
        .route("/v1/dead-letters", get(events::list_dead_letters))
        .route("/v1/dead-letters/{id}", get(events::get_dead_letter))
        .route(
            "/v1/dead-letters/{id}/replay",
            post(events::replay_dead_letter),
        )
        .route(
            "/v1/dead-letters/{id}/discard",
            post(events::discard_dead_letter),
        )
        .route("/v1/features", get(pricebook::list_features))
        .route("/v1/features/{key}", put(pricebook::put_feature))
        .route(
            "/v1/pricebooks",
            post(pricebook::create_pricebook).get(pricebook::list_pricebooks),
        )
        .route("/v1/pricebooks/{id}", get(pricebook::get_pricebook))
        .route("/v1/pricebooks/{id}/rules", put(pricebook::put_rules))
        .route("/v1/pricebooks/{id}/publish", post(pricebook::publish))
        .route("/v1/pricebooks/{id}/diff", get(pricebook::diff_pricebooks))
        .route("/v1/pricebooks/{id}/simulate", post(pricebook::simulate))
        .route(
            "/v1/customers/{id}/contract",
            put(pricebook::put_contract).get(pricebook::get_contract),
        )
        .route(
            "/v1/customers/{id}/contracts",
            get(pricebook::list_contracts),
        )
        .route("/v1/plans", get(plans::list_plans))
        .route("/v1/plans/{key}", put(plans::put_plan).get(plans::get_plan))
        .route(
            "/v1/customers/{id}/subscription",
            put(plans::put_subscription)
                .get(plans::get_subscription)
                .delete(plans::cancel_subscription),
        )
        .route(
            "/v1/customers/{id}/alerts",
            put(notify::put_alerts).get(notify::get_alerts),
        )
        .route("/v1/customers/{id}/members", get(members::list_members))
        .route("/v1/transfers", post(members::create_transfer))
        .route(
            "/v1/customers/{id}/members/{member_id}",
            put(members::put_member),
        )
        .route("/v1/customers/{id}/stream", get(notify::stream))
        .route("/v1/credit-packs", get(topups::list_credit_packs))
        .route(
            "/v1/credit-packs/{key}",
            put(topups::put_credit_pack).get(topups::get_credit_pack),
        )
        .route(
            "/v1/customers/{id}/topups",
            post(topups::create_topup).get(topups::list_topups),
        )
        .route("/v1/topups/{id}", get(topups::get_topup))
        .route("/v1/topups/{id}/confirm", post(topups::confirm_topup))
        .route("/v1/topups/{id}/fail", post(topups::fail_topup))
        .route(
            "/v1/customers/{id}/auto-topup",
            put(topups::put_auto_topup).get(topups::get_auto_topup),
        )
        .route(
            "/v1/webhook-endpoints",
            post(notify::create_webhook_endpoint).get(notify::list_webhook_endpoints),
        )
        .route(
            "/v1/webhook-endpoints/{id}",
            get(notify::get_webhook_endpoint)
                .patch(notify::update_webhook_endpoint)
                .delete(notify::delete_webhook_endpoint),
        )
        .route(
            "/v1/webhook-endpoints/{id}/rotate-secret",
            post(notify::rotate_webhook_secret),
        )
        .route(
            "/v1/webhook-endpoints/{id}/deliveries",
            get(notify::list_deliveries),
        )
        .route("/v1/clock", get(system::clock))
        .route("/v1/clock/advance", post(system::advance_clock))
        .route(
            "/v1/api-keys",
            post(system::create_api_key).get(system::list_api_keys),
        )
        .route(
            "/v1/api-keys/{id}",
            axum::routing::delete(system::revoke_api_key),
        )
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                "method_not_allowed",
                "this route does not accept this method; see /docs",
            )
        })
        .fallback(|| async { ApiError::new("not_found", "no such route; see /docs") })
        // Forwarding to the leader, request metrics, oversized bodies.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            edge::gate,
        ))
        .layer(DefaultBodyLimit::max(edge::MAX_BODY_BYTES))
        .with_state(state);
    api.merge(openapi::docs())
}

/// Apply what falls due on the engine's clock, forever (the system-clock server).
pub fn spawn_ticker(state: AppState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(TICK_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            // Several servers over one database: only the writer's runs the
            // tick; the others follow its (manual) clock.
            if !state.store.is_leader() {
                if let Ok(Some(conflict)) = state.store.clock_mode_conflict().await {
                    // Serving on would answer reads on another clock than
                    // the writer's (a hold expired here, active there).
                    tracing::error!("{conflict}; exiting");
                    eprintln!("tally: {conflict}");
                    std::process::exit(1);
                }
                if let Err(error) = state.store.follow_clock().await {
                    tracing::warn!(%error, "cannot read the writer's clock");
                }
                continue;
            }
            if let Err(error) = state.run_due().await {
                tracing::warn!(code = %error.code, message = %error.message, "tick failed");
            }
        }
    })
}
