//! The binary value format of state records (format version 1).
//!
//! A compact, hand-written layout for the records the meter rewrites on
//! almost every event (jobs, usage counters, open statements). It encodes
//! exactly what the JSON format (version 0) encodes — no more, no less — so
//! a record read in either format yields the same value; a property test
//! holds the two to that.
//!
//! Layout: fields in declaration order; integers as LEB128 varints (signed
//! ones zigzagged); strings as a varint length and UTF-8 bytes; `Option` as
//! a 0/1 byte then the value; a list as a varint count then its items;
//! event keys as 16 bytes little-endian; timestamps as zigzagged epoch
//! milliseconds; periods as their month ordinal; money and decimals as a
//! byte (scale in bits 0–4, sign in bit 7) then the 96-bit mantissa's
//! magnitude as a varint. Enums are one byte, listed below; a new variant
//! takes a new number, and a changed layout takes a new format version —
//! except fields appended at the end of a top-level record and written only
//! when set (a job's spend-control fields), which older values simply lack.

use crate::cycle::BillingPeriod;
use crate::event::{EventKey, JobKind, JobStatus, StartInfo};
use crate::money::{AccountId, ModelId, Money};
use crate::output::{LimitKind, Origin};
use crate::state::{
    Accrual, Billed, BilledPart, ChargeRef, Counter, Drawn, Job, LineAcc, Refunded, StartRec, StatementAcc, StopRec,
    UsageKey,
};
use crate::time::{Period, Timestamp};
use rust_decimal::Decimal;
use std::sync::Arc;

/// Why bytes are not a value of the binary format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

type R<T> = Result<T, Malformed>;

/// A value with a binary layout.
pub trait Binary: Sized {
    /// Appends the value.
    fn put(&self, w: &mut Vec<u8>);
    /// Reads a value from the front of `r`, advancing it.
    fn take(r: &mut &[u8]) -> R<Self>;
}

/// Encodes `v` after `prefix`.
pub fn encode<T: Binary>(prefix: &[u8], v: &T) -> Vec<u8> {
    // Room for a typical job value (its start, stop, event ids and a
    // charge), so that it is written without growing the buffer.
    let mut w = Vec::with_capacity(prefix.len() + 256);
    w.extend_from_slice(prefix);
    v.put(&mut w);
    w
}

/// Decodes a whole value: trailing bytes are an error.
pub fn decode<T: Binary>(mut b: &[u8]) -> R<T> {
    let v = T::take(&mut b)?;
    if b.is_empty() {
        Ok(v)
    } else {
        Err(Malformed("trailing bytes"))
    }
}

fn put_u(w: &mut Vec<u8>, mut v: u128) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            w.push(byte);
            return;
        }
        w.push(byte | 0x80);
    }
}

fn take_u(r: &mut &[u8], bits: u32) -> R<u128> {
    let mut v: u128 = 0;
    let mut shift = 0u32;
    loop {
        let (&byte, rest) = r.split_first().ok_or(Malformed("truncated integer"))?;
        *r = rest;
        let part = u128::from(byte & 0x7f);
        // `bits` is at most 96, so every shift stays inside a u128.
        if shift >= bits || (bits - shift < 7 && part >> (bits - shift) != 0) {
            return Err(Malformed("integer too large"));
        }
        v |= part << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
        shift += 7;
    }
}

fn zigzag(v: i64) -> u128 {
    u128::from(((v << 1) ^ (v >> 63)) as u64)
}

fn unzigzag(u: u64) -> i64 {
    ((u >> 1) as i64) ^ -((u & 1) as i64)
}

impl Binary for u64 {
    fn put(&self, w: &mut Vec<u8>) {
        put_u(w, u128::from(*self));
    }
    fn take(r: &mut &[u8]) -> R<Self> {
        Ok(take_u(r, 64)? as u64)
    }
}

impl Binary for i64 {
    fn put(&self, w: &mut Vec<u8>) {
        put_u(w, zigzag(*self));
    }
    fn take(r: &mut &[u8]) -> R<Self> {
        Ok(unzigzag(take_u(r, 64)? as u64))
    }
}

impl Binary for i32 {
    fn put(&self, w: &mut Vec<u8>) {
        i64::from(*self).put(w);
    }
    fn take(r: &mut &[u8]) -> R<Self> {
        i32::try_from(i64::take(r)?).map_err(|_| Malformed("i32 out of range"))
    }
}

impl Binary for bool {
    fn put(&self, w: &mut Vec<u8>) {
        w.push(u8::from(*self));
    }
    fn take(r: &mut &[u8]) -> R<Self> {
        match take_byte(r)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Malformed("invalid bool")),
        }
    }
}

fn take_byte(r: &mut &[u8]) -> R<u8> {
    let (&b, rest) = r.split_first().ok_or(Malformed("truncated"))?;
    *r = rest;
    Ok(b)
}

fn take_len(r: &mut &[u8]) -> R<usize> {
    let n = usize::try_from(u64::take(r)?).map_err(|_| Malformed("length too large"))?;
    // Every item takes at least one byte: a count larger than what is left
    // is corrupt, and must not reserve memory.
    if n > r.len() {
        return Err(Malformed("length beyond the end"));
    }
    Ok(n)
}

fn take_str<'a>(r: &mut &'a [u8]) -> R<&'a str> {
    let n = take_len(r)?;
    let (s, rest) = r.split_at(n);
    *r = rest;
    std::str::from_utf8(s).map_err(|_| Malformed("invalid UTF-8"))
}

/// Text: its length, then its UTF-8 bytes.
fn put_text(w: &mut Vec<u8>, s: &str) {
    put_u(w, s.len() as u128);
    w.extend_from_slice(s.as_bytes());
}

impl Binary for String {
    fn put(&self, w: &mut Vec<u8>) {
        put_text(w, self);
    }
    fn take(r: &mut &[u8]) -> R<Self> {
        take_str(r).map(str::to_owned)
    }
}

impl Binary for Arc<str> {
    fn put(&self, w: &mut Vec<u8>) {
        put_text(w, self);
    }
    fn take(r: &mut &[u8]) -> R<Self> {
        take_str(r).map(Arc::from)
    }
}

impl<T: Binary> Binary for Option<T> {
    fn put(&self, w: &mut Vec<u8>) {
        match self {
            None => w.push(0),
            Some(v) => {
                w.push(1);
                v.put(w);
            }
        }
    }
    fn take(r: &mut &[u8]) -> R<Self> {
        match take_byte(r)? {
            0 => Ok(None),
            1 => T::take(r).map(Some),
            _ => Err(Malformed("invalid option tag")),
        }
    }
}

impl<T: Binary> Binary for Vec<T> {
    fn put(&self, w: &mut Vec<u8>) {
        put_u(w, self.len() as u128);
        for v in self {
            v.put(w);
        }
    }
    fn take(r: &mut &[u8]) -> R<Self> {
        let n = take_len(r)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(T::take(r)?);
        }
        Ok(out)
    }
}

impl Binary for Decimal {
    fn put(&self, w: &mut Vec<u8>) {
        let scale = self.scale() as u8;
        w.push(scale | if self.is_sign_negative() { 0x80 } else { 0 });
        put_u(w, self.mantissa().unsigned_abs());
    }
    fn take(r: &mut &[u8]) -> R<Self> {
        let head = take_byte(r)?;
        let scale = u32::from(head & 0x1f);
        if head & 0x60 != 0 || scale > 28 {
            return Err(Malformed("invalid decimal scale"));
        }
        let m = take_u(r, 96)?;
        let m = i128::try_from(m).map_err(|_| Malformed("decimal too large"))?;
        let mut d = Decimal::try_from_i128_with_scale(m, scale).map_err(|_| Malformed("decimal too large"))?;
        d.set_sign_negative(head & 0x80 != 0);
        Ok(d)
    }
}

impl Binary for Money {
    fn put(&self, w: &mut Vec<u8>) {
        self.0.put(w);
    }
    fn take(r: &mut &[u8]) -> R<Self> {
        Decimal::take(r).map(Money)
    }
}

impl Binary for Timestamp {
    fn put(&self, w: &mut Vec<u8>) {
        self.0.put(w);
    }
    fn take(r: &mut &[u8]) -> R<Self> {
        let t = Timestamp(i64::take(r)?);
        if t < Timestamp::MIN || t > Timestamp::MAX {
            return Err(Malformed("timestamp out of range"));
        }
        Ok(t)
    }
}

/// The last month a period can be (9999-12), as an ordinal.
const MAX_PERIOD: u64 = 9999 * 12 + 11;

impl Binary for Period {
    fn put(&self, w: &mut Vec<u8>) {
        u64::from(self.ordinal()).put(w);
    }
    fn take(r: &mut &[u8]) -> R<Self> {
        let o = u64::take(r)?;
        if o > MAX_PERIOD {
            return Err(Malformed("period out of range"));
        }
        Ok(Period::from_ordinal(o as u32))
    }
}

/// A [`BillingPeriod`] that is not a calendar month: its month ordinal is
/// this (no month has it), then its start and end.
const INTERVAL: u64 = u64::MAX;

/// A calendar month as its ordinal (the encoding of a [`Period`], so state
/// written before periods of other lengths reads unchanged); any other
/// period as [`INTERVAL`], start, end.
impl Binary for BillingPeriod {
    fn put(&self, w: &mut Vec<u8>) {
        match self.calendar_month() {
            Some(m) => m.put(w),
            None => {
                INTERVAL.put(w);
                self.start.put(w);
                self.end.put(w);
            }
        }
    }
    fn take(r: &mut &[u8]) -> R<Self> {
        let mut peek = *r;
        if u64::take(&mut peek)? != INTERVAL {
            return Ok(BillingPeriod::month(Period::take(r)?));
        }
        *r = peek;
        // A period of the last month ends one instant past the last
        // timestamp (10000-01-01).
        let (start, end) = (Timestamp::take(r)?, Timestamp(i64::take(r)?));
        if start >= end || end.0 > Timestamp::MAX.0 + 1 {
            return Err(Malformed("period out of range"));
        }
        Ok(BillingPeriod { start, end })
    }
}

impl Binary for EventKey {
    fn put(&self, w: &mut Vec<u8>) {
        w.extend_from_slice(&self.0.to_le_bytes());
    }
    fn take(r: &mut &[u8]) -> R<Self> {
        let (b, rest) = r.split_first_chunk::<16>().ok_or(Malformed("truncated event key"))?;
        *r = rest;
        Ok(EventKey(u128::from_le_bytes(*b)))
    }
}

impl Binary for AccountId {
    fn put(&self, w: &mut Vec<u8>) {
        put_text(w, self.as_str());
    }
    fn take(r: &mut &[u8]) -> R<Self> {
        Arc::<str>::take(r).map(AccountId)
    }
}

impl Binary for ModelId {
    fn put(&self, w: &mut Vec<u8>) {
        put_text(w, self.as_str());
    }
    fn take(r: &mut &[u8]) -> R<Self> {
        take_str(r).map(ModelId::from)
    }
}

macro_rules! byte_enum {
    ($t:ty, $what:literal, $($v:path = $n:literal),+ $(,)?) => {
        impl Binary for $t {
            fn put(&self, w: &mut Vec<u8>) {
                w.push(match self { $($v => $n),+ });
            }
            fn take(r: &mut &[u8]) -> R<Self> {
                match take_byte(r)? {
                    $($n => Ok($v),)+
                    _ => Err(Malformed(concat!("unknown ", $what))),
                }
            }
        }
    };
}
byte_enum!(
    JobKind,
    "job kind",
    JobKind::Inference = 1,
    JobKind::FineTune = 2,
    JobKind::WorkflowStep = 3
);
byte_enum!(
    JobStatus,
    "job status",
    JobStatus::Succeeded = 1,
    JobStatus::Failed = 2,
    JobStatus::Cancelled = 3,
    JobStatus::Orphaned = 4,
);
byte_enum!(
    LimitKind,
    "limit kind",
    LimitKind::FreeCredits = 1,
    LimitKind::ModelApiCap = 2,
    LimitKind::WorkflowQuota = 3,
    LimitKind::Alert = 4,
    LimitKind::SpendLimit = 5,
);

/// Implements [`Binary`] for a struct as its fields in order. Fields after
/// `;` are not stored (as in the JSON format) and come back as `Default`.
macro_rules! record {
    ($t:ident { $($f:ident),+ $(; $($skip:ident),+)? }) => {
        impl Binary for $t {
            fn put(&self, w: &mut Vec<u8>) {
                $(self.$f.put(w);)+
            }
            fn take(r: &mut &[u8]) -> R<Self> {
                Ok($t {
                    $($f: Binary::take(r)?,)+
                    $($($skip: Default::default(),)+)?
                })
            }
        }
    };
}
record!(StartInfo {
    kind,
    model,
    workflow_run_id,
    gpu
});
record!(StartRec {
    key,
    time,
    info,
    rate,
    version
});
record!(StopRec {
    key,
    time,
    status,
    pending_raw,
    origin
});
record!(Origin { topic, partition, offset; record_time });
record!(UsageKey { account, limit, period });
record!(Accrual { counter, amount });
record!(BilledPart {
    service_period,
    from,
    to,
    seconds,
    charge_id
});
record!(Billed {
    orphan,
    parts,
    adjusted
});
impl<A: Binary, B: Binary> Binary for (A, B) {
    fn put(&self, w: &mut Vec<u8>) {
        self.0.put(w);
        self.1.put(w);
    }
    fn take(r: &mut &[u8]) -> R<Self> {
        Ok((A::take(r)?, B::take(r)?))
    }
}
record!(ChargeRef {
    charge_id,
    service_period,
    from,
    to,
    ms,
    seconds,
    rate,
    amount,
    due,
    status,
    limit,
    spend,
    adjustment_id,
    drawn
});
record!(Drawn { grant, amount });
record!(Refunded {
    adjustment_id,
    through_end
});
/// A job is its fields in order; the spend-control fields (`spend`,
/// `stop_sent`) follow only when one is set or a later section follows,
/// then the refund section (`charges`, `refunded`) only when it holds
/// anything, so a job without them has the layout it had before they
/// existed, and a value that ends before them reads them as absent.
impl Binary for Job {
    fn put(&self, w: &mut Vec<u8>) {
        self.start.put(w);
        self.stop.put(w);
        self.last_heartbeat.put(w);
        self.accrual.put(w);
        self.billed.put(w);
        self.keys.put(w);
        self.expires.put(w);
        let refunds = !self.charges.is_empty() || self.refunded.is_some();
        if self.spend.is_some() || self.stop_sent.is_some() || refunds {
            self.spend.put(w);
            self.stop_sent.put(w);
        }
        if refunds {
            self.charges.put(w);
            self.refunded.put(w);
        }
    }
    fn take(r: &mut &[u8]) -> R<Self> {
        let mut job = Job {
            start: Binary::take(r)?,
            stop: Binary::take(r)?,
            last_heartbeat: Binary::take(r)?,
            accrual: Binary::take(r)?,
            billed: Binary::take(r)?,
            keys: Binary::take(r)?,
            expires: Binary::take(r)?,
            ..Job::default()
        };
        if !r.is_empty() {
            job.spend = Binary::take(r)?;
            job.stop_sent = Binary::take(r)?;
        }
        if !r.is_empty() {
            job.charges = Binary::take(r)?;
            job.refunded = Binary::take(r)?;
        }
        Ok(job)
    }
}
record!(Counter { charged, inflight });
record!(LineAcc { jobs, seconds, amount });

impl Binary for StatementAcc {
    fn put(&self, w: &mut Vec<u8>) {
        put_u(w, self.lines.len() as u128);
        for ((kind, model), line) in &self.lines {
            kind.put(w);
            model.put(w);
            line.put(w);
        }
        self.credits_applied.put(w);
        self.included_usage.put(w);
        self.due.put(w);
        // Only when there are any: a statement without adjustments has the
        // layout it had before they existed.
        if !self.adjustments.is_empty() || !self.grants.is_empty() {
            put_u(w, self.adjustments.len() as u128);
            for (id, amount) in &self.adjustments {
                id.put(w);
                amount.put(w);
            }
        }
        // The same for credit grants, after the adjustments.
        if !self.grants.is_empty() {
            put_u(w, self.grants.len() as u128);
            for (id, amount) in &self.grants {
                id.put(w);
                amount.put(w);
            }
        }
    }
    fn take(r: &mut &[u8]) -> R<Self> {
        let n = take_len(r)?;
        let mut lines = std::collections::BTreeMap::new();
        for _ in 0..n {
            let kind = JobKind::take(r)?;
            let model = <Option<ModelId> as Binary>::take(r)?;
            lines.insert((kind, model), LineAcc::take(r)?);
        }
        let mut acc = StatementAcc {
            lines,
            credits_applied: Money::take(r)?,
            included_usage: Money::take(r)?,
            due: Money::take(r)?,
            adjustments: std::collections::BTreeMap::new(),
            grants: std::collections::BTreeMap::new(),
        };
        if !r.is_empty() {
            for _ in 0..take_len(r)? {
                let id = String::take(r)?;
                acc.adjustments.insert(id, Money::take(r)?);
            }
        }
        if !r.is_empty() {
            for _ in 0..take_len(r)? {
                let id = String::take(r)?;
                acc.grants.insert(id, Money::take(r)?);
            }
        }
        Ok(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round<T: Binary>(v: &T) -> R<T> {
        decode(&encode(&[], v))
    }

    proptest! {
        #[test]
        fn integers_round_trip(u in any::<u64>(), i in any::<i64>(), j in any::<i32>()) {
            prop_assert_eq!(round(&u), Ok(u));
            prop_assert_eq!(round(&i), Ok(i));
            prop_assert_eq!(round(&j), Ok(j));
        }

        #[test]
        fn decimals_round_trip_exactly(m in any::<i64>(), hi in 0u32..(1 << 31), s in 0u32..=28, neg in any::<bool>()) {
            let mut d = Decimal::from_i128_with_scale((i128::from(hi) << 64) | i128::from(m.unsigned_abs()), s);
            d.set_sign_negative(neg);
            let back: Decimal = round(&d).map_err(|e| TestCaseError::fail(e.0))?;
            // Same value, scale and sign: serialize() is the exact bits.
            prop_assert_eq!(back.serialize(), d.serialize());
        }

        /// Any billing period of any cadence round-trips, the last ones
        /// (ending at 10000-01-01) included; a calendar month keeps the
        /// encoding of a month.
        #[test]
        fn billing_periods_round_trip(start in Timestamp::MIN.0..=Timestamp::MAX.0, len in 1i64..40 * 86_400_000) {
            let p = BillingPeriod { start: Timestamp(start), end: Timestamp((start + len).min(Timestamp::MAX.0 + 1)) };
            prop_assume!(p.start < p.end);
            prop_assert_eq!(round(&p), Ok(p));
            let m = p.start.period();
            prop_assert_eq!(encode(&[], &BillingPeriod::month(m)), encode(&[], &m));
            prop_assert_eq!(round(&BillingPeriod::month(m)), Ok(BillingPeriod::month(m)));
        }

        /// A statement accumulator round-trips with and without price
        /// adjustments; without, its bytes are the layout before they existed.
        #[test]
        fn statement_accumulators_round_trip(due in any::<i64>(), adj in proptest::collection::btree_map(".{0,12}", any::<i64>(), 0..4)) {
            let mut acc = StatementAcc { due: Money(Decimal::new(due, 6)), ..StatementAcc::default() };
            let plain = encode(&[], &acc);
            acc.adjustments = adj.into_iter().map(|(k, v)| (k, Money(Decimal::new(v, 5)))).collect();
            prop_assert_eq!(round(&acc), Ok(acc.clone()));
            if acc.adjustments.is_empty() {
                prop_assert_eq!(encode(&[], &acc), plain);
            }
        }

        /// Model ids (held inline up to 23 bytes, shared beyond) are
        /// written as the same bytes as any text, and read back equal.
        #[test]
        fn model_ids_round_trip_as_text(id in "\\PC{0,40}") {
            let m = ModelId::from(id.as_str());
            prop_assert_eq!(encode(&[], &m), encode(&[], &id));
            prop_assert_eq!(round(&m), Ok(m.clone()));
            prop_assert_eq!(round(&Some(m.clone())), Ok(Some(m)));
        }

        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..96)) {
            let _ = decode::<Job>(&b);
            let _ = decode::<Counter>(&b);
            let _ = decode::<StatementAcc>(&b);
        }
    }

    #[test]
    fn oversized_varints_are_refused() {
        let mut w = Vec::new();
        put_u(&mut w, u128::from(u64::MAX) + 1);
        assert_eq!(decode::<u64>(&w), Err(Malformed("integer too large")));
        let mut w = vec![0u8];
        put_u(&mut w, 1u128 << 96);
        assert!(decode::<Decimal>(&w).is_err());
        // A list claiming more items than bytes left.
        assert_eq!(
            decode::<Vec<EventKey>>(&[0xff, 0x01]),
            Err(Malformed("length beyond the end"))
        );
    }
}
