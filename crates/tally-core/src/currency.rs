//! Currency codes: the active alphabetic codes of ISO 4217 (list one, as
//! published by the maintenance agency, SIX), so that a typo such as `USB`
//! is refused rather than kept as a currency no payment is ever in.

/// The active ISO 4217 alphabetic codes, sorted (searched by bisection).
/// Funds codes (`BOV`, `CHE`...), the precious metals (`XAU`...) and the
/// special drawing right (`XDR`) are included, as they are in the list;
/// `XXX` (no currency) and `XTS` (for testing) are not.
const CODES: [&str; 174] = [
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT",
    "BGN", "BHD", "BIF", "BMD", "BND", "BOB", "BOV", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD",
    "CAD", "CDF", "CHE", "CHF", "CHW", "CLF", "CLP", "CNY", "COP", "COU", "CRC", "CUP", "CVE",
    "CZK", "DJF", "DKK", "DOP", "DZD", "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL",
    "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR",
    "IQD", "IRR", "ISK", "JMD", "JOD", "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD",
    "KYD", "KZT", "LAK", "LBP", "LKR", "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK",
    "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN", "MXV", "MYR", "MZN", "NAD", "NGN", "NIO",
    "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "PYG", "QAR", "RON",
    "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD",
    "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS", "TMT", "TND", "TOP", "TRY", "TTD", "TWD",
    "TZS", "UAH", "UGX", "USD", "USN", "UYI", "UYU", "UYW", "UZS", "VED", "VES", "VND", "VUV",
    "WST", "XAF", "XAG", "XAU", "XCD", "XCG", "XDR", "XOF", "XPD", "XPF", "XPT", "XSU", "XUA",
    "YER", "ZAR", "ZMW", "ZWG", "ZWL",
];

/// Whether `code` is an active ISO 4217 alphabetic code (upper case).
pub fn is_iso_4217(code: &str) -> bool {
    CODES.binary_search(&code).is_ok()
}

/// How many decimal places the currency's smallest unit has (ISO 4217's
/// minor unit): 0 for JPY, 3 for BHD, 2 for most; 6 (the micro-unit every
/// amount has) for the codes the list gives none (`XAU`, `XDR`...).
pub fn minor_units(code: &str) -> u32 {
    match code {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX"
        | "UYI" | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        "CLF" | "UYW" => 4,
        "XAG" | "XAU" | "XDR" | "XPD" | "XPT" | "XSU" | "XUA" => 6,
        _ => 2,
    }
}

/// The currency's smallest unit in micro-units: 1,000,000 for JPY, 10,000
/// for USD, 1,000 for BHD.
pub fn minor_unit_micros(code: &str) -> i64 {
    10_i64.pow(6 - minor_units(code).min(6))
}

/// `numerator / denominator` micro-units of `code`, rounded half up to its
/// smallest unit, in micro-units; `None` on overflow. (A value at a cost
/// basis: credits × per-credit over a million; a top-up's: price × credits
/// voided over its credits.)
pub fn round_to_minor_unit(numerator: i128, denominator: i128, code: &str) -> Option<i128> {
    let unit = i128::from(minor_unit_micros(code));
    let step = denominator.checked_mul(unit)?;
    numerator
        .checked_add(step / 2)?
        .div_euclid(step)
        .checked_mul(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minor_units_follow_iso_4217() {
        assert_eq!(minor_unit_micros("JPY"), 1_000_000);
        assert_eq!(minor_unit_micros("USD"), 10_000);
        assert_eq!(minor_unit_micros("BHD"), 1_000);
        assert_eq!(minor_unit_micros("CLF"), 100);
        assert_eq!(minor_unit_micros("XAU"), 1);
        // Every code named above is in the list.
        for code in [
            "BIF", "VND", "XPF", "BHD", "TND", "CLF", "UYW", "XAU", "XUA",
        ] {
            assert!(is_iso_4217(code), "{code}");
        }
    }

    #[test]
    fn the_list_is_sorted_and_of_three_upper_case_letters() {
        assert!(CODES.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
        assert!(CODES
            .iter()
            .all(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase())));
    }

    #[test]
    fn known_codes_pass_and_others_do_not() {
        for code in ["USD", "EUR", "JPY", "GBP", "CHF", "AED", "ZWL", "XAF"] {
            assert!(is_iso_4217(code), "{code}");
        }
        for code in ["USB", "usd", "US", "USDD", "ABC", "XXX", "", "EU€"] {
            assert!(!is_iso_4217(code), "{code}");
        }
    }
}
