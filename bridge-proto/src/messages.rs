//! Every message of the bridge protocol, as plain data.
//!
//! Field order in these structs is the order on the wire (after `v` and
//! `kind`), so keep it in step with `PROTOCOL.md` and the golden vectors.
//! Optional fields are omitted from the map when absent. Decoders ignore
//! fields they do not know, so a newer peer may add fields without a version
//! bump; removing or retyping a field needs a new protocol version.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A message the router sends to a worker (over ROUTER → DEALER).
#[derive(Debug, Clone, PartialEq)]
pub enum ToWorker {
    /// Answer to a valid `hello`: the worker is registered.
    Welcome(Welcome),
    /// Answer to a `hello` when the router has a secret: prove you know it.
    Challenge(Challenge),
    /// The router will not (or no longer) talk to this worker.
    Goodbye(Goodbye),
    /// Liveness signal; sent every `heartbeat_ms`.
    Heartbeat,
    /// A client request that expects replies.
    Request(Request),
    /// A client message without `id`: no reply expected.
    Event(Event),
    /// A binary frame from a client on a (non-raw) route.
    Binary(Binary),
    /// A frame from a client on a raw route, passed unchanged.
    Raw(RawFrame),
    /// A client connected to a route the worker serves.
    Connect(Connect),
    /// A client connection closed.
    Disconnect(Disconnect),
    /// Stop working on a request; the worker still answers it (with `cancelled`).
    Cancel(Cancel),
}

/// A message a worker sends to the router (over DEALER → ROUTER).
#[derive(Debug, Clone, PartialEq)]
pub enum FromWorker {
    /// First message on a new socket: registers the worker.
    Hello(Hello),
    /// Answer to a `challenge`: the proof that the worker knows the secret.
    Auth(Auth),
    /// Liveness signal; sent every `heartbeat_ms` (from the welcome).
    Heartbeat,
    /// A partial (`done: false`) or final (`done: true`) reply to a request.
    Reply(Reply),
    /// The final answer to a request when it failed.
    Error(ErrorReply),
    /// An unsolicited JSON message to one connection.
    Push(Push),
    /// An unsolicited binary frame to one connection.
    PushBinary(PushBinary),
    /// A frame to a client of a raw route, passed unchanged.
    Raw(RawFrame),
    /// Close a client connection.
    Close(Close),
    /// Subscribe a connection to a topic.
    Subscribe(TopicChange),
    /// Unsubscribe a connection from a topic.
    Unsubscribe(TopicChange),
    /// Publish to every client subscribed to a topic (same effect as a PUB publication).
    Publish(Publish),
    /// The worker is stopping: send it no new work (in-flight work still completes).
    Bye(Bye),
}

impl ToWorker {
    /// The `kind` field on the wire (no wildcard arm: a new variant must
    /// name its kind here to compile).
    pub fn kind(&self) -> &'static str {
        match self {
            ToWorker::Welcome(_) => "welcome",
            ToWorker::Challenge(_) => "challenge",
            ToWorker::Goodbye(_) => "goodbye",
            ToWorker::Heartbeat => "heartbeat",
            ToWorker::Request(_) => "request",
            ToWorker::Event(_) => "event",
            ToWorker::Binary(_) => "binary",
            ToWorker::Raw(_) => "raw",
            ToWorker::Connect(_) => "connect",
            ToWorker::Disconnect(_) => "disconnect",
            ToWorker::Cancel(_) => "cancel",
        }
    }
}

impl FromWorker {
    /// The `kind` field on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            FromWorker::Hello(_) => "hello",
            FromWorker::Auth(_) => "auth",
            FromWorker::Heartbeat => "heartbeat",
            FromWorker::Reply(_) => "reply",
            FromWorker::Error(_) => "error",
            FromWorker::Push(_) => "push",
            FromWorker::PushBinary(_) => "push_binary",
            FromWorker::Raw(_) => "raw",
            FromWorker::Close(_) => "close",
            FromWorker::Subscribe(_) => "subscribe",
            FromWorker::Unsubscribe(_) => "unsubscribe",
            FromWorker::Publish(_) => "publish",
            FromWorker::Bye(_) => "bye",
        }
    }
}

/// Router → worker: registration accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// Unique id of this router process (changes on every start).
    pub router_id: String,
    /// How often each side must send something; a peer silent for
    /// `heartbeat_ms * liveness` is dead.
    pub heartbeat_ms: u64,
    /// Missed heartbeat intervals after which a peer is declared dead.
    pub liveness: u32,
    /// The largest frame (bytes) the router accepts from this worker; a
    /// bigger one closes the worker's connection. Absent from older routers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_frame_bytes: Option<u64>,
}

/// Router → worker: the router has a secret; the worker answers with
/// [`Auth`] (version 2 and later). See [`crate::auth`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Challenge {
    /// Random bytes, fresh for each worker session
    /// ([`crate::auth::NONCE_LEN`] bytes).
    #[serde(with = "serde_bytes")]
    pub nonce: Vec<u8>,
}

/// Router → worker: registration refused or withdrawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Goodbye {
    /// Human-readable reason, for the worker's log.
    pub reason: String,
    /// `true`: re-create the socket and say hello again (router restarting,
    /// unknown peer). `false`: retrying will not help (bad secret, version).
    pub reconnect: bool,
}

/// Router → worker: a request from a client.
///
/// `S` and `V` are how strings and JSON values are held: owned by default
/// (what a worker decodes), borrowed in [`RequestRef`] (what the router
/// encodes straight from its own request table). Both encode the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request<S = String, V = Value> {
    /// Router correlation id: unique, sortable; the key for replies.
    pub cid: S,
    /// Connection (session) id of the client that sent it.
    pub conn: S,
    /// Route pattern the connection matched (e.g. `/ws/vision`).
    pub route: S,
    /// Service name the worker registered for.
    pub service: S,
    /// The client's message type.
    pub msg_type: S,
    /// The client's own request id (string or number), as sent.
    pub id: V,
    /// The client's `data`, as MessagePack (null when absent).
    pub data: V,
    /// Time left before the router gives up on the request, at sending time.
    pub timeout_ms: u64,
    /// The same deadline as Unix time in milliseconds (for logs; prefer
    /// `timeout_ms`, which is immune to clock differences).
    pub deadline_ms: u64,
    /// 1 for the first attempt, 2.. for retries on another worker.
    pub attempt: u32,
    /// Verified token claims of the connection, when the route uses auth
    /// (the same as in its `connect`, so any worker can authorize).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claims: Option<V>,
}

/// A [`Request`] that borrows its strings and values, for encoding.
pub type RequestRef<'a> = Request<&'a str, &'a Value>;

impl RequestRef<'_> {
    /// The owned request, as a worker would decode it.
    pub fn to_owned(&self) -> Request {
        Request {
            cid: self.cid.to_owned(),
            conn: self.conn.to_owned(),
            route: self.route.to_owned(),
            service: self.service.to_owned(),
            msg_type: self.msg_type.to_owned(),
            id: self.id.clone(),
            data: self.data.clone(),
            timeout_ms: self.timeout_ms,
            deadline_ms: self.deadline_ms,
            attempt: self.attempt,
            claims: self.claims.cloned(),
        }
    }
}

/// Router → worker: a fire-and-forget message from a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub conn: String,
    pub route: String,
    pub service: String,
    pub msg_type: String,
    pub data: Value,
}

/// Router → worker: a binary frame from a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Binary {
    pub conn: String,
    pub route: String,
    pub service: String,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// A WebSocket frame passed unchanged (raw routes), in either direction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawFrame {
    pub conn: String,
    /// `true` for a binary frame, `false` for a text frame (then `payload` is UTF-8).
    pub binary: bool,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// Router → worker: a client connected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Connect {
    pub conn: String,
    pub route: String,
    pub service: String,
    /// The request path the client used (e.g. `/ws/rooms/42`).
    pub path: String,
    /// Values of `{param}` segments of the route pattern.
    pub params: BTreeMap<String, String>,
    /// Query string parameters (last value wins).
    pub query: BTreeMap<String, String>,
    /// Request headers, names lowercased (values that are not UTF-8 are dropped).
    pub headers: BTreeMap<String, String>,
    /// Client address as `ip:port`.
    pub remote: String,
    /// Verified token claims, when the route uses auth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claims: Option<Value>,
    /// The client's verified TLS certificate (mutual TLS), when it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<ClientCert>,
}

/// A client certificate the router verified against its client CAs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientCert {
    /// The subject's distinguished name, RFC 4514 (e.g. `CN=alice,O=Example`).
    pub subject: String,
}

/// Router → worker: a client connection closed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Disconnect {
    pub conn: String,
    pub route: String,
    pub service: String,
    /// WebSocket close code (1006 when the connection dropped without one).
    pub code: u16,
    pub reason: String,
}

/// Router → worker: stop a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cancel {
    pub cid: String,
    /// Why: `client` (the client sent `cancel`), `disconnected`, `timeout`, `shutdown`.
    pub reason: String,
}

/// Worker → router: registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The worker's name, for logs and `/routes` (need not be unique).
    pub worker_id: String,
    /// Services (route names) this worker serves.
    pub services: Vec<String>,
    /// Max requests in flight at this worker; the router never exceeds it.
    pub capacity: u32,
    /// SDK name and version, e.g. `worker-sdk-rust/0.1.0`.
    pub sdk: String,
    /// The client message types this worker has handlers for (requests and
    /// fire-and-forget messages), for every service it names. Absent from
    /// older workers: then the router knows nothing about its types.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_types: Option<Vec<String>>,
}

/// Worker → router: the answer to a [`Challenge`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Auth {
    /// HMAC-SHA256 of the challenge's nonce under the shared secret
    /// ([`crate::auth::proof`]).
    #[serde(with = "serde_bytes")]
    pub proof: Vec<u8>,
}

/// Worker → router: a reply to a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub cid: String,
    /// `false` for a partial (streamed) reply, `true` for the last one.
    pub done: bool,
    /// Message type of the reply; absent means the request's type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_type: Option<String>,
    pub data: Value,
}

/// Worker → router: the request failed (terminal).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub cid: String,
    /// Stable snake_case code (see [`crate::codes`]); passed to the client.
    pub code: String,
    pub message: String,
    /// Whether another attempt (on another worker) might succeed.
    pub retryable: bool,
    /// When the client may try again (passed to the client's error frame),
    /// e.g. with `rate_limited` or `overloaded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// Worker → router: a JSON message to one connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Push {
    pub conn: String,
    pub msg_type: String,
    pub data: Value,
}

/// Worker → router: a binary frame to one connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushBinary {
    pub conn: String,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// Worker → router: close a connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Close {
    pub conn: String,
    /// WebSocket close code (1000, or 3000-4999 for application codes).
    pub code: u16,
    pub reason: String,
}

/// Worker → router: subscribe or unsubscribe a connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopicChange {
    pub conn: String,
    pub topic: String,
}

/// Worker → router: publish to a topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Publish {
    pub topic: String,
    pub msg_type: String,
    pub data: Value,
}

/// Worker → router: stopping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bye {
    pub reason: String,
}

/// Payload frame of a PUB/SUB publication `[topic, payload]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Publication {
    /// Message type the subscribed clients see.
    pub msg_type: String,
    pub data: Value,
}
