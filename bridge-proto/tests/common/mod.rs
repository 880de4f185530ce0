//! Shared pieces of the golden-vector and `PROTOCOL.md` tests: the catalogue
//! of vectors (one constructed message per file), the catalogue of frames
//! every decoder must reject, and a generic MessagePack reader that keeps
//! map order and tells `bin` from `str`, which `serde_json::Value` cannot.
//!
//! The catalogue is the single source of the vector files: regenerating them
//! (`REGENERATE_VECTORS=1`, see `PROTOCOL.md`) writes exactly these messages.
//! Maps inside `data` values are written with their keys already sorted, so
//! the encoded bytes do not depend on whether serde_json keeps insertion
//! order (its `preserve_order` feature) or sorts keys.

// Each test binary that includes this module uses a different part of it.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use bridge_proto::*;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{json, Value};

/// Environment variable that makes the vector test (re)write the files.
pub const REGENERATE: &str = "REGENERATE_VECTORS";

pub fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors")
}

pub fn regenerating() -> bool {
    std::env::var_os(REGENERATE).is_some_and(|v| !v.is_empty() && v != "0")
}

/// One message of either direction, or a publication payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Msg {
    To(ToWorker),
    From(FromWorker),
    Publication(Publication),
}

impl Msg {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Msg::To(m) => encode_to_worker(m),
            Msg::From(m) => encode_from_worker(m),
            Msg::Publication(p) => encode_publication(p),
        }
    }

    /// Decodes `bytes` with the decoder of this message's direction.
    pub fn decode_like(&self, bytes: &[u8]) -> Result<Msg, DecodeError> {
        Direction::of(self).decode(bytes)
    }

    /// The `kind` this message has on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::To(m) => m.kind(),
            Msg::From(m) => m.kind(),
            Msg::Publication(_) => "publication",
        }
    }
}

/// Which decoder a frame is meant for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToWorker,
    FromWorker,
    Publication,
}

impl Direction {
    pub fn of(msg: &Msg) -> Self {
        match msg {
            Msg::To(_) => Direction::ToWorker,
            Msg::From(_) => Direction::FromWorker,
            Msg::Publication(_) => Direction::Publication,
        }
    }

    /// Directory name under `vectors/` (the publication lives at the top).
    pub fn dir(self) -> &'static str {
        match self {
            Direction::ToWorker => "to_worker",
            Direction::FromWorker => "from_worker",
            Direction::Publication => "",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Direction::ToWorker => "to_worker",
            Direction::FromWorker => "from_worker",
            Direction::Publication => "publication",
        }
    }

    pub fn decode(self, bytes: &[u8]) -> Result<Msg, DecodeError> {
        match self {
            Direction::ToWorker => decode_to_worker(bytes).map(Msg::To),
            Direction::FromWorker => decode_from_worker(bytes).map(Msg::From),
            Direction::Publication => decode_publication(bytes).map(Msg::Publication),
        }
    }
}

pub const TO_WORKER_KINDS: [&str; 11] = [
    "welcome",
    "challenge",
    "goodbye",
    "heartbeat",
    "request",
    "event",
    "binary",
    "raw",
    "connect",
    "disconnect",
    "cancel",
];

pub const FROM_WORKER_KINDS: [&str; 13] = [
    "hello",
    "auth",
    "heartbeat",
    "reply",
    "error",
    "push",
    "push_binary",
    "raw",
    "close",
    "subscribe",
    "unsubscribe",
    "publish",
    "bye",
];

/// A golden vector: `vectors/<dir>/<name>.msgpack` and `.json`.
#[derive(Debug, Clone)]
pub struct Vector {
    /// `<kind>` for the main vector of a kind, `<kind>.<variant>` for others.
    pub name: &'static str,
    pub msg: Msg,
}

impl Vector {
    pub fn direction(&self) -> Direction {
        Direction::of(&self.msg)
    }

    fn path(&self, ext: &str) -> PathBuf {
        vectors_dir()
            .join(self.direction().dir())
            .join(format!("{}.{ext}", self.name))
    }

    pub fn msgpack_path(&self) -> PathBuf {
        self.path("msgpack")
    }

    pub fn json_path(&self) -> PathBuf {
        self.path("json")
    }

    /// Path relative to `vectors/`, as `PROTOCOL.md` names it.
    pub fn rel(&self) -> String {
        match self.direction() {
            Direction::Publication => format!("{}.msgpack", self.name),
            d => format!("{}/{}.msgpack", d.dir(), self.name),
        }
    }
}

fn s(x: &str) -> String {
    x.to_owned()
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (s(k), s(v))).collect()
}

const CID: &str = "01JD8ZQ6W3N4V5X7Y9A2B3C4D5";
const CONN: &str = "01JD8ZQ5KX0M1N2P3Q4R5S6T7V";
/// The nonce of the `challenge` vector (and of the proof in `auth`).
const CHALLENGE_NONCE: [u8; 32] = [
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
    26, 27, 28, 29, 30, 31,
];

/// Every golden vector. The main vector of each kind has every optional
/// field present; `.<variant>` vectors cover the other shapes.
pub fn catalogue() -> Vec<Vector> {
    use FromWorker as F;
    use ToWorker as T;
    let to = |name, m| Vector {
        name,
        msg: Msg::To(m),
    };
    let from = |name, m| Vector {
        name,
        msg: Msg::From(m),
    };
    vec![
        // ---- router -> worker ----
        to(
            "welcome",
            T::Welcome(Welcome {
                router_id: s("router-01JD8ZPZ7E5V0C2G4H6J8K0M2N"),
                heartbeat_ms: 1000,
                liveness: 3,
                max_frame_bytes: Some(16_842_752),
            }),
        ),
        to(
            "welcome.minimal",
            T::Welcome(Welcome {
                router_id: s("router-01JD8ZPZ7E5V0C2G4H6J8K0M2N"),
                heartbeat_ms: 1000,
                liveness: 3,
                max_frame_bytes: None,
            }),
        ),
        to(
            "challenge",
            T::Challenge(Challenge {
                nonce: CHALLENGE_NONCE.to_vec(),
            }),
        ),
        to(
            "goodbye",
            T::Goodbye(Goodbye {
                reason: s("unsupported protocol version 3 (this router speaks 1 to 2)"),
                reconnect: false,
            }),
        ),
        to(
            "goodbye.reconnect",
            T::Goodbye(Goodbye {
                reason: s("router shutting down"),
                reconnect: true,
            }),
        ),
        to("heartbeat", T::Heartbeat),
        to(
            "request",
            T::Request(Request {
                cid: s(CID),
                conn: s(CONN),
                route: s("/ws/vision"),
                service: s("vision"),
                msg_type: s("request_workspace_analysis"),
                id: json!("req-1"),
                // Keys in sorted order: see the module comment.
                data: json!({
                    "image": {"height": 480, "width": 640},
                    "labels": ["chair", "desk", "écran"],
                    "lang": "日本語 ✓",
                    "légende": "chaise ✓",
                    "options": {"detail": 0.75, "max": null, "verbose": true},
                    "seed": -42
                }),
                timeout_ms: 30_000,
                deadline_ms: 1_767_225_630_000,
                attempt: 1,
                claims: Some(json!({"exp": 1_767_229_200, "roles": ["viewer"], "sub": "user-42"})),
            }),
        ),
        to(
            "request.minimal",
            T::Request(Request {
                cid: s("c1"),
                conn: s("k1"),
                route: s("/ws"),
                service: s("chat"),
                msg_type: s("echo"),
                id: json!(7),
                data: Value::Null,
                timeout_ms: 5000,
                deadline_ms: 1_767_225_605_000,
                attempt: 2,
                claims: None,
            }),
        ),
        to(
            "event",
            T::Event(Event {
                conn: s(CONN),
                route: s("/ws/automation"),
                service: s("automation"),
                msg_type: s("HUMAN_RESPONSE"),
                data: json!({"answer": "Oui, continuez — merci 🙂", "run": 12}),
            }),
        ),
        to(
            "binary",
            T::Binary(Binary {
                conn: s(CONN),
                route: s("/ws/voice"),
                service: s("voice"),
                data: b"RIFF\x00\x01\x7f\x80\xfe\xff".to_vec(),
            }),
        ),
        to(
            "raw",
            T::Raw(RawFrame {
                conn: s(CONN),
                binary: false,
                payload: "héllo raw ✓".as_bytes().to_vec(),
            }),
        ),
        to(
            "raw.binary",
            T::Raw(RawFrame {
                conn: s(CONN),
                binary: true,
                payload: vec![0x00, 0xff, 0x10, 0x80],
            }),
        ),
        to(
            "connect",
            T::Connect(Connect {
                conn: s(CONN),
                route: s("/ws/rooms/{room}"),
                service: s("chat"),
                path: s("/ws/rooms/42"),
                params: map(&[("room", "42")]),
                query: map(&[("lang", "fr"), ("nick", "Zoë")]),
                headers: map(&[
                    ("origin", "https://app.example.com"),
                    ("user-agent", "Mozilla/5.0 (X11; Linux x86_64)"),
                ]),
                remote: s("127.0.0.1:53412"),
                claims: Some(json!({
                    "exp": 1_767_229_200,
                    "name": "Zoë",
                    "roles": ["admin", "user"],
                    "sub": "user-123"
                })),
                client_cert: Some(ClientCert {
                    subject: s("CN=alice,O=Example Corp"),
                }),
            }),
        ),
        to(
            "connect.minimal",
            T::Connect(Connect {
                conn: s("k1"),
                route: s("/ws"),
                service: s("chat"),
                path: s("/ws"),
                params: BTreeMap::new(),
                query: BTreeMap::new(),
                headers: BTreeMap::new(),
                remote: s("[::1]:40000"),
                claims: None,
                client_cert: None,
            }),
        ),
        to(
            "disconnect",
            T::Disconnect(Disconnect {
                conn: s(CONN),
                route: s("/ws/voice"),
                service: s("voice"),
                code: 1001,
                reason: s("going away"),
            }),
        ),
        to(
            "cancel",
            T::Cancel(Cancel {
                cid: s(CID),
                reason: s("client"),
            }),
        ),
        // ---- worker -> router ----
        from(
            "hello",
            F::Hello(Hello {
                worker_id: s("vision-1"),
                services: vec![s("vision"), s("vision-beta")],
                capacity: 8,
                sdk: s("worker-sdk-rust/0.1.0"),
                msg_types: Some(vec![s("request_workspace_analysis"), s("überblick")]),
            }),
        ),
        from(
            "auth",
            F::Auth(Auth {
                // auth::proof(b"s3cret", <the challenge vector's nonce>)
                proof: bridge_proto::auth::proof(b"s3cret", &CHALLENGE_NONCE).to_vec(),
            }),
        ),
        from(
            "hello.minimal",
            F::Hello(Hello {
                worker_id: s("echo"),
                services: vec![s("echo")],
                capacity: 1,
                sdk: s("worker-sdk-python/0.1.0"),
                msg_types: None,
            }),
        ),
        from("heartbeat", F::Heartbeat),
        from(
            "reply",
            F::Reply(Reply {
                cid: s(CID),
                done: false,
                msg_type: Some(s("progress")),
                data: json!({"progress": 0.5, "stage": "segmenting ✂"}),
            }),
        ),
        from(
            "reply.final",
            F::Reply(Reply {
                cid: s(CID),
                done: true,
                msg_type: None,
                data: json!({
                    "result": {
                        "count": 3,
                        "max_u64": u64::MAX,
                        "min_i64": i64::MIN,
                        "objects": [{"label": "chair", "score": 0.125}, [], {}],
                        "ratio": -2.25
                    }
                }),
            }),
        ),
        from(
            "error",
            F::Error(ErrorReply {
                cid: s(CID),
                code: s(codes::RATE_LIMITED),
                message: s("the model is saturated"),
                retryable: true,
                retry_after_ms: Some(1500),
            }),
        ),
        from(
            "error.cancelled",
            F::Error(ErrorReply {
                cid: s(CID),
                code: s(codes::CANCELLED),
                message: s("cancelled by the client"),
                retryable: false,
                retry_after_ms: None,
            }),
        ),
        from(
            "push",
            F::Push(Push {
                conn: s(CONN),
                msg_type: s("partial_transcript"),
                data: json!({
                    "final": false,
                    "text": "bonjour à tous",
                    "words": [{"t": 0.0, "w": "bonjour"}, {"t": 0.42, "w": "à"}]
                }),
            }),
        ),
        from(
            "push_binary",
            F::PushBinary(PushBinary {
                conn: s(CONN),
                data: vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0x00],
            }),
        ),
        from(
            "raw",
            F::Raw(RawFrame {
                conn: s(CONN),
                binary: false,
                payload: "echo: héllo raw ✓".as_bytes().to_vec(),
            }),
        ),
        from(
            "close",
            F::Close(Close {
                conn: s(CONN),
                code: 4001,
                reason: s("session expired"),
            }),
        ),
        from(
            "subscribe",
            F::Subscribe(TopicChange {
                conn: s(CONN),
                topic: s("room:42"),
            }),
        ),
        from(
            "unsubscribe",
            F::Unsubscribe(TopicChange {
                conn: s(CONN),
                topic: s("room:42"),
            }),
        ),
        from(
            "publish",
            F::Publish(Publish {
                topic: s("room:lobby"),
                msg_type: s("message"),
                data: json!({"from": "Zoë", "text": "salut 👋"}),
            }),
        ),
        from(
            "bye",
            F::Bye(Bye {
                reason: s("SIGTERM: draining"),
            }),
        ),
        // ---- publication payload (the frame after the topic frame) ----
        Vector {
            name: "publication",
            msg: Msg::Publication(Publication {
                msg_type: s("price_update"),
                data: json!({"price": 101.25, "symbol": "ACME", "ts": 1_767_225_600_123u64}),
            }),
        },
    ]
}

/// How a rejected frame must fail: the [`DecodeError`] variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Header,
    Version,
    UnknownKind,
    Body,
}

impl Rejection {
    pub fn name(self) -> &'static str {
        match self {
            Rejection::Header => "header",
            Rejection::Version => "version",
            Rejection::UnknownKind => "unknown_kind",
            Rejection::Body => "body",
        }
    }

    pub fn matches(self, err: &DecodeError) -> bool {
        matches!(
            (self, err),
            (Rejection::Header, DecodeError::Header(_))
                | (Rejection::Version, DecodeError::Version { .. })
                | (Rejection::UnknownKind, DecodeError::UnknownKind { .. })
                | (Rejection::Body, DecodeError::Body { .. })
        )
    }
}

/// A frame that the decoder of `direction` must reject: `vectors/invalid/<name>.msgpack`.
#[derive(Debug, Clone)]
pub struct Invalid {
    pub name: &'static str,
    pub direction: Direction,
    pub rejection: Rejection,
    pub why: &'static str,
    pub bytes: Vec<u8>,
}

/// Low-level MessagePack writer for frames serde would refuse to produce.
pub struct Raw(pub Vec<u8>);

impl Raw {
    pub fn map(n: u32) -> Self {
        let mut r = Raw(Vec::new());
        rmp::encode::write_map_len(&mut r.0, n).expect("writing to a Vec cannot fail");
        r
    }
    pub fn str(mut self, s: &str) -> Self {
        rmp::encode::write_str(&mut self.0, s).expect("writing to a Vec cannot fail");
        self
    }
    pub fn uint(mut self, n: u64) -> Self {
        rmp::encode::write_uint(&mut self.0, n).expect("writing to a Vec cannot fail");
        self
    }
    pub fn sint(mut self, n: i64) -> Self {
        rmp::encode::write_sint(&mut self.0, n).expect("writing to a Vec cannot fail");
        self
    }
    pub fn bin(mut self, b: &[u8]) -> Self {
        rmp::encode::write_bin(&mut self.0, b).expect("writing to a Vec cannot fail");
        self
    }
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    /// The `v` and `kind` entries (the caller counted them in `map(n)`).
    pub fn header(self, v: u64, kind: &str) -> Self {
        self.str("v").uint(v).str("kind").str(kind)
    }
}

/// Frames every implementation must reject (with a logged reason, never a crash).
pub fn invalid_catalogue() -> Vec<Invalid> {
    use Direction as D;
    use Rejection::*;
    let valid_request = encode_to_worker(&ToWorker::Request(Request {
        cid: s("c1"),
        conn: s("k1"),
        route: s("/ws"),
        service: s("chat"),
        msg_type: s("echo"),
        id: json!(7),
        data: json!({"text": "hi"}),
        timeout_ms: 5000,
        deadline_ms: 1_767_225_605_000,
        attempt: 1,
        claims: None,
    }));
    let push_with_data = |data: &[u8]| {
        Raw::map(5)
            .header(1, "push")
            .str("conn")
            .str("k1")
            .str("msg_type")
            .str("t")
            .str("data")
            .bytes(data)
            .0
    };
    let inv = |name, direction, rejection, why, bytes| Invalid {
        name,
        direction,
        rejection,
        why,
        bytes,
    };
    vec![
        inv("empty", D::FromWorker, Header, "an empty frame", Vec::new()),
        inv(
            "not_a_map",
            D::FromWorker,
            Header,
            "a MessagePack string instead of a map",
            Raw(Vec::new()).str("heartbeat").0,
        ),
        inv(
            "no_version",
            D::FromWorker,
            Header,
            "the map has no `v`",
            Raw::map(1).str("kind").str("heartbeat").0,
        ),
        inv(
            "version_3",
            D::FromWorker,
            Version,
            "`v` is 3: an unsupported protocol version",
            Raw::map(2).header(3, "heartbeat").0,
        ),
        inv(
            "version_3_hello",
            D::FromWorker,
            Version,
            "a hello that speaks protocol version 3 (the router answers goodbye{reconnect:false})",
            Raw::map(6)
                .header(3, "hello")
                .str("worker_id")
                .str("w")
                .str("services")
                .bytes(&[0x91])
                .str("echo")
                .str("capacity")
                .uint(1)
                .str("sdk")
                .str("future-sdk/9")
                .0,
        ),
        inv(
            "version_as_string",
            D::ToWorker,
            Header,
            "`v` is the string \"1\", not an integer",
            Raw::map(2).str("v").str("1").str("kind").str("heartbeat").0,
        ),
        inv(
            "unknown_kind",
            D::FromWorker,
            UnknownKind,
            "`kind` is not a message of this direction",
            Raw::map(2).header(1, "frobnicate").0,
        ),
        inv(
            "hello_to_worker",
            D::ToWorker,
            UnknownKind,
            "`hello` is a worker -> router message; a worker must not accept it",
            encode_from_worker(&FromWorker::Hello(Hello {
                worker_id: s("w"),
                services: vec![s("echo")],
                capacity: 1,
                sdk: s("sdk/1"),
                msg_types: None,
            })),
        ),
        inv(
            "publication_wrong_kind",
            D::Publication,
            UnknownKind,
            "a publication payload whose `kind` is `push`",
            encode_from_worker(&FromWorker::Push(Push {
                conn: s("k1"),
                msg_type: s("t"),
                data: Value::Null,
            })),
        ),
        inv(
            "truncated_request",
            D::ToWorker,
            Header,
            "a valid request cut in the middle",
            valid_request[..valid_request.len() / 2].to_vec(),
        ),
        inv(
            "reply_missing_data",
            D::FromWorker,
            Body,
            "a reply without its required `data` (send nil when there is none)",
            Raw::map(4)
                .header(1, "reply")
                .str("cid")
                .str("c1")
                .str("done")
                .bytes(&[0xc3])
                .0,
        ),
        inv(
            "reply_cid_not_string",
            D::FromWorker,
            Body,
            "a reply whose `cid` is an integer",
            Raw::map(5)
                .header(1, "reply")
                .str("cid")
                .uint(5)
                .str("done")
                .bytes(&[0xc3])
                .str("data")
                .bytes(&[0xc0])
                .0,
        ),
        inv(
            "push_data_bin",
            D::FromWorker,
            Body,
            "`data` holds a MessagePack bin, which has no JSON form",
            push_with_data(&[0xc4, 0x02, 0x61, 0x62]),
        ),
        inv(
            "push_data_ext",
            D::FromWorker,
            Body,
            "`data` holds a MessagePack ext (type 2), which has no JSON form",
            push_with_data(&[0xd5, 0x02, 0x61, 0x62]),
        ),
        inv(
            "push_data_int_key",
            D::FromWorker,
            Body,
            "`data` holds a map with an integer key; JSON object keys are strings",
            push_with_data(&[0x81, 0x07, 0x07]),
        ),
        inv(
            "push_data_bad_utf8",
            D::FromWorker,
            Body,
            "`data` holds a str that is not valid UTF-8",
            push_with_data(&[0xa2, 0xff, 0xfe]),
        ),
        inv(
            "close_code_out_of_range",
            D::FromWorker,
            Body,
            "a close `code` of 70000 does not fit the 16-bit field",
            Raw::map(5)
                .header(1, "close")
                .str("conn")
                .str("k1")
                .str("code")
                .uint(70_000)
                .str("reason")
                .str("")
                .0,
        ),
        inv(
            "hello_negative_capacity",
            D::FromWorker,
            Body,
            "a hello with `capacity` -1",
            Raw::map(6)
                .header(1, "hello")
                .str("worker_id")
                .str("w")
                .str("services")
                .bytes(&[0x91])
                .str("echo")
                .str("capacity")
                .sint(-1)
                .str("sdk")
                .str("sdk/1")
                .0,
        ),
    ]
}

// ---------------------------------------------------------------------------
// Generic MessagePack values, in wire order.

/// A decoded MessagePack value that keeps what JSON loses: map order and
/// the difference between `str` and `bin`.
#[derive(Debug, Clone, PartialEq)]
pub enum Mp {
    Nil,
    Bool(bool),
    Uint(u64),
    Int(i64),
    Float(f64),
    Str(String),
    Bin(Vec<u8>),
    Array(Vec<Mp>),
    Map(Vec<(Mp, Mp)>),
}

impl Mp {
    pub fn decode(bytes: &[u8]) -> Result<Mp, rmp_serde::decode::Error> {
        rmp_serde::from_slice(bytes)
    }

    /// Encodes the value with the smallest MessagePack representation of
    /// each item (as the protocol's encoders do), keeping map order.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut Vec<u8>) {
        use rmp::encode as e;
        // Invariant for every `expect` below: writing to a Vec cannot fail.
        const OK: &str = "writing to a Vec cannot fail";
        match self {
            Mp::Nil => e::write_nil(out).expect(OK),
            Mp::Bool(b) => e::write_bool(out, *b).expect(OK),
            Mp::Uint(n) => {
                e::write_uint(out, *n).expect(OK);
            }
            Mp::Int(n) => {
                e::write_sint(out, *n).expect(OK);
            }
            Mp::Float(f) => e::write_f64(out, *f).expect(OK),
            Mp::Str(s) => e::write_str(out, s).expect(OK),
            Mp::Bin(b) => e::write_bin(out, b).expect(OK),
            Mp::Array(items) => {
                e::write_array_len(out, u32::try_from(items.len()).expect("small test arrays"))
                    .expect(OK);
                for item in items {
                    item.write(out);
                }
            }
            Mp::Map(entries) => {
                e::write_map_len(out, u32::try_from(entries.len()).expect("small test maps"))
                    .expect(OK);
                for (k, v) in entries {
                    k.write(out);
                    v.write(out);
                }
            }
        }
    }

    /// The entries of a map whose keys are all strings.
    pub fn entries(&self) -> Option<Vec<(&str, &Mp)>> {
        match self {
            Mp::Map(entries) => entries
                .iter()
                .map(|(k, v)| match k {
                    Mp::Str(k) => Some((k.as_str(), v)),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }

    /// The field of a map with string keys, if present.
    pub fn get(&self, key: &str) -> Option<&Mp> {
        self.entries()?
            .into_iter()
            .find_map(|(k, v)| (k == key).then_some(v))
    }

    /// Renders the value as pretty JSON in wire order. A `bin` becomes
    /// `{"$bin": "<lowercase hex>"}`: JSON has no byte strings, and the
    /// protocol never puts bytes where a JSON object could be, so the tag
    /// cannot be confused with data.
    pub fn to_json_text(&self) -> String {
        let mut out = String::new();
        self.write_json(0, &mut out);
        out.push('\n');
        out
    }

    fn write_json(&self, indent: usize, out: &mut String) {
        let pad = |n: usize| "  ".repeat(n);
        match self {
            Mp::Nil => out.push_str("null"),
            Mp::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Mp::Uint(n) => write!(out, "{n}").expect("writing to a String cannot fail"),
            Mp::Int(n) => write!(out, "{n}").expect("writing to a String cannot fail"),
            Mp::Float(f) => {
                out.push_str(&serde_json::to_string(f).expect("vectors hold finite floats only"))
            }
            Mp::Str(s) => out.push_str(&serde_json::to_string(s).expect("strings serialize")),
            Mp::Bin(b) => {
                out.push_str("{\"$bin\": \"");
                for byte in b {
                    write!(out, "{byte:02x}").expect("writing to a String cannot fail");
                }
                out.push_str("\"}");
            }
            Mp::Array(items) if items.is_empty() => out.push_str("[]"),
            Mp::Array(items) => {
                out.push_str("[\n");
                for (i, item) in items.iter().enumerate() {
                    out.push_str(&pad(indent + 1));
                    item.write_json(indent + 1, out);
                    out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
                }
                out.push_str(&pad(indent));
                out.push(']');
            }
            Mp::Map(entries) if entries.is_empty() => out.push_str("{}"),
            Mp::Map(entries) => {
                out.push_str("{\n");
                for (i, (k, v)) in entries.iter().enumerate() {
                    let Mp::Str(k) = k else {
                        panic!("vector maps have string keys, found {k:?}")
                    };
                    out.push_str(&pad(indent + 1));
                    out.push_str(&serde_json::to_string(k).expect("strings serialize"));
                    out.push_str(": ");
                    v.write_json(indent + 1, out);
                    out.push_str(if i + 1 < entries.len() { ",\n" } else { "\n" });
                }
                out.push_str(&pad(indent));
                out.push('}');
            }
        }
    }

    /// The MessagePack type name used in `PROTOCOL.md`'s field tables.
    pub fn wire_type(&self) -> &'static str {
        match self {
            Mp::Nil => "nil",
            Mp::Bool(_) => "bool",
            Mp::Uint(_) => "uint",
            Mp::Int(_) => "int",
            Mp::Float(_) => "float",
            Mp::Str(_) => "str",
            Mp::Bin(_) => "bin",
            Mp::Array(_) => "array",
            Mp::Map(_) => "map",
        }
    }
}

impl<'de> Deserialize<'de> for Mp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Mp;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a MessagePack value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Mp, E> {
                Ok(Mp::Nil)
            }
            fn visit_none<E: de::Error>(self) -> Result<Mp, E> {
                Ok(Mp::Nil)
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Mp, E> {
                Ok(Mp::Bool(b))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Mp, E> {
                Ok(Mp::Uint(n))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Mp, E> {
                // rmp-serde reports MessagePack's signed types as i64 even for
                // non-negative values; normalise so `wire_type` is about the
                // value, not the marker.
                Ok(u64::try_from(n).map_or(Mp::Int(n), Mp::Uint))
            }
            fn visit_f32<E: de::Error>(self, f: f32) -> Result<Mp, E> {
                Ok(Mp::Float(f64::from(f)))
            }
            fn visit_f64<E: de::Error>(self, f: f64) -> Result<Mp, E> {
                Ok(Mp::Float(f))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Mp, E> {
                Ok(Mp::Str(s.to_owned()))
            }
            fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<Mp, E> {
                Ok(Mp::Bin(b.to_vec()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Mp, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Mp::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Mp, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Mp::Map(entries))
            }
        }
        d.deserialize_any(V)
    }
}

/// Lowercase hex of `bytes`, no separators.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut out, b| {
        write!(out, "{b:02x}").expect("writing to a String cannot fail");
        out
    })
}
