//! A minimal HTTP/1.1 GET client for the router's JSON endpoints.
//!
//! The tests only need `GET` with `Connection: close` against loopback, so a
//! few lines over a `TcpStream` replace a full HTTP client dependency. Chunked
//! bodies are decoded because the server is free to use them.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long one GET may take, connect to last byte.
const GET_TIMEOUT: Duration = Duration::from_secs(5);

/// A response: status, headers (names lowercased) and body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The value of a header (first occurrence).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON; panics with the body when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {} body is not JSON ({e}): {:?}",
                self.status, self.body
            )
        })
    }
}

/// `GET path` on `addr`. Errors are strings describing what failed.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<HttpResponse, String> {
    match tokio::time::timeout(GET_TIMEOUT, get_inner(addr, path)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "GET http://{addr}{path} timed out after {GET_TIMEOUT:?}"
        )),
    }
}

async fn get_inner(addr: SocketAddr, path: &str) -> Result<HttpResponse, String> {
    let err = |e: std::io::Error| format!("GET http://{addr}{path}: {e}");
    let mut s = TcpStream::connect(addr).await.map_err(err)?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.map_err(err)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.map_err(err)?;
    parse_response(&raw).map_err(|e| format!("GET http://{addr}{path}: {e}"))
}

/// Parses a whole HTTP/1.1 response (head and body, chunked or not).
pub fn parse(raw: &[u8]) -> Result<HttpResponse, String> {
    parse_response(raw)
}

fn parse_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers in response")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("empty response")?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size_hex = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|e| format!("bad chunk size {size_hex:?}: {e}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// One route of `GET /routes`, as the tests need it.
#[derive(Debug, Clone)]
pub struct RouteInfo {
    pub path: String,
    pub service: String,
    pub live_workers: u64,
    /// `(worker id, in_flight)` per live worker.
    pub workers: Vec<(String, u64)>,
    pub raw: Value,
}

/// `GET /routes`, parsed.
pub async fn routes(addr: SocketAddr) -> Result<Vec<RouteInfo>, String> {
    let resp = http_get(addr, "/routes").await?;
    if resp.status != 200 {
        return Err(format!(
            "GET /routes answered {}: {}",
            resp.status, resp.body
        ));
    }
    let v: Value = serde_json::from_str(&resp.body)
        .map_err(|e| format!("GET /routes body is not JSON ({e}): {}", resp.body))?;
    let list = v["routes"]
        .as_array()
        .ok_or_else(|| format!("GET /routes has no `routes` array: {v}"))?;
    Ok(list
        .iter()
        .map(|r| RouteInfo {
            path: r["path"].as_str().unwrap_or_default().to_owned(),
            service: r["service"].as_str().unwrap_or_default().to_owned(),
            live_workers: r["live_workers"].as_u64().unwrap_or(0),
            workers: r["workers"]
                .as_array()
                .map(|ws| {
                    ws.iter()
                        .map(|w| {
                            (
                                w["id"].as_str().unwrap_or_default().to_owned(),
                                w["in_flight"].as_u64().unwrap_or(0),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
            raw: r.clone(),
        })
        .collect())
}

/// The first route of `service` in `/routes`, if any.
pub async fn service_route(addr: SocketAddr, service: &str) -> Result<Option<RouteInfo>, String> {
    Ok(routes(addr)
        .await?
        .into_iter()
        .find(|r| r.service == service))
}

/// Polls `/routes` (bounded) until `service` has exactly `n` live workers;
/// returns that route. Panics with the last answer on timeout.
pub async fn wait_live_workers(
    addr: SocketAddr,
    service: &str,
    n: u64,
    timeout: Duration,
) -> RouteInfo {
    wait_route(addr, service, timeout, &format!("{n} live workers"), |r| {
        r.live_workers == n && r.workers.len() as u64 == n
    })
    .await
}

/// Polls `/routes` (bounded) until the route of `service` satisfies `pred`.
pub async fn wait_route(
    addr: SocketAddr,
    service: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&RouteInfo) -> bool,
) -> RouteInfo {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match service_route(addr, service).await {
            Ok(Some(r)) if pred(&r) => return r,
            Ok(Some(r)) => r.raw.to_string(),
            Ok(None) => format!("no route with service {service:?}"),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            panic!("service {service:?} never had {what} within {timeout:?}; last /routes: {last}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let r = parse_response(
            b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        )
        .unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.body, "{}");

        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4;x=y\r\n\":1}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.json(), serde_json::json!({"a": 1}));
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_response(b"nonsense").is_err());
        assert!(parse_response(b"HTTP/1.1 abc\r\n\r\n").is_err());
        assert!(dechunk(b"zz\r\n").is_err());
        assert!(dechunk(b"10\r\nshort\r\n").is_err());
    }
}
