//! Circuit breaker per route (README: policies): it opens after the
//! configured consecutive failures (worker errors, `no_workers`, timeouts),
//! then fails fast with `circuit_open` and a usable `retry_after_ms` while
//! nothing reaches the worker, lets one probe through after `openMs`, closes
//! on the probe's success and re-opens on its failure. Its state is in
//! `/routes` and `/metrics`, and one route's breaker never touches another's.

mod policies_support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use e2e_tests::{http_get, run, RouterConfig, RouterProc, WsClient, RECV_TIMEOUT};
use policies_support::{breaker_state, echo_worker_logged, wait_route_field, wait_seen};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(120);
/// Long enough that a dozen fast-fail round trips fit inside it even on a
/// loaded machine, short enough to keep the test quick.
const OPEN_MS: u64 = 2000;
const THRESHOLD: u64 = 3;

fn two_routes() -> String {
    let breaker = json!({"failureThreshold": THRESHOLD, "openMs": OPEN_MS});
    json!({"routes": [
        {"path": "/ws/a", "service": "svc_a", "requestTimeoutMs": 5000, "circuitBreaker": breaker},
        {"path": "/ws/b", "service": "svc_b", "requestTimeoutMs": 5000, "circuitBreaker": breaker}
    ]})
    .to_string()
}

/// Sends a request and returns its single terminal frame.
async fn one(c: &mut WsClient, msg_type: &str, id: &str, data: Value) -> Value {
    let frames = c.request(msg_type, id, data).await;
    assert_eq!(frames.len(), 1, "{id}: expected one frame, got {frames:?}");
    frames.into_iter().next().expect("one frame")
}

fn assert_error(f: &Value, id: &str, code: &str) {
    assert_eq!(f["type"], "error", "{id}: expected error {code}, got {f}");
    assert_eq!(f["id"], id, "{f}");
    assert_eq!(f["done"], true, "{f}");
    assert_eq!(f["error"]["code"], code, "{id}: {f}");
}

fn cid(f: &Value) -> String {
    f["correlation_id"]
        .as_str()
        .unwrap_or_else(|| panic!("frame without correlation_id: {f}"))
        .to_owned()
}

/// A line of the router's `/metrics` for the breaker of `route`.
async fn breaker_metric(router: &RouterProc, route: &str) -> String {
    let m = http_get(router.http, "/metrics")
        .await
        .unwrap_or_else(|e| panic!("GET /metrics: {e}"));
    assert_eq!(m.status, 200, "/metrics: {}", m.body);
    m.body
        .lines()
        .find(|l| {
            l.contains("breaker_state")
                && !l.starts_with('#')
                && l.contains(&format!("\"{route}\""))
        })
        .unwrap_or_else(|| {
            panic!(
                "/metrics has no breaker_state line for {route}:\n{}",
                m.body
            )
        })
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_fails_fast_without_reaching_the_worker_then_a_probe_closes_it() {
    run(LIMIT, async {
        let router = RouterProc::start(&two_routes(), &[]).await;
        let worker = echo_worker_logged(&router, &["svc_a", "svc_b"], &[]).await;
        router.wait_live_workers("svc_a", 1).await;
        router.wait_live_workers("svc_b", 1).await;
        let mut a = router.client("/ws/a").await;
        let mut b = router.client("/ws/b").await;
        // Correlation ids of the requests that passed the breaker: exactly
        // these may reach the worker.
        let mut passed = BTreeSet::new();
        let fail = json!({"code": "worker_error", "message": "injected failure"});

        // Failures must be consecutive: a success in between resets the count.
        for i in 0..THRESHOLD - 1 {
            let f = one(&mut a, "fail", &format!("f{i}"), fail.clone()).await;
            assert_error(&f, &format!("f{i}"), "worker_error");
            passed.insert(cid(&f));
        }
        let ok = one(&mut a, "echo", "reset", json!("ok")).await;
        assert_eq!(ok["data"], "ok", "{ok}");
        passed.insert(cid(&ok));
        for i in 0..THRESHOLD - 1 {
            let id = format!("g{i}");
            let f = one(&mut a, "fail", &id, fail.clone()).await;
            assert_error(&f, &id, "worker_error");
            passed.insert(cid(&f));
        }
        assert_eq!(
            breaker_state(router.http, "/ws/a").await,
            "closed",
            "{} failures, a success, {} failures: the breaker must still be closed",
            THRESHOLD - 1,
            THRESHOLD - 1
        );

        // The THRESHOLD-th consecutive failure opens it.
        let f = one(&mut a, "fail", "opening", fail.clone()).await;
        let opened_at = Instant::now();
        assert_error(&f, "opening", "worker_error");
        passed.insert(cid(&f));
        assert_eq!(breaker_state(router.http, "/ws/a").await, "open");
        assert_eq!(
            breaker_state(router.http, "/ws/b").await,
            "closed",
            "route b has its own breaker"
        );
        let metric = breaker_metric(&router, "/ws/a").await;
        assert!(
            metric.trim_end().ends_with(" 2"),
            "breaker_state of /ws/a must be 2 (open): {metric}"
        );

        // While open: every request fails at once, with a wait within openMs.
        let mut round_trips = Vec::new();
        let mut last_retry_after = 0;
        let mut last_rejected_at = Instant::now();
        for i in 0..10 {
            if opened_at.elapsed() > Duration::from_millis(OPEN_MS * 3 / 4) {
                // Too slow a machine to stay inside the open period; what
                // was measured so far still counts.
                break;
            }
            let id = format!("rejected{i}");
            let sent = Instant::now();
            let f = one(&mut a, "echo", &id, json!({"i": i})).await;
            round_trips.push(sent.elapsed());
            last_rejected_at = Instant::now();
            assert_error(&f, &id, "circuit_open");
            assert!(
                f["correlation_id"].as_str().is_none_or(|c| c.is_empty()),
                "a request refused by the breaker never got a correlation id: {f}"
            );
            let r = f["error"]["retry_after_ms"]
                .as_u64()
                .unwrap_or_else(|| panic!("circuit_open without retry_after_ms: {f}"));
            assert!(
                (1..=OPEN_MS).contains(&r),
                "retry_after_ms {r} outside 1..={OPEN_MS}: {f}"
            );
            last_retry_after = r;
        }
        assert!(!round_trips.is_empty(), "no rejection measured");
        round_trips.sort();
        let median = round_trips[round_trips.len() / 2];
        // The issue asks for well under a millisecond inside the router; a
        // client round trip on loopback through a debug build on a busy
        // 2-core machine adds its own milliseconds, so the bound is loose
        // but still far below any bridge round trip with a deadline.
        assert!(
            median < Duration::from_millis(50),
            "circuit_open round trips are not fast: {round_trips:?}"
        );

        // Another route keeps working while /ws/a is open.
        let whoami = one(&mut b, "whoami", "b-during-open", json!(null)).await;
        assert_eq!(whoami["data"]["worker_id"], worker.worker_id, "{whoami}");
        passed.insert(cid(&whoami));
        assert_eq!(breaker_state(router.http, "/ws/b").await, "closed");

        // retry_after_ms is usable: once it has passed, a probe may go.
        let wait = Duration::from_millis(last_retry_after)
            .saturating_sub(last_rejected_at.elapsed());
        tokio::time::sleep(wait).await;
        assert_eq!(
            breaker_state(router.http, "/ws/a").await,
            "half_open",
            "retry_after_ms ({last_retry_after} ms) has passed: the breaker must let a probe through"
        );

        // One probe at a time: while it is out, others still fail fast.
        a.send_request("slow", "probe", json!({"ms": 400})).await;
        a.send_request("echo", "during-probe", json!(null)).await;
        let during = a.next_for_id("during-probe", RECV_TIMEOUT).await;
        assert_error(&during, "during-probe", "circuit_open");
        assert!(
            during["error"]["retry_after_ms"].as_u64().is_some(),
            "{during}"
        );
        let probe = a.collect_until_done("probe", RECV_TIMEOUT).await;
        let probe = probe.last().expect("a done frame").clone();
        assert_eq!(probe["data"], json!({"slept_ms": 400}), "probe: {probe}");
        passed.insert(cid(&probe));
        assert_eq!(
            breaker_state(router.http, "/ws/a").await,
            "closed",
            "a successful probe closes the breaker"
        );
        let metric = breaker_metric(&router, "/ws/a").await;
        assert!(
            metric.trim_end().ends_with(" 0"),
            "breaker_state of /ws/a must be 0 (closed): {metric}"
        );
        let after = one(&mut a, "echo", "after", json!("back")).await;
        assert_eq!(after["data"], "back", "{after}");
        passed.insert(cid(&after));

        // Nothing refused by the breaker reached the worker: it logged
        // exactly the requests that passed. The last of them was handled
        // after every refused one was sent, so the log is complete.
        let seen = wait_seen(&worker, &passed, Duration::from_secs(10)).await;
        assert_eq!(
            seen, passed,
            "the worker saw requests the breaker refused (extra: {:?})",
            seen.difference(&passed).collect::<Vec<_>>()
        );
        a.assert_seq_ok();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_routes_open_breaker_never_affects_another_route() {
    run(LIMIT, async {
        let router = RouterProc::start(&two_routes(), &[]).await;
        let _w = router.worker("echo_worker", &["svc_a", "svc_b"], &[]).await;
        router.wait_live_workers("svc_b", 1).await;
        let mut a = router.client("/ws/a").await;
        let mut b = router.client("/ws/b").await;

        // Interleave: failures on b, successes on a. Only b opens.
        let fail = json!({"code": "internal", "message": "injected"});
        for i in 0..THRESHOLD {
            let f = one(&mut b, "fail", &format!("bf{i}"), fail.clone()).await;
            assert_error(&f, &format!("bf{i}"), "internal");
            let ok = one(&mut a, "echo", &format!("ok{i}"), json!(i)).await;
            assert_eq!(ok["data"], json!(i), "{ok}");
        }
        assert_eq!(breaker_state(router.http, "/ws/b").await, "open");
        assert_eq!(breaker_state(router.http, "/ws/a").await, "closed");
        let refused = one(&mut b, "echo", "b-refused", json!(null)).await;
        assert_error(&refused, "b-refused", "circuit_open");
        for i in 0..5 {
            let ok = one(&mut a, "echo", &format!("a{i}"), json!(i)).await;
            assert_eq!(ok["data"], json!(i), "route a must be unaffected: {ok}");
        }
        // Failures on a do not count against b's open period, nor open a
        // before its own threshold.
        for i in 0..THRESHOLD - 1 {
            let f = one(&mut a, "fail", &format!("af{i}"), fail.clone()).await;
            assert_error(&f, &format!("af{i}"), "internal");
        }
        assert_eq!(breaker_state(router.http, "/ws/a").await, "closed");
    })
    .await;
}

/// `no_workers` counts as a failure; a probe that fails re-opens the
/// breaker; once a worker is there, the next probe closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_workers_opens_the_breaker_a_failed_probe_reopens_it_a_good_one_closes_it() {
    run(LIMIT, async {
        let routes = json!({"routes": [{
            "path": "/ws/lonely", "service": "lonely", "requestTimeoutMs": 5000,
            "circuitBreaker": {"failureThreshold": 2, "openMs": 700}
        }]})
        .to_string();
        let router = RouterProc::start(&routes, &[]).await;
        let mut c = router.client("/ws/lonely").await;

        for id in ["n1", "n2"] {
            let f = one(&mut c, "echo", id, json!(null)).await;
            assert_error(&f, id, "no_workers");
        }
        assert_eq!(breaker_state(router.http, "/ws/lonely").await, "open");
        let f = one(&mut c, "echo", "fast", json!(null)).await;
        assert_error(&f, "fast", "circuit_open");

        // The probe fails (still no worker): open again, for another period.
        wait_route_field(
            router.http,
            "/ws/lonely",
            "breaker",
            Duration::from_secs(10),
            |v| v == "half_open",
        )
        .await;
        let f = one(&mut c, "echo", "probe-1", json!(null)).await;
        assert_error(&f, "probe-1", "no_workers");
        assert_eq!(
            breaker_state(router.http, "/ws/lonely").await,
            "open",
            "a failed probe re-opens the breaker"
        );
        let f = one(&mut c, "echo", "fast-2", json!(null)).await;
        assert_error(&f, "fast-2", "circuit_open");

        // A worker arrives; the next probe succeeds and closes it.
        let _w = router.worker("echo_worker", &["lonely"], &[]).await;
        router.wait_live_workers("lonely", 1).await;
        wait_route_field(
            router.http,
            "/ws/lonely",
            "breaker",
            Duration::from_secs(10),
            |v| v == "half_open",
        )
        .await;
        let ok = one(&mut c, "echo", "probe-2", json!("hello")).await;
        assert_eq!(ok["data"], "hello", "{ok}");
        assert_eq!(breaker_state(router.http, "/ws/lonely").await, "closed");
    })
    .await;
}

/// Requests that pass their deadline (`timeout`) count as failures too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_open_the_breaker() {
    run(LIMIT, async {
        let routes = json!({"routes": [{
            "path": "/ws/slow", "service": "echo", "requestTimeoutMs": 300,
            "circuitBreaker": {"failureThreshold": 2, "openMs": 5000}
        }]})
        .to_string();
        let router =
            RouterProc::start_with(RouterConfig::new(&routes).env("ENABLE_RATE_LIMIT", "false"))
                .await;
        let _w = router.worker("echo_worker", &[], &[]).await;
        router.wait_live_workers("echo", 1).await;
        let mut c = router.client("/ws/slow").await;
        for id in ["t1", "t2"] {
            let f = one(&mut c, "slow", id, json!({"ms": 3000})).await;
            assert_error(&f, id, "timeout");
        }
        assert_eq!(breaker_state(router.http, "/ws/slow").await, "open");
        let f = one(&mut c, "echo", "t3", json!(null)).await;
        assert_error(&f, "t3", "circuit_open");
        let r = f["error"]["retry_after_ms"].as_u64().unwrap_or(0);
        assert!((1..=5000).contains(&r), "retry_after_ms {r}: {f}");
    })
    .await;
}
