//! Consumer lag per input partition (`jobmeter_consumer_lag`).

use crate::metrics::Metrics;
use jobmeter_kafka::client::KafkaSettings;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often the lag is measured.
const EVERY: Duration = Duration::from_secs(5);

/// Every [`EVERY`] until `stop`: consumer lag per input partition, as the
/// high watermark minus the group's committed offset (what has been
/// metered exactly once). Runs on its own thread so broker round trips
/// never delay the pipeline. A monitor that cannot start says so and
/// ends; the meter goes on without the metric.
pub(crate) fn monitor(settings: &KafkaSettings, topic: &str, group: &str, stop: &CancellationToken, metrics: &Metrics) {
    let consumer: BaseConsumer<jobmeter_kafka::reader::ReaderContext> = match settings
        .group_consumer(group, "jobmeter-lag-monitor")
        .create_with_context(jobmeter_kafka::reader::ReaderContext)
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "lag monitor disabled");
            return;
        }
    };
    let mut next = Instant::now();
    while !stop.is_cancelled() {
        if Instant::now() < next {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        next = Instant::now() + EVERY;
        measure(&consumer, topic, metrics);
    }
}

fn measure(consumer: &BaseConsumer<jobmeter_kafka::reader::ReaderContext>, topic: &str, metrics: &Metrics) {
    let timeout = Duration::from_secs(5);
    let parts = match consumer.fetch_metadata(Some(topic), timeout) {
        Ok(md) => md.topics().first().map_or(0, |t| t.partitions().len() as i32),
        Err(_) => return,
    };
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..parts {
        tpl.add_partition(topic, p);
    }
    let Ok(committed) = consumer.committed_offsets(tpl, timeout) else {
        return;
    };
    for e in committed.elements() {
        let Ok((low, high)) = consumer.fetch_watermarks(topic, e.partition(), timeout) else {
            continue;
        };
        let done = e.offset().to_raw().filter(|o| *o >= 0).unwrap_or(low);
        metrics
            .input
            .lag
            .with_label_values(&[&e.partition().to_string()])
            .set((high - done).max(0));
    }
}
