//! Helpers shared by the `ops_*` end-to-end tests (issue 5: hot reload,
//! graceful drain, `/metrics`, `/stats`, dynamic routing, logs).
//!
//! - a strict OpenMetrics text parser ([`parse_openmetrics`]): the tests do
//!   not trust `/metrics` to be well formed, they prove it line by line;
//! - bounded polling ([`poll_until`]) so no test waits on a sleep;
//! - the two ways an operator edits the routes file: in place (same inode,
//!   [`write_in_place`]) and by an atomic rename ([`write_by_rename`]);
//! - upgrade attempts that report a refusal instead of panicking ([`try_upgrade`]).
//!
//! Each `ops_*.rs` test crate includes this module with `mod ops_support;` and
//! uses a part of it, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use e2e_tests::{http_get, unique, OutputLog, RouterConfig, RouterProc, WsClient, RECV_TIMEOUT};
use serde_json::Value;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite;

/// Pause between two looks of a bounded poll.
pub const POLL: Duration = Duration::from_millis(20);

/// Bound on anything the router should do "soon" on a loaded 2-core machine;
/// the tight bounds the spec promises are asserted separately, on measurements.
pub const SOON: Duration = Duration::from_secs(15);

/// A router for these tests: logs at `info` in text unless `env` says
/// otherwise (a developer's `RUST_LOG`/`LOG_FORMAT` must not hide the log
/// lines the tests wait for).
pub async fn start_router(routes_json: &str, env: &[(&str, &str)]) -> RouterProc {
    let mut cfg = RouterConfig::new(routes_json)
        .env("RUST_LOG", "info")
        .env("LOG_FORMAT", "text");
    for (k, v) in env {
        cfg = cfg.env(k, v);
    }
    RouterProc::start_with(cfg).await
}

/// Polls `look` until it returns `Ok`; `Err` carries a description of the
/// last observation, which the panic on timeout shows.
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, mut look: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match look().await {
            Ok(v) => return v,
            Err(last) => {
                if Instant::now() >= deadline {
                    panic!("{what}: not within {timeout:?}; last observation: {last}");
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits for a log line after `from` containing every one of `needles`.
pub async fn wait_log(log: &OutputLog, from: u64, needles: &[&str], timeout: Duration) -> String {
    let what = format!("a log line containing {needles:?}");
    match log
        .wait_line_after(from, &what, timeout, |l| {
            needles.iter().all(|n| l.contains(n))
        })
        .await
    {
        Ok(l) => l,
        Err(e) => panic!("{e}; log tail:\n{}", tail(log, 40)),
    }
}

/// The last `n` lines of a log, for failure messages.
pub fn tail(log: &OutputLog, n: usize) -> String {
    let lines = log.lines();
    let skip = lines.len().saturating_sub(n);
    lines[skip..].join("\n")
}

/// Rewrites the file in place: same inode, truncated then written, the way
/// `echo > file` or an editor without "safe write" does it.
pub fn write_in_place(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {} for writing: {e}", path.display()));
    f.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Replaces the file atomically, the way editors and config-management
/// tools do: write a temporary file beside it, then rename it over the file.
pub fn write_by_rename(path: &Path, text: &str) {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let tmp = dir.join(format!(".{}.tmp", unique("routes-edit")));
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| {
        let _ = std::fs::remove_file(&tmp);
        panic!(
            "cannot rename {} over {}: {e}",
            tmp.display(),
            path.display()
        )
    });
}

/// The inode of a file (to prove which kind of edit a test made).
pub fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()))
        .ino()
}

/// The outcome of one upgrade attempt.
pub enum Upgrade {
    /// Upgraded, and the welcome frame was read (boxed: a client is large).
    Accepted(Box<WsClient>),
    /// The router answered the upgrade with an HTTP error.
    Refused { status: u16, body: Value },
    /// No HTTP answer at all (connection refused or reset, timeout).
    Failed(String),
}

impl Upgrade {
    pub fn describe(&self) -> String {
        match self {
            Upgrade::Accepted(_) => "accepted".into(),
            Upgrade::Refused { status, body } => format!("HTTP {status} {body}"),
            Upgrade::Failed(e) => format!("no HTTP answer: {e}"),
        }
    }
}

/// Tries one upgrade to a non-raw route; on success reads the welcome.
pub async fn try_upgrade(url: &str) -> Upgrade {
    match WsClient::try_connect(url).await {
        Ok(mut c) => {
            let welcome = c.next_json(RECV_TIMEOUT).await;
            assert_eq!(welcome["type"], "welcome", "{url}: first frame {welcome}");
            c.welcome = Some(welcome);
            Upgrade::Accepted(Box::new(c))
        }
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_deref()
                .map(|b| {
                    serde_json::from_slice(b)
                        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(b).into_owned()))
                })
                .unwrap_or(Value::Null);
            Upgrade::Refused {
                status: resp.status().as_u16(),
                body,
            }
        }
        Err(e) => Upgrade::Failed(e.to_string()),
    }
}

/// Polls upgrades to `url` until one is accepted; returns the client and how
/// long it took from `since`.
pub async fn wait_upgrade(url: &str, since: Instant, timeout: Duration) -> (WsClient, Duration) {
    let c = poll_until(
        &format!("an accepted upgrade to {url}"),
        timeout,
        || async {
            match try_upgrade(url).await {
                Upgrade::Accepted(c) => Ok(*c),
                other => Err(other.describe()),
            }
        },
    )
    .await;
    (c, since.elapsed())
}

/// Asserts an upgrade is refused with 404 `unknown_route`.
pub async fn assert_unknown_route(url: &str) {
    match try_upgrade(url).await {
        Upgrade::Refused { status: 404, body } => {
            assert_eq!(body["error"], "unknown_route", "{url}: {body}");
        }
        other => panic!(
            "{url}: expected 404 unknown_route, got {}",
            other.describe()
        ),
    }
}

/// `GET /stats` as JSON.
pub async fn stats(addr: SocketAddr) -> Value {
    let resp = http_get(addr, "/stats")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status, 200, "GET /stats: {resp:?}");
    resp.json()
}

/// `GET /metrics`, checked (status, content type) and strictly parsed.
pub async fn scrape(addr: SocketAddr) -> Scrape {
    let resp = http_get(addr, "/metrics")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status, 200, "GET /metrics: {resp:?}");
    let ctype = resp.header("content-type").unwrap_or_default();
    assert!(
        ctype.starts_with("application/openmetrics-text") || ctype.starts_with("text/plain"),
        "GET /metrics content type {ctype:?} is neither OpenMetrics nor Prometheus text"
    );
    parse_openmetrics(&resp.body)
        .unwrap_or_else(|e| panic!("/metrics is not valid OpenMetrics text: {e}\n{}", resp.body))
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition: the families (name → type) and every sample.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Scrape {
    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
    }

    /// Sum of the samples named `name` whose labels include `labels`; 0 when
    /// there are none (a labelled counter appears at its first increment).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// The one sample with exactly these labels, if present.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
            })
            .map(|s| s.value)
    }

    /// The samples named `name` with labels including `labels`.
    pub fn all(&self, name: &str, labels: &[(&str, &str)]) -> Vec<Sample> {
        self.matching(name, labels).cloned().collect()
    }
}

const TYPES: [&str; 8] = [
    "counter",
    "gauge",
    "histogram",
    "gaugehistogram",
    "summary",
    "info",
    "stateset",
    "unknown",
];

fn valid_metric_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The sample-name suffixes a family of type `kind` may use ("" = the name itself).
fn suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "counter" => &["_total", "_created"],
        "histogram" => &["_bucket", "_count", "_sum", "_created"],
        "gaugehistogram" => &["_bucket", "_gcount", "_gsum"],
        "summary" => &["", "_count", "_sum", "_created"],
        "info" => &["_info"],
        _ => &[""],
    }
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ if !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-')) =>
        {
            s.parse::<f64>()
                .map_err(|e| format!("bad number {s:?}: {e}"))
        }
        _ => Err(format!("bad number {s:?}")),
    }
}

/// Parses `{a="x",b="y"}` at the start of `s`; returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s
        .strip_prefix('{')
        .ok_or_else(|| format!("expected `{{` in {s:?}"))?;
    if let Some(r) = rest.strip_prefix('}') {
        return Ok((labels, r));
    }
    loop {
        let eq = rest
            .find('=')
            .ok_or_else(|| format!("label without `=` in {s:?}"))?;
        let name = &rest[..eq];
        if !valid_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or_else(|| format!("label {name} value is not quoted in {s:?}"))?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("unterminated value of label {name} in {s:?}")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?} in label {name}")),
                },
                Some((_, '\n')) => return Err(format!("raw newline in label {name}")),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name} repeated in {s:?}"));
        }
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        rest = rest
            .strip_prefix(',')
            .ok_or_else(|| format!("expected `,` or `}}` after label {name} in {s:?}"))?;
    }
}

/// Parses OpenMetrics text strictly: only `# TYPE`/`# HELP`/`# UNIT` comments,
/// every sample belongs to the family declared by the `# TYPE` line just
/// before it (so families are declared and contiguous), names and labels are
/// well formed, values are numbers, no sample repeats, counters are
/// non-negative, histogram buckets are cumulative and end with `+Inf` equal
/// to `_count`, and the text ends with `# EOF`.
pub fn parse_openmetrics(text: &str) -> Result<Scrape, String> {
    let body = text
        .strip_suffix("# EOF\n")
        .or_else(|| text.strip_suffix("# EOF"))
        .ok_or("the exposition does not end with `# EOF`")?;
    let mut scrape = Scrape::default();
    let mut helped: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<(String, String)> = None;
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for (i, line) in body.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", i + 1);
        if line.is_empty() {
            return Err(at("empty line".into()));
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut parts = comment.strip_prefix(' ').unwrap_or("").splitn(3, ' ');
            let (keyword, family, rest) = (parts.next(), parts.next(), parts.next());
            let family = family
                .filter(|f| valid_metric_name(f))
                .ok_or_else(|| at("comment without a valid metric family name".into()))?;
            match keyword {
                Some("TYPE") => {
                    let kind = rest.unwrap_or("");
                    if !TYPES.contains(&kind) {
                        return Err(at(format!("unknown type {kind:?}")));
                    }
                    if scrape
                        .types
                        .insert(family.to_owned(), kind.to_owned())
                        .is_some()
                    {
                        return Err(at(format!("second # TYPE for {family}")));
                    }
                    current = Some((family.to_owned(), kind.to_owned()));
                }
                Some("HELP") => {
                    if !helped.insert(family.to_owned()) {
                        return Err(at(format!("second # HELP for {family}")));
                    }
                    if scrape.types.contains_key(family)
                        && current.as_ref().is_none_or(|(f, _)| f != family)
                    {
                        return Err(at(format!("# HELP for {family} after its samples")));
                    }
                }
                Some("UNIT") => {}
                _ => return Err(at("unknown comment (only TYPE, HELP, UNIT, EOF)".into())),
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| at("sample without a value".into()))?;
        let name = &line[..name_end];
        if !valid_metric_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let rest = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("expected one space before the value".into()))?;
        let mut fields = rest.split(' ');
        let value = parse_value(fields.next().unwrap_or("")).map_err(at)?;
        if let Some(ts) = fields.next() {
            parse_value(ts).map_err(|e| at(format!("timestamp: {e}")))?;
        }
        if fields.next().is_some() {
            return Err(at("extra fields after the timestamp".into()));
        }
        let Some((family, kind)) = &current else {
            return Err(at("sample before any # TYPE".into()));
        };
        let belongs = suffixes(kind)
            .iter()
            .any(|suf| name.strip_suffix(suf) == Some(family.as_str()));
        if !belongs {
            return Err(at(format!(
                "sample {name} is not part of the current family {family} ({kind}): \
                 undeclared, or families interleave"
            )));
        }
        if (kind == "counter" || name.ends_with("_count") || name.ends_with("_bucket"))
            && (value.is_nan() || value < 0.0)
        {
            return Err(at(format!("{name} must be a non-negative number")));
        }
        let key = format!("{name}{labels:?}");
        if !seen.insert(key) {
            return Err(at("the same sample twice".into()));
        }
        scrape.samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    check_histograms(&scrape)?;
    Ok(scrape)
}

/// Buckets of each histogram series are cumulative and end with `+Inf` == `_count`.
fn check_histograms(scrape: &Scrape) -> Result<(), String> {
    for (family, kind) in &scrape.types {
        if kind != "histogram" {
            continue;
        }
        // Series key (labels without `le`) → (le, value) in file order.
        let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for s in scrape
            .samples
            .iter()
            .filter(|s| s.name == format!("{family}_bucket"))
        {
            let le = s
                .labels
                .get("le")
                .ok_or_else(|| format!("{family}_bucket without `le`: {s:?}"))
                .and_then(|le| parse_value(le))?;
            let mut rest = s.labels.clone();
            rest.remove("le");
            series
                .entry(format!("{rest:?}"))
                .or_default()
                .push((le, s.value));
        }
        for (key, mut buckets) in series {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            if buckets.windows(2).any(|w| w[1].1 < w[0].1) {
                return Err(format!(
                    "{family}{key}: buckets are not cumulative: {buckets:?}"
                ));
            }
            let Some(&(last_le, last)) = buckets.last() else {
                continue;
            };
            if last_le != f64::INFINITY {
                return Err(format!("{family}{key}: no +Inf bucket"));
            }
            let count = scrape
                .samples
                .iter()
                .find(|s| s.name == format!("{family}_count") && format!("{:?}", s.labels) == key)
                .ok_or_else(|| format!("{family}{key}: buckets without _count"))?;
            if count.value != last {
                return Err(format!(
                    "{family}{key}: +Inf bucket {last} != _count {}",
                    count.value
                ));
            }
        }
    }
    Ok(())
}

/// Whether a JSON value holds `key: value` anywhere (log lines nest span
/// fields under `span` and `spans`).
pub fn json_has(v: &Value, key: &str, value: &str) -> bool {
    match v {
        Value::Object(m) => m
            .iter()
            .any(|(k, x)| (k == key && x.as_str() == Some(value)) || json_has(x, key, value)),
        Value::Array(a) => a.iter().any(|x| json_has(x, key, value)),
        _ => false,
    }
}

/// A directory removed with everything in it when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(unique(tag));
        std::fs::create_dir(&p).unwrap_or_else(|e| panic!("cannot create {}: {e}", p.display()));
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
