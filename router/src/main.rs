//! The `router` binary: settings, logging, routes, listener, then
//! [`router::server::run`] until a signal.

use std::{io::Write, net::SocketAddr, process::ExitCode};

use clap::Parser;
use router::{capacity, config, server, settings::Settings};
use tokio::net::TcpListener;

fn main() -> ExitCode {
    let settings = Settings::parse();
    init_logging(&settings.log_format);
    match capacity::raise_descriptor_limit() {
        Ok(l) => tracing::info!(
            descriptors.initial = l.initial,
            descriptors.soft = l.soft,
            descriptors.hard = l.hard,
            "descriptor limit"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot raise the descriptor limit"),
    }
    if let Err(e) = settings.check_bridge_exposure() {
        eprintln!("router: {e}");
        return ExitCode::from(2);
    }
    let routes = match config::load_routes(&settings.routes) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "router: invalid routes file {}:\n{e}",
                settings.routes.display()
            );
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("router: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let addr = SocketAddr::new(settings.host, settings.port);
        let listener = match bind(addr) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("router: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let result = server::run(settings, routes, listener, shutdown_signal(), |l| {
            // One machine-readable line on stdout for scripts and tests.
            let line = serde_json::json!({
                "event": "listening",
                "http": l.http.to_string(),
                "tls": l.tls,
                "bridge": l.endpoints.bridge,
                "publish": l.endpoints.publish,
            });
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        })
        .await;
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("router: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// How many connections the kernel queues for accept. tokio's `bind` asks
/// for 128, which a burst of clients overflows: the kernel then drops
/// SYNs, and a health probe in the burst waits a second for its
/// retransmission. (The kernel caps it at `net.core.somaxconn`.)
const LISTEN_BACKLOG: u32 = 4096;

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits at once.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("router: cannot install signal handlers; stop it with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("signal received: draining (send it again to exit at once)");
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("router: second signal: exiting now");
        std::process::exit(130);
    });
}

fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
