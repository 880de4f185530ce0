//! Rate limits (README: policies): an over-rate client gets `rate_limited`
//! with a `retry_after_ms` that really is the wait until the next message
//! passes; a flooding client is closed with 1008 while a polite client on
//! the same route is unaffected; new connections per client IP are limited
//! with HTTP 429 JSON; `ENABLE_RATE_LIMIT=false` turns all of it off.

mod policies_support;

use std::time::{Duration, Instant};

use e2e_tests::{run, RouterConfig, RouterProc, WsClient, RECV_TIMEOUT};
use futures_util::SinkExt;
use policies_support::{
    assert_refusal, connect_with, next_json, read_until_closed, try_upgrade, try_upgrade_from,
    Event,
};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const LIMIT: Duration = Duration::from_secs(90);

fn routes(rate_limit: Value) -> String {
    json!({"routes": [{"path": "/ws/echo", "service": "echo", "rateLimit": rate_limit}]})
        .to_string()
}

async fn ping(c: &mut WsClient, id: &str) -> Value {
    c.send_json(&json!({"type": "ping", "id": id})).await;
    c.next_for_id(id, RECV_TIMEOUT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_rate_messages_get_rate_limited_with_a_usable_retry_after() {
    run(LIMIT, async {
        // 5 per second, burst 5: one message every 200 ms after the burst.
        let router = RouterProc::start(
            &routes(json!({"messagesPerSecond": 5, "messageBurst": 5, "closeAfterRejections": 50})),
            &[],
        )
        .await;
        let mut c = router.client("/ws/echo").await;
        // The burst passes (pings are client frames like any other).
        for i in 0..5 {
            let f = ping(&mut c, &format!("p{i}")).await;
            assert_eq!(f["type"], "pong", "message {i} of the burst: {f}");
        }
        let f = ping(&mut c, "over").await;
        assert_eq!(
            f["type"], "error",
            "6th message at once must be refused: {f}"
        );
        assert_eq!(f["error"]["code"], "rate_limited", "{f}");
        assert_eq!(f["done"], true, "{f}");
        let retry = f["error"]["retry_after_ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("rate_limited without retry_after_ms: {f}"));
        assert!(
            (1..=201).contains(&retry),
            "at 5/s the wait is at most 200 ms, got {retry}: {f}"
        );
        // Sending again before the wait is over is refused too.
        let f = ping(&mut c, "still-over").await;
        assert_eq!(f["error"]["code"], "rate_limited", "{f}");
        let retry = f["error"]["retry_after_ms"].as_u64().unwrap_or(0);
        assert!(retry >= 1, "{f}");

        // Waiting exactly retry_after_ms is enough.
        tokio::time::sleep(Duration::from_millis(retry)).await;
        let f = ping(&mut c, "after-wait").await;
        assert_eq!(
            f["type"], "pong",
            "after waiting retry_after_ms ({retry} ms) the next message must pass: {f}"
        );
        // The connection stayed open through the refusals.
        let f = ping(&mut c, "still-open").await;
        assert!(
            f["type"] == "pong" || f["error"]["code"] == "rate_limited",
            "{f}"
        );
        c.assert_seq_ok();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_is_closed_with_1008_while_a_polite_one_keeps_working() {
    run(LIMIT, async {
        let router = RouterProc::start(
            &routes(json!({"messagesPerSecond": 20, "messageBurst": 10, "closeAfterRejections": 5})),
            &[],
        )
        .await;
        let _w = router.worker("echo_worker", &[], &[]).await;
        router.wait_live_workers("echo", 1).await;
        let mut polite = router.client("/ws/echo").await;
        let (mut flood, _) = connect_with(&router.ws_url("/ws/echo"), &[])
            .await
            .unwrap_or_else(|e| panic!("flooder cannot connect: {e}"));
        let welcome = next_json(&mut flood, "the flooder's welcome").await;
        assert_eq!(welcome["type"], "welcome");

        // The flooder writes 40 messages without waiting for anything; the
        // router may close it part way, so send errors are expected.
        let flooding = async move {
            for i in 0..40 {
                // Pings: the router answers them itself, so the burst's
                // answers are queued before the refusals (worker replies
                // could lose the race with the close).
                let m = json!({"type": "ping", "id": format!("f{i}")});
                if flood.feed(Message::text(m.to_string())).await.is_err() {
                    break;
                }
            }
            let _ = flood.flush().await;
            let (frames, end) = read_until_closed(&mut flood, Duration::from_secs(20)).await;
            (frames, end)
        };
        // Meanwhile the polite client sends at 10/s, half its allowed rate.
        let politeness = async {
            let mut answers = Vec::new();
            for i in 0..15 {
                let id = format!("polite{i}");
                let last = polite.request_ok("echo", &id, json!({"i": i})).await;
                answers.push(last["data"]["i"].as_u64());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answers
        };
        let ((frames, end), answers) = tokio::join!(flooding, politeness);

        match end {
            Event::Close(Some((code, reason))) => {
                assert_eq!(code, 1008, "flooder closed with {code} ({reason})")
            }
            other => panic!("the flooder must receive a close frame 1008, got {other:?}"),
        }
        let limited = frames
            .iter()
            .filter(|e| matches!(e, Event::Json(v) if v["error"]["code"] == "rate_limited"))
            .count();
        let served = frames
            .iter()
            .filter(|e| matches!(e, Event::Json(v) if v["type"] == "pong"))
            .count();
        // The burst (10), plus the odd token that refills (one per 50 ms)
        // while a slow debug build works through the flood.
        assert!(
            (1..=15).contains(&served),
            "about the burst of 10 may be served before the close; served {served}: {frames:?}"
        );
        // closeAfterRejections 5: 4 rate_limited frames then the close (a
        // refilled token in between restarts the count).
        assert!(
            (4..=20).contains(&limited),
            "expected 4 (or a few more) rate_limited frames before the close; got {limited}: {frames:?}"
        );
        let expected: Vec<Option<u64>> = (0..15).map(Some).collect();
        assert_eq!(answers, expected, "the polite client lost answers");
        // The polite connection is still open and unthrottled.
        let last = polite.request_ok("echo", "polite-after", json!("ok")).await;
        assert_eq!(last["data"], "ok");
        assert!(
            polite
                .backlog()
                .iter()
                .all(|f| f.json().is_none_or(|v| v["error"]["code"] != "rate_limited")),
            "the polite client was rate limited: {:?}",
            polite.backlog()
        );
        polite.assert_seq_ok();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_per_ip_are_limited_with_http_429_json() {
    run(LIMIT, async {
        // One new connection per second per IP, burst 2.
        let router = RouterProc::start(
            &routes(json!({"connectionsPerMinute": 60, "connectionBurst": 2})),
            &[],
        )
        .await;
        let _c1 = router.client("/ws/echo").await;
        let _c2 = router.client("/ws/echo").await;
        let resp = try_upgrade(router.http, "/ws/echo", &[]).await;
        let refused_at = Instant::now();
        let body = assert_refusal(&resp, 429, "rate_limited");
        let retry = body["retry_after_ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("429 without retry_after_ms: {body}"));
        assert!(
            (1..=1000).contains(&retry),
            "at 60/min the wait is at most 1000 ms, got {retry}: {body}"
        );
        // Per IP: another client address is not affected.
        let other =
            try_upgrade_from(Some([127, 0, 0, 2].into()), router.http, "/ws/echo", &[]).await;
        assert_eq!(
            other.status, 101,
            "127.0.0.2 has its own allowance while 127.0.0.1 is limited: {other:?}"
        );
        // Usable: once it has passed, a new connection is accepted.
        tokio::time::sleep(Duration::from_millis(retry).saturating_sub(refused_at.elapsed())).await;
        let resp = try_upgrade(router.http, "/ws/echo", &[]).await;
        assert_eq!(
            resp.status, 101,
            "after retry_after_ms ({retry} ms) a new connection must be accepted: {resp:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enable_rate_limit_false_turns_every_limit_off() {
    run(LIMIT, async {
        let tight = json!({
            "messagesPerSecond": 1, "messageBurst": 1, "closeAfterRejections": 1,
            "connectionsPerMinute": 1, "connectionBurst": 1
        });
        let router = RouterProc::start_with(
            RouterConfig::new(&routes(tight)).env("ENABLE_RATE_LIMIT", "false"),
        )
        .await;
        let mut clients = Vec::new();
        for _ in 0..5 {
            clients.push(router.client("/ws/echo").await);
        }
        let c = &mut clients[0];
        for i in 0..50 {
            c.send_json(&json!({"type": "ping", "id": format!("p{i}")}))
                .await;
        }
        for i in 0..50 {
            let f = c.next_for_id(&format!("p{i}"), RECV_TIMEOUT).await;
            assert_eq!(f["type"], "pong", "rate limits are off: {f}");
        }
        c.assert_seq_ok();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_wide_rate_limits_all_connections_together() {
    run(LIMIT, async {
        // Each connection alone is far under its own limit; together they
        // pass the route's 5 messages per second (burst 5).
        let router = RouterProc::start(
            &routes(json!({"routeMessagesPerSecond": 5, "messagesPerSecond": 1000, "messageBurst": 1000})),
            &[],
        )
        .await;
        let mut a = router.client("/ws/echo").await;
        let mut b = router.client("/ws/echo").await;
        let mut answers = Vec::new();
        for i in 0..4 {
            answers.push(ping(&mut a, &format!("a{i}")).await);
            answers.push(ping(&mut b, &format!("b{i}")).await);
        }
        let pongs = answers.iter().filter(|f| f["type"] == "pong").count();
        let limited: Vec<&Value> = answers
            .iter()
            .filter(|f| f["error"]["code"] == "rate_limited")
            .collect();
        assert!(
            (5..=6).contains(&pongs),
            "the route lets its burst of 5 through (plus at most one refill): {answers:?}"
        );
        assert_eq!(pongs + limited.len(), 8, "{answers:?}");
        for f in limited {
            let r = f["error"]["retry_after_ms"].as_u64().unwrap_or(0);
            assert!((1..=201).contains(&r), "route-wide wait at 5/s: {f}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_rate_is_checked_before_any_token_is_verified() {
    run(LIMIT, async {
        // Burst 2: a client that keeps presenting bad tokens is refused by the
        // rate limit (429) before the router spends work verifying them.
        let routes = json!({"routes": [{
            "path": "/ws/echo", "service": "echo",
            "rateLimit": {"connectionsPerMinute": 1, "connectionBurst": 2},
            "auth": {"required": true, "hs256SecretEnv": "E2E_JWT_SECRET"}
        }]})
        .to_string();
        let router = RouterProc::start(&routes, &[("E2E_JWT_SECRET", "s3cret")]).await;
        let bad = [("authorization", "Bearer not.a.jwt")];
        for _ in 0..2 {
            let resp = try_upgrade(router.http, "/ws/echo", &bad).await;
            assert_refusal(&resp, 401, "unauthorized");
        }
        let resp = try_upgrade(router.http, "/ws/echo", &bad).await;
        assert_refusal(&resp, 429, "rate_limited");
    })
    .await;
}
