//! The offline binary's exit statuses, as `docs/tools.md` states them: 0 when a
//! command ran, 2 with `error: …` naming the file or flag when it could
//! not.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn offline(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_jobmeter-offline"))
        .current_dir(root())
        .args(args)
        .output()
        .expect("run jobmeter-offline")
}

#[test]
fn check_config_exits_0_on_valid_files_and_2_naming_the_bad_one() {
    let ok = offline(&[
        "check-config",
        "--rate-card",
        "config/rate-card.toml",
        "--plans",
        "config/plans.toml",
    ]);
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("ok: "));

    let missing = offline(&["check-config", "--rate-card", "/no/such/card.toml"]);
    assert_eq!(missing.status.code(), Some(2));
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("/no/such/card.toml"),
        "{err}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("card.toml");
    std::fs::write(&bad, "this is = = not toml").expect("write");
    let invalid = offline(&["check-config", "--rate-card", bad.to_str().expect("utf-8")]);
    assert_eq!(invalid.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&invalid.stderr).contains("card.toml"));
}

#[test]
fn a_bad_flag_or_a_fleet_with_nowhere_to_go_is_refused() {
    let bad_rate = offline(&["simulate", "--duplicates", "1001", "--events-out", "/dev/null"]);
    assert_eq!(bad_rate.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_rate.stderr).contains("--duplicates 1001"));

    let nowhere = offline(&["simulate", "--jobs", "10"]);
    assert_eq!(nowhere.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&nowhere.stderr).contains("--events-out"));

    // clap's own refusal of an unknown flag is also 2.
    let unknown = offline(&["replay", "--no-such-flag"]);
    assert_eq!(unknown.status.code(), Some(2));
}
