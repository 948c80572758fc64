//! The price book through the store: a quote equals the charge that follows
//! it (property test over random grants, clock steps, usage and contracts),
//! and versions and contracts survive a reopen.

use std::collections::BTreeMap;
use std::sync::Arc;

mod common;
use common::{amount, id, ok, TestStore};

use proptest::prelude::*;
use tally_core::pricebook::Contract;
use tally_core::{Amount, Clock, Rule, Source, Timestamp};
use tally_store::{
    Command, ManualClock, NewCharge, NewCustomer, NewGrant, Outcome, Store, UsageInput,
};

const START: Timestamp = Timestamp(1_800_000_000_000_000);
fn rules(json: serde_json::Value) -> Vec<Rule> {
    serde_json::from_value(json).expect("rules parse")
}

/// Features a..d, one published version using every kind of price, a customer
/// on plan pro.
async fn setup(store: &Store) {
    for key in ["a", "b", "c", "d"] {
        ok(
            store,
            Command::PutFeature {
                key: key.into(),
                name: key.into(),
                unit: "unit".into(),
            },
        )
        .await;
    }
    ok(
        store,
        Command::CreatePricebook {
            id: id("v1"),
            from: None,
        },
    )
    .await;
    let v1 = rules(serde_json::json!([
        {"feature": "a", "credits_per_unit": "0.333333"},
        {"feature": "b", "block": {"size": 1000, "credits": "8"}},
        {"feature": "b", "plan": "pro", "block": {"size": 100, "credits": "1.5"}},
        {"feature": "c", "tiers": {"mode": "graduated", "steps": [
            {"up_to": 10, "credits_per_unit": "2"}, {"up_to": null, "credits_per_unit": "0.5"}]}},
        {"feature": "d", "tiers": {"mode": "volume", "steps": [
            {"up_to": 5, "credits_per_unit": "3"}, {"up_to": null, "credits_per_unit": "1"}]}},
        {"feature": "d", "match": {"model": "x"}, "credits_per_unit": "2.5"},
    ]));
    ok(
        store,
        Command::PutRules {
            id: "v1".into(),
            rules: v1,
        },
    )
    .await;
    ok(
        store,
        Command::Publish {
            id: "v1".into(),
            effective_at: None,
        },
    )
    .await;
    ok(
        store,
        Command::CreateCustomer(NewCustomer {
            plan: Some("pro".into()),
            ..NewCustomer::with_id(id("cust"))
        }),
    )
    .await;
}

#[derive(Clone, Debug)]
enum Step {
    /// A grant of `credits`, maybe expiring after `expires_in` seconds, maybe
    /// scoped to one feature.
    Grant {
        credits: u32,
        expires_in: Option<u32>,
        scope: Option<usize>,
    },
    Advance(u32),
    /// Quote then charge `quantity` (in thousandths) of feature `feature`.
    Use {
        feature: usize,
        thousandths: u32,
        model_x: bool,
    },
}

const FEATURES: [&str; 4] = ["a", "b", "c", "d"];

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (
            1u32..200,
            proptest::option::of(1u32..3600),
            proptest::option::of(0usize..4)
        )
            .prop_map(|(credits, expires_in, scope)| Step::Grant {
                credits,
                expires_in,
                scope
            }),
        (1u32..7200).prop_map(Step::Advance),
        (0usize..4, 1u32..40_000, any::<bool>()).prop_map(|(feature, thousandths, model_x)| {
            Step::Use {
                feature,
                thousandths,
                model_x,
            }
        }),
        (0usize..4, 1u32..40_000, any::<bool>()).prop_map(|(feature, thousandths, model_x)| {
            Step::Use {
                feature,
                thousandths,
                model_x,
            }
        }),
    ]
}

async fn run_case(steps: Vec<Step>, contract: bool) -> Result<(), TestCaseError> {
    let place = TestStore::new("quote");
    let clock = Arc::new(ManualClock::new(START));
    let store = place.open(clock.clone()).await;
    setup(&store).await;
    if contract {
        let own = rules(serde_json::json!([{"feature": "c", "credits_per_unit": "0.7"}]));
        ok(
            &store,
            Command::PutContract {
                id: id("k1"),
                customer_id: id("cust"),
                contract: Contract {
                    id: "k1".into(),
                    effective_from: None,
                    effective_to: None,
                    rules: own,
                    multiplier: Some(amount("0.9")),
                    pinned_pricebook: None,
                    lock_rates: false,
                },
                lock_rates: true,
            },
        )
        .await;
    }
    for (n, step) in steps.into_iter().enumerate() {
        match step {
            Step::Grant {
                credits,
                expires_in,
                scope,
            } => {
                let now = clock.now();
                ok(
                    &store,
                    Command::Grant(NewGrant {
                        id: id(&format!("g{n}")),
                        customer_id: id("cust"),
                        amount: Amount::from_units(i64::from(credits)).unwrap(),
                        source: Source::Purchase,
                        paid: n % 2 == 0,
                        cost_basis: None,
                        priority: 0,
                        effective_at: None,
                        expires_at: expires_in.map(|s| now.plus_seconds(i64::from(s)).unwrap()),
                        scope: scope.map(|f| vec![FEATURES[f].to_string()]),
                        metadata: None,
                        external_reference: None,
                        reason: None,
                    }),
                )
                .await;
            }
            Step::Advance(seconds) => {
                let to = clock.now().plus_seconds(i64::from(seconds)).unwrap();
                clock.advance_to(to);
            }
            Step::Use {
                feature,
                thousandths,
                model_x,
            } => {
                let mut properties = BTreeMap::new();
                if model_x {
                    properties.insert("model".to_string(), "x".to_string());
                }
                let usage = UsageInput {
                    feature: FEATURES[feature].into(),
                    quantity: Amount::from_micros(i64::from(thousandths) * 1000).unwrap(),
                    properties,
                };
                let quote = store
                    .execute(
                        Command::Quote {
                            customer_id: id("cust"),
                            usage: usage.clone(),
                            member_id: None,
                        },
                        None,
                    )
                    .await
                    .expect("quote answers")
                    .result;
                let charge = store
                    .execute(
                        Command::Charge(NewCharge {
                            id: id(&format!("ch{n}")),
                            customer_id: id("cust"),
                            amount: None,
                            feature: Some(usage.feature.clone()),
                            usage: Some(usage),
                            member_id: None,
                            reason: None,
                            metadata: None,
                        }),
                        None,
                    )
                    .await
                    .expect("charge answers")
                    .result;
                let Ok(Outcome::Quote(quote)) = quote else {
                    return Err(TestCaseError::fail(format!("quote failed: {quote:?}")));
                };
                match charge {
                    Ok(Outcome::Charge(charge)) => {
                        prop_assert!(
                            quote.refusal.is_none(),
                            "charged but the quote said it would not fit"
                        );
                        prop_assert_eq!(Some(&quote.pricing), charge.pricing.as_ref());
                        prop_assert_eq!(quote.pricing.cost, charge.amount);
                        prop_assert_eq!(&quote.drawn, &charge.drawn);
                        prop_assert_eq!(quote.balance_after, charge.balance_after);
                    }
                    Err(refusal) if refusal.code == "insufficient_credits" => {
                        // The quote's refusal is the charge's, word for word.
                        prop_assert_eq!(quote.refusal.as_ref(), Some(&refusal));
                        // Nothing would be drawn and the balance would not move.
                        prop_assert!(quote.drawn.is_empty());
                        prop_assert_eq!(quote.balance_after, quote.available);
                    }
                    other => {
                        return Err(TestCaseError::fail(format!("charge: {other:?}")));
                    }
                }
            }
        }
    }
    drop(store);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(128), ..ProptestConfig::default() })]

    #[test]
    fn a_quote_equals_the_charge_that_follows(
        steps in proptest::collection::vec(step(), 1..30),
        contract in any::<bool>(),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(run_case(steps, contract))?;
    }
}

#[tokio::test]
async fn versions_and_contracts_survive_a_reopen() {
    let place = TestStore::new("reopen");
    let clock = Arc::new(ManualClock::new(START));
    let charge = |n: &str, feature: &str| {
        Command::Charge(NewCharge {
            id: id(n),
            customer_id: id("cust"),
            amount: None,
            feature: Some(feature.into()),
            usage: Some(UsageInput {
                feature: feature.into(),
                quantity: amount("10"),
                properties: BTreeMap::new(),
            }),
            member_id: None,
            reason: None,
            metadata: None,
        })
    };
    let cost = |outcome: Outcome| match outcome {
        Outcome::Charge(c) => (c.amount, c.pricing.expect("priced").rule_label()),
        other => panic!("not a charge: {other:?}"),
    };
    {
        let store = place.open(clock.clone()).await;
        setup(&store).await;
        ok(
            &store,
            Command::Grant(NewGrant {
                id: id("g"),
                customer_id: id("cust"),
                amount: amount("100000"),
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
        )
        .await;
        ok(
            &store,
            Command::PutContract {
                id: id("k1"),
                customer_id: id("cust"),
                contract: Contract {
                    id: "k1".into(),
                    effective_from: None,
                    effective_to: None,
                    rules: Vec::new(),
                    multiplier: Some(amount("0.5")),
                    pinned_pricebook: None,
                    lock_rates: false,
                },
                lock_rates: false,
            },
        )
        .await;
        // a: 10 × 0.333333 = 3.33333, × 0.5 = 1.666665.
        assert_eq!(
            cost(ok(&store, charge("before", "a")).await),
            (amount("1.666665"), "v1 rule 0".into())
        );
    }
    let store = place.open(clock.clone()).await;
    assert_eq!(
        cost(ok(&store, charge("after", "a")).await),
        (amount("1.666665"), "v1 rule 0".into())
    );
    // A retry of the first charge replays its stored outcome, pricing included.
    let replay = store.execute(charge("before", "a"), None).await.unwrap();
    assert!(replay.replayed);
    assert_eq!(
        cost(replay.result.unwrap()),
        (amount("1.666665"), "v1 rule 0".into())
    );
    drop(store);
}
