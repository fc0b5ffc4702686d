//! HTTPS on the API and metrics listener (`[http.tls]`), with the system's
//! OpenSSL.
//!
//! The certificate chain and key are PEM files. They are checked at start
//! (a missing file, a file that is not PEM, a certificate that does not
//! match its key: a configuration error naming the setting) and read
//! again every `http.tls.reload_check`: when either changed, the new pair
//! serves every connection accepted from then on. A pair that does not
//! load (a renewal caught between writing the certificate and the key) is
//! logged and counted, and the previous pair goes on serving until the
//! files load again.

use crate::metrics::InstanceMetrics;
use axum::Router;
use jobmeter_offline::dur::Dur;
use openssl::asn1::Asn1Time;
use openssl::pkey::PKey;
use openssl::ssl::{Ssl, SslAcceptor, SslMethod};
use openssl::x509::X509;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// `[http.tls]`: HTTPS on the API and metrics listener. Both files are
/// PEM and are read again when they change (a renewed certificate needs no
/// restart); a pair that does not load is reported and the previous one
/// kept.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// How often the files are checked for a change.
    #[serde(default = "TlsConfig::default_reload_check")]
    pub reload_check: Dur,
}

impl TlsConfig {
    fn default_reload_check() -> Dur {
        Dur::from_ms(10_000)
    }
}

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections may finish their requests at shutdown.
const DRAIN: Duration = Duration::from_secs(10);

/// Why a certificate and key cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("{setting} {path}: {source}")]
    Read {
        /// `http.tls.cert` or `http.tls.key`.
        setting: &'static str,
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not what it should be.
    #[error("{setting} {path}: {problem}")]
    Parse {
        /// `http.tls.cert` or `http.tls.key`.
        setting: &'static str,
        /// The file.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// The key is not the certificate's.
    #[error("the certificate in {cert} does not match the key in {key}")]
    Mismatch {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
    },
    /// OpenSSL refused to set up the server.
    #[error("OpenSSL: {0}")]
    Ssl(#[from] openssl::error::ErrorStack),
}

/// A loaded certificate and key, ready to accept connections.
pub struct Pair {
    acceptor: SslAcceptor,
    /// When the leaf certificate expires (Unix seconds).
    pub not_after: i64,
    /// What the files held (so a check can tell they changed).
    digest: [u8; 32],
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        setting,
        path: path.display().to_string(),
        source,
    })
}

fn digest(cert: &[u8], key: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((cert.len() as u64).to_le_bytes());
    h.update(cert);
    h.update(key);
    h.finalize().into()
}

impl Pair {
    /// Reads and checks the files of `cfg`.
    pub fn load(cfg: &TlsConfig) -> Result<Pair, TlsError> {
        let cert = read("http.tls.cert", &cfg.cert)?;
        let key = read("http.tls.key", &cfg.key)?;
        Pair::from_pem(&cert, &key, cfg)
    }

    fn from_pem(cert: &[u8], key: &[u8], cfg: &TlsConfig) -> Result<Pair, TlsError> {
        let parse = |setting, path: &Path, problem: String| TlsError::Parse {
            setting,
            path: path.display().to_string(),
            problem,
        };
        let chain = X509::stack_from_pem(cert)
            .map_err(|e| parse("http.tls.cert", &cfg.cert, format!("not a PEM certificate chain ({e})")))?;
        let Some(leaf) = chain.first() else {
            return Err(parse("http.tls.cert", &cfg.cert, "holds no certificate".into()));
        };
        let pkey = PKey::private_key_from_pem(key)
            .map_err(|e| parse("http.tls.key", &cfg.key, format!("not a PEM private key ({e})")))?;
        let mismatch = || TlsError::Mismatch {
            cert: cfg.cert.display().to_string(),
            key: cfg.key.display().to_string(),
        };
        if !leaf.public_key()?.public_eq(&pkey) {
            return Err(mismatch());
        }
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
        b.set_certificate(leaf)?;
        for c in &chain[1..] {
            b.add_extra_chain_cert(c.clone())?;
        }
        b.set_private_key(&pkey)?;
        b.check_private_key().map_err(|_| mismatch())?;
        let since_epoch = Asn1Time::from_unix(0)?.diff(leaf.not_after())?;
        Ok(Pair {
            acceptor: b.build(),
            not_after: i64::from(since_epoch.days) * 86_400 + i64::from(since_epoch.secs),
            digest: digest(cert, key),
        })
    }
}

/// The pair that serves new connections, replaced when the files change.
#[derive(Clone)]
pub struct Served {
    current: Arc<RwLock<Arc<SslAcceptor>>>,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served").finish_non_exhaustive()
    }
}

impl Served {
    fn now(&self) -> Arc<SslAcceptor> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, acceptor: SslAcceptor) {
        let new = Arc::new(acceptor);
        match self.current.write() {
            Ok(mut g) => *g = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }
}

/// Loads the pair at start (counted and shown in the metrics), and keeps
/// it current from the files until `shutdown`.
pub fn start(cfg: &TlsConfig, metrics: &InstanceMetrics, shutdown: &CancellationToken) -> Result<Served, TlsError> {
    let first = Pair::load(cfg)?;
    metrics.tls_loads.with_label_values(&["loaded"]).inc();
    metrics.tls_not_after.set(first.not_after);
    tracing::info!(cert = %cfg.cert.display(), not_after = first.not_after, "serving HTTPS");
    warn_if_expired(cfg, first.not_after);
    let served = Served {
        current: Arc::new(RwLock::new(Arc::new(first.acceptor))),
    };
    let (cfg, s, m, stop) = (cfg.clone(), served.clone(), metrics.clone(), shutdown.clone());
    tokio::spawn(async move { watch(cfg, first.digest, s, m, stop).await });
    Ok(served)
}

/// Clients refuse an expired certificate: say so (it is served all the
/// same, so that a renewal arriving later is picked up).
fn warn_if_expired(cfg: &TlsConfig, not_after: i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if not_after <= now {
        tracing::warn!(cert = %cfg.cert.display(), not_after, "the HTTPS certificate has expired: clients will refuse it");
    }
}

/// Checks the files every `reload_check` and serves a changed pair once it
/// loads.
async fn watch(cfg: TlsConfig, mut seen: [u8; 32], served: Served, metrics: InstanceMetrics, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(cfg.reload_check.std()) => {}
            () = stop.cancelled() => return,
        }
        let paths = (cfg.cert.clone(), cfg.key.clone());
        let files = tokio::task::spawn_blocking(move || (std::fs::read(&paths.0), std::fs::read(&paths.1))).await;
        let Ok((Ok(cert), Ok(key))) = files else {
            // Being replaced (a Kubernetes secret swaps a symlink): the
            // next check sees the new files.
            continue;
        };
        let now = digest(&cert, &key);
        if now == seen {
            continue;
        }
        seen = now;
        match Pair::from_pem(&cert, &key, &cfg) {
            Ok(pair) => {
                served.replace(pair.acceptor);
                metrics.tls_loads.with_label_values(&["loaded"]).inc();
                metrics.tls_not_after.set(pair.not_after);
                tracing::info!(cert = %cfg.cert.display(), not_after = pair.not_after, "HTTPS certificate reloaded");
                warn_if_expired(&cfg, pair.not_after);
            }
            Err(e) => {
                metrics.tls_loads.with_label_values(&["failed"]).inc();
                tracing::error!(error = %e, "HTTPS certificate changed but does not load; the previous one still serves");
            }
        }
    }
}

/// Serves `app` over HTTPS until `shutdown`, then lets open requests finish
/// (for a while).
pub async fn serve(listener: tokio::net::TcpListener, app: Router, served: Served, shutdown: CancellationToken) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: pause, go on.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let (acceptor, app, watcher) = (served.now(), app.clone(), graceful.watcher());
        tokio::spawn(async move {
            let Ok(stream) = Ssl::new(acceptor.context()).and_then(|ssl| tokio_openssl::SslStream::new(ssl, tcp))
            else {
                return;
            };
            let mut stream = Box::pin(stream);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, Pin::as_mut(&mut stream).accept()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            }
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT)
                .serve_connection(
                    hyper_util::rt::TokioIo::new(stream),
                    hyper_util::service::TowerToHyperService::new(app),
                );
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "HTTPS connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        tracing::warn!("HTTPS connections still open at shutdown were closed");
    }
}

/// A self-signed certificate for `names` (DNS names or IP addresses),
/// valid from now for `days`, and its key, both PEM: for tests and local
/// trials of HTTPS, never for a deployment that others reach.
pub fn self_signed(names: &[&str], days: u32) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    use openssl::bn::{BigNum, MsbOption};
    use openssl::ec::{EcGroup, EcKey};
    use openssl::hash::MessageDigest;
    use openssl::nid::Nid;
    use openssl::x509::extension::SubjectAlternativeName;
    use openssl::x509::X509NameBuilder;

    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    let key = PKey::from_ec_key(EcKey::generate(&group)?)?;
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_nid(Nid::COMMONNAME, names.first().copied().unwrap_or("localhost"))?;
    let name = name.build();
    let mut serial = BigNum::new()?;
    serial.rand(64, MsbOption::MAYBE_ZERO, false)?;
    let mut b = X509::builder()?;
    b.set_version(2)?;
    let serial = serial.to_asn1_integer()?;
    b.set_serial_number(&serial)?;
    b.set_subject_name(&name)?;
    b.set_issuer_name(&name)?;
    b.set_pubkey(&key)?;
    let (from, to) = (Asn1Time::days_from_now(0)?, Asn1Time::days_from_now(days)?);
    b.set_not_before(&from)?;
    b.set_not_after(&to)?;
    let mut san = SubjectAlternativeName::new();
    for n in names {
        if n.parse::<std::net::IpAddr>().is_ok() {
            san.ip(n);
        } else {
            san.dns(n);
        }
    }
    let san = san.build(&b.x509v3_context(None, None))?;
    b.append_extension(san)?;
    b.sign(&key, MessageDigest::sha256())?;
    Ok((b.build().to_pem()?, key.private_key_to_pem_pkcs8()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> TlsConfig {
        TlsConfig {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            reload_check: Dur::from_ms(1_000),
        }
    }

    fn write(c: &TlsConfig, cert: &[u8], key: &[u8]) {
        std::fs::write(&c.cert, cert).expect("cert");
        std::fs::write(&c.key, key).expect("key");
    }

    #[test]
    fn a_self_signed_pair_loads_with_its_expiry() {
        let dir = tempfile::tempdir().expect("dir");
        let c = cfg(dir.path());
        let (cert, key) = self_signed(&["localhost", "127.0.0.1"], 30).expect("pair");
        write(&c, &cert, &key);
        let pair = Pair::load(&c).expect("loads");
        let in_30_days = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64
            + 30 * 86_400;
        assert!((pair.not_after - in_30_days).abs() < 120, "{}", pair.not_after);
    }

    #[test]
    fn a_certificate_with_another_key_is_refused_naming_both_files() {
        let dir = tempfile::tempdir().expect("dir");
        let c = cfg(dir.path());
        let (cert, _) = self_signed(&["localhost"], 1).expect("pair");
        let (_, other_key) = self_signed(&["localhost"], 1).expect("pair");
        write(&c, &cert, &other_key);
        let e = Pair::load(&c).expect_err("mismatch").to_string();
        assert!(e.contains("does not match"), "{e}");
        assert!(e.contains("cert.pem") && e.contains("key.pem"), "{e}");
    }

    #[test]
    fn missing_empty_and_swapped_files_name_the_setting() {
        let dir = tempfile::tempdir().expect("dir");
        let c = cfg(dir.path());
        let missing = Pair::load(&c).expect_err("missing").to_string();
        assert!(missing.starts_with("http.tls.cert "), "{missing}");
        let (cert, key) = self_signed(&["localhost"], 1).expect("pair");
        write(&c, b"", &key);
        let empty = Pair::load(&c).expect_err("empty").to_string();
        assert!(empty.starts_with("http.tls.cert "), "{empty}");
        // The key where the certificate goes and the other way round.
        write(&c, &key, &cert);
        let swapped = Pair::load(&c).expect_err("swapped").to_string();
        assert!(swapped.starts_with("http.tls.cert "), "{swapped}");
        write(&c, &cert, &cert);
        let no_key = Pair::load(&c).expect_err("no key").to_string();
        assert!(
            no_key.starts_with("http.tls.key ") && no_key.contains("not a PEM private key"),
            "{no_key}"
        );
    }
}
