//! A write group that fails is rolled back whole, and so is every group the
//! writer applied on top of it before it knew (on PostgreSQL a large group's
//! commit is sent ahead while the next group is applied): their callers get
//! `unavailable`, nothing of them stays, and a retry with the same id charges
//! once. What was acknowledged stays, and a reopened store agrees.

use std::sync::Arc;

mod common;
use common::TestStore;

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
    // ahead; its poisoned row fails only after 2 s, while a second wave,
    // sent 1 s after the first, is applied on top of it.
    let poisoned = CHARGES + CHARGES / 2 - 1;
    place.tamper(
        &format!(
            "CREATE TRIGGER injected BEFORE INSERT ON operations \
             WHEN NEW.id = 'ch_{poisoned}' \
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END;"
        ),
        &format!(
            "CREATE FUNCTION injected() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_sleep(2); RAISE EXCEPTION 'injected failure'; END $$; \
             CREATE TRIGGER injected BEFORE INSERT ON operations FOR EACH ROW \
             WHEN (NEW.id = 'ch_{poisoned}') EXECUTE FUNCTION injected();"
        ),
    );
    let lock = place.lock_for("grant_balances", std::time::Duration::from_millis(300));
    let mut tasks = send_all(&store, CHARGES..poisoned + 1);
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    tasks.extend(send_all(&store, poisoned + 1..2 * CHARGES));
    let (mut failed, mut failed_later) = (0, 0);
    for (n, answer) in answers(tasks).await.into_iter().enumerate() {
        match answer {
            Ok(executed) if CHARGES + n != poisoned => {
                executed.result.expect("not refused");
            }
            Err(StoreError::Unavailable(_)) => {
                failed += 1;
                failed_later += usize::from(CHARGES + n > poisoned);
            }
            other => panic!("charge {}: {other:?}", CHARGES + n),
        }
    }
    assert!(failed >= 1, "the poisoned charge's group failed");
    if let Some(lock) = lock {
        lock.join().expect("the lock holder");
        assert!(
            failed_later >= 1,
            "a group of the second wave was applied on top of the failed one and failed with it \
             ({failed} failed)"
        );
    }
    let after_failure = Amount::parse(&format!("{}", 998_000 - (CHARGES - failed))).unwrap();
    assert_eq!(
        available(&store).await,
        after_failure,
        "only the acknowledged charges are read back"
    );

    // Repaired: the failed ids charge now, once; the earlier ones replay.
    place.tamper(
        "DROP TRIGGER injected;",
        "DROP TRIGGER injected ON operations; DROP FUNCTION injected();",
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
