//! `zhttp_echo`: a WebSocket echo handler behind condure (Pushpin's
//! connection manager), for the benchmark target `condure` of
//! `scripts/bench.sh` (BENCHMARKS.md, "condure as a peer").
//!
//! condure terminates the WebSockets and speaks ZHTTP over ZeroMQ to
//! handlers (pushpin's `doc/zmq-http.md`, "advanced arrangement"). Given
//! condure's `--zclient-stream BASE`, this handler connects three sockets:
//! - PULL to `BASE-out`: the first packet of each session (the upgrade
//!   request: `uri`, `headers`, `credits`);
//! - ROUTER to `BASE-out-stream`, with identity `--id`: every later packet
//!   of the sessions this handler answered (it names itself in `from`);
//! - PUB to `BASE-in`: every packet to condure, as `<condure's from> T<map>`.
//!
//! Packets are TNetString maps behind a `T` ([`tnetstring`]). A session is
//! condure's `from` and the packet's `id`. The handler accepts every upgrade
//! (`code` 101, with credits for condure to send it client data), answers
//! each `data` packet with the same `body` and `content-type`, and returns
//! the consumed bytes as credits on the same packet; it sends only while
//! condure's credits cover the body (the rest waits for a `credit` packet),
//! answers `close` with `close` and `ping` with `pong`, and forgets a session
//! on `close`, `cancel` or `error`. Packets it cannot decode are counted and
//! logged (at most one line a second), never fatal.
//!
//! stdout: `{"event":"ready","id":…}` once the three sockets are connected.

mod tnetstring;

use std::collections::{HashMap, VecDeque};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use zeromq::{
    PubSocket, PullSocket, RouterSocket, Socket, SocketOptions, SocketRecv, SocketSend, ZmqMessage,
};

use crate::tnetstring::Value;

/// Credits offered to condure for client data, per session, at the upgrade
/// (condure's own default buffer is of this order).
const INITIAL_CREDITS: i64 = 1 << 20;

/// ZHTTP WebSocket echo handler for condure.
#[derive(Debug, Parser)]
#[command(name = "zhttp_echo", version)]
struct Args {
    /// condure's `--zclient-stream` base, e.g. ipc:///tmp/x/client.
    #[arg(long)]
    base: String,
    /// This handler's address (its ROUTER identity and `from`).
    #[arg(long)]
    id: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("zhttp_echo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zhttp_echo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let id = args
        .id
        .unwrap_or_else(|| format!("zhttp-echo-{}", std::process::id()));
    let mut pull = PullSocket::new();
    pull.connect(&format!("{}-out", args.base))
        .await
        .context("PULL to -out")?;
    let mut options = SocketOptions::default();
    options.peer_identity(
        id.as_str()
            .parse()
            .context("--id is not a valid identity")?,
    );
    let mut stream = RouterSocket::with_options(options);
    stream
        .connect(&format!("{}-out-stream", args.base))
        .await
        .context("ROUTER to -out-stream")?;
    let mut publish = PubSocket::new();
    publish
        .connect(&format!("{}-in", args.base))
        .await
        .context("PUB to -in")?;
    println!("{}", serde_json::json!({ "event": "ready", "id": id }));

    let mut handler = Handler::new(id.into_bytes());
    let mut bad = BadPackets::default();
    loop {
        let msg = tokio::select! {
            m = pull.recv() => m.context("PULL socket")?,
            m = stream.recv() => m.context("ROUTER socket")?,
        };
        // condure's ROUTER adds envelope frames; the packet is the last frame.
        let Some(packet) = msg.iter().last() else {
            continue;
        };
        match handler.on_packet(packet) {
            Ok(out) => {
                for frame in out {
                    publish
                        .send(ZmqMessage::from(frame))
                        .await
                        .context("PUB socket")?;
                }
            }
            Err(e) => bad.count(&e),
        }
    }
}

/// Counts undecodable packets; logs at most one line a second.
#[derive(Default)]
struct BadPackets {
    since_log: u64,
    last_log: Option<Instant>,
}

impl BadPackets {
    fn count(&mut self, error: &PacketError) {
        self.since_log += 1;
        if self
            .last_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            eprintln!(
                "zhttp_echo: dropped {} bad packet(s); last: {error}",
                self.since_log
            );
            self.since_log = 0;
            self.last_log = Some(Instant::now());
        }
    }
}

/// Why a packet was dropped.
#[derive(Debug)]
enum PacketError {
    NotTnetstring,
    Decode(tnetstring::Error),
    Missing(&'static str),
}

impl std::fmt::Display for PacketError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PacketError::NotTnetstring => f.write_str("packet does not start with 'T'"),
            PacketError::Decode(e) => write!(f, "bad tnetstring: {e}"),
            PacketError::Missing(field) => write!(f, "no `{field}` (or of the wrong type)"),
        }
    }
}

/// One WebSocket session with condure.
#[derive(Debug, Default)]
struct Session {
    /// `seq` of this handler's next packet in the session.
    out_seq: i64,
    /// Body bytes condure will still take from this handler.
    credits: i64,
    /// Echoes waiting for credits: content type and body.
    waiting: VecDeque<(Option<Vec<u8>>, Vec<u8>)>,
}

/// The sessions, and the packets each incoming packet calls for. No I/O.
struct Handler {
    id: Vec<u8>,
    sessions: HashMap<(Vec<u8>, Vec<u8>), Session>,
}

impl Handler {
    fn new(id: Vec<u8>) -> Self {
        Self {
            id,
            sessions: HashMap::new(),
        }
    }

    /// Handles one packet from condure; returns the frames to publish.
    fn on_packet(&mut self, packet: &[u8]) -> Result<Vec<Bytes>, PacketError> {
        let body = packet
            .strip_prefix(b"T")
            .ok_or(PacketError::NotTnetstring)?;
        let p = tnetstring::decode_all(body).map_err(PacketError::Decode)?;
        let from = p
            .get("from")
            .and_then(Value::as_bytes)
            .ok_or(PacketError::Missing("from"))?;
        let id = p
            .get("id")
            .and_then(Value::as_bytes)
            .ok_or(PacketError::Missing("id"))?;
        let kind = match p.get("type") {
            None => &b"data"[..],
            Some(v) => v.as_bytes().ok_or(PacketError::Missing("type"))?,
        };
        let credits = p.get("credits").and_then(Value::as_int).unwrap_or(0);
        let key = (from.to_vec(), id.to_vec());
        let mut out = Vec::new();
        match kind {
            b"data" if !self.sessions.contains_key(&key) => {
                // The upgrade request: accept it.
                let session = self.sessions.entry(key.clone()).or_default();
                session.credits = credits;
                let fields = vec![
                    (&b"code"[..], Value::Int(101)),
                    (b"reason", Value::Bytes(b"Switching Protocols")),
                    (b"headers", Value::List(Vec::new())),
                    (b"credits", Value::Int(INITIAL_CREDITS)),
                ];
                out.push(packet_to(&self.id, &key, session, None, fields));
            }
            b"data" => {
                let session = self
                    .sessions
                    .get_mut(&key)
                    .ok_or(PacketError::Missing("id"))?;
                session.credits += credits;
                let data = p.get("body").and_then(Value::as_bytes).unwrap_or(b"");
                let ctype = p.get("content-type").and_then(Value::as_bytes);
                session
                    .waiting
                    .push_back((ctype.map(<[u8]>::to_vec), data.to_vec()));
                flush(&self.id, &key, session, &mut out);
            }
            b"credit" => {
                if let Some(session) = self.sessions.get_mut(&key) {
                    session.credits += credits;
                    flush(&self.id, &key, session, &mut out);
                }
            }
            b"close" => {
                if let Some(mut session) = self.sessions.remove(&key) {
                    let mut fields = Vec::new();
                    if let Some(code) = p.get("code").and_then(Value::as_int) {
                        fields.push((&b"code"[..], Value::Int(code)));
                    }
                    out.push(packet_to(
                        &self.id,
                        &key,
                        &mut session,
                        Some(b"close"),
                        fields,
                    ));
                }
            }
            b"ping" => {
                if let Some(session) = self.sessions.get_mut(&key) {
                    let data = p.get("body").and_then(Value::as_bytes).unwrap_or(b"");
                    let fields = vec![(&b"body"[..], Value::Bytes(data))];
                    out.push(packet_to(&self.id, &key, session, Some(b"pong"), fields));
                }
            }
            b"cancel" | b"error" => {
                self.sessions.remove(&key);
            }
            // keep-alive, pong, handoff and anything newer: nothing to do.
            _ => {}
        }
        Ok(out)
    }
}

/// Sends the waiting echoes that condure's credits cover, in order.
fn flush(me: &[u8], key: &(Vec<u8>, Vec<u8>), session: &mut Session, out: &mut Vec<Bytes>) {
    while let Some((_, data)) = session.waiting.front() {
        let len = data.len() as i64;
        if len > session.credits {
            break;
        }
        session.credits -= len;
        let Some((ctype, data)) = session.waiting.pop_front() else {
            break;
        };
        let mut fields = vec![
            (&b"body"[..], Value::Bytes(&data)),
            // The bytes just consumed: condure may send as many again.
            (b"credits", Value::Int(len)),
        ];
        if let Some(ctype) = &ctype {
            fields.push((b"content-type", Value::Bytes(ctype)));
        }
        out.push(packet_to(me, key, session, None, fields));
    }
}

/// One packet of `session` to condure: `<condure's from> T<map>`.
fn packet_to(
    me: &[u8],
    key: &(Vec<u8>, Vec<u8>),
    session: &mut Session,
    kind: Option<&[u8]>,
    fields: Vec<(&[u8], Value<'_>)>,
) -> Bytes {
    let mut map = vec![
        (&b"from"[..], Value::Bytes(me)),
        (b"id", Value::Bytes(&key.1)),
        (b"seq", Value::Int(session.out_seq)),
    ];
    session.out_seq += 1;
    if let Some(kind) = kind {
        map.push((b"type", Value::Bytes(kind)));
    }
    map.extend(fields);
    let mut frame = key.0.clone();
    frame.extend_from_slice(b" T");
    tnetstring::encode(&Value::Map(map), &mut frame);
    Bytes::from(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(fields: Vec<(&[u8], Value<'_>)>) -> Vec<u8> {
        let mut out = b"T".to_vec();
        tnetstring::encode(&Value::Map(fields), &mut out);
        out
    }

    fn sent(frame: &Bytes) -> (String, Value<'_>) {
        let space = frame.iter().position(|&b| b == b' ').unwrap();
        let to = String::from_utf8(frame[..space].to_vec()).unwrap();
        let body = frame[space + 1..].strip_prefix(b"T").unwrap();
        (to, tnetstring::decode_all(body).unwrap())
    }

    #[test]
    fn a_session_is_accepted_echoed_and_closed() {
        let mut h = Handler::new(b"me".to_vec());
        let upgrade = packet(vec![
            (b"from", Value::Bytes(b"condure")),
            (b"id", Value::Bytes(b"s1")),
            (b"seq", Value::Int(0)),
            (b"uri", Value::Bytes(b"ws://127.0.0.1/")),
            (b"credits", Value::Int(4)),
        ]);
        let out = h.on_packet(&upgrade).unwrap();
        let (to, accept) = sent(&out[0]);
        assert_eq!(to, "condure");
        assert_eq!(accept.get("code"), Some(&Value::Int(101)));
        assert_eq!(accept.get("from"), Some(&Value::Bytes(b"me")));
        assert_eq!(accept.get("seq"), Some(&Value::Int(0)));

        // 6 bytes with 4 credits: waits for a credit packet.
        let data = packet(vec![
            (b"from", Value::Bytes(b"condure")),
            (b"id", Value::Bytes(b"s1")),
            (b"seq", Value::Int(1)),
            (b"content-type", Value::Bytes(b"text")),
            (b"body", Value::Bytes(b"hello!")),
        ]);
        assert!(h.on_packet(&data).unwrap().is_empty());
        let credit = packet(vec![
            (b"from", Value::Bytes(b"condure")),
            (b"id", Value::Bytes(b"s1")),
            (b"type", Value::Bytes(b"credit")),
            (b"credits", Value::Int(2)),
        ]);
        let out = h.on_packet(&credit).unwrap();
        let (_, echo) = sent(&out[0]);
        assert_eq!(echo.get("body"), Some(&Value::Bytes(b"hello!")));
        assert_eq!(echo.get("content-type"), Some(&Value::Bytes(b"text")));
        assert_eq!(echo.get("credits"), Some(&Value::Int(6)));
        assert_eq!(echo.get("seq"), Some(&Value::Int(1)));

        let close = packet(vec![
            (b"from", Value::Bytes(b"condure")),
            (b"id", Value::Bytes(b"s1")),
            (b"type", Value::Bytes(b"close")),
            (b"code", Value::Int(1000)),
        ]);
        let out = h.on_packet(&close).unwrap();
        let (_, closed) = sent(&out[0]);
        assert_eq!(closed.get("type"), Some(&Value::Bytes(b"close")));
        assert_eq!(closed.get("code"), Some(&Value::Int(1000)));
        assert!(h.sessions.is_empty());
    }

    #[test]
    fn bad_packets_are_errors_not_panics() {
        let mut h = Handler::new(b"me".to_vec());
        for p in [
            &b""[..],
            b"x",
            b"T",
            b"T5:abc,",
            b"T0:}",
            b"T12:2:id,2:s1,}",
        ] {
            assert!(h.on_packet(p).is_err(), "{:?}", String::from_utf8_lossy(p));
        }
    }
}
