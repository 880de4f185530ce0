//! Session defects found while restructuring `router/src/session/`, each
//! proved against the real router and `echo_worker`:
//!
//! - a closing session (drain, or its route removed) wrote its close frame
//!   as soon as no request was in flight, dropping a terminal frame that was
//!   already queued but not yet written (README: graceful shutdown, hot
//!   reload: in-flight requests finish before the close);
//! - `ping` and `cancel` were refused with `overloaded` while a session was
//!   closing, although a closing session still owes its in-flight requests
//!   (README: client protocol, router-handled types).
//!
//! To hold a terminal frame in the queue deterministically, the client stops
//! reading while a 12 MB reply is being written: that is more than the
//! kernel buffers of a loopback connection take (send buffer at most 4 MB
//! here, the receive window does not grow while nobody reads), so the
//! session is stuck in that write when the other request's terminal frame is
//! queued behind it.

mod ops_support;

use std::time::Duration;

use e2e_tests::{run, wait_route, Frame, RouterProc, WsClient, RECV_TIMEOUT};
use nix::sys::signal::Signal;
use ops_support::{poll_until, scrape, start_router, wait_log, write_by_rename, SOON};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(120);

/// Bytes of the reply that keeps the session busy writing.
const BIG: usize = 12_000_000;

/// How long the request whose terminal frame gets queued takes.
const SLOW_MS: u64 = 2500;

fn routes(paths: &[&str]) -> String {
    let routes: Vec<Value> = paths
        .iter()
        .map(|p| json!({"path": p, "service": "echo", "maxMessageBytes": 16_000_000}))
        .collect();
    json!({ "routes": routes }).to_string()
}

/// Requests in flight at the echo workers, as `/routes` shows them.
async fn wait_in_flight(router: &RouterProc, n: u64) {
    wait_route(
        router.http,
        "echo",
        SOON,
        &format!("{n} requests in flight"),
        |r| r.workers.iter().map(|w| w.1).sum::<u64>() == n,
    )
    .await;
}

/// Puts `slow` in flight, then a big `echo` whose reply the session is still
/// writing when this returns (the client reads nothing meanwhile).
async fn slow_behind_a_big_write(router: &RouterProc, c: &mut WsClient) {
    c.send_request("slow", "slow", json!({ "ms": SLOW_MS }))
        .await;
    wait_in_flight(router, 1).await;
    c.send_request("echo", "big", json!("x".repeat(BIG))).await;
    // The writer counts a frame as it encodes it, just before writing it.
    poll_until("the big reply being written", SOON, || async {
        let out = scrape(router.http)
            .await
            .sum("router_messages_out_total", &[("type", "echo")]);
        if out >= 1.0 {
            Ok(())
        } else {
            Err(format!("{out} echo frames out"))
        }
    })
    .await;
}

/// Every JSON frame up to the close frame, and the close frame.
async fn read_to_close(c: &mut WsClient) -> (Vec<Value>, Option<(u16, String)>) {
    let mut frames = Vec::new();
    loop {
        match c.next_frame(RECV_TIMEOUT).await {
            Frame::Json(v) => frames.push(v),
            Frame::Close(close) => return (frames, close),
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// The big reply, then `slow`'s terminal frame, then the close with `code`.
fn assert_terminal_before_close(frames: &[Value], close: Option<(u16, String)>, code: u16) {
    let summary: Vec<String> = frames
        .iter()
        .map(|f| format!("{}:{}:done={}", f["type"], f["id"], f["done"]))
        .collect();
    let big = frames.iter().position(|f| f["id"] == "big");
    assert!(
        big.is_some_and(|i| frames[i]["data"].as_str().map(str::len) == Some(BIG)),
        "the big reply: {summary:?}"
    );
    let slow = frames.iter().find(|f| f["id"] == "slow");
    assert_eq!(
        slow.map(|f| (f["done"].clone(), f["data"].clone())),
        Some((json!(true), json!({ "slept_ms": SLOW_MS }))),
        "the in-flight request's terminal frame must reach the client before the close: {summary:?}, close {close:?}"
    );
    assert_eq!(close.map(|c| c.0), Some(code), "frames: {summary:?}");
}

/// README (graceful shutdown): in-flight requests finish, then 1001. The
/// terminal frame of the last request is queued while the session is busy
/// writing; it is written before the close frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_writes_a_queued_terminal_frame_before_closing() {
    run(LIMIT, async {
        let mut router =
            start_router(&routes(&["/ws/echo"]), &[("DRAIN_TIMEOUT_MS", "20000")]).await;
        let _worker = router.worker("echo_worker", &[], &[]).await;
        let mut c = router.client("/ws/echo").await;
        slow_behind_a_big_write(&router, &mut c).await;

        let from = router.proc.stderr.position();
        router.proc.signal(Signal::SIGTERM);
        wait_log(&router.proc.stderr, from, &["shutdown: draining"], SOON).await;
        // `slow` ends at the worker; its terminal frame waits behind the big one.
        wait_in_flight(&router, 0).await;

        let (frames, close) = read_to_close(&mut c).await;
        assert_terminal_before_close(&frames, close, 1001);
        c.assert_seq_ok();
    })
    .await;
}

/// README (hot reload): a removed route's connections close with 1012 once
/// their in-flight requests finish, the last terminal frame included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_removal_writes_a_queued_terminal_frame_before_closing() {
    run(LIMIT, async {
        // `/ws/other` keeps the echo service listed in `/routes` after the removal.
        let router = start_router(&routes(&["/ws/echo", "/ws/other"]), &[]).await;
        let _worker = router.worker("echo_worker", &[], &[]).await;
        let mut c = router.client("/ws/echo").await;
        slow_behind_a_big_write(&router, &mut c).await;

        let from = router.proc.stderr.position();
        write_by_rename(router.routes_file(), &routes(&["/ws/other"]));
        wait_log(
            &router.proc.stderr,
            from,
            &["routes reloaded", "removed", "/ws/echo"],
            SOON,
        )
        .await;
        wait_in_flight(&router, 0).await;

        let (frames, close) = read_to_close(&mut c).await;
        assert_terminal_before_close(&frames, close, 1012);
        c.assert_seq_ok();
    })
    .await;
}

/// README (client protocol, graceful shutdown): while a connection drains,
/// `ping` is still answered and `cancel` still ends an in-flight request
/// (with its ack and the request's `cancelled` error); new requests get
/// `overloaded`. The session then closes at once instead of at the drain
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_and_cancel_work_while_draining() {
    run(LIMIT, async {
        let mut router =
            start_router(&routes(&["/ws/echo"]), &[("DRAIN_TIMEOUT_MS", "30000")]).await;
        let _worker = router.worker("echo_worker", &[], &[]).await;
        let mut c = router.client("/ws/echo").await;
        c.send_request("slow", "long", json!({ "ms": 60_000 }))
            .await;
        wait_in_flight(&router, 1).await;

        let from = router.proc.stderr.position();
        router.proc.signal(Signal::SIGTERM);
        wait_log(&router.proc.stderr, from, &["shutdown: draining"], SOON).await;

        c.send_request("echo", "late", json!("x")).await;
        let late = c.next_for_id("late", RECV_TIMEOUT).await;
        assert_eq!(late["error"]["code"], "overloaded", "{late}");

        c.send_request("ping", "p", json!(null)).await;
        let pong = c.next_for_id("p", RECV_TIMEOUT).await;
        assert_eq!(pong["type"], "pong", "ping while draining: {pong}");

        let started = tokio::time::Instant::now();
        c.send_request("cancel", "c", json!({ "id": "long" })).await;
        let ack = c.next_for_id("c", RECV_TIMEOUT).await;
        assert_eq!(
            (ack["type"].clone(), ack["data"]["id"].clone()),
            (json!("cancel"), json!("long")),
            "cancel while draining: {ack}"
        );
        let cancelled = c.next_for_id("long", RECV_TIMEOUT).await;
        assert_eq!(cancelled["error"]["code"], "cancelled", "{cancelled}");
        let close = c.wait_closed(RECV_TIMEOUT).await;
        assert_eq!(close.as_ref().map(|c| c.0), Some(1001), "{close:?}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "closed {:?} after the cancel: it waited for the drain timeout",
            started.elapsed()
        );
        c.assert_seq_ok();
    })
    .await;
}
