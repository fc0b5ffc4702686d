//! `jobmeter reprice` against `jobmeter replay`: the bill under each card
//! is the statement replay prints under that card, and the CLI writes a
//! table, CSV and an SVG chart without progress noise when not on a
//! terminal.

use jobmeter_core::{MeterConfig, Money};
use jobmeter_offline::replay::{replay, ReplayArgs};
use jobmeter_offline::reprice::{reprice, RepriceArgs};
use jobmeter_offline::simulate::{accounts, events, FleetOptions};
use jobmeter_offline::sinks::Format;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Fixture {
    _dir: tempfile::TempDir,
    events: PathBuf,
    accounts: PathBuf,
    current: PathBuf,
    proposed: PathBuf,
    /// The shipped plans, except that free accounts out of credits are not
    /// stopped: with spend control a price rise can end a free account's
    /// jobs sooner and so lower its bill, which is not what this test is
    /// about.
    plans: PathBuf,
    out: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = FleetOptions {
        jobs: 4_000,
        accounts: 80,
        mean_gap_ms: 1_000,
        ..FleetOptions::default()
    };
    let write = |name: &str, lines: &mut dyn Iterator<Item = String>| {
        let path = dir.path().join(name);
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("create"));
        for l in lines {
            writeln!(f, "{l}").expect("write");
        }
        f.flush().expect("flush");
        path
    };
    let events = write("events.jsonl", &mut events(&opts).into_iter().map(|e| e.json));
    let accounts = write("accounts.jsonl", &mut accounts(&opts).into_iter().map(|a| a.1));
    let current = root().join("config/rate-card.toml");
    let card = std::fs::read_to_string(&current).expect("rate card");
    let raised = card.replace(
        r#""sdxl-1.0"         = { per_second = "0.00055""#,
        r#""sdxl-1.0"         = { per_second = "0.00070""#,
    );
    assert_ne!(raised, card, "the fixture changes a price");
    let proposed = dir.path().join("proposed.toml");
    std::fs::write(&proposed, raised).expect("proposed card");
    let out = dir.path().join("out");
    let shipped = std::fs::read_to_string(root().join("config/plans.toml")).expect("plans");
    let notify = shipped.replace(r#"on_credits_exhausted = "stop""#, r#"on_credits_exhausted = "notify""#);
    assert_ne!(notify, shipped, "the fixture turns stopping off");
    let plans = dir.path().join("plans.toml");
    std::fs::write(&plans, notify).expect("plans");
    Fixture {
        events,
        accounts,
        current,
        proposed,
        plans,
        out,
        _dir: dir,
    }
}

/// total_due per (account, period) from a replay under `card`.
fn replay_bills(f: &Fixture, card: &Path) -> BTreeMap<(String, jobmeter_core::cycle::BillingPeriod), Money> {
    replay_bills_with(f, card, None)
}

/// [`replay_bills`] with the price overrides of `adjustments` applied.
fn replay_bills_with(
    f: &Fixture,
    card: &Path,
    adjustments: Option<&Path>,
) -> BTreeMap<(String, jobmeter_core::cycle::BillingPeriod), Money> {
    let args = ReplayArgs {
        events: f.events.clone(),
        accounts: Some(f.accounts.clone()),
        adjustments: adjustments.map(Path::to_owned),
        rate_card: card.to_owned(),
        plans: Some(f.plans.clone()),
        out: f.out.clone(),
        format: Format::Jsonl,
        flush: true,
        meter: MeterConfig::default(),
    };
    replay(&args, |_, _| {}).expect("replay");
    let text = std::fs::read_to_string(f.out.join("statements.jsonl")).expect("statements");
    text.lines()
        .map(|l| {
            let s: jobmeter_core::Statement = serde_json::from_str(l).expect("statement");
            ((s.account_id.to_string(), s.period), s.total_due)
        })
        .collect()
}

/// The fixture's bills under the current card against `after`, with
/// `overrides` applied in the second pass.
fn reprice_fixture(f: &Fixture, after: &Path, overrides: Option<&Path>) -> jobmeter_offline::reprice::Report {
    reprice(
        &RepriceArgs {
            events: f.events.clone(),
            accounts: Some(f.accounts.clone()),
            plans: Some(f.plans.clone()),
            before: f.current.clone(),
            after: after.to_owned(),
            overrides: overrides.map(Path::to_owned),
            period: None,
            meter: MeterConfig::default(),
        },
        |_, _, _| {},
    )
    .expect("reprice")
}

#[test]
fn reprice_totals_equal_replay_under_each_card() {
    let f = fixture();
    let before = replay_bills(&f, &f.current);
    let after = replay_bills(&f, &f.proposed);
    assert!(before.len() > 50, "{} statements", before.len());
    let report = reprice_fixture(&f, &f.proposed, None);
    assert_eq!(report.rows.len(), before.len());
    let mut raised = 0;
    for r in &report.rows {
        let key = (r.account_id.clone(), r.period);
        assert_eq!(Some(&r.before), before.get(&key), "{key:?} under the current card");
        assert_eq!(Some(&r.after), after.get(&key), "{key:?} under the proposed card");
        assert_eq!(r.change, r.after - r.before);
        raised += usize::from(r.change.0.is_sign_positive() && !r.change.0.is_zero());
        assert!(
            !r.change.0.is_sign_negative() || r.change.0.is_zero(),
            "a price rise lowers no bill"
        );
    }
    assert!(raised > 0, "some bills rise");
    let sum = |m: &BTreeMap<(String, jobmeter_core::cycle::BillingPeriod), Money>| {
        m.values().fold(Money::ZERO, |a, b| a + *b)
    };
    assert_eq!(report.total.before, sum(&before));
    assert_eq!(report.total.after, sum(&after));
    let plan_sum = report.by_plan.values().fold(Money::ZERO, |a, g| a + g.after);
    assert_eq!(plan_sum, sum(&after), "plans add up to the total");
    // Sorted by impact.
    for w in report.rows.windows(2) {
        assert!(w[0].change.0.abs() >= w[1].change.0.abs());
    }
    // Only sdxl-1.0 changes in the model totals.
    for (m, g) in &report.by_model {
        assert_eq!(m == "sdxl-1.0", g.before != g.after, "{m}");
    }
}

#[test]
fn cli_writes_table_csv_and_svg_quietly() {
    let f = fixture();
    let svg = f.out.with_extension("svg");
    let csv = f.out.with_extension("csv");
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_jobmeter-offline"))
            .current_dir(root())
            .arg("reprice")
            .arg("--events")
            .arg(&f.events)
            .arg("--accounts")
            .arg(&f.accounts)
            .args(["--plans", "config/plans.toml", "--period", "2024-05"])
            .arg("--proposed")
            .arg(&f.proposed)
            .args(extra)
            .output()
            .expect("run");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!err.contains('\r'), "no progress line off a terminal: {err:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let table = run(&["--top", "5", "--svg", svg.to_str().expect("utf-8")]);
    assert!(table.contains("pay more"), "{table}");
    assert!(table.contains("by plan") && table.contains("by model"), "{table}");
    let chart = std::fs::read_to_string(&svg).expect("svg");
    assert!(chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"));
    assert_eq!(chart.matches("<rect x=").count(), 10, "nine buckets and new bills");
    run(&["--format", "csv", "--out", csv.to_str().expect("utf-8")]);
    let rows = std::fs::read_to_string(&csv).expect("csv");
    assert!(rows.starts_with("account_id,period,plan,bill_before,bill_after,change,change_pct\n"));
    assert!(rows.lines().skip(1).all(|l| l.contains(",2024-05,")));
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_jobmeter-offline"))
        .args([
            "reprice",
            "--events",
            "/no/such/file",
            "--proposed",
            "/no/such/card.toml",
        ])
        .current_dir(root())
        .output()
        .expect("run");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("/no/such"),
        "the error names the file"
    );
}

/// The preview of price overrides (`reprice --override`, the current card
/// on both sides) equals, per account and period, the bills a replay gives
/// with the overrides applied: the preview is the effect, to the cent.
#[test]
fn an_override_preview_equals_the_bills_with_the_overrides_applied() {
    let f = fixture();
    let accounts: Vec<String> = std::fs::read_to_string(&f.accounts)
        .expect("accounts")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["account_id"].as_str().map(str::to_owned))
        .take(12)
        .collect();
    let overrides = f.out.with_file_name("overrides.jsonl");
    let mut lines = String::new();
    for (i, a) in accounts.iter().enumerate() {
        let price = if i % 3 == 0 {
            r#""multiplier":"0.80","selector":{"model":"sdxl-1.0"}"#
        } else if i % 3 == 1 {
            r#""multiplier":"0.5""#
        } else {
            r#""rate_per_second":"0.0001","selector":{"kind":"inference"}"#
        };
        lines.push_str(&format!(
            r#"{{"adjustment_id":"adj-{i}","account_id":"{a}","type":"price_override",{price},"effective_from":"2024-05-01T00:20:00Z","reason":"goodwill","requested_by":"support@platform"}}"#
        ));
        lines.push('\n');
    }
    std::fs::write(&overrides, lines).expect("overrides");
    let before = replay_bills(&f, &f.current);
    let after = replay_bills_with(&f, &f.current, Some(&overrides));
    let report = reprice_fixture(&f, &f.current, Some(&overrides));
    assert_eq!(report.rows.len(), before.len());
    let mut changed = 0;
    for r in &report.rows {
        let key = (r.account_id.clone(), r.period);
        assert_eq!(Some(&r.before), before.get(&key), "{key:?} as billed");
        assert_eq!(Some(&r.after), after.get(&key), "{key:?} with the overrides");
        changed += usize::from(r.change != Money::ZERO);
        if !accounts.contains(&r.account_id) {
            assert_eq!(r.change, Money::ZERO, "{key:?}: an account without an override");
        }
    }
    assert!(changed >= 6, "{changed} bills change");
}
