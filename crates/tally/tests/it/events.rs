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
    // Each rejection names the event's field it is about, where one is to blame.
    let params: Vec<&str> = results
        .iter()
        .map(|r| r["error"]["param"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        params,
        vec![
            "",
            "",
            "",
            "",
            "quantity",
            "quantity",
            "customer_id",
            "feature",
            "feature",
            "timestamp",
            "timestamp",
            "",
            ""
        ],
        "{results:?}"
    );
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
    // Each names the field at fault (they named none).
    for (body, param) in [
        (json!({ "event": [] }), "event"),
        (json!({}), "events"),
        (json!({ "events": "x" }), "events"),
        // Not an object at all: no field to name (it named `true`).
        (json!(true), ""),
    ] {
        let reply = app.post("/v1/events", body.clone()).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
        match param {
            "" => assert!(reply.body["error"].get("param").is_none(), "{}", reply.body),
            _ => assert_eq!(
                reply.body["error"]["param"], param,
                "{body}: {}",
                reply.body
            ),
        }
    }
    // An event with a field it has no use for is rejected naming it.
    let results = events(
        &app,
        json!([{ "id": "u1", "customer_id": "c1", "feature": "api", "quantity": 1, "bogus": 1 }]),
    )
    .await;
    assert_eq!(results[0]["status"], "rejected");
    assert_eq!(results[0]["error"]["param"], "bogus", "{}", results[0]);
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

/// A batch is charged in request order, however long: the first of two
/// events with one id is the one charged, and when credits run out the
/// last ones are refused. A probe found batches of 128 or more charged out
/// of order (127 in order, then the rest from the end).
#[tokio::test]
async fn a_long_batch_is_charged_in_request_order() {
    let app = priced_app(Options::default()).await;
    // c1 has 100 credits: 200 events of 0.5 use them up, 100 more are refused.
    let mut batch: Vec<Value> = (0..300)
        .map(|n| json!({ "id": format!("o{n}"), "customer_id": "c1", "feature": "api", "quantity": 1 }))
        .collect();
    batch[150] = json!({ "id": "twice", "customer_id": "c1", "feature": "api", "quantity": 1 });
    batch[160] = json!({ "id": "twice", "customer_id": "c1", "feature": "api", "quantity": 1 });
    batch[170] = json!({ "id": "clash", "customer_id": "c1", "feature": "api", "quantity": 1 });
    batch[180] = json!({ "id": "clash", "customer_id": "c1", "feature": "api", "quantity": 2 });
    let results = events(&app, Value::Array(batch)).await;
    let status = |n: usize| results[n]["status"].as_str().unwrap().to_owned();
    assert_eq!(status(150), "charged");
    assert_eq!(status(160), "duplicate");
    assert_eq!(status(170), "charged");
    assert_eq!(status(180), "rejected");
    assert_eq!(
        results[180]["error"]["code"], "idempotency_conflict",
        "{}",
        results[180]
    );
    // 297 distinct charges of 0.5 tried against 100 credits: the first
    // 200 of them (in request order) are charged.
    let charged: Vec<usize> = (0..300)
        .filter(|n| *n != 160 && *n != 180 && status(*n) == "charged")
        .collect();
    assert_eq!(charged.len(), 200);
    assert_eq!(charged.last(), Some(&201), "the first 200 distinct ones");
    for (n, result) in results.iter().enumerate().skip(202) {
        assert_eq!(result["status"], "rejected", "event {n}: {result}");
        assert_eq!(result["error"]["code"], "insufficient_credits");
    }
    // Each charged event leaves less than the one before it.
    let after: Vec<i64> = charged
        .iter()
        .map(|n| micros(results[*n]["balance_after"].as_str().unwrap()))
        .collect();
    assert!(after.windows(2).all(|w| w[1] < w[0]), "{after:?}");
    assert_eq!(available(&app, "c1").await, 0);
}

#[tokio::test]
async fn events_are_priced_at_their_own_timestamp() {
    let app = priced_app(Options {
        manual_clock: true,
        extra_args: vec!["--event-window-seconds".into(), "86400".into()],
        ..Options::default()
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
    // An unknown source is a 400 too (it listed nothing, with 200).
    let bad = app.get("/v1/dead-letters?source=bogus").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.body);
    assert_eq!(bad.body["error"]["param"], "source");
    let by_source = [
        dead_letters(&app, "status=all&source=http").await.len(),
        dead_letters(&app, "status=all&source=replay").await.len(),
        dead_letters(&app, "status=all&source=kafka").await.len(),
    ];
    assert_eq!(by_source[0] + by_source[1], 4, "{by_source:?}");
    assert_eq!(by_source[2], 0);
    let missing = app.get("/v1/dead-letters/dl_999").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    // Answers name a letter by the id the client sent (they said "414").
    let again = app
        .post(&format!("/v1/dead-letters/{c}/discard"), json!({}))
        .await;
    assert_eq!(
        again.status,
        StatusCode::OK,
        "a discard again is its answer again"
    );
    let resolved = app
        .post(&format!("/v1/dead-letters/{b}/discard"), json!({}))
        .await;
    assert_eq!(resolved.code(), "dead_letter_resolved");
    let message = resolved.body["error"]["message"].as_str().unwrap();
    assert!(message.contains(&format!("dead letter {b} ")), "{message}");
    let missing = app.post("/v1/dead-letters/dl_999/discard", json!({})).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let message = missing.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("dead letter dl_999 "), "{message}");

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
    // Replayed and refused again: listed, and the command fails (a script
    // can tell nothing was charged).
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["dead-letters", "replay", "--all"])
        .args(["--url", &app.base, "--key", ADMIN_KEY])
        .output()
        .expect("run tally dead-letters");
    assert!(!output.status.success());
    let replayed = String::from_utf8_lossy(&output.stdout);
    assert!(
        replayed.contains(&format!("{d}\trejected\tunknown_feature")),
        "{replayed}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("1 dead letter(s) are still rejected"),
        "{stderr}"
    );
    let letter = app.get(&format!("/v1/dead-letters/{d}")).await;
    assert_eq!(letter.body["attempts"], 2);
    // An id that is not a dead letter's is refused before any request (one
    // with a path in it named another route: a replay ran as a discard).
    let raw = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .arg("dead-letters")
            .args(args)
            .args(["--url", &app.base, "--key", ADMIN_KEY])
            .output()
            .expect("run tally dead-letters")
    };
    let sneaky = format!("{d}/discard?");
    for args in [
        vec!["replay", sneaky.as_str()],
        vec!["discard", sneaky.as_str()],
    ] {
        let output = raw(&args);
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("is not a dead letter id"), "{stderr}");
    }
    let letter = app.get(&format!("/v1/dead-letters/{d}")).await;
    assert_eq!(letter.body["status"], "pending", "{}", letter.body);
    assert_eq!(letter.body["attempts"], 2);
    // One the server refuses does not stop the others; the command then
    // fails, and does not say that running it again would help.
    let output = raw(&["replay", "dl_999999", &d]);
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("dl_999999\trefused\tnot_found"), "{stdout}");
    assert!(
        stdout.contains(&format!("{d}\trejected\tunknown_feature")),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "2 dead letter(s): 0 charged, 0 already charged, 1 still rejected, 1 refused by the \
             server, 0 not replayed"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("running the command again as it is will not change that"),
        "{stderr}"
    );
    // A server that cannot be reached: worth running again.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["dead-letters", "replay", &d])
        .args(["--url", "http://127.0.0.1:1", "--key", ADMIN_KEY])
        .output()
        .expect("run tally dead-letters");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("run the command again for them"),
        "{stderr}"
    );
    // The key's value is not shown in the help.
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["dead-letters", "replay", "--help"])
        .env("TALLY_API_KEY", "sekrit-value")
        .output()
        .expect("run tally dead-letters --help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("TALLY_API_KEY") && !help.contains("sekrit-value"),
        "{help}"
    );
    assert_replayable(&app.ledger_all("c1").await);
}

/// A dead letter settled by its event's charge stays as it was settled: an
/// event of another customer that later reuses the id is refused as a
/// conflict and kept as a letter of its own (its redeliveries counted there).
#[tokio::test]
async fn a_settled_dead_letter_is_not_rewritten_by_a_later_conflict() {
    let app = priced_app(Options::default()).await;
    let first = json!({ "id": "x", "customer_id": "later", "feature": "api", "quantity": 4 });
    assert_eq!(events(&app, json!([first])).await[0]["status"], "rejected");
    app.customer("later").await;
    app.grant("later", "gl", "10").await;
    assert_eq!(events(&app, json!([first])).await[0]["status"], "charged");
    let settled = dead_letters(&app, "status=all").await;
    assert_eq!(settled.len(), 1, "{settled:?}");
    let settled = settled[0].clone();
    assert_eq!(settled["status"], "replayed");
    assert_eq!(settled["note"], "charged");

    let other = json!({ "id": "x", "customer_id": "c1", "feature": "api", "quantity": 2 });
    for attempt in 1..=2 {
        let results = events(&app, json!([other])).await;
        assert_eq!(results[0]["status"], "rejected");
        assert_eq!(results[0]["error"]["code"], "idempotency_conflict");
        let letters = dead_letters(&app, "status=all").await;
        assert_eq!(letters.len(), 2, "{letters:?}");
        let kept = letters
            .iter()
            .find(|l| l["id"] == settled["id"])
            .expect("the settled letter is still listed");
        assert_eq!(kept, &settled, "the settled letter is unchanged");
        let conflict = letters
            .iter()
            .find(|l| l["id"] != settled["id"])
            .expect("the conflict's own letter");
        assert_eq!(conflict["status"], "pending");
        assert_eq!(conflict["customer_id"], "c1");
        assert_eq!(conflict["code"], "idempotency_conflict");
        assert_eq!(conflict["attempts"], attempt);
    }
    assert_eq!(available(&app, "later").await, micros("8"));
    assert_eq!(available(&app, "c1").await, micros("100"));
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
    // No API key sent it: its entry names its source.
    let ledger = app.ledger_all("c1").await;
    let entry = ledger
        .iter()
        .find(|e| e["reference"] == "p1")
        .expect("the event's entry");
    assert_eq!(entry["actor"], "source:pubsub");
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
    let code_of = |payload_has: &str| {
        letters
            .iter()
            .find(|l| l["payload"].as_str().unwrap().contains(payload_has))
            .unwrap_or_else(|| panic!("{payload_has}: {letters:?}"))
            .clone()
    };
    let bad_json = code_of("{not json");
    assert_eq!(bad_json["code"], "invalid_event", "{bad_json}");
    let no_data = code_of("\"message\"");
    assert_eq!(no_data["code"], "unreadable_message", "{no_data}");
    assert_eq!(available(&app, "c1").await, micros("98"));
    // A letter with no event in it cannot be replayed; one whose event is
    // refused again keeps its source (and its reason).
    let id = |letter: &Value| letter["id"].as_str().unwrap().to_string();
    let refused = app
        .post(
            &format!("/v1/dead-letters/{}/replay", id(&no_data)),
            json!({}),
        )
        .await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{}", refused.body);
    assert_eq!(refused.code(), "dead_letter_not_replayable");
    let again = app
        .post(
            &format!("/v1/dead-letters/{}/replay", id(&bad_json)),
            json!({}),
        )
        .await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    let letter = app
        .get(&format!("/v1/dead-letters/{}", id(&bad_json)))
        .await;
    assert_eq!(letter.body["source"], "pubsub", "{}", letter.body);
    assert_eq!(letter.body["attempts"], 2, "{}", letter.body);
    assert_eq!(letter.body["code"], "invalid_event", "{}", letter.body);
    assert_eq!(dead_letters(&app, "source=pubsub").await.len(), 2);

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
            .args([
                "keys",
                "create",
                "--scope",
                scope,
                "--id",
                &format!("k_{scope}"),
            ])
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
    // The event's entry names the key that sent it, as a charge's does.
    let ledger = app.ledger_all("c1").await;
    let entry = ledger
        .iter()
        .find(|e| e["reference"] == "s1")
        .expect("the event's entry");
    assert_eq!(entry["actor"], "key:k_ingest");
}

/// The HTTP and Pub/Sub push sources end to end (issue 4): producers send
/// good events (each twice: a duplicate in a later batch, a redelivery of a
/// push), bad ones (unknown customer, unknown feature, malformed, not JSON)
/// and keep resending what was not acknowledged, as Pub/Sub and a careful
/// HTTP producer do. The server is killed with SIGKILL midway and restarted
/// on the same store. Afterwards every good event is charged exactly once,
/// at its price, and every bad one is a dead letter with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_and_pubsub_events_survive_a_sigkill_each_charged_once() {
    use base64::Engine;
    use std::collections::{HashMap, HashSet};
    use std::sync::{Arc, RwLock};

    const CUSTOMERS: usize = 4;
    const HTTP_EVENTS: usize = 6_000;
    const PUSH_EVENTS: usize = 600;
    const BATCH: usize = 60;
    let mut app = priced_app(Options {
        extra_args: vec!["--pubsub-token".into(), "s3cret".into()],
        ..Options::default()
    })
    .await;
    for c in 0..CUSTOMERS {
        app.customer(&format!("k{c}")).await;
        app.grant(&format!("k{c}"), &format!("gk{c}"), "1000000")
            .await;
    }
    let customer = |n: usize| format!("k{}", n % CUSTOMERS);
    let quantity = |n: usize| 1 + n % 3;
    // The HTTP producer's batches: each good event, its duplicate two
    // batches later, and a bad event of each kind every few batches.
    let mut bad: HashMap<String, &str> = HashMap::new();
    let mut batches: Vec<Vec<Value>> = Vec::new();
    for (b, chunk) in (0..HTTP_EVENTS)
        .collect::<Vec<_>>()
        .chunks(BATCH)
        .enumerate()
    {
        let mut batch: Vec<Value> = chunk
            .iter()
            .map(|&n| json!({ "id": format!("h{n}"), "customer_id": customer(n), "feature": "api", "quantity": quantity(n) }))
            .collect();
        if b >= 2 {
            let n = (b - 2) * BATCH;
            batch.push(json!({ "id": format!("h{n}"), "customer_id": customer(n), "feature": "api", "quantity": quantity(n) }));
        }
        if b % 4 == 0 {
            batch.push(json!({ "id": format!("nobody{b}"), "customer_id": "nobody", "feature": "api", "quantity": 1 }));
            bad.insert(format!("nobody{b}"), "not_found");
            batch.push(json!({ "id": format!("nofeature{b}"), "customer_id": "k0", "feature": "nope", "quantity": 1 }));
            bad.insert(format!("nofeature{b}"), "unknown_feature");
            batch.push(
                json!({ "id": format!("noquantity{b}"), "customer_id": "k0", "feature": "api" }),
            );
            bad.insert(format!("noquantity{b}"), "invalid_event");
        }
        batches.push(batch);
    }
    // The push producer: each good event pushed twice (a redelivery), and
    // a message that is not JSON every 50.
    let mut pushes: Vec<String> = Vec::new();
    let mut unreadable = 0;
    for n in 0..PUSH_EVENTS {
        let event = json!({ "id": format!("p{n}"), "customer_id": customer(n), "feature": "api", "quantity": quantity(n) }).to_string();
        pushes.push(event.clone());
        pushes.push(event);
        if n % 50 == 0 {
            pushes.push(format!("{{not json {n}"));
            unreadable += 1;
        }
    }

    let base = Arc::new(RwLock::new(app.base.clone()));
    let client = app.client.clone();
    let http_done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let push_done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let http_batches = batches.len();
    let http_producer = {
        let (base, client, done) = (base.clone(), client.clone(), http_done.clone());
        tokio::spawn(async move {
            for batch in batches {
                loop {
                    let url = format!("{}/v1/events", base.read().unwrap());
                    let sent = client
                        .post(url)
                        .bearer_auth(ADMIN_KEY)
                        .json(&json!({ "events": batch }))
                        .timeout(std::time::Duration::from_secs(20))
                        .send()
                        .await;
                    if let Ok(response) = sent {
                        if response.status() == StatusCode::OK {
                            let body: Value = response.json().await.unwrap();
                            assert_eq!(body["results"].as_array().unwrap().len(), batch.len());
                            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            // A producer's pace, so that the kill finds it mid-way.
                            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                            break;
                        }
                    }
                    // Not acknowledged (the server died, or is restarting): send it again.
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
        })
    };
    let pushes_total = pushes.len();
    let push_producer = {
        let (base, client, done) = (base.clone(), client.clone(), push_done.clone());
        tokio::spawn(async move {
            for (n, data) in pushes.iter().enumerate() {
                let envelope = json!({
                    "message": {
                        "data": base64::engine::general_purpose::STANDARD.encode(data),
                        "messageId": format!("m{n}"),
                    },
                    "subscription": "projects/p/subscriptions/tally",
                });
                loop {
                    let url = format!("{}/v1/ingest/pubsub?token=s3cret", base.read().unwrap());
                    let sent = client
                        .post(url)
                        .json(&envelope)
                        .timeout(std::time::Duration::from_secs(20))
                        .send()
                        .await;
                    if sent.is_ok_and(|r| r.status() == StatusCode::NO_CONTENT) {
                        done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
        })
    };
    // Kill the server once both producers are a quarter through (and not
    // done), then restart it.
    let progress =
        |done: &std::sync::atomic::AtomicUsize| done.load(std::sync::atomic::Ordering::SeqCst);
    while progress(&http_done) < http_batches / 4 || progress(&push_done) < pushes_total / 4 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(
        progress(&http_done) < http_batches && progress(&push_done) < pushes_total,
        "the load ended before the kill"
    );
    app.kill().await;
    app.start().await;
    *base.write().unwrap() = app.base.clone();
    tokio::time::timeout(std::time::Duration::from_secs(120), async {
        http_producer.await.unwrap();
        push_producer.await.unwrap();
    })
    .await
    .expect("the producers finished within 120 s");

    // Every good event once, at its price (0.5 per unit).
    let mut charged: HashMap<String, i64> = HashMap::new();
    let mut total: i64 = 0;
    for c in 0..CUSTOMERS {
        let entries = app.ledger_all(&format!("k{c}")).await;
        let replayed = assert_replayable(&entries);
        assert_eq!(replayed, available(&app, &format!("k{c}")).await);
        for entry in entries.iter().filter(|e| e["kind"] == "charge") {
            let reference = entry["reference"].as_str().unwrap().to_string();
            let amount = crate::support::micros_of(&entry["amount"]);
            assert!(
                charged.insert(reference.clone(), amount).is_none(),
                "{reference} charged twice"
            );
            total += amount;
        }
    }
    let expected: HashSet<String> = (0..HTTP_EVENTS)
        .map(|n| format!("h{n}"))
        .chain((0..PUSH_EVENTS).map(|n| format!("p{n}")))
        .collect();
    assert_eq!(charged.keys().cloned().collect::<HashSet<_>>(), expected);
    for (id, amount) in &charged {
        let n: usize = id[1..].parse().unwrap();
        assert_eq!(*amount, micros("0.5") * quantity(n) as i64, "{id}");
    }
    let spent: i64 = (0..CUSTOMERS).map(|_| micros("1000000")).sum::<i64>();
    let mut left = 0;
    for c in 0..CUSTOMERS {
        left += available(&app, &format!("k{c}")).await;
    }
    assert_eq!(spent - left, total, "balances moved by what was charged");

    // Every bad event a dead letter with its reason (attempts count resends).
    let letters = dead_letters(&app, "status=all&limit=1000").await;
    let by_event: HashMap<String, &Value> = letters
        .iter()
        .filter_map(|l| l["event_id"].as_str().map(|id| (id.to_string(), l)))
        .collect();
    for (id, code) in &bad {
        let letter = by_event
            .get(id)
            .unwrap_or_else(|| panic!("no dead letter for {id}"));
        assert_eq!(letter["code"], *code, "{letter}");
        assert_eq!(letter["source"], "http", "{letter}");
        assert!(
            !letter["message"].as_str().unwrap_or("").is_empty(),
            "{letter}"
        );
    }
    let unreadable_letters = letters
        .iter()
        .filter(|l| l["source"] == "pubsub" && l["code"] == "invalid_event")
        .count();
    assert_eq!(unreadable_letters, unreadable, "{letters:#?}");
    assert_eq!(
        letters.len(),
        bad.len() + unreadable,
        "no other dead letters"
    );

    // The restarted server counted what it charged, per source, with the
    // time each event took to its durable result.
    let metrics = app.metrics().await;
    for source in ["http", "pubsub"] {
        let count = metrics
            .lines()
            .find_map(|line| {
                line.strip_prefix(&format!(
                    "tally_event_charge_duration_seconds_count{{source=\"{source}\"}} "
                ))
            })
            .unwrap_or_else(|| panic!("no latency histogram for {source}: {metrics}"));
        assert!(
            count.trim().parse::<u64>().unwrap() > 0,
            "{source}: {count}"
        );
        assert!(metrics.contains(&format!(
            "tally_events_total{{source=\"{source}\",status=\"charged\"}}"
        )));
    }
}

/// A usage event and a single charge never share an id: both are charges a
/// refund names by id, so the second of the two is a conflict, charged
/// nothing (a probe charged the same id twice, once each way, and could
/// refund only one of them).
#[tokio::test]
async fn an_event_and_a_charge_never_share_an_id() {
    let app = priced_app(Options::default()).await;
    let charged = app
        .post(
            "/v1/charges",
            json!({ "id": "s2", "customer_id": "c1", "amount": "1" }),
        )
        .await;
    assert_eq!(charged.status, StatusCode::OK, "{}", charged.body);
    let results = events(
        &app,
        json!([{ "id": "s2", "customer_id": "c1", "feature": "api", "quantity": 2 }]),
    )
    .await;
    assert_eq!(
        statuses(&results),
        [("rejected".to_string(), "idempotency_conflict".to_string())]
    );
    assert_eq!(available(&app, "c1").await, micros("99"));

    let results = events(
        &app,
        json!([{ "id": "e_first", "customer_id": "c1", "feature": "api", "quantity": 2 }]),
    )
    .await;
    assert_eq!(results[0]["status"], "charged");
    let reply = app
        .post(
            "/v1/charges",
            json!({ "id": "e_first", "customer_id": "c1", "amount": "1" }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.body);
    assert_eq!(reply.code(), "idempotency_conflict");
    assert_eq!(available(&app, "c1").await, micros("98"));

    // Each id refunds the one charge it names.
    for (refund, charge, back) in [("r1", "s2", "99"), ("r2", "e_first", "100")] {
        let reply = app
            .post(
                "/v1/refunds",
                json!({ "id": refund, "charge_id": charge, "reason": "test" }),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert_eq!(available(&app, "c1").await, micros(back));
    }
    assert_replayable(&app.ledger_all("c1").await);
}

/// A dead letter of an event without a timestamp is charged, on replay, as
/// of when the event first arrived: priced by the version in effect then
/// (not the one published since), and still the same event, so that its
/// producer's redelivery is a duplicate. Another customer's event that
/// reuses the id does not settle it.
#[tokio::test]
async fn a_replayed_dead_letter_is_charged_as_of_its_arrival() {
    let app = priced_app(Options {
        manual_clock: true,
        ..Options::default()
    })
    .await;
    let start = app.get("/v1/clock").await.body["now"]
        .as_str()
        .unwrap()
        .to_string();
    let event = json!({ "id": "late1", "customer_id": "late_c", "feature": "api", "quantity": 4 });
    let ghost = json!({ "id": "xx1", "customer_id": "ghost", "feature": "api", "quantity": 1 });
    let results = events(&app, json!([event.clone(), ghost])).await;
    assert_eq!(results[0]["error"]["code"], "not_found");
    assert_eq!(results[1]["error"]["code"], "not_found");
    // v2 doubles the price from one hour after the event arrived.
    app.publish_version(
        "v2",
        json!([
            { "feature": "api", "credits_per_unit": "1" },
            { "feature": "ai", "plan": "pro", "credits_per_unit": "6" },
        ]),
        Some(&time_plus(&start, 3600)),
    )
    .await;
    let reply = app
        .post("/v1/clock/advance", json!({ "seconds": 7200 }))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    // Another customer's event under the same id is its own charge; the
    // dead letter stays pending.
    let results = events(
        &app,
        json!([{ "id": "xx1", "customer_id": "c1", "feature": "api", "quantity": 1 }]),
    )
    .await;
    assert_eq!(results[0]["status"], "charged");
    let letters = dead_letters(&app, "status=pending").await;
    let pending: Vec<&str> = letters
        .iter()
        .map(|l| l["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(pending, ["late1", "xx1"], "{letters:?}");
    let letter = letters[0]["id"].as_str().unwrap().to_string();

    app.customer("late_c").await;
    app.grant("late_c", "gl", "10").await;
    let replay = app
        .post(&format!("/v1/dead-letters/{letter}/replay"), json!({}))
        .await;
    assert_eq!(replay.status, StatusCode::OK, "{}", replay.body);
    assert_eq!(
        replay.body["result"]["status"], "charged",
        "{}",
        replay.body
    );
    assert_eq!(replay.body["result"]["pricebook"], "v1");
    assert_eq!(
        replay.body["result"]["cost"], "2",
        "4 × 0.5, as of its arrival"
    );
    assert_eq!(replay.body["dead_letter"]["status"], "replayed");
    let again = events(&app, json!([event])).await;
    assert_eq!(again[0]["status"], "duplicate", "{again:?}");
    assert_eq!(available(&app, "late_c").await, micros("8"));
}

/// A simulation counts usage at its own time, as the usage report does: a
/// late event recorded after the window but timestamped inside it is in the
/// window, and one recorded inside it but timestamped before it is not.
#[tokio::test]
async fn a_simulation_counts_late_events_at_their_own_time() {
    let app = priced_app(Options {
        manual_clock: true,
        extra_args: vec!["--event-window-seconds".into(), "86400".into()],
        ..Options::default()
    })
    .await;
    let start = app.get("/v1/clock").await.body["now"]
        .as_str()
        .unwrap()
        .to_string();
    let reply = app
        .post("/v1/clock/advance", json!({ "seconds": 7200 }))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let results = events(
        &app,
        json!([
            // Recorded now (two hours in), happened half an hour in.
            { "id": "late", "customer_id": "c1", "feature": "api", "quantity": 2, "timestamp": time_plus(&start, 1800) },
            // Recorded now, happened now.
            { "id": "now", "customer_id": "c1", "feature": "api", "quantity": 6 },
        ]),
    )
    .await;
    assert!(
        results.iter().all(|r| r["status"] == "charged"),
        "{results:?}"
    );
    let draft = app.post("/v1/pricebooks", json!({ "id": "v9" })).await;
    assert_eq!(draft.status, StatusCode::OK, "{}", draft.body);
    let rules = app
        .put(
            "/v1/pricebooks/v9/rules",
            json!({ "rules": [{ "feature": "api", "credits_per_unit": "1" }] }),
        )
        .await;
    assert_eq!(rules.status, StatusCode::OK, "{}", rules.body);
    let simulate = |from: i64, to: i64| {
        let body = json!({ "from": time_plus(&start, from), "to": time_plus(&start, to) });
        let app = &app;
        async move {
            let reply = app.post("/v1/pricebooks/v9/simulate", body).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
            let total = &reply.body["total"];
            (
                total["events"].as_u64().unwrap(),
                total["quantity"].as_str().unwrap().to_string(),
                total["recorded"].as_str().unwrap().to_string(),
                total["simulated"].as_str().unwrap().to_string(),
            )
        }
    };
    // The first hour holds the late event only (recorded an hour after it).
    assert_eq!(
        simulate(0, 3600).await,
        (1, "2".into(), "1".into(), "2".into())
    );
    // The second hour and on hold the event of now only.
    assert_eq!(
        simulate(3600, 7300).await,
        (1, "6".into(), "3".into(), "6".into())
    );
    // The usage report agrees.
    let usage = app
        .get(&format!(
            "/v1/customers/c1/usage?from={}&to={}",
            time_plus(&start, 0),
            time_plus(&start, 3600)
        ))
        .await;
    assert_eq!(usage.status, StatusCode::OK, "{}", usage.body);
    let quantity: Vec<&str> = usage.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|line| line["quantity"].as_str().unwrap())
        .collect();
    assert_eq!(quantity, ["2"], "{}", usage.body);
}

/// One event id refused for one customer, then for another: the dead letter
/// holds the later event, and its arrival is the later one's, so a replay
/// prices it by the version in effect when that event came (a probe saw the
/// second customer charged at the first one's older price).
#[tokio::test]
async fn a_dead_letter_taken_over_by_another_customer_keeps_that_ones_arrival() {
    let app = priced_app(Options {
        manual_clock: true,
        ..Options::default()
    })
    .await;
    let first = json!({ "id": "dev3", "customer_id": "d1", "feature": "api", "quantity": 2 });
    assert_eq!(
        events(&app, json!([first])).await[0]["error"]["code"],
        "not_found"
    );
    let reply = app
        .post("/v1/clock/advance", json!({ "seconds": 3600 }))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    app.publish_version(
        "v2",
        json!([
            { "feature": "api", "credits_per_unit": "5" },
            { "feature": "ai", "plan": "pro", "credits_per_unit": "6" },
        ]),
        None,
    )
    .await;
    let second = json!({ "id": "dev3", "customer_id": "d2", "feature": "api", "quantity": 2 });
    assert_eq!(
        events(&app, json!([second])).await[0]["error"]["code"],
        "not_found"
    );
    let letters = dead_letters(&app, "").await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["customer_id"], "d2");
    app.customer("d2").await;
    app.grant("d2", "g2", "100").await;
    let id = letters[0]["id"].as_str().unwrap();
    let replay = app
        .post(&format!("/v1/dead-letters/{id}/replay"), json!({}))
        .await;
    assert_eq!(
        replay.body["result"]["status"], "charged",
        "{}",
        replay.body
    );
    assert_eq!(replay.body["result"]["pricebook"], "v2");
    assert_eq!(replay.body["result"]["cost"], "10");
}

/// A simulation counts a late event that a longer event window let in, after
/// the window is shortened: it looks as far past its window as the widest
/// window any writer ran with.
#[tokio::test]
async fn a_shortened_event_window_keeps_late_events_in_simulations() {
    let sixty_days = ["--event-window-seconds".to_string(), "5184000".to_string()];
    let mut app = TestApp::spawn_with(Options {
        manual_clock: true,
        extra_args: sixty_days.to_vec(),
        ..Options::default()
    })
    .await;
    let at = app.hours_from_now().await;
    app.features(&["api"]).await;
    app.publish_version(
        "v1",
        json!([{ "feature": "api", "credits_per_unit": "3" }]),
        None,
    )
    .await;
    app.customer("c").await;
    app.grant("c", "g", "100").await;
    app.advance(47 * 86_400).await;
    let late = json!([{ "id": "late", "customer_id": "c", "feature": "api", "quantity": 1,
                        "timestamp": at(1) }]);
    let results = events(&app, late).await;
    assert_eq!(results[0]["status"], "charged", "{results:?}");
    let window = json!({ "from": at(0), "to": at(2) });
    let counted = |reply: Reply| {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        reply.body["total"]["events"].clone()
    };
    assert_eq!(
        counted(app.post("/v1/pricebooks/v1/simulate", window.clone()).await),
        1
    );
    app.kill().await;
    app.options.extra_args.clear();
    app.start().await;
    assert_eq!(
        counted(app.post("/v1/pricebooks/v1/simulate", window).await),
        1,
        "still counted with the default 30-day window"
    );
}

/// A letter's id is the next number whatever happened to earlier letters:
/// an event rejected again updates its letter, and takes no number (on
/// PostgreSQL an insert that became an update used one up, so the ids
/// drifted from SQLite's for the same requests).
#[tokio::test]
async fn dead_letter_ids_are_numbered_alike_on_both_stores() {
    let app = priced_app(Options::default()).await;
    let rejected = json!([{ "id": "x", "customer_id": "c1", "feature": "nope", "quantity": 1 }]);
    for _ in 0..5 {
        let results = events(&app, rejected.clone()).await;
        assert_eq!(results[0]["status"], "rejected", "{results:?}");
    }
    let other = json!([{ "id": "y", "customer_id": "c1", "feature": "nope", "quantity": 1 }]);
    assert_eq!(events(&app, other).await[0]["status"], "rejected");
    let letters = dead_letters(&app, "").await;
    let number = |event: &str| -> i64 {
        let letter = letters
            .iter()
            .find(|l| l["event_id"] == event)
            .unwrap_or_else(|| panic!("no dead letter for {event}: {letters:?}"));
        letter["id"].as_str().unwrap()["dl_".len()..]
            .parse()
            .unwrap()
    };
    let x = letters.iter().find(|l| l["event_id"] == "x").unwrap();
    assert_eq!(x["attempts"], 5, "{x}");
    assert_eq!(number("y"), number("x") + 1, "{letters:?}");
}

/// An event refused for its properties names them as the field at fault,
/// however it was wrong.
#[tokio::test]
async fn an_event_refused_for_its_properties_names_them() {
    let app = priced_app(Options::default()).await;
    let many: serde_json::Map<String, Value> =
        (0..33).map(|n| (format!("k{n}"), json!("v"))).collect();
    let results = events(
        &app,
        json!([
            { "id": "p1", "customer_id": "c1", "feature": "api", "quantity": 1, "properties": many },
            { "id": "p2", "customer_id": "c1", "feature": "api", "quantity": 1, "properties": { "m": [1] } },
            { "id": "p3", "customer_id": "c1", "feature": "api", "quantity": 1, "properties": { "": "x" } },
        ]),
    )
    .await;
    for result in &results {
        assert_eq!(result["status"], "rejected", "{result}");
        assert_eq!(result["error"]["code"], "invalid_event", "{result}");
        assert_eq!(result["error"]["param"], "properties", "{result}");
    }
}

/// The NUL character: in a JSON body it is a 400 that changes nothing, on
/// both stores (PostgreSQL's text cannot hold it: it was a 503 there); in a
/// batch of events only the event holding it is refused (the batch was a
/// 503 after charging the events before it), and in a stream message it is
/// kept in its dead letter as U+FFFD (the database refused the letter, and
/// the message came again for ever).
#[tokio::test]
async fn the_nul_character_is_refused_in_bodies_and_kept_safely_from_streams() {
    let app = priced_app(Options {
        extra_args: vec!["--pubsub-token".into(), "s3cret".into()],
        ..Options::default()
    })
    .await;
    let before = available(&app, "c1").await;
    for (path, body) in [
        (
            "/v1/customers",
            r#"{"id":"nul","name":"a\u0000b"}"#.to_string(),
        ),
        (
            "/v1/charges",
            r#"{"id":"x13","customer_id":"c1","amount":"1","reason":"a\u0000b"}"#.to_string(),
        ),
    ] {
        let request = app
            .client
            .post(app.url(path))
            .bearer_auth(crate::support::ADMIN_KEY)
            .header("content-type", "application/json")
            .body(body);
        let reply = Reply::of(request, path).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{path}: {}",
            reply.body
        );
        assert!(
            reply.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("NUL"),
            "{}",
            reply.body
        );
    }
    assert_eq!(available(&app, "c1").await, before, "nothing charged");
    assert_eq!(
        app.get("/v1/customers/nul").await.status,
        StatusCode::NOT_FOUND
    );
    // In a batch of events, the event holding it is refused on its own (a
    // dead letter keeps it as U+FFFD), and its neighbours are charged.
    let batch = r#"{"events":[
        {"id":"n_ok","customer_id":"c1","feature":"api","quantity":1},
        {"id":"n_bad\u0000","customer_id":"c1","feature":"api","quantity":1}]}"#;
    let request = app
        .client
        .post(app.url("/v1/events"))
        .bearer_auth(crate::support::ADMIN_KEY)
        .header("content-type", "application/json")
        .body(batch);
    let reply = Reply::of(request, "/v1/events").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(
        reply.body["results"][0]["status"], "charged",
        "{}",
        reply.body
    );
    assert_eq!(
        reply.body["results"][1]["status"], "rejected",
        "{}",
        reply.body
    );
    assert!(available(&app, "c1").await < before, "n_ok charged");
    let letters = dead_letters(&app, "source=http").await;
    assert!(
        letters.iter().any(|l| l["event_id"] == "n_bad\u{FFFD}"),
        "{letters:?}"
    );
    // A stream message whose text holds a raw NUL: not JSON, a dead letter.
    use base64::Engine;
    let data = base64::engine::general_purpose::STANDARD
        .encode(b"{\"id\":\"raw\0nul\",\"customer_id\":\"c1\",\"feature\":\"api\",\"quantity\":1}");
    let request = app
        .client
        .post(app.url("/v1/ingest/pubsub?token=s3cret"))
        .json(&json!({ "message": { "data": data, "messageId": "m-nul" } }));
    let reply = Reply::of(request, "/v1/ingest/pubsub").await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.body);
    let letters = dead_letters(&app, "source=pubsub").await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(
        letters[0]["payload"]
            .as_str()
            .unwrap()
            .contains("raw\u{FFFD}nul"),
        "{letters:?}"
    );
}
