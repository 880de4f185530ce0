//! [`Publisher`]: publish to topics from any backend process that is not a
//! worker, over the router's bridge endpoint (`BRIDGE_ENDPOINT`).
//!
//! A publisher is a session of its own at the router, run by the same
//! connection machinery as a worker: a DEALER socket that registers with a
//! `hello` listing **no services and capacity 0** (so the router sends it no
//! requests), proves the shared secret when the router challenges it
//! (`BRIDGE_SECRET`), heartbeats, notices a dead router and reconnects with
//! backoff. Every publication is a `publish{topic, msg_type, data}` message
//! on that socket, so a router with a secret only takes publications from
//! processes that know it.
//!
//! Delivery:
//! - [`Publisher::publish`] returns `Ok` once the publication is on the
//!   socket of a registered session. While the publisher is (re)connecting
//!   it waits, up to the publisher's timeout (default 5 s), and then fails
//!   with [`PublishError::NotConnected`]; it never drops a publication
//!   without saying so.
//! - A publication bigger than the router's frame limit (`max_frame_bytes`
//!   of its welcome) is refused with [`PublishError::TooLarge`].
//! - The router does not acknowledge publications: one written just before
//!   the router died is lost with it.
//! - With several routers (a comma-separated `BRIDGE_ENDPOINT`), the
//!   publisher keeps a session with each, and every publication goes through
//!   one of them: the first registered one in list order. It waits (as
//!   above) only while none is registered.
//! - Publications of one publisher reach the router in order. A worker that
//!   subscribes a connection and then publishes should use
//!   [`WorkerHandle::publish`](crate::WorkerHandle::publish), which is
//!   ordered with that worker's other messages.

use std::time::Duration;

use bridge_proto::{FromWorker, Publish};
use bytes::Bytes;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::debug;

use crate::config::{EnvDefaults, WorkerConfig};
use crate::error::{ConfigError, SendError};
use crate::handle::{State, Status, WorkerHandle};
use crate::handler::Handlers;
use crate::outgoing::Outgoing;
use crate::worker::{SessionSettings, Worker};

/// Default bound on waiting for a registered session, in
/// [`PublisherBuilder::connect`] and in each [`Publisher::publish`].
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a publication was not delivered to the router's socket, or why a
/// publisher could not start.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No session with the router was registered within the bound (the
    /// router is down, unreachable, or slow to answer).
    #[error("not connected to the router at {endpoint} within {waited:?}")]
    NotConnected {
        /// The router's bridge endpoint.
        endpoint: String,
        /// How long the publisher waited.
        waited: Duration,
    },
    /// The encoded publication exceeds the router's frame limit; it was not
    /// sent (the router would have closed the connection on it).
    #[error("publication of {size} bytes exceeds the router's frame limit of {limit} bytes")]
    TooLarge {
        /// Size of the encoded `publish` message.
        size: usize,
        /// The router's `max_frame_bytes`.
        limit: u64,
    },
    /// The router refused the publisher for good (wrong or missing secret,
    /// unsupported protocol version); the text is the reason.
    #[error("{0}")]
    Refused(String),
    /// The publisher was closed.
    #[error("the publisher has stopped")]
    Stopped,
    /// The settings cannot work (an endpoint that is not a ZeroMQ endpoint, ...).
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Collects a publisher's settings. Unset endpoint and secret come from
/// `BRIDGE_ENDPOINT` / `BRIDGE_SECRET` when [`connect`](Self::connect) runs,
/// as for a worker.
#[derive(Clone, Default)]
pub struct PublisherBuilder {
    id: Option<String>,
    timeout: Option<Duration>,
    session: SessionSettings,
}

impl std::fmt::Debug for PublisherBuilder {
    // Hand-written so the secret never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublisherBuilder")
            .field("endpoint", &self.session.endpoint)
            .field(
                "secret",
                &self.session.secret.as_ref().map(|_| "<redacted>"),
            )
            .field("id", &self.id)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl PublisherBuilder {
    /// The router's bridge endpoint (default: `BRIDGE_ENDPOINT`, then
    /// `tcp://127.0.0.1:5555`), or a comma-separated list of several
    /// routers' endpoints.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.session.endpoint = Some(endpoint.into());
        self
    }

    /// The shared secret the router may challenge for (default:
    /// `BRIDGE_SECRET`). Never sent; only a proof computed from it is.
    pub fn secret(mut self, secret: impl Into<String>) -> Self {
        self.session.secret = Some(secret.into());
        self
    }

    /// The id announced in `hello`, for the router's logs (default:
    /// `rust-publisher-<pid>`).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Bound on waiting for a registered session, in `connect` and in each
    /// `publish` (default 5 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Reconnect backoff: first step and cap (default 100 ms, 5 s).
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.session.backoff = Some((initial, max));
        self
    }

    /// Bound on one connection attempt (default 2 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.session.connect_timeout = Some(timeout);
        self
    }

    /// A socket with no `welcome` after this long is re-created (default 5 s).
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.session.handshake_timeout = Some(timeout);
        self
    }

    /// Uses these environment defaults instead of the process environment
    /// (for tests).
    pub fn env(mut self, env: EnvDefaults) -> Self {
        self.session.env = Some(env);
        self
    }

    /// The session configuration this builder would produce (environment
    /// applied): no services, capacity 0.
    pub fn config(&self) -> WorkerConfig {
        let mut c = WorkerConfig::new(Vec::new());
        c.capacity = 0;
        c.worker_id = self
            .id
            .clone()
            .unwrap_or_else(|| format!("rust-publisher-{}", std::process::id()));
        self.session.apply(&mut c);
        c
    }

    /// Starts the publisher's session and waits until the router has
    /// registered it (bounded by the timeout). Needs a Tokio runtime; the
    /// session runs on a task of its own until the publisher is closed or
    /// dropped.
    pub async fn connect(self) -> Result<Publisher, PublishError> {
        let config = self.config();
        config.validate_publisher()?;
        let timeout = self.timeout.unwrap_or(DEFAULT_PUBLISH_TIMEOUT);
        let endpoint = config.endpoint.clone();
        let worker = Worker::assemble(config, Handlers::default());
        let handle = worker.handle();
        let (ended_tx, ended) = watch::channel(None);
        let task = tokio::spawn(async move {
            let result = worker.run().await.map_err(|e| e.to_string());
            let _ = ended_tx.send(Some(result));
        });
        let publisher = Publisher {
            handle,
            endpoint,
            timeout,
            ended,
            task: Some(task),
        };
        // On failure, dropping the publisher stops its session.
        publisher.wait_registered(Instant::now() + timeout).await?;
        Ok(publisher)
    }
}

/// A publisher session with the router: publishes to topics.
///
/// ```no_run
/// use serde_json::json;
/// use worker_sdk::Publisher;
///
/// # async fn demo() -> Result<(), worker_sdk::PublishError> {
/// // BRIDGE_ENDPOINT and BRIDGE_SECRET from the environment:
/// let publisher = Publisher::connect_from_env().await?;
/// publisher.publish("prices", "price_update", json!({"symbol": "ACME", "price": 101.25})).await?;
/// publisher.close().await;
/// # Ok(())
/// # }
/// ```
///
/// Dropping it stops the session (it says `bye` on its own task); call
/// [`close`](Self::close) to wait for that.
pub struct Publisher {
    handle: WorkerHandle,
    endpoint: String,
    timeout: Duration,
    /// `Some` once the session task has returned: its error, if any.
    ended: watch::Receiver<Option<Result<(), String>>>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("endpoint", &self.endpoint)
            .field("status", &self.handle.status())
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// Starts describing a publisher.
    pub fn builder() -> PublisherBuilder {
        PublisherBuilder::default()
    }

    /// Connects to the router's bridge `endpoint`, with the secret from
    /// `BRIDGE_SECRET`, and waits (up to 5 s) until it is registered.
    pub async fn connect(endpoint: impl Into<String>) -> Result<Self, PublishError> {
        Self::builder().endpoint(endpoint).connect().await
    }

    /// Connects to `BRIDGE_ENDPOINT` (or `tcp://127.0.0.1:5555`), with the
    /// secret from `BRIDGE_SECRET`.
    pub async fn connect_from_env() -> Result<Self, PublishError> {
        Self::builder().connect().await
    }

    /// Like [`connect`](Self::connect), with another bound on waiting for a
    /// registered session (here and in each [`publish`](Self::publish)).
    pub async fn connect_with_timeout(
        endpoint: impl Into<String>,
        timeout: Duration,
    ) -> Result<Self, PublishError> {
        Self::builder()
            .endpoint(endpoint)
            .timeout(timeout)
            .connect()
            .await
    }

    /// The router's bridge endpoint this publisher connects to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The session's status (registered, reconnecting, ...).
    pub fn status(&self) -> Status {
        self.handle.status()
    }

    /// Publishes `data` as a `msg_type` message to the clients subscribed to
    /// `topic`. `Ok` means the `publish` message is on the socket of a
    /// registered session; while reconnecting this waits up to the
    /// publisher's timeout. See the module docs for the errors.
    pub async fn publish(
        &self,
        topic: &str,
        msg_type: &str,
        data: Value,
    ) -> Result<(), PublishError> {
        let deadline = Instant::now() + self.timeout;
        let first = Outgoing::new(FromWorker::Publish(Publish {
            topic: topic.to_owned(),
            msg_type: msg_type.to_owned(),
            data,
        }));
        let frame: Bytes = first.frame.clone();
        loop {
            self.wait_registered(deadline).await?;
            let attempt = Outgoing::frame(first.kind, frame.clone());
            match self.handle.publish_confirmed(attempt).await {
                Ok(()) => {
                    debug!(topic, msg.type = msg_type, bytes = frame.len(), "published");
                    return Ok(());
                }
                Err(SendError::TooLarge { size, limit }) => {
                    return Err(PublishError::TooLarge { size, limit })
                }
                // The session ended as it was handed over: wait for the next.
                Err(SendError::NotConnected) => continue,
                Err(SendError::Stopped) => return Err(self.ended_error().await),
            }
        }
    }

    /// Stops the session (`bye`) and waits for its socket to close.
    pub async fn close(mut self) {
        self.handle.stop();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Waits until the session is registered, the publisher stops, or `deadline`.
    async fn wait_registered(&self, deadline: Instant) -> Result<(), PublishError> {
        let mut status = self.handle.watch_status();
        let ready = async {
            match status.wait_for(|s| s.state != State::Connecting).await {
                Ok(s) => s.state,
                Err(_) => State::Stopped,
            }
        };
        match tokio::time::timeout_at(deadline, ready).await {
            Ok(State::Registered) => Ok(()),
            Ok(_) => Err(self.ended_error().await),
            Err(_) => Err(PublishError::NotConnected {
                endpoint: self.endpoint.clone(),
                waited: self.timeout,
            }),
        }
    }

    /// Why the session is over: the router's refusal, or a stop.
    async fn ended_error(&self) -> PublishError {
        if self.handle.is_stopping() {
            return PublishError::Stopped;
        }
        // The session task records its result just after the state turns
        // `Stopped`; give it a moment.
        let mut ended = self.ended.clone();
        let result = tokio::time::timeout(Duration::from_secs(1), async {
            match ended.wait_for(Option::is_some).await {
                Ok(r) => r.clone(),
                Err(_) => None,
            }
        })
        .await;
        match result {
            Ok(Some(Err(reason))) => PublishError::Refused(reason),
            _ => PublishError::Stopped,
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.handle.stop();
    }
}
