//! Plans and subscriptions over HTTP on the manual clock: a year of monthly
//! renewals with rollover and of automatic top-ups (the ledgers replayed and
//! the balances checked every simulated day), the expiry-versus-upgrade
//! scenario, a change at the period end and cancellation, renewals caught up
//! after a SIGKILL and restart exactly once, the overage policy inherited
//! from the plan, and bad input.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::support::{assert_replayable, micros, micros_of, Options, Reply, TestApp, ADMIN_KEY};

const DAY: i64 = 86_400;

async fn manual_app() -> TestApp {
    TestApp::spawn_with(Options {
        manual_clock: true,
        ..Options::default()
    })
    .await
}

async fn put_plan(app: &TestApp, key: &str, body: Value) {
    let reply = app.put(&format!("/v1/plans/{key}"), body).await;
    assert_eq!(reply.status, StatusCode::OK, "plan {key}: {}", reply.body);
}

async fn subscribe(app: &TestApp, customer: &str, body: Value) -> Value {
    let reply = app
        .put(&format!("/v1/customers/{customer}/subscription"), body)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "subscribe: {}", reply.body);
    reply.body
}

/// Cancel `customer`'s subscription (`?at_period_end=true` with `at_end`).
async fn cancel(app: &TestApp, customer: &str, at_end: bool) -> Reply {
    let query = if at_end { "?at_period_end=true" } else { "" };
    app.send(
        Method::DELETE,
        &format!("/v1/customers/{customer}/subscription{query}"),
        Some(ADMIN_KEY),
        None,
    )
    .await
}

/// Plan `keep`: 100 credits every 30 days, allocations that never expire.
async fn put_keep_plan(app: &TestApp) {
    put_plan(
        app,
        "keep",
        json!({ "name": "Keep", "period": { "days": 30 }, "included_credits": "100",
                "allocation_expires_after_periods": null }),
    )
    .await;
}

async fn advance_to(app: &TestApp, to: &str) {
    let reply = app.post("/v1/clock/advance", json!({ "to": to })).await;
    assert_eq!(reply.status, StatusCode::OK, "advance: {}", reply.body);
}

/// The allocation `lot` ended early: an `expire` entry of `amount` whose reason says `why`.
fn assert_ended(entries: &[Value], lot: &str, amount: &str, why: &str) {
    let ended = entries
        .iter()
        .find(|e| e["kind"] == "expire" && e["reference"] == lot)
        .unwrap_or_else(|| panic!("no end of {lot}"));
    assert_eq!(ended["amount"], amount, "{ended}");
    assert!(ended["reason"].as_str().unwrap().contains(why), "{ended}");
}

fn grants_with_prefix<'a>(entries: &'a [Value], kind: &str, prefix: &str) -> Vec<&'a Value> {
    entries
        .iter()
        .filter(|e| e["kind"] == kind)
        .filter(|e| e["reference"].as_str().unwrap_or("").starts_with(prefix))
        .collect()
}

/// The Pro plan (10,000 credits a month, 50% rollover expiring after one
/// period) for a year: usage every day, the ledger replayed and the balance
/// compared with it every simulated day; 13 allocations (the start and 12
/// renewals), each granted once, and every rollover at most 5,000. Beside
/// it, a customer without a plan lives on automatic top-ups for the same
/// year: each confirmed payment is one lot, declines suspend it, and its
/// ledger is replayed every day too.
#[tokio::test]
async fn a_year_of_monthly_renewals_with_rollover_replays_every_day() {
    let app = manual_app().await;
    put_plan(
        &app,
        "pro",
        json!({ "name": "Pro", "period": "month", "included_credits": "10000",
                "rollover": { "max_percent": 50, "expires_after_periods": 1 } }),
    )
    .await;
    app.customer("acme").await;
    let sub = subscribe(&app, "acme", json!({ "id": "sub_acme", "plan": "pro" })).await;
    assert_eq!(sub["status"], "active");
    assert_eq!(sub["period"], 0);
    assert_eq!(
        micros_of(&app.balance("acme").await["available"]),
        micros("10000")
    );
    assert_eq!(
        app.get("/v1/customers/acme").await.body["plan"],
        "pro",
        "the subscription sets the customer's plan for pricing"
    );
    // Top-ups too: beta has no plan and lives on packs of 500 credits (that
    // expire after 45 days), bought automatically below 300 up to 1,200. The
    // test is the payment system: it pays in the first two months of each
    // quarter and declines in the third, where two declines in a row suspend
    // the automatic top-up (and beta runs dry) until it is set again.
    let pack = app
        .put(
            "/v1/credit-packs/p500",
            json!({ "name": "500 credits", "credits": "500", "price": "5", "currency": "USD",
                "expires_after_days": 45 }),
        )
        .await;
    assert_eq!(pack.status, StatusCode::OK, "{}", pack.body);
    app.customer("beta").await;
    let auto = json!({ "pack": "p500", "threshold": "300", "target": "1200", "max_per_day": 1,
                       "max_failures": 2, "payment_timeout_seconds": 3600 });
    let set = app.put("/v1/customers/beta/auto-topup", auto.clone()).await;
    assert_eq!(set.status, StatusCode::OK, "{}", set.body);
    // beta starts with nothing, below the threshold: the first starts at once.
    let first = set.body["pending_topup"].as_str().unwrap();
    let reply = app
        .post(&format!("/v1/topups/{first}/confirm"), json!({}))
        .await;
    assert_eq!(
        reply.body["balance_after"], "1500",
        "3 packs: {}",
        reply.body
    );
    let (mut paid, mut declined, mut suspensions, mut beta_refused) = (1, 0, 0, 0);
    let mut refused = 0;
    for day in 1..=366 {
        app.advance(DAY).await;
        // 150 to 549 credits a day: some months run dry, others leave credits over.
        let amount = (150 + (day * 53) % 400).to_string();
        let reply = app.charge("acme", &format!("day_{day}"), &amount).await;
        match reply.status {
            StatusCode::OK => {}
            StatusCode::PAYMENT_REQUIRED => refused += 1,
            other => panic!("charge on day {day}: {other} {}", reply.body),
        }
        let reply = app
            .charge(
                "beta",
                &format!("beta_{day}"),
                &(200 + (day * 37) % 200).to_string(),
            )
            .await;
        match reply.status {
            StatusCode::OK => {}
            StatusCode::PAYMENT_REQUIRED => beta_refused += 1,
            other => panic!("beta's charge on day {day}: {other} {}", reply.body),
        }
        let paying = (day / 30) % 3 != 2;
        let mut state = app.get("/v1/customers/beta/auto-topup").await.body;
        if paying && state["status"] == "suspended" {
            // Set again: resumed, and (beta being low) a top-up starts at once.
            suspensions += 1;
            let set = app.put("/v1/customers/beta/auto-topup", auto.clone()).await;
            assert_eq!(set.status, StatusCode::OK, "{}", set.body);
            state = set.body;
        }
        if let Some(pending) = state["pending_topup"].as_str() {
            let balance = micros_of(&app.balance("beta").await["available"]);
            assert!(balance < micros("300"), "day {day}: a top-up at {balance}");
            let reply = if paying {
                paid += 1;
                app.post(&format!("/v1/topups/{pending}/confirm"), json!({}))
                    .await
            } else {
                declined += 1;
                app.post(
                    &format!("/v1/topups/{pending}/fail"),
                    json!({ "reason": "card_declined" }),
                )
                .await
            };
            assert_eq!(reply.status, StatusCode::OK, "day {day}: {}", reply.body);
        }
        let entries = app.ledger_all("acme").await;
        let replayed = assert_replayable(&entries);
        let balance = app.balance("acme").await;
        assert_eq!(
            micros_of(&balance["available"]),
            replayed,
            "day {day}: the balance is what the ledger replays to"
        );
        let shown: i64 = balance["grants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| micros_of(&g["remaining"]))
            .sum();
        assert_eq!(shown, replayed, "day {day}: the lots add up to the balance");
        let entries = app.ledger_all("beta").await;
        let replayed = assert_replayable(&entries);
        let balance = app.balance("beta").await;
        assert_eq!(
            micros_of(&balance["available"]),
            replayed,
            "day {day}: beta's balance"
        );
    }
    let entries = app.ledger_all("acme").await;
    let allocations = grants_with_prefix(&entries, "grant", "plan:sub_acme:");
    assert_eq!(allocations.len(), 13, "one allocation per period, once");
    let mut references: Vec<&str> = allocations
        .iter()
        .map(|e| e["reference"].as_str().unwrap())
        .collect();
    references.dedup();
    assert_eq!(references.len(), 13);
    let rollovers: Vec<i64> = entries
        .iter()
        .filter(|e| e["kind"] == "rollover")
        .map(|e| micros_of(&e["amount"]))
        .collect();
    assert!(
        !rollovers.is_empty(),
        "some month left credits to roll over"
    );
    assert!(rollovers.iter().all(|r| *r <= micros("5000")));
    assert!(refused > 0, "some month ran dry");
    // Every confirmed payment granted one lot, once; none for a declined one.
    let entries_beta = app.ledger_all("beta").await;
    let topups = grants_with_prefix(&entries_beta, "grant", "topup:");
    assert!(
        paid >= 40 && declined >= 8 && suspensions >= 4 && beta_refused > 0,
        "{paid} paid, {declined} declined, {suspensions} suspensions, {beta_refused} refused"
    );
    assert_eq!(topups.len(), paid, "one lot per confirmed payment");
    let mut references: Vec<&str> = topups
        .iter()
        .map(|e| e["reference"].as_str().unwrap())
        .collect();
    references.sort();
    references.dedup();
    assert_eq!(references.len(), paid);
    let listed = app.get("/v1/customers/beta/topups?limit=1000").await.body;
    let status_count = |status: &str| {
        listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["status"] == status)
            .count()
    };
    assert_eq!(status_count("succeeded"), paid);
    assert_eq!(status_count("failed"), declined);
    let sub = app.get("/v1/customers/acme/subscription").await;
    assert_eq!(sub.body["period"], 12, "{}", sub.body);
    // A rollover is explained in the ledger.
    let rollover = entries.iter().find(|e| e["kind"] == "rollover").unwrap();
    let explained = app
        .get(&format!("/v1/ledger/{}", rollover["id"].as_str().unwrap()))
        .await;
    assert!(
        explained.body["explanation"]
            .as_str()
            .unwrap_or("")
            .contains("rolled over"),
        "{}",
        explained.body
    );
}

/// "My credits expired yesterday and I upgraded today": the Pro plan gives
/// 3 days of grace, so the Basic credits that expired at yesterday's period
/// end come back until the end of the new Pro period, and the ledger says so.
#[tokio::test]
async fn credits_that_expired_yesterday_come_back_with_an_upgrade_today() {
    let app = manual_app().await;
    put_plan(
        &app,
        "basic",
        json!({ "name": "Basic", "period": "month", "included_credits": "1000" }),
    )
    .await;
    put_plan(
        &app,
        "pro",
        json!({ "name": "Pro", "period": "month", "included_credits": "10000", "upgrade_grace_days": 3 }),
    )
    .await;
    app.customer("cus").await;
    let sub = subscribe(&app, "cus", json!({ "id": "s1", "plan": "basic" })).await;
    let period_end = sub["current_period_end"].as_str().unwrap().to_string();
    assert_eq!(app.charge("cus", "c1", "400").await.status, StatusCode::OK);
    advance_to(&app, &period_end).await;
    app.advance(DAY - 3600).await;
    // Renewed: a fresh 1,000; the 600 left of the first month expired.
    assert_eq!(
        micros_of(&app.balance("cus").await["available"]),
        micros("1000")
    );
    let first = app.get("/v1/customers/cus/grants").await;
    let first = first.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["id"] == "plan:s1:0")
        .cloned()
        .unwrap();
    assert_eq!(first["status"], "expired");
    assert_eq!(first["expired_amount"], "600");
    let upgraded = subscribe(&app, "cus", json!({ "id": "up1", "plan": "pro" })).await;
    assert_eq!(upgraded["plan"], "pro");
    assert_eq!(upgraded["id"], "s1", "the same subscription continues");
    // Pro's 10,000 + the 600 back. Basic's current 1,000 ended with the Basic period.
    let balance = app.balance("cus").await;
    assert_eq!(micros_of(&balance["available"]), micros("10600"));
    let entries = app.ledger_all("cus").await;
    assert_ended(&entries, "plan:s1:1", "1000", "plan change");
    assert_replayable(&entries);
    let reinstated = entries
        .iter()
        .find(|e| e["kind"] == "reinstate")
        .expect("a reinstatement entry");
    assert_eq!(reinstated["amount"], "600");
    assert!(reinstated["reason"]
        .as_str()
        .unwrap()
        .contains("upgrade grace"));
    // A retry of the same change is the same answer, and changes nothing.
    let again = app
        .put(
            "/v1/customers/cus/subscription",
            json!({ "id": "up1", "plan": "pro" }),
        )
        .await;
    assert_eq!(again.status, StatusCode::OK);
    assert!(again.replayed());
    assert_eq!(
        micros_of(&app.balance("cus").await["available"]),
        micros("10600")
    );
}

/// An upgrade scheduled for the period's end gets the new plan's grace too
/// (bug 4 of PRODUCT.md): what was left of a promotion that expired the day
/// before the switch comes back until the new period ends. The allocation the boundary ends
/// does not: it expires as at any renewal.
#[tokio::test]
async fn an_upgrade_at_the_period_end_reinstates_what_expired_within_its_grace() {
    let app = manual_app().await;
    put_plan(
        &app,
        "basic",
        json!({ "name": "Basic", "period": "month", "included_credits": "100" }),
    )
    .await;
    put_plan(
        &app,
        "pro",
        json!({ "name": "Pro", "period": "month", "included_credits": "300", "upgrade_grace_days": 3 }),
    )
    .await;
    app.customer("cus").await;
    let sub = subscribe(&app, "cus", json!({ "id": "s1", "plan": "basic" })).await;
    let period_end = sub["current_period_end"].as_str().unwrap().to_string();
    let rfc3339 = &time::format_description::well_known::Rfc3339;
    let end = time::OffsetDateTime::parse(&period_end, rfc3339).unwrap();
    let day_before = (end - time::Duration::seconds(DAY))
        .format(rfc3339)
        .unwrap();
    let reply = app
        .post(
            "/v1/customers/cus/grants",
            json!({ "id": "promo", "amount": "40", "source": "promotion", "paid": false,
                    "expires_at": day_before }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(app.charge("cus", "c1", "30").await.status, StatusCode::OK);
    let scheduled = subscribe(
        &app,
        "cus",
        json!({ "id": "up1", "plan": "pro", "change": "period_end" }),
    )
    .await;
    assert_eq!(scheduled["plan"], "basic");
    advance_to(&app, &period_end).await;
    app.advance(3600).await;
    let balance = app.balance("cus").await;
    // The charge burned the promotion first (it expired first): its 10 left
    // come back beside Pro's 300; Basic's unused 100 expired at the boundary.
    assert_eq!(micros_of(&balance["available"]), micros("310"), "{balance}");
    let entries = app.ledger_all("cus").await;
    assert_replayable(&entries);
    let reinstated: Vec<&Value> = entries
        .iter()
        .filter(|e| e["kind"] == "reinstate")
        .collect();
    assert_eq!(reinstated.len(), 1, "{reinstated:?}");
    // It belongs to the subscription (no request made the change at the boundary).
    assert_eq!(reinstated[0]["reference"], "s1");
    assert_eq!(reinstated[0]["grant_ids"], json!(["promo"]));
    assert_eq!(reinstated[0]["amount"], "10");
    assert!(reinstated[0]["reason"]
        .as_str()
        .unwrap()
        .contains("upgrade grace"));
    let promo = app.get("/v1/customers/cus/grants").await;
    let promo = promo.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["id"] == "promo")
        .cloned()
        .unwrap();
    assert_eq!(promo["status"], "active");
    let sub = app.get("/v1/customers/cus/subscription").await;
    assert_eq!(sub.body["plan"], "pro");
    assert_eq!(promo["expires_at"], sub.body["current_period_end"]);
}

/// A downgrade at the period end applies at the renewal; a cancellation at
/// the period end stops the next one; a cancellation now ends it at once.
#[tokio::test]
async fn changes_and_cancellation_at_the_period_end() {
    let app = manual_app().await;
    put_plan(
        &app,
        "pro",
        json!({ "name": "Pro", "period": { "days": 30 }, "included_credits": "1000" }),
    )
    .await;
    put_plan(
        &app,
        "lite",
        json!({ "name": "Lite", "period": { "days": 30 }, "included_credits": "100" }),
    )
    .await;
    app.customer("cus").await;
    subscribe(&app, "cus", json!({ "id": "s1", "plan": "pro" })).await;
    let changed = subscribe(
        &app,
        "cus",
        json!({ "id": "down1", "plan": "lite", "change": "period_end" }),
    )
    .await;
    assert_eq!(changed["plan"], "pro");
    assert_eq!(changed["next_plan"], "lite");
    assert_eq!(
        micros_of(&app.balance("cus").await["available"]),
        micros("1000")
    );
    app.advance(30 * DAY).await;
    assert_eq!(
        micros_of(&app.balance("cus").await["available"]),
        micros("100")
    );
    let sub = app.get("/v1/customers/cus/subscription").await.body;
    assert_eq!(sub["plan"], "lite");
    assert_eq!(sub["period"], 1);
    // The ledger says why the allocation is smaller.
    let entries = app.ledger_all("cus").await;
    let second = grants_with_prefix(&entries, "grant", "plan:s1:1");
    assert!(
        second[0]["reason"]
            .as_str()
            .unwrap()
            .ends_with("on the switch from plan pro scheduled for the end of period 0"),
        "{}",
        second[0]
    );
    let canceled = cancel(&app, "cus", true).await;
    assert_eq!(canceled.status, StatusCode::OK, "{}", canceled.body);
    assert_eq!(canceled.body["cancel_at_period_end"], true);
    app.advance(30 * DAY).await;
    let sub = app.get("/v1/customers/cus/subscription").await.body;
    assert_eq!(sub["status"], "canceled");
    assert_eq!(micros_of(&app.balance("cus").await["available"]), 0);
    app.advance(90 * DAY).await;
    let entries = app.ledger_all("cus").await;
    assert_eq!(grants_with_prefix(&entries, "grant", "plan:").len(), 2);
    assert_eq!(app.get("/v1/customers/cus").await.body["plan"], Value::Null);
    // Nothing to cancel any more.
    let none = cancel(&app, "cus", false).await;
    assert_eq!(none.status, StatusCode::NOT_FOUND, "{}", none.body);
    // A new subscription may start later; an immediate cancellation ends its period and what is
    // left of its allocation (subscribing again and again would otherwise pile them up).
    let later = subscribe(
        &app,
        "cus",
        json!({ "id": "s2", "plan": "lite", "start_at": "2999-01-01T00:00:00Z" }),
    )
    .await;
    assert_eq!(later["status"], "scheduled");
    assert_eq!(micros_of(&app.balance("cus").await["available"]), 0);
    advance_to(&app, "2999-01-01T00:00:00Z").await;
    assert_eq!(
        micros_of(&app.balance("cus").await["available"]),
        micros("100")
    );
    let now = cancel(&app, "cus", false).await;
    assert_eq!(now.body["status"], "canceled");
    assert_eq!(micros_of(&app.balance("cus").await["available"]), 0);
    let entries = app.ledger_all("cus").await;
    assert_ended(&entries, "plan:s2:0", "100", "canceled now");
    // The lot says when it ended, before its expires_at (a probe could
    // tell only from the ledger).
    let grants = app.get("/v1/customers/cus/grants?limit=1000").await;
    let ended = grants.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["id"] == "plan:s2:0")
        .expect("the lot")
        .clone();
    assert_eq!(ended["status"], "expired", "{ended}");
    assert_eq!(ended["expired_at"], "2999-01-01T00:00:00Z", "{ended}");
    assert!(
        ended["expires_at"].is_null() || ended["expires_at"] != ended["expired_at"],
        "{ended}"
    );
    assert_replayable(&entries);

    // With none active, the subscription shown is the one changed last, not
    // the one that was to start last.
    let cancel_now = || async {
        let reply = cancel(&app, "cus", false).await;
        assert_eq!(reply.body["status"], "canceled", "{}", reply.body);
    };
    app.advance(DAY).await;
    subscribe(
        &app,
        "cus",
        json!({ "id": "s3", "plan": "lite", "start_at": "3100-01-01T00:00:00Z" }),
    )
    .await;
    cancel_now().await;
    app.advance(DAY).await;
    subscribe(&app, "cus", json!({ "id": "s4", "plan": "lite" })).await;
    cancel_now().await;
    assert_eq!(
        app.get("/v1/customers/cus/subscription").await.body["id"],
        "s4"
    );
}

/// Renewals missed while the server was down (killed with SIGKILL) are
/// caught up at restart, each at its own boundary, exactly once; a second
/// server over the same data directory is refused.
#[tokio::test]
async fn renewals_caught_up_in_one_step_are_granted_once_across_restarts() {
    let mut app = manual_app().await;
    put_plan(
        &app,
        "pro",
        json!({ "name": "Pro", "period": "month", "included_credits": "500",
        "allocation_expires_after_periods": 3 }),
    )
    .await;
    app.customer("cus").await;
    subscribe(&app, "cus", json!({ "id": "s1", "plan": "pro" })).await;
    app.advance(40 * DAY).await;
    assert_eq!(
        micros_of(&app.balance("cus").await["available"]),
        micros("1000")
    );
    // Move the clock on without anything touching the customer, then kill.
    let reply = app.get("/v1/clock").await;
    let before = reply.str("now").to_string();
    app.kill().await;
    app.start().await;
    let reply = app.get("/v1/clock").await;
    assert_eq!(
        reply.str("now"),
        before,
        "the manual clock survives a restart"
    );
    // A second server over the same store never runs a second scheduler:
    // over a data directory it is refused; over a PostgreSQL database it
    // starts but does not run the writer (nor the tick) while this one does.
    let second = if app.database_url.is_some() {
        let second = crate::support::TestApp::spawn_beside(&app).await;
        assert!(!second.is_writer().await, "only one server runs the writer");
        Some(second)
    } else {
        let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["serve", "--listen", "127.0.0.1:0", "--manual-clock"])
            .args(app.storage_args())
            .output()
            .await
            .unwrap();
        assert!(!refused.status.success(), "a second server must not start");
        None
    };
    app.advance(100 * DAY).await;
    let entries = app.ledger_all("cus").await;
    let allocations = grants_with_prefix(&entries, "grant", "plan:s1:");
    // 140 days: the start and 4 renewals; 3-period allocations overlap.
    assert_eq!(allocations.len(), 5);
    drop(second);
    app.kill().await;
    app.start().await;
    app.advance(0).await;
    let entries = app.ledger_all("cus").await;
    assert_eq!(grants_with_prefix(&entries, "grant", "plan:s1:").len(), 5);
    let replayed = assert_replayable(&entries);
    assert_eq!(replayed, micros("1500"), "three overlapping allocations");
}

/// A plan's overage policy applies to subscribers without their own, and
/// changes with the plan; a customer's own policy wins.
#[tokio::test]
async fn subscribers_inherit_the_plans_overage_policy() {
    let app = manual_app().await;
    put_plan(
        &app,
        "payg",
        json!({ "name": "Pay as you go", "period": "month", "included_credits": "10",
        "overage": { "policy": "allow_negative", "limit": "50" } }),
    )
    .await;
    app.customer("a").await;
    app.customer("b").await;
    subscribe(&app, "a", json!({ "id": "sa", "plan": "payg" })).await;
    subscribe(&app, "b", json!({ "id": "sb", "plan": "payg" })).await;
    assert_eq!(
        app.get("/v1/customers/a").await.body["overage"]["policy"],
        "allow_negative"
    );
    let reply = app.charge("a", "a1", "40").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["on_debt"], "30");
    assert_eq!(
        app.charge("a", "a2", "31").await.status,
        StatusCode::PAYMENT_REQUIRED
    );
    // b sets its own policy: block. It wins over the plan's, also after a restart.
    let own = app
        .put("/v1/customers/b/overage", json!({ "policy": "block" }))
        .await;
    assert_eq!(own.status, StatusCode::OK);
    assert_eq!(own.body["overage"]["policy"], "block");
    assert_eq!(
        app.charge("b", "b1", "11").await.status,
        StatusCode::PAYMENT_REQUIRED
    );
    let mut app = app;
    app.kill().await;
    app.start().await;
    assert_eq!(
        app.get("/v1/customers/b").await.body["overage"]["policy"],
        "block"
    );
    assert_eq!(
        app.charge("b", "b2", "11").await.status,
        StatusCode::PAYMENT_REQUIRED
    );
    assert_eq!(
        app.get("/v1/customers/a").await.body["overage"]["policy"],
        "allow_negative"
    );
    // b removes its own policy: the plan's governs again.
    let removed = app
        .send(
            Method::DELETE,
            "/v1/customers/b/overage",
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(removed.status, StatusCode::OK, "{}", removed.body);
    assert_eq!(
        app.get("/v1/customers/b").await.body["overage"]["policy"],
        "allow_negative"
    );
    let reply = app.charge("b", "b3", "11").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["on_debt"], "1");
    let ghost = app
        .send(
            Method::DELETE,
            "/v1/customers/ghost/overage",
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(ghost.status, StatusCode::NOT_FOUND, "{}", ghost.body);
    // The plan tightens: a is blocked from now on, its debt stays owed.
    put_plan(
        &app,
        "payg",
        json!({ "name": "Pay as you go", "period": "month", "included_credits": "10" }),
    )
    .await;
    assert_eq!(
        app.charge("a", "a3", "1").await.status,
        StatusCode::PAYMENT_REQUIRED
    );
    assert_eq!(app.balance("a").await["debt"], "30");
    // The next allocation repays the debt first.
    app.advance(31 * DAY).await;
    let balance = app.balance("a").await;
    assert_eq!(balance["debt"], "20");
    assert_eq!(balance["available"], "0");
    assert_replayable(&app.ledger_all("a").await);
}

#[tokio::test]
async fn bad_plans_and_subscriptions_are_refused_and_change_nothing() {
    let app = manual_app().await;
    let good = json!({ "name": "Pro", "period": "month", "included_credits": "100" });
    put_plan(&app, "pro", good.clone()).await;
    let bad_plans = [
        (
            json!({ "name": "x", "period": "week", "included_credits": "1" }),
            "period",
        ),
        (
            json!({ "name": "x", "period": { "days": 0 }, "included_credits": "1" }),
            "period",
        ),
        (
            json!({ "name": "x", "period": "month", "included_credits": "-1" }),
            "included_credits",
        ),
        (
            json!({ "name": "x", "period": "month", "included_credits": "1.0000001" }),
            "",
        ),
        (
            json!({ "name": "x", "period": "month", "included_credits": "1", "upgrade_grace_days": 91 }),
            "upgrade_grace_days",
        ),
        (
            json!({ "name": "x", "period": "month", "included_credits": "1", "rollover": { "max_percent": 101 } }),
            "rollover.max_percent",
        ),
        (
            json!({ "name": "x", "period": "month", "included_credits": "1", "rollover": { "expires_after_periods": 0 } }),
            "rollover.expires_after_periods",
        ),
        (
            json!({ "name": "x", "period": "month", "included_credits": "1",
                    "allocation_expires_after_periods": 2, "rollover": { "max_percent": 50 } }),
            "rollover",
        ),
        (
            json!({ "name": "x", "period": "month", "included_credits": "1",
                    "allocation_expires_after_periods": null, "rollover": { "max_percent": 50 } }),
            "rollover",
        ),
        (
            json!({ "name": "x", "period": "month", "included_credits": "1", "overage": { "policy": "sometimes" } }),
            "overage",
        ),
        (
            json!({ "name": "x", "period": "month", "included_credits": "1", "bogus": 1 }),
            "",
        ),
        (json!({ "period": "month", "included_credits": "1" }), ""),
        // A blank name (a feature's was refused, a plan's taken).
        (
            json!({ "name": " ", "period": "month", "included_credits": "1" }),
            "name",
        ),
    ];
    for (body, param) in bad_plans {
        let reply = app.put("/v1/plans/other", body.clone()).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{body}: {}",
            reply.body
        );
        if !param.is_empty() {
            assert_eq!(reply.body["error"]["param"], param, "{}", reply.body);
        }
    }
    assert_eq!(
        app.get("/v1/plans/other").await.status,
        StatusCode::NOT_FOUND
    );
    let reply = app
        .put(
            "/v1/plans/pro",
            json!({ "name": "Pro", "period": "year", "included_credits": "100" }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.body);
    assert_eq!(reply.code(), "plan_period_fixed");
    assert_eq!(app.get("/v1/plans/pro").await.body["period"], "month");
    let listed = app.get("/v1/plans").await;
    assert_eq!(listed.body["data"].as_array().unwrap().len(), 1);

    app.customer("cus").await;
    let path = "/v1/customers/cus/subscription";
    let reply = app.put(path, json!({ "id": "s0", "plan": "nope" })).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.body);
    let reply = app
        .put(
            "/v1/customers/ghost/subscription",
            json!({ "id": "s_ghost", "plan": "pro" }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.body);
    // A plan that did not exist keeps that outcome for its id.
    let reply = app.put(path, json!({ "id": "s0", "plan": "nope" })).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.body);
    assert!(reply.replayed());
    let reply = app
        .put(
            path,
            json!({ "id": "s1", "plan": "pro", "change": "later" }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let reply = app
        .put(
            path,
            json!({ "id": "s1", "plan": "pro", "start_at": "2001-01-01T00:00:00Z" }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(reply.body["error"]["param"], "start_at", "{}", reply.body);
    // That id failed; it keeps failing the same way.
    let reply = app
        .put(
            path,
            json!({ "id": "s1", "plan": "pro", "start_at": "2001-01-01T00:00:00Z" }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.replayed());
    let reply = app.put(path, json!({ "id": "s1", "plan": "pro" })).await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.body);
    // A change at the period end of no subscription starts none.
    let reply = app
        .put(
            path,
            json!({ "id": "s_later", "plan": "pro", "change": "period_end" }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(reply.body["error"]["param"], "change", "{}", reply.body);
    // Not kept as the id's outcome: the same id may start it without `change`.
    let reply = app
        .put(
            path,
            json!({ "id": "s_later", "plan": "pro", "change": "period_end" }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert!(!reply.replayed());
    // An id too long to name grants is wrong on its own: it is not taken.
    let long = "s".repeat(101);
    let reply = app.put(path, json!({ "id": long, "plan": "pro" })).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(reply.body["error"]["param"], "id", "{}", reply.body);
    let reply = app.put(path, json!({ "id": long, "plan": "pro" })).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert!(!reply.replayed(), "not kept as the id's outcome");
    assert_eq!(app.get(path).await.status, StatusCode::NOT_FOUND);
    assert_eq!(micros_of(&app.balance("cus").await["available"]), 0);
    // Reserved grant ids.
    for id in ["plan:x:0", "rollover:x:1"] {
        let reply = app
            .post(
                "/v1/customers/cus/grants",
                json!({ "id": id, "amount": "1", "source": "promotion", "paid": false }),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{id}: {}",
            reply.body
        );
    }
    // Scopes: a read key may look, not change.
    let key = app
        .post("/v1/api-keys", json!({ "id": "reader", "scope": "read" }))
        .await;
    let reader = key.str("key").to_string();
    let reply = app
        .send(Method::PUT, "/v1/plans/pro", Some(&reader), Some(&good))
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let reply = app
        .send(Method::GET, "/v1/plans/pro", Some(&reader), None)
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = app.send(Method::GET, "/v1/plans", None, None).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
}

/// A renewal the ledger refuses (its allocation would pass the maximum
/// balance) changes nothing and blocks nothing: the customer's charges and
/// the tick go on, and the subscription stays due. A start that would pass
/// it is refused with a 4xx. Canceling a subscription that never started
/// leaves the customer's own plan alone.
#[tokio::test]
async fn a_refused_renewal_blocks_nothing_and_a_scheduled_cancel_keeps_the_plan() {
    let app = manual_app().await;
    put_plan(
        &app,
        "big",
        json!({ "name": "Big", "period": "month", "included_credits": "1000" }),
    )
    .await;
    let reply = app
        .post(
            "/v1/customers",
            json!({ "id": "whale", "plan": "enterprise" }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    app.grant("whale", "g1", "999999999500").await;
    let refused = app
        .put(
            "/v1/customers/whale/subscription",
            json!({ "id": "s_now", "plan": "big" }),
        )
        .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.body);
    assert_eq!(
        app.get("/v1/customers/whale/subscription").await.status,
        StatusCode::NOT_FOUND
    );
    let scheduled = subscribe(
        &app,
        "whale",
        json!({ "id": "s_later", "plan": "big", "start_at": "2999-01-01T00:00:00Z" }),
    )
    .await;
    assert_eq!(scheduled["status"], "scheduled");
    advance_to(&app, "2999-01-02T00:00:00Z").await;
    // The start is refused by the ledger: still scheduled, nothing granted.
    let sub = app.get("/v1/customers/whale/subscription").await;
    assert_eq!(sub.status, StatusCode::OK, "{}", sub.body);
    assert_eq!(sub.body["status"], "scheduled");
    let reply = app.charge("whale", "c1", "600").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    // With room again, the next operation starts it at its own instant.
    let reply = app.charge("whale", "c2", "1").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let sub = app.get("/v1/customers/whale/subscription").await.body;
    assert_eq!(sub["status"], "active");
    assert_eq!(sub["current_period_start"], "2999-01-01T00:00:00Z");
    assert_eq!(app.get("/v1/customers/whale").await.body["plan"], "big");
    assert_replayable(&app.ledger_all("whale").await);

    // A subscription canceled before it starts leaves the customer's plan alone.
    let reply = app
        .post(
            "/v1/customers",
            json!({ "id": "ent", "plan": "enterprise" }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    subscribe(
        &app,
        "ent",
        json!({ "id": "s_ent", "plan": "big", "start_at": "3000-01-01T00:00:00Z" }),
    )
    .await;
    let canceled = cancel(&app, "ent", false).await;
    assert_eq!(canceled.body["status"], "canceled");
    assert_eq!(
        app.get("/v1/customers/ent").await.body["plan"],
        "enterprise"
    );

    // A running subscription whose renewal is refused (its allocation, which
    // never expires, would pass the maximum balance): its plan cannot change
    // now (409; this stopped the writer before), nor at the period end, nor
    // can it be canceled then (all would take effect at the past boundary,
    // repricing usage already charged); it can be canceled now.
    put_keep_plan(&app).await;
    app.customer("full").await;
    subscribe(&app, "full", json!({ "id": "s_keep", "plan": "keep" })).await;
    app.grant("full", "g_full", "999999999850").await;
    app.advance(31 * DAY).await;
    let switch = app
        .put(
            "/v1/customers/full/subscription",
            json!({ "id": "s_switch", "plan": "big" }),
        )
        .await;
    assert_eq!(switch.status, StatusCode::CONFLICT, "{}", switch.body);
    assert_eq!(switch.code(), "renewal_refused");
    let later = app
        .put(
            "/v1/customers/full/subscription",
            json!({ "id": "s_switch_later", "plan": "big", "change": "period_end" }),
        )
        .await;
    assert_eq!(later.status, StatusCode::CONFLICT, "{}", later.body);
    assert_eq!(later.code(), "renewal_refused");
    let at_end = cancel(&app, "full", true).await;
    assert_eq!(at_end.status, StatusCode::CONFLICT, "{}", at_end.body);
    assert_eq!(
        app.get("/v1/customers/full/subscription").await.body["plan"],
        "keep"
    );
    let canceled = cancel(&app, "full", false).await;
    assert_eq!(canceled.status, StatusCode::OK, "{}", canceled.body);
    assert_eq!(canceled.body["status"], "canceled");
    assert_replayable(&app.ledger_all("full").await);
}

/// A catch-up over several periods renews every boundary before the one the
/// ledger refuses: one late allocation that would pass the maximum balance
/// does not take the earlier ones with it (it was all or nothing). The
/// refused boundary renews, with the rest, once there is room.
#[tokio::test]
async fn a_catch_up_renews_the_periods_before_a_refused_one() {
    let app = manual_app().await;
    put_keep_plan(&app).await;
    app.customer("full").await;
    subscribe(&app, "full", json!({ "id": "s_keep", "plan": "keep" })).await;
    // 250 below the maximum balance: room for two more allocations.
    app.grant("full", "g_full", "999999999650").await;
    app.advance(121 * DAY).await;
    let sub = app.get("/v1/customers/full/subscription").await.body;
    assert_eq!(sub["status"], "active", "{sub}");
    assert_eq!(
        sub["period"], 2,
        "days 30 and 60 renewed, day 90 refused: {sub}"
    );
    assert_eq!(
        micros_of(&app.balance("full").await["available"]),
        micros("999999999950")
    );
    // Still refused before this charge (the renewal comes first); with room
    // after it, the next tick renews day 90 and is refused at day 120.
    assert_eq!(app.charge("full", "c1", "100").await.status, StatusCode::OK);
    app.advance(0).await;
    let sub = app.get("/v1/customers/full/subscription").await.body;
    assert_eq!(sub["period"], 3, "{sub}");
    assert_eq!(
        micros_of(&app.balance("full").await["available"]),
        micros("999999999950")
    );
    assert_eq!(app.charge("full", "c2", "1").await.status, StatusCode::OK);
    assert_eq!(
        app.get("/v1/customers/full/subscription").await.body["period"],
        3
    );
    assert_replayable(&app.ledger_all("full").await);
}

/// A lot ended early (its subscription canceled now) and reinstated by an
/// expiry change: the entry names the lot, its expiry before and after, and
/// the explanation says when it expired, not the period end it was due at.
#[tokio::test]
async fn reinstating_an_allocation_ended_early_says_when_it_ended() {
    let app = manual_app().await;
    put_keep_plan(&app).await;
    app.customer("c").await;
    subscribe(&app, "c", json!({ "id": "s1", "plan": "keep" })).await;
    let ended = app.advance(60).await;
    assert_eq!(cancel(&app, "c", false).await.status, StatusCode::OK);
    assert_eq!(app.balance("c").await["available"], "0");
    let reinstated = app
        .post(
            "/v1/grants/plan:s1:0/expiry",
            json!({ "id": "r1", "expires_at": null, "reason": "goodwill" }),
        )
        .await;
    assert_eq!(reinstated.status, StatusCode::OK, "{}", reinstated.body);
    assert_eq!(reinstated.body["reinstated"], "100");
    let entry = app
        .get(&format!("/v1/ledger/{}", reinstated.str("entry_id")))
        .await;
    assert_eq!(entry.body["kind"], "reinstate");
    assert_eq!(entry.body["grant_ids"], json!(["plan:s1:0"]));
    assert_eq!(
        entry.body["expiry_change"],
        json!({ "before": null, "after": null }),
        "{}",
        entry.body
    );
    let explanation = entry.body["explanation"].as_str().unwrap();
    assert!(
        explanation.contains(&format!(
            "of grant plan:s1:0 (it expired at {ended}), with no expiry now"
        )),
        "{explanation}"
    );
}

/// A manual clock moves only when told to, across restarts too: a
/// restarted server resumes at the instant it had reached, whether it was
/// advanced or not (it jumped to the real time when that was later: on the
/// embedded store, and over PostgreSQL before the first tick recorded it).
#[tokio::test]
async fn a_restarted_manual_clock_resumes_where_it_was() {
    let mut app = manual_app().await;
    let started = app.get("/v1/clock").await.str("now").to_owned();
    app.kill().await;
    app.start().await;
    assert_eq!(app.get("/v1/clock").await.str("now"), started);
    let advanced = app.advance(3_600).await;
    app.kill().await;
    app.start().await;
    assert_eq!(app.get("/v1/clock").await.str("now"), advanced);
}

/// Changing plans back and forth, or cancelling now and subscribing again,
/// never piles up allocations: each change ends what is left of the one
/// before (an `expire` entry that names the change), so the customer holds
/// one plan's credits at a time. Without that, every switch granted a whole
/// allocation on top of the last.
#[tokio::test]
async fn changing_plans_back_and_forth_does_not_create_credits() {
    let app = manual_app().await;
    put_plan(
        &app,
        "basic",
        json!({ "name": "Basic", "period": "month", "included_credits": "100", "upgrade_grace_days": 3 }),
    )
    .await;
    put_plan(
        &app,
        "pro",
        json!({ "name": "Pro", "period": "month", "included_credits": "1000", "upgrade_grace_days": 3 }),
    )
    .await;
    app.customer("cus").await;
    app.grant("cus", "bought", "50").await;
    subscribe(&app, "cus", json!({ "id": "s1", "plan": "basic" })).await;
    assert_eq!(app.charge("cus", "c1", "30").await.status, StatusCode::OK);
    for round in 0..3 {
        for (plan, available) in [("pro", "1050"), ("basic", "150")] {
            app.advance(60).await;
            let id = format!("chg_{round}_{plan}");
            subscribe(&app, "cus", json!({ "id": id, "plan": plan })).await;
            assert_eq!(
                micros_of(&app.balance("cus").await["available"]),
                micros(available),
                "after {id}"
            );
        }
    }
    let entries = app.ledger_all("cus").await;
    assert_eq!(grants_with_prefix(&entries, "expire", "plan:s1:").len(), 6);
    // Cancelling now and subscribing again: the same.
    for n in 2..5 {
        let canceled = cancel(&app, "cus", false).await;
        assert_eq!(canceled.status, StatusCode::OK, "{}", canceled.body);
        assert_eq!(
            micros_of(&app.balance("cus").await["available"]),
            micros("50"),
            "the bought credits stay"
        );
        app.advance(60).await;
        subscribe(&app, "cus", json!({ "id": format!("s{n}"), "plan": "pro" })).await;
        assert_eq!(
            micros_of(&app.balance("cus").await["available"]),
            micros("1050")
        );
    }
    assert_replayable(&app.ledger_all("cus").await);
}

/// A downgrade and an upgrade back, just after each renewal, revive none of
/// the allocations that expired under the higher plan, also after a restart
/// (the time of the last plan change is kept with the subscription). A
/// probe took a 1,000-credit plan to 2,000, 3,000 and 4,000 credits in three
/// periods this way: the grace reinstated every earlier allocation again.
#[tokio::test]
async fn a_round_trip_through_a_lower_plan_revives_no_expired_allocation() {
    let mut app = manual_app().await;
    put_plan(
        &app,
        "big",
        json!({ "name": "Big", "period": "month", "included_credits": "1000", "upgrade_grace_days": 5 }),
    )
    .await;
    put_plan(
        &app,
        "tiny",
        json!({ "name": "Tiny", "period": "month", "included_credits": "10" }),
    )
    .await;
    app.customer("g1").await;
    subscribe(&app, "g1", json!({ "id": "sub_g1", "plan": "big" })).await;
    for round in 0..3 {
        app.advance(32 * DAY).await;
        for plan in ["tiny", "big"] {
            let id = format!("g1_{plan}_{round}");
            subscribe(&app, "g1", json!({ "id": id, "plan": plan })).await;
        }
        assert_eq!(
            micros_of(&app.balance("g1").await["available"]),
            micros("1000"),
            "round {round}"
        );
        if round == 1 {
            app.kill().await;
            app.start().await;
        }
    }
    let entries = app.ledger_all("g1").await;
    assert!(
        entries.iter().all(|e| e["kind"] != "reinstate"),
        "{entries:?}"
    );
    assert_replayable(&entries);
}

/// Usage is priced by the plan the customer was on when it happened: late
/// events from before, during and after each plan (none, lite, pro, none
/// again after a cancellation) get each plan's price, across a restart, and
/// a simulation reprices them the same way.
#[tokio::test]
async fn late_usage_is_priced_by_the_plan_it_happened_on() {
    let mut app = manual_app().await;
    let at = app.hours_from_now().await;
    app.features(&["ai"]).await;
    app.publish_version(
        "v1",
        json!([
            { "feature": "ai", "credits_per_unit": "1" },
            { "feature": "ai", "plan": "lite", "credits_per_unit": "2" },
            { "feature": "ai", "plan": "pro", "credits_per_unit": "3" },
        ]),
        None,
    )
    .await;
    for (key, credits) in [("lite", "10"), ("pro", "20")] {
        put_plan(
            &app,
            key,
            json!({ "name": key, "period": { "days": 30 }, "included_credits": credits }),
        )
        .await;
    }
    app.customer("cus").await;
    app.grant("cus", "g", "1000").await;
    // No plan for a day, lite for a day, pro for a day, then none again.
    app.advance(DAY).await;
    subscribe(&app, "cus", json!({ "id": "s1", "plan": "lite" })).await;
    app.advance(DAY).await;
    let upgraded = subscribe(&app, "cus", json!({ "id": "up", "plan": "pro" })).await;
    assert_eq!(upgraded["plan"], "pro", "{upgraded}");
    app.advance(DAY).await;
    let canceled = cancel(&app, "cus", false).await;
    assert_eq!(canceled.status, StatusCode::OK, "{}", canceled.body);
    app.advance(DAY).await;
    assert_eq!(app.get("/v1/customers/cus").await.body["plan"], Value::Null);

    let send = |id: &str, hours: i64| {
        json!({ "id": id, "customer_id": "cus", "feature": "ai", "quantity": 1,
                "timestamp": at(hours) })
    };
    let costs = |reply: crate::support::Reply| -> Vec<i64> {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        reply.body["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|r| {
                assert_eq!(r["status"], "charged", "{r}");
                micros_of(&r["cost"])
            })
            .collect()
    };
    let events = json!({ "events": [
        send("none", 12),
        send("lite", 36),
        send("pro", 60),
        send("none-again", 84),
    ] });
    assert_eq!(
        costs(app.post("/v1/events", events).await),
        vec![micros("1"), micros("2"), micros("3"), micros("1")],
        "each event at the price of the plan it happened on"
    );
    // The history is stored: after a restart a late lite event is still lite's.
    app.kill().await;
    app.start().await;
    let events = json!({ "events": [send("lite-after-restart", 37)] });
    assert_eq!(
        costs(app.post("/v1/events", events).await),
        vec![micros("2")]
    );

    // A simulation reprices each at its plan's new price: 10 + 20 + 30 + 10 + 20.
    let draft = app.post("/v1/pricebooks", json!({ "id": "v2" })).await;
    assert_eq!(draft.status, StatusCode::OK, "{}", draft.body);
    let rules = json!({ "rules": [
        { "feature": "ai", "credits_per_unit": "10" },
        { "feature": "ai", "plan": "lite", "credits_per_unit": "20" },
        { "feature": "ai", "plan": "pro", "credits_per_unit": "30" },
    ] });
    let put = app
        .send(
            Method::PUT,
            "/v1/pricebooks/v2/rules",
            Some(ADMIN_KEY),
            Some(&rules),
        )
        .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.body);
    let simulation = app
        .post(
            "/v1/pricebooks/v2/simulate",
            json!({ "from": at(0), "to": at(96) }),
        )
        .await;
    assert_eq!(simulation.status, StatusCode::OK, "{}", simulation.body);
    let total = &simulation.body["total"];
    assert_eq!(total["events"], 5, "{total}");
    assert_eq!(micros_of(&total["recorded"]), micros("9"), "{total}");
    assert_eq!(micros_of(&total["simulated"]), micros("90"), "{total}");
    assert_replayable(&app.ledger_all("cus").await);

    // A change scheduled for the period's end takes effect at that boundary,
    // however late the renewal that applies it runs (here: on the next
    // touch, 31 days on).
    app.customer("sched").await;
    subscribe(&app, "sched", json!({ "id": "s2", "plan": "lite" })).await;
    subscribe(
        &app,
        "sched",
        json!({ "id": "s2-up", "plan": "pro", "change": "period_end" }),
    )
    .await;
    app.advance(31 * DAY).await;
    let boundary = 4 * 24 + 30 * 24;
    let events = json!({ "events": [
        { "id": "sched-before", "customer_id": "sched", "feature": "ai", "quantity": 1,
          "timestamp": at(boundary - 1) },
        { "id": "sched-after", "customer_id": "sched", "feature": "ai", "quantity": 1,
          "timestamp": at(boundary + 1) },
    ] });
    assert_eq!(
        costs(app.post("/v1/events", events).await),
        vec![micros("2"), micros("3")]
    );
}

/// A step of the manual clock renews no subscription more than 1,000 times
/// (a daily plan moved thousands of years made one renewal run that held
/// the writer for hours): 1,001 days of a daily plan in one call is refused,
/// naming the field, the subscription and the instant to stop before, and
/// nothing moves; 1,000 days go through, and each renewal took place.
#[tokio::test]
async fn a_clock_step_renews_a_subscription_at_most_a_thousand_times() {
    let app = manual_app().await;
    put_plan(
        &app,
        "daily",
        json!({ "name": "Daily", "period": { "days": 1 }, "included_credits": "10",
                "allocation_expires_after_periods": 1 }),
    )
    .await;
    app.customer("c").await;
    subscribe(&app, "c", json!({ "id": "sub_c", "plan": "daily" })).await;
    let start = app.get("/v1/clock").await.str("now").to_owned();
    let at = app.hours_from_now().await;

    for body in [
        json!({ "seconds": 1_001 * DAY }),
        json!({ "to": at(1_001 * 24) }),
    ] {
        let param = if body.get("to").is_some() {
            "to"
        } else {
            "seconds"
        };
        let refused = app.post("/v1/clock/advance", body.clone()).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.body);
        assert_eq!(refused.body["error"]["param"], param, "{}", refused.body);
        let message = refused.body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("1000 renewals") && message.contains("sub_c"),
            "{message}"
        );
        // The 1,001st renewal's instant (to the minute): the step may go
        // to just before it.
        let limit = at(1_001 * 24);
        assert!(message.contains(&limit[..16]), "{message} names {limit}");
        assert_eq!(app.get("/v1/clock").await.str("now"), start, "{body}");
        let sub = app.get("/v1/customers/c/subscription").await;
        assert_eq!(sub.body["period"], 0, "{}", sub.body);
    }

    let moved = app
        .post("/v1/clock/advance", json!({ "seconds": 1_000 * DAY }))
        .await;
    assert_eq!(moved.status, StatusCode::OK, "{}", moved.body);
    let sub = app.get("/v1/customers/c/subscription").await;
    assert_eq!(sub.body["period"], 1_000, "{}", sub.body);
    assert_eq!(app.balance("c").await["available"], "10");
    // Another step of up to 1,000 renewals goes on from there.
    let again = app
        .post("/v1/clock/advance", json!({ "seconds": 1_000 * DAY }))
        .await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    let sub = app.get("/v1/customers/c/subscription").await;
    assert_eq!(sub.body["period"], 2_000, "{}", sub.body);
}

/// A renewal the ledger refuses leaves its subscription due, and its periods
/// pile up behind the clock; they are not the step's to count, or once a
/// thousand had piled up no step, however short, could move the clock.
#[tokio::test]
async fn refused_renewals_do_not_count_against_a_clock_step() {
    let app = manual_app().await;
    // 10 billion credits a period that never expire: the balance would
    // pass the ledger's maximum after about a hundred periods, and every
    // renewal from there on is refused.
    put_plan(
        &app,
        "huge",
        json!({ "name": "Huge", "period": { "days": 1 }, "included_credits": "10000000000",
                "allocation_expires_after_periods": null }),
    )
    .await;
    app.customer("c").await;
    subscribe(&app, "c", json!({ "id": "sub_c", "plan": "huge" })).await;
    for step in 1..=3 {
        let moved = app
            .post("/v1/clock/advance", json!({ "seconds": 600 * DAY }))
            .await;
        assert_eq!(moved.status, StatusCode::OK, "step {step}: {}", moved.body);
    }
    let sub = app.get("/v1/customers/c/subscription").await;
    let period = sub.body["period"].as_i64().unwrap();
    assert!(period < 200, "renewals stopped where refused: {}", sub.body);
    // Still bounded: 1,001 days more is refused as for any subscription.
    let refused = app
        .post("/v1/clock/advance", json!({ "seconds": 1_001 * DAY }))
        .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.body);
}

/// A plan changed during a period applies from the next one: the allocation
/// granted before the change rolls over by the terms it was granted under
/// (it rolled over by the plan's new terms, so lowering the included
/// credits mid-period cut what the customer kept of credits already theirs).
#[tokio::test]
async fn a_plan_changed_mid_period_rolls_over_the_allocation_by_its_own_terms() {
    let app = manual_app().await;
    let plan = |included: &str| {
        json!({ "name": "Upd", "period": { "days": 30 }, "included_credits": included,
                "rollover": { "max_percent": 50 } })
    };
    put_plan(&app, "upd", plan("1000")).await;
    app.customer("c").await;
    subscribe(&app, "c", json!({ "id": "s1", "plan": "upd" })).await;
    app.advance(DAY).await;
    put_plan(&app, "upd", plan("200")).await;
    app.advance(30 * DAY).await;
    let entries = app.ledger_all("c").await;
    let rolled = grants_with_prefix(&entries, "rollover", "rollover:s1:1");
    assert_eq!(rolled.len(), 1, "{entries:?}");
    assert_eq!(
        rolled[0]["amount"], "500",
        "50% of the 1,000 granted: {}",
        rolled[0]
    );
    // The next period is on the new terms: 200 granted, at most 100 rolls.
    assert_eq!(app.balance("c").await["available"], "700");
    app.advance(30 * DAY).await;
    let entries = app.ledger_all("c").await;
    let rolled = grants_with_prefix(&entries, "rollover", "rollover:s1:2");
    assert_eq!(rolled[0]["amount"], "100", "{}", rolled[0]);
    assert_replayable(&entries);
}

/// A customer's name, plan, region and metadata change with `PATCH`: left
/// out is kept, `null` removes. Its plan follows a subscription while one
/// runs (409), and is its own again once the subscription is cancelled
/// (a cancellation left it on no plan, with no way to set one).
#[tokio::test]
async fn a_customer_is_changed_and_its_plan_is_its_own_without_a_subscription() {
    let app = manual_app().await;
    put_plan(
        &app,
        "b1",
        json!({ "name": "B1", "period": "month", "included_credits": "10" }),
    )
    .await;
    let made = app
        .post(
            "/v1/customers",
            json!({ "id": "cp", "name": "Acme", "plan": "met", "region": "eu", "metadata": {"a": 1} }),
        )
        .await;
    assert_eq!(made.status, StatusCode::OK, "{}", made.body);
    let patch = |body: Value| {
        let app = &app;
        async move {
            app.send(
                Method::PATCH,
                "/v1/customers/cp",
                Some(ADMIN_KEY),
                Some(&body),
            )
            .await
        }
    };
    let changed = patch(json!({ "name": "Acme Inc", "region": null })).await;
    assert_eq!(changed.status, StatusCode::OK, "{}", changed.body);
    assert_eq!(changed.body["name"], "Acme Inc");
    assert!(changed.body["region"].is_null(), "{}", changed.body);
    assert_eq!(changed.body["plan"], "met", "left out, kept");
    assert_eq!(changed.body["metadata"], json!({"a": 1}));

    subscribe(&app, "cp", json!({ "id": "s_cp", "plan": "b1" })).await;
    let refused = patch(json!({ "plan": "met" })).await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{}", refused.body);
    assert_eq!(refused.code(), "plan_set_by_subscription");
    assert_eq!(app.get("/v1/customers/cp").await.body["plan"], "b1");
    assert_eq!(cancel(&app, "cp", false).await.status, StatusCode::OK);
    assert!(app.get("/v1/customers/cp").await.body["plan"].is_null());
    let back = patch(json!({ "plan": "met", "metadata": {"b": 2} })).await;
    assert_eq!(back.status, StatusCode::OK, "{}", back.body);
    assert_eq!(back.body["plan"], "met");
    assert_eq!(back.body["metadata"], json!({"b": 2}));

    for bad in [
        json!({ "colour": "red" }),
        json!({ "metadata": [1] }),
        json!({ "name": "x".repeat(257) }),
    ] {
        let reply = patch(bad.clone()).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{bad}: {}",
            reply.body
        );
    }
    assert_eq!(app.get("/v1/customers/cp").await.body["name"], "Acme Inc");
    let ghost = app
        .send(
            Method::PATCH,
            "/v1/customers/ghost",
            Some(ADMIN_KEY),
            Some(&json!({ "name": "x" })),
        )
        .await;
    assert_eq!(ghost.status, StatusCode::NOT_FOUND, "{}", ghost.body);
}
