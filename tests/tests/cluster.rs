//! Several routers joined by a real Redis (README, "Several routers"):
//! a publication made on one router reaches the subscribers of every
//! router exactly once and in order (numbers exact); presence is
//! cluster-wide, with join pushes to watchers on the other router; the
//! welcome names the router; Redis going away degrades to local delivery
//! (`/stats`, metric) and the link comes back by itself.
//!
//! Absence is proven with a marker from the same publisher (same order),
//! never with a sleep; readiness is polled against a deadline.

use std::{
    net::TcpListener,
    process::Stdio,
    time::{Duration, Instant},
};

use e2e_tests::{http::http_get, run, RouterConfig, RouterProc, WsClient, RECV_TIMEOUT};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

const LIMIT: Duration = Duration::from_secs(120);

fn routes() -> String {
    json!({"routes": [{"path": "/ws/echo", "service": "echo"}]}).to_string()
}

/// A redis-server of this test alone, on `port`; killed on drop.
struct Redis {
    child: Child,
}

impl Redis {
    async fn start(port: u16) -> Redis {
        let mut child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server (Debian: apt-get install redis-server)");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.contains("Ready to accept connections") {
                    break;
                }
            }
        })
        .await
        .expect("redis-server ready within 10 s");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Redis { child }
    }

    async fn stop(mut self) {
        self.child.kill().await.unwrap();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn router(id: &str, url: &str) -> RouterProc {
    RouterProc::start_with(
        RouterConfig::new(&routes())
            .env("CLUSTER_URL", url)
            .env("ROUTER_ID", id),
    )
    .await
}

async fn stats(r: &RouterProc) -> Value {
    let res = http_get(r.http, "/stats").await.expect("/stats");
    serde_json::from_str(&res.body).expect("/stats is JSON")
}

/// Polls `/stats` until `check` holds of its `cluster` block.
async fn until_cluster(r: &RouterProc, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let c = stats(r).await["cluster"].clone();
        if check(&c) {
            return c;
        }
        assert!(Instant::now() < deadline, "{what}: /stats cluster is {c}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn members(c: &Value) -> Vec<String> {
    let mut m: Vec<String> = c["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    m.sort();
    m
}

/// `say` pushes on `c` until the one whose `data.marker` is `marker`.
async fn says_until(c: &mut WsClient, marker: &str) -> Vec<Value> {
    let mut before = Vec::new();
    loop {
        let v = c.next_of_type("say", RECV_TIMEOUT).await;
        if v["data"]["marker"] == marker {
            return before;
        }
        before.push(v["data"].clone());
    }
}

async fn publish(c: &mut WsClient, id: &str, data: Value) {
    let r = c
        .request_ok(
            "publish",
            id,
            json!({"topic": "room", "type": "say", "data": data}),
        )
        .await;
    assert_eq!(r["data"]["published"], "room", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routers_share_publications_and_presence_and_survive_redis_going_away() {
    run(LIMIT, async {
        let port = free_port();
        let url = format!("redis://127.0.0.1:{port}");
        let redis = Redis::start(port).await;
        let a = router("A", &url).await;
        let b = router("B", &url).await;
        let both = |c: &Value| c["up"] == true && members(c) == ["A", "B"];
        until_cluster(&a, "A sees A and B", both).await;
        until_cluster(&b, "B sees A and B", both).await;
        let _wa = a.worker("echo_worker", &["echo"], &[]).await;
        let _wb = b.worker("echo_worker", &["echo"], &[]).await;

        let mut ca = a.client("/ws/echo").await;
        let mut cb = b.client("/ws/echo").await;
        let welcome = |c: &WsClient| c.welcome.as_ref().unwrap()["data"]["router_id"].clone();
        assert_eq!((welcome(&ca), welcome(&cb)), (json!("A"), json!("B")));
        let cb_id = cb.welcome.as_ref().unwrap()["data"]["session_id"].clone();

        // Presence: A watches the topic; B's subscriber shows up there.
        let ack = ca
            .request_ok(
                "subscribe",
                "sa",
                json!({"topic": "room", "presence": true}),
            )
            .await;
        assert_eq!(ack["type"], "subscribed");
        cb.request_ok("subscribe", "sb", json!({"topic": "room"}))
            .await;
        let join = loop {
            let p = ca.next_of_type("presence", RECV_TIMEOUT).await;
            if p["data"]["session_id"] == cb_id {
                break p;
            }
        };
        assert_eq!(join["topic"], "room");
        assert_eq!(join["data"]["event"], "join", "{join}");
        let started = Instant::now();
        let seen = loop {
            let p = cb
                .request_ok("presence", "p1", json!({"topic": "room"}))
                .await;
            if p["data"]["count"] == 2 {
                break p;
            }
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "presence on B: {p}"
            );
        };
        let mut routers: Vec<String> = seen["data"]["clients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["router_id"].as_str().unwrap().to_owned())
            .collect();
        routers.sort();
        assert_eq!(routers, ["A", "B"], "{seen}");

        // Fan-out: 50 publications made on A, then a marker; each client
        // gets each exactly once, in order, numbers exact.
        for i in 0..50 {
            publish(
                &mut ca,
                &format!("p{i}"),
                json!({"n": i, "x": 0.1, "big": 9007199254740993u64}),
            )
            .await;
        }
        publish(&mut ca, "m1", json!({"marker": "m1"})).await;
        for c in [&mut ca, &mut cb] {
            let got = says_until(c, "m1").await;
            let ns: Vec<u64> = got.iter().map(|d| d["n"].as_u64().unwrap()).collect();
            assert_eq!(ns, (0..50).collect::<Vec<u64>>(), "once each, in order");
            assert!(got
                .iter()
                .all(|d| d["x"] == json!(0.1) && d["big"] == json!(9007199254740993u64)));
        }
        // And the other way: made on B, received on A.
        publish(&mut cb, "m2", json!({"marker": "m2"})).await;
        assert!(says_until(&mut ca, "m2").await.is_empty());
        assert!(says_until(&mut cb, "m2").await.is_empty());

        // Redis goes away: local delivery only, said in /stats and metrics.
        redis.stop().await;
        until_cluster(&a, "A sees the link down", |c| c["up"] == false).await;
        let metrics = http_get(a.http, "/metrics").await.unwrap();
        let text = metrics.body.clone();
        assert!(text.contains("router_cluster_up 0"), "{text}");
        publish(&mut ca, "d1", json!({"n": 1000})).await;
        assert_eq!(
            ca.next_of_type("say", RECV_TIMEOUT).await["data"]["n"],
            1000,
            "delivered here"
        );

        // Redis is back on the same port: the links recover by themselves.
        let redis = Redis::start(port).await;
        until_cluster(&a, "A back", both).await;
        until_cluster(&b, "B back", both).await;
        publish(&mut ca, "m3", json!({"marker": "m3"})).await;
        assert!(says_until(&mut ca, "m3").await.is_empty());
        let missed = says_until(&mut cb, "m3").await;
        assert!(
            missed.is_empty(),
            "B never got the publication made while Redis was away: {missed:?}"
        );
        drop(redis);
    })
    .await;
}
