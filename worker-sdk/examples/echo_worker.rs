//! Echo worker (default service `echo`): the worker the test suites,
//! benchmarks and the Autobahn conformance run use.
//!
//! | message | data | answer |
//! |---|---|---|
//! | `echo` | anything | final reply with the same data |
//! | `stream` | `{"n": N}` | N partials `{"i": k}` (k = 0..N), then `{"n": N}` |
//! | `slow` | `{"ms": M}` | `{"slept_ms": M}` after M ms (stops when cancelled) |
//! | `fail` | `{"code", "message", "retryable"?}` | that error |
//! | `push` | `{"n": N}` | N pushes `{"type": "push", "data": {"i": k}}`, then `{"pushed": N}` |
//! | `publish` | `{"topic", "data", "type"?}` | publishes, then `{"published": topic}` |
//! | `close` | `{"code"?, "reason"?}` | closes the connection (default 1000) |
//! | `whoami` | — | `{"worker_id": ...}` |
//! | `claims` | — | `{"claims": <the connection's verified token claims or null>, "attempt": n}` |
//! | binary frame | bytes | the same bytes back (`push_binary`) |
//! | raw frame | text or binary | the same frame back, unchanged |

use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value};
use worker_sdk::cli::{self, Example};
use worker_sdk::{Context, HandlerError};

/// Bounds on counts and sleeps a client can ask for.
const MAX_COUNT: u64 = 100_000;
const MAX_SLEEP_MS: u64 = 10 * 60 * 1000;

fn main() -> ExitCode {
    cli::run(
        Example {
            name: "echo_worker",
            about: "Echo worker for tests, benchmarks and conformance runs",
            services: &["echo"],
        },
        |builder, _args| {
            builder
                // These handlers log nothing of their own: no span per
                // request (the SDK's lines still name the request).
                .request_spans(false)
                .on_request("echo", |_ctx, data| async move { Ok(data) })
                .on_request("stream", stream)
                .on_request("slow", slow)
                .on_request("fail", fail)
                .on_request("push", push)
                .on_request("publish", publish)
                .on_request("close", close)
                .on_request("whoami", |ctx, _data| async move {
                    Ok(json!({ "worker_id": ctx.worker().worker_id() }))
                })
                .on_request("claims", |ctx, _data| async move {
                    Ok(json!({ "claims": ctx.claims(), "attempt": ctx.attempt() }))
                })
                // Mutual TLS: a client that presented a certificate is told
                // what the worker saw of it.
                .on_connect(|ev, connect| async move {
                    if let Some(cert) = connect.client_cert {
                        let _ = ev
                            .push("client_cert", json!({ "subject": cert.subject }))
                            .await;
                    }
                })
                .on_binary(|ev, data| async move {
                    let _ = ev.push_binary(data).await;
                })
                .on_raw(|ev, frame| async move {
                    let _ = ev.send_raw(frame).await;
                })
        },
    )
}

fn count(data: &Value, field: &str, max: u64) -> Result<u64, HandlerError> {
    match data.get(field).and_then(Value::as_u64) {
        Some(n) if n <= max => Ok(n),
        _ => Err(HandlerError::bad_request(format!(
            "`{field}` must be an integer from 0 to {max}"
        ))),
    }
}

async fn stream(ctx: Context, data: Value) -> Result<Value, HandlerError> {
    let n = count(&data, "n", MAX_COUNT)?;
    for i in 0..n {
        ctx.send_partial(json!({ "i": i })).await?;
    }
    Ok(json!({ "n": n }))
}

async fn slow(_ctx: Context, data: Value) -> Result<Value, HandlerError> {
    let ms = count(&data, "ms", MAX_SLEEP_MS)?;
    // A cancel drops this future mid-sleep: the SDK answers `cancelled`.
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(json!({ "slept_ms": ms }))
}

async fn fail(_ctx: Context, data: Value) -> Result<Value, HandlerError> {
    let code = data["code"].as_str().unwrap_or("worker_error");
    let message = data["message"].as_str().unwrap_or("failed on request");
    let retryable = data["retryable"].as_bool().unwrap_or(false);
    Err(HandlerError::new(code, message).with_retryable(retryable))
}

async fn push(ctx: Context, data: Value) -> Result<Value, HandlerError> {
    let n = count(&data, "n", MAX_COUNT)?;
    for i in 0..n {
        ctx.push("push", json!({ "i": i })).await?;
    }
    Ok(json!({ "pushed": n }))
}

async fn publish(ctx: Context, data: Value) -> Result<Value, HandlerError> {
    let topic = data["topic"]
        .as_str()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| HandlerError::bad_request("`topic` must be a non-empty string"))?;
    let msg_type = data["type"].as_str().unwrap_or("publication");
    ctx.publish(topic, msg_type, data["data"].clone()).await?;
    Ok(json!({ "published": topic }))
}

async fn close(ctx: Context, data: Value) -> Result<Value, HandlerError> {
    let code = match &data["code"] {
        Value::Null => 1000,
        v => match v.as_u64() {
            Some(c) if c == 1000 || (3000..=4999).contains(&c) => c as u16,
            _ => {
                return Err(HandlerError::bad_request(
                    "`code` must be 1000 or 3000-4999",
                ))
            }
        },
    };
    let reason = data["reason"].as_str().unwrap_or("closed by the worker");
    ctx.close(code, reason).await?;
    // The router drops this reply if the close won the race; it still frees
    // the request's credit.
    Ok(json!({ "closing": code }))
}
