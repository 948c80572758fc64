//! Plans and subscriptions in the core: calendar periods, a year of renewals
//! with rollover and usage (postings replayed and invariants checked every
//! simulated day), cancellation and plan switches at the period end, and the
//! "credits expired yesterday and I upgraded today" scenario.

use std::collections::HashMap;

use tally_core::plan::{change_plan_now, renew_due, RenewalContext, Step};
use tally_core::{
    Account, Amount, CustomerLedger, EntryDraft, EntryKind, GrantStatus, Id, Period, Plan,
    Rollover, Spend, Subscription, SubscriptionStatus, Timestamp,
};

const SECOND: i64 = 1_000_000;
const DAY: i64 = 86_400 * SECOND;

fn at(text: &str) -> Timestamp {
    let parsed =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap();
    Timestamp(i64::try_from(parsed.unix_timestamp_nanos() / 1000).unwrap())
}

fn credits(units: i64) -> Amount {
    Amount::from_units(units).unwrap()
}

fn id(text: &str) -> Id {
    Id::parse(text).unwrap()
}

fn plan(key: &str, included: i64, rollover: Option<Rollover>, grace: u32) -> Plan {
    Plan {
        key: key.into(),
        name: key.into(),
        period: Period::Month,
        included_credits: credits(included),
        allocation_expires_after_periods: Some(1),
        rollover,
        overage: None,
        upgrade_grace_days: grace,
    }
}

struct Plans {
    plans: HashMap<String, Plan>,
    sequence: i64,
}

impl RenewalContext for Plans {
    fn plan(&self, key: &str) -> Option<&Plan> {
        self.plans.get(key)
    }
    fn next_grant_sequence(&mut self) -> i64 {
        self.sequence += 1;
        self.sequence
    }
}

fn plans(list: Vec<Plan>) -> Plans {
    Plans {
        plans: list.into_iter().map(|p| (p.key.clone(), p)).collect(),
        sequence: 0,
    }
}

/// Every entry's postings, replayed, give each lot's remaining credits.
fn assert_replays(ledger: &CustomerLedger, journal: &[EntryDraft]) {
    let mut balances: HashMap<Id, i64> = HashMap::new();
    for entry in journal {
        let total: i64 = entry.postings.iter().map(|p| p.amount.micros()).sum();
        assert!(total >= 0);
        for posting in &entry.postings {
            if let Account::Grant(grant) = &posting.from {
                *balances.entry(grant.clone()).or_default() -= posting.amount.micros();
            }
            if let Account::Grant(grant) = &posting.to {
                *balances.entry(grant.clone()).or_default() += posting.amount.micros();
            }
        }
    }
    for grant in ledger.grants() {
        assert_eq!(
            balances.get(&grant.id).copied().unwrap_or(0),
            grant.remaining.micros(),
            "grant {} replays to its remaining",
            grant.id
        );
    }
    ledger.check_invariants().unwrap();
}

fn entries(steps: Vec<Step>) -> Vec<EntryDraft> {
    steps
        .into_iter()
        .filter_map(|step| match step {
            Step::Entry(entry) | Step::NewGrant(entry, _) => Some(entry),
            _ => None,
        })
        .collect()
}

/// An upgrade is more credits per average day, twelve months being a
/// year: 1,000 a month is 12,000 a year, so 12,100 a year is more and
/// 12,000 a year the same (with months of 30 days and years of 365, the
/// monthly plan counted as the higher of the first pair).
#[test]
fn monthly_and_yearly_plans_compare_by_the_same_year() {
    let monthly = plan("mo", 1_000, None, 3);
    let yearly = |key: &str, included: i64| Plan {
        period: Period::Year,
        ..plan(key, included, None, 3)
    };
    let more = yearly("yr_more", 12_100);
    let same = yearly("yr_same", 12_000);
    assert!(more.is_upgrade_from(&monthly));
    assert!(!monthly.is_upgrade_from(&more));
    assert!(!same.is_upgrade_from(&monthly) && !monthly.is_upgrade_from(&same));
    let thirty_days = Plan {
        period: Period::Days(30),
        ..plan("d30", 1_000, None, 3)
    };
    // 1,000 every 30 days is more than 1,000 a month of 30.44 days on average.
    assert!(thirty_days.is_upgrade_from(&monthly));
    assert!(!monthly.is_upgrade_from(&thirty_days));
}

#[test]
fn calendar_months_keep_the_day_of_month_from_the_anchor() {
    let anchor = at("2026-01-31T10:00:00Z");
    let month = |k| Period::Month.boundary(anchor, k).unwrap();
    assert_eq!(month(1), at("2026-02-28T10:00:00Z"));
    assert_eq!(month(2), at("2026-03-31T10:00:00Z"));
    assert_eq!(month(3), at("2026-04-30T10:00:00Z"));
    assert_eq!(month(13), at("2027-02-28T10:00:00Z"));
    assert_eq!(month(-1), at("2025-12-31T10:00:00Z"));
    let leap = at("2028-02-29T00:00:00Z");
    assert_eq!(
        Period::Year.boundary(leap, 1).unwrap(),
        at("2029-02-28T00:00:00Z")
    );
    assert_eq!(
        Period::Year.boundary(leap, 4).unwrap(),
        at("2032-02-29T00:00:00Z")
    );
    assert_eq!(
        Period::Days(7).boundary(anchor, 2).unwrap(),
        Timestamp(anchor.micros() + 14 * DAY)
    );
}

#[test]
fn rollover_is_capped_by_percent_and_amount() {
    let rule = Rollover {
        max_percent: Some(50),
        max_amount: Some(credits(3000)),
        expires_after_periods: 1,
    };
    assert_eq!(rule.amount(credits(2000), credits(10_000)), credits(2000));
    assert_eq!(rule.amount(credits(4000), credits(10_000)), credits(3000));
    let percent_only = Rollover {
        max_amount: None,
        ..rule.clone()
    };
    assert_eq!(
        percent_only.amount(credits(8000), credits(10_000)),
        credits(5000)
    );
    assert_eq!(
        percent_only.amount(Amount::from_micros(7).unwrap(), credits(10_000)),
        Amount::from_micros(7).unwrap()
    );
}

/// A year on a 10,000-credit monthly plan with 50% rollover (expiring after
/// one period), spending a varying amount each day: every day the postings
/// replay to the state; at each renewal exactly one allocation and at most
/// one rollover are created, and what rolled over is the capped unused part.
#[test]
fn a_year_of_renewals_with_rollover() {
    let rollover = Rollover {
        max_percent: Some(50),
        max_amount: None,
        expires_after_periods: 1,
    };
    let mut context = plans(vec![plan("pro", 10_000, Some(rollover), 0)]);
    let start = at("2026-01-15T00:00:00Z");
    let mut ledger = CustomerLedger::new(id("cus"));
    let mut sub = Subscription::starting(id("sub1"), id("cus"), "pro".into(), start);
    let mut journal = Vec::new();
    let mut renewals = 0;
    let mut rollovers = Vec::new();
    for day in 0..=366 {
        let now = Timestamp(start.micros() + day * DAY);
        // What the ending allocation has left, just before the boundary.
        let ending_unused = ledger
            .grant(&sub.allocation_id(sub.period))
            .filter(|g| g.status == GrantStatus::Active)
            .map(|g| g.remaining);
        let steps = renew_due(&mut ledger, &mut sub, &mut context, now).unwrap();
        for step in &steps {
            match step {
                Step::Renewed { .. } => renewals += 1,
                Step::NewGrant(entry, grant) if entry.kind == EntryKind::Rollover => {
                    let unused = ending_unused.expect("a rollover comes from an allocation");
                    assert_eq!(grant.amount, unused.min(credits(5000)));
                    rollovers.push(grant.amount);
                }
                _ => {}
            }
        }
        journal.extend(entries(steps));
        journal.extend(ledger.expire_due(now));
        // Spend 100 to 600 credits a day, when there are any.
        let want = credits(100 + (day * 37) % 500);
        let spend = Spend {
            reference: id(&format!("day{day}")),
            amount: want,
            feature: None,
            member_id: None,
            reason: None,
        };
        if let Ok((_, entry)) = ledger.charge(&spend, now) {
            journal.push(entry);
        }
        assert_replays(&ledger, &journal);
        // Nothing of a past period's allocation is still spendable.
        for grant in ledger.grants() {
            if grant.in_effect(now) {
                assert!(grant.expires_at.unwrap() > now);
            }
        }
    }
    // 2026-01-15 to 2027-01-16: the start and 12 renewals.
    assert_eq!(renewals, 13);
    assert_eq!(sub.period, 12);
    assert_eq!(sub.period_start, at("2027-01-15T00:00:00Z"));
    let allocations = ledger
        .grants()
        .iter()
        .filter(|g| g.source == tally_core::Source::PlanAllocation)
        .count();
    assert_eq!(allocations, 13);
    assert!(!rollovers.is_empty(), "some months leave credits unused");
    assert!(rollovers.iter().all(|r| *r <= credits(5000)));
}

#[test]
fn cancel_at_period_end_stops_renewal_and_a_switch_applies_at_the_boundary() {
    let mut context = plans(vec![
        plan("pro", 1000, None, 0),
        plan("basic", 100, None, 0),
    ]);
    let start = at("2026-03-01T00:00:00Z");
    let mut ledger = CustomerLedger::new(id("cus"));
    let mut sub = Subscription::starting(id("s"), id("cus"), "pro".into(), start);
    renew_due(&mut ledger, &mut sub, &mut context, start).unwrap();
    assert_eq!(ledger.balance(start).available, credits(1000));
    sub.next_plan = Some("basic".into());
    let april = at("2026-04-01T00:00:00Z");
    renew_due(&mut ledger, &mut sub, &mut context, april).unwrap();
    ledger.expire_due(april);
    assert_eq!(sub.plan, "basic");
    assert_eq!(ledger.balance(april).available, credits(100));
    sub.cancel_at_period_end = true;
    let june = at("2026-06-01T00:00:00Z");
    let steps = renew_due(&mut ledger, &mut sub, &mut context, june).unwrap();
    ledger.expire_due(june);
    assert!(steps
        .iter()
        .any(|s| matches!(s, Step::Ended { at } if *at == at_may())));
    assert_eq!(sub.status, SubscriptionStatus::Canceled);
    assert_eq!(ledger.balance(june).available, Amount::ZERO);
}

fn at_may() -> Timestamp {
    at("2026-05-01T00:00:00Z")
}

/// "My credits expired yesterday and I upgraded today": the Pro plan's
/// three days of grace reinstate yesterday's expired Basic credits until
/// the end of the new Pro period, next to Pro's own allocation.
#[test]
fn credits_expired_yesterday_come_back_on_an_upgrade_within_the_grace() {
    let mut context = plans(vec![
        plan("basic", 1000, None, 0),
        plan("pro", 10_000, None, 3),
    ]);
    let start = at("2026-03-01T00:00:00Z");
    let mut ledger = CustomerLedger::new(id("cus"));
    let mut sub = Subscription::starting(id("s"), id("cus"), "basic".into(), start);
    renew_due(&mut ledger, &mut sub, &mut context, start).unwrap();
    let spend = Spend {
        reference: id("c1"),
        amount: credits(400),
        feature: None,
        member_id: None,
        reason: None,
    };
    ledger.charge(&spend, start).unwrap();
    // The period ends on April 1st: 600 unused Basic credits expire.
    let april_2 = at("2026-04-02T09:00:00Z");
    renew_due(&mut ledger, &mut sub, &mut context, april_2).unwrap();
    ledger.expire_due(april_2);
    assert_eq!(ledger.balance(april_2).available, credits(1000));
    let march = ledger.grant(&sub.allocation_id(0)).unwrap();
    assert_eq!(march.status, GrantStatus::Expired);
    assert_eq!(march.expired_amount, credits(600));
    let pro = context.plans["pro"].clone();
    let steps = change_plan_now(
        &mut ledger,
        &mut sub,
        &pro,
        &id("up1"),
        &mut context,
        april_2,
    )
    .unwrap();
    let reinstated: Vec<_> = entries(steps)
        .into_iter()
        .filter(|e| e.kind == EntryKind::Reinstate)
        .collect();
    assert_eq!(reinstated.len(), 1);
    assert_eq!(reinstated[0].amount, credits(600));
    assert!(reinstated[0]
        .reason
        .as_deref()
        .unwrap()
        .contains("upgrade grace"));
    // Pro's 10,000 and March's 600 back. Basic's April 1,000 ended with the
    // Basic period the upgrade ended (an expiry entry that says so).
    assert_eq!(ledger.balance(april_2).available, credits(10_600));
    let april = ledger.grant(&sub.allocation_id(1)).unwrap();
    assert_eq!(april.status, GrantStatus::Expired);
    assert_eq!(april.expired_amount, credits(1000));
    assert_eq!(sub.period_start, april_2);
    assert_eq!(sub.period_end, at("2026-05-02T09:00:00Z"));
    let back = ledger.grant(&sub.allocation_id(0)).unwrap();
    assert_eq!(back.expires_at, Some(sub.period_end));
    ledger.check_invariants().unwrap();

    // Without grace (or past it) nothing comes back.
    let mut context = plans(vec![
        plan("basic", 1000, None, 0),
        plan("pro", 10_000, None, 0),
    ]);
    let mut ledger = CustomerLedger::new(id("cus"));
    let mut sub = Subscription::starting(id("s"), id("cus"), "basic".into(), start);
    renew_due(&mut ledger, &mut sub, &mut context, april_2).unwrap();
    ledger.expire_due(april_2);
    let pro = context.plans["pro"].clone();
    change_plan_now(
        &mut ledger,
        &mut sub,
        &pro,
        &id("up1"),
        &mut context,
        april_2,
    )
    .unwrap();
    assert_eq!(ledger.balance(april_2).available, credits(10_000));
}

/// Changing plans back and forth, now, grants each plan's allocation once per
/// change but ends the one before: the customer holds one plan's credits at a
/// time, plus what it bought, never a pile of allocations.
#[test]
fn changing_plans_back_and_forth_never_piles_up_allocations() {
    let mut context = plans(vec![
        plan("basic", 100, None, 3),
        plan("pro", 1000, None, 3),
    ]);
    let start = at("2026-03-01T00:00:00Z");
    let mut ledger = CustomerLedger::new(id("cus"));
    let mut sub = Subscription::starting(id("s"), id("cus"), "basic".into(), start);
    renew_due(&mut ledger, &mut sub, &mut context, start).unwrap();
    let spend = Spend {
        reference: id("c1"),
        amount: credits(30),
        feature: None,
        member_id: None,
        reason: None,
    };
    ledger.charge(&spend, start).unwrap();
    let mut now = start;
    for round in 0..3 {
        for (key, expected) in [("pro", 1000), ("basic", 100)] {
            now = now.plus_seconds(60).unwrap();
            let to = context.plans[key].clone();
            let steps = change_plan_now(
                &mut ledger,
                &mut sub,
                &to,
                &id(&format!("chg{round}{key}")),
                &mut context,
                now,
            )
            .unwrap();
            let ended: Vec<_> = entries(steps)
                .into_iter()
                .filter(|e| e.kind == EntryKind::Expire)
                .collect();
            assert_eq!(ended.len(), 1, "the allocation before ends");
            assert!(ended[0].reason.as_deref().unwrap().contains("plan change"));
            assert_eq!(ledger.balance(now).available, credits(expected), "{key}");
            ledger.check_invariants().unwrap();
        }
    }
}

/// The grace revives what expired on the plan an upgrade leaves, once: a
/// downgrade and an upgrade back after each renewal do not bring back the
/// allocations that expired under the higher plan, period after period
/// (a probe took a 1,000-credit plan to 4,000 credits in three periods this
/// way). Nor does a downgrade scheduled for the period's end.
#[test]
fn a_round_trip_through_a_lower_plan_revives_nothing() {
    let mut context = plans(vec![plan("tiny", 10, None, 0), plan("big", 1000, None, 5)]);
    let start = at("2026-03-01T00:00:00Z");
    let mut ledger = CustomerLedger::new(id("cus"));
    let mut sub = Subscription::starting(id("s"), id("cus"), "big".into(), start);
    renew_due(&mut ledger, &mut sub, &mut context, start).unwrap();
    let mut now = start;
    for round in 0..3 {
        now = now.plus_seconds(32 * 86_400).unwrap();
        renew_due(&mut ledger, &mut sub, &mut context, now).unwrap();
        ledger.expire_due(now);
        assert_eq!(ledger.balance(now).available, credits(1000));
        for key in ["tiny", "big"] {
            let to = context.plans[key].clone();
            let steps = change_plan_now(
                &mut ledger,
                &mut sub,
                &to,
                &id(&format!("chg{round}{key}")),
                &mut context,
                now,
            )
            .unwrap();
            assert!(
                entries(steps)
                    .iter()
                    .all(|e| e.kind != EntryKind::Reinstate),
                "round {round}: nothing expired on the plan {key} leaves"
            );
        }
        assert_eq!(
            ledger.balance(now).available,
            credits(1000),
            "round {round}"
        );
        ledger.check_invariants().unwrap();
    }

    // A downgrade at the period's end, then an upgrade the next day: the
    // allocation that ended with the big period stays expired.
    let mut ledger = CustomerLedger::new(id("cus"));
    let mut sub = Subscription::starting(id("s2"), id("cus"), "big".into(), start);
    renew_due(&mut ledger, &mut sub, &mut context, start).unwrap();
    sub.next_plan = Some("tiny".into());
    let april_2 = at("2026-04-02T00:00:00Z");
    renew_due(&mut ledger, &mut sub, &mut context, april_2).unwrap();
    ledger.expire_due(april_2);
    assert_eq!(sub.plan, "tiny");
    assert_eq!(ledger.balance(april_2).available, credits(10));
    let big = context.plans["big"].clone();
    let steps = change_plan_now(
        &mut ledger,
        &mut sub,
        &big,
        &id("up"),
        &mut context,
        april_2,
    )
    .unwrap();
    assert!(entries(steps)
        .iter()
        .all(|e| e.kind != EntryKind::Reinstate));
    assert_eq!(ledger.balance(april_2).available, credits(1000));
    ledger.check_invariants().unwrap();
}

/// The grace's bound moves only on a downgrade (or a new subscription): a
/// subscription cancelled and started again on a lower plan, then upgraded,
/// revives nothing of the old one's allocations; but credits that expired at
/// a scheduled upgrade's boundary still come back on a further upgrade the
/// next day ("my credits expired yesterday and I upgraded today").
#[test]
fn the_grace_bound_moves_on_downgrades_and_new_subscriptions_only() {
    let mut context = plans(vec![
        plan("basic", 100, None, 0),
        plan("pro", 1000, None, 7),
        plan("ent", 5000, None, 7),
    ]);
    let start = at("2026-03-01T00:00:00Z");
    let april_1 = at("2026-04-01T00:00:00Z");
    let april_2 = at("2026-04-02T00:00:00Z");

    // Pro, renewed on April 1st (March's allocation expires then); on April
    // 2nd cancelled (by the store: a new subscription follows) and started
    // again on Basic, then upgraded to Pro.
    let mut ledger = CustomerLedger::new(id("cus"));
    let mut sub = Subscription::starting(id("s1"), id("cus"), "pro".into(), start);
    renew_due(&mut ledger, &mut sub, &mut context, april_2).unwrap();
    ledger.expire_due(april_2);
    let mut again = Subscription::starting(id("s2"), id("cus"), "basic".into(), april_2);
    renew_due(&mut ledger, &mut again, &mut context, april_2).unwrap();
    let pro = context.plans["pro"].clone();
    let steps = change_plan_now(
        &mut ledger,
        &mut again,
        &pro,
        &id("up"),
        &mut context,
        april_2,
    )
    .unwrap();
    assert!(entries(steps)
        .iter()
        .all(|e| e.kind != EntryKind::Reinstate));

    // Basic with Pro scheduled for April 1st, then Enterprise on April 2nd:
    // Basic's March allocation, expired at the boundary, comes back.
    let mut ledger = CustomerLedger::new(id("cus"));
    let mut sub = Subscription::starting(id("s3"), id("cus"), "basic".into(), start);
    renew_due(&mut ledger, &mut sub, &mut context, start).unwrap();
    sub.next_plan = Some("pro".into());
    renew_due(&mut ledger, &mut sub, &mut context, april_2).unwrap();
    ledger.expire_due(april_2);
    assert_eq!(sub.plan, "pro");
    assert_eq!(sub.period_start, april_1);
    let ent = context.plans["ent"].clone();
    let steps = change_plan_now(
        &mut ledger,
        &mut sub,
        &ent,
        &id("up2"),
        &mut context,
        april_2,
    )
    .unwrap();
    let reinstated: Vec<_> = entries(steps)
        .into_iter()
        .filter(|e| e.kind == EntryKind::Reinstate)
        .collect();
    assert_eq!(reinstated.len(), 1);
    assert_eq!(reinstated[0].amount, credits(100));
    ledger.check_invariants().unwrap();
}

#[test]
fn a_downtime_catches_up_every_missed_renewal_at_its_own_instant() {
    let mut context = plans(vec![plan("pro", 500, None, 0)]);
    let start = at("2026-01-10T00:00:00Z");
    let mut ledger = CustomerLedger::new(id("cus"));
    let mut sub = Subscription::starting(id("s"), id("cus"), "pro".into(), start);
    let later = at("2026-05-20T00:00:00Z");
    let steps = renew_due(&mut ledger, &mut sub, &mut context, later).unwrap();
    let renewed: Vec<Timestamp> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Renewed { at, .. } => Some(*at),
            _ => None,
        })
        .collect();
    assert_eq!(
        renewed,
        [
            "2026-01-10",
            "2026-02-10",
            "2026-03-10",
            "2026-04-10",
            "2026-05-10"
        ]
        .map(|d| at(&format!("{d}T00:00:00Z")))
    );
    ledger.expire_due(later);
    assert_eq!(ledger.balance(later).available, credits(500));
    // Renewing again at the same instant does nothing.
    assert!(renew_due(&mut ledger, &mut sub, &mut context, later)
        .unwrap()
        .is_empty());
}

/// Only credits about to expire roll over: an allocation that lasts two
/// periods keeps its credits, and nothing is carved out of it.
#[test]
fn an_allocation_that_outlives_its_period_does_not_roll_over() {
    let rollover = Rollover {
        max_percent: None,
        max_amount: None,
        expires_after_periods: 1,
    };
    let mut long = plan("long", 100, Some(rollover), 0);
    long.allocation_expires_after_periods = Some(2);
    let mut context = plans(vec![long]);
    let start = at("2026-01-01T00:00:00Z");
    let mut ledger = CustomerLedger::new(id("cus"));
    let mut sub = Subscription::starting(id("s"), id("cus"), "long".into(), start);
    let later = at("2026-02-15T00:00:00Z");
    let steps = renew_due(&mut ledger, &mut sub, &mut context, later).unwrap();
    assert!(entries(steps).iter().all(|e| e.kind != EntryKind::Rollover));
    ledger.expire_due(later);
    assert_eq!(ledger.balance(later).available, credits(200));
}

/// A change now ends only the current period's allocation: allocations of
/// earlier periods that outlive their period (here each lives three) keep
/// their expiry, as credits already earned.
#[test]
fn a_change_now_ends_only_the_current_periods_allocation() {
    let mut long = plan("long", 500, None, 0);
    long.allocation_expires_after_periods = Some(3);
    let mut context = plans(vec![long, plan("other", 100, None, 0)]);
    let start = at("2026-03-01T00:00:00Z");
    let mut ledger = CustomerLedger::new(id("cus"));
    let mut sub = Subscription::starting(id("s"), id("cus"), "long".into(), start);
    let may = at("2026-05-02T00:00:00Z");
    renew_due(&mut ledger, &mut sub, &mut context, may).unwrap();
    ledger.expire_due(may);
    assert_eq!(ledger.balance(may).available, credits(1500));
    let other = context.plans["other"].clone();
    change_plan_now(&mut ledger, &mut sub, &other, &id("chg"), &mut context, may).unwrap();
    assert_eq!(ledger.balance(may).available, credits(1100));
    let ended = ledger.grant(&sub.allocation_id(2)).unwrap();
    assert_eq!(ended.status, GrantStatus::Expired);
    assert!(ended.ended_early());
    for n in [0, 1] {
        assert_eq!(
            ledger.grant(&sub.allocation_id(n)).unwrap().status,
            GrantStatus::Active
        );
    }
    ledger.check_invariants().unwrap();
}

/// `Subscription::renewal_at` dates each coming renewal as `renew_due` then
/// does: calendar months from a month's last day, a subscription not yet
/// started, a change at the period's end to a plan of the same period and
/// to one of another, and a cancellation at the period's end.
#[test]
fn renewal_instants_are_foretold_as_renewals_then_date_them() {
    let monthly = plan("monthly", 10, None, 0);
    let other_monthly = plan("other", 20, None, 0);
    let mut weekly = plan("weekly", 5, None, 0);
    weekly.period = Period::Days(7);
    let plans_by_key: HashMap<String, Plan> = [&monthly, &other_monthly, &weekly]
        .into_iter()
        .map(|p| (p.key.clone(), p.clone()))
        .collect();
    let start = at("2026-01-31T12:00:00Z");
    let until = at("2027-03-01T00:00:00Z");
    type Schedule = fn(&mut Subscription);
    let cases: [(&str, Schedule); 5] = [
        ("not started", |_| {}),
        ("started", |_| {}),
        ("to the same period", |s| s.next_plan = Some("other".into())),
        ("to another period", |s| s.next_plan = Some("weekly".into())),
        ("canceled at the end", |s| s.cancel_at_period_end = true),
    ];
    for (case, (name, change)) in cases.iter().enumerate() {
        let mut context = plans(vec![monthly.clone(), other_monthly.clone(), weekly.clone()]);
        let mut ledger = CustomerLedger::new(id("cus"));
        let mut sub = Subscription::starting(id("s"), id("cus"), "monthly".into(), start);
        if case > 0 {
            // Started, then the change is scheduled during its first period.
            renew_due(&mut ledger, &mut sub, &mut context, start).unwrap();
            assert_eq!(sub.period, 0);
        }
        change(&mut sub);
        let current = &plans_by_key[&sub.plan];
        let next = &plans_by_key[sub.next_plan.as_deref().unwrap_or(&sub.plan)];
        let foretold: Vec<Timestamp> = (0..200)
            .map_while(|k| sub.renewal_at(current, next, k))
            .take_while(|instant| *instant <= until)
            .collect();
        // How many fall by an instant: none before the first, k + 1 at the
        // k-th and until just before the next.
        assert_eq!(
            sub.renewals_by(current, next, Timestamp(foretold[0].0 - 1)),
            0,
            "{name}"
        );
        for (k, instant) in foretold.iter().enumerate() {
            let count = i64::try_from(k).unwrap() + 1;
            assert_eq!(
                sub.renewals_by(current, next, *instant),
                count,
                "{name}: {k}"
            );
            let before_next = foretold
                .get(k + 1)
                .map_or(until, |next| Timestamp(next.0 - 1));
            assert_eq!(
                sub.renewals_by(current, next, before_next),
                count,
                "{name}: {k}"
            );
        }
        let dated: Vec<Timestamp> = renew_due(&mut ledger, &mut sub, &mut context, until)
            .unwrap()
            .into_iter()
            .filter_map(|step| match step {
                Step::Renewed { at, .. } | Step::Ended { at } => Some(at),
                _ => None,
            })
            .collect();
        assert_eq!(foretold, dated, "{name}");
        assert!(!foretold.is_empty(), "{name}: something renews");
        assert_eq!(
            foretold.len() == 1,
            *name == "canceled at the end",
            "{name}: {} renewals",
            foretold.len()
        );
    }
}
