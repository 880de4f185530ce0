//! Helpers shared by the `policies_*` end-to-end tests (issue 4, README: policies).
//!
//! The harness (`e2e_tests`) covers the common paths; the policy tests also
//! need what a well-behaved client never does: upgrade attempts with chosen
//! headers whose refusals (status and JSON body) are read back, WebSocket
//! clients built on a custom request (tokens, origins, subprotocols), raw
//! frames and sockets that never read, a worker whose per-request log lines
//! show which requests reached it, and readings of the router's `/proc`.
//!
//! Each `policies_*.rs` test crate includes this module with `mod
//! policies_support;` and uses a part of it, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use e2e_tests::{
    example_bin, routes, workspace_root, HttpResponse, Proc, RouterProc, WorkerProc, STACK_ENV,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A WebSocket stream as `tokio_tungstenite::connect_async` returns it.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The handshake response of a successful upgrade.
pub type UpgradeResponse = tungstenite::handshake::client::Response;

/// Bound on one read or handshake in these helpers.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts `echo_worker` with the SDK's debug logging on, so that every
/// request it receives leaves lines carrying its `correlation.id` on stderr
/// (see [`seen_correlation_ids`]). Waits for its `registered` line.
pub async fn echo_worker_logged(
    router: &RouterProc,
    services: &[&str],
    extra_args: &[&str],
) -> WorkerProc {
    let mut cmd = Command::new(example_bin("echo_worker"));
    for k in STACK_ENV {
        cmd.env_remove(k);
    }
    cmd.current_dir(workspace_root())
        .env("RUST_LOG", "info,worker_sdk=debug")
        .arg("--bridge-endpoint")
        .arg(&router.bridge)
        .arg("--publish-endpoint")
        .arg(&router.publish);
    for s in services {
        cmd.arg("--service").arg(s);
    }
    cmd.args(extra_args);
    let mut proc = Proc::spawn("echo_worker(debug log)", cmd);
    let line = proc
        .wait_stdout(
            "echo_worker's registered line",
            e2e_tests::START_TIMEOUT,
            |l| serde_json::from_str::<Value>(l).is_ok_and(|v| v["event"] == "registered"),
        )
        .await;
    // Invariant: the predicate above only accepts JSON lines.
    let v: Value = serde_json::from_str(&line).expect("matched line is JSON");
    WorkerProc {
        proc,
        worker_id: v["worker_id"].as_str().unwrap_or_default().to_owned(),
        services: services.iter().map(|s| (*s).to_owned()).collect(),
    }
}

/// Correlation ids of every request a worker started with
/// [`echo_worker_logged`] has logged (its request span carries `correlation.id=`).
pub fn seen_correlation_ids(worker: &WorkerProc) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in worker.proc.stderr.lines() {
        let mut rest = line.as_str();
        while let Some(at) = rest.find("correlation.id=") {
            rest = &rest[at + "correlation.id=".len()..];
            let id: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect();
            if !id.is_empty() {
                out.insert(id);
            }
        }
    }
    out
}

/// Waits (bounded) until the worker has logged every id in `expected`, then
/// returns everything it has logged.
pub async fn wait_seen(
    worker: &WorkerProc,
    expected: &BTreeSet<String>,
    timeout: Duration,
) -> BTreeSet<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = seen_correlation_ids(worker);
        if expected.is_subset(&seen) {
            return seen;
        }
        if Instant::now() >= deadline {
            panic!(
                "the worker never logged correlation ids {:?} within {timeout:?}; it logged {seen:?}",
                expected.difference(&seen).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `breaker` field of route `path` in `/routes`.
pub async fn breaker_state(addr: SocketAddr, path: &str) -> String {
    route_field(addr, path, "breaker")
        .await
        .as_str()
        .unwrap_or_else(|| panic!("/routes: route {path} has no string `breaker`"))
        .to_owned()
}

/// Field `field` of route `path` in `/routes`.
pub async fn route_field(addr: SocketAddr, path: &str, field: &str) -> Value {
    let all = routes(addr)
        .await
        .unwrap_or_else(|e| panic!("GET /routes failed: {e}"));
    let r = all
        .iter()
        .find(|r| r.path == path)
        .unwrap_or_else(|| panic!("/routes has no route {path}"));
    r.raw[field].clone()
}

/// Polls `/routes` (bounded) until field `field` of route `path` satisfies `pred`.
pub async fn wait_route_field(
    addr: SocketAddr,
    path: &str,
    field: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let v = route_field(addr, path, field).await;
        if pred(&v) {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("/routes: {path}.{field} is still {v} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A WebSocket upgrade attempt with extra headers, on a fresh TCP
/// connection, returning the router's answer as is: `101` (the body is then
/// empty) or a refusal with its JSON body.
pub async fn try_upgrade(
    addr: SocketAddr,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    try_upgrade_from(None, addr, path_and_query, headers).await
}

/// [`try_upgrade`] from a chosen local address (e.g. `127.0.0.2`, which
/// Linux routes over loopback like `127.0.0.1`), to look like another client IP.
pub async fn try_upgrade_from(
    source: Option<IpAddr>,
    addr: SocketAddr,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    let attempt = upgrade_inner(source, addr, path_and_query, headers);
    match tokio::time::timeout(IO_TIMEOUT, attempt).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("upgrade attempt on {path_and_query}: {e}"),
        Err(_) => panic!("upgrade attempt on {path_and_query} timed out after {IO_TIMEOUT:?}"),
    }
}

async fn upgrade_inner(
    source: Option<IpAddr>,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<HttpResponse, String> {
    let mut s = match source {
        None => TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?,
        Some(ip) => {
            let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| format!("bind {ip}: {e}"))?;
            socket
                .connect(addr)
                .await
                .map_err(|e| format!("connect from {ip}: {e}"))?
        }
    };
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    // The refusal may come on a kept-alive connection, so the body is read
    // by its Content-Length rather than to the end of the stream.
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let n = s.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err(format!(
                "connection closed before the end of the headers: {:?}",
                String::from_utf8_lossy(&raw)
            ));
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[head_end + 4..].to_vec();
    if status != 101 {
        let len: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| format!("HTTP {status} refusal without Content-Length: {head}"))?;
        while body.len() < len {
            let n = s.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err(format!("body cut short at {} of {len} bytes", body.len()));
            }
            body.extend_from_slice(&buf[..n]);
        }
        body.truncate(len);
    } else {
        body.clear();
    }
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Asserts a refused upgrade: `status`, a JSON body with `error == code`,
/// and returns the body.
pub fn assert_refusal(resp: &HttpResponse, status: u16, code: &str) -> Value {
    assert_eq!(
        resp.status, status,
        "expected HTTP {status} ({code}), got {} with body {:?}",
        resp.status, resp.body
    );
    let ct = resp.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("application/json"),
        "refusal {status} is not JSON (content-type {ct:?}): {:?}",
        resp.body
    );
    let v = resp.json();
    assert_eq!(v["error"], code, "refusal body: {v}");
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "refusal without a message: {v}"
    );
    v
}

/// Connects a WebSocket with extra request headers; the handshake error
/// is returned as is.
pub async fn connect_with(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(Ws, UpgradeResponse), tungstenite::Error> {
    let mut req = url.into_client_request()?;
    for (k, v) in headers {
        let name = HeaderName::from_bytes(k.as_bytes())
            .unwrap_or_else(|e| panic!("bad header name {k:?}: {e}"));
        let value =
            HeaderValue::from_str(v).unwrap_or_else(|e| panic!("bad header value {v:?}: {e}"));
        req.headers_mut().append(name, value);
    }
    match tokio::time::timeout(IO_TIMEOUT, tokio_tungstenite::connect_async(req)).await {
        Ok(r) => r,
        Err(_) => panic!("WebSocket handshake with {url} timed out after {IO_TIMEOUT:?}"),
    }
}

/// What [`read_event`] saw.
#[derive(Debug)]
pub enum Event {
    Json(Value),
    Other(Message),
    /// A close frame (code, reason), or `None` for a close without a code.
    Close(Option<(u16, String)>),
    /// The stream ended or failed without a close frame.
    Ended(String),
}

/// The next data or close event on `ws` (pings and pongs skipped), or
/// `None` when nothing came before `deadline`.
pub async fn read_event(ws: &mut Ws, deadline: Instant) -> Option<Event> {
    loop {
        let next = tokio::time::timeout_at(deadline, ws.next()).await.ok()?;
        return Some(match next {
            None => Event::Ended("end of stream".into()),
            Some(Err(e)) => Event::Ended(e.to_string()),
            Some(Ok(Message::Text(t))) => match serde_json::from_str(t.as_str()) {
                Ok(v) => Event::Json(v),
                Err(_) => Event::Other(Message::Text(t)),
            },
            Some(Ok(Message::Close(c))) => {
                Event::Close(c.map(|c| (u16::from(c.code), c.reason.as_str().to_owned())))
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(m)) => Event::Other(m),
        });
    }
}

/// The next JSON frame on `ws`; panics on anything else or on timeout.
pub async fn next_json(ws: &mut Ws, what: &str) -> Value {
    match read_event(ws, Instant::now() + IO_TIMEOUT).await {
        Some(Event::Json(v)) => v,
        other => panic!("expected {what} (a JSON frame), got {other:?}"),
    }
}

/// Sends a JSON frame on `ws`.
pub async fn send_json(ws: &mut Ws, v: &Value) {
    if let Err(e) = ws.send(Message::text(v.to_string())).await {
        panic!("send failed: {e}");
    }
}

/// Reads until a close frame or the end of the stream (bounded); frames
/// before it are returned too.
pub async fn read_until_closed(ws: &mut Ws, timeout: Duration) -> (Vec<Event>, Event) {
    let deadline = Instant::now() + timeout;
    let mut before = Vec::new();
    loop {
        match read_event(ws, deadline).await {
            Some(e @ (Event::Close(_) | Event::Ended(_))) => return (before, e),
            Some(e) => before.push(e),
            None => panic!(
                "the connection was not closed within {timeout:?}; frames seen: {}",
                before.len()
            ),
        }
    }
}

/// Resident memory of a process, in KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("cannot list /proc/{pid}/fd: {e}"))
        .count()
}

/// Seconds since the Unix epoch (for token `exp`).
pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
