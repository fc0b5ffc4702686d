//! The system-package check of `./dev deps` (`deploy/local/deps.sh`), run
//! against deliberately incomplete machines: a temporary root holding only
//! some of the files the build uses and a PATH holding only some commands.
//! It must name exactly the missing packages, so a check that looks at the
//! wrong file (libclang-cpp for libclang) fails here even on a machine that
//! has everything installed.

use crate::support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const ALL: [&str; 11] = [
    "curl",
    "g++",
    "gcc",
    "libc6-dev",
    "libclang-dev",
    "libssl-dev",
    "make",
    "maven",
    "openjdk-17-jre-headless",
    "pkg-config",
    "zlib1g-dev",
];

/// A fake machine: files under `root`, commands in `bin`.
struct Machine {
    dir: tempfile::TempDir,
}

impl Machine {
    fn new() -> Machine {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("root")).expect("root");
        std::fs::create_dir_all(dir.path().join("bin")).expect("bin");
        Machine { dir }
    }

    fn root(&self) -> std::path::PathBuf {
        self.dir.path().join("root")
    }

    fn file(&self, path: &str) -> &Self {
        let p = self.root().join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, b"").expect("write");
        self
    }

    fn command(&self, name: &str, script: &str) -> &Self {
        use std::os::unix::fs::PermissionsExt;
        let p = self.dir.path().join("bin").join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{script}\n")).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        self
    }

    /// A Debian 12 machine with everything the build needs except libclang,
    /// but with libclang-cpp (what such machines ship).
    fn debian_without_libclang() -> Machine {
        let m = Machine::new();
        for c in ["cc", "c++", "make", "pkg-config", "mvn", "curl"] {
            m.command(c, "exit 0");
        }
        m.command("java", "echo 'openjdk version \"17.0.15\" 2025-04-15' >&2");
        m.file("/usr/include/stdio.h")
            .file("/usr/include/openssl/ssl.h")
            .file("/usr/lib/x86_64-linux-gnu/pkgconfig/openssl.pc")
            .file("/usr/include/zlib.h")
            .file("/usr/lib/x86_64-linux-gnu/libz.so")
            .file("/usr/lib/x86_64-linux-gnu/libclang-cpp.so.14")
            .file("/usr/lib/llvm-14/lib/libclang-cpp.so.14")
            .file("/usr/lib/llvm-14/lib/libclang-cpp.so")
            .file("/usr/lib/llvm-14/lib/clang/14.0.6/include/stddef.h");
        m
    }

    /// Runs `deps.sh <mode>`; returns the exit code, the packages it named
    /// and its whole output.
    fn run(&self, mode: &str, env: &[(&str, String)]) -> (i32, BTreeSet<String>, String) {
        let script = support::root().join("deploy/local/deps.sh");
        let mut cmd = Command::new("/bin/bash");
        cmd.arg(&script)
            .arg(mode)
            .env_clear()
            .env("PATH", self.dir.path().join("bin"))
            .env("JOBMETER_DEPS_ROOT", self.root());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run deps.sh");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let named = text
            .lines()
            .filter_map(|l| l.strip_prefix("missing "))
            .filter_map(|l| l.split(':').next())
            .map(str::to_owned)
            .collect();
        (out.status.code().unwrap_or(-1), named, text)
    }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn an_empty_machine_lacks_every_package() {
    let m = Machine::new();
    let (code, named, text) = m.run("check", &[]);
    assert_eq!(code, 1, "{text}");
    assert_eq!(named, set(&ALL), "{text}");
}

#[test]
fn libclang_cpp_is_not_libclang() {
    let m = Machine::debian_without_libclang();
    let (code, named, text) = m.run("check", &[]);
    assert_eq!(code, 1, "{text}");
    assert_eq!(named, set(&["libclang-dev"]), "{text}");
}

#[test]
fn a_complete_machine_lacks_nothing() {
    let m = Machine::debian_without_libclang();
    m.file("/usr/lib/llvm-14/lib/libclang.so.1");
    let (code, named, text) = m.run("check", &[]);
    assert_eq!((code, named), (0, set(&[])), "{text}");
    // The versioned name in the multiarch folder counts too.
    let m = Machine::debian_without_libclang();
    m.file("/usr/lib/x86_64-linux-gnu/libclang-14.so.14.0.6");
    let (code, named, text) = m.run("check", &[]);
    assert_eq!((code, named), (0, set(&[])), "{text}");
}

#[test]
fn libclang_without_its_builtin_headers_is_not_enough() {
    let m = Machine::debian_without_libclang();
    m.file("/usr/lib/llvm-14/lib/libclang.so.1");
    std::fs::remove_file(m.root().join("usr/lib/llvm-14/lib/clang/14.0.6/include/stddef.h")).expect("rm");
    let (code, named, text) = m.run("check", &[]);
    assert_eq!((code, named), (1, set(&["libclang-dev"])), "{text}");
}

#[test]
fn libclang_path_is_honoured() {
    let m = Machine::debian_without_libclang();
    m.file("/opt/llvm/lib/libclang-17.so.17");
    let path = m.root().join("opt/llvm/lib").display().to_string();
    let (code, named, text) = m.run("check", &[("LIBCLANG_PATH", path)]);
    assert_eq!((code, named), (0, set(&[])), "{text}");
}

#[test]
fn java_older_than_17_is_missing_java_17() {
    for version in ["11.0.22", "1.8.0_392"] {
        let m = Machine::debian_without_libclang();
        m.file("/usr/lib/llvm-14/lib/libclang.so.1");
        m.command("java", &format!("echo 'openjdk version \"{version}\"' >&2"));
        let (code, named, text) = m.run("check", &[]);
        assert_eq!(
            (code, named),
            (1, set(&["openjdk-17-jre-headless"])),
            "{version}: {text}"
        );
    }
}

#[test]
fn headers_without_pkg_config_files_or_link_libraries_are_missing() {
    let m = Machine::debian_without_libclang();
    m.file("/usr/lib/llvm-14/lib/libclang.so.1");
    std::fs::remove_file(m.root().join("usr/lib/x86_64-linux-gnu/pkgconfig/openssl.pc")).expect("rm");
    std::fs::remove_file(m.root().join("usr/lib/x86_64-linux-gnu/libz.so")).expect("rm");
    std::fs::remove_file(Path::new(&m.dir.path().join("bin/c++"))).expect("rm");
    let (code, named, text) = m.run("check", &[]);
    assert_eq!((code, named), (1, set(&["g++", "libssl-dev", "zlib1g-dev"])), "{text}");
}

#[test]
fn install_on_a_stand_in_root_names_and_never_installs() {
    let m = Machine::debian_without_libclang();
    // apt-get would succeed if called: it must not be, for a stand-in root.
    m.command("apt-get", "echo apt-get was called; exit 0");
    let (code, named, text) = m.run("install", &[]);
    assert_eq!(code, 1, "{text}");
    assert_eq!(named, set(&["libclang-dev"]), "{text}");
    assert!(!text.contains("apt-get was called"), "{text}");
    assert!(text.contains("sudo apt-get install libclang-dev"), "{text}");
}
