//! What handlers and handles hand to the socket task: a message already
//! encoded (by the sender, so the socket task only checks and writes), with
//! what the socket task needs to vet it.
//!
//! The frame limit of the router (`welcome.max_frame_bytes`) is checked
//! twice: by the sender, so a push or publication that is too big is refused
//! to its caller with [`SendError::TooLarge`], and by the socket task, which
//! is the authority for replies (it turns an oversize reply into the
//! request's `payload_too_large` terminal error).

use bridge_proto::{codes, encode_from_worker, ErrorReply, FromWorker};
use bytes::Bytes;
use tokio::sync::oneshot;

use crate::error::SendError;

/// The request a reply or error belongs to.
#[derive(Debug)]
pub(crate) struct ForRequest {
    pub(crate) cid: String,
    /// Whether the message ends the request (final reply or error).
    pub(crate) terminal: bool,
}

/// One message on its way to the socket.
#[derive(Debug)]
pub(crate) struct Outgoing {
    /// The message kind, for logs.
    pub(crate) kind: &'static str,
    /// `Some` for replies and errors.
    pub(crate) request: Option<ForRequest>,
    /// The encoded message.
    pub(crate) frame: Bytes,
    /// Told whether the frame went onto the socket of a registered session
    /// (only senders that must know, like the publisher, ask).
    pub(crate) ack: Option<oneshot::Sender<Result<(), SendError>>>,
}

impl Outgoing {
    /// Encodes `msg`.
    pub(crate) fn new(msg: FromWorker) -> Self {
        let frame = Bytes::from(encode_from_worker(&msg));
        let kind = msg.kind();
        let request = match msg {
            FromWorker::Reply(r) => Some(ForRequest {
                cid: r.cid,
                terminal: r.done,
            }),
            FromWorker::Error(e) => Some(ForRequest {
                cid: e.cid,
                terminal: true,
            }),
            _ => None,
        };
        Self {
            kind,
            request,
            frame,
            ack: None,
        }
    }

    /// An already encoded message that belongs to no request (to send the
    /// same frame again).
    pub(crate) fn frame(kind: &'static str, frame: Bytes) -> Self {
        Self {
            kind,
            request: None,
            frame,
            ack: None,
        }
    }

    /// The error when this frame is bigger than `limit` (the router's
    /// `max_frame_bytes`, if it sent one).
    pub(crate) fn over(&self, limit: Option<u64>) -> Option<SendError> {
        let limit = limit?;
        let size = self.frame.len();
        (size as u64 > limit).then_some(SendError::TooLarge { size, limit })
    }

    /// Reports the fate of the frame to a sender that asked.
    pub(crate) fn acknowledge(&mut self, result: Result<(), SendError>) {
        if let Some(ack) = self.ack.take() {
            // The sender may have given up waiting; nothing to tell then.
            let _ = ack.send(result);
        }
    }
}

/// The terminal error that replaces a reply of `size` bytes the router would
/// not accept.
pub(crate) fn too_large_error(cid: String, size: usize, limit: u64) -> FromWorker {
    FromWorker::Error(ErrorReply {
        cid,
        code: codes::PAYLOAD_TOO_LARGE.to_owned(),
        message: format!("reply of {size} bytes exceeds the router's frame limit of {limit} bytes"),
        retryable: false,
        retry_after_ms: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_proto::{Publish, Reply};
    use serde_json::json;

    #[test]
    fn requests_are_recognised_and_sizes_checked() {
        let out = Outgoing::new(FromWorker::Reply(Reply {
            cid: "c1".into(),
            done: false,
            msg_type: None,
            data: json!("x".repeat(100)),
        }));
        let r = out.request.as_ref().expect("a reply belongs to a request");
        assert_eq!((r.cid.as_str(), r.terminal), ("c1", false));
        assert_eq!(out.over(None), None);
        assert_eq!(out.over(Some(out.frame.len() as u64)), None);
        assert_eq!(
            out.over(Some(10)),
            Some(SendError::TooLarge {
                size: out.frame.len(),
                limit: 10
            })
        );

        let out = Outgoing::new(FromWorker::Publish(Publish {
            topic: "t".into(),
            msg_type: "m".into(),
            data: json!(null),
        }));
        assert!(out.request.is_none());
        assert_eq!(out.kind, "publish");
    }

    #[test]
    fn too_large_error_names_both_sizes() {
        match too_large_error("c".into(), 2000, 1000) {
            FromWorker::Error(e) => {
                assert_eq!(e.code, "payload_too_large");
                assert!(!e.retryable);
                assert_eq!(
                    e.message,
                    "reply of 2000 bytes exceeds the router's frame limit of 1000 bytes"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
