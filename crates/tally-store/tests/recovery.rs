//! A store closed and reopened shows exactly the state it had: balances,
//! grants and the whole history, for the customer that keeps being charged
//! and for one left untouched; and the reopened writer continues from it.

use std::sync::Arc;

mod common;
use common::{amount, charge, grant, id, ok, TestStore};

use tally_core::Timestamp;
use tally_store::{BalanceView, Command, ManualClock, NewCustomer, NewHold, NewRefund, Outcome};

const START: Timestamp = Timestamp(1_800_000_000_000_000);

/// What must survive a reopen: balance and every grant's state.
fn summary(view: &BalanceView) -> String {
    let grants: Vec<String> = view
        .grants
        .iter()
        .map(|r| {
            let g = &r.grant;
            format!(
                "{} {} {} {:?} {}",
                g.id, g.remaining, g.expired_amount, g.status, g.amount
            )
        })
        .collect();
    format!("{:?} | {}", view.balance, grants.join("; "))
}

/// Run a history with expiries, holds, a release into an expired grant, a
/// reinstatement and refunds, plus `charges` small charges; then compare the
/// state before closing and after reopening.
async fn survives_reopen(name: &str, charges: usize) {
    let place = TestStore::new(name);
    let clock = Arc::new(ManualClock::new(START));
    let store = place.open(clock.clone()).await;
    let customer = NewCustomer::with_id(id("c"));
    ok(&store, Command::CreateCustomer(customer)).await;
    ok(&store, grant("main", "1000000", None)).await;
    ok(&store, grant("short", "50", START.plus_seconds(10))).await;
    // A hold that reserves from the short grant (earliest expiry burns first).
    let hold = NewHold {
        id: id("h"),
        customer_id: id("c"),
        amount: Some(amount("30")),
        feature: None,
        usage: None,
        timeout_seconds: 3600,
        member_id: None,
        reason: None,
    };
    ok(&store, Command::Hold(hold)).await;
    ok(&store, charge("first", "25")).await;
    for n in 0..charges {
        ok(&store, charge(&format!("ch{n}"), "0.5")).await;
    }
    // The short grant expires with the hold's 30 still reserved from it...
    clock.advance_to(START.plus_seconds(20).unwrap());
    let tick = store.execute(Command::Tick, None).await.unwrap();
    assert!(matches!(tick.result, Ok(Outcome::Tick { .. })));
    // ...so releasing the hold sends those 30 on to `expired`.
    ok(
        &store,
        Command::Release {
            hold_id: id("h"),
            reason: None,
        },
    )
    .await;
    // Reinstate the short grant: what expired comes back. The charge of 25 drew
    // the short grant's last 20 (earliest expiry first), so at expiry it had
    // nothing left; only the hold's 30, released after, went to `expired`.
    let reinstate = Command::ChangeExpiry {
        id: id("x1"),
        grant_id: id("short"),
        expires_at: START.plus_seconds(7200),
        reason: "support".into(),
    };
    match ok(&store, reinstate).await {
        Outcome::Expiry(expiry) => assert_eq!(expiry.reinstated, amount("30")),
        other => panic!("{other:?}"),
    }
    let refund = NewRefund {
        id: id("r1"),
        charge_id: Some(id("first")),
        hold_id: None,
        amount: None,
        reason: "x".into(),
    };
    ok(&store, Command::Refund(refund)).await;
    ok(&store, charge("last", "1")).await;

    // A second customer written just before closing, and not touched again.
    let other = NewCustomer::with_id(id("d"));
    ok(&store, Command::CreateCustomer(other)).await;
    let mut other_grant = grant("d_grant", "100", None);
    if let Command::Grant(g) = &mut other_grant {
        g.customer_id = id("d");
    }
    ok(&store, other_grant).await;
    let mut other_charge = charge("d_charge", "7");
    if let Command::Charge(c) = &mut other_charge {
        c.customer_id = id("d");
    }
    ok(&store, other_charge).await;
    let other_before = store.balance(id("d")).await.unwrap().unwrap();
    assert_eq!(other_before.balance.available, amount("93"));

    let before = store.balance(id("c")).await.unwrap().unwrap();
    let (_, entries_before) = store.audit(id("c")).await.unwrap();
    // Exact expectation: 1,000,050 granted - 0.5 * charges - 1 (last); the
    // first charge was refunded and the short grant was reinstated whole.
    let spent = amount("0.5").micros() * charges as i64 + amount("1").micros();
    assert_eq!(
        before.balance.available.micros(),
        amount("1000050").micros() - spent
    );
    drop(store);

    let reopened = place.open(clock.clone()).await;
    let after = reopened.balance(id("c")).await.unwrap().unwrap();
    assert_eq!(summary(&after), summary(&before));
    let (_, entries_after) = reopened.audit(id("c")).await.unwrap();
    assert_eq!(entries_after.len(), entries_before.len());
    assert_eq!(
        entries_after.len(),
        9 + charges,
        "grant x2, hold, first, charges, expire, release, reinstate, refund, last"
    );
    // The reopened writer continues from the same state.
    match ok(&reopened, charge("after", "2")).await {
        Outcome::Charge(c) => assert_eq!(
            c.balance_after.micros(),
            before.balance.available.micros() - amount("2").micros()
        ),
        other => panic!("{other:?}"),
    }
    // Writing on after a pause (1 s, longer than any batching interval) and
    // reopening once more keeps both customers exact.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    ok(&reopened, charge("later", "3")).await;
    let later = reopened.balance(id("c")).await.unwrap().unwrap();
    assert_eq!(
        later.balance.available.micros(),
        before.balance.available.micros() - amount("5").micros()
    );
    drop(reopened);
    let again = place.open(clock).await;
    let last = again.balance(id("c")).await.unwrap().unwrap();
    assert_eq!(summary(&last), summary(&later));
    let other_after = again.balance(id("d")).await.unwrap().unwrap();
    assert_eq!(summary(&other_after), summary(&other_before));
    drop(again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_store_has_the_same_state() {
    survives_reopen("small", 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_store_has_the_same_state_after_many_entries() {
    // Enough entries that any batching of state writes (BENCHMARKS.md) would
    // have to cross a batch boundary.
    survives_reopen("large", 12_500).await;
}

/// The salt of a SQLite write-ahead log (bytes 16..24 of its header): it
/// changes every time the log starts over from its beginning.
fn wal_salt(dir: &std::path::Path) -> Option<[u8; 8]> {
    use std::io::Read;
    let mut header = [0u8; 32];
    let mut file = std::fs::File::open(dir.join("tally.db-wal")).ok()?;
    file.read_exact(&mut header).ok()?;
    Some(header[16..24].try_into().unwrap())
}

/// Under steady load the embedded store's write-ahead log starts over
/// instead of growing without bound (it used to grow by about 50 MB/s at
/// 10,000 charges/s, because with groups committing back to back SQLite
/// never found it fully copied), and nothing is lost across the restarts
/// of the log: a reopened store has every charge. Always the embedded store:
/// PostgreSQL keeps its own log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_ahead_log_starts_over_under_steady_load() {
    let dir = std::env::temp_dir().join(format!("tally-store-wal-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let options = tally_store::Options {
        // 1 MiB instead of 64: a debug build reaches it in a fraction of a second.
        wal_restart_frames: 256,
        ..tally_store::Options::default()
    };
    let open = || {
        tally_store::Store::open_with(&dir, Arc::new(tally_store::SystemClock), options)
            .expect("open")
    };
    let store = open();
    const CUSTOMERS: usize = 200;
    for c in 0..CUSTOMERS {
        let customer = NewCustomer::with_id(id(&format!("w{c}")));
        ok(&store, Command::CreateCustomer(customer)).await;
        let mut lot = grant(&format!("gw{c}"), "1000000", None);
        if let Command::Grant(g) = &mut lot {
            g.customer_id = id(&format!("w{c}"));
        }
        ok(&store, lot).await;
    }
    // 32 clients charging without a pause for 3 s, over 200 customers; the
    // log's header is read every 20 ms.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..32)
        .map(|client| {
            let (store, stop) = (store.clone(), stop.clone());
            tokio::spawn(async move {
                let mut charged = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut command = charge(&format!("l{client}-{charged}"), "0.5");
                    if let Command::Charge(c) = &mut command {
                        c.customer_id =
                            id(&format!("w{}", (client * 7 + charged as usize) % CUSTOMERS));
                    }
                    ok(&store, command).await;
                    charged += 1;
                }
                charged
            })
        })
        .collect();
    let mut salts = std::collections::HashSet::new();
    let mut largest = 0;
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(3) {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        salts.extend(wal_salt(&dir));
        largest = largest.max(std::fs::metadata(dir.join("tally.db-wal")).map_or(0, |m| m.len()));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut charged = 0;
    for client in clients {
        charged += client.await.unwrap();
    }
    assert!(
        salts.len() >= 3,
        "the log started over {} times in 3 s of steady load ({charged} charges; largest {largest} bytes)",
        salts.len().saturating_sub(1)
    );
    // Every charge is there after a reopen.
    let mut available = 0i64;
    for c in 0..CUSTOMERS {
        available += store
            .balance(id(&format!("w{c}")))
            .await
            .unwrap()
            .unwrap()
            .balance
            .available
            .micros();
    }
    drop(store);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let reopened = open();
    let mut after = 0i64;
    for c in 0..CUSTOMERS {
        let (_, entries) = reopened.audit(id(&format!("w{c}"))).await.unwrap();
        assert_eq!(
            entries.len() as u64,
            1 + entries
                .iter()
                .filter(|e| e.draft.kind == tally_core::EntryKind::Charge)
                .count() as u64
        );
        after += reopened
            .balance(id(&format!("w{c}")))
            .await
            .unwrap()
            .unwrap()
            .balance
            .available
            .micros();
    }
    assert_eq!(after, available);
    assert_eq!(
        after,
        amount("1000000").micros() * CUSTOMERS as i64 - amount("0.5").micros() * charged as i64,
        "every acknowledged charge survived the log's restarts"
    );
    drop(reopened);
    let _ = std::fs::remove_dir_all(&dir);
}
