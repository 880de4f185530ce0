// The client's state machine against a scripted socket (helpers/fake-socket.mjs):
// requests, streams, errors, the offline queue, abort and timeout cleanup,
// liveness, backoff, and resume (README, "Resume") frame by frame. Time is node:test's
// mock clock, so timing assertions are exact and nothing sleeps.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Client, RouterError } from '../../dist/index.js';
import { FakeSocket, CountingSignal, WELCOME, settle } from '../helpers/fake-socket.mjs';

const RESUMABLE = { resume_token: 'tok-1', resume_ttl_ms: 30_000 };

function setup(t, opts = {}) {
  t.mock.timers.enable({ apis: ['setTimeout', 'Date'] });
  FakeSocket.reset();
  const client = new Client('ws://router.test/ws/echo', {
    WebSocket: FakeSocket,
    transports: ['websocket'],
    events: null,
    random: () => 0.5,
    pingIntervalMs: 0,
    ...opts,
  });
  t.after(() => client.close());
  const events = [];
  for (const e of ['state', 'open', 'close', 'error', 'push', 'binary', 'latency']) client.on(e, (v) => events.push([e, v]));
  return { client, events };
}

/** Runs the client's reconnect timer and returns the new socket. */
function reconnect(t, client, events) {
  const close = events.filter(([e]) => e === 'close').pop();
  assert.ok(close, 'a close event announced the reconnect');
  const before = FakeSocket.all.length;
  t.mock.timers.tick(close[1].reconnectInMs);
  assert.equal(FakeSocket.all.length, before + 1, 'a new socket after the backoff delay');
  return FakeSocket.last;
}

test('request: frames before welcome wait, then go in order; the final reply resolves; partials go to onPartial', async (t) => {
  const { client } = setup(t);
  const partials = [];
  const p = client.request('stream', { n: 2 }, { onPartial: (f) => partials.push(f.data) });
  client.send('note', { x: 1 });
  const ws = FakeSocket.last;
  assert.equal(ws.url, 'ws://router.test/ws/echo');
  assert.equal(ws.binaryType, 'arraybuffer');
  assert.deepEqual(ws.sent, [], 'nothing is sent before the welcome');
  ws.accept();
  assert.equal(client.state, 'open');
  assert.deepEqual(ws.frames(), [
    { type: 'stream', id: 1, data: { n: 2 } },
    { type: 'note', data: { x: 1 } },
  ]);
  ws.push({ type: 'stream', id: 1, data: { i: 0 }, done: false, seq: 1 });
  ws.push({ type: 'stream', id: 1, data: { i: 1 }, done: false, seq: 2 });
  ws.push({ type: 'stream', id: 1, data: { n: 2 }, done: true, seq: 3 });
  const reply = await p;
  assert.deepEqual(reply.data, { n: 2 });
  assert.equal(reply.done, true);
  assert.deepEqual(partials, [{ i: 0 }, { i: 1 }]);
  assert.equal(client.stats.pending, 0);
});

test('an error frame rejects with a RouterError carrying code, message, retryAfterMs and retryable', async (t) => {
  const { client } = setup(t);
  const ws = FakeSocket.last;
  ws.accept();
  const limited = client.request('echo', 1);
  const bad = client.request('echo', 2);
  ws.push({ type: 'error', id: 1, done: true, error: { code: 'rate_limited', message: 'slow down', retry_after_ms: 250 }, seq: 1 });
  ws.push({ type: 'error', id: 2, done: true, error: { code: 'bad_request', message: 'nope' }, seq: 2 });
  await assert.rejects(limited, (e) => {
    assert.ok(e instanceof RouterError);
    assert.equal(e.code, 'rate_limited');
    assert.equal(e.message, 'slow down');
    assert.equal(e.retryAfterMs, 250);
    assert.equal(e.retryable, true);
    assert.equal(e.source, 'router');
    return true;
  });
  await assert.rejects(bad, (e) => e.code === 'bad_request' && e.retryable === false && e.retryAfterMs === undefined);
});

test('frames without id: errors go to "error", topic-less pushes to "push", binary to "binary"', (t) => {
  const { client, events } = setup(t);
  const ws = FakeSocket.last;
  ws.accept();
  ws.push({ type: 'error', done: true, error: { code: 'unknown_type', message: 'no such type' }, seq: 1 });
  ws.push({ type: 'image_received', data: { bytes: 3 }, seq: 2 });
  ws.pushBinary(new Uint8Array([1, 2, 3]));
  const got = events.filter(([e]) => ['error', 'push', 'binary'].includes(e));
  assert.equal(got.length, 3);
  assert.equal(got[0][1].code, 'unknown_type');
  assert.equal(got[1][1].type, 'image_received');
  assert.deepEqual([...got[2][1]], [1, 2, 3]);
  client.sendBinary(new Uint8Array([9, 8]));
  assert.deepEqual([...new Uint8Array(ws.sent.at(-1))], [9, 8]);
});

test('stream: yields every frame in order and ends after done; duplicates by seq are dropped', async (t) => {
  const { client } = setup(t);
  const ws = FakeSocket.last;
  ws.accept();
  const s = client.stream('stream', { n: 2 });
  for (const seq of [1, 2, 2, 1, 3]) {
    ws.push({ type: 'stream', id: s.id, data: seq === 3 ? { n: 2 } : { i: seq - 1 }, done: seq === 3, seq });
  }
  const got = [];
  for await (const f of s) got.push([f.seq, f.done]);
  assert.deepEqual(got, [
    [1, false],
    [2, false],
    [3, true],
  ]);
  assert.equal(client.stats.duplicates, 2);
});

test('aborting a stream sends cancel, ends it with AbortError, and leaves no listener or entry behind', async (t) => {
  const { client } = setup(t);
  const ws = FakeSocket.last;
  ws.accept();
  const signal = new CountingSignal();
  const s = client.stream('slow', { ms: 10_000 }, { signal });
  assert.equal(signal.listeners, 1);
  ws.push({ type: 'slow', id: s.id, data: { i: 0 }, done: false, seq: 1 });
  const first = await s.next();
  assert.equal(first.value.data.i, 0);
  const pending = s.next();
  signal.abort();
  await assert.rejects(pending, (e) => e.name === 'AbortError');
  assert.deepEqual(await s.next(), { value: undefined, done: true });
  assert.equal(signal.listeners, 0, 'the abort listener was removed');
  const cancel = ws.framesOf('cancel');
  assert.equal(cancel.length, 1);
  assert.deepEqual(cancel[0].data, { id: s.id });
  // The router answers the cancelled request and the cancel itself; the table empties.
  assert.equal(client.stats.pending, 2, 'the abandoned request and the cancel wait for the router');
  ws.push({ type: 'error', id: s.id, done: true, error: { code: 'cancelled', message: 'cancelled' }, seq: 2 });
  ws.push({ type: 'cancel', id: cancel[0].id, data: { id: s.id }, done: true, seq: 3 });
  assert.equal(client.stats.pending, 0);
});

test('breaking out of for-await cancels the request', async (t) => {
  const { client } = setup(t);
  const ws = FakeSocket.last;
  ws.accept();
  const s = client.stream('stream', { n: 100 });
  ws.push({ type: 'stream', id: s.id, data: { i: 0 }, done: false, seq: 1 });
  for await (const f of s) {
    assert.equal(f.data.i, 0);
    break;
  }
  assert.deepEqual(ws.framesOf('cancel').map((f) => f.data.id), [s.id]);
});

test('an aborted signal rejects at once and sends nothing', async (t) => {
  const { client } = setup(t);
  FakeSocket.last.accept();
  const signal = new CountingSignal();
  signal.abort();
  await assert.rejects(client.request('echo', 1, { signal }), (e) => e.name === 'AbortError');
  assert.equal(FakeSocket.last.frames().length, 0);
  assert.equal(signal.listeners, 0);
});

test('timeout: rejects with a client-side timeout exactly on time, cancels, clears its timer and listener', async (t) => {
  const { client } = setup(t);
  const ws = FakeSocket.last;
  ws.accept();
  const signal = new CountingSignal();
  let outcome;
  client.request('slow', { ms: 5000 }, { timeout: 1000, signal }).then(
    (v) => (outcome = ['ok', v]),
    (e) => (outcome = ['err', e]),
  );
  t.mock.timers.tick(999);
  await settle();
  assert.equal(outcome, undefined, 'still pending at 999 ms');
  t.mock.timers.tick(1);
  await settle();
  assert.equal(outcome[0], 'err');
  assert.equal(outcome[1].code, 'timeout');
  assert.equal(outcome[1].source, 'client');
  assert.equal(outcome[1].retryable, true);
  assert.equal(signal.listeners, 0);
  assert.equal(ws.framesOf('cancel').length, 1);
  // A late final reply changes nothing.
  ws.push({ type: 'slow', id: 1, data: {}, done: true, seq: 1 });
  await settle();
  assert.equal(outcome[0], 'err');
});

test('a request that completes removes its timer and abort listener', async (t) => {
  const { client } = setup(t);
  const ws = FakeSocket.last;
  ws.accept();
  const signal = new CountingSignal();
  const p = client.request('echo', 'x', { timeout: 1000, signal });
  ws.push({ type: 'echo', id: 1, data: 'x', done: true, seq: 1 });
  assert.equal((await p).data, 'x');
  assert.equal(signal.listeners, 0);
  let late = false;
  p.then(() => {}, () => (late = true));
  t.mock.timers.tick(5000);
  await settle();
  assert.equal(late, false);
  assert.equal(ws.framesOf('cancel').length, 0, 'no cancel for a finished request');
});

test('offline queue: the request beyond the count bound rejects, send throws, both with queue_full; nothing is dropped silently', async (t) => {
  const { client } = setup(t, { maxQueueLength: 2, maxQueueBytes: 10_000 });
  const a = client.request('echo', 'a');
  client.send('note', 'b');
  await assert.rejects(client.request('echo', 'c'), (e) => e.code === 'queue_full' && e.retryable);
  assert.throws(() => client.send('note', 'd'), (e) => e instanceof RouterError && e.code === 'queue_full');
  assert.throws(() => client.sendBinary(new Uint8Array(1)), (e) => e.code === 'queue_full');
  assert.equal(client.stats.queued, 2);
  const ws = FakeSocket.last;
  ws.accept();
  assert.deepEqual(ws.frames().map((f) => f.data), ['a', 'b']);
  ws.push({ type: 'echo', id: 1, data: 'a', done: true, seq: 1 });
  assert.equal((await a).data, 'a');
});

test('offline queue: the byte bound refuses a frame that would pass it', async (t) => {
  const { client } = setup(t, { maxQueueLength: 100, maxQueueBytes: 64 });
  client.send('n', 'x'.repeat(20)); // {"type":"n","data":"xxxx…"} = 42 bytes
  assert.equal(client.stats.queuedBytes, 42);
  assert.throws(() => client.send('n', 'y'), (e) => e.code === 'queue_full', '42 + 23 bytes > 64');
  client.send('n', ''); // 22 bytes: 42 + 22 = 64 fits
  assert.equal(client.stats.queuedBytes, 64);
  assert.equal(client.stats.queued, 2);
});

test('an aborted queued request leaves the queue (and frees its bytes)', async (t) => {
  const { client } = setup(t);
  const ac = new AbortController();
  const p = client.request('echo', 'q', { signal: ac.signal });
  assert.equal(client.stats.queued, 1);
  ac.abort();
  await assert.rejects(p, (e) => e.name === 'AbortError');
  assert.equal(client.stats.queued, 0);
  assert.equal(client.stats.queuedBytes, 0);
  FakeSocket.last.accept();
  assert.deepEqual(FakeSocket.last.frames(), [], 'neither the request nor a cancel goes out');
});

test('payload over the route limit is refused locally', async (t) => {
  const { client } = setup(t);
  FakeSocket.last.accept({ limits: { max_message_bytes: 100, max_in_flight: 64 } });
  await assert.rejects(client.request('echo', 'x'.repeat(200)), (e) => e.code === 'payload_too_large' && !e.retryable);
  assert.throws(() => client.sendBinary(new Uint8Array(101)), (e) => e.code === 'payload_too_large');
});

test('liveness: a silent network is noticed pingTimeoutMs after the ping, without any close event', (t) => {
  const { client, events } = setup(t, { pingIntervalMs: 1000, pingTimeoutMs: 500 });
  const ws = FakeSocket.last;
  ws.accept();
  t.mock.timers.tick(1000);
  const ping = ws.framesOf('ping');
  assert.equal(ping.length, 1);
  t.mock.timers.tick(499);
  assert.equal(client.state, 'open');
  t.mock.timers.tick(1);
  assert.equal(client.state, 'reconnecting');
  assert.ok(ws.closedByClient, 'the client abandoned the socket');
  const close = events.find(([e]) => e === 'close')[1];
  assert.equal(close.code, 1006);
  assert.match(close.reason, /no frame/);
});

test('liveness: frames arriving after the ping keep the connection; the pong sets latency and the next ping follows', (t) => {
  const { client, events } = setup(t, { pingIntervalMs: 1000, pingTimeoutMs: 500 });
  const ws = FakeSocket.last;
  ws.accept();
  t.mock.timers.tick(1000);
  t.mock.timers.tick(400);
  ws.push({ type: 'tick', data: {}, seq: 1 }); // traffic, but no pong yet
  t.mock.timers.tick(499);
  assert.equal(client.state, 'open', 'a frame 100 ms before the deadline extends it');
  const id = ws.framesOf('ping')[0].id;
  ws.push({ type: 'pong', id, data: { server_time_ms: 1 }, done: true, seq: 2 });
  assert.equal(client.latency, 899);
  assert.deepEqual(events.filter(([e]) => e === 'latency').map(([, v]) => v), [899]);
  t.mock.timers.tick(1000);
  assert.equal(ws.framesOf('ping').length, 2);
});

test('backoff: delays follow full jitter from the base to the cap, and reset after a stable connection', (t) => {
  const { client, events } = setup(t, { backoffBaseMs: 100, backoffCapMs: 1000, stableMs: 5000, random: () => 0.999 });
  const delays = () => events.filter(([e]) => e === 'close').map(([, v]) => v.reconnectInMs);
  for (let i = 0; i < 6; i++) {
    FakeSocket.last.drop(1006);
    reconnect(t, client, events);
  }
  assert.deepEqual(delays(), [99, 199, 399, 799, 999, 999]);
  assert.equal(client.state, 'connecting', 'never opened yet');
  FakeSocket.last.accept();
  t.mock.timers.tick(4999);
  FakeSocket.last.drop(1006);
  assert.equal(delays().at(-1), 999, 'up 4999 ms: not stable');
  reconnect(t, client, events).accept();
  t.mock.timers.tick(5000);
  FakeSocket.last.drop(1001);
  assert.equal(delays().at(-1), 99, 'up 5000 ms: back to the base');
  assert.equal(client.state, 'reconnecting');
});

test('the online event reconnects at once instead of waiting for the backoff', (t) => {
  const online = new EventTarget();
  const { client } = setup(t, { events: online, backoffBaseMs: 60_000, random: () => 0.9 });
  FakeSocket.last.accept();
  FakeSocket.last.drop(1006);
  assert.equal(FakeSocket.all.length, 1);
  online.dispatchEvent(new Event('online'));
  assert.equal(FakeSocket.all.length, 2, 'dialled on online');
  FakeSocket.last.accept();
  assert.equal(client.state, 'open');
  t.mock.timers.tick(60_000);
  assert.equal(FakeSocket.all.length, 2, 'the backoff timer was cancelled');
});

test('the offline event checks liveness at once', (t) => {
  const net = new EventTarget();
  const { client } = setup(t, { events: net, pingIntervalMs: 60_000, pingTimeoutMs: 500 });
  const ws = FakeSocket.last;
  ws.accept();
  net.dispatchEvent(new Event('offline'));
  assert.equal(ws.framesOf('ping').length, 1);
  t.mock.timers.tick(500);
  assert.equal(client.state, 'reconnecting');
});

test('close codes that end the session stop reconnecting; pending requests reject with closed', async (t) => {
  const { client, events } = setup(t);
  const ws = FakeSocket.last;
  ws.accept();
  const p = client.request('slow', { ms: 1000 });
  ws.drop(4001, 'kicked');
  await assert.rejects(p, (e) => e.code === 'closed' && e.retryable === false);
  assert.equal(client.state, 'closed');
  t.mock.timers.tick(100_000);
  assert.equal(FakeSocket.all.length, 1);
  assert.throws(() => client.send('x'), (e) => e.code === 'closed');
  await assert.rejects(client.request('x'), (e) => e.code === 'closed');
  assert.deepEqual(events.filter(([e]) => e === 'state').map(([, v]) => v.state), ['open', 'closed']);
});

test('close() rejects everything pending and queued, and stops timers', async (t) => {
  const { client } = setup(t, { pingIntervalMs: 1000 });
  const queued = client.request('echo', 1);
  FakeSocket.last.accept();
  client.close();
  await assert.rejects(queued, (e) => e.code === 'closed');
  t.mock.timers.tick(100_000);
  assert.equal(FakeSocket.last.framesOf('ping').length, 0);
  assert.equal(FakeSocket.all.length, 1);
});

test('resume off: a drop rejects sent requests with a retryable connection_lost at once; queued ones go on the new session', async (t) => {
  const { client, events } = setup(t);
  const ws = FakeSocket.last;
  ws.accept(); // no resume_token: resume is off
  const sent = client.request('slow', { ms: 100 });
  ws.drop(1006);
  await assert.rejects(sent, (e) => e.code === 'connection_lost' && e.retryable && e.reason === 'resume_off');
  const queued = client.request('echo', 'later');
  const ws2 = reconnect(t, client, events);
  ws2.accept({ session_id: 's2' });
  assert.deepEqual(ws2.frames(), [{ type: 'echo', id: 2, data: 'later' }], 'no resume frame; the queued request');
  ws2.push({ type: 'echo', id: 2, data: 'later', done: true, seq: 1 });
  assert.equal((await queued).data, 'later');
});

test('resume: resume is the first frame; replay is de-duplicated; in-flight requests continue; unseen ones are re-sent after the replay', async (t) => {
  const { client, events } = setup(t);
  const ws = FakeSocket.last;
  ws.accept(RESUMABLE);
  const r1 = client.stream('stream', { n: 3 }); // id 1: partial seen, then in flight
  const r2 = client.request('echo', 'two'); // id 2: completes while away (final in the replay)
  const r3 = client.request('echo', 'three'); // id 3: its send was lost
  ws.push({ type: 'stream', id: 1, data: { i: 0 }, done: false, seq: 1 });
  ws.drop(1006);
  assert.equal(client.state, 'reconnecting');
  const r4 = client.request('echo', 'four'); // id 4: issued while offline

  const ws2 = reconnect(t, client, events);
  ws2.accept({ session_id: 'fresh', resume_token: 'tok-fresh', resume_ttl_ms: 30_000 });
  assert.deepEqual(ws2.frames(), [
    { type: 'resume', id: 5, data: { session_id: 's1', resume_token: 'tok-1', last_seq: 1 } },
  ]);
  assert.equal(client.state, 'reconnecting', 'not open before the resume answer');
  ws2.push({ type: 'resumed', id: 5, done: true, data: { session_id: 's1', resume_token: 'tok-2', replayed: 2, in_flight: [1] } });
  // The barrier: a ping right after the answer; its pong marks the end of what the session had queued.
  const [barrier] = ws2.framesOf('ping');
  assert.ok(barrier, 'a barrier ping follows the resume');
  ws2.push({ type: 'stream', id: 1, data: { i: 0 }, done: false, seq: 1 }); // duplicate: dropped
  ws2.push({ type: 'echo', id: 2, data: 'two', done: true, seq: 2 }); // replayed: r2 ended while away
  ws2.push({ type: 'stream', id: 1, data: { i: 1 }, done: false, seq: 3 }); // was queued while parked
  assert.deepEqual(ws2.frames().map((f) => f.type), ['resume', 'ping'], 'nothing re-sent before the barrier');
  assert.equal(client.state, 'reconnecting');
  ws2.push({ type: 'pong', id: barrier.id, data: {}, done: true, seq: 4 });
  // r3 (never seen, not in flight, not ended) is re-sent, then the queue.
  assert.deepEqual(ws2.frames().slice(2), [
    { type: 'echo', id: 3, data: 'three' },
    { type: 'echo', id: 4, data: 'four' },
  ]);
  assert.equal(client.state, 'open');
  const open = events.filter(([e]) => e === 'open').pop()[1];
  assert.equal(open.resumed, true);
  assert.equal(open.replayed, 2);
  assert.equal(client.sessionId, 's1');
  assert.equal((await r2).data, 'two');
  ws2.push({ type: 'stream', id: 1, data: { i: 2 }, done: false, seq: 5 });
  ws2.push({ type: 'stream', id: 1, data: { n: 3 }, done: true, seq: 6 });
  ws2.push({ type: 'echo', id: 3, data: 'three', done: true, seq: 7 });
  ws2.push({ type: 'echo', id: 4, data: 'four', done: true, seq: 8 });
  const frames = [];
  for await (const f of r1) frames.push(f.data);
  assert.deepEqual(frames, [{ i: 0 }, { i: 1 }, { i: 2 }, { n: 3 }], 'every frame once, in order');
  assert.equal((await r3).data, 'three');
  assert.equal((await r4).data, 'four');
  assert.equal(client.stats.duplicates, 1);

  // The next resume uses the new token and the last processed seq.
  ws2.drop(1006);
  const ws3 = reconnect(t, client, events);
  ws3.accept({ session_id: 'fresh2', ...RESUMABLE });
  assert.deepEqual(ws3.frames()[0].data, { session_id: 's1', resume_token: 'tok-2', last_seq: 8 });
});

test('resume: a request abandoned while offline is cancelled after the resume if the router still runs it', async (t) => {
  const { client, events } = setup(t);
  const ws = FakeSocket.last;
  ws.accept(RESUMABLE);
  const ac = new AbortController();
  const p = client.request('slow', { ms: 60_000 }, { signal: ac.signal });
  ws.drop(1006);
  ac.abort();
  await assert.rejects(p, (e) => e.name === 'AbortError');
  const ws2 = reconnect(t, client, events);
  ws2.accept(RESUMABLE);
  const resumeId = ws2.frames()[0].id;
  ws2.push({ type: 'resumed', id: resumeId, done: true, data: { session_id: 's1', resume_token: 'tok-2', replayed: 0, in_flight: [1] } });
  ws2.push({ type: 'pong', id: ws2.framesOf('ping')[0].id, data: {}, done: true, seq: 1 });
  assert.deepEqual(ws2.framesOf('cancel').map((f) => f.data), [{ id: 1 }]);
  assert.equal(ws2.framesOf('slow').length, 0, 'an abandoned request is never re-sent');
});

test('resume failure: sent requests reject retryable with the reason; queued ones and subscriptions go on the fresh session', async (t) => {
  const { client, events } = setup(t);
  const ws = FakeSocket.last;
  ws.accept(RESUMABLE);
  const got = [];
  client.subscribe('room', (data) => got.push(data));
  const sub = ws.framesOf('subscribe')[0];
  assert.deepEqual(sub.data, { topic: 'room' });
  ws.push({ type: 'subscribed', id: sub.id, data: { topic: 'room' }, done: true, seq: 1 });
  const sent = client.request('slow', { ms: 100 });
  ws.drop(1006);
  const queued = client.request('echo', 'q');
  const ws2 = reconnect(t, client, events);
  ws2.accept({ session_id: 's2', resume_token: 'tok-s2', resume_ttl_ms: 30_000 });
  const resume = ws2.frames()[0];
  ws2.push({ type: 'error', id: resume.id, done: true, error: { code: 'resume_failed', reason: 'expired', message: 'session expired' }, seq: 1 });
  await assert.rejects(sent, (e) => {
    assert.equal(e.code, 'connection_lost');
    assert.equal(e.reason, 'expired');
    assert.equal(e.retryable, true);
    return true;
  });
  const open = events.filter(([e]) => e === 'open').pop()[1];
  assert.equal(open.resumed, false);
  assert.equal(open.resumeError.reason, 'expired');
  assert.equal(client.sessionId, 's2');
  const after = ws2.frames().slice(1);
  assert.deepEqual(after.map((f) => [f.type, f.data]), [
    ['subscribe', { topic: 'room' }],
    ['echo', 'q'],
  ]);
  // The fresh session's seq continues after the error frame's.
  ws2.push({ type: 'subscribed', id: after[0].id, data: { topic: 'room' }, done: true, seq: 2 });
  ws2.push({ type: 'chat', topic: 'room', data: 'hello', seq: 3 });
  ws2.push({ type: 'echo', id: after[1].id, data: 'q', done: true, seq: 4 });
  assert.equal((await queued).data, 'q');
  assert.deepEqual(got, ['hello']);
  // And the next resume names the fresh session.
  ws2.drop(1006);
  reconnect(t, client, events).accept(RESUMABLE);
  assert.deepEqual(FakeSocket.last.frames()[0].data, { session_id: 's2', resume_token: 'tok-s2', last_seq: 4 });
});

test('resume refused with "attached" is retried on a new socket before giving up the session', async (t) => {
  const { client, events } = setup(t, { attachedRetries: 1 });
  const ws = FakeSocket.last;
  ws.accept(RESUMABLE);
  const p = client.request('slow', { ms: 100 });
  ws.drop(1006);
  const attached = (sock) => {
    const id = sock.frames()[0].id;
    sock.push({ type: 'error', id, done: true, error: { code: 'resume_failed', reason: 'attached', message: 'live elsewhere' }, seq: 1 });
  };
  const ws2 = reconnect(t, client, events);
  ws2.accept(RESUMABLE);
  attached(ws2);
  assert.ok(ws2.closedByClient, 'the fresh session of that socket is given up');
  const ws3 = reconnect(t, client, events);
  ws3.accept(RESUMABLE);
  assert.equal(ws3.frames()[0].type, 'resume', 'resumes again');
  attached(ws3); // retries exhausted: this socket goes on as a fresh session
  await assert.rejects(p, (e) => e.code === 'connection_lost' && e.reason === 'attached');
  assert.equal(client.state, 'open');
  assert.equal(FakeSocket.all.length, 3);
});

test('resume TTL passing while offline rejects sent requests without waiting for a connection', async (t) => {
  const { client } = setup(t, { backoffBaseMs: 1_000_000 });
  const ws = FakeSocket.last;
  ws.accept({ resume_token: 't', resume_ttl_ms: 5000 });
  const p = client.request('slow', { ms: 1 });
  let outcome;
  p.catch((e) => (outcome = e));
  ws.drop(1006);
  t.mock.timers.tick(4999);
  await settle();
  assert.equal(outcome, undefined, 'kept for a resume until the TTL');
  t.mock.timers.tick(1);
  await settle();
  assert.equal(outcome.code, 'connection_lost');
  assert.equal(outcome.reason, 'expired');
});

test('acks: every ackEvery frames, and ackIntervalMs after an unacknowledged one; none when resume is off', (t) => {
  const { client } = setup(t, { ackEvery: 4, ackIntervalMs: 1000 });
  const ws = FakeSocket.last;
  ws.accept(RESUMABLE);
  for (let seq = 1; seq <= 5; seq++) ws.push({ type: 'tick', data: seq, seq });
  assert.deepEqual(ws.framesOf('ack'), [{ type: 'ack', data: { seq: 4 } }]);
  t.mock.timers.tick(1000);
  assert.deepEqual(ws.framesOf('ack').map((f) => f.data.seq), [4, 5]);
  t.mock.timers.tick(5000);
  assert.equal(ws.framesOf('ack').length, 2, 'nothing owed, nothing sent');
  client.close();

  FakeSocket.reset();
  const off = new Client('ws://x/ws', { WebSocket: FakeSocket, transports: ['websocket'], events: null, ackEvery: 1, pingIntervalMs: 0 });
  FakeSocket.last.accept();
  for (let seq = 1; seq <= 3; seq++) FakeSocket.last.push({ type: 'tick', seq });
  t.mock.timers.tick(5000);
  assert.equal(FakeSocket.last.framesOf('ack').length, 0);
  off.close();
});

test('subscribe: ack, delivery, unsubscribe; a refused topic is reported and dropped', (t) => {
  const { client, events } = setup(t);
  const ws = FakeSocket.last;
  ws.accept();
  const got = [];
  const off = client.subscribe('news', (data, frame) => got.push([data, frame.topic]));
  const [sub] = ws.framesOf('subscribe');
  ws.push({ type: 'subscribed', id: sub.id, data: { topic: 'news' }, done: true, seq: 1 });
  ws.push({ type: 'publication', topic: 'news', data: 1, seq: 2 });
  ws.push({ type: 'publication', topic: 'other', data: 2, seq: 3 });
  assert.deepEqual(got, [[1, 'news']]);
  assert.equal(events.filter(([e]) => e === 'push').length, 1, 'a topic nobody wants goes to "push"');
  off();
  const [unsub] = ws.framesOf('unsubscribe');
  assert.deepEqual(unsub.data, { topic: 'news' });
  ws.push({ type: 'unsubscribed', id: unsub.id, data: { topic: 'news' }, done: true, seq: 4 });
  ws.push({ type: 'publication', topic: 'news', data: 3, seq: 5 });
  assert.deepEqual(got, [[1, 'news']]);

  client.subscribe('', () => {});
  const bad = ws.framesOf('subscribe').at(-1);
  ws.push({ type: 'error', id: bad.id, done: true, error: { code: 'bad_request', message: 'empty topic' }, seq: 6 });
  const err = events.filter(([e]) => e === 'error').pop()[1];
  assert.equal(err.code, 'bad_request');
  assert.equal(err.details.topic, '');
  ws.drop(1006);
  reconnect(t, client, events).accept();
  assert.equal(FakeSocket.last.framesOf('subscribe').length, 0, 'a refused topic is not retried');
});

test('a throwing handler does not break the client', async (t) => {
  const { client } = setup(t);
  const ws = FakeSocket.last;
  ws.accept();
  client.on('push', () => {
    throw new Error('handler bug');
  });
  ws.push({ type: 'x', data: 1, seq: 1 });
  const p = client.request('echo', 1);
  ws.push({ type: 'echo', id: 1, data: 1, done: true, seq: 2 });
  assert.equal((await p).data, 1);
  // Rethrown on a fresh task: surfaced as an uncaught error, not swallowed.
  assert.throws(() => t.mock.timers.tick(1), /handler bug/);
});

test('resume: a request that ended while parked (its frames queued after the replay, outside in_flight) is neither re-sent nor lost', async (t) => {
  const { client, events } = setup(t);
  const ws = FakeSocket.last;
  ws.accept(RESUMABLE);
  const quiet = client.request('slow', { ms: 10 }); // id 1: no frame before the drop
  const talking = client.stream('stream', { n: 2 }); // id 2: one frame before the drop
  ws.push({ type: 'stream', id: 2, data: { i: 0 }, done: false, seq: 1 });
  ws.drop(1006);
  const ws2 = reconnect(t, client, events);
  ws2.accept(RESUMABLE);
  const resumeId = ws2.frames()[0].id;
  // Both ended while the session was parked: not in flight, nothing replayed (it was all queued).
  ws2.push({ type: 'resumed', id: resumeId, done: true, data: { session_id: 's1', resume_token: 'tok-2', replayed: 0, in_flight: [] } });
  ws2.push({ type: 'slow', id: 1, data: { slept_ms: 10 }, done: true, seq: 2 });
  ws2.push({ type: 'stream', id: 2, data: { i: 1 }, done: false, seq: 3 });
  ws2.push({ type: 'stream', id: 2, data: { n: 2 }, done: true, seq: 4 });
  ws2.push({ type: 'pong', id: ws2.framesOf('ping')[0].id, data: {}, done: true, seq: 5 });
  assert.deepEqual((await quiet).data, { slept_ms: 10 });
  const frames = [];
  for await (const f of talking) frames.push(f.data);
  assert.deepEqual(frames, [{ i: 0 }, { i: 1 }, { n: 2 }]);
  assert.deepEqual(ws2.frames().map((f) => f.type), ['resume', 'ping'], 'nothing was sent again');
});

test('resume: a request not in flight and not ended by the barrier is re-sent exactly once', async (t) => {
  const { client, events } = setup(t);
  const ws = FakeSocket.last;
  ws.accept(RESUMABLE);
  const p = client.request('echo', 'lost on the way');
  ws.drop(1006);
  const ws2 = reconnect(t, client, events);
  ws2.accept(RESUMABLE);
  ws2.push({ type: 'resumed', id: ws2.frames()[0].id, done: true, data: { session_id: 's1', resume_token: 't2', replayed: 0, in_flight: [] } });
  ws2.push({ type: 'pong', id: ws2.framesOf('ping')[0].id, data: {}, done: true, seq: 1 });
  assert.deepEqual(ws2.framesOf('echo'), [{ type: 'echo', id: 1, data: 'lost on the way' }]);
  ws2.push({ type: 'echo', id: 1, data: 'lost on the way', done: true, seq: 2 });
  assert.equal((await p).data, 'lost on the way');
});

test('resume: no answer to the barrier drops the socket and resumes again from the last seq (never guesses)', async (t) => {
  const { client, events } = setup(t, { connectTimeoutMs: 1000 });
  const ws = FakeSocket.last;
  ws.accept(RESUMABLE);
  const p = client.request('echo', 'x');
  ws.drop(1006);
  const ws2 = reconnect(t, client, events);
  ws2.accept(RESUMABLE);
  ws2.push({ type: 'resumed', id: ws2.frames()[0].id, done: true, data: { session_id: 's1', resume_token: 't2', replayed: 0, in_flight: [] } });
  ws2.push({ type: 'tick', data: 0, seq: 1 });
  t.mock.timers.tick(1000);
  assert.equal(ws2.listenerCount('message'), 0, 'the socket was given up');
  assert.equal(ws2.closedByClient, undefined, 'without a close frame (it would end the session): it lingers');
  assert.equal(ws2.framesOf('echo').length, 0, 'not re-sent without the barrier');
  const ws3 = reconnect(t, client, events);
  ws3.accept(RESUMABLE);
  assert.deepEqual(ws3.frames()[0].data, { session_id: 's1', resume_token: 't2', last_seq: 1 });
  ws3.push({ type: 'resumed', id: ws3.frames()[0].id, done: true, data: { session_id: 's1', resume_token: 't3', replayed: 0, in_flight: [1] } });
  assert.equal(ws2.closedByClient?.code, 4000, 'closed once the session moved to the new socket');
  let settled = false;
  p.then(() => (settled = true), () => (settled = true));
  await settle();
  assert.equal(settled, false, 'the request still waits');
  client.close();
  await assert.rejects(p, (e) => e.code === 'closed');
});

test('dropping a socket for liveness keeps the session (terminate, no close frame) where the implementation can', (t) => {
  class Terminable extends FakeSocket {
    terminate() {
      this.terminated = true;
      this.readyState = 3;
    }
  }
  t.mock.timers.enable({ apis: ['setTimeout', 'Date'] });
  FakeSocket.reset();
  const client = new Client('ws://x/ws', { WebSocket: Terminable, transports: ['websocket'], events: null, pingIntervalMs: 100, pingTimeoutMs: 100, random: () => 0 });
  t.after(() => client.close());
  const ws = FakeSocket.last;
  ws.accept(RESUMABLE);
  t.mock.timers.tick(100);
  assert.equal(ws.framesOf('ping').length, 1);
  t.mock.timers.tick(100);
  assert.equal(ws.terminated, true);
  assert.equal(ws.closedByClient, undefined, 'no close frame: the router parks the session');
  // A fresh socket refused with "attached" is closed with a frame: its fresh session ends.
  t.mock.timers.tick(0);
  const ws2 = FakeSocket.last;
  ws2.accept(RESUMABLE);
  ws2.push({ type: 'error', id: ws2.frames()[0].id, done: true, error: { code: 'resume_failed', reason: 'attached', message: 'live' }, seq: 1 });
  assert.equal(ws2.terminated, undefined);
  assert.equal(ws2.closedByClient.code, 4000);
});

test('connect: resolves on open; its timeout closes the client and rejects', async (t) => {
  t.mock.timers.enable({ apis: ['setTimeout', 'Date'] });
  FakeSocket.reset();
  const { connect } = await import('../../dist/index.js');
  const ok = connect('ws://x/ws', { WebSocket: FakeSocket, transports: ['websocket'], events: null, pingIntervalMs: 0 }, { timeout: 1000 });
  FakeSocket.last.accept();
  const c = await ok;
  assert.equal(c.state, 'open');
  c.close();

  const late = connect('ws://x/ws', { WebSocket: FakeSocket, transports: ['websocket'], events: null }, { timeout: 1000 });
  let outcome;
  late.then(() => (outcome = 'open'), (e) => (outcome = e));
  t.mock.timers.tick(1000);
  await settle();
  assert.equal(outcome.code, 'timeout');
  t.mock.timers.tick(100_000);
  assert.equal(FakeSocket.all.length, 2, 'the client was closed: no more attempts');
});

test('a consumer that falls highWaterMark frames behind ends the stream with buffer_overflow and cancels it', async (t) => {
  const { client } = setup(t);
  const ws = FakeSocket.last;
  ws.accept();
  const s = client.stream('stream', { n: 100 }, { highWaterMark: 3 });
  for (let seq = 1; seq <= 4; seq++) ws.push({ type: 'stream', id: s.id, data: { i: seq - 1 }, done: false, seq });
  await assert.rejects(s.next(), (e) => e.code === 'buffer_overflow');
  assert.deepEqual(await s.next(), { value: undefined, done: true });
  assert.deepEqual(ws.framesOf('cancel').map((f) => f.data.id), [s.id]);
});

test('browser sockets given up while a resume is possible linger unheard, at most 4, and close once the session moves', (t) => {
  const LONG_TTL = { resume_token: 'tok-1', resume_ttl_ms: 600_000 }; // outlives the test's clock
  setup(t, { pingIntervalMs: 100, pingTimeoutMs: 100, random: () => 0 }); // backoff 0: redials within the tick
  const given = [FakeSocket.last];
  FakeSocket.last.accept(LONG_TTL);
  t.mock.timers.tick(100); // the ping
  t.mock.timers.tick(100); // liveness: given up
  for (let i = 0; i < 5; i++) {
    const ws = FakeSocket.last;
    given.push(ws);
    ws.accept(LONG_TTL); // resuming: the answer never comes
    t.mock.timers.tick(10_000); // connectTimeoutMs: given up
  }
  assert.equal(FakeSocket.all.length, 7);
  const open = given.filter((ws) => ws.closedByClient === undefined);
  assert.equal(open.length, 4, 'the 4 newest linger; older ones were closed');
  assert.deepEqual(given.slice(0, 2).map((ws) => ws.closedByClient?.code), [4000, 4000]);
  for (const ws of given) assert.equal(ws.listenerCount('message'), 0, 'none is listened to');
  const ws = FakeSocket.last;
  ws.accept(LONG_TTL);
  ws.push({ type: 'resumed', id: ws.frames()[0].id, done: true, data: { session_id: 's1', resume_token: 't9', replayed: 0, in_flight: [] } });
  assert.ok(given.every((g) => g.closedByClient), 'all closed once the session was taken back');
});

test('presence: subscribe with presence asks for the pushes (again for a topic held without them), the handler gets them, presence() answers the data', async (t) => {
  const { client } = setup(t);
  const ws = FakeSocket.last;
  ws.accept(RESUMABLE);
  const plain = [];
  const watcher = [];
  client.subscribe('room', (data) => plain.push(data));
  const first = ws.framesOf('subscribe')[0];
  assert.deepEqual(first.data, { topic: 'room' }, 'no presence asked');
  ws.push({ type: 'subscribed', id: first.id, data: { topic: 'room' }, done: true, seq: 1 });
  client.subscribe('room', (data, frame) => watcher.push([frame.type, data]), { presence: true });
  const again = ws.framesOf('subscribe')[1];
  assert.deepEqual(again.data, { topic: 'room', presence: true }, 'subscribed again, with presence');
  ws.push({ type: 'subscribed', id: again.id, data: { topic: 'room' }, done: true, seq: 2 });
  client.subscribe('room', () => {}, { presence: true });
  assert.equal(ws.framesOf('subscribe').length, 2, 'held with presence: nothing more to send');
  ws.push({ type: 'presence', topic: 'room', data: { event: 'join', session_id: 's9' }, seq: 3 });
  assert.deepEqual(watcher, [['presence', { event: 'join', session_id: 's9' }]]);
  assert.deepEqual(plain, [], 'a handler that did not ask gets no presence pushes');
  ws.push({ type: 'say', topic: 'room', data: 'hi', seq: 4 });
  assert.deepEqual(plain, ['hi']);
  const who = client.presence('room');
  const req = ws.framesOf('presence')[0];
  assert.deepEqual(req.data, { topic: 'room' });
  const answer = { topic: 'room', count: 1, clients: [{ session_id: 's9', router_id: 'A' }] };
  ws.push({ type: 'presence', id: req.id, data: answer, done: true, seq: 5 });
  assert.deepEqual(await who, answer);
});
