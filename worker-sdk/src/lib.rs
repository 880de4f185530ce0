//! # worker-sdk: serve WebSocket routes from Rust, over the ZeroMQ bridge
//!
//! A worker connects to the router, says which services it serves and how
//! many requests it takes at once, and then handles what the router's
//! clients send: requests (answered with streamed partial replies and one
//! final reply or error), fire-and-forget events, binary and raw frames,
//! connects and disconnects. It can push to any connection, close one,
//! subscribe one to a topic and publish to a topic. It never touches a
//! WebSocket.
//!
//! ```no_run
//! use serde_json::json;
//! use worker_sdk::{HandlerError, Worker};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let worker = Worker::builder()
//!     .service("echo")
//!     .capacity(8)
//!     .on_request("echo", |_ctx, data| async move { Ok(data) })
//!     .on_request("count", |ctx, data| async move {
//!         let n = data["n"].as_u64().ok_or_else(|| HandlerError::bad_request("need n"))?;
//!         for i in 0..n {
//!             ctx.send_partial(json!({ "i": i })).await?;
//!         }
//!         Ok(json!({ "n": n }))
//!     })
//!     .build()?;
//! worker.run_until_signal().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! - [`worker`]: [`Worker`] and [`WorkerBuilder`] — configuration and
//!   handlers in; `run`, `run_until(shutdown)`, `run_until_signal()`.
//! - [`handler`]: how handlers are stored; [`Reply`] (a final reply, maybe
//!   typed) and [`Frame`] (a raw-route frame).
//! - [`context`]: [`Context`] for a request (ids, deadline, cancellation,
//!   `send_partial`) and [`EventContext`] for everything without a reply.
//! - [`handle`]: [`WorkerHandle`], the cloneable way in from anywhere
//!   (push, close, subscribe, publish, status, stop).
//! - `connection` (private): the one task that owns the DEALER socket:
//!   hello, challenge/auth, heartbeats, dead-router detection, reconnect with
//!   backoff, the in-flight table that guarantees one terminal message per
//!   request, the router's frame limit.
//! - `sessions` (private): several routers (a comma-separated endpoint
//!   list): one socket task per router, the status they add up to, which
//!   router a connection lives on, where a message from a handle goes.
//! - `dispatch` (private): running a request's handler (cancel, deadline
//!   and panic handling) and one ordered queue per client connection for
//!   events. The socket task polls each request's handler once itself; one
//!   that finishes then (an echo, a lookup) is answered without a task, a
//!   channel or a timer, and only one that waits gets a task of its own.
//! - [`publisher`]: [`Publisher`], a publisher session for backends that
//!   are not workers (no services, capacity 0; same handshake as a worker).
//! - [`config`], [`error`], [`signal`]: settings and environment defaults,
//!   error types, SIGTERM/SIGINT.
//! - [`cli`]: the shared bootstrap of worker binaries (flags, logging, the
//!   `registered` stdout line); the examples in `examples/` use it.
//!
//! # Guarantees
//! - Every request gets exactly one terminal message (final reply or
//!   error), whatever the handler does: returns, fails, panics (answered
//!   `worker_error`), overruns its deadline (`timeout`) or is cancelled by
//!   the router (`cancelled`, and its future is dropped). Messages sent for a
//!   request after its terminal are dropped.
//! - At most `capacity` request handlers run at once. A request beyond that
//!   (a router that ignores credits) is answered `overloaded`, retryable.
//! - With several routers (`BRIDGE_ENDPOINT=a,b`), one session per router,
//!   each registered, heartbeating and reconnecting on its own. A request is
//!   answered through the router it came from; losing a router abandons
//!   only its requests. Messages for a client connection go to that
//!   connection's router; a publication goes through the first live router
//!   in list order. Each router is told the whole `capacity`, and the
//!   sessions share it: a request waits for a free slot rather than run
//!   beyond it.
//! - The types of the registered request and event handlers are announced
//!   to the router in `hello` (`msg_types`), so its `/routes` shows what a
//!   route accepts. A message the worker has no handler for is answered
//!   `unknown_type`, naming the types it handles: a request with its terminal
//!   error, a fire-and-forget message or a binary frame with an error frame
//!   without `id` (a `push` of type `error`, PROTOCOL.md §10.1; handlers get
//!   the same with [`EventContext::send_error`]). A request that does not
//!   decode but whose `cid` can be read is answered `bad_request`, so its
//!   credit comes back.
//! - After a `cancel`, the request gets its one terminal message and then
//!   nothing else: whatever its handler (or work it spawned) still sends for
//!   it is dropped (logged at debug level).
//! - A silent router (nothing for `heartbeat_ms × liveness`) is dropped and
//!   a new socket connects after an exponential backoff with jitter; requests
//!   in flight on the lost socket are abandoned (the router has failed them).
//! - Before the welcome the worker sends nothing but `hello` (resent each
//!   backoff step) and `auth` (the answer to each `challenge`), and ignores
//!   everything but `welcome`, `challenge` and `goodbye`.
//! - The shared secret (`BRIDGE_SECRET` / [`WorkerBuilder::secret`]) is never
//!   sent nor logged: a router that has one challenges the worker with a
//!   nonce and the worker answers `auth{proof}` (HMAC-SHA256, see
//!   [`bridge_proto::auth`]). A challenge to a worker without a secret stops
//!   it with [`WorkerError::SecretRequired`]; a refused proof
//!   (`goodbye{reconnect: false}`) with [`WorkerError::Rejected`].
//! - No frame bigger than the router's limit (`max_frame_bytes` of its
//!   welcome) is sent: a reply or partial reply over it is replaced by the
//!   request's terminal `payload_too_large` error (and its handler is
//!   stopped); any other message over it is refused to its caller with
//!   [`SendError::TooLarge`].
//! - A stop says `bye`, answers requests that crossed it `worker_error`
//!   (retryable), lets in-flight requests finish within the grace period,
//!   answers the rest `worker_error` (retryable) and closes after a short
//!   linger.
//!
//! The wire protocol itself is specified in `bridge-proto/PROTOCOL.md`.

pub mod cli;
pub mod config;
pub mod context;
pub mod error;
pub mod handle;
pub mod handler;
pub mod publisher;
pub mod signal;
pub mod worker;

mod backoff;
mod connection;
mod dispatch;
mod outgoing;
mod salvage;
mod sessions;

pub use bridge_proto;
pub use config::WorkerConfig;
pub use context::{Context, EventContext};
pub use error::{ConfigError, HandlerError, SendError, WorkerError};
pub use handle::{State, Status, WorkerHandle};
pub use handler::{Frame, Reply};
pub use publisher::{PublishError, Publisher, PublisherBuilder};
pub use tokio_util::sync::CancellationToken;
pub use worker::{Worker, WorkerBuilder};
