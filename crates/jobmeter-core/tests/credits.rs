//! Credit grants (§4b `credit_grant`, `credit_void`): credits cover what
//! is due after the plan's own inclusion, the grant expiring soonest first,
//! exact to the second at an expiry; spend control counts them.

mod common;
use common::*;
use jobmeter_core::*;

fn grant(id: &str, acct: &str, amount: &str, extra: &str) -> String {
    format!(
        r#"{{"adjustment_id":"{id}","account_id":"{acct}","type":"credit_grant","amount":"{amount}","reason":"outage goodwill","requested_by":"support@platform"{extra}}}"#
    )
}

fn void(id: &str, acct: &str, grant: &str) -> String {
    format!(
        r#"{{"adjustment_id":"{id}","account_id":"{acct}","type":"credit_void","voids":"{grant}","reason":"granted by mistake","requested_by":"support@platform"}}"#
    )
}

fn due_of(w: &World, id: &str) -> (Money, Money) {
    let c = w.charge(id);
    (c.amount, c.amount_due)
}

const FREE: &str = r#"{"account_id":"f","plan":"free","effective_from":"2024-01-01T00:00:00Z","free_credits":"1.00"}"#;

#[test]
fn grants_cover_what_is_due_after_free_credits_soonest_expiring_first() {
    let mut w = World::new();
    w.account(FREE);
    w.adjustment(&grant("late", "f", "0.30", r#","expires_at":"2024-12-31T00:00:00Z""#));
    w.adjustment(&grant("soon", "f", "0.10", r#","expires_at":"2024-08-01T00:00:00Z""#));
    w.adjustment(&grant("never", "f", "5.00", ""));
    // 1,200 s of fine-tune: $1.20, $1.00 of it from the free credits; the
    // $0.20 due is drawn from "soon" ($0.10) then "late" ($0.10).
    w.job(
        "f",
        "a",
        ("2024-07-01T10:00:00Z", "2024-07-01T10:20:00Z"),
        "fine_tune",
        None,
    );
    assert_eq!(due_of(&w, "f/a/2024-07"), (money("1.200"), money("0.000")));
    // $0.60 more: "late" has $0.20 left, then "never" gives $0.40.
    w.job(
        "f",
        "b",
        ("2024-07-01T11:00:00Z", "2024-07-01T11:10:00Z"),
        "fine_tune",
        None,
    );
    assert_eq!(due_of(&w, "f/b/2024-07"), (money("0.600"), money("0.000")));
    // July's statement counts every credit applied.
    w.begin("f", "aug", "2024-08-03T00:00:00Z", "inference", Some("img"));
    let july = w.closed("2024-07");
    assert_eq!(july.credits_applied, money("1.800"));
    assert_eq!(july.total_due, money("0.00"));
    let per_grant: Vec<(&str, Money, Money)> = july
        .credit_grants
        .iter()
        .map(|g| (g.adjustment_id.as_str(), g.applied, g.remaining))
        .collect();
    assert_eq!(
        per_grant,
        vec![
            ("late", money("0.30"), money("0")),
            ("never", money("0.40"), money("4.60")),
            ("soon", money("0.10"), money("0")),
        ]
    );
    assert_eq!(july.credit_balance, money("4.60"));
}

#[test]
fn an_expiry_inside_a_job_cuts_it_there_to_the_second() {
    let mut w = World::new();
    w.adjustment(&grant("g", "a", "100", r#","expires_at":"2024-07-01T10:00:30Z""#));
    // A minute of llm at $0.002/s: 30 s covered, 30 s not.
    w.job(
        "a",
        "j",
        ("2024-07-01T10:00:00Z", "2024-07-01T10:01:00Z"),
        "inference",
        Some("llm"),
    );
    assert_eq!(due_of(&w, "a/j/2024-07"), (money("0.060"), money("0.000")));
    assert_eq!(
        due_of(&w, "a/j/2024-07@2024-07-01T10:00:30.000Z"),
        (money("0.060"), money("0.060"))
    );
}

#[test]
fn a_selector_limits_what_a_grant_covers() {
    let mut w = World::new();
    w.adjustment(&grant("ft", "a", "100", r#","selector":{"kind":"fine_tune"}"#));
    w.job(
        "a",
        "i",
        ("2024-07-01T10:00:00Z", "2024-07-01T10:00:10Z"),
        "inference",
        Some("img"),
    );
    w.job(
        "a",
        "t",
        ("2024-07-01T10:01:00Z", "2024-07-01T10:01:10Z"),
        "fine_tune",
        None,
    );
    assert_eq!(due_of(&w, "a/i/2024-07").1, money("0.0040"));
    assert_eq!(due_of(&w, "a/t/2024-07").1, money("0.000"));
}

#[test]
fn a_void_ends_the_remainder_from_then_on() {
    let mut w = World::new();
    w.adjustment(&grant("g", "a", "0.05", ""));
    w.job(
        "a",
        "j",
        ("2024-07-01T10:00:00Z", "2024-07-01T10:00:10Z"),
        "inference",
        Some("llm"),
    );
    assert_eq!(due_of(&w, "a/j/2024-07"), (money("0.020"), money("0.000")));
    w.adjustment(&void("v", "a", "g"));
    w.job(
        "a",
        "k",
        ("2024-07-01T10:01:00Z", "2024-07-01T10:01:10Z"),
        "inference",
        Some("llm"),
    );
    assert_eq!(
        due_of(&w, "a/k/2024-07").1,
        money("0.020"),
        "nothing left after the void"
    );
    // Voiding it again, or voiding what is no grant, is refused.
    w.adjustment(&void("v2", "a", "g"));
    w.adjustment(&void("v3", "a", "nothing"));
    assert_eq!(
        w.rejects(),
        vec![RejectReason::InvalidValue, RejectReason::InvalidValue]
    );
}

#[test]
fn a_refund_gives_back_what_a_charge_drew_from_a_grant() {
    let mut w = World::new();
    w.adjustment(&grant("g", "a", "0.02", ""));
    w.job(
        "a",
        "j",
        ("2024-07-01T10:00:00Z", "2024-07-01T10:00:10Z"),
        "inference",
        Some("llm"),
    );
    assert_eq!(due_of(&w, "a/j/2024-07"), (money("0.020"), money("0.000")));
    w.adjustment(
        r#"{"adjustment_id":"r","account_id":"a","type":"job_refund","job_id":"j","reason":"hung","requested_by":"s"}"#,
    );
    assert_eq!(due_of(&w, "a/j/2024-07/refund/r"), (money("-0.020"), money("0.000")));
    // The grant has its $0.02 again.
    w.job(
        "a",
        "k",
        ("2024-07-01T10:01:00Z", "2024-07-01T10:01:10Z"),
        "inference",
        Some("llm"),
    );
    assert_eq!(due_of(&w, "a/k/2024-07").1, money("0.000"));
}

#[test]
fn a_grant_unblocks_a_free_account_whose_credits_ran_out() {
    let mut w = World::new().spend_control();
    w.account(FREE);
    // $1.00 of credits used up by a running fine-tune: it is told to stop.
    w.begin("f", "long", "2024-07-01T10:00:00Z", "fine_tune", None);
    w.beat("f", "long", "2024-07-01T10:17:00Z");
    assert_eq!(w.commands().len(), 1, "credits used up: job.stop");
    w.end("f", "long", "2024-07-01T10:17:30Z", "succeeded");
    // Support grants $5: a new job runs without being stopped.
    w.adjustment(&grant("g", "f", "5.00", ""));
    w.begin("f", "next", "2024-07-01T11:00:00Z", "fine_tune", None);
    w.beat("f", "next", "2024-07-01T11:05:00Z");
    w.end("f", "next", "2024-07-01T11:10:00Z", "succeeded");
    assert_eq!(w.commands().len(), 1, "no job.stop after the grant");
    assert_eq!(due_of(&w, "f/next/2024-07"), (money("0.600"), money("0.000")));
    // The grant has $4.40 left: a fine-tune heartbeating every 30 s is told
    // to stop once what it runs beyond the credits reaches it, and is
    // charged at most rate × (interval + grace + 1 s) beyond the grant.
    w.begin("f", "big", "2024-07-01T12:00:00Z", "fine_tune", None);
    let start = ts("2024-07-01T12:00:00Z").0;
    let mut t = start;
    while w.commands().len() == 1 && t < start + 10_000_000 {
        t += 30_000;
        w.beat("f", "big", &Timestamp(t).to_string());
    }
    assert_eq!(w.commands().len(), 2, "stopped again when the grant ran out");
    w.end("f", "big", &Timestamp(t + 120_000).to_string(), "cancelled");
    let (amount, due) = due_of(&w, "f/big/2024-07");
    assert!(
        due > money("0") && due <= money("0.061"),
        "beyond the grant: {due} of {amount}"
    );
    assert_eq!(amount - due, money("4.400"), "the grant's remainder, all of it");
    // Without the grant the same job would have been stopped at once.
    let mut without = World::new().spend_control();
    without.account(FREE);
    without.begin("f", "long", "2024-07-01T10:00:00Z", "fine_tune", None);
    without.beat("f", "long", "2024-07-01T10:17:00Z");
    without.end("f", "long", "2024-07-01T10:17:30Z", "succeeded");
    without.begin("f", "next", "2024-07-01T11:00:00Z", "fine_tune", None);
    assert_eq!(without.commands().len(), 2);
}

#[test]
fn grant_records_are_checked() {
    let mut w = World::new();
    for bad in [
        grant("neg", "a", "-1", ""),
        grant("zero", "a", "0", ""),
        grant("big", "a", "1000001", ""),
        grant("when", "a", "1", r#","expires_at":"soon""#),
        grant("sel", "a", "1", r#","selector":{"model":"nope"}"#),
        void("v", "a", "").replace(r#""voids":"","#, ""),
        grant(
            "gone",
            "a",
            "1",
            r#","created_at":"2024-07-02T00:00:00Z","expires_at":"2024-07-01T00:00:00Z""#,
        ),
        grant("tiny", "a", "0.0000000000001", ""),
    ] {
        w.adjustment(&bad);
    }
    // Applied after its expiry (stream time is past it): refused.
    w.job(
        "a",
        "j",
        ("2024-07-01T10:00:00Z", "2024-07-01T10:00:10Z"),
        "inference",
        Some("img"),
    );
    w.adjustment(&grant("late", "a", "1", r#","expires_at":"2024-07-01T09:00:00Z""#));
    assert_eq!(
        w.rejects(),
        vec![
            RejectReason::InvalidValue,
            RejectReason::InvalidValue,
            RejectReason::InvalidValue,
            RejectReason::SchemaViolation,
            RejectReason::UnknownModel,
            RejectReason::SchemaViolation,
            RejectReason::InvalidValue,
            RejectReason::InvalidValue,
            RejectReason::InvalidValue,
        ]
    );
    assert_eq!(due_of(&w, "a/j/2024-07").1, money("0.0040"), "no grant applied");
}

#[test]
fn a_credit_note_larger_than_the_period_leaves_a_credit_balance_on_the_statement() {
    let mut w = World::new();
    w.job(
        "a",
        "j",
        ("2024-07-01T10:00:00Z", "2024-07-01T10:00:10Z"),
        "inference",
        Some("img"),
    );
    w.adjustment(
        r#"{"adjustment_id":"note","account_id":"a","type":"manual_charge","amount":"-50","description":"SLA credit","reason":"outage","requested_by":"s"}"#,
    );
    w.begin("a", "aug", "2024-08-03T00:00:00Z", "inference", Some("img"));
    let july = w.closed("2024-07");
    // $0.004 of usage less $50: the account is owed $50.00 (rounded once).
    assert_eq!(july.total_due, money("-50.00"));
}

#[test]
fn two_grants_and_a_cap_on_one_charge() {
    let mut w = World::new();
    w.account(r#"{"account_id":"p","plan":"pro","effective_from":"2024-01-01T00:00:00Z","usage_cap":"0.50"}"#);
    w.adjustment(&grant("a1", "p", "0.10", r#","expires_at":"2024-09-01T00:00:00Z""#));
    w.adjustment(&grant("a2", "p", "1.00", ""));
    // 500 s of llm: $1.00; the cap includes $0.50; $0.10 then $0.40 from
    // the grants; nothing due.
    w.job(
        "p",
        "j",
        ("2024-07-01T10:00:00Z", "2024-07-01T10:08:20Z"),
        "inference",
        Some("llm"),
    );
    assert_eq!(due_of(&w, "p/j/2024-07"), (money("1.000"), money("0.000")));
    w.begin("p", "aug", "2024-08-03T00:00:00Z", "inference", Some("img"));
    let july = w.closed("2024-07");
    assert_eq!(july.included_usage, money("0.50"));
    assert_eq!(july.credits_applied, money("0.50"));
    let applied: Vec<(&str, Money)> = july
        .credit_grants
        .iter()
        .map(|g| (g.adjustment_id.as_str(), g.applied))
        .collect();
    assert_eq!(applied, vec![("a1", money("0.10")), ("a2", money("0.40"))]);
}
