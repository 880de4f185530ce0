//! Connection-scoped state: each client connection the broker was told of
//! (its `connect`), and its *home worker*.
//!
//! The home worker is chosen when the connection connects (the least
//! loaded live worker of its service) and is sent its `connect`; it gets
//! the connection's `disconnect`, events, binary and raw frames, and, on
//! `affinity` routes, its requests. If it dies or drains, the next message
//! chooses a new one, which is sent `connect` first.

use bridge_proto::{self as proto, codes, ToWorker};
use bytes::Bytes;
use serde_json::Value;
use tokio::time::Instant;
use tracing::info;

use super::{Broker, Outbox, PeerId};
use crate::{client::OutFrame, ids::Cid, ids::ConnId};

/// Per-connection bridge state.
#[derive(Debug)]
pub(super) struct ConnEntry {
    route: String,
    service: String,
    /// The whole `connect`, MessagePack-encoded, for a new home worker.
    /// Decoded, its maps and strings (every request header) cost about a
    /// kilobyte per connection for as long as it lives; encoded, a third.
    connect: Box<[u8]>,
    /// The worker that gets this connection's events (and, with affinity,
    /// its requests). Chosen on connect; re-chosen if it dies.
    home: Option<PeerId>,
}

impl ConnEntry {
    fn new(connect: &proto::Connect) -> Self {
        Self {
            route: connect.route.clone(),
            service: connect.service.clone(),
            // Encoding a map-and-string struct into a vector cannot fail;
            // were it to, a new home would get the connect without extras.
            connect: rmp_serde::to_vec_named(connect)
                .unwrap_or_default()
                .into_boxed_slice(),
            home: None,
        }
    }

    /// The `connect` again, for a new home worker.
    fn connect(&self, conn: &ConnId) -> proto::Connect {
        rmp_serde::from_slice(&self.connect).unwrap_or_else(|_| proto::Connect {
            conn: conn.0.to_string(),
            route: self.route.clone(),
            service: self.service.clone(),
            path: self.route.clone(),
            params: Default::default(),
            query: Default::default(),
            headers: Default::default(),
            remote: String::new(),
            claims: None,
            client_cert: None,
        })
    }
}

impl Broker {
    pub(super) fn on_connect(
        &mut self,
        connect: Box<proto::Connect>,
        now: Instant,
        out: &mut dyn Outbox,
    ) {
        let conn = ConnId(connect.conn.as_str().into());
        self.conns.insert(conn.clone(), ConnEntry::new(&connect));
        // Choose the home now so the worker learns of the client at once.
        self.choose_home(&conn, now, out, Some(*connect));
    }

    /// The connection is gone: its requests still in flight are dropped
    /// (cancelled at their workers) and its home worker is told.
    pub(super) fn on_disconnect(
        &mut self,
        conn: ConnId,
        code: u16,
        reason: String,
        cids: Vec<Cid>,
        now: Instant,
        out: &mut dyn Outbox,
    ) {
        for cid in cids {
            self.abandon(&cid, "disconnected", false, now, out);
        }
        let Some(entry) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(home) = entry.home.filter(|p| self.workers.contains(p)) {
            out.send(
                &home,
                ToWorker::Disconnect(proto::Disconnect {
                    conn: conn.0.to_string(),
                    route: entry.route,
                    service: entry.service,
                    code,
                    reason,
                }),
            );
        }
    }

    /// A fire-and-forget message, for the home worker. One of a type that
    /// no live worker of the service handles (by what they announced) is
    /// answered here, with an error frame naming what the route accepts:
    /// it would only be dropped at the worker.
    pub(super) fn on_event(
        &mut self,
        conn: ConnId,
        msg_type: String,
        data: Value,
        now: Instant,
        out: &mut dyn Outbox,
    ) {
        if let Some(entry) = self.conns.get(&conn) {
            let service = &entry.service;
            if self.workers.handles(service, &msg_type, now) == Some(false) {
                let route = &entry.route;
                let allowed = self
                    .registry
                    .as_ref()
                    .and_then(|r| r.current().get(route).cloned())
                    .and_then(|r| r.allowed_types.clone());
                let accepted = self
                    .workers
                    .types_of(service, now)
                    .into_iter()
                    .filter(|t| allowed.as_ref().is_none_or(|a| a.contains(*t)));
                info!(session.id = %conn, route = %route, r#type = %msg_type, "fire-and-forget message of a type no worker handles: answered unknown_type");
                let frame = OutFrame::unknown_type(None, route, &msg_type, accepted);
                return self.deliver(&conn, frame);
            }
        }
        match self.home_of(&conn, now, out) {
            Some((peer, route, service)) => out.send(
                &peer,
                ToWorker::Event(proto::Event {
                    conn: conn.0.to_string(),
                    route,
                    service,
                    msg_type,
                    data,
                }),
            ),
            None => self.deliver(
                &conn,
                OutFrame::error(
                    None,
                    None,
                    codes::NO_WORKERS,
                    format!("no live worker to take a `{msg_type}` message"),
                    None,
                ),
            ),
        }
    }

    /// A binary frame, for the home worker.
    pub(super) fn on_binary(
        &mut self,
        conn: ConnId,
        data: Bytes,
        now: Instant,
        out: &mut dyn Outbox,
    ) {
        match self.home_of(&conn, now, out) {
            Some((peer, route, service)) => out.send(
                &peer,
                ToWorker::Binary(proto::Binary {
                    conn: conn.0.to_string(),
                    route,
                    service,
                    data: data.to_vec(),
                }),
            ),
            None => self.deliver(
                &conn,
                OutFrame::error(
                    None,
                    None,
                    codes::NO_WORKERS,
                    "no live worker to take a binary frame",
                    None,
                ),
            ),
        }
    }

    /// A frame of a raw route, for the home worker.
    pub(super) fn on_raw(
        &mut self,
        conn: ConnId,
        binary: bool,
        payload: Bytes,
        now: Instant,
        out: &mut dyn Outbox,
    ) {
        if let Some((peer, _, _)) = self.home_of(&conn, now, out) {
            out.send(
                &peer,
                ToWorker::Raw(proto::RawFrame {
                    conn: conn.0.to_string(),
                    binary,
                    payload: payload.to_vec(),
                }),
            );
        } else if let Some(c) = self.hub.get(&conn) {
            // A raw client has no error frame to read: 1013 "try again later".
            c.close(1013, "no live worker serves this route");
        }
    }

    /// The connection's home worker with its route and service, choosing
    /// (and telling) one if needed.
    pub(super) fn home_of(
        &mut self,
        conn: &ConnId,
        now: Instant,
        out: &mut dyn Outbox,
    ) -> Option<(PeerId, String, String)> {
        self.choose_home(conn, now, out, None)
    }

    /// [`Self::home_of`], with the `connect` at hand when it has just
    /// arrived (it is not decoded again for the first home).
    fn choose_home(
        &mut self,
        conn: &ConnId,
        now: Instant,
        out: &mut dyn Outbox,
        connect: Option<proto::Connect>,
    ) -> Option<(PeerId, String, String)> {
        let entry = self.conns.get(conn)?;
        let service = entry.service.clone();
        let route = entry.route.clone();
        if let Some(home) = &entry.home {
            if self.workers.may_host(home) {
                return Some((home.clone(), route, service));
            }
        }
        let peer = self.workers.pick(&service, false, None, now)?;
        let entry = self.conns.get_mut(conn)?;
        entry.home = Some(peer.clone());
        let connect = connect.unwrap_or_else(|| entry.connect(conn));
        out.send(&peer, ToWorker::Connect(connect));
        Some((peer, route, service))
    }

    /// `peer` is gone: the connections it was home to choose again.
    pub(super) fn forget_home(&mut self, peer: &PeerId) {
        for entry in self.conns.values_mut() {
            if entry.home.as_ref() == Some(peer) {
                entry.home = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use crate::{broker::Command, ids::ConnId};
    use bridge_proto::{codes, FromWorker, Push};
    use serde_json::{json, Value};

    fn event(f: &mut Fixture, conn: &ConnId, msg_type: &str) {
        f.broker.on_command(
            Command::Event {
                conn: conn.clone(),
                msg_type: msg_type.into(),
                data: Value::Null,
            },
            &mut f.out,
        );
    }

    #[tokio::test]
    async fn an_event_no_announced_worker_handles_is_answered_by_the_router() {
        let mut f = fixture();
        let (a, b) = (peer("a"), peer("b"));
        f.hello_typed(&a, &["note", "run"]);
        f.hello_typed(&b, &["extra"]);
        let (conn, _shared, mut rx) = f.connected_client();
        for t in ["note", "extra"] {
            event(&mut f, &conn, t);
        }
        assert_eq!(f.events().len(), 2, "handled types are forwarded");
        assert!(frames(&mut rx).is_empty());

        event(&mut f, &conn, "nope");
        assert_eq!(f.events().len(), 2, "an unknown type is not forwarded");
        let got = frames(&mut rx);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].id.clone(), got[0].done), (None, Some(true)));
        let e = got[0].error.clone().expect("an error frame");
        assert_eq!(e.code, codes::UNKNOWN_TYPE);
        assert_eq!(
            e.message,
            "/ws does not handle messages of type `nope`; it accepts `extra`, `note`, `run`"
        );
    }

    #[tokio::test]
    async fn events_are_forwarded_while_a_live_worker_did_not_announce_its_types() {
        let mut f = fixture();
        f.hello_typed(&peer("typed"), &["note"]);
        f.hello(&peer("older"), 4); // a hello without msg_types
        let (conn, _shared, mut rx) = f.connected_client();
        event(&mut f, &conn, "anything");
        assert_eq!(
            f.events().len(),
            1,
            "nothing is assumed about the older worker"
        );
        assert!(frames(&mut rx).is_empty());
    }

    #[tokio::test]
    async fn a_workers_error_push_reaches_the_client_as_an_error_frame() {
        let mut f = fixture();
        let w = peer("w");
        f.hello(&w, 1);
        let (conn, _shared, mut rx) = f.connected_client();
        let push = |msg_type: &str, data: Value| {
            FromWorker::Push(Push {
                conn: conn.0.to_string(),
                msg_type: msg_type.into(),
                data,
            })
        };
        let error = push(
            "error",
            json!({"code": "unknown_type", "message": "no binary handler"}),
        );
        f.broker.on_worker_message(w.clone(), 2, error, &mut f.out);
        f.broker
            .on_worker_message(w.clone(), 2, push("news", json!(1)), &mut f.out);
        let got = frames(&mut rx);
        assert_eq!(error_codes(&got), ["unknown_type"]);
        assert_eq!(got[0].id, None);
        assert_eq!(got[1].msg_type, "news");
        assert_eq!(got[1].data, Some(json!(1)));
    }

    #[tokio::test]
    async fn a_busy_home_worker_does_not_hold_up_other_affinity_requests() {
        let mut f = fixture();
        let (a, b) = (peer("a"), peer("b"));
        f.hello(&a, 1);
        let (c1, s1, _r1) = f.connected_client();
        // a is busy when b arrives, so c2 (least loaded) gets b as its home.
        let busy1 = f.request_with(&c1, &s1, "1", 60_000, true);
        f.hello(&b, 1);
        let (c2, s2, _r2) = f.connected_client();
        let home = |f: &Fixture, c: &ConnId| f.broker.conns[c].home.clone().unwrap();
        let (h1, h2) = (home(&f, &c1), home(&f, &c2));
        assert_eq!((&h1, &h2), (&a, &b), "one home each");
        let busy2 = f.request_with(&c2, &s2, "1", 60_000, true);
        let _waits1 = f.request_with(&c1, &s1, "2", 60_000, true);
        let waits2 = f.request_with(&c2, &s2, "2", 60_000, true);
        let _ = busy1;
        // c2's home frees: c2's queued request goes, although c1's is ahead of it.
        f.reply(&h2, &busy2, true);
        assert!(f.out.requests_to(&h2).contains(&waits2.to_string()));
    }
}
