//! The meter never panics on any sequence of inputs: the fuzz input is
//! split into lines, each line applied as an event (valid templates are
//! mixed in so that deep states are reached), then everything is flushed.
#![no_main]

use jobmeter_core::*;
use libfuzzer_sys::fuzz_target;

const CARD: &str = "[[versions]]\nversion='v'\neffective_from='2024-01-01T00:00:00Z'\nfine_tune_per_second='0.001'\nmodels.m={per_second='0.01'}\n";

fuzz_target!(|data: &[u8]| {
    let Ok(rates) = RateCard::from_toml(CARD) else { return };
    let plans = PlanCatalog::default();
    let mut book = AccountBook::new(&plans);
    if let Ok(r) = AccountRecord::parse(
        br#"{"account_id":"a","plan":"free","effective_from":"2024-01-01T00:00:00Z","free_credits":"0.05"}"#,
    ) {
        book.insert(r);
    }
    let config = MeterConfig::default();
    let ctx = Context::new(&rates, &plans, &book, &config);
    let mut meter = Meter::tracking_changes();
    let mut out = Vec::new();
    for (i, line) in data.split(|b| *b == b'\n').enumerate() {
        // A short line picks a template with fuzzed job, time and type.
        if line.len() >= 4 && line.len() < 8 {
            let ty = ["job.started", "job.heartbeat", "job.stopped", "job.x"][usize::from(line[0] % 4)];
            let job = line[1] % 8;
            let min = line[2] % 60;
            let sec = line[3] % 60;
            let ev = format!(
                r#"{{"specversion":"1.0","id":"{i}","source":"s","type":"{ty}","time":"2024-05-31T23:{min:02}:{sec:02}Z","subject":"j{job}","data":{{"account_id":"a","kind":"inference","model":"m","status":"succeeded"}}}}"#
            );
            meter.apply(&ctx, ev.as_bytes(), None, &mut out);
        } else {
            meter.apply(&ctx, line, None, &mut out);
        }
        let _ = meter.take_changes();
    }
    meter.flush(&ctx, &mut out);
});
