//! A write group that fails is rolled back whole, and so is every group the
//! writer applied on top of it before it knew (on PostgreSQL a large group's
//! commit is sent ahead while the next group is applied). Their commands are
//! then applied again in smaller groups, so that only the command the
//! database refuses fails (`unavailable`), and the others are charged once.
//! Nothing of the failed command stays, and a retry with its id charges once
//! the fault is gone. What was acknowledged stays, and a reopened store
//! agrees. A tick that fails because of one customer still expires every
//! other customer's credits, and that customer's once the fault is gone.

use std::sync::Arc;

mod common;
use common::TestStore;

use tally_core::Clock;
use tally_core::{Amount, Id, Source, Timestamp};
use tally_store::{
    Command, LedgerQuery, ManualClock, NewCharge, NewCustomer, NewGrant, Store, StoreError,
};

const START: Timestamp = Timestamp(1_800_000_000_000_000);
/// Charges per phase: enough that the writer builds groups of hundreds (sent
/// ahead on PostgreSQL) with more waiting behind them.
const CHARGES: usize = 2_000;

fn id(text: &str) -> Id {
    Id::parse(text).unwrap()
}

fn charge(n: usize) -> Command {
    Command::Charge(NewCharge {
        id: id(&format!("ch_{n}")),
        customer_id: id("c"),
        amount: Some(Amount::parse("1").unwrap()),
        feature: None,
        usage: None,
        member_id: None,
        reason: None,
        metadata: None,
    })
}

type Answer = Result<tally_store::Executed, StoreError>;

/// Send charges `range` at once.
fn send_all(store: &Store, range: std::ops::Range<usize>) -> Vec<tokio::task::JoinHandle<Answer>> {
    range
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move { store.execute(charge(n), None).await })
        })
        .collect()
}

/// Send charges `range` at once; each one's answer, in order.
async fn charge_all(store: &Store, range: std::ops::Range<usize>) -> Vec<Answer> {
    answers(send_all(store, range)).await
}

async fn answers(tasks: Vec<tokio::task::JoinHandle<Answer>>) -> Vec<Answer> {
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("task"));
    }
    answers
}

async fn available(store: &Store) -> Amount {
    store
        .balance(id("c"))
        .await
        .expect("balance")
        .expect("customer c")
        .balance
        .available
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_group_and_the_groups_on_top_of_it_leave_nothing() {
    let place = TestStore::new("failed_groups");
    let clock = Arc::new(ManualClock::new(START));
    let store = place.open(clock.clone()).await;
    store
        .execute(Command::CreateCustomer(NewCustomer::with_id(id("c"))), None)
        .await
        .unwrap()
        .result
        .unwrap();
    store
        .execute(
            Command::Grant(NewGrant {
                id: id("g"),
                customer_id: id("c"),
                amount: Amount::parse("1000000").unwrap(),
                source: Source::Purchase,
                paid: true,
                cost_basis: None,
                priority: 0,
                effective_at: None,
                expires_at: None,
                scope: None,
                metadata: None,
                external_reference: None,
                reason: None,
            }),
            None,
        )
        .await
        .unwrap()
        .result
        .unwrap();

    // Acknowledged before the failure.
    for answer in charge_all(&store, 0..CHARGES).await {
        answer.expect("charged").result.expect("not refused");
    }
    assert_eq!(available(&store).await, Amount::parse("998000").unwrap());

    // One charge's operation row cannot be written: its group fails, and
    // so must every group applied on top of it before the writer knew. On
    // PostgreSQL: a lock on the balance rows holds the writer's first group
    // of the first wave for 300 ms, so the rest of the wave (the poisoned
    // charge last) piles up into one group of hundreds, which is sent
    // ahead; its poisoned row fails only after 2 s (the first time), while a
    // second wave, sent 1 s after the first, is applied on top of it.
    let poisoned = CHARGES + CHARGES / 2 - 1;
    place.tamper(
        &format!(
            "CREATE TRIGGER injected BEFORE INSERT ON operations \
             WHEN NEW.id = 'ch_{poisoned}' \
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END;"
        ),
        &format!(
            "CREATE SEQUENCE injected_calls; \
             CREATE FUNCTION injected() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN IF nextval('injected_calls') = 1 THEN PERFORM pg_sleep(2); END IF; \
             RAISE EXCEPTION 'injected failure'; END $$; \
             CREATE TRIGGER injected BEFORE INSERT ON operations FOR EACH ROW \
             WHEN (NEW.id = 'ch_{poisoned}') EXECUTE FUNCTION injected();"
        ),
    );
    let lock = place.lock_for("grant_balances", std::time::Duration::from_millis(300));
    let mut tasks = send_all(&store, CHARGES..poisoned + 1);
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    tasks.extend(send_all(&store, poisoned + 1..2 * CHARGES));
    let mut failed = Vec::new();
    for (n, answer) in answers(tasks).await.into_iter().enumerate() {
        match answer {
            Ok(executed) => {
                executed.result.expect("not refused");
            }
            Err(StoreError::Unavailable(_)) => failed.push(CHARGES + n),
            other => panic!("charge {}: {other:?}", CHARGES + n),
        }
    }
    assert_eq!(failed, [poisoned], "only the poisoned charge failed");
    let failures = store.write_failures();
    assert_eq!(failures.commands, 1, "{failures:?}");
    if let Some(lock) = lock {
        lock.join().expect("the lock holder");
        assert!(
            failures.groups >= 2,
            "a group of the second wave was applied on top of the failed one and failed with it \
             ({failures:?})"
        );
    } else {
        assert!(failures.groups >= 1, "{failures:?}");
    }
    let failed = failed.len();
    let after_failure = Amount::parse(&format!("{}", 998_000 - (CHARGES - failed))).unwrap();
    assert_eq!(
        available(&store).await,
        after_failure,
        "only the acknowledged charges are read back"
    );

    // Repaired: the failed ids charge now, once; the earlier ones replay.
    place.tamper(
        "DROP TRIGGER injected;",
        "DROP TRIGGER injected ON operations; DROP FUNCTION injected(); DROP SEQUENCE injected_calls;",
    );
    let mut fresh = 0;
    for answer in charge_all(&store, CHARGES..2 * CHARGES).await {
        let executed = answer.expect("charged after the repair");
        fresh += usize::from(!executed.replayed);
        executed.result.expect("not refused");
    }
    assert_eq!(fresh, failed, "exactly the failed ids were never stored");
    for answer in charge_all(&store, 0..CHARGES).await {
        assert!(answer.expect("replayed").replayed);
    }
    assert_eq!(available(&store).await, Amount::parse("996000").unwrap());

    // What the database holds agrees.
    drop(store);
    let store = place.open(clock).await;
    assert_eq!(available(&store).await, Amount::parse("996000").unwrap());
    let history = store
        .ledger(
            id("c"),
            LedgerQuery {
                limit: 10_000,
                ..LedgerQuery::default()
            },
        )
        .await
        .expect("history")
        .expect("customer c");
    assert_eq!(
        history.entries.len(),
        1 + 2 * CHARGES,
        "a grant and every charge once"
    );
}

fn customer_named(name: &str) -> Command {
    Command::CreateCustomer(NewCustomer::with_id(id(name)))
}

fn expiring_grant(grant_id: &str, customer: &str, expires_at: Timestamp) -> Command {
    Command::Grant(NewGrant {
        id: id(grant_id),
        customer_id: id(customer),
        amount: Amount::parse("100").unwrap(),
        source: Source::Purchase,
        paid: true,
        cost_basis: None,
        priority: 0,
        effective_at: None,
        expires_at: Some(expires_at),
        scope: None,
        metadata: None,
        external_reference: None,
        reason: None,
    })
}

/// Customers `names`, each with a lot `g_<name>` of 100 expiring at `expires_at`.
async fn with_expiring_grants(store: &Store, names: &[impl AsRef<str>], expires_at: Timestamp) {
    for name in names {
        let name = name.as_ref();
        for command in [
            customer_named(name),
            expiring_grant(&format!("g_{name}"), name, expires_at),
        ] {
            store.execute(command, None).await.unwrap().result.unwrap();
        }
    }
}

fn advance(clock: &ManualClock, micros: i64) {
    clock.advance_to(Timestamp(clock.now().micros() + micros));
}

async fn tick(store: &Store) -> usize {
    match store
        .execute(Command::Tick, None)
        .await
        .expect("tick answers")
        .result
    {
        Ok(tally_store::Outcome::Tick { entries }) => entries,
        other => panic!("tick: {other:?}"),
    }
}

/// The kinds of `customer`'s ledger entries, oldest first.
async fn kinds(store: &Store, customer: &str) -> Vec<String> {
    let history = store
        .ledger(
            id(customer),
            LedgerQuery {
                limit: 100,
                ..LedgerQuery::default()
            },
        )
        .await
        .expect("history")
        .expect("the customer");
    history
        .entries
        .iter()
        .rev()
        .map(|entry| entry.draft.kind.as_str().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_whose_expiry_cannot_be_written_does_not_stop_the_others() {
    const MINUTE: i64 = 60_000_000;
    let place = TestStore::new("failed_ticks");
    let clock = Arc::new(ManualClock::new(START));
    let store = place.open(clock.clone()).await;
    let expires_at = Timestamp(START.micros() + 60 * MINUTE);
    with_expiring_grants(&store, &["a", "p", "z"], expires_at).await;
    // Nothing of customer p's can be written any more.
    place.tamper(
        "CREATE TRIGGER injected BEFORE INSERT ON entries WHEN NEW.customer_id = 'p' \
         BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
        "CREATE FUNCTION injected() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$; \
         CREATE TRIGGER injected BEFORE INSERT ON entries FOR EACH ROW \
         WHEN (NEW.customer_id = 'p') EXECUTE FUNCTION injected();",
    );

    advance(&clock, 61 * MINUTE);
    tick(&store).await;
    assert_eq!(kinds(&store, "a").await, ["grant", "expire"]);
    assert_eq!(kinds(&store, "z").await, ["grant", "expire"]);
    assert_eq!(kinds(&store, "p").await, ["grant"], "p's expiry failed");
    let failures = store.write_failures();
    assert_eq!(failures.quarantined, 1, "{failures:?}");
    assert_eq!(
        failures.commands, 0,
        "the tick itself answered: {failures:?}"
    );
    let failed_groups = failures.groups;
    assert!(failed_groups >= 1, "{failures:?}");

    // Later ticks leave p out: nothing fails again, and other work goes on.
    store
        .execute(
            expiring_grant("g_a2", "a", Timestamp(clock.now().micros() + MINUTE)),
            None,
        )
        .await
        .unwrap()
        .result
        .unwrap();
    advance(&clock, 2 * MINUTE);
    assert_eq!(tick(&store).await, 1, "a's second lot expired");
    assert_eq!(tick(&store).await, 0);
    assert_eq!(store.write_failures().groups, failed_groups);
    assert_eq!(
        kinds(&store, "a").await,
        ["grant", "expire", "grant", "expire"]
    );

    // Repaired: p is tried again once its ten minutes are over.
    place.tamper(
        "DROP TRIGGER injected;",
        "DROP TRIGGER injected ON entries; DROP FUNCTION injected();",
    );
    advance(&clock, 5 * MINUTE);
    tick(&store).await;
    assert_eq!(kinds(&store, "p").await, ["grant"], "still left out");
    advance(&clock, 5 * MINUTE);
    tick(&store).await;
    assert_eq!(kinds(&store, "p").await, ["grant", "expire"]);
    assert_eq!(store.write_failures().quarantined, 0);
    assert_eq!(store.write_failures().groups, failed_groups);

    // What the database holds agrees.
    drop(store);
    let store = place.open(clock).await;
    assert_eq!(kinds(&store, "p").await, ["grant", "expire"]);
    assert_eq!(
        kinds(&store, "a").await,
        ["grant", "expire", "grant", "expire"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_of_every_command_fails_each_one_once_and_nothing_stays() {
    let place = TestStore::new("failed_everything");
    let clock = Arc::new(ManualClock::new(START));
    let store = place.open(clock.clone()).await;
    with_expiring_grants(&store, &["c"], Timestamp(START.micros() + (1 << 40))).await;
    // No charge can be written: not one poisoned command but a broken table.
    place.tamper(
        "CREATE TRIGGER injected BEFORE INSERT ON operations WHEN NEW.id LIKE 'ch_%' \
         BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
        "CREATE SEQUENCE injected_calls; \
         CREATE FUNCTION injected() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM nextval('injected_calls'); RAISE EXCEPTION 'injected failure'; END $$; \
         CREATE TRIGGER injected BEFORE INSERT ON operations FOR EACH ROW \
         WHEN (NEW.id LIKE 'ch_%') EXECUTE FUNCTION injected();",
    );
    let answers = charge_all(&store, 0..100).await;
    for (n, answer) in answers.into_iter().enumerate() {
        assert!(
            matches!(answer, Err(StoreError::Unavailable(_))),
            "charge {n}: {answer:?}"
        );
    }
    let failures = store.write_failures();
    assert_eq!(failures.commands, 100);
    assert_eq!(available(&store).await, Amount::parse("100").unwrap());
    // PostgreSQL counts the attempts (a sequence is not rolled back): once
    // three commands failed by themselves with nothing committed, the rest
    // were answered at once, not halved down to one command each (which
    // takes about two attempts a command).
    if let Some(attempts) = place.count("SELECT last_value FROM injected_calls") {
        assert!(
            attempts < 100 + 3 * failures.groups as i64 + 20,
            "{attempts} attempts for 100 charges in {failures:?}"
        );
        eprintln!("{attempts} attempts for 100 charges in {failures:?}");
    }

    // Repaired: each charges once.
    place.tamper(
        "DROP TRIGGER injected;",
        "DROP TRIGGER injected ON operations; DROP FUNCTION injected(); DROP SEQUENCE injected_calls;",
    );
    for answer in charge_all(&store, 0..100).await {
        let executed = answer.expect("charged after the repair");
        assert!(!executed.replayed);
        executed.result.expect("not refused");
    }
    assert_eq!(available(&store).await, Amount::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_that_fails_for_everyone_leaves_nobody_out() {
    const MINUTE: i64 = 60_000_000;
    let place = TestStore::new("failed_ticks_everyone");
    let clock = Arc::new(ManualClock::new(START));
    let store = place.open(clock.clone()).await;
    let expires_at = Timestamp(START.micros() + 60 * MINUTE);
    let names: Vec<String> = (0..20).map(|n| format!("c{n:02}")).collect();
    with_expiring_grants(&store, &names, expires_at).await;
    // No entry can be written for anyone: the fault is the store's.
    place.tamper(
        "CREATE TRIGGER injected BEFORE INSERT ON entries \
         BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
        "CREATE FUNCTION injected() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$; \
         CREATE TRIGGER injected BEFORE INSERT ON entries FOR EACH ROW \
         EXECUTE FUNCTION injected();",
    );
    advance(&clock, 61 * MINUTE);
    let answer = store.execute(Command::Tick, None).await;
    assert!(
        matches!(answer, Err(StoreError::Unavailable(_))),
        "{answer:?}"
    );
    let failures = store.write_failures();
    assert_eq!(failures.quarantined, 0, "nobody is blamed: {failures:?}");
    assert_eq!(failures.commands, 1, "the tick: {failures:?}");

    place.tamper(
        "DROP TRIGGER injected;",
        "DROP TRIGGER injected ON entries; DROP FUNCTION injected();",
    );
    assert_eq!(tick(&store).await, 20);
    for name in &names {
        assert_eq!(kinds(&store, name).await, ["grant", "expire"], "{name}");
    }
}
