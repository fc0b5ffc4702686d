//! Money and identifiers.
//!
//! Money is an exact [`Decimal`] in US dollars, serialized as a JSON string.
//! Nothing is rounded except in [`Money::round_cents`], the one place that
//! rounds (half-even, to cents), used only for statement totals.

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::{Add, AddAssign, Mul, Neg, Sub, SubAssign};

/// An exact amount of US dollars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Money(pub Decimal);

/// The currency every amount is in.
pub const CURRENCY: &str = "USD";

impl Money {
    /// Zero dollars.
    pub const ZERO: Money = Money(Decimal::ZERO);

    /// Parses a decimal string such as `"0.00025"`.
    pub fn parse(s: &str) -> Option<Money> {
        s.trim().parse::<Decimal>().ok().map(Money)
    }

    /// Rounds to cents, half-even (banker's rounding): the only rounding
    /// of money jobmeter does; it applies to statement totals, never to
    /// charges. (The usage API's `used_pct`, a percentage, is rounded to
    /// two decimals the same way; it is not money.)
    pub fn round_cents(self) -> Money {
        Money(self.0.round_dp_with_strategy(2, RoundingStrategy::MidpointNearestEven))
    }

    /// The smaller of two amounts.
    pub fn min(self, other: Money) -> Money {
        if self <= other {
            self
        } else {
            other
        }
    }

    /// The larger of two amounts.
    pub fn max(self, other: Money) -> Money {
        if self >= other {
            self
        } else {
            other
        }
    }

    /// `self × pct / 100`, exact.
    pub fn percent(self, pct: u32) -> Money {
        Money(self.0 * Decimal::from(pct) / Decimal::from(100))
    }

    /// True when the amount is zero.
    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }

    /// [`Money::is_zero`] by reference (for serde's `skip_serializing_if`).
    pub fn is_zero_ref(&self) -> bool {
        self.is_zero()
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Add for Money {
    type Output = Money;
    fn add(self, o: Money) -> Money {
        Money(self.0 + o.0)
    }
}
impl Sub for Money {
    type Output = Money;
    fn sub(self, o: Money) -> Money {
        Money(self.0 - o.0)
    }
}
impl Neg for Money {
    type Output = Money;
    fn neg(self) -> Money {
        Money(-self.0)
    }
}
impl AddAssign for Money {
    fn add_assign(&mut self, o: Money) {
        self.0 += o.0;
    }
}
impl SubAssign for Money {
    fn sub_assign(&mut self, o: Money) {
        self.0 -= o.0;
    }
}
impl Mul<Decimal> for Money {
    type Output = Money;
    fn mul(self, q: Decimal) -> Money {
        Money(self.0 * q)
    }
}
impl std::iter::Sum for Money {
    fn sum<I: Iterator<Item = Money>>(iter: I) -> Money {
        iter.fold(Money::ZERO, Add::add)
    }
}

/// What every id type has: its text as a `&str`, display, conversion from
/// text, and lookups by `&str` (each id hashes and compares as its text
/// does).
macro_rules! id_text {
    ($name:ident) => {
        impl $name {
            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name(s.into())
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                $name(s.into())
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

/// The account a job is billed to (`data.account_id`); the Kafka key.
///
/// Shared (`Arc<str>`): cloning an id is a reference-count increment, and
/// the ids read from the input are interned, so most comparisons are of
/// two clones of one id and need no read of the text.
#[derive(Debug, Clone, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AccountId(pub std::sync::Arc<str>);

// Equal as text; two clones of one id are equal without reading it.
impl PartialEq for AccountId {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0) || *self.0 == *other.0
    }
}

// As `str` hashes, like `Arc<str>`.
impl std::hash::Hash for AccountId {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.hash(h)
    }
}

id_text!(AccountId);

/// An id held inline up to 23 bytes (longer ones are shared, `Arc<str>`),
/// for the ids every event carries: making one allocates nothing, cloning
/// or dropping one touches no shared count, and comparing two reads no
/// memory outside them. Hashes, compares, orders and serializes as its
/// text does.
macro_rules! inline_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(smol_str::SmolStr);

        id_text!($name);
    };
}

inline_id!(
    /// A job's id (the CloudEvent `subject`): every event names one.
    JobId
);

inline_id!(
    /// A model's id as named in the rate card (`sdxl-1.0`): every start
    /// names one, and each statement line is keyed by one.
    ModelId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_half_even_to_cents() {
        let m = |s| Money::parse(s).unwrap_or_default();
        assert_eq!(m("0.125").round_cents(), m("0.12"));
        assert_eq!(m("0.135").round_cents(), m("0.14"));
        assert_eq!(m("0.1251").round_cents(), m("0.13"));
    }

    #[test]
    fn ids_hash_compare_and_serialize_as_their_text() {
        use std::collections::{BTreeSet, HashSet};
        // Job ids up to 23 bytes are held inline, longer ones shared: both
        // must behave as their text, and alike across the boundary.
        let short = "job-0001";
        let long = "job-0001-a-very-long-identifier-✓";
        let edge = "x".repeat(23);
        let over = "x".repeat(24);
        for s in [short, long, edge.as_str(), over.as_str(), ""] {
            let a = JobId::from(s);
            let b = JobId::from(s.to_owned());
            assert_eq!(a, b);
            assert_eq!(a.as_str(), s);
            assert_eq!(a.to_string(), s);
            let set: HashSet<JobId> = [a.clone()].into();
            assert!(set.contains(s), "{s:?} is found by its text");
            assert_eq!(serde_json::to_string(&a).ok(), serde_json::to_string(s).ok());
            let back: Option<JobId> = serde_json::from_str(&serde_json::to_string(s).unwrap_or_default()).ok();
            assert_eq!(back.as_ref(), Some(&a));
        }
        assert_ne!(JobId::from(edge.as_str()), JobId::from(over.as_str()));
        for s in [short, long, edge.as_str(), over.as_str(), ""] {
            let m = ModelId::from(s);
            assert_eq!((m.as_str(), &m), (s, &ModelId::from(s.to_owned())));
            assert!(HashSet::from([m.clone()]).contains(s));
            assert_eq!(serde_json::to_string(&m).ok(), serde_json::to_string(s).ok());
        }
        let sorted: Vec<String> = [over.as_str(), short, long, edge.as_str()]
            .into_iter()
            .map(JobId::from)
            .collect::<BTreeSet<_>>()
            .iter()
            .map(|j| j.to_string())
            .collect();
        let mut text = vec![over.clone(), short.to_owned(), long.to_owned(), edge.clone()];
        text.sort();
        assert_eq!(sorted, text, "ordered as text");

        // Account ids: equal by text whether or not they share their text.
        let a = AccountId::from("acct-1");
        assert_eq!(a, a.clone());
        assert_eq!(a, AccountId::from("acct-1"));
        assert_ne!(a, AccountId::from("acct-2"));
        let set: HashSet<AccountId> = [a].into();
        assert!(set.contains(&AccountId::from("acct-1")) && set.contains("acct-1"));
    }

    #[test]
    fn serializes_as_string() {
        let m = Money::parse("1.50").unwrap_or_default();
        assert_eq!(serde_json::to_string(&m).unwrap_or_default(), "\"1.50\"");
    }
}
