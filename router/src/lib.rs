//! # router: the unified WebSocket router
//!
//! Terminates every client WebSocket, matches it to a route of the routes
//! file, and bridges its messages to workers over ZeroMQ (request/reply with
//! correlation ids and streamed replies; pub/sub for topic pushes).
//!
//! # Layout
//! - [`settings`]: process settings (CLI flags and environment variables).
//! - [`config`] and [`routes`]: the routes file (schema, validation) and the
//!   resolved route table with path matching.
//! - [`http`]: the HTTP side: health, readiness, discovery, upgrades, refusals.
//! - [`session`]: one WebSocket session, from welcome to close.
//! - [`sse`]: the HTTP fallback (events down, `POST` up), a session over an
//!   `SseSocket`; [`console`]: the page at `/console`.
//! - [`resume`]: what lets a session outlive its socket: the frames it may
//!   send again, and the lot where dropped sessions wait for their client.
//! - [`client`]: the client protocol's JSON frames (the public API).
//! - [`hub`]: live connections, their bounded outbound queues, topics.
//! - [`broker`]: worker registry, load balancing, credits, deadlines: the
//!   fate of every request. Pure state, driven by the bridge.
//! - [`bridge`]: the only module that touches ZeroMQ sockets.
//! - [`server`]: wiring and the shutdown sequence; [`state`]: shared state.
//! - [`ids`]: correlation and session ids.
//! - [`listener`]: the TCP listener: a handshake deadline per connection,
//!   and a budget of open connections (the oldest idle one makes room).
//! - [`capacity`]: the descriptor budget and the cap on sessions that keep
//!   the router answering health probes when it is full.
//! - [`policy`]: rate limits, circuit breakers, origin and token checks,
//!   and which peers may say who the client is (`TRUSTED_PROXIES`).
//! - [`tls`]: TLS on the client port: the certificate pair that reloads
//!   without a restart; [`watch`]: file changes and SIGHUP, the trigger of
//!   every reload.
//!
//! The binary (`src/main.rs`) only parses settings, sets up logging, loads
//! the routes, binds the listener and calls [`server::run`].

pub mod bridge;
pub mod broker;
pub mod capacity;
pub mod client;
pub mod cluster;
pub mod config;
pub mod console;
pub mod handshake;
pub mod http;
pub mod hub;
pub mod ids;
pub mod listener;
pub mod metrics;
pub mod outbox;
pub mod policy;
pub mod registry;
pub mod reload;
pub mod resume;
pub mod routes;
pub mod server;
pub mod session;
pub mod settings;
pub mod sse;
pub mod state;
mod sync;
pub mod tls;
pub mod watch;
