//! Several routers joined by Redis (README, "Several routers").
//!
//! With `CLUSTER_URL`, the router keeps one link to Redis:
//! - **Fan-out.** A publication made here (by a worker on this router, or on
//!   the publish socket) is delivered to this router's subscribers at once
//!   and `PUBLISH`ed on one Redis channel, in the order it was made; every
//!   other router delivers it to its own subscribers and skips its own
//!   copies. So each subscriber gets it once, whichever router it is on,
//!   in each publisher's order (Redis keeps the order of one connection's
//!   `PUBLISH`es, and one task makes them).
//! - **Presence.** A topic's subscribers are kept in a hash
//!   (`wsr:presence:<topic>`: session → `{session_id, user, router_id}`)
//!   and a sorted set of expiry times (`wsr:presence-exp:<topic>`), which
//!   each router refreshes for its own subscribers every [`REFRESH`]; a
//!   router that dies stops refreshing and its entries expire after
//!   [`TTL`]. Joins and leaves also go over the channel to the topics'
//!   watchers on the other routers.
//! - **Members.** Each router puts itself in `wsr:routers` (expiry times)
//!   and its live workers in `wsr:router-info`: `/stats` and `/routes`
//!   show the routers alive and their workers.
//!
//! Redis going away is not fatal: publications are then delivered on this
//! router only, `router_cluster_up` is 0 and a warning says so; the link
//! retries with backoff and, once back, re-announces this router's
//! presence entries. Routers' clocks must agree within a few seconds
//! (expiry times are wall-clock milliseconds).

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures_util::StreamExt;
use redis::{aio::MultiplexedConnection, AsyncConnectionConfig, Client};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    bridge::BridgeHandle,
    hub::{Hub, PresenceEvent, PresenceQuery, Present, Relay},
    sync::lock,
};

/// The channel every router publishes on and listens to.
const CHANNEL: &str = "wsr:fanout";
const ROUTERS: &str = "wsr:routers";
const ROUTER_INFO: &str = "wsr:router-info";
/// How often a router re-announces itself and its presence entries.
pub const REFRESH: Duration = Duration::from_secs(5);
/// How long an entry lives without a refresh (a dead router's go after it).
pub const TTL: Duration = Duration::from_secs(15);
/// Bound on one Redis command's answer; past it the link is taken as down.
const ANSWER: Duration = Duration::from_secs(2);
/// Relays (publications, presence changes) waiting for the link.
pub const RELAY_QUEUE: usize = 16_384;
/// Relays sent in one pipeline.
const BATCH: usize = 256;

/// One message on the channel.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "lowercase")]
enum Wire {
    Pub {
        /// The router it was made on.
        o: String,
        t: String,
        y: String,
        d: Value,
    },
    Presence {
        o: String,
        t: String,
        /// `join` or `leave`.
        e: String,
        s: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        u: Option<String>,
    },
}

/// A router of the cluster, as `/stats` and `/routes` show it.
#[derive(Debug, Clone, Serialize)]
pub struct MemberInfo {
    pub router_id: String,
    /// Live workers per service on that router.
    pub workers: Value,
}

/// The link's state, read by `/stats`, `/routes`, metrics and presence.
#[derive(Debug)]
pub struct Cluster {
    router_id: String,
    /// The URL without its password, for logs and `/stats`.
    shown_url: String,
    client: Client,
    up: AtomicBool,
    /// The connection for presence queries while the link is up.
    con: Mutex<Option<MultiplexedConnection>>,
    members: Mutex<Vec<MemberInfo>>,
    /// Publications and presence changes not relayed (the link was down or
    /// its queue full): they reached this router's subscribers only.
    pub unrelayed: AtomicU64,
    pub relayed: AtomicU64,
    pub received: AtomicU64,
    /// Messages on the channel that could not be read.
    pub malformed: AtomicU64,
}

impl Cluster {
    /// Checks the URL; nothing connects before [`Cluster::start`].
    pub fn new(url: &str, router_id: &str) -> Result<Arc<Self>, redis::RedisError> {
        let client = Client::open(url)?;
        let mut shown = url::Url::parse(url).map_err(|e| {
            redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "bad URL",
                e.to_string(),
            ))
        })?;
        if shown.password().is_some() {
            let _ = shown.set_password(Some("***"));
        }
        Ok(Arc::new(Self {
            router_id: router_id.to_owned(),
            shown_url: shown.to_string(),
            client,
            up: AtomicBool::new(false),
            con: Mutex::new(None),
            members: Mutex::new(Vec::new()),
            unrelayed: AtomicU64::new(0),
            relayed: AtomicU64::new(0),
            received: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
        }))
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn members(&self) -> Vec<MemberInfo> {
        lock(&self.members).clone()
    }

    /// `/stats`' `cluster` block.
    pub fn stats(&self) -> Value {
        let members: Vec<String> = self.members().into_iter().map(|m| m.router_id).collect();
        json!({
            "router_id": self.router_id,
            "url": self.shown_url,
            "up": self.is_up(),
            "members": members,
            "relayed": self.relayed.load(Ordering::Relaxed),
            "received": self.received.load(Ordering::Relaxed),
            "unrelayed": self.unrelayed.load(Ordering::Relaxed),
        })
    }

    /// Hooks the hub up (at once) and runs the link until `stop`.
    pub fn run(
        self: Arc<Self>,
        hub: Arc<Hub>,
        bridge: BridgeHandle,
        stop: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (tx, rx) = mpsc::channel(RELAY_QUEUE);
        hub.set_relay(tx);
        hub.set_presence_query(self.clone());
        self.link(hub, bridge, rx, stop)
    }

    async fn link(
        self: Arc<Self>,
        hub: Arc<Hub>,
        bridge: BridgeHandle,
        mut rx: mpsc::Receiver<Relay>,
        stop: CancellationToken,
    ) {
        let mut wait = Duration::from_millis(100);
        let mut logged_down = false;
        loop {
            let result = tokio::select! {
                _ = stop.cancelled() => break,
                r = self.session(&hub, &bridge, &mut rx, &stop) => r,
            };
            let was_up = self.up.swap(false, Ordering::Relaxed);
            *lock(&self.con) = None;
            match result {
                Ok(()) => break,
                Err(e) if was_up || !logged_down => {
                    warn!(url = %self.shown_url, error = %e, "cluster link down: publications reach this router's subscribers only until Redis is back");
                    logged_down = true;
                }
                Err(_) => {}
            }
            if was_up {
                wait = Duration::from_millis(100);
            }
            // While down, relays are counted and let go: their local
            // delivery is done, and the presence refresh after the
            // reconnect restores this router's entries.
            let until = tokio::time::Instant::now() + wait;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep_until(until) => break,
                    r = rx.recv() => match r {
                        Some(_) => { self.unrelayed.fetch_add(1, Ordering::Relaxed); }
                        None => return,
                    },
                }
            }
            wait = (wait * 2).min(Duration::from_secs(5));
        }
        // Leaving: the routers' list no longer names this one.
        let con = lock(&self.con).take();
        if let Some(mut con) = con {
            let _ = tokio::time::timeout(
                ANSWER,
                redis::cmd("ZREM")
                    .arg(ROUTERS)
                    .arg(&self.router_id)
                    .query_async::<()>(&mut con),
            )
            .await;
        }
    }

    /// One connected period of the link; returns when Redis goes away (or
    /// `Ok` when the relays' sender is gone: the router is stopping).
    async fn session(
        &self,
        hub: &Hub,
        bridge: &BridgeHandle,
        rx: &mut mpsc::Receiver<Relay>,
        stop: &CancellationToken,
    ) -> redis::RedisResult<()> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(ANSWER)
            .set_response_timeout(ANSWER);
        let mut con = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let mut pubsub = tokio::time::timeout(ANSWER, self.client.get_async_pubsub())
            .await
            .map_err(|_| timeout_error("subscribing"))??;
        tokio::time::timeout(ANSWER, pubsub.subscribe(CHANNEL))
            .await
            .map_err(|_| timeout_error("subscribing"))??;
        let mut messages = pubsub.into_on_message();
        self.refresh(&mut con, hub, bridge).await?;
        *lock(&self.con) = Some(con.clone());
        self.up.store(true, Ordering::Relaxed);
        info!(url = %self.shown_url, router.id = %self.router_id, "cluster link up");
        // The first refresh comes soon: routers that reconnect together
        // (Redis restarted) each announced before the others, and would
        // otherwise list only themselves for a whole period.
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + REFRESH / 10, REFRESH);
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            // Not biased: a steady stream of local publications must not
            // starve the other routers' messages or the refresh.
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                n = rx.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        return Ok(());
                    }
                    let sent = batch.len() as u64;
                    let result = self.send(&mut con, batch.drain(..)).await;
                    if result.is_err() {
                        self.unrelayed.fetch_add(sent, Ordering::Relaxed);
                    }
                    result?;
                    self.relayed.fetch_add(sent, Ordering::Relaxed);
                }
                m = messages.next() => match m {
                    Some(m) => self.incoming(hub, m.get_payload_bytes()),
                    None => return Err(timeout_error("the subscription ended")),
                },
                _ = tick.tick() => self.refresh(&mut con, hub, bridge).await?,
            }
        }
    }

    /// Relays a batch in one pipeline: publications and presence changes
    /// on the channel, presence entries in their hash and set.
    async fn send(
        &self,
        con: &mut MultiplexedConnection,
        relays: impl Iterator<Item = Relay>,
    ) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        let expires = now_ms() + TTL.as_millis() as u64;
        for r in relays {
            let wire = match r {
                Relay::Publish {
                    topic,
                    msg_type,
                    data,
                } => Wire::Pub {
                    o: self.router_id.clone(),
                    t: topic,
                    y: msg_type,
                    d: data,
                },
                Relay::Presence {
                    topic,
                    event,
                    session_id,
                    user,
                } => {
                    let (hash, set) = presence_keys(&topic);
                    match event {
                        PresenceEvent::Join => {
                            let entry = Present {
                                session_id: session_id.clone(),
                                user: user.clone(),
                                router_id: self.router_id.clone(),
                            };
                            pipe.hset(&hash, &session_id, to_json(&entry)).ignore();
                            pipe.zadd(&set, &session_id, expires).ignore();
                            pipe.pexpire(&hash, keep_ms()).ignore();
                            pipe.pexpire(&set, keep_ms()).ignore();
                        }
                        PresenceEvent::Leave => {
                            pipe.hdel(&hash, &session_id).ignore();
                            pipe.zrem(&set, &session_id).ignore();
                        }
                    }
                    Wire::Presence {
                        o: self.router_id.clone(),
                        t: topic,
                        e: event.as_str().to_owned(),
                        s: session_id,
                        u: user,
                    }
                }
            };
            pipe.publish(CHANNEL, to_json(&wire)).ignore();
        }
        pipe.query_async::<()>(con).await
    }

    /// A message from another router: delivered to this router's
    /// subscribers (or watchers); this router's own are skipped.
    fn incoming(&self, hub: &Hub, payload: &[u8]) {
        match serde_json::from_slice::<Wire>(payload) {
            Ok(Wire::Pub { o, .. } | Wire::Presence { o, .. }) if o == self.router_id => {}
            Ok(Wire::Pub { t, y, d, .. }) => {
                self.received.fetch_add(1, Ordering::Relaxed);
                hub.deliver(&t, &y, d);
            }
            Ok(Wire::Presence { t, e, s, u, .. }) => {
                self.received.fetch_add(1, Ordering::Relaxed);
                let event = if e == "leave" {
                    PresenceEvent::Leave
                } else {
                    PresenceEvent::Join
                };
                hub.deliver_presence(&t, event, &s, u.as_deref());
            }
            Err(e) => {
                if self.malformed.fetch_add(1, Ordering::Relaxed) == 0 {
                    warn!(error = %e, bytes = payload.len(), "unreadable message on the cluster channel: dropped (counted in /stats)");
                }
            }
        }
    }

    /// Announces this router (and its workers), renews its presence
    /// entries, clears expired ones of its topics, and reads the members.
    async fn refresh(
        &self,
        con: &mut MultiplexedConnection,
        hub: &Hub,
        bridge: &BridgeHandle,
    ) -> redis::RedisResult<()> {
        let now = now_ms();
        let expires = now + ttl_ms();
        let snapshot = bridge.snapshot().await;
        let mut workers = serde_json::Map::new();
        for w in snapshot.workers.iter().filter(|w| !w.draining) {
            for s in &w.services {
                let n = workers.entry(s.clone()).or_insert(json!(0));
                *n = json!(n.as_u64().unwrap_or(0) + 1);
            }
        }
        let mut pipe = redis::pipe();
        pipe.zadd(ROUTERS, &self.router_id, expires).ignore();
        pipe.hset(
            ROUTER_INFO,
            &self.router_id,
            Value::Object(workers).to_string(),
        )
        .ignore();
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(ROUTERS)
            .arg("-inf")
            .arg(now)
            .ignore();
        let mut topics = std::collections::HashSet::new();
        for (topic, entry) in hub.all_present() {
            let (hash, set) = presence_keys(&topic);
            pipe.hset(&hash, &entry.session_id, to_json(&entry))
                .ignore();
            pipe.zadd(&set, &entry.session_id, expires).ignore();
            if topics.insert(topic) {
                pipe.pexpire(&hash, keep_ms()).ignore();
                pipe.pexpire(&set, keep_ms()).ignore();
            }
        }
        pipe.cmd("ZRANGEBYSCORE").arg(ROUTERS).arg(now).arg("+inf");
        pipe.hgetall(ROUTER_INFO);
        let (alive, info): (Vec<String>, std::collections::HashMap<String, String>) =
            pipe.query_async(con).await?;
        // Entries of routers that stopped refreshing, in the topics here.
        self.sweep(con, &topics, now).await?;
        let dead: Vec<&String> = info.keys().filter(|r| !alive.contains(r)).collect();
        if !dead.is_empty() {
            redis::cmd("HDEL")
                .arg(ROUTER_INFO)
                .arg(dead)
                .query_async::<()>(con)
                .await?;
        }
        let mut alive = alive;
        alive.sort();
        let members = alive
            .into_iter()
            .map(|r| MemberInfo {
                workers: info
                    .get(&r)
                    .and_then(|w| serde_json::from_str(w).ok())
                    .unwrap_or(Value::Null),
                router_id: r,
            })
            .collect();
        *lock(&self.members) = members;
        Ok(())
    }

    /// Removes the expired presence entries of `topics`: one pipeline
    /// finds them, one removes them.
    async fn sweep(
        &self,
        con: &mut MultiplexedConnection,
        topics: &std::collections::HashSet<String>,
        now: u64,
    ) -> redis::RedisResult<()> {
        if topics.is_empty() {
            return Ok(());
        }
        let topics: Vec<&String> = topics.iter().collect();
        let mut find = redis::pipe();
        for topic in &topics {
            find.cmd("ZRANGEBYSCORE")
                .arg(presence_keys(topic).1)
                .arg("-inf")
                .arg(now);
        }
        let expired: Vec<Vec<String>> = find.query_async(con).await?;
        let mut remove = redis::pipe();
        let mut any = false;
        for (topic, gone) in topics.iter().zip(&expired) {
            if gone.is_empty() {
                continue;
            }
            any = true;
            let (hash, set) = presence_keys(topic);
            remove.hdel(&hash, gone).ignore().zrem(&set, gone).ignore();
        }
        if !any {
            return Ok(());
        }
        remove.query_async::<()>(con).await
    }
}

impl PresenceQuery for Cluster {
    fn query(
        &self,
        topic: &str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<Vec<Present>>> + Send>> {
        let con = lock(&self.con).clone();
        let topic = topic.to_owned();
        Box::pin(async move {
            let mut con = con?;
            let (hash, set) = presence_keys(&topic);
            let (alive, entries): (Vec<String>, std::collections::HashMap<String, String>) =
                redis::pipe()
                    .cmd("ZRANGEBYSCORE")
                    .arg(&set)
                    .arg(now_ms())
                    .arg("+inf")
                    .hgetall(&hash)
                    .query_async(&mut con)
                    .await
                    .ok()?;
            let mut clients: Vec<Present> = alive
                .iter()
                .filter_map(|s| entries.get(s))
                .filter_map(|e| serde_json::from_str(e).ok())
                .collect();
            clients.sort_by(|a, b| a.session_id.cmp(&b.session_id));
            Some(clients)
        })
    }
}

fn presence_keys(topic: &str) -> (String, String) {
    (
        format!("wsr:presence:{topic}"),
        format!("wsr:presence-exp:{topic}"),
    )
}

fn to_json(v: &impl Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn ttl_ms() -> u64 {
    TTL.as_millis() as u64
}

/// How long a topic's presence keys outlive their last refresh.
fn keep_ms() -> i64 {
    2 * TTL.as_millis() as i64
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn timeout_error(what: &'static str) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::IoError, what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_messages_round_trip_and_numbers_stay_exact() {
        let w = Wire::Pub {
            o: "A".into(),
            t: "room".into(),
            y: "say".into(),
            d: serde_json::from_str(r#"{"x":0.1,"big":9007199254740993,"f":1e-300}"#).unwrap(),
        };
        let text = to_json(&w);
        match serde_json::from_str::<Wire>(&text).unwrap() {
            Wire::Pub { d, .. } => assert_eq!(
                d.to_string(),
                r#"{"big":9007199254740993,"f":1e-300,"x":0.1}"#
            ),
            other => panic!("{other:?}"),
        }
        let p: Wire =
            serde_json::from_str(r#"{"k":"presence","o":"B","t":"r","e":"join","s":"s1"}"#)
                .unwrap();
        assert!(matches!(p, Wire::Presence { u: None, .. }));
        assert!(serde_json::from_slice::<Wire>(b"\xff not json").is_err());
    }

    #[test]
    fn the_shown_url_hides_the_password() {
        let c = Cluster::new("redis://:secret@127.0.0.1:6379/0", "A").unwrap();
        assert!(!c.stats().to_string().contains("secret"));
        assert!(Cluster::new("http://nope", "A").is_err());
    }
}
