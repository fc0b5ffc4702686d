//! The meter's map hasher against well-kept ones, on the meter's own key
//! shapes: job keys (account id, job id), event fingerprints (u128) and
//! usage-like keys. Each case inserts N keys into an empty map, then looks
//! every one up once (a hit) and N others (a miss), as the meter does when
//! it pairs events and checks duplicates.
//!
//! ```text
//! cargo bench -p jobmeter-core --bench hashers
//! ```

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use jobmeter_core::money::{AccountId, JobId};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};

/// The hand-written hasher the meter used before (multiply-rotate over
/// 8-byte words with a final avalanche), kept here to compare against.
mod previous {
    use super::*;

    /// Builds [`FastHasher`]s.
    #[derive(Debug, Clone, Copy, Default)]
    pub(crate) struct FastBuild;

    impl BuildHasher for FastBuild {
        type Hasher = FastHasher;
        fn build_hasher(&self) -> FastHasher {
            FastHasher(0)
        }
    }

    /// Multiply-rotate hashing of 8-byte words (the FxHash construction) with a
    /// final avalanche so hashbrown's top bits are well mixed.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct FastHasher(u64);

    const K: u64 = 0xf135_7aea_2e62_a9c5;

    impl FastHasher {
        #[inline]
        fn add(&mut self, w: u64) {
            self.0 = (self.0 ^ w).wrapping_mul(K).rotate_left(26);
        }
    }

    impl Hasher for FastHasher {
        #[inline]
        fn write(&mut self, bytes: &[u8]) {
            let mut chunks = bytes.chunks_exact(8);
            for c in &mut chunks {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                self.add(u64::from_le_bytes(b));
            }
            let rest = chunks.remainder();
            if !rest.is_empty() {
                let mut b = [0u8; 8];
                b[..rest.len()].copy_from_slice(rest);
                self.add(u64::from_le_bytes(b) ^ ((rest.len() as u64) << 59));
            }
        }

        #[inline]
        fn write_u8(&mut self, i: u8) {
            self.add(u64::from(i));
        }

        #[inline]
        fn write_u32(&mut self, i: u32) {
            self.add(u64::from(i));
        }

        #[inline]
        fn write_u64(&mut self, i: u64) {
            self.add(i);
        }

        #[inline]
        fn write_usize(&mut self, i: usize) {
            self.add(i as u64);
        }

        #[inline]
        fn finish(&self) -> u64 {
            let mut z = self.0;
            z = (z ^ (z >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
            z ^ (z >> 33)
        }
    }
}

const N: usize = 100_000;

fn job_keys(n: usize, salt: &str) -> Vec<(AccountId, JobId)> {
    (0..n)
        .map(|i| {
            (
                AccountId::from(format!("acct-{:05}", i % 2_000)),
                JobId::from(format!("job-{salt}-{i:08x}-9c2f")),
            )
        })
        .collect()
}

fn fingerprints(n: usize, salt: u128) -> Vec<u128> {
    (0..n as u128)
        .map(|i| (i ^ salt).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834) ^ (i << 64))
        .collect()
}

fn insert_and_find<K: Hash + Eq + Clone, S: BuildHasher + Default>(keys: &[K], misses: &[K]) -> usize {
    let mut m: HashMap<K, u32, S> = HashMap::with_hasher(S::default());
    for (i, k) in keys.iter().enumerate() {
        m.insert(k.clone(), i as u32);
    }
    keys.iter().filter(|k| m.contains_key(k)).count() + misses.iter().filter(|k| m.contains_key(k)).count()
}

fn case<K: Hash + Eq + Clone>(c: &mut Criterion, name: &str, keys: &[K], misses: &[K]) {
    let mut g = c.benchmark_group(format!("hash/{name}"));
    g.throughput(Throughput::Elements((keys.len() * 2) as u64));
    g.bench_function("previous hand-written hasher", |b| {
        b.iter_batched(
            || (),
            |()| insert_and_find::<K, previous::FastBuild>(keys, misses),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("foldhash::fast", |b| {
        b.iter_batched(
            || (),
            |()| insert_and_find::<K, foldhash::fast::FixedState>(keys, misses),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("rustc-hash (FxHash, used)", |b| {
        b.iter_batched(
            || (),
            |()| insert_and_find::<K, rustc_hash::FxBuildHasher>(keys, misses),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("std SipHash", |b| {
        b.iter_batched(
            || (),
            |()| insert_and_find::<K, std::collections::hash_map::RandomState>(keys, misses),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    case(c, "job_key", &job_keys(N, "a"), &job_keys(N, "b"));
    case(c, "fingerprint_u128", &fingerprints(N, 1), &fingerprints(N, 2));
}

criterion_group!(benches, bench);
criterion_main!(benches);
