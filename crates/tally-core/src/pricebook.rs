//! Versions of the price book and customer contracts: which rules price usage
//! at a given instant, for a given customer.
//!
//! Pure, like [`crate::pricing`], which prices one quantity under one list of
//! rules. This module adds time and the customer:
//!
//! * [`PriceBook::in_effect`]: the published version in effect at an instant
//!   (the latest `effective_at` at or before it; between two versions with the
//!   same `effective_at`, the one published last).
//! * [`Contract`]: a customer's own terms inside an effective window: its own
//!   rules (which win over every price book rule), a pinned version (rates
//!   locked), and a multiplier on price book prices.
//! * [`price_usage`]: the whole resolution, most specific first:
//!   contract rule > plan+region > plan > region > default rule of the version
//!   that applies (the pinned one, or the one in effect at the usage's time).
//! * [`diff`]: what changed between two lists of rules.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::amount::Amount;
use crate::pricing::{self, PricingContext, PricingError, Quantity, Rule};
use crate::time::Timestamp;

/// A published version of the price book, as pricing needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    pub id: String,
    pub effective_at: Timestamp,
    /// Publication order (later publications win ties on `effective_at`).
    pub published_seq: i64,
    pub rules: Vec<Rule>,
}

/// Every published version.
#[derive(Clone, Debug, Default)]
pub struct PriceBook {
    /// Sorted by (`effective_at`, `published_seq`).
    versions: Vec<Version>,
}

impl PriceBook {
    pub fn new(mut versions: Vec<Version>) -> PriceBook {
        versions.sort_by_key(|v| (v.effective_at, v.published_seq));
        PriceBook { versions }
    }

    /// Add a newly published version.
    pub fn publish(&mut self, version: Version) {
        let at = self.versions.partition_point(|v| {
            (v.effective_at, v.published_seq) <= (version.effective_at, version.published_seq)
        });
        self.versions.insert(at, version);
    }

    /// The version in effect at `at`, if any was effective by then.
    pub fn in_effect(&self, at: Timestamp) -> Option<&Version> {
        let after = self.versions.partition_point(|v| v.effective_at <= at);
        after.checked_sub(1).map(|i| &self.versions[i])
    }

    pub fn get(&self, id: &str) -> Option<&Version> {
        self.versions.iter().find(|v| v.id == id)
    }

    pub fn versions(&self) -> &[Version] {
        &self.versions
    }
}

/// A customer's contract: terms that override the price book inside
/// `[effective_from, effective_to)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contract {
    pub id: String,
    pub effective_from: Option<Timestamp>,
    pub effective_to: Option<Timestamp>,
    /// The customer's own prices (no plan or region: the contract is the
    /// customer's). A fixed price per N actions is a `block` rule here.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Multiplies every price taken from the price book (not the contract's
    /// own rules): 0.8 is a 20% discount. Rounded up to the micro-credit.
    pub multiplier: Option<Amount>,
    /// Price book rates locked to this version for the contract's window.
    pub pinned_pricebook: Option<String>,
    /// Price book rates locked to the version in effect at
    /// `effective_from` (a start still to come when the contract was set:
    /// a version published before then, in effect by then, is the one).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lock_rates: bool,
}

impl Contract {
    /// What is wrong with the contract's terms on their own, if anything, as
    /// the field at fault and why: its window the wrong way round, or a rule
    /// with a plan or region. (Whether its features and pinned version exist
    /// is the catalog's to say.)
    pub fn fault(&self) -> Option<(String, &'static str)> {
        if let (Some(from), Some(to)) = (self.effective_from, self.effective_to) {
            if to <= from {
                return Some((
                    "effective_to".into(),
                    "effective_to must be after effective_from",
                ));
            }
        }
        self.rules
            .iter()
            .position(|r| r.plan.is_some() || r.region.is_some())
            .map(|n| {
                (
                    format!("rules[{n}]"),
                    "a contract's rules are the customer's own: they take no plan or region",
                )
            })
    }

    pub fn in_effect(&self, at: Timestamp) -> bool {
        self.effective_from.is_none_or(|from| from <= at)
            && self.effective_to.is_none_or(|to| at < to)
    }
}

/// Usage to price.
#[derive(Clone, Copy, Debug)]
pub struct Usage<'a> {
    pub feature: &'a str,
    pub quantity: Quantity,
    pub properties: &'a BTreeMap<String, String>,
    pub plan: Option<&'a str>,
    pub region: Option<&'a str>,
    /// When the usage happened: decides the version and whether the contract applies.
    pub at: Timestamp,
}

/// Where a price came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum PriceSource {
    /// A rule of the customer's contract.
    Contract {
        contract_id: String,
        rule_index: usize,
    },
    /// A rule of a price book version, maybe multiplied by the contract.
    Pricebook {
        pricebook: String,
        rule_index: usize,
        /// The version was pinned by the customer's contract (rates locked).
        #[serde(default)]
        pinned: bool,
        multiplier: Option<Amount>,
        contract_id: Option<String>,
    },
}

/// A priced usage: the cost and exactly what priced it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pricing {
    pub feature: String,
    pub quantity: Quantity,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
    pub cost: Amount,
    #[serde(flatten)]
    pub source: PriceSource,
    /// The rule itself, as it was when it priced the usage.
    pub rule: Rule,
    /// The instant whose prices applied (the usage's own time: a late event
    /// is priced by the version in effect when it happened).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priced_at: Option<Timestamp>,
    /// The cost was given as an amount (a hold captured by amount), not
    /// priced from `quantity`, which is then the quantity the hold priced.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub by_amount: bool,
    /// What the rule priced, when more than `cost`: a hold's captured
    /// quantity is charged at most what the hold reserved (fewer units can
    /// cost more under volume tiers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncapped: Option<Amount>,
}

impl Pricing {
    /// The version that priced it, when a price book did.
    pub fn pricebook(&self) -> Option<&str> {
        match &self.source {
            PriceSource::Pricebook { pricebook, .. } => Some(pricebook),
            PriceSource::Contract { .. } => None,
        }
    }

    /// `"pricebook v2, rule 3"` or `"contract c1, rule 0"`.
    pub fn rule_label(&self) -> String {
        match &self.source {
            PriceSource::Contract {
                contract_id,
                rule_index,
            } => format!("contract {contract_id} rule {rule_index}"),
            PriceSource::Pricebook {
                pricebook,
                rule_index,
                ..
            } => format!("{pricebook} rule {rule_index}"),
        }
    }

    /// The quantity used: none for a capture by amount, whose units are not
    /// known (`quantity` is then the hold's).
    pub fn used_quantity(&self) -> Option<Quantity> {
        (!self.by_amount).then_some(self.quantity)
    }

    /// Price another quantity by the same rule (a hold's captured quantity:
    /// the price was locked when the hold was placed).
    pub fn reprice(&self, quantity: Quantity) -> Result<Pricing, PricingError> {
        let cost = match &self.source {
            PriceSource::Pricebook {
                multiplier: Some(m),
                ..
            } => self.rule.price.cost_times(quantity, *m)?,
            _ => self.rule.price.cost(quantity)?,
        };
        Ok(Pricing {
            quantity,
            cost,
            by_amount: false,
            uncapped: None,
            ..self.clone()
        })
    }

    /// In words, for the ledger's explanation.
    pub fn describe(&self) -> String {
        if self.by_amount {
            return format!(
                "{} credits captured by amount from a hold of {} {} priced by {} ({})",
                self.cost,
                self.quantity,
                self.feature,
                self.rule_label(),
                describe_price(&self.rule.price)
            );
        }
        let mut text = format!(
            "{} {} priced by {} ({})",
            self.quantity,
            self.feature,
            self.rule_label(),
            describe_price(&self.rule.price)
        );
        if let PriceSource::Pricebook {
            pinned,
            multiplier,
            contract_id,
            ..
        } = &self.source
        {
            if *pinned {
                text.push_str(&format!(
                    ", rates locked by contract {}",
                    contract_id.as_deref().unwrap_or("?")
                ));
            }
            if let Some(m) = multiplier {
                text.push_str(&format!(
                    ", times {m} by contract {}",
                    contract_id.as_deref().unwrap_or("?")
                ));
            }
        }
        match self.uncapped {
            Some(priced) => text.push_str(&format!(
                " = {priced} credits, capped at the {} the hold reserved",
                self.cost
            )),
            None => text.push_str(&format!(" = {} credits", self.cost)),
        }
        text
    }
}

/// "6 credits per unit", "8 credits per started block of 1000", "graduated tiers".
pub fn describe_price(price: &pricing::Price) -> String {
    match price {
        pricing::Price::PerUnit { credits_per_unit } => {
            format!("{credits_per_unit} credits per unit")
        }
        pricing::Price::Block { size, credits } => {
            format!("{credits} credits per started block of {size}")
        }
        pricing::Price::Tiers { mode, steps } => {
            let steps: Vec<String> = steps
                .iter()
                .map(|s| match s.up_to {
                    Some(up_to) => format!("up to {up_to} at {}", s.credits_per_unit),
                    None => format!("then {}", s.credits_per_unit),
                })
                .collect();
            let mode = match mode {
                pricing::TierMode::Graduated => "graduated",
                pricing::TierMode::Volume => "volume",
            };
            format!("{mode} tiers: {}", steps.join(", "))
        }
    }
}

/// No version is in effect at `at` (shown in RFC 3339 when representable).
fn no_version(at: Timestamp) -> PricingError {
    let text = time_text(at);
    PricingError::NoVersion { at: text }
}

/// RFC 3339 without a date library: days from the civil calendar algorithm.
fn time_text(at: Timestamp) -> String {
    let seconds = at.0.div_euclid(1_000_000);
    let micros = at.0.rem_euclid(1_000_000);
    let (days, rest) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let fraction = if micros == 0 {
        String::new()
    } else {
        format!(".{micros:06}")
    };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}{fraction}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Price usage for a customer: the contract's rules first (when the contract
/// is in effect at the usage's time), else the price book version the
/// contract pins, else the version in effect at the usage's time, resolved by
/// plan and region, times the contract's multiplier.
///
/// `book_override` replaces the version in effect (a simulation of a draft);
/// a pinned version still wins over it, as it would after publication.
pub fn price_usage(
    book: &PriceBook,
    book_override: Option<&Version>,
    contract: Option<&Contract>,
    usage: &Usage<'_>,
) -> Result<Pricing, PricingError> {
    if !usage.quantity.is_positive() {
        return Err(PricingError::InvalidQuantity {
            quantity: usage.quantity,
        });
    }
    let contract = contract.filter(|c| c.in_effect(usage.at));
    let ctx = PricingContext {
        plan: usage.plan,
        region: usage.region,
        properties: usage.properties,
    };
    let pricing_of = |rule: &Rule, cost: Amount, source: PriceSource| Pricing {
        feature: usage.feature.to_owned(),
        quantity: usage.quantity,
        properties: usage.properties.clone(),
        cost,
        source,
        rule: rule.clone(),
        priced_at: Some(usage.at),
        by_amount: false,
        uncapped: None,
    };
    if let Some(contract) = contract {
        match pricing::price(&contract.rules, usage.feature, usage.quantity, &ctx) {
            Ok(priced) => {
                return Ok(pricing_of(
                    &contract.rules[priced.rule_index],
                    priced.cost,
                    PriceSource::Contract {
                        contract_id: contract.id.clone(),
                        rule_index: priced.rule_index,
                    },
                ))
            }
            Err(PricingError::UnknownFeature { .. } | PricingError::NoPrice { .. }) => {}
            Err(other) => return Err(other),
        }
    }
    // Published versions never change and none takes effect in the past,
    // so once the contract has started, the version in effect at its start
    // is settled.
    let locked = contract
        .filter(|c| c.lock_rates)
        .and_then(|c| c.effective_from)
        .and_then(|from| book.in_effect(from))
        .map(|version| version.id.as_str());
    let pinned = contract
        .and_then(|c| c.pinned_pricebook.as_deref())
        .or(locked);
    let version = match pinned {
        Some(id) => book.get(id).ok_or_else(|| PricingError::NoPrice {
            feature: format!(
                "{} (pinned price book {id} is not published)",
                usage.feature
            ),
        })?,
        None => match book_override {
            Some(version) => version,
            None => book
                .in_effect(usage.at)
                .ok_or_else(|| no_version(usage.at))?,
        },
    };
    let priced = pricing::price(&version.rules, usage.feature, usage.quantity, &ctx)?;
    let multiplier = contract.and_then(|c| c.multiplier);
    // Multiplied from the exact cost, so the result is rounded only once.
    let cost = match multiplier {
        Some(m) => version.rules[priced.rule_index]
            .price
            .cost_times(usage.quantity, m)?,
        None => priced.cost,
    };
    Ok(pricing_of(
        &version.rules[priced.rule_index],
        cost,
        PriceSource::Pricebook {
            pricebook: version.id.clone(),
            rule_index: priced.rule_index,
            pinned: pinned.is_some(),
            multiplier,
            contract_id: contract.map(|c| c.id.clone()),
        },
    ))
}

/// What happened to one rule between two versions. Rules are matched by what
/// they apply to: feature, plan, region and event properties.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleChange {
    /// `added`, `removed` or `changed`.
    pub change: String,
    /// "ai_message for plan enterprise in every region when model = gpt-4".
    pub applies_to: String,
    pub before: Option<Rule>,
    pub after: Option<Rule>,
}

/// The rules added, removed and re-priced from `before` to `after`.
pub fn diff(before: &[Rule], after: &[Rule]) -> Vec<RuleChange> {
    type Key = (
        String,
        Option<String>,
        Option<String>,
        BTreeMap<String, String>,
    );
    let key = |r: &Rule| -> Key {
        (
            r.feature.clone(),
            r.plan.clone(),
            r.region.clone(),
            r.matches.clone(),
        )
    };
    let old: BTreeMap<Key, &Rule> = before.iter().map(|r| (key(r), r)).collect();
    let new: BTreeMap<Key, &Rule> = after.iter().map(|r| (key(r), r)).collect();
    let mut changes = Vec::new();
    let mut keys: Vec<&Key> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        let (b, a) = (old.get(k).copied(), new.get(k).copied());
        let change = match (b, a) {
            (Some(b), Some(a)) if b == a => continue,
            (Some(_), Some(_)) => "changed",
            (None, Some(_)) => "added",
            (Some(_), None) => "removed",
            (None, None) => continue,
        };
        let rule = a.or(b).expect("one side exists");
        changes.push(RuleChange {
            change: change.to_owned(),
            applies_to: rule.describe(),
            before: b.cloned(),
            after: a.cloned(),
        });
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::Price;

    fn a(text: &str) -> Amount {
        Amount::parse(text).unwrap()
    }
    fn unit(feature: &str, credits: &str) -> Rule {
        Rule::new(
            feature,
            Price::PerUnit {
                credits_per_unit: a(credits),
            },
        )
    }
    fn version(id: &str, at: i64, seq: i64, rules: Vec<Rule>) -> Version {
        Version {
            id: id.into(),
            effective_at: Timestamp(at),
            published_seq: seq,
            rules,
        }
    }
    fn usage<'a>(
        feature: &'a str,
        props: &'a BTreeMap<String, String>,
        plan: Option<&'a str>,
        at: i64,
    ) -> Usage<'a> {
        Usage {
            feature,
            quantity: a("1"),
            properties: props,
            plan,
            region: None,
            at: Timestamp(at),
        }
    }

    #[test]
    fn the_version_in_effect_changes_exactly_at_effective_at() {
        let book = PriceBook::new(vec![
            version("v2", 1_000, 2, vec![unit("x", "5")]),
            version("v1", 0, 1, vec![unit("x", "8")]),
        ]);
        let none = BTreeMap::new();
        let cost = |at| {
            price_usage(&book, None, None, &usage("x", &none, None, at))
                .map(|p| (p.cost, p.pricebook().map(str::to_owned)))
        };
        assert_eq!(cost(999), Ok((a("8"), Some("v1".into()))));
        assert_eq!(cost(1_000), Ok((a("5"), Some("v2".into()))));
        assert_eq!(cost(1_001), Ok((a("5"), Some("v2".into()))));
        assert!(matches!(cost(-1), Err(PricingError::NoVersion { .. })));
    }

    #[test]
    fn times_are_written_in_rfc3339() {
        assert_eq!(time_text(Timestamp(0)), "1970-01-01T00:00:00Z");
        assert_eq!(
            time_text(Timestamp(2_208_988_800_000_001)),
            "2040-01-01T00:00:00.000001Z"
        );
        assert_eq!(
            time_text(Timestamp(951_782_400_000_000)),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn a_later_publication_wins_a_tie_on_effective_at() {
        let mut book = PriceBook::new(vec![version("v1", 10, 1, vec![unit("x", "1")])]);
        book.publish(version("v2", 10, 2, vec![unit("x", "2")]));
        assert_eq!(book.in_effect(Timestamp(10)).unwrap().id, "v2");
        assert_eq!(book.in_effect(Timestamp(9)), None);
    }

    #[test]
    fn resolution_order_contract_then_plan_region_then_plan_then_region_then_default() {
        let rules = vec![
            unit("x", "1"),
            unit("x", "2").with_region("eu"),
            unit("x", "3").with_plan("pro"),
            unit("x", "4").with_plan("pro").with_region("eu"),
        ];
        let book = PriceBook::new(vec![version("v1", 0, 1, rules)]);
        let contract = Contract {
            id: "c".into(),
            effective_from: Some(Timestamp(100)),
            effective_to: Some(Timestamp(200)),
            rules: vec![unit("x", "0.5")],
            multiplier: None,
            pinned_pricebook: None,
            lock_rates: false,
        };
        let none = BTreeMap::new();
        // (plan, region, contract, at, expected cost)
        type Case<'a> = (
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a Contract>,
            i64,
            &'a str,
        );
        let table: &[Case] = &[
            (None, None, None, 0, "1"),
            (None, Some("eu"), None, 0, "2"),
            (Some("pro"), None, None, 0, "3"),
            (Some("pro"), Some("eu"), None, 0, "4"),
            (Some("pro"), Some("us"), None, 0, "3"),
            (Some("free"), Some("eu"), None, 0, "2"),
            (Some("pro"), Some("eu"), Some(&contract), 150, "0.5"),
            // Outside its window the contract does nothing.
            (Some("pro"), Some("eu"), Some(&contract), 99, "4"),
            (Some("pro"), Some("eu"), Some(&contract), 200, "4"),
        ];
        for (plan, region, contract, at, expected) in table {
            let mut u = usage("x", &none, *plan, *at);
            u.region = *region;
            let priced = price_usage(&book, None, *contract, &u).unwrap();
            assert_eq!(priced.cost, a(expected), "{plan:?} {region:?} at {at}");
        }
    }

    #[test]
    fn contract_pins_rates_and_multiplies_book_prices_only() {
        let mut book = PriceBook::new(vec![version(
            "v1",
            0,
            1,
            vec![unit("x", "8"), unit("y", "1")],
        )]);
        book.publish(version(
            "v2",
            1_000,
            2,
            vec![unit("x", "10"), unit("y", "1")],
        ));
        let none = BTreeMap::new();
        let locked = Contract {
            id: "c".into(),
            effective_from: None,
            effective_to: None,
            rules: vec![Rule::new(
                "y",
                Price::Block {
                    size: a("1000"),
                    credits: a("3"),
                },
            )],
            multiplier: Some(a("0.5")),
            pinned_pricebook: Some("v1".into()),
            lock_rates: false,
        };
        let at = |feature, t| {
            price_usage(&book, None, Some(&locked), &usage(feature, &none, None, t)).unwrap()
        };
        // The price increase to 10 does not reach the locked customer: 8 × 0.5.
        assert_eq!(at("x", 2_000).cost, a("4"));
        assert_eq!(at("x", 2_000).pricebook(), Some("v1"));
        // The contract's own rule is not multiplied: 1 action = 1 started block = 3.
        assert_eq!(at("y", 2_000).cost, a("3"));
        assert!(at("x", 2_000).describe().contains("rates locked"));
        // Another customer pays the new price.
        assert_eq!(
            price_usage(&book, None, None, &usage("x", &none, None, 2_000))
                .unwrap()
                .cost,
            a("10")
        );
    }

    #[test]
    fn a_multiplier_rounds_once_from_the_exact_cost() {
        let book = PriceBook::new(vec![version("v1", 0, 1, vec![unit("r", "0.333333")])]);
        let contract = Contract {
            id: "k".into(),
            effective_from: None,
            effective_to: None,
            rules: Vec::new(),
            multiplier: Some(a("3")),
            pinned_pricebook: None,
            lock_rates: false,
        };
        let none = BTreeMap::new();
        let mut u = usage("r", &none, None, 0);
        u.quantity = a("0.5");
        // 0.5 × 0.333333 × 3 = 0.4999995 exactly: 0.5, not 0.166667 × 3 = 0.500001.
        let priced = price_usage(&book, None, Some(&contract), &u).unwrap();
        assert_eq!(priced.cost, a("0.5"));
        assert_eq!(priced.reprice(a("0.5")).unwrap().cost, a("0.5"));
    }

    #[test]
    fn a_locked_hold_reprices_by_its_rule() {
        let book = PriceBook::new(vec![version("v1", 0, 1, vec![unit("x", "2.5")])]);
        let none = BTreeMap::new();
        let mut u = usage("x", &none, None, 0);
        u.quantity = a("10");
        let held = price_usage(&book, None, None, &u).unwrap();
        assert_eq!(held.cost, a("25"));
        let captured = held.reprice(a("3")).unwrap();
        assert_eq!((captured.cost, captured.quantity), (a("7.5"), a("3")));
    }

    #[test]
    fn diff_names_added_removed_and_changed_rules() {
        let before = vec![unit("a", "1"), unit("b", "2"), unit("c", "3")];
        let after = vec![unit("a", "1"), unit("b", "5"), unit("d", "4")];
        let changes: Vec<(String, String)> = diff(&before, &after)
            .into_iter()
            .map(|c| (c.change, c.applies_to))
            .collect();
        assert_eq!(
            changes,
            vec![
                (
                    "changed".into(),
                    "b for every plan in every region for all usage".into()
                ),
                (
                    "removed".into(),
                    "c for every plan in every region for all usage".into()
                ),
                (
                    "added".into(),
                    "d for every plan in every region for all usage".into()
                ),
            ]
        );
    }
}
