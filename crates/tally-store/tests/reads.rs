//! Reads under load share the store's read connections: callers reading at
//! once wait for a pooled connection instead of each opening one (on
//! PostgreSQL a new server process per read, which capped balance reads over
//! HTTP at about 1,000/s with 64 clients; BENCHMARKS.md).

use std::sync::Arc;

mod common;
use common::{amount, charge, customer, grant, id, ok, TestStore};

use tally_core::{Period, Plan, Timestamp};
use tally_store::{Command, ManualClock, NewSubscription, PlanChange};

const START: Timestamp = Timestamp(1_800_000_000_000_000);

/// A clock that reads one instant and is not a manual clock: a server's real
/// clock, stopped for the test.
/// A clock stopped at an instant that does not resume at the writer's: a
/// manual one, as the writer's is (servers on a real clock and on a manual
/// one are refused over one database), which stays where it was set.
struct Stopped(Timestamp);

impl tally_core::Clock for Stopped {
    fn now(&self) -> Timestamp {
        self.0
    }

    fn is_manual(&self) -> bool {
        true
    }
}

/// Customer `c` on a 30-day plan of 100 credits from now, 30 of them charged.
async fn subscribed_and_charged(store: &tally_store::Store) {
    ok(
        store,
        Command::PutPlan(Plan {
            key: "monthly".into(),
            name: "Monthly".into(),
            period: Period::Days(30),
            included_credits: amount("100"),
            allocation_expires_after_periods: Some(1),
            rollover: None,
            overage: None,
            upgrade_grace_days: 0,
        }),
    )
    .await;
    ok(store, customer()).await;
    ok(
        store,
        Command::Subscribe(NewSubscription {
            id: id("sub"),
            customer_id: id("c"),
            plan: "monthly".into(),
            start_at: None,
            change: PlanChange::Now,
        }),
    )
    .await;
    ok(store, charge("ch", "30")).await;
}

/// A read of a customer's credits renews a subscription whose period has
/// ended before it answers, and reads the renewed state. The store has no
/// tick of its own (the server's runs every 500 ms), so here only the read's
/// own check can show the new period's allocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_after_the_period_ended_shows_the_renewal() {
    let place = TestStore::new("renewed_reads");
    let clock = Arc::new(ManualClock::new(START));
    let store = place.open(clock.clone()).await;
    subscribed_and_charged(&store).await;
    let before = store.balance(id("c")).await.unwrap().unwrap();
    assert_eq!(before.balance.available, amount("70"));

    // Past the period's end: the first allocation has expired, the second
    // is due. A read without the renewal would show 0 available.
    clock.advance_to(START.plus_seconds(30 * 24 * 3600 + 1).unwrap());
    let after = store.balance(id("c")).await.unwrap().unwrap();
    assert_eq!(after.balance.available, amount("100"));
    assert_eq!(after.grants.len(), 2, "{:?}", after.grants);
    let subscriptions = store.subscriptions(id("c")).await.unwrap();
    assert_eq!(subscriptions[0].period, 1, "{subscriptions:?}");
    // Renewed once: a second read changes nothing.
    let again = store.balance(id("c")).await.unwrap().unwrap();
    assert_eq!(again.balance.available, amount("100"));
    assert_eq!(again.grants.len(), 2);
}

/// A read past a period's end whose renewal the rows do not show yet never
/// shows the ending allocation expired without the next one (0 available).
/// On PostgreSQL the reader is a second server, which cannot renew, with
/// its clock past the boundary while the writer's has not reached it (as a
/// follower's is while the writer's ticks work through the customers due):
/// it reads as of just before the boundary. On the embedded store the one
/// server renews before it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_past_a_boundary_not_yet_renewed_shows_a_balance_that_was() {
    let place = TestStore::new("unrenewed");
    let clock = Arc::new(ManualClock::new(START));
    let store = place.open(clock.clone()).await;
    subscribed_and_charged(&store).await;
    let boundary = START.plus_seconds(30 * 24 * 3600).unwrap();
    let later = START.plus_seconds(30 * 24 * 3600 + 60).unwrap();
    // The follower's clock runs ahead of the writer's (a manual one of a
    // server would start at the writer's instant, which the database
    // records): here one stopped at `later`.
    let (reader, expected, as_of) = match place.open_follower(Arc::new(Stopped(later))) {
        Some(follower) => (follower, "70", Timestamp(boundary.micros() - 1)),
        None => {
            clock.advance_to(later);
            (store.clone(), "100", later)
        }
    };
    let view = reader.balance(id("c")).await.unwrap().unwrap();
    assert_eq!(
        view.balance.available,
        amount(expected),
        "{:?}",
        view.balance
    );
    assert_eq!(view.now, as_of);
}

/// A tick writes about a group's worth of renewals and leaves the customers
/// still due to the next tick, so that commands queued behind it go between
/// (a charge waited 8.2 s behind one step renewing a year of daily plans on
/// PostgreSQL). Every renewal still happens, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_renews_a_groups_worth_and_leaves_the_rest_to_the_next() {
    const CUSTOMERS: usize = 20;
    const DAYS: i64 = 40;
    let place = TestStore::new("tick_work");
    let clock = Arc::new(ManualClock::new(START));
    let store = place.open(clock.clone()).await;
    ok(
        &store,
        Command::PutPlan(Plan {
            key: "daily".into(),
            name: "Daily".into(),
            period: Period::Days(1),
            included_credits: amount("10"),
            allocation_expires_after_periods: Some(1),
            rollover: None,
            overage: None,
            upgrade_grace_days: 0,
        }),
    )
    .await;
    for n in 0..CUSTOMERS {
        let customer = id(&format!("c{n}"));
        ok(
            &store,
            Command::CreateCustomer(tally_store::NewCustomer::with_id(customer.clone())),
        )
        .await;
        ok(
            &store,
            Command::Subscribe(NewSubscription {
                id: id(&format!("sub{n}")),
                customer_id: customer,
                plan: "daily".into(),
                start_at: None,
                change: PlanChange::Now,
            }),
        )
        .await;
    }
    clock.advance_to(START.plus_seconds(DAYS * 86_400).unwrap());
    let mut ticks = Vec::new();
    loop {
        let tick = ok(&store, Command::Tick).await;
        let tally_store::Outcome::Tick { entries } = tick else {
            panic!("a tick answers a tick: {tick:?}");
        };
        if entries == 0 {
            break;
        }
        ticks.push(entries);
        assert!(ticks.len() < 50, "ticks keep working: {ticks:?}");
    }
    // A customer's 40 renewals count 120 (40 allocations, the ended ones'
    // 40 expiries, and the 40 periods renewed): a tick stops after the
    // customer that reaches 1,000, so the 2,400 take three.
    let per_customer = 3 * DAYS as usize;
    assert_eq!(
        ticks.iter().sum::<usize>(),
        CUSTOMERS * per_customer,
        "{ticks:?}"
    );
    assert!(ticks.len() >= 3, "{ticks:?}");
    for entries in &ticks {
        assert!(*entries < 1_000 + per_customer, "{ticks:?}");
    }
    // Nothing was left due once a tick did nothing: each customer is in its
    // 41st period with one allocation a period.
    for n in 0..CUSTOMERS {
        let balance = store.balance(id(&format!("c{n}"))).await.unwrap().unwrap();
        assert_eq!(balance.balance.available, amount("10"), "c{n}");
        assert_eq!(
            balance.grants.len(),
            DAYS as usize + 1,
            "c{n}: one allocation a period"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_at_once_share_the_pooled_connections() {
    let place = TestStore::new("reads");
    let store = place.open(Arc::new(ManualClock::new(START))).await;
    ok(&store, customer()).await;
    ok(&store, grant("g", "100", None)).await;
    ok(&store, charge("ch", "1.5")).await;

    // 64 callers, 25 balance reads each, all at once.
    const CALLERS: usize = 64;
    const READS: usize = 25;
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..CALLERS {
        let store = store.clone();
        callers.spawn(async move {
            for _ in 0..READS {
                let view = store
                    .balance(id("c"))
                    .await
                    .expect("read")
                    .expect("customer");
                assert_eq!(view.balance.available, amount("98.5"));
            }
        });
    }
    while let Some(done) = callers.join_next().await {
        done.expect("a caller");
    }
    let opened = store.read_connections_opened();
    eprintln!("{} reads opened {opened} read connections", CALLERS * READS);
    assert!(
        (1..=16).contains(&opened),
        "{} reads at once opened {opened} read connections; at most 16 may run at once",
        CALLERS
    );
}

/// A void of a lot the core made earlier in the same write group (here a
/// transfer's lot) finds it: such a lot's row is written with the group, so
/// the look-up by id found no row and answered 404. On PostgreSQL a lock
/// holds the writer's group before them, so that the transfer and the void
/// queue into one group behind it; the embedded store has no such lever,
/// and there they may go in two groups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_void_finds_a_lot_made_earlier_in_its_group() {
    let place = TestStore::new("void_in_group");
    let store = place.open(Arc::new(ManualClock::new(START))).await;
    ok(&store, customer()).await;
    ok(
        &store,
        Command::CreateCustomer(tally_store::NewCustomer::with_id(id("d"))),
    )
    .await;
    ok(&store, grant("bought", "100", None)).await;
    let lock = place.lock_for("grant_balances", std::time::Duration::from_millis(300));
    // Held by the lock (on PostgreSQL) while the next two queue behind it.
    let first = store.submit(charge("ch", "1"), None).await.unwrap();
    let transfer = store
        .submit(
            Command::Transfer(tally_store::NewTransfer {
                id: id("t1"),
                from_customer: id("c"),
                from_member: None,
                to_customer: id("d"),
                to_member: None,
                amount: amount("40"),
                reason: None,
            }),
            None,
        )
        .await
        .unwrap();
    let void = store
        .submit(
            Command::Void {
                id: id("v1"),
                grant_id: id("transfer:t1:0"),
                reason: "unused".into(),
            },
            None,
        )
        .await
        .unwrap();
    for pending in [first, transfer] {
        pending.answer().await.unwrap().result.expect("applied");
    }
    let voided = void.answer().await.expect("store answers").result;
    match voided {
        Ok(tally_store::Outcome::Void(v)) => assert_eq!(v.voided, amount("40")),
        other => panic!("the void of the transfer's lot: {other:?}"),
    }
    if let Some(lock) = lock {
        lock.join().expect("the lock holder");
    }
    let d = store.balance(id("d")).await.unwrap().unwrap();
    assert_eq!(d.balance.available, amount("0"));
}
