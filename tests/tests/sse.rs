//! The HTTP fallback (README, "HTTP fallback"), end to end: an event stream
//! and POSTed frames make a session like a WebSocket's (replies with `seq`
//! as the event id, order kept, errors as HTTP statuses with the WebSocket
//! codes); a dropped stream is resumed by a new GET with the session's id,
//! token and Last-Event-ID; CORS follows the route's allowed origins;
//! keep-alive comments flow; raw routes and routes without resume say no.

use std::time::Duration;

use e2e_tests::{
    run,
    sse::{post, request, EventStream},
    RouterConfig, RouterProc,
};
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;

const LIMIT: Duration = Duration::from_secs(120);
const T: Duration = Duration::from_secs(10);

fn routes() -> String {
    json!({"routes": [
        {"path": "/ws/echo", "service": "echo", "maxMessageBytes": 4096},
        {"path": "/ws/app", "service": "echo", "allowedOrigins": ["https://app.example"]},
        {"path": "/ws/raw", "service": "echo", "raw": true},
        {"path": "/ws/off", "service": "echo", "resume": {"ttlMs": 0}},
    ]})
    .to_string()
}

async fn stack(args: &[&str]) -> (RouterProc, e2e_tests::WorkerProc) {
    let mut cfg = RouterConfig::new(&routes());
    for a in args {
        cfg = cfg.arg(a);
    }
    let router = RouterProc::start_with(cfg).await;
    let worker = router.worker("echo_worker", &["echo"], &[]).await;
    (router, worker)
}

/// Opens a stream on `path` and returns it with the welcome's id and token.
async fn open(router: &RouterProc, path: &str) -> (EventStream, String, String) {
    let mut s = EventStream::open(router.http, path, &[]).await;
    assert_eq!(s.status, 200);
    assert_eq!(s.header("content-type"), Some("text/event-stream"));
    assert_eq!(s.header("cache-control"), Some("no-cache"));
    assert_eq!(s.header("x-accel-buffering"), Some("no"));
    let welcome = s.next(T).await.expect("a welcome");
    assert_eq!(welcome.id, None, "the welcome has no id: {welcome:?}");
    let w = welcome.json();
    assert_eq!(w["type"], "welcome");
    let id = w["data"]["session_id"].as_str().unwrap().to_owned();
    let token = w["data"]["resume_token"].as_str().unwrap().to_owned();
    (s, id, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posted_frames_are_answered_on_the_event_stream_in_order() {
    run(LIMIT, async {
        let (router, _worker) = stack(&[]).await;
        let (mut events, id, token) = open(&router, "/ws/echo").await;
        let auth = [("X-Session-Id", id.as_str()), ("X-Resume-Token", token.as_str())];
        let r = post(
            router.http,
            "/ws/echo",
            &auth,
            r#"[{"type":"stream","id":"s","data":{"n":3}},{"type":"echo","id":"e","data":{"x":2.718281828459045e-3}}]"#,
        )
        .await;
        assert_eq!(r.status, 202, "{r:?}");
        assert_eq!(r.json(), json!({"accepted": 2}));
        let mut got: Vec<Value> = Vec::new();
        while got.iter().filter(|f| f["done"] == true).count() < 2 {
            let e = events.next(T).await.expect("an event");
            let f = e.json();
            assert_eq!(e.id, Some(f["seq"].to_string()), "id is the seq: {e:?}");
            got.push(f);
        }
        let e = got.iter().find(|f| f["id"] == "e").unwrap();
        assert_eq!(e["data"], json!({"x": 2.718281828459045e-3}));
        // Order: the router answers pings itself, one after the other, so
        // their pongs show the order the POSTed frames reached the session.
        let pings: Vec<Value> = (1..=5).map(|i| json!({"type": "ping", "id": i})).collect();
        let r = post(router.http, "/ws/echo", &auth, &json!(pings).to_string()).await;
        assert_eq!(r.status, 202, "{r:?}");
        let r = post(router.http, "/ws/echo", &auth, r#"{"type":"ping","id":6}"#).await;
        assert_eq!(r.status, 202, "{r:?}");
        let mut pongs = Vec::new();
        while pongs.len() < 6 {
            let f = events.next_json(T).await;
            if f["type"] == "pong" {
                pongs.push(f["id"].as_u64().unwrap());
            }
        }
        assert_eq!(pongs, [1, 2, 3, 4, 5, 6], "POSTed order kept");

        // Errors: HTTP statuses with the WebSocket codes; frames before a
        // bad one are taken.
        let r = post(router.http, "/ws/echo", &auth, r#"[{"type":"echo","id":"ok"},{"id":"no type"}]"#).await;
        assert_eq!(r.status, 400, "{r:?}");
        assert_eq!(r.json()["error"]["code"], "bad_request");
        assert_eq!(r.json()["error"]["index"], 1);
        assert_eq!(events.next_json(T).await["id"], "ok", "the frame before the bad one was taken");
        let r = post(router.http, "/ws/echo", &auth, "{not json").await;
        assert_eq!((r.status, r.json()["error"]["code"].clone()), (400, json!("bad_request")));
        let big = json!({"type": "echo", "data": "x".repeat(5000)}).to_string();
        let r = post(router.http, "/ws/echo", &auth, &big).await;
        assert_eq!((r.status, r.json()["error"]["code"].clone()), (413, json!("payload_too_large")));
        let r = post(router.http, "/ws/echo", &[("X-Session-Id", id.as_str()), ("X-Resume-Token", "bad")], r#"{"type":"echo"}"#).await;
        assert_eq!((r.status, r.json()["error"]["code"].clone()), (401, json!("unauthorized")));
        let r = post(router.http, "/ws/nowhere", &auth, r#"{"type":"echo"}"#).await;
        assert_eq!((r.status, r.json()["error"]["code"].clone()), (404, json!("unknown_route")));

        // No event-stream form for raw routes, nor without resume.
        for path in ["/ws/raw", "/ws/off"] {
            let s = EventStream::open(router.http, path, &[]).await;
            assert_eq!(s.status, 400, "{path}");
        }
    })
    .await;
}

/// A browser sends a POST again when its connection broke before the
/// answer: numbered with X-Post-Seq, the second copy is answered like the
/// first and its request is not run twice. DELETE ends the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_sent_twice_runs_once_and_delete_ends_the_session() {
    run(LIMIT, async {
        let (router, _worker) = stack(&[]).await;
        let (mut events, id, token) = open(&router, "/ws/echo").await;
        let auth = |seq: &'static str| {
            [
                ("X-Session-Id", id.clone()),
                ("X-Resume-Token", token.clone()),
                ("X-Post-Seq", seq.to_owned()),
            ]
        };
        fn headers<'a>(h: &'a [(&'static str, String); 3]) -> Vec<(&'static str, &'a str)> {
            h.iter().map(|(k, v)| (*k, v.as_str())).collect()
        }
        let first = auth("1");
        let body = r#"{"type":"echo","id":"once","data":1}"#;
        for _ in 0..2 {
            let r = post(router.http, "/ws/echo", &headers(&first), body).await;
            assert_eq!((r.status, r.json()), (202, json!({"accepted": 1})), "{r:?}");
        }
        // The reply to "once" first (a second run of it would answer next
        // to it), then a later request: every terminal frame up to its reply
        // is counted. (Replies to different requests may come in any order.)
        let mut ids = Vec::new();
        while !ids.contains(&json!("once")) {
            let f = events.next_json(T).await;
            if f["done"] == true {
                ids.push(f["id"].clone());
            }
        }
        let r = post(
            router.http,
            "/ws/echo",
            &headers(&auth("2")),
            r#"{"type":"echo","id":"after","data":2}"#,
        )
        .await;
        assert_eq!(r.status, 202, "{r:?}");
        while !ids.contains(&json!("after")) {
            let f = events.next_json(T).await;
            if f["done"] == true {
                ids.push(f["id"].clone());
            }
        }
        assert_eq!(
            ids,
            [json!("once"), json!("after")],
            "the retried POST ran once"
        );
        let r = post(router.http, "/ws/echo", &headers(&auth("x")), body).await;
        assert_eq!(
            (r.status, r.json()["error"]["code"].clone()),
            (400, json!("bad_request"))
        );

        // DELETE: 204, then the stream's close event, and the token is spent.
        let r = request(router.http, "DELETE", "/ws/echo", &headers(&auth("3"))).await;
        assert_eq!(r.status, 204, "{r:?}");
        let close = loop {
            let e = events.next(T).await.expect("a close event");
            if e.event.as_deref() == Some("close") {
                break e.json();
            }
        };
        assert_eq!(close["code"], 1000, "{close}");
        assert_eq!(
            events.next(T).await,
            None,
            "the stream ends after its close event"
        );
        let r = post(router.http, "/ws/echo", &headers(&auth("4")), body).await;
        assert_eq!(
            r.status, 401,
            "an ended session takes no more frames: {r:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_is_resumed_by_a_new_get_with_last_event_id() {
    run(LIMIT, async {
        let (router, _worker) = stack(&[]).await;
        let (mut events, id, token) = open(&router, "/ws/echo").await;
        let auth = [
            ("X-Session-Id", id.as_str()),
            ("X-Resume-Token", token.as_str()),
        ];
        let r = post(
            router.http,
            "/ws/echo",
            &auth,
            r#"{"type":"echo","id":"a","data":1}"#,
        )
        .await;
        assert_eq!(r.status, 202);
        let a = events.next(T).await.unwrap();
        let last = a.id.clone().unwrap();
        let r = post(
            router.http,
            "/ws/echo",
            &auth,
            r#"{"type":"slow","id":"b","data":{"ms":800}}"#,
        )
        .await;
        assert_eq!(r.status, 202);
        drop(events); // the network drops the stream
        let path = format!("/ws/echo?session_id={id}&resume_token={token}");
        let mut again = EventStream::open(router.http, &path, &[("Last-Event-ID", &last)]).await;
        let welcome = again.next(T).await.unwrap();
        assert_eq!(
            (welcome.id.as_deref(), welcome.json()["type"].as_str()),
            (None, Some("welcome"))
        );
        let resumed = again.next(T).await.unwrap();
        assert_eq!(resumed.id, None, "resumed has no id");
        let r = resumed.json();
        assert_eq!(r["type"], "resumed", "{r}");
        assert_eq!(r["data"]["session_id"], json!(id));
        let new_token = r["data"]["resume_token"].as_str().unwrap().to_owned();
        // A POST of the dropped stream that arrives late, with the token
        // the resume replaced, reaches nothing (else it could run twice).
        let late = post(
            router.http,
            "/ws/echo",
            &auth,
            r#"{"type":"echo","id":"late","data":0}"#,
        )
        .await;
        assert_eq!(late.status, 401, "{late:?}");
        let b = again.next_json(T).await;
        assert_eq!(
            (b["id"].as_str(), b["done"].as_bool()),
            (Some("b"), Some(true)),
            "{b}"
        );
        assert_eq!(b["seq"].as_u64(), Some(last.parse::<u64>().unwrap() + 1));
        // POSTs now go to the resumed session, with the new token.
        let auth = [
            ("X-Session-Id", id.as_str()),
            ("X-Resume-Token", new_token.as_str()),
        ];
        let r = post(
            router.http,
            "/ws/echo",
            &auth,
            r#"{"type":"echo","id":"c","data":3}"#,
        )
        .await;
        assert_eq!(r.status, 202, "{r:?}");
        assert_eq!(again.next_json(T).await["id"], "c");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_follows_allowed_origins_and_keep_alives_flow() {
    run(LIMIT, async {
        let (router, _worker) = stack(&["--client-ping-ms", "200"]).await;
        let pre = |origin: &'static str| {
            let addr = router.http;
            async move {
                request(
                    addr,
                    "OPTIONS",
                    "/ws/app",
                    &[
                        ("Origin", origin),
                        ("Access-Control-Request-Method", "POST"),
                        (
                            "Access-Control-Request-Headers",
                            "x-session-id, x-resume-token, content-type",
                        ),
                    ],
                )
                .await
            }
        };
        let ok = pre("https://app.example").await;
        assert_eq!(ok.status, 204, "{ok:?}");
        assert_eq!(
            ok.header("access-control-allow-origin"),
            Some("https://app.example")
        );
        assert!(ok
            .header("access-control-allow-headers")
            .unwrap_or("")
            .contains("X-Resume-Token"));
        let no = pre("https://evil.example").await;
        assert_eq!(no.status, 403, "{no:?}");
        assert_eq!(no.header("access-control-allow-origin"), None);
        let mut s =
            EventStream::open(router.http, "/ws/app", &[("Origin", "https://app.example")]).await;
        assert_eq!(s.status, 200);
        assert_eq!(
            s.header("access-control-allow-origin"),
            Some("https://app.example")
        );
        s.next(T).await.unwrap();
        // Keep-alive comments every ping interval (200 ms here); the session
        // stays up without any POST.
        let started = tokio::time::Instant::now();
        while s.comments < 3 {
            assert!(started.elapsed() < T, "no keep-alive comments");
            let _ = tokio::time::timeout(Duration::from_millis(300), s.next(T)).await;
        }
    })
    .await;
}

/// The README's two `curl` lines, run as written (the address, and the
/// session id and token the first one printed, filled in): the event
/// stream's welcome, then the POSTed request's answer on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_curl_example_works() {
    run(LIMIT, async {
        let routes = json!({"routes": [{"path": "/ws/vision", "service": "vision"}]}).to_string();
        let router = RouterProc::start(&routes, &[]).await;
        let _vision = router.worker("vision_worker", &["vision"], &[]).await;
        let readme =
            std::fs::read_to_string(e2e_tests::workspace_root().join("README.md")).unwrap();
        let section = &readme[readme.find("### HTTP fallback").expect("the section")..];
        let block = section
            .split("```sh\n")
            .nth(1)
            .unwrap()
            .split("```")
            .next()
            .unwrap();
        let lines: Vec<String> = block
            .replace("\\\n", " ")
            .lines()
            .filter(|l| l.starts_with("curl "))
            .map(|l| l.replace("http://127.0.0.1:8001", &format!("http://{}", router.http)))
            .collect();
        assert_eq!(lines.len(), 2, "{block}");
        let mut get = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!("exec {} -s", lines[0]))
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut out = tokio::io::BufReader::new(get.stdout.take().unwrap()).lines();
        let welcome = next_data(&mut out, T).await;
        assert_eq!(welcome["type"], "welcome");
        let id = welcome["data"]["session_id"].as_str().unwrap();
        let token = welcome["data"]["resume_token"].as_str().unwrap();
        let post_line = lines[1]
            .replace("X-Session-Id: 01…", &format!("X-Session-Id: {id}"))
            .replace("X-Resume-Token: …", &format!("X-Resume-Token: {token}"));
        let posted = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{post_line} -s"))
            .output()
            .await
            .unwrap();
        let printed = String::from_utf8_lossy(&posted.stdout);
        assert!(printed.contains("\"accepted\":1"), "{post_line}: {printed}");
        loop {
            let f = next_data(&mut out, T).await;
            if f["id"] == 1 && f["done"] == true {
                assert_ne!(f["type"], "error", "{f}");
                break;
            }
        }
    })
    .await;
}

type Out = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>;

/// The next `data:` line of curl's output, as JSON.
async fn next_data(out: &mut Out, timeout: Duration) -> Value {
    loop {
        let line = tokio::time::timeout(timeout, out.next_line())
            .await
            .expect("an event")
            .unwrap()
            .expect("the stream is open");
        if let Some(d) = line.strip_prefix("data: ") {
            return serde_json::from_str::<Value>(d).unwrap();
        }
    }
}
