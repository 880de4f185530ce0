// The client over the HTTP fallback (an event stream down, POSTs up) and the
// fallback from WebSocket to it, against a scripted router
// (helpers/fake-fetch.mjs) and a scripted WebSocket (helpers/fake-socket.mjs).
// Time is node:test's mock clock; streams and fetches run on real promises,
// let through with flush().
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Client, connect, RouterError } from '../../dist/index.js';
import { FakeRouter, flush } from '../helpers/fake-fetch.mjs';
import { FakeSocket, WELCOME } from '../helpers/fake-socket.mjs';

const RESUMABLE = { ...WELCOME, resume_token: 'tok-1', resume_ttl_ms: 30_000 };

function setup(t, opts = {}, url = 'ws://router.test/ws/echo?token=abc') {
  t.mock.timers.enable({ apis: ['setTimeout', 'Date'] });
  FakeSocket.reset();
  const router = new FakeRouter();
  const client = new Client(url, {
    transports: ['sse'],
    fetch: router.fetch,
    events: null,
    random: () => 0.5,
    pingIntervalMs: 0,
    ...opts,
  });
  t.after(() => client.close());
  const events = [];
  for (const e of ['state', 'open', 'close', 'error', 'binary']) client.on(e, (v) => events.push([e, v]));
  return { client, router, events };
}

/** The promise, already handled (it may reject before the test awaits it). */
const early = (p) => {
  p.catch(() => {});
  return p;
};

const of = (events, name) => events.filter(([e]) => e === name).map(([, v]) => v);

/** Runs the reconnect timer the last close event announced. */
async function reconnect(t, events) {
  const close = of(events, 'close').pop();
  assert.ok(close && close.reconnectInMs !== undefined, 'a close event announced a reconnect');
  t.mock.timers.tick(close.reconnectInMs);
  await flush();
  return close;
}

test('over SSE: the GET, the welcome, a request POSTed with the session headers (frames of a tick in one POST), its reply', async (t) => {
  const { client, router, events } = setup(t, { protocols: ['bearer', 'jwt-1'] });
  const partials = [];
  const reply = client.request('echo', { a: 1 }, { onPartial: (f) => partials.push(f.data) });
  client.send('note', 1);
  await flush();
  assert.equal(router.streams.length, 1);
  const s = router.last;
  assert.equal(s.url.href, 'http://router.test/ws/echo?token=abc', 'ws:// becomes http://, the query kept');
  assert.equal(s.headers.accept, 'text/event-stream');
  assert.equal(s.headers.authorization, 'Bearer jwt-1', 'a bearer subprotocol becomes the Authorization header');
  assert.equal(router.posts.length, 0, 'nothing is posted before the welcome');

  s.welcome(RESUMABLE);
  await flush();
  assert.equal(client.state, 'open');
  assert.equal(client.transport, 'sse');
  assert.equal(of(events, 'open')[0].transport, 'sse');
  assert.equal(router.posts.length, 1);
  const p = router.posts[0];
  assert.equal(p.url.href, 'http://router.test/ws/echo', 'POSTs go to the route, without the query');
  assert.equal(p.headers['x-session-id'], 's1');
  assert.equal(p.headers['x-resume-token'], 'tok-1');
  assert.equal(p.headers['content-type'], 'application/json');
  assert.equal(p.headers['x-post-seq'], '1', 'POSTs are numbered, so the router takes a repeated one once');
  assert.deepEqual(p.body, [
    { type: 'echo', id: 1, data: { a: 1 } },
    { type: 'note', data: 1 },
  ]);

  s.frame({ type: 'echo', id: 1, data: { part: 1 }, done: false, seq: 1 });
  s.frame({ type: 'echo', id: 1, data: { a: 1 }, done: true, seq: 2 });
  const r = await reply;
  assert.deepEqual(r.data, { a: 1 });
  assert.deepEqual(partials, [{ part: 1 }]);
  assert.equal(client.stats.lastSeq, 2);
});

test('over SSE: a frame the router refuses (400 naming its index) fails its request as an error frame would; the ones after it go again', async (t) => {
  const { client, router } = setup(t);
  await flush();
  router.last.welcome(RESUMABLE);
  await flush();
  router.autoAccept = false;
  const r1 = client.request('echo', 1);
  const r2 = early(client.request('echo', 2));
  const r3 = client.request('echo', 3);
  await flush();
  assert.deepEqual(router.posts[0].body.map((f) => f.id), [1, 2, 3]);
  router.posts[0].answer(400, { error: { code: 'bad_request', message: 'frame 2 is bad', index: 1 } });
  await flush();
  await assert.rejects(r2, (e) => e instanceof RouterError && e.code === 'bad_request' && e.message === 'frame 2 is bad' && e.source === 'router');
  assert.deepEqual(router.posts[1].body, { type: 'echo', id: 3, data: 3 }, 'the frame after the refused one, posted again');
  router.posts[1].answer(202, { accepted: 1 });
  router.last.frame({ type: 'echo', id: 1, data: 1, done: true, seq: 1 });
  router.last.frame({ type: 'echo', id: 3, data: 3, done: true, seq: 2 });
  assert.deepEqual([(await r1).data, (await r3).data], [1, 3]);
  assert.equal(client.stats.pending, 0);
});

test('over SSE: a copy of a running request refused as a duplicate id (a browser repeated its POST) is not the request\'s outcome', async (t) => {
  const { client, router } = setup(t);
  await flush();
  router.last.welcome(RESUMABLE);
  await flush();
  const r = client.request('slow', { ms: 100 });
  let settled = false;
  r.then(() => (settled = true), () => (settled = true));
  await flush();
  router.last.frame({ type: 'error', id: 1, done: true, error: { code: 'bad_request', message: 'a request with this id is already in flight' }, seq: 1 });
  router.last.frame({ type: 'error', id: 1, done: true, error: { code: 'bad_request', message: 'duplicate', reason: 'duplicate_id' }, seq: 2 });
  await flush();
  assert.equal(settled, false, 'still waiting for the original');
  assert.equal(client.stats.duplicates, 2);
  router.last.frame({ type: 'slow', id: 1, data: { slept_ms: 100 }, done: true, seq: 3 });
  assert.deepEqual((await r).data, { slept_ms: 100 });
  // Another bad_request is an outcome as usual.
  const bad = early(client.request('echo', 1));
  await flush();
  router.last.frame({ type: 'error', id: 2, done: true, error: { code: 'bad_request', message: 'no' }, seq: 4 });
  await assert.rejects(bad, (e) => e.code === 'bad_request');
});

test('over SSE: sendBinary throws not_supported; binary events from the router arrive as bytes', async (t) => {
  const { client, router, events } = setup(t);
  assert.throws(() => client.sendBinary(new Uint8Array([1])), (e) => e.code === 'not_supported' && /HTTP fallback/.test(e.message));
  await flush();
  router.last.welcome(RESUMABLE);
  router.last.binary(new Uint8Array([0, 1, 255]));
  await flush();
  assert.deepEqual(of(events, 'binary').map((b) => [...b]), [[0, 1, 255]]);
  assert.throws(() => client.sendBinary(new Uint8Array([1])), (e) => e.code === 'not_supported');
  assert.equal(router.posts.length, 0);
});

test('over SSE: resume after the stream breaks: query with session, token and last_seq; resumed; POSTs use the old session and the new token; the stream goes on', async (t) => {
  const { client, router, events } = setup(t);
  await flush();
  const s1 = router.last;
  s1.welcome(RESUMABLE);
  await flush();
  const frames = [];
  const done = (async () => {
    for await (const f of client.stream('stream', { n: 2 })) frames.push(f.data);
  })();
  await flush();
  s1.frame({ type: 'stream', id: 1, data: { i: 0 }, done: false, seq: 1 });
  await flush();
  s1.fail();
  await flush();
  assert.equal(client.state, 'reconnecting');
  await reconnect(t, events);
  const s2 = router.last;
  assert.equal(router.streams.length, 2);
  assert.deepEqual(Object.fromEntries(s2.url.searchParams), { token: 'abc', session_id: 's1', resume_token: 'tok-1', last_seq: '1' });

  s2.welcome({ ...RESUMABLE, session_id: 's2', resume_token: 'tok-fresh' });
  s2.frame({ type: 'resumed', id: 'sse-resume', done: true, data: { session_id: 's1', resume_token: 'tok-2', replayed: 1, in_flight: [1] } });
  s2.frame({ type: 'stream', id: 1, data: { i: 1 }, done: false, seq: 2 });
  await flush();
  const barrier = router.posts.at(-1);
  assert.equal(barrier.body.type, 'ping', 'the barrier ping');
  assert.equal(barrier.headers['x-session-id'], 's1', 'the resumed session');
  assert.equal(barrier.headers['x-resume-token'], 'tok-2', 'its new token');
  assert.equal(router.framesOf('stream').length, 1, 'a request the router still runs is not sent again');
  s2.frame({ type: 'pong', id: barrier.body.id, done: true, seq: 3 });
  await flush();
  const open = of(events, 'open').pop();
  assert.deepEqual([open.resumed, open.replayed, open.transport], [true, 1, 'sse']);
  s2.frame({ type: 'stream', id: 1, data: { n: 2 }, done: true, seq: 4 });
  await done;
  assert.deepEqual(frames, [{ i: 0 }, { i: 1 }, { n: 2 }]);
  assert.equal(client.sessionId, 's1');
});

test('over SSE: a failed resume: sent requests reject connection_lost with the reason; POSTs use the fresh session', async (t) => {
  const { client, router, events } = setup(t);
  await flush();
  router.last.welcome(RESUMABLE);
  await flush();
  const slow = early(client.request('slow', {}));
  await flush();
  router.last.fail();
  await flush();
  await reconnect(t, events);
  const s2 = router.last;
  s2.welcome({ ...RESUMABLE, session_id: 's2', resume_token: 'tok-s2' });
  s2.frame({ type: 'error', id: 'sse-resume', done: true, error: { code: 'resume_failed', reason: 'expired', message: 'gone' }, seq: 1 });
  await flush();
  await assert.rejects(slow, (e) => e.code === 'connection_lost' && e.reason === 'expired' && e.retryable);
  assert.equal(client.state, 'open');
  client.send('after', 1);
  await flush();
  const p = router.posts.at(-1);
  assert.deepEqual(p.body, { type: 'after', data: 1 });
  assert.deepEqual([p.headers['x-session-id'], p.headers['x-resume-token']], ['s2', 'tok-s2']);
  assert.equal(of(events, 'open').pop().resumeError.reason, 'expired');
});

test('over SSE: no event for 3 ping intervals (welcome.heartbeat_ms) is a dead stream; keep-alive comments count', async (t) => {
  const { client, router, events } = setup(t);
  await flush();
  const s = router.last;
  s.welcome({ ...RESUMABLE, heartbeat_ms: 1000 });
  await flush();
  t.mock.timers.tick(2000);
  s.keepAlive();
  await flush();
  t.mock.timers.tick(2999);
  await flush();
  assert.equal(client.state, 'open', 'the keep-alive at 2000 ms moved the deadline to 5000 ms');
  t.mock.timers.tick(1);
  await flush();
  assert.equal(client.state, 'reconnecting');
  assert.match(of(events, 'close')[0].reason, /no event for 3000 ms/);
  assert.equal(s.aborted, true, 'the dead stream is given up');
});

test("over SSE: the router's close event ends the client for a permanent code; a POST answered 401 loses the connection, which resumes", async (t) => {
  const { client, router, events } = setup(t);
  await flush();
  router.last.welcome(RESUMABLE);
  await flush();
  router.autoAccept = false;
  const r = early(client.request('echo', 1));
  await flush();
  router.posts[0].answer(401, { error: { code: 'unauthorized', message: 'no live session with this id and token' } });
  await flush();
  const lost = of(events, 'close')[0];
  assert.equal(lost.code, 1006);
  assert.match(lost.reason, /401 unauthorized: no live session/);
  await reconnect(t, events);
  assert.equal(router.last.url.searchParams.get('session_id'), 's1', 'a resume is asked for');
  router.autoAccept = true;
  router.last.welcome(RESUMABLE);
  router.last.closeEvent(4001, 'bye');
  await flush();
  assert.equal(client.state, 'closed');
  assert.deepEqual(of(events, 'close').pop(), { code: 4001, reason: 'bye' });
  await assert.rejects(r, (e) => e.code === 'closed');
});

// ---------------------------------------------------------------- fallback

function both(t, opts = {}) {
  return setup(t, { transports: undefined, WebSocket: FakeSocket, ...opts }, 'ws://router.test/ws/echo');
}

test('fallback: a WebSocket that fails before its welcome hands over to SSE at once; after the stream drops, the next round tries WebSocket first and resumes on whichever connects', async (t) => {
  const { client, router, events } = both(t);
  assert.equal(client.transport, 'websocket');
  assert.equal(FakeSocket.all.length, 1);
  FakeSocket.last.drop(1006); // e.g. a proxy refused the upgrade
  const c = await reconnect(t, events);
  assert.equal(c.reconnectInMs, 0, 'no backoff before the next transport');
  assert.equal(router.streams.length, 1);
  assert.equal(client.transport, 'sse');
  router.last.welcome(RESUMABLE);
  await flush();
  assert.equal(of(events, 'open')[0].transport, 'sse');
  router.last.fail();
  await flush();
  // A drop after the welcome: a backoff, then WebSocket first again.
  const c2 = await reconnect(t, events);
  assert.ok(c2.reconnectInMs > 0, 'a backoff: the drop was not a failure of a transport');
  assert.equal(FakeSocket.all.length, 2, 'WebSocket is tried again');
  assert.equal(client.transport, 'websocket');
  FakeSocket.last.drop(1006); // still refused: SSE at once, and it resumes
  const c3 = await reconnect(t, events);
  assert.equal(c3.reconnectInMs, 0);
  assert.equal(router.streams.length, 2);
  assert.equal(router.last.url.searchParams.get('session_id'), 's1', 'the event stream asks for the resume');
  router.last.welcome({ ...RESUMABLE, session_id: 's9' });
  router.last.frame({ type: 'resumed', id: 'sse-resume', done: true, data: { session_id: 's1', resume_token: 't2', replayed: 0, in_flight: [] } });
  await flush();
  router.last.frame({ type: 'pong', id: router.posts.at(-1).body.id, done: true, seq: 1 });
  await flush();
  assert.equal(client.state, 'open');
  assert.equal(client.transport, 'sse');
});

test('fallback: when SSE fails too, the next round starts with WebSocket again, after the backoff', async (t) => {
  const { client, router, events } = both(t);
  router.getError = new TypeError('fetch failed');
  FakeSocket.last.drop(1006);
  await reconnect(t, events);
  assert.equal(router.streams.length, 0);
  const c = of(events, 'close').pop();
  assert.match(c.reason, /cannot open the event stream: fetch failed/);
  assert.ok(c.reconnectInMs > 0, 'a backoff after the round');
  assert.equal(client.transport, 'websocket');
  t.mock.timers.tick(c.reconnectInMs);
  assert.equal(FakeSocket.all.length, 2);
  FakeSocket.last.accept(RESUMABLE);
  assert.equal(of(events, 'open')[0].transport, 'websocket');
});

test('fallback: a WebSocket that dropped after its welcome reconnects as a WebSocket (not a failure of the transport)', async (t) => {
  const { client, router, events } = both(t);
  FakeSocket.last.accept(RESUMABLE);
  FakeSocket.last.drop(1006);
  const c = await reconnect(t, events);
  assert.ok(c.reconnectInMs > 0);
  assert.equal(FakeSocket.all.length, 2);
  assert.equal(router.streams.length, 0);
  assert.equal(client.transport, 'websocket');
});

test('fallback: a route without an event stream (400) leaves WebSocket only, and says so; with SSE alone the client closes', async (t) => {
  const { client, router, events } = both(t);
  router.getStatus = 400;
  router.getBody = { error: { code: 'bad_request', message: '/ws/echo: the event-stream fallback needs session resume on the route' } };
  FakeSocket.last.drop(1006);
  await reconnect(t, events);
  const err = of(events, 'error')[0];
  assert.equal(err.code, 'not_supported');
  assert.match(err.message, /needs session resume/);
  assert.equal(client.transport, 'websocket');
  t.mock.timers.tick(of(events, 'close').pop().reconnectInMs);
  assert.equal(FakeSocket.all.length, 2);
  FakeSocket.last.drop(1006);
  const c = of(events, 'close').pop();
  assert.ok(c.reconnectInMs > 0, 'no SSE attempt any more');
  assert.equal(router.streams.length, 1);

  const solo = new FakeRouter();
  solo.getStatus = 400;
  const p = early(connect('ws://router.test/ws/raw', { transports: ['sse'], fetch: solo.fetch, events: null }));
  await flush();
  await assert.rejects(p, (e) => e.code === 'closed');
});

test('fallback: a binary frame queued before the switch is reported (not_supported), not dropped silently; text frames go', async (t) => {
  const { client, router, events } = both(t);
  client.sendBinary(new Uint8Array([1, 2]));
  client.send('text', 1);
  FakeSocket.last.drop(1006);
  await reconnect(t, events);
  router.last.welcome(RESUMABLE);
  await flush();
  assert.deepEqual(of(events, 'error').map((e) => e.code), ['not_supported']);
  assert.deepEqual(router.frames(), [{ type: 'text', data: 1 }]);
  assert.equal(client.stats.queued, 0);
});

test('transports option: validated; without a WebSocket, SSE alone works and the default says what to pass', (t) => {
  const router = new FakeRouter();
  assert.throws(() => new Client('ws://x/ws', { transports: [], fetch: router.fetch }), /options\.transports/);
  assert.throws(() => new Client('ws://x/ws', { transports: ['smoke'], fetch: router.fetch }), /options\.transports/);
  if (!globalThis.WebSocket) {
    assert.throws(() => new Client('ws://x/ws', { fetch: router.fetch }), /options\.WebSocket.*transports: \["sse"\]/);
  }
  const c = new Client('ws://x/ws', { transports: ['sse'], fetch: router.fetch, events: null });
  t.after(() => c.close());
  assert.equal(c.transport, 'sse');
});

test('over SSE: close() ends the session with a DELETE (session headers), and lets the stream go once it is answered', async (t) => {
  const { client, router } = setup(t);
  await flush();
  const s = router.last;
  s.welcome(RESUMABLE);
  await flush();
  client.send('a', 1);
  await flush();
  client.send('b', 2);
  await flush();
  assert.deepEqual(router.posts.map((p) => p.headers['x-post-seq']), ['1', '2'], 'numbered one after the other');
  client.close();
  assert.equal(s.aborted, false, 'the stream is kept until the DELETE is answered');
  await flush();
  assert.equal(router.deletes.length, 1);
  const d = router.deletes[0];
  assert.equal(d.url.href, 'http://router.test/ws/echo', 'to the route, without the query');
  assert.equal(d.headers['x-session-id'], 's1');
  assert.equal(d.headers['x-resume-token'], 'tok-1');
  assert.equal(s.aborted, true, 'then the stream goes');
  assert.equal(client.state, 'closed');
});
