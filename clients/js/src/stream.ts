/**
 * The async iterator `stream()` returns: the frames of one request in seq
 * order, ending after the frame with `done: true`.
 *
 * Frames wait in a buffer bounded by `highWaterMark` until the consumer takes
 * them; a consumer that falls that far behind ends the stream with
 * `buffer_overflow` (and the request is cancelled) rather than letting memory
 * grow. A router error ends it after the frames before it were taken; an abort
 * ends it at once. Breaking out of `for await` (the iterator's `return`)
 * cancels the request.
 */

import { clientError } from './errors.js';
import type { Id, Reply } from './frames.js';

type Waiter<T> = { resolve(r: IteratorResult<Reply<T>>): void; reject(e: unknown): void };

export class FrameStream<T = unknown> implements AsyncIterableIterator<Reply<T>> {
  /** The request's id (0 when it was refused before it got one). */
  id: Id = 0;
  private buf: Reply<T>[] = [];
  private waiters: Waiter<T>[] = [];
  /** No more frames will be added. */
  private ended = false;
  /** The error to throw once the buffer is taken; cleared once thrown. */
  private error: { e: unknown } | undefined;
  /** Gives the request up (cancels it); set by the client. */
  stop: () => void = () => {};

  constructor(private readonly highWaterMark: number) {}

  /** A frame of the request (the client calls this). */
  push(frame: Reply<T>): void {
    if (this.ended) return;
    if (frame.done) this.ended = true;
    const w = this.waiters.shift();
    if (w) return w.resolve({ value: frame, done: false });
    if (this.buf.length >= this.highWaterMark) {
      this.stop();
      return this.fail(
        clientError('buffer_overflow', `more than ${this.highWaterMark} frames waited for the consumer; the request was cancelled`),
        true,
      );
    }
    this.buf.push(frame);
  }

  /** Ends the stream with an error (the client calls this); `now` skips the frames not yet taken. */
  fail(e: unknown, now = false): void {
    if (this.ended && !now) return;
    this.ended = true;
    if (now) this.buf = [];
    const w = this.waiters.shift();
    if (w && this.buf.length === 0) {
      w.reject(e);
      for (const rest of this.waiters.splice(0)) rest.resolve({ value: undefined, done: true });
    } else {
      this.error = { e };
    }
  }

  next(): Promise<IteratorResult<Reply<T>>> {
    const value = this.buf.shift();
    if (value) return Promise.resolve({ value, done: false });
    if (this.error) {
      const { e } = this.error;
      this.error = undefined;
      return Promise.reject(e);
    }
    if (this.ended) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  /** Stops early (what `break` in `for await` calls): cancels the request if it still runs. */
  return(): Promise<IteratorResult<Reply<T>>> {
    if (!this.ended) {
      this.ended = true;
      this.stop();
    }
    this.buf = [];
    this.error = undefined;
    for (const w of this.waiters.splice(0)) w.resolve({ value: undefined, done: true });
    return Promise.resolve({ value: undefined, done: true });
  }

  [Symbol.asyncIterator](): this {
    return this;
  }
}
