//! The read-only usage API (`/v1/...`): an account's usage for a period,
//! its limits, the rate card and model prices. The document of record is
//! `openapi.json` beside this file, served at `/v1/openapi.json`.
//!
//! ## What the answers are read from
//! The RocksDB state of the partitions this instance owns, as of the last
//! committed batch: the same records the charges were computed from, so a
//! usage page never disagrees with the charges topic (a batch's records are
//! written after its transaction commits).
//!
//! ## Tokens
//! `Authorization: Bearer <token>`. Admin tokens see every account; an
//! account token sees its own account only (403 otherwise). No token or an
//! unknown one: 401. Tokens come from `api.admin_tokens`,
//! `api.account_tokens` and `api.tokens_file`; they are compared in
//! constant time.
//!
//! ## Partition ownership
//! An account's records live in the partition its events are keyed to. If
//! this instance does not hold that partition, it answers `421 Misdirected
//! Request` with the owner's instance id and advertised URL (from the
//! consumer group's description) so the caller can ask there.

use super::engine::Billing;
use jobmeter_core::cycle::BillingPeriod;
use jobmeter_core::ratecard::{ModelPrice, RateVersion};
use jobmeter_core::state::{keys, Counter, Job, Table};
use jobmeter_core::time::Timestamp;
use jobmeter_core::values;
use jobmeter_core::view::{self, AccountState};
use jobmeter_core::{AccountId, JobKind};
use jobmeter_kafka::client::KafkaSettings;
use jobmeter_store::Store;
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// The OpenAPI document of the HTTP API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Every route the HTTP server answers: (method, path). The OpenAPI
/// document must describe exactly these (checked by a test).
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/metrics"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/v1/openapi.json"),
    ("get", "/v1/rate-card"),
    ("get", "/v1/models/{model}"),
    ("get", "/v1/accounts/{account_id}/usage"),
    ("get", "/v1/accounts/{account_id}/limits"),
    ("get", "/v1/accounts/{account_id}/admission"),
    ("get", "/v1/accounts/{account_id}/adjustments"),
    ("get", "/v1/accounts/{account_id}/credits"),
    ("post", "/v1/accounts/{account_id}/adjustments"),
];

/// Who a token lets in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Reads every account.
    Admin,
    /// Reads every account and writes pricing adjustments.
    Support,
    /// Reads one account.
    Account(String),
}

impl Scope {
    /// `admin`, `support` or `account` (for logs; never the token).
    pub fn name(&self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Support => "support",
            Scope::Account(_) => "account",
        }
    }
}

/// The configured tokens.
#[derive(Clone, Default)]
pub struct Tokens {
    entries: Vec<(Vec<u8>, Scope)>,
}

/// Scopes only: a token never reaches a log through `{:?}`.
impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|(_, scope)| scope))
            .finish()
    }
}

impl Tokens {
    /// Tokens from their scopes.
    pub fn new(entries: impl IntoIterator<Item = (String, Scope)>) -> Self {
        Tokens {
            entries: entries.into_iter().map(|(t, s)| (t.into_bytes(), s)).collect(),
        }
    }

    /// Parses a tokens file: one `<token> <account_id>` (reads that
    /// account), `<token> *` (admin: reads every account) or
    /// `<token> * support` (reads every account, writes adjustments) per
    /// line, `#` comments and blank lines ignored.
    pub fn parse_file(text: &str) -> Result<Vec<(String, Scope)>, String> {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(t), Some("*"), None) => out.push((t.to_owned(), Scope::Admin)),
                (Some(t), Some("*"), Some("support")) if parts.next().is_none() => {
                    out.push((t.to_owned(), Scope::Support))
                }
                (Some(t), Some(a), None) => out.push((t.to_owned(), Scope::Account(a.to_owned()))),
                _ => {
                    return Err(format!(
                        "line {}: expected `<token> <account_id>`, `<token> *` or `<token> * support`",
                        i + 1
                    ))
                }
            }
        }
        Ok(out)
    }

    /// The scope of `token`. Every configured token is compared, each in
    /// constant time (`subtle`), by SHA-256 digest so that neither how much
    /// of a token matched nor its length leaks through timing.
    pub fn scope_of(&self, token: &str) -> Option<Scope> {
        use sha2::{Digest, Sha256};
        use subtle::ConstantTimeEq;
        let t = Sha256::digest(token.as_bytes());
        let mut found = None;
        for (k, s) in &self.entries {
            let same = Sha256::digest(k).ct_eq(&t);
            if bool::from(same) && found.is_none() {
                found = Some(s.clone());
            }
        }
        found
    }

    /// True when no token is configured (every API call is refused).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Where the API reads from and who it may answer.
#[derive(Debug, Clone)]
pub struct Api {
    /// The state store.
    pub store: Arc<Store>,
    /// Rate card, plans, accounts table.
    pub billing: Billing,
    /// Input partitions this instance holds with their state restored.
    pub owned: Arc<RwLock<BTreeSet<i32>>>,
    /// Input partitions of the job-events topic (0 until known).
    pub input_partitions: Arc<AtomicI32>,
    /// Tokens.
    pub tokens: Arc<Tokens>,
    /// For naming a partition's owner: Kafka settings, group and topic.
    pub group: Option<(KafkaSettings, String, String)>,
    /// This instance's id.
    pub instance_id: String,
    /// Timeouts and the stop grace (admission projects running jobs' cost).
    pub meter: jobmeter_core::MeterConfig,
    /// Input offsets of the last committed batch (`committed_offsets`).
    pub committed: super::metrics::CommittedOffsets,
    /// Writes pricing adjustments (`None`: writing is not offered).
    pub writer: Option<Arc<crate::adjustments::Writer>>,
    /// Adjustments this instance wrote, by (account, id): shown as
    /// pending until their meter has applied them.
    pub written: Arc<std::sync::Mutex<Written>>,
}

/// Where this instance wrote each adjustment, by (account, id): the
/// partition and offset of the adjustments topic.
pub type Written = std::collections::BTreeMap<(String, String), (i32, i64)>;

/// The most written adjustments remembered as pending (the oldest are
/// forgotten first; they are on the adjustments topic either way).
const WRITTEN_KEPT: usize = 10_000;

/// The query of an account route.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct AccountQuery {
    /// `YYYY-MM` (usage, limits).
    pub period: Option<String>,
    /// Job kind (admission).
    pub kind: Option<String>,
    /// Model (admission).
    pub model: Option<String>,
    /// Longest the job may run, in seconds (admission).
    pub max_seconds: Option<String>,
}

/// Kind, model and max seconds of an admission query, or the 400 answer.
/// An admission question: the job's kind, model and longest run.
type AdmissionQuery = (JobKind, Option<String>, Option<rust_decimal::Decimal>);

fn admission_request(q: &AccountQuery) -> Result<AdmissionQuery, Answer> {
    let kind = match q.kind.as_deref() {
        None | Some("") => {
            return Err(Answer::error(
                400,
                "bad_request",
                "kind is required: inference, fine_tune or workflow_step",
            ))
        }
        Some(k) => JobKind::ALL.into_iter().find(|x| x.as_str() == k).ok_or_else(|| {
            Answer::error(
                400,
                "bad_request",
                &format!("kind {k:?} is not inference, fine_tune or workflow_step"),
            )
        })?,
    };
    let model = q.model.clone().filter(|m| !m.is_empty());
    let max_seconds = match q.max_seconds.as_deref() {
        None | Some("") => None,
        Some(s) => match s.parse::<rust_decimal::Decimal>() {
            Ok(d) if d > rust_decimal::Decimal::ZERO && d <= rust_decimal::Decimal::from(MAX_ADMISSION_SECONDS) => {
                Some(d)
            }
            _ => {
                return Err(Answer::error(
                    400,
                    "bad_request",
                    &format!("max_seconds must be a number of seconds above 0 and at most {MAX_ADMISSION_SECONDS}"),
                ))
            }
        },
    };
    Ok((kind, model, max_seconds))
}

/// The longest job an admission query may ask about (a year, in seconds).
const MAX_ADMISSION_SECONDS: i64 = 366 * 86_400;

/// The body of `GET /v1/accounts/{account}/credits`: each credit grant,
/// granted, used, expired (what an expiry or a void took), remaining, as of
/// the partition's stream time; and the balance.
fn credits_report(account: &AccountId, st: &view::AccountState) -> serde_json::Value {
    let at = st.stream_time.unwrap_or(Timestamp::MIN);
    let mut balance = jobmeter_core::Money::ZERO;
    let grants: Vec<serde_json::Value> = st
        .adjustments
        .iter()
        .filter_map(|(id, s)| {
            let (amount, expires_at, selector) = s.grant()?;
            let remaining = s.remaining_at(at);
            balance += remaining;
            let left = (amount - s.used).max(jobmeter_core::Money::ZERO);
            Some(json!({
                "adjustment_id": id,
                "granted": amount,
                "used": s.used,
                "expired": left - remaining,
                "remaining": remaining,
                "expires_at": expires_at,
                "voided_at": s.voided_at,
                "selector": selector,
                "reason": s.adjustment.reason,
                "requested_by": s.adjustment.requested_by,
            }))
        })
        .collect();
    json!({
        "account_id": account,
        "as_of": st.stream_time,
        "balance": balance,
        "grants": grants,
    })
}

/// An API answer: status and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Body.
    pub body: serde_json::Value,
}

impl Answer {
    fn ok<T: Serialize>(v: &T) -> Answer {
        match serde_json::to_value(v) {
            Ok(body) => Answer { status: 200, body },
            Err(e) => Answer::error(500, "internal", &e.to_string()),
        }
    }

    fn error(status: u16, error: &str, message: &str) -> Answer {
        Answer {
            status,
            body: json!({ "error": error, "message": message }),
        }
    }
}

/// Which account route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountView {
    /// `/usage`.
    Usage,
    /// `/limits`.
    Limits,
    /// `/admission`.
    Admission,
    /// `/adjustments` (`GET`).
    Adjustments,
    /// `/credits`.
    Credits,
}

impl AccountView {
    /// The route's last path segment.
    pub fn name(self) -> &'static str {
        match self {
            AccountView::Usage => "usage",
            AccountView::Limits => "limits",
            AccountView::Admission => "admission",
            AccountView::Adjustments => "adjustments",
            AccountView::Credits => "credits",
        }
    }
}

impl Api {
    /// Checks the bearer token: `Err` is the 401 answer.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Scope, Answer> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        match token {
            None => Err(Answer::error(
                401,
                "unauthorized",
                "send `Authorization: Bearer <token>`",
            )),
            Some(t) => self
                .tokens
                .scope_of(t)
                .ok_or_else(|| Answer::error(401, "unauthorized", "unknown token")),
        }
    }

    /// `GET /v1/rate-card`.
    pub fn rate_card(&self) -> Answer {
        let rates = &self.billing.rates;
        let current = rates.version_at(Timestamp::now()).map(|v| v.version.clone());
        Answer::ok(&json!({
            "currency": jobmeter_core::money::CURRENCY,
            "current_version": current,
            "policy": rates.policy,
            "versions": rates.versions,
        }))
    }

    /// `GET /v1/models/{model}`: what a model page shows.
    pub fn model(&self, model: &str) -> Answer {
        let rates = &self.billing.rates;
        let t = Timestamp::now();
        let history: Vec<_> = rates
            .versions
            .iter()
            .filter_map(|v| {
                v.models.iter().find(|(m, _)| m.as_str() == model).map(|(_, p)| {
                    json!({
                        "version": v.version,
                        "effective_from": v.effective_from,
                        "per_second": p.per_second,
                    })
                })
            })
            .collect();
        if history.is_empty() {
            return Answer::error(404, "not_found", &format!("model {model:?} is not on the rate card"));
        }
        fn price_in<'a>(v: Option<&'a RateVersion>, model: &str) -> Option<(&'a RateVersion, &'a ModelPrice)> {
            v.and_then(|v| v.models.iter().find(|(m, _)| m.as_str() == model).map(|(_, p)| (v, p)))
        }
        let current = price_in(rates.version_at(t), model);
        let next = price_in(rates.versions.iter().find(|v| v.effective_from > t), model);
        let describe = |x: Option<(&RateVersion, &ModelPrice)>| {
            x.map(|(v, p)| {
                json!({
                    "version": v.version,
                    "effective_from": v.effective_from,
                    "per_second": p.per_second,
                    "per_hour": jobmeter_core::Money(p.per_second.0 * rust_decimal::Decimal::from(3600)),
                })
            })
        };
        let info = current.or_else(|| price_in(rates.versions.last(), model));
        Answer::ok(&json!({
            "model": model,
            "gpu": info.and_then(|(_, p)| p.gpu.clone()),
            "description": info.and_then(|(_, p)| p.description.clone()),
            "currency": jobmeter_core::money::CURRENCY,
            "rounding": rates.policy.rounding,
            "current": describe(current),
            "next": describe(next),
            "history": history,
        }))
    }

    /// `GET /v1/accounts/{account}/usage|limits[?period=LABEL]` (a billing
    /// period's label: `2024-05`, `2024-04-16/2024-05-01`) and
    /// `GET /v1/accounts/{account}/admission?kind=&model=&max_seconds=`.
    pub fn account(&self, scope: &Scope, account: &str, what: AccountView, q: &AccountQuery) -> Answer {
        if let Scope::Account(own) = scope {
            if own != account {
                return Answer::error(403, "forbidden", "this token may only read its own account");
            }
        }
        let job = match what {
            AccountView::Admission => match admission_request(q) {
                Ok(j) => Some(j),
                Err(a) => return a,
            },
            _ => None,
        };
        let period = match q.period.as_deref().map(BillingPeriod::parse_label) {
            Some(None) => {
                return Answer::error(
                    400,
                    "bad_request",
                    "period must be a billing period's label: a month (2024-05) or an ISO 8601 interval, end exclusive (2024-04-16/2024-05-01)",
                )
            }
            Some(Some((start, end))) => Some(BillingPeriod { start, end }),
            None => None,
        };
        let owned: Vec<i32> = self
            .owned
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .copied()
            .collect();
        if owned.is_empty() {
            return Answer::error(
                503,
                "not_ready",
                "no partition is assigned and restored yet; retry shortly",
            );
        }
        let account_id = AccountId::from(account);
        let book: &dyn jobmeter_core::Accounts = &*self.billing.accounts;
        let records = match book.records_of(&account_id) {
            Ok(r) => r,
            Err(e) => return Answer::error(500, "store", &e.to_string()),
        };
        // Without one named, the account's billing period open at stream time.
        let schedule = &self.billing.plans.billing_cycle;
        let open_at = |t: Timestamp| jobmeter_core::cycle::period_at(&records, schedule, t);
        let (st, found_in) = match self.read_account(&account_id, &owned, period, &open_at) {
            Ok(x) => x,
            Err(e) => return Answer::error(500, "store", &e),
        };
        let n = self.input_partitions.load(Ordering::Relaxed);
        let home = jobmeter_kafka::group::partition_for_key(account.as_bytes(), n);
        if found_in.is_empty() && n > 0 && !owned.contains(&home) {
            return self.misdirected(home, account, what);
        }
        if st.is_empty() && records.is_empty() {
            return Answer::error(
                404,
                "not_found",
                &format!("account {account:?} has no account record and no usage"),
            );
        }
        let period = period.unwrap_or_else(|| open_at(st.stream_time.unwrap_or_else(Timestamp::now)));
        let partition = found_in.first().copied().unwrap_or(home);
        let mut body = match self.view(&account_id, &st, period, what, job) {
            Ok(body) => body,
            Err(answer) => return answer,
        };
        if let Some(o) = body.as_object_mut() {
            o.insert("served_by".into(), json!(self.instance_id));
            o.insert("partition".into(), json!(partition));
            if what != AccountView::Usage {
                o.insert("committed_offsets".into(), self.committed_offsets(partition));
            }
        }
        Answer { status: 200, body }
    }

    /// The body of an account view (`Err`: the answer to give instead).
    fn view(
        &self,
        account_id: &AccountId,
        st: &view::AccountState,
        period: BillingPeriod,
        what: AccountView,
        job: Option<AdmissionQuery>,
    ) -> Result<serde_json::Value, Answer> {
        let book: &dyn jobmeter_core::Accounts = &*self.billing.accounts;
        let value = match what {
            AccountView::Admission => {
                let Some((kind, model, max_seconds)) = job else {
                    return Err(Answer::error(500, "internal", "admission without its query"));
                };
                let model = model.map(jobmeter_core::ModelId::from);
                let ctx = jobmeter_core::Context::new(&self.billing.rates, &self.billing.plans, book, &self.meter);
                let req = view::AdmissionRequest {
                    kind,
                    model: model.as_ref(),
                    max_seconds,
                };
                let now = st.stream_time.unwrap_or_else(Timestamp::now);
                match view::admission(account_id, &req, st, &ctx, now) {
                    Ok(a) => serde_json::to_value(a),
                    Err(view::AdmissionError::Invalid(inv)) => {
                        return Err(Answer::error(400, inv.reason.as_str(), &inv.detail))
                    }
                    Err(view::AdmissionError::Lookup(e)) => return Err(Answer::error(500, "store", &e.to_string())),
                }
            }
            AccountView::Usage | AccountView::Adjustments => {
                let report = view::usage_report(
                    account_id,
                    period,
                    st,
                    &self.billing.plans,
                    book,
                    self.billing.rates.policy.rounding,
                )
                .map_err(|e| Answer::error(500, "store", &e.to_string()))?;
                match what {
                    AccountView::Adjustments => Ok(self.adjustments_list(account_id, st, period, &report.adjustments)),
                    _ => serde_json::to_value(report),
                }
            }
            AccountView::Credits => Ok(credits_report(account_id, st)),
            // Limits count per calendar month, whatever the cadence.
            AccountView::Limits => {
                match view::limits_report(account_id, period.limit_month(), st, &self.billing.plans, book) {
                    Ok(r) => serde_json::to_value(r),
                    Err(e) => return Err(Answer::error(500, "store", &e.to_string())),
                }
            }
        };
        Ok(value.unwrap_or_default())
    }

    /// The body of `GET /v1/accounts/{account}/adjustments`: every
    /// adjustment applied, with what it changed in `period`, then those
    /// this instance wrote that are not applied yet (pending).
    fn adjustments_list(
        &self,
        account_id: &AccountId,
        st: &view::AccountState,
        period: BillingPeriod,
        amounts: &[jobmeter_core::output::StatementAdjustment],
    ) -> serde_json::Value {
        let mut list: Vec<serde_json::Value> = st
            .adjustments
            .iter()
            .map(|(id, s)| {
                json!({
                    "adjustment_id": id,
                    "type": s.adjustment.kind(),
                    "status": "applied",
                    "reason": s.adjustment.reason,
                    "requested_by": s.adjustment.requested_by,
                    "record": s.adjustment,
                    "effective_until_moved_to": s.moved_until,
                    "amount_in_period": amounts.iter().find(|a| &a.adjustment_id == id).map(|a| a.amount),
                })
            })
            .collect();
        let written = self.written.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let account = account_id.as_str().to_owned();
        let of_account = written
            .range((account.clone(), String::new())..)
            .take_while(|((a, _), _)| *a == account);
        for ((_, id), (partition, offset)) in of_account {
            if !st.adjustments.contains_key(id) {
                list.push(json!({
                    "adjustment_id": id,
                    "status": "pending",
                    "written_to": {"partition": partition, "offset": offset},
                }));
            }
        }
        json!({
            "account_id": account_id,
            "period": period,
            "adjustments": list,
        })
    }

    /// Checks `POST /v1/accounts/{account}/adjustments`: the token's scope
    /// and the record (the path's account filled in when the body has
    /// none). `Ok` is the record to write, or the answer when it was
    /// applied already.
    pub fn adjustment_to_write(
        &self,
        scope: &Scope,
        account: &str,
        body: &[u8],
    ) -> Result<(jobmeter_core::adjust::Adjustment, Vec<u8>), Answer> {
        if *scope != Scope::Support {
            return Err(Answer::error(
                403,
                "forbidden",
                "writing an adjustment needs a support token",
            ));
        }
        let Some(writer) = &self.writer else {
            return Err(Answer::error(503, "not_ready", "adjustments cannot be written yet"));
        };
        let mut doc: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| Answer::error(422, "not_json", &format!("not a JSON document: {e}")))?;
        if let Some(o) = doc.as_object_mut() {
            match o.get("account_id") {
                None => {
                    o.insert("account_id".into(), json!(account));
                }
                Some(a) if a.as_str() == Some(account) => {}
                Some(a) => {
                    return Err(Answer::error(
                        422,
                        "schema_violation",
                        &format!("`account_id` {a} is not the account of the path, {account:?}"),
                    ))
                }
            }
        }
        let raw = serde_json::to_vec(&doc).map_err(|e| Answer::error(500, "internal", &e.to_string()))?;
        let a = writer
            .check(&raw)
            .map_err(|inv| Answer::error(422, inv.reason.as_str(), &inv.detail))?;
        if let Some(answer) = self.applied_already(&a) {
            return Err(answer);
        }
        Ok((a, raw))
    }

    /// When `a`'s id was applied already (and this instance holds the
    /// account): the same record answers as applied, another is a conflict.
    fn applied_already(&self, a: &jobmeter_core::adjust::Adjustment) -> Option<Answer> {
        let n = self.input_partitions.load(Ordering::Relaxed);
        let home = jobmeter_kafka::group::partition_for_key(a.account_id.as_str().as_bytes(), n);
        let owned = self
            .owned
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&home);
        if n <= 0 || !owned {
            return None;
        }
        let key = keys::adjustment(&a.account_id, &a.adjustment_id);
        let stored = self.store.get(home, Table::Adjustments, &key).ok()??;
        let stored: jobmeter_core::state::StoredAdjustment = serde_json::from_slice(&stored).ok()?;
        Some(if stored.adjustment == *a {
            Answer {
                status: 200,
                body: json!({"adjustment_id": a.adjustment_id, "account_id": a.account_id, "status": "applied"}),
            }
        } else {
            Answer::error(
                409,
                "conflict",
                &format!(
                    "adjustment {:?} of account {:?} was applied already with other content; ids are unique per account, forever",
                    a.adjustment_id,
                    a.account_id.as_str()
                ),
            )
        })
    }

    /// Writes a checked adjustment: `202` with where it was written (it is
    /// pending until its meter applies it).
    pub async fn write_adjustment(&self, a: &jobmeter_core::adjust::Adjustment, raw: &[u8]) -> Answer {
        let Some(writer) = &self.writer else {
            return Answer::error(503, "not_ready", "adjustments cannot be written yet");
        };
        match writer.write(a, raw).await {
            Ok((partition, offset)) => {
                let mut written = self.written.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if written.len() >= WRITTEN_KEPT {
                    written.clear();
                }
                written.insert(
                    (a.account_id.as_str().to_owned(), a.adjustment_id.clone()),
                    (partition, offset),
                );
                Answer {
                    status: 202,
                    body: json!({
                        "adjustment_id": a.adjustment_id,
                        "account_id": a.account_id,
                        "type": a.kind(),
                        "status": "pending",
                        "written_to": {"topic": writer.topic(), "partition": partition, "offset": offset},
                    }),
                }
            }
            Err(e) => Answer::error(503, "kafka", &format!("the adjustment could not be written: {e}")),
        }
    }

    /// The input offsets (next to read) of `partition` that the stored
    /// state reflects at least, by topic.
    fn committed_offsets(&self, partition: i32) -> serde_json::Value {
        let committed = self.committed.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut m = serde_json::Map::new();
        for ((topic, p), o) in committed.iter() {
            if *p == partition {
                m.insert(topic.clone(), json!(o));
            }
        }
        serde_json::Value::Object(m)
    }

    fn misdirected(&self, partition: i32, account: &str, what: AccountView) -> Answer {
        let owner = self.group.as_ref().and_then(|(settings, group, topic)| {
            jobmeter_kafka::group::members(settings, group, topic, Duration::from_secs(3))
                .ok()?
                .into_iter()
                .find(|m| m.partitions.contains(&partition))
        });
        let path = what.name();
        Answer {
            status: 421,
            body: json!({
                "error": "not_owner",
                "message": format!("partition {partition} of account {account:?} is held by another instance; ask it"),
                "partition": partition,
                "owner": owner.as_ref().map(|m| json!({
                    "instance_id": m.instance_id,
                    "url": (!m.url.is_empty()).then(|| m.url.clone()),
                    "host": m.host,
                })),
                "owner_url": owner
                    .filter(|m| !m.url.is_empty())
                    .map(|m| format!("{}/v1/accounts/{account}/{path}", m.url.trim_end_matches('/'))),
            }),
        }
    }

    /// The account's records in every owned partition (normally one).
    fn read_account(
        &self,
        account: &AccountId,
        owned: &[i32],
        period: Option<BillingPeriod>,
        open_at: &dyn Fn(Timestamp) -> BillingPeriod,
    ) -> Result<(AccountState, Vec<i32>), String> {
        let e = |e: &dyn std::fmt::Display| e.to_string();
        let prefix = keys::account_prefix(account);
        let mut st = AccountState::default();
        let mut found = Vec::new();
        // Newest stream time of the partitions holding the account, and of
        // all owned partitions (for an account with no usage yet).
        let (mut found_time, mut any_time) = (None, None);
        for &p in owned {
            let jobs = self.store.scan(p, Table::Jobs, &prefix, 100_000).map_err(|x| e(&x))?;
            let usage = self.store.scan(p, Table::Usage, &prefix, 10_000).map_err(|x| e(&x))?;
            let fired = self.store.scan(p, Table::Fired, &prefix, 10_000).map_err(|x| e(&x))?;
            let meta = self.store.get(p, Table::Meta, keys::STREAM_TIME).map_err(|x| e(&x))?;
            let stream_time = meta
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .map(|b| Timestamp(i64::from_be_bytes(b)));
            any_time = any_time.max(stream_time);
            let period = period.or(stream_time.map(open_at));
            let (open, closed) = match period {
                Some(per) => {
                    let k = keys::statement(per, account);
                    (
                        self.store.get(p, Table::Statements, &k).map_err(|x| e(&x))?,
                        self.store.get(p, Table::Closed, &k).map_err(|x| e(&x))?,
                    )
                }
                None => (None, None),
            };
            if jobs.is_empty() && usage.is_empty() && open.is_none() && closed.is_none() {
                continue;
            }
            found.push(p);
            found_time = found_time.max(stream_time);
            for (k, v) in jobs {
                if let (Some((_, j)), Ok(job)) = (keys::decode_job(&k), values::decode::<Job>(Table::Jobs, &v)) {
                    st.jobs.push((j, job));
                }
            }
            for (k, v) in usage {
                if let (Some(key), Ok(c)) = (keys::decode_usage(&k), values::decode::<Counter>(Table::Usage, &v)) {
                    st.counters.insert(key, c);
                }
            }
            st.fired.extend(fired.iter().filter_map(|(k, _)| keys::decode_fired(k)));
            for (k, v) in self
                .store
                .scan(p, Table::Adjustments, &prefix, 10_000)
                .map_err(|x| e(&x))?
            {
                if let (Some((_, id)), Ok(a)) = (keys::decode_adjustment(&k), serde_json::from_slice(&v)) {
                    st.adjustments.insert(id, a);
                }
            }
            if st.open.is_none() {
                st.open = open.and_then(|v| values::decode(Table::Statements, &v).ok());
            }
            if st.closed.is_none() {
                st.closed = closed.and_then(|v| values::decode_json(Table::Closed, &v).ok());
            }
        }
        st.stream_time = if found.is_empty() { any_time } else { found_time };
        Ok((st, found))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_never_show_in_debug_output() {
        let t = Tokens::new([
            ("an-admin-token-0123456789".to_owned(), Scope::Admin),
            ("an-account-token-98765".to_owned(), Scope::Account("acct-7".into())),
        ]);
        let shown = format!("{t:?}");
        assert!(!shown.contains("token"), "{shown}");
        assert!(shown.contains("Admin") && shown.contains("acct-7"), "{shown}");
    }

    #[test]
    fn tokens_scope_and_compare() {
        let t = Tokens::new([
            ("admin-token-0123456789".to_owned(), Scope::Admin),
            ("acct-token-0123456789".to_owned(), Scope::Account("a1".into())),
        ]);
        assert_eq!(t.scope_of("admin-token-0123456789"), Some(Scope::Admin));
        assert_eq!(t.scope_of("acct-token-0123456789"), Some(Scope::Account("a1".into())));
        assert_eq!(t.scope_of("acct-token-012345678"), None, "a prefix is not a match");
        assert_eq!(
            t.scope_of("acct-token-01234567890"),
            None,
            "an extension is not a match"
        );
        assert_eq!(t.scope_of(""), None);
    }

    #[test]
    fn tokens_file_format() {
        let parsed = Tokens::parse_file("# comment\n\nabc *\ndef acct-7\nghi * support\n").unwrap_or_default();
        assert_eq!(
            parsed,
            vec![
                ("abc".to_owned(), Scope::Admin),
                ("def".to_owned(), Scope::Account("acct-7".into())),
                ("ghi".to_owned(), Scope::Support)
            ]
        );
        assert!(Tokens::parse_file("lonely\n").is_err());
        for bad in ["t * admin\n", "t * support extra\n", "t acct-7 support\n"] {
            let e = Tokens::parse_file(&format!("ok *\n{bad}")).unwrap_err();
            assert!(e.starts_with("line 2:"), "{bad}: {e}");
        }
    }

    #[test]
    fn admission_queries_are_checked_before_any_state_is_read() {
        let q = |kind: Option<&str>, max: Option<&str>| AccountQuery {
            kind: kind.map(str::to_owned),
            model: Some("sdxl-1.0".into()),
            max_seconds: max.map(str::to_owned),
            period: None,
        };
        let ok = admission_request(&q(Some("fine_tune"), Some("600"))).ok();
        assert_eq!(ok.map(|(k, _, m)| (k, m)), Some((JobKind::FineTune, Some(600.into()))));
        assert!(admission_request(&q(Some("inference"), None)).is_ok_and(|(_, _, m)| m.is_none()));
        for (kind, max) in [
            (None, None),
            (Some(""), None),
            (Some("training"), None),
            (Some("inference"), Some("0")),
            (Some("inference"), Some("-5")),
            (Some("inference"), Some("abc")),
            (Some("inference"), Some("31622401")),
            (Some("inference"), Some("1e99")),
        ] {
            let a = admission_request(&q(kind, max)).err();
            assert_eq!(a.map(|a| a.status), Some(400), "{kind:?} {max:?}");
        }
    }

    #[test]
    fn openapi_document_describes_exactly_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap_or_else(|e| panic!("openapi.json: {e}"));
        assert!(doc["openapi"].as_str().unwrap_or_default().starts_with("3."));
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            for method in item.as_object().into_iter().flatten().map(|(m, _)| m) {
                documented.insert((method.clone(), path.clone()));
            }
        }
        let served: BTreeSet<(String, String)> =
            ROUTES.iter().map(|(m, p)| ((*m).to_owned(), (*p).to_owned())).collect();
        assert_eq!(documented, served);
    }
}
