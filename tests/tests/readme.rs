//! The README's examples, run against the real router and workers, so they
//! stay true: the "Try it" transcript (replayed and compared frame by frame),
//! the `poke` one-liner, the Rust worker of "Writing a worker", and the table
//! of what each example worker accepts.

use std::process::Command;
use std::time::Duration;

use e2e_tests::{
    default_routes_json, example_bin, routes, run, workspace_root, Frame, Proc, RouterProc,
    WsClient, RECV_TIMEOUT, STACK_ENV, START_TIMEOUT,
};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(120);

fn readme() -> String {
    let path = workspace_root().join("README.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The body of the first fenced block of `lang` after `heading`.
fn block_after<'a>(text: &'a str, heading: &str, lang: &str) -> &'a str {
    let from = text
        .find(heading)
        .unwrap_or_else(|| panic!("README has no {heading:?}"));
    let fence = format!("```{lang}\n");
    let start = text[from..]
        .find(&fence)
        .unwrap_or_else(|| panic!("no ```{lang} block after {heading:?}"))
        + from
        + fence.len();
    let len = text[start..].find("```").expect("closed block");
    &text[start..start + len]
}

/// The marker a README value stands for "anything" with.
const ANY: &str = "\u{1}any";

/// A README frame as a JSON pattern: a string containing `…` or a bare `…`
/// stands for any value (ids, times, data that change on every run).
fn pattern(line: &str) -> Value {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                let mut s = String::from('"');
                while let Some(c) = chars.next() {
                    s.push(c);
                    if c == '\\' {
                        s.extend(chars.next());
                    } else if c == '"' {
                        break;
                    }
                }
                if s.contains('…') {
                    out.push_str(&Value::from(ANY).to_string());
                } else {
                    out.push_str(&s);
                }
            }
            '…' => out.push_str(&Value::from(ANY).to_string()),
            c => out.push(c),
        }
    }
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("README frame is not JSON ({e}): {line}"))
}

fn matches(pattern: &Value, actual: &Value) -> bool {
    match (pattern, actual) {
        (Value::String(p), _) if p == ANY => true,
        (Value::Object(p), Value::Object(a)) => {
            p.len() == a.len()
                && p.iter()
                    .all(|(k, v)| a.get(k).is_some_and(|x| matches(v, x)))
        }
        (Value::Array(p), Value::Array(a)) => {
            p.len() == a.len() && p.iter().zip(a).all(|(p, a)| matches(p, a))
        }
        (p, a) => p == a,
    }
}

#[test]
fn patterns_match_what_they_should_and_nothing_else() {
    let p = pattern(r#"{"id":"01…","data":{"result":…},"n":[1.0,"a"],"s":"x"}"#);
    assert!(matches(
        &p,
        &json!({"id": "01ABC", "data": {"result": {"deep": [1]}}, "n": [1.0, "a"], "s": "x"})
    ));
    for wrong in [
        json!({"id": "01ABC", "data": {"result": 1}, "n": [1.0, "a"], "s": "y"}),
        json!({"id": "01ABC", "data": {"result": 1}, "n": [1.0], "s": "x"}),
        json!({"id": "01ABC", "data": {}, "n": [1.0, "a"], "s": "x"}),
        json!({"id": "01ABC", "data": {"result": 1}, "n": [1.0, "a"], "s": "x", "extra": 1}),
    ] {
        assert!(!matches(&p, &wrong), "{wrong}");
    }
}

/// README "Try it": every `→` is sent and every `←` is the next frame the
/// router sends, equal up to the `…` placeholders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_try_it_transcript_is_what_the_router_answers() {
    run(LIMIT, async {
        let text = readme();
        let transcript = block_after(&text, "## Try it", "text");
        let router = RouterProc::start(&default_routes_json(), &[]).await;
        let _vision = router.worker("vision_worker", &[], &[]).await;
        let mut lines = transcript.lines();
        let first = lines.next().unwrap_or_default();
        let url = first
            .strip_prefix("→ connect ws://127.0.0.1:8001")
            .unwrap_or_else(|| panic!("the transcript starts with a connect: {first}"));
        let mut c = WsClient::connect_raw(&router.ws_url(url)).await;
        let mut received = 0;
        for line in lines {
            if let Some(sent) = line.strip_prefix("→ ") {
                c.send_text(sent).await;
            } else if let Some(want) = line.strip_prefix("← ") {
                let got = match c.next_frame(RECV_TIMEOUT).await {
                    Frame::Text(t) => serde_json::from_str::<Value>(&t)
                        .unwrap_or_else(|e| panic!("not JSON ({e}): {t}")),
                    other => panic!("README expects {want}, the router sent {other:?}"),
                };
                assert!(
                    matches(&pattern(want), &got),
                    "README: {want}\nrouter: {got}"
                );
                received += 1;
            } else {
                panic!("a transcript line is `→ ...` or `← ...`: {line}");
            }
        }
        assert!(
            received >= 8,
            "the transcript lost its frames: {transcript}"
        );
    })
    .await;
}

/// The `'...'` and bare words of a one-line shell command (no other quoting).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        if let Some(quoted) = rest.strip_prefix('\'') {
            let end = quoted.find('\'').expect("closing quote");
            words.push(quoted[..end].to_owned());
            rest = quoted[end + 1..].trim_start();
        } else {
            let end = rest.find(' ').unwrap_or(rest.len());
            words.push(rest[..end].to_owned());
            rest = rest[end..].trim_start();
        }
    }
    words
}

/// README "Try it": the `poke` one-liner, run as written (the debug build of
/// the same example, and the test router's address).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_poke_one_liner_works_as_written() {
    run(LIMIT, async {
        let text = readme();
        let line = block_after(&text, "## Try it", "sh").trim();
        let words = shell_words(line);
        assert_eq!(words[0], "target/release/examples/poke", "{line}");
        let router = RouterProc::start(&default_routes_json(), &[]).await;
        let _chat = router.worker("chat_worker", &[], &[]).await;
        let url = words[1].replace("ws://127.0.0.1:8001", &format!("ws://{}", router.http));
        let mut cmd = tokio::process::Command::new(example_bin("poke"));
        cmd.arg(&url).args(&words[2..]);
        let out = tokio::time::timeout(START_TIMEOUT, cmd.output())
            .await
            .expect("poke finishes")
            .expect("poke runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let frames: Vec<Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(frames.len(), 2, "the welcome and the reply: {stdout}");
        assert_eq!(frames[0]["type"], "welcome");
        assert_eq!(
            (
                &frames[1]["type"],
                &frames[1]["id"],
                &frames[1]["data"],
                &frames[1]["done"]
            ),
            (&json!("echo"), &json!("1"), &json!("hi"), &json!(true)),
            "{stdout}"
        );

        // A refused upgrade prints the router's answer and fails.
        let out = Command::new(example_bin("poke"))
            .arg(router.ws_url("/ws/visoin"))
            .output()
            .expect("poke runs");
        assert_eq!(out.status.code(), Some(1));
        let body: Value = serde_json::from_slice(&out.stdout).expect("the router's JSON answer");
        assert_eq!(body["did_you_mean"], "/ws/vision", "{body}");
    })
    .await;
}

/// README "Writing a worker": the Rust worker (`examples/readme_worker.rs`,
/// kept identical to the README by `worker-sdk/tests/readme.rs`) serves
/// `/ws` as described. What it has no handler for is answered, not dropped:
/// a request and a fire-and-forget message of an unknown type (by the router,
/// which knows the worker's types), and a binary frame (by the worker, which
/// has no binary handler), each logged at info.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_rust_worker_serves_ws_and_answers_what_it_cannot_handle() {
    run(LIMIT, async {
        // The log checked below at its level and format, whatever the developer's shell says.
        let log = [("RUST_LOG", "info"), ("LOG_FORMAT", "text")];
        let router = RouterProc::start(&default_routes_json(), &log).await;
        let mut cmd = Command::new(example_bin("readme_worker"));
        for k in STACK_ENV {
            cmd.env_remove(k);
        }
        cmd.env("BRIDGE_ENDPOINT", &router.bridge)
            .env("RUST_LOG", "info");
        let worker = Proc::spawn("readme_worker", cmd);
        let route = router.wait_live_workers("chat", 1).await;
        assert_eq!(route.raw["types"], json!(["count", "echo"]), "{}", route.raw);

        let mut c = router.client("/ws").await;
        let echo = c.request_ok("echo", "e", json!({"x": [1, 2]})).await;
        assert_eq!(echo["data"], json!({"x": [1, 2]}));
        let frames = c.request("count", "c", json!({"n": 2})).await;
        let data: Vec<&Value> = frames.iter().map(|f| &f["data"]).collect();
        assert_eq!(data, [&json!({"i": 0}), &json!({"i": 1}), &json!({"n": 2})]);
        let bad = c.request("count", "b", json!("x")).await;
        assert_eq!(bad[0]["error"]["code"], "bad_request", "{bad:?}");

        let unknown = c.request("shout", "u", json!(null)).await;
        assert_eq!(
            unknown[0]["error"]["message"],
            "this worker has no handler for requests of type `shout`; requests it handles: `count`, `echo`",
            "{unknown:?}"
        );

        let from = router.proc.stderr.position();
        c.send_json(&json!({"type": "shout", "data": 1})).await;
        let f = c.next_json(RECV_TIMEOUT).await;
        assert_eq!(
            f,
            json!({"type": "error", "done": true, "seq": f["seq"], "error": {
                "code": "unknown_type",
                "message": "/ws does not handle messages of type `shout`; it accepts `count`, `echo`"}}),
        );
        router
            .proc
            .stderr
            .wait_line_after(from, "the router's info line", RECV_TIMEOUT, |l| {
                l.contains("INFO") && l.contains("answered unknown_type") && l.contains("shout")
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));

        let from = worker.stderr.position();
        c.send_binary(&[1, 2, 3]).await;
        let f = c.next_json(RECV_TIMEOUT).await;
        assert_eq!(f.get("id"), None, "{f}");
        assert_eq!(
            (&f["type"], &f["error"]["code"], &f["error"]["message"]),
            (
                &json!("error"),
                &json!("unknown_type"),
                &json!("this worker has no handler for binary frames")
            ),
            "{f}"
        );
        worker
            .stderr
            .wait_line_after(from, "the worker's info line", RECV_TIMEOUT, |l| {
                l.contains("INFO") && l.contains("no binary handler")
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        c.assert_seq_ok();
    })
    .await;
}

/// One row of the README's table of example workers: the worker and the
/// message types it lists.
fn example_rows(text: &str) -> Vec<(String, Vec<String>)> {
    let header = "| route (service) | worker | message types | binary frames |";
    let start = text
        .find(header)
        .unwrap_or_else(|| panic!("README lost its table of example workers"));
    let ticked = |cell: &str| -> Vec<String> {
        cell.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    };
    text[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|row| {
            let cells: Vec<&str> = row.split('|').collect();
            (ticked(cells[2])[0].clone(), ticked(cells[3]))
        })
        .collect()
}

/// README "Writing a worker": each Rust example worker announces exactly the
/// message types the table lists (the Python ones are checked by pytest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_workers_table_is_what_they_announce() {
    run(LIMIT, async {
        let rows = example_rows(&readme());
        let rust: Vec<&(String, Vec<String>)> =
            rows.iter().filter(|(w, _)| !w.ends_with(".py")).collect();
        assert!(rust.len() >= 6, "{rows:?}");
        let mut routes_json: Value = serde_json::from_str(&default_routes_json()).expect("JSON");
        routes_json["routes"]
            .as_array_mut()
            .expect("routes")
            .push(json!({"path": "/ws/echo", "service": "echo"}));
        let router = RouterProc::start(&routes_json.to_string(), &[]).await;
        let mut workers = Vec::new();
        for (name, _) in &rust {
            if name == "readme_worker" {
                continue; // no command line: the previous test runs it
            }
            workers.push(router.worker(name, &[], &[]).await);
        }
        let announced = routes(router.http).await.expect("GET /routes");
        for (name, types) in &rust {
            if name == "readme_worker" {
                assert_eq!(types, &["count", "echo"], "see the README's Rust worker");
                continue;
            }
            let id = &workers
                .iter()
                .find(|w| w.worker_id.starts_with(name.as_str()))
                .expect("started above")
                .worker_id;
            let entry = announced
                .iter()
                .flat_map(|r| r.raw["workers"].as_array().cloned().unwrap_or_default())
                .find(|w| w["id"] == json!(id))
                .unwrap_or_else(|| panic!("{name} is not in /routes"));
            assert_eq!(&entry["types"], &json!(types), "README row of {name}");
        }
    })
    .await;
}
