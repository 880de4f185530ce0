//! Per-route policies that act on live traffic: rate limits, the circuit
//! breaker, origin and token checks, and who the client is behind a
//! trusted proxy ([`forwarded`]). The routes file configures them
//! ([`crate::config`]); [`runtime::RouteRuntime`] holds their live state per route.

pub mod auth;
pub mod breaker;
pub mod forwarded;
pub mod ratelimit;
pub mod runtime;
