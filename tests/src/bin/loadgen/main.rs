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
//! - `open`: the connections send at a fixed total rate (`--rate`) on one
//!   schedule, whatever the replies do. Latency counts from each message's
//!   slot in the schedule, so a stalled server shows up as latency instead of
//!   being hidden by a slower sender (coordinated omission). The slots are
//!   released by a pacer thread that wakes within microseconds; what lag is
//!   left is reported apart (`send_lag_us`), and `service_latency_us` counts
//!   from the write. The run ends as soon as every reply is in, at the latest
//!   `--grace` after the window: replies still outstanding then are reported
//!   as `in_flight_at_end`, not as errors; a reply missing for `--timeout` is
//!   an error. See [`schedule`] and [`open_loop`].
//! - `idle`: opens C connections (in stages, e.g. `--stages 10000,19000`),
//!   holds them, and samples the RSS of watched processes at each stage:
//!   bytes per idle connection. Connections that fail (a server at its cap
//!   refuses some) are counted by error message (`failed_by_error`).
//! - `fanout`: C connections subscribe to `--topic` (spread over the URLs
//!   of a comma-separated `--url`), then receive a publisher's fixed-rate
//!   publications: deliveries/s, publish-to-receive latency, and every
//!   missing, duplicate or out-of-order delivery per subscriber, in all
//!   and per URL (`by_url`). See [`fanout`].
//!
//! # Protocols
//! - `json`: the router's client protocol. Each request is
//!   `{"type":"echo","id":N,"data":"xxx…"}` and is complete when a frame with
//!   the same `id` and `done: true` arrives; an `error` frame counts as an
//!   error. The welcome frame is read after connecting.
//! - `raw`: the same bytes are sent as a text frame and the echoed frame is
//!   expected back unchanged, in order (a raw route or the baseline).
//!
//! # TLS
//! A `wss://` URL connects through TLS (tokio-rustls, ring) trusting the CA
//! in `--tls-ca`; the certificate is checked against `--tls-server-name`,
//! else the URL's host. Every connection does a full handshake (no session
//! resumption). See [`target`].
//!
//! Client sockets are bound to 127.0.0.k (k = 1..=`--sources`) before
//! connecting, so many thousands of connections to one server port do not
//! run out of ephemeral ports of a single source address.
//!
//! `--watch NAME=PID` (repeatable) adds each process's CPU use during the
//! measured window (in cores: 1.0 = one core busy) and its RSS to the
//! summary ([`procstat`]).
//!
//! # Layout
//! - this file: the command line, connecting, the closed loop, idle mode,
//!   and the run that ties them together into the summary;
//! - [`requests`]: the request frames and how replies are matched to them;
//! - [`schedule`]: the open loop's schedule and its pacer;
//! - [`open_loop`]: one open-loop connection (its bookkeeping and driver);
//! - [`fanout`]: the fan-out mode (subscribers, sequence checks);
//! - [`stats`]: the measured window, per-connection outcomes, percentiles;
//! - [`procstat`]: CPU and memory of watched processes;
//! - [`target`]: the URL, the address, and TLS for `wss://`.

mod fanout;
mod open_loop;
mod procstat;
mod requests;
mod schedule;
mod stats;
mod target;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use clap::{Parser, ValueEnum};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpSocket;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::open_loop::Plan;
use crate::procstat::{cpu_json, parse_watch, Watch, Watched};
use crate::requests::{request_text, Matched, Pending, Stamp};
use crate::schedule::{pace_on_thread, pace_with_timer, Gate, Pacer, PacerKind, Schedule};
use crate::stats::{percentiles, round3, Clock, ConnStats};
use crate::target::{Stream, Target};

type Ws = WebSocketStream<Stream>;
type WsTx = SplitSink<Ws, Message>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Closed,
    Open,
    Idle,
    Fanout,
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
    /// WebSocket URL, e.g. ws://127.0.0.1:8001/ws or wss://localhost:8001/ws
    /// (a name is resolved once, IPv4 first). Fanout mode: a comma-separated
    /// list, the subscribers spread round-robin over it.
    #[arg(long)]
    url: String,
    /// wss:// only: PEM file with the CA certificate(s) to trust.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// wss:// only: the name the server's certificate must carry (default:
    /// the URL's host).
    #[arg(long)]
    tls_server_name: Option<String>,
    /// Client protocol spoken on the connections.
    #[arg(long, value_enum, default_value = "json")]
    protocol: Protocol,
    /// Connections (closed and open modes).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Requests in flight per connection (closed mode).
    #[arg(long, default_value_t = 1)]
    depth: usize,
    /// Total target rate in messages per second (open mode); fanout mode:
    /// the publisher's publications per second.
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
    /// Spread client sockets over source addresses 127.0.0.1..=127.0.0.K (0, or an IPv6 target: let the kernel pick).
    #[arg(long, default_value_t = 16)]
    sources: u8,
    /// Handshakes in progress at once while opening connections.
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    /// Bound on one connect or on waiting for one reply, in seconds: a broken
    /// run fails instead of hanging.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Open mode: after the window, wait at most this long for the replies
    /// still outstanding, in seconds; those that have not come by then are
    /// reported as `in_flight_at_end`, not as errors.
    #[arg(long, default_value_t = 2.0)]
    grace: f64,
    /// Open mode: what wakes the sender for each slot of the schedule.
    #[arg(long, value_enum, default_value = "thread")]
    pacer: PacerKind,
    /// Process to report CPU and RSS of, as NAME=PID (repeatable).
    #[arg(long = "watch", value_parser = parse_watch)]
    watch: Vec<Watched>,
    /// Fanout mode: the topic to subscribe to.
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Fanout mode: file to write one line to once every subscriber is
    /// acknowledged (the driver starts the publisher then).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Free-form label copied into the summary.
    #[arg(long, default_value = "")]
    label: String,
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
    if args.mode == Mode::Fanout {
        if args.connections == 0 {
            bail!("--connections must be at least 1");
        }
        return fanout::run(&args).await;
    }
    let target = Target::new(
        &args.url,
        args.tls_ca.as_deref(),
        args.tls_server_name.as_deref(),
    )
    .await?;
    if args.connections == 0 || args.depth == 0 {
        bail!("--connections and --depth must be at least 1");
    }
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        bail!("--timeout must be a positive number of seconds");
    }
    if !(args.grace.is_finite() && args.grace >= 0.0) {
        bail!("--grace must be a number of seconds, at least 0");
    }
    match args.mode {
        Mode::Closed | Mode::Open => load(&args, &target).await,
        Mode::Idle => idle(&args, &target).await,
        // Handled before the single target is parsed (its --url is a list).
        Mode::Fanout => fanout::run(&args).await,
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// Opens connection number `k` from source address 127.0.0.(1 + k mod sources).
async fn connect(args: &Args, target: &Target, k: usize) -> anyhow::Result<Ws> {
    let attempt = async {
        let socket = if target.addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if args.sources > 0 && target.addr.is_ipv4() {
            let host = 1 + (k % usize::from(args.sources)) as u8;
            socket.bind(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)),
                0,
            ))?;
        }
        let tcp = socket.connect(target.addr).await?;
        tcp.set_nodelay(true)?;
        let stream = match &target.tls {
            None => Stream::Plain(tcp),
            Some(tls) => tls.wrap(tcp).await.context("TLS handshake")?,
        };
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

async fn send_request(tx: &mut WsTx, id: u64, data: &str) -> anyhow::Result<usize> {
    let text = request_text(id, data);
    let len = text.len();
    tx.send(Message::Text(text.into())).await?;
    Ok(len)
}

/// Closed loop on one connection: keeps `depth` requests in flight until
/// the window ends, then waits for the stragglers and closes.
async fn closed_conn(ws: Ws, args: Arc<Args>, clock: Clock, data: Arc<str>) -> ConnStats {
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
    while !pending.is_empty() {
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
    let clock = Clock {
        from: start + secs(args.warmup),
        to: start + secs(args.warmup + args.duration),
    };
    let data: Arc<str> = "x".repeat(args.size).into();
    let n = conns.len();
    let mut pacer_thread = None;
    let tasks: Vec<_> = if args.mode == Mode::Open {
        let schedule =
            Arc::new(Schedule::new(start, args.rate, n, clock.to).map_err(|e| anyhow!(e))?);
        let gates: Arc<[Gate]> = (0..n).map(|_| Gate::default()).collect();
        let pacer = Pacer::new(schedule.clone(), gates.clone());
        match args.pacer {
            PacerKind::Thread => {
                pacer_thread =
                    Some(pace_on_thread(pacer).context("cannot start the pacer thread")?);
            }
            PacerKind::Timer => {
                tokio::spawn(pace_with_timer(pacer));
            }
        }
        conns
            .into_iter()
            .enumerate()
            .map(|(conn, ws)| {
                let (tx, rx) = ws.split();
                let plan = Plan {
                    conn,
                    schedule: schedule.clone(),
                    gates: gates.clone(),
                    clock,
                    grace: secs(args.grace),
                    reply_timeout: secs(args.timeout),
                    protocol: args.protocol,
                    data: data.clone(),
                };
                tokio::spawn(open_loop::run_connection(tx, rx, plan))
            })
            .collect()
    } else {
        let shared = Arc::new(args.clone());
        conns
            .into_iter()
            .map(|ws| tokio::spawn(closed_conn(ws, shared.clone(), clock, data.clone())))
            .collect()
    };

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
            Ok(s) => all.merge(s),
            Err(_) => failed_tasks += 1,
        }
    }
    // From the start of the load until the last connection ended: at most
    // warmup + duration + grace in open mode (plus closing).
    let run_s = start.elapsed().as_secs_f64();
    if let Some(thread) = pacer_thread {
        // It ended with the schedule's last slot, before the window did.
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    if let Some(e) = &all.first_error {
        eprintln!("loadgen: {} errors; first: {e}", all.errors);
    }
    if all.in_flight_at_end > 0 {
        eprintln!(
            "loadgen: {} requests still in flight {} s after the window",
            all.in_flight_at_end, args.grace
        );
    }
    let completed = all.latencies.len();
    let window = args.duration;
    let open = args.mode == Mode::Open;
    let ok = all.errors == 0 && failed_tasks == 0 && completed > 0;
    let when_open = |v: Value| if open { v } else { Value::Null };
    Ok(json!({
        "ok": ok,
        "label": args.label,
        "mode": mode_name(args.mode),
        "protocol": protocol_name(args.protocol),
        "url": args.url,
        "connections": n,
        "depth": if open { Value::Null } else { json!(args.depth) },
        "target_rate": when_open(json!(args.rate)),
        "pacer": when_open(json!(pacer_name(args.pacer))),
        "size": args.size,
        "warmup_s": args.warmup,
        "duration_s": window,
        "grace_s": when_open(json!(args.grace)),
        "connect_s": round3(connect_s),
        "run_s": round3(run_s),
        "scheduled": when_open(json!(all.scheduled)),
        "sent": all.sent,
        "completed": completed,
        "errors": all.errors,
        "first_error": all.first_error,
        "in_flight_at_end": when_open(json!(all.in_flight_at_end)),
        "throughput_msgs_per_s": round3(completed as f64 / window),
        // Closed loop: from the write. Open loop: from the message's slot in
        // the schedule (coordinated omission corrected).
        "latency_us": percentiles(&mut all.latencies),
        // Open loop: the same round trips from the write, and how late the
        // writes started after their slots (the tool's own lag, plus writes
        // the server did not take at once).
        "service_latency_us": percentiles(&mut all.service),
        "send_lag_us": percentiles(&mut all.lag),
        "cpu_cores": cpu_json(&before, &after, window),
        "rss_kib": rss,
    }))
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Closed => "closed",
        Mode::Open => "open",
        Mode::Idle => "idle",
        Mode::Fanout => "fanout",
    }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Json => "json",
        Protocol::Raw => "raw",
    }
}

fn pacer_name(p: PacerKind) -> &'static str {
    match p {
        PacerKind::Thread => "thread",
        PacerKind::Timer => "timer",
    }
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
        "failed_by_error": count_by_error(&failures),
        "dropped": still_dropped,
        "stages": stages,
        "bytes_per_connection": per_conn,
    }))
}

/// How many connections failed with each error (at most the 10 most
/// frequent messages; a server at its cap refuses some, and other failures
/// must not hide behind the first error).
fn count_by_error(failures: &[String]) -> Value {
    let mut counts = std::collections::HashMap::<&str, u64>::new();
    for f in failures {
        *counts.entry(f.as_str()).or_default() += 1;
    }
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    counts
        .into_iter()
        .take(10)
        .map(|(e, n)| (e.to_owned(), json!(n)))
        .collect::<serde_json::Map<_, _>>()
        .into()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_counted_by_error() {
        let f = |s: &str| s.to_owned();
        let failures = [f("503"), f("reset"), f("503"), f("timeout"), f("503")];
        assert_eq!(
            count_by_error(&failures),
            json!({ "503": 3, "reset": 1, "timeout": 1 })
        );
        assert_eq!(count_by_error(&[]), json!({}));
    }

    #[test]
    fn tls_flags_parse() {
        let args = Args::try_parse_from([
            "loadgen",
            "--url",
            "wss://127.0.0.1:1/ws",
            "--tls-ca",
            "ca.pem",
            "--tls-server-name",
            "localhost",
        ])
        .unwrap();
        assert_eq!(args.tls_ca.as_deref(), Some(std::path::Path::new("ca.pem")));
        assert_eq!(args.tls_server_name.as_deref(), Some("localhost"));
    }

    #[test]
    fn open_mode_flags_parse() {
        let args = Args::try_parse_from([
            "loadgen",
            "--mode",
            "open",
            "--url",
            "ws://127.0.0.1:1/",
            "--grace",
            "0.5",
            "--pacer",
            "timer",
        ])
        .unwrap();
        assert_eq!(
            (args.mode, args.grace, args.pacer),
            (Mode::Open, 0.5, PacerKind::Timer)
        );
        let defaults = Args::try_parse_from(["loadgen", "--url", "ws://127.0.0.1:1/"]).unwrap();
        assert_eq!((defaults.grace, defaults.pacer), (2.0, PacerKind::Thread));
    }
}
