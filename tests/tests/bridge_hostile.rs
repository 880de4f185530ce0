//! The bridge faces untrusted peers (PROTOCOL.md §14). Each test sends the
//! exact input of an attack that once worked against the router, and checks
//! it no longer does: one packet that aborted the process, a routing id that
//! took over another worker's requests, an unauthenticated publication that
//! reached clients. The in-test workers here speak the bridge protocol with
//! the `zeromq` crate directly, so they can do what the SDKs never would.

use std::time::Duration;

use bridge_proto::{
    auth, decode_to_worker, encode_from_worker, encode_from_worker_as, Auth, FromWorker, Hello,
    Reply, ToWorker,
};
use bytes::Bytes;
use e2e_tests::{http_get, run, Endpoints, RouterConfig, RouterProc, RECV_TIMEOUT};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};
use zeromq::{DealerSocket, Socket, SocketOptions, SocketRecv, SocketSend, ZmqMessage};

const LIMIT: Duration = Duration::from_secs(90);
const SECRET: &str = "correct horse battery staple";
const ECHO_ROUTES: &str = r#"{"routes": [{"path": "/ws", "service": "echo"}]}"#;

/// A ZMTP 3.0 greeting with the NULL mechanism, as any peer sends first.
fn zmtp_greeting() -> [u8; 64] {
    let mut g = [0u8; 64];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3; // version 3.0
    g[12..16].copy_from_slice(b"NULL");
    g
}

/// Connects to a `tcp://` endpoint, exchanges greetings, then sends a long
/// frame header claiming 2^60 bytes. Returns whether the connection stayed
/// open afterwards (it must not: the peer broke the frame cap).
async fn send_huge_frame_header(endpoint: &str) -> bool {
    let addr = endpoint.strip_prefix("tcp://").expect("a tcp endpoint");
    let mut s = TcpStream::connect(addr)
        .await
        .expect("connect to the endpoint");
    s.write_all(&zmtp_greeting()).await.unwrap();
    let mut theirs = [0u8; 64];
    tokio::time::timeout(RECV_TIMEOUT, s.read_exact(&mut theirs))
        .await
        .expect("the router's greeting in time")
        .expect("the router's greeting");
    assert_eq!(theirs[0], 0xff, "a ZMTP greeting");
    let mut attack = vec![0x02u8];
    attack.extend_from_slice(&(1u64 << 60).to_be_bytes());
    s.write_all(&attack).await.unwrap();
    // The router closes the connection; whatever it sent before is drained.
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(RECV_TIMEOUT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    closed.is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_header_claiming_2_pow_60_bytes_closes_that_peer_and_nothing_else() {
    run(LIMIT, async {
        let mut router = RouterProc::start_with(
            RouterConfig::new(ECHO_ROUTES).endpoints(Endpoints::tcp_ephemeral()),
        )
        .await;
        assert!(router.publish_bound);
        let _w = router.worker("echo_worker", &["echo"], &[]).await;
        router.wait_live_workers("echo", 1).await;
        for endpoint in [router.bridge.clone(), router.publish.clone()] {
            let still_open = send_huge_frame_header(&endpoint).await;
            assert!(
                !still_open,
                "{endpoint}: the peer over the frame cap is disconnected"
            );
            assert!(
                router.proc.try_status().is_none(),
                "the router died after the attack on {endpoint}"
            );
        }
        let health = http_get(router.http, "/health")
            .await
            .expect("/health answers");
        assert_eq!(health.status, 200);
        // The registered worker was not touched: requests still flow.
        let mut c = router.client("/ws").await;
        let r = c
            .request_ok("echo", "after", json!({"still": "here"}))
            .await;
        assert_eq!(r["data"], json!({"still": "here"}));
    })
    .await;
}

/// A minimal worker over a DEALER with a fixed routing id (which the SDKs
/// never set). It registers (answering the challenge when it has the
/// secret), reports each request it receives on `seen`, and echoes it.
/// Without the secret it only sends heartbeats, like the attacker of the
/// routing-id takeover.
async fn fixed_id_worker(
    bridge: String,
    id: &'static str,
    label: &'static str,
    secret: Option<&'static str>,
    seen: mpsc::UnboundedSender<(&'static str, String)>,
    registered: Option<tokio::sync::oneshot::Sender<()>>,
) {
    let mut opts = SocketOptions::default();
    opts.peer_identity(id.parse().unwrap());
    let mut sock = DealerSocket::with_options(opts);
    sock.connect(&bridge).await.expect("connect the DEALER");
    let send = |m: FromWorker| ZmqMessage::from(Bytes::from(encode_from_worker(&m)));
    if secret.is_some() {
        sock.send(send(FromWorker::Hello(Hello {
            worker_id: id.into(),
            services: vec!["echo".into()],
            capacity: 16,
            sdk: "bridge_hostile".into(),
            msg_types: None,
        })))
        .await
        .unwrap();
    }
    let mut registered = registered;
    let mut beat = tokio::time::interval(Duration::from_millis(100));
    loop {
        let msg = tokio::select! {
            _ = beat.tick() => {
                let _ = sock.send(send(FromWorker::Heartbeat)).await;
                continue;
            }
            m = sock.recv() => match m { Ok(m) => m, Err(_) => return },
        };
        let Some(frame) = msg.get(0) else { continue };
        let Ok(msg) = decode_to_worker(frame) else {
            continue;
        };
        match msg {
            ToWorker::Challenge(c) => {
                let proof = auth::proof(secret.unwrap_or_default().as_bytes(), &c.nonce).to_vec();
                sock.send(send(FromWorker::Auth(Auth { proof })))
                    .await
                    .unwrap();
            }
            ToWorker::Welcome(_) => {
                if let Some(tx) = registered.take() {
                    let _ = tx.send(());
                }
            }
            ToWorker::Request(r) => {
                let _ = seen.send((label, r.cid.clone()));
                let _ = sock
                    .send(send(FromWorker::Reply(Reply {
                        cid: r.cid,
                        done: true,
                        msg_type: None,
                        data: r.data,
                    })))
                    .await;
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_dealer_with_the_same_routing_id_gets_none_of_the_workers_requests() {
    run(LIMIT, async {
        let router =
            RouterProc::start_with(RouterConfig::new(ECHO_ROUTES).env("BRIDGE_SECRET", SECRET))
                .await;
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let (reg_tx, reg_rx) = tokio::sync::oneshot::channel();
        let victim = tokio::spawn(fixed_id_worker(
            router.bridge.clone(),
            "victim",
            "worker",
            Some(SECRET),
            seen_tx.clone(),
            Some(reg_tx),
        ));
        reg_rx.await.expect("the real worker registers");
        // Same routing id, no secret, only heartbeats.
        let attacker = tokio::spawn(fixed_id_worker(
            router.bridge.clone(),
            "victim",
            "attacker",
            None,
            seen_tx,
            None,
        ));
        let mut c = router.client("/ws").await;
        for i in 0..10 {
            let r = c
                .request_ok("echo", &format!("r{i}"), json!({"i": i}))
                .await;
            assert_eq!(r["data"], json!({"i": i}));
        }
        let mut by = Vec::new();
        while let Ok(s) = seen.try_recv() {
            by.push(s.0);
        }
        assert_eq!(by, vec!["worker"; 10], "who received the requests");
        // Checked while both are connected: the victim's closed connection
        // would remove it at once.
        let workers = e2e_tests::routes(router.http).await.unwrap();
        let echo = workers.iter().find(|r| r.service == "echo").unwrap();
        assert_eq!(echo.live_workers, 1, "the attacker never registered");
        victim.abort();
        attacker.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_secret_the_hijacker_is_told_to_say_hello_and_gets_no_request() {
    run(LIMIT, async {
        let router =
            RouterProc::start_with(RouterConfig::new(ECHO_ROUTES).env("BRIDGE_SECRET", SECRET))
                .await;
        let (seen_tx, _seen) = mpsc::unbounded_channel();
        let (reg_tx, reg_rx) = tokio::sync::oneshot::channel();
        let _victim = tokio::spawn(fixed_id_worker(
            router.bridge.clone(),
            "victim",
            "worker",
            Some(SECRET),
            seen_tx,
            Some(reg_tx),
        ));
        reg_rx.await.unwrap();
        // The attacker, written out so the test sees what it receives.
        let mut opts = SocketOptions::default();
        opts.peer_identity("victim".parse().unwrap());
        let mut attacker = DealerSocket::with_options(opts);
        attacker.connect(&router.bridge).await.unwrap();
        let hb = ZmqMessage::from(Bytes::from(encode_from_worker(&FromWorker::Heartbeat)));
        attacker.send(hb).await.unwrap();
        let mut c = router.client("/ws").await;
        for i in 0..10 {
            c.request_ok("echo", &format!("r{i}"), json!(i)).await;
        }
        // Everything the attacker got: a goodbye asking it to say hello, and
        // no request.
        let first = tokio::time::timeout(RECV_TIMEOUT, attacker.recv())
            .await
            .expect("the router answers the unregistered peer")
            .unwrap();
        match decode_to_worker(first.get(0).unwrap()).unwrap() {
            ToWorker::Goodbye(g) => assert!(g.reconnect, "{g:?}"),
            other => panic!("the attacker got {other:?}"),
        }
        let more = tokio::time::timeout(Duration::from_millis(300), attacker.recv()).await;
        if let Ok(Ok(m)) = more {
            let m = decode_to_worker(m.get(0).unwrap()).unwrap();
            assert!(
                !matches!(m, ToWorker::Request(_)),
                "the attacker received a request: {m:?}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_secret_a_v1_hello_and_a_wrong_proof_are_refused() {
    run(LIMIT, async {
        let router =
            RouterProc::start_with(RouterConfig::new(ECHO_ROUTES).env("BRIDGE_SECRET", SECRET))
                .await;
        let hello = FromWorker::Hello(Hello {
            worker_id: "old".into(),
            services: vec!["echo".into()],
            capacity: 1,
            sdk: "v1".into(),
            msg_types: None,
        });
        // A version-1 worker would send the secret in clear: refused,
        // told in version 1 which version is needed.
        let mut old = DealerSocket::new();
        old.connect(&router.bridge).await.unwrap();
        old.send(ZmqMessage::from(Bytes::from(encode_from_worker_as(
            1, &hello,
        ))))
        .await
        .unwrap();
        let m = tokio::time::timeout(RECV_TIMEOUT, old.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            m.get(0).unwrap()[..5],
            [0x84, 0xa1, b'v', 0x01, 0xa4],
            "a v1 frame"
        );
        match decode_to_worker(m.get(0).unwrap()).unwrap() {
            ToWorker::Goodbye(g) => {
                assert!(!g.reconnect);
                assert!(g.reason.contains("version 2"), "{}", g.reason);
            }
            other => panic!("{other:?}"),
        }
        // A version-2 worker with the wrong secret.
        let mut wrong = DealerSocket::new();
        wrong.connect(&router.bridge).await.unwrap();
        wrong
            .send(ZmqMessage::from(Bytes::from(encode_from_worker(&hello))))
            .await
            .unwrap();
        let m = tokio::time::timeout(RECV_TIMEOUT, wrong.recv())
            .await
            .unwrap()
            .unwrap();
        let ToWorker::Challenge(c) = decode_to_worker(m.get(0).unwrap()).unwrap() else {
            panic!("expected a challenge");
        };
        let proof = auth::proof(b"guess", &c.nonce).to_vec();
        wrong
            .send(ZmqMessage::from(Bytes::from(encode_from_worker(
                &FromWorker::Auth(Auth { proof }),
            ))))
            .await
            .unwrap();
        let m = tokio::time::timeout(RECV_TIMEOUT, wrong.recv())
            .await
            .unwrap()
            .unwrap();
        match decode_to_worker(m.get(0).unwrap()).unwrap() {
            ToWorker::Goodbye(g) => {
                assert!(!g.reconnect);
                assert!(!g.reason.contains(SECRET));
            }
            other => panic!("{other:?}"),
        }
        let routes = e2e_tests::routes(router.http).await.unwrap();
        let echo = routes.iter().find(|r| r.service == "echo").unwrap();
        assert_eq!(echo.live_workers, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_secret_nothing_unauthenticated_can_publish() {
    run(LIMIT, async {
        let ep = Endpoints::tcp_fixed();
        let publish_addr = ep.publish.strip_prefix("tcp://").unwrap().to_owned();
        let router = RouterProc::start_with(
            RouterConfig::new(ECHO_ROUTES)
                .endpoints(ep)
                .env("BRIDGE_SECRET", SECRET),
        )
        .await;
        assert!(!router.publish_bound, "no SUB socket with a secret");
        // The attack: a PUB on the publish endpoint. Nothing listens there.
        let refused = TcpStream::connect(&publish_addr).await;
        assert!(
            refused.is_err(),
            "the publish endpoint must not accept connections"
        );

        // The authenticated way: a publisher session (a hello without
        // services) that proved the secret publishes over its DEALER.
        let mut c = router.client("/ws").await;
        c.request_ok("subscribe", "s", json!({"topic": "news"}))
            .await;
        let mut publisher = DealerSocket::new();
        publisher.connect(&router.bridge).await.unwrap();
        let send = |m: &FromWorker| ZmqMessage::from(Bytes::from(encode_from_worker(m)));
        publisher
            .send(send(&FromWorker::Hello(Hello {
                worker_id: "backend".into(),
                services: vec![],
                capacity: 0,
                sdk: "bridge_hostile".into(),
                msg_types: None,
            })))
            .await
            .unwrap();
        let m = tokio::time::timeout(RECV_TIMEOUT, publisher.recv())
            .await
            .unwrap()
            .unwrap();
        let ToWorker::Challenge(ch) = decode_to_worker(m.get(0).unwrap()).unwrap() else {
            panic!("expected a challenge");
        };
        let proof = auth::proof(SECRET.as_bytes(), &ch.nonce).to_vec();
        publisher
            .send(send(&FromWorker::Auth(Auth { proof })))
            .await
            .unwrap();
        let m = tokio::time::timeout(RECV_TIMEOUT, publisher.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(
            decode_to_worker(m.get(0).unwrap()).unwrap(),
            ToWorker::Welcome(_)
        ));
        publisher
            .send(send(&FromWorker::Publish(bridge_proto::Publish {
                topic: "news".into(),
                msg_type: "headline".into(),
                data: json!("authenticated"),
            })))
            .await
            .unwrap();
        let got = c.next_of_type("headline", RECV_TIMEOUT).await;
        assert_eq!(got["data"], "authenticated");
        assert_eq!(got["topic"], "news");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_secret_the_sub_socket_is_bound_only_when_asked_for() {
    run(LIMIT, async {
        let router = RouterProc::start_with(
            RouterConfig::new(ECHO_ROUTES)
                .env("BRIDGE_SECRET", SECRET)
                .env("PUBLISH_UNAUTHENTICATED", "true"),
        )
        .await;
        assert!(router.publish_bound);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_refuses_to_start_with_an_exposed_bridge_and_no_secret() {
    run(LIMIT, async {
        let mut cmd = std::process::Command::new(e2e_tests::router_bin());
        for k in e2e_tests::STACK_ENV {
            cmd.env_remove(k);
        }
        let out = cmd
            .args(["--port", "0", "--bridge-endpoint", "tcp://0.0.0.0:0"])
            .args(["--publish-endpoint", "tcp://127.0.0.1:0"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("BRIDGE_SECRET") && err.contains("0.0.0.0"),
            "{err}"
        );

        // The README's example: the same endpoint with a secret starts, and
        // does not bind the unauthenticated SUB socket.
        let mut open = Endpoints::tcp_ephemeral();
        open.bridge = "tcp://0.0.0.0:0".into();
        let router = RouterProc::start_with(
            RouterConfig::new(ECHO_ROUTES)
                .endpoints(open)
                .env("BRIDGE_SECRET", SECRET),
        )
        .await;
        assert!(
            router.bridge.starts_with("tcp://0.0.0.0:"),
            "{}",
            router.bridge
        );
        assert!(!router.publish_bound);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_worker_never_answers_gives_its_credit_back_after_the_grace() {
    run(LIMIT, async {
        let routes = r#"{"routes": [{"path": "/ws", "service": "echo", "requestTimeoutMs": 300}]}"#;
        let router = RouterProc::start_with(
            RouterConfig::new(routes)
                .env("CANCEL_GRACE_MS", "100")
                .env("ROUTER_HEARTBEAT_MS", "100"),
        )
        .await;
        // Capacity 1; it never answers the request whose data is "undecodable"
        // (as a worker whose MessagePack library refuses it), nor its cancel.
        let mut w = DealerSocket::new();
        w.connect(&router.bridge).await.unwrap();
        let send = |m: &FromWorker| ZmqMessage::from(Bytes::from(encode_from_worker(m)));
        w.send(send(&FromWorker::Hello(Hello {
            worker_id: "stuck".into(),
            services: vec!["echo".into()],
            capacity: 1,
            sdk: "bridge_hostile".into(),
            msg_types: None,
        })))
        .await
        .unwrap();
        let worker = tokio::spawn(async move {
            let mut beat = tokio::time::interval(Duration::from_millis(100));
            loop {
                let m = tokio::select! {
                    _ = beat.tick() => { let _ = w.send(send(&FromWorker::Heartbeat)).await; continue; }
                    m = w.recv() => match m { Ok(m) => m, Err(_) => return },
                };
                match decode_to_worker(m.get(0).unwrap()).unwrap() {
                    ToWorker::Request(r) if r.data == json!("undecodable") => {}
                    ToWorker::Request(r) => {
                        let reply = FromWorker::Reply(Reply {
                            cid: r.cid,
                            done: true,
                            msg_type: None,
                            data: r.data,
                        });
                        let _ = w.send(send(&reply)).await;
                    }
                    // Cancels go unanswered too.
                    _ => {}
                }
            }
        });
        router.wait_live_workers("echo", 1).await;
        let mut c = router.client("/ws").await;
        let first = c.request("echo", "1", json!("undecodable")).await;
        assert_eq!(first.last().unwrap()["error"]["code"], "timeout");
        // The only credit is held by the unanswered request until the grace
        // passes; then the next request is served.
        let second = c.request_ok("echo", "2", json!("fine")).await;
        assert_eq!(second["data"], "fine");
        let metrics = http_get(router.http, "/metrics").await.unwrap();
        assert!(
            metrics.body.contains("router_credits_reclaimed_total 1"),
            "{}",
            metrics.body
        );
        worker.abort();
    })
    .await;
}
