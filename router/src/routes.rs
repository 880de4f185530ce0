//! Resolved routes and request-path matching.
//!
//! [`config`](crate::config) turns the routes file into a [`RouteTable`]; everything here
//! works on already-validated data, so matching never fails, it only finds or doesn't.
//!
//! # Pattern language
//! - `/ws/vision`: exact. Matching is case-sensitive and on the raw (still percent-encoded)
//!   request path, without the query string (the caller strips it).
//! - `/rooms/{room}`: a `{name}` segment matches exactly one non-empty segment; its value is
//!   percent-decoded into [`RouteMatch::params`]. A segment whose escapes are malformed or
//!   decode to invalid UTF-8 does not match, so it can never reach a worker half-decoded.
//! - `/api/*`: a prefix. It matches every path that starts with `/api/`, including `/api/`
//!   itself, but **not** `/api` (nor `/apix`): the `*` stands for "whatever follows the slash".
//!   Add an exact `/api` route to serve that path too. `/*` matches every path. The part the
//!   `*` covered is not put in `params` (workers get the full request path anyway).
//! - Trailing slash: `/ws/vision/` is a different path from `/ws/vision` and does not match it.
//!   Patterns cannot end with `/` (except `/` itself), so a trailing slash is always a client
//!   mistake, and [`RouteTable::did_you_mean`] points the client at the right path.
//!
//! # Precedence
//! 1. An exact pattern equal to the path.
//! 2. `{param}` patterns (without `*`): the one with more literal segments wins; on a tie,
//!    the one whose first literal comes earlier (`/ws/vision/{id}` beats `/ws/{name}/info`
//!    for `/ws/vision/info`), like a radix-tree router.
//! 3. `*` prefixes: the longest prefix (most segments before the `*`) wins, then the same
//!    rules as 2.
//!
//! Validation rejects two patterns that match the same paths (equal up to parameter names),
//! so these rules give every path at most one route.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::policy::{auth::AuthPolicy, breaker::BreakerPolicy, ratelimit::RateLimitPolicy};

/// One route, with every policy resolved (file values over `defaults` over built-ins).
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// The pattern as written in the routes file (also the route's name in logs and `/routes`).
    pub path: String,
    /// The service workers register for; defaults to `path`.
    pub service: String,
    pub description: Option<String>,
    pub capabilities: Vec<String>,
    /// Seed-format compatibility: informational only, the router never imports Python.
    pub python_module: Option<String>,
    /// Frames pass unchanged both ways: no welcome, no envelope, no router-handled types.
    pub raw: bool,
    /// Client message types forwarded to workers; `None` = any type.
    pub allowed_types: Option<HashSet<String>>,
    pub request_timeout: Duration,
    pub max_message_bytes: usize,
    pub max_connections: usize,
    /// Max requests in flight per connection.
    pub max_in_flight: usize,
    /// Whether clients may send binary frames.
    pub binary: bool,
    /// All messages of a connection go to the same worker while it lives.
    pub affinity: bool,
    /// Extra attempts after a transient failure (0..=2, so at most 3 attempts).
    pub retries: u32,
    pub rate_limit: RateLimitPolicy,
    pub breaker: BreakerPolicy,
    /// Session resume: how long a dropped session waits, what it keeps.
    pub resume: ResumePolicy,
    /// Browser origins allowed to connect; `None` = any.
    pub allowed_origins: Option<Vec<String>>,
    /// Token checks; `None` = no tokens looked at.
    pub auth: Option<AuthPolicy>,
    /// Only clients that presented a verified certificate (mutual TLS,
    /// `TLS_CLIENT_CA`) may connect.
    pub client_cert_required: bool,
    /// Registered by a worker (dynamic routing), not listed in the routes file.
    pub dynamic: bool,
}

/// Session resume on a route (README, "Resume"): a dropped session waits
/// `ttl` for its client (0: resume is off), keeping at most `max_frames`
/// frames and `max_bytes` bytes for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumePolicy {
    pub ttl: Duration,
    pub max_frames: usize,
    pub max_bytes: usize,
}

impl ResumePolicy {
    pub const DEFAULT: ResumePolicy = ResumePolicy {
        ttl: Duration::from_secs(30),
        max_frames: 512,
        max_bytes: 512 * 1024,
    };

    pub fn enabled(&self) -> bool {
        !self.ttl.is_zero()
    }
}

/// Policy values a route gets for every knob the routes file leaves unset.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteDefaults {
    pub request_timeout: Duration,
    pub max_message_bytes: usize,
    pub max_connections: usize,
    pub max_in_flight: usize,
    pub binary: bool,
    pub retries: u32,
    pub rate_limit: RateLimitPolicy,
    pub breaker: BreakerPolicy,
    /// Session resume: how long a dropped session waits, what it keeps.
    pub resume: ResumePolicy,
    pub allowed_origins: Option<Vec<String>>,
    pub auth: Option<AuthPolicy>,
}

impl RouteDefaults {
    /// What applies when the routes file has no `defaults` (documented in the routes file schema).
    pub const BUILTIN: RouteDefaults = RouteDefaults {
        request_timeout: Duration::from_millis(30_000),
        max_message_bytes: 1_048_576,
        max_connections: 10_000,
        max_in_flight: 64,
        binary: true,
        retries: 0,
        rate_limit: RateLimitPolicy::DEFAULT,
        breaker: BreakerPolicy::DEFAULT,
        resume: ResumePolicy::DEFAULT,
        allowed_origins: None,
        auth: None,
    };

    /// A route with these policies and nothing else set (e.g. a route a worker registers
    /// under dynamic routing). The path is not validated here: see [`Pattern::parse`].
    pub fn route(&self, path: impl Into<String>, service: impl Into<String>) -> Route {
        Route {
            path: path.into(),
            service: service.into(),
            description: None,
            capabilities: Vec::new(),
            python_module: None,
            raw: false,
            allowed_types: None,
            request_timeout: self.request_timeout,
            max_message_bytes: self.max_message_bytes,
            max_connections: self.max_connections,
            max_in_flight: self.max_in_flight,
            binary: self.binary,
            affinity: false,
            retries: self.retries,
            rate_limit: self.rate_limit,
            breaker: self.breaker,
            resume: self.resume,
            allowed_origins: self.allowed_origins.clone(),
            auth: self.auth.clone(),
            client_cert_required: false,
            dynamic: false,
        }
    }
}

impl Default for RouteDefaults {
    fn default() -> Self {
        Self::BUILTIN
    }
}

/// The result of [`RouteTable::find`].
#[derive(Debug, Clone)]
pub struct RouteMatch {
    pub route: Arc<Route>,
    /// Percent-decoded values of the pattern's `{param}` segments.
    pub params: BTreeMap<String, String>,
}

/// Why a path is not a valid pattern: one message per problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid route path: {}", .0.join("; "))]
pub struct PatternError(pub Vec<String>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

/// A compiled route path (see the module docs for the language).
#[derive(Debug, Clone)]
pub struct Pattern {
    /// Segments before the `*`, if any; empty for `/` and `/*`.
    segments: Vec<Segment>,
    /// Ends with `/*`.
    prefix: bool,
}

impl Pattern {
    /// Compiles a pattern, or lists everything wrong with it.
    pub fn parse(path: &str) -> Result<Pattern, PatternError> {
        let mut problems = Vec::new();
        if path.is_empty() {
            return Err(PatternError(vec!["must not be empty".to_owned()]));
        }
        if !path.starts_with('/') {
            problems.push(format!("must start with `/` (got `{path}`)"));
        }
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            problems.push("must not contain whitespace or control characters".to_owned());
        }
        if path.contains('?') {
            problems
                .push("must not contain `?`: query strings are not part of the path".to_owned());
        }
        if path.contains('#') {
            problems
                .push("must not contain `#`: fragments are never sent to the server".to_owned());
        }
        if !path.is_ascii() {
            problems.push(
                "must be ASCII: percent-encode other characters, as clients send them".to_owned(),
            );
        }

        let body = path.strip_prefix('/').unwrap_or(path);
        let mut raw_segments: Vec<&str> = if body.is_empty() {
            Vec::new()
        } else {
            body.split('/').collect()
        };
        let prefix = raw_segments.last() == Some(&"*");
        if prefix {
            raw_segments.pop();
        }

        let mut segments = Vec::with_capacity(raw_segments.len());
        let mut seen_params = HashSet::new();
        let (mut empty_inner, mut trailing_slash, mut misplaced_star) = (false, false, false);
        let last = raw_segments.len().saturating_sub(1);
        for (i, seg) in raw_segments.iter().enumerate() {
            if seg.is_empty() {
                // A trailing `/` is reported apart from `//` because the fix differs.
                if i == last && !prefix {
                    trailing_slash = true;
                } else {
                    empty_inner = true;
                }
                continue;
            }
            if seg.contains('*') {
                misplaced_star = true;
                continue;
            }
            if seg.contains('{') || seg.contains('}') {
                match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(name) if !name.contains(['{', '}']) => {
                        if !is_identifier(name) {
                            problems.push(format!(
                                "parameter name `{name}` must be an identifier \
                                 (ASCII letters, digits and `_`, not starting with a digit)"
                            ));
                        } else if !seen_params.insert(name) {
                            problems.push(format!("parameter `{{{name}}}` appears more than once"));
                        } else {
                            segments.push(Segment::Param(name.to_owned()));
                        }
                    }
                    _ => problems.push(format!(
                        "`{seg}`: a parameter must be a whole segment such as `{{room_id}}`"
                    )),
                }
                continue;
            }
            segments.push(Segment::Literal((*seg).to_owned()));
        }
        if trailing_slash {
            problems.push(
                "must not end with `/`: `/a/` and `/a` are different paths, and only `/` may end with a slash"
                    .to_owned(),
            );
        }
        if empty_inner {
            problems.push("must not contain empty segments (`//`)".to_owned());
        }
        if misplaced_star {
            problems.push(
                "`*` is only allowed as the whole last segment, as in `/prefix/*`".to_owned(),
            );
        }

        if problems.is_empty() {
            Ok(Pattern { segments, prefix })
        } else {
            Err(PatternError(problems))
        }
    }

    /// A key equal for two patterns exactly when they match the same paths.
    pub fn shape(&self) -> String {
        let mut out = String::new();
        for seg in &self.segments {
            out.push('/');
            match seg {
                Segment::Literal(lit) => out.push_str(lit),
                Segment::Param(_) => out.push_str("{}"),
            }
        }
        match (self.prefix, out.is_empty()) {
            (true, _) => out.push_str("/*"),
            (false, true) => out.push('/'),
            (false, false) => {}
        }
        out
    }

    /// No parameters and no `*`: matches only the path written.
    pub fn is_exact(&self) -> bool {
        !self.prefix && self.param_count() == 0
    }

    fn param_count(&self) -> usize {
        self.segments
            .iter()
            .filter(|s| matches!(s, Segment::Param(_)))
            .count()
    }

    fn literal_count(&self) -> usize {
        self.segments.len() - self.param_count()
    }

    /// `false` for literals, so that sorting ascending puts an earlier literal first.
    fn kinds(&self) -> Vec<bool> {
        self.segments
            .iter()
            .map(|s| matches!(s, Segment::Param(_)))
            .collect()
    }

    /// `request` is the request path split after its leading `/` (`/` gives `[""]`).
    fn matches(&self, request: &[&str]) -> Option<BTreeMap<String, String>> {
        let n = self.segments.len();
        let fits = if self.prefix {
            // `> n`: the slash after the prefix must be there, even with nothing after it.
            request.len() > n
        } else {
            request.len() == n
        };
        if !fits {
            return None;
        }
        let mut params = BTreeMap::new();
        for (seg, got) in self.segments.iter().zip(request) {
            match seg {
                Segment::Literal(lit) if lit == got => {}
                Segment::Literal(_) => return None,
                Segment::Param(name) => {
                    if got.is_empty() {
                        return None;
                    }
                    params.insert(name.clone(), percent_decode(got)?);
                }
            }
        }
        Some(params)
    }

    /// What this pattern looks like when filled in from `request`, and the part of the
    /// request to compare it with, for [`RouteTable::did_you_mean`].
    fn suggestion_pair(&self, path: &str, request: &[&str]) -> (String, String) {
        let mut candidate = String::from("/");
        let filled: Vec<&str> = self
            .segments
            .iter()
            .enumerate()
            .map(|(i, seg)| match seg {
                Segment::Literal(lit) => lit.as_str(),
                Segment::Param(_) => request.get(i).copied().unwrap_or(""),
            })
            .collect();
        candidate.push_str(&filled.join("/"));
        if !self.prefix {
            return (candidate, path.to_owned());
        }
        // Only the part before the `*` can be mistyped; whatever follows matches anyway.
        let n = self.segments.len();
        if n > 0 {
            candidate.push('/');
        }
        let mut compared = String::from("/");
        compared.push_str(&request[..n.min(request.len())].join("/"));
        if request.len() > n && n > 0 {
            compared.push('/');
        }
        (candidate, compared)
    }
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Strict percent-decoding: `None` for a malformed escape or a result that is not UTF-8
/// (`percent_encoding` itself passes malformed escapes through).
fn percent_decode(segment: &str) -> Option<String> {
    let well_formed = segment.split('%').skip(1).all(|rest| {
        rest.as_bytes()
            .get(..2)
            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return None;
    }
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// Request paths longer than this get no suggestion: nobody mistypes those by hand, and it
/// bounds the quadratic work an unknown-path request can cost.
const MAX_SUGGESTION_INPUT: usize = 256;

/// The routes, compiled for matching. Immutable once built: on reload the router builds a
/// new table and publishes it (in an `Arc`) instead of mutating the running one.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    /// File order, as listed by `/routes`.
    routes: Vec<Arc<Route>>,
    defaults: RouteDefaults,
    exact: HashMap<String, usize>,
    /// Sorted by precedence, so the first match wins.
    params: Vec<(Pattern, usize)>,
    /// Sorted by precedence, so the first match wins.
    prefixes: Vec<(Pattern, usize)>,
    /// Index → compiled pattern, `None` for a path that did not compile.
    compiled: Vec<Option<Pattern>>,
}

impl RouteTable {
    /// A table with the built-in defaults (see [`RouteTable::with_defaults`]).
    pub fn new(routes: Vec<Route>) -> RouteTable {
        Self::with_defaults(routes, RouteDefaults::BUILTIN)
    }

    /// `defaults` is only kept for [`RouteTable::defaults`] (routes are already resolved).
    ///
    /// Routes are expected to be validated (by [`crate::config`]); for hand-built tables:
    /// of two routes matching the same paths the first wins, and a path that is not a valid
    /// pattern is matched only by exact string equality (and logged).
    pub fn with_defaults(routes: Vec<Route>, defaults: RouteDefaults) -> RouteTable {
        let routes: Vec<Arc<Route>> = routes.into_iter().map(Arc::new).collect();
        let mut exact = HashMap::new();
        let mut params = Vec::new();
        let mut prefixes = Vec::new();
        let mut compiled = Vec::with_capacity(routes.len());
        for (index, route) in routes.iter().enumerate() {
            match Pattern::parse(&route.path) {
                Ok(pattern) => {
                    if pattern.is_exact() {
                        exact.entry(route.path.clone()).or_insert(index);
                    } else if pattern.prefix {
                        prefixes.push((pattern.clone(), index));
                    } else {
                        params.push((pattern.clone(), index));
                    }
                    compiled.push(Some(pattern));
                }
                Err(err) => {
                    tracing::warn!(
                        route = %route.path,
                        error = %err,
                        "route path is not a valid pattern; matching it exactly"
                    );
                    exact.entry(route.path.clone()).or_insert(index);
                    compiled.push(None);
                }
            }
        }
        // Stable sorts: among patterns that match the same paths, file order decides.
        params.sort_by_key(|(p, _)| (Reverse(p.literal_count()), p.kinds()));
        prefixes.sort_by_key(|(p, _)| {
            (
                Reverse(p.segments.len()),
                Reverse(p.literal_count()),
                p.kinds(),
            )
        });
        RouteTable {
            routes,
            defaults,
            exact,
            params,
            prefixes,
            compiled,
        }
    }

    /// All routes, in the order of the routes file.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// The defaults the routes file set (or the built-ins), for routes added at run time.
    pub fn defaults(&self) -> &RouteDefaults {
        &self.defaults
    }

    /// The route whose pattern is exactly `pattern` (not a request-path match).
    pub fn get(&self, pattern: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.path == pattern)
    }

    /// Why a worker serving `service` gets no traffic, when no route uses
    /// that service (a typo, or a route not written yet): for the log line
    /// at its registration and for `/routes`. `None` when a route uses it.
    pub fn unrouted(&self, service: &str) -> Option<String> {
        if self.routes.iter().any(|r| r.service == service) {
            return None;
        }
        let used: std::collections::BTreeSet<&str> =
            self.routes.iter().map(|r| r.service.as_str()).collect();
        let closest = used
            .iter()
            .map(|u| {
                (
                    strsim::levenshtein(&u.to_lowercase(), &service.to_lowercase()),
                    *u,
                )
            })
            .filter(|(d, u)| *d <= (u.chars().count().min(service.chars().count()) / 3).max(1))
            .min();
        let list = used
            .iter()
            .map(|u| format!("`{u}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut message = format!(
            "no route uses service `{service}`, so this worker gets no traffic (the routes use {list})"
        );
        if let Some((_, suggestion)) = closest {
            message.push_str(&format!("; did you mean `{suggestion}`?"));
        }
        Some(message)
    }

    /// The route serving request path `path` (without query string), by the precedence in
    /// the module docs.
    pub fn find(&self, path: &str) -> Option<RouteMatch> {
        if let Some(&index) = self.exact.get(path) {
            return Some(self.matched(index, BTreeMap::new()));
        }
        let rest = path.strip_prefix('/')?;
        let request: Vec<&str> = rest.split('/').collect();
        self.params
            .iter()
            .chain(&self.prefixes)
            .find_map(|(pattern, index)| {
                pattern
                    .matches(&request)
                    .map(|params| self.matched(*index, params))
            })
    }

    fn matched(&self, index: usize, params: BTreeMap<String, String>) -> RouteMatch {
        RouteMatch {
            route: Arc::clone(&self.routes[index]),
            params,
        }
    }

    /// The pattern of the route closest to `path` by edit distance (ignoring case), for
    /// "unknown route" answers; `None` when no route is reasonably close.
    ///
    /// `{param}` segments are filled from the request before comparing (`/room/42` is one
    /// edit from `/rooms/{id}`), and for a `*` prefix only the part before the `*` counts.
    /// Close means at most a third of the shorter string's length (at least 1) edits.
    /// On a tie, exact patterns beat `{param}` ones, which beat prefixes, then file order.
    pub fn did_you_mean(&self, path: &str) -> Option<String> {
        if path.chars().count() > MAX_SUGGESTION_INPUT {
            return None;
        }
        let request: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
        let mut best: Option<((usize, u8, usize), &str)> = None;
        for (index, route) in self.routes.iter().enumerate() {
            let (candidate, compared, class) = match &self.compiled[index] {
                Some(pattern) => {
                    let (candidate, compared) = pattern.suggestion_pair(path, &request);
                    let class = match (pattern.is_exact(), pattern.prefix) {
                        (true, _) => 0,
                        (false, false) => 1,
                        (false, true) => 2,
                    };
                    (candidate, compared, class)
                }
                None => (route.path.clone(), path.to_owned(), 0),
            };
            let (a, b) = (candidate.to_lowercase(), compared.to_lowercase());
            let (la, lb) = (a.chars().count(), b.chars().count());
            let allowed = (la.min(lb) / 3).max(1);
            // The length difference is a lower bound of the distance: skip hopeless pairs cheaply.
            if la.abs_diff(lb) > allowed {
                continue;
            }
            let distance = strsim::levenshtein(&a, &b);
            if distance > allowed {
                continue;
            }
            let key = (distance, class, index);
            match best {
                Some((best_key, _)) if best_key <= key => {}
                _ => best = Some((key, &route.path)),
            }
        }
        best.map(|(_, pattern)| pattern.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(paths: &[&str]) -> RouteTable {
        RouteTable::new(
            paths
                .iter()
                .map(|p| RouteDefaults::BUILTIN.route(*p, "svc"))
                .collect(),
        )
    }

    #[test]
    fn unrouted_services_are_named_with_a_suggestion() {
        let t = RouteTable::new(vec![
            RouteDefaults::BUILTIN.route("/ws/vision", "vision"),
            RouteDefaults::BUILTIN.route("/ws", "chat"),
            RouteDefaults::BUILTIN.route("/ws/v2", "vision"),
        ]);
        assert_eq!(t.unrouted("vision"), None);
        assert_eq!(
            t.unrouted("visoin").as_deref(),
            Some(
                "no route uses service `visoin`, so this worker gets no traffic \
                 (the routes use `chat`, `vision`); did you mean `vision`?"
            )
        );
        assert_eq!(
            t.unrouted("billing").as_deref(),
            Some(
                "no route uses service `billing`, so this worker gets no traffic \
                 (the routes use `chat`, `vision`)"
            )
        );
    }

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn precedence_and_params() {
        let t = table(&[
            "/",
            "/ws",
            "/ws/vision",
            "/ws/{name}",
            "/ws/{name}/info",
            "/ws/vision/{id}",
            "/ws/{a}/{b}",
            "/api/*",
            "/api/v1/*",
            "/api/{version}/admin/*",
            "/files/{name}",
            "/files/*",
            "/rooms/{room}/members/{member}",
        ]);
        // (request path, pattern of the route expected, params expected)
        type Case<'a> = (&'a str, Option<&'a str>, &'a [(&'a str, &'a str)]);
        let cases: &[Case<'_>] = &[
            ("/", Some("/"), &[]),
            ("/ws", Some("/ws"), &[]),
            // Exact beats `{param}`.
            ("/ws/vision", Some("/ws/vision"), &[]),
            ("/ws/voice", Some("/ws/{name}"), &[("name", "voice")]),
            // More literal segments wins.
            (
                "/ws/voice/info",
                Some("/ws/{name}/info"),
                &[("name", "voice")],
            ),
            ("/ws/vision/7", Some("/ws/vision/{id}"), &[("id", "7")]),
            ("/ws/x/y", Some("/ws/{a}/{b}"), &[("a", "x"), ("b", "y")]),
            // Same literal count: the earlier literal wins.
            (
                "/ws/vision/info",
                Some("/ws/vision/{id}"),
                &[("id", "info")],
            ),
            // Params never match an empty segment; trailing slash is a different path.
            ("/ws/", None, &[]),
            ("/ws/vision/", None, &[]),
            ("/ws//x", None, &[]),
            // Case-sensitive.
            ("/WS/vision", None, &[]),
            // `/api/*` covers `/api/` and below, not `/api` or `/apix`.
            ("/api", None, &[]),
            ("/apix", None, &[]),
            ("/api/", Some("/api/*"), &[]),
            ("/api/x/y", Some("/api/*"), &[]),
            // Longest prefix wins.
            ("/api/v1", Some("/api/*"), &[]),
            ("/api/v1/", Some("/api/v1/*"), &[]),
            ("/api/v1/x/y", Some("/api/v1/*"), &[]),
            (
                "/api/v2/admin/x",
                Some("/api/{version}/admin/*"),
                &[("version", "v2")],
            ),
            (
                "/api/v1/admin/x",
                Some("/api/{version}/admin/*"),
                &[("version", "v1")],
            ),
            // `{param}` beats a prefix.
            ("/files/a", Some("/files/{name}"), &[("name", "a")]),
            ("/files/a/b", Some("/files/*"), &[]),
            (
                "/rooms/r1/members/m%C3%A9",
                Some("/rooms/{room}/members/{member}"),
                &[("room", "r1"), ("member", "mé")],
            ),
            (
                "/rooms/a%2Fb/members/c",
                Some("/rooms/{room}/members/{member}"),
                &[("room", "a/b"), ("member", "c")],
            ),
            // Malformed escapes and invalid UTF-8 never match a parameter.
            ("/rooms/%zz/members/c", None, &[]),
            ("/rooms/%ff/members/c", None, &[]),
            ("/rooms/%4/members/c", None, &[]),
            ("", None, &[]),
            ("ws", None, &[]),
            ("/nothing", None, &[]),
        ];
        for (path, want, want_params) in cases {
            let got = t.find(path);
            assert_eq!(
                got.as_ref().map(|m| m.route.path.as_str()),
                *want,
                "route for {path:?}"
            );
            if let Some(m) = got {
                assert_eq!(m.params, params(want_params), "params for {path:?}");
            }
        }
    }

    #[test]
    fn catch_all_prefix() {
        let t = table(&["/*", "/ws"]);
        for (path, want) in [
            ("/", Some("/*")),
            ("/anything/at/all/", Some("/*")),
            ("/ws", Some("/ws")),
            ("/ws/", Some("/*")),
            ("no-slash", None),
        ] {
            assert_eq!(
                t.find(path).map(|m| m.route.path.clone()).as_deref(),
                want,
                "{path:?}"
            );
        }
    }

    #[test]
    fn first_of_duplicates_wins_and_order_is_kept() {
        let mut first = RouteDefaults::BUILTIN.route("/rooms/{id}", "first");
        first.affinity = true;
        let t = RouteTable::new(vec![
            first,
            RouteDefaults::BUILTIN.route("/rooms/{name}", "second"),
            RouteDefaults::BUILTIN.route("/ws", "third"),
            RouteDefaults::BUILTIN.route("/ws", "fourth"),
        ]);
        assert_eq!(
            t.find("/rooms/1")
                .map(|m| m.route.service.clone())
                .as_deref(),
            Some("first")
        );
        assert_eq!(
            t.find("/ws").map(|m| m.route.service.clone()).as_deref(),
            Some("third")
        );
        let services: Vec<&str> = t.routes().iter().map(|r| r.service.as_str()).collect();
        assert_eq!(services, ["first", "second", "third", "fourth"]);
        assert_eq!(
            t.get("/rooms/{name}").map(|r| r.service.as_str()),
            Some("second")
        );
    }

    #[test]
    fn invalid_pattern_in_hand_built_table_matches_only_exactly() {
        let t = table(&["/a b/{x"]);
        assert!(t.find("/a b/{x").is_some());
        assert!(t.find("/a b/y").is_none());
    }

    #[test]
    fn did_you_mean() {
        let t = table(&[
            "/ws/vision",
            "/ws/voice",
            "/ws/automation",
            "/ws",
            "/rooms/{id}",
            "/api/*",
        ]);
        let long = format!("/ws/{}", "v".repeat(MAX_SUGGESTION_INPUT));
        let cases: &[(&str, Option<&str>)] = &[
            ("/ws/visoin", Some("/ws/vision")),
            ("/ws/vision/", Some("/ws/vision")),
            ("/WS/VISION", Some("/ws/vision")),
            ("/ws/voise", Some("/ws/voice")),
            ("/ws/automaton", Some("/ws/automation")),
            ("/ws/", Some("/ws")),
            ("/room/42", Some("/rooms/{id}")),
            ("/api", Some("/api/*")),
            ("/apo/deep/path", Some("/api/*")),
            ("/completely/unrelated/path", None),
            ("/x", None),
            ("", None),
            (&long, None),
        ];
        for (path, want) in cases {
            assert_eq!(
                t.did_you_mean(path).as_deref(),
                *want,
                "suggestion for {path:?}"
            );
        }
    }

    #[test]
    fn pattern_shapes_and_errors() {
        for (path, shape) in [
            ("/", "/"),
            ("/*", "/*"),
            ("/ws", "/ws"),
            ("/rooms/{id}", "/rooms/{}"),
            ("/a/{x}/b/*", "/a/{}/b/*"),
        ] {
            let pattern = Pattern::parse(path).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(pattern.shape(), shape, "{path}");
        }
        for (path, needle) in [
            ("", "must not be empty"),
            ("ws", "must start with `/`"),
            ("/a b", "whitespace"),
            ("/a?b=1", "`?`"),
            ("/a#b", "`#`"),
            ("/caf\u{e9}", "ASCII"),
            ("/ws/", "must not end with `/`"),
            ("/a//b", "empty segments"),
            ("/a*", "`*`"),
            ("/a/*/b", "`*`"),
            ("/a/x*", "`*`"),
            ("/a/x{id}", "whole segment"),
            ("/a/{id", "whole segment"),
            ("/a/{{id}}", "whole segment"),
            ("/a/{1d}", "identifier"),
            ("/a/{}", "identifier"),
            ("/a/{id}/{id}", "more than once"),
        ] {
            let err = Pattern::parse(path).expect_err(path);
            assert_eq!(err.0.len(), 1, "{path}: {err}");
            assert!(err.0[0].contains(needle), "{path}: {err}");
        }
    }
}
