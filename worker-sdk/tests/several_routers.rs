//! One worker, several routers (a comma-separated endpoint list), against
//! two fake routers: a session each, answers on the session the request
//! came from, connection messages to the connection's router, publications
//! through the first live router, one capacity shared by all.

mod fake_router;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bridge_proto::{FromWorker, ToWorker};
use bytes::Bytes;
use fake_router::{cid_of, is_terminal, FakeRouter, WAIT};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use worker_sdk::config::EnvDefaults;
use worker_sdk::{State, WorkerBuilder, WorkerHandle};

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "worker_sdk=debug".into()),
        )
        .try_init();
}

fn builder(routers: &[&FakeRouter]) -> WorkerBuilder {
    init_logs();
    let list: Vec<&str> = routers.iter().map(|r| r.endpoint.as_str()).collect();
    worker_sdk::Worker::builder()
        .env(EnvDefaults::default())
        .endpoint(list.join(", "))
        .service("svc")
        .worker_id("multi")
        .linger(Duration::from_millis(10))
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
}

/// A request from connection `conn`.
async fn request(router: &mut FakeRouter, id: &Bytes, cid: &str, conn: &str, t: &str, data: Value) {
    let mut r = fake_router::request(cid, t, data, 30_000);
    r.conn = conn.into();
    router.send(id, ToWorker::Request(r)).await;
}

fn final_data(msg: &FromWorker) -> &Value {
    match msg {
        FromWorker::Reply(r) if r.done => &r.data,
        other => panic!("expected a final reply, got {other:?}"),
    }
}

/// Bounded poll of session `i`'s state (no per-session watch is public).
async fn wait_session(handle: &WorkerHandle, i: usize, want: State) {
    tokio::time::timeout(WAIT, async {
        while handle.router_statuses()[i].1.state != want {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "session {i} never became {want:?}: {:?}",
            handle.router_statuses()
        )
    });
}

#[tokio::test]
async fn each_router_gets_a_session_and_the_answers_of_its_own_requests() {
    let mut a = FakeRouter::bind().await;
    let mut b = FakeRouter::bind().await;
    let endpoint_a = a.endpoint.clone();
    let worker = builder(&[&a, &b])
        .capacity(4)
        .on_request("echo", |_ctx, data| async move { Ok(data) })
        .on_request("join", |ctx, _data| async move {
            ctx.subscribe("room").await?;
            ctx.push("joined", json!({})).await?;
            Ok(json!("in"))
        })
        .on_request("publish", |ctx, data| async move {
            ctx.publish("room", "said", data).await?;
            Ok(json!("published"))
        })
        .build()
        .expect("valid config");
    let handle = worker.handle();
    let task = tokio::spawn(worker.run());

    // One session per router, each told the full capacity.
    let (ida, hello_a) = a.handshake(60_000, 3).await;
    let (idb, hello_b) = b.handshake(60_000, 3).await;
    assert_eq!((hello_a.capacity, hello_b.capacity), (4, 4));
    tokio::time::timeout(WAIT, handle.wait_registrations(2))
        .await
        .unwrap()
        .unwrap();
    let statuses = handle.router_statuses();
    assert_eq!(statuses.len(), 2);
    assert_eq!(statuses[0].0, endpoint_a);
    assert!(
        statuses.iter().all(|(_, s)| s.state == State::Registered),
        "{statuses:?}"
    );

    // Each request is answered on the session it came from.
    request(&mut b, &idb, "b1", "conn-b", "echo", json!("from b")).await;
    request(&mut a, &ida, "a1", "conn-a", "echo", json!("from a")).await;
    assert_eq!(final_data(&b.recv_for("b1").await), &json!("from b"));
    assert_eq!(final_data(&a.recv_for("a1").await), &json!("from a"));

    // A subscription and a push for a connection go to its router, in order
    // with the request's reply.
    request(&mut b, &idb, "b2", "conn-b", "join", json!(null)).await;
    match b.recv().await.1 {
        FromWorker::Subscribe(s) => {
            assert_eq!((s.conn.as_str(), s.topic.as_str()), ("conn-b", "room"))
        }
        other => panic!("expected subscribe, got {other:?}"),
    }
    assert!(matches!(b.recv().await.1, FromWorker::Push(p) if p.conn == "conn-b"));
    assert_eq!(final_data(&b.recv_for("b2").await), &json!("in"));

    // A publication goes through one router: the first live one (a), even
    // for a request that came through b.
    request(&mut b, &idb, "b3", "conn-b", "publish", json!("hi")).await;
    match a.recv().await.1 {
        FromWorker::Publish(p) => assert_eq!((p.topic.as_str(), &p.data), ("room", &json!("hi"))),
        other => panic!("expected the publication on a, got {other:?}"),
    }
    assert_eq!(final_data(&b.recv_for("b3").await), &json!("published"));

    // The worker's own handle finds a connection's router; a connection it
    // never saw gets the push on every router (ids are unique across them).
    handle.push("conn-b", "note", json!(1)).await.unwrap();
    assert!(matches!(b.recv().await.1, FromWorker::Push(p) if p.conn == "conn-b"));
    handle.push("conn-x", "note", json!(2)).await.unwrap();
    assert!(matches!(a.recv().await.1, FromWorker::Push(p) if p.conn == "conn-x"));
    assert!(matches!(b.recv().await.1, FromWorker::Push(p) if p.conn == "conn-x"));
    assert!(
        !a.ever_received(b"conn-b"),
        "a saw a message for b's connection"
    );

    // Router a goes away (as a stopping router does: goodbye, then its
    // socket closes; a killed one is the end-to-end test's): b's session
    // goes on, and publications move to b.
    a.goodbye(&ida, "router shutting down", true).await;
    a.close().await;
    wait_session(&handle, 0, State::Connecting).await;
    assert_eq!(handle.status().state, State::Registered);
    request(&mut b, &idb, "b4", "conn-b", "publish", json!("still")).await;
    assert!(matches!(b.recv().await.1, FromWorker::Publish(p) if p.data == json!("still")));
    assert_eq!(final_data(&b.recv_for("b4").await), &json!("published"));
    request(&mut b, &idb, "b5", "conn-b", "echo", json!(5)).await;
    assert_eq!(final_data(&b.recv_for("b5").await), &json!(5));

    // Router a comes back on the same endpoint: the worker registers again
    // there, and publications go back to it (first in the list).
    let mut a = FakeRouter::bind_at(&endpoint_a).await;
    let (ida, _) = a.handshake(60_000, 3).await;
    tokio::time::timeout(WAIT, handle.wait_registrations(3))
        .await
        .unwrap()
        .unwrap();
    wait_session(&handle, 0, State::Registered).await;
    request(&mut a, &ida, "a2", "conn-a2", "echo", json!("back")).await;
    assert_eq!(final_data(&a.recv_for("a2").await), &json!("back"));
    handle
        .publish("room", "said", json!("again"))
        .await
        .unwrap();
    assert!(matches!(a.recv().await.1, FromWorker::Publish(p) if p.data == json!("again")));

    handle.stop();
    assert!(matches!(a.recv().await.1, FromWorker::Bye(_)));
    assert!(matches!(b.recv().await.1, FromWorker::Bye(_)));
    tokio::time::timeout(WAIT, task)
        .await
        .expect("worker did not stop in time")
        .expect("worker task panicked")
        .unwrap();
}

#[tokio::test]
async fn the_routers_share_the_capacity() {
    let mut a = FakeRouter::bind().await;
    let mut b = FakeRouter::bind().await;
    let current = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (release_tx, release_rx) = watch::channel(false);
    let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
    let (c, p) = (current.clone(), peak.clone());
    let worker = builder(&[&a, &b])
        .capacity(1)
        .on_request("block", move |_ctx, _data| {
            let (current, peak) = (c.clone(), p.clone());
            let mut release = release_rx.clone();
            let started = started_tx.clone();
            async move {
                let now = current.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                let _ = started.send(());
                let _ = release.wait_for(|r| *r).await;
                current.fetch_sub(1, Ordering::SeqCst);
                Ok(json!(now))
            }
        })
        .build()
        .expect("valid config");
    let handle = worker.handle();
    let task = tokio::spawn(worker.run());
    let (ida, _) = a.handshake(60_000, 3).await;
    let (idb, _) = b.handshake(60_000, 3).await;
    tokio::time::timeout(WAIT, handle.wait_registrations(2))
        .await
        .unwrap()
        .unwrap();

    request(&mut a, &ida, "a1", "conn-a", "block", json!(null)).await;
    tokio::time::timeout(WAIT, started.recv())
        .await
        .unwrap()
        .unwrap();
    // b's credit is its own: its request is taken (not refused) and waits
    // for the permit a's request holds. A second one is over b's credit:
    // refused at once, which also proves the first one has arrived.
    request(&mut b, &idb, "b1", "conn-b", "block", json!(null)).await;
    request(&mut b, &idb, "b2", "conn-b", "block", json!(null)).await;
    match b.recv_for("b2").await {
        FromWorker::Error(e) => assert_eq!(e.code, "overloaded"),
        other => panic!("expected overloaded, got {other:?}"),
    }
    assert_eq!(current.load(Ordering::SeqCst), 1);

    release_tx.send_replace(true);
    assert!(is_terminal(&a.recv_for("a1").await));
    let last = b.recv_for("b1").await;
    assert_eq!(cid_of(&last), Some("b1"));
    assert_eq!(final_data(&last), &json!(1), "b1 ran alone");
    assert_eq!(peak.load(Ordering::SeqCst), 1, "peak concurrency");

    handle.stop();
    tokio::time::timeout(WAIT, task)
        .await
        .expect("worker did not stop in time")
        .expect("worker task panicked")
        .unwrap();
}

#[test]
fn a_bad_endpoint_list_names_the_bad_entry() {
    let err = worker_sdk::Worker::builder()
        .env(EnvDefaults::default())
        .service("svc")
        .endpoint("tcp://127.0.0.1:1, tcp://127.0.0.1:1,")
        .build()
        .unwrap_err();
    let text = err.to_string();
    assert_eq!(err.problems.len(), 2, "{text}");
    assert!(text.contains("entry 2"), "{text}");
    assert!(text.contains("entry 3 is empty"), "{text}");
}
