//! One WebSocket session: from the welcome frame to the close frame.
//!
//! Written against `Stream`/`Sink` of axum WebSocket messages so its logic
//! does not depend on a real socket. A session owns its socket and is the
//! only writer to it; everything else (bridge replies, pushes,
//! publications) reaches it through the connection's bounded outbound queue
//! in the [`Hub`](crate::hub::Hub), and the writer stamps `seq` in send order.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::extract::ws::{CloseFrame, Message};
use bridge_proto::{self as proto, codes};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use serde_json::{json, Value};
use tracing::{debug, info, Instrument};

use crate::{
    bridge::Busy,
    broker::{BreakerTicket, Command, RequestCmd},
    client::{self, unix_ms, ClientMessage, OutFrame, Outbound},
    hub::ConnShared,
    ids::{Cid, ConnId},
    policy::{
        breaker::Outcome,
        ratelimit::{retry_after_ms, Limiter},
        runtime::{ConnectionSlot, RouteRuntime},
    },
    routes::{Route, RouteTable},
    state::AppState,
};

/// Message types the router answers itself; they never reach a worker.
pub const ROUTER_TYPES: [&str; 4] = ["ping", "subscribe", "unsubscribe", "cancel"];

/// Everything a session needs to start.
pub struct SessionStart {
    pub conn: ConnId,
    pub route: Arc<Route>,
    pub connect: proto::Connect,
    pub runtime: Arc<RouteRuntime>,
    /// Counts the connection against the route's limit until the session ends.
    pub slot: ConnectionSlot,
}

/// How a session ended: the close code it sent or received, and why.
struct Ending {
    code: u16,
    reason: String,
}

/// Runs a session to its end. Never panics on client input.
pub async fn run<S>(socket: S, app: Arc<AppState>, start: SessionStart)
where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message> + Unpin,
{
    let span = tracing::info_span!("session", session.id = %start.conn, route = %start.route.path);
    async move {
        let (shared, outbound) = ConnShared::new(
            start.conn.clone(),
            start.route.path.clone(),
            app.settings.max_outbound_bytes as usize,
        );
        app.hub.register(shared.clone());
        info!(remote = %start.connect.remote, path = %start.connect.path, "connection opened");
        let claims = start.connect.claims.clone();
        let path = start.connect.path.clone();
        let route_name = start.route.path.clone();
        app.metrics.connection_opened(&route_name);
        app.bridge.send(Command::Connect(Box::new(start.connect))).await;

        let limiter = Limiter::per_second(
            start.route.rate_limit.messages_per_second,
            start.route.rate_limit.message_burst,
        );
        let mut session = Session {
            app: app.clone(),
            path,
            route: start.route,
            runtime: start.runtime,
            shared: shared.clone(),
            seq: 0,
            limiter,
            rejections: 0,
            closing: None,
            claims,
        };
        let ending = session.serve(socket, outbound).await;
        drop(start.slot);
        app.metrics.connection_closed(&route_name, ending.code);
        if shared.dropped.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            app.metrics.outbound_dropped();
            if shared.over_bytes.load(std::sync::atomic::Ordering::Relaxed) {
                app.metrics.bound_hit("outbound_bytes");
            }
        }

        app.hub.unregister(&start.conn);
        let cids = shared.drain_inflight();
        app.bridge
            .send(Command::Disconnect {
                conn: start.conn,
                code: ending.code,
                reason: ending.reason.clone(),
                cids,
            })
            .await;
        if matches!(ending.code, 1000 | 1001 | 1005 | 1006 | 1012) {
            info!(code = ending.code, reason = %ending.reason, "connection closed");
        } else {
            info!(code = ending.code, reason = %ending.reason, "connection closed by policy or error");
        }
    }
    .instrument(span)
    .await
}

struct Session {
    app: Arc<AppState>,
    route: Arc<Route>,
    /// The request path the client used (the route is the pattern).
    path: String,
    runtime: Arc<RouteRuntime>,
    shared: Arc<ConnShared>,
    seq: u64,
    /// This connection's message rate.
    limiter: Limiter,
    /// Consecutive messages refused by a rate limit.
    rejections: u32,
    /// Set when the session stops taking requests (shutdown, route removed).
    closing: Option<Closing>,
    /// Verified token claims, forwarded with every request.
    claims: Option<Value>,
}

/// A session on its way out: it closes with `code` when its last in-flight
/// request finishes, or at `deadline`.
struct Closing {
    deadline: tokio::time::Instant,
    code: u16,
    reason: &'static str,
}

/// The socket failed while writing: the peer is gone.
struct Gone;

impl Session {
    async fn serve<S>(
        &mut self,
        mut socket: S,
        mut outbound: tokio::sync::mpsc::Receiver<Outbound>,
    ) -> Ending
    where
        S: Stream<Item = Result<Message, axum::Error>> + Sink<Message> + Unpin,
    {
        // Rare or one-off awaits are boxed: their state would otherwise make
        // every idle session's future as large as the largest of them.
        let welcome = Outbound::from(self.welcome());
        if !self.route.raw && Box::pin(self.write(&mut socket, welcome)).await.is_err() {
            return Ending {
                code: 1006,
                reason: "closed during welcome".into(),
            };
        }
        let ping_every = self.app.settings.client_ping();
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        let mut last_heard = Instant::now();
        let draining = self.app.draining.clone();
        let mut routes = self.app.registry.subscribe();
        routes.mark_unchanged();

        loop {
            // While closing, close once no request is in flight (or the time is up).
            if let Some(c) = &self.closing {
                if self.shared.inflight_count() == 0 || tokio::time::Instant::now() >= c.deadline {
                    let (code, reason) = (c.code, c.reason);
                    return Box::pin(self.close(&mut socket, code, reason)).await;
                }
            }
            let closing_at = self.closing.as_ref().map(|c| c.deadline);
            tokio::select! {
                biased;
                _ = self.shared.kill.cancelled() => {
                    let kill = self.shared.kill_reason().unwrap_or(crate::hub::Kill { code: 1011, reason: "closed".into(), flush: false });
                    if kill.flush {
                        Box::pin(self.flush_queue(&mut socket, &mut outbound)).await;
                    }
                    return Box::pin(self.close(&mut socket, kill.code, &kill.reason)).await;
                }
                _ = draining.cancelled(), if self.closing.is_none() => {
                    self.start_closing(1001, "server shutting down");
                }
                _ = tokio::time::sleep_until(closing_at.unwrap_or_else(tokio::time::Instant::now)), if closing_at.is_some() => {}
                Ok(()) = routes.changed() => {
                    let table = routes.borrow_and_update().clone();
                    self.on_routes_changed(&table);
                }
                // Ping and reads before writes: a worker that keeps the outbound
                // queue busy must not starve the client's frames (a `cancel`) or
                // the keep-alive; reads are bounded by the rate limits.
                _ = ping.tick() => {
                    if last_heard.elapsed() > ping_every * 3 {
                        return Box::pin(self.close(&mut socket, 1001, "no answer to pings")).await;
                    }
                    if Box::pin(self.send_or_give_up(&mut socket, vec![Message::Ping(bytes::Bytes::new())])).await.is_err() {
                        return self.gone();
                    }
                }
                incoming = socket.next() => {
                    last_heard = Instant::now();
                    match incoming {
                        None => return Ending { code: 1006, reason: "connection dropped".into() },
                        Some(Err(e)) => {
                            let (code, reason) = classify(e);
                            if code == 1006 {
                                return Ending { code, reason };
                            }
                            let ending = Box::pin(self.close(&mut socket, code, &reason)).await;
                            // The rest of the bad message may still sit unread
                            // in the socket, and closing a socket with unread
                            // data sends a TCP reset, which can destroy the
                            // close frame before the client reads it. Linger.
                            tokio::time::sleep(ERROR_CLOSE_LINGER).await;
                            return ending;
                        }
                        Some(Ok(Message::Close(frame))) => {
                            let (code, reason) = frame
                                .map(|f| (f.code, f.reason.to_string()))
                                .unwrap_or((1005, String::new()));
                            debug!(code, "client closed");
                            // The library queued our close reply: flush it out.
                            let _ = tokio::time::timeout(CLOSE_HANDSHAKE, socket.flush()).await;
                            return Ending { code, reason };
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Ok(Message::Text(text))) => {
                            if !self.admit_message(|| client::parse(text.as_str()).ok().and_then(|m| m.id)) {
                                continue;
                            }
                            if self.route.raw {
                                self.forward_raw(false, text.as_bytes().to_vec().into());
                            } else if self.closing.is_some() {
                                self.refuse_while_closing(text.as_str());
                            } else {
                                self.on_text(text.as_str());
                            }
                        }
                        Some(Ok(Message::Binary(data))) => {
                            if !self.admit_message(|| None) {
                                continue;
                            }
                            if self.route.raw {
                                self.forward_raw(true, data);
                            } else {
                                self.on_binary(data);
                            }
                        }
                    }
                }
                Some(out) = outbound.recv() => {
                    match Box::pin(self.write_batch(&mut socket, out, &mut outbound)).await {
                        Ok(None) => {}
                        Ok(Some((code, reason))) => return Box::pin(self.close(&mut socket, code, &reason)).await,
                        Err(Gone) => return self.gone(),
                    }
                }
            }
        }
    }

    /// The peer stopped reading (or the socket failed): the session ends
    /// without a close handshake, with the kill reason if there is one.
    fn gone(&self) -> Ending {
        match self.shared.kill_reason() {
            Some(k) => Ending {
                code: k.code,
                reason: k.reason,
            },
            None => Ending {
                code: 1006,
                reason: "write failed or timed out".into(),
            },
        }
    }

    /// Stops taking requests; the session closes with `code` once its
    /// in-flight requests are done, or after the drain timeout.
    fn start_closing(&mut self, code: u16, reason: &'static str) {
        if self.closing.is_none() {
            debug!(code, reason, "closing after in-flight requests");
            self.closing = Some(Closing {
                deadline: tokio::time::Instant::now() + self.app.settings.drain_timeout(),
                code,
                reason,
            });
        }
    }

    /// A new route table: follow this route's new policies, or close with
    /// 1012 if the route is gone.
    fn on_routes_changed(&mut self, table: &RouteTable) {
        match table.get(&self.route.path) {
            None => {
                info!("route removed from the routes: closing once in-flight requests finish");
                self.start_closing(1012, "route removed");
            }
            Some(new) if **new != *self.route => {
                // Raw-ness and the service are fixed for the life of a
                // connection (its framing and its worker depend on them).
                if new.raw != self.route.raw || new.service != self.route.service {
                    info!(
                        "route changed its kind or service: closing once in-flight requests finish"
                    );
                    self.start_closing(1012, "route changed");
                    return;
                }
                if new.rate_limit != self.route.rate_limit {
                    self.limiter = Limiter::per_second(
                        new.rate_limit.messages_per_second,
                        new.rate_limit.message_burst,
                    );
                }
                debug!("route policies updated");
                self.route = new.clone();
            }
            Some(_) => {}
        }
    }

    fn welcome(&self) -> OutFrame {
        OutFrame::push(
            "welcome",
            None,
            json!({
                "session_id": self.shared.id.0,
                "route": self.route.path,
                "path": self.path,
                "heartbeat_ms": self.app.settings.client_ping_ms,
                "limits": {
                    "max_message_bytes": self.route.max_message_bytes,
                    "max_in_flight": self.route.max_in_flight,
                },
            }),
        )
    }

    async fn write<S>(&mut self, socket: &mut S, out: Outbound) -> Result<(), Gone>
    where
        S: Sink<Message> + Unpin,
    {
        match self.encode(out) {
            Some(msg) => self.send_or_give_up(socket, vec![msg]).await,
            None => Ok(()),
        }
    }

    /// Writes `first` and whatever else is already queued (up to a batch),
    /// with one flush: a stream of small frames costs one syscall per batch
    /// rather than per frame, so a reading client keeps up with a fast
    /// worker. A queued close ends the batch and is returned.
    async fn write_batch<S>(
        &mut self,
        socket: &mut S,
        first: Outbound,
        outbound: &mut tokio::sync::mpsc::Receiver<Outbound>,
    ) -> Result<Option<(u16, String)>, Gone>
    where
        S: Sink<Message> + Unpin,
    {
        let mut msgs = Vec::new();
        let mut close = None;
        let mut next = Some(first);
        while let Some(mut out) = next.take() {
            self.shared.dequeued(&mut out);
            if let Outbound::Close { code, reason } = out {
                close = Some((code, reason));
                break;
            }
            msgs.extend(self.encode(out));
            if msgs.len() < WRITE_BATCH {
                next = outbound.try_recv().ok();
            }
        }
        if !msgs.is_empty() {
            self.send_or_give_up(socket, msgs).await?;
        }
        Ok(close)
    }

    /// Writes what is queued right now (before a close that is not the
    /// queue's fault: answers already admitted still reach the client).
    /// Bounded by the queue's length and [`CLOSE_HANDSHAKE`].
    async fn flush_queue<S>(
        &mut self,
        socket: &mut S,
        outbound: &mut tokio::sync::mpsc::Receiver<Outbound>,
    ) where
        S: Sink<Message> + Unpin,
    {
        let mut msgs = Vec::new();
        while let Ok(mut out) = outbound.try_recv() {
            self.shared.dequeued(&mut out);
            if matches!(out, Outbound::Close { .. }) {
                break;
            }
            msgs.extend(self.encode(out));
        }
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE, send_all(socket, msgs)).await;
    }

    /// The WebSocket message for an outbound item (`None` for a close).
    /// Items taken off the queue are `dequeued` by the caller first.
    fn encode(&mut self, out: Outbound) -> Option<Message> {
        let metrics = &self.app.metrics;
        let route = &self.route.path;
        let msg = match out {
            Outbound::Frame(mut frame) => {
                metrics.message_out(
                    route,
                    &frame.msg_type,
                    frame.error.as_ref().map(|e| e.code.as_str()),
                );
                let text = frame.to_json(self.seq);
                self.seq += 1;
                Message::Text(text.into())
            }
            Outbound::Binary(b) => {
                metrics.message_out(route, "binary", None);
                Message::Binary(b)
            }
            Outbound::Raw {
                binary: true,
                payload,
            } => {
                metrics.message_out(route, "raw", None);
                Message::Binary(payload)
            }
            Outbound::Raw {
                binary: false,
                payload,
            } => {
                metrics.message_out(route, "raw", None);
                match String::from_utf8(payload.to_vec()) {
                    Ok(s) => Message::Text(s.into()),
                    Err(_) => {
                        debug!("worker sent a raw text frame that is not UTF-8: sent as binary");
                        Message::Binary(payload)
                    }
                }
            }
            Outbound::Close { .. } => return None,
        };
        Some(msg)
    }

    /// Sends one message, unless the peer stops reading: a send that waits
    /// longer than three ping intervals, or while the connection is being
    /// killed (its outbound queue overflowed), gives up on the peer.
    async fn send_or_give_up<S>(&self, socket: &mut S, msgs: Vec<Message>) -> Result<(), Gone>
    where
        S: Sink<Message> + Unpin,
    {
        let patience = self.app.settings.client_ping() * 3;
        tokio::select! {
            r = send_all(socket, msgs) => r.map_err(|_| Gone),
            _ = self.shared.kill.cancelled() => Err(Gone),
            _ = tokio::time::sleep(patience) => Err(Gone),
        }
    }

    /// Sends a close frame and waits (briefly) for the peer's, as RFC 6455
    /// §7.1 asks; a peer that does not read or answer is dropped.
    async fn close<S>(&mut self, socket: &mut S, code: u16, reason: &str) -> Ending
    where
        S: Stream<Item = Result<Message, axum::Error>> + Sink<Message> + Unpin,
    {
        // A close reason is at most 123 bytes (RFC 6455 §5.5: 125 minus the code).
        let mut cut = reason.len().min(123);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let frame = CloseFrame {
            code,
            reason: reason[..cut].to_owned().into(),
        };
        let handshake = async {
            if socket.send(Message::Close(Some(frame))).await.is_ok() {
                // Read until the peer's close frame ends the stream.
                while let Some(Ok(_)) = socket.next().await {}
            }
        };
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE, handshake).await;
        Ending {
            code,
            reason: reason.to_owned(),
        }
    }

    /// Sends a frame from the session itself (through the queue, so `seq`
    /// and ordering stay with the writer).
    fn reply(&self, frame: OutFrame) {
        self.shared.send(frame.into());
    }

    /// Applies the message rate limits (connection, then route). A refused
    /// message gets `rate_limited` with `retry_after_ms` (raw routes have no
    /// error frame, so they are closed at once); a connection that keeps
    /// sending through `close_after_rejections` refusals is closed with 1008.
    fn admit_message(&mut self, id_of: impl FnOnce() -> Option<Value>) -> bool {
        if !self.app.settings.enable_rate_limit {
            return true;
        }
        let policy = self.route.rate_limit;
        let wait = match self.limiter.check() {
            Err(wait) => Some((wait, "connection")),
            Ok(()) => self
                .runtime
                .limits(&policy)
                .messages
                .check()
                .err()
                .map(|w| (w, "route")),
        };
        let Some((wait, scope)) = wait else {
            self.rejections = 0;
            return true;
        };
        self.app.metrics.rate_limited(&self.route.path, scope);
        self.rejections += 1;
        if self.route.raw || self.rejections >= policy.close_after_rejections.max(1) {
            info!(
                rejections = self.rejections,
                "closing: rate limit exceeded repeatedly"
            );
            self.shared.close(1008, "rate limit exceeded");
            return false;
        }
        self.reply(OutFrame::error(
            id_of(),
            None,
            codes::RATE_LIMITED,
            format!(
                "more than {} messages per second on this connection or route",
                policy.messages_per_second
            ),
            Some(retry_after_ms(wait)),
        ));
        false
    }

    /// Fails fast while the route's circuit is open; `Ok` carries the
    /// admission to hand to the broker with the request.
    fn admit_request(&self) -> Result<BreakerTicket, u64> {
        let policy = self.route.breaker;
        match self
            .runtime
            .breaker
            .admit(std::time::Instant::now(), &policy)
        {
            Ok(admit) => Ok(BreakerTicket {
                breaker: self.runtime.breaker.clone(),
                admit,
                policy,
            }),
            Err(wait) => Err(retry_after_ms(wait)),
        }
    }

    /// For messages that get no reply (events, binary frames): refuse them
    /// while the circuit is open, without taking the half-open probe slot.
    fn circuit_is_open(&self) -> Option<u64> {
        self.runtime
            .breaker
            .retry_after(std::time::Instant::now())
            .map(retry_after_ms)
    }

    fn circuit_open_error(&self, id: Option<Value>, retry_after: u64) -> OutFrame {
        OutFrame::error(
            id,
            None,
            codes::CIRCUIT_OPEN,
            format!(
                "{} is failing: its circuit breaker is open",
                self.route.path
            ),
            Some(retry_after),
        )
    }

    fn forward_raw(&self, binary: bool, payload: bytes::Bytes) {
        self.app.metrics.message_in(&self.route.path, "raw");
        let cmd = Command::Raw {
            conn: self.shared.id.clone(),
            binary,
            payload,
        };
        if self.app.bridge.try_send(cmd).is_err() {
            self.shared.close(1013, "router overloaded");
        }
    }

    fn on_binary(&self, data: bytes::Bytes) {
        self.app.metrics.message_in(&self.route.path, "binary");
        if !self.route.binary {
            self.reply(OutFrame::error(
                None,
                None,
                codes::BAD_REQUEST,
                format!("binary frames are not accepted on {}", self.route.path),
                None,
            ));
            return;
        }
        let cmd = Command::Binary {
            conn: self.shared.id.clone(),
            data,
        };
        if self.app.bridge.try_send(cmd).is_err() {
            self.reply(OutFrame::error(
                None,
                None,
                codes::OVERLOADED,
                "router overloaded: binary frame not delivered",
                Some(100),
            ));
        }
    }

    fn refuse_while_closing(&self, text: &str) {
        let reason = self.closing.as_ref().map_or("closing", |c| c.reason);
        if let Ok(msg) = client::parse(text) {
            self.app.metrics.message_in(&self.route.path, &msg.msg_type);
            if msg.id.is_some() {
                self.reply(OutFrame::error(
                    msg.id,
                    None,
                    codes::OVERLOADED,
                    format!("this connection is closing ({reason}): no new requests"),
                    Some(1000),
                ));
            }
        }
    }

    fn on_text(&self, text: &str) {
        let msg = match client::parse(text) {
            Ok(m) => {
                self.app.metrics.message_in(&self.route.path, &m.msg_type);
                m
            }
            Err(bad) => {
                self.app.metrics.message_in(&self.route.path, "invalid");
                debug!(bytes = text.len(), error = %bad.message, "bad client message");
                self.reply(OutFrame::error(
                    bad.id,
                    None,
                    codes::BAD_REQUEST,
                    bad.message,
                    None,
                ));
                return;
            }
        };
        match msg.msg_type.as_str() {
            "ping" => self.reply(OutFrame::reply(
                "pong",
                msg.id.clone(),
                None,
                json!({ "server_time_ms": unix_ms() }),
                true,
            )),
            "subscribe" | "unsubscribe" => self.on_topic(msg),
            "cancel" => self.on_cancel(msg),
            _ => self.forward(msg, text.len()),
        }
    }

    fn on_topic(&self, msg: ClientMessage) {
        let Some(topic) = msg.data.get("topic").and_then(Value::as_str) else {
            self.reply(OutFrame::error(
                msg.id,
                None,
                codes::BAD_REQUEST,
                "data.topic must be a string",
                None,
            ));
            return;
        };
        let subscribe = msg.msg_type == "subscribe";
        if subscribe {
            if let Err(e) = self.app.hub.subscribe(&self.shared.id, topic) {
                self.reply(OutFrame::error(
                    msg.id,
                    None,
                    codes::BAD_REQUEST,
                    e.to_string(),
                    None,
                ));
                return;
            }
        } else {
            self.app.hub.unsubscribe(&self.shared.id, topic);
        }
        if msg.id.is_some() {
            let kind = if subscribe {
                "subscribed"
            } else {
                "unsubscribed"
            };
            self.reply(OutFrame::reply(
                kind,
                msg.id,
                None,
                json!({ "topic": topic }),
                true,
            ));
        }
    }

    fn on_cancel(&self, msg: ClientMessage) {
        let target = msg
            .data
            .get("id")
            .filter(|v| v.is_string() || v.is_number());
        let Some(target) = target else {
            self.reply(OutFrame::error(
                msg.id,
                None,
                codes::BAD_REQUEST,
                "data.id must name the request to cancel",
                None,
            ));
            return;
        };
        let key = target.to_string();
        match self.shared.cid_of(&key) {
            Some(cid) => {
                // The cancelled request gets its own terminal `cancelled` frame.
                let _ = self.app.bridge.try_send(Command::Cancel {
                    cid,
                    reason: "client",
                });
                if msg.id.is_some() {
                    self.reply(OutFrame::reply(
                        "cancel",
                        msg.id,
                        None,
                        json!({ "id": target }),
                        true,
                    ));
                }
            }
            None => self.reply(OutFrame::error(
                msg.id,
                None,
                codes::BAD_REQUEST,
                format!("no request in flight with id {key}"),
                None,
            )),
        }
    }

    /// Hands a client message to the bridge; `size`: its frame's bytes.
    fn forward(&self, msg: ClientMessage, size: usize) {
        if let Some(allowed) = &self.route.allowed_types {
            if !allowed.contains(&msg.msg_type) {
                self.reply(OutFrame::error(
                    msg.id,
                    None,
                    codes::UNKNOWN_TYPE,
                    format!(
                        "type `{}` is not accepted on {}",
                        msg.msg_type, self.route.path
                    ),
                    None,
                ));
                return;
            }
        }
        let conn = self.shared.id.clone();
        let Some(id) = msg.id else {
            if let Some(wait) = self.circuit_is_open() {
                self.reply(self.circuit_open_error(None, wait));
                return;
            }
            let cmd = Command::Event {
                conn,
                msg_type: msg.msg_type,
                data: msg.data,
            };
            if self.app.bridge.try_send(cmd).is_err() {
                self.reply(OutFrame::error(
                    None,
                    None,
                    codes::OVERLOADED,
                    "router overloaded: message not delivered",
                    Some(100),
                ));
            }
            return;
        };
        if self.shared.inflight_count() >= self.route.max_in_flight {
            self.reply(OutFrame::error(
                Some(id),
                None,
                codes::OVERLOADED,
                format!(
                    "at most {} requests may be in flight per connection",
                    self.route.max_in_flight
                ),
                Some(100),
            ));
            return;
        }
        let key = id.to_string();
        let cid = Cid::new();
        if !self.shared.begin_request(key.clone(), cid.clone()) {
            self.reply(OutFrame::error(
                Some(id),
                None,
                codes::BAD_REQUEST,
                "a request with this id is already in flight",
                None,
            ));
            return;
        }
        let ticket = match self.admit_request() {
            Ok(t) => t,
            Err(wait) => {
                self.shared.end_request(&key, &cid);
                self.reply(self.circuit_open_error(Some(id), wait));
                return;
            }
        };
        debug!(correlation.id = %cid, r#type = %msg.msg_type, bytes = msg.data.to_string().len(), "request");
        self.app.metrics.request_started(&self.route.path);
        let cmd = Command::Request(Box::new(RequestCmd {
            cid: cid.clone(),
            conn,
            client_key: key.clone(),
            client_id: id.clone(),
            route: self.route.path.clone(),
            service: self.route.service.clone(),
            msg_type: msg.msg_type,
            data: msg.data,
            timeout: self.route.request_timeout,
            affinity: self.route.affinity,
            retries: self.route.retries,
            breaker: Some(ticket),
            claims: self.claims.clone(),
            size,
        }));
        if let Err(Busy(cmd)) = self.app.bridge.try_send(cmd) {
            // Give back a half-open probe slot this request would hold forever.
            if let Command::Request(req) = *cmd {
                if let Some(t) = req.breaker {
                    t.breaker.record(
                        t.admit,
                        Outcome::Neutral,
                        std::time::Instant::now(),
                        &t.policy,
                    );
                }
            }
            self.shared.end_request(&key, &cid);
            self.reply(OutFrame::error(
                Some(id),
                Some(&cid.0),
                codes::OVERLOADED,
                "router overloaded: request not accepted",
                Some(100),
            ));
        }
    }
}

/// Feeds every message, then flushes once.
async fn send_all<S>(socket: &mut S, msgs: Vec<Message>) -> Result<(), S::Error>
where
    S: Sink<Message> + Unpin,
{
    for m in msgs {
        socket.feed(m).await?;
    }
    socket.flush().await
}

/// How long a socket closed for bad input stays open after its close frame.
const ERROR_CLOSE_LINGER: Duration = Duration::from_millis(300);

/// Most frames written with one flush.
const WRITE_BATCH: usize = 64;

/// How long a close handshake may take before the socket is dropped.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(2);

/// Close code for a failed read (README, client protocol): 1009 too big, 1007 bad UTF-8,
/// 1002 protocol violation.
/// 1006: the peer is gone, nothing to send.
fn classify(e: axum::Error) -> (u16, String) {
    use tungstenite::{error::ProtocolError, Error as E};
    let inner = e.into_inner();
    match inner.downcast_ref::<E>() {
        Some(E::Capacity(c)) => (1009, format!("message too big: {c}")),
        Some(E::Utf8(_)) => (1007, "text frame is not valid UTF-8".into()),
        Some(E::Protocol(ProtocolError::ResetWithoutClosingHandshake))
        | Some(E::Io(_) | E::ConnectionClosed | E::AlreadyClosed) => {
            (1006, "connection dropped without a close frame".into())
        }
        Some(E::Protocol(p)) => (1002, format!("protocol error: {p}")),
        _ => (1011, format!("read failed: {inner}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_types_are_the_documented_ones() {
        assert_eq!(ROUTER_TYPES, ["ping", "subscribe", "unsubscribe", "cancel"]);
    }
}
