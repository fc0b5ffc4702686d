//! Rule 14, spend control: burn rate, runway events, `job.stop` commands
//! exactly once per job, and the bound on what is charged after a command.

mod common;
use common::*;
use jobmeter_core::output::{LimitAction, LimitKind};
use jobmeter_core::*;

const FREE_1: &str =
    r#"{"account_id":"f","plan":"free","effective_from":"2024-01-01T00:00:00Z","free_credits":"1.00"}"#;

fn t(secs: i64) -> String {
    Timestamp(1_714_521_600_000 + secs * 1000).to_string() // 2024-05-01T00:00:00Z + secs
}

/// Three llm jobs ($0.002/s each) on $1.00 of credits, heartbeats every
/// 60 s: the third heartbeat round uses the credits up.
fn three_jobs(w: &mut World) {
    w.account(FREE_1);
    for j in ["a", "b", "c"] {
        let e = w.start("f", j, &t(0), "inference", Some("llm"));
        w.apply(&e);
    }
    for at in [60, 120, 180] {
        for j in ["a", "b", "c"] {
            let e = w.heartbeat("f", j, &t(at));
            w.apply(&e);
        }
    }
}

#[test]
fn used_up_credits_stop_every_running_job_once_in_the_step_that_used_them_up() {
    let mut w = World::new().spend_control();
    three_jobs(&mut w);
    let cmds = w.commands();
    let ids: Vec<_> = cmds.iter().map(|c| c.command_id.as_str()).collect();
    assert_eq!(ids, ["f/a/stop", "f/b/stop", "f/c/stop"]);
    for c in &cmds {
        assert_eq!(c.reason, "free_credits_exhausted");
        assert_eq!(c.limit, LimitKind::FreeCredits);
        assert_eq!(
            c.at.to_string(),
            t(180),
            "stream time of the heartbeat that used the credits up"
        );
    }
    // The commands come right after the 100 % threshold of that heartbeat.
    let pos = |f: &dyn Fn(&Output) -> bool| w.out.iter().position(f);
    let block = pos(&|o| matches!(o, Output::Limit(l) if l.threshold_pct == Some(100)));
    let first_cmd = pos(&|o| matches!(o, Output::Command(_)));
    assert!(block.is_some() && block < first_cmd, "{:?}", w.out);

    // Heartbeats, duplicates and stops after that send nothing more.
    for j in ["a", "b", "c"] {
        let e = w.heartbeat("f", j, &t(185));
        w.apply(&e);
    }
    let e = w.stop("f", "a", &t(190), "cancelled");
    w.apply(&e);
    w.apply(&e);
    assert_eq!(w.commands().len(), 3);

    // A job started on the used-up account is stopped at once.
    let e = w.start("f", "d", &t(200), "inference", Some("llm"));
    w.apply(&e);
    let cmds = w.commands();
    assert_eq!(cmds.len(), 4);
    assert_eq!((cmds[3].job_id.as_str(), cmds[3].at.to_string()), ("d", t(200)));
}

#[test]
fn a_job_sent_a_stop_is_charged_to_at_most_the_command_plus_the_grace() {
    let mut w = World::new().spend_control();
    three_jobs(&mut w);
    // a obeys within 10 s; b ignores the command for 15 minutes; c is lost
    // (no stop: the orphan close ends it at its last heartbeat).
    let e = w.stop("f", "a", &t(190), "cancelled");
    w.apply(&e);
    for at in (240..=1080).step_by(60) {
        let e = w.heartbeat("f", "b", &t(at));
        w.apply(&e);
    }
    let e = w.stop("f", "b", &t(1100), "succeeded");
    w.apply(&e);
    w.flush();
    let secs = |job: &str| -> Vec<String> {
        w.charges()
            .iter()
            .filter(|c| c.job() == job)
            .map(|c| format!("{} {}", c.billable_seconds, c.stopped_at))
            .collect()
    };
    assert_eq!(
        secs("a"),
        [format!("190 {}", t(190))],
        "stopped before the grace ran out"
    );
    assert_eq!(secs("b"), [format!("210 {}", t(210))], "charged to the command + 30 s");
    assert_eq!(secs("c"), [format!("180 {}", t(180))], "orphaned at its last heartbeat");
    // The overshoot past the credits stays inside the documented bound:
    // per job, rate × (heartbeat interval + grace + 1 s).
    let charged: Money = w.charges().iter().map(|c| c.amount).sum();
    let overshoot = charged - money("1.00");
    let bound = money("0.002") * rust_decimal::Decimal::from(3 * (60 + 30 + 1));
    assert!(overshoot > Money::ZERO && overshoot <= bound, "{overshoot} > {bound}");
    assert_eq!(charged, money("1.160"));
}

#[test]
fn runway_fires_once_per_limit_period_and_horizon() {
    let mut w = World::new().spend_control();
    w.config.runway_horizons_ms = vec![600_000, 60_000];
    w.account(FREE_1);
    // One job: $1.00 / $0.002/s = 500 s of runway, below 10 minutes.
    let e = w.start("f", "a", &t(0), "inference", Some("llm"));
    w.apply(&e);
    // A second: 250 s; the 10-minute warning does not repeat.
    let e = w.start("f", "b", &t(10), "inference", Some("llm"));
    w.apply(&e);
    let runway: Vec<_> = w.limits().into_iter().filter(|l| l.horizon_seconds.is_some()).collect();
    assert_eq!(runway.len(), 1);
    let r = runway[0];
    assert_eq!(r.event_id, "f/free_credits/lifetime/runway-600s");
    assert_eq!(r.runway_seconds.map(|d| d.to_string()), Some("500.000".into()));
    assert_eq!(r.burn_rate_per_second, Some(money("0.002")));
    assert_eq!((r.threshold_pct, r.action), (None, LimitAction::Notify));
    // At 210 s a has used $0.42 and b $0.40: $0.18 left at $0.004/s is 45 s.
    for j in ["a", "b"] {
        let e = w.heartbeat("f", j, &t(210));
        w.apply(&e);
    }
    let runway: Vec<_> = w.limits().into_iter().filter(|l| l.horizon_seconds.is_some()).collect();
    assert_eq!(runway.len(), 2);
    assert_eq!(runway[1].event_id, "f/free_credits/lifetime/runway-60s");
    assert_eq!(runway[1].runway_seconds.map(|d| d.to_string()), Some("45.000".into()));
}

#[test]
fn pro_caps_notify_by_default_and_stop_only_the_capped_kind_when_told_to() {
    for policy in [Policy::Notify, Policy::Stop] {
        let mut w = World::new().spend_control();
        w.plans.pro_on_cap = policy;
        w.account(r#"{"account_id":"p","plan":"pro","effective_from":"2024-01-01T00:00:00Z","usage_cap":"0.10"}"#);
        for (j, kind, model) in [("i", "inference", Some("llm")), ("t", "fine_tune", None)] {
            let e = w.start("p", j, &t(0), kind, model);
            w.apply(&e);
        }
        for j in ["i", "t"] {
            let e = w.heartbeat("p", j, &t(60));
            w.apply(&e);
        }
        let cap = w.limits().into_iter().find(|l| l.threshold_pct == Some(100)).cloned();
        assert_eq!(
            cap.map(|l| (l.limit, l.action)),
            Some((LimitKind::ModelApiCap, LimitAction::UpgradeToEnterprise))
        );
        let stopped: Vec<_> = w.commands().iter().map(|c| c.job_id.to_string()).collect();
        match policy {
            Policy::Notify => assert!(stopped.is_empty()),
            Policy::Stop => assert_eq!(stopped, ["i"], "fine-tuning is not under the cap"),
        }
    }
}

#[test]
fn a_spend_limit_counts_what_is_due_and_stops_at_it() {
    let mut w = World::new().spend_control();
    // Pay-as-you-go: everything is due. $0.50 a month.
    w.account(r#"{"account_id":"g","plan":"payg","effective_from":"2024-01-01T00:00:00Z","spend_limit":"0.50"}"#);
    // Pro with $0.10 included: the included part does not count.
    w.account(r#"{"account_id":"p","plan":"pro","effective_from":"2024-01-01T00:00:00Z","usage_cap":"0.10","spend_limit":"0.50"}"#);
    for a in ["g", "p"] {
        let e = w.start(a, "j", &t(0), "inference", Some("llm"));
        w.apply(&e);
        for at in [100, 200, 300] {
            let e = w.heartbeat(a, "j", &t(at));
            w.apply(&e);
        }
    }
    // g: $0.60 due at 300 s (over $0.50); p: $0.60 − $0.10 included = $0.50.
    let cmds: Vec<_> = w
        .commands()
        .iter()
        .map(|c| (c.account_id.to_string(), c.reason.clone()))
        .collect();
    assert_eq!(
        cmds,
        [
            ("g".to_owned(), "spend_limit_reached".to_owned()),
            ("p".to_owned(), "spend_limit_reached".to_owned())
        ]
    );
    let at_limit: Vec<_> = w
        .limits()
        .into_iter()
        .filter(|l| l.limit == LimitKind::SpendLimit && l.threshold_pct == Some(100))
        .map(|l| (l.account_id.to_string(), l.usage_value, l.action))
        .collect();
    assert_eq!(
        at_limit,
        [
            ("g".to_owned(), money("0.600"), LimitAction::Block),
            ("p".to_owned(), money("0.500"), LimitAction::Block)
        ]
    );
    // At the stop, the spend counter holds exactly the charges' amount due.
    for a in ["g", "p"] {
        let e = w.stop(a, "j", &t(310), "cancelled");
        w.apply(&e);
    }
    let due: Vec<_> = w.charges().iter().map(|c| c.amount_due.to_string()).collect();
    assert_eq!(due, ["0.620", "0.520"]);
}

#[test]
fn commands_and_the_charge_bound_survive_a_restore() {
    let mut w = World::new().spend_control();
    three_jobs(&mut w);
    assert_eq!(w.commands().len(), 3);
    // Restart: the meter is rebuilt from its stored records.
    let records: Vec<_> = w
        .meter
        .snapshot()
        .expect("encode")
        .into_iter()
        .map(|c| (c.table, c.key, c.value.unwrap_or_default()))
        .collect();
    w.meter = Meter::restore(records, &w.config).expect("restore");
    let before = w.out.len();
    for j in ["a", "b", "c"] {
        let e = w.heartbeat("f", j, &t(240));
        w.apply(&e);
    }
    let e = w.stop("f", "b", &t(900), "succeeded");
    w.apply(&e);
    let after: Vec<_> = w.out[before..].iter().collect();
    assert!(
        !after.iter().any(|o| matches!(o, Output::Command(_))),
        "no command is sent twice after a restore: {after:?}"
    );
    let b = w.charges().into_iter().find(|c| c.job() == "b").cloned();
    assert_eq!(b.map(|c| c.billable_seconds.to_string()), Some("210".into()));
}
