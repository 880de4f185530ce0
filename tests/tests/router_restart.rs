//! The router restarts under running workers (stopped cleanly, or killed):
//! the workers notice, re-register on their own, and serve again.

use std::time::Duration;

use e2e_tests::{run, Endpoints, RouterConfig, RouterProc, WsClient};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(120);
const ROUTES: &str = r#"{"routes": [{"path": "/ws/echo", "service": "echo"}]}"#;

async fn whoami(router: &RouterProc, id: &str) -> String {
    let mut c = router.client("/ws/echo").await;
    let last = c.request_ok("whoami", id, json!(null)).await;
    last["data"]["worker_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Starts two workers on `router`, checks they serve, and returns them.
async fn workers(router: &RouterProc) -> Vec<e2e_tests::WorkerProc> {
    let a = router
        .worker("echo_worker", &[], &["--id", "restart-a"])
        .await;
    let b = router
        .worker("echo_worker", &[], &["--id", "restart-b"])
        .await;
    router.wait_live_workers("echo", 2).await;
    let w = whoami(router, "before").await;
    assert!(w.starts_with("restart-"), "{w}");
    vec![a, b]
}

async fn assert_workers_back(router: &RouterProc, workers: &mut [e2e_tests::WorkerProc]) {
    // The workers were never restarted: the same processes come back.
    let r = router.wait_live_workers("echo", 2).await;
    let mut ids: Vec<&str> = r.workers.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["restart-a", "restart-b"], "{r:?}");
    for w in workers.iter_mut() {
        assert!(w.proc.try_status().is_none(), "{} exited", w.worker_id);
    }
    let w = whoami(router, "after").await;
    assert!(w.starts_with("restart-"), "{w}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_stopped_with_sigterm_and_started_again_on_the_same_ipc_endpoints() {
    run(LIMIT, async {
        let mut router = RouterProc::start_with(RouterConfig::new(ROUTES).heartbeat_ms(200)).await;
        let mut ws = workers(&router).await;
        let mut idle = router.client("/ws/echo").await;

        router.proc.sigterm();
        let status = router
            .proc
            .wait_exit(Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            status.success(),
            "router exit status after SIGTERM: {status}"
        );
        // Clients are told the server is going away (or restarting).
        let close = idle.wait_closed(Duration::from_secs(5)).await;
        let code = close.as_ref().map(|(c, _)| *c);
        assert!(
            code == Some(1001) || code == Some(1012),
            "close on shutdown must be 1001 or 1012, got {close:?}"
        );

        router.restart().await;
        assert_workers_back(&router, &mut ws).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_killed_and_started_again_on_the_same_tcp_endpoints() {
    run(LIMIT, async {
        let mut router = RouterProc::start_with(
            RouterConfig::new(ROUTES)
                .endpoints(Endpoints::tcp_fixed())
                .heartbeat_ms(200),
        )
        .await;
        let mut ws = workers(&router).await;
        router.proc.kill9();
        router.restart().await;
        assert_workers_back(&router, &mut ws).await;
    })
    .await;
}

/// A crash leaves the ipc socket files behind; the next router on the same
/// paths must still come up (removing a stale file no process listens on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_killed_and_started_again_on_the_same_ipc_endpoints() {
    run(LIMIT, async {
        let mut router = RouterProc::start_with(RouterConfig::new(ROUTES).heartbeat_ms(200)).await;
        let mut ws = workers(&router).await;
        router.proc.kill9();
        router.restart().await;
        assert_workers_back(&router, &mut ws).await;
    })
    .await;
}

/// A second router on endpoints a live router holds must refuse to start
/// rather than steal (or unlink) the live router's sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_router_on_live_endpoints_is_refused_and_the_first_keeps_serving() {
    run(LIMIT, async {
        let router = RouterProc::start(ROUTES, &[]).await;
        let _ws = workers(&router).await;

        let mut cmd = std::process::Command::new(e2e_tests::router_bin());
        cmd.args(["--host", "127.0.0.1", "--port", "0", "--routes"])
            .arg(router.routes_file())
            .args([
                "--bridge-endpoint",
                &router.bridge,
                "--publish-endpoint",
                &router.publish,
            ]);
        let mut second = e2e_tests::Proc::spawn("second-router", cmd);
        let status = second
            .wait_exit(Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("the second router kept running: {e}"));
        assert!(!status.success(), "the second router exited with success");
        assert!(
            !second.stdout.text().contains("\"listening\""),
            "the second router claimed to listen: {}",
            second.stdout.text()
        );

        let mut c = WsClient::connect(&router.ws_url("/ws/echo")).await;
        let last = c.request_ok("whoami", "still-served", json!(null)).await;
        assert!(last["data"]["worker_id"].is_string(), "{last}");
        // New workers still reach the first router at the same endpoints.
        let _late = router
            .worker("echo_worker", &[], &["--id", "restart-late"])
            .await;
        router.wait_live_workers("echo", 3).await;
    })
    .await;
}
