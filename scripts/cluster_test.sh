#!/usr/bin/env bash
# Several routers joined by Redis, tested end to end on separate hosts
# (README, "Several routers").
#
# Every host is a network namespace of this machine (hence root), named with
# a prefix unique to this run, joined by veth links to a bridge in a "switch"
# namespace, addressed in 198.18.0.0/15 (RFC 2544, benchmarking):
#
#   router A  198.18.0.11   HTTP :8001, bridge :5555   ROUTER_ID=A
#   router B  198.18.0.12   HTTP :8001, bridge :5555   ROUTER_ID=B
#   workers   198.18.0.20   one echo_worker connected to both bridges
#   redis     198.18.0.30   redis-server :6379, no persistence
#   lb        198.18.0.40   haproxy :8000 in front of both routers, stats :8404
#   client    198.18.0.50   the Node driver (tests/cluster/driver.mjs)
#
# The driver runs one check per process and prints PASS/FAIL/INFO lines; for
# what only this script may do (it owns the processes) it asks on stdout
# (`@@ kill-router-a`, `@@ stop-redis`, `@@ start-redis`) and waits for the
# answer on stdin.
#
# Environment: BIN_DIR (default <repo>/target/debug: router,
# examples/echo_worker; BIN_WAIT_S, 60, how long to wait for one that a build
# is still writing), KEEP_LOGS=1 keeps the log directory after a pass,
# CLUSTER_SUBS / CLUSTER_PUBS / CLUSTER_RECOVER_MS / CLUSTER_EXPIRY_MS tune
# the driver (tests/cluster/driver.mjs says how).
# Exit status: 0 all checks passed, 1 a check failed, 2 missing prerequisites
# or a setup that could not start.
set -Eeuo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="${BIN_DIR:-$REPO/target/debug}"
DRIVER="$REPO/tests/cluster/driver.mjs"
# Unique per run (the script's pid): concurrent runs never share a name.
PREFIX="wsr$$-"

declare -A ADDR=(
    [ra]=198.18.0.11 [rb]=198.18.0.12 [wk]=198.18.0.20
    [rd]=198.18.0.30 [lb]=198.18.0.40 [cl]=198.18.0.50
)
HOSTS=(ra rb wk rd lb cl)
HTTP_PORT=8001
BRIDGE_PORT=5555
REDIS_PORT=6379
LB_PORT=8000
LB_STATS_PORT=8404

WORK=""                 # temp dir: configs, copied binaries, logs
NAMESPACES=()           # created so far, for the cleanup
declare -A PIDS=()      # name -> pid of every process started
FAILS=0
RESULTS=()

log() { printf '[cluster_test] %s\n' "$*" >&2; }

# A setup step that cannot go on: says why and exits (the trap cleans up).
fatal() {
    printf 'FAIL setup: %s\n' "$*"
    RESULTS+=("FAIL setup: $*")
    FAILS=$((FAILS + 1))
    exit 2
}

# One result line, printed and kept for the summary.
result() {
    local line="$1"
    printf '%s\n' "$line"
    RESULTS+=("$line")
    [[ $line == FAIL* ]] && FAILS=$((FAILS + 1))
    return 0
}

ns() { printf '%s%s' "$PREFIX" "$1"; }

# Runs a command on a host (in its namespace).
on() {
    local host="$1"
    shift
    ip netns exec "$(ns "$host")" "$@"
}

# ------------------------------------------------------------ prerequisites

# Everything is checked before anything is created, and every missing piece
# is named at once: this runs from the test command, so a machine that
# cannot run it must fail loudly, never skip.
check_prerequisites() {
    local missing=()
    ((EUID == 0)) || missing+=("root: network namespaces and veth links need it (run as root)")
    local cmd
    for cmd in ip redis-server haproxy node curl timeout; do
        command -v "$cmd" >/dev/null || case $cmd in
            ip) missing+=("ip from iproute2 (Debian: apt-get install iproute2)") ;;
            redis-server) missing+=("redis-server (Debian: apt-get install redis-server)") ;;
            haproxy) missing+=("haproxy (Debian: apt-get install haproxy)") ;;
            node) missing+=("node, Node.js 20 or newer (Debian: apt-get install nodejs npm)") ;;
            curl) missing+=("curl (Debian: apt-get install curl)") ;;
            timeout) missing+=("timeout from coreutils") ;;
        esac
    done
    if command -v node >/dev/null && ! node -e 'process.exit(+process.versions.node.split(".")[0] < 20 ? 1 : 0)'; then
        missing+=("Node.js 20 or newer (this is $(node --version))")
    fi
    if ((${#missing[@]})); then
        printf 'scripts/cluster_test.sh: missing prerequisites:\n' >&2
        printf '  - %s\n' "${missing[@]}" >&2
        exit 2
    fi
    # Namespaces need kernel support and the right to make them (a container
    # without CAP_SYS_ADMIN has neither): try one before building six.
    local probe="${PREFIX}probe" err
    if ! err="$(ip netns add "$probe" 2>&1)"; then
        printf 'scripts/cluster_test.sh: this machine cannot create network namespaces (ip netns add: %s); the cluster test needs them (root with CAP_SYS_ADMIN, a kernel with CONFIG_NET_NS)\n' \
            "${err//$'\n'/ }" >&2
        exit 2
    fi
    NAMESPACES+=("$probe")
    if ! err="$(ip -n "$probe" link add v0 type veth peer name v1 2>&1)"; then
        printf 'scripts/cluster_test.sh: no veth links in a network namespace (ip link add: %s); the cluster test needs them (Debian: the veth kernel module)\n' \
            "${err//$'\n'/ }" >&2
        exit 2
    fi
    ip netns del "$probe"
    NAMESPACES=()
}

# Waits for a binary that a build in progress may not have written yet,
# then pins this run's copy: a hard link keeps the inode even if cargo
# replaces the file meanwhile, so both routers run the same build.
pin_binary() {
    local src="$1" dst="$2" waited=0 limit="${BIN_WAIT_S:-60}"
    while [[ ! -x $src ]]; do
        ((waited < limit)) || fatal "$src not found (waited $limit s): build it with cargo build --workspace --bins --examples (or set BIN_DIR)"
        ((waited % 10 == 0)) && log "waiting for $src to appear (a build in progress?)"
        sleep 1
        waited=$((waited + 1))
    done
    ln -f "$src" "$dst" 2>/dev/null || cp "$src" "$dst"
}

# The driver imports clients/js/dist and clients/js's dev dependency `ws`.
ensure_js_client() {
    if [[ ! -f $REPO/clients/js/dist/index.js || ! -f $REPO/clients/js/node_modules/ws/package.json ]]; then
        log "building clients/js (npm ci): dist/ or node_modules/ws is missing"
        (cd "$REPO/clients/js" && npm ci --no-audit --no-fund --loglevel=error) >"$WORK/logs/npm-ci.log" 2>&1 ||
            fatal "npm ci in clients/js failed (log: $WORK/logs/npm-ci.log)"
    fi
}

# ------------------------------------------------------------ hosts

# One namespace per host, each with a veth link to the bridge in the switch
# namespace. Links are created inside the namespaces, so their names never
# touch the machine's own namespace and cannot collide with anyone's.
make_hosts() {
    local sw host
    sw="$(ns sw)"
    ip netns add "$sw"
    NAMESPACES+=("$sw")
    ip -n "$sw" link set lo up
    ip -n "$sw" link add br0 type bridge
    ip -n "$sw" link set br0 up
    for host in "${HOSTS[@]}"; do
        ip netns add "$(ns "$host")"
        NAMESPACES+=("$(ns "$host")")
        ip -n "$sw" link add "p-$host" type veth peer name eth0 netns "$(ns "$host")"
        ip -n "$sw" link set "p-$host" master br0
        ip -n "$sw" link set "p-$host" up
        ip -n "$(ns "$host")" link set lo up
        ip -n "$(ns "$host")" addr add "${ADDR[$host]}/24" dev eth0
        ip -n "$(ns "$host")" link set eth0 up
    done
}

# ------------------------------------------------------------ processes

# Starts a process on a host in the background with a clean environment
# (nothing of the caller's BRIDGE_ENDPOINT & co. leaks in), its output in
# logs/<name>.log. `ip netns exec` and `env` exec, so $! is the process
# itself and a SIGKILL reaches it, not a wrapper (which is why this does not
# go through the `on` function: `&` on a function forks a subshell).
start() {
    local host="$1" name="$2"
    shift 2
    ip netns exec "$(ns "$host")" env -i PATH="$PATH" RUST_LOG="${RUST_LOG:-info}" "$@" \
        >>"$WORK/logs/$name.log" 2>&1 &
    PIDS[$name]=$!
    log "started $name on $host (pid $!)"
}

# Stops a process started by `start` (SIGTERM, then SIGKILL after 5 s) and reaps it.
stop() {
    local name="$1" pid="${PIDS[$1]:-}" i
    [[ -n $pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "PIDS[$name]"
}

# Polls a command (up to $1 seconds, every 0.2 s) until it succeeds.
poll() {
    local seconds="$1" end
    shift
    end=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || return 1
        sleep 0.2
    done
}

http_ok() { on cl curl -fsS --max-time 2 --noproxy '*' "$1"; }

redis_ready() {
    # bash's /dev/tcp from the client host: no redis-cli needed. The inner
    # bash expands $1 and $2.
    # shellcheck disable=SC2016
    on cl bash -c 'exec 3<>"/dev/tcp/$1/$2" && printf "PING\r\n" >&3 && read -r -t 1 line <&3 && [[ $line == +PONG* ]]' \
        _ "${ADDR[rd]}" "$REDIS_PORT"
}

alive() { kill -0 "${PIDS[$1]}" 2>/dev/null; }

start_redis() {
    start rd redis redis-server "$WORK/redis.conf"
    # Alive too: a PONG from a predecessor that did not stop is not this one's.
    if ! poll 10 redis_ready || ! alive redis; then
        fatal "redis-server did not answer PING on ${ADDR[rd]}:$REDIS_PORT within 10 s (log: $WORK/logs/redis.log)"
    fi
}

write_configs() {
    # Own config: bound to its host's address, no RDB or AOF (a restart
    # starts empty, as after losing the Redis host), never daemonised so
    # the script holds its pid.
    cat >"$WORK/redis.conf" <<EOF
bind ${ADDR[rd]}
port $REDIS_PORT
protected-mode no
daemonize no
save ""
appendonly no
dir $WORK/redis
logfile ""
EOF
    mkdir -p "$WORK/redis"

    cat >"$WORK/routes.json" <<'EOF'
{"routes": [{"path": "/ws/echo", "service": "echo", "description": "cluster test: the echo worker"}]}
EOF

    # haproxy as README "Behind a proxy" has it, in plain HTTP: /ready as the
    # health check (503 while a router starts, drains or is full), a long
    # tunnel timeout for upgraded WebSockets, and a dead server's connection
    # attempts redispatched to the other one (before its check marks it
    # down), so a client of a killed router gets through on its first retry.
    cat >"$WORK/haproxy.cfg" <<EOF
global
    log stdout format raw local0
    maxconn 4096
defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
    retries 2
    option redispatch 1
frontend ws
    bind ${ADDR[lb]}:$LB_PORT
    option forwardfor
    default_backend routers
backend routers
    balance roundrobin
    option httpchk GET /ready
    default-server check inter 500ms fall 2 rise 2
    server A ${ADDR[ra]}:$HTTP_PORT
    server B ${ADDR[rb]}:$HTTP_PORT
listen stats
    bind ${ADDR[lb]}:$LB_STATS_PORT
    stats enable
    stats uri /stats
EOF
}

# Router A or B on its host: the bridge on tcp:// beyond loopback, so with
# BRIDGE_SECRET (README "The bridge across hosts"); the load balancer is a
# trusted proxy, so per-IP limits see the client host, not haproxy.
start_router() {
    local id="$1" host="r${1,,}"
    start "$host" "router-$id" \
        ROUTER_ID="$id" \
        CLUSTER_URL="redis://${ADDR[rd]}:$REDIS_PORT" \
        BRIDGE_SECRET="$SECRET" \
        WEBSOCKET_HOST="${ADDR[$host]}" \
        WEBSOCKET_PORT="$HTTP_PORT" \
        WEBSOCKET_ROUTES="$WORK/routes.json" \
        BRIDGE_ENDPOINT="tcp://${ADDR[$host]}:$BRIDGE_PORT" \
        PUBLISH_ENDPOINT="tcp://${ADDR[$host]}:5556" \
        TRUSTED_PROXIES="${ADDR[lb]}" \
        "$WORK/bin/router"
}

# Listening, or exited (no use waiting the whole bound for a dead one).
router_settled() { grep -q '"event":"listening"' "$WORK/logs/router-$1.log" || ! alive "router-$1"; }

wait_router() {
    local id="$1" host="r${1,,}"
    if ! poll 20 router_settled "$id" || ! alive "router-$id"; then
        fatal "router $id exited or printed no listening line within 20 s (log: $WORK/logs/router-$id.log)"
    fi
    poll 10 http_ok "http://${ADDR[$host]}:$HTTP_PORT/health" ||
        fatal "router $id does not answer /health on ${ADDR[$host]}:$HTTP_PORT"
}

# Whether router $1's /routes lists worker $2 as live for the echo route.
worker_on() {
    local id="$1" wid="$2" host="r${1,,}"
    http_ok "http://${ADDR[$host]}:$HTTP_PORT/routes" |
        node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const r=JSON.parse(s).routes.find(x=>x.service==="echo");process.exit(r&&(r.workers??[]).some(w=>w.id===process.argv[1])?0:1)})' "$wid"
}

# One echo_worker process for both routers (BRIDGE_ENDPOINT as a
# comma-separated list). A worker that is not live on both within 15 s fails
# that check, and one worker per router takes its place, so the checks
# after it still test the routers.
start_workers() {
    local both="tcp://${ADDR[ra]}:$BRIDGE_PORT,tcp://${ADDR[rb]}:$BRIDGE_PORT"
    start wk worker BRIDGE_SECRET="$SECRET" BRIDGE_ENDPOINT="$both" \
        PUBLISH_ENDPOINT="tcp://${ADDR[ra]}:5556" \
        "$WORK/bin/echo_worker" --id echo-both
    if poll 15 worker_on A echo-both && poll 2 worker_on B echo-both; then
        result "PASS worker (one echo_worker with BRIDGE_ENDPOINT=A,B is live on both routers' /routes)"
        return
    fi
    local a=no b=no
    worker_on A echo-both && a=yes
    worker_on B echo-both && b=yes
    result "FAIL worker (one echo_worker with BRIDGE_ENDPOINT=A,B is live on both routers' /routes): live on A: $a, on B: $b within 15 s; its last warning: $(grep -E 'WARN|ERROR' "$WORK/logs/worker.log" | tail -n 1 | cut -c1-300); going on with one worker per router"
    stop worker
    local id
    for id in A B; do
        start wk "worker-$id" BRIDGE_SECRET="$SECRET" \
            BRIDGE_ENDPOINT="tcp://${ADDR[r${id,,}]}:$BRIDGE_PORT" \
            PUBLISH_ENDPOINT="tcp://${ADDR[r${id,,}]}:5556" \
            "$WORK/bin/echo_worker" --id "echo-$id"
    done
    poll 15 worker_on A echo-A || fatal "even a worker of its own is not live on router A (log: $WORK/logs/worker-A.log)"
    poll 15 worker_on B echo-B || fatal "even a worker of its own is not live on router B (log: $WORK/logs/worker-B.log)"
}

lb_both_up() {
    [[ $(http_ok "http://${ADDR[lb]}:$LB_STATS_PORT/stats;csv" |
        awk -F, '$1 == "routers" && ($2 == "A" || $2 == "B") && $18 == "UP"' | wc -l) -eq 2 ]]
}

start_lb() {
    # -db: foreground, logs on stdout, the pid is haproxy's own.
    start lb haproxy haproxy -db -f "$WORK/haproxy.cfg"
    poll 15 lb_both_up ||
        fatal "haproxy does not see both routers UP within 15 s (log: $WORK/logs/haproxy.log)"
}

# ------------------------------------------------------------ the driver

# Does what the driver asks (see the header) and answers on descriptor $2:
# `ok` or `error <why>`. Runs in this shell, not a subshell, so that the
# processes it stops and starts stay this shell's children and in PIDS.
hook() {
    local action="$1" fd="$2" reply=ok pid
    case "$action" in
        kill-router-a)
            pid="${PIDS[router-A]:-}"
            if [[ -n $pid ]] && kill -KILL "$pid"; then
                wait "$pid" 2>/dev/null || true
                unset "PIDS[router-A]"
            else
                reply="error router A is not running"
            fi
            ;;
        stop-redis)
            # SIGTERM: without persistence it exits at once, and its clients
            # see their connections closed, as when a Redis host goes away.
            stop redis
            ;;
        start-redis)
            start_redis
            ;;
        *) reply="error unknown action $action" ;;
    esac
    log "hook $action: $reply"
    printf '%s\n' "$reply" >&"$fd"
}

# Runs one check of the driver on the client host as a coprocess: its result
# lines are reported, its `@@` requests answered; a driver that dies without
# a FAIL line is a failure too.
run_driver() {
    local check="$1" line status=0 failed_before=$FAILS
    log "driver: $check"
    coproc DRV {
        on cl env -i PATH="$PATH" \
            CLUSTER_A="${ADDR[ra]}:$HTTP_PORT" CLUSTER_B="${ADDR[rb]}:$HTTP_PORT" \
            CLUSTER_LB="${ADDR[lb]}:$LB_PORT" CLUSTER_ROUTE=/ws/echo \
            ${CLUSTER_SUBS:+CLUSTER_SUBS="$CLUSTER_SUBS"} \
            ${CLUSTER_PUBS:+CLUSTER_PUBS="$CLUSTER_PUBS"} \
            ${CLUSTER_RECOVER_MS:+CLUSTER_RECOVER_MS="$CLUSTER_RECOVER_MS"} \
            ${CLUSTER_EXPIRY_MS:+CLUSTER_EXPIRY_MS="$CLUSTER_EXPIRY_MS"} \
            timeout -k 5 240 node "$DRIVER" "$check" 2>>"$WORK/logs/driver-$check.log"
    }
    # bash unsets DRV when the coprocess ends: keep our own descriptors.
    # shellcheck disable=SC2153 # DRV_PID is set by coproc
    local drv_pid="$DRV_PID" out in
    exec {out}<&"${DRV[0]}" {in}>&"${DRV[1]}"
    PIDS[driver]="$drv_pid"
    while IFS= read -r line <&"$out"; do
        case "$line" in
            "@@ "*)
                hook "${line#@@ }" "$in"
                ;;
            PASS* | FAIL* | INFO*) result "$line" ;;
            *) log "driver: $line" ;;
        esac
    done
    exec {out}<&- {in}>&-
    wait "$drv_pid" || status=$?
    unset "PIDS[driver]"
    if ((status != 0 && FAILS == failed_before)); then
        result "FAIL $check: the driver exited with status $status without a result (log: $WORK/logs/driver-$check.log)"
    fi
}

# ------------------------------------------------------------ cleanup

# Runs on every exit (a failure, Ctrl-C, SIGTERM): stops what was started,
# then removes the namespaces (which removes their links). Anything still
# inside one of this run's namespaces was started by this run.
cleanup() {
    local status=$? name ns_name pid i
    trap - EXIT INT TERM ERR
    for name in "${!PIDS[@]}"; do
        kill -TERM "${PIDS[$name]}" 2>/dev/null || true
    done
    for name in "${!PIDS[@]}"; do
        for ((i = 0; i < 30; i++)); do
            kill -0 "${PIDS[$name]}" 2>/dev/null || break
            sleep 0.1
        done
    done
    for ns_name in "${NAMESPACES[@]}"; do
        for pid in $(ip netns pids "$ns_name" 2>/dev/null); do
            kill -KILL "$pid" 2>/dev/null || true
        done
    done
    wait 2>/dev/null || true
    # Hosts first, the switch last; in reverse order of creation.
    for ((i = ${#NAMESPACES[@]} - 1; i >= 0; i--)); do
        ip netns del "${NAMESPACES[$i]}" 2>/dev/null || log "could not delete namespace ${NAMESPACES[$i]}"
    done
    if [[ -n $WORK && -d $WORK ]]; then
        if ! compgen -G "$WORK/logs/*.log" >/dev/null; then
            rm -rf "$WORK" # stopped before anything ran: nothing to keep
        elif ((status != 0 || FAILS > 0)); then
            local f
            for f in "$WORK"/logs/*.log; do
                [[ -s $f ]] || continue
                printf '\n===== %s (last 60 lines) =====\n' "$f"
                tail -n 60 "$f"
            done
            printf '\nlogs kept in %s\n' "$WORK/logs"
        elif [[ ${KEEP_LOGS:-0} == 1 ]]; then
            printf 'logs kept in %s\n' "$WORK/logs"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$status"
}

# ------------------------------------------------------------ main

main() {
    # A setup command that fails ends the run (set -e); say which one.
    trap 'log "failed (status $?) at line $LINENO: $BASH_COMMAND"' ERR
    trap cleanup EXIT
    # Ctrl-C and SIGTERM end through the EXIT trap, which cleans up.
    trap 'exit 130' INT
    trap 'exit 143' TERM

    check_prerequisites
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/cluster-test.XXXXXX")"
    mkdir -p "$WORK/logs" "$WORK/bin"
    pin_binary "$BIN_DIR/router" "$WORK/bin/router"
    pin_binary "$BIN_DIR/examples/echo_worker" "$WORK/bin/echo_worker"
    ensure_js_client
    SECRET="$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"

    log "hosts ${PREFIX}{sw,${HOSTS[*]}}; logs in $WORK/logs"
    make_hosts
    write_configs
    start_redis
    start_router A
    start_router B
    wait_router A
    wait_router B
    start_workers
    start_lb

    run_driver formed
    run_driver lb
    run_driver pubsub
    run_driver presence
    # Redis before the failover: check 5 needs both routers alive.
    run_driver redis
    run_driver failover

    echo
    if ((FAILS > 0)); then
        echo "cluster_test: $FAILS failed"
        printf '  %s\n' "${RESULTS[@]}" | grep '^  FAIL' || true
        exit 1
    fi
    echo "cluster_test: all checks passed"
}

main "$@"
