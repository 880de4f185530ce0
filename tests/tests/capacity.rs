//! Capacity (README, "Capacity"): the router under a low descriptor limit
//! (util-linux `prlimit`, for the router process only) stays healthy when
//! full. Upgrades above the derived `MAX_CONNECTIONS` get `503 at_capacity`
//! with `Retry-After`, `/health` answers throughout, `/ready` turns 503 at
//! the cap and back at the low-water mark; a flood of bare TCP connections
//! cannot take the descriptors health probes need; accept errors (only when
//! the cap is set above what the descriptors allow) are counted and logged
//! at most once a second.

mod policies_support;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use e2e_tests::{http_get, run, RouterConfig, RouterProc, WsClient};
use policies_support::{assert_refusal, try_upgrade};
use serde_json::{json, Value};
use tokio::{net::TcpStream, task::JoinHandle, time::Instant};

const LIMIT: Duration = Duration::from_secs(180);
/// The descriptor limit the router runs under; its derived cap is the limit
/// minus a reserve of max(64, limit / 8), so 192.
const DESCRIPTORS: u64 = 256;
const CAP: u64 = 192;
/// 95 % of the cap, rounded down.
const LOW_WATER: u64 = 182;
/// What a health probe may take here (a generous bound; the measured
/// figure is printed).
const HEALTH_BOUND: Duration = Duration::from_secs(1);

fn echo_routes() -> String {
    json!({ "routes": [{ "path": "/ws/echo", "service": "echo", "maxConnections": 100000 }] })
        .to_string()
}

async fn start_router(descriptors: u64, env: &[(&str, &str)]) -> RouterProc {
    let mut cfg = RouterConfig::new(&echo_routes()).descriptor_limit(descriptors);
    for (k, v) in env {
        cfg = cfg.env(k, v);
    }
    RouterProc::start_with(cfg).await
}

async fn stats(router: &RouterProc) -> Value {
    let r = http_get(router.http, "/stats").await.expect("GET /stats");
    assert_eq!(r.status, 200, "{r:?}");
    r.json()["capacity"].clone()
}

/// Polls `/stats` (bounded) until the capacity block satisfies `ok`.
async fn wait_capacity(router: &RouterProc, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let c = stats(router).await;
        if ok(&c) {
            return c;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "waited 10 s for {what}; capacity is {c}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Probes `/health` on a new connection every 20 ms until stopped; each
/// probe must answer 200 within [`HEALTH_BOUND`].
struct HealthProbe {
    stop: Arc<AtomicBool>,
    task: JoinHandle<(usize, Duration, Vec<String>)>,
}

impl HealthProbe {
    fn start(router: &RouterProc) -> Self {
        let addr = router.http;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let (mut probes, mut worst, mut failures) = (0, Duration::ZERO, Vec::new());
            while !stopped.load(Ordering::Acquire) {
                let t = Instant::now();
                match tokio::time::timeout(HEALTH_BOUND * 5, http_get(addr, "/health")).await {
                    Ok(Ok(r)) if r.status == 200 => {}
                    Ok(Ok(r)) => failures.push(format!("HTTP {}: {}", r.status, r.body)),
                    Ok(Err(e)) => failures.push(e),
                    Err(_) => failures.push("no answer within 5 s".into()),
                }
                worst = worst.max(t.elapsed());
                probes += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (probes, worst, failures)
        });
        Self { stop, task }
    }

    /// Stops probing and asserts every probe answered in time.
    async fn finish(self, what: &str) {
        self.stop.store(true, Ordering::Release);
        let (probes, worst, failures) = self.task.await.expect("probe task");
        eprintln!("{what}: {probes} health probes, slowest {worst:?}");
        assert!(probes > 0, "{what}: no health probe ran");
        assert!(
            failures.is_empty(),
            "{what}: health probes failed: {failures:?}"
        );
        assert!(
            worst <= HEALTH_BOUND,
            "{what}: the slowest health probe took {worst:?}"
        );
    }
}

fn log_lines(router: &RouterProc, needle: &str) -> usize {
    router
        .proc
        .stderr
        .lines()
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_the_cap_upgrades_get_503_at_capacity_and_health_keeps_answering() {
    run(LIMIT, async {
        let router = start_router(DESCRIPTORS, &[]).await;
        let started = Instant::now();
        let c = stats(&router).await;
        assert_eq!(c["descriptorLimit"], DESCRIPTORS, "{c}");
        assert_eq!(c["maxConnections"], CAP, "derived from the limit: {c}");
        assert_eq!(c["lowWater"], LOW_WATER, "{c}");
        let probe = HealthProbe::start(&router);

        let mut clients = Vec::new();
        for _ in 0..CAP {
            clients.push(router.client("/ws/echo").await);
        }
        let c = stats(&router).await;
        assert_eq!(
            (c["sessions"].as_u64(), c["full"].as_bool()),
            (Some(CAP), Some(true)),
            "{c}"
        );
        let ready = http_get(router.http, "/ready").await.unwrap();
        assert_eq!(ready.status, 503, "{ready:?}");
        assert_eq!(ready.json()["error"], "at_capacity", "{ready:?}");

        for _ in 0..10 {
            let resp = try_upgrade(router.http, "/ws/echo", &[]).await;
            let body = assert_refusal(&resp, 503, "at_capacity");
            assert_eq!(body["max_connections"], CAP, "{body}");
            assert_eq!(body["retry_after_ms"], 1000, "{body}");
            assert_eq!(resp.header("retry-after"), Some("1"), "{resp:?}");
            assert_eq!(resp.header("connection"), Some("close"), "{resp:?}");
        }
        let metrics = http_get(router.http, "/metrics").await.unwrap().body;
        for line in [
            "router_refused_upgrades_total{reason=\"at_capacity\"} 10",
            "router_at_capacity 1",
            &format!("router_max_connections {CAP}"),
            &format!("router_sessions {CAP}"),
            &format!("router_descriptor_limit {DESCRIPTORS}"),
        ] {
            assert!(
                metrics.lines().any(|l| l == line),
                "no `{line}` in /metrics:\n{metrics}"
            );
        }

        // Still full one above the low-water mark...
        for c in clients.drain(..(CAP - LOW_WATER - 1) as usize) {
            c.close().await;
        }
        wait_capacity(&router, "183 sessions", |c| c["sessions"] == LOW_WATER + 1).await;
        let ready = http_get(router.http, "/ready").await.unwrap();
        assert_eq!(ready.status, 503, "above the low-water mark: {ready:?}");
        // ...and ready again at it.
        clients.pop().unwrap().close().await;
        wait_capacity(&router, "182 sessions", |c| c["sessions"] == LOW_WATER).await;
        let ready = http_get(router.http, "/ready").await.unwrap();
        assert_eq!(ready.status, 200, "at the low-water mark: {ready:?}");
        clients.push(router.client("/ws/echo").await);

        probe.finish("at the cap").await;
        // Refusals came in a burst: logged once a second at most, and no
        // accept ever failed (the reserve held).
        let secs = started.elapsed().as_secs() as usize + 1;
        let refusal_lines = log_lines(&router, "refused: at capacity");
        assert!(
            (1..=secs).contains(&refusal_lines),
            "{refusal_lines} refusal lines in {secs} s"
        );
        assert_eq!(log_lines(&router, "accept failed"), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bare_tcp_connections_cannot_blind_the_router() {
    run(LIMIT, async {
        let router = start_router(DESCRIPTORS, &[]).await;
        let _worker = router.worker("echo_worker", &["echo"], &[]).await;
        let mut sessions = Vec::new();
        for _ in 0..100 {
            sessions.push(router.client("/ws/echo").await);
        }
        let probe = HealthProbe::start(&router);
        let started = Instant::now();
        // More connections that never send a byte than the router has
        // descriptors: each takes one until its handshake deadline (10 s),
        // unless the router makes room.
        let mut flood = Vec::new();
        for _ in 0..2 * DESCRIPTORS {
            flood.push(TcpStream::connect(router.http).await.expect("connect"));
        }
        let c = wait_capacity(&router, "evictions", |c| c["tcpEvicted"].as_u64() > Some(0)).await;
        assert!(
            // The budget is CAP + 16; a read right at an eviction may see
            // the connection that is still closing.
            c["tcpOpen"].as_u64() <= Some(CAP + 16 + 4),
            "open connections stay within the budget: {c}"
        );
        // A new client is served, and the sessions were never touched.
        let mut fresh = router.client("/ws/echo").await;
        fresh.request_ok("echo", "fresh", json!({"n": 1})).await;
        for (i, s) in sessions.iter_mut().enumerate().step_by(33) {
            s.request_ok("echo", &format!("old-{i}"), json!({"n": i}))
                .await;
        }
        probe.finish("under a TCP flood").await;
        let lines = log_lines(&router, "accept failed");
        eprintln!("{lines} accept-error lines in the flood");
        assert!(
            lines <= started.elapsed().as_secs() as usize + 1,
            "{lines} lines"
        );
        drop(flood);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_errors_are_counted_and_logged_at_most_once_a_second() {
    run(LIMIT, async {
        // A cap the descriptors cannot hold: the router warns at start, and
        // past the limit its accepts fail.
        let router = start_router(128, &[("MAX_CONNECTIONS", "1000")]).await;
        assert_eq!(
            log_lines(&router, "MAX_CONNECTIONS leaves less than the reserve"),
            1
        );
        let started = Instant::now();
        let mut clients = Vec::new();
        let mut failed = 0;
        while failed < 3 {
            match tokio::time::timeout(
                Duration::from_millis(1500),
                WsClient::try_connect(&router.ws_url("/ws/echo")),
            )
            .await
            {
                Ok(Ok(c)) => clients.push(c),
                _ => failed += 1,
            }
            assert!(
                clients.len() < 200,
                "the limit of 128 descriptors did not hold"
            );
        }
        let held = clients.len();
        assert!(held > 64, "only {held} connections before the limit");
        // Room again: the router recovers by itself.
        clients.truncate(held - 20);
        let metrics = loop {
            if let Ok(r) = http_get(router.http, "/metrics").await {
                break r.body;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "no recovery");
        };
        let errors: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("router_accept_errors_total "))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no router_accept_errors_total in /metrics:\n{metrics}"));
        let secs = started.elapsed().as_secs() as usize + 1;
        let lines = log_lines(&router, "accept failed");
        eprintln!("{errors} accept errors, {lines} log lines in {secs} s");
        assert!(
            errors >= 10,
            "4.5 s at the limit with retries every 50 ms: {errors}"
        );
        assert!((1..=secs).contains(&lines), "{lines} lines in {secs} s");
        // A fresh client gets its welcome.
        router.client("/ws/echo").await;
    })
    .await;
}
