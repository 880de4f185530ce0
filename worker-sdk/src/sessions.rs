//! Several routers: what the router sessions of one worker share.
//!
//! A worker given a list of bridge endpoints runs one session per router
//! (one socket task each, see `connection`), each with its own hello,
//! heartbeats, credits, reconnect and backoff. This module holds what ties
//! them together, and decides where a message from a handle goes:
//!
//! - [`SessionLink`]: a session as the handles see it (its queue and status).
//! - [`StatusBoard`]: each session's [`Status`] and the worker's, derived
//!   from them (registered while any session is).
//! - [`ConnDirectory`]: which router each client connection lives on, so a
//!   push, close or subscription for a connection goes to that router.
//! - [`Target`]: where one message goes. Replies go to the session their
//!   request came from; a message for a connection to that connection's
//!   router; a publication to the first live session in list order.
//!
//! With a single endpoint there is one session, no directory and no shared
//! semaphore: every message goes to it, exactly as before lists existed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{mpsc, watch};

use crate::handle::{State, Status};
use crate::outgoing::Outgoing;

/// Connections whose router is remembered; beyond this, messages for a
/// connection not yet remembered go to every session (see [`Target::All`]).
const MAX_DIRECTORY: usize = 100_000;

/// One router session, as the handles see it.
#[derive(Clone)]
pub(crate) struct SessionLink {
    /// The router's bridge endpoint.
    pub(crate) endpoint: Arc<str>,
    /// The queue to the session's socket task.
    pub(crate) tx: mpsc::Sender<Outgoing>,
    /// The session's own status.
    pub(crate) status: watch::Receiver<Status>,
}

impl SessionLink {
    pub(crate) fn is_live(&self) -> bool {
        self.status.borrow().state == State::Registered
    }
}

/// Where one message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// The session with this index (in endpoint order).
    One(usize),
    /// Every session: a message for a connection whose router is not known.
    /// Connection ids are unique across routers (ULIDs), so the routers that
    /// do not have it drop it (logged at debug level).
    All,
}

/// The first live session in list order, or the first session when none is
/// live (the message then waits in, or is dropped by, that session's task
/// exactly as with a single router that is down).
///
/// First-live rather than round-robin: a worker's publications then travel
/// one ordered stream (one router's socket) while that router lives, so two
/// publications to one topic reach subscribers in the order they were made;
/// spreading them over routers joined by a fan-out would let them overtake
/// each other. Which router carries them is also easy to tell: the first
/// one listed that is up.
pub(crate) fn publication_target(sessions: &[SessionLink]) -> usize {
    sessions.iter().position(SessionLink::is_live).unwrap_or(0)
}

/// Each session's status, and the worker's status derived from them.
pub(crate) struct StatusBoard {
    sessions: Vec<watch::Sender<Status>>,
    worker: watch::Sender<Status>,
    /// Held while a session's status and the worker's change together, so
    /// two sessions changing at once cannot publish a stale sum.
    lock: Mutex<()>,
}

impl StatusBoard {
    /// A board for `n` sessions, with the receivers of each session's status
    /// and of the worker's.
    pub(crate) fn new(
        n: usize,
    ) -> (
        Arc<Self>,
        Vec<watch::Receiver<Status>>,
        watch::Receiver<Status>,
    ) {
        let (sessions, receivers): (Vec<_>, Vec<_>) =
            (0..n).map(|_| watch::channel(Status::initial())).unzip();
        let (worker, worker_rx) = watch::channel(Status::initial());
        let board = Arc::new(Self {
            sessions,
            worker,
            lock: Mutex::new(()),
        });
        (board, receivers, worker_rx)
    }

    /// Changes session `i`'s status with `f` (which says whether it changed
    /// anything), then the worker's.
    pub(crate) fn modify(&self, i: usize, f: impl FnOnce(&mut Status) -> bool) {
        // A panic while holding this lock cannot leave the statuses
        // inconsistent (each is a whole value), so a poisoned lock is fine.
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(session) = self.sessions.get(i) else {
            return;
        };
        if !session.send_if_modified(f) {
            return;
        }
        let all: Vec<Status> = self.sessions.iter().map(|s| s.borrow().clone()).collect();
        let derived = derive(&all, i);
        self.worker.send_if_modified(|w| {
            let mut next = derived;
            if next.registrations == w.registrations {
                // No new welcome: the last welcome's router id stays.
                next.router_id.clone_from(&w.router_id);
            }
            let changed = *w != next;
            *w = next;
            changed
        });
    }
}

/// The worker's status from its sessions' (`changed` is the session that
/// just changed; its router id is the last welcome's when it has a new one).
fn derive(all: &[Status], changed: usize) -> Status {
    let state = if all.iter().all(|s| s.state == State::Stopped) {
        State::Stopped
    } else if all.iter().any(|s| s.state == State::Stopping) {
        State::Stopping
    } else if all.iter().any(|s| s.state == State::Registered) {
        State::Registered
    } else {
        State::Connecting
    };
    Status {
        state,
        registrations: all.iter().map(|s| s.registrations).sum(),
        router_id: all.get(changed).and_then(|s| s.router_id.clone()),
        // The strictest limit any router announced: a message the worker
        // accepts then fits whichever router it goes to.
        max_frame_bytes: all.iter().filter_map(|s| s.max_frame_bytes).min(),
    }
}

/// Which router session each client connection lives on: the session that
/// last brought a message about it (connect, request, event, frame).
#[derive(Default)]
pub(crate) struct ConnDirectory {
    map: Mutex<HashMap<String, usize>>,
}

impl ConnDirectory {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // Plain inserts and removes: a panic elsewhere cannot corrupt it.
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `conn` lives on session `session`.
    pub(crate) fn note(&self, conn: &str, session: usize) {
        let mut map = self.map();
        if let Some(s) = map.get_mut(conn) {
            *s = session;
        } else if map.len() < MAX_DIRECTORY {
            map.insert(conn.to_owned(), session);
        }
    }

    /// `conn` ended on session `session` (a later session's note stays).
    pub(crate) fn forget(&self, conn: &str, session: usize) {
        let mut map = self.map();
        if map.get(conn) == Some(&session) {
            map.remove(conn);
        }
    }

    /// Session `session` lost its router: its connections are gone.
    pub(crate) fn forget_session(&self, session: usize) {
        self.map().retain(|_, s| *s != session);
    }

    pub(crate) fn get(&self, conn: &str) -> Option<usize> {
        self.map().get(conn).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(
        state: State,
        registrations: u64,
        router: Option<&str>,
        limit: Option<u64>,
    ) -> Status {
        Status {
            state,
            registrations,
            router_id: router.map(Into::into),
            max_frame_bytes: limit,
        }
    }

    #[test]
    fn the_worker_is_registered_while_any_session_is() {
        use State::*;
        for (states, expected) in [
            (vec![Connecting, Connecting], Connecting),
            (vec![Connecting, Registered], Registered),
            (vec![Registered, Stopping], Stopping),
            (vec![Stopped, Connecting], Connecting),
            (vec![Stopped, Stopped], Stopped),
            (vec![Registered], Registered),
        ] {
            let all: Vec<Status> = states.iter().map(|s| status(*s, 0, None, None)).collect();
            assert_eq!(derive(&all, 0).state, expected, "{states:?}");
        }
    }

    #[test]
    fn the_board_sums_welcomes_and_keeps_the_last_router_id() {
        let (board, sessions, worker) = StatusBoard::new(2);
        let welcome = |i: usize, id: &str, limit: u64| {
            board.modify(i, |s| {
                s.state = State::Registered;
                s.registrations += 1;
                s.router_id = Some(id.into());
                s.max_frame_bytes = Some(limit);
                true
            })
        };
        welcome(1, "b", 2000);
        assert_eq!(
            *worker.borrow(),
            status(State::Registered, 1, Some("b"), Some(2000))
        );
        welcome(0, "a", 1000);
        assert_eq!(
            *worker.borrow(),
            status(State::Registered, 2, Some("a"), Some(1000))
        );
        // Session 1 loses its router: still registered through session 0,
        // and the last welcome's router id stays.
        board.modify(1, |s| {
            s.state = State::Connecting;
            true
        });
        assert_eq!(
            *worker.borrow(),
            status(State::Registered, 2, Some("a"), Some(1000))
        );
        assert_eq!(sessions[1].borrow().state, State::Connecting);
        // An unchanged session changes nothing; an unknown index is ignored.
        board.modify(0, |_| false);
        board.modify(7, |_| true);
        assert_eq!(worker.borrow().registrations, 2);
    }

    #[test]
    fn a_single_session_board_mirrors_its_session() {
        let (board, sessions, worker) = StatusBoard::new(1);
        for f in [
            (|s: &mut Status| {
                s.state = State::Registered;
                s.registrations += 1;
                s.router_id = Some("r1".into());
                true
            }) as fn(&mut Status) -> bool,
            |s| {
                s.max_frame_bytes = Some(99);
                true
            },
            |s| {
                s.state = State::Connecting;
                true
            },
            |s| {
                s.state = State::Registered;
                s.registrations += 1;
                s.router_id = Some("r2".into());
                true
            },
            |s| {
                s.state = State::Stopped;
                true
            },
        ] {
            board.modify(0, f);
            assert_eq!(*worker.borrow(), *sessions[0].borrow());
        }
    }

    #[test]
    fn the_directory_remembers_the_latest_session_of_a_connection() {
        let d = ConnDirectory::default();
        d.note("c1", 0);
        d.note("c2", 1);
        assert_eq!(
            (d.get("c1"), d.get("c2"), d.get("c3")),
            (Some(0), Some(1), None)
        );
        // Resumed through the other router: the latest note wins, and the
        // old router's disconnect does not erase it.
        d.note("c1", 1);
        d.forget("c1", 0);
        assert_eq!(d.get("c1"), Some(1));
        d.forget("c1", 1);
        assert_eq!(d.get("c1"), None);
        d.note("c3", 0);
        d.forget_session(1);
        assert_eq!((d.get("c2"), d.get("c3")), (None, Some(0)));
    }

    #[test]
    fn publications_go_to_the_first_live_session() {
        let (board, receivers, _worker) = StatusBoard::new(3);
        let links: Vec<SessionLink> = receivers
            .into_iter()
            .enumerate()
            .map(|(i, status)| SessionLink {
                endpoint: format!("ipc:///tmp/{i}").into(),
                tx: mpsc::channel(1).0,
                status,
            })
            .collect();
        let live = |i: usize, up: bool| {
            board.modify(i, |s| {
                s.state = if up {
                    State::Registered
                } else {
                    State::Connecting
                };
                true
            })
        };
        assert_eq!(publication_target(&links), 0, "none live: the first");
        live(2, true);
        assert_eq!(publication_target(&links), 2);
        live(1, true);
        assert_eq!(publication_target(&links), 1);
        live(0, true);
        assert_eq!(publication_target(&links), 0);
        live(0, false);
        assert_eq!(publication_target(&links), 1);
    }
}
