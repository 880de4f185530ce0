//! Each default route (the repository's `websocket-routes.json`) served end
//! to end by its example worker: the flows a frontend developer sees first.

use std::time::Duration;

use e2e_tests::{default_routes_json, run, Frame, RouterProc, WsClient, RECV_TIMEOUT};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(90);

async fn router_with(example: &str) -> (RouterProc, e2e_tests::WorkerProc) {
    let router = RouterProc::start(&default_routes_json(), &[]).await;
    let worker = router.worker(example, &[], &[]).await;
    (router, worker)
}

fn assert_welcome(c: &WsClient, path: &str) {
    // Invariant: WsClient::connect only returns after storing the welcome.
    let w = c.welcome.as_ref().expect("connect() stores the welcome");
    let d = &w["data"];
    assert!(
        d["session_id"].as_str().is_some_and(|s| !s.is_empty()),
        "welcome without session_id: {w}"
    );
    assert_eq!(d["path"], path, "welcome path: {w}");
    assert!(d["route"].is_string(), "welcome route: {w}");
    assert!(
        d["heartbeat_ms"].as_u64().is_some(),
        "welcome heartbeat_ms: {w}"
    );
    assert!(
        d["limits"]["max_message_bytes"].as_u64().is_some()
            && d["limits"]["max_in_flight"].as_u64().is_some(),
        "welcome limits: {w}"
    );
}

/// Every frame of one request: same id, one non-empty correlation id, only
/// the last one done.
fn assert_stream_shape(frames: &[Value], id: &str) {
    let cid = &frames[0]["correlation_id"];
    assert!(
        cid.as_str().is_some_and(|s| !s.is_empty()),
        "no correlation_id: {}",
        frames[0]
    );
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f["id"], id, "frame {i}: {f}");
        assert_eq!(&f["correlation_id"], cid, "frame {i}: {f}");
        let last = i == frames.len() - 1;
        assert_eq!(f["done"], json!(last), "frame {i} done flag: {f}");
    }
}

/// The welcome frame carries what the README's client protocol and the contract promise, on every default route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_frame_has_session_route_path_heartbeat_and_limits() {
    run(LIMIT, async {
        // No worker needed: the router itself greets.
        let router = RouterProc::start(&default_routes_json(), &[]).await;
        for path in ["/ws/vision", "/ws/voice", "/ws/automation", "/ws"] {
            let c = router.client(path).await;
            assert_welcome(&c, path);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vision_streams_progress_then_result_and_acknowledges_images() {
    run(LIMIT, async {
        let (router, _w) = router_with("vision_worker").await;
        let mut c = router.client("/ws/vision").await;

        let frames = c
            .request(
                "request_workspace_analysis",
                "v-1",
                json!({"workspace": "demo", "files": ["a.rs", "b.rs"]}),
            )
            .await;
        assert_stream_shape(&frames, "v-1");
        let (last, partials) = frames.split_last().expect("at least the done frame");
        assert!(
            partials.len() >= 3,
            "expected 3+ progress frames, got {frames:?}"
        );
        for p in partials {
            assert!(
                p["data"]["stage"].is_string() && p["data"]["progress"].is_number(),
                "progress frame without stage/progress: {p}"
            );
        }
        assert_ne!(last["type"], "error", "analysis failed: {last}");
        assert!(
            !last["data"]["result"].is_null(),
            "final frame without result: {last}"
        );

        // A binary frame is an image upload: acknowledged by a push.
        let image: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        c.send_binary(&image).await;
        let ack = c.next_of_type("image_received", RECV_TIMEOUT).await;
        assert_eq!(ack["data"]["bytes"], 3000, "image ack: {ack}");
        assert!(
            ack.get("id").is_none_or(Value::is_null),
            "a push has no id: {ack}"
        );
        c.assert_seq_ok();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voice_turns_audio_chunks_into_partial_transcripts() {
    run(LIMIT, async {
        let (router, _w) = router_with("voice_worker").await;
        let mut c = router.client("/ws/voice").await;

        let started = c.request_ok("start_session", "s-1", json!({})).await;
        assert_eq!(started["done"], true);

        for size in [100usize, 200, 300] {
            c.send_binary(&vec![7u8; size]).await;
        }
        let mut chunks = Vec::new();
        let mut max_bytes = 0;
        for _ in 0..3 {
            let p = c.next_of_type("partial_transcript", RECV_TIMEOUT).await;
            assert!(p["data"]["text"].is_string(), "partial without text: {p}");
            chunks.push(p["data"]["chunks"].as_u64().unwrap_or(0));
            max_bytes = max_bytes.max(p["data"]["bytes"].as_u64().unwrap_or(0));
        }
        chunks.sort_unstable();
        assert_eq!(chunks, [1, 2, 3], "one partial per chunk, counted");
        assert_eq!(max_bytes, 600, "all audio bytes counted");

        let ended = c.request_ok("end_session", "s-2", json!({})).await;
        assert!(!ended["data"].is_null(), "end_session reply: {ended}");
        c.assert_seq_ok();
    })
    .await;
}

/// Collects frames of request `id` until one of type `until` (inclusive).
async fn frames_until(c: &mut WsClient, id: &str, until: &str) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let f = c.next_for_id(id, RECV_TIMEOUT).await;
        assert_ne!(f["type"], "error", "run failed: {f}; before: {out:?}");
        let stop = f["type"] == until;
        if stop {
            assert_eq!(f["done"], false, "{until} must not end the request: {f}");
        }
        out.push(f);
        if stop {
            return out;
        }
        assert_ne!(
            out.last().map(|f| &f["done"]),
            Some(&json!(true)),
            "ended early: {out:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automation_run_asks_a_human_and_finishes_with_the_answer() {
    run(LIMIT, async {
        let (router, _w) = router_with("automation_worker").await;
        let mut c = router.client("/ws/automation").await;

        // First run: the answer comes as a fire-and-forget message.
        c.send_request(
            "run_task",
            "a-1",
            json!({"task": "tidy the desk", "ask_human": true}),
        )
        .await;
        let before = frames_until(&mut c, "a-1", "HUMAN_INPUT_REQUEST").await;
        let types: Vec<&str> = before.iter().filter_map(|f| f["type"].as_str()).collect();
        assert!(
            types.contains(&"THOUGHT"),
            "no THOUGHT before the question: {types:?}"
        );
        assert!(
            types.contains(&"ACTION"),
            "no ACTION before the question: {types:?}"
        );
        // Invariant: frames_until returns at least the frame it stopped at.
        let question = before.last().expect("stopped at the question");
        let qid = question["data"]["question_id"].clone();
        assert!(qid.is_string(), "question without question_id: {question}");

        c.send_json(
            &json!({"type": "HUMAN_RESPONSE", "data": {"question_id": qid, "response": "yes, go"}}),
        )
        .await;
        let after = c.collect_until_done("a-1", RECV_TIMEOUT).await;
        let mut all = before.clone();
        all.extend(after.iter().cloned());
        assert_stream_shape(&all, "a-1");
        let last = all.last().expect("a done frame");
        assert_eq!(last["type"], "OUTPUT", "the run ends with OUTPUT: {last}");
        assert_eq!(last["data"]["human_response"], "yes, go", "{last}");
        assert!(
            after.iter().any(|f| f["type"] == "STREAM"),
            "no STREAM frame after the answer: {after:?}"
        );

        // Second run: the answer is itself a request, and gets its own reply.
        c.send_request("run_task", "a-2", json!({"question": "which desk?"}))
            .await;
        let before = frames_until(&mut c, "a-2", "HUMAN_INPUT_REQUEST").await;
        let qid = before.last().expect("stopped at the question")["data"]["question_id"].clone();
        let ack = c
            .request_ok(
                "HUMAN_RESPONSE",
                "h-1",
                json!({"question_id": qid, "response": "the left one"}),
            )
            .await;
        assert_eq!(ack["data"]["accepted"], true, "{ack}");
        let after = c.collect_until_done("a-2", RECV_TIMEOUT).await;
        let last = after.last().expect("a done frame");
        assert_eq!(last["type"], "OUTPUT", "{last}");
        assert_eq!(last["data"]["human_response"], "the left one", "{last}");

        // An answer to no open question, fire-and-forget: an error frame
        // without id (the worker's `send_error`), not silence.
        c.send_json(&json!({"type": "HUMAN_RESPONSE", "data": {"response": "late"}}))
            .await;
        let late = c.next_of_type("error", RECV_TIMEOUT).await;
        assert_eq!(
            (late.get("id"), &late["error"]["code"]),
            (None, &json!("bad_request")),
            "{late}"
        );
        c.assert_seq_ok();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_echo_returns_data_unchanged() {
    run(LIMIT, async {
        let (router, _w) = router_with("chat_worker").await;
        let mut c = router.client("/ws").await;
        let data = json!({
            "text": "héllo ✓ \u{1F600}",
            "n": [1, -2, 3.5, 1e300, null, true],
            "nested": {"a": {"b": [{}, []]}, "empty": ""},
            "big": 9007199254740993u64
        });
        let frames = c.request("echo", "e-1", data.clone()).await;
        assert_eq!(frames.len(), 1, "echo is a single final reply: {frames:?}");
        assert_eq!(frames[0]["type"], "echo", "{}", frames[0]);
        assert_eq!(frames[0]["data"], data, "echo changed the data");
        assert_eq!(frames[0]["done"], true);
        assert!(
            frames[0]["correlation_id"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "{}",
            frames[0]
        );
        // Non-object data too.
        for (i, d) in [
            json!("just a string"),
            json!(42),
            json!(null),
            json!([1, 2]),
        ]
        .into_iter()
        .enumerate()
        {
            let id = format!("e-{}", i + 2);
            let last = c.request_ok("echo", &id, d.clone()).await;
            assert_eq!(last["data"], d, "echo of {d}");
        }
        assert!(
            c.backlog()
                .iter()
                .all(|f| !matches!(f, Frame::Json(v) if v["type"] == "error")),
            "unexpected errors: {:?}",
            c.backlog()
        );
        c.assert_seq_ok();
    })
    .await;
}
