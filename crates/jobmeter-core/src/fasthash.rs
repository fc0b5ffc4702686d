//! The hasher of the meter's in-memory maps: rustc-hash's FxHash.
//!
//! The keys (account, job and event ids) come from the platform's own GPU
//! workers, not from the open internet, so the HashDoS resistance of the
//! standard SipHash is not worth its cost on the hot path. Among the
//! alternatives, FxHash was the fastest on the meter's own key shapes
//! (`benches/hashers.rs`: job keys and 128-bit event fingerprints, against
//! foldhash, SipHash and the hand-written hasher jobmeter used before).
//! Iteration order of these maps never reaches an output.

/// Builds the maps' hashers.
pub type FastBuild = rustc_hash::FxBuildHasher;
/// A `HashMap` with the fast hasher.
pub type FastMap<K, V> = std::collections::HashMap<K, V, FastBuild>;
/// A `HashSet` with the fast hasher.
pub type FastSet<K> = std::collections::HashSet<K, FastBuild>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, Hash};

    fn h<T: Hash>(t: &T) -> u64 {
        FastBuild::default().hash_one(t)
    }

    #[test]
    fn distinguishes_near_keys() {
        assert_ne!(h(&("a", "bc")), h(&("ab", "c")));
        assert_ne!(h(&"job-00000001"), h(&"job-00000002"));
        assert_eq!(h(&"x"), h(&"x"));
    }
}
