//! The example workers as processes, against the fake router: their flags,
//! their one `registered` stdout line, their behaviours from the team
//! contract, and a graceful stop with exit status 0 on SIGTERM.
//!
//! `cargo test` builds the examples before running this; with a narrower
//! target selection, build them first (`cargo build -p worker-sdk --examples`).

mod fake_router;

use std::path::PathBuf;
use std::process::Stdio;

use bridge_proto::{Binary, Event, FromWorker, Hello, RawFrame, ToWorker};
use bytes::Bytes;
use fake_router::{cid_of, FakeRouter, WAIT};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

fn example_path(name: &str) -> PathBuf {
    // This test runs from <target>/<profile>/deps/; examples sit in
    // <target>/<profile>/examples/.
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in <target>/<profile>/deps");
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.is_file(),
        "{} not built: run `cargo build -p worker-sdk --examples`",
        path.display()
    );
    path
}

struct Running {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    id: Bytes,
    hello: Hello,
}

/// Starts example `name` against `router`, welcomes it and checks its
/// `registered` line.
async fn start(name: &str, router: &mut FakeRouter, extra: &[&str]) -> Running {
    let mut child = Command::new(example_path(name))
        .arg("--bridge-endpoint")
        .arg(&router.endpoint)
        .args(extra)
        .env_remove("BRIDGE_ENDPOINT")
        .env_remove("PUBLISH_ENDPOINT")
        .env_remove("BRIDGE_SECRET")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn example");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let (id, hello) = router.handshake(60_000, 3).await;
    let line = tokio::time::timeout(WAIT, stdout.next_line())
        .await
        .expect("no registered line in time")
        .expect("read stdout")
        .expect("stdout ended before the registered line");
    let v: Value = serde_json::from_str(&line).expect("registered line is JSON");
    assert_eq!(
        v,
        json!({"event": "registered", "worker_id": hello.worker_id, "services": hello.services}),
    );
    Running {
        child,
        stdout,
        id,
        hello,
    }
}

/// SIGTERM: the worker says bye, exits 0, and printed nothing else on stdout.
async fn stop(mut running: Running, router: &mut FakeRouter) {
    let pid = running.child.id().expect("child still running");
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await
        .expect("run kill");
    assert!(status.success());
    assert!(matches!(router.recv().await.1, FromWorker::Bye(_)));
    let status = tokio::time::timeout(WAIT, running.child.wait())
        .await
        .expect("example did not exit in time")
        .expect("wait for example");
    assert!(status.success(), "exit status {status:?}");
    let rest = tokio::time::timeout(WAIT, running.stdout.next_line())
        .await
        .expect("stdout not closed")
        .expect("read stdout");
    assert_eq!(rest, None, "stdout must hold only the registered line");
}

fn reply(msg: FromWorker) -> (Value, bool, Option<String>) {
    match msg {
        FromWorker::Reply(r) => (r.data, r.done, r.msg_type),
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn binary(data: &[u8]) -> ToWorker {
    ToWorker::Binary(Binary {
        conn: "conn-1".into(),
        route: "/ws/test".into(),
        service: "svc".into(),
        data: data.to_vec(),
    })
}

#[tokio::test]
async fn echo_worker() {
    let mut router = FakeRouter::bind().await;
    let r = start(
        "echo_worker",
        &mut router,
        &["--id", "echo-1", "--capacity", "5"],
    )
    .await;
    assert_eq!(
        (r.hello.worker_id.as_str(), r.hello.capacity),
        ("echo-1", 5)
    );
    assert_eq!(r.hello.services, ["echo"]);
    let id = r.id.clone();

    let data = json!({"nested": [1, "two", {"three": null}], "n": 1.5});
    router.request(&id, "e", "echo", data.clone()).await;
    assert_eq!(reply(router.recv_for("e").await), (data, true, None));

    router.request(&id, "s", "stream", json!({"n": 3})).await;
    for i in 0..3 {
        assert_eq!(
            reply(router.recv_for("s").await),
            (json!({"i": i}), false, None)
        );
    }
    assert_eq!(
        reply(router.recv_for("s").await),
        (json!({"n": 3}), true, None)
    );

    router.request(&id, "sl", "slow", json!({"ms": 20})).await;
    assert_eq!(
        reply(router.recv_for("sl").await).0,
        json!({"slept_ms": 20})
    );
    router
        .request(&id, "sc", "slow", json!({"ms": 60_000}))
        .await;
    router.cancel(&id, "sc").await;
    match router.recv_for("sc").await {
        FromWorker::Error(e) => assert_eq!(e.code, "cancelled"),
        other => panic!("{other:?}"),
    }

    router
        .request(
            &id,
            "f",
            "fail",
            json!({"code": "my_code", "message": "nope"}),
        )
        .await;
    match router.recv_for("f").await {
        FromWorker::Error(e) => {
            assert_eq!((e.code.as_str(), e.message.as_str()), ("my_code", "nope"))
        }
        other => panic!("{other:?}"),
    }

    router.request(&id, "p", "push", json!({"n": 2})).await;
    for i in 0..2 {
        match router.recv().await.1 {
            FromWorker::Push(p) => {
                assert_eq!((p.conn.as_str(), p.msg_type.as_str()), ("conn-1", "push"));
                assert_eq!(p.data, json!({"i": i}));
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(reply(router.recv_for("p").await).0, json!({"pushed": 2}));

    router
        .request(
            &id,
            "pub",
            "publish",
            json!({"topic": "t1", "data": {"x": 1}}),
        )
        .await;
    match router.recv().await.1 {
        FromWorker::Publish(p) => assert_eq!((p.topic.as_str(), p.data), ("t1", json!({"x": 1}))),
        other => panic!("{other:?}"),
    }
    assert!(reply(router.recv_for("pub").await).1);

    router.request(&id, "w", "whoami", json!(null)).await;
    assert_eq!(
        reply(router.recv_for("w").await).0,
        json!({"worker_id": "echo-1"})
    );

    router
        .request(&id, "c", "close", json!({"code": 4001}))
        .await;
    match router.recv().await.1 {
        FromWorker::Close(c) => assert_eq!((c.conn.as_str(), c.code), ("conn-1", 4001)),
        other => panic!("{other:?}"),
    }
    assert!(reply(router.recv_for("c").await).1);

    router.send(&id, binary(&[0, 159, 146, 150])).await;
    match router.recv().await.1 {
        FromWorker::PushBinary(b) => assert_eq!(b.data, [0, 159, 146, 150]),
        other => panic!("{other:?}"),
    }
    for (is_binary, payload) in [(false, "héllo".as_bytes()), (true, &[1u8, 2, 3][..])] {
        router
            .send(
                &id,
                ToWorker::Raw(RawFrame {
                    conn: "raw-1".into(),
                    binary: is_binary,
                    payload: payload.to_vec(),
                }),
            )
            .await;
        match router.recv().await.1 {
            FromWorker::Raw(f) => {
                assert_eq!(
                    (f.conn.as_str(), f.binary, f.payload.as_slice()),
                    ("raw-1", is_binary, payload)
                );
            }
            other => panic!("{other:?}"),
        }
    }

    stop(r, &mut router).await;
}

#[tokio::test]
async fn vision_worker() {
    let mut router = FakeRouter::bind().await;
    let r = start("vision_worker", &mut router, &[]).await;
    assert_eq!(r.hello.services, ["vision"]);
    let id = r.id.clone();

    router.send(&id, binary(&[7u8; 1000])).await;
    match router.recv().await.1 {
        FromWorker::Push(p) => {
            assert_eq!(p.msg_type, "image_received");
            assert_eq!(p.data, json!({"bytes": 1000}));
        }
        other => panic!("{other:?}"),
    }

    router
        .request(
            &id,
            "a",
            "request_workspace_analysis",
            json!({"workspace": "w1"}),
        )
        .await;
    let mut progress = Vec::new();
    let result = loop {
        let (data, done, _) = reply(router.recv_for("a").await);
        if done {
            break data;
        }
        assert!(data["stage"].is_string(), "{data}");
        progress.push(data["progress"].as_f64().expect("numeric progress"));
    };
    assert!(progress.len() >= 3, "{progress:?}");
    assert!(progress.windows(2).all(|w| w[0] < w[1]), "{progress:?}");
    assert_eq!(result["result"]["fake"], json!(true), "{result}");
    assert!(result["result"]["note"].as_str().unwrap().contains("FAKE"));
    assert_eq!(result["result"]["images_received"]["count"], json!(1));

    stop(r, &mut router).await;
}

#[tokio::test]
async fn voice_worker() {
    let mut router = FakeRouter::bind().await;
    let r = start("voice_worker", &mut router, &[]).await;
    assert_eq!(r.hello.services, ["voice"]);
    let id = r.id.clone();

    router.request(&id, "s", "start_session", json!({})).await;
    assert_eq!(reply(router.recv_for("s").await).0["session"], "started");
    for (n, size) in [(1, 100), (2, 50)] {
        router.send(&id, binary(&vec![0u8; size])).await;
        match router.recv().await.1 {
            FromWorker::Push(p) => {
                assert_eq!(p.msg_type, "partial_transcript");
                assert_eq!(p.data["chunks"], json!(n));
                assert_eq!(p.data["stand_in"], json!(true));
                assert!(p.data["text"].as_str().unwrap().contains("stand-in"));
            }
            other => panic!("{other:?}"),
        }
    }
    router.request(&id, "e", "end_session", json!(null)).await;
    let (data, done, _) = reply(router.recv_for("e").await);
    assert!(done);
    assert_eq!(
        (data["chunks"].clone(), data["bytes"].clone()),
        (json!(2), json!(150))
    );

    stop(r, &mut router).await;
}

#[tokio::test]
async fn automation_worker() {
    let mut router = FakeRouter::bind().await;
    let r = start("automation_worker", &mut router, &[]).await;
    assert_eq!(r.hello.services, ["automation"]);
    let id = r.id.clone();

    // Without a question: THOUGHT, ACTION, STREAM..., then OUTPUT as final.
    router
        .request(&id, "t1", "run_task", json!({"task": "tidy"}))
        .await;
    let mut kinds = Vec::new();
    loop {
        let (data, done, msg_type) = reply(router.recv_for("t1").await);
        kinds.push(msg_type.expect("agent frames are typed"));
        if done {
            assert_eq!(data["simulated"], json!(true));
            break;
        }
    }
    assert_eq!(
        kinds,
        ["THOUGHT", "ACTION", "STREAM", "STREAM", "STREAM", "OUTPUT"]
    );

    // With a question: it waits for HUMAN_RESPONSE from the same connection.
    router
        .request(
            &id,
            "t2",
            "run_task",
            json!({"task": "ask", "question": "ok?"}),
        )
        .await;
    let question_id = loop {
        let (data, done, msg_type) = reply(router.recv_for("t2").await);
        assert!(!done, "finished without asking");
        if msg_type.as_deref() == Some("HUMAN_INPUT_REQUEST") {
            assert_eq!(data["question"], "ok?");
            break data["question_id"].as_str().unwrap().to_owned();
        }
    };
    // Nothing more until the answer: a request on the side is answered first.
    router.request(&id, "x", "no_such_type", json!(null)).await;
    let (_, msg) = router.recv().await;
    assert_eq!(
        cid_of(&msg),
        Some("x"),
        "the run went on without an answer: {msg:?}"
    );

    router
        .send(
            &id,
            ToWorker::Event(Event {
                conn: "conn-1".into(),
                route: "/ws/automation".into(),
                service: "automation".into(),
                msg_type: "HUMAN_RESPONSE".into(),
                data: json!({"question_id": question_id, "response": "yes"}),
            }),
        )
        .await;
    let final_data = loop {
        let (data, done, msg_type) = reply(router.recv_for("t2").await);
        if done {
            assert_eq!(msg_type.as_deref(), Some("OUTPUT"));
            break data;
        }
    };
    assert_eq!(final_data["human_response"], json!("yes"));

    // HUMAN_RESPONSE as a request, when nothing is asked, is a clear error.
    router
        .request(&id, "h", "HUMAN_RESPONSE", json!({"response": "?"}))
        .await;
    match router.recv_for("h").await {
        FromWorker::Error(e) => assert_eq!(e.code, "bad_request"),
        other => panic!("{other:?}"),
    }

    stop(r, &mut router).await;
}

#[tokio::test]
async fn chat_worker() {
    let mut router = FakeRouter::bind().await;
    let r = start(
        "chat_worker",
        &mut router,
        &["--service", "chat", "--service", "lobby"],
    )
    .await;
    assert_eq!(r.hello.services, ["chat", "lobby"]);
    let id = r.id.clone();

    let data = json!({"text": "unchanged", "list": [1, 2]});
    router.request(&id, "e", "echo", data.clone()).await;
    assert_eq!(reply(router.recv_for("e").await), (data, true, None));

    router
        .request(&id, "j", "join", json!({"room": "42"}))
        .await;
    match router.recv().await.1 {
        FromWorker::Subscribe(t) => {
            assert_eq!((t.conn.as_str(), t.topic.as_str()), ("conn-1", "room:42"))
        }
        other => panic!("{other:?}"),
    }
    assert!(reply(router.recv_for("j").await).1);

    router
        .request(&id, "s", "say", json!({"room": "42", "text": "hi"}))
        .await;
    match router.recv().await.1 {
        FromWorker::Publish(p) => {
            assert_eq!(p.topic, "room:42");
            assert_eq!(
                p.data,
                json!({"room": "42", "text": "hi", "from": "conn-1"})
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(reply(router.recv_for("s").await).1);

    router
        .request(&id, "l", "leave", json!({"room": "42"}))
        .await;
    match router.recv().await.1 {
        FromWorker::Unsubscribe(t) => assert_eq!(t.topic, "room:42"),
        other => panic!("{other:?}"),
    }
    assert!(reply(router.recv_for("l").await).1);

    router.request(&id, "b", "join", json!({})).await;
    match router.recv_for("b").await {
        FromWorker::Error(e) => assert_eq!(e.code, "bad_request"),
        other => panic!("{other:?}"),
    }

    stop(r, &mut router).await;
}

#[tokio::test]
async fn ticker_publisher() {
    const SECRET: &str = "ticker-s3cret";
    let mut router = FakeRouter::bind().await.with_secret(SECRET);
    let mut child = Command::new(example_path("ticker_publisher"))
        .arg("--bridge-endpoint")
        .arg(&router.endpoint)
        .args(["--topic", "prices", "--count", "3", "--interval-ms", "10"])
        .args(["--id", "ticker-1"])
        .env_remove("BRIDGE_ENDPOINT")
        .env("BRIDGE_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn example");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    // The fake router challenges the hello and checks the proof.
    let (_, hello) = router.handshake(60_000, 3).await;
    assert_eq!(hello.worker_id, "ticker-1");
    assert!(hello.services.is_empty(), "{:?}", hello.services);
    assert_eq!(hello.capacity, 0);
    let line = tokio::time::timeout(WAIT, stdout.next_line())
        .await
        .expect("no registered line in time")
        .expect("read stdout")
        .expect("stdout ended before the registered line");
    let v: Value = serde_json::from_str(&line).expect("registered line is JSON");
    assert_eq!(
        v,
        json!({"event": "registered", "worker_id": "ticker-1", "services": []})
    );
    for n in 0..3 {
        match router.recv().await.1 {
            FromWorker::Publish(p) => {
                assert_eq!((p.topic.as_str(), p.msg_type.as_str()), ("prices", "tick"));
                assert_eq!(p.data["n"], json!(n));
            }
            other => panic!("expected publish {n}, got {other:?}"),
        }
    }
    assert!(matches!(router.recv().await.1, FromWorker::Bye(_)));
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("example did not exit in time")
        .expect("wait for example");
    assert!(status.success(), "exit status {status:?}");
    assert!(!router.ever_received(SECRET.as_bytes()));
}
