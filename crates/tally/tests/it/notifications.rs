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
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::support::{Options, TestApp, ADMIN_KEY};

#[derive(Default)]
struct Received {
    /// Every request: (delivery id, body, answered with success).
    requests: Vec<(String, String, bool)>,
    /// Attempts to fail before succeeding, per delivery id.
    failures_left: HashMap<String, u32>,
    secret: String,
    bad_signatures: usize,
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

async fn start_receiver(received: Arc<Mutex<Received>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(received);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{address}/hook")
}

async fn put(app: &TestApp, path: &str, body: Value) -> crate::support::Reply {
    app.send(Method::PUT, path, Some(ADMIN_KEY), Some(&body))
        .await
}

#[tokio::test]
async fn webhooks_are_signed_retried_and_delivered_once_per_delivery_id() {
    let app = TestApp::spawn_with(Options {
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

    put(
        &app,
        "/v1/plans/pro",
        json!({ "name": "Pro", "period": { "days": 30 }, "included_credits": "0" }),
    )
    .await;
    app.customer("cus").await;
    let alerts = put(
        &app,
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
    let sub = put(
        &app,
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
    for _ in 0..600 {
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
    assert!(
        delivered
            .iter()
            .all(|(_, d)| d["attempts"].as_i64().unwrap() >= 2),
        "every delivery failed at least once and was retried"
    );
    let received = received.lock().unwrap();
    assert_eq!(received.bad_signatures, 0);
    // Per delivery id: one success, and every attempt carried the same body.
    let mut by_id: HashMap<&str, Vec<&(String, String, bool)>> = HashMap::new();
    for request in &received.requests {
        by_id.entry(request.0.as_str()).or_default().push(request);
    }
    assert_eq!(by_id.len(), expected.len());
    for (id, attempts) in &by_id {
        assert_eq!(
            attempts.iter().filter(|a| a.2).count(),
            1,
            "{id} succeeded once"
        );
        assert!(
            attempts.iter().all(|a| a.1 == attempts[0].1),
            "{id}: same body on retries"
        );
        let body: Value = serde_json::from_str(&attempts[0].1).unwrap();
        assert!(body["id"].as_str().unwrap().starts_with("evt_"));
        assert_eq!(body["customer_id"], "cus");
        assert!(attempts.iter().all(|a| a.0 == *id));
    }
    let lows: Vec<String> = received
        .requests
        .iter()
        .filter(|r| r.2)
        .map(|r| serde_json::from_str::<Value>(&r.1).unwrap())
        .filter(|b| b["type"] == "balance.low")
        .map(|b| b["data"]["threshold"].as_str().unwrap().to_string())
        .collect();
    let mut lows = lows;
    lows.sort();
    assert_eq!(lows, ["10", "100"]);
}

/// Read server-sent events from a raw connection until `want` events of
/// type `balance.changed` arrived (or the first `balance` when `want` is 0).
async fn read_events(
    lines: &mut tokio::io::Lines<BufReader<tokio::net::TcpStream>>,
    want_changes: usize,
) -> Vec<(String, Value)> {
    let mut events = Vec::new();
    let mut kind = String::new();
    let mut changes = 0;
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await
    {
        if let Some(k) = line.strip_prefix("event: ") {
            kind = k.to_string();
        } else if let Some(data) = line.strip_prefix("data: ") {
            events.push((kind.clone(), serde_json::from_str(data).unwrap()));
            if kind == "balance.changed" {
                changes += 1;
            }
            if changes >= want_changes && (want_changes > 0 || kind == "balance") {
                return events;
            }
        }
    }
    panic!("the stream ended early after {events:?}");
}

#[tokio::test]
async fn the_live_stream_shows_every_balance_change_of_its_customer() {
    let app = TestApp::spawn().await;
    app.customer("live").await;
    app.customer("other").await;
    app.grant("live", "g1", "100").await;
    let address = app.base.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let request = format!(
        "GET /v1/customers/live/stream HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {ADMIN_KEY}\r\nAccept: text/event-stream\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut lines = BufReader::new(stream).lines();
    let first = read_events(&mut lines, 0).await;
    assert_eq!(first.last().unwrap().0, "balance");
    assert_eq!(first.last().unwrap().1["available"], "100");
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
    let changes = read_events(&mut lines, 2).await;
    let changes: Vec<&Value> = changes
        .iter()
        .filter(|(k, _)| k == "balance.changed")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(changes.len(), 2);
    assert_eq!(changes[0]["kind"], "charge");
    assert_eq!(changes[0]["balance_after"], "70");
    assert_eq!(changes[1]["balance_after"], "50");
    assert!(changes[0]["entry_id"].as_str().unwrap().starts_with("ent_"));
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
    for body in bad_alerts {
        let reply = put(&app, "/v1/customers/cus/alerts", body.clone()).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{body}: {}",
            reply.body
        );
    }
    let reply = put(
        &app,
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
    for body in bad_endpoints {
        let reply = app.post("/v1/webhook-endpoints", body.clone()).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{body}: {}",
            reply.body
        );
    }
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
