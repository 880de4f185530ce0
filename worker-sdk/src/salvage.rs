//! Reading the correlation id out of a request that does not decode.
//!
//! A `request` the codec rejects (a field missing or of the wrong type, `bin`
//! inside `data`, ...) still holds one of the worker's credits at the
//! router. If the frame is a MessagePack map whose `kind` is `request` and
//! whose `cid` is a string, the worker can still answer it with
//! `error{code: "bad_request"}` and give the credit back. This module reads
//! just those two fields, accepting any value of any type everywhere else.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// The `cid` of `frame` if it is a map with `kind: "request"` and a string
/// `cid`; `None` for anything else.
pub(crate) fn request_cid(frame: &[u8]) -> Option<String> {
    let mut de = rmp_serde::Deserializer::from_read_ref(frame);
    // Same nesting bound as the codec: hostile depth must not exhaust the stack.
    de.set_max_depth(bridge_proto::codec::MAX_DEPTH + 1);
    let loose = LooseRequest::deserialize(&mut de).ok()?;
    match (loose.kind, loose.cid) {
        (Some(Loose::Str(kind)), Some(Loose::Str(cid))) if kind == "request" => Some(cid),
        _ => None,
    }
}

/// The `kind` and `cid` of a map; anything else is skipped.
struct LooseRequest {
    kind: Option<Loose>,
    cid: Option<Loose>,
}

impl<'de> Deserialize<'de> for LooseRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(LooseRequestVisitor)
    }
}

struct LooseRequestVisitor;

impl<'de> Visitor<'de> for LooseRequestVisitor {
    type Value = LooseRequest;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LooseRequest, A::Error> {
        let mut request = LooseRequest {
            kind: None,
            cid: None,
        };
        while let Some(key) = map.next_key::<Loose>()? {
            match key {
                Loose::Str(k) if k == "kind" => request.kind = Some(map.next_value()?),
                Loose::Str(k) if k == "cid" => request.cid = Some(map.next_value()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(request)
    }
}

/// Any MessagePack value; only a `str` is kept.
enum Loose {
    Str(String),
    NotStr,
}

impl<'de> Deserialize<'de> for Loose {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LooseVisitor)
    }
}

struct LooseVisitor;

macro_rules! not_str {
    ($($method:ident: $ty:ty),*) => {
        $(fn $method<E: de::Error>(self, _: $ty) -> Result<Loose, E> { Ok(Loose::NotStr) })*
    };
}

impl<'de> Visitor<'de> for LooseVisitor {
    type Value = Loose;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any MessagePack value")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Loose, E> {
        Ok(Loose::Str(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Loose, E> {
        Ok(Loose::Str(v))
    }

    not_str!(
        visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_i128: i128, visit_u128: u128,
        visit_f32: f32, visit_f64: f64, visit_bytes: &[u8], visit_byte_buf: Vec<u8>
    );

    fn visit_none<E: de::Error>(self) -> Result<Loose, E> {
        Ok(Loose::NotStr)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Loose, E> {
        Ok(Loose::NotStr)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Loose, D::Error> {
        IgnoredAny::deserialize(d).map(|_| Loose::NotStr)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Loose, D::Error> {
        // rmp-serde presents an `ext` this way.
        IgnoredAny::deserialize(d).map(|_| Loose::NotStr)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Loose, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Loose::NotStr)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Loose, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Loose::NotStr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mp(value: serde_json::Value) -> Vec<u8> {
        rmp_serde::to_vec_named(&value).unwrap()
    }

    #[test]
    fn finds_the_cid_of_broken_requests_only() {
        // A request missing most of its fields.
        assert_eq!(
            request_cid(&mp(json!({"v": 2, "kind": "request", "cid": "c1"}))).as_deref(),
            Some("c1")
        );
        // Wrong types elsewhere do not matter.
        assert_eq!(
            request_cid(&mp(
                json!({"v": 2, "kind": "request", "cid": "c2", "timeout_ms": "soon", "data": [1, {"a": null}]})
            ))
            .as_deref(),
            Some("c2")
        );
        for bad in [
            json!({"v": 2, "kind": "request", "cid": 5}),
            json!({"v": 2, "kind": "event", "cid": "c"}),
            json!({"v": 2, "cid": "c"}),
            json!({"v": 2, "kind": "request"}),
            json!(["request", "c"]),
            json!("request"),
        ] {
            assert_eq!(request_cid(&mp(bad.clone())), None, "{bad}");
        }
        assert_eq!(request_cid(&[]), None);
        assert_eq!(request_cid(&[0xc1]), None);
    }

    #[test]
    fn bin_and_ext_anywhere_are_tolerated() {
        // fixmap(4): "v" 2, "kind" "request", "cid" "c3", "data" [bin8(2) 01 02, fixext1 type 5 0x00]
        let mut b = vec![0x84, 0xa1, b'v', 0x02, 0xa4];
        b.extend_from_slice(b"kind");
        b.push(0xa7);
        b.extend_from_slice(b"request");
        b.extend_from_slice(&[0xa3, b'c', b'i', b'd', 0xa2, b'c', b'3', 0xa4]);
        b.extend_from_slice(b"data");
        b.extend_from_slice(&[0x92, 0xc4, 0x02, 0x01, 0x02, 0xd4, 0x05, 0x00]);
        assert!(bridge_proto::decode_to_worker(&b).is_err());
        assert_eq!(request_cid(&b).as_deref(), Some("c3"));

        // A bin `cid` is not a string, even when its bytes are UTF-8.
        let mut b = vec![0x83, 0xa1, b'v', 0x02, 0xa4];
        b.extend_from_slice(b"kind");
        b.push(0xa7);
        b.extend_from_slice(b"request");
        b.extend_from_slice(&[0xa3, b'c', b'i', b'd', 0xc4, 0x01, b'x']);
        assert_eq!(request_cid(&b), None);
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        // 100 000 nested arrays inside `data`.
        let mut b = vec![0x84, 0xa1, b'v', 0x02, 0xa4];
        b.extend_from_slice(b"kind");
        b.push(0xa7);
        b.extend_from_slice(b"request");
        b.extend_from_slice(&[0xa3, b'c', b'i', b'd', 0xa1, b'c', 0xa4]);
        b.extend_from_slice(b"data");
        b.extend_from_slice(&[0x91; 100_000]);
        b.push(0xc0);
        // Either answer is fine; not crashing is the point.
        let _ = request_cid(&b);
    }
}
