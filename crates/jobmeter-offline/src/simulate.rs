//! A seeded, deterministic fleet of simulated GPU workers and accounts.
//!
//! The same seed and options always produce the same accounts and the same
//! event stream, so demos, tests and benchmarks are reproducible. The mix is
//! modelled on a serverless GPU platform: mostly short inference calls (image
//! models in seconds, LLM calls in seconds to a minute, video in minutes),
//! some multi-step workflow runs, a few fine-tunes lasting tens of minutes to
//! hours; heartbeats every `heartbeat_interval`; and configurable rates of
//! duplicates, local reordering, lost stops, bad events and clock skew.

use jobmeter_core::wire::{CloudEvent, EventData};
use jobmeter_core::Timestamp;

/// A job to simulate: id, kind, model, workflow run, start, duration.
type SimJob = (String, &'static str, &'static str, Option<String>, i64, i64);

/// A small, fast, seedable PRNG (SplitMix64): stable across versions, no
/// dependency, good enough for workloads.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1).max(1) as u64) as i64
    }

    /// True with probability `permille / 1000`.
    pub fn chance(&mut self, permille: u32) -> bool {
        self.below(1000) < u64::from(permille)
    }
}

/// Options of the simulated fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetOptions {
    /// PRNG seed.
    pub seed: u64,
    /// Number of accounts.
    pub accounts: usize,
    /// Number of jobs (workflow steps count one each).
    pub jobs: usize,
    /// Event time of the first job.
    pub start: Timestamp,
    /// Mean gap between job starts, ms.
    pub mean_gap_ms: i64,
    /// Heartbeat interval, ms.
    pub heartbeat_interval_ms: i64,
    /// Per-mille of events emitted twice.
    pub duplicate_permille: u32,
    /// Per-mille of events swapped with a neighbour.
    pub reorder_permille: u32,
    /// Per-mille of jobs whose stop is lost.
    pub lost_stop_permille: u32,
    /// Per-mille of extra malformed events.
    pub bad_permille: u32,
    /// Largest clock skew of a worker, ms (each worker gets a fixed skew).
    pub max_skew_ms: i64,
    /// Per-mille of workers whose clock is skewed.
    pub skewed_worker_permille: u32,
    /// Per-mille of free accounts that upgrade to pro, and of pro accounts
    /// that move to enterprise, during the run.
    pub plan_change_permille: u32,
    /// Per-mille of jobs that are fine-tunes (10 min to 3 h); of the rest,
    /// 105 in 1000 are workflow steps and the others inference jobs.
    pub fine_tune_permille: u32,
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            seed: 42,
            accounts: 200,
            jobs: 10_000,
            start: Timestamp(1_714_521_600_000), // 2024-05-01T00:00:00Z
            mean_gap_ms: 200,
            heartbeat_interval_ms: 10_000,
            duplicate_permille: 50,
            reorder_permille: 20,
            lost_stop_permille: 5,
            bad_permille: 2,
            max_skew_ms: 300,
            skewed_worker_permille: 100,
            plan_change_permille: 100,
            fine_tune_permille: 15,
        }
    }
}

impl FleetOptions {
    /// A fleet shaped like a real inference platform's: many short jobs
    /// (most of them 1–60 s), 3 % fine-tunes of 10 min to 3 h, 2,000
    /// accounts on all four plans, heartbeats every 30 s, 4.5 % duplicate
    /// deliveries and 1 % malformed events, job starts spread over 12 hours
    /// from six hours before a month's end, so that the run crosses the
    /// month boundary (a period close and statements) and the rate card's
    /// 2024-06 price change.
    pub fn realistic(jobs: usize) -> FleetOptions {
        FleetOptions {
            seed: 7,
            accounts: 2_000,
            jobs,
            start: Timestamp(1_717_178_400_000), // 2024-05-31T18:00:00Z
            // Starts spread over 12 hours, whatever the number of jobs.
            mean_gap_ms: (43_200_000 / jobs.max(1) as i64).max(1),
            heartbeat_interval_ms: 30_000,
            duplicate_permille: 45,
            reorder_permille: 20,
            lost_stop_permille: 5,
            bad_permille: 10,
            max_skew_ms: 300,
            skewed_worker_permille: 100,
            plan_change_permille: 100,
            fine_tune_permille: 30,
        }
    }
}

/// A generated event: its (true) time, its Kafka key and its JSON bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimEvent {
    /// Event time (after skew), used for ordering.
    pub time: Timestamp,
    /// The account (Kafka key).
    pub key: String,
    /// The CloudEvent JSON.
    pub json: String,
}

struct ModelSpec {
    name: &'static str,
    min_ms: i64,
    max_ms: i64,
    weight: u64,
}

const INFERENCE: &[ModelSpec] = &[
    ModelSpec {
        name: "sdxl-1.0",
        min_ms: 2_000,
        max_ms: 12_000,
        weight: 30,
    },
    ModelSpec {
        name: "sdxl-turbo",
        min_ms: 300,
        max_ms: 2_500,
        weight: 15,
    },
    ModelSpec {
        name: "flux-dev",
        min_ms: 4_000,
        max_ms: 25_000,
        weight: 10,
    },
    ModelSpec {
        name: "esrgan-4x",
        min_ms: 500,
        max_ms: 6_000,
        weight: 8,
    },
    ModelSpec {
        name: "faceswap-v2",
        min_ms: 1_000,
        max_ms: 8_000,
        weight: 6,
    },
    ModelSpec {
        name: "whisper-large-v3",
        min_ms: 3_000,
        max_ms: 90_000,
        weight: 6,
    },
    ModelSpec {
        name: "llama-3-8b",
        min_ms: 400,
        max_ms: 20_000,
        weight: 10,
    },
    ModelSpec {
        name: "llama-3-70b",
        min_ms: 1_000,
        max_ms: 60_000,
        weight: 6,
    },
    ModelSpec {
        name: "mixtral-8x7b",
        min_ms: 800,
        max_ms: 40_000,
        weight: 4,
    },
    ModelSpec {
        name: "qwen2-72b",
        min_ms: 1_000,
        max_ms: 60_000,
        weight: 2,
    },
    ModelSpec {
        name: "svd-xt",
        min_ms: 60_000,
        max_ms: 300_000,
        weight: 2,
    },
    ModelSpec {
        name: "musicgen-large",
        min_ms: 10_000,
        max_ms: 120_000,
        weight: 1,
    },
];

fn pick_model(rng: &mut Rng) -> &'static ModelSpec {
    let total: u64 = INFERENCE.iter().map(|m| m.weight).sum();
    let mut x = rng.below(total);
    for m in INFERENCE {
        if x < m.weight {
            return m;
        }
        x -= m.weight;
    }
    &INFERENCE[0]
}

/// Account records (JSON lines) of the simulated fleet: 60 % free, 25 %
/// pro, 5 % enterprise with alerts, 10 % unknown (payg); some free
/// accounts upgrade to pro and some pro accounts move to enterprise in the
/// middle of the run (`plan_change_permille`).
pub fn accounts(opts: &FleetOptions) -> Vec<(String, String)> {
    let mut rng = Rng::new(opts.seed.wrapping_add(1));
    let mut out = Vec::new();
    let from = Timestamp(opts.start.0 - 86_400_000 * 30);
    for i in 0..opts.accounts {
        let id = account_id(i);
        let roll = rng.below(100);
        let rec = |plan: &str, at: Timestamp, extra: &str| {
            format!(r#"{{"account_id":"{id}","plan":"{plan}","effective_from":"{at}"{extra}}}"#)
        };
        if roll < 60 {
            out.push((id.clone(), rec("free", from, "")));
            if rng.chance(opts.plan_change_permille) {
                let at = Timestamp(opts.start.0 + rng.range(0, opts.mean_gap_ms * opts.jobs as i64));
                out.push((id.clone(), rec("pro", at, "")));
            }
        } else if roll < 85 {
            let cap = if rng.chance(300) {
                r#","usage_cap":"20.00","workflow_quota":"2.00""#
            } else {
                ""
            };
            out.push((id.clone(), rec("pro", from, cap)));
            // Outgrowing the pro cap: a move to enterprise mid-run.
            if rng.chance(opts.plan_change_permille / 2) {
                let at = Timestamp(opts.start.0 + rng.range(0, opts.mean_gap_ms * opts.jobs as i64));
                out.push((id.clone(), rec("enterprise", at, r#","alert_thresholds":["50.00"]"#)));
            }
        } else if roll < 90 {
            out.push((
                id.clone(),
                rec("enterprise", from, r#","alert_thresholds":["25.00","100.00"]"#),
            ));
        }
    }
    out
}

/// The account id of simulated account `i`.
pub fn account_id(i: usize) -> String {
    format!("acct-{i:05}")
}

/// Generates the event stream, ordered by (skewed) event time with the
/// configured perturbations applied.
pub fn events(opts: &FleetOptions) -> Vec<SimEvent> {
    let mut rng = Rng::new(opts.seed);
    let workers = 64usize;
    let skew: Vec<i64> = (0..workers)
        .map(|_| {
            if rng.chance(opts.skewed_worker_permille) {
                rng.range(-opts.max_skew_ms, opts.max_skew_ms)
            } else {
                0
            }
        })
        .collect();
    let mut evs: Vec<(Timestamp, u64, SimEvent)> = Vec::with_capacity(opts.jobs * 4);
    let mut seq = 0u64;
    let mut t = opts.start.0;
    let mut job_no = 0usize;
    let mut emit = |evs: &mut Vec<(Timestamp, u64, SimEvent)>,
                    worker: usize,
                    ty: &str,
                    job: &str,
                    time: i64,
                    data: EventData<'_>| {
        seq += 1;
        let time = Timestamp(time + skew[worker]);
        let id = format!("w{worker}-{seq:08}");
        let source = format!("gpu-worker/sim/node-{worker}");
        let key = data.account_id.to_owned();
        let json = CloudEvent::new(&id, &source, ty, time, job, data).to_json();
        evs.push((time, seq, SimEvent { time, key, json }));
    };
    while job_no < opts.jobs {
        t += rng.range(0, 2 * opts.mean_gap_ms);
        // Skewed popularity: low account numbers are busier.
        let a =
            (rng.below(opts.accounts as u64) * rng.below(opts.accounts as u64) / opts.accounts.max(1) as u64) as usize;
        let acct = account_id(a);
        let roll = rng.below(1000);
        let mut jobs: Vec<SimJob> = Vec::new();
        let fine_tune_from = 1000 - u64::from(opts.fine_tune_permille.min(1000));
        if roll < fine_tune_from.saturating_sub(105) {
            let m = pick_model(&mut rng);
            let d = rng.range(m.min_ms, m.max_ms);
            jobs.push((format!("job-{job_no:08}"), "inference", m.name, None, t, d));
        } else if roll < fine_tune_from {
            let steps = rng.range(2, 4);
            let run = format!("run-{job_no:08}");
            let mut st = t;
            for s in 0..steps {
                let m = pick_model(&mut rng);
                let d = rng.range(m.min_ms, m.max_ms.min(30_000));
                jobs.push((
                    format!("job-{job_no:08}-s{s}"),
                    "workflow_step",
                    m.name,
                    Some(run.clone()),
                    st,
                    d,
                ));
                st += d + rng.range(50, 500);
            }
        } else {
            let d = rng.range(10 * 60_000, 3 * 3_600_000);
            jobs.push((format!("job-{job_no:08}"), "fine_tune", "llama-3-8b", None, t, d));
        }
        for (job, kind, model, run, start, d) in jobs {
            job_no += 1;
            let worker = rng.below(workers as u64) as usize;
            let of_account = EventData {
                account_id: &acct,
                ..EventData::default()
            };
            let started = EventData {
                kind: Some(kind),
                model: Some(model),
                workflow_run_id: run.as_deref(),
                gpu: (kind == "inference").then_some("A100-80GB"),
                ..of_account.clone()
            };
            emit(&mut evs, worker, "job.started", &job, start, started);
            let mut hb = start + opts.heartbeat_interval_ms;
            while hb < start + d {
                emit(&mut evs, worker, "job.heartbeat", &job, hb, of_account.clone());
                hb += opts.heartbeat_interval_ms;
            }
            if !rng.chance(opts.lost_stop_permille) {
                let status = match rng.below(100) {
                    0..=2 => "failed",
                    3 => "cancelled",
                    _ => "succeeded",
                };
                let stopped = EventData {
                    status: Some(status),
                    ..of_account
                };
                emit(&mut evs, worker, "job.stopped", &job, start + d, stopped);
            }
        }
    }
    evs.sort_by_key(|(t, s, _)| (*t, *s));
    let mut out: Vec<SimEvent> = Vec::with_capacity(evs.len() + evs.len() / 10);
    for (_, _, e) in evs {
        if rng.chance(opts.bad_permille) {
            let bad = match rng.below(4) {
                0 => "{\"specversion\":\"1.0\",\"id\":\"broken".to_owned(),
                1 => e.json.replace("\"job.", "\"job.paused."),
                2 => e.json.replace("\"subject\"", "\"subjekt\""),
                _ => e.json.replace("\"account_id\"", "\"acount\""),
            };
            out.push(SimEvent { json: bad, ..e.clone() });
        }
        let dup = rng.chance(opts.duplicate_permille).then(|| e.clone());
        out.push(e);
        if let Some(d) = dup {
            // Redelivered a little later.
            let at = out.len().saturating_sub(rng.below(5) as usize);
            out.insert(at, d);
        }
        let n = out.len();
        if n >= 2 && rng.chance(opts.reorder_permille) {
            out.swap(n - 1, n - 2);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_fleet() {
        let o = FleetOptions {
            jobs: 300,
            ..FleetOptions::default()
        };
        assert_eq!(events(&o), events(&o));
        assert_eq!(accounts(&o), accounts(&o));
        let other = FleetOptions { seed: 7, ..o.clone() };
        assert_ne!(events(&o), events(&other));
    }

    #[test]
    fn plans_change_mid_run_at_the_configured_rate() {
        let count = |permille| {
            let o = FleetOptions {
                accounts: 2_000,
                plan_change_permille: permille,
                ..FleetOptions::default()
            };
            let recs = accounts(&o);
            let upgrades = recs
                .iter()
                .filter(|(_, r)| r.contains(r#""plan":"enterprise","effective_from":"2024-05"#))
                .count();
            let to_pro = recs
                .iter()
                .filter(|(_, r)| r.contains(r#""plan":"pro","effective_from":"2024-05"#))
                .count();
            (to_pro, upgrades)
        };
        assert_eq!(count(0), (0, 0));
        let (to_pro, to_ent) = count(300);
        assert!(
            to_pro > 200 && to_ent > 30,
            "{to_pro} free→pro, {to_ent} pro→enterprise"
        );
    }

    #[test]
    fn the_realistic_fleet_has_its_shape() {
        let o = FleetOptions::realistic(20_000);
        let evs = events(&o);
        let (mut started, mut fine_tunes, mut june, mut may) = (0usize, 0usize, 0usize, 0usize);
        for e in &evs {
            let v: serde_json::Value = serde_json::from_str(&e.json).unwrap_or_default();
            if v["type"] == "job.started" {
                started += 1;
                fine_tunes += usize::from(v["data"]["kind"] == "fine_tune");
            }
            match e.time.period().to_string().as_str() {
                "2024-05" => may += 1,
                "2024-06" => june += 1,
                _ => {}
            }
        }
        let share = fine_tunes as f64 / started as f64;
        assert!((0.02..0.04).contains(&share), "fine-tunes {share}");
        assert!(
            may > 1_000 && june > 1_000,
            "crosses the month: {may} in May, {june} in June"
        );
        let per_job = evs.len() as f64 / started as f64;
        assert!((3.0..7.0).contains(&per_job), "{per_job} events per job");
        // The defaults are untouched by the preset's knob.
        assert_eq!(FleetOptions::default().fine_tune_permille, 15);
    }

    #[test]
    fn durations_follow_the_workload() {
        let o = FleetOptions {
            jobs: 3_000,
            duplicate_permille: 0,
            reorder_permille: 0,
            lost_stop_permille: 0,
            bad_permille: 0,
            skewed_worker_permille: 0,
            ..FleetOptions::default()
        };
        let mut starts = std::collections::HashMap::new();
        let (mut fine_tune_min, mut image_max, mut video_min) = (i64::MAX, 0i64, i64::MAX);
        for e in events(&o) {
            let v: serde_json::Value = serde_json::from_str(&e.json).unwrap_or_default();
            let job = v["subject"].as_str().unwrap_or_default().to_owned();
            match v["type"].as_str() {
                Some("job.started") => {
                    starts.insert(job, (e.time, v["data"]["kind"].clone(), v["data"]["model"].clone()));
                }
                Some("job.stopped") => {
                    if let Some((t0, kind, model)) = starts.get(&job) {
                        let d = e.time.0 - t0.0;
                        match (kind.as_str(), model.as_str()) {
                            (Some("fine_tune"), _) => fine_tune_min = fine_tune_min.min(d),
                            (Some("inference"), Some("sdxl-turbo" | "sdxl-1.0")) => image_max = image_max.max(d),
                            (Some("inference"), Some("svd-xt")) => video_min = video_min.min(d),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        assert!(image_max <= 12_000, "image jobs take seconds: {image_max} ms");
        assert!(video_min >= 60_000, "video jobs take minutes: {video_min} ms");
        assert!(
            fine_tune_min >= 600_000,
            "fine-tunes take ten minutes to hours: {fine_tune_min} ms"
        );
    }
}
