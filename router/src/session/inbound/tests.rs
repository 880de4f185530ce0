//! The inbound state machine driven with plain values: frames in, frames,
//! commands and closes out. No socket, no runtime.

use std::{collections::HashSet, sync::Arc, time::Duration};

use serde_json::{json, Value};
use tokio::time::Instant;

use super::*;
use crate::{
    ids::ConnId,
    policy::runtime::Runtimes,
    routes::{Route, RouteTable},
    session::testkit::{self, Recorder},
};

struct Fixture {
    inbound: Inbound,
    shared: Arc<ConnShared>,
    hub: Arc<Hub>,
    runtime: Arc<RouteRuntime>,
    _outbound: crate::outbox::OutboxRx,
}

fn fixture(route: Route) -> Fixture {
    fixture_on(&Runtimes::default(), route)
}

fn fixture_on(runtimes: &Runtimes, route: Route) -> Fixture {
    let hub = Arc::new(Hub::new());
    let (shared, outbound) = ConnShared::new(ConnId::new(), route.path.clone(), usize::MAX);
    hub.register(shared.clone());
    let route = Arc::new(route);
    let start = testkit::start(runtimes, route.clone());
    let runtime = start.runtime.clone();
    let inbound = Inbound::new(
        shared.clone(),
        hub.clone(),
        Arc::new(Metrics::new()),
        route,
        runtime.clone(),
        &start.connect,
        InboundConfig {
            rate_limits: true,
            drain_timeout: Duration::from_secs(10),
        },
    );
    Fixture {
        inbound,
        shared,
        hub,
        runtime,
        _outbound: outbound,
    }
}

fn frames_json(actions: &Actions) -> Vec<Value> {
    actions
        .frames
        .iter()
        .map(|f| serde_json::to_value(f).unwrap())
        .collect()
}

/// The one frame of an answer, as JSON.
fn only_frame(actions: &Actions) -> Value {
    let frames = frames_json(actions);
    assert_eq!(frames.len(), 1, "{frames:?}");
    frames.into_iter().next().unwrap()
}

fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

fn text(f: &mut Fixture, frame: &str, q: &Recorder) -> Actions {
    f.inbound.on_text(frame, Instant::now(), q)
}

#[test]
fn router_types_are_the_documented_ones_and_the_routes_file_refuses_them() {
    let names = RouterType::ALL.map(RouterType::as_str);
    assert_eq!(
        names,
        [
            "ping",
            "subscribe",
            "unsubscribe",
            "cancel",
            "resume",
            "ack",
            "presence"
        ]
    );
    assert_eq!(names, RouterType::NAMES);
    // The routes file refuses exactly these in `allowedTypes`.
    assert_eq!(names, crate::config::ROUTER_HANDLED_TYPES);
    for t in RouterType::ALL {
        assert_eq!(RouterType::parse(t.as_str()), Some(t));
    }
    assert_eq!(RouterType::parse("echo"), None);
}

#[test]
fn router_handled_types_are_answered_without_the_bridge() {
    let mut f = fixture(testkit::route("/ws", "svc"));
    let q = Recorder::with_room(0);
    let cases: [(&str, Value); 5] = [
        (
            r#"{"type":"ping","id":1}"#,
            json!({"type": "pong", "id": 1, "done": true}),
        ),
        (
            r#"{"type":"subscribe","id":"s","data":{"topic":"room"}}"#,
            json!({"type": "subscribed", "id": "s", "data": {"topic": "room"}}),
        ),
        (
            r#"{"type":"unsubscribe","id":"u","data":{"topic":"room"}}"#,
            json!({"type": "unsubscribed", "id": "u", "data": {"topic": "room"}}),
        ),
        (
            r#"{"type":"subscribe","id":"t","data":{}}"#,
            json!({"type": "error", "id": "t", "error": {"code": "bad_request"}}),
        ),
        (
            r#"{"type":"cancel","id":"c","data":{"id":"nothing"}}"#,
            json!({"type": "error", "id": "c", "error": {"code": "bad_request"}}),
        ),
    ];
    for (input, want) in cases {
        let got = only_frame(&text(&mut f, input, &q));
        for (k, v) in want.as_object().unwrap() {
            if k == "error" {
                assert_eq!(error_code(&got), v["code"], "{input}: {got}");
            } else {
                assert_eq!(&got[k], v, "{input}: {k} of {got}");
            }
        }
    }
    assert!(q.take().is_empty(), "nothing reaches the bridge");
    assert_eq!(f.hub.topic_count(), 0, "subscribed, then unsubscribed");
}

#[test]
fn requests_events_and_bad_frames() {
    let mut route = testkit::route("/ws", "svc");
    route.max_in_flight = 2;
    route.allowed_types = Some(HashSet::from(["echo".to_owned(), "note".to_owned()]));
    let mut f = fixture(route);
    let q = Recorder::with_room(100);

    assert!(text(&mut f, r#"{"type":"echo","id":"1","data":7}"#, &q)
        .frames
        .is_empty());
    let sent = q.take();
    let [Command::Request(req)] = &sent[..] else {
        panic!("{sent:?}")
    };
    assert_eq!(
        (&*req.client_key, req.msg_type.as_str(), &req.data),
        ("\"1\"", "echo", &json!(7))
    );
    assert_eq!(f.shared.cid_of("\"1\""), Some(req.cid));

    let table: [(&str, &str); 5] = [
        (r#"{"type":"echo","id":"1"}"#, "bad_request"), // duplicate id in flight
        (r#"{"type":"other","id":"2"}"#, "unknown_type"),
        (r#"not json"#, "bad_request"),
        (r#"{"id":"3"}"#, "bad_request"),
        (r#"{"type":"echo","id":"x","data":1}"#, ""), // second request: fits
    ];
    for (input, code) in table {
        let actions = text(&mut f, input, &q);
        match code {
            "" => assert!(actions.frames.is_empty(), "{input}"),
            code => assert_eq!(error_code(&only_frame(&actions)), code, "{input}"),
        }
    }
    // The refusal names what the route accepts, fire-and-forget too (no id).
    let refused = only_frame(&text(&mut f, r#"{"type":"other"}"#, &q));
    assert_eq!(
        (refused.get("id"), refused["error"]["message"].as_str()),
        (
            None,
            Some("/ws does not handle messages of type `other`; it accepts `echo`, `note`")
        ),
        "{refused}"
    );
    let third = only_frame(&text(&mut f, r#"{"type":"echo","id":"y"}"#, &q));
    assert_eq!(error_code(&third), "overloaded", "max_in_flight: {third}");
    assert_eq!(f.shared.inflight_count(), 2);

    assert!(text(&mut f, r#"{"type":"note","data":1}"#, &q)
        .frames
        .is_empty());
    assert!(matches!(q.take().last(), Some(Command::Event { msg_type, .. }) if msg_type == "note"));
}

#[test]
fn a_request_the_bridge_cannot_take_is_rolled_back() {
    let mut f = fixture(testkit::route("/ws", "svc"));
    let q = Recorder::with_room(0);
    let got = only_frame(&text(&mut f, r#"{"type":"echo","id":"1"}"#, &q));
    assert_eq!(error_code(&got), "overloaded");
    assert!(got["correlation_id"].is_string());
    assert_eq!(f.shared.inflight_count(), 0, "the id is free again");
    let got = only_frame(&text(&mut f, r#"{"type":"note"}"#, &q));
    assert_eq!(error_code(&got), "overloaded");
}

#[test]
fn binary_frames_follow_the_route() {
    let mut f = fixture(testkit::route("/ws", "svc"));
    let q = Recorder::with_room(1);
    let data = bytes::Bytes::from_static(b"\x00\x01");
    assert!(f.inbound.on_binary(data.clone(), &q).frames.is_empty());
    assert!(matches!(&q.take()[..], [Command::Binary { .. }]));
    let full = only_frame(&f.inbound.on_binary(data.clone(), &q));
    assert_eq!(error_code(&full), "overloaded");

    let mut route = testkit::route("/ws", "svc");
    route.binary = false;
    let mut f = fixture(route);
    let refused = only_frame(&f.inbound.on_binary(data, &q));
    assert_eq!(error_code(&refused), "bad_request");
}

#[test]
fn raw_routes_pass_frames_unchanged_and_close_when_the_bridge_is_full() {
    let mut route = testkit::route("/raw", "svc");
    route.raw = true;
    let mut f = fixture(route);
    let q = Recorder::with_room(1);
    let a = text(&mut f, r#"{"type":"ping"}"#, &q);
    assert!(a.frames.is_empty() && a.close.is_none());
    let sent = q.take();
    let [Command::Raw {
        binary: false,
        payload,
        ..
    }] = &sent[..]
    else {
        panic!("{sent:?}")
    };
    assert_eq!(&payload[..], br#"{"type":"ping"}"#, "not handled as a ping");
    let a = text(&mut f, "x", &q);
    assert_eq!(a.close.map(|c| c.code), Some(1013));
}

#[test]
fn rate_limits_refuse_then_close_with_1008() {
    let mut route = testkit::route("/ws", "svc");
    route.rate_limit.messages_per_second = 1;
    route.rate_limit.message_burst = 1;
    route.rate_limit.close_after_rejections = 3;
    let mut f = fixture(route);
    let q = Recorder::with_room(0);
    let ping = r#"{"type":"ping","id":"p"}"#;
    assert_eq!(only_frame(&text(&mut f, ping, &q))["type"], "pong");
    for _ in 0..2 {
        let refused = only_frame(&text(&mut f, ping, &q));
        assert_eq!(error_code(&refused), "rate_limited");
        assert_eq!(refused["id"], "p");
        assert!(refused["error"]["retry_after_ms"].as_u64() >= Some(1));
    }
    let last = text(&mut f, ping, &q);
    assert!(last.frames.is_empty());
    assert_eq!(last.close.map(|c| c.code), Some(1008));
}

#[test]
fn a_closing_session_refuses_requests_and_closes_when_idle_or_at_its_deadline() {
    let mut f = fixture(testkit::route("/ws", "svc"));
    let q = Recorder::with_room(10);
    let t0 = Instant::now();
    assert!(text(&mut f, r#"{"type":"echo","id":"1"}"#, &q)
        .frames
        .is_empty());
    let cid = f.shared.cid_of("\"1\"").unwrap();
    f.inbound.start_closing(1001, "server shutting down", t0);
    f.inbound.start_closing(1012, "route removed", t0); // the first reason stays
    let refused = only_frame(&text(&mut f, r#"{"type":"echo","id":"2"}"#, &q));
    assert_eq!(error_code(&refused), "overloaded");
    assert_eq!(f.inbound.close_due(t0), None, "a request is in flight");
    let deadline = t0 + Duration::from_secs(10);
    assert_eq!(f.inbound.closing_deadline(), Some(deadline));
    assert_eq!(
        f.inbound.close_due(deadline),
        Some(Close {
            code: 1001,
            reason: "server shutting down"
        })
    );
    f.shared.end_request("\"1\"", &cid);
    f.shared
        .send(OutFrame::error(None, Some(cid), "x", "y", None).into());
    assert_eq!(f.inbound.close_due(t0).map(|c| c.code), Some(1001));
}

#[test]
fn reloads_update_policies_or_close_with_1012() {
    let base = testkit::route("/ws", "svc");
    let now = Instant::now();

    let mut f = fixture(base.clone());
    let mut tighter = base.clone();
    tighter.max_in_flight = 1;
    f.inbound
        .on_routes(&RouteTable::new(vec![tighter.clone()]), now);
    assert!(!f.inbound.is_closing());
    assert_eq!(f.inbound.route().max_in_flight, 1);

    for (change, reason) in [
        (None, "route removed"),
        (
            Some(Route {
                service: "other".into(),
                ..base.clone()
            }),
            "route changed",
        ),
        (
            Some(Route {
                raw: true,
                ..base.clone()
            }),
            "route changed",
        ),
    ] {
        let mut f = fixture(base.clone());
        let table = RouteTable::new(change.into_iter().collect());
        f.inbound.on_routes(&table, now);
        assert_eq!(f.inbound.close_due(now), Some(Close { code: 1012, reason }),);
    }
}

/// Defect: a session closing because its route changed kind kept its old
/// route and called `limits()` with the old policy on every message, so
/// the route's shared limiters (per-IP connections, route messages) were
/// rebuilt, and reset, by every message it got.
#[test]
fn a_closing_session_does_not_reset_the_route_limiters() {
    let runtimes = Runtimes::default();
    let mut route = testkit::route("/ws", "svc");
    route.rate_limit.route_messages_per_second = 1000;
    let mut f = fixture_on(&runtimes, route.clone());
    let mut changed = route.clone();
    changed.service = "other".into();
    changed.rate_limit.route_messages_per_second = 2;
    f.inbound
        .on_routes(&RouteTable::new(vec![changed.clone()]), Instant::now());
    assert!(f.inbound.is_closing());

    // New connections of the route take the new policy (http::upgrade),
    // and use up the route's budget.
    let limits = f.runtime.limits(&changed.rate_limit);
    assert!(limits.messages.check().is_ok() && limits.messages.check().is_ok());
    assert!(limits.messages.check().is_err());
    let q = Recorder::with_room(10);
    for _ in 0..5 {
        text(&mut f, r#"{"type":"ping"}"#, &q);
    }
    let now = f.runtime.limits(&changed.rate_limit);
    assert!(
        Arc::ptr_eq(&limits, &now),
        "the closing session's messages rebuilt the route's limiters"
    );
    assert!(now.messages.check().is_err(), "the budget is still used up");
}

/// Defect: `ping` and `cancel` were refused with `overloaded` while the
/// session was closing, although it still owes its in-flight requests.
#[test]
fn ping_and_cancel_still_work_while_closing() {
    let mut f = fixture(testkit::route("/ws", "svc"));
    let q = Recorder::with_room(10);
    assert!(text(&mut f, r#"{"type":"slow","id":"1"}"#, &q)
        .frames
        .is_empty());
    let cid = f.shared.cid_of("\"1\"").unwrap();
    q.take();
    f.inbound
        .start_closing(1001, "server shutting down", Instant::now());

    let pong = only_frame(&text(&mut f, r#"{"type":"ping","id":"p"}"#, &q));
    assert_eq!(pong["type"], "pong", "{pong}");
    let ack = only_frame(&text(
        &mut f,
        r#"{"type":"cancel","id":"c","data":{"id":"1"}}"#,
        &q,
    ));
    assert_eq!(
        (ack["type"].as_str(), &ack["data"]),
        (Some("cancel"), &json!({"id": "1"}))
    );
    assert!(matches!(&q.take()[..], [Command::Cancel { cid: c, .. }] if *c == cid));
    let refused = only_frame(&text(&mut f, r#"{"type":"slow","id":"2"}"#, &q));
    assert_eq!(error_code(&refused), "overloaded", "still no new requests");
}

/// Defect: a `cancel` was acknowledged even when the bridge queue was full
/// and the cancel was dropped.
#[test]
fn a_cancel_the_bridge_cannot_take_is_answered_overloaded() {
    let mut f = fixture(testkit::route("/ws", "svc"));
    let q = Recorder::with_room(1);
    assert!(text(&mut f, r#"{"type":"slow","id":"1"}"#, &q)
        .frames
        .is_empty());
    let got = only_frame(&text(
        &mut f,
        r#"{"type":"cancel","id":"c","data":{"id":"1"}}"#,
        &q,
    ));
    assert_eq!(got["id"], "c");
    assert_eq!(error_code(&got), "overloaded", "not acknowledged: {got}");
    assert!(got["error"]["retry_after_ms"].as_u64().is_some(), "{got}");
    assert_eq!(
        f.shared.inflight_count(),
        1,
        "the request is still in flight"
    );
}
