#!/usr/bin/env bash
# Starts the whole backend on this machine: the router and the four example
# workers (vision, voice and chat in Rust; automation in Python, with the
# Python SDK installed into a virtualenv on first use). Waits until the router is ready and
# every worker has registered, prints the URLs, then runs until Ctrl-C or
# SIGTERM, when it stops every process it started and exits 0.
#
# Usage: scripts/start_unified_backend.sh [--no-build] [--help]
#
#   --no-build   use the binaries in ROUTER_BIN_DIR as they are (no cargo build)
#
# Environment (the same variables the router and the workers read; README, process settings):
#   WEBSOCKET_HOST      address to listen on               (127.0.0.1)
#   WEBSOCKET_PORT      HTTP/WebSocket port; 0 = any free  (8001)
#   WEBSOCKET_ROUTES    routes file                        (<repo>/websocket-routes.json)
#   BRIDGE_ENDPOINT     ZeroMQ ROUTER socket for workers   (tcp://127.0.0.1:5555)
#   PUBLISH_ENDPOINT    ZeroMQ SUB socket for publishers   (tcp://127.0.0.1:5556)
#   ENABLE_RATE_LIMIT, ENABLE_DYNAMIC_ROUTING              passed on when set
#   TLS_CERT, TLS_KEY   PEM certificate and key: serve https:// and wss://
#                       (README, TLS; needs curl for the readiness probes)
# and for this script:
#   ROUTER_BIN_DIR      where `router` and `examples/` are (${CARGO_TARGET_DIR:-<repo>/target}/release)
#   LOG_DIR             where each process's stdout/stderr go (a new temporary directory)
#   STARTUP_TIMEOUT_S   bound on startup                   (60)
#   STOP_TIMEOUT_S      bound on each stop phase before SIGKILL (15)
#   AUTOMATION_WORKER   `python` (default) or `rust`: which automation worker to run
#   VENV                virtualenv for the Python worker (<repo>/.venv; created if missing)
#
# Needs bash 5 and coreutils; uses curl when present, bash's /dev/tcp otherwise.

set -euo pipefail

WORKERS=(vision_worker voice_worker automation_worker chat_worker)
# Workers that are Python scripts rather than Rust examples.
declare -A PYTHON_WORKERS=([automation_worker]=worker-sdk/python/examples/automation_worker.py)

usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

build=1
for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option: $arg" >&2; usage >&2; exit 2 ;;
    esac
done

if ((BASH_VERSINFO[0] < 5)); then
    echo "bash 5 or newer is required (this is $BASH_VERSION)" >&2
    exit 2
fi

caller_dir=$PWD
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Relative paths given by the caller are relative to where they ran us from.
absolute() { [[ $1 == /* ]] && printf '%s\n' "$1" || printf '%s/%s\n' "$caller_dir" "$1"; }

export WEBSOCKET_HOST=${WEBSOCKET_HOST:-127.0.0.1}
export WEBSOCKET_PORT=${WEBSOCKET_PORT:-8001}
if [[ -n ${WEBSOCKET_ROUTES:-} ]]; then
    WEBSOCKET_ROUTES=$(absolute "$WEBSOCKET_ROUTES")
else
    WEBSOCKET_ROUTES=$repo_root/websocket-routes.json
fi
export WEBSOCKET_ROUTES
export BRIDGE_ENDPOINT=${BRIDGE_ENDPOINT:-tcp://127.0.0.1:5555}
export PUBLISH_ENDPOINT=${PUBLISH_ENDPOINT:-tcp://127.0.0.1:5556}
[[ -n ${ENABLE_RATE_LIMIT:-} ]] && export ENABLE_RATE_LIMIT
[[ -n ${ENABLE_DYNAMIC_ROUTING:-} ]] && export ENABLE_DYNAMIC_ROUTING
scheme=http ws_scheme=ws
if [[ -n ${TLS_CERT:-} || -n ${TLS_KEY:-} ]]; then
    if [[ -z ${TLS_CERT:-} || -z ${TLS_KEY:-} ]]; then
        echo "TLS_CERT and TLS_KEY go together (README, TLS)" >&2
        exit 2
    fi
    TLS_CERT=$(absolute "$TLS_CERT")
    TLS_KEY=$(absolute "$TLS_KEY")
    export TLS_CERT TLS_KEY
    scheme=https ws_scheme=wss
    if ! command -v curl >/dev/null 2>&1; then
        echo "TLS_CERT is set: the readiness probes need curl (apt-get install curl)" >&2
        exit 2
    fi
fi

target_dir=${CARGO_TARGET_DIR:-$repo_root/target}
[[ $target_dir == /* ]] || target_dir=$repo_root/$target_dir
bin_dir=$(absolute "${ROUTER_BIN_DIR:-$target_dir/release}")
automation=${AUTOMATION_WORKER:-python}
case $automation in
    python) ;;
    rust) PYTHON_WORKERS=() ;;
    *) echo "AUTOMATION_WORKER must be python or rust (got $automation)" >&2; exit 2 ;;
esac
venv=$(absolute "${VENV:-$repo_root/.venv}")
startup_timeout_s=${STARTUP_TIMEOUT_S:-60}
stop_timeout_s=${STOP_TIMEOUT_S:-15}

say() { printf '[start] %s\n' "$*"; }
fail() { printf '[start] error: %s\n' "$*" >&2; }

# ---------------------------------------------------------------------------
# Time and waiting, with builtins only (no process per poll).
# ---------------------------------------------------------------------------
now_ms() { local t=${EPOCHREALTIME//[^0-9]/}; echo $((10#$t / 1000)); }
exec {nap_fd}<> <(:)
nap() { read -r -t "$1" -u "$nap_fd" _ || true; }

# ---------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------
declare -A pid_of=()    # name -> pid
declare -A name_of=()   # pid  -> name
declare -a started=()   # names in start order
stop_signal=""
force=0

on_signal() {
    if [[ -n $stop_signal ]]; then
        force=1 # second signal: stop waiting politely
    fi
    stop_signal=$1
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
# Whatever way this script ends (even a bug tripping `set -e`), it leaves no
# child behind.
trap 'set +e; stop_all' EXIT

alive() { kill -0 "$1" 2>/dev/null; }

# Reaps a child that has exited; its exit status goes to $reaped_status.
# (Not a command substitution: a subshell cannot wait for our children.)
reaped_status=0
reap() {
    reaped_status=0
    wait "$1" 2>/dev/null || reaped_status=$?
}

log_tail() {
    local name=$1
    if [[ -s $log_dir/$name.log ]]; then
        printf '[start] last lines of %s:\n' "$log_dir/$name.log" >&2
        tail -n 20 "$log_dir/$name.log" | sed 's/^/    /' >&2
    else
        printf '[start] (%s wrote nothing to %s)\n' "$name" "$log_dir/$name.log" >&2
    fi
}

# start NAME BINARY [ENV=VALUE...]
#
# Job control is switched on just for the launch, which puts the child in a
# process group of its own: a Ctrl-C in the terminal then reaches this script
# only, and the script stops the children once, in order (a router hit by the
# terminal's SIGINT *and* our SIGTERM would take the second signal as "exit
# now" and skip its drain). It is off again at once so that the script's own
# short commands stay in the foreground group and never take the terminal.
# start NAME PROGRAM [VAR=VALUE...] [-- ARG...]
start() {
    local name=$1 bin=$2
    shift 2
    local -a vars=() args=()
    while (($#)) && [[ $1 != -- ]]; do vars+=("$1"); shift; done
    (($#)) && shift
    args=("$@")
    set -m
    env "${vars[@]}" "$bin" "${args[@]}" </dev/null >"$log_dir/$name.out" 2>"$log_dir/$name.log" &
    local pid=$!
    set +m
    pid_of[$name]=$pid
    name_of[$pid]=$name
    started+=("$name")
    say "started $name (pid $pid)"
}

# Stops the named children: SIGTERM, wait up to the timeout, then SIGKILL.
stop_group() {
    local name pid deadline
    local -a pids=()
    for name in "$@"; do
        pid=${pid_of[$name]:-}
        [[ -n $pid ]] && alive "$pid" && kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    done
    ((${#pids[@]})) || return 0
    deadline=$(($(now_ms) + stop_timeout_s * 1000))
    for pid in "${pids[@]}"; do
        while alive "$pid" && ((force == 0 && $(now_ms) < deadline)); do nap 0.05; done
        if alive "$pid"; then
            say "${name_of[$pid]} (pid $pid) did not stop in time: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        reap "$pid"
        say "${name_of[$pid]} stopped (exit status $reaped_status)"
        unset "pid_of[${name_of[$pid]}]"
    done
}

# The router first, so it drains its clients while the workers can still
# answer the requests in flight; then the workers.
stop_all() {
    stop_group router
    stop_group "${WORKERS[@]}"
}

# ---------------------------------------------------------------------------
# HTTP probes: curl when available, bash's /dev/tcp otherwise.
# ---------------------------------------------------------------------------
have_curl=0
command -v curl >/dev/null 2>&1 && have_curl=1

# http_get PATH -> prints "STATUS" on the first line and the body after it.
http_get() {
    local path=$1 fd line status
    if ((have_curl)); then
        # In the background: `wait` returns as soon as a trapped signal arrives.
        # -k: this probes the router this script started; whether clients
        # trust its certificate is theirs to check.
        curl -s -k --max-time 2 -w '\n%{http_code}' "$scheme://$http_addr$path" >"$log_dir/.probe" 2>/dev/null &
        wait $! || true
        status=$(tail -n 1 "$log_dir/.probe")
        echo "${status:-000}"
        sed '$d' "$log_dir/.probe"
        return 0
    fi
    if ! exec {fd}<>"/dev/tcp/$http_host/$http_port" 2>/dev/null; then
        echo 000
        return 0
    fi
    printf 'GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$path" "$http_addr" >&"$fd"
    status=000
    if read -r -t 2 -u "$fd" line; then
        status=$(cut -d' ' -f2 <<<"$line")
        # Skip the headers; the rest is the body (Connection: close ends it).
        while read -r -t 2 -u "$fd" line && [[ $line != $'\r' && -n $line ]]; do :; done
        echo "$status"
        while IFS= read -r -t 2 -u "$fd" line || [[ -n $line ]]; do printf '%s\n' "$line"; done
    else
        echo "$status"
    fi
    exec {fd}>&-
}

# ---------------------------------------------------------------------------
# Build and check the binaries
# ---------------------------------------------------------------------------
if ((build)); then
    say "building release binaries (cargo rebuilds only what changed)"
    (cd "$repo_root" && cargo build --release -p router -p worker-sdk --bins --examples) &
    if ! wait $!; then
        fail "cargo build failed"
        exit 1
    fi
    [[ -n $stop_signal ]] && exit 0
fi

for w in router "${WORKERS[@]}"; do
    [[ -n ${PYTHON_WORKERS[$w]:-} ]] && continue
    bin=$bin_dir/examples/$w
    [[ $w == router ]] && bin=$bin_dir/router
    if [[ ! -x $bin ]]; then
        fail "$bin is missing: build it (drop --no-build) or set ROUTER_BIN_DIR"
        exit 1
    fi
done

# The Python SDK, in its own virtualenv (pip install runs once; later starts
# only check that it imports).
if ((${#PYTHON_WORKERS[@]})); then
    if ! "$venv/bin/python" -c 'import bridge_worker' 2>/dev/null; then
        say "installing the Python SDK into $venv"
        if ! { [[ -x $venv/bin/python ]] || python3 -m venv "$venv"; } ||
            ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$repo_root/worker-sdk/python"; then
            fail "cannot install the Python SDK (python3 with venv and pip is needed; or set AUTOMATION_WORKER=rust)"
            exit 1
        fi
    fi
    [[ -n $stop_signal ]] && exit 0
fi
if [[ ! -r $WEBSOCKET_ROUTES ]]; then
    fail "routes file $WEBSOCKET_ROUTES is not readable (set WEBSOCKET_ROUTES)"
    exit 1
fi

if [[ -n ${LOG_DIR:-} ]]; then
    log_dir=$(absolute "$LOG_DIR")
    mkdir -p "$log_dir"
else
    log_dir=$(mktemp -d "${TMPDIR:-/tmp}/unified-backend.XXXXXX")
fi

# ---------------------------------------------------------------------------
# Start and wait until ready
# ---------------------------------------------------------------------------
startup_failed() {
    fail "$1"
    [[ -n ${2:-} ]] && log_tail "$2"
    stop_all
    exit 1
}

# Fails startup if a started child has exited.
check_children() {
    local name pid
    for name in "${started[@]}"; do
        pid=${pid_of[$name]:-}
        if [[ -n $pid ]] && ! alive "$pid"; then
            reap "$pid"
            unset "pid_of[$name]"
            startup_failed "$name (pid $pid) exited during startup with status $reaped_status" "$name"
        fi
    done
}

interrupted_during_startup() {
    say "stopping (SIG$stop_signal during startup)"
    stop_all
    exit 0
}

deadline=$(($(now_ms) + startup_timeout_s * 1000))

start router "$bin_dir/router"

# The router prints one JSON line when bound; it carries the resolved
# addresses (port 0 becomes a real port), which the workers must use.
listening=""
while [[ -z $listening ]]; do
    [[ -n $stop_signal ]] && interrupted_during_startup
    check_children
    listening=$(grep -m1 -E '"event" *: *"listening"' "$log_dir/router.out" 2>/dev/null || true)
    if [[ -z $listening ]]; then
        (($(now_ms) < deadline)) || startup_failed "router did not report listening within ${startup_timeout_s}s" router
        nap 0.05
    fi
done
field() { sed -n "s/.*\"$1\" *: *\"\([^\"]*\)\".*/\1/p" <<<"$listening"; }
http_addr=$(field http)
bridge=$(field bridge)
publish=$(field publish)
[[ -n $http_addr && -n $bridge && -n $publish ]] ||
    startup_failed "cannot read the router's listening line: $listening" router
http_port=${http_addr##*:}
http_host=${http_addr%:*}
http_host=${http_host#[}
http_host=${http_host%]}
# A wildcard listen address is reached through loopback.
case $http_host in 0.0.0.0) http_host=127.0.0.1 ;; ::) http_host=::1 ;; esac
[[ $http_host == *:* ]] && http_addr="[$http_host]:$http_port" || http_addr="$http_host:$http_port"

for w in "${WORKERS[@]}"; do
    if [[ -n ${PYTHON_WORKERS[$w]:-} ]]; then
        start "$w" "$venv/bin/python" "BRIDGE_ENDPOINT=$bridge" "PUBLISH_ENDPOINT=$publish" \
            -- "$repo_root/${PYTHON_WORKERS[$w]}"
    else
        start "$w" "$bin_dir/examples/$w" "BRIDGE_ENDPOINT=$bridge" "PUBLISH_ENDPOINT=$publish"
    fi
done

pending=("${WORKERS[@]}")
ready=0
while ((ready == 0 || ${#pending[@]} > 0)); do
    [[ -n $stop_signal ]] && interrupted_during_startup
    check_children
    still=()
    for w in "${pending[@]}"; do
        grep -q -E '"event" *: *"registered"' "$log_dir/$w.out" 2>/dev/null || still+=("$w")
    done
    pending=("${still[@]}")
    if ((ready == 0)) && [[ $(http_get /ready | sed -n 1p) == 200 ]]; then
        ready=1
    fi
    if ((ready == 0 || ${#pending[@]} > 0)); then
        if (($(now_ms) >= deadline)); then
            ((ready)) || startup_failed "GET $scheme://$http_addr/ready never answered 200 within ${startup_timeout_s}s" router
            startup_failed "not registered within ${startup_timeout_s}s: ${pending[*]}" "${pending[0]}"
        fi
        nap 0.1
    fi
done

# Route paths as the router sees them; the default four if /routes is unreadable.
mapfile -t paths < <(http_get /routes | sed 1d | grep -o -E '"path" *: *"[^"]*"' | cut -d'"' -f4 || true)
((${#paths[@]})) || paths=(/ws/vision /ws/voice /ws/automation /ws)

echo
echo "Unified backend ready"
echo "  WebSocket routes:"
for p in "${paths[@]}"; do echo "    $ws_scheme://$http_addr$p"; done
echo "  Health:   $scheme://$http_addr/health"
echo "  Ready:    $scheme://$http_addr/ready"
echo "  Routes:   $scheme://$http_addr/routes"
if [[ $(http_get /console | sed -n 1p) == 200 ]]; then
    echo "  Console:  $scheme://$http_addr/console"
fi
echo "  Bridge:   $bridge    Publish: $publish"
echo "  Logs:     $log_dir/<name>.log"
if [[ -x $bin_dir/examples/poke ]]; then
    echo "  Try it:   $bin_dir/examples/poke ws://$http_addr/ws '{\"type\":\"echo\",\"id\":\"1\",\"data\":\"hi\"}'"
fi
echo "Press Ctrl-C to stop."

# ---------------------------------------------------------------------------
# Run until a signal; report children that exit on their own
# ---------------------------------------------------------------------------
# Polling rather than `wait -n`: a signal landing between the loop's check
# and the start of `wait -n` would otherwise be noticed only when some child
# happens to exit.
exit_code=0
while [[ -z $stop_signal ]]; do
    for name in "${!pid_of[@]}"; do
        pid=${pid_of[$name]}
        alive "$pid" && continue
        reap "$pid"
        unset "pid_of[$name]"
        fail "$name (pid $pid) exited with status $reaped_status"
        log_tail "$name"
        if [[ $name == router ]]; then
            exit_code=1
            break 2
        fi
        fail "continuing without $name: its route answers no_workers until it is restarted"
    done
    if ((${#pid_of[@]} == 0)); then
        fail "every process has exited"
        exit 1
    fi
    nap 0.2
done

[[ -n $stop_signal ]] && say "stopping (SIG$stop_signal)"
stop_all
say "stopped; logs kept in $log_dir"
exit "$exit_code"
