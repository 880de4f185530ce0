/**
 * The client: one logical connection to one route of the router, kept alive
 * across dropped sockets.
 *
 * # Lifecycle of a socket (`phase`)
 * `down` → dial → `opening` (socket up, waiting for `welcome`) → either
 * `resuming` (we hold a resumable session: `resume` is the first frame, the
 * answer decides) → `replaying` (kept frames arrive with their old seq, then
 * what was queued while parked, until the pong of a barrier ping) → `ready`;
 * or straight to `ready` as a fresh session. Any close, a handshake
 * or liveness timeout, goes back to `down` and, unless the close code ends
 * it, a reconnect after a full-jitter backoff.
 *
 * # Transports
 * A socket is a WebSocket or the HTTP fallback (an event stream down, POSTs
 * up), `options.transports` in order of preference. A transport that ends
 * before its welcome (cannot connect, upgrade refused) hands the next
 * attempt, at once, to the next transport in the list; one that reaches a
 * welcome after an earlier one failed is kept for the client's life. On the
 * event stream a resume is asked for in the `GET`'s query, so the stream
 * starts with the welcome and then the resume's answer; POSTs carry the
 * session's id and token (`Transport.authorize`).
 *
 * # What must stay true
 * - Each request gets exactly one outcome: its final frame, a router error,
 *   or `onLost` (see requests.ts); abort and timeout remove their timer and
 *   listener, and the entry goes (sending `cancel` when the router has it).
 * - Outbound frames go out only in `ready`; before that they wait in the
 *   bounded offline queue, and what does not fit is refused to the caller.
 * - Every seq is processed once, in order (session.ts); after a resume,
 *   requests the router never saw are re-sent only once the barrier ping is
 *   answered: until then their final frame may still be on its way, and a
 *   request sent twice would run twice.
 */

import { Backoff } from './backoff.js';
import { call, Emitter } from './emitter.js';
import { abortReason, clientError, RouterError } from './errors.js';
import {
  byteSize,
  encode,
  idKey,
  isDuplicateId,
  parseFrame,
  utf8Length,
  type BinaryData,
  type Frame,
  type Id,
  type Presence,
  type Reply,
  type Resumed,
  type Welcome,
} from './frames.js';
import {
  resolve,
  type CallOptions,
  type ClientEvents,
  type ClientOptions,
  type ClientStats,
  type ConnectionState,
  type DisconnectInfo,
  type RequestOptions,
  type Resolved,
  type StreamOptions,
} from './options.js';
import { OfflineQueue } from './queue.js';
import { RequestTable, type Entry } from './requests.js';
import { Session } from './session.js';
import { FrameStream } from './stream.js';
import { Subscriptions, type TopicHandler } from './subscriptions.js';
import { SseTransport, type FetchLike } from './sse.js';
import type { Transport, TransportEvents, TransportKind } from './transport.js';
import { WebSocketTransport, type WebSocketConstructor } from './websocket.js';

type Phase = 'down' | 'opening' | 'resuming' | 'replaying' | 'ready';
type TimerName = 'reconnect' | 'handshake' | 'ping' | 'pong' | 'ack' | 'expiry' | 'idle';

interface Sink {
  frame(f: Reply): void;
  fail(e: unknown, now?: boolean): void;
}

const noop = (): void => {};

function lostError(message: string, reason: string): RouterError {
  return clientError('connection_lost', message, reason);
}

export class Client extends Emitter<ClientEvents> {
  private _state: ConnectionState = 'connecting';
  private phase: Phase = 'down';
  private sock: Transport | undefined;
  private _welcome: Welcome | undefined;
  private readonly Ctor: WebSocketConstructor | undefined;
  private readonly fetch: FetchLike | undefined;
  /** Extra headers of the HTTP fallback's requests. */
  private readonly headers: Record<string, string>;
  /** The transports still in play, in order of preference. */
  private transports: TransportKind[];
  /** The one the current (or next) attempt uses. */
  private tIndex = 0;
  /** The event stream of this attempt asked for a resume in its query. */
  private sseResume = false;
  private readonly o: Resolved;
  private readonly session: Session;
  private readonly table = new RequestTable();
  private readonly queue: OfflineQueue;
  private readonly subs = new Subscriptions();
  private readonly backoff: Backoff;
  private readonly timers: Partial<Record<TimerName, ReturnType<typeof setTimeout>>> = {};
  /** Removes the `online`/`offline`/abort listeners. */
  private readonly detach: Array<() => void> = [];
  /**
   * Sockets given up without a close frame that could not be dropped (a
   * browser's): closing them would end the session on the router, so they
   * are closed once the session is taken back elsewhere, or given up.
   */
  private lingering: Transport[] = [];
  /** Frames that arrived between welcome and the resume answer. */
  private held: Frame[] = [];
  private resumeKey = '';
  private inFlight: ReadonlySet<string> = new Set();
  private replayed = 0;
  private openedAt = 0;
  private everOpen = false;
  private attachedTries = 0;
  private lastRx = 0;
  /** Bumped whenever a dial is superseded, so a late `url()` answer is ignored. */
  private dialing = 0;
  private _latency: number | undefined;
  private duplicates = 0;

  /**
   * Starts connecting at once. `url` is the route's `ws://` or `wss://` URL,
   * or a function giving it (called before every attempt: a fresh token).
   */
  constructor(
    readonly url: string | (() => string | Promise<string>),
    options: ClientOptions = {},
  ) {
    super();
    this.Ctor = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    const f = options.fetch ?? (globalThis as { fetch?: FetchLike }).fetch;
    // Called as a function, not a method: a browser's fetch wants `this` to be the window.
    this.fetch = f && (options.fetch ? f : (input, init) => (globalThis as unknown as { fetch: FetchLike }).fetch(input, init));
    this.transports = pickTransports(options.transports, !!this.Ctor, !!this.fetch);
    this.headers = { ...options.headers };
    const p = options.protocols;
    if (Array.isArray(p) && p[0] === 'bearer' && p[1] && !Object.keys(this.headers).some((k) => k.toLowerCase() === 'authorization')) {
      this.headers.Authorization = `Bearer ${p[1]}`;
    }
    this.o = resolve(options);
    this.session = new Session(this.o.ackEvery);
    this.queue = new OfflineQueue(this.o.maxQueueLength, this.o.maxQueueBytes);
    this.backoff = new Backoff(
      { baseMs: this.o.backoffBaseMs, capMs: this.o.backoffCapMs, stableMs: this.o.stableMs },
      this.o.random,
    );

    const events =
      options.events !== undefined
        ? options.events
        : typeof (globalThis as Partial<EventTarget>).addEventListener === 'function'
          ? (globalThis as unknown as EventTarget)
          : null;
    if (events) {
      const online = (): void => {
        if (this.timers.reconnect !== undefined) this.dial();
        else this.probe();
      };
      const offline = (): void => this.probe();
      events.addEventListener('online', online);
      events.addEventListener('offline', offline);
      this.detach.push(() => {
        events.removeEventListener('online', online);
        events.removeEventListener('offline', offline);
      });
    }
    const signal = options.signal;
    if (signal) {
      const abort = (): void => this.close(1000, 'aborted');
      if (signal.aborted) queueMicrotask(abort);
      else {
        signal.addEventListener('abort', abort, { once: true });
        this.detach.push(() => signal.removeEventListener('abort', abort));
      }
    }
    this.dial();
  }

  // ---------------------------------------------------------------- public API

  get state(): ConnectionState {
    return this._state;
  }

  /** The last ping round trip in ms (undefined before the first pong). */
  get latency(): number | undefined {
    return this._latency;
  }

  /** The session this client belongs to (kept across resumes). */
  get sessionId(): string | undefined {
    return this.session.id;
  }

  /** The current connection's welcome. */
  get welcome(): Welcome | undefined {
    return this._welcome;
  }

  /** The transport of the current connection (or of the next attempt while there is none). */
  get transport(): TransportKind {
    return this.transports[this.tIndex]!;
  }

  get stats(): ClientStats {
    return {
      pending: this.table.size,
      queued: this.queue.length,
      queuedBytes: this.queue.bytes,
      lastSeq: this.session.lastSeq,
      duplicates: this.duplicates,
    };
  }

  /**
   * Sends a request; resolves with its final reply (`done: true`), rejects
   * with a {@link RouterError} (the router's error frame, or a client code),
   * or with the signal's reason when aborted.
   */
  request<T = unknown>(type: string, data?: unknown, options: RequestOptions = {}): Promise<Reply<T>> {
    return new Promise((resolve, reject) => {
      const partial = options.onPartial;
      this.start(type, data, options, {
        frame: (f) => (f.done ? resolve(f as Reply<T>) : partial && call(partial, f)),
        fail: reject,
      });
    });
  }

  /**
   * Sends a request and iterates its frames, partial ones and the final one,
   * then ends. Aborting (or leaving the loop early) sends `cancel`; the
   * iterator then throws the abort reason.
   */
  stream<T = unknown>(type: string, data?: unknown, options: StreamOptions = {}): FrameStream<T> {
    const s = new FrameStream<T>(options.highWaterMark ?? this.o.highWaterMark);
    const handle = this.start(type, data, options, {
      frame: (f) => s.push(f as Reply<T>),
      fail: (e, now) => s.fail(e, now),
    });
    if (handle) {
      s.id = handle.id;
      s.stop = handle.stop;
    }
    return s;
  }

  /**
   * Fire-and-forget. Throws a {@link RouterError} when the client is closed,
   * the frame is over the route's size limit, or it must wait offline and the
   * queue is full. A router-side failure arrives as an `error` event.
   */
  send(type: string, data?: unknown): void {
    this.post(encode(type, undefined, data));
  }

  /**
   * Sends a binary frame (fire-and-forget, as {@link send}). Throws
   * `not_supported` on the HTTP fallback (SSE), which cannot carry them up.
   */
  sendBinary(data: BinaryData): void {
    if (this._state !== 'closed' && this.transport === 'sse') {
      throw clientError('not_supported', 'binary frames cannot be sent over the HTTP fallback (SSE); this client is on it');
    }
    this.post(data);
  }

  /**
   * Calls `handler` with each frame published to `topic`; subscribes the
   * session now, and again after every reconnect that starts a fresh
   * session. With `presence: true` the handler also gets the topic's
   * `presence` pushes (`frame.type === 'presence'`, `data.event` `join` or
   * `leave`). Returns the function that unsubscribes this handler.
   */
  subscribe<T = unknown>(topic: string, handler: TopicHandler<T>, options: { presence?: boolean } = {}): () => void {
    if (this._state === 'closed') return noop;
    const h = handler as TopicHandler;
    this.subs.add(topic, h, options.presence === true);
    this.syncTopics();
    return () => {
      this.subs.remove(topic, h);
      this.syncTopics();
    };
  }

  /** Who is subscribed to `topic`, on every router of a cluster: `{topic, count, clients: [{session_id, user?, router_id}]}`. */
  async presence(topic: string, options: RequestOptions = {}): Promise<Presence> {
    return (await this.request<Presence>('presence', { topic }, options)).data;
  }

  /** Measures a round trip now (also updates `latency`); rejects when not open. */
  ping(): Promise<number> {
    return new Promise((resolve, reject) => {
      if (!this.sendPing(resolve, reject)) reject(lostError('not connected', 'not_connected'));
    });
  }

  /** Drops the current socket and reconnects now (resuming the session when possible). */
  reconnect(): void {
    if (this._state === 'closed') return;
    if (this.sock || this.phase !== 'down') this.lost(1006, 'reconnect() called', true);
    else this.dial();
  }

  /** Closes for good: pending requests reject with `closed`, the queue is dropped, nothing reconnects. */
  close(code = 1000, reason = ''): void {
    this.shutdown(clientError('closed', 'the client was closed'), code, reason);
  }

  // ---------------------------------------------------------------- sockets

  private dial(): void {
    this.disarm('reconnect');
    const epoch = ++this.dialing;
    this.phase = 'opening';
    this.arm('handshake', this.o.connectTimeoutMs, () => this.lost(1006, 'no welcome (or resume answer) within connectTimeoutMs'));
    const kind = this.transport;
    const open = (url: string): void => {
      if (epoch !== this.dialing) return;
      let t: Transport | undefined;
      const on: TransportEvents = {
        open: noop,
        text: (s) => this.sock === t && this.onText(s),
        binary: (b) => {
          if (this.sock !== t) return;
          this.lastRx = Date.now();
          this.emit('binary', b);
        },
        close: (code, reason) => this.sock === t && this.lost(code, reason),
        alive: () => {
          if (this.sock === t) this.lastRx = Date.now();
        },
        malformed: (what) => this.sock === t && this.emit('error', clientError('protocol_error', what)),
      };
      try {
        t = kind === 'sse' ? this.openSse(url, on) : new WebSocketTransport(this.Ctor!, url, this.o.protocols, on);
      } catch (e) {
        return this.shutdown(clientError('closed', `cannot open a connection to ${url}: ${String(e)}`), 1006, 'bad url');
      }
      this.sock = t;
    };
    const u = this.url;
    if (typeof u === 'string') open(u);
    else
      Promise.resolve()
        .then(u)
        .then(open, (e) => epoch === this.dialing && this.lost(1006, `url() failed: ${String(e)}`));
  }

  /** The HTTP fallback's connection; it asks for a resume when there is a session to take back. */
  private openSse(url: string, on: TransportEvents): Transport {
    const s = this.session;
    this.sseResume = this.o.resume && s.resumable;
    return new SseTransport(
      url,
      {
        fetch: this.fetch!, // `sse` is only among the transports with a fetch
        headers: this.headers,
        resume: this.sseResume ? { sessionId: s.id!, token: s.token!, lastSeq: s.lastSeq } : undefined,
        postTimeoutMs: this.o.connectTimeoutMs,
        maxBacklogBytes: this.o.maxQueueBytes,
      },
      on,
    );
  }

  /**
   * The socket ended (closed, timed out, or dropped on purpose); reconnects
   * unless the code ends it. A socket whose session may be resumed is
   * dropped without a close frame (see Transport.drop); one that holds a
   * session nobody will resume (`endSession`, or resume off) is closed with
   * a frame, which ends that session on the router.
   */
  private lost(code: number, reason: string, now = false, endSession = false): void {
    if (this._state === 'closed') return;
    const t = this.sock;
    this.sock = undefined;
    // A transport that ended before its welcome failed (not a deliberate reconnect, nor a url() that failed).
    const failed = this.phase === 'opening' && !now && t !== undefined;
    // The route (or the router) has no event stream: WebSocket only from now on.
    const noSse = failed && t.kind === 'sse' && code === 1002 && this.transports.length > 1;
    // Only a socket that sent `resume` (or is the session's) may hold the session.
    const keep = !endSession && this.o.resume && this.session.resumable && this.phase !== 'opening';
    if (t && (keep ? t.drop() : (t.close(4000, reason.slice(0, 100)), true)) === false) {
      // Bounded: the session is on the newest of them, if on any.
      if (this.lingering.push(t) > 4) this.lingering.shift()!.close(4000, 'abandoned');
    }
    if (this.phase === 'ready') this.backoff.ended(Date.now() - this.openedAt);
    this.phase = 'down';
    this.dialing++;
    for (const n of ['handshake', 'ping', 'pong', 'ack', 'idle'] as const) this.disarm(n);
    this.held = [];
    const info: DisconnectInfo = { code, reason };
    if (noSse) {
      this.transports = this.transports.filter((k) => k !== 'sse');
      this.tIndex = 0;
      this.emit('error', clientError('not_supported', `no HTTP fallback here, WebSocket only from now on (${reason})`));
    } else if (!this.o.reconnect(info)) {
      return this.shutdown(clientError('closed', `the connection was closed (${code} ${reason})`), code, reason);
    }
    // Pings and cancels belong to the socket: their answers are worthless on another.
    this.table.lose(lostError('the connection dropped', 'dropped'), (e) => e.volatile);
    if (this.o.resume && this.session.resumable) {
      if (this.timers.expiry === undefined) this.arm('expiry', this.session.ttlMs, () => this.expire());
    } else {
      this.table.lose(
        lostError('the connection dropped and the route does not resume sessions: the outcome is unknown', 'resume_off'),
        (e) => e.sent,
      );
    }
    let switched = false;
    if (failed && !noSse && this.transports.length > 1) {
      this.tIndex = (this.tIndex + 1) % this.transports.length;
      switched = this.tIndex !== 0; // the next transport of this round: no wait
    } else if (!failed) {
      // A connection that had its welcome dropped: the next round starts
      // with the first transport again, so one failed WebSocket (a draining
      // router, a slow handshake) does not keep the client on the fallback.
      this.tIndex = 0;
    }
    const delay = now || switched ? 0 : this.backoff.next();
    info.reconnectInMs = delay;
    this.arm('reconnect', delay, () => this.dial());
    this.setState(this.everOpen ? 'reconnecting' : 'connecting');
    this.emit('close', info);
  }

  /** The resume TTL passed while offline: what was sent can no longer be answered. */
  private expire(): void {
    this.session.forget();
    this.table.lose(lostError('the connection was down longer than the resume TTL', 'expired'), (e) => e.sent);
  }

  private shutdown(error: RouterError, code: number, reason: string): void {
    if (this._state === 'closed') return;
    for (const n of Object.keys(this.timers) as TimerName[]) this.disarm(n);
    for (const d of this.detach.splice(0)) d();
    const t = this.sock;
    this.sock = undefined;
    t?.close(code, reason);
    this.closeLingering();
    this.phase = 'down';
    this.dialing++;
    this.queue.drain();
    this.setState('closed');
    this.table.lose(error);
    this.emit('close', { code, reason });
  }

  // ---------------------------------------------------------------- inbound

  private onText(text: string): void {
    this.lastRx = Date.now();
    const f = parseFrame(text);
    if (!f) {
      this.emit('error', clientError('protocol_error', `unreadable frame: ${text.slice(0, 80)}`));
      return;
    }
    switch (this.phase) {
      case 'opening':
        if (f.type === 'welcome' && f.data && typeof f.data === 'object') return this.onWelcome(f.data as Welcome);
        this.emit('error', clientError('protocol_error', `expected a welcome, got ${f.type} (a raw route?)`));
        return this.lost(1006, 'no welcome');
      case 'resuming':
        if (this.isResumeAnswer(f)) return this.onResumeAnswer(f);
        if (this.held.push(f) > 1024) this.lost(1006, 'no resume answer');
        return;
      default:
        this.process(f);
    }
  }

  private onWelcome(w: Welcome): void {
    this._welcome = w;
    const sse = this.sock?.kind === 'sse';
    if (sse) {
      if (typeof w.resume_token !== 'string') return this.lost(1002, 'an event stream without a resume token: its POSTs cannot be authenticated');
      this.watchIdle();
    }
    if (sse ? this.sseResume : this.o.resume && this.session.resumable) {
      this.phase = 'resuming';
      if (!sse) {
        const id = this.table.nextId();
        this.resumeKey = idKey(id);
        this.sock?.send(this.session.resumeFrame(id));
      } // The event stream asked in its query: the answer follows the welcome.
      // The handshake timer still runs: it bounds the wait for the answer.
    } else {
      this.startFresh(undefined);
    }
  }

  /** The answer to this connection's resume: by its id on a WebSocket; on an event stream, the first `resumed` or `resume_failed`. */
  private isResumeAnswer(f: Frame): boolean {
    if (this.sock?.kind === 'sse') return f.type === 'resumed' || (f.type === 'error' && f.error?.code === 'resume_failed');
    return f.id !== undefined && idKey(f.id) === this.resumeKey;
  }

  /** Lets the transport carry the session's frames (the HTTP fallback authenticates POSTs with its id and token). */
  private authorize(): void {
    const max = this._welcome?.limits?.max_message_bytes;
    this.sock?.authorize(this.session.id ?? '', this.session.token ?? '', typeof max === 'number' && max > 0 ? max : 1 << 20);
  }

  private onResumeAnswer(f: Frame): void {
    const w = this._welcome!; // set in onWelcome, which led to `resuming`
    if (f.type === 'resumed' && f.data && typeof f.data === 'object') {
      const r = f.data as Resumed;
      this.closeLingering();
      this.session.resumed(r, w);
      this.authorize();
      this.held = []; // frames of the fresh session this connection gives up
      this.disarm('expiry');
      this.inFlight = new Set((Array.isArray(r.in_flight) ? r.in_flight : []).map(idKey));
      this.replayed = Math.max(0, Math.floor(Number(r.replayed)) || 0);
      this.phase = 'replaying';
      // The barrier: replies the session got while parked may still sit in
      // its queue, after the replay and outside both `replayed` and
      // `in_flight`. The router answers this ping after everything queued
      // before it, so once the pong is in, a request that neither runs nor
      // has ended truly never reached the router.
      const id = this.table.nextId();
      // Only the pong proves the order: an error in its place (e.g. the
      // HTTP fallback's POST refused 429 until the retries ran out) does not.
      this.internal(
        encode('ping', id),
        id,
        true,
        (f) => (f.type === 'pong' ? this.finishResume() : this.lost(1006, `the resume barrier was refused (${f.error?.code ?? f.type}): resuming again`)),
        noop,
      );
      // No pong in time: drop this socket and resume again from the last seq (never guess).
      this.arm('handshake', this.o.connectTimeoutMs, () => this.lost(1006, 'no answer after the resume'));
      return;
    }
    const err = RouterError.fromWire(f.error);
    const reason = err.reason ?? err.code;
    if (reason === 'attached' && this.attachedTries++ < this.o.attachedRetries) {
      // The router has not noticed the old socket die yet; another try soon usually finds the session parked.
      return this.lost(1006, 'resume refused: session still attached', false, true);
    }
    this.session.forget();
    this.startFresh(lostError(`resume failed (${reason}): ${err.message}`, reason), f.seq);
  }

  /** The connection is a fresh session (first connect, resume off or failed). */
  private startFresh(resumeError: RouterError | undefined, answerSeq?: number): void {
    this.closeLingering();
    this.disarm('expiry');
    this.session.fresh(this._welcome!); // set in onWelcome
    this.authorize();
    // Whatever went out on an earlier connection has no future in this session.
    this.table.lose(
      resumeError ?? lostError('the connection dropped and a fresh session started', 'resume_off'),
      (e) => e.sent,
    );
    this.subs.reset();
    this.phase = 'ready';
    for (const f of this.held.splice(0)) this.process(f);
    if (typeof answerSeq === 'number') this.session.accept(answerSeq);
    this.becomeReady(false, resumeError);
  }

  /** The replay and what was queued are in: re-send what the router never saw, cancel what the caller gave up. */
  private finishResume(): void {
    if (this.phase !== 'replaying') return;
    const { resend, cancel } = this.table.afterResume(
      this.inFlight,
      lostError('the router neither runs this request nor replayed its end', 'not_replayed'),
    );
    this.phase = 'ready';
    for (const e of resend) this.sock?.send(e.payload);
    for (const e of cancel) this.sendCancel(e.id);
    this.becomeReady(true, undefined);
  }

  private becomeReady(resumed: boolean, resumeError: RouterError | undefined): void {
    this.disarm('handshake');
    this.openedAt = Date.now();
    this.attachedTries = 0;
    this.syncTopics();
    this.flush();
    this.schedulePing();
    this.everOpen = true;
    this.setState('open');
    this.emit('open', {
      welcome: this._welcome!,
      transport: this.transport,
      resumed,
      replayed: resumed ? this.replayed : 0,
      resumeError,
    });
  }

  /** One frame of the session (phase `replaying` or `ready`). */
  private process(f: Frame): void {
    if (typeof f.seq === 'number') {
      if (!this.session.accept(f.seq)) {
        this.duplicates++;
        return;
      }
      this.ackLater();
    }
    this.emit('frame', f);
    if (f.id !== undefined && f.id !== null) {
      // A copy of a running request was refused: the original answers it.
      if (isDuplicateId(f) && this.table.get(idKey(f.id))) this.duplicates++;
      else this.table.dispatch(f as Frame & { id: Id });
    } else if (f.type === 'error') this.emit('error', RouterError.fromWire(f.error));
    else if (!this.subs.deliver(f)) this.emit('push', f);
  }

  private ackLater(): void {
    const n = this.session.ackDue(false);
    if (n !== undefined) this.sendAck(n);
    else if (this.session.owesAck && this.timers.ack === undefined) {
      this.arm('ack', this.o.ackIntervalMs, () => {
        const m = this.session.ackDue(true);
        if (m !== undefined) this.sendAck(m);
      });
    }
  }

  private sendAck(seq: number): void {
    this.sock?.send(JSON.stringify({ type: 'ack', data: { seq } }));
  }

  // ---------------------------------------------------------------- outbound

  private start(type: string, data: unknown, o: CallOptions, sink: Sink): { id: Id; stop(): void } | undefined {
    if (this._state === 'closed') return void sink.fail(clientError('closed', 'the client is closed'));
    const { signal, timeout } = o;
    if (signal?.aborted) return void sink.fail(abortReason(signal), true);
    const id = this.table.nextId();
    let payload: string;
    try {
      payload = encode(type, id, data);
    } catch (e) {
      return void sink.fail(e);
    }
    const bytes = utf8Length(payload);
    const big = this.tooLarge(bytes);
    if (big) return void sink.fail(big);

    let timer: ReturnType<typeof setTimeout> | undefined;
    const cleanup = (): void => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
    };
    const entry: Entry = {
      id,
      key: idKey(id),
      payload,
      bytes,
      sent: false,
      replied: false,
      resend: true,
      abandoned: false,
      volatile: false,
      onFrame: (f) => {
        if (f.type === 'error') {
          cleanup();
          sink.fail(RouterError.fromWire(f.error));
        } else {
          if (f.done) cleanup();
          sink.frame(f as Reply);
        }
      },
      onLost: (e) => {
        cleanup();
        sink.fail(e);
      },
    };
    /** The caller gives up: the entry goes (or waits for the router's end as abandoned). */
    const stop = (reason: unknown): void => {
      if (this.table.get(entry.key) !== entry || entry.abandoned) return;
      cleanup();
      this.abandon(entry);
      sink.fail(reason, true);
    };
    const onAbort = (): void => stop(abortReason(signal!)); // only registered with a signal

    this.table.add(entry);
    if (!this.deliver(entry.payload, bytes, entry)) {
      this.table.delete(entry.key);
      return void sink.fail(this.queueFull());
    }
    if (timeout !== undefined && timeout > 0) {
      timer = setTimeout(
        () => stop(new RouterError({ code: 'timeout', message: `no final reply within ${timeout} ms`, retryable: true })),
        timeout,
      );
    }
    signal?.addEventListener('abort', onAbort, { once: true });
    return { id, stop: () => stop(new DOMException('The stream was stopped', 'AbortError')) };
  }

  /** Sends now when ready, else queues; `false` when the queue refused it. */
  private deliver(payload: string | BinaryData, bytes: number, entry?: Entry): boolean {
    if (this.phase === 'ready' && this.sock) {
      if (this.sock.send(payload)) {
        if (entry) entry.sent = true;
        return true;
      }
      // The HTTP fallback's POSTs are behind by maxQueueBytes: full, as the offline queue would be.
      if (this.sock.kind === 'sse') return false;
    }
    return this.queue.offer({ payload, bytes, key: entry?.key });
  }

  private post(payload: string | BinaryData): void {
    if (this._state === 'closed') throw clientError('closed', 'the client is closed');
    const bytes = byteSize(payload);
    const big = this.tooLarge(bytes);
    if (big) throw big;
    if (!this.deliver(payload, bytes)) throw this.queueFull();
  }

  private queueFull(): RouterError {
    const q = this.queue;
    return clientError(
      'queue_full',
      `the offline queue is full (${q.length}/${q.maxLength} frames, ${q.bytes}/${q.maxBytes} bytes)`,
    );
  }

  private tooLarge(bytes: number): RouterError | undefined {
    const max = this._welcome?.limits?.max_message_bytes;
    return typeof max === 'number' && bytes > max
      ? new RouterError({
          code: 'payload_too_large',
          message: `${bytes} bytes is over the route's max_message_bytes (${max})`,
          retryable: false,
        })
      : undefined;
  }

  /** Sends the offline queue in order; a socket that fails midway keeps the rest queued. */
  private flush(): void {
    const items = this.queue.drain();
    for (let i = 0; i < items.length; i++) {
      const q = items[i]!;
      const big =
        typeof q.payload !== 'string' && !this.sock?.binary
          ? clientError('not_supported', 'a binary frame queued while offline cannot go over the HTTP fallback (SSE)')
          : this.tooLarge(q.bytes);
      if (big) {
        const e = q.key === undefined ? undefined : this.table.get(q.key);
        if (e) {
          this.table.delete(e.key);
          e.onLost(big);
        } else if (q.key === undefined) this.emit('error', big);
        continue;
      }
      if (!this.sock?.send(q.payload)) return this.queue.restore(items.slice(i));
      const e = q.key === undefined ? undefined : this.table.get(q.key);
      if (e) e.sent = true;
    }
  }

  private abandon(e: Entry): void {
    if (!e.sent) {
      this.queue.remove(e.key);
      this.table.delete(e.key);
      return;
    }
    e.abandoned = true;
    e.resend = false;
    e.onFrame = noop;
    e.onLost = noop;
    // Otherwise a resume cancels it (if the router still runs it).
    if (this.phase === 'ready') this.sendCancel(e.id);
  }

  /** Sends an internal request with an id (its answer is ours, never the application's). */
  private internal(payload: string, id: number, volatile: boolean, onFrame: (f: Frame) => void, onLost: () => void): boolean {
    if ((this.phase !== 'ready' && this.phase !== 'replaying') || !this.sock?.send(payload)) return false;
    this.table.add({
      id,
      key: idKey(id),
      payload,
      bytes: 0,
      sent: true,
      replied: false,
      resend: false,
      abandoned: false,
      volatile,
      onFrame,
      onLost,
    });
    return true;
  }

  private sendCancel(target: Id): void {
    const id = this.table.nextId();
    this.internal(encode('cancel', id, { id: target }), id, true, noop, noop);
  }

  private syncTopics(): void {
    if (this.phase !== 'ready') return;
    for (const [op, topic] of this.subs.plan()) {
      const id = this.table.nextId();
      const answered = (f: Frame): void => {
        const ok = f.type !== 'error';
        this.subs.answered(op, topic, ok);
        if (!ok) {
          if (op === 'subscribe') this.subs.drop(topic);
          const e = RouterError.fromWire(f.error);
          this.emit(
            'error',
            new RouterError({ ...e, message: `${op} ${JSON.stringify(topic)}: ${e.message}`, details: { ...e.details, topic } }),
          );
        }
        this.syncTopics();
      };
      const presence = op === 'subscribe' && this.subs.watches(topic);
      const data = presence ? { topic, presence: true } : { topic };
      if (!this.internal(encode(op, id, data), id, false, answered, () => this.subs.unsent(topic))) return;
      this.subs.sent(op, topic, presence);
    }
  }

  // ---------------------------------------------------------------- liveness

  private schedulePing(): void {
    if (this.o.pingIntervalMs > 0) this.arm('ping', this.o.pingIntervalMs, () => this.probe());
  }

  /** A liveness check now (periodic, or on `online`/`offline`), unless one is under way. */
  private probe(): void {
    if (this.timers.pong !== undefined) return;
    const sentAt = Date.now();
    if (!this.sendPing(noop, noop)) return;
    const check = (): void => {
      // Any frame since the ping proves the path works; silence for the whole timeout does not.
      const wait = Math.max(this.lastRx, sentAt) + this.o.pingTimeoutMs - Date.now();
      if (wait > 0) this.arm('pong', wait, check);
      else this.lost(1006, `no frame for ${this.o.pingTimeoutMs} ms after a ping`);
    };
    this.arm('pong', this.o.pingTimeoutMs, check);
  }

  private sendPing(onRtt: (ms: number) => void, onLost: (e: RouterError) => void): boolean {
    const id = this.table.nextId();
    const sentAt = Date.now();
    return this.internal(
      encode('ping', id),
      id,
      true,
      (f) => {
        if (f.type === 'error') return onLost(RouterError.fromWire(f.error));
        const rtt = Date.now() - sentAt;
        this._latency = rtt;
        this.disarm('pong');
        this.schedulePing();
        this.emit('latency', rtt);
        onRtt(rtt);
      },
      () => onLost(lostError('the connection dropped before the pong', 'dropped')),
    );
  }

  /** The event stream's own liveness: nothing at all (keep-alive comments count) for 3 of the router's ping intervals means dead. */
  private watchIdle(): void {
    const hb = this._welcome?.heartbeat_ms;
    const ms = 3 * (typeof hb === 'number' && hb > 0 ? hb : 20_000);
    const check = (): void => {
      const wait = this.lastRx + ms - Date.now();
      if (wait > 0) this.arm('idle', wait, check);
      else this.lost(1006, `no event for ${ms} ms (3 keep-alive intervals)`);
    };
    this.arm('idle', ms, check);
  }

  // ---------------------------------------------------------------- helpers

  private closeLingering(): void {
    for (const t of this.lingering.splice(0)) t.close(4000, 'abandoned');
  }

  private setState(state: ConnectionState): void {
    const previous = this._state;
    if (state === previous) return;
    this._state = state;
    this.emit('state', { state, previous });
  }

  private arm(name: TimerName, ms: number, fn: () => void): void {
    this.disarm(name);
    this.timers[name] = setTimeout(() => {
      delete this.timers[name];
      fn();
    }, ms);
  }

  private disarm(name: TimerName): void {
    const t = this.timers[name];
    if (t !== undefined) {
      clearTimeout(t);
      delete this.timers[name];
    }
  }
}

/** The transports a client may use, in order: those asked for (both by default) that this runtime has. */
function pickTransports(asked: readonly TransportKind[] | undefined, ws: boolean, fetch: boolean): TransportKind[] {
  const list = asked ?? ['websocket', 'sse'];
  if (!Array.isArray(list) || list.length === 0 || list.some((k) => k !== 'websocket' && k !== 'sse') || new Set(list).size !== list.length) {
    throw new TypeError(`options.transports: a non-empty list of "websocket" and "sse", got ${JSON.stringify(asked)}`);
  }
  if (list.includes('websocket') && !ws) {
    throw new TypeError(
      'this runtime has no WebSocket: pass options.WebSocket (in Node 20, WebSocket from the "ws" package), or transports: ["sse"]',
    );
  }
  const usable = list.filter((k) => k !== 'sse' || fetch);
  if (usable.length === 0) throw new TypeError('this runtime has no fetch for the HTTP fallback: pass options.fetch');
  return usable;
}
