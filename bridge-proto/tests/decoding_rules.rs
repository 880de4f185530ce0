//! The decoding rules `PROTOCOL.md` promises to implementers in other
//! languages, checked one by one on hand-written frames: nil counts as an
//! absent optional field, integers may use any width, 32-bit floats are
//! accepted, and nesting is bounded so a hostile frame cannot exhaust the
//! stack.

mod common;

use bridge_proto::*;
use common::Raw;
use serde_json::{json, Value};

/// Tokio's default worker-thread stack, where the router and the Rust SDK
/// decode frames.
const TOKIO_STACK: usize = 2 << 20;

fn on_stack<T: Send + 'static>(size: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(size)
        .spawn(f)
        .expect("spawn test thread")
        .join()
        .expect("decoder thread panicked")
}

#[test]
fn nil_optional_fields_count_as_absent() {
    let cases: Vec<(Vec<u8>, FromWorker)> = vec![
        (
            Raw::map(7)
                .header(1, "hello")
                .str("worker_id")
                .str("w")
                .str("services")
                .bytes(&[0x91])
                .str("echo")
                .str("capacity")
                .uint(2)
                .str("sdk")
                .str("sdk/1")
                .str("secret")
                .bytes(&[0xc0])
                .0,
            FromWorker::Hello(Hello {
                worker_id: "w".into(),
                services: vec!["echo".into()],
                capacity: 2,
                sdk: "sdk/1".into(),
                msg_types: None,
            }),
        ),
        (
            Raw::map(6)
                .header(1, "reply")
                .str("cid")
                .str("c")
                .str("done")
                .bytes(&[0xc3])
                .str("msg_type")
                .bytes(&[0xc0])
                .str("data")
                .bytes(&[0xc0])
                .0,
            FromWorker::Reply(Reply {
                cid: "c".into(),
                done: true,
                msg_type: None,
                data: Value::Null,
            }),
        ),
    ];
    for (bytes, expected) in cases {
        assert_eq!(decode_from_worker(&bytes).unwrap(), expected);
    }

    let connect = Raw::map(11)
        .header(1, "connect")
        .str("conn")
        .str("k")
        .str("route")
        .str("/ws")
        .str("service")
        .str("chat")
        .str("path")
        .str("/ws")
        .str("params")
        .bytes(&[0x80])
        .str("query")
        .bytes(&[0x80])
        .str("headers")
        .bytes(&[0x80])
        .str("remote")
        .str("127.0.0.1:1")
        .str("claims")
        .bytes(&[0xc0])
        .0;
    match decode_to_worker(&connect).unwrap() {
        ToWorker::Connect(c) => assert_eq!(c.claims, None),
        other => panic!("decoded {other:?}"),
    }
}

#[test]
fn integers_may_use_any_width() {
    // heartbeat_ms 1000 as uint 64 (0xcf), liveness 3 as uint 16 (0xcd), and
    // v 1 as int 8 (0xd0): all valid MessagePack for the same numbers.
    let bytes = Raw::map(5)
        .str("v")
        .bytes(&[0xd0, 0x01])
        .str("kind")
        .str("welcome")
        .str("router_id")
        .str("r")
        .str("heartbeat_ms")
        .bytes(&[0xcf, 0, 0, 0, 0, 0, 0, 0x03, 0xe8])
        .str("liveness")
        .bytes(&[0xcd, 0x00, 0x03])
        .0;
    assert_eq!(
        decode_to_worker(&bytes).unwrap(),
        ToWorker::Welcome(Welcome {
            router_id: "r".into(),
            heartbeat_ms: 1000,
            liveness: 3,
            max_frame_bytes: None,
        })
    );
}

#[test]
fn float32_values_are_accepted_as_numbers() {
    let bytes = Raw::map(5)
        .header(1, "push")
        .str("conn")
        .str("k")
        .str("msg_type")
        .str("t")
        .str("data")
        .bytes(&[0xca, 0x3f, 0xc0, 0x00, 0x00]) // float 32: 1.5
        .0;
    assert_eq!(
        decode_from_worker(&bytes).unwrap(),
        FromWorker::Push(Push {
            conn: "k".into(),
            msg_type: "t".into(),
            data: json!(1.5),
        })
    );
}

/// `depth` levels of alternating arrays and maps around a string.
fn nested(depth: usize) -> Value {
    (0..depth).fold(json!("core"), |inner, level| {
        if level % 2 == 0 {
            json!([inner])
        } else {
            json!({ "k": inner })
        }
    })
}

/// The deepest `data` PROTOCOL.md allows (127 levels, §16 "Limits") decodes
/// on the stack size the router runs its decoders on.
#[test]
fn data_nested_to_the_sender_limit_decodes_on_a_tokio_stack() {
    let msg = FromWorker::Push(Push {
        conn: "k".into(),
        msg_type: "t".into(),
        data: nested(127),
    });
    let bytes = encode_from_worker(&msg);
    let decoded = on_stack(TOKIO_STACK, move || decode_from_worker(&bytes).unwrap());
    assert_eq!(decoded, msg);
}

fn deep_frame(depth: usize) -> Vec<u8> {
    // A push whose data is `depth` one-element arrays around nil: 1 byte per
    // level, so a small frame can ask for a very deep recursion.
    let mut bytes = Raw::map(5)
        .header(1, "push")
        .str("conn")
        .str("k")
        .str("msg_type")
        .str("t")
        .str("data")
        .0;
    bytes.resize(bytes.len() + depth, 0x91);
    bytes.push(0xc0);
    bytes
}

/// There is a nesting limit at all: 100 000 levels in a 100 kB frame are
/// rejected rather than recursed into (checked on a large stack, see the
/// ignored test below for the stack the router actually uses).
#[test]
fn very_deep_frames_are_rejected() {
    let bytes = deep_frame(100_000);
    let result = on_stack(256 << 20, move || decode_from_worker(&bytes).map(|_| ()));
    assert!(result.is_err(), "100 000 levels were accepted");
}

/// The limit must hold on a tokio worker's stack too. It does not yet: the
/// codec keeps rmp-serde's default depth limit (1024), and a debug build
/// overflows a 2 MiB stack after about 550 levels, which aborts the whole
/// process (a stack overflow is not a panic that can be caught). The fix is
/// a limit of 128 levels per frame in `codec.rs` (PROTOCOL.md §16 "Limits"):
/// decode through an `rmp_serde::Deserializer` with `set_max_depth(129)`
/// (rmp-serde fails when its counter reaches the limit, so 129 admits 128
/// levels) in both the header and the body pass. Then this test passes and
/// the `ignore` goes.
#[test]
fn very_deep_frames_are_rejected_on_a_tokio_stack() {
    // 128 levels of data make a frame of 129 levels with the outer map.
    for depth in [128, 1_000, 100_000] {
        let bytes = deep_frame(depth);
        let result = on_stack(TOKIO_STACK, move || decode_from_worker(&bytes).map(|_| ()));
        assert!(result.is_err(), "depth {depth} was accepted");
    }
}
