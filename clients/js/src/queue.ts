/**
 * The offline queue: frames written while no session is ready to take them
 * (connecting, reconnecting, resuming), sent in order once one is.
 *
 * Bounded by count and by bytes. A frame that does not fit is refused, and
 * the caller turns the refusal into a rejection (`request`, `stream`) or a
 * thrown error (`send`): nothing overflows silently.
 */

import type { BinaryData } from './frames.js';

export interface Queued {
  payload: string | BinaryData;
  bytes: number;
  /** The request it carries (its id key), so an abandoned request leaves the queue. */
  key?: string | undefined;
}

export class OfflineQueue {
  private items: Queued[] = [];
  /** Bytes held now. */
  bytes = 0;

  constructor(
    readonly maxLength: number,
    readonly maxBytes: number,
  ) {}

  /** Frames held now. */
  get length(): number {
    return this.items.length;
  }

  /** Appends `item` if it fits both bounds; `false` (and nothing held) otherwise. */
  offer(item: Queued): boolean {
    if (this.items.length >= this.maxLength || this.bytes + item.bytes > this.maxBytes) return false;
    this.items.push(item);
    this.bytes += item.bytes;
    return true;
  }

  /** Removes the frame of request `key`; whether it was there. */
  remove(key: string): boolean {
    const i = this.items.findIndex((q) => q.key === key);
    if (i < 0) return false;
    this.bytes -= this.items[i]!.bytes;
    this.items.splice(i, 1);
    return true;
  }

  /** Puts frames taken by {@link drain} back in front (a flush the socket cut short); they fitted before, so no bound is checked. */
  restore(items: Queued[]): void {
    for (const q of items) this.bytes += q.bytes;
    this.items = items.concat(this.items);
  }

  /** Takes every frame, oldest first, leaving the queue empty. */
  drain(): Queued[] {
    const out = this.items;
    this.items = [];
    this.bytes = 0;
    return out;
  }
}
