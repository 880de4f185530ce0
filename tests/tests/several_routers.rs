//! One worker serving two routers (`BRIDGE_ENDPOINT` lists both): requests
//! through each router are served; a publication goes through one router
//! only; killing one router leaves the other serving without an error, and
//! the worker registers again with the killed one when it comes back.
//!
//! The routers are not joined (no fan-out between them), so a publication
//! reaches only the clients of the router the worker published through.

use std::time::Duration;

use e2e_tests::{run, RouterConfig, RouterProc, WorkerProc, WsClient, RECV_TIMEOUT};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(120);
const ROUTES: &str = r#"{"routes": [{"path": "/ws/echo", "service": "echo"}]}"#;

async fn router() -> RouterProc {
    RouterProc::start_with(RouterConfig::new(ROUTES).heartbeat_ms(200)).await
}

async fn subscribe(c: &mut WsClient, id: &str, topic: &str) {
    let ack = c.request_ok("subscribe", id, json!({"topic": topic})).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
}

/// The publications on `topic` among the frames `c` has received and not read.
fn unread_publications(c: &WsClient, topic: &str) -> Vec<Value> {
    c.backlog()
        .iter()
        .filter_map(|f| f.json())
        .filter(|v| v["topic"] == topic)
        .cloned()
        .collect()
}

async fn whoami(c: &mut WsClient, id: &str) -> String {
    let last = c.request_ok("whoami", id, json!(null)).await;
    last["data"]["worker_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_serves_two_routers_and_survives_the_loss_of_one() {
    run(LIMIT, async {
        let mut a = router().await;
        let b = router().await;
        let mut worker =
            WorkerProc::start_on_routers("echo_worker", &[&a, &b], &[], &["--id", "both"]).await;
        // Registered with each router, under the same id.
        for r in [&a, &b] {
            let route = r.wait_live_workers("echo", 1).await;
            assert_eq!(route.workers[0].0, "both", "{route:?}");
        }

        // Requests through each router are served by the one worker.
        let mut ca = a.client("/ws/echo").await;
        let mut cb = b.client("/ws/echo").await;
        assert_eq!(whoami(&mut ca, "wa").await, "both");
        assert_eq!(whoami(&mut cb, "wb").await, "both");
        let last = cb.request_ok("stream", "sb", json!({"n": 3})).await;
        assert_eq!(last["data"], json!({"n": 3}));

        // A client of each router subscribes; the client on b asks the worker
        // to publish. The worker publishes once, through the first live
        // router (a): a's subscriber gets it exactly once, b's never.
        subscribe(&mut ca, "sub-a", "news").await;
        subscribe(&mut cb, "sub-b", "news").await;
        for (i, n) in [1, 2].into_iter().enumerate() {
            let id = format!("pub-{i}");
            let done = cb
                .request_ok("publish", &id, json!({"topic": "news", "data": {"n": n}}))
                .await;
            assert_eq!(done["data"], json!({"published": "news"}));
        }
        // Had the worker sent a publication to b, b would have passed it to
        // cb before the reply that followed it on the same worker socket.
        let on_b = unread_publications(&cb, "news");
        assert!(on_b.is_empty(), "b's subscriber got publications: {on_b:?}");
        // On a: n = 1 then n = 2, and nothing in between (no duplicate).
        let first = ca.next_of_type("publication", RECV_TIMEOUT).await;
        let second = ca.next_of_type("publication", RECV_TIMEOUT).await;
        assert_eq!(
            (&first["data"], &second["data"]),
            (&json!({"n": 1}), &json!({"n": 2}))
        );
        assert!(
            ca.backlog().is_empty(),
            "unexpected frames on a: {:?}",
            ca.backlog()
        );

        // Kill a while b has a request in flight and keeps sending: every
        // request through b is answered without an error.
        cb.send_request("slow", "slow-b", json!({"ms": 1500})).await;
        a.proc.kill9();
        for i in 0..30 {
            let id = format!("e{i}");
            let last = cb.request_ok("echo", &id, json!(i)).await;
            assert_eq!(last["data"], json!(i));
        }
        let slow = cb.collect_until_done("slow-b", RECV_TIMEOUT).await;
        let last = slow.last().cloned().unwrap_or_default();
        assert_eq!(last["data"], json!({"slept_ms": 1500}), "{slow:?}");

        // With a gone, publications go through b.
        let done = cb
            .request_ok(
                "publish",
                "pub-b",
                json!({"topic": "news", "data": {"n": 3}}),
            )
            .await;
        assert_eq!(done["data"], json!({"published": "news"}));
        let pubs = unread_publications(&cb, "news");
        assert_eq!(pubs.len(), 1, "{pubs:?}");
        assert_eq!(pubs[0]["data"], json!({"n": 3}));

        // a comes back on the same bridge endpoint: the same worker process
        // registers with it again and serves its clients.
        a.restart().await;
        a.wait_live_workers("echo", 1).await;
        let mut ca = a.client("/ws/echo").await;
        assert_eq!(whoami(&mut ca, "wa2").await, "both");
        assert_eq!(whoami(&mut cb, "wb2").await, "both");
        assert!(worker.proc.try_status().is_none(), "the worker exited");
        b.wait_live_workers("echo", 1).await;
    })
    .await;
}
