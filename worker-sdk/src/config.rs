//! Worker settings: what [`WorkerBuilder`](crate::WorkerBuilder) collects,
//! with defaults taken from the environment.
//!
//! Environment lookups go through a function argument so tests feed them from
//! a map instead of mutating the process environment.
//!
//! The bridge endpoint may be a comma-separated list: one router session per
//! entry ([`parse_endpoint_list`]; PROTOCOL.md, "Several routers").

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::error::ConfigError;

/// Default router bridge endpoint (the router binds a ROUTER socket there).
pub const DEFAULT_BRIDGE_ENDPOINT: &str = "tcp://127.0.0.1:5555";
/// Default router publication endpoint (the router binds a SUB socket there
/// when it has no secret; publishers of this SDK use the bridge endpoint).
pub const DEFAULT_PUBLISH_ENDPOINT: &str = "tcp://127.0.0.1:5556";
/// Default number of requests a worker runs at once.
pub const DEFAULT_CAPACITY: u32 = 16;

/// Environment variable holding the bridge endpoint.
pub const ENV_BRIDGE_ENDPOINT: &str = "BRIDGE_ENDPOINT";
/// Environment variable holding the publication endpoint.
pub const ENV_PUBLISH_ENDPOINT: &str = "PUBLISH_ENDPOINT";
/// Environment variable holding the shared secret the router may challenge for.
pub const ENV_BRIDGE_SECRET: &str = "BRIDGE_SECRET";

/// Everything a worker needs besides its handlers.
///
/// Built by [`WorkerBuilder`](crate::WorkerBuilder); the timing fields have
/// defaults that match the team contract and rarely need changing.
#[derive(Clone)]
pub struct WorkerConfig {
    /// ZeroMQ endpoint of the router's ROUTER socket, or a comma-separated
    /// list of them: the worker then keeps one session with each router
    /// (see [`parse_endpoint_list`]).
    pub endpoint: String,
    /// Name announced in `hello` (for logs and `/routes`; need not be unique).
    pub worker_id: String,
    /// Services (route names) this worker serves.
    pub services: Vec<String>,
    /// Max requests in flight; announced in `hello` and enforced locally.
    pub capacity: u32,
    /// Shared secret, when the router requires one: the worker proves it
    /// knows it in answer to the router's `challenge` and never sends it.
    pub secret: Option<String>,
    /// How long a graceful stop waits for in-flight work before abandoning it.
    pub grace_period: Duration,
    /// First reconnect / hello-resend delay.
    pub backoff_initial: Duration,
    /// Cap of the exponential reconnect / hello-resend delay.
    pub backoff_max: Duration,
    /// Bound on one TCP + ZMTP connection attempt.
    pub connect_timeout: Duration,
    /// A connected socket that gets no `welcome` within this time is
    /// re-created (guards against half-open connections).
    pub handshake_timeout: Duration,
    /// Time the socket is kept open after the last message of a stop, so the
    /// socket's writer task can flush it (the zeromq crate has no LINGER).
    pub linger: Duration,
    /// Capacity of the queue from handlers and handles to the socket task.
    pub outbound_queue: usize,
    /// Capacity of each connection's event queue (binary, raw, event,
    /// connect, disconnect); events beyond it are dropped and logged.
    pub connection_queue: usize,
    /// Whether each request's handler runs inside an info-level `request`
    /// span (correlation id, connection id, message type, attempt), so the
    /// lines its handler logs carry them. The span costs about 1 µs per
    /// request with tracing-subscriber's fmt layer (its fields are formatted
    /// when it is created); a worker whose handlers do not log can do
    /// without. The SDK's own lines about a request name its correlation id
    /// and attempt either way.
    pub request_spans: bool,
}

impl fmt::Debug for WorkerConfig {
    // Hand-written so the secret never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerConfig")
            .field("endpoint", &self.endpoint)
            .field("worker_id", &self.worker_id)
            .field("services", &self.services)
            .field("capacity", &self.capacity)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("grace_period", &self.grace_period)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .field("connect_timeout", &self.connect_timeout)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("linger", &self.linger)
            .field("outbound_queue", &self.outbound_queue)
            .field("connection_queue", &self.connection_queue)
            .field("request_spans", &self.request_spans)
            .finish()
    }
}

impl WorkerConfig {
    /// A configuration with every default, for the given services.
    pub fn new(services: Vec<String>) -> Self {
        Self {
            endpoint: DEFAULT_BRIDGE_ENDPOINT.to_owned(),
            worker_id: default_worker_id(),
            services,
            capacity: DEFAULT_CAPACITY,
            secret: None,
            grace_period: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(5),
            linger: Duration::from_millis(300),
            outbound_queue: 1024,
            connection_queue: 1024,
            request_spans: true,
        }
    }

    /// Checks every field and reports all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check(Role::Worker)
    }

    /// Like [`validate`](Self::validate) for a publisher session, which
    /// registers with no services and capacity 0.
    pub(crate) fn validate_publisher(&self) -> Result<(), ConfigError> {
        self.check(Role::Publisher)
    }

    /// The router endpoints, in list order: one for a plain endpoint, several
    /// for a comma-separated list. Checked by [`validate`](Self::validate).
    pub fn endpoints(&self) -> Result<Vec<String>, ConfigError> {
        parse_endpoint_list(&self.endpoint).map_err(|problems| ConfigError { problems })
    }

    fn check(&self, role: Role) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if let Err(e) = self.endpoints() {
            problems.extend(e.problems);
        }
        if self.worker_id.trim().is_empty() {
            problems.push("worker_id is empty".to_owned());
        }
        match role {
            Role::Worker => {
                if self.services.is_empty() {
                    problems.push("no services: a worker must serve at least one".to_owned());
                }
                for s in &self.services {
                    if s.trim().is_empty() {
                        problems.push("a service name is empty".to_owned());
                    }
                }
                if self.capacity == 0 {
                    problems
                        .push("capacity is 0: the router would never send a request".to_owned());
                }
            }
            Role::Publisher => {
                if !self.services.is_empty() || self.capacity != 0 {
                    problems.push(
                        "a publisher session registers with no services and capacity 0".to_owned(),
                    );
                }
            }
        }
        if self.backoff_initial.is_zero() || self.backoff_initial > self.backoff_max {
            problems.push(format!(
                "backoff must satisfy 0 < initial ({:?}) <= max ({:?})",
                self.backoff_initial, self.backoff_max
            ));
        }
        for (name, d) in [
            ("connect_timeout", self.connect_timeout),
            ("handshake_timeout", self.handshake_timeout),
        ] {
            if d.is_zero() {
                problems.push(format!("{name} is 0"));
            }
        }
        for (name, n) in [
            ("outbound_queue", self.outbound_queue),
            ("connection_queue", self.connection_queue),
        ] {
            if n == 0 {
                problems.push(format!("{name} is 0"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }
}

/// Splits a bridge endpoint setting into the routers it names, in order.
///
/// `"tcp://a:5555"` is one router; `"tcp://a:5555, tcp://b:5555"` two (each
/// entry trimmed). Every problem is reported, each naming its entry: an empty
/// entry (`"a,,b"`, a trailing comma), an entry that is not a ZeroMQ
/// endpoint, and an entry listed twice (compared as parsed, so
/// `tcp://127.0.0.1:5555` and ` tcp://127.0.0.1:5555` are the same router).
/// A router listed twice would get two sessions of one worker, and with them
/// twice its capacity.
pub fn parse_endpoint_list(list: &str) -> Result<Vec<String>, Vec<String>> {
    let entries: Vec<&str> = list.split(',').map(str::trim).collect();
    let several = entries.len() > 1;
    let mut problems = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    let mut endpoints = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let position = i + 1;
        if entry.is_empty() {
            problems.push(if several {
                format!("endpoint list {list:?}: entry {position} is empty")
            } else {
                format!("endpoint {list:?} is empty")
            });
            continue;
        }
        match zeromq::Endpoint::from_str(entry) {
            Err(e) => problems.push(format!("endpoint {entry:?} is not a ZeroMQ endpoint: {e}")),
            Ok(parsed) => {
                let canonical = parsed.to_string();
                if seen.contains(&canonical) {
                    problems.push(format!(
                        "endpoint list {list:?}: entry {position} ({entry:?}) names a router already listed"
                    ));
                } else {
                    seen.push(canonical);
                    endpoints.push((*entry).to_owned());
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(endpoints)
    } else {
        Err(problems)
    }
}

/// What a session registers as.
#[derive(Debug, Clone, Copy)]
enum Role {
    /// Serves services: at least one, with capacity >= 1.
    Worker,
    /// Only publishes: no services, capacity 0 (it gets no requests).
    Publisher,
}

/// Settings a worker takes from the environment when the builder is not
/// given them explicitly.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct EnvDefaults {
    /// `BRIDGE_ENDPOINT`, if set and not empty.
    pub endpoint: Option<String>,
    /// `BRIDGE_SECRET`, if set and not empty.
    pub secret: Option<String>,
}

impl std::fmt::Debug for EnvDefaults {
    // Hand-written so the secret never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvDefaults")
            .field("endpoint", &self.endpoint)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl EnvDefaults {
    /// Reads the process environment.
    pub fn from_env() -> Self {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads through `lookup`; empty values count as unset, so
    /// `BRIDGE_SECRET=` disables the secret rather than sending "".
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let get = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());
        Self {
            endpoint: get(ENV_BRIDGE_ENDPOINT),
            secret: get(ENV_BRIDGE_SECRET),
        }
    }
}

/// The publication endpoint from `lookup` (`PUBLISH_ENDPOINT`), or the default.
pub fn publish_endpoint_from(lookup: impl Fn(&str) -> Option<String>) -> String {
    lookup(ENV_PUBLISH_ENDPOINT)
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_PUBLISH_ENDPOINT.to_owned())
}

/// A worker id for when none is given: distinct per process on one host.
pub fn default_worker_id() -> String {
    format!("rust-worker-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn env_defaults_table() {
        for (env, endpoint, secret) in [
            (vec![], None, None),
            (
                vec![("BRIDGE_ENDPOINT", "tcp://10.0.0.1:1")],
                Some("tcp://10.0.0.1:1"),
                None,
            ),
            (vec![("BRIDGE_SECRET", "s3")], None, Some("s3")),
            (
                vec![("BRIDGE_SECRET", ""), ("BRIDGE_ENDPOINT", " ")],
                None,
                None,
            ),
        ] {
            let d = EnvDefaults::from_lookup(lookup(&env));
            assert_eq!(d.endpoint.as_deref(), endpoint, "{env:?}");
            assert_eq!(d.secret.as_deref(), secret, "{env:?}");
        }
    }

    #[test]
    fn publish_endpoint_defaults() {
        assert_eq!(publish_endpoint_from(lookup(&[])), DEFAULT_PUBLISH_ENDPOINT);
        assert_eq!(
            publish_endpoint_from(lookup(&[("PUBLISH_ENDPOINT", "ipc:///tmp/p.sock")])),
            "ipc:///tmp/p.sock"
        );
    }

    #[test]
    fn validate_reports_every_problem() {
        let mut c = WorkerConfig::new(vec![]);
        c.endpoint = "nonsense".into();
        c.capacity = 0;
        c.worker_id = " ".into();
        let err = c.validate().unwrap_err();
        assert_eq!(err.problems.len(), 4, "{err}");
        let text = err.to_string();
        for needle in ["endpoint", "capacity", "services", "worker_id"] {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
    }

    #[test]
    fn endpoint_lists_are_parsed_in_order() {
        for (input, expected) in [
            ("tcp://127.0.0.1:5555", vec!["tcp://127.0.0.1:5555"]),
            (" ipc:///tmp/a.sock ", vec!["ipc:///tmp/a.sock"]),
            (
                "tcp://127.0.0.1:5555,tcp://127.0.0.1:5556",
                vec!["tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556"],
            ),
            (
                " ipc:///tmp/b.sock , tcp://10.0.0.1:1 ,ipc:///tmp/a.sock",
                vec!["ipc:///tmp/b.sock", "tcp://10.0.0.1:1", "ipc:///tmp/a.sock"],
            ),
        ] {
            assert_eq!(parse_endpoint_list(input).unwrap(), expected, "{input:?}");
        }
    }

    #[test]
    fn bad_endpoint_lists_name_every_bad_entry() {
        for (input, needles) in [
            ("", vec![r#"endpoint "" is empty"#]),
            (
                "nonsense",
                vec![r#"endpoint "nonsense" is not a ZeroMQ endpoint"#],
            ),
            ("tcp://127.0.0.1:1,", vec!["entry 2 is empty"]),
            (",tcp://127.0.0.1:1", vec!["entry 1 is empty"]),
            (
                "tcp://127.0.0.1:1, ,tcp://127.0.0.1:2",
                vec!["entry 2 is empty"],
            ),
            (
                "tcp://127.0.0.1:1,tcp://127.0.0.1:2, tcp://127.0.0.1:1",
                vec![r#"entry 3 ("tcp://127.0.0.1:1") names a router already listed"#],
            ),
            (
                "tcp://127.0.0.1:1,udp://x:1,,tcp://127.0.0.1:1",
                vec![
                    r#"endpoint "udp://x:1" is not a ZeroMQ endpoint"#,
                    "entry 3 is empty",
                    "entry 4",
                ],
            ),
        ] {
            let problems = parse_endpoint_list(input).unwrap_err();
            assert_eq!(problems.len(), needles.len(), "{input:?}: {problems:?}");
            for (problem, needle) in problems.iter().zip(&needles) {
                assert!(
                    problem.contains(needle),
                    "{input:?}: {problem:?} lacks {needle:?}"
                );
            }
        }
    }

    #[test]
    fn validate_reports_bad_entries_of_an_endpoint_list() {
        let mut c = WorkerConfig::new(vec!["echo".into()]);
        c.endpoint = "tcp://127.0.0.1:1, ipc:///tmp/x.sock".into();
        c.validate().unwrap();
        assert_eq!(c.endpoints().unwrap().len(), 2);
        c.endpoint = "tcp://127.0.0.1:1,,bogus".into();
        let err = c.validate().unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
        assert!(err.to_string().contains(r#""bogus""#), "{err}");
    }

    #[test]
    fn defaults_are_valid_and_secret_is_redacted() {
        let mut c = WorkerConfig::new(vec!["echo".into()]);
        c.secret = Some("hunter2".into());
        c.validate().unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        for ep in ["tcp://127.0.0.1:0", "ipc:///tmp/x.sock"] {
            c.endpoint = ep.into();
            c.validate().unwrap();
        }
    }
}
