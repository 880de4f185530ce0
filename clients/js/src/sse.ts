/**
 * The HTTP fallback transport, for networks that let no WebSocket through
 * (README of this package, "Transports"): `GET <route>` with
 * `Accept: text/event-stream` carries the router's frames down, one SSE event
 * each; `POST <route>` carries the client's up (poster.ts), authenticated by
 * the session's id and resume token. `fetch` with a streaming body rather
 * than `EventSource`, so headers can be set and the parsing is ours
 * (sse-parser.ts).
 *
 * Events: `message` (a JSON frame), `binary` (base64), `close`
 * (`{code, reason}`, the last one); comments are keep-alives. POSTs are
 * numbered (`X-Post-Seq`), so that one the browser sends again after a
 * broken connection is taken once; `close` ends the session with a
 * `DELETE` before it lets the stream go. A reconnect
 * that resumes asks for it in the `GET`'s query (`session_id`,
 * `resume_token`, `last_seq`): the stream then starts with the `welcome`,
 * then `resumed` or a `resume_failed` error.
 */

import { parseFrame, type BinaryData } from './frames.js';
import { Poster, type PostAnswer } from './poster.js';
import { SseParser, type SseEvent } from './sse-parser.js';
import type { Transport, TransportEvents } from './transport.js';

/** The `fetch` this transport calls (the global one, or one passed in). */
export type FetchLike = (input: string, init: RequestInit) => Promise<Response>;

export interface SseOptions {
  fetch: FetchLike;
  /** Extra headers of every request (e.g. `Authorization`). */
  headers: Record<string, string>;
  /** Set when this connection should take back an earlier session. */
  resume: { sessionId: string; token: string; lastSeq: number } | undefined;
  /** Bound on each POST's answer. */
  postTimeoutMs: number;
  /** Bytes of frames waiting for their POST's answer, at most (the client's `maxQueueBytes`). */
  maxBacklogBytes: number;
}

/**
 * Characters one event may hold (its `data:` lines, and a line waiting for
 * its end) before the stream is taken as broken: 32 Mi, room for a 16 MiB
 * binary frame in base64.
 */
const MAX_EVENT = 32 << 20;

/** The route's HTTP URL for a `ws://`/`wss://` one (`http://`/`https://` are kept). */
export function httpUrl(url: string): URL {
  const u = new URL(url);
  if (u.protocol === 'ws:') u.protocol = 'http:';
  else if (u.protocol === 'wss:') u.protocol = 'https:';
  else if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new TypeError(`not a ws://, wss://, http:// or https:// URL: ${url}`);
  u.hash = '';
  return u;
}

/** Decodes standard base64 (`atob` exists in browsers and Node ≥ 16). */
function fromBase64(s: string): Uint8Array {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/** The close code for an event stream the router refused with `status`. */
function refusedCode(status: number): number {
  // 400: the route has no event stream (raw, or resume off); 426: the router
  // has no HTTP fallback at all. Both permanent, as a WebSocket's 1002.
  return status === 400 || status === 426 ? 1002 : 1006;
}

export class SseTransport implements Transport {
  readonly kind = 'sse';
  readonly binary = false;
  private live = true;
  private readonly controller = new AbortController();
  private poster: Poster | undefined;
  private readonly postUrl: string;
  /** The session's credentials, once its welcome named them. */
  private auth: Record<string, string> | undefined;
  /** Number of the last POST (`X-Post-Seq`). */
  private posts = 0;

  /** Starts the `GET` at once; throws on a malformed URL. */
  constructor(
    url: string,
    private readonly o: SseOptions,
    private readonly on: TransportEvents,
  ) {
    const u = httpUrl(url);
    const post = new URL(u.href);
    post.search = ''; // POSTs authenticate with the session's token, not the query's
    this.postUrl = post.href;
    const r = o.resume;
    if (r) {
      u.searchParams.set('session_id', r.sessionId);
      u.searchParams.set('resume_token', r.token);
      u.searchParams.set('last_seq', String(r.lastSeq));
    }
    void this.run(u.href);
  }

  send(payload: string | BinaryData): boolean {
    if (!this.live || !this.poster || typeof payload !== 'string') return false;
    return this.poster.push(payload);
  }

  authorize(sessionId: string, token: string, maxBytes: number): void {
    if (!this.live) return;
    this.poster?.close();
    const auth = { 'X-Session-Id': sessionId, 'X-Resume-Token': token };
    this.auth = auth;
    this.poster = new Poster({
      post: (body, signal) => this.post(body, signal, auth),
      reject: (frame, error) => {
        if (!this.live) return;
        // As the router's error frame for it would read on a WebSocket.
        const id = parseFrame(frame)?.id;
        this.on.text(JSON.stringify({ type: 'error', id, done: true, error }));
      },
      fail: (reason) => this.end(1006, reason),
      maxBatchFrames: 64,
      maxBatchBytes: maxBytes,
      maxBacklogBytes: this.o.maxBacklogBytes,
      timeoutMs: this.o.postTimeoutMs,
    });
  }

  /**
   * Ends the session on the router (`DELETE`, as a WebSocket's close frame
   * would), then lets the stream go: aborted first, the stream's end would
   * park the session until its resume TTL.
   */
  close(): void {
    const auth = this.auth;
    if (!this.live || !auth) return this.stop();
    this.live = false;
    this.poster?.close();
    const release = (): void => {
      clearTimeout(timer);
      this.controller.abort();
    };
    const timer = setTimeout(release, this.o.postTimeoutMs);
    this.o
      .fetch(this.postUrl, {
        method: 'DELETE',
        headers: { ...this.o.headers, ...auth },
        keepalive: true,
        signal: AbortSignal.timeout(this.o.postTimeoutMs),
      })
      .then((res) => res.body?.cancel())
      .then(release, release);
  }

  /** An event stream has no close frame: ending it leaves the session parked on the router until its resume TTL. */
  drop(): boolean {
    this.stop();
    return true;
  }

  private stop(): void {
    if (!this.live) return;
    this.live = false;
    this.poster?.close();
    this.controller.abort();
  }

  /** The stream ended or broke: tells the client once. */
  private end(code: number, reason: string): void {
    if (!this.live) return;
    this.stop();
    this.on.close(code, reason);
  }

  private async run(url: string): Promise<void> {
    let res: Response;
    try {
      res = await this.o.fetch(url, {
        headers: { ...this.o.headers, Accept: 'text/event-stream' },
        cache: 'no-store',
        signal: this.controller.signal,
      });
    } catch (e) {
      return this.end(1006, `cannot open the event stream: ${message(e)}`);
    }
    if (!this.live) return void res.body?.cancel().catch(noop);
    const type = res.headers.get('content-type') ?? '';
    if (res.status !== 200 || !/^text\/event-stream/i.test(type) || !res.body) {
      const why = await refusal(res);
      return this.end(refusedCode(res.status), `the event stream was refused: HTTP ${res.status}${why}`);
    }
    this.on.open();
    const parser = new SseParser(
      (e) => this.event(e),
      () => this.live && this.on.alive(),
    );
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (!this.live) return;
        if (done) break;
        parser.feed(decoder.decode(value, { stream: true }));
        if (parser.buffered > MAX_EVENT) return this.end(1009, 'an event of the stream over 32 Mi characters');
      }
    } catch (e) {
      return this.end(1006, `the event stream broke: ${message(e)}`);
    } finally {
      if (!this.live) reader.cancel().catch(noop);
    }
    this.end(1006, 'the event stream ended without a close event');
  }

  private event(e: SseEvent): void {
    if (!this.live) return;
    switch (e.event) {
      case 'message':
        return this.on.text(e.data);
      case 'binary': {
        let bytes: Uint8Array;
        try {
          bytes = fromBase64(e.data);
        } catch {
          return this.on.malformed(`a binary event that is not base64: ${e.data.slice(0, 40)}`);
        }
        return this.on.binary(bytes);
      }
      case 'close': {
        const c = parseClose(e.data);
        return this.end(c.code, c.reason);
      }
      default:
        return this.on.malformed(`an event of unknown type ${JSON.stringify(e.event.slice(0, 40))}`);
    }
  }

  private async post(body: string, signal: AbortSignal, auth: Record<string, string>): Promise<PostAnswer> {
    const res = await this.o.fetch(this.postUrl, {
      method: 'POST',
      headers: {
        ...this.o.headers,
        ...auth,
        'Content-Type': 'application/json',
        'X-Post-Seq': String(++this.posts),
      },
      body,
      signal,
    });
    const text = await res.text();
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch {
      json = undefined;
    }
    const ra = Number(res.headers.get('retry-after'));
    return { status: res.status, body: json, retryAfterMs: res.headers.has('retry-after') && ra >= 0 ? ra * 1000 : undefined };
  }
}

const noop = (): void => {};

function message(e: unknown): string {
  if (e instanceof Error) {
    const cause = (e as { cause?: unknown }).cause;
    return cause instanceof Error ? `${e.message} (${cause.message})` : e.message;
  }
  return String(e);
}

/** `{code, reason}` of a `close` event (1005, no status, when unreadable). */
function parseClose(data: string): { code: number; reason: string } {
  try {
    const v = JSON.parse(data) as { code?: unknown; reason?: unknown };
    return {
      code: typeof v.code === 'number' ? v.code : 1005,
      reason: typeof v.reason === 'string' ? v.reason : '',
    };
  } catch {
    return { code: 1005, reason: '' };
  }
}

/** `: <message>` of a refused request's JSON error body, if it has one. */
async function refusal(res: Response): Promise<string> {
  try {
    const text = (await res.text()).slice(0, 2000);
    const v = JSON.parse(text) as { error?: unknown; message?: unknown };
    const e = v.error;
    const m =
      e && typeof e === 'object'
        ? (e as { message?: unknown }).message
        : typeof v.message === 'string'
          ? v.message
          : typeof e === 'string'
            ? e
            : undefined;
    return typeof m === 'string' ? `: ${m}` : '';
  } catch {
    return '';
  }
}
