//! Publications reach exactly the subscribed clients, whether a worker
//! publishes (chat rooms) or any backend publishes on the router's SUB socket;
//! unsubscribing stops them. Absence is proven with a marker published after
//! the message (same publisher, so same order), never with a sleep.

use std::time::{Duration, Instant};

use bridge_proto::{encode_publication, Publication};
use bytes::Bytes;
use e2e_tests::{default_routes_json, run, Frame, RouterProc, WsClient, RECV_TIMEOUT};
use serde_json::{json, Value};
use zeromq::{PubSocket, Socket, SocketSend, ZmqMessage};

const LIMIT: Duration = Duration::from_secs(90);

/// Reads `msg_type` pushes until one whose `data.text` (or `data.marker`) is
/// `marker`; returns the pushes of that type seen before it. Other frames stay
/// in the backlog.
async fn pushes_until_marker(c: &mut WsClient, msg_type: &str, marker: &str) -> Vec<Value> {
    let mut before = Vec::new();
    loop {
        let v = c.next_of_type(msg_type, RECV_TIMEOUT).await;
        if v["data"]["text"] == marker || v["data"]["marker"] == marker {
            return before;
        }
        before.push(v);
    }
}

fn texts(pushes: &[Value]) -> Vec<String> {
    pushes
        .iter()
        .map(|p| p["data"]["text"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_rooms_reach_exactly_their_members_and_leave_stops_them() {
    run(LIMIT, async {
        let router = RouterProc::start(&default_routes_json(), &[]).await;
        let _w = router.worker("chat_worker", &[], &[]).await;
        let mut a = router.client("/ws").await;
        let mut b = router.client("/ws").await;
        let mut c = router.client("/ws").await;

        // Everyone is in "all" (for markers); a and b are in "r1".
        for (name, client) in [("a", &mut a), ("b", &mut b), ("c", &mut c)] {
            let j = client
                .request_ok("join", &format!("{name}-join-all"), json!({"room": "all"}))
                .await;
            assert_eq!(j["data"]["topic"], "room:all", "{j}");
        }
        a.request_ok("join", "a-join-r1", json!({"room": "r1"}))
            .await;
        b.request_ok("join", "b-join-r1", json!({"room": "r1"}))
            .await;

        a.request_ok("say", "say-1", json!({"room": "r1", "text": "hello r1"}))
            .await;
        a.request_ok("say", "say-m1", json!({"room": "all", "text": "marker-1"}))
            .await;

        for (name, client) in [("a", &mut a), ("b", &mut b)] {
            let got = pushes_until_marker(client, "message", "marker-1").await;
            assert_eq!(texts(&got), ["hello r1"], "{name} in r1 got: {got:?}");
            assert_eq!(got[0]["topic"], "room:r1", "{}", got[0]);
            assert_eq!(got[0]["data"]["room"], "r1", "{}", got[0]);
            assert!(
                got[0].get("id").is_none_or(Value::is_null),
                "a push has no id: {}",
                got[0]
            );
        }
        let got = pushes_until_marker(&mut c, "message", "marker-1").await;
        assert!(got.is_empty(), "c is not in r1 but got: {got:?}");

        // b leaves r1: the next r1 message reaches a only.
        let left = b
            .request_ok("leave", "b-leave-r1", json!({"room": "r1"}))
            .await;
        assert_eq!(left["data"]["topic"], "room:r1", "{left}");
        a.request_ok("say", "say-2", json!({"room": "r1", "text": "second"}))
            .await;
        a.request_ok("say", "say-m2", json!({"room": "all", "text": "marker-2"}))
            .await;

        let got = pushes_until_marker(&mut a, "message", "marker-2").await;
        assert_eq!(texts(&got), ["second"], "a got: {got:?}");
        let got = pushes_until_marker(&mut b, "message", "marker-2").await;
        assert!(got.is_empty(), "b left r1 but got: {got:?}");
        let got = pushes_until_marker(&mut c, "message", "marker-2").await;
        assert!(got.is_empty(), "c got: {got:?}");
        for cl in [&a, &b, &c] {
            cl.assert_seq_ok();
        }
    })
    .await;
}

async fn publish(sock: &mut PubSocket, topic: &str, msg_type: &str, data: Value) {
    let payload = encode_publication(&Publication {
        msg_type: msg_type.to_owned(),
        data,
    });
    let msg = ZmqMessage::try_from(vec![Bytes::from(topic.to_owned()), Bytes::from(payload)])
        .unwrap_or_else(|e| panic!("two frames make a message: {e:?}"));
    sock.send(msg)
        .await
        .unwrap_or_else(|e| panic!("publish on {topic}: {e}"));
}

/// Publishes probes on `topic` until `client` sees one: the PUB socket drops
/// what it sends before the router's SUB has told it its subscriptions.
async fn until_delivered(sock: &mut PubSocket, client: &mut WsClient, topic: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        publish(sock, topic, "probe", json!({})).await;
        let seen = client
            .try_next_matching(Duration::from_millis(100), |f| {
                f.json().is_some_and(|v| v["type"] == "probe")
            })
            .await;
        if seen.is_some() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no probe on {topic} reached the client in 15 s"
        );
    }
}

async fn subscribe(c: &mut WsClient, id: &str, topic: &str) {
    let ack = c.request_ok("subscribe", id, json!({"topic": topic})).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    assert_eq!(ack["data"]["topic"], topic, "{ack}");
}

/// Asserts that nothing but leftover probes is still unread.
fn drop_probes(c: &mut WsClient) {
    let keep: Vec<Frame> = c
        .take_backlog()
        .into_iter()
        .filter(|f| !f.json().is_some_and(|v| v["type"] == "probe"))
        .collect();
    assert!(keep.is_empty(), "unexpected frames: {keep:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_publications_reach_subscribers_until_they_unsubscribe() {
    run(LIMIT, async {
        // Subscriptions are handled by the router itself: no worker needed.
        let router = RouterProc::start(&default_routes_json(), &[]).await;
        let mut x = router.client("/ws").await;
        let mut y = router.client("/ws/vision").await;
        subscribe(&mut x, "x-news", "news").await;
        subscribe(&mut x, "x-markers", "markers").await;
        subscribe(&mut y, "y-markers", "markers").await;

        let mut publisher = PubSocket::new();
        publisher
            .connect(&router.publish)
            .await
            .unwrap_or_else(|e| panic!("PUB connect to {}: {e}", router.publish));
        until_delivered(&mut publisher, &mut x, "news").await;
        until_delivered(&mut publisher, &mut y, "markers").await;

        publish(&mut publisher, "news", "headline", json!({"text": "one"})).await;
        publish(&mut publisher, "markers", "marker", json!({"marker": "m1"})).await;
        let headline = x.next_of_type("headline", RECV_TIMEOUT).await;
        assert_eq!(headline["topic"], "news", "{headline}");
        assert_eq!(headline["data"], json!({"text": "one"}), "{headline}");
        assert!(headline.get("id").is_none_or(Value::is_null), "{headline}");
        // y is not subscribed to news: no headline before its marker.
        let got = pushes_until_marker(&mut y, "marker", "m1").await;
        assert!(got.is_empty(), "{got:?}");
        assert!(
            !y.backlog()
                .iter()
                .any(|f| f.json().is_some_and(|v| v["type"] == "headline")),
            "y got a headline: {:?}",
            y.backlog()
        );

        // x unsubscribes from news: the next headline does not reach it.
        let ack = x
            .request_ok("unsubscribe", "x-unsub", json!({"topic": "news"}))
            .await;
        assert_eq!(ack["done"], true, "{ack}");
        publish(&mut publisher, "news", "headline", json!({"text": "three"})).await;
        publish(&mut publisher, "markers", "marker", json!({"marker": "m2"})).await;
        let got = pushes_until_marker(&mut x, "marker", "m2").await;
        let m1: Vec<&Value> = got.iter().filter(|v| v["data"]["marker"] != "m1").collect();
        assert!(m1.is_empty(), "x got other markers: {got:?}");
        assert!(
            !x.backlog()
                .iter()
                .any(|f| f.json().is_some_and(|v| v["type"] == "headline")),
            "x got a headline after unsubscribing: {:?}",
            x.backlog()
        );
        drop_probes(&mut x);
        drop_probes(&mut y);
        x.assert_seq_ok();
        y.assert_seq_ok();
    })
    .await;
}
