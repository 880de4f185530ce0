/**
 * Topic subscriptions: the handlers the application registered (the topics it
 * wants) and what the router's session is known to hold, so the client can
 * bring the two together after any reconnect.
 *
 * The session's set counts a topic only once the router acknowledged it
 * (`subscribed`). After a resume, acknowledgements that arrived while the
 * client was away come in the replay, so the set is right again by the time
 * the replay ends; after a fresh session it is empty and every wanted topic
 * is subscribed again. {@link Subscriptions.plan} lists the frames that close
 * the difference; at most one operation per topic is in flight.
 */

import { call } from './emitter.js';
import type { Frame } from './frames.js';

export type TopicHandler<T = unknown> = (data: T, frame: Frame<T>) => void;
export type TopicOp = 'subscribe' | 'unsubscribe';

export class Subscriptions {
  private readonly handlers = new Map<string, Set<TopicHandler>>();
  /** Topics the router's session holds (acknowledged). */
  private readonly held = new Set<string>();
  /** Operations sent and not yet answered, by topic. */
  private readonly inFlight = new Map<string, TopicOp>();

  /** Registers a handler. */
  add(topic: string, h: TopicHandler): void {
    let set = this.handlers.get(topic);
    if (!set) this.handlers.set(topic, (set = new Set()));
    set.add(h);
  }

  /** Unregisters a handler. */
  remove(topic: string, h: TopicHandler): void {
    const set = this.handlers.get(topic);
    if (set?.delete(h) && set.size === 0) this.handlers.delete(topic);
  }

  /** Drops every handler of `topic` (the router refused it). */
  drop(topic: string): void {
    this.handlers.delete(topic);
  }

  /** Hands a topic frame to its handlers; `false` when none wants it. */
  deliver(frame: Frame): boolean {
    const set = frame.topic === undefined ? undefined : this.handlers.get(frame.topic);
    if (!set) return false;
    for (const h of [...set]) call((f: Frame) => h(f.data, f), frame);
    return true;
  }

  /** The operations that bring the session's topics to the wanted ones. */
  plan(): Array<[TopicOp, string]> {
    const out: Array<[TopicOp, string]> = [];
    for (const t of this.handlers.keys()) {
      if (!this.held.has(t) && !this.inFlight.has(t)) out.push(['subscribe', t]);
    }
    for (const t of this.held) {
      if (!this.handlers.has(t) && !this.inFlight.has(t)) out.push(['unsubscribe', t]);
    }
    return out;
  }

  /** An operation went out. */
  sent(op: TopicOp, topic: string): void {
    this.inFlight.set(topic, op);
  }

  /** The router answered an operation (`ok`: acknowledged, otherwise refused). */
  answered(op: TopicOp, topic: string, ok: boolean): void {
    this.inFlight.delete(topic);
    if (!ok) return;
    if (op === 'subscribe') this.held.add(topic);
    else this.held.delete(topic);
  }

  /** An operation never reached the router (its connection dropped and the session did not have it). */
  unsent(topic: string): void {
    this.inFlight.delete(topic);
  }

  /** The session is new: the router holds nothing for it. */
  reset(): void {
    this.held.clear();
    this.inFlight.clear();
  }

  /** Topics with handlers. */
  get topics(): string[] {
    return [...this.handlers.keys()];
  }
}
