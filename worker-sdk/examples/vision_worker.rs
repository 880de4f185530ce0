//! Vision worker (service `vision`): shows the shape of a vision backend.
//! **No model runs here**: every output is a fake, labelled as such.
//!
//! - `request_workspace_analysis` streams progress replies
//!   `{"stage", "progress"}` (4 stages), then a final `{"result": ...}`
//!   describing only the request itself (its JSON kind, keys and size) and
//!   the images this connection has sent.
//! - Binary frames (images) are counted and acknowledged with a push
//!   `{"type": "image_received", "data": {"bytes": N}}`.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use worker_sdk::cli::{self, Example};
use worker_sdk::{Context, HandlerError};

/// Pause between progress stages, so the stream is visible in a browser.
const STAGE_PAUSE: Duration = Duration::from_millis(50);
const STAGES: [&str; 4] = ["received", "inspecting", "describing", "done"];

/// Images received per connection: (count, total bytes).
type Images = Arc<Mutex<HashMap<String, (u64, u64)>>>;

fn main() -> ExitCode {
    cli::run(
        Example {
            name: "vision_worker",
            about: "Example vision worker (fake, labelled analysis; no model)",
            services: &["vision"],
        },
        |builder, _args| {
            let images = Images::default();
            let (for_requests, for_frames, for_disconnects) =
                (images.clone(), images.clone(), images);
            builder
                .on_request("request_workspace_analysis", move |ctx, data| {
                    analyse(ctx, data, for_requests.clone())
                })
                .on_binary(move |ev, data| {
                    let images = for_frames.clone();
                    async move {
                        let bytes = data.len() as u64;
                        if let Ok(mut map) = images.lock() {
                            let entry = map.entry(ev.connection_id().to_owned()).or_default();
                            entry.0 += 1;
                            entry.1 += bytes;
                        }
                        let _ = ev.push("image_received", json!({ "bytes": bytes })).await;
                    }
                })
                .on_disconnect(move |ev, _d| {
                    let images = for_disconnects.clone();
                    async move {
                        if let Ok(mut map) = images.lock() {
                            map.remove(ev.connection_id());
                        }
                    }
                })
        },
    )
}

async fn analyse(ctx: Context, data: Value, images: Images) -> Result<Value, HandlerError> {
    for (i, stage) in STAGES.iter().enumerate() {
        let progress = (i + 1) as f64 / STAGES.len() as f64;
        ctx.send_partial(json!({ "stage": stage, "progress": progress }))
            .await?;
        if i + 1 < STAGES.len() {
            tokio::time::sleep(STAGE_PAUSE).await;
        }
    }
    let (image_count, image_bytes) = images
        .lock()
        .ok()
        .and_then(|map| map.get(ctx.connection_id()).copied())
        .unwrap_or((0, 0));
    let kind = match &data {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    let keys: Vec<&String> = data
        .as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    Ok(json!({
        "result": {
            "fake": true,
            "note": "FAKE analysis from the example vision_worker: no vision model was run; \
                     this only describes the request it received",
            "request": {
                "kind": kind,
                "keys": keys,
                "json_bytes": data.to_string().len(),
            },
            "images_received": { "count": image_count, "bytes": image_bytes },
        }
    }))
}
