#!/usr/bin/env bash
# WebSocket conformance (README, tests): runs the Autobahn|TestSuite fuzzing client
# (`wstest -m fuzzingclient`) against the router, through a raw route served
# by the Rust echo worker, so the whole path is tested (WebSocket library,
# session, bridge, ZeroMQ, worker SDK and back), not just the library.
#
# Fails (exit 1) on any FAILED case. Compression cases 12.* and 13.* are
# excluded: the router does not negotiate permessage-deflate yet.
#
# Usage: scripts/conformance.sh [--no-build] [--tls] [--help]
#
#   --no-build   use the binaries in ROUTER_BIN_DIR as they are
#   --tls        the router serves TLS (a certificate made here with openssl)
#                and the suite connects over wss://
#
# Environment:
#   ROUTER_BIN_DIR    where `router` and `examples/echo_worker` are
#                     (${CARGO_TARGET_DIR:-<repo>/target}/debug; debug builds pass too)
#   AUTOBAHN_DIR      cache for the Python 2.7 virtualenv and the reports
#                     (${CARGO_TARGET_DIR:-<repo>/target}/autobahn)
#   AUTOBAHN_CASES    cases to run, a JSON list ('["*"]'); e.g. '["1.*","9.1.*"]'
#   WSTEST_TIMEOUT_S  bound on the whole wstest run (900)
#
# The conformance route allows messages up to 16 MiB (maxMessageBytes
# 16777216), the largest that Autobahn's 9.* cases send, so every case is
# expected to pass outright. With a lower route limit those cases would be
# closed with 1009, which Autobahn reports as FAILED for 9.*: the route here
# deliberately allows them.
#
# Python 2.7.18 comes from pyenv (the suite has no Python 3 port); the
# virtualenv is built once with pinned packages and reused.

set -euo pipefail

build=1
tls=0
for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        --tls) tls=1 ;;
        -h | --help) sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "unknown option: $arg" >&2; exit 2 ;;
    esac
done

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
target_dir=${CARGO_TARGET_DIR:-$repo_root/target}
[[ $target_dir == /* ]] || target_dir=$repo_root/$target_dir
bin_dir=${ROUTER_BIN_DIR:-$target_dir/debug}
[[ $bin_dir == /* ]] || bin_dir=$repo_root/$bin_dir
cache=${AUTOBAHN_DIR:-$target_dir/autobahn}
cases=${AUTOBAHN_CASES:-'["*"]'}
wstest_timeout_s=${WSTEST_TIMEOUT_S:-900}

say() { printf '[conformance] %s\n' "$*"; }
die() { printf '[conformance] error: %s\n' "$*" >&2; exit 1; }

started=$SECONDS

# ---------------------------------------------------------------------------
# 1. wstest in a Python 2.7 virtualenv (cached; rebuilt when the pins change)
# ---------------------------------------------------------------------------
PINS=(
    txaio==2.1.0 incremental==16.10.1 pyOpenSSL==19.1.0 cryptography==3.3.2
    Twisted==19.10.0 zope.interface==4.6.0 jinja2==2.11.3 markupsafe==1.1.1
    Werkzeug==1.0.1 klein==17.10.0 service_identity==18.1.0 unittest2==1.1.0
    six==1.16.0 'autobahn[twisted,accelerate]==0.10.9' autobahntestsuite==0.8.2
)
venv=$cache/wstest-venv
stamp=$venv/.pins
# A virtualenv's scripts name its interpreter by absolute path: one that was
# moved with its target directory is made again.
if [[ ! -x $venv/bin/wstest || $(cat "$stamp" 2>/dev/null) != "${PINS[*]}" ||
    $(head -n 1 "$venv/bin/wstest") != "#!$venv/bin/python"* ]]; then
    command -v pyenv >/dev/null || die "pyenv not found: Python 2.7.18 from pyenv is needed"
    py2=$(pyenv root)/versions/2.7.18/bin/python
    [[ -x $py2 ]] || die "no Python 2.7.18 at $py2 (pyenv install 2.7.18)"
    say "creating the wstest virtualenv in $venv"
    rm -rf "$venv" "$cache/py2tools"
    mkdir -p "$cache"
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_PYTHON_VERSION_WARNING=1
    timeout 300 "$py2" -m pip install -q --target "$cache/py2tools" 'virtualenv<20.22'
    PYTHONPATH=$cache/py2tools timeout 120 "$py2" -m virtualenv -q "$venv"
    timeout 600 "$venv/bin/pip" install -q "${PINS[@]}"
    printf '%s' "${PINS[*]}" >"$stamp"
fi

# ---------------------------------------------------------------------------
# 2. the router and the echo worker
# ---------------------------------------------------------------------------
if ((build)); then
    profile=()
    [[ $bin_dir == */release ]] && profile=(--release)
    say "building router and echo_worker (${profile[*]:-debug})"
    cargo build "${profile[@]}" -p router --bin router
    cargo build "${profile[@]}" -p worker-sdk --example echo_worker
fi
router_bin=$bin_dir/router
worker_bin=$bin_dir/examples/echo_worker
[[ -x $router_bin ]] || die "no router binary at $router_bin"
[[ -x $worker_bin ]] || die "no echo_worker binary at $worker_bin"

work=$(mktemp -d "${TMPDIR:-/tmp}/conformance.XXXXXX")
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        # Bounded: a process that ignores SIGTERM is killed after ~5 s.
        for _ in {1..50}; do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

cat >"$work/routes.json" <<'EOF'
{
  "description": "Autobahn conformance: one raw route, echoed by echo_worker; 16 MiB messages allowed for the 9.* cases.",
  "routes": [
    {
      "path": "/autobahn",
      "service": "echo",
      "raw": true,
      "maxMessageBytes": 16777216
    }
  ]
}
EOF

# Waits (bounded) until file $1 holds a line matching $2; prints that line.
wait_line() {
    local file=$1 pattern=$2 what=$3 pid=$4 deadline=$((SECONDS + 60)) line
    while ((SECONDS < deadline)); do
        line=$(grep -m1 -- "$pattern" "$file" 2>/dev/null || true)
        if [[ -n $line ]]; then printf '%s\n' "$line"; return 0; fi
        kill -0 "$pid" 2>/dev/null || { tail -20 "${file%.out}.err" >&2; die "$what exited early"; }
        sleep 0.1
    done
    die "$what did not start within 60 s"
}

tls_args=()
scheme=ws
if ((tls)); then
    # The suite's client does not verify certificates; any self-signed one does.
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$work/key.pem" -out "$work/cert.pem" -days 2 -subj /CN=localhost \
        -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null \
        || die "openssl could not make a certificate (apt-get install openssl)"
    tls_args=(--tls-cert "$work/cert.pem" --tls-key "$work/key.pem")
    scheme=wss
fi

# Rate limits off: the suite opens ~300 connections and sends bursts of
# 1000 frames, which the default per-connection limits would refuse.
ENABLE_RATE_LIMIT=false RUST_LOG=${RUST_LOG:-warn} "$router_bin" --port 0 --routes "$work/routes.json" \
    --bridge-endpoint tcp://127.0.0.1:0 --publish-endpoint tcp://127.0.0.1:0 "${tls_args[@]}" \
    >"$work/router.out" 2>"$work/router.err" &
router_pid=$!
pids+=("$router_pid")
listening=$(wait_line "$work/router.out" '"event":"listening"' router "$router_pid")
http=$(sed -E 's/.*"http":"([^"]+)".*/\1/' <<<"$listening")
bridge=$(sed -E 's/.*"bridge":"([^"]+)".*/\1/' <<<"$listening")
RUST_LOG=${RUST_LOG:-warn} "$worker_bin" --bridge-endpoint "$bridge" --service echo --capacity 64 \
    >"$work/worker.out" 2>"$work/worker.err" &
worker_pid=$!
pids+=("$worker_pid")
wait_line "$work/worker.out" '"event":"registered"' echo_worker "$worker_pid" >/dev/null
say "router at $scheme://$http, echo_worker registered"

# ---------------------------------------------------------------------------
# 3. the fuzzing client
# ---------------------------------------------------------------------------
reports=$cache/reports-$scheme
rm -rf "$reports"
mkdir -p "$reports"
cat >"$work/fuzzingclient.json" <<EOF
{
  "options": {"failByDrop": false},
  "outdir": "$reports",
  "servers": [{"agent": "router", "url": "$scheme://$http/autobahn"}],
  "cases": $cases,
  "exclude-cases": ["12.*", "13.*"],
  "exclude-agent-cases": {}
}
EOF
say "running wstest (cases $cases; reports in $reports)"
wstest_started=$SECONDS
if ! (cd "$work" && timeout "$wstest_timeout_s" "$venv/bin/wstest" -m fuzzingclient -s fuzzingclient.json \
    >"$work/wstest.log" 2>&1); then
    tail -30 "$work/wstest.log" >&2
    die "wstest failed or timed out after ${wstest_timeout_s} s"
fi
wstest_s=$((SECONDS - wstest_started))
kill -0 "$router_pid" 2>/dev/null || die "the router died during the run"

# ---------------------------------------------------------------------------
# 4. results
# ---------------------------------------------------------------------------
set +e
"$venv/bin/python" - "$reports/index.json" <<'EOF'
import json, sys
from collections import Counter
index = json.load(open(sys.argv[1]))
results = [(case, r) for agent in index.values() for case, r in agent.items()]
def key(c):
    return [int(p) for p in c.split(".")]
results.sort(key=lambda cr: key(cr[0]))
by = Counter(r["behavior"] for _, r in results)
by_close = Counter(r["behaviorClose"] for _, r in results)
print("[conformance] %d cases: %s" % (len(results), ", ".join("%s %d" % kv for kv in sorted(by.items()))))
print("[conformance] closing behaviour: %s" % ", ".join("%s %d" % kv for kv in sorted(by_close.items())))
for case, r in results:
    if r["behavior"] != "OK" or r["behaviorClose"] not in ("OK", "INFORMATIONAL"):
        print("[conformance]   %-8s %-13s close %-13s %s" % (case, r["behavior"], r["behaviorClose"], r.get("reportfile", "")))
failed = [c for c, r in results
          if (r["behavior"] == "FAILED" or r["behaviorClose"] == "FAILED")
          and not c.startswith(("12.", "13."))]
if not results:
    print("[conformance] no results: did wstest reach the router?")
    sys.exit(1)
if failed:
    print("[conformance] FAILED: %s" % " ".join(failed))
    sys.exit(1)
EOF
status=$?
set -e
say "wstest took ${wstest_s} s; whole script $((SECONDS - started)) s"
if ((status != 0)); then
    say "router log (last lines):"
    tail -20 "$work/router.err" >&2
    exit 1
fi
say "0 FAILED"
