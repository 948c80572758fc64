//! Several `tally serve` processes over one PostgreSQL database (issue 6):
//! 64 clients spread over 3 servers, on one hot customer and on 10,000
//! customers, never overspend and never charge twice; holds expire once
//! however many servers run; when the server running the writer is killed,
//! another takes over and nothing acknowledged is lost; a writer whose
//! database connection is lost (PostgreSQL restarted, the network dropped)
//! leads again on a new one without a restart, or follows another server
//! that took over meanwhile.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::json;

use crate::support::{
    allow_connections, assert_replayable, count_sessions, leader_lock_sessions, micros_of,
    run_on_database, terminate_sessions, wait_until, Options, Partition, Reply, TestApp, ADMIN_KEY,
};

const CLIENTS: usize = 64;

/// Three servers over one fresh database; the first runs the writer.
async fn three_servers() -> Vec<Arc<TestApp>> {
    let first = TestApp::spawn_postgres(Options::default()).await;
    let second = TestApp::spawn_beside(&first).await;
    let third = TestApp::spawn_beside(&first).await;
    assert!(first.is_writer().await, "the first server runs the writer");
    assert!(!second.is_writer().await && !third.is_writer().await);
    vec![Arc::new(first), Arc::new(second), Arc::new(third)]
}

/// A charge answered by any server is a success or `insufficient_credits`;
/// true when it charged.
fn charged(id: &str, reply: &Reply) -> bool {
    match reply.status {
        StatusCode::OK => {
            assert_eq!(reply.str("id"), id);
            true
        }
        StatusCode::PAYMENT_REQUIRED => {
            assert_eq!(reply.code(), "insufficient_credits", "{}", reply.body);
            false
        }
        other => panic!("charge {id}: {other} {}", reply.body),
    }
}

#[tokio::test]
async fn three_servers_never_overspend_nor_charge_twice() {
    let servers = three_servers().await;
    // Setup through a server that forwards: writes reach the writer.
    servers[1].customer("hot").await;
    servers[2].grant("hot", "g-hot", "5000").await;

    // One hot customer: 64 clients over 3 servers ask for 6,400 charges of
    // 1 credit against 5,000; each charge is sent twice, the retry through
    // another server.
    let per_client = 100;
    let tasks = (0..CLIENTS).map(|client| {
        let servers = servers.clone();
        tokio::spawn(async move {
            let mut succeeded = 0;
            for n in 0..per_client {
                let id = format!("hot-{client}-{n}");
                let first = &servers[(client + n) % 3];
                let retry = &servers[(client + n + 1) % 3];
                let reply = first.charge("hot", &id, "1").await;
                let again = retry.charge("hot", &id, "1").await;
                assert_eq!(again.status, reply.status, "{id}: {}", again.body);
                assert!(again.replayed(), "{id}: the retry is a replay");
                succeeded += usize::from(charged(&id, &reply));
            }
            succeeded
        })
    });
    let succeeded: usize = join_all(tasks).await.into_iter().map(|r| r.unwrap()).sum();
    assert_eq!(succeeded, 5000, "exactly the balance was charged");
    for server in &servers {
        let balance = server.balance("hot").await;
        assert_eq!(micros_of(&balance["available"]), 0, "{balance}");
    }
    let entries = servers[2].ledger_all("hot").await;
    assert_eq!(entries.len(), 5001, "one grant and 5,000 charges");
    assert_replayable(&entries);

    // 10,000 customers with 3 credits each, 4 charges of 1 asked for each:
    // exactly 3 succeed per customer.
    let customers = 10_000;
    let setup = (0..CLIENTS).map(|client| {
        let servers = servers.clone();
        tokio::spawn(async move {
            for c in (client..customers).step_by(CLIENTS) {
                let server = &servers[c % 3];
                server.customer(&format!("u{c}")).await;
                server
                    .grant(&format!("u{c}"), &format!("g-u{c}"), "3")
                    .await;
            }
        })
    });
    for task in join_all(setup).await {
        task.unwrap();
    }
    let load = (0..CLIENTS).map(|client| {
        let servers = servers.clone();
        tokio::spawn(async move {
            let mut succeeded = 0;
            for round in 0..4 {
                for c in (client..customers).step_by(CLIENTS) {
                    let id = format!("u{c}-{round}");
                    let reply = servers[(c + round) % 3]
                        .charge(&format!("u{c}"), &id, "1")
                        .await;
                    succeeded += usize::from(charged(&id, &reply));
                }
            }
            succeeded
        })
    });
    let succeeded: usize = join_all(load).await.into_iter().map(|r| r.unwrap()).sum();
    assert_eq!(succeeded, 3 * customers, "3 charges per customer, no more");
    for c in (0..customers).step_by(997) {
        let balance = servers[c % 3].balance(&format!("u{c}")).await;
        assert_eq!(micros_of(&balance["available"]), 0, "u{c}: {balance}");
        assert_eq!(servers[0].ledger_all(&format!("u{c}")).await.len(), 4);
    }
}

#[tokio::test]
async fn holds_expire_once_and_a_killed_writer_is_replaced() {
    let servers = three_servers().await;
    servers[0].customer("c").await;
    servers[1].grant("c", "g", "100").await;
    for n in 0..10 {
        let reply = servers[n % 3]
            .post(
                "/v1/holds",
                json!({ "id": format!("h{n}"), "customer_id": "c", "amount": "5", "timeout_seconds": 1 }),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    }
    // The holds expire on the writer's tick, once: wait for the entries,
    // then for several more ticks of every server, and count again.
    let expiries = |entries: &[serde_json::Value]| {
        entries
            .iter()
            .filter(|e| e["kind"] == "hold_expired")
            .count()
    };
    let mut expired = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        expired = expiries(&servers[1].ledger_all("c").await);
        if expired >= 10 {
            break;
        }
    }
    assert_eq!(expired, 10, "the holds expired within 10 s");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let entries = servers[2].ledger_all("c").await;
    assert_eq!(expiries(&entries), 10, "each hold expired exactly once");
    let balance = servers[0].balance("c").await;
    assert_eq!(micros_of(&balance["held"]), 0, "{balance}");
    assert_eq!(micros_of(&balance["available"]), 100_000_000, "{balance}");

    // Kill the writer under load; another server takes over. Every charge
    // acknowledged before, during or after is there exactly once.
    let acknowledged = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let load = (0..8).map(|client| {
        let servers = servers.clone();
        let acknowledged = acknowledged.clone();
        tokio::spawn(async move {
            for n in 0..10 {
                let id = format!("k-{client}-{n}");
                // Through the two servers that survive, retrying a 503.
                let server = &servers[1 + (client + n) % 2];
                for _ in 0..200 {
                    let reply = server.charge("c", &id, "1").await;
                    if reply.status == StatusCode::OK {
                        acknowledged.lock().unwrap().insert(id.clone());
                        // Spread the load over the kill.
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        break;
                    }
                    assert_eq!(
                        reply.status,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "{}",
                        reply.body
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        })
    });
    let load: Vec<_> = load.collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    servers[0].sigkill();
    for task in join_all(load).await {
        task.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert_eq!(
        acknowledged.len(),
        80,
        "every charge was acknowledged in the end"
    );
    let writers = [servers[1].is_writer().await, servers[2].is_writer().await];
    assert_eq!(
        writers.iter().filter(|w| **w).count(),
        1,
        "one new writer: {writers:?}"
    );
    let entries = servers[2].ledger_all("c").await;
    let charges: Vec<&str> = entries
        .iter()
        .filter(|e| e["kind"] == "charge")
        .map(|e| e["reference"].as_str().unwrap())
        .collect();
    assert_eq!(charges.len(), 80, "each acknowledged charge once");
    assert_eq!(charges.iter().collect::<HashSet<_>>().len(), 80);
    assert_eq!(
        micros_of(&servers[1].balance("c").await["available"]),
        20_000_000
    );
    assert_replayable(&entries);
}

/// The references of the charges among a customer's ledger `entries`,
/// sorted.
fn charge_references(entries: &[serde_json::Value]) -> Vec<&str> {
    let mut charges: Vec<&str> = entries
        .iter()
        .filter(|e| e["kind"] == "charge")
        .map(|e| e["reference"].as_str().unwrap())
        .collect();
    charges.sort_unstable();
    charges
}

/// Charge `id` on `server` until it is acknowledged, retrying while the
/// server answers 503 (at most about 10 s); how many 503s it took.
async fn charge_until_acknowledged(server: &TestApp, customer: &str, id: &str) -> usize {
    for unavailable in 0..100 {
        let reply = server.charge(customer, id, "1").await;
        if reply.status == StatusCode::OK {
            assert_eq!(reply.str("id"), id);
            return unavailable;
        }
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{id}: {}",
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{id} was not acknowledged within about 10 s");
}

/// Every session of a server's database ends, as when PostgreSQL restarts:
/// the server keeps running, reads work again at once (its pooled read
/// connections are found closed and replaced), writes after a few 503s at
/// most (the writer finds its connection gone on its next group and leads
/// again on a new one), and an open live stream ends, so that its client
/// reads the balance afresh (a group whose answer was lost published
/// nothing). Then the writer's session alone is ended under load from 8
/// clients: every charge is acknowledged in the end, exactly once, and the
/// ledger replays.
#[tokio::test]
async fn a_lost_database_connection_is_ridden_out_without_a_restart() {
    let mut app = TestApp::spawn_postgres(Options::default()).await;
    let database = app.database_url.clone().expect("a PostgreSQL app");
    app.customer("c").await;
    app.grant("c", "g", "100").await;
    assert_eq!(app.charge("c", "before", "1").await.status, StatusCode::OK);
    // Reads at once: the pool keeps several read connections open.
    let reads = || join_all((0..16).map(|_| app.get("/v1/customers/c/balance")));
    for balance in reads().await {
        assert_eq!(balance.status, StatusCode::OK, "{}", balance.body);
    }
    let mut stream = app
        .client
        .get(app.url("/v1/customers/c/stream"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let first = tokio::time::timeout(Duration::from_secs(10), stream.chunk())
        .await
        .expect("the stream's first event within 10 s")
        .unwrap()
        .expect("the stream is open");
    assert!(String::from_utf8_lossy(&first).contains("event: balance"));

    let ended = terminate_sessions(&database, "true");
    assert!(
        ended >= 2,
        "the writer's and the readers' sessions ended: {ended}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    for balance in reads().await {
        assert_eq!(balance.status, StatusCode::OK, "{}", balance.body);
        assert_eq!(micros_of(&balance.body["available"]), 99_000_000);
    }
    // Within about 10 s (the helper's bound), however many 503s it takes.
    charge_until_acknowledged(&app, "c", "after").await;
    assert!(app.is_writer().await);
    assert!(app.exited().is_none(), "the server kept running");
    // The stream ended (keep-alive comments aside).
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.chunk().await {
                Ok(Some(chunk)) if String::from_utf8_lossy(&chunk).starts_with(':') => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream ended within 10 s");
    assert!(
        matches!(end, Ok(None) | Err(_)),
        "the stream is over: {end:?}"
    );

    // The writer's session alone, under load.
    let app = Arc::new(app);
    let load = (0..8).map(|client| {
        let app = app.clone();
        tokio::spawn(async move {
            for n in 0..10 {
                charge_until_acknowledged(&app, "c", &format!("k-{client}-{n}")).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    });
    let load: Vec<_> = load.collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        terminate_sessions(&database, &leader_lock_sessions(true)),
        1,
        "the writer's session ended"
    );
    for task in join_all(load).await {
        task.unwrap();
    }
    let mut app = Arc::into_inner(app).expect("the clients are done");
    assert!(app.exited().is_none(), "the server kept running");
    assert!(app.is_writer().await);
    let entries = app.ledger_all("c").await;
    let charges: Vec<&str> = entries
        .iter()
        .filter(|e| e["kind"] == "charge")
        .map(|e| e["reference"].as_str().unwrap())
        .collect();
    assert_eq!(
        charges.len(),
        82,
        "each acknowledged charge once: {charges:?}"
    );
    assert_eq!(charges.iter().collect::<HashSet<_>>().len(), 82);
    assert_eq!(micros_of(&app.balance("c").await["available"]), 18_000_000);
    assert_replayable(&entries);
}

/// A database that refuses new connections for a while (an operator's
/// `ALLOW_CONNECTIONS false`, answered with 55000 at connect) with every
/// session ended is ridden out like a restart: the server keeps trying to
/// lead and writes again once connections are allowed (it used to stop the
/// process, on every server at once).
#[tokio::test]
async fn a_database_closed_to_new_connections_for_a_while_is_ridden_out() {
    let mut app = TestApp::spawn_postgres(Options::default()).await;
    let database = app.database_url.clone().expect("a PostgreSQL app");
    app.customer("c").await;
    app.grant("c", "g", "100").await;
    assert_eq!(app.charge("c", "before", "1").await.status, StatusCode::OK);
    allow_connections(&database, false);
    let ended = terminate_sessions(&database, "true");
    assert!(ended >= 1, "the writer's session ended: {ended}");
    // Long enough for the writer to try to lead again, and be refused.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(app.exited().is_none(), "the server kept running");
    allow_connections(&database, true);
    charge_until_acknowledged(&app, "c", "after").await;
    assert!(app.exited().is_none(), "the server kept running");
    assert_eq!(micros_of(&app.balance("c").await["available"]), 98_000_000);
}

/// A writer whose process stalls (SIGSTOP: its kernel still acknowledges
/// every byte, so no TCP timeout fires) keeps its session and the leader
/// lock; the follower ends that session once it has waited on its server
/// for 10 s and takes over. The write it was forwarding meanwhile is
/// answered 503 with Retry-After as it takes over (not at the forward's 30 s
/// limit), the retry is charged, and the stalled server, once it goes on,
/// follows. An idle writer is not taken for a stalled one.
#[tokio::test]
async fn a_stalled_writer_is_superseded_and_follows_when_it_goes_on() {
    let first = TestApp::spawn_postgres(Options::default()).await;
    let second = TestApp::spawn_beside(&first).await;
    assert!(first.is_writer().await);
    first.customer("c").await;
    first.grant("c", "g", "10").await;
    // A live writer with nothing to do is not taken for a stalled one: it
    // speaks to the database at least once a second.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(first.is_writer().await, "an idle writer keeps the lock");
    assert!(!second.is_writer().await);

    // The writer's process stops (as a paused VM would): its kernel keeps
    // its PostgreSQL session open, and with it the leader lock.
    first.freeze(true);
    let charge = json!({ "id": "stalled", "customer_id": "c", "amount": "1" });
    let reply = tokio::time::timeout(
        Duration::from_secs(60),
        second.post("/v1/charges", charge.clone()),
    )
    .await
    .expect("answered within 60 s, not held for ever");
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.body
    );
    assert_eq!(reply.code(), "unavailable");
    assert!(reply.headers.contains_key("retry-after"));
    assert!(
        reply.body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("took over"),
        "the forward ends when the follower takes over, not at its 30 s limit: {}",
        reply.body
    );
    assert!(second.is_writer().await, "the follower took over");
    let charged = second.post("/v1/charges", charge.clone()).await;
    assert_eq!(charged.status, StatusCode::OK, "{}", charged.body);
    assert_eq!(charged.str("id"), "stalled");

    // The stalled server goes on: its session is gone, so it follows.
    first.freeze(false);
    first.wait_until_follower().await;
    let after = first.charge("c", "after", "1").await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.body);
    assert!(second.is_writer().await);
    let balance = first.balance("c").await;
    assert_eq!(micros_of(&balance["available"]), 8_000_000, "{balance}");
    let entries = second.ledger_all("c").await;
    assert_eq!(
        charge_references(&entries),
        vec!["after", "stalled"],
        "each charge once"
    );
}

/// A follower whose process stopped while it waited for the leader lock is
/// granted the lock all the same when the writer goes: such a session,
/// which took the lock but never leads, is ended after 60 s silent, and the
/// next server in the queue takes over (it was never judged, and every write
/// waited for as long as the follower stayed stopped). When the stopped
/// server goes on, it follows.
#[tokio::test]
async fn a_follower_stopped_at_the_head_of_the_lock_queue_does_not_block_a_takeover() {
    let mut first = TestApp::spawn_postgres(Options::default()).await;
    let database = first.database_url.clone().expect("a PostgreSQL app");
    let waiting = leader_lock_sessions(false);
    let second = TestApp::spawn_beside(&first).await;
    wait_until!(
        Duration::from_secs(10),
        "the second server waits for the lock",
        count_sessions(&database, &waiting) == 1
    );
    let third = TestApp::spawn_beside(&first).await;
    wait_until!(
        Duration::from_secs(10),
        "both followers wait for the lock",
        count_sessions(&database, &waiting) == 2
    );
    first.customer("c").await;
    first.grant("c", "g", "10").await;
    // The head of the queue stops; then the writer dies, and PostgreSQL
    // grants the lock to the stopped server's session.
    second.freeze(true);
    first.kill().await;
    let killed = std::time::Instant::now();
    wait_until!(
        Duration::from_secs(120),
        "the third server takes over",
        third.is_writer().await
    );
    eprintln!(
        "the third server led {:?} after the writer died",
        killed.elapsed()
    );
    let charged = third.charge("c", "after", "1").await;
    assert_eq!(charged.status, StatusCode::OK, "{}", charged.body);
    second.freeze(false);
    let through_second = second.charge("c", "through-second", "1").await;
    assert!(
        [StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE].contains(&through_second.status),
        "{}",
        through_second.body
    );
    // Retried until acknowledged (a 503 while it finds its session gone).
    charge_until_acknowledged(&second, "c", "through-second").await;
    assert!(third.is_writer().await && !second.is_writer().await);
    let balance = third.balance("c").await;
    assert_eq!(micros_of(&balance["available"]), 8_000_000, "{balance}");
}

/// Three servers. The followers' sessions waiting for the leader lock end:
/// each waits again on a new one. Then the writer's session ends and a
/// follower, waiting for the lock, takes it. The first server's writer
/// finds its connection gone on its next group (the tick's, or a charge's),
/// sees the lock held by another server, and follows it without a restart:
/// it answers `"writer": false`, forwards writes to the new writer, and
/// leads again once that one stops. Each charge is charged once.
#[tokio::test]
async fn a_writer_that_lost_the_lock_to_another_server_follows_it() {
    let mut first = TestApp::spawn_postgres(Options::default()).await;
    let database = first.database_url.clone().expect("a PostgreSQL app");
    let mut second = TestApp::spawn_beside(&first).await;
    let mut third = TestApp::spawn_beside(&first).await;
    first.customer("c").await;
    first.grant("c", "g", "100").await;
    assert_eq!(second.charge("c", "one", "1").await.status, StatusCode::OK);

    // The followers' waiting sessions end, twice: each time they wait again
    // on new ones.
    let waiting = leader_lock_sessions(false);
    let both_wait = || async {
        wait_until!(
            Duration::from_secs(10),
            "both followers wait for the lock",
            count_sessions(&database, &waiting) == 2
        );
    };
    for _ in 0..2 {
        both_wait().await;
        assert_eq!(terminate_sessions(&database, &waiting), 2);
    }
    both_wait().await;
    assert!(
        second.exited().is_none() && third.exited().is_none(),
        "the followers kept running"
    );

    // The writer's session ends; a follower takes the lock.
    third.kill().await;
    assert_eq!(
        terminate_sessions(&database, &leader_lock_sessions(true)),
        1,
        "the writer's session ended"
    );
    second.wait_for_writer().await;
    // The first server still believes it leads until its next group: a
    // charge sent to it now fails (503), or, once it knows it does not
    // lead, is forwarded to the new writer.
    let answer = first.charge("c", "two", "1").await;
    assert!(
        [StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE].contains(&answer.status),
        "{}",
        answer.body
    );
    first.wait_until_follower().await;
    assert!(first.exited().is_none(), "the first server kept running");
    // Through the first server, now a follower: forwarded to the writer.
    assert_eq!(charge_until_acknowledged(&first, "c", "two").await, 0);
    assert_eq!(charge_until_acknowledged(&first, "c", "three").await, 0);
    assert!(second.charge("c", "two", "1").await.replayed());

    // The new writer stops: the first server leads again, without a restart.
    second.kill().await;
    first.wait_for_writer().await;
    assert_eq!(first.charge("c", "four", "1").await.status, StatusCode::OK);
    let entries = first.ledger_all("c").await;
    assert_eq!(charge_references(&entries), ["four", "one", "three", "two"]);
    assert_replayable(&entries);
    assert_eq!(
        micros_of(&first.balance("c").await["available"]),
        96_000_000
    );
    assert!(first.exited().is_none());
}

/// The writer's server is cut off from PostgreSQL and from the other
/// servers without a reset: its network link goes down, as in a partition
/// or when a host loses power. PostgreSQL keeps that server's session, and
/// the leader lock with it, until its own end of the connection fails, which
/// the store's sessions ask to happen after about 30 s of silence
/// (`SERVER_SIDE_SETTINGS` in `db.rs`; with the system's defaults, over two
/// hours); but the followers watch that session, and one ends it once it has
/// been silent for 10 s (`SilentLeaderWatch`), and takes over. A write that
/// another follower was forwarding to the cut-off writer fails (503) once
/// that follower sees the new leader, not after TCP's 15 minutes of
/// retransmissions, and its retry reaches the new writer. A charge sent to the cut-off writer as the link went down is
/// retried through another server and charged once. When the link is back,
/// the old writer finds its connection gone and follows the new one.
#[tokio::test]
async fn a_writer_cut_off_from_the_database_is_replaced() {
    let lab = Partition::new();
    let first = Arc::new(TestApp::spawn_on_database(lab.options(), lab.url(), true).await);
    let second = TestApp::spawn_on_database(lab.outside_options(), lab.url(), false).await;
    let third = Arc::new(TestApp::spawn_on_database(lab.outside_options(), lab.url(), false).await);
    assert!(!second.is_writer().await && !third.is_writer().await);
    wait_until!(
        Duration::from_secs(10),
        "the other servers wait for the lock",
        count_sessions(&lab.url(), &leader_lock_sessions(false)) == 2
    );
    // Through a follower, forwarded to the writer over the link.
    third.customer("c").await;
    third.grant("c", "g", "100").await;
    assert_eq!(
        third.charge("c", "before", "1").await.status,
        StatusCode::OK
    );

    // A charge on its way to the writer as the link goes down: it may or may
    // not reach it, and its answer is lost either way.
    let at_cut = tokio::spawn({
        let first = first.clone();
        async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), first.charge("c", "at-cut", "1"))
                .await;
        }
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    lab.cut();
    let cut = std::time::Instant::now();
    // A charge the third server forwards to the cut-off writer.
    let during = tokio::spawn({
        let third = third.clone();
        async move {
            let reply =
                tokio::time::timeout(Duration::from_secs(60), third.charge("c", "during", "1"))
                    .await
                    .expect("a forwarded charge is answered within 60 s of the cut");
            assert!(
                [StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE].contains(&reply.status),
                "{}",
                reply.body
            );
            cut.elapsed()
        }
    });
    wait_until!(
        Duration::from_secs(90),
        "another server takes over",
        second.is_writer().await || third.is_writer().await
    );
    eprintln!("another server took over {:?} after the cut", cut.elapsed());
    at_cut.await.unwrap();
    let answered = during.await.unwrap();
    eprintln!("the forwarded charge was answered {answered:?} after the cut");
    charge_until_acknowledged(&third, "c", "at-cut").await;
    charge_until_acknowledged(&third, "c", "during").await;
    charge_until_acknowledged(&second, "c", "after").await;

    lab.mend();
    wait_until!(
        Duration::from_secs(60),
        "the cut-off server follows once the link is back",
        !first.is_writer().await
    );
    let mut first = Arc::into_inner(first).expect("the charge at the cut is done");
    assert!(first.exited().is_none(), "the first server kept running");
    // Through the first server again, now a follower: forwarded.
    assert!(first.charge("c", "at-cut", "1").await.replayed());
    assert_eq!(charge_until_acknowledged(&first, "c", "mended").await, 0);

    let entries = second.ledger_all("c").await;
    assert_eq!(
        charge_references(&entries),
        ["after", "at-cut", "before", "during", "mended"]
    );
    assert_replayable(&entries);
    assert_eq!(
        micros_of(&second.balance("c").await["available"]),
        95_000_000
    );
}

/// A follower is cut off from PostgreSQL while its session waits for the
/// leader lock. Once PostgreSQL's end of that connection has failed (the
/// keepalives: about 30 s of silence), the check a running statement makes
/// every 5 s (`client_connection_check_interval`) ends the wait, so the
/// session leaves the lock's queue; without it, it stayed queued (seen for
/// over 90 s), to be granted the lock it cannot use when the writer stops.
/// Once the link is back, the follower waits again on a new session and
/// forwards writes as before.
#[tokio::test]
async fn a_follower_cut_off_from_the_database_leaves_the_lock_queue() {
    let lab = Partition::new();
    let first = TestApp::spawn_on_database(lab.outside_options(), lab.url(), true).await;
    let second = TestApp::spawn_on_database(lab.options(), lab.url(), false).await;
    let waiting = leader_lock_sessions(false);
    wait_until!(
        Duration::from_secs(10),
        "the follower waits for the lock",
        count_sessions(&lab.url(), &waiting) == 1
    );
    lab.cut();
    let cut = std::time::Instant::now();
    wait_until!(
        Duration::from_secs(90),
        "the cut-off follower leaves the lock's queue",
        count_sessions(&lab.url(), &waiting) == 0
    );
    eprintln!(
        "the follower left the lock's queue {:?} after the cut",
        cut.elapsed()
    );
    lab.mend();
    wait_until!(
        Duration::from_secs(60),
        "the follower waits again once the link is back",
        count_sessions(&lab.url(), &waiting) == 1
    );
    first.customer("c").await;
    first.grant("c", "g", "10").await;
    assert_eq!(
        second.charge("c", "through", "1").await.status,
        StatusCode::OK
    );
    assert!(first.is_writer().await && !second.is_writer().await);
    assert_eq!(micros_of(&first.balance("c").await["available"]), 9_000_000);
}

/// A newer Tally migrated the database while this server ran its writer (a
/// rolling upgrade: the new servers migrate, then the old ones stop). The
/// old writer goes on until it next leads: then, after a lost connection, it
/// does not run its writer on a schema it does not know, but stops the
/// process, which releases the lock to a server that knows it.
#[tokio::test]
async fn a_writer_does_not_lead_again_on_a_schema_a_newer_tally_migrated() {
    let mut app = TestApp::spawn_postgres(Options::default()).await;
    let database = app.database_url.clone().expect("a PostgreSQL app");
    app.customer("c").await;
    run_on_database(
        &database,
        "INSERT INTO schema_migrations (version, applied_at) \
         SELECT max(version) + 1, 0 FROM schema_migrations",
    );
    // Still the writer until it leads again.
    app.grant("c", "g", "10").await;
    assert_eq!(
        terminate_sessions(&database, &leader_lock_sessions(true)),
        1,
        "the writer's session ended"
    );
    wait_until!(
        Duration::from_secs(10),
        "the server stops rather than lead on a newer schema",
        app.exited().is_some()
    );
    let status = app.exited().expect("exited");
    // A refusal it expects: status 1 and the reason, not a panic's abort.
    assert_eq!(status.code(), Some(1), "{status}");
    assert_eq!(count_sessions(&database, &leader_lock_sessions(true)), 0);
}

/// A receiver that holds the first request it gets for `first` and every
/// later one for `later` before it answers 200: the delivery ids it was
/// sent, in order of arrival.
async fn holding_receiver(
    first: Duration,
    later: Duration,
) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    type Received = Arc<std::sync::Mutex<Vec<String>>>;
    let received: Received = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let receive = move |axum::extract::State(received): axum::extract::State<Received>,
                        headers: axum::http::HeaderMap| async move {
        let id = headers
            .get("tally-delivery-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let count = {
            let mut received = received.lock().unwrap();
            received.push(id);
            received.len()
        };
        tokio::time::sleep(if count == 1 { first } else { later }).await;
        axum::http::StatusCode::OK
    };
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(received.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{address}/hook"), received)
}

/// A server that stopped running the writer (another server took over)
/// delivers no webhooks. The writer's server sends a delivery, and the
/// receiver holds that attempt for 3 s; meanwhile another server takes
/// over, so the attempt cannot be recorded and the delivery stays due. The
/// new writer sends it (held 5 s); the old writer's server, now a follower,
/// does not send it again, though it polled it as due before. The receiver
/// gets exactly those two requests, for the one delivery.
#[tokio::test]
async fn a_server_that_follows_delivers_no_webhooks() {
    let (first, second, database) = TestApp::pair_on_postgres(Vec::new()).await;
    let (url, received) = holding_receiver(Duration::from_secs(3), Duration::from_secs(5)).await;
    let endpoint = first
        .post(
            "/v1/webhook-endpoints",
            json!({ "id": "wh", "url": url, "events": ["balance.low"] }),
        )
        .await;
    assert_eq!(endpoint.status, StatusCode::OK, "{}", endpoint.body);
    first.customer("c").await;
    let alerts = first
        .put("/v1/customers/c/alerts", json!({ "low_balance": ["100"] }))
        .await;
    assert_eq!(alerts.status, StatusCode::OK, "{}", alerts.body);
    first.grant("c", "g", "150").await;
    assert_eq!(first.charge("c", "one", "60").await.status, StatusCode::OK);
    let arrived = |count: usize| {
        let received = received.clone();
        async move {
            wait_until!(
                Duration::from_secs(10),
                format!("request {count} arrives"),
                received.lock().unwrap().len() >= count
            );
        }
    };
    arrived(1).await;

    // While that attempt is held, the second server takes over.
    assert_eq!(
        terminate_sessions(&database, &leader_lock_sessions(true)),
        1,
        "the first server's writer session ended"
    );
    second.wait_for_writer().await;
    first.wait_until_follower().await;
    arrived(2).await;
    // Both attempts end (the first's at 3 s, unrecorded; the second's at
    // about 5 s); a follower still polling would have sent it again.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), 2, "{received:?}");
    assert_eq!(
        received[0], received[1],
        "one delivery, sent by each writer"
    );
}

/// Two schedulers over one database (issue 5): servers sharing a PostgreSQL
/// database on one manual clock renew a monthly plan for a year while the
/// server running the writer is killed twice and restarted (so the other
/// takes over the scheduler, catching up from the clock the last writer
/// recorded), and both servers' tickers and clock advances run throughout.
/// Every period's allocation is granted exactly once, in order, and the
/// ledger replays to the balance on every server.
#[tokio::test]
async fn two_schedulers_over_one_database_grant_each_period_once() {
    const DAY: i64 = 86_400;
    let options = Options {
        manual_clock: true,
        ..Options::default()
    };
    let mut first = TestApp::spawn_postgres(options).await;
    let mut second = TestApp::spawn_beside(&first).await;
    assert!(first.is_writer().await && !second.is_writer().await);
    let reply = second
        .put(
            "/v1/plans/pro",
            json!({ "name": "Pro", "period": "month", "included_credits": "1000",
                    "allocation_expires_after_periods": null }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    second.customer("cus").await;
    let reply = second
        .put(
            "/v1/customers/cus/subscription",
            json!({ "id": "s1", "plan": "pro" }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);

    let allocations = |entries: &[serde_json::Value]| -> Vec<String> {
        entries
            .iter()
            .filter(|e| e["kind"] == "grant")
            .filter_map(|e| e["reference"].as_str())
            .filter(|r| r.starts_with("plan:s1:"))
            .map(str::to_owned)
            .collect()
    };
    for month in 1..=12 {
        // Advance through either server (the other forwards to the writer),
        // and tick through both at once.
        let through = if month % 2 == 0 { &first } else { &second };
        let now = through.advance(31 * DAY).await;
        let ticks = join_all([first.advance(0), second.advance(0)]).await;
        assert!(ticks.iter().all(|after| instant(after) >= instant(&now)));
        match month {
            // Kill the writer: the other server takes over the scheduler at
            // the instant the last tick recorded, then restart the killed
            // one beside it.
            4 => {
                first.kill().await;
                second.wait_for_writer().await;
                assert!(instant(second.get("/v1/clock").await.str("now")) >= instant(&now));
                first.wait_for_writer_on_start = false;
                first.start().await;
                assert!(!first.is_writer().await);
            }
            8 => {
                second.kill().await;
                first.wait_for_writer().await;
                assert!(instant(first.get("/v1/clock").await.str("now")) >= instant(&now));
                second.start().await;
                assert!(!second.is_writer().await);
            }
            _ => {}
        }
        let writer = if first.is_writer().await {
            &first
        } else {
            &second
        };
        let entries = writer.ledger_all("cus").await;
        let granted = allocations(&entries);
        // One allocation at the start and one per month boundary passed:
        // 31 days always pass exactly one calendar month boundary or two.
        let expected: Vec<String> = (0..granted.len()).map(|n| format!("plan:s1:{n}")).collect();
        let mut sorted = granted.clone();
        sorted.sort_by_key(|r| r[8..].parse::<u32>().unwrap());
        assert_eq!(
            sorted, expected,
            "month {month}: each period once, none skipped"
        );
        assert!(granted.len() > month, "month {month}: {granted:?}");
        let replayed = assert_replayable(&entries);
        assert_eq!(replayed, 1_000_000_000 * granted.len() as i64);
    }
    // Every server reads the same ledger and balance once the follower
    // has followed the writer's clock.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let reference = first.ledger_all("cus").await;
    let count = allocations(&reference).len();
    assert!((13..=14).contains(&count), "a year of renewals: {count}");
    for server in [&first, &second] {
        let entries = server.ledger_all("cus").await;
        assert_eq!(entries, reference);
        let balance = server.balance("cus").await;
        assert_eq!(
            micros_of(&balance["available"]),
            1_000_000_000 * count as i64,
            "{balance}"
        );
    }
}

fn instant(text: &str) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// A manual clock over PostgreSQL lives in the database, not in the data
/// directory: a server on a fresh database starts at the real time even with
/// the data directory of a server whose database's clock ran years ahead
/// (such a file once carried that instant over, and the new database's
/// renewals and event windows jumped with it).
#[tokio::test]
async fn a_manual_clock_over_postgresql_is_the_databases_not_the_data_directorys() {
    let manual = Options {
        manual_clock: true,
        ..Options::default()
    };
    let mut first = TestApp::spawn_postgres(manual.clone()).await;
    let advanced = first
        .post("/v1/clock/advance", json!({ "to": "2031-01-01T00:00:00Z" }))
        .await;
    assert_eq!(advanced.status, StatusCode::OK, "{}", advanced.body);
    first.kill().await;
    // Restarted over its own database, it resumes from the database's clock.
    first.start().await;
    assert_eq!(
        first.get("/v1/clock").await.str("now"),
        "2031-01-01T00:00:00Z"
    );
    first.kill().await;

    let mut second = TestApp::spawn_postgres(manual).await;
    second.kill().await;
    second.data_dir = first.data_dir.clone();
    second.start().await;
    let now = second.get("/v1/clock").await;
    let rfc3339 = &time::format_description::well_known::Rfc3339;
    let started = time::OffsetDateTime::parse(now.str("now"), rfc3339).expect("an instant");
    let real = time::OffsetDateTime::now_utc();
    assert!(
        (real - started).abs() < time::Duration::hours(1),
        "a fresh database starts at the real time ({real}): {}",
        now.body
    );
}

/// A server joining a database whose servers run on a manual clock takes
/// their clock, not the instant it started at. It started ahead of them
/// before (a probe's follower read 4 s ahead and stayed there): it showed a
/// lot expiring in between as expired and a pending grant as in effect,
/// and refused a charge for credits it had just reported.
#[tokio::test]
async fn a_server_joining_a_manual_clock_takes_the_clock_its_database_keeps() {
    let first = TestApp::spawn_postgres(Options {
        manual_clock: true,
        ..Options::default()
    })
    .await;
    // Recorded when the writer starts (not only at its first tick); the
    // joining server starts later.
    let shared = first.get("/v1/clock").await.str("now").to_owned();
    let second = TestApp::spawn_beside(&first).await;
    assert_eq!(second.get("/v1/clock").await.str("now"), shared);
    assert_eq!(first.get("/v1/clock").await.str("now"), shared);
    // A lot expiring a millisecond after the shared instant is in effect on
    // both servers until the clock moves past it.
    first.customer("c").await;
    let at = |ms: i64| {
        (instant(&shared) + time::Duration::milliseconds(ms))
            .format(&time::format_description::well_known::Rfc3339)
            .expect("an instant")
    };
    let granted = second
        .post(
            "/v1/customers/c/grants",
            json!({ "id": "g", "amount": "100", "source": "promotion", "paid": false,
                    "expires_at": at(1) }),
        )
        .await;
    assert_eq!(granted.status, StatusCode::OK, "{}", granted.body);
    for server in [&first, &second] {
        let balance = server.get("/v1/customers/c/balance").await;
        assert_eq!(balance.body["available"], "100", "{}", balance.body);
    }
    let charged = second.charge("c", "ch", "60").await;
    assert_eq!(charged.status, StatusCode::OK, "{}", charged.body);
}

/// Steps of the manual clock sent at once add up, through the writer and a
/// follower alike (each read the clock and moved to it plus its seconds, so
/// three steps of a day moved it one day), and a follower that forwarded a
/// step reads the clock it answered at once (it showed the instant before
/// until its next tick).
#[tokio::test]
async fn clock_steps_sent_at_once_add_up_on_every_server() {
    let first = TestApp::spawn_postgres(Options {
        manual_clock: true,
        ..Options::default()
    })
    .await;
    let second = TestApp::spawn_beside(&first).await;
    let start = instant(first.get("/v1/clock").await.str("now"));
    let day = || json!({ "seconds": 86_400 });
    let (a, b, c, d) = tokio::join!(
        first.post("/v1/clock/advance", day()),
        second.post("/v1/clock/advance", day()),
        first.post("/v1/clock/advance", day()),
        second.post("/v1/clock/advance", day()),
    );
    for reply in [a, b, c, d] {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    }
    let end = instant(first.get("/v1/clock").await.str("now"));
    assert_eq!(end - start, time::Duration::days(4));
    let stepped = second
        .post("/v1/clock/advance", json!({ "seconds": 60 }))
        .await;
    assert_eq!(stepped.status, StatusCode::OK, "{}", stepped.body);
    assert_eq!(second.get("/v1/clock").await.str("now"), stepped.str("now"));
    assert_eq!(
        instant(stepped.str("now")) - start,
        time::Duration::days(4) + time::Duration::seconds(60)
    );
}

/// A follower's clock trails the writer's until its next tick (a manual
/// clock's step, or real clocks a few milliseconds apart). Read then, a
/// customer's balance showed the allocation that ended at a boundary as
/// expired and the next one as not yet in effect: 0 available, a balance
/// that never was. The read is now as of no earlier than an expiry its rows
/// show.
#[tokio::test]
async fn a_follower_behind_the_writers_clock_never_shows_a_balance_between_two_periods() {
    let first = TestApp::spawn_postgres(Options {
        manual_clock: true,
        ..Options::default()
    })
    .await;
    let second = TestApp::spawn_beside(&first).await;
    let plan = first
        .put(
            "/v1/plans/daily",
            json!({ "name": "Daily", "period": { "days": 1 }, "included_credits": "100",
                    "allocation_expires_after_periods": 1 }),
        )
        .await;
    assert_eq!(plan.status, StatusCode::OK, "{}", plan.body);
    first.customer("c").await;
    let subscribed = first
        .put(
            "/v1/customers/c/subscription",
            json!({ "id": "sub_c", "plan": "daily" }),
        )
        .await;
    assert_eq!(subscribed.status, StatusCode::OK, "{}", subscribed.body);
    for day in 1..=3 {
        first.advance(86_400).await;
        // At once, before the follower's tick brings the step.
        let balance = second.get("/v1/customers/c/balance").await;
        assert_eq!(balance.status, StatusCode::OK, "{}", balance.body);
        assert_eq!(
            balance.body["available"], "100",
            "day {day}: {}",
            balance.body
        );
    }
}

/// Read through a follower whose clock trails the writer's, a grant just
/// made through it (in effect at the writer's instant) read as pending, and
/// so did one the writer had just put in effect: a balance against the very
/// entry it named. The read is now as of no earlier than the customer's
/// last entry.
#[tokio::test]
async fn a_follower_behind_the_writers_clock_shows_what_its_last_entry_says() {
    let first = TestApp::spawn_postgres(Options {
        manual_clock: true,
        ..Options::default()
    })
    .await;
    let second = TestApp::spawn_beside(&first).await;
    first.customer("fr").await;
    for step in 1..=3 {
        first.advance(3_600).await;
        // At once, through the follower, before its tick brings the step.
        let id = format!("g{step}");
        let body = json!({ "id": id, "amount": "100", "source": "purchase", "paid": true });
        let made = second.post("/v1/customers/fr/grants", body).await;
        assert_eq!(made.status, StatusCode::OK, "{}", made.body);
        let balance = second.get("/v1/customers/fr/balance").await;
        assert_eq!(balance.status, StatusCode::OK, "{}", balance.body);
        assert_eq!(
            micros_of(&balance.body["available"]),
            100_000_000 * step,
            "step {step}: {}",
            balance.body
        );
        assert_eq!(
            balance.body["pending"], "0",
            "step {step}: {}",
            balance.body
        );
    }
}

/// Servers sharing a database all run on one kind of clock: a server with
/// `--manual-clock` joining servers on the real clock (or the reverse) exits
/// at start saying so. A probe's joined, took over when the others stopped,
/// and froze the engine's time: holds never expired, and real-clock servers
/// started again beside it read them as expired while it captured them.
#[tokio::test]
async fn a_server_on_the_other_clock_cannot_join() {
    let real = TestApp::spawn_postgres(Options::default()).await;
    let url = real.database_url.clone().expect("on PostgreSQL");
    let join = |manual: bool| {
        let url = url.clone();
        async move {
            let mut serve = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"));
            serve
                .args(["serve", "--listen", "127.0.0.1:0", "--database-url", &url])
                .env("TALLY_ADMIN_KEY", crate::support::ADMIN_KEY)
                .kill_on_drop(true);
            if manual {
                serve.arg("--manual-clock");
            }
            tokio::time::timeout(std::time::Duration::from_secs(30), serve.output())
                .await
                .expect("the server exits instead of serving")
                .expect("run tally serve")
        }
    };
    let output = join(true).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("is on the real clock, and this one on a manual clock"),
        "{stderr}"
    );
    // The writer still runs, on the real clock.
    assert_eq!(real.get("/v1/clock").await.body["manual"], false);
    real.customer("c").await;

    // Two servers started at the same instant both pass that check (the
    // probe's race: the writer had not said yet which clock it runs on).
    // Made here by freezing the writer and ageing its record: the manual
    // server starts, then exits at its first tick once the writer, going
    // on, says again that it runs on the real clock.
    real.freeze(true);
    crate::support::run_on_database(
        &url,
        "UPDATE engine_clock SET mode_seen_at = mode_seen_at - 120000000",
    );
    let mut manual = TestApp::spawn_on_database(
        Options {
            manual_clock: true,
            ..Options::default()
        },
        url.clone(),
        false,
    )
    .await;
    assert_eq!(manual.get("/v1/clock").await.body["manual"], true);
    real.freeze(false);
    let mut exited = None;
    for _ in 0..100 {
        exited = manual.exited();
        if exited.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let status = exited.expect("the manual-clock server went on beside a real-clock writer");
    assert!(!status.success(), "{status:?}");
    assert_eq!(real.get("/v1/clock").await.body["manual"], false);
}
