//! Overage policies over HTTP: block, allow_negative down to a limit, and
//! metered_only (events go into debt, synchronous charges and holds do not);
//! debt repaid first by the next grant, also one that takes effect later
//! while the server is down; refunds of overage; dead letters refused by
//! the policy and replayed after it changes; every bad input refused without
//! change.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::support::{assert_replayable, micros, Options, Reply, TestApp, ADMIN_KEY};

async fn put_overage(app: &TestApp, customer: &str, body: Value) -> Reply {
    app.send(
        Method::PUT,
        &format!("/v1/customers/{customer}/overage"),
        Some(ADMIN_KEY),
        Some(&body),
    )
    .await
}

async fn charge(app: &TestApp, id: &str, customer: &str, amount: &str) -> Reply {
    app.post(
        "/v1/charges",
        json!({ "id": id, "customer_id": customer, "amount": amount }),
    )
    .await
}

/// (available, debt) in micro-credits.
async fn standing(app: &TestApp, customer: &str) -> (i64, i64) {
    let balance = app.balance(customer).await;
    (
        micros(balance["available"].as_str().unwrap()),
        micros(balance["debt"].as_str().unwrap()),
    )
}

const UNIT: i64 = 1_000_000;

/// Create `id` with the allow_negative policy down to `limit`, asserting success.
async fn customer_allowed_negative(app: &TestApp, id: &str, limit: &str) -> Reply {
    let reply = app
        .post(
            "/v1/customers",
            json!({ "id": id, "overage": { "policy": "allow_negative", "limit": limit } }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    reply
}

#[tokio::test]
async fn allow_negative_goes_below_zero_down_to_the_limit_and_the_next_grant_repays_first() {
    let app = TestApp::spawn().await;
    let reply = customer_allowed_negative(&app, "c1", "50").await;
    assert_eq!(
        reply.body["overage"],
        json!({ "policy": "allow_negative", "limit": "50" })
    );
    app.grant("c1", "g1", "100").await;

    let first = charge(&app, "ch1", "c1", "130").await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(first.body["on_debt"], "30");
    assert_eq!(first.body["balance_after"], "-30");
    assert_eq!(
        first.body["drawn"],
        json!([{ "grant_id": "g1", "amount": "100" }])
    );
    assert_eq!(standing(&app, "c1").await, (0, 30 * UNIT));

    // 21 more would pass the limit of 50: refused, nothing changes, and the
    // refusal is kept under its id.
    let over = charge(&app, "ch2", "c1", "21").await;
    assert_eq!(over.status, StatusCode::PAYMENT_REQUIRED, "{}", over.body);
    assert_eq!(over.code(), "insufficient_credits");
    assert_eq!(standing(&app, "c1").await, (0, 30 * UNIT));
    let again = charge(&app, "ch2", "c1", "21").await;
    assert_eq!(again.status, StatusCode::PAYMENT_REQUIRED);
    assert!(again.replayed());

    // Exactly to the limit is fine.
    let to_limit = charge(&app, "ch3", "c1", "20").await;
    assert_eq!(to_limit.status, StatusCode::OK, "{}", to_limit.body);
    assert_eq!(to_limit.body["balance_after"], "-50");

    // A hold past the limit is refused too; within it, it reserves.
    let hold = app
        .post(
            "/v1/holds",
            json!({ "id": "h1", "customer_id": "c1", "amount": "1", "timeout_seconds": 60 }),
        )
        .await;
    assert_eq!(hold.status, StatusCode::PAYMENT_REQUIRED, "{}", hold.body);

    // The next grant repays the 50 first, in the same entry.
    let grant = app
        .post(
            "/v1/customers/c1/grants",
            json!({ "id": "g2", "amount": "80", "source": "purchase", "paid": true }),
        )
        .await;
    assert_eq!(grant.status, StatusCode::OK, "{}", grant.body);
    assert_eq!(grant.body["amount"], "80");
    assert_eq!(grant.body["remaining"], "30");
    assert_eq!(standing(&app, "c1").await, (30 * UNIT, 0));

    let entries = app.ledger_all("c1").await;
    assert_eq!(assert_replayable(&entries), 30 * UNIT);
    let grant_entry = &entries[0];
    assert_eq!(grant_entry["kind"], "grant");
    assert!(
        grant_entry["postings"]
            .as_array()
            .unwrap()
            .contains(&json!({ "from": "grant:g2", "to": "debt", "amount": "50" })),
        "{grant_entry}"
    );
    // The entry of the first charge explains its overage.
    let id = first.body["entry_id"].as_str().unwrap();
    let detail = app.get(&format!("/v1/ledger/{id}")).await;
    let explanation = detail.body["explanation"].as_str().unwrap();
    assert!(
        explanation.contains("30 of it past the credits as debt"),
        "{explanation}"
    );
}

#[tokio::test]
async fn metered_only_charges_events_into_debt_but_refuses_synchronous_spends() {
    let app = TestApp::spawn().await;
    app.features(&["api"]).await;
    app.publish_version(
        "v1",
        json!([{ "feature": "api", "credits_per_unit": "2" }]),
        None,
    )
    .await;
    app.customer("c1").await;
    app.grant("c1", "g1", "10").await;

    // Under the default block policy, an event past the credits is refused
    // and kept as a dead letter.
    let events = |id: &str, quantity: i64| json!({ "events": [{ "id": id, "customer_id": "c1", "feature": "api", "quantity": quantity }] });
    let reply = app.post("/v1/events", events("e1", 8)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["results"][0]["status"], "rejected");
    assert_eq!(
        reply.body["results"][0]["error"]["code"],
        "insufficient_credits"
    );
    let letters = app.get("/v1/dead-letters?status=pending").await;
    let letter = letters.body["data"][0].clone();
    assert_eq!(letter["code"], "insufficient_credits", "{letter}");

    let reply = put_overage(&app, "c1", json!({ "policy": "metered_only" })).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["overage"], json!({ "policy": "metered_only" }));

    // The replay now charges it: 10 from the grant, 6 on debt.
    let replay = app
        .post(
            &format!("/v1/dead-letters/{}/replay", letter["id"].as_str().unwrap()),
            json!({}),
        )
        .await;
    assert_eq!(replay.status, StatusCode::OK, "{}", replay.body);
    assert_eq!(
        replay.body["result"]["status"], "charged",
        "{}",
        replay.body
    );
    assert_eq!(replay.body["result"]["on_debt"], "6");
    assert_eq!(replay.body["result"]["balance_after"], "-6");
    assert_eq!(standing(&app, "c1").await, (0, 6 * UNIT));

    // Synchronous charges and holds still say no, even for one micro-credit.
    let sync = charge(&app, "ch1", "c1", "0.000001").await;
    assert_eq!(sync.status, StatusCode::PAYMENT_REQUIRED, "{}", sync.body);
    let hold = app
        .post(
            "/v1/holds",
            json!({ "id": "h1", "customer_id": "c1", "feature": "api", "quantity": 1, "timeout_seconds": 60 }),
        )
        .await;
    assert_eq!(hold.status, StatusCode::PAYMENT_REQUIRED, "{}", hold.body);

    // More usage keeps going into debt.
    let reply = app.post("/v1/events", events("e2", 100)).await;
    assert_eq!(reply.body["results"][0]["status"], "charged");
    assert_eq!(reply.body["results"][0]["balance_after"], "-206");

    // Refunding an overage event cancels that debt.
    let refund = app
        .post(
            "/v1/refunds",
            json!({ "id": "r1", "charge_id": "e2", "amount": "150", "reason": "outage" }),
        )
        .await;
    assert_eq!(refund.status, StatusCode::OK, "{}", refund.body);
    assert_eq!(refund.body["balance_after"], "-56");
    assert_eq!(standing(&app, "c1").await, (0, 56 * UNIT));

    // A limit caps it: 56 owed, limit 60, an event of 6 is refused.
    let reply = put_overage(
        &app,
        "c1",
        json!({ "policy": "metered_only", "limit": "60" }),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let reply = app.post("/v1/events", events("e3", 3)).await;
    assert_eq!(reply.body["results"][0]["status"], "rejected");
    let reply = app.post("/v1/events", events("e4", 2)).await;
    assert_eq!(reply.body["results"][0]["status"], "charged");
    assert_eq!(standing(&app, "c1").await, (0, 60 * UNIT));

    // Back to block: the debt stays owed, nothing more is lent.
    let reply = put_overage(&app, "c1", json!({ "policy": "block" })).await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = app.post("/v1/events", events("e5", 1)).await;
    assert_eq!(reply.body["results"][0]["status"], "rejected");
    assert_eq!(standing(&app, "c1").await, (0, 60 * UNIT));
    assert_eq!(assert_replayable(&app.ledger_all("c1").await), -60 * UNIT);
}

#[tokio::test]
async fn debt_survives_a_restart_and_a_grant_taking_effect_meanwhile_repays_it() {
    let mut app = TestApp::spawn_with(Options {
        manual_clock: true,
        ..Options::default()
    })
    .await;
    let reply = app
        .post("/v1/clock/advance", json!({ "to": "2030-01-01T00:00:00Z" }))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    customer_allowed_negative(&app, "c1", "100").await;
    app.grant("c1", "g1", "10").await;
    let reply = app
        .post(
            "/v1/customers/c1/grants",
            json!({ "id": "next-month", "amount": "70", "source": "plan_allocation", "paid": false,
                    "effective_at": "2030-02-01T00:00:00Z" }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    // A hold reserving past the credits: 10 from g1, 15 of overdraft.
    let hold = app
        .post(
            "/v1/holds",
            json!({ "id": "h1", "customer_id": "c1", "amount": "25", "timeout_seconds": 3600 }),
        )
        .await;
    assert_eq!(hold.status, StatusCode::OK, "{}", hold.body);

    app.kill().await;
    app.start().await;

    // After the restart the hold still counts against the allowance: 85 left.
    let over = charge(&app, "ch1", "c1", "86").await;
    assert_eq!(over.status, StatusCode::PAYMENT_REQUIRED, "{}", over.body);
    let capture = app
        .post("/v1/holds/h1/capture", json!({ "amount": "20" }))
        .await;
    assert_eq!(capture.status, StatusCode::OK, "{}", capture.body);
    assert_eq!(capture.body["on_debt"], "10");
    assert_eq!(capture.body["balance_after"], "-10");

    app.kill().await;
    app.start().await;
    assert_eq!(standing(&app, "c1").await, (0, 10 * UNIT));

    // The plan allocation takes effect on Feb 1 and repays the 10 then.
    let reply = app
        .post("/v1/clock/advance", json!({ "to": "2030-02-02T00:00:00Z" }))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(standing(&app, "c1").await, (60 * UNIT, 0));
    // The journal records it (the scheduler's tick writes it).
    let mut repaid = None;
    for _ in 0..100 {
        let entries = app.ledger_all("c1").await;
        if let Some(entry) = entries.iter().find(|e| e["kind"] == "debt_repaid") {
            repaid = Some(entry.clone());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let repaid = repaid.expect("a debt_repaid entry within 5 s");
    assert_eq!(repaid["amount"], "10");
    assert_eq!(repaid["effective_at"], "2030-02-01T00:00:00Z");
    assert_eq!(repaid["balance_after"], "60");
}

#[tokio::test]
async fn bad_overage_input_is_refused_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let cases = [
        json!({ "policy": "sometimes" }),
        json!({ "policy": "allow_negative" }),
        json!({ "policy": "allow_negative", "limit": "-5" }),
        json!({ "policy": "block", "limit": "5" }),
        json!({ "policy": "metered_only", "limit": "0.0000001" }),
        json!({ "policy": "metered_only", "cap": "5" }),
        json!({ "limit": "5" }),
    ];
    for (index, overage) in cases.iter().enumerate() {
        let id = format!("bad{index}");
        let reply = app
            .post("/v1/customers", json!({ "id": id, "overage": overage }))
            .await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{overage}: {}",
            reply.body
        );
        let missing = app.get(&format!("/v1/customers/{id}")).await;
        assert_eq!(
            missing.status,
            StatusCode::NOT_FOUND,
            "{overage} created {id}"
        );
    }
    app.customer("c1").await;
    for overage in &cases {
        let reply = put_overage(&app, "c1", overage.clone()).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{overage}: {}",
            reply.body
        );
    }
    // A limit negative, missing or not taken names the limit, not the policy.
    for (overage, param) in [
        (json!({ "policy": "allow_negative" }), "limit"),
        (json!({ "policy": "block", "limit": "5" }), "limit"),
        (json!({ "policy": "sometimes" }), "policy"),
    ] {
        let reply = put_overage(&app, "c1", overage.clone()).await;
        assert_eq!(
            reply.body["error"]["param"], param,
            "{overage}: {}",
            reply.body
        );
    }
    let negative = json!({ "policy": "allow_negative", "limit": "-5" });
    let reply = put_overage(&app, "c1", negative.clone()).await;
    assert_eq!(reply.body["error"]["param"], "limit", "{}", reply.body);
    let reply = app
        .post("/v1/customers", json!({ "id": "bad", "overage": negative }))
        .await;
    assert_eq!(
        reply.body["error"]["param"], "overage.limit",
        "{}",
        reply.body
    );
    let customer = app.get("/v1/customers/c1").await;
    assert_eq!(customer.body["overage"], json!({ "policy": "block" }));
    let reply = put_overage(&app, "nobody", json!({ "policy": "block" })).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.body);
    // Without a key: 401, and nothing changes.
    let reply = app
        .send(
            Method::PUT,
            "/v1/customers/c1/overage",
            None,
            Some(&json!({ "policy": "metered_only" })),
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let customer = app.get("/v1/customers/c1").await;
    assert_eq!(customer.body["overage"], json!({ "policy": "block" }));
}

#[tokio::test]
async fn a_customer_without_grants_can_owe_and_its_ledger_survives_a_restart() {
    let mut app = TestApp::spawn().await;
    app.features(&["api"]).await;
    app.publish_version(
        "v1",
        json!([{ "feature": "api", "credits_per_unit": "2" }]),
        None,
    )
    .await;
    customer_allowed_negative(&app, "c1", "100").await;
    // No grant at all: everything goes on debt.
    let first = charge(&app, "ch1", "c1", "10").await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(first.body["drawn"], json!([]));
    assert_eq!(first.body["on_debt"], "10");
    let reply = app
        .post(
            "/v1/events",
            json!({ "events": [{ "id": "e1", "customer_id": "c1", "feature": "api", "quantity": 3 }] }),
        )
        .await;
    assert_eq!(
        reply.body["results"][0]["balance_after"], "-16",
        "{}",
        reply.body
    );
    let hold = app
        .post(
            "/v1/holds",
            json!({ "id": "h1", "customer_id": "c1", "amount": "5", "timeout_seconds": 60 }),
        )
        .await;
    assert_eq!(hold.status, StatusCode::OK, "{}", hold.body);

    app.kill().await;
    app.start().await;
    assert_eq!(standing(&app, "c1").await, (0, 16 * UNIT));
    let entries = app.ledger_all("c1").await;
    assert_eq!(
        entries.len(),
        3,
        "every entry is still on the chain: {entries:?}"
    );
    assert_eq!(assert_replayable(&entries), -16 * UNIT);
    // The first grant repays, and the chain goes on through the grant rows.
    app.grant("c1", "g1", "20").await;
    let capture = app.post("/v1/holds/h1/capture", json!({})).await;
    assert_eq!(capture.status, StatusCode::OK, "{}", capture.body);
    assert_eq!(capture.body["balance_after"], "-1");
    app.kill().await;
    app.start().await;
    let entries = app.ledger_all("c1").await;
    assert_eq!(entries.len(), 5);
    assert_eq!(assert_replayable(&entries), -UNIT);
}

/// A hold past the credits reserves the rest against the overage limit: no
/// credits move for that part, and the hold's entry (and its release's)
/// says so, since its postings add up to less than its amount.
#[tokio::test]
async fn a_hold_past_the_credits_explains_what_it_reserves_against_the_limit() {
    let app = TestApp::spawn().await;
    customer_allowed_negative(&app, "ng", "100").await;
    app.grant("ng", "g", "3").await;
    let held = app
        .post(
            "/v1/holds",
            json!({ "id": "h", "customer_id": "ng", "amount": "5", "timeout_seconds": 100 }),
        )
        .await;
    assert_eq!(held.status, StatusCode::OK, "{}", held.body);
    let balance = app.balance("ng").await;
    assert_eq!(
        (balance["held"].as_str(), balance["debt"].as_str()),
        (Some("5"), Some("0"))
    );
    let explained = |kind: &'static str| {
        let app = &app;
        async move {
            let entries = app.ledger_all("ng").await;
            let entry = entries
                .iter()
                .find(|e| e["kind"] == kind)
                .unwrap_or_else(|| panic!("no {kind} entry"));
            let detail = app
                .get(&format!("/v1/ledger/{}", entry["id"].as_str().unwrap()))
                .await;
            assert_eq!(detail.status, StatusCode::OK, "{}", detail.body);
            detail.body["explanation"].as_str().unwrap().to_owned()
        }
    };
    let hold = explained("hold").await;
    assert!(
        hold.contains("reserved 5, 2 of it against the overage limit (no credits move for that part): 3 from grant:g to hold:h"),
        "{hold}"
    );
    let released = app.post("/v1/holds/h/release", json!({})).await;
    assert_eq!(released.status, StatusCode::OK, "{}", released.body);
    let release = explained("release").await;
    assert!(
        release.contains("returning 5, 2 of it against the overage limit"),
        "{release}"
    );
    assert_eq!(app.balance("ng").await["available"], "3");
}
