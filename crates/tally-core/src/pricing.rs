//! The pricing engine of the price book: which rule prices a usage event, and
//! what that usage costs.
//!
//! Pure and exact. A version of the price book is a list of [`Rule`]s; storing
//! versions, choosing the version in effect and customer contracts live
//! elsewhere. This module answers three questions:
//!
//! * [`validate`]: is this list of rules publishable? Every problem names the
//!   rules (by their 0-based position in the list) and says what is wrong.
//! * [`resolve`]: which rule prices this feature for this plan, region and
//!   event properties? Most specific wins (see [`Rule::specificity`]).
//! * [`price`] and [`Price::cost`]: what does this quantity cost?
//!
//! # Rounding
//!
//! Quantities and prices are [`Amount`]s (six decimals). Every product is
//! computed exactly in `i128` on micro-units, and a cost is rounded **up** to the
//! micro-credit exactly once, at the end; nothing is ever a float and nothing
//! ever rounds down. Anything that would exceed the maximum amount is
//! [`PricingError::Overflow`], never a wrapped or saturated value.
//!
//! ```
//! use tally_core::pricing::Price;
//! use tally_core::Amount;
//! let a = |text| Amount::parse(text).unwrap();
//!
//! // 1,001 actions at 8 credits per 1,000 = 2 started blocks = 16 credits.
//! let block = Price::Block { size: a("1000"), credits: a("8") };
//! assert_eq!(block.cost(a("1001")), Ok(a("16")));
//!
//! // 3 units at 0.333333 = 0.999999 (exact, nothing to round).
//! let per_unit = Price::PerUnit { credits_per_unit: a("0.333333") };
//! assert_eq!(per_unit.cost(a("3")), Ok(a("0.999999")));
//!
//! // 0.5 units at 0.000001 = 0.0000005, rounded up to 0.000001.
//! let tiny = Price::PerUnit { credits_per_unit: a("0.000001") };
//! assert_eq!(tiny.cost(a("0.5")), Ok(a("0.000001")));
//! ```
//!
//! # JSON
//!
//! [`Rule`] and [`Price`] (de)serialize in the shape of the API:
//! `{"feature": "ai_message", "plan": "enterprise", "region": "eu", "match":
//! {"model": "gpt-4"}, "credits_per_unit": "6"}`, with the price one of
//! `"credits_per_unit": "6"`, `"block": {"size": 1000, "credits": "8"}` or
//! `"tiers": {"mode": "graduated", "steps": [{"up_to": 100, "credits_per_unit":
//! "1"}, {"up_to": null, "credits_per_unit": "0.5"}]}`. Unknown fields are
//! refused (a misspelt `"regoin"` must not silently make a rule global).
//!
//! Credits are written as decimal strings; quantities (`size`, `up_to`) as
//! integers when whole, decimal strings otherwise. Reading accepts, for any of
//! them, a decimal string, an integer, the exact decimal text of a number that
//! `serde_json` hands over with its `arbitrary_precision` feature (which this
//! workspace enables), or a float when it is provably the number as written
//! (whole, or below 1e9 so at most 15 significant digits, as happens through
//! `serde_json::Value`); any other float is refused ("send it as a string")
//! rather than rounded.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::amount::{Amount, MICROS_PER_UNIT};

/// A quantity of a feature's unit (rows, tokens, seconds...): an [`Amount`]
/// with six decimals, so units may be fractional. A priced quantity must be
/// greater than zero.
pub type Quantity = Amount;

const MICROS: i128 = MICROS_PER_UNIT as i128;
const MICROS_I64: i64 = MICROS_PER_UNIT;

// ---------------------------------------------------------------------------
// Prices
// ---------------------------------------------------------------------------

/// How a tiered price applies its tiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TierMode {
    /// Each unit is priced at the rate of the tier it falls in: with tiers
    /// "up to 100 at 1, then 0.5", 150 units cost 100 × 1 + 50 × 0.5 = 125.
    Graduated,
    /// All units are priced at the rate of the tier the whole quantity falls
    /// in: with the same tiers, 150 units cost 150 × 0.5 = 75, and 100 units
    /// cost 100 × 1 = 100 (`up_to` is inclusive).
    Volume,
}

/// One tier of a tiered price.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// The last quantity (inclusive) in this tier; `None` is unlimited and is
    /// allowed, and required, only on the last step.
    #[serde(default, with = "wire::opt_quantity")]
    pub up_to: Option<Quantity>,
    #[serde(with = "wire::credits")]
    pub credits_per_unit: Amount,
}

/// What a quantity of a feature costs.
///
/// Every variant rounds the final cost up to the micro-credit, once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "wire::PriceWire", into = "wire::PriceWire")]
pub enum Price {
    /// `quantity × credits_per_unit`: 3 units at 0.333333 = 0.999999;
    /// 0.5 units at 0.000001 = 0.0000005, rounded up to 0.000001.
    PerUnit { credits_per_unit: Amount },
    /// `credits` per **started** block of `size` units, so
    /// blocks = ceil(quantity / size): 1,001 actions at 8 credits per 1,000 =
    /// 2 blocks = 16 credits; 1,000 actions = 1 block = 8 credits.
    Block { size: Quantity, credits: Amount },
    /// Tiers with strictly increasing `up_to`, the last one unlimited. See
    /// [`TierMode`]. The graduated sum is computed exactly and rounded once:
    /// 1.5 units with "up to 1 at 1, then 0.333333" = 1 + 0.1666665 = 1.166667.
    Tiers { mode: TierMode, steps: Vec<Step> },
}

impl Price {
    /// The cost of `quantity` units, rounded up to the micro-credit.
    ///
    /// Errors: [`PricingError::InvalidQuantity`] unless `quantity > 0`;
    /// [`PricingError::InvalidPrice`] if the price would not pass [`validate`];
    /// [`PricingError::Overflow`] if the cost exceeds the maximum amount.
    pub fn cost(&self, quantity: Quantity) -> Result<Amount, PricingError> {
        to_amount(ceil_div(self.exact_cost(quantity)?, MICROS))
    }

    /// The cost of `quantity` units times `multiplier` (a contract's), rounded
    /// up to the micro-credit once, from the exact product: 0.5 units at
    /// 0.333333 times 3 is exactly 0.4999995, so 0.5 (not 0.166667 × 3).
    pub fn cost_times(
        &self,
        quantity: Quantity,
        multiplier: Amount,
    ) -> Result<Amount, PricingError> {
        if multiplier.is_negative() {
            return Err(PricingError::InvalidMultiplier { multiplier });
        }
        let exact = mul(self.exact_cost(quantity)?, multiplier.micros())?;
        to_amount(ceil_div(exact, MICROS * MICROS))
    }

    /// The exact cost in 10^-12 credits (micro-units × micro-credits).
    fn exact_cost(&self, quantity: Quantity) -> Result<i128, PricingError> {
        if !quantity.is_positive() {
            return Err(PricingError::InvalidQuantity { quantity });
        }
        if let Some((_, reason)) = self.problems().into_iter().next() {
            return Err(PricingError::InvalidPrice { reason });
        }
        let q = i128::from(quantity.micros());
        let exact = match self {
            Price::PerUnit { credits_per_unit } => mul(q, credits_per_unit.micros())?,
            Price::Block { size, credits } => {
                let blocks = ceil_div(q, i128::from(size.micros()));
                mul(mul(blocks, credits.micros())?, MICROS_I64)?
            }
            Price::Tiers {
                mode: TierMode::Graduated,
                steps,
            } => {
                // Sum in micro-units × micro-credits (1e-12 credits), round once.
                let mut total: i128 = 0;
                let mut lower: i128 = 0;
                for step in steps {
                    let upper = match step.up_to {
                        Some(up_to) => q.min(i128::from(up_to.micros())),
                        None => q,
                    };
                    if upper > lower {
                        let part = mul(upper - lower, step.credits_per_unit.micros())?;
                        total = total.checked_add(part).ok_or(PricingError::Overflow)?;
                    }
                    match step.up_to {
                        Some(up_to) if i128::from(up_to.micros()) < q => {
                            lower = i128::from(up_to.micros());
                        }
                        _ => break,
                    }
                }
                total
            }
            Price::Tiers {
                mode: TierMode::Volume,
                steps,
            } => {
                let step = steps
                    .iter()
                    .find(|step| step.up_to.is_none_or(|up_to| quantity <= up_to))
                    .ok_or_else(|| PricingError::InvalidPrice {
                        reason: "the last tier must be unlimited".to_owned(),
                    })?;
                mul(q, step.credits_per_unit.micros())?
            }
        };
        Ok(exact)
    }

    /// What is wrong with this price, in words for a product manager; empty
    /// when it is valid.
    fn problems(&self) -> Vec<(RuleProblemKind, String)> {
        let mut problems = Vec::new();
        let negative = |what: &str, amount: Amount| {
            (
                RuleProblemKind::NegativeCredits,
                format!("{what} is {amount} credits; a price cannot be negative"),
            )
        };
        match self {
            Price::PerUnit { credits_per_unit } => {
                if credits_per_unit.is_negative() {
                    problems.push(negative("the price per unit", *credits_per_unit));
                }
            }
            Price::Block { size, credits } => {
                if !size.is_positive() {
                    problems.push((
                        RuleProblemKind::BlockSizeNotPositive,
                        format!(
                            "the block size is {size} units; a block must hold more than 0 units"
                        ),
                    ));
                }
                if credits.is_negative() {
                    problems.push(negative("the price per block", *credits));
                }
            }
            Price::Tiers { steps, .. } => {
                if steps.is_empty() {
                    problems.push((
                        RuleProblemKind::NoTiers,
                        "the tiered price has no tiers; add at least one".to_owned(),
                    ));
                }
                let mut previous: Option<(usize, Amount)> = None;
                for (position, step) in steps.iter().enumerate() {
                    let tier = position + 1;
                    let last = tier == steps.len();
                    if step.credits_per_unit.is_negative() {
                        problems.push(negative(
                            &format!("the price per unit of tier {tier}"),
                            step.credits_per_unit,
                        ));
                    }
                    match step.up_to {
                        None if !last => problems.push((
                            RuleProblemKind::UnlimitedTierNotLast,
                            format!(
                                "tier {tier} has no upper limit but is not the last tier; \
                                 only the last tier may be unlimited"
                            ),
                        )),
                        None => {}
                        Some(up_to) => {
                            match previous {
                                Some((before_tier, before)) if up_to <= before => problems.push((
                                    RuleProblemKind::TiersNotIncreasing,
                                    format!(
                                        "tier {tier} ends at {up_to} units, which is not above \
                                         where tier {before_tier} ends ({before} units); each \
                                         tier must end higher than the one before"
                                    ),
                                )),
                                None if !up_to.is_positive() => problems.push((
                                    RuleProblemKind::TiersNotIncreasing,
                                    format!(
                                        "tier {tier} ends at {up_to} units; \
                                         a tier must end above 0 units"
                                    ),
                                )),
                                _ => {}
                            }
                            if last {
                                problems.push((
                                    RuleProblemKind::LastTierLimited,
                                    format!(
                                        "the last tier ends at {up_to} units, so usage above \
                                         {up_to} units would have no price; leave the last \
                                         tier's upper limit empty (\"up_to\": null)"
                                    ),
                                ));
                            }
                            previous = Some((tier, up_to));
                        }
                    }
                }
            }
        }
        problems
    }
}

fn mul(a: i128, b: i64) -> Result<i128, PricingError> {
    a.checked_mul(i128::from(b)).ok_or(PricingError::Overflow)
}

/// `ceil(n / d)` for `d > 0`, for any sign of `n`.
fn ceil_div(n: i128, d: i128) -> i128 {
    debug_assert!(d > 0);
    let quotient = n.div_euclid(d);
    if n.rem_euclid(d) == 0 {
        quotient
    } else {
        quotient + 1
    }
}

fn to_amount(micros: i128) -> Result<Amount, PricingError> {
    i64::try_from(micros)
        .ok()
        .and_then(Amount::from_micros)
        .ok_or(PricingError::Overflow)
}

/// A contract's multiplier applied to a cost: `cost × multiplier`, rounded up
/// to the micro-credit (toward positive infinity). 10 credits at 0.8 = 8;
/// 0.000001 at 0.5 = 0.0000005, rounded up to 0.000001.
///
/// Errors: [`PricingError::InvalidMultiplier`] if the multiplier is negative
/// (0 is allowed: free of charge); [`PricingError::Overflow`] past the maximum
/// amount.
pub fn apply_multiplier(cost: Amount, multiplier: Amount) -> Result<Amount, PricingError> {
    if multiplier.is_negative() {
        return Err(PricingError::InvalidMultiplier { multiplier });
    }
    let product = mul(i128::from(cost.micros()), multiplier.micros())?;
    to_amount(ceil_div(product, MICROS))
}

// ---------------------------------------------------------------------------
// Rules and resolution
// ---------------------------------------------------------------------------

/// One line of a price book: the price of a feature, optionally only for a
/// plan, a region and events whose properties equal `matches`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "wire::RuleWire", into = "wire::RuleWire")]
pub struct Rule {
    pub feature: String,
    /// `None`: every plan.
    pub plan: Option<String>,
    /// `None`: every region.
    pub region: Option<String>,
    /// Event properties that must all be present with exactly these values
    /// (`"match"` in JSON). Empty: every event.
    pub matches: BTreeMap<String, String>,
    pub price: Price,
}

impl Rule {
    /// A default rule: every plan, every region, every event.
    pub fn new(feature: impl Into<String>, price: Price) -> Rule {
        Rule {
            feature: feature.into(),
            plan: None,
            region: None,
            matches: BTreeMap::new(),
            price,
        }
    }

    pub fn with_plan(mut self, plan: impl Into<String>) -> Rule {
        self.plan = Some(plan.into());
        self
    }

    pub fn with_region(mut self, region: impl Into<String>) -> Rule {
        self.region = Some(region.into());
        self
    }

    /// Add a property condition.
    pub fn with_match(mut self, property: impl Into<String>, value: impl Into<String>) -> Rule {
        self.matches.insert(property.into(), value.into());
        self
    }

    /// The specificity level: plan+region 3, plan 2, region 1, default 0.
    ///
    /// Among the rules that apply, the highest level wins; within a level, a
    /// rule whose `matches` is a strict superset of another's wins. (The
    /// customer contract sits above all of these and is applied elsewhere.)
    pub fn specificity(&self) -> u8 {
        u8::from(self.plan.is_some()) * 2 + u8::from(self.region.is_some())
    }

    /// Whether this rule applies to usage in `ctx` (its feature aside).
    pub fn applies(&self, ctx: &PricingContext<'_>) -> bool {
        let dimension = |rule: &Option<String>, usage: Option<&str>| {
            rule.as_deref().is_none_or(|value| usage == Some(value))
        };
        dimension(&self.plan, ctx.plan)
            && dimension(&self.region, ctx.region)
            && self
                .matches
                .iter()
                .all(|(key, value)| ctx.properties.get(key) == Some(value))
    }

    /// "ai_message for plan enterprise in region eu".
    fn describe_scope(&self) -> String {
        let plan = match &self.plan {
            Some(plan) => format!("plan {plan}"),
            None => "every plan".to_owned(),
        };
        let region = match &self.region {
            Some(region) => format!("region {region}"),
            None => "every region".to_owned(),
        };
        format!("{} for {plan} in {region}", self.feature)
    }

    /// "ai_message for plan enterprise in region eu when model = gpt-4".
    pub fn describe(&self) -> String {
        format!(
            "{} {}",
            self.describe_scope(),
            describe_matches(&self.matches)
        )
    }
}

/// "when model = gpt-4 and tier = pro", or "for all usage".
fn describe_matches(matches: &BTreeMap<String, String>) -> String {
    if matches.is_empty() {
        return "for all usage".to_owned();
    }
    let conditions: Vec<String> = matches
        .iter()
        .map(|(key, value)| format!("{key} = {value}"))
        .collect();
    format!("when {}", conditions.join(" and "))
}

/// `a ⊆ b`: every condition of `a` is also a condition of `b`.
fn is_subset(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> bool {
    a.iter().all(|(key, value)| b.get(key) == Some(value))
}

/// `a ⊋ b`.
fn is_strict_superset(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> bool {
    a.len() > b.len() && is_subset(b, a)
}

/// Whether one event could satisfy both: no property is required with two
/// different values.
fn compatible(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> bool {
    a.iter()
        .all(|(key, value)| b.get(key).is_none_or(|other| other == value))
}

/// What is known about the usage being priced.
#[derive(Clone, Copy, Debug)]
pub struct PricingContext<'a> {
    /// The customer's plan, if any.
    pub plan: Option<&'a str>,
    /// The customer's region, if any.
    pub region: Option<&'a str>,
    /// The usage event's properties.
    pub properties: &'a BTreeMap<String, String>,
}

static NO_PROPERTIES: BTreeMap<String, String> = BTreeMap::new();

impl Default for PricingContext<'_> {
    /// No plan, no region, no properties: only default rules apply.
    fn default() -> Self {
        PricingContext {
            plan: None,
            region: None,
            properties: &NO_PROPERTIES,
        }
    }
}

/// A priced quantity and the rule (its 0-based position in the rules) that
/// priced it, to be recorded on the charge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Priced {
    pub cost: Amount,
    pub rule_index: usize,
}

/// Why usage could not be priced.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    /// No rule at all mentions this feature.
    #[error("feature {feature:?} is not in the price book")]
    UnknownFeature { feature: String },
    /// The feature has rules, but none applies to this plan, region and
    /// event properties.
    #[error("feature {feature:?} has no price for this plan, region and event properties")]
    NoPrice { feature: String },
    /// No version of the price book was in effect at the usage's time.
    #[error("no price book version is in effect at {at}; publish one effective at or before it")]
    NoVersion { at: String },
    #[error("quantity must be greater than zero, got {quantity}")]
    InvalidQuantity { quantity: Quantity },
    #[error("multiplier must be zero or more, got {multiplier}")]
    InvalidMultiplier { multiplier: Amount },
    #[error("the cost would exceed the maximum amount of 1000000000000 credits")]
    Overflow,
    /// The rule chosen has a price [`validate`] would refuse; only possible
    /// with rules that were not validated.
    #[error("invalid price: {reason}")]
    InvalidPrice { reason: String },
    /// Several rules apply and none is more specific; only possible with rules
    /// that were not validated. Tally never guesses a price.
    #[error("rules {rule_indexes:?} all price feature {feature:?} for this usage and none is more specific")]
    Ambiguous {
        feature: String,
        rule_indexes: Vec<usize>,
    },
}

/// The 0-based position of the rule that prices `feature` for `ctx`.
///
/// Candidates are the rules of that feature whose plan and region are unset or
/// equal to the context's and whose every `matches` pair is present and equal
/// in the context's properties. The highest [`Rule::specificity`] wins; within
/// it, the rule whose `matches` is a strict superset of every other
/// candidate's. For rules that pass [`validate`] that rule always exists.
pub fn resolve(
    rules: &[Rule],
    feature: &str,
    ctx: &PricingContext<'_>,
) -> Result<usize, PricingError> {
    let mut known = false;
    let mut level = 0;
    let mut candidates: Vec<usize> = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        if rule.feature != feature {
            continue;
        }
        known = true;
        if !rule.applies(ctx) {
            continue;
        }
        let specificity = rule.specificity();
        match specificity.cmp(&level) {
            Ordering::Greater => {
                level = specificity;
                candidates.clear();
                candidates.push(index);
            }
            Ordering::Equal => candidates.push(index),
            Ordering::Less => {}
        }
    }
    if !known {
        return Err(PricingError::UnknownFeature {
            feature: feature.to_owned(),
        });
    }
    let most_specific: Vec<usize> = candidates
        .iter()
        .copied()
        .filter(|&index| {
            !candidates
                .iter()
                .any(|&other| is_strict_superset(&rules[other].matches, &rules[index].matches))
        })
        .collect();
    match most_specific.as_slice() {
        [] => Err(PricingError::NoPrice {
            feature: feature.to_owned(),
        }),
        [index] => Ok(*index),
        _ => Err(PricingError::Ambiguous {
            feature: feature.to_owned(),
            rule_indexes: most_specific,
        }),
    }
}

/// Price `quantity` units of `feature` for `ctx`: [`resolve`] the rule, then
/// [`Price::cost`] (rounded up to the micro-credit).
///
/// [`PricingError::UnknownFeature`] when no rule mentions the feature,
/// [`PricingError::NoPrice`] when it has rules but none applies.
pub fn price(
    rules: &[Rule],
    feature: &str,
    quantity: Quantity,
    ctx: &PricingContext<'_>,
) -> Result<Priced, PricingError> {
    if !quantity.is_positive() {
        return Err(PricingError::InvalidQuantity { quantity });
    }
    let rule_index = resolve(rules, feature, ctx)?;
    let cost = rules[rule_index]
        .price
        .cost(quantity)
        .map_err(|error| match error {
            PricingError::InvalidPrice { reason } => PricingError::InvalidPrice {
                reason: format!("rule {rule_index}: {reason}"),
            },
            other => other,
        })?;
    Ok(Priced { cost, rule_index })
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

/// What kind of problem a rule has; stable, for programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleProblemKind {
    /// The rule names no feature.
    EmptyFeature,
    /// A plan, region or property name is blank.
    BlankCondition,
    /// A price is below zero.
    NegativeCredits,
    /// A block holds zero or fewer units.
    BlockSizeNotPositive,
    /// A tiered price without tiers.
    NoTiers,
    /// A tier does not end above the one before (or the first ends at 0 or less).
    TiersNotIncreasing,
    /// An unlimited tier before the last one.
    UnlimitedTierNotLast,
    /// The last tier has an upper limit, so larger usage has no price.
    LastTierLimited,
    /// Two rules can price the same usage and neither is more specific.
    Overlapping,
}

/// A reason a list of rules cannot be published.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleProblem {
    /// The 0-based positions of the rules concerned, ascending.
    pub rule_indexes: Vec<usize>,
    pub kind: RuleProblemKind,
    /// What is wrong and how to fix it, in plain words.
    pub message: String,
}

impl fmt::Display for RuleProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Check that `rules` can be published: every price is well formed (no
/// negative credits, blocks of more than 0 units, tiers strictly increasing
/// with only the last one unlimited), every rule names a feature, and no two
/// rules are ambiguous.
///
/// Two rules are ambiguous when they have the same feature, plan and region,
/// one event could match both, and neither's `matches` is a strict superset of
/// the other's: identical conditions, or conditions such as `model = gpt-4`
/// and `tier = pro`. The second case is accepted when another rule of the same
/// feature, plan and region matches exactly both conditions together
/// (`model = gpt-4 and tier = pro`): that rule then decides the usage matching
/// both, and every event still has exactly one most specific rule.
pub fn validate(rules: &[Rule]) -> Result<(), Vec<RuleProblem>> {
    let mut problems = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        let mut problem = |kind, message: String| {
            problems.push(RuleProblem {
                rule_indexes: vec![index],
                kind,
                message,
            });
        };
        if rule.feature.trim().is_empty() {
            problem(
                RuleProblemKind::EmptyFeature,
                format!("Rule {index} has no feature; every rule must name the feature it prices."),
            );
        }
        let describe = rule.describe();
        let blank = [
            ("plan", rule.plan.as_deref(), "to price every plan"),
            ("region", rule.region.as_deref(), "to price every region"),
        ];
        for (what, value, fix) in blank {
            if value.is_some_and(|v| v.trim().is_empty()) {
                problem(
                    RuleProblemKind::BlankCondition,
                    format!("Rule {index} ({describe}): the {what} is blank; leave it out {fix}."),
                );
            }
        }
        if rule.matches.keys().any(|key| key.trim().is_empty()) {
            problem(
                RuleProblemKind::BlankCondition,
                format!("Rule {index} ({describe}): a condition has a blank property name."),
            );
        }
        for (kind, reason) in rule.price.problems() {
            problem(kind, format!("Rule {index} ({describe}): {reason}."));
        }
    }

    // Rules with the same feature, plan and region.
    type Scope<'r> = (&'r str, Option<&'r str>, Option<&'r str>);
    let mut scopes: BTreeMap<Scope<'_>, Vec<usize>> = BTreeMap::new();
    for (index, rule) in rules.iter().enumerate() {
        scopes
            .entry((&rule.feature, rule.plan.as_deref(), rule.region.as_deref()))
            .or_default()
            .push(index);
    }
    for indexes in scopes.values() {
        let condition_sets: BTreeSet<&BTreeMap<String, String>> =
            indexes.iter().map(|&i| &rules[i].matches).collect();
        for (position, &i) in indexes.iter().enumerate() {
            for &j in &indexes[position + 1..] {
                let (a, b) = (&rules[i], &rules[j]);
                if !compatible(&a.matches, &b.matches) {
                    continue;
                }
                if a.matches == b.matches {
                    problems.push(RuleProblem {
                        rule_indexes: vec![i, j],
                        kind: RuleProblemKind::Overlapping,
                        message: format!(
                            "Rules {i} and {j} both price {}, so Tally cannot tell which \
                             price to charge. Remove one of them, or add a condition to one \
                             so that it is more specific.",
                            a.describe()
                        ),
                    });
                    continue;
                }
                if is_subset(&a.matches, &b.matches) || is_subset(&b.matches, &a.matches) {
                    continue;
                }
                let mut both = a.matches.clone();
                both.extend(b.matches.iter().map(|(k, v)| (k.clone(), v.clone())));
                if condition_sets.contains(&both) {
                    continue;
                }
                let both = describe_matches(&both);
                problems.push(RuleProblem {
                    rule_indexes: vec![i, j],
                    kind: RuleProblemKind::Overlapping,
                    message: format!(
                        "Rule {i} ({}) and rule {j} ({}) both price {}; usage {both} matches \
                         both and neither is more specific, so Tally cannot tell which price \
                         to charge. Add a rule for {} {both} to decide, or change one of them.",
                        describe_matches(&a.matches),
                        describe_matches(&b.matches),
                        a.describe_scope(),
                        a.describe_scope(),
                    ),
                });
            }
        }
    }

    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

// ---------------------------------------------------------------------------
// JSON shapes
// ---------------------------------------------------------------------------

mod wire {
    //! The API's JSON shapes for rules and prices, and decimal amounts.

    use std::collections::BTreeMap;
    use std::fmt;

    use serde::de::{self, MapAccess, Visitor};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{Price, Rule, Step, TierMode};
    use crate::amount::{Amount, MICROS_PER_UNIT};

    /// The key under which `serde_json` (feature `arbitrary_precision`) hands
    /// over the exact text of a number.
    const SERDE_JSON_NUMBER: &str = "$serde_json::private::Number";

    struct AmountVisitor;

    fn parse<E: de::Error>(text: &str) -> Result<Amount, E> {
        Amount::parse(text).map_err(|error| E::custom(format_args!("{text:?}: {error}")))
    }

    impl<'de> Visitor<'de> for AmountVisitor {
        type Value = Amount;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a decimal amount such as \"1.5\" or an integer")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Amount, E> {
            parse(text)
        }

        fn visit_i64<E: de::Error>(self, value: i64) -> Result<Amount, E> {
            parse(&value.to_string())
        }

        fn visit_u64<E: de::Error>(self, value: u64) -> Result<Amount, E> {
            parse(&value.to_string())
        }

        fn visit_i128<E: de::Error>(self, value: i128) -> Result<Amount, E> {
            parse(&value.to_string())
        }

        fn visit_u128<E: de::Error>(self, value: u128) -> Result<Amount, E> {
            parse(&value.to_string())
        }

        fn visit_f64<E: de::Error>(self, value: f64) -> Result<Amount, E> {
            // Never an amount from a float: JSON numbers arrive as exact text
            // (serde_json's `arbitrary_precision`); a float comes only from a
            // source that has already lost the digits the client wrote.
            Err(E::custom(format_args!(
                "{value} is a floating-point number; send the amount as a string such as \"1.5\""
            )))
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Amount, A::Error> {
            match map.next_key::<String>()? {
                Some(key) if key == SERDE_JSON_NUMBER => {
                    let text: String = map.next_value()?;
                    // A number in exponent form (`1e3`) is the same number
                    // written out, as for every other amount (`edge::AmountInput`).
                    parse(&crate::amount::written_out(&text).unwrap_or(text))
                }
                _ => Err(de::Error::invalid_type(de::Unexpected::Map, &self)),
            }
        }
    }

    /// A credit amount: written as a decimal string.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(super) struct Credits(pub Amount);

    impl Serialize for Credits {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_str(&self.0)
        }
    }

    impl<'de> Deserialize<'de> for Credits {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_any(AmountVisitor).map(Credits)
        }
    }

    /// A quantity: written as an integer when whole, a decimal string otherwise.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(super) struct Qty(pub Amount);

    impl Serialize for Qty {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let micros = self.0.micros();
            if micros % MICROS_PER_UNIT == 0 {
                serializer.serialize_i64(micros / MICROS_PER_UNIT)
            } else {
                serializer.collect_str(&self.0)
            }
        }
    }

    impl<'de> Deserialize<'de> for Qty {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_any(AmountVisitor).map(Qty)
        }
    }

    pub(super) mod credits {
        use super::*;

        pub fn serialize<S: Serializer>(amount: &Amount, serializer: S) -> Result<S::Ok, S::Error> {
            Credits(*amount).serialize(serializer)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Amount, D::Error> {
            Credits::deserialize(deserializer).map(|c| c.0)
        }
    }

    pub(super) mod opt_quantity {
        use super::*;

        pub fn serialize<S: Serializer>(
            amount: &Option<Amount>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            amount.map(Qty).serialize(serializer)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Amount>, D::Error> {
            Option::<Qty>::deserialize(deserializer).map(|q| q.map(|q| q.0))
        }
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct BlockWire {
        size: Qty,
        credits: Credits,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct TiersWire {
        mode: TierMode,
        steps: Vec<Step>,
    }

    /// Exactly one of the three is set.
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct PriceWire {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        credits_per_unit: Option<Credits>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        block: Option<BlockWire>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tiers: Option<TiersWire>,
    }

    const ONE_PRICE: &str =
        "a rule needs exactly one price: \"credits_per_unit\", \"block\" or \"tiers\"";

    impl TryFrom<PriceWire> for Price {
        type Error = String;

        fn try_from(wire: PriceWire) -> Result<Price, String> {
            match (wire.credits_per_unit, wire.block, wire.tiers) {
                (Some(credits), None, None) => Ok(Price::PerUnit {
                    credits_per_unit: credits.0,
                }),
                (None, Some(block), None) => Ok(Price::Block {
                    size: block.size.0,
                    credits: block.credits.0,
                }),
                (None, None, Some(tiers)) => Ok(Price::Tiers {
                    mode: tiers.mode,
                    steps: tiers.steps,
                }),
                _ => Err(ONE_PRICE.to_owned()),
            }
        }
    }

    impl From<Price> for PriceWire {
        fn from(price: Price) -> PriceWire {
            match price {
                Price::PerUnit { credits_per_unit } => PriceWire {
                    credits_per_unit: Some(Credits(credits_per_unit)),
                    ..PriceWire::default()
                },
                Price::Block { size, credits } => PriceWire {
                    block: Some(BlockWire {
                        size: Qty(size),
                        credits: Credits(credits),
                    }),
                    ..PriceWire::default()
                },
                Price::Tiers { mode, steps } => PriceWire {
                    tiers: Some(TiersWire { mode, steps }),
                    ..PriceWire::default()
                },
            }
        }
    }

    /// A rule in the API's shape: conditions and the price's key side by side.
    /// (Not `#[serde(flatten)]`: that would lose `deny_unknown_fields`.)
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct RuleWire {
        feature: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        plan: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        region: Option<String>,
        #[serde(rename = "match", default, skip_serializing_if = "BTreeMap::is_empty")]
        matches: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        credits_per_unit: Option<Credits>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        block: Option<BlockWire>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tiers: Option<TiersWire>,
    }

    impl TryFrom<RuleWire> for Rule {
        type Error = String;

        fn try_from(wire: RuleWire) -> Result<Rule, String> {
            let price = Price::try_from(PriceWire {
                credits_per_unit: wire.credits_per_unit,
                block: wire.block,
                tiers: wire.tiers,
            })
            .map_err(|error| format!("rule for feature {:?}: {error}", wire.feature))?;
            Ok(Rule {
                feature: wire.feature,
                plan: wire.plan,
                region: wire.region,
                matches: wire.matches,
                price,
            })
        }
    }

    impl From<Rule> for RuleWire {
        fn from(rule: Rule) -> RuleWire {
            let price = PriceWire::from(rule.price);
            RuleWire {
                feature: rule.feature,
                plan: rule.plan,
                region: rule.region,
                matches: rule.matches,
                credits_per_unit: price.credits_per_unit,
                block: price.block,
                tiers: price.tiers,
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use serde::de::value::{Error, F64Deserializer, I64Deserializer};
        use serde::de::IntoDeserializer;

        use super::*;

        fn a(text: &str) -> Amount {
            Amount::parse(text).unwrap()
        }

        #[test]
        fn amounts_read_from_strings_integers_and_exact_numbers() {
            let from_str = |text: &str| {
                Credits::deserialize(IntoDeserializer::<Error>::into_deserializer(text))
                    .map(|c| c.0)
            };
            assert_eq!(from_str("6"), Ok(a("6")));
            assert_eq!(from_str("0.333333"), Ok(a("0.333333")));
            assert!(from_str("0.0000001").is_err());
            assert!(from_str("1e3").is_err());

            let from_i64 = |value: i64| Qty::deserialize(I64Deserializer::<Error>::new(value));
            assert_eq!(from_i64(1000), Ok(Qty(a("1000"))));
            assert_eq!(from_i64(-1), Ok(Qty(a("-1"))));
            assert!(from_i64(1_000_000_000_001).is_err());

            let from_f64 = |value: f64| Credits::deserialize(F64Deserializer::<Error>::new(value));
            for float in [100.0, 0.5, 0.1, 1e12] {
                let refused = from_f64(float).unwrap_err().to_string();
                assert!(refused.contains("send the amount as a string"), "{refused}");
            }
            assert!(from_f64(1e13).is_err());
            assert!(from_f64(f64::NAN).is_err());
            assert!(from_f64(f64::INFINITY).is_err());
            assert!(from_f64(1e300).is_err());

            // serde_json with `arbitrary_precision` hands decimals over as a map.
            let number = BTreeMap::from([(SERDE_JSON_NUMBER, "0.000001")]);
            let deserializer = IntoDeserializer::<Error>::into_deserializer(number);
            assert_eq!(
                Credits::deserialize(deserializer),
                Ok(Credits(a("0.000001")))
            );
            // A number in exponent form, as every other amount takes it.
            for (text, written) in [("1e3", "1000"), ("1e+3", "1000"), ("15e-1", "1.5")] {
                let number = BTreeMap::from([(SERDE_JSON_NUMBER, text)]);
                let deserializer = IntoDeserializer::<Error>::into_deserializer(number);
                assert_eq!(
                    Credits::deserialize(deserializer),
                    Ok(Credits(a(written))),
                    "{text}"
                );
            }
            let other = BTreeMap::from([("x", "1")]);
            assert!(
                Credits::deserialize(IntoDeserializer::<Error>::into_deserializer(other)).is_err()
            );
        }

        #[test]
        fn a_rule_has_exactly_one_price() {
            let base = RuleWire {
                feature: "ai_message".to_owned(),
                plan: Some("enterprise".to_owned()),
                region: None,
                matches: BTreeMap::from([("model".to_owned(), "gpt-4".to_owned())]),
                credits_per_unit: None,
                block: None,
                tiers: None,
            };
            let none = Rule::try_from(base.clone()).unwrap_err();
            assert!(none.contains("exactly one price"), "{none}");
            let two = RuleWire {
                credits_per_unit: Some(Credits(a("6"))),
                block: Some(BlockWire {
                    size: Qty(a("1000")),
                    credits: Credits(a("8")),
                }),
                ..base.clone()
            };
            assert!(Rule::try_from(two).is_err());

            let one = RuleWire {
                credits_per_unit: Some(Credits(a("6"))),
                ..base
            };
            let rule = Rule::try_from(one.clone()).unwrap();
            assert_eq!(
                rule,
                Rule::new(
                    "ai_message",
                    Price::PerUnit {
                        credits_per_unit: a("6")
                    }
                )
                .with_plan("enterprise")
                .with_match("model", "gpt-4")
            );
            assert_eq!(RuleWire::from(rule), one);

            let tiers = Price::Tiers {
                mode: TierMode::Volume,
                steps: vec![Step {
                    up_to: None,
                    credits_per_unit: a("1"),
                }],
            };
            assert_eq!(Price::try_from(PriceWire::from(tiers.clone())), Ok(tiers));
        }
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn a(text: &str) -> Amount {
        Amount::parse(text).unwrap()
    }

    fn per_unit(credits: &str) -> Price {
        Price::PerUnit {
            credits_per_unit: a(credits),
        }
    }

    fn block(size: &str, credits: &str) -> Price {
        Price::Block {
            size: a(size),
            credits: a(credits),
        }
    }

    fn tiers(mode: TierMode, steps: &[(Option<&str>, &str)]) -> Price {
        Price::Tiers {
            mode,
            steps: steps
                .iter()
                .map(|(up_to, rate)| Step {
                    up_to: up_to.map(a),
                    credits_per_unit: a(rate),
                })
                .collect(),
        }
    }

    fn props(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const MAX: &str = "1000000000000";

    #[test]
    fn per_unit_rounds_up_to_the_micro_credit() {
        let cases = [
            ("6", "1", "6"),
            ("1.5", "3", "4.5"),
            ("0.333333", "3", "0.999999"),
            // 0.333333 × 0.333333 = 0.111110888889 → up.
            ("0.333333", "0.333333", "0.111111"),
            ("0.000001", "0.5", "0.000001"),
            ("0.000001", "0.000001", "0.000001"),
            ("0.000001", "1.5", "0.000002"),
            ("2", "0.000001", "0.000002"),
            ("0", "5", "0"),
            ("1", MAX, MAX),
        ];
        for (rate, quantity, expected) in cases {
            assert_eq!(
                per_unit(rate).cost(a(quantity)),
                Ok(a(expected)),
                "{quantity} at {rate}"
            );
        }
    }

    #[test]
    fn block_charges_every_started_block() {
        let cases = [
            ("1000", "8", "0.000001", "8"),
            ("1000", "8", "1", "8"),
            ("1000", "8", "999", "8"),
            ("1000", "8", "1000", "8"),
            ("1000", "8", "1000.000001", "16"),
            ("1000", "8", "1001", "16"),
            ("1000", "8", "1999", "16"),
            ("1000", "8", "2000", "16"),
            ("1000", "8", "2001", "24"),
            ("0.5", "1", "1.2", "3"),
            ("3", "0.333333", "7", "0.999999"),
            ("1000", "0", "5000", "0"),
        ];
        for (size, credits, quantity, expected) in cases {
            assert_eq!(
                block(size, credits).cost(a(quantity)),
                Ok(a(expected)),
                "{quantity} at {credits} per {size}"
            );
        }
    }

    #[test]
    fn graduated_prices_each_unit_in_its_tier() {
        let price = tiers(
            TierMode::Graduated,
            &[(Some("100"), "1"), (Some("1000"), "0.5"), (None, "0.1")],
        );
        let cases = [
            ("0.000001", "0.000001"),
            ("1", "1"),
            ("99.5", "99.5"),
            ("100", "100"),
            ("100.5", "100.25"),
            ("101", "100.5"),
            ("999", "549.5"),
            ("1000", "550"),
            ("1001", "550.1"),
            ("2000", "650"),
        ];
        for (quantity, expected) in cases {
            assert_eq!(price.cost(a(quantity)), Ok(a(expected)), "{quantity}");
        }
        // The sum is exact and rounded once: 1 + 0.5 × 0.333333 = 1.1666665 → 1.166667.
        let third = tiers(TierMode::Graduated, &[(Some("1"), "1"), (None, "0.333333")]);
        assert_eq!(third.cost(a("1.5")), Ok(a("1.166667")));
        assert_eq!(third.cost(a("4")), Ok(a("1.999999")));
    }

    #[test]
    fn volume_prices_all_units_at_the_tier_of_the_total() {
        let price = tiers(
            TierMode::Volume,
            &[(Some("100"), "1"), (Some("1000"), "0.5"), (None, "0.1")],
        );
        let cases = [
            ("1", "1"),
            ("99.999999", "99.999999"),
            ("100", "100"),
            // 100.000001 × 0.5 = 50.0000005 → up.
            ("100.000001", "50.000001"),
            ("101", "50.5"),
            ("1000", "500"),
            ("1001", "100.1"),
            ("0.5", "0.5"),
        ];
        for (quantity, expected) in cases {
            assert_eq!(price.cost(a(quantity)), Ok(a(expected)), "{quantity}");
        }
    }

    #[test]
    fn quantity_must_be_positive() {
        for quantity in ["0", "-1"] {
            let quantity = a(quantity);
            assert_eq!(
                per_unit("1").cost(quantity),
                Err(PricingError::InvalidQuantity { quantity })
            );
            let rules = [Rule::new("x", per_unit("1"))];
            assert_eq!(
                price(&rules, "x", quantity, &PricingContext::default()),
                Err(PricingError::InvalidQuantity { quantity })
            );
        }
    }

    #[test]
    fn overflow_near_the_maximum_is_an_error() {
        let cases = [
            (per_unit("1.000001"), MAX),
            (per_unit(MAX), "2"),
            (per_unit(MAX), MAX),
            (block("0.000001", "2"), MAX),
            (block("1", MAX), "1.5"),
            (
                tiers(TierMode::Graduated, &[(Some("1"), "0"), (None, MAX)]),
                "2.5",
            ),
            (
                tiers(TierMode::Volume, &[(Some("1"), "0"), (None, MAX)]),
                MAX,
            ),
        ];
        for (price, quantity) in cases {
            assert_eq!(
                price.cost(a(quantity)),
                Err(PricingError::Overflow),
                "{price:?} × {quantity}"
            );
        }
        // Exactly the maximum is fine.
        assert_eq!(block("1", MAX).cost(a("1")), Ok(a(MAX)));
        assert_eq!(
            tiers(TierMode::Graduated, &[(Some("1"), "0"), (None, MAX)]).cost(a("2")),
            Ok(a(MAX))
        );
    }

    #[test]
    fn multiplier_rounds_up_and_is_checked() {
        let cases = [
            ("10", "0.8", Ok("8")),
            ("10", "1", Ok("10")),
            ("10", "0", Ok("0")),
            ("0.000001", "0.5", Ok("0.000001")),
            ("0.333333", "0.333333", Ok("0.111111")),
            ("3", "1.5", Ok("4.5")),
            (MAX, "1", Ok(MAX)),
            (MAX, "1.000001", Err(PricingError::Overflow)),
            (
                "10",
                "-0.5",
                Err(PricingError::InvalidMultiplier {
                    multiplier: a("-0.5"),
                }),
            ),
        ];
        for (cost, multiplier, expected) in cases {
            assert_eq!(
                apply_multiplier(a(cost), a(multiplier)),
                expected.map(a),
                "{cost} × {multiplier}"
            );
        }
    }

    #[test]
    fn most_specific_rule_wins() {
        let rules = vec![
            Rule::new("ai_message", per_unit("1")),
            Rule::new("ai_message", per_unit("2")).with_region("eu"),
            Rule::new("ai_message", per_unit("3")).with_plan("pro"),
            Rule::new("ai_message", per_unit("4"))
                .with_plan("pro")
                .with_region("eu"),
            Rule::new("ai_message", per_unit("5")).with_match("model", "gpt-4"),
            Rule::new("ai_message", per_unit("6"))
                .with_match("model", "gpt-4")
                .with_match("tier", "fast"),
            Rule::new("ai_message", per_unit("7"))
                .with_plan("pro")
                .with_match("model", "gpt-4"),
            Rule::new("enrich", per_unit("1.5")),
        ];
        assert_eq!(validate(&rules), Ok(()));
        let none = props(&[]);
        let gpt4 = props(&[("model", "gpt-4")]);
        let gpt4_fast = props(&[("model", "gpt-4"), ("tier", "fast"), ("extra", "x")]);
        let gpt3 = props(&[("model", "gpt-3")]);
        type Case<'a> = (
            Option<&'a str>,
            Option<&'a str>,
            &'a BTreeMap<String, String>,
            usize,
        );
        let cases: [Case<'_>; 13] = [
            (None, None, &none, 0),
            (None, Some("us"), &none, 0),
            (None, Some("eu"), &none, 1),
            (Some("free"), Some("eu"), &none, 1),
            (Some("pro"), None, &none, 2),
            (Some("pro"), Some("us"), &none, 2),
            (Some("pro"), Some("eu"), &none, 3),
            (None, None, &gpt4, 4),
            (None, None, &gpt3, 0),
            (None, None, &gpt4_fast, 5),
            // A plan rule with conditions beats the plain plan rule...
            (Some("pro"), None, &gpt4, 6),
            // ...but a more specific level beats any conditions.
            (Some("pro"), Some("eu"), &gpt4, 3),
            (None, Some("eu"), &gpt4_fast, 1),
        ];
        for (plan, region, properties, expected) in cases {
            let ctx = PricingContext {
                plan,
                region,
                properties,
            };
            let priced = price(&rules, "ai_message", a("2"), &ctx).unwrap();
            assert_eq!(priced.rule_index, expected, "{ctx:?}");
            assert_eq!(priced.cost, rules[expected].price.cost(a("2")).unwrap());
            assert_eq!(resolve(&rules, "ai_message", &ctx), Ok(expected));
        }
    }

    #[test]
    fn unknown_feature_differs_from_no_price() {
        let rules = vec![
            Rule::new("ai_message", per_unit("6")).with_plan("enterprise"),
            Rule::new("ai_message", per_unit("6"))
                .with_region("eu")
                .with_match("model", "gpt-4"),
        ];
        let gpt4 = props(&[("model", "gpt-4")]);
        let ctx = |plan, region, properties| PricingContext {
            plan,
            region,
            properties,
        };
        let unknown = PricingError::UnknownFeature {
            feature: "enrich".to_owned(),
        };
        let no_price = PricingError::NoPrice {
            feature: "ai_message".to_owned(),
        };
        let cases = [
            ("enrich", ctx(Some("enterprise"), None, &gpt4), Err(unknown)),
            (
                "ai_message",
                ctx(Some("free"), None, &gpt4),
                Err(no_price.clone()),
            ),
            (
                "ai_message",
                PricingContext::default(),
                Err(no_price.clone()),
            ),
            (
                "ai_message",
                ctx(None, Some("eu"), &NO_PROPERTIES),
                Err(no_price),
            ),
            ("ai_message", ctx(None, Some("eu"), &gpt4), Ok(1)),
            ("ai_message", ctx(Some("enterprise"), None, &gpt4), Ok(0)),
        ];
        for (feature, ctx, expected) in cases {
            assert_eq!(
                price(&rules, feature, a("1"), &ctx).map(|p| p.rule_index),
                expected,
                "{feature} {ctx:?}"
            );
        }
        assert_eq!(
            price(&[], "x", a("1"), &PricingContext::default()),
            Err(PricingError::UnknownFeature {
                feature: "x".to_owned()
            })
        );
    }

    #[test]
    fn unvalidated_rules_are_never_guessed() {
        let rules = vec![
            Rule::new("x", per_unit("1")).with_match("model", "gpt-4"),
            Rule::new("x", per_unit("2")).with_match("tier", "pro"),
            Rule::new("y", block("0", "1")),
        ];
        let both = props(&[("model", "gpt-4"), ("tier", "pro")]);
        let ctx = PricingContext {
            properties: &both,
            ..PricingContext::default()
        };
        assert_eq!(
            price(&rules, "x", a("1"), &ctx),
            Err(PricingError::Ambiguous {
                feature: "x".to_owned(),
                rule_indexes: vec![0, 1]
            })
        );
        match price(&rules, "y", a("1"), &ctx) {
            Err(PricingError::InvalidPrice { reason }) => {
                assert!(reason.starts_with("rule 2: the block size"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A problem's kind and rule indexes.
    type Found = (RuleProblemKind, Vec<usize>);

    fn problems(rules: &[Rule]) -> Vec<Found> {
        match validate(rules) {
            Ok(()) => Vec::new(),
            Err(problems) => problems
                .into_iter()
                .map(|p| (p.kind, p.rule_indexes))
                .collect(),
        }
    }

    #[test]
    fn validation_finds_bad_prices() {
        use RuleProblemKind::*;
        let rule = |price| Rule::new("ai_message", price);
        let cases: Vec<(Price, Vec<RuleProblemKind>)> = vec![
            (per_unit("0"), vec![]),
            (per_unit("-1"), vec![NegativeCredits]),
            (block("1000", "8"), vec![]),
            (block("0", "8"), vec![BlockSizeNotPositive]),
            (block("-1", "8"), vec![BlockSizeNotPositive]),
            (block("1", "-8"), vec![NegativeCredits]),
            (tiers(TierMode::Graduated, &[]), vec![NoTiers]),
            (tiers(TierMode::Volume, &[(None, "1")]), vec![]),
            (
                tiers(
                    TierMode::Graduated,
                    &[(Some("100"), "1"), (Some("100"), "0.5"), (None, "0.1")],
                ),
                vec![TiersNotIncreasing],
            ),
            (
                tiers(
                    TierMode::Volume,
                    &[(Some("100"), "1"), (Some("50"), "0.5"), (None, "0.1")],
                ),
                vec![TiersNotIncreasing],
            ),
            (
                tiers(TierMode::Graduated, &[(Some("0"), "1"), (None, "0.5")]),
                vec![TiersNotIncreasing],
            ),
            (
                tiers(TierMode::Graduated, &[(None, "1"), (Some("100"), "0.5")]),
                vec![UnlimitedTierNotLast, LastTierLimited],
            ),
            (
                tiers(TierMode::Volume, &[(Some("100"), "1")]),
                vec![LastTierLimited],
            ),
            (
                tiers(TierMode::Graduated, &[(Some("100"), "-1"), (None, "0.5")]),
                vec![NegativeCredits],
            ),
        ];
        for (price, expected) in cases {
            let found: Vec<RuleProblemKind> = problems(&[rule(price.clone())])
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            assert_eq!(found, expected, "{price:?}");
            if !expected.is_empty() {
                assert!(
                    matches!(price.cost(a("1")), Err(PricingError::InvalidPrice { .. })),
                    "{price:?}"
                );
            }
        }
    }

    #[test]
    fn validation_finds_blank_names() {
        use RuleProblemKind::*;
        let p = || per_unit("1");
        let cases = [
            (Rule::new("", p()), vec![EmptyFeature]),
            (Rule::new("  ", p()), vec![EmptyFeature]),
            (Rule::new("x", p()).with_plan(""), vec![BlankCondition]),
            (Rule::new("x", p()).with_region(" "), vec![BlankCondition]),
            (
                Rule::new("x", p()).with_match("", "v"),
                vec![BlankCondition],
            ),
            (Rule::new("x", p()).with_match("k", ""), vec![]),
        ];
        for (rule, expected) in cases {
            let found: Vec<RuleProblemKind> = problems(std::slice::from_ref(&rule))
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            assert_eq!(found, expected, "{rule:?}");
        }
    }

    #[test]
    fn validation_finds_overlapping_rules() {
        let r = |price: &str| Rule::new("ai_message", per_unit(price));
        let overlap = |i, j| (RuleProblemKind::Overlapping, vec![i, j]);
        let cases: Vec<(&str, Vec<Rule>, Vec<Found>)> = vec![
            (
                "identical defaults",
                vec![r("1"), r("2")],
                vec![overlap(0, 1)],
            ),
            (
                "identical conditions",
                vec![
                    r("0.5"),
                    r("1").with_plan("pro").with_match("model", "gpt-4"),
                    r("2").with_plan("pro").with_match("model", "gpt-4"),
                ],
                vec![overlap(1, 2)],
            ),
            (
                "three identical",
                vec![r("1"), r("2"), r("3")],
                vec![overlap(0, 1), overlap(0, 2), overlap(1, 2)],
            ),
            (
                "incomparable but compatible",
                vec![
                    r("1").with_match("model", "gpt-4"),
                    r("2").with_match("tier", "pro"),
                ],
                vec![overlap(0, 1)],
            ),
            (
                "incomparable, decided by a rule for both",
                vec![
                    r("1").with_match("model", "gpt-4"),
                    r("2").with_match("tier", "pro"),
                    r("3")
                        .with_match("model", "gpt-4")
                        .with_match("tier", "pro"),
                ],
                vec![],
            ),
            (
                "incomparable, the deciding rule has another plan",
                vec![
                    r("1").with_match("model", "gpt-4"),
                    r("2").with_match("tier", "pro"),
                    r("3")
                        .with_plan("x")
                        .with_match("model", "gpt-4")
                        .with_match("tier", "pro"),
                ],
                vec![overlap(0, 1)],
            ),
            (
                "incompatible",
                vec![
                    r("1").with_match("model", "gpt-4"),
                    r("2").with_match("model", "gpt-3"),
                    r("3")
                        .with_match("model", "gpt-3")
                        .with_match("tier", "pro"),
                    r("4")
                        .with_match("model", "gpt-4")
                        .with_match("tier", "free"),
                ],
                vec![],
            ),
            (
                "superset",
                vec![
                    r("1"),
                    r("2").with_match("model", "gpt-4"),
                    r("3")
                        .with_match("model", "gpt-4")
                        .with_match("tier", "pro"),
                ],
                vec![],
            ),
            (
                "different levels",
                vec![
                    r("1"),
                    r("2").with_plan("pro"),
                    r("3").with_region("eu"),
                    r("4").with_plan("pro").with_region("eu"),
                    r("5").with_plan("free"),
                ],
                vec![],
            ),
            (
                "different features",
                vec![r("1"), Rule::new("enrich", per_unit("1"))],
                vec![],
            ),
        ];
        for (name, rules, expected) in cases {
            assert_eq!(problems(&rules), expected, "{name}");
        }
    }

    #[test]
    fn problems_are_explained_in_plain_words() {
        let rules = vec![
            Rule::new("ai_message", per_unit("1"))
                .with_plan("pro")
                .with_match("model", "gpt-4"),
            Rule::new("ai_message", per_unit("2"))
                .with_plan("pro")
                .with_match("tier", "fast"),
            Rule::new("enrich", block("0", "8")),
            Rule::new(
                "rows",
                tiers(
                    TierMode::Graduated,
                    &[(None, "1"), (Some("100"), "0.5"), (Some("50"), "-1")],
                ),
            )
            .with_region("eu"),
        ];
        let messages: Vec<String> = validate(&rules)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            messages,
            [
                "Rule 2 (enrich for every plan in every region for all usage): the block size is \
                 0 units; a block must hold more than 0 units.",
                "Rule 3 (rows for every plan in region eu for all usage): tier 1 has no upper \
                 limit but is not the last tier; only the last tier may be unlimited.",
                "Rule 3 (rows for every plan in region eu for all usage): the price per unit of \
                 tier 3 is -1 credits; a price cannot be negative.",
                "Rule 3 (rows for every plan in region eu for all usage): tier 3 ends at 50 \
                 units, which is not above where tier 2 ends (100 units); each tier must end \
                 higher than the one before.",
                "Rule 3 (rows for every plan in region eu for all usage): the last tier ends at \
                 50 units, so usage above 50 units would have no price; leave the last tier's \
                 upper limit empty (\"up_to\": null).",
                "Rule 0 (when model = gpt-4) and rule 1 (when tier = fast) both price ai_message \
                 for plan pro in every region; usage when model = gpt-4 and tier = fast matches \
                 both and neither is more specific, so Tally cannot tell which price to charge. \
                 Add a rule for ai_message for plan pro in every region when model = gpt-4 and \
                 tier = fast to decide, or change one of them.",
            ]
        );
    }

    fn steps_strategy() -> impl Strategy<Value = Vec<Step>> {
        // Up to five tiers, each 1 µunit to 1,000 units wide, 0 to 100 credits a unit.
        prop::collection::vec((1i64..=1_000_000_000, 0i64..=100_000_000), 1..=5).prop_map(
            |widths| {
                let last = widths.len() - 1;
                let mut end = 0;
                widths
                    .into_iter()
                    .enumerate()
                    .map(|(position, (width, rate))| {
                        end += width;
                        Step {
                            up_to: (position < last).then(|| Amount::from_micros(end).unwrap()),
                            credits_per_unit: Amount::from_micros(rate).unwrap(),
                        }
                    })
                    .collect()
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 512,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn graduated_is_monotonic_in_quantity(
            steps in steps_strategy(),
            x in 1i64..=5_000_000_000,
            y in 1i64..=5_000_000_000,
        ) {
            let price = Price::Tiers { mode: TierMode::Graduated, steps };
            let (low, high) = (x.min(y), x.max(y));
            let low_cost = price.cost(Amount::from_micros(low).unwrap()).unwrap();
            let high_cost = price.cost(Amount::from_micros(high).unwrap()).unwrap();
            prop_assert!(low_cost <= high_cost, "{low} -> {low_cost}, {high} -> {high_cost}");
        }

        #[test]
        fn one_tier_volume_equals_graduated_equals_per_unit(
            rate in 0i64..=1_000_000_000,
            quantity in 1i64..=1_000_000_000_000,
        ) {
            let rate = Amount::from_micros(rate).unwrap();
            let quantity = Amount::from_micros(quantity).unwrap();
            let steps = vec![Step { up_to: None, credits_per_unit: rate }];
            let graduated = Price::Tiers { mode: TierMode::Graduated, steps: steps.clone() };
            let volume = Price::Tiers { mode: TierMode::Volume, steps };
            let expected = Price::PerUnit { credits_per_unit: rate }.cost(quantity);
            prop_assert_eq!(graduated.cost(quantity), expected.clone());
            prop_assert_eq!(volume.cost(quantity), expected);
        }

        #[test]
        fn per_unit_cost_is_the_exact_product_rounded_up(
            rate in 0i64..=1_000_000_000,
            quantity in 1i64..=1_000_000_000_000,
        ) {
            let cost = Price::PerUnit { credits_per_unit: Amount::from_micros(rate).unwrap() }
                .cost(Amount::from_micros(quantity).unwrap())
                .unwrap();
            let exact = i128::from(rate) * i128::from(quantity); // in 1e-12 credits
            let cost = i128::from(cost.micros()) * MICROS;
            prop_assert!(cost >= exact && cost - exact < MICROS);
        }
    }
}
