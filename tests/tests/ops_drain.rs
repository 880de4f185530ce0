//! Graceful drain on SIGTERM/SIGINT (issue 5, README: graceful shutdown): in-flight requests
//! finish with their final replies, then clients get close 1001, workers
//! are told, the process exits 0 within the drain timeout; the drain itself
//! is bounded; a second signal exits at once.

mod ops_support;

use std::time::Duration;

use e2e_tests::{http_get, run, wait_route, RouterProc, WsClient, RECV_TIMEOUT};
use nix::sys::signal::Signal;
use ops_support::{start_router, try_upgrade, wait_log, Upgrade, SOON};
use serde_json::json;
use tokio::time::Instant;

const LIMIT: Duration = Duration::from_secs(120);

const ROUTES: &str = r#"{"routes": [{"path": "/ws/echo", "service": "echo"}]}"#;

/// A router with `DRAIN_TIMEOUT_MS=drain` and one echo worker.
async fn router_with_drain(drain: Duration) -> (RouterProc, e2e_tests::WorkerProc) {
    let ms = drain.as_millis().to_string();
    let router = start_router(ROUTES, &[("DRAIN_TIMEOUT_MS", &ms)]).await;
    let worker = router.worker("echo_worker", &[], &[]).await;
    (router, worker)
}

/// Clients each with one `slow` request in flight at the worker.
async fn busy_clients(router: &RouterProc, n: usize, ms: u64) -> Vec<WsClient> {
    let mut clients = Vec::new();
    for i in 0..n {
        let mut c = router.client("/ws/echo").await;
        c.send_request("slow", &format!("slow{i}"), json!({"ms": ms}))
            .await;
        clients.push(c);
    }
    wait_route(
        router.http,
        "echo",
        SOON,
        &format!("{n} requests in flight"),
        |r| r.workers.iter().map(|w| w.1).sum::<u64>() == n as u64,
    )
    .await;
    clients
}

/// Sends SIGTERM and waits until the router says it is draining.
async fn start_drain(router: &mut RouterProc, sig: Signal) -> Instant {
    let from = router.proc.stderr.position();
    let t0 = Instant::now();
    router.proc.signal(sig);
    wait_log(&router.proc.stderr, from, &["shutdown: draining"], SOON).await;
    t0
}

/// The whole drain sequence (README: graceful shutdown) with requests in flight: no new upgrades and
/// `/ready` not ready, new requests on open connections refused with
/// `overloaded`, every in-flight request's final reply delivered, then close
/// 1001 for every client (idle ones too), workers told goodbye, exit 0 well
/// within the drain timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_closes_with_1001_and_exits_0() {
    run(LIMIT, async {
        let drain = Duration::from_secs(10);
        let (mut router, worker) = router_with_drain(drain).await;
        // Long enough for the checks made during the drain, on a loaded machine.
        const SLOW_MS: u64 = 3000;
        // Every slow request is sent after this instant, so none can finish
        // before `sent + SLOW_MS`.
        let sent = Instant::now();
        let mut busy = busy_clients(&router, 3, SLOW_MS).await;
        let mut idle = router.client("/ws/echo").await;

        let t0 = start_drain(&mut router, Signal::SIGTERM).await;
        assert!(router.proc.try_status().is_none(), "exited before draining");
        // No HTTP answer at all (the listener is closed) is "not ready" too;
        // the 503 the spec asks for is checked by the ignored test below.
        if let Ok(r) = http_get(router.http, "/ready").await {
            assert_eq!(r.status, 503, "/ready while draining: {r:?}");
        }
        match try_upgrade(&router.ws_url("/ws/echo")).await {
            Upgrade::Accepted(_) => panic!("a new upgrade was accepted while draining"),
            Upgrade::Refused { status, body } => assert_eq!(status, 503, "{body}"),
            Upgrade::Failed(_) => {}
        }
        busy[0].send_request("echo", "late", json!("x")).await;
        let late = busy[0].next_for_id("late", RECV_TIMEOUT).await;
        assert_eq!(
            late["error"]["code"], "overloaded",
            "no new requests: {late}"
        );

        let idle_close = idle.wait_closed(RECV_TIMEOUT).await;
        assert_eq!(
            idle_close.as_ref().map(|c| c.0),
            Some(1001),
            "{idle_close:?}"
        );
        // Answer the close frame, as a browser does (the router waits for it).
        idle.close().await;
        for (i, mut c) in busy.into_iter().enumerate() {
            let frames = c
                .collect_until_done(&format!("slow{i}"), RECV_TIMEOUT)
                .await;
            assert_eq!(
                frames.last().map(|f| f["data"].clone()),
                Some(json!({"slept_ms": SLOW_MS})),
                "client {i}: the in-flight request completes: {frames:?}"
            );
            let close = c.wait_closed(RECV_TIMEOUT).await;
            assert_eq!(
                close.as_ref().map(|c| c.0),
                Some(1001),
                "client {i}: {close:?}"
            );
            assert!(c.backlog().is_empty(), "client {i}: {:?}", c.backlog());
            c.close().await;
        }

        let status = router
            .proc
            .wait_exit(drain + SOON)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let took = t0.elapsed();
        eprintln!("drained and exited {status:?} after {took:?}");
        assert!(status.success(), "exit status {status:?}");
        assert!(
            took < drain,
            "exited {took:?} after SIGTERM, drain timeout {drain:?}"
        );
        assert!(
            sent.elapsed() >= Duration::from_millis(SLOW_MS),
            "exited {:?} after the requests were sent: before they could finish",
            sent.elapsed()
        );
        wait_log(&worker.proc.stderr, 0, &["the router said goodbye"], SOON).await;
    })
    .await;
}

/// A request that outlives the drain timeout does not hold the process:
/// its client gets 1001 at the drain deadline and the router exits 0 then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_bounds_requests_that_outlive_it() {
    run(LIMIT, async {
        let drain = Duration::from_millis(1500);
        let (mut router, _worker) = router_with_drain(drain).await;
        let mut c = busy_clients(&router, 1, 60_000).await.remove(0);

        let t0 = start_drain(&mut router, Signal::SIGTERM).await;
        let close = c.wait_closed(drain + SOON).await;
        let cut_at = t0.elapsed();
        assert_eq!(close.as_ref().map(|c| c.0), Some(1001), "{close:?}");
        c.close().await;
        let status = router
            .proc
            .wait_exit(drain + SOON)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let took = t0.elapsed();
        eprintln!("request cut after {cut_at:?}; exited {status:?} after {took:?}");
        assert!(status.success(), "exit status {status:?}");
        assert!(
            cut_at >= drain - Duration::from_millis(100),
            "closed after {cut_at:?}: the request did not get its drain time"
        );
        // Margin over the drain timeout for a loaded 2-core machine.
        assert!(
            took < drain + Duration::from_secs(3),
            "exited {took:?} after SIGTERM, drain timeout {drain:?}"
        );
    })
    .await;
}

/// A second SIGTERM during a long drain exits at once (status may be non-zero).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_during_the_drain_exits_at_once() {
    run(LIMIT, async {
        let drain = Duration::from_secs(60);
        let (mut router, _worker) = router_with_drain(drain).await;
        let _busy = busy_clients(&router, 1, 60_000).await;

        start_drain(&mut router, Signal::SIGTERM).await;
        assert!(
            router.proc.try_status().is_none(),
            "the first signal only drains"
        );
        let t1 = Instant::now();
        router.proc.sigterm();
        let status = router
            .proc
            .wait_exit(Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let took = t1.elapsed();
        eprintln!("second SIGTERM: exit {status:?} after {took:?}");
        assert!(
            took < Duration::from_secs(2),
            "the second signal took {took:?} to stop the router"
        );
    })
    .await;
}

/// SIGINT drains like SIGTERM: connected clients get 1001 and the exit is 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_like_sigterm() {
    run(LIMIT, async {
        let (mut router, _worker) = router_with_drain(Duration::from_secs(10)).await;
        let mut c = router.client("/ws/echo").await;
        c.request_ok("echo", "e", json!(1)).await;
        start_drain(&mut router, Signal::SIGINT).await;
        let close = c.wait_closed(RECV_TIMEOUT).await;
        assert_eq!(close.as_ref().map(|c| c.0), Some(1001), "{close:?}");
        c.close().await;
        let status = router
            .proc
            .wait_exit(SOON)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(status.success(), "exit status {status:?}");
    })
    .await;
}

/// A client that never reads (so never answers the close frame) cannot hold
/// the shutdown: the router still exits 0, within the drain timeout plus the
/// one second it allows for close handshakes (server.rs), plus a margin for
/// a loaded machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_does_not_hold_the_shutdown() {
    run(LIMIT, async {
        let drain = Duration::from_millis(1000);
        let (mut router, _worker) = router_with_drain(drain).await;
        let mut deaf = router.client("/ws/echo").await;
        deaf.request_ok("echo", "e", json!(1)).await;
        // From here on `deaf` reads nothing.
        let t0 = start_drain(&mut router, Signal::SIGTERM).await;
        let status = router
            .proc
            .wait_exit(drain + SOON)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let took = t0.elapsed();
        eprintln!("with a deaf client: exited {status:?} after {took:?}");
        assert!(status.success(), "exit status {status:?}");
        assert!(
            took < drain + Duration::from_secs(1) + Duration::from_secs(2),
            "a client that does not read held the exit for {took:?}"
        );
        // It did get the close frame, even though it never answered.
        let close = deaf.wait_closed(RECV_TIMEOUT).await;
        assert_eq!(close.as_ref().map(|c| c.0), Some(1001), "{close:?}");
    })
    .await;
}

/// The README (client protocol, graceful shutdown): `/ready` answers 503 while draining, and a
/// refused upgrade answers with a JSON body that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_answers_503_and_upgrades_get_a_json_refusal_while_draining() {
    run(LIMIT, async {
        let (mut router, _worker) = router_with_drain(Duration::from_secs(30)).await;
        let _busy = busy_clients(&router, 1, 10_000).await;
        start_drain(&mut router, Signal::SIGTERM).await;

        let ready = http_get(router.http, "/ready").await;
        match &ready {
            Ok(r) => {
                assert_eq!(r.status, 503, "{r:?}");
                assert_eq!(r.json()["error"], "draining", "{r:?}");
            }
            Err(e) => panic!("GET /ready during the drain got no HTTP answer: {e}"),
        }
        match try_upgrade(&router.ws_url("/ws/echo")).await {
            Upgrade::Refused { status: 503, body } => {
                assert_eq!(body["error"], "draining", "{body}");
            }
            other => panic!(
                "an upgrade during the drain: expected 503 draining, got {}",
                other.describe()
            ),
        }
    })
    .await;
}
