//! Logs (issue 5): JSON lines with `LOG_FORMAT=json`, human-readable text by
//! default; one line per connection open and close and per refused upgrade;
//! the session id and the correlation id on the lines about a request;
//! payloads never logged.

mod ops_support;

use std::time::Duration;

use e2e_tests::{run, unique, RouterProc};
use ops_support::{assert_unknown_route, json_has, start_router, wait_log, SOON};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(90);

const ROUTES: &str = r#"{"routes": [{"path": "/ws/echo", "service": "echo"}]}"#;

fn message(v: &Value) -> &str {
    v["fields"]["message"].as_str().unwrap_or_default()
}

/// Every stderr line so far, parsed; panics on the first line that is not
/// a JSON object.
fn json_lines(router: &RouterProc) -> Vec<Value> {
    router
        .proc
        .stderr
        .lines()
        .iter()
        .map(|l| match serde_json::from_str::<Value>(l) {
            Ok(v) if v.is_object() => v,
            _ => panic!("LOG_FORMAT=json, yet this stderr line is not a JSON object: {l:?}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_connection_refusal_and_request_lines_with_their_ids() {
    run(LIMIT, async {
        let router = start_router(ROUTES, &[("LOG_FORMAT", "json"), ("RUST_LOG", "debug")]).await;
        let _worker = router.worker("echo_worker", &[], &[]).await;
        let log = &router.proc.stderr;

        let mut c = router.client("/ws/echo").await;
        let sid = c.welcome.as_ref().map(|w| w["data"]["session_id"].clone());
        let sid = sid
            .and_then(|s| s.as_str().map(str::to_owned))
            .unwrap_or_else(|| panic!("welcome without session_id: {:?}", c.welcome));
        let secret = unique("payload-marker");
        let reply = c
            .request_ok("echo", "req-1", json!({"secret": secret}))
            .await;
        let cid = reply["correlation_id"]
            .as_str()
            .unwrap_or_else(|| panic!("reply without correlation_id: {reply}"))
            .to_owned();
        c.close().await;
        assert_unknown_route(&router.ws_url("/ws/nope")).await;

        wait_log(log, 0, &["connection closed", &sid], SOON).await;
        wait_log(log, 0, &["refused", "/ws/nope"], SOON).await;
        let lines = json_lines(&router);
        let find = |what: &str, pred: &dyn Fn(&Value) -> bool| -> Value {
            lines
                .iter()
                .find(|v| pred(v))
                .cloned()
                .unwrap_or_else(|| panic!("no {what} log line among:\n{}", log.text()))
        };
        for v in &lines {
            assert!(
                v["timestamp"].is_string() && v["level"].is_string(),
                "every JSON line has a timestamp and a level: {v}"
            );
        }

        let opened = find("connection-opened", &|v| {
            message(v) == "connection opened" && json_has(v, "session.id", &sid)
        });
        assert_eq!(opened["level"], "INFO", "{opened}");
        let closed = find("connection-closed", &|v| {
            message(v).starts_with("connection closed") && json_has(v, "session.id", &sid)
        });
        assert!(
            closed["fields"]["code"].is_u64(),
            "the close line has its code: {closed}"
        );
        let refused = find("refused-upgrade", &|v| {
            message(v).starts_with("refused") && json_has(v, "path", "/ws/nope")
        });
        assert!(
            message(&refused).contains("unknown route"),
            "the refusal says why: {refused}"
        );

        // The request line at debug, with both ids and the kind, not the payload.
        let request = find("request", &|v| {
            message(v) == "request" && json_has(v, "correlation.id", &cid)
        });
        assert!(json_has(&request, "session.id", &sid), "{request}");
        assert_eq!(request["fields"]["type"], "echo", "{request}");
        // Every line about this request carries both ids.
        let about: Vec<&Value> = lines
            .iter()
            .filter(|v| v.to_string().contains(&cid))
            .collect();
        assert!(!about.is_empty());
        for v in &about {
            assert!(
                json_has(v, "correlation.id", &cid) && json_has(v, "session.id", &sid),
                "a line about request {cid} without both ids: {v}"
            );
        }
        // Payloads are never logged, by the router or its libraries.
        let leaks: Vec<&Value> = lines
            .iter()
            .filter(|v| v.to_string().contains(&secret))
            .collect();
        assert!(leaks.is_empty(), "the payload was logged: {leaks:?}");
    })
    .await;
}

/// Without `LOG_FORMAT` the logs are human-readable text, not JSON, and
/// still carry the session id on the connection lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_by_default() {
    run(LIMIT, async {
        assert!(
            std::env::var_os("LOG_FORMAT").is_none(),
            "unset LOG_FORMAT to run this test: it checks the default"
        );
        let router = RouterProc::start(ROUTES, &[("RUST_LOG", "info")]).await;
        let c = router.client("/ws/echo").await;
        let sid = c
            .welcome
            .as_ref()
            .and_then(|w| w["data"]["session_id"].as_str().map(str::to_owned))
            .unwrap_or_default();
        c.close().await;
        let opened = wait_log(&router.proc.stderr, 0, &["connection opened", &sid], SOON).await;
        wait_log(&router.proc.stderr, 0, &["connection closed", &sid], SOON).await;
        assert!(
            serde_json::from_str::<Value>(&opened).is_err(),
            "text format by default: {opened}"
        );
        for l in router.proc.stderr.lines() {
            assert!(
                serde_json::from_str::<Value>(&l).is_err(),
                "a JSON line in the default text log: {l}"
            );
        }
    })
    .await;
}
