//! Overage policies: scenarios for each policy, and a property test that runs
//! random grants, charges (synchronous and metered), holds, captures,
//! releases, refunds and clock steps under a random policy, checking after
//! every step that the postings add up to the state (the debt account is
//! exactly minus the debt), that debt never passes the policy's limit, that a
//! refused operation changes nothing, that a spend moves the balance by its
//! cost, and that no credit available to every feature sits unspent while the
//! customer owes.

use std::collections::HashMap;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::FileFailurePersistence;
use tally_core::{
    Account, Amount, ChargeRecord, CustomerLedger, Draw, EntryDraft, EntryKind, Grant, GrantStatus,
    Id, LedgerError, OveragePolicy, Posting, Source, Spend, Timestamp,
};

const SECOND: i64 = 1_000_000;
const DAY: i64 = 86_400 * SECOND;
const START: i64 = 1_700_000_000 * SECOND;

fn credits(units: i64) -> Amount {
    Amount::from_units(units).unwrap()
}

fn id(text: &str) -> Id {
    Id::parse(text).unwrap()
}

struct Customer {
    ledger: CustomerLedger,
    now: i64,
    journal: Vec<EntryDraft>,
    next_sequence: i64,
}

impl Customer {
    fn new(policy: OveragePolicy) -> Customer {
        let mut ledger = CustomerLedger::new(id("cus"));
        ledger.set_overage(policy);
        Customer {
            ledger,
            now: START,
            journal: Vec::new(),
            next_sequence: 1,
        }
    }

    fn tick(&mut self, micros: i64) -> Timestamp {
        self.now += micros;
        let now = Timestamp(self.now);
        let due = self.ledger.expire_due(now);
        self.journal.extend(due);
        now
    }

    fn grant(
        &mut self,
        name: &str,
        amount: Amount,
        starts_in: i64,
        expires_in: Option<i64>,
        scope: Option<&str>,
    ) -> Result<EntryDraft, LedgerError> {
        let now = self.tick(0);
        let grant = Grant {
            id: id(name),
            customer_id: id("cus"),
            amount,
            remaining: amount,
            source: Source::Purchase,
            paid: true,
            cost_basis: None,
            priority: 0,
            effective_at: Timestamp(self.now + starts_in),
            expires_at: expires_in.map(|e| Timestamp(self.now + e)),
            scope: scope.map(|s| vec![s.to_string()]),
            status: GrantStatus::Active,
            expired_amount: Amount::ZERO,
            expired_at: None,
            sequence: self.next_sequence,
            awaiting_effect: false,
            origin: None,
        };
        self.next_sequence += 1;
        let entry = self.ledger.add_grant(grant, None, now)?;
        self.journal.push(entry.clone());
        Ok(entry)
    }

    fn spend(name: &str, amount: Amount, feature: Option<&str>) -> Spend {
        Spend {
            reference: id(name),
            amount,
            feature: feature.map(str::to_string),
            member_id: None,
            reason: None,
        }
    }

    fn charge(
        &mut self,
        name: &str,
        amount: Amount,
        feature: Option<&str>,
        metered: bool,
    ) -> Result<ChargeRecord, LedgerError> {
        let now = self.tick(0);
        let spend = Customer::spend(name, amount, feature);
        let (drawn, entry) = if metered {
            self.ledger.charge_metered(&spend, now)?
        } else {
            self.ledger.charge(&spend, now)?
        };
        let on_debt = entry.debt_drawn();
        self.journal.push(entry);
        Ok(ChargeRecord {
            reference: spend.reference,
            customer_id: id("cus"),
            amount,
            drawn,
            refunded: Amount::ZERO,
            feature: spend.feature,
            on_debt,
        })
    }

    fn hold(&mut self, name: &str, amount: Amount) -> Result<EntryDraft, LedgerError> {
        let now = self.tick(0);
        let spend = Customer::spend(name, amount, None);
        let (_, entry) = self
            .ledger
            .place_hold(&spend, Timestamp(self.now + 60 * SECOND), now)?;
        self.journal.push(entry.clone());
        Ok(entry)
    }

    fn capture(&mut self, name: &str, amount: Option<Amount>) -> Result<ChargeRecord, LedgerError> {
        let now = self.tick(0);
        let (captured, entry) = self.ledger.capture(&id(name), amount, None, now)?;
        let on_debt = entry.debt_drawn();
        self.journal.push(entry);
        Ok(ChargeRecord {
            reference: id(name),
            customer_id: id("cus"),
            amount: captured.captured,
            drawn: captured.drawn,
            refunded: Amount::ZERO,
            feature: None,
            on_debt,
        })
    }

    fn refund(
        &mut self,
        record: &ChargeRecord,
        name: &str,
        amount: Option<Amount>,
    ) -> Result<EntryDraft, LedgerError> {
        let now = self.tick(0);
        let (_, entry) = self.ledger.refund(
            record,
            &id(name),
            amount,
            None,
            &mut self.next_sequence,
            now,
        )?;
        self.journal.push(entry.clone());
        Ok(entry)
    }

    fn net(&self) -> Amount {
        let balance = self.ledger.balance(Timestamp(self.now));
        balance.available.checked_sub(balance.debt).unwrap()
    }

    /// Every account's balance from the postings of the journal.
    fn accounts(&self) -> HashMap<Account, i64> {
        let mut accounts: HashMap<Account, i64> = HashMap::new();
        for Posting { from, to, amount } in self.journal.iter().flat_map(|e| &e.postings) {
            *accounts.entry(from.clone()).or_default() -= amount.micros();
            *accounts.entry(to.clone()).or_default() += amount.micros();
        }
        accounts
    }

    fn check(&self) {
        let now = Timestamp(self.now);
        self.ledger.check_invariants_at(now).unwrap();
        let accounts = self.accounts();
        let debt = self.ledger.debt();
        assert_eq!(
            accounts.get(&Account::Debt).copied().unwrap_or(0),
            -debt.micros(),
            "the debt account is minus the debt"
        );
        for grant in self.ledger.grants() {
            // In `pending:` until it takes effect, in `grant:` after.
            let in_lot = accounts
                .get(&Account::Grant(grant.id.clone()))
                .copied()
                .unwrap_or(0);
            let pending = accounts
                .get(&Account::Pending(grant.id.clone()))
                .copied()
                .unwrap_or(0);
            let (posted, other) = if grant.awaiting_effect {
                (pending, in_lot)
            } else {
                (in_lot, pending)
            };
            assert_eq!(
                other, 0,
                "grant {}: the other account of its credits",
                grant.id
            );
            if grant.status == GrantStatus::Active {
                assert_eq!(posted, grant.remaining.micros(), "grant {}", grant.id);
            }
        }
        for hold in self.ledger.active_holds() {
            let posted = accounts
                .get(&Account::Hold(hold.id.clone()))
                .copied()
                .unwrap_or(0);
            assert_eq!(
                posted,
                (hold.amount.checked_sub(hold.overdraft).unwrap()).micros(),
                "hold {} posts only what the credits reserved",
                hold.id
            );
        }
    }

    /// The last entry's balance_after is the balance now (valid right after
    /// an operation wrote it, which sweeps what took effect first).
    fn check_last_entry(&self) {
        if let Some(last) = self.journal.last() {
            assert_eq!(last.balance_after, self.net(), "balance_after of {last:?}");
        }
    }
}

#[test]
fn block_refuses_past_the_credits_and_changes_nothing() {
    let mut c = Customer::new(OveragePolicy::Block);
    c.grant("g1", credits(100), 0, None, None).unwrap();
    let error = c.charge("c1", credits(101), None, true).unwrap_err();
    assert_eq!(
        error,
        LedgerError::InsufficientCredits {
            available: credits(100),
            required: credits(101)
        }
    );
    assert_eq!(c.ledger.debt(), Amount::ZERO);
    assert_eq!(c.net(), credits(100));
    c.check();
}

#[test]
fn allow_negative_lends_down_to_the_limit_and_the_next_grant_repays_first() {
    let mut c = Customer::new(OveragePolicy::AllowNegative { limit: credits(50) });
    c.grant("g1", credits(100), 0, None, None).unwrap();
    let first = c.charge("c1", credits(130), Some("ai"), false).unwrap();
    assert_eq!(first.on_debt, credits(30));
    let entry = c.journal.last().unwrap().clone();
    assert_eq!(entry.balance_after, credits(-30));
    assert_eq!(
        entry.postings,
        vec![
            Posting {
                from: Account::Grant(id("g1")),
                to: Account::Consumed(Some("ai".into())),
                amount: credits(100)
            },
            Posting {
                from: Account::Debt,
                to: Account::Consumed(Some("ai".into())),
                amount: credits(30)
            },
        ]
    );
    let balance = c.ledger.balance(Timestamp(c.now));
    assert_eq!((balance.available, balance.debt), (credits(0), credits(30)));
    // 20 more fit under the limit of 50; 21 do not, and change nothing.
    assert_eq!(
        c.charge("c2", credits(21), None, false).unwrap_err(),
        LedgerError::InsufficientCredits {
            available: credits(20),
            required: credits(21)
        }
    );
    c.charge("c3", credits(20), None, false).unwrap();
    assert_eq!(c.net(), credits(-50));
    c.check();
    // The next grant repays the 50 first, in the same entry.
    c.check_last_entry();
    let grant = c.grant("g2", credits(80), 0, None, None).unwrap();
    assert_eq!(grant.balance_after, credits(30));
    assert_eq!(
        grant.postings.last().unwrap(),
        &Posting {
            from: Account::Grant(id("g2")),
            to: Account::Debt,
            amount: credits(50)
        }
    );
    assert_eq!(c.ledger.debt(), Amount::ZERO);
    c.check();
}

#[test]
fn metered_only_records_usage_into_debt_but_refuses_synchronous_spends() {
    let mut c = Customer::new(OveragePolicy::MeteredOnly { limit: None });
    c.grant("g1", credits(10), 0, None, None).unwrap();
    assert!(matches!(
        c.charge("c1", credits(11), None, false),
        Err(LedgerError::InsufficientCredits { .. })
    ));
    assert!(matches!(
        c.hold("h1", credits(11)),
        Err(LedgerError::InsufficientCredits { .. })
    ));
    let usage = c.charge("e1", credits(1_000), None, true).unwrap();
    assert_eq!(usage.on_debt, credits(990));
    assert_eq!(c.net(), credits(-990));
    // While in debt, synchronous checks say no even for a tiny amount.
    assert!(c
        .charge("c2", Amount::from_micros(1).unwrap(), None, false)
        .is_err());
    c.check();

    let mut limited = Customer::new(OveragePolicy::MeteredOnly {
        limit: Some(credits(5)),
    });
    limited.charge("e1", credits(5), None, true).unwrap();
    assert!(limited.charge("e2", credits(1), None, true).is_err());
    limited.check();
}

#[test]
fn a_hold_may_reserve_into_the_allowance_and_only_a_capture_makes_debt() {
    let mut c = Customer::new(OveragePolicy::AllowNegative { limit: credits(50) });
    c.grant("g1", credits(10), 0, None, None).unwrap();
    c.hold("h1", credits(15)).unwrap();
    assert_eq!(
        c.ledger.active_hold(&id("h1")).unwrap().overdraft,
        credits(5)
    );
    assert_eq!(c.ledger.debt(), Amount::ZERO);
    // The hold's overdraft counts against the allowance: 45 of room are left.
    assert!(c.charge("c1", credits(46), None, false).is_err());
    c.check();
    let captured = c.capture("h1", Some(credits(12))).unwrap();
    assert_eq!(captured.on_debt, credits(2));
    assert_eq!(c.ledger.debt(), credits(2));
    assert_eq!(c.net(), credits(-2));
    c.check();

    // Released or captured within the credits: no debt at all.
    c.hold("h2", credits(20)).unwrap();
    let now = c.tick(0);
    c.ledger.release(&id("h2"), None, now).unwrap();
    assert_eq!(c.ledger.debt(), credits(2));
    c.check();
}

#[test]
fn a_grant_taking_effect_later_repays_the_debt_at_its_instant() {
    let mut c = Customer::new(OveragePolicy::AllowNegative {
        limit: credits(100),
    });
    c.grant("future", credits(70), DAY, None, None).unwrap();
    c.charge("c1", credits(30), None, true).unwrap();
    assert_eq!(c.net(), credits(-30));
    c.tick(2 * DAY);
    let repaid = c
        .journal
        .iter()
        .find(|e| e.kind == EntryKind::DebtRepaid)
        .expect("a repayment entry")
        .clone();
    assert_eq!(repaid.amount, credits(30));
    assert_eq!(repaid.effective_at, Timestamp(START + DAY));
    assert_eq!(repaid.balance_after, credits(40));
    assert_eq!(c.ledger.debt(), Amount::ZERO);
    c.check();
}

#[test]
fn scoped_credits_never_repay_debt() {
    let mut c = Customer::new(OveragePolicy::AllowNegative {
        limit: credits(100),
    });
    c.charge("c1", credits(30), Some("chat"), true).unwrap();
    c.grant("images", credits(50), 0, None, Some("image"))
        .unwrap();
    assert_eq!(c.ledger.debt(), credits(30));
    // The scoped lot still pays for its feature.
    c.charge("c2", credits(10), Some("image"), false).unwrap();
    assert_eq!(
        c.ledger.grant(&id("images")).unwrap().remaining,
        credits(40)
    );
    c.check();
}

#[test]
fn refunding_an_overage_cancels_the_debt_or_returns_credits_once_repaid() {
    let mut c = Customer::new(OveragePolicy::AllowNegative {
        limit: credits(100),
    });
    c.grant("g1", credits(10), 0, None, None).unwrap();
    let charge = c.charge("c1", credits(40), None, false).unwrap();
    // The debt part (drawn last) is refunded first.
    let partial = c.refund(&charge, "r1", Some(credits(25))).unwrap();
    assert_eq!(c.ledger.debt(), credits(5));
    assert_eq!(partial.balance_after, credits(-5));
    c.check();
    let mut charge = charge;
    charge.refunded = credits(25);
    // The rest: 5 of debt cancelled, and 10 back to g1.
    c.refund(&charge, "r2", None).unwrap();
    assert_eq!(c.ledger.debt(), Amount::ZERO);
    assert_eq!(c.net(), credits(10));
    c.check();

    // Repaid before the refund: the refund gives credits back instead.
    let mut c = Customer::new(OveragePolicy::AllowNegative {
        limit: credits(100),
    });
    let charge = c.charge("c1", credits(20), None, false).unwrap();
    c.grant("g1", credits(50), 0, None, None).unwrap();
    assert_eq!(c.net(), credits(30));
    c.refund(&charge, "r1", None).unwrap();
    assert_eq!(c.net(), credits(50));
    c.check();
}

// ---------------------------------------------------------------------------
// Property test
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Grant {
        units: i64,
        starts_in: i64,
        expires_in: Option<i64>,
        scoped: bool,
    },
    Charge {
        units: i64,
        scoped: bool,
        metered: bool,
    },
    Hold {
        units: i64,
    },
    Capture {
        hold: Index,
        per_mille: Option<i64>,
    },
    Release {
        hold: Index,
    },
    Refund {
        charge: Index,
        per_mille: Option<i64>,
    },
    Advance {
        seconds: i64,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1..200i64, prop_oneof![Just(0i64), 1..3 * 86_400i64], proptest::option::of(1..5 * 86_400i64), proptest::bool::weighted(0.2))
            .prop_map(|(units, starts_in, expires_in, scoped)| Op::Grant { units, starts_in, expires_in, scoped }),
        5 => (1..150i64, proptest::bool::weighted(0.2), any::<bool>())
            .prop_map(|(units, scoped, metered)| Op::Charge { units, scoped, metered }),
        2 => (1..100i64).prop_map(|units| Op::Hold { units }),
        2 => (any::<Index>(), proptest::option::of(1..=1000i64))
            .prop_map(|(hold, per_mille)| Op::Capture { hold, per_mille }),
        1 => any::<Index>().prop_map(|hold| Op::Release { hold }),
        2 => (any::<Index>(), proptest::option::of(1..=1000i64))
            .prop_map(|(charge, per_mille)| Op::Refund { charge, per_mille }),
        2 => (1..2 * 86_400i64).prop_map(|seconds| Op::Advance { seconds }),
    ]
}

fn policy_strategy() -> impl Strategy<Value = OveragePolicy> {
    prop_oneof![
        Just(OveragePolicy::Block),
        (0..300i64).prop_map(|l| OveragePolicy::AllowNegative { limit: credits(l) }),
        Just(OveragePolicy::MeteredOnly { limit: None }),
        (0..300i64).prop_map(|l| OveragePolicy::MeteredOnly {
            limit: Some(credits(l))
        }),
    ]
}

/// The state a refused operation must leave untouched.
fn snapshot(c: &Customer) -> (Vec<Grant>, Amount, Vec<(Id, Amount)>, Amount) {
    let mut holds: Vec<(Id, Amount)> = c
        .ledger
        .active_holds()
        .map(|h| (h.id.clone(), h.amount))
        .collect();
    holds.sort();
    (c.ledger.grants().to_vec(), c.ledger.debt(), holds, c.net())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn overage_keeps_every_invariant(policy in policy_strategy(), ops in proptest::collection::vec(op_strategy(), 1..60)) {
        let mut c = Customer::new(policy);
        let mut holds: Vec<Id> = Vec::new();
        let mut charges: Vec<ChargeRecord> = Vec::new();
        for (step, op) in ops.into_iter().enumerate() {
            // What fell due is applied first, so the operation's own effect can be measured.
            c.tick(0);
            let before = snapshot(&c);
            let name = format!("x{step}");
            let written = c.journal.len();
            let advance = matches!(op, Op::Advance { .. });
            let refused = match op {
                Op::Grant { units, starts_in, expires_in, scoped } => c
                    .grant(&name, credits(units), starts_in * SECOND, expires_in.map(|e| e * SECOND + starts_in * SECOND), scoped.then_some("image"))
                    .err(),
                Op::Charge { units, scoped, metered } => {
                    let cost = credits(units);
                    match c.charge(&name, cost, scoped.then_some("image"), metered) {
                        Ok(record) => {
                            // A spend moves the balance by exactly its cost
                            // (scoped credits for "image" count in available too).
                            prop_assert_eq!(c.net(), before.3.checked_sub(cost).unwrap());
                            if !metered && matches!(policy, OveragePolicy::MeteredOnly { .. }) {
                                prop_assert_eq!(record.on_debt, Amount::ZERO);
                            }
                            charges.push(record);
                            None
                        }
                        Err(error) => Some(error),
                    }
                }
                Op::Hold { units } => match c.hold(&name, credits(units)) {
                    Ok(_) => {
                        holds.push(id(&name));
                        None
                    }
                    Err(error) => Some(error),
                },
                Op::Capture { hold, per_mille } => {
                    if holds.is_empty() {
                        continue;
                    }
                    let hold_id = holds[hold.index(holds.len())].clone();
                    let Some(held) = c.ledger.active_hold(&hold_id).map(|h| h.amount) else { continue };
                    let amount = per_mille.map(|p| Amount::from_micros((held.micros() * p / 1000).max(1)).unwrap());
                    match c.capture(hold_id.as_str(), amount) {
                        Ok(record) => {
                            charges.push(record);
                            None
                        }
                        Err(error) => Some(error),
                    }
                }
                Op::Release { hold } => {
                    if holds.is_empty() {
                        continue;
                    }
                    let hold_id = holds[hold.index(holds.len())].clone();
                    if c.ledger.active_hold(&hold_id).is_none() {
                        continue;
                    }
                    let now = c.tick(0);
                    let (_, entry) = c.ledger.release(&hold_id, None, now).unwrap();
                    c.journal.push(entry);
                    None
                }
                Op::Refund { charge, per_mille } => {
                    if charges.is_empty() {
                        continue;
                    }
                    let index = charge.index(charges.len());
                    let record = charges[index].clone();
                    let open = record.amount.checked_sub(record.refunded).unwrap();
                    if open.is_zero() {
                        continue;
                    }
                    let amount = per_mille.map(|p| Amount::from_micros((open.micros() * p / 1000).max(1)).unwrap());
                    match c.refund(&record, &name, amount) {
                        Ok(entry) => {
                            prop_assert_eq!(c.net(), before.3.checked_add(entry.amount).unwrap());
                            charges[index].refunded = record.refunded.checked_add(entry.amount).unwrap();
                            None
                        }
                        Err(error) => Some(error),
                    }
                }
                Op::Advance { seconds } => {
                    c.tick(seconds * SECOND);
                    None
                }
            };
            if let Some(error) = refused {
                prop_assert_eq!(&snapshot(&c), &before, "refused {:?} changed the ledger", error);
            }
            c.check();
            if !advance && c.journal.len() > written {
                c.check_last_entry();
            }
            let debt = c.ledger.debt();
            prop_assert!(debt <= policy.debt_limit(true), "debt {} past the limit of {:?}", debt, policy);
            if policy == OveragePolicy::Block {
                prop_assert_eq!(debt, Amount::ZERO);
            }
        }
        // Every draw of every charge names a grant the ledger knows.
        for record in &charges {
            for Draw { grant_id, .. } in &record.drawn {
                prop_assert!(c.ledger.grant(grant_id).is_some());
            }
        }
    }
}

#[test]
fn holds_past_the_credits_never_push_the_outstanding_total_past_the_maximum() {
    let max = Amount::from_micros(tally_core::amount::MAX_AMOUNT_MICROS).unwrap();
    let mut c = Customer::new(OveragePolicy::AllowNegative { limit: max });
    c.grant("g1", max, 0, None, None).unwrap();
    c.hold("h1", max).unwrap();
    // All overdraft: the held total would pass the maximum amount.
    assert_eq!(c.hold("h2", max).unwrap_err(), LedgerError::AmountOverflow);
    let balance = c.ledger.balance(Timestamp(c.now));
    assert_eq!(balance.held, max);
    c.check();
}

/// A hold that times out at the instant a lot takes effect, while the
/// customer owes: the hold's return repays what it can, then the lot takes
/// effect (its credits move out of `pending:` whole), then it repays the
/// rest. (Before, the timeout's repayment drew on the lot while its credits
/// were still pending, and `pending:` kept that much for ever.)
#[test]
fn a_lot_taking_effect_as_a_hold_times_out_repays_debt_only_once_in_effect() {
    let mut c = Customer::new(OveragePolicy::AllowNegative { limit: credits(50) });
    c.grant("g1", credits(10), 0, None, None).unwrap();
    c.hold("h", credits(10)).unwrap();
    c.charge("c", credits(20), None, false).unwrap();
    assert_eq!(c.ledger.debt(), credits(20));
    c.grant("later", credits(100), 60 * SECOND, None, None)
        .unwrap();
    c.check();
    c.tick(61 * SECOND);
    c.check();
    c.check_last_entry();
    assert_eq!(c.ledger.debt(), Amount::ZERO);
    let kinds: Vec<EntryKind> = c
        .journal
        .iter()
        .rev()
        .take(3)
        .rev()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            EntryKind::HoldExpired,
            EntryKind::GrantEffective,
            EntryKind::DebtRepaid
        ]
    );
    assert_eq!(c.net(), credits(90));
}
