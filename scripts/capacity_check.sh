#!/usr/bin/env bash
# The operator's capacity check (issue 19): a release router under this
# machine's descriptor limit, more idle WebSocket connections than it may
# hold, and /health probed all along.
#
# Usage: scripts/capacity_check.sh [--no-build] [--help]
#
#   --no-build   use the release binaries as they are
#
# What it does:
#   1. starts target/release/router with ENABLE_RATE_LIMIT=false and one route
#      /ws (service echo) whose maxConnections is ROUTE_MAX, MAX_CONNECTIONS
#      left to its default (the descriptor limit minus the reserve; README,
#      "Capacity"), and echo_worker for the route;
#   2. probes GET /health every PROBE_MS (the pause between probes) with
#      `curl -s -o /dev/null -w '%{http_code} %{time_total} %{time_connect}' --max-time 2`,
#      from before the load until after it;
#   3. starts LOADGENS loadgen processes in idle mode, each opening PER_LOADGEN
#      connections over SOURCES source addresses (127.0.0.1..K) and holding
#      them HOLD_S seconds (a loadgen process holds at most ~19.9k
#      descriptors, hence several); refused upgrades are reported by loadgen
#      as failed connections, which is expected here;
#   4. once every loadgen has opened what it could: /ready, /stats `capacity`
#      and the /metrics lines router_at_capacity,
#      router_refused_upgrades_total{reason="at_capacity"},
#      router_accept_errors_total (and sessions, max, descriptor limit);
#      after the loadgens have closed: /ready and /stats `capacity` again;
#   5. prints a summary: each loadgen's result, the probe latency (max, p50,
#      p99, failures) per phase (before the load; while opening; while held:
#      from all open until the first loadgen may start closing, i.e. its
#      "open" line + 2 s settle + HOLD_S, less the 0.2 s polling step; while
#      closing; after; a probe that straddles the edge of the hold counts
#      for the busy phase beside it), the snapshots, and the router log's
#      `accept failed` and `refused: at capacity` lines (both are logged at
#      most once a second, with `since_last_line` counting the rest), and
#      the kernel's ListenOverflows / ListenDrops counters (whole machine)
#      before and after the load: connections dropped because the router's
#      accept queue was full (its length and size, from `ss`, are in the
#      snapshots).
#
# Environment: LOADGENS (2), PER_LOADGEN (10500), SOURCES (32), HOLD_S (30),
#   PROBE_MS (200), ROUTE_MAX (30000), PORT (0: any free port),
#   OUT (a new directory under ${CARGO_TARGET_DIR:-<repo>/target}/capacity).
#   The router runs under the shell's descriptor limits (it raises its soft
#   limit to the hard one itself); the loadgens get their soft limit raised
#   to the hard one.

set -euo pipefail

build=1
for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        -h | --help) sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "unknown option: $arg" >&2; exit 2 ;;
    esac
done

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
target_dir=${CARGO_TARGET_DIR:-$repo_root/target}
[[ $target_dir == /* ]] || target_dir=$repo_root/$target_dir
bin=$target_dir/release

loadgens=${LOADGENS:-2}
per_loadgen=${PER_LOADGEN:-10500}
sources=${SOURCES:-32}
hold=${HOLD_S:-30}
probe_ms=${PROBE_MS:-200}
route_max=${ROUTE_MAX:-30000}
port=${PORT:-0}
out=${OUT:-$target_dir/capacity/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"

say() { printf '[capacity] %s\n' "$*" >&2; }
die() { printf '[capacity] error: %s\n' "$*" >&2; exit 1; }

command -v curl >/dev/null || die "needs curl"
if ((build)); then
    say "cargo build --release (router, echo_worker, loadgen)"
    cargo build --release -p router --bin router -p worker-sdk --example echo_worker \
        -p e2e-tests --bin loadgen >&2
fi
for b in router examples/echo_worker loadgen; do
    [[ -x $bin/$b ]] || die "missing $bin/$b (build without --no-build)"
done

cat >"$out/routes.json" <<EOF
{
  "description": "Capacity check: one JSON echo route whose own limit is above the router's cap.",
  "routes": [
    { "path": "/ws", "service": "echo", "maxConnections": $route_max }
  ]
}
EOF

pids=()
probe_pid=
stop_all() {
    local pid
    if [[ -n $probe_pid ]]; then kill -TERM "$probe_pid" 2>/dev/null || true; fi
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
        kill -0 "$pid" 2>/dev/null || die "$what exited early (see $out)"
        sleep 0.05
    done
    die "$what did not start within 30 s"
}

# The kernel's listen-queue counters (whole machine): connections dropped
# before the router could accept them.
listen_counters() {
    awk '/^TcpExt:/ { if (!h) { split($0, k); h = 1 } else { split($0, v);
        for (i = 2; i <= NF; i++) if (k[i] ~ /^(ListenOverflows|ListenDrops|TCPReqQFullDrop|TCPReqQFullDoCookies)$/) printf "%s=%s ", k[i], v[i] } }' /proc/net/netstat
}

phase() { printf '%s %s\n' "$(date +%s.%N)" "$1" >>"$out/phases.txt"; }
: >"$out/phases.txt"

say "descriptor limits of this shell: soft $(ulimit -Sn), hard $(ulimit -Hn); results in $out"
ENABLE_RATE_LIMIT=false "$bin/router" --port "$port" --routes "$out/routes.json" \
    --bridge-endpoint tcp://127.0.0.1:0 --publish-endpoint tcp://127.0.0.1:0 \
    >"$out/router.out" 2>"$out/router.err" &
pids+=($!)
router_pid=$!
line=$(wait_line "$out/router.out" '"event":"listening"' router "$router_pid")
http=$(sed -E 's/.*"http":"([^"]+)".*/\1/' <<<"$line")
bridge=$(sed -E 's/.*"bridge":"([^"]+)".*/\1/' <<<"$line")
"$bin/examples/echo_worker" --bridge-endpoint "$bridge" --service echo --capacity 1024 \
    >"$out/worker.out" 2>"$out/worker.err" &
pids+=($!)
wait_line "$out/worker.out" '"event":"registered"' echo_worker $! >/dev/null
grep -m1 'descriptor limit' "$out/router.err" >&2 || true

# The probe: one line per request, "<start epoch s> <HTTP code> <total s>
# <TCP connect s>"; code 000 is a probe that got no answer within --max-time.
# A connect time of ~1 s is a SYN the kernel dropped and resent after 1 s.
# PROBE_MS is the pause between probes (a probe that takes long delays the next).
probe_pause=$(awk -v ms="$probe_ms" 'BEGIN { printf "%.3f", ms / 1000 }')
probe() {
    local t
    while :; do
        t=$(date +%s.%N)
        printf '%s %s\n' "$t" \
            "$(curl -s -o /dev/null -w '%{http_code} %{time_total} %{time_connect}' --max-time 2 "http://$http/health" || true)"
        sleep "$probe_pause"
    done
}
probe >"$out/probes.txt" &
probe_pid=$!

snapshot() {
    local name=$1
    {
        printf 'ready: '
        curl -s -w ' (HTTP %{http_code})\n' --max-time 5 "http://$http/ready" || echo "no answer"
        printf 'stats capacity: '
        curl -s --max-time 5 "http://$http/stats" |
            python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["capacity"]))' || echo "no answer"
        printf 'listen socket (accept queue length/size): '
        ss -Hltn "sport = :${http##*:}" | awk '{ print $2 "/" $3 }'
        curl -s --max-time 5 "http://$http/metrics" | grep -E '^router_(at_capacity|refused_upgrades_total|accept_errors_total|sessions|max_connections|descriptor_limit|tcp_connections|tcp_pending|tcp_evicted_total)[ {]' || echo "metrics: no answer"
    } >"$out/snapshot.$name.txt" 2>&1
}

sleep 2
listen_before=$(listen_counters)
phase load-start
ulimit -n "$(ulimit -Hn)"
lg_pids=()
for i in $(seq 1 "$loadgens"); do
    "$bin/loadgen" --mode idle --url "ws://$http/ws" --protocol json --stages "$per_loadgen" \
        --sources "$sources" --settle 2 --hold "$hold" --timeout 20 --label "loadgen-$i" \
        --watch "router=$router_pid" >"$out/loadgen.$i.out" 2>"$out/loadgen.$i.err" &
    lg_pids+=($!)
done
# Every loadgen prints "N connections open" once its stage is done (also
# when some of them failed).
deadline=$((SECONDS + 300))
for i in $(seq 1 "$loadgens"); do
    until grep -q 'connections open' "$out/loadgen.$i.err" 2>/dev/null; do
        ((SECONDS < deadline)) || die "loadgen $i did not finish opening within 300 s"
        kill -0 "${lg_pids[i - 1]}" 2>/dev/null || break
        sleep 0.2
    done
    phase "open-$i"
done
phase all-open
sleep 1
snapshot held
say "held: $(head -1 "$out/snapshot.held.txt")"
lg_status=()
for p in "${lg_pids[@]}"; do
    if wait "$p"; then lg_status+=(0); else lg_status+=($?); fi
done
phase load-end
listen_after=$(listen_counters)
sleep 3
snapshot after
phase probe-end
kill -TERM "$probe_pid" 2>/dev/null || true
wait "$probe_pid" 2>/dev/null || true
probe_pid=

{
    echo "router: $(grep -m1 'descriptor limit' "$out/router.err" || echo 'no descriptor limit line')"
    for i in $(seq 1 "$loadgens"); do
        echo "loadgen $i (exit ${lg_status[i - 1]}): $(tr '\n' ' ' <"$out/loadgen.$i.err")"
        python3 -c 'import json,sys; r=json.loads(open(sys.argv[1]).read()); print("  ok %s, opened %s, failed %s (%s), dropped %s" % (r["ok"], r["stages"][-1]["connections"], r["failed"], json.dumps(r.get("failed_by_error")), r["dropped"]))' "$out/loadgen.$i.out" || echo "  no summary"
    done
    echo
    echo "/health probes (curl time_total, ms):"
    python3 - "$out/probes.txt" "$out/phases.txt" "$hold" <<'EOF'
import sys
probes = []
for line in open(sys.argv[1]):
    parts = line.split()
    if len(parts) >= 3:
        connect = float(parts[3]) * 1000 if len(parts) > 3 else float("nan")
        probes.append((float(parts[0]), parts[1], float(parts[2]) * 1000, connect))
phases = [(float(t), name) for t, name in (l.split() for l in open(sys.argv[2]) if l.strip())]
at = dict((name, t) for t, name in phases)
first_open = min(t for t, name in phases if name.startswith("open-"))
bounds = [
    (-1e18, "before load"),
    (at["load-start"], "while opening"),
    (at["all-open"], "while held"),
    # loadgen: settle 2 s after its stage, then hold, then close.
    (first_open + 2 + float(sys.argv[3]) - 0.2, "while closing"),
    (at["load-end"], "after load"),
]
def phase_of(t):
    name = bounds[0][1]
    for start, n in bounds:
        if t >= start:
            name = n
    return name
def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, max(0, -(-len(v) * p // 100) - 1))]
groups = {}
for t, code, ms, connect in probes:
    # A probe that straddles the edge of the quiet hold counts for the busy
    # phase beside it (opening or closing).
    first, last = phase_of(t), phase_of(t + ms / 1000)
    name = last if first == "while held" else first
    groups.setdefault(name, []).append((code, ms, connect))
groups["all"] = [(c, ms, connect) for _, c, ms, connect in probes]
for name in ["before load", "while opening", "while held", "while closing", "after load", "all"]:
    g = groups.get(name, [])
    if not g:
        continue
    ms = [m for _, m, _ in g]
    bad = [c for c, _, _ in g if c != "200"]
    slowest = max(g, key=lambda x: x[1])
    print("  %-14s %4d probes: p50 %7.2f  p99 %7.2f  max %7.2f (of which TCP connect %.2f)  not 200: %d %s" % (
        name, len(g), pct(ms, 50), pct(ms, 99), max(ms), slowest[2], len(bad), sorted(set(bad)) if bad else ""))
EOF
    echo
    echo "while held:"
    sed 's/^/  /' "$out/snapshot.held.txt"
    echo "after the loadgens closed:"
    sed 's/^/  /' "$out/snapshot.after.txt"
    echo
    echo "router log:"
    for what in 'accept failed' 'refused: at capacity'; do
        n=$(grep -c -- "$what" "$out/router.err" || true)
        skipped=$({ grep -- "$what" "$out/router.err" || true; } |
            sed -nE 's/.*since_last_line=([0-9]+).*/\1/p' | awk '{ s += $1 } END { print s + 0 }')
        echo "  '$what': $n lines, since_last_line adding up to $skipped"
    done
    echo "  warnings and errors: $(grep -cE ' (WARN|ERROR) ' "$out/router.err" || true) lines"
    echo "kernel listen-queue counters (whole machine) before the load: $listen_before"
    echo "                                        after the load:  $listen_after"
} | tee "$out/summary.txt"
say "done: $out"
