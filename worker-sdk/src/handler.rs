//! Handlers as the SDK stores them: type-erased async functions, registered
//! by message type (requests and fire-and-forget events) or by kind
//! (binary, raw, connect, disconnect).
//!
//! Users never name these types: [`WorkerBuilder`](crate::WorkerBuilder)'s
//! `on_*` methods take plain async closures or `async fn`s and box them here.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde_json::Value;

use crate::context::{Context, EventContext};
use crate::error::HandlerError;

/// The final (`done: true`) reply of a request.
///
/// A handler returns `Ok(value)` for a reply with the request's own message
/// type, or `Ok(Reply::typed("OUTPUT", value))` to name another type.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub(crate) msg_type: Option<String>,
    pub(crate) data: Value,
}

impl Reply {
    /// A reply with the request's message type.
    pub fn new(data: Value) -> Self {
        Self {
            msg_type: None,
            data,
        }
    }

    /// A reply with its own message type.
    pub fn typed(msg_type: impl Into<String>, data: Value) -> Self {
        Self {
            msg_type: Some(msg_type.into()),
            data,
        }
    }

    /// The reply's message type, when it differs from the request's.
    pub fn msg_type(&self) -> Option<&str> {
        self.msg_type.as_deref()
    }

    /// The reply's data.
    pub fn data(&self) -> &Value {
        &self.data
    }
}

impl From<Value> for Reply {
    fn from(data: Value) -> Self {
        Self::new(data)
    }
}

impl From<()> for Reply {
    /// `Ok(())` from a handler means a final reply with `null` data.
    fn from(_: ()) -> Self {
        Self::new(Value::Null)
    }
}

/// A WebSocket frame of a raw route, passed unchanged in both directions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// `true` for a binary frame, `false` for a text frame.
    pub binary: bool,
    /// The frame's payload (UTF-8 for a text frame).
    pub payload: Bytes,
}

impl Frame {
    /// A text frame.
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            binary: false,
            payload: Bytes::from(text.into()),
        }
    }

    /// A binary frame.
    pub fn binary(data: impl Into<Bytes>) -> Self {
        Self {
            binary: true,
            payload: data.into(),
        }
    }

    /// The payload as text, for a text frame that is valid UTF-8.
    pub fn as_text(&self) -> Option<&str> {
        if self.binary {
            None
        } else {
            std::str::from_utf8(&self.payload).ok()
        }
    }
}

pub(crate) type RequestFn =
    Arc<dyn Fn(Context, Value) -> BoxFuture<'static, Result<Reply, HandlerError>> + Send + Sync>;
pub(crate) type EventFn<T> = Arc<dyn Fn(EventContext, T) -> BoxFuture<'static, ()> + Send + Sync>;

/// Every handler a worker has, looked up by the socket task.
#[derive(Default, Clone)]
pub(crate) struct Handlers {
    pub(crate) requests: HashMap<String, RequestFn>,
    pub(crate) events: HashMap<String, EventFn<Value>>,
    pub(crate) binary: Option<EventFn<Bytes>>,
    pub(crate) raw: Option<EventFn<Frame>>,
    pub(crate) connect: Option<EventFn<bridge_proto::Connect>>,
    pub(crate) disconnect: Option<EventFn<bridge_proto::Disconnect>>,
}

/// Most message types a `hello` may announce (PROTOCOL.md §5, `hello`).
pub(crate) const MAX_MSG_TYPES: usize = 256;
/// Longest message type a client may send, in bytes: a handler for a longer
/// one could never be called.
pub(crate) const MAX_MSG_TYPE_LEN: usize = 128;

impl Handlers {
    /// The message types announced in `hello` (`msg_types`): request and
    /// fire-and-forget types together, sorted, without duplicates.
    pub(crate) fn msg_types(&self) -> Vec<String> {
        let all: BTreeSet<&String> = self.requests.keys().chain(self.events.keys()).collect();
        all.into_iter().cloned().collect()
    }

    /// What is wrong with the registered message types (for `build`).
    pub(crate) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for t in self.msg_types() {
            if t.is_empty() || t.len() > MAX_MSG_TYPE_LEN {
                problems.push(format!(
                    "handler for message type {t:?}: a type is 1 to {MAX_MSG_TYPE_LEN} bytes"
                ));
            }
        }
        let count = self.msg_types().len();
        if count > MAX_MSG_TYPES {
            problems.push(format!(
                "{count} message types have handlers; a worker may announce at most {MAX_MSG_TYPES}"
            ));
        }
        problems
    }

    /// The `unknown_type` error for a request of `msg_type` without a request handler.
    pub(crate) fn no_request_handler(&self, msg_type: &str) -> HandlerError {
        let hint = self
            .events
            .contains_key(msg_type)
            .then_some("is handled as a fire-and-forget message (send it without an `id`)");
        unknown(msg_type, "requests", self.requests.keys(), hint)
    }

    /// The `unknown_type` error for a fire-and-forget message of `msg_type`
    /// without an event handler.
    pub(crate) fn no_event_handler(&self, msg_type: &str) -> HandlerError {
        let hint = self
            .requests
            .contains_key(msg_type)
            .then_some("is handled as a request (send it with an `id`)");
        unknown(
            msg_type,
            "fire-and-forget messages",
            self.events.keys(),
            hint,
        )
    }
}

/// The `unknown_type` error for a binary frame on a worker without a binary handler.
pub(crate) fn no_binary_handler() -> HandlerError {
    HandlerError::new(
        bridge_proto::codes::UNKNOWN_TYPE,
        "this worker has no handler for binary frames",
    )
}

/// The message of every `unknown_type` this SDK sends, word for word the
/// Python SDK's (`bridge_worker.errors`: `no_request_handler`, `no_event_handler`).
fn unknown<'a>(
    msg_type: &str,
    what: &str,
    handled: impl Iterator<Item = &'a String>,
    hint: Option<&str>,
) -> HandlerError {
    let handled: BTreeSet<&String> = handled.collect();
    let list = if handled.is_empty() {
        "none".to_owned()
    } else {
        handled
            .iter()
            .map(|t| format!("`{t}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut message = format!(
        "this worker has no handler for {what} of type `{msg_type}`; {what} it handles: {list}"
    );
    if let Some(hint) = hint {
        message.push_str(&format!("; `{msg_type}` {hint}"));
    }
    HandlerError::new(bridge_proto::codes::UNKNOWN_TYPE, message)
}

/// The `data` of the `push` of type `error` that answers a message without
/// request id (PROTOCOL.md §5, `push`): the client gets an error frame.
pub(crate) fn error_push_data(e: &HandlerError) -> Value {
    serde_json::json!({ "code": e.code, "message": e.message })
}

/// Boxes a request handler; the handler's own reply type is converted here
/// so user code can return `Value`, `Reply` or `()`.
pub(crate) fn request_fn<F, Fut, R>(f: F) -> RequestFn
where
    F: Fn(Context, Value) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, HandlerError>> + Send + 'static,
    R: Into<Reply> + 'static,
{
    Arc::new(move |ctx, data| {
        let fut = f(ctx, data);
        Box::pin(async move { fut.await.map(Into::into) })
    })
}

/// Boxes an event handler (anything that gets no reply).
pub(crate) fn event_fn<T, F, Fut>(f: F) -> EventFn<T>
where
    T: Send + 'static,
    F: Fn(EventContext, T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Arc::new(move |ctx, value| Box::pin(f(ctx, value)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reply_conversions() {
        assert_eq!(Reply::from(json!({"a": 1})), Reply::new(json!({"a": 1})));
        assert_eq!(Reply::from(()).data(), &Value::Null);
        let typed = Reply::typed("OUTPUT", json!(1));
        assert_eq!(typed.msg_type(), Some("OUTPUT"));
        assert_eq!(Reply::new(json!(1)).msg_type(), None);
    }

    fn handlers() -> Handlers {
        let mut h = Handlers::default();
        let req = request_fn(|_ctx, data| async move { Ok::<_, HandlerError>(data) });
        let ev = event_fn(|_ctx, _data: Value| async {});
        h.requests.insert("b".into(), req.clone());
        h.requests.insert("a".into(), req);
        h.events.insert("note".into(), ev.clone());
        h.events.insert("a".into(), ev);
        h
    }

    #[test]
    fn announced_types_are_request_and_event_types_sorted() {
        assert_eq!(handlers().msg_types(), ["a", "b", "note"]);
        assert!(handlers().problems().is_empty());
        let mut long = handlers();
        long.events.insert(
            "t".repeat(MAX_MSG_TYPE_LEN + 1),
            event_fn(|_c, _d: Value| async {}),
        );
        assert_eq!(long.problems().len(), 1, "{:?}", long.problems());
    }

    /// Word for word what the Python SDK says (`tests/test_units.py` checks the same texts).
    #[test]
    fn unknown_type_messages() {
        let h = handlers();
        let cases = [
            (
                h.no_request_handler("x"),
                "this worker has no handler for requests of type `x`; requests it handles: `a`, `b`",
            ),
            (
                h.no_request_handler("note"),
                "this worker has no handler for requests of type `note`; requests it handles: `a`, `b`; \
                 `note` is handled as a fire-and-forget message (send it without an `id`)",
            ),
            (
                h.no_event_handler("b"),
                "this worker has no handler for fire-and-forget messages of type `b`; \
                 fire-and-forget messages it handles: `a`, `note`; `b` is handled as a request (send it with an `id`)",
            ),
            (
                Handlers::default().no_event_handler("x"),
                "this worker has no handler for fire-and-forget messages of type `x`; \
                 fire-and-forget messages it handles: none",
            ),
            (no_binary_handler(), "this worker has no handler for binary frames"),
            (
                HandlerError::unknown_type("x"),
                "this worker has no handler for message type `x`",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(
                (e.code.as_str(), e.message.as_str()),
                ("unknown_type", want)
            );
        }
        assert_eq!(
            error_push_data(&no_binary_handler()),
            json!({"code": "unknown_type", "message": "this worker has no handler for binary frames"})
        );
    }

    #[test]
    fn frames() {
        assert_eq!(Frame::text("hi").as_text(), Some("hi"));
        assert_eq!(Frame::binary(vec![104, 105]).as_text(), None);
        let bad = Frame {
            binary: false,
            payload: Bytes::from_static(&[0xff]),
        };
        assert_eq!(bad.as_text(), None);
    }
}
