//! Decode errors that say which message and which field were at fault.

/// Why a bridge frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The frame is not a MessagePack map with `v` and `kind` fields.
    #[error("not a bridge message (expected a MessagePack map with `v` and `kind`): {0}")]
    Header(String),
    /// The frame speaks a protocol version this implementation does not.
    #[error("unsupported protocol version {found} (this side speaks {supported})")]
    Version { found: u64, supported: u8 },
    /// The `kind` is not one this direction of the bridge knows.
    #[error("unknown message kind {kind:?}")]
    UnknownKind { kind: String },
    /// The kind is known but a field is missing or has the wrong type.
    #[error("invalid `{kind}` message: {detail}")]
    Body { kind: String, detail: String },
}
