//! The session's driver: the async loop around the state machine.
//!
//! It owns the socket, the timers (keep-alive pings, the closing deadline)
//! and the watches (kill switch, drain signal, route table), and feeds each
//! event to [`Inbound`] or [`Writer`]. Everything it decides itself is about
//! the socket: read errors and their close codes, the client's close frame,
//! unanswered pings.

use std::{future::Future, pin::Pin, sync::Arc, task::Poll, time::Duration};

use axum::extract::ws::Message;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::{
    sync::watch,
    time::{Instant, Sleep},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, Instrument};

use serde_json::{json, Value};

use super::{
    guard::Attachment,
    inbound::{Actions, Inbound, InboundConfig, ResumeRequest},
    parking::{self, SessionState},
    writer::{Gone, Writer, CLOSE_HANDSHAKE},
    Bridge, Ending, Env, SessionStart, Socket,
};
use crate::{
    broker::Command,
    client::{OutFrame, Outbound},
    hub::{ConnShared, Kill},
    registry::RouteRegistry,
    resume::{Claimed, Refusal, Token},
    routes::{Route, RouteTable},
};

/// How long a resume waits for the session's other connection to yield.
const TAKEOVER_WAIT: Duration = Duration::from_secs(2);

/// At most this many frames that a socket took before its session left it
/// are still read (the HTTP fallback's queue holds fewer).
const LEFT_BEHIND: usize = 512;

/// How long a socket closed for bad input stays open after its close frame.
const ERROR_CLOSE_LINGER: Duration = Duration::from_millis(300);

/// Starts a session: it is attached to the hub and the bridge is told of
/// it at once (a `connect` that finds the bridge queue full is sent first
/// thing by the returned future); the future runs it to its end. Never
/// panics on client input.
///
/// The future is what an idle connection costs most of, so it holds only
/// the session, the socket and the `connect` that may still be on its way;
/// whatever is set up once is done here, before it (ARCHITECTURE.md,
/// "Session lifecycle").
pub(crate) fn run<S, B>(socket: S, env: Env<B>, start: SessionStart) -> impl Future<Output = ()>
where
    S: Socket,
    B: Bridge,
{
    let span = tracing::info_span!("session", session.id = %start.conn, route = %start.route.path);
    let (mut session, connect) = span.in_scope(|| Session::start(env, start, span.clone()));
    let mut socket = socket;
    // The block uses what it captures in place: rebinding them inside
    // would store each twice in the future.
    async move {
        if let Some(connect) = connect {
            // Rare or one-off awaits are boxed: their state would otherwise
            // make every idle session's future as large as the largest.
            Box::pin(session.env.bridge.send(*connect)).await;
        }
        let mut outcome = session.serve(&mut socket).await;
        if matches!(outcome, Outcome::Lost(_)) && session.parkable() {
            outcome = session.read_what_was_taken(&mut socket, outcome);
        }
        session.finish(outcome);
    }
    .instrument(span)
}

/// What a resume must match besides the token: the route, the path the
/// client connected to, and who it is (its token's subject or its
/// certificate's), so a token that leaks to another user of the route does
/// not hand them the session.
fn resume_scope(connect: &bridge_proto::Connect) -> String {
    let principal = connect
        .claims
        .as_ref()
        .and_then(|c| c.get("sub"))
        .and_then(Value::as_str)
        .or(connect.client_cert.as_ref().map(|c| c.subject.as_str()))
        .unwrap_or("");
    format!("{}\n{}\n{principal}", connect.route, connect.path)
}

/// Whether sessions of `route` may be resumed (raw routes have no `seq`).
fn resumable(route: &Route) -> bool {
    route.resume.enabled() && !route.raw
}

/// Subscribes `inbound` to the route table. The route it holds is the
/// upgrade's snapshot: a reload since then would not show as a change of
/// the channel, so the current table is applied at once.
fn follow_routes(
    registry: &RouteRegistry,
    inbound: &mut Inbound,
) -> watch::Receiver<Arc<RouteTable>> {
    let mut routes = registry.subscribe();
    let table = routes.borrow_and_update().clone();
    inbound.on_routes(&table, Instant::now());
    routes
}

/// How the socket's part ended.
enum Outcome {
    /// The session is over (a close either way, a policy, shutdown).
    Ended(Ending),
    /// The connection was lost under the session (no close frame, a failed
    /// write, unanswered pings): it may be parked for a resume.
    Lost(Ending),
}

struct Session<B: Bridge> {
    env: Env<B>,
    /// What outlives the socket (and is swapped for a resumed session's).
    state: SessionState<B>,
    routes: watch::Receiver<Arc<RouteTable>>,
    /// The session's resume token, when it may be resumed.
    token: Option<Token>,
    /// Fired when the session's owner resumes it from another connection:
    /// this socket yields (the session parks and is claimed there).
    takeover: CancellationToken,
    /// Route, path and principal, which a resume must match.
    scope: String,
    /// Resumed, and the client has not spoken since: it may not have the
    /// new token yet.
    confirm_pending: bool,
}

impl<B: Bridge> Session<B> {
    /// Sets the session up: hub entry, state machine, writer, resume
    /// registration. The `connect` comes back if the bridge queue had no
    /// room for it: it must be sent (awaited) before anything else.
    fn start(
        env: Env<B>,
        start: SessionStart,
        span: tracing::Span,
    ) -> (Self, Option<Box<Command>>) {
        let (shared, outbound) = ConnShared::new(
            start.conn.clone(),
            start.route.path.clone(),
            env.max_outbound_bytes,
        );
        let attachment = Attachment::new(&env, shared.clone(), (start.slot, start.permit), span);
        info!(remote = %start.connect.remote, path = %start.connect.path, "connection opened");
        let mut inbound = Inbound::new(
            shared.clone(),
            env.hub.clone(),
            env.metrics.clone(),
            start.route,
            start.runtime,
            &start.connect,
            InboundConfig {
                rate_limits: env.rate_limits,
                drain_timeout: env.drain_timeout,
            },
        );
        let routes = follow_routes(&env.registry, &mut inbound);
        let scope = resume_scope(&start.connect);
        let connect = env
            .bridge
            .try_send(Command::Connect(Box::new(start.connect)))
            .err()
            .map(Box::new);
        let mut writer = Writer::new(
            shared.clone(),
            env.metrics.clone(),
            inbound.route().path.clone(),
            env.client_ping * 3,
        );
        let route = inbound.route();
        let (token, takeover) = if resumable(route) {
            writer.keep_for_resume(
                route.resume.max_frames,
                route.resume.max_bytes,
                env.kept.clone(),
            );
            let (token, takeover) = env.lot.register(&shared.id.0, &scope);
            writer.set_takeover(takeover.clone());
            (Some(token), takeover)
        } else {
            (None, CancellationToken::new())
        };
        let session = Session {
            env,
            state: SessionState {
                attachment,
                shared,
                inbound,
                writer,
                outbound,
            },
            routes,
            token,
            takeover,
            scope,
            confirm_pending: false,
        };
        (session, connect)
    }

    async fn serve<S: Socket>(&mut self, socket: &mut S) -> Outcome {
        let resume = self
            .token
            .as_ref()
            .map(|t| (t.as_str(), self.state.inbound.route().resume.ttl));
        let welcome = Outbound::from(
            self.state
                .inbound
                .welcome(self.env.client_ping.as_millis() as u64, resume),
        );
        if !self.state.inbound.route().raw
            && Box::pin(self.state.writer.write(&mut *socket, welcome))
                .await
                .is_err()
        {
            // The client never got its token: nothing to park for.
            return Outcome::Ended(Ending::new(1006, "closed during welcome"));
        }
        let ping_every = self.env.client_ping;
        let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
        // Ping ticks since the client was last heard from (counted rather
        // than timed: no clock read per message).
        let mut silent_ticks = 0u32;
        let draining = self.env.draining.clone();
        // The closing deadline's timer, made once closing starts (idle
        // sessions carry no timer for it).
        let mut closing: Option<Pin<Box<Sleep>>> = None;

        loop {
            // While closing, close once no request is in flight (or the
            // time is up), after writing what is queued: the terminal frame
            // of the last request may still be there.
            let close_due = if self.state.inbound.is_closing() {
                self.state.inbound.close_due(Instant::now())
            } else {
                None
            };
            if let Some(close) = close_due {
                let st = &mut self.state;
                Box::pin(st.writer.flush_queue(&mut *socket, &mut st.outbound)).await;
                return Outcome::Ended(
                    Box::pin(st.writer.close(&mut *socket, close.code, close.reason)).await,
                );
            }
            let closing_at = self.state.inbound.closing_deadline();
            match (closing_at, &mut closing) {
                (Some(at), Some(timer)) if timer.deadline() != at => timer.as_mut().reset(at),
                (Some(at), None) => closing = Some(Box::pin(tokio::time::sleep_until(at))),
                (None, Some(_)) => closing = None,
                _ => {}
            }
            tokio::select! {
                biased;
                _ = self.takeover.cancelled() => {
                    info!("the session's owner resumed it on another connection: yielding");
                    let ending = Box::pin(self.state.writer.close_now(&mut *socket, 1001, "session resumed on another connection")).await;
                    return Outcome::Lost(ending);
                }
                _ = self.state.shared.kill.cancelled() => {
                    let st = &mut self.state;
                    let kill = st.shared.kill_reason().unwrap_or(Kill { code: 1011, reason: "closed".into(), flush: false });
                    if kill.flush {
                        Box::pin(st.writer.flush_queue(&mut *socket, &mut st.outbound)).await;
                    }
                    return Outcome::Ended(Box::pin(st.writer.close(&mut *socket, kill.code, &kill.reason)).await);
                }
                _ = draining.cancelled(), if !self.state.inbound.is_closing() => {
                    self.state.inbound.start_closing(1001, "server shutting down", Instant::now());
                }
                _ = std::future::poll_fn(|cx| closing.as_mut().map_or(Poll::Pending, |t| t.as_mut().poll(cx))), if closing_at.is_some() => {}
                Ok(()) = self.routes.changed() => {
                    let table = self.routes.borrow_and_update().clone();
                    self.state.inbound.on_routes(&table, Instant::now());
                }
                // Ping and reads before writes: a worker that keeps the outbound
                // queue busy must not starve the client's frames (a `cancel`) or
                // the keep-alive; reads are bounded by the rate limits.
                _ = ping.tick() => {
                    // The first tick comes one interval after the start;
                    // more than three intervals without a word: gone.
                    silent_ticks += 1;
                    if silent_ticks > 3 {
                        return Outcome::Lost(Box::pin(self.state.writer.close(&mut *socket, 1001, "no answer to pings")).await);
                    }
                    if Box::pin(self.state.writer.ping(&mut *socket)).await.is_err() {
                        return self.gone();
                    }
                }
                incoming = socket.next() => {
                    silent_ticks = 0;
                    let actions = match incoming {
                        None => return Outcome::Lost(Ending::new(1006, "connection dropped")),
                        Some(Err(e)) => {
                            let (code, reason) = classify(e);
                            if code == 1006 {
                                return Outcome::Lost(Ending::new(code, reason));
                            }
                            let ending = Box::pin(self.state.writer.close(&mut *socket, code, &reason)).await;
                            // The rest of the bad message may still sit unread
                            // in the socket, and closing a socket with unread
                            // data sends a TCP reset, which can destroy the
                            // close frame before the client reads it. Linger.
                            Box::pin(tokio::time::sleep(ERROR_CLOSE_LINGER)).await;
                            return Outcome::Ended(ending);
                        }
                        Some(Ok(Message::Close(frame))) => {
                            let (code, reason) = frame
                                .map(|f| (f.code, f.reason.to_string()))
                                .unwrap_or((1005, String::new()));
                            debug!(code, "client closed");
                            // The library queued our close reply: flush it out.
                            let _ = Box::pin(tokio::time::timeout(CLOSE_HANDSHAKE, socket.flush())).await;
                            return Outcome::Ended(Ending::new(code, reason));
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        Some(Ok(Message::Text(text))) => {
                            self.state.inbound.on_text(text.as_str(), Instant::now(), &self.env.bridge)
                        }
                        Some(Ok(Message::Binary(data))) => self.state.inbound.on_binary(data, &self.env.bridge),
                    };
                    if actions.resume.is_none() && actions.close.is_none() {
                        // The common case, nothing to wait for.
                        self.apply_now(actions);
                    } else if let Some(outcome) = Box::pin(self.apply(actions, &mut *socket)).await {
                        return outcome;
                    }
                }
                Some(out) = self.state.outbound.recv() => {
                    let st = &mut self.state;
                    // Written at once in the common case; only a wait for
                    // the socket is boxed (its state would make every idle
                    // session's future larger).
                    let written = match st.writer.write_batch(&mut *socket, out, &mut st.outbound) {
                        Ok(None) => Ok(()),
                        Ok(Some(rest)) => Box::pin(st.writer.write_rest(&mut *socket, rest)).await,
                        Err(Gone) => Err(Gone),
                    };
                    if let Err(Gone) = written {
                        return self.gone();
                    }
                }
            }
        }
    }

    /// Carries out what the state machine asked for: an ack, a resume, its
    /// frames (queued, so `seq` and ordering stay with the writer), and a
    /// close after writing what is queued if it asked for one.
    async fn apply<S: Socket>(&mut self, mut actions: Actions, socket: &mut S) -> Option<Outcome> {
        let resume = actions.resume.take();
        let close = actions.close.take();
        self.confirm_and_ack(&actions);
        if let Some(req) = resume {
            if let Err(Gone) = Box::pin(self.resume(req, socket)).await {
                return Some(self.gone());
            }
        }
        self.queue_frames(actions);
        let close = close?;
        let st = &mut self.state;
        Box::pin(st.writer.flush_queue(socket, &mut st.outbound)).await;
        Some(Outcome::Ended(
            Box::pin(st.writer.close(socket, close.code, close.reason)).await,
        ))
    }

    /// [`Self::apply`] for actions with no resume and no close: nothing
    /// to wait for.
    fn apply_now(&mut self, actions: Actions) {
        self.confirm_and_ack(&actions);
        self.queue_frames(actions);
    }

    fn confirm_and_ack(&mut self, actions: &Actions) {
        if std::mem::take(&mut self.confirm_pending) {
            self.env.lot.confirm(&self.state.shared.id.0);
        }
        if let Some(seq) = actions.ack {
            self.state.writer.ack(seq);
        }
    }

    fn queue_frames(&mut self, actions: Actions) {
        for frame in actions.frames {
            self.state.shared.send(frame.into());
        }
    }

    /// A `resume`: claims the parked session, makes this connection that
    /// session (its requests, topics and `seq`), and writes `resumed` and
    /// the frames the client has not seen. A refusal is an error frame of
    /// the fresh session, which goes on.
    async fn resume<S: Socket>(&mut self, req: ResumeRequest, socket: &mut S) -> Result<(), Gone> {
        let scope = self.scope.clone();
        let refuse = |this: &mut Self, why: Refusal| {
            info!(reason = why.as_str(), "resume refused");
            this.env.metrics.resume_failed(why.as_str());
            this.state
                .shared
                .send(OutFrame::resume_failed(req.id.clone(), why.as_str(), why.message()).into());
            Ok(())
        };
        if self.token.is_none() {
            // Resume is off on this route: nothing of it was ever kept.
            return refuse(self, Refusal::UnknownSession);
        }
        let claim = self.env.lot.claim_or_take_over(
            &req.session_id,
            &req.resume_token,
            &scope,
            TAKEOVER_WAIT,
        );
        let Claimed {
            value: mut parked,
            token,
            takeover,
        } = match Box::pin(claim).await {
            Ok(claimed) => claimed,
            Err(why) => return refuse(self, why),
        };
        if parked.shared.kill.is_cancelled() {
            // It outgrew its bounds just before the claim.
            self.env.lot.retire(&req.session_id, Refusal::Overflow);
            parked.end(Ending::new(
                1008,
                "session outgrew its resume bounds while parked",
            ));
            return refuse(self, Refusal::Overflow);
        }
        let mut replay = match parked.writer.replay_after(req.last_seq) {
            Ok(frames) => frames,
            Err(gap) => {
                // The only client that could continue it cannot: end it.
                debug!(
                    oldest = gap.oldest,
                    last_seq = req.last_seq,
                    "resume from before the kept frames"
                );
                self.env.lot.retire(&req.session_id, Refusal::Gap);
                parked.end(Ending::new(1001, "resumed from before its kept frames"));
                return refuse(self, Refusal::Gap);
            }
        };
        // This connection becomes the parked session; its fresh session ends.
        std::mem::swap(&mut self.state, &mut parked);
        let mut fresh = parked;
        self.env.lot.forget(&fresh.shared.id.0);
        // The resumed session takes this connection's places under the
        // caps (it gave its own back when it parked).
        let slots = fresh.attachment.take_slots();
        self.state.attachment.put_slots(slots);
        fresh.end(Ending::new(1000, "replaced by the session it resumed"));
        self.token = Some(token);
        self.takeover = takeover.clone();
        self.confirm_pending = true;
        let st = &mut self.state;
        st.writer.set_takeover(takeover);
        st.inbound.mark_spoken();
        st.shared
            .set_bounds(crate::hub::OUTBOUND_QUEUE, self.env.max_outbound_bytes);
        // The contract of `resumed`: every request the session took is in
        // `in_flight` or answered among the `replayed` frames. So the ids
        // still running are read first, and then the replies that arrived
        // while the client was away are taken off the queue into the
        // replay: a request that ends after the first read is in
        // `in_flight`; one that ended before it has its reply queued.
        let in_flight = st.shared.inflight_ids();
        st.inbound.absorb = in_flight.iter().map(Value::to_string).collect();
        while let Ok(mut out) = st.outbound.try_recv() {
            st.shared.dequeued(&mut out);
            replay.push(st.writer.encode(out));
        }
        let table = self.routes.borrow_and_update().clone();
        st.inbound.on_routes(&table, Instant::now());
        info!(session.resumed = %st.shared.id, replayed = replay.len(), in_flight = in_flight.len(), "session resumed");
        self.env.metrics.resumed();
        let resumed = json!({
            "type": "resumed",
            "id": req.id,
            "done": true,
            "data": {
                "session_id": &*st.shared.id.0,
                // Invariant: set just above.
                "resume_token": self.token.as_ref().map(Token::as_str),
                "replayed": replay.len(),
                "in_flight": in_flight,
            },
        });
        Box::pin(st.writer.write_unsequenced(socket, resumed.to_string())).await?;
        Box::pin(st.writer.write_messages(socket, replay)).await
    }

    /// The peer stopped reading (or the socket failed): the session ends
    /// without a close handshake, with the kill reason if there is one, or
    /// is lost (and may be parked).
    fn gone(&self) -> Outcome {
        match self.state.shared.kill_reason() {
            Some(k) => Outcome::Ended(Ending::new(k.code, k.reason)),
            None => Outcome::Lost(Ending::new(1006, "write failed or timed out")),
        }
    }

    /// Whether a lost connection leaves the session parked for a resume.
    fn parkable(&self) -> bool {
        self.token.is_some()
            && resumable(self.state.inbound.route())
            && !self.env.draining.is_cancelled()
            && !self.state.shared.kill.is_cancelled()
            && !self.state.inbound.is_closing()
    }

    /// The session is about to park, its connection lost or taken over by
    /// its owner's resume: the frames its socket has already taken are
    /// read first, so that they become requests of the session (in the
    /// resume's `in_flight`, or answered in its replay) instead of being
    /// dropped with the socket. The HTTP fallback answered each of them
    /// `202`; a WebSocket's are those already received. Nothing is waited
    /// for: the socket stops taking input, and reading ends at the first
    /// frame not already there (or a close, an error, the end).
    fn read_what_was_taken<S: Socket>(&mut self, socket: &mut S, lost: Outcome) -> Outcome {
        socket.stop_input();
        // A frame read now does not prove that the client got this
        // connection's `resumed` and its token (it may have been sent
        // before, or the `resumed` lost): the token it resumed with stays
        // good for its next resume.
        self.confirm_pending = false;
        for _ in 0..LEFT_BEHIND {
            // Unconstrained: a spent task budget would read as "nothing there".
            let next = tokio::task::unconstrained(socket.next()).now_or_never();
            let actions = match next {
                Some(Some(Ok(Message::Text(text)))) => {
                    self.state
                        .inbound
                        .on_text(text.as_str(), Instant::now(), &self.env.bridge)
                }
                Some(Some(Ok(Message::Binary(data)))) => {
                    self.state.inbound.on_binary(data, &self.env.bridge)
                }
                Some(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                _ => break,
            };
            if actions.resume.is_some() || actions.close.is_some() {
                // A `resume`, or a frame a policy answers with a close (a
                // rate limit): neither can be carried out on a connection
                // that is gone, and neither frame was taken. The reading
                // stops here; `in_flight` shows the client what was taken.
                debug!("a frame left on a lost connection asks for a resume or a close: not read further");
                break;
            }
            self.apply_now(actions);
        }
        if self.state.shared.kill.is_cancelled() {
            // Killed while reading (its queue overflowed): it ends as killed.
            return self.gone();
        }
        lost
    }

    /// After the socket: a lost session on a resumable route is parked;
    /// anything else ends.
    fn finish(self, outcome: Outcome) {
        let policy = self.state.inbound.route().resume;
        let parkable = self.parkable();
        match outcome {
            Outcome::Lost(_) if parkable => parking::park(&self.env, self.state, policy),
            Outcome::Lost(ending) | Outcome::Ended(ending) => {
                if self.token.is_some() {
                    self.env.lot.forget(&self.state.shared.id.0);
                }
                self.state.end(ending);
            }
        }
    }
}

/// Close code for a failed read (README, client protocol): 1009 too big,
/// 1007 bad UTF-8, 1002 protocol violation; 1006: the peer is gone, nothing
/// to send.
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
    use std::{
        pin::Pin,
        task::{Context, Poll},
    };

    use axum::extract::ws::CloseFrame;
    use futures_util::{Sink, Stream};
    use serde_json::{json, Value};

    use super::*;
    use crate::{
        ids::{Cid, ConnId},
        policy::runtime::Runtimes,
        routes::Route,
        session::testkit::{self, TestClient, TestSocket},
    };
    use tokio::sync::mpsc;

    fn table(routes: &[&Route]) -> RouteTable {
        RouteTable::new(routes.iter().map(|r| (*r).clone()).collect())
    }

    async fn close_frame(client: &mut TestClient) -> (u16, String) {
        loop {
            match client.next().await {
                Message::Close(Some(CloseFrame { code, reason })) => {
                    return (code, reason.to_string())
                }
                Message::Ping(_) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// The commands the bridge has received so far, as (kind, conn, code, cids).
    fn commands(rx: &mut mpsc::Receiver<Command>) -> Vec<Command> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    fn disconnect_of(cmds: &[Command]) -> (ConnId, u16, Vec<Cid>) {
        match cmds.last() {
            Some(Command::Disconnect {
                conn, code, cids, ..
            }) => (conn.clone(), *code, cids.clone()),
            other => panic!("expected a disconnect last, got {other:?} in {cmds:?}"),
        }
    }

    /// Sends `frame`, then a ping, and returns the frames before the pong:
    /// the session has handled `frame` once the pong is back.
    async fn exchange(client: &mut TestClient, frame: &str) -> Vec<Value> {
        client.send_text(frame);
        client.send_text(r#"{"type":"ping","id":"sync"}"#);
        let mut before = Vec::new();
        loop {
            let v = client.next_json().await;
            if v["type"] == "pong" && v["id"] == "sync" {
                return before;
            }
            before.push(v);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_welcomes_answers_and_ends_on_the_clients_close() {
        let route = testkit::route("/ws", "svc");
        let (env, mut rx) = testkit::env(table(&[&route]), 16);
        let hub = env.hub.clone();
        let runtimes = Runtimes::default();
        let start = testkit::start(&runtimes, Arc::new(route));
        let conn = start.conn.clone();
        let (socket, mut client) = testkit::socket();
        let session = tokio::spawn(run(socket, env, start));

        let welcome = client.next_json().await;
        assert_eq!(
            (welcome["type"].clone(), welcome["seq"].clone()),
            (json!("welcome"), json!(0))
        );
        assert_eq!(welcome["data"]["session_id"], json!(&*conn.0));
        assert_eq!(welcome["data"]["heartbeat_ms"], 20_000);
        assert!(exchange(&mut client, r#"{"type":"note"}"#).await.is_empty());
        let _ = client.to_session.send(Ok(Message::Close(Some(CloseFrame {
            code: 1000,
            reason: "bye".into(),
        }))));
        session.await.unwrap();

        assert!(hub.is_empty());
        assert_eq!(runtimes.get("/ws").connections(), 0, "the slot is free");
        let cmds = commands(&mut rx);
        assert!(matches!(cmds.first(), Some(Command::Connect(c)) if *c.conn == *conn.0));
        assert!(matches!(cmds.get(1), Some(Command::Event { msg_type, .. }) if msg_type == "note"));
        assert_eq!(disconnect_of(&cmds), (conn, 1000, vec![]));
    }

    /// Dropping the session's future (an aborted task, a runtime shutting
    /// down) releases its hub entry and topics and tells the bridge, with
    /// the request still in flight.
    #[tokio::test(start_paused = true)]
    async fn a_dropped_session_leaves_nothing_behind() {
        let route = testkit::route("/ws", "svc");
        let (env, mut rx) = testkit::env(table(&[&route]), 16);
        let hub = env.hub.clone();
        let runtimes = Runtimes::default();
        let start = testkit::start(&runtimes, Arc::new(route));
        let conn = start.conn.clone();
        let (socket, mut client) = testkit::socket();
        let mut session = Box::pin(run(socket, env, start));

        let script = async {
            client.next_json().await;
            let acks = exchange(
                &mut client,
                r#"{"type":"subscribe","id":"s","data":{"topic":"t"}}"#,
            )
            .await;
            assert_eq!(acks[0]["type"], "subscribed");
            assert!(exchange(&mut client, r#"{"type":"echo","id":"r"}"#)
                .await
                .is_empty());
        };
        tokio::select! {
            _ = &mut session => panic!("the session ended on its own"),
            _ = script => {}
        }
        let cid = hub.get(&conn).and_then(|c| c.cid_of("\"r\"")).unwrap();
        assert_eq!((hub.len(), hub.topic_count()), (1, 1));

        drop(session);
        assert!(hub.is_empty());
        assert_eq!(hub.topic_count(), 0);
        assert_eq!(runtimes.get("/ws").connections(), 0);
        let cmds = commands(&mut rx);
        assert!(matches!(cmds.get(1), Some(Command::Request(r)) if r.cid == cid));
        assert_eq!(disconnect_of(&cmds), (conn, 1006, vec![cid]));
    }

    /// `Drop` cannot wait for room in the bridge queue: a task on the
    /// sessions' tracker delivers the disconnect once there is room.
    #[tokio::test(start_paused = true)]
    async fn a_disconnect_that_finds_the_bridge_queue_full_still_arrives() {
        let route = testkit::route("/ws", "svc");
        // Room for the connect and one request: then the queue is full.
        let (env, mut rx) = testkit::env(table(&[&route]), 2);
        let tracker = env.tracker.clone();
        let runtimes = Runtimes::default();
        let start = testkit::start(&runtimes, Arc::new(route));
        let conn = start.conn.clone();
        let (socket, mut client) = testkit::socket();
        let mut session = Box::pin(run(socket, env, start));
        let script = async {
            client.next_json().await;
            exchange(&mut client, r#"{"type":"echo","id":"r"}"#).await;
            let refused = exchange(&mut client, r#"{"type":"echo","id":"q"}"#).await;
            assert_eq!(
                refused[0]["error"]["code"], "overloaded",
                "the queue is full"
            );
        };
        tokio::select! {
            _ = &mut session => panic!("the session ended on its own"),
            _ = script => {}
        }
        drop(session);
        assert_eq!(tracker.len(), 1, "a task holds the disconnect");
        let mut cmds = Vec::new();
        while let Some(cmd) = rx.recv().await {
            let last = matches!(cmd, Command::Disconnect { .. });
            cmds.push(cmd);
            if last {
                break;
            }
        }
        assert_eq!(disconnect_of(&cmds).0, conn);
        assert_eq!(disconnect_of(&cmds).2.len(), 1);
        tracker.close();
        tracker.wait().await;
    }

    /// A socket that panics when the client sends `boom`.
    struct Boom(TestSocket);

    impl Stream for Boom {
        type Item = Result<Message, axum::Error>;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            let next = Pin::new(&mut self.0).poll_next(cx);
            if let Poll::Ready(Some(Ok(Message::Text(t)))) = &next {
                assert_ne!(t.as_str(), "boom", "a bug in the socket");
            }
            next
        }
    }

    impl Sink<Message> for Boom {
        type Error = std::io::Error;

        fn poll_ready(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Result<(), Self::Error>> {
            Pin::new(&mut self.0).poll_ready(cx)
        }

        fn start_send(mut self: Pin<&mut Self>, m: Message) -> Result<(), Self::Error> {
            Pin::new(&mut self.0).start_send(m)
        }

        fn poll_flush(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Result<(), Self::Error>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_close(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Result<(), Self::Error>> {
            Pin::new(&mut self.0).poll_close(cx)
        }
    }

    impl crate::session::Socket for Boom {}

    #[tokio::test(start_paused = true)]
    async fn a_panicking_session_leaves_nothing_behind() {
        let route = testkit::route("/ws", "svc");
        let (env, mut rx) = testkit::env(table(&[&route]), 16);
        let hub = env.hub.clone();
        let runtimes = Runtimes::default();
        let start = testkit::start(&runtimes, Arc::new(route));
        let conn = start.conn.clone();
        let (socket, mut client) = testkit::socket();
        let session = tokio::spawn(run(Boom(socket), env, start));
        client.next_json().await;
        exchange(&mut client, r#"{"type":"subscribe","data":{"topic":"t"}}"#).await;
        client.send_text("boom");
        assert!(session.await.unwrap_err().is_panic());
        assert!(hub.is_empty());
        assert_eq!(hub.topic_count(), 0);
        assert_eq!(disconnect_of(&commands(&mut rx)), (conn, 1011, vec![]));
    }

    /// Defect: a reload between the upgrade's route snapshot and the
    /// session's subscription to the table was never seen by the session.
    #[tokio::test(start_paused = true)]
    async fn a_reload_before_the_session_subscribed_is_applied_at_once() {
        let route = testkit::route("/ws", "svc");
        let other = testkit::route("/other", "svc");
        let mut tighter = route.clone();
        tighter.max_in_flight = 3;
        let runtimes = Runtimes::default();

        // The policies changed: the welcome already carries the new limit.
        let (env, _rx) = testkit::env(table(&[&route]), 16);
        env.registry.replace_file(table(&[&tighter]));
        let (socket, mut client) = testkit::socket();
        let _session = tokio::spawn(run(
            socket,
            env,
            testkit::start(&runtimes, Arc::new(route.clone())),
        ));
        let welcome = client.next_json().await;
        assert_eq!(welcome["data"]["limits"]["max_in_flight"], 3, "{welcome}");

        // The route is gone: the session closes with 1012 at once.
        let (env, _rx) = testkit::env(table(&[&route, &other]), 16);
        env.registry.replace_file(table(&[&other]));
        let (socket, mut client) = testkit::socket();
        let _session = tokio::spawn(run(socket, env, testkit::start(&runtimes, Arc::new(route))));
        assert_eq!(client.next_json().await["type"], "welcome");
        assert_eq!(
            close_frame(&mut client).await,
            (1012, "route removed".into())
        );
    }

    /// Defect: a closing session closed as soon as no request was in flight,
    /// dropping the terminal frame that freed the last one if it was still
    /// queued (or not yet queued: the broker frees the client id first).
    #[tokio::test(start_paused = true)]
    async fn a_closing_session_writes_the_last_terminal_frame_before_its_close() {
        let route = testkit::route("/ws", "svc");
        for queued_before_the_drain in [true, false] {
            let (env, _rx) = testkit::env(table(&[&route]), 16);
            let (hub, draining) = (env.hub.clone(), env.draining.clone());
            let runtimes = Runtimes::default();
            let start = testkit::start(&runtimes, Arc::new(route.clone()));
            let conn = start.conn.clone();
            let (socket, mut client) = testkit::socket();
            let session = tokio::spawn(run(socket, env, start));
            client.next_json().await;
            exchange(&mut client, r#"{"type":"echo","id":"r"}"#).await;
            let shared = hub.get(&conn).unwrap();
            let cid = shared.cid_of("\"r\"").unwrap();
            let terminal = OutFrame::reply("echo", Some(json!("r")), Some(cid), json!(1), true);

            // What the broker does, in its order: free the id, queue the frame.
            shared.end_request("\"r\"", &cid);
            if queued_before_the_drain {
                shared.send(terminal.clone().into());
                draining.cancel();
            } else {
                draining.cancel();
                tokio::task::yield_now().await;
                shared.send(terminal.clone().into());
            }
            let last = client.next().await;
            let Message::Text(t) = &last else {
                panic!("queued first = {queued_before_the_drain}: expected the terminal frame, got {last:?}")
            };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            assert_eq!(
                (v["id"].clone(), v["done"].clone()),
                (json!("r"), json!(true))
            );
            assert_eq!(close_frame(&mut client).await.0, 1001);
            drop(client);
            session.await.unwrap();
        }
    }

    /// Keep-alive: a client that answers no ping for more than three ping
    /// intervals is closed (1001) at the fourth tick; one that answers (a
    /// pong is a word) stays.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_answers_no_ping_is_closed_and_one_that_answers_stays() {
        let route = testkit::route("/ws", "svc");
        for answers in [false, true] {
            let (env, _rx) = testkit::env(table(&[&route]), 16);
            let every = env.client_ping;
            let runtimes = Runtimes::default();
            let start = testkit::start(&runtimes, Arc::new(route.clone()));
            let (socket, mut client) = testkit::socket();
            let session = tokio::spawn(run(socket, env, start));
            client.next_json().await;
            let t0 = Instant::now();
            if answers {
                for _ in 0..6 {
                    match client.next().await {
                        Message::Ping(_) => {
                            let _ = client
                                .to_session
                                .send(Ok(Message::Pong(Default::default())));
                        }
                        other => panic!("expected a ping, got {other:?}"),
                    }
                }
                assert_eq!(t0.elapsed(), every * 6, "six pings answered, still open");
                drop(client);
            } else {
                let (code, reason) = close_frame(&mut client).await;
                assert_eq!((code, reason.as_str()), (1001, "no answer to pings"));
                assert_eq!(t0.elapsed(), every * 4);
            }
            session.await.unwrap();
        }
    }

    /// A resume takes the session over from a connection whose frames were
    /// taken but not yet read (the fallback answered their POSTs `202`):
    /// they become the session's requests before it parks, not lost with
    /// the socket. The takeover and the frame are both ready before the
    /// old session runs again, and the takeover is served first.
    #[tokio::test(start_paused = true)]
    async fn frames_taken_before_a_takeover_are_read_before_the_session_parks() {
        let mut route = testkit::route("/ws", "svc");
        route.resume = crate::routes::ResumePolicy::DEFAULT;
        let (env, mut rx) = testkit::env(table(&[&route]), 16);
        let lot = env.lot.clone();
        let runtimes = Runtimes::default();
        let start = testkit::start(&runtimes, Arc::new(route));
        let (socket, mut client) = testkit::socket();
        let session = tokio::spawn(run(socket, env, start));
        let welcome = client.next_json().await;
        let id = welcome["data"]["session_id"].as_str().unwrap().to_owned();
        let token = welcome["data"]["resume_token"].as_str().unwrap().to_owned();
        let scope = "/ws\n/ws\n";

        client.send_text(r#"{"type":"echo","id":"taken"}"#);
        assert_eq!(
            lot.claim(&id, &token, scope).err(),
            Some(Refusal::Attached),
            "the claim asks the live connection to yield"
        );
        session.await.unwrap();
        let claimed = lot.claim(&id, &token, scope).expect("parked");
        assert_eq!(claimed.value.shared.inflight_ids(), vec![json!("taken")]);
        let cmds = commands(&mut rx);
        assert!(
            cmds.iter()
                .any(|c| matches!(c, Command::Request(r) if r.msg_type == "echo")),
            "the request reached the bridge: {cmds:?}"
        );
        claimed.value.end(Ending::new(1000, "test over"));
    }
}

/// What an idle connection costs is mostly this future, so its size is
/// watched (ARCHITECTURE.md, "Session lifecycle").
#[cfg(test)]
mod size {
    use super::*;
    use crate::bridge::BridgeHandle;

    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, C, F>(_: impl FnOnce(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// 5.5 KB before it was made a task of its own with nothing in it
    /// twice (debug build; the release build's is smaller). The parts:
    /// the session, the socket, the loop's timers and its `select!`.
    #[test]
    fn the_session_future_stays_small() {
        type Ws = axum::extract::ws::WebSocket;
        let size = future_size(crate::session::run::<Ws>);
        eprintln!(
            "session future {size} B: session {} B, socket {} B",
            std::mem::size_of::<Session<BridgeHandle>>(),
            std::mem::size_of::<Ws>()
        );
        assert!(size <= 2_304, "the session future grew to {size} B");
    }
}
