//! `loadgen`: the load generator behind `scripts/bench.sh` and BENCHMARKS.md.
//!
//! It drives either the router or the no-router baseline (`baseline_echo`)
//! over real WebSocket connections and prints ONE JSON summary line on
//! stdout (progress and errors go to stderr), so scripts can parse results
//! without scraping text.
//!
//! # Modes
//! - `closed`: N connections, each keeping D requests in flight; a reply
//!   releases the next request. Measures round-trip throughput and latency.
//! - `open`: the same connections send at a fixed total rate whatever the
//!   replies do; latency is taken from each message's *intended* send time,
//!   so a stalled server shows up as latency instead of being hidden by a
//!   slower sender (coordinated omission).
//! - `idle`: opens C connections (in stages, e.g. `--stages 10000,19000`),
//!   holds them, and samples the RSS of watched processes at each stage:
//!   bytes per idle connection.
//!
//! # Protocols
//! - `json`: the router's client protocol. Each request is
//!   `{"type":"echo","id":N,"data":"xxx…"}` and is complete when a frame with
//!   the same `id` and `done: true` arrives; an `error` frame counts as an
//!   error. The welcome frame is read after connecting.
//! - `raw`: the same bytes are sent as a text frame and the echoed frame is
//!   expected back unchanged, in order (a raw route or the baseline).
//!
//! Client sockets are bound to 127.0.0.k (k = 1..=`--sources`) before
//! connecting, so many thousands of connections to one server port do not
//! run out of ephemeral ports of a single source address.
//!
//! `--watch NAME=PID` (repeatable) adds each process's CPU use during the
//! measured window (in cores: 1.0 = one core busy) and its RSS to the
//! summary; the load generator itself is always reported as `loadgen`, and
//! the whole machine's busy time as `machine` (more than the sum of the
//! others means something else was running, e.g. a build).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use clap::{Parser, ValueEnum};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;
type WsTx = SplitSink<Ws, Message>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Closed,
    Open,
    Idle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Protocol {
    Json,
    Raw,
}

/// Load generator for the router and the no-router baseline.
#[derive(Debug, Clone, Parser)]
#[command(name = "loadgen", version)]
struct Args {
    /// What to measure.
    #[arg(long, value_enum, default_value = "closed")]
    mode: Mode,
    /// WebSocket URL, e.g. ws://127.0.0.1:8001/ws (IPv4 literal host).
    #[arg(long)]
    url: String,
    /// Client protocol spoken on the connections.
    #[arg(long, value_enum, default_value = "json")]
    protocol: Protocol,
    /// Connections (closed and open modes).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Requests in flight per connection (closed mode).
    #[arg(long, default_value_t = 1)]
    depth: usize,
    /// Total target rate in messages per second (open mode).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Bytes of `data` per message (the frame adds a ~35-byte envelope).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Measured time, in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Load before the measured window starts, in seconds (not counted).
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Idle mode: connection counts to reach, in order (e.g. 10000,19000).
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    stages: Vec<usize>,
    /// Idle mode: wait after each stage before sampling RSS, in seconds.
    #[arg(long, default_value_t = 2.0)]
    settle: f64,
    /// Idle mode: hold all connections this long after the last stage, in seconds.
    #[arg(long, default_value_t = 0.0)]
    hold: f64,
    /// Spread client sockets over source addresses 127.0.0.1..=127.0.0.K (0: let the kernel pick).
    #[arg(long, default_value_t = 16)]
    sources: u8,
    /// Handshakes in progress at once while opening connections.
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    /// Bound on one connect or on waiting for one reply, in seconds: a broken
    /// run fails instead of hanging.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Process to report CPU and RSS of, as NAME=PID (repeatable).
    #[arg(long = "watch", value_parser = parse_watch)]
    watch: Vec<Watched>,
    /// Free-form label copied into the summary.
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(Debug, Clone)]
struct Watched {
    name: String,
    pid: u32,
}

fn parse_watch(s: &str) -> Result<Watched, String> {
    let (name, pid) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=PID, got {s:?}"))?;
    let pid = pid.parse().map_err(|e| format!("bad pid in {s:?}: {e}"))?;
    Ok(Watched {
        name: name.to_owned(),
        pid,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(summary) => {
            let ok = summary["ok"].as_bool().unwrap_or(false);
            println!("{summary}");
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<Value> {
    let target = Target::parse(&args.url)?;
    if args.connections == 0 || args.depth == 0 {
        bail!("--connections and --depth must be at least 1");
    }
    match args.mode {
        Mode::Closed | Mode::Open => load(&args, &target).await,
        Mode::Idle => idle(&args, &target).await,
    }
}

/// Where to connect: the socket address and the URL for the handshake.
#[derive(Debug, Clone)]
struct Target {
    url: String,
    addr: SocketAddr,
}

impl Target {
    fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| anyhow!("only ws:// URLs are supported, got {url}"))?;
        let authority = rest.split('/').next().unwrap_or(rest);
        let addr = authority
            .parse()
            .with_context(|| format!("host of {url} must be IP:PORT"))?;
        Ok(Self {
            url: url.to_owned(),
            addr,
        })
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// Opens connection number `k` from source address 127.0.0.(1 + k mod sources).
async fn connect(args: &Args, target: &Target, k: usize) -> anyhow::Result<Ws> {
    let attempt = async {
        let socket = TcpSocket::new_v4()?;
        if args.sources > 0 {
            let host = 1 + (k % usize::from(args.sources)) as u8;
            socket.bind(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)),
                0,
            ))?;
        }
        let stream = socket.connect(target.addr).await?;
        stream.set_nodelay(true)?;
        // Small read buffer: an idle client should not cost 128 KiB.
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0)
            .max_message_size(Some(64 << 20));
        let (mut ws, _) =
            tokio_tungstenite::client_async_with_config(target.url.as_str(), stream, Some(config))
                .await?;
        if args.protocol == Protocol::Json {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str())?;
                    if v["type"] != "welcome" {
                        bail!("expected a welcome frame, got type {}", v["type"]);
                    }
                }
                other => bail!("expected a welcome frame, got {other:?}"),
            }
        }
        anyhow::Ok(ws)
    };
    tokio::time::timeout(secs(args.timeout), attempt)
        .await
        .map_err(|_| anyhow!("connect timed out after {} s", args.timeout))?
}

/// Opens `count` connections numbered from `first`, `concurrency` at a time.
/// Returns the connections and the errors of those that failed.
async fn open_many(
    args: &Args,
    target: &Target,
    first: usize,
    count: usize,
) -> (Vec<Ws>, Vec<String>) {
    let results: Vec<anyhow::Result<Ws>> =
        futures_util::stream::iter((first..first + count).map(|k| connect(args, target, k)))
            .buffer_unordered(args.connect_concurrency.max(1))
            .collect()
            .await;
    let mut ok = Vec::with_capacity(count);
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(ws) => ok.push(ws),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    (ok, errors)
}

/// The measured window, shared by every connection task.
#[derive(Debug)]
struct Clock {
    start: Instant,
    from: Instant,
    to: Instant,
}

impl Clock {
    fn measuring(&self, t: Instant) -> bool {
        t >= self.from && t < self.to
    }
}

/// Messages are `{"type":"echo","id":N,"data":"xxx…"}` in both protocols, so
/// the router and the baseline move the same bytes.
fn request_text(id: u64, data: &str) -> String {
    format!(r#"{{"type":"echo","id":{id},"data":"{data}"}}"#)
}

/// What one connection saw.
#[derive(Debug, Default)]
struct ConnStats {
    /// Round trips completed inside the measured window, in nanoseconds
    /// (open loop: from the intended send time).
    latencies: Vec<u64>,
    /// Open loop only: the same round trips from the actual write.
    service: Vec<u64>,
    sent: u64,
    errors: u64,
    first_error: Option<String>,
}

impl ConnStats {
    fn error(&mut self, what: impl Into<String>) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(what.into());
        }
    }
}

/// When a request was meant to go out (open loop: its slot in the
/// schedule) and when it was actually written; equal in closed loop.
#[derive(Debug, Clone, Copy)]
struct Stamp {
    intended: Instant,
    sent: Instant,
}

impl Stamp {
    fn at(t: Instant) -> Self {
        Self {
            intended: t,
            sent: t,
        }
    }
}

/// Requests sent and not yet answered: in order for raw echo, by id for
/// JSON (a worker may answer out of order).
#[derive(Debug)]
enum Pending {
    Fifo(VecDeque<(Stamp, usize)>),
    ById(HashMap<u64, Stamp>),
}

/// The outcome of matching one received frame.
enum Matched {
    /// A request completed: when it was (meant to be) sent, and whether it failed.
    Done(Stamp, Option<String>),
    /// Not a terminal frame (a partial reply or a push): nothing to do.
    Ignore,
    /// Something that should never arrive.
    Unexpected(String),
}

impl Pending {
    fn new(protocol: Protocol) -> Self {
        match protocol {
            Protocol::Raw => Pending::Fifo(VecDeque::new()),
            Protocol::Json => Pending::ById(HashMap::new()),
        }
    }

    fn len(&self) -> usize {
        match self {
            Pending::Fifo(q) => q.len(),
            Pending::ById(m) => m.len(),
        }
    }

    fn push(&mut self, id: u64, at: Stamp, len: usize) {
        match self {
            Pending::Fifo(q) => q.push_back((at, len)),
            Pending::ById(m) => {
                m.insert(id, at);
            }
        }
    }

    fn complete(&mut self, msg: Message) -> Matched {
        match (self, msg) {
            (Pending::Fifo(q), Message::Text(t)) => match q.pop_front() {
                Some((at, len)) if len == t.len() => Matched::Done(at, None),
                Some((at, len)) => Matched::Done(
                    at,
                    Some(format!("echo of {len} bytes came back as {}", t.len())),
                ),
                None => Matched::Unexpected("a frame with nothing in flight".into()),
            },
            (Pending::ById(m), Message::Text(t)) => {
                let v: Value = match serde_json::from_str(t.as_str()) {
                    Ok(v) => v,
                    Err(e) => return Matched::Unexpected(format!("reply is not JSON: {e}")),
                };
                let Some(id) = v["id"].as_u64() else {
                    return Matched::Unexpected(format!(
                        "frame without a numeric id: type {}",
                        v["type"]
                    ));
                };
                if v["done"] != true {
                    return Matched::Ignore;
                }
                let Some(at) = m.remove(&id) else {
                    return Matched::Unexpected(format!("reply to unknown id {id}"));
                };
                let failed = (v["type"] == "error").then(|| format!("error reply: {}", v["error"]));
                Matched::Done(at, failed)
            }
            (_, Message::Ping(_) | Message::Pong(_)) => Matched::Ignore,
            (_, Message::Close(f)) => Matched::Unexpected(format!("server closed: {f:?}")),
            (_, other) => Matched::Unexpected(format!("unexpected frame: {other:?}")),
        }
    }
}

async fn send_request(tx: &mut WsTx, id: u64, data: &str) -> anyhow::Result<usize> {
    let text = request_text(id, data);
    let len = text.len();
    tx.send(Message::Text(text.into())).await?;
    Ok(len)
}

/// Closed loop on one connection: keeps `depth` requests in flight until
/// the window ends, then waits for the stragglers and closes.
async fn closed_conn(ws: Ws, args: Arc<Args>, clock: Arc<Clock>, data: Arc<str>) -> ConnStats {
    let (mut tx, mut rx) = ws.split();
    let mut stats = ConnStats::default();
    let mut pending = Pending::new(args.protocol);
    let wait = secs(args.timeout);
    let mut next_id = 0u64;
    for _ in 0..args.depth {
        // The clock starts before the write: on loopback the write
        // itself carries the frame to the server.
        let at = Instant::now();
        match send_request(&mut tx, next_id, &data).await {
            Ok(len) => pending.push(next_id, Stamp::at(at), len),
            Err(e) => {
                stats.error(format!("send failed: {e}"));
                return stats;
            }
        }
        next_id += 1;
        stats.sent += 1;
    }
    while pending.len() > 0 {
        let msg = match tokio::time::timeout(wait, rx.next()).await {
            Err(_) => {
                stats.error(format!("no reply within {} s", args.timeout));
                return stats;
            }
            Ok(None) => {
                stats.error("connection closed by the server");
                return stats;
            }
            Ok(Some(Err(e))) => {
                stats.error(format!("read failed: {e}"));
                return stats;
            }
            Ok(Some(Ok(m))) => m,
        };
        let now = Instant::now();
        match pending.complete(msg) {
            Matched::Ignore => continue,
            Matched::Unexpected(why) => {
                stats.error(why);
                return stats;
            }
            Matched::Done(at, failed) => {
                if let Some(why) = failed {
                    stats.error(why);
                } else if clock.measuring(now) {
                    stats.latencies.push((now - at.sent).as_nanos() as u64);
                }
            }
        }
        if now < clock.to {
            // The clock starts before the write: on loopback the write
            // itself carries the frame to the server.
            let at = Instant::now();
            match send_request(&mut tx, next_id, &data).await {
                Ok(len) => pending.push(next_id, Stamp::at(at), len),
                Err(e) => {
                    stats.error(format!("send failed: {e}"));
                    return stats;
                }
            }
            next_id += 1;
            stats.sent += 1;
        }
    }
    let _ = tx.send(Message::Close(None)).await;
    stats
}

/// Open loop on one connection: sends at `rate` per second on a fixed
/// schedule; a separate reader matches replies.
async fn open_conn(
    ws: Ws,
    args: Arc<Args>,
    clock: Arc<Clock>,
    data: Arc<str>,
    rate: f64,
    offset: Duration,
) -> ConnStats {
    let (mut tx, mut rx) = ws.split();
    let pending = Arc::new(Mutex::new(Pending::new(args.protocol)));
    let wait = secs(args.timeout);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let writer = {
        let pending = pending.clone();
        let clock = clock.clone();
        async move {
            let mut sent = 0u64;
            let mut due = clock.start + offset;
            while due < clock.to {
                tokio::time::sleep_until(due).await;
                let text = request_text(sent, &data);
                let len = text.len();
                // Recorded before sending so the reader always finds it.
                lock(&pending).push(
                    sent,
                    Stamp {
                        intended: due,
                        sent: Instant::now(),
                    },
                    len,
                );
                if let Err(e) = tx.send(Message::Text(text.into())).await {
                    return (sent, tx, Some(format!("send failed: {e}")));
                }
                sent += 1;
                due += interval;
            }
            (sent, tx, None)
        }
    };
    let reader = {
        let pending = pending.clone();
        let clock = clock.clone();
        async move {
            let mut stats = ConnStats::default();
            loop {
                let now = Instant::now();
                if now >= clock.to && lock(&pending).len() == 0 {
                    return stats;
                }
                // Past the window the writer is done: wait only for what is pending.
                let msg = match tokio::time::timeout(wait, rx.next()).await {
                    Err(_) => {
                        stats.error(format!("no reply within {} s", args.timeout));
                        return stats;
                    }
                    Ok(None) => {
                        stats.error("connection closed by the server");
                        return stats;
                    }
                    Ok(Some(Err(e))) => {
                        stats.error(format!("read failed: {e}"));
                        return stats;
                    }
                    Ok(Some(Ok(m))) => m,
                };
                let now = Instant::now();
                let matched = lock(&pending).complete(msg);
                match matched {
                    Matched::Ignore => {}
                    Matched::Unexpected(why) => {
                        stats.error(why);
                        return stats;
                    }
                    Matched::Done(_, Some(why)) => stats.error(why),
                    Matched::Done(at, None) => {
                        if clock.measuring(now) {
                            stats.latencies.push((now - at.intended).as_nanos() as u64);
                            stats.service.push((now - at.sent).as_nanos() as u64);
                        }
                    }
                }
            }
        }
    };
    let ((sent, mut tx, send_error), mut stats) = tokio::join!(writer, reader);
    stats.sent = sent;
    if let Some(e) = send_error {
        stats.error(e);
    }
    let _ = tx.send(Message::Close(None)).await;
    stats
}

/// Locks a mutex, recovering the data if a panicking task poisoned it: each
/// critical section is one queue operation that cannot leave it half-updated.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Closed or open loop: connect everything, run warmup + window, summarise.
async fn load(args: &Args, target: &Target) -> anyhow::Result<Value> {
    let opened_at = Instant::now();
    let (conns, errors) = open_many(args, target, 0, args.connections).await;
    if let Some(e) = errors.first() {
        bail!(
            "{} of {} connections failed; first: {e}",
            errors.len(),
            args.connections
        );
    }
    let connect_s = opened_at.elapsed().as_secs_f64();
    let start = Instant::now();
    let clock = Arc::new(Clock {
        start,
        from: start + secs(args.warmup),
        to: start + secs(args.warmup + args.duration),
    });
    let shared = Arc::new(args.clone());
    let data: Arc<str> = "x".repeat(args.size).into();
    let n = conns.len();
    let mut tasks = Vec::with_capacity(n);
    for (i, ws) in conns.into_iter().enumerate() {
        let (args, clock, data) = (shared.clone(), clock.clone(), data.clone());
        tasks.push(match args.mode {
            Mode::Open => {
                let rate = args.rate / n as f64;
                // Stagger connections across one interval so they do not all send at once.
                let offset = Duration::from_secs_f64(i as f64 / n as f64 / rate);
                tokio::spawn(open_conn(ws, args, clock, data, rate, offset))
            }
            _ => tokio::spawn(closed_conn(ws, args, clock, data)),
        });
    }

    let watch = Watch::new(&args.watch);
    tokio::time::sleep_until(clock.from).await;
    let before = watch.cpu();
    tokio::time::sleep_until(clock.to).await;
    let after = watch.cpu();
    let rss = watch.rss();

    let mut all = ConnStats::default();
    let mut failed_tasks = 0;
    for t in tasks {
        match t.await {
            Ok(s) => {
                all.latencies.extend(s.latencies);
                all.service.extend(s.service);
                all.sent += s.sent;
                all.errors += s.errors;
                if all.first_error.is_none() {
                    all.first_error = s.first_error;
                }
            }
            Err(_) => failed_tasks += 1,
        }
    }
    if let Some(e) = &all.first_error {
        eprintln!("loadgen: {} errors; first: {e}", all.errors);
    }
    let completed = all.latencies.len();
    let window = args.duration;
    let ok = all.errors == 0 && failed_tasks == 0 && completed > 0;
    Ok(json!({
        "ok": ok,
        "label": args.label,
        "mode": mode_name(args.mode),
        "protocol": protocol_name(args.protocol),
        "url": args.url,
        "connections": n,
        "depth": if args.mode == Mode::Closed { json!(args.depth) } else { Value::Null },
        "target_rate": if args.mode == Mode::Open { json!(args.rate) } else { Value::Null },
        "size": args.size,
        "warmup_s": args.warmup,
        "duration_s": window,
        "connect_s": round3(connect_s),
        "sent": all.sent,
        "completed": completed,
        "errors": all.errors,
        "first_error": all.first_error,
        "throughput_msgs_per_s": round3(completed as f64 / window),
        "latency_us": percentiles(&mut all.latencies),
        // Open loop: `latency_us` counts from each message's slot in the
        // schedule, so it includes the sender's lag (tokio timers tick every
        // millisecond, so up to ~1 ms even on an idle server); this one
        // counts from the write.
        "service_latency_us": percentiles(&mut all.service),
        "cpu_cores": cpu_json(&before, &after, window),
        "rss_kib": rss,
    }))
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Closed => "closed",
        Mode::Open => "open",
        Mode::Idle => "idle",
    }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Json => "json",
        Protocol::Raw => "raw",
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// p50/p90/p99/p99.9/max/mean in microseconds (nearest rank on the sorted samples).
fn percentiles(samples: &mut [u64]) -> Value {
    if samples.is_empty() {
        return Value::Null;
    }
    samples.sort_unstable();
    let n = samples.len();
    let at = |p: f64| {
        let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
        round3(samples[rank - 1] as f64 / 1000.0)
    };
    let mean = samples.iter().map(|&s| s as f64).sum::<f64>() / n as f64 / 1000.0;
    json!({
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "p999": at(0.999),
        "max": round3(samples[n - 1] as f64 / 1000.0),
        "mean": round3(mean),
        "samples": n,
    })
}

/// Idle connections: open them stage by stage, sample RSS after each.
async fn idle(args: &Args, target: &Target) -> anyhow::Result<Value> {
    let watch = Watch::new(&args.watch);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut holders = Vec::new();
    let mut stages = vec![json!({ "connections": 0, "rss_kib": watch.rss() })];
    let mut opened = 0usize;
    let mut failures = Vec::new();
    for &goal in &args.stages {
        if goal < opened {
            bail!("--stages must not decrease");
        }
        let began = Instant::now();
        let (conns, errors) = open_many(args, target, opened, goal - opened).await;
        let took = began.elapsed().as_secs_f64();
        opened += conns.len();
        failures.extend(errors);
        for ws in conns {
            holders.push(tokio::spawn(hold(ws, stop_rx.clone(), dropped.clone())));
        }
        eprintln!("loadgen: {opened} connections open ({took:.1} s for this stage)");
        tokio::time::sleep(secs(args.settle)).await;
        stages.push(json!({
            "connections": opened,
            "open_s": round3(took),
            "dropped": dropped.load(std::sync::atomic::Ordering::Relaxed),
            "rss_kib": watch.rss(),
        }));
        if !failures.is_empty() {
            break;
        }
    }
    tokio::time::sleep(secs(args.hold)).await;
    let still_dropped = dropped.load(std::sync::atomic::Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let closing = async {
        for h in holders {
            let _ = h.await;
        }
    };
    if tokio::time::timeout(secs(args.timeout), closing)
        .await
        .is_err()
    {
        eprintln!("loadgen: some connections did not close in time");
    }
    if let Some(e) = failures.first() {
        eprintln!("loadgen: {} connections failed; first: {e}", failures.len());
    }
    let per_conn = per_connection(&stages, &args.watch);
    Ok(json!({
        "ok": failures.is_empty() && still_dropped == 0,
        "label": args.label,
        "mode": "idle",
        "protocol": protocol_name(args.protocol),
        "url": args.url,
        "failed": failures.len(),
        "first_error": failures.first(),
        "dropped": still_dropped,
        "stages": stages,
        "bytes_per_connection": per_conn,
    }))
}

/// For each watched process and stage: (RSS at the stage - RSS at 0) / connections.
fn per_connection(stages: &[Value], watched: &[Watched]) -> Value {
    let mut out = serde_json::Map::new();
    for w in watched {
        let base = stages[0]["rss_kib"][&w.name].as_f64();
        let rows: Vec<Value> = stages[1..]
            .iter()
            .filter_map(|s| {
                let n = s["connections"].as_f64()?;
                let rss = s["rss_kib"][&w.name].as_f64()?;
                (n > 0.0).then(|| {
                    json!({
                        "connections": n as u64,
                        "bytes": base.map(|b| ((rss - b) * 1024.0 / n).round()),
                    })
                })
            })
            .collect();
        out.insert(w.name.clone(), Value::Array(rows));
    }
    Value::Object(out)
}

/// Holds one idle connection open, reading (so pings get their pongs) until
/// told to stop; counts it if the server drops it.
async fn hold(
    ws: Ws,
    mut stop: tokio::sync::watch::Receiver<bool>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
) {
    let (mut tx, mut rx) = ws.split();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            msg = rx.next() => match msg {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = tx.send(Message::Close(None)).await;
}

/// Processes whose CPU and memory the summary reports.
struct Watch {
    procs: Vec<(String, String)>,
    ticks_per_s: f64,
}

impl Watch {
    fn new(watched: &[Watched]) -> Self {
        let mut procs = vec![("loadgen".to_owned(), "self".to_owned())];
        procs.extend(watched.iter().map(|w| (w.name.clone(), w.pid.to_string())));
        Self {
            procs,
            ticks_per_s: clock_ticks_per_second(),
        }
    }

    /// CPU seconds used so far by each process (user + system).
    fn cpu(&self) -> Vec<(String, Option<f64>)> {
        self.procs
            .iter()
            .map(|(name, pid)| (name.clone(), cpu_ticks(pid).map(|t| t / self.ticks_per_s)))
            .chain(std::iter::once(("machine".to_owned(), self.machine_cpu())))
            .collect()
    }

    /// CPU seconds used by the whole machine, every process included, so
    /// a run disturbed by something else (a build) shows in the summary.
    fn machine_cpu(&self) -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().next()?.strip_prefix("cpu ")?;
        let ticks: Vec<f64> = line
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
        let busy: f64 = ticks.iter().take(8).sum::<f64>() - ticks.get(3)? - ticks.get(4)?;
        Some(busy / self.ticks_per_s)
    }

    fn rss(&self) -> Value {
        let mut out = serde_json::Map::new();
        for (name, pid) in &self.procs {
            out.insert(name.clone(), json!(rss_kib(pid)));
        }
        Value::Object(out)
    }
}

fn cpu_json(
    before: &[(String, Option<f64>)],
    after: &[(String, Option<f64>)],
    window: f64,
) -> Value {
    let mut out = serde_json::Map::new();
    for ((name, b), (_, a)) in before.iter().zip(after) {
        let v = match (b, a) {
            (Some(b), Some(a)) if window > 0.0 => json!(round3((a - b) / window)),
            _ => Value::Null,
        };
        out.insert(name.clone(), v);
    }
    Value::Object(out)
}

/// utime + stime from /proc/PID/stat, in clock ticks.
fn cpu_ticks(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it are plain.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS from /proc/PID/status, in KiB.
fn rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The kernel's clock tick (AT_CLKTCK from the auxiliary vector; 100 on
/// every Linux build in practice, which is the fallback).
fn clock_ticks_per_second() -> f64 {
    const AT_CLKTCK: u64 = 17;
    let Ok(auxv) = std::fs::read("/proc/self/auxv") else {
        return 100.0;
    };
    auxv.chunks_exact(16)
        .find_map(|pair| {
            let key = u64::from_ne_bytes(pair[..8].try_into().ok()?);
            let value = u64::from_ne_bytes(pair[8..].try_into().ok()?);
            (key == AT_CLKTCK && value > 0).then_some(value as f64)
        })
        .unwrap_or(100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut s: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let p = percentiles(&mut s);
        assert_eq!(p["p50"], 500.0);
        assert_eq!(p["p99"], 990.0);
        assert_eq!(p["p999"], 999.0);
        assert_eq!(p["max"], 1000.0);
        assert_eq!(percentiles(&mut []), Value::Null);
    }

    #[test]
    fn targets_and_watches_parse() {
        let t = Target::parse("ws://127.0.0.1:8001/ws").unwrap();
        assert_eq!(t.addr.port(), 8001);
        assert!(Target::parse("http://127.0.0.1:1/").is_err());
        assert!(Target::parse("ws://localhost:1/").is_err());
        let w = parse_watch("router=42").unwrap();
        assert_eq!((w.name.as_str(), w.pid), ("router", 42));
        assert!(parse_watch("router").is_err());
    }

    #[test]
    fn own_process_is_readable() {
        assert!(cpu_ticks("self").is_some());
        assert!(rss_kib("self").unwrap() > 0);
    }

    #[test]
    fn json_replies_match_by_id_and_errors_count() {
        let mut p = Pending::new(Protocol::Json);
        let t = Instant::now();
        p.push(1, Stamp::at(t), 0);
        p.push(2, Stamp::at(t), 0);
        let partial = Message::Text(r#"{"type":"echo","id":2,"done":false}"#.into());
        assert!(matches!(p.complete(partial), Matched::Ignore));
        let err = Message::Text(r#"{"type":"error","id":2,"done":true,"error":{}}"#.into());
        assert!(matches!(p.complete(err), Matched::Done(_, Some(_))));
        let ok = Message::Text(r#"{"type":"echo","id":1,"done":true}"#.into());
        assert!(matches!(p.complete(ok), Matched::Done(_, None)));
        let stray = Message::Text(r#"{"type":"echo","id":1,"done":true}"#.into());
        assert!(matches!(p.complete(stray), Matched::Unexpected(_)));
    }
}
