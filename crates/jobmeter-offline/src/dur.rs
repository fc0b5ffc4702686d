//! Durations as settings and flags write them.

use jobmeter_core::time::MAX_DURATION_MS;
use std::fmt;
use std::str::FromStr;

/// A duration written as text (`250ms`, `30s`, `10m`, `1h`, `7d`, or
/// combinations such as `1h 30m`; parsed by `humantime`), held as whole
/// milliseconds, at most 3650 days (so that a deadline derived from it
/// stays within the timestamps the meter accepts). Config files,
/// environment variables and flags all use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dur(i64);

impl Dur {
    /// `ms` milliseconds (clamped to `0..=3650d`).
    pub const fn from_ms(ms: i64) -> Dur {
        Dur(if ms < 0 {
            0
        } else if ms > MAX_DURATION_MS {
            MAX_DURATION_MS
        } else {
            ms
        })
    }

    /// In milliseconds.
    pub const fn ms(self) -> i64 {
        self.0
    }

    /// As a standard duration.
    pub fn std(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.0.unsigned_abs())
    }
}

impl FromStr for Dur {
    type Err = String;

    fn from_str(s: &str) -> Result<Dur, String> {
        let bad = || format!("{s:?} is not a duration of at most 3650d (examples: 250ms, 30s, 10m, 1h, 7d)");
        let d = humantime::parse_duration(s.trim()).map_err(|_| bad())?;
        i64::try_from(d.as_millis())
            .ok()
            .filter(|ms| *ms <= MAX_DURATION_MS)
            .map(Dur)
            .ok_or_else(bad)
    }
}

/// The largest unit that divides it exactly: `35d`, `48h`, `90s`, `250ms`.
impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(i64, &str); 4] = [(86_400_000, "d"), (3_600_000, "h"), (60_000, "m"), (1_000, "s")];
        for (size, unit) in UNITS {
            if self.0 != 0 && self.0 % size == 0 {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}ms", self.0)
    }
}

impl serde::Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_written_forms() {
        let ms = |s: &str| s.parse::<Dur>().map(Dur::ms);
        assert_eq!(ms("250ms"), Ok(250));
        assert_eq!(ms("30s"), Ok(30_000));
        assert_eq!(ms("10m"), Ok(600_000));
        assert_eq!(ms("10min"), Ok(600_000));
        assert_eq!(ms(" 1h "), Ok(3_600_000));
        assert_eq!(ms("1h 30m"), Ok(5_400_000));
        assert_eq!(ms("7d"), Ok(7 * 86_400_000));
        assert_eq!(ms("3650d"), Ok(MAX_DURATION_MS));
        for bad in ["", "soon", "10", "-5s", "3651d", "99999999999999d", "1.5.3h"] {
            assert!(ms(bad).is_err(), "{bad:?} accepted");
        }
        assert!(ms("soon").unwrap_err().contains("examples"));
    }

    #[test]
    fn prints_what_it_parses() {
        for (ms, text) in [
            (250, "250ms"),
            (30_000, "30s"),
            (90_000, "90s"),
            (172_800_000, "2d"),
            (0, "0ms"),
        ] {
            let d = Dur::from_ms(ms);
            assert_eq!(d.to_string(), text);
            assert_eq!(text.parse::<Dur>(), Ok(d));
        }
    }

    #[test]
    fn serde_uses_the_text_form() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct S {
            d: Dur,
        }
        let s: S = toml::from_str("d = \"48h\"").expect("parse");
        assert_eq!(s.d.ms(), 172_800_000);
        assert_eq!(toml::to_string(&s).expect("write").trim(), "d = \"2d\"");
        let err = toml::from_str::<S>("d = \"later\"").expect_err("refused");
        assert!(err.to_string().contains("\"later\" is not a duration"), "{err}");
    }
}
