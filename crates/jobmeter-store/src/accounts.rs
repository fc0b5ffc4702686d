//! The account records of the partitions an instance owns, as read from
//! the co-partitioned accounts topic, with how far each partition was
//! read. Derived data: a lost or stale table is read again from the topic.
//!
//! ```text
//! cf accounts : partition:u32 BE | 0x00 | len:u16 BE | account | effective_from:i64 BE (sign flipped) -> record JSON
//! cf accounts : partition:u32 BE | 0x01                                                  -> next offset:i64 BE
//! ```
//!
//! A record with the same account and `effective_from` as a stored one
//! replaces it, as the accounts table's semantics say.

use crate::{prefixed, Store, StoreError};
use rocksdb::{Direction, IteratorMode, WriteBatch};

/// Column family of the account records.
pub const ACCOUNTS_CF: &str = "accounts";

/// One account record to store: account id, `effective_from` (Unix ms),
/// the record as read.
pub type AccountRow<'a> = (&'a str, i64, &'a [u8]);

/// The longest account id the key layout holds (the core accepts shorter).
pub const MAX_ACCOUNT_KEY: usize = u16::MAX as usize;

fn account_prefix(partition: i32, account: &str) -> Result<Vec<u8>, StoreError> {
    let len = u16::try_from(account.len()).map_err(|_| StoreError::AccountIdTooLong { len: account.len() })?;
    let mut k = Vec::with_capacity(3 + account.len() + 8);
    k.push(0x00);
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(account.as_bytes());
    Ok(prefixed(partition, &k))
}

fn offset_key(partition: i32) -> Vec<u8> {
    prefixed(partition, &[0x01])
}

impl Store {
    /// Forgets `partition`'s account records and how far its accounts
    /// topic was read, so that its next restore reads them again from the
    /// topic (what `jobmeter rebuild` does: a record stored here that
    /// cannot be decoded is replaced by the topic's).
    pub fn drop_account_records(&self, partition: i32) -> Result<(), StoreError> {
        let (from, to) = crate::partition_range(partition);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf(ACCOUNTS_CF)?, &from, &to);
        self.db
            .write_opt(batch, &crate::write_options())
            .map_err(self.rocks("drop account records"))
    }

    /// Stores `rows` of `partition` and, in the same synced write, that the
    /// partition's accounts topic was read up to `next_offset` (when given:
    /// records read elsewhere leave it as it is).
    pub fn put_account_records(
        &self,
        partition: i32,
        rows: &[AccountRow<'_>],
        next_offset: Option<i64>,
    ) -> Result<(), StoreError> {
        let cf = self.cf(ACCOUNTS_CF)?;
        let mut batch = WriteBatch::default();
        for (account, from, value) in rows {
            let mut k = account_prefix(partition, account)?;
            k.extend_from_slice(&((*from as u64) ^ (1 << 63)).to_be_bytes());
            batch.put_cf(cf, k, value);
        }
        if let Some(next) = next_offset {
            batch.put_cf(cf, offset_key(partition), next.to_be_bytes());
        }
        self.db
            .write_opt(batch, &crate::write_options())
            .map_err(self.rocks("write account records"))
    }

    /// The stored records of `account` in `partition`, ordered by
    /// `effective_from`.
    pub fn account_records(&self, partition: i32, account: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        let cf = self.cf(ACCOUNTS_CF)?;
        let from = account_prefix(partition, account)?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::From(&from, Direction::Forward)) {
            let (k, v) = item.map_err(self.rocks("read account records"))?;
            if !k.starts_with(&from) {
                break;
            }
            out.push(v.to_vec());
        }
        Ok(out)
    }

    /// Where reading `partition`'s accounts topic goes on (`None`: never read).
    pub fn accounts_offset(&self, partition: i32) -> Result<Option<i64>, StoreError> {
        let cf = self.cf(ACCOUNTS_CF)?;
        match self.db.get_cf(cf, offset_key(partition)).map_err(self.rocks("read"))? {
            None => Ok(None),
            Some(b) => <[u8; 8]>::try_from(b.as_slice())
                .map(|b| Some(i64::from_be_bytes(b)))
                .map_err(|_| StoreError::Corrupt {
                    path: self.path().to_owned(),
                    what: "accounts offset",
                    partition,
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_kept_per_partition_ordered_and_replaced_by_instant() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(|_| StoreError::Unavailable { reason: "tempdir" })?;
        let store = Store::open(dir.path())?;
        assert_eq!(store.accounts_offset(2)?, None);
        let long = "é".repeat(300);
        store.put_account_records(
            2,
            &[
                ("a", 5, b"a5"),
                ("a", -7, b"a-7"),
                ("a", i64::MAX, b"amax"),
                ("a", i64::MIN, b"amin"),
                ("ab", 1, b"ab1"),
                (&long, 0, b"long"),
            ],
            Some(10),
        )?;
        store.put_account_records(3, &[("a", 5, b"other partition")], Some(4))?;
        store.put_account_records(2, &[("a", 5, b"a5 replaced")], Some(11))?;
        store.put_account_records(2, &[("c", 5, b"c")], None)?;
        let got = store.account_records(2, "a")?;
        let want: Vec<&[u8]> = vec![b"amin", b"a-7", b"a5 replaced", b"amax"];
        assert_eq!(got, want);
        assert_eq!(store.account_records(2, "ab")?, vec![b"ab1".to_vec()]);
        assert_eq!(store.account_records(2, &long)?, vec![b"long".to_vec()]);
        assert!(store.account_records(2, "b")?.is_empty());
        assert_eq!(store.account_records(3, "a")?, vec![b"other partition".to_vec()]);
        assert_eq!(store.accounts_offset(2)?, Some(11));
        assert_eq!(store.accounts_offset(3)?, Some(4));
        // The partition's state can be dropped (a full restore) without
        // losing what was read from the accounts topic.
        store.drop_partition(2)?;
        assert_eq!(store.accounts_offset(2)?, Some(11));
        assert_eq!(store.account_records(2, "c")?, vec![b"c".to_vec()]);
        // A rebuild forgets them, and only them, so they are read again.
        store.drop_account_records(2)?;
        assert_eq!(store.accounts_offset(2)?, None);
        assert!(store.account_records(2, "c")?.is_empty());
        assert_eq!(store.account_records(3, "a")?, vec![b"other partition".to_vec()]);
        assert_eq!(store.accounts_offset(3)?, Some(4));
        assert!(store
            .put_account_records(2, &[(&"x".repeat(70_000), 0, b"")], Some(12))
            .is_err());
        Ok(())
    }
}
