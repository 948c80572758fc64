//! Member budgets in the core: the budget counts charges and holds in its
//! window, gives back only what it counted, counts its own window after a
//! change of period, starts afresh with the next window, and a refusal
//! changes nothing.

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
        awaiting_effect: false,
        origin: None,
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

#[test]
fn a_refund_gives_back_to_the_budget_only_what_it_counted_in_this_window() {
    let mut ledger = ledger_with(10_000);
    let now = Timestamp(NOW);
    // A spend before the budget existed (same month): never counted.
    ledger.charge(&spend("early", "alice", 400), now).unwrap();
    let budget_from = Timestamp(NOW + 1);
    ledger.set_member(&id("alice"), None, month(3000), budget_from);
    ledger
        .charge(&spend("a1", "alice", 2500), budget_from)
        .unwrap();
    assert!(ledger
        .charge(&spend("a2", "alice", 600), budget_from)
        .is_err());
    let room = |ledger: &CustomerLedger| {
        ledger
            .members()
            .find(|m| m.id == id("alice"))
            .unwrap()
            .room_at(budget_from)
            .unwrap()
    };
    // Refunding 1,000 of a1 gives that back: the 600 now fits.
    let given = ledger.refund_member_spend(&id("alice"), credits(1000), budget_from, budget_from);
    assert_eq!(given, credits(1000));
    assert_eq!(room(&ledger), credits(1500));
    ledger
        .charge(&spend("a2", "alice", 600), budget_from)
        .unwrap();
    // The spend from before the budget gives nothing back.
    let given = ledger.refund_member_spend(&id("alice"), credits(400), now, budget_from);
    assert_eq!(given, Amount::ZERO);
    // Never more than the window counted.
    let given = ledger.refund_member_spend(&id("alice"), credits(9000), budget_from, budget_from);
    assert_eq!(given, credits(2100));
    assert_eq!(room(&ledger), credits(3000));
    // A refund next month of this month's spend: that window never paid for it.
    ledger
        .charge(&spend("a3", "alice", 1000), budget_from)
        .unwrap();
    let april = Timestamp(NOW + 25 * DAY);
    ledger.charge(&spend("a4", "alice", 2000), april).unwrap();
    let given = ledger.refund_member_spend(&id("alice"), credits(1000), budget_from, april);
    assert_eq!(given, Amount::ZERO);
    // A member without a budget, or unknown: nothing to give back.
    assert_eq!(
        ledger.refund_member_spend(&id("bob"), credits(1), april, april),
        Amount::ZERO
    );
}

fn budget(units: i64, period: BudgetPeriod) -> Option<Budget> {
    Some(Budget {
        amount: credits(units),
        period,
    })
}

fn alice(ledger: &CustomerLedger) -> tally_core::Member {
    ledger
        .members()
        .find(|m| m.id.as_str() == "alice")
        .expect("alice")
        .clone()
}

/// A probe changed a monthly budget to a daily one the next day and was
/// refused for yesterday's spend; and a daily budget to a monthly one, and
/// spent past it, since only today's spend was carried over.
#[test]
fn a_new_period_counts_what_was_spent_in_its_own_window() {
    let day1 = Timestamp(NOW);
    let day2 = Timestamp(NOW + DAY);

    // Month to day: yesterday's spend is not today's.
    let mut ledger = ledger_with(10_000);
    ledger.set_member(&id("alice"), None, budget(1000, BudgetPeriod::Month), day1);
    ledger.charge(&spend("a1", "alice", 500), day1).unwrap();
    ledger.set_member(&id("alice"), None, budget(100, BudgetPeriod::Day), day2);
    assert_eq!(alice(&ledger).spent_at(day2), Amount::ZERO);
    ledger.charge(&spend("a2", "alice", 100), day2).unwrap();
    assert!(matches!(
        ledger.charge(&spend("a3", "alice", 1), day2),
        Err(LedgerError::MemberBudgetExceeded { .. })
    ));

    // Day to month: yesterday's spend is this month's too.
    let mut ledger = ledger_with(10_000);
    ledger.set_member(&id("alice"), None, budget(100, BudgetPeriod::Day), day1);
    ledger.charge(&spend("a1", "alice", 100), day1).unwrap();
    ledger.charge(&spend("a2", "alice", 100), day2).unwrap();
    ledger.set_member(&id("alice"), None, budget(250, BudgetPeriod::Month), day2);
    assert_eq!(alice(&ledger).spent_at(day2), credits(200));
    ledger.charge(&spend("a3", "alice", 50), day2).unwrap();
    assert!(ledger.charge(&spend("a4", "alice", 1), day2).is_err());

    // Month to year, across months: February's spend counts in the year;
    // what a refund gave back does not.
    let february = Timestamp(NOW - 20 * DAY);
    let mut ledger = ledger_with(10_000);
    ledger.set_member(
        &id("alice"),
        None,
        budget(500, BudgetPeriod::Month),
        february,
    );
    ledger.charge(&spend("f1", "alice", 300), february).unwrap();
    assert_eq!(
        ledger.refund_member_spend(&id("alice"), credits(50), february, february),
        credits(50),
        "refunded in February, counted in February"
    );
    ledger.charge(&spend("m1", "alice", 200), day1).unwrap();
    ledger.set_member(&id("alice"), None, budget(500, BudgetPeriod::Year), day1);
    assert_eq!(alice(&ledger).spent_at(day1), credits(450));
    ledger.charge(&spend("m2", "alice", 50), day1).unwrap();
    assert!(ledger.charge(&spend("m3", "alice", 1), day1).is_err());
    ledger.check_invariants().unwrap();
}

/// A hold placed before the new window no longer gives back to it (as
/// after the window ends), and one placed in it does; budget moved in by a
/// transfer was for the old window.
#[test]
fn a_new_period_keeps_the_holds_placed_in_its_window() {
    let day1 = Timestamp(NOW);
    let day2 = Timestamp(NOW + DAY);
    let expires = Timestamp(NOW + 3 * DAY);
    let mut ledger = ledger_with(10_000);
    ledger.set_member(&id("alice"), None, budget(1000, BudgetPeriod::Month), day1);
    ledger
        .place_hold(&spend("h1", "alice", 300), expires, day1)
        .unwrap();
    ledger
        .place_hold(&spend("h2", "alice", 40), expires, day2)
        .unwrap();
    ledger.set_member(&id("alice"), None, budget(100, BudgetPeriod::Day), day2);
    assert_eq!(alice(&ledger).spent_at(day2), credits(40));
    ledger.release(&id("h1"), None, day2).unwrap();
    assert_eq!(
        alice(&ledger).spent_at(day2),
        credits(40),
        "h1 was yesterday's"
    );
    ledger.release(&id("h2"), None, day2).unwrap();
    assert_eq!(alice(&ledger).spent_at(day2), Amount::ZERO);
    ledger.charge(&spend("a1", "alice", 100), day2).unwrap();
    assert!(ledger.charge(&spend("a2", "alice", 1), day2).is_err());
    ledger.check_invariants().unwrap();
}

/// The counts are part of the stored member, and a member stored before
/// they were kept carries what it counted, as it did.
#[test]
fn the_counts_are_stored_and_old_members_carry_their_spend() {
    let day1 = Timestamp(NOW);
    let day2 = Timestamp(NOW + DAY);
    let mut ledger = ledger_with(10_000);
    ledger.set_member(&id("alice"), None, budget(1000, BudgetPeriod::Month), day1);
    ledger.charge(&spend("a1", "alice", 500), day1).unwrap();
    let member = alice(&ledger);
    let stored = serde_json::to_string(&member).unwrap();
    let read: tally_core::Member = serde_json::from_str(&stored).unwrap();
    assert_eq!(read, member);
    assert_eq!(
        read.counted_days.values().copied().collect::<Vec<_>>(),
        [credits(500)]
    );

    // As stored before: no counts.
    let mut old: serde_json::Value = serde_json::from_str(&stored).unwrap();
    for field in [
        "counted_days",
        "counted_months",
        "hold_days",
        "counted_from",
    ] {
        old.as_object_mut().unwrap().remove(field);
    }
    let old: tally_core::Member = serde_json::from_value(old).unwrap();
    let mut ledger = ledger_with(10_000).with_members(vec![old]);
    ledger.set_member(&id("alice"), None, budget(600, BudgetPeriod::Day), day2);
    assert_eq!(alice(&ledger).spent_at(day2), credits(500), "carried");
}

fn day(units: i64) -> Option<Budget> {
    budget(units, BudgetPeriod::Day)
}

/// Budget a member gave away by a transfer stays given away through a
/// change of period (and back): a reviewer found the team could otherwise
/// spend 300 against 200 of daily budgets.
#[test]
fn budget_moved_out_stays_out_through_a_change_of_period() {
    let now = Timestamp(NOW);
    let mut ledger = ledger_with(10_000);
    ledger.set_member(&id("alice"), None, day(100), now);
    ledger.set_member(&id("bob"), None, day(100), now);
    ledger
        .transfer_budget(&id("t1"), &id("alice"), &id("bob"), credits(100), None, now)
        .unwrap();
    ledger.charge(&spend("b1", "bob", 200), now).unwrap();
    ledger.set_member(&id("alice"), None, month(100), now);
    assert!(ledger.charge(&spend("a1", "alice", 1), now).is_err());
    ledger.set_member(&id("alice"), None, day(100), now);
    assert!(ledger.charge(&spend("a2", "alice", 1), now).is_err());
    // Tomorrow is a new day.
    ledger
        .charge(&spend("a3", "alice", 100), Timestamp(NOW + DAY))
        .unwrap();
}

/// What a hold or a refund gives back after its window ended still comes
/// off its day's count, so that a longer period does not count it again.
#[test]
fn what_was_given_back_after_its_window_is_not_counted_again() {
    let day1_late = Timestamp(NOW + 11 * 3_600_000_000); // 23:00
    let day2 = Timestamp(NOW + DAY);
    let expires = Timestamp(NOW + 3 * DAY);

    // A daily hold captured in part the next day, then a monthly budget.
    let mut ledger = ledger_with(10_000);
    ledger.set_member(&id("alice"), None, day(1000), day1_late);
    ledger
        .place_hold(&spend("h1", "alice", 300), expires, day1_late)
        .unwrap();
    ledger
        .capture(&id("h1"), Some(credits(50)), None, day2)
        .unwrap();
    ledger.set_member(&id("alice"), None, month(1000), day2);
    assert_eq!(alice(&ledger).spent_at(day2), credits(50));

    // A monthly hold, a change to daily (the hold is yesterday's), its
    // capture, and back to monthly.
    let mut ledger = ledger_with(10_000);
    ledger.set_member(&id("alice"), None, month(1000), Timestamp(NOW));
    ledger
        .place_hold(&spend("h1", "alice", 300), expires, Timestamp(NOW))
        .unwrap();
    ledger.set_member(&id("alice"), None, day(1000), day2);
    assert_eq!(alice(&ledger).spent_at(day2), Amount::ZERO);
    ledger
        .capture(&id("h1"), Some(credits(50)), None, day2)
        .unwrap();
    assert_eq!(alice(&ledger).spent_at(day2), Amount::ZERO, "yesterday's");
    ledger.set_member(&id("alice"), None, month(1000), day2);
    assert_eq!(alice(&ledger).spent_at(day2), credits(50));

    // A charge of yesterday's daily window refunded today, then monthly.
    let mut ledger = ledger_with(10_000);
    ledger.set_member(&id("alice"), None, day(1000), Timestamp(NOW));
    ledger
        .charge(&spend("a1", "alice", 200), Timestamp(NOW))
        .unwrap();
    assert_eq!(
        ledger.refund_member_spend(&id("alice"), credits(200), Timestamp(NOW), day2),
        Amount::ZERO,
        "not this window's"
    );
    ledger.set_member(&id("alice"), None, month(1000), day2);
    assert_eq!(alice(&ledger).spent_at(day2), Amount::ZERO);
    ledger.check_invariants().unwrap();
}

/// Counts of several days or months can pass the largest amount: they stop
/// there (refusing more) rather than fail.
#[test]
fn counts_past_the_largest_amount_stop_there() {
    let most = 1_000_000_000_000;
    let january = Timestamp(NOW - 60 * DAY);
    let february = Timestamp(NOW - 30 * DAY);
    let mut ledger = ledger_with(most);
    ledger.set_member(&id("alice"), None, month(most), january);
    ledger
        .charge(&spend("j", "alice", 600_000_000_000), january)
        .unwrap();
    let grant = Grant {
        id: id("more"),
        customer_id: id("team"),
        amount: credits(600_000_000_000),
        remaining: credits(600_000_000_000),
        source: Source::Purchase,
        paid: true,
        cost_basis: None,
        priority: 0,
        effective_at: february,
        expires_at: None,
        scope: None,
        status: GrantStatus::Active,
        expired_amount: Amount::ZERO,
        expired_at: None,
        sequence: 2,
        awaiting_effect: false,
        origin: None,
    };
    ledger.add_grant(grant, None, february).unwrap();
    ledger
        .charge(&spend("f", "alice", 600_000_000_000), february)
        .unwrap();
    ledger.set_member(
        &id("alice"),
        None,
        budget(most, BudgetPeriod::Year),
        february,
    );
    assert_eq!(alice(&ledger).spent_at(february), credits(most));
    assert!(ledger.charge(&spend("x", "alice", 1), february).is_err());
}

/// A member stored before the counts were kept becomes complete from its
/// next window: a change to that window's period then recounts.
#[test]
fn an_old_member_counts_from_its_next_window() {
    let day1 = Timestamp(NOW);
    let day2 = Timestamp(NOW + DAY);
    let mut ledger = ledger_with(10_000);
    ledger.set_member(&id("alice"), None, day(1000), day1);
    ledger.charge(&spend("a1", "alice", 500), day1).unwrap();
    let mut old = serde_json::to_value(alice(&ledger)).unwrap();
    for field in [
        "counted_days",
        "counted_months",
        "hold_days",
        "counted_from",
    ] {
        old.as_object_mut().unwrap().remove(field);
    }
    let old: tally_core::Member = serde_json::from_value(old).unwrap();
    let mut ledger = ledger_with(10_000).with_members(vec![old]);
    ledger.charge(&spend("a2", "alice", 30), day2).unwrap();
    assert_eq!(
        alice(&ledger).counted_from,
        Some(Timestamp(NOW + DAY - 12 * 3_600_000_000))
    );
    // To a month: the days before today were never counted, so what the
    // day counted is carried, as before the counts existed (yesterday's 500
    // is not seen: the one case the counts cannot mend) ...
    ledger.set_member(&id("alice"), None, month(1000), day2);
    assert_eq!(alice(&ledger).spent_at(day2), credits(30));
    // ... and back to a day, today's count is complete.
    ledger.charge(&spend("a3", "alice", 5), day2).unwrap();
    ledger.set_member(&id("alice"), None, day(1000), day2);
    assert_eq!(alice(&ledger).spent_at(day2), credits(35));
}
