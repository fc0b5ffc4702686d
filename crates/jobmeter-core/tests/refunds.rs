//! Job refunds (§4b `job_refund`): every charge of a job is reversed
//! exactly — negated seconds, amount and amount due, `adjusts` naming each
//! original — booked in the open period, once. Manual charges and credit
//! notes (`manual_charge`): one charge of kind `adjustment`, all of it due.

mod common;
use common::*;
use jobmeter_core::*;
use rust_decimal::Decimal;

fn refund(id: &str, acct: &str, job: &str, extra: &str) -> String {
    format!(
        r#"{{"adjustment_id":"{id}","account_id":"{acct}","type":"job_refund","job_id":"{job}","reason":"the worker hung","requested_by":"support@platform"{extra}}}"#
    )
}

fn by_id<'w>(w: &'w World, id: &str) -> &'w Charge {
    w.charge(id)
}

#[test]
fn a_refund_reverses_every_charge_of_a_job_exactly() {
    let mut w = World::new();
    // Across the month: one charge in June, one in July.
    w.job(
        "a",
        "j",
        ("2024-06-30T23:59:00Z", "2024-07-01T00:01:00.400Z"),
        "fine_tune",
        None,
    );
    w.job(
        "a",
        "k",
        ("2024-07-01T00:02:00Z", "2024-07-01T00:03:00Z"),
        "inference",
        Some("img"),
    );
    let originals: Vec<Charge> = w.charges().into_iter().filter(|c| c.job() == "j").cloned().collect();
    assert_eq!(originals.len(), 2);
    w.adjustment(&refund("r-1", "a", "j", ""));
    for o in &originals {
        let r = by_id(&w, &format!("{}/refund/r-1", o.charge_id));
        assert_eq!(r.amount, Money(-o.amount.0));
        assert_eq!(r.amount_due, Money(-o.amount_due.0));
        assert_eq!(r.billable_seconds, -o.billable_seconds);
        assert_eq!(r.duration_ms, -o.duration_ms);
        assert_eq!(r.rate_per_second, o.rate_per_second);
        assert_eq!(r.adjusts.as_deref(), Some(o.charge_id.as_str()));
        assert_eq!(r.adjustment_id.as_deref(), Some("r-1"));
        assert_eq!(r.service_period, o.service_period);
    }
    // The job nets to nothing; the other job is untouched.
    let net: Decimal = w.charges().iter().filter(|c| c.job() == "j").map(|c| c.amount.0).sum();
    assert!(net.is_zero(), "{net}");
    // The July statement shows the refund, with its reason and amount.
    w.begin("a", "late", "2024-08-03T00:00:00Z", "inference", Some("img"));
    let july = w.closed("2024-07");
    let adj = july
        .adjustments
        .iter()
        .find(|x| x.adjustment_id == "r-1")
        .expect("refund on the statement");
    assert_eq!(adj.kind, "job_refund");
    assert_eq!(adj.reason, "the worker hung");
    // June was still open (its grace runs): its part's reversal is booked
    // there; July's here.
    let july_part = originals
        .iter()
        .find(|o| o.service_period.to_string() == "2024-07")
        .expect("July part");
    assert_eq!(adj.amount, Money(-july_part.amount.0));
    assert_eq!(
        by_id(&w, &format!("{}/refund/r-1", originals[0].charge_id))
            .period
            .to_string(),
        "2024-06"
    );
    // Lines net the job out: what remains is job k.
    let k = by_id(&w, "a/k/2024-07").amount;
    let lines: Decimal = july.lines.iter().map(|l| l.amount.0).sum();
    assert_eq!(lines, k.0);
}

#[test]
fn a_refund_in_a_closed_period_is_booked_in_the_open_one() {
    let mut w = World::new();
    w.job(
        "a",
        "j",
        ("2024-06-20T10:00:00Z", "2024-06-20T10:10:00Z"),
        "inference",
        Some("llm"),
    );
    // July is under way (June closed after its grace).
    w.job(
        "a",
        "m",
        ("2024-07-10T10:00:00Z", "2024-07-10T10:00:10Z"),
        "inference",
        Some("img"),
    );
    let june = w.closed("2024-06");
    w.adjustment(&refund("r", "a", "j", ""));
    let r = by_id(&w, "a/j/2024-06/refund/r");
    assert_eq!(r.period.to_string(), "2024-07");
    assert_eq!(r.service_period.to_string(), "2024-06");
    // June's statement was final and is not emitted again.
    let junes = w
        .statements()
        .into_iter()
        .filter(|s| s.period.to_string() == "2024-06")
        .count();
    assert_eq!(junes, 1);
    assert!(june.adjustments.is_empty());
}

#[test]
fn free_credits_come_back_and_amount_due_is_reversed_as_charged() {
    let mut w = World::new();
    w.account(r#"{"account_id":"f","plan":"free","effective_from":"2024-01-01T00:00:00Z","free_credits":"1.00"}"#);
    // 1,200 s of fine-tune at $0.001 = $1.20: $1.00 from credits, $0.20 due.
    w.job(
        "f",
        "big",
        ("2024-05-01T10:00:00Z", "2024-05-01T10:20:00Z"),
        "fine_tune",
        None,
    );
    let c = by_id(&w, "f/big/2024-05").clone();
    assert_eq!((c.amount, c.amount_due), (money("1.200"), money("0.200")));
    w.adjustment(&refund("r", "f", "big", ""));
    let r = by_id(&w, "f/big/2024-05/refund/r");
    assert_eq!((r.amount, r.amount_due), (money("-1.200"), money("-0.200")));
    // The credits are back: the next $0.60 is covered in full.
    w.job(
        "f",
        "next",
        ("2024-05-01T11:00:00Z", "2024-05-01T11:10:00Z"),
        "fine_tune",
        None,
    );
    let n = by_id(&w, "f/next/2024-05");
    assert_eq!((n.amount, n.amount_due), (money("0.600"), money("0.000")));
}

#[test]
fn refusals_unknown_job_twice_and_nothing_charged_yet() {
    let mut w = World::new();
    w.job(
        "a",
        "done",
        ("2024-05-01T10:00:00Z", "2024-05-01T10:00:10Z"),
        "inference",
        Some("img"),
    );
    w.begin("a", "running", "2024-05-01T10:01:00Z", "inference", Some("img"));
    w.adjustment(&refund("r1", "a", "nope", ""));
    w.adjustment(&refund("r2", "b", "done", ""));
    w.adjustment(&refund("r3", "a", "running", ""));
    w.adjustment(&refund("r4", "a", "done", ""));
    w.adjustment(&refund("r5", "a", "done", ""));
    w.adjustment(&refund("r4", "a", "done", ""));
    w.adjustment(&refund("r6", "a", "done", r#","through_end":"yes""#));
    assert_eq!(
        w.rejects(),
        vec![
            RejectReason::UnknownJob,
            RejectReason::UnknownJob,
            RejectReason::InvalidValue,
            RejectReason::InvalidValue,
            RejectReason::SchemaViolation,
        ],
        "unknown job twice (other account's job too), running without through_end, refunded already (r5); r4 again is a duplicate"
    );
    let refunds = w.charges().iter().filter(|c| c.charge_id.contains("/refund/")).count();
    assert_eq!(refunds, 1);
}

#[test]
fn through_end_refunds_a_running_job_when_it_is_charged_and_after() {
    let mut w = World::new();
    w.begin("a", "run", "2024-05-01T10:00:00Z", "inference", Some("img"));
    w.adjustment(&refund("r", "a", "run", r#","through_end":true"#));
    assert!(w.rejects().is_empty());
    w.end("a", "run", "2024-05-01T10:01:40Z", "succeeded");
    let c = by_id(&w, "a/run/2024-05").clone();
    let r = by_id(&w, "a/run/2024-05/refund/r");
    assert_eq!(r.amount, Money(-c.amount.0));
    let net: Decimal = w.charges().iter().map(|c| c.amount.0).sum();
    assert!(net.is_zero());
}

#[test]
fn without_through_end_a_late_stop_after_a_refund_is_charged() {
    let mut w = World::new();
    // Orphaned after 10 min without heartbeat, charged; refunded; then the
    // real stop arrives and adjusts the orphan charge: not refunded.
    w.begin("a", "o", "2024-05-01T10:00:00Z", "inference", Some("img"));
    w.beat("a", "o", "2024-05-01T10:00:30Z");
    w.job(
        "a",
        "other",
        ("2024-05-01T10:30:00Z", "2024-05-01T10:30:01Z"),
        "inference",
        Some("img"),
    );
    assert!(
        w.charges().iter().any(|c| c.charge_id == "a/o/2024-05"),
        "orphan charged"
    );
    w.adjustment(&refund("r", "a", "o", ""));
    w.end("a", "o", "2024-05-01T10:00:50Z", "succeeded");
    let later: Vec<&Charge> = w
        .charges()
        .into_iter()
        .filter(|c| c.job() == "o" && c.charge_id.ends_with("/adj"))
        .collect();
    assert_eq!(later.len(), 1, "the late stop adjusts the orphan charge");
    assert!(!w.charges().iter().any(|c| c.charge_id.ends_with("/adj/refund/r")));
}

#[test]
fn an_override_does_not_re_rate_a_refunded_job() {
    let mut w = World::new();
    w.job(
        "a",
        "j",
        ("2024-05-01T10:00:00Z", "2024-05-01T10:01:00Z"),
        "inference",
        Some("img"),
    );
    w.adjustment(&refund("r", "a", "j", ""));
    let before = w.charges().len();
    w.adjustment(
        r#"{"adjustment_id":"half","account_id":"a","type":"price_override","reason":"r","requested_by":"s","multiplier":"0.5","effective_from":"2024-05-01T00:00:00Z"}"#,
    );
    assert_eq!(w.charges().len(), before, "nothing to re-rate: the job was refunded");
}

#[test]
fn what_a_refund_needs_is_restored_with_the_state() {
    let mut w = World::new();
    w.job(
        "a",
        "done",
        ("2024-07-01T10:00:00Z", "2024-07-01T10:00:10Z"),
        "inference",
        Some("img"),
    );
    w.job(
        "a",
        "twice",
        ("2024-07-01T10:01:00Z", "2024-07-01T10:01:10Z"),
        "inference",
        Some("img"),
    );
    w.begin("a", "run", "2024-07-01T10:02:00Z", "inference", Some("img"));
    w.adjustment(&refund("r-twice", "a", "twice", ""));
    w.adjustment(&refund("r-run", "a", "run", r#","through_end":true"#));
    let mut all = w.stored();
    all.sort_by(|x, y| (x.0 as u8, &x.1).cmp(&(y.0 as u8, &y.1)));
    all.dedup_by(|x, y| x.0 == y.0 && x.1 == y.1);
    w.meter = Meter::restore(all, &w.config).expect("restore");
    w.out.clear();
    // The ledger came back: `done` is refunded exactly; `twice` is refunded
    // already; `run` is refunded as soon as it is charged.
    w.adjustment(&refund("r-done", "a", "done", ""));
    w.adjustment(&refund("r-again", "a", "twice", ""));
    w.end("a", "run", "2024-07-01T10:03:00Z", "succeeded");
    assert_eq!(w.rejects(), vec![RejectReason::InvalidValue]);
    let done = w
        .charges()
        .iter()
        .find(|c| c.charge_id == "a/done/2024-07/refund/r-done")
        .map(|c| c.amount);
    assert_eq!(done, Some(money("-0.004")), "10 s at the July rate, reversed");
    let run: Decimal = w
        .charges()
        .iter()
        .filter(|c| c.job() == "run")
        .map(|c| c.amount.0)
        .sum();
    assert!(run.is_zero());
    assert_eq!(w.charges().iter().filter(|c| c.job() == "run").count(), 2);
}

fn manual(id: &str, acct: &str, amount: &str) -> String {
    format!(
        r#"{{"adjustment_id":"{id}","account_id":"{acct}","type":"manual_charge","amount":"{amount}","description":"onboarding","reason":"agreed in the contract","requested_by":"support@platform","created_at":"2024-07-01T09:00:00Z"}}"#
    )
}

#[test]
fn a_manual_charge_and_a_credit_note_are_due_in_full_on_the_open_statement() {
    let mut w = World::new();
    w.account(r#"{"account_id":"f","plan":"free","effective_from":"2024-01-01T00:00:00Z","free_credits":"100.00"}"#);
    w.job(
        "f",
        "j",
        ("2024-07-01T10:00:00Z", "2024-07-01T10:00:10Z"),
        "inference",
        Some("img"),
    );
    w.adjustment(&manual("fee", "f", "25.00"));
    w.adjustment(&manual("note", "f", "-10.50"));
    let fee = by_id(&w, "f/adjustment/fee").clone();
    assert_eq!(fee.kind, ChargeKind::Adjustment);
    assert_eq!(
        (fee.amount, fee.amount_due),
        (money("25.00"), money("25.00")),
        "free credits do not cover a fee"
    );
    assert_eq!(fee.period.to_string(), "2024-07");
    let json = serde_json::to_value(&fee).expect("json");
    assert_eq!(json["kind"], "adjustment");
    assert!(json["job_id"].is_null() && json["status"].is_null() && json["rate_card_version"].is_null());
    assert_eq!(json["adjustment_id"], "fee");
    let note = by_id(&w, "f/adjustment/note");
    assert_eq!(note.amount_due, money("-10.50"));
    // July closes: the fee and the note are on it, and in its total.
    w.begin("f", "aug", "2024-08-03T00:00:00Z", "inference", Some("img"));
    let july = w.closed("2024-07");
    let kinds: Vec<(&str, &str, Money)> = july
        .adjustments
        .iter()
        .map(|a| (a.adjustment_id.as_str(), a.kind.as_str(), a.amount))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("fee", "manual_charge", money("25.00")),
            ("note", "manual_charge", money("-10.50"))
        ]
    );
    assert_eq!(july.total_due, money("14.50"), "the usage itself is on free credits");
    assert_eq!(july.lines.len(), 1, "the one job's line: a fee is no usage");
}

#[test]
fn manual_charges_are_checked_and_applied_once() {
    let mut w = World::new();
    w.job(
        "a",
        "j",
        ("2024-07-01T10:00:00Z", "2024-07-01T10:00:10Z"),
        "inference",
        Some("img"),
    );
    for bad in [
        manual("z", "a", "0"),
        manual("big", "a", "1000000.01"),
        manual("fine", "a", "0.0000000000001"),
        manual("nan", "a", "ten"),
        manual("nodesc", "a", "5").replace(r#""description":"onboarding","#, ""),
    ] {
        w.adjustment(&bad);
    }
    w.adjustment(&manual("ok", "a", "1000000"));
    w.adjustment(&manual("ok", "a", "1000000"));
    w.adjustment(&manual("ok", "a", "5"));
    assert_eq!(
        w.rejects(),
        vec![
            RejectReason::InvalidValue,
            RejectReason::InvalidValue,
            RejectReason::InvalidValue,
            RejectReason::InvalidValue,
            RejectReason::SchemaViolation,
            RejectReason::Conflict,
        ]
    );
    assert_eq!(
        w.charges().iter().filter(|c| c.kind == ChargeKind::Adjustment).count(),
        1
    );
}
