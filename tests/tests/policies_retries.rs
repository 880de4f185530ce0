//! Retries (README: policies): a request whose worker dies before replying
//! is answered by another worker when the route has `retries`, and ends
//! with `worker_error` when it has none; an error marked `retryable` is
//! retried on a different worker too. Which worker served which attempt is
//! read from the workers' own logs (correlation id and attempt number).

mod policies_support;

use std::time::{Duration, Instant};

use e2e_tests::{run, wait_route, RouterConfig, RouterProc, WorkerProc, WsClient, RECV_TIMEOUT};
use policies_support::{echo_worker_logged, seen_correlation_ids, wait_seen};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(120);
/// Far above the time to notice a dead worker (3 × 200 ms heartbeats), so a
/// `timeout` can never stand in for the outcome under test.
const TIMEOUT_MS: u64 = 20_000;
const SLOW_MS: u64 = 2000;

async fn router(retries: u64) -> RouterProc {
    let routes = json!({"routes": [{
        "path": "/ws/echo", "service": "echo",
        "requestTimeoutMs": TIMEOUT_MS, "retries": retries
    }]})
    .to_string();
    RouterProc::start_with(RouterConfig::new(&routes).heartbeat_ms(200)).await
}

async fn two_workers(router: &RouterProc) -> (WorkerProc, WorkerProc) {
    let a = echo_worker_logged(router, &[], &["--id", "retry-a"]).await;
    let b = echo_worker_logged(router, &[], &["--id", "retry-b"]).await;
    router.wait_live_workers("echo", 2).await;
    (a, b)
}

/// Polls `/routes` until a worker holds a request; returns its id.
async fn busy_worker(router: &RouterProc) -> String {
    let r = wait_route(
        router.http,
        "echo",
        Duration::from_secs(10),
        "a busy worker",
        |r| r.workers.iter().any(|(_, n)| *n > 0),
    )
    .await;
    r.workers
        .iter()
        .find(|(_, n)| *n > 0)
        .map(|(id, _)| id.clone())
        .expect("the predicate saw a busy worker")
}

/// Sends `slow`, SIGKILLs the worker that took it, and returns the frames
/// of the request plus (survivor, killed-worker id).
async fn kill_the_worker_mid_request(
    router: &RouterProc,
    c: &mut WsClient,
    mut a: WorkerProc,
    mut b: WorkerProc,
) -> (Vec<Value>, WorkerProc, Duration) {
    c.send_request("slow", "r", json!({"ms": SLOW_MS})).await;
    let sent = Instant::now();
    let busy = busy_worker(router).await;
    let survivor = if busy == a.worker_id {
        a.proc.kill9();
        b
    } else {
        assert_eq!(busy, b.worker_id, "an unknown worker is busy");
        b.proc.kill9();
        a
    };
    let frames = c
        .collect_until_done("r", Duration::from_millis(TIMEOUT_MS) + RECV_TIMEOUT)
        .await;
    (frames, survivor, sent.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_worker_dies_is_answered_by_another_worker_when_retries_are_allowed() {
    run(LIMIT, async {
        let router = router(1).await;
        let (a, b) = two_workers(&router).await;
        let mut c = router.client("/ws/echo").await;

        let (frames, survivor, took) = kill_the_worker_mid_request(&router, &mut c, a, b).await;
        assert_eq!(frames.len(), 1, "one terminal frame: {frames:?}");
        let last = &frames[0];
        assert_ne!(
            last["type"], "error",
            "with retries 1 the request must be retried, got {last}"
        );
        assert_eq!(last["data"], json!({"slept_ms": SLOW_MS}), "{last}");
        assert!(
            took < Duration::from_millis(TIMEOUT_MS),
            "answered after {took:?}, past the deadline"
        );
        // The survivor ran it as the second attempt, under the same
        // correlation id.
        let cid = last["correlation_id"]
            .as_str()
            .expect("correlation id")
            .to_owned();
        wait_seen(&survivor, &[cid.clone()].into(), Duration::from_secs(5)).await;
        let lines = survivor.proc.stderr.lines();
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&cid) && l.contains("attempt=2")),
            "the survivor's log must show attempt 2 of {cid}:\n{}",
            lines.join("\n")
        );
        // The connection is fine afterwards.
        let ok = c.request_ok("echo", "after", json!("ok")).await;
        assert_eq!(ok["data"], "ok");
        c.assert_seq_ok();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_worker_dies_gets_worker_error_when_the_route_has_no_retries() {
    run(LIMIT, async {
        let router = router(0).await;
        let (a, b) = two_workers(&router).await;
        let mut c = router.client("/ws/echo").await;

        let (frames, survivor, took) = kill_the_worker_mid_request(&router, &mut c, a, b).await;
        assert_eq!(frames.len(), 1, "one terminal frame: {frames:?}");
        let last = &frames[0];
        assert_eq!(
            last["type"], "error",
            "retries 0: no second attempt: {last}"
        );
        assert_eq!(last["error"]["code"], "worker_error", "{last}");
        assert_eq!(last["done"], true, "{last}");
        assert!(
            took < Duration::from_millis(SLOW_MS + 3000),
            "the lost worker must be noticed quickly (heartbeats), not after {took:?}"
        );
        let cid = last["correlation_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            !seen_correlation_ids(&survivor).contains(&cid),
            "the request went to the surviving worker although the route has no retries"
        );
        // The survivor serves the next request.
        let ok = c.request_ok("echo", "after", json!("ok")).await;
        assert_eq!(ok["data"], "ok");
        c.assert_seq_ok();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retryable_error_is_retried_on_the_other_worker() {
    run(LIMIT, async {
        let router = router(1).await;
        let (a, b) = two_workers(&router).await;
        let mut c = router.client("/ws/echo").await;
        let frames = c
            .request(
                "fail",
                "f",
                json!({"code": "busy_now", "message": "try elsewhere", "retryable": true}),
            )
            .await;
        assert_eq!(frames.len(), 1, "{frames:?}");
        let last = &frames[0];
        assert_eq!(last["error"]["code"], "busy_now", "{last}");
        let cid = last["correlation_id"]
            .as_str()
            .expect("correlation id")
            .to_owned();
        // Both workers were asked: attempt 1 on one, attempt 2 on the other.
        let want = [cid.clone()].into();
        wait_seen(&a, &want, Duration::from_secs(5)).await;
        wait_seen(&b, &want, Duration::from_secs(5)).await;
        let attempts: Vec<bool> = [&a, &b]
            .iter()
            .map(|w| {
                w.proc
                    .stderr
                    .lines()
                    .iter()
                    .any(|l| l.contains(&cid) && l.contains("attempt=2"))
            })
            .collect();
        assert_eq!(
            attempts.iter().filter(|x| **x).count(),
            1,
            "exactly one worker ran attempt 2 of {cid}"
        );

        // Without `retryable`, no second attempt.
        let frames = c
            .request("fail", "g", json!({"code": "final_no", "message": "no"}))
            .await;
        let last = &frames[0];
        assert_eq!(last["error"]["code"], "final_no", "{last}");
        let cid = last["correlation_id"]
            .as_str()
            .expect("correlation id")
            .to_owned();
        let seen_by = || {
            [&a, &b]
                .iter()
                .filter(|w| seen_correlation_ids(w).contains(&cid))
                .count()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen_by() == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(seen_by(), 1, "a non-retryable error must not be retried");
    })
    .await;
}
