//! `/metrics` and `/stats` against traffic the test controls (issue 5, README: /metrics and /stats).
//!
//! `/metrics` must be valid OpenMetrics text (parsed strictly here, not
//! grepped) and its counters must move by exactly what the test sent;
//! `/stats` must add up to the same traffic, per route and in total.

mod ops_support;

use std::time::Duration;

use e2e_tests::{http_get, run, RouterProc, WsClient, RECV_TIMEOUT};
use ops_support::{
    assert_unknown_route, parse_openmetrics, poll_until, scrape, start_router, stats, Scrape, SOON,
};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(120);

const ROUTES: &str = r#"{
  "routes": [
    {"path": "/ws/echo", "service": "echo"},
    {"path": "/ws/other", "service": "echo"}
  ]
}"#;

async fn router_and_worker() -> (RouterProc, e2e_tests::WorkerProc) {
    let router = start_router(ROUTES, &[]).await;
    let worker = router.worker("echo_worker", &[], &[]).await;
    (router, worker)
}

/// Sends a text frame that is not a valid client message and expects its
/// `bad_request` error frame.
async fn send_bad(c: &mut WsClient, text: &str) {
    c.send_text(text).await;
    let f = c.next_of_type("error", RECV_TIMEOUT).await;
    assert_eq!(f["error"]["code"], "bad_request", "{text:?} → {f}");
}

async fn echo(c: &mut WsClient, id: &str) {
    let data = json!({"id": id, "pad": "x".repeat(10)});
    let last = c.request_ok("echo", id, data.clone()).await;
    assert_eq!(last["data"], data, "echo {id}");
}

fn delta(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.sum(name, labels) - before.sum(name, labels)
}

/// Every counter the issue lists moves by exactly what the client did, and
/// every scrape (before, during, after) parses as strict OpenMetrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_valid_openmetrics_and_counters_follow_the_traffic() {
    run(LIMIT, async {
        let (router, worker) = router_and_worker().await;
        let r = [("route", "/ws/echo")];
        let before = scrape(router.http).await;
        assert_eq!(
            before.get("router_config_reloads_total", &[("result", "success")]),
            Some(0.0),
            "the load at start is not a reload (so /stats and /metrics agree)"
        );
        assert_eq!(
            before.get("router_config_reloads_total", &[("result", "failure")]),
            Some(0.0)
        );

        let mut c = router.client("/ws/echo").await;
        let during = scrape(router.http).await;
        assert_eq!(
            during.get("router_connections", &r),
            Some(1.0),
            "open connections gauge"
        );
        assert_eq!(
            during.get("router_workers_live", &[("service", "echo")]),
            Some(1.0),
            "live workers gauge"
        );

        for i in 0..5 {
            echo(&mut c, &format!("e{i}")).await;
        }
        for text in ["{not json", "[1,2]", "\"str\""] {
            send_bad(&mut c, text).await;
        }
        for i in 0..2 {
            // No `type`: bad_request, answered with the request's id.
            let id = format!("nt{i}");
            c.send_json(&json!({"id": id, "data": {}})).await;
            let f = c.next_for_id(&id, RECV_TIMEOUT).await;
            assert_eq!(f["error"]["code"], "bad_request", "{f}");
        }
        let failed = c
            .request(
                "fail",
                "f0",
                json!({"code": "worker_error", "message": "asked to fail"}),
            )
            .await;
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0]["error"]["code"], "worker_error", "{failed:?}");
        assert_unknown_route(&router.ws_url("/ws/nope")).await;
        c.assert_seq_ok();
        c.close().await;

        // The close is counted when the session ends, a moment after the handshake.
        let after = poll_until("the closed connection in /metrics", SOON, || async {
            let m = scrape(router.http).await;
            if m.get("router_connections", &r) == Some(0.0) {
                Ok(m)
            } else {
                Err(format!(
                    "router_connections {:?}",
                    m.all("router_connections", &r)
                ))
            }
        })
        .await;

        let d = |name: &str, labels: &[(&str, &str)]| delta(&before, &after, name, labels);
        assert_eq!(d("router_connections_opened_total", &r), 1.0);
        // The harness client closes without a status code (1005).
        assert_eq!(d("router_connections_closed_total", &r), 1.0);
        assert_eq!(
            d(
                "router_connections_closed_total",
                &[("route", "/ws/echo"), ("code", "1005")]
            ) + d(
                "router_connections_closed_total",
                &[("route", "/ws/echo"), ("code", "1000")]
            ),
            1.0,
            "a client-initiated close is counted as normal: {:?}",
            after.all("router_connections_closed_total", &[])
        );
        let msg_in = |t: &str| {
            d(
                "router_messages_in_total",
                &[("route", "/ws/echo"), ("type", t)],
            )
        };
        assert_eq!(msg_in("echo"), 5.0);
        assert_eq!(msg_in("fail"), 1.0);
        assert_eq!(
            d("router_messages_in_total", &r),
            11.0,
            "5 echo + 5 bad + 1 fail: {:?}",
            after.all("router_messages_in_total", &r)
        );
        let msg_out = |t: &str| {
            d(
                "router_messages_out_total",
                &[("route", "/ws/echo"), ("type", t)],
            )
        };
        assert_eq!(msg_out("welcome"), 1.0);
        assert_eq!(msg_out("echo"), 5.0);
        assert_eq!(msg_out("error"), 6.0, "5 bad_request + 1 worker_error");
        let errors = |code: &str| {
            d(
                "router_errors_total",
                &[("route", "/ws/echo"), ("code", code)],
            )
        };
        assert_eq!(errors("bad_request"), 5.0);
        assert_eq!(errors("worker_error"), 1.0);
        assert_eq!(d("router_errors_total", &r), 6.0);
        assert_eq!(
            d("router_request_duration_seconds_count", &r),
            6.0,
            "5 echo + 1 fail reached a worker and ended"
        );
        assert!(d("router_request_duration_seconds_sum", &r) > 0.0);
        assert_eq!(
            d(
                "router_refused_upgrades_total",
                &[("reason", "unknown_route")]
            ),
            1.0
        );
        assert_eq!(
            after.get("router_worker_in_flight", &[("service", "echo")]),
            Some(0.0)
        );
        assert_eq!(
            after.sum("router_config_reloads_total", &[("result", "failure")]),
            0.0
        );
        assert_eq!(
            after.get("router_breaker_state", &r),
            Some(0.0),
            "one worker_error does not open the breaker"
        );
        drop(worker);
    })
    .await;
}

/// `/stats` adds up to what the test did: connections (total and per
/// route), messages in and out per route, totalMessages, requests, errors
/// and errorRate after N bad_request messages, discovered endpoints and
/// the config status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_agree_with_what_the_clients_did() {
    run(LIMIT, async {
        let (router, worker) = router_and_worker().await;
        let s0 = stats(router.http).await;
        assert_eq!(s0["connections"], 0, "{s0}");
        assert_eq!(s0["totalMessages"], 0, "{s0}");
        assert_eq!(s0["errorRate"], 0.0, "{s0}");

        let mut a = router.client("/ws/echo").await;
        let mut b = router.client("/ws/echo").await;
        let mut o = router.client("/ws/other").await;
        const BAD: usize = 3;
        for i in 0..4 {
            echo(&mut a, &format!("a{i}")).await;
        }
        for _ in 0..BAD {
            send_bad(&mut a, "{oops").await;
        }
        for i in 0..2 {
            echo(&mut b, &format!("b{i}")).await;
        }
        echo(&mut o, "o0").await;

        let s = stats(router.http).await;
        assert_eq!(s["connections"], 3, "{s}");
        let echo_r = &s["routes"]["/ws/echo"];
        let other_r = &s["routes"]["/ws/other"];
        assert_eq!(echo_r["connections"], 2, "{s}");
        assert_eq!(other_r["connections"], 1, "{s}");
        // In: a 4 echo + 3 bad, b 2 echo; out: 2 welcomes + 6 replies + 3 errors.
        assert_eq!(echo_r["messagesIn"], 9, "{s}");
        assert_eq!(echo_r["messagesOut"], 11, "{s}");
        assert_eq!(echo_r["requests"], 6, "{s}");
        assert_eq!(echo_r["errors"], BAD, "{s}");
        assert_eq!(other_r["messagesIn"], 1, "{s}");
        assert_eq!(other_r["messagesOut"], 2, "{s}");
        assert_eq!(other_r["requests"], 1, "{s}");
        assert_eq!(other_r["errors"], 0, "{s}");
        assert_eq!(s["messagesIn"], 10, "{s}");
        assert_eq!(s["messagesOut"], 13, "{s}");
        assert_eq!(s["totalMessages"], 23, "{s}");
        assert_eq!(s["errors"], BAD, "{s}");
        let rate = s["errorRate"].as_f64().unwrap_or(-1.0);
        assert!(
            (rate - BAD as f64 / 10.0).abs() < 1e-9,
            "errorRate = error frames / client messages = 3/10, got {rate}: {s}"
        );

        assert_eq!(s["endpoints"]["bridge"], router.bridge.as_str(), "{s}");
        assert_eq!(s["endpoints"]["publish"], router.publish.as_str(), "{s}");
        let workers = s["endpoints"]["workers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            workers.iter().any(|w| w["id"] == worker.worker_id.as_str()),
            "the echo worker is a discovered endpoint: {s}"
        );
        let config = &s["config"];
        assert_eq!(config["ok"], true, "{s}");
        assert_eq!(config["error"], Value::Null, "{s}");
        assert_eq!(config["routes"], 2, "{s}");
        assert_eq!(
            config["path"],
            router.routes_file().display().to_string().as_str(),
            "{s}"
        );
        assert_eq!(s["draining"], false, "{s}");

        // The same numbers as /metrics.
        let m = scrape(router.http).await;
        assert_eq!(
            m.sum("router_messages_in_total", &[]),
            10.0,
            "/metrics messages in"
        );
        assert_eq!(m.sum("router_errors_total", &[]), BAD as f64);

        for c in [a, b, o] {
            c.close().await;
        }
        let s = poll_until("/stats connections back to 0", SOON, || async {
            let s = stats(router.http).await;
            if s["connections"] == 0 && s["routes"]["/ws/echo"]["connections"] == 0 {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        })
        .await;
        assert_eq!(s["routes"]["/ws/other"]["connections"], 0, "{s}");
        assert_eq!(s["totalMessages"], 23, "closing sends nothing more: {s}");
    })
    .await;
}

/// `/health`, `/ready`, `/routes`, `/stats`, `/metrics` all answer while
/// clients are connected (HTTP shares the WebSocket port).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoints_answer_beside_websockets() {
    run(LIMIT, async {
        let (router, _worker) = router_and_worker().await;
        let _c = router.client("/ws/echo").await;
        for path in ["/health", "/ready", "/routes", "/stats"] {
            let resp = http_get(router.http, path)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(resp.status, 200, "{path}: {resp:?}");
            let _: Value = resp.json();
        }
        let routes = http_get(router.http, "/routes")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .json();
        let echo = routes["routes"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["path"] == "/ws/echo"))
            .cloned()
            .unwrap_or_else(|| panic!("no /ws/echo in {routes}"));
        assert_eq!(echo["dynamic"], false, "{echo}");
        assert_eq!(echo["breaker"], "closed", "{echo}");
        assert_eq!(echo["connections"], 1, "{echo}");
        scrape(router.http).await;
    })
    .await;
}

/// The parser the tests rely on refuses what is not OpenMetrics, so a
/// malformed `/metrics` cannot pass unnoticed.
#[test]
fn openmetrics_parser_is_strict() {
    let good = "# HELP a_total_x Things.\n# TYPE a_total_x counter\na_total_x_total{route=\"/ws\",code=\"1\"} 3\n\
                # TYPE h histogram\nh_sum 0.5\nh_count 2\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\n\
                # TYPE g gauge\ng 1.5e3\n# EOF\n";
    let s = parse_openmetrics(good).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        s.get("a_total_x_total", &[("route", "/ws"), ("code", "1")]),
        Some(3.0)
    );
    assert_eq!(s.get("g", &[]), Some(1500.0));

    let bad = [
        ("no EOF", "# TYPE g gauge\ng 1\n"),
        ("sample without TYPE", "g 1\n# EOF\n"),
        (
            "counter sample without _total",
            "# TYPE c counter\nc 1\n# EOF\n",
        ),
        (
            "interleaved families",
            "# TYPE a gauge\n# TYPE b gauge\na 1\n# EOF\n",
        ),
        ("value not a number", "# TYPE g gauge\ng one\n# EOF\n"),
        ("unquoted label", "# TYPE g gauge\ng{a=b} 1\n# EOF\n"),
        (
            "unterminated labels",
            "# TYPE g gauge\ng{a=\"b\" 1\n# EOF\n",
        ),
        ("bad label name", "# TYPE g gauge\ng{1a=\"b\"} 1\n# EOF\n"),
        ("duplicate sample", "# TYPE g gauge\ng 1\ng 2\n# EOF\n"),
        (
            "duplicate TYPE",
            "# TYPE g gauge\ng 1\n# TYPE g gauge\n# EOF\n",
        ),
        ("blank line", "# TYPE g gauge\n\ng 1\n# EOF\n"),
        ("unknown type", "# TYPE g thing\ng 1\n# EOF\n"),
        ("stray comment", "# hello\n# EOF\n"),
        ("negative counter", "# TYPE c counter\nc_total -1\n# EOF\n"),
        (
            "non-cumulative buckets",
            "# TYPE h histogram\nh_count 2\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\n# EOF\n",
        ),
        (
            "+Inf bucket != count",
            "# TYPE h histogram\nh_count 3\nh_bucket{le=\"+Inf\"} 2\n# EOF\n",
        ),
        ("text after EOF", "# EOF\ng 1\n"),
        ("two spaces", "# TYPE g gauge\ng  1\n# EOF\n"),
    ];
    for (why, text) in bad {
        assert!(parse_openmetrics(text).is_err(), "{why}: accepted {text:?}");
    }
}
