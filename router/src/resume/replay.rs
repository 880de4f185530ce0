//! The frames a session has sent and may have to send again.
//!
//! Every JSON frame the writer sends is kept here with its `seq` until the
//! client acknowledges it (`ack`) or the buffer's bounds push it out (oldest
//! first). On resume, the frames after the client's `last_seq` are written
//! again, with their original `seq`. A resume from before the oldest kept
//! frame cannot be served without a gap, and says so. Plain data: no
//! runtime, no socket.
//!
//! Every session's buffer also draws on one process-wide [`KeptBudget`]:
//! clients that never acknowledge would otherwise keep their route's whole
//! bound each. When the budget is spent, a buffer pushes out its own oldest
//! frames, and a frame it still cannot keep is not kept (a resume from
//! before it is a gap).

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use axum::extract::ws::Utf8Bytes;

/// Bytes all live sessions together may keep for resumes.
#[derive(Debug)]
pub struct KeptBudget {
    used: AtomicUsize,
    max: usize,
}

impl KeptBudget {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            max,
        })
    }

    /// Bytes kept now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= self.max)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Sent frames kept for a resume, bounded in count and bytes.
#[derive(Debug)]
pub struct ReplayBuffer {
    frames: VecDeque<(u64, Utf8Bytes)>,
    bytes: usize,
    max_frames: usize,
    max_bytes: usize,
    budget: Arc<KeptBudget>,
    /// Every frame up to this `seq` has left the buffer (acknowledged or
    /// pushed out): a resume from before it has a gap.
    dropped_through: u64,
    /// The highest `seq` kept so far.
    last_seq: u64,
}

/// A resume from before what was kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// The oldest `seq` a resume could start after.
    pub oldest: u64,
}

impl ReplayBuffer {
    /// A buffer of at most `max_frames` frames and `max_bytes` bytes (one
    /// frame is kept whatever its size, so the newest can always be
    /// replayed).
    pub fn new(max_frames: usize, max_bytes: usize, budget: Arc<KeptBudget>) -> Self {
        Self {
            frames: VecDeque::new(),
            bytes: 0,
            max_frames: max_frames.max(1),
            max_bytes,
            budget,
            dropped_through: 0,
            last_seq: 0,
        }
    }

    /// Keeps the frame sent with `seq` (in increasing order).
    pub fn push(&mut self, seq: u64, text: Utf8Bytes) {
        self.last_seq = seq;
        while !self.budget.try_take(text.len()) {
            if self.frames.is_empty() {
                // Not even this one frame fits the process-wide budget.
                self.dropped_through = seq;
                return;
            }
            self.drop_oldest();
        }
        self.bytes += text.len();
        self.frames.push_back((seq, text));
        while self.frames.len() > self.max_frames
            || (self.bytes > self.max_bytes && self.frames.len() > 1)
        {
            self.drop_oldest();
        }
    }

    /// The client has every frame up to `seq`: they need not be kept.
    pub fn ack(&mut self, seq: u64) {
        while self.frames.front().is_some_and(|(s, _)| *s <= seq) {
            self.drop_oldest();
        }
    }

    /// The frames after `last_seq`, in order, or the gap that makes that
    /// impossible. A `last_seq` beyond what was sent is refused the same
    /// way: the client would drop the next frames as duplicates.
    pub fn after(&self, last_seq: u64) -> Result<impl Iterator<Item = &(u64, Utf8Bytes)>, Gap> {
        if last_seq < self.dropped_through || last_seq > self.last_seq {
            return Err(Gap {
                oldest: self.dropped_through,
            });
        }
        Ok(self.frames.iter().filter(move |(s, _)| *s > last_seq))
    }

    /// Bytes of the kept frames.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// The highest `seq` sent (0 before any).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    fn drop_oldest(&mut self) {
        if let Some((seq, text)) = self.frames.pop_front() {
            self.bytes -= text.len();
            self.budget.give_back(text.len());
            self.dropped_through = seq;
        }
    }
}

impl Drop for ReplayBuffer {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u64) -> Utf8Bytes {
        format!("frame-{n:03}").into() // 9 bytes
    }

    fn seqs(b: &ReplayBuffer, last: u64) -> Result<Vec<u64>, Gap> {
        b.after(last).map(|it| it.map(|(s, _)| *s).collect())
    }

    #[test]
    fn replays_what_follows_last_seq_in_order() {
        let mut b = ReplayBuffer::new(100, 1 << 20, KeptBudget::new(usize::MAX));
        for n in 1..=5 {
            b.push(n, frame(n));
        }
        assert_eq!(seqs(&b, 0), Ok(vec![1, 2, 3, 4, 5]));
        assert_eq!(seqs(&b, 3), Ok(vec![4, 5]));
        assert_eq!(seqs(&b, 5), Ok(vec![]));
        assert_eq!(seqs(&b, 9), Err(Gap { oldest: 0 }), "beyond what was sent");
        assert_eq!((b.len(), b.bytes(), b.last_seq()), (5, 45, 5));
    }

    #[test]
    fn acks_free_frames_and_a_resume_from_before_them_is_a_gap() {
        let mut b = ReplayBuffer::new(100, 1 << 20, KeptBudget::new(usize::MAX));
        for n in 1..=5 {
            b.push(n, frame(n));
        }
        b.ack(3);
        assert_eq!((b.len(), b.bytes()), (2, 18));
        assert_eq!(seqs(&b, 3), Ok(vec![4, 5]));
        assert_eq!(seqs(&b, 2), Err(Gap { oldest: 3 }));
        b.ack(1); // an old ack changes nothing
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn the_process_wide_budget_is_shared_and_given_back() {
        let budget = KeptBudget::new(30);
        let mut a = ReplayBuffer::new(100, 1 << 20, budget.clone());
        let mut b = ReplayBuffer::new(100, 1 << 20, budget.clone());
        for n in 1..=3 {
            a.push(n, frame(n));
        }
        assert_eq!(budget.used(), 27);
        // b pushes nothing of a's out: it has nothing of its own to drop,
        // so its frame is not kept and a resume from before it is a gap.
        b.push(1, frame(1));
        assert_eq!((b.len(), budget.used()), (0, 27));
        assert_eq!(seqs(&b, 0), Err(Gap { oldest: 1 }));
        // a makes room from its own oldest.
        a.push(4, frame(4));
        assert_eq!((a.len(), budget.used()), (3, 27));
        assert_eq!(seqs(&a, 1), Ok(vec![2, 3, 4]));
        a.ack(4);
        assert_eq!(budget.used(), 0);
        b.push(2, frame(2));
        assert_eq!(budget.used(), 9);
        drop(b);
        assert_eq!(budget.used(), 0, "a dropped buffer gives its bytes back");
    }

    #[test]
    fn bounds_push_out_the_oldest() {
        let mut b = ReplayBuffer::new(3, 1 << 20, KeptBudget::new(usize::MAX));
        for n in 1..=5 {
            b.push(n, frame(n));
        }
        assert_eq!(seqs(&b, 2), Ok(vec![3, 4, 5]));
        assert_eq!(seqs(&b, 1), Err(Gap { oldest: 2 }));
        let mut b = ReplayBuffer::new(100, 20, KeptBudget::new(usize::MAX));
        for n in 1..=5 {
            b.push(n, frame(n));
        }
        assert_eq!((b.len(), b.bytes()), (2, 18), "two 9-byte frames fit in 20");
        let mut b = ReplayBuffer::new(100, 4, KeptBudget::new(usize::MAX));
        b.push(1, frame(1));
        assert_eq!(b.len(), 1, "the newest frame is kept whatever its size");
    }
}
