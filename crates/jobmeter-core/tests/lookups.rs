//! A fact the meter does not hold and cannot read is an error of the
//! event that needed it, never "no records": an account whose records
//! cannot be read is not billed as pay-as-you-go, and an archive that
//! cannot be read is not taken for an empty one.

mod common;

use common::World;
use jobmeter_core::archive::{ArchiveError, JobArchive};
use jobmeter_core::event::EventKey;
use jobmeter_core::state::{Job, JobKey};
use jobmeter_core::*;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// An account table whose reads of some accounts fail.
#[derive(Debug)]
struct Flaky {
    book: AccountBook,
    broken: Mutex<BTreeSet<String>>,
    corrupt: bool,
}

impl Flaky {
    fn new(book: AccountBook) -> Flaky {
        Flaky {
            book,
            broken: Mutex::default(),
            corrupt: false,
        }
    }

    fn break_reads_of(&self, account: &str) {
        self.broken.lock().expect("test setup").insert(account.to_owned());
    }

    fn heal(&self) {
        self.broken.lock().expect("test setup").clear();
    }
}

impl Accounts for Flaky {
    fn records_of(&self, account: &AccountId) -> Result<Arc<[AccountRecord]>, LookupError> {
        if self.broken.lock().expect("test setup").contains(account.as_str()) {
            return Err(LookupError {
                account: account.clone(),
                reason: "read failed".into(),
                corrupt: self.corrupt,
            });
        }
        self.book.as_accounts().records_of(account)
    }

    fn has_intro_price(&self, account: &AccountId) -> bool {
        self.book.as_accounts().has_intro_price(account)
    }

    fn pro_accounts(&self, keep: &dyn Fn(&AccountId) -> bool) -> Vec<AccountId> {
        self.book.as_accounts().pro_accounts(keep)
    }
}

const PRO: &str = r#"{"account_id":"p","plan":"pro","effective_from":"2024-01-01T00:00:00Z"}"#;

fn charges(out: &[Output]) -> Vec<&Charge> {
    out.iter()
        .filter_map(|o| match o {
            Output::Charge(c) => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn a_charge_whose_account_cannot_be_read_is_an_error_not_a_payg_charge() {
    let mut w = World::new();
    w.account(PRO);
    let (start, stop) = (
        w.start("p", "j", "2024-05-01T00:00:00Z", "inference", Some("llm")),
        w.stop("p", "j", "2024-05-01T00:00:10Z", "succeeded"),
    );
    let accounts = Flaky::new(w.book.clone());
    let ctx = Context::new(&w.rates, &w.plans, &accounts, &w.config);
    let mut meter = Meter::tracking_changes();
    let mut out = Vec::new();
    meter.apply(&ctx, start.as_bytes(), None, &mut out).unwrap();
    accounts.break_reads_of("p");
    let err = meter.apply(&ctx, stop.as_bytes(), None, &mut out).unwrap_err();
    assert_eq!(
        err,
        ApplyError::Lookup(LookupError {
            account: "p".into(),
            reason: "read failed".into(),
            corrupt: false,
        })
    );
    assert!(
        charges(&out).is_empty(),
        "no charge was emitted on made-up terms: {out:?}"
    );
    // The caller rebuilds the meter from durable state (nothing was taken
    // from this one): with the reads healed, the same events bill as pro.
    accounts.heal();
    let mut rebuilt = Meter::tracking_changes();
    let mut out = Vec::new();
    for e in [&start, &stop] {
        rebuilt.apply(&ctx, e.as_bytes(), None, &mut out).unwrap();
    }
    let c = charges(&out);
    assert_eq!(c.len(), 1);
    // Pro includes model-API usage up to its cap; pay-as-you-go owes it.
    assert!(
        c[0].amount > Money::ZERO && c[0].amount_due == Money::ZERO,
        "{:?}",
        c[0]
    );
}

#[test]
fn another_accounts_failed_lookup_does_not_touch_this_accounts_events() {
    let mut w = World::new();
    w.account(PRO);
    let ok = [
        w.start("p", "j", "2024-05-01T00:00:00Z", "inference", Some("llm")),
        w.stop("p", "j", "2024-05-01T00:00:10Z", "succeeded"),
    ];
    let accounts = Flaky::new(w.book.clone());
    accounts.break_reads_of("someone-else");
    let ctx = Context::new(&w.rates, &w.plans, &accounts, &w.config);
    let mut meter = Meter::tracking_changes();
    let mut out = Vec::new();
    for e in &ok {
        meter.apply(&ctx, e.as_bytes(), None, &mut out).unwrap();
    }
    assert_eq!(charges(&out).len(), 1);
}

#[test]
fn a_period_close_that_cannot_read_an_account_fails_before_any_statement() {
    let mut w = World::new();
    w.account(PRO);
    w.account(r#"{"account_id":"q","plan":"payg","effective_from":"2024-01-01T00:00:00Z"}"#);
    let may = [
        w.start("p", "a", "2024-05-10T00:00:00Z", "inference", Some("llm")),
        w.stop("p", "a", "2024-05-10T00:00:10Z", "succeeded"),
        w.start("q", "b", "2024-05-10T00:00:00Z", "inference", Some("llm")),
        w.stop("q", "b", "2024-05-10T00:00:10Z", "succeeded"),
    ];
    // Past May's close (end of month plus the default grace).
    let june = w.start("q", "c", "2024-06-03T00:00:00Z", "inference", Some("llm"));
    let mut accounts = Flaky::new(w.book.clone());
    accounts.corrupt = true;
    let ctx = Context::new(&w.rates, &w.plans, &accounts, &w.config);
    let mut meter = Meter::tracking_changes();
    let mut out = Vec::new();
    for e in &may {
        meter.apply(&ctx, e.as_bytes(), None, &mut out).unwrap();
    }
    out.clear();
    accounts.break_reads_of("p");
    let err = meter.apply(&ctx, june.as_bytes(), None, &mut out).unwrap_err();
    assert!(
        matches!(&err, ApplyError::Lookup(e) if e.account.as_str() == "p" && e.corrupt),
        "{err:?}"
    );
    assert!(
        !out.iter().any(|o| matches!(o, Output::Statement(_))),
        "no statement of the period is out: {out:?}"
    );
}

/// An archive whose every read fails.
#[derive(Debug)]
struct Unreadable;

impl JobArchive for Unreadable {
    fn job(&self, _: &JobKey) -> Result<Option<Job>, ArchiveError> {
        Err(ArchiveError::Read("disk on fire".into()))
    }
    fn has_event(&self, _: EventKey) -> Result<bool, ArchiveError> {
        Err(ArchiveError::Read("disk on fire".into()))
    }
    fn jobs_of(&self, _: &jobmeter_core::AccountId) -> Result<Vec<JobKey>, ArchiveError> {
        Err(ArchiveError::Read("disk on fire".into()))
    }
    fn expiring(
        &self,
        _: Option<&(Timestamp, JobKey)>,
        _: Timestamp,
        _: usize,
    ) -> Result<Vec<(Timestamp, JobKey)>, ArchiveError> {
        Err(ArchiveError::Read("disk on fire".into()))
    }
}

#[test]
fn an_archive_that_cannot_be_read_is_an_error_not_an_empty_archive() {
    let mut w = World::new();
    let start = w.start("p", "j", "2024-05-01T00:00:00Z", "inference", Some("llm"));
    let ctx = Context::new(&w.rates, &w.plans, &w.book, &w.config);
    let mut meter = Meter::tracking_changes().with_archive(Box::new(Unreadable));
    let mut out = Vec::new();
    let err = meter.apply(&ctx, start.as_bytes(), None, &mut out).unwrap_err();
    assert_eq!(err, ApplyError::Archive(ArchiveError::Read("disk on fire".into())));
    assert!(out.is_empty(), "{out:?}");
}
