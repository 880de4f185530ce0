/**
 * Reconnect delays: exponential backoff with full jitter.
 *
 * Delay n is uniform in [0, min(cap, base · 2ⁿ)) ("full jitter", as in the
 * AWS architecture note on backoff): clients that lose the router at the same
 * moment spread their returns over the whole window instead of arriving in
 * waves. A connection that stayed up for `stableMs` earns a fresh start, so
 * one drop after hours of service is retried within `baseMs`, while a router
 * that accepts and drops at once is approached ever more slowly, up to `capMs`.
 */

export interface BackoffOptions {
  /** Ceiling of the first delay, in ms. */
  baseMs: number;
  /** Largest ceiling, in ms. */
  capMs: number;
  /** A connection up this long resets the attempt count, in ms. */
  stableMs: number;
}

/** The delay before reconnect attempt `attempt` (0-based): uniform in [0, min(cap, base·2^attempt)). */
export function fullJitter(attempt: number, baseMs: number, capMs: number, random: () => number = Math.random): number {
  // 2^31 · base overflows no double, and any cap is reached long before.
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 31));
  return Math.floor(random() * ceiling);
}

/** The attempt counter behind the delays. */
export class Backoff {
  /** Attempts since the last reset. */
  attempt = 0;

  constructor(
    private readonly opts: BackoffOptions,
    private readonly random: () => number = Math.random,
  ) {}

  /** The delay before the next attempt; counts the attempt. */
  next(): number {
    return fullJitter(this.attempt++, this.opts.baseMs, this.opts.capMs, this.random);
  }

  /** Tells how long the connection that just ended was up; a stable one resets the count. */
  ended(upMs: number): void {
    if (upMs >= this.opts.stableMs) this.attempt = 0;
  }
}
