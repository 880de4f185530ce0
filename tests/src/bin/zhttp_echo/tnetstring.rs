//! TNetStrings (<https://tnetstrings.info>), the encoding of ZHTTP packets:
//! `<length>:<payload><type>`, where the type byte is `,` bytes, `#` integer,
//! `^` float, `!` boolean (`true`/`false`), `~` null (empty payload), `}` a
//! map (alternating keys and values; keys are byte strings), `]` a list.
//!
//! Decoding borrows from the input and never panics: lengths are at most 9
//! digits (the format's own bound) and must fit in what is left, nesting is
//! bounded by [`MAX_DEPTH`], and every error names what was wrong.

use std::fmt;

/// Deepest nesting of maps and lists accepted (ZHTTP needs 3: a packet's
/// headers are a list of lists).
pub const MAX_DEPTH: usize = 32;

/// A decoded value; strings borrow from the input.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Bytes(&'a [u8]),
    Int(i64),
    Float(f64),
    Bool(bool),
    Null,
    List(Vec<Value<'a>>),
    Map(Vec<(&'a [u8], Value<'a>)>),
}

impl<'a> Value<'a> {
    /// The value of `key` in a map (the first, if repeated).
    pub fn get(&self, key: &str) -> Option<&Value<'a>> {
        match self {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| *k == key.as_bytes())
                .map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_bytes(&self) -> Option<&'a [u8]> {
        match self {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}

/// Why input is not a TNetString.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// No `:` within the first 10 bytes, or a length that is not 1 to 9 digits.
    BadLength,
    /// The length runs past the end of the input (or leaves no type byte).
    Truncated,
    /// An unknown type byte.
    BadType(u8),
    /// An integer, float or boolean whose payload does not parse.
    BadScalar(u8),
    /// A null with a payload.
    BadNull,
    /// A map key that is not a byte string, or a key without a value.
    BadMapKey,
    /// Nested deeper than [`MAX_DEPTH`].
    TooDeep,
    /// Bytes after the value (in [`decode_all`]).
    Trailing(usize),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadLength => f.write_str("length prefix is not 1 to 9 digits and ':'"),
            Error::Truncated => f.write_str("length runs past the end of the input"),
            Error::BadType(t) => write!(f, "unknown type byte {t:#04x}"),
            Error::BadScalar(t) => write!(f, "payload of type '{}' does not parse", *t as char),
            Error::BadNull => f.write_str("null with a payload"),
            Error::BadMapKey => f.write_str("map key is not a string, or has no value"),
            Error::TooDeep => write!(f, "nested deeper than {MAX_DEPTH}"),
            Error::Trailing(n) => write!(f, "{n} bytes after the value"),
        }
    }
}

impl std::error::Error for Error {}

/// Decodes one value that must fill `input` exactly.
pub fn decode_all(input: &[u8]) -> Result<Value<'_>, Error> {
    let (v, rest) = decode(input)?;
    if rest.is_empty() {
        Ok(v)
    } else {
        Err(Error::Trailing(rest.len()))
    }
}

/// Decodes the first value of `input`; returns it and what follows it.
pub fn decode(input: &[u8]) -> Result<(Value<'_>, &[u8]), Error> {
    decode_at(input, 0)
}

fn decode_at(input: &[u8], depth: usize) -> Result<(Value<'_>, &[u8]), Error> {
    let colon = input
        .iter()
        .take(10)
        .position(|&b| b == b':')
        .ok_or(Error::BadLength)?;
    let digits = &input[..colon];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(Error::BadLength);
    }
    // At most 9 ASCII digits: always fits in usize.
    let len: usize = std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(Error::BadLength)?;
    let body_at = colon + 1;
    let rest = &input[body_at..];
    if rest.len() <= len {
        return Err(Error::Truncated);
    }
    let (payload, kind, rest) = (&rest[..len], rest[len], &rest[len + 1..]);
    let scalar = |p: &[u8]| std::str::from_utf8(p).ok().map(str::to_owned);
    let value = match kind {
        b',' => Value::Bytes(payload),
        b'#' => Value::Int(
            scalar(payload)
                .and_then(|s| s.parse().ok())
                .ok_or(Error::BadScalar(kind))?,
        ),
        b'^' => Value::Float(
            scalar(payload)
                .and_then(|s| s.parse().ok())
                .ok_or(Error::BadScalar(kind))?,
        ),
        b'!' => match payload {
            b"true" => Value::Bool(true),
            b"false" => Value::Bool(false),
            _ => return Err(Error::BadScalar(kind)),
        },
        b'~' if payload.is_empty() => Value::Null,
        b'~' => return Err(Error::BadNull),
        b']' | b'}' => {
            if depth >= MAX_DEPTH {
                return Err(Error::TooDeep);
            }
            let mut items = Vec::new();
            let mut left = payload;
            while !left.is_empty() {
                let (item, next) = decode_at(left, depth + 1)?;
                items.push(item);
                left = next;
            }
            if kind == b']' {
                Value::List(items)
            } else {
                if items.len() % 2 != 0 {
                    return Err(Error::BadMapKey);
                }
                let mut entries = Vec::with_capacity(items.len() / 2);
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    match k {
                        Value::Bytes(k) => entries.push((k, v)),
                        _ => return Err(Error::BadMapKey),
                    }
                }
                Value::Map(entries)
            }
        }
        other => return Err(Error::BadType(other)),
    };
    Ok((value, rest))
}

/// Appends the encoding of `value` to `out`.
pub fn encode(value: &Value<'_>, out: &mut Vec<u8>) {
    match value {
        Value::Bytes(b) => frame(out, b, b','),
        Value::Int(i) => frame(out, i.to_string().as_bytes(), b'#'),
        Value::Float(x) => frame(out, format!("{x:?}").as_bytes(), b'^'),
        Value::Bool(b) => frame(out, if *b { b"true" } else { b"false" }, b'!'),
        Value::Null => frame(out, b"", b'~'),
        Value::List(items) => {
            let mut body = Vec::new();
            for item in items {
                encode(item, &mut body);
            }
            frame(out, &body, b']');
        }
        Value::Map(entries) => {
            let mut body = Vec::new();
            for (k, v) in entries {
                frame(&mut body, k, b',');
                encode(v, &mut body);
            }
            frame(out, &body, b'}');
        }
    }
}

fn frame(out: &mut Vec<u8>, payload: &[u8], kind: u8) {
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(payload);
    out.push(kind);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: &Value<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        encode(v, &mut out);
        out
    }

    #[test]
    fn values_encode_to_the_known_bytes() {
        let cases: &[(Value<'_>, &[u8])] = &[
            (Value::Bytes(b"hello"), b"5:hello,"),
            (Value::Bytes(b""), b"0:,"),
            (Value::Int(-12), b"3:-12#"),
            (Value::Float(1.5), b"3:1.5^"),
            (Value::Bool(true), b"4:true!"),
            (Value::Null, b"0:~"),
            (
                Value::List(vec![Value::Int(1), Value::Bytes(b"a")]),
                b"8:1:1#1:a,]",
            ),
            (
                Value::Map(vec![(b"id", Value::Bytes(b"x")), (b"seq", Value::Int(0))]),
                b"19:2:id,1:x,3:seq,1:0#}",
            ),
        ];
        for (v, bytes) in cases {
            assert_eq!(enc(v), *bytes, "{v:?}");
            assert_eq!(decode_all(bytes).as_ref(), Ok(v), "{v:?}");
        }
    }

    #[test]
    fn a_zhttp_packet_round_trips() {
        let headers = Value::List(vec![Value::List(vec![
            Value::Bytes(b"Upgrade"),
            Value::Bytes(b"websocket"),
        ])]);
        let packet = Value::Map(vec![
            (b"from", Value::Bytes(b"condure")),
            (b"id", Value::Bytes(b"\x00\xff binary id")),
            (b"seq", Value::Int(3)),
            (b"headers", headers),
            (b"more", Value::Bool(false)),
            (b"nothing", Value::Null),
            (b"body", Value::Bytes(b"1:x, looks like a tnetstring")),
        ]);
        let bytes = enc(&packet);
        let back = decode_all(&bytes).unwrap();
        assert_eq!(back, packet);
        assert_eq!(back.get("seq").and_then(Value::as_int), Some(3));
        assert_eq!(back.get("missing"), None);
        assert_eq!(Value::Int(1).get("seq"), None);
    }

    #[test]
    fn hostile_input_is_refused_without_panicking() {
        let deep = {
            let mut v = b"0:~".to_vec();
            for _ in 0..(MAX_DEPTH + 1) {
                let mut outer = format!("{}:", v.len()).into_bytes();
                outer.extend_from_slice(&v);
                outer.push(b']');
                v = outer;
            }
            v
        };
        let cases: &[(&[u8], Error)] = &[
            (b"", Error::BadLength),
            (b":", Error::BadLength),
            (b"5", Error::BadLength),
            (b"-1:x,", Error::BadLength),
            (b"1234567890:x,", Error::BadLength),
            (b"999999999:x,", Error::Truncated),
            (b"5:abc,", Error::Truncated),
            (b"3:abc", Error::Truncated),
            (b"1:a?", Error::BadType(b'?')),
            (b"2:1x#", Error::BadScalar(b'#')),
            (b"20:99999999999999999999#", Error::BadScalar(b'#')),
            (b"1:\xff#", Error::BadScalar(b'#')),
            (b"3:abc^", Error::BadScalar(b'^')),
            (b"3:yes!", Error::BadScalar(b'!')),
            (b"1:x~", Error::BadNull),
            (b"4:1:1#}", Error::BadMapKey),
            (b"4:1:a,}", Error::BadMapKey),
            (b"6:3:abc]", Error::Truncated),
            (b"0:,x", Error::Trailing(1)),
            (&deep, Error::TooDeep),
        ];
        for (input, want) in cases {
            assert_eq!(
                decode_all(input).as_ref(),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn every_prefix_and_byte_flip_of_a_packet_is_safe() {
        let packet = Value::Map(vec![
            (b"id", Value::Bytes(b"abc")),
            (b"seq", Value::Int(12)),
            (
                b"h",
                Value::List(vec![Value::List(vec![
                    Value::Bytes(b"k"),
                    Value::Float(0.25),
                ])]),
            ),
            (b"b", Value::Bool(true)),
        ]);
        let bytes = enc(&packet);
        for cut in 0..bytes.len() {
            assert!(decode_all(&bytes[..cut]).is_err(), "prefix of {cut} bytes");
        }
        // Any single byte changed to any value: an error or some value,
        // never a panic.
        for at in 0..bytes.len() {
            for b in 0..=255u8 {
                let mut mutated = bytes.clone();
                mutated[at] = b;
                let _ = decode_all(&mutated);
            }
        }
    }
}
