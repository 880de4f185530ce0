//! Running handlers: a request's handler, polled once by the socket task and
//! given a task of its own only if that does not finish it, racing its
//! cancellation and deadline and turning whatever happens (reply, error,
//! panic, cancel, timeout) into exactly one terminal message; and one
//! sequential queue per client connection for everything that gets no reply.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bridge_proto::{codes, ErrorReply, FromWorker, Reply as WireReply};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use serde_json::Value;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, warn, Instrument};

use crate::context::Context;
use crate::error::HandlerError;
use crate::handle::WorkerHandle;
use crate::handler::{Reply, RequestFn};

/// How a request ended, before it becomes a wire message.
#[derive(Debug)]
pub(crate) enum Outcome {
    Replied(Reply),
    Failed(HandlerError),
    Panicked,
    Cancelled,
    DeadlineExceeded,
}

/// A request's handler, started: its permit wait (several routers) and the
/// handler itself, with a panic caught. Polled once by the socket task
/// and, if that does not finish it, by its own task ([`finish_request`]).
pub(crate) type Work = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// The handler's work for one request, not yet polled.
///
/// With `permits` (a worker serving several routers shares its capacity
/// among them), the handler starts only once it holds a permit. The permit
/// is given back before the outcome is ready, so before the terminal message
/// is queued: the next request a router sends for the credit finds it free.
pub(crate) fn start_request(
    handler: RequestFn,
    ctx: Context,
    data: Value,
    permits: Option<Arc<Semaphore>>,
) -> Work {
    // The call happens inside the async block so a handler that panics before
    // returning its future is caught like one that panics while polled.
    let work = AssertUnwindSafe(async move {
        let _permit = match permits {
            None => None,
            Some(permits) => match permits.acquire_owned().await {
                Ok(permit) => Some(permit),
                // Invariant: the semaphore is never closed; answer as a
                // worker that cannot take the request rather than panic.
                Err(_) => return Err(HandlerError::overloaded("the worker is at capacity")),
            },
        };
        handler(ctx, data).await
    })
    .catch_unwind();
    Box::pin(async move {
        match work.await {
            Ok(Ok(reply)) => Outcome::Replied(reply),
            Ok(Err(e)) => Outcome::Failed(e),
            Err(_) => Outcome::Panicked,
        }
    })
}

/// Which request a line is about, when it is not said by a `request` span
/// (a worker without request spans): its correlation id and attempt.
#[derive(Clone, Copy)]
pub(crate) struct Named<'a>(pub(crate) Option<(&'a str, u32)>);

/// Logs how a request ended (inside the request's span, if it has one).
pub(crate) fn log_outcome(outcome: &Outcome, started: Instant, named: Named<'_>) {
    let cid = named.0.map(|(cid, _)| tracing::field::display(cid));
    let attempt = named.0.map(|(_, attempt)| attempt);
    match outcome {
        Outcome::Replied(_) => debug!(
            correlation.id = cid,
            attempt,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "replied"
        ),
        Outcome::Failed(e) => {
            debug!(correlation.id = cid, attempt, code = %e.code, "handler returned an error")
        }
        Outcome::Panicked => {
            error!(
                correlation.id = cid,
                attempt, "handler panicked; answering worker_error"
            )
        }
        Outcome::Cancelled => debug!(correlation.id = cid, attempt, "cancelled"),
        Outcome::DeadlineExceeded => warn!(
            correlation.id = cid,
            attempt, "deadline passed before the handler finished"
        ),
    }
}

/// Runs one request's handler and sends its terminal message.
///
/// The handler's future is dropped as soon as the token fires or the deadline
/// passes, so a handler that never looks at its token still stops. A wait
/// for a shared permit counts against the deadline and ends with a cancel
/// like the handler would.
#[cfg(test)]
pub(crate) async fn run_request(
    handler: RequestFn,
    ctx: Context,
    data: Value,
    permits: Option<Arc<Semaphore>>,
) {
    let cid = ctx.cid.to_string();
    let token = ctx.token.clone();
    let deadline = ctx.deadline;
    let handle = ctx.handle.clone();
    let work = start_request(handler, ctx, data, permits);
    finish_request(work, cid, None, token, deadline, handle, Instant::now()).await
}

/// Drives a started request to its end (its handler's outcome, the cancel
/// or the deadline, whichever comes first) and queues its terminal message.
/// `attempt`: the request's attempt when it has no span (its lines name it).
pub(crate) async fn finish_request(
    work: Work,
    cid: String,
    attempt: Option<u32>,
    token: CancellationToken,
    deadline: Instant,
    handle: WorkerHandle,
    started: Instant,
) {
    let outcome = tokio::select! {
        biased;
        _ = token.cancelled() => Outcome::Cancelled,
        _ = tokio::time::sleep_until(deadline) => {
            token.cancel();
            Outcome::DeadlineExceeded
        }
        outcome = work => outcome,
    };
    log_outcome(&outcome, started, Named(attempt.map(|a| (cid.as_str(), a))));
    // The worker may be gone (stopped); then nobody is waiting for the answer.
    let _ = handle.send_for_request(terminal(cid, outcome)).await;
}

/// The one terminal message for `outcome`.
pub(crate) fn terminal(cid: String, outcome: Outcome) -> FromWorker {
    let error = |code: &str, message: String, retryable: bool, retry_after_ms: Option<u64>| {
        FromWorker::Error(ErrorReply {
            cid: cid.clone(),
            code: code.to_owned(),
            message,
            retryable,
            retry_after_ms,
        })
    };
    match outcome {
        Outcome::Replied(reply) => FromWorker::Reply(WireReply {
            cid: cid.clone(),
            done: true,
            msg_type: reply.msg_type,
            data: reply.data,
        }),
        Outcome::Failed(e) if codes::is_valid_code(&e.code) => {
            error(&e.code, e.message, e.retryable, e.retry_after_ms)
        }
        Outcome::Failed(e) => {
            warn!(correlation.id = %cid, code = ?e.code,
                "handler error code is not snake_case; sending worker_error");
            error(
                codes::WORKER_ERROR,
                e.message,
                e.retryable,
                e.retry_after_ms,
            )
        }
        Outcome::Panicked => error(
            codes::WORKER_ERROR,
            "the worker's handler failed unexpectedly".to_owned(),
            false,
            None,
        ),
        Outcome::Cancelled => error(
            codes::CANCELLED,
            "request cancelled".to_owned(),
            false,
            None,
        ),
        Outcome::DeadlineExceeded => error(
            codes::TIMEOUT,
            "the request's deadline passed before the worker finished".to_owned(),
            false,
            None,
        ),
    }
}

/// A queued piece of connection work (already bound to its handler and data).
pub(crate) type Job = BoxFuture<'static, ()>;

/// One sequential job queue per client connection.
///
/// Order matters within a connection (audio chunks, raw echo frames), not
/// across connections. A queue's task exits when it is idle for `idle`, when
/// its connection disconnects, or on a hard stop; the next job for that
/// connection starts a new one.
pub(crate) struct ConnQueues {
    queues: HashMap<String, mpsc::Sender<Job>>,
    capacity: usize,
    idle: Duration,
}

impl ConnQueues {
    pub(crate) fn new(capacity: usize, idle: Duration) -> Self {
        Self {
            queues: HashMap::new(),
            capacity,
            idle,
        }
    }

    /// Queues `job` behind the connection's earlier jobs. Drops it (with a
    /// warning) when the connection already has `capacity` jobs waiting: an
    /// event nobody can keep up with must not grow memory without bound.
    pub(crate) fn enqueue(
        &mut self,
        conn: &str,
        kind: &'static str,
        mut job: Job,
        tracker: &TaskTracker,
        hard_stop: &CancellationToken,
    ) {
        if let Some(tx) = self.queues.get(conn) {
            match tx.try_send(job) {
                Ok(()) => return,
                Err(TrySendError::Full(_)) => {
                    warn!(session.id = %conn, kind, capacity = self.capacity,
                        "connection event queue full; dropping the event");
                    return;
                }
                Err(TrySendError::Closed(j)) => job = j,
            }
        }
        let (tx, rx) = mpsc::channel(self.capacity);
        // Invariant: a fresh channel with capacity >= 1 has room for one job.
        tx.try_send(job).expect("new queue has room");
        self.queues.insert(conn.to_owned(), tx);
        let span = tracing::debug_span!("connection", session.id = %conn);
        tracker.spawn(drain(rx, hard_stop.clone(), self.idle).instrument(span));
    }

    /// Lets the connection's queue finish its jobs and end (after a disconnect).
    pub(crate) fn finish(&mut self, conn: &str) {
        self.queues.remove(conn);
    }

    /// Lets every queue finish its jobs and end (on stop).
    pub(crate) fn finish_all(&mut self) {
        self.queues.clear();
    }

    /// Forgets queues whose task has ended on its own.
    pub(crate) fn prune(&mut self) {
        self.queues.retain(|_, tx| !tx.is_closed());
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.queues.len()
    }
}

async fn drain(mut rx: mpsc::Receiver<Job>, hard_stop: CancellationToken, idle: Duration) {
    loop {
        let job = tokio::select! {
            _ = hard_stop.cancelled() => return,
            next = tokio::time::timeout(idle, rx.recv()) => match next {
                Ok(Some(job)) => job,
                Ok(None) => return,
                Err(_) => {
                    // Close first so the owner sees `Closed` and starts a new
                    // queue instead of handing us jobs we would never run.
                    rx.close();
                    while let Ok(job) = rx.try_recv() {
                        run_job(job, &hard_stop).await;
                    }
                    return;
                }
            },
        };
        run_job(job, &hard_stop).await;
    }
}

async fn run_job(job: Job, hard_stop: &CancellationToken) {
    tokio::select! {
        _ = hard_stop.cancelled() => {}
        result = AssertUnwindSafe(job).catch_unwind() => {
            if result.is_err() {
                error!("event handler panicked; the worker carries on");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn terminal_messages() {
        let cid = || "c1".to_owned();
        let code_of = |m: FromWorker| match m {
            FromWorker::Error(e) => e.code,
            FromWorker::Reply(r) => format!("reply done={}", r.done),
            other => panic!("unexpected {other:?}"),
        };
        for (outcome, expected) in [
            (Outcome::Replied(Reply::new(Value::Null)), "reply done=true"),
            (
                Outcome::Failed(HandlerError::bad_request("x")),
                "bad_request",
            ),
            (
                Outcome::Failed(HandlerError::new("Bad Code", "x")),
                "worker_error",
            ),
            (Outcome::Panicked, "worker_error"),
            (Outcome::Cancelled, "cancelled"),
            (Outcome::DeadlineExceeded, "timeout"),
        ] {
            assert_eq!(code_of(terminal(cid(), outcome)), expected);
        }
    }

    #[test]
    fn typed_final_reply_keeps_its_type() {
        match terminal(
            "c".into(),
            Outcome::Replied(Reply::typed("OUTPUT", Value::Null)),
        ) {
            FromWorker::Reply(r) => assert_eq!(r.msg_type.as_deref(), Some("OUTPUT")),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn queues_keep_order_survive_panics_and_bound_memory() {
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let mut queues = ConnQueues::new(4, Duration::from_secs(60));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        // The first job blocks the queue so the following ones pile up.
        queues.enqueue(
            "a",
            "test",
            Box::pin(async move {
                let _ = started_tx.send(());
                let _ = gate_rx.await;
                panic!("first job panics after the gate");
            }),
            &tracker,
            &stop,
        );
        started_rx.await.unwrap();
        for i in 0..6 {
            let seen = seen.clone();
            queues.enqueue(
                "a",
                "test",
                Box::pin(async move { seen.lock().unwrap().push(i) }),
                &tracker,
                &stop,
            );
        }
        gate_tx.send(()).unwrap();
        queues.finish_all();
        tracker.close();
        tokio::time::timeout(Duration::from_secs(5), tracker.wait())
            .await
            .expect("queue tasks end after finish_all");
        // Capacity 4: the blocking job was taken off the queue, so 4 of the 6
        // fit and 2 were dropped; the survivors ran in order despite the panic.
        assert_eq!(*seen.lock().unwrap(), vec![0, 1, 2, 3]);
    }

    /// A request context whose messages land in the returned receiver.
    fn request_ctx(
        deadline: tokio::time::Instant,
    ) -> (Context, mpsc::Receiver<crate::outgoing::Outgoing>) {
        let (tx, rx) = mpsc::channel(8);
        let (_board, mut statuses, status) = crate::sessions::StatusBoard::new(1);
        let handle = crate::handle::WorkerHandle {
            sessions: vec![crate::sessions::SessionLink {
                endpoint: "ipc:///tmp/test".into(),
                tx,
                status: statuses.remove(0),
            }]
            .into(),
            home: Some(0),
            directory: None,
            stop: CancellationToken::new(),
            status,
            worker_id: "w".into(),
            services: vec!["svc".to_owned()].into(),
        };
        let ctx = Context {
            cid: "c1".into(),
            conn: "k1".into(),
            route: "/r".into(),
            service: "svc".into(),
            msg_type: "t".into(),
            client_id: Value::Null,
            deadline,
            attempt: 1,
            token: CancellationToken::new(),
            claims: None,
            handle,
        };
        (ctx, rx)
    }

    fn sent(out: crate::outgoing::Outgoing) -> FromWorker {
        bridge_proto::decode_from_worker(&out.frame).expect("valid frame")
    }

    /// A handler that records that it ran and answers at once.
    fn recording(ran: Arc<Mutex<bool>>) -> RequestFn {
        crate::handler::request_fn(move |_ctx, _data| {
            let ran = ran.clone();
            async move {
                *ran.lock().unwrap() = true;
                Ok(Value::from("done"))
            }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waiting_for_a_shared_permit_times_out_at_its_deadline() {
        let permits = Arc::new(Semaphore::new(1));
        let _held = permits.clone().acquire_owned().await.unwrap();
        let start = tokio::time::Instant::now();
        let (ctx, mut rx) = request_ctx(start + Duration::from_millis(100));
        let ran = Arc::new(Mutex::new(false));
        tokio::spawn(run_request(
            recording(ran.clone()),
            ctx,
            Value::Null,
            Some(permits),
        ));
        match sent(rx.recv().await.unwrap()) {
            FromWorker::Error(e) => assert_eq!(e.code, "timeout"),
            other => panic!("expected timeout, got {other:?}"),
        }
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        assert!(!*ran.lock().unwrap(), "the handler ran without a permit");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_starts_when_a_shared_permit_frees_and_gives_it_back() {
        let permits = Arc::new(Semaphore::new(1));
        let held = permits.clone().acquire_owned().await.unwrap();
        let start = tokio::time::Instant::now();
        let (ctx, mut rx) = request_ctx(start + Duration::from_millis(100));
        let ran = Arc::new(Mutex::new(false));
        tokio::spawn(run_request(
            recording(ran.clone()),
            ctx,
            Value::Null,
            Some(permits.clone()),
        ));
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(!*ran.lock().unwrap());
        drop(held);
        match sent(rx.recv().await.unwrap()) {
            FromWorker::Reply(r) => assert!(r.done),
            other => panic!("expected the final reply, got {other:?}"),
        }
        assert_eq!(start.elapsed(), Duration::from_millis(40));
        // The permit is back for the next request.
        assert_eq!(permits.available_permits(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_queues_end_and_restart() {
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let mut queues = ConnQueues::new(8, Duration::from_millis(50));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let job = |n: u32| -> Job {
            let tx = tx.clone();
            Box::pin(async move {
                let _ = tx.send(n);
            })
        };
        queues.enqueue("a", "test", job(1), &tracker, &stop);
        assert_eq!(rx.recv().await, Some(1));
        tokio::time::sleep(Duration::from_millis(200)).await;
        queues.prune();
        assert_eq!(queues.len(), 0, "idle queue should have ended");
        queues.enqueue("a", "test", job(2), &tracker, &stop);
        assert_eq!(rx.recv().await, Some(2));
    }
}
