//! `Publisher` against the fake router: a publisher session registers over
//! the bridge endpoint with no services and capacity 0, proves the secret
//! when challenged, and sends `publish` messages; it reconnects after a
//! router restart and tells its caller when it cannot deliver.

mod fake_router;

use std::time::{Duration, Instant};

use bridge_proto::{FromWorker, ToWorker};
use bytes::Bytes;
use fake_router::{FakeRouter, WAIT};
use serde_json::json;
use worker_sdk::config::EnvDefaults;
use worker_sdk::{PublishError, Publisher, PublisherBuilder, State};

const SECRET: &str = "pub-s3cret";

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "worker_sdk=debug".into()),
        )
        .try_init();
}

fn builder(router: &FakeRouter) -> PublisherBuilder {
    init_logs();
    Publisher::builder()
        .env(EnvDefaults::default())
        .endpoint(&router.endpoint)
        .id("test-publisher")
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
}

/// Connects `b` to `router`; returns the publisher and its routing id.
async fn connected(router: &mut FakeRouter, b: PublisherBuilder) -> (Publisher, Bytes) {
    let (publisher, (id, hello)) = tokio::join!(b.connect(), router.handshake(60_000, 3));
    assert_eq!(hello.worker_id, "test-publisher");
    assert!(hello.services.is_empty(), "{:?}", hello.services);
    assert_eq!(hello.capacity, 0);
    (publisher.expect("registered"), id)
}

async fn expect_publish(router: &mut FakeRouter) -> bridge_proto::Publish {
    match router.recv().await.1 {
        FromWorker::Publish(p) => p,
        other => panic!("expected publish, got {other:?}"),
    }
}

#[tokio::test]
async fn registers_with_no_services_proves_the_secret_and_publishes() {
    let mut router = FakeRouter::bind().await.with_secret(SECRET);
    let b = builder(&router).secret(SECRET);
    let (publisher, _) = connected(&mut router, b).await;
    assert_eq!(publisher.status().state, State::Registered);

    publisher
        .publish("room:1", "message", json!({"n": 1}))
        .await
        .unwrap();
    publisher
        .publish("room:2", "other", json!([1, 2]))
        .await
        .unwrap();
    let p = expect_publish(&mut router).await;
    assert_eq!(
        (p.topic.as_str(), p.msg_type.as_str(), p.data),
        ("room:1", "message", json!({"n": 1}))
    );
    let p = expect_publish(&mut router).await;
    assert_eq!((p.topic.as_str(), p.data), ("room:2", json!([1, 2])));

    publisher.close().await;
    assert!(matches!(router.recv().await.1, FromWorker::Bye(_)));
    assert!(!router.ever_received(SECRET.as_bytes()));
}

#[tokio::test]
async fn heartbeats_and_waits_for_a_restarted_router() {
    let mut router = FakeRouter::bind().await;
    let endpoint = router.endpoint.clone();
    let b = builder(&router);
    let (publisher, (first_id, _)) = tokio::join!(b.connect(), router.handshake(100, 3));
    let publisher = publisher.unwrap();
    // A live session heartbeats like a worker.
    loop {
        if router.recv_any().await.1 == FromWorker::Heartbeat {
            break;
        }
    }
    publisher.publish("t", "m", json!(1)).await.unwrap();
    assert_eq!(expect_publish(&mut router).await.data, json!(1));

    // The router restarts on the same port. Once the publisher has noticed
    // (a publication written before that is lost with the old router: the
    // protocol has no acknowledgements), a publish waits for the new session.
    router.close().await;
    let started = Instant::now();
    while publisher.status().state != State::Connecting {
        assert!(started.elapsed() < WAIT, "the lost router went unnoticed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut router = FakeRouter::bind_at(&endpoint).await;
    let (published, (second_id, hello)) = tokio::join!(
        publisher.publish("t", "m", json!(2)),
        router.handshake(60_000, 3)
    );
    published.unwrap();
    assert_ne!(first_id, second_id);
    assert!(hello.services.is_empty());
    assert_eq!(expect_publish(&mut router).await.data, json!(2));
    assert!(publisher.status().registrations >= 2);
}

#[tokio::test]
async fn connecting_to_nothing_fails_within_the_bound() {
    // A port that was just free: nobody listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let started = Instant::now();
    let result = Publisher::builder()
        .env(EnvDefaults::default())
        .endpoint(format!("tcp://127.0.0.1:{port}"))
        .timeout(Duration::from_millis(300))
        .connect()
        .await;
    match result {
        Err(PublishError::NotConnected { waited, .. }) => {
            assert_eq!(waited, Duration::from_millis(300))
        }
        other => panic!("expected NotConnected, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_publish_that_cannot_be_delivered_fails_within_the_bound() {
    let mut router = FakeRouter::bind().await;
    let b = builder(&router).timeout(Duration::from_millis(500));
    let (publisher, id) = connected(&mut router, b).await;
    // The router goes away for good: the session ends, and a publish gives
    // up at its bound.
    router.goodbye(&id, "router shutting down", true).await;
    router.close().await;
    let started = Instant::now();
    let mut result = Ok(());
    // The goodbye may not have been read yet when the first publish goes out.
    for _ in 0..50 {
        result = publisher.publish("t", "m", json!(1)).await;
        if result.is_err() {
            break;
        }
    }
    assert!(
        matches!(result, Err(PublishError::NotConnected { .. })),
        "{result:?}"
    );
    assert!(started.elapsed() < WAIT, "{:?}", started.elapsed());
}

#[tokio::test]
async fn a_publication_over_the_frame_limit_is_refused() {
    let mut router = FakeRouter::bind().await.with_max_frame_bytes(512);
    let b = builder(&router);
    let (publisher, _) = connected(&mut router, b).await;
    let err = publisher
        .publish("t", "m", json!("x".repeat(1000)))
        .await
        .unwrap_err();
    match &err {
        PublishError::TooLarge { size, limit } => assert!(*size > 1000 && *limit == 512),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(
        err.to_string()
            .ends_with("exceeds the router's frame limit of 512 bytes"),
        "{err}"
    );
    publisher.publish("t", "m", json!("small")).await.unwrap();
    assert_eq!(expect_publish(&mut router).await.data, json!("small"));
}

#[tokio::test]
async fn a_wrong_or_missing_secret_is_reported() {
    // Wrong secret: the router's goodbye reason reaches the caller.
    let mut router = FakeRouter::bind().await;
    let b = builder(&router).secret("wrong");
    let refuse = async {
        let (id, _) = router.expect_hello().await;
        let nonce = fake_router::fresh_nonce();
        router.challenge(&id, &nonce).await;
        router.goodbye(&id, "invalid bridge secret", false).await;
    };
    let (result, ()) = tokio::join!(b.connect(), refuse);
    match result {
        Err(PublishError::Refused(reason)) => {
            assert!(reason.contains("invalid bridge secret"), "{reason}")
        }
        other => panic!("expected Refused, got {other:?}"),
    }

    // No secret at all: challenged, it stops with the clear error.
    let mut router = FakeRouter::bind().await;
    let b = builder(&router);
    let challenge = async {
        let (id, _) = router.expect_hello().await;
        let nonce = fake_router::fresh_nonce();
        router
            .send(&id, ToWorker::Challenge(bridge_proto::Challenge { nonce }))
            .await;
    };
    let (result, ()) = tokio::join!(b.connect(), challenge);
    match result {
        Err(PublishError::Refused(reason)) => assert!(
            reason.contains("requires a bridge secret: set BRIDGE_SECRET"),
            "{reason}"
        ),
        other => panic!("expected Refused, got {other:?}"),
    }
}
