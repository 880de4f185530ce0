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

use super::{Broker, Outbox, PeerId};
use crate::{client::OutFrame, ids::Cid, ids::ConnId};

/// Per-connection bridge state.
#[derive(Debug)]
pub(super) struct ConnEntry {
    connect: Box<proto::Connect>,
    /// The worker that gets this connection's events (and, with affinity,
    /// its requests). Chosen on connect; re-chosen if it dies.
    home: Option<PeerId>,
}

impl Broker {
    pub(super) fn on_connect(
        &mut self,
        connect: Box<proto::Connect>,
        now: Instant,
        out: &mut dyn Outbox,
    ) {
        let conn = ConnId(connect.conn.clone());
        self.conns.insert(
            conn.clone(),
            ConnEntry {
                connect,
                home: None,
            },
        );
        // Choose the home now so the worker learns of the client at once.
        self.home_of(&conn, now, out);
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
                    conn: conn.0,
                    route: entry.connect.route.clone(),
                    service: entry.connect.service.clone(),
                    code,
                    reason,
                }),
            );
        }
    }

    /// A fire-and-forget message, for the home worker.
    pub(super) fn on_event(
        &mut self,
        conn: ConnId,
        msg_type: String,
        data: Value,
        now: Instant,
        out: &mut dyn Outbox,
    ) {
        match self.home_of(&conn, now, out) {
            Some((peer, route, service)) => out.send(
                &peer,
                ToWorker::Event(proto::Event {
                    conn: conn.0,
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
                    conn: conn.0,
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
                    conn: conn.0,
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
        let entry = self.conns.get(conn)?;
        let service = entry.connect.service.clone();
        let route = entry.connect.route.clone();
        if let Some(home) = &entry.home {
            if self.workers.may_host(home) {
                return Some((home.clone(), route, service));
            }
        }
        let peer = self.workers.pick(&service, false, None, now)?;
        let entry = self.conns.get_mut(conn)?;
        entry.home = Some(peer.clone());
        out.send(&peer, ToWorker::Connect((*entry.connect).clone()));
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
    use crate::ids::ConnId;

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
        assert!(f.out.requests_to(&h2).contains(&waits2.0));
    }
}
