//! Ticker publisher: a backend process that is not a worker, publishing to a
//! topic through a [`Publisher`] session.
//!
//! It registers with the router over `BRIDGE_ENDPOINT` as a publisher (no
//! services, capacity 0; it proves `BRIDGE_SECRET` when challenged), prints
//! `{"event":"registered","worker_id":...,"services":[]}` on stdout, then
//! publishes `{"type": "tick", "topic": <topic>, "data": {"n", "ts_ms"}}`
//! every `--interval-ms` to the clients subscribed to `--topic`, `--count`
//! times (0: until SIGTERM/SIGINT), and exits 0 after closing the session.
//!
//! Exit status: 0 when done or stopped, 1 when the router refused it or
//! could not be reached (or a publication could not be delivered), 2 for
//! bad flags.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use serde_json::json;
use tracing::{error, info};
use worker_sdk::config::{DEFAULT_BRIDGE_ENDPOINT, ENV_BRIDGE_ENDPOINT};
use worker_sdk::signal::ShutdownSignals;
use worker_sdk::{cli, Publisher};

/// Publishes a tick to a topic at a fixed interval.
#[derive(Debug, Parser)]
#[command(name = "ticker_publisher")]
struct Args {
    /// ZeroMQ endpoint of the router's bridge (its ROUTER socket).
    #[arg(long, env = ENV_BRIDGE_ENDPOINT, default_value = DEFAULT_BRIDGE_ENDPOINT)]
    bridge_endpoint: String,
    /// Topic to publish to.
    #[arg(long, default_value = "ticks")]
    topic: String,
    /// Publications to make; 0 means until stopped.
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Time between publications, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Publisher id for the router's logs (default: `ticker_publisher-<pid>`).
    #[arg(long)]
    id: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    cli::init_logging();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let mut signals = match ShutdownSignals::new() {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot listen for shutdown signals");
            return ExitCode::FAILURE;
        }
    };
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("ticker_publisher-{}", std::process::id()));
    let endpoint = if args.bridge_endpoint.trim().is_empty() {
        DEFAULT_BRIDGE_ENDPOINT.to_owned()
    } else {
        args.bridge_endpoint.clone()
    };
    // The secret comes from BRIDGE_SECRET, as for a worker.
    let publisher = match Publisher::builder()
        .endpoint(endpoint)
        .id(&id)
        .connect()
        .await
    {
        Ok(p) => p,
        Err(e) => {
            error!(error = %e, "cannot start the publisher");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "{}",
        json!({"event": "registered", "worker_id": id, "services": []})
    );

    let mut ticks = tokio::time::interval(Duration::from_millis(args.interval_ms.max(1)));
    let mut n = 0u64;
    let code = loop {
        if args.count != 0 && n >= args.count {
            break ExitCode::SUCCESS;
        }
        tokio::select! {
            _ = ticks.tick() => {}
            name = signals.recv() => {
                info!(signal = name, "stopping");
                break ExitCode::SUCCESS;
            }
        }
        let ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        if let Err(e) = publisher
            .publish(&args.topic, "tick", json!({ "n": n, "ts_ms": ts_ms }))
            .await
        {
            error!(error = %e, "publication not delivered");
            break ExitCode::FAILURE;
        }
        n += 1;
    };
    publisher.close().await;
    info!(published = n, "publisher closed");
    code
}
