//! What a connection sends and how replies are matched to it.
//!
//! Messages are `{"type":"echo","id":N,"data":"xxx…"}` in both protocols, so
//! the router and the baseline move the same bytes. Raw echo answers in order
//! with the same frame; the router's JSON protocol answers by `id` (a worker
//! may answer out of order), the last frame of a reply with `done: true`.

use std::collections::{BTreeMap, VecDeque};

use serde_json::Value;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::Protocol;

pub fn request_text(id: u64, data: &str) -> String {
    format!(r#"{{"type":"echo","id":{id},"data":"{data}"}}"#)
}

/// When a request was meant to go out (open loop: its slot in the
/// schedule) and when its write started; equal in closed loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub intended: Instant,
    pub sent: Instant,
}

impl Stamp {
    pub fn at(t: Instant) -> Self {
        Self {
            intended: t,
            sent: t,
        }
    }
}

/// Requests sent and not yet answered: in order for raw echo, by id for JSON.
/// Ids rise in send order on a connection, so the first entry of either is
/// the oldest request (the one a reply timeout hits first).
#[derive(Debug)]
pub enum Pending {
    Fifo(VecDeque<(Stamp, usize)>),
    ById(BTreeMap<u64, Stamp>),
}

/// The outcome of matching one received frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Matched {
    /// A request completed: when it was (meant to be) sent, and whether it failed.
    Done(Stamp, Option<String>),
    /// Not a terminal frame (a partial reply, a push, a ping): nothing to do.
    Ignore,
    /// Something that should never arrive.
    Unexpected(String),
}

impl Pending {
    pub fn new(protocol: Protocol) -> Self {
        match protocol {
            Protocol::Raw => Pending::Fifo(VecDeque::new()),
            Protocol::Json => Pending::ById(BTreeMap::new()),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Pending::Fifo(q) => q.len(),
            Pending::ById(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every request (their connection failed).
    pub fn clear(&mut self) {
        match self {
            Pending::Fifo(q) => q.clear(),
            Pending::ById(m) => m.clear(),
        }
    }

    /// The oldest request still waiting for its reply.
    pub fn oldest(&self) -> Option<Stamp> {
        match self {
            Pending::Fifo(q) => q.front().map(|(at, _)| *at),
            Pending::ById(m) => m.first_key_value().map(|(_, at)| *at),
        }
    }

    /// Records request `id` (of `len` bytes on the wire). Call before the
    /// write, so a reply can never arrive for a request not yet recorded.
    pub fn push(&mut self, id: u64, at: Stamp, len: usize) {
        match self {
            Pending::Fifo(q) => q.push_back((at, len)),
            Pending::ById(m) => {
                m.insert(id, at);
            }
        }
    }

    pub fn complete(&mut self, msg: Message) -> Matched {
        match (self, msg) {
            (Pending::Fifo(q), Message::Text(t)) => match q.pop_front() {
                Some((at, len)) if len == t.len() => Matched::Done(at, None),
                Some((at, len)) => Matched::Done(
                    at,
                    Some(format!("echo of {len} bytes came back as {}", t.len())),
                ),
                None => Matched::Unexpected("a frame with nothing in flight".into()),
            },
            (Pending::ById(m), Message::Text(t)) => {
                let v: Value = match serde_json::from_str(t.as_str()) {
                    Ok(v) => v,
                    Err(e) => return Matched::Unexpected(format!("reply is not JSON: {e}")),
                };
                let Some(id) = v["id"].as_u64() else {
                    return Matched::Unexpected(format!(
                        "frame without a numeric id: type {}",
                        v["type"]
                    ));
                };
                if v["done"] != true {
                    return Matched::Ignore;
                }
                let Some(at) = m.remove(&id) else {
                    return Matched::Unexpected(format!("reply to unknown id {id}"));
                };
                let failed = (v["type"] == "error").then(|| format!("error reply: {}", v["error"]));
                Matched::Done(at, failed)
            }
            (_, Message::Ping(_) | Message::Pong(_)) => Matched::Ignore,
            (_, Message::Close(f)) => Matched::Unexpected(format!("server closed: {f:?}")),
            (_, other) => Matched::Unexpected(format!("unexpected frame: {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn json_replies_match_by_id_and_errors_count() {
        let mut p = Pending::new(Protocol::Json);
        let t = Instant::now();
        p.push(1, Stamp::at(t), 0);
        p.push(2, Stamp::at(t), 0);
        let partial = Message::Text(r#"{"type":"echo","id":2,"done":false}"#.into());
        assert_eq!(p.complete(partial), Matched::Ignore);
        let err = Message::Text(r#"{"type":"error","id":2,"done":true,"error":{}}"#.into());
        assert!(matches!(p.complete(err), Matched::Done(_, Some(_))));
        let ok = Message::Text(r#"{"type":"echo","id":1,"done":true}"#.into());
        assert_eq!(p.complete(ok), Matched::Done(Stamp::at(t), None));
        let stray = Message::Text(r#"{"type":"echo","id":1,"done":true}"#.into());
        assert!(matches!(p.complete(stray), Matched::Unexpected(_)));
    }

    #[test]
    fn raw_echo_matches_in_order_by_length() {
        let mut p = Pending::new(Protocol::Raw);
        let t = Instant::now();
        let a = request_text(7, "xx");
        p.push(7, Stamp::at(t), a.len());
        p.push(8, Stamp::at(t + Duration::from_millis(1)), a.len());
        assert_eq!(
            p.complete(Message::Text(a.into())),
            Matched::Done(Stamp::at(t), None)
        );
        assert!(matches!(
            p.complete(Message::Text("short".into())),
            Matched::Done(_, Some(_))
        ));
        assert!(matches!(
            p.complete(Message::Text("none left".into())),
            Matched::Unexpected(_)
        ));
    }

    #[test]
    fn the_oldest_request_is_the_first_sent() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        for protocol in [Protocol::Raw, Protocol::Json] {
            let mut p = Pending::new(protocol);
            assert_eq!(p.oldest(), None);
            p.push(3, Stamp::at(ms(3)), 10);
            p.push(4, Stamp::at(ms(4)), 10);
            assert_eq!(p.oldest(), Some(Stamp::at(ms(3))), "{protocol:?}");
            let reply = match protocol {
                Protocol::Raw => "x".repeat(10),
                Protocol::Json => r#"{"id":3,"done":true}"#.to_owned(),
            };
            assert!(matches!(
                p.complete(Message::Text(reply.into())),
                Matched::Done(_, None)
            ));
            assert_eq!(p.oldest(), Some(Stamp::at(ms(4))), "{protocol:?}");
        }
    }
}
