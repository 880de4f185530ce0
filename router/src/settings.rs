//! Process settings: CLI flags, each backed by an environment variable.
//!
//! These are fixed for the life of the process (README, process settings); everything that can
//! change at run time lives in the routes file instead.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use clap::Parser;

/// Settings of one router process.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "router",
    version,
    about = "Unified WebSocket router bridging clients to ZeroMQ workers"
)]
pub struct Settings {
    /// Address to listen on for WebSocket and HTTP.
    #[arg(long, env = "WEBSOCKET_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on (0 picks a free port; the chosen one is printed).
    #[arg(long, env = "WEBSOCKET_PORT", default_value_t = 8001)]
    pub port: u16,
    /// Path of the routes file.
    #[arg(
        long,
        env = "WEBSOCKET_ROUTES",
        default_value = "./websocket-routes.json"
    )]
    pub routes: PathBuf,
    /// ZeroMQ endpoint of the ROUTER socket that workers connect to.
    #[arg(long, env = "BRIDGE_ENDPOINT", default_value = "tcp://127.0.0.1:5555")]
    pub bridge_endpoint: String,
    /// ZeroMQ endpoint of the SUB socket that publishers connect to.
    #[arg(long, env = "PUBLISH_ENDPOINT", default_value = "tcp://127.0.0.1:5556")]
    pub publish_endpoint: String,
    /// Shared secret that workers prove they know (challenge-response, it
    /// never crosses the wire). Unset: any peer that reaches the bridge
    /// endpoint may register.
    #[arg(long, env = "BRIDGE_SECRET", hide_env_values = true)]
    pub bridge_secret: Option<Secret>,
    /// With a secret, still bind the unauthenticated PUBLISH_ENDPOINT (SUB).
    /// Off by default: with a secret, publications go through
    /// authenticated bridge sessions only.
    #[arg(long, env = "PUBLISH_UNAUTHENTICATED", default_value_t = false, action = clap::ArgAction::Set)]
    pub publish_unauthenticated: bool,
    /// Start even though a bridge or publish endpoint is reachable beyond
    /// this host without a secret protecting it.
    #[arg(long, env = "ALLOW_INSECURE_BRIDGE", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_insecure_bridge: bool,
    /// Largest ZeroMQ frame (and message) a bridge or publish peer may
    /// send, checked on its length header before anything is buffered; a
    /// bigger one closes that peer's connection.
    #[arg(long, env = "BRIDGE_MAX_FRAME_BYTES", default_value_t = DEFAULT_MAX_FRAME_BYTES, value_parser = clap::value_parser!(u64).range(65_536..=1_073_741_824))]
    pub bridge_max_frame_bytes: u64,
    /// Bytes queued for one worker and not yet written to its connection;
    /// a worker that lets more pile up is not reading and is declared dead.
    #[arg(long, env = "WORKER_SEND_QUEUE_BYTES", default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(65_536..=17_179_869_184))]
    pub worker_send_queue_bytes: u64,
    /// Bytes queued for one client and not yet written; a client that lets
    /// more pile up is a slow reader and is closed with 1008. A frame is
    /// always taken when nothing is queued, whatever its size.
    #[arg(long, env = "MAX_OUTBOUND_BYTES", default_value_t = 4 << 20, value_parser = clap::value_parser!(u64).range(4096..=17_179_869_184))]
    pub max_outbound_bytes: u64,
    /// Bytes of client requests the bridge may hold at once (waiting for a
    /// worker credit, or kept for a retry); beyond it requests get
    /// `overloaded`.
    #[arg(long, env = "MAX_HELD_REQUEST_BYTES", default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(65_536..=17_179_869_184))]
    pub max_held_request_bytes: u64,
    /// How long after a `cancel` the router waits for the worker's terminal
    /// message before it frees the request's credit anyway, in milliseconds.
    #[arg(long, env = "CANCEL_GRACE_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub cancel_grace_ms: u64,
    /// Bytes that sessions parked for a resume may hold in all; each
    /// reserves its route's `resume.maxBytes` when it parks, and one that
    /// does not fit ends instead (a later resume gets `overflow`).
    #[arg(long, env = "RESUME_MAX_BYTES", default_value_t = 256 << 20, value_parser = clap::value_parser!(u64).range(0..=1_099_511_627_776))]
    pub resume_max_bytes: u64,
    /// Routes that workers may register with ENABLE_DYNAMIC_ROUTING.
    #[arg(long, env = "MAX_DYNAMIC_ROUTES", default_value_t = 256)]
    pub max_dynamic_routes: usize,
    /// Interval of bridge heartbeats, in milliseconds, both ways.
    #[arg(long, env = "ROUTER_HEARTBEAT_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub heartbeat_ms: u64,
    /// Missed heartbeat intervals after which a worker is declared dead.
    #[arg(long, env = "ROUTER_LIVENESS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..=100))]
    pub liveness: u32,
    /// Interval of WebSocket pings to clients, in milliseconds; a client
    /// silent for three intervals is closed.
    #[arg(long, env = "CLIENT_PING_MS", default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub client_ping_ms: u64,
    /// How long a new connection may take to send its request or upgrade, in
    /// milliseconds; an idle HTTP keep-alive connection is closed after it too.
    #[arg(long, env = "HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub handshake_timeout_ms: u64,
    /// PEM file with the certificate chain: with `--tls-key`, the port
    /// serves HTTPS and `wss://` only. Reloaded when the file changes and
    /// on SIGHUP.
    #[arg(long, env = "TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM file with the private key of `--tls-cert`.
    #[arg(long, env = "TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM file with the CA certificates that sign client certificates
    /// (mutual TLS): clients may then present one, and routes with
    /// `"clientCert": "required"` admit only those that did.
    #[arg(long, env = "TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Proxies (addresses or CIDR blocks, comma-separated) whose
    /// `X-Forwarded-For` / `Forwarded` headers name the client. Empty: the
    /// headers are ignored and the TCP peer is the client.
    #[arg(long, env = "TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_proxy)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The header the trusted proxies write: `x-forwarded-for` or
    /// `forwarded` (RFC 7239). Only that one is read; the other could come
    /// from the client through the proxy.
    #[arg(long, env = "TRUSTED_PROXY_HEADER", value_enum, default_value_t)]
    pub trusted_proxy_header: crate::policy::forwarded::ProxyHeader,
    /// Most WebSocket sessions at once, all routes together; above it an
    /// upgrade is answered `503 at_capacity` and `/ready` turns 503 until
    /// the count is back at 95 %. Default: the descriptor limit (raised
    /// to the hard limit at start) minus a reserve of an eighth of it,
    /// between 64 and 512, kept for HTTP requests and the router's own
    /// files (README, "Capacity").
    #[arg(long, env = "MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: Option<u64>,
    /// How long in-flight requests may take to finish on shutdown, in milliseconds.
    #[arg(long, env = "DRAIN_TIMEOUT_MS", default_value_t = 10_000)]
    pub drain_timeout_ms: u64,
    /// Enforce the routes' rate limits (each route's `rateLimit` in the
    /// routes file): messages per connection and per route (over them:
    /// `rate_limited` errors, then a 1008 close) and new connections per
    /// client IP (HTTP 429). `false` turns every one of them off.
    #[arg(long, env = "ENABLE_RATE_LIMIT", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_rate_limit: bool,
    /// Join other routers through Redis (`redis://host:port[/db]`, or
    /// `rediss://` for TLS): publications reach subscribers on every router,
    /// presence is cluster-wide (README, "Several routers"). Unset: this
    /// router alone, nothing else needed.
    #[arg(long, env = "CLUSTER_URL")]
    pub cluster_url: Option<String>,
    /// This router's id in the cluster (welcome, presence, `/stats`).
    /// Default: a new random id at every start.
    #[arg(long, env = "ROUTER_ID")]
    pub router_id: Option<String>,
    /// Serve the console page at /console. Default: on when listening on
    /// loopback only, off otherwise.
    #[arg(long, env = "ENABLE_CONSOLE", action = clap::ArgAction::Set)]
    pub enable_console: Option<bool>,
    /// Let workers register routes the file does not list.
    #[arg(long, env = "ENABLE_DYNAMIC_ROUTING", default_value_t = false, action = clap::ArgAction::Set)]
    pub enable_dynamic_routing: bool,
    /// Log format: `text` or `json`.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

/// A secret setting: its `Debug` never shows the value, so no log line or
/// panic message can carry it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// Default of `BRIDGE_MAX_FRAME_BYTES`: a 16 MiB client message (the
/// largest `maxMessageBytes` the default limit allows through) plus
/// [`FRAME_ENVELOPE_BYTES`] of bridge envelope.
pub const DEFAULT_MAX_FRAME_BYTES: u64 = (16 << 20) + FRAME_ENVELOPE_BYTES;

/// Room a bridge frame needs beyond the client's message (ids, route,
/// claims): a route's `maxMessageBytes` must leave this much of the frame cap.
pub const FRAME_ENVELOPE_BYTES: u64 = 64 << 10;

/// Why the settings do not let the router start.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SettingsError {
    #[error(
        "{name} {endpoint} accepts connections from beyond this host, and {why}: anyone who \
         can reach it could {what}. Bind it to 127.0.0.1, ::1 or an ipc:// path, set \
         BRIDGE_SECRET, or pass --allow-insecure-bridge (ALLOW_INSECURE_BRIDGE=true) if the \
         network is private"
    )]
    InsecureEndpoint {
        name: &'static str,
        endpoint: String,
        why: &'static str,
        what: &'static str,
    },
}

/// One `TRUSTED_PROXIES` entry: an address (a /32 or /128) or a CIDR block.
fn parse_proxy(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is neither an IP address nor a CIDR block"))
}

impl Settings {
    /// Refuses endpoints that untrusted hosts could reach without a secret
    /// (PROTOCOL.md §14), unless explicitly allowed.
    pub fn check_bridge_exposure(&self) -> Result<(), SettingsError> {
        if self.allow_insecure_bridge {
            return Ok(());
        }
        if self.bridge_secret.is_none() && !is_local_endpoint(&self.bridge_endpoint) {
            return Err(SettingsError::InsecureEndpoint {
                name: "BRIDGE_ENDPOINT",
                endpoint: self.bridge_endpoint.clone(),
                why: "no BRIDGE_SECRET is set",
                what: "register as a worker and receive client requests",
            });
        }
        if self.publish_bound() && !is_local_endpoint(&self.publish_endpoint) {
            return Err(SettingsError::InsecureEndpoint {
                name: "PUBLISH_ENDPOINT",
                endpoint: self.publish_endpoint.clone(),
                why: "publications on it are not authenticated",
                what: "publish to clients' topics",
            });
        }
        Ok(())
    }

    /// Whether the SUB socket is bound: always without a secret; with one
    /// only when `PUBLISH_UNAUTHENTICATED` asks for it.
    pub fn publish_bound(&self) -> bool {
        self.bridge_secret.is_none() || self.publish_unauthenticated
    }

    pub fn cancel_grace(&self) -> Duration {
        Duration::from_millis(self.cancel_grace_ms)
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    pub fn client_ping(&self) -> Duration {
        Duration::from_millis(self.client_ping_ms)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// The TLS files, when TLS is on.
    pub fn tls_files(&self) -> Option<crate::tls::TlsFiles> {
        Some(crate::tls::TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }

    /// Settings with every default, for tests and embedding.
    pub fn defaults() -> Self {
        // Invariant: the program name alone is a valid command line, because
        // every argument has a default (env vars are not read by try_parse_from
        // unless set; tests override fields directly).
        Self::try_parse_from(["router"]).expect("all settings have defaults")
    }
}

/// Whether a ZeroMQ endpoint only accepts local connections: `ipc://`
/// (file permissions guard it), or `tcp://` on 127.0.0.0/8 or ::1. Host
/// names, `*` and unspecified addresses count as reachable from elsewhere.
pub fn is_local_endpoint(endpoint: &str) -> bool {
    if endpoint.starts_with("ipc://") {
        return true;
    }
    let Some(rest) = endpoint.strip_prefix("tcp://") else {
        return false;
    };
    let host = match rest.rsplit_once(':') {
        Some((host, _port)) => host,
        None => rest,
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_never_shows_in_debug_output() {
        let s = Settings::try_parse_from(["router", "--bridge-secret", "hunter2"]).unwrap();
        assert_eq!(
            s.bridge_secret.as_ref().map(Secret::expose),
            Some("hunter2")
        );
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn local_endpoints_are_loopback_and_ipc_only() {
        for (endpoint, local) in [
            ("tcp://127.0.0.1:5555", true),
            ("tcp://127.1.2.3:0", true),
            ("tcp://[::1]:5555", true),
            ("ipc:///tmp/bridge.sock", true),
            ("tcp://0.0.0.0:5555", false),
            ("tcp://*:5555", false),
            ("tcp://[::]:5555", false),
            ("tcp://localhost:5555", false),
            ("tcp://10.0.0.5:5555", false),
            ("tcp://192.168.1.2:5555", false),
            ("inproc://x", false),
        ] {
            assert_eq!(is_local_endpoint(endpoint), local, "{endpoint}");
        }
    }

    #[test]
    fn exposed_endpoints_need_a_secret_or_an_explicit_allowance() {
        let parse = |args: &[&str]| {
            let mut v = vec!["router"];
            v.extend_from_slice(args);
            Settings::try_parse_from(v).unwrap()
        };
        assert_eq!(parse(&[]).check_bridge_exposure(), Ok(()));
        let open = parse(&["--bridge-endpoint", "tcp://0.0.0.0:5555"]);
        assert!(matches!(
            open.check_bridge_exposure(),
            Err(SettingsError::InsecureEndpoint {
                name: "BRIDGE_ENDPOINT",
                ..
            })
        ));
        let with_secret = parse(&[
            "--bridge-endpoint",
            "tcp://0.0.0.0:5555",
            "--publish-endpoint",
            "tcp://0.0.0.0:5556",
            "--bridge-secret",
            "s",
        ]);
        assert_eq!(
            with_secret.check_bridge_exposure(),
            Ok(()),
            "SUB is not bound"
        );
        let sub_asked = parse(&[
            "--publish-endpoint",
            "tcp://0.0.0.0:5556",
            "--bridge-secret",
            "s",
            "--publish-unauthenticated",
            "true",
        ]);
        assert!(matches!(
            sub_asked.check_bridge_exposure(),
            Err(SettingsError::InsecureEndpoint {
                name: "PUBLISH_ENDPOINT",
                ..
            })
        ));
        let allowed = parse(&[
            "--bridge-endpoint",
            "tcp://0.0.0.0:5555",
            "--allow-insecure-bridge",
            "true",
        ]);
        assert_eq!(allowed.check_bridge_exposure(), Ok(()));
    }

    #[test]
    fn help_says_what_rate_limiting_covers() {
        use clap::CommandFactory;
        let help = Settings::command().render_long_help().to_string();
        let start = help
            .find("--enable-rate-limit")
            .expect("the flag is listed");
        let end = help[start..]
            .find("--enable-dynamic-routing")
            .map_or(help.len(), |i| start + i);
        let entry = &help[start..end];
        for needle in [
            "rateLimit",
            "per connection",
            "per client IP",
            "ENABLE_RATE_LIMIT",
        ] {
            assert!(entry.contains(needle), "{needle:?} missing from:\n{entry}");
        }
    }

    #[test]
    fn defaults_match_the_readme() {
        let s = Settings::try_parse_from(["router"]).unwrap();
        assert_eq!(s.port, 8001);
        assert_eq!(s.host.to_string(), "127.0.0.1");
        assert_eq!(s.bridge_endpoint, "tcp://127.0.0.1:5555");
        assert_eq!(s.publish_endpoint, "tcp://127.0.0.1:5556");
    }

    #[test]
    fn flags_override_and_bad_values_are_refused() {
        let s = Settings::try_parse_from(["router", "--port", "0", "--enable-rate-limit", "false"])
            .unwrap();
        assert_eq!(s.port, 0);
        assert!(!s.enable_rate_limit);
        assert!(Settings::try_parse_from(["router", "--heartbeat-ms", "1"]).is_err());
        assert!(Settings::try_parse_from(["router", "--port", "70000"]).is_err());
        assert!(Settings::try_parse_from(["router", "--max-connections", "0"]).is_err());
        let s = Settings::try_parse_from(["router", "--max-connections", "300"]).unwrap();
        assert_eq!(s.max_connections, Some(300));
        assert_eq!(Settings::defaults().max_connections, None);
    }

    #[test]
    fn tls_needs_both_files_and_proxies_parse() {
        assert!(Settings::try_parse_from(["router", "--tls-cert", "c.pem"]).is_err());
        assert!(Settings::try_parse_from(["router", "--tls-key", "k.pem"]).is_err());
        let s = Settings::try_parse_from(["router", "--tls-cert", "c.pem", "--tls-key", "k.pem"])
            .unwrap();
        assert_eq!(s.tls_files().unwrap().cert, PathBuf::from("c.pem"));
        assert!(Settings::defaults().tls_files().is_none());
        let s =
            Settings::try_parse_from(["router", "--trusted-proxies", "10.0.0.0/8, 127.0.0.1,::1"])
                .unwrap();
        let shown: Vec<String> = s.trusted_proxies.iter().map(|n| n.to_string()).collect();
        assert_eq!(shown, ["10.0.0.0/8", "127.0.0.1/32", "::1/128"]);
        assert!(Settings::try_parse_from(["router", "--trusted-proxies", "10.0.0.0/33"]).is_err());
        assert!(Settings::try_parse_from(["router", "--trusted-proxies", "proxy.local"]).is_err());
        assert!(Settings::defaults().trusted_proxies.is_empty());
    }
}
