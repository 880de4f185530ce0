//! Router-handled parts of the client protocol (README, client protocol) over a real stack:
//! request ids reusable once done, ping/pong, and cancel.

use std::time::Duration;

use e2e_tests::{run, RouterProc, RECV_TIMEOUT};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(60);
const ROUTES: &str = r#"{"routes": [{"path": "/ws/echo", "service": "echo"}]}"#;

/// A client that got `done: true` for an id may use that id again at once
/// (many clients number their requests, or reuse one id per action).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_can_be_reused_as_soon_as_its_done_frame_arrives() {
    run(LIMIT, async {
        // Many requests on one connection: the rate limit is not the subject.
        let router = RouterProc::start(ROUTES, &[("ENABLE_RATE_LIMIT", "false")]).await;
        let _w = router.worker("echo_worker", &[], &[]).await;
        let mut c = router.client("/ws/echo").await;
        for i in 0..1000 {
            let frames = c.request("echo", "same-id", json!({"i": i})).await;
            let last = frames.last().expect("a done frame");
            assert_ne!(
                last["type"], "error",
                "reuse #{i} of an id whose done frame had arrived was refused: {last}"
            );
            assert_eq!(last["data"], json!({"i": i}));
        }
        c.assert_seq_ok();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_is_answered_with_pong_and_server_time() {
    run(LIMIT, async {
        let router = RouterProc::start(ROUTES, &[]).await;
        let mut c = router.client("/ws/echo").await;
        c.send_json(&json!({"type": "ping", "id": "p-1"})).await;
        let pong = c.next_of_type("pong", RECV_TIMEOUT).await;
        assert_eq!(pong["id"], "p-1", "{pong}");
        let t = pong["data"]["server_time_ms"].as_u64().unwrap_or(0);
        assert!(
            t > 1_600_000_000_000,
            "server_time_ms is not Unix ms: {pong}"
        );
        c.assert_seq_ok();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_a_request_with_one_cancelled_error_and_frees_its_slot() {
    run(LIMIT, async {
        let router = RouterProc::start(ROUTES, &[]).await;
        let _w = router
            .worker("echo_worker", &[], &["--capacity", "1"])
            .await;
        let mut c = router.client("/ws/echo").await;
        c.send_request("slow", "to-cancel", json!({"ms": 60_000}))
            .await;
        e2e_tests::wait_route(
            router.http,
            "echo",
            Duration::from_secs(10),
            "the slow request in flight",
            |r| r.workers.iter().any(|(_, n)| *n == 1),
        )
        .await;
        c.send_json(&json!({"type": "cancel", "data": {"id": "to-cancel"}}))
            .await;
        let f = c.next_for_id("to-cancel", RECV_TIMEOUT).await;
        assert_eq!(f["type"], "error", "{f}");
        assert_eq!(f["error"]["code"], "cancelled", "{f}");
        assert_eq!(f["done"], true, "{f}");
        // The worker's capacity (1) is free again: a new request is served.
        let last = c.request_ok("echo", "after-cancel", json!("ok")).await;
        assert_eq!(last["data"], "ok");
        assert!(
            !c.backlog()
                .iter()
                .any(|fr| fr.json().is_some_and(|v| v["id"] == "to-cancel")),
            "more frames for the cancelled request: {:?}",
            c.backlog()
        );
        c.assert_seq_ok();
    })
    .await;
}
