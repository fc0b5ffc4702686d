//! Commands from the meter to the jobs this process runs (`job.stop`).
//!
//! One consumer per emitter (so per process), with no consumer group: it
//! reads every partition of the commands topic, read_committed, from a
//! minute before the emitter was created (a command can only be for a job
//! this emitter starts afterwards), and keeps the commands whose (account,
//! job) is a job running here. Each fires that job's [`Cancellation`] once.

use jobmeter_kafka::client::KafkaSettings;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A `job.stop` the meter sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopCommand {
    /// `<account>/<job>/stop`.
    pub command_id: String,
    /// Why: `free_credits_exhausted`, `spend_limit_reached`…
    pub reason: String,
    /// The limit that was used up.
    pub limit: String,
}

#[derive(Debug, Default)]
struct CancelState {
    command: Mutex<Option<StopCommand>>,
    changed: Condvar,
}

/// A job's cancellation: fired once, when the meter sends the job a
/// `job.stop`. Cheap to clone and to poll; hand a clone to the code that
/// runs the job.
#[derive(Debug, Clone, Default)]
pub struct Cancellation {
    state: Arc<CancelState>,
}

impl Cancellation {
    /// True once the job has been told to stop.
    pub fn is_cancelled(&self) -> bool {
        self.command().is_some()
    }

    /// The command, once it has arrived.
    pub fn command(&self) -> Option<StopCommand> {
        lock(&self.state.command).clone()
    }

    /// Waits up to `timeout` for the job to be told to stop; true if it was.
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut c = lock(&self.state.command);
        while c.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            c = match self.state.changed.wait_timeout(c, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }

    /// Fires the cancellation (the first command wins).
    pub(crate) fn fire(&self, cmd: StopCommand) {
        let mut c = lock(&self.state.command);
        if c.is_none() {
            *c = Some(cmd);
            self.state.changed.notify_all();
        }
    }
}

/// Locks `m`; a panic elsewhere while it was held leaves nothing half
/// written here (every update is one assignment), so its data is used.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Jobs running here, by (account, job).
type Running = Mutex<HashMap<(String, String), Cancellation>>;

/// The commands consumer of one emitter.
#[derive(Debug)]
pub(crate) struct Listener {
    running: Arc<Running>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listener {
    /// Starts reading `topic`.
    pub(crate) fn start(
        settings: &KafkaSettings,
        topic: &str,
        client_id: &str,
    ) -> Result<Listener, rdkafka::error::KafkaError> {
        let mut config = settings.reader(client_id);
        config
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "100");
        let consumer: BaseConsumer = config.create()?;
        let running: Arc<Running> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let since_ms = jobmeter_core::Timestamp::now().0 - 60_000;
        let thread = {
            let (running, stop, topic) = (running.clone(), stop.clone(), topic.to_owned());
            std::thread::Builder::new()
                .name("jobmeter-commands".into())
                .spawn(move || listen(&consumer, &topic, since_ms, &running, &stop))
                .ok()
        };
        Ok(Listener { running, stop, thread })
    }

    /// Registers a job before its start is sent, so no command can be missed.
    pub(crate) fn watch(&self, account: &str, job: &str) -> Cancellation {
        let c = Cancellation::default();
        lock(&self.running).insert((account.to_owned(), job.to_owned()), c.clone());
        c
    }

    /// Forgets a job that has stopped.
    pub(crate) fn forget(&self, account: &str, job: &str) {
        lock(&self.running).remove(&(account.to_owned(), job.to_owned()));
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Assigns every partition of `topic` from the first offset at or after
/// `since_ms`; false while the topic is not there yet.
fn assign(consumer: &BaseConsumer, topic: &str, since_ms: i64) -> bool {
    let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) else {
        return false;
    };
    let Some(t) = md
        .topics()
        .first()
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
    else {
        return false;
    };
    let mut by_time = TopicPartitionList::new();
    for p in t.partitions() {
        if by_time
            .add_partition_offset(topic, p.id(), Offset::Offset(since_ms))
            .is_err()
        {
            return false;
        }
    }
    // A partition with nothing that recent answers "end": read from there.
    let Ok(found) = consumer.offsets_for_times(by_time, Duration::from_secs(10)) else {
        return false;
    };
    consumer.assign(&found).is_ok()
}

/// The commands loop: until `stop`, keep the commands for jobs running here.
fn listen(consumer: &BaseConsumer, topic: &str, since_ms: i64, running: &Running, stop: &AtomicBool) {
    let mut assigned = false;
    while !stop.load(Ordering::SeqCst) {
        if !assigned {
            assigned = assign(consumer, topic, since_ms);
            if !assigned {
                std::thread::sleep(Duration::from_millis(500));
            }
            continue;
        }
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let Some(cmd) = m
            .payload()
            .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
        else {
            continue;
        };
        if cmd["type"] != "job.stop" {
            continue;
        }
        let key = (
            cmd["account_id"].as_str().unwrap_or_default().to_owned(),
            cmd["job_id"].as_str().unwrap_or_default().to_owned(),
        );
        let target = lock(running).get(&key).cloned();
        if let Some(c) = target {
            let text = |f: &str| cmd[f].as_str().unwrap_or_default().to_owned();
            c.fire(StopCommand {
                command_id: text("command_id"),
                reason: text("reason"),
                limit: text("limit"),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancellation_fires_once_and_wakes_waiters() {
        let c = Cancellation::default();
        assert!(!c.is_cancelled());
        assert!(!c.wait(Duration::from_millis(10)));
        let waiter = {
            let c = c.clone();
            std::thread::spawn(move || c.wait(Duration::from_secs(10)))
        };
        let cmd = |reason: &str| StopCommand {
            command_id: "a/j/stop".into(),
            reason: reason.into(),
            limit: "free_credits".into(),
        };
        c.fire(cmd("free_credits_exhausted"));
        c.fire(cmd("spend_limit_reached"));
        assert!(waiter.join().unwrap_or(false));
        assert_eq!(c.command().map(|x| x.reason), Some("free_credits_exhausted".into()));
    }
}
