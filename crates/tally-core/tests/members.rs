//! Member budgets in the core: the budget counts charges and holds in its
//! window, gives back only what it counted, survives a change of period,
//! starts afresh with the next window, and a refusal changes nothing.

use tally_core::{
    Amount, Budget, BudgetPeriod, CustomerLedger, Grant, GrantStatus, Id, LedgerError, Source,
    Spend, Timestamp,
};

const DAY: i64 = 86_400_000_000;
/// 2026-03-10T12:00:00Z
const NOW: i64 = 1_773_144_000_000_000;

fn credits(units: i64) -> Amount {
    Amount::from_units(units).unwrap()
}

fn id(text: &str) -> Id {
    Id::parse(text).unwrap()
}

fn ledger_with(units: i64) -> CustomerLedger {
    let mut ledger = CustomerLedger::new(id("team"));
    let grant = Grant {
        id: id("pool"),
        customer_id: id("team"),
        amount: credits(units),
        remaining: credits(units),
        source: Source::Purchase,
        paid: true,
        cost_basis: None,
        priority: 0,
        effective_at: Timestamp(0),
        expires_at: None,
        scope: None,
        status: GrantStatus::Active,
        expired_amount: Amount::ZERO,
        expired_at: None,
        sequence: 1,
    };
    ledger.add_grant(grant, None, Timestamp(NOW)).unwrap();
    ledger
}

fn spend(reference: &str, member: &str, units: i64) -> Spend {
    Spend {
        reference: id(reference),
        amount: credits(units),
        feature: None,
        member_id: Some(id(member)),
        reason: None,
    }
}

fn month(units: i64) -> Option<Budget> {
    Some(Budget {
        amount: credits(units),
        period: BudgetPeriod::Month,
    })
}

#[test]
fn a_budget_stops_a_member_and_a_refusal_changes_nothing() {
    let mut ledger = ledger_with(10_000);
    let now = Timestamp(NOW);
    ledger.set_member(&id("alice"), None, month(3000), now);
    ledger.charge(&spend("a1", "alice", 2500), now).unwrap();
    let before = format!("{:?}", ledger.members().collect::<Vec<_>>());
    let refused = ledger.charge(&spend("a2", "alice", 600), now);
    assert!(matches!(
        refused,
        Err(LedgerError::MemberBudgetExceeded { .. })
    ));
    assert_eq!(
        format!("{:?}", ledger.members().collect::<Vec<_>>()),
        before
    );
    assert_eq!(ledger.balance(now).available, credits(7500));
    // Someone else spends from the pool.
    ledger.charge(&spend("b1", "bob", 600), now).unwrap();
    // The next month starts afresh.
    let april = Timestamp(NOW + 25 * DAY);
    ledger.charge(&spend("a3", "alice", 3000), april).unwrap();
}

#[test]
fn only_holds_the_budget_counted_give_back() {
    let mut ledger = ledger_with(10_000);
    let now = Timestamp(NOW);
    let expires = Timestamp(NOW + 3_600_000_000);
    // A hold placed before the budget existed was never counted ...
    ledger
        .place_hold(&spend("h_old", "alice", 1000), expires, now)
        .unwrap();
    ledger.set_member(&id("alice"), None, month(3000), now);
    ledger.charge(&spend("a1", "alice", 3000), now).unwrap();
    // ... so its release gives nothing back.
    ledger.release(&id("h_old"), None, now).unwrap();
    assert!(ledger.charge(&spend("a2", "alice", 1), now).is_err());
    // A counted hold gives back its unused part on capture.
    ledger.set_member(&id("bob"), None, month(1000), now);
    ledger
        .place_hold(&spend("h_bob", "bob", 800), expires, now)
        .unwrap();
    assert!(ledger.charge(&spend("b1", "bob", 300), now).is_err());
    ledger
        .capture(&id("h_bob"), Some(credits(500)), None, now)
        .unwrap();
    ledger.charge(&spend("b2", "bob", 500), now).unwrap();
    assert!(ledger.charge(&spend("b3", "bob", 1), now).is_err());
    ledger.check_invariants().unwrap();
}

#[test]
fn changing_the_period_keeps_what_was_spent() {
    let mut ledger = ledger_with(10_000);
    let now = Timestamp(NOW);
    ledger.set_member(&id("alice"), None, month(3000), now);
    ledger.charge(&spend("a1", "alice", 900), now).unwrap();
    ledger.set_member(
        &id("alice"),
        None,
        Some(Budget {
            amount: credits(1000),
            period: BudgetPeriod::Day,
        }),
        now,
    );
    assert!(ledger.charge(&spend("a2", "alice", 200), now).is_err());
    ledger.charge(&spend("a3", "alice", 100), now).unwrap();
    // Tomorrow is a new day.
    ledger
        .charge(&spend("a4", "alice", 1000), Timestamp(NOW + DAY))
        .unwrap();
}
