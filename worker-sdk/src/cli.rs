//! Bootstrap for worker binaries (the examples use it): the common flags,
//! logging to stderr, the `registered` line on stdout, and a graceful stop
//! on SIGTERM/SIGINT.
//!
//! A worker binary then only describes its handlers:
//!
//! ```no_run
//! use std::process::ExitCode;
//! use worker_sdk::cli::{self, Example};
//!
//! fn main() -> ExitCode {
//!     cli::run(
//!         Example { name: "my_worker", about: "Says hello", services: &["hello"] },
//!         |builder, _args| builder.on_request("hi", |_ctx, _data| async { Ok(serde_json::json!("hello")) }),
//!     )
//! }
//! ```
//!
//! Standard output carries exactly one line, printed when a router first
//! welcomes the worker: `{"event":"registered","worker_id":...,"services":[...]}`.
//! Scripts and tests wait for it instead of sleeping. Everything else is
//! logged on standard error (`RUST_LOG`, default `info`).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches, Parser};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use crate::config::{
    DEFAULT_BRIDGE_ENDPOINT, DEFAULT_CAPACITY, DEFAULT_PUBLISH_ENDPOINT, ENV_BRIDGE_ENDPOINT,
    ENV_PUBLISH_ENDPOINT,
};
use crate::signal::ShutdownSignals;
use crate::worker::{Worker, WorkerBuilder};

/// The flags every worker binary accepts.
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// ZeroMQ endpoint of the router's bridge (its ROUTER socket), or a
    /// comma-separated list of several routers' endpoints: the worker then
    /// serves every one of them, with one session each.
    #[arg(long, env = ENV_BRIDGE_ENDPOINT, default_value = DEFAULT_BRIDGE_ENDPOINT)]
    pub bridge_endpoint: String,
    /// ZeroMQ endpoint of the router's publication SUB socket (one router;
    /// the SDK publishes over the bridge sessions instead).
    #[arg(long, env = ENV_PUBLISH_ENDPOINT, default_value = DEFAULT_PUBLISH_ENDPOINT)]
    pub publish_endpoint: String,
    /// Service to serve; repeat for several. Replaces the worker's defaults.
    #[arg(long = "service", value_name = "NAME")]
    pub services: Vec<String>,
    /// Max requests in flight (announced to the router).
    #[arg(long, default_value_t = DEFAULT_CAPACITY)]
    pub capacity: u32,
    /// Worker id for logs and `/routes` (default: `<name>-<pid>`).
    #[arg(long)]
    pub id: Option<String>,
}

impl WorkerArgs {
    /// An empty endpoint (e.g. `BRIDGE_ENDPOINT=` in a script) means the
    /// default, as it does for the SDK's own environment lookups.
    fn with_defaults(mut self) -> Self {
        if self.bridge_endpoint.trim().is_empty() {
            self.bridge_endpoint = DEFAULT_BRIDGE_ENDPOINT.to_owned();
        }
        if self.publish_endpoint.trim().is_empty() {
            self.publish_endpoint = DEFAULT_PUBLISH_ENDPOINT.to_owned();
        }
        self
    }
}

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    worker: WorkerArgs,
}

/// What a worker binary is.
#[derive(Debug, Clone, Copy)]
pub struct Example {
    /// Binary name, for `--help` and the default worker id.
    pub name: &'static str,
    /// One-line description for `--help`.
    pub about: &'static str,
    /// Services served when no `--service` is given.
    pub services: &'static [&'static str],
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`). Call once.
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A second initialisation (tests) is harmless; ignore its error.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Parses the flags, builds the worker with `configure`, and runs it until
/// SIGTERM/SIGINT. Exit code 0 after a graceful stop, 1 when the router
/// refuses the worker, 2 for bad flags or configuration. A second signal
/// during the stop exits at once with 130.
pub fn run<F>(example: Example, configure: F) -> ExitCode
where
    F: FnOnce(WorkerBuilder, &WorkerArgs) -> WorkerBuilder,
{
    let command = Cli::command().name(example.name).about(example.about);
    let args = match Cli::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli.worker.with_defaults(),
        Err(e) => e.exit(),
    };
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(example, args, configure))
}

async fn serve<F>(example: Example, args: WorkerArgs, configure: F) -> ExitCode
where
    F: FnOnce(WorkerBuilder, &WorkerArgs) -> WorkerBuilder,
{
    let services: Vec<String> = if args.services.is_empty() {
        example.services.iter().map(|s| (*s).to_owned()).collect()
    } else {
        args.services.clone()
    };
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("{}-{}", example.name, std::process::id()));
    let builder = Worker::builder()
        .endpoint(&args.bridge_endpoint)
        .services(services)
        .capacity(args.capacity)
        .worker_id(id);
    let worker = match configure(builder, &args).build() {
        Ok(w) => w,
        Err(e) => {
            error!(error = %e, "cannot start the worker");
            return ExitCode::from(2);
        }
    };
    let mut signals = match ShutdownSignals::new() {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot listen for shutdown signals");
            return ExitCode::FAILURE;
        }
    };

    let handle = worker.handle();
    info!(
        worker.id = handle.worker_id(),
        services = ?handle.services(),
        endpoint = %args.bridge_endpoint,
        "starting {}", example.name
    );
    let announcer = {
        let handle = handle.clone();
        tokio::spawn(async move {
            if handle.wait_registered().await.is_ok() {
                print_registered(handle.worker_id(), handle.services());
            }
        })
    };

    let result = worker
        .run_until(async move {
            let name = signals.recv().await;
            info!(
                signal = name,
                "stopping gracefully (send it again to exit at once)"
            );
            tokio::spawn(async move {
                let name = signals.recv().await;
                warn!(signal = name, "second signal: exiting without finishing");
                std::process::exit(130);
            });
        })
        .await;
    announcer.abort();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "worker failed");
            ExitCode::FAILURE
        }
    }
}

/// The one stdout line, flushed at once: readers wait on it.
fn print_registered(worker_id: &str, services: &[String]) {
    let line = serde_json::json!({
        "event": "registered",
        "worker_id": worker_id,
        "services": services,
    });
    let mut out = std::io::stdout().lock();
    // A closed stdout (reader gone) must not kill the worker.
    if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
        warn!("cannot write the registered line to stdout");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> WorkerArgs {
        Cli::try_parse_from(std::iter::once("w").chain(args.iter().copied()))
            .unwrap()
            .worker
    }

    #[test]
    fn flags() {
        let a = parse(&[
            "--bridge-endpoint",
            "tcp://127.0.0.1:1",
            "--service",
            "a",
            "--service",
            "b",
            "--capacity",
            "4",
            "--id",
            "x",
        ]);
        assert_eq!(a.bridge_endpoint, "tcp://127.0.0.1:1");
        assert_eq!(a.services, ["a", "b"]);
        assert_eq!(a.capacity, 4);
        assert_eq!(a.id.as_deref(), Some("x"));
    }

    #[test]
    fn an_endpoint_list_reaches_the_worker_as_given() {
        let a = parse(&["--bridge-endpoint", "ipc:///tmp/a.sock, ipc:///tmp/b.sock"]);
        let c = Worker::builder()
            .env(crate::config::EnvDefaults::default())
            .service("s")
            .endpoint(&a.bridge_endpoint)
            .config();
        assert_eq!(
            c.endpoints().unwrap(),
            ["ipc:///tmp/a.sock", "ipc:///tmp/b.sock"]
        );
    }

    #[test]
    fn empty_endpoints_mean_the_defaults() {
        let a = parse(&["--bridge-endpoint", "", "--publish-endpoint", " "]).with_defaults();
        assert_eq!(a.bridge_endpoint, DEFAULT_BRIDGE_ENDPOINT);
        assert_eq!(a.publish_endpoint, DEFAULT_PUBLISH_ENDPOINT);
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
