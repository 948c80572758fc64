//! Top-ups over HTTP on the manual clock: credit packs, a manual top-up
//! granted exactly once when its payment is confirmed, failed and timed-out
//! payments, and the automatic top-up (threshold and target, one at a time,
//! the daily rate limit, suspension after repeated failures, resumption),
//! with a webhook receiver that verifies every signature and sees
//! `topup.created`, `topup.succeeded` and `topup.failed`; its state survives
//! a SIGKILL and restart. Bad input is refused and changes nothing.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::notifications::accepting_endpoint;
use crate::support::{assert_replayable, micros, micros_of, Options, TestApp};

const DAY: i64 = 86_400;

async fn charge_ok(app: &TestApp, customer: &str, id: &str, amount: &str) -> Value {
    let reply = app.charge(customer, id, amount).await;
    assert_eq!(reply.status, StatusCode::OK, "charge {id}: {}", reply.body);
    reply.body
}

async fn manual_app() -> TestApp {
    TestApp::spawn_with(Options {
        manual_clock: true,
        ..Options::default()
    })
    .await
}

async fn put_pack(app: &TestApp, key: &str, body: Value) -> Value {
    let reply = app.put(&format!("/v1/credit-packs/{key}"), body).await;
    assert_eq!(reply.status, StatusCode::OK, "pack {key}: {}", reply.body);
    reply.body
}

async fn auto_topup(app: &TestApp, customer: &str) -> Value {
    let reply = app
        .get(&format!("/v1/customers/{customer}/auto-topup"))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    reply.body
}

#[tokio::test]
async fn a_manual_topup_grants_its_credits_once_when_the_payment_is_confirmed() {
    let app = manual_app().await;
    let pack = put_pack(
        &app,
        "credits_1000",
        json!({ "name": "1,000 credits", "credits": "1000", "price": "9.99", "currency": "USD",
                "expires_after_days": 365 }),
    )
    .await;
    assert_eq!(pack["price_per_credit"], "0.00999");
    app.customer("cus").await;

    let request = json!({ "id": "tp_1", "pack": "credits_1000", "quantity": 2 });
    let created = app.post("/v1/customers/cus/topups", request.clone()).await;
    assert_eq!(created.status, StatusCode::OK, "{}", created.body);
    assert_eq!(created.body["status"], "pending_payment");
    assert_eq!(created.body["credits"], "2000");
    assert_eq!(created.body["price"], "19.98");
    assert_eq!(created.body["currency"], "USD");
    assert_eq!(created.body["origin"], "manual");
    assert_eq!(
        micros_of(&app.balance("cus").await["available"]),
        0,
        "no credits before the payment"
    );
    let again = app.post("/v1/customers/cus/topups", request).await;
    assert_eq!(again.status, StatusCode::OK);
    assert!(again.replayed());
    assert_eq!(again.body, created.body);
    let other = app
        .post(
            "/v1/customers/cus/topups",
            json!({ "id": "tp_1", "pack": "credits_1000", "quantity": 3 }),
        )
        .await;
    assert_eq!(other.status, StatusCode::CONFLICT);
    assert_eq!(other.code(), "idempotency_conflict");

    let confirm = json!({ "payment_reference": "pi_123" });
    let confirmed = app.post("/v1/topups/tp_1/confirm", confirm.clone()).await;
    assert_eq!(confirmed.status, StatusCode::OK, "{}", confirmed.body);
    assert_eq!(confirmed.body["status"], "succeeded");
    assert_eq!(confirmed.body["grant_id"], "topup:tp_1");
    assert_eq!(confirmed.body["balance_after"], "2000");
    // The payment system retries its call: the same answer, credits once.
    let retried = app.post("/v1/topups/tp_1/confirm", confirm).await;
    assert_eq!(retried.status, StatusCode::OK);
    assert!(retried.replayed());
    assert_eq!(retried.body["balance_after"], "2000");
    let failed = app
        .post("/v1/topups/tp_1/fail", json!({ "reason": "card_declined" }))
        .await;
    assert_eq!(failed.status, StatusCode::CONFLICT);
    assert_eq!(failed.code(), "topup_not_pending");
    let balance = app.balance("cus").await;
    assert_eq!(micros_of(&balance["available"]), micros("2000"));
    let lot = &balance["grants"][0];
    assert_eq!(lot["id"], "topup:tp_1");
    assert_eq!(lot["paid"], true);
    assert_eq!(lot["source"], "purchase");
    assert_eq!(lot["cost_basis"]["amount"], "0.00999");
    assert_eq!(lot["cost_basis"]["currency"], "USD");
    assert_eq!(lot["external_reference"], "pi_123");
    assert!(lot["expires_at"].is_string(), "{lot}");

    // A declined payment grants nothing and cannot be confirmed later.
    let tp2 = app
        .post(
            "/v1/customers/cus/topups",
            json!({ "id": "tp_2", "pack": "credits_1000" }),
        )
        .await;
    assert_eq!(tp2.status, StatusCode::OK, "{}", tp2.body);
    let declined = app
        .post("/v1/topups/tp_2/fail", json!({ "reason": "card_declined" }))
        .await;
    assert_eq!(declined.status, StatusCode::OK, "{}", declined.body);
    assert_eq!(declined.body["status"], "failed");
    assert_eq!(declined.body["failure_reason"], "card_declined");
    let late = app.post("/v1/topups/tp_2/confirm", json!({})).await;
    assert_eq!(late.status, StatusCode::CONFLICT);
    assert_eq!(late.code(), "topup_not_pending");

    // A payment not confirmed by its deadline fails on the engine's clock;
    // if the money comes after all, a confirmation still grants the credits.
    let tp3 = app
        .post(
            "/v1/customers/cus/topups",
            json!({ "id": "tp_3", "pack": "credits_1000", "payment_timeout_seconds": 60 }),
        )
        .await;
    assert_eq!(tp3.status, StatusCode::OK, "{}", tp3.body);
    app.advance(61).await;
    let tp3 = app.get("/v1/topups/tp_3").await;
    assert_eq!(tp3.body["status"], "failed", "{}", tp3.body);
    assert_eq!(tp3.body["failure_reason"], "payment_timeout");
    assert_eq!(
        app.post("/v1/topups/tp_3/fail", json!({ "reason": "x" }))
            .await
            .code(),
        "topup_not_pending"
    );
    let late = app.post("/v1/topups/tp_3/confirm", json!({})).await;
    assert_eq!(late.status, StatusCode::OK, "{}", late.body);
    assert_eq!(late.body["status"], "succeeded");
    assert_eq!(late.body["balance_after"], "3000");

    let page = app.get("/v1/customers/cus/topups?limit=2").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let ids: Vec<&str> = page.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tp_3", "tp_2"], "newest first");
    let cursor = page.body["next_cursor"].as_str().unwrap();
    let rest = app
        .get(&format!("/v1/customers/cus/topups?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(rest.body["data"][0]["id"], "tp_1");
    assert!(rest.body["next_cursor"].is_null());

    let entries = app.ledger_all("cus").await;
    assert_eq!(assert_replayable(&entries), micros("3000"));
    assert_eq!(entries.len(), 2, "two grant entries, nothing else");
}

#[tokio::test]
async fn bad_topup_input_is_refused_and_changes_nothing() {
    let app = manual_app().await;
    app.customer("cus").await;
    put_pack(
        &app,
        "p",
        json!({ "name": "P", "credits": "100", "price": "1", "currency": "EUR" }),
    )
    .await;
    let bad_packs = [
        json!({ "name": "P", "credits": "0", "price": "1", "currency": "EUR" }),
        json!({ "name": "P", "credits": "10", "price": "-1", "currency": "EUR" }),
        json!({ "name": "P", "credits": "10", "price": "1", "currency": "eur" }),
        json!({ "name": "P", "credits": "10", "price": "1", "currency": "EUR", "expires_after_days": 0 }),
        json!({ "name": "P", "credits": "10", "price": "1.0000001", "currency": "EUR" }),
        // More decimal places than the currency has.
        json!({ "name": "P", "credits": "3", "price": "1000.5", "currency": "JPY" }),
        json!({ "name": "P", "credits": "3", "price": "1.005", "currency": "USD" }),
        json!({ "name": "P", "credits": "3", "price": "1.2345", "currency": "BHD" }),
        json!({ "name": "P", "credits": "10", "price": "1", "currency": "EUR", "colour": "red" }),
        json!({ "credits": "10", "price": "1", "currency": "EUR" }),
        json!({ "name": " ", "credits": "10", "price": "1", "currency": "EUR" }),
    ];
    app.assert_each_answered(
        Method::PUT,
        "/v1/credit-packs/p",
        StatusCode::BAD_REQUEST,
        &bad_packs,
    )
    .await;
    let packs = app.get("/v1/credit-packs").await;
    assert_eq!(packs.body["data"].as_array().unwrap().len(), 1);
    assert_eq!(packs.body["data"][0]["credits"], "100", "unchanged");
    let one = app.get("/v1/credit-packs/p").await;
    assert_eq!(one.status, StatusCode::OK, "{}", one.body);
    assert_eq!(one.body["credits"], "100");
    assert_eq!(one.body["price_per_credit"], "0.01");
    assert_eq!(
        app.get("/v1/credit-packs/nope").await.status,
        StatusCode::NOT_FOUND
    );

    let bad_topups = [
        (
            json!({ "id": "auto_1", "pack": "p" }),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({ "id": "t", "pack": "p", "quantity": 0 }),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({ "id": "t", "pack": "p", "quantity": 10001 }),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({ "id": "t", "pack": "p", "payment_timeout_seconds": 0 }),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({ "id": "t_nope", "pack": "nope" }),
            StatusCode::NOT_FOUND,
        ),
        (
            json!({ "id": "t", "pack": "p", "extra": 1 }),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({ "id": "x".repeat(101), "pack": "p" }),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (body, status) in bad_topups {
        let reply = app.post("/v1/customers/cus/topups", body.clone()).await;
        assert_eq!(reply.status, status, "{body}: {}", reply.body);
    }
    // Refused by the writer: the order is past the largest amount. The id
    // keeps that outcome, like any refused request.
    put_pack(
        &app,
        "huge",
        json!({ "name": "H", "credits": "1000000000", "price": "1000", "currency": "EUR" }),
    )
    .await;
    let big = json!({ "id": "big", "pack": "huge", "quantity": 10000 });
    let reply = app.post("/v1/customers/cus/topups", big.clone()).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(reply.code(), "amount_too_large");
    let again = app.post("/v1/customers/cus/topups", big).await;
    assert_eq!(again.code(), "amount_too_large");
    assert!(again.replayed());
    let unknown = app
        .post(
            "/v1/customers/nobody/topups",
            json!({ "id": "t_nobody", "pack": "p" }),
        )
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let listed = app.get("/v1/customers/cus/topups").await;
    assert_eq!(listed.body["data"], json!([]), "nothing was written");
    // A pack that does not exist keeps that outcome for its id; an id
    // refused in parsing is still free.
    let nope = app
        .post(
            "/v1/customers/cus/topups",
            json!({ "id": "t_nope", "pack": "nope" }),
        )
        .await;
    assert_eq!(nope.status, StatusCode::NOT_FOUND, "{}", nope.body);
    assert!(nope.replayed());
    let ok = app
        .post(
            "/v1/customers/cus/topups",
            json!({ "id": "t", "pack": "p" }),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    assert_eq!(
        app.post("/v1/topups/nope/confirm", json!({})).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.post("/v1/topups/t/fail", json!({ "reason": " " }))
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        app.post("/v1/topups/t/fail", json!({})).await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        app.get("/v1/topups/t").await.body["status"],
        "pending_payment"
    );
    // A grant id of Tally's own top-ups cannot be taken by hand.
    let grab = app
        .post(
            "/v1/customers/cus/grants",
            json!({ "id": "topup:t", "amount": "5", "source": "purchase", "paid": true }),
        )
        .await;
    assert_eq!(grab.status, StatusCode::BAD_REQUEST, "{}", grab.body);

    let bad_autos = [
        (
            json!({ "pack": "p", "threshold": "500", "target": "500" }),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({ "pack": "p", "threshold": "-1", "target": "500" }),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({ "pack": "p", "threshold": "1", "target": "5", "max_per_day": 0 }),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({ "pack": "p", "threshold": "1", "target": "5", "max_failures": 0 }),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({ "pack": "nope", "threshold": "1", "target": "5" }),
            StatusCode::NOT_FOUND,
        ),
        (
            json!({ "pack": "p", "threshold": "1" }),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (body, status) in bad_autos {
        let reply = app.put("/v1/customers/cus/auto-topup", body.clone()).await;
        assert_eq!(reply.status, status, "{body}: {}", reply.body);
    }
    let none = app.get("/v1/customers/cus/auto-topup").await;
    assert_eq!(none.status, StatusCode::NOT_FOUND, "{}", none.body);
    let nobody = app
        .put(
            "/v1/customers/nobody/auto-topup",
            json!({ "pack": "p", "threshold": "1", "target": "5" }),
        )
        .await;
    assert_eq!(nobody.status, StatusCode::NOT_FOUND);
}

/// The automatic top-up, with the test as the payment system: it reads
/// `topup.created` from a signed webhook and confirms or declines.
#[tokio::test]
async fn auto_topup_buys_below_the_threshold_one_at_a_time_and_stops_after_failures() {
    let mut app = manual_app().await;
    let received = accepting_endpoint(
        &app,
        "pay",
        json!(["topup.created", "topup.succeeded", "topup.failed"]),
    )
    .await;

    put_pack(
        &app,
        "k1",
        json!({ "name": "1,000 credits", "credits": "1000", "price": "10", "currency": "USD" }),
    )
    .await;
    app.customer("cus").await;
    app.grant("cus", "start", "3000").await;
    let set = app.put("/v1/customers/cus/auto-topup",
        json!({ "pack": "k1", "threshold": "500", "target": "2500", "max_per_day": 2, "max_failures": 2 }),
    )
    .await;
    assert_eq!(set.status, StatusCode::OK, "{}", set.body);
    assert_eq!(set.body["status"], "active");
    assert!(set.body["pending_topup"].is_null(), "3,000 is above 500");

    // 3,000 → 400: below 500, so 3 packs (2,100 short of 2,500) are asked for.
    charge_ok(&app, "cus", "c1", "2600").await;
    let state = auto_topup(&app, "cus").await;
    let first = state["pending_topup"].as_str().unwrap().to_string();
    assert!(first.starts_with("auto_"), "{state}");
    let topup = app.get(&format!("/v1/topups/{first}")).await.body;
    assert_eq!(topup["quantity"], 3);
    assert_eq!(topup["credits"], "3000");
    assert_eq!(topup["price"], "30");
    assert_eq!(topup["origin"], "auto");
    assert_eq!(
        micros_of(&app.balance("cus").await["available"]),
        micros("400")
    );
    // One at a time: a further drop starts nothing while it is pending.
    charge_ok(&app, "cus", "c2", "100").await;
    assert_eq!(
        auto_topup(&app, "cus").await["pending_topup"],
        first.as_str()
    );

    let confirmed = app
        .post(
            &format!("/v1/topups/{first}/confirm"),
            json!({ "payment_reference": "pi_1" }),
        )
        .await;
    assert_eq!(confirmed.status, StatusCode::OK, "{}", confirmed.body);
    assert_eq!(confirmed.body["balance_after"], "3300");

    // 3,300 → 300: the second top-up of the day; its payment is declined.
    charge_ok(&app, "cus", "c3", "3000").await;
    let second = auto_topup(&app, "cus").await["pending_topup"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(second, first);
    let declined = app
        .post(
            &format!("/v1/topups/{second}/fail"),
            json!({ "reason": "card_declined" }),
        )
        .await;
    assert_eq!(declined.status, StatusCode::OK, "{}", declined.body);
    let state = auto_topup(&app, "cus").await;
    assert_eq!(state["consecutive_failures"], 1);
    assert_eq!(state["status"], "active");
    // A manual top-up paid meanwhile does not clear the automatic one's failures.
    let manual = app
        .post(
            "/v1/customers/cus/topups",
            json!({ "id": "m1", "pack": "k1" }),
        )
        .await;
    assert_eq!(manual.status, StatusCode::OK, "{}", manual.body);
    let paid = app.post("/v1/topups/m1/confirm", json!({})).await;
    assert_eq!(paid.body["balance_after"], "1300", "{}", paid.body);
    charge_ok(&app, "cus", "m1_spent", "1000").await;
    assert_eq!(auto_topup(&app, "cus").await["consecutive_failures"], 1);
    // Still below the threshold, but two started in the last 24 hours: rate-limited.
    charge_ok(&app, "cus", "c4", "100").await;
    let state = auto_topup(&app, "cus").await;
    assert!(state["pending_topup"].is_null(), "{state}");
    assert_eq!(state["started_last_24h"], 2);

    // The state survives a SIGKILL.
    app.kill().await;
    app.start().await;
    assert_eq!(auto_topup(&app, "cus").await["consecutive_failures"], 1);

    // A day later the limit allows one more; its payment never comes.
    app.advance(DAY).await;
    charge_ok(&app, "cus", "c5", "50").await;
    let third = auto_topup(&app, "cus").await["pending_topup"]
        .as_str()
        .unwrap()
        .to_string();
    app.advance(3601).await;
    let third_state = app.get(&format!("/v1/topups/{third}")).await.body;
    assert_eq!(third_state["status"], "failed");
    assert_eq!(third_state["failure_reason"], "payment_timeout");
    let state = auto_topup(&app, "cus").await;
    assert_eq!(
        state["status"], "suspended",
        "two failures in a row: {state}"
    );
    // Suspended: even a refused charge starts nothing.
    app.advance(DAY).await;
    let refused = app.charge("cus", "c6", "1000").await;
    assert_eq!(refused.status, StatusCode::PAYMENT_REQUIRED);
    assert!(auto_topup(&app, "cus").await["pending_topup"].is_null());

    // Set again: resumed, and the balance is already low, so one starts at once.
    let resumed = app.put("/v1/customers/cus/auto-topup",
        json!({ "pack": "k1", "threshold": "500", "target": "2500", "max_per_day": 2, "max_failures": 2 }),
    )
    .await;
    assert_eq!(resumed.status, StatusCode::OK, "{}", resumed.body);
    assert_eq!(resumed.body["status"], "active");
    assert_eq!(resumed.body["consecutive_failures"], 0);
    let fourth = resumed.body["pending_topup"].as_str().unwrap().to_string();
    let paid = app
        .post(&format!("/v1/topups/{fourth}/confirm"), json!({}))
        .await;
    assert_eq!(paid.status, StatusCode::OK, "{}", paid.body);
    // 150 left + 3 packs.
    assert_eq!(paid.body["balance_after"], "3150");

    // A refused spend also starts one when the balance is low but no entry
    // crossed the threshold (here: right after a failed payment).
    charge_ok(&app, "cus", "c7", "2800").await; // 350: fifth starts
    let fifth = auto_topup(&app, "cus").await["pending_topup"]
        .as_str()
        .unwrap()
        .to_string();
    let declined = app
        .post(
            &format!("/v1/topups/{fifth}/fail"),
            json!({ "reason": "insufficient_funds" }),
        )
        .await;
    assert_eq!(declined.status, StatusCode::OK);
    app.advance(DAY).await;
    let refused = app.charge("cus", "c8", "400").await;
    assert_eq!(refused.status, StatusCode::PAYMENT_REQUIRED);
    assert!(
        auto_topup(&app, "cus").await["pending_topup"].is_string(),
        "the refused charge started a top-up"
    );

    let entries = app.ledger_all("cus").await;
    let replayed = assert_replayable(&entries);
    assert_eq!(micros_of(&app.balance("cus").await["available"]), replayed);
    let topup_grants = entries
        .iter()
        .filter(|e| e["kind"] == "grant")
        .filter(|e| e["reference"].as_str().unwrap_or("").starts_with("topup:"))
        .count();
    assert_eq!(topup_grants, 3, "three payments confirmed, three lots");

    // The webhooks: every signature valid, each notification's payload as sent.
    let mut seen: Vec<(String, Value)> = Vec::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let received = received.lock().unwrap();
        seen = received
            .requests
            .iter()
            .map(|(_, body, _)| {
                let value: Value = serde_json::from_str(body).unwrap();
                (value["type"].as_str().unwrap().to_string(), value)
            })
            .collect();
        if seen.len() >= 13 {
            break;
        }
    }
    let received = received.lock().unwrap();
    assert_eq!(received.bad_signatures, 0);
    let count = |kind: &str| seen.iter().filter(|(k, _)| k == kind).count();
    assert_eq!(count("topup.created"), 7, "{seen:?}");
    assert_eq!(count("topup.succeeded"), 3, "{seen:?}");
    assert_eq!(count("topup.failed"), 3, "{seen:?}");
    let suspended = seen
        .iter()
        .filter(|(k, _)| k == "topup.failed")
        .find(|(_, v)| v["data"]["auto_topup_suspended"] == true)
        .expect("the failure that suspended it says so");
    assert_eq!(suspended.1["data"]["reason"], "payment_timeout");
    let mut ids: Vec<&String> = received.requests.iter().map(|(id, _, _)| id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), received.requests.len(), "each delivery once");
}

/// Only the balance a whole change leaves counts: a renewal passes through
/// zero (the old allocation expires, the new one is granted) and must not
/// buy credits; a void takes credits back without buying any by itself.
#[tokio::test]
async fn a_renewal_or_a_void_starts_no_topup_by_itself() {
    let app = manual_app().await;
    put_pack(
        &app,
        "k1",
        json!({ "name": "1,000 credits", "credits": "1000", "price": "10", "currency": "USD" }),
    )
    .await;
    let plan = app
        .put(
            "/v1/plans/basic",
            json!({ "name": "Basic", "period": "month", "included_credits": "1000" }),
        )
        .await;
    assert_eq!(plan.status, StatusCode::OK, "{}", plan.body);
    app.customer("cus").await;
    let sub = app
        .put(
            "/v1/customers/cus/subscription",
            json!({ "id": "sub", "plan": "basic" }),
        )
        .await;
    assert_eq!(sub.status, StatusCode::OK, "{}", sub.body);
    let set = app
        .put(
            "/v1/customers/cus/auto-topup",
            json!({ "pack": "k1", "threshold": "500", "target": "1500" }),
        )
        .await;
    assert_eq!(set.status, StatusCode::OK, "{}", set.body);
    assert!(set.body["pending_topup"].is_null(), "1,000 is above 500");
    charge_ok(&app, "cus", "c1", "400").await;
    for _ in 0..3 {
        app.advance(31 * DAY).await;
        assert_eq!(
            micros_of(&app.balance("cus").await["available"]),
            micros("1000")
        );
        let state = auto_topup(&app, "cus").await;
        assert!(
            state["pending_topup"].is_null(),
            "renewed to 1,000: {state}"
        );
    }
    let listed = app.get("/v1/customers/cus/topups").await;
    assert_eq!(listed.body["data"], json!([]), "no top-up was ever started");

    // A manual purchase, mostly left when it is voided (a chargeback): the
    // balance falls to 100, below the threshold, and nothing is bought.
    let tp = app
        .post(
            "/v1/customers/cus/topups",
            json!({ "id": "tp", "pack": "k1" }),
        )
        .await;
    assert_eq!(tp.status, StatusCode::OK, "{}", tp.body);
    assert_eq!(
        app.post("/v1/topups/tp/confirm", json!({})).await.body["balance_after"],
        "2000"
    );
    charge_ok(&app, "cus", "c2", "900").await;
    let void = app
        .post(
            "/v1/grants/topup:tp/void",
            json!({ "id": "v1", "reason": "chargeback" }),
        )
        .await;
    assert_eq!(void.status, StatusCode::OK, "{}", void.body);
    assert_eq!(
        micros_of(&app.balance("cus").await["available"]),
        micros("100")
    );
    assert!(auto_topup(&app, "cus").await["pending_topup"].is_null());
    // The next spend below the threshold does.
    charge_ok(&app, "cus", "c3", "50").await;
    let pending = auto_topup(&app, "cus").await["pending_topup"].clone();
    let topup = app
        .get(&format!("/v1/topups/{}", pending.as_str().unwrap()))
        .await;
    assert_eq!(
        topup.body["quantity"], 2,
        "1,450 short of 1,500: {}",
        topup.body
    );
}

/// Transfers out of a customer count like its own spends: one that takes the
/// balance below the threshold starts an automatic top-up, and so does one
/// refused for want of credits while the balance is low.
#[tokio::test]
async fn transfers_out_start_the_senders_automatic_topup() {
    let app = manual_app().await;
    put_pack(
        &app,
        "k1",
        json!({ "name": "1,000 credits", "credits": "1000", "price": "10", "currency": "USD" }),
    )
    .await;
    app.customer("cus").await;
    app.customer("other").await;
    app.grant("cus", "start", "3000").await;
    let set = app.put("/v1/customers/cus/auto-topup",
        json!({ "pack": "k1", "threshold": "500", "target": "2500", "max_per_day": 5, "max_failures": 5 }),
    )
    .await;
    assert_eq!(set.status, StatusCode::OK, "{}", set.body);
    let transfer = |id: &'static str, amount: &'static str| {
        let app = &app;
        async move {
            app.post(
                "/v1/transfers",
                json!({ "id": id, "from": { "customer_id": "cus" },
                        "to": { "customer_id": "other" }, "amount": amount }),
            )
            .await
        }
    };
    // 3,000 → 400: below 500.
    let sent = transfer("t1", "2600").await;
    assert_eq!(sent.status, StatusCode::OK, "{}", sent.body);
    let first = auto_topup(&app, "cus").await["pending_topup"]
        .as_str()
        .expect("the transfer started a top-up")
        .to_string();
    let declined = app
        .post(
            &format!("/v1/topups/{first}/fail"),
            json!({ "reason": "card_declined" }),
        )
        .await;
    assert_eq!(declined.status, StatusCode::OK, "{}", declined.body);
    assert!(auto_topup(&app, "cus").await["pending_topup"].is_null());
    // No entry crosses the threshold now; the refused transfer starts one.
    let refused = transfer("t2", "1000").await;
    assert_eq!(
        refused.status,
        StatusCode::PAYMENT_REQUIRED,
        "{}",
        refused.body
    );
    let second = auto_topup(&app, "cus").await["pending_topup"]
        .as_str()
        .expect("the refused transfer started a top-up")
        .to_string();
    assert_ne!(first, second);
    let paid = app
        .post(&format!("/v1/topups/{second}/confirm"), json!({}))
        .await;
    assert_eq!(paid.status, StatusCode::OK, "{}", paid.body);
    // 400 + 3 packs (2,100 short of 2,500): the transfer now goes through.
    assert_eq!(paid.body["balance_after"], "3400");
    let retried = transfer("t3", "1000").await;
    assert_eq!(retried.status, StatusCode::OK, "{}", retried.body);
    assert_eq!(retried.body["from"]["balance_after"], "2400");
    assert_eq!(
        micros_of(&app.balance("other").await["available"]),
        micros("3600")
    );
}

/// Void `lot` with void id `id`, asserting success; the answer's body.
async fn void_lot(app: &TestApp, id: &str, lot: &str) -> Value {
    let reply = app
        .post(
            &format!("/v1/grants/{lot}/void"),
            json!({ "id": id, "reason": "refund the rest" }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    reply.body
}

/// A new customer buys one `pack` in a top-up `tp_<customer>`, confirmed
/// with `confirmation`; the top-up's id.
async fn buy_a_pack(app: &TestApp, customer: &str, pack: &str, confirmation: Value) -> String {
    app.customer(customer).await;
    let topup = format!("tp_{customer}");
    let created = app
        .post(
            &format!("/v1/customers/{customer}/topups"),
            json!({ "id": topup, "pack": pack, "quantity": 1 }),
        )
        .await;
    assert_eq!(created.status, StatusCode::OK, "{}", created.body);
    let confirmed = app
        .post(&format!("/v1/topups/{topup}/confirm"), confirmation)
        .await;
    assert_eq!(confirmed.status, StatusCode::OK, "{}", confirmed.body);
    topup
}

/// Bug 3 of PRODUCT.md for a top-up whose price does not divide evenly:
/// voiding what is unused refunds an amount that, with what the spent
/// credits were worth, makes exactly the payment. A probe found 3 credits
/// for 1 USD voided unused reported 0.999999 USD (the per-credit cost basis,
/// rounded to 0.333333, times 3).
#[tokio::test]
async fn voiding_a_topup_reconciles_with_its_exact_payment() {
    let app = manual_app().await;
    let pack = put_pack(
        &app,
        "thirds",
        json!({ "name": "3 credits", "credits": "3", "price": "1", "currency": "USD" }),
    )
    .await;
    assert_eq!(pack["price_per_credit"], "0.333333");
    for (customer, spend) in [("unused", None), ("used", Some("1"))] {
        let topup = buy_a_pack(&app, customer, "thirds", json!({})).await;
        if let Some(amount) = spend {
            charge_ok(&app, customer, &format!("c_{customer}"), amount).await;
        }
        let void = app
            .post(
                &format!("/v1/grants/topup:{topup}/void"),
                json!({ "id": format!("v_{customer}"), "reason": "refund the rest" }),
            )
            .await;
        assert_eq!(void.status, StatusCode::OK, "{}", void.body);
        let expected = match spend {
            None => ("3", "1"),
            // 2 of 3 credits: 0.67 back (in cents), so 0.33 was spent.
            Some(_) => ("2", "0.67"),
        };
        assert_eq!(void.body["voided"], expected.0, "{}", void.body);
        assert_eq!(
            void.body["refundable_money"],
            json!({ "amount": expected.1, "currency": "USD" }),
            "{}",
            void.body
        );
    }
}

/// Bug 3 of PRODUCT.md with a hold open, and with a refund: a top-up's lot
/// voided while a hold reserves part of it, then the lot the hold's release
/// makes, voided too, give back exactly the payment between them (1 USD for
/// 3 credits: 0.333333 and 0.666667; each rounding its own part gave
/// 0.999999). Likewise a charge refunded after the void. The lots made from
/// the top-up carry its payment reference.
#[tokio::test]
async fn a_topups_lot_and_the_lots_made_from_it_refund_exactly_its_payment() {
    let app = manual_app().await;
    put_pack(
        &app,
        "thirds",
        json!({ "name": "3 credits", "credits": "3", "price": "1", "currency": "USD" }),
    )
    .await;
    for customer in ["held", "refunded"] {
        let payment = json!({ "payment_reference": format!("pi_{customer}") });
        let topup = buy_a_pack(&app, customer, "thirds", payment).await;
        if customer == "held" {
            let hold = app
                .post(
                    "/v1/holds",
                    json!({ "id": "h", "customer_id": customer, "amount": "2", "timeout_seconds": 60 }),
                )
                .await;
            assert_eq!(hold.status, StatusCode::OK, "{}", hold.body);
        } else {
            charge_ok(&app, customer, "c", "2").await;
        }
        let first = void_lot(&app, &format!("v1_{customer}"), &format!("topup:{topup}")).await;
        assert_eq!(first["voided"], "1");
        assert_eq!(first["refundable_money"]["amount"], "0.33");
        let made = if customer == "held" {
            let released = app.post("/v1/holds/h/release", json!({})).await;
            assert_eq!(released.status, StatusCode::OK, "{}", released.body);
            "release:h:1".to_string()
        } else {
            let refund = app
                .post(
                    "/v1/refunds",
                    json!({ "id": "rf", "charge_id": "c", "reason": "failed" }),
                )
                .await;
            assert_eq!(refund.status, StatusCode::OK, "{}", refund.body);
            "refund:rf:1".to_string()
        };
        let grants = app.get(&format!("/v1/customers/{customer}/grants")).await;
        let lot = grants.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["id"] == made.as_str())
            .unwrap_or_else(|| panic!("the lot {made}: {}", grants.body))
            .clone();
        assert_eq!(lot["remaining"], "2");
        assert_eq!(lot["external_reference"], format!("pi_{customer}"), "{lot}");
        assert_eq!(lot["origin"], format!("topup:{topup}"), "{lot}");
        let second = void_lot(&app, &format!("v2_{customer}"), &made).await;
        assert_eq!(second["voided"], "2");
        assert_eq!(
            second["refundable_money"],
            json!({ "amount": "0.67", "currency": "USD" }),
            "0.33 + 0.67 is the payment"
        );
    }
}

/// Refunds are in amounts a payment can be made in, and the voids of one
/// purchase add up to it wherever its credits went. A probe found: a
/// top-up's credits transferred to another customer and voided there gave
/// back 2,000,001 USD of a 2,000,000 USD payment (the lot had only the
/// rounded cost basis); 666.666667 JPY; and a paid grant's lot and its
/// hold's return voided apart gave back twice its value (each rounded up).
#[tokio::test]
async fn refunds_are_in_whole_minor_units_and_add_up_to_the_purchase() {
    let app = manual_app().await;
    // A top-up's credits, one third transferred away: the two voids make
    // the payment.
    put_pack(
        &app,
        "two",
        json!({ "name": "3 for 2", "credits": "3", "price": "2", "currency": "USD" }),
    )
    .await;
    let topup = buy_a_pack(&app, "payer", "two", json!({"payment_reference": "pi_2"})).await;
    app.customer("friend").await;
    let moved = app
        .post(
            "/v1/transfers",
            json!({ "id": "tr", "from": {"customer_id": "payer"}, "to": {"customer_id": "friend"}, "amount": "1" }),
        )
        .await;
    assert_eq!(moved.status, StatusCode::OK, "{}", moved.body);
    let friends = app.get("/v1/customers/friend/grants").await;
    assert_eq!(friends.body["data"][0]["origin"], format!("topup:{topup}"));
    let there = void_lot(&app, "v_friend", "transfer:tr:0").await;
    assert_eq!(
        there["refundable_money"],
        json!({"amount": "0.67", "currency": "USD"})
    );
    let here = void_lot(&app, "v_payer", &format!("topup:{topup}")).await;
    assert_eq!(
        here["refundable_money"],
        json!({"amount": "1.33", "currency": "USD"})
    );
    // In yen: whole yen.
    put_pack(
        &app,
        "yen",
        json!({ "name": "3 for 1000", "credits": "3", "price": "1000", "currency": "JPY" }),
    )
    .await;
    let topup = buy_a_pack(&app, "tokyo", "yen", json!({})).await;
    charge_ok(&app, "tokyo", "c_tokyo", "1").await;
    let yen = void_lot(&app, "v_tokyo", &format!("topup:{topup}")).await;
    assert_eq!(
        yen["refundable_money"],
        json!({"amount": "667", "currency": "JPY"})
    );
    // A paid grant (outside a top-up) voided while a hold reserves half of
    // it, then the hold's return voided: the lot's value once, not twice.
    app.customer("gold").await;
    let granted = app
        .post(
            "/v1/customers/gold/grants",
            json!({ "id": "g_gold", "amount": "1", "source": "purchase", "paid": true,
                    "cost_basis": {"amount": "0.000001", "currency": "XAU"} }),
        )
        .await;
    assert_eq!(granted.status, StatusCode::OK, "{}", granted.body);
    let held = app
        .post(
            "/v1/holds",
            json!({ "id": "h_gold", "customer_id": "gold", "amount": "0.5", "timeout_seconds": 60 }),
        )
        .await;
    assert_eq!(held.status, StatusCode::OK, "{}", held.body);
    let first = void_lot(&app, "v_gold1", "g_gold").await;
    assert_eq!(first["refundable_money"]["amount"], "0.000001");
    let released = app.post("/v1/holds/h_gold/release", json!({})).await;
    assert_eq!(released.status, StatusCode::OK, "{}", released.body);
    let second = void_lot(&app, "v_gold2", "release:h_gold:1").await;
    assert_eq!(second["voided"], "0.5");
    assert_eq!(second["refundable_money"]["amount"], "0", "{second}");
}

/// What the grant would refuse once the money is taken is refused when the
/// top-up starts: the credits past the largest amount once added to the
/// other unresolved top-ups, the pending lots and the holds, or a lot whose
/// money value would be. A pack whose price per credit rounds to nothing is
/// refused. A payment that comes late ends the suspension its timeout
/// caused, and a due automatic top-up that cannot start says why.
#[tokio::test]
async fn a_topup_that_could_never_be_granted_is_refused_when_it_starts() {
    let app = manual_app().await;
    let too_large = |reply: &crate::support::Reply| {
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
        assert_eq!(reply.code(), "amount_too_large", "{}", reply.body);
    };
    // Half the largest amount, at 0.000001 each.
    put_pack(
        &app,
        "half",
        json!({ "name": "Half", "credits": "600000000000", "price": "600000", "currency": "USD" }),
    )
    .await;
    app.customer("two").await;
    let first = app
        .post(
            "/v1/customers/two/topups",
            json!({ "id": "h1", "pack": "half" }),
        )
        .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    // The first one's payment may still come: the second could never be granted.
    too_large(
        &app.post(
            "/v1/customers/two/topups",
            json!({ "id": "h2", "pack": "half" }),
        )
        .await,
    );
    let paid = app.post("/v1/topups/h1/confirm", json!({})).await;
    assert_eq!(paid.status, StatusCode::OK, "{}", paid.body);
    assert_eq!(paid.body["balance_after"], "600000000000");

    // Credits that take effect later count too.
    app.customer("later").await;
    let pending = app
        .post(
            "/v1/customers/later/grants",
            json!({ "id": "soon", "amount": "600000000000", "source": "promotion", "paid": false,
                    "effective_at": "2099-01-01T00:00:00Z" }),
        )
        .await;
    assert_eq!(pending.status, StatusCode::OK, "{}", pending.body);
    too_large(
        &app.post(
            "/v1/customers/later/topups",
            json!({ "id": "l1", "pack": "half" }),
        )
        .await,
    );

    // Six credits at 166,666,666,666.666667 each are worth past the largest
    // amount (in gold, whose price may have six decimal places).
    put_pack(
        &app,
        "pricey",
        json!({ "name": "Pricey", "credits": "6", "price": "999999999999.999999", "currency": "XAU" }),
    )
    .await;
    app.customer("rich").await;
    too_large(
        &app.post(
            "/v1/customers/rich/topups",
            json!({ "id": "r1", "pack": "pricey" }),
        )
        .await,
    );
    for (customer, id) in [("later", "l1"), ("rich", "r1"), ("two", "h2")] {
        let listed = app.get(&format!("/v1/customers/{customer}/topups")).await;
        assert!(
            listed.body["data"]
                .as_array()
                .unwrap()
                .iter()
                .all(|t| t["id"] != id),
            "{id} was not started: {}",
            listed.body
        );
    }

    // 1 USD for 3,000,000 credits: 0.00000033 each, 0 at 6 decimal places.
    let worthless = app
        .put(
            "/v1/credit-packs/tokens",
            json!({ "name": "Tokens", "credits": "3000000", "price": "1", "currency": "USD" }),
        )
        .await;
    assert_eq!(
        worthless.status,
        StatusCode::BAD_REQUEST,
        "{}",
        worthless.body
    );
    assert_eq!(
        worthless.body["error"]["param"], "price",
        "{}",
        worthless.body
    );
    let free = put_pack(
        &app,
        "free",
        json!({ "name": "Free", "credits": "10", "price": "0", "currency": "USD" }),
    )
    .await;
    assert_eq!(free["price"], "0", "a free pack is still allowed");

    // Suspended by a timed-out payment, resumed by its money coming late.
    put_pack(
        &app,
        "k1",
        json!({ "name": "1,000 credits", "credits": "1000", "price": "10", "currency": "USD" }),
    )
    .await;
    app.customer("late").await;
    app.grant("late", "start", "600").await;
    let set = app
        .put(
            "/v1/customers/late/auto-topup",
            json!({ "pack": "k1", "threshold": "500", "target": "2500", "max_failures": 1,
                    "payment_timeout_seconds": 60 }),
        )
        .await;
    assert_eq!(set.status, StatusCode::OK, "{}", set.body);
    charge_ok(&app, "late", "late_1", "200").await;
    let due = auto_topup(&app, "late").await["pending_topup"]
        .as_str()
        .expect("below the threshold: one started")
        .to_string();
    app.advance(120).await;
    let state = auto_topup(&app, "late").await;
    assert_eq!(state["status"], "suspended", "{state}");
    let paid = app
        .post(&format!("/v1/topups/{due}/confirm"), json!({}))
        .await;
    assert_eq!(paid.status, StatusCode::OK, "{}", paid.body);
    let state = auto_topup(&app, "late").await;
    assert_eq!(
        state["status"], "active",
        "the payment came after all: {state}"
    );
    assert_eq!(state["consecutive_failures"], 0);
    assert!(state["last_refusal"].is_null(), "{state}");

    // Due, but its order could never be granted: the state says so.
    app.customer("stuck").await;
    app.grant("stuck", "big", "600000000000").await;
    let set = app
        .put(
            "/v1/customers/stuck/auto-topup",
            json!({ "pack": "half", "threshold": "700000000000", "target": "999000000000" }),
        )
        .await;
    assert_eq!(set.status, StatusCode::OK, "{}", set.body);
    let state = auto_topup(&app, "stuck").await;
    assert!(state["pending_topup"].is_null(), "{state}");
    let message = state["last_refusal"]["message"].as_str().unwrap_or("");
    assert!(message.contains("largest amount"), "{state}");
}
