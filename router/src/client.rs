//! The client protocol (README, "Client protocol"): JSON frames between browsers and the router.
//!
//! Inbound: `{"type": "...", "id": <optional string|number>, "data": <any>}`.
//! Outbound: replies, errors, pushes and router frames, all built here so the
//! shape of the public API lives in one place. `seq` is filled in by the
//! session writer, the only place that knows the send order.

use bridge_proto::codes;
use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use std::{fmt::Write as _, sync::Arc};

use crate::ids::Cid;

/// A well-formed client message.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientMessage {
    pub msg_type: String,
    /// Present for requests (which get replies), absent for fire-and-forget.
    pub id: Option<Value>,
    pub data: Value,
}

/// Why a text frame is not a valid client message. Carries the `id` when
/// one could be read, so the client can match the error to its request.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRequest {
    pub id: Option<Value>,
    pub message: String,
}

/// Longest accepted `type` and string `id`, in bytes: these end up in logs,
/// metrics labels and every reply frame.
pub const MAX_TYPE_LEN: usize = 128;
const MAX_ID_LEN: usize = 256;

/// Parses one text frame.
///
/// The frame is read field by field ([`Envelope`]): only `type`, `id` and
/// `data` are kept, and no map of the top-level object is built. A field
/// given twice counts once, the last one, as a JSON object read into a map
/// would have it.
pub fn parse(text: &str) -> Result<ClientMessage, BadRequest> {
    let envelope: Envelope = serde_json::from_str(text).map_err(|e| BadRequest {
        id: None,
        message: format!("malformed JSON: {e}"),
    })?;
    let Envelope::Object { msg_type, id, data } = envelope else {
        return Err(BadRequest {
            id: None,
            message: "a message must be a JSON object with a \"type\" field".into(),
        });
    };
    let id = checked_id(id)?;
    let msg_type = match msg_type {
        Some(Value::String(t)) if !t.is_empty() && t.len() <= MAX_TYPE_LEN => t,
        Some(Value::String(t)) if t.is_empty() => {
            return Err(bad(id, "\"type\" must not be empty"));
        }
        Some(Value::String(_)) => {
            return Err(bad(
                id,
                &format!("\"type\" is longer than {MAX_TYPE_LEN} bytes"),
            ))
        }
        Some(_) => return Err(bad(id, "\"type\" must be a string")),
        None => return Err(bad(id, "missing \"type\" field")),
    };
    Ok(ClientMessage {
        msg_type,
        id,
        data: data.unwrap_or(Value::Null),
    })
}

/// A client frame as read: an object's three fields of interest (others
/// are skipped unread), or anything that is not an object.
enum Envelope {
    Object {
        msg_type: Option<Value>,
        id: Option<Value>,
        data: Option<Value>,
    },
    NotObject,
}

impl<'de> serde::Deserialize<'de> for Envelope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(EnvelopeVisitor)
    }
}

/// A top-level key: one of the three, or another (not kept).
enum Key {
    Type,
    Id,
    Data,
    Other,
}

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl serde::de::Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: serde::de::Error>(self, k: &str) -> Result<Key, E> {
                Ok(match k {
                    "type" => Key::Type,
                    "id" => Key::Id,
                    "data" => Key::Data,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_identifier(KeyVisitor)
    }
}

struct EnvelopeVisitor;

impl<'de> serde::de::Visitor<'de> for EnvelopeVisitor {
    type Value = Envelope;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Envelope, A::Error> {
        let (mut msg_type, mut id, mut data) = (None, None, None);
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Type => msg_type = Some(map.next_value()?),
                Key::Id => id = Some(map.next_value()?),
                Key::Data => data = Some(map.next_value()?),
                Key::Other => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(Envelope::Object { msg_type, id, data })
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Envelope, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Envelope::NotObject)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Envelope, E> {
        Ok(Envelope::NotObject)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Envelope, E> {
        Ok(Envelope::NotObject)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Envelope, E> {
        Ok(Envelope::NotObject)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Envelope, E> {
        Ok(Envelope::NotObject)
    }
    fn visit_str<E>(self, _: &str) -> Result<Envelope, E> {
        Ok(Envelope::NotObject)
    }
    fn visit_unit<E>(self) -> Result<Envelope, E> {
        Ok(Envelope::NotObject)
    }
}

fn checked_id(id: Option<Value>) -> Result<Option<Value>, BadRequest> {
    match id {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_ID_LEN => Ok(Some(Value::String(s))),
        Some(Value::String(_)) => Err(bad(
            None,
            &format!("\"id\" is longer than {MAX_ID_LEN} bytes"),
        )),
        Some(Value::Number(n)) => Ok(Some(Value::Number(n))),
        Some(_) => Err(bad(None, "\"id\" must be a string or a number")),
    }
}

fn bad(id: Option<Value>, message: &str) -> BadRequest {
    BadRequest {
        id,
        message: message.to_owned(),
    }
}

/// The `error` object of an error frame.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// Which case of the code it is, where a code has several
    /// (`resume_failed`: `unknown_session`, `expired`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One JSON frame to a client.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutFrame {
    #[serde(rename = "type")]
    pub msg_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Cid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub done: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// Per-connection sequence number, set by the session writer.
    pub seq: u64,
    /// What the frame costs in its connection's outbound queue (see
    /// [`Outbound::cost`]); 0 until first asked.
    #[serde(skip)]
    cost: usize,
}

impl OutFrame {
    fn new(msg_type: impl Into<String>) -> Self {
        Self {
            msg_type: msg_type.into(),
            id: None,
            correlation_id: None,
            topic: None,
            data: None,
            done: None,
            error: None,
            seq: 0,
            cost: 0,
        }
    }

    /// A (partial or final) reply to a request.
    pub fn reply(
        msg_type: impl Into<String>,
        id: Option<Value>,
        cid: Option<Cid>,
        data: Value,
        done: bool,
    ) -> Self {
        Self {
            id,
            correlation_id: cid,
            data: Some(data),
            done: Some(done),
            ..Self::new(msg_type)
        }
    }

    /// A terminal error frame.
    pub fn error(
        id: Option<Value>,
        cid: Option<Cid>,
        code: &str,
        message: impl Into<String>,
        retry_after_ms: Option<u64>,
    ) -> Self {
        Self {
            id,
            correlation_id: cid,
            done: Some(true),
            error: Some(ErrorBody {
                code: code.to_owned(),
                message: message.into(),
                retry_after_ms,
                reason: None,
            }),
            ..Self::new("error")
        }
    }

    /// `resume_failed` with its `reason` (README, "Resume").
    pub fn resume_failed(id: Option<Value>, reason: &str, message: &str) -> Self {
        let mut frame = Self::error(id, None, codes::RESUME_FAILED, message, None);
        if let Some(e) = &mut frame.error {
            e.reason = Some(reason.to_owned());
        }
        frame
    }

    /// The `unknown_type` error for a message of `msg_type` on `route`,
    /// naming what the route accepts (`accepted`, in order), so a client
    /// learns the route's types from the error itself.
    pub fn unknown_type<'a>(
        id: Option<Value>,
        route: &str,
        msg_type: &str,
        accepted: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let mut list = String::new();
        for t in accepted {
            list.push_str(if list.is_empty() { "`" } else { ", `" });
            list.push_str(t);
            list.push('`');
        }
        let accepts = if list.is_empty() {
            "no message types".to_owned()
        } else {
            list
        };
        Self::error(
            id,
            None,
            codes::UNKNOWN_TYPE,
            format!("{route} does not handle messages of type `{msg_type}`; it accepts {accepts}"),
            None,
        )
    }

    /// A `push` from a worker as the client sees it. A push of type `error`
    /// whose data is `{"code": <error code>, "message": <text>}` is how a
    /// worker answers a message that has no request id (PROTOCOL.md §5,
    /// `push`): the client gets an error frame without `id`, the same shape
    /// as the router's own. The code, when the frame is one, is returned
    /// for the log.
    pub fn from_worker_push(msg_type: String, data: Value) -> (Self, Option<String>) {
        if msg_type == "error" {
            if let (Some(code), Some(message)) = (
                data.get("code").and_then(Value::as_str),
                data.get("message").and_then(Value::as_str),
            ) {
                // The same rule as for a worker's `error` (PROTOCOL.md §12).
                let code = if codes::is_valid_code(code) {
                    code
                } else {
                    codes::WORKER_ERROR
                };
                let frame = Self::error(None, None, code, message, None);
                return (frame, Some(code.to_owned()));
            }
        }
        (Self::push(msg_type, None, data), None)
    }

    /// An unsolicited message (worker push or topic publication).
    pub fn push(msg_type: impl Into<String>, topic: Option<String>, data: Value) -> Self {
        Self {
            topic,
            data: Some(data),
            ..Self::new(msg_type)
        }
    }

    /// Serializes the frame with its sequence number, into a buffer sized
    /// from [`Self::estimate`] (so that it does not grow on the way).
    pub fn to_json(&mut self, seq: u64) -> String {
        self.seq = seq;
        let estimate = if self.cost != 0 {
            self.cost
        } else {
            self.estimate()
        };
        let mut out = Vec::with_capacity(estimate + 64);
        // Invariant: the frame holds only strings, numbers, booleans and JSON
        // values, which serde_json always serializes (as UTF-8).
        serde_json::to_writer(&mut out, self).expect("client frames are always serializable");
        String::from_utf8(out).expect("serde_json writes UTF-8")
    }

    /// Roughly the frame's bytes as JSON (see [`json_size_hint`]).
    fn estimate(&self) -> usize {
        64 + self.msg_type.len()
            + self.id.as_ref().map_or(0, json_size_hint)
            + self.correlation_id.map_or(0, |c| c.as_str().len())
            + self.topic.as_ref().map_or(0, String::len)
            + self.data.as_ref().map_or(0, json_size_hint)
            + self
                .error
                .as_ref()
                .map_or(0, |e| e.code.len() + e.message.len() + 32)
    }
}

/// Roughly the bytes of `v` as JSON, without serializing it: exact for
/// strings without escapes, literals and integers; a fixed 24 for floats.
/// What the outbound queue charges a frame; the same value is given back
/// when the frame leaves the queue, so the estimate cannot drift.
pub fn json_size_hint(v: &Value) -> usize {
    match v {
        Value::Null | Value::Bool(true) => 4,
        Value::Bool(false) => 5,
        Value::Number(n) if n.is_f64() => 24,
        Value::Number(n) => n
            .as_i64()
            .map_or(20, |i| i.unsigned_abs().max(1).ilog10() as usize + 2),
        Value::String(s) => s.len() + 2,
        Value::Array(a) => 2 + a.iter().map(|x| json_size_hint(x) + 1).sum::<usize>(),
        Value::Object(o) => {
            2 + o
                .iter()
                .map(|(k, x)| k.len() + 4 + json_size_hint(x))
                .sum::<usize>()
        }
    }
}

/// What a session sends to its client; queued on the connection's bounded
/// outbound channel by the session itself, the bridge and publications.
#[derive(Debug, Clone)]
pub enum Outbound {
    Frame(Box<OutFrame>),
    /// A publication's frame, serialized once for all its subscribers.
    Shared(Arc<SharedFrame>),
    Binary(Bytes),
    /// A frame of a raw route, passed unchanged.
    Raw {
        binary: bool,
        payload: Bytes,
    },
}

impl Outbound {
    /// Bytes this item counts for in the outbound queue's byte bound:
    /// payload bytes, or an estimate of the frame's JSON (computed once and
    /// kept with the frame, so a publication cloned to many subscribers and
    /// the dequeue see the same number).
    pub fn cost(&mut self) -> usize {
        match self {
            Outbound::Frame(f) => {
                if f.cost == 0 {
                    f.cost = f.estimate();
                }
                f.cost
            }
            Outbound::Shared(f) => f.cost,
            Outbound::Binary(b) => b.len(),
            Outbound::Raw { payload, .. } => payload.len(),
        }
    }
}

/// A frame that many connections send alike (a publication): its JSON up
/// to the `seq` that each connection gives it, serialized once. The text a
/// connection sends is exactly what [`OutFrame::to_json`] makes of the
/// frame: `seq` is its last field.
#[derive(Debug)]
pub struct SharedFrame {
    pub msg_type: String,
    /// The frame's JSON without its `,"seq":N}` end.
    head: String,
    /// What the frame counts for in an outbound queue ([`Outbound::cost`]).
    cost: usize,
}

impl SharedFrame {
    /// The shared form of `frame`, or `frame` back if its JSON does not end
    /// with its `seq` (it always does: `seq` is the last field and always
    /// written; the check keeps a later field from being cut off).
    pub fn new(mut frame: Box<OutFrame>) -> Result<Self, Box<OutFrame>> {
        const END: &str = ",\"seq\":0}";
        let cost = frame.estimate();
        frame.cost = cost;
        let mut head = frame.to_json(0);
        let Some(len) = head.strip_suffix(END).map(str::len) else {
            return Err(frame);
        };
        head.truncate(len);
        Ok(Self {
            msg_type: std::mem::take(&mut frame.msg_type),
            head,
            cost,
        })
    }

    /// The frame's text with `seq`.
    pub fn to_json(&self, seq: u64) -> String {
        let mut text = String::with_capacity(self.head.len() + 28);
        text.push_str(&self.head);
        // Writing to a String cannot fail.
        let _ = write!(text, ",\"seq\":{seq}}}");
        text
    }
}

impl Outbound {
    /// One frame for many connections (a publication): shared, serialized
    /// once ([`SharedFrame`]).
    pub fn shared(frame: OutFrame) -> Self {
        match SharedFrame::new(Box::new(frame)) {
            Ok(shared) => Outbound::Shared(Arc::new(shared)),
            Err(frame) => Outbound::Frame(frame),
        }
    }
}

impl From<OutFrame> for Outbound {
    fn from(f: OutFrame) -> Self {
        Outbound::Frame(Box::new(f))
    }
}

/// Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parse_table() {
        let ok = parse(r#"{"type":"echo","id":"1","data":{"a":1}}"#).unwrap();
        assert_eq!(ok.msg_type, "echo");
        assert_eq!(ok.id, Some(json!("1")));
        assert_eq!(ok.data, json!({"a":1}));
        let ff = parse(r#"{"type":"note"}"#).unwrap();
        assert_eq!((ff.id, ff.data), (None, Value::Null));
        assert_eq!(parse(r#"{"type":"x","id":7}"#).unwrap().id, Some(json!(7)));

        for (input, want_id, fragment) in [
            ("not json", None, "malformed JSON"),
            ("[1,2]", None, "JSON object"),
            (r#"{"id":"9"}"#, Some(json!("9")), "missing \"type\""),
            (
                r#"{"type":5,"id":"9"}"#,
                Some(json!("9")),
                "must be a string",
            ),
            (r#"{"type":""}"#, None, "must not be empty"),
            (r#"{"type":"x","id":{}}"#, None, "\"id\" must be"),
        ] {
            let err = parse(input).unwrap_err();
            assert_eq!(err.id, want_id, "{input}");
            assert!(err.message.contains(fragment), "{input}: {}", err.message);
        }
        let long = format!(r#"{{"type":"{}"}}"#, "t".repeat(MAX_TYPE_LEN + 1));
        assert!(parse(&long).is_err());
    }

    #[test]
    fn the_envelope_is_read_as_a_map_would_read_it() {
        // Every top-level shape that is not an object gets the same answer.
        for input in [
            "7",
            "-1",
            "1.5",
            "true",
            "null",
            r#""s""#,
            "[]",
            r#"[{"type":"x"}]"#,
        ] {
            let err = parse(input).unwrap_err();
            assert!(
                err.message.contains("JSON object"),
                "{input}: {}",
                err.message
            );
        }
        // A repeated field counts once, the last; other fields are skipped.
        let m = parse(
            r#"{"type":"a","x":[1,{"y":2}],"id":1,"type":"b","data":1,"data":{"k":[2]},"id":"z"}"#,
        )
        .unwrap();
        assert_eq!(
            (m.msg_type.as_str(), m.id, m.data),
            ("b", Some(json!("z")), json!({"k":[2]}))
        );
        // Escaped keys are the same keys.
        let m = parse(r#"{"\u0074ype":"e","d\u0061ta":[1]}"#).unwrap();
        assert_eq!((m.msg_type.as_str(), m.data), ("e", json!([1])));
        // Data is read exactly as before: every number bit-exact.
        let text = r#"{"type":"n","data":[0.1,1e308,-0.0,5e-324,18446744073709551615,-9223372036854775808,2.2250738585072014e-308]}"#;
        let want: Value = serde_json::from_str::<Value>(text).unwrap()["data"].clone();
        assert_eq!(parse(text).unwrap().data, want);
        // Garbage after the object is still malformed JSON.
        assert!(parse(r#"{"type":"x"} {"#)
            .unwrap_err()
            .message
            .contains("malformed JSON"));
    }

    #[test]
    fn an_error_push_from_a_worker_becomes_an_error_frame_without_id() {
        let cases = [
            // (msg_type, data, expected code: Some = error frame)
            (
                "error",
                json!({"code": "unknown_type", "message": "m"}),
                Some("unknown_type"),
            ),
            (
                "error",
                json!({"code": "Not A Code", "message": "m"}),
                Some("worker_error"),
            ),
            ("error", json!({"code": "x"}), None),
            ("error", json!("just text"), None),
            ("news", json!({"code": "x", "message": "m"}), None),
        ];
        for (msg_type, data, want) in cases {
            let (mut frame, code) = OutFrame::from_worker_push(msg_type.into(), data.clone());
            assert_eq!(code.as_deref(), want, "{msg_type} {data}");
            let v: Value = serde_json::from_str(&frame.to_json(3)).unwrap();
            match want {
                Some(code) => assert_eq!(
                    v,
                    json!({"type":"error","done":true,"seq":3,"error":{"code":code,"message":"m"}})
                ),
                None => assert_eq!(v, json!({"type":msg_type,"data":data,"seq":3})),
            }
        }
    }

    /// A publication serialized once for all its subscribers reads, with
    /// each `seq`, exactly as the frame serialized for one would: numbers,
    /// escapes and nesting included.
    #[test]
    fn a_shared_frame_is_the_frame_byte_for_byte() {
        let data: Value = serde_json::from_str(
            r#"{"f":0.1,"e":1e300,"i":-9007199254740993,"u":18446744073709551615,"s":"a\"b\u00e9\n","n":[null,true,{"x":[]}]}"#,
        )
        .unwrap();
        for seq in [1, 9, 10, 12345, u64::MAX] {
            let mut own = OutFrame::push("news", Some("room:1".into()), data.clone());
            let shared = SharedFrame::new(Box::new(OutFrame::push(
                "news",
                Some("room:1".into()),
                data.clone(),
            )))
            .unwrap();
            assert_eq!(shared.to_json(seq), own.to_json(seq));
        }
        let mut frame = Outbound::from(OutFrame::push("news", Some("room:1".into()), data.clone()));
        let mut shared = Outbound::shared(OutFrame::push("news", Some("room:1".into()), data));
        assert!(matches!(shared, Outbound::Shared(_)));
        assert_eq!(shared.cost(), frame.cost(), "the queue charges both alike");
    }

    #[test]
    fn frames_serialize_to_the_documented_shape() {
        let cid = Cid::parse("01ARZ3NDEKTSV4RRFFQ69G5FAV").unwrap();
        let mut reply = OutFrame::reply("echo", Some(json!("1")), Some(cid), json!({"x":1}), true);
        let v: Value = serde_json::from_str(&reply.to_json(4)).unwrap();
        assert_eq!(
            v,
            json!({"type":"echo","id":"1","correlation_id":"01ARZ3NDEKTSV4RRFFQ69G5FAV","data":{"x":1},"done":true,"seq":4})
        );
        let mut err = OutFrame::error(None, None, "bad_request", "nope", Some(10));
        let v: Value = serde_json::from_str(&err.to_json(0)).unwrap();
        assert_eq!(
            v,
            json!({"type":"error","done":true,"seq":0,
                   "error":{"code":"bad_request","message":"nope","retry_after_ms":10}})
        );
        let mut unknown = OutFrame::unknown_type(None, "/ws/x", "nope", ["a", "b"]);
        let v: Value = serde_json::from_str(&unknown.to_json(1)).unwrap();
        assert_eq!(
            v,
            json!({"type":"error","done":true,"seq":1,"error":{"code":"unknown_type",
                   "message":"/ws/x does not handle messages of type `nope`; it accepts `a`, `b`"}})
        );
        let none = OutFrame::unknown_type(Some(json!(1)), "/r", "t", []);
        assert_eq!(
            none.error.map(|e| e.message).as_deref(),
            Some("/r does not handle messages of type `t`; it accepts no message types")
        );
        let mut push = OutFrame::push("news", Some("room:1".into()), json!(null));
        let v: Value = serde_json::from_str(&push.to_json(2)).unwrap();
        assert_eq!(
            v,
            json!({"type":"news","topic":"room:1","data":null,"seq":2})
        );
    }
}
