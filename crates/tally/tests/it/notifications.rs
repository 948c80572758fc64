//! Notifications over real HTTP: a webhook receiver in the test (its own
//! axum server on 127.0.0.1) verifies every signature, fails some attempts
//! on purpose, and sees every notification type; deliveries are retried
//! with the same delivery id and body until delivered, and the delivery log
//! says so. The live stream of a customer (server-sent events) shows each
//! balance change as it happens. Bad input is refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use hmac::{Hmac, Mac};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::support::{wait_until, Options, TestApp, ADMIN_KEY};

#[derive(Default)]
pub(crate) struct Received {
    /// Every request: (delivery id, body, answered with success).
    pub requests: Vec<(String, String, bool)>,
    /// Attempts to fail before succeeding, per delivery id.
    pub failures_left: HashMap<String, u32>,
    pub secret: String,
    pub bad_signatures: usize,
    /// Answer every correctly signed request with success (else the first
    /// attempt of every delivery fails, the second of every other one too).
    pub always_accept: bool,
}

async fn receive(
    State(received): State<Arc<Mutex<Received>>>,
    headers: HeaderMap,
    body: String,
) -> AxumStatus {
    let mut received = received.lock().unwrap();
    let delivery = headers
        .get("tally-delivery-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let signature = headers
        .get("tally-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (t, v1) = signature
        .split_once(',')
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
        .unwrap_or(("", ""));
    let mut mac = Hmac::<Sha256>::new_from_slice(received.secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let fresh = t.parse::<u64>().is_ok_and(|t| now.abs_diff(t) < 300);
    let valid = hex::decode(v1).is_ok_and(|sig| mac.verify_slice(&sig).is_ok());
    if !valid || !fresh {
        received.bad_signatures += 1;
        return AxumStatus::UNAUTHORIZED;
    }
    if received.always_accept {
        received.requests.push((delivery, body, true));
        return AxumStatus::OK;
    }
    // The first attempt of every delivery fails, the second of every other one too.
    let left = received
        .failures_left
        .entry(delivery.clone())
        .or_insert_with(|| 1 + u32::from(delivery.len() % 2 == 0));
    let ok = *left == 0;
    *left = left.saturating_sub(1);
    received.requests.push((delivery, body, ok));
    if ok {
        AxumStatus::OK
    } else {
        AxumStatus::INTERNAL_SERVER_ERROR
    }
}

pub(crate) async fn start_receiver(received: Arc<Mutex<Received>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(received);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{address}/hook")
}

/// A URL on 127.0.0.1 where nothing listens (a port bound, then let go).
fn nobody_listens() -> String {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}/hook", closed.local_addr().unwrap())
}

/// A receiver that accepts every correctly signed request, registered as
/// webhook endpoint `id` for `events`: what it receives.
pub(crate) async fn accepting_endpoint(
    app: &TestApp,
    id: &str,
    events: Value,
) -> Arc<Mutex<Received>> {
    let received = Arc::new(Mutex::new(Received {
        always_accept: true,
        ..Received::default()
    }));
    let url = start_receiver(received.clone()).await;
    let endpoint = app
        .post(
            "/v1/webhook-endpoints",
            json!({ "id": id, "url": url, "events": events }),
        )
        .await;
    assert_eq!(endpoint.status, StatusCode::OK, "{}", endpoint.body);
    received.lock().unwrap().secret = endpoint.str("secret").to_string();
    received
}

#[tokio::test]
async fn webhooks_are_signed_retried_and_delivered_once_per_delivery_id() {
    let mut app = TestApp::spawn_with(Options {
        manual_clock: true,
        ..Options::default()
    })
    .await;
    let received = Arc::new(Mutex::new(Received::default()));
    let url = start_receiver(received.clone()).await;
    let endpoint = app
        .post(
            "/v1/webhook-endpoints",
            json!({ "id": "wh1", "url": url, "events": ["*"] }),
        )
        .await;
    assert_eq!(endpoint.status, StatusCode::OK, "{}", endpoint.body);
    let secret = endpoint.str("secret").to_string();
    assert!(secret.starts_with("whsec_"));
    received.lock().unwrap().secret = secret;
    // A URL of a megabyte (a probe's) was kept, and repeated in every delivery.
    let long = app
        .post(
            "/v1/webhook-endpoints",
            json!({ "id": "wh_long", "url": format!("http://x/{}", "a".repeat(2100)), "events": ["*"] }),
        )
        .await;
    assert_eq!(long.status, StatusCode::BAD_REQUEST, "{}", long.body);
    assert_eq!(long.body["error"]["param"], "url");

    app.put(
        "/v1/plans/pro",
        json!({ "name": "Pro", "period": { "days": 30 }, "included_credits": "0" }),
    )
    .await;
    app.customer("cus").await;
    let alerts = app
        .put(
            "/v1/customers/cus/alerts",
            json!({ "low_balance": ["100", "10"], "grant_expiring_days": 3 }),
        )
        .await;
    assert_eq!(alerts.status, StatusCode::OK, "{}", alerts.body);
    assert_eq!(alerts.body["low_balance"], json!(["10", "100"]));
    let expires = app.get("/v1/clock").await.str("now").to_string();
    let expires =
        time::OffsetDateTime::parse(&expires, &time::format_description::well_known::Rfc3339)
            .unwrap()
            + time::Duration::days(2);
    let expires = expires
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let grant = app
        .post(
            "/v1/customers/cus/grants",
            json!({ "id": "g1", "amount": "150", "source": "purchase", "paid": true, "expires_at": expires }),
        )
        .await;
    assert_eq!(grant.status, StatusCode::OK, "{}", grant.body);
    // 150 → 90: below 100. 90 → 5: below 10. A hold of 5 → 0: depleted.
    for (id, amount) in [("c1", "60"), ("c2", "85")] {
        let reply = app
            .post(
                "/v1/charges",
                json!({ "id": id, "customer_id": "cus", "amount": amount }),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    }
    let hold = app
        .post(
            "/v1/holds",
            json!({ "id": "h1", "customer_id": "cus", "amount": "5", "timeout_seconds": 60 }),
        )
        .await;
    assert_eq!(hold.status, StatusCode::OK, "{}", hold.body);
    let sub = app
        .put(
            "/v1/customers/cus/subscription",
            json!({ "id": "s1", "plan": "pro" }),
        )
        .await;
    assert_eq!(sub.status, StatusCode::OK, "{}", sub.body);
    // The hold times out (hold.expired), the lot expires two days in
    // (grant.expired, then depleted again); retries come due as the clock moves.
    let expected = [
        "balance.low",
        "balance.low",
        "balance.depleted",
        "balance.depleted",
        "hold.expired",
        "grant.expiring",
        "grant.expired",
        "subscription.renewed",
    ];
    let mut delivered: Vec<(String, Value)> = Vec::new();
    for round in 0..600 {
        if round == 10 {
            // Restart after the hold timed out and before the lot expires: the
            // lot's expiry then applies to a customer loaded afresh, and must
            // still report the balance reaching zero.
            app.kill().await;
            app.start().await;
        }
        let reply = app
            .post("/v1/clock/advance", json!({ "seconds": 600 }))
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let log = app
            .get("/v1/webhook-endpoints/wh1/deliveries?limit=1000")
            .await;
        let all = log.body["data"].as_array().unwrap().clone();
        if all.len() >= expected.len() && all.iter().all(|d| d["status"] == "delivered") {
            delivered = all
                .iter()
                .map(|d| (d["type"].as_str().unwrap().to_string(), d.clone()))
                .collect();
            break;
        }
    }
    let mut types: Vec<&str> = delivered.iter().map(|(t, _)| t.as_str()).collect();
    types.sort();
    let mut want = expected.to_vec();
    want.sort();
    assert_eq!(types, want, "every notification, once each");
    // The log pages, newest first: the pages together are the whole list.
    let whole: Vec<Value> = delivered.iter().map(|(_, d)| d["id"].clone()).collect();
    let mut paged = Vec::new();
    let mut url = "/v1/webhook-endpoints/wh1/deliveries?limit=3".to_string();
    loop {
        let page = app.get(&url).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        let data = page.body["data"].as_array().unwrap();
        assert!(data.len() <= 3);
        paged.extend(data.iter().map(|d| d["id"].clone()));
        match page.body["next_cursor"].as_str() {
            Some(cursor) => {
                url = format!("/v1/webhook-endpoints/wh1/deliveries?limit=3&cursor={cursor}")
            }
            None => break,
        }
    }
    assert_eq!(paged, whole);
    let bad = app
        .get("/v1/webhook-endpoints/wh1/deliveries?cursor=nonsense")
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.body);
    assert!(
        delivered
            .iter()
            .all(|(_, d)| d["attempts"].as_i64().unwrap() >= 2),
        "every delivery failed at least once and was retried"
    );
    let received = received.lock().unwrap();
    assert_eq!(received.bad_signatures, 0);
    // Per delivery id: a success (more than one only if a kill came between
    // a send and its record: at least once), and every attempt carried the
    // same body; the receiver deduplicates on the id.
    let mut by_id: HashMap<&str, Vec<&(String, String, bool)>> = HashMap::new();
    for request in &received.requests {
        by_id.entry(request.0.as_str()).or_default().push(request);
    }
    assert_eq!(by_id.len(), expected.len());
    for (id, attempts) in &by_id {
        assert!(attempts.iter().any(|a| a.2), "{id} succeeded");
        assert!(
            attempts.iter().all(|a| a.1 == attempts[0].1),
            "{id}: same body on retries"
        );
        let body: Value = serde_json::from_str(&attempts[0].1).unwrap();
        assert!(body["id"].as_str().unwrap().starts_with("evt_"));
        assert_eq!(body["customer_id"], "cus");
        assert!(attempts.iter().all(|a| a.0 == *id));
    }
    let lows: Vec<String> = by_id
        .values()
        .filter_map(|attempts| attempts.iter().find(|a| a.2).copied())
        .map(|r| serde_json::from_str::<Value>(&r.1).unwrap())
        .filter(|b| b["type"] == "balance.low")
        .map(|b| b["data"]["threshold"].as_str().unwrap().to_string())
        .collect();
    let mut lows = lows;
    lows.sort();
    assert_eq!(lows, ["10", "100"]);
}

/// Server-sent events read from a streaming response: `(event, data)` pairs.
struct Events {
    response: reqwest::Response,
    buffer: String,
    /// The `id:` of the last event read, if it had one.
    last_id: Option<String>,
}

impl Events {
    async fn next(&mut self) -> (String, Value) {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut kind = String::new();
                let mut data = String::new();
                let mut id = None;
                for line in block.lines() {
                    if let Some(k) = line.strip_prefix("event: ") {
                        kind = k.to_string();
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data.push_str(d);
                    } else if let Some(i) = line.strip_prefix("id: ") {
                        id = Some(i.to_string());
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                self.last_id = id;
                return (kind, serde_json::from_str(&data).unwrap());
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.response.chunk())
                .await
                .expect("an event within 10 s")
                .expect("stream readable")
                .expect("stream open");
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

async fn open_stream(app: &TestApp, customer: &str) -> Events {
    resume_stream(app, customer, None).await
}

/// Open the stream as a client reconnecting after `last_event_id`.
async fn resume_stream(app: &TestApp, customer: &str, last_event_id: Option<&str>) -> Events {
    let mut request = app
        .client
        .get(app.url(&format!("/v1/customers/{customer}/stream")))
        .bearer_auth(ADMIN_KEY);
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    Events {
        response,
        buffer: String::new(),
        last_id: None,
    }
}

fn entry_number(id: &Value) -> i64 {
    id.as_str()
        .and_then(|s| s.strip_prefix("ent_"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad entry id {id}"))
}

#[tokio::test]
async fn the_live_stream_shows_every_balance_change_of_its_customer() {
    let app = TestApp::spawn().await;
    app.customer("live").await;
    app.customer("other").await;
    app.grant("live", "g1", "100").await;
    let mut events = open_stream(&app, "live").await;
    let (kind, first) = events.next().await;
    assert_eq!(kind, "balance");
    assert_eq!(first["available"], "100");
    // Another customer's change does not show; this customer's do, in order.
    app.grant("other", "g2", "5").await;
    for (id, amount) in [("c1", "30"), ("c2", "20")] {
        let reply = app
            .post(
                "/v1/charges",
                json!({ "id": id, "customer_id": "live", "amount": amount }),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let (kind, one) = events.next().await;
    assert_eq!(kind, "balance.changed");
    assert_eq!(one["kind"], "charge");
    assert_eq!(one["balance_after"], "70");
    let (_, two) = events.next().await;
    assert_eq!(two["balance_after"], "50");
    assert!(entry_number(&two["entry_id"]) > entry_number(&one["entry_id"]));
}

/// A client that reconnects with `Last-Event-ID` (as `EventSource` does)
/// gets the changes it missed, oldest first, then the live ones, and no
/// change twice; an id that is not the customer's starts afresh.
#[tokio::test]
async fn a_reconnecting_stream_gets_the_changes_it_missed() {
    let app = TestApp::spawn().await;
    // Another customer's entry, older than all of this one's but its grant.
    app.customer("other").await;
    app.customer("live").await;
    app.grant("live", "g1", "100").await;
    app.grant("other", "g2", "7").await;
    let mut events = open_stream(&app, "live").await;
    let (kind, first) = events.next().await;
    assert_eq!(kind, "balance");
    // The snapshot's id is its last entry, so a reconnect after it alone resumes.
    assert_eq!(events.last_id.as_deref(), first["last_entry_id"].as_str());
    app.charge("live", "c1", "10").await;
    let (_, one) = events.next().await;
    assert_eq!(one["balance_after"], "90");
    let seen = events.last_id.clone().expect("a change has an id");
    assert_eq!(seen, one["entry_id"].as_str().unwrap());
    drop(events);

    // Missed while away.
    app.charge("live", "c2", "20").await;
    app.charge("live", "c3", "30").await;
    let mut events = resume_stream(&app, "live", Some(&seen)).await;
    let mut replayed = Vec::new();
    for _ in 0..2 {
        let (kind, change) = events.next().await;
        assert_eq!(kind, "balance.changed", "no snapshot on a resume: {change}");
        replayed.push(change["balance_after"].as_str().unwrap().to_string());
        assert_eq!(events.last_id.as_deref(), change["entry_id"].as_str());
    }
    assert_eq!(replayed, ["70", "40"]);
    // Then live, once.
    app.charge("live", "c4", "5").await;
    let (kind, live) = events.next().await;
    assert_eq!(kind, "balance.changed");
    assert_eq!(live["balance_after"], "35");
    // The changes replayed are the ledger's entries.
    let ledger = app.ledger_all("live").await;
    let c2 = ledger.iter().find(|e| e["reference"] == "c2").unwrap();
    assert_eq!(c2["balance_after"], "70");
    drop(events);

    // Nothing missed: straight to live.
    let last = live["entry_id"].as_str().unwrap().to_string();
    let mut events = resume_stream(&app, "live", Some(&last)).await;
    app.charge("live", "c5", "1").await;
    let (kind, next) = events.next().await;
    assert_eq!(kind, "balance.changed");
    assert_eq!(next["balance_after"], "34");
    drop(events);

    // An id that is not this customer's entry (one between its entries,
    // one past them), or not an entry id: afresh.
    let others = app.ledger_all("other").await;
    let foreign = others[0]["id"].as_str().unwrap().to_string();
    for id in [foreign.as_str(), "ent_999999", "garbage"] {
        let mut events = resume_stream(&app, "live", Some(id)).await;
        let (kind, snapshot) = events.next().await;
        assert_eq!(kind, "balance", "{id}");
        assert_eq!(snapshot["available"], "34", "{id}");
    }
}

/// Settled notifications are pruned with their delivery log 30 days after
/// they were made; one with a delivery still pending stays.
#[tokio::test]
async fn settled_notifications_are_pruned_after_their_retention() {
    let app = TestApp::spawn_with(Options {
        manual_clock: true,
        ..Options::default()
    })
    .await;
    accepting_endpoint(&app, "good", json!(["balance.low"])).await;
    // Nothing listens there: its deliveries stay pending, retried.
    let dead_url = nobody_listens();
    let dead = app
        .post(
            "/v1/webhook-endpoints",
            json!({ "id": "dead", "url": dead_url, "events": ["balance.depleted"] }),
        )
        .await;
    assert_eq!(dead.status, StatusCode::OK, "{}", dead.body);
    app.customer("cus").await;
    app.grant("cus", "g1", "100").await;
    let alerts = app
        .put("/v1/customers/cus/alerts", json!({ "low_balance": ["50"] }))
        .await;
    assert_eq!(alerts.status, StatusCode::OK);
    app.charge("cus", "c1", "60").await; // balance.low, to "good"
    app.charge("cus", "c2", "40").await; // balance.depleted, to "dead"
    let log = |endpoint: &'static str| {
        let app = &app;
        async move {
            let reply = app
                .get(&format!("/v1/webhook-endpoints/{endpoint}/deliveries"))
                .await;
            reply.body["data"].as_array().unwrap().clone()
        }
    };
    for _ in 0..100 {
        if log("good")
            .await
            .first()
            .is_some_and(|d| d["status"] == "delivered")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(log("good").await[0]["status"], "delivered");
    assert_eq!(log("dead").await.len(), 1);
    app.advance(29 * 86_400).await;
    assert_eq!(log("good").await.len(), 1, "kept within its retention");
    app.advance(2 * 86_400).await;
    assert!(log("good").await.is_empty(), "pruned after 30 days");
    let pending = log("dead").await;
    assert_eq!(pending.len(), 1, "still pending: kept");
    assert_eq!(pending[0]["status"], "pending");
}

/// `grant.expiring` is sent once per lot and expiry: a lot whose expiry is
/// moved after its warning is warned about again ahead of the new date, and
/// not before.
#[tokio::test]
async fn a_lot_whose_expiry_moves_is_warned_again_for_its_new_date() {
    let app = TestApp::spawn_with(Options {
        manual_clock: true,
        ..Options::default()
    })
    .await;
    let received = accepting_endpoint(&app, "wh", json!(["grant.expiring"])).await;
    app.customer("cus").await;
    let alerts = app
        .put(
            "/v1/customers/cus/alerts",
            json!({ "grant_expiring_days": 3 }),
        )
        .await;
    assert_eq!(alerts.status, StatusCode::OK, "{}", alerts.body);
    let rfc3339 = &time::format_description::well_known::Rfc3339;
    let now = time::OffsetDateTime::parse(app.get("/v1/clock").await.str("now"), rfc3339).unwrap();
    let at = |days: i64| (now + time::Duration::days(days)).format(rfc3339).unwrap();
    let grant = app
        .post(
            "/v1/customers/cus/grants",
            json!({ "id": "g1", "amount": "100", "source": "promotion", "paid": false, "expires_at": at(2) }),
        )
        .await;
    assert_eq!(grant.status, StatusCode::OK, "{}", grant.body);
    // Each warning received, as (expires_at of the body).
    let warnings = || {
        let received = received.lock().unwrap();
        received
            .requests
            .iter()
            .map(|r| serde_json::from_str::<Value>(&r.1).unwrap())
            .inspect(|b| assert_eq!(b["type"], "grant.expiring"))
            .map(|b| b["data"]["expires_at"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let wait_for = |count: usize| async move {
        for _ in 0..100 {
            if warnings().len() >= count {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    app.advance(60).await;
    wait_for(1).await;
    let first = warnings();
    assert_eq!(first.len(), 1, "one warning: {first:?}");
    assert_eq!(
        time::OffsetDateTime::parse(&first[0], rfc3339).unwrap(),
        now + time::Duration::days(2)
    );
    // Another tick warns about nothing new.
    app.advance(60).await;
    // Moved out to ten days from the start: not warned while more than three
    // days away, warned once inside them.
    let extend = app
        .post(
            "/v1/grants/g1/expiry",
            json!({ "id": "x1", "expires_at": at(10), "reason": "goodwill" }),
        )
        .await;
    assert_eq!(extend.status, StatusCode::OK, "{}", extend.body);
    app.advance(4 * 86_400).await; // 6 days before the new expiry
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(warnings().len(), 1, "not yet: {:?}", warnings());
    app.advance(3 * 86_400 + 3600).await; // within 3 days of it
    wait_for(2).await;
    app.advance(60).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let all = warnings();
    assert_eq!(all.len(), 2, "warned once more: {all:?}");
    assert_eq!(
        time::OffsetDateTime::parse(&all[1], rfc3339).unwrap(),
        now + time::Duration::days(10)
    );
}

/// SIGTERM shuts the server down gracefully even while a client keeps a
/// live stream open: the stream ends and the process exits cleanly; what was
/// acknowledged before is there after a restart.
#[tokio::test]
async fn a_graceful_shutdown_ends_open_streams() {
    let mut app = TestApp::spawn().await;
    app.customer("live").await;
    app.grant("live", "g1", "100").await;
    let mut events = open_stream(&app, "live").await;
    let (kind, _) = events.next().await;
    assert_eq!(kind, "balance");
    let status = app.terminate().await;
    assert!(status.success(), "exit status {status}");
    let end = tokio::time::timeout(Duration::from_secs(10), events.response.chunk())
        .await
        .expect("the stream ended");
    assert!(
        matches!(end, Ok(None) | Err(_)),
        "the stream is over: {end:?}"
    );
    app.start().await;
    assert_eq!(app.balance("live").await["available"], "100");
}

/// Streams opened while charges are being written see each change exactly
/// once: the first event's balance includes everything up to its
/// `last_entry_id`, and every later change follows it without a gap.
#[tokio::test]
async fn a_stream_opened_during_writes_misses_nothing_and_repeats_nothing() {
    let app = TestApp::spawn().await;
    app.customer("busy").await;
    app.grant("busy", "g1", "100000").await;
    let charges = {
        let client = app.client.clone();
        let url = app.url("/v1/charges");
        tokio::spawn(async move {
            for i in 0..200 {
                let reply = client
                    .post(&url)
                    .bearer_auth(ADMIN_KEY)
                    .json(&json!({ "id": format!("c{i}"), "customer_id": "busy", "amount": "1" }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(reply.status(), StatusCode::OK);
            }
        })
    };
    for _ in 0..5 {
        let mut events = open_stream(&app, "busy").await;
        let (kind, first) = events.next().await;
        assert_eq!(kind, "balance");
        let mut balance = crate::support::micros_of(&first["available"]);
        let mut last = first["last_entry_id"]
            .as_str()
            .map_or(0, |_| entry_number(&first["last_entry_id"]));
        // Follow the stream until the last charge: every change continues
        // the balance exactly where the one before left it.
        while balance > crate::support::micros("99800") {
            let (kind, change) = events.next().await;
            assert_eq!(kind, "balance.changed", "{change}");
            let entry = entry_number(&change["entry_id"]);
            assert!(entry > last, "entry {entry} after {last}: a repeat");
            last = entry;
            let after = crate::support::micros_of(&change["balance_after"]);
            assert_eq!(
                after,
                balance - crate::support::micros_of(&change["amount"]),
                "a gap before {change}"
            );
            balance = after;
        }
    }
    charges.await.unwrap();
}

#[tokio::test]
async fn bad_alerts_and_endpoints_are_refused() {
    let app = TestApp::spawn().await;
    app.customer("cus").await;
    let bad_alerts = [
        json!({ "low_balance": ["-1"] }),
        json!({ "low_balance": ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11"] }),
        json!({ "grant_expiring_days": 0 }),
        json!({ "grant_expiring_days": 91 }),
        json!({ "low_balance": ["1.0000001"] }),
        json!({ "bogus": true }),
    ];
    app.assert_each_answered(
        Method::PUT,
        "/v1/customers/cus/alerts",
        StatusCode::BAD_REQUEST,
        &bad_alerts,
    )
    .await;
    let reply = app
        .put(
            "/v1/customers/ghost/alerts",
            json!({ "low_balance": ["1"] }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let bad_endpoints = [
        json!({ "id": "e1", "url": "ftp://x/y", "events": ["*"] }),
        json!({ "id": "e1", "url": "not a url", "events": ["*"] }),
        json!({ "id": "e1", "url": "http://127.0.0.1:9/h", "events": [] }),
        json!({ "id": "e1", "url": "http://127.0.0.1:9/h", "events": ["balance.high"] }),
        json!({ "id": "bad id", "url": "http://127.0.0.1:9/h", "events": ["*"] }),
    ];
    app.assert_each_answered(
        Method::POST,
        "/v1/webhook-endpoints",
        StatusCode::BAD_REQUEST,
        &bad_endpoints,
    )
    .await;
    let listed = app.get("/v1/webhook-endpoints").await;
    assert_eq!(listed.body["data"], json!([]));
    let created = app
        .post(
            "/v1/webhook-endpoints",
            json!({ "id": "e1", "url": "http://127.0.0.1:9/h", "events": ["balance.low"] }),
        )
        .await;
    assert_eq!(created.status, StatusCode::OK);
    // A retry shows the same secret; other content under the id is a conflict.
    let again = app
        .post(
            "/v1/webhook-endpoints",
            json!({ "id": "e1", "url": "http://127.0.0.1:9/h", "events": ["balance.low"] }),
        )
        .await;
    assert!(again.replayed());
    assert_eq!(again.body["secret"], created.body["secret"]);
    let other = app
        .post(
            "/v1/webhook-endpoints",
            json!({ "id": "e1", "url": "http://127.0.0.1:9/other", "events": ["balance.low"] }),
        )
        .await;
    assert_eq!(other.status, StatusCode::CONFLICT);
    let listed = app.get("/v1/webhook-endpoints").await;
    assert_eq!(listed.body["data"].as_array().unwrap().len(), 1);
    assert!(listed.body["data"][0].get("secret").is_none());
    let none = app.get("/v1/webhook-endpoints/nope/deliveries").await;
    assert_eq!(none.status, StatusCode::NOT_FOUND);
    let reply = app.get("/v1/customers/ghost/stream").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

/// A customer's alert thresholds are read back with its row when a
/// restarted writer first loads it: crossing one after a restart still
/// sends `balance.low`.
#[tokio::test]
async fn alerts_set_before_a_restart_still_fire_after_it() {
    let mut app = TestApp::spawn().await;
    let received = accepting_endpoint(&app, "hook", json!(["balance.low"])).await;
    app.customer("cus").await;
    app.grant("cus", "g1", "100").await;
    let alerts = app
        .put("/v1/customers/cus/alerts", json!({ "low_balance": ["50"] }))
        .await;
    assert_eq!(alerts.status, StatusCode::OK, "{}", alerts.body);
    app.kill().await;
    app.start().await;
    let charged = app.charge("cus", "c1", "60").await; // 100 → 40: below 50
    assert_eq!(charged.status, StatusCode::OK, "{}", charged.body);
    let low = || {
        received
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|(_, body, ok)| *ok && body.contains("\"balance.low\""))
            .count()
    };
    for _ in 0..100 {
        if low() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(low(), 1, "one balance.low after the restart");
}

/// Thresholds are crossed by what a whole command does: a renewal expires
/// the old allocation before it grants the new one, and a change now ends
/// one plan's allocation before it grants the next; neither takes the
/// balance below a threshold, so neither sends `balance.low` or
/// `balance.depleted` (a probe got three alerts at every renewal of a
/// customer who never spent). A spend that does cross still sends them.
#[tokio::test]
async fn a_renewal_that_passes_through_zero_sends_no_balance_alert() {
    let app = TestApp::spawn_with(Options {
        manual_clock: true,
        ..Options::default()
    })
    .await;
    // An endpoint that refuses everything keeps every delivery listed.
    let endpoint = app
        .post(
            "/v1/webhook-endpoints",
            json!({ "id": "wh1", "url": "http://127.0.0.1:9/h", "events": ["*"] }),
        )
        .await;
    assert_eq!(endpoint.status, StatusCode::OK, "{}", endpoint.body);
    for (key, credits) in [("big", "1000"), ("small", "1000")] {
        let plan = app
            .put(
                &format!("/v1/plans/{key}"),
                json!({ "name": key, "period": "month", "included_credits": credits }),
            )
            .await;
        assert_eq!(plan.status, StatusCode::OK, "{}", plan.body);
    }
    app.customer("cus").await;
    let alerts = app
        .put(
            "/v1/customers/cus/alerts",
            json!({ "low_balance": ["500", "100"] }),
        )
        .await;
    assert_eq!(alerts.status, StatusCode::OK, "{}", alerts.body);
    let sub = app
        .put(
            "/v1/customers/cus/subscription",
            json!({ "id": "s1", "plan": "big" }),
        )
        .await;
    assert_eq!(sub.status, StatusCode::OK, "{}", sub.body);
    let alerts_sent = || async {
        let log = app
            .get("/v1/webhook-endpoints/wh1/deliveries?limit=1000")
            .await;
        assert_eq!(log.status, StatusCode::OK, "{}", log.body);
        log.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["type"].as_str().unwrap().to_string())
            .filter(|t| t.starts_with("balance."))
            .collect::<Vec<_>>()
    };
    for _ in 0..2 {
        let reply = app
            .post("/v1/clock/advance", json!({ "seconds": 32 * 86_400 }))
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(app.balance("cus").await["available"], "1000");
    }
    let change = app
        .put(
            "/v1/customers/cus/subscription",
            json!({ "id": "s2", "plan": "small" }),
        )
        .await;
    assert_eq!(change.status, StatusCode::OK, "{}", change.body);
    assert_eq!(app.balance("cus").await["available"], "1000");
    assert_eq!(alerts_sent().await, Vec::<String>::new());

    // 1,000 → 50 crosses both thresholds in one charge; 50 → 0 depletes.
    assert_eq!(app.charge("cus", "c1", "950").await.status, StatusCode::OK);
    assert_eq!(app.charge("cus", "c2", "50").await.status, StatusCode::OK);
    let mut sent = alerts_sent().await;
    sent.sort();
    assert_eq!(sent, ["balance.depleted", "balance.low", "balance.low"]);
}

/// A receiver's redirect is not a delivery: it is not followed (the signed
/// body and headers go to the endpoint's URL only) and the attempt is
/// recorded as the 3xx it was, to be retried; it was followed as a GET
/// without the body and logged `delivered` (a probe). And one endpoint
/// whose receiver hangs holds up no other endpoint: a second notification
/// reaches a quick receiver while the hung one's first attempt is still in
/// flight (it waited for that attempt's 10 s timeout).
#[tokio::test]
async fn a_redirect_is_not_a_delivery_and_a_hanging_receiver_holds_up_no_other() {
    use axum::response::IntoResponse;
    let app = TestApp::spawn_with(Options {
        manual_clock: true,
        ..Options::default()
    })
    .await;
    let landed = Arc::new(Mutex::new(0usize));
    let (release, released) = tokio::sync::watch::channel(false);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let receiver = axum::Router::new()
        .route(
            "/redirect",
            axum::routing::post(|| async {
                (
                    AxumStatus::FOUND,
                    [(axum::http::header::LOCATION, "/landing")],
                )
                    .into_response()
            }),
        )
        .route(
            "/landing",
            axum::routing::any({
                let landed = landed.clone();
                move || async move {
                    *landed.lock().unwrap() += 1;
                    AxumStatus::OK
                }
            }),
        )
        .route(
            "/hang",
            axum::routing::post(move || {
                let mut released = released.clone();
                async move {
                    let _ = released.wait_for(|done| *done).await;
                    AxumStatus::OK
                }
            }),
        );
    tokio::spawn(async move { axum::serve(listener, receiver).await.unwrap() });
    for (id, path) in [("redirected", "/redirect"), ("hung", "/hang")] {
        let endpoint = app
            .post(
                "/v1/webhook-endpoints",
                json!({ "id": id, "url": format!("{base}{path}"), "events": ["*"] }),
            )
            .await;
        assert_eq!(endpoint.status, StatusCode::OK, "{}", endpoint.body);
    }
    let good = accepting_endpoint(&app, "good", json!(["*"])).await;
    app.customer("cus").await;
    app.grant("cus", "g1", "100").await;
    let alerts = app
        .put(
            "/v1/customers/cus/alerts",
            json!({ "low_balance": ["90", "50"] }),
        )
        .await;
    assert_eq!(alerts.status, StatusCode::OK, "{}", alerts.body);
    let log = |endpoint: &'static str| {
        let app = &app;
        async move {
            let reply = app
                .get(&format!("/v1/webhook-endpoints/{endpoint}/deliveries"))
                .await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
            reply.body["data"].as_array().unwrap().clone()
        }
    };
    let received = |count: usize| {
        let good = good.clone();
        async move {
            for _ in 0..200 {
                if good.lock().unwrap().requests.len() >= count {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        }
    };
    app.charge("cus", "c1", "15").await; // balance.low at 90, to all three
    assert!(received(1).await, "the quick receiver got the first");
    app.charge("cus", "c2", "40").await; // balance.low at 50
    assert!(received(2).await, "the quick receiver got the second");
    // ...while the hung receiver's first attempt was still in flight: not
    // recorded yet (the old worker recorded it, failed, before it sent the
    // second anywhere).
    let hung = log("hung").await;
    let first = hung.last().expect("the hung endpoint's first delivery");
    assert_eq!(first["attempts"], 0, "{hung:?}");
    let mut redirected = log("redirected").await;
    for _ in 0..200 {
        if redirected.len() == 2 && redirected.iter().all(|d| d["attempts"] != 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        redirected = log("redirected").await;
    }
    assert_eq!(redirected.len(), 2, "{redirected:?}");
    for delivery in &redirected {
        assert_eq!(delivery["status"], "pending", "{delivery}");
        assert_eq!(delivery["last_status"], 302, "{delivery}");
    }
    assert_eq!(*landed.lock().unwrap(), 0, "the redirect was not followed");
    release.send(true).unwrap();
}

/// An endpoint can be read, changed and deleted (there was no way to fix a
/// URL or stop a dead endpoint, which cost 20 attempts for every event). A
/// new URL takes the pending deliveries; new types apply to notifications
/// made from then on; a deleted endpoint gets nothing more, its pending
/// deliveries fail saying why, and its id stays taken.
#[tokio::test]
async fn an_endpoint_is_changed_and_deleted() {
    let app = TestApp::spawn_with(Options {
        manual_clock: true,
        ..Options::default()
    })
    .await;
    let dead_url = nobody_listens();
    let created = app
        .post(
            "/v1/webhook-endpoints",
            json!({ "id": "wh", "url": dead_url, "events": ["balance.low"] }),
        )
        .await;
    assert_eq!(created.status, StatusCode::OK, "{}", created.body);
    let secret = created.str("secret").to_string();
    let one = app.get("/v1/webhook-endpoints/wh").await;
    assert_eq!(one.status, StatusCode::OK, "{}", one.body);
    assert_eq!(one.body["url"], dead_url.as_str());
    assert!(one.body.get("secret").is_none(), "{}", one.body);

    app.customer("cus").await;
    app.grant("cus", "g1", "100").await;
    let alerts = app
        .put("/v1/customers/cus/alerts", json!({ "low_balance": ["50"] }))
        .await;
    assert_eq!(alerts.status, StatusCode::OK);
    app.charge("cus", "c1", "60").await; // balance.low: pending, its receiver down
    let log = || async {
        let reply = app.get("/v1/webhook-endpoints/wh/deliveries").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        reply.body["data"].as_array().unwrap().clone()
    };
    for _ in 0..100 {
        if log().await.first().is_some_and(|d| d["attempts"] != 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(log().await[0]["status"], "pending");

    // Bad changes are refused and change nothing.
    for (body, param) in [
        (json!({ "url": "ftp://example.com/h" }), "url"),
        (json!({ "events": [] }), "events"),
        (json!({ "events": ["balance.lower"] }), "events"),
        (json!({ "secret": "x" }), "secret"),
        (json!({ "url": null }), "url"),
        (json!({ "events": null }), "events"),
    ] {
        let reply = app
            .send(
                Method::PATCH,
                "/v1/webhook-endpoints/wh",
                Some(ADMIN_KEY),
                Some(&body),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{body}: {}",
            reply.body
        );
        assert_eq!(reply.body["error"]["param"], param, "{}", reply.body);
    }
    let missing = app
        .send(
            Method::PATCH,
            "/v1/webhook-endpoints/nope",
            Some(ADMIN_KEY),
            Some(&json!({})),
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND, "{}", missing.body);

    // The receiver comes back at another address: the pending delivery goes there.
    let received = Arc::new(Mutex::new(Received {
        always_accept: true,
        secret,
        ..Received::default()
    }));
    let url = start_receiver(received.clone()).await;
    let changed = app
        .send(
            Method::PATCH,
            "/v1/webhook-endpoints/wh",
            Some(ADMIN_KEY),
            Some(&json!({ "url": url, "events": ["balance.low", "balance.depleted"] })),
        )
        .await;
    assert_eq!(changed.status, StatusCode::OK, "{}", changed.body);
    assert_eq!(changed.body["url"], url.as_str());
    assert_eq!(
        changed.body["events"],
        json!(["balance.depleted", "balance.low"])
    );
    app.advance(3_600).await; // its retry is due
    for _ in 0..100 {
        if !received.lock().unwrap().requests.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(received.lock().unwrap().requests.len(), 1);
    for _ in 0..100 {
        if log().await[0]["status"] == "delivered" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(log().await[0]["status"], "delivered");

    // Deleted: nothing more goes to it.
    let deleted = app
        .send(
            Method::DELETE,
            "/v1/webhook-endpoints/wh",
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(deleted.status, StatusCode::OK, "{}", deleted.body);
    assert_eq!(
        app.get("/v1/webhook-endpoints/wh").await.status,
        StatusCode::NOT_FOUND
    );
    let listed = app.get("/v1/webhook-endpoints").await;
    assert_eq!(listed.body["data"], json!([]), "{}", listed.body);
    app.charge("cus", "c2", "40").await; // balance.depleted: no endpoint wants it now
    let again = app
        .send(
            Method::DELETE,
            "/v1/webhook-endpoints/wh",
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND, "{}", again.body);
    let reused = app
        .post(
            "/v1/webhook-endpoints",
            json!({ "id": "wh", "url": url, "events": ["*"] }),
        )
        .await;
    assert_eq!(reused.status, StatusCode::CONFLICT, "{}", reused.body);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        received.lock().unwrap().requests.len(),
        1,
        "nothing after the delete"
    );
}

/// A lot whose credits are all held when it expires expires 0: its entry
/// names it all the same. The credits the hold then gives back expire as
/// they come back, and `grant.expired` tells them too, so that its amounts
/// add up to every credit that expired (it said 0, and nothing more).
#[tokio::test]
async fn credits_a_hold_returns_to_an_expired_lot_are_told_as_expired() {
    let app = TestApp::spawn_with(Options {
        manual_clock: true,
        ..Options::default()
    })
    .await;
    let received = accepting_endpoint(&app, "exp", json!(["grant.expired"])).await;
    let moved = app
        .post("/v1/clock/advance", json!({ "to": "2030-01-01T00:00:00Z" }))
        .await;
    assert_eq!(moved.status, StatusCode::OK, "{}", moved.body);
    app.customer("c").await;
    let grant = app
        .post(
            "/v1/customers/c/grants",
            json!({ "id": "a", "amount": "10", "source": "promotion", "paid": false,
                    "expires_at": "2030-01-01T01:00:00Z" }),
        )
        .await;
    assert_eq!(grant.status, StatusCode::OK, "{}", grant.body);
    let hold = app
        .post(
            "/v1/holds",
            json!({ "id": "h", "customer_id": "c", "amount": "10", "timeout_seconds": 86_400 }),
        )
        .await;
    assert_eq!(hold.status, StatusCode::OK, "{}", hold.body);
    let moved = app
        .post("/v1/clock/advance", json!({ "to": "2030-01-01T02:00:00Z" }))
        .await;
    assert_eq!(moved.status, StatusCode::OK, "{}", moved.body);
    let ledger = app.ledger_all("c").await;
    let expire = ledger
        .iter()
        .find(|e| e["kind"] == "expire")
        .expect("an expire entry");
    assert_eq!(expire["amount"], "0", "{expire}");
    assert_eq!(expire["grant_ids"], json!(["a"]), "{expire}");
    let released = app.post("/v1/holds/h/release", json!({})).await;
    assert_eq!(released.status, StatusCode::OK, "{}", released.body);
    wait_until!(
        Duration::from_secs(10),
        "two grant.expired deliveries",
        received.lock().unwrap().requests.len() >= 2
    );
    let mut amounts: Vec<String> = received
        .lock()
        .unwrap()
        .requests
        .iter()
        .map(|(_, body, _)| serde_json::from_str::<Value>(body).unwrap())
        .inspect(|b| assert_eq!(b["data"]["grant_id"], "a", "{b}"))
        .map(|b| b["data"]["amount"].as_str().unwrap().to_string())
        .collect();
    amounts.sort(); // deliveries may come in either order
    assert_eq!(amounts, ["0", "10"]);
}

/// The `Tally-Signature` and body of every delivery received.
type Signatures = Arc<Mutex<Vec<(String, String)>>>;

/// Every delivery's `Tally-Signature` and body, answered 200.
async fn record_signatures(
    State(seen): State<Signatures>,
    headers: HeaderMap,
    body: String,
) -> AxumStatus {
    let signature = headers
        .get("tally-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    seen.lock().unwrap().push((signature, body));
    AxumStatus::OK
}

/// The `v1` signatures of a `Tally-Signature` that verify under `secret`,
/// and how many `v1` it has in all.
fn verified_under(signature: &str, body: &str, secret: &str) -> (usize, usize) {
    let mut parts = signature.split(',');
    let t = parts.next().and_then(|p| p.strip_prefix("t=")).unwrap();
    let (mut valid, mut all) = (0, 0);
    for part in parts {
        let v1 = part.strip_prefix("v1=").unwrap();
        all += 1;
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.{body}").as_bytes());
        if hex::decode(v1).is_ok_and(|sig| mac.verify_slice(&sig).is_ok()) {
            valid += 1;
        }
    }
    (valid, all)
}

/// One `balance.depleted` (a credit granted, then charged): its delivery's
/// signature and body.
async fn deplete(app: &TestApp, seen: &Signatures, round: usize) -> (String, String) {
    app.grant("c", &format!("g{round}"), "1").await;
    let reply = app.charge("c", &format!("ch{round}"), "1").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    wait_until!(
        Duration::from_secs(20),
        "the delivery",
        seen.lock().unwrap().len() >= round
    );
    seen.lock().unwrap()[round - 1].clone()
}

/// A rotated secret signs every delivery from then on, and the one before
/// signs beside it (a second `v1`) until its time is up on the engine's
/// clock; a retry of the rotation gets the same new secret and rotates
/// nothing again.
#[tokio::test]
async fn a_webhook_secret_rotates_with_the_old_one_valid_for_a_while() {
    let app = TestApp::spawn_with(Options {
        manual_clock: true,
        ..Options::default()
    })
    .await;
    let seen: Signatures = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let receiver = axum::Router::new()
        .route("/hook", axum::routing::post(record_signatures))
        .with_state(seen.clone());
    tokio::spawn(async move { axum::serve(listener, receiver).await.unwrap() });
    let endpoint = app
        .post(
            "/v1/webhook-endpoints",
            json!({ "id": "wh", "url": url, "events": ["balance.depleted"] }),
        )
        .await;
    assert_eq!(endpoint.status, StatusCode::OK, "{}", endpoint.body);
    let old = endpoint.str("secret").to_owned();
    assert!(endpoint.body["previous_secret_expires_at"].is_null());
    app.customer("c").await;
    let (signature, body) = deplete(&app, &seen, 1).await;
    assert_eq!(
        verified_under(&signature, &body, &old),
        (1, 1),
        "{signature}"
    );

    let rotate = json!({ "id": "rot1", "previous_valid_seconds": 3600 });
    let rotated = app
        .post("/v1/webhook-endpoints/wh/rotate-secret", rotate.clone())
        .await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.body);
    let new = rotated.str("secret").to_owned();
    assert!(new.starts_with("whsec_") && new != old, "{new}");
    let until = rotated.str("previous_secret_expires_at").to_owned();
    // A retry: the same secret, nothing rotated again.
    let again = app
        .post("/v1/webhook-endpoints/wh/rotate-secret", rotate)
        .await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert!(again.replayed());
    assert_eq!(again.str("secret"), new);
    let other = app
        .post(
            "/v1/webhook-endpoints/wh/rotate-secret",
            json!({ "id": "rot1", "previous_valid_seconds": 60 }),
        )
        .await;
    assert_eq!(other.status, StatusCode::CONFLICT, "{}", other.body);
    let read = app.get("/v1/webhook-endpoints/wh").await;
    assert_eq!(read.body["previous_secret_expires_at"], until.as_str());
    assert!(read.body.get("secret").is_none(), "{}", read.body);

    // Both sign now: a receiver on either secret accepts it.
    let (signature, body) = deplete(&app, &seen, 2).await;
    assert_eq!(
        verified_under(&signature, &body, &new),
        (1, 2),
        "{signature}"
    );
    assert_eq!(
        verified_under(&signature, &body, &old),
        (1, 2),
        "{signature}"
    );
    // An hour on, only the new one.
    app.advance(3601).await;
    let read = app.get("/v1/webhook-endpoints/wh").await;
    assert!(
        read.body["previous_secret_expires_at"].is_null(),
        "{}",
        read.body
    );
    let (signature, body) = deplete(&app, &seen, 3).await;
    assert_eq!(
        verified_under(&signature, &body, &new),
        (1, 1),
        "{signature}"
    );
    assert_eq!(
        verified_under(&signature, &body, &old),
        (0, 1),
        "{signature}"
    );

    // Bad input changes nothing; an unknown endpoint is a 404.
    for (body, param) in [
        (
            json!({ "id": "r2", "previous_valid_seconds": 604_801 }),
            "previous_valid_seconds",
        ),
        (
            json!({ "id": "r2", "previous_valid_seconds": -1 }),
            "previous_valid_seconds",
        ),
        (
            json!({ "id": "r2", "previous_valid_seconds": 1.5 }),
            "previous_valid_seconds",
        ),
        (json!({ "previous_valid_seconds": 1 }), "id"),
    ] {
        let reply = app
            .post("/v1/webhook-endpoints/wh/rotate-secret", body.clone())
            .await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{body}: {}",
            reply.body
        );
        assert_eq!(reply.body["error"]["param"], param, "{}", reply.body);
    }
    let missing = app
        .post(
            "/v1/webhook-endpoints/nope/rotate-secret",
            json!({ "id": "r3" }),
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND, "{}", missing.body);
    // At once: the old secret stops with the rotation.
    let now = app
        .post(
            "/v1/webhook-endpoints/wh/rotate-secret",
            json!({ "id": "r4", "previous_valid_seconds": 0 }),
        )
        .await;
    assert_eq!(now.status, StatusCode::OK, "{}", now.body);
    assert!(now.body["previous_secret_expires_at"].is_null());
    let newest = now.str("secret").to_owned();
    let (signature, body) = deplete(&app, &seen, 4).await;
    assert_eq!(
        verified_under(&signature, &body, &newest),
        (1, 1),
        "{signature}"
    );
}

/// A webhook URL is taken only as written: forms a URL parser repairs into
/// another URL (`http:x` into `http://x/`) and port 0 are refused.
#[tokio::test]
async fn webhook_urls_are_taken_only_as_written() {
    let app = TestApp::spawn().await;
    for (n, url) in [
        "http:x",
        "http:///x",
        "https:\\\\evil.com",
        "http:/127.0.0.1:18311/",
        "http://127.0.0.1:0/",
        "http://exa mple.com/",
    ]
    .into_iter()
    .enumerate()
    {
        let reply = app
            .post(
                "/v1/webhook-endpoints",
                json!({ "id": format!("u{n}"), "url": url, "events": ["*"] }),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{url}: {}",
            reply.body
        );
        assert_eq!(reply.body["error"]["param"], "url");
    }
    let fine = app
        .post(
            "/v1/webhook-endpoints",
            json!({ "id": "ok", "url": "HTTPS://example.com:8443/hook?x=1", "events": ["*"] }),
        )
        .await;
    assert_eq!(fine.status, StatusCode::OK, "{}", fine.body);
    assert_eq!(fine.str("url"), "https://example.com:8443/hook?x=1");
}

/// The alert settings read back as they were set, and as none before.
#[tokio::test]
async fn alert_settings_read_back() {
    let app = TestApp::spawn().await;
    app.customer("a").await;
    let none = app.get("/v1/customers/a/alerts").await;
    assert_eq!(none.status, StatusCode::OK, "{}", none.body);
    assert_eq!(
        none.body,
        json!({ "customer_id": "a", "low_balance": [], "grant_expiring_days": null })
    );
    let set = app
        .put(
            "/v1/customers/a/alerts",
            json!({ "low_balance": ["50", "5.5"], "grant_expiring_days": 7 }),
        )
        .await;
    assert_eq!(set.status, StatusCode::OK, "{}", set.body);
    let read = app.get("/v1/customers/a/alerts").await;
    assert_eq!(read.body, set.body);
    assert_eq!(read.body["low_balance"], json!(["5.5", "50"]));
    let ghost = app.get("/v1/customers/ghost/alerts").await;
    assert_eq!(ghost.status, StatusCode::NOT_FOUND, "{}", ghost.body);
}

/// A live stream ends once its key is revoked: it used to go on sending the
/// customer's balance changes for as long as the connection lasted.
#[tokio::test]
async fn a_live_stream_ends_when_its_key_is_revoked() {
    let app = TestApp::spawn().await;
    app.customer("s").await;
    app.grant("s", "g", "10").await;
    let key = app
        .post("/v1/api-keys", json!({ "id": "watcher", "scope": "read" }))
        .await;
    assert_eq!(key.status, StatusCode::OK, "{}", key.body);
    let key = key.str("key").to_owned();
    let mut response = app
        .client
        .get(app.url("/v1/customers/s/stream"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let first = response.chunk().await.unwrap().expect("the balance event");
    assert!(String::from_utf8_lossy(&first).contains("event: balance"));
    let revoked = app
        .send(
            reqwest::Method::DELETE,
            "/v1/api-keys/watcher",
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.body);
    // Changes keep coming; the stream must end all the same.
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        let mut n = 0;
        loop {
            n += 1;
            app.charge("s", &format!("c{n}"), "0.01").await;
            match tokio::time::timeout(Duration::from_millis(500), response.chunk()).await {
                Ok(Ok(None)) | Ok(Err(_)) => return,
                _ => {}
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the stream went on 30 s after its key was revoked"
    );
}
