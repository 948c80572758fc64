//! Regressions for defects an independent review found: each test failed (or
//! took the server down) before its fix.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::{micros, micros_of, TestApp};

/// A client grant id in the namespace of refund grants is refused, so it can
/// never collide with a grant a refund creates (that used to panic the writer).
#[tokio::test]
async fn grant_ids_of_refund_grants_are_reserved() {
    let app = TestApp::spawn().await;
    app.customer("c").await;
    let body = json!({"id": "refund:r1:1", "amount": "5", "source": "purchase", "paid": true});
    let reply = app.post("/v1/customers/c/grants", body).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(reply.code(), "invalid_request");
    assert_eq!(reply.body["error"]["param"], "id");
    assert_eq!(app.balance("c").await["available"], "0");
    // The server still writes afterwards.
    app.grant("c", "g1", "5").await;
    assert_eq!(app.balance("c").await["available"], "5");
}

/// Valid RFC 3339 text whose UTC instant is outside years 0000-9999 is a 400
/// that changes nothing (it used to commit, then fail every read of the customer).
#[tokio::test]
async fn instants_outside_the_representable_years_are_refused() {
    let app = TestApp::spawn().await;
    app.customer("w").await;
    for (field, text) in [
        ("effective_at", "0000-01-01T00:00:00+23:59"),
        ("expires_at", "9999-12-31T23:59:59-23:59"),
    ] {
        let mut body = json!({"id": "g", "amount": "5", "source": "promotion", "paid": false});
        body[field] = json!(text);
        let reply = app.post("/v1/customers/w/grants", body).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{field}: {}",
            reply.body
        );
        assert_eq!(reply.body["error"]["param"], field);
    }
    let balance = app.balance("w").await;
    assert_eq!(balance["available"], "0");
    assert_eq!(
        app.get("/v1/customers/w/grants").await.body["data"],
        json!([])
    );
}

/// An API key id already taken by the CLI is a 409 for the HTTP route, not a
/// failed write group (503) that also failed everyone grouped with it.
#[tokio::test]
async fn an_api_key_id_taken_by_the_cli_is_a_conflict() {
    let app = TestApp::spawn().await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["keys", "create", "--scope", "read", "--id", "clikey"])
        .args(app.storage_args())
        .output()
        .expect("run tally keys create");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reply = app
        .post("/v1/api-keys", json!({"id": "clikey", "scope": "write"}))
        .await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.body);
    assert_eq!(reply.code(), "idempotency_conflict");
    // The store keeps writing.
    app.customer("after").await;
}

/// Settings a server could only fail on later are refused at its start: an
/// `--advertise-url` followers cannot forward to (every forwarded write was
/// a 503), and benchmark counts of zero (a panic, or a run measuring nothing).
#[test]
fn unusable_settings_are_refused_at_the_start() {
    let dir = crate::support::fresh_dir();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("run tally")
    };
    let data_dir = dir.to_str().unwrap();
    for bad in ["notaurl", "ftp://10.0.0.5", "http://10.0.0.5:8080/tally"] {
        let output = run(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data_dir,
            "--advertise-url",
            bad,
        ]);
        assert!(!output.status.success(), "{bad} accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("--advertise-url must be an http:// or https:// URL"),
            "{stderr}"
        );
    }
    // A database URL of another kind: said so, not "unexpected EOF".
    let output = run(&[
        "migrate",
        "--database-url",
        "mysql://root@127.0.0.1:3306/test",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("the database URL must be a PostgreSQL one"),
        "{stderr}"
    );
    // An advertised URL without a database (an empty one counts as none):
    // each server would keep its own ledger.
    let output = run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data_dir,
        "--database-url",
        "",
        "--advertise-url",
        "http://10.0.0.5:8080",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--advertise-url is for servers sharing a PostgreSQL database"),
        "{stderr}"
    );
    // A port in use is refused before the data directory is made.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().unwrap().to_string();
    let unmade = dir.join("never-made");
    let output = run(&[
        "serve",
        "--listen",
        &port,
        "--data-dir",
        unmade.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("listen on {port}")), "{stderr}");
    assert!(
        !unmade.exists(),
        "the data directory was made for a server that could not listen"
    );
    drop(taken);
    for (flag, value) in [
        ("--seconds", "0"),
        ("--customers", "0"),
        ("--concurrency", "0"),
        ("--latency-rate", "0"),
    ] {
        let output = run(&["bench", flag, value, "--dir", data_dir]);
        assert_eq!(output.status.code(), Some(2), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("invalid value '{value}' for '{flag}")),
            "{stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A PostgreSQL address that accepts connections and never answers (a
/// wrong port, a stuck proxy) fails `tally migrate` after the connect
/// timeout, with a message saying so; it waited for ever.
#[test]
fn a_database_that_never_answers_fails_the_cli_instead_of_hanging() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        // Accept and keep the connections open without a word.
        let mut open = Vec::new();
        for stream in listener.incoming().take(2) {
            open.push(stream);
        }
        std::thread::sleep(std::time::Duration::from_secs(30));
        drop(open);
    });
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "migrate",
            "--database-url",
            &format!("postgres://postgres@127.0.0.1:{port}/x?connect_timeout=1"),
        ])
        .env("RUST_BACKTRACE", "0")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run tally migrate");
    // A guard against the hang itself, not a measure of time.
    let mut status = None;
    for _ in 0..250 {
        if let Some(done) = child.try_wait().expect("wait") {
            status = Some(done);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let Some(status) = status else {
        child.kill().ok();
        panic!("tally migrate still waits on a database that never answers after 25 s");
    };
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("no PostgreSQL answered within 3s"),
        "{stderr}"
    );
    drop(held);
}

/// A balance is read from one snapshot: while holds of the whole balance are
/// placed and released concurrently, available + held is always the total
/// (it used to read grants and holds from different commits).
#[tokio::test]
async fn a_balance_is_one_snapshot_under_concurrent_holds() {
    let app = std::sync::Arc::new(TestApp::spawn().await);
    app.customer("s").await;
    app.grant("s", "g", "100").await;
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut writers = Vec::new();
    for worker in 0..2 {
        let app = app.clone();
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            while Instant::now() < deadline {
                let id = format!("h{worker}_{n}");
                n += 1;
                let body =
                    json!({"id": id, "customer_id": "s", "amount": "100", "timeout_seconds": 60});
                let placed = app.post("/v1/holds", body).await;
                if placed.status == StatusCode::OK {
                    let released = app
                        .post(&format!("/v1/holds/{id}/release"), json!({}))
                        .await;
                    assert_eq!(released.status, StatusCode::OK, "{}", released.body);
                } else {
                    assert_eq!(placed.code(), "insufficient_credits", "{}", placed.body);
                }
            }
            n
        }));
    }
    let mut readers = Vec::new();
    for _ in 0..4 {
        let app = app.clone();
        readers.push(tokio::spawn(async move {
            let mut reads = 0;
            while Instant::now() < deadline {
                let balance = app.balance("s").await;
                let total = micros_of(&balance["available"]) + micros_of(&balance["held"]);
                assert_eq!(total, micros("100"), "torn balance read: {balance}");
                reads += 1;
            }
            reads
        }));
    }
    let mut holds = 0;
    for writer in writers {
        holds += writer.await.expect("writer task");
    }
    let mut reads = 0;
    for reader in readers {
        reads += reader.await.expect("reader task");
    }
    assert!(
        holds > 50 && reads > 100,
        "too little concurrency to mean anything: {holds} holds, {reads} reads"
    );
}

/// The grants list pages with limit and cursor like every list.
#[tokio::test]
async fn grants_are_listed_in_pages() {
    let app = TestApp::spawn().await;
    app.customer("p").await;
    for n in 0..5 {
        app.grant("p", &format!("g{n}"), "1").await;
    }
    let mut seen = Vec::new();
    let mut path = "/v1/customers/p/grants?limit=2".to_string();
    loop {
        let page = app.get(&path).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        let data = page.body["data"].as_array().expect("data").clone();
        assert!(data.len() <= 2);
        seen.extend(
            data.iter()
                .map(|g| g["id"].as_str().expect("id").to_string()),
        );
        match page.body["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/customers/p/grants?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, ["g0", "g1", "g2", "g3", "g4"]);
    for bad in ["?cursor=nonsense", "?limit=0", "?limit=1001"] {
        let reply = app.get(&format!("/v1/customers/p/grants{bad}")).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{bad}: {}",
            reply.body
        );
    }
}

/// A body the server cannot read as the route's shape names the field in
/// `param`, at any depth: a missing field, an unknown one, a value of the
/// wrong kind, an amount with too many digits. It used to name none.
#[tokio::test]
async fn a_body_that_cannot_be_read_names_the_field() {
    let app = TestApp::spawn().await;
    app.customer("c").await;
    for (path, body, param) in [
        (
            "/v1/refunds",
            json!({"id": "r1", "charge_id": "x"}),
            "reason",
        ),
        (
            "/v1/refunds",
            json!({"id": "r1", "charge_id": "x", "reason": "a", "bogus": 1}),
            "bogus",
        ),
        (
            "/v1/charges",
            json!({"id": "c1", "customer_id": "c", "amount": "1.0000001"}),
            "amount",
        ),
        (
            "/v1/charges",
            json!({"id": "c1", "customer_id": 7, "amount": "1"}),
            "customer_id",
        ),
        (
            "/v1/transfers",
            json!({"id": "t1", "from": {"customer_id": "c"}, "to": {}, "amount": "1"}),
            "to.customer_id",
        ),
        (
            "/v1/transfers",
            json!({"id": "t1", "from": {"customer_id": "c", "x": 1}, "to": {"customer_id": "c"}, "amount": "1"}),
            "from.x",
        ),
    ] {
        let reply = app.post(path, body.clone()).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{body}: {}",
            reply.body
        );
        assert_eq!(reply.code(), "invalid_request", "{body}");
        assert_eq!(
            reply.body["error"]["param"], param,
            "{body}: {}",
            reply.body
        );
    }
    assert_eq!(app.balance("c").await["available"], "0");
}

/// Input that is wrong on its own (contract dates the wrong way round, an
/// expiry before the grant takes effect) is a 400 that changes nothing, not
/// even the id: the same id with the input fixed works. It used to be refused
/// by the writer and kept as the id's outcome, so the fixed request was a 409
/// `idempotency_conflict`. What the engine refuses by its clock or state (an
/// expiry already past, too few credits) stays the id's.
#[tokio::test]
async fn bad_input_leaves_the_id_free() {
    let app = TestApp::spawn().await;
    app.customer("q").await;
    let now = app.get("/v1/clock").await.body["now"]
        .as_str()
        .unwrap()
        .to_string();
    let wrong_way = json!({
        "id": "k5",
        "effective_from": "2999-02-01T00:00:00Z",
        "effective_to": "2999-01-01T00:00:00Z",
    });
    let reply = app.put("/v1/customers/q/contract", wrong_way).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(reply.body["error"]["param"], "effective_to");
    let fixed = json!({"id": "k5", "multiplier": "1"});
    let reply = app.put("/v1/customers/q/contract", fixed).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert!(!reply.replayed());

    // A contract rule with a plan: the request alone is at fault.
    let planned =
        json!({"id": "k6", "rules": [{"feature": "f1", "plan": "pro", "credits_per_unit": "2"}]});
    let reply = app.put("/v1/customers/q/contract", planned).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(reply.body["error"]["param"], "rules[0]");
    let reply = app
        .put(
            "/v1/customers/q/contract",
            json!({"id": "k6", "multiplier": "2"}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);

    let backwards = json!({"id": "gg4", "amount": "5", "source": "promotion", "paid": false,
        "effective_at": "2999-02-01T00:00:00Z", "expires_at": "2999-01-01T00:00:00Z"});
    let reply = app.post("/v1/customers/q/grants", backwards).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(reply.body["error"]["param"], "expires_at");
    assert_eq!(app.balance("q").await["available"], "0");
    let fixed = json!({"id": "gg4", "amount": "5", "source": "promotion", "paid": false});
    let reply = app.post("/v1/customers/q/grants", fixed).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(app.balance("q").await["available"], "5");
    // An expiry already past is the engine's refusal, by its clock: kept under the id.
    let past = json!({"id": "gg5", "amount": "5", "source": "promotion", "paid": false,
        "expires_at": "2000-01-01T00:00:00Z"});
    let reply = app.post("/v1/customers/q/grants", past).await;
    assert_eq!(reply.code(), "invalid_expiry", "{now}: {}", reply.body);
    let message = reply.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("in the future"), "{message}");
    let fixed = json!({"id": "gg5", "amount": "5", "source": "promotion", "paid": false});
    let reply = app.post("/v1/customers/q/grants", fixed).await;
    assert_eq!(reply.code(), "idempotency_conflict", "{}", reply.body);

    // A transfer to the same customer without two members: the request
    // alone is at fault (the writer kept it under the id: a probe's fixed
    // request was a 409).
    app.customer("q2").await;
    for (to, param) in [
        (json!({"customer_id": "q"}), "from.member_id"),
        (
            json!({"customer_id": "q", "member_id": "m"}),
            "from.member_id",
        ),
    ] {
        let same = json!({"id": "tq", "from": {"customer_id": "q"}, "to": to, "amount": "1"});
        let reply = app.post("/v1/transfers", same).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
        assert_eq!(reply.body["error"]["param"], param, "{}", reply.body);
    }
    let same_member = json!({"id": "tq", "from": {"customer_id": "q", "member_id": "m"},
        "to": {"customer_id": "q", "member_id": "m"}, "amount": "1"});
    let reply = app.post("/v1/transfers", same_member).await;
    assert_eq!(
        reply.body["error"]["param"], "to.member_id",
        "{}",
        reply.body
    );
    let fixed = json!({"id": "tq", "from": {"customer_id": "q"}, "to": {"customer_id": "q2"},
        "amount": "1"});
    let reply = app.post("/v1/transfers", fixed).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert!(!reply.replayed());
    assert_eq!(app.balance("q2").await["available"], "1");
    app.grant("q", "back", "1").await;

    // A refusal by the state stays the id's: 6 credits on a balance of 5.
    let charge = json!({"id": "ch1", "customer_id": "q", "amount": "6"});
    let reply = app.post("/v1/charges", charge.clone()).await;
    assert_eq!(reply.status, StatusCode::PAYMENT_REQUIRED, "{}", reply.body);
    app.grant("q", "more", "5").await;
    let reply = app.post("/v1/charges", charge).await;
    assert_eq!(reply.status, StatusCode::PAYMENT_REQUIRED, "{}", reply.body);
    assert!(reply.replayed());
}

/// The contracts of a customer that does not exist are a 404, as every other
/// list under a missing customer (it was an empty 200); a ledger window that
/// ends before it starts is a 400, as the usage report's (it was an empty 200).
#[tokio::test]
async fn lists_refuse_what_cannot_be_listed() {
    let app = TestApp::spawn().await;
    let reply = app.get("/v1/customers/nobody/contracts").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.body);
    app.customer("c").await;
    let reply = app.get("/v1/customers/c/contracts").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["data"], json!([]));
    let reply = app
        .get("/v1/customers/c/ledger?from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z")
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(reply.body["error"]["param"], "to");
    let reply = app
        .get("/v1/customers/c/ledger?from=2026-01-01T00:00:00Z&to=2026-01-01T00:00:00Z")
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
}

/// A lot whose money value (amount times cost basis) passes the largest
/// amount is refused with a message that says so, not one about the balance.
#[tokio::test]
async fn a_cost_basis_too_large_says_so() {
    let app = TestApp::spawn().await;
    app.customer("c").await;
    let body = json!({"id": "g", "amount": "1000000", "source": "purchase", "paid": true,
        "cost_basis": {"amount": "1000000000000", "currency": "USD"}});
    let reply = app.post("/v1/customers/c/grants", body).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(reply.code(), "amount_too_large");
    let message = reply.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("cost_basis"), "{message}");
    assert_eq!(app.balance("c").await["available"], "0");
}

/// A cost basis is money paid per credit: an unpaid grant with one is
/// refused (a void would report its value as refundable money), and
/// nothing is granted.
#[tokio::test]
async fn unpaid_credits_have_no_cost_basis() {
    let app = TestApp::spawn().await;
    app.customer("c").await;
    let body = json!({"id": "promo", "amount": "1000", "source": "promotion", "paid": false,
        "cost_basis": {"amount": "0.05", "currency": "USD"}});
    let reply = app.post("/v1/customers/c/grants", body).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(reply.code(), "invalid_request");
    assert_eq!(reply.body["error"]["param"], "cost_basis");
    assert_eq!(app.balance("c").await["available"], "0");
    // Without it, the promotion is granted, and its void reports no money.
    let body = json!({"id": "promo", "amount": "1000", "source": "promotion", "paid": false});
    let reply = app.post("/v1/customers/c/grants", body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let void = app
        .post(
            "/v1/grants/promo/void",
            json!({"id": "v", "reason": "withdrawn"}),
        )
        .await;
    assert_eq!(void.status, StatusCode::OK, "{}", void.body);
    assert!(
        void.body
            .get("refundable_money")
            .is_none_or(|m| m.is_null()),
        "{}",
        void.body
    );
}

/// A purchase voided while a hold still reserves part of it: the credits
/// the hold gives back (released, or not captured) come back as a paid lot
/// `release:<hold>:<n>` with the purchase's cost basis, so voiding it
/// reports their money too and the two voids add up to what was not used.
/// Before, a release voided them with no money reported, while a capture
/// and a refund gave them back: the client's choice decided what finance saw.
/// The lot is stored (it survives a restart) and its id prefix is reserved.
#[tokio::test]
async fn credits_a_hold_returns_to_a_voided_purchase_keep_their_money() {
    let mut app = TestApp::spawn().await;
    for (customer, captured) in [("a", None), ("b", Some("10"))] {
        app.customer(customer).await;
        let grant = app
            .post(
                &format!("/v1/customers/{customer}/grants"),
                json!({"id": format!("{customer}g"), "amount": "100", "source": "purchase", "paid": true,
                       "cost_basis": {"amount": "1", "currency": "USD"}}),
            )
            .await;
        assert_eq!(grant.status, StatusCode::OK, "{}", grant.body);
        let hold = app
            .post(
                "/v1/holds",
                json!({"id": format!("{customer}h"), "customer_id": customer, "amount": "30", "timeout_seconds": 600}),
            )
            .await;
        assert_eq!(hold.status, StatusCode::OK, "{}", hold.body);
        let void = app
            .post(
                &format!("/v1/grants/{customer}g/void"),
                json!({"id": format!("{customer}v"), "reason": "refund unused"}),
            )
            .await;
        assert_eq!(void.status, StatusCode::OK, "{}", void.body);
        assert_eq!(void.body["refundable_money"]["amount"], "70");
        let resolved = match captured {
            None => {
                app.post(&format!("/v1/holds/{customer}h/release"), json!({}))
                    .await
            }
            Some(amount) => {
                app.post(
                    &format!("/v1/holds/{customer}h/capture"),
                    json!({"amount": amount}),
                )
                .await
            }
        };
        assert_eq!(resolved.status, StatusCode::OK, "{}", resolved.body);
    }
    app.kill().await;
    app.start().await;
    for (customer, back) in [("a", "30"), ("b", "20")] {
        assert_eq!(
            micros_of(&app.balance(customer).await["available"]),
            micros(back),
            "{customer}"
        );
        let lot = format!("release:{customer}h:1");
        let void = app
            .post(
                &format!("/v1/grants/{lot}/void"),
                json!({"id": format!("{customer}v2"), "reason": "refund the rest"}),
            )
            .await;
        assert_eq!(void.status, StatusCode::OK, "{}", void.body);
        assert_eq!(void.body["refundable_money"]["amount"], back, "{customer}");
        assert_eq!(void.body["refundable_money"]["currency"], "USD");
        assert_eq!(micros_of(&app.balance(customer).await["available"]), 0);
    }
    let reserved = app
        .post(
            "/v1/customers/a/grants",
            json!({"id": "release:x:y", "amount": "5", "source": "promotion", "paid": false}),
        )
        .await;
    assert_eq!(
        reserved.status,
        StatusCode::BAD_REQUEST,
        "{}",
        reserved.body
    );
}

/// A client that stops in the middle of a request's head, or of its body, or
/// that keeps an idle connection, is cut off after `--read-timeout-seconds`
/// (it held a connection and a task forever), while a live stream that runs
/// longer is not. The reads below wait up to 30 s so that a server that never
/// cuts off fails the test instead of hanging it.
#[tokio::test]
async fn stalled_clients_are_cut_off_after_the_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn_with(crate::support::Options {
        extra_args: vec!["--read-timeout-seconds".into(), "1".into()],
        ..Default::default()
    })
    .await;
    app.customer("slow").await;
    let address = app.base.trim_start_matches("http://").to_owned();
    let read_all = |mut stream: tokio::net::TcpStream| async move {
        let mut answer = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            stream.read_to_end(&mut answer),
        )
        .await
        .expect("the server kept a stalled connection open")
        .expect("read");
        String::from_utf8_lossy(&answer).into_owned()
    };
    // Half a head: closed without an answer.
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert_eq!(read_all(stream).await, "");
    // An idle keep-alive connection: answered, then closed.
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = read_all(stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // A body that stops: 408, nothing charged, and the connection closed.
    let key = crate::support::ADMIN_KEY;
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    stream
        .write_all(
            format!(
                "POST /v1/customers/slow/grants HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"id\":\"g\","
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let answer = read_all(stream).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    let balance = app.get("/v1/customers/slow/balance").await;
    assert_eq!(balance.str("available"), "0");
    // A live stream outlasts the timeout: a grant made 2 s after it opened
    // still arrives on it.
    let mut stream = app
        .client
        .get(app.url("/v1/customers/slow/stream"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .bytes_stream();
    use futures_util::StreamExt;
    let first = stream.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("event: balance"));
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    app.grant("slow", "g_late", "5").await;
    let mut seen = String::new();
    while !seen.contains("balance.changed") {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(30), stream.next())
            .await
            .expect("the stream stayed silent")
            .expect("the stream ended")
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
}

/// A JSON array where an object is expected is refused at any depth: serde
/// filled a struct's fields from it by position, so `"from": ["acme", null]`
/// moved credits, an array event was charged, and an empty array turned a
/// plan's rollover on. Optional bodies (capture, release, confirm) refuse
/// an array and data after the document as the required ones do.
#[tokio::test]
async fn arrays_do_not_stand_in_for_objects() {
    let app = TestApp::spawn().await;
    app.customer("acme").await;
    app.customer("beta").await;
    app.grant("acme", "g_acme", "100").await;
    let raw = |method: reqwest::Method, path: &'static str, body: &str| {
        let request = app
            .client
            .request(method, app.url(path))
            .bearer_auth(crate::support::ADMIN_KEY)
            .header("content-type", "application/json")
            .body(body.to_owned());
        crate::support::Reply::of(request, path)
    };
    let moved = raw(
        reqwest::Method::POST,
        "/v1/transfers",
        r#"{"id":"tpos1","from":["acme",null],"to":["beta",null],"amount":"1"}"#,
    )
    .await;
    assert_eq!(moved.status, StatusCode::BAD_REQUEST, "{:?}", moved.body);
    assert_eq!(moved.body["error"]["param"], "from", "{:?}", moved.body);
    assert!(moved.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("expected a JSON object"));
    let batch = raw(
        reqwest::Method::POST,
        "/v1/events",
        r#"{"events":[["ev_pos7","acme","email_lookup",2,null,null,null]]}"#,
    )
    .await;
    assert_eq!(batch.status, StatusCode::OK, "{:?}", batch.body);
    assert_eq!(batch.body["results"][0]["status"], "rejected");
    assert_eq!(batch.body["results"][0]["error"]["code"], "invalid_event");
    let array_batch = raw(reqwest::Method::POST, "/v1/events", r#"[[]]"#).await;
    assert_eq!(array_batch.status, StatusCode::BAD_REQUEST);
    let plan = raw(
        reqwest::Method::PUT,
        "/v1/plans/p_sw",
        r#"{"name":"P","period":"month","included_credits":"1","rollover":[]}"#,
    )
    .await;
    assert_eq!(plan.status, StatusCode::BAD_REQUEST, "{:?}", plan.body);
    assert_eq!(plan.body["error"]["param"], "rollover");
    let cost_basis = raw(
        reqwest::Method::POST,
        "/v1/customers/acme/grants",
        r#"{"id":"g_arr","amount":"1","source":"purchase","paid":true,"cost_basis":["0.5","USD"]}"#,
    )
    .await;
    assert_eq!(cost_basis.status, StatusCode::BAD_REQUEST);
    assert_eq!(cost_basis.body["error"]["param"], "cost_basis");
    // Optional bodies.
    let held = app
        .post(
            "/v1/holds",
            json!({"id": "posh1", "customer_id": "acme", "amount": "10", "timeout_seconds": 600}),
        )
        .await;
    assert_eq!(held.status, StatusCode::OK, "{:?}", held.body);
    for body in [r#"["3",null,"x"]"#, r#"{"amount":"1"} {}"#, r#"{} garbage"#] {
        let capture = raw(reqwest::Method::POST, "/v1/holds/posh1/capture", body).await;
        assert_eq!(
            capture.status,
            StatusCode::BAD_REQUEST,
            "{body}: {:?}",
            capture.body
        );
    }
    let release = raw(reqwest::Method::POST, "/v1/holds/posh1/release", r#"["r"]"#).await;
    assert_eq!(release.status, StatusCode::BAD_REQUEST);
    // Nothing moved: 100 granted, 10 held.
    let balance = app.get("/v1/customers/acme/balance").await;
    assert_eq!(balance.str("available"), "90");
    assert_eq!(balance.str("held"), "10");
    assert_eq!(
        app.get("/v1/customers/beta/balance").await.str("available"),
        "0"
    );
    // The same requests as objects go through.
    let capture = raw(
        reqwest::Method::POST,
        "/v1/holds/posh1/capture",
        r#"{"amount":"3"}"#,
    )
    .await;
    assert_eq!(capture.status, StatusCode::OK, "{:?}", capture.body);
    let moved = raw(
        reqwest::Method::POST,
        "/v1/transfers",
        r#"{"id":"tpos2","from":{"customer_id":"acme"},"to":{"customer_id":"beta"},"amount":"1"}"#,
    )
    .await;
    assert_eq!(moved.status, StatusCode::OK, "{:?}", moved.body);
}

/// SIGTERM lets a request whose head has arrived finish, but does not wait
/// for a client still sending one: a probe's half-sent request held every
/// graceful stop until the 30 s exit timer, which then exited with 1. Here
/// a half-sent head and a body that stopped are open when the signal comes,
/// beside a request being answered (a batch of events): the batch is
/// answered and charged, the stopped body is answered 503, the half head
/// closed, and the server exits with 0.
#[tokio::test]
async fn a_graceful_stop_does_not_wait_for_half_sent_requests() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut app = TestApp::spawn().await;
    app.customer("c").await;
    app.grant("c", "g", "100000").await;
    let address = app.base.trim_start_matches("http://").to_owned();
    let mut half_head = tokio::net::TcpStream::connect(&address).await.unwrap();
    half_head
        .write_all(b"POST /v1/charges HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut half_body = tokio::net::TcpStream::connect(&address).await.unwrap();
    half_body
        .write_all(
            format!(
                "POST /v1/charges HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"id\":",
                crate::support::ADMIN_KEY
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let events: Vec<Value> = (0..5000)
        .map(|n| json!({"id": format!("e{n}"), "customer_id": "c", "feature": "f", "quantity": 1}))
        .collect();
    app.features(&["f"]).await;
    app.publish_version(
        "v1",
        json!([{"feature": "f", "credits_per_unit": "1"}]),
        None,
    )
    .await;
    let batch = {
        let client = app.client.clone();
        let url = app.url("/v1/events");
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(crate::support::ADMIN_KEY)
                .json(&json!({ "events": events }))
                .send()
                .await
        })
    };
    // The batch is on its way (its head sent) before the signal.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let status = app.terminate().await;
    assert!(status.success(), "{status:?}");
    let answered = batch.await.unwrap();
    if let Ok(answered) = answered {
        // Sent before the signal: answered, every event charged.
        assert_eq!(answered.status(), StatusCode::OK);
        let body: Value = answered.json().await.unwrap();
        assert!(body["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["status"] == "charged"));
    }
    // The half-sent head was closed without an answer; the half-sent body
    // was answered 503 (nothing applied: send it again).
    let mut rest = Vec::new();
    let _ = half_head.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    let _ = half_body.read_to_end(&mut rest).await;
    let answer = String::from_utf8_lossy(&rest);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("shutting down"), "{answer}");
}

/// Send `request` as written (no client tidies its path) and read the
/// answer to the end (`Connection: close`).
async fn raw_exchange(app: &TestApp, request: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = app.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
        .await
        .expect("an answer within 30 s")
        .expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

/// A path with a `.` or `..` segment is refused before it is routed or
/// forwarded: a follower's forwarding to the writer resolved it away, so
/// `PUT /v1/customers/./members/alerts` changed customer `members`'s alerts
/// (a probe's). An id that is `.` or `..` cannot be created either.
#[tokio::test]
async fn dot_segments_in_paths_are_refused() {
    let app = TestApp::spawn().await;
    app.customer("members").await;
    let key = crate::support::ADMIN_KEY;
    for path in [
        "/v1/customers/./members/alerts",
        "/v1/customers/%2e/members/alerts",
        "/v1/customers/members/../members/alerts",
        "/v1/customers/%2E%2e/alerts",
        "/v1/customers/x\\..\\members/alerts",
    ] {
        let body = r#"{"low_balance":["7"]}"#;
        let answer = raw_exchange(
            &app,
            format!(
                "PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(answer.contains("\"param\":\"path\""), "{path}: {answer}");
    }
    let alerts = app.get("/v1/customers/members/alerts").await;
    assert_eq!(alerts.status, StatusCode::OK, "{}", alerts.body);
    assert_eq!(alerts.body["low_balance"], json!([]), "{}", alerts.body);
    for id in [".", ".."] {
        let reply = app.post("/v1/customers", json!({ "id": id })).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
        assert_eq!(reply.body["error"]["param"], "id");
    }
}

/// A 401 names its scheme (`WWW-Authenticate`); two `Authorization` headers
/// are a 400, not the first one's scope; a compressed body is refused, not
/// read as JSON; a stored key cannot take the id of `TALLY_ADMIN_KEY`,
/// whose actor it would share in the audit trail (a probe's).
#[tokio::test]
async fn authentication_headers_encodings_and_the_admin_id() {
    let app = TestApp::spawn().await;
    app.customer("c").await;
    let no_key = app
        .send(reqwest::Method::GET, "/v1/customers/c/balance", None, None)
        .await;
    assert_eq!(no_key.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        no_key.headers["www-authenticate"].to_str().unwrap(),
        "Bearer realm=\"tally\""
    );
    let read = app
        .post("/v1/api-keys", json!({ "id": "reader", "scope": "read" }))
        .await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.body);
    let read = read.str("key").to_owned();
    let key = crate::support::ADMIN_KEY;
    for (first, second) in [(read.as_str(), key), (key, read.as_str())] {
        let answer = raw_exchange(
            &app,
            format!(
                "GET /v1/customers/c/balance HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {first}\r\n\
                 Authorization: Bearer {second}\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("\"param\":\"authorization\""), "{answer}");
    }
    let body = r#"{"id":"gz","customer_id":"c","amount":"1"}"#;
    let answer = raw_exchange(
        &app,
        format!(
            "POST /v1/charges HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("Content-Encoding"), "{answer}");
    let reply = app
        .post(
            "/v1/api-keys",
            json!({ "id": "bootstrap-admin", "scope": "write" }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(reply.body["error"]["param"], "id");
    let keys = app.get("/v1/api-keys").await;
    assert!(
        !keys.body.to_string().contains("bootstrap-admin"),
        "{}",
        keys.body
    );
}

/// The manual clock stops at 9000-01-01: at 9999-12-31 a hold's timeout was
/// past every date the API can write (shown as `@<micros>us`), and never
/// came (a probe's).
#[tokio::test]
async fn the_manual_clock_stays_where_instants_are_dates() {
    let app = TestApp::spawn_with(crate::support::Options {
        manual_clock: true,
        ..Default::default()
    })
    .await;
    for body in [
        json!({ "to": "9999-12-31T23:59:59Z" }),
        json!({ "to": "9000-01-01T00:00:01Z" }),
        json!({ "seconds": 300_000_000_000_i64 }),
    ] {
        let reply = app.post("/v1/clock/advance", body.clone()).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{body}: {}",
            reply.body
        );
        assert!(reply.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("9000-01-01"));
    }
    let reply = app
        .post("/v1/clock/advance", json!({ "to": "9000-01-01T00:00:00Z" }))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    app.customer("late").await;
    app.grant("late", "g", "10").await;
    let hold = app
        .post(
            "/v1/holds",
            json!({ "id": "h", "customer_id": "late", "amount": "1", "timeout_seconds": 3600 }),
        )
        .await;
    assert_eq!(hold.status, StatusCode::OK, "{}", hold.body);
    assert_eq!(hold.str("expires_at"), "9000-01-01T01:00:00Z");
}

/// Spawn `tally serve` on a fresh data directory with `env` set and stderr
/// going to `stderr`; its address once it listens.
async fn serve_with(
    env: &[(&str, &str)],
    stderr: std::process::Stdio,
) -> (tokio::process::Child, String, std::path::PathBuf) {
    use tokio::io::AsyncBufReadExt;
    let dir = crate::support::fresh_dir();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .env("TALLY_ADMIN_KEY", crate::support::ADMIN_KEY)
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().expect("spawn tally serve");
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("listening within 60 s")
        .expect("read stdout")
        .unwrap_or_else(|| panic!("tally serve {env:?} exited before listening"));
    let base = line
        .strip_prefix("tally listening on ")
        .unwrap_or_else(|| panic!("unexpected line {line:?}"))
        .trim()
        .to_owned();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, base, dir)
}

/// An empty stream variable counts as none, as an empty `TALLY_DATABASE_URL`
/// does: `TALLY_NATS_URL=` used to stop the server, naming `--nats-stream`.
#[tokio::test]
async fn empty_stream_variables_count_as_none() {
    let (mut child, base, dir) = serve_with(
        &[
            ("TALLY_NATS_URL", ""),
            ("TALLY_NATS_STREAM", " "),
            ("TALLY_KAFKA_BROKERS", ""),
            ("TALLY_KAFKA_TOPIC", ""),
            ("TALLY_NATS_SUBJECT", ""),
        ],
        std::process::Stdio::inherit(),
    )
    .await;
    let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    child.kill().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// A log that cannot be written (a full disk) loses its lines, not the
/// server: the logging library's report of the failure panicked whichever
/// thread logged, the writer's among them, and then every write was 503 for
/// good (a probe's). Here every line goes to /dev/full.
#[tokio::test]
async fn a_log_that_cannot_be_written_stops_nothing() {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full");
    let (mut child, base, dir) = serve_with(&[], full.into()).await;
    let client = reqwest::Client::new();
    let key = crate::support::ADMIN_KEY;
    let post = |path: &str, body: Value| {
        client
            .post(format!("{base}{path}"))
            .bearer_auth(key)
            .json(&body)
            .send()
    };
    let reply = post("/v1/customers", json!({ "id": "c" })).await.unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    let reply = post(
        "/v1/customers/c/grants",
        json!({ "id": "g", "amount": "100", "source": "promotion", "paid": false }),
    )
    .await
    .unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    for n in 0..50 {
        let reply = post(
            "/v1/charges",
            json!({ "id": format!("ch{n}"), "customer_id": "c", "amount": "1" }),
        )
        .await
        .unwrap();
        assert_eq!(reply.status(), StatusCode::OK, "charge {n}");
    }
    let balance: Value = client
        .get(format!("{base}/v1/customers/c/balance"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(balance["available"], "50");
    // And it stops gracefully, its last log line lost too.
    let pid = child.id().expect("running");
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("stopped within 30 s")
        .unwrap();
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A customer's plan and region are keys a price book rule can name, not
/// free text: `""`, `"a/b"` or a newline were taken (a probe's).
#[tokio::test]
async fn customer_plans_and_regions_are_written_as_keys() {
    let app = TestApp::spawn().await;
    for (field, value) in [
        ("plan", ""),
        ("plan", "a/b"),
        ("region", "\n"),
        ("region", " "),
    ] {
        let mut body = json!({ "id": "c" });
        body[field] = json!(value);
        let reply = app.post("/v1/customers", body).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{field}={value:?}: {}",
            reply.body
        );
        assert_eq!(reply.body["error"]["param"], field);
    }
    let made = app
        .post(
            "/v1/customers",
            json!({ "id": "c", "plan": "pro", "region": "eu-west-1" }),
        )
        .await;
    assert_eq!(made.status, StatusCode::OK, "{}", made.body);
    let patched = app
        .send(
            reqwest::Method::PATCH,
            "/v1/customers/c",
            Some(crate::support::ADMIN_KEY),
            Some(&json!({ "plan": "x y" })),
        )
        .await;
    assert_eq!(patched.status, StatusCode::BAD_REQUEST, "{}", patched.body);
    assert_eq!(patched.body["error"]["param"], "plan");
    let cleared = app
        .send(
            reqwest::Method::PATCH,
            "/v1/customers/c",
            Some(crate::support::ADMIN_KEY),
            Some(&json!({ "region": null })),
        )
        .await;
    assert_eq!(cleared.status, StatusCode::OK, "{}", cleared.body);
    assert!(cleared.body["region"].is_null());
}
