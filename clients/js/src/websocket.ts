/**
 * The WebSocket transport: the browser's WebSocket, Node 22's, or one passed
 * in (`options.WebSocket`, e.g. the `ws` package in Node 20). Once
 * {@link WebSocketTransport.close} or `drop` ran, nothing of this socket
 * reaches the client again, whatever it still emits.
 */

import type { BinaryData } from './frames.js';
import type { Transport, TransportEvents } from './transport.js';

/** The part of the WebSocket API this client uses. */
export interface SocketLike {
  readonly readyState: number;
  binaryType: string;
  send(data: string | ArrayBufferLike | ArrayBufferView | Blob): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: string, listener: (event: any) => void): void;
  removeEventListener(type: string, listener: (event: any) => void): void;
}

/** A WebSocket constructor: `globalThis.WebSocket`, or `WebSocket` from the `ws` package. */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => SocketLike;

const OPEN = 1;
const noop = (): void => {};

export class WebSocketTransport implements Transport {
  readonly kind = 'websocket';
  readonly binary = true;
  private readonly ws: SocketLike;
  private live = true;
  /** Blobs (a runtime that ignores binaryType) are read in order. */
  private blobs: Promise<void> = Promise.resolve();
  private readonly listeners: Record<string, (event: any) => void>;

  /** Opens the socket; throws what the constructor throws (a malformed URL). */
  constructor(Ctor: WebSocketConstructor, url: string, protocols: string | string[] | undefined, on: TransportEvents) {
    this.ws = protocols === undefined ? new Ctor(url) : new Ctor(url, protocols);
    this.ws.binaryType = 'arraybuffer';
    this.listeners = {
      open: () => on.open(),
      message: (ev: { data: unknown }) => {
        const d = ev.data;
        if (typeof d === 'string') on.text(d);
        else if (d instanceof ArrayBuffer) on.binary(new Uint8Array(d));
        else if (ArrayBuffer.isView(d)) on.binary(new Uint8Array(d.buffer, d.byteOffset, d.byteLength));
        else if (typeof Blob !== 'undefined' && d instanceof Blob) {
          this.blobs = this.blobs.then(() => d.arrayBuffer()).then((b) => {
            if (this.live) on.binary(new Uint8Array(b));
          });
        }
      },
      close: (ev: { code?: number; reason?: string }) => on.close(ev.code ?? 1006, ev.reason ?? ''),
      // Always followed by close; the `ws` package needs a listener or it throws.
      error: noop,
    };
    for (const [type, l] of Object.entries(this.listeners)) this.ws.addEventListener(type, l);
  }

  /** Sends if the socket is open; `false` means the payload did not leave. */
  send(payload: string | BinaryData): boolean {
    if (!this.live || this.ws.readyState !== OPEN) return false;
    try {
      this.ws.send(payload);
      return true;
    } catch {
      return false;
    }
  }

  /** Stops listening: nothing of this socket reaches the client again (a no-op error listener stays: `ws` throws on an unheard error). */
  private detach(): void {
    if (!this.live) return;
    this.live = false;
    for (const [type, l] of Object.entries(this.listeners)) this.ws.removeEventListener(type, l);
    this.ws.addEventListener('error', noop);
  }

  /** Nothing to do: a WebSocket's frames need no credentials. */
  authorize(): void {}

  /** Closes with a close frame (which ends the session on the router), without waiting. */
  close(code: number, reason: string): void {
    this.detach();
    try {
      this.ws.close(code, reason);
    } catch {
      // Closing a socket that never opened may throw in some runtimes; it is abandoned either way.
    }
  }

  /**
   * Drops the socket without a close frame, so the router parks its session
   * for a resume: `terminate()` where the implementation has it (the `ws`
   * package). A browser WebSocket can only close with a frame; then this
   * only stops listening and returns `false`, and the caller closes it once
   * the session has moved to another connection.
   */
  drop(): boolean {
    this.detach();
    if (this.ws.readyState > OPEN) return true; // closing or closed already
    const terminate = (this.ws as { terminate?: () => void }).terminate;
    if (typeof terminate !== 'function') return false;
    try {
      terminate.call(this.ws);
    } catch {
      // Already gone.
    }
    return true;
  }
}
