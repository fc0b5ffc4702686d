//! The local broker is real: produce to and consume from a fresh topic
//! through rdkafka.

use crate::support;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use std::time::Duration;
use support::*;

/// A new topic of `partitions` partitions, named after `name` (deleted
/// with the returned prefix when the test passes).
async fn fresh_topic(settings: &jobmeter_kafka::client::KafkaSettings, name: &str, partitions: i32) -> Prefix {
    let topic = fresh_prefix(name);
    let admin: AdminClient<DefaultClientContext> = settings.admin().create().expect("admin client");
    let res = admin
        .create_topics(
            &[NewTopic::new(&topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic");
    assert!(res.iter().all(Result::is_ok), "{res:?}");
    topic
}

#[tokio::test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
async fn produces_and_consumes_through_the_real_broker() {
    let settings = jobmeter_kafka::client::KafkaSettings::new(brokers());
    let topic = fresh_topic(&settings, "roundtrip", 2).await;
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

/// librdkafka's `resume` skips a partition whose `pause` it has not applied
/// yet, and the pause then holds: the meter's poll loop therefore resumes
/// the partitions it meters again every second, paused or not. That
/// repeated resume must neither skip nor repeat records of a partition that
/// is flowing, and must start one that a racing pause left paused (a pause
/// followed at once by a resume, as a rebalance callback and the next
/// poll-loop round do; how often the race happens depends on timing, so
/// the test counts it rather than requiring it).
#[tokio::test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
async fn resuming_again_neither_skips_nor_repeats_and_starts_a_partition_left_paused() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    let settings = jobmeter_kafka::client::KafkaSettings::new(brokers());
    let topic = fresh_topic(&settings, "resume", 1).await;
    let p = producer();
    for i in 0..50 {
        send(&p, &topic, "k", Some(format!("v{i}").as_bytes()), None);
    }
    rdkafka::producer::Producer::flush(&p, Duration::from_secs(30)).expect("flush");
    let want: Vec<(i64, String)> = (0..50).map(|i| (i, format!("v{i}"))).collect();
    let mut left_paused = 0;
    for round in 0..5 {
        let consumer: BaseConsumer = settings
            .reader(&format!("resume-race-{round}"))
            .set("enable.partition.eof", "false")
            .create()
            .expect("consumer");
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, rdkafka::Offset::Beginning)
            .expect("tpl");
        consumer.assign(&tpl).expect("assign");
        consumer.pause(&tpl).expect("pause");
        consumer.resume(&tpl).expect("resume");
        let mut got: Vec<(i64, String)> = Vec::new();
        let read = |got: &mut Vec<(i64, String)>, upto: usize, within: Duration| {
            let t = std::time::Instant::now();
            while got.len() < upto && t.elapsed() < within {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
                    let v = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
                    got.push((m.offset(), v));
                }
            }
        };
        read(&mut got, 20, Duration::from_secs(2));
        left_paused += usize::from(got.is_empty());
        // What the poll loop does every second, mid-stream or not.
        consumer.resume(&tpl).expect("resume again");
        read(&mut got, 50, Duration::from_secs(20));
        // Nothing more arrives.
        read(&mut got, 51, Duration::from_millis(500));
        assert_eq!(got, want, "round {round}: every record once, in order");
    }
    eprintln!("the pause outlived the first resume in {left_paused} of 5 rounds");
}

/// One reader client serves reads of several partitions one after another
/// (how a restore worker reads its partitions' changelogs): each read gets
/// exactly its partition's records from its start offset, nothing left over
/// from the read before.
#[tokio::test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
async fn one_reader_reads_partitions_one_after_another() {
    let settings = jobmeter_kafka::client::KafkaSettings::new(brokers());
    let topic = fresh_topic(&settings, "reader", 3).await;
    let p = producer();
    for part in 0..3 {
        for i in 0..(10 + part * 5) {
            send(&p, &topic, "k", Some(format!("p{part}-{i}").as_bytes()), Some(part));
        }
    }
    rdkafka::producer::Producer::flush(&p, Duration::from_secs(30)).expect("flush");
    let reader = jobmeter_kafka::reader::Reader::new(&settings, "it-reader").expect("reader");
    let read = |part: i32, from: Option<i64>| {
        let mut got = Vec::new();
        let n = reader
            .read_to_end(&topic, &[(part, from)], Duration::from_secs(30), |r| {
                assert_eq!(r.partition, part);
                got.push((
                    r.offset,
                    String::from_utf8_lossy(&r.value.unwrap_or_default()).into_owned(),
                ));
            })
            .expect("read");
        assert_eq!(n as usize, got.len());
        got
    };
    let want = |part: i32, from: i64| -> Vec<(i64, String)> {
        (from..i64::from(10 + part * 5))
            .map(|i| (i, format!("p{part}-{i}")))
            .collect()
    };
    for (part, from) in [(0, None), (1, None), (2, Some(3)), (0, Some(7)), (1, Some(15))] {
        assert_eq!(
            read(part, from),
            want(part, from.unwrap_or(0)),
            "partition {part} from {from:?}"
        );
    }
}

/// The benchmark's exactly-once pass-through is a measuring instrument:
/// it must read every input record, publish the volume it is given in the
/// transactions it is given, committed (a `read_committed` reader sees all
/// of it), and, with a store of record, write every state change to
/// RocksDB — or its figures measure less work than they claim.
#[tokio::test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
async fn the_benchmark_pass_through_publishes_its_volume_and_stores_every_state_change() {
    use jobmeter_bench::passthrough::{run, Volume};
    use jobmeter_core::state::{StateChange, Table};
    let settings = jobmeter_kafka::client::KafkaSettings::new(brokers());
    let input = fresh_topic(&settings, "pt-in", 2).await;
    let p = producer();
    for i in 0..200 {
        send(
            &p,
            &input,
            &format!("k{i}"),
            Some(format!("e{i}").as_bytes()),
            Some(i % 2),
        );
    }
    rdkafka::producer::Producer::flush(&p, Duration::from_secs(30)).expect("flush");
    let volume = Volume {
        events: 200,
        records: 70,
        bytes: 70 * 12,
        transactions: 4,
        sample: vec![b"a-value".to_vec(), b"another-value".to_vec()],
    };
    let state: Vec<(i32, StateChange)> = (0..30)
        .map(|i| {
            let change = StateChange {
                table: if i % 3 == 0 { Table::Usage } else { Table::Jobs },
                key: format!("key-{i:02}").into_bytes(),
                value: Some(format!("value-{i}").into_bytes()),
            };
            (i % 2, change)
        })
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = jobmeter_store::Store::open(dir.path()).expect("store");
    for (name, with_store) in [("pt-out", false), ("pt-out-stored", true)] {
        let output = fresh_topic(&settings, name, 2).await;
        let ran = run(
            &settings,
            (&input, &output),
            2,
            (&format!("{}-group", &*output), &format!("{}-txn", &*output)),
            volume.clone(),
            with_store.then_some((&store, state.as_slice())),
        )
        .expect("pass-through");
        assert_eq!(ran.records, 70, "{name}: records written");
        // Four of 50 events, unless the consumer waited 100 ms for a fetch
        // in the middle of one (it then commits early and goes on).
        assert!(ran.transactions >= 4, "{name}: {} transactions", ran.transactions);
        let written = read_all(&output);
        assert_eq!(
            written.len(),
            70,
            "{name}: committed records a read_committed reader sees"
        );
        assert!(
            written.iter().all(|v| v == "a-value" || v == "another-value"),
            "{name}: values come from the sample"
        );
        assert_eq!(
            ran.state_rows,
            if with_store { 30 } else { 0 },
            "{name}: state changes stored"
        );
    }
    for (partition, change) in &state {
        let got = store.get(*partition, change.table, &change.key).expect("store read");
        assert_eq!(got, change.value, "{:?} of partition {partition}", change.table);
    }
}
