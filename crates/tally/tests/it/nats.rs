//! The NATS JetStream consumer end to end, against the real nats-server on
//! 127.0.0.1:4222, which `scripts/nats.sh` starts (and installs) when it is not
//! running yet. A NATS server that cannot be had fails the test.
//!
//! - `every_good_event_is_charged_once_across_a_sigkill`: a stream holds good
//!   events, duplicates and bad messages (not JSON, empty, missing fields,
//!   unknown customer, unknown feature) while `tally serve` consumes it; it is
//!   killed with SIGKILL midway and restarted. Every good event is then
//!   charged exactly once, every bad one is a dead letter with its reason, and
//!   the consumer has acked everything.
//! - `the_consumer_waits_for_its_stream_and_follows_the_subject_flag`: tally
//!   starts before its stream exists, creates its durable consumer with
//!   bounded acks once it does, and moves the filter when `--nats-subject`
//!   changes.
//! - `the_consumer_reconnects_after_the_nats_server_dies`: a private
//!   nats-server is killed with SIGKILL and restarted under a running tally.
//! - `a_graceful_stop_acks_exactly_what_was_charged`: SIGTERM midway; the
//!   messages acked are then exactly the events charged, and a restart
//!   charges the rest once each.
//! - `bad_nats_flags_stop_the_server_at_once`.
//! - `only_the_server_that_runs_the_writer_consumes`: two servers over one
//!   PostgreSQL database; the consumer moves with the writer, from one
//!   server to the other and back, without a restart, and no message is
//!   delivered twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::IntoFuture;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::jetstream::{self, stream};
use serde_json::{json, Value};

use crate::support::{
    assert_replayable, decimal, fresh_dir, leader_lock_sessions, micros, micros_of,
    terminate_sessions, wait_until, Options, TestApp, ADMIN_KEY,
};

const NATS_URL: &str = "nats://127.0.0.1:4222";
const CUSTOMERS: usize = 4;
const GRANTED: &str = "1000000";
/// The ack wait of the consumer the SIGKILL test creates itself (tally keeps
/// an existing consumer's settings): what the killed process held comes back
/// after this, not after tally's default of 30 s.
const SHORT_ACK_WAIT: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------- NATS side

/// Make sure nats-server with JetStream answers (idempotent), or fail the
/// test saying why.
fn ensure_nats() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/nats.sh");
    let output = std::process::Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "NATS JetStream for this test could not be had on {NATS_URL}: {} said:\n{}{}",
        script.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A JetStream context on `url`, or a failed test.
async fn connect(url: &str) -> jetstream::Context {
    let client = tokio::time::timeout(Duration::from_secs(10), async_nats::connect(url))
        .await
        .unwrap_or_else(|_| panic!("connecting to NATS on {url} took more than 10 s"))
        .unwrap_or_else(|e| panic!("cannot connect to NATS on {url}: {e}"));
    jetstream::new(client)
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A stream name and a subject prefix no other test (or earlier run) uses.
fn unique(what: &str) -> (String, String) {
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos();
    let id = format!("{}_{n}_{nanos}", std::process::id());
    (
        format!("TALLY_IT_{}_{id}", what.to_uppercase()),
        format!("tally-it.{what}.{id}"),
    )
}

/// Deletes its stream when dropped, even when the test fails.
struct StreamGuard {
    url: String,
    name: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.name.clone());
        // A runtime of its own: Drop cannot await, and the test's runtime may
        // be gone (or be the one panicking).
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let connected =
                    tokio::time::timeout(Duration::from_secs(5), async_nats::connect(&url)).await;
                if let Ok(Ok(client)) = connected {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        jetstream::new(client).delete_stream(&name),
                    )
                    .await;
                }
            });
        })
        .join();
    }
}

/// Create a stream holding `subjects`.
async fn create_stream(
    js: &jetstream::Context,
    url: &str,
    name: &str,
    subjects: Vec<String>,
) -> (jetstream::stream::Stream, StreamGuard) {
    let stream = js
        .create_stream(stream::Config {
            name: name.to_owned(),
            subjects,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("create stream {name} on {url}: {e}"));
    (
        stream,
        StreamGuard {
            url: url.to_owned(),
            name: name.to_owned(),
        },
    )
}

/// Publish each message and wait for JetStream to acknowledge it (in chunks,
/// pausing `pause` between chunks).
async fn publish(
    js: &jetstream::Context,
    messages: &[(String, Vec<u8>)],
    chunk: usize,
    pause: Duration,
) {
    for part in messages.chunks(chunk) {
        let mut acks = Vec::with_capacity(part.len());
        for (subject, payload) in part {
            let ack = js
                .publish(subject.clone(), payload.clone().into())
                .await
                .unwrap_or_else(|e| panic!("publish to {subject}: {e}"));
            acks.push(ack.into_future());
        }
        for ack in futures_util::future::join_all(acks).await {
            ack.unwrap_or_else(|e| panic!("JetStream did not acknowledge a publish: {e}"));
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

/// The durable consumer `tally`'s info, when it exists.
async fn consumer_info(stream: &jetstream::stream::Stream) -> Option<jetstream::consumer::Info> {
    stream.consumer_info("tally").await.ok()
}

/// The consumer once the acks the killed server sent have all landed: the
/// NATS server may still be reading them from the dead connection when a
/// first look is answered (a CI run counted 19 acks after it), so look
/// until two looks 250 ms apart agree on how many were acked.
async fn settled_after_kill(stream: &jetstream::stream::Stream) -> jetstream::consumer::Info {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = consumer_info(stream)
        .await
        .expect("consumer info after the kill");
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let info = consumer_info(stream)
            .await
            .expect("consumer info after the kill");
        if acked(&info) == acked(&last) {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "acks were still landing 10 s after the kill: {info:?}"
        );
        last = info;
    }
}

/// How many messages the consumer has acked: delivered and not pending.
fn acked(info: &jetstream::consumer::Info) -> i64 {
    info.delivered.consumer_sequence as i64 - info.num_ack_pending as i64
}

/// Wait until the consumer has acked every message of its filter.
async fn wait_drained(
    stream: &jetstream::stream::Stream,
    within: Duration,
) -> jetstream::consumer::Info {
    let deadline = Instant::now() + within;
    loop {
        let info = consumer_info(stream).await;
        if let Some(info) = &info {
            if info.num_pending == 0
                && info.num_ack_pending == 0
                && info.delivered.consumer_sequence > 0
            {
                return info.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the consumer did not ack everything within {within:?}: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------- tally side

fn nats_args(url: &str, stream: &str, subject: Option<&str>) -> Vec<String> {
    let mut args = vec![
        "--nats-url".to_owned(),
        url.to_owned(),
        "--nats-stream".to_owned(),
        stream.to_owned(),
    ];
    if let Some(subject) = subject {
        args.push("--nats-subject".to_owned());
        args.push(subject.to_owned());
    }
    args
}

/// Features `api` (0.5 per unit) and `ai` (1.25 per unit), published, and
/// customers `c0`..`c3`, each granted [`GRANTED`].
async fn set_up(app: &TestApp) {
    app.features(&["api", "ai"]).await;
    let rules = json!([
        { "feature": "api", "credits_per_unit": "0.5" },
        { "feature": "ai", "credits_per_unit": "1.25" },
    ]);
    app.publish_version("v1", rules, None).await;
    for c in 0..CUSTOMERS {
        app.customer(&format!("c{c}")).await;
        app.grant(&format!("c{c}"), &format!("g{c}"), GRANTED).await;
    }
}

/// A good event: its customer, payload and cost in micro-credits.
fn good_event(prefix: &str, i: usize) -> (String, Value, i64) {
    let customer = format!("c{}", i % CUSTOMERS);
    let quantity = (i % 7 + 1) as i64;
    let (feature, price) = if i.is_multiple_of(3) {
        ("ai", 1_250_000)
    } else {
        ("api", 500_000)
    };
    // Quantities as JSON numbers and as strings, both are events.
    let quantity_json = if i.is_multiple_of(2) {
        json!(quantity)
    } else {
        json!(quantity.to_string())
    };
    let event = json!({
        "id": format!("{prefix}-{i}"),
        "customer_id": customer,
        "feature": feature,
        "quantity": quantity_json,
    });
    (customer, event, quantity * price)
}

/// The `nats` events counter of this process, by status.
async fn processed(app: &TestApp) -> BTreeMap<String, i64> {
    let mut counts = BTreeMap::new();
    for line in app.metrics().await.lines() {
        let Some(rest) = line.strip_prefix("tally_events_total{") else {
            continue;
        };
        if !rest.contains("source=\"nats\"") {
            continue;
        }
        let status = rest
            .split("status=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or("")
            .to_owned();
        let value = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as i64;
        *counts.entry(status).or_insert(0) += value;
    }
    counts
}

/// The `nats` value of the metric `name` (`tally_consumer_lag`...), when reported.
async fn nats_metric(app: &TestApp, name: &str) -> Option<i64> {
    let prefix = format!("{name}{{");
    app.metrics().await.lines().find_map(|line| {
        let rest = line.strip_prefix(&prefix)?;
        if !rest.contains("source=\"nats\"") {
            return None;
        }
        line.rsplit(' ')
            .next()?
            .parse::<f64>()
            .ok()
            .map(|v| v as i64)
    })
}

/// `consumer_lag{source="nats"}`, when reported.
async fn lag(app: &TestApp) -> Option<i64> {
    nats_metric(app, "tally_consumer_lag").await
}

/// Every dead letter of the `nats` source.
async fn dead_letters(app: &TestApp) -> Vec<Value> {
    let mut letters = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = "/v1/dead-letters?status=all&source=nats&limit=1000".to_owned();
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let reply = app.get(&path).await;
        assert_eq!(reply.status.as_u16(), 200, "{}", reply.body);
        letters.extend(reply.body["data"].as_array().expect("data").iter().cloned());
        match reply.body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return letters,
        }
    }
}

/// Check a customer's ledger: replayable, one charge per expected event id
/// with its cost, nothing else charged; returns the replayed balance.
async fn assert_charged_once(
    app: &TestApp,
    customer: &str,
    expected: &HashMap<String, i64>,
) -> i64 {
    let entries = app.ledger_all(customer).await;
    let replayed = assert_replayable(&entries);
    let mut by_event: HashMap<String, Vec<&Value>> = HashMap::new();
    for entry in &entries {
        match entry["kind"].as_str() {
            Some("grant") => {}
            Some("charge") => {
                let reference = entry["reference"].as_str().expect("charge reference");
                by_event
                    .entry(reference.to_owned())
                    .or_default()
                    .push(entry);
            }
            other => panic!("unexpected entry kind {other:?}: {entry}"),
        }
    }
    for (event, found) in &by_event {
        assert_eq!(
            found.len(),
            1,
            "event {event} is charged {} times: {found:?}",
            found.len()
        );
        let cost = expected.get(event).unwrap_or_else(|| {
            panic!("{customer} was charged for {event}, which is not a good event of theirs")
        });
        assert_eq!(micros_of(&found[0]["amount"]), *cost, "{}", found[0]);
    }
    let missing: Vec<&String> = expected
        .keys()
        .filter(|e| !by_event.contains_key(*e))
        .collect();
    assert!(
        missing.is_empty(),
        "{customer}: {} good events never charged: {missing:?}",
        missing.len()
    );
    let spent: i64 = expected.values().sum();
    let available = micros(
        app.balance(customer).await["available"]
            .as_str()
            .expect("available"),
    );
    assert_eq!(
        available,
        micros(GRANTED) - spent,
        "{customer}: balance after {} events",
        expected.len()
    );
    assert_eq!(
        replayed, available,
        "{customer}: the ledger replays to the balance"
    );
    available
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn every_good_event_is_charged_once_across_a_sigkill() {
    ensure_nats();
    let js = connect(NATS_URL).await;
    let (name, prefix) = unique("kill");
    let usage = format!("{prefix}.usage");
    let (stream, _guard) = create_stream(&js, NATS_URL, &name, vec![format!("{prefix}.>")]).await;
    // The durable consumer as an operator would tune it: tally uses it as it
    // is (a short ack wait, so what the killed process held comes back soon).
    stream
        .create_consumer(pull::Config {
            durable_name: Some("tally".to_owned()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: SHORT_ACK_WAIT,
            max_ack_pending: 10_000,
            filter_subject: usage.clone(),
            ..Default::default()
        })
        .await
        .expect("create the durable consumer");

    // What to produce, interleaved: good events (some twice), and bad ones.
    const GOOD: usize = 2000;
    let mut expected: BTreeMap<String, HashMap<String, i64>> = BTreeMap::new();
    let mut messages: Vec<(String, Vec<u8>)> = Vec::new();
    let mut duplicates = 0;
    // (event id, code) of every dead letter to be; None for payloads without one.
    let mut bad: Vec<(Option<String>, &str)> = Vec::new();
    let mut not_json = HashSet::new();
    for i in 0..GOOD {
        let (customer, event, cost) = good_event(&prefix, i);
        let id = event["id"].as_str().unwrap().to_owned();
        expected.entry(customer).or_default().insert(id, cost);
        let payload = event.to_string().into_bytes();
        messages.push((usage.clone(), payload.clone()));
        if i % 8 == 3 {
            duplicates += 1;
            messages.push((usage.clone(), payload));
        }
        if i % 50 == 7 {
            let text = format!("{{\"id\": \"broken-{i}\", not json");
            not_json.insert(text.clone());
            messages.push((usage.clone(), text.into_bytes()));
            bad.push((None, "invalid_event"));
        }
        if i % 100 == 11 {
            let id = format!("{prefix}-noqty-{i}");
            let event = json!({ "id": id, "customer_id": "c0", "feature": "api" });
            messages.push((usage.clone(), event.to_string().into_bytes()));
            bad.push((Some(id), "invalid_event"));
        }
        if i % 60 == 13 {
            let id = format!("{prefix}-ghost-{i}");
            let event = json!({ "id": id, "customer_id": format!("ghost-{}", i % 3), "feature": "api", "quantity": 1 });
            messages.push((usage.clone(), event.to_string().into_bytes()));
            bad.push((Some(id), "not_found"));
        }
        if i % 60 == 29 {
            let id = format!("{prefix}-nope-{i}");
            let event = json!({ "id": id, "customer_id": "c1", "feature": "nope", "quantity": 2 });
            messages.push((usage.clone(), event.to_string().into_bytes()));
            bad.push((Some(id), "unknown_feature"));
        }
        if i % 700 == 42 {
            messages.push((usage.clone(), Vec::new()));
            bad.push((None, "unreadable_message"));
        }
        if i % 400 == 5 {
            // Another subject of the stream: outside the filter, never charged.
            let (_, event, _) = good_event(&format!("{prefix}-other"), i);
            messages.push((format!("{prefix}.other"), event.to_string().into_bytes()));
        }
    }
    let total = messages.iter().filter(|(s, _)| *s == usage).count() as i64;

    let mut app = TestApp::spawn_with(Options {
        extra_args: nats_args(NATS_URL, &name, Some(&usage)),
        ..Default::default()
    })
    .await;
    set_up(&app).await;

    // Produce while tally consumes: a burst first (so that many messages are
    // in flight), then the rest slowly; SIGKILL tally early in the burst.
    const BURST: usize = 1000;
    let producer = {
        let (js, messages) = (js.clone(), messages.clone());
        tokio::spawn(async move {
            publish(&js, &messages[..BURST], BURST, Duration::ZERO).await;
            publish(&js, &messages[BURST..], 50, Duration::from_millis(25)).await;
        })
    };
    let started = Instant::now();
    let mut before_kill;
    loop {
        before_kill = processed(&app).await.values().sum::<i64>();
        if before_kill >= 100 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "tally processed only {before_kill} of {total} messages in 15 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    app.kill().await;
    let producing_at_kill = !producer.is_finished();
    let at_kill = settled_after_kill(&stream).await;
    let acked_before_kill = acked(&at_kill);
    assert!(
        producing_at_kill && acked_before_kill < total,
        "the kill came too late: {acked_before_kill} of {total} already acked"
    );

    app.start().await;
    producer.await.expect("producer");
    let drained = wait_drained(&stream, Duration::from_secs(25)).await;
    let after = processed(&app).await;
    let after_total: i64 = after.values().sum();
    eprintln!(
        "nats sigkill: {} messages on {usage} ({GOOD} good, {duplicates} duplicates, {} bad), \
         {} on another subject; processed {before_kill}+ before the kill; at the kill {} \
         delivered, {} unacked (redelivered after the restart); after the restart {after_total} \
         processed {after:?}; consumer deliveries {} (redelivered {})",
        total,
        bad.len(),
        messages.len() as i64 - total,
        at_kill.delivered.consumer_sequence,
        at_kill.num_ack_pending,
        drained.delivered.consumer_sequence,
        drained.delivered.consumer_sequence as i64 - total,
    );
    assert!(
        after_total >= total - acked_before_kill,
        "the restarted server processed {after_total}, but {} were not acked at the kill",
        total - acked_before_kill
    );
    assert!(
        drained.delivered.consumer_sequence as i64 >= total,
        "every message delivered at least once: {drained:?}"
    );

    // Every good event charged exactly once, at its price.
    let mut charged = 0;
    for (customer, events) in &expected {
        assert_charged_once(&app, customer, events).await;
        charged += events.len();
    }
    assert_eq!(charged, GOOD);

    // Every bad message is a dead letter with its reason, once (redeliveries
    // add attempts, not letters); no good event is one.
    let letters = dead_letters(&app).await;
    let mut found: Vec<(Option<String>, String)> = Vec::new();
    let mut payloads_without_id = HashSet::new();
    for letter in &letters {
        assert_eq!(letter["source"], "nats", "{letter}");
        assert!(letter["attempts"].as_i64().unwrap() >= 1, "{letter}");
        let id = letter["event_id"].as_str().map(str::to_owned);
        if id.is_none() {
            payloads_without_id.insert(letter["payload"].as_str().unwrap().to_owned());
        }
        found.push((id, letter["code"].as_str().unwrap().to_owned()));
    }
    found.sort();
    let mut want: Vec<(Option<String>, String)> = bad
        .iter()
        .map(|(id, code)| (id.clone(), code.to_string()))
        .collect();
    want.sort();
    assert_eq!(found, want, "dead letters");
    let empty: Vec<&String> = payloads_without_id
        .iter()
        .filter(|p| !not_json.contains(*p))
        .collect();
    assert!(
        empty.iter().all(|p| p.contains("without a payload")),
        "a dead letter without an id that is neither a sent payload nor an empty message: {empty:?}"
    );
    assert!(
        not_json.is_subset(&payloads_without_id),
        "every non-JSON payload is kept as sent"
    );

    // The lag gauge comes down to zero.
    let deadline = Instant::now() + Duration::from_secs(5);
    while lag(&app).await != Some(0) {
        assert!(
            Instant::now() < deadline,
            "consumer_lag{{source=\"nats\"}} is {:?}",
            lag(&app).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spent: i64 = expected.values().flat_map(|e| e.values()).sum();
    eprintln!(
        "nats sigkill: charged {charged} events ({} credits), dead letters {} ({:?})",
        decimal(spent),
        letters.len(),
        letters
            .iter()
            .fold(BTreeMap::<String, usize>::new(), |mut m, l| {
                *m.entry(l["code"].as_str().unwrap().to_owned()).or_default() += 1;
                m
            })
    );
    app.kill().await;
}

#[tokio::test]
async fn the_consumer_waits_for_its_stream_and_follows_the_subject_flag() {
    ensure_nats();
    let js = connect(NATS_URL).await;
    let (name, prefix) = unique("wait");
    // The stream does not exist yet: the server starts and serves anyway.
    let mut app = TestApp::spawn_with(Options {
        extra_args: nats_args(NATS_URL, &name, None),
        ..Default::default()
    })
    .await;
    set_up(&app).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (stream, _guard) = create_stream(&js, NATS_URL, &name, vec![format!("{prefix}.>")]).await;

    let mut expected: BTreeMap<String, HashMap<String, i64>> = BTreeMap::new();
    let mut messages = Vec::new();
    for i in 0..40 {
        let (customer, event, cost) = good_event(&format!("{prefix}-a"), i);
        let id = event["id"].as_str().unwrap().to_owned();
        expected.entry(customer).or_default().insert(id, cost);
        // Every subject of the stream: no --nats-subject.
        messages.push((
            format!("{prefix}.s{}", i % 2),
            event.to_string().into_bytes(),
        ));
    }
    messages.push((format!("{prefix}.s0"), b"oops".to_vec()));
    publish(&js, &messages, 100, Duration::ZERO).await;
    let info = wait_drained(&stream, Duration::from_secs(20)).await;
    for (customer, events) in &expected {
        assert_charged_once(&app, customer, events).await;
    }
    assert_eq!(dead_letters(&app).await.len(), 1);

    // The consumer tally created: durable, pull, explicit acks, bounded.
    let config = &info.config;
    assert_eq!(config.durable_name.as_deref(), Some("tally"));
    assert!(config.deliver_subject.is_none(), "a pull consumer");
    assert_eq!(config.ack_policy, AckPolicy::Explicit);
    assert_eq!(config.ack_wait, Duration::from_secs(30));
    assert_eq!(config.max_ack_pending, 10_000);
    assert_eq!(config.filter_subject, "");

    // Restarted with a subject filter: the consumer follows it, keeps its
    // position, and what the filter leaves out is not charged.
    app.kill().await;
    app.options.extra_args = nats_args(NATS_URL, &name, Some(&format!("{prefix}.s1")));
    app.start().await;
    let mut messages = Vec::new();
    for i in 0..40 {
        let (customer, event, cost) = good_event(&format!("{prefix}-b"), i);
        let subject = format!("{prefix}.s{}", i % 2);
        if i % 2 == 1 {
            let id = event["id"].as_str().unwrap().to_owned();
            expected.entry(customer).or_default().insert(id, cost);
        }
        messages.push((subject, event.to_string().into_bytes()));
    }
    // The consumer's filter moves once tally is up again.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let filter = consumer_info(&stream)
            .await
            .map(|i| i.config.filter_subject);
        if filter.as_deref() == Some(format!("{prefix}.s1").as_str()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the consumer's filter is still {filter:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publish(&js, &messages, 100, Duration::ZERO).await;
    let info = wait_drained(&stream, Duration::from_secs(20)).await;
    assert_eq!(
        info.config.ack_wait,
        Duration::from_secs(30),
        "the rest is kept"
    );
    for (customer, events) in &expected {
        assert_charged_once(&app, customer, events).await;
    }
    app.kill().await;
}

/// A nats-server of this test's own, on a free port.
struct PrivateNats {
    port: u16,
    store: PathBuf,
    child: Option<tokio::process::Child>,
}

impl PrivateNats {
    async fn start(store: PathBuf) -> PrivateNats {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut nats = PrivateNats {
            port,
            store,
            child: None,
        };
        nats.restart().await;
        nats
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn restart(&mut self) {
        let child = tokio::process::Command::new("/usr/sbin/nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn /usr/sbin/nats-server (scripts/nats.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "the private nats-server did not listen on {}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("kill nats-server");
            let _ = child.wait().await;
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

#[tokio::test]
async fn the_consumer_reconnects_after_the_nats_server_dies() {
    ensure_nats(); // installs nats-server when missing
    let mut nats = PrivateNats::start(fresh_dir()).await;
    let url = nats.url();
    let js = connect(&url).await;
    let (name, prefix) = unique("reconnect");
    let (stream, _guard) = create_stream(&js, &url, &name, vec![format!("{prefix}.>")]).await;
    // A short ack wait: a nats-server killed with SIGKILL may come back
    // without the consumer's last acks (it writes them lazily), and those
    // messages are delivered again (duplicates, charged nothing) after it.
    stream
        .create_consumer(pull::Config {
            durable_name: Some("tally".to_owned()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: SHORT_ACK_WAIT,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await
        .expect("create the durable consumer");
    let app = TestApp::spawn_with(Options {
        extra_args: nats_args(&url, &name, None),
        ..Default::default()
    })
    .await;
    set_up(&app).await;

    let mut expected: BTreeMap<String, HashMap<String, i64>> = BTreeMap::new();
    let mut batch = |from: usize| {
        let mut messages = Vec::new();
        for i in from..from + 100 {
            let (customer, event, cost) = good_event(&prefix, i);
            let id = event["id"].as_str().unwrap().to_owned();
            expected.entry(customer).or_default().insert(id, cost);
            messages.push((format!("{prefix}.usage"), event.to_string().into_bytes()));
        }
        messages
    };
    let first = batch(0);
    let second = batch(100);
    publish(&js, &first, 100, Duration::ZERO).await;
    wait_drained(&stream, Duration::from_secs(15)).await;

    // The NATS server dies (SIGKILL) and comes back on the same store.
    nats.kill().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    nats.restart().await;
    let js = connect(&url).await;
    let stream = js
        .get_stream(&name)
        .await
        .expect("the stream survived the restart");
    publish(&js, &second, 100, Duration::ZERO).await;
    let info = wait_drained(&stream, Duration::from_secs(25)).await;
    assert!(info.delivered.consumer_sequence >= 200, "{info:?}");
    for (customer, events) in &expected {
        assert_charged_once(&app, customer, events).await;
    }
    drop(app);
    nats.kill().await;
}

/// `tally_stream_errors_total{source="nats"}`, when reported.
async fn stream_errors(app: &TestApp) -> Option<i64> {
    nats_metric(app, "tally_stream_errors_total").await
}

/// A NATS server unreachable when Tally starts shows in the metrics at once
/// (it used to count only failures after a first connection, so an alert
/// on the counter stayed silent), and once the server comes the consumer
/// connects and charges.
#[tokio::test]
async fn an_unreachable_nats_server_at_start_shows_in_the_metrics() {
    ensure_nats();
    let mut nats = PrivateNats::start(fresh_dir()).await;
    let url = nats.url();
    nats.kill().await;
    let (name, prefix) = unique("unreachable");
    let app = TestApp::spawn_with(Options {
        extra_args: nats_args(&url, &name, None),
        ..Default::default()
    })
    .await;
    wait_until!(
        Duration::from_secs(10),
        "the stream errors counted",
        stream_errors(&app).await.is_some_and(|n| n >= 1)
    );
    set_up(&app).await;
    nats.restart().await;
    let js = connect(&url).await;
    let (stream, _guard) = create_stream(&js, &url, &name, vec![format!("{prefix}.>")]).await;
    let (customer, event, cost) = good_event(&prefix, 0);
    let id = event["id"].as_str().unwrap().to_owned();
    publish(
        &js,
        &[(format!("{prefix}.usage"), event.to_string().into_bytes())],
        1,
        Duration::ZERO,
    )
    .await;
    wait_drained(&stream, Duration::from_secs(30)).await;
    assert_charged_once(&app, &customer, &HashMap::from([(id, cost)])).await;
    drop(app);
    nats.kill().await;
}

/// A graceful stop (SIGTERM) midway: the events being charged finish and
/// their acks reach the server before the process exits, so the messages
/// acked are exactly the events charged; the rest come again to a restart,
/// each charged once.
#[tokio::test]
async fn a_graceful_stop_acks_exactly_what_was_charged() {
    ensure_nats();
    let js = connect(NATS_URL).await;
    let (name, prefix) = unique("term");
    let usage = format!("{prefix}.usage");
    let (stream, _guard) = create_stream(&js, NATS_URL, &name, vec![format!("{prefix}.>")]).await;
    stream
        .create_consumer(pull::Config {
            durable_name: Some("tally".to_owned()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: SHORT_ACK_WAIT,
            ..Default::default()
        })
        .await
        .expect("create the durable consumer");
    const EVENTS: usize = 20_000;
    let mut expected: HashMap<String, HashMap<String, i64>> = HashMap::new();
    let mut messages = Vec::with_capacity(EVENTS);
    for i in 0..EVENTS {
        let (customer, event, cost) = good_event(&prefix, i);
        expected
            .entry(customer)
            .or_default()
            .insert(event["id"].as_str().unwrap().to_owned(), cost);
        messages.push((usage.clone(), event.to_string().into_bytes()));
    }
    publish(&js, &messages, 1000, Duration::ZERO).await;

    let mut app = TestApp::spawn().await;
    set_up(&app).await;
    app.kill().await;
    app.options.extra_args = nats_args(NATS_URL, &name, Some(&usage));
    app.start().await;
    let started = Instant::now();
    while processed(&app).await.values().sum::<i64>() < 100 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "tally charged its first events within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status = app.terminate().await;
    assert!(status.success(), "a graceful stop exits cleanly: {status}");

    // What the ledger holds, read by a server without the consumer.
    app.options.extra_args = Vec::new();
    app.start().await;
    let mut charged = 0i64;
    for c in 0..CUSTOMERS {
        let entries = app.ledger_all(&format!("c{c}")).await;
        charged += entries.iter().filter(|e| e["kind"] == "charge").count() as i64;
    }
    assert!(
        charged < EVENTS as i64,
        "the stop came before the end ({charged} of {EVENTS} charged)"
    );
    // The acks left the process before it exited; the server applies them
    // in its own time (a loaded machine may take a moment). The consumer
    // takes messages in stream order and, stopping, finishes and acks every
    // one it took and none after (this stream holds one good event per
    // sequence: no nak, no dead letter), so the acked messages are the first
    // `charged` of the stream and the server's ack floor is exactly there.
    // Since a message is acked only once charged, a floor equal to the count
    // charged also rules out a charged message left unacked or one acked
    // above a gap (either puts the count above the floor). Not counted as
    // "neither pending nor ack pending": after a redelivery the server's ack
    // pending count was one more than the messages it held (a CI run: floor
    // 1,536 and 1,536 charged, but 55 ack pending for the 54 messages
    // 1,537–1,590).
    let deadline = Instant::now() + Duration::from_secs(10);
    let (floor, info) = loop {
        let info = consumer_info(&stream).await.expect("consumer info");
        let floor = info.ack_floor.stream_sequence as i64;
        if floor >= charged || Instant::now() > deadline {
            break (floor, info);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "nats sigterm: {charged} of {EVENTS} charged, acked up to stream sequence {floor}, \
         {} delivered and not acked, {} redelivered",
        info.num_ack_pending, info.num_redelivered
    );
    assert_eq!(
        floor, charged,
        "the messages acked are exactly the events charged: {info:?}"
    );

    // Restarted with the consumer: the rest, each once.
    app.kill().await;
    app.options.extra_args = nats_args(NATS_URL, &name, Some(&usage));
    app.start().await;
    wait_drained(&stream, Duration::from_secs(30)).await;
    for c in 0..CUSTOMERS {
        let customer = format!("c{c}");
        assert_charged_once(&app, &customer, &expected[&customer]).await;
    }
}

#[tokio::test]
async fn bad_nats_flags_stop_the_server_at_once() {
    for (args, says) in [
        (vec!["--nats-url", NATS_URL], "--nats-stream"),
        (vec!["--nats-stream", "EVENTS"], "--nats-url"),
        // Checked before the database is opened: on PostgreSQL a follower
        // used to run with them for as long as it followed, and stop at
        // its takeover.
        (
            vec![
                "--database-url",
                "postgres://postgres@127.0.0.1:1/unreachable",
                "--nats-url",
                NATS_URL,
            ],
            "--nats-stream",
        ),
        (
            vec![
                "--database-url",
                "postgres://postgres@127.0.0.1:1/unreachable",
                "--kafka-brokers",
                "127.0.0.1:9092",
            ],
            "--kafka-topic",
        ),
        (
            vec!["--nats-url", NATS_URL, "--nats-stream", "a.b"],
            "stream name",
        ),
        (
            vec![
                "--nats-url",
                NATS_URL,
                "--nats-stream",
                "S",
                "--nats-subject",
                "a..b",
            ],
            "--nats-subject",
        ),
    ] {
        let dir = fresh_dir();
        let output = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
                .arg("serve")
                .arg("--listen")
                .arg("127.0.0.1:0")
                .arg("--data-dir")
                .arg(&dir)
                .args(&args)
                .env("TALLY_ADMIN_KEY", ADMIN_KEY)
                .env_remove("TALLY_NATS_URL")
                .env_remove("TALLY_NATS_STREAM")
                .env_remove("TALLY_NATS_SUBJECT")
                .env_remove("TALLY_KAFKA_BROKERS")
                .env_remove("TALLY_KAFKA_TOPIC")
                .env_remove("TALLY_DATABASE_URL")
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("tally serve {args:?} did not stop within 30 s"))
        .expect("run tally serve");
        let _ = std::fs::remove_dir_all(&dir);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "tally serve {args:?} succeeded: {stdout}"
        );
        assert!(
            !stdout.contains("listening"),
            "tally serve {args:?} listened: {stdout}"
        );
        assert!(
            stderr.contains(says),
            "tally serve {args:?} should name {says}: {stderr}"
        );
    }
}

/// The events this server's NATS consumer charged, whatever their status.
async fn charged_here(app: &TestApp) -> i64 {
    processed(app).await.values().sum()
}

/// Two servers over one PostgreSQL database, both started with the NATS
/// flags: only the server that runs the writer consumes. When the first
/// server's writer session ends, the second takes the leader lock and its
/// consumer starts; the first follows it without a restart and its consumer
/// stops, so no message goes to a server that cannot charge it (nothing is
/// delivered twice). When the second stops, the first leads again and
/// consumes again. Every event is charged once.
#[tokio::test]
async fn only_the_server_that_runs_the_writer_consumes() {
    ensure_nats();
    let js = connect(NATS_URL).await;
    let (name, prefix) = unique("leader");
    let usage = format!("{prefix}.usage");
    let (stream, _guard) = create_stream(&js, NATS_URL, &name, vec![format!("{prefix}.>")]).await;
    let (first, mut second, database) =
        TestApp::pair_on_postgres(nats_args(NATS_URL, &name, None)).await;
    set_up(&first).await;

    let mut expected: HashMap<String, HashMap<String, i64>> = HashMap::new();
    let mut published = 0u64;
    let mut round = async |round: &str| {
        let mut messages = Vec::new();
        for i in 0..40 {
            let (customer, event, cost) = good_event(round, i);
            expected
                .entry(customer)
                .or_default()
                .insert(format!("{round}-{i}"), cost);
            messages.push((usage.clone(), serde_json::to_vec(&event).unwrap()));
        }
        publish(&js, &messages, 10, Duration::ZERO).await;
        published += 40;
        let info = wait_drained(&stream, Duration::from_secs(30)).await;
        assert_eq!(
            (
                info.delivered.stream_sequence,
                info.delivered.consumer_sequence
            ),
            (published, published),
            "every message delivered once"
        );
    };

    round("a").await;
    assert_eq!(charged_here(&first).await, 40);
    assert_eq!(
        charged_here(&second).await,
        0,
        "the follower does not consume"
    );

    // The first server's writer session ends: the second takes over.
    assert_eq!(
        terminate_sessions(&database, &leader_lock_sessions(true)),
        1,
        "the writer's session ended"
    );
    second.wait_for_writer().await;
    first.wait_until_follower().await;
    // Its consumer stops right after (a graceful stop of its own).
    wait_until!(
        Duration::from_secs(20),
        "the first server's consumer stopped",
        first
            .metrics()
            .await
            .contains("tally_stream_consumers{source=\"nats\"} 0")
    );
    round("b").await;
    assert_eq!(
        charged_here(&first).await,
        40,
        "the first server stopped consuming"
    );
    assert_eq!(charged_here(&second).await, 40);

    // The second server stops: the first leads and consumes again.
    second.kill().await;
    first.wait_for_writer().await;
    round("c").await;
    assert_eq!(charged_here(&first).await, 80);
    for (customer, events) in &expected {
        assert_charged_once(&first, customer, events).await;
    }
}
