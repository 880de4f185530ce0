//! # bridge-proto: the wire protocol between the router and its workers
//!
//! Data and codec only: no sockets, no runtime, no behaviour. Both sides of the
//! bridge (the router, the Rust worker SDK) and the test suites use these types;
//! the Python SDK implements the same bytes from `PROTOCOL.md` and is checked
//! against the golden vectors in `vectors/`.
//!
//! # Layout
//! - [`messages`]: every message the router sends to a worker ([`ToWorker`]) and
//!   every message a worker sends to the router ([`FromWorker`]), plus the
//!   payload of a topic publication ([`Publication`]).
//! - [`codec`]: MessagePack encoding and decoding of those messages, with the
//!   protocol version checked on every decode.
//! - [`error`]: [`DecodeError`], which names the message kind and field at fault.
//! - [`codes`]: the stable error codes shared with the client protocol.
//! - [`auth`]: the challenge-response proof of the shared secret (version 2).
//!
//! Socket topology (see `PROTOCOL.md` for the byte-level details): the router
//! binds a ZeroMQ ROUTER socket that workers connect DEALER sockets to, and a
//! SUB socket that publishers connect PUB sockets to. Every bridge message is a
//! single ZeroMQ frame holding one MessagePack map.

pub mod auth;
pub mod codec;
pub mod codes;
pub mod error;
pub mod messages;

pub use codec::{
    decode_from_worker, decode_from_worker_versioned, decode_header, decode_publication,
    decode_to_worker, decode_to_worker_versioned, encode_from_worker, encode_from_worker_as,
    encode_publication, encode_request_as, encode_to_worker, encode_to_worker_as,
};
pub use error::DecodeError;
pub use messages::*;

/// The protocol version this crate speaks: the `v` of every message it
/// encodes unless told otherwise (`encode_*_as`).
pub const PROTOCOL_VERSION: u8 = 2;

/// The oldest version the decoders accept. Version 1 differs from 2 only in
/// its handshake (a clear-text secret in `hello` instead of `challenge` and
/// `auth`), so the message bodies are the same; the router still talks to
/// version-1 workers when it has no secret.
pub const MIN_PROTOCOL_VERSION: u8 = 1;
