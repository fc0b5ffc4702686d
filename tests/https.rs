//! HTTPS on the meter's API and metrics listener with a self-signed pair:
//! served to a client that trusts it, not to plain HTTP; a renewed pair is
//! picked up without a restart, a half-written renewal (certificate and
//! key that do not match) keeps the previous pair serving; a pair that does
//! not match refuses to start the meter, naming both files.

use crate::support;

use openssl::ssl::{SslConnector, SslMethod};
use openssl::x509::X509;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;
use support::*;

/// GET `path` over HTTPS on 127.0.0.1:`port`, trusting only `ca` (PEM) for
/// the name `localhost`: the status and body, or why the connection failed.
fn https_get(port: u16, path: &str, ca: &[u8]) -> Result<(u16, String), String> {
    let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(|e| e.to_string())?;
    let ca = X509::from_pem(ca).map_err(|e| e.to_string())?;
    b.cert_store_mut().add_cert(ca).map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut s = b.build().connect("localhost", tcp).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut text = String::new();
    // A close without close_notify ends the read with an error after the
    // whole answer has arrived.
    let _ = s.read_to_string(&mut text);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP answer: {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    Ok((status, body))
}

/// Replaces `path` at once (a reader never sees half a file).
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

#[test]
#[cfg_attr(
    not(feature = "broker"),
    ignore = "needs a local Kafka broker: ./dev test, or cargo test --features jobmeter-it/broker"
)]
fn serves_https_and_picks_up_a_renewed_certificate_without_a_restart() {
    let prefix = fresh_prefix("https");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let names = ["localhost", "127.0.0.1"];
    let (cert_a, key_a) = jobmeter_service::tls::self_signed(&names, 30).expect("pair a");
    let (cert_b, key_b) = jobmeter_service::tls::self_signed(&names, 60).expect("pair b");
    replace(&cert, &cert_a);
    replace(&key, &key_a);

    let mut spec = MeterSpec::new(&prefix, "https-0", dir.path().join("state"), 1);
    let c = format!("http.tls.cert={}", cert.display());
    let k = format!("http.tls.key={}", key.display());
    spec.extra = ["--set", &c, "--set", &k, "--set", "http.tls.reload_check=1s"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let mut meter = spec.start();
    let port: u16 = meter
        .http
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    wait_until("HTTPS answers", Duration::from_secs(60), &[&meter], || {
        https_get(port, "/healthz", &cert_a).is_ok_and(|(s, _)| s == 200)
    });
    // Plain HTTP on the same port gets no HTTP answer.
    let mut plain = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    plain.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let _ = plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).contains("200 OK"),
        "plain HTTP must not be served"
    );
    let (_, metrics) = https_get(port, "/metrics", &cert_a).expect("metrics");
    assert_eq!(
        metric(&metrics, "jobmeter_http_tls_loads_total{outcome=\"loaded\"}"),
        Some(1.0)
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let not_after = metric(&metrics, "jobmeter_http_tls_certificate_not_after_seconds").expect("expiry");
    assert!((not_after - (now + 30.0 * 86_400.0)).abs() < 300.0, "{not_after}");

    // A renewal caught half-written: B's certificate with A's key. Counted
    // as failed; A goes on serving.
    replace(&cert, &cert_b);
    wait_until("the failed load counted", Duration::from_secs(30), &[&meter], || {
        https_get(port, "/metrics", &cert_a)
            .is_ok_and(|(_, m)| metric(&m, "jobmeter_http_tls_loads_total{outcome=\"failed\"}") == Some(1.0))
    });
    assert!(meter.log_tail().contains("does not match"), "{}", meter.log_tail());
    // The key arrives: B serves new connections, A is gone.
    replace(&key, &key_b);
    wait_until("the renewed pair serves", Duration::from_secs(30), &[&meter], || {
        https_get(port, "/healthz", &cert_b).is_ok_and(|(s, _)| s == 200)
    });
    let old = https_get(port, "/healthz", &cert_a).expect_err("a client that trusts only A");
    assert!(old.contains("certificate verify failed"), "{old}");
    assert_eq!(meter.terminate(), Some(0), "clean exit");

    // A pair that does not match refuses to start, naming both files.
    replace(&key, &key_a);
    let out = spec.command("run", 0).output().expect("jobmeter run");
    let err = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        err.contains("does not match") && err.contains("tls.crt") && err.contains("tls.key"),
        "{err}"
    );
}
