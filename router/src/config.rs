//! The routes file (`websocket-routes.json`): schema, parsing, validation, defaults.
//!
//! Reading the file ([`load_routes`]) is kept apart from parsing text ([`parse_routes`]) so
//! tests and hot reload feed strings. Parsing has two stages, and one pass reports the
//! problems of both:
//! 1. the schema ([`schema`]): JSON syntax (a syntax error is the one problem then, located
//!    by line and column), then serde into [`RoutesFile`] (`deny_unknown_fields` everywhere),
//!    field by field, so that every unknown field and every value of the wrong type is
//!    reported, not only the first.
//! 2. [`RoutesFile::problems`] checks everything serde cannot (ranges, patterns, duplicates).
//!
//! Every problem is located by a JSON path such as `routes[2].maxInFlight` (indexes count
//! from 0) and, inside a route, names that route's `path` too. Only a file without
//! problems becomes a [`RouteTable`], so an invalid reload is rejected whole and the
//! running table stays.
//!
//! This module is longer than the others (about 640 lines without tests) on purpose: the
//! schema, its defaults and the validation of each field are read side by side, and
//! splitting them would put a field's type and its rules in different files.
//!
//! Schema (camelCase, compatible with the seed format
//! `{"routes":[{"path":"/ws/vision","capabilities":[...],"pythonModule":"..."}]}`):
//! - top level: `routes` (required, non-empty), `defaults`, `version` (must be 1),
//!   `$schema` and `description` (ignored).
//! - `defaults`: `requestTimeoutMs`, `maxMessageBytes`, `maxConnections`, `maxInFlight`,
//!   `binary`, `retries`; unset ones take [`RouteDefaults::BUILTIN`].
//! - route: `path` (required; see [`crate::routes`] for patterns), `service` (default: the
//!   path, README: routes file), `description`, `capabilities`, `pythonModule` (informational), `raw`,
//!   `allowedTypes` (absent = any type), `affinity`, and every `defaults` knob, which
//!   overrides the file's `defaults` for that route.

use std::collections::HashMap;
use std::fmt;
use std::ops::RangeInclusive;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use jsonwebtoken::DecodingKey;

mod schema;

use crate::{
    policy::{auth::AuthPolicy, breaker::BreakerPolicy, ratelimit::RateLimitPolicy},
    routes::ResumePolicy,
};

/// Ranges of the `resume` fields.
const RESUME_TTL_MS: std::ops::RangeInclusive<u64> = 0..=3_600_000;
const RESUME_MAX_FRAMES: std::ops::RangeInclusive<u64> = 1..=65_536;
const RESUME_MAX_BYTES: std::ops::RangeInclusive<u64> = 1024..=67_108_864;
use crate::routes::{Pattern, Route, RouteDefaults, RouteTable};

/// The only routes file version this router understands.
pub const ROUTES_FILE_VERSION: u64 = 1;

/// Message types the router answers itself; a route cannot list them in `allowedTypes`
/// (they are never forwarded, so listing them would only mislead).
pub const ROUTER_HANDLED_TYPES: [&str; 7] = crate::session::RouterType::NAMES;

pub const REQUEST_TIMEOUT_MS: RangeInclusive<u64> = 1..=600_000;
pub const MAX_MESSAGE_BYTES: RangeInclusive<u64> = 16..=67_108_864;
pub const MAX_CONNECTIONS: RangeInclusive<u64> = 1..=u64::MAX;
pub const MAX_IN_FLIGHT: RangeInclusive<u64> = 1..=10_000;
/// At most 3 attempts in all (README, policies).
pub const RETRIES: RangeInclusive<u64> = 0..=2;

/// One thing wrong with a routes file, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// A JSON path (`routes[2].path`), `line L, column C` for a syntax error, or the
    /// file's path when it cannot be read.
    pub location: String,
    /// The `path` of the route the location is in, when it has one: the location counts
    /// routes from 0, people name them by path.
    pub route: Option<String>,
    pub message: String,
}

impl Problem {
    fn new(location: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            location: location.into(),
            route: None,
            message: message.into(),
        }
    }

    /// The index of the route the location is in (`routes[2]...` → 2).
    fn route_index(&self) -> Option<usize> {
        let rest = self.location.strip_prefix("routes[")?;
        rest[..rest.find(']')?].parse().ok()
    }

    /// Where the problem sits in the file, for sorting problems into file order: top-level
    /// fields, `defaults`, `routes` itself, then each route.
    fn order(&self) -> (usize, usize) {
        match self.route_index() {
            Some(i) => (3, i),
            None if self.location.starts_with("defaults") => (1, 0),
            None if self.location == "routes" => (2, 0),
            None => (0, 0),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.route {
            Some(route) if !route.is_empty() => {
                write!(f, "{} (route {route}): {}", self.location, self.message)
            }
            _ => write!(f, "{}: {}", self.location, self.message),
        }
    }
}

/// A routes file that cannot be used. Displays one problem per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render_problems(&self.problems))]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

fn render_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(Problem::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl From<serde_json::Error> for ConfigError {
    fn from(err: serde_json::Error) -> Self {
        // serde_json appends " at line L column C" to its message; the location says that.
        let full = err.to_string();
        let suffix = format!(" at line {} column {}", err.line(), err.column());
        let message = full.strip_suffix(&suffix).unwrap_or(&full).to_owned();
        let location = if err.line() == 0 {
            "routes file".to_owned()
        } else {
            format!("line {}, column {}", err.line(), err.column())
        };
        ConfigError {
            problems: vec![Problem::new(location, message)],
        }
    }
}

/// Reads and parses a routes file. A read error is a problem located at `path`.
pub fn load_routes(path: &Path) -> Result<RouteTable, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| ConfigError {
        problems: vec![Problem::new(
            path.display().to_string(),
            format!("cannot read the routes file: {err}"),
        )],
    })?;
    parse_routes(&text)
}

/// Parses, validates and resolves the text of a routes file, reporting every problem of
/// both stages (see the module docs) at once.
pub fn parse_routes(text: &str) -> Result<RouteTable, ConfigError> {
    let value: serde_json::Value = serde_json::from_str(text)?;
    // Route paths by index, for naming routes in problems (read before any repair).
    let paths: Vec<Option<String>> = value
        .get("routes")
        .and_then(serde_json::Value::as_array)
        .map(|routes| {
            routes
                .iter()
                .map(|r| r.get("path")?.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let (file, mut problems) = schema::read(value);
    if let Some(file) = &file {
        let unread = problems.len();
        for p in file.problems() {
            // A field stage 1 could not read was left out: its stage-2 complaints are moot.
            if !problems[..unread]
                .iter()
                .any(|s| schema::covers(&s.location, &p.location))
            {
                problems.push(p);
            }
        }
    }
    if let (Some(file), true) = (file, problems.is_empty()) {
        // Keys are loaded while resolving: that can still fail.
        problems = match file.resolve() {
            Ok(table) => return Ok(table),
            Err(e) => e.problems,
        };
    }
    problems.sort_by_key(Problem::order);
    for p in &mut problems {
        p.route = p
            .route_index()
            .and_then(|i| paths.get(i).cloned().flatten());
    }
    Err(ConfigError { problems })
}

/// The routes file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a routes file object"
)]
pub struct RoutesFile {
    #[serde(rename = "$schema")]
    pub schema: Option<String>,
    pub description: Option<String>,
    pub version: Option<u64>,
    pub defaults: Option<DefaultsSpec>,
    pub routes: Vec<RouteSpec>,
}

/// The `defaults` object: policy knobs for routes that do not set them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a `defaults` object"
)]
pub struct DefaultsSpec {
    pub request_timeout_ms: Option<u64>,
    pub max_message_bytes: Option<u64>,
    pub max_connections: Option<u64>,
    pub max_in_flight: Option<u64>,
    pub binary: Option<bool>,
    pub retries: Option<u64>,
    pub rate_limit: Option<RateLimitSpec>,
    pub circuit_breaker: Option<BreakerSpec>,
    pub allowed_origins: Option<Vec<String>>,
    pub auth: Option<AuthSpec>,
    pub resume: Option<ResumeSpec>,
}

/// `resume`: each unset field takes the `defaults` value, then the built-in
/// ([`ResumePolicy::DEFAULT`]). `ttlMs: 0` turns resume off.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a `resume` object"
)]
pub struct ResumeSpec {
    pub ttl_ms: Option<u64>,
    pub max_frames: Option<u64>,
    pub max_bytes: Option<u64>,
}

/// `rateLimit`: each unset field takes the `defaults` value, then the built-in
/// ([`RateLimitPolicy::DEFAULT`]). 0 disables that limit.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a `rateLimit` object"
)]
pub struct RateLimitSpec {
    pub messages_per_second: Option<u32>,
    pub message_burst: Option<u32>,
    pub connections_per_minute: Option<u32>,
    pub connection_burst: Option<u32>,
    pub route_messages_per_second: Option<u32>,
    pub close_after_rejections: Option<u32>,
}

/// `circuitBreaker`: each unset field takes the `defaults` value, then the built-in.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a `circuitBreaker` object"
)]
pub struct BreakerSpec {
    pub failure_threshold: Option<u32>,
    pub open_ms: Option<u64>,
}

/// `auth`: a route's object replaces the `defaults` one whole. Keys are never
/// written in the routes file: HS256 secrets come from an environment variable,
/// RS256 public keys from a PEM file (relative paths: from the working directory).
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "an `auth` object"
)]
pub struct AuthSpec {
    /// Default true: refuse connections without a valid token.
    pub required: Option<bool>,
    pub hs256_secret_env: Option<String>,
    pub rs256_public_key_file: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_seconds: Option<u64>,
}

/// One entry of `routes`.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a route object"
)]
pub struct RouteSpec {
    pub path: String,
    pub service: Option<String>,
    pub description: Option<String>,
    #[serde(default)]
    pub capabilities: Vec<String>,
    pub python_module: Option<String>,
    #[serde(default)]
    pub raw: bool,
    pub allowed_types: Option<Vec<String>>,
    pub request_timeout_ms: Option<u64>,
    pub max_message_bytes: Option<u64>,
    pub max_connections: Option<u64>,
    pub max_in_flight: Option<u64>,
    pub binary: Option<bool>,
    #[serde(default)]
    pub affinity: bool,
    pub retries: Option<u64>,
    pub rate_limit: Option<RateLimitSpec>,
    pub circuit_breaker: Option<BreakerSpec>,
    pub allowed_origins: Option<Vec<String>>,
    pub auth: Option<AuthSpec>,
    pub resume: Option<ResumeSpec>,
    /// `"required"`: only clients with a verified certificate (mutual TLS).
    pub client_cert: Option<ClientCertSpec>,
}

/// What a route asks of clients' certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", expecting = "\"required\"")]
pub enum ClientCertSpec {
    Required,
}

/// The numeric knobs `defaults` and routes share, for checking them the same way.
struct Knobs {
    request_timeout_ms: Option<u64>,
    max_message_bytes: Option<u64>,
    max_connections: Option<u64>,
    max_in_flight: Option<u64>,
    retries: Option<u64>,
}

impl Knobs {
    fn check(&self, at: &str, problems: &mut Vec<Problem>) {
        let checks = [
            (
                "requestTimeoutMs",
                self.request_timeout_ms,
                REQUEST_TIMEOUT_MS,
                " milliseconds",
            ),
            (
                "maxMessageBytes",
                self.max_message_bytes,
                MAX_MESSAGE_BYTES,
                " bytes",
            ),
            ("maxConnections", self.max_connections, MAX_CONNECTIONS, ""),
            ("maxInFlight", self.max_in_flight, MAX_IN_FLIGHT, ""),
            (
                "retries",
                self.retries,
                RETRIES,
                " (at most 3 attempts in all)",
            ),
        ];
        for (field, value, range, unit) in checks {
            let Some(value) = value else { continue };
            if range.contains(&value) {
                continue;
            }
            let expected = if *range.end() == u64::MAX {
                format!("must be at least {}", range.start())
            } else {
                format!("must be between {} and {}", range.start(), range.end())
            };
            problems.push(Problem::new(
                format!("{at}.{field}"),
                format!("{expected}{unit}, got {value}"),
            ));
        }
    }
}

fn valid_service_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '/' | '-')
}

/// Saturating: values were range-checked, so saturation only matters for `maxConnections`
/// above `usize::MAX` on 32-bit targets, where "unlimited" is what the operator meant.
fn to_usize(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

impl RoutesFile {
    /// Stage 1 alone: syntax, types and unknown fields, every problem (see the module docs).
    pub fn from_json(text: &str) -> Result<RoutesFile, ConfigError> {
        match schema::read(serde_json::from_str(text)?) {
            (Some(file), problems) if problems.is_empty() => Ok(file),
            (_, problems) => Err(ConfigError { problems }),
        }
    }

    /// Stage 2: everything else that is wrong, in file order.
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if let Some(version) = self.version {
            if version != ROUTES_FILE_VERSION {
                problems.push(Problem::new(
                    "version",
                    format!(
                        "unsupported version {version}: this router reads version {ROUTES_FILE_VERSION}"
                    ),
                ));
            }
        }
        if let Some(defaults) = &self.defaults {
            Knobs {
                request_timeout_ms: defaults.request_timeout_ms,
                max_message_bytes: defaults.max_message_bytes,
                max_connections: defaults.max_connections,
                max_in_flight: defaults.max_in_flight,
                retries: defaults.retries,
            }
            .check("defaults", &mut problems);
            check_policies(
                "defaults",
                defaults.resume.as_ref(),
                defaults.circuit_breaker.as_ref(),
                defaults.allowed_origins.as_deref(),
                defaults.auth.as_ref(),
                &mut problems,
            );
        }
        if self.routes.is_empty() {
            problems.push(Problem::new(
                "routes",
                "must list at least one route: a router without routes would refuse every connection",
            ));
        }
        // Shape → first route with it, to report patterns that match the same paths.
        let mut shapes: HashMap<String, usize> = HashMap::new();
        for (index, route) in self.routes.iter().enumerate() {
            let at = format!("routes[{index}]");
            let path_ok = match Pattern::parse(&route.path) {
                Ok(pattern) => {
                    if let Some(&first) = shapes.get(&pattern.shape()) {
                        let earlier = &self.routes[first].path;
                        let message = if *earlier == route.path {
                            format!("duplicate of routes[{first}].path (`{earlier}`)")
                        } else {
                            format!(
                                "`{}` matches the same paths as routes[{first}].path (`{earlier}`)",
                                route.path
                            )
                        };
                        problems.push(Problem::new(format!("{at}.path"), message));
                    } else {
                        shapes.insert(pattern.shape(), index);
                    }
                    true
                }
                Err(err) => {
                    for message in err.0 {
                        problems.push(Problem::new(format!("{at}.path"), message));
                    }
                    false
                }
            };
            route.check(&at, path_ok, &mut problems);
        }
        problems
    }

    /// All problems as one error, or `Ok` for a usable file.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Validates, then resolves every route's policies.
    pub fn into_table(self) -> Result<RouteTable, ConfigError> {
        self.validate()?;
        self.resolve()
    }

    /// Resolves every route's policies of a file without problems.
    fn resolve(self) -> Result<RouteTable, ConfigError> {
        // Keys are loaded here (environment, files): that can still fail.
        let mut problems = Vec::new();
        let defaults = self.resolved_defaults(&mut problems);
        let routes: Vec<Route> = self
            .routes
            .into_iter()
            .enumerate()
            .map(|(i, spec)| spec.resolve(&defaults, &format!("routes[{i}]"), &mut problems))
            .collect();
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        Ok(RouteTable::with_defaults(routes, defaults))
    }

    fn resolved_defaults(&self, problems: &mut Vec<Problem>) -> RouteDefaults {
        let builtin = RouteDefaults::BUILTIN;
        let spec = self.defaults.clone().unwrap_or_default();
        RouteDefaults {
            request_timeout: spec
                .request_timeout_ms
                .map_or(builtin.request_timeout, Duration::from_millis),
            max_message_bytes: spec
                .max_message_bytes
                .map_or(builtin.max_message_bytes, to_usize),
            max_connections: spec
                .max_connections
                .map_or(builtin.max_connections, to_usize),
            max_in_flight: spec.max_in_flight.map_or(builtin.max_in_flight, to_usize),
            binary: spec.binary.unwrap_or(builtin.binary),
            // Range-checked to 0..=2 before resolving.
            retries: spec
                .retries
                .map_or(builtin.retries, |r| u32::try_from(r).unwrap_or(u32::MAX)),
            rate_limit: merge_rate_limit(&builtin.rate_limit, spec.rate_limit.as_ref()),
            breaker: merge_breaker(&builtin.breaker, spec.circuit_breaker.as_ref()),
            resume: merge_resume(&builtin.resume, spec.resume.as_ref()),
            allowed_origins: spec.allowed_origins.clone(),
            auth: spec
                .auth
                .as_ref()
                .and_then(|a| resolve_auth(a, "defaults.auth", problems)),
        }
    }
}

impl RouteSpec {
    /// Everything but the path pattern itself. `path_ok` says whether the path is a valid
    /// pattern: a bad path as default service name would only repeat the path's problems.
    fn check(&self, at: &str, path_ok: bool, problems: &mut Vec<Problem>) {
        match &self.service {
            Some(service) if service.is_empty() => {
                problems.push(Problem::new(
                    format!("{at}.service"),
                    "must not be empty (leave it out to use the path)",
                ));
            }
            Some(service) if !service.chars().all(valid_service_char) => {
                problems.push(Problem::new(
                    format!("{at}.service"),
                    format!(
                        "`{service}` is not a valid service name: use only ASCII letters, digits and `_ . : / -`"
                    ),
                ));
            }
            Some(_) => {}
            None if path_ok && !self.path.chars().all(valid_service_char) => {
                problems.push(Problem::new(
                    format!("{at}.service"),
                    format!(
                        "missing, and the path `{}` cannot be the service name (only ASCII letters, digits and `_ . : / -`); set `service`",
                        self.path
                    ),
                ));
            }
            None => {}
        }

        if let Some(types) = &self.allowed_types {
            if self.raw {
                problems.push(Problem::new(
                    format!("{at}.allowedTypes"),
                    "a raw route passes frames unchanged and has no message types; remove `allowedTypes` or `raw`",
                ));
            }
            for (i, message_type) in types.iter().enumerate() {
                let location = format!("{at}.allowedTypes[{i}]");
                if message_type.is_empty() {
                    problems.push(Problem::new(location, "must not be empty"));
                } else if ROUTER_HANDLED_TYPES.contains(&message_type.as_str()) {
                    problems.push(Problem::new(
                        location,
                        format!(
                            "`{message_type}` is handled by the router and never forwarded; remove it"
                        ),
                    ));
                }
            }
        }

        Knobs {
            request_timeout_ms: self.request_timeout_ms,
            max_message_bytes: self.max_message_bytes,
            max_connections: self.max_connections,
            max_in_flight: self.max_in_flight,
            retries: self.retries,
        }
        .check(at, problems);
        check_policies(
            at,
            self.resume.as_ref(),
            self.circuit_breaker.as_ref(),
            self.allowed_origins.as_deref(),
            self.auth.as_ref(),
            problems,
        );
    }

    fn resolve(self, defaults: &RouteDefaults, at: &str, problems: &mut Vec<Problem>) -> Route {
        let auth = match &self.auth {
            Some(a) => resolve_auth(a, &format!("{at}.auth"), problems),
            None => defaults.auth.clone(),
        };
        Route {
            service: self.service.unwrap_or_else(|| self.path.clone()),
            path: self.path,
            description: self.description,
            capabilities: self.capabilities,
            python_module: self.python_module,
            raw: self.raw,
            allowed_types: self.allowed_types.map(|t| t.into_iter().collect()),
            request_timeout: self
                .request_timeout_ms
                .map_or(defaults.request_timeout, Duration::from_millis),
            max_message_bytes: self
                .max_message_bytes
                .map_or(defaults.max_message_bytes, to_usize),
            max_connections: self
                .max_connections
                .map_or(defaults.max_connections, to_usize),
            max_in_flight: self.max_in_flight.map_or(defaults.max_in_flight, to_usize),
            binary: self.binary.unwrap_or(defaults.binary),
            affinity: self.affinity,
            // Range-checked to 0..=2 before resolving.
            retries: self
                .retries
                .map_or(defaults.retries, |r| u32::try_from(r).unwrap_or(u32::MAX)),
            rate_limit: merge_rate_limit(&defaults.rate_limit, self.rate_limit.as_ref()),
            breaker: merge_breaker(&defaults.breaker, self.circuit_breaker.as_ref()),
            resume: merge_resume(&defaults.resume, self.resume.as_ref()),
            allowed_origins: self
                .allowed_origins
                .or_else(|| defaults.allowed_origins.clone()),
            auth,
            client_cert_required: self.client_cert == Some(ClientCertSpec::Required),
            dynamic: false,
        }
    }
}

fn merge_rate_limit(base: &RateLimitPolicy, spec: Option<&RateLimitSpec>) -> RateLimitPolicy {
    let Some(s) = spec else { return *base };
    RateLimitPolicy {
        messages_per_second: s.messages_per_second.unwrap_or(base.messages_per_second),
        message_burst: s.message_burst.unwrap_or(base.message_burst),
        connections_per_minute: s
            .connections_per_minute
            .unwrap_or(base.connections_per_minute),
        connection_burst: s.connection_burst.unwrap_or(base.connection_burst),
        route_messages_per_second: s
            .route_messages_per_second
            .unwrap_or(base.route_messages_per_second),
        close_after_rejections: s
            .close_after_rejections
            .unwrap_or(base.close_after_rejections),
    }
}

fn merge_resume(base: &ResumePolicy, spec: Option<&ResumeSpec>) -> ResumePolicy {
    let Some(s) = spec else { return *base };
    // Range-checked before resolving.
    ResumePolicy {
        ttl: s.ttl_ms.map_or(base.ttl, Duration::from_millis),
        max_frames: s.max_frames.map_or(base.max_frames, to_usize),
        max_bytes: s.max_bytes.map_or(base.max_bytes, to_usize),
    }
}

fn merge_breaker(base: &BreakerPolicy, spec: Option<&BreakerSpec>) -> BreakerPolicy {
    let Some(s) = spec else { return *base };
    BreakerPolicy {
        failure_threshold: s.failure_threshold.unwrap_or(base.failure_threshold),
        open_for: s.open_ms.map_or(base.open_for, Duration::from_millis),
    }
}

/// Checks of the policy objects that need no I/O.
fn check_policies(
    at: &str,
    resume: Option<&ResumeSpec>,
    breaker: Option<&BreakerSpec>,
    origins: Option<&[String]>,
    auth: Option<&AuthSpec>,
    problems: &mut Vec<Problem>,
) {
    if let Some(r) = resume {
        let checks = [
            (
                "ttlMs",
                r.ttl_ms,
                RESUME_TTL_MS,
                " milliseconds (0 turns resume off)",
            ),
            ("maxFrames", r.max_frames, RESUME_MAX_FRAMES, ""),
            ("maxBytes", r.max_bytes, RESUME_MAX_BYTES, " bytes"),
        ];
        for (field, value, range, unit) in checks {
            match value {
                Some(v) if !range.contains(&v) => problems.push(Problem::new(
                    format!("{at}.resume.{field}"),
                    format!(
                        "must be between {} and {}{unit}, got {v}",
                        range.start(),
                        range.end()
                    ),
                )),
                _ => {}
            }
        }
    }
    if let Some(b) = breaker {
        if b.failure_threshold == Some(0) {
            problems.push(Problem::new(
                format!("{at}.circuitBreaker.failureThreshold"),
                "must be at least 1",
            ));
        }
        if let Some(ms) = b.open_ms {
            if !(1..=3_600_000).contains(&ms) {
                problems.push(Problem::new(
                    format!("{at}.circuitBreaker.openMs"),
                    format!("must be between 1 and 3600000 milliseconds, got {ms}"),
                ));
            }
        }
    }
    for (i, o) in origins.unwrap_or_default().iter().enumerate() {
        let ok = o == "*" || o.starts_with("http://") || o.starts_with("https://");
        if !ok || o.ends_with('/') {
            problems.push(Problem::new(
                format!("{at}.allowedOrigins[{i}]"),
                format!("`{o}` is not an origin: write `*` or `scheme://host[:port]` without a trailing slash"),
            ));
        }
    }
    if let Some(a) = auth {
        if a.hs256_secret_env.is_none() && a.rs256_public_key_file.is_none() {
            problems.push(Problem::new(
                format!("{at}.auth"),
                "set `hs256SecretEnv` and/or `rs256PublicKeyFile`: without a key no token can be verified",
            ));
        }
    }
}

/// Loads the keys of an `auth` object; failures are problems at `at`.
fn resolve_auth(spec: &AuthSpec, at: &str, problems: &mut Vec<Problem>) -> Option<AuthPolicy> {
    let hs256 = match &spec.hs256_secret_env {
        None => None,
        Some(var) => match std::env::var(var) {
            Ok(secret) if !secret.is_empty() => Some(DecodingKey::from_secret(secret.as_bytes())),
            _ => {
                problems.push(Problem::new(
                    format!("{at}.hs256SecretEnv"),
                    format!("environment variable {var} is not set (or empty)"),
                ));
                None
            }
        },
    };
    let rs256 = match &spec.rs256_public_key_file {
        None => None,
        Some(file) => match std::fs::read(file) {
            Ok(pem) => match DecodingKey::from_rsa_pem(&pem) {
                Ok(k) => Some(k),
                Err(e) => {
                    problems.push(Problem::new(
                        format!("{at}.rs256PublicKeyFile"),
                        format!("{file} is not an RSA public key in PEM: {e}"),
                    ));
                    None
                }
            },
            Err(e) => {
                problems.push(Problem::new(
                    format!("{at}.rs256PublicKeyFile"),
                    format!("cannot read {file}: {e}"),
                ));
                None
            }
        },
    };
    Some(AuthPolicy {
        required: spec.required.unwrap_or(true),
        hs256,
        rs256,
        issuer: spec.issuer.clone(),
        audience: spec.audience.clone(),
        leeway_s: spec.leeway_seconds.unwrap_or(30),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const DEFAULT_FILE: &str = include_str!("../../websocket-routes.json");
    const SECURE_EXAMPLE: &str = include_str!("../../examples/secure-routes.json");

    fn problems_of(text: &str) -> Vec<Problem> {
        match parse_routes(text) {
            Ok(_) => Vec::new(),
            Err(err) => err.problems,
        }
    }

    /// A file with one route `{"path": "/ws", <extra>}` and top-level `<top>`.
    fn one_route(extra: &str) -> String {
        format!(r#"{{"routes": [{{"path": "/ws", "service": "chat"{extra}}}]}}"#)
    }

    #[test]
    fn client_cert_is_required_or_left_out() {
        let table = parse_routes(&one_route(r#", "clientCert": "required""#)).unwrap();
        assert!(table.routes()[0].client_cert_required);
        let table = parse_routes(&one_route("")).unwrap();
        assert!(!table.routes()[0].client_cert_required);
        let problems = problems_of(&one_route(r#", "clientCert": "sometimes""#));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].location, "routes[0].clientCert", "{problems:?}");
    }

    #[test]
    fn default_file_parses() {
        let table = parse_routes(DEFAULT_FILE).unwrap_or_else(|e| panic!("{e}"));
        let summary: Vec<(&str, &str, bool)> = table
            .routes()
            .iter()
            .map(|r| (r.path.as_str(), r.service.as_str(), r.affinity))
            .collect();
        assert_eq!(
            summary,
            [
                ("/ws/vision", "vision", false),
                ("/ws/voice", "voice", true),
                ("/ws/automation", "automation", true),
                ("/ws", "chat", false),
            ]
        );
        for route in table.routes() {
            assert!(!route.capabilities.is_empty(), "{}", route.path);
            assert!(route.python_module.is_some(), "{}", route.path);
            assert!(!route.raw, "{}", route.path);
            assert!(route.allowed_types.is_none(), "{}", route.path);
        }
        let vision = table.find("/ws/vision").expect("vision route");
        assert!(vision
            .route
            .capabilities
            .contains(&"workspace_analysis".to_owned()));
        assert_eq!(
            table
                .find("/ws")
                .map(|m| m.route.service.clone())
                .as_deref(),
            Some("chat")
        );
        assert_eq!(
            table.did_you_mean("/ws/visoin").as_deref(),
            Some("/ws/vision")
        );
    }

    /// The example of auth, origins and rate limits together passes every check that
    /// needs no key (the end-to-end test `example_routes` loads it with its key).
    #[test]
    fn the_secure_routes_example_is_valid() {
        let file = RoutesFile::from_json(SECURE_EXAMPLE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(file.problems(), []);
        let defaults = file.defaults.as_ref().expect("defaults");
        assert!(defaults.auth.is_some() && defaults.allowed_origins.is_some());
        assert!(defaults.rate_limit.is_some());
    }

    #[test]
    fn seed_format_parses_with_service_defaulting_to_path() {
        let table = parse_routes(
            r#"{"routes":[{"path":"/ws/vision","capabilities":["vision"],"pythonModule":"pkg.handler"}]}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let route = &table.routes()[0];
        assert_eq!(route.service, "/ws/vision");
        assert_eq!(route.python_module.as_deref(), Some("pkg.handler"));
        assert_eq!(route.capabilities, ["vision"]);
        let mut want = RouteDefaults::BUILTIN.route("/ws/vision", "/ws/vision");
        want.capabilities = vec!["vision".to_owned()];
        want.python_module = Some("pkg.handler".to_owned());
        assert_eq!(**route, want);
    }

    #[test]
    fn builtin_defaults_match_the_documented_values() {
        let b = RouteDefaults::BUILTIN;
        assert_eq!(b.request_timeout, Duration::from_millis(30_000));
        assert_eq!(b.max_message_bytes, 1_048_576);
        assert_eq!(b.max_connections, 10_000);
        assert_eq!(b.max_in_flight, 64);
        assert!(b.binary);
        assert_eq!(b.retries, 0);
    }

    #[test]
    fn knobs_resolve_route_over_defaults_over_builtin() {
        let table = parse_routes(
            r#"{
              "$schema": "ignored", "description": "ignored", "version": 1,
              "defaults": {"requestTimeoutMs": 5000, "maxInFlight": 8, "binary": false},
              "routes": [
                {"path": "/a", "service": "a"},
                {"path": "/b", "service": "b", "requestTimeoutMs": 7000, "maxMessageBytes": 2048,
                 "maxConnections": 3, "maxInFlight": 2, "binary": true, "affinity": true,
                 "retries": 2, "raw": false, "allowedTypes": ["echo", "say"],
                 "description": "bee", "capabilities": ["x"], "pythonModule": "m"}
              ]
            }"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            table.defaults().request_timeout,
            Duration::from_millis(5000)
        );
        let a = &table.routes()[0];
        assert_eq!(a.request_timeout, Duration::from_millis(5000));
        assert_eq!(a.max_in_flight, 8);
        assert!(!a.binary);
        assert_eq!(a.max_message_bytes, 1_048_576);
        assert_eq!(a.max_connections, 10_000);
        assert_eq!(a.retries, 0);
        assert!(!a.affinity);
        let b = &table.routes()[1];
        let want = Route {
            path: "/b".to_owned(),
            service: "b".to_owned(),
            description: Some("bee".to_owned()),
            capabilities: vec!["x".to_owned()],
            python_module: Some("m".to_owned()),
            raw: false,
            allowed_types: Some(HashSet::from(["echo".to_owned(), "say".to_owned()])),
            request_timeout: Duration::from_millis(7000),
            max_message_bytes: 2048,
            max_connections: 3,
            max_in_flight: 2,
            binary: true,
            affinity: true,
            retries: 2,
            rate_limit: RateLimitPolicy::DEFAULT,
            breaker: BreakerPolicy::DEFAULT,
            resume: ResumePolicy::DEFAULT,
            allowed_origins: None,
            auth: None,
            client_cert_required: false,
            dynamic: false,
        };
        assert_eq!(**b, want);
    }

    #[test]
    fn boundary_values_are_accepted() {
        for extra in [
            r#", "requestTimeoutMs": 1"#,
            r#", "requestTimeoutMs": 600000"#,
            r#", "maxMessageBytes": 16"#,
            r#", "maxMessageBytes": 67108864"#,
            r#", "maxConnections": 1"#,
            r#", "maxConnections": 18446744073709551615"#,
            r#", "maxInFlight": 1"#,
            r#", "maxInFlight": 10000"#,
            r#", "retries": 2"#,
            r#", "allowedTypes": []"#,
            r#", "raw": true, "binary": false"#,
        ] {
            let text = one_route(extra);
            assert_eq!(problems_of(&text), [], "{text}");
        }
        for path in [
            "/",
            "/*",
            "/api/*",
            "/rooms/{room_id}/*",
            "/a-b/c_d.e~f/%20",
        ] {
            let text = format!(r#"{{"routes": [{{"path": "{path}", "service": "s"}}]}}"#);
            assert_eq!(problems_of(&text), [], "{text}");
        }
    }

    /// Every rule: each case has exactly one problem, at the given location.
    #[test]
    fn each_rule_reports_one_problem_at_its_location() {
        let route = |extra: &str| one_route(extra);
        let with_path =
            |path: &str| format!(r#"{{"routes": [{{"path": "{path}", "service": "s"}}]}}"#);
        let cases: Vec<(String, &str, &str)> = vec![
            (with_path(""), "routes[0].path", "must not be empty"),
            (with_path("ws/vision"), "routes[0].path", "must start with `/`"),
            (with_path("/ws//vision"), "routes[0].path", "empty segments"),
            (with_path("/ws/"), "routes[0].path", "must not end with `/`"),
            (with_path("/ws/a b"), "routes[0].path", "whitespace"),
            (with_path("/ws\\t"), "routes[0].path", "whitespace"),
            (with_path("/ws?x=1"), "routes[0].path", "`?`"),
            (with_path("/ws#top"), "routes[0].path", "`#`"),
            (with_path("/caf\u{e9}"), "routes[0].path", "ASCII"),
            (with_path("/rooms/x{id}"), "routes[0].path", "whole segment"),
            (with_path("/rooms/{id"), "routes[0].path", "whole segment"),
            (with_path("/rooms/{9id}"), "routes[0].path", "identifier"),
            (with_path("/rooms/{room-id}"), "routes[0].path", "identifier"),
            (with_path("/rooms/{id}/x/{id}"), "routes[0].path", "more than once"),
            (with_path("/api*"), "routes[0].path", "`*`"),
            (with_path("/api/*/x"), "routes[0].path", "`*`"),
            (with_path("/api/x*"), "routes[0].path", "`*`"),
            (
                r#"{"routes": [{"path": "/ws", "service": "a"}, {"path": "/ws", "service": "b"}]}"#.to_owned(),
                "routes[1].path",
                "duplicate of routes[0].path",
            ),
            (
                r#"{"routes": [{"path": "/r/{id}", "service": "a"}, {"path": "/x", "service": "b"}, {"path": "/r/{name}", "service": "c"}]}"#.to_owned(),
                "routes[2].path",
                "matches the same paths as routes[0].path",
            ),
            (
                r#"{"routes": [{"path": "/ws", "service": ""}]}"#.to_owned(),
                "routes[0].service",
                "must not be empty",
            ),
            (
                r#"{"routes": [{"path": "/ws", "service": "vi sion"}]}"#.to_owned(),
                "routes[0].service",
                "not a valid service name",
            ),
            (
                r#"{"routes": [{"path": "/ws", "service": "chat!"}]}"#.to_owned(),
                "routes[0].service",
                "not a valid service name",
            ),
            (
                r#"{"routes": [{"path": "/rooms/{id}"}]}"#.to_owned(),
                "routes[0].service",
                "set `service`",
            ),
            (route(r#", "requestTimeoutMs": 0"#), "routes[0].requestTimeoutMs", "between 1 and 600000"),
            (route(r#", "requestTimeoutMs": 600001"#), "routes[0].requestTimeoutMs", "got 600001"),
            (route(r#", "maxMessageBytes": 15"#), "routes[0].maxMessageBytes", "between 16 and 67108864"),
            (route(r#", "maxMessageBytes": 67108865"#), "routes[0].maxMessageBytes", "got 67108865"),
            (route(r#", "maxConnections": 0"#), "routes[0].maxConnections", "at least 1"),
            (route(r#", "maxInFlight": 0"#), "routes[0].maxInFlight", "between 1 and 10000"),
            (route(r#", "maxInFlight": 10001"#), "routes[0].maxInFlight", "got 10001"),
            (route(r#", "retries": 3"#), "routes[0].retries", "between 0 and 2"),
            (route(r#", "raw": true, "allowedTypes": ["echo"]"#), "routes[0].allowedTypes", "raw route"),
            (route(r#", "allowedTypes": ["echo", ""]"#), "routes[0].allowedTypes[1]", "must not be empty"),
            (route(r#", "allowedTypes": ["ping"]"#), "routes[0].allowedTypes[0]", "handled by the router"),
            (route(r#", "allowedTypes": ["echo", "cancel"]"#), "routes[0].allowedTypes[1]", "handled by the router"),
            (r#"{"routes": []}"#.to_owned(), "routes", "at least one route"),
            (
                r#"{"version": 2, "routes": [{"path": "/ws"}]}"#.to_owned(),
                "version",
                "unsupported version 2",
            ),
            (
                r#"{"defaults": {"requestTimeoutMs": 0}, "routes": [{"path": "/ws"}]}"#.to_owned(),
                "defaults.requestTimeoutMs",
                "between 1 and 600000",
            ),
            (
                r#"{"defaults": {"maxMessageBytes": 1}, "routes": [{"path": "/ws"}]}"#.to_owned(),
                "defaults.maxMessageBytes",
                "between 16",
            ),
            (
                r#"{"defaults": {"maxConnections": 0}, "routes": [{"path": "/ws"}]}"#.to_owned(),
                "defaults.maxConnections",
                "at least 1",
            ),
            (
                r#"{"defaults": {"maxInFlight": 20000}, "routes": [{"path": "/ws"}]}"#.to_owned(),
                "defaults.maxInFlight",
                "between 1 and 10000",
            ),
            (
                r#"{"defaults": {"retries": 9}, "routes": [{"path": "/ws"}]}"#.to_owned(),
                "defaults.retries",
                "at most 3 attempts",
            ),
        ];
        for (text, location, needle) in &cases {
            let problems = problems_of(text);
            assert_eq!(problems.len(), 1, "{text}\n=> {problems:#?}");
            assert_eq!(problems[0].location, *location, "{text}");
            assert!(
                problems[0].message.contains(needle),
                "{text}\n=> {:?} should contain {needle:?}",
                problems[0].message
            );
        }
    }

    #[test]
    fn every_problem_is_reported() {
        let text = r#"{
          "routes": [
            {"path": "ws", "service": "a"},
            {"path": "/ok", "service": "b", "retries": 5},
            {"path": "/ok2", "service": "c", "allowedTypes": ["subscribe"]}
          ]
        }"#;
        let err = parse_routes(text).expect_err("three problems");
        let locations: Vec<&str> = err.problems.iter().map(|p| p.location.as_str()).collect();
        assert_eq!(
            locations,
            [
                "routes[0].path",
                "routes[1].retries",
                "routes[2].allowedTypes[0]"
            ]
        );
        // Display: one "location (route path): message" line per problem.
        let shown = err.to_string();
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), 3, "{shown}");
        let paths = ["ws", "/ok", "/ok2"];
        for ((line, problem), path) in lines.iter().zip(&err.problems).zip(paths) {
            assert_eq!(
                *line,
                format!("{} (route {path}): {}", problem.location, problem.message)
            );
        }
    }

    #[test]
    fn problems_in_defaults_and_several_routes_all_count() {
        let text = r#"{"version": 3, "defaults": {"maxInFlight": 0, "retries": 3},
          "routes": [{"path": "/a/"}, {"path": "/b", "raw": true, "allowedTypes": ["", "ping"]}, {"path": "/b"}]}"#;
        let locations: Vec<String> = problems_of(text).into_iter().map(|p| p.location).collect();
        assert_eq!(
            locations,
            [
                "version",
                "defaults.maxInFlight",
                "defaults.retries",
                "routes[0].path",
                "routes[1].allowedTypes",
                "routes[1].allowedTypes[0]",
                "routes[1].allowedTypes[1]",
                "routes[2].path",
            ]
        );
    }

    /// A syntax error: one problem (nothing after it can be read), by line and column.
    #[test]
    fn syntax_errors_have_line_and_column() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "{\"routes\": [\n  {\"path\": \"/ws\",}]}",
                "line 2, column 18",
                "trailing comma",
            ),
            ("", "line 1, column 0", "EOF while parsing"),
        ];
        for (text, location, needle) in cases {
            let problems = problems_of(text);
            assert_eq!(problems.len(), 1, "{text:?} => {problems:#?}");
            assert_eq!(problems[0].location, *location, "{text:?} => {problems:#?}");
            assert!(
                problems[0].message.contains(needle),
                "{text:?} => {problems:#?}"
            );
            assert!(!problems[0].message.contains(" at line "), "{problems:#?}");
        }
    }

    /// Schema errors (unknown fields, wrong types, missing fields): each located by its
    /// JSON path, with serde's message (or a suggestion for a misspelt field).
    #[test]
    fn schema_errors_are_located_by_json_path() {
        let cases: &[(&str, &str, &str)] = &[
            (
                r#"{"routes": [{"path": "/ws"}], "rootes": []}"#,
                "rootes",
                "unknown field `rootes`; did you mean `routes`?",
            ),
            (
                r#"{"defaults": {"colour": 1}, "routes": [{"path": "/ws"}]}"#,
                "defaults.colour",
                "unknown field `colour`, expected one of",
            ),
            (
                r#"{"routes": [{"path": "/ws", "pythonModul": "x"}]}"#,
                "routes[0].pythonModul",
                "did you mean `pythonModule`?",
            ),
            (
                r#"{"routes": [{"path": 7}]}"#,
                "routes[0].path",
                "invalid type: integer `7`, expected a string",
            ),
            (
                r#"{"routes": [{"path": "/ws", "maxInFlight": -1}]}"#,
                "routes[0].maxInFlight",
                "invalid value: integer `-1`, expected u64",
            ),
            (
                r#"{"routes": [{"path": "/ws", "rateLimit": {"messagesPerSecond": "many"}}]}"#,
                "routes[0].rateLimit.messagesPerSecond",
                "invalid type: string \"many\", expected u32",
            ),
            (
                r#"{"routes": [{"path": "/ws", "allowedTypes": ["a", 5]}]}"#,
                "routes[0].allowedTypes[1]",
                "expected a string",
            ),
            (
                r#"{"routes": [{"path": "/ws", "auth": "yes"}]}"#,
                "routes[0].auth",
                "expected an `auth` object",
            ),
            (
                r#"{"routes": [{"service": "s"}]}"#,
                "routes[0].path",
                "missing (this field is required)",
            ),
            (r#"{"version": 1}"#, "routes", "missing"),
            (r#"{"routes": [7]}"#, "routes[0]", "expected a route object"),
            (
                r#"{"routes": [["/ws"]]}"#,
                "routes[0]",
                "a list, expected a route object",
            ),
            (
                r#"{"routes": [{"path": "/ws", "rateLimit": [1, 2]}]}"#,
                "routes[0].rateLimit",
                "a list, expected a `rateLimit` object",
            ),
            (
                r#"{"defaults": [], "routes": [{"path": "/ws"}]}"#,
                "defaults",
                "a list, expected a `defaults` object",
            ),
            (
                "[1, 2]",
                "routes file",
                "must be a JSON object with a `routes` list, found a list",
            ),
            ("7", "routes file", "found a number"),
        ];
        for (text, location, needle) in cases {
            let problems = problems_of(text);
            assert_eq!(problems.len(), 1, "{text} => {problems:#?}");
            assert_eq!(problems[0].location, *location, "{text} => {problems:#?}");
            assert!(
                problems[0].message.contains(needle),
                "{text} => {problems:#?}"
            );
        }
    }

    /// The issue's case: a misspelt field no longer hides a bad value next to it, nor the
    /// problems stage 2 finds elsewhere; all come in one pass, in file order, each naming
    /// its route.
    #[test]
    fn schema_and_rule_problems_come_together_in_one_pass() {
        let text = r#"{
          "version": 2,
          "routes": [
            {"path": "/ws/a", "service": "a", "timeoutMs": 5000, "maxInFlight": -1},
            {"path": "/ws/b", "service": "b", "retries": 5, "binary": "no"}
          ]
        }"#;
        let err = parse_routes(text).expect_err("five problems");
        let shown: Vec<String> = err.problems.iter().map(Problem::to_string).collect();
        assert_eq!(
            shown,
            [
                "version: unsupported version 2: this router reads version 1",
                "routes[0].maxInFlight (route /ws/a): invalid value: integer `-1`, expected u64",
                "routes[0].timeoutMs (route /ws/a): unknown field `timeoutMs`; did you mean `requestTimeoutMs`?",
                "routes[1].binary (route /ws/b): invalid type: string \"no\", expected a boolean",
                "routes[1].retries (route /ws/b): must be between 0 and 2 (at most 3 attempts in all), got 5",
            ],
            "{err}"
        );
    }

    #[test]
    fn load_routes_reads_the_file_and_locates_read_errors() {
        let dir = std::env::temp_dir().join(format!("router-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let good = dir.join("routes.json");
        std::fs::write(&good, DEFAULT_FILE).expect("write routes");
        let loaded = load_routes(&good);
        let missing = dir.join("missing.json");
        let err = load_routes(&missing).expect_err("missing file");
        std::fs::remove_dir_all(&dir).expect("clean up");

        assert_eq!(loaded.map(|t| t.routes().len()).ok(), Some(4));
        assert_eq!(err.problems.len(), 1);
        assert_eq!(err.problems[0].location, missing.display().to_string());
        assert!(err.problems[0].message.contains("cannot read"), "{err}");
    }
}
