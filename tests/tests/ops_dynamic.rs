//! Dynamic routing (issue 5, README: routes file): with `ENABLE_DYNAMIC_ROUTING=true` a
//! worker that serves a path-named service the routes file lacks creates
//! that route (default policies, `"dynamic": true` in `/routes`), which is
//! served end to end and disappears when its last worker stops; without
//! the flag it never appears.

mod ops_support;

use std::time::Duration;

use e2e_tests::{routes, run, wait_route, RouterProc, RECV_TIMEOUT};
use ops_support::{assert_unknown_route, poll_until, stats, SOON};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(120);

const ROUTES: &str = r#"{
  "defaults": {"requestTimeoutMs": 12000, "maxInFlight": 7},
  "routes": [{"path": "/ws/echo", "service": "echo"}]
}"#;

const DYN: &str = "/ws/dyn";

async fn dynamic_router(enabled: bool) -> RouterProc {
    // A short heartbeat so a worker that stops is forgotten quickly even
    // if its goodbye were lost.
    let mut cfg = e2e_tests::RouterConfig::new(ROUTES)
        .heartbeat_ms(200)
        .env("RUST_LOG", "info")
        .env("LOG_FORMAT", "text");
    if enabled {
        cfg = cfg.env("ENABLE_DYNAMIC_ROUTING", "true");
    }
    RouterProc::start_with(cfg).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_registered_route_is_served_and_removed_when_its_worker_stops() {
    run(LIMIT, async {
        let router = dynamic_router(true).await;
        assert_unknown_route(&router.ws_url(DYN)).await;
        let mut worker = router.worker("echo_worker", &[DYN], &[]).await;

        let route = wait_route(
            router.http,
            DYN,
            SOON,
            "a dynamic route with 1 worker",
            |r| r.path == DYN && r.live_workers == 1,
        )
        .await;
        assert_eq!(route.raw["dynamic"], true, "{}", route.raw);
        assert_eq!(route.raw["raw"], false, "{}", route.raw);
        // The file's defaults are the new route's policies.
        assert_eq!(route.raw["request_timeout_ms"], 12000, "{}", route.raw);
        assert_eq!(route.raw["max_in_flight"], 7, "{}", route.raw);
        assert_eq!(route.workers[0].0, worker.worker_id, "{}", route.raw);

        let mut c = router.client(DYN).await;
        let welcome = c.welcome.clone().unwrap_or_default();
        assert_eq!(welcome["data"]["route"], DYN, "{welcome}");
        let data = json!({"hello": "dynamic"});
        let last = c.request_ok("echo", "d1", data.clone()).await;
        assert_eq!(last["data"], data);
        let who = c.request_ok("whoami", "d2", json!(null)).await;
        assert_eq!(who["data"]["worker_id"], worker.worker_id.as_str());

        worker.proc.sigterm();
        let status = worker
            .proc
            .wait_exit(SOON)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(status.success(), "worker exit {status:?}");
        poll_until("the dynamic route gone from /routes", SOON, || async {
            let list = routes(router.http).await?;
            match list.iter().find(|r| r.path == DYN) {
                None => Ok(()),
                Some(r) => Err(r.raw.to_string()),
            }
        })
        .await;
        assert_unknown_route(&router.ws_url(DYN)).await;
        // Its connection follows the documented rule for removed routes.
        let close = c.wait_closed(RECV_TIMEOUT).await;
        assert_eq!(close.as_ref().map(|c| c.0), Some(1012), "{close:?}");
        c.close().await;
        // The file's routes are untouched.
        let list = routes(router.http).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(list.iter().any(|r| r.path == "/ws/echo"), "{list:?}");
    })
    .await;
}

/// A worker coming back re-creates the route (it is tied to live workers,
/// not to the first registration).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_route_comes_back_with_a_new_worker() {
    run(LIMIT, async {
        let router = dynamic_router(true).await;
        for round in 0..2 {
            let mut worker = router.worker("echo_worker", &[DYN], &[]).await;
            wait_route(router.http, DYN, SOON, "the dynamic route", |r| {
                r.path == DYN && r.live_workers == 1
            })
            .await;
            let mut c = router.client(DYN).await;
            c.request_ok("echo", &format!("r{round}"), json!(round))
                .await;
            worker.proc.sigterm();
            poll_until("the dynamic route gone", SOON, || async {
                let list = routes(router.http).await?;
                if list.iter().any(|r| r.path == DYN) {
                    Err(format!("round {round}: still listed"))
                } else {
                    Ok(())
                }
            })
            .await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_flag_a_worker_cannot_add_a_route() {
    run(LIMIT, async {
        let router = dynamic_router(false).await;
        let worker = router.worker("echo_worker", &[DYN], &[]).await;
        // The worker is registered (a discovered endpoint)...
        let s = poll_until("the worker in /stats", SOON, || async {
            let s = stats(router.http).await;
            let listed = s["endpoints"]["workers"]
                .as_array()
                .is_some_and(|ws| ws.iter().any(|w| w["id"] == worker.worker_id.as_str()));
            if listed {
                Ok(s)
            } else {
                Err(s["endpoints"].to_string())
            }
        })
        .await;
        // ...but no route was created for its service.
        let list = routes(router.http).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(
            list.iter()
                .all(|r| r.path != DYN && r.raw["dynamic"] != true),
            "{list:?}; stats {s}"
        );
        assert_eq!(list.len(), 1, "{list:?}");
        assert_unknown_route(&router.ws_url(DYN)).await;
    })
    .await;
}
