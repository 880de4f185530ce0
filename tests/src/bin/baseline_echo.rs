//! `baseline_echo`: the no-router baseline of the benchmarks (BENCHMARKS.md).
//!
//! A plain tokio-tungstenite echo server: every text or binary frame comes
//! back unchanged on the same connection, with nothing in between (no
//! routing, no ZeroMQ, no worker). `loadgen --protocol raw` measures it
//! exactly as it measures a raw route of the router, so each router figure
//! can be given as a ratio against this one.
//!
//! Like the router it listens on port 0 by default and prints one line on
//! stdout once bound: `{"event":"listening","http":"127.0.0.1:PORT"}`.
//! SIGTERM or SIGINT stops it (exit 0).
//!
//! Its WebSocket settings match the router's (4 KiB initial read buffer,
//! frames written at once), so memory per idle connection compares like for
//! like; `--read-buffer-bytes 131072` gives tungstenite's own default.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Plain tokio-tungstenite echo server (the benchmarks' no-router baseline).
#[derive(Debug, Parser)]
#[command(name = "baseline_echo", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Initial read buffer per connection (the router uses 4 KiB).
    #[arg(long, default_value_t = 4096)]
    read_buffer_bytes: usize,
    /// Largest message accepted.
    #[arg(long, default_value_t = 16 << 20)]
    max_message_bytes: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("baseline_echo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let addr = SocketAddr::new(args.host, args.port);
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("baseline_echo: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let config = WebSocketConfig::default()
            .read_buffer_size(args.read_buffer_bytes)
            .write_buffer_size(0)
            .max_message_size(Some(args.max_message_bytes))
            .max_frame_size(Some(args.max_message_bytes));
        match serve(listener, config, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("baseline_echo: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Accepts connections until `shutdown` resolves; each gets its own echo task.
async fn serve(
    listener: TcpListener,
    config: WebSocketConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "{}",
            serde_json::json!({ "event": "listening", "http": local.to_string() })
        )?;
        out.flush()?;
    }
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(echo(stream, config));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, do not spin.
                    eprintln!("baseline_echo: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Echoes one connection's data frames until it closes.
async fn echo(stream: TcpStream, config: WebSocketConfig) {
    let _ = stream.set_nodelay(true);
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        // tungstenite answers pings and close frames itself.
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            return;
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("baseline_echo: cannot install signal handlers; stop it with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
