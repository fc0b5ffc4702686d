//! The flags that say which configuration to load: `jobmeter run`'s
//! ([`RunCmd`]) and the operator tools' ([`KafkaArgs`]). Both layer the
//! same way: defaults, the `--config` file, the `JOBMETER_KAFKA_BROKERS`
//! and `JOBMETER__…` environment, then the flags.

use crate::config::{Config, ConfigErrors, Overrides};
use std::path::PathBuf;

/// `jobmeter run`.
#[derive(Debug, clap::Args)]
pub struct RunCmd {
    /// Configuration file (TOML); see `config/jobmeter.toml`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override `kafka.brokers`.
    #[arg(long)]
    pub brokers: Option<String>,
    /// Override `instance_id`.
    #[arg(long)]
    pub instance_id: Option<String>,
    /// Override `state.dir`.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Override `http.listen`.
    #[arg(long)]
    pub http_listen: Option<String>,
    /// Override any setting: `--set batch.max_events=2000` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl RunCmd {
    /// The configuration this command describes (every problem reported).
    pub fn load_config(&self) -> Result<Config, ConfigErrors> {
        let mut over = overrides(&self.sets, self.brokers.as_deref())?;
        if let Some(i) = &self.instance_id {
            over.sets.push(("instance_id".into(), i.clone()));
        }
        if let Some(d) = &self.state_dir {
            over.sets.push(("state.dir".into(), d.display().to_string()));
        }
        if let Some(h) = &self.http_listen {
            over.sets.push(("http.listen".into(), h.clone()));
        }
        let env: Vec<(String, String)> = std::env::vars().collect();
        Config::load(self.config.as_deref(), &env, &over)
    }
}

impl RunCmd {
    /// `jobmeter run`: prints the effective configuration (`--print-config`)
    /// or meters until SIGTERM/SIGINT.
    pub fn run(&self) -> Result<(), crate::ServiceError> {
        crate::init_tracing();
        let cfg = self.load_config()?;
        if self.print_config {
            let text = toml::to_string_pretty(&cfg.redacted()).map_err(|e| crate::ServiceError::Io {
                what: "printing the configuration".into(),
                source: std::io::Error::other(e),
            })?;
            println!("{text}");
            return Ok(());
        }
        crate::run_until_signalled(cfg)
    }
}

/// `--set KEY=VALUE` flags (and `--brokers`, when given) as overrides of
/// the configuration's layers; every malformed flag is reported.
pub fn overrides(sets: &[String], brokers: Option<&str>) -> Result<Overrides, ConfigErrors> {
    let mut over = Overrides::default();
    let mut bad = Vec::new();
    for s in sets {
        match s.split_once('=') {
            Some((k, v)) => over.sets.push((k.trim().to_owned(), v.trim().to_owned())),
            None => bad.push(format!("--set {s:?}: expected KEY=VALUE")),
        }
    }
    if !bad.is_empty() {
        return Err(ConfigErrors(bad));
    }
    if let Some(b) = brokers {
        over.sets.push(("kafka.brokers".into(), b.to_owned()));
    }
    Ok(over)
}

/// How an operator tool (`dump`, `notify`, `rebuild`…) reaches Kafka: with
/// the meter's own configuration — its `[kafka]` brokers and librdkafka
/// properties (SASL, SSL…) and its topic prefix — layered as for
/// `jobmeter run`, so a tool reaches every cluster the meter does. Only
/// what reaching Kafka needs is validated.
#[derive(Debug, clap::Args)]
pub struct KafkaArgs {
    /// The meter's configuration file (TOML; see `config/jobmeter.toml`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override `kafka.brokers`.
    #[arg(long)]
    pub brokers: Option<String>,
    /// Override a setting: `--set kafka.properties.security.protocol=SASL_SSL`
    /// (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

impl KafkaArgs {
    /// The configuration these flags describe (Kafka and topics checked).
    pub fn load(&self) -> Result<Config, ConfigErrors> {
        let over = overrides(&self.sets, self.brokers.as_deref())?;
        let env: Vec<(String, String)> = std::env::vars().collect();
        Config::load_for_kafka(self.config.as_deref(), &env, &over)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_malformed_set_is_reported_and_brokers_come_last() {
        let bad = overrides(&["a".into(), "b=1".into(), "c".into()], None).unwrap_err();
        assert_eq!(bad.0.len(), 2, "{bad:?}");
        assert!(bad.0[0].contains("\"a\"") && bad.0[1].contains("\"c\""));
        let ok = overrides(&[" kafka.brokers = x:1 ".into()], Some("y:2")).unwrap();
        assert_eq!(
            ok.sets,
            vec![
                ("kafka.brokers".into(), "x:1".into()),
                ("kafka.brokers".into(), "y:2".into())
            ]
        );
    }
}
