//! Exact credit amounts: integer micro-credits with checked arithmetic.
//!
//! An [`Amount`] is never built from a float. The only way in from text is
//! [`Amount::parse`], which refuses more than six fractional digits instead of
//! rounding, and every operation that could overflow returns `None`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Micro-units in one whole credit.
pub const MICROS_PER_UNIT: i64 = 1_000_000;

/// The largest magnitude one amount may have: one trillion credits.
///
/// Far below `i64::MAX` so that sums of many amounts are still checked, not wrapped.
pub const MAX_AMOUNT_MICROS: i64 = 1_000_000_000_000 * MICROS_PER_UNIT;

/// A signed quantity of credits, in micro-credits.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Amount(i64);

/// Why a decimal string is not an amount.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AmountParseError {
    #[error("amount must be a decimal number such as \"12\" or \"1.5\"")]
    NotDecimal,
    #[error("amount has more than 6 fractional digits; it is never rounded, send at most 6")]
    TooPrecise,
    #[error("amount is larger than the maximum of 1000000000000")]
    TooLarge,
}

impl Amount {
    pub const ZERO: Amount = Amount(0);

    /// An amount from micro-credits; `None` outside `±MAX_AMOUNT_MICROS`.
    pub fn from_micros(micros: i64) -> Option<Amount> {
        (micros.abs() <= MAX_AMOUNT_MICROS).then_some(Amount(micros))
    }

    /// Whole credits; `None` when out of range.
    pub fn from_units(units: i64) -> Option<Amount> {
        units
            .checked_mul(MICROS_PER_UNIT)
            .and_then(Amount::from_micros)
    }

    pub fn micros(self) -> i64 {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    pub fn is_positive(self) -> bool {
        self.0 > 0
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    pub fn checked_add(self, other: Amount) -> Option<Amount> {
        self.0.checked_add(other.0).and_then(Amount::from_micros)
    }

    pub fn checked_sub(self, other: Amount) -> Option<Amount> {
        self.0.checked_sub(other.0).and_then(Amount::from_micros)
    }

    pub fn checked_neg(self) -> Option<Amount> {
        self.0.checked_neg().and_then(Amount::from_micros)
    }

    /// Parse a decimal string: optional `-`, digits, optional `.` and 1–6 digits.
    pub fn parse(text: &str) -> Result<Amount, AmountParseError> {
        let (negative, body) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (whole, fraction) = match body.split_once('.') {
            Some((whole, fraction)) => (whole, fraction),
            None => (body, ""),
        };
        let digits_only = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || !digits_only(whole) || !digits_only(fraction) {
            return Err(AmountParseError::NotDecimal);
        }
        if body.contains('.') && fraction.is_empty() {
            return Err(AmountParseError::NotDecimal);
        }
        if fraction.len() > 6 {
            return Err(AmountParseError::TooPrecise);
        }
        let whole_trimmed = whole.trim_start_matches('0');
        if whole_trimmed.len() > 13 {
            return Err(AmountParseError::TooLarge);
        }
        let whole_value: i64 = if whole_trimmed.is_empty() {
            0
        } else {
            whole_trimmed
                .parse()
                .map_err(|_| AmountParseError::TooLarge)?
        };
        let mut fraction_value: i64 = 0;
        for position in 0..6 {
            let digit = fraction
                .as_bytes()
                .get(position)
                .map_or(0, |b| i64::from(b - b'0'));
            fraction_value = fraction_value * 10 + digit;
        }
        let magnitude = whole_value
            .checked_mul(MICROS_PER_UNIT)
            .and_then(|m| m.checked_add(fraction_value))
            .ok_or(AmountParseError::TooLarge)?;
        let micros = if negative { -magnitude } else { magnitude };
        Amount::from_micros(micros).ok_or(AmountParseError::TooLarge)
    }
}

impl fmt::Display for Amount {
    /// The shortest exact decimal: `1.5`, `12`, `-0.000001`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let magnitude = self.0.unsigned_abs();
        let whole = magnitude / MICROS_PER_UNIT as u64;
        let fraction = magnitude % MICROS_PER_UNIT as u64;
        if fraction == 0 {
            write!(f, "{sign}{whole}")
        } else {
            let digits = format!("{fraction:06}");
            write!(f, "{sign}{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

/// Sum amounts with overflow checking.
pub fn checked_sum<I: IntoIterator<Item = Amount>>(amounts: I) -> Option<Amount> {
    amounts
        .into_iter()
        .try_fold(Amount::ZERO, Amount::checked_add)
}

/// A JSON number in exponent form (`1.5e3`, `1e-05`) written out as a plain
/// decimal with the same value (`1500`, `0.00001`), trailing fractional
/// zeros dropped; `None` if it is not such a number or would need more than
/// 40 digits either side of the point (far past any amount).
pub fn written_out(text: &str) -> Option<String> {
    let (mantissa, exponent) = text.split_once(['e', 'E'])?;
    let exponent: i32 = exponent
        .strip_prefix('+')
        .unwrap_or(exponent)
        .parse()
        .ok()?;
    let (negative, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, mantissa),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits_only = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits_only(whole) || !digits_only(fraction) {
        return None;
    }
    // The digits, and where the point falls among them.
    let digits = format!("{whole}{fraction}");
    let point = i32::try_from(whole.len()).ok()?.checked_add(exponent)?;
    if !(-40..=40).contains(&point) || digits.len() > 80 {
        return None;
    }
    let (whole, fraction) = if point <= 0 {
        let zeros = "0".repeat(usize::try_from(-point).ok()?);
        ("0".to_owned(), format!("{zeros}{digits}"))
    } else {
        let point = usize::try_from(point).ok()?;
        let padded = format!("{digits:0<point$}");
        (padded[..point].to_owned(), padded[point..].to_owned())
    };
    let fraction = fraction.trim_end_matches('0');
    let sign = if negative { "-" } else { "" };
    Some(match fraction.is_empty() {
        true => format!("{sign}{whole}"),
        false => format!("{sign}{whole}.{fraction}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_exactly() {
        let cases = [
            ("0", 0, "0"),
            ("1", 1_000_000, "1"),
            ("1.5", 1_500_000, "1.5"),
            ("0.000001", 1, "0.000001"),
            ("-2.25", -2_250_000, "-2.25"),
            ("007.100", 7_100_000, "7.1"),
            ("1000000000000", MAX_AMOUNT_MICROS, "1000000000000"),
        ];
        for (text, micros, printed) in cases {
            let amount = Amount::parse(text).unwrap();
            assert_eq!(amount.micros(), micros, "{text}");
            assert_eq!(amount.to_string(), printed, "{text}");
        }
    }

    #[test]
    fn refuses_what_is_not_exact() {
        assert_eq!(
            Amount::parse("1.0000001"),
            Err(AmountParseError::TooPrecise)
        );
        assert_eq!(
            Amount::parse("1000000000000.000001"),
            Err(AmountParseError::TooLarge)
        );
        assert_eq!(
            Amount::parse("99999999999999999999"),
            Err(AmountParseError::TooLarge)
        );
        for bad in [
            "", "-", ".5", "1.", "1e3", "1,5", " 1", "+1", "0x10", "1.2.3", "NaN",
        ] {
            assert_eq!(
                Amount::parse(bad),
                Err(AmountParseError::NotDecimal),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn arithmetic_is_checked() {
        let max = Amount::from_micros(MAX_AMOUNT_MICROS).unwrap();
        assert_eq!(max.checked_add(Amount::from_micros(1).unwrap()), None);
        assert_eq!(Amount::from_micros(MAX_AMOUNT_MICROS + 1), None);
        assert_eq!(checked_sum([max, max]), None);
    }
}
