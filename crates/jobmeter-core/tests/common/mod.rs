//! Shared helpers for the core's tests: a small world with a rate card,
//! plans, accounts and one meter, and builders for lifecycle events.
#![allow(dead_code, unreachable_pub)]

use jobmeter_core::*;

pub const CARD: &str = r#"
[policy]
rounding = "ceil_seconds"

[[versions]]
version = "v1"
effective_from = "2024-01-01T00:00:00Z"
fine_tune_per_second = "0.001"
models."img" = { per_second = "0.0005" }
models."llm" = { per_second = "0.002" }

[[versions]]
version = "v2"
effective_from = "2024-06-01T00:00:00Z"
fine_tune_per_second = "0.001"
models."img" = { per_second = "0.0004" }
models."llm" = { per_second = "0.002" }
"#;

#[derive(Debug)]
pub struct World {
    /// The input partition (of how many) the meter runs for; `None`: all.
    pub partition: Option<(i32, i32)>,
    pub rates: RateCard,
    pub plans: PlanCatalog,
    pub book: AccountBook,
    pub config: MeterConfig,
    pub meter: Meter,
    pub out: Vec<Output>,
    seq: u64,
}

pub fn ts(s: &str) -> Timestamp {
    Timestamp::parse(s).expect("test timestamp")
}

impl World {
    pub fn new() -> World {
        World::with_card(CARD)
    }

    /// A world whose meter applies rules 1–13 of the contract: spend
    /// control (rule 14: runway events, `job.stop` on used-up credits) is
    /// off; [`World::spend_control`] turns the defaults back on.
    pub fn with_card(card: &str) -> World {
        let plans = PlanCatalog {
            free_on_credits_exhausted: Policy::Notify,
            ..PlanCatalog::default()
        };
        World {
            partition: None,
            rates: RateCard::from_toml(card).expect("test rate card"),
            book: AccountBook::new(&plans),
            plans,
            config: MeterConfig {
                runway_horizons_ms: Vec::new(),
                ..MeterConfig::default()
            },
            meter: Meter::tracking_changes(),
            out: Vec::new(),
            seq: 0,
        }
    }

    /// The same world with spend control as shipped: runway events at the
    /// default horizon, free accounts stopped when their credits are used up.
    pub fn spend_control(mut self) -> World {
        self.plans.free_on_credits_exhausted = PlanCatalog::default().free_on_credits_exhausted;
        self.config.runway_horizons_ms = MeterConfig::default().runway_horizons_ms;
        self
    }

    pub fn commands(&self) -> Vec<&Command> {
        self.out
            .iter()
            .filter_map(|o| match o {
                Output::Command(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    pub fn account(&mut self, json: &str) {
        let r = AccountRecord::parse(json.as_bytes()).expect("test account record");
        self.book.insert(r);
    }

    pub fn apply(&mut self, raw: &str) {
        let ctx = Context::new(&self.rates, &self.plans, &self.book, &self.config);
        let ctx = match self.partition {
            Some((p, n)) => ctx.with_partition(p, n, place),
            None => ctx,
        };
        self.meter
            .apply(&ctx, raw.as_bytes(), None, &mut self.out)
            .expect("apply");
    }

    /// Starts a job at `time` (built and applied).
    pub fn begin(&mut self, acct: &str, job: &str, time: &str, kind: &str, model: Option<&str>) {
        let e = self.start(acct, job, time, kind, model);
        self.apply(&e);
    }

    /// A heartbeat of a job at `time` (built and applied).
    pub fn beat(&mut self, acct: &str, job: &str, time: &str) {
        let e = self.heartbeat(acct, job, time);
        self.apply(&e);
    }

    /// Stops a job at `time` with `status` (built and applied).
    pub fn end(&mut self, acct: &str, job: &str, time: &str, status: &str) {
        let e = self.stop(acct, job, time, status);
        self.apply(&e);
    }

    /// A job of `acct` from `span.0` to `span.1`, started and stopped
    /// (succeeded).
    pub fn job(&mut self, acct: &str, job: &str, span: (&str, &str), kind: &str, model: Option<&str>) {
        self.begin(acct, job, span.0, kind, model);
        self.end(acct, job, span.1, "succeeded");
    }

    /// The state records written since the last call (deletions left
    /// out), as a store would hold them.
    pub fn stored(&mut self) -> Vec<(state::Table, Vec<u8>, Vec<u8>)> {
        self.meter
            .take_changes()
            .expect("changes")
            .into_iter()
            .filter_map(|c| c.value.map(|v| (c.table, c.key, v)))
            .collect()
    }

    /// Applies one record of the adjustments topic.
    pub fn adjustment(&mut self, json: &str) {
        let ctx = Context::new(&self.rates, &self.plans, &self.book, &self.config);
        self.meter
            .apply_adjustment(&ctx, json.as_bytes(), None, &mut self.out)
            .expect("apply adjustment");
    }

    pub fn flush(&mut self) {
        let ctx = Context::new(&self.rates, &self.plans, &self.book, &self.config);
        let ctx = match self.partition {
            Some((p, n)) => ctx.with_partition(p, n, place),
            None => ctx,
        };
        self.meter.flush(&ctx, &mut self.out).expect("flush");
    }

    fn next_id(&mut self) -> String {
        self.seq += 1;
        format!("e{}", self.seq)
    }

    pub fn start(&mut self, acct: &str, job: &str, time: &str, kind: &str, model: Option<&str>) -> String {
        let id = self.next_id();
        let mut data = format!(r#""account_id":"{acct}","kind":"{kind}""#);
        if let Some(m) = model {
            data.push_str(&format!(r#","model":"{m}""#));
        }
        if kind == "workflow_step" {
            data.push_str(r#","workflow_run_id":"run-1""#);
        }
        event(&id, "job.started", job, time, &data)
    }

    pub fn heartbeat(&mut self, acct: &str, job: &str, time: &str) -> String {
        let id = self.next_id();
        event(&id, "job.heartbeat", job, time, &format!(r#""account_id":"{acct}""#))
    }

    pub fn stop(&mut self, acct: &str, job: &str, time: &str, status: &str) -> String {
        let id = self.next_id();
        event(
            &id,
            "job.stopped",
            job,
            time,
            &format!(r#""account_id":"{acct}","status":"{status}""#),
        )
    }

    pub fn charges(&self) -> Vec<&Charge> {
        self.out
            .iter()
            .filter_map(|o| match o {
                Output::Charge(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    pub fn limits(&self) -> Vec<&LimitEvent> {
        self.out
            .iter()
            .filter_map(|o| match o {
                Output::Limit(l) => Some(l),
                _ => None,
            })
            .collect()
    }

    pub fn statements(&self) -> Vec<&Statement> {
        self.out
            .iter()
            .filter_map(|o| match o {
                Output::Statement(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    /// The statement of `period` (its label), closed: panics when there is
    /// none.
    pub fn closed(&self, period: &str) -> Statement {
        self.statements()
            .into_iter()
            .find(|s| s.period.to_string() == period)
            .cloned()
            .unwrap_or_else(|| panic!("no statement for {period}"))
    }

    /// The charge `id`: panics when there is none.
    pub fn charge(&self, id: &str) -> &Charge {
        self.charges()
            .into_iter()
            .find(|c| c.charge_id == id)
            .unwrap_or_else(|| panic!("no charge {id}"))
    }

    pub fn rejects(&self) -> Vec<RejectReason> {
        self.out
            .iter()
            .filter_map(|o| match o {
                Output::Reject(r) => Some(r.reason),
                _ => None,
            })
            .collect()
    }
}

pub fn event(id: &str, ty: &str, job: &str, time: &str, data: &str) -> String {
    format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"gpu-worker/test","type":"{ty}","time":"{time}","subject":"{job}","data":{{{data}}}}}"#
    )
}

pub fn money(s: &str) -> Money {
    Money::parse(s).expect("test amount")
}

/// Where the tests' meters place an account (any stable function does; the
/// streaming meter uses Kafka's murmur2).
pub fn place(key: &[u8], partitions: i32) -> i32 {
    let h = key
        .iter()
        .fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193));
    (h % partitions.max(1) as u32) as i32
}
