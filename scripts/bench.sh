#!/usr/bin/env bash
# Benchmarks (BENCHMARKS.md): the router with the Rust echo worker
# against a plain tokio-tungstenite echo server (the no-router baseline),
# measured in the same run by the same load generator (tests/src/bin/loadgen/);
# for latency under load also the router with the Python SDK's echo handler
# and a FastAPI/uvicorn endpoint doing the same JSON echo.
#
# Usage: scripts/bench.sh [--no-build] [--perf] [--help]
#
#   --no-build   use the release binaries as they are
#   --perf       also record one `perf` profile of the router and the worker
#                during a 100-connection run per router target (needs perf)
#
# Targets, alternated within every run so drift hits them all alike:
#   baseline     baseline_echo, loadgen --protocol raw
#   router-json  router + echo_worker, route /ws (client protocol, `echo` requests)
#   router-raw   router + echo_worker, raw route /raw (frames echoed unchanged)
#   router-json-tls  router-json served over TLS (--tls-cert/--tls-key, a
#                self-signed EC P-256 certificate for localhost made once per
#                bench run with openssl in $BENCH_OUT/tls), loadgen on wss://
#                with --tls-ca (full handshakes, no resumption)
#   router-py    router + the Python SDK's automation_worker (its `echo`
#                handler), route /ws/automation
#   router-py2   router-py with `--processes 2`: two worker processes under
#                the SDK's supervisor, one pool (CPU: worker1 and worker2)
#   router-pyzmq router-py with `--transport pyzmq`: the SDK's libzmq
#                transport instead of its own ZMTP one (router-py runs the
#                SDK's default, zmtp, unless BRIDGE_TRANSPORT says otherwise)
#   fastapi      bench/fastapi_echo/app.py under uvicorn (uvloop, one process),
#                route /ws answering like the router's JSON echo
#   condure      condure (Pushpin's connection manager, `apt-get install
#                condure`) with zhttp_echo, a ZHTTP echo handler
#                (tests/src/bin/zhttp_echo/), loadgen --protocol raw: the
#                closest peer design to the router (scenarios rt-1, rt-100,
#                idle, open-*); CONDURE_WORKERS (2, condure's default)
# Fan-out targets (scenario fanout only):
#   baseline     broadcast_baseline: tokio-tungstenite, publications made
#                in-process at FANOUT_RATE and written to every subscriber
#   router       router + fanout_publisher (a worker-sdk publisher session)
#                publishing at FANOUT_RATE to the topic of route /fanout
#   router-noresume  the same on route /fanout-noresume, resume off
#                (`"resume": {"ttlMs": 0}`): what keeping every delivery
#                for a resume costs
#   router-redis `router` with CLUSTER_URL pointing at a redis-server that
#                bench.sh starts for the run (a free port on 127.0.0.1,
#                `--save '' --appendonly no`, log in $BENCH_OUT, stopped
#                with the run): the router also PUBLISHes every publication
#                (and every subscriber's presence) to Redis, where no other
#                router reads it: the cost of Redis alone
#   router-2     two routers (ROUTER_ID A and B) joined by such a Redis:
#                fanout_publisher on A's bridge only, subscribers split
#                evenly over A and B (loadgen with both URLs, A first, so
#                `by_url` in the summary tells A's subscribers from those
#                reached through the Redis relay); subscribing starts once
#                both routers' /stats show `cluster.up` and members [A, B]
#                (bounded by 30 s); CPU watched for both routers (server-a,
#                server-b) and Redis; each router's /stats at the end of the
#                run in $BENCH_OUT
#                The Redis targets need redis-server on PATH.
# The Python targets run from a virtualenv (BENCH_VENV, default
# <target>/bench-venv) created on first use with bench/fastapi_echo/requirements.txt
# and worker-sdk/python installed; `pip freeze` goes to $BENCH_OUT.
# Scenarios (each run starts fresh processes):
#   rt-1         closed loop, 1 connection, 1 request in flight: msgs/s, p50, p99
#   rt-100       closed loop, 100 connections, 1 request in flight each: msgs/s
#   idle         RSS of the server at 0, 10 000 and 19 000 idle connections
#   open-1k      open loop, 1 000 connections at RATE_1K msgs/s in all: p50, p99
#   open-10k     open loop, 10 000 connections at RATE_10K msgs/s: p50, p99
#   fanout       FANOUT_CONNECTIONS (10 000) subscribers to one topic,
#                publications at FANOUT_RATE (10/s) for WARMUP_S + DURATION_S:
#                deliveries/s, p50/p99/max publish-to-receive latency
#                (CLOCK_MONOTONIC, shared by publisher and loadgen), missing,
#                duplicate and out-of-order deliveries (loadgen --mode
#                fanout); the publisher starts once every subscription is
#                acknowledged; FANOUT_GRACE (5 s) to drain after the last
#   open-check   the load generator's own check, baseline only: closed loop
#                at 1 connection, then open loop at 100, 1 000 and 10 000
#                connections at low rates; each open run must have 0 errors,
#                nothing in flight at the end, end within 0.5 s of its
#                window, and a p50 within CHECK_TOLERANCE_US (500) of the
#                closed loop's (BENCHMARKS.md, "The check: open loop against
#                the closed loop"); prints PASS or FAIL per run, exits 1 on
#                a FAIL
#
# Environment: RUNS (5), DURATION_S (5), WARMUP_S (1), SIZE (64 bytes of data),
#   DEPTH_100 (1: requests in flight per connection in rt-100),
#   IDLE_STAGES (10000,19000), RATE_1K (2000), RATE_10K (2000),
#   SCENARIOS ("rt-1 rt-100 idle"), TARGETS ("baseline router-json router-raw"),
#   BENCH_OUT (a new directory under ${CARGO_TARGET_DIR:-<repo>/target}/bench),
#   FANOUT_CONNECTIONS (10000), FANOUT_RATE (10), FANOUT_GRACE (5),
#   QUIET_MAX_CORES (0.3) and QUIET_WAIT_S (120): before each load run, wait
#   up to QUIET_WAIT_S for the machine's other processes to use at most
#   QUIET_MAX_CORES.
#   ROUTER_THREADS, WORKER_THREADS: tokio worker threads of the router and the
#   echo worker (TOKIO_WORKER_THREADS for that process only; unset: one per core).
#
# Output: a table on stdout (ratios of medians against baseline, and in
# "x plain" for a *-tls target against the same target without TLS, for
# router-redis and router-2 against router; fan-out rows include CPU per
# delivery, in all servers (server*) and per process); every loadgen
# summary line in $BENCH_OUT/results.jsonl, process logs beside it. Router settings: ENABLE_RATE_LIMIT=false, routes with
# maxConnections 20000 and maxInFlight 10000 (generated in $BENCH_OUT), default
# log level (info); the workers announce capacity 1024.

set -euo pipefail

build=1
perf=0
for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        --perf) perf=1 ;;
        -h | --help) sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "unknown option: $arg" >&2; exit 2 ;;
    esac
done

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
target_dir=${CARGO_TARGET_DIR:-$repo_root/target}
[[ $target_dir == /* ]] || target_dir=$repo_root/$target_dir
bin=$target_dir/release

runs=${RUNS:-5}
duration=${DURATION_S:-5}
warmup=${WARMUP_S:-1}
size=${SIZE:-64}
depth_100=${DEPTH_100:-1}
idle_stages=${IDLE_STAGES:-10000,19000}
rate_1k=${RATE_1K:-2000}
rate_10k=${RATE_10K:-2000}
fanout_connections=${FANOUT_CONNECTIONS:-10000}
fanout_rate=${FANOUT_RATE:-10}
fanout_grace=${FANOUT_GRACE:-5}
check_tolerance_us=${CHECK_TOLERANCE_US:-500}
scenarios=${SCENARIOS:-rt-1 rt-100 idle}
targets=${TARGETS:-baseline router-json router-raw}
# Whole seconds, for bounds on each loadgen run (the values may be fractional).
load_bound=$((${warmup%.*} + ${duration%.*} + 60))
# Open loop with thousands of connections: connecting takes longer (Python
# servers accept a few thousand handshakes per second).
open_bound=$((load_bound + 120))
venv=${BENCH_VENV:-$target_dir/bench-venv}
out=${BENCH_OUT:-$target_dir/bench/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
results=$out/results.jsonl
: >"$results"

say() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] error: %s\n' "$*" >&2; exit 1; }

# Each idle connection costs one descriptor in the server and one in loadgen.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
fd_limit=$(ulimit -n)
top_stage=${idle_stages##*,}
if [[ $fd_limit != unlimited ]] && ((top_stage + 200 > fd_limit)); then
    die "IDLE_STAGES up to $top_stage needs more than the descriptor limit $fd_limit"
fi
if [[ $fd_limit != unlimited && " $scenarios " == *" open-"* ]] && ((10000 + 200 > fd_limit)); then
    die "the open-loop scenarios hold 10 000 connections: more than the descriptor limit $fd_limit"
fi

if ((build)); then
    say "cargo build --release (router, worker-sdk examples, loadgen, baseline_echo)"
    cargo build --release -p router -p worker-sdk -p e2e-tests --bins --examples >&2
fi
for b in router examples/echo_worker loadgen baseline_echo; do
    [[ -x $bin/$b ]] || die "missing $bin/$b (build without --no-build)"
done
for b in broadcast_baseline fanout_publisher zhttp_echo; do
    [[ -x $bin/$b ]] || die "missing $bin/$b (build without --no-build)"
done
if [[ " $targets " == *" condure "* ]]; then
    command -v condure >/dev/null ||
        die "target condure needs condure on PATH (Debian/Ubuntu: apt-get install condure; CI installs it)"
fi
if [[ " $scenarios " == *" fanout "* && ( " $targets " == *" router-redis "* || " $targets " == *" router-2 "* ) ]]; then
    command -v redis-server >/dev/null ||
        die "targets router-redis and router-2 need redis-server on PATH (Debian/Ubuntu: apt-get install redis-server)"
fi
if [[ $fd_limit != unlimited && " $scenarios " == *" fanout "* ]] && ((fanout_connections + 200 > fd_limit)); then
    die "FANOUT_CONNECTIONS=$fanout_connections needs more than the descriptor limit $fd_limit"
fi

# The Python targets' virtualenv: FastAPI/uvicorn pinned, the worker SDK from
# this tree; installed once, checked by importing on later runs.
if [[ " $targets " == *" fastapi "* || " $targets " == *" router-py"* ]]; then
    if ! "$venv/bin/python" -c 'import fastapi, uvicorn, uvloop, bridge_worker' 2>/dev/null; then
        say "installing FastAPI/uvicorn and the Python SDK into $venv"
        { [[ -x $venv/bin/python ]] || python3 -m venv "$venv"; } || die "python3 -m venv failed"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
            -r bench/fastapi_echo/requirements.txt -e worker-sdk/python >&2 ||
            die "pip install into $venv failed"
    fi
    { "$venv/bin/python" --version; "$venv/bin/python" -m pip freeze --disable-pip-version-check; } \
        >"$out/python-packages.txt" 2>&1
fi

# The TLS targets' certificate: self-signed for localhost and 127.0.0.1, made
# once per bench run. CA:FALSE because rustls (loadgen) refuses a CA
# certificate as the server's own (CaUsedAsEndEntity), and `req -x509` marks
# it CA:TRUE by default.
if [[ " $targets " == *"-tls "* ]]; then
    command -v openssl >/dev/null || die "the TLS targets need openssl (apt-get install openssl)"
    mkdir -p "$out/tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$out/tls/key.pem" -out "$out/tls/cert.pem" -days 2 -subj /CN=localhost \
        -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
        -addext basicConstraints=critical,CA:FALSE 2>"$out/tls/openssl.err" ||
        die "openssl could not make the certificate: $(tail -1 "$out/tls/openssl.err")"
fi

cat >"$out/routes.json" <<'EOF'
{
  "description": "Benchmark routes: JSON echo on /ws and a raw echo route, both served by echo_worker (service echo); JSON echo on /ws/automation served by the Python automation_worker.",
  "defaults": { "maxConnections": 20000, "maxInFlight": 10000 },
  "routes": [
    { "path": "/ws", "service": "echo" },
    { "path": "/raw", "service": "echo", "raw": true },
    { "path": "/ws/automation", "service": "automation" }
  ]
}
EOF

# The fan-out scenario's route: no worker serves it (subscribe is handled by
# the router itself), the publisher is a publisher session on the bridge.
cat >"$out/routes-fanout.json" <<'EOF'
{
  "description": "Fan-out benchmark: subscribers on /fanout, publications from fanout_publisher.",
  "defaults": { "maxConnections": 20000, "maxInFlight": 10000 },
  "routes": [
    { "path": "/fanout", "service": "fanout" },
    { "path": "/fanout-noresume", "service": "fanout", "resume": { "ttlMs": 0 } }
  ]
}
EOF

# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------
pids=()
tls=()
zhttp_dirs=()  # condure's IPC directories, removed at the end
stop_all() {
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in {1..100}; do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    pids=()
}
trap stop_all EXIT

# Waits (bounded) until file $1 holds a line matching $2; prints that line.
wait_line() {
    local file=$1 pattern=$2 what=$3 pid=$4 deadline=$((SECONDS + 30)) line
    while ((SECONDS < deadline)); do
        line=$(grep -m1 -- "$pattern" "$file" 2>/dev/null || true)
        if [[ -n $line ]]; then printf '%s\n' "$line"; return 0; fi
        kill -0 "$pid" 2>/dev/null || { tail -5 "${file%.out}.err" >&2; die "$what exited early"; }
        sleep 0.05
    done
    die "$what did not start within 30 s"
}

# A TCP port free on 127.0.0.1 (for servers that cannot take port 0).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Starts a router for the fan-out scenario (routes-fanout.json) with the
# environment assignments after $2 (CLUSTER_URL=..., ROUTER_ID=...); logs in
# $out/$1.$2.{out,err}. Sets router_pid, router_http and router_bridge.
start_fanout_router() {
    local tag=$1 name=$2 line
    shift 2
    env ${ROUTER_THREADS:+TOKIO_WORKER_THREADS=$ROUTER_THREADS} ENABLE_RATE_LIMIT=false "$@" \
        "$bin/router" --port 0 --routes "$out/routes-fanout.json" \
        --bridge-endpoint tcp://127.0.0.1:0 --publish-endpoint tcp://127.0.0.1:0 \
        >"$out/$tag.$name.out" 2>"$out/$tag.$name.err" &
    pids+=($!)
    router_pid=$!
    line=$(wait_line "$out/$tag.$name.out" '"event":"listening"' "$name" "$router_pid")
    router_http=$(sed -E 's/.*"http":"([^"]+)".*/\1/' <<<"$line")
    router_bridge=$(sed -E 's/.*"bridge":"([^"]+)".*/\1/' <<<"$line")
}

# Starts a redis-server of its own for fan-out run $1: a free port on
# 127.0.0.1, nothing saved, log in $out/$1.redis.out; stopped by stop_all.
# Sets redis_url and redis_pid.
start_redis() {
    local tag=$1 port
    port=$(free_port)
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$out" \
        >"$out/$tag.redis.out" 2>"$out/$tag.redis.err" &
    pids+=($!)
    redis_pid=$!
    wait_line "$out/$tag.redis.out" 'Ready to accept connections' redis-server "$redis_pid" >/dev/null
    redis_url=redis://127.0.0.1:$port
}

# The `cluster` block of the /stats of the router at host:port $1, printed
# as "up A B" (members sorted), "down", or "unreachable".
cluster_state() {
    python3 -c 'import json, sys, urllib.request
c = json.load(urllib.request.urlopen("http://%s/stats" % sys.argv[1], timeout=2)).get("cluster") or {}
print(" ".join(["up" if c.get("up") else "down"] + sorted(c.get("members") or [])))' "$1" 2>/dev/null ||
        echo unreachable
}

# The /stats of the router at host:port $1 (an error line if it does not answer).
router_stats() {
    python3 -c 'import sys, urllib.request
sys.stdout.write(urllib.request.urlopen("http://%s/stats" % sys.argv[1], timeout=5).read().decode())' "$1" ||
        echo '{"error":"no answer from /stats"}'
}

# Waits (bounded) until every router at the host:ports after $1 reports the
# cluster up with exactly the members named in $1 (sorted, space-separated).
wait_cluster() {
    local want="up $1" deadline=$((SECONDS + 30)) hp state
    shift
    while :; do
        for hp in "$@"; do
            state=$(cluster_state "$hp")
            [[ $state == "$want" ]] || break
        done
        [[ $state == "$want" ]] && return 0
        ((SECONDS < deadline)) || die "the cluster did not form within 30 s: the router at $hp says \"$state\", want \"$want\""
        sleep 0.2
    done
}

# Starts the server side of target $1 for run label $2; sets url, protocol,
# watch, and tls (loadgen's TLS flags, empty for ws://).
start_target() {
    local target=$1 tag=$2 line http bridge
    local tls_flags=()
    tls=()
    # Truncated here, not by the redirections below: those happen in the
    # background child, possibly after wait_line read a stale file.
    rm -f "$out/$tag".*
    case "$target" in
        baseline)
            "$bin/baseline_echo" >"$out/$tag.baseline.out" 2>"$out/$tag.baseline.err" &
            pids+=($!)
            line=$(wait_line "$out/$tag.baseline.out" '"event":"listening"' baseline_echo $!)
            http=$(sed -E 's/.*"http":"([^"]+)".*/\1/' <<<"$line")
            url=ws://$http/
            protocol=raw
            server_pid=${pids[-1]}
            watch=(--watch "server=$server_pid")
            ;;
        fastapi)
            "$venv/bin/python" bench/fastapi_echo/app.py >"$out/$tag.fastapi.out" 2>"$out/$tag.fastapi.err" &
            pids+=($!)
            server_pid=$!
            line=$(wait_line "$out/$tag.fastapi.out" '"event":"listening"' fastapi "$server_pid")
            http=$(sed -E 's/.*"http":"([^"]+)".*/\1/' <<<"$line")
            url=ws://$http/ws
            protocol=json
            watch=(--watch "server=$server_pid")
            ;;
        router-json | router-raw | router-py | router-py2 | router-pyzmq | router-json-tls)
            if [[ $target == *-tls ]]; then
                tls_flags=(--tls-cert "$out/tls/cert.pem" --tls-key "$out/tls/key.pem")
            fi
            env ${ROUTER_THREADS:+TOKIO_WORKER_THREADS=$ROUTER_THREADS} \
                ENABLE_RATE_LIMIT=false "$bin/router" --port 0 --routes "$out/routes.json" \
                --bridge-endpoint tcp://127.0.0.1:0 --publish-endpoint tcp://127.0.0.1:0 \
                "${tls_flags[@]}" >"$out/$tag.router.out" 2>"$out/$tag.router.err" &
            pids+=($!)
            server_pid=$!
            line=$(wait_line "$out/$tag.router.out" '"event":"listening"' router "$server_pid")
            http=$(sed -E 's/.*"http":"([^"]+)".*/\1/' <<<"$line")
            bridge=$(sed -E 's/.*"bridge":"([^"]+)".*/\1/' <<<"$line")
            if [[ $target == router-py* ]]; then
                local py_flags=()
                [[ $target != router-py2 ]] || py_flags=(--processes 2)
                [[ $target != router-pyzmq ]] || py_flags=(--transport pyzmq)
                "$venv/bin/python" worker-sdk/python/examples/automation_worker.py \
                    --bridge-endpoint "$bridge" --capacity 1024 --log-level WARNING \
                    "${py_flags[@]}" >"$out/$tag.worker.out" 2>"$out/$tag.worker.err" &
            else
                env ${WORKER_THREADS:+TOKIO_WORKER_THREADS=$WORKER_THREADS} \
                    "$bin/examples/echo_worker" --bridge-endpoint "$bridge" --service echo --capacity 1024 \
                    >"$out/$tag.worker.out" 2>"$out/$tag.worker.err" &
            fi
            pids+=($!)
            worker_pid=$!
            line=$(wait_line "$out/$tag.worker.out" '"event":"registered"' "$target worker" "$worker_pid")
            case $target in
                router-json) url=ws://$http/ws; protocol=json ;;
                router-raw) url=ws://$http/raw; protocol=raw ;;
                router-py | router-py2 | router-pyzmq) url=ws://$http/ws/automation; protocol=json ;;
                router-json-tls)
                    url=wss://$http/ws
                    protocol=json
                    tls=(--tls-ca "$out/tls/cert.pem" --tls-server-name localhost)
                    ;;
            esac
            watch=(--watch "server=$server_pid" --watch "worker=$worker_pid")
            if [[ $target == router-py2 ]]; then
                # The supervisor's children do the work: watch each one.
                local i=0 child
                for child in $(sed -E 's/.*"pids":\[([0-9,]*)\].*/\1/' <<<"$line" | tr , ' '); do
                    watch+=(--watch "worker$((++i))=$child")
                done
            fi
            ;;
        condure)
            # condure needs a port of its own (no port 0); IPC paths stay
            # short (108-byte limit) in a directory of their own.
            local port zdir
            port=$(free_port)
            zdir=$(mktemp -d "${TMPDIR:-/tmp}/bench-zhttp.XXXXXX")
            zhttp_dirs+=("$zdir")
            condure --listen "127.0.0.1:$port,stream" --zclient-stream "ipc://$zdir/client" \
                --workers "${CONDURE_WORKERS:-2}" --stream-maxconn 20000 \
                >"$out/$tag.condure.out" 2>"$out/$tag.condure.err" &
            pids+=($!)
            server_pid=$!
            "$bin/zhttp_echo" --base "ipc://$zdir/client" >"$out/$tag.handler.out" 2>"$out/$tag.handler.err" &
            pids+=($!)
            worker_pid=$!
            wait_line "$out/$tag.handler.out" '"event":"ready"' zhttp_echo "$worker_pid" >/dev/null
            local deadline=$((SECONDS + 30))
            until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
                kill -0 "$server_pid" 2>/dev/null || { tail -5 "$out/$tag.condure.err" >&2; die "condure exited early"; }
                ((SECONDS < deadline)) || die "condure did not listen on $port within 30 s"
                sleep 0.05
            done
            url=ws://127.0.0.1:$port/
            protocol=raw
            watch=(--watch "server=$server_pid" --watch "worker=$worker_pid")
            ;;
        *) die "unknown target $target" ;;
    esac
}

# Runs loadgen with a bound on its time; appends its summary with labels.
loadgen() {
    local scenario=$1 target=$2 run=$3 bound=$4
    shift 4
    local line
    if ! line=$(timeout "$bound" "$bin/loadgen" --url "$url" --protocol "$protocol" "${tls[@]}" "${watch[@]}" \
        --label "$scenario/$target/$run" "$@" 2>>"$out/loadgen.err"); then
        tail -5 "$out/loadgen.err" >&2
        # An open-loop run that saw errors (a target that cannot keep up
        # with the rate, say) is a result: it goes into the table.
        if [[ $scenario != open-* || $line != '{'* ]]; then
            die "loadgen failed: $scenario $target run $run (summary: ${line:-none})"
        fi
        say "loadgen reported errors: $scenario $target run $run (kept in the results)"
    fi
    printf '{"scenario":"%s","target":"%s","run":%d,"result":%s}\n' "$scenario" "$target" "$run" "$line" >>"$results"
}

# Busy cores of the whole machine over one second (from /proc/stat).
busy_cores() {
    local a b
    a=$(head -1 /proc/stat)
    sleep 1
    b=$(head -1 /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN {
        split(a, x); split(b, y); busy = 0
        for (i = 2; i <= 9; i++) if (i != 5 && i != 6) busy += y[i] - x[i]
        printf "%.2f", busy / 100 }'
}

# The machine is shared (builds of others): wait, bounded, until it is
# quiet before a run, so runs are not disturbed more than they must be.
# The CPU every run saw is in the summary either way ("other" in the table).
wait_quiet() {
    local deadline=$((SECONDS + ${QUIET_WAIT_S:-120})) busy
    while :; do
        busy=$(busy_cores)
        awk -v b="$busy" -v m="${QUIET_MAX_CORES:-0.3}" 'BEGIN { exit !(b <= m) }' && return 0
        if ((SECONDS >= deadline)); then
            say "machine still busy ($busy cores used by others): running anyway"
            return 0
        fi
        say "machine busy ($busy cores used by others): waiting"
        sleep 4
    done
}

# Open loop at `connections` and `rate` (msgs/s in all) with the run's
# warmup and duration.
open_load() {
    local scenario=$1 target=$2 run=$3 connections=$4 rate=$5
    loadgen "$scenario" "$target" "$run" "$open_bound" --mode open --connections "$connections" \
        --rate "$rate" --size "$size" --duration "$duration" --warmup "$warmup" \
        --sources 32 --timeout 10 --grace 2
}

# The fan-out scenario for target $1 (baseline, router, router-noresume,
# router-redis, router-2), run $2: starts the server side, loadgen --mode
# fanout in the background, and once every subscription is acknowledged
# (loadgen's --ready-file) the publisher (router targets: fanout_publisher
# on the (first) router's bridge; baseline: its own, started by the count
# of subscribers); appends loadgen's summary.
fanout_run() {
    local target=$1 run=$2 tag=$3 line http bridge lg publish_s deadline router_a router_b
    local ready=$out/$tag.ready
    local fwatch=()
    rm -f "$out/$tag".*
    publish_s=$(awk -v w="$warmup" -v d="$duration" 'BEGIN { print w + d }')
    case $target in
        baseline)
            "$bin/broadcast_baseline" --subscribers "$fanout_connections" --rate "$fanout_rate" \
                --duration "$publish_s" >"$out/$tag.baseline.out" 2>"$out/$tag.baseline.err" &
            pids+=($!)
            server_pid=$!
            line=$(wait_line "$out/$tag.baseline.out" '"event":"listening"' broadcast_baseline "$server_pid")
            http=$(sed -E 's/.*"http":"([^"]+)".*/\1/' <<<"$line")
            url=ws://$http/
            protocol=raw
            fwatch=(--watch "server=$server_pid")
            ;;
        router | router-noresume)
            start_fanout_router "$tag" router
            server_pid=$router_pid
            bridge=$router_bridge
            url=ws://$router_http/fanout
            [[ $target != router-noresume ]] || url=ws://$router_http/fanout-noresume
            protocol=json
            fwatch=(--watch "server=$server_pid")
            ;;
        router-redis)
            start_redis "$tag"
            start_fanout_router "$tag" router CLUSTER_URL="$redis_url" ROUTER_ID=A
            server_pid=$router_pid
            bridge=$router_bridge
            url=ws://$router_http/fanout
            protocol=json
            wait_cluster A "$router_http"
            fwatch=(--watch "server=$server_pid" --watch "redis=$redis_pid")
            ;;
        router-2)
            start_redis "$tag"
            start_fanout_router "$tag" router-a CLUSTER_URL="$redis_url" ROUTER_ID=A
            local pid_a=$router_pid
            router_a=$router_http
            bridge=$router_bridge
            start_fanout_router "$tag" router-b CLUSTER_URL="$redis_url" ROUTER_ID=B
            router_b=$router_http
            url=ws://$router_a/fanout,ws://$router_b/fanout
            protocol=json
            wait_cluster "A B" "$router_a" "$router_b"
            fwatch=(--watch "server-a=$pid_a" --watch "server-b=$router_pid" --watch "redis=$redis_pid")
            ;;
        *) die "unknown fan-out target $target" ;;
    esac
    timeout $((load_bound + 240)) "$bin/loadgen" --mode fanout --url "$url" --protocol "$protocol" \
        --connections "$fanout_connections" --rate "$fanout_rate" --warmup "$warmup" \
        --duration "$duration" --grace "$fanout_grace" --topic bench --ready-file "$ready" \
        --sources 32 --timeout 20 "${fwatch[@]}" --label "fanout/$target/$run" \
        >"$out/$tag.loadgen.out" 2>>"$out/loadgen.err" &
    lg=$!
    deadline=$((SECONDS + 240))
    until [[ -s $ready ]]; do
        kill -0 "$lg" 2>/dev/null || { tail -5 "$out/loadgen.err" >&2; die "loadgen failed before subscribing: fanout $target run $run"; }
        ((SECONDS < deadline)) || die "loadgen did not subscribe within 240 s"
        sleep 0.05
    done
    if [[ $target == router* ]]; then
        "$bin/fanout_publisher" --bridge-endpoint "$bridge" --rate "$fanout_rate" --duration "$publish_s" \
            >"$out/$tag.publisher.out" 2>"$out/$tag.publisher.err" &
        pids+=($!)
    fi
    wait "$lg" || say "loadgen reported a failure: fanout $target run $run (kept in the results)"
    # The routers' cluster counters (relayed, received, unrelayed) as the
    # run left them, while the subscribers' leaves may still be relayed.
    if [[ $target == router-redis ]]; then
        router_stats "$router_http" >"$out/$tag.router.stats.json"
    elif [[ $target == router-2 ]]; then
        router_stats "$router_a" >"$out/$tag.router-a.stats.json"
        router_stats "$router_b" >"$out/$tag.router-b.stats.json"
    fi
    line=$(head -1 "$out/$tag.loadgen.out")
    [[ $line == '{'* ]] || { tail -5 "$out/loadgen.err" >&2; die "loadgen gave no summary: fanout $target run $run"; }
    printf '{"scenario":"fanout","target":"%s","run":%d,"result":%s}\n' "$target" "$run" "$line" >>"$results"
}

run_scenario() {
    local scenario=$1 target=$2 run=$3 tag="$1.$2.$3"
    if [[ $scenario == open-check && $target != baseline ]]; then
        return 0
    fi
    # The fan-out has its own targets (baseline, router, router-noresume,
    # router-redis, router-2), which exist only there; condure does not
    # publish.
    local fanout_targets=" baseline router router-noresume router-redis router-2 "
    if [[ $scenario == fanout ]]; then
        [[ $fanout_targets == *" $target "* ]] || return 0
        wait_quiet
        fanout_run "$target" "$run" "$tag"
        stop_all
        return 0
    fi
    [[ $target == baseline || $fanout_targets != *" $target "* ]] || return 0
    [[ $scenario == idle ]] || wait_quiet
    start_target "$target" "$tag"
    case "$scenario" in
        rt-1) loadgen "$scenario" "$target" "$run" "$load_bound" --mode closed --connections 1 --depth 1 \
            --size "$size" --duration "$duration" --warmup "$warmup" --timeout 5 ;;
        rt-100) loadgen "$scenario" "$target" "$run" "$load_bound" --mode closed --connections 100 --depth "$depth_100" \
            --size "$size" --duration "$duration" --warmup "$warmup" --timeout 5 ;;
        idle) loadgen "$scenario" "$target" "$run" 300 --mode idle --stages "$idle_stages" --settle 2 \
            --sources 32 --timeout 20 ;;
        open-1k) open_load "$scenario" "$target" "$run" 1000 "$rate_1k" ;;
        open-10k) open_load "$scenario" "$target" "$run" 10000 "$rate_10k" ;;
        open-check)
            loadgen "$scenario" "$target" "$run" "$load_bound" --mode closed --connections 1 --depth 1 \
                --size "$size" --duration "$duration" --warmup "$warmup" --timeout 5
            open_load "$scenario" "$target" "$run" 100 1000
            open_load "$scenario" "$target" "$run" 1000 2000
            open_load "$scenario" "$target" "$run" 10000 5000
            ;;
        *) die "unknown scenario $scenario" ;;
    esac
    stop_all
}

say "results in $out ($runs runs, ${warmup}+${duration} s per load run, $size-byte payloads)"
for scenario in $scenarios; do
    for run in $(seq 1 "$runs"); do
        for target in $targets; do
            say "$scenario run $run/$runs: $target"
            run_scenario "$scenario" "$target" "$run"
        done
    done
done

if ((perf)); then
    command -v perf >/dev/null || die "--perf needs perf (apt-get install linux-perf)"
    for target in router-json router-raw; do
        [[ " $targets " == *" $target "* ]] || continue
        say "perf: 100 connections, $target"
        start_target "$target" "perf.$target"
        # DWARF unwinding: release builds keep line tables (debug = 1) but
        # no frame pointers, so -g alone gives broken stacks.
        perf record -F 499 --call-graph dwarf,16384 -o "$out/perf.$target.data" -p "$server_pid,$worker_pid" \
            -- sleep $((load_bound - 60)) >/dev/null 2>"$out/perf.$target.err" &
        perf_pid=$!
        loadgen perf "$target" 1 "$load_bound" --mode closed --connections 100 --depth 1 \
            --size "$size" --duration "$duration" --warmup "$warmup" --timeout 5
        wait "$perf_pid" || true
        report() { perf report -i "$out/perf.$target.data" --stdio "$@" 2>/dev/null | grep -v '^#' | grep -v '^$' || true; }
        # Share of samples per process and thread, then flat (self) and
        # inclusive (children) symbol lists.
        report --no-children --sort pid,dso -g none | head -30 >"$out/perf.$target.threads.txt"
        report --no-children --sort dso,sym -g none | head -80 >"$out/perf.$target.self.txt"
        report --children --pid "$server_pid" --sort sym -g none | head -250 >"$out/perf.$target.router-children.txt"
        report --children --pid "$worker_pid" --sort sym -g none | head -150 >"$out/perf.$target.worker-children.txt"
        stop_all
        say "perf profiles: $out/perf.$target.*.txt"
    done
fi

# ---------------------------------------------------------------------------
# Table: median and range over runs, ratio of medians against the baseline
# ---------------------------------------------------------------------------
status=0
python3 - "$results" "$check_tolerance_us" <<'EOF' || status=$?
import json, statistics, sys
from collections import defaultdict

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
vals = defaultdict(list)  # (metric, target) -> values
cpu = defaultdict(list)   # (scenario, target, proc) -> cores
metrics = []
checks = []               # (run, summary) of the open-check scenario

def add(metric, target, v):
    if v is None:
        return
    if metric not in metrics:
        metrics.append(metric)
    vals[(metric, target)].append(v)

for r in rows:
    s, t, res = r["scenario"], r["target"], r["result"]
    if s == "perf":
        continue
    if s in ("rt-1", "rt-100"):
        n, d = res["connections"], res["depth"]
        add("%s msgs/s (%d conn x %d)" % (s, n, d), t, res["throughput_msgs_per_s"])
        add("%s p50 us" % s, t, res["latency_us"]["p50"])
        add("%s p99 us" % s, t, res["latency_us"]["p99"])
        cores = res["cpu_cores"]
        for proc, c in cores.items():
            if c is not None:
                cpu[(s, t, proc)].append(c)
        # Busy time of the machine not used by the benchmark's own processes
        # (another build, say): a disturbed run shows here.
        if cores.get("machine") is not None:
            ours = sum(c for p, c in cores.items() if p != "machine" and c is not None)
            cpu[(s, t, "other")].append(max(0.0, cores["machine"] - ours))
    elif s in ("open-1k", "open-10k"):
        tag = "%s %dx@%g/s" % (s, res["connections"], res["target_rate"])
        add("%s p50 us" % tag, t, res["latency_us"]["p50"] if res["latency_us"] else None)
        add("%s p99 us" % tag, t, res["latency_us"]["p99"] if res["latency_us"] else None)
        add("%s service p50 us" % tag, t, res["service_latency_us"]["p50"] if res["service_latency_us"] else None)
        add("%s send lag p99 us" % tag, t, res["send_lag_us"]["p99"] if res["send_lag_us"] else None)
        add("%s replies/s" % tag, t, res["throughput_msgs_per_s"])
        add("%s errors" % tag, t, res["errors"])
        add("%s in flight at end" % tag, t, res["in_flight_at_end"])
        cores = res["cpu_cores"]
        for proc, c in cores.items():
            if c is not None:
                cpu[(s, t, proc)].append(c)
        if cores.get("machine") is not None:
            ours = sum(c for p, c in cores.items() if p != "machine" and c is not None)
            cpu[(s, t, "other")].append(max(0.0, cores["machine"] - ours))
    elif s == "open-check":
        checks.append((r["run"], res))
    elif s == "fanout":
        tag = "fanout %dx@%g/s" % (res["connections"], res["target_rate"])
        add("%s deliveries/s" % tag, t, res["deliveries_per_s"])
        lat = res["latency_us"] or {}
        add("%s p50 us" % tag, t, lat.get("p50"))
        add("%s p99 us" % tag, t, lat.get("p99"))
        add("%s max us" % tag, t, lat.get("max"))
        add("%s missing" % tag, t, res["missing"])
        add("%s duplicates" % tag, t, res["duplicates"])
        add("%s out of order" % tag, t, res["out_of_order"])
        # Across several routers: the subscribers of each URL (the first is
        # the router the publisher is on).
        by_url = res.get("by_url") or []
        if len(by_url) > 1:
            for i, u in enumerate(by_url, 1):
                lat = u["latency_us"] or {}
                add("%s p50 us, url %d" % (tag, i), t, lat.get("p50"))
                add("%s p99 us, url %d" % (tag, i), t, lat.get("p99"))
                add("%s missing/dup/ooo, url %d" % (tag, i), t,
                    u["missing"] + u["duplicates"] + u["out_of_order"])
        cores = res["cpu_cores"]
        # CPU per delivery: all servers (server, or server-a + server-b)
        # together, and each process.
        dps = res["deliveries_per_s"]
        if dps:
            servers = [c for p, c in cores.items() if p.startswith("server") and c is not None]
            if servers:
                add("%s servers CPU us/delivery" % tag, t, sum(servers) / dps * 1e6)
            for proc, c in cores.items():
                if proc != "machine" and c is not None:
                    add("%s %s CPU us/delivery" % (tag, proc), t, c / dps * 1e6)
        for proc, c in cores.items():
            if c is not None:
                cpu[(s, t, proc)].append(c)
        if cores.get("machine") is not None:
            ours = sum(c for p, c in cores.items() if p != "machine" and c is not None)
            cpu[(s, t, "other")].append(max(0.0, cores["machine"] - ours))
    elif s == "idle":
        for st in res["stages"]:
            rss = st["rss_kib"].get("server")
            add("idle RSS MiB @%d" % st["connections"], t, rss / 1024.0 if rss is not None else None)
        for row in res["bytes_per_connection"].get("server", []):
            add("idle bytes/conn @%d" % row["connections"], t, row["bytes"])

targets = []
for r in rows:
    if r["target"] not in targets and r["scenario"] != "perf":
        targets.append(r["target"])

def fmt(x):
    if x >= 100:
        return "%.0f" % x
    if x >= 10:
        return "%.1f" % x
    return "%.2f" % x

# A *-tls target is also compared with the same target without TLS, and the
# fan-out's Redis targets with the router alone.
def plain_of(t):
    if t in ("router-redis", "router-2"):
        return "router"
    return t[:-len("-tls")] if t.endswith("-tls") else None

header = "%-28s %-15s %10s %21s %9s %9s %5s" % ("scenario", "target", "median", "min-max", "x base", "x plain", "runs")
print(header)
print("-" * len(header))
for m in metrics:
    base = vals.get((m, "baseline"))
    base_med = statistics.median(base) if base else None
    for t in targets:
        v = vals.get((m, t))
        if not v:
            continue
        med = statistics.median(v)
        ratio = "%.2f" % (med / base_med) if base_med and t != "baseline" else "-"
        plain = vals.get((m, plain_of(t))) if plain_of(t) else None
        plain_med = statistics.median(plain) if plain else None
        tls_ratio = "%.2f" % (med / plain_med) if plain_med else "-"
        print("%-28s %-15s %10s %21s %9s %9s %5d" % (m, t, fmt(med), "%s-%s" % (fmt(min(v)), fmt(max(v))), ratio, tls_ratio, len(v)))
print()
print("CPU during the measured window (median over runs, in cores; the machine has %d):" % __import__("os").cpu_count())
for (s, t, p), v in sorted(cpu.items()):
    print("  %-7s %-15s %-8s %.2f" % (s, t, p, statistics.median(v)))

# The load generator's own check (BENCHMARKS.md, "The check: open loop
# against the closed loop").
failed = False
if checks:
    tolerance = float(sys.argv[2])
    print()
    print("open-check against baseline_echo: open-loop p50 within %g us of the closed loop's," % tolerance)
    print("0 errors, nothing in flight, ended within 0.5 s of the window")
    by_run = defaultdict(list)
    for run, res in checks:
        by_run[run].append(res)
    for run, results in sorted(by_run.items()):
        closed = [r for r in results if r["mode"] == "closed"]
        if not closed or not closed[0]["latency_us"]:
            print("  run %d: FAIL (no closed-loop reference)" % run)
            failed = True
            continue
        ref = closed[0]["latency_us"]["p50"]
        print("  run %d: closed loop, 1 connection: p50 %.1f us" % (run, ref))
        for r in results:
            if r["mode"] != "open":
                continue
            lat = r["latency_us"] or {}
            p50 = lat.get("p50")
            late = r["run_s"] - r["warmup_s"] - r["duration_s"]
            problems = []
            if not r["ok"] or r["errors"]:
                problems.append("%d errors (%s)" % (r["errors"], r["first_error"]))
            if r["in_flight_at_end"]:
                problems.append("%d in flight at the end" % r["in_flight_at_end"])
            if late > 0.5:
                problems.append("ended %.2f s after its window" % late)
            if p50 is None or abs(p50 - ref) > tolerance:
                problems.append("p50 %s us is not within %g us of %.1f" % (p50, tolerance, ref))
            failed = failed or bool(problems)
            print("    %5d connections @ %5g/s: p50 %7.1f us, p99 %8.1f us, send lag p50 %5.1f us, "
                  "%d errors, %d in flight, ended %.3f s after the window: %s" % (
                      r["connections"], r["target_rate"], p50 or float("nan"), lat.get("p99", float("nan")),
                      (r["send_lag_us"] or {}).get("p50", float("nan")), r["errors"],
                      r["in_flight_at_end"], late, "FAIL: " + "; ".join(problems) if problems else "PASS"))
sys.exit(1 if failed else 0)
EOF
((${#zhttp_dirs[@]} == 0)) || rm -rf "${zhttp_dirs[@]}"
say "done: $out"
exit "$status"
