//! The inbound state machine: what a session does with each client frame.
//!
//! [`Inbound`] takes a text or binary frame and the current time and returns
//! [`Actions`]: frames for the client (queued on the connection's outbound
//! queue, so `seq` and ordering stay with the writer) and, at most, a close.
//! Commands for the bridge go to a [`CommandQueue`] as they are made,
//! because what the session answers depends on whether the queue took them
//! (a full queue is `overloaded`, and a request that was refused gives back
//! its breaker admission and its client id). No socket, no runtime, no
//! waiting: every path is unit-tested with plain values (`inbound/tests.rs`).
//!
//! It also holds the session's route and its policies (rate limiters,
//! breaker), follows reloads of the route table, and decides when a closing
//! session may close.

use std::{sync::Arc, time::Duration};

use bridge_proto::codes;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::time::Instant;
use tracing::{debug, info};

use super::CommandQueue;
use crate::{
    broker::Command,
    client::{self, unix_ms, ClientMessage, OutFrame, Outbound},
    hub::{ConnShared, Hub},
    metrics::{Metrics, RouteMeter},
    policy::{
        ratelimit::{retry_after_ms, Limiter},
        runtime::{RouteLimits, RouteRuntime},
    },
    routes::{Route, RouteTable},
};

mod forward;
#[cfg(test)]
mod tests;

/// Message types the router answers itself; they never reach a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterType {
    Ping,
    Subscribe,
    Unsubscribe,
    Cancel,
    Resume,
    Ack,
    Presence,
}

impl RouterType {
    pub const ALL: [RouterType; 7] = [
        RouterType::Ping,
        RouterType::Subscribe,
        RouterType::Unsubscribe,
        RouterType::Cancel,
        RouterType::Resume,
        RouterType::Ack,
        RouterType::Presence,
    ];

    /// Their `type` names, in the order of [`RouterType::ALL`] (what the
    /// routes file refuses in `allowedTypes`).
    pub const NAMES: [&'static str; 7] = [
        Self::Ping.as_str(),
        Self::Subscribe.as_str(),
        Self::Unsubscribe.as_str(),
        Self::Cancel.as_str(),
        Self::Resume.as_str(),
        Self::Ack.as_str(),
        Self::Presence.as_str(),
    ];

    /// The `type` of the client frame.
    pub const fn as_str(self) -> &'static str {
        match self {
            RouterType::Ping => "ping",
            RouterType::Subscribe => "subscribe",
            RouterType::Unsubscribe => "unsubscribe",
            RouterType::Cancel => "cancel",
            RouterType::Resume => "resume",
            RouterType::Ack => "ack",
            RouterType::Presence => "presence",
        }
    }

    /// The router-handled type named `msg_type`, if it is one.
    pub fn parse(msg_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == msg_type)
    }
}

/// What the driver does after an input, in this order.
#[derive(Debug, Default)]
pub(crate) struct Actions {
    /// Frames for the client, queued on the outbound queue.
    pub frames: Vec<OutFrame>,
    /// Close the connection, after writing what is queued.
    pub close: Option<Close>,
    /// The client acknowledged every frame up to this `seq`.
    pub ack: Option<u64>,
    /// The client asks to resume a dropped session (its first frame).
    pub resume: Option<ResumeRequest>,
}

/// A `resume` frame, read.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ResumeRequest {
    pub id: Option<Value>,
    pub session_id: String,
    pub resume_token: String,
    pub last_seq: u64,
}

/// A close the state machine asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Close {
    pub code: u16,
    pub reason: &'static str,
}

/// Settings of the state machine (process settings, not reloadable).
#[derive(Debug, Clone, Copy)]
pub(crate) struct InboundConfig {
    /// `ENABLE_RATE_LIMIT`.
    pub rate_limits: bool,
    /// How long a closing session waits for its in-flight requests.
    pub drain_timeout: Duration,
}

/// A session on its way out: it closes with `code` when its last in-flight
/// request finishes, or at `deadline`.
#[derive(Debug)]
struct Closing {
    deadline: Instant,
    code: u16,
    reason: &'static str,
}

/// The inbound side of one session.
pub(crate) struct Inbound {
    shared: Arc<ConnShared>,
    hub: Arc<Hub>,
    /// This session's message counters (its route's, resolved once).
    meter: RouteMeter,
    route: Arc<Route>,
    /// The request path the client used (the route is the pattern).
    path: String,
    runtime: Arc<RouteRuntime>,
    /// The route's shared limiters, for the policy of `route`: taken when
    /// the session starts and at each reload it follows, never per message
    /// (a session asking with a stale policy, as one closing after its
    /// route changed, would rebuild them, and so reset them for every
    /// connection of the route, on every message).
    route_limits: Arc<RouteLimits>,
    /// This connection's message rate.
    limiter: Limiter,
    /// Consecutive messages refused by a rate limit.
    rejections: u32,
    /// Set when the session stops taking requests (shutdown, route removed).
    closing: Option<Closing>,
    /// Verified token claims, forwarded with every request.
    claims: Option<Value>,
    config: InboundConfig,
    /// No client frame has been handled yet (`resume` must be the first).
    first_frame: bool,
    /// Ids of requests that were in flight when the session was resumed: a
    /// client that sends one again (it could not know it had arrived) is
    /// absorbed while the original runs, not refused or dispatched twice.
    pub(crate) absorb: std::collections::HashSet<String>,
}

impl Inbound {
    /// `connect`: what the bridge was told of the connection (its path and
    /// verified claims are kept).
    pub fn new(
        shared: Arc<ConnShared>,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        route: Arc<Route>,
        runtime: Arc<RouteRuntime>,
        connect: &bridge_proto::Connect,
        config: InboundConfig,
    ) -> Self {
        let limiter = Limiter::per_second(
            route.rate_limit.messages_per_second,
            route.rate_limit.message_burst,
        );
        if let Some(sub) = connect
            .claims
            .as_ref()
            .and_then(|c| c.get("sub"))
            .and_then(Value::as_str)
        {
            shared.set_user(sub);
        }
        let route_limits = runtime.limits(&route.rate_limit);
        Self {
            shared,
            hub,
            meter: RouteMeter::new(metrics, &route.path),
            route_limits,
            route,
            path: connect.path.clone(),
            runtime,
            limiter,
            rejections: 0,
            closing: None,
            claims: connect.claims.clone(),
            config,
            first_frame: true,
            absorb: std::collections::HashSet::new(),
        }
    }

    /// The connection has spoken (a resumed session on a new connection,
    /// after its `resume`): a later `resume` is not its first frame.
    pub fn mark_spoken(&mut self) {
        self.first_frame = false;
    }

    pub fn route(&self) -> &Route {
        &self.route
    }

    /// The first frame of a non-raw session; `resume` is its token and TTL
    /// when the session may be resumed.
    pub fn welcome(&self, heartbeat_ms: u64, resume: Option<(&str, Duration)>) -> OutFrame {
        let mut data = json!({
            "session_id": &*self.shared.id.0,
            "route": self.route.path,
            "path": self.path,
            "heartbeat_ms": heartbeat_ms,
            "limits": {
                "max_message_bytes": self.route.max_message_bytes,
                "max_in_flight": self.route.max_in_flight,
            },
            "resume_ttl_ms": resume.map_or(0, |(_, ttl)| ttl.as_millis() as u64),
            "router_id": self.hub.router_id(),
        });
        if let Some((token, _)) = resume {
            data["resume_token"] = json!(token);
        }
        OutFrame::push("welcome", None, data)
    }

    // ----- closing ------------------------------------------------------------------

    pub fn is_closing(&self) -> bool {
        self.closing.is_some()
    }

    /// When a closing session closes whatever is still in flight.
    pub fn closing_deadline(&self) -> Option<Instant> {
        self.closing.as_ref().map(|c| c.deadline)
    }

    /// Stops taking requests; the session closes with `code` once its
    /// in-flight requests are done, or after the drain timeout.
    pub fn start_closing(&mut self, code: u16, reason: &'static str, now: Instant) {
        if self.closing.is_none() {
            debug!(code, reason, "closing after in-flight requests");
            self.closing = Some(Closing {
                deadline: now + self.config.drain_timeout,
                code,
                reason,
            });
        }
    }

    /// The close a closing session owes now: its last request is done and
    /// that request's terminal frame is queued (the driver writes what is
    /// queued before the close frame), or its time is up.
    pub fn close_due(&self, now: Instant) -> Option<Close> {
        let c = self.closing.as_ref()?;
        (self.shared.is_idle() || now >= c.deadline).then_some(Close {
            code: c.code,
            reason: c.reason,
        })
    }

    /// A new route table: follow this route's new policies, or close with
    /// 1012 if the route is gone or changed its kind.
    pub fn on_routes(&mut self, table: &RouteTable, now: Instant) {
        let Some(new) = table.get(&self.route.path) else {
            if !self.is_closing() {
                info!("route removed from the routes: closing once in-flight requests finish");
            }
            self.start_closing(1012, "route removed", now);
            return;
        };
        // Raw-ness and the service are fixed for the life of a connection
        // (its framing and its worker depend on them). Such a session no
        // longer follows the route: it keeps the policies and limiters it
        // has until it closes.
        if new.raw != self.route.raw || new.service != self.route.service {
            if !self.is_closing() {
                info!("route changed its kind or service: closing once in-flight requests finish");
            }
            self.start_closing(1012, "route changed", now);
            return;
        }
        if **new != *self.route {
            if new.rate_limit != self.route.rate_limit {
                self.limiter = Limiter::per_second(
                    new.rate_limit.messages_per_second,
                    new.rate_limit.message_burst,
                );
            }
            debug!("route policies updated");
            self.route = new.clone();
        }
        // The route's limiters for its current policy: rebuilt by the first
        // session (or upgrade) that sees a new policy, shared by the rest.
        // Asked on every reload, not only on a change, so a session that
        // got limiters from a stale snapshot joins the current ones.
        self.route_limits = self.runtime.limits(&self.route.rate_limit);
    }

    // ----- client frames ------------------------------------------------------------

    /// A text frame from the client.
    pub fn on_text(&mut self, text: &str, now: Instant, bridge: &dyn CommandQueue) -> Actions {
        let first = std::mem::replace(&mut self.first_frame, false);
        let mut out = Actions::default();
        if !self.admit_message(&mut out, || client::parse(text).ok().and_then(|m| m.id)) {
            return out;
        }
        if self.route.raw {
            self.forward_raw(
                false,
                Bytes::copy_from_slice(text.as_bytes()),
                bridge,
                &mut out,
            );
        } else {
            self.on_message(text, first, now, bridge, &mut out);
        }
        out
    }

    /// A binary frame from the client.
    pub fn on_binary(&mut self, data: Bytes, bridge: &dyn CommandQueue) -> Actions {
        self.first_frame = false;
        let mut out = Actions::default();
        if !self.admit_message(&mut out, || None) {
            return out;
        }
        if self.route.raw {
            self.forward_raw(true, data, bridge, &mut out);
        } else {
            self.forward_binary(data, bridge, &mut out);
        }
        out
    }

    /// Applies the message rate limits (connection, then route). A refused
    /// message gets `rate_limited` with `retry_after_ms` (raw routes have no
    /// error frame, so they are closed at once); a connection that keeps
    /// sending through `close_after_rejections` refusals is closed with 1008.
    fn admit_message(&mut self, out: &mut Actions, id_of: impl FnOnce() -> Option<Value>) -> bool {
        if !self.config.rate_limits {
            return true;
        }
        let policy = self.route.rate_limit;
        let wait = match self.limiter.check() {
            Err(wait) => Some((wait, "connection")),
            Ok(()) => self
                .route_limits
                .messages
                .check()
                .err()
                .map(|w| (w, "route")),
        };
        let Some((wait, scope)) = wait else {
            self.rejections = 0;
            return true;
        };
        self.meter.metrics().rate_limited(&self.route.path, scope);
        self.rejections += 1;
        if self.route.raw || self.rejections >= policy.close_after_rejections.max(1) {
            info!(
                rejections = self.rejections,
                "closing: rate limit exceeded repeatedly"
            );
            out.close = Some(Close {
                code: 1008,
                reason: "rate limit exceeded",
            });
            return false;
        }
        out.frames.push(OutFrame::error(
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

    /// A closing session takes no new work for workers (router-handled
    /// types still work: it still owes its in-flight requests, which the
    /// client may ping through or cancel).
    fn refuse_while_closing(&self, msg: ClientMessage, reason: &str, out: &mut Actions) {
        if msg.id.is_some() {
            out.frames.push(OutFrame::error(
                msg.id,
                None,
                codes::OVERLOADED,
                format!("this connection is closing ({reason}): no new requests"),
                Some(1000),
            ));
        }
    }

    fn on_message(
        &mut self,
        text: &str,
        first: bool,
        now: Instant,
        bridge: &dyn CommandQueue,
        out: &mut Actions,
    ) {
        let msg = match client::parse(text) {
            Ok(m) => {
                self.meter.message_in(&m.msg_type);
                m
            }
            Err(bad) => {
                self.meter.message_in("invalid");
                debug!(bytes = text.len(), error = %bad.message, "bad client message");
                out.frames.push(OutFrame::error(
                    bad.id,
                    None,
                    codes::BAD_REQUEST,
                    bad.message,
                    None,
                ));
                return;
            }
        };
        match RouterType::parse(&msg.msg_type) {
            Some(RouterType::Resume) => self.on_resume(msg, first, out),
            Some(RouterType::Ack) => match msg.data.get("seq").and_then(Value::as_u64) {
                Some(seq) => out.ack = Some(seq),
                None => out.frames.push(OutFrame::error(
                    msg.id,
                    None,
                    codes::BAD_REQUEST,
                    "ack needs data.seq, the highest seq received",
                    None,
                )),
            },
            Some(RouterType::Ping) => out.frames.push(OutFrame::reply(
                "pong",
                msg.id,
                None,
                json!({ "server_time_ms": unix_ms() }),
                true,
            )),
            Some(t @ (RouterType::Subscribe | RouterType::Unsubscribe)) => {
                self.on_topic(t, msg, out)
            }
            Some(RouterType::Cancel) => self.on_cancel(msg, bridge, out),
            Some(RouterType::Presence) => self.on_presence(msg, out),
            None => match &self.closing {
                Some(c) => self.refuse_while_closing(msg, c.reason, out),
                None => self.forward(msg, text.len(), now, bridge, out),
            },
        }
    }

    /// `resume`: read it for the driver, which claims the session; only as
    /// the connection's first frame, and only where resume is on.
    fn on_resume(&self, msg: ClientMessage, first: bool, out: &mut Actions) {
        let refuse = |out: &mut Actions, message: &str| {
            out.frames.push(OutFrame::error(
                msg.id.clone(),
                None,
                codes::BAD_REQUEST,
                message,
                None,
            ));
        };
        if !first {
            return refuse(out, "resume must be the first frame of a connection");
        }
        let field = |k: &str| msg.data.get(k);
        let (Some(session_id), Some(resume_token), Some(last_seq)) = (
            field("session_id").and_then(Value::as_str),
            field("resume_token").and_then(Value::as_str),
            field("last_seq").and_then(Value::as_u64),
        ) else {
            return refuse(
                out,
                "resume needs data.session_id and data.resume_token (strings) and data.last_seq (an integer)",
            );
        };
        out.resume = Some(ResumeRequest {
            id: msg.id.clone(),
            session_id: session_id.to_owned(),
            resume_token: resume_token.to_owned(),
            last_seq,
        });
    }

    fn on_topic(&self, kind: RouterType, msg: ClientMessage, out: &mut Actions) {
        let Some(topic) = msg.data.get("topic").and_then(Value::as_str) else {
            out.frames.push(OutFrame::error(
                msg.id,
                None,
                codes::BAD_REQUEST,
                "data.topic must be a string",
                None,
            ));
            return;
        };
        let ack = if kind == RouterType::Subscribe {
            let watch = msg.data.get("presence").and_then(Value::as_bool) == Some(true);
            if let Err(e) = self.hub.subscribe_with(&self.shared.id, topic, watch) {
                out.frames.push(OutFrame::error(
                    msg.id,
                    None,
                    codes::BAD_REQUEST,
                    e.to_string(),
                    None,
                ));
                return;
            }
            "subscribed"
        } else {
            self.hub.unsubscribe(&self.shared.id, topic);
            "unsubscribed"
        };
        if msg.id.is_some() {
            out.frames.push(OutFrame::reply(
                ack,
                msg.id,
                None,
                json!({ "topic": topic }),
                true,
            ));
        }
    }

    /// `presence`: who is subscribed to a topic, on every router of the
    /// cluster (README, "Presence"). Answered from a task: across routers
    /// it is a Redis query; the answer takes the outbound queue.
    fn on_presence(&self, msg: ClientMessage, out: &mut Actions) {
        let Some(topic) = msg.data.get("topic").and_then(Value::as_str) else {
            out.frames.push(OutFrame::error(
                msg.id,
                None,
                codes::BAD_REQUEST,
                "data.topic must be a string",
                None,
            ));
            return;
        };
        let (hub, shared, topic, id) = (
            self.hub.clone(),
            self.shared.clone(),
            topic.to_owned(),
            msg.id,
        );
        tokio::spawn(async move {
            let clients = hub.presence(&topic).await;
            let data = json!({ "topic": topic, "count": clients.len(), "clients": clients });
            shared.send(Outbound::from(OutFrame::reply(
                "presence", id, None, data, true,
            )));
        });
    }

    fn on_cancel(&self, msg: ClientMessage, bridge: &dyn CommandQueue, out: &mut Actions) {
        let target = msg
            .data
            .get("id")
            .filter(|v| v.is_string() || v.is_number());
        let Some(target) = target else {
            out.frames.push(OutFrame::error(
                msg.id,
                None,
                codes::BAD_REQUEST,
                "data.id must name the request to cancel",
                None,
            ));
            return;
        };
        let key = target.to_string();
        let Some(cid) = self.shared.cid_of(&key) else {
            out.frames.push(OutFrame::error(
                msg.id,
                None,
                codes::BAD_REQUEST,
                format!("no request in flight with id {key}"),
                None,
            ));
            return;
        };
        // The cancelled request gets its own terminal `cancelled` frame; the
        // ack says only that the cancel was queued, so a full queue is not
        // acknowledged.
        let cancel = Command::Cancel {
            cid,
            reason: "client",
        };
        if bridge.try_send(cancel).is_err() {
            out.frames.push(OutFrame::error(
                msg.id,
                None,
                codes::OVERLOADED,
                "router overloaded: cancel not delivered",
                Some(100),
            ));
        } else if msg.id.is_some() {
            out.frames.push(OutFrame::reply(
                RouterType::Cancel.as_str(),
                msg.id,
                None,
                json!({ "id": target }),
                true,
            ));
        }
    }
}
