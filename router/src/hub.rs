//! The hub: every live connection and every topic subscription.
//!
//! Sessions register here; the bridge and the publication listener deliver
//! to connections through it. A topic's subscribers are its presence (who
//! is there, with the user of their token); joins and leaves are pushed to
//! the subscribers that asked for them. With a cluster (`cluster`), every
//! publication and presence change is also handed to the [`Relay`], which
//! carries it to the other routers. Delivery never blocks: each connection has a
//! bounded outbound queue, and a connection whose queue is full is a slow
//! reader that gets closed (1008) instead of growing the router's memory.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use dashmap::DashMap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    client::{OutFrame, Outbound},
    ids::{Cid, ConnId},
    sync::lock,
};

/// Frames a connection may have queued before it counts as a slow reader
/// (the byte bound, `MAX_OUTBOUND_BYTES`, usually comes first).
/// Generous, because workers are not flow-controlled per frame: a worker may
/// stream a burst far faster than one socket drains it, and a client that
/// reads at full speed must not be cut off. The queue ([`crate::outbox`])
/// allocates on its first frame, so an idle connection pays nothing for
/// the bound.
pub const OUTBOUND_QUEUE: usize = 16_384;
/// Topics one connection may be subscribed to at once.
pub const MAX_TOPICS_PER_CONN: usize = 64;
/// Longest topic name, in bytes.
pub const MAX_TOPIC_LEN: usize = 256;

/// Close code and reason the session uses when it is told to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct Kill {
    pub code: u16,
    pub reason: String,
    /// Write what is already queued before the close frame (not for a slow
    /// reader: its queue is what is wrong).
    pub flush: bool,
}

/// The part of a session that others may touch.
#[derive(Debug)]
pub struct ConnShared {
    pub id: ConnId,
    /// Route pattern the connection matched.
    pub route: String,
    tx: crate::outbox::OutboxTx,
    /// Fired to make the session close; the reason is in `kill_reason`.
    pub kill: CancellationToken,
    kill_reason: Mutex<Option<Kill>>,
    /// Requests in flight, and those whose terminal frame is on its way.
    requests: Mutex<Requests>,
    topics: Mutex<HashSet<String>>,
    /// The user of the connection's token (`sub`), for presence.
    user: std::sync::OnceLock<String>,
    /// Frames dropped because the queue was full (for metrics and logs).
    pub dropped: AtomicU64,
    /// Whether the byte bound (rather than the frame count) was what the
    /// client overflowed.
    pub over_bytes: AtomicBool,
    /// Bytes queued and not yet taken by the session writer
    /// ([`Outbound::cost`] of each).
    queued_bytes: AtomicUsize,
    /// The byte bound of the queue. One item is always taken when nothing
    /// is queued, whatever its size. Lowered while the session is parked
    /// (its resume bounds), restored when it is resumed.
    max_bytes: AtomicUsize,
    /// The frame bound of the queue, lowered like `max_bytes`.
    max_frames: AtomicUsize,
}

impl ConnShared {
    pub fn new(
        id: ConnId,
        route: String,
        max_bytes: usize,
    ) -> (Arc<Self>, crate::outbox::OutboxRx) {
        let (tx, rx) = crate::outbox::outbox(OUTBOUND_QUEUE);
        let shared = Arc::new(Self {
            id,
            route,
            tx,
            kill: CancellationToken::new(),
            kill_reason: Mutex::new(None),
            requests: Mutex::new(Requests::default()),
            topics: Mutex::new(HashSet::new()),
            user: std::sync::OnceLock::new(),
            dropped: AtomicU64::new(0),
            over_bytes: AtomicBool::new(false),
            queued_bytes: AtomicUsize::new(0),
            max_bytes: AtomicUsize::new(max_bytes),
            max_frames: AtomicUsize::new(OUTBOUND_QUEUE),
        });
        (shared, rx)
    }

    /// Names the connection's user (the token's `sub`), once.
    pub fn set_user(&self, user: &str) {
        let _ = self.user.set(user.to_owned());
    }

    pub fn user(&self) -> Option<&str> {
        self.user.get().map(String::as_str)
    }

    /// Queues a frame; never waits. A full queue (in frames or in bytes)
    /// closes the connection.
    pub fn send(&self, mut out: Outbound) -> bool {
        // Outside the lock below: it walks the frame's data.
        let cost = out.cost();
        // A request's terminal frame: the request stops counting as
        // finishing only once its frame is queued (the lock is held until
        // then), so [`ConnShared::is_idle`] never sees it gone while its
        // frame is not yet in the queue.
        let _finishing = match &out {
            Outbound::Frame(f) if f.done == Some(true) => f.correlation_id.and_then(|cid| {
                let mut requests = lock(&self.requests);
                requests.finished(&cid).then_some(requests)
            }),
            _ => None,
        };
        let max_frames = self.max_frames.load(Ordering::Relaxed);
        if max_frames < OUTBOUND_QUEUE && self.tx.len() >= max_frames {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.kill_with(
                1008,
                "more frames than the session's resume bounds keep",
                false,
            );
            return false;
        }
        let before = self.queued_bytes.fetch_add(cost, Ordering::AcqRel);
        if before > 0 && before.saturating_add(cost) > self.max_bytes.load(Ordering::Relaxed) {
            self.queued_bytes.fetch_sub(cost, Ordering::AcqRel);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.over_bytes.store(true, Ordering::Relaxed);
            self.kill_with(
                1008,
                "outbound queue over its byte limit: the client reads too slowly",
                false,
            );
            return false;
        }
        match self.tx.try_send(out) {
            Ok(()) => true,
            Err(crate::outbox::SendError::Full) => {
                self.queued_bytes.fetch_sub(cost, Ordering::AcqRel);
                self.dropped.fetch_add(1, Ordering::Relaxed);
                self.kill_with(
                    1008,
                    "outbound queue full: the client reads too slowly",
                    false,
                );
                false
            }
            Err(crate::outbox::SendError::Closed) => {
                self.queued_bytes.fetch_sub(cost, Ordering::AcqRel);
                false
            }
        }
    }

    /// Sets the queue's bounds: lower ones while the session is parked (so
    /// replies to a client that is away cannot pile up past its resume
    /// bounds), the usual ones again on resume.
    pub fn set_bounds(&self, max_frames: usize, max_bytes: usize) {
        self.max_frames
            .store(max_frames.clamp(1, OUTBOUND_QUEUE), Ordering::Relaxed);
        self.max_bytes.store(max_bytes, Ordering::Relaxed);
    }

    /// The client ids of the requests in flight, as the client sent them.
    pub fn inflight_ids(&self) -> Vec<serde_json::Value> {
        lock(&self.requests)
            .by_key
            .keys()
            .filter_map(|k| serde_json::from_str(k).ok())
            .collect()
    }

    /// The session writer took `out` off the queue.
    pub fn dequeued(&self, out: &mut Outbound) {
        self.queued_bytes.fetch_sub(out.cost(), Ordering::AcqRel);
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Acquire)
    }

    /// Asks the session to close with this code once it has written what
    /// is already queued (first reason wins).
    pub fn close(&self, code: u16, reason: &str) {
        self.kill_with(code, reason, true);
    }

    fn kill_with(&self, code: u16, reason: &str, flush: bool) {
        let mut slot = lock(&self.kill_reason);
        if slot.is_none() {
            *slot = Some(Kill {
                code,
                reason: reason.to_owned(),
                flush,
            });
        }
        drop(slot);
        self.kill.cancel();
    }

    pub fn kill_reason(&self) -> Option<Kill> {
        lock(&self.kill_reason).clone()
    }

    /// Records a request as in flight; `false` if that client id already is.
    pub fn begin_request(&self, client_key: Arc<str>, cid: Cid) -> bool {
        let mut requests = lock(&self.requests);
        if requests.by_key.contains_key(&client_key) {
            return false;
        }
        requests.by_key.insert(client_key, cid);
        true
    }

    /// A request is over and its terminal frame (carrying `cid`) is about
    /// to be queued: frees its client id, if `client_key` still names that
    /// request (the client may already have reused the id for a new one).
    /// The id is freed before the frame is queued because the client may
    /// reuse it as soon as it reads the frame; until the frame is queued
    /// the request counts as finishing, so the connection is not idle.
    pub fn end_request(&self, client_key: &str, cid: &Cid) {
        let mut requests = lock(&self.requests);
        if requests.by_key.get(client_key) == Some(cid) {
            requests.by_key.remove(client_key);
            requests.finishing.push(*cid);
        }
    }

    /// Forgets a request that never reached the bridge (no terminal frame
    /// will come for it from there).
    pub fn abort_request(&self, client_key: &str, cid: &Cid) {
        let mut requests = lock(&self.requests);
        if requests.by_key.get(client_key) == Some(cid) {
            requests.by_key.remove(client_key);
        }
    }

    pub fn inflight_count(&self) -> usize {
        lock(&self.requests).by_key.len()
    }

    /// No request in flight and no terminal frame still to be queued: what
    /// a closing session waits for (then it writes what is queued, and
    /// closes).
    pub fn is_idle(&self) -> bool {
        let requests = lock(&self.requests);
        requests.by_key.is_empty() && requests.finishing.is_empty()
    }

    pub fn cid_of(&self, client_key: &str) -> Option<Cid> {
        lock(&self.requests).by_key.get(client_key).cloned()
    }

    /// Every request still in flight (used when the connection ends).
    pub fn drain_inflight(&self) -> Vec<Cid> {
        let mut requests = lock(&self.requests);
        requests.finishing.clear();
        requests.by_key.drain().map(|(_, c)| c).collect()
    }
}

/// A connection's requests.
#[derive(Debug, Default)]
struct Requests {
    /// In flight: client id (as JSON text) → correlation id.
    by_key: HashMap<Arc<str>, Cid>,
    /// Ended ([`ConnShared::end_request`]) but their terminal frame not yet
    /// queued; a few at most, for the moment between the two steps.
    finishing: Vec<Cid>,
}

impl Requests {
    /// The terminal frame of `cid` is being queued; `true` if it was
    /// finishing.
    fn finished(&mut self, cid: &Cid) -> bool {
        match self.finishing.iter().position(|c| c == cid) {
            Some(i) => {
                self.finishing.swap_remove(i);
                true
            }
            None => false,
        }
    }
}

/// A connection's place in the [`Hub`] (see [`Hub::attach`]).
#[derive(Debug)]
#[must_use = "dropping the registration unregisters the connection at once"]
pub struct Registration {
    hub: Arc<Hub>,
    id: ConnId,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.unregister(&self.id);
    }
}

/// Why a subscription was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubscribeError {
    #[error("topic must be 1 to {MAX_TOPIC_LEN} bytes")]
    BadTopic,
    #[error("a connection may subscribe to at most {MAX_TOPICS_PER_CONN} topics")]
    TooMany,
    #[error("no such connection")]
    NoConnection,
}

/// A subscriber of a topic.
#[derive(Debug, Clone)]
struct Member {
    user: Option<String>,
    /// Wants the topic's presence pushes (`subscribe` with `presence: true`).
    watch: bool,
}

/// A join or a leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceEvent {
    Join,
    Leave,
}

impl PresenceEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceEvent::Join => "join",
            PresenceEvent::Leave => "leave",
        }
    }
}

/// What the hub hands to the cluster link (`cluster`): publications made
/// here, and presence changes of connections here.
#[derive(Debug)]
pub enum Relay {
    Publish {
        topic: String,
        msg_type: String,
        data: serde_json::Value,
    },
    Presence {
        topic: String,
        event: PresenceEvent,
        session_id: String,
        user: Option<String>,
    },
}

/// One present client of a topic (the `presence` request's answer).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Present {
    pub session_id: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub user: Option<String>,
    pub router_id: String,
}

/// Answers `presence` across routers (the cluster link); `None` when it
/// cannot now (the hub then answers with its own subscribers).
pub trait PresenceQuery: Send + Sync + std::fmt::Debug {
    fn query(
        &self,
        topic: &str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<Vec<Present>>> + Send>>;
}

/// All connections and topics of this router.
#[derive(Debug, Default)]
pub struct Hub {
    conns: DashMap<ConnId, Arc<ConnShared>>,
    topics: DashMap<String, HashMap<ConnId, Member>>,
    router_id: std::sync::OnceLock<String>,
    relay: std::sync::OnceLock<mpsc::Sender<Relay>>,
    query: std::sync::OnceLock<Arc<dyn PresenceQuery>>,
    /// Relays that found the link's queue full (counted, logged by the link).
    pub relay_dropped: AtomicU64,
}

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    /// This router's id (welcome, presence), set once at start.
    pub fn set_router_id(&self, id: &str) {
        let _ = self.router_id.set(id.to_owned());
    }

    pub fn router_id(&self) -> &str {
        self.router_id.get().map(String::as_str).unwrap_or("")
    }

    /// Hands publications and presence changes to the cluster link from now on.
    pub fn set_relay(&self, relay: mpsc::Sender<Relay>) {
        let _ = self.relay.set(relay);
    }

    /// Answers `presence` through the cluster from now on.
    pub fn set_presence_query(&self, query: Arc<dyn PresenceQuery>) {
        let _ = self.query.set(query);
    }

    /// Who is subscribed to `topic`: across the cluster when there is one
    /// and it answers, else on this router.
    pub async fn presence(&self, topic: &str) -> Vec<Present> {
        if let Some(q) = self.query.get() {
            if let Some(all) = q.query(topic).await {
                return all;
            }
        }
        self.present(topic)
    }

    fn relay(&self, r: Relay) {
        if let Some(tx) = self.relay.get() {
            if tx.try_send(r).is_err() {
                self.relay_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn register(&self, conn: Arc<ConnShared>) {
        self.conns.insert(conn.id.clone(), conn);
    }

    /// Registers a connection for as long as the returned guard lives: its
    /// `Drop` unregisters the connection and its topics, so a session that
    /// panics or whose future is dropped cannot leave an entry behind.
    pub fn attach(self: &Arc<Self>, conn: Arc<ConnShared>) -> Registration {
        let id = conn.id.clone();
        self.register(conn);
        Registration {
            hub: self.clone(),
            id,
        }
    }

    /// Removes a connection and all its subscriptions.
    pub fn unregister(&self, id: &ConnId) {
        if let Some((_, conn)) = self.conns.remove(id) {
            let topics: Vec<String> = lock(&conn.topics).drain().collect();
            for t in topics {
                self.remove_from_topic(&t, id);
            }
        }
    }

    pub fn get(&self, id: &ConnId) -> Option<Arc<ConnShared>> {
        self.conns.get(id).map(|c| c.clone())
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Delivers to one connection; `false` if it is gone or too slow.
    pub fn send(&self, id: &ConnId, out: Outbound) -> bool {
        match self.get(id) {
            Some(c) => c.send(out),
            None => false,
        }
    }

    pub fn subscribe(&self, id: &ConnId, topic: &str) -> Result<(), SubscribeError> {
        self.subscribe_with(id, topic, false)
    }

    /// Subscribes; `watch`: also push the topic's joins and leaves to it.
    /// A first subscription is a join of the topic's presence.
    pub fn subscribe_with(
        &self,
        id: &ConnId,
        topic: &str,
        watch: bool,
    ) -> Result<(), SubscribeError> {
        if topic.is_empty() || topic.len() > MAX_TOPIC_LEN {
            return Err(SubscribeError::BadTopic);
        }
        let conn = self.get(id).ok_or(SubscribeError::NoConnection)?;
        {
            let mut mine = lock(&conn.topics);
            if !mine.contains(topic) && mine.len() >= MAX_TOPICS_PER_CONN {
                return Err(SubscribeError::TooMany);
            }
            mine.insert(topic.to_owned());
        }
        let user = conn.user().map(str::to_owned);
        let joined = {
            let mut members = self.topics.entry(topic.to_owned()).or_default();
            match members.get_mut(id) {
                Some(m) => {
                    m.watch |= watch;
                    false
                }
                None => {
                    members.insert(
                        id.clone(),
                        Member {
                            user: user.clone(),
                            watch,
                        },
                    );
                    true
                }
            }
        };
        // The connection may have unregistered between the two steps; then
        // undo so the topic does not keep a dead id.
        if !self.conns.contains_key(id) {
            self.remove_from_topic(topic, id);
        } else if joined {
            self.presence_changed(topic, PresenceEvent::Join, &id.0, user);
        }
        Ok(())
    }

    pub fn unsubscribe(&self, id: &ConnId, topic: &str) {
        if let Some(conn) = self.get(id) {
            lock(&conn.topics).remove(topic);
        }
        self.remove_from_topic(topic, id);
    }

    fn remove_from_topic(&self, topic: &str, id: &ConnId) {
        let left = self
            .topics
            .get_mut(topic)
            .and_then(|mut set| set.remove(id));
        self.topics.remove_if(topic, |_, set| set.is_empty());
        if let Some(m) = left {
            self.presence_changed(topic, PresenceEvent::Leave, &id.0, m.user);
        }
    }

    /// A join or leave here: pushed to this router's watchers of the topic
    /// and relayed to the others.
    fn presence_changed(
        &self,
        topic: &str,
        event: PresenceEvent,
        session_id: &str,
        user: Option<String>,
    ) {
        self.deliver_presence(topic, event, session_id, user.as_deref());
        self.relay(Relay::Presence {
            topic: topic.to_owned(),
            event,
            session_id: session_id.to_owned(),
            user,
        });
    }

    /// Pushes a join or leave to the topic's watchers on this router.
    pub fn deliver_presence(
        &self,
        topic: &str,
        event: PresenceEvent,
        session_id: &str,
        user: Option<&str>,
    ) -> usize {
        let watchers: Vec<ConnId> = match self.topics.get(topic) {
            Some(set) => set
                .iter()
                .filter(|(_, m)| m.watch)
                .map(|(id, _)| id.clone())
                .collect(),
            None => return 0,
        };
        if watchers.is_empty() {
            return 0;
        }
        let mut data = serde_json::json!({ "event": event.as_str(), "session_id": session_id });
        if let Some(u) = user {
            data["user"] = u.into();
        }
        let frame = Outbound::shared(OutFrame::push("presence", Some(topic.to_owned()), data));
        watchers
            .iter()
            .filter(|id| self.send(id, frame.clone()))
            .count()
    }

    /// The topic's subscribers on this router.
    pub fn present(&self, topic: &str) -> Vec<Present> {
        self.topics
            .get(topic)
            .map(|set| set.iter().map(|(id, m)| self.entry(id, m)).collect())
            .unwrap_or_default()
    }

    /// Every (topic, subscriber) here, for the cluster's presence refresh.
    pub fn all_present(&self) -> Vec<(String, Present)> {
        let mut out = Vec::new();
        for topic in self.topics.iter() {
            for (id, m) in topic.value() {
                out.push((topic.key().clone(), self.entry(id, m)));
            }
        }
        out
    }

    /// A subscriber as presence shows it.
    fn entry(&self, id: &ConnId, m: &Member) -> Present {
        Present {
            session_id: id.0.to_string(),
            user: m.user.clone(),
            router_id: self.router_id().to_owned(),
        }
    }

    /// Delivers a publication made here to every subscriber here, and
    /// relays it to the other routers; returns how many here got it.
    pub fn publish(&self, topic: &str, msg_type: &str, data: serde_json::Value) -> usize {
        if self.relay.get().is_some() {
            self.relay(Relay::Publish {
                topic: topic.to_owned(),
                msg_type: msg_type.to_owned(),
                data: data.clone(),
            });
        }
        self.deliver(topic, msg_type, data)
    }

    /// Delivers a publication to every subscriber on this router (one that
    /// another router relayed, or one made here); returns how many got it.
    pub fn deliver(&self, topic: &str, msg_type: &str, data: serde_json::Value) -> usize {
        let subscribers: Vec<ConnId> = match self.topics.get(topic) {
            Some(set) => set.keys().cloned().collect(),
            None => return 0,
        };
        // Serialized once; each connection adds its `seq`.
        let frame = Outbound::shared(OutFrame::push(msg_type, Some(topic.to_owned()), data));
        subscribers
            .iter()
            .filter(|id| self.send(id, frame.clone()))
            .count()
    }

    pub fn topic_count(&self) -> usize {
        self.topics.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conn(hub: &Hub) -> (ConnId, crate::outbox::OutboxRx) {
        let id = ConnId::new();
        let (c, rx) = ConnShared::new(id.clone(), "/ws".into(), usize::MAX);
        hub.register(c);
        (id, rx)
    }

    #[test]
    fn publications_reach_exactly_the_subscribers() {
        let hub = Hub::new();
        let (a, mut ra) = conn(&hub);
        let (_b, mut rb) = conn(&hub);
        hub.subscribe(&a, "room:1").unwrap();
        assert_eq!(hub.publish("room:1", "say", json!("hi")), 1);
        match ra.try_recv() {
            Ok(Outbound::Shared(f)) => assert_eq!(
                f.to_json(7),
                r#"{"type":"say","topic":"room:1","data":"hi","seq":7}"#
            ),
            other => panic!("expected the publication, got {other:?}"),
        }
        assert!(rb.try_recv().is_err());
        hub.unsubscribe(&a, "room:1");
        assert_eq!(hub.publish("room:1", "say", json!("hi")), 0);
        assert_eq!(hub.topic_count(), 0);
    }

    #[test]
    fn unregister_clears_subscriptions_and_limits_hold() {
        let hub = Hub::new();
        let (a, _ra) = conn(&hub);
        for i in 0..MAX_TOPICS_PER_CONN {
            hub.subscribe(&a, &format!("t{i}")).unwrap();
        }
        assert_eq!(hub.subscribe(&a, "one-more"), Err(SubscribeError::TooMany));
        assert_eq!(hub.subscribe(&a, ""), Err(SubscribeError::BadTopic));
        hub.unregister(&a);
        assert_eq!(hub.topic_count(), 0);
        assert!(hub.is_empty());
    }

    #[test]
    fn a_full_queue_closes_the_connection() {
        let hub = Hub::new();
        let (a, _ra) = conn(&hub);
        for _ in 0..OUTBOUND_QUEUE {
            assert!(hub.send(&a, OutFrame::push("x", None, json!(1)).into()));
        }
        assert!(!hub.send(&a, OutFrame::push("x", None, json!(1)).into()));
        let c = hub.get(&a).unwrap();
        assert!(c.kill.is_cancelled());
        assert_eq!(c.kill_reason().unwrap().code, 1008);
    }

    #[test]
    fn the_byte_bound_closes_a_slow_reader_and_dequeues_give_bytes_back() {
        let (c, mut rx) = ConnShared::new(ConnId::new(), "/ws".into(), 10_000);
        let big = || Outbound::Binary(bytes::Bytes::from(vec![0u8; 6_000]));
        // One item is always taken into an empty queue, whatever its size.
        assert!(c.send(Outbound::Binary(bytes::Bytes::from(vec![0u8; 50_000]))));
        let mut first = rx.try_recv().unwrap();
        c.dequeued(&mut first);
        assert_eq!(c.queued_bytes(), 0);
        assert!(c.send(big()));
        assert_eq!(c.queued_bytes(), 6_000);
        assert!(!c.send(big()), "12 000 bytes would pass the bound");
        assert!(c.over_bytes.load(Ordering::Relaxed));
        assert_eq!(c.kill_reason().unwrap().code, 1008);
        assert_eq!(c.queued_bytes(), 6_000, "the refused frame is not counted");
        // Frames are charged what their dequeue gives back.
        let (c, mut rx) = ConnShared::new(ConnId::new(), "/ws".into(), usize::MAX);
        for i in 0..10 {
            assert!(c.send(OutFrame::push("t", None, json!({"i": i, "s": "é".repeat(i)})).into()));
        }
        while let Ok(mut out) = rx.try_recv() {
            c.dequeued(&mut out);
        }
        assert_eq!(c.queued_bytes(), 0);
    }

    #[test]
    fn an_attachment_unregisters_the_connection_and_its_topics_when_dropped() {
        let hub = Arc::new(Hub::new());
        let (c, _rx) = ConnShared::new(ConnId::new(), "/ws".into(), usize::MAX);
        let id = c.id.clone();
        let registration = hub.attach(c);
        hub.subscribe(&id, "t").unwrap();
        assert_eq!((hub.len(), hub.topic_count()), (1, 1));
        drop(registration);
        assert!(hub.is_empty());
        assert_eq!(hub.topic_count(), 0);
    }

    /// The broker frees a client id, then queues the terminal frame; the
    /// connection is idle only once that frame is in the queue.
    #[test]
    fn a_request_is_finishing_until_its_terminal_frame_is_queued() {
        let (c, mut rx) = ConnShared::new(ConnId::new(), "/ws".into(), usize::MAX);
        let (a, b) = (Cid::new(), Cid::new());
        assert!(c.begin_request("\"a\"".into(), a));
        assert!(c.begin_request("\"b\"".into(), b));
        c.end_request("\"a\"", &a);
        c.abort_request("\"b\"", &b);
        assert_eq!(c.inflight_count(), 0, "both ids are free");
        assert!(!c.is_idle(), "a's terminal frame is not queued yet");
        // Partial replies and other requests' frames do not end it.
        assert!(c.send(OutFrame::reply("r", None, Some(a), json!(1), false).into()));
        assert!(c.send(OutFrame::error(None, Some(b), "x", "y", None).into()));
        assert!(!c.is_idle());
        assert!(c.send(OutFrame::reply("r", None, Some(a), json!(2), true).into()));
        assert!(c.is_idle());
        assert_eq!(std::iter::from_fn(|| rx.try_recv().ok()).count(), 3);
    }

    #[test]
    fn duplicate_client_ids_are_refused_while_in_flight() {
        let (c, _rx) = ConnShared::new(ConnId::new(), "/ws".into(), usize::MAX);
        let first = Cid::new();
        assert!(c.begin_request("\"1\"".into(), first));
        assert!(!c.begin_request("\"1\"".into(), Cid::new()));
        c.end_request("\"1\"", &first);
        let second = Cid::new();
        assert!(c.begin_request("\"1\"".into(), second));
        c.end_request("\"1\"", &first);
        assert_eq!(
            c.inflight_count(),
            1,
            "a stale end must not remove the reused id"
        );
        assert_eq!(c.drain_inflight().len(), 1);
        assert_eq!(c.inflight_count(), 0);
    }
}
