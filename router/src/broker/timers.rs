//! The broker's timers: a `DelayQueue` that does not wake its own task.
//!
//! tokio-util's `DelayQueue` wakes the task that last polled it when an
//! insert sets an earlier deadline and when a removal empties it. Here that
//! task is the bridge's owner loop, which is also the only one that changes
//! the queues, and it polls them again before it waits: every turn of the
//! loop ends in a `select!` over them, which returns `Pending` only after
//! polling every branch. So those wakes buy nothing, and they cost: on the
//! multi-threaded runtime a task woken while it runs is rescheduled as a
//! yield, which also wakes an idle worker thread to come and steal it. With
//! one request in flight that was two extra polls of the loop and two futex
//! wakes of the other thread per request (an empty queue gets a deadline,
//! then loses it).
//!
//! [`Timers`] hands the queue a waker of its own, which passes a wake on to
//! the polling task except while the queue is being changed. A timer that
//! fires on another thread during a change loses nothing: its sleep has
//! elapsed, and the next poll, which the owner always makes before it
//! waits, returns the entry.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll, Wake, Waker},
};

use futures_util::{task::AtomicWaker, Stream};
use tokio::time::Instant;
use tokio_util::time::{
    delay_queue::{Expired, Key},
    DelayQueue,
};

/// Timers of the owner loop, polled as a stream of expired entries.
pub struct Timers<T> {
    queue: DelayQueue<T>,
    gate: Arc<Gate>,
    /// The waker the queue (and its sleep) is polled with: `gate`'s.
    waker: Waker,
}

/// Passes wakes on to the polling task, except during a change.
#[derive(Default)]
struct Gate {
    task: AtomicWaker,
    changing: AtomicBool,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.changing.load(Ordering::Acquire) {
            self.task.wake();
        }
    }
}

impl<T> Default for Timers<T> {
    fn default() -> Self {
        let gate = Arc::new(Gate::default());
        Self {
            queue: DelayQueue::new(),
            waker: Waker::from(gate.clone()),
            gate,
        }
    }
}

impl<T> Timers<T> {
    /// Arms a timer for `value` at `when`.
    pub fn insert_at(&mut self, value: T, when: Instant) -> Key {
        self.quietly(|q| q.insert_at(value, when))
    }

    /// Disarms a timer; `None` if it already fired or was removed.
    pub fn try_remove(&mut self, key: &Key) -> Option<Expired<T>> {
        self.quietly(|q| q.try_remove(key))
    }

    /// No timer is armed.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    fn quietly<R>(&mut self, change: impl FnOnce(&mut DelayQueue<T>) -> R) -> R {
        self.gate.changing.store(true, Ordering::Release);
        let r = change(&mut self.queue);
        self.gate.changing.store(false, Ordering::Release);
        r
    }
}

impl<T: Unpin> Stream for Timers<T> {
    type Item = Expired<T>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Expired<T>>> {
        let this = self.get_mut();
        this.gate.task.register(cx.waker());
        this.queue
            .poll_expired(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::AtomicUsize,
        task::{Context, Poll, Wake, Waker},
        time::Duration,
    };

    use super::*;

    /// Counts the wakes the polling task gets.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll(timers: &mut Timers<u32>, waker: &Waker) -> Poll<Option<u32>> {
        Pin::new(timers)
            .poll_next(&mut Context::from_waker(waker))
            .map(|e| e.map(Expired::into_inner))
    }

    #[tokio::test(start_paused = true)]
    async fn changes_do_not_wake_the_polling_task_and_expiries_do() {
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        let mut timers = Timers::default();
        assert_eq!(poll(&mut timers, &waker), Poll::Ready(None));

        // The first timer of an empty queue, an earlier one, and a removal
        // that empties the queue: a plain DelayQueue wakes on each.
        let now = Instant::now();
        let late = timers.insert_at(1, now + Duration::from_secs(10));
        assert_eq!(poll(&mut timers, &waker), Poll::Pending);
        let early = timers.insert_at(2, now + Duration::from_secs(1));
        assert!(timers.try_remove(&early).is_some());
        assert!(timers.try_remove(&late).is_some());
        assert!(timers.is_empty());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);

        // A timer that fires wakes the task, and the poll returns it.
        timers.insert_at(3, now + Duration::from_secs(1));
        assert_eq!(poll(&mut timers, &waker), Poll::Pending);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(poll(&mut timers, &waker), Poll::Ready(Some(3)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_that_fires_during_a_change_is_returned_by_the_next_poll() {
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        let mut timers = Timers::default();
        let now = Instant::now();
        timers.insert_at(1, now + Duration::from_secs(1));
        assert_eq!(poll(&mut timers, &waker), Poll::Pending);
        // The wake arrives while the owner changes the queue: dropped.
        timers.gate.changing.store(true, Ordering::Release);
        tokio::time::advance(Duration::from_secs(2)).await;
        timers.gate.changing.store(false, Ordering::Release);
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        // The owner polls before it waits, and gets the entry.
        assert_eq!(poll(&mut timers, &waker), Poll::Ready(Some(1)));
    }
}
