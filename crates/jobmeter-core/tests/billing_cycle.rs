//! The billing-cycle change (§1 "Billing cycle", rule 6): post-paid
//! accounts billed by half months until 2024-05-01, monthly after; a
//! cadence change inside a period cuts it short; limits count per calendar
//! month whatever the cadence. One test per boundary case.

mod common;
use common::*;
use jobmeter_core::cycle::{Cadence, CadenceEntry, CadenceSchedule};
use jobmeter_core::*;
use rust_decimal::Decimal;

/// `(period, service_period, billable_seconds)` of every charge.
fn charged(w: &World) -> Vec<(String, String, Decimal)> {
    w.charges()
        .iter()
        .map(|c| (c.period.to_string(), c.service_period.to_string(), c.billable_seconds))
        .collect()
}

fn s(x: &str) -> String {
    x.to_owned()
}

#[test]
fn a_job_across_the_half_month_boundary_gets_its_whole_seconds_then_the_rest() {
    let mut w = World::new();
    w.job(
        "acct",
        "j",
        ("2024-04-15T23:59:59.500Z", "2024-04-16T00:00:00.700Z"),
        "inference",
        Some("img"),
    );
    // 1.2 s in one piece is 2 billable seconds: the first half month's
    // 0.5 s is floor(0.5) = 0 seconds (no charge), the second gets the rest.
    assert_eq!(
        charged(&w),
        vec![(s("2024-04-16/2024-05-01"), s("2024-04-16/2024-05-01"), Decimal::from(2))]
    );
    w.flush();
    let st = w.statements();
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].period.to_string(), "2024-04-16/2024-05-01");
    assert_eq!(st[0].cadence, Cadence::SemiMonthly);
    assert_eq!(
        (st[0].period_start, st[0].period_end),
        (ts("2024-04-16T00:00:00Z"), ts("2024-05-01T00:00:00Z"))
    );
}

#[test]
fn a_fine_tune_across_the_cutover_is_billed_by_the_half_month_then_the_month() {
    // An enterprise fine-tune from Apr 30 22:00 to May 1 02:00, metered
    // with `grace_ms` of period grace.
    let fine_tune = |grace_ms: i64| {
        let mut w = World::new();
        w.config.period_grace_ms = grace_ms;
        w.account(r#"{"account_id":"e","plan":"enterprise","effective_from":"2024-01-01T00:00:00Z"}"#);
        w.job(
            "e",
            "ft",
            ("2024-04-30T22:00:00Z", "2024-05-01T02:00:00Z"),
            "fine_tune",
            None,
        );
        w
    };
    // The stop arrives at 02:00, past the half month's end + the default
    // grace (01:00); with three hours of grace the half month is still open.
    let mut w = fine_tune(3 * 3_600_000);
    assert_eq!(
        charged(&w),
        vec![
            (
                s("2024-04-16/2024-05-01"),
                s("2024-04-16/2024-05-01"),
                Decimal::from(7200)
            ),
            (s("2024-05"), s("2024-05"), Decimal::from(7200)),
        ]
    );
    let total: Money = w.charges().iter().map(|c| c.amount).fold(Money::ZERO, |x, y| x + y);
    assert_eq!(total, money("14.4"), "4 h at $0.001/s, not a cent more or less");
    w.flush();
    let st: Vec<(String, Cadence, Money)> = w
        .statements()
        .iter()
        .map(|x| (x.period.to_string(), x.cadence, x.total_due))
        .collect();
    assert_eq!(
        st,
        vec![
            (s("2024-04-16/2024-05-01"), Cadence::SemiMonthly, money("7.20")),
            (s("2024-05"), Cadence::Monthly, money("7.20")),
        ]
    );

    // With the default grace the half month has closed when the stop
    // arrives: its part is late usage, billed in May and naming its period.
    let w = fine_tune(MeterConfig::default().period_grace_ms);
    assert_eq!(
        charged(&w),
        vec![
            (s("2024-05"), s("2024-04-16/2024-05-01"), Decimal::from(7200)),
            (s("2024-05"), s("2024-05"), Decimal::from(7200)),
        ]
    );
}

#[test]
fn an_upgrade_to_pro_mid_half_month_ends_the_period_there_with_a_job_running() {
    let mut w = World::new();
    w.account(r#"{"account_id":"u","plan":"payg","effective_from":"2024-01-01T00:00:00Z"}"#);
    w.account(r#"{"account_id":"u","plan":"pro","effective_from":"2024-04-20T12:00:00Z"}"#);
    // Stopped before the short period's end + grace (13:00).
    w.job(
        "u",
        "j",
        ("2024-04-20T11:00:00Z", "2024-04-20T12:59:00.001Z"),
        "inference",
        Some("img"),
    );
    assert_eq!(
        charged(&w),
        vec![
            (
                s("2024-04-16T00:00:00Z/2024-04-20T12:00:00Z"),
                s("2024-04-16T00:00:00Z/2024-04-20T12:00:00Z"),
                Decimal::from(3600)
            ),
            (
                s("2024-04-20T12:00:00Z/2024-05-01T00:00:00Z"),
                s("2024-04-20T12:00:00Z/2024-05-01T00:00:00Z"),
                Decimal::from(3541)
            ),
        ]
    );
    w.flush();
    let st = w.statements();
    assert_eq!(st.len(), 2, "{st:#?}");
    assert_eq!((st[0].plan, st[0].cadence), (Plan::Payg, Cadence::SemiMonthly));
    assert_eq!(st[0].subscription_fee, money("0.00"), "payg owes no fee");
    assert_eq!((st[1].plan, st[1].cadence), (Plan::Pro, Cadence::Monthly));
    assert!(
        st[1].subscription_fee > Money::ZERO,
        "the pro fee of April is on the account's last April statement"
    );
}

#[test]
fn a_late_stop_for_a_closed_half_month_is_booked_in_the_open_one() {
    let mut w = World::new();
    w.begin("acct", "early", "2024-04-15T20:00:00Z", "inference", Some("img"));
    w.beat("acct", "early", "2024-04-15T20:05:00Z");
    // Stream time passes Apr 16 01:00 (the first half's end + 1 h grace).
    w.begin("other", "x", "2024-04-16T01:00:01Z", "inference", Some("img"));
    // The orphan timeout closed the job at its heartbeat, in the first
    // half, which has closed since with its statement.
    assert_eq!(w.statements().len(), 1);
    assert_eq!(w.statements()[0].period.to_string(), "2024-04-01/2024-04-16");
    w.end("acct", "early", "2024-04-15T20:10:00Z", "succeeded");
    let adj = w
        .charges()
        .into_iter()
        .find(|c| c.adjusts.is_some())
        .expect("the late stop adjusts the orphan charge");
    assert_eq!(adj.period.to_string(), "2024-04-16/2024-05-01");
    assert_eq!(adj.service_period.to_string(), "2024-04-01/2024-04-16");
    w.flush();
    let firsts = w
        .statements()
        .iter()
        .filter(|x| x.account_id.as_str() == "acct" && x.period.to_string() == "2024-04-01/2024-04-16")
        .count();
    assert_eq!(firsts, 1, "a closed half month's bill is final");
}

#[test]
fn an_enterprise_alert_crossed_across_the_half_months_fires_once_for_the_month() {
    let mut w = World::new();
    w.account(
        r#"{"account_id":"e","plan":"enterprise","effective_from":"2024-01-01T00:00:00Z","alert_thresholds":["1.00"]}"#,
    );
    // $0.60 in each half of April (1200 s of img at $0.0005/s).
    for (j, from, to) in [
        ("a", "2024-04-10T00:00:00Z", "2024-04-10T00:20:00Z"),
        ("b", "2024-04-20T00:00:00Z", "2024-04-20T00:20:00Z"),
        ("c", "2024-04-25T00:00:00Z", "2024-04-25T00:20:00Z"),
    ] {
        w.job("e", j, (from, to), "inference", Some("img"));
    }
    w.flush();
    let alerts: Vec<_> = w
        .limits()
        .into_iter()
        .filter(|l| l.limit == output::LimitKind::Alert)
        .collect();
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    assert_eq!(
        alerts[0].period.to_string(),
        "2024-04",
        "limits count per calendar month"
    );
    assert_eq!(alerts[0].triggered_by_job.as_str(), "b");
    assert_eq!(alerts[0].usage_value, money("1.2"));
    let halves: Vec<String> = w.statements().iter().map(|x| x.period.to_string()).collect();
    assert_eq!(halves, vec![s("2024-04-01/2024-04-16"), s("2024-04-16/2024-05-01")]);
}

#[test]
fn free_and_pro_accounts_stay_monthly_and_an_idle_pro_account_owes_its_fee_once_a_month() {
    let mut w = World::new();
    w.account(r#"{"account_id":"f","plan":"free","effective_from":"2024-01-01T00:00:00Z"}"#);
    w.account(r#"{"account_id":"p","plan":"pro","effective_from":"2024-01-01T00:00:00Z"}"#);
    for (acct, j, from, to) in [
        ("f", "a", "2024-04-10T00:00:00Z", "2024-04-10T00:00:10Z"),
        ("f", "b", "2024-04-20T00:00:00Z", "2024-04-20T00:00:10Z"),
        ("x", "c", "2024-05-20T00:00:00Z", "2024-05-20T00:00:10Z"),
    ] {
        w.job(acct, j, (from, to), "inference", Some("img"));
    }
    w.flush();
    let mut st: Vec<(String, String, Cadence)> = w
        .statements()
        .iter()
        .map(|x| (x.account_id.to_string(), x.period.to_string(), x.cadence))
        .collect();
    st.sort();
    assert_eq!(
        st,
        vec![
            (s("f"), s("2024-04"), Cadence::Monthly),
            (s("p"), s("2024-04"), Cadence::Monthly),
            (s("p"), s("2024-05"), Cadence::Monthly),
            (s("x"), s("2024-05"), Cadence::Monthly),
        ]
    );
}

#[test]
fn an_account_record_can_keep_a_post_paid_account_monthly() {
    let mut w = World::new();
    w.account(r#"{"account_id":"m","plan":"payg","effective_from":"2024-01-01T00:00:00Z","billing_cycle":"monthly"}"#);
    w.job(
        "m",
        "j",
        ("2024-04-15T23:00:00Z", "2024-04-16T01:00:00Z"),
        "inference",
        Some("img"),
    );
    assert_eq!(charged(&w), vec![(s("2024-04"), s("2024-04"), Decimal::from(7200))]);
}

#[test]
fn the_schedule_is_configuration_and_a_bad_one_is_refused_with_every_problem() {
    let c = PlanCatalog::from_toml(
        r#"
[[billing_cycle]]
effective_from = "2024-01-01T00:00:00Z"
payg = "semi_monthly"

[[billing_cycle]]
effective_from = "2024-07-01T00:00:00Z"
"#,
    )
    .expect("a valid schedule");
    let at = |t: &str| c.billing_cycle.cadence_at(Plan::Payg, ts(t));
    assert_eq!(at("2024-06-30T23:59:59.999Z"), Cadence::SemiMonthly);
    assert_eq!(at("2024-07-01T00:00:00Z"), Cadence::Monthly);
    assert_eq!(
        c.billing_cycle.cadence_at(Plan::Enterprise, ts("2024-03-01T00:00:00Z")),
        Cadence::Monthly
    );
    let err = PlanCatalog::from_toml(
        r#"
[[billing_cycle]]
effective_from = "2024-07-01T00:00:00Z"
[[billing_cycle]]
effective_from = "2024-05-01T00:00:00Z"
pro = "semi_monthly"
"#,
    )
    .expect_err("unordered, and pro semi-monthly")
    .to_string();
    assert!(err.contains("billing_cycle[1]: effective_from"), "{err}");
    assert!(err.contains("free and pro are billed monthly"), "{err}");
    let err =
        PlanCatalog::from_toml("[[billing_cycle]]\neffective_from = \"2024-07-01T00:00:00Z\"\npayg = \"weekly\"\n")
            .expect_err("an unknown cadence")
            .to_string();
    assert!(err.contains("weekly"), "{err}");
}

fn ctx_of(w: &World) -> Context<'_> {
    Context::new(&w.rates, &w.plans, &w.book, &w.config)
}

#[test]
fn a_schedule_that_would_move_an_open_period_is_refused_naming_the_account_and_period() {
    let mut w = World::new();
    w.job(
        "acct",
        "j",
        ("2024-04-20T10:00:00Z", "2024-04-20T10:00:10Z"),
        "inference",
        Some("img"),
    );
    assert!(w.meter.schedule_conflicts(&ctx_of(&w)).unwrap().is_empty());
    // Every plan monthly: the open half month would become April.
    w.plans.billing_cycle = CadenceSchedule::monthly();
    let c = w.meter.schedule_conflicts(&ctx_of(&w)).unwrap();
    assert_eq!(c.len(), 1, "{c:?}");
    assert!(
        c[0].starts_with("account acct: open billing period 2024-04-16/2024-05-01 would become 2024-04"),
        "{c:?}"
    );
}

#[test]
fn a_schedule_change_dated_before_stream_time_is_refused_and_a_later_one_accepted() {
    let mut w = World::new();
    w.meter.set_billed_schedule(&CadenceSchedule::default());
    w.begin("other", "j", "2024-04-20T10:00:00Z", "inference", Some("img"));
    let entry = |from: &str, payg: Cadence| CadenceEntry {
        effective_from: ts(from),
        payg,
        enterprise: Cadence::SemiMonthly,
        free: Cadence::Monthly,
        pro: Cadence::Monthly,
    };
    // payg monthly from Apr 10: before stream time (Apr 20), refused.
    w.plans.billing_cycle = CadenceSchedule::new(vec![
        entry("0001-01-01T00:00:00Z", Cadence::SemiMonthly),
        entry("2024-04-10T00:00:00Z", Cadence::Monthly),
    ])
    .expect("schedule");
    let c = w.meter.schedule_conflicts(&ctx_of(&w)).unwrap();
    assert!(
        c.iter().any(|x| x.starts_with("billing_cycle changes at 2024-04-10T00:00:00.000Z, before this partition's stream time 2024-04-20T10:00:00.000Z")),
        "{c:?}"
    );
    // Post-paid plans semi-monthly until June instead of May: the schedules
    // first differ on May 1, after stream time; the open periods stay.
    w.plans.billing_cycle = CadenceSchedule::new(vec![
        entry("0001-01-01T00:00:00Z", Cadence::SemiMonthly),
        CadenceEntry {
            enterprise: Cadence::Monthly,
            ..entry("2024-06-01T00:00:00Z", Cadence::Monthly)
        },
    ])
    .expect("schedule");
    assert_eq!(w.meter.schedule_conflicts(&ctx_of(&w)).unwrap(), Vec::<String>::new());
}

#[test]
fn the_shipped_plan_catalog_writes_out_the_platforms_schedule() {
    let shipped = PlanCatalog::from_toml(include_str!("../../../config/plans.toml")).expect("config/plans.toml");
    assert_eq!(shipped.billing_cycle, CadenceSchedule::default());
    assert_eq!(
        shipped.billing_cycle.first_difference(&CadenceSchedule::default()),
        None
    );
    assert_eq!(
        CadenceSchedule::monthly().first_difference(&CadenceSchedule::default()),
        Some(Timestamp::MIN),
        "monthly-only billing differs from the platform's from the first instant"
    );
}

#[test]
fn the_last_accepted_half_month_is_billed_stored_and_restored() {
    let mut w = World::new();
    w.account(
        r#"{"account_id":"late","plan":"payg","effective_from":"2024-01-01T00:00:00Z","billing_cycle":"semi_monthly"}"#,
    );
    // Event times are accepted until 2100-01-01 (docs/billing.md, *Time
    // bounds*): a job running at the last accepted instant, closed by the
    // flush.
    w.begin("late", "j", "2099-12-28T00:00:00Z", "inference", Some("img"));
    w.beat("late", "j", "2099-12-31T23:59:59.999Z");
    w.flush();
    let c = w.charges();
    assert_eq!(c.len(), 1, "{:?}", w.out);
    assert_eq!(c[0].period.to_string(), "2099-12-16/2100-01-01");
    let st: Vec<Statement> = w.statements().into_iter().cloned().collect();
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].period_end, ts("2100-01-01T00:00:00Z"));
    // Every state record written reads back.
    let records = w.stored();
    assert!(!records.is_empty());
    Meter::restore(records, &w.config).expect("the state restores");
    let json = serde_json::to_string(&st[0]).expect("statement json");
    let back: Statement = serde_json::from_str(&json).expect("reads back");
    assert_eq!(back, st[0]);
}

#[test]
fn a_statement_stored_before_billing_cycles_compares_equal_to_its_reading_now() {
    // As the monthly-only release wrote it: no bounds, no cadence.
    let old = br#"{"account_id":"a","period":"2024-05","plan":"payg","lines":[],"subscription_fee":"0.00","credits_applied":"0","included_usage":"0","total_due":"0.00","currency":"USD"}"#;
    let s: Statement = serde_json::from_slice(old).expect("reads");
    assert_eq!(
        (s.period_start, s.period_end, s.cadence),
        (ts("2024-05-01T00:00:00Z"), ts("2024-06-01T00:00:00Z"), Cadence::Monthly)
    );
    let now = serde_json::to_vec(&s).expect("json");
    assert_ne!(now, old.to_vec());
    assert_eq!(
        values::canonical(state::Table::Closed, old).expect("canonical"),
        values::canonical(state::Table::Closed, &now).expect("canonical"),
        "jobmeter rebuild compares a stored statement by its content"
    );
}
