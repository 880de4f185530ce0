//! The session's writer: the only code that writes to a client's socket.
//!
//! It stamps `seq` in send order (so the order clients see is the order of
//! the numbers), encodes outbound items into WebSocket messages, writes what
//! is queued in batches with one flush each, and runs the close handshake.
//! On routes with resume, it keeps what it sent ([`ReplayBuffer`]) until
//! the client acknowledges it, to send it again after a resume.
//! Every write gives up on a peer that stops reading, so a client that never
//! reads costs a bounded wait, not a stuck task.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::Duration,
};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures_util::{Sink, SinkExt, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{Ending, Socket};
use crate::{
    client::Outbound,
    hub::ConnShared,
    metrics::{Metrics, RouteMeter},
    resume::{Gap, KeptBudget, ReplayBuffer},
};

/// Most frames written with one flush.
const WRITE_BATCH: usize = 64;

/// How long a close handshake (or the flush before it) may take before the
/// socket is dropped.
pub(crate) const CLOSE_HANDSHAKE: Duration = Duration::from_secs(2);

/// How long [`Writer::close_now`] may take to hand its close frame over.
const CLOSE_NOW: Duration = Duration::from_millis(100);

/// The socket failed while writing: the peer is gone.
#[derive(Debug)]
pub(crate) struct Gone;

pub(crate) struct Writer {
    /// `seq` of the next JSON frame (the welcome is 0).
    seq: u64,
    shared: Arc<ConnShared>,
    /// This session's counters of frames written (route fixed for the session).
    meter: RouteMeter,
    /// How long one write may wait on a peer that does not read.
    patience: Duration,
    /// Sent JSON frames kept for a resume (`None`: resume is off).
    replay: Option<ReplayBuffer>,
    /// Fired when the session is resumed on another connection: a write
    /// stuck on this (likely dead) socket gives up at once.
    takeover: CancellationToken,
}

impl Writer {
    pub fn new(
        shared: Arc<ConnShared>,
        metrics: Arc<Metrics>,
        route: String,
        patience: Duration,
    ) -> Self {
        Self {
            seq: 0,
            shared,
            meter: RouteMeter::new(metrics, &route),
            patience,
            replay: None,
            takeover: CancellationToken::new(),
        }
    }

    /// What makes a stuck write give up because the session moved on.
    pub fn set_takeover(&mut self, takeover: CancellationToken) {
        self.takeover = takeover;
    }

    /// Keeps sent frames for a resume, within these bounds.
    pub fn keep_for_resume(
        &mut self,
        max_frames: usize,
        max_bytes: usize,
        budget: Arc<KeptBudget>,
    ) {
        self.replay = Some(ReplayBuffer::new(max_frames, max_bytes, budget));
    }

    /// The client has every frame up to `seq` (its `ack`).
    pub fn ack(&mut self, seq: u64) {
        if let Some(r) = &mut self.replay {
            r.ack(seq);
        }
    }

    /// Bytes of the frames kept for a resume.
    pub fn kept_bytes(&self) -> usize {
        self.replay.as_ref().map_or(0, ReplayBuffer::bytes)
    }

    /// The frames after `last_seq` again, with their `seq`, or the gap.
    pub fn replay_after(&self, last_seq: u64) -> Result<Vec<Message>, Gap> {
        match &self.replay {
            None => Ok(Vec::new()),
            Some(r) => Ok(r
                .after(last_seq)?
                .map(|(_, text)| Message::Text(text.clone()))
                .collect()),
        }
    }

    /// Writes a frame of the connection rather than the session (`resumed`):
    /// no `seq`, not kept.
    pub async fn write_unsequenced<S>(&mut self, socket: &mut S, text: String) -> Result<(), Gone>
    where
        S: Sink<Message> + Unpin,
    {
        self.send_or_give_up(socket, vec![Message::Text(text.into())])
            .await
    }

    /// Writes `msgs` as they are (replayed frames).
    pub async fn write_messages<S>(
        &mut self,
        socket: &mut S,
        msgs: Vec<Message>,
    ) -> Result<(), Gone>
    where
        S: Sink<Message> + Unpin,
    {
        if msgs.is_empty() {
            return Ok(());
        }
        self.send_or_give_up(socket, msgs).await
    }

    /// The WebSocket message for an outbound item; JSON frames take the
    /// next `seq`. Items taken off the queue are `dequeued` by the caller
    /// first.
    pub fn encode(&mut self, out: Outbound) -> Message {
        match out {
            Outbound::Frame(mut frame) => {
                let text = frame.to_json(self.seq);
                let error = frame.error.as_ref().map(|e| e.code.as_str());
                self.sequenced(text, &frame.msg_type, error)
            }
            Outbound::Shared(frame) => {
                let text = frame.to_json(self.seq);
                self.sequenced(text, &frame.msg_type, None)
            }
            Outbound::Binary(b) => {
                self.meter.message_out("binary", None);
                Message::Binary(b)
            }
            Outbound::Raw {
                binary: true,
                payload,
            } => {
                self.meter.message_out("raw", None);
                Message::Binary(payload)
            }
            Outbound::Raw {
                binary: false,
                payload,
            } => {
                self.meter.message_out("raw", None);
                // Checked in place; the bytes are shared, not copied.
                match Utf8Bytes::try_from(payload.clone()) {
                    Ok(text) => Message::Text(text),
                    Err(_) => {
                        debug!("worker sent a raw text frame that is not UTF-8: sent as binary");
                        Message::Binary(payload)
                    }
                }
            }
        }
    }

    /// A JSON frame's message, `text` made with the current `seq`: the
    /// frame counted, `seq` taken, the frame kept for a resume.
    fn sequenced(&mut self, text: String, msg_type: &str, error: Option<&str>) -> Message {
        let seq = self.seq;
        if seq == 0 {
            self.meter.once_out(msg_type, error);
        } else {
            self.meter.message_out(msg_type, error);
        }
        let text: Utf8Bytes = text.into();
        self.seq += 1;
        // The welcome (seq 0) is a frame of the connection: not kept.
        if let (Some(r), true) = (&mut self.replay, seq > 0) {
            r.push(seq, text.clone());
        }
        Message::Text(text)
    }

    /// Writes one item that did not come through the queue (the welcome).
    pub async fn write<S>(&mut self, socket: &mut S, out: Outbound) -> Result<(), Gone>
    where
        S: Sink<Message> + Unpin,
    {
        let msg = self.encode(out);
        self.send_or_give_up(socket, vec![msg]).await
    }

    /// Writes `first` and whatever else is already queued (up to a batch),
    /// with one flush: a stream of small frames costs one syscall per batch
    /// rather than per frame, so a reading client keeps up with a fast
    /// worker. It never waits: it writes as far as the socket takes frames
    /// at once, which is the common case, with no allocation of its own.
    /// `Ok(Some(rest))`: the socket has no room now, and
    /// [`Self::write_rest`] waits to write `rest` (empty: only the flush);
    /// the rest of the queue stays queued.
    ///
    /// The socket is polled with a waker that does nothing: a socket that
    /// is not ready is polled again by `write_rest`, with the task's waker,
    /// before the task waits.
    pub fn write_batch<S>(
        &mut self,
        socket: &mut S,
        first: Outbound,
        outbound: &mut crate::outbox::OutboxRx,
    ) -> Result<Option<Vec<Message>>, Gone>
    where
        S: Sink<Message> + Unpin,
    {
        let cx = &mut Context::from_waker(Waker::noop());
        let mut socket = Pin::new(socket);
        let mut next = Some(first);
        let mut written = 0;
        while let Some(mut out) = next.take() {
            self.shared.dequeued(&mut out);
            let msg = self.encode(out);
            match socket.as_mut().poll_ready(cx) {
                Poll::Ready(Ok(())) => socket.as_mut().start_send(msg).map_err(|_| Gone)?,
                Poll::Ready(Err(_)) => return Err(Gone),
                Poll::Pending => return Ok(Some(vec![msg])),
            }
            written += 1;
            if written < WRITE_BATCH {
                next = outbound.try_recv().ok();
            }
        }
        match socket.poll_flush(cx) {
            Poll::Ready(Ok(())) => Ok(None),
            Poll::Ready(Err(_)) => Err(Gone),
            Poll::Pending => Ok(Some(Vec::new())),
        }
    }

    /// What [`Self::write_batch`] could not write at once: written, and
    /// flushed, unless the peer stops reading.
    pub async fn write_rest<S>(&self, socket: &mut S, rest: Vec<Message>) -> Result<(), Gone>
    where
        S: Sink<Message> + Unpin,
    {
        self.send_or_give_up(socket, rest).await
    }

    /// Writes what is queued right now (before a close that is not the
    /// queue's fault: answers already admitted still reach the client).
    /// Bounded by the queue's length and [`CLOSE_HANDSHAKE`].
    pub async fn flush_queue<S>(&mut self, socket: &mut S, outbound: &mut crate::outbox::OutboxRx)
    where
        S: Sink<Message> + Unpin,
    {
        let mut msgs = Vec::new();
        while let Ok(mut out) = outbound.try_recv() {
            self.shared.dequeued(&mut out);
            msgs.push(self.encode(out));
        }
        if !msgs.is_empty() {
            let _ = tokio::time::timeout(CLOSE_HANDSHAKE, send_all(socket, msgs)).await;
        }
    }

    /// A WebSocket ping (keep-alive and dead-peer detection).
    pub async fn ping<S>(&self, socket: &mut S) -> Result<(), Gone>
    where
        S: Sink<Message> + Unpin,
    {
        self.send_or_give_up(socket, vec![Message::Ping(bytes::Bytes::new())])
            .await
    }

    /// Sends messages, unless the peer stops reading: a send that waits
    /// longer than the patience (three ping intervals), or while the
    /// connection is being killed (its outbound queue overflowed), gives up
    /// on the peer.
    async fn send_or_give_up<S>(&self, socket: &mut S, msgs: Vec<Message>) -> Result<(), Gone>
    where
        S: Sink<Message> + Unpin,
    {
        let mut send = std::pin::pin!(send_all(socket, msgs));
        // Most writes complete at once (the socket has room): then there is
        // nothing to wait for, and no timer or cancellation waiters to set
        // up and tear down for every batch.
        if let Poll::Ready(r) = futures_util::poll!(send.as_mut()) {
            return r.map_err(|_| Gone);
        }
        tokio::select! {
            r = send => r.map_err(|_| Gone),
            _ = self.shared.kill.cancelled() => Err(Gone),
            _ = self.takeover.cancelled() => Err(Gone),
            _ = tokio::time::sleep(self.patience) => Err(Gone),
        }
    }

    /// Sends a close frame without waiting for the peer's (which may be
    /// gone): for a socket that yields its session to another connection,
    /// where every moment spent here is the other connection's wait.
    pub async fn close_now<S: Socket>(
        &mut self,
        socket: &mut S,
        code: u16,
        reason: &str,
    ) -> Ending {
        let frame = CloseFrame {
            code,
            reason: close_reason(reason).to_owned().into(),
        };
        let _ = tokio::time::timeout(CLOSE_NOW, socket.send(Message::Close(Some(frame)))).await;
        Ending::new(code, reason)
    }

    /// Sends a close frame and waits (briefly) for the peer's, as RFC 6455
    /// §7.1 asks; a peer that does not read or answer is dropped.
    pub async fn close<S: Socket>(&mut self, socket: &mut S, code: u16, reason: &str) -> Ending {
        let frame = CloseFrame {
            code,
            reason: close_reason(reason).to_owned().into(),
        };
        let handshake = async {
            if socket.send(Message::Close(Some(frame))).await.is_ok() {
                // Read until the peer's close frame ends the stream.
                while let Some(Ok(_)) = socket.next().await {}
            }
        };
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE, handshake).await;
        Ending::new(code, reason)
    }
}

/// A close reason cut to the 123 bytes a close frame has room for (RFC 6455
/// §5.5: 125 minus the code), on a character boundary.
fn close_reason(reason: &str) -> &str {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    &reason[..cut]
}

/// Feeds every message, then flushes once.
async fn send_all<S>(socket: &mut S, msgs: Vec<Message>) -> Result<(), S::Error>
where
    S: Sink<Message> + Unpin,
{
    for m in msgs {
        socket.feed(m).await?;
    }
    socket.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{client::OutFrame, ids::ConnId};
    use serde_json::{json, Value};

    fn writer() -> (Writer, Arc<ConnShared>, crate::outbox::OutboxRx) {
        let (shared, rx) = ConnShared::new(ConnId::new(), "/ws".into(), usize::MAX);
        let w = Writer::new(
            shared.clone(),
            Arc::new(Metrics::new()),
            "/ws".into(),
            Duration::from_secs(1),
        );
        (w, shared, rx)
    }

    fn seq_of(m: &Message) -> Option<u64> {
        match m {
            Message::Text(t) => serde_json::from_str::<Value>(t.as_str()).ok()?["seq"].as_u64(),
            _ => None,
        }
    }

    #[test]
    fn json_frames_take_consecutive_seq_and_other_items_none() {
        let (mut w, _, _) = writer();
        let items = [
            Outbound::from(OutFrame::push("a", None, json!(1))),
            Outbound::Binary(bytes::Bytes::from_static(b"\x00")),
            Outbound::from(OutFrame::push("b", None, json!(2))),
            Outbound::Raw {
                binary: false,
                payload: bytes::Bytes::from_static(b"\xff not utf-8"),
            },
            Outbound::Raw {
                binary: false,
                payload: bytes::Bytes::from_static(b"text"),
            },
        ];
        let msgs: Vec<Message> = items.into_iter().map(|o| w.encode(o)).collect();
        assert_eq!(
            msgs.iter().map(seq_of).collect::<Vec<_>>()[..3],
            [Some(0), None, Some(1)]
        );
        assert!(
            matches!(&msgs[3], Message::Binary(_)),
            "invalid UTF-8 goes out as binary"
        );
        assert!(matches!(&msgs[4], Message::Text(t) if t.as_str() == "text"));
    }

    #[test]
    fn close_reasons_are_cut_on_a_character_boundary() {
        assert_eq!(close_reason("short"), "short");
        let long = "é".repeat(100); // 200 bytes
        let cut = close_reason(&long);
        assert_eq!(cut.len(), 122);
        assert!(long.starts_with(cut));
    }

    #[tokio::test]
    async fn a_batch_takes_what_is_queued_up_to_its_size_and_gives_back_the_bytes() {
        let (mut w, shared, mut rx) = writer();
        for i in 0..WRITE_BATCH + 10 {
            assert!(shared.send(OutFrame::push("t", None, json!(i)).into()));
        }
        let mut sink: Vec<Message> = Vec::new();
        let first = rx.try_recv().unwrap();
        let rest = w.write_batch(&mut sink, first, &mut rx).unwrap();
        assert!(rest.is_none(), "a Vec always has room");
        assert_eq!(sink.len(), WRITE_BATCH);
        let seqs: Vec<u64> = sink.iter().filter_map(seq_of).collect();
        assert_eq!(seqs, (0..WRITE_BATCH as u64).collect::<Vec<_>>());
        w.flush_queue(&mut sink, &mut rx).await;
        assert_eq!(sink.len(), WRITE_BATCH + 10);
        assert_eq!(
            shared.queued_bytes(),
            0,
            "every written frame gave its bytes back"
        );
    }
}
