//! `--mode fanout`: N subscribers to one topic, and what each of them
//! receives from a publisher running at a fixed rate (BENCHMARKS.md,
//! "Fan-out").
//!
//! 1. Opens `--connections` WebSockets, spread round-robin over the URLs of
//!    `--url` (a comma-separated list, so a cluster run can split the
//!    subscribers over several routers), and subscribes each to `--topic`
//!    with the router's subscribe frame, waiting for its acknowledgement.
//! 2. Once every connection is acknowledged, says so on stderr and in
//!    `--ready-file` (a line `{"event":"subscribed",...}`): the driver starts
//!    the publisher only then, so no publication can be missed by a
//!    subscription still in flight.
//! 3. Reads the deliveries. The publisher sends `round(rate x (warmup +
//!    duration))` publications numbered from 0 ([`e2e_tests::fanout`]); every
//!    subscriber must get each exactly once, in order ([`SeqTracker`]).
//!    Latency (receive minus `sent_ns`, on the shared `CLOCK_MONOTONIC`) counts
//!    the publications after the warmup; deliveries/s counts the deliveries
//!    that arrive inside the measured window, which starts `warmup` after the
//!    publisher's first slot (estimated from the first delivery as
//!    `sent_ns - pseq / rate`).
//! 4. Stops when every subscriber has every publication, at the latest
//!    `--grace` after the last one was due.
//!
//! The summary also breaks latency and the sequence counts down per URL
//! (`by_url`, in `--url`'s order): across several routers, the subscribers
//! of the router the publisher is on and those reached through the cluster
//! relay are told apart.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use e2e_tests::fanout::{now_ns, parse_delivery, subscribe_text, Schedule};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::procstat::{cpu_json, Watch};
use crate::stats::{percentiles, round3};
use crate::target::Target;
use crate::{connect, secs, Args, Ws};

/// Bound on sending the close frame at the end.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// What one subscriber's sequence of deliveries looked like. Pure
/// bookkeeping: `pseq` in, counts out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqTracker {
    /// Publications the publisher makes: `pseq` in `0..count`.
    count: u64,
    /// Which `pseq` arrived, one bit each.
    seen: Vec<u64>,
    /// Distinct publications received.
    distinct: u64,
    /// One past the highest `pseq` received so far.
    next: u64,
    /// Frames carrying a publication, duplicates included.
    pub received: u64,
    /// A `pseq` that had already arrived.
    pub duplicates: u64,
    /// A `pseq` that arrived after a higher one (it filled a gap).
    pub out_of_order: u64,
    /// Times the sequence jumped ahead (one or more publications skipped
    /// at that point; they may still come, out of order).
    pub gaps: u64,
    /// A `pseq` the publisher never makes (`>= count`).
    pub unexpected: u64,
}

/// How one delivery fitted the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    InOrder,
    /// Ahead of the next expected one: this many were skipped.
    Gap(u64),
    OutOfOrder,
    Duplicate,
    Unexpected,
}

impl SeqTracker {
    pub fn new(count: u64) -> Self {
        Self {
            count,
            seen: vec![0; count.div_ceil(64) as usize],
            distinct: 0,
            next: 0,
            received: 0,
            duplicates: 0,
            out_of_order: 0,
            gaps: 0,
            unexpected: 0,
        }
    }

    pub fn record(&mut self, pseq: u64) -> Arrival {
        self.received += 1;
        if pseq >= self.count {
            self.unexpected += 1;
            return Arrival::Unexpected;
        }
        let (word, bit) = ((pseq / 64) as usize, 1u64 << (pseq % 64));
        if self.seen[word] & bit != 0 {
            self.duplicates += 1;
            return Arrival::Duplicate;
        }
        self.seen[word] |= bit;
        self.distinct += 1;
        if pseq < self.next {
            self.out_of_order += 1;
            return Arrival::OutOfOrder;
        }
        let skipped = pseq - self.next;
        self.next = pseq + 1;
        if skipped > 0 {
            self.gaps += 1;
            Arrival::Gap(skipped)
        } else {
            Arrival::InOrder
        }
    }

    /// Publications that have not arrived (yet).
    pub fn missing(&self) -> u64 {
        self.count - self.distinct
    }

    pub fn is_complete(&self) -> bool {
        self.distinct == self.count
    }
}

/// What one subscriber saw.
#[derive(Debug)]
struct Outcome {
    seq: SeqTracker,
    /// Publish-to-receive, ns, publications after the warmup.
    latencies: Vec<u64>,
    /// Deliveries that arrived inside the measured window.
    in_window: u64,
    error: Option<String>,
}

/// The measured window on the shared clock, known once the first delivery
/// has arrived anywhere (0 until then).
#[derive(Debug, Default)]
struct Window {
    /// Estimated time of the publisher's first slot, ns.
    start_ns: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    schedule: Schedule,
    /// Publications before this one are warmup (no latency samples).
    first_measured: u64,
    warmup_ns: u64,
    duration_ns: u64,
}

fn ns(s: f64) -> u64 {
    (s.max(0.0) * 1e9) as u64
}

/// Parses `--url` as a comma-separated list of targets.
async fn targets(args: &Args) -> anyhow::Result<Vec<Target>> {
    let mut out = Vec::new();
    for url in args.url.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        out.push(Target::new(url, args.tls_ca.as_deref(), args.tls_server_name.as_deref()).await?);
    }
    if out.is_empty() {
        bail!("--url names no URL");
    }
    Ok(out)
}

/// Connects subscriber `k` to its target and subscribes it; returns the
/// target's index with the connection (they complete in any order).
async fn subscriber(args: &Args, targets: &[Target], k: usize) -> anyhow::Result<(usize, Ws)> {
    let at = k % targets.len();
    let mut ws = connect(args, &targets[at], k).await?;
    let ack = async {
        ws.send(Message::Text(subscribe_text(&args.topic).into()))
            .await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.as_str().contains(r#""type":"subscribed""#) => {
                    return anyhow::Ok(());
                }
                Some(Ok(Message::Text(t))) => bail!("subscribe answered with {}", t.as_str()),
                Some(Ok(Message::Close(f))) => bail!("closed while subscribing: {f:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("read failed while subscribing: {e}"),
                None => bail!("connection ended while subscribing"),
            }
        }
    };
    tokio::time::timeout(secs(args.timeout), ack)
        .await
        .map_err(|_| anyhow!("no subscribe acknowledgement within {} s", args.timeout))??;
    Ok((at, ws))
}

/// Reads one subscriber's deliveries until it has them all or `stop`.
async fn receive(
    mut ws: Ws,
    plan: Plan,
    window: Arc<Window>,
    mut stop: watch::Receiver<bool>,
) -> Outcome {
    let mut out = Outcome {
        seq: SeqTracker::new(plan.schedule.count),
        latencies: Vec::with_capacity(plan.schedule.count as usize),
        in_window: 0,
        error: None,
    };
    while !out.seq.is_complete() {
        let msg = tokio::select! {
            biased;
            _ = stop.changed() => break,
            msg = ws.next() => msg,
        };
        match msg {
            Some(Ok(Message::Text(t))) => {
                let now = now_ns();
                let Some(d) = parse_delivery(t.as_str()) else {
                    out.error = Some(format!("unexpected frame: {}", t.as_str()));
                    break;
                };
                let mut start = window.start_ns.load(Ordering::Acquire);
                if start == 0 {
                    let estimate = d
                        .sent_ns
                        .saturating_sub(ns(d.pseq as f64 / plan.schedule.rate))
                        .max(1);
                    start = match window.start_ns.compare_exchange(
                        0,
                        estimate,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => estimate,
                        Err(other) => other,
                    };
                }
                let from = start + plan.warmup_ns;
                if now >= from && now < from + plan.duration_ns {
                    out.in_window += 1;
                }
                out.seq.record(d.pseq);
                if d.pseq >= plan.first_measured && d.pseq < plan.schedule.count {
                    out.latencies.push(now.saturating_sub(d.sent_ns));
                }
            }
            Some(Ok(Message::Close(f))) => {
                out.error = Some(format!("server closed: {f:?}"));
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                out.error = Some(format!("read failed: {e}"));
                break;
            }
            None => {
                out.error = Some("connection ended".into());
                break;
            }
        }
    }
    let _ = tokio::time::timeout(CLOSE_WAIT, ws.send(Message::Close(None))).await;
    out
}

/// A shared-clock time as a tokio instant.
fn instant_at(t_ns: u64) -> Instant {
    let now = now_ns();
    if t_ns >= now {
        Instant::now() + Duration::from_nanos(t_ns - now)
    } else {
        Instant::now()
    }
}

fn write_ready(path: &Path, line: &Value) -> anyhow::Result<()> {
    std::fs::write(path, format!("{line}\n"))
        .with_context(|| format!("cannot write --ready-file {}", path.display()))
}

pub async fn run(args: &Args) -> anyhow::Result<Value> {
    let targets = targets(args).await?;
    let schedule = Schedule::new(args.rate, args.warmup + args.duration).map_err(|e| anyhow!(e))?;
    let plan = Plan {
        schedule,
        first_measured: (args.rate * args.warmup).round() as u64,
        warmup_ns: ns(args.warmup),
        duration_ns: ns(args.duration),
    };
    let n = args.connections;

    let opened_at = Instant::now();
    let results: Vec<anyhow::Result<(usize, Ws)>> =
        futures_util::stream::iter((0..n).map(|k| subscriber(args, &targets, k)))
            .buffer_unordered(args.connect_concurrency.max(1))
            .collect()
            .await;
    let mut conns = Vec::with_capacity(n);
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(c) => conns.push(c),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if let Some(e) = errors.first() {
        bail!("{} of {n} subscribers failed; first: {e}", errors.len());
    }
    let subscribe_s = opened_at.elapsed().as_secs_f64();

    let window = Arc::new(Window::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|(at, ws)| {
            let task = tokio::spawn(receive(ws, plan, window.clone(), stop_rx.clone()));
            (at, task)
        })
        .collect();
    let ready =
        json!({ "event": "subscribed", "connections": n, "subscribe_s": round3(subscribe_s) });
    eprintln!("loadgen: {ready}");
    if let Some(path) = &args.ready_file {
        write_ready(path, &ready)?;
    }

    // The publisher starts now; wait (bounded) for its first delivery.
    let waited = Instant::now();
    let start_ns = loop {
        match window.start_ns.load(Ordering::Acquire) {
            0 if waited.elapsed() > secs(args.timeout) => {
                let _ = stop_tx.send(true);
                bail!("no delivery within {} s of subscribing", args.timeout);
            }
            0 => tokio::time::sleep(Duration::from_millis(2)).await,
            t => break t,
        }
    };
    let first_wait_s = waited.elapsed().as_secs_f64();
    let from_ns = start_ns + plan.warmup_ns;
    let to_ns = from_ns + plan.duration_ns;
    // The last publication is due at (count - 1) / rate after the start.
    let last_due_ns = start_ns + ns((schedule.count - 1) as f64 / schedule.rate);
    let deadline = instant_at(last_due_ns + ns(args.grace));
    tokio::spawn(async move {
        tokio::time::sleep_until(deadline).await;
        let _ = stop_tx.send(true);
    });

    let watch = Watch::new(&args.watch);
    tokio::time::sleep_until(instant_at(from_ns)).await;
    let before = watch.cpu();
    tokio::time::sleep_until(instant_at(to_ns)).await;
    let after = watch.cpu();
    let rss = watch.rss();

    let mut total = Totals::default();
    // Per target, in --url's order: (totals, latencies, subscribers).
    let mut per_target: Vec<(Totals, Vec<u64>, usize)> = targets
        .iter()
        .map(|_| (Totals::default(), Vec::new(), 0))
        .collect();
    for (at, t) in tasks {
        let (sub_total, sub_latencies, subscribers) = &mut per_target[at];
        *subscribers += 1;
        match t.await {
            Ok(o) => {
                total.add(&o);
                sub_total.add(&o);
                sub_latencies.extend(o.latencies);
            }
            Err(e) => {
                total.error(format!("subscriber task failed: {e}"));
                sub_total.error(format!("subscriber task failed: {e}"));
            }
        }
    }
    let mut latencies = Vec::new();
    let mut by_url = Vec::with_capacity(targets.len());
    for (target, (t, mut lat, subscribers)) in targets.iter().zip(per_target) {
        by_url.push(json!({
            "url": target.url,
            "connections": subscribers,
            "deliveries_per_s": round3(t.in_window as f64 / args.duration),
            "latency_us": percentiles(&mut lat),
            "missing": t.missing,
            "duplicates": t.duplicates,
            "out_of_order": t.out_of_order,
            "subscribers_failed": t.failed,
        }));
        latencies.append(&mut lat);
    }
    if let Some(e) = &total.first_error {
        eprintln!("loadgen: {} subscribers failed; first: {e}", total.failed);
    }
    let expected = n as u64 * schedule.count;
    let ok = total.failed == 0
        && total.missing == 0
        && total.duplicates == 0
        && total.out_of_order == 0
        && total.unexpected == 0;
    Ok(json!({
        "ok": ok,
        "label": args.label,
        "mode": "fanout",
        "protocol": crate::protocol_name(args.protocol),
        "url": args.url,
        "connections": n,
        "topic": args.topic,
        "target_rate": args.rate,
        "publications": schedule.count,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "grace_s": args.grace,
        "subscribe_s": round3(subscribe_s),
        "first_delivery_wait_s": round3(first_wait_s),
        "clock": "CLOCK_MONOTONIC",
        "deliveries_expected": expected,
        "deliveries_received": total.received,
        "deliveries_per_s": round3(total.in_window as f64 / args.duration),
        "expected_per_s": round3(n as f64 * args.rate),
        "latency_us": percentiles(&mut latencies),
        "missing": total.missing,
        "duplicates": total.duplicates,
        "out_of_order": total.out_of_order,
        "gaps": total.gaps,
        "unexpected": total.unexpected,
        "subscribers_incomplete": total.incomplete,
        "subscribers_with_duplicates": total.with_duplicates,
        "subscribers_out_of_order": total.with_out_of_order,
        "subscribers_failed": total.failed,
        "first_error": total.first_error,
        "by_url": by_url,
        "cpu_cores": cpu_json(&before, &after, args.duration),
        "rss_kib": rss,
    }))
}

/// The subscribers' outcomes added up.
#[derive(Debug, Default)]
struct Totals {
    received: u64,
    in_window: u64,
    missing: u64,
    duplicates: u64,
    out_of_order: u64,
    gaps: u64,
    unexpected: u64,
    incomplete: u64,
    with_duplicates: u64,
    with_out_of_order: u64,
    failed: u64,
    first_error: Option<String>,
}

impl Totals {
    fn add(&mut self, o: &Outcome) {
        let s = &o.seq;
        self.received += s.received;
        self.in_window += o.in_window;
        self.missing += s.missing();
        self.duplicates += s.duplicates;
        self.out_of_order += s.out_of_order;
        self.gaps += s.gaps;
        self.unexpected += s.unexpected;
        self.incomplete += u64::from(!s.is_complete());
        self.with_duplicates += u64::from(s.duplicates > 0);
        self.with_out_of_order += u64::from(s.out_of_order > 0);
        if let Some(e) = &o.error {
            self.error(e.clone());
        }
    }

    fn error(&mut self, e: String) {
        self.failed += 1;
        self.first_error.get_or_insert(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(count: u64, seqs: &[u64]) -> (SeqTracker, Vec<Arrival>) {
        let mut t = SeqTracker::new(count);
        let arrivals = seqs.iter().map(|&s| t.record(s)).collect();
        (t, arrivals)
    }

    #[test]
    fn a_clean_sequence_is_complete() {
        let (t, a) = feed(3, &[0, 1, 2]);
        assert!(a.iter().all(|&x| x == Arrival::InOrder));
        assert!(t.is_complete());
        assert_eq!(
            (
                t.received,
                t.missing(),
                t.duplicates,
                t.out_of_order,
                t.gaps
            ),
            (3, 0, 0, 0, 0)
        );
    }

    #[test]
    fn gaps_duplicates_and_reordering_are_told_apart() {
        use Arrival::*;
        // (missing, duplicates, out_of_order, gaps, unexpected)
        type Counts = (u64, u64, u64, u64, u64);
        let cases: &[(u64, &[u64], &[Arrival], Counts)] = &[
            // (count, received, arrivals, (missing, duplicates, out_of_order, gaps, unexpected))
            (
                5,
                &[0, 2, 3, 4],
                &[InOrder, Gap(1), InOrder, InOrder],
                (1, 0, 0, 1, 0),
            ),
            (
                5,
                &[0, 2, 1, 3, 4],
                &[InOrder, Gap(1), OutOfOrder, InOrder, InOrder],
                (0, 0, 1, 1, 0),
            ),
            (
                3,
                &[0, 1, 1, 2],
                &[InOrder, InOrder, Duplicate, InOrder],
                (0, 1, 0, 0, 0),
            ),
            (
                3,
                &[0, 2, 2, 0],
                &[InOrder, Gap(1), Duplicate, Duplicate],
                (1, 2, 0, 1, 0),
            ),
            (
                3,
                &[0, 1, 2, 3, 99],
                &[InOrder, InOrder, InOrder, Unexpected, Unexpected],
                (0, 0, 0, 0, 2),
            ),
            (
                4,
                &[3, 2, 1, 0],
                &[Gap(3), OutOfOrder, OutOfOrder, OutOfOrder],
                (0, 0, 3, 1, 0),
            ),
            (130, &[], &[], (130, 0, 0, 0, 0)),
        ];
        for (count, seqs, arrivals, (missing, dups, ooo, gaps, unexpected)) in cases {
            let (t, a) = feed(*count, seqs);
            assert_eq!(&a, arrivals, "{seqs:?}");
            assert_eq!(
                (
                    t.missing(),
                    t.duplicates,
                    t.out_of_order,
                    t.gaps,
                    t.unexpected
                ),
                (*missing, *dups, *ooo, *gaps, *unexpected),
                "{seqs:?}"
            );
            assert_eq!(t.received, seqs.len() as u64);
        }
    }

    #[test]
    fn bits_past_the_first_word_are_tracked() {
        let all: Vec<u64> = (0..200).collect();
        let (t, _) = feed(200, &all);
        assert!(t.is_complete());
        let (t, a) = feed(200, &[64, 64, 199, 130]);
        assert_eq!(
            a,
            [
                Arrival::Gap(64),
                Arrival::Duplicate,
                Arrival::Gap(134),
                Arrival::OutOfOrder
            ]
        );
        assert_eq!(t.missing(), 197);
    }

    #[test]
    fn totals_count_subscribers_by_trouble() {
        let mut total = Totals::default();
        let clean = feed(2, &[0, 1]).0;
        let dup = feed(2, &[0, 0, 1]).0;
        let short = feed(2, &[1, 0]).0;
        for (seq, error) in [
            (clean, None),
            (dup, None),
            (short, Some("closed".to_owned())),
        ] {
            total.add(&Outcome {
                seq,
                latencies: vec![],
                in_window: 1,
                error,
            });
        }
        assert_eq!(total.received, 7);
        assert_eq!(total.in_window, 3);
        assert_eq!(
            (total.with_duplicates, total.with_out_of_order, total.failed),
            (1, 1, 1)
        );
        assert_eq!(total.incomplete, 0);
        assert_eq!(total.first_error.as_deref(), Some("closed"));
    }
}
