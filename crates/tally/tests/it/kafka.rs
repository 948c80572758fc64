//! The Kafka consumer end to end, against a real Kafka-protocol broker:
//! tansu on 127.0.0.1:9092, which `scripts/kafka.sh` installs and starts when
//! it is not running yet. A broker that cannot be had fails the test.
//!
//! - `every_good_event_is_charged_once_across_a_sigkill`: a topic of 4
//!   partitions keyed by customer holds good events, duplicates and bad
//!   messages; `tally serve` consumes it, is killed with SIGKILL midway and
//!   restarted. Every good event is then charged exactly once, every bad one is
//!   a dead letter with its reason, and the group's offsets reach the end.
//! - `a_rebalance_between_two_consumers_loses_nothing`: two servers (each
//!   with its own ledger) in one consumer group: the second joins midway (a
//!   rebalance), the first is killed (its partitions move), and every event
//!   is charged by one of them.
//! - `a_graceful_stop_commits_exactly_what_was_charged`: SIGTERM midway; the
//!   group's committed offsets then equal the events charged, and a restart
//!   charges the rest once each.
//! - `bad_kafka_flags_stop_serve_with_a_clear_message` (no broker needed).
//! - `the_consumer_moves_with_the_writer`: two servers over one PostgreSQL
//!   database; only the one that runs the writer is in the group, from one
//!   server to the other and back without a restart, and nothing is charged
//!   twice.
//!
//! Each test uses its own topic and consumer group. The group's first join
//! takes about 5 s on tansu, and a restart after SIGKILL waits for the killed
//! member's session to expire (10 s), so each test takes 25-30 s.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::util::Timeout;
use serde_json::{json, Value};

use crate::support::{
    assert_replayable, decimal, leader_lock_sessions, micros, micros_of, terminate_sessions,
    wait_until, TestApp, ADMIN_KEY,
};

const BROKERS: &str = "127.0.0.1:9092";
const PARTITIONS: i32 = 4;
const CUSTOMERS: usize = 8;
const GRANTED: &str = "1000000";

// ---------------------------------------------------------------- broker

/// Start the broker (idempotent), or fail the test saying why.
fn ensure_broker() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/kafka.sh");
    let output = std::process::Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "the Kafka broker for this test could not be started on {BROKERS}: {} said:\n{}{}",
        script.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A name no other test (or earlier run) uses.
fn unique(what: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!("tally-it-{what}-{}-{nanos}", std::process::id())
}

fn client_config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", BROKERS);
    config
}

/// Create `topic` with [`PARTITIONS`] partitions.
async fn create_topic(topic: &str) {
    let admin: AdminClient<DefaultClientContext> = client_config()
        .create()
        .expect("create the Kafka admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = tokio::time::timeout(
        Duration::from_secs(20),
        admin.create_topics(
            &[NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1))],
            &options,
        ),
    )
    .await
    .unwrap_or_else(|_| panic!("the Kafka broker on {BROKERS} did not answer CreateTopics in 20 s"))
    .unwrap_or_else(|e| panic!("cannot reach the Kafka broker on {BROKERS}: {e}"));
    for result in results {
        result.unwrap_or_else(|(name, code)| panic!("create topic {name}: {code}"));
    }
}

/// One message to produce: keyed by customer, with a payload or without.
struct Message {
    key: String,
    payload: Option<Vec<u8>>,
}

/// Produce every message (keyed, so a customer's events share a partition),
/// waiting for each to be acknowledged; returns the count per partition.
async fn produce(topic: &str, messages: &[Message]) -> BTreeMap<i32, i64> {
    let producer: FutureProducer = client_config()
        .set("message.timeout.ms", "20000")
        .set("linger.ms", "5")
        .create()
        .expect("create the Kafka producer");
    let mut per_partition = BTreeMap::new();
    for chunk in messages.chunks(1000) {
        let sends = chunk.iter().map(|m| {
            let mut record = FutureRecord::<str, [u8]>::to(topic).key(m.key.as_str());
            if let Some(payload) = &m.payload {
                record = record.payload(payload.as_slice());
            }
            producer.send(record, Timeout::After(Duration::from_secs(20)))
        });
        for delivery in futures_util::future::join_all(sends).await {
            let delivery = delivery
                .unwrap_or_else(|(e, _)| panic!("produce to {topic} on {BROKERS} failed: {e}"));
            *per_partition.entry(delivery.partition).or_insert(0) += 1;
        }
    }
    per_partition
}

/// The group's committed offsets on `topic`, per partition (0 when none).
async fn committed(topic: &str, group: &str) -> BTreeMap<i32, i64> {
    let (topic, group) = (topic.to_owned(), group.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client_config()
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("create a Kafka consumer");
        let mut list = TopicPartitionList::new();
        for partition in 0..PARTITIONS {
            list.add_partition(&topic, partition);
        }
        let list = consumer
            .committed_offsets(list, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("committed offsets of group {group}: {e}"));
        list.elements()
            .iter()
            .map(|e| {
                let offset = match e.offset() {
                    Offset::Offset(n) => n,
                    _ => 0,
                };
                (e.partition(), offset)
            })
            .collect()
    })
    .await
    .expect("committed offsets")
}

// ---------------------------------------------------------------- tally side

/// `--kafka-*` arguments of `tally serve`.
fn kafka_args(topic: &str, group: &str) -> Vec<String> {
    [
        "--kafka-brokers",
        BROKERS,
        "--kafka-topic",
        topic,
        "--kafka-group",
        group,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Features `api` (0.5 per unit) and `ai` (6 per unit), published, and
/// customers `c0`..`c7`, each granted [`GRANTED`].
async fn set_up(app: &TestApp) {
    app.features(&["api", "ai"]).await;
    let rules = json!([
        { "feature": "api", "credits_per_unit": "0.5" },
        { "feature": "ai", "credits_per_unit": "6" },
    ]);
    app.publish_version("v1", rules, None).await;
    for c in 0..CUSTOMERS {
        app.customer(&format!("c{c}")).await;
        app.grant(&format!("c{c}"), &format!("g{c}"), GRANTED).await;
    }
}

/// A good event: its customer, payload and cost in micro-credits
/// (`api` 0.5 and `ai` 6 per unit, quantity 1 to 5).
fn good_event(prefix: &str, i: usize) -> (String, Value, i64) {
    let customer = format!("c{}", i % CUSTOMERS);
    let quantity = (i % 5 + 1) as i64;
    let (feature, price) = if i.is_multiple_of(3) {
        ("ai", 6_000_000)
    } else {
        ("api", 500_000)
    };
    let event = json!({
        "id": format!("{prefix}-{i}"),
        "customer_id": customer,
        "feature": feature,
        "quantity": quantity,
    });
    (customer, event, quantity * price)
}

/// The `kafka` events counter, by status (charged, duplicate, rejected).
async fn processed(app: &TestApp) -> HashMap<String, i64> {
    let text = app.metrics().await;
    let mut counts = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("tally_events_total{") else {
            continue;
        };
        if !rest.contains("source=\"kafka\"") {
            continue;
        }
        let status = rest
            .split("status=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or("")
            .to_owned();
        let value: i64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as i64;
        *counts.entry(status).or_insert(0) += value;
    }
    counts
}

fn total(counts: &HashMap<String, i64>) -> i64 {
    counts.values().sum()
}

/// The `consumer_lag{source="kafka"}` gauge, when it is there.
async fn lag(app: &TestApp) -> Option<i64> {
    let text = app.metrics().await;
    text.lines()
        .find(|l| l.starts_with("tally_consumer_lag{source=\"kafka\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Every dead letter from Kafka, walking every page.
async fn kafka_dead_letters(app: &TestApp) -> Vec<Value> {
    let mut letters = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = "/v1/dead-letters?status=all&source=kafka&limit=1000".to_string();
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

/// The charge entries of a customer's ledger by event id, checking the
/// ledger replays (and returning the replayed balance).
async fn charges(app: &TestApp, customer: &str) -> (HashMap<String, Vec<Value>>, i64) {
    let entries = app.ledger_all(customer).await;
    let replayed = assert_replayable(&entries);
    let mut by_event: HashMap<String, Vec<Value>> = HashMap::new();
    for entry in entries {
        match entry["kind"].as_str() {
            Some("grant") => {}
            Some("charge") => {
                let reference = entry["reference"].as_str().expect("reference").to_owned();
                by_event.entry(reference).or_default().push(entry);
            }
            other => panic!("unexpected entry kind {other:?} in {customer}'s ledger: {entry}"),
        }
    }
    (by_event, replayed)
}

// ---------------------------------------------------------------- tests

const GOOD: usize = 20_000;
const DUPLICATES: usize = 200;
const BAD_EACH: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_good_event_is_charged_once_across_a_sigkill() {
    let started = Instant::now();
    ensure_broker();
    let (topic, group) = (unique("events"), unique("group"));
    create_topic(&topic).await;

    // Price book and customers first, over HTTP, without the consumer.
    let mut app = TestApp::spawn().await;
    set_up(&app).await;

    // The messages: good events, each good event again (a duplicate) for
    // some, and bad ones of every kind, interleaved.
    let mut messages = Vec::new();
    let mut expected: HashMap<String, (String, i64)> = HashMap::new(); // event → (customer, cost)
    let mut bad: Vec<(String, &str)> = Vec::new(); // (what identifies it, expected code)
    for i in 0..GOOD {
        let (customer, event, cost) = good_event("ev", i);
        let payload = serde_json::to_vec(&event).unwrap();
        expected.insert(
            event["id"].as_str().unwrap().to_owned(),
            (customer.clone(), cost),
        );
        messages.push(Message {
            key: customer.clone(),
            payload: Some(payload.clone()),
        });
        if i % (GOOD / DUPLICATES) == 0 {
            messages.push(Message {
                key: customer,
                payload: Some(payload),
            });
        }
        if i % (GOOD / (BAD_EACH * 5)) == 0 && bad.len() < BAD_EACH * 5 {
            let n = bad.len();
            let key = format!("c{}", n % CUSTOMERS);
            let (payload, id, code): (Option<Vec<u8>>, String, &str) = match n % 5 {
                // Not JSON (cut off).
                0 => (
                    Some(format!("{{\"id\": \"broken-{n}\", \"customer_id\":").into_bytes()),
                    format!("payload:broken-{n}"),
                    "invalid_event",
                ),
                1 => {
                    let id = format!("ghost-{n}");
                    let event = json!({ "id": id, "customer_id": format!("nobody-{n}"), "feature": "api", "quantity": 1 });
                    (Some(event.to_string().into_bytes()), id, "not_found")
                }
                2 => {
                    let id = format!("nofeature-{n}");
                    let event = json!({ "id": id, "customer_id": key, "feature": "teleport", "quantity": 1 });
                    (Some(event.to_string().into_bytes()), id, "unknown_feature")
                }
                3 => {
                    let id = format!("noquantity-{n}");
                    let event = json!({ "id": id, "customer_id": key, "feature": "api" });
                    (Some(event.to_string().into_bytes()), id, "invalid_event")
                }
                _ => (None, format!("empty-{n}"), "unreadable_message"),
            };
            bad.push((id, code));
            messages.push(Message { key, payload });
        }
    }
    let produced = messages.len() as i64;
    let duplicates = messages.len() - GOOD - bad.len();
    let per_partition = produce(&topic, &messages).await;
    assert_eq!(per_partition.values().sum::<i64>(), produced);
    assert!(
        per_partition.len() > 1,
        "messages keyed by customer spread over partitions: {per_partition:?}"
    );
    eprintln!(
        "kafka: produced {produced} messages ({GOOD} good, {duplicates} duplicates, {} bad) over {per_partition:?} in {:?}",
        bad.len(),
        started.elapsed()
    );

    // Consume, and SIGKILL the server midway.
    app.kill().await;
    app.options.extra_args = kafka_args(&topic, &group);
    let run = Instant::now();
    app.start().await;
    // Poll closely, and kill at the first charged events, so that the kill
    // lands with most of the topic still to do (the consumer has at most
    // 4,096 events in flight; the topic holds five times that).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut at_kill = 0;
    while at_kill == 0 {
        assert!(
            Instant::now() < deadline,
            "the consumer joined the group and charged its first events within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        at_kill = total(&processed(&app).await);
    }
    let first = run.elapsed();
    app.kill().await;
    let committed_at_kill: i64 = committed(&topic, &group).await.values().sum();
    eprintln!(
        "kafka: first event charged {first:?} after start; killed after {at_kill} of {produced} \
         processed ({:?} after start); {committed_at_kill} committed",
        run.elapsed()
    );
    assert!(
        committed_at_kill < produced,
        "the kill came before the end ({committed_at_kill} of {produced} committed)"
    );

    // Restart: it resumes from the committed offsets and finishes.
    let restart = Instant::now();
    app.start().await;
    let remaining = produced - committed_at_kill;
    wait_until!(
        Duration::from_secs(45),
        "the restarted consumer joined the group and charged again",
        total(&processed(&app).await) > 0
    );
    let resumed = restart.elapsed();
    let mut max_lag = 0;
    wait_until!(
        Duration::from_secs(30),
        format!(
            "the restarted consumer processed the {remaining} messages from the committed offsets"
        ),
        {
            max_lag = max_lag.max(lag(&app).await.unwrap_or(0));
            total(&processed(&app).await) >= remaining
        }
    );
    let drained = restart.elapsed() - resumed;
    let mut offsets: BTreeMap<i32, i64>;
    wait_until!(
        Duration::from_secs(20),
        "the group's offsets reached the end of every partition",
        {
            offsets = committed(&topic, &group).await;
            offsets == per_partition
        }
    );
    let finished = restart.elapsed();
    let after = processed(&app).await;
    eprintln!(
        "kafka: restarted: first event {resumed:?} after start (the group waits for the killed \
         member's session to expire), {} processed ({after:?}) in {drained:?} more \
         ({:.0}/s); offsets at the end {finished:?} after start; at least {} messages read \
         again after the kill; consumer_lag seen up to {max_lag}",
        total(&after),
        remaining as f64 / drained.as_secs_f64(),
        at_kill - committed_at_kill
    );
    assert_eq!(
        total(&after),
        remaining,
        "each message from the committed offsets read once"
    );

    // Every good event charged exactly once, at its cost.
    let mut spent: HashMap<String, i64> = HashMap::new();
    for c in 0..CUSTOMERS {
        let customer = format!("c{c}");
        let (by_event, replayed) = charges(&app, &customer).await;
        for (event, entries) in &by_event {
            assert_eq!(
                entries.len(),
                1,
                "event {event} charged {} times",
                entries.len()
            );
            let (owner, cost) = expected
                .get(event)
                .unwrap_or_else(|| panic!("{customer} charged for an event never sent: {event}"));
            assert_eq!(
                owner, &customer,
                "event {event} charged to the wrong customer"
            );
            assert_eq!(micros_of(&entries[0]["amount"]), *cost, "cost of {event}");
        }
        let mine = expected.values().filter(|(owner, _)| owner == &customer);
        let sum: i64 = mine.clone().map(|(_, cost)| cost).sum();
        assert_eq!(by_event.len(), mine.count(), "{customer}'s charged events");
        let balance = micros(app.balance(&customer).await["available"].as_str().unwrap());
        assert_eq!(
            balance,
            micros(GRANTED) - sum,
            "{customer}: {GRANTED} granted, {} charged, balance {}",
            decimal(sum),
            decimal(balance)
        );
        assert_eq!(
            replayed, balance,
            "{customer}'s ledger replays to its balance"
        );
        spent.insert(customer, sum);
    }

    // Every bad message is a dead letter with its reason, once (a message
    // read again after the kill counts another attempt).
    let letters = kafka_dead_letters(&app).await;
    assert_eq!(letters.len(), bad.len(), "dead letters: {letters:#?}");
    let mut unmatched: HashSet<usize> = (0..letters.len()).collect();
    for (id, code) in &bad {
        // A bad message's dead letter: by event id, or (no id could be read)
        // by its payload.
        let matches = |letter: &Value| {
            let payload = letter["payload"].as_str().unwrap_or("");
            if let Some(marker) = id.strip_prefix("payload:") {
                letter["event_id"].is_null() && payload.contains(&format!("\"{marker}\""))
            } else if id.starts_with("empty-") {
                letter["event_id"].is_null() && payload.contains("without a payload")
            } else {
                letter["event_id"] == id.as_str()
            }
        };
        let index = (0..letters.len())
            .find(|i| unmatched.contains(i) && matches(&letters[*i]))
            .unwrap_or_else(|| panic!("no dead letter for {id}: {letters:#?}"));
        unmatched.remove(&index);
        let letter = &letters[index];
        assert_eq!(letter["source"], "kafka", "{letter}");
        assert_eq!(letter["status"], "pending", "{letter}");
        assert_eq!(letter["code"], *code, "reason of {id}: {letter}");
        assert!(
            !letter["message"].as_str().unwrap_or("").is_empty(),
            "a dead letter says why: {letter}"
        );
        if id.starts_with("empty-") {
            assert_eq!(letter["message"], "the message has no payload");
        }
        assert!(letter["attempts"].as_i64().unwrap_or(0) >= 1, "{letter}");
    }
    let again = letters
        .iter()
        .filter(|l| l["attempts"].as_i64().unwrap_or(0) > 1)
        .count();

    let lag_now = {
        let mut seen = None;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            seen = lag(&app).await;
            if seen == Some(0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        seen
    };
    assert_eq!(
        lag_now,
        Some(0),
        "consumer_lag once everything is committed"
    );
    let charged: usize = GOOD;
    eprintln!(
        "kafka: {charged} events charged once each ({} credits), {} dead letters ({again} of \
         them read again after the kill: attempts 2), offsets {offsets:?}; whole test {:?}",
        decimal(spent.values().sum()),
        letters.len(),
        started.elapsed()
    );
}

/// Good events `rb-<from>`..`rb-<to>` to produce, recording their cost.
fn rebalance_batch(
    costs: &mut HashMap<String, (String, i64)>,
    from: usize,
    to: usize,
) -> Vec<Message> {
    (from..to)
        .map(|i| {
            let (customer, event, cost) = good_event("rb", i);
            costs.insert(
                event["id"].as_str().unwrap().to_owned(),
                (customer.clone(), cost),
            );
            Message {
                key: customer,
                payload: Some(serde_json::to_vec(&event).unwrap()),
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_between_two_consumers_loses_nothing() {
    let started = Instant::now();
    ensure_broker();
    let (topic, group) = (unique("rebalance"), unique("group"));
    create_topic(&topic).await;
    let mut a = TestApp::spawn().await;
    let mut b = TestApp::spawn().await;
    set_up(&a).await;
    set_up(&b).await;
    let mut costs: HashMap<String, (String, i64)> = HashMap::new();
    let mut per_partition: BTreeMap<i32, i64> = BTreeMap::new();
    let mut sent = 0;
    macro_rules! send {
        ($n:expr) => {{
            let batch = rebalance_batch(&mut costs, sent, sent + $n);
            sent += $n;
            for (partition, n) in produce(&topic, &batch).await {
                *per_partition.entry(partition).or_insert(0) += n;
            }
        }};
    }

    // A consumes alone.
    send!(1000);
    a.kill().await;
    a.options.extra_args = kafka_args(&topic, &group);
    a.start().await;
    wait_until!(Duration::from_secs(30), "A consumed the first 1000", {
        total(&processed(&a).await) >= 1000
    });

    // B joins the group (a rebalance) while events keep coming.
    b.kill().await;
    b.options.extra_args = kafka_args(&topic, &group);
    b.start().await;
    let joined = Instant::now();
    wait_until!(
        Duration::from_secs(30),
        "B got partitions from A and consumed some of them",
        {
            send!(50);
            total(&processed(&b).await) > 0
        }
    );
    let rebalanced_in = joined.elapsed();
    let a_before = total(&processed(&a).await);
    wait_until!(Duration::from_secs(10), "A consumed after the rebalance", {
        send!(50);
        total(&processed(&a).await) > a_before
    });

    // A dies with work in flight: B takes its partitions over from A's
    // committed offsets (once A's session has expired) and finishes.
    let a_before = total(&processed(&a).await);
    send!(1000);
    let deadline = Instant::now() + Duration::from_secs(10);
    while total(&processed(&a).await) < a_before + 100 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.kill().await;
    send!(500);
    wait_until!(
        Duration::from_secs(40),
        "B consumed every partition to the end after A died",
        committed(&topic, &group).await == per_partition
    );
    let b_total = total(&processed(&b).await);

    // Read A's ledger (no consumer now).
    a.options.extra_args.clear();
    a.start().await;
    let mut seen: HashSet<String> = HashSet::new();
    let (mut in_a, mut in_b, mut in_both) = (0, 0, 0);
    for c in 0..CUSTOMERS {
        let customer = format!("c{c}");
        let (charged_a, _) = charges(&a, &customer).await;
        let (charged_b, _) = charges(&b, &customer).await;
        for (server, charged) in [("A", &charged_a), ("B", &charged_b)] {
            for (event, entries) in charged {
                assert_eq!(
                    entries.len(),
                    1,
                    "{server} charged {event} {} times",
                    entries.len()
                );
                let (owner, cost) = costs.get(event).expect("an event that was sent");
                assert_eq!(owner, &customer);
                assert_eq!(micros_of(&entries[0]["amount"]), *cost);
                seen.insert(event.clone());
            }
        }
        in_a += charged_a.len();
        in_b += charged_b.len();
        in_both += charged_a
            .keys()
            .filter(|e| charged_b.contains_key(*e))
            .count();
    }
    let lost: Vec<&String> = costs.keys().filter(|e| !seen.contains(*e)).collect();
    assert!(
        lost.is_empty(),
        "{} events charged by neither consumer: {lost:?}",
        lost.len()
    );
    assert_eq!(seen.len(), sent);
    assert!(in_b > 0 && in_a > 0, "both consumers charged events");
    eprintln!(
        "kafka rebalance: {sent} events over {per_partition:?}; B had partitions {rebalanced_in:?} \
         after joining; A charged {in_a} (killed), B {in_b} (processed {b_total}); \
         {in_both} charged by both (read again after A's kill); {:?}",
        started.elapsed()
    );
}

/// A graceful stop (SIGTERM) midway: the consumer lets the events being
/// charged finish, commits their offsets and leaves the group. The group's
/// committed offsets then cover exactly the events charged (before this was
/// built, they trailed by thousands), and a restart charges the rest, each
/// event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_commits_exactly_what_was_charged() {
    ensure_broker();
    let (topic, group) = (unique("sigterm"), unique("group"));
    create_topic(&topic).await;
    let mut app = TestApp::spawn().await;
    set_up(&app).await;
    // More than the SIGKILL test: the stop must land before the end.
    const EVENTS: usize = 30_000;
    let messages: Vec<Message> = (0..EVENTS)
        .map(|i| {
            let (customer, event, _) = good_event("term", i);
            Message {
                key: customer,
                payload: Some(event.to_string().into_bytes()),
            }
        })
        .collect();
    let per_partition = produce(&topic, &messages).await;
    let produced = EVENTS as i64;

    app.kill().await;
    app.options.extra_args = kafka_args(&topic, &group);
    app.start().await;
    wait_until!(
        Duration::from_secs(30),
        "the consumer joined the group and charged its first events",
        total(&processed(&app).await) > 0
    );
    let status = app.terminate().await;
    assert!(status.success(), "a graceful stop exits cleanly: {status}");
    let offsets = committed(&topic, &group).await;
    let committed_total: i64 = offsets.values().sum();

    // What the ledger holds, read by a server without the consumer.
    app.options.extra_args = Vec::new();
    app.start().await;
    let mut charged = 0i64;
    for c in 0..CUSTOMERS {
        let (by_event, _) = charges(&app, &format!("c{c}")).await;
        assert!(by_event.values().all(|entries| entries.len() == 1));
        charged += by_event.len() as i64;
    }
    eprintln!(
        "kafka: SIGTERM after the first charges: {charged} of {produced} charged, \
         {committed_total} committed ({offsets:?})"
    );
    assert!(
        charged < produced,
        "the stop came before the end ({charged} of {produced} charged)"
    );
    assert_eq!(
        committed_total, charged,
        "the committed offsets cover exactly the events charged"
    );

    // Restarted with the consumer: the rest, each once.
    app.kill().await;
    app.options.extra_args = kafka_args(&topic, &group);
    app.start().await;
    wait_until!(
        Duration::from_secs(45),
        "the restarted consumer charged the rest",
        total(&processed(&app).await) >= produced - charged
    );
    wait_until!(
        Duration::from_secs(20),
        "the group's offsets reached the end of every partition",
        committed(&topic, &group).await == per_partition
    );
    assert_eq!(
        total(&processed(&app).await),
        produced - charged,
        "nothing committed was read again"
    );
    let mut charged = 0i64;
    for c in 0..CUSTOMERS {
        let (by_event, _) = charges(&app, &format!("c{c}")).await;
        assert!(by_event.values().all(|entries| entries.len() == 1));
        charged += by_event.len() as i64;
    }
    assert_eq!(charged, produced, "every event charged once");
}

#[tokio::test]
async fn bad_kafka_flags_stop_serve_with_a_clear_message() {
    let dir = crate::support::fresh_dir();
    for (args, says) in [
        (
            vec!["--kafka-brokers", BROKERS],
            "--kafka-brokers needs --kafka-topic",
        ),
        (
            vec!["--kafka-topic", "events"],
            "--kafka-topic needs --kafka-brokers",
        ),
        (
            vec![
                "--kafka-brokers",
                BROKERS,
                "--kafka-topic",
                "t",
                "--kafka-group",
                " ",
            ],
            "--kafka-group must not be empty",
        ),
    ] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&dir)
            .args(&args)
            .env("TALLY_ADMIN_KEY", ADMIN_KEY)
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(30), output)
            .await
            .unwrap_or_else(|_| panic!("tally serve {args:?} did not stop"))
            .expect("run tally serve");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "tally serve {args:?} must fail");
        assert!(
            stderr.contains(says),
            "tally serve {args:?} says {says:?}: {stderr}"
        );
    }
    // Settings exactly-once rests on cannot be overridden.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .args(["--kafka-brokers", BROKERS, "--kafka-topic", "t"])
        .env("TALLY_ADMIN_KEY", ADMIN_KEY)
        .env(
            "TALLY_KAFKA_CONFIG",
            "security.protocol=plaintext,enable.auto.commit=true",
        )
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .expect("tally serve with a refused setting did not stop")
        .expect("run tally serve");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("TALLY_KAFKA_CONFIG cannot set enable.auto.commit"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A consumer whose broker cannot be reached runs without consuming: it
/// says so in `tally_stream_errors_total` (how often its log repeats an
/// error is `ErrorLog`'s unit test).
#[tokio::test]
async fn an_unreachable_broker_counts_its_errors() {
    let unreachable = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = unreachable.local_addr().unwrap();
    drop(unreachable);
    let app = TestApp::spawn_with(crate::support::Options {
        extra_args: vec![
            "--kafka-brokers".into(),
            address.to_string(),
            "--kafka-topic".into(),
            "nowhere".into(),
        ],
        ..Default::default()
    })
    .await;
    let mut errors = 0.0;
    for _ in 0..100 {
        let metrics = app
            .client
            .get(format!("{}/metrics", app.base))
            .send()
            .await
            .unwrap();
        let text = metrics.text().await.unwrap();
        errors = text
            .lines()
            .find(|l| l.starts_with("tally_stream_errors_total{source=\"kafka\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if errors >= 3.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(errors >= 3.0, "kafka errors counted: {errors}");
}

/// Two servers over one PostgreSQL database, both started with the Kafka
/// flags: only the server that runs the writer consumes. When the first
/// server's writer session ends, the second takes the leader lock and its
/// consumer joins the group; the first follows it without a restart, and its
/// consumer leaves the group (were it to stay, its partitions would stall:
/// it cannot charge). When the second stops, the first leads and consumes
/// again. Every event is charged once, by the server that led.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_moves_with_the_writer() {
    ensure_broker();
    let (topic, group) = (unique("leader"), unique("group"));
    create_topic(&topic).await;
    let (first, mut second, database) = TestApp::pair_on_postgres(kafka_args(&topic, &group)).await;
    set_up(&first).await;

    const EACH: usize = 200;
    let mut expected: HashMap<String, i64> = HashMap::new();
    let mut produced: BTreeMap<i32, i64> = BTreeMap::new();
    let mut round = async |prefix: &str| {
        let messages: Vec<Message> = (0..EACH)
            .map(|i| {
                let (customer, event, cost) = good_event(prefix, i);
                expected.insert(format!("{prefix}-{i}"), cost);
                Message {
                    key: customer,
                    payload: Some(event.to_string().into_bytes()),
                }
            })
            .collect();
        for (partition, count) in produce(&topic, &messages).await {
            *produced.entry(partition).or_insert(0) += count;
        }
        wait_until!(
            Duration::from_secs(60),
            format!("round {prefix}: the group's offsets reached the end of every partition"),
            committed(&topic, &group).await == produced
        );
    };

    round("a").await;
    assert_eq!(total(&processed(&first).await), EACH as i64);
    assert!(first
        .metrics()
        .await
        .contains("tally_stream_consumers{source=\"kafka\"} 1"));
    assert_eq!(
        total(&processed(&second).await),
        0,
        "the follower does not consume"
    );

    // The first server's writer session ends: the second takes over. The
    // second is frozen meanwhile (its session, waiting, takes the lock) and
    // goes on once the first follows and its consumer has left the group:
    // tansu keeps a leader that leaves the group while another member's
    // join is pending as the group's leader, and the join never completes
    // (a Kafka broker elects another).
    second.freeze(true);
    assert_eq!(
        terminate_sessions(&database, &leader_lock_sessions(true)),
        1,
        "the writer's session ended"
    );
    first.wait_until_follower().await;
    wait_until!(
        Duration::from_secs(20),
        "the first server's consumer stopped and left the group",
        first
            .metrics()
            .await
            .contains("tally_stream_consumers{source=\"kafka\"} 0")
    );
    second.freeze(false);
    second.wait_for_writer().await;
    round("b").await;
    assert_eq!(
        total(&processed(&first).await),
        EACH as i64,
        "the first server stopped consuming"
    );
    assert_eq!(total(&processed(&second).await), EACH as i64);

    // The second server stops: the first leads and consumes again.
    second.kill().await;
    first.wait_for_writer().await;
    round("c").await;
    assert_eq!(total(&processed(&first).await), 2 * EACH as i64);

    let mut charged = 0usize;
    for c in 0..CUSTOMERS {
        let (by_event, _) = charges(&first, &format!("c{c}")).await;
        for (event, entries) in &by_event {
            assert_eq!(entries.len(), 1, "{event} charged once");
            let cost = expected.get(event).expect("a produced event");
            assert_eq!(micros_of(&entries[0]["amount"]), *cost, "{event}");
        }
        charged += by_event.len();
    }
    assert_eq!(charged, 3 * EACH, "every event charged once");
}
