//! Workers that die (SIGKILL) or freeze (SIGSTOP) in the middle of a request:
//! the client gets exactly one terminal error for it, in time; other work goes
//! to the live workers; a late reply is never delivered; a restarted worker
//! serves again.

use std::time::{Duration, Instant};

use e2e_tests::{run, wait_route, Frame, RouterProc, WorkerProc, WsClient, RECV_TIMEOUT};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(120);
const TIMEOUT_MS: u64 = 3000;
/// Router heartbeat for these tests: a dead worker is declared dead after
/// 3 × 200 ms, well before the request timeout, so which of the two ends the
/// request (death or deadline) is a race the tests accept either way.
const HEARTBEAT_MS: u64 = 200;

fn routes() -> String {
    json!({"routes": [{"path": "/ws/echo", "service": "echo", "requestTimeoutMs": TIMEOUT_MS}]})
        .to_string()
}

async fn router() -> RouterProc {
    RouterProc::start_with(
        e2e_tests::RouterConfig::new(&routes())
            .heartbeat_ms(HEARTBEAT_MS)
            .env("ENABLE_RATE_LIMIT", "false"),
    )
    .await
}

/// Polls `/routes` until some worker has a request in flight; returns its id.
async fn busy_worker(router: &RouterProc) -> String {
    let r = wait_route(
        router.http,
        "echo",
        Duration::from_secs(10),
        "a busy worker",
        |r| r.workers.iter().any(|(_, n)| *n > 0),
    )
    .await;
    // Invariant: the predicate above saw a worker with in_flight > 0.
    r.workers
        .iter()
        .find(|(_, n)| *n > 0)
        .map(|(id, _)| id.clone())
        .expect("predicate guarantees a busy worker")
}

/// Waits for the terminal frame of `id` and checks it is a single error
/// frame that arrived before `deadline` (measured from `since`).
async fn expect_terminal_error(
    c: &mut WsClient,
    id: &str,
    since: Instant,
    deadline: Duration,
) -> Value {
    let f = c.next_for_id(id, deadline + Duration::from_secs(2)).await;
    let elapsed = since.elapsed();
    assert_eq!(
        f["type"], "error",
        "expected an error frame for {id}, got {f}"
    );
    assert_eq!(f["done"], true, "{f}");
    let code = f["error"]["code"].as_str().unwrap_or_default();
    assert!(
        code == "worker_error" || code == "timeout",
        "error code for a lost worker must be worker_error or timeout: {f}"
    );
    assert!(
        f["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "error without message: {f}"
    );
    assert!(
        elapsed <= deadline + Duration::from_millis(1500),
        "terminal error after {elapsed:?}, the deadline was {deadline:?}"
    );
    f
}

fn assert_no_frames_for(c: &WsClient, id: &str) {
    let extra: Vec<&Frame> = c
        .backlog()
        .iter()
        .filter(|f| f.json().is_some_and(|v| v["id"] == id))
        .collect();
    assert!(
        extra.is_empty(),
        "more frames for {id} after its terminal one: {extra:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_request_gives_one_error_then_survivor_and_restart_serve() {
    run(LIMIT, async {
        let router = router().await;
        let start_worker = |id: &'static str| {
            let (bridge, publish) = (router.bridge.clone(), router.publish.clone());
            async move {
                // Capacity 1: a busy worker can take nothing else, which makes
                // "the other worker served it" a deterministic check.
                WorkerProc::start(
                    "echo_worker",
                    &bridge,
                    &publish,
                    &[],
                    &["--id", id, "--capacity", "1"],
                )
                .await
            }
        };
        let mut a = Some(start_worker("worker-a").await);
        let mut b = Some(start_worker("worker-b").await);
        router.wait_live_workers("echo", 2).await;

        let mut c = router.client("/ws/echo").await;
        c.send_request("slow", "slow-1", json!({"ms": 10_000}))
            .await;
        let victim = busy_worker(&router).await;
        let (victim_proc, survivor) = if victim == "worker-a" {
            (&mut a, "worker-b")
        } else {
            (&mut b, "worker-a")
        };
        let t0 = Instant::now();
        // Invariant: both slots were filled above.
        victim_proc.as_mut().expect("started").proc.kill9();

        expect_terminal_error(&mut c, "slow-1", t0, Duration::from_millis(TIMEOUT_MS)).await;
        let r = router.wait_live_workers("echo", 1).await;
        assert_eq!(
            r.workers[0].0, survivor,
            "the survivor is the live one: {:?}",
            r.workers
        );

        for i in 0..5 {
            let last = c
                .request_ok("whoami", &format!("after-kill-{i}"), json!(null))
                .await;
            assert_eq!(last["data"]["worker_id"], survivor, "{last}");
        }
        assert_no_frames_for(&c, "slow-1");

        // The killed worker comes back and takes work again.
        *victim_proc = Some(
            start_worker(if victim == "worker-a" {
                "worker-a"
            } else {
                "worker-b"
            })
            .await,
        );
        router.wait_live_workers("echo", 2).await;
        let mut other = router.client("/ws/echo").await;
        other
            .send_request("slow", "busy", json!({"ms": 1500}))
            .await;
        let busy = busy_worker(&router).await;
        let last = c.request_ok("whoami", "while-busy", json!(null)).await;
        let free = last["data"]["worker_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert_ne!(busy, free, "a worker at capacity 1 got a second request");
        let mut both = vec![busy, free];
        both.sort();
        assert_eq!(
            both,
            ["worker-a", "worker-b"],
            "both workers, the restarted one included, served"
        );
        let slow = other.collect_until_done("busy", RECV_TIMEOUT).await;
        assert_eq!(
            slow.last().map(|f| &f["data"]),
            Some(&json!({"slept_ms": 1500})),
            "{slow:?}"
        );
        assert_no_frames_for(&c, "slow-1");
        c.assert_seq_ok();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_worker_gives_one_error_and_its_late_reply_is_dropped() {
    run(LIMIT, async {
        let router = router().await;
        let mut w = router.worker("echo_worker", &[], &["--id", "frozen"]).await;
        router.wait_live_workers("echo", 1).await;

        let mut c = router.client("/ws/echo").await;
        // Short enough that the worker, once thawed, does send its (late) reply.
        c.send_request("slow", "frozen-1", json!({"ms": 1000}))
            .await;
        busy_worker(&router).await;
        let t0 = Instant::now();
        w.proc.sigstop();

        expect_terminal_error(&mut c, "frozen-1", t0, Duration::from_millis(TIMEOUT_MS)).await;
        w.proc.sigcont();

        // Thawed, the worker finds its link stale or is told so, and comes back
        // on its own; meanwhile its late reply for frozen-1 must be dropped.
        router.wait_live_workers("echo", 1).await;
        let mut served = false;
        let until = Instant::now() + Duration::from_secs(15);
        let mut i = 0;
        while !served && Instant::now() < until {
            i += 1;
            let id = format!("after-thaw-{i}");
            let frames = c.request("whoami", &id, json!(null)).await;
            // Invariant: request() returns at least the done frame.
            let last = frames.last().expect("done frame");
            if last["type"] != "error" {
                assert_eq!(last["data"]["worker_id"], "frozen", "{last}");
                served = true;
            } else {
                // The router may still be swapping the worker's old link for
                // its new one; only `no_workers` is acceptable in that window.
                assert_eq!(last["error"]["code"], "no_workers", "{last}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        assert!(served, "the thawed worker never served again");
        // Its reply to frozen-1 (sent after the thaw) has had time to arrive
        // before the whoami answer from the same worker socket.
        assert_no_frames_for(&c, "frozen-1");
        c.assert_seq_ok();
    })
    .await;
}
