//! The RFC 3339 parser against a well-kept one (chrono): on generated
//! timestamps, valid and subtly invalid, both accept the same strings and
//! read the same instant.

use chrono::DateTime;
use jobmeter_core::Timestamp;
use proptest::prelude::*;

/// Timestamps in the grammar both parsers claim, with fields drawn past
/// their valid ranges too (month 13, day 31 in April, Feb 29, hour 24…).
fn candidate() -> impl Strategy<Value = String> {
    (
        (0i64..=9999, 0u32..=13, 0u32..=32),
        (0u32..=24, 0u32..=60, 0u32..=60),
        prop_oneof![Just(String::new()), "\\.[0-9]{1,12}"],
        prop_oneof![
            Just("Z".to_owned()),
            Just("z".to_owned()),
            (prop_oneof![Just('+'), Just('-')], 0u32..=24, 0u32..=60).prop_map(|(s, h, m)| format!("{s}{h:02}:{m:02}")),
        ],
        prop_oneof![Just('T'), Just('t')],
    )
        .prop_map(|((y, mo, d), (h, mi, s), frac, off, sep)| {
            format!("{y:04}-{mo:02}-{d:02}{sep}{h:02}:{mi:02}:{s:02}{frac}{off}")
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    #[test]
    fn agrees_with_chrono(s in candidate()) {
        let ours = Timestamp::parse(&s);
        let theirs = DateTime::parse_from_rfc3339(&s).map(|t| t.timestamp_millis());
        let leap = &s[17..19] == "60";
        match (ours, theirs) {
            (Ok(Timestamp(a)), Ok(b)) if leap => {
                // A leap second: chrono keeps it as second 60, the meter
                // reads it as the last millisecond-aligned part of second 59.
                prop_assert!(b - a >= 1000 && b - a < 2000, "{s}: ours {a}, chrono {b}");
            }
            (Ok(a), Ok(b)) => prop_assert_eq!(a.0, b, "{}", s),
            // Ours refuses instants outside years 0001–9999 after the offset;
            // chrono represents them.
            (Err(_), Ok(b)) => prop_assert!(
                !(Timestamp::MIN.0..=Timestamp::MAX.0).contains(&b),
                "{s}: chrono reads {b}, ours refuses"
            ),
            (Ok(a), Err(e)) => prop_assert!(false, "{s}: ours reads {a:?}, chrono refuses ({e})"),
            (Err(_), Err(_)) => {}
        }
    }

    #[test]
    fn formatted_instants_read_back_in_both(ms in Timestamp::MIN.0..=Timestamp::MAX.0) {
        let text = Timestamp(ms).to_string();
        prop_assert_eq!(Timestamp::parse(&text).map(|t| t.0).ok(), Some(ms));
        prop_assert_eq!(DateTime::parse_from_rfc3339(&text).map(|t| t.timestamp_millis()).ok(), Some(ms));
    }
}
