//! The core's property test, run through the store: random sequences of
//! grants, charges, holds, captures, releases, refunds, voids, expiry changes,
//! clock steps, retries, conflicting reuses of ids and restarts, sent as
//! commands to a real store (the embedded one, or PostgreSQL with
//! `TALLY_TEST_DATABASE=postgres`) over two customers.
//!
//! After every step, for each customer, from what the store has written:
//! - conservation: replaying every journal posting gives each lot's stored
//!   remaining and the balance's held credits, and the available balance is
//!   the remaining of the lots in effect;
//! - every lot's remaining is within `[0, amount]`, and an expired or voided
//!   lot has nothing left;
//! - no overspend: the available balance never falls below zero, and a
//!   charge or hold succeeds exactly when it fits in what was available;
//! - a refused command changes nothing;
//! - the reference model: what was granted (sum of the grants accepted) and
//!   what was spent (charges and captures, less refunds, as requested) equal
//!   what the journal's `issued` and `consumed` accounts say;
//! - exactly once: a retry returns the original answer, marked replayed, and
//!   changes nothing; an id reused with other content is a conflict;
//! - durability: a restart shows exactly the same journal and lots.

use std::collections::BTreeMap;
use std::sync::Arc;

mod common;
use common::TestStore;

use proptest::prelude::*;
use proptest::sample::Index;
use tally_core::{Account, Amount, GrantStatus, Id, Source, Timestamp};
use tally_store::{
    Command, Executed, ManualClock, NewCharge, NewGrant, NewHold, NewRefund, Outcome, Store,
    StoreError,
};

const SECOND: i64 = 1_000_000;
const START: Timestamp = Timestamp(1_800_000_000 * SECOND);
const CUSTOMERS: [&str; 2] = ["alpha", "beta"];

fn id(text: &str) -> Id {
    Id::parse(text).expect("valid id")
}

fn micros(value: i64) -> Amount {
    Amount::from_micros(value).expect("in range")
}

#[derive(Clone, Debug)]
enum Op {
    Grant {
        customer: usize,
        micros: i64,
        expires_in_seconds: Option<i64>,
        priority: i32,
        paid: bool,
    },
    Charge {
        customer: usize,
        micros: i64,
    },
    Hold {
        customer: usize,
        micros: i64,
        timeout_seconds: i64,
    },
    /// Capture a hold placed earlier: all of it, or this many thousandths.
    Capture {
        hold: Index,
        per_mille: Option<i64>,
    },
    Release {
        hold: Index,
    },
    /// Refund a charge placed earlier: all that is left, or this many thousandths of its amount.
    Refund {
        charge: Index,
        per_mille: Option<i64>,
    },
    Void {
        grant: Index,
    },
    ChangeExpiry {
        grant: Index,
        in_seconds: Option<i64>,
    },
    Advance {
        seconds: i64,
    },
    /// Send an earlier command again with its id: the same answer, nothing changes.
    Retry {
        command: Index,
    },
    /// An earlier charge's id with another amount: a conflict, nothing changes.
    Conflict {
        charge: Index,
    },
    Restart,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let customer = 0..CUSTOMERS.len();
    let amount = prop_oneof![1i64..2_000_000, 1_000_000i64..200_000_000];
    prop_oneof![
        3 => (customer.clone(), amount.clone(), proptest::option::of(1i64..600), 0i32..3, any::<bool>())
            .prop_map(|(customer, micros, expires_in_seconds, priority, paid)| Op::Grant {
                customer, micros, expires_in_seconds, priority, paid
            }),
        4 => (customer.clone(), amount.clone())
            .prop_map(|(customer, micros)| Op::Charge { customer, micros }),
        2 => (customer, amount, 1i64..300).prop_map(|(customer, micros, timeout_seconds)| {
            Op::Hold { customer, micros, timeout_seconds }
        }),
        2 => (any::<Index>(), proptest::option::of(0i64..=1200))
            .prop_map(|(hold, per_mille)| Op::Capture { hold, per_mille }),
        1 => any::<Index>().prop_map(|hold| Op::Release { hold }),
        2 => (any::<Index>(), proptest::option::of(1i64..=1200))
            .prop_map(|(charge, per_mille)| Op::Refund { charge, per_mille }),
        1 => any::<Index>().prop_map(|grant| Op::Void { grant }),
        1 => (any::<Index>(), proptest::option::of(-100i64..600))
            .prop_map(|(grant, in_seconds)| Op::ChangeExpiry { grant, in_seconds }),
        2 => (0i64..400).prop_map(|seconds| Op::Advance { seconds }),
        2 => any::<Index>().prop_map(|command| Op::Retry { command }),
        1 => any::<Index>().prop_map(|charge| Op::Conflict { charge }),
        1 => Just(Op::Restart),
    ]
}

/// What the reference model expects per customer.
#[derive(Clone, Debug, Default)]
struct Expected {
    granted: i128,
    spent: i128,
}

struct Harness {
    test_store: TestStore,
    clock: Arc<ManualClock>,
    store: Option<Store>,
    next: u64,
    /// Every command that took effect or was refused for good, with its answer.
    answered: Vec<(Command, Executed)>,
    grants: Vec<(usize, Id)>,
    /// Holds placed: customer, id, amount.
    holds: Vec<(usize, Id, i64)>,
    /// Charges made: customer, id, amount, refunded so far.
    charges: Vec<(usize, Id, i64, i64)>,
    expected: Vec<Expected>,
}

/// One customer as the store has written it: the journal and the lots.
#[derive(Debug, PartialEq)]
struct Written {
    entries: Vec<String>,
    grants: Vec<String>,
}

impl Harness {
    async fn new() -> Harness {
        let test_store = TestStore::new("model");
        let clock = Arc::new(ManualClock::new(START));
        let store = test_store.open(clock.clone()).await;
        for customer in CUSTOMERS {
            let create = Command::CreateCustomer(tally_store::NewCustomer::with_id(id(customer)));
            let executed = store.execute(create, None).await.expect("create");
            assert!(executed.result.is_ok());
        }
        Harness {
            test_store,
            clock,
            store: Some(store),
            next: 0,
            answered: Vec::new(),
            grants: Vec::new(),
            holds: Vec::new(),
            charges: Vec::new(),
            expected: vec![Expected::default(); CUSTOMERS.len()],
        }
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("open")
    }

    fn fresh_id(&mut self, prefix: &str) -> Id {
        self.next += 1;
        id(&format!("{prefix}_{}", self.next))
    }

    fn now(&self) -> Timestamp {
        self.store().now()
    }

    async fn execute(&self, command: Command) -> Result<Executed, StoreError> {
        self.store().execute(command, None).await
    }

    async fn written(&self, customer: usize) -> Written {
        let (grants, entries) = self
            .store()
            .audit(id(CUSTOMERS[customer]))
            .await
            .expect("audit");
        Written {
            entries: entries.iter().map(|e| format!("{e:?}")).collect(),
            grants: grants.iter().map(|g| format!("{g:?}")).collect(),
        }
    }

    async fn all_written(&self) -> Vec<Written> {
        let mut all = Vec::new();
        for customer in 0..CUSTOMERS.len() {
            all.push(self.written(customer).await);
        }
        all
    }

    async fn available(&self, customer: usize) -> i64 {
        let view = self
            .store()
            .balance(id(CUSTOMERS[customer]))
            .await
            .expect("balance")
            .expect("customer exists");
        view.balance.available.micros()
    }

    /// Run one command that must be answered (not an error), and keep it.
    async fn answered(&mut self, command: Command) -> Executed {
        let executed = self
            .execute(command.clone())
            .await
            .unwrap_or_else(|error| panic!("{command:?} failed: {error}"));
        assert!(!executed.replayed, "a fresh id was answered as a replay");
        self.answered.push((command, executed.clone()));
        executed
    }

    async fn step(&mut self, op: &Op) {
        let before = self.all_written().await;
        match op {
            Op::Grant {
                customer,
                micros: amount,
                expires_in_seconds,
                priority,
                paid,
            } => {
                let grant_id = self.fresh_id("g");
                let now = self.now();
                let command = Command::Grant(NewGrant {
                    id: grant_id.clone(),
                    customer_id: id(CUSTOMERS[*customer]),
                    amount: micros(*amount),
                    source: if *paid {
                        Source::Purchase
                    } else {
                        Source::Promotion
                    },
                    paid: *paid,
                    cost_basis: None,
                    priority: *priority,
                    effective_at: None,
                    expires_at: expires_in_seconds.map(|s| Timestamp(now.micros() + s * SECOND)),
                    scope: None,
                    metadata: None,
                    external_reference: None,
                    reason: None,
                });
                let executed = self.answered(command).await;
                assert!(
                    executed.result.is_ok(),
                    "grant refused: {:?}",
                    executed.result
                );
                self.expected[*customer].granted += i128::from(*amount);
                self.grants.push((*customer, grant_id));
            }
            Op::Charge {
                customer,
                micros: amount,
            } => {
                let available = self.available(*customer).await;
                let charge_id = self.fresh_id("ch");
                let command = Command::Charge(NewCharge {
                    id: charge_id.clone(),
                    customer_id: id(CUSTOMERS[*customer]),
                    amount: Some(micros(*amount)),
                    feature: None,
                    usage: None,
                    member_id: None,
                    reason: None,
                    metadata: None,
                });
                let executed = self.answered(command).await;
                match &executed.result {
                    Ok(Outcome::Charge(charge)) => {
                        assert!(*amount <= available, "charged {amount} of {available}");
                        assert_eq!(charge.amount.micros(), *amount);
                        self.expected[*customer].spent += i128::from(*amount);
                        self.charges.push((*customer, charge_id, *amount, 0));
                    }
                    Err(refusal) => {
                        assert_eq!(refusal.code, "insufficient_credits");
                        assert!(*amount > available, "refused {amount} of {available}");
                        assert_eq!(
                            self.all_written().await,
                            before,
                            "a refusal changed something"
                        );
                    }
                    other => panic!("a charge answered {other:?}"),
                }
            }
            Op::Hold {
                customer,
                micros: amount,
                timeout_seconds,
            } => {
                let available = self.available(*customer).await;
                let hold_id = self.fresh_id("h");
                let command = Command::Hold(NewHold {
                    id: hold_id.clone(),
                    customer_id: id(CUSTOMERS[*customer]),
                    amount: Some(micros(*amount)),
                    feature: None,
                    usage: None,
                    timeout_seconds: *timeout_seconds,
                    member_id: None,
                    reason: None,
                });
                let executed = self.answered(command).await;
                match &executed.result {
                    Ok(Outcome::Hold(_)) => {
                        assert!(*amount <= available, "held {amount} of {available}");
                        self.holds.push((*customer, hold_id, *amount));
                    }
                    Err(refusal) => {
                        assert_eq!(refusal.code, "insufficient_credits");
                        assert!(*amount > available, "refused {amount} of {available}");
                        assert_eq!(
                            self.all_written().await,
                            before,
                            "a refusal changed something"
                        );
                    }
                    other => panic!("a hold answered {other:?}"),
                }
            }
            Op::Capture { hold, per_mille } => {
                if self.holds.is_empty() {
                    return;
                }
                let (customer, hold_id, held) = self.holds[hold.index(self.holds.len())].clone();
                let asked = per_mille.map(|p| (i128::from(held) * i128::from(p) / 1000) as i64);
                let command = Command::Capture {
                    hold_id,
                    amount: asked.map(micros),
                    quantity: None,
                    reason: None,
                };
                match self.execute(command.clone()).await {
                    // The same capture again: the first answer, nothing changes.
                    Ok(executed) if executed.replayed => {
                        assert_eq!(
                            self.all_written().await,
                            before,
                            "a replay changed something"
                        );
                    }
                    Ok(executed) => {
                        let Ok(Outcome::Capture(capture)) = &executed.result else {
                            panic!("a capture answered {executed:?}");
                        };
                        assert_eq!(capture.captured.micros(), asked.unwrap_or(held));
                        assert_eq!(capture.captured.micros() + capture.released.micros(), held);
                        self.expected[customer].spent += i128::from(capture.captured.micros());
                        self.answered.push((command, executed));
                    }
                    // Resolved, timed out, zero or more than held: nothing changes.
                    Err(_) => {
                        assert_eq!(
                            self.all_written().await,
                            before,
                            "a refused capture changed something"
                        );
                    }
                }
            }
            Op::Release { hold } => {
                if self.holds.is_empty() {
                    return;
                }
                let (_, hold_id, held) = self.holds[hold.index(self.holds.len())].clone();
                let command = Command::Release {
                    hold_id,
                    reason: None,
                };
                match self.execute(command.clone()).await {
                    Ok(executed) if executed.replayed => {
                        assert_eq!(
                            self.all_written().await,
                            before,
                            "a replay changed something"
                        );
                    }
                    Ok(executed) => {
                        let Ok(Outcome::Release(release)) = &executed.result else {
                            panic!("a release answered {executed:?}");
                        };
                        assert_eq!(release.released.micros(), held);
                        self.answered.push((command, executed));
                    }
                    Err(_) => {
                        assert_eq!(
                            self.all_written().await,
                            before,
                            "a refused release changed something"
                        );
                    }
                }
            }
            Op::Refund { charge, per_mille } => {
                if self.charges.is_empty() {
                    return;
                }
                let at = charge.index(self.charges.len());
                let (customer, charge_id, charged, refunded) = self.charges[at].clone();
                let asked =
                    per_mille.map(|p| ((i128::from(charged) * i128::from(p) / 1000) as i64).max(1));
                let refund_id = self.fresh_id("rf");
                let command = Command::Refund(NewRefund {
                    id: refund_id,
                    charge_id: Some(charge_id),
                    hold_id: None,
                    amount: asked.map(micros),
                    reason: "model".into(),
                });
                let executed = self.answered(command).await;
                match &executed.result {
                    Ok(Outcome::Refund(refund)) => {
                        let left = charged - refunded;
                        assert!(left > 0, "refunded a charge with nothing left");
                        assert_eq!(refund.amount.micros(), asked.unwrap_or(left));
                        self.expected[customer].spent -= i128::from(refund.amount.micros());
                        self.charges[at].3 += refund.amount.micros();
                    }
                    Err(refusal) => {
                        assert_eq!(refusal.code, "refund_exceeds_charge", "{refusal:?}");
                        assert!(asked.unwrap_or(0) > charged - refunded || charged == refunded);
                        assert_eq!(
                            self.all_written().await,
                            before,
                            "a refusal changed something"
                        );
                    }
                    other => panic!("a refund answered {other:?}"),
                }
            }
            Op::Void { grant } => {
                if self.grants.is_empty() {
                    return;
                }
                let (_, grant_id) = self.grants[grant.index(self.grants.len())].clone();
                let void_id = self.fresh_id("v");
                let command = Command::Void {
                    id: void_id,
                    grant_id,
                    reason: "model".into(),
                };
                let executed = self.answered(command).await;
                if executed.result.is_err() {
                    assert_eq!(
                        self.all_written().await,
                        before,
                        "a refusal changed something"
                    );
                }
            }
            Op::ChangeExpiry { grant, in_seconds } => {
                if self.grants.is_empty() {
                    return;
                }
                let (_, grant_id) = self.grants[grant.index(self.grants.len())].clone();
                let now = self.now();
                let change_id = self.fresh_id("x");
                let command = Command::ChangeExpiry {
                    id: change_id,
                    grant_id,
                    expires_at: in_seconds.map(|s| Timestamp(now.micros() + s * SECOND)),
                    reason: "model".into(),
                };
                let executed = self.answered(command).await;
                if executed.result.is_err() {
                    assert_eq!(
                        self.all_written().await,
                        before,
                        "a refusal changed something"
                    );
                }
            }
            Op::Advance { seconds } => {
                let to = Timestamp(self.now().micros() + seconds * SECOND);
                self.clock.advance_to(to);
                let executed = self.execute(Command::Tick).await.expect("tick");
                assert!(executed.result.is_ok());
            }
            Op::Retry { command } => {
                if self.answered.is_empty() {
                    return;
                }
                let (command, first) = self.answered[command.index(self.answered.len())].clone();
                let again = self
                    .execute(command.clone())
                    .await
                    .unwrap_or_else(|error| panic!("retry of {command:?} failed: {error}"));
                assert!(again.replayed, "a retry was not a replay");
                assert_eq!(again.result, first.result, "a retry answered differently");
                assert_eq!(
                    self.all_written().await,
                    before,
                    "a retry changed something"
                );
            }
            Op::Conflict { charge } => {
                if self.charges.is_empty() {
                    return;
                }
                let (customer, charge_id, charged, _) =
                    self.charges[charge.index(self.charges.len())].clone();
                let command = Command::Charge(NewCharge {
                    id: charge_id,
                    customer_id: id(CUSTOMERS[customer]),
                    amount: Some(micros(charged + 1)),
                    feature: None,
                    usage: None,
                    member_id: None,
                    reason: None,
                    metadata: None,
                });
                let error = self
                    .execute(command)
                    .await
                    .expect_err("a reused id with other content");
                assert!(
                    matches!(error, StoreError::IdempotencyConflict(_)),
                    "{error:?}"
                );
                assert_eq!(
                    self.all_written().await,
                    before,
                    "a conflict changed something"
                );
            }
            Op::Restart => {
                drop(self.store.take());
                self.store = Some(self.test_store.open(self.clock.clone()).await);
                assert_eq!(
                    self.all_written().await,
                    before,
                    "a restart changed the written state"
                );
            }
        }
    }

    /// The invariants, from what the store has written (after a tick, so
    /// that nothing due is left unswept).
    async fn check(&self) {
        let executed = self.execute(Command::Tick).await.expect("tick");
        assert!(executed.result.is_ok());
        let now = self.now();
        for (customer, name) in CUSTOMERS.iter().enumerate() {
            let view = self
                .store()
                .balance(id(name))
                .await
                .expect("balance")
                .expect("exists");
            let (grants, entries) = self.store().audit(id(name)).await.expect("audit");
            let mut accounts: BTreeMap<String, i128> = BTreeMap::new();
            for entry in &entries {
                for posting in &entry.draft.postings {
                    let amount = i128::from(posting.amount.micros());
                    assert!(amount > 0, "a posting of {amount}");
                    *accounts.entry(posting.from.to_string()).or_default() -= amount;
                    *accounts.entry(posting.to.to_string()).or_default() += amount;
                }
            }
            let mut in_effect: i128 = 0;
            for record in &grants {
                let grant = &record.grant;
                let remaining = grant.remaining.micros();
                assert!(
                    (0..=grant.amount.micros()).contains(&remaining),
                    "lot {} remaining {remaining} of {}",
                    grant.id,
                    grant.amount
                );
                if grant.status != GrantStatus::Active {
                    assert_eq!(
                        remaining, 0,
                        "lot {} is {:?} with credits",
                        grant.id, grant.status
                    );
                }
                if let Some(expires_at) = grant.expires_at {
                    if expires_at <= now {
                        assert_eq!(remaining, 0, "lot {} expired with credits", grant.id);
                    }
                }
                let account = Account::Grant(grant.id.clone()).to_string();
                assert_eq!(
                    accounts.get(&account).copied().unwrap_or(0),
                    i128::from(remaining),
                    "the journal and lot {} disagree",
                    grant.id
                );
                if grant.status == GrantStatus::Active && grant.effective_at <= now {
                    in_effect += i128::from(remaining);
                }
            }
            let held: i128 = accounts
                .iter()
                .filter(|(account, _)| account.starts_with("hold:"))
                .map(|(_, balance)| *balance)
                .sum();
            assert_eq!(held, i128::from(view.balance.held.micros()), "held credits");
            assert_eq!(
                in_effect,
                i128::from(view.balance.available.micros()),
                "available"
            );
            assert!(view.balance.available.micros() >= 0, "overspent");
            if let Some(last) = entries.iter().max_by_key(|e| e.sequence) {
                assert_eq!(
                    last.draft.balance_after, view.balance.available,
                    "balance after"
                );
            }
            let issued: i128 = accounts
                .iter()
                .filter(|(account, _)| account.starts_with("issued:"))
                .map(|(_, balance)| -*balance)
                .sum();
            let consumed: i128 = accounts
                .iter()
                .filter(|(account, _)| account.starts_with("consumed"))
                .map(|(_, balance)| *balance)
                .sum();
            // Refunded credits come back from `consumed`, never from `issued`.
            assert_eq!(issued, self.expected[customer].granted, "granted credits");
            assert_eq!(consumed, self.expected[customer].spent, "spent credits");
        }
    }
}

fn run(ops: Vec<Op>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut harness = Harness::new().await;
        for op in &ops {
            harness.step(op).await;
            harness.check().await;
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(96), ..ProptestConfig::default() })]

    #[test]
    fn the_store_keeps_the_invariants_of_the_core(ops in proptest::collection::vec(op_strategy(), 1..40)) {
        run(ops);
    }
}
