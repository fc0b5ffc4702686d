//! The meter never panics on any sequence of inputs, and everything it
//! writes reads back: the fuzz input is split into lines, each line applied
//! as an event (valid templates, with fuzzed times up to the edges of the
//! accepted range and record timestamps, are mixed in so that deep states
//! are reached); every state change is overlaid on a map as a store would
//! hold it, and a meter restored from that map must equal the live one.
//! Then everything is flushed.
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
    let mut map = std::collections::BTreeMap::new();
    let years = [2000, 2024, 2099];
    for (i, line) in data.split(|b| *b == b'\n').enumerate() {
        // A short line picks a template with fuzzed job, time, type and
        // record timestamp.
        if line.len() >= 6 && line.len() < 10 {
            let ty = ["job.started", "job.heartbeat", "job.stopped", "job.x"][usize::from(line[0] % 4)];
            let job = line[1] % 8;
            let min = line[2] % 60;
            let sec = line[3] % 60;
            let year = years[usize::from(line[4] % 3)];
            let month = if year == 2000 { 1 } else { 12 };
            let (day, hour) = if year == 2000 { (1, 0) } else { (31, 23) };
            let time = format!("{year}-{month:02}-{day:02}T{hour:02}:{min:02}:{sec:02}Z");
            let ev = format!(
                r#"{{"specversion":"1.0","id":"{i}","source":"s","type":"{ty}","time":"{time}","subject":"j{job}","data":{{"account_id":"a","kind":"inference","model":"m","status":"succeeded"}}}}"#
            );
            let record = Timestamp::parse(&time).ok().map(|t| t.plus_ms((i64::from(line[5]) - 128) * 10_000));
            let origin = Origin {
                topic: "events".into(),
                partition: 0,
                offset: i as i64,
                record_time: record,
            };
            meter.apply(&ctx, ev.as_bytes(), Some(&origin), &mut out);
        } else {
            meter.apply(&ctx, line, None, &mut out);
        }
        let Ok(changes) = meter.take_changes() else {
            panic!("state the meter holds could not be encoded");
        };
        for c in changes {
            match c.value {
                Some(v) => map.insert((c.table, c.key), v),
                None => map.remove(&(c.table, c.key)),
            };
        }
        let restored = Meter::restore(map.iter().map(|((t, k), v)| (*t, k.clone(), v.clone())), &config);
        let Ok(restored) = restored else {
            panic!("state the meter wrote does not read back");
        };
        assert_eq!(restored.snapshot().ok(), meter.snapshot().ok());
        assert_eq!(restored.stream_time(), meter.stream_time());
    }
    meter.flush(&ctx, &mut out);
});
