//! Per-account price overrides (§4b `price_override`, `override_end`):
//! each second inside an override's window is rated by it, the narrowest
//! selector winning, and a job crossing an override's edge is split there
//! like at a period boundary.

mod common;
use common::*;
use jobmeter_core::*;
use rust_decimal::Decimal;

/// An override record of account `acct`.
fn po(id: &str, acct: &str, rest: &str) -> String {
    format!(
        r#"{{"adjustment_id":"{id}","account_id":"{acct}","type":"price_override","reason":"goodwill after the outage","requested_by":"support@platform",{rest}}}"#
    )
}

/// A 50 % override `half` of all of `acct`'s usage from `from` on.
fn half_from(w: &mut World, acct: &str, from: &str) {
    w.adjustment(&po(
        "half",
        acct,
        &format!(r#""multiplier":"0.5","effective_from":"{from}""#),
    ));
}

/// `(charge_id, seconds, rate, amount, adjustment_id)` of every charge.
fn charged(w: &World) -> Vec<(String, Decimal, Money, Money, Option<String>)> {
    w.charges()
        .iter()
        .map(|c| {
            (
                c.charge_id.clone(),
                c.billable_seconds,
                c.rate_per_second,
                c.amount,
                c.adjustment_id.clone(),
            )
        })
        .collect()
}

#[test]
fn an_override_starting_mid_job_splits_it_there() {
    let mut w = World::new();
    half_from(&mut w, "a", "2024-05-10T12:00:00Z");
    w.job(
        "a",
        "j",
        ("2024-05-10T11:59:58.600Z", "2024-05-10T12:00:03.100Z"),
        "inference",
        Some("img"),
    );
    // 4.5 s in one piece is 5 s: floor(1.4) = 1 s at the list rate, the
    // rest at half of it.
    assert_eq!(
        charged(&w),
        vec![
            (
                "a/j/2024-05".to_owned(),
                Decimal::from(1),
                money("0.0005"),
                money("0.0005"),
                None
            ),
            (
                "a/j/2024-05@2024-05-10T12:00:00.000Z".to_owned(),
                Decimal::from(4),
                money("0.00025"),
                money("0.001"),
                Some("half".to_owned())
            ),
        ]
    );
    assert!(
        w.charges().iter().all(|c| c.rate_card_version.as_deref() == Some("v1")),
        "the list version stays visible"
    );
    w.flush();
    let st = w.statements();
    assert_eq!(st.len(), 1);
    let line = &st[0].lines[0];
    assert_eq!(
        (line.jobs, line.billable_seconds, line.amount),
        (1, Decimal::from(5), money("0.0015"))
    );
    // The statement names the override, its reason and what it changed:
    // 4 s at half of $0.0005.
    assert_eq!(
        st[0].adjustments,
        vec![output::StatementAdjustment {
            adjustment_id: "half".to_owned(),
            kind: "price_override".to_owned(),
            reason: "goodwill after the outage".to_owned(),
            requested_by: "support@platform".to_owned(),
            amount: money("-0.001"),
        }]
    );
    let json = serde_json::to_value(st[0]).expect("json");
    assert_eq!(json["adjustments"][0]["type"], "price_override");
}

#[test]
fn the_model_beats_the_kind_beats_all_usage_and_overrides_never_stack() {
    let mut w = World::new();
    let from = r#""effective_from":"2024-05-01T00:00:00Z""#;
    w.adjustment(&po("all", "a", &format!(r#""multiplier":"0.9",{from}"#)));
    w.adjustment(&po(
        "kind",
        "a",
        &format!(r#""multiplier":"0.8","selector":{{"kind":"inference"}},{from}"#),
    ));
    w.adjustment(&po(
        "model",
        "a",
        &format!(r#""rate_per_second":"0.0001","selector":{{"model":"img"}},{from}"#),
    ));
    w.job(
        "a",
        "img",
        ("2024-05-02T00:00:00Z", "2024-05-02T00:00:10Z"),
        "inference",
        Some("img"),
    );
    w.job(
        "a",
        "llm",
        ("2024-05-02T00:00:00Z", "2024-05-02T00:00:10Z"),
        "inference",
        Some("llm"),
    );
    w.job(
        "a",
        "ft",
        ("2024-05-02T00:00:00Z", "2024-05-02T00:00:10Z"),
        "fine_tune",
        None,
    );
    let by: Vec<(String, Money, Option<String>)> = charged(&w).into_iter().map(|c| (c.0, c.2, c.4)).collect();
    assert_eq!(
        by,
        vec![
            ("a/img/2024-05".to_owned(), money("0.0001"), Some("model".to_owned())),
            ("a/llm/2024-05".to_owned(), money("0.0016"), Some("kind".to_owned())),
            ("a/ft/2024-05".to_owned(), money("0.0009"), Some("all".to_owned())),
        ]
    );
    // Another account's usage is not touched.
    w.job(
        "b",
        "img",
        ("2024-05-02T00:00:00Z", "2024-05-02T00:00:10Z"),
        "inference",
        Some("img"),
    );
    assert_eq!(
        w.charges().last().map(|c| (c.rate_per_second, c.adjustment_id.clone())),
        Some((money("0.0005"), None))
    );
}

#[test]
fn an_override_ended_early_rates_what_follows_at_the_list_price_and_a_zero_multiplier_is_free() {
    let mut w = World::new();
    w.adjustment(&po(
        "free",
        "a",
        r#""multiplier":"0","effective_from":"2024-05-01T00:00:00Z","effective_until":"2024-06-01T00:00:00Z""#,
    ));
    w.adjustment(
        r#"{"adjustment_id":"end","account_id":"a","type":"override_end","ends":"free","effective_until":"2024-05-10T00:00:00Z","reason":"promotion over","requested_by":"support@platform"}"#,
    );
    w.job(
        "a",
        "before",
        ("2024-05-09T23:59:50Z", "2024-05-10T00:00:10Z"),
        "inference",
        Some("img"),
    );
    let c = charged(&w);
    assert_eq!(c.len(), 2, "{c:?}");
    assert_eq!(
        (c[0].1, c[0].3, c[0].4.as_deref()),
        (Decimal::from(10), money("0"), Some("free"))
    );
    assert_eq!(
        (c[1].1, c[1].3, c[1].4.as_deref()),
        (Decimal::from(10), money("0.005"), None)
    );
}

#[test]
fn an_override_edge_at_a_period_boundary_cuts_once() {
    let mut w = World::new();
    w.account(r#"{"account_id":"p","plan":"pro","effective_from":"2024-01-01T00:00:00Z"}"#);
    w.adjustment(&po(
        "may",
        "p",
        r#""multiplier":"2","effective_from":"2024-05-01T00:00:00Z""#,
    ));
    w.job(
        "p",
        "j",
        ("2024-04-30T23:59:58.600Z", "2024-05-01T00:00:03.100Z"),
        "inference",
        Some("img"),
    );
    let c = charged(&w);
    assert_eq!(
        c.iter().map(|x| (x.0.as_str(), x.1, x.2)).collect::<Vec<_>>(),
        vec![
            ("p/j/2024-04", Decimal::from(1), money("0.0005")),
            ("p/j/2024-05", Decimal::from(4), money("0.0010")),
        ]
    );
}

#[test]
fn duplicates_change_nothing_conflicts_and_dangling_ends_are_dead_lettered() {
    let mut w = World::new();
    let rec = po(
        "x",
        "a",
        r#""multiplier":"0.5","effective_from":"2024-05-01T00:00:00Z""#,
    );
    w.adjustment(&rec);
    let dups = w.meter.stats().duplicates;
    w.adjustment(&rec);
    assert_eq!(w.meter.stats().duplicates, dups + 1);
    assert!(w.rejects().is_empty());
    w.adjustment(&po(
        "x",
        "a",
        r#""multiplier":"0.4","effective_from":"2024-05-01T00:00:00Z""#,
    ));
    // The same id on another account is another adjustment.
    w.adjustment(&po(
        "x",
        "b",
        r#""multiplier":"0.4","effective_from":"2024-05-01T00:00:00Z""#,
    ));
    w.adjustment(
        r#"{"adjustment_id":"e","account_id":"a","type":"override_end","ends":"nope","effective_until":"2024-05-10T00:00:00Z","reason":"r","requested_by":"s"}"#,
    );
    w.adjustment(&po(
        "bad",
        "a",
        r#""multiplier":"-1","effective_from":"2024-05-01T00:00:00Z""#,
    ));
    assert_eq!(
        w.rejects(),
        vec![
            RejectReason::Conflict,
            RejectReason::InvalidValue,
            RejectReason::InvalidValue
        ]
    );
    w.job(
        "a",
        "j",
        ("2024-05-02T00:00:00Z", "2024-05-02T00:00:10Z"),
        "inference",
        Some("img"),
    );
    assert_eq!(
        w.charges()[0].rate_per_second,
        money("0.00025"),
        "the first content stands"
    );
}

#[test]
fn overrides_are_state_and_restore_with_the_partition() {
    let mut w = World::new();
    half_from(&mut w, "a", "2024-05-01T00:00:00Z");
    w.adjustment(
        r#"{"adjustment_id":"end","account_id":"a","type":"override_end","ends":"half","effective_until":"2024-05-20T00:00:00Z","reason":"r","requested_by":"s"}"#,
    );
    let records = w.stored();
    assert_eq!(records.iter().filter(|r| r.0 == state::Table::Adjustments).count(), 2);
    w.meter = Meter::restore(records, &w.config).expect("restore");
    w.job(
        "a",
        "in",
        ("2024-05-02T00:00:00Z", "2024-05-02T00:00:10Z"),
        "inference",
        Some("img"),
    );
    w.job(
        "a",
        "after",
        ("2024-05-21T00:00:00Z", "2024-05-21T00:00:10Z"),
        "inference",
        Some("img"),
    );
    let rates: Vec<Money> = w.charges().iter().map(|c| c.rate_per_second).collect();
    assert_eq!(rates, vec![money("0.00025"), money("0.0005")]);
    // A duplicate after the restore is still a duplicate.
    half_from(&mut w, "a", "2024-05-01T00:00:00Z");
    assert!(w.rejects().is_empty());
}

#[test]
fn a_late_stop_of_an_orphan_is_adjusted_part_by_part_at_each_parts_rate() {
    let mut w = World::new();
    half_from(&mut w, "a", "2024-05-10T12:00:00Z");
    w.begin("a", "j", "2024-05-10T11:59:00Z", "inference", Some("img"));
    w.beat("a", "j", "2024-05-10T12:01:00Z");
    // Stream time passes the orphan timeout: charged to the heartbeat.
    w.begin("b", "x", "2024-05-10T12:20:00Z", "inference", Some("img"));
    w.end("a", "j", "2024-05-10T12:02:00Z", "succeeded");
    let c: Vec<_> = charged(&w).into_iter().filter(|c| c.0.starts_with("a/")).collect();
    assert_eq!(
        c.iter().map(|x| (x.0.as_str(), x.1, x.3)).collect::<Vec<_>>(),
        vec![
            ("a/j/2024-05", Decimal::from(60), money("0.03")),
            (
                "a/j/2024-05@2024-05-10T12:00:00.000Z",
                Decimal::from(60),
                money("0.015")
            ),
            (
                "a/j/2024-05@2024-05-10T12:00:00.000Z/adj",
                Decimal::from(60),
                money("0.015")
            ),
        ]
    );
    let adj = w
        .charges()
        .into_iter()
        .find(|x| x.charge_id.ends_with("/adj"))
        .cloned()
        .expect("adjustment");
    assert_eq!(adj.adjusts.as_deref(), Some("a/j/2024-05@2024-05-10T12:00:00.000Z"));
    assert_eq!(adj.adjustment_id.as_deref(), Some("half"));
    w.flush();
    let line = &w
        .statements()
        .into_iter()
        .find(|s| s.account_id.as_str() == "a")
        .expect("statement")
        .lines[0];
    assert_eq!(
        (line.jobs, line.billable_seconds, line.amount),
        (1, Decimal::from(180), money("0.06"))
    );
}

#[test]
fn heartbeats_count_toward_caps_at_the_overridden_rate() {
    let mut w = World::new();
    w.account(r#"{"account_id":"p","plan":"pro","effective_from":"2024-01-01T00:00:00Z","usage_cap":"1.00"}"#);
    half_from(&mut w, "p", "2024-05-01T00:00:00Z");
    w.begin("p", "j", "2024-05-02T00:00:00Z", "inference", Some("img"));
    // 1,800 s: $0.90 at list (past 80 % of $1.00), $0.45 overridden.
    w.beat("p", "j", "2024-05-02T00:30:00Z");
    assert!(w.limits().is_empty(), "{:?}", w.limits());
    // 3,300 s: $0.825 overridden.
    w.beat("p", "j", "2024-05-02T00:55:00Z");
    let fired: Vec<_> = w.limits().iter().map(|l| (l.threshold_pct, l.usage_value)).collect();
    assert_eq!(fired, vec![(Some(80), money("0.825"))]);
}

/// Sum of the amounts charged to `acct`, adjustments included.
fn total(w: &World, acct: &str) -> Money {
    w.charges()
        .iter()
        .filter(|c| c.account_id.as_str() == acct)
        .fold(Money::ZERO, |s, c| s + c.amount)
}

#[test]
fn a_retroactive_override_on_a_closed_month_is_booked_in_the_open_one() {
    let mut w = World::new();
    w.job(
        "a",
        "may",
        ("2024-05-20T10:00:00Z", "2024-05-20T10:00:10Z"),
        "inference",
        Some("img"),
    );
    // Stream time passes June 1 01:00: May closes with its statement.
    w.job(
        "b",
        "june",
        ("2024-06-01T02:00:00Z", "2024-06-01T02:00:01Z"),
        "inference",
        Some("img"),
    );
    let mays = |w: &World| {
        w.statements()
            .iter()
            .filter(|s| s.account_id.as_str() == "a" && s.period.to_string() == "2024-05")
            .count()
    };
    assert_eq!(mays(&w), 1);
    let before = w.charges().len();
    w.adjustment(&po(
        "may-half",
        "a",
        r#""multiplier":"0.5","effective_from":"2024-05-01T00:00:00Z","effective_until":"2024-06-01T00:00:00Z""#,
    ));
    let new: Vec<(String, String, String, Decimal, Money, Option<String>)> = w.charges()[before..]
        .iter()
        .map(|c| {
            (
                c.charge_id.clone(),
                c.period.to_string(),
                c.service_period.to_string(),
                c.billable_seconds,
                c.amount,
                c.adjusts.clone(),
            )
        })
        .collect();
    assert_eq!(
        new,
        vec![
            (
                "a/may/2024-05/rerate/may-half".to_owned(),
                "2024-06".to_owned(),
                "2024-05".to_owned(),
                Decimal::from(-10),
                money("-0.005"),
                Some("a/may/2024-05".to_owned())
            ),
            (
                "a/may/2024-05/may-half".to_owned(),
                "2024-06".to_owned(),
                "2024-05".to_owned(),
                Decimal::from(10),
                money("0.0025"),
                Some("a/may/2024-05".to_owned())
            ),
        ]
    );
    assert!(w.charges()[before..]
        .iter()
        .all(|c| c.adjustment_id.as_deref() == Some("may-half")));
    w.flush();
    assert_eq!(mays(&w), 1, "May's bill is final");
    let june = w
        .statements()
        .into_iter()
        .find(|s| s.account_id.as_str() == "a" && s.period.to_string() == "2024-06")
        .cloned()
        .expect("a June statement carries the difference");
    assert_eq!(june.lines[0].billable_seconds, Decimal::ZERO, "seconds net to zero");
    assert_eq!(june.lines[0].jobs, 0);
    assert_eq!(june.adjustments.len(), 1);
    assert_eq!(june.adjustments[0].amount, money("-0.0025"));
    // Applied again, it is a duplicate: nothing more is charged.
    let n = w.charges().len();
    w.adjustment(&po(
        "may-half",
        "a",
        r#""multiplier":"0.5","effective_from":"2024-05-01T00:00:00Z","effective_until":"2024-06-01T00:00:00Z""#,
    ));
    assert_eq!(w.charges().len(), n);
}

#[test]
fn ending_an_override_early_re_rates_back_what_it_no_longer_covers() {
    let mut w = World::new();
    half_from(&mut w, "a", "2024-05-01T00:00:00Z");
    w.job(
        "a",
        "early",
        ("2024-05-05T00:00:00Z", "2024-05-05T00:00:10Z"),
        "inference",
        Some("img"),
    );
    w.job(
        "a",
        "late",
        ("2024-05-15T00:00:00Z", "2024-05-15T00:00:10Z"),
        "inference",
        Some("img"),
    );
    assert_eq!(total(&w, "a"), money("0.005"));
    w.adjustment(
        r#"{"adjustment_id":"stop-half","account_id":"a","type":"override_end","ends":"half","effective_until":"2024-05-10T00:00:00Z","reason":"promotion ends early","requested_by":"support@platform"}"#,
    );
    // The late job is back at the list price; the early one stays.
    assert_eq!(total(&w, "a"), money("0.0075"));
    let rerated: Vec<&str> = w
        .charges()
        .iter()
        .filter(|c| c.adjustment_id.as_deref() == Some("stop-half"))
        .map(|c| c.charge_id.as_str())
        .collect();
    assert_eq!(
        rerated,
        vec!["a/late/2024-05/rerate/stop-half", "a/late/2024-05/stop-half"]
    );
}

proptest::proptest! {
    /// Whether an override arrives before the usage it covers or after it
    /// was charged, the account pays the same, to the cent and the second:
    /// a preview (overrides applied first, as `reprice --override` does)
    /// equals the effect of applying them to a running meter.
    #[test]
    fn an_override_applied_late_costs_what_it_costs_applied_first(
        jobs in proptest::collection::vec((0i64..(20 * 86_400), 1i64..7_200, 0u8..3), 1..12),
        m in 0i64..300,
        from in 0i64..(20 * 86_400),
        len in proptest::option::of(1i64..(10 * 86_400)),
    ) {
        let base = jobmeter_core::Timestamp::parse("2024-05-01T00:00:00Z").expect("t").0;
        let t = |s: i64| jobmeter_core::Timestamp(base + s * 1000).to_string();
        let until = len.map(|l| format!(r#","effective_until":"{}""#, t(from + l))).unwrap_or_default();
        let rec = po("o", "a", &format!(r#""multiplier":"{}","effective_from":"{}"{until}"#, Decimal::new(m, 2), t(from)));
        let run = |w: &mut World| {
            for (i, (start, dur, kind)) in jobs.iter().enumerate() {
                let (k, model) = [("inference", Some("img")), ("workflow_step", Some("llm")), ("fine_tune", None)][*kind as usize];
                w.job("a", &format!("j{i}"), (&t(*start), &t(start + dur)), k, model);
            }
        };
        let mut first = World::new();
        first.adjustment(&rec);
        run(&mut first);
        let mut late = World::new();
        run(&mut late);
        late.adjustment(&rec);
        proptest::prop_assert_eq!(total(&late, "a"), total(&first, "a"));
        let seconds = |w: &World| w.charges().iter().map(|c| c.billable_seconds).sum::<Decimal>();
        proptest::prop_assert_eq!(seconds(&late), seconds(&first));
    }
}

#[test]
fn jobs_already_archived_are_re_rated_too() {
    use jobmeter_core::archive::SharedMemArchive;
    let mut w = World::new();
    let archive = SharedMemArchive::default();
    w.meter = Meter::tracking_changes().with_archive(Box::new(archive.clone()));
    w.job(
        "a",
        "old",
        ("2024-05-02T00:00:00Z", "2024-05-02T00:00:10Z"),
        "inference",
        Some("img"),
    );
    // The batch is durable: the finished job leaves memory.
    let changes = w.meter.take_changes().expect("changes");
    archive.apply(&changes);
    w.meter.release_all_stored();
    assert_eq!(w.meter.known_jobs(), 0, "no job left in memory");
    assert_eq!(archive.jobs(), 1);
    w.job(
        "b",
        "x",
        ("2024-05-03T00:00:00Z", "2024-05-03T00:00:01Z"),
        "inference",
        Some("img"),
    );
    half_from(&mut w, "a", "2024-05-01T00:00:00Z");
    assert_eq!(total(&w, "a"), money("0.0025"), "the archived job is re-rated");
}

#[test]
fn an_account_has_at_most_a_thousand_price_overrides() {
    let mut w = World::new();
    for i in 0..jobmeter_core::adjust::MAX_OVERRIDES_PER_ACCOUNT {
        w.adjustment(&po(
            &format!("o{i}"),
            "a",
            r#""multiplier":"0.9","effective_from":"2024-05-01T00:00:00Z""#,
        ));
    }
    assert!(w.rejects().is_empty());
    w.adjustment(&po(
        "one-more",
        "a",
        r#""multiplier":"0.9","effective_from":"2024-05-01T00:00:00Z""#,
    ));
    assert_eq!(w.rejects(), vec![RejectReason::InvalidValue]);
    // Ending one is still possible, and another account is not affected.
    w.adjustment(
        r#"{"adjustment_id":"end","account_id":"a","type":"override_end","ends":"o0","effective_until":"2024-05-02T00:00:00Z","reason":"r","requested_by":"s"}"#,
    );
    w.adjustment(&po(
        "x",
        "b",
        r#""multiplier":"0.9","effective_from":"2024-05-01T00:00:00Z""#,
    ));
    assert_eq!(w.rejects(), vec![RejectReason::InvalidValue]);
}
