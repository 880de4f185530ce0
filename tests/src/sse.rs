//! A minimal client of the router's HTTP fallback (README, "HTTP
//! fallback"): an event stream read over a plain `TcpStream` (HTTP/1.1,
//! chunked), and POSTs of frames.

use std::{collections::VecDeque, net::SocketAddr, time::Duration};

use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::http::HttpResponse;

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

impl Event {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {:?}", self.data))
    }
}

/// An open event stream.
pub struct EventStream {
    stream: TcpStream,
    /// Body bytes received, chunk framing removed.
    body: Vec<u8>,
    /// Raw bytes not yet de-chunked.
    raw: Vec<u8>,
    events: VecDeque<Event>,
    /// Keep-alive comments seen.
    pub comments: usize,
    /// The body's last (empty) chunk arrived: the response is complete.
    ended: bool,
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl EventStream {
    /// `GET path_and_query` with `Accept: text/event-stream` and `extra`
    /// headers; reads the response head.
    pub async fn open(
        addr: SocketAddr,
        path_and_query: &str,
        extra: &[(&str, &str)],
    ) -> EventStream {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut req = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n"
        );
        for (k, v) in extra {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        let head_end = loop {
            if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break p;
            }
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
                .await
                .expect("a response head within 10 s")
                .expect("read");
            assert!(n > 0, "closed before the response head");
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let rest = raw[head_end + 4..].to_vec();
        EventStream {
            stream,
            body: Vec::new(),
            raw: rest,
            events: VecDeque::new(),
            comments: 0,
            ended: false,
            status,
            headers,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The next event, within `timeout`; `None` when the stream ended.
    pub async fn next(&mut self, timeout: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.dechunk();
            self.parse();
            if let Some(e) = self.events.pop_front() {
                return Some(e);
            }
            if self.ended {
                return None;
            }
            let mut buf = [0u8; 8192];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no event within {timeout:?}"))
                .ok()?;
            if n == 0 {
                return None;
            }
            self.raw.extend_from_slice(&buf[..n]);
        }
    }

    /// The next event that is not a keep-alive, as JSON.
    pub async fn next_json(&mut self, timeout: Duration) -> Value {
        self.next(timeout).await.expect("the stream ended").json()
    }

    fn dechunk(&mut self) {
        loop {
            let Some(eol) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size_text = String::from_utf8_lossy(&self.raw[..eol]).into_owned();
            let Ok(size) = usize::from_str_radix(size_text.trim(), 16) else {
                return;
            };
            if self.raw.len() < eol + 2 + size + 2 {
                return;
            }
            self.ended |= size == 0;
            self.body
                .extend_from_slice(&self.raw[eol + 2..eol + 2 + size]);
            self.raw.drain(..eol + 2 + size + 2);
        }
    }

    fn parse(&mut self) {
        while let Some(end) = self.body.windows(2).position(|w| w == b"\n\n") {
            let block = String::from_utf8_lossy(&self.body[..end]).into_owned();
            self.body.drain(..end + 2);
            let mut event = Event {
                id: None,
                event: None,
                data: String::new(),
            };
            let mut comment = true;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    event.id = Some(v.to_owned());
                    comment = false;
                } else if let Some(v) = line.strip_prefix("event: ") {
                    event.event = Some(v.to_owned());
                    comment = false;
                } else if let Some(v) = line.strip_prefix("data: ") {
                    event.data.push_str(v);
                    comment = false;
                }
            }
            if comment {
                self.comments += 1;
            } else {
                self.events.push_back(event);
            }
        }
    }
}

/// `POST path` with a body and headers; the response.
pub async fn post(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpResponse {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("an answer within 10 s")
        .expect("read");
    crate::http::parse(&raw).expect("an HTTP response")
}

/// A raw request (method, path, headers) with `Connection: close`; the response.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("an answer within 10 s")
        .expect("read");
    crate::http::parse(&raw).expect("an HTTP response")
}
