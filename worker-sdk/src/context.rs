//! What a handler knows about the message it handles: [`Context`] for a
//! request (correlation id, deadline, cancellation, streaming replies) and
//! [`EventContext`] for everything that gets no reply (events, binary and
//! raw frames, connects, disconnects).
//!
//! Both carry a [`WorkerHandle`] and offer its operations on their own
//! connection; [`Context::worker`] / [`EventContext::worker`] reach any
//! other connection.

use std::sync::Arc;

use bridge_proto::{FromWorker, Reply as WireReply};
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{HandlerError, SendError};
use crate::handle::WorkerHandle;
use crate::handler::Frame;

/// Everything about one request, given to its handler.
///
/// Cloning is allowed (e.g. to stream from a helper task), but anything sent
/// for the request after its final reply or error is dropped by the SDK.
#[derive(Clone)]
pub struct Context {
    pub(crate) cid: Arc<str>,
    pub(crate) conn: Arc<str>,
    pub(crate) route: Arc<str>,
    pub(crate) service: Arc<str>,
    pub(crate) msg_type: Arc<str>,
    pub(crate) client_id: Value,
    pub(crate) deadline: Instant,
    pub(crate) attempt: u32,
    pub(crate) token: CancellationToken,
    pub(crate) claims: Option<Arc<Value>>,
    pub(crate) handle: WorkerHandle,
}

impl std::fmt::Debug for Context {
    // Leaves out the client id and claims: they may be user data.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("correlation_id", &self.cid)
            .field("connection_id", &self.conn)
            .field("route", &self.route)
            .field("msg_type", &self.msg_type)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// The router's correlation id of this request (join logs on it).
    pub fn correlation_id(&self) -> &str {
        &self.cid
    }

    /// The id of the client connection that sent the request.
    pub fn connection_id(&self) -> &str {
        &self.conn
    }

    /// The route pattern the connection matched (e.g. `/ws/vision`).
    pub fn route(&self) -> &str {
        &self.route
    }

    /// The service the request was routed to.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The client's message type.
    pub fn msg_type(&self) -> &str {
        &self.msg_type
    }

    /// The client's own request id, as it sent it (string or number).
    pub fn client_id(&self) -> &Value {
        &self.client_id
    }

    /// When the router gives up on this request (receive time + `timeout_ms`).
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Time left before the deadline (zero once passed).
    pub fn remaining(&self) -> std::time::Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// 1 for the first attempt, 2.. when the router retries on this worker.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Verified token claims of the connection, when the router sent them in
    /// the connection's `connect` to this worker.
    pub fn claims(&self) -> Option<&Value> {
        self.claims.as_deref()
    }

    /// Fires when the router cancels the request, its deadline passes or the
    /// worker abandons it. The SDK drops the handler's future at that point;
    /// hand clones of the token to work the handler spawned elsewhere.
    pub fn cancellation_token(&self) -> &CancellationToken {
        &self.token
    }

    /// Whether the request has been cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes when the request is cancelled.
    pub async fn cancelled(&self) {
        self.token.cancelled().await
    }

    /// The worker handle, to reach other connections.
    pub fn worker(&self) -> &WorkerHandle {
        &self.handle
    }

    /// Streams a partial (`done: false`) reply with the request's type.
    ///
    /// A partial reply bigger than the router's frame limit ends the
    /// request: the SDK answers it `payload_too_large`, stops the handler,
    /// and this returns [`SendError::TooLarge`]. After the request's
    /// terminal message (or a cancel), partial replies are dropped.
    pub async fn send_partial(&self, data: Value) -> Result<(), SendError> {
        self.partial(None, data).await
    }

    /// Streams a partial reply with its own message type (e.g. `THOUGHT`).
    pub async fn send_partial_typed(
        &self,
        msg_type: impl Into<String>,
        data: Value,
    ) -> Result<(), SendError> {
        self.partial(Some(msg_type.into()), data).await
    }

    /// A partial reply over the router's frame limit ends the request: the
    /// SDK answers it `payload_too_large` and cancels the handler, and this
    /// returns [`SendError::TooLarge`].
    async fn partial(&self, msg_type: Option<String>, data: Value) -> Result<(), SendError> {
        self.handle
            .send_for_request(FromWorker::Reply(WireReply {
                cid: self.cid.to_string(),
                done: false,
                msg_type,
                data,
            }))
            .await
    }

    /// Pushes a JSON message to this request's connection.
    pub async fn push(&self, msg_type: impl Into<String>, data: Value) -> Result<(), SendError> {
        self.handle.push(&*self.conn, msg_type, data).await
    }

    /// Pushes a binary frame to this request's connection.
    pub async fn push_binary(&self, data: impl Into<Vec<u8>>) -> Result<(), SendError> {
        self.handle.push_binary(&*self.conn, data).await
    }

    /// Closes this request's connection (the request still gets its reply,
    /// which the router drops if the connection is gone).
    pub async fn close(&self, code: u16, reason: impl Into<String>) -> Result<(), SendError> {
        self.handle.close(&*self.conn, code, reason).await
    }

    /// Subscribes this request's connection to a topic.
    pub async fn subscribe(&self, topic: impl Into<String>) -> Result<(), SendError> {
        self.handle.subscribe(&*self.conn, topic).await
    }

    /// Unsubscribes this request's connection from a topic.
    pub async fn unsubscribe(&self, topic: impl Into<String>) -> Result<(), SendError> {
        self.handle.unsubscribe(&*self.conn, topic).await
    }

    /// Publishes to a topic (see [`WorkerHandle::publish`]).
    pub async fn publish(
        &self,
        topic: impl Into<String>,
        msg_type: impl Into<String>,
        data: Value,
    ) -> Result<(), SendError> {
        self.handle.publish(topic, msg_type, data).await
    }
}

/// Everything about a message that gets no reply: a fire-and-forget event,
/// a binary or raw frame, a connect or a disconnect.
///
/// Messages of one connection are handled one at a time, in arrival order;
/// different connections are handled concurrently.
#[derive(Clone)]
pub struct EventContext {
    pub(crate) conn: Arc<str>,
    pub(crate) route: Arc<str>,
    pub(crate) service: Arc<str>,
    pub(crate) msg_type: Option<Arc<str>>,
    pub(crate) claims: Option<Arc<Value>>,
    pub(crate) handle: WorkerHandle,
}

impl std::fmt::Debug for EventContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventContext")
            .field("connection_id", &self.conn)
            .field("route", &self.route)
            .field("msg_type", &self.msg_type)
            .finish_non_exhaustive()
    }
}

impl EventContext {
    /// The id of the client connection.
    pub fn connection_id(&self) -> &str {
        &self.conn
    }

    /// The route pattern the connection matched; empty for raw frames (the
    /// bridge's `raw` message does not carry it).
    pub fn route(&self) -> &str {
        &self.route
    }

    /// The service the message was routed to; empty for raw frames.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The client's message type, for fire-and-forget events.
    pub fn msg_type(&self) -> Option<&str> {
        self.msg_type.as_deref()
    }

    /// Verified token claims of the connection, when known to this worker.
    pub fn claims(&self) -> Option<&Value> {
        self.claims.as_deref()
    }

    /// The worker handle, to reach other connections.
    pub fn worker(&self) -> &WorkerHandle {
        &self.handle
    }

    /// Pushes a JSON message to this connection.
    pub async fn push(&self, msg_type: impl Into<String>, data: Value) -> Result<(), SendError> {
        self.handle.push(&*self.conn, msg_type, data).await
    }

    /// Pushes a binary frame to this connection.
    pub async fn push_binary(&self, data: impl Into<Vec<u8>>) -> Result<(), SendError> {
        self.handle.push_binary(&*self.conn, data).await
    }

    /// Tells the client that the message being handled failed, since it has
    /// no reply to carry the error: the client gets an error frame without
    /// `id` with `error`'s code and message (a `push` of type `error`,
    /// PROTOCOL.md §5). A fire-and-forget message or a binary frame that
    /// cannot be acted on should get one rather than be dropped silently.
    pub async fn send_error(&self, error: &HandlerError) -> Result<(), SendError> {
        let data = crate::handler::error_push_data(error);
        self.handle.push(&*self.conn, "error", data).await
    }

    /// Sends a frame unchanged to this connection (raw routes).
    pub async fn send_raw(&self, frame: Frame) -> Result<(), SendError> {
        self.handle.send_raw(&*self.conn, frame).await
    }

    /// Closes this connection.
    pub async fn close(&self, code: u16, reason: impl Into<String>) -> Result<(), SendError> {
        self.handle.close(&*self.conn, code, reason).await
    }

    /// Subscribes this connection to a topic.
    pub async fn subscribe(&self, topic: impl Into<String>) -> Result<(), SendError> {
        self.handle.subscribe(&*self.conn, topic).await
    }

    /// Unsubscribes this connection from a topic.
    pub async fn unsubscribe(&self, topic: impl Into<String>) -> Result<(), SendError> {
        self.handle.unsubscribe(&*self.conn, topic).await
    }

    /// Publishes to a topic (see [`WorkerHandle::publish`]).
    pub async fn publish(
        &self,
        topic: impl Into<String>,
        msg_type: impl Into<String>,
        data: Value,
    ) -> Result<(), SendError> {
        self.handle.publish(topic, msg_type, data).await
    }
}
