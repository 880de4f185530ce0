//! Process settings: CLI flags, each backed by an environment variable.
//!
//! These are fixed for the life of the process (SPEC §4); everything that can
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
    /// Shared secret that workers must present in their hello (unset: none required).
    #[arg(long, env = "BRIDGE_SECRET", hide_env_values = true)]
    pub bridge_secret: Option<String>,
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
    /// How long in-flight requests may take to finish on shutdown, in milliseconds.
    #[arg(long, env = "DRAIN_TIMEOUT_MS", default_value_t = 10_000)]
    pub drain_timeout_ms: u64,
    /// Rate limiting on/off (policies come with the rate-limit feature).
    #[arg(long, env = "ENABLE_RATE_LIMIT", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_rate_limit: bool,
    /// Let workers register routes the file does not list.
    #[arg(long, env = "ENABLE_DYNAMIC_ROUTING", default_value_t = false, action = clap::ArgAction::Set)]
    pub enable_dynamic_routing: bool,
    /// Log format: `text` or `json`.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

impl Settings {
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    pub fn client_ping(&self) -> Duration {
        Duration::from_millis(self.client_ping_ms)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_spec() {
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
    }
}
