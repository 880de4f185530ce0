/**
 * The HTTP fallback's upstream: frames of one SSE connection POSTed to the
 * route, in order (README of this package, "Transports"). Without I/O of its
 * own: `post` does the request.
 *
 * What must stay true:
 * - one POST at a time, so the router takes frames in the order they were
 *   pushed; frames pushed meanwhile (or in the same tick) go together in the
 *   next one, as an array body, within `maxBatchFrames` and
 *   `maxBatchBytes` (a single frame always goes, whatever its size: the
 *   client checks the route's limit before);
 * - every frame has one outcome: taken (`202`), refused by the router
 *   (`reject`, with the router's error: `400`, `413`, or `429` once the
 *   retries are used up), or lost with the connection (`fail`: any other
 *   answer, a network error, or no answer within `timeoutMs`, after which
 *   nothing is posted any more);
 * - an array answered with an error and an `index` was taken up to that
 *   frame; the frames after the refused one are posted again (a `429`
 *   posts the refused one again too, after `Retry-After`); an array refused
 *   without an `index` is posted again one frame per request, so the bad
 *   frame is found and the others go through.
 */

import { utf8Length, type WireError } from './frames.js';

/** What a POST answered. */
export interface PostAnswer {
  status: number;
  /** The JSON body, if it had one. */
  body: unknown;
  /** `Retry-After`, in ms. */
  retryAfterMs?: number | undefined;
}

export interface PosterOptions {
  /** Sends one body; rejects on a network error (or when `signal` aborts). */
  post(body: string, signal: AbortSignal): Promise<PostAnswer>;
  /** A frame the router refused, with its error. */
  reject(frame: string, error: WireError): void;
  /** The POST path is broken: the connection is lost. Called once; nothing is posted after it. */
  fail(reason: string): void;
  maxBatchFrames: number;
  maxBatchBytes: number;
  /** Bound on one POST's answer. */
  timeoutMs: number;
  /** `429`s in a row before the frame is refused (3). */
  maxRetries?: number;
  /** Bytes of frames that may wait (posted or not yet answered); past it `push` refuses. */
  maxBacklogBytes: number;
}

/** The error codes the router gives these statuses when the body has none. */
const CODES: Record<number, string> = { 400: 'bad_request', 413: 'payload_too_large', 429: 'rate_limited' };

export class Poster {
  private pending: string[] = [];
  /** UTF-8 bytes of `pending` and of the POST under way. */
  private bytes = 0;
  /** Frames at the head of `pending` to be posted one per request. */
  private solo = 0;
  private busy = false;
  private scheduled = false;
  private retries = 0;
  private closed = false;
  private readonly controller = new AbortController();
  private timer: ReturnType<typeof setTimeout> | undefined;

  constructor(private readonly o: PosterOptions) {}

  /** Frames pushed and not yet answered (posted or waiting). */
  get backlog(): number {
    return this.pending.length + (this.busy ? 1 : 0);
  }

  /**
   * Queues a frame (encoded JSON); it is posted after every frame pushed
   * before it. `false`: closed, or the backlog would pass `maxBacklogBytes`
   * (the router answers slower than the frames come): not queued.
   */
  push(frame: string): boolean {
    if (this.closed) return false;
    const size = utf8Length(frame);
    if (this.bytes > 0 && this.bytes + size > this.o.maxBacklogBytes) return false;
    this.bytes += size;
    this.pending.push(frame);
    this.kick();
    return true;
  }

  /** Stops: aborts the POST under way; nothing more is posted or reported. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.pending = [];
    this.bytes = 0;
    this.busy = false;
    clearTimeout(this.timer);
    this.controller.abort();
  }

  private kick(): void {
    if (this.busy || this.scheduled || this.closed || this.pending.length === 0) return;
    // A microtask later, so frames pushed in the same tick share the POST.
    this.scheduled = true;
    queueMicrotask(() => {
      this.scheduled = false;
      if (!this.busy && !this.closed && this.pending.length) this.next();
    });
  }

  private next(): void {
    let n = 1;
    let bytes = utf8Length(this.pending[0]!) + 2;
    if (this.solo > 0) this.solo--;
    else {
      while (n < this.pending.length && n < this.o.maxBatchFrames) {
        const b = utf8Length(this.pending[n]!) + 1;
        if (bytes + b > this.o.maxBatchBytes) break;
        bytes += b;
        n++;
      }
    }
    const batch = this.pending.splice(0, n);
    const body = n === 1 ? batch[0]! : `[${batch.join(',')}]`;
    this.busy = true;
    const timeout = setTimeout(() => this.lose(`no answer to a POST within ${this.o.timeoutMs} ms`), this.o.timeoutMs);
    this.o.post(body, this.controller.signal).then(
      (answer) => {
        clearTimeout(timeout);
        if (this.closed) return;
        this.busy = false;
        for (const f of batch) this.bytes -= utf8Length(f);
        this.answered(batch, answer);
        this.kick();
      },
      (e: unknown) => {
        clearTimeout(timeout);
        this.lose(`POST failed: ${e instanceof Error ? e.message : String(e)}`);
      },
    );
  }

  private answered(batch: string[], { status, body, retryAfterMs }: PostAnswer): void {
    if (status >= 200 && status < 300) {
      this.retries = 0;
      return;
    }
    const error = wireError(status, body);
    if (!(status in CODES)) {
      return this.lose(`POST answered ${status}${error.code ? ` ${error.code}` : ''}: ${error.message}`);
    }
    const i = error.index;
    const at = typeof i === 'number' && Number.isInteger(i) && i >= 0 && i < batch.length ? i : batch.length === 1 ? 0 : -1;
    delete error.index;
    if (status === 429) {
      const rest = at < 0 ? batch : batch.slice(at);
      const delay = retryAfterMs ?? (typeof error.retry_after_ms === 'number' ? error.retry_after_ms : 1000);
      if (this.retries++ < (this.o.maxRetries ?? 3)) {
        this.putBack(rest);
        this.busy = true; // holds the queue until the retry
        this.timer = setTimeout(() => {
          this.busy = false;
          this.kick();
        }, Math.min(delay, 30_000));
        return;
      }
      this.retries = 0;
      if (error.retry_after_ms === undefined && retryAfterMs !== undefined) error.retry_after_ms = retryAfterMs;
      for (const f of rest) this.o.reject(f, error);
      return;
    }
    if (at < 0) {
      // Which frame is bad is unknown: each alone finds out.
      this.putBack(batch);
      this.solo = batch.length;
      return;
    }
    this.o.reject(batch[at]!, error);
    this.putBack(batch.slice(at + 1));
  }

  /** Frames answered with "again": back at the head of the queue, in order. */
  private putBack(frames: string[]): void {
    for (const f of frames) this.bytes += utf8Length(f);
    this.pending.unshift(...frames);
  }

  private lose(reason: string): void {
    if (this.closed) return;
    this.close();
    this.o.fail(reason);
  }
}

/** The `error` of an answer's body, or one made from its status. */
function wireError(status: number, body: unknown): WireError {
  const e = (body as { error?: unknown } | null)?.error;
  const out: WireError =
    e !== null && typeof e === 'object' ? { ...(e as WireError) } : { code: '', message: '' };
  if (typeof out.code !== 'string' || !out.code) out.code = CODES[status] ?? 'internal';
  if (typeof out.message !== 'string' || !out.message) out.message = `the router answered the POST with ${status}`;
  out.status = status;
  return out;
}
