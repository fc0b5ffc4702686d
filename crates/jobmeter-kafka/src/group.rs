//! Who owns what: the partition an account's events land in, and which
//! member of the meter's consumer group holds each partition.
//!
//! The usage API answers for accounts whose partition this instance owns;
//! for the others it names the owner. Each meter instance joins the group
//! with the client id `<instance_id>|<advertised URL>` ([`member_client_id`]),
//! so a group description (the broker's `DescribeGroups`) says both who
//! holds a partition and where its HTTP API is.

use crate::client::KafkaSettings;
use crate::KafkaAdapterError;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::time::Duration;

/// The partition Kafka's default partitioner (murmur2 of the key, as in the
/// Java client and librdkafka's `murmur2_random`) puts `key` in.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    if partitions <= 0 {
        return 0;
    }
    let h = murmur2(key) & 0x7fff_ffff;
    (h % partitions as u32) as i32
}

/// Kafka's murmur2 (seed 0x9747b28c).
fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        for (i, b) in rest.iter().enumerate().rev() {
            h ^= u32::from(*b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The client id a meter instance joins its group with.
pub fn member_client_id(instance_id: &str, advertised_url: &str) -> String {
    format!("{instance_id}|{advertised_url}")
}

/// A member of the meter's consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its instance id.
    pub instance_id: String,
    /// Its advertised HTTP URL (empty if it did not advertise one).
    pub url: String,
    /// The host the broker sees it connect from.
    pub host: String,
    /// The partitions of the watched topic assigned to it.
    pub partitions: Vec<i32>,
}

/// The members of `group` and their partitions of `topic`.
pub fn members(
    settings: &KafkaSettings,
    group: &str,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<Member>, KafkaAdapterError> {
    let client: BaseConsumer = settings.admin().create().map_err(|source| KafkaAdapterError::Client {
        what: "group describer",
        source,
    })?;
    let list = client
        .fetch_group_list(Some(group), timeout)
        .map_err(KafkaAdapterError::op("describe group"))?;
    let mut out = Vec::new();
    for g in list.groups() {
        for m in g.members() {
            let (instance_id, url) = match m.client_id().split_once('|') {
                Some((i, u)) => (i.to_owned(), u.to_owned()),
                None => (m.client_id().to_owned(), String::new()),
            };
            let partitions = m.assignment().map(|a| assigned(a, topic)).unwrap_or_default();
            out.push(Member {
                instance_id,
                url,
                host: m.client_host().trim_start_matches('/').to_owned(),
                partitions,
            });
        }
    }
    Ok(out)
}

/// The partitions of `topic` in a consumer-protocol assignment
/// (`version:i16, [topic:str16, [partition:i32]], user_data`).
fn assigned(bytes: &[u8], topic: &str) -> Vec<i32> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (h, t) = (b.get(..n)?, b.get(n..)?);
        *b = t;
        Some(h)
    }
    fn i32_of(b: &mut &[u8]) -> Option<i32> {
        take(b, 4).map(|x| i32::from_be_bytes([x[0], x[1], x[2], x[3]]))
    }
    let parse = || -> Option<Vec<i32>> {
        let mut b = bytes;
        take(&mut b, 2)?;
        let topics = i32_of(&mut b)?;
        let mut out = Vec::new();
        for _ in 0..topics.max(0) {
            let len = take(&mut b, 2).map(|x| i16::from_be_bytes([x[0], x[1]]))?;
            let name = take(&mut b, len.max(0) as usize)?;
            let n = i32_of(&mut b)?;
            for _ in 0..n.max(0) {
                let p = i32_of(&mut b)?;
                if name == topic.as_bytes() {
                    out.push(p);
                }
            }
        }
        Some(out)
    };
    let mut v = parse().unwrap_or_default();
    v.sort_unstable();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // Values from Kafka's own partitioner tests (Utils.murmur2).
        assert_eq!(murmur2(b"21") as i32, -973932308);
        assert_eq!(murmur2(b"foobar") as i32, -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string") as i32, -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string") as i32, -1486304829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") as i32,
            -58897971
        );
        assert_eq!(murmur2(b"abc") as i32, 479470107);
    }

    #[test]
    fn decodes_an_assignment() {
        let mut b = vec![0, 0, 0, 0, 0, 2];
        for (t, ps) in [("other", vec![9i32]), ("events", vec![3, 1])] {
            b.extend_from_slice(&(t.len() as i16).to_be_bytes());
            b.extend_from_slice(t.as_bytes());
            b.extend_from_slice(&(ps.len() as i32).to_be_bytes());
            for p in ps {
                b.extend_from_slice(&p.to_be_bytes());
            }
        }
        b.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(assigned(&b, "events"), vec![1, 3]);
        assert_eq!(
            assigned(&b[..7], "events"),
            Vec::<i32>::new(),
            "truncated input gives nothing"
        );
    }
}
