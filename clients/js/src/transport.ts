/**
 * What the client needs of a connection to the router, whatever carries it:
 * a WebSocket (websocket.ts) or the HTTP fallback, an event stream down and
 * POSTs up (sse.ts). A transport turns its events into the calls of
 * {@link TransportEvents} and can be abandoned at any moment: once `close`
 * or `drop` ran, nothing of it reaches the client again.
 */

import type { BinaryData } from './frames.js';

/** The transports a client may use (README of this package, "Transports"). */
export type TransportKind = 'websocket' | 'sse';

export interface TransportEvents {
  open(): void;
  text(data: string): void;
  binary(data: Uint8Array): void;
  close(code: number, reason: string): void;
  /** Traffic that carries no frame (the event stream's keep-alive comments): the path is alive. */
  alive(): void;
  /** Something arrived that is not a frame this client can read. */
  malformed(what: string): void;
}

export interface Transport {
  readonly kind: TransportKind;
  /** Whether binary frames can be sent. */
  readonly binary: boolean;
  /** Sends if the connection is up; `false` means the payload did not leave. */
  send(payload: string | BinaryData): boolean;
  /** Closes it (with a close frame where there is one, which ends the session on the router), without waiting. */
  close(code: number, reason: string): void;
  /**
   * Drops it without a close frame, so the router parks its session for a
   * resume; `false` when that is impossible (a browser WebSocket can only
   * close with a frame): it then only stops listening, and the caller closes
   * it once the session has moved elsewhere.
   */
  drop(): boolean;
  /** The session whose frames `send` carries, and the bound of one upload (the HTTP fallback authenticates POSTs so). */
  authorize(sessionId: string, token: string, maxBytes: number): void;
}
