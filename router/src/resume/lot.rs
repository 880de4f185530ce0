//! Where dropped sessions wait for their client to come back.
//!
//! A session whose socket drops (no close frame, a failed write, unanswered
//! pings) on a route with resume on is *parked* here instead of ending: its
//! requests keep running and their replies queue up. A client that comes
//! back with the session's id and resume token *claims* it within the
//! route's TTL; otherwise it ends (TTL passed, or the session outgrew its
//! bounds) and a later resume is told why. The lot also knows which
//! sessions are live, to answer `attached`, and remembers recently ended
//! ones, to answer `expired` or `overflow` rather than `unknown_session`.
//!
//! Parked sessions hold memory nobody reads: their total is bounded by a
//! process-wide budget (`RESUME_MAX_BYTES`). Each parked session reserves
//! its route's whole bound (`resume.maxBytes`) when it parks; when the
//! budget cannot cover that, the session ends instead.
//!
//! Tokens are 128 random bits, compared in constant time. A claim issues a
//! new one; the one it was claimed with stays good only until the client
//! speaks on the resumed connection (proof it got the new one), so a
//! `resumed` lost with the network does not lock its client out.
//!
//! The scope a session is registered under (its route, its path and the
//! client's principal: token subject or certificate subject) must match
//! the claimant's: a token that leaks to another user of the route does
//! not hand them the session.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Why a resume failed: `error.reason` of `resume_failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    UnknownSession,
    Expired,
    BadToken,
    Gap,
    Attached,
    Overflow,
}

impl Refusal {
    pub const ALL: [Refusal; 6] = [
        Refusal::UnknownSession,
        Refusal::Expired,
        Refusal::BadToken,
        Refusal::Gap,
        Refusal::Attached,
        Refusal::Overflow,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Refusal::UnknownSession => "unknown_session",
            Refusal::Expired => "expired",
            Refusal::BadToken => "bad_token",
            Refusal::Gap => "gap",
            Refusal::Attached => "attached",
            Refusal::Overflow => "overflow",
        }
    }

    /// The sentence of the error's `message`.
    pub const fn message(self) -> &'static str {
        match self {
            Refusal::UnknownSession => "no such session on this route (it ended, or never existed here)",
            Refusal::Expired => "the session ended: nobody resumed it within its resume TTL",
            Refusal::BadToken => "the resume token does not match the session",
            Refusal::Gap => "frames after last_seq are no longer kept: the session cannot continue without a gap",
            Refusal::Attached => "the session is live on another connection",
            Refusal::Overflow => "the session ended: it outgrew its resume bounds while parked",
        }
    }
}

/// A resume token: 128 random bits as 32 hex digits.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn new() -> Self {
        let bytes: [u8; 16] = rand::random();
        Self(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison with what a client sent.
    fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl Default for Token {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

/// How long an ended session is remembered, and how many.
const REMEMBER_FOR: Duration = Duration::from_secs(600);
const REMEMBER_AT_MOST: usize = 10_000;

struct Parked<T> {
    token: Token,
    /// The token the last resume presented, still good until the client
    /// shows it got the new one (a `resumed` lost on the way must not
    /// lock the client out).
    previous: Option<Token>,
    route: String,
    reserved: usize,
    claimed: CancellationToken,
    value: T,
}

struct Live {
    token: Token,
    previous: Option<Token>,
    route: String,
    /// Fired when a client proves it owns the session from another
    /// connection: this one yields (it is likely dead without knowing it).
    takeover: CancellationToken,
}

struct Lot<T> {
    live: HashMap<String, Live>,
    parked: HashMap<String, Parked<T>>,
    ended: HashMap<String, Refusal>,
    ended_order: VecDeque<(Instant, String)>,
    reserved: usize,
}

/// A claimed session: its state, its new token, and its new takeover signal.
pub struct Claimed<T> {
    pub value: T,
    pub token: Token,
    pub takeover: CancellationToken,
}

/// What a parked session's waiting task needs.
#[derive(Debug, Clone)]
pub struct Ticket {
    /// Fired when a client claims the session.
    pub claimed: CancellationToken,
    pub deadline: Instant,
}

/// Dropped sessions waiting for their client (module docs).
pub struct ParkingLot<T> {
    inner: Mutex<Lot<T>>,
    budget: usize,
    /// Woken whenever a session parks (a claimant waiting for a takeover).
    parked: tokio::sync::Notify,
}

/// The lot's figures, for metrics and `/stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LotStats {
    pub live: usize,
    pub parked: usize,
    pub reserved_bytes: usize,
}

impl<T> ParkingLot<T> {
    /// A lot whose parked sessions may reserve `budget` bytes in all.
    pub fn new(budget: usize) -> Self {
        Self {
            inner: Mutex::new(Lot {
                live: HashMap::new(),
                parked: HashMap::new(),
                ended: HashMap::new(),
                ended_order: VecDeque::new(),
                reserved: 0,
            }),
            budget,
            parked: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lot<T>> {
        // Every update leaves the maps consistent before it can panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new live session that may be resumed later: its token, and what
    /// fires when its owner resumes it from another connection.
    pub fn register(&self, id: &str, route: &str) -> (Token, CancellationToken) {
        let token = Token::new();
        let takeover = CancellationToken::new();
        self.lock().live.insert(
            id.to_owned(),
            Live {
                token: token.clone(),
                previous: None,
                route: route.to_owned(),
                takeover: takeover.clone(),
            },
        );
        (token, takeover)
    }

    /// The client of a resumed session spoke on its new connection, so it
    /// has the new token: the one it resumed with is void.
    pub fn confirm(&self, id: &str) {
        if let Some(live) = self.lock().live.get_mut(id) {
            live.previous = None;
        }
    }

    /// Whether `token` is the live session `id`'s (current, or the one its
    /// last resume presented): what a POST of the HTTP fallback proves.
    pub fn owns(&self, id: &str, token: &str) -> bool {
        self.lock().live.get(id).is_some_and(|l| {
            l.token.matches(token) || l.previous.as_ref().is_some_and(|p| p.matches(token))
        })
    }

    /// A live session ended for good (a close, a policy, shutdown): it can
    /// no longer be resumed.
    pub fn forget(&self, id: &str) {
        self.lock().live.remove(id);
    }

    /// Parks a live session for `ttl`, reserving `reserve` bytes of the
    /// budget. When the budget cannot cover it, the session is not parked:
    /// `value` comes back and a later resume gets `overflow`.
    pub fn park(&self, id: &str, value: T, reserve: usize, ttl: Duration) -> Result<Ticket, T> {
        let mut lot = self.lock();
        let Some(live) = lot.live.remove(id) else {
            return Err(value);
        };
        if lot.reserved.saturating_add(reserve) > self.budget {
            remember(&mut lot, id, Refusal::Overflow);
            return Err(value);
        }
        lot.reserved += reserve;
        self.parked.notify_waiters();
        let ticket = Ticket {
            claimed: CancellationToken::new(),
            deadline: Instant::now() + ttl,
        };
        lot.parked.insert(
            id.to_owned(),
            Parked {
                token: live.token,
                previous: live.previous,
                route: live.route,
                reserved: reserve,
                claimed: ticket.claimed.clone(),
                value,
            },
        );
        Ok(ticket)
    }

    /// A client presents `id` and `token` on `route`: the parked session
    /// and its new token, or why not. The session is live again under the
    /// new token.
    pub fn claim(&self, id: &str, token: &str, route: &str) -> Result<Claimed<T>, Refusal> {
        let mut lot = self.lock();
        if let Some(live) = lot.live.get(id) {
            if live.route != route {
                return Err(Refusal::UnknownSession);
            }
            if !live.token.matches(token)
                && !live.previous.as_ref().is_some_and(|p| p.matches(token))
            {
                return Err(Refusal::BadToken);
            }
            // Its owner is here: the other connection yields.
            live.takeover.cancel();
            return Err(Refusal::Attached);
        }
        match lot.parked.get(id) {
            Some(p) if p.route != route => return Err(Refusal::UnknownSession),
            Some(p)
                if !p.token.matches(token)
                    && !p.previous.as_ref().is_some_and(|t| t.matches(token)) =>
            {
                return Err(Refusal::BadToken)
            }
            Some(_) => {}
            None => {
                return Err(lot
                    .ended
                    .get(id)
                    .copied()
                    .unwrap_or(Refusal::UnknownSession))
            }
        }
        // Invariant: checked just above, under the same lock.
        let p = lot.parked.remove(id).expect("parked session present");
        lot.reserved -= p.reserved;
        p.claimed.cancel();
        let new = Token::new();
        let takeover = CancellationToken::new();
        lot.live.insert(
            id.to_owned(),
            Live {
                token: new.clone(),
                previous: Some(Token(token.to_owned())),
                route: p.route,
                takeover: takeover.clone(),
            },
        );
        Ok(Claimed {
            value: p.value,
            token: new,
            takeover,
        })
    }

    /// [`ParkingLot::claim`], but a session live on another connection
    /// (which its owner has likely lost without the router noticing yet)
    /// is asked to yield, and claimed once it has parked, within `wait`.
    pub async fn claim_or_take_over(
        &self,
        id: &str,
        token: &str,
        route: &str,
        wait: Duration,
    ) -> Result<Claimed<T>, Refusal> {
        let until = Instant::now() + wait;
        loop {
            // Listening before asking, so a park in between is not missed.
            let parked = self.parked.notified();
            tokio::pin!(parked);
            parked.as_mut().enable();
            match self.claim(id, token, route) {
                Err(Refusal::Attached) if Instant::now() < until => {
                    if tokio::time::timeout_at(until, parked).await.is_err() {
                        // Once more: it may have ended rather than parked,
                        // and the reason is then another.
                        return self.claim(id, token, route);
                    }
                }
                other => return other,
            }
        }
    }

    /// A session claimed (so live again) that cannot go on after all (its
    /// client resumed from before the kept frames): it is over.
    pub fn retire(&self, id: &str, why: Refusal) {
        let mut lot = self.lock();
        lot.live.remove(id);
        remember(&mut lot, id, why);
    }

    /// Ends a parked session (its TTL passed, it outgrew its bounds, the
    /// router is shutting down): the value to drop, if it was still parked.
    pub fn end(&self, id: &str, why: Refusal) -> Option<T> {
        let mut lot = self.lock();
        let p = lot.parked.remove(id)?;
        lot.reserved -= p.reserved;
        remember(&mut lot, id, why);
        Some(p.value)
    }

    /// Every parked session's id and route (shutdown, route removals).
    pub fn parked(&self) -> Vec<(String, String)> {
        self.lock()
            .parked
            .iter()
            .map(|(id, p)| (id.clone(), p.route.clone()))
            .collect()
    }

    /// Visits every parked value (metrics: the bytes they hold).
    pub fn for_each_parked(&self, mut f: impl FnMut(&T)) {
        for p in self.lock().parked.values() {
            f(&p.value);
        }
    }

    pub fn stats(&self) -> LotStats {
        let lot = self.lock();
        LotStats {
            live: lot.live.len(),
            parked: lot.parked.len(),
            reserved_bytes: lot.reserved,
        }
    }
}

/// Remembers why `id` ended (bounded in time and number).
fn remember<T>(lot: &mut Lot<T>, id: &str, why: Refusal) {
    let now = Instant::now();
    while let Some((at, old)) = lot.ended_order.front() {
        if now.duration_since(*at) < REMEMBER_FOR && lot.ended_order.len() < REMEMBER_AT_MOST {
            break;
        }
        lot.ended.remove(old);
        lot.ended_order.pop_front();
    }
    lot.ended.insert(id.to_owned(), why);
    lot.ended_order.push_back((now, id.to_owned()));
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(30);

    #[test]
    fn tokens_are_random_hex_and_compared_whole() {
        let (a, b) = (Token::new(), Token::new());
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 32);
        assert!(a.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
        assert!(a.matches(a.as_str()));
        assert!(!a.matches(&a.as_str()[..31]));
        assert!(!a.matches(b.as_str()));
        assert!(!a.matches(""));
    }

    #[tokio::test(start_paused = true)]
    async fn a_parked_session_is_claimed_once_with_its_token_then_live_under_a_new_one() {
        let lot = ParkingLot::new(1000);
        let (token, takeover) = lot.register("s1", "/ws");
        assert_eq!(
            lot.claim("s1", token.as_str(), "/ws").err(),
            Some(Refusal::Attached)
        );
        assert!(
            takeover.is_cancelled(),
            "the live connection is asked to yield"
        );
        assert_eq!(
            lot.claim("s1", "nope", "/ws").err(),
            Some(Refusal::BadToken)
        );
        let ticket = lot.park("s1", "state", 100, TTL).unwrap();
        assert_eq!(
            lot.stats(),
            LotStats {
                live: 0,
                parked: 1,
                reserved_bytes: 100
            }
        );
        assert_eq!(
            lot.claim("s1", "nope", "/ws").err(),
            Some(Refusal::BadToken)
        );
        assert_eq!(
            lot.claim("s1", token.as_str(), "/other").err(),
            Some(Refusal::UnknownSession),
            "a session resumes only on its own route"
        );
        let Claimed {
            value,
            token: new_token,
            ..
        } = lot.claim("s1", token.as_str(), "/ws").ok().unwrap();
        assert_eq!(value, "state");
        assert!(ticket.claimed.is_cancelled(), "the waiting task is told");
        assert_eq!(
            lot.stats(),
            LotStats {
                live: 1,
                parked: 0,
                reserved_bytes: 0
            }
        );
        // Until the client shows it has the new token, the old one still
        // proves ownership (the `resumed` may have been lost); then it is void.
        assert_eq!(
            lot.claim("s1", token.as_str(), "/ws").err(),
            Some(Refusal::Attached)
        );
        lot.confirm("s1");
        assert_eq!(
            lot.claim("s1", token.as_str(), "/ws").err(),
            Some(Refusal::BadToken),
            "the old token is void"
        );
        assert_eq!(
            lot.claim("s1", new_token.as_str(), "/ws").err(),
            Some(Refusal::Attached)
        );
        assert_eq!(
            lot.claim("nobody", "x", "/ws").err(),
            Some(Refusal::UnknownSession)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ended_sessions_say_why_and_the_budget_bounds_what_parks() {
        let lot = ParkingLot::new(250);
        let (t1, _) = lot.register("s1", "/ws");
        let (t2, _) = lot.register("s2", "/ws");
        let (t3, _) = lot.register("s3", "/ws");
        lot.park("s1", 1, 100, TTL).unwrap();
        lot.park("s2", 2, 100, TTL).unwrap();
        assert_eq!(
            lot.park("s3", 3, 100, TTL).err(),
            Some(3),
            "over the budget"
        );
        assert_eq!(
            lot.claim("s3", t3.as_str(), "/ws").err(),
            Some(Refusal::Overflow)
        );
        assert_eq!(lot.end("s1", Refusal::Expired), Some(1));
        assert_eq!(lot.end("s1", Refusal::Expired), None, "ended once");
        assert_eq!(
            lot.claim("s1", t1.as_str(), "/ws").err(),
            Some(Refusal::Expired)
        );
        assert_eq!(lot.stats().reserved_bytes, 100);
        assert_eq!(lot.end("s2", Refusal::Overflow), Some(2));
        assert_eq!(
            lot.claim("s2", t2.as_str(), "/ws").err(),
            Some(Refusal::Overflow)
        );
        assert_eq!(lot.stats(), LotStats::default());
        // Forgotten after a while.
        tokio::time::advance(REMEMBER_FOR + Duration::from_secs(1)).await;
        lot.register("s4", "/ws");
        lot.park("s4", 4, 1, TTL).unwrap();
        lot.end("s4", Refusal::Expired);
        assert_eq!(
            lot.claim("s1", t1.as_str(), "/ws").err(),
            Some(Refusal::UnknownSession)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_of_a_live_session_waits_for_it_to_yield_and_park() {
        let lot = std::sync::Arc::new(ParkingLot::new(1000));
        let (token, takeover) = lot.register("s1", "/ws");
        let yielding = {
            let lot = lot.clone();
            tokio::spawn(async move {
                takeover.cancelled().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                lot.park("s1", 7, 10, TTL).unwrap();
            })
        };
        let claimed = lot
            .claim_or_take_over("s1", token.as_str(), "/ws", Duration::from_secs(2))
            .await;
        assert_eq!(claimed.ok().map(|c| c.value), Some(7));
        yielding.await.unwrap();
        // A session that does not yield in time stays attached.
        let (token, _ignored) = lot.register("s2", "/ws");
        let r = lot
            .claim_or_take_over("s2", token.as_str(), "/ws", Duration::from_secs(2))
            .await;
        assert_eq!(r.err(), Some(Refusal::Attached));
    }

    #[test]
    fn a_forgotten_session_cannot_park_or_be_claimed() {
        let lot: ParkingLot<u8> = ParkingLot::new(1000);
        let (t, _) = lot.register("s1", "/ws");
        lot.forget("s1");
        assert_eq!(lot.park("s1", 1, 1, TTL).err(), Some(1));
        assert_eq!(
            lot.claim("s1", t.as_str(), "/ws").err(),
            Some(Refusal::UnknownSession)
        );
    }
}
