//! `fanout_publisher`: the publishing side of the fan-out benchmark
//! (`scripts/bench.sh`, scenario `fanout`, target `router`).
//!
//! A publisher session of the Rust worker SDK ([`worker_sdk::Publisher`]):
//! a DEALER on the router's bridge endpoint that registers with no services,
//! as any backend that pushes to topics would. It publishes `--rate`
//! publications per second for `--duration` seconds to `--topic`, each with
//! data `{"pseq","sent_ns"}` ([`e2e_tests::fanout`]), on a fixed schedule,
//! then closes the session and exits 0.
//!
//! Why a publisher session, not a PUB socket or a client: the session is the
//! documented way to publish that cannot lose a publication to PUB/SUB's slow
//! joiner (PROTOCOL.md §6), so a missing delivery is the router's doing; and
//! no client request or worker hop sits in front of the fan-out, so the run
//! measures the path publication → router → every subscriber.
//!
//! stdout: `{"event":"registered",...}` once the router took the session,
//! then `{"event":"done","published":N,"lag_us":{"p50","p99","max"}}` where
//! lag is how late each publication was handed over after its slot.
//! stderr: the SDK's log (`RUST_LOG`, as for workers).
//! Exit status 1 when the router cannot be reached or a publication fails.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use clap::Parser;
use e2e_tests::fanout::{now_ns, Schedule};
use serde_json::{json, Value};
use tokio::time::Instant;
use worker_sdk::Publisher;

/// Publishes {pseq, sent_ns} to a topic at a fixed rate, then exits.
#[derive(Debug, Parser)]
#[command(name = "fanout_publisher", version)]
struct Args {
    /// The router's bridge endpoint (its `listening` line names it).
    #[arg(long, env = "BRIDGE_ENDPOINT", default_value = "tcp://127.0.0.1:5555")]
    bridge_endpoint: String,
    /// Topic to publish to.
    #[arg(long, default_value = "bench")]
    topic: String,
    /// The `type` subscribers see.
    #[arg(long, default_value = "fanout")]
    msg_type: String,
    /// Publications per second.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Seconds of publishing (rate x duration publications in all).
    #[arg(long, default_value_t = 6.0)]
    duration: f64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // The SDK's session log (reconnects, heartbeats) on stderr, as for any
    // worker: a publisher that reconnects mid-run says so and why.
    worker_sdk::cli::init_logging();
    // One thread: publishing a few hundred times a second needs no more, and
    // the benchmark's two cores belong to the router and the subscribers.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fanout_publisher: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(done) => {
            println!("{done}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fanout_publisher: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<Value> {
    let schedule = Schedule::new(args.rate, args.duration).map_err(|e| anyhow!(e))?;
    let publisher = Publisher::builder()
        .endpoint(&args.bridge_endpoint)
        .id(format!("fanout_publisher-{}", std::process::id()))
        .connect()
        .await
        .with_context(|| format!("cannot register with {}", args.bridge_endpoint))?;
    println!("{}", json!({ "event": "registered", "services": [] }));

    let start = Instant::now();
    let mut lags = Vec::with_capacity(schedule.count as usize);
    for k in 0..schedule.count {
        let due = start + schedule.due(k);
        tokio::time::sleep_until(due).await;
        lags.push(Instant::now().saturating_duration_since(due));
        let sent_ns = now_ns();
        let data = json!({ "pseq": k, "sent_ns": sent_ns });
        publisher
            .publish(&args.topic, &args.msg_type, data)
            .await
            .with_context(|| format!("publication {k} not delivered"))?;
    }
    publisher.close().await;
    lags.sort_unstable();
    let us = |d: Duration| (d.as_secs_f64() * 1e6).round();
    let at = |p: f64| lags[((p * lags.len() as f64).ceil() as usize).clamp(1, lags.len()) - 1];
    Ok(json!({
        "event": "done",
        "published": schedule.count,
        "lag_us": { "p50": us(at(0.5)), "p99": us(at(0.99)), "max": us(at(1.0)) },
    }))
}
