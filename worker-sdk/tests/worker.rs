//! The SDK against a fake router: a real zeromq ROUTER socket played by the
//! test, so the worker's wire behaviour is checked without a router process.

mod fake_router;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bridge_proto::{Connect, Disconnect, FromWorker, Goodbye, RawFrame, ToWorker};
use bytes::Bytes;
use fake_router::{cid_of, is_terminal, FakeRouter, WAIT};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use worker_sdk::config::EnvDefaults;
use worker_sdk::{
    Context, EventContext, Frame, HandlerError, Reply, WorkerBuilder, WorkerError, WorkerHandle,
};

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "worker_sdk=debug".into()),
        )
        .try_init();
}

/// A builder pointed at `router`, isolated from the process environment.
fn builder(router: &FakeRouter) -> WorkerBuilder {
    init_logs();
    worker_sdk::Worker::builder()
        .env(EnvDefaults::default())
        .endpoint(&router.endpoint)
        .service("svc")
        .worker_id("test-worker")
        .linger(Duration::from_millis(10))
}

fn start(b: WorkerBuilder) -> (WorkerHandle, JoinHandle<Result<(), WorkerError>>) {
    let worker = b.build().expect("valid config");
    let handle = worker.handle();
    (handle, tokio::spawn(worker.run()))
}

async fn joined(task: JoinHandle<Result<(), WorkerError>>) -> Result<(), WorkerError> {
    tokio::time::timeout(WAIT, task)
        .await
        .expect("worker did not stop in time")
        .expect("worker task panicked")
}

fn reply_data(msg: &FromWorker) -> (&Value, bool, Option<&str>) {
    match msg {
        FromWorker::Reply(r) => (&r.data, r.done, r.msg_type.as_deref()),
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn error_of(msg: &FromWorker) -> (&str, bool) {
    match msg {
        FromWorker::Error(e) => (&e.code, e.retryable),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Signals when dropped: proves a handler's future was dropped.
struct DropSignal(Option<mpsc::UnboundedSender<&'static str>>, &'static str);

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(self.1);
        }
    }
}

async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("timed out waiting for a test signal")
        .expect("signal channel closed")
}

async fn stream(ctx: Context, data: Value) -> Result<Value, HandlerError> {
    let n = data["n"]
        .as_u64()
        .ok_or_else(|| HandlerError::bad_request("n"))?;
    for i in 0..n {
        ctx.send_partial(json!({ "i": i })).await?;
    }
    Ok(json!({ "n": n }))
}

#[tokio::test]
async fn registers_streams_replies_and_refuses_unknown_types() {
    let mut router = FakeRouter::bind().await;
    let (handle, task) = start(
        builder(&router)
            .capacity(4)
            .secret("s3cret")
            .on_request("stream", stream)
            .on_request("typed", |_ctx, _data| async {
                Ok(Reply::typed("OUTPUT", json!({"ok": true})))
            })
            .on_request("fail", |_ctx, _data| async {
                Err::<Value, _>(
                    HandlerError::new("custom_code", "it failed")
                        .with_retryable(true)
                        .with_retry_after(Duration::from_millis(1500)),
                )
            })
            .on_request("panic", |_ctx, _data| async {
                if true {
                    panic!("handler bug");
                }
                Ok(Value::Null)
            })
            .on_request("ids", |ctx, _data| async move {
                Ok(json!({
                    "cid": ctx.correlation_id(),
                    "conn": ctx.connection_id(),
                    "route": ctx.route(),
                    "service": ctx.service(),
                    "type": ctx.msg_type(),
                    "client_id": ctx.client_id(),
                    "attempt": ctx.attempt(),
                    "deadline_ok": ctx.remaining() > Duration::from_secs(20),
                }))
            }),
    );

    let (id, hello) = router.handshake(60_000, 3).await;
    assert_eq!(hello.worker_id, "test-worker");
    assert_eq!(hello.services, ["svc"]);
    assert_eq!(hello.capacity, 4);
    // The handlers' types, announced (sorted) so the router knows what it routes.
    assert_eq!(
        hello.msg_types.as_deref(),
        Some(&["fail", "ids", "panic", "stream", "typed"].map(String::from)[..])
    );
    assert!(hello.sdk.starts_with("worker-sdk-rust/"), "{}", hello.sdk);
    // A router without a secret welcomes at once; the worker's secret stays home.
    assert!(!router.ever_received(b"s3cret"));
    let status = tokio::time::timeout(WAIT, handle.wait_registered())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.registrations, 1);
    assert_eq!(status.router_id.as_deref(), Some("fake-router"));

    // Streaming: three partials in order, then the final reply.
    router.request(&id, "r1", "stream", json!({"n": 3})).await;
    for i in 0..3 {
        let msg = router.recv_for("r1").await;
        assert_eq!(reply_data(&msg), (&json!({"i": i}), false, None));
    }
    let msg = router.recv_for("r1").await;
    assert_eq!(reply_data(&msg), (&json!({"n": 3}), true, None));

    router.request(&id, "r2", "no_such_type", json!(null)).await;
    match router.recv_for("r2").await {
        FromWorker::Error(e) => assert_eq!(
            (e.code.as_str(), e.message.as_str()),
            (
                "unknown_type",
                "this worker has no handler for requests of type `no_such_type`; \
                 requests it handles: `fail`, `ids`, `panic`, `stream`, `typed`"
            )
        ),
        other => panic!("{other:?}"),
    }

    router.request(&id, "r3", "fail", json!(null)).await;
    match router.recv_for("r3").await {
        FromWorker::Error(e) => {
            assert_eq!(
                (e.code.as_str(), e.message.as_str()),
                ("custom_code", "it failed")
            );
            assert_eq!((e.retryable, e.retry_after_ms), (true, Some(1500)));
        }
        other => panic!("{other:?}"),
    }

    router.request(&id, "r4", "typed", json!(null)).await;
    let msg = router.recv_for("r4").await;
    assert_eq!(
        reply_data(&msg),
        (&json!({"ok": true}), true, Some("OUTPUT"))
    );

    // A panic is answered and the worker carries on.
    router.request(&id, "r5", "panic", json!(null)).await;
    assert_eq!(
        error_of(&router.recv_for("r5").await),
        ("worker_error", false)
    );
    router.request(&id, "r6", "ids", json!(null)).await;
    let msg = router.recv_for("r6").await;
    assert_eq!(
        reply_data(&msg).0,
        &json!({
            "cid": "r6", "conn": "conn-1", "route": "/ws/test", "service": "svc",
            "type": "ids", "client_id": "client-r6", "attempt": 1, "deadline_ok": true,
        })
    );

    handle.stop();
    assert!(matches!(router.recv().await.1, FromWorker::Bye(_)));
    joined(task).await.expect("graceful stop is Ok");
    assert_eq!(handle.status().state, worker_sdk::State::Stopped);
}

#[tokio::test]
async fn cancel_and_deadline_each_get_exactly_one_terminal() {
    let mut router = FakeRouter::bind().await;
    let (events_tx, mut events) = mpsc::unbounded_channel::<&'static str>();
    let tx = events_tx.clone();
    let (handle, task) = start(
        builder(&router)
            .on_request("hang", move |ctx, _data| {
                let tx = tx.clone();
                async move {
                    let _guard = DropSignal(Some(tx.clone()), "dropped");
                    ctx.send_partial(json!("working")).await?;
                    let _ = tx.send("started");
                    std::future::pending::<()>().await;
                    Ok(Value::Null)
                }
            })
            .on_request("echo", |_ctx, data| async move { Ok(data) }),
    );
    let (id, _) = router.handshake(60_000, 3).await;

    router.request(&id, "c1", "hang", json!(null)).await;
    assert!(
        !reply_data(&router.recv_for("c1").await).1,
        "a partial first"
    );
    assert_eq!(next(&mut events).await, "started");
    router.cancel(&id, "c1").await;
    assert_eq!(error_of(&router.recv_for("c1").await), ("cancelled", false));
    assert_eq!(next(&mut events).await, "dropped", "handler future dropped");

    // A second cancel for the finished request is ignored: the next thing
    // the router hears is the answer to a later request, nothing for c1.
    router.cancel(&id, "c1").await;
    router.request(&id, "e1", "echo", json!(1)).await;
    let (_, msg) = router.recv().await;
    assert_eq!(cid_of(&msg), Some("e1"), "stray message {msg:?}");

    // The deadline (receive time + timeout_ms) ends the handler with `timeout`.
    router
        .request_with_timeout(&id, "d1", "hang", json!(null), 100)
        .await;
    assert!(
        !reply_data(&router.recv_for("d1").await).1,
        "a partial first"
    );
    assert_eq!(next(&mut events).await, "started");
    assert_eq!(error_of(&router.recv_for("d1").await), ("timeout", false));
    assert_eq!(next(&mut events).await, "dropped");

    router.cancel(&id, "d1").await;
    router.request(&id, "e2", "echo", json!(2)).await;
    let (_, msg) = router.recv().await;
    assert_eq!(cid_of(&msg), Some("e2"), "stray message {msg:?}");

    handle.stop();
    joined(task).await.unwrap();
}

#[tokio::test]
async fn never_runs_more_handlers_than_capacity() {
    let mut router = FakeRouter::bind().await;
    let current = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (release_tx, release_rx) = watch::channel(false);
    let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
    let (c, p) = (current.clone(), peak.clone());
    let (handle, task) = start(builder(&router).capacity(2).on_request(
        "block",
        move |_ctx, _data| {
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
        },
    ));
    let (id, hello) = router.handshake(60_000, 3).await;
    assert_eq!(hello.capacity, 2);

    // A router that ignores credits: the third request is refused at once.
    for cid in ["b1", "b2", "b3"] {
        router.request(&id, cid, "block", json!(null)).await;
    }
    assert_eq!(error_of(&router.recv_for("b3").await), ("overloaded", true));
    next(&mut started).await;
    next(&mut started).await;
    release_tx.send_replace(true);
    let mut done = Vec::new();
    for _ in 0..2 {
        let (_, msg) = router.recv().await;
        assert!(is_terminal(&msg), "{msg:?}");
        done.push(cid_of(&msg).unwrap().to_owned());
    }
    done.sort();
    assert_eq!(done, ["b1", "b2"]);

    // A router that honours credits sends the next request the moment a
    // terminal arrives; the worker must never see that as over capacity.
    router.request(&id, "k0", "block", json!(null)).await;
    router.request(&id, "k1", "block", json!(null)).await;
    for i in 2..40 {
        let (_, msg) = router.recv().await;
        assert!(
            matches!(msg, FromWorker::Reply(ref r) if r.done),
            "request refused: {msg:?}"
        );
        router
            .request(&id, &format!("k{i}"), "block", json!(null))
            .await;
    }
    for _ in 0..2 {
        let (_, msg) = router.recv().await;
        assert!(matches!(msg, FromWorker::Reply(ref r) if r.done), "{msg:?}");
    }
    assert_eq!(peak.load(Ordering::SeqCst), 2, "peak concurrency");

    handle.stop();
    joined(task).await.unwrap();
}

#[tokio::test]
async fn reregisters_with_a_new_socket_when_the_router_goes_silent() {
    let mut router = FakeRouter::bind().await;
    let (events_tx, mut events) = mpsc::unbounded_channel::<&'static str>();
    let (handle, task) = start(
        builder(&router)
            .on_request("hang", move |_ctx, _data| {
                let tx = events_tx.clone();
                async move {
                    let _guard = DropSignal(Some(tx.clone()), "dropped");
                    let _ = tx.send("started");
                    std::future::pending::<()>().await;
                    Ok(Value::Null)
                }
            })
            .on_request("echo", |_ctx, data| async move { Ok(data) }),
    );
    // heartbeat 100 ms, liveness 3: the worker gives up after 300 ms of
    // silence, and this router never sends a heartbeat.
    let (first_id, _) = router.handshake(100, 3).await;
    router.request(&first_id, "h1", "hang", json!(null)).await;
    assert_eq!(next(&mut events).await, "started");

    let mut heartbeats = 0;
    let second_id = loop {
        match router.recv_any().await {
            (id, FromWorker::Heartbeat) => {
                assert_eq!(id, first_id);
                heartbeats += 1;
            }
            (id, FromWorker::Hello(_)) => break id,
            (_, other) => panic!("unexpected {other:?}"),
        }
    };
    assert!(
        heartbeats >= 1,
        "the worker sent no heartbeat while registered"
    );
    assert_ne!(first_id, second_id, "a new socket has a new identity");
    // The request on the lost socket was abandoned: its handler is dropped.
    assert_eq!(next(&mut events).await, "dropped");

    router.welcome(&second_id, 60_000, 3).await;
    let status = tokio::time::timeout(WAIT, handle.wait_registrations(2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.registrations, 2);
    router
        .request(&second_id, "e1", "echo", json!("again"))
        .await;
    let msg = router.recv_for("e1").await;
    assert_eq!(reply_data(&msg).0, &json!("again"));

    handle.stop();
    joined(task).await.unwrap();
}

#[tokio::test]
async fn reregisters_when_the_router_comes_back_on_the_same_port() {
    let mut router = FakeRouter::bind().await;
    let endpoint = router.endpoint.clone();
    let (handle, task) = start(
        builder(&router)
            .backoff(Duration::from_millis(20), Duration::from_millis(200))
            .on_request("echo", |_ctx, data| async move { Ok(data) }),
    );
    router.handshake(100, 3).await;
    tokio::time::timeout(WAIT, handle.wait_registered())
        .await
        .unwrap()
        .unwrap();
    router.close().await;

    let mut router = FakeRouter::bind_at(&endpoint).await;
    let (id, _) = router.handshake(60_000, 3).await;
    tokio::time::timeout(WAIT, handle.wait_registrations(2))
        .await
        .unwrap()
        .unwrap();
    router.request(&id, "e1", "echo", json!([1, 2])).await;
    assert_eq!(reply_data(&router.recv_for("e1").await).0, &json!([1, 2]));

    handle.stop();
    joined(task).await.unwrap();
}

#[tokio::test]
async fn hello_is_resent_until_welcomed_and_goodbye_false_is_final() {
    let mut router = FakeRouter::bind().await;
    let (handle, task) = start(builder(&router));
    let (first, _) = router.expect_hello().await;
    // No answer: the worker says hello again on the same socket.
    let (second, _) = router.expect_hello().await;
    assert_eq!(first, second);
    router
        .send(
            &second,
            ToWorker::Goodbye(Goodbye {
                reason: "bad secret".into(),
                reconnect: false,
            }),
        )
        .await;
    match joined(task).await {
        Err(WorkerError::Rejected { reason, .. }) => assert_eq!(reason, "bad secret"),
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert_eq!(
        handle.wait_registered().await,
        Err(worker_sdk::SendError::Stopped)
    );
}

#[tokio::test]
async fn goodbye_with_reconnect_makes_a_new_registration() {
    let mut router = FakeRouter::bind().await;
    let (handle, task) = start(builder(&router));
    let (id, _) = router.handshake(60_000, 3).await;
    router
        .send(
            &id,
            ToWorker::Goodbye(Goodbye {
                reason: "router restarting".into(),
                reconnect: true,
            }),
        )
        .await;
    let (id2, _) = router.handshake(60_000, 3).await;
    assert_ne!(id, id2);
    tokio::time::timeout(WAIT, handle.wait_registrations(2))
        .await
        .unwrap()
        .unwrap();
    handle.stop();
    joined(task).await.unwrap();
}

#[tokio::test]
async fn connection_events_are_ordered_and_handles_reach_the_router() {
    let mut router = FakeRouter::bind().await;
    let (gone_tx, mut gone) = mpsc::unbounded_channel::<u16>();
    let (handle, task) = start(
        builder(&router)
            .on_connect(|ev: EventContext, c: Connect| async move {
                let _ = ev.push("welcome", json!({"path": c.path})).await;
            })
            .on_binary(|ev, data: Bytes| async move {
                let _ = ev.push_binary(data).await;
            })
            .on_raw(|ev, frame: Frame| async move {
                let _ = ev.send_raw(frame).await;
            })
            .on_event("note", |ev, data| async move {
                let route = ev.route().to_owned();
                let _ = ev
                    .push("noted", json!({"data": data, "route": route}))
                    .await;
            })
            .on_disconnect(move |_ev, d: Disconnect| {
                let gone = gone_tx.clone();
                async move {
                    let _ = gone.send(d.code);
                }
            })
            .on_request("claims", |ctx, _data| async move {
                Ok(ctx.claims().cloned().unwrap_or(Value::Null))
            }),
    );
    let (id, _) = router.handshake(60_000, 3).await;

    router
        .send(
            &id,
            ToWorker::Connect(Connect {
                conn: "conn-1".into(),
                route: "/ws/test".into(),
                service: "svc".into(),
                path: "/ws/test".into(),
                params: Default::default(),
                query: Default::default(),
                headers: Default::default(),
                remote: "127.0.0.1:1".into(),
                claims: Some(json!({"sub": "alice"})),
                client_cert: None,
            }),
        )
        .await;
    for i in 0..50u8 {
        router
            .send(
                &id,
                ToWorker::Binary(bridge_proto::Binary {
                    conn: "conn-1".into(),
                    route: "/ws/test".into(),
                    service: "svc".into(),
                    data: vec![i; 3],
                }),
            )
            .await;
    }
    router
        .send(
            &id,
            ToWorker::Raw(RawFrame {
                conn: "conn-1".into(),
                binary: false,
                payload: b"raw text".to_vec(),
            }),
        )
        .await;
    router
        .send(
            &id,
            ToWorker::Event(bridge_proto::Event {
                conn: "conn-1".into(),
                route: "/ws/test".into(),
                service: "svc".into(),
                msg_type: "note".into(),
                data: json!("n1"),
            }),
        )
        .await;

    match router.recv().await.1 {
        FromWorker::Push(p) => {
            assert_eq!(
                (p.conn.as_str(), p.msg_type.as_str()),
                ("conn-1", "welcome")
            );
            assert_eq!(p.data, json!({"path": "/ws/test"}));
        }
        other => panic!("expected the connect push, got {other:?}"),
    }
    for i in 0..50u8 {
        match router.recv().await.1 {
            FromWorker::PushBinary(b) => assert_eq!(b.data, vec![i; 3], "frame {i}"),
            other => panic!("expected binary {i}, got {other:?}"),
        }
    }
    match router.recv().await.1 {
        FromWorker::Raw(r) => {
            assert_eq!((r.binary, r.payload.as_slice()), (false, &b"raw text"[..]))
        }
        other => panic!("expected the raw echo, got {other:?}"),
    }
    match router.recv().await.1 {
        FromWorker::Push(p) => {
            assert_eq!(p.msg_type, "noted");
            assert_eq!(p.data, json!({"data": "n1", "route": "/ws/test"}));
        }
        other => panic!("expected the event push, got {other:?}"),
    }

    // Claims from the connect reach the request's context.
    router.request(&id, "q1", "claims", json!(null)).await;
    assert_eq!(
        reply_data(&router.recv_for("q1").await).0,
        &json!({"sub": "alice"})
    );

    // The handle works outside any handler.
    handle.subscribe("conn-1", "room:a").await.unwrap();
    handle
        .publish("room:a", "message", json!({"t": 1}))
        .await
        .unwrap();
    handle.close("conn-1", 4000, "done").await.unwrap();
    match router.recv().await.1 {
        FromWorker::Subscribe(t) => {
            assert_eq!((t.conn.as_str(), t.topic.as_str()), ("conn-1", "room:a"))
        }
        other => panic!("{other:?}"),
    }
    match router.recv().await.1 {
        FromWorker::Publish(p) => {
            assert_eq!(
                (p.topic.as_str(), p.msg_type.as_str()),
                ("room:a", "message")
            );
            assert_eq!(p.data, json!({"t": 1}));
        }
        other => panic!("{other:?}"),
    }
    match router.recv().await.1 {
        FromWorker::Close(c) => assert_eq!((c.conn.as_str(), c.code), ("conn-1", 4000)),
        other => panic!("{other:?}"),
    }

    router
        .send(
            &id,
            ToWorker::Disconnect(Disconnect {
                conn: "conn-1".into(),
                route: "/ws/test".into(),
                service: "svc".into(),
                code: 1000,
                reason: String::new(),
            }),
        )
        .await;
    assert_eq!(next(&mut gone).await, 1000);

    handle.stop();
    joined(task).await.unwrap();
}

#[tokio::test]
async fn stop_says_bye_finishes_in_flight_work_and_refuses_new_work() {
    let mut router = FakeRouter::bind().await;
    let (release_tx, release_rx) = watch::channel(false);
    let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
    let (handle, task) = start(builder(&router).on_request("work", move |_ctx, _data| {
        let mut release = release_rx.clone();
        let started = started_tx.clone();
        async move {
            let _ = started.send(());
            let _ = release.wait_for(|r| *r).await;
            Ok(json!("finished"))
        }
    }));
    let (id, _) = router.handshake(60_000, 3).await;
    router.request(&id, "w1", "work", json!(null)).await;
    next(&mut started).await;

    handle.stop();
    assert!(matches!(router.recv().await.1, FromWorker::Bye(_)));
    assert_eq!(handle.status().state, worker_sdk::State::Stopping);
    // A request that crossed the bye is owed a retryable answer.
    router.request(&id, "w2", "work", json!(null)).await;
    assert_eq!(
        error_of(&router.recv_for("w2").await),
        ("worker_error", true)
    );
    assert!(!task.is_finished(), "stopped before its request finished");

    release_tx.send_replace(true);
    let msg = router.recv_for("w1").await;
    assert_eq!(reply_data(&msg), (&json!("finished"), true, None));
    joined(task).await.unwrap();
}

#[tokio::test]
async fn stop_fails_what_outlives_the_grace_period() {
    let mut router = FakeRouter::bind().await;
    let (handle, task) = start(
        builder(&router)
            .grace_period(Duration::from_millis(200))
            .on_request("hang", |_ctx, _data| async {
                std::future::pending::<()>().await;
                Ok(Value::Null)
            }),
    );
    let (id, _) = router.handshake(60_000, 3).await;
    router.request(&id, "g1", "hang", json!(null)).await;
    // The request is in flight once the worker has had it; a later message
    // on the same socket proves the earlier one was read.
    router.request(&id, "g2", "no_such_type", json!(null)).await;
    assert_eq!(
        error_of(&router.recv_for("g2").await),
        ("unknown_type", false)
    );

    handle.stop();
    assert!(matches!(router.recv().await.1, FromWorker::Bye(_)));
    assert_eq!(
        error_of(&router.recv_for("g1").await),
        ("worker_error", true)
    );
    joined(task).await.unwrap();
}

#[tokio::test]
async fn run_until_stops_when_the_future_completes() {
    let mut router = FakeRouter::bind().await;
    let worker = builder(&router).build().unwrap();
    let handle = worker.handle();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(worker.run_until(async move {
        let _ = stop_rx.await;
    }));
    router.handshake(60_000, 3).await;
    // A stop before the welcome is taken in closes without a bye.
    tokio::time::timeout(WAIT, handle.wait_registered())
        .await
        .unwrap()
        .unwrap();
    stop_tx.send(()).unwrap();
    assert!(matches!(router.recv().await.1, FromWorker::Bye(_)));
    joined(task).await.unwrap();
}

#[tokio::test]
async fn requests_before_the_welcome_are_ignored() {
    let mut router = FakeRouter::bind().await;
    let (handle, task) =
        start(builder(&router).on_request("echo", |_ctx, data| async move { Ok(data) }));
    let (id, _) = router.expect_hello().await;
    // A request before the welcome is not valid yet: it is ignored.
    router.request(&id, "early", "echo", json!(1)).await;
    router.welcome(&id, 60_000, 3).await;
    tokio::time::timeout(WAIT, handle.wait_registered())
        .await
        .unwrap()
        .unwrap();
    router.request(&id, "late", "echo", json!(2)).await;
    loop {
        match router.recv().await.1 {
            // A hello resent before the welcome arrived is fine.
            FromWorker::Hello(_) => continue,
            msg => {
                assert_eq!(
                    cid_of(&msg),
                    Some("late"),
                    "sent before the welcome: {msg:?}"
                );
                break;
            }
        }
    }
    handle.stop();
    joined(task).await.unwrap();
}

#[tokio::test]
async fn an_answer_in_another_protocol_version_is_final() {
    let mut router = FakeRouter::bind().await;
    let (_handle, task) = start(builder(&router));
    let (id, _) = router.expect_hello().await;
    router.send_bytes(&id, goodbye_v3()).await;
    match joined(task).await {
        Err(WorkerError::Rejected { reason, .. }) => {
            assert!(reason.contains("version 3"), "{reason}");
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
}

#[tokio::test]
async fn an_old_router_s_version_1_goodbye_is_shown_and_final() {
    let mut router = FakeRouter::bind().await;
    let (_handle, task) = start(builder(&router));
    let (id, _) = router.expect_hello().await;
    // What a version-1 router answers to a version-2 hello.
    let goodbye = ToWorker::Goodbye(Goodbye {
        reason: "unsupported protocol version 2 (this router speaks 1)".into(),
        reconnect: false,
    });
    router
        .send_bytes(&id, bridge_proto::encode_to_worker_as(1, &goodbye))
        .await;
    match joined(task).await {
        Err(WorkerError::Rejected { reason, .. }) => assert_eq!(
            reason,
            "unsupported protocol version 2 (this router speaks 1)"
        ),
        other => panic!("expected Rejected, got {other:?}"),
    }
}

/// A version-3 goodbye, written by hand as MessagePack (a fixmap of 4).
fn goodbye_v3() -> Vec<u8> {
    fn text(b: &mut Vec<u8>, t: &str) {
        b.push(0xa0 | t.len() as u8);
        b.extend_from_slice(t.as_bytes());
    }
    let mut b = vec![0x84];
    text(&mut b, "v");
    b.push(0x03);
    text(&mut b, "kind");
    text(&mut b, "goodbye");
    text(&mut b, "reason");
    text(&mut b, "v3 only");
    text(&mut b, "reconnect");
    b.push(0xc3);
    b
}

const SECRET: &str = "s3cret-\u{2713}-never-on-the-wire";

#[tokio::test]
async fn the_secret_is_proved_never_sent() {
    let mut router = FakeRouter::bind().await;
    let (handle, task) = start(
        builder(&router)
            .secret(SECRET)
            .on_request("echo", |_ctx, data| async move { Ok(data) }),
    );
    let (id, raw_hello, hello) = router.recv_raw().await;
    assert!(matches!(hello, FromWorker::Hello(_)), "{hello:?}");
    assert!(
        !raw_hello
            .windows(SECRET.len())
            .any(|w| w == SECRET.as_bytes()),
        "the hello carries the secret"
    );

    let nonce = fake_router::fresh_nonce();
    let auth = router.challenge(&id, &nonce).await;
    assert_eq!(
        auth.proof,
        bridge_proto::auth::proof(SECRET.as_bytes(), &nonce).to_vec()
    );
    assert!(bridge_proto::auth::verify(
        SECRET.as_bytes(),
        &nonce,
        &auth.proof
    ));
    // A repeated challenge (the hello was resent before the auth arrived)
    // is answered again, with the same proof.
    let again = router.challenge(&id, &nonce).await;
    assert_eq!(again.proof, auth.proof);

    router.welcome(&id, 60_000, 3).await;
    tokio::time::timeout(WAIT, handle.wait_registered())
        .await
        .unwrap()
        .unwrap();
    router.request(&id, "e1", "echo", json!("in")).await;
    assert_eq!(reply_data(&router.recv_for("e1").await).0, &json!("in"));
    handle.stop();
    assert!(matches!(router.recv().await.1, FromWorker::Bye(_)));
    joined(task).await.unwrap();
    assert!(
        !router.ever_received(SECRET.as_bytes()),
        "the secret crossed the wire"
    );
}

#[tokio::test]
async fn the_fake_router_s_secret_handshake_registers_the_worker() {
    let mut router = FakeRouter::bind().await.with_secret(SECRET);
    let (handle, task) = start(builder(&router).secret(SECRET));
    router.handshake(60_000, 3).await;
    tokio::time::timeout(WAIT, handle.wait_registered())
        .await
        .unwrap()
        .unwrap();
    handle.stop();
    joined(task).await.unwrap();
}

#[tokio::test]
async fn a_challenge_without_a_secret_stops_the_worker_with_a_clear_error() {
    let mut router = FakeRouter::bind().await;
    let (_handle, task) = start(builder(&router));
    let (id, _) = router.expect_hello().await;
    router
        .send(
            &id,
            ToWorker::Challenge(bridge_proto::Challenge {
                nonce: fake_router::fresh_nonce(),
            }),
        )
        .await;
    let err = joined(task).await.unwrap_err();
    assert!(
        matches!(&err, WorkerError::SecretRequired { endpoint } if *endpoint == router.endpoint),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("requires a bridge secret: set BRIDGE_SECRET"),
        "{text}"
    );
}

#[tokio::test]
async fn a_wrong_secret_is_refused_for_good() {
    let mut router = FakeRouter::bind().await;
    let (_handle, task) = start(builder(&router).secret("wrong"));
    let (id, _) = router.expect_hello().await;
    let nonce = fake_router::fresh_nonce();
    let auth = router.challenge(&id, &nonce).await;
    assert!(!bridge_proto::auth::verify(
        SECRET.as_bytes(),
        &nonce,
        &auth.proof
    ));
    router.goodbye(&id, "invalid bridge secret", false).await;
    match joined(task).await {
        Err(WorkerError::Rejected { reason, .. }) => assert_eq!(reason, "invalid bridge secret"),
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert!(!router.ever_received(b"wrong"));
}

#[tokio::test]
async fn replies_over_the_frame_limit_become_payload_too_large() {
    const LIMIT: u64 = 1024;
    let mut router = FakeRouter::bind().await.with_max_frame_bytes(LIMIT);
    let big = || json!("x".repeat(2000));
    let (events_tx, mut events) = mpsc::unbounded_channel::<&'static str>();
    let (handle, task) = start(
        builder(&router)
            .on_request("big", move |_ctx, _data| async move { Ok(big()) })
            .on_request("big_partial", move |ctx, _data| {
                let tx = events_tx.clone();
                async move {
                    let _guard = DropSignal(Some(tx), "dropped");
                    ctx.send_partial(json!("small")).await?;
                    let refused = ctx.send_partial(big()).await;
                    // The SDK already answered and cancels this handler; were
                    // it still running, none of this may reach the router.
                    let _ = ctx.send_partial(json!("after")).await;
                    std::future::pending::<()>().await;
                    Ok(json!({ "refused": refused.is_err() }))
                }
            })
            .on_request("push_big", move |ctx, _data| async move {
                let e = ctx.push("big", big()).await.unwrap_err();
                Ok(json!({ "error": e.to_string() }))
            })
            .on_request("echo", |_ctx, data| async move { Ok(data) }),
    );
    let (id, _) = router.handshake(60_000, 3).await;
    let status = tokio::time::timeout(WAIT, handle.wait_registered())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.max_frame_bytes, Some(LIMIT));

    let too_large = |msg: &FromWorker| match msg {
        FromWorker::Error(e) => {
            assert_eq!((e.code.as_str(), e.retryable), ("payload_too_large", false));
            assert!(
                e.message.starts_with("reply of ")
                    && e.message
                        .ends_with(" bytes exceeds the router's frame limit of 1024 bytes"),
                "{}",
                e.message
            );
        }
        other => panic!("expected payload_too_large, got {other:?}"),
    };
    router.request(&id, "b1", "big", json!(null)).await;
    too_large(&router.recv_for("b1").await);

    router.request(&id, "b2", "big_partial", json!(null)).await;
    assert_eq!(
        reply_data(&router.recv_for("b2").await),
        (&json!("small"), false, None)
    );
    too_large(&router.recv_for("b2").await);
    assert_eq!(next(&mut events).await, "dropped", "the handler is stopped");
    // Nothing more for b2: the next message is the answer to a later request.
    router.request(&id, "e1", "echo", json!(1)).await;
    let (_, msg) = router.recv().await;
    assert_eq!(cid_of(&msg), Some("e1"), "stray message {msg:?}");

    // A push over the limit is refused to its caller, never sent.
    router.request(&id, "p1", "push_big", json!(null)).await;
    let msg = router.recv_for("p1").await;
    let text = reply_data(&msg).0["error"].as_str().unwrap().to_owned();
    assert!(
        text.contains("exceeds the router's frame limit of 1024 bytes"),
        "{text}"
    );
    let err = handle
        .publish("t", "m", json!("y".repeat(2000)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, worker_sdk::SendError::TooLarge { limit: LIMIT, .. }),
        "{err:?}"
    );
    // Small messages still pass.
    handle.publish("t", "m", json!(1)).await.unwrap();
    assert!(matches!(router.recv().await.1, FromWorker::Publish(_)));

    handle.stop();
    joined(task).await.unwrap();
    assert!(
        router.received.iter().all(|f| f.len() as u64 <= LIMIT),
        "a frame over the limit was sent"
    );
}

/// A request map written by hand: `fixmap(n)` of `v: 2`, `kind: request`,
/// `cid`, then `extra` (already encoded key/value pairs).
fn raw_request(cid: &str, extra_pairs: u8, extra: &[u8]) -> Vec<u8> {
    fn text(b: &mut Vec<u8>, t: &str) {
        b.push(0xa0 | t.len() as u8);
        b.extend_from_slice(t.as_bytes());
    }
    let mut b = vec![0x80 | (3 + extra_pairs)];
    text(&mut b, "v");
    b.push(0x02);
    text(&mut b, "kind");
    text(&mut b, "request");
    text(&mut b, "cid");
    text(&mut b, cid);
    b.extend_from_slice(extra);
    b
}

#[tokio::test]
async fn an_undecodable_request_with_a_readable_cid_gets_bad_request() {
    let mut router = FakeRouter::bind().await;
    let (handle, task) =
        start(builder(&router).on_request("echo", |_ctx, data| async move { Ok(data) }));
    let (id, _) = router.handshake(60_000, 3).await;

    // Most fields missing.
    router.send_bytes(&id, raw_request("u1", 0, &[])).await;
    match router.recv_for("u1").await {
        FromWorker::Error(e) => {
            assert_eq!((e.code.as_str(), e.retryable), ("bad_request", false));
            assert!(
                e.message.starts_with("the request could not be decoded: "),
                "{}",
                e.message
            );
        }
        other => panic!("expected bad_request, got {other:?}"),
    }
    // `data` holding a MessagePack bin, which has no JSON form.
    let mut full = bridge_proto::encode_to_worker(&ToWorker::Request(fake_router::request(
        "u2",
        "echo",
        json!("placeholder"),
        30_000,
    )));
    let placeholder = b"\xabplaceholder";
    let at = full
        .windows(placeholder.len())
        .position(|w| w == placeholder)
        .unwrap();
    full.splice(at..at + placeholder.len(), [0xc4, 0x01, 0x00]);
    assert!(bridge_proto::decode_to_worker(&full).is_err());
    router.send_bytes(&id, full).await;
    match router.recv_for("u2").await {
        FromWorker::Error(e) => assert_eq!(e.code, "bad_request"),
        other => panic!("expected bad_request, got {other:?}"),
    }
    // Without a readable cid there is nothing to answer: dropped.
    router.send_bytes(&id, vec![0xc1]).await;
    let mut cid_int = raw_request("x", 0, &[]);
    let at = cid_int.len() - 2; // "x" as fixstr(1)
    cid_int.truncate(at);
    cid_int.push(0x07);
    router.send_bytes(&id, cid_int).await;
    router.request(&id, "e1", "echo", json!(1)).await;
    let (_, msg) = router.recv().await;
    assert_eq!(cid_of(&msg), Some("e1"), "stray message {msg:?}");

    handle.stop();
    joined(task).await.unwrap();
}

#[tokio::test]
async fn nothing_is_sent_for_a_cancelled_request_after_its_terminal() {
    let mut router = FakeRouter::bind().await;
    let (events_tx, mut events) = mpsc::unbounded_channel::<&'static str>();
    let (handle, task) = start(
        builder(&router)
            .on_request("stubborn", move |ctx, _data| {
                let tx = events_tx.clone();
                async move {
                    // Work that ignores the cancellation and keeps streaming.
                    let ctx2 = ctx.clone();
                    tokio::spawn(async move {
                        for i in 0..20 {
                            let _ = ctx2.send_partial(json!(i)).await;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        let _ = tx.send("spawned work done");
                    });
                    std::future::pending::<()>().await;
                    Ok(Value::Null)
                }
            })
            .on_request("echo", |_ctx, data| async move { Ok(data) }),
    );
    let (id, _) = router.handshake(60_000, 3).await;
    router.request(&id, "s1", "stubborn", json!(null)).await;
    assert_eq!(
        reply_data(&router.recv_for("s1").await),
        (&json!(0), false, None)
    );
    router.cancel(&id, "s1").await;
    loop {
        // Partials that were on their way before the cancel may still come.
        let msg = router.recv_for("s1").await;
        if is_terminal(&msg) {
            assert_eq!(error_of(&msg), ("cancelled", false));
            break;
        }
    }
    assert_eq!(next(&mut events).await, "spawned work done");
    router.request(&id, "e1", "echo", json!(1)).await;
    let (_, msg) = router.recv().await;
    assert_eq!(cid_of(&msg), Some("e1"), "late message {msg:?}");
    handle.stop();
    joined(task).await.unwrap();
}

/// A fire-and-forget message nobody handles, and a binary frame on a worker
/// without a binary handler, are answered (a `push` of type `error`, which
/// the router turns into an error frame without `id`), not dropped.
#[tokio::test]
async fn messages_without_a_handler_are_answered_with_an_error_push() {
    let mut router = FakeRouter::bind().await;
    let (handle, task) =
        start(builder(&router).on_request("ask", |_ctx, data| async move { Ok(data) }));
    let (id, hello) = router.handshake(60_000, 3).await;
    assert_eq!(hello.msg_types, Some(vec!["ask".to_owned()]));
    let event = |msg_type: &str| {
        ToWorker::Event(bridge_proto::Event {
            conn: "conn-1".into(),
            route: "/ws/test".into(),
            service: "svc".into(),
            msg_type: msg_type.into(),
            data: Value::Null,
        })
    };
    router.send(&id, event("ask")).await;
    router
        .send(
            &id,
            ToWorker::Binary(bridge_proto::Binary {
                conn: "conn-1".into(),
                route: "/ws/test".into(),
                service: "svc".into(),
                data: vec![1, 2, 3],
            }),
        )
        .await;
    let mut answers = Vec::new();
    for _ in 0..2 {
        match router.recv().await.1 {
            FromWorker::Push(p) => {
                assert_eq!((p.conn.as_str(), p.msg_type.as_str()), ("conn-1", "error"));
                answers.push(p.data);
            }
            other => panic!("expected an error push, got {other:?}"),
        }
    }
    assert_eq!(
        answers,
        [
            json!({"code": "unknown_type", "message":
                "this worker has no handler for fire-and-forget messages of type `ask`; \
                 fire-and-forget messages it handles: none; `ask` is handled as a request (send it with an `id`)"}),
            json!({"code": "unknown_type", "message": "this worker has no handler for binary frames"}),
        ],
        "in the order the messages came"
    );
    handle.stop();
    joined(task).await.expect("graceful stop is Ok");
}

#[test]
fn handler_types_no_client_could_send_are_refused_at_build() {
    let err = worker_sdk::Worker::builder()
        .env(EnvDefaults::default())
        .service("svc")
        .on_request("", |_ctx, data| async move { Ok(data) })
        .on_event("t".repeat(129), |_ev, _data| async {})
        .build()
        .unwrap_err();
    assert_eq!(err.problems.len(), 2, "{err}");
    assert!(err.to_string().contains("1 to 128 bytes"), "{err}");
}
