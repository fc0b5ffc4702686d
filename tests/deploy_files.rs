//! The deployment files say true things: every metric the Grafana
//! dashboard and the Prometheus alert rules query is one the meter exports,
//! and the files parse.

use std::collections::BTreeSet;

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Names of every series the meter exports (histograms with their suffixes).
fn exported() -> BTreeSet<String> {
    let r = prometheus::Registry::new();
    let m = jobmeter_service::metrics::Metrics::new(&r).expect("metrics");
    // Per-partition series exist once a partition is assigned.
    m.input.lag.with_label_values(&["0"]);
    m.billing.open_jobs.with_label_values(&["0"]);
    m.state.partition_failed.with_label_values(&["0"]);
    m.commit.commit_seconds.with_label_values(&["commit"]);
    m.billing.limit_events.with_label_values(&["free_credits", "80"]);
    m.instance.api_requests.with_label_values(&["usage", "200"]);
    m.instance.tls_loads.with_label_values(&["failed"]);
    let _a = jobmeter_service::accounts::AccountsMetrics::new(&r).expect("account metrics");
    let mut names = BTreeSet::new();
    for fam in r.gather() {
        let n = fam.name().to_owned();
        for suffix in ["", "_bucket", "_sum", "_count"] {
            names.insert(format!("{n}{suffix}"));
        }
    }
    // The process collector (registered by `jobmeter run` on Linux).
    for n in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        names.insert(n.to_owned());
    }
    names
}

fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if expr[i..].starts_with("jobmeter_") || expr[i..].starts_with("process_") {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(expr[start..i].to_owned());
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn dashboard_queries_name_exported_metrics() {
    let text = std::fs::read_to_string(root().join("deploy/grafana/dashboards/jobmeter.json")).expect("dashboard");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let names = exported();
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8);
    let mut checked = 0;
    for p in panels {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            let used = metric_names(expr);
            assert!(
                !used.is_empty(),
                "panel {:?} queries no jobmeter metric: {expr}",
                p["title"]
            );
            for m in used {
                assert!(
                    names.contains(&m),
                    "panel {:?} queries {m}, which the meter does not export",
                    p["title"]
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 10);
}

#[test]
fn alert_rules_name_exported_metrics() {
    let text = std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml")).expect("alerts");
    let names = exported();
    let exprs: Vec<&str> = text.lines().filter_map(|l| l.trim().strip_prefix("expr:")).collect();
    assert!(exprs.len() >= 5);
    for e in exprs {
        for m in metric_names(e) {
            assert!(
                names.contains(&m),
                "alert expression uses {m}, which the meter does not export: {e}"
            );
        }
    }
}

/// Every token written in the repository's configuration, deployment files,
/// docs and scripts (a word with `-token-` in it) is one the meter refuses
/// off loopback, and the refusal list names nothing the repository does not
/// hold: a demo token added somewhere cannot slip past the check.
#[test]
fn every_token_written_in_the_repository_is_one_the_meter_refuses_off_loopback() {
    let files = [
        "dev",
        "config/jobmeter.toml",
        "docker-compose.yml",
        "deploy/k8s/jobmeter.yaml",
        "README.md",
        "docs/api.md",
        "docs/security.md",
        "deploy/kafka-acls.sh",
        "docs/deploying.md",
        "docs/operations.md",
        "docs/tools.md",
    ];
    let mut found = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(root().join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')) {
            if word.contains("-token-") && word.len() >= 16 {
                found.insert(word.to_owned());
            }
        }
    }
    let refused: BTreeSet<String> = jobmeter_service::config::PUBLIC_TOKENS
        .iter()
        .map(|t| (*t).to_owned())
        .collect();
    assert_eq!(found, refused);
    // And the check itself: the Kubernetes placeholder is refused on the
    // manifest's own listener.
    let k8s = std::fs::read_to_string(root().join("deploy/k8s/jobmeter.yaml")).expect("manifest");
    assert!(k8s.contains(r#"listen = "0.0.0.0:9464""#));
    assert!(!jobmeter_service::config::listens_on_loopback("0.0.0.0:9464"));
}

/// The Kubernetes manifest's configuration loads as the meter would load
/// it (its listener, its TLS choice), with the repository's rate card and
/// plans in place of the mounted ones.
#[test]
fn the_kubernetes_configuration_loads() {
    let k8s = std::fs::read_to_string(root().join("deploy/k8s/jobmeter.yaml")).expect("manifest");
    let start = k8s.find("  jobmeter.toml: |\n").expect("the ConfigMap's jobmeter.toml") + "  jobmeter.toml: |\n".len();
    let toml: String = k8s[start..]
        .lines()
        .take_while(|l| l.starts_with("    ") || l.is_empty())
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("jobmeter.toml");
    std::fs::write(&file, &toml).expect("write");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "an-operators-own-long-random-secret *\n").expect("tokens");
    let rates = root().join("config/rate-card.toml").display().to_string();
    let plans = root().join("config/plans.toml").display().to_string();
    let over = jobmeter_service::config::Overrides {
        sets: vec![
            ("billing.rate_card".into(), rates),
            ("billing.plans".into(), plans),
            ("api.tokens_file".into(), tokens.display().to_string()),
        ],
    };
    let loaded = jobmeter_service::config::Config::load(Some(&file), &[], &over);
    let cfg = loaded.unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert_eq!(cfg.http.listen, "0.0.0.0:9464");
    assert!(cfg.http.allow_plaintext && cfg.http.tls.is_none());
}
