//! The socket task: the only code that touches the worker's DEALER socket
//! (one task per router when the worker serves several; each runs this life
//! cycle on its own, and a lost router abandons only its own requests).
//!
//! It runs the connection life cycle of the team contract:
//!
//! ```text
//!   ┌────────────► open a NEW DealerSocket (bounded connect)
//!   │                 │ hello; resend each backoff step until welcome;
//!   │                 │ answer each challenge with auth{proof}
//!   │                 ▼
//!   │             registered: heartbeat every heartbeat_ms, serve
//!   │                 │ silence ≥ heartbeat_ms × liveness, send failure,
//!   │                 │ goodbye{reconnect:true}
//!   └── backoff ◄─────┘            goodbye{reconnect:false} → error
//!                                  challenge without a secret → error
//! ```
//!
//! The secret never leaves the process: a router that has one answers the
//! `hello` with `challenge{nonce}`, and the worker sends
//! `auth{proof: HMAC-SHA256(secret, DOMAIN || nonce)}`
//! ([`bridge_proto::auth::proof`]).
//!
//! The zeromq crate's DEALER never reconnects, so a lost router means a new
//! socket (with a new identity). Requests in flight on the lost socket are
//! abandoned: their handlers are dropped and nothing is answered, because
//! the router has already failed them when it declared this worker dead.
//!
//! Handlers and handles reach the socket through one bounded channel of
//! messages they have already encoded ([`Outgoing`]). Every reply and error
//! passes [`Owner::vet`], which keeps the in-flight table: a request leaves
//! it with its first terminal message, and anything sent for it afterwards
//! is dropped. That table, not user code, is what makes "exactly one
//! terminal per request" and "at most `capacity` handlers" hold. `vet` also
//! enforces the router's frame limit (`welcome.max_frame_bytes`): a reply
//! over it becomes the request's `payload_too_large` error.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bridge_proto::{
    auth, codes, decode_to_worker, encode_from_worker, Auth, Bye, Cancel, Challenge, Connect,
    DecodeError, Disconnect, ErrorReply, Event, FromWorker, Hello, RawFrame, Request, ToWorker,
    Welcome,
};
use bytes::Bytes;
use futures_util::task::noop_waker_ref;
use futures_util::FutureExt;
use serde_json::Value;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument, Span};
use zeromq::{
    DealerRecvHalf, DealerSendHalf, DealerSocket, Socket, SocketOptions, SocketRecv, SocketSend,
    ZmqError, ZmqMessage,
};

use crate::backoff::Backoff;
use crate::config::WorkerConfig;
use crate::context::{Context, EventContext};
use crate::dispatch::{
    finish_request, log_outcome, start_request, terminal, ConnQueues, Job, Named, Outcome,
};
use crate::error::{HandlerError, SendError, WorkerError};
use crate::handle::{State, WorkerHandle};
use crate::handler::{error_push_data, no_binary_handler, Frame, Handlers, RequestFn};
use crate::outgoing::{too_large_error, ForRequest, Outgoing};
use crate::salvage;
use crate::sessions::{ConnDirectory, StatusBoard};

/// SDK name and version announced in `hello`.
pub(crate) const SDK: &str = concat!("worker-sdk-rust/", env!("CARGO_PKG_VERSION"));

/// Connections whose `connect` details are remembered (for claims and the
/// route of raw frames); beyond this, new ones are not cached.
const MAX_KNOWN_CONNECTIONS: usize = 100_000;
/// A connection queue with nothing to do for this long ends its task.
const QUEUE_IDLE: Duration = Duration::from_secs(30);
/// A request handler whose first poll (run by the socket task itself) takes
/// longer than this ...
const INLINE_MAX: Duration = Duration::from_micros(50);
/// ... runs on its own task for the next this many requests of its type;
/// then its first poll is tried on the socket task again.
const INLINE_BACKOFF: u32 = 256;
/// Upper bound on a request's `timeout_ms`, so a hostile value cannot
/// overflow the deadline arithmetic.
const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// One DEALER socket, split so sending never waits behind a pending receive.
struct Link {
    tx: DealerSendHalf,
    rx: DealerRecvHalf,
    /// How long one send may wait for room in the socket's queue. A send
    /// blocks only when the router stopped reading; waiting longer than the
    /// liveness limit would keep the dead-router check from ever running.
    send_timeout: Duration,
}

/// Why a message could not be put on the socket.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("{0}")]
    Socket(#[from] ZmqError),
    #[error("the socket's queue stayed full for {0:?}")]
    Blocked(Duration),
}

/// Largest frame a worker accepts from a router: above any route's
/// `maxMessageBytes` (at most 64 MiB) plus its envelope.
pub const MAX_INBOUND_FRAME: usize = 128 << 20;

impl Link {
    async fn open(
        endpoint: String,
        connect_timeout: Duration,
        send_timeout: Duration,
    ) -> Result<Self, ZmqError> {
        let mut options = SocketOptions::default();
        // Frames from the router are checked on their length header too: a
        // rogue endpoint cannot make the worker allocate without bound.
        options
            .connect_timeout(connect_timeout)
            .max_frame_size(MAX_INBOUND_FRAME)
            .max_message_size(MAX_INBOUND_FRAME);
        let mut socket = DealerSocket::with_options(options);
        socket.connect(&endpoint).await?;
        let (tx, rx) = socket.split();
        Ok(Self {
            tx,
            rx,
            send_timeout,
        })
    }

    async fn send(&mut self, msg: &FromWorker) -> Result<(), LinkError> {
        self.send_frame(Bytes::from(encode_from_worker(msg))).await
    }

    async fn send_frame(&mut self, frame: Bytes) -> Result<(), LinkError> {
        let mut send = self.tx.send(ZmqMessage::from(frame));
        // Almost always there is room in the socket's queue: then no timer
        // is armed for the bound on the wait.
        if let Some(result) = (&mut send).now_or_never() {
            return Ok(result?);
        }
        match tokio::time::timeout(self.send_timeout, send).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(LinkError::Blocked(self.send_timeout)),
        }
    }
}

/// What became of one frame from the router.
enum Decoded {
    Message(Box<ToWorker>),
    /// Logged and dropped.
    Skipped,
    /// The router speaks another protocol version (named in the text).
    OtherVersion(String),
    /// A request that does not decode but whose `cid` could be read: it is
    /// still owed a terminal message (`bad_request`).
    BadRequest {
        cid: String,
        reason: String,
    },
}

/// Decodes one bridge message; bad input is logged (kind and size only)
/// and skipped, never fatal.
fn decode(message: ZmqMessage) -> Decoded {
    let frame = match message.len() {
        1 => message.get(0),
        _ => None,
    };
    let Some(frame) = frame else {
        warn!(
            frames = message.len(),
            "ignoring a router message that is not exactly one frame"
        );
        return Decoded::Skipped;
    };
    match decode_to_worker(frame) {
        Ok(msg) => Decoded::Message(Box::new(msg)),
        Err(e @ DecodeError::Version { .. }) => {
            warn!(bytes = frame.len(), error = %e, "ignoring a router message in another protocol version");
            Decoded::OtherVersion(e.to_string())
        }
        Err(e) => match salvage::request_cid(frame) {
            Some(cid) => {
                warn!(correlation.id = %cid, bytes = frame.len(), error = %e,
                    "a request does not decode; answering bad_request");
                Decoded::BadRequest {
                    cid,
                    reason: e.to_string(),
                }
            }
            None => {
                warn!(bytes = frame.len(), error = %e, "ignoring an undecodable router message");
                Decoded::Skipped
            }
        },
    }
}

/// Why a session (one socket) ended.
#[derive(Debug)]
enum End {
    Lost(String),
    Goodbye {
        reason: String,
        reconnect: bool,
    },
    /// Challenged for a secret the worker does not have.
    SecretRequired,
    Stopped,
}

enum Phase {
    /// Hello sent, no welcome yet.
    Hello { resend_at: Instant },
    /// Welcomed: heartbeats both ways.
    Live {
        every: Duration,
        dead_after: Duration,
        next_beat: Instant,
    },
}

struct InFlight {
    token: CancellationToken,
    /// The router's reason, once it cancelled the request.
    cancelled: Option<String>,
}

/// A request handler, as the socket task finds it by message type.
struct RequestType {
    handler: RequestFn,
    /// The type, shared by the contexts of its requests.
    name: Arc<str>,
    /// How many more requests of this type run on their own task before
    /// the socket task polls one itself again (see [`INLINE_MAX`]).
    spawn_next: u32,
}

/// The last route and service seen, shared by the contexts of requests
/// that name them again (a worker serves few of them).
#[derive(Default)]
struct Names {
    route: Option<Arc<str>>,
    service: Option<Arc<str>>,
}

impl Names {
    fn route(&mut self, route: String) -> Arc<str> {
        Self::share(&mut self.route, route)
    }

    fn service(&mut self, service: String) -> Arc<str> {
        Self::share(&mut self.service, service)
    }

    fn share(last: &mut Option<Arc<str>>, name: String) -> Arc<str> {
        match last {
            Some(known) if **known == *name => known.clone(),
            _ => last.insert(name.into()).clone(),
        }
    }
}

/// What a `connect` told us about a connection.
struct ConnInfo {
    route: Arc<str>,
    service: Arc<str>,
    claims: Option<Arc<Value>>,
}

/// Which router session a socket task runs, and what it shares with the
/// worker's other sessions.
pub(crate) struct SessionSpec {
    /// Its place in the endpoint list.
    pub(crate) index: usize,
    /// The router's bridge endpoint.
    pub(crate) endpoint: String,
    /// Whether the worker serves several routers (logs name the router then).
    pub(crate) several: bool,
    pub(crate) board: Arc<StatusBoard>,
    /// Which router each connection lives on (several routers only).
    pub(crate) directory: Option<Arc<ConnDirectory>>,
    /// The worker's capacity, shared by its sessions (several routers only:
    /// one router's credits already bound the handlers it starts).
    pub(crate) permits: Option<Arc<Semaphore>>,
}

/// The state the socket task owns.
pub(crate) struct Owner {
    cfg: Arc<WorkerConfig>,
    handlers: Arc<Handlers>,
    /// Homed on this session: replies of its requests come back here.
    handle: WorkerHandle,
    outbound: mpsc::Receiver<Outgoing>,
    spec: SessionSpec,
    /// Fires when the grace period is over (or the worker is rejected):
    /// every handler still running is dropped.
    hard_stop: CancellationToken,
    tracker: TaskTracker,
    inflight: HashMap<String, InFlight>,
    request_types: HashMap<String, RequestType>,
    names: Names,
    queues: ConnQueues,
    conns: HashMap<String, ConnInfo>,
    backoff: Backoff,
    router_id: Option<String>,
    /// `max_frame_bytes` of the current session's welcome.
    frame_limit: Option<u64>,
    stopping: bool,
}

impl Owner {
    pub(crate) fn new(
        cfg: Arc<WorkerConfig>,
        handlers: Arc<Handlers>,
        handle: WorkerHandle,
        outbound: mpsc::Receiver<Outgoing>,
        spec: SessionSpec,
    ) -> Self {
        let request_types = handlers
            .requests
            .iter()
            .map(|(t, handler)| {
                let entry = RequestType {
                    handler: handler.clone(),
                    name: t.as_str().into(),
                    spawn_next: 0,
                };
                (t.clone(), entry)
            })
            .collect();
        Self {
            request_types,
            names: Names::default(),
            backoff: Backoff::new(cfg.backoff_initial, cfg.backoff_max),
            queues: ConnQueues::new(cfg.connection_queue, QUEUE_IDLE),
            cfg,
            handlers,
            handle,
            outbound,
            spec,
            hard_stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
            inflight: HashMap::new(),
            conns: HashMap::new(),
            router_id: None,
            frame_limit: None,
            stopping: false,
        }
    }

    /// Runs until stopped (`Ok`) or refused by the router (`Err`).
    pub(crate) async fn run(mut self) -> Result<(), WorkerError> {
        let span = if self.spec.several {
            info_span!("worker", worker.id = %self.cfg.worker_id, router.endpoint = %self.spec.endpoint)
        } else {
            info_span!("worker", worker.id = %self.cfg.worker_id)
        };
        let result = self.sessions().instrument(span).await;
        // Whatever is left now is abandoned: a graceful stop has already
        // waited for it as long as it was allowed to.
        self.abandon_inflight();
        self.queues.finish_all();
        self.hard_stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(1), self.tracker.wait())
            .await
            .is_err()
        {
            warn!("some handler tasks did not end within 1 s of the stop");
        }
        self.set_state(State::Stopped);
        info!(worker.id = %self.cfg.worker_id, "worker stopped");
        result
    }

    async fn sessions(&mut self) -> Result<(), WorkerError> {
        loop {
            if self.handle.stop.is_cancelled() {
                return Ok(());
            }
            self.set_state(State::Connecting);
            debug!(endpoint = %self.spec.endpoint, "connecting");
            let link = match self.open_link().await {
                Some(Ok(link)) => link,
                Some(Err(e)) => {
                    warn!(endpoint = %self.spec.endpoint, error = %e, "cannot connect to the router");
                    if !self.wait_backoff().await {
                        return Ok(());
                    }
                    continue;
                }
                None => return Ok(()),
            };
            let end = self.session(link).await;
            if !matches!(end, End::Stopped) {
                // Not serving any more: senders that wait for a session
                // (the publisher) must not take the backoff for one.
                self.set_state(State::Connecting);
            }
            match end {
                End::Stopped => return Ok(()),
                End::Lost(reason) => {
                    warn!(endpoint = %self.spec.endpoint, %reason, "lost the router; reconnecting");
                }
                End::Goodbye {
                    reason,
                    reconnect: true,
                } => info!(%reason, "the router said goodbye; reconnecting"),
                End::Goodbye {
                    reason,
                    reconnect: false,
                } => {
                    return Err(WorkerError::Rejected {
                        endpoint: self.spec.endpoint.clone(),
                        reason,
                    })
                }
                End::SecretRequired => {
                    return Err(WorkerError::SecretRequired {
                        endpoint: self.spec.endpoint.clone(),
                    })
                }
            }
            self.abandon_inflight();
            self.forget_connections();
            if self.handle.stop.is_cancelled() || !self.wait_backoff().await {
                return Ok(());
            }
        }
    }

    /// Opens a socket; `None` when a stop came first.
    async fn open_link(&mut self) -> Option<Result<Link, ZmqError>> {
        let attempt = Link::open(
            self.spec.endpoint.clone(),
            self.cfg.connect_timeout,
            self.cfg.handshake_timeout,
        );
        tokio::pin!(attempt);
        loop {
            tokio::select! {
                result = &mut attempt => return Some(result),
                _ = self.handle.stop.cancelled() => return None,
                Some(msg) = self.outbound.recv() => drop_unsent(msg),
            }
        }
    }

    /// Waits one backoff step; `false` when a stop came first.
    async fn wait_backoff(&mut self) -> bool {
        let delay = self.backoff.next_delay();
        info!(delay_ms = delay.as_millis() as u64, endpoint = %self.spec.endpoint, "reconnecting after backoff");
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => return true,
                _ = self.handle.stop.cancelled() => return false,
                Some(msg) = self.outbound.recv() => drop_unsent(msg),
            }
        }
    }

    fn hello(&self) -> FromWorker {
        // The types of its handlers, so the router can show what its routes
        // accept and answer unknown ones; a publisher session has none.
        let msg_types = (!self.cfg.services.is_empty()).then(|| self.handlers.msg_types());
        FromWorker::Hello(Hello {
            worker_id: self.cfg.worker_id.clone(),
            services: self.cfg.services.clone(),
            capacity: self.cfg.capacity,
            sdk: SDK.to_owned(),
            msg_types,
        })
    }

    /// One socket's life: hello, serve, and (if asked) the graceful stop.
    async fn session(&mut self, mut link: Link) -> End {
        if let Err(e) = link.send(&self.hello()).await {
            return End::Lost(format!("cannot send hello: {e}"));
        }
        let give_up_at = Instant::now() + self.cfg.handshake_timeout;
        let mut phase = Phase::Hello {
            resend_at: Instant::now() + self.backoff.next_delay(),
        };
        let mut last_heard = Instant::now();
        let mut grace_deadline: Option<Instant> = None;
        self.frame_limit = None;
        // One timer for the session, moved only when its deadline changes
        // (a heartbeat, a resent hello, the grace period), not rebuilt and
        // re-registered on every message.
        let sleep = tokio::time::sleep_until(give_up_at);
        tokio::pin!(sleep);

        loop {
            if self.stopping && self.inflight.is_empty() && !self.tracker.is_closed() {
                // Every request is answered: let connection queues finish
                // what they hold, then the tracker drains.
                self.queues.finish_all();
                self.tracker.close();
            }
            let mut timer = match phase {
                Phase::Hello { resend_at } => resend_at.min(give_up_at),
                Phase::Live { next_beat, .. } => next_beat,
            };
            if let Some(g) = grace_deadline {
                timer = timer.min(g);
            }
            if sleep.deadline() != timer {
                sleep.as_mut().reset(timer);
            }

            tokio::select! {
                received = link.rx.recv() => {
                    let message = match received {
                        Ok(m) => m,
                        Err(e) => return End::Lost(format!("receive failed: {e}")),
                    };
                    last_heard = Instant::now();
                    let msg = match decode(message) {
                        Decoded::Message(msg) => *msg,
                        Decoded::Skipped => continue,
                        Decoded::OtherVersion(reason) if matches!(phase, Phase::Hello { .. }) => {
                            // The answer to our hello is in another version:
                            // retrying would only repeat it (PROTOCOL.md §13).
                            return End::Goodbye { reason, reconnect: false };
                        }
                        Decoded::OtherVersion(_) => continue,
                        Decoded::BadRequest { .. } if matches!(phase, Phase::Hello { .. }) => {
                            debug!("ignoring a request that came before the welcome");
                            continue;
                        }
                        Decoded::BadRequest { cid, reason } => {
                            if let Err(e) = self.on_bad_request(&mut link, cid, reason).await {
                                return End::Lost(format!("send failed: {e}"));
                            }
                            continue;
                        }
                    };
                    match (msg, &mut phase) {
                        (ToWorker::Welcome(w), Phase::Hello { .. }) => {
                            phase = self.on_welcome(w);
                            if let Phase::Live { dead_after, .. } = phase {
                                link.send_timeout = dead_after;
                            }
                        }
                        (ToWorker::Welcome(w), Phase::Live { every, dead_after, .. }) => {
                            // The answer to a resent hello: only the timing
                            // (and the frame limit) may change.
                            debug!("second welcome; updating heartbeat settings");
                            (*every, *dead_after) = liveness(&w);
                            link.send_timeout = *dead_after;
                            self.set_frame_limit(w.max_frame_bytes);
                        }
                        (ToWorker::Goodbye(g), _) => {
                            return End::Goodbye { reason: g.reason, reconnect: g.reconnect };
                        }
                        (ToWorker::Challenge(c), Phase::Hello { .. }) => {
                            if let Err(end) = self.on_challenge(&mut link, c).await {
                                return end;
                            }
                        }
                        (ToWorker::Challenge(_), Phase::Live { .. }) => {
                            debug!("ignoring a challenge after the welcome");
                        }
                        (ToWorker::Heartbeat, _) => {}
                        (other, Phase::Hello { .. }) => {
                            debug!(kind = other.kind(), "ignoring a message that came before the welcome");
                        }
                        (ToWorker::Request(r), _) => {
                            if let Err(e) = self.on_request(&mut link, r).await {
                                return End::Lost(format!("send failed: {e}"));
                            }
                        }
                        (ToWorker::Cancel(c), _) => self.on_cancel(c),
                        (ToWorker::Event(e), _) => self.on_event(e),
                        (ToWorker::Binary(b), _) => self.on_binary(b),
                        (ToWorker::Raw(r), _) => self.on_raw(r),
                        (ToWorker::Connect(c), _) => self.on_connect(c),
                        (ToWorker::Disconnect(d), _) => self.on_disconnect(d),
                    }
                }
                Some(out) = self.outbound.recv() => {
                    if matches!(phase, Phase::Hello { .. }) {
                        // Nothing but hello and auth go out before the welcome.
                        drop_unsent(out);
                        continue;
                    }
                    if let Err(e) = self.emit(&mut link, out).await {
                        return End::Lost(format!("send failed: {e}"));
                    }
                }
                _ = self.handle.stop.cancelled(), if !self.stopping => {
                    self.stopping = true;
                    if matches!(phase, Phase::Hello { .. }) {
                        // Not registered, and nothing but hello may be
                        // sent before the welcome: just close.
                        return End::Stopped;
                    }
                    let bye = FromWorker::Bye(Bye { reason: "worker stopping".to_owned() });
                    if let Err(e) = link.send(&bye).await {
                        return End::Lost(format!("send failed: {e}"));
                    }
                    info!(in_flight = self.inflight.len(), "stopping: said bye, finishing in-flight requests");
                    self.set_state(State::Stopping);
                    grace_deadline = Some(Instant::now() + self.cfg.grace_period);
                }
                _ = self.tracker.wait(), if self.tracker.is_closed() => {
                    self.flush_and_linger(&mut link).await;
                    return End::Stopped;
                }
                _ = &mut sleep => {
                    let now = Instant::now();
                    if grace_deadline.is_some_and(|g| now >= g) {
                        self.abandon_after_grace(&mut link).await;
                        return End::Stopped;
                    }
                    match &mut phase {
                        Phase::Hello { resend_at } => {
                            if now >= give_up_at {
                                return End::Lost("no welcome within the handshake timeout".to_owned());
                            }
                            if now >= *resend_at {
                                debug!("no welcome yet; saying hello again");
                                if let Err(e) = link.send(&self.hello()).await {
                                    return End::Lost(format!("cannot send hello: {e}"));
                                }
                                *resend_at = now + self.backoff.next_delay();
                            }
                        }
                        Phase::Live { every, dead_after, next_beat } => {
                            let silent = now.duration_since(last_heard);
                            if silent >= *dead_after {
                                return End::Lost(format!(
                                    "no message from the router for {} ms",
                                    silent.as_millis()
                                ));
                            }
                            if now >= *next_beat {
                                if let Err(e) = link.send(&FromWorker::Heartbeat).await {
                                    return End::Lost(format!("send failed: {e}"));
                                }
                                *next_beat = now + *every;
                                self.queues.prune();
                            }
                        }
                    }
                }
            }
        }
    }

    /// Answers a challenge with the proof of the secret; the session ends
    /// when there is no secret or the answer cannot be sent. A repeated
    /// challenge (our hello was resent before the auth arrived) is
    /// answered again.
    async fn on_challenge(&mut self, link: &mut Link, c: Challenge) -> Result<(), End> {
        let Some(secret) = self.cfg.secret.as_deref() else {
            // Reported by `run`'s error (WorkerError::SecretRequired).
            debug!("challenged for a secret, and none is configured");
            return Err(End::SecretRequired);
        };
        debug!(
            nonce_bytes = c.nonce.len(),
            "challenged by the router; proving the secret"
        );
        let answer = FromWorker::Auth(Auth {
            proof: auth::proof(secret.as_bytes(), &c.nonce).to_vec(),
        });
        match link.send(&answer).await {
            Ok(()) => Ok(()),
            Err(e) => Err(End::Lost(format!("cannot send auth: {e}"))),
        }
    }

    fn on_welcome(&mut self, w: Welcome) -> Phase {
        self.backoff.reset();
        if self.router_id.as_ref().is_some_and(|id| *id != w.router_id) {
            // A different router process: the connections we knew are gone.
            self.conns.clear();
            self.forget_connections();
        }
        let (every, dead_after) = liveness(&w);
        self.router_id = Some(w.router_id.clone());
        self.set_frame_limit(w.max_frame_bytes);
        let mut registrations = 0;
        self.spec.board.modify(self.spec.index, |s| {
            s.registrations += 1;
            s.state = State::Registered;
            s.router_id = Some(w.router_id.clone());
            registrations = s.registrations;
            true
        });
        info!(
            router.id = %w.router_id,
            heartbeat_ms = w.heartbeat_ms,
            liveness = w.liveness,
            max_frame_bytes = w.max_frame_bytes,
            registrations,
            services = ?self.cfg.services,
            "registered with the router"
        );
        Phase::Live {
            every,
            dead_after,
            next_beat: Instant::now() + every,
        }
    }

    async fn on_request(&mut self, link: &mut Link, mut req: Request) -> Result<(), LinkError> {
        if self.inflight.contains_key(&req.cid) {
            warn!(correlation.id = %req.cid, "ignoring a duplicate of a request in flight");
            return Ok(());
        }
        let found = self.request_types.get_mut(req.msg_type.as_str()).map(|t| {
            let inline = t.spawn_next == 0;
            t.spawn_next = t.spawn_next.saturating_sub(1);
            (t.handler.clone(), t.name.clone(), inline)
        });
        let (handler, name, inline) = match found {
            Some((h, n, i)) => (Some(h), Some(n), i),
            None => (None, None, false),
        };
        let refusal = match &handler {
            None => Some(self.handlers.no_request_handler(&req.msg_type)),
            // Crossed our bye: retryable, so the router can send it elsewhere.
            Some(_) if self.stopping => Some(HandlerError::transient("the worker is stopping")),
            Some(_) if self.inflight.len() >= self.cfg.capacity as usize => {
                warn!(
                    correlation.id = %req.cid,
                    capacity = self.cfg.capacity,
                    "the router sent more requests than the announced capacity"
                );
                Some(HandlerError::overloaded("the worker is at capacity"))
            }
            Some(_) => None,
        };
        if let Some(e) = refusal {
            debug!(correlation.id = %req.cid, msg.type = %req.msg_type, code = %e.code, "refusing request");
            return self
                .send_terminal(link, terminal(req.cid, Outcome::Failed(e)))
                .await;
        }
        // Invariant: without a refusal, a handler was found.
        let (Some(handler), Some(name)) = (handler, name) else {
            return Ok(());
        };
        let msg_type_key = req.msg_type;

        self.note_connection(&req.conn);
        let token = self.hard_stop.child_token();
        self.inflight.insert(
            req.cid.clone(),
            InFlight {
                token: token.clone(),
                cancelled: None,
            },
        );
        let timeout = Duration::from_millis(req.timeout_ms).min(MAX_TIMEOUT);
        // The request carries the claims (protocol ≥ this field); older
        // routers only sent them with `connect`.
        let claims = match req.claims.take() {
            Some(c) => Some(Arc::new(c)),
            None => self.conns.get(&req.conn).and_then(|c| c.claims.clone()),
        };
        let attempt = req.attempt;
        let spans = self.cfg.request_spans;
        let span = if spans {
            info_span!(
                "request",
                correlation.id = %req.cid,
                session.id = %req.conn,
                msg.type = %msg_type_key,
                attempt,
            )
        } else {
            Span::none()
        };
        let started = Instant::now();
        let deadline = started + timeout;
        let ctx = Context {
            cid: req.cid.as_str().into(),
            conn: req.conn.into(),
            route: self.names.route(req.route),
            service: self.names.service(req.service),
            msg_type: name,
            client_id: req.id,
            deadline,
            attempt: req.attempt,
            token: token.clone(),
            claims,
            handle: self.handle.clone(),
        };
        let mut work = start_request(handler, ctx, req.data, self.spec.permits.clone());
        let cid = req.cid;

        // A handler that finishes on its first poll (most do: an echo, a
        // lookup) is answered from here: no task, no channel, no timer.
        // One whose first poll took longer than `INLINE_MAX` runs on tasks
        // for its next `INLINE_BACKOFF` requests, so a handler that computes
        // before its first await cannot hold up the socket.
        if inline && !token.is_cancelled() && started < deadline {
            let polled = span.in_scope(|| {
                work.as_mut()
                    .poll(&mut std::task::Context::from_waker(noop_waker_ref()))
            });
            let took = started.elapsed();
            if took > INLINE_MAX {
                if let Some(t) = self.request_types.get_mut(msg_type_key.as_str()) {
                    t.spawn_next = INLINE_BACKOFF;
                }
                span.in_scope(|| {
                    debug!(
                        correlation.id = (!spans).then_some(tracing::field::display(&cid)),
                        poll_us = took.as_micros() as u64,
                        "the handler's first poll was slow; running this type on tasks for a while"
                    )
                });
            }
            if let Poll::Ready(outcome) = polled {
                let terminal = span.in_scope(|| {
                    let named = Named((!spans).then_some((cid.as_str(), attempt)));
                    log_outcome(&outcome, started, named);
                    terminal(cid, outcome)
                });
                drop(span);
                // Whatever the handler queued for its request (partial
                // replies, pushes) goes out before its terminal message.
                self.flush_queued(link).await?;
                return self.emit(link, Outgoing::new(terminal)).await;
            }
        }
        let handle = self.handle.clone();
        let attempt = (!spans).then_some(attempt);
        self.tracker.spawn(
            finish_request(work, cid, attempt, token, deadline, handle, started).instrument(span),
        );
        Ok(())
    }

    /// Writes the messages handlers and handles have queued so far (not
    /// those queued meanwhile by handlers on other threads: the queue is
    /// FIFO, so bounding the count is enough and the loop cannot run on).
    async fn flush_queued(&mut self, link: &mut Link) -> Result<(), LinkError> {
        for _ in 0..self.outbound.len() {
            let Ok(out) = self.outbound.try_recv() else {
                break;
            };
            self.emit(link, out).await?;
        }
        Ok(())
    }

    fn on_cancel(&mut self, c: Cancel) {
        match self.inflight.get_mut(&c.cid) {
            Some(entry) => {
                debug!(correlation.id = %c.cid, reason = %c.reason, "cancelling request");
                entry.cancelled.get_or_insert(c.reason);
                entry.token.cancel();
            }
            None => debug!(correlation.id = %c.cid, "cancel for a request that already ended"),
        }
    }

    /// Answers a request that did not decode, so its credit comes back.
    async fn on_bad_request(
        &mut self,
        link: &mut Link,
        cid: String,
        reason: String,
    ) -> Result<(), LinkError> {
        if self.inflight.contains_key(&cid) {
            warn!(correlation.id = %cid, "ignoring an undecodable duplicate of a request in flight");
            return Ok(());
        }
        let e = HandlerError::bad_request(format!("the request could not be decoded: {reason}"));
        self.send_terminal(link, terminal(cid, Outcome::Failed(e)))
            .await
    }

    /// Sends a terminal message the socket task wrote itself (a refusal),
    /// within the frame limit like any other.
    async fn send_terminal(&mut self, link: &mut Link, msg: FromWorker) -> Result<(), LinkError> {
        let out = Outgoing::new(msg);
        let Some(ForRequest { cid, .. }) = out.request else {
            return link.send_frame(out.frame).await;
        };
        match self.within_limit(cid, out.frame) {
            Some(frame) => link.send_frame(frame).await,
            None => Ok(()),
        }
    }

    /// Vets one message from a handler or handle and writes it.
    async fn emit(&mut self, link: &mut Link, mut out: Outgoing) -> Result<(), LinkError> {
        let frame = match out.request.take() {
            Some(request) => self.vet(request, std::mem::take(&mut out.frame)),
            None => match out.over(self.frame_limit) {
                // Its sender checked against an older limit (a second
                // welcome changed it): refuse it now, loudly.
                Some(e) => {
                    warn!(
                        kind = out.kind,
                        bytes = out.frame.len(),
                        limit = self.frame_limit,
                        "dropping a message over the router's frame limit"
                    );
                    out.acknowledge(Err(e));
                    return Ok(());
                }
                None => Some(std::mem::take(&mut out.frame)),
            },
        };
        let Some(frame) = frame else {
            out.acknowledge(Err(SendError::NotConnected));
            return Ok(());
        };
        let result = link.send_frame(frame).await;
        out.acknowledge(match &result {
            Ok(()) => Ok(()),
            Err(_) => Err(SendError::NotConnected),
        });
        result
    }

    /// Book-keeping for the replies and errors handlers send: the frame to
    /// write (maybe a replacement), or `None` to drop it.
    fn vet(&mut self, request: ForRequest, frame: Bytes) -> Option<Bytes> {
        let ForRequest { cid, terminal } = request;
        let Some(entry) = self.inflight.get(&cid) else {
            debug!(correlation.id = %cid, "dropping a message for a request that already ended");
            return None;
        };
        if let Some(reason) = &entry.cancelled {
            if !terminal {
                debug!(correlation.id = %cid, "dropping a partial reply of a cancelled request");
                return None;
            }
            // Whatever the handler managed to return, the router asked for
            // the request to stop, so it gets the `cancelled` it expects.
            let message = format!("request cancelled ({reason})");
            self.inflight.remove(&cid);
            return Some(Bytes::from(encode_from_worker(&FromWorker::Error(
                ErrorReply {
                    cid,
                    code: codes::CANCELLED.to_owned(),
                    message,
                    retryable: false,
                    retry_after_ms: None,
                },
            ))));
        }
        let over = self
            .frame_limit
            .is_some_and(|limit| frame.len() as u64 > limit);
        if terminal || over {
            if let Some(entry) = self.inflight.remove(&cid) {
                if over {
                    // The request ends here: stop the handler too.
                    entry.token.cancel();
                }
            }
        }
        self.within_limit(cid, frame)
    }

    /// `frame` (a reply or error of request `cid`) if the router accepts its
    /// size, else the `payload_too_large` error that replaces it.
    fn within_limit(&self, cid: String, frame: Bytes) -> Option<Bytes> {
        let Some(limit) = self.frame_limit else {
            return Some(frame);
        };
        if frame.len() as u64 <= limit {
            return Some(frame);
        }
        warn!(correlation.id = %cid, bytes = frame.len(), limit,
            "a reply exceeds the router's frame limit; answering payload_too_large");
        let replacement = encode_from_worker(&too_large_error(cid, frame.len(), limit));
        if replacement.len() as u64 > limit {
            // Only a giant correlation id gets here; nothing can be sent.
            warn!(
                limit,
                "even the payload_too_large answer exceeds the frame limit; dropped"
            );
            return None;
        }
        Some(Bytes::from(replacement))
    }

    fn set_frame_limit(&mut self, limit: Option<u64>) {
        self.frame_limit = limit;
        self.spec.board.modify(self.spec.index, |s| {
            let changed = s.max_frame_bytes != limit;
            s.max_frame_bytes = limit;
            changed
        });
    }

    fn event_ctx(
        &self,
        conn: &str,
        route_service: Option<(String, String)>,
        msg_type: Option<String>,
    ) -> EventContext {
        let known = self.conns.get(conn);
        let (route, service): (Arc<str>, Arc<str>) = match (route_service, known) {
            (Some((r, s)), _) => (r.into(), s.into()),
            (None, Some(k)) => (k.route.clone(), k.service.clone()),
            (None, None) => ("".into(), "".into()),
        };
        EventContext {
            conn: conn.into(),
            route,
            service,
            msg_type: msg_type.map(Into::into),
            claims: known.and_then(|k| k.claims.clone()),
            handle: self.handle.clone(),
        }
    }

    fn enqueue(&mut self, conn: &str, kind: &'static str, job: Job) {
        if self.tracker.is_closed() {
            debug!(session.id = %conn, kind, "stopping; dropping a connection event");
            return;
        }
        self.queues
            .enqueue(conn, kind, job, &self.tracker, &self.hard_stop);
    }

    fn on_event(&mut self, e: Event) {
        self.note_connection(&e.conn);
        let Some(handler) = self.handlers.events.get(&e.msg_type).cloned() else {
            info!(session.id = %e.conn, msg.type = %e.msg_type, "no handler for this fire-and-forget message: answering unknown_type");
            let error = self.handlers.no_event_handler(&e.msg_type);
            return self.answer_without_id(e.conn, "event", error);
        };
        let ctx = self.event_ctx(&e.conn, Some((e.route, e.service)), Some(e.msg_type));
        let data = e.data;
        self.enqueue(
            &e.conn,
            "event",
            Box::pin(async move { handler(ctx, data).await }),
        );
    }

    fn on_binary(&mut self, b: bridge_proto::Binary) {
        self.note_connection(&b.conn);
        let Some(handler) = self.handlers.binary.clone() else {
            info!(session.id = %b.conn, bytes = b.data.len(), "no binary handler: answering unknown_type");
            return self.answer_without_id(b.conn, "binary", no_binary_handler());
        };
        let ctx = self.event_ctx(&b.conn, Some((b.route, b.service)), None);
        let data = Bytes::from(b.data);
        self.enqueue(
            &b.conn,
            "binary",
            Box::pin(async move { handler(ctx, data).await }),
        );
    }

    /// Tells the client that a message without request id failed: a `push`
    /// of type `error`, which the router turns into an error frame without
    /// `id` (PROTOCOL.md §5, `push`). Queued behind the connection's earlier
    /// events, so it answers them in order.
    fn answer_without_id(&mut self, conn: String, kind: &'static str, error: HandlerError) {
        let handle = self.handle.clone();
        let data = error_push_data(&error);
        let to = conn.clone();
        self.enqueue(
            &conn,
            kind,
            Box::pin(async move {
                if let Err(e) = handle.push(to, "error", data).await {
                    debug!(error = %e, "could not answer a message without request id");
                }
            }),
        );
    }

    fn on_raw(&mut self, r: RawFrame) {
        self.note_connection(&r.conn);
        let Some(handler) = self.handlers.raw.clone() else {
            debug!(session.id = %r.conn, bytes = r.payload.len(), "no raw handler; frame dropped");
            return;
        };
        let ctx = self.event_ctx(&r.conn, None, None);
        let frame = Frame {
            binary: r.binary,
            payload: Bytes::from(r.payload),
        };
        self.enqueue(
            &r.conn,
            "raw",
            Box::pin(async move { handler(ctx, frame).await }),
        );
    }

    fn on_connect(&mut self, c: Connect) {
        self.note_connection(&c.conn);
        if self.conns.len() < MAX_KNOWN_CONNECTIONS || self.conns.contains_key(&c.conn) {
            self.conns.insert(
                c.conn.clone(),
                ConnInfo {
                    route: c.route.as_str().into(),
                    service: c.service.as_str().into(),
                    claims: c.claims.clone().map(Arc::new),
                },
            );
        }
        let Some(handler) = self.handlers.connect.clone() else {
            return;
        };
        let ctx = self.event_ctx(&c.conn, Some((c.route.clone(), c.service.clone())), None);
        let conn = c.conn.clone();
        self.enqueue(
            &conn,
            "connect",
            Box::pin(async move { handler(ctx, c).await }),
        );
    }

    fn on_disconnect(&mut self, d: Disconnect) {
        let conn = d.conn.clone();
        if let Some(handler) = self.handlers.disconnect.clone() {
            let ctx = self.event_ctx(&conn, Some((d.route.clone(), d.service.clone())), None);
            self.enqueue(
                &conn,
                "disconnect",
                Box::pin(async move { handler(ctx, d).await }),
            );
        }
        // The queue runs what it holds (the disconnect last) and then ends.
        self.queues.finish(&conn);
        self.conns.remove(&conn);
        if let Some(d) = &self.spec.directory {
            d.forget(&conn, self.spec.index);
        }
    }

    /// Messages for `conn` go to this session's router (several routers).
    fn note_connection(&self, conn: &str) {
        if let Some(d) = &self.spec.directory {
            d.note(conn, self.spec.index);
        }
    }

    /// This session's router is gone, or is another process now: its
    /// connections are gone with it.
    fn forget_connections(&self) {
        if let Some(d) = &self.spec.directory {
            d.forget_session(self.spec.index);
        }
    }

    /// Forgets every request in flight without answering it (the router
    /// that sent them is gone) and drops its handler.
    fn abandon_inflight(&mut self) {
        if !self.inflight.is_empty() {
            warn!(
                count = self.inflight.len(),
                "abandoning requests in flight on a lost router session"
            );
        }
        for (_, entry) in self.inflight.drain() {
            entry.token.cancel();
        }
    }

    /// The grace period is over: answer what is left and drop its handlers.
    async fn abandon_after_grace(&mut self, link: &mut Link) {
        warn!(
            count = self.inflight.len(),
            grace_ms = self.cfg.grace_period.as_millis() as u64,
            "grace period over; failing the requests still in flight"
        );
        let mut cids: Vec<String> = self.inflight.keys().cloned().collect();
        cids.sort();
        for cid in cids {
            if let Some(entry) = self.inflight.remove(&cid) {
                entry.token.cancel();
            }
            let msg = FromWorker::Error(ErrorReply {
                cid,
                code: codes::WORKER_ERROR.to_owned(),
                message: "the worker stopped before finishing the request".to_owned(),
                retryable: true,
                retry_after_ms: None,
            });
            if link.send(&msg).await.is_err() {
                return;
            }
        }
        self.hard_stop.cancel();
        self.flush_and_linger(link).await;
    }

    /// Sends what is already queued, then keeps the socket open for
    /// `linger` so its writer task can put the last bytes on the wire.
    async fn flush_and_linger(&mut self, link: &mut Link) {
        while let Ok(out) = self.outbound.try_recv() {
            if self.emit(link, out).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(self.cfg.linger).await;
    }

    fn set_state(&self, state: State) {
        self.spec.board.modify(self.spec.index, |s| {
            let changed = s.state != state;
            s.state = state;
            changed
        });
    }
}

/// Heartbeat interval and silence limit from a welcome.
fn liveness(w: &Welcome) -> (Duration, Duration) {
    // Guard against zeros from a buggy router: they would spin the timer.
    let every = Duration::from_millis(w.heartbeat_ms.max(10));
    (every, every * w.liveness.max(1))
}

fn drop_unsent(mut out: Outgoing) {
    debug!(
        kind = out.kind,
        "not connected to a router; dropping an outgoing message"
    );
    out.acknowledge(Err(SendError::NotConnected));
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_proto::Reply as WireReply;

    fn owner() -> (Owner, mpsc::Sender<Outgoing>) {
        let cfg = Arc::new(WorkerConfig::new(vec!["svc".into()]));
        let (tx, rx) = mpsc::channel(8);
        let (board, mut statuses, status_rx) = StatusBoard::new(1);
        let handle = WorkerHandle {
            sessions: vec![crate::sessions::SessionLink {
                endpoint: cfg.endpoint.as_str().into(),
                tx: tx.clone(),
                status: statuses.remove(0),
            }]
            .into(),
            home: Some(0),
            directory: None,
            stop: CancellationToken::new(),
            status: status_rx,
            worker_id: "w".into(),
            services: vec!["svc".to_owned()].into(),
        };
        let spec = SessionSpec {
            index: 0,
            endpoint: cfg.endpoint.clone(),
            several: false,
            board,
            directory: None,
            permits: None,
        };
        let owner = Owner::new(cfg, Arc::new(Handlers::default()), handle, rx, spec);
        (owner, tx)
    }

    fn reply(cid: &str, done: bool) -> FromWorker {
        FromWorker::Reply(WireReply {
            cid: cid.into(),
            done,
            msg_type: None,
            data: Value::Null,
        })
    }

    /// What the socket task would write for `msg` from a handler, decoded.
    fn vetted(o: &mut Owner, msg: FromWorker) -> Option<FromWorker> {
        let out = Outgoing::new(msg);
        let request = out.request.expect("a reply or an error");
        o.vet(request, out.frame)
            .map(|frame| bridge_proto::decode_from_worker(&frame).expect("valid frame"))
    }

    fn track(owner: &mut Owner, cid: &str) -> CancellationToken {
        let token = CancellationToken::new();
        owner.inflight.insert(
            cid.into(),
            InFlight {
                token: token.clone(),
                cancelled: None,
            },
        );
        token
    }

    #[test]
    fn vet_passes_one_terminal_and_drops_the_rest() {
        let (mut o, _tx) = owner();
        track(&mut o, "a");
        assert!(
            vetted(&mut o, reply("a", false)).is_some(),
            "partial passes"
        );
        assert!(
            vetted(&mut o, reply("a", true)).is_some(),
            "first terminal passes"
        );
        assert!(
            vetted(&mut o, reply("a", true)).is_none(),
            "second terminal dropped"
        );
        assert!(
            vetted(&mut o, reply("a", false)).is_none(),
            "late partial dropped"
        );
        assert!(vetted(&mut o, reply("unknown", true)).is_none());
    }

    #[test]
    fn a_reply_over_the_frame_limit_becomes_payload_too_large() {
        let (mut o, _tx) = owner();
        o.frame_limit = Some(200);
        let token = track(&mut o, "big");
        let big = |done| {
            FromWorker::Reply(WireReply {
                cid: "big".into(),
                done,
                msg_type: None,
                data: Value::String("x".repeat(300)),
            })
        };
        match vetted(&mut o, big(false)) {
            Some(FromWorker::Error(e)) => {
                assert_eq!(
                    (e.cid.as_str(), e.code.as_str()),
                    ("big", "payload_too_large")
                );
                assert!(e.message.starts_with("reply of 3"), "{}", e.message);
                assert!(
                    e.message.ends_with("frame limit of 200 bytes"),
                    "{}",
                    e.message
                );
            }
            other => panic!("expected payload_too_large, got {other:?}"),
        }
        assert!(token.is_cancelled(), "the handler is stopped");
        assert!(
            vetted(&mut o, reply("big", false)).is_none(),
            "nothing more"
        );
        assert!(vetted(&mut o, big(true)).is_none(), "nothing more");

        track(&mut o, "small");
        assert!(matches!(
            vetted(&mut o, reply("small", true)),
            Some(FromWorker::Reply(_))
        ));
        o.frame_limit = None;
        track(&mut o, "unlimited");
        let unlimited = FromWorker::Reply(WireReply {
            cid: "unlimited".into(),
            done: true,
            msg_type: None,
            data: Value::String("x".repeat(300)),
        });
        assert!(matches!(
            vetted(&mut o, unlimited),
            Some(FromWorker::Reply(_))
        ));
    }

    #[test]
    fn cancel_turns_the_terminal_into_cancelled() {
        let (mut o, _tx) = owner();
        let token = track(&mut o, "a");
        o.on_cancel(Cancel {
            cid: "a".into(),
            reason: "client".into(),
        });
        assert!(token.is_cancelled());
        assert!(
            vetted(&mut o, reply("a", false)).is_none(),
            "partials after cancel dropped"
        );
        match vetted(&mut o, reply("a", true)) {
            Some(FromWorker::Error(e)) => {
                assert_eq!(e.code, "cancelled");
                assert!(e.message.contains("client"), "{}", e.message);
            }
            other => panic!("expected cancelled error, got {other:?}"),
        }
        assert!(o.inflight.is_empty());
        // A cancel for something already finished is ignored.
        o.on_cancel(Cancel {
            cid: "a".into(),
            reason: "client".into(),
        });
    }

    #[test]
    fn names_are_shared_while_they_repeat() {
        let mut names = Names::default();
        let a = names.route("/ws".to_owned());
        let b = names.route("/ws".to_owned());
        assert!(
            Arc::ptr_eq(&a, &b),
            "a repeated route is the same allocation"
        );
        let c = names.route("/other".to_owned());
        assert_eq!(&*c, "/other");
        let d = names.service("/ws".to_owned());
        assert!(!Arc::ptr_eq(&a, &d), "routes and services are kept apart");
        assert_eq!((&*a, &*d), ("/ws", "/ws"));
    }

    #[test]
    fn abandon_cancels_everything() {
        let (mut o, _tx) = owner();
        let a = track(&mut o, "a");
        let b = track(&mut o, "b");
        o.abandon_inflight();
        assert!(a.is_cancelled() && b.is_cancelled());
        assert!(vetted(&mut o, reply("a", true)).is_none());
    }

    #[test]
    fn bad_frames_are_skipped_and_other_versions_named() {
        assert!(matches!(
            decode(ZmqMessage::from(vec![0xc1u8])),
            Decoded::Skipped
        ));
        let mut two = ZmqMessage::from(bridge_proto::encode_to_worker(&ToWorker::Heartbeat));
        two.push_back(Bytes::from_static(b"x"));
        assert!(matches!(decode(two), Decoded::Skipped));
        let one = ZmqMessage::from(bridge_proto::encode_to_worker(&ToWorker::Heartbeat));
        assert!(matches!(decode(one), Decoded::Message(m) if *m == ToWorker::Heartbeat));
        // fixmap(2) "v" 3 "kind" "heartbeat"
        let mut v3 = vec![0x82, 0xa1, b'v', 0x03, 0xa4];
        v3.extend_from_slice(b"kind");
        v3.push(0xa9);
        v3.extend_from_slice(b"heartbeat");
        match decode(ZmqMessage::from(v3)) {
            Decoded::OtherVersion(text) => assert!(text.contains('3'), "{text}"),
            _ => panic!("a v3 frame must be reported as another version"),
        }
        // Version 1 (an older router) still decodes.
        let v1 = bridge_proto::encode_to_worker_as(1, &ToWorker::Heartbeat);
        assert!(matches!(
            decode(ZmqMessage::from(v1)),
            Decoded::Message(m) if *m == ToWorker::Heartbeat
        ));
    }

    #[test]
    fn an_undecodable_request_with_a_readable_cid_is_owed_bad_request() {
        let bad = rmp_serde::to_vec_named(&serde_json::json!({
            "v": 2, "kind": "request", "cid": "c9", "timeout_ms": "soon"
        }))
        .unwrap();
        match decode(ZmqMessage::from(bad)) {
            Decoded::BadRequest { cid, reason } => {
                assert_eq!(cid, "c9");
                assert!(reason.contains("request"), "{reason}");
            }
            _ => panic!("expected BadRequest"),
        }
        // Another kind, or a cid that is not a string: nothing to answer.
        for other in [
            serde_json::json!({"v": 2, "kind": "event", "cid": "c9"}),
            serde_json::json!({"v": 2, "kind": "request", "cid": 9}),
        ] {
            let bytes = rmp_serde::to_vec_named(&other).unwrap();
            assert!(matches!(decode(ZmqMessage::from(bytes)), Decoded::Skipped));
        }
        // An unsupported version is not answered, even for a request.
        let v3 = rmp_serde::to_vec_named(&serde_json::json!({
            "v": 3, "kind": "request", "cid": "c9"
        }))
        .unwrap();
        assert!(matches!(
            decode(ZmqMessage::from(v3)),
            Decoded::OtherVersion(_)
        ));
    }
}
