//! Changelog records: the meter's state changes as Kafka records. The key
//! is the state record's table tag (one byte) followed by its key in the
//! table; the value is the record's value, or a tombstone for a delete.
//! The changelog is compacted, so it keeps the latest value of every key.

use jobmeter_core::state::Table;

/// The changelog key of `key` in `table`.
pub fn key(table: Table, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    key_into(&mut k, table, key);
    k
}

/// [`key`] written into `out`, replacing what it held (one buffer for a
/// whole batch of records: the producer copies each key).
pub fn key_into(out: &mut Vec<u8>, table: Table, key: &[u8]) {
    out.clear();
    out.push(table.tag());
    out.extend_from_slice(key);
}

/// The table and state key of a changelog key (`None` if malformed).
pub fn split(key: &[u8]) -> Option<(Table, &[u8])> {
    let (tag, rest) = key.split_first()?;
    // Local indexes never travel through the changelog.
    Table::from_tag(*tag).filter(|t| !t.is_local()).map(|t| (t, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_back() {
        for t in Table::ALL.into_iter().filter(|t| !t.is_local()) {
            let k = key(t, b"abc");
            assert_eq!(split(&k), Some((t, &b"abc"[..])));
        }
        assert_eq!(split(b""), None);
        assert_eq!(
            split(&key(Table::EventIds, b"abc")),
            None,
            "a local index is not a changelog table"
        );
        assert_eq!(split(&[0xee, 1, 2]), None);
    }
}
