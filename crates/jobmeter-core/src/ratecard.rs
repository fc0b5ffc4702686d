//! The rate card: per-model per-second prices and the fine-tune flat rate,
//! in versions that each take effect at an instant, plus the rating policy.
//!
//! A job is rated by the version in force at its start, so a price change
//! never re-rates running jobs. The file is TOML, meant to be edited and
//! reviewed in a pull request (see `config/rate-card.toml`).

use crate::config_error::{from_toml, ConfigError, Problems};
use crate::event::{Invalid, JobKind, RejectReason};
use crate::money::{ModelId, Money};
use crate::time::Timestamp;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use toml::Spanned;

/// How billable seconds are derived from a duration in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Rounding {
    /// ceil(duration_ms / 1000), at least 1 second (the default).
    #[default]
    CeilSeconds,
    /// duration_ms / 1000 exactly (three decimals), at least 0.001 s.
    ExactMs,
}

impl Rounding {
    /// Billable seconds of a whole job of `ms` milliseconds (ms ≥ 0).
    pub fn total_seconds(self, ms: i64) -> Decimal {
        match self {
            Rounding::CeilSeconds => Decimal::from(((ms + 999) / 1000).max(1)),
            Rounding::ExactMs => Decimal::new(ms.max(1), 3),
        }
    }

    /// Billable seconds of a non-final part of a job split at a period
    /// boundary: floor for whole seconds, exact for `exact_ms`.
    pub fn part_seconds(self, ms: i64) -> Decimal {
        match self {
            Rounding::CeilSeconds => Decimal::from(ms / 1000),
            Rounding::ExactMs => Decimal::new(ms, 3),
        }
    }
}

/// Rating policy shared by all versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Billable-seconds rounding.
    #[serde(default)]
    pub rounding: Rounding,
    /// Whether failed jobs are charged.
    #[serde(default = "yes")]
    pub bill_failed: bool,
    /// Whether cancelled jobs are charged.
    #[serde(default = "yes")]
    pub bill_cancelled: bool,
}

fn yes() -> bool {
    true
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            rounding: Rounding::CeilSeconds,
            bill_failed: true,
            bill_cancelled: true,
        }
    }
}

/// One model's public price.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelPrice {
    /// USD per second.
    pub per_second: Money,
    /// GPU class the model runs on (what the model page shows).
    pub gpu: Option<String>,
    /// A short public description.
    pub description: Option<String>,
}

/// One version of the rate card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RateVersion {
    /// The version's name, carried on every charge as `rate_card_version`.
    pub version: String,
    /// The instant from which it applies to starting jobs.
    pub effective_from: Timestamp,
    /// USD per second for fine-tuning, whatever the model.
    pub fine_tune_per_second: Money,
    /// Per-model prices.
    pub models: BTreeMap<ModelId, ModelPrice>,
}

/// The rate to charge a job and the version it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rate<'a> {
    /// USD per second.
    pub per_second: Money,
    /// The version in force at the job's start.
    pub version: &'a str,
}

impl RateVersion {
    /// The per-second rate of a job of `kind` on `model`.
    pub fn rate(&self, kind: JobKind, model: Option<&ModelId>) -> Result<Money, Invalid> {
        match kind {
            JobKind::FineTune => Ok(self.fine_tune_per_second),
            JobKind::Inference | JobKind::WorkflowStep => {
                let model =
                    model.ok_or_else(|| Invalid::new(RejectReason::SchemaViolation, "`data.model` is missing"))?;
                self.models.get(model).map(|p| p.per_second).ok_or_else(|| {
                    Invalid::new(
                        RejectReason::UnknownModel,
                        format!(
                            "model {:?} is not in rate-card version {:?}",
                            model.as_str(),
                            self.version
                        ),
                    )
                })
            }
        }
    }
}

/// The whole rate card: versions ordered by `effective_from`, and the policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RateCard {
    /// Rating policy.
    pub policy: Policy,
    /// Versions, oldest first.
    pub versions: Vec<RateVersion>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCard {
    #[serde(default)]
    policy: Policy,
    #[serde(default)]
    versions: Vec<RawVersion>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVersion {
    version: Spanned<String>,
    effective_from: Spanned<String>,
    fine_tune_per_second: Spanned<String>,
    #[serde(default)]
    models: BTreeMap<String, Spanned<RawModel>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    per_second: Spanned<String>,
    gpu: Option<String>,
    description: Option<String>,
}

fn price(p: &mut Problems<'_>, s: &Spanned<String>, field: &str) -> Money {
    match Money::parse(s.get_ref()) {
        Some(m) if m > Money::ZERO => m,
        Some(_) => {
            p.at(s.span(), field, "a price must be greater than zero");
            Money::ZERO
        }
        None => {
            p.at(
                s.span(),
                field,
                format!(
                    "{:?} is not a decimal amount (write it as a string, e.g. \"0.00025\")",
                    s.get_ref()
                ),
            );
            Money::ZERO
        }
    }
}

impl RateCard {
    /// Parses and validates a TOML rate card, reporting every problem at once.
    pub fn from_toml(text: &str) -> Result<RateCard, ConfigError> {
        let raw: RawCard = toml::from_str(text).map_err(|e| from_toml("rate card", text, &e))?;
        let mut p = Problems::new(text);
        let mut versions = Vec::new();
        if raw.versions.is_empty() {
            p.field("versions", "at least one [[versions]] table is required");
        }
        for (i, v) in raw.versions.iter().enumerate() {
            let at = format!("versions[{i}]");
            let effective_from = match Timestamp::parse(v.effective_from.get_ref()) {
                Ok(t) => t,
                Err(e) => {
                    p.at(v.effective_from.span(), &format!("{at}.effective_from"), e.to_string());
                    Timestamp(0)
                }
            };
            if v.version.get_ref().trim().is_empty() {
                p.at(v.version.span(), &format!("{at}.version"), "must not be empty");
            }
            let fine_tune_per_second = price(&mut p, &v.fine_tune_per_second, &format!("{at}.fine_tune_per_second"));
            let mut models = BTreeMap::new();
            for (name, m) in &v.models {
                let field = format!("{at}.models.{name:?}.per_second");
                let per_second = price(&mut p, &m.get_ref().per_second, &field);
                models.insert(
                    ModelId::from(name.as_str()),
                    ModelPrice {
                        per_second,
                        gpu: m.get_ref().gpu.clone(),
                        description: m.get_ref().description.clone(),
                    },
                );
            }
            versions.push(RateVersion {
                version: v.version.get_ref().clone(),
                effective_from,
                fine_tune_per_second,
                models,
            });
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, v) in raw.versions.iter().enumerate() {
            if !names.insert(v.version.get_ref().clone()) {
                p.at(
                    v.version.span(),
                    &format!("versions[{i}].version"),
                    "duplicate version name",
                );
            }
        }
        for (i, w) in versions.windows(2).enumerate() {
            if w[1].effective_from <= w[0].effective_from {
                let span = raw.versions[i + 1].effective_from.span();
                p.at(
                    span,
                    &format!("versions[{}].effective_from", i + 1),
                    "versions must be listed oldest first, with distinct effective_from",
                );
            }
        }
        p.finish("rate card")?;
        Ok(RateCard {
            policy: raw.policy,
            versions,
        })
    }

    /// The version in force at `t`: the latest with `effective_from` ≤ `t`.
    pub fn version_at(&self, t: Timestamp) -> Option<&RateVersion> {
        let idx = self.versions.partition_point(|v| v.effective_from <= t);
        idx.checked_sub(1).and_then(|i| self.versions.get(i))
    }

    /// The rate of a job starting at `t`, or why it cannot be rated.
    pub fn rate_at(&self, t: Timestamp, kind: JobKind, model: Option<&ModelId>) -> Result<Rate<'_>, Invalid> {
        let v = self.version_at(t).ok_or_else(|| {
            Invalid::new(
                RejectReason::UnknownModel,
                format!("no rate-card version is in force at {t}"),
            )
        })?;
        Ok(Rate {
            per_second: v.rate(kind, model)?,
            version: &v.version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CARD: &str = r#"
[policy]
rounding = "ceil_seconds"

[[versions]]
version = "v1"
effective_from = "2024-01-01T00:00:00Z"
fine_tune_per_second = "0.001"
models."sdxl-1.0" = { per_second = "0.0004", gpu = "A100-80GB" }

[[versions]]
version = "v2"
effective_from = "2024-06-01T00:00:00Z"
fine_tune_per_second = "0.001"
models."sdxl-1.0" = { per_second = "0.0003" }
"#;

    #[test]
    fn picks_the_version_in_force() {
        let card = RateCard::from_toml(CARD).map_err(|e| e.to_string());
        let card = card.as_ref().map_err(Clone::clone);
        let Ok(card) = card else { panic!("{card:?}") };
        let t = |s| Timestamp::parse(s).unwrap_or_default();
        let m = ModelId::from("sdxl-1.0");
        let r = card.rate_at(t("2024-05-31T23:59:59.999Z"), JobKind::Inference, Some(&m));
        assert_eq!(
            r.map(|r| (r.per_second.to_string(), r.version.to_owned())).ok(),
            Some(("0.0004".into(), "v1".into()))
        );
        let r = card.rate_at(t("2024-06-01T00:00:00Z"), JobKind::Inference, Some(&m));
        assert_eq!(r.map(|r| r.version.to_owned()).ok(), Some("v2".into()));
        let unknown = card.rate_at(
            t("2024-06-01T00:00:00Z"),
            JobKind::Inference,
            Some(&ModelId::from("nope")),
        );
        assert_eq!(unknown.err().map(|e| e.reason), Some(RejectReason::UnknownModel));
        assert!(card
            .rate_at(t("2023-01-01T00:00:00Z"), JobKind::FineTune, None)
            .is_err());
    }

    #[test]
    fn reports_every_problem_with_its_line() {
        let bad = CARD
            .replace("\"0.0004\"", "\"-1\"")
            .replace("2024-06-01T00:00:00Z", "yesterday");
        let err = RateCard::from_toml(&bad)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("line 9, versions[0].models.\"sdxl-1.0\".per_second"),
            "{err}"
        );
        assert!(err.contains("line 13, versions[1].effective_from"), "{err}");
        let unknown_field = CARD.replace("rounding", "roundin");
        let err = RateCard::from_toml(&unknown_field)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn rounding_policies() {
        assert_eq!(Rounding::CeilSeconds.total_seconds(0), Decimal::from(1));
        assert_eq!(Rounding::CeilSeconds.total_seconds(1001), Decimal::from(2));
        assert_eq!(Rounding::ExactMs.total_seconds(1001).to_string(), "1.001");
        assert_eq!(Rounding::CeilSeconds.part_seconds(1999), Decimal::from(1));
    }
}
