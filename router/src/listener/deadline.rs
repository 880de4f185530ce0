//! The handshake deadline every accepted connection carries.
//!
//! axum does not time out connections that never send a request, so a
//! client (or an attack) could hold sockets open forever without upgrading.
//! Each accepted socket is wrapped in [`DeadlineIo`]: reads and writes fail
//! with `TimedOut` once its deadline passes. Every HTTP request that reaches
//! the router pushes the deadline one handshake timeout further (so keep-alive
//! clients polling `/health` are fine); a successful WebSocket upgrade
//! disarms it for good. A connection that never completes a request is
//! therefore closed within the timeout, or earlier when the listener needs
//! its descriptor for a newer one ([`Deadline::expire`], `tracker`).

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    extract::{ConnectInfo, Request, State},
    middleware::Next,
    response::Response,
};
use futures_util::task::AtomicWaker;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::{Instant, Sleep},
};

use super::{tracker::Tracker, PeerInfo};
use crate::state::AppState;

const DISARMED: u64 = u64::MAX;

const EXPIRED: u64 = 0;

/// A connection's deadline, in milliseconds since the listener started.
#[derive(Debug)]
pub struct Deadline {
    epoch: Instant,
    until_ms: AtomicU64,
    /// The connection's task, woken when the deadline is expired early.
    waker: AtomicWaker,
    /// Where the connection is counted, and its id there.
    tracker: Arc<Tracker>,
    id: u64,
}

impl Deadline {
    pub(super) fn new(epoch: Instant, timeout: Duration, tracker: Arc<Tracker>, id: u64) -> Self {
        Self {
            until_ms: AtomicU64::new(Self::ms_from_now(epoch, timeout)),
            epoch,
            waker: AtomicWaker::new(),
            tracker,
            id,
        }
    }

    fn ms_from_now(epoch: Instant, timeout: Duration) -> u64 {
        // At least 1: 0 means expired.
        ((epoch.elapsed() + timeout).as_millis() as u64).max(1)
    }

    /// Pushes the deadline to `timeout` from now (unless disarmed or
    /// expired: an expired connection stays expired).
    pub fn extend(&self, timeout: Duration) {
        let until = Self::ms_from_now(self.epoch, timeout);
        let _ = self
            .until_ms
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur != DISARMED && cur != EXPIRED).then_some(until)
            });
    }

    /// The connection upgraded: no deadline any more, and it is a session
    /// now rather than a pending connection.
    pub fn disarm(&self) {
        self.until_ms.store(DISARMED, Ordering::Release);
        // The waker is the HTTP connection's task, which ends with the
        // upgrade: a waker kept here would keep that task's memory
        // allocated for as long as the session lives.
        drop(self.waker.take());
        self.tracker.upgraded(self.id);
    }

    /// Ends the connection now (unless it has upgraded): its next read or
    /// write fails, and its task is woken to find out.
    pub(super) fn expire(&self) {
        let expired = self
            .until_ms
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur != DISARMED).then_some(EXPIRED)
            })
            .is_ok();
        if expired {
            self.waker.wake();
        }
    }

    pub(super) fn until(&self) -> Option<Instant> {
        match self.until_ms.load(Ordering::Acquire) {
            DISARMED => None,
            ms => Some(self.epoch + Duration::from_millis(ms)),
        }
    }
}

/// A socket that fails once its deadline passes.
pub struct DeadlineIo {
    inner: TcpStream,
    deadline: Arc<Deadline>,
    /// Wakes the task at the deadline; made on the first check, dropped
    /// once the connection upgrades (it would hold the HTTP connection
    /// task's waker, and its own memory, for the session's lifetime).
    timer: Option<Pin<Box<Sleep>>>,
}

impl Drop for DeadlineIo {
    fn drop(&mut self) {
        self.deadline.tracker.closed(self.deadline.id);
    }
}

impl DeadlineIo {
    pub(super) fn new(inner: TcpStream, deadline: Arc<Deadline>) -> Self {
        Self {
            inner,
            deadline,
            timer: None,
        }
    }

    /// `Ready(Err)` once the deadline has passed; otherwise arms the timer
    /// so the task wakes up at the deadline even if the peer stays silent.
    fn check(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.deadline.until().is_none() {
            // Upgraded: no deadline, and no waker to keep up to date.
            self.timer = None;
            return Poll::Pending;
        }
        // Registered before the check, so an `expire` in between is seen.
        self.deadline.waker.register(cx.waker());
        let Some(until) = self.deadline.until() else {
            // Disarmed in between: take back the waker just registered.
            drop(self.deadline.waker.take());
            self.timer = None;
            return Poll::Pending;
        };
        if Instant::now() >= until {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no request or upgrade before the handshake deadline",
            )));
        }
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
        if timer.deadline() != until {
            timer.as_mut().reset(until);
        }
        match timer.as_mut().poll(cx) {
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
        let d = Deadline::new(
            epoch,
            Duration::from_secs(10),
            Tracker::new(10, Arc::new(crate::metrics::Metrics::new())),
            0,
        );
        assert_eq!(d.until(), Some(epoch + Duration::from_secs(10)));
        tokio::time::advance(Duration::from_secs(5)).await;
        d.extend(Duration::from_secs(10));
        assert_eq!(d.until(), Some(epoch + Duration::from_secs(15)));
        d.disarm();
        d.extend(Duration::from_secs(10));
        assert_eq!(d.until(), None, "an upgraded connection stays disarmed");
    }

    /// Defect: the deadline kept the HTTP connection task's waker after the
    /// upgrade, and with it that finished task's memory, for the whole
    /// session.
    #[tokio::test]
    async fn an_upgrade_lets_go_of_the_connection_tasks_waker() {
        struct Task;
        impl futures_util::task::ArcWake for Task {
            fn wake_by_ref(_: &Arc<Self>) {}
        }
        let d = Deadline::new(
            Instant::now(),
            Duration::from_secs(10),
            Tracker::new(10, Arc::new(crate::metrics::Metrics::new())),
            0,
        );
        let task = Arc::new(Task);
        d.waker.register(&futures_util::task::waker(task.clone()));
        assert_eq!(Arc::strong_count(&task), 2);
        d.disarm();
        assert_eq!(Arc::strong_count(&task), 1, "the waker is dropped");
    }
}
