//! Session resume (README, "Resume"), end to end: a connection dropped in
//! the middle of streamed replies is resumed from a new one with every
//! frame exactly once, in order, with the original `seq`; a re-sent request
//! that is still in flight is absorbed; a session still live on another
//! connection is taken over; each failure says why (`unknown_session`,
//! `bad_token`, `expired`, `gap`, `overflow`) and leaves the new connection
//! working as a fresh session.

use std::{collections::HashMap, time::Duration};

use e2e_tests::{http_get, run, RouterProc, WsClient};
use serde_json::{json, Value};
use tokio::time::Instant;

const LIMIT: Duration = Duration::from_secs(120);
const T: Duration = Duration::from_secs(10);

fn routes() -> String {
    json!({"routes": [
        {"path": "/ws/echo", "service": "echo"},
        {"path": "/ws/short", "service": "echo", "resume": {"ttlMs": 300}},
        {"path": "/ws/small", "service": "echo", "resume": {"maxFrames": 3}},
        {"path": "/ws/tight", "service": "echo", "resume": {"maxBytes": 2048}},
        {"path": "/ws/off", "service": "echo", "resume": {"ttlMs": 0}},
    ]})
    .to_string()
}

async fn stack() -> (RouterProc, e2e_tests::WorkerProc) {
    let router = RouterProc::start(&routes(), &[]).await;
    let worker = router.worker("echo_worker", &["echo"], &[]).await;
    (router, worker)
}

/// What a later connection needs to resume `c`'s session.
struct Ticket {
    session_id: String,
    token: String,
}

fn ticket(c: &WsClient) -> Ticket {
    let data = &c.welcome()["data"];
    Ticket {
        session_id: data["session_id"].as_str().expect("session_id").to_owned(),
        token: data["resume_token"]
            .as_str()
            .expect("resume_token")
            .to_owned(),
    }
}

async fn resume(c: &mut WsClient, t: &Ticket, last_seq: u64) -> Value {
    c.send_json(&json!({"type": "resume", "id": "r", "data": {
        "session_id": t.session_id, "resume_token": t.token, "last_seq": last_seq,
    }}))
    .await;
    c.next_for_id("r", T).await
}

fn failure_reason(v: &Value) -> &str {
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["code"], "resume_failed", "{v}");
    v["error"]["reason"].as_str().unwrap_or_default()
}

/// Waits (bounded) until `/metrics` has the line `line`.
async fn wait_metric(router: &RouterProc, line: &str) {
    let started = Instant::now();
    loop {
        let metrics = http_get(router.http, "/metrics").await.unwrap().body;
        if metrics.lines().any(|l| l == line) {
            return;
        }
        assert!(started.elapsed() < T, "no `{line}` in /metrics:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (bounded) until the router has `n` parked sessions.
async fn wait_parked(router: &RouterProc, n: u64) {
    let started = Instant::now();
    loop {
        let stats = http_get(router.http, "/stats").await.unwrap().json();
        if stats["resume"]["parked"] == n {
            return;
        }
        assert!(
            started.elapsed() < T,
            "parked sessions never reached {n}: {}",
            stats["resume"]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_resumes_with_every_frame_once_in_order() {
    run(LIMIT, async {
        let (router, _worker) = stack().await;
        let mut a = router.client("/ws/echo").await;
        let welcome = a.welcome().clone();
        assert_eq!(welcome["data"]["resume_ttl_ms"], 30_000, "{welcome}");
        let t = ticket(&a);
        // A request that will still run after the drop, and a stream that
        // is half read when the connection goes.
        a.send_request("slow", "s1", json!({"ms": 4000})).await;
        a.send_request("stream", "st", json!({"n": 200})).await;
        let mut seen: Vec<Value> = Vec::new();
        while seen.len() < 20 {
            let f = a.next_json(T).await;
            seen.push(f);
        }
        let last_seq = a.last_seq().expect("frames have seq");
        a.drop_connection();
        wait_parked(&router, 1).await;
        // A parked session holds no connection: it no longer counts against
        // MAX_CONNECTIONS (the reconnecting client needs a place).
        let stats = http_get(router.http, "/stats").await.unwrap().json();
        assert_eq!(stats["capacity"]["sessions"], 0, "{}", stats["capacity"]);

        let mut b = router.client("/ws/echo").await;
        let fresh = b.welcome()["data"]["session_id"].clone();
        assert_ne!(fresh, json!(t.session_id));
        let resumed = resume(&mut b, &t, last_seq).await;
        assert_eq!(resumed["type"], "resumed", "{resumed}");
        assert_eq!(resumed["done"], true);
        assert!(
            resumed.get("seq").is_none(),
            "resumed carries no seq: {resumed}"
        );
        let data = &resumed["data"];
        assert_eq!(data["session_id"], json!(t.session_id));
        assert_ne!(data["resume_token"], json!(t.token), "a new token");
        assert!(
            data["in_flight"].as_array().unwrap().contains(&json!("s1")),
            "{data}"
        );
        // Re-sending a request that is still in flight changes nothing.
        b.send_request("slow", "s1", json!({"ms": 4000})).await;
        // The rest, with the original seq counter, no gap, no duplicate.
        let mut expect_seq = last_seq + 1;
        let mut done: HashMap<String, u32> = HashMap::new();
        while done.len() < 2 {
            let f = b.next_json(T).await;
            assert_eq!(f["seq"], expect_seq, "frame {f}");
            expect_seq += 1;
            if f["done"] == true {
                *done
                    .entry(f["id"].as_str().unwrap().to_owned())
                    .or_default() += 1;
            }
            seen.push(f);
        }
        // Every partial of the stream once, in order, across both sockets.
        let partials: Vec<u64> = seen
            .iter()
            .filter(|f| f["id"] == "st" && f["done"] == false)
            .map(|f| f["data"]["i"].as_u64().unwrap())
            .collect();
        assert_eq!(partials, (0..200).collect::<Vec<_>>());
        let s1: Vec<&Value> = seen.iter().filter(|f| f["id"] == "s1").collect();
        assert_eq!(s1.len(), 1, "one terminal frame for s1: {s1:?}");
        assert_eq!(
            s1[0]["data"],
            json!({"slept_ms": 4000}),
            "not cancelled by the drop"
        );
        // Nothing more comes for s1 (the re-sent copy was absorbed), and the
        // session keeps working.
        let pong = b.request_ok("echo", "after", json!({"x": 1})).await;
        assert_eq!(pong["data"], json!({"x": 1}));
        assert_eq!(
            b.backlog()
                .iter()
                .filter(|f| matches!(f, e2e_tests::Frame::Json(v) if v["id"] == "s1"))
                .count(),
            0
        );
        let metrics = http_get(router.http, "/metrics").await.unwrap().body;
        assert!(
            metrics.lines().any(|l| l == "router_resumes_total 1"),
            "{metrics}"
        );
        assert!(
            metrics
                .lines()
                .any(|l| l == "router_resume_parked_sessions 0"),
            "{metrics}"
        );
    })
    .await;
}

/// `resumed`'s contract: every request the session took is in `in_flight`
/// or answered among the `replayed` frames that follow it, including one
/// that finished while the client was away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_arrived_while_away_is_among_the_replayed_frames() {
    run(LIMIT, async {
        let (router, _worker) = stack().await;
        let mut a = router.client("/ws/echo").await;
        let t = ticket(&a);
        a.send_request("slow", "away", json!({"ms": 200})).await;
        let last_seq = a.last_seq().unwrap();
        a.drop_connection();
        wait_parked(&router, 1).await;
        // The reply arrives while nobody is connected.
        let started = Instant::now();
        loop {
            let stats = http_get(router.http, "/stats").await.unwrap().json();
            if stats["resume"]["parkedBytes"].as_u64() > Some(0) {
                break;
            }
            assert!(
                started.elapsed() < T,
                "no reply queued: {}",
                stats["resume"]
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut b = router.client("/ws/echo").await;
        let r = resume(&mut b, &t, last_seq).await;
        assert_eq!(r["type"], "resumed", "{r}");
        assert_eq!(r["data"]["in_flight"], json!([]), "{r}");
        assert_eq!(
            r["data"]["replayed"], 1,
            "the queued reply is replayed: {r}"
        );
        let reply = b.next_json(T).await;
        assert_eq!(
            (reply["id"].as_str(), reply["done"].as_bool()),
            (Some("away"), Some(true))
        );
        assert_eq!(reply["seq"], last_seq + 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_failures_say_why_and_the_connection_goes_on_fresh() {
    run(LIMIT, async {
        let (router, _worker) = stack().await;

        // unknown_session, and the connection still works.
        let mut c = router.client("/ws/echo").await;
        let bogus = Ticket {
            session_id: "01NOSUCHSESSION".into(),
            token: "00".repeat(16),
        };
        assert_eq!(
            failure_reason(&resume(&mut c, &bogus, 0).await),
            "unknown_session"
        );
        c.request_ok("echo", "e", json!(1)).await;

        // The session is live on another connection (which its owner has
        // likely lost without the router noticing yet): that connection
        // yields with 1001, and the resume takes the session over.
        let mut live = router.client("/ws/echo").await;
        let t = ticket(&live);
        live.request_ok("echo", "before", json!(1)).await;
        let mut c = router.client("/ws/echo").await;
        let r = resume(&mut c, &t, live.last_seq().unwrap()).await;
        assert_eq!(r["type"], "resumed", "{r}");
        let closed = live.wait_closed(T).await;
        assert_eq!(closed.map(|(code, _)| code), Some(1001));
        c.request_ok("echo", "after", json!(2)).await;
        c.close().await;

        // bad_token.
        let a = router.client("/ws/echo").await;
        let mut t = ticket(&a);
        a.drop_connection();
        wait_parked(&router, 1).await;
        let good = std::mem::replace(&mut t.token, "ff".repeat(16));
        let mut c = router.client("/ws/echo").await;
        assert_eq!(failure_reason(&resume(&mut c, &t, 0).await), "bad_token");
        t.token = good;
        // resume must be the first frame: this connection already spoke.
        let r = resume(&mut c, &t, 0).await;
        assert_eq!(r["error"]["code"], "bad_request", "{r}");
        let mut c = router.client("/ws/echo").await;
        assert_eq!(resume(&mut c, &t, 0).await["type"], "resumed");
        c.close().await;

        // expired: the TTL (300 ms) passes.
        let a = router.client("/ws/short").await;
        let t = ticket(&a);
        a.drop_connection();
        wait_metric(&router, "router_resume_ended_total{reason=\"expired\"} 1").await;
        let mut c = router.client("/ws/short").await;
        assert_eq!(failure_reason(&resume(&mut c, &t, 0).await), "expired");

        // gap: frames acknowledged (or pushed out) are gone.
        let mut a = router.client("/ws/echo").await;
        let t = ticket(&a);
        for i in 0..5 {
            a.request_ok("echo", &format!("g{i}"), json!(i)).await;
        }
        let last = a.last_seq().unwrap();
        a.send_json(&json!({"type": "ack", "data": {"seq": last}}))
            .await;
        a.request_ok("echo", "sync", json!(0)).await;
        a.drop_connection();
        wait_parked(&router, 1).await;
        let mut c = router.client("/ws/echo").await;
        assert_eq!(failure_reason(&resume(&mut c, &t, last - 2).await), "gap");
        // maxFrames 3 pushes out the oldest without any ack.
        let mut a = router.client("/ws/small").await;
        let t = ticket(&a);
        for i in 0..5 {
            a.request_ok("echo", &format!("m{i}"), json!(i)).await;
        }
        a.drop_connection();
        wait_parked(&router, 1).await;
        let mut c = router.client("/ws/small").await;
        assert_eq!(failure_reason(&resume(&mut c, &t, 1).await), "gap");
        wait_parked(&router, 0).await;

        // overflow: replies queued while away outgrow maxBytes (2 KiB).
        let mut a = router.client("/ws/tight").await;
        let t = ticket(&a);
        a.send_request("slow", "late", json!({"ms": 300})).await;
        a.send_request("stream", "big", json!({"n": 2000})).await;
        a.drop_connection();
        let started = Instant::now();
        loop {
            let stats = http_get(router.http, "/stats").await.unwrap().json();
            let metrics = http_get(router.http, "/metrics").await.unwrap().body;
            if metrics.contains("router_resume_ended_total{reason=\"overflow\"} 1") {
                break;
            }
            assert!(started.elapsed() < T, "no overflow: {}", stats["resume"]);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut c = router.client("/ws/tight").await;
        assert_eq!(failure_reason(&resume(&mut c, &t, 0).await), "overflow");

        // Resume off on a route: nothing to resume, no token offered.
        let a = router.client("/ws/off").await;
        assert_eq!(a.welcome()["data"]["resume_ttl_ms"], 0);
        assert!(a.welcome()["data"].get("resume_token").is_none());

        let metrics = http_get(router.http, "/metrics").await.unwrap().body;
        for reason in ["unknown_session", "bad_token", "expired", "gap", "overflow"] {
            assert!(
                metrics.contains(&format!(
                    "router_resume_failures_total{{reason=\"{reason}\"}}"
                )),
                "no failure counted for {reason}:\n{metrics}"
            );
        }
    })
    .await;
}
