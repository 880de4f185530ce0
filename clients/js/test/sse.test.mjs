// The client over the router's HTTP fallback (an event stream down, POSTs
// up), in Node against the real router and workers: `transports: ['sse']`,
// resume after the stream is cut, liveness over a blackholed path, and the
// automatic fallback through a proxy that lets no WebSocket through.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { Client, connect } from '../dist/index.js';
import { startStack, testRoutes, until } from './helpers/stack.mjs';
import { startProxy } from './helpers/proxy.mjs';

let stack;
let routerPort;
const clients = [];

before(async () => {
  const routes = testRoutes();
  routes.routes.push({ path: '/ws/echo-noresume', service: 'echo', resume: { ttlMs: 0 } });
  stack = await startStack({ workers: ['echo', 'vision', 'automation'], routes });
  routerPort = Number(stack.router.http.split(':').pop());
});
after(async () => {
  for (const c of clients) c.close();
  await stack?.stop();
});

/** A connected client on `path` (through `port` when given), closed after the file. */
async function open(path, options = {}, port = routerPort) {
  const c = await connect(`ws://127.0.0.1:${port}${path}`, { WebSocket, transports: ['sse'], ...options }, { timeout: 15_000 });
  clients.push(c);
  return c;
}

/** A proxy for one test, closed after it. */
async function proxy(t, options) {
  const p = await startProxy('127.0.0.1', routerPort, options);
  t.after(() => p.close());
  return p;
}

describe('transports: ["sse"]', () => {
  test('request, stream, error, fire-and-forget error, ping over the event stream and POSTs', async () => {
    const c = await open('/ws/echo');
    assert.equal(c.transport, 'sse');
    assert.equal(c.welcome.route, '/ws/echo');
    assert.ok(c.welcome.resume_ttl_ms > 0);
    assert.deepEqual((await c.request('echo', { over: 'sse', text: 'é ☃ 𝄞\n"' })).data, { over: 'sse', text: 'é ☃ 𝄞\n"' });
    const frames = [];
    for await (const f of c.stream('stream', { n: 40 })) frames.push(f);
    assert.equal(frames.length, 41);
    assert.deepEqual(frames.slice(0, 40).map((f) => f.data.i), [...Array(40).keys()]);
    for (let i = 1; i < frames.length; i++) assert.ok(frames[i].seq > frames[i - 1].seq, 'seq order');
    await assert.rejects(c.request('fail', { code: 'overloaded', message: 'busy' }), (e) => e.code === 'overloaded' && e.source === 'router');
    const err = new Promise((res) => c.on('error', res));
    c.send('no_such_type', {});
    assert.equal((await err).code, 'unknown_type');
    const rtt = await c.ping();
    assert.ok(rtt >= 0 && rtt < 2000, `rtt ${rtt}`);
  });

  test('many requests at once: POSTs batched, every request answered once, in order per stream', async () => {
    const c = await open('/ws/echo');
    const replies = await Promise.all([...Array(200).keys()].map((i) => c.request('echo', i)));
    assert.deepEqual(replies.map((r) => r.data), [...Array(200).keys()]);
    assert.equal(c.stats.pending, 0);
  });

  test('a vision analysis and an automation run that asks the human', async () => {
    const v = await open('/ws/vision');
    const stages = [];
    for await (const f of v.stream('request_workspace_analysis', {})) stages.push(f.done ? 'result' : f.data.stage);
    assert.deepEqual(stages, ['received', 'inspecting', 'describing', 'done', 'result']);
    const a = await open('/ws/automation');
    const kinds = [];
    for await (const f of a.stream('run_task', { task: 'paint', ask_human: true, step_ms: 5 })) {
      kinds.push(f.type);
      if (f.type === 'HUMAN_INPUT_REQUEST') await a.request('HUMAN_RESPONSE', { question_id: f.data.question_id, response: 'ok' });
    }
    assert.deepEqual(kinds, ['THOUGHT', 'ACTION', 'HUMAN_INPUT_REQUEST', 'THOUGHT', 'STREAM', 'STREAM', 'STREAM', 'OUTPUT']);
  });

  test('subscribe and unsubscribe; sending binary is refused', async () => {
    const c = await open('/ws/echo');
    const got = [];
    const off = c.subscribe('sse-topic', (d) => got.push(d));
    await c.request('publish', { topic: 'sse-topic', data: 1 });
    await until('the publication', () => got.length === 1);
    off();
    const marker = [];
    c.subscribe('sse-marker', (d) => marker.push(d));
    await c.request('publish', { topic: 'sse-topic', data: 2 });
    await c.request('publish', { topic: 'sse-marker', data: 'm' });
    await until('the marker', () => marker.length === 1);
    assert.deepEqual(got, [1]);
    assert.throws(() => c.sendBinary(new Uint8Array([1])), (e) => e.code === 'not_supported');
  });

  test('a route with resume off has no event stream: the client closes with the router\'s reason', async () => {
    await assert.rejects(
      connect(`ws://127.0.0.1:${routerPort}/ws/echo-noresume`, { transports: ['sse'] }, { timeout: 10_000 }),
      (e) => e.code === 'closed',
    );
    const c = new Client(`ws://127.0.0.1:${routerPort}/ws/echo-noresume`, { transports: ['sse'] });
    const closed = await new Promise((res) => c.on('close', res));
    assert.equal(closed.code, 1002);
    assert.match(closed.reason, /HTTP 400: .*needs session resume/);
  });
});

describe('resume and liveness over SSE', () => {
  test('requests in flight when the stream is cut complete as if nothing happened', async (t) => {
    const p = await proxy(t);
    const c = await open('/ws/echo', { backoffBaseMs: 50 }, p.port);
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
    p.cut();
    await until('a reconnect', () => opens.length > 0, 10_000);
    assert.equal(opens[0].resumed, true, `resumed (resumeError: ${opens[0].resumeError?.message})`);
    assert.equal(opens[0].transport, 'sse');
    assert.deepEqual((await slow).data, { slept_ms: 600 });
    await done;
    assert.deepEqual(frames, [{ i: 0 }, { i: 1 }, { i: 2 }, { n: 3 }]);
    assert.deepEqual(seqs, [...seqs].sort((x, y) => x - y), 'frames in seq order');
    assert.equal(new Set(seqs).size, seqs.length, 'no frame twice');
    assert.deepEqual((await c.request('echo', 'after')).data, 'after');
  });

  test('a cut while a long stream runs, twice: every frame once, in order', async (t) => {
    const p = await proxy(t);
    const c = await open('/ws/echo', { backoffBaseMs: 20 }, p.port);
    const data = [];
    const done = (async () => {
      for await (const f of c.stream('stream', { n: 400 })) data.push(f.data);
    })();
    await until('some frames', () => data.length > 50);
    p.cut();
    await until('more frames', () => data.length > 200, 10_000);
    p.cut(true);
    await done;
    assert.equal(data.length, 401);
    data.slice(0, 400).forEach((d, k) => assert.deepEqual(d, { i: k }));
  });

  test('a blackholed path (no close, no keep-alive) is noticed by the liveness ping, then the session resumes', async (t) => {
    const p = await proxy(t);
    const c = await open('/ws/echo', { pingIntervalMs: 300, pingTimeoutMs: 400, backoffBaseMs: 50 }, p.port);
    const closes = [];
    c.on('close', (i) => closes.push([Date.now(), i]));
    const opened = new Promise((res) => c.on('open', res));
    const t0 = Date.now();
    p.blackhole();
    await until('the dead path to be noticed', () => closes.length > 0, 5000);
    const [at, info] = closes[0];
    assert.equal(info.code, 1006);
    assert.ok(at - t0 <= 300 + 400 + 600, `noticed after ${at - t0} ms`);
    const o = await opened;
    assert.equal(o.resumed, true, o.resumeError?.message);
    assert.equal((await c.request('echo', 'after')).data, 'after');
  });
});

describe('automatic fallback', () => {
  for (const refuseUpgrade of ['403', 'close']) {
    test(`a proxy that refuses the WebSocket upgrade (${refuseUpgrade}): the client falls back to SSE by itself, works, and resumes over SSE after a cut`, async (t) => {
      const p = await proxy(t, { refuseUpgrade });
      const c = await connect(`ws://127.0.0.1:${p.port}/ws/echo`, { WebSocket, backoffBaseMs: 50 }, { timeout: 15_000 });
      clients.push(c);
      assert.ok(p.refused >= 1, 'the WebSocket was tried first');
      assert.equal(c.transport, 'sse');
      assert.deepEqual((await c.request('echo', 'through')).data, 'through');
      const stages = [];
      for await (const f of c.stream('stream', { n: 5 })) stages.push(f.done ? 'end' : f.data.i);
      assert.deepEqual(stages, [0, 1, 2, 3, 4, 'end']);
      // A cut: the next round tries WebSocket first (refused again), then
      // comes back over SSE, resuming the session.
      const refused = p.refused;
      const reopened = new Promise((res) => c.on('open', res));
      const slow = c.request('slow', { ms: 300 });
      p.cut();
      const o = await reopened;
      assert.deepEqual([o.transport, o.resumed], ['sse', true]);
      assert.deepEqual((await slow).data, { slept_ms: 300 });
      assert.equal(p.refused, refused + 1, 'one WebSocket attempt per reconnect, refused');
    });
  }

  test('without the proxy the same default client stays on WebSocket', async () => {
    const c = await connect(stack.url('/ws/echo'), { WebSocket }, { timeout: 15_000 });
    clients.push(c);
    assert.equal(c.transport, 'websocket');
    assert.equal((await c.request('echo', 1)).data, 1);
  });
});
