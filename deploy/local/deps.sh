#!/usr/bin/env bash
# The system packages jobmeter needs, each checked against the exact file the
# build, the tests or the local broker use — not a look-alike (libclang-cpp is
# not libclang) — and installed with apt-get when run as root on Debian or
# Ubuntu.
#
#   deploy/local/deps.sh check [GROUP...]    name every missing package; exit 1 if any
#   deploy/local/deps.sh install [GROUP...]  install what is missing (root + apt-get),
#                                            or name it and exit 1
#
# Groups (default: all of them):
#   build   C and C++ compilers, libc headers, make (librdkafka, RocksDB),
#           pkg-config + OpenSSL (rdkafka's ssl, the HTTP client), zlib,
#           libclang and clang's builtin headers (bindgen, for RocksDB)
#   broker  Java 17 or newer and Maven (the local Kafka broker)
#   tools   curl (the demo's readiness checks)
#
# Output of `check`: one line per missing package,
#   missing <debian-package>: <the file or command that was looked for>
#
# JOBMETER_DEPS_ROOT stands in for / when looking for files (the tests build an
# incomplete root there); commands are looked up on PATH.
set -euo pipefail

root="${JOBMETER_DEPS_ROOT:-}"
missing=()
reasons=()

need() { # need PACKAGE REASON
  local p
  for p in "${missing[@]}"; do [ "$p" = "$1" ] && return 0; done
  missing+=("$1")
  reasons+=("$2")
}

# True when at least one path matches one of the glob patterns (under $root).
any_file() {
  local pat
  for pat in "$@"; do
    compgen -G "$root$pat" >/dev/null && return 0
  done
  return 1
}

have() { command -v "$1" >/dev/null 2>&1; }

# bindgen (through clang-sys) loads libclang.so, libclang.so.N or
# libclang-N.so*, from LIBCLANG_PATH or the usual library folders. Debian
# machines often ship libclang-cpp.so.N (a different library, the C++ API)
# without it, so the pattern never accepts "libclang-cpp".
libclang_found() {
  local dirs=() d
  if [ -n "${LIBCLANG_PATH:-}" ]; then dirs+=("${LIBCLANG_PATH#"$root"}"); fi
  dirs+=(/usr/lib/llvm-*/lib /usr/lib/*-linux-gnu /usr/lib /usr/lib64 /usr/local/lib /usr/local/lib64)
  for d in "${dirs[@]}"; do
    any_file "$d/libclang.so" "$d/libclang.so.[0-9]*" "$d/libclang-[0-9]*.so" "$d/libclang-[0-9]*.so.*" && return 0
  done
  return 1
}

# libclang parses RocksDB's C header with clang's own builtin headers
# (stddef.h, stdbool.h), which live in its resource folder.
clang_headers_found() {
  any_file "/usr/lib/llvm-*/lib/clang/*/include/stddef.h" "/usr/lib/clang/*/include/stddef.h" \
    "/usr/lib64/clang/*/include/stddef.h" "/usr/local/lib/clang/*/include/stddef.h"
}

java_major() {
  have java || { echo 0; return; }
  local out re='version "([0-9]+)(\.([0-9]+))?'
  out="$(java -version 2>&1 || true)"
  if [[ $out =~ $re ]]; then
    # Java 8 and older print 1.N
    if [ "${BASH_REMATCH[1]}" = 1 ]; then echo "${BASH_REMATCH[3]:-0}"; else echo "${BASH_REMATCH[1]}"; fi
  else
    echo 0
  fi
}

check_build() {
  have cc || need gcc "a C compiler on PATH (cc)"
  have c++ || need g++ "a C++ compiler on PATH (c++)"
  have make || need make "make on PATH"
  any_file /usr/include/stdio.h || need libc6-dev "C library headers (/usr/include/stdio.h)"
  have pkg-config || need pkg-config "pkg-config on PATH (finds OpenSSL for rdkafka)"
  { any_file /usr/include/openssl/ssl.h &&
    any_file "/usr/lib/*/pkgconfig/openssl.pc" /usr/lib/pkgconfig/openssl.pc /usr/lib64/pkgconfig/openssl.pc /usr/share/pkgconfig/openssl.pc; } ||
    need libssl-dev "OpenSSL headers and openssl.pc (/usr/include/openssl/ssl.h, <libdir>/pkgconfig/openssl.pc)"
  { any_file /usr/include/zlib.h && any_file "/usr/lib/*/libz.so" /usr/lib/libz.so /usr/lib64/libz.so; } ||
    need zlib1g-dev "zlib headers and link library (/usr/include/zlib.h, <libdir>/libz.so)"
  libclang_found || need libclang-dev "libclang for bindgen (libclang.so, libclang.so.N or libclang-N.so*; libclang-cpp does not count)"
  clang_headers_found || need libclang-dev "clang's builtin headers (/usr/lib/llvm-*/lib/clang/*/include/stddef.h)"
}

check_broker() {
  local jv
  jv="$(java_major)"
  [ "${jv:-0}" -ge 17 ] 2>/dev/null || need openjdk-17-jre-headless "java 17 or newer on PATH (found: ${jv/#0/none})"
  have mvn || need maven "mvn on PATH (resolves the Kafka broker's jars)"
}

check_tools() {
  have curl || need curl "curl on PATH"
}

run_checks() {
  local groups=("$@") g
  ((${#groups[@]})) || groups=(build broker tools)
  for g in "${groups[@]}"; do
    case "$g" in
      build) check_build ;;
      broker) check_broker ;;
      tools) check_tools ;;
      *) echo "deps: unknown group '$g' (build, broker, tools)" >&2; exit 2 ;;
    esac
  done
}

report() {
  local i
  for i in "${!missing[@]}"; do echo "missing ${missing[$i]}: ${reasons[$i]}"; done
}

mode="${1:-}"
shift || true
case "$mode" in
  check)
    run_checks "$@"
    report
    ((${#missing[@]} == 0))
    ;;
  install)
    run_checks "$@"
    ((${#missing[@]})) || exit 0
    if [ "$EUID" = 0 ] && have apt-get && [ -z "$root" ]; then
      echo "[deps] installing with apt-get: ${missing[*]}" >&2
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
      missing=() reasons=()
      run_checks "$@"
      if ((${#missing[@]})); then
        report >&2
        echo "[deps] error: still missing after apt-get install (see above)" >&2
        exit 1
      fi
      echo "[deps] installed" >&2
    else
      report >&2
      echo "[deps] error: missing system packages; install them, e.g.: sudo apt-get install ${missing[*]}" >&2
      exit 1
    fi
    ;;
  *) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
