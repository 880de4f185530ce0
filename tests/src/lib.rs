//! # e2e-tests: the real router and real workers, over real sockets
//!
//! The harness every end-to-end test shares. Tests start the `router` binary
//! and the example workers (cargo examples of `worker-sdk`) as child
//! processes, talk to them over WebSocket, HTTP and ZeroMQ, and kill, freeze
//! or restart them. Nothing is mocked: what passes here is what users get.
//!
//! # Layout
//! - this module: where the binaries are, unique endpoints, [`RouterProc`],
//!   [`WorkerProc`] and [`run`] (the overall timeout every test runs under).
//! - [`process`]: spawning children, waiting on their output, signals, and
//!   killing them on drop so a failing test leaves no orphans.
//! - [`ws`]: the WebSocket client ([`WsClient`]) that speaks the README's client protocol.
//! - [`http`]: a tiny GET client for `/health`, `/ready`, `/routes`, and the
//!   bounded polls on `/routes` ([`wait_live_workers`]).
//! - [`sse`]: a client of the HTTP fallback (event stream and POSTs).
//! - [`tls`]: a throwaway CA (the `openssl` command), certificates for
//!   `localhost`, and a rustls client that trusts them.
//! - [`fanout`]: what the fan-out benchmark's publisher, broadcast baseline
//!   and load generator share (the clock, the publication, the frames).
//!
//! Every test owns its processes: the router listens on port 0 and binds
//! fresh `ipc://` endpoints, so tests run in parallel and never collide with
//! a stack someone runs on the default ports. Readiness is always observed
//! (a stdout line, or a bounded poll), never assumed after a sleep.
//!
//! The binaries must be built first: `scripts/test.sh` does it.

pub mod fanout;
pub mod http;
pub mod process;
pub mod sse;
pub mod tls;
pub mod ws;

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

pub use http::{http_get, routes, wait_live_workers, wait_route, HttpResponse, RouteInfo};
pub use process::{pid_alive, OutputLog, Proc};
pub use ws::{Frame, WsClient, RECV_TIMEOUT};

/// Bound on a process announcing itself (debug builds start slowly on a busy machine).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Environment variables of the router and workers that a developer's shell
/// may have set; children start without them so only the test decides.
pub const STACK_ENV: &[&str] = &[
    "WEBSOCKET_HOST",
    "WEBSOCKET_PORT",
    "WEBSOCKET_ROUTES",
    "BRIDGE_ENDPOINT",
    "PUBLISH_ENDPOINT",
    "ENABLE_RATE_LIMIT",
    "ENABLE_DYNAMIC_ROUTING",
    "ROUTER_HEARTBEAT_MS",
    "DRAIN_TIMEOUT_MS",
    "BRIDGE_SECRET",
    "PUBLISH_UNAUTHENTICATED",
    "ALLOW_INSECURE_BRIDGE",
    "BRIDGE_MAX_FRAME_BYTES",
    "WORKER_SEND_QUEUE_BYTES",
    "MAX_OUTBOUND_BYTES",
    "MAX_HELD_REQUEST_BYTES",
    "CANCEL_GRACE_MS",
    "MAX_DYNAMIC_ROUTES",
];

/// Runs a test body under an overall timeout, so a hung test fails (and its
/// children are killed by their `Drop`) instead of hanging the suite.
pub async fn run<F: Future<Output = ()>>(limit: Duration, body: F) {
    if tokio::time::timeout(limit, body).await.is_err() {
        panic!("test exceeded its overall timeout of {limit:?}");
    }
}

/// The workspace root (the directory holding the workspace `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Invariant: this crate lives in `<workspace>/tests`.
    manifest
        .parent()
        .expect("the e2e-tests crate sits inside the workspace")
        .to_path_buf()
}

/// `$CARGO_TARGET_DIR` (relative paths taken from the workspace root, where
/// cargo is normally run) or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    }
}

fn require_binary(path: PathBuf, what: &str) -> PathBuf {
    if !path.is_file() {
        panic!(
            "{what} not found at {}: build the binaries first with `scripts/test.sh` \
             (or `cargo build --workspace --bins --examples`)",
            path.display()
        );
    }
    path
}

/// The debug `router` binary.
pub fn router_bin() -> PathBuf {
    require_binary(target_dir().join("debug").join("router"), "router binary")
}

/// The debug build of example `name` of `worker-sdk`.
pub fn example_bin(name: &str) -> PathBuf {
    require_binary(
        target_dir().join("debug").join("examples").join(name),
        &format!("example worker `{name}`"),
    )
}

/// The repository's default routes file, as text.
pub fn default_routes_json() -> String {
    let path = workspace_root().join("websocket-routes.json");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A name no other test (in this or a concurrent run) uses.
pub fn unique(tag: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("e2e-{}-{n}-{nanos:x}-{tag}", std::process::id())
}

/// A TCP port that was free a moment ago (bind port 0, read it, release it).
/// Only for endpoints that must survive a restart or be given to a script;
/// everything else binds port 0 itself.
pub fn free_tcp_port() -> u16 {
    free_tcp_ports::<1>()[0]
}

/// `N` distinct free TCP ports (all held while choosing, so they differ).
pub fn free_tcp_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| {
            TcpListener::bind("127.0.0.1:0")
                .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0: {e}"))
        })
        .collect();
    let mut ports = [0u16; N];
    for (p, l) in ports.iter_mut().zip(&listeners) {
        // Invariant: a bound listener has a local address.
        *p = l.local_addr().expect("bound listener").port();
    }
    ports
}

/// The two ZeroMQ endpoints a router binds, plus files to delete afterwards.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub bridge: String,
    pub publish: String,
    files: Vec<PathBuf>,
}

impl Endpoints {
    /// Fresh `ipc://` endpoints under the temp dir. A restarted router can
    /// bind the same paths again, and the workers find it there.
    pub fn ipc() -> Endpoints {
        let dir = std::env::temp_dir();
        let bridge = dir.join(format!("{}.sock", unique("bridge")));
        let publish = dir.join(format!("{}.sock", unique("pub")));
        Endpoints {
            bridge: format!("ipc://{}", bridge.display()),
            publish: format!("ipc://{}", publish.display()),
            files: vec![bridge, publish],
        }
    }

    /// `tcp://127.0.0.1:0` for both: the router picks the ports and reports them.
    pub fn tcp_ephemeral() -> Endpoints {
        Endpoints {
            bridge: "tcp://127.0.0.1:0".into(),
            publish: "tcp://127.0.0.1:0".into(),
            files: Vec::new(),
        }
    }

    /// Fixed free TCP ports, for a router that must come back on the same
    /// addresses after a crash.
    pub fn tcp_fixed() -> Endpoints {
        let [b, p] = free_tcp_ports::<2>();
        Endpoints {
            bridge: format!("tcp://127.0.0.1:{b}"),
            publish: format!("tcp://127.0.0.1:{p}"),
            files: Vec::new(),
        }
    }

    /// The socket files behind `ipc://` endpoints (empty for TCP).
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

/// How to start a router.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub routes_json: String,
    pub endpoints: Endpoints,
    /// Extra command-line arguments (e.g. `--heartbeat-ms 200`).
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// A descriptor limit (soft and hard) for the router process only, set
    /// with util-linux's `prlimit`.
    pub descriptor_limit: Option<u64>,
}

impl RouterConfig {
    pub fn new(routes_json: &str) -> RouterConfig {
        RouterConfig {
            routes_json: routes_json.to_owned(),
            endpoints: Endpoints::ipc(),
            args: Vec::new(),
            env: Vec::new(),
            descriptor_limit: None,
        }
    }

    /// Runs the router under `RLIMIT_NOFILE` = `n` (soft and hard).
    pub fn descriptor_limit(mut self, n: u64) -> Self {
        self.descriptor_limit = Some(n);
        self
    }

    pub fn endpoints(mut self, e: Endpoints) -> Self {
        self.endpoints = e;
        self
    }

    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_owned());
        self
    }

    /// A short router heartbeat, so dead workers are noticed quickly.
    pub fn heartbeat_ms(self, ms: u64) -> Self {
        self.arg("--heartbeat-ms").arg(&ms.to_string())
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_owned(), v.to_owned()));
        self
    }
}

/// A running router process.
pub struct RouterProc {
    pub proc: Proc,
    /// The HTTP/WebSocket address it listens on.
    pub http: SocketAddr,
    /// The bridge endpoint as the router resolved it (what workers connect to).
    pub bridge: String,
    /// The publish endpoint as the router resolved it (what publishers
    /// connect to); the configured one when the router did not bind it.
    pub publish: String,
    /// Whether the router bound its SUB socket (not with a secret, unless
    /// unauthenticated publishing was asked for).
    pub publish_bound: bool,
    config: RouterConfig,
    routes_file: PathBuf,
}

impl RouterProc {
    /// Starts a router with `routes_json`, fresh ipc endpoints and extra environment.
    pub async fn start(routes_json: &str, extra_env: &[(&str, &str)]) -> RouterProc {
        let mut cfg = RouterConfig::new(routes_json);
        for (k, v) in extra_env {
            cfg = cfg.env(k, v);
        }
        Self::start_with(cfg).await
    }

    /// Starts a router as configured and waits for its `listening` line.
    pub async fn start_with(config: RouterConfig) -> RouterProc {
        let routes_file = std::env::temp_dir().join(format!("{}.json", unique("routes")));
        std::fs::write(&routes_file, &config.routes_json)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", routes_file.display()));
        let mut proc = spawn_router(&config, &routes_file);
        let (http, bridge, publish) = read_listening(&mut proc).await;
        RouterProc {
            proc,
            http,
            bridge,
            publish_bound: publish.is_some(),
            publish: publish.unwrap_or_else(|| config.endpoints.publish.clone()),
            config,
            routes_file,
        }
    }

    /// Starts the router again after it exited (killed or stopped), on the
    /// same endpoints and routes file. The HTTP port may change.
    pub async fn restart(&mut self) {
        assert!(
            self.proc.try_status().is_some(),
            "restart() needs the previous router process to have exited"
        );
        let mut cfg = self.config.clone();
        // A router asked for port 0 picked concrete ports; come back on those.
        cfg.endpoints.bridge = self.bridge.clone();
        cfg.endpoints.publish = self.publish.clone();
        let mut proc = spawn_router(&cfg, &self.routes_file);
        let (http, bridge, publish) = read_listening(&mut proc).await;
        // Dropping the old Proc reaps nothing new: it already exited.
        self.proc = proc;
        self.http = http;
        self.bridge = bridge;
        self.publish_bound = publish.is_some();
        if let Some(publish) = publish {
            self.publish = publish;
        }
    }

    /// `ws://<addr><path>`.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.http)
    }

    /// Connects a client to a non-raw route and reads its welcome.
    pub async fn client(&self, path: &str) -> WsClient {
        WsClient::connect(&self.ws_url(path)).await
    }

    /// Polls `/routes` until `service` has exactly `n` live workers.
    pub async fn wait_live_workers(&self, service: &str, n: u64) -> RouteInfo {
        wait_live_workers(self.http, service, n, START_TIMEOUT).await
    }

    /// Starts an example worker connected to this router and waits for its registration.
    pub async fn worker(
        &self,
        example: &str,
        services: &[&str],
        extra_args: &[&str],
    ) -> WorkerProc {
        WorkerProc::start(example, &self.bridge, &self.publish, services, extra_args).await
    }

    /// The path of the routes file the router reads.
    pub fn routes_file(&self) -> &Path {
        &self.routes_file
    }
}

impl Drop for RouterProc {
    fn drop(&mut self) {
        self.proc.kill9();
        let _ = std::fs::remove_file(&self.routes_file);
        for f in self.config.endpoints.files() {
            let _ = std::fs::remove_file(f);
        }
    }
}

fn spawn_router(cfg: &RouterConfig, routes_file: &Path) -> Proc {
    let mut cmd = match cfg.descriptor_limit {
        None => Command::new(router_bin()),
        Some(n) => {
            // prlimit sets the limit on itself and execs the router: same pid.
            let mut c = Command::new("prlimit");
            c.arg(format!("--nofile={n}:{n}"))
                .arg("--")
                .arg(router_bin());
            c
        }
    };
    for k in STACK_ENV {
        cmd.env_remove(k);
    }
    cmd.current_dir(workspace_root())
        .arg("--host")
        .arg("127.0.0.1")
        .arg("--port")
        .arg("0")
        .arg("--routes")
        .arg(routes_file)
        .arg("--bridge-endpoint")
        .arg(&cfg.endpoints.bridge)
        .arg("--publish-endpoint")
        .arg(&cfg.endpoints.publish)
        .args(&cfg.args);
    for (k, v) in &cfg.env {
        cmd.env(k, v);
    }
    Proc::spawn("router", cmd)
}

/// The HTTP address, the bridge endpoint and the publish endpoint (`None`
/// when not bound) of a router's `listening` line.
async fn read_listening(proc: &mut Proc) -> (SocketAddr, String, Option<String>) {
    let line = proc
        .wait_stdout("the router's listening line", START_TIMEOUT, |l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| v["event"] == "listening")
        })
        .await;
    // Invariant: the predicate above only accepts JSON lines.
    let v: Value = serde_json::from_str(&line).expect("matched line is JSON");
    let http: SocketAddr = v["http"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("listening line has no usable `http` address: {line}"));
    let field = |k: &str| {
        v[k].as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("listening line has no `{k}`: {line}"))
    };
    let publish = v["publish"].as_str().map(str::to_owned);
    (http, field("bridge"), publish)
}

/// A running example worker.
pub struct WorkerProc {
    pub proc: Proc,
    /// The id it registered with (from its `registered` line).
    pub worker_id: String,
    /// The services it registered for.
    pub services: Vec<String>,
}

impl WorkerProc {
    /// Starts `example` against the given endpoints and waits for its
    /// `{"event":"registered"}` line. Empty `services` keeps the example's defaults.
    pub async fn start(
        example: &str,
        bridge: &str,
        publish: &str,
        services: &[&str],
        extra_args: &[&str],
    ) -> WorkerProc {
        let proc = Self::spawn(example, bridge, publish, services, extra_args);
        Self::registered(example, proc).await
    }

    /// Starts `example` with `BRIDGE_ENDPOINT` set to the bridge endpoints of
    /// `routers`, comma-separated in this order (the worker serves them all,
    /// one session each), and waits for its `registered` line, printed when
    /// the first of them welcomes it. Empty `services` keeps the example's
    /// defaults.
    pub async fn start_on_routers(
        example: &str,
        routers: &[&RouterProc],
        services: &[&str],
        extra_args: &[&str],
    ) -> WorkerProc {
        let list: Vec<&str> = routers.iter().map(|r| r.bridge.as_str()).collect();
        let mut cmd = Command::new(example_bin(example));
        for k in STACK_ENV {
            cmd.env_remove(k);
        }
        cmd.current_dir(workspace_root())
            .env("BRIDGE_ENDPOINT", list.join(","));
        for s in services {
            cmd.arg("--service").arg(s);
        }
        cmd.args(extra_args);
        Self::registered(example, Proc::spawn(example, cmd)).await
    }

    /// Waits for `proc`'s `{"event":"registered"}` line.
    async fn registered(example: &str, mut proc: Proc) -> WorkerProc {
        let line = proc
            .wait_stdout(
                &format!("{example}'s registered line"),
                START_TIMEOUT,
                |l| serde_json::from_str::<Value>(l).is_ok_and(|v| v["event"] == "registered"),
            )
            .await;
        // Invariant: the predicate above only accepts JSON lines.
        let v: Value = serde_json::from_str(&line).expect("matched line is JSON");
        let worker_id = v["worker_id"]
            .as_str()
            .unwrap_or_else(|| panic!("registered line without worker_id: {line}"))
            .to_owned();
        let services = v["services"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        WorkerProc {
            proc,
            worker_id,
            services,
        }
    }

    /// Starts `example` without waiting for anything.
    pub fn spawn(
        example: &str,
        bridge: &str,
        publish: &str,
        services: &[&str],
        extra_args: &[&str],
    ) -> Proc {
        let mut cmd = Command::new(example_bin(example));
        for k in STACK_ENV {
            cmd.env_remove(k);
        }
        cmd.current_dir(workspace_root())
            .arg("--bridge-endpoint")
            .arg(bridge)
            .arg("--publish-endpoint")
            .arg(publish);
        for s in services {
            cmd.arg("--service").arg(s);
        }
        cmd.args(extra_args);
        Proc::spawn(example, cmd)
    }
}
