/**
 * Wire frames of the router's client protocol (README, "Client protocol"):
 * their types, decoding and encoding. Data only: no sockets, no timers.
 *
 * Client → router: `{type, id?, data?}`. Router → client: replies
 * `{type, id, seq, done, data}`, error frames `{type:"error", id?, done:true,
 * error:{code, message, retry_after_ms?}}`, pushes `{type, topic?, data, seq}`,
 * and the connection frames `welcome` (seq 0) and `resumed` (no seq).
 */

/** A request id. The client assigns numbers; the router echoes them as sent. */
export type Id = string | number;

/** The `error` object of an error frame. */
export interface WireError {
  code: string;
  message: string;
  retry_after_ms?: number;
  /** Finer cause, e.g. resume's `expired`, `gap`, `attached`. */
  reason?: string;
  retryable?: boolean;
  [field: string]: unknown;
}

/** Any JSON frame the router sends. */
export interface Frame<T = unknown> {
  type: string;
  id?: Id;
  correlation_id?: string;
  topic?: string;
  data?: T;
  done?: boolean;
  error?: WireError;
  /** Per-session counter; absent on `resumed`. */
  seq?: number;
  [field: string]: unknown;
}

/** A reply to a request: partial (`done: false`) or final (`done: true`). */
/** The answer to `presence` (README of this package, `presence`). */
export interface Presence {
  topic: string;
  count: number;
  clients: Array<{ session_id: string; user?: string; router_id: string }>;
}

export interface Reply<T = unknown> extends Frame<T> {
  id: Id;
  done: boolean;
  data: T;
}

/** `welcome.data`: what the router says about a new connection. */
export interface Welcome {
  session_id: string;
  route: string;
  path: string;
  heartbeat_ms: number;
  limits: { max_message_bytes: number; max_in_flight: number };
  /** Opaque, present when resume is on (README, "Resume"). */
  resume_token?: string;
  /** How long the router keeps a dropped session; 0 or absent: resume is off. */
  resume_ttl_ms?: number;
  [field: string]: unknown;
}

/** `resumed.data`: the answer to a successful `resume`. */
export interface Resumed {
  session_id: string;
  /** The new token; the old one is void. */
  resume_token: string;
  /** How many kept frames follow, with their original seq. */
  replayed: number;
  /** Ids of the session's requests the router is still running. */
  in_flight: Id[];
}

/** Decodes a text frame; `undefined` when it is not a JSON object with a string `type`. */
export function parseFrame(text: string): Frame | undefined {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    return undefined;
  }
  return v !== null && typeof v === 'object' && !Array.isArray(v) && typeof (v as Frame).type === 'string'
    ? (v as Frame)
    : undefined;
}

/**
 * Whether an error frame refuses a request only because its id is already in
 * flight: a second copy of a request that runs, whose original's frames
 * answer it. Over the HTTP fallback a browser may repeat a POST whose answer
 * a dropped connection lost (Chromium does), so such a copy is not the
 * request's outcome. (`reason: "duplicate_id"`, or the router's message.)
 */
export function isDuplicateId(f: Frame): boolean {
  const e = f.error;
  return (
    f.type === 'error' &&
    e?.code === 'bad_request' &&
    (e.reason === 'duplicate_id' || /already in flight/.test(String(e.message)))
  );
}

/** Encodes a client frame; `id` and `data` are left out when undefined. Throws what `JSON.stringify` throws. */
export function encode(type: string, id?: Id, data?: unknown): string {
  return JSON.stringify({ type, id, data });
}

/**
 * The key a request is filed under. JSON text, so the number 7 and the string
 * "7" stay different ids, as they are for the router.
 */
export function idKey(id: Id): string {
  return JSON.stringify(id);
}

/** The UTF-8 length of a string, without encoding it. */
export function utf8Length(s: string): number {
  let n = s.length;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    // Surrogates come in pairs (4 bytes for 2 units): one extra byte each.
    if (c >= 0x80) n += c < 0x800 || (c >= 0xd800 && c <= 0xdfff) ? 1 : 2;
  }
  return n;
}

/** What a client sends as binary. */
export type BinaryData = ArrayBuffer | ArrayBufferView | Blob;

/** The byte size of a text or binary payload. */
export function byteSize(payload: string | BinaryData): number {
  if (typeof payload === 'string') return utf8Length(payload);
  if (typeof Blob !== 'undefined' && payload instanceof Blob) return payload.size;
  return (payload as ArrayBuffer | ArrayBufferView).byteLength;
}
