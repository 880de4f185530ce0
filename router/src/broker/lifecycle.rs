//! The fate of a request, from its command to its single terminal frame.
//!
//! ```text
//! Command::Request: bytes charged, deadline armed
//!   └─ place ─┬─ a worker with a free credit ─▶ pending ─▶ reply … done, or error
//!             ├─ all at capacity ─▶ waiting ─▶ placed when a credit comes back
//!             └─ no live worker, or the wait queue full ─▶ no_workers / overloaded
//! pending, its worker lost or answering a retryable error, before any reply
//! reached the client, with an attempt and time left
//!   └─ retrying ─(backoff)─▶ place again: same deadline, attempt + 1
//! deadline, cancel, disconnect ─▶ the router's terminal frame; a pending
//! request becomes a zombie that keeps its credit until the worker's
//! terminal message or the end of the cancel grace
//! ```
//!
//! Every path out ends in `complete` (the worker's terminal frame was
//! delivered) or `fail` (the router's), which disarm the deadline, tell the
//! breaker, record the latency and free the client's id.

use bridge_proto::{self as proto, codes, ToWorker};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{
    requests::{backoff, InFlight, Pending, Taken},
    Broker, Outbox, PeerId, RequestCmd,
};
use crate::{
    client::{unix_ms, OutFrame},
    hub::Hub,
    ids::Cid,
    policy::breaker::Outcome,
};

/// Outcome of a worker's error reply, for the breaker: errors that say the
/// worker (not the request) is at fault count as failures.
fn error_outcome(code: &str, retryable: bool) -> Outcome {
    if retryable || matches!(code, codes::WORKER_ERROR | codes::INTERNAL | codes::TIMEOUT) {
        Outcome::Failure
    } else {
        Outcome::Success
    }
}

impl Broker {
    pub(super) fn on_request(&mut self, cmd: RequestCmd, now: Instant, out: &mut dyn Outbox) {
        let (charge, over) = self
            .requests
            .charge(cmd.size, self.cfg.max_held_request_bytes);
        let deadline_at = now + cmd.timeout;
        let deadline = self.deadlines.insert_at(cmd.cid, deadline_at);
        let req = InFlight {
            cmd,
            charge,
            attempt: 1,
            deadline,
            deadline_at,
            avoid: None,
            started: now,
        };
        if over {
            self.metrics.bound_hit("held_request_bytes");
            let msg = "the router holds too much request data: try again shortly".to_owned();
            self.fail(req, codes::OVERLOADED, msg, Outcome::Neutral, false, now);
            return;
        }
        self.place(req, now, out);
    }

    /// Sends a request to a worker with a free credit, or queues it.
    fn place(&mut self, req: InFlight, now: Instant, out: &mut dyn Outbox) {
        let route = req.cmd.route.clone();
        let service = &route.service;
        if !self.workers.serves(service, now) {
            let msg = format!("no live worker serves `{service}`");
            self.fail(req, codes::NO_WORKERS, msg, Outcome::Failure, false, now);
            return;
        }
        match self.target(&req, now, out) {
            Some(peer) => self.dispatch(req, peer, now, out),
            None if self.requests.waiting_is_full() => {
                let msg = "every worker is at capacity and the wait queue is full".to_owned();
                self.fail(req, codes::OVERLOADED, msg, Outcome::Neutral, false, now);
            }
            None => {
                debug!(correlation.id = %req.cmd.cid, service = %service, "all workers busy: request waits");
                self.requests.wait(req);
            }
        }
    }

    /// The worker with a free credit to send `req` to now: its connection's
    /// home worker on an affinity route, else the least loaded one (the
    /// worker that failed the last attempt only if no other can).
    fn target(&mut self, req: &InFlight, now: Instant, out: &mut dyn Outbox) -> Option<PeerId> {
        if req.cmd.affinity {
            self.home_of(&req.cmd.conn, now, out)
                .map(|(home, _, _)| home)
                .filter(|home| self.workers.has_credit(home))
        } else {
            self.workers
                .pick(&req.cmd.route.service, true, req.avoid.as_ref(), now)
        }
    }

    fn dispatch(&mut self, mut req: InFlight, peer: PeerId, now: Instant, out: &mut dyn Outbox) {
        let Some(worker) = self.workers.take_credit(&peer) else {
            // Callers pick a registered worker; never lose the request anyway.
            let msg = "the chosen worker is gone".to_owned();
            self.fail(req, codes::WORKER_ERROR, msg, Outcome::Failure, false, now);
            return;
        };
        let left = req.left(now);
        // Keep the data only while another attempt may need it.
        let sent_once = if req.may_retry() {
            None
        } else {
            req.charge.release();
            Some(std::mem::take(&mut req.cmd.data))
        };
        let cmd = &req.cmd;
        debug!(correlation.id = %cmd.cid, session.id = %cmd.conn, worker = %worker.name, r#type = %cmd.msg_type, attempt = req.attempt, "request sent to worker");
        // Encoded from the request's own fields: nothing copied first.
        out.send_request(
            &peer,
            worker.version,
            &proto::RequestRef {
                cid: cmd.cid.as_str(),
                conn: &cmd.conn.0,
                route: &cmd.route.path,
                service: &cmd.route.service,
                msg_type: &cmd.msg_type,
                id: &cmd.client_id,
                data: sent_once.as_ref().unwrap_or(&cmd.data),
                timeout_ms: left.as_millis() as u64,
                deadline_ms: unix_ms() + left.as_millis() as u64,
                attempt: req.attempt,
                claims: cmd.claims.as_ref(),
            },
        );
        self.requests.insert_pending(Pending {
            req,
            worker: peer,
            partial_sent: false,
        });
    }

    /// Hands queued requests of these services to workers with free credits.
    pub(super) fn drain_waiting(
        &mut self,
        services: &[String],
        now: Instant,
        out: &mut dyn Outbox,
    ) {
        for service in services {
            // Affinity requests whose home worker is busy are set aside (in
            // order) so they do not hold up requests behind them.
            let mut set_aside: Vec<InFlight> = Vec::new();
            while self.workers.pick(service, true, None, now).is_some() {
                let Some(req) = self.requests.next_waiting(service) else {
                    break;
                };
                match self.target(&req, now, out) {
                    Some(peer) => self.dispatch(req, peer, now, out),
                    None => set_aside.push(req),
                }
            }
            self.requests.wait_again_first(service, set_aside);
        }
    }

    /// The router stops waiting for a request (client cancel, disconnect).
    /// `notify_client`: send the client its `cancelled` terminal frame.
    pub(super) fn abandon(
        &mut self,
        cid: &Cid,
        reason: &str,
        notify_client: bool,
        now: Instant,
        out: &mut dyn Outbox,
    ) {
        let req = match self.requests.take(cid) {
            Some(Taken::Pending(p)) => {
                self.cancel_at_worker(cid, p.worker, reason, now, out);
                p.req
            }
            Some(Taken::Waiting(r) | Taken::Retrying(r)) => r,
            None => return,
        };
        if notify_client {
            let msg = format!("request cancelled ({reason})");
            self.fail(req, codes::CANCELLED, msg, Outcome::Neutral, false, now);
        } else {
            self.deadlines.try_remove(&req.deadline);
            req.record(Outcome::Neutral, now);
        }
    }

    /// A request's deadline passed.
    pub fn on_deadline(&mut self, cid: Cid, out: &mut dyn Outbox) {
        let now = Instant::now();
        let (req, msg) = match self.requests.take(&cid) {
            Some(Taken::Pending(p)) => {
                self.cancel_at_worker(&cid, p.worker, "timeout", now, out);
                warn!(correlation.id = %cid, session.id = %p.req.cmd.conn, "request timed out at the worker");
                (p.req, "no final reply before the request's deadline")
            }
            Some(Taken::Waiting(req)) => {
                warn!(correlation.id = %cid, session.id = %req.cmd.conn, "request timed out waiting for a free worker");
                (req, "every worker stayed busy until the request's deadline")
            }
            Some(Taken::Retrying(req)) => {
                warn!(correlation.id = %cid, session.id = %req.cmd.conn, "request timed out between attempts");
                (req, "the request's deadline passed before another attempt")
            }
            None => return,
        };
        self.fail(
            req,
            codes::TIMEOUT,
            msg.to_owned(),
            Outcome::Failure,
            true,
            now,
        );
    }

    /// Sends `cancel` for a request at `peer`, which keeps its credit (a
    /// zombie) until its terminal message or the grace's end.
    fn cancel_at_worker(
        &mut self,
        cid: &Cid,
        peer: PeerId,
        reason: &str,
        now: Instant,
        out: &mut dyn Outbox,
    ) {
        out.send(
            &peer,
            ToWorker::Cancel(proto::Cancel {
                cid: cid.to_string(),
                reason: reason.to_owned(),
            }),
        );
        self.zombie_timers
            .insert_at(*cid, now + self.cfg.cancel_grace);
        self.requests.add_zombie(*cid, peer);
    }

    /// A cancelled request's grace is over. If its worker still has not
    /// sent the terminal message (it may never: a request it could not
    /// decode, a handler that ignores cancellation), the credit comes back
    /// now, and a terminal message arriving later is dropped.
    pub fn on_cancel_grace(&mut self, cid: Cid, out: &mut dyn Outbox) {
        let Some(peer) = self.requests.take_zombie(&cid) else {
            return; // answered in time, or its worker is gone
        };
        let worker = self.workers.get(&peer).map_or("?", |w| w.name.as_str());
        warn!(correlation.id = %cid, worker = %worker, "no terminal message within the grace after cancel: credit freed");
        self.metrics.credit_reclaimed();
        self.release(&peer, Instant::now(), out);
    }

    /// A retry's backoff is over: try another worker.
    pub fn on_retry_due(&mut self, cid: Cid, out: &mut dyn Outbox) {
        if let Some(req) = self.requests.take_retrying(&cid) {
            self.place(req, Instant::now(), out);
        }
    }

    /// After a transient failure of a request's attempt at its worker (the
    /// worker's credit is already back): schedule another attempt if
    /// allowed, else fail it with `code`. `outcome`: what the failure means
    /// for the route's breaker if no retry happens.
    pub(super) fn retry_or_fail(
        &mut self,
        failed: Pending,
        code: &str,
        message: String,
        outcome: Outcome,
        now: Instant,
    ) {
        let mut req = failed.req;
        let backoff = backoff(req.attempt, (self.jitter)());
        if failed.partial_sent || !req.may_retry() || backoff >= req.left(now) {
            self.fail(req, code, message, outcome, false, now);
            return;
        }
        info!(correlation.id = %req.cmd.cid, attempt = req.attempt + 1, backoff_ms = backoff.as_millis() as u64, "retrying on another worker");
        req.attempt += 1;
        req.avoid = Some(failed.worker);
        self.retry_timers.insert_at(req.cmd.cid, now + backoff);
        self.requests.retry_later(req);
    }

    // ----- answers from workers ---------------------------------------------------

    pub(super) fn on_reply(
        &mut self,
        peer: PeerId,
        r: proto::Reply,
        now: Instant,
        out: &mut dyn Outbox,
    ) {
        let Some(cid) = Cid::parse(&r.cid) else {
            debug!(correlation.id = %r.cid, "reply for a request this worker does not hold: dropped");
            return;
        };
        let Some(p) = self.requests.pending_at(&cid, &peer) else {
            self.late(&peer, cid, r.done, now, out);
            return;
        };
        let cmd = &p.req.cmd;
        let frame = OutFrame::reply(
            r.msg_type.unwrap_or_else(|| cmd.msg_type.clone()),
            Some(cmd.client_id.clone()),
            Some(cid),
            r.data,
            r.done,
        );
        // One look-up of the connection for both steps below.
        let client = self.hub.get(&cmd.conn);
        if let (true, Some(c)) = (r.done, &client) {
            // Free the client's id before the client can see the last
            // frame: it may reuse the id at once.
            c.end_request(&cmd.client_key, &cmd.cid);
        }
        p.partial_sent = true;
        if let Some(c) = client {
            c.send(frame.into());
        }
        if r.done {
            self.complete(&cid, Outcome::Success, now, out);
        }
    }

    pub(super) fn on_error(
        &mut self,
        peer: PeerId,
        e: proto::ErrorReply,
        now: Instant,
        out: &mut dyn Outbox,
    ) {
        let Some(cid) = Cid::parse(&e.cid) else {
            debug!(correlation.id = %e.cid, "error for a request this worker does not hold: dropped");
            return;
        };
        let Some(p) = self.requests.pending_at(&cid, &peer) else {
            self.late(&peer, cid, true, now, out);
            return;
        };
        let code = if codes::is_valid_code(&e.code) {
            e.code
        } else {
            codes::WORKER_ERROR.to_owned()
        };
        if e.retryable {
            // Invariant: checked just above that the request is pending here.
            let Some(p) = self.requests.take_pending(&cid) else {
                return;
            };
            self.release(&peer, now, out);
            self.retry_or_fail(p, &code, e.message, Outcome::Failure, now);
            return;
        }
        let outcome = error_outcome(&code, false);
        let cmd = &p.req.cmd;
        let frame = OutFrame::error(
            Some(cmd.client_id.clone()),
            Some(cid),
            &code,
            e.message,
            e.retry_after_ms,
        );
        let conn = cmd.conn.clone();
        free_client_id(&self.hub, cmd);
        self.deliver(&conn, frame);
        self.complete(&cid, outcome, now, out);
    }

    /// A reply for a request the router no longer waits for (timed out,
    /// cancelled, or not this worker's): dropped, but a terminal one frees
    /// the zombie's credit.
    fn late(
        &mut self,
        peer: &PeerId,
        cid: Cid,
        terminal: bool,
        now: Instant,
        out: &mut dyn Outbox,
    ) {
        if self.requests.is_zombie_at(&cid, peer) {
            debug!(correlation.id = %cid, "late reply dropped");
            if terminal {
                self.requests.take_zombie(&cid);
                self.release(peer, now, out);
            }
        } else {
            // Also the fate of a terminal message after its credit was
            // reclaimed (`on_cancel_grace`).
            debug!(correlation.id = %cid, "reply for a request this worker does not hold: dropped");
        }
    }

    // ----- the two ways out ---------------------------------------------------------

    /// The worker's terminal frame was delivered (the client id was freed
    /// before it was).
    fn complete(&mut self, cid: &Cid, outcome: Outcome, now: Instant, out: &mut dyn Outbox) {
        let Some(p) = self.requests.take_pending(cid) else {
            return;
        };
        self.deadlines.try_remove(&p.req.deadline);
        p.req.record(outcome, now);
        self.metrics.request_finished(
            &p.req.cmd.route.path,
            now.saturating_duration_since(p.req.started),
        );
        self.release(&p.worker, now, out);
    }

    /// Sends the router's terminal error for a request and forgets it.
    /// `deadline_fired`: the deadline key already left the queue.
    pub(super) fn fail(
        &mut self,
        req: InFlight,
        code: &str,
        message: String,
        outcome: Outcome,
        deadline_fired: bool,
        now: Instant,
    ) {
        if !deadline_fired {
            self.deadlines.try_remove(&req.deadline);
        }
        req.record(outcome, now);
        self.metrics.request_finished(
            &req.cmd.route.path,
            now.saturating_duration_since(req.started),
        );
        let cmd = req.cmd;
        free_client_id(&self.hub, &cmd);
        self.deliver(
            &cmd.conn,
            OutFrame::error(Some(cmd.client_id), Some(cmd.cid), code, message, None),
        );
    }
}

/// The request is over for its client: its id may be reused. Done before
/// the last frame is queued, because the client may reuse the id as soon
/// as it reads that frame.
fn free_client_id(hub: &Hub, cmd: &RequestCmd) {
    if let Some(c) = hub.get(&cmd.conn) {
        c.end_request(&cmd.client_key, &cmd.cid);
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use bridge_proto::{codes, ErrorReply, FromWorker};
    use futures_util::StreamExt;
    use serde_json::json;
    use tokio::time::Instant;

    use super::super::testkit::*;
    use crate::{
        broker::{BreakerTicket, Command, RequestCmd},
        client::OutFrame,
        ids::Cid,
        policy::breaker::{Breaker, BreakerPolicy, BreakerState},
    };

    #[tokio::test]
    async fn no_worker_gives_one_no_workers_frame() {
        let mut f = fixture();
        let (conn, shared, mut rx) = f.client();
        f.request(&conn, &shared, "1", 1000);
        let got = frames(&mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].error.as_ref().unwrap().code, codes::NO_WORKERS);
        assert_eq!(shared.inflight_count(), 0);
    }

    #[tokio::test]
    async fn credits_are_never_exceeded_and_queued_requests_flow_on_release() {
        let mut f = fixture();
        let w = peer("w1");
        f.hello(&w, 2);
        let (conn, shared, mut rx) = f.client();
        let cids: Vec<Cid> = (0..5)
            .map(|i| f.request(&conn, &shared, &i.to_string(), 10_000))
            .collect();
        assert_eq!(
            f.out.requests_to(&w).len(),
            2,
            "capacity 2 means 2 outstanding"
        );
        f.reply(&w, &cids[0], true);
        assert_eq!(
            f.out.requests_to(&w).len(),
            3,
            "a release lets one waiting request through"
        );
        f.reply(&w, &cids[1], false);
        assert_eq!(
            f.out.requests_to(&w).len(),
            3,
            "a partial reply does not release a credit"
        );
        let got = frames(&mut rx);
        assert_eq!(got.iter().filter(|fr| fr.done == Some(true)).count(), 1);
        assert_eq!(f.broker.pending_count(), 4);
    }

    #[tokio::test]
    async fn replies_from_another_worker_are_not_delivered() {
        let mut f = fixture();
        let (a, b) = (peer("a"), peer("b"));
        f.hello(&a, 1);
        f.hello(&b, 1);
        let (conn, shared, mut rx) = f.client();
        let cid = f.request(&conn, &shared, "1", 10_000);
        let holder = if f.out.requests_to(&a).is_empty() {
            &b
        } else {
            &a
        };
        let other = if holder == &a { b.clone() } else { a.clone() };
        f.reply(&other, &cid, true);
        assert!(frames(&mut rx).is_empty());
        let holder = holder.clone();
        f.reply(&holder, &cid, true);
        assert_eq!(frames(&mut rx).len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_gives_timeout_and_keeps_the_credit_until_the_worker_answers() {
        let mut f = fixture();
        let w = peer("w");
        f.hello(&w, 1);
        let (conn, shared, mut rx) = f.client();
        let cid = f.request(&conn, &shared, "1", 500);
        let expired = f.broker.deadlines.next().await.unwrap().into_inner();
        assert_eq!(expired, cid);
        f.broker.on_deadline(expired, &mut f.out);
        let got = frames(&mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].error.as_ref().unwrap().code, codes::TIMEOUT);
        assert_eq!(f.out.cancels(), vec![(w.clone(), "timeout".to_string())]);

        // Capacity 1 and the zombie holds it: the next request waits.
        let second = f.request(&conn, &shared, "2", 10_000);
        assert_eq!(f.out.requests_to(&w).len(), 1);
        // The worker's late terminal answer is dropped but frees the credit.
        f.broker.on_worker_message(
            w.clone(),
            2,
            FromWorker::Error(ErrorReply {
                cid: cid.to_string(),
                code: "cancelled".into(),
                message: "late".into(),
                retryable: false,
                retry_after_ms: None,
            }),
            &mut f.out,
        );
        assert!(
            frames(&mut rx).is_empty(),
            "late answers never reach the client"
        );
        assert_eq!(
            f.out.requests_to(&w),
            vec![cid.to_string(), second.to_string()]
        );
    }

    #[tokio::test]
    async fn client_cancel_sends_cancelled_and_tells_the_worker() {
        let mut f = fixture();
        let w = peer("w");
        f.hello(&w, 1);
        let (conn, shared, mut rx) = f.client();
        let cid = f.request(&conn, &shared, "1", 10_000);
        f.broker.on_command(
            Command::Cancel {
                cid,
                reason: "client",
            },
            &mut f.out,
        );
        let got = frames(&mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].error.as_ref().unwrap().code, codes::CANCELLED);
        assert_eq!(f.out.cancels(), vec![(w.clone(), "client".to_string())]);
        f.reply(&w, &cid, true);
        assert!(frames(&mut rx).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_credit_comes_back_after_the_cancel_grace_without_a_terminal_message() {
        let mut f = fixture();
        let w = peer("w");
        f.hello(&w, 1);
        let (conn, shared, mut rx) = f.client();
        // The worker cannot decode this request and never answers it.
        let stuck = f.request(&conn, &shared, "1", 100);
        let expired = f.broker.deadlines.next().await.unwrap().into_inner();
        f.broker.on_deadline(expired, &mut f.out);
        assert_eq!(
            frames(&mut rx)[0].error.as_ref().unwrap().code,
            codes::TIMEOUT
        );
        let second = f.request(&conn, &shared, "2", 60_000);
        assert_eq!(
            f.out.requests_to(&w),
            vec![stuck.to_string()],
            "the zombie holds the only credit"
        );

        let before = tokio::time::Instant::now();
        let due = f.broker.zombie_timers.next().await.unwrap().into_inner();
        assert_eq!(
            before.elapsed(),
            Duration::from_secs(5),
            "exactly the grace"
        );
        assert_eq!(due, stuck);
        f.broker.on_cancel_grace(due, &mut f.out);
        assert_eq!(
            f.out.requests_to(&w),
            vec![stuck.to_string(), second.to_string()],
            "the freed credit takes the waiting request"
        );
        // A terminal message after the reclaim is dropped and frees nothing twice.
        f.reply(&w, &stuck, true);
        let third = f.request(&conn, &shared, "3", 60_000);
        assert_eq!(
            f.out.requests_to(&w).len(),
            2,
            "{third:?} must wait for a credit"
        );
    }

    #[tokio::test]
    async fn held_request_bytes_are_bounded_and_given_back() {
        let mut f = fixture();
        f.broker.cfg.max_held_request_bytes = 250;
        let w = peer("w");
        f.hello(&w, 1);
        let (conn, shared, mut rx) = f.client();
        // 100 bytes each: the first goes out (no retries: not held), the
        // next two wait (held), the fourth would pass 250.
        let first = f.request(&conn, &shared, "1", 60_000);
        assert_eq!(f.broker.held_request_bytes(), 0);
        f.request(&conn, &shared, "2", 60_000);
        f.request(&conn, &shared, "3", 60_000);
        assert_eq!(f.broker.held_request_bytes(), 200);
        f.request(&conn, &shared, "4", 60_000);
        let got = frames(&mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].error.as_ref().unwrap().code, codes::OVERLOADED);
        assert_eq!(got[0].id, Some(json!("4")));
        assert_eq!(
            f.broker.held_request_bytes(),
            200,
            "a refused request holds nothing"
        );
        f.reply(&w, &first, true);
        assert_eq!(
            f.broker.held_request_bytes(),
            100,
            "request 2 left the queue"
        );
    }

    #[tokio::test]
    async fn worker_error_codes_pass_through_when_well_formed() {
        let mut f = fixture();
        let w = peer("w");
        f.hello(&w, 2);
        let (conn, shared, mut rx) = f.client();
        for (client_id, code, want) in [
            ("1", "invalid_image", "invalid_image"),
            ("2", "Not A Code", codes::WORKER_ERROR),
        ] {
            let cid = f.request(&conn, &shared, client_id, 10_000);
            f.broker.on_worker_message(
                w.clone(),
                2,
                FromWorker::Error(ErrorReply {
                    cid: cid.to_string(),
                    code: code.into(),
                    message: "m".into(),
                    retryable: false,
                    retry_after_ms: None,
                }),
                &mut f.out,
            );
            let got = frames(&mut rx);
            assert_eq!(got[0].error.as_ref().unwrap().code, want);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn expired_waiting_requests_leave_the_queue() {
        let mut f = fixture();
        let w = peer("w");
        f.hello(&w, 1);
        let (conn, shared, _rx) = f.client();
        f.request(&conn, &shared, "busy", 60_000);
        for i in 0..5 {
            f.request(&conn, &shared, &i.to_string(), 100);
        }
        assert_eq!(f.broker.requests.queue_len("svc"), Some(5));
        for _ in 0..5 {
            let cid = f.broker.deadlines.next().await.unwrap().into_inner();
            f.broker.on_deadline(cid, &mut f.out);
        }
        assert!(
            f.broker.requests.queue_len("svc").is_none(),
            "no dead ids left behind"
        );
    }

    // ----- deadlines, on paused time ----------------------------------------------

    /// Advances to 1 ms before `left` has passed (nothing yet), then to
    /// exactly `left` (the timeout frame, which it returns).
    async fn times_out_exactly_after(
        f: &mut Fixture,
        rx: &mut crate::outbox::OutboxRx,
        left: Duration,
    ) -> OutFrame {
        f.advance(left - ms(1)).await;
        assert_eq!(frames(rx), vec![], "1 ms before the deadline: nothing");
        f.advance(ms(1)).await;
        let got = frames(rx);
        assert_eq!(error_codes(&got), vec![codes::TIMEOUT], "at the deadline");
        got.into_iter().next().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_pending_request_times_out_exactly_at_its_deadline() {
        let mut f = fixture();
        let w = peer("w");
        f.hello(&w, 1);
        let (conn, shared, mut rx) = f.client();
        f.request(&conn, &shared, "1", 500);
        f.advance(ms(499)).await;
        assert_eq!(frames(&mut rx), vec![], "1 ms before: nothing");
        assert!(
            f.out.cancels().is_empty(),
            "1 ms before: the worker keeps it"
        );
        f.advance(ms(1)).await;
        let got = frames(&mut rx);
        assert_eq!(error_codes(&got), vec![codes::TIMEOUT], "at the deadline");
        assert_eq!(got[0].id, Some(json!("1")));
        assert_eq!(f.out.cancels(), vec![(w, "timeout".to_string())]);
        assert_eq!(shared.inflight_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_request_times_out_exactly_at_its_deadline() {
        let mut f = fixture();
        let w = peer("w");
        f.hello(&w, 1);
        let (conn, shared, mut rx) = f.client();
        let busy = f.request(&conn, &shared, "busy", 60_000);
        f.request(&conn, &shared, "waits", 500);
        assert_eq!(f.broker.requests.queue_len("svc"), Some(1));
        let frame = times_out_exactly_after(&mut f, &mut rx, ms(500)).await;
        assert_eq!(frame.id, Some(json!("waits")));
        assert_eq!(f.broker.requests.queue_len("svc"), None);
        assert_eq!(
            f.out.requests_to(&w),
            vec![busy.to_string()],
            "it never reached the worker"
        );
        assert!(f.out.cancels().is_empty(), "nothing to cancel");
        assert_eq!(f.broker.pending_count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retrying_request_times_out_exactly_at_its_deadline() {
        let mut f = fixture();
        // A backoff of 50.5 ms: shorter than the 51 ms left, so the retry is
        // scheduled, but due in the deadline's millisecond.
        f.broker.jitter = || 0.02;
        let w = peer("w");
        f.hello(&w, 1);
        let (conn, shared, mut rx) = f.client();
        let cmd = RequestCmd {
            retries: 1,
            ..f.cmd(&conn, "1", 100)
        };
        let cid = f.submit(&shared, cmd);
        f.advance(ms(49)).await;
        f.error(&w, &cid, "flaky", true);
        assert_eq!(f.broker.pending_count(), 1, "retrying");
        times_out_exactly_after(&mut f, &mut rx, ms(51)).await;
        assert_eq!(
            f.out.requests_to(&w).len(),
            1,
            "no attempt after the deadline"
        );
        assert_eq!(f.broker.pending_count(), 0);
    }

    // ----- retries, on paused time ------------------------------------------------

    #[tokio::test(start_paused = true)]
    async fn retries_wait_50ms_doubling_on_another_worker_up_to_the_allowed_attempts() {
        let mut f = fixture();
        f.broker.jitter = || 0.0;
        let (a, b) = (peer("a"), peer("b"));
        f.hello(&a, 1);
        f.hello(&b, 1);
        let (conn, shared, mut rx) = f.client();
        let cmd = RequestCmd {
            retries: 2,
            ..f.cmd(&conn, "1", 10_000)
        };
        let cid = f.submit(&shared, cmd);
        let first = f.out.requests()[0].0.clone();
        let other = if first == a { b.clone() } else { a.clone() };

        f.error(&first, &cid, "flaky", true);
        f.advance(ms(49)).await;
        assert_eq!(f.out.requests().len(), 1, "49 ms: still backing off");
        f.advance(ms(1)).await;
        let sent = f.out.requests();
        assert_eq!(sent.len(), 2, "50 ms: the second attempt");
        assert_eq!(sent[1].0, other, "on another worker");
        assert_eq!((sent[1].1.attempt, sent[1].1.timeout_ms), (2, 9_950));

        f.error(&other, &cid, "flaky", true);
        f.advance(ms(99)).await;
        assert_eq!(f.out.requests().len(), 2, "99 ms: still backing off");
        f.advance(ms(1)).await;
        let sent = f.out.requests();
        assert_eq!(sent.len(), 3, "100 ms: the third attempt");
        assert_eq!(sent[2].0, first, "the one that failed last is avoided");
        assert_eq!(sent[2].1.attempt, 3);

        f.error(&first, &cid, "flaky", true);
        let got = frames(&mut rx);
        assert_eq!(
            error_codes(&got),
            vec!["flaky"],
            "no attempt left: the worker's error"
        );
        f.advance(ms(1_000)).await;
        assert_eq!(f.out.requests().len(), 3);
        assert!(frames(&mut rx).is_empty());
        assert_eq!(f.broker.pending_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_jitter_adds_at_most_half_the_backoff() {
        let mut f = fixture();
        f.broker.jitter = || 1.0 - f64::EPSILON;
        let w = peer("w");
        f.hello(&w, 1);
        let (conn, shared, _rx) = f.client();
        let cmd = RequestCmd {
            retries: 1,
            ..f.cmd(&conn, "1", 10_000)
        };
        let cid = f.submit(&shared, cmd);
        f.error(&w, &cid, "flaky", true);
        f.advance(ms(74)).await;
        assert_eq!(f.out.requests_to(&w).len(), 1, "74 ms: still backing off");
        f.advance(ms(1)).await;
        assert_eq!(f.out.requests_to(&w).len(), 2, "75 ms at most");
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_keeps_the_first_deadline() {
        let mut f = fixture();
        f.broker.jitter = || 0.0;
        let w = peer("w");
        f.hello(&w, 1);
        let (conn, shared, mut rx) = f.client();
        let cmd = RequestCmd {
            retries: 1,
            ..f.cmd(&conn, "1", 1_000)
        };
        let cid = f.submit(&shared, cmd);
        f.advance(ms(300)).await;
        f.error(&w, &cid, "flaky", true);
        f.advance(ms(50)).await;
        let sent = f.out.requests();
        assert_eq!((sent[1].1.attempt, sent[1].1.timeout_ms), (2, 650));
        // Times out at 1 000 ms from the first attempt, not from the retry.
        times_out_exactly_after(&mut f, &mut rx, ms(650)).await;
        assert_eq!(f.out.cancels(), vec![(w, "timeout".to_string())]);
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_when_the_backoff_would_reach_the_deadline() {
        // Failing with 50 ms left: a 50 ms backoff would end at the deadline.
        for (fail_at, retried) in [(949, true), (950, false)] {
            let mut f = fixture();
            f.broker.jitter = || 0.0;
            let w = peer("w");
            f.hello(&w, 1);
            let (conn, shared, mut rx) = f.client();
            let cmd = RequestCmd {
                retries: 1,
                ..f.cmd(&conn, "1", 1_000)
            };
            let cid = f.submit(&shared, cmd);
            f.advance(ms(fail_at)).await;
            f.error(&w, &cid, "flaky", true);
            let codes_now = error_codes(&frames(&mut rx));
            f.advance(ms(50)).await;
            if retried {
                assert!(codes_now.is_empty(), "failed at {fail_at} ms");
                assert_eq!(f.out.requests_to(&w).len(), 2, "failed at {fail_at} ms");
            } else {
                assert_eq!(codes_now, vec!["flaky"], "failed at {fail_at} ms");
                assert_eq!(f.out.requests_to(&w).len(), 1, "failed at {fail_at} ms");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_after_a_partial_reply() {
        for lost in [false, true] {
            let mut f = fixture();
            f.broker.jitter = || 0.0;
            let (a, b) = (peer("a"), peer("b"));
            f.hello(&a, 1);
            f.hello(&b, 1);
            let (conn, shared, mut rx) = f.client();
            let cmd = RequestCmd {
                retries: 3,
                ..f.cmd(&conn, "1", 10_000)
            };
            let cid = f.submit(&shared, cmd);
            let holder = f.out.requests()[0].0.clone();
            f.reply(&holder, &cid, false);
            let want = if lost {
                f.broker.on_connection_closed(&holder, &mut f.out);
                codes::WORKER_ERROR
            } else {
                f.error(&holder, &cid, "flaky", true);
                "flaky"
            };
            let got = frames(&mut rx);
            assert_eq!(got.len(), 2, "lost={lost}: the partial reply, then the end");
            assert_eq!(error_codes(&got), vec![want], "lost={lost}");
            f.advance(ms(1_000)).await;
            assert_eq!(f.out.requests().len(), 1, "lost={lost}: never sent again");
        }
    }

    // ----- the breaker, told on the broker's clock --------------------------------

    #[tokio::test(start_paused = true)]
    async fn timeouts_open_the_breaker_which_half_opens_exactly_open_for_later() {
        let policy = BreakerPolicy {
            failure_threshold: 2,
            open_for: ms(1_000),
        };
        let breaker = Arc::new(Breaker::default());
        let mut f = fixture();
        let w = peer("w");
        f.hello(&w, 8);
        let (conn, shared, mut rx) = f.client();
        let send = |f: &mut Fixture, id: &str, timeout_ms: u64| {
            let admit = breaker.admit(Instant::now(), &policy).unwrap();
            let cmd = RequestCmd {
                breaker: Some(BreakerTicket {
                    breaker: breaker.clone(),
                    admit,
                    policy,
                }),
                ..f.cmd(&conn, id, timeout_ms)
            };
            f.submit(&shared, cmd)
        };
        send(&mut f, "1", 100);
        send(&mut f, "2", 200);
        f.advance(ms(100)).await;
        assert_eq!(
            breaker.state(Instant::now()),
            BreakerState::Closed,
            "1 failure"
        );
        f.advance(ms(100)).await;
        assert_eq!(error_codes(&frames(&mut rx)), vec![codes::TIMEOUT; 2]);
        assert_eq!(
            breaker.state(Instant::now()),
            BreakerState::Open,
            "2 in a row"
        );
        assert_eq!(breaker.admit(Instant::now(), &policy), Err(ms(1_000)));

        f.advance(ms(999)).await;
        assert_eq!(breaker.admit(Instant::now(), &policy), Err(ms(1)));
        f.advance(ms(1)).await;
        assert_eq!(breaker.state(Instant::now()), BreakerState::HalfOpen);
        // The probe is cancelled by its client: neutral, the slot is free again.
        let probe = send(&mut f, "3", 10_000);
        assert!(breaker.admit(Instant::now(), &policy).is_err(), "one probe");
        f.broker.on_command(
            Command::Cancel {
                cid: probe,
                reason: "client",
            },
            &mut f.out,
        );
        assert_eq!(breaker.state(Instant::now()), BreakerState::HalfOpen);
        // The next probe succeeds: closed.
        let probe = send(&mut f, "4", 10_000);
        f.reply(&w, &probe, true);
        assert_eq!(breaker.state(Instant::now()), BreakerState::Closed);
    }
}
