//! What the inbound state machine hands to workers: requests (allowed
//! types, in-flight limit, duplicate ids, breaker admission, and the
//! roll-back when the bridge queue is full), fire-and-forget events, binary
//! frames, and the frames of raw routes.

use bridge_proto::codes;
use bytes::Bytes;
use serde_json::Value;
use tokio::time::Instant;
use tracing::debug;

use super::{Actions, Close, Inbound};
use crate::{
    broker::{BreakerTicket, Command, RequestCmd},
    client::{ClientMessage, OutFrame},
    ids::Cid,
    policy::{breaker::Outcome, ratelimit::retry_after_ms},
    session::CommandQueue,
};

impl Inbound {
    /// A frame of a raw route, unchanged. A raw client has no error frame
    /// to read, so a full bridge queue closes it with 1013 (try again later).
    pub(super) fn forward_raw(
        &mut self,
        binary: bool,
        payload: Bytes,
        bridge: &dyn CommandQueue,
        out: &mut Actions,
    ) {
        self.meter.message_in("raw");
        let cmd = Command::Raw {
            conn: self.shared.id.clone(),
            binary,
            payload,
        };
        if bridge.try_send(cmd).is_err() {
            out.close = Some(Close {
                code: 1013,
                reason: "router overloaded",
            });
        }
    }

    /// A binary frame of an enveloped route, for the connection's worker.
    pub(super) fn forward_binary(
        &mut self,
        data: Bytes,
        bridge: &dyn CommandQueue,
        out: &mut Actions,
    ) {
        self.meter.message_in("binary");
        if !self.route.binary {
            out.frames.push(OutFrame::error(
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
        if bridge.try_send(cmd).is_err() {
            out.frames.push(OutFrame::error(
                None,
                None,
                codes::OVERLOADED,
                "router overloaded: binary frame not delivered",
                Some(100),
            ));
        }
    }

    /// Hands a client message to the bridge: a request if it has an `id`,
    /// else an event. `size`: its frame's bytes.
    pub(super) fn forward(
        &self,
        msg: ClientMessage,
        size: usize,
        now: Instant,
        bridge: &dyn CommandQueue,
        out: &mut Actions,
    ) {
        if let Some(allowed) = &self.route.allowed_types {
            if !allowed.contains(&msg.msg_type) {
                let mut accepted: Vec<&str> = allowed.iter().map(String::as_str).collect();
                accepted.sort_unstable();
                out.frames.push(OutFrame::unknown_type(
                    msg.id,
                    &self.route.path,
                    &msg.msg_type,
                    accepted,
                ));
                return;
            }
        }
        let conn = self.shared.id.clone();
        let Some(id) = msg.id else {
            if let Some(wait) = self.circuit_is_open(now) {
                out.frames.push(self.circuit_open_error(None, wait));
                return;
            }
            let cmd = Command::Event {
                conn,
                msg_type: msg.msg_type,
                data: msg.data,
            };
            if bridge.try_send(cmd).is_err() {
                out.frames.push(OutFrame::error(
                    None,
                    None,
                    codes::OVERLOADED,
                    "router overloaded: message not delivered",
                    Some(100),
                ));
            }
            return;
        };
        // After a resume, a request the client sent again because it could
        // not know the first one had arrived: the original's frames answer it.
        if !self.absorb.is_empty() {
            let key = id.to_string();
            if self.absorb.contains(&key) && self.shared.cid_of(&key).is_some() {
                debug!(id = %key, "request re-sent after a resume: absorbed, the original runs on");
                return;
            }
        }
        if self.shared.inflight_count() >= self.route.max_in_flight {
            out.frames.push(OutFrame::error(
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
        let key: std::sync::Arc<str> = id.to_string().into();
        let cid = Cid::new();
        if !self.shared.begin_request(key.clone(), cid) {
            out.frames.push(OutFrame::error(
                Some(id),
                None,
                codes::BAD_REQUEST,
                "a request with this id is already in flight",
                None,
            ));
            return;
        }
        let ticket = match self.admit_request(now) {
            Ok(t) => t,
            Err(wait) => {
                self.shared.abort_request(&key, &cid);
                out.frames.push(self.circuit_open_error(Some(id), wait));
                return;
            }
        };
        debug!(correlation.id = %cid, r#type = %msg.msg_type, bytes = size, "request");
        self.meter.request_started();
        let cmd = Command::Request(Box::new(RequestCmd {
            cid,
            conn,
            client_key: key.clone(),
            client_id: id.clone(),
            route: self.route.clone(),
            msg_type: msg.msg_type,
            data: msg.data,
            timeout: self.route.request_timeout,
            affinity: self.route.affinity,
            retries: self.route.retries,
            breaker: Some(ticket),
            claims: self.claims.clone(),
            size,
        }));
        if let Err(cmd) = bridge.try_send(cmd) {
            // Give back a half-open probe slot this request would hold forever.
            if let Command::Request(req) = cmd {
                if let Some(t) = req.breaker {
                    t.breaker.record(t.admit, Outcome::Neutral, now, &t.policy);
                }
            }
            self.shared.abort_request(&key, &cid);
            out.frames.push(OutFrame::error(
                Some(id),
                Some(cid),
                codes::OVERLOADED,
                "router overloaded: request not accepted",
                Some(100),
            ));
        }
    }

    /// Fails fast while the route's circuit is open; `Ok` carries the
    /// admission to hand to the broker with the request.
    fn admit_request(&self, now: Instant) -> Result<BreakerTicket, u64> {
        let policy = self.route.breaker;
        match self.runtime.breaker.admit(now, &policy) {
            Ok(admit) => Ok(BreakerTicket {
                breaker: self.runtime.breaker.clone(),
                admit,
                policy,
            }),
            Err(wait) => Err(retry_after_ms(wait)),
        }
    }

    /// For messages that get no reply (events): refuse them while the
    /// circuit is open, without taking the half-open probe slot.
    fn circuit_is_open(&self, now: Instant) -> Option<u64> {
        self.runtime.breaker.retry_after(now).map(retry_after_ms)
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
}
