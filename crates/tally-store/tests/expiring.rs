//! `grant.expiring` warnings are found a chunk of lots per tick, in expiry
//! order, so a tick's cost is bounded however many lots expire within 90
//! days (looking at all of them cost 390 ms a tick with 200,000 lots on
//! SQLite; BENCHMARKS.md). Every due lot is still warned, once, and a lot
//! whose warning day comes while the writer runs is warned at the next tick
//! (the frontier), not a sweep later.

use std::sync::Arc;

mod common;
use common::{customer, grant, id, ok, TestStore};

use tally_core::Timestamp;
use tally_store::{Alerts, Command, ManualClock, NewWebhookEndpoint, Options, Store};

const START: Timestamp = Timestamp(1_800_000_000_000_000);
const DAY: i64 = 86_400_000_000;

/// The lot ids warned so far once there are `count` (or after 5 s): a
/// delivery shows among the due ones once its notification is known durable,
/// which the writer publishes just after it answers.
async fn warned(store: &Store, count: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let lots = warned_now(store).await;
        if lots.len() >= count || std::time::Instant::now() > deadline {
            return lots;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

async fn warned_now(store: &Store) -> Vec<String> {
    let mut lots: Vec<String> = store
        .due_deliveries_of("wh".into(), 1_000)
        .await
        .unwrap()
        .iter()
        .map(|d| {
            let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
            assert_eq!(body["type"], "grant.expiring");
            body["data"]["grant_id"].as_str().unwrap().to_owned()
        })
        .collect();
    lots.sort();
    lots
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tick_looks_at_one_chunk_and_every_due_lot_is_warned_once() {
    let place = TestStore::new("expiring_chunks");
    let clock = Arc::new(ManualClock::new(START));
    let options = Options {
        expiring_chunk: 3,
        ..Options::default()
    };
    let store = place.open_with(clock.clone(), options).await;
    endpoint_and_customer(&store).await;
    // Ten lots due a warning (expiring in 2 to 6 days, in an order that is
    // not their ids'), four more due at one instant, two not yet (in 30 days).
    let mut due = Vec::new();
    for n in 0..10i64 {
        let lot = format!("g{n:02}");
        let expires_at = Timestamp(START.0 + (2 + (n * 7) % 5) * DAY + n);
        ok(&store, grant(&lot, "5", Some(expires_at))).await;
        due.push(lot);
    }
    // Four more sharing one expiry, so that a chunk ends among them.
    for n in 0..4 {
        let lot = format!("tie{n}");
        ok(&store, grant(&lot, "5", Some(Timestamp(START.0 + 3 * DAY)))).await;
        due.push(lot);
    }
    for lot in ["later1", "later2"] {
        ok(&store, grant(lot, "5", Some(Timestamp(START.0 + 30 * DAY)))).await;
    }
    due.sort();
    // The writer restarts, and the customer then takes up the setting: no
    // lot is new to the writer, and none crosses into its window, so only
    // the sweep finds them.
    drop(store);
    let store = place.open_with(clock.clone(), options).await;
    warn_seven_days_ahead(&store).await;

    // The first tick looks at the three lots expiring soonest.
    // (Each count is waited for, then checked again after a pause: a tick
    // that warned more than its chunk would show here.)
    ok(&store, Command::Tick).await;
    assert_eq!(warned(&store, 3).await.len(), 3);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(warned_now(&store).await.len(), 3);
    // Three more per tick, then the sweep reaches the later lots (not due).
    ok(&store, Command::Tick).await;
    assert_eq!(warned(&store, 6).await.len(), 6);
    ok(&store, Command::Tick).await;
    assert_eq!(warned(&store, 9).await.len(), 9);
    ok(&store, Command::Tick).await;
    assert_eq!(warned(&store, 12).await.len(), 12);
    ok(&store, Command::Tick).await;
    assert_eq!(warned(&store, 14).await, due);
    // Further sweeps warn nobody twice.
    for _ in 0..6 {
        ok(&store, Command::Tick).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(warned_now(&store).await, due);
}

/// The endpoint and customer `c`.
async fn endpoint_and_customer(store: &Store) {
    ok(
        store,
        Command::CreateWebhookEndpoint(NewWebhookEndpoint {
            id: id("wh"),
            url: "http://127.0.0.1:9/hook".into(),
            events: vec!["grant.expiring".into()],
            secret: "whsec_test".into(),
        }),
    )
    .await;
    ok(store, customer()).await;
}

/// Customer `c` is warned 7 days ahead.
async fn warn_seven_days_ahead(store: &Store) {
    ok(
        store,
        Command::PutAlerts {
            customer_id: id("c"),
            alerts: Alerts {
                low_balance: Vec::new(),
                grant_expiring_days: Some(7),
            },
        },
    )
    .await;
}

/// A lot whose warning day comes after the sweep has passed it is warned at
/// the first tick after that day, not a sweep later: before and after a
/// restart (when the writer reads which settings are in use), when more lots
/// come into the window at once than a tick reads, and for a lot made
/// inside its window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lot_is_warned_at_the_first_tick_after_its_warning_day() {
    let place = TestStore::new("expiring_frontier");
    let clock = Arc::new(ManualClock::new(START));
    let options = || Options {
        expiring_chunk: 2,
        ..Options::default()
    };
    let store = place.open_with(clock.clone(), options()).await;
    endpoint_and_customer(&store).await;
    warn_seven_days_ahead(&store).await;
    let hour = DAY / 24;
    // `a1` to `a3` are due a warning in an hour; `later` in five days; ten
    // more lots expire in 20 to 29 days, so that a sweep takes seven ticks.
    for n in 1..=3 {
        let expires_at = Timestamp(START.0 + 7 * DAY + hour + n);
        ok(&store, grant(&format!("a{n}"), "5", Some(expires_at))).await;
    }
    ok(
        &store,
        grant("later", "5", Some(Timestamp(START.0 + 12 * DAY))),
    )
    .await;
    for n in 0..10 {
        let expires_at = Timestamp(START.0 + (20 + n) * DAY);
        ok(&store, grant(&format!("far{n}"), "5", Some(expires_at))).await;
    }
    // Two ticks: the sweep reads a1, a2, then a3 and `later`, none due yet.
    ok(&store, Command::Tick).await;
    ok(&store, Command::Tick).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(warned_now(&store).await, Vec::<String>::new());
    // Two hours on, all three are due. The sweep goes on with far0, far1;
    // the frontier reads two lots a tick, and goes on after the second.
    clock.advance_to(Timestamp(START.0 + 2 * hour));
    ok(&store, Command::Tick).await;
    assert_eq!(warned(&store, 2).await, ["a1", "a2"]);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(warned_now(&store).await, ["a1", "a2"], "two lots a tick");
    ok(&store, Command::Tick).await;
    assert_eq!(warned(&store, 3).await, ["a1", "a2", "a3"]);

    // After a restart the writer knows the setting in use: its first tick
    // starts the frontier, and `later` is warned at the tick after its day.
    drop(store);
    let store = place.open_with(clock.clone(), options()).await;
    ok(&store, Command::Tick).await;
    ok(&store, Command::Tick).await;
    clock.advance_to(Timestamp(START.0 + 5 * DAY + hour));
    ok(&store, Command::Tick).await;
    assert_eq!(warned(&store, 4).await, ["a1", "a2", "a3", "later"]);

    // A lot made inside its window (expiring in three days) is warned at
    // the next tick, while the sweep is among the far lots.
    ok(
        &store,
        grant("inside", "5", Some(Timestamp(START.0 + 8 * DAY))),
    )
    .await;
    ok(&store, Command::Tick).await;
    assert_eq!(
        warned(&store, 5).await,
        ["a1", "a2", "a3", "inside", "later"]
    );
    // Further ticks, a whole sweep and more, warn nobody twice.
    for _ in 0..8 {
        ok(&store, Command::Tick).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(
        warned_now(&store).await,
        ["a1", "a2", "a3", "inside", "later"]
    );
}
