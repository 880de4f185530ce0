//! Handlers as the SDK stores them: type-erased async functions, registered
//! by message type (requests and fire-and-forget events) or by kind
//! (binary, raw, connect, disconnect).
//!
//! Users never name these types: [`WorkerBuilder`](crate::WorkerBuilder)'s
//! `on_*` methods take plain async closures or `async fn`s and box them here.

use std::collections::HashMap;
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
