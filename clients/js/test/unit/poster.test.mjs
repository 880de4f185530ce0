// The HTTP fallback's POSTs (src/poster.ts): one at a time and in order,
// batched into array bodies within their bounds, and one outcome per frame
// for every answer the router can give. `post` is scripted: each call waits
// until the test answers it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Poster } from '../../dist/poster.js';

/** A Poster whose POSTs the test answers; records rejections and failures. */
function setup(opts = {}) {
  const calls = [];
  const rejected = [];
  const failed = [];
  const poster = new Poster({
    post: (body, signal) =>
      new Promise((resolve, reject) => {
        const call = { body: JSON.parse(body), raw: body, signal, answer: resolve, error: reject };
        calls.push(call);
        signal.addEventListener('abort', () => reject(new DOMException('aborted', 'AbortError')));
      }),
    reject: (frame, error) => rejected.push([JSON.parse(frame), error]),
    fail: (reason) => failed.push(reason),
    maxBatchFrames: 64,
    maxBatchBytes: 1 << 20,
    maxBacklogBytes: 1 << 20,
    timeoutMs: 10_000,
    ...opts,
  });
  return { poster, calls, rejected, failed };
}

const tick = () => new Promise((r) => setImmediate(r));
const frame = (n) => JSON.stringify({ type: 'echo', id: n, data: n });
const ids = (body) => (Array.isArray(body) ? body.map((f) => f.id) : [body.id]);
const ok = (n) => ({ status: 202, body: { accepted: n } });

test('frames of one tick share a POST (an array); one POST at a time; what comes meanwhile goes next, in order', async () => {
  const { poster, calls } = setup();
  poster.push(frame(1));
  await tick();
  assert.equal(calls.length, 1);
  assert.deepEqual(calls[0].body, { type: 'echo', id: 1, data: 1 }, 'a single frame is posted as an object, not an array');
  poster.push(frame(2));
  poster.push(frame(3));
  poster.push(frame(4));
  await tick();
  assert.equal(calls.length, 1, 'nothing while a POST is under way');
  assert.equal(poster.backlog, 4);
  calls[0].answer(ok(1));
  await tick();
  assert.equal(calls.length, 2);
  assert.deepEqual(ids(calls[1].body), [2, 3, 4]);
  assert.equal(calls[1].raw, `[${frame(2)},${frame(3)},${frame(4)}]`, 'the frames as they were encoded');
  calls[1].answer(ok(3));
  await tick();
  assert.equal(calls.length, 2);
  assert.equal(poster.backlog, 0);
});

test('a batch stops at maxBatchFrames and maxBatchBytes; a frame bigger than maxBatchBytes still goes, alone', async () => {
  const { poster, calls } = setup({ maxBatchFrames: 3, maxBatchBytes: 100 });
  const big = JSON.stringify({ type: 'big', id: 99, data: 'x'.repeat(200) });
  for (let i = 1; i <= 5; i++) poster.push(frame(i));
  poster.push(big);
  poster.push(frame(6));
  await tick();
  const seen = [];
  while (calls.length > seen.length) {
    const c = calls[seen.length];
    seen.push(ids(c.body));
    assert.ok(ids(c.body).length === 1 || c.raw.length <= 100, `within bounds: ${c.raw.length} bytes`);
    c.answer(ok(ids(c.body).length));
    await tick();
  }
  assert.deepEqual(seen, [[1, 2, 3], [4, 5], [99], [6]]);
});

test('400 with an index: the frames before it were taken, it is refused, the ones after it are posted again', async () => {
  const { poster, calls, rejected, failed } = setup();
  for (let i = 1; i <= 4; i++) poster.push(frame(i));
  await tick();
  calls[0].answer({ status: 400, body: { error: { code: 'bad_request', message: 'no type', index: 1 } } });
  await tick();
  assert.deepEqual(rejected, [[{ type: 'echo', id: 2, data: 2 }, { code: 'bad_request', message: 'no type', status: 400 }]]);
  assert.deepEqual(ids(calls[1].body), [3, 4]);
  calls[1].answer(ok(2));
  await tick();
  assert.equal(calls.length, 2);
  assert.deepEqual(failed, []);
});

test('400 on an array without an index: each frame is posted alone, so only the bad one is refused', async () => {
  const { poster, calls, rejected } = setup();
  poster.push(frame(1));
  await tick();
  for (let i = 2; i <= 4; i++) poster.push(frame(i));
  calls[0].answer(ok(1));
  await tick();
  assert.deepEqual(ids(calls[1].body), [2, 3, 4]);
  calls[1].answer({ status: 400, body: { error: { code: 'bad_request', message: 'the body is not JSON' } } });
  await tick();
  const answers = { 2: ok(1), 3: { status: 400, body: { error: { code: 'bad_request', message: 'bad 3' } } }, 4: ok(1) };
  for (let k = 2; k < 5; k++) {
    assert.deepEqual(ids(calls[k].body), [k], 'one frame per POST');
    assert.ok(!Array.isArray(calls[k].body));
    calls[k].answer(answers[k]);
    await tick();
  }
  assert.equal(calls.length, 5);
  assert.deepEqual(rejected.map(([f, e]) => [f.id, e.code, e.message]), [[3, 'bad_request', 'bad 3']]);
  poster.push(frame(5));
  poster.push(frame(6));
  await tick();
  assert.deepEqual(ids(calls[5].body), [5, 6], 'batching resumes after the solo frames');
});

test('413 for a single frame refuses it with payload_too_large (the code from the status when the body has none)', async () => {
  const { poster, calls, rejected } = setup();
  poster.push(frame(1));
  await tick();
  calls[0].answer({ status: 413, body: undefined });
  await tick();
  assert.equal(rejected.length, 1);
  assert.equal(rejected[0][0].id, 1);
  assert.equal(rejected[0][1].code, 'payload_too_large');
  assert.equal(rejected[0][1].status, 413);
});

test('429: posted again after Retry-After (the frames before the index not), then refused with rate_limited once the retries are used up', async (t) => {
  t.mock.timers.enable({ apis: ['setTimeout'] });
  const { poster, calls, rejected } = setup({ maxRetries: 2 });
  for (let i = 1; i <= 3; i++) poster.push(frame(i));
  await tick();
  const limited = { status: 429, body: { error: { code: 'rate_limited', message: 'full', index: 1 } }, retryAfterMs: 1000 };
  calls[0].answer(limited);
  await tick();
  poster.push(frame(4));
  await tick();
  assert.equal(calls.length, 1, 'nothing before Retry-After');
  t.mock.timers.tick(999);
  await tick();
  assert.equal(calls.length, 1);
  t.mock.timers.tick(1);
  await tick();
  assert.deepEqual(ids(calls[1].body), [2, 3, 4], 'the refused frames first, then the new one, in order');
  calls[1].answer({ ...limited, body: { error: { code: 'rate_limited', message: 'full', index: 0 } } });
  await tick();
  t.mock.timers.tick(1000);
  await tick();
  assert.deepEqual(ids(calls[2].body), [2, 3, 4]);
  calls[2].answer({ ...limited, body: { error: { code: 'rate_limited', message: 'full', index: 1 } } });
  await tick();
  assert.deepEqual(rejected.map(([f, e]) => [f.id, e.code, e.retry_after_ms]), [[3, 'rate_limited', 1000], [4, 'rate_limited', 1000]]);
  assert.equal(calls.length, 3);
  assert.equal(poster.backlog, 0);
});

for (const [what, act] of [
  ['a 401 (the session is gone)', (c) => c.answer({ status: 401, body: { error: { code: 'unauthorized', message: 'no live session' } } })],
  ['a 404', (c) => c.answer({ status: 404, body: { error: { code: 'unknown_route', message: 'no route' } } })],
  ['a 502 from a proxy, without JSON', (c) => c.answer({ status: 502, body: undefined })],
  ['a network error', (c) => c.error(new TypeError('fetch failed'))],
]) {
  test(`${what} fails the connection once; nothing is posted or reported after it`, async () => {
    const { poster, calls, rejected, failed } = setup();
    poster.push(frame(1));
    await tick();
    poster.push(frame(2));
    act(calls[0]);
    await tick();
    assert.equal(failed.length, 1, failed.join());
    poster.push(frame(3));
    await tick();
    assert.equal(calls.length, 1);
    assert.deepEqual(rejected, []);
    assert.equal(poster.backlog, 0);
  });
}

test('a POST without an answer within timeoutMs is aborted and fails the connection', async (t) => {
  t.mock.timers.enable({ apis: ['setTimeout'] });
  const { poster, calls, failed } = setup({ timeoutMs: 5000 });
  poster.push(frame(1));
  await tick();
  t.mock.timers.tick(4999);
  await tick();
  assert.deepEqual(failed, []);
  t.mock.timers.tick(1);
  await tick();
  assert.equal(calls[0].signal.aborted, true);
  assert.deepEqual(failed, ['no answer to a POST within 5000 ms']);
});

test('close() aborts the POST under way and reports nothing, whatever answers later', async () => {
  const { poster, calls, rejected, failed } = setup();
  poster.push(frame(1));
  await tick();
  poster.push(frame(2));
  poster.close();
  assert.equal(calls[0].signal.aborted, true);
  calls[0].answer({ status: 400, body: { error: { code: 'bad_request', message: 'x' } } });
  await tick();
  assert.deepEqual([calls.length, rejected, failed], [1, [], []]);
});

test('the backlog is bounded in bytes: past maxBacklogBytes push refuses; answered and refused frames free their bytes, retried ones keep them', async () => {
  const size = Buffer.byteLength(frame(1));
  const { poster, calls, rejected } = setup({ maxBacklogBytes: 3 * size });
  assert.equal(poster.push(frame(1)), true);
  await tick();
  assert.equal(poster.push(frame(2)), true);
  assert.equal(poster.push(frame(3)), true);
  assert.equal(poster.push(frame(4)), false, 'a fourth frame would pass the bound');
  calls[0].answer(ok(1));
  await tick();
  assert.equal(poster.push(frame(4)), true, 'the answered frame freed its bytes');
  assert.equal(poster.push(frame(5)), false);
  // [2,3,4] under way: 3 is refused, 4 goes again and keeps its bytes.
  calls[1].answer({ status: 400, body: { error: { code: 'bad_request', message: 'no', index: 1 } } });
  await tick();
  assert.deepEqual(rejected.map(([f]) => f.id), [3]);
  assert.deepEqual(ids(calls[2].body), [4]);
  assert.equal(poster.push(frame(5)), true);
  assert.equal(poster.push(frame(6)), true);
  assert.equal(poster.push(frame(7)), false, '4, 5 and 6 are waiting');
  const big = JSON.stringify({ type: 'echo', id: 9, data: 'x'.repeat(10 * size) });
  poster.close();
  const fresh = setup({ maxBacklogBytes: 3 * size }).poster;
  assert.equal(fresh.push(big), true, 'an empty backlog takes one frame of any size (the route bounds it)');
});
