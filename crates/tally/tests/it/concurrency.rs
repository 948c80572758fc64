//! Many clients at once against one customer: never an overspend, every id
//! takes effect exactly once, and every hold resolves exactly once.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::{assert_replayable, decimal, micros, micros_of, Reply, TestApp};

const CLIENTS: usize = 64;
const CHARGES_PER_CLIENT: usize = 20;
const GRANTED: &str = "1000";
const PRICE: &str = "1.5";

/// A tiny deterministic generator (SplitMix64): reproducible "random" choices
/// without another dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `low..=high`.
    fn between(&mut self, low: i64, high: i64) -> i64 {
        let span = u64::try_from(high - low + 1).expect("non-empty range");
        low + i64::try_from(self.next() % span).expect("fits")
    }
}

/// Poll the balance while the load runs: available and held never negative,
/// never more than was granted. Returns how many polls it made.
fn watch_balance(
    app: Arc<TestApp>,
    customer: &'static str,
    granted: i64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut polls = 0;
        while !stop.load(Ordering::SeqCst) {
            let balance = app.balance(customer).await;
            let available = micros_of(&balance["available"]);
            let held = micros_of(&balance["held"]);
            assert!(available >= 0, "available went negative: {balance}");
            assert!(held >= 0, "held went negative: {balance}");
            assert!(
                available + held <= granted,
                "more than granted is available or held: {balance}"
            );
            polls += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        polls
    })
}

fn charge_body(id: &str, customer: &str, amount: &str) -> Value {
    json!({ "id": id, "customer_id": customer, "amount": amount })
}

/// A charge answer is a success, or a refusal for insufficient credits:
/// nothing else (no 5xx, no other 4xx) under any concurrency.
fn assert_charge_answer(id: &str, reply: &Reply) {
    match reply.status {
        StatusCode::OK => {
            assert_eq!(reply.str("id"), id, "charge answer for another id");
            assert_eq!(
                micros_of(&reply.body["amount"]),
                micros(PRICE),
                "{}",
                reply.body
            );
            assert!(reply.body["entry_id"].is_string(), "{}", reply.body);
        }
        StatusCode::PAYMENT_REQUIRED => {
            assert_eq!(reply.code(), "insufficient_credits", "{}", reply.body);
        }
        other => panic!("charge {id}: unexpected {other}: {}", reply.body),
    }
}

/// After a drain: the successes account for exactly what left the balance,
/// each with its own `balance_after`, each once in the ledger.
async fn assert_drained(app: &TestApp, customer: &str, successes: &HashMap<String, Value>) {
    let granted = micros(GRANTED);
    let price = micros(PRICE);
    let balance = app.balance(customer).await;
    let available = micros_of(&balance["available"]);
    assert_eq!(micros_of(&balance["held"]), 0, "{balance}");
    let count = i64::try_from(successes.len()).expect("fits");
    assert_eq!(
        count * price,
        granted - available,
        "{count} successful charges of {PRICE} but the balance is {available} micros"
    );
    assert!(available >= 0, "overspent: {balance}");
    assert!(
        available < price,
        "not drained as far as possible: {balance} after {count} charges"
    );
    // 1000 / 1.5: exactly 666 charges fit.
    assert_eq!(count, granted / price, "successful charges");

    // Serializable: every success saw its own balance, one step of the drain each.
    let mut seen: Vec<i64> = successes
        .values()
        .map(|b| micros_of(&b["balance_after"]))
        .collect();
    seen.sort_unstable_by(|a, b| b.cmp(a));
    let expected: Vec<i64> = (1..=count).map(|k| granted - k * price).collect();
    assert_eq!(seen, expected, "balance_after of the successful charges");

    // The ledger: the grant and one charge entry per success, nothing else.
    let entries = app.ledger_all(customer).await;
    let replayed = assert_replayable(&entries);
    assert_eq!(replayed, available, "the ledger replays to the balance");
    let mut charged: HashMap<String, usize> = HashMap::new();
    let mut charged_total = 0;
    for entry in &entries {
        match entry["kind"].as_str() {
            Some("grant") => {}
            Some("charge") => {
                let reference = entry["reference"].as_str().expect("charge reference");
                *charged.entry(reference.to_string()).or_default() += 1;
                charged_total += micros_of(&entry["amount"]);
                let answer = &successes
                    .get(reference)
                    .unwrap_or_else(|| panic!("ledger charge {reference} was never acknowledged"));
                assert_eq!(entry["id"], answer["entry_id"], "entry of {reference}");
            }
            other => panic!("unexpected entry kind {other:?}: {entry}"),
        }
    }
    assert_eq!(
        charged.len(),
        successes.len(),
        "charge entries in the ledger"
    );
    for id in successes.keys() {
        assert_eq!(charged.get(id), Some(&1), "charge {id} in the ledger");
    }
    assert_eq!(charged_total, granted - available, "sum of charge entries");
}

/// An id whose first attempt succeeded or failed keeps that answer forever,
/// even once credits are back.
async fn assert_outcomes_stick(
    app: &TestApp,
    customer: &str,
    successes: &HashMap<String, Value>,
    refused: &[String],
) {
    let before = app.balance(customer).await["available"].clone();
    app.grant(customer, "g-topup", GRANTED).await;
    let after_grant = micros_of(&before) + micros(GRANTED);
    let retries = successes
        .iter()
        .take(100)
        .map(|(id, body)| (id.clone(), Some(body.clone())))
        .chain(refused.iter().take(100).map(|id| (id.clone(), None)));
    let replies = join_all(retries.map(|(id, original)| async move {
        let reply = app
            .post("/v1/charges", charge_body(&id, customer, PRICE))
            .await;
        (id, original, reply)
    }))
    .await;
    for (id, original, reply) in replies {
        assert!(
            reply.replayed(),
            "retry of {id} not replayed: {}",
            reply.body
        );
        match original {
            Some(body) => {
                assert_eq!(
                    reply.status,
                    StatusCode::OK,
                    "retry of {id}: {}",
                    reply.body
                );
                assert_eq!(reply.body, body, "retry of {id} answered differently");
            }
            None => {
                assert_eq!(
                    reply.status,
                    StatusCode::PAYMENT_REQUIRED,
                    "refused charge {id} flipped on retry: {}",
                    reply.body
                );
                assert_eq!(reply.code(), "insufficient_credits");
            }
        }
    }
    let balance = app.balance(customer).await;
    assert_eq!(
        micros_of(&balance["available"]),
        after_grant,
        "retries changed the balance: {balance}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_charges_never_overspend() {
    let app = Arc::new(TestApp::spawn().await);
    app.customer("drain").await;
    app.grant("drain", "g1", GRANTED).await;
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_balance(app.clone(), "drain", micros(GRANTED), stop.clone());

    let clients = (0..CLIENTS).map(|client| {
        let app = app.clone();
        tokio::spawn(async move {
            let mut answers = Vec::with_capacity(CHARGES_PER_CLIENT);
            for n in 0..CHARGES_PER_CLIENT {
                let id = format!("a-{client}-{n}");
                let reply = app
                    .post("/v1/charges", charge_body(&id, "drain", PRICE))
                    .await;
                answers.push((id, reply));
            }
            answers
        })
    });
    let answers: Vec<(String, Reply)> = join_all(clients)
        .await
        .into_iter()
        .flat_map(|r| r.expect("client task"))
        .collect();
    stop.store(true, Ordering::SeqCst);
    let polls = watcher.await.expect("balance watcher");
    assert!(polls > 0, "the balance was never polled during the load");

    assert_eq!(answers.len(), CLIENTS * CHARGES_PER_CLIENT);
    let mut successes = HashMap::new();
    let mut refused = Vec::new();
    for (id, reply) in &answers {
        assert_charge_answer(id, reply);
        assert!(!reply.replayed(), "first attempt of {id} marked replayed");
        if reply.status == StatusCode::OK {
            successes.insert(id.clone(), reply.body.clone());
        } else {
            refused.push(id.clone());
        }
    }
    println!(
        "{} charges acknowledged, {} refused, {polls} balance polls during the load",
        successes.len(),
        refused.len()
    );
    assert_drained(&app, "drain", &successes).await;
    assert_outcomes_stick(&app, "drain", &successes, &refused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_retries_take_effect_once() {
    let app = Arc::new(TestApp::spawn().await);
    app.customer("twice").await;
    app.grant("twice", "g1", GRANTED).await;

    let clients = (0..CLIENTS).map(|client| {
        let app = app.clone();
        tokio::spawn(async move {
            let mut answers = Vec::with_capacity(CHARGES_PER_CLIENT);
            for n in 0..CHARGES_PER_CLIENT {
                let id = format!("b-{client}-{n}");
                let body = charge_body(&id, "twice", PRICE);
                let (first, second) = tokio::join!(
                    app.post("/v1/charges", body.clone()),
                    app.post("/v1/charges", body.clone())
                );
                answers.push((id, first, second));
            }
            answers
        })
    });
    let answers: Vec<(String, Reply, Reply)> = join_all(clients)
        .await
        .into_iter()
        .flat_map(|r| r.expect("client task"))
        .collect();

    let mut successes = HashMap::new();
    for (id, first, second) in &answers {
        assert_charge_answer(id, first);
        assert_charge_answer(id, second);
        assert_eq!(first.status, second.status, "two answers for {id}");
        assert_eq!(first.body, second.body, "two answers for {id}");
        assert_eq!(
            u8::from(first.replayed()) + u8::from(second.replayed()),
            1,
            "exactly one of the two attempts of {id} must be the replay"
        );
        if first.status == StatusCode::OK {
            successes.insert(id.clone(), first.body.clone());
        }
    }
    assert_drained(&app, "twice", &successes).await;
}

/// What one hold went through, from the client's side.
struct HoldRun {
    id: String,
    amount: i64,
    /// `None`: refused for insufficient credits.
    resolution: Option<Resolution>,
}

enum Resolution {
    Captured { captured: i64, entry_id: Value },
    Released { entry_id: Value },
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_holds_resolve_and_conserve() {
    const HOLDS_PER_TASK: usize = 10;
    let granted = micros("1500");
    let app = Arc::new(TestApp::spawn().await);
    app.customer("holder").await;
    app.grant("holder", "g1", &decimal(granted)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_balance(app.clone(), "holder", granted, stop.clone());

    let tasks = (0..CLIENTS).map(|task| {
        let app = app.clone();
        tokio::spawn(async move {
            let mut rng = Rng(0x7A11_0000 + task as u64);
            let mut runs = Vec::new();
            for n in 0..HOLDS_PER_TASK {
                let id = format!("h-{task}-{n}");
                // Up to 20 credits, down to the micro-credit.
                let amount = rng.between(1, 20_000_000);
                let placed = app
                    .post(
                        "/v1/holds",
                        json!({ "id": id, "customer_id": "holder",
                                "amount": decimal(amount), "timeout_seconds": 600 }),
                    )
                    .await;
                match placed.status {
                    StatusCode::OK => {
                        assert_eq!(micros_of(&placed.body["amount"]), amount, "{}", placed.body);
                        assert_eq!(placed.body["status"], "active", "{}", placed.body);
                    }
                    StatusCode::PAYMENT_REQUIRED => {
                        assert_eq!(placed.code(), "insufficient_credits", "{}", placed.body);
                        runs.push(HoldRun {
                            id,
                            amount,
                            resolution: None,
                        });
                        continue;
                    }
                    other => panic!("hold {id}: unexpected {other}: {}", placed.body),
                }
                let choice = rng.between(0, 2);
                let resolution = if choice == 2 {
                    let reply = app
                        .post(&format!("/v1/holds/{id}/release"), json!({}))
                        .await;
                    assert_eq!(reply.status, StatusCode::OK, "release {id}: {}", reply.body);
                    assert_eq!(micros_of(&reply.body["released"]), amount, "{}", reply.body);
                    Resolution::Released {
                        entry_id: reply.body["entry_id"].clone(),
                    }
                } else {
                    // Capture all (no amount) or a random part of it.
                    let (body, expected) = if choice == 0 {
                        (json!({}), amount)
                    } else {
                        let part = rng.between(1, amount);
                        (json!({ "amount": decimal(part) }), part)
                    };
                    let reply = app.post(&format!("/v1/holds/{id}/capture"), body).await;
                    assert_eq!(reply.status, StatusCode::OK, "capture {id}: {}", reply.body);
                    let captured = micros_of(&reply.body["captured"]);
                    assert_eq!(captured, expected, "{}", reply.body);
                    assert_eq!(
                        captured + micros_of(&reply.body["released"]),
                        amount,
                        "captured + released != held: {}",
                        reply.body
                    );
                    Resolution::Captured {
                        captured,
                        entry_id: reply.body["entry_id"].clone(),
                    }
                };
                runs.push(HoldRun {
                    id,
                    amount,
                    resolution: Some(resolution),
                });
            }
            runs
        })
    });
    let runs: Vec<HoldRun> = join_all(tasks)
        .await
        .into_iter()
        .flat_map(|r| r.expect("hold task"))
        .collect();
    stop.store(true, Ordering::SeqCst);
    watcher.await.expect("balance watcher");

    let consumed: i64 = runs
        .iter()
        .map(|r| match r.resolution {
            Some(Resolution::Captured { captured, .. }) => captured,
            _ => 0,
        })
        .sum();
    let placed = runs.iter().filter(|r| r.resolution.is_some()).count();
    let captures = runs
        .iter()
        .filter(|r| matches!(r.resolution, Some(Resolution::Captured { .. })))
        .count();
    println!(
        "{placed} holds placed ({captures} captured, {} released), {} refused, consumed {}",
        placed - captures,
        runs.len() - placed,
        decimal(consumed)
    );
    assert!(
        placed >= CLIENTS,
        "only {placed} holds were placed: the test did too little"
    );
    let balance = app.balance("holder").await;
    assert_eq!(micros_of(&balance["held"]), 0, "{balance}");
    assert_eq!(
        micros_of(&balance["available"]) + consumed,
        granted,
        "available + consumed != granted: {balance}, consumed {}",
        decimal(consumed)
    );

    // The ledger: each placed hold has one hold entry and one resolution entry.
    let entries = app.ledger_all("holder").await;
    let replayed = assert_replayable(&entries);
    assert_eq!(replayed, micros_of(&balance["available"]));
    let mut by_reference: HashMap<String, Vec<&Value>> = HashMap::new();
    for entry in &entries {
        if entry["kind"] != "grant" {
            let reference = entry["reference"].as_str().expect("reference").to_string();
            by_reference.entry(reference).or_default().push(entry);
        }
    }
    let mut ledger_consumed = 0;
    for run in &runs {
        let found = by_reference.remove(&run.id).unwrap_or_default();
        let kinds: Vec<&str> = found
            .iter()
            .rev()
            .map(|e| e["kind"].as_str().unwrap_or(""))
            .collect();
        match &run.resolution {
            None => assert!(found.is_empty(), "refused hold {} left entries", run.id),
            Some(Resolution::Captured { captured, entry_id }) => {
                assert_eq!(kinds, ["hold", "capture"], "entries of hold {}", run.id);
                assert_eq!(micros_of(&found[1]["amount"]), run.amount);
                assert_eq!(micros_of(&found[0]["amount"]), *captured);
                assert_eq!(&found[0]["id"], entry_id);
                ledger_consumed += captured;
            }
            Some(Resolution::Released { entry_id }) => {
                assert_eq!(kinds, ["hold", "release"], "entries of hold {}", run.id);
                assert_eq!(micros_of(&found[0]["amount"]), run.amount);
                assert_eq!(&found[0]["id"], entry_id);
            }
        }
    }
    assert!(
        by_reference.is_empty(),
        "ledger entries for unknown ids: {:?}",
        by_reference.keys().collect::<Vec<_>>()
    );
    assert_eq!(ledger_consumed, consumed);
}

/// One contested hold: the two requests sent at once, and what should happen.
#[derive(Clone, Copy, Debug)]
enum Race {
    /// Capture all against release: one wins, the other is refused.
    CaptureVersusRelease,
    /// Release against a partial capture.
    ReleaseVersusPartCapture,
    /// Two different partial captures: one wins.
    TwoDifferentCaptures,
    /// The same capture twice: one takes effect, the other is its replay.
    SameCaptureTwice,
    /// The same release twice.
    SameReleaseTwice,
}

impl Race {
    const ALL: [Race; 5] = [
        Race::CaptureVersusRelease,
        Race::ReleaseVersusPartCapture,
        Race::TwoDifferentCaptures,
        Race::SameCaptureTwice,
        Race::SameReleaseTwice,
    ];

    /// (path suffix, body) of the two requests.
    fn requests(self) -> [(&'static str, Value); 2] {
        let capture_all = ("capture", json!({}));
        let release = ("release", json!({}));
        match self {
            Race::CaptureVersusRelease => [capture_all, release],
            Race::ReleaseVersusPartCapture => [release, ("capture", json!({ "amount": "1" }))],
            Race::TwoDifferentCaptures => [
                ("capture", json!({ "amount": "1" })),
                ("capture", json!({ "amount": "2" })),
            ],
            Race::SameCaptureTwice => [capture_all.clone(), capture_all],
            Race::SameReleaseTwice => [release.clone(), release],
        }
    }

    fn same_request(self) -> bool {
        matches!(self, Race::SameCaptureTwice | Race::SameReleaseTwice)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn capture_and_release_race_resolves_once() {
    const HOLDS: usize = 150;
    let hold_amount = micros("2.5");
    let granted = micros("1000");
    let app = Arc::new(TestApp::spawn().await);
    app.customer("racer").await;
    app.grant("racer", "g1", &decimal(granted)).await;

    let placed = join_all((0..HOLDS).map(|n| {
        let app = app.clone();
        async move {
            let id = format!("r-{n}");
            let reply = app
                .post(
                    "/v1/holds",
                    json!({ "id": id, "customer_id": "racer",
                            "amount": decimal(hold_amount), "timeout_seconds": 600 }),
                )
                .await;
            assert_eq!(reply.status, StatusCode::OK, "hold {id}: {}", reply.body);
        }
    }))
    .await;
    assert_eq!(placed.len(), HOLDS);
    let balance = app.balance("racer").await;
    assert_eq!(
        micros_of(&balance["held"]),
        hold_amount * HOLDS as i64,
        "{balance}"
    );

    // Every pair at once, and every hold's two requests at once.
    let races = join_all((0..HOLDS).map(|n| {
        let app = app.clone();
        async move {
            let race = Race::ALL[n % Race::ALL.len()];
            let id = format!("r-{n}");
            let [(a_path, a_body), (b_path, b_body)] = race.requests();
            let (a_url, b_url) = (
                format!("/v1/holds/{id}/{a_path}"),
                format!("/v1/holds/{id}/{b_path}"),
            );
            let (a, b) = tokio::join!(
                app.post(&a_url, a_body.clone()),
                app.post(&b_url, b_body.clone())
            );
            (id, race, [(a_path, a_body, a), (b_path, b_body, b)])
        }
    }))
    .await;

    let mut consumed = 0;
    let mut winners: HashMap<String, (&'static str, Value)> = HashMap::new();
    for (id, race, answers) in &races {
        for (_, _, reply) in answers {
            assert!(
                reply.status == StatusCode::OK || reply.status == StatusCode::CONFLICT,
                "{race:?} on {id}: unexpected {}: {}",
                reply.status,
                reply.body
            );
        }
        let fresh: Vec<_> = answers
            .iter()
            .filter(|(_, _, r)| r.status == StatusCode::OK && !r.replayed())
            .collect();
        assert_eq!(
            fresh.len(),
            1,
            "{race:?} on {id}: exactly one request must take effect, got {:?}",
            answers
                .iter()
                .map(|(_, _, r)| (r.status, r.replayed()))
                .collect::<Vec<_>>()
        );
        let (path, body, winner) = fresh[0];
        let loser = answers
            .iter()
            .map(|(_, _, r)| r)
            .find(|r| !std::ptr::eq(*r, winner))
            .expect("two answers");
        if race.same_request() {
            assert_eq!(
                loser.status,
                StatusCode::OK,
                "{race:?} on {id}: {}",
                loser.body
            );
            assert!(
                loser.replayed(),
                "{race:?} on {id}: the retry is not a replay"
            );
            assert_eq!(loser.body, winner.body, "{race:?} on {id}: answers differ");
        } else {
            assert_eq!(
                loser.status,
                StatusCode::CONFLICT,
                "{race:?} on {id}: {}",
                loser.body
            );
            assert_eq!(loser.code(), "hold_already_resolved", "{}", loser.body);
        }
        if *path == "capture" {
            let expected = body["amount"].as_str().map_or(hold_amount, micros);
            let captured = micros_of(&winner.body["captured"]);
            assert_eq!(captured, expected, "{}", winner.body);
            assert_eq!(micros_of(&winner.body["released"]), hold_amount - captured);
            consumed += captured;
        } else {
            assert_eq!(micros_of(&winner.body["released"]), hold_amount);
        }
        winners.insert(id.clone(), (path, winner.body.clone()));
    }
    assert!(
        winners.values().any(|(p, _)| *p == "capture")
            && winners.values().any(|(p, _)| *p == "release"),
        "the races never went both ways"
    );

    println!(
        "{} races: {} won by a capture, {} by a release",
        winners.len(),
        winners.values().filter(|(p, _)| *p == "capture").count(),
        winners.values().filter(|(p, _)| *p == "release").count()
    );

    // The hold itself tells the same story, and a late third attempt changes nothing.
    for (id, (path, body)) in &winners {
        let hold = app.get(&format!("/v1/holds/{id}")).await;
        assert_eq!(hold.status, StatusCode::OK, "{}", hold.body);
        let status = if *path == "capture" {
            "captured"
        } else {
            "released"
        };
        assert_eq!(hold.body["status"], status, "hold {id}: {}", hold.body);
        if *path == "capture" {
            assert_eq!(hold.body["captured"], body["captured"], "hold {id}");
        }
    }
    let late = app
        .post("/v1/holds/r-0/release", json!({ "reason": "late" }))
        .await;
    assert_eq!(late.status, StatusCode::CONFLICT, "{}", late.body);
    assert_eq!(late.code(), "hold_already_resolved");

    let balance = app.balance("racer").await;
    assert_eq!(micros_of(&balance["held"]), 0, "{balance}");
    assert_eq!(
        micros_of(&balance["available"]) + consumed,
        granted,
        "available + consumed != granted: {balance}"
    );
    let entries = app.ledger_all("racer").await;
    assert_eq!(
        assert_replayable(&entries),
        micros_of(&balance["available"])
    );
    let mut resolutions: HashMap<&str, Vec<&str>> = HashMap::new();
    for entry in &entries {
        let kind = entry["kind"].as_str().unwrap_or("");
        if kind == "capture" || kind == "release" {
            let reference = entry["reference"].as_str().expect("reference");
            resolutions.entry(reference).or_default().push(kind);
        }
    }
    let ids: HashSet<&str> = winners.keys().map(String::as_str).collect();
    assert_eq!(
        resolutions.len(),
        ids.len(),
        "holds with a resolution entry"
    );
    for (id, kinds) in &resolutions {
        assert!(ids.contains(id), "resolution entry for unknown hold {id}");
        assert_eq!(
            kinds.len(),
            1,
            "hold {id} resolved more than once: {kinds:?}"
        );
        assert_eq!(kinds[0], winners[*id].0, "hold {id} resolved by the loser");
    }
}
