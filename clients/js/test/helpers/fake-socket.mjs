// A scripted stand-in for the router's side of a WebSocket, for unit tests of
// the client's state machine without a network: the test opens, feeds frames,
// drops the socket, and reads what the client sent. Everything is
// synchronous, so node:test's mock timers fully control time.

export const WELCOME = {
  session_id: 's1',
  route: '/ws/echo',
  path: '/ws/echo',
  heartbeat_ms: 20000,
  limits: { max_message_bytes: 1 << 20, max_in_flight: 64 },
};

export class FakeSocket {
  /** Every socket the client created, oldest first. */
  static all = [];
  static reset() {
    FakeSocket.all = [];
  }
  static get last() {
    return FakeSocket.all[FakeSocket.all.length - 1];
  }

  readyState = 0;
  binaryType = 'blob';
  sent = [];
  closedByClient = undefined;
  listeners = new Map();

  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    FakeSocket.all.push(this);
  }

  addEventListener(type, l) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(l);
  }
  removeEventListener(type, l) {
    this.listeners.get(type)?.delete(l);
  }
  listenerCount(type) {
    return this.listeners.get(type)?.size ?? 0;
  }
  fire(type, ev) {
    for (const l of [...(this.listeners.get(type) ?? [])]) l(ev);
  }

  // --- what the client calls
  send(data) {
    if (this.readyState !== 1) throw new Error('InvalidStateError: not open');
    this.sent.push(data);
  }
  close(code, reason) {
    if (this.closedByClient) return;
    this.closedByClient = { code, reason };
    this.readyState = 3;
  }

  // --- what the test (the "router") does
  /** Opens the socket and sends the welcome (fields merged over WELCOME). */
  accept(welcome = {}) {
    this.readyState = 1;
    this.fire('open', {});
    this.push({ type: 'welcome', data: { ...WELCOME, ...welcome }, seq: 0 });
  }
  push(frame) {
    this.fire('message', { data: JSON.stringify(frame) });
  }
  pushText(text) {
    this.fire('message', { data: text });
  }
  pushBinary(bytes) {
    this.fire('message', { data: bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) });
  }
  /** The network or the router ends the socket. */
  drop(code = 1006, reason = '') {
    this.readyState = 3;
    this.fire('close', { code, reason });
  }
  /** Text frames the client sent, decoded. */
  frames() {
    return this.sent.filter((s) => typeof s === 'string').map((s) => JSON.parse(s));
  }
  /** Sent frames of one type. */
  framesOf(type) {
    return this.frames().filter((f) => f.type === type);
  }
}

/** An AbortSignal look-alike that counts its listeners (a leak shows as a count above 0). */
export class CountingSignal extends EventTarget {
  aborted = false;
  reason = undefined;
  listeners = 0;
  addEventListener(type, l, o) {
    if (type === 'abort') this.listeners++;
    super.addEventListener(type, l, o);
  }
  removeEventListener(type, l, o) {
    if (type === 'abort') this.listeners--;
    super.removeEventListener(type, l, o);
  }
  abort(reason = new DOMException('This operation was aborted', 'AbortError')) {
    this.aborted = true;
    this.reason = reason;
    this.dispatchEvent(new Event('abort'));
  }
}

/** Lets pending promise callbacks run (mock timers do not run microtasks). */
export async function settle() {
  for (let i = 0; i < 5; i++) await Promise.resolve();
}
