//! Several servers over one PostgreSQL database: a server that does not run
//! the writer forwards every write (and every live stream, which only the
//! writer feeds) to the server that does, and answers reads itself from the
//! database.
//!
//! The leader is whoever holds the database's leader lock; it records where
//! it listens in the `leader` table. The forwarded request keeps its method,
//! path, query, headers and body, so the leader authenticates it and applies
//! idempotency exactly as if the client had called it; the answer, streamed,
//! goes back unchanged. If the leader cannot be reached (it died and another
//! server has not taken over yet), the client gets 503 `unavailable` with
//! Retry-After and nothing was applied by this server; a retry with the same
//! id is safe either way.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, Method};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::AppState;

/// Marks a request one server forwarded to another: it is never forwarded
/// twice (two servers that each think the other leads would loop).
const FORWARDED: &str = "x-tally-forwarded";

/// Marks the answer of a server that was forwarded a write but does not run
/// the writer: the forwarding server's idea of the leader is stale.
const NOT_LEADER: &str = "x-tally-not-leader";

/// Hop-by-hop headers, which a proxy does not pass on (RFC 9110, 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "host",
];

fn needs_writer(request: &Request) -> bool {
    let read = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    !read || request.uri().path().ends_with("/stream")
}

/// On a server that does not run the writer, a write's answer from the
/// server that does (`Ok`); else the request back, for this server to
/// answer (`Err`). Part of [`crate::edge::gate`].
pub async fn to_leader(state: &AppState, request: Request) -> Result<Response, Request> {
    if state.store.is_leader() || !needs_writer(&request) {
        return Err(request);
    }
    Ok(forward(state, request).await)
}

/// How long a forwarded request waits for the leader's answer to begin.
const FORWARD_ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

async fn forward(state: &AppState, request: Request) -> Response {
    if request.headers().contains_key(FORWARDED) {
        let mut answer =
            unavailable("this server was sent a forwarded write but does not run the writer");
        answer
            .headers_mut()
            .insert(NOT_LEADER, axum::http::HeaderValue::from_static("1"));
        return answer;
    }
    if let Some(declared) = crate::edge::declared_oversize(&request) {
        return crate::edge::drain_and_refuse(state, request, declared).await;
    }
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, crate::edge::MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(error) => {
            if let Some(cut) = crate::serve::body_cut(&error) {
                return cut.into_response();
            }
            return ApiError::invalid("body", "the request body is too large or was cut off")
                .into_response();
        }
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
    // The recorded leader may be stale (it died, another took over): look
    // again once before giving up.
    for attempt in 0..2 {
        let leader = match leader_url(state, attempt > 0).await {
            Some(url) => url,
            None => return unavailable("no server runs the writer yet"),
        };
        // This server's own address: recorded by its previous run (a
        // restart), whose writer it is about to take over unless another
        // server has. Forwarding there would only come back here.
        if state.store.advertised() == Some(leader.as_str()) {
            if attempt == 0 {
                continue;
            }
            return unavailable(
                "this server ran the writer before it restarted and is taking it over again; \
                 retry with the same id",
            );
        }
        let mut forwarded = state
            .forwarder
            .request(parts.method.clone(), format!("{leader}{path}"))
            .header(FORWARDED, "1")
            .body(body.clone());
        for (name, value) in &parts.headers {
            if !HOP_BY_HOP.contains(&name.as_str()) && name != "content-length" {
                forwarded = forwarded.header(name, value);
            }
        }
        // A leader whose process stalled (stopped, a paused VM) still has
        // its kernel acknowledge every byte, so no TCP timeout ends the
        // wait: bound it here. Only until the answer's head arrives, so a
        // forwarded live stream is not cut.
        let sent = tokio::select! {
            // The leader's answer first, when it comes with a takeover.
            biased;
            sent = tokio::time::timeout(FORWARD_ANSWER_WITHIN, forwarded.send()) => sent,
            // This server took over from a leader that stalled: the stalled
            // one can no longer commit what it was sent (its session ended).
            () = state.store.wait_until_leader() => {
                return unavailable(
                    "the server that ran the writer stalled and this one took over; retry with the same id",
                );
            }
            // Or another server did: the same, and the next request goes there.
            () = leader_moved(state, &leader) => {
                return unavailable(
                    "the server that ran the writer stalled and another took over; retry with the same id",
                );
            }
        };
        let sent = match sent {
            Ok(sent) => sent,
            Err(_) => {
                tracing::warn!(%leader, "the leader did not answer a forwarded request in time");
                // Another server may be taking over from it: look the leader
                // up again for the next request.
                *state.leader_url.write().expect("leader url") = None;
                return unavailable(
                    "the server that runs the writer did not answer within 30 s; retry with the same id",
                );
            }
        };
        match sent {
            // A stale address (the old leader restarted there as a
            // follower): look up the leader again.
            Ok(answer) if answer.headers().contains_key(NOT_LEADER) => {
                tracing::warn!(%leader, "the recorded leader no longer runs the writer");
                continue;
            }
            Ok(answer) if path == CLOCK_ADVANCE && answer.status().is_success() => {
                return clock_stepped(state, answer).await
            }
            // A key revoked through this server is refused here at once too.
            Ok(answer)
                if parts.method == Method::DELETE
                    && path.starts_with("/v1/api-keys/")
                    && answer.status().is_success() =>
            {
                state.key_cache.clear();
                return relay(answer);
            }
            Ok(answer) => return relay(answer),
            Err(error) if error.is_connect() => {
                tracing::warn!(%leader, %error, "the leader is unreachable");
                continue;
            }
            Err(error) => {
                // Sent, but the answer was lost: the write may have been
                // applied. The client's retry with the same id resolves it.
                tracing::warn!(%leader, %error, "forwarding to the leader failed");
                return unavailable("the leader did not answer; retry with the same id");
            }
        }
    }
    unavailable("the server that runs the writer cannot be reached")
}

/// Once a forwarded request has waited [`LOOK_FOR_A_NEW_LEADER_AFTER`],
/// wait until the database names another leader than `from`. A new leader
/// holds the lock, so the session of the one the request went to has ended,
/// and that server can no longer commit it.
async fn leader_moved(state: &AppState, from: &str) {
    tokio::time::sleep(LOOK_FOR_A_NEW_LEADER_AFTER).await;
    loop {
        if latest_leader(state).await.is_some_and(|url| url != from) {
            return;
        }
        tokio::time::sleep(LOOK_FOR_A_NEW_LEADER_EVERY).await;
    }
}

/// The leader as the database records it, read at most once every
/// [`LOOK_FOR_A_NEW_LEADER_EVERY`] by this server however many forwards
/// wait (the others take what the last read found).
async fn latest_leader(state: &AppState) -> Option<String> {
    let due = {
        let mut last = state.leader_read_at.lock().expect("leader read");
        let due = last.is_none_or(|at| at.elapsed() >= LOOK_FOR_A_NEW_LEADER_EVERY);
        if due {
            *last = Some(std::time::Instant::now());
        }
        due
    };
    match due {
        true => leader_url(state, true).await,
        false => state.leader_url.read().expect("leader url").clone(),
    }
}

const LOOK_FOR_A_NEW_LEADER_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A forwarded write that takes this long is rare (a leader's answer comes
/// in milliseconds): only then is the leader looked up.
const LOOK_FOR_A_NEW_LEADER_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

async fn leader_url(state: &AppState, refresh: bool) -> Option<String> {
    if !refresh {
        if let Some(url) = state.leader_url.read().expect("leader url").clone() {
            return Some(url);
        }
    }
    let url = state.store.leader_url().await.ok().flatten();
    *state.leader_url.write().expect("leader url") = url.clone();
    url
}

const CLOCK_ADVANCE: &str = "/v1/clock/advance";

/// The leader's answer to a step of the manual clock: this server's clock
/// moves there too before the client hears of it, so that what it reads
/// next here is not from before the step (the clock would otherwise follow
/// only at the next tick).
async fn clock_stepped(state: &AppState, answer: reqwest::Response) -> Response {
    let status = answer.status().as_u16();
    let Ok(body) = answer.bytes().await else {
        return unavailable(
            "the leader's answer was cut off; read GET /v1/clock to see where the clock is",
        );
    };
    let now = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["now"].as_str().map(str::to_owned))
        .and_then(|now| crate::edge::instant(&now, "now").ok());
    if let (Some(clock), Some(now)) = (&state.manual_clock, now) {
        clock.advance_to(now);
    }
    Response::builder()
        .status(status)
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap_or_else(|_| unavailable("the leader's answer could not be relayed"))
}

fn relay(answer: reqwest::Response) -> Response {
    let mut response = Response::builder().status(answer.status().as_u16());
    for (name, value) in answer.headers() {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            if let Ok(name) = HeaderName::from_bytes(name.as_str().as_bytes()) {
                response = response.header(name, value.as_bytes());
            }
        }
    }
    response
        .body(Body::from_stream(answer.bytes_stream()))
        .unwrap_or_else(|_| unavailable("the leader's answer could not be relayed"))
}

fn unavailable(message: &str) -> Response {
    ApiError {
        retry_after_seconds: Some(1),
        ..ApiError::new("unavailable", message)
    }
    .into_response()
}
