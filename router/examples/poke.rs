//! `poke`: a WebSocket client for a terminal, to try a route by hand. The
//! start script builds it with the router (`target/release/examples/poke`).
//!
//! ```text
//! poke ws://127.0.0.1:8001/ws '{"type":"echo","id":"1","data":"hi"}'
//! ```
//!
//! Connects, sends each message in turn, and prints every frame the router
//! sends (one JSON text per line; binary frames as `<binary N bytes>`) on
//! stdout. After a message with an `id` it waits for that request's final
//! frame (`done: true`), after one without for a quiet half second, then
//! sends the next; it closes after the last. A refused upgrade prints the
//! router's JSON answer. Exit status: 0, or 1 when the connection failed or
//! an error frame arrived.

use std::process::ExitCode;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::time::{timeout_at, Instant};
use tokio_tungstenite::tungstenite::{Error, Message};

/// Longest wait for a request's final frame.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to listen after a message that gets no reply, or after connecting.
const QUIET: Duration = Duration::from_millis(500);

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(url) = args.next().filter(|a| !a.starts_with('-')) else {
        eprintln!("usage: poke <ws://host:port/path> ['<JSON message>' ...]");
        return ExitCode::from(2);
    };
    let messages: Vec<String> = args.collect();
    for m in &messages {
        if let Err(e) = serde_json::from_str::<Value>(m) {
            eprintln!("poke: not JSON: {m}: {e}");
            return ExitCode::from(2);
        }
    }
    match poke(&url, &messages).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("poke: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `Ok(false)`: an error frame arrived.
async fn poke(url: &str, messages: &[String]) -> Result<bool, String> {
    let (mut ws, _) = match tokio_tungstenite::connect_async(url).await {
        Ok(connected) => connected,
        Err(Error::Http(response)) => {
            let body = response.body().as_deref().unwrap_or_default();
            println!("{}", String::from_utf8_lossy(body));
            return Err(format!("upgrade refused: HTTP {}", response.status()));
        }
        Err(e) => return Err(format!("cannot connect to {url}: {e}")),
    };
    let mut clean = true;
    // The welcome (or nothing, on a raw route).
    clean &= listen(&mut ws, None, Instant::now() + QUIET).await?;
    for message in messages {
        ws.send(Message::text(message.clone()))
            .await
            .map_err(|e| format!("send: {e}"))?;
        let id = serde_json::from_str::<Value>(message)
            .ok()
            .and_then(|m| m.get("id").filter(|id| !id.is_null()).cloned());
        let until = Instant::now() + if id.is_some() { REQUEST_TIMEOUT } else { QUIET };
        clean &= listen(&mut ws, id.as_ref(), until).await?;
    }
    let _ = ws.close(None).await;
    Ok(clean)
}

/// Prints frames until the final frame of request `id` (or, without one,
/// until `until`). `Ok(false)`: an error frame was among them.
async fn listen<S>(ws: &mut S, id: Option<&Value>, until: Instant) -> Result<bool, String>
where
    S: StreamExt<Item = Result<Message, Error>> + Unpin,
{
    let mut clean = true;
    loop {
        let frame = match timeout_at(until, ws.next()).await {
            Err(_) if id.is_some() => return Err("no final reply within 30 s".into()),
            Err(_) => return Ok(clean),
            Ok(None) => return Err("the router closed the connection".into()),
            Ok(Some(Err(e))) => return Err(format!("receive: {e}")),
            Ok(Some(Ok(frame))) => frame,
        };
        match frame {
            Message::Text(text) => {
                println!("{text}");
                let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                clean &= v["type"] != "error";
                if id.is_some_and(|id| v["id"] == *id && v["done"] == true) {
                    return Ok(clean);
                }
            }
            Message::Binary(data) => println!("<binary {} bytes>", data.len()),
            Message::Close(close) => {
                let why = close.map_or("no close frame".into(), |c| {
                    format!("{} {}", c.code, c.reason)
                });
                return Err(format!("the router closed the connection: {why}"));
            }
            _ => {}
        }
    }
}
