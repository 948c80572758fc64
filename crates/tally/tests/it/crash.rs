//! Acknowledged is durable: a server killed with SIGKILL under charge load,
//! then restarted on the same data directory, has every acknowledged charge
//! exactly once, and every invariant still holds.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::{assert_replayable, decimal, micros, micros_of, Reply, TestApp, ADMIN_KEY};

const CLIENTS: usize = 32;
const CYCLES: usize = 3;
const CUSTOMER: &str = "crashy";
const GRANTED: &str = "1000000";
const PRICE: &str = "1.25";
const LOAD_FOR: Duration = Duration::from_millis(1500);

/// What the clients saw during one run of load.
#[derive(Default)]
struct Load {
    /// Answered 200: must survive the crash.
    acknowledged: HashMap<String, Value>,
    /// Sent, but no answer came back (the connection died, or never opened).
    unanswered: Vec<String>,
    /// Answered with anything but 200: there should be none.
    other: Vec<(String, StatusCode, Value)>,
}

/// Send one charge; `Err` when no complete answer arrived.
async fn try_charge(client: &reqwest::Client, base: &str, id: &str) -> Result<Reply, String> {
    let response = client
        .post(format!("{base}/v1/charges"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({ "id": id, "customer_id": CUSTOMER, "amount": PRICE }))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.map_err(|e| e.to_string())?;
    let body = serde_json::from_slice(&bytes).map_err(|e| format!("{e}: {bytes:?}"))?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// Run `CLIENTS` clients charging as fast as they can, kill the server with
/// SIGKILL while they are at it, and collect what each of them saw.
async fn load_then_kill(app: &mut TestApp, cycle: usize) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let http = app.client.clone();
            let base = app.base.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut load = Load::default();
                for n in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let id = format!("k{cycle}-{client}-{n}");
                    match try_charge(&http, &base, &id).await {
                        Ok(reply) if reply.status == StatusCode::OK => {
                            load.acknowledged.insert(id, reply.body);
                        }
                        Ok(reply) => load.other.push((id, reply.status, reply.body)),
                        Err(_) => {
                            // The server is gone: nothing more will be answered.
                            load.unanswered.push(id);
                            break;
                        }
                    }
                }
                load
            })
        })
        .collect();
    tokio::time::sleep(LOAD_FOR).await;
    // SIGKILL with requests in flight; only then tell the clients to stop, so
    // every client is still sending when the process dies.
    app.kill().await;
    stop.store(true, Ordering::SeqCst);
    let mut total = Load::default();
    for client in clients {
        let load = tokio::time::timeout(Duration::from_secs(30), client)
            .await
            .expect("a client hung after the kill")
            .expect("client task");
        total.acknowledged.extend(load.acknowledged);
        total.unanswered.extend(load.unanswered);
        total.other.extend(load.other);
    }
    total
}

/// The charge entries of the customer's ledger: reference → entries.
fn charges_by_reference(entries: &[Value]) -> HashMap<String, Vec<Value>> {
    let mut charges: HashMap<String, Vec<Value>> = HashMap::new();
    for entry in entries {
        match entry["kind"].as_str() {
            Some("grant") => {}
            Some("charge") => {
                let reference = entry["reference"].as_str().expect("charge reference");
                charges
                    .entry(reference.to_string())
                    .or_default()
                    .push(entry.clone());
            }
            other => panic!("unexpected entry kind {other:?}: {entry}"),
        }
    }
    charges
}

/// Every invariant the restarted server must keep, given the ids that must be
/// in the ledger exactly once (`required`) and the ids that may be (`maybe`).
async fn assert_consistent(
    app: &TestApp,
    required: &HashSet<String>,
    maybe: &HashSet<String>,
) -> HashMap<String, Vec<Value>> {
    let granted = micros(GRANTED);
    let price = micros(PRICE);
    let entries = app.ledger_all(CUSTOMER).await;
    let grants = entries.iter().filter(|e| e["kind"] == "grant").count();
    assert_eq!(grants, 1, "grant entries in the ledger");
    let replayed = assert_replayable(&entries);
    let charges = charges_by_reference(&entries);
    for (reference, found) in &charges {
        assert_eq!(
            found.len(),
            1,
            "charge {reference} is in the ledger {} times",
            found.len()
        );
        assert!(
            required.contains(reference) || maybe.contains(reference),
            "charge {reference} in the ledger was never sent"
        );
        assert_eq!(micros_of(&found[0]["amount"]), price, "{}", found[0]);
    }
    let lost: Vec<&String> = required
        .iter()
        .filter(|id| !charges.contains_key(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged charges are missing after the restart, e.g. {:?}",
        lost.len(),
        lost.iter().take(5).collect::<Vec<_>>()
    );
    let count = i64::try_from(charges.len()).expect("fits");
    let balance = app.balance(CUSTOMER).await;
    let available = micros_of(&balance["available"]);
    assert_eq!(micros_of(&balance["held"]), 0, "{balance}");
    assert_eq!(
        available,
        granted - price * count,
        "balance {} but {count} charges of {PRICE} in the ledger",
        balance["available"]
    );
    assert_eq!(replayed, available, "the ledger replays to the balance");
    let remaining: i64 = balance["grants"]
        .as_array()
        .expect("grants")
        .iter()
        .map(|g| micros_of(&g["remaining"]))
        .sum();
    assert_eq!(remaining, available, "sum of grants' remaining: {balance}");
    charges
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn sigkill_under_load_loses_no_acknowledged_charge() {
    let mut app = TestApp::spawn().await;
    app.customer(CUSTOMER).await;
    app.grant(CUSTOMER, "g-crash", GRANTED).await;

    // Ids that must be in the ledger exactly once from now on.
    let mut required: HashSet<String> = HashSet::new();
    for cycle in 0..CYCLES {
        let load = load_then_kill(&mut app, cycle).await;
        assert!(
            load.other.is_empty(),
            "cycle {cycle}: answers other than 200: {:?}",
            load.other.iter().take(5).collect::<Vec<_>>()
        );
        assert!(
            load.acknowledged.len() >= 50,
            "cycle {cycle}: only {} charges acknowledged before the kill",
            load.acknowledged.len()
        );
        assert!(
            !load.unanswered.is_empty(),
            "cycle {cycle}: no request was in flight at the kill"
        );

        app.start().await;

        // Every acknowledged charge is there once; unanswered ones at most once.
        required.extend(load.acknowledged.keys().cloned());
        let maybe: HashSet<String> = load.unanswered.iter().cloned().collect();
        let charges = assert_consistent(&app, &required, &maybe).await;
        let committed_unanswered = load
            .unanswered
            .iter()
            .filter(|id| charges.contains_key(*id))
            .count();
        for (id, body) in &load.acknowledged {
            assert_eq!(charges[id][0]["id"], body["entry_id"], "entry of {id}");
        }

        // Retrying an acknowledged charge replays its original answer.
        let app_ref = &app;
        let retries: Vec<(String, Value, Reply)> =
            stream::iter(load.acknowledged.iter().map(|(id, body)| async move {
                let reply = app_ref
                    .post(
                        "/v1/charges",
                        json!({ "id": id, "customer_id": CUSTOMER, "amount": PRICE }),
                    )
                    .await;
                (id.clone(), body.clone(), reply)
            }))
            .buffer_unordered(CLIENTS)
            .collect()
            .await;
        for (id, original, reply) in &retries {
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "retry of {id}: {}",
                reply.body
            );
            assert!(reply.replayed(), "retry of acknowledged {id} not replayed");
            assert_eq!(micros_of(&reply.body["amount"]), micros(PRICE));
            assert_eq!(&reply.body, original, "retry of {id} answered differently");
        }

        // Retrying an unanswered charge makes it take effect, exactly once.
        let retries: Vec<(String, Reply)> =
            stream::iter(load.unanswered.iter().map(|id| async move {
                let reply = app_ref
                    .post(
                        "/v1/charges",
                        json!({ "id": id, "customer_id": CUSTOMER, "amount": PRICE }),
                    )
                    .await;
                (id.clone(), reply)
            }))
            .buffer_unordered(CLIENTS)
            .collect()
            .await;
        for (id, reply) in &retries {
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "retry of {id}: {}",
                reply.body
            );
            assert_eq!(
                reply.replayed(),
                charges.contains_key(id),
                "retry of unanswered {id}: replayed exactly when it was already in the ledger"
            );
            if let Some(found) = charges.get(id) {
                assert_eq!(reply.body["entry_id"], found[0]["id"], "entry of {id}");
            }
        }
        required.extend(load.unanswered.iter().cloned());
        let charges = assert_consistent(&app, &required, &HashSet::new()).await;
        assert_eq!(charges.len(), required.len(), "charges in the ledger");
        println!(
            "cycle {cycle}: {} acknowledged, {} unanswered ({} of them committed before the kill), \
             {} charges in the ledger, available {}",
            load.acknowledged.len(),
            load.unanswered.len(),
            committed_unanswered,
            charges.len(),
            decimal(micros(GRANTED) - micros(PRICE) * charges.len() as i64)
        );
    }
}
