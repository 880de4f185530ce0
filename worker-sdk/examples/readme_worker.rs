//! The Rust worker of the README ("Writing a worker"), character for
//! character after this header: `tests/readme.rs` compares the two, and
//! building the examples compiles it, so the README's code always builds.
//! The end-to-end tests run it against the router (`tests/tests/readme.rs`).

use serde_json::{json, Value};
use worker_sdk::{Context, HandlerError, Worker};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    worker_sdk::cli::init_logging(); // to stderr; RUST_LOG, default info
    let worker = Worker::builder()
        .service("chat") // BRIDGE_ENDPOINT defaults to tcp://127.0.0.1:5555
        .capacity(8)
        .on_request("echo", |_ctx, data| async move { Ok(data) }) // the final reply
        .on_request("count", count)
        .build()?;
    worker.run_until_signal().await?; // SIGTERM/SIGINT: a graceful stop
    Ok(())
}

async fn count(ctx: Context, data: Value) -> Result<Value, HandlerError> {
    let Some(n) = data["n"].as_u64() else {
        return Err(HandlerError::bad_request(r#"send {"n": <int>}"#));
    };
    for i in 0..n {
        ctx.send_partial(json!({ "i": i })).await?; // a partial reply (done: false)
    }
    Ok(json!({ "n": n })) // the final reply (done: true)
}
