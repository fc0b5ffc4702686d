//! `jobmeter replay` applies the same time bounds as the running meter: a
//! line `<ms><TAB><event>` carries the Kafka record timestamp (as `jobmeter
//! dump --timestamps` prints it), and the event is checked against it; a
//! bare event is checked against the absolute bounds only.

use jobmeter_core::{MeterConfig, Timestamp};
use jobmeter_offline::replay::{replay, split_record_time, ReplayArgs};
use jobmeter_offline::sinks::Format;
use std::io::Write;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn event(id: &str, time: &str) -> String {
    format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"w","type":"job.started","time":"{time}","subject":"{id}","data":{{"account_id":"a","kind":"inference","model":"sdxl-1.0"}}}}"#
    )
}

#[test]
fn record_time_prefix_is_split_only_when_it_is_one() {
    let ev = event("x", "2024-05-01T00:00:00Z");
    let line = format!("1714521600000\t{ev}");
    assert_eq!(
        split_record_time(line.as_bytes()),
        (Some(Timestamp(1_714_521_600_000)), ev.as_bytes())
    );
    assert_eq!(split_record_time(ev.as_bytes()), (None, ev.as_bytes()));
    for odd in ["\t{}", "12a\t{}", "99999999999999999999\t{}", "{\"a\":\"1\t2\"}"] {
        assert_eq!(split_record_time(odd.as_bytes()), (None, odd.as_bytes()), "{odd:?}");
    }
    assert_eq!(split_record_time(b"-5\t{}"), (Some(Timestamp(-5)), &b"{}"[..]));
}

#[test]
fn replay_checks_event_times_against_record_times_like_the_meter() {
    let dir = tempfile::tempdir().expect("tempdir");
    let record = Timestamp::parse("2024-05-01T12:00:00Z").expect("ts").0;
    let lines = [
        // Two hours ahead of its record: refused.
        format!("{record}\t{}", event("ahead", "2024-05-01T14:00:00Z")),
        // Forty days behind its record: refused.
        format!("{record}\t{}", event("old", "2024-03-22T12:00:00Z")),
        // Plausible against its record: accepted.
        format!("{record}\t{}", event("ok", "2024-05-01T12:04:59Z")),
        // No record time: only the absolute bounds apply.
        event("bare", "2024-05-01T14:00:00Z"),
        event("year-9999", "9999-12-31T23:59:59.999Z"),
    ];
    let events = dir.path().join("events.jsonl");
    let mut f = std::fs::File::create(&events).expect("create");
    for l in &lines {
        writeln!(f, "{l}").expect("write");
    }
    drop(f);
    let out = dir.path().join("out");
    let summary = replay(
        &ReplayArgs {
            events,
            accounts: None,
            adjustments: None,
            rate_card: root().join("config/rate-card.toml"),
            plans: Some(root().join("config/plans.toml")),
            out: out.clone(),
            format: Format::Jsonl,
            flush: false,
            meter: MeterConfig::default(),
        },
        |_, _| {},
    )
    .expect("replay");
    assert_eq!(summary.lines, 5);
    assert_eq!(summary.stats.events, 2, "ok and bare are accepted");
    let rejects = std::fs::read_to_string(out.join("rejects.jsonl")).expect("rejects");
    let reasons: Vec<&str> = rejects
        .lines()
        .map(|l| {
            if l.contains("time_out_of_range") {
                "time_out_of_range"
            } else {
                l
            }
        })
        .collect();
    assert_eq!(reasons, vec!["time_out_of_range"; 3], "{rejects}");
    assert!(rejects.contains("ahead of the record timestamp"), "{rejects}");
    assert!(rejects.contains("behind the record timestamp"), "{rejects}");
}
