//! The HTTP fallback for networks that block WebSocket (README, "HTTP
//! fallback"): Server-Sent Events down, `POST` up.
//!
//! An SSE session is an ordinary session (the same driver, policies,
//! limits, metrics, resume) run over [`SseSocket`], which looks to the
//! driver like a WebSocket:
//! - what the session writes becomes SSE events on the response body:
//!   `id: <seq>` and `data: <frame>` (no `id:` for `welcome` and
//!   `resumed`, frames of the connection), binary frames as
//!   `event: binary` with base64 data, pings as keep-alive comments, the
//!   close as `event: close`;
//! - what the client POSTs (`X-Session-Id`, `X-Resume-Token`) is fed to the
//!   session as text frames, in order, through [`SseRegistry`]; a POST
//!   numbered with `X-Post-Seq` and sent twice (a browser retries a POST
//!   whose connection broke before the answer) is taken once and answered
//!   alike ([`Upstream`]);
//! - a `DELETE` ends the session as a WebSocket close 1000 would.
//!
//! A POST is authenticated by the session's resume token, so SSE needs
//! resume on the route. A dropped event stream is a lost connection like a
//! dropped WebSocket: the session parks, and a new `GET` with
//! `session_id`, `resume_token` and `last_seq` (or `Last-Event-ID`)
//! resumes it: the socket starts with a `resume` frame made from them.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use crate::sync::lock;
use axum::{
    body::{Body, Bytes},
    extract::ws::{CloseFrame, Message},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use base64::Engine;
use dashmap::DashMap;
use futures_util::{Sink, Stream};
use serde_json::{json, value::RawValue, Value};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

/// Client frames that may wait for the session to read them; a POST that
/// finds the queue full is answered 429.
const INBOUND_QUEUE: usize = 256;
/// Encoded events that may wait for the response body to take them (the
/// writer's patience then decides about a client that does not read).
const OUTBOUND_QUEUE: usize = 64;

/// Where a POST finds its session: session id → the session's
/// [`Upstream`]. An SSE socket registers under its session's id, and again
/// under the old id when it resumes one.
#[derive(Default)]
pub struct SseRegistry(DashMap<String, Arc<Upstream>>);

impl SseRegistry {
    pub fn upstream(&self, session: &str) -> Option<Arc<Upstream>> {
        self.0.get(session).map(|s| s.clone())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Where POSTs reach one SSE socket: its inbound queue, and the answer to
/// the last numbered POST, so that the same POST sent again is not taken
/// twice.
pub struct Upstream {
    sender: mpsc::Sender<Message>,
    last: Mutex<Option<(u64, Result<usize, PostError>)>>,
    /// The token of this connection's welcome, or of its `resumed`.
    token: Mutex<Option<String>>,
}

impl Upstream {
    /// Whether `token` is this connection's: a POST of an earlier
    /// connection of the same session (sent before that one dropped, with
    /// the token the resume replaced) must not reach this one, whose
    /// numbering it does not share.
    pub fn carries(&self, token: &str) -> bool {
        lock(&self.token).as_deref() == Some(token)
    }

    /// Takes a POST body (see [`feed`]). With `seq` (`X-Post-Seq`, counted
    /// up by the client per event stream), the POST numbered like the last
    /// one is that one sent again: it gets the same answer and nothing is
    /// fed twice; an older number is refused (409).
    pub fn post(
        &self,
        seq: Option<u64>,
        body: &[u8],
        max_frame: usize,
    ) -> Result<usize, PostError> {
        let Some(seq) = seq else {
            return feed(&self.sender, body, max_frame);
        };
        let mut last = lock(&self.last);
        match &*last {
            Some((n, answer)) if *n == seq => return answer.clone(),
            Some((n, _)) if *n > seq => {
                return Err(PostError {
                    status: StatusCode::CONFLICT,
                    code: "bad_request",
                    message: format!("POST {seq} arrived after POST {n}"),
                    index: None,
                })
            }
            _ => {}
        }
        let answer = feed(&self.sender, body, max_frame);
        *last = Some((seq, answer.clone()));
        answer
    }

    /// Asks the session to end as a client's close 1000 would (`DELETE`);
    /// `false` if the session is gone or too far behind to read it.
    pub fn end(&self) -> bool {
        self.sender
            .try_send(Message::Close(Some(CloseFrame {
                code: 1000,
                reason: "the client ended the session".into(),
            })))
            .is_ok()
    }
}

/// The session's side of an SSE connection (module docs).
pub struct SseSocket {
    inbound: mpsc::Receiver<Message>,
    /// Frames the socket makes up itself (the `resume` of a reconnect, the
    /// pong of a keep-alive), read before the POSTed ones.
    pending: VecDeque<Message>,
    outbound: PollSender<Bytes>,
    closed: bool,
    /// The session left the socket ([`crate::session::Socket::stop_input`]): what was
    /// taken is still read after a close.
    input_stopped: bool,
    /// The `close` event answering a client's close (`DELETE`), written by
    /// the next flush, as a WebSocket answers a close frame.
    close_reply: Option<Bytes>,
    registry: Arc<SseRegistry>,
    /// What POSTs reach, kept to register it under a resumed id.
    upstream: Arc<Upstream>,
    /// The session id it is registered under now.
    session: Mutex<String>,
}

/// A new SSE connection: the socket for the session, and the body of the
/// HTTP response that carries its events.
pub fn connect(
    registry: Arc<SseRegistry>,
    session: &str,
    resume: Option<Value>,
) -> (SseSocket, Body) {
    let (sender, inbound) = mpsc::channel(INBOUND_QUEUE);
    let (tx, mut rx) = mpsc::channel::<Bytes>(OUTBOUND_QUEUE);
    let upstream = Arc::new(Upstream {
        sender,
        last: Mutex::new(None),
        token: Mutex::new(None),
    });
    registry.0.insert(session.to_owned(), upstream.clone());
    let mut pending = VecDeque::new();
    if let Some(frame) = resume {
        pending.push_back(Message::Text(frame.to_string().into()));
    }
    let socket = SseSocket {
        inbound,
        pending,
        outbound: PollSender::new(tx),
        closed: false,
        input_stopped: false,
        close_reply: None,
        registry,
        upstream,
        session: Mutex::new(session.to_owned()),
    };
    let body = Body::from_stream(futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|b| b.map(Ok::<_, std::convert::Infallible>))
    }));
    (socket, body)
}

/// The headers of an event stream that no proxy should buffer.
pub fn response(body: Body) -> Response {
    (
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        body,
    )
        .into_response()
}

/// Whether a request asks for an event stream.
pub fn wants_events(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().starts_with("text/event-stream"))
        })
}

/// The `resume` frame a reconnecting `GET` asks for with its query
/// (`session_id`, `resume_token`, `last_seq`, or the `Last-Event-ID`
/// header), if it asks for one.
pub fn resume_request(
    query: &std::collections::BTreeMap<String, String>,
    headers: &HeaderMap,
) -> Option<Value> {
    let session_id = query.get("session_id")?;
    let token = query.get("resume_token")?;
    let last_seq = query
        .get("last_seq")
        .map(String::as_str)
        .or_else(|| headers.get("last-event-id").and_then(|v| v.to_str().ok()))
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    Some(json!({
        "type": "resume",
        "id": "sse-resume",
        "data": { "session_id": session_id, "resume_token": token, "last_seq": last_seq },
    }))
}

/// One SSE event for a text frame: `id:` is its `seq`, except for the
/// frames of the connection (`welcome`, `resumed`).
/// The event for a text frame, and whether it is a frame of the connection
/// (`welcome`, `resumed`: no `seq` of the session, no `id:`).
fn text_event(text: &str) -> (Bytes, bool) {
    // The session writer puts `seq` last; `resumed` has none.
    let seq = text.rfind("\"seq\":").and_then(|at| {
        let digits: String = text[at + 6..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse::<u64>().ok()
    });
    let welcome = text.starts_with("{\"type\":\"welcome\"");
    let mut event = String::with_capacity(text.len() + 24);
    let connection = welcome || seq.is_none();
    if let (Some(seq), false) = (seq, connection) {
        event.push_str("id: ");
        event.push_str(&seq.to_string());
        event.push('\n');
    }
    // JSON from the writer has no raw newline; `data:` is one line.
    event.push_str("data: ");
    event.push_str(text);
    event.push_str("\n\n");
    (Bytes::from(event), connection)
}

impl SseSocket {
    fn event_for(&mut self, msg: Message) -> Option<Bytes> {
        match msg {
            Message::Text(t) => {
                let (event, connection) = text_event(t.as_str());
                if connection {
                    self.connection_frame(t.as_str());
                }
                Some(event)
            }
            Message::Binary(b) => Some(Bytes::from(format!(
                "event: binary\ndata: {}\n\n",
                base64::engine::general_purpose::STANDARD.encode(&b)
            ))),
            Message::Ping(_) => {
                // A keep-alive comment for proxies and the client; the
                // session hears its pong at once (the event stream has no
                // way back: a dead client shows as a failed write).
                self.pending.push_back(Message::Pong(Bytes::new()));
                Some(Bytes::from_static(b": keep-alive\n\n"))
            }
            Message::Pong(_) => None,
            Message::Close(frame) => {
                self.closed = true;
                let (code, reason) = frame
                    .map(|f| (f.code, f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                Some(Bytes::from(format!(
                    "event: close\ndata: {}\n\n",
                    json!({ "code": code, "reason": reason })
                )))
            }
        }
    }

    /// A `welcome` or `resumed` names the token this connection's POSTs
    /// carry; `resumed` also the session it now carries (the old one).
    fn connection_frame(&self, text: &str) {
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            return;
        };
        if let Some(token) = v["data"]["resume_token"].as_str() {
            *lock(&self.upstream.token) = Some(token.to_owned());
        }
        if v["type"] == "resumed" {
            if let Some(id) = v["data"]["session_id"].as_str() {
                self.rename(id);
            }
        }
    }

    /// Registers the socket under the session id it carries now.
    fn rename(&self, id: &str) {
        let mut current = lock(&self.session);
        if *current != id {
            self.registry
                .0
                .remove_if(&*current, |_, s| Arc::ptr_eq(s, &self.upstream));
            self.registry.0.insert(id.to_owned(), self.upstream.clone());
            *current = id.to_owned();
        }
    }
}

impl Drop for SseSocket {
    fn drop(&mut self) {
        let current = lock(&self.session);
        self.registry
            .0
            .remove_if(&*current, |_, s| Arc::ptr_eq(s, &self.upstream));
    }
}

impl crate::session::Socket for SseSocket {
    /// POSTs from now on are refused (`401`) instead of queued where the
    /// session would no longer read them; the frames already taken stay
    /// readable.
    fn stop_input(&mut self) {
        self.inbound.close();
        self.input_stopped = true;
    }
}

impl Stream for SseSocket {
    type Item = Result<Message, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(m) = self.pending.pop_front() {
            return Poll::Ready(Some(Ok(m)));
        }
        if self.closed && !self.input_stopped {
            return Poll::Ready(None);
        }
        let m = std::task::ready!(self.inbound.poll_recv(cx));
        if let Some(Message::Close(frame)) = &m {
            self.close_reply = self.event_for(Message::Close(frame.clone()));
        }
        Poll::Ready(m.map(Ok))
    }
}

impl Sink<Message> for SseSocket {
    type Error = axum::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.outbound.poll_reserve(cx).map_err(axum::Error::new)
    }

    fn start_send(mut self: Pin<&mut Self>, msg: Message) -> Result<(), Self::Error> {
        match self.event_for(msg) {
            Some(event) => self.outbound.send_item(event).map_err(axum::Error::new),
            None => {
                self.outbound.abort_send();
                Ok(())
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.close_reply.is_some() {
            std::task::ready!(self.outbound.poll_reserve(cx)).map_err(axum::Error::new)?;
            if let Some(event) = self.close_reply.take() {
                self.outbound.send_item(event).map_err(axum::Error::new)?;
            }
        }
        Poll::Ready(Ok(()))
    }

    fn poll_close(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Result<(), Self::Error>> {
        self.outbound.close();
        Poll::Ready(Ok(()))
    }
}

/// Why a POST was not taken (README, "HTTP fallback").
#[derive(Clone, Debug)]
pub struct PostError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub index: Option<usize>,
}

impl IntoResponse for PostError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": { "code": self.code, "message": self.message } });
        if let Some(i) = self.index {
            body["error"]["index"] = json!(i);
        }
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// What [`feed`] checks of a frame before the session reads it.
#[derive(serde::Deserialize)]
struct Typed<'a> {
    #[serde(borrow, rename = "type")]
    _type: std::borrow::Cow<'a, str>,
}

/// Feeds a POST body (one frame or an array) to the session, in order.
/// Frames before a bad one are taken; `index` names the bad one.
pub fn feed(
    sender: &mpsc::Sender<Message>,
    body: &[u8],
    max_frame: usize,
) -> Result<usize, PostError> {
    let bad = |index: Option<usize>, message: String| PostError {
        status: StatusCode::BAD_REQUEST,
        code: "bad_request",
        message,
        index,
    };
    // The frames go on as the client wrote them (each number exactly as
    // sent): split, checked, never re-encoded.
    let text =
        std::str::from_utf8(body).map_err(|_| bad(None, "the body is not UTF-8 text".into()))?;
    let not_json = |e: serde_json::Error| bad(None, format!("the body is not JSON: {e}"));
    let array = text.trim_start().starts_with('[');
    let frames: Vec<&RawValue> = if array {
        serde_json::from_str(text).map_err(not_json)?
    } else {
        vec![serde_json::from_str(text).map_err(not_json)?]
    };
    let at = |i: usize| array.then_some(i);
    for (i, frame) in frames.iter().enumerate() {
        if serde_json::from_str::<Typed<'_>>(frame.get()).is_err() {
            return Err(bad(
                at(i),
                "a frame is a JSON object with a string `type`".into(),
            ));
        }
        let text = frame.get();
        if text.len() > max_frame {
            return Err(PostError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                code: "payload_too_large",
                message: format!("a frame may have at most {max_frame} bytes"),
                index: at(i),
            });
        }
        match sender.try_send(Message::Text(text.to_owned().into())) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(PostError {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    code: "rate_limited",
                    message: "the session has more frames waiting than it reads: retry later"
                        .into(),
                    index: at(i),
                })
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(PostError {
                    status: StatusCode::UNAUTHORIZED,
                    code: "unauthorized",
                    message: "the session's event stream has closed (the session ended, or waits for a resume)".into(),
                    index: at(i),
                })
            }
        }
    }
    Ok(frames.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};

    #[test]
    fn events_carry_seq_as_id_except_for_the_connections_frames() {
        let (e, connection) = text_event(r#"{"type":"echo","id":1,"data":{},"done":true,"seq":7}"#);
        assert!(!connection);
        assert_eq!(
            e,
            Bytes::from(
                "id: 7\ndata: {\"type\":\"echo\",\"id\":1,\"data\":{},\"done\":true,\"seq\":7}\n\n"
            )
        );
        let (e, connection) = text_event(r#"{"type":"welcome","data":{"session_id":"a"},"seq":0}"#);
        assert!(
            e.starts_with(b"data: ") && connection,
            "no id for the welcome"
        );
        let (e, connection) = text_event(
            r#"{"data":{"session_id":"old","in_flight":[]},"done":true,"type":"resumed"}"#,
        );
        assert!(e.starts_with(b"data: ") && connection);
    }

    #[test]
    fn a_reconnect_asks_for_a_resume_from_its_query_or_last_event_id() {
        let q = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let mut h = HeaderMap::new();
        assert!(resume_request(&q(&[]), &h).is_none());
        h.insert("last-event-id", HeaderValue::from_static("41"));
        let r = resume_request(&q(&[("session_id", "s"), ("resume_token", "t")]), &h).unwrap();
        assert_eq!(
            r["data"],
            json!({"session_id": "s", "resume_token": "t", "last_seq": 41})
        );
        let r = resume_request(
            &q(&[
                ("session_id", "s"),
                ("resume_token", "t"),
                ("last_seq", "9"),
            ]),
            &h,
        )
        .unwrap();
        assert_eq!(r["data"]["last_seq"], 9);
    }

    #[tokio::test]
    async fn posts_feed_the_session_in_order_and_a_bad_frame_stops_the_rest() {
        let registry = Arc::new(SseRegistry::default());
        let (mut socket, _body) = connect(registry.clone(), "s1", None);
        let sender = registry.upstream("s1").unwrap().sender.clone();
        assert_eq!(feed(&sender, br#"{"type":"a"}"#, 1000).ok(), Some(1));
        let e = feed(&sender, br#"[{"type":"b"},{"nope":1},{"type":"c"}]"#, 1000)
            .err()
            .unwrap();
        assert_eq!((e.status, e.index), (StatusCode::BAD_REQUEST, Some(1)));
        let e = feed(&sender, b"not json", 1000).err().unwrap();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = feed(&sender, br#"{"type":"x","data":"0123456789"}"#, 10)
            .err()
            .unwrap();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        for want in ["a", "b"] {
            match socket.next().await {
                Some(Ok(Message::Text(t))) => {
                    assert_eq!(serde_json::from_str::<Value>(&t).unwrap()["type"], want)
                }
                other => panic!("{other:?}"),
            }
        }
        drop(socket);
        assert!(registry.is_empty(), "a dropped socket unregisters");
    }

    #[tokio::test]
    async fn a_resumed_session_is_found_under_its_old_id() {
        let registry = Arc::new(SseRegistry::default());
        let (mut socket, _body) = connect(registry.clone(), "fresh", None);
        socket
            .send(Message::Text(
                r#"{"data":{"session_id":"old"},"done":true,"type":"resumed"}"#.into(),
            ))
            .await
            .unwrap();
        assert!(registry.upstream("fresh").is_none());
        let up = registry.upstream("old").unwrap();
        assert!(!up.carries("t-old"), "a token of an earlier connection");
        socket
            .send(Message::Text(
                r#"{"data":{"session_id":"old","resume_token":"t-new"},"done":true,"type":"resumed"}"#
                    .into(),
            ))
            .await
            .unwrap();
        assert!(up.carries("t-new") && !up.carries("t-old"));
        // A keep-alive: a comment out, a pong in.
        socket.send(Message::Ping(Bytes::new())).await.unwrap();
        assert!(matches!(socket.next().await, Some(Ok(Message::Pong(_)))));
    }

    #[tokio::test]
    async fn frames_go_on_as_written_numbers_and_spacing_included() {
        let registry = Arc::new(SseRegistry::default());
        let (mut socket, _body) = connect(registry.clone(), "s1", None);
        let up = registry.upstream("s1").unwrap();
        let frames = [
            r#"{"type":"echo","data":{"n":1.0000000000000002,"big":12345678901234567890123,"e":1E400}}"#,
            r#"{ "type" : "b\u0041" , "data" : [ 1e2 ] }"#,
        ];
        let body = format!(" [ {} ,\n{} ] ", frames[0], frames[1]);
        assert_eq!(up.post(None, body.as_bytes(), 1000).ok(), Some(2));
        for want in frames {
            match socket.next().await {
                Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), want),
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_post_sent_again_is_taken_once_and_answered_alike() {
        let registry = Arc::new(SseRegistry::default());
        let (mut socket, _body) = connect(registry.clone(), "s1", None);
        let up = registry.upstream("s1").unwrap();
        let body = br#"[{"type":"a"},{"type":"b"}]"#;
        assert_eq!(up.post(Some(1), body, 1000).ok(), Some(2));
        assert_eq!(up.post(Some(1), body, 1000).ok(), Some(2), "the retry");
        // A refusal is kept alike: the retry gets it too and feeds nothing.
        let bad = br#"[{"type":"c"},{"nope":1}]"#;
        let e = up.post(Some(2), bad, 1000).unwrap_err();
        assert_eq!((e.status, e.index), (StatusCode::BAD_REQUEST, Some(1)));
        let again = up.post(Some(2), bad, 1000).unwrap_err();
        assert_eq!((again.status, again.index), (e.status, e.index));
        assert_eq!(up.post(Some(3), br#"{"type":"d"}"#, 1000).ok(), Some(1));
        let stale = up.post(Some(2), bad, 1000).unwrap_err();
        assert_eq!(stale.status, StatusCode::CONFLICT);
        for want in ["a", "b", "c", "d"] {
            match socket.next().await {
                Some(Ok(Message::Text(t))) => {
                    assert_eq!(serde_json::from_str::<Value>(&t).unwrap()["type"], want)
                }
                other => panic!("{other:?}"),
            }
        }
        // DELETE: the session reads a close 1000.
        assert!(up.end());
        match socket.next().await {
            Some(Ok(Message::Close(Some(f)))) => assert_eq!(f.code, 1000),
            other => panic!("{other:?}"),
        }
    }

    /// A session leaving its socket reads what was taken (`202`), and a
    /// POST after that is refused rather than queued where nobody reads.
    #[tokio::test]
    async fn a_socket_that_stops_input_keeps_what_it_took_and_refuses_the_rest() {
        use crate::session::Socket;
        let registry = Arc::new(SseRegistry::default());
        let (mut socket, _body) = connect(registry.clone(), "s1", None);
        let up = registry.upstream("s1").unwrap();
        assert_eq!(up.post(None, br#"{"type":"taken"}"#, 1000).ok(), Some(1));
        socket.stop_input();
        let e = up.post(None, br#"{"type":"late"}"#, 1000).unwrap_err();
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        match socket.next().await {
            Some(Ok(Message::Text(t))) => {
                assert_eq!(serde_json::from_str::<Value>(&t).unwrap()["type"], "taken")
            }
            other => panic!("{other:?}"),
        }
        assert!(
            socket.next().await.is_none(),
            "nothing after what was taken"
        );

        // The same after the session wrote its close (a takeover's 1001).
        let (mut socket, _body) = connect(registry.clone(), "s2", None);
        let up = registry.upstream("s2").unwrap();
        assert_eq!(up.post(None, br#"{"type":"taken"}"#, 1000).ok(), Some(1));
        socket
            .send(Message::Close(Some(CloseFrame {
                code: 1001,
                reason: "session resumed on another connection".into(),
            })))
            .await
            .unwrap();
        socket.stop_input();
        match socket.next().await {
            Some(Ok(Message::Text(t))) => {
                assert_eq!(serde_json::from_str::<Value>(&t).unwrap()["type"], "taken")
            }
            other => panic!("a closed socket still gives what it took: {other:?}"),
        }
        assert!(socket.next().await.is_none());
    }
}
