//! Property tests of the codec: every message survives a round trip, the
//! decoders do not depend on key order or on fields they do not know, and no
//! input (random bytes, damaged encodings, well-formed maps full of wrong
//! types) makes a decoder panic. This is the protocol's fuzzing: the router
//! decodes frames from any process that can reach its sockets.

mod common;

use std::collections::BTreeMap;

use bridge_proto::*;
use common::{Direction, Mp, FROM_WORKER_KINDS, TO_WORKER_KINDS};
use proptest::{collection::vec, option, prelude::*, sample::Index};
use serde_json::Value;

// ---------------------------------------------------------------------------
// Strategies for the message structs.

fn text() -> impl Strategy<Value = String> {
    // Mostly short printable text, sometimes anything Unicode allows.
    prop_oneof![3 => "[a-z0-9_:/.-]{0,12}", 1 => any::<String>()]
}

/// Finite floats only: the protocol's values are JSON, which has no NaN or
/// infinity (serde_json turns them into null, so they could not round-trip).
fn finite_f64() -> impl Strategy<Value = f64> {
    any::<f64>().prop_filter("JSON numbers are finite", |f| f.is_finite())
}

/// JSON values nested at most 4 levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        finite_f64().prop_map(Value::from),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(text(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..48)
}

fn string_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map(text(), text(), 0..4)
}

fn raw_frame() -> impl Strategy<Value = RawFrame> {
    (text(), any::<bool>(), bytes()).prop_map(|(conn, binary, payload)| RawFrame {
        conn,
        binary,
        payload,
    })
}

fn to_worker() -> impl Strategy<Value = ToWorker> {
    prop_oneof![
        (text(), any::<u64>(), any::<u32>(), option::of(any::<u64>())).prop_map(
            |(router_id, heartbeat_ms, liveness, max_frame_bytes)| {
                ToWorker::Welcome(Welcome {
                    router_id,
                    heartbeat_ms,
                    liveness,
                    max_frame_bytes,
                })
            }
        ),
        vec(any::<u8>(), 0..40).prop_map(|nonce| ToWorker::Challenge(Challenge { nonce })),
        (text(), any::<bool>())
            .prop_map(|(reason, reconnect)| ToWorker::Goodbye(Goodbye { reason, reconnect })),
        Just(ToWorker::Heartbeat),
        (
            (text(), text(), text(), text(), text()),
            (json_value(), json_value()),
            (any::<u64>(), any::<u64>(), any::<u32>()),
        )
            .prop_map(
                |(
                    (cid, conn, route, service, msg_type),
                    (id, data),
                    (timeout_ms, deadline_ms, attempt),
                )| {
                    ToWorker::Request(Request {
                        cid,
                        conn,
                        route,
                        service,
                        msg_type,
                        id,
                        data,
                        timeout_ms,
                        deadline_ms,
                        attempt,
                        claims: None,
                    })
                }
            ),
        (text(), text(), text(), text(), json_value()).prop_map(
            |(conn, route, service, msg_type, data)| {
                ToWorker::Event(Event {
                    conn,
                    route,
                    service,
                    msg_type,
                    data,
                })
            }
        ),
        (text(), text(), text(), bytes()).prop_map(|(conn, route, service, data)| {
            ToWorker::Binary(Binary {
                conn,
                route,
                service,
                data,
            })
        }),
        raw_frame().prop_map(ToWorker::Raw),
        (
            (text(), text(), text(), text()),
            (string_map(), string_map(), string_map()),
            text(),
            // `claims: Some(null)` is written as `claims: nil`, which decodes
            // as absent (nil counts as absent for optional fields), so the
            // round trip is only exact for non-null claims.
            option::of(json_value().prop_filter("non-null claims", |v| !v.is_null())),
            option::of(text().prop_map(|subject| ClientCert { subject })),
        )
            .prop_map(
                |(
                    (conn, route, service, path),
                    (params, query, headers),
                    remote,
                    claims,
                    client_cert,
                )| {
                    ToWorker::Connect(Connect {
                        conn,
                        route,
                        service,
                        path,
                        params,
                        query,
                        headers,
                        remote,
                        claims,
                        client_cert,
                    })
                }
            ),
        (text(), text(), text(), any::<u16>(), text()).prop_map(
            |(conn, route, service, code, reason)| {
                ToWorker::Disconnect(Disconnect {
                    conn,
                    route,
                    service,
                    code,
                    reason,
                })
            }
        ),
        (text(), text()).prop_map(|(cid, reason)| ToWorker::Cancel(Cancel { cid, reason })),
    ]
}

fn from_worker() -> impl Strategy<Value = FromWorker> {
    prop_oneof![
        (
            text(),
            vec(text(), 0..4),
            any::<u32>(),
            text(),
            option::of(vec(text(), 0..4))
        )
            .prop_map(|(worker_id, services, capacity, sdk, msg_types)| {
                FromWorker::Hello(Hello {
                    worker_id,
                    services,
                    capacity,
                    sdk,
                    msg_types,
                })
            }),
        vec(any::<u8>(), 0..40).prop_map(|proof| FromWorker::Auth(Auth { proof })),
        Just(FromWorker::Heartbeat),
        (text(), any::<bool>(), option::of(text()), json_value()).prop_map(
            |(cid, done, msg_type, data)| {
                FromWorker::Reply(Reply {
                    cid,
                    done,
                    msg_type,
                    data,
                })
            }
        ),
        (
            text(),
            text(),
            text(),
            any::<bool>(),
            option::of(any::<u64>())
        )
            .prop_map(|(cid, code, message, retryable, retry_after_ms)| {
                FromWorker::Error(ErrorReply {
                    cid,
                    code,
                    message,
                    retryable,
                    retry_after_ms,
                })
            }),
        (text(), text(), json_value()).prop_map(|(conn, msg_type, data)| {
            FromWorker::Push(Push {
                conn,
                msg_type,
                data,
            })
        }),
        (text(), bytes())
            .prop_map(|(conn, data)| FromWorker::PushBinary(PushBinary { conn, data })),
        raw_frame().prop_map(FromWorker::Raw),
        (text(), any::<u16>(), text()).prop_map(|(conn, code, reason)| FromWorker::Close(Close {
            conn,
            code,
            reason
        })),
        (text(), text())
            .prop_map(|(conn, topic)| FromWorker::Subscribe(TopicChange { conn, topic })),
        (text(), text())
            .prop_map(|(conn, topic)| FromWorker::Unsubscribe(TopicChange { conn, topic })),
        (text(), text(), json_value()).prop_map(|(topic, msg_type, data)| {
            FromWorker::Publish(Publish {
                topic,
                msg_type,
                data,
            })
        }),
        text().prop_map(|reason| FromWorker::Bye(Bye { reason })),
    ]
}

fn publication() -> impl Strategy<Value = Publication> {
    (text(), json_value()).prop_map(|(msg_type, data)| Publication { msg_type, data })
}

fn any_msg() -> impl Strategy<Value = common::Msg> {
    prop_oneof![
        to_worker().prop_map(common::Msg::To),
        from_worker().prop_map(common::Msg::From),
        publication().prop_map(common::Msg::Publication),
    ]
}

// ---------------------------------------------------------------------------
// Arbitrary MessagePack, including what the protocol forbids (bin and ext in
// values, non-string keys, NaN, 32-bit floats, wide integer encodings).

#[derive(Debug, Clone)]
enum Garbage {
    Nil,
    Bool(bool),
    Uint(u64),
    Int(i64),
    /// An unsigned integer written with the 8-byte encoding even when small.
    WideUint(u64),
    F32(f32),
    F64(f64),
    Str(String),
    /// A str header followed by bytes that may not be UTF-8.
    RawStr(Vec<u8>),
    Bin(Vec<u8>),
    Ext(i8, Vec<u8>),
    Array(Vec<Garbage>),
    Map(Vec<(Garbage, Garbage)>),
}

impl Garbage {
    fn write(&self, out: &mut Vec<u8>) {
        use rmp::encode as e;
        // Invariant for every `expect` below: writing to a Vec cannot fail.
        const OK: &str = "writing to a Vec cannot fail";
        match self {
            Garbage::Nil => e::write_nil(out).expect(OK),
            Garbage::Bool(b) => e::write_bool(out, *b).expect(OK),
            Garbage::Uint(n) => {
                e::write_uint(out, *n).expect(OK);
            }
            Garbage::Int(n) => {
                e::write_sint(out, *n).expect(OK);
            }
            Garbage::WideUint(n) => e::write_u64(out, *n).expect(OK),
            Garbage::F32(f) => e::write_f32(out, *f).expect(OK),
            Garbage::F64(f) => e::write_f64(out, *f).expect(OK),
            Garbage::Str(s) => e::write_str(out, s).expect(OK),
            Garbage::RawStr(b) => {
                e::write_str_len(out, len32(b.len())).expect(OK);
                out.extend_from_slice(b);
            }
            Garbage::Bin(b) => e::write_bin(out, b).expect(OK),
            Garbage::Ext(ty, b) => {
                e::write_ext_meta(out, len32(b.len()), *ty).expect(OK);
                out.extend_from_slice(b);
            }
            Garbage::Array(items) => {
                e::write_array_len(out, len32(items.len())).expect(OK);
                for item in items {
                    item.write(out);
                }
            }
            Garbage::Map(entries) => {
                e::write_map_len(out, len32(entries.len())).expect(OK);
                for (k, v) in entries {
                    k.write(out);
                    v.write(out);
                }
            }
        }
    }
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).expect("generated collections are small")
}

fn garbage() -> impl Strategy<Value = Garbage> {
    let leaf = prop_oneof![
        Just(Garbage::Nil),
        any::<bool>().prop_map(Garbage::Bool),
        any::<u64>().prop_map(Garbage::Uint),
        any::<i64>().prop_map(Garbage::Int),
        any::<u64>().prop_map(Garbage::WideUint),
        (0u64..70_000).prop_map(Garbage::Uint),
        any::<f32>().prop_map(Garbage::F32),
        any::<f64>().prop_map(Garbage::F64),
        text().prop_map(Garbage::Str),
        vec(any::<u8>(), 0..8).prop_map(Garbage::RawStr),
        vec(any::<u8>(), 0..8).prop_map(Garbage::Bin),
        (any::<i8>(), vec(any::<u8>(), 0..8)).prop_map(|(t, b)| Garbage::Ext(t, b)),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(Garbage::Array),
            vec((inner.clone(), inner), 0..5).prop_map(Garbage::Map),
        ]
    })
}

/// Every field name of every message, so generated maps hit real fields.
const FIELD_NAMES: &[&str] = &[
    "router_id",
    "heartbeat_ms",
    "liveness",
    "reason",
    "reconnect",
    "cid",
    "conn",
    "route",
    "service",
    "msg_type",
    "id",
    "data",
    "timeout_ms",
    "deadline_ms",
    "attempt",
    "binary",
    "payload",
    "path",
    "params",
    "query",
    "headers",
    "remote",
    "claims",
    "code",
    "worker_id",
    "services",
    "capacity",
    "sdk",
    "msg_types",
    "secret",
    "done",
    "message",
    "retryable",
    "topic",
];

/// A map that looks like a bridge message (`v`, a real `kind`, real field
/// names) but whose values are arbitrary.
fn plausible_frame() -> impl Strategy<Value = Vec<u8>> {
    let kinds: Vec<&'static str> = TO_WORKER_KINDS
        .iter()
        .chain(FROM_WORKER_KINDS.iter())
        .chain(std::iter::once(&"publication"))
        .copied()
        .collect();
    (
        prop_oneof![8 => Just(1u64), 1 => any::<u64>()],
        prop::sample::select(kinds),
        vec((prop::sample::select(FIELD_NAMES), garbage()), 0..12),
    )
        .prop_map(|(v, kind, fields)| {
            let mut out = Vec::new();
            rmp::encode::write_map_len(&mut out, len32(fields.len() + 2))
                .expect("writing to a Vec cannot fail");
            Garbage::Str("v".into()).write(&mut out);
            Garbage::Uint(v).write(&mut out);
            Garbage::Str("kind".into()).write(&mut out);
            Garbage::Str(kind.into()).write(&mut out);
            for (name, value) in fields {
                Garbage::Str(name.into()).write(&mut out);
                value.write(&mut out);
            }
            out
        })
}

#[derive(Debug, Clone)]
enum Mutation {
    Truncate(Index),
    Xor(Index, u8),
    Insert(Index, u8),
    Remove(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), 1u8..).prop_map(|(i, x)| Mutation::Xor(i, x)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<Index>().prop_map(Mutation::Remove),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        match m {
            Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len() + 1)),
            Mutation::Insert(i, b) => bytes.insert(i.index(bytes.len() + 1), *b),
            Mutation::Xor(i, x) if !bytes.is_empty() => {
                let i = i.index(bytes.len());
                bytes[i] ^= x;
            }
            Mutation::Remove(i) if !bytes.is_empty() => {
                bytes.remove(i.index(bytes.len()));
            }
            Mutation::Xor(..) | Mutation::Remove(_) => {}
        }
    }
    bytes
}

/// Runs every decoder on `bytes`. Whatever a decoder accepts must be stable:
/// encoding it again and decoding that gives the same message, so a lenient
/// decode can never turn into a different message further down the line.
fn decode_everything(bytes: &[u8]) {
    for direction in [
        Direction::ToWorker,
        Direction::FromWorker,
        Direction::Publication,
    ] {
        if let Ok(msg) = direction.decode(bytes) {
            let again = direction
                .decode(&msg.encode())
                .unwrap_or_else(|e| panic!("re-encoded {msg:?} does not decode: {e}"));
            assert_eq!(again, msg);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn to_worker_round_trips(msg in to_worker()) {
        let bytes = encode_to_worker(&msg);
        prop_assert_eq!(decode_to_worker(&bytes)?, msg);
    }

    #[test]
    fn from_worker_round_trips(msg in from_worker()) {
        let bytes = encode_from_worker(&msg);
        prop_assert_eq!(decode_from_worker(&bytes)?, msg);
    }

    #[test]
    fn publication_round_trips(p in publication()) {
        let bytes = encode_publication(&p);
        prop_assert_eq!(decode_publication(&bytes)?, p);
    }

    /// The wire layout of PROTOCOL.md: a map whose first two keys are `v` (the current version)
    /// and `kind`, and whose values hold no `bin` except in byte fields.
    #[test]
    fn encodings_start_with_v_and_kind(msg in any_msg()) {
        let generic = Mp::decode(&msg.encode())?;
        let entries = generic.entries().expect("a map with string keys");
        prop_assert_eq!(entries[0], ("v", &Mp::Uint(u64::from(PROTOCOL_VERSION))));
        prop_assert_eq!(entries[1], ("kind", &Mp::Str(msg.kind().to_owned())));
    }

    /// Decoders must not depend on key order or on fields they do not know.
    #[test]
    fn key_order_and_unknown_fields_do_not_matter(
        msg in any_msg(),
        extra in vec(("x_[a-z]{0,6}", garbage()), 0..4),
        swaps in vec(any::<(Index, Index)>(), 0..16),
    ) {
        let Mp::Map(mut entries) = Mp::decode(&msg.encode())? else {
            panic!("encodings are maps");
        };
        let mut bytes = Vec::new();
        // Unknown fields go in as raw MessagePack (they may hold bin or ext),
        // so the map is written by hand: known entries re-encoded, then extras.
        for (name, value) in &extra {
            let mut v = Vec::new();
            value.write(&mut v);
            entries.push((Mp::Str(name.clone()), Mp::Bin(v)));
        }
        for (a, b) in &swaps {
            let (a, b) = (a.index(entries.len()), b.index(entries.len()));
            entries.swap(a, b);
        }
        rmp::encode::write_map_len(&mut bytes, len32(entries.len()))
            .expect("writing to a Vec cannot fail");
        for (k, v) in &entries {
            bytes.extend_from_slice(&k.encode());
            match (k, v) {
                (Mp::Str(name), Mp::Bin(raw)) if name.starts_with("x_") => {
                    bytes.extend_from_slice(raw);
                }
                _ => bytes.extend_from_slice(&v.encode()),
            }
        }
        prop_assert_eq!(msg.decode_like(&bytes)?, msg);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..256)) {
        decode_everything(&bytes);
    }

    #[test]
    fn damaged_encodings_never_panic(msg in any_msg(), mutations in vec(mutation(), 1..4)) {
        decode_everything(&mutate(msg.encode(), &mutations));
    }

    #[test]
    fn plausible_frames_with_wrong_types_never_panic(
        bytes in plausible_frame(),
        mutations in vec(mutation(), 0..2),
    ) {
        decode_everything(&mutate(bytes, &mutations));
    }
}
