//! The TCP listener, with a handshake deadline on every connection.
//!
//! axum does not time out connections that never send a request, so a
//! client (or an attack) could hold sockets open forever without upgrading.
//! Each accepted socket is wrapped in [`DeadlineIo`]: reads and writes fail
//! with `TimedOut` once its deadline passes. Every HTTP request that reaches
//! the router pushes the deadline one handshake timeout further (so keep-alive
//! clients polling `/health` are fine); a successful WebSocket upgrade
//! disarms it for good. A connection that never completes a request is
//! therefore closed within the timeout.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    extract::{connect_info::Connected, ConnectInfo, Request, State},
    middleware::Next,
    response::Response,
    serve::IncomingStream,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::{Instant, Sleep},
};

use crate::state::AppState;

const DISARMED: u64 = u64::MAX;

/// A connection's deadline, in milliseconds since the listener started.
#[derive(Debug)]
pub struct Deadline {
    epoch: Instant,
    until_ms: AtomicU64,
}

impl Deadline {
    fn new(epoch: Instant, timeout: Duration) -> Self {
        let d = Self {
            epoch,
            until_ms: AtomicU64::new(0),
        };
        d.extend(timeout);
        d
    }

    /// Pushes the deadline to `timeout` from now (unless disarmed).
    pub fn extend(&self, timeout: Duration) {
        let until = (self.epoch.elapsed() + timeout).as_millis() as u64;
        let _ = self
            .until_ms
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur != DISARMED).then_some(until)
            });
    }

    /// The connection upgraded: no deadline any more.
    pub fn disarm(&self) {
        self.until_ms.store(DISARMED, Ordering::Release);
    }

    fn until(&self) -> Option<Instant> {
        match self.until_ms.load(Ordering::Acquire) {
            DISARMED => None,
            ms => Some(self.epoch + Duration::from_millis(ms)),
        }
    }
}

/// The peer address and the connection's deadline, available to handlers
/// as `ConnectInfo<PeerInfo>`.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub deadline: Arc<Deadline>,
}

/// A TCP listener whose connections carry a handshake deadline.
pub struct DeadlineListener {
    inner: TcpListener,
    epoch: Instant,
    timeout: Duration,
}

impl DeadlineListener {
    pub fn new(inner: TcpListener, timeout: Duration) -> Self {
        Self {
            inner,
            epoch: Instant::now(),
            timeout,
        }
    }
}

impl axum::serve::Listener for DeadlineListener {
    type Io = DeadlineIo;
    type Addr = PeerInfo;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let deadline = Arc::new(Deadline::new(self.epoch, self.timeout));
                    let io = DeadlineIo {
                        inner: stream,
                        deadline: deadline.clone(),
                        timer: Box::pin(tokio::time::sleep(self.timeout)),
                    };
                    return (io, PeerInfo { addr, deadline });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead
                    // of spinning; the error is the operator's to see.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(PeerInfo {
            addr: self.inner.local_addr()?,
            deadline: Arc::new(Deadline::new(self.epoch, self.timeout)),
        })
    }
}

impl Connected<IncomingStream<'_, DeadlineListener>> for PeerInfo {
    fn connect_info(stream: IncomingStream<'_, DeadlineListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// A socket that fails once its deadline passes.
pub struct DeadlineIo {
    inner: TcpStream,
    deadline: Arc<Deadline>,
    timer: Pin<Box<Sleep>>,
}

impl DeadlineIo {
    /// `Ready(Err)` once the deadline has passed; otherwise arms the timer
    /// so the task wakes up at the deadline even if the peer stays silent.
    fn check(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(until) = self.deadline.until() else {
            return Poll::Pending;
        };
        if Instant::now() >= until {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no request or upgrade before the handshake deadline",
            )));
        }
        if self.timer.deadline() != until {
            self.timer.as_mut().reset(until);
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no request or upgrade before the handshake deadline",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for DeadlineIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Poll::Ready(Err(e)) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for DeadlineIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Err(e)) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Err(e)) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Middleware: a request arrived, so the connection gets another full
/// handshake timeout (before and after the handler runs).
pub async fn extend_deadline(
    State(app): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    req: Request,
    next: Next,
) -> Response {
    let timeout = app.settings.handshake_timeout();
    peer.deadline.extend(timeout);
    let response = next.run(req).await;
    peer.deadline.extend(timeout);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn deadline_extends_and_disarms() {
        let epoch = Instant::now();
        let d = Deadline::new(epoch, Duration::from_secs(10));
        assert_eq!(d.until(), Some(epoch + Duration::from_secs(10)));
        tokio::time::advance(Duration::from_secs(5)).await;
        d.extend(Duration::from_secs(10));
        assert_eq!(d.until(), Some(epoch + Duration::from_secs(15)));
        d.disarm();
        d.extend(Duration::from_secs(10));
        assert_eq!(d.until(), None, "an upgraded connection stays disarmed");
    }
}
