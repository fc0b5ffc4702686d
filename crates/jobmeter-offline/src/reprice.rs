//! `jobmeter reprice`: the bill impact of a rate-card change.
//!
//! Replays the same events and account records twice through the billing
//! core — once under the current rate card, once under the proposed one —
//! and compares each account's monthly bill (the statement's `total_due`:
//! usage after credits, caps and quotas, plus the pro fee). The two runs are
//! ordinary replays with `--flush`, so "bill under the current card" is
//! exactly what `jobmeter replay --flush` prints as that statement.

use crate::replay::{load_accounts, load_plans, load_rate_card, meter_file, ReplayError};
use jobmeter_core::cycle::BillingPeriod;
use jobmeter_core::{AccountBook, Context, Meter, MeterConfig, Money, Output, Period, Plan, PlanCatalog, RateCard};
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

/// What a reprice needs.
#[derive(Debug, Clone)]
pub struct RepriceArgs {
    /// Lifecycle events (JSON lines).
    pub events: PathBuf,
    /// Account records (JSON lines).
    pub accounts: Option<PathBuf>,
    /// Plan catalog; defaults when absent.
    pub plans: Option<PathBuf>,
    /// The rate card in force.
    pub before: PathBuf,
    /// The proposed rate card.
    pub after: PathBuf,
    /// Price overrides applied in the proposed pass (adjustment records,
    /// one per line).
    pub overrides: Option<PathBuf>,
    /// Only the billing periods of this calendar month (every period with a
    /// statement when absent).
    pub period: Option<Period>,
    /// Timeouts.
    pub meter: MeterConfig,
}

/// One account's bill for one billing period under both cards.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AccountImpact {
    /// The account.
    pub account_id: String,
    /// The billing period (`YYYY-MM` or an ISO 8601 interval).
    pub period: BillingPeriod,
    /// Its plan on the statement.
    pub plan: Plan,
    /// Bill under the card in force.
    pub before: Money,
    /// Bill under the proposed card.
    pub after: Money,
    /// after − before.
    pub change: Money,
    /// change / before in percent, two decimals (`None` when before is 0).
    pub change_pct: Option<Decimal>,
}

/// Totals of a group (a plan or a model).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct GroupTotals {
    /// Accounts (plans) or jobs' charges (models) counted.
    pub count: u64,
    /// Sum under the card in force.
    pub before: Money,
    /// Sum under the proposed card.
    pub after: Money,
}

/// The whole report.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Per (account, month), most affected first.
    pub rows: Vec<AccountImpact>,
    /// Bills per plan.
    pub by_plan: BTreeMap<String, GroupTotals>,
    /// List amount of usage per model (fine-tunes as one group).
    pub by_model: BTreeMap<String, GroupTotals>,
    /// Sum of all bills under each card.
    pub total: GroupTotals,
}

#[derive(Default)]
struct Run {
    bills: BTreeMap<(String, BillingPeriod), (Plan, Money)>,
    models: BTreeMap<String, (u64, Money)>,
}

fn run_once(
    args: &RepriceArgs,
    rates: &RateCard,
    plans: &PlanCatalog,
    book: &AccountBook,
    (pass, overrides): (&str, Option<&std::path::Path>),
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<Run, ReplayError> {
    let ctx = Context::new(rates, plans, book, &args.meter);
    let mut meter = Meter::new();
    let mut run = Run::default();
    if let Some(path) = overrides {
        let refused = crate::replay::apply_adjustments(path, &ctx, &mut meter)?;
        if let Some(Output::Reject(r)) = refused.first() {
            return Err(ReplayError::Adjustment(format!(
                "{} adjustment record(s) cannot apply; the first: {} ({})",
                refused.len(),
                r.reason,
                r.detail
            )));
        }
    }
    // A month keeps every billing period in it (both halves of a
    // semi-monthly month).
    let keep = |p: BillingPeriod| args.period.is_none_or(|x| x == p.limit_month());
    meter_file(
        &args.events,
        &ctx,
        &mut meter,
        true,
        |out| {
            for o in out {
                match o {
                    Output::Statement(s) if keep(s.period) => {
                        run.bills
                            .insert((s.account_id.to_string(), s.period), (s.plan, s.total_due));
                    }
                    Output::Charge(c) if keep(c.period) => {
                        // Fine-tunes are priced per second whatever the
                        // model: one group of their own.
                        let key = match (&c.kind, &c.model) {
                            (jobmeter_core::ChargeKind::FineTune, _) | (_, None) => c.kind.as_str().to_owned(),
                            (_, Some(m)) => m.to_string(),
                        };
                        let e = run.models.entry(key).or_default();
                        e.0 += u64::from(c.adjusts.is_none());
                        e.1 += c.amount;
                    }
                    _ => {}
                }
            }
            Ok(())
        },
        |done, total| progress(pass, done, total),
    )?;
    Ok(run)
}

/// Computes the report. `progress` gets (pass, bytes read, file size).
pub fn reprice(args: &RepriceArgs, mut progress: impl FnMut(&str, u64, u64)) -> Result<Report, ReplayError> {
    let before_card = load_rate_card(&args.before)?;
    let after_card = load_rate_card(&args.after)?;
    let plans = load_plans(args.plans.as_deref())?;
    let (book, _) = load_accounts(args.accounts.as_deref(), &plans)?;
    let a = run_once(args, &before_card, &plans, &book, ("current card", None), &mut progress)?;
    let b = run_once(
        args,
        &after_card,
        &plans,
        &book,
        ("proposed card", args.overrides.as_deref()),
        &mut progress,
    )?;
    let mut report = Report::default();
    let keys: std::collections::BTreeSet<_> = a.bills.keys().chain(b.bills.keys()).cloned().collect();
    for key in keys {
        let (plan_a, before) = a.bills.get(&key).copied().unwrap_or((Plan::Payg, Money::ZERO));
        let (plan_b, after) = b.bills.get(&key).copied().unwrap_or((plan_a, Money::ZERO));
        let plan = if a.bills.contains_key(&key) { plan_a } else { plan_b };
        let change = after - before;
        let change_pct = (!before.is_zero()).then(|| {
            (change.0 * Decimal::ONE_HUNDRED / before.0)
                .round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointNearestEven)
        });
        let g = report.by_plan.entry(plan.as_str().to_owned()).or_default();
        g.count += 1;
        g.before += before;
        g.after += after;
        report.total.count += 1;
        report.total.before += before;
        report.total.after += after;
        report.rows.push(AccountImpact {
            account_id: key.0,
            period: key.1,
            plan,
            before,
            after,
            change,
            change_pct,
        });
    }
    report.rows.sort_by(|x, y| {
        y.change
            .0
            .abs()
            .cmp(&x.change.0.abs())
            .then(y.change.cmp(&x.change))
            .then_with(|| (&x.account_id, x.period).cmp(&(&y.account_id, y.period)))
    });
    let models: std::collections::BTreeSet<_> = a.models.keys().chain(b.models.keys()).cloned().collect();
    for m in models {
        let (n, before) = a.models.get(&m).copied().unwrap_or_default();
        let after = b.models.get(&m).map_or(Money::ZERO, |x| x.1);
        report.by_model.insert(
            m,
            GroupTotals {
                count: n,
                before,
                after,
            },
        );
    }
    Ok(report)
}

fn pct(before: Money, after: Money) -> String {
    if before.is_zero() {
        return if after.is_zero() { "0.00%".into() } else { "new".into() };
    }
    let p = ((after - before).0 * Decimal::ONE_HUNDRED / before.0)
        .round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointNearestEven);
    format!("{p:+.2}%")
}

fn signed(m: Money) -> String {
    let r = m.round_cents();
    if r.0.is_sign_negative() && !r.0.is_zero() {
        format!("{r}")
    } else {
        format!("+{r}")
    }
}

/// The report as a table for people: the `top` most affected rows, then
/// totals per plan and per model.
pub fn table(r: &Report, top: usize) -> String {
    let mut s = String::new();
    let up = r.rows.iter().filter(|x| x.change.0 > Decimal::ZERO).count();
    let down = r.rows.iter().filter(|x| x.change.0 < Decimal::ZERO).count();
    let _ = writeln!(
        s,
        "{} account-months: {} pay more, {} pay less, {} unchanged. Total {} -> {} ({}, {})\n",
        r.rows.len(),
        up,
        down,
        r.rows.len() - up - down,
        r.total.before.round_cents(),
        r.total.after.round_cents(),
        signed(r.total.after - r.total.before),
        pct(r.total.before, r.total.after)
    );
    let _ = writeln!(
        s,
        "{:<24} {:<8} {:<11} {:>12} {:>12} {:>11} {:>9}",
        "account", "period", "plan", "bill now", "bill new", "change", "change %"
    );
    for x in r.rows.iter().take(top) {
        let _ = writeln!(
            s,
            "{:<24} {:<8} {:<11} {:>12} {:>12} {:>11} {:>9}",
            x.account_id,
            x.period.to_string(),
            x.plan.as_str(),
            x.before.round_cents().to_string(),
            x.after.round_cents().to_string(),
            signed(x.change),
            pct(x.before, x.after)
        );
    }
    if r.rows.len() > top {
        let _ = writeln!(s, "… {} more (use --top or --format csv)", r.rows.len() - top);
    }
    group_table(
        &mut s,
        "by plan",
        ["plan", "accounts", "bills now", "bills new"],
        &r.by_plan,
    );
    group_table(
        &mut s,
        "by model (list price of usage, before credits and caps)",
        ["model", "jobs", "usage now", "usage new"],
        &r.by_model,
    );
    s
}

/// One totals table (per plan or per model) of [`table`].
fn group_table(s: &mut String, title: &str, head: [&str; 4], groups: &BTreeMap<String, GroupTotals>) {
    let _ = writeln!(s, "\n{title}");
    let _ = writeln!(
        s,
        "{:<24} {:>8} {:>14} {:>14} {:>12} {:>9}",
        head[0], head[1], head[2], head[3], "change", "change %"
    );
    for (name, g) in groups {
        let _ = writeln!(
            s,
            "{:<24} {:>8} {:>14} {:>14} {:>12} {:>9}",
            name,
            g.count,
            g.before.round_cents().to_string(),
            g.after.round_cents().to_string(),
            signed(g.after - g.before),
            pct(g.before, g.after)
        );
    }
}

/// Every row as CSV (exact amounts), most affected first.
pub fn csv(r: &Report) -> String {
    let mut w = crate::sinks::csv_writer(Vec::new());
    let mut row = |fields: &[&str]| {
        // Writing to memory cannot fail.
        let _ = w.write_record(fields);
    };
    row(&[
        "account_id",
        "period",
        "plan",
        "bill_before",
        "bill_after",
        "change",
        "change_pct",
    ]);
    for x in &r.rows {
        row(&[
            &x.account_id,
            &x.period.to_string(),
            x.plan.as_str(),
            &x.before.to_string(),
            &x.after.to_string(),
            &x.change.to_string(),
            &x.change_pct.map(|p| p.to_string()).unwrap_or_default(),
        ]);
    }
    let bytes = w.into_inner().unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Histogram buckets of the percentage change (upper bounds, exclusive).
const BUCKETS: &[(&str, Option<i64>)] = &[
    ("< -20%", Some(-20)),
    ("-20..-10%", Some(-10)),
    ("-10..-5%", Some(-5)),
    ("-5..-1%", Some(-1)),
    ("-1..+1%", Some(1)),
    ("+1..+5%", Some(5)),
    ("+5..+10%", Some(10)),
    ("+10..+20%", Some(20)),
    ("> +20%", None),
];

/// How many account-months fall in each bucket of change (plus bills that
/// are new: nothing under the current card).
pub fn histogram(r: &Report) -> Vec<(&'static str, usize)> {
    let mut counts: Vec<(&'static str, usize)> = BUCKETS.iter().map(|(l, _)| (*l, 0)).collect();
    counts.push(("new bill", 0));
    for x in &r.rows {
        let i = match x.change_pct {
            None if x.after.is_zero() => 4,
            None => BUCKETS.len(),
            Some(p) => BUCKETS
                .iter()
                .position(|(_, hi)| hi.is_none_or(|h| p < Decimal::from(h)))
                .unwrap_or(BUCKETS.len() - 1),
        };
        counts[i].1 += 1;
    }
    counts
}

/// An SVG bar chart of the distribution of changes.
pub fn svg(r: &Report, title: &str) -> String {
    let h = histogram(r);
    let max = h.iter().map(|x| x.1).max().unwrap_or(0).max(1);
    let (w, bar_w, gap, chart_h, top, left) = (820usize, 70usize, 10usize, 300usize, 60usize, 40usize);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{}" viewBox="0 0 {w} {}" font-family="sans-serif">"#,
        top + chart_h + 70,
        top + chart_h + 70
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="28" font-size="18" text-anchor="middle">{}</text>"#,
        w / 2,
        xml(title)
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="48" font-size="12" text-anchor="middle" fill="dimgray">account-months by change of the monthly bill ({} in all)</text>"#,
        w / 2,
        r.rows.len()
    );
    for (i, (label, n)) in h.iter().enumerate() {
        let x = left + i * (bar_w + gap);
        let bh = n * chart_h / max;
        let y = top + chart_h - bh;
        let color = match i {
            0..=3 => "seagreen",
            4 => "darkgray",
            _ => "firebrick",
        };
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="{y}" width="{bar_w}" height="{bh}" fill="{color}"><title>{}: {n}</title></rect>"#,
            xml(label)
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" font-size="12" text-anchor="middle">{n}</text>"#,
            x + bar_w / 2,
            y.saturating_sub(4)
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">{}</text>"#,
            x + bar_w / 2,
            top + chart_h + 18,
            xml(label)
        );
    }
    let _ = writeln!(
        s,
        r#"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
        top + chart_h,
        w - 10,
        top + chart_h
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" font-size="12" text-anchor="middle" fill="dimgray">total {} → {} ({})</text>"#,
        w / 2,
        top + chart_h + 50,
        r.total.before.round_cents(),
        r.total.after.round_cents(),
        xml(&pct(r.total.before, r.total.after))
    );
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
