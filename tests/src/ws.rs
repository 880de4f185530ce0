//! A WebSocket test client speaking the router's client protocol (README, client protocol).
//!
//! Frames that a wait does not match are kept in a backlog rather than thrown
//! away, so a test can wait for one request's replies while pushes or other
//! requests' replies arrive in between, and still inspect those later. Every
//! wait is bounded and panics with what it was waiting for and what it saw.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Default bound for one wait on the socket.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// A frame received from the router.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A text frame holding JSON.
    Json(Value),
    /// A text frame that is not JSON, or any text frame on a raw connection.
    Text(String),
    Binary(Vec<u8>),
    /// A close frame: code and reason, if any.
    Close(Option<(u16, String)>),
}

impl Frame {
    pub fn json(&self) -> Option<&Value> {
        match self {
            Frame::Json(v) => Some(v),
            _ => None,
        }
    }
}

/// A connected client.
pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    backlog: VecDeque<Frame>,
    /// The `welcome` frame, for non-raw routes.
    pub welcome: Option<Value>,
    url: String,
    closed: bool,
    /// `seq` of the last JSON frame, once the welcome has been seen (raw
    /// routes have no envelope, so no `seq` either).
    last_seq: Option<u64>,
    /// Frames that broke the per-connection `seq` rule (see [`WsClient::assert_seq_ok`]).
    seq_errors: Vec<String>,
    /// Parse text frames as JSON (enveloped routes) or keep them as text (raw routes).
    parse_json: bool,
}

impl WsClient {
    /// Connects without reading anything; returns the handshake error as is
    /// (e.g. to inspect a refused upgrade).
    pub async fn try_connect(url: &str) -> Result<WsClient, tungstenite::Error> {
        let (ws, _resp) = tokio::time::timeout(RECV_TIMEOUT, tokio_tungstenite::connect_async(url))
            .await
            .map_err(|_| {
                tungstenite::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("WebSocket handshake with {url} timed out"),
                ))
            })??;
        Ok(WsClient {
            ws,
            backlog: VecDeque::new(),
            welcome: None,
            url: url.to_owned(),
            closed: false,
            last_seq: None,
            seq_errors: Vec::new(),
            parse_json: true,
        })
    }

    /// Connects to a non-raw route and reads its `welcome` frame.
    pub async fn connect(url: &str) -> WsClient {
        let mut c = Self::connect_raw(url).await;
        c.parse_json = true;
        let first = c.next_frame(RECV_TIMEOUT).await;
        match first {
            Frame::Json(v) if v["type"] == "welcome" => {
                assert_eq!(v["seq"], json!(0), "welcome must carry seq 0: {v}");
                c.welcome = Some(v);
                c.last_seq = Some(0);
            }
            other => panic!("{url}: expected a welcome frame first, got {other:?}"),
        }
        c
    }

    /// Connects without expecting a welcome (raw routes); text frames are
    /// returned as [`Frame::Text`], exactly as received.
    pub async fn connect_raw(url: &str) -> WsClient {
        match Self::try_connect(url).await {
            Ok(mut c) => {
                c.parse_json = false;
                c
            }
            Err(e) => panic!("cannot connect to {url}: {e}"),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    async fn send(&mut self, m: Message) {
        if let Err(e) = self.ws.send(m).await {
            panic!("{}: send failed: {e}", self.url);
        }
    }

    pub async fn send_json(&mut self, v: &Value) {
        self.send(Message::text(v.to_string())).await;
    }

    pub async fn send_text(&mut self, s: &str) {
        self.send(Message::text(s)).await;
    }

    pub async fn send_binary(&mut self, b: &[u8]) {
        self.send(Message::binary(b.to_vec())).await;
    }

    /// Sends a request `{type, id, data}`.
    pub async fn send_request(&mut self, msg_type: &str, id: &str, data: Value) {
        self.send_json(&json!({"type": msg_type, "id": id, "data": data}))
            .await;
    }

    /// Sends a close frame (normal closure) and waits briefly for the close handshake.
    /// The `welcome` frame the connection started with.
    pub fn welcome(&self) -> &Value {
        self.welcome.as_ref().unwrap_or(&Value::Null)
    }

    /// The highest `seq` received so far.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// Drops the TCP connection without a close frame (a lost network, as
    /// the server sees it).
    pub fn drop_connection(self) {
        drop(self.ws);
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }

    /// Reads one frame from the socket (not the backlog); `None` on timeout.
    /// Ping/pong frames are skipped (tungstenite answers pings itself).
    async fn read_socket(&mut self, deadline: Instant) -> Option<Frame> {
        if self.closed {
            panic!("{}: read after the connection closed", self.url);
        }
        loop {
            let next = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(n) => n,
            };
            let msg = match next {
                None => {
                    self.closed = true;
                    return Some(Frame::Close(None));
                }
                Some(Err(e)) => {
                    self.closed = true;
                    panic!("{}: read failed: {e}", self.url)
                }
                Some(Ok(m)) => m,
            };
            return Some(match msg {
                Message::Text(t) if !self.parse_json => Frame::Text(t.as_str().to_owned()),
                Message::Text(t) => match serde_json::from_str::<Value>(t.as_str()) {
                    Ok(v) => {
                        self.check_seq(&v);
                        Frame::Json(v)
                    }
                    Err(_) => Frame::Text(t.as_str().to_owned()),
                },
                Message::Binary(b) => Frame::Binary(b.to_vec()),
                Message::Close(c) => {
                    self.closed = true;
                    // tungstenite queued our close reply: send it now, as a
                    // browser does, so the server's close handshake ends.
                    let _ = tokio::time::timeout(Duration::from_secs(1), self.ws.flush()).await;
                    Frame::Close(c.map(|c| (u16::from(c.code), c.reason.as_str().to_owned())))
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            });
        }
    }

    fn check_seq(&mut self, v: &Value) {
        let Some(last) = self.last_seq else { return };
        match v["seq"].as_u64() {
            Some(seq) if seq > last => self.last_seq = Some(seq),
            Some(seq) => self
                .seq_errors
                .push(format!("seq {seq} after seq {last}: {v}")),
            None => self
                .seq_errors
                .push(format!("frame without a numeric seq: {v}")),
        }
    }

    /// Asserts that every JSON frame so far carried a `seq` greater than the
    /// previous one (the README's client protocol: per-connection sequence numbers, for resume).
    pub fn assert_seq_ok(&self) {
        assert!(
            self.seq_errors.is_empty(),
            "{}: seq violations: {:?}",
            self.url,
            self.seq_errors
        );
    }

    /// The next frame (backlog first).
    pub async fn next_frame(&mut self, timeout: Duration) -> Frame {
        if let Some(f) = self.backlog.pop_front() {
            return f;
        }
        let deadline = Instant::now() + timeout;
        match self.read_socket(deadline).await {
            Some(f) => f,
            None => panic!("{}: no frame within {timeout:?}", self.url),
        }
    }

    /// The next frame, parsed as JSON; panics on a non-JSON frame.
    pub async fn next_json(&mut self, timeout: Duration) -> Value {
        match self.next_frame(timeout).await {
            Frame::Json(v) => v,
            other => panic!("{}: expected a JSON frame, got {other:?}", self.url),
        }
    }

    /// The first frame (backlog first, then the socket) satisfying `pred`;
    /// other frames are kept in the backlog in arrival order.
    pub async fn next_matching(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Frame) -> bool,
    ) -> Frame {
        if let Some(i) = self.backlog.iter().position(&pred) {
            // Invariant: `i` was just found in the backlog.
            return self.backlog.remove(i).expect("index from position");
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_socket(deadline).await {
                Some(f) if pred(&f) => return f,
                Some(Frame::Close(c)) => panic!(
                    "{}: connection closed ({c:?}) while waiting for {what}; backlog: {:?}",
                    self.url, self.backlog
                ),
                Some(f) => self.backlog.push_back(f),
                None => panic!(
                    "{}: no {what} within {timeout:?}; unmatched frames: {:?}",
                    self.url, self.backlog
                ),
            }
        }
    }

    /// Like [`WsClient::next_matching`], but `None` when nothing matches in
    /// time (the connection closing still panics).
    pub async fn try_next_matching(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Frame) -> bool,
    ) -> Option<Frame> {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(i);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_socket(deadline).await {
                Some(f) if pred(&f) => return Some(f),
                Some(Frame::Close(c)) => panic!("{}: connection closed ({c:?})", self.url),
                Some(f) => self.backlog.push_back(f),
                None => return None,
            }
        }
    }

    /// The next JSON frame whose `id` equals `id`.
    pub async fn next_for_id(&mut self, id: &str, timeout: Duration) -> Value {
        let f = self
            .next_matching(&format!("a frame for id {id:?}"), timeout, |f| {
                f.json().is_some_and(|v| v["id"] == id)
            })
            .await;
        match f {
            Frame::Json(v) => v,
            _ => unreachable!("matched frames are JSON"),
        }
    }

    /// The next JSON frame whose `type` equals `msg_type`.
    pub async fn next_of_type(&mut self, msg_type: &str, timeout: Duration) -> Value {
        let f = self
            .next_matching(&format!("a {msg_type:?} frame"), timeout, |f| {
                f.json().is_some_and(|v| v["type"] == msg_type)
            })
            .await;
        match f {
            Frame::Json(v) => v,
            _ => unreachable!("matched frames are JSON"),
        }
    }

    /// Every frame for request `id` up to and including the one with
    /// `done: true`. Checks that they all share one `correlation_id`.
    pub async fn collect_until_done(&mut self, id: &str, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut frames: Vec<Value> = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self.next_for_id(id, left).await;
            if let Some(first) = frames.first() {
                assert_eq!(
                    first["correlation_id"], v["correlation_id"],
                    "frames of request {id:?} carry different correlation ids: {first} vs {v}"
                );
            }
            let done = v["done"] == true;
            frames.push(v);
            if done {
                return frames;
            }
        }
    }

    /// Sends a request and returns all its frames up to `done: true`.
    pub async fn request(&mut self, msg_type: &str, id: &str, data: Value) -> Vec<Value> {
        self.send_request(msg_type, id, data).await;
        self.collect_until_done(id, RECV_TIMEOUT).await
    }

    /// Sends a request and returns its final frame, asserting it is not an error.
    pub async fn request_ok(&mut self, msg_type: &str, id: &str, data: Value) -> Value {
        let frames = self.request(msg_type, id, data).await;
        // Invariant: collect_until_done returns at least the done frame.
        let last = frames.last().cloned().expect("at least one frame");
        assert_ne!(
            last["type"], "error",
            "request {id:?} ({msg_type}) failed: {last}"
        );
        last
    }

    /// Frames received but not yet consumed by a wait.
    pub fn backlog(&self) -> &VecDeque<Frame> {
        &self.backlog
    }

    /// Removes and returns the backlog.
    pub fn take_backlog(&mut self) -> Vec<Frame> {
        self.backlog.drain(..).collect()
    }

    /// Reads until the connection closes (bounded); returns the close frame.
    pub async fn wait_closed(&mut self, timeout: Duration) -> Option<(u16, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.closed {
                return None;
            }
            match self.read_socket(deadline).await {
                Some(Frame::Close(c)) => return c,
                Some(f) => self.backlog.push_back(f),
                None => panic!("{}: not closed within {timeout:?}", self.url),
            }
        }
    }
}
