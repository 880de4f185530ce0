//! [`WorkerHandle`]: the cloneable way into a running worker, from handlers
//! or from any other task (pushes, closes, subscriptions, publications,
//! status, stop).
//!
//! Every method encodes the message and queues it for the socket task over
//! a bounded channel: `Ok` means the worker accepted it, not that the router
//! received it. While the worker is reconnecting, queued messages are
//! dropped (the connections they address belonged to the lost router
//! session). A message bigger than the router's frame limit
//! (`max_frame_bytes` of its welcome) is refused with
//! [`SendError::TooLarge`] instead of being sent.
//!
//! With several routers (a list of bridge endpoints), each message goes to
//! one router session: replies to the session their request came from; a
//! push, close, raw frame or (un)subscription to the router its connection
//! lives on (the one that brought the connection's messages; to every
//! session when the worker has never seen the connection); a publication to
//! the first router session that is live, in list order.

use std::sync::Arc;

use bridge_proto::{Close, FromWorker, Publish, Push, PushBinary, RawFrame, TopicChange};
use serde_json::Value;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::error::SendError;
use crate::handler::Frame;
use crate::outgoing::Outgoing;
use crate::sessions::{publication_target, ConnDirectory, SessionLink, Target};

/// Longest close reason a WebSocket close frame carries (125 - 2 code bytes).
const MAX_CLOSE_REASON: usize = 123;

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Where the worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Connecting or saying hello; no router has welcomed this socket yet.
    Connecting,
    /// Welcomed by the router and serving.
    Registered,
    /// Stopping: `bye` sent, finishing in-flight requests.
    Stopping,
    /// Stopped; [`Worker::run`](crate::Worker::run) has returned or is returning.
    Stopped,
}

/// A snapshot of the worker's state, published on every change.
///
/// With several routers, [`WorkerHandle::status`] sums them up: registered
/// while any router session is, welcomes of all sessions counted, the
/// smallest frame limit any router announced;
/// [`WorkerHandle::router_statuses`] has each session's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Current state.
    pub state: State,
    /// How many times a router has welcomed this worker (1 after the first
    /// registration, 2 after the first re-registration, ...).
    pub registrations: u64,
    /// The `router_id` of the last welcome.
    pub router_id: Option<String>,
    /// The largest frame the router of the last welcome accepts, if it said
    /// (`max_frame_bytes`); bigger messages are not sent.
    pub max_frame_bytes: Option<u64>,
}

impl Status {
    pub(crate) fn initial() -> Self {
        Self {
            state: State::Connecting,
            registrations: 0,
            router_id: None,
            max_frame_bytes: None,
        }
    }
}

/// A cloneable handle to a worker.
#[derive(Clone)]
pub struct WorkerHandle {
    /// One per router, in endpoint order (one for a single endpoint).
    pub(crate) sessions: Arc<[SessionLink]>,
    /// The session whose request or event this handle was given for
    /// (handles in a [`Context`](crate::Context) or an
    /// [`EventContext`](crate::EventContext)): replies go there.
    pub(crate) home: Option<usize>,
    /// Which router each connection lives on; `None` with a single router.
    pub(crate) directory: Option<Arc<ConnDirectory>>,
    pub(crate) stop: CancellationToken,
    pub(crate) status: watch::Receiver<Status>,
    pub(crate) worker_id: Arc<str>,
    pub(crate) services: Arc<[String]>,
}

impl std::fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerHandle")
            .field("worker_id", &self.worker_id)
            .field("status", &*self.status.borrow())
            .finish()
    }
}

impl WorkerHandle {
    /// The id this worker announces in `hello`.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// The services this worker serves.
    pub fn services(&self) -> &[String] {
        &self.services
    }

    /// Sends a JSON message to one client connection.
    pub async fn push(
        &self,
        conn: impl Into<String>,
        msg_type: impl Into<String>,
        data: Value,
    ) -> Result<(), SendError> {
        self.send(FromWorker::Push(Push {
            conn: conn.into(),
            msg_type: msg_type.into(),
            data,
        }))
        .await
    }

    /// Sends a binary frame to one client connection.
    pub async fn push_binary(
        &self,
        conn: impl Into<String>,
        data: impl Into<Vec<u8>>,
    ) -> Result<(), SendError> {
        self.send(FromWorker::PushBinary(PushBinary {
            conn: conn.into(),
            data: data.into(),
        }))
        .await
    }

    /// Sends a frame unchanged to a client of a raw route.
    pub async fn send_raw(&self, conn: impl Into<String>, frame: Frame) -> Result<(), SendError> {
        self.send(FromWorker::Raw(RawFrame {
            conn: conn.into(),
            binary: frame.binary,
            payload: frame.payload.into(),
        }))
        .await
    }

    /// Closes a client connection with a WebSocket close code (1000, or
    /// 3000-4999 for application codes). A reason longer than the 123
    /// bytes a close frame can carry is cut at a character boundary.
    pub async fn close(
        &self,
        conn: impl Into<String>,
        code: u16,
        reason: impl Into<String>,
    ) -> Result<(), SendError> {
        let mut reason = reason.into();
        truncate_utf8(&mut reason, MAX_CLOSE_REASON);
        self.send(FromWorker::Close(Close {
            conn: conn.into(),
            code,
            reason,
        }))
        .await
    }

    /// Subscribes a client connection to a topic.
    pub async fn subscribe(
        &self,
        conn: impl Into<String>,
        topic: impl Into<String>,
    ) -> Result<(), SendError> {
        self.send(FromWorker::Subscribe(TopicChange {
            conn: conn.into(),
            topic: topic.into(),
        }))
        .await
    }

    /// Unsubscribes a client connection from a topic.
    pub async fn unsubscribe(
        &self,
        conn: impl Into<String>,
        topic: impl Into<String>,
    ) -> Result<(), SendError> {
        self.send(FromWorker::Unsubscribe(TopicChange {
            conn: conn.into(),
            topic: topic.into(),
        }))
        .await
    }

    /// Publishes to every client subscribed to `topic`.
    ///
    /// This goes over the worker's own socket, so it is ordered with this
    /// worker's other messages (a `subscribe` sent before it takes effect
    /// first); a [`Publisher`](crate::Publisher) has no such ordering.
    pub async fn publish(
        &self,
        topic: impl Into<String>,
        msg_type: impl Into<String>,
        data: Value,
    ) -> Result<(), SendError> {
        self.send(FromWorker::Publish(Publish {
            topic: topic.into(),
            msg_type: msg_type.into(),
            data,
        }))
        .await
    }

    /// Asks the worker to stop gracefully: `bye`, finish in-flight work
    /// (bounded by the grace period), close. Returns at once.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Whether a stop has been requested.
    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// The worker's current status.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change.
    pub fn watch_status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Each router session's endpoint and status, in endpoint order (one
    /// entry for a single endpoint).
    pub fn router_statuses(&self) -> Vec<(String, Status)> {
        self.sessions
            .iter()
            .map(|s| (s.endpoint.to_string(), s.status.borrow().clone()))
            .collect()
    }

    /// Waits until the worker has been welcomed at least `registrations`
    /// times; fails if it stops first.
    pub async fn wait_registrations(&self, registrations: u64) -> Result<Status, SendError> {
        let mut rx = self.status.clone();
        let result = rx
            .wait_for(|s| s.registrations >= registrations || s.state == State::Stopped)
            .await
            .map(|s| s.clone());
        match result {
            Ok(s) if s.registrations >= registrations => Ok(s),
            _ => Err(SendError::Stopped),
        }
    }

    /// Waits for the first registration.
    pub async fn wait_registered(&self) -> Result<Status, SendError> {
        self.wait_registrations(1).await
    }

    /// This handle, for messages of session `home` (given to handlers).
    pub(crate) fn homed(&self, home: usize) -> WorkerHandle {
        WorkerHandle {
            home: Some(home),
            ..self.clone()
        }
    }

    /// Where `msg` goes (see the module docs).
    fn target(&self, msg: &FromWorker) -> Target {
        if self.sessions.len() == 1 {
            return Target::One(0);
        }
        let conn = match msg {
            FromWorker::Publish(_) => return Target::One(publication_target(&self.sessions)),
            FromWorker::Push(Push { conn, .. })
            | FromWorker::PushBinary(PushBinary { conn, .. })
            | FromWorker::Raw(RawFrame { conn, .. })
            | FromWorker::Close(Close { conn, .. })
            | FromWorker::Subscribe(TopicChange { conn, .. })
            | FromWorker::Unsubscribe(TopicChange { conn, .. }) => conn,
            _ => return Target::One(self.home.unwrap_or(0)),
        };
        let known = self.directory.as_ref().and_then(|d| d.get(conn));
        match known.or(self.home) {
            Some(i) => Target::One(i),
            None => Target::All,
        }
    }

    /// Queues a message that is not a reply. One over the router's frame
    /// limit is refused here, so its caller knows.
    pub(crate) async fn send(&self, msg: FromWorker) -> Result<(), SendError> {
        let target = self.target(&msg);
        let out = Outgoing::new(msg);
        if let Some(e) = out.over(self.frame_limit(target)) {
            return Err(e);
        }
        match target {
            Target::One(i) => self.queue(i, out).await,
            Target::All => {
                let mut queued = false;
                for i in 0..self.sessions.len() {
                    let copy = Outgoing::frame(out.kind, out.frame.clone());
                    queued |= self.queue(i, copy).await.is_ok();
                }
                if queued {
                    Ok(())
                } else {
                    Err(SendError::Stopped)
                }
            }
        }
    }

    /// Queues a reply or error of a request: the socket task vets it (and
    /// turns one over the frame limit into the request's
    /// `payload_too_large`). Also reports a frame over the limit to the
    /// caller, so a handler learns that its request has ended.
    pub(crate) async fn send_for_request(&self, msg: FromWorker) -> Result<(), SendError> {
        let home = self.home.unwrap_or(0);
        let out = Outgoing::new(msg);
        let too_large = out.over(self.frame_limit(Target::One(home)));
        self.queue(home, out).await?;
        too_large.map_or(Ok(()), Err)
    }

    /// Queues an encoded publication for the session publications go to,
    /// and waits until that session's task has written it to a registered
    /// session's socket ([`SendError::NotConnected`] when it had none).
    pub(crate) async fn publish_confirmed(&self, mut out: Outgoing) -> Result<(), SendError> {
        let target = publication_target(&self.sessions);
        if let Some(e) = out.over(self.frame_limit(Target::One(target))) {
            return Err(e);
        }
        let (tx, rx) = oneshot::channel();
        out.ack = Some(tx);
        self.queue(target, out).await?;
        rx.await.unwrap_or(Err(SendError::Stopped))
    }

    async fn queue(&self, session: usize, out: Outgoing) -> Result<(), SendError> {
        let Some(link) = self.sessions.get(session) else {
            return Err(SendError::Stopped);
        };
        link.tx.send(out).await.map_err(|_| SendError::Stopped)
    }

    /// The frame limit of the router(s) a message goes to.
    fn frame_limit(&self, target: Target) -> Option<u64> {
        match target {
            Target::One(i) if self.sessions.len() > 1 => self
                .sessions
                .get(i)
                .and_then(|s| s.status.borrow().max_frame_bytes),
            _ => self.status.borrow().max_frame_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_are_cut_on_char_boundaries() {
        for (input, max, expected) in [
            ("short", 123, "short"),
            ("abcdef", 3, "abc"),
            ("ééé", 3, "é"), // 2-byte chars: byte 3 is inside the second
            ("", 0, ""),
        ] {
            let mut s = input.to_owned();
            truncate_utf8(&mut s, max);
            assert_eq!(s, expected);
        }
    }
}
