//! Parse + apply throughput of the billing core on a realistic mix:
//! mostly short inference jobs, some multi-step workflows, a few long
//! fine-tunes, heartbeats every 10 s, 5 % duplicate deliveries, 300
//! accounts on every plan. Run: `cargo bench -p jobmeter-core --bench apply`.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

// The allocator the `jobmeter` binary runs the core with.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use jobmeter_core::wire::{CloudEvent, EventData};
use jobmeter_core::*;
use std::hint::black_box;

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const MODELS: [&str; 8] = [
    "sdxl-1.0",
    "sdxl-turbo",
    "flux-dev",
    "esrgan-4x",
    "llama-3-8b",
    "llama-3-70b",
    "whisper-large-v3",
    "faceswap-v2",
];

fn workload(jobs: usize) -> Vec<String> {
    let mut rng = Lcg(7);
    let mut evs: Vec<(i64, u64, String)> = Vec::new();
    let mut seq = 0u64;
    let mut t = 1_714_521_600_000i64;
    let mut push = |evs: &mut Vec<(i64, u64, String)>, ty: &str, job: &str, time: i64, data: EventData<'_>| {
        seq += 1;
        let id = format!("w-{seq:09}");
        let source = format!("gpu-worker/us-east-1/node-{}", seq % 64);
        let json = CloudEvent::new(&id, &source, ty, Timestamp(time), job, data).to_json();
        evs.push((time, seq, json));
    };
    for j in 0..jobs {
        t += rng.below(40) as i64;
        let acct = format!("acct-{:04}", rng.below(300));
        let job = format!("job-{j:09}");
        let roll = rng.below(100);
        let of_account = EventData {
            account_id: &acct,
            ..EventData::default()
        };
        let run = format!("run-{}", j / 3);
        let (started, dur) = if roll < 90 {
            let m = MODELS[rng.below(MODELS.len() as u64) as usize];
            let data = EventData {
                kind: Some("inference"),
                model: Some(m),
                gpu: Some("A100-80GB"),
                ..of_account.clone()
            };
            (data, 500 + rng.below(30_000) as i64)
        } else if roll < 99 {
            let m = MODELS[rng.below(MODELS.len() as u64) as usize];
            let data = EventData {
                kind: Some("workflow_step"),
                model: Some(m),
                workflow_run_id: Some(&run),
                ..of_account.clone()
            };
            (data, 500 + rng.below(20_000) as i64)
        } else {
            let data = EventData {
                kind: Some("fine_tune"),
                ..of_account.clone()
            };
            (data, 600_000 + rng.below(3_000_000) as i64)
        };
        push(&mut evs, "job.started", &job, t, started);
        let mut hb = t + 10_000;
        while hb < t + dur {
            push(&mut evs, "job.heartbeat", &job, hb, of_account.clone());
            hb += 10_000;
        }
        let stopped = EventData {
            status: Some("succeeded"),
            ..of_account
        };
        push(&mut evs, "job.stopped", &job, t + dur, stopped);
    }
    evs.sort_by_key(|(t, s, _)| (*t, *s));
    let mut out = Vec::with_capacity(evs.len() * 21 / 20);
    for (_, _, e) in evs {
        if rng.below(100) < 5 {
            out.push(e.clone());
        }
        out.push(e);
    }
    out
}

fn bench(c: &mut Criterion) {
    let rates = RateCard::from_toml(include_str!("../../../config/rate-card.toml")).expect("rate card");
    let plans = PlanCatalog::default();
    let mut book = AccountBook::new(&plans);
    for i in 0..300 {
        let plan = ["free", "pro", "enterprise", "payg"][i % 4];
        let rec = format!(
            r#"{{"account_id":"acct-{i:04}","plan":"{plan}","effective_from":"2024-01-01T00:00:00Z","alert_thresholds":["100"]}}"#
        );
        book.insert(AccountRecord::parse(rec.as_bytes()).expect("record"));
    }
    let config = MeterConfig::default();
    let ctx = Context::new(&rates, &plans, &book, &config);
    let events = workload(50_000);
    let mut g = c.benchmark_group("core");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.sample_size(20);
    // Every event through a meter; the meter is returned so that dropping
    // it is not timed (a live meter is never dropped).
    let run = |mut meter: Meter| {
        let mut out = Vec::with_capacity(64);
        for e in &events {
            meter.apply(&ctx, e.as_bytes(), None, &mut out).expect("apply");
            out.clear();
        }
        black_box(meter)
    };
    g.bench_function(format!("parse+apply {} events", events.len()), |b| {
        b.iter_batched(Meter::new, run, BatchSize::LargeInput)
    });
    // The same events with price overrides in force: `n` overrides spread
    // over the 300 accounts (each account's list holds n / 300), half of
    // them covering the run, applied to a fresh meter before the events.
    for n in [300usize, 10_000] {
        let overrides: Vec<String> = (0..n)
            .map(|i| {
                let (from, until) = if i % 2 == 0 {
                    ("2024-05-01T01:00:00Z", "2024-07-01T00:00:00Z")
                } else {
                    ("2024-01-01T00:00:00Z", "2024-02-01T00:00:00Z")
                };
                let sel = match i % 3 {
                    0 => String::new(),
                    1 => r#""selector":{"kind":"inference"},"#.to_owned(),
                    _ => r#""selector":{"model":"flux-schnell"},"#.to_owned(),
                };
                format!(
                    r#"{{"adjustment_id":"adj-{i}","account_id":"acct-{:04}","type":"price_override",{sel}"multiplier":"0.8","effective_from":"{from}","effective_until":"{until}","reason":"bench","requested_by":"bench"}}"#,
                    i % 300
                )
            })
            .collect();
        g.bench_function(format!("parse+apply {} events, {n} overrides", events.len()), |b| {
            b.iter_batched(
                || {
                    let mut meter = Meter::new();
                    let mut out = Vec::new();
                    for o in &overrides {
                        meter
                            .apply_adjustment(&ctx, o.as_bytes(), None, &mut out)
                            .expect("adjustment");
                    }
                    assert!(out.is_empty(), "{out:?}");
                    meter
                },
                run,
                BatchSize::LargeInput,
            )
        });
    }
    g.bench_function(format!("parse only {} events", events.len()), |b| {
        b.iter(|| {
            let mut n = 0usize;
            for e in &events {
                n += usize::from(parse_job_event(e.as_bytes()).is_ok());
            }
            black_box(n)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
