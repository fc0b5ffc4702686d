//! Event time: RFC 3339 timestamps as milliseconds since the Unix epoch, and
//! calendar-month billing periods in UTC.
//!
//! Billing never reads a clock: every instant it uses comes from an event.
//! The one clock read in the crate is [`Timestamp::now`], for adapters that
//! stamp what they send or check the age of what they stored.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Milliseconds in one second.
pub const MS_PER_SECOND: i64 = 1_000;

/// An instant in event time, in milliseconds since 1970-01-01T00:00:00Z.
///
/// Sub-millisecond digits of an input timestamp are truncated (floored), so
/// that durations are whole milliseconds as the billing rules require.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The earliest instant a timestamp may hold: 0001-01-01T00:00:00.000Z.
    pub const MIN: Timestamp = Timestamp(-62_135_596_800_000);
    /// The latest instant a timestamp may hold: 9999-12-31T23:59:59.999Z.
    /// Every timestamp in `[MIN, MAX]` formats as a four-digit year and
    /// parses back to itself; [`Timestamp::parse`] refuses anything else.
    pub const MAX: Timestamp = Timestamp(253_402_300_799_999);

    /// The machine's wall clock, in milliseconds since the epoch (0 if the
    /// clock reads before 1970). The one place that reads it: for adapters
    /// that stamp what they send or check the age of what they stored. The
    /// meter's billing decisions never call it; they run on stream time.
    pub fn now() -> Timestamp {
        Timestamp(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
        )
    }
}

/// The longest duration any setting accepts (3650 days), so that a
/// deadline derived from an accepted event time stays within
/// [`Timestamp::MAX`].
pub const MAX_DURATION_MS: i64 = 3_650 * 86_400_000;

/// Why a timestamp string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid RFC 3339 timestamp {input:?}: {why}")]
pub struct TimestampError {
    /// The text that was refused (cut to 64 characters).
    pub input: String,
    /// What was wrong with it.
    pub why: &'static str,
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    // Howard Hinnant's algorithm: days since 1970-01-01 of a proleptic
    // Gregorian date.
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

impl Timestamp {
    /// Parses an RFC 3339 timestamp (`2024-05-01T12:00:00.250Z`, `…+02:00`).
    pub fn parse(s: &str) -> Result<Self, TimestampError> {
        let err = |why| TimestampError {
            input: s.chars().take(64).collect(),
            why,
        };
        let b = s.as_bytes();
        if b.len() < 20 {
            return Err(err("too short"));
        }
        let num = |range: std::ops::Range<usize>| -> Result<i64, TimestampError> {
            let part = &b[range];
            if part.iter().all(u8::is_ascii_digit) {
                Ok(part.iter().fold(0i64, |a, d| a * 10 + i64::from(d - b'0')))
            } else {
                Err(err("expected digits"))
            }
        };
        if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
            return Err(err("expected YYYY-MM-DDTHH:MM:SS"));
        }
        if b[13] != b':' || b[16] != b':' {
            return Err(err("expected YYYY-MM-DDTHH:MM:SS"));
        }
        let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&mo) {
            return Err(err("month out of range"));
        }
        let (mo, d32) = (mo as u32, d as u32);
        if d32 == 0 || d32 > days_in_month(y, mo) {
            return Err(err("day out of range"));
        }
        if h > 23 || mi > 59 || sec > 60 {
            return Err(err("time of day out of range"));
        }
        let mut i = 19;
        let mut millis = 0i64;
        if b.get(i) == Some(&b'.') {
            i += 1;
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                if i - start < 3 {
                    millis = millis * 10 + i64::from(b[i] - b'0');
                }
                i += 1;
            }
            let digits = i - start;
            if digits == 0 {
                return Err(err("empty fraction"));
            }
            for _ in digits..3 {
                millis *= 10;
            }
        }
        let offset_min = match b.get(i) {
            Some(b'Z' | b'z') if i + 1 == b.len() => 0,
            Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
                let oh = num(i + 1..i + 3)?;
                let om = num(i + 4..i + 6)?;
                if oh > 23 || om > 59 {
                    return Err(err("offset out of range"));
                }
                let off = oh * 60 + om;
                if *sign == b'-' {
                    -off
                } else {
                    off
                }
            }
            _ => return Err(err("expected Z or a ±HH:MM offset")),
        };
        let days = days_from_civil(y, mo, d32);
        let secs = days * 86_400 + h * 3_600 + mi * 60 + sec.min(59) - offset_min * 60;
        let t = Timestamp(secs * MS_PER_SECOND + millis);
        if t < Timestamp::MIN || t > Timestamp::MAX {
            return Err(err("outside 0001-01-01T00:00:00Z..9999-12-31T23:59:59.999Z"));
        }
        Ok(t)
    }

    /// Milliseconds since the epoch.
    pub fn millis(self) -> i64 {
        self.0
    }

    /// The billing period (calendar month, UTC) that contains this instant.
    pub fn period(self) -> Period {
        let days = self.0.div_euclid(86_400_000);
        let (y, m, _) = civil_from_days(days);
        Period::new(y as i32, m)
    }

    /// This instant plus `ms` milliseconds (saturating).
    pub fn plus_ms(self, ms: i64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }
}

/// Writes `v` as `buf.len()` decimal digits, zero-padded (`v` fits).
fn put_digits(buf: &mut [u8], mut v: u32) {
    for b in buf.iter_mut().rev() {
        *b = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

impl Timestamp {
    /// The text of this instant (`2024-05-01T12:00:00.250Z`) written into
    /// `buf` without the formatting machinery (every charge carries
    /// several); `None` for a year outside 0000–9999, which
    /// [`Timestamp::write_formatted`] writes.
    fn text(self, buf: &mut [u8; 24]) -> Option<&str> {
        let days = self.0.div_euclid(86_400_000);
        let rem = self.0.rem_euclid(86_400_000) as u32;
        let (y, m, d) = civil_from_days(days);
        let y = u32::try_from(y).ok().filter(|y| *y <= 9999)?;
        *buf = *b"0000-00-00T00:00:00.000Z";
        put_digits(&mut buf[0..4], y);
        put_digits(&mut buf[5..7], m);
        put_digits(&mut buf[8..10], d);
        put_digits(&mut buf[11..13], rem / 3_600_000);
        put_digits(&mut buf[14..16], rem % 3_600_000 / 60_000);
        put_digits(&mut buf[17..19], rem % 60_000 / 1000);
        put_digits(&mut buf[20..23], rem % 1000);
        std::str::from_utf8(buf).ok()
    }

    /// The same text through the formatting machinery: any year.
    fn write_formatted(self, f: &mut impl fmt::Write) -> fmt::Result {
        let days = self.0.div_euclid(86_400_000);
        let rem = self.0.rem_euclid(86_400_000);
        let (y, m, d) = civil_from_days(days);
        let (h, rem) = (rem / 3_600_000, rem % 3_600_000);
        let (mi, rem) = (rem / 60_000, rem % 60_000);
        let (s, ms) = (rem / 1000, rem % 1000);
        write!(f, "{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.text(&mut [0; 24]) {
            Some(s) => f.write_str(s),
            None => self.write_formatted(f),
        }
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.text(&mut [0; 24]) {
            Some(t) => s.serialize_str(t),
            None => s.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Timestamp::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A billing period: one calendar month in UTC, written `YYYY-MM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Period {
    year: i32,
    month: u32,
}

impl Period {
    /// The period of `year`-`month` (month 1..=12; out-of-range months are clamped).
    pub fn new(year: i32, month: u32) -> Self {
        Period {
            year,
            month: month.clamp(1, 12),
        }
    }

    /// Parses `YYYY-MM`.
    pub fn parse(s: &str) -> Option<Self> {
        let (y, m) = s.split_once('-')?;
        if y.len() != 4 || m.len() != 2 {
            return None;
        }
        let m: u32 = m.parse().ok()?;
        (1..=12).contains(&m).then_some(())?;
        Some(Period::new(y.parse().ok()?, m))
    }

    /// The first instant of the period.
    pub fn start(self) -> Timestamp {
        Timestamp(days_from_civil(i64::from(self.year), self.month, 1) * 86_400_000)
    }

    /// The first instant after the period (the start of the next one).
    pub fn end(self) -> Timestamp {
        self.next().start()
    }

    /// The month before.
    pub fn prev(self) -> Period {
        if self.month == 1 {
            Period::new(self.year - 1, 12)
        } else {
            Period::new(self.year, self.month - 1)
        }
    }

    /// The following month.
    pub fn next(self) -> Period {
        if self.month == 12 {
            Period::new(self.year + 1, 1)
        } else {
            Period::new(self.year, self.month + 1)
        }
    }

    /// A compact ordinal (year × 12 + month − 1), used in store keys so that
    /// byte order is time order.
    pub fn ordinal(self) -> u32 {
        (self.year.max(0) as u32) * 12 + self.month - 1
    }

    /// Inverse of [`Period::ordinal`].
    pub fn from_ordinal(o: u32) -> Period {
        Period::new((o / 12) as i32, o % 12 + 1)
    }
}

impl Period {
    /// `YYYY-MM` written into `buf`; `None` for a year outside 0000–9999.
    fn text(self, buf: &mut [u8; 7]) -> Option<&str> {
        let y = u32::try_from(self.year).ok().filter(|y| *y <= 9999)?;
        *buf = *b"0000-00";
        put_digits(&mut buf[0..4], y);
        put_digits(&mut buf[5..7], self.month);
        std::str::from_utf8(buf).ok()
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.text(&mut [0; 7]) {
            Some(s) => f.write_str(s),
            None => write!(f, "{:04}-{:02}", self.year, self.month),
        }
    }
}

impl Serialize for Period {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.text(&mut [0; 7]) {
            Some(t) => s.serialize_str(t),
            None => s.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Period::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("invalid period {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text the formatting machinery writes, for comparison.
    fn slow(t: Timestamp) -> String {
        let mut s = String::new();
        assert!(t.write_formatted(&mut s).is_ok());
        s
    }

    #[test]
    fn the_direct_text_is_the_formatted_text() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut at = vec![
            Timestamp::MIN,
            Timestamp::MAX,
            Timestamp(Timestamp::MAX.0 + 1),
            Timestamp(Timestamp::MIN.0 - 1),
            Timestamp(0),
            Timestamp(-1),
            Timestamp(i64::MAX / 4),
            Timestamp(i64::MIN / 4),
        ];
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let span = (Timestamp::MAX.0 - Timestamp::MIN.0) as u64;
            at.push(Timestamp(Timestamp::MIN.0 + (x % span) as i64));
        }
        for t in at {
            assert_eq!(t.to_string(), slow(t), "{}", t.0);
            assert_eq!(serde_json::to_string(&t).ok(), Some(format!("\"{}\"", slow(t))));
            let p = t.period();
            let want = format!("{:04}-{:02}", p.year, p.month);
            assert_eq!(p.to_string(), want);
            assert_eq!(serde_json::to_string(&p).ok(), Some(format!("\"{want}\"")));
        }
    }

    #[test]
    fn parses_and_formats_round_trip() {
        let t = Timestamp::parse("2024-05-01T12:00:00.250Z").unwrap_or_default();
        assert_eq!(t.to_string(), "2024-05-01T12:00:00.250Z");
        assert_eq!(t.period().to_string(), "2024-05");
    }

    #[test]
    fn offsets_and_fractions() {
        let a = Timestamp::parse("2024-05-01T14:00:00.123456+02:00").unwrap_or_default();
        assert_eq!(a.to_string(), "2024-05-01T12:00:00.123Z");
        let b = Timestamp::parse("2024-05-01T12:00:00Z").unwrap_or_default();
        assert_eq!(b.millis() % 1000, 0);
        assert!(Timestamp::parse("2024-02-30T00:00:00Z").is_err());
        assert!(Timestamp::parse("2024-05-01 12:00:00").is_err());
        assert!(Timestamp::parse("2024-05-01T12:00:00.Z").is_err());
    }

    #[test]
    fn period_bounds() {
        let p = Period::parse("2024-12").unwrap_or(Period::new(1970, 1));
        assert_eq!(p.start().to_string(), "2024-12-01T00:00:00.000Z");
        assert_eq!(p.end().to_string(), "2025-01-01T00:00:00.000Z");
        assert_eq!(Period::from_ordinal(p.ordinal()), p);
        assert_eq!(Timestamp(p.end().0 - 1).period(), p);
        let leap = Period::new(2024, 2);
        assert_eq!(leap.end().0 - leap.start().0, 29 * 86_400_000);
    }

    #[test]
    fn every_parsed_timestamp_formats_back_to_itself() {
        for s in [
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999Z",
            "9999-12-31T23:59:59.999999Z",
            "0001-01-01T23:59:00+23:59",
            "2000-02-29T00:00:00-23:59",
        ] {
            let t = Timestamp::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(Timestamp::parse(&t.to_string()), Ok(t), "{s}");
        }
        // Offsets that would leave the four-digit years are refused.
        assert!(Timestamp::parse("0001-01-01T00:00:00+00:01").is_err());
        assert!(Timestamp::parse("9999-12-31T23:59:59-00:01").is_err());
        assert_eq!(Timestamp::MIN.to_string(), "0001-01-01T00:00:00.000Z");
        assert_eq!(Timestamp::MAX.to_string(), "9999-12-31T23:59:59.999Z");
    }
}
