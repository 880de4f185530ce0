/**
 * Resume bookkeeping (README, "Resume"), without I/O: which session this client
 * belongs to, the token that lets it come back, the highest `seq` it has
 * processed, and when to acknowledge.
 *
 * What must stay true:
 * - every `seq` is processed at most once: {@link Session.accept} refuses
 *   any seq at or below the highest one processed (a replay that repeats
 *   frames, or a frame delivered twice, is dropped);
 * - `last_seq` in a `resume` is exactly that highest processed seq, so the
 *   router replays everything after it and nothing before;
 * - an `ack` never names a seq that was not processed (the router may then
 *   drop the frames up to it for good).
 *
 * `welcome` (seq 0) and `resumed` (no seq) are frames of the connection, not
 * of the session's sequence: the client never passes them to `accept`.
 */

import type { Id, Resumed, Welcome } from './frames.js';

export class Session {
  /** The session this client belongs to (the first welcome's, kept across resumes). */
  id: string | undefined;
  /** The token for the next resume; void once used. */
  token: string | undefined;
  /** The route's resume TTL; 0: resume is off. */
  ttlMs = 0;
  /** Highest seq processed. */
  lastSeq = 0;
  /** Highest seq acknowledged to the router. */
  private ackedSeq = 0;
  /** Frames processed since the last ack. */
  private unacked = 0;

  constructor(private readonly ackEvery: number) {}

  /** Whether a dropped connection may come back as this session. */
  get resumable(): boolean {
    return this.id !== undefined && this.token !== undefined && this.ttlMs > 0;
  }

  /** Starts over as the fresh session a welcome announces. */
  fresh(w: Welcome): void {
    this.id = w.session_id;
    this.token = typeof w.resume_token === 'string' ? w.resume_token : undefined;
    this.ttlMs = typeof w.resume_ttl_ms === 'number' ? w.resume_ttl_ms : 0;
    this.lastSeq = this.ackedSeq = this.unacked = 0;
  }

  /** The first frame of a new connection that wants to be this session again. */
  resumeFrame(id: Id): string {
    return JSON.stringify({
      type: 'resume',
      id,
      data: { session_id: this.id, resume_token: this.token, last_seq: this.lastSeq },
    });
  }

  /**
   * The router took the session back on a new connection, whose welcome is
   * `w` (its TTL applies from now on); the old token is void.
   */
  resumed(r: Resumed, w: Welcome): void {
    this.token = r.resume_token;
    if (typeof r.session_id === 'string') this.id = r.session_id;
    this.ttlMs = typeof w.resume_ttl_ms === 'number' ? w.resume_ttl_ms : this.ttlMs;
  }

  /** Gives the session up: the next connection starts fresh. */
  forget(): void {
    this.id = this.token = undefined;
  }

  /** Whether frame `seq` is new; if so it counts as processed. */
  accept(seq: number): boolean {
    if (seq <= this.lastSeq) return false;
    this.lastSeq = seq;
    this.unacked++;
    return true;
  }

  /** Whether frames were processed since the last ack (and resume is on, so acks mean something). */
  get owesAck(): boolean {
    return this.ttlMs > 0 && this.lastSeq > this.ackedSeq;
  }

  /**
   * The seq to acknowledge now, if any: after every `ackEvery` processed
   * frames, or whatever is owed when `force` (the ack timer) asks.
   */
  ackDue(force: boolean): number | undefined {
    if (!this.owesAck || (!force && this.unacked < this.ackEvery)) return undefined;
    this.unacked = 0;
    return (this.ackedSeq = this.lastSeq);
  }
}
