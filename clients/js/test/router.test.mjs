// The client against the real router and the real example workers (echo,
// vision, automation), in Node with the `ws` package injected. A TCP proxy
// (helpers/proxy.mjs) between them cuts or blackholes the connection where a
// test needs a broken network.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { Client, connect, RouterError } from '../dist/index.js';
import { startStack, until } from './helpers/stack.mjs';
import { startProxy } from './helpers/proxy.mjs';

let stack;
const clients = [];

before(async () => {
  stack = await startStack({ workers: ['echo', 'vision', 'automation'] });
});
after(async () => {
  for (const c of clients) c.close();
  await stack?.stop();
});

/** A connected client on `path` (through `port` when given), closed after the file. */
async function open(path, options = {}, port) {
  const url = port ? `ws://127.0.0.1:${port}${path}` : stack.url(path);
  const c = await connect(url, { WebSocket, ...options }, { timeout: 15_000 });
  clients.push(c);
  return c;
}

describe('requests and streams', () => {
  test('request resolves with the final reply; the welcome announces resume', async () => {
    const c = await open('/ws/echo');
    assert.equal(c.state, 'open');
    assert.equal(c.welcome.route, '/ws/echo');
    assert.equal(typeof c.sessionId, 'string');
    const r = await c.request('echo', { hello: 'router' });
    assert.deepEqual(r.data, { hello: 'router' });
    assert.equal(r.done, true);
    assert.equal(r.type, 'echo');
    assert.ok(r.seq >= 1);
    assert.ok(c.welcome.resume_ttl_ms > 0, `resume is on for this route (welcome: ${JSON.stringify(c.welcome)})`);
    assert.equal(typeof c.welcome.resume_token, 'string');
  });

  test('stream yields every partial then the final frame, in seq order', async () => {
    const c = await open('/ws/echo');
    const frames = [];
    for await (const f of c.stream('stream', { n: 25 })) frames.push(f);
    assert.equal(frames.length, 26);
    assert.deepEqual(frames.slice(0, 25).map((f) => f.data.i), [...Array(25).keys()]);
    assert.deepEqual(frames.at(-1).data, { n: 25 });
    assert.equal(frames.at(-1).done, true);
    for (let i = 1; i < frames.length; i++) assert.ok(frames[i].seq > frames[i - 1].seq);
  });

  test('vision: a streamed analysis with progress, then its result', async () => {
    const c = await open('/ws/vision');
    const stages = [];
    let result;
    for await (const f of c.stream('request_workspace_analysis', {})) {
      if (f.done) result = f.data;
      else stages.push(f.data.stage);
    }
    assert.deepEqual(stages, ['received', 'inspecting', 'describing', 'done']);
    assert.ok(result.result, JSON.stringify(result));
  });

  test('automation: a run that asks the human, answered with HUMAN_RESPONSE', async () => {
    const c = await open('/ws/automation');
    const kinds = [];
    let output;
    for await (const f of c.stream('run_task', { task: 'paint', ask_human: true, step_ms: 5 })) {
      kinds.push(f.type);
      if (f.type === 'HUMAN_INPUT_REQUEST') {
        const ack = await c.request('HUMAN_RESPONSE', { question_id: f.data.question_id, response: 'go ahead' });
        assert.equal(ack.data.accepted, true);
      }
      if (f.done) output = f.data;
    }
    assert.deepEqual(kinds, ['THOUGHT', 'ACTION', 'HUMAN_INPUT_REQUEST', 'THOUGHT', 'STREAM', 'STREAM', 'STREAM', 'OUTPUT']);
    assert.equal(output.human_response, 'go ahead');
  });
});

describe('errors', () => {
  test("a worker's error rejects with its code, and retryable as the router's code implies", async () => {
    const c = await open('/ws/echo');
    await assert.rejects(c.request('fail', { code: 'overloaded', message: 'busy' }), (e) => {
      assert.ok(e instanceof RouterError);
      assert.equal(e.code, 'overloaded');
      assert.equal(e.message, 'busy');
      assert.equal(e.retryable, true);
      assert.equal(e.source, 'router');
      return true;
    });
    await assert.rejects(c.request('nope'), (e) => e.code === 'unknown_type' && !e.retryable && /`echo`/.test(e.message));
  });

  test('a fire-and-forget message the router cannot deliver is reported as an error event', async () => {
    const c = await open('/ws/echo');
    const got = new Promise((res) => c.on('error', res));
    c.send('no_such_type', {});
    const e = await got;
    assert.equal(e.code, 'unknown_type');
  });

  test('a payload over max_message_bytes is refused before it is sent', async () => {
    const c = await open('/ws/echo');
    const big = 'x'.repeat(c.welcome.limits.max_message_bytes);
    await assert.rejects(c.request('echo', big), (e) => e.code === 'payload_too_large' && e.source === 'client');
    assert.equal(c.state, 'open', 'the connection was not closed with 1009');
  });
});

describe('cancel, timeout, abort', () => {
  test('aborting a stream sends cancel: AbortError, and the router ends the request (nothing left pending)', async () => {
    const c = await open('/ws/echo');
    const ac = new AbortController();
    const s = c.stream('slow', { ms: 60_000 }, { signal: ac.signal });
    const frames = c.stats.pending;
    assert.equal(frames, 1);
    const next = s.next();
    setTimeout(() => ac.abort(), 50);
    await assert.rejects(next, (e) => e.name === 'AbortError');
    // The abandoned entry leaves once the router's `cancelled` ends the request.
    await until('the router to end the cancelled request', () => c.stats.pending === 0, 5000);
    const r = await c.request('echo', 'still fine');
    assert.equal(r.data, 'still fine');
  });

  test('timeout rejects on the client and cancels the request on the router', async () => {
    const c = await open('/ws/echo');
    const seen = [];
    c.on('frame', (f) => seen.push(f));
    const t0 = Date.now();
    await assert.rejects(c.request('slow', { ms: 60_000 }, { timeout: 200 }), (e) => e.code === 'timeout' && e.source === 'client');
    assert.ok(Date.now() - t0 < 2000);
    await until('the cancelled error frame', () => seen.some((f) => f.error?.code === 'cancelled'), 5000);
    assert.equal(c.stats.pending, 0);
  });
});

describe('topics, binary, latency', () => {
  test('subscribe delivers publications; unsubscribe stops them', async () => {
    const c = await open('/ws/echo');
    const a = [];
    const b = [];
    const offA = c.subscribe('js-a', (data) => a.push(data));
    c.subscribe('js-b', (data) => b.push(data));
    await c.request('publish', { topic: 'js-a', data: 1 });
    await until('publication 1', () => a.length === 1);
    offA();
    await c.request('publish', { topic: 'js-a', data: 2 });
    await c.request('publish', { topic: 'js-b', data: 'marker' });
    await until('the marker publication', () => b.length === 1);
    // Publications reach the connection in order: js-a's second would have come before the marker.
    assert.deepEqual(a, [1]);
  });

  test('presence: a watcher sees another client join and leave; presence() lists both', async () => {
    const w = await open('/ws/echo');
    const other = await open('/ws/echo');
    const seen = [];
    w.subscribe('js-room', (data, frame) => frame.type === 'presence' && seen.push(data), { presence: true });
    await until("the watcher's subscription", () => w.stats.pending === 0);
    other.subscribe('js-room', () => {});
    await until('the join', () => seen.some((d) => d.event === 'join' && d.session_id === other.sessionId));
    const who = await w.presence('js-room');
    assert.equal(who.count, 2);
    assert.deepEqual(who.clients.map((c) => c.session_id).sort(), [w.sessionId, other.sessionId].sort());
    other.close();
    await until('the leave', () => seen.some((d) => d.event === 'leave' && d.session_id === other.sessionId));
    assert.equal((await w.presence('js-room')).count, 1);
  });

  test('binary frames go to the worker and come back', async () => {
    const c = await open('/ws/echo');
    const got = new Promise((res) => c.on('binary', res));
    c.sendBinary(new Uint8Array([0, 1, 2, 250, 255]));
    assert.deepEqual([...(await got)], [0, 1, 2, 250, 255]);
  });

  test('ping measures a round trip', async () => {
    const c = await open('/ws/echo');
    const rtt = await c.ping();
    assert.ok(rtt >= 0 && rtt < 1000, `rtt ${rtt}`);
    assert.equal(c.latency, rtt);
  });
});

describe('closing and reconnecting', () => {
  test('a worker closing the connection with a 4xxx code ends the client for good', async () => {
    const c = await open('/ws/echo');
    const pending = c.request('slow', { ms: 30_000 });
    const closed = new Promise((res) => c.on('close', res));
    const closing = c.request('close', { code: 4001, reason: 'bye' });
    const info = await closed;
    // The worker's reply races the close: either outcome, but exactly one.
    const outcome = await closing.then((r) => r.data, (e) => e.code);
    assert.ok(outcome === 'closed' || outcome?.closing === 4001, JSON.stringify(outcome));
    assert.equal(info.code, 4001);
    assert.equal(info.reconnectInMs, undefined);
    assert.equal(c.state, 'closed');
    await assert.rejects(pending, (e) => e.code === 'closed');
  });

  test('resume: a request in flight when the connection is cut completes as if nothing happened', async (t) => {
    const proxy = await startProxy('127.0.0.1', Number(stack.router.http.split(':').pop()));
    t.after(() => proxy.close());
    const c = await open('/ws/echo', { backoffBaseMs: 50 }, proxy.port);
    const opens = [];
    c.on('open', (o) => opens.push(o));
    const seqs = [];
    c.on('frame', (f) => seqs.push(f.seq));
    const frames = [];
    const done = (async () => {
      for await (const f of c.stream('stream', { n: 3 })) frames.push(f.data);
    })();
    const slow = c.request('slow', { ms: 600 });
    await until('the first stream frames', () => frames.length > 0);
    proxy.cut();
    await until('a reconnect', () => opens.length > 0, 10_000);
    assert.equal(opens[0].resumed, true, `resumed (resumeError: ${opens[0].resumeError?.message})`);
    assert.deepEqual((await slow).data, { slept_ms: 600 });
    await done;
    assert.deepEqual(frames, [{ i: 0 }, { i: 1 }, { i: 2 }, { n: 3 }]);
    const sorted = [...seqs].sort((x, y) => x - y);
    assert.deepEqual(seqs, sorted, 'frames in seq order');
    assert.equal(new Set(seqs).size, seqs.length, 'no frame twice');
  });

  test('liveness: a blackholed connection (no close event) is noticed within ping interval + timeout, then the client reconnects', async (t) => {
    const proxy = await startProxy('127.0.0.1', Number(stack.router.http.split(':').pop()));
    t.after(() => proxy.close());
    const c = await open('/ws/echo', { pingIntervalMs: 300, pingTimeoutMs: 400, backoffBaseMs: 50 }, proxy.port);
    const closes = [];
    c.on('close', (i) => closes.push([Date.now(), i]));
    const opened = new Promise((res) => c.on('open', res));
    const t0 = Date.now();
    proxy.blackhole();
    await until('the dead connection to be noticed', () => closes.length > 0, 5000);
    const [at, info] = closes[0];
    assert.equal(info.code, 1006);
    assert.match(info.reason, /no frame/);
    assert.ok(at - t0 <= 300 + 400 + 600, `noticed after ${at - t0} ms (bound: interval + timeout, plus scheduling slack)`);
    await opened;
    assert.equal((await c.request('echo', 'after')).data, 'after');
  });

  test('after a fresh reconnect (resume off) subscriptions are restored and new requests work', async (t) => {
    const proxy = await startProxy('127.0.0.1', Number(stack.router.http.split(':').pop()));
    t.after(() => proxy.close());
    const c = await open('/ws/echo', { resume: false, backoffBaseMs: 50 }, proxy.port);
    const got = [];
    c.subscribe('js-restore', (d) => got.push(d));
    await c.request('publish', { topic: 'js-restore', data: 'before' });
    await until('the first publication', () => got.length === 1);
    const slow = c.request('slow', { ms: 2000 });
    const reopened = new Promise((res) => c.on('open', res));
    proxy.cut();
    await assert.rejects(slow, (e) => e.code === 'connection_lost' && e.retryable && e.reason === 'resume_off');
    const o = await reopened;
    assert.equal(o.resumed, false);
    await until('the topic to be subscribed again', () => c.stats.pending === 0);
    await c.request('publish', { topic: 'js-restore', data: 'after' });
    await until('the publication after the reconnect', () => got.length === 2);
    assert.deepEqual(got, ['before', 'after']);
  });
});

test('new Client without a WebSocket implementation in Node 20 says what to pass', () => {
  if (globalThis.WebSocket) return; // Node 22+: a global exists
  assert.throws(() => new Client('ws://127.0.0.1:1/ws'), /options\.WebSocket/);
});
