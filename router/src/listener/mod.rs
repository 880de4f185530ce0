//! The TCP listener of port 8001: every accepted connection carries a
//! handshake deadline ([`deadline`]) and is counted ([`tracker`]), so
//! neither silent clients nor a flood of bare TCP connections can take the
//! descriptors that health probes and real clients need.
//!
//! Accept errors (out of descriptors, mostly) are counted in the metrics
//! and logged at most once a second with the number of them, and the loop
//! backs off instead of spinning.

mod deadline;
mod tls_io;
mod tracker;

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use axum::{extract::connect_info::Connected, serve::IncomingStream};
use tokio::{net::TcpListener, time::Instant};

pub use deadline::{extend_deadline, Deadline, DeadlineIo};
pub use tls_io::{ClientCert, ClientIo, TlsIo};
pub use tracker::{Tracker, TrackerStats};

use crate::{capacity::LogThrottle, metrics::Metrics, tls::Tls};

/// The peer address and the connection's deadline, available to handlers
/// as `ConnectInfo<PeerInfo>`.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub deadline: Arc<Deadline>,
    /// Whether the connection is TLS (`https`/`wss`).
    pub tls: bool,
    /// The client's certificate, once a TLS handshake has verified one.
    pub client_cert: Arc<OnceLock<ClientCert>>,
}

/// How long the accept loop waits after an error before it tries again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A TCP listener whose connections carry a handshake deadline and are
/// counted against a budget of open connections.
pub struct DeadlineListener {
    inner: TcpListener,
    epoch: Instant,
    timeout: Duration,
    tracker: Arc<Tracker>,
    metrics: Arc<Metrics>,
    accept_errors: LogThrottle,
    tls: Option<Arc<Tls>>,
}

impl DeadlineListener {
    pub fn new(
        inner: TcpListener,
        timeout: Duration,
        tracker: Arc<Tracker>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            inner,
            epoch: Instant::now(),
            timeout,
            tracker,
            metrics,
            accept_errors: LogThrottle::new(Duration::from_secs(1)),
            tls: None,
        }
    }

    /// Serves TLS on every connection, with the configuration current at
    /// each accept.
    pub fn with_tls(mut self, tls: Option<Arc<Tls>>) -> Self {
        self.tls = tls;
        self
    }
}

impl axum::serve::Listener for DeadlineListener {
    type Io = ClientIo;
    type Addr = PeerInfo;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let (epoch, timeout) = (self.epoch, self.timeout);
                    let tracker = self.tracker.clone();
                    let (deadline, evicted) = self
                        .tracker
                        .accepted(|id| Arc::new(Deadline::new(epoch, timeout, tracker, id)));
                    if evicted {
                        // Let the expired connection's task run and give
                        // its descriptor back before the next accept: in a
                        // flood, accepting faster than evicted connections
                        // close would run the process out of descriptors.
                        tokio::task::yield_now().await;
                    }
                    let io = DeadlineIo::new(stream, deadline.clone());
                    let client_cert = Arc::new(OnceLock::new());
                    let io = match &self.tls {
                        None => ClientIo::Plain(io),
                        Some(tls) => ClientIo::Tls(TlsIo::new(
                            tls.acceptor().accept(io),
                            client_cert.clone(),
                            self.metrics.clone(),
                        )),
                    };
                    let peer = PeerInfo {
                        addr,
                        deadline,
                        tls: self.tls.is_some(),
                        client_cert,
                    };
                    return (io, peer);
                }
                Err(e) => {
                    let total = self.metrics.accept_error();
                    if let Some(skipped) = self.accept_errors.hit() {
                        tracing::warn!(
                            error = %e,
                            since_last_line = skipped,
                            total,
                            open = self.tracker.stats().open,
                            pending = self.tracker.stats().pending,
                            "accept failed (logged at most once a second)"
                        );
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        // Only the address matters here; the deadline is a placeholder that
        // no connection owns.
        Ok(PeerInfo {
            addr: self.inner.local_addr()?,
            deadline: Arc::new(Deadline::new(
                self.epoch,
                self.timeout,
                Tracker::new(1, self.metrics.clone()),
                u64::MAX,
            )),
            tls: self.tls.is_some(),
            client_cert: Arc::new(OnceLock::new()),
        })
    }
}

impl Connected<IncomingStream<'_, DeadlineListener>> for PeerInfo {
    fn connect_info(stream: IncomingStream<'_, DeadlineListener>) -> Self {
        stream.remote_addr().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    async fn listener(budget: usize) -> (DeadlineListener, SocketAddr, Arc<Tracker>) {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        let tracker = Tracker::new(budget, metrics.clone());
        let l = DeadlineListener::new(tcp, Duration::from_secs(10), tracker.clone(), metrics);
        (l, addr, tracker)
    }

    /// Reads until EOF or error; true if the server side ended the
    /// connection (it did not just stay silent).
    async fn ended_by_server(client: &mut TcpStream) -> bool {
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn over_budget_the_oldest_pending_connection_is_closed() {
        let (mut l, addr, tracker) = listener(2).await;
        let mut clients = Vec::new();
        let mut served = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            let (mut io, _peer) = l.accept().await;
            // Each server side is driven like a connection task would be:
            // it reads until its socket fails, then drops it.
            served.push(tokio::spawn(async move {
                let mut buf = [0u8; 16];
                let r = io.read(&mut buf).await;
                drop(io);
                r.map(|_| ())
            }));
        }
        // The third accept went over the budget of 2: the first connection
        // (the oldest) was expired; its read failed with TimedOut.
        let first = served.remove(0).await.unwrap();
        assert_eq!(first.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert!(ended_by_server(&mut clients[0]).await);
        let s = tracker.stats();
        assert_eq!((s.open, s.pending, s.evicted), (2, 2, 1));
        // The newer two are untouched and still served.
        for (c, task) in clients[1..].iter_mut().zip(served) {
            c.write_all(b"x").await.unwrap();
            task.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn upgraded_connections_are_never_closed_for_room() {
        let (mut l, addr, tracker) = listener(1).await;
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let (io1, peer1) = l.accept().await;
        peer1.deadline.disarm();
        let _c2 = TcpStream::connect(addr).await.unwrap();
        let (io2, peer2) = l.accept().await;
        // Over budget, but the only other connection is a session: nothing
        // to close (the session cap bounds those).
        let s = tracker.stats();
        assert_eq!((s.open, s.pending, s.evicted), (2, 1, 0));
        assert!(peer1.deadline.until().is_none());
        assert!(peer2.deadline.until().is_some());
        drop((io1, io2));
        assert_eq!(tracker.stats().open, 0);
        assert_eq!(tracker.stats().pending, 0);
    }
}

/// The same under `axum::serve`: an expired connection's task must wake up
/// and drop its socket, not only fail its next read.
#[cfg(test)]
mod served {
    use super::*;
    use tokio::{io::AsyncReadExt, net::TcpStream};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_evicted_connection_is_closed_by_the_server_at_once() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        let tracker = Tracker::new(4, metrics.clone());
        let l = DeadlineListener::new(tcp, Duration::from_secs(30), tracker.clone(), metrics);
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .into_make_service_with_connect_info::<PeerInfo>();
        tokio::spawn(async move { axum::serve(l, app).await });
        let mut clients = Vec::new();
        for _ in 0..40 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let t = Instant::now();
        let mut buf = [0u8; 8];
        for c in clients.iter_mut().take(36) {
            let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await;
            assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
        }
        eprintln!(
            "36 evicted connections closed in {:?}; {:?}",
            t.elapsed(),
            tracker.stats()
        );
        assert!(tracker.stats().open <= 4 + 1, "{:?}", tracker.stats());
    }
}
