//! The bridge task: the only code in the router that touches ZeroMQ sockets.
//!
//! It binds the ROUTER socket that workers connect to and (unless a secret
//! makes it unnecessary) the SUB socket that publishers connect to, and runs
//! one owner loop that feeds a [`Broker`] with session commands, decoded
//! worker frames, heartbeat ticks and deadline expiries. Sessions talk to it
//! over a bounded channel ([`BridgeHandle`]). Undecodable frames are logged
//! with their peer and reason and dropped; they never stop the loop.
//!
//! Both sockets face untrusted peers (PROTOCOL.md §14), so they are built
//! with the limits of our patched `zeromq` crate (`third_party/zeromq`):
//! frame and message sizes checked on the length header, a deadline on the
//! ZMTP handshake, a routing id of the router's choosing for every
//! connection (a peer cannot take over another's id), and a byte bound on
//! what is queued for each peer.

use std::{sync::Arc, task::Poll, time::Duration};

use bridge_proto::{
    decode_from_worker_versioned, decode_header, decode_publication, encode_request_as,
    encode_to_worker_as, DecodeError, RequestRef, ToWorker,
};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};
use zeromq::{
    RouterRecvHalf, RouterSendHalf, Socket, SocketEvent, SocketOptions, SocketRecv, SocketSend,
    ZmqError, ZmqMessage,
};

use crate::{
    broker::{Broker, BrokerConfig, Command, Outbox, PeerId, Snapshot},
    hub::Hub,
    metrics::Metrics,
    registry::RouteRegistry,
};

/// Commands that may queue up before sessions see `overloaded`.
const COMMAND_QUEUE: usize = 8192;

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("cannot bind the bridge ROUTER socket at {endpoint}: {source}")]
    BindRouter {
        endpoint: String,
        source: zeromq::ZmqError,
    },
    #[error("cannot bind the publication SUB socket at {endpoint}: {source}")]
    BindSub {
        endpoint: String,
        source: zeromq::ZmqError,
    },
}

/// The sessions' side of the bridge.
#[derive(Debug, Clone)]
pub struct BridgeHandle {
    tx: mpsc::Sender<Command>,
}

/// The bridge is saturated or gone; the command comes back unsent.
#[derive(Debug, thiserror::Error)]
#[error("the bridge is not accepting commands")]
pub struct Busy(pub Box<Command>);

impl BridgeHandle {
    /// Queues a command without waiting.
    pub fn try_send(&self, cmd: Command) -> Result<(), Busy> {
        self.tx
            .try_send(cmd)
            .map_err(|e| Busy(Box::new(e.into_inner())))
    }

    /// Queues a command that must not be lost (disconnects), waiting for room.
    pub async fn send(&self, cmd: Command) {
        let _ = self.tx.send(cmd).await;
    }

    /// Live workers, for `/routes`.
    pub async fn snapshot(&self) -> Snapshot {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Snapshot(tx)).await.is_err() {
            return Snapshot::default();
        }
        rx.await.unwrap_or_default()
    }
}

/// Resolved endpoints, as bound (port 0 replaced by the real port).
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub bridge: String,
    /// `None` when the SUB socket is not bound (a secret is set and
    /// unauthenticated publishing was not asked for).
    pub publish: Option<String>,
}

pub struct BridgeConfig {
    pub bridge_endpoint: String,
    /// `None`: do not bind the SUB socket.
    pub publish_endpoint: Option<String>,
    /// Largest frame and message a peer may send.
    pub max_frame_bytes: usize,
    /// Bytes that may be queued for one worker before it counts as stuck.
    pub worker_send_queue_bytes: usize,
    /// How long a peer may take over the ZMTP greeting and READY exchange.
    pub zmtp_handshake_timeout: Duration,
    pub broker: BrokerConfig,
}

/// Options of both sockets: every limit that makes them safe to expose.
fn socket_options(cfg: &BridgeConfig) -> SocketOptions {
    let mut o = SocketOptions::default();
    o.max_frame_size(cfg.max_frame_bytes)
        .max_message_size(cfg.max_frame_bytes)
        .handshake_timeout(Some(cfg.zmtp_handshake_timeout))
        .assign_peer_ids(true)
        .send_queue_max_bytes(cfg.worker_send_queue_bytes);
    o
}

/// Binds both sockets and spawns the bridge tasks on `tracker`. They stop
/// when `stop` is cancelled (after telling the workers goodbye).
pub async fn start(
    cfg: BridgeConfig,
    hub: Arc<Hub>,
    registry: Arc<RouteRegistry>,
    metrics: Arc<Metrics>,
    tracker: &TaskTracker,
    stop: CancellationToken,
) -> Result<(BridgeHandle, Endpoints), BridgeError> {
    clear_stale_ipc(&cfg.bridge_endpoint);
    let mut router = zeromq::RouterSocket::with_options(socket_options(&cfg));
    let bridge = router
        .bind(&cfg.bridge_endpoint)
        .await
        .map_err(|source| BridgeError::BindRouter {
            endpoint: cfg.bridge_endpoint.clone(),
            source,
        })?
        .to_string();
    let publication = match &cfg.publish_endpoint {
        Some(endpoint) => Some(bind_sub(endpoint, socket_options(&cfg)).await?),
        None => {
            info!("publish endpoint not bound: with a bridge secret, publications come through authenticated bridge sessions");
            None
        }
    };

    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    // Connection events: a worker whose connection closes is dead at once.
    let events = router.monitor().boxed();
    let (send_half, recv_half) = router.split();
    let heartbeat = cfg.broker.heartbeat;
    let broker = Broker::new(cfg.broker, hub.clone(), Some(registry), metrics.clone());
    let bridge_ipc = ipc_path(&bridge);
    tracker.spawn(owner_loop(Owner {
        broker,
        metrics: metrics.clone(),
        send: send_half,
        recv: recv_half,
        events,
        commands: rx,
        heartbeat,
        stop: stop.clone(),
        ipc_file: bridge_ipc,
    }));
    let publish = publication.map(|(sub, publish)| {
        tracker.spawn(publication_loop(sub, hub, stop, ipc_path(&publish)));
        publish
    });
    Ok((BridgeHandle { tx }, Endpoints { bridge, publish }))
}

async fn bind_sub(
    endpoint: &str,
    options: SocketOptions,
) -> Result<(zeromq::SubSocket, String), BridgeError> {
    clear_stale_ipc(endpoint);
    let err = |source| BridgeError::BindSub {
        endpoint: endpoint.to_owned(),
        source,
    };
    let mut sub = zeromq::SubSocket::with_options(options);
    let bound = sub.bind(endpoint).await.map_err(err)?.to_string();
    sub.subscribe("").await.map_err(err)?;
    Ok((sub, bound))
}

/// The socket file of an `ipc://` endpoint.
fn ipc_path(endpoint: &str) -> Option<std::path::PathBuf> {
    endpoint
        .strip_prefix("ipc://")
        .map(std::path::PathBuf::from)
}

/// A router killed with SIGKILL leaves its `ipc://` socket files behind, and
/// binding them again fails. A file nobody accepts connections on is stale:
/// remove it. A live one stays, so a second router on the same endpoint is
/// still refused.
fn clear_stale_ipc(endpoint: &str) {
    let Some(path) = ipc_path(endpoint) else {
        return;
    };
    if !path.exists() {
        return;
    }
    match std::os::unix::net::UnixStream::connect(&path) {
        Ok(_) => {} // someone listens: let the bind report it
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            info!(path = %path.display(), "removing a stale ipc socket file");
            let _ = std::fs::remove_file(&path);
        }
        Err(_) => {}
    }
}

/// Sends to workers through the ROUTER socket. What is queued for one
/// peer is bounded in bytes (`worker_send_queue_bytes`): a send past the
/// bound fails at once, and the peer is declared dead.
struct ZmqOutbox {
    /// What goes to each peer, in the order the broker queued it.
    out: Vec<(PeerId, Queued)>,
}

/// One message the broker queued for a peer.
// The queue is one `Vec` reused every turn: boxing the large variant would
// allocate for every message instead.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Queued {
    /// Encoded when sent, in this protocol version (`None`: the peer's own).
    Message(Option<u8>, ToWorker),
    /// A request, encoded from the broker's fields when it was queued.
    Encoded(Vec<u8>),
}

impl Outbox for ZmqOutbox {
    fn send(&mut self, peer: &PeerId, msg: ToWorker) {
        self.out.push((peer.clone(), Queued::Message(None, msg)));
    }

    fn send_as(&mut self, peer: &PeerId, version: u8, msg: ToWorker) {
        self.out
            .push((peer.clone(), Queued::Message(Some(version), msg)));
    }

    fn send_request(&mut self, peer: &PeerId, version: u8, request: &RequestRef<'_>) {
        let body = encode_request_as(version, request);
        self.out.push((peer.clone(), Queued::Encoded(body)));
    }
}

/// How long the ROUTER socket stays open after the shutdown goodbyes.
const GOODBYE_LINGER: Duration = Duration::from_millis(200);

/// How long one send may wait for room in a peer's queue before the peer
/// counts as stuck.
const SEND_STALL: Duration = Duration::from_millis(200);

/// Sends what the broker queued. Returns the peers a send failed to, with
/// why: they are dead at once (a worker that cannot be written to gets no
/// more work, whatever its heartbeats say).
async fn flush(
    outbox: &mut ZmqOutbox,
    socket: &mut RouterSendHalf,
    broker: &Broker,
) -> Vec<(PeerId, &'static str)> {
    let mut failed: Vec<(PeerId, &'static str)> = Vec::new();
    for (peer, queued) in outbox.out.drain(..) {
        if failed.iter().any(|(p, _)| *p == peer) {
            continue;
        }
        let body = Bytes::from(match queued {
            Queued::Message(version, msg) => {
                let version = version.unwrap_or_else(|| broker.version_of(&peer));
                encode_to_worker_as(version, &msg)
            }
            Queued::Encoded(body) => body,
        });
        // Two frames, one allocation: routing id, then the message.
        let Ok(frame) = ZmqMessage::try_from(vec![peer.clone(), body]) else {
            // Only an empty vector is refused: not this one.
            failed.push((peer, "send failed"));
            continue;
        };
        let mut sending = std::pin::pin!(socket.send(frame));
        // Almost every send is queued at once: no timer for those.
        let sent = match futures_util::poll!(sending.as_mut()) {
            Poll::Ready(r) => Ok(r),
            Poll::Pending => tokio::time::timeout(SEND_STALL, sending).await,
        };
        match sent {
            Ok(Ok(())) => {}
            // More bytes queued for the peer than it may have: not reading.
            Ok(Err(ZmqError::BufferFull(why))) if why.contains("byte limit") => {
                failed.push((peer, NOT_READING));
            }
            // The connection is gone (or broke while we wrote).
            Ok(Err(e)) => {
                debug!(peer = ?peer, error = %e, "send to worker failed");
                failed.push((peer, "send failed"));
            }
            // The crate's message-count bound made `send` wait: not reading either.
            Err(_) => failed.push((peer, NOT_READING)),
        }
    }
    failed
}

/// Why a worker whose queue overflowed is dead.
const NOT_READING: &str = "not reading its queue";

/// Everything the owner loop owns.
struct Owner {
    broker: Broker,
    metrics: Arc<Metrics>,
    send: RouterSendHalf,
    recv: RouterRecvHalf,
    /// The ROUTER socket's monitor: connections accepted and closed.
    events: futures_util::stream::BoxStream<'static, SocketEvent>,
    commands: mpsc::Receiver<Command>,
    heartbeat: Duration,
    stop: CancellationToken,
    /// The ROUTER socket's file, for an `ipc://` endpoint.
    ipc_file: Option<std::path::PathBuf>,
}

async fn owner_loop(owner: Owner) {
    let Owner {
        mut broker,
        metrics,
        mut send,
        mut recv,
        mut events,
        mut commands,
        heartbeat,
        stop,
        ipc_file,
    } = owner;
    let mut outbox = ZmqOutbox { out: Vec::new() };
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            Some(cmd) = commands.recv() => {
                broker.on_command(cmd, &mut outbox);
                // Take whatever else is queued before flushing, in one batch.
                while let Ok(cmd) = commands.try_recv() {
                    broker.on_command(cmd, &mut outbox);
                    if outbox.out.len() >= 256 { break; }
                }
            }
            // A stream, not `recv()`: its future would be boxed every turn.
            // It never ends (a ROUTER waits for peers).
            Some(msg) = recv.next() => {
                if !on_frame(&mut broker, msg, &mut outbox) {
                    metrics.bridge_invalid();
                }
            }
            Some(expired) = broker.deadlines.next() => {
                let cid = expired.into_inner();
                broker.on_deadline(cid, &mut outbox);
            }
            Some(due) = broker.retry_timers.next() => {
                broker.on_retry_due(due.into_inner(), &mut outbox);
            }
            Some(due) = broker.zombie_timers.next() => {
                broker.on_cancel_grace(due.into_inner(), &mut outbox);
            }
            Some(event) = events.next() => {
                if let SocketEvent::Disconnected(id) = event {
                    broker.on_connection_closed(&PeerId::from(id), &mut outbox);
                }
            }
            _ = ticker.tick() => broker.on_tick(&mut outbox),
        }
        let failed = flush(&mut outbox, &mut send, &broker).await;
        for (peer, why) in failed {
            if why == NOT_READING {
                metrics.bound_hit("worker_send_queue");
            }
            broker.remove_worker(&peer, why, &mut outbox);
        }
    }
    broker.goodbye_all(&mut outbox);
    flush(&mut outbox, &mut send, &broker).await;
    // The crate writes in background tasks and has no linger: give the
    // goodbyes a moment to leave before the socket goes.
    tokio::time::sleep(GOODBYE_LINGER).await;
    drop((send, recv));
    // The crate removes its socket file in a background task the runtime
    // may never run at exit; a restart on the same path needs it gone.
    if let Some(path) = ipc_file {
        let _ = std::fs::remove_file(path);
    }
    info!("bridge stopped");
}

/// Decodes one frame from a worker and hands it to the broker; `false` if
/// it was dropped as invalid.
fn on_frame(broker: &mut Broker, msg: ZmqMessage, outbox: &mut ZmqOutbox) -> bool {
    let mut frames = msg.into_vecdeque();
    let Some(peer) = frames.pop_front() else {
        return false;
    };
    // Exactly one payload frame per message (PROTOCOL.md).
    if frames.len() != 1 {
        warn!(peer = ?peer, frames = frames.len(), "bridge message with other than one payload frame: dropped");
        return false;
    }
    let payload = &frames[0];
    // Before the handshake only a small `hello` or `auth` is decoded whole:
    // a peer that did not prove itself cannot make the router build a big
    // body (a frame's decoded form can take many times its bytes).
    if !broker.is_registered(&peer) {
        match decode_header(payload) {
            Ok((_, kind)) if kind == "hello" || kind == "auth" => {
                if payload.len() > MAX_HANDSHAKE_FRAME {
                    warn!(peer = ?peer, bytes = payload.len(), "oversized handshake message: dropped");
                    return false;
                }
            }
            Ok((version, _)) => {
                broker.on_unregistered_message(peer, version, outbox);
                return true;
            }
            Err(DecodeError::Version { found, .. }) => {
                broker.on_unsupported_version(peer, found, outbox);
                return false;
            }
            Err(e) => {
                warn!(peer = ?peer, bytes = payload.len(), error = %short(&e), "undecodable bridge message: dropped");
                return false;
            }
        }
    }
    match decode_from_worker_versioned(payload) {
        Ok((version, m)) => {
            broker.on_worker_message(peer, version, m, outbox);
            true
        }
        Err(DecodeError::Version { found, .. }) => {
            broker.on_unsupported_version(peer, found, outbox);
            false
        }
        Err(e) => {
            warn!(peer = ?peer, bytes = payload.len(), error = %short(&e), "undecodable bridge message: dropped");
            false
        }
    }
}

/// Largest `hello` or `auth` a peer that is not registered may send: far
/// above what the bounds of a hello allow (64 services of 256 bytes).
const MAX_HANDSHAKE_FRAME: usize = 64 << 10;

/// A decode error for the log, cut short: its text may quote what the peer
/// sent (a `kind`, a field's value), and logs carry kinds and sizes only.
fn short(e: &DecodeError) -> String {
    let text = e.to_string();
    match text.char_indices().nth(120) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// How long the publication loop pauses after a receive error.
const RECV_ERROR_PAUSE: Duration = Duration::from_millis(10);

async fn publication_loop<S: SocketRecv + Send>(
    mut sub: S,
    hub: Arc<Hub>,
    stop: CancellationToken,
    ipc_file: Option<std::path::PathBuf>,
) {
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            m = sub.recv() => m,
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                // A peer's bad frame (it is dropped by the socket) or a socket
                // error: log, and do not spin if it keeps failing.
                warn!(error = %e, "publication receive failed");
                tokio::time::sleep(RECV_ERROR_PAUSE).await;
                continue;
            }
        };
        let frames = msg.into_vec();
        if frames.len() != 2 {
            warn!(
                frames = frames.len(),
                "publication must be [topic, payload]: dropped"
            );
            continue;
        }
        if frames[0].is_empty() || frames[0].len() > crate::hub::MAX_TOPIC_LEN {
            warn!(
                bytes = frames[0].len(),
                "publication topic is empty or too long: dropped"
            );
            continue;
        }
        let Ok(topic) = std::str::from_utf8(&frames[0]) else {
            warn!("publication topic is not UTF-8: dropped");
            continue;
        };
        match decode_publication(&frames[1]) {
            Ok(p) => {
                let n = hub.publish(topic, &p.msg_type, p.data);
                debug!(topic, subscribers = n, "publication delivered");
            }
            Err(e) => warn!(topic, error = %short(&e), "undecodable publication: dropped"),
        }
    }
    drop(sub);
    if let Some(path) = ipc_file {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::testkit::{fixture, peer};
    use bridge_proto::{encode_from_worker, FromWorker, Hello};

    fn message(from: &PeerId, payload: Vec<u8>) -> ZmqMessage {
        let mut m = ZmqMessage::from(Bytes::from(payload));
        m.push_front(from.clone());
        m
    }

    /// A peer that did not pass the handshake gets its `goodbye` from the
    /// header alone: the body (here not even valid) is never decoded.
    #[tokio::test]
    async fn before_the_handshake_only_hello_and_auth_bodies_are_decoded() {
        let mut f = fixture();
        let mut outbox = ZmqOutbox { out: Vec::new() };
        let stranger = peer("stranger");
        let bogus_push =
            rmp_serde::to_vec_named(&serde_json::json!({"v": 2, "kind": "push"})).unwrap();
        assert!(on_frame(
            &mut f.broker,
            message(&stranger, bogus_push),
            &mut outbox
        ));
        assert!(matches!(
            outbox.out.as_slice(),
            [(p, Queued::Message(Some(2), ToWorker::Goodbye(g)))] if *p == stranger && g.reconnect
        ));
        // An oversized hello is dropped unread.
        let huge = encode_from_worker(&FromWorker::Hello(Hello {
            worker_id: "x".repeat(MAX_HANDSHAKE_FRAME),
            services: vec!["echo".into()],
            capacity: 1,
            sdk: "t".into(),
            msg_types: None,
        }));
        outbox.out.clear();
        assert!(!on_frame(
            &mut f.broker,
            message(&peer("big"), huge),
            &mut outbox
        ));
        assert!(outbox.out.is_empty());
    }

    /// PROTOCOL.md §13: a hello of a version the router does not speak gets
    /// a version-1 goodbye naming the versions, so the worker stops instead
    /// of retrying forever.
    #[tokio::test]
    async fn an_unsupported_version_gets_a_goodbye_that_names_the_versions() {
        let mut f = fixture();
        let mut outbox = ZmqOutbox { out: Vec::new() };
        let future = peer("future");
        let v3_hello = rmp_serde::to_vec_named(&serde_json::json!({
            "v": 3, "kind": "hello", "worker_id": "w", "services": ["echo"], "capacity": 1, "sdk": "x"
        }))
        .unwrap();
        assert!(!on_frame(
            &mut f.broker,
            message(&future, v3_hello.clone()),
            &mut outbox
        ));
        match outbox.out.as_slice() {
            [(p, Queued::Message(Some(1), ToWorker::Goodbye(g)))] => {
                assert_eq!(*p, future);
                assert!(!g.reconnect);
                assert!(
                    g.reason.contains("version 3") && g.reason.contains("1 to 2"),
                    "{}",
                    g.reason
                );
            }
            other => panic!("{other:?}"),
        }
        // Once per heartbeat interval, not once per frame.
        assert!(!on_frame(
            &mut f.broker,
            message(&future, v3_hello),
            &mut outbox
        ));
        assert_eq!(outbox.out.len(), 1);
    }

    /// A socket whose every receive fails at once, counting the calls; it
    /// stops the loop itself after 1000 (so a spinning loop ends the test
    /// with a failure rather than a hang).
    struct Failing(Arc<std::sync::atomic::AtomicUsize>, CancellationToken);

    impl SocketRecv for Failing {
        fn recv<'a, 'r>(
            &'a mut self,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = zeromq::ZmqResult<ZmqMessage>> + Send + 'r>,
        >
        where
            'a: 'r,
            Self: 'r,
        {
            if self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 1000 {
                self.1.cancel();
            }
            Box::pin(async { Err(ZmqError::NoMessage) })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_publication_loop_pauses_after_a_receive_error_instead_of_spinning() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn(publication_loop(
            Failing(calls.clone(), stop.clone()),
            Arc::new(Hub::new()),
            stop.clone(),
            None,
        ));
        tokio::time::sleep(RECV_ERROR_PAUSE * 10).await;
        stop.cancel();
        task.await.unwrap();
        let n = calls.load(std::sync::atomic::Ordering::Relaxed);
        assert!((10..=20).contains(&n), "{n} receives in 10 pauses");
    }

    #[test]
    fn logged_errors_are_cut_short() {
        let e = DecodeError::UnknownKind {
            kind: "k".repeat(10_000),
        };
        assert!(short(&e).chars().count() <= 121);
    }
}
