//! What the broker's unit tests share: a recording [`Outbox`], a broker
//! with a hub of test clients, and the bridge loop's moves (ticks, due
//! timers) made by hand, so a test on paused time decides exactly when
//! each happens.

use std::{sync::Arc, time::Duration};

use bridge_proto::{self as proto, ErrorReply, FromWorker, Hello, Reply, ToWorker};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use serde_json::json;

use super::{Broker, BrokerConfig, Command, Outbox, PeerId, RequestCmd};
use crate::{
    client::{OutFrame, Outbound},
    handshake::Handshake,
    hub::{ConnShared, Hub},
    ids::{Cid, ConnId},
    metrics::Metrics,
};

/// Heartbeat of the test broker; liveness is 3, so a worker is dead after
/// 30 s of silence. The broker reads tokio's clock, so on paused time a
/// worker's silence is as long as the time a test skips: this outlasts
/// every test that is not about liveness.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
pub const LIVENESS: u32 = 3;
pub const CANCEL_GRACE: Duration = Duration::from_secs(5);

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[derive(Default)]
pub struct Recorder(pub Vec<(PeerId, ToWorker)>);

impl Outbox for Recorder {
    fn send(&mut self, peer: &PeerId, msg: ToWorker) {
        self.0.push((peer.clone(), msg));
    }
}

impl Recorder {
    pub fn requests_to(&self, peer: &PeerId) -> Vec<String> {
        self.0
            .iter()
            .filter_map(|(p, m)| match m {
                ToWorker::Request(r) if p == peer => Some(r.cid.clone()),
                _ => None,
            })
            .collect()
    }

    /// Every request sent, with its worker.
    pub fn requests(&self) -> Vec<(PeerId, proto::Request)> {
        self.0
            .iter()
            .filter_map(|(p, m)| match m {
                ToWorker::Request(r) => Some((p.clone(), r.clone())),
                _ => None,
            })
            .collect()
    }

    pub fn cancels(&self) -> Vec<(PeerId, String)> {
        self.0
            .iter()
            .filter_map(|(p, m)| match m {
                ToWorker::Cancel(c) => Some((p.clone(), c.reason.clone())),
                _ => None,
            })
            .collect()
    }
}

pub struct Fixture {
    pub broker: Broker,
    pub hub: Arc<Hub>,
    pub out: Recorder,
}

pub fn fixture() -> Fixture {
    let hub = Arc::new(Hub::new());
    let cfg = BrokerConfig {
        router_id: "r".into(),
        heartbeat: HEARTBEAT,
        liveness: LIVENESS,
        secret: None,
        max_frame_bytes: 1 << 20,
        max_held_request_bytes: 1 << 20,
        cancel_grace: CANCEL_GRACE,
    };
    Fixture {
        broker: Broker::new(cfg, hub.clone(), None, Arc::new(Metrics::new())),
        hub,
        out: Recorder::default(),
    }
}

pub fn peer(name: &str) -> PeerId {
    Bytes::copy_from_slice(name.as_bytes())
}

pub fn with_secret(f: &mut Fixture) {
    f.broker.handshake = Handshake::new(Some("s3cret"));
}

/// The frames queued for a client so far.
pub fn frames(rx: &mut crate::outbox::OutboxRx) -> Vec<OutFrame> {
    let mut v = Vec::new();
    while let Ok(out) = rx.try_recv() {
        match out {
            Outbound::Frame(f) => v.push(*f),
            // Not silently dropped: a test that needs these reads them itself.
            other => panic!("expected a client frame of its own, got {other:?}"),
        }
    }
    v
}

/// The error codes among `frames`.
pub fn error_codes(frames: &[OutFrame]) -> Vec<String> {
    frames
        .iter()
        .filter_map(|fr| fr.error.as_ref().map(|e| e.code.clone()))
        .collect()
}

impl Fixture {
    pub fn hello(&mut self, p: &PeerId, capacity: u32) {
        self.broker.on_worker_message(
            p.clone(),
            2,
            FromWorker::Hello(Hello {
                worker_id: String::from_utf8_lossy(p).into_owned(),
                services: vec!["svc".into()],
                capacity,
                sdk: "test".into(),
                msg_types: None,
            }),
            &mut self.out,
        );
    }

    /// A worker of `svc` that announces the message types it handles.
    pub fn hello_typed(&mut self, p: &PeerId, msg_types: &[&str]) {
        self.broker.on_worker_message(
            p.clone(),
            2,
            FromWorker::Hello(Hello {
                worker_id: String::from_utf8_lossy(p).into_owned(),
                services: vec!["svc".into()],
                capacity: 4,
                sdk: "test".into(),
                msg_types: Some(msg_types.iter().map(|t| t.to_string()).collect()),
            }),
            &mut self.out,
        );
    }

    /// Every event sent, with its worker and type.
    pub fn events(&self) -> Vec<(PeerId, String)> {
        self.out
            .0
            .iter()
            .filter_map(|(p, m)| match m {
                ToWorker::Event(e) => Some((p.clone(), e.msg_type.clone())),
                _ => None,
            })
            .collect()
    }

    pub fn client(&self) -> (ConnId, Arc<ConnShared>, crate::outbox::OutboxRx) {
        let id = ConnId::new();
        let (c, rx) = ConnShared::new(id.clone(), "/ws".into(), 1 << 20);
        self.hub.register(c.clone());
        (id, c, rx)
    }

    /// A client the broker knows (it sent `connect`), so it has a home worker.
    pub fn connected_client(&mut self) -> (ConnId, Arc<ConnShared>, crate::outbox::OutboxRx) {
        let (id, c, rx) = self.client();
        self.broker.on_command(
            Command::Connect(Box::new(proto::Connect {
                conn: id.0.to_string(),
                route: "/ws".into(),
                service: "svc".into(),
                path: "/ws".into(),
                params: Default::default(),
                query: Default::default(),
                headers: Default::default(),
                remote: "127.0.0.1:1".into(),
                claims: None,
                client_cert: None,
            })),
            &mut self.out,
        );
        (id, c, rx)
    }

    /// A request of `svc` on `/ws` with no retries and no breaker, 100 bytes.
    pub fn cmd(&self, conn: &ConnId, client_id: &str, timeout_ms: u64) -> RequestCmd {
        RequestCmd {
            cid: Cid::new(),
            conn: conn.clone(),
            client_key: json!(client_id).to_string().into(),
            client_id: json!(client_id),
            route: ws_route(),
            msg_type: "echo".into(),
            data: json!({}),
            timeout: ms(timeout_ms),
            affinity: false,
            retries: 0,
            breaker: None,
            claims: None,
            size: 100,
        }
    }

    /// Hands `cmd` to the broker as the session would.
    pub fn submit(&mut self, shared: &ConnShared, cmd: RequestCmd) -> Cid {
        let cid = cmd.cid;
        assert!(shared.begin_request(cmd.client_key.clone(), cid));
        self.broker
            .on_command(Command::Request(Box::new(cmd)), &mut self.out);
        cid
    }

    pub fn request(
        &mut self,
        conn: &ConnId,
        shared: &ConnShared,
        client_id: &str,
        timeout_ms: u64,
    ) -> Cid {
        self.request_with(conn, shared, client_id, timeout_ms, false)
    }

    pub fn request_with(
        &mut self,
        conn: &ConnId,
        shared: &ConnShared,
        client_id: &str,
        timeout_ms: u64,
        affinity: bool,
    ) -> Cid {
        let cmd = RequestCmd {
            affinity,
            ..self.cmd(conn, client_id, timeout_ms)
        };
        self.submit(shared, cmd)
    }

    pub fn reply(&mut self, p: &PeerId, cid: &Cid, done: bool) {
        self.broker.on_worker_message(
            p.clone(),
            2,
            FromWorker::Reply(Reply {
                cid: cid.to_string(),
                done,
                msg_type: None,
                data: json!(1),
            }),
            &mut self.out,
        );
    }

    /// The worker's error reply for `cid`.
    pub fn error(&mut self, p: &PeerId, cid: &Cid, code: &str, retryable: bool) {
        self.broker.on_worker_message(
            p.clone(),
            2,
            FromWorker::Error(ErrorReply {
                cid: cid.to_string(),
                code: code.into(),
                message: "m".into(),
                retryable,
                retry_after_ms: None,
            }),
            &mut self.out,
        );
    }

    /// The bridge's heartbeat tick.
    pub fn tick(&mut self) {
        self.broker.on_tick(&mut self.out);
    }

    /// Handles every timer due by now, without waiting, as the bridge's
    /// loop would: deadlines, then retries, then cancel graces. Call after
    /// `tokio::time::advance`.
    pub fn run_due_timers(&mut self) {
        loop {
            if let Some(Some(e)) = self.broker.deadlines.next().now_or_never() {
                self.broker.on_deadline(e.into_inner(), &mut self.out);
            } else if let Some(Some(e)) = self.broker.retry_timers.next().now_or_never() {
                self.broker.on_retry_due(e.into_inner(), &mut self.out);
            } else if let Some(Some(e)) = self.broker.zombie_timers.next().now_or_never() {
                self.broker.on_cancel_grace(e.into_inner(), &mut self.out);
            } else {
                return;
            }
        }
    }

    /// Advances paused time by `by` and handles the timers due by then.
    pub async fn advance(&mut self, by: Duration) {
        tokio::time::advance(by).await;
        self.run_due_timers();
    }
}

/// Route `/ws` of service `svc`, as the routes file would give it.
pub fn ws_route() -> Arc<crate::routes::Route> {
    Arc::new(crate::routes::RouteDefaults::BUILTIN.route("/ws", "svc"))
}
