/**
 * `connect()`: a {@link Client} that is open, as a promise.
 */

import { Client } from './client.js';
import { abortReason, clientError } from './errors.js';
import type { CallOptions, ClientOptions } from './options.js';

/**
 * Creates a {@link Client} and resolves once it is open. `wait` bounds the
 * wait (reconnect attempts go on meanwhile): at its `timeout` (ms) or its
 * `signal`, the client is closed and the promise rejects (`timeout`, or the
 * signal's reason); it rejects with `closed` if the client closes first.
 * `options.signal`, unlike `wait.signal`, bounds the client's whole life.
 */
export function connect(
  url: string | (() => string | Promise<string>),
  options: ClientOptions = {},
  wait: CallOptions = {},
): Promise<Client> {
  return new Promise((resolve, reject) => {
    const c = new Client(url, options);
    const { timeout, signal } = wait;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const done = (): void => {
      offOpen();
      offState();
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
    };
    const giveUp = (e: unknown): void => {
      done();
      c.close();
      reject(e);
    };
    const onAbort = (): void => giveUp(abortReason(signal!)); // only registered with a signal
    const offOpen = c.on('open', () => {
      done();
      resolve(c);
    });
    const offState = c.on('state', ({ state }) => {
      if (state !== 'closed') return;
      done();
      reject(clientError('closed', 'the client closed before it connected'));
    });
    if (signal?.aborted) return onAbort();
    signal?.addEventListener('abort', onAbort, { once: true });
    if (timeout !== undefined && timeout > 0) {
      timer = setTimeout(() => giveUp(clientError('timeout', `not connected within ${timeout} ms`)), timeout);
    }
  });
}
