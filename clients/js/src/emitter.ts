/**
 * Typed events, and how a throwing application callback is kept from
 * breaking the client: the error is rethrown on a fresh task (as
 * `EventTarget` does), so it surfaces as an uncaught error instead of
 * leaving the client's state half-updated.
 */

/** Calls `fn(value)`; an exception is rethrown asynchronously. */
export function call<T>(fn: (value: T) => void, value: T): void {
  try {
    fn(value);
  } catch (e) {
    setTimeout(() => {
      throw e;
    });
  }
}

export class Emitter<Events> {
  private readonly listeners: { [K in keyof Events]?: Set<(value: Events[K]) => void> } = {};

  /** Adds a listener; returns the function that removes it. */
  on<K extends keyof Events>(event: K, listener: (value: Events[K]) => void): () => void {
    (this.listeners[event] ??= new Set()).add(listener);
    return () => this.off(event, listener);
  }

  /** Removes a listener. */
  off<K extends keyof Events>(event: K, listener: (value: Events[K]) => void): void {
    this.listeners[event]?.delete(listener);
  }

  /** Whether anyone listens to `event`. */
  protected listens<K extends keyof Events>(event: K): boolean {
    return (this.listeners[event]?.size ?? 0) > 0;
  }

  protected emit<K extends keyof Events>(event: K, value: Events[K]): void {
    const set = this.listeners[event];
    if (set) for (const l of [...set]) call(l, value);
  }
}
