/**
 * Client for the unified WebSocket router (README "Client protocol" and "Resume").
 *
 * # Layout
 * - `client.ts`: the `Client` class: the public API, and the socket
 *   lifecycle (dial, welcome, resume, replay, ready, drop, reconnect).
 * - `connect.ts`: `connect()`, a client that is open, as a promise.
 * - `options.ts`: options and their defaults, events, per-call options.
 * - `frames.ts`: wire frames, decoding and encoding.
 * - `errors.ts`: `RouterError` and the client's own error codes.
 * - `backoff.ts`: exponential backoff with full jitter.
 * - `queue.ts`: the bounded offline queue.
 * - `requests.ts`: the request table (one outcome per request).
 * - `session.ts`: resume bookkeeping: session, token, last seq, acks.
 * - `subscriptions.ts`: topic handlers and what the router's session holds.
 * - `stream.ts`: the async iterator of a streamed request.
 * - `transport.ts`: what the client needs of a connection, whatever carries it.
 * - `websocket.ts`: the WebSocket transport (injected or global).
 * - `sse.ts`: the HTTP fallback transport: an event stream down, POSTs up.
 * - `sse-parser.ts`: the `text/event-stream` parser.
 * - `poster.ts`: the fallback's ordered, batched POSTs.
 * - `emitter.ts`: typed events.
 */

export { Client } from './client.js';
export { connect } from './connect.js';
export type {
  CallOptions,
  ClientEvents,
  ClientOptions,
  ClientStats,
  ConnectionState,
  DisconnectInfo,
  OpenInfo,
  RequestOptions,
  StreamOptions,
} from './options.js';
export { RouterError, type ClientErrorCode, type RouterErrorInit } from './errors.js';
export type { BinaryData, Frame, Id, Presence, Reply, Resumed, Welcome, WireError } from './frames.js';
export { fullJitter } from './backoff.js';
export type { FrameStream } from './stream.js';
export type { TopicHandler } from './subscriptions.js';
export type { SocketLike, WebSocketConstructor } from './websocket.js';
export type { TransportKind } from './transport.js';
export type { FetchLike } from './sse.js';
