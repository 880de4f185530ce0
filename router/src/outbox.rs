//! The outbound queue of one connection: frames for its session's writer,
//! from the session itself, the bridge and publications.
//!
//! A `VecDeque` behind a mutex with an [`AtomicWaker`], rather than a tokio
//! `mpsc` channel: a channel allocates its first block of 32 slots (about
//! 1.5 KB with the channel's own state) when it is made, and an idle
//! connection needs none of it. Here an idle connection holds no buffer:
//! the deque allocates on the first frame and is let go again when a burst
//! has drained. One producer side is shared (`ConnShared`), one consumer
//! (the session); the bound is [`crate::hub::OUTBOUND_QUEUE`] frames,
//! checked by the caller through [`OutboxTx::len`] and enforced here.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use futures_util::task::AtomicWaker;

use crate::{client::Outbound, sync::lock};

/// Capacity kept after the queue drains; a larger one (a burst) is freed.
const KEEP: usize = 16;

#[derive(Debug, Default)]
struct Shared {
    items: Mutex<VecDeque<Outbound>>,
    /// The consumer's task while it waits for a frame.
    ready: AtomicWaker,
    /// The consumer is gone: nothing more is taken.
    closed: AtomicBool,
}

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum SendError {
    Full,
    Closed,
}

/// The producers' side.
#[derive(Debug)]
pub struct OutboxTx {
    shared: Arc<Shared>,
    max: usize,
}

/// The consumer's side (the session).
#[derive(Debug)]
pub struct OutboxRx {
    shared: Arc<Shared>,
}

/// A queue of at most `max` frames.
pub fn outbox(max: usize) -> (OutboxTx, OutboxRx) {
    let shared = Arc::new(Shared::default());
    (
        OutboxTx {
            shared: shared.clone(),
            max,
        },
        OutboxRx { shared },
    )
}

impl OutboxTx {
    /// Queues a frame; never waits.
    pub fn try_send(&self, out: Outbound) -> Result<(), SendError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(SendError::Closed);
        }
        {
            let mut items = lock(&self.shared.items);
            if items.len() >= self.max {
                return Err(SendError::Full);
            }
            items.push_back(out);
        }
        self.shared.ready.wake();
        Ok(())
    }

    /// Frames queued now.
    pub fn len(&self) -> usize {
        lock(&self.shared.items).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The queue is empty.
#[derive(Debug, PartialEq, Eq)]
pub struct Empty;

impl OutboxRx {
    /// The next frame, waiting for one.
    pub async fn recv(&mut self) -> Option<Outbound> {
        std::future::poll_fn(|cx| {
            if let Ok(out) = self.try_recv() {
                return std::task::Poll::Ready(Some(out));
            }
            self.shared.ready.register(cx.waker());
            // Again after registering: a frame queued in between is not
            // left waiting for the next one.
            match self.try_recv() {
                Ok(out) => std::task::Poll::Ready(Some(out)),
                Err(Empty) => std::task::Poll::Pending,
            }
        })
        .await
    }

    /// The next frame if one is queued.
    pub fn try_recv(&mut self) -> Result<Outbound, Empty> {
        let mut items = lock(&self.shared.items);
        let out = items.pop_front().ok_or(Empty)?;
        if items.is_empty() && items.capacity() > KEEP {
            *items = VecDeque::new();
        }
        Ok(out)
    }
}

impl Drop for OutboxRx {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        lock(&self.shared.items).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn item(n: u8) -> Outbound {
        Outbound::Binary(Bytes::from(vec![n]))
    }

    fn n(out: Outbound) -> u8 {
        match out {
            Outbound::Binary(b) => b[0],
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn frames_come_out_in_order_up_to_the_bound_and_a_waiting_consumer_is_woken() {
        let (tx, mut rx) = outbox(3);
        assert_eq!(rx.try_recv().err(), Some(Empty));
        for i in 0..3 {
            tx.try_send(item(i)).unwrap();
        }
        assert_eq!(tx.try_send(item(9)), Err(SendError::Full));
        assert_eq!(tx.len(), 3);
        for i in 0..3 {
            assert_eq!(n(rx.recv().await.unwrap()), i);
        }
        // Waiting first, then a frame.
        let waiter = tokio::spawn(async move {
            let got = rx.recv().await.map(n);
            (got, rx)
        });
        tokio::task::yield_now().await;
        tx.try_send(item(7)).unwrap();
        let (got, rx) = waiter.await.unwrap();
        assert_eq!(got, Some(7));
        drop(rx);
        assert_eq!(tx.try_send(item(1)), Err(SendError::Closed));
    }

    #[test]
    fn an_idle_queue_holds_no_buffer_after_a_burst() {
        let (tx, mut rx) = outbox(1000);
        assert_eq!(
            lock(&tx.shared.items).capacity(),
            0,
            "nothing before the first frame"
        );
        for i in 0..200 {
            tx.try_send(item(i as u8)).unwrap();
        }
        while rx.try_recv().is_ok() {}
        assert_eq!(
            lock(&tx.shared.items).capacity(),
            0,
            "the burst's buffer is freed"
        );
    }
}
