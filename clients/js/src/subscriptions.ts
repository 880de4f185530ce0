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
  /** The handlers that asked for a topic's presence pushes, by topic. */
  private readonly watchers = new Map<string, Set<TopicHandler>>();
  /** Held topics the router sends presence pushes for. */
  private readonly heldWatched = new Set<string>();
  /** Subscriptions in flight that asked for presence. */
  private readonly inFlightWatched = new Set<string>();

  /** Registers a handler; `presence`: it wants the topic's joins and leaves too. */
  add(topic: string, h: TopicHandler, presence = false): void {
    let set = this.handlers.get(topic);
    if (!set) this.handlers.set(topic, (set = new Set()));
    set.add(h);
    if (presence) {
      let w = this.watchers.get(topic);
      if (!w) this.watchers.set(topic, (w = new Set()));
      w.add(h);
    }
  }

  /** Whether the topic's subscription asks for presence pushes. */
  watches(topic: string): boolean {
    return this.watchers.has(topic);
  }

  /** Unregisters a handler. */
  remove(topic: string, h: TopicHandler): void {
    const set = this.handlers.get(topic);
    if (set?.delete(h) && set.size === 0) this.handlers.delete(topic);
    const w = this.watchers.get(topic);
    if (w?.delete(h) && w.size === 0) this.watchers.delete(topic);
  }

  /** Drops every handler of `topic` (the router refused it). */
  drop(topic: string): void {
    this.handlers.delete(topic);
    this.watchers.delete(topic);
  }

  /** Hands a topic frame to its handlers; `false` when none wants it. */
  deliver(frame: Frame): boolean {
    // Presence pushes go to the handlers that asked for them only.
    const by = frame.type === 'presence' ? this.watchers : this.handlers;
    const set = frame.topic === undefined ? undefined : by.get(frame.topic);
    if (!set) return false;
    for (const h of [...set]) call((f: Frame) => h(f.data, f), frame);
    return true;
  }

  /** The operations that bring the session's topics to the wanted ones. */
  plan(): Array<[TopicOp, string]> {
    const out: Array<[TopicOp, string]> = [];
    for (const t of this.handlers.keys()) {
      // Held without presence while a handler wants it: subscribing again
      // (with it) adds the pushes.
      const wanted = !this.held.has(t) || (this.watchers.has(t) && !this.heldWatched.has(t));
      if (wanted && !this.inFlight.has(t)) out.push(['subscribe', t]);
    }
    for (const t of this.held) {
      if (!this.handlers.has(t) && !this.inFlight.has(t)) out.push(['unsubscribe', t]);
    }
    return out;
  }

  /** An operation went out. */
  sent(op: TopicOp, topic: string, presence = false): void {
    this.inFlight.set(topic, op);
    if (presence) this.inFlightWatched.add(topic);
  }

  /** The router answered an operation (`ok`: acknowledged, otherwise refused). */
  answered(op: TopicOp, topic: string, ok: boolean): void {
    this.inFlight.delete(topic);
    const presence = this.inFlightWatched.delete(topic);
    if (!ok) return;
    if (op === 'subscribe') {
      this.held.add(topic);
      if (presence) this.heldWatched.add(topic);
    } else {
      this.held.delete(topic);
      this.heldWatched.delete(topic);
    }
  }

  /** An operation never reached the router (its connection dropped and the session did not have it). */
  unsent(topic: string): void {
    this.inFlight.delete(topic);
    this.inFlightWatched.delete(topic);
  }

  /** The session is new: the router holds nothing for it. */
  reset(): void {
    this.held.clear();
    this.heldWatched.clear();
    this.inFlight.clear();
    this.inFlightWatched.clear();
  }

  /** Topics with handlers. */
  get topics(): string[] {
    return [...this.handlers.keys()];
  }
}
