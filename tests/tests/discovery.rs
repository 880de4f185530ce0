//! What a route accepts, and what goes nowhere (README: client protocol,
//! `/routes`; PROTOCOL.md `hello.msg_types`): workers announce their message
//! types, `/routes` shows them with the route's `allowedTypes`, a worker
//! older than the announcement still registers (its route's types are then
//! unknown and nothing is refused on its behalf), and a worker whose service
//! no route uses is warned about in the log and in `/routes`.

use std::time::Duration;

use bridge_proto::{decode_to_worker, encode_from_worker, FromWorker, Hello, ToWorker};
use bytes::Bytes;
use e2e_tests::{default_routes_json, http_get, routes, run, RouterProc, RECV_TIMEOUT};
use serde_json::{json, Value};
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

const LIMIT: Duration = Duration::from_secs(60);
const LOG: [(&str, &str); 2] = [("RUST_LOG", "info"), ("LOG_FORMAT", "text")];

async fn routes_json(router: &RouterProc) -> Value {
    http_get(router.http, "/routes")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_show_the_announced_types_and_the_allowed_ones() {
    run(LIMIT, async {
        let file = json!({"routes": [
            {"path": "/ws", "service": "chat", "allowedTypes": ["say", "echo"],
             "pythonModule": "examples.chat_worker"}
        ]});
        let router = RouterProc::start(&file.to_string(), &[]).await;
        let before = routes_json(&router).await;
        let route = &before["routes"][0];
        assert_eq!(route["types"], json!([]), "no live worker yet: {route}");
        assert_eq!(route["allowed_types"], json!(["echo", "say"]), "{route}");
        assert_eq!(route["python_module"], "examples.chat_worker", "{route}");

        let _chat = router.worker("chat_worker", &[], &[]).await;
        let info = router.wait_live_workers("chat", 1).await;
        assert_eq!(info.raw["types"], json!(["echo", "join", "leave", "say"]));
        assert_eq!(
            info.raw["workers"][0]["types"],
            json!(["echo", "join", "leave", "say"])
        );

        // The route's allowedTypes refusal names what the route accepts.
        let mut c = router.client("/ws").await;
        let refused = c.request("join", "j", json!({"room": "r"})).await;
        assert_eq!(
            refused[0]["error"]["message"],
            "/ws does not handle messages of type `join`; it accepts `echo`, `say`"
        );
    })
    .await;
}

/// A worker that speaks the protocol without `msg_types` (one older than the
/// field): it registers, `/routes` cannot say what its route accepts, and
/// the router forwards every type to it rather than refusing on a guess.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_worker_without_msg_types_registers_and_gets_every_type() {
    run(LIMIT, async {
        let router = RouterProc::start(&default_routes_json(), &[]).await;
        let mut dealer = DealerSocket::new();
        dealer.connect(&router.bridge).await.expect("connect");
        let frame = |m: FromWorker| ZmqMessage::from(Bytes::from(encode_from_worker(&m)));
        let hello = FromWorker::Hello(Hello {
            worker_id: "older".into(),
            services: vec!["chat".into()],
            capacity: 1,
            sdk: "older-than-msg-types/1".into(),
            msg_types: None,
        });
        dealer.send(frame(hello)).await.expect("hello");
        let info = router.wait_live_workers("chat", 1).await;
        assert_eq!(info.raw["types"], Value::Null, "{}", info.raw);
        assert_eq!(info.raw["workers"][0]["types"], Value::Null);

        let mut c = router.client("/ws").await;
        c.send_json(&json!({"type": "anything", "data": 1})).await;
        let event = tokio::time::timeout(RECV_TIMEOUT, async {
            loop {
                let m = dealer.recv().await.expect("recv");
                let Some(payload) = m.get(0) else { continue };
                match decode_to_worker(payload) {
                    Ok(ToWorker::Event(e)) => return e,
                    Ok(ToWorker::Heartbeat) => {
                        dealer
                            .send(frame(FromWorker::Heartbeat))
                            .await
                            .expect("beat");
                    }
                    _ => {}
                }
            }
        })
        .await
        .expect("the event reaches the worker");
        assert_eq!(
            (event.msg_type.as_str(), &event.data),
            ("anything", &json!(1))
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_service_no_route_uses_is_warned_about() {
    run(LIMIT, async {
        let router = RouterProc::start(&default_routes_json(), &LOG).await;
        let typo = router.worker("vision_worker", &["visoin"], &[]).await;
        let line = router
            .proc
            .stderr
            .wait_line("the warning", RECV_TIMEOUT, |l| {
                l.contains("WARN") && l.contains("no route uses service `visoin`")
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(line.contains("did you mean `vision`?"), "{line}");
        assert!(line.contains(&typo.worker_id), "names the worker: {line}");

        let warnings = routes_json(&router).await["warnings"].clone();
        assert_eq!(
            warnings,
            json!([{
                "worker": typo.worker_id,
                "service": "visoin",
                "message": "no route uses service `visoin`, so this worker gets no traffic \
                            (the routes use `automation`, `chat`, `vision`, `voice`); did you mean `vision`?",
            }])
        );
        // A worker whose service is routed adds no warning.
        let _vision = router.worker("vision_worker", &[], &[]).await;
        let all = routes(router.http).await.expect("routes");
        assert!(all.iter().any(|r| r.service == "vision" && r.live_workers == 1));
        assert_eq!(routes_json(&router).await["warnings"].as_array().map(Vec::len), Some(1));
    })
    .await;
}
