//! A store closed and reopened shows exactly the state it had: balances,
//! grants and the whole history, for the customer that keeps being charged
//! and for one left untouched; and the reopened writer continues from it.

use std::sync::Arc;

mod common;
use common::TestStore;

use tally_core::{Amount, Id, Source, Timestamp};
use tally_store::{
    BalanceView, Command, ManualClock, NewCharge, NewCustomer, NewGrant, NewHold, NewRefund,
    Outcome, Store,
};

const START: Timestamp = Timestamp(1_800_000_000_000_000);

fn id(text: &str) -> Id {
    Id::parse(text).unwrap()
}

fn amount(text: &str) -> Amount {
    Amount::parse(text).unwrap()
}

async fn ok(store: &Store, command: Command) -> Outcome {
    let executed = store.execute(command, None).await.expect("store answers");
    executed
        .result
        .unwrap_or_else(|refusal| panic!("refused: {refusal:?}"))
}

fn grant(grant_id: &str, credits: &str, expires_at: Option<Timestamp>) -> Command {
    Command::Grant(NewGrant {
        id: id(grant_id),
        customer_id: id("c"),
        amount: amount(credits),
        source: Source::Purchase,
        paid: true,
        cost_basis: None,
        priority: 0,
        effective_at: None,
        expires_at,
        scope: None,
        metadata: None,
        external_reference: None,
        reason: None,
    })
}

fn charge(charge_id: &str, credits: &str) -> Command {
    Command::Charge(NewCharge {
        id: id(charge_id),
        customer_id: id("c"),
        amount: Some(amount(credits)),
        feature: None,
        usage: None,
        member_id: None,
        reason: None,
        metadata: None,
    })
}

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
    let customer = NewCustomer {
        id: id("c"),
        name: None,
        plan: None,
        region: None,
        currency: None,
        metadata: None,
        overage: None,
    };
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
    let other = NewCustomer {
        id: id("d"),
        name: None,
        plan: None,
        region: None,
        currency: None,
        metadata: None,
        overage: None,
    };
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
