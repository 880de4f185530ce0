//! `Publisher` against a real SUB socket bound the way the router binds its
//! publication endpoint, including a "router restart" on the same port.

use std::time::Duration;

use bridge_proto::decode_publication;
use serde_json::json;
use worker_sdk::Publisher;
use zeromq::{Socket, SocketRecv, SubSocket};

/// Publishes until the subscriber gets one: a PUB socket drops what it is
/// given until the SUB's subscription has reached it (the slow joiner), so
/// a first publication may be lost. Bounded at 200 rounds of 50 ms.
async fn publish_until_received(
    publisher: &mut Publisher,
    sub: &mut SubSocket,
    round: u64,
) -> (String, bridge_proto::Publication) {
    for _ in 0..200 {
        // A publish may fail while the router is away; the next one retries.
        let _ = publisher
            .publish("room:1", "message", json!({ "round": round }))
            .await;
        if let Ok(received) = tokio::time::timeout(Duration::from_millis(50), sub.recv()).await {
            let frames = received.expect("sub recv").into_vec();
            assert_eq!(frames.len(), 2, "[topic, payload]");
            let topic = String::from_utf8(frames[0].to_vec()).expect("UTF-8 topic");
            let publication = decode_publication(&frames[1]).expect("valid publication");
            return (topic, publication);
        }
    }
    panic!("nothing received after 200 publications");
}

async fn bound_sub(endpoint: &str) -> (SubSocket, String) {
    let mut sub = SubSocket::new();
    let bound = sub.bind(endpoint).await.expect("bind SUB");
    sub.subscribe("").await.expect("subscribe to everything");
    (sub, bound.to_string())
}

#[tokio::test]
async fn publishes_and_reconnects_after_the_router_comes_back() {
    let (mut sub, endpoint) = bound_sub("tcp://127.0.0.1:0").await;
    let mut publisher = Publisher::connect(&endpoint).await.expect("connect");

    let (topic, p) = publish_until_received(&mut publisher, &mut sub, 1).await;
    assert_eq!(topic, "room:1");
    assert_eq!(p.msg_type, "message");
    assert_eq!(p.data, json!({"round": 1}));

    // The router restarts: its SUB socket goes away and comes back on the
    // same port. The zeromq PUB socket would not reconnect by itself.
    let errors = sub.close().await;
    assert!(errors.is_empty(), "{errors:?}");
    let (mut sub, _) = bound_sub(&endpoint).await;
    let (_, p) = publish_until_received(&mut publisher, &mut sub, 2).await;
    assert_eq!(p.data, json!({"round": 2}));
}

#[tokio::test]
async fn connecting_to_nothing_fails_within_the_bound() {
    // A port that was just free: nobody listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let started = std::time::Instant::now();
    let result = Publisher::connect_with_timeout(
        format!("tcp://127.0.0.1:{port}"),
        Duration::from_millis(300),
    )
    .await;
    assert!(result.is_err(), "connected to nothing");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
