//! Upgrading the state format: state written by the release before the
//! binary format (format version 0, JSON; `fixtures/state-v0`, written by
//! that release's own code) is restored by this one, which goes on exactly
//! as a meter that never stopped, and writes binary (version 1) from then on.
//! The JSON mode this release keeps for rolling upgrades writes that format
//! byte for byte.

use jobmeter_core::state::{StateChange, StateFormat, Table};
use jobmeter_core::values;
use jobmeter_core::*;
use std::path::PathBuf;

const SPLIT: usize = 900;

fn fixture(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/state-v0")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The fixture's records, in the order the old release listed them.
fn old_records() -> Vec<(Table, Vec<u8>, Vec<u8>)> {
    fixture("state-after-900.tsv")
        .lines()
        .map(|l| {
            let mut f = l.splitn(3, '\t');
            let (t, k, v) = (f.next().expect("tag"), f.next().expect("key"), f.next().expect("value"));
            let table = Table::from_tag(t.parse().expect("tag")).expect("table");
            let value = match v.split_at(2) {
                ("j:", json) => json.as_bytes().to_vec(),
                ("x:", hex) => unhex(hex),
                _ => panic!("bad value column {v}"),
            };
            (table, unhex(k), value)
        })
        .collect()
}

struct Fleet {
    rates: RateCard,
    plans: PlanCatalog,
    book: AccountBook,
    events: Vec<String>,
}

/// The fixture's world. The release that wrote it had no spend control;
/// it is off here too (no runway events, credits used up only notify), so
/// the comparison is of state formats alone.
fn fleet() -> Fleet {
    let plans = PlanCatalog {
        free_on_credits_exhausted: Policy::Notify,
        ..PlanCatalog::default()
    };
    let mut book = AccountBook::new(&plans);
    for l in fixture("accounts.jsonl").lines() {
        book.insert(AccountRecord::parse(l.as_bytes()).expect("account"));
    }
    Fleet {
        rates: RateCard::from_toml(&fixture("rate-card.toml")).expect("rate card"),
        plans,
        book,
        events: fixture("events.jsonl").lines().map(str::to_owned).collect(),
    }
}

fn no_spend_control() -> MeterConfig {
    MeterConfig {
        runway_horizons_ms: Vec::new(),
        ..MeterConfig::default()
    }
}

fn run(f: &Fleet, config: &MeterConfig, m: &mut Meter, events: &[String], flush: bool) -> Vec<Output> {
    let ctx = Context::new(&f.rates, &f.plans, &f.book, config);
    let mut out = Vec::new();
    for e in events {
        m.apply(&ctx, e.as_bytes(), None, &mut out).expect("test setup");
    }
    if flush {
        m.flush(&ctx, &mut out).expect("test setup");
    }
    out
}

fn as_records(changes: Vec<StateChange>) -> Vec<(Table, Vec<u8>, Vec<u8>)> {
    changes
        .into_iter()
        .map(|c| (c.table, c.key, c.value.unwrap_or_default()))
        .collect()
}

#[test]
fn json_mode_writes_the_previous_format_byte_for_byte() {
    let f = fleet();
    let config = MeterConfig {
        state_format: StateFormat::Json,
        ..no_spend_control()
    };
    let mut m = Meter::tracking_changes().with_state_format(StateFormat::Json);
    run(&f, &config, &mut m, &f.events[..SPLIT], false);
    let old = old_records();
    assert!(
        old.iter().any(|r| r.0 == Table::Fired),
        "the fixture has every kind of record"
    );
    assert_eq!(as_records(m.snapshot().expect("encode")), old);
}

#[test]
fn previous_format_state_is_restored_and_goes_on_as_if_never_stopped() {
    let f = fleet();
    let config = no_spend_control();
    assert_eq!(config.state_format, StateFormat::Binary);

    // A meter of this release that never stopped.
    let mut live = Meter::tracking_changes();
    run(&f, &config, &mut live, &f.events[..SPLIT], false);
    let expected = run(&f, &config, &mut live, &f.events[SPLIT..], true);
    assert!(expected.iter().any(|o| matches!(o, Output::Charge(_))));
    assert!(expected.iter().any(|o| matches!(o, Output::Statement(_))));

    // Restored from what the previous release stored.
    let old = old_records();
    let mut restored = Meter::restore(old.clone(), &config).expect("the previous format reads back");
    // It holds the same state: each record, rewritten in binary, decodes to
    // the value the old release wrote.
    let now = as_records(restored.snapshot().expect("encode"));
    assert_eq!(now.len(), old.len());
    for ((t, k, v), (ot, ok, ov)) in now.iter().zip(&old) {
        assert_eq!((t, k), (ot, ok));
        if matches!(t, Table::Jobs | Table::Usage | Table::Statements) {
            assert_eq!(values::version(v), 1, "rewritten in binary");
            assert_eq!(values::version(ov), 0);
            assert!(v.len() < ov.len(), "binary is smaller than JSON");
        }
        assert_eq!(
            values::canonical(*t, v).expect("decode"),
            values::canonical(*ot, ov).expect("decode")
        );
    }
    let got = run(&f, &config, &mut restored, &f.events[SPLIT..], true);
    assert_eq!(got, expected);
    // What it writes from now on is binary.
    let changes = restored.take_changes().expect("encode");
    assert!(changes
        .iter()
        .filter(|c| matches!(c.table, Table::Jobs | Table::Usage | Table::Statements))
        .filter_map(|c| c.value.as_deref())
        .all(|v| values::version(v) == 1));
}

#[test]
fn a_newer_format_version_is_refused_not_misread() {
    let config = MeterConfig::default();
    let mut old = old_records();
    let job = old.iter_mut().find(|r| r.0 == Table::Jobs).expect("a job");
    job.2 = vec![0x00, 0x02, 0x01];
    let err = Meter::restore(old, &config).expect_err("version 2 is unknown");
    assert!(
        err.to_string()
            .contains("format version 2 is newer than this release reads"),
        "{err}"
    );
}
