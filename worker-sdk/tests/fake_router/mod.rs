//! A stand-in for the router's bridge side: a real zeromq ROUTER socket
//! bound on a free loopback port, driven step by step by the test.
//!
//! Every wait is bounded by [`WAIT`], so a worker that never answers fails
//! the test instead of hanging it.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::time::Duration;

use bridge_proto::{
    decode_from_worker, encode_to_worker, Cancel, FromWorker, Hello, Request, ToWorker, Welcome,
};
use bytes::Bytes;
use serde_json::Value;
use zeromq::{RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// Upper bound on any single wait for the worker.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct FakeRouter {
    socket: RouterSocket,
    pub endpoint: String,
}

impl FakeRouter {
    /// Binds on a free port of 127.0.0.1.
    pub async fn bind() -> Self {
        Self::bind_at("tcp://127.0.0.1:0").await
    }

    /// Binds on `endpoint` (to come back on the same port).
    pub async fn bind_at(endpoint: &str) -> Self {
        let mut socket = RouterSocket::new();
        let bound = socket.bind(endpoint).await.expect("bind fake router");
        Self {
            socket,
            endpoint: bound.to_string(),
        }
    }

    /// Unbinds and drops the socket, closing every worker connection.
    pub async fn close(self) {
        let errors = self.socket.close().await;
        assert!(errors.is_empty(), "{errors:?}");
    }

    /// Next message from any worker, heartbeats included.
    pub async fn recv_any(&mut self) -> (Bytes, FromWorker) {
        let message = tokio::time::timeout(WAIT, self.socket.recv())
            .await
            .expect("timed out waiting for a worker message")
            .expect("router recv");
        let frames = message.into_vec();
        assert_eq!(frames.len(), 2, "expected [identity, payload]");
        let msg = decode_from_worker(&frames[1]).expect("worker sent a valid bridge message");
        (frames[0].clone(), msg)
    }

    /// Next message that is not a heartbeat.
    pub async fn recv(&mut self) -> (Bytes, FromWorker) {
        loop {
            let (id, msg) = self.recv_any().await;
            if msg != FromWorker::Heartbeat {
                return (id, msg);
            }
        }
    }

    /// Next non-heartbeat message, which must be for request `cid`.
    pub async fn recv_for(&mut self, cid: &str) -> FromWorker {
        let (_, msg) = self.recv().await;
        assert_eq!(cid_of(&msg), Some(cid), "unexpected message {msg:?}");
        msg
    }

    pub async fn send(&mut self, id: &Bytes, msg: ToWorker) {
        self.send_bytes(id, encode_to_worker(&msg)).await;
    }

    /// Sends any payload frame (for frames the codec would not produce).
    pub async fn send_bytes(&mut self, id: &Bytes, payload: Vec<u8>) {
        let mut message = ZmqMessage::from(id.clone());
        message.push_back(Bytes::from(payload));
        self.socket.send(message).await.expect("router send");
    }

    /// Waits for a hello.
    pub async fn expect_hello(&mut self) -> (Bytes, Hello) {
        match self.recv().await {
            (id, FromWorker::Hello(h)) => (id, h),
            (_, other) => panic!("expected hello, got {other:?}"),
        }
    }

    /// Waits for a hello and welcomes the worker.
    pub async fn handshake(&mut self, heartbeat_ms: u64, liveness: u32) -> (Bytes, Hello) {
        let (id, hello) = self.expect_hello().await;
        self.send(
            &id,
            ToWorker::Welcome(Welcome {
                router_id: "fake-router".into(),
                heartbeat_ms,
                liveness,
            }),
        )
        .await;
        (id, hello)
    }

    pub async fn request(&mut self, id: &Bytes, cid: &str, msg_type: &str, data: Value) {
        self.request_with_timeout(id, cid, msg_type, data, 30_000)
            .await;
    }

    pub async fn request_with_timeout(
        &mut self,
        id: &Bytes,
        cid: &str,
        msg_type: &str,
        data: Value,
        timeout_ms: u64,
    ) {
        self.send(
            id,
            ToWorker::Request(request(cid, msg_type, data, timeout_ms)),
        )
        .await;
    }

    pub async fn cancel(&mut self, id: &Bytes, cid: &str) {
        self.send(
            id,
            ToWorker::Cancel(Cancel {
                cid: cid.into(),
                reason: "client".into(),
            }),
        )
        .await;
    }
}

pub fn request(cid: &str, msg_type: &str, data: Value, timeout_ms: u64) -> Request {
    Request {
        cid: cid.into(),
        conn: "conn-1".into(),
        route: "/ws/test".into(),
        service: "svc".into(),
        msg_type: msg_type.into(),
        id: Value::String(format!("client-{cid}")),
        data,
        timeout_ms,
        deadline_ms: 0,
        attempt: 1,
        claims: None,
    }
}

/// The request a reply or error belongs to.
pub fn cid_of(msg: &FromWorker) -> Option<&str> {
    match msg {
        FromWorker::Reply(r) => Some(&r.cid),
        FromWorker::Error(e) => Some(&e.cid),
        _ => None,
    }
}

/// Whether `msg` ends its request.
pub fn is_terminal(msg: &FromWorker) -> bool {
    matches!(msg, FromWorker::Reply(r) if r.done) || matches!(msg, FromWorker::Error(_))
}
