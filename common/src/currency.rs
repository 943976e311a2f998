//! ISO 4217 currency codes, checked in constant time against a bitset built at compile time.
//!
//! The list is ISO 4217's active codes (including funds codes and precious metals), without
//! XTS (reserved for testing) and XXX (no currency), which name no money a transaction moves.

const CODES: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT", "BGN", "BHD", "BIF",
    "BMD", "BND", "BOB", "BOV", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF", "CHE", "CHF", "CHW", "CLF",
    "CLP", "CNY", "COP", "COU", "CRC", "CUC", "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD", "EGP", "ERN", "ETB",
    "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD", "HKD", "HNL", "HTG", "HUF", "IDR",
    "ILS", "INR", "IQD", "IRR", "ISK", "JMD", "JOD", "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD",
    "KZT", "LAK", "LBP", "LKR", "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR",
    "MVR", "MWK", "MXN", "MXV", "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK",
    "PHP", "PKR", "PLN", "PYG", "QAR", "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP",
    "SLE", "SLL", "SOS", "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS", "TMT", "TND", "TOP", "TRY", "TTD",
    "TWD", "TZS", "UAH", "UGX", "USD", "USN", "UYI", "UYU", "UYW", "UZS", "VED", "VES", "VND", "VUV", "WST", "XAF",
    "XAG", "XAU", "XBA", "XBB", "XBC", "XBD", "XCD", "XCG", "XDR", "XOF", "XPD", "XPF", "XPT", "XSU", "XUA", "YER",
    "ZAR", "ZMW", "ZWG", "ZWL",
];

const SLOTS: usize = 26 * 26 * 26;

const fn slot(code: &[u8]) -> usize {
    ((code[0] - b'A') as usize * 26 + (code[1] - b'A') as usize) * 26 + (code[2] - b'A') as usize
}

const BITS: [u64; SLOTS.div_ceil(64)] = {
    let mut bits = [0u64; SLOTS.div_ceil(64)];
    let mut i = 0;
    while i < CODES.len() {
        let s = slot(CODES[i].as_bytes());
        bits[s / 64] |= 1 << (s % 64);
        i += 1;
    }
    bits
};

/// True when `code` is an active ISO 4217 code, in upper case (`USD`, not `usd`).
pub fn is_iso4217(code: &str) -> bool {
    is_iso4217_bytes(code.as_bytes())
}

/// [`is_iso4217`] on raw bytes (a code is ASCII, so no UTF-8 check is needed first).
pub fn is_iso4217_bytes(b: &[u8]) -> bool {
    if b.len() != 3 || !b.iter().all(u8::is_ascii_uppercase) {
        return false;
    }
    let s = slot(b);
    BITS[s / 64] & (1 << (s % 64)) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_codes_pass_and_others_do_not() {
        for c in ["USD", "EUR", "JPY", "GBP", "CHF", "ZWL", "AED"] {
            assert!(is_iso4217(c), "{c}");
        }
        for c in ["usd", "US", "USDD", "ABC", "XXX", "XTS", "", "U$D", "ÜSD"] {
            assert!(!is_iso4217(c), "{c}");
        }
        assert!(CODES.windows(2).all(|w| w[0] < w[1]), "list is sorted and unique");
    }
}
