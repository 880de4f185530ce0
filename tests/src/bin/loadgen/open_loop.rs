//! The open loop on one connection: send on the schedule whatever the
//! replies do, match the replies, and stop on time.
//!
//! [`Ledger`] is the bookkeeping without I/O: it takes what was sent, what
//! arrived and the current time, and decides what counts (latency from the
//! message's slot, from its write, the writer's lag), what failed and when the
//! connection may stop. [`run_connection`] is the thin driver around it; it
//! works on any `Sink`/`Stream` of WebSocket messages, so tests drive it with
//! an in-memory echo server under paused time.
//!
//! When a connection stops:
//! - every scheduled message was sent and every reply is in: at once (a
//!   healthy run ends right after the window);
//! - the window plus the grace period (`--grace`) is over: requests still
//!   waiting then, sent less than the reply timeout ago, are reported as
//!   `in_flight_at_end`, not as errors;
//! - a request waited the reply timeout (`--timeout`), the server closed the
//!   connection, a read or write failed, or an unexpected frame arrived: the
//!   connection has failed, and each request it leaves unanswered is an error.
//!
//! Only requests whose slot lies in the measured window count, including
//! those answered after it: a slow reply is not dropped from the tail for
//! arriving late.

use std::fmt::Display;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::requests::{request_text, Matched, Pending, Stamp};
use crate::schedule::{Gate, Schedule};
use crate::stats::{Clock, ConnStats};
use crate::Protocol;

/// Bound on sending the close frame at the end: a server that stopped
/// reading must not hold the run past its end.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// What one connection of an open-loop run needs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// This connection's number in the schedule.
    pub conn: usize,
    pub schedule: Arc<Schedule>,
    pub gates: Arc<[Gate]>,
    pub clock: Clock,
    /// How long after the window replies are still waited for.
    pub grace: Duration,
    /// A request without its reply this long after its write has failed.
    pub reply_timeout: Duration,
    pub protocol: Protocol,
    pub data: Arc<str>,
}

/// One connection's open-loop bookkeeping.
#[derive(Debug)]
pub struct Ledger {
    pending: Pending,
    clock: Clock,
    reply_timeout: Duration,
    stats: ConnStats,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Ledger {
    pub fn new(protocol: Protocol, clock: Clock, reply_timeout: Duration, scheduled: u64) -> Self {
        Self {
            pending: Pending::new(protocol),
            clock,
            reply_timeout,
            stats: ConnStats {
                scheduled,
                ..ConnStats::default()
            },
        }
    }

    /// Request `id` of `len` bytes is about to be written. Recorded before
    /// the write, so its reply always finds it.
    pub fn sent(&mut self, id: u64, at: Stamp, len: usize) {
        self.pending.push(id, at, len);
        self.stats.sent += 1;
        if self.clock.measuring(at.intended) {
            let lag = at.sent.saturating_duration_since(at.intended);
            self.stats.lag.push(nanos(lag));
        }
    }

    /// A frame arrived at `now`. Returns false when the connection has failed.
    pub fn received(&mut self, msg: Message, now: Instant) -> bool {
        match self.pending.complete(msg) {
            Matched::Ignore => true,
            Matched::Unexpected(why) => {
                self.fail(why);
                false
            }
            Matched::Done(_, Some(why)) => {
                self.stats.error(why);
                true
            }
            Matched::Done(at, None) => {
                if self.clock.measuring(at.intended) {
                    let s = &mut self.stats;
                    s.latencies
                        .push(nanos(now.saturating_duration_since(at.intended)));
                    s.service
                        .push(nanos(now.saturating_duration_since(at.sent)));
                }
                true
            }
        }
    }

    /// The connection failed: each request it leaves unanswered is an
    /// error, and the failure is one error even with none pending.
    pub fn fail(&mut self, why: impl Into<String>) {
        let lost = self.pending.len().max(1) as u64;
        self.stats.errors(lost, why);
        self.pending.clear();
    }

    /// Whether every request sent so far has its reply.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }

    /// Requests sent so far.
    pub fn sent_count(&self) -> u64 {
        self.stats.sent
    }

    /// When to look again at `now` if no frame arrives: at `end`, or when
    /// the oldest request's reply timeout runs out if that is sooner. With
    /// nothing pending, the next request (due at `next_send`, if any) can
    /// be written no earlier than its slot and `now`, so its timeout cannot
    /// run out before then: the driver need not hear about each write.
    pub fn deadline(&self, end: Instant, now: Instant, next_send: Option<Instant>) -> Instant {
        let oldest = match self.pending.oldest() {
            Some(at) => Some(at.sent),
            None => next_send.map(|t| t.max(now)),
        };
        match oldest {
            Some(t) => end.min(t + self.reply_timeout),
            None => end,
        }
    }

    /// Fails the connection if its oldest request has waited the reply
    /// timeout at `now`; returns whether it did.
    pub fn expire(&mut self, now: Instant) -> bool {
        match self.pending.oldest() {
            Some(at) if now >= at.sent + self.reply_timeout => {
                let timeout = self.reply_timeout.as_secs_f64();
                self.fail(format!("no reply within {timeout} s"));
                true
            }
            _ => false,
        }
    }

    /// Ends the bookkeeping at `now`: what is still waiting and not overdue
    /// is in flight at the end.
    pub fn finish(mut self, now: Instant) -> ConnStats {
        self.expire(now);
        self.stats.in_flight_at_end = self.pending.len() as u64;
        self.stats
    }
}

/// Locks a mutex, recovering the data if a panicking task poisoned it: each
/// critical section is one ledger operation that cannot leave it half-updated.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs connection `plan.conn` of an open-loop run: writes each message
/// when the pacer releases its slot, reads the replies, stops as the module
/// documentation says, then closes the connection.
pub async fn run_connection<Si, St, E>(mut tx: Si, mut rx: St, plan: Plan) -> ConnStats
where
    Si: Sink<Message> + Unpin,
    Si::Error: Display,
    St: Stream<Item = Result<Message, E>> + Unpin,
    E: Display,
{
    let gate = &plan.gates[plan.conn];
    let scheduled = plan.schedule.slots_of(plan.conn, plan.schedule.slots());
    let ledger = Mutex::new(Ledger::new(
        plan.protocol,
        plan.clock,
        plan.reply_timeout,
        scheduled,
    ));
    let end = plan.clock.to + plan.grace;
    {
        let writer = async {
            for k in 0..scheduled {
                gate.wait_beyond(k).await;
                let text = request_text(k, &plan.data);
                let stamp = Stamp {
                    intended: plan.schedule.message_time(plan.conn, k),
                    sent: Instant::now(),
                };
                lock(&ledger).sent(k, stamp, text.len());
                if let Err(e) = tx.send(Message::Text(text.into())).await {
                    return Err(format!("send failed: {e}"));
                }
            }
            Ok(())
        };
        let mut writer = pin!(writer);
        let mut writing = true;
        let mut deadline = end;
        let mut wake = pin!(tokio::time::sleep_until(deadline));
        loop {
            if !writing && lock(&ledger).is_idle() {
                break;
            }
            let next = {
                let ledger = lock(&ledger);
                let sent = ledger.sent_count();
                let next_send =
                    (sent < scheduled).then(|| plan.schedule.message_time(plan.conn, sent));
                ledger.deadline(end, Instant::now(), next_send)
            };
            if next != deadline {
                deadline = next;
                wake.as_mut().reset(deadline);
            }
            tokio::select! {
                written = &mut writer, if writing => {
                    writing = false;
                    if let Err(e) = written {
                        lock(&ledger).fail(e);
                        break;
                    }
                }
                msg = rx.next() => {
                    let now = Instant::now();
                    let mut ledger = lock(&ledger);
                    let going = match msg {
                        Some(Ok(m)) => ledger.received(m, now),
                        Some(Err(e)) => {
                            ledger.fail(format!("read failed: {e}"));
                            false
                        }
                        None => {
                            ledger.fail("connection closed by the server");
                            false
                        }
                    };
                    if !going {
                        break;
                    }
                }
                () = wake.as_mut() => {
                    let now = Instant::now();
                    if lock(&ledger).expire(now) || now >= end {
                        break;
                    }
                }
            }
        }
    }
    let stats = ledger
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .finish(Instant::now());
    let _ = tokio::time::timeout(CLOSE_WAIT, tx.send(Message::Close(None))).await;
    stats
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{pace_with_timer, Pacer};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// An in-memory raw echo server: answers text frame number `n` (from 0)
    /// `reply(n)` after it arrived (`None`: never), in order; the sink's
    /// send of frame `n` takes `write(n)` (a server not reading).
    fn echo_server(
        reply: impl Fn(u64) -> Option<Duration> + Send + 'static,
        write: impl Fn(u64) -> Duration + Send + 'static,
    ) -> (
        impl Sink<Message, Error = String> + Unpin + Send,
        impl Stream<Item = Result<Message, String>> + Unpin + Send,
    ) {
        let (to_server, mut inbox) = tokio::sync::mpsc::unbounded_channel::<(Instant, Message)>();
        let (to_client, mut outbox) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (mut n, mut last) = (0, Instant::now());
            while let Some((arrived, msg)) = inbox.recv().await {
                if !msg.is_text() {
                    continue;
                }
                if let Some(delay) = reply(n) {
                    last = last.max(arrived + delay);
                    tokio::time::sleep_until(last).await;
                    if to_client.send(Ok(msg)).is_err() {
                        return;
                    }
                }
                n += 1;
            }
        });
        let sink = futures_util::sink::unfold((to_server, 0u64), move |(tx, n), msg: Message| {
            let wait = if msg.is_text() {
                write(n)
            } else {
                Duration::ZERO
            };
            async move {
                tokio::time::sleep(wait).await;
                tx.send((Instant::now(), msg))
                    .map_err(|_| "server gone".to_owned())?;
                Ok((tx, n + 1))
            }
        });
        let stream = futures_util::stream::poll_fn(move |cx| outbox.poll_recv(cx));
        (Box::pin(sink), stream)
    }

    struct Run {
        rate: f64,
        connections: usize,
        warmup: Duration,
        duration: Duration,
        grace: Duration,
        reply_timeout: Duration,
    }

    impl Default for Run {
        fn default() -> Self {
            Self {
                rate: 100.0,
                connections: 1,
                warmup: ms(500),
                duration: ms(1500),
                grace: ms(1000),
                reply_timeout: ms(10_000),
            }
        }
    }

    impl Run {
        /// Runs every connection against its own echo server (made by
        /// `server(conn)`), paced by tokio's timer; returns each connection's
        /// stats and when it ended, from the start.
        async fn go<Si, St>(&self, server: impl Fn(usize) -> (Si, St)) -> Vec<(ConnStats, Duration)>
        where
            Si: Sink<Message, Error = String> + Unpin + Send + 'static,
            St: Stream<Item = Result<Message, String>> + Unpin + Send + 'static,
        {
            let start = Instant::now();
            let clock = Clock {
                from: start + self.warmup,
                to: start + self.warmup + self.duration,
            };
            let schedule =
                Arc::new(Schedule::new(start, self.rate, self.connections, clock.to).unwrap());
            let gates: Arc<[Gate]> = (0..self.connections).map(|_| Gate::default()).collect();
            tokio::spawn(pace_with_timer(Pacer::new(schedule.clone(), gates.clone())));
            let tasks: Vec<_> = (0..self.connections)
                .map(|conn| {
                    let (tx, rx) = server(conn);
                    let plan = Plan {
                        conn,
                        schedule: schedule.clone(),
                        gates: gates.clone(),
                        clock,
                        grace: self.grace,
                        reply_timeout: self.reply_timeout,
                        protocol: Protocol::Raw,
                        data: "x".repeat(16).into(),
                    };
                    tokio::spawn(async move {
                        let stats = run_connection(tx, rx, plan).await;
                        (stats, Instant::now() - start)
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        }
    }

    fn ledger(t0: Instant) -> Ledger {
        // Window 1-2 s, reply timeout 5 s.
        let clock = Clock {
            from: t0 + ms(1000),
            to: t0 + ms(2000),
        };
        Ledger::new(Protocol::Json, clock, ms(5000), 10)
    }

    fn reply(id: u64) -> Message {
        Message::Text(format!(r#"{{"type":"echo","id":{id},"done":true}}"#).into())
    }

    #[test]
    fn requests_count_by_their_slot_even_when_answered_after_the_window() {
        let t0 = Instant::now();
        let mut l = ledger(t0);
        let stamp = |slot, lag| Stamp {
            intended: t0 + ms(slot),
            sent: t0 + ms(slot + lag),
        };
        l.sent(0, stamp(999, 0), 0); // warmup
        l.sent(1, stamp(1000, 1), 0); // first in the window, written 1 ms late
        l.sent(2, stamp(1999, 0), 0); // last in the window
        l.sent(3, stamp(2000, 0), 0); // after it
        for id in 0..4 {
            assert!(l.received(reply(id), t0 + ms(2500)));
        }
        let s = l.finish(t0 + ms(2500));
        assert_eq!(s.latencies, [nanos(ms(1500)), nanos(ms(501))]);
        assert_eq!(s.service, [nanos(ms(1499)), nanos(ms(501))]);
        assert_eq!(s.lag, [nanos(ms(1)), 0]);
        assert_eq!((s.sent, s.scheduled, s.errors), (4, 10, 0));
    }

    #[test]
    fn the_deadline_is_the_oldest_reply_timeout_or_the_end() {
        let t0 = Instant::now();
        let end = t0 + ms(3000);
        let mut l = ledger(t0);
        // Nothing sent, nothing to send: the end.
        assert_eq!(l.deadline(end, t0, None), end);
        // Nothing pending: the next request's timeout from its slot, or from
        // now if its slot has passed.
        assert_eq!(
            l.deadline(t0 + ms(60_000), t0, Some(t0 + ms(100))),
            t0 + ms(5100)
        );
        assert_eq!(
            l.deadline(t0 + ms(60_000), t0 + ms(200), Some(t0 + ms(100))),
            t0 + ms(5200)
        );
        assert_eq!(l.deadline(end, t0, Some(t0 + ms(100))), end);
        l.sent(0, Stamp::at(t0 + ms(10)), 0);
        l.sent(1, Stamp::at(t0 + ms(20)), 0);
        assert_eq!(
            l.deadline(t0 + ms(60_000), t0 + ms(30), None),
            t0 + ms(5010)
        );
        assert!(l.received(reply(0), t0 + ms(40)));
        assert_eq!(
            l.deadline(t0 + ms(60_000), t0 + ms(40), None),
            t0 + ms(5020)
        );
        assert!(!l.expire(t0 + ms(5019)));
        assert!(l.expire(t0 + ms(5020)), "request 1 has waited 5 s");
        let s = l.finish(t0 + ms(5020));
        assert_eq!((s.errors, s.in_flight_at_end), (1, 0));
        assert_eq!(s.first_error.as_deref(), Some("no reply within 5 s"));
    }

    #[test]
    fn at_the_end_what_is_pending_is_in_flight_unless_overdue() {
        let t0 = Instant::now();
        let mut l = ledger(t0);
        l.sent(0, Stamp::at(t0 + ms(1500)), 0);
        l.sent(1, Stamp::at(t0 + ms(1600)), 0);
        let s = l.finish(t0 + ms(3000));
        assert_eq!((s.errors, s.in_flight_at_end), (0, 2));

        let mut l = ledger(t0);
        l.sent(0, Stamp::at(t0 + ms(1500)), 0);
        let s = l.finish(t0 + ms(6500));
        assert_eq!((s.errors, s.in_flight_at_end), (1, 0), "overdue at the end");
    }

    #[test]
    fn a_failed_connection_loses_what_it_had_pending() {
        let t0 = Instant::now();
        let mut l = ledger(t0);
        l.fail("closed");
        assert_eq!(
            l.stats.errors, 1,
            "a failure with nothing pending is one error"
        );
        l.sent(0, Stamp::at(t0), 0);
        l.sent(1, Stamp::at(t0), 0);
        l.sent(2, Stamp::at(t0), 0);
        assert!(l.received(reply(0), t0 + ms(1)));
        assert!(!l.received(reply(7), t0 + ms(2)), "a reply to nothing sent");
        let s = l.finish(t0 + ms(3));
        assert_eq!((s.errors, s.in_flight_at_end), (3, 0));
        assert_eq!(s.first_error.as_deref(), Some("closed"));
    }

    fn all_equal(samples: &[u64], value: Duration) -> bool {
        samples.iter().all(|&s| s == nanos(value))
    }

    #[tokio::test(start_paused = true)]
    async fn a_perfect_echo_ends_with_its_last_reply_and_no_error() {
        // 200/s over 2 connections: each sends every 10 ms; the window is
        // 0.5-2.0 s, so 150 of each connection's 200 messages are measured.
        let run = Run {
            rate: 200.0,
            connections: 2,
            ..Run::default()
        };
        let results = run
            .go(|_| echo_server(|_| Some(ms(3)), |_| Duration::ZERO))
            .await;
        for (conn, (s, ended)) in results.iter().enumerate() {
            assert_eq!(
                (s.errors, s.in_flight_at_end),
                (0, 0),
                "{:?}",
                s.first_error
            );
            assert_eq!((s.scheduled, s.sent), (200, 200));
            assert_eq!(s.latencies.len(), 150);
            assert!(
                all_equal(&s.latencies, ms(3)),
                "latency is the server's 3 ms"
            );
            assert!(all_equal(&s.service, ms(3)));
            assert!(all_equal(&s.lag, Duration::ZERO));
            // Its last slot is at 1 990 ms + 5 ms per connection number,
            // answered 3 ms later; then it stops, without waiting the grace
            // period or the reply timeout.
            let last_slot = ms(1990 + 5 * conn as u64);
            assert_eq!(*ended, last_slot + ms(3), "connection {conn}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reply_still_coming_at_the_end_is_in_flight_not_an_error() {
        // The last of 200 messages is never answered; the reply timeout (10 s)
        // is longer than the wait after the window (1 s).
        let results = Run::default()
            .go(|_| echo_server(|n| (n != 199).then_some(ms(3)), |_| Duration::ZERO))
            .await;
        let (s, ended) = &results[0];
        assert_eq!(
            (s.errors, s.in_flight_at_end),
            (0, 1),
            "{:?}",
            s.first_error
        );
        assert_eq!(s.latencies.len(), 149);
        assert_eq!(*ended, ms(3000), "window end (2 s) + grace (1 s)");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reply_later_than_the_timeout_fails_the_connection() {
        // Message 100 (sent at 1.0 s) is held 500 ms, the reply timeout is 200 ms.
        let run = Run {
            reply_timeout: ms(200),
            ..Run::default()
        };
        let results = run
            .go(|_| {
                echo_server(
                    |n| Some(if n == 100 { ms(500) } else { ms(3) }),
                    |_| Duration::ZERO,
                )
            })
            .await;
        let (s, ended) = &results[0];
        assert_eq!(s.first_error.as_deref(), Some("no reply within 0.2 s"));
        // Messages 100..=119 (or 120, sent in the same instant) were unanswered.
        assert!(
            (20..=21).contains(&s.errors),
            "{} errors, {} sent, ended {ended:?}",
            s.errors,
            s.sent
        );
        assert_eq!(s.in_flight_at_end, 0);
        assert_eq!(*ended, ms(1200));
        assert_eq!(s.sent, s.errors + 100, "nothing is sent after the failure");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_server_shows_as_latency_of_the_requests_behind_it() {
        // Message 100 takes 100 ms; the ones sent behind it (every 10 ms)
        // wait for it in order, so they see 90, 80, … 10 ms.
        let results = Run::default()
            .go(|_| {
                echo_server(
                    |n| Some(if n == 100 { ms(100) } else { ms(1) }),
                    |_| Duration::ZERO,
                )
            })
            .await;
        let (s, _) = &results[0];
        assert_eq!(s.errors, 0);
        let mut worst: Vec<u64> = s.latencies.clone();
        worst.sort_unstable();
        let top: Vec<u64> = worst.iter().rev().take(11).copied().collect();
        let expected: Vec<u64> = [100, 90, 80, 70, 60, 50, 40, 30, 20, 10, 1]
            .iter()
            .map(|&m| nanos(ms(m)))
            .collect();
        assert_eq!(top, expected);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_the_server_does_not_take_is_charged_from_the_schedule() {
        // Writing message 100 (slot at 1.0 s) takes 45 ms: messages 101-104,
        // due at 1.01-1.04 s, go out late. Their latency counts from the slot
        // (coordinated omission corrected); the write's delay shows as lag.
        let results = Run::default()
            .go(|_| {
                echo_server(
                    |_| Some(ms(2)),
                    |n| if n == 100 { ms(45) } else { Duration::ZERO },
                )
            })
            .await;
        let (s, _) = &results[0];
        assert_eq!(s.errors, 0);
        // Message k's samples are at index k - 50 (the window starts with message 50).
        let at = |k: usize| (s.lag[k - 50], s.service[k - 50], s.latencies[k - 50]);
        assert_eq!(at(99), (0, nanos(ms(2)), nanos(ms(2))));
        // Message 100: its write started on time, the 45 ms are the server's.
        assert_eq!(at(100), (0, nanos(ms(47)), nanos(ms(47))));
        // Message 101: due at 1.01 s, written at 1.045 s, echoed at 1.047 s.
        assert_eq!(at(101), (nanos(ms(35)), nanos(ms(2)), nanos(ms(37))));
        assert_eq!(at(104), (nanos(ms(5)), nanos(ms(2)), nanos(ms(7))));
        assert_eq!(at(105), (0, nanos(ms(2)), nanos(ms(2))));
    }

    #[tokio::test(start_paused = true)]
    async fn the_timers_lag_is_measured_apart_from_the_servers_time() {
        // 300/s: slots every 3.33 ms, which tokio's millisecond timer can only
        // hit late. Every latency is exactly that lag plus the server's 2 ms.
        let run = Run {
            rate: 300.0,
            ..Run::default()
        };
        let results = run
            .go(|_| echo_server(|_| Some(ms(2)), |_| Duration::ZERO))
            .await;
        let (s, _) = &results[0];
        assert_eq!(s.errors, 0);
        assert_eq!(s.latencies.len(), 450);
        assert!(all_equal(&s.service, ms(2)));
        for i in 0..s.latencies.len() {
            assert_eq!(s.latencies[i], s.lag[i] + s.service[i]);
        }
        assert!(s.lag.iter().all(|&l| l < nanos(ms(1))));
        assert!(s.lag.iter().any(|&l| l > 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_closes_fails_the_connection_at_once() {
        let results = Run::default()
            .go(|_| {
                let (tx, _) = echo_server(|_| Some(ms(1)), |_| Duration::ZERO);
                (tx, futures_util::stream::empty())
            })
            .await;
        let (s, ended) = &results[0];
        assert_eq!(
            s.first_error.as_deref(),
            Some("connection closed by the server")
        );
        assert_eq!(s.errors, 1);
        assert_eq!(*ended, Duration::ZERO);
    }
}
