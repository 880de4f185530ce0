#!/usr/bin/env bash
# The project's test command (the README's, and what CI runs).
#
# The end-to-end tests in tests/ start the real `router` binary and the example
# workers as processes, so those binaries are built first; `cargo test` alone
# does not build a workspace's examples for another crate's tests.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Prerequisites, checked in the first second rather than minutes into the run
# (README: set up on a new machine). Each line says what is missing and how
# to get it.
missing=()
if ! command -v cargo >/dev/null; then
    missing+=("cargo: a Rust toolchain, 1.80 or newer (https://rustup.rs)")
elif ! rustc --version 2>/dev/null | awk '{ split($2, v, "."); exit !(v[1] > 1 || (v[1] == 1 && v[2] >= 80)) }'; then
    missing+=("Rust 1.80 or newer (this is $(rustc --version 2>/dev/null || echo 'no rustc'); rustup update stable)")
fi
if ! command -v python3 >/dev/null; then
    missing+=("python3, 3.10 or newer, with venv and pip (Debian/Ubuntu: apt-get install python3 python3-venv)")
elif ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    missing+=("Python 3.10 or newer as python3 (this is $(python3 --version 2>&1))")
elif ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    missing+=("python3's venv and pip (Debian/Ubuntu: apt-get install python3-venv)")
fi
((BASH_VERSINFO[0] >= 5)) ||
    missing+=("bash 5 or newer for the start script (this is $BASH_VERSION; macOS: brew install bash)")
command -v timeout >/dev/null ||
    missing+=("timeout from coreutils (macOS: brew install coreutils)")
if ! command -v pyenv >/dev/null; then
    missing+=("pyenv with Python 2.7.18, for the Autobahn conformance suite, which has no Python 3 port (install pyenv: https://github.com/pyenv/pyenv#installation, then: pyenv install 2.7.18)")
elif [[ ! -x "$(pyenv root)/versions/2.7.18/bin/python" ]]; then
    missing+=("pyenv's Python 2.7.18, for the Autobahn conformance suite (pyenv install 2.7.18)")
fi
command -v openssl >/dev/null \
    || missing+=("openssl, which makes the TLS tests' certificates (Debian: apt-get install openssl)")
if ! command -v node >/dev/null || ! node -e 'process.exit(+process.versions.node.split(".")[0] < 20 ? 1 : 0)'; then
    missing+=("Node.js 20 or newer with npm, for the TypeScript client in clients/js (https://nodejs.org or Debian: apt-get install nodejs npm)")
fi
[[ -x ${CHROMIUM_PATH:-/usr/bin/chromium} ]] \
    || missing+=("chromium, the headless browser the TypeScript client's tests drive (Debian: apt-get install chromium; or set CHROMIUM_PATH)")
command -v haproxy >/dev/null \
    || missing+=("haproxy, the load balancer the behind-a-proxy test runs (Debian: apt-get install haproxy)")
command -v ip >/dev/null \
    || missing+=("ip from iproute2, which makes the cluster test's hosts (network namespaces; Debian: apt-get install iproute2)")
((EUID == 0)) \
    || missing+=("root: the cluster test makes network namespaces as hosts (run the tests as root, e.g. sudo scripts/test.sh)")
command -v redis-server >/dev/null \
    || missing+=("redis-server, the Redis that joins several routers in the cluster tests (Debian: apt-get install redis-server)")
command -v prlimit >/dev/null \
    || missing+=("prlimit, which runs the router under a low descriptor limit (Debian: apt-get install util-linux)")
if ((${#missing[@]})); then
    printf 'scripts/test.sh: missing prerequisites:\n' >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 2
fi

echo "==> cargo fmt --check, cargo clippy -D warnings"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "==> cargo build --workspace --bins --examples (debug)"
cargo build --workspace --bins --examples

# The Python SDK: its own virtualenv (created once, reused), the package and
# its test dependencies from PyPI. Installed before the Rust tests, because
# the start-script test runs the Python automation worker from it; pytest
# runs last (golden vectors, and the router built above).
VENV="${VENV:-$PWD/.venv}"
export VENV
if [ ! -x "$VENV/bin/python" ]; then
    echo "==> python3 -m venv $VENV"
    python3 -m venv "$VENV"
fi
echo "==> pip install ./worker-sdk/python[test]"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e './worker-sdk/python[test]'
# --no-fail-fast: one run reports every failing test binary, not just the first.
echo "==> cargo test --workspace --no-fail-fast"
cargo test --workspace --no-fail-fast

# The patched zeromq crate (third_party/zeromq, not a workspace member): its
# unit tests, the property test of the capped decoder, and the sockets
# against hostile raw TCP peers. Same target dir, so nothing builds twice.
echo "==> cargo test third_party/zeromq (patched decoder, untrusted peers)"
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}" \
    cargo test --manifest-path third_party/zeromq/Cargo.toml --lib --test untrusted_peers

# BRIDGE_WORKER_REQUIRE_ROUTER: a missing router binary fails instead of skipping.
echo "==> pytest worker-sdk/python"
BRIDGE_WORKER_REQUIRE_ROUTER=1 "$VENV/bin/python" -m pytest worker-sdk/python -q

# The TypeScript client (clients/js): its unit tests, against the router and
# the example workers built above (and the Python worker in $VENV), in
# headless chromium, and the chaos test that cuts connections under 100
# streamed requests.
echo "==> clients/js: npm ci && npm test"
(cd clients/js && npm ci --no-audit --no-fund --loglevel=error && ROUTER_TEST_PYTHON="$VENV/bin/python" npm test)

# Several routers on separate hosts (README, "Several routers"): network
# namespaces as hosts, Redis, haproxy, two routers and one worker serving
# both, driven by the TypeScript client built above. Needs root.
echo "==> scripts/cluster_test.sh (several routers, network namespaces)"
BIN_DIR="${CARGO_TARGET_DIR:-$PWD/target}/debug" scripts/cluster_test.sh

# WebSocket conformance (README, tests): Autobahn's fuzzing client through a raw
# route served by the echo worker; fails on any FAILED case. Uses the debug
# binaries built above; its Python 2.7 virtualenv is cached in target/autobahn.
echo "==> scripts/conformance.sh (Autobahn|TestSuite)"
ROUTER_BIN_DIR="${CARGO_TARGET_DIR:-target}/debug" scripts/conformance.sh --no-build
echo "==> scripts/conformance.sh --tls (Autobahn|TestSuite over wss://)"
ROUTER_BIN_DIR="${CARGO_TARGET_DIR:-target}/debug" scripts/conformance.sh --no-build --tls

echo "==> all tests passed"
