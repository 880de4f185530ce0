//! Automation worker (service `automation`): shows the shape of an agent
//! run. **No agent or model runs here**: every step is simulated and says so.
//!
//! `run_task` (request, data `{"task"?, "ask_human"?, "question"?}`) streams
//! partial replies whose message types are the agent frame kinds:
//!
//! 1. `THOUGHT` `{"text"}`, then `ACTION` `{"action", "input", "simulated": true}`;
//! 2. only when `ask_human` is `true` or `question` is a string: a
//!    `HUMAN_INPUT_REQUEST` `{"question", "question_id"}`, after which the run
//!    waits (until its deadline or a cancel) for a `HUMAN_RESPONSE` message
//!    from the same connection, as a request or fire-and-forget, with data
//!    `{"question_id"?, "response"}` (without `question_id` it answers the
//!    oldest open question of the connection);
//! 3. three `STREAM` frames `{"chunk"}`;
//! 4. the final reply, typed `OUTPUT`: `{"result", "human_response", "simulated": true}`.
//!
//! A `HUMAN_RESPONSE` that answers no open question gets `bad_request` (an
//! error frame without `id` when it was sent fire-and-forget). `echo`
//! answers with the request's data unchanged, as in the Python edition.

use std::collections::{HashMap, VecDeque};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::sync::oneshot;
use worker_sdk::cli::{self, Example};
use worker_sdk::{Context, HandlerError, Reply};

/// Open questions a connection may have at once.
const MAX_OPEN_QUESTIONS: usize = 16;

struct Question {
    id: String,
    answer: oneshot::Sender<Value>,
}

/// Open questions per connection, oldest first.
type Questions = Arc<Mutex<HashMap<String, VecDeque<Question>>>>;

fn main() -> ExitCode {
    cli::run(
        Example {
            name: "automation_worker",
            about: "Example agent-style worker (simulated steps; no agent runs)",
            services: &["automation"],
        },
        |builder, _args| {
            let questions = Questions::default();
            let (q1, q2, q3, q4) = (
                questions.clone(),
                questions.clone(),
                questions.clone(),
                questions,
            );
            builder
                .on_request("run_task", move |ctx, data| run_task(ctx, data, q1.clone()))
                .on_request("echo", |_ctx, data| async move { Ok(data) })
                .on_request("HUMAN_RESPONSE", move |ctx, data| {
                    let questions = q2.clone();
                    async move {
                        let id = answer(&questions, ctx.connection_id(), data)?;
                        Ok(json!({ "accepted": true, "question_id": id }))
                    }
                })
                .on_event("HUMAN_RESPONSE", move |ev, data| {
                    let questions = q3.clone();
                    async move {
                        if let Err(e) = answer(&questions, ev.connection_id(), data) {
                            // No reply to carry the error: an error frame without id.
                            tracing::info!(code = %e.code, "HUMAN_RESPONSE event not delivered");
                            let _ = ev.send_error(&e).await;
                        }
                    }
                })
                .on_disconnect(move |ev, _d| {
                    let questions = q4.clone();
                    async move {
                        if let Ok(mut map) = questions.lock() {
                            map.remove(ev.connection_id());
                        }
                    }
                })
        },
    )
}

async fn run_task(ctx: Context, data: Value, questions: Questions) -> Result<Reply, HandlerError> {
    let task = data["task"]
        .as_str()
        .unwrap_or("(no task given)")
        .to_owned();
    ctx.send_partial_typed(
        "THOUGHT",
        json!({ "text": format!("[simulated agent] Planning how to approach: {task}") }),
    )
    .await?;
    ctx.send_partial_typed(
        "ACTION",
        json!({
            "action": "inspect_task",
            "input": { "task_chars": task.chars().count() },
            "simulated": true,
        }),
    )
    .await?;

    let question = match (&data["question"], &data["ask_human"]) {
        (Value::String(q), _) => Some(q.clone()),
        (_, Value::Bool(true)) => Some("May the example agent proceed with this task?".to_owned()),
        _ => None,
    };
    let human_response = match question {
        Some(question) => {
            // Registered before the question goes out, so even an instant
            // answer finds its waiter.
            let id = ctx.correlation_id().to_owned();
            let (tx, rx) = oneshot::channel();
            {
                let mut map = questions
                    .lock()
                    .map_err(|_| HandlerError::worker_error("question table unavailable"))?;
                let open = map.entry(ctx.connection_id().to_owned()).or_default();
                open.retain(|q| !q.answer.is_closed());
                if open.len() >= MAX_OPEN_QUESTIONS {
                    return Err(HandlerError::overloaded(
                        "too many open questions on this connection",
                    ));
                }
                open.push_back(Question {
                    id: id.clone(),
                    answer: tx,
                });
            }
            ctx.send_partial_typed(
                "HUMAN_INPUT_REQUEST",
                json!({ "question": question, "question_id": id }),
            )
            .await?;
            // A cancel or the deadline drops this future; the SDK answers.
            let response = rx
                .await
                .map_err(|_| HandlerError::cancelled("the question was withdrawn"))?;
            ctx.send_partial_typed(
                "THOUGHT",
                json!({ "text": "[simulated agent] Got the human's answer; continuing." }),
            )
            .await?;
            response
        }
        None => Value::Null,
    };

    for (i, chunk) in ["[simulated] Working", " through the task", " step by step."]
        .iter()
        .enumerate()
    {
        ctx.send_partial_typed("STREAM", json!({ "chunk": chunk, "index": i }))
            .await?;
    }
    Ok(Reply::typed(
        "OUTPUT",
        json!({
            "result": format!("[simulated] finished the task: {task}"),
            "human_response": human_response,
            "simulated": true,
        }),
    ))
}

/// Delivers a `HUMAN_RESPONSE` to the question it answers; returns its id.
fn answer(questions: &Questions, conn: &str, data: Value) -> Result<String, HandlerError> {
    let wanted = data["question_id"].as_str().map(str::to_owned);
    let response = data.get("response").cloned().unwrap_or(data);
    let mut map = questions
        .lock()
        .map_err(|_| HandlerError::worker_error("question table unavailable"))?;
    let open = map.get_mut(conn);
    let Some(open) = open else {
        return Err(HandlerError::bad_request(
            "no question is waiting for an answer on this connection",
        ));
    };
    // Questions whose run was cancelled have a closed channel: skip them.
    open.retain(|q| !q.answer.is_closed());
    let position = match &wanted {
        Some(id) => open.iter().position(|q| &q.id == id),
        None => (!open.is_empty()).then_some(0),
    };
    let question = position
        .and_then(|p| open.remove(p))
        .ok_or_else(|| HandlerError::bad_request("no open question matches this HUMAN_RESPONSE"))?;
    if open.is_empty() {
        map.remove(conn);
    }
    let id = question.id;
    question
        .answer
        .send(response)
        .map_err(|_| HandlerError::bad_request("the question was withdrawn"))?;
    Ok(id)
}
