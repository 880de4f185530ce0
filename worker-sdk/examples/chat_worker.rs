//! Chat worker (service `chat`, the `/ws` route): rooms are topics.
//!
//! | message | data | effect | final reply |
//! |---|---|---|---|
//! | `echo` | anything | — | the same data |
//! | `join` | `{"room"}` | subscribes the connection to `room:<room>` | `{"joined", "topic"}` |
//! | `leave` | `{"room"}` | unsubscribes it | `{"left", "topic"}` |
//! | `say` | `{"room", "text"}` | publishes `{"type": "message", "data": {"room", "text", "from"}}` to `room:<room>` | `{"said", "topic"}` |
//!
//! `join`, `leave` and `say` also work fire-and-forget (without an `id`); one
//! that fails then gets an error frame without `id`.
//! Publications go over the worker's own socket, so a `join` followed by a
//! `say` from the same worker reaches the router in that order.

use std::process::ExitCode;

use serde_json::{json, Value};
use tracing::info;
use worker_sdk::cli::{self, Example};
use worker_sdk::{HandlerError, WorkerHandle};

const MAX_ROOM_LEN: usize = 128;
const MAX_TEXT_BYTES: usize = 16 * 1024;

fn main() -> ExitCode {
    cli::run(
        Example {
            name: "chat_worker",
            about: "Chat rooms as topics, plus echo",
            services: &["chat"],
        },
        |mut builder, _args| {
            builder = builder.on_request("echo", |_ctx, data| async move { Ok(data) });
            for (msg_type, action) in [("join", join as Action), ("leave", leave), ("say", say)] {
                builder = builder
                    .on_request(msg_type, move |ctx, data| async move {
                        action(ctx.worker().clone(), ctx.connection_id().to_owned(), data).await
                    })
                    .on_event(msg_type, move |ev, data| async move {
                        let conn = ev.connection_id().to_owned();
                        if let Err(e) = action(ev.worker().clone(), conn, data).await {
                            // No reply to carry the error: an error frame without id.
                            info!(msg.type = msg_type, code = %e.code, "fire-and-forget message failed");
                            let _ = ev.send_error(&e).await;
                        }
                    });
            }
            builder
        },
    )
}

type Action = fn(WorkerHandle, String, Value) -> ActionFuture;
type ActionFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Value, HandlerError>> + Send + 'static>,
>;

fn room(data: &Value) -> Result<String, HandlerError> {
    match data["room"].as_str() {
        Some(r) if !r.is_empty() && r.len() <= MAX_ROOM_LEN => Ok(r.to_owned()),
        _ => Err(HandlerError::bad_request(format!(
            "`room` must be a string of 1 to {MAX_ROOM_LEN} bytes"
        ))),
    }
}

fn topic(room: &str) -> String {
    format!("room:{room}")
}

fn join(worker: WorkerHandle, conn: String, data: Value) -> ActionFuture {
    Box::pin(async move {
        let room = room(&data)?;
        worker.subscribe(conn, topic(&room)).await?;
        Ok(json!({ "joined": room, "topic": topic(&room) }))
    })
}

fn leave(worker: WorkerHandle, conn: String, data: Value) -> ActionFuture {
    Box::pin(async move {
        let room = room(&data)?;
        worker.unsubscribe(conn, topic(&room)).await?;
        Ok(json!({ "left": room, "topic": topic(&room) }))
    })
}

fn say(worker: WorkerHandle, conn: String, data: Value) -> ActionFuture {
    Box::pin(async move {
        let room = room(&data)?;
        let text = match data["text"].as_str() {
            Some(t) if t.len() <= MAX_TEXT_BYTES => t.to_owned(),
            _ => {
                return Err(HandlerError::bad_request(format!(
                    "`text` must be a string of at most {MAX_TEXT_BYTES} bytes"
                )))
            }
        };
        let message = json!({ "room": room, "text": text, "from": conn });
        worker.publish(topic(&room), "message", message).await?;
        Ok(json!({ "said": room, "topic": topic(&room) }))
    })
}
