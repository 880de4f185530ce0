//! Limits and back-pressure (README: policies): message size (close 1009,
//! with the close frame received), invalid UTF-8 (1007), protocol errors
//! (1002), the handshake deadline for TCP connections that never upgrade,
//! 2 000 idle connections that must not starve new clients, `maxInFlight`
//! (`overloaded`), `maxConnections` (HTTP 503 JSON), and a client that never
//! reads while a worker pushes to it (disconnected; the router's memory stays
//! bounded).

mod policies_support;

use std::time::{Duration, Instant};

use e2e_tests::{run, Frame, RouterConfig, RouterProc, RECV_TIMEOUT};
use futures_util::SinkExt;
use policies_support::{
    assert_refusal, connect_with, fd_count, next_json, read_until_closed, rss_kib, try_upgrade,
    wait_route_field, Event, Ws,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame as RawFrame;
use tokio_tungstenite::tungstenite::Message;

const LIMIT: Duration = Duration::from_secs(180);

fn echo_route(extra: Value) -> String {
    let mut route = json!({"path": "/ws/echo", "service": "echo"});
    if let (Some(r), Some(e)) = (route.as_object_mut(), extra.as_object()) {
        r.extend(e.clone());
    }
    json!({ "routes": [route] }).to_string()
}

async fn connect(router: &RouterProc, path: &str) -> Ws {
    let (mut ws, _) = connect_with(&router.ws_url(path), &[])
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {path}: {e}"));
    let w = next_json(&mut ws, "the welcome").await;
    assert_eq!(w["type"], "welcome", "{w}");
    ws
}

fn assert_closed_with(end: &Event, code: u16) {
    match end {
        Event::Close(Some((c, _))) if *c == code => {}
        other => panic!("expected a close frame with code {code}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_size_messages_are_closed_with_a_1009_close_frame() {
    run(LIMIT, async {
        let router = RouterProc::start(&echo_route(json!({"maxMessageBytes": 1024})), &[]).await;
        let _w = router.worker("echo_worker", &[], &[]).await;
        router.wait_live_workers("echo", 1).await;

        // Just under the limit passes.
        let mut c = router.client("/ws/echo").await;
        assert_eq!(
            c.welcome.as_ref().expect("welcome")["data"]["limits"]["max_message_bytes"],
            1024
        );
        let pad = "x".repeat(900);
        let last = c.request_ok("echo", "fits", json!(pad)).await;
        assert_eq!(last["data"], json!(pad));

        // A text message over it: the client receives a close frame 1009.
        let big = json!({"type": "echo", "id": "big", "data": "y".repeat(2000)});
        c.send_text(&big.to_string()).await;
        let close = c.wait_closed(RECV_TIMEOUT).await;
        match close {
            Some((1009, _)) => {}
            other => panic!("over-size text: expected a close frame 1009, got {other:?}"),
        }
        assert!(
            c.backlog()
                .iter()
                .all(|f| !matches!(f, Frame::Json(v) if v["id"] == "big")),
            "the over-size message must not be answered: {:?}",
            c.backlog()
        );

        // Same for a binary message.
        let mut c = router.client("/ws/echo").await;
        c.send_binary(&vec![7u8; 5000]).await;
        match c.wait_closed(RECV_TIMEOUT).await {
            Some((1009, _)) => {}
            other => panic!("over-size binary: expected a close frame 1009, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_text_is_closed_with_1007_and_protocol_errors_with_1002() {
    run(LIMIT, async {
        let router = RouterProc::start(&echo_route(json!({})), &[]).await;

        // A text frame whose payload is not UTF-8 (0xC3 starts a two-byte
        // sequence that 0x28 does not continue); tungstenite's raw frame
        // API sends it as is (masked, as a client must).
        let mut ws = connect(&router, "/ws/echo").await;
        let frame = RawFrame::message(vec![b'"', 0xC3, 0x28, b'"'], OpCode::Data(Data::Text), true);
        ws.send(Message::Frame(frame))
            .await
            .unwrap_or_else(|e| panic!("cannot send the raw frame: {e}"));
        let (_, end) = read_until_closed(&mut ws, RECV_TIMEOUT).await;
        assert_closed_with(&end, 1007);

        // A frame with a reserved bit set (no extension was negotiated).
        let mut ws = connect(&router, "/ws/echo").await;
        let mut frame = RawFrame::message(b"{}".to_vec(), OpCode::Data(Data::Text), true);
        frame.header_mut().rsv1 = true;
        ws.send(Message::Frame(frame))
            .await
            .unwrap_or_else(|e| panic!("cannot send the raw frame: {e}"));
        let (_, end) = read_until_closed(&mut ws, RECV_TIMEOUT).await;
        assert_closed_with(&end, 1002);
    })
    .await;
}

/// Reads until the peer closes; returns how long that took, or panics
/// after `bound`.
async fn time_until_closed_by_peer(mut s: TcpStream, bound: Duration, what: &str) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at((started + bound).into(), s.read(&mut buf)).await {
            Err(_) => panic!("{what}: still open after {bound:?}"),
            // The router may answer something (e.g. a 408) before closing.
            Ok(Ok(n)) if n > 0 => continue,
            Ok(Ok(_)) | Ok(Err(_)) => return started.elapsed(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_that_never_upgrade_are_closed_within_the_handshake_timeout() {
    run(LIMIT, async {
        const HANDSHAKE_MS: u64 = 1000;
        let router = RouterProc::start_with(
            RouterConfig::new(&echo_route(json!({})))
                .env("HANDSHAKE_TIMEOUT_MS", &HANDSHAKE_MS.to_string()),
        )
        .await;
        let silent = TcpStream::connect(router.http)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        let mut partial = TcpStream::connect(router.http)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        // Half a request: the headers never end.
        partial
            .write_all(b"GET /ws/echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
            .await
            .unwrap_or_else(|e| panic!("write: {e}"));
        let bound = Duration::from_millis(HANDSHAKE_MS + 4000);
        let (t_silent, t_partial) = tokio::join!(
            time_until_closed_by_peer(silent, bound, "a connection that sends nothing"),
            time_until_closed_by_peer(partial, bound, "a connection that never ends its request"),
        );
        for (what, t) in [("silent", t_silent), ("partial", t_partial)] {
            assert!(
                t >= Duration::from_millis(HANDSHAKE_MS * 8 / 10),
                "{what} connection closed after {t:?}, before the {HANDSHAKE_MS} ms handshake timeout"
            );
        }
        // A client that upgrades in time is not affected by the deadline.
        let mut c = router.client("/ws/echo").await;
        tokio::time::sleep(Duration::from_millis(HANDSHAKE_MS + 300)).await;
        c.send_json(&json!({"type": "ping", "id": "alive"})).await;
        let pong = c.next_for_id("alive", RECV_TIMEOUT).await;
        assert_eq!(pong["type"], "pong", "an upgraded connection outlives the deadline: {pong}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_do_not_stop_new_clients() {
    run(LIMIT, async {
        const IDLE: usize = 2000;
        // A long handshake timeout, so the idle connections are all still
        // held by the router while the new client is served.
        let router = RouterProc::start_with(
            RouterConfig::new(&echo_route(json!({}))).env("HANDSHAKE_TIMEOUT_MS", "120000"),
        )
        .await;
        let _w = router.worker("echo_worker", &[], &[]).await;
        router.wait_live_workers("echo", 1).await;
        let pid = router.proc.pid();
        let base_fds = fd_count(pid);

        let mut idle = Vec::with_capacity(IDLE);
        for i in 0..IDLE {
            match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(router.http))
                .await
            {
                Ok(Ok(s)) => idle.push(s),
                Ok(Err(e)) => panic!("idle connection {i}: {e}"),
                Err(_) => panic!("idle connection {i}: connect timed out"),
            }
        }
        // The router has accepted them all (one descriptor each; a little
        // slack for descriptors of its own that come and go, such as the
        // connection of a `/routes` poll that was closing at the baseline).
        let want = base_fds + IDLE - 16;
        let deadline = Instant::now() + Duration::from_secs(30);
        while fd_count(pid) < want {
            assert!(
                Instant::now() < deadline,
                "the router holds {} descriptors, expected at least {want} (it did not accept the idle connections)",
                fd_count(pid),
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let started = Instant::now();
        let mut c = router.client("/ws/echo").await;
        let last = c.request_ok("echo", "served", json!("despite the idlers")).await;
        let took = started.elapsed();
        assert_eq!(last["data"], "despite the idlers");
        assert!(
            took < Duration::from_secs(5),
            "a new client took {took:?} to be served next to {IDLE} idle connections"
        );
        let ok = e2e_tests::http_get(router.http, "/health")
            .await
            .unwrap_or_else(|e| panic!("/health next to the idle connections: {e}"));
        assert_eq!(ok.status, 200);
        assert!(
            fd_count(pid) >= want,
            "the idle connections must still be open while the client was served"
        );
        drop(idle);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_is_overloaded_beyond_the_limit() {
    run(LIMIT, async {
        let router = RouterProc::start(&echo_route(json!({"maxInFlight": 2})), &[]).await;
        let _w = router.worker("echo_worker", &[], &[]).await;
        router.wait_live_workers("echo", 1).await;
        let mut c = router.client("/ws/echo").await;
        assert_eq!(
            c.welcome.as_ref().expect("welcome")["data"]["limits"]["max_in_flight"],
            2
        );
        c.send_request("slow", "s1", json!({"ms": 1500})).await;
        c.send_request("slow", "s2", json!({"ms": 1500})).await;
        let sent = Instant::now();
        c.send_request("echo", "third", json!(null)).await;
        let f = c.next_for_id("third", RECV_TIMEOUT).await;
        assert!(
            sent.elapsed() < Duration::from_millis(1400),
            "overloaded must come at once, not after the slow requests"
        );
        assert_eq!(f["type"], "error", "{f}");
        assert_eq!(f["error"]["code"], "overloaded", "{f}");
        assert_eq!(f["done"], true, "{f}");
        for id in ["s1", "s2"] {
            let frames = c.collect_until_done(id, RECV_TIMEOUT).await;
            assert_eq!(
                frames.last().expect("done")["data"],
                json!({"slept_ms": 1500}),
                "{frames:?}"
            );
        }
        // Room again.
        let last = c.request_ok("echo", "fourth", json!(4)).await;
        assert_eq!(last["data"], 4);
        c.assert_seq_ok();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_with_http_503_json() {
    run(LIMIT, async {
        let router = RouterProc::start(&echo_route(json!({"maxConnections": 2})), &[]).await;
        let c1 = router.client("/ws/echo").await;
        let _c2 = router.client("/ws/echo").await;
        let resp = try_upgrade(router.http, "/ws/echo", &[]).await;
        let body = assert_refusal(&resp, 503, "route_full");
        assert_eq!(body["max_connections"], 2, "{body}");
        // A slot frees when a client leaves.
        c1.close().await;
        wait_route_field(
            router.http,
            "/ws/echo",
            "connections",
            Duration::from_secs(10),
            |v| v == 1,
        )
        .await;
        let resp = try_upgrade(router.http, "/ws/echo", &[]).await;
        assert_eq!(resp.status, 101, "a freed slot must be usable: {resp:?}");
    })
    .await;
}

/// Polls (bounded) until route `path` has no connection left, sampling the
/// router's RSS meanwhile; returns (time taken, highest RSS seen).
async fn wait_route_empty(router: &RouterProc, path: &str, bound: Duration) -> (Duration, u64) {
    let pid = router.proc.pid();
    let started = Instant::now();
    let mut rss_max = rss_kib(pid);
    loop {
        rss_max = rss_max.max(rss_kib(pid));
        let conns = policies_support::route_field(router.http, path, "connections").await;
        if conns == 0 {
            return (started.elapsed(), rss_max);
        }
        assert!(
            started.elapsed() < bound,
            "the router still holds the connection of a client that has not read for {bound:?} \
             (RSS now {} KiB); router log tail:\n{}",
            rss_kib(pid),
            router
                .proc
                .stderr
                .lines()
                .iter()
                .rev()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Few but large replies to a client that never reads: the outbound queue
/// never fills (40 frames), so what must give is the blocked socket write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_large_replies_is_disconnected() {
    run(LIMIT, async {
        const GROWTH_LIMIT_KIB: u64 = 100 * 1024;
        const PING_MS: u64 = 1000;
        let router = RouterProc::start_with(
            RouterConfig::new(&echo_route(json!({"requestTimeoutMs": 120000})))
                .env("CLIENT_PING_MS", &PING_MS.to_string()),
        )
        .await;
        let _w = router.worker("echo_worker", &[], &[]).await;
        router.wait_live_workers("echo", 1).await;
        let pid = router.proc.pid();

        let mut ws = small_window_client(&router, "/ws/echo").await;
        let rss_before = rss_kib(pid);
        let big = "z".repeat(256 * 1024);
        let started = Instant::now();
        let mut sent = 0;
        for i in 0..40 {
            let m = json!({"type": "echo", "id": format!("big{i}"), "data": big});
            // The router may give up on this client while it is still
            // sending; that is the behaviour under test, not a failure.
            if ws.send(Message::text(m.to_string())).await.is_err() {
                break;
            }
            sent += 1;
        }
        let (_, rss_max) = wait_route_empty(&router, "/ws/echo", Duration::from_secs(60)).await;
        let growth = rss_max.saturating_sub(rss_before);
        eprintln!(
            "large replies: sent {sent} requests of 256 KiB; the router dropped the client {:?} \
             after the first; RSS {rss_before} → max {rss_max} KiB",
            started.elapsed()
        );
        assert!(
            growth < GROWTH_LIMIT_KIB,
            "router RSS grew by {growth} KiB ({rss_before} → {rss_max} KiB) for one slow reader"
        );
    })
    .await;
}

/// The counterpart of the slow-reader test: a client that reads as fast as
/// it can must not be taken for a slow reader when a worker streams a long
/// reply (a token stream, a log tail) faster than one socket write per frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_at_full_speed_gets_a_5000_frame_stream() {
    run(LIMIT, async {
        const N: u64 = 5000;
        let router = RouterProc::start(&echo_route(json!({"requestTimeoutMs": 60000})), &[]).await;
        let _w = router.worker("echo_worker", &[], &[]).await;
        router.wait_live_workers("echo", 1).await;
        let mut c = router.client("/ws/echo").await;
        c.send_request("stream", "s", json!({"n": N})).await;
        let mut next_i = 0;
        loop {
            let f = c.next_frame(RECV_TIMEOUT).await;
            let v = match f {
                Frame::Json(v) => v,
                Frame::Close(close) => panic!(
                    "closed ({close:?}) after {next_i} of {N} partials although the client reads continuously"
                ),
                other => panic!("unexpected frame {other:?}"),
            };
            assert_eq!(v["id"], "s", "{v}");
            if v["done"] == true {
                assert_eq!(v["data"], json!({"n": N}), "{v}");
                break;
            }
            assert_eq!(v["data"]["i"], next_i, "partials in order: {v}");
            next_i += 1;
        }
        assert_eq!(next_i, N, "every partial delivered");
        c.assert_seq_ok();
    })
    .await;
}

/// A WebSocket client whose socket has a tiny receive buffer, so that not
/// reading backs up into the router quickly instead of into megabytes of
/// kernel buffers.
async fn small_window_client(router: &RouterProc, path: &str) -> PlainWs {
    let socket = TcpSocket::new_v4().unwrap_or_else(|e| panic!("socket: {e}"));
    socket
        .set_recv_buffer_size(4096)
        .unwrap_or_else(|e| panic!("SO_RCVBUF: {e}"));
    let stream = socket
        .connect(router.http)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let (mut ws, _) = tokio_tungstenite::client_async(router.ws_url(path), stream)
        .await
        .unwrap_or_else(|e| panic!("handshake: {e}"));
    let w = next_json_plain(&mut ws).await;
    assert_eq!(w["type"], "welcome", "{w}");
    ws
}

type PlainWs = tokio_tungstenite::WebSocketStream<TcpStream>;

async fn next_json_plain(ws: &mut PlainWs) -> Value {
    use futures_util::StreamExt;
    loop {
        match tokio::time::timeout(RECV_TIMEOUT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                return serde_json::from_str(t.as_str())
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {t}"))
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_disconnected_and_memory_stays_bounded() {
    run(LIMIT, async {
        const GROWTH_LIMIT_KIB: u64 = 100 * 1024;
        let router = RouterProc::start_with(
            RouterConfig::new(&echo_route(json!({"requestTimeoutMs": 120000})))
                .env("LOG_FORMAT", "json"),
        )
        .await;
        let _w = router.worker("echo_worker", &[], &[]).await;
        router.wait_live_workers("echo", 1).await;
        let pid = router.proc.pid();

        let mut ws = small_window_client(&router, "/ws/echo").await;
        let rss_before = rss_kib(pid);
        // 4 × 100 000 pushes (≈ 20 MB of frames): far more than the
        // outbound queue (512 frames) and the socket buffers hold.
        for i in 0..4 {
            let m = json!({"type": "push", "id": format!("push{i}"), "data": {"n": 100_000}});
            ws.send(Message::text(m.to_string()))
                .await
                .unwrap_or_else(|e| panic!("send: {e}"));
        }
        // Now never read. The router must drop the connection by itself.
        let (closed_after, mut rss_max) =
            wait_route_empty(&router, "/ws/echo", Duration::from_secs(60)).await;
        // A little longer, while the worker keeps pushing to a connection
        // that is gone: memory must stay flat.
        for _ in 0..10 {
            rss_max = rss_max.max(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let growth = rss_max.saturating_sub(rss_before);
        assert!(
            growth < GROWTH_LIMIT_KIB,
            "router RSS grew by {growth} KiB ({rss_before} → {rss_max} KiB) for one slow reader"
        );

        // The router says why: a 1008 close for the slow reader.
        let log = router.proc.stderr.lines();
        let closed_line = log.iter().find(|l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| {
                v["fields"]["code"] == 1008 || v["fields"]["code"] == "1008"
            })
        });
        assert!(
            closed_line.is_some(),
            "no router log line with close code 1008 after {closed_after:?}; log tail:\n{}",
            log.iter().rev().take(15).cloned().collect::<Vec<_>>().join("\n")
        );

        // On the client side the stream ends after whatever was buffered.
        use futures_util::StreamExt;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut frames = 0u64;
        let end = loop {
            match tokio::time::timeout_at(deadline.into(), ws.next()).await {
                Err(_) => panic!("the client's stream did not end within 60 s ({frames} frames read)"),
                Ok(None) => break "end of stream".to_owned(),
                Ok(Some(Err(e))) => break format!("error: {e}"),
                Ok(Some(Ok(Message::Close(c)))) => break format!("close {c:?}"),
                Ok(Some(Ok(_))) => frames += 1,
            }
        };
        eprintln!(
            "slow reader: closed by the router after {closed_after:?}; RSS {rss_before} → max {rss_max} KiB; \
             the client then read {frames} frames and saw {end}"
        );
        assert!(
            frames < 400_000,
            "the client got every push ({frames}): it was never cut off ({end})"
        );
    })
    .await;
}
