//! Many clients, many requests, two workers: every request gets exactly its
//! own replies, exactly one `done`, nothing crosses to another connection,
//! and both workers take part.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use e2e_tests::{run, wait_route, Frame, RouterProc, WsClient};
use serde_json::{json, Value};

const CLIENTS: usize = 100;
const REQUESTS: usize = 100;
/// Requests a client keeps in flight at once (below the route's maxInFlight),
/// so replies of different requests interleave on each connection.
const WINDOW: usize = 8;
const STREAM_N: u64 = 3;
const WORKER_IDS: [&str; 2] = ["load-worker-a", "load-worker-b"];

const ROUTES: &str = r#"{
  "routes": [
    {"path": "/ws/echo", "service": "echo", "maxInFlight": 32, "requestTimeoutMs": 60000}
  ]
}"#;

/// What a request expects back.
enum Expect {
    Echo(Value),
    /// Partials `{"i": k}` in order, then `{"n": STREAM_N}`.
    Stream {
        next_i: u64,
    },
    Whoami,
}

/// Drives one client; returns how many `whoami` answers each worker gave.
async fn client(url: String, c_idx: usize) -> BTreeMap<String, usize> {
    let mut c = WsClient::connect(&url).await;
    let mut pending: HashMap<String, Expect> = HashMap::new();
    let mut whoami: BTreeMap<String, usize> = BTreeMap::new();
    let mut sent = 0;
    let mut finished = 0;
    while finished < REQUESTS {
        while sent < REQUESTS && pending.len() < WINDOW {
            let id = format!("c{c_idx}-r{sent}");
            let (msg_type, data, expect) = match sent % 3 {
                0 => {
                    let d = json!({"client": c_idx, "req": sent, "pad": "p".repeat(sent)});
                    ("echo", d.clone(), Expect::Echo(d))
                }
                1 => (
                    "stream",
                    json!({"n": STREAM_N}),
                    Expect::Stream { next_i: 0 },
                ),
                _ => ("whoami", json!(null), Expect::Whoami),
            };
            c.send_request(msg_type, &id, data).await;
            pending.insert(id, expect);
            sent += 1;
        }
        let f = match c.next_frame(Duration::from_secs(30)).await {
            Frame::Json(v) => v,
            other => panic!("client {c_idx}: unexpected frame {other:?}"),
        };
        let id = f["id"].as_str().unwrap_or_default().to_owned();
        let Some(expect) = pending.get_mut(&id) else {
            panic!("client {c_idx}: frame for an id it has no open request for (cross-delivered, or after done): {f}");
        };
        assert_ne!(
            f["type"], "error",
            "client {c_idx}: request {id} failed: {f}"
        );
        let done = match f["done"].as_bool() {
            Some(d) => d,
            None => panic!("client {c_idx}: frame without a boolean done: {f}"),
        };
        match expect {
            Expect::Echo(d) => {
                assert!(done, "echo is one final frame: {f}");
                assert_eq!(&f["data"], d, "client {c_idx}: echo {id} changed data");
            }
            Expect::Stream { next_i } => {
                if done {
                    assert_eq!(
                        *next_i, STREAM_N,
                        "stream {id} ended after {next_i} partials: {f}"
                    );
                    assert_eq!(f["data"], json!({"n": STREAM_N}), "{f}");
                } else {
                    assert_eq!(
                        f["data"],
                        json!({"i": *next_i}),
                        "stream {id} out of order: {f}"
                    );
                    *next_i += 1;
                }
            }
            Expect::Whoami => {
                assert!(done, "whoami is one final frame: {f}");
                let w = f["data"]["worker_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                assert!(
                    WORKER_IDS.contains(&w.as_str()),
                    "whoami from unknown worker: {f}"
                );
                *whoami.entry(w).or_default() += 1;
            }
        }
        if done {
            pending.remove(&id);
            finished += 1;
        }
    }
    assert!(
        c.backlog().is_empty(),
        "client {c_idx}: leftover frames {:?}",
        c.backlog()
    );
    // A marker after the last done: a duplicate or late frame for any of our
    // requests would arrive before the pong.
    c.send_json(&json!({"type": "ping", "id": "marker"})).await;
    match c.next_frame(Duration::from_secs(30)).await {
        Frame::Json(v) if v["type"] == "pong" => {}
        other => {
            panic!("client {c_idx}: expected only the pong after the last done, got {other:?}")
        }
    }
    c.assert_seq_ok();
    c.close().await;
    whoami
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_clients_times_hundred_requests_through_two_workers() {
    run(Duration::from_secs(300), async {
        // Rate limiting is another test's subject; here it would only add noise.
        let router = RouterProc::start(ROUTES, &[("ENABLE_RATE_LIMIT", "false")]).await;
        let mut workers = Vec::new();
        for id in WORKER_IDS {
            workers.push(
                router
                    .worker("echo_worker", &[], &["--id", id, "--capacity", "64"])
                    .await,
            );
        }
        router.wait_live_workers("echo", 2).await;

        let url = router.ws_url("/ws/echo");
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|i| tokio::spawn(client(url.clone(), i)))
            .collect();
        let mut per_worker: BTreeMap<String, usize> = BTreeMap::new();
        for t in tasks {
            // A panic in a client task surfaces here with its message.
            let counts = match t.await {
                Ok(c) => c,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            };
            for (w, n) in counts {
                *per_worker.entry(w).or_default() += n;
            }
        }
        eprintln!("whoami answers per worker: {per_worker:?}");
        let total: usize = per_worker.values().sum();
        assert_eq!(
            total,
            CLIENTS * (0..REQUESTS).filter(|k| k % 3 == 2).count(),
            "whoami answers: {per_worker:?}"
        );
        for id in WORKER_IDS {
            assert!(
                per_worker.get(id).copied().unwrap_or(0) > 0,
                "worker {id} got no work: {per_worker:?}"
            );
        }
        // Every credit came back: nothing is left in flight at either worker.
        wait_route(
            router.http,
            "echo",
            Duration::from_secs(10),
            "no requests in flight",
            |r| r.workers.len() == 2 && r.workers.iter().all(|(_, n)| *n == 0),
        )
        .await;
    })
    .await;
}
