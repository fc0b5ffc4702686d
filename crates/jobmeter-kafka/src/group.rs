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

pub use crate::partitioner::partition_for_key;

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
