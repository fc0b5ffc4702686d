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

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        ///
        /// Shared (`Arc<str>`): cloning an id is a reference-count increment,
        /// which keeps the meter's hot path free of string copies.
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub std::sync::Arc<str>);

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

        // Hashes and compares as its text does (`Arc<str>` hashes as
        // `str`), so a set of ids can be looked up by a `&str`.
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                $name(s.into())
            }
        }
    };
}

string_id!(
    /// The account a job is billed to (`data.account_id`); the Kafka key.
    AccountId
);
string_id!(
    /// A job's id (the CloudEvent `subject`).
    JobId
);
string_id!(
    /// A model's id as named in the rate card (`sdxl-1.0`).
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
    fn serializes_as_string() {
        let m = Money::parse("1.50").unwrap_or_default();
        assert_eq!(serde_json::to_string(&m).unwrap_or_default(), "\"1.50\"");
    }
}
