//! A client connection with TLS: the handshake runs inside the connection's
//! own task, on its first read or write, not in the accept loop (one slow
//! client must not hold up the others). It runs over the [`DeadlineIo`],
//! so the handshake deadline covers the TLS handshake too: a client that
//! stalls mid-handshake is closed like any silent connection.

use std::{
    io,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{ready, Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::{server::TlsStream, Accept};

use super::DeadlineIo;
use crate::metrics::Metrics;

/// What the client proved with its certificate (mutual TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// The subject's distinguished name (RFC 4514), as workers see it.
    pub subject: String,
}

/// A TLS connection, handshaking until its first use completes it.
pub struct TlsIo {
    state: State,
    /// Filled once the handshake is done, if the client sent a certificate.
    client_cert: Arc<OnceLock<ClientCert>>,
    metrics: Arc<Metrics>,
}

enum State {
    Handshaking(Box<Accept<DeadlineIo>>),
    Streaming(Box<TlsStream<DeadlineIo>>),
    Failed,
}

impl TlsIo {
    pub(super) fn new(
        accept: Accept<DeadlineIo>,
        client_cert: Arc<OnceLock<ClientCert>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            state: State::Handshaking(Box::new(accept)),
            client_cert,
            metrics,
        }
    }

    /// Drives the handshake; `Ready(Ok)` once streaming.
    fn poll_handshake(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<&mut TlsStream<DeadlineIo>>> {
        if let State::Handshaking(accept) = &mut self.state {
            match ready!(Pin::new(accept.as_mut()).poll(cx)) {
                Ok(stream) => {
                    if let Some(cert) = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                    {
                        let _ = self.client_cert.set(ClientCert {
                            subject: subject_of(cert.as_ref()),
                        });
                    }
                    self.state = State::Streaming(Box::new(stream));
                }
                Err(e) => {
                    self.state = State::Failed;
                    self.metrics.tls_handshake_failed();
                    // Scanners and plain-HTTP clients on a TLS port are
                    // common: not worth more than debug.
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return Poll::Ready(Err(e));
                }
            }
        }
        match &mut self.state {
            State::Streaming(s) => Poll::Ready(Ok(s)),
            _ => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the TLS handshake failed",
            ))),
        }
    }
}

/// The subject of a DER certificate (RFC 4514), or a placeholder when it
/// does not parse (rustls verified it, so that would be a parser gap).
fn subject_of(der: &[u8]) -> String {
    use x509_cert::der::Decode;
    x509_cert::Certificate::from_der(der)
        .map(|c| c.tbs_certificate.subject.to_string())
        .unwrap_or_else(|_| "(unparsed subject)".to_owned())
}

use std::future::Future;

impl AsyncRead for TlsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let stream = ready!(this.poll_handshake(cx))?;
        Pin::new(stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let stream = ready!(this.poll_handshake(cx))?;
        Pin::new(stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().state {
            State::Streaming(s) => Pin::new(s.as_mut()).poll_flush(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().state {
            State::Streaming(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let stream = ready!(this.poll_handshake(cx))?;
        Pin::new(stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        match &self.state {
            State::Streaming(s) => s.is_write_vectored(),
            _ => false,
        }
    }
}

/// A client connection: plain TCP or TLS.
pub enum ClientIo {
    Plain(DeadlineIo),
    Tls(TlsIo),
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(io) => Pin::new(io).poll_read(cx, buf),
            ClientIo::Tls(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(io) => Pin::new(io).poll_write(cx, buf),
            ClientIo::Tls(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(io) => Pin::new(io).poll_flush(cx),
            ClientIo::Tls(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(io) => Pin::new(io).poll_shutdown(cx),
            ClientIo::Tls(io) => Pin::new(io).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            ClientIo::Tls(io) => Pin::new(io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientIo::Plain(io) => io.is_write_vectored(),
            ClientIo::Tls(io) => io.is_write_vectored(),
        }
    }
}
