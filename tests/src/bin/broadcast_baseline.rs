//! `broadcast_baseline`: the no-router baseline of the fan-out benchmark
//! (BENCHMARKS.md, "Fan-out"; `scripts/bench.sh`, scenario `fanout`, target
//! `baseline`).
//!
//! A plain tokio-tungstenite server: each connection may send the router's
//! subscribe frame (`{"type":"subscribe","id":…,"data":{"topic":…}}`) and
//! gets the router's acknowledgement back; once `--subscribers` connections
//! have subscribed to `--topic`, the server publishes `--rate` publications
//! per second for `--duration` seconds, generated in-process on the same
//! fixed schedule as `fanout_publisher`, and every subscriber gets each one as
//! the frame the router would write: `{"type","topic","data":{"pseq","sent_ns"},"seq"}`
//! with the connection's own `seq` ([`e2e_tests::fanout`]).
//!
//! What it leaves out, and the router has: a publisher process and the ZeroMQ
//! hop, the bridge protocol's decoding, the router's hub, per-connection
//! queues bounded in bytes, resume bookkeeping, and serialising the whole
//! frame per connection (here the data is formatted once per publication and
//! only the envelope with `seq` per connection). What it shares: the shape of
//! the router's fan-out (the publication is handed to a bounded queue per
//! subscriber, in one pass over the subscribers, and each connection's task
//! writes its queue), tokio's multi-threaded runtime, tokio-tungstenite with
//! the router's socket settings (4 KiB initial read buffer, frames written at
//! once), one task per connection. A subscriber whose queue (`--queue`
//! publications) is full loses the publication, counted as `lagged`, where
//! the router would close it. Publications are made on a thread of their
//! own, as the router's come from another process, so the 10 000
//! connection tasks cannot delay the schedule.
//!
//! stdout: `{"event":"listening","http":"127.0.0.1:PORT"}` once bound,
//! `{"event":"publishing","subscribers":N}` when the first publication is
//! due, `{"event":"done","published":N,"lag_us":{…}}` after the last (lag:
//! how late each was handed to the channel after its slot). It keeps serving
//! until SIGTERM or SIGINT (exit 0), so subscribers can drain.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use e2e_tests::fanout::{data_text, frame_text, now_ns, subscribed_text, Schedule};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Plain tokio-tungstenite broadcast server (the fan-out no-router baseline).
#[derive(Debug, Clone, Parser)]
#[command(name = "broadcast_baseline", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Topic the subscribers must name.
    #[arg(long, default_value = "bench")]
    topic: String,
    /// The `type` of the frames subscribers get.
    #[arg(long, default_value = "fanout")]
    msg_type: String,
    /// Start publishing once this many connections have subscribed.
    #[arg(long, default_value_t = 1)]
    subscribers: u64,
    /// Publications per second.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 6.0)]
    duration: f64,
    /// Publications a subscriber may fall behind before it loses some.
    #[arg(long, default_value_t = 16384)]
    queue: usize,
    /// Initial read buffer per connection (the router uses 4 KiB).
    #[arg(long, default_value_t = 4096)]
    read_buffer_bytes: usize,
}

/// What the connections and the publishing thread share.
struct Shared {
    args: Args,
    /// Each subscriber's queue, in subscription order.
    subscribers: Mutex<Vec<mpsc::Sender<Arc<str>>>>,
    subscribed: AtomicU64,
    lagged: AtomicU64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("broadcast_baseline: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let schedule = match Schedule::new(args.rate, args.duration) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("broadcast_baseline: {e}");
                return ExitCode::from(2);
            }
        };
        let addr = SocketAddr::new(args.host, args.port);
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("broadcast_baseline: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let shared = Arc::new(Shared {
            args,
            subscribers: Mutex::new(Vec::new()),
            subscribed: AtomicU64::new(0),
            lagged: AtomicU64::new(0),
        });
        let publisher = shared.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("publish".into())
            .spawn(move || publish(&publisher, schedule))
        {
            eprintln!("broadcast_baseline: cannot start the publishing thread: {e}");
            return ExitCode::FAILURE;
        }
        match serve(listener, shared, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("broadcast_baseline: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn say(line: Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Locks a mutex, recovering the data if a panicking task poisoned it (a
/// push or a pass of `retain` cannot leave the list half-updated).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits for the subscribers, then publishes on the fixed schedule (on its
/// own thread: blocking sleeps are its whole job).
fn publish(shared: &Shared, schedule: Schedule) {
    let want = shared.args.subscribers;
    // Polled: the wait is for connections being opened, seconds long.
    while shared.subscribed.load(Ordering::Acquire) < want {
        std::thread::sleep(Duration::from_millis(1));
    }
    say(json!({ "event": "publishing", "subscribers": shared.subscribed.load(Ordering::Acquire) }));
    let start = Instant::now();
    let mut lags = Vec::with_capacity(schedule.count as usize);
    for k in 0..schedule.count {
        let due = start + schedule.due(k);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        lags.push(Instant::now().saturating_duration_since(due));
        let data: Arc<str> = data_text(k, now_ns()).into();
        let mut lagged = 0;
        lock(&shared.subscribers).retain(|tx| match tx.try_send(data.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                lagged += 1;
                true
            }
            // The connection ended.
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        shared.lagged.fetch_add(lagged, Ordering::Relaxed);
    }
    lags.sort_unstable();
    let us = |d: Duration| (d.as_secs_f64() * 1e6).round();
    let at = |p: f64| lags[((p * lags.len() as f64).ceil() as usize).clamp(1, lags.len()) - 1];
    say(json!({
        "event": "done",
        "published": schedule.count,
        "lagged": shared.lagged.load(Ordering::Relaxed),
        "lag_us": { "p50": us(at(0.5)), "p99": us(at(0.99)), "max": us(at(1.0)) },
    }));
}

/// Accepts connections until `shutdown` resolves.
async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    say(json!({ "event": "listening", "http": local.to_string() }));
    let config = WebSocketConfig::default()
        .read_buffer_size(shared.args.read_buffer_bytes)
        .write_buffer_size(0)
        .max_message_size(Some(1 << 20));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(connection(stream, config, shared.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, do not spin.
                    eprintln!("broadcast_baseline: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// The topic a subscribe frame names, if it is one.
fn subscribe_topic(text: &str) -> Option<String> {
    let v: Value = serde_json::from_str(text).ok()?;
    if v["type"] != "subscribe" {
        return None;
    }
    v["data"]["topic"].as_str().map(str::to_owned)
}

/// One connection: takes a subscribe, then writes every publication.
async fn connection(stream: TcpStream, config: WebSocketConfig, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let mut publications: Option<mpsc::Receiver<Arc<str>>> = None;
    let mut seq = 0u64;
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                // tungstenite answers pings and close frames itself.
                Some(Ok(Message::Text(t))) => {
                    let Some(topic) = subscribe_topic(t.as_str()) else { continue };
                    if topic != shared.args.topic || publications.is_some() {
                        continue;
                    }
                    // Subscribed before the acknowledgement is written: a
                    // publication can never slip between the two.
                    let (tx, rx) = mpsc::channel(shared.args.queue.max(1));
                    lock(&shared.subscribers).push(tx);
                    publications = Some(rx);
                    seq += 1;
                    if ws.send(Message::Text(subscribed_text(&topic).into())).await.is_err() {
                        return;
                    }
                    shared.subscribed.fetch_add(1, Ordering::AcqRel);
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            },
            data = recv(&mut publications) => match data {
                Some(data) => {
                    seq += 1;
                    let frame = frame_text(&shared.args.msg_type, &shared.args.topic, &data, seq);
                    if ws.send(Message::Text(frame.into())).await.is_err() {
                        return;
                    }
                }
                None => publications = None,
            },
        }
    }
}

/// The next publication, or never without a subscription.
async fn recv(rx: &mut Option<mpsc::Receiver<Arc<str>>>) -> Option<Arc<str>> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("broadcast_baseline: cannot install signal handlers; stop it with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use e2e_tests::fanout::subscribe_text;

    #[test]
    fn subscribe_frames_are_recognised() {
        assert_eq!(
            subscribe_topic(&subscribe_text("bench")).as_deref(),
            Some("bench")
        );
        for other in [
            r#"{"type":"ping","id":"p"}"#,
            r#"{"type":"subscribe","data":{}}"#,
            "not json",
        ] {
            assert_eq!(subscribe_topic(other), None, "{other}");
        }
    }
}
