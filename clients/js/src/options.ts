/**
 * The client's options with their documented defaults, its events and the
 * per-call options: the typed surface of `Client`, apart from its behaviour.
 */

import type { RouterError } from './errors.js';
import type { Frame, Reply, Welcome } from './frames.js';
import type { FetchLike } from './sse.js';
import type { TransportKind } from './transport.js';
import type { WebSocketConstructor } from './websocket.js';

/** `connecting` until the first welcome; `reconnecting` after a drop; `closed` for good. */
export type ConnectionState = 'connecting' | 'open' | 'reconnecting' | 'closed';

/** Why a socket ended. */
export interface DisconnectInfo {
  /** The close code (1006 when the client gave up on the socket: timeouts, a dead network). */
  code: number;
  reason: string;
  /** When the next attempt starts; absent when the client is closed for good. */
  reconnectInMs?: number;
}

export interface OpenInfo {
  /** The new connection's welcome. */
  welcome: Welcome;
  /** What carries it: `websocket`, or `sse` (the HTTP fallback). */
  transport: TransportKind;
  /** Whether the connection took the previous session back (README, "Resume"). */
  resumed: boolean;
  /** Frames the router replayed (0 unless resumed). */
  replayed: number;
  /** Why a resume failed (the connection is then a fresh session). */
  resumeError?: RouterError | undefined;
}

export interface ClientEvents {
  state: { state: ConnectionState; previous: ConnectionState };
  open: OpenInfo;
  close: DisconnectInfo;
  /** Every JSON frame processed, after de-duplication, in seq order. */
  frame: Frame;
  /** Frames without id that no topic subscription took. */
  push: Frame;
  /** Error frames without id (a fire-and-forget message or binary frame that failed), refused subscriptions, unreadable frames. */
  error: RouterError;
  /** Binary frames from the router. */
  binary: Uint8Array;
  /** Each ping's round trip, in ms. */
  latency: number;
}

export interface ClientOptions {
  /**
   * The transports to use, in order of preference (`['websocket', 'sse']`):
   * one that fails before its welcome hands over to the next, and a later
   * one that then reaches a welcome is kept for the client's life.
   * `['sse']` uses only the HTTP fallback (README of this package, "Transports").
   */
  transports?: TransportKind[];
  /** WebSocket implementation where the runtime has none (Node 20: `WebSocket` from the `ws` package). */
  WebSocket?: WebSocketConstructor;
  /** The `fetch` of the HTTP fallback (`globalThis.fetch`). */
  fetch?: FetchLike;
  /** Extra headers of the HTTP fallback's requests, e.g. `Authorization` (a WebSocket cannot carry any). */
  headers?: Record<string, string>;
  /** Subprotocols, e.g. `['bearer', jwt]`. */
  protocols?: string | string[];
  /**
   * Whether to reconnect after a close. Default: yes, except after codes
   * 1000, 1002, 1003, 1007, 1010 and 4000–4999 (a deliberate or permanent end).
   */
  reconnect?: boolean | ((info: DisconnectInfo) => boolean);
  /** First backoff ceiling (500 ms). */
  backoffBaseMs?: number;
  /** Largest backoff ceiling (25 000 ms). */
  backoffCapMs?: number;
  /** A connection up this long resets the backoff (10 000 ms). */
  stableMs?: number;
  /** Bound on socket open → welcome, and on the resume answer and replay (10 000 ms). */
  connectTimeoutMs?: number;
  /** Liveness ping period while open (10 000 ms; 0: off). */
  pingIntervalMs?: number;
  /** With no frame at all this long after a ping, the socket is dead (10 000 ms). */
  pingTimeoutMs?: number;
  /** Offline queue bound, frames (256). */
  maxQueueLength?: number;
  /** Offline queue bound, bytes (1 MiB). */
  maxQueueBytes?: number;
  /** Acknowledge after this many frames (64)... */
  ackEvery?: number;
  /** ...or this long after the first unacknowledged one (1000 ms). */
  ackIntervalMs?: number;
  /** Frames a stream buffers for a slow consumer (1024). */
  highWaterMark?: number;
  /** Try to resume sessions (true). */
  resume?: boolean;
  /** Resumes refused with `attached` (the router has not yet seen the old socket die) retried before starting fresh (3). */
  attachedRetries?: number;
  /** Source of `online`/`offline` events (`globalThis` where it is an EventTarget, e.g. `window`). */
  events?: EventTarget | null;
  /** Closes the client when aborted. */
  signal?: AbortSignal;
  /** Random numbers for the jitter (tests). */
  random?: () => number;
}

export interface CallOptions {
  /** Client-side deadline in ms: the request is cancelled and rejects with `timeout`. */
  timeout?: number;
  /** Aborting cancels the request and rejects with the signal's reason. */
  signal?: AbortSignal;
}

export interface RequestOptions extends CallOptions {
  /** Called with each partial reply (`done: false`). */
  onPartial?: (frame: Reply) => void;
}

export interface StreamOptions extends CallOptions {
  /** Frames buffered for a slow consumer before the stream fails (the client's `highWaterMark`). */
  highWaterMark?: number;
}

export interface ClientStats {
  /** Requests, streams and internal exchanges waiting for frames. */
  pending: number;
  /** Frames in the offline queue, and their bytes. */
  queued: number;
  queuedBytes: number;
  /** Highest seq processed. */
  lastSeq: number;
  /** Frames dropped as already processed. */
  duplicates: number;
}

/** Options with every default filled in. */
export type Resolved = Required<
  Omit<ClientOptions, 'WebSocket' | 'protocols' | 'events' | 'signal' | 'reconnect' | 'transports' | 'fetch' | 'headers'>
> & {
  protocols: string | string[] | undefined;
  reconnect: (info: DisconnectInfo) => boolean;
};

/** Codes after which the default policy stops reconnecting: a deliberate or permanent end. */
function defaultReconnect({ code }: DisconnectInfo): boolean {
  return ![1000, 1002, 1003, 1007, 1010].includes(code) && !(code >= 4000 && code <= 4999);
}

/** Fills in the defaults (the README's option table). */
export function resolve(options: ClientOptions): Resolved {
  const r = options.reconnect ?? true;
  return {
    protocols: options.protocols,
    reconnect: typeof r === 'function' ? r : r ? defaultReconnect : () => false,
    backoffBaseMs: options.backoffBaseMs ?? 500,
    backoffCapMs: options.backoffCapMs ?? 25_000,
    stableMs: options.stableMs ?? 10_000,
    connectTimeoutMs: options.connectTimeoutMs ?? 10_000,
    pingIntervalMs: options.pingIntervalMs ?? 10_000,
    pingTimeoutMs: options.pingTimeoutMs ?? 10_000,
    maxQueueLength: options.maxQueueLength ?? 256,
    maxQueueBytes: options.maxQueueBytes ?? 1 << 20,
    ackEvery: options.ackEvery ?? 64,
    ackIntervalMs: options.ackIntervalMs ?? 1000,
    highWaterMark: options.highWaterMark ?? 1024,
    resume: options.resume ?? true,
    attachedRetries: options.attachedRetries ?? 3,
    random: options.random ?? Math.random,
  };
}
