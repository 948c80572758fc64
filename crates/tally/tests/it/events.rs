//! Usage events over HTTP: batches, late events, dead letters (API and CLI),
//! Pub/Sub push and backpressure.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::support::{assert_replayable, micros, Options, Reply, TestApp, ADMIN_KEY};

/// Features `api` (0.5 per call) and `ai` (6 per message on plan pro only),
/// version v1 published now, customer `c1` (plan pro) with 100 credits.
async fn priced_app(options: Options) -> TestApp {
    let app = TestApp::spawn_with(options).await;
    app.features(&["api", "ai"]).await;
    app.publish_version(
        "v1",
        json!([
            { "feature": "api", "credits_per_unit": "0.5" },
            { "feature": "ai", "plan": "pro", "credits_per_unit": "6" },
        ]),
        None,
    )
    .await;
    let reply = app
        .post("/v1/customers", json!({ "id": "c1", "plan": "pro" }))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    app.grant("c1", "g1", "100").await;
    app
}

async fn events(app: &TestApp, events: Value) -> Vec<Value> {
    let reply = app.post("/v1/events", json!({ "events": events })).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    reply.body["results"].as_array().expect("results").clone()
}

async fn available(app: &TestApp, customer: &str) -> i64 {
    micros(app.balance(customer).await["available"].as_str().unwrap())
}

async fn dead_letters(app: &TestApp, query: &str) -> Vec<Value> {
    let reply = app.get(&format!("/v1/dead-letters?{query}")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    reply.body["data"].as_array().expect("data").clone()
}

fn statuses(results: &[Value]) -> Vec<(String, String)> {
    results
        .iter()
        .map(|r| {
            (
                r["status"].as_str().unwrap().to_string(),
                r["error"]["code"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_batch_charges_each_event_once_and_keeps_the_bad_ones() {
    let app = priced_app(Options::default()).await;
    app.customer("free").await; // no plan: `ai` has no price for it
    app.grant("free", "gf", "1").await;
    let batch = json!([
        { "id": "e1", "customer_id": "c1", "feature": "api", "quantity": 3 },
        { "id": "e1", "customer_id": "c1", "feature": "api", "quantity": 3 },
        { "id": "e2", "customer_id": "c1", "feature": "ai", "quantity": "2" },
        "not an object",
        { "id": "e3", "customer_id": "c1", "feature": "api" },
        { "id": "e4", "customer_id": "c1", "feature": "api", "quantity": "0.0000001" },
        { "id": "e5", "customer_id": "nobody", "feature": "api", "quantity": 1 },
        { "id": "e6", "customer_id": "c1", "feature": "nope", "quantity": 1 },
        { "id": "e7", "customer_id": "free", "feature": "ai", "quantity": 1 },
        { "id": "e8", "customer_id": "c1", "feature": "api", "quantity": 1, "timestamp": "2001-01-01T00:00:00Z" },
        { "id": "e9", "customer_id": "c1", "feature": "api", "quantity": 1, "timestamp": "2999-01-01T00:00:00Z" },
        { "id": "e10", "customer_id": "c1", "feature": "api", "quantity": 1000 },
        { "id": "e11", "customer_id": "c1", "feature": "api", "quantity": 0.5, "properties": { "model": "x" } },
    ]);
    let results = events(&app, batch.clone()).await;
    let expected: Vec<(&str, &str)> = vec![
        ("charged", ""),
        ("duplicate", ""),
        ("charged", ""),
        ("rejected", "invalid_event"),
        ("rejected", "invalid_event"),
        ("rejected", "invalid_event"),
        ("rejected", "not_found"),
        ("rejected", "unknown_feature"),
        ("rejected", "no_price"),
        ("rejected", "event_too_old"),
        ("rejected", "event_in_future"),
        ("rejected", "insufficient_credits"),
        ("charged", ""),
    ];
    let expected: Vec<(String, String)> = expected
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(statuses(&results), expected, "{results:?}");
    // Costs: 3 × 0.5 = 1.5; 2 × 6 = 12 (plan pro); 0.5 × 0.5 = 0.25.
    assert_eq!(results[0]["cost"], "1.5");
    assert_eq!(results[0]["rule"], "v1 rule 0");
    let mut original = results[0].clone();
    original["status"] = json!("duplicate");
    assert_eq!(
        results[1], original,
        "a duplicate answers the original result"
    );
    assert_eq!(results[2]["cost"], "12");
    assert_eq!(results[12]["cost"], "0.25");
    assert_eq!(results[12]["balance_after"], "86.25");
    assert_eq!(available(&app, "c1").await, micros("86.25"));
    assert_eq!(available(&app, "free").await, micros("1"));
    let ledger = app.ledger_all("c1").await;
    assert_eq!(ledger.len(), 4, "one grant and three charges: {ledger:?}");
    assert_replayable(&ledger);

    // Every rejected event is a dead letter with its reason, once.
    let letters = dead_letters(&app, "status=pending").await;
    let mut codes: Vec<(Option<String>, String)> = letters
        .iter()
        .map(|l| {
            assert_eq!(l["source"], "http");
            assert_eq!(l["attempts"], 1);
            (
                l["event_id"].as_str().map(str::to_owned),
                l["code"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    codes.sort();
    let mut want: Vec<(Option<String>, String)> = vec![
        (None, "invalid_event".into()),
        (Some("e3".into()), "invalid_event".into()),
        (Some("e4".into()), "invalid_event".into()),
        (Some("e5".into()), "not_found".into()),
        (Some("e6".into()), "unknown_feature".into()),
        (Some("e7".into()), "no_price".into()),
        (Some("e8".into()), "event_too_old".into()),
        (Some("e9".into()), "event_in_future".into()),
        (Some("e10".into()), "insufficient_credits".into()),
    ];
    want.sort();
    assert_eq!(codes, want);

    // The whole batch again: the charged ones are duplicates with their first
    // result, the bad ones are refused again and counted, nothing moves.
    let again = events(&app, batch).await;
    for (first, second) in results.iter().zip(&again) {
        if first["status"] != "rejected" {
            assert_eq!(second["status"], "duplicate");
            assert_eq!(second["cost"], first["cost"]);
            assert_eq!(second["entry_id"], first["entry_id"]);
        } else {
            assert_eq!(second["status"], "rejected");
            assert_eq!(second["error"]["code"], first["error"]["code"]);
        }
    }
    assert_eq!(available(&app, "c1").await, micros("86.25"));
    let letters = dead_letters(&app, "status=pending").await;
    assert_eq!(letters.len(), 9);
    assert!(letters.iter().all(|l| l["attempts"] == 2), "{letters:?}");

    // Too many events, or not a batch: 400, nothing applied.
    let many: Vec<Value> = (0..10_001)
        .map(|n| json!({ "id": format!("m{n}"), "customer_id": "c1", "feature": "api", "quantity": 1 }))
        .collect();
    let reply = app.post("/v1/events", json!({ "events": many })).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    let reply = app.post("/v1/events", json!({ "event": [] })).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(available(&app, "c1").await, micros("86.25"));

    // An event's charge is refunded by the event's id, at most once.
    let refund = json!({ "id": "rf_e2", "charge_id": "e2", "reason": "the answer was wrong" });
    let reply = app.post("/v1/refunds", refund.clone()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["amount"], "12");
    let again = app
        .post(
            "/v1/refunds",
            json!({ "id": "rf_e2b", "charge_id": "e2", "reason": "twice" }),
        )
        .await;
    assert_eq!(again.code(), "refund_exceeds_charge", "{}", again.body);
    assert_eq!(available(&app, "c1").await, micros("98.25"));
    assert_replayable(&app.ledger_all("c1").await);
}

#[tokio::test]
async fn events_are_priced_at_their_own_timestamp() {
    let app = priced_app(Options {
        manual_clock: true,
        extra_args: vec!["--event-window-seconds".into(), "86400".into()],
    })
    .await;
    let clock = |reply: Reply| reply.body["now"].as_str().unwrap().to_string();
    let start = clock(app.get("/v1/clock").await);
    // v2 doubles the price of `api` from one hour after start.
    let in_one_hour = clock(app.post("/v1/clock/advance", json!({ "seconds": 0 })).await);
    assert_eq!(in_one_hour, start);
    let later = time_plus(&start, 3600);
    app.publish_version(
        "v2",
        json!([
            { "feature": "api", "credits_per_unit": "1" },
            { "feature": "ai", "plan": "pro", "credits_per_unit": "6" },
        ]),
        Some(&later),
    )
    .await;
    let reply = app
        .post("/v1/clock/advance", json!({ "seconds": 7200 }))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let results = events(
        &app,
        json!([
            // Happened 90 minutes ago, before v2: priced by v1.
            { "id": "late", "customer_id": "c1", "feature": "api", "quantity": 2, "timestamp": time_plus(&start, 1800) },
            // Exactly at v2's effective_at.
            { "id": "edge", "customer_id": "c1", "feature": "api", "quantity": 2, "timestamp": later },
            // Now.
            { "id": "now", "customer_id": "c1", "feature": "api", "quantity": 2 },
            // Older than the window of one day.
            { "id": "old", "customer_id": "c1", "feature": "api", "quantity": 2, "timestamp": time_plus(&start, -86_400) },
        ]),
    )
    .await;
    let got: Vec<(Value, Value)> = results
        .iter()
        .map(|r| (r["cost"].clone(), r["pricebook"].clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (json!("1"), json!("v1")),
            (json!("2"), json!("v2")),
            (json!("2"), json!("v2")),
            (Value::Null, Value::Null),
        ]
    );
    assert_eq!(results[3]["error"]["code"], "event_too_old");
    assert_eq!(available(&app, "c1").await, micros("95"));
}

/// `at` moved by `seconds` (RFC 3339, UTC, as the API writes instants).
fn time_plus(at: &str, seconds: i64) -> String {
    let format = time::format_description::well_known::Rfc3339;
    let parsed = time::OffsetDateTime::parse(at, &format).expect("rfc3339");
    (parsed + time::Duration::seconds(seconds))
        .format(&format)
        .expect("format")
}

#[tokio::test]
async fn dead_letters_replay_once_the_cause_is_fixed() {
    let app = priced_app(Options::default()).await;
    let results = events(
        &app,
        json!([
            { "id": "a", "customer_id": "later", "feature": "api", "quantity": 4 },
            { "id": "b", "customer_id": "c1", "feature": "soon", "quantity": 1 },
            { "id": "c", "customer_id": "c1", "feature": "nope", "quantity": 1 },
            { "id": "d", "customer_id": "c1", "feature": "nope2", "quantity": 1 },
        ]),
    )
    .await;
    assert!(results.iter().all(|r| r["status"] == "rejected"));
    let letters = dead_letters(&app, "").await;
    let id_of = |event: &str| {
        letters
            .iter()
            .find(|l| l["event_id"] == event)
            .unwrap_or_else(|| panic!("no dead letter for {event}"))["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (a, b, c, d) = (id_of("a"), id_of("b"), id_of("c"), id_of("d"));

    // Replaying before the fix: rejected again, still pending, counted.
    let replay = app
        .post(&format!("/v1/dead-letters/{a}/replay"), json!({}))
        .await;
    assert_eq!(replay.status, StatusCode::OK, "{}", replay.body);
    assert_eq!(replay.body["result"]["status"], "rejected");
    assert_eq!(replay.body["dead_letter"]["status"], "pending");
    assert_eq!(replay.body["dead_letter"]["attempts"], 2);

    // Fix: the customer exists and has credits; the replay charges it once.
    app.customer("later").await;
    app.grant("later", "gl", "10").await;
    let replay = app
        .post(&format!("/v1/dead-letters/{a}/replay"), json!({}))
        .await;
    assert_eq!(
        replay.body["result"]["status"], "charged",
        "{}",
        replay.body
    );
    assert_eq!(replay.body["result"]["cost"], "2");
    assert_eq!(replay.body["dead_letter"]["status"], "replayed");
    let again = app
        .post(&format!("/v1/dead-letters/{a}/replay"), json!({}))
        .await;
    assert_eq!(
        again.body["result"]["status"], "duplicate",
        "{}",
        again.body
    );
    assert_eq!(available(&app, "later").await, micros("8"));

    // Fix the feature of `b`, then the event itself is sent again by its
    // producer: the charge settles the dead letter too.
    app.features(&["soon"]).await;
    app.publish_version(
        "v2",
        json!([
            { "feature": "api", "credits_per_unit": "0.5" },
            { "feature": "ai", "plan": "pro", "credits_per_unit": "6" },
            { "feature": "soon", "credits_per_unit": "3" },
        ]),
        None,
    )
    .await;
    let results = events(
        &app,
        json!([{ "id": "b", "customer_id": "c1", "feature": "soon", "quantity": 1 }]),
    )
    .await;
    assert_eq!(results[0]["status"], "charged");
    let letter = app.get(&format!("/v1/dead-letters/{b}")).await;
    assert_eq!(letter.body["status"], "replayed", "{}", letter.body);

    // Discard `c`: it stays listed as discarded and cannot be replayed.
    let discarded = app
        .post(
            &format!("/v1/dead-letters/{c}/discard"),
            json!({ "note": "test data" }),
        )
        .await;
    assert_eq!(discarded.status, StatusCode::OK, "{}", discarded.body);
    assert_eq!(discarded.body["status"], "discarded");
    let replay = app
        .post(&format!("/v1/dead-letters/{c}/replay"), json!({}))
        .await;
    assert_eq!(replay.status, StatusCode::CONFLICT);
    assert_eq!(replay.code(), "dead_letter_resolved");
    let pending: Vec<String> = dead_letters(&app, "status=pending")
        .await
        .iter()
        .map(|l| l["event_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(pending, vec!["d".to_string()]);
    assert_eq!(dead_letters(&app, "status=all").await.len(), 4);
    assert_eq!(dead_letters(&app, "status=discarded").await.len(), 1);
    let bad = app.get("/v1/dead-letters?status=lost").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let missing = app.get("/v1/dead-letters/dl_999").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);

    // The CLI lists and replays through the API.
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .arg("dead-letters")
            .args(args)
            .args(["--url", &app.base, "--key", ADMIN_KEY])
            .output()
            .expect("run tally dead-letters");
        assert!(
            output.status.success(),
            "tally dead-letters {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let listed = cli(&["list"]);
    assert!(
        listed.contains(&d) && listed.contains("unknown_feature"),
        "{listed}"
    );
    assert!(!listed.contains(&a), "{listed}");
    let replayed = cli(&["replay", "--all"]);
    assert!(
        replayed.contains(&format!("{d}\trejected\tunknown_feature")),
        "{replayed}"
    );
    let letter = app.get(&format!("/v1/dead-letters/{d}")).await;
    assert_eq!(letter.body["attempts"], 2);
    assert_replayable(&app.ledger_all("c1").await);
}

#[tokio::test]
async fn pubsub_push_charges_once_and_checks_its_token() {
    let app = priced_app(Options {
        extra_args: vec!["--pubsub-token".into(), "s3cret".into()],
        ..Options::default()
    })
    .await;
    use base64::Engine;
    let envelope = |event: &str| {
        json!({
            "message": {
                "data": base64::engine::general_purpose::STANDARD.encode(event),
                "attributes": { "origin": "test" },
                "messageId": "m-1",
            },
            "subscription": "projects/p/subscriptions/tally",
        })
    };
    let push = |token: &str, body: Value| {
        let request = app
            .client
            .post(app.url(&format!("/v1/ingest/pubsub?token={token}")))
            .json(&body);
        Reply::of(request, "/v1/ingest/pubsub")
    };
    let event = r#"{"id":"p1","customer_id":"c1","feature":"api","quantity":4}"#;
    let reply = push("s3cret", envelope(event)).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.body);
    // Pub/Sub delivers at least once: the redelivery is not charged again.
    let reply = push("s3cret", envelope(event)).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert_eq!(available(&app, "c1").await, micros("98"));
    // A wrong token: 401, nothing done.
    let other = r#"{"id":"p2","customer_id":"c1","feature":"api","quantity":4}"#;
    let reply = push("wrong", envelope(other)).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(available(&app, "c1").await, micros("98"));
    // Data that is not an event, and an envelope without data: acknowledged
    // (so Pub/Sub does not redeliver them forever) and kept as dead letters.
    let reply = push("s3cret", envelope("{not json")).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    let reply = push("s3cret", json!({ "message": {} })).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    let letters = dead_letters(&app, "source=pubsub").await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(letters.iter().all(|l| l["code"] == "invalid_event"));
    assert_eq!(available(&app, "c1").await, micros("98"));

    // A server without --pubsub-token has no push endpoint.
    let plain = TestApp::spawn().await;
    let request = plain
        .client
        .post(plain.url("/v1/ingest/pubsub?token=s3cret"))
        .json(&envelope(event));
    let reply = Reply::of(request, "/v1/ingest/pubsub").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_saturated_engine_answers_503_and_applies_nothing() {
    let app = priced_app(Options {
        extra_args: vec!["--max-in-flight".into(), "5".into()],
        ..Options::default()
    })
    .await;
    let batch = |n: usize, prefix: &str| -> Value {
        (0..n)
            .map(|i| json!({ "id": format!("{prefix}{i}"), "customer_id": "c1", "feature": "api", "quantity": 1 }))
            .collect()
    };
    // A batch that could never fit is a client error, not a reason to retry.
    let reply = app
        .post("/v1/events", json!({ "events": batch(6, "x") }))
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(available(&app, "c1").await, micros("100"));

    // 100 batches of 5 at once against room for 5: some are turned away with
    // 503 and Retry-After, having applied nothing; the others are charged.
    let replies = futures_util::future::join_all((0..100).map(|b| {
        let body = json!({ "events": batch(5, &format!("b{b}_")) });
        app.post("/v1/events", body)
    }))
    .await;
    let mut accepted = 0;
    let mut refused = 0;
    for reply in &replies {
        match reply.status {
            StatusCode::OK => {
                let results = reply.body["results"].as_array().unwrap();
                assert!(
                    results.iter().all(|r| r["status"] == "charged"),
                    "{}",
                    reply.body
                );
                accepted += 1;
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(reply.code(), "overloaded");
                assert_eq!(
                    reply
                        .headers
                        .get("retry-after")
                        .map(|v| v.to_str().unwrap()),
                    Some("1")
                );
                refused += 1;
            }
            other => panic!("unexpected {other}: {}", reply.body),
        }
    }
    assert!(
        refused > 0,
        "no batch was turned away ({accepted} accepted)"
    );
    // Exactly the accepted batches moved the balance: 5 × 0.5 each.
    assert_eq!(
        available(&app, "c1").await,
        micros("100") - accepted * micros("2.5")
    );
    assert!(dead_letters(&app, "status=all").await.is_empty());
    assert_replayable(&app.ledger_all("c1").await);
}

#[tokio::test]
async fn events_need_the_ingest_scope() {
    let app = priced_app(Options::default()).await;
    let key = |scope: &str| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["keys", "create", "--scope", scope])
            .args(app.storage_args())
            .output()
            .expect("run tally keys create");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_string()
    };
    let (ingest, read) = (key("ingest"), key("read"));
    let body =
        json!({ "events": [{ "id": "s1", "customer_id": "c1", "feature": "api", "quantity": 2 }] });
    let reply = app
        .send(Method::POST, "/v1/events", Some(&read), Some(&body))
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let reply = app
        .send(Method::POST, "/v1/events", Some(&ingest), Some(&body))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["results"][0]["status"], "charged");
    // Ingest cannot charge directly, nor read dead letters.
    let charge = json!({ "id": "ch", "customer_id": "c1", "amount": "1" });
    let reply = app
        .send(Method::POST, "/v1/charges", Some(&ingest), Some(&charge))
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let reply = app
        .send(Method::GET, "/v1/dead-letters", Some(&ingest), None)
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(available(&app, "c1").await, micros("99"));
}
