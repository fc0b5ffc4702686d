//! Dead-letter records: the original key and bytes, untouched, with the
//! reason and origin in headers.

use rdkafka::message::{Header, OwnedHeaders};

/// Header: machine-readable reason (`not_json`, `conflict`…).
pub const REASON: &str = "jobmeter.reason";
/// Header: human-readable detail.
pub const DETAIL: &str = "jobmeter.detail";
/// Header: source topic.
pub const SOURCE_TOPIC: &str = "jobmeter.source.topic";
/// Header: source partition (decimal).
pub const SOURCE_PARTITION: &str = "jobmeter.source.partition";
/// Header: source offset (decimal).
pub const SOURCE_OFFSET: &str = "jobmeter.source.offset";

/// The headers of a dead letter.
pub fn headers(reason: &str, detail: &str, topic: &str, partition: i32, offset: i64) -> OwnedHeaders {
    let h = OwnedHeaders::new_with_capacity(5)
        .insert(Header {
            key: REASON,
            value: Some(reason),
        })
        .insert(Header {
            key: DETAIL,
            value: Some(detail),
        });
    insert_source(h, topic, partition, offset)
}

/// Adds the source headers (topic, partition, offset) to `h`.
pub fn insert_source(h: OwnedHeaders, topic: &str, partition: i32, offset: i64) -> OwnedHeaders {
    let (p, o) = (partition.to_string(), offset.to_string());
    h.insert(Header {
        key: SOURCE_TOPIC,
        value: Some(topic),
    })
    .insert(Header {
        key: SOURCE_PARTITION,
        value: Some(&p),
    })
    .insert(Header {
        key: SOURCE_OFFSET,
        value: Some(&o),
    })
}
