//! The local broker is real: produce to and consume from a fresh topic
//! through rdkafka.

mod support;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use std::time::Duration;
use support::*;

#[tokio::test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
async fn produces_and_consumes_through_the_real_broker() {
    let settings = jobmeter_kafka::client::KafkaSettings::new(brokers());
    let topic = fresh_prefix("roundtrip");
    let admin: AdminClient<DefaultClientContext> = settings.admin().create().expect("admin client");
    let res = admin
        .create_topics(
            &[NewTopic::new(&topic, 2, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic");
    assert!(res.iter().all(Result::is_ok), "{res:?}");
    let p = producer();
    for i in 0..100 {
        send(&p, &topic, &format!("k{i}"), Some(format!("v{i}").as_bytes()), None);
    }
    rdkafka::producer::Producer::flush(&p, Duration::from_secs(30)).expect("flush");
    let mut values = read_all(&topic);
    values.sort();
    let mut want: Vec<String> = (0..100).map(|i| format!("v{i}")).collect();
    want.sort();
    assert_eq!(values, want);
}
