/**
 * Errors: the one error type a request, a stream or `send` fails with, and
 * the codes the client adds to the router's own.
 *
 * Every failure that is not the caller's abort is a {@link RouterError}, so a
 * caller branches on `code` and `retryable` and never parses messages.
 */

import type { WireError } from './frames.js';

/**
 * Codes the client itself produces (the router's are listed in its README:
 * `bad_request`, `unknown_type`, `rate_limited`, `timeout`, ...).
 *
 * - `connection_lost`: the connection dropped and the request's outcome can
 *   no longer be known (resume was off, failed, or expired); `reason` says
 *   which. Retryable.
 * - `closed`: the client was closed (by `close()`, its signal, or a close
 *   code that ends reconnecting). Not retryable.
 * - `queue_full`: the offline queue is at its bound (count or bytes). Retryable.
 * - `timeout` (with `source: "client"`): the request's own `timeout` passed.
 * - `payload_too_large` (with `source: "client"`): bigger than the route's
 *   `max_message_bytes`, refused before sending.
 * - `buffer_overflow`: a stream's consumer fell behind its `highWaterMark`.
 * - `protocol_error`: the router sent something this client cannot read.
 * - `not_supported`: not possible on this transport (a binary frame over the
 *   HTTP fallback), or the route has no HTTP fallback. Not retryable.
 */
export type ClientErrorCode =
  | 'connection_lost'
  | 'closed'
  | 'queue_full'
  | 'timeout'
  | 'payload_too_large'
  | 'buffer_overflow'
  | 'protocol_error'
  | 'not_supported';

/** Router codes that mean "the same request may succeed later". */
const RETRYABLE = ['rate_limited', 'circuit_open', 'no_workers', 'overloaded', 'timeout', 'connection_lost', 'queue_full'];

export interface RouterErrorInit {
  code: string;
  message: string;
  retryAfterMs?: number | undefined;
  retryable?: boolean | undefined;
  reason?: string | undefined;
  source?: 'router' | 'client';
  details?: Record<string, unknown> | undefined;
}

/** A failure reported by the router (an error frame) or by the client (see {@link ClientErrorCode}). */
export class RouterError extends Error {
  /** `error.code` of the router's frame, or a {@link ClientErrorCode}. */
  readonly code: string;
  /** The router's `retry_after_ms`, when it gave one. */
  readonly retryAfterMs: number | undefined;
  /** Whether the same request may succeed if sent again (later). */
  readonly retryable: boolean;
  /** A finer cause: the router's `error.reason` (e.g. resume's `expired`), or the client's. */
  readonly reason: string | undefined;
  /** Who decided: the router (an error frame) or this client. */
  readonly source: 'router' | 'client';
  /** The router's whole `error` object, extra fields included. */
  readonly details: Record<string, unknown> | undefined;

  constructor(init: RouterErrorInit) {
    super(init.message);
    this.name = 'RouterError';
    this.code = init.code;
    this.retryAfterMs = init.retryAfterMs;
    this.reason = init.reason;
    this.source = init.source ?? 'client';
    this.details = init.details;
    this.retryable = init.retryable ?? (init.retryAfterMs !== undefined || RETRYABLE.includes(init.code));
  }

  /** The error carried by a router error frame (tolerant of missing fields). */
  static fromWire(error: WireError | undefined): RouterError {
    const e = error ?? ({} as WireError);
    return new RouterError({
      code: typeof e.code === 'string' ? e.code : 'internal',
      message: typeof e.message === 'string' ? e.message : 'error frame without a message',
      retryAfterMs: typeof e.retry_after_ms === 'number' ? e.retry_after_ms : undefined,
      retryable: typeof e.retryable === 'boolean' ? e.retryable : undefined,
      reason: typeof e.reason === 'string' ? e.reason : undefined,
      source: 'router',
      details: e as Record<string, unknown>,
    });
  }
}

/** A client-side error with `code` and a `reason`. */
export function clientError(code: ClientErrorCode, message: string, reason?: string): RouterError {
  return new RouterError({ code, message, reason });
}

/** What an aborted call rejects with: the signal's reason, like `fetch` (an `AbortError` DOMException unless the caller chose one). */
export function abortReason(signal: AbortSignal): unknown {
  return signal.reason ?? new DOMException('This operation was aborted', 'AbortError');
}
