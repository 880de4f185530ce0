/**
 * The request table: every request, stream and internal exchange (ping,
 * subscribe, cancel) that waits for frames, filed under its id.
 *
 * What must stay true: an entry leaves the table exactly once, either when its
 * terminal frame (`done: true`) arrives or through `onLost`, so each caller
 * gets exactly one outcome. Entries of requests the caller gave up on
 * (`abandoned`) stay until the router ends them, so a resumed session can
 * still cancel them.
 */

import type { Frame, Id } from './frames.js';
import type { RouterError } from './errors.js';

export interface Entry {
  id: Id;
  key: string;
  /** The encoded request, for a re-send after a resume. */
  payload: string;
  bytes: number;
  /** Handed to a socket (it may still have been lost on the way). */
  sent: boolean;
  /** A frame for it arrived: it certainly reached the router. */
  replied: boolean;
  /** Re-send it after a resume if the router never saw it (user requests; not pings, cancels, subscribes). */
  resend: boolean;
  /** The caller gave up; the router may still be running it. */
  abandoned: boolean;
  /** Belongs to one socket (pings, cancels): ends when it drops, never carried over by a resume. */
  volatile: boolean;
  /** Each frame for it, in seq order; the table has already removed the entry when `done`. */
  onFrame(frame: Frame): void;
  /** Its outcome can no longer be known (or the client closed). */
  onLost(error: RouterError): void;
}

export class RequestTable {
  private readonly map = new Map<string, Entry>();
  private lastId = 0;

  /** A fresh request id (never reused by this client). */
  nextId(): number {
    return ++this.lastId;
  }

  get size(): number {
    return this.map.size;
  }

  add(e: Entry): void {
    this.map.set(e.key, e);
  }

  get(key: string): Entry | undefined {
    return this.map.get(key);
  }

  delete(key: string): void {
    this.map.delete(key);
  }

  /** Routes a frame with an id to its entry; `false` when no entry waits for it (a late frame of an abandoned or internal exchange). */
  dispatch(frame: Frame & { id: Id }): boolean {
    const key = JSON.stringify(frame.id);
    const e = this.map.get(key);
    if (!e) return false;
    e.replied = true;
    // Error frames are terminal even if a malformed one lacks `done`.
    if (frame.done === true || frame.type === 'error') this.map.delete(key);
    e.onFrame(frame);
    return true;
  }

  /**
   * After a successful resume and its replay: what to do with the entries
   * handed to an earlier connection. Those the router still runs stay (and
   * the abandoned ones among them are to be cancelled again); those it never
   * saw are re-sent; the rest (it saw them, yet neither runs them nor had
   * their end in the replay) are lost.
   */
  afterResume(inFlight: ReadonlySet<string>, lost: RouterError): { resend: Entry[]; cancel: Entry[] } {
    const resend: Entry[] = [];
    const cancel: Entry[] = [];
    for (const e of [...this.map.values()]) {
      if (!e.sent) continue; // still in the offline queue, which sends it
      if (inFlight.has(e.key)) {
        if (e.abandoned) cancel.push(e);
      } else if (e.resend && !e.replied) {
        resend.push(e);
      } else {
        this.map.delete(e.key);
        e.onLost(lost);
      }
    }
    return { resend, cancel };
  }

  /** Ends every entry that `which` selects with `error`. */
  lose(error: RouterError, which: (e: Entry) => boolean = () => true): void {
    for (const e of [...this.map.values()]) {
      if (!which(e)) continue;
      this.map.delete(e.key);
      e.onLost(error);
    }
  }
}
