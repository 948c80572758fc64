//! Top-ups: credit packs sold for money, and the automatic top-up that buys
//! them when a customer's balance runs low.
//!
//! A top-up never grants credits by itself: it asks for a payment (the
//! payment step) and grants its pack's credits only once the payment is
//! confirmed. What is pure here is the arithmetic of an order (credits and
//! price, checked) and the decision whether an automatic top-up starts now
//! (below the threshold, none pending, not suspended, within the rate limit).

use serde::{Deserialize, Serialize};

use crate::{Amount, CostBasis, Id, Timestamp};

/// The most packs one top-up may buy.
pub const MAX_QUANTITY: u32 = 10_000;
/// The longest a pack's credits may last, and the furthest a payment may be awaited.
pub const MAX_EXPIRES_AFTER_DAYS: u32 = 3660;
pub const MAX_PAYMENT_TIMEOUT_SECONDS: u32 = 30 * 86_400;
/// The rate limit's window: automatic top-ups started in the last day.
pub const RATE_WINDOW_MICROS: i64 = 86_400 * Timestamp::MICROS_PER_SECOND;

/// The prefix of automatic top-ups' ids (client ids may not use it).
pub const AUTO_PREFIX: &str = "auto_";
/// The longest id of a manual top-up: its lot is `topup:<id>`.
pub const MAX_TOPUP_ID: usize = 100;
/// How long a manual top-up waits for its payment by default.
pub const DEFAULT_PAYMENT_TIMEOUT_SECONDS: u32 = 86_400;

/// Check a manual top-up's id, quantity and payment timeout: `(field,
/// problem)` when one is not valid.
pub fn validate_request(
    id: &str,
    quantity: u32,
    payment_timeout_seconds: u32,
) -> Result<(), (&'static str, String)> {
    if id.starts_with(AUTO_PREFIX) {
        return Err((
            "id",
            format!("top-up ids starting with {AUTO_PREFIX} are Tally's own (automatic top-ups)"),
        ));
    }
    if id.len() > MAX_TOPUP_ID {
        return Err((
            "id",
            format!("a top-up id must be at most {MAX_TOPUP_ID} characters (its grant is named after it)"),
        ));
    }
    if quantity == 0 || quantity > MAX_QUANTITY {
        return Err(("quantity", format!("quantity must be 1 to {MAX_QUANTITY}")));
    }
    if payment_timeout_seconds == 0 || payment_timeout_seconds > MAX_PAYMENT_TIMEOUT_SECONDS {
        return Err((
            "payment_timeout_seconds",
            format!("payment_timeout_seconds must be 1 to {MAX_PAYMENT_TIMEOUT_SECONDS}"),
        ));
    }
    Ok(())
}

/// Credits sold for a price.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditPack {
    pub key: String,
    pub name: String,
    pub credits: Amount,
    /// The money paid for one pack, in `currency` (6 fractional digits at most).
    pub price: Amount,
    /// ISO 4217 code, upper case.
    pub currency: String,
    /// The pack's credits expire this many days after the payment is confirmed.
    pub expires_after_days: Option<u32>,
    /// The burn-order priority of the pack's credits.
    #[serde(default)]
    pub priority: i32,
}

/// What one top-up buys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Order {
    pub quantity: u32,
    pub credits: Amount,
    pub price: Amount,
}

impl CreditPack {
    /// `quantity` packs: their credits and price; `None` past the largest amount.
    pub fn order(&self, quantity: u32) -> Option<Order> {
        let times = |amount: Amount| {
            amount
                .micros()
                .checked_mul(i64::from(quantity))
                .and_then(Amount::from_micros)
        };
        Some(Order {
            quantity,
            credits: times(self.credits)?,
            price: times(self.price)?,
        })
    }

    /// Money paid per credit, rounded half up to the micro-unit (exact when
    /// the price divides evenly; the top-up keeps the exact price paid).
    /// `None` when the credits are not positive or the price per credit is
    /// past the largest amount.
    pub fn cost_basis(&self) -> Option<CostBasis> {
        let micro = i128::from(crate::amount::MICROS_PER_UNIT);
        let credits = i128::from(self.credits.micros());
        if credits <= 0 {
            return None;
        }
        let per_credit = (i128::from(self.price.micros()) * micro + credits / 2) / credits;
        Some(CostBasis {
            per_credit: i64::try_from(per_credit)
                .ok()
                .and_then(Amount::from_micros)?,
            currency: self.currency.clone(),
        })
    }
}

/// Check a pack: `(field, problem)` when it is not valid.
pub fn validate_pack(pack: &CreditPack) -> Result<(), (&'static str, String)> {
    if !pack.credits.is_positive() {
        return Err(("credits", "credits must be positive".into()));
    }
    if pack.price.is_negative() {
        return Err(("price", "price must not be negative".into()));
    }
    if !crate::currency::is_iso_4217(&pack.currency) {
        return Err((
            "currency",
            "currency must be an ISO 4217 currency code in upper case, such as USD".into(),
        ));
    }
    // A price no payment can be made in (1000.5 JPY, 1.005 USD).
    let places = crate::currency::minor_units(&pack.currency);
    if pack.price.micros() % crate::currency::minor_unit_micros(&pack.currency) != 0 {
        return Err((
            "price",
            format!(
                "price must be in whole units of {}'s smallest unit (at most {places} decimal places)",
                pack.currency
            ),
        ));
    }
    match pack.cost_basis() {
        None => return Err(("price", "the price per credit is too large".into())),
        // Paid credits valued at nothing would report nothing to refund.
        Some(basis) if pack.price.is_positive() && basis.per_credit.is_zero() => {
            return Err((
                "price",
                "the price per credit rounds to 0 at 6 decimal places: a paid pack's credits \
                 must be worth at least 0.000001 each"
                    .into(),
            ))
        }
        Some(_) => {}
    }
    if pack
        .expires_after_days
        .is_some_and(|d| d == 0 || d > MAX_EXPIRES_AFTER_DAYS)
    {
        return Err((
            "expires_after_days",
            format!("expires_after_days must be 1 to {MAX_EXPIRES_AFTER_DAYS}"),
        ));
    }
    Ok(())
}

/// A customer's automatic top-up: when the balance (credits available less
/// debt) falls below `threshold`, buy enough packs to bring it to `target`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoTopup {
    pub pack: String,
    pub threshold: Amount,
    pub target: Amount,
    /// At most this many automatic top-ups start in any 24 hours.
    pub max_per_day: u32,
    /// After this many failed payments in a row, automatic top-up is suspended
    /// until it is set again.
    pub max_failures: u32,
    /// A payment not confirmed within this long fails (`payment_timeout`).
    pub payment_timeout_seconds: u32,
    pub enabled: bool,
}

pub fn validate_auto_topup(config: &AutoTopup) -> Result<(), (&'static str, String)> {
    if config.threshold.is_negative() {
        return Err(("threshold", "threshold must not be negative".into()));
    }
    if config.target <= config.threshold {
        return Err(("target", "target must be above threshold".into()));
    }
    if config.max_per_day == 0 || config.max_per_day > 1000 {
        return Err(("max_per_day", "max_per_day must be 1 to 1000".into()));
    }
    if config.max_failures == 0 || config.max_failures > 100 {
        return Err(("max_failures", "max_failures must be 1 to 100".into()));
    }
    if config.payment_timeout_seconds == 0
        || config.payment_timeout_seconds > MAX_PAYMENT_TIMEOUT_SECONDS
    {
        return Err((
            "payment_timeout_seconds",
            format!("payment_timeout_seconds must be 1 to {MAX_PAYMENT_TIMEOUT_SECONDS}"),
        ));
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AutoTopupStatus {
    Active,
    /// Stopped after `max_failures` failed payments in a row.
    Suspended,
    Disabled,
}

impl AutoTopupStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AutoTopupStatus::Active => "active",
            AutoTopupStatus::Suspended => "suspended",
            AutoTopupStatus::Disabled => "disabled",
        }
    }
}

/// An automatic top-up's configuration with where it stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoTopupState {
    pub config: AutoTopup,
    pub status: AutoTopupStatus,
    pub consecutive_failures: u32,
    /// The top-up awaiting its payment, if any (one at a time).
    pub pending: Option<Id>,
    /// When the automatic top-ups of the last day started (the rate limit).
    pub recent: Vec<Timestamp>,
    /// Why the last top-up that was due did not start (its order past the
    /// largest amount, its pack gone), until one starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refusal: Option<AutoTopupRefusal>,
    /// The top-up whose failure suspended it: only its money coming late
    /// lifts the suspension (not another's, with later ones declined).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspended_by: Option<Id>,
}

/// A due automatic top-up that could not start, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoTopupRefusal {
    pub at: Timestamp,
    pub message: String,
}

/// Whether an automatic top-up starts now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not due: above the threshold, suspended, disabled or one pending.
    Idle,
    /// Due, but `max_per_day` top-ups already started in the last day.
    RateLimited,
    /// Start one for `quantity` packs.
    Buy(u32),
}

impl AutoTopupState {
    pub fn new(config: AutoTopup) -> AutoTopupState {
        let status = if config.enabled {
            AutoTopupStatus::Active
        } else {
            AutoTopupStatus::Disabled
        };
        AutoTopupState {
            config,
            status,
            consecutive_failures: 0,
            pending: None,
            recent: Vec::new(),
            last_refusal: None,
            suspended_by: None,
        }
    }

    /// Whether a balance change could start a top-up (cheap; no balance needed).
    pub fn armed(&self) -> bool {
        self.status == AutoTopupStatus::Active && self.pending.is_none()
    }

    /// Starts within the rate limit's window before `now`.
    pub fn started_in_window(&self, now: Timestamp) -> usize {
        let since = now.micros().saturating_sub(RATE_WINDOW_MICROS);
        self.recent.iter().filter(|t| t.micros() > since).count()
    }

    /// What to do with the balance at `balance` (available less debt).
    pub fn decide(&self, pack: &CreditPack, balance: Amount, now: Timestamp) -> Decision {
        if !self.armed() || balance >= self.config.threshold {
            return Decision::Idle;
        }
        if self.started_in_window(now) >= self.config.max_per_day as usize {
            return Decision::RateLimited;
        }
        let short = i128::from(self.config.target.micros()) - i128::from(balance.micros());
        let per_pack = i128::from(pack.credits.micros());
        let packs = ((short + per_pack - 1) / per_pack).max(1);
        Decision::Buy(
            u32::try_from(packs)
                .unwrap_or(MAX_QUANTITY)
                .min(MAX_QUANTITY),
        )
    }

    /// A top-up started at `now`.
    pub fn started(&mut self, id: Id, now: Timestamp) {
        let since = now.micros().saturating_sub(RATE_WINDOW_MICROS);
        self.recent.retain(|t| t.micros() > since);
        self.recent.push(now);
        self.pending = Some(id);
        self.last_refusal = None;
    }

    /// A due top-up could not start; true when this is news (a refusal
    /// already recorded with the same message is not written again).
    pub fn refused(&mut self, message: String, now: Timestamp) -> bool {
        if self
            .last_refusal
            .as_ref()
            .is_some_and(|r| r.message == message)
        {
            return false;
        }
        self.last_refusal = Some(AutoTopupRefusal { at: now, message });
        true
    }

    /// The pending top-up's payment succeeded (or a failed one's money came
    /// late): the failures in a row end, and a suspension this top-up's
    /// failure caused is lifted.
    pub fn succeeded(&mut self, id: &Id) {
        if self.pending.as_ref() == Some(id) {
            self.pending = None;
        }
        self.consecutive_failures = 0;
        if self.status == AutoTopupStatus::Suspended && self.suspended_by.as_ref() == Some(id) {
            self.status = AutoTopupStatus::Active;
            self.suspended_by = None;
        }
    }

    /// The pending top-up's payment failed; true when this suspends it.
    pub fn failed(&mut self, id: &Id) -> bool {
        if self.pending.as_ref() == Some(id) {
            self.pending = None;
        }
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        if self.status == AutoTopupStatus::Active
            && self.consecutive_failures >= self.config.max_failures
        {
            self.status = AutoTopupStatus::Suspended;
            self.suspended_by = Some(id.clone());
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credits(text: &str) -> Amount {
        Amount::parse(text).unwrap()
    }

    fn pack() -> CreditPack {
        CreditPack {
            key: "k1".into(),
            name: "1,000 credits".into(),
            credits: credits("1000"),
            price: credits("10"),
            currency: "USD".into(),
            expires_after_days: Some(365),
            priority: 0,
        }
    }

    fn state() -> AutoTopupState {
        AutoTopupState::new(AutoTopup {
            pack: "k1".into(),
            threshold: credits("500"),
            target: credits("2500"),
            max_per_day: 2,
            max_failures: 3,
            payment_timeout_seconds: 3600,
            enabled: true,
        })
    }

    /// Money coming late lifts the suspension only when it is for the
    /// top-up whose failure suspended it: an earlier one's, with the card
    /// declined twice since, does not.
    #[test]
    fn only_the_top_up_that_suspended_it_lifts_the_suspension() {
        let mut state = state();
        let id = |n: &str| Id::parse(n).unwrap();
        let now = Timestamp(1_000_000);
        for n in ["auto_1", "auto_2", "auto_3"] {
            state.started(id(n), now);
            state.failed(&id(n));
        }
        assert_eq!(state.status, AutoTopupStatus::Suspended);
        assert_eq!(state.suspended_by, Some(id("auto_3")));
        state.succeeded(&id("auto_1"));
        assert_eq!(
            state.status,
            AutoTopupStatus::Suspended,
            "auto_3 was declined"
        );
        assert_eq!(state.consecutive_failures, 0);
        state.succeeded(&id("auto_3"));
        assert_eq!(state.status, AutoTopupStatus::Active);
        assert_eq!(state.suspended_by, None);
    }

    #[test]
    fn an_order_multiplies_credits_and_price_exactly() {
        let order = pack().order(3).unwrap();
        assert_eq!(order.credits, credits("3000"));
        assert_eq!(order.price, credits("30"));
        let huge = CreditPack {
            credits: credits("1000000000"),
            ..pack()
        };
        assert_eq!(huge.order(10_000), None);
    }

    #[test]
    fn cost_basis_is_the_price_per_credit_rounded_half_up() {
        assert_eq!(pack().cost_basis().unwrap().per_credit, credits("0.01"));
        let thirds = CreditPack {
            credits: credits("3"),
            price: credits("2"),
            ..pack()
        };
        assert_eq!(thirds.cost_basis().unwrap().per_credit, credits("0.666667"));
    }

    #[test]
    fn buys_enough_packs_to_reach_the_target() {
        let state = state();
        let now = Timestamp(1_000_000);
        assert_eq!(state.decide(&pack(), credits("500"), now), Decision::Idle);
        // 2,500 - 499.5 = 2,000.5 short: three packs of 1,000.
        assert_eq!(
            state.decide(&pack(), credits("499.5"), now),
            Decision::Buy(3)
        );
        // With debt the balance is negative: still counts up to the target.
        assert_eq!(
            state.decide(&pack(), credits("-100"), now),
            Decision::Buy(3)
        );
        assert_eq!(state.decide(&pack(), credits("0"), now), Decision::Buy(3));
        assert_eq!(
            state.decide(&pack(), credits("1500.000001"), now),
            Decision::Idle
        );
    }

    #[test]
    fn one_at_a_time_within_the_daily_limit() {
        let mut state = state();
        let day = RATE_WINDOW_MICROS;
        let t0 = Timestamp(10 * day);
        state.started(Id::derived("a"), t0);
        assert_eq!(
            state.decide(&pack(), credits("0"), t0),
            Decision::Idle,
            "one pending"
        );
        state.succeeded(&Id::derived("a"));
        state.started(Id::derived("b"), Timestamp(t0.micros() + 1));
        state.succeeded(&Id::derived("b"));
        let later = Timestamp(t0.micros() + day - 1);
        assert_eq!(
            state.decide(&pack(), credits("0"), later),
            Decision::RateLimited
        );
        // A day after the first start, one slot is free again.
        let next_day = Timestamp(t0.micros() + day);
        assert_eq!(
            state.decide(&pack(), credits("0"), next_day),
            Decision::Buy(3)
        );
    }

    #[test]
    fn suspended_after_repeated_failures_and_a_success_resets_the_count() {
        let mut state = state();
        assert!(!state.failed(&Id::derived("x")));
        assert!(!state.failed(&Id::derived("y")));
        state.succeeded(&Id::derived("z"));
        assert_eq!(state.consecutive_failures, 0);
        assert!(!state.failed(&Id::derived("1")));
        assert!(!state.failed(&Id::derived("2")));
        assert!(state.failed(&Id::derived("3")));
        assert_eq!(state.status, AutoTopupStatus::Suspended);
        assert_eq!(
            state.decide(&pack(), credits("0"), Timestamp(0)),
            Decision::Idle
        );
    }

    #[test]
    fn validation_names_the_field() {
        assert_eq!(validate_pack(&pack()), Ok(()));
        let bad = CreditPack {
            currency: "usd".into(),
            ..pack()
        };
        assert_eq!(validate_pack(&bad).unwrap_err().0, "currency");
        let zero = CreditPack {
            credits: Amount::ZERO,
            ..pack()
        };
        assert_eq!(validate_pack(&zero).unwrap_err().0, "credits");
        let mut config = state().config;
        config.target = config.threshold;
        assert_eq!(validate_auto_topup(&config).unwrap_err().0, "target");
    }
}
