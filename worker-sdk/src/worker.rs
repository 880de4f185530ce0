//! [`Worker`] and its [`WorkerBuilder`]: configuration and handlers in,
//! a running worker out.
//!
//! `run*` drive the socket task on the caller's task; handlers run on tasks
//! of their own, so the caller needs a Tokio runtime with the `rt` and
//! `time` drivers (any `#[tokio::main]` has them).
//!
//! With a list of bridge endpoints, `run` drives one socket task per router
//! (see [`crate::sessions`] for what they share). Capacity is the worker's,
//! not each router's: every router is told the full `capacity` (so any one
//! of them can use all of it when the others send nothing), and one
//! semaphore shared by the sessions keeps at most `capacity` handlers
//! running at once. A request that arrives while the others hold every
//! permit waits for one, with its deadline and cancellation running; the
//! routers' credits bound that wait queue to (routers − 1) × capacity.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{EnvDefaults, WorkerConfig};
use crate::connection::{Owner, SessionSpec};
use crate::context::{Context, EventContext};
use crate::error::{ConfigError, HandlerError, WorkerError};
use crate::handle::WorkerHandle;
use crate::handler::{event_fn, request_fn, Frame, Handlers, Reply};
use crate::outgoing::Outgoing;
use crate::sessions::{ConnDirectory, SessionLink, StatusBoard};
use crate::signal::ShutdownSignals;

/// A configured worker, ready to run.
pub struct Worker {
    config: Arc<WorkerConfig>,
    handlers: Arc<Handlers>,
    handle: WorkerHandle,
    /// One per router, in endpoint order.
    outbound: Vec<mpsc::Receiver<Outgoing>>,
    board: Arc<StatusBoard>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// Starts describing a worker.
    pub fn builder() -> WorkerBuilder {
        WorkerBuilder::default()
    }

    /// A handle for pushes, publications, status and stop; usable before,
    /// during and after `run`.
    pub fn handle(&self) -> WorkerHandle {
        self.handle.clone()
    }

    /// The resolved configuration.
    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// Connects, registers and serves until [`WorkerHandle::stop`] (then
    /// stops gracefully and returns `Ok`) or until the router refuses the
    /// worker for good (`Err`). Losing the router is not an error: the
    /// worker reconnects on its own.
    ///
    /// With several routers, each session connects, registers, reconnects
    /// and stops on its own; losing one router touches only its session. A
    /// router that refuses the worker for good (a wrong secret, another
    /// protocol version) stops the whole worker, gracefully on the other
    /// routers, and `run` returns that refusal: the same configuration goes
    /// to every router, so a refusal is a mistake to fix, not a router to
    /// skip.
    pub async fn run(self) -> Result<(), WorkerError> {
        let several = self.outbound.len() > 1;
        let permits = several.then(|| Arc::new(Semaphore::new(self.config.capacity as usize)));
        let owners: Vec<Owner> = self
            .outbound
            .into_iter()
            .enumerate()
            .map(|(index, outbound)| {
                let handle = self.handle.homed(index);
                let spec = SessionSpec {
                    index,
                    endpoint: handle.sessions[index].endpoint.to_string(),
                    several,
                    board: self.board.clone(),
                    directory: self.handle.directory.clone(),
                    permits: permits.clone(),
                };
                Owner::new(
                    self.config.clone(),
                    self.handlers.clone(),
                    handle,
                    outbound,
                    spec,
                )
            })
            .collect();
        // Each socket task runs on the runtime rather than inside the
        // caller's future (often `block_on` on the main thread): handler
        // tasks it spawns then start on its own worker thread, without a
        // cross-thread wake-up per request.
        let mut tasks = JoinSet::new();
        for owner in owners {
            tasks.spawn(owner.run());
        }
        let mut refusal = None;
        while let Some(joined) = tasks.join_next().await {
            let result = joined.unwrap_or_else(|e| Err(WorkerError::Internal(e.to_string())));
            if let Err(e) = result {
                if refusal.is_none() {
                    if several {
                        warn!(error = %e, "a router session failed; stopping the others");
                        self.handle.stop();
                    }
                    refusal = Some(e);
                }
            }
        }
        refusal.map_or(Ok(()), Err)
    }

    /// Like [`run`](Self::run), and stops gracefully when `shutdown` completes.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), WorkerError> {
        let handle = self.handle();
        let run = self.run();
        tokio::pin!(run);
        tokio::select! {
            result = &mut run => result,
            _ = shutdown => {
                handle.stop();
                run.await
            }
        }
    }

    /// Like [`run`](Self::run), and stops gracefully on SIGTERM or SIGINT.
    pub async fn run_until_signal(self) -> Result<(), WorkerError> {
        let mut signals = ShutdownSignals::new().map_err(WorkerError::Signal)?;
        self.run_until(async move {
            let name = signals.recv().await;
            info!(signal = name, "stop requested");
        })
        .await
    }
}

/// Collects a worker's configuration and handlers.
///
/// Unset endpoint and secret come from `BRIDGE_ENDPOINT` / `BRIDGE_SECRET`
/// when [`build`](Self::build) runs. Registering a second handler for the
/// same message type (or kind) replaces the first.
#[derive(Default)]
pub struct WorkerBuilder {
    services: Vec<String>,
    worker_id: Option<String>,
    capacity: Option<u32>,
    grace_period: Option<Duration>,
    linger: Option<Duration>,
    request_spans: Option<bool>,
    session: SessionSettings,
    handlers: Handlers,
}

/// The settings of a bridge session that workers and publishers share, and
/// the one place that resolves them against the environment.
#[derive(Clone, Default)]
pub(crate) struct SessionSettings {
    pub(crate) endpoint: Option<String>,
    pub(crate) secret: Option<String>,
    pub(crate) backoff: Option<(Duration, Duration)>,
    pub(crate) connect_timeout: Option<Duration>,
    pub(crate) handshake_timeout: Option<Duration>,
    pub(crate) env: Option<EnvDefaults>,
}

impl SessionSettings {
    /// Writes what is set (or found in the environment) into `c`.
    pub(crate) fn apply(&self, c: &mut WorkerConfig) {
        let env = self.env.clone().unwrap_or_else(EnvDefaults::from_env);
        if let Some(e) = self.endpoint.clone().or(env.endpoint) {
            c.endpoint = e;
        }
        c.secret = self.secret.clone().or(env.secret);
        if let Some((initial, max)) = self.backoff {
            c.backoff_initial = initial;
            c.backoff_max = max;
        }
        if let Some(t) = self.connect_timeout {
            c.connect_timeout = t;
        }
        if let Some(t) = self.handshake_timeout {
            c.handshake_timeout = t;
        }
    }
}

impl WorkerBuilder {
    /// Adds a service (route name) this worker serves.
    pub fn service(mut self, service: impl Into<String>) -> Self {
        self.services.push(service.into());
        self
    }

    /// Adds several services.
    pub fn services<I, S>(mut self, services: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.services.extend(services.into_iter().map(Into::into));
        self
    }

    /// The router's bridge endpoint (default: `BRIDGE_ENDPOINT`, then
    /// `tcp://127.0.0.1:5555`), or a comma-separated list of them: the
    /// worker then serves every router listed, with one session each.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.session.endpoint = Some(endpoint.into());
        self
    }

    /// The worker id announced in `hello` (default: `rust-worker-<pid>`).
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker_id = Some(id.into());
        self
    }

    /// Max requests in flight, announced to the router (default 16).
    pub fn capacity(mut self, capacity: u32) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// The shared secret the router may challenge for (default:
    /// `BRIDGE_SECRET`). It is never sent: the worker answers the router's
    /// `challenge` with a proof computed from it.
    pub fn secret(mut self, secret: impl Into<String>) -> Self {
        self.session.secret = Some(secret.into());
        self
    }

    /// How long a graceful stop waits for in-flight work (default 10 s).
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.grace_period = Some(grace);
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

    /// Time the socket stays open after a stop to flush (default 300 ms).
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = Some(linger);
        self
    }

    /// Whether handlers run inside a `request` span per request (default
    /// `true`; see [`WorkerConfig::request_spans`]). Without it a request
    /// costs about 1 µs less CPU, and lines its handler logs do not name it.
    pub fn request_spans(mut self, enabled: bool) -> Self {
        self.request_spans = Some(enabled);
        self
    }

    /// Uses these environment defaults instead of the process environment
    /// (for tests).
    pub fn env(mut self, env: EnvDefaults) -> Self {
        self.session.env = Some(env);
        self
    }

    /// Handles requests of `msg_type`. The handler streams with
    /// [`Context::send_partial`] and returns the final reply (`Value`,
    /// [`Reply`] or `()`) or a [`HandlerError`].
    pub fn on_request<F, Fut, R>(mut self, msg_type: impl Into<String>, handler: F) -> Self
    where
        F: Fn(Context, Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, HandlerError>> + Send + 'static,
        R: Into<Reply> + 'static,
    {
        self.handlers
            .requests
            .insert(msg_type.into(), request_fn(handler));
        self
    }

    /// Handles fire-and-forget messages (no `id`) of `msg_type`. A type is
    /// 1 to 128 bytes ([`build`](Self::build) checks) and is announced to the
    /// router, like the types of [`on_request`](Self::on_request).
    pub fn on_event<F, Fut>(mut self, msg_type: impl Into<String>, handler: F) -> Self
    where
        F: Fn(EventContext, Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.handlers
            .events
            .insert(msg_type.into(), event_fn(handler));
        self
    }

    /// Handles binary frames from clients. Without one, a binary frame is
    /// answered `unknown_type` (an error frame without `id`).
    pub fn on_binary<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(EventContext, Bytes) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.handlers.binary = Some(event_fn(handler));
        self
    }

    /// Handles frames of raw routes (answer with [`EventContext::send_raw`]).
    pub fn on_raw<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(EventContext, Frame) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.handlers.raw = Some(event_fn(handler));
        self
    }

    /// Handles client connections to a route this worker serves.
    pub fn on_connect<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(EventContext, bridge_proto::Connect) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.handlers.connect = Some(event_fn(handler));
        self
    }

    /// Handles client disconnections.
    pub fn on_disconnect<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(EventContext, bridge_proto::Disconnect) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.handlers.disconnect = Some(event_fn(handler));
        self
    }

    /// The configuration this builder would produce (environment applied).
    pub fn config(&self) -> WorkerConfig {
        let mut c = WorkerConfig::new(self.services.clone());
        self.session.apply(&mut c);
        if let Some(id) = &self.worker_id {
            c.worker_id = id.clone();
        }
        if let Some(n) = self.capacity {
            c.capacity = n;
        }
        if let Some(g) = self.grace_period {
            c.grace_period = g;
        }
        if let Some(l) = self.linger {
            c.linger = l;
        }
        if let Some(spans) = self.request_spans {
            c.request_spans = spans;
        }
        c
    }

    /// Validates the configuration and the handlers' message types (each is
    /// announced to the router), and builds the worker.
    pub fn build(self) -> Result<Worker, ConfigError> {
        let config = self.config();
        let mut problems = config.validate().err().map_or(Vec::new(), |e| e.problems);
        problems.extend(self.handlers.problems());
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        Ok(Worker::assemble(config, self.handlers))
    }
}

impl Worker {
    /// A worker from a configuration already validated.
    pub(crate) fn assemble(config: WorkerConfig, handlers: Handlers) -> Worker {
        // A validated configuration always parses; the fallback (one
        // session, which then cannot connect and says so) is never taken.
        let endpoints = config
            .endpoints()
            .unwrap_or_else(|_| vec![config.endpoint.clone()]);
        let (board, statuses, status_rx) = StatusBoard::new(endpoints.len());
        let mut sessions = Vec::with_capacity(endpoints.len());
        let mut outbound = Vec::with_capacity(endpoints.len());
        for (endpoint, status) in endpoints.into_iter().zip(statuses) {
            let (tx, rx) = mpsc::channel(config.outbound_queue);
            sessions.push(SessionLink {
                endpoint: endpoint.into(),
                tx,
                status,
            });
            outbound.push(rx);
        }
        let directory = (sessions.len() > 1).then(|| Arc::new(ConnDirectory::default()));
        let handle = WorkerHandle {
            sessions: sessions.into(),
            home: None,
            directory,
            stop: CancellationToken::new(),
            status: status_rx,
            worker_id: config.worker_id.as_str().into(),
            services: config.services.clone().into(),
        };
        Worker {
            config: Arc::new(config),
            handlers: Arc::new(handlers),
            handle,
            outbound,
            board,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn env(endpoint: Option<&str>, secret: Option<&str>) -> EnvDefaults {
        EnvDefaults {
            endpoint: endpoint.map(Into::into),
            secret: secret.map(Into::into),
        }
    }

    #[test]
    fn explicit_settings_beat_the_environment() {
        let b = Worker::builder()
            .service("a")
            .env(env(Some("tcp://10.0.0.1:1"), Some("from-env")));
        let c = b.config();
        assert_eq!(c.endpoint, "tcp://10.0.0.1:1");
        assert_eq!(c.secret.as_deref(), Some("from-env"));
        assert_eq!(c.capacity, 16);
        let c = b
            .endpoint("tcp://127.0.0.1:9")
            .secret("mine")
            .capacity(3)
            .config();
        assert_eq!(c.endpoint, "tcp://127.0.0.1:9");
        assert_eq!(c.secret.as_deref(), Some("mine"));
        assert_eq!(c.capacity, 3);
    }

    #[test]
    fn build_rejects_bad_config_and_registers_handlers() {
        let err = Worker::builder().env(env(None, None)).build().unwrap_err();
        assert!(err.to_string().contains("services"), "{err}");

        let w = Worker::builder()
            .env(env(None, None))
            .services(["a", "b"])
            .on_request("echo", |_ctx, data| async move { Ok(data) })
            .on_request("typed", |_ctx, _data| async move {
                Ok(Reply::typed("OUTPUT", json!(1)))
            })
            .on_request("unit", |_ctx, _data| async move { Ok(()) })
            .on_event("e", |_ctx, _data| async {})
            .on_binary(|_ctx, _data| async {})
            .build()
            .unwrap();
        assert_eq!(w.handlers.requests.len(), 3);
        assert_eq!(w.handlers.events.len(), 1);
        assert!(w.handlers.binary.is_some() && w.handlers.raw.is_none());
        assert_eq!(w.handle().services(), ["a", "b"]);
    }
}
