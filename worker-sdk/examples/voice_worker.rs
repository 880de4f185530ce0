//! Voice worker (service `voice`): shows the shape of a streaming speech
//! backend. **No speech recognition runs here**: the "transcripts" only
//! count the audio received, and say so.
//!
//! - `start_session` (request): starts (or restarts) the connection's
//!   session; replies `{"session": "started", ...}`.
//! - Binary frames (audio chunks): each is answered with a push
//!   `{"type": "partial_transcript", "data": {"text", "chunks", "bytes", "stand_in": true}}`.
//!   Chunks sent before `start_session` open a session implicitly.
//! - `end_session` (request): replies with the stand-in final transcript and
//!   forgets the session.
//!
//! Session state lives in this process, which is why the `/ws/voice` route
//! uses connection affinity: every frame of a connection reaches this worker.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use worker_sdk::cli::{self, Example};
use worker_sdk::HandlerError;

#[derive(Debug, Default, Clone, Copy)]
struct Session {
    chunks: u64,
    bytes: u64,
}

impl Session {
    fn stand_in_text(&self) -> String {
        format!(
            "[stand-in transcript: {} audio chunks, {} bytes received; no speech recognition was run]",
            self.chunks, self.bytes
        )
    }
}

type Sessions = Arc<Mutex<HashMap<String, Session>>>;

fn main() -> ExitCode {
    cli::run(
        Example {
            name: "voice_worker",
            about: "Example voice worker (stand-in transcripts; no speech model)",
            services: &["voice"],
        },
        |builder, _args| {
            let sessions = Sessions::default();
            let (s1, s2, s3, s4) = (
                sessions.clone(),
                sessions.clone(),
                sessions.clone(),
                sessions,
            );
            builder
                .on_request("start_session", move |ctx, data| {
                    let sessions = s1.clone();
                    async move {
                        lock(&sessions)?.insert(ctx.connection_id().to_owned(), Session::default());
                        Ok(json!({
                            "session": "started",
                            "format": data.get("format").cloned().unwrap_or(Value::Null),
                            "stand_in": true,
                            "note": "example worker: transcripts only count the audio received",
                        }))
                    }
                })
                .on_request("end_session", move |ctx, _data| {
                    let sessions = s2.clone();
                    async move {
                        let session = lock(&sessions)?
                            .remove(ctx.connection_id())
                            .unwrap_or_default();
                        Ok(json!({
                            "session": "ended",
                            "transcript": session.stand_in_text(),
                            "chunks": session.chunks,
                            "bytes": session.bytes,
                            "stand_in": true,
                        }))
                    }
                })
                .on_binary(move |ev, audio| {
                    let sessions = s3.clone();
                    async move {
                        let session = match lock(&sessions) {
                            Ok(mut map) => {
                                let s = map.entry(ev.connection_id().to_owned()).or_default();
                                s.chunks += 1;
                                s.bytes += audio.len() as u64;
                                *s
                            }
                            Err(_) => return,
                        };
                        let _ = ev
                            .push(
                                "partial_transcript",
                                json!({
                                    "text": session.stand_in_text(),
                                    "chunks": session.chunks,
                                    "bytes": session.bytes,
                                    "stand_in": true,
                                }),
                            )
                            .await;
                    }
                })
                .on_disconnect(move |ev, _d| {
                    let sessions = s4.clone();
                    async move {
                        if let Ok(mut map) = lock(&sessions) {
                            map.remove(ev.connection_id());
                        }
                    }
                })
        },
    )
}

fn lock(
    sessions: &Sessions,
) -> Result<std::sync::MutexGuard<'_, HashMap<String, Session>>, HandlerError> {
    // Poisoned only if a handler panicked while holding it; the counters
    // are still usable but the worker reports the failure honestly.
    sessions
        .lock()
        .map_err(|_| HandlerError::worker_error("session table unavailable"))
}
