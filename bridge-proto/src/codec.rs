//! MessagePack encoding and decoding of bridge messages.
//!
//! A message is one MessagePack map: `v` (the protocol version), `kind` (the
//! message name in snake_case), then the fields of that kind in the order of
//! the structs in [`crate::messages`]. Decoding reads `v` and `kind` first, so
//! a peer speaking another version gets a version error rather than a
//! confusing field error, and then decodes the body of that kind.

use std::borrow::Cow;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{error::DecodeError, messages::*, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// An empty body, for messages with no fields.
#[derive(Serialize, Deserialize)]
struct Empty {}

#[derive(Deserialize)]
struct Header {
    v: u64,
    kind: String,
}

/// Room for the message's own map header, `v` and `kind`, before the body.
const PREFIX_MAX: usize = 5 + 2 + 9 + 5;

/// The message: the body's map with `v` and `kind` in front. The body is
/// encoded once, after room left for the prefix; the prefix then takes the
/// place of the body's map header, one entry larger. (A flattened struct
/// would make rmp-serde buffer the whole message as a map of unknown
/// length and copy it.)
fn encode<B: Serialize>(v: u8, kind: &str, body: &B) -> Vec<u8> {
    let room = PREFIX_MAX + kind.len();
    // Room for a small body too, so encoding one does not grow the buffer
    // (a copy each time) as it goes.
    let mut out = Vec::with_capacity(room + SMALL_BODY);
    out.resize(room, 0);
    // Invariant: every message type is a struct of maps, strings, numbers,
    // booleans, byte strings and JSON values with string keys, all of which
    // rmp-serde can encode into a Vec (which cannot fail to grow).
    body.serialize(&mut rmp_serde::Serializer::new(&mut out).with_struct_map())
        .expect("bridge messages are always encodable");
    let (entries, header) = map_len(&out[room..]).expect("a struct body is encoded as a map");
    let mut prefix = [0u8; PREFIX_MAX + MAX_KIND_LEN];
    let prefix_len = {
        let mut w = &mut prefix[..];
        let free = w.len();
        // Invariant: every kind is at most MAX_KIND_LEN bytes, so the
        // prefix fits its buffer and these writes cannot fail.
        const FITS: &str = "a message's prefix fits its buffer";
        rmp::encode::write_map_len(&mut w, entries + 2).expect(FITS);
        rmp::encode::write_str(&mut w, "v").expect(FITS);
        rmp::encode::write_uint(&mut w, u64::from(v)).expect(FITS);
        rmp::encode::write_str(&mut w, "kind").expect(FITS);
        rmp::encode::write_str(&mut w, kind).expect(FITS);
        free - w.len()
    };
    let start = room + header - prefix_len;
    out[start..room + header].copy_from_slice(&prefix[..prefix_len]);
    out.drain(..start);
    out
}

/// Longest `kind` of any message (`push_binary`, `unsubscribe`, ...).
const MAX_KIND_LEN: usize = 16;

/// Bytes reserved for a message body before encoding it: a small reply or
/// request (an id, a correlation id, a short payload) fits without growing.
const SMALL_BODY: usize = 384;

/// The entry count and header length of a MessagePack map at the start of `b`.
fn map_len(b: &[u8]) -> Option<(u32, usize)> {
    match *b.first()? {
        m @ 0x80..=0x8f => Some((u32::from(m & 0x0f), 1)),
        0xde => Some((u32::from(u16::from_be_bytes([*b.get(1)?, *b.get(2)?])), 3)),
        0xdf => Some((
            u32::from_be_bytes([*b.get(1)?, *b.get(2)?, *b.get(3)?, *b.get(4)?]),
            5,
        )),
        _ => None,
    }
}

/// Deepest nesting a decoder accepts (maps and arrays inside `data`). The
/// default of rmp-serde (1024) overflows a 2 MiB task stack before it is
/// reached; 128 matches what serde_json allows for client JSON.
pub const MAX_DEPTH: usize = 128;

fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    // +1: the message map itself is one level.
    de.set_max_depth(MAX_DEPTH + 1);
    T::deserialize(&mut de)
}

/// Reads only `v` and `kind` of a message (any other field is skipped, not
/// built), so a receiver can decide whether to decode the body at all.
pub fn decode_header(bytes: &[u8]) -> Result<(u8, String), DecodeError> {
    header(bytes).map(|(v, kind)| (v, kind.into_owned()))
}

/// `v` and `kind` when they are the map's first two entries, as every
/// encoder of this crate writes them: read in place, without walking the
/// rest of the message. `None`: anything else (the full decode decides).
fn quick_header(bytes: &[u8]) -> Option<(u64, &str)> {
    let (_, header) = map_len(bytes)?;
    let mut rd = bytes.get(header..)?;
    fn text<'a>(rd: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = rmp::decode::read_str_len(rd).ok()? as usize;
        let (s, rest) = (rd.get(..len)?, rd.get(len..)?);
        *rd = rest;
        Some(s)
    }
    if text(&mut rd)? != b"v" {
        return None;
    }
    let v: u64 = rmp::decode::read_int(&mut rd).ok()?;
    if text(&mut rd)? != b"kind" {
        return None;
    }
    std::str::from_utf8(text(&mut rd)?)
        .ok()
        .map(|kind| (v, kind))
}

/// Reads `v` and `kind`; `v` must be a version this crate speaks.
fn header(bytes: &[u8]) -> Result<(u8, Cow<'_, str>), DecodeError> {
    let (found, kind) = match quick_header(bytes) {
        Some((v, kind)) => (v, Cow::Borrowed(kind)),
        None => {
            let h: Header = from_slice(bytes).map_err(|e| DecodeError::Header(e.to_string()))?;
            (h.v, Cow::Owned(h.kind))
        }
    };
    match u8::try_from(found) {
        Ok(v) if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&v) => Ok((v, kind)),
        _ => Err(DecodeError::Version {
            found,
            supported: PROTOCOL_VERSION,
        }),
    }
}

fn body<B: DeserializeOwned>(kind: &str, bytes: &[u8]) -> Result<B, DecodeError> {
    from_slice(bytes).map_err(|e| match from_slice::<Header>(bytes) {
        // The quick header read stops after `kind`: a message broken past
        // it (truncated, say) is a header error all the same, as the full
        // read would have said.
        Err(h) => DecodeError::Header(h.to_string()),
        Ok(_) => DecodeError::Body {
            kind: kind.to_owned(),
            detail: e.to_string(),
        },
    })
}

/// Encodes a router → worker message in the current version.
pub fn encode_to_worker(msg: &ToWorker) -> Vec<u8> {
    encode_to_worker_as(PROTOCOL_VERSION, msg)
}

/// Encodes a router → worker message with `v` = `version` (the router
/// answers each worker in the version of its `hello`).
pub fn encode_to_worker_as(version: u8, msg: &ToWorker) -> Vec<u8> {
    let kind = msg.kind();
    match msg {
        ToWorker::Welcome(b) => encode(version, kind, b),
        ToWorker::Challenge(b) => encode(version, kind, b),
        ToWorker::Goodbye(b) => encode(version, kind, b),
        ToWorker::Heartbeat => encode(version, kind, &Empty {}),
        ToWorker::Request(b) => encode(version, kind, b),
        ToWorker::Event(b) => encode(version, kind, b),
        ToWorker::Binary(b) => encode(version, kind, b),
        ToWorker::Raw(b) => encode(version, kind, b),
        ToWorker::Connect(b) => encode(version, kind, b),
        ToWorker::Disconnect(b) => encode(version, kind, b),
        ToWorker::Cancel(b) => encode(version, kind, b),
    }
}

/// Encodes a `request` with `v` = `version`, from borrowed fields: the
/// same bytes as [`encode_to_worker_as`] of the owned request.
pub fn encode_request_as(version: u8, request: &RequestRef<'_>) -> Vec<u8> {
    encode(version, "request", request)
}

/// Decodes a router → worker message of any supported version.
pub fn decode_to_worker(bytes: &[u8]) -> Result<ToWorker, DecodeError> {
    decode_to_worker_versioned(bytes).map(|(_, m)| m)
}

/// Decodes a router → worker message and tells its version.
pub fn decode_to_worker_versioned(bytes: &[u8]) -> Result<(u8, ToWorker), DecodeError> {
    let (v, kind) = header(bytes)?;
    let k = &*kind;
    Ok((
        v,
        match k {
            "welcome" => ToWorker::Welcome(body(k, bytes)?),
            "challenge" => ToWorker::Challenge(body(k, bytes)?),
            "goodbye" => ToWorker::Goodbye(body(k, bytes)?),
            "heartbeat" => ToWorker::Heartbeat,
            "request" => ToWorker::Request(body(k, bytes)?),
            "event" => ToWorker::Event(body(k, bytes)?),
            "binary" => ToWorker::Binary(body(k, bytes)?),
            "raw" => ToWorker::Raw(body(k, bytes)?),
            "connect" => ToWorker::Connect(body(k, bytes)?),
            "disconnect" => ToWorker::Disconnect(body(k, bytes)?),
            "cancel" => ToWorker::Cancel(body(k, bytes)?),
            _ => {
                return Err(DecodeError::UnknownKind {
                    kind: kind.into_owned(),
                })
            }
        },
    ))
}

/// Encodes a worker → router message in the current version.
pub fn encode_from_worker(msg: &FromWorker) -> Vec<u8> {
    encode_from_worker_as(PROTOCOL_VERSION, msg)
}

/// Encodes a worker → router message with `v` = `version`.
pub fn encode_from_worker_as(version: u8, msg: &FromWorker) -> Vec<u8> {
    let kind = msg.kind();
    match msg {
        FromWorker::Hello(b) => encode(version, kind, b),
        FromWorker::Auth(b) => encode(version, kind, b),
        FromWorker::Heartbeat => encode(version, kind, &Empty {}),
        FromWorker::Reply(b) => encode(version, kind, b),
        FromWorker::Error(b) => encode(version, kind, b),
        FromWorker::Push(b) => encode(version, kind, b),
        FromWorker::PushBinary(b) => encode(version, kind, b),
        FromWorker::Raw(b) => encode(version, kind, b),
        FromWorker::Close(b) => encode(version, kind, b),
        FromWorker::Subscribe(b) => encode(version, kind, b),
        FromWorker::Unsubscribe(b) => encode(version, kind, b),
        FromWorker::Publish(b) => encode(version, kind, b),
        FromWorker::Bye(b) => encode(version, kind, b),
    }
}

/// Decodes a worker → router message of any supported version.
pub fn decode_from_worker(bytes: &[u8]) -> Result<FromWorker, DecodeError> {
    decode_from_worker_versioned(bytes).map(|(_, m)| m)
}

/// Decodes a worker → router message and tells its version.
pub fn decode_from_worker_versioned(bytes: &[u8]) -> Result<(u8, FromWorker), DecodeError> {
    let (v, kind) = header(bytes)?;
    let k = &*kind;
    Ok((
        v,
        match k {
            "hello" => FromWorker::Hello(body(k, bytes)?),
            "auth" => FromWorker::Auth(body(k, bytes)?),
            "heartbeat" => FromWorker::Heartbeat,
            "reply" => FromWorker::Reply(body(k, bytes)?),
            "error" => FromWorker::Error(body(k, bytes)?),
            "push" => FromWorker::Push(body(k, bytes)?),
            "push_binary" => FromWorker::PushBinary(body(k, bytes)?),
            "raw" => FromWorker::Raw(body(k, bytes)?),
            "close" => FromWorker::Close(body(k, bytes)?),
            "subscribe" => FromWorker::Subscribe(body(k, bytes)?),
            "unsubscribe" => FromWorker::Unsubscribe(body(k, bytes)?),
            "publish" => FromWorker::Publish(body(k, bytes)?),
            "bye" => FromWorker::Bye(body(k, bytes)?),
            _ => {
                return Err(DecodeError::UnknownKind {
                    kind: kind.into_owned(),
                })
            }
        },
    ))
}

/// Encodes the payload frame of a publication (the topic is the frame before it).
pub fn encode_publication(p: &Publication) -> Vec<u8> {
    encode(PROTOCOL_VERSION, "publication", p)
}

/// Decodes the payload frame of a publication.
pub fn decode_publication(bytes: &[u8]) -> Result<Publication, DecodeError> {
    let (_, kind) = header(bytes)?;
    if kind != "publication" {
        return Err(DecodeError::UnknownKind {
            kind: kind.into_owned(),
        });
    }
    body("publication", bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_borrowed_request_encodes_as_the_owned_one() {
        let (id, data, claims) = (
            json!(7),
            json!({"x": [1.5, "é", null]}),
            json!({"sub": "u"}),
        );
        for claims in [None, Some(&claims)] {
            for version in [1, 2] {
                let borrowed = RequestRef {
                    cid: "01J0000000000000000000000A",
                    conn: "01J0000000000000000000000B",
                    route: "/ws/{room}",
                    service: "chat",
                    msg_type: "say",
                    id: &id,
                    data: &data,
                    timeout_ms: 30_000,
                    deadline_ms: 1_700_000_000_000,
                    attempt: 2,
                    claims,
                };
                let owned = ToWorker::Request(borrowed.to_owned());
                let bytes = encode_request_as(version, &borrowed);
                assert_eq!(bytes, encode_to_worker_as(version, &owned));
                assert_eq!(decode_to_worker(&bytes).unwrap(), owned);
            }
        }
    }

    #[test]
    fn heartbeat_is_a_two_entry_map() {
        let bytes = encode_to_worker(&ToWorker::Heartbeat);
        // fixmap(2) "v" 2 "kind" "heartbeat"
        let mut expected = vec![0x82, 0xa1, b'v', 0x02, 0xa4];
        expected.extend_from_slice(b"kind");
        expected.push(0xa9);
        expected.extend_from_slice(b"heartbeat");
        assert_eq!(bytes, expected);
        assert_eq!(decode_to_worker(&bytes).unwrap(), ToWorker::Heartbeat);
    }

    #[test]
    fn the_quick_header_read_agrees_with_the_full_one() {
        let bytes = encode_to_worker(&ToWorker::Heartbeat);
        assert_eq!(quick_header(&bytes), Some((2, "heartbeat")));
        // Other orders, other keys, other types: left to the full read.
        for v in [
            json!({"kind": "heartbeat", "v": 2}),
            json!({"vv": 2, "kind": "heartbeat"}),
            json!({"v": 2, "kindx": "heartbeat"}),
            json!({"v": "2", "kind": "heartbeat"}),
            json!({"v": 2, "kind": 7}),
        ] {
            let bytes = rmp_serde::to_vec_named(&v).unwrap();
            assert_eq!(quick_header(&bytes), None, "{v}");
        }
        let reordered = rmp_serde::to_vec_named(&json!({"kind": "heartbeat", "v": 2})).unwrap();
        assert_eq!(decode_to_worker(&reordered).unwrap(), ToWorker::Heartbeat);
        for cut in 0..bytes.len() {
            assert!(decode_to_worker(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn wrong_version_is_named() {
        for v in [0, 3, 256] {
            let bytes = rmp_serde::to_vec_named(&json!({"v": v, "kind": "heartbeat"})).unwrap();
            let err = decode_from_worker(&bytes).unwrap_err();
            assert!(
                matches!(err, DecodeError::Version { found, .. } if found == v),
                "{err}"
            );
        }
    }

    #[test]
    fn both_versions_decode_and_tell_which() {
        for v in [1, 2] {
            let bytes = encode_from_worker_as(v, &FromWorker::Heartbeat);
            assert_eq!(
                decode_from_worker_versioned(&bytes).unwrap(),
                (v, FromWorker::Heartbeat)
            );
            let bytes = encode_to_worker_as(v, &ToWorker::Heartbeat);
            assert_eq!(
                decode_to_worker_versioned(&bytes).unwrap(),
                (v, ToWorker::Heartbeat)
            );
        }
    }

    #[test]
    fn unknown_kind_and_bad_field_are_named() {
        let bytes = rmp_serde::to_vec_named(&json!({"v": 1, "kind": "nope"})).unwrap();
        assert!(matches!(
            decode_from_worker(&bytes),
            Err(DecodeError::UnknownKind { .. })
        ));
        let bytes = rmp_serde::to_vec_named(&json!({"v": 1, "kind": "reply", "cid": 5})).unwrap();
        let err = decode_from_worker(&bytes).unwrap_err().to_string();
        assert!(err.contains("reply"), "{err}");
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let bytes = rmp_serde::to_vec_named(&json!({
            "v": 1, "kind": "bye", "reason": "stop", "future_field": [1, 2]
        }))
        .unwrap();
        assert_eq!(
            decode_from_worker(&bytes).unwrap(),
            FromWorker::Bye(Bye {
                reason: "stop".into()
            })
        );
    }
}
