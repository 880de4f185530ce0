//! Bad input on every side never kills the router and never disappears
//! silently: unknown paths get a JSON 404 with a hint, bad client messages get
//! `bad_request` frames on a connection that stays usable, and garbage on the
//! ZeroMQ bridge is logged and ignored while real workers keep serving.

use std::time::Duration;

use bridge_proto::{encode_from_worker, Bye, ErrorReply, FromWorker, Hello, Reply};
use bytes::Bytes;
use e2e_tests::{default_routes_json, http_get, run, RouterProc, WsClient, RECV_TIMEOUT};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite;
use zeromq::{DealerSocket, Socket, SocketSend, ZmqMessage};

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_path_answers_404_json_with_did_you_mean() {
    run(LIMIT, async {
        let router = RouterProc::start(&default_routes_json(), &[]).await;

        let resp = http_get(router.http, "/ws/visoin")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resp.status, 404, "{resp:?}");
        assert!(
            resp.header("content-type")
                .is_some_and(|c| c.contains("application/json")),
            "{resp:?}"
        );
        let body = resp.json();
        assert_eq!(body["error"], "unknown_route", "{body}");
        assert_eq!(body["path"], "/ws/visoin", "{body}");
        assert_eq!(body["did_you_mean"], "/ws/vision", "{body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );

        // The same refusal for a WebSocket upgrade.
        match WsClient::try_connect(&router.ws_url("/ws/automaton")).await {
            Err(tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), 404);
                let body: Value =
                    serde_json::from_slice(resp.body().as_deref().unwrap_or_default())
                        .unwrap_or_else(|e| panic!("404 body is not JSON: {e}"));
                assert_eq!(body["did_you_mean"], "/ws/automation", "{body}");
            }
            Err(e) => panic!("expected an HTTP 404, got {e}"),
            Ok(_) => panic!("upgrade to an unknown path succeeded"),
        }

        // And the router is still healthy.
        let health = http_get(router.http, "/health")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(health.status, 200);
        assert_eq!(health.json()["status"], "ok");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_bad_request_and_the_connection_stays_usable() {
    run(LIMIT, async {
        let router = RouterProc::start(&default_routes_json(), &[]).await;
        let _w = router.worker("chat_worker", &[], &[]).await;
        let mut c = router.client("/ws").await;

        let bad: [(&str, Option<&str>); 6] = [
            ("{not json", None),
            ("", None),
            ("[1, 2, 3]", None),
            (r#""just a string""#, None),
            (r#"{"id": "no-type", "data": {}}"#, Some("no-type")),
            (
                r#"{"type": 42, "id": "numeric-type"}"#,
                Some("numeric-type"),
            ),
        ];
        for (n, (text, id)) in bad.into_iter().enumerate() {
            c.send_text(text).await;
            let f = c.next_of_type("error", RECV_TIMEOUT).await;
            assert_eq!(f["error"]["code"], "bad_request", "for {text:?}: {f}");
            assert_eq!(f["done"], true, "for {text:?}: {f}");
            assert!(
                f["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "for {text:?}: {f}"
            );
            if let Some(id) = id {
                // When the id could be read, the error says which request it answers.
                assert_eq!(f["id"], id, "for {text:?}: {f}");
            }
            // Still usable: an echo right after works.
            let last = c
                .request_ok("echo", &format!("after-bad-{n}"), json!({"text": text}))
                .await;
            assert_eq!(last["data"], json!({"text": text}));
        }
        c.assert_seq_ok();
    })
    .await;
}

fn frame(bytes: Vec<u8>) -> ZmqMessage {
    ZmqMessage::from(bytes)
}

fn msgpack(v: &Value) -> Vec<u8> {
    rmp_serde::to_vec_named(v).unwrap_or_else(|e| panic!("encodable: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_bridge_is_ignored_and_real_workers_keep_serving() {
    run(LIMIT, async {
        // The rogue registers for its own route's service, so it never gets
        // real work, and /routes shows when the router has read its messages.
        let routes = r#"{"routes": [
            {"path": "/ws/echo", "service": "echo"},
            {"path": "/ws/rogue", "service": "rogue-service"}
        ]}"#;
        let mut router = RouterProc::start(routes, &[]).await;
        let _w = router.worker("echo_worker", &[], &["--id", "honest"]).await;
        let mut c = router.client("/ws/echo").await;
        c.request_ok("echo", "before", json!(1)).await;

        // A stray process that speaks nonsense on the bridge.
        let mut rogue = DealerSocket::new();
        rogue
            .connect(&router.bridge)
            .await
            .unwrap_or_else(|e| panic!("DEALER connect to {}: {e}", router.bridge));
        let hello = |v: u8| {
            msgpack(&json!({
                "v": v, "kind": "hello", "worker_id": "rogue", "services": ["rogue-service"],
                "capacity": 1, "sdk": "e2e-garbage"
            }))
        };
        let garbage: Vec<ZmqMessage> = vec![
            frame(b"\xc1 definitely not msgpack".to_vec()),
            frame(Vec::new()),
            frame(msgpack(&json!([1, 2, 3]))),
            frame(msgpack(&json!({"kind": "hello"}))),
            frame(hello(2)),
            frame(msgpack(&json!({"v": 1, "kind": "no_such_kind"}))),
            frame(msgpack(&json!({"v": 1, "kind": "reply", "cid": 5}))),
            // Multi-frame message where one frame is expected.
            ZmqMessage::try_from(vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")])
                .unwrap_or_else(|e| panic!("{e:?}")),
            // Work messages from a peer that never said hello.
            frame(encode_from_worker(&FromWorker::Reply(Reply {
                cid: "01NOSUCHCID".into(),
                done: true,
                msg_type: None,
                data: json!("forged"),
            }))),
            // Now registered (for another service), then replies for unknown cids.
            frame(encode_from_worker(&FromWorker::Hello(Hello {
                worker_id: "rogue".into(),
                services: vec!["rogue-service".into()],
                capacity: 1,
                sdk: "e2e-garbage".into(),
                msg_types: None,
            }))),
            frame(encode_from_worker(&FromWorker::Reply(Reply {
                cid: "01NOSUCHCID".into(),
                done: false,
                msg_type: Some("forged".into()),
                data: json!("forged"),
            }))),
            frame(encode_from_worker(&FromWorker::Error(ErrorReply {
                cid: "01NOSUCHCID".into(),
                code: "NOT A CODE".into(),
                message: "forged".into(),
                retryable: true,
                retry_after_ms: None,
            }))),
            frame(vec![0xff; 100_000]),
            // Last, a valid goodbye: once /routes shows the rogue gone, the
            // router has read everything before it (one peer, in order).
            frame(encode_from_worker(&FromWorker::Bye(Bye {
                reason: "done with the garbage".into(),
            }))),
        ];
        for m in garbage {
            rogue
                .send(m)
                .await
                .unwrap_or_else(|e| panic!("rogue send: {e}"));
        }
        router.wait_live_workers("rogue-service", 0).await;

        // The honest worker still serves, and nothing forged reached the client.
        for i in 0..5 {
            let last = c
                .request_ok("echo", &format!("after-{i}"), json!({"i": i}))
                .await;
            assert_eq!(last["data"], json!({"i": i}));
        }
        assert!(
            c.backlog().is_empty(),
            "unexpected frames: {:?}",
            c.backlog()
        );
        let health = http_get(router.http, "/health")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(health.status, 200);
        assert!(router.proc.try_status().is_none(), "the router died");
        c.assert_seq_ok();
    })
    .await;
}
