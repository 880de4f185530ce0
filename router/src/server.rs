//! Wiring: binds the bridge, serves HTTP/WebSocket on an already-bound
//! listener, starts the reloader, and runs the shutdown sequence.
//!
//! Shutdown order (ARCHITECTURE.md): `/ready` turns 503 and new upgrades are
//! refused → sessions finish their in-flight requests (bounded by the drain
//! timeout) and close with 1001 → the bridge tells workers goodbye → every
//! task has ended when `run` returns.

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    bridge::{self, BridgeConfig, Endpoints},
    broker::BrokerConfig,
    capacity::{self, Capacity},
    client::unix_ms,
    http,
    hub::Hub,
    ids::ConnId,
    listener::{DeadlineListener, PeerInfo, Tracker},
    metrics::{ConfigStatus, Metrics},
    registry::RouteRegistry,
    reload,
    routes::RouteTable,
    settings::Settings,
    state::{AppState, ClientEdge},
    tls::Tls,
};

/// Where the router ended up listening.
#[derive(Debug, Clone)]
pub struct Listening {
    pub http: SocketAddr,
    /// Whether the port serves HTTPS and `wss://` (TLS_CERT).
    pub tls: bool,
    pub endpoints: Endpoints,
}

/// TLS, the session cap and the budget of open TCP connections (README,
/// "Capacity"): `MAX_CONNECTIONS` or the descriptor limit minus the
/// reserve; connections without a session may use a quarter of the
/// reserve (the rest covers the router's own files, and connections that
/// were expired for room but have not closed yet).
fn client_edge(settings: &Settings, metrics: Arc<Metrics>, tls: Option<Arc<Tls>>) -> ClientEdge {
    let descriptor_limit = capacity::descriptor_limit().unwrap_or_else(|| {
        warn!("cannot read the descriptor limit; budgeting for 1024");
        1024
    });
    let reserve = capacity::reserve_for(descriptor_limit);
    let max_connections = match settings.max_connections {
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        None => capacity::default_max_connections(descriptor_limit),
    };
    if max_connections.saturating_add(reserve) as u64 > descriptor_limit {
        warn!(
            max_connections,
            descriptor_limit,
            reserve,
            "MAX_CONNECTIONS leaves less than the reserve of descriptors: at the cap the router may fail to accept health probes"
        );
    }
    ClientEdge {
        capacity: Capacity::new(max_connections),
        tracker: Tracker::new(max_connections.saturating_add(reserve / 4), metrics),
        descriptor_limit,
        tls,
    }
}

/// Why the router could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Bridge(#[from] bridge::BridgeError),
    #[error("HTTP server failed: {0}")]
    Http(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("CLUSTER_URL: {0}")]
    Cluster(#[from] redis::RedisError),
}

/// Runs the router until `shutdown` resolves, then drains and returns.
/// `on_listening` is called once everything is bound and serving. The
/// routes file at `settings.routes` is watched for changes.
pub async fn run(
    settings: Settings,
    routes: RouteTable,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_listening: impl FnOnce(&Listening),
) -> Result<(), ServeError> {
    let hub = Arc::new(Hub::new());
    let metrics = Arc::new(Metrics::new());
    metrics.config_started(ConfigStatus {
        ok: true,
        path: settings.routes.display().to_string(),
        loaded_at_unix_ms: unix_ms(),
        routes: routes.routes().len(),
        error: None,
        reloads: 0,
        failed_reloads: 0,
    });
    let registry = Arc::new(
        RouteRegistry::new(routes, settings.enable_dynamic_routing)
            .with_max_dynamic(settings.max_dynamic_routes),
    );
    // TLS first: a bad certificate stops the start before anything binds.
    let tls = match settings.tls_files() {
        Some(files) => Some(Tls::load(files, metrics.clone())?),
        None => None,
    };
    let tasks = TaskTracker::new();
    let stop_background = CancellationToken::new();
    let router_id = settings
        .router_id
        .clone()
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| ConnId::new().0.to_string());
    hub.set_router_id(&router_id);
    // A bad CLUSTER_URL stops the start; an unreachable Redis does not.
    let cluster = match settings.cluster_url.as_deref() {
        Some(url) => Some(crate::cluster::Cluster::new(url, &router_id)?),
        None => None,
    };
    let (bridge, endpoints) = bridge::start(
        BridgeConfig {
            bridge_endpoint: settings.bridge_endpoint.clone(),
            publish_endpoint: settings
                .publish_bound()
                .then(|| settings.publish_endpoint.clone()),
            max_frame_bytes: settings.bridge_max_frame_bytes as usize,
            worker_send_queue_bytes: settings.worker_send_queue_bytes as usize,
            zmtp_handshake_timeout: settings.handshake_timeout(),
            broker: BrokerConfig {
                router_id: router_id.clone(),
                heartbeat: settings.heartbeat(),
                liveness: settings.liveness,
                secret: settings
                    .bridge_secret
                    .as_ref()
                    .map(|s| s.expose().to_owned()),
                max_frame_bytes: settings.bridge_max_frame_bytes as usize,
                max_held_request_bytes: settings.max_held_request_bytes as usize,
                cancel_grace: settings.cancel_grace(),
            },
        },
        hub.clone(),
        registry.clone(),
        metrics.clone(),
        &tasks,
        stop_background.clone(),
    )
    .await?;

    let drain_timeout = settings.drain_timeout();
    let routes_path: PathBuf = settings.routes.clone();
    let edge = client_edge(&settings, metrics.clone(), tls.clone());
    if let Some(cluster) = &cluster {
        tasks.spawn(
            cluster
                .clone()
                .run(hub.clone(), bridge.clone(), stop_background.clone()),
        );
    }
    let state = Arc::new(
        AppState::new(
            settings,
            registry.clone(),
            hub.clone(),
            bridge,
            endpoints.clone(),
            metrics.clone(),
            edge,
        )
        .with_cluster(cluster),
    );
    if let Some(tls) = &tls {
        tls.spawn_reloader(&tasks, stop_background.clone());
    }
    reload::spawn(
        routes_path,
        registry,
        metrics,
        &tasks,
        stop_background.clone(),
    );

    let http_addr = listener.local_addr()?;
    let app = http::app(state.clone()).into_make_service_with_connect_info::<PeerInfo>();
    let listener = DeadlineListener::new(
        listener,
        state.settings.handshake_timeout(),
        state.tracker.clone(),
        state.metrics.clone(),
    )
    .with_tls(tls);
    // The listener stays open while sessions drain, so `/ready` can answer
    // 503 and late upgrades get a JSON refusal; it closes after the drain.
    let stop_http = CancellationToken::new();
    let http_stopped = stop_http.clone();
    let mut server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(http_stopped.cancelled_owned())
            .await
    });

    // Per-IP limiter entries that have refilled carry no information: drop
    // them so the maps do not grow with every address ever seen.
    let janitor_state = state.clone();
    let janitor_stop = stop_background.clone();
    tasks.spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = janitor_stop.cancelled() => break,
                _ = every.tick() => {
                    janitor_state.runtimes.evict_idle();
                    // Per-route state of routes that are gone (reloads,
                    // dynamic routes whose workers left) is dropped.
                    let table = janitor_state.registry.current();
                    let keep = |route: &str| table.get(route).is_some();
                    janitor_state.runtimes.retain_routes(keep);
                    janitor_state.metrics.retain_routes(keep);
                }
            }
        }
    });

    state.set_ready(true);
    let scheme = if state.tls.is_some() { "https" } else { "http" };
    info!(http = %http_addr, scheme, bridge = %endpoints.bridge, publish = endpoints.publish.as_deref().unwrap_or("(not bound)"), router.id = %router_id, max_connections = state.capacity.max(), "router listening");
    on_listening(&Listening {
        http: http_addr,
        tls: state.tls.is_some(),
        endpoints,
    });

    tokio::select! {
        _ = shutdown => {}
        r = &mut server => {
            // The HTTP server ended on its own: an I/O failure.
            stop_background.cancel();
            tasks.close();
            tasks.wait().await;
            return match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.into()),
                Err(e) => Err(std::io::Error::other(e).into()),
            };
        }
    }

    // Not ready and draining before the log line says so: whoever reads
    // the line and then asks `/ready` must get 503.
    state.set_ready(false);
    state.draining.cancel();
    info!(connections = hub.len(), "shutdown: draining");
    state.sessions.close();
    // Sessions close themselves within the drain timeout; the extra second
    // covers close handshakes with slow clients.
    if tokio::time::timeout(
        drain_timeout + Duration::from_secs(1),
        state.sessions.wait(),
    )
    .await
    .is_err()
    {
        warn!(
            left = state.sessions.len(),
            "sessions still open after the drain timeout"
        );
    }
    stop_http.cancel();
    // Plain HTTP connections (keep-alive) close at their next idle moment;
    // do not let one hold the exit.
    if tokio::time::timeout(Duration::from_secs(2), &mut server)
        .await
        .is_err()
    {
        server.abort();
    }
    stop_background.cancel();
    tasks.close();
    tasks.wait().await;
    info!("router stopped");
    Ok(())
}
