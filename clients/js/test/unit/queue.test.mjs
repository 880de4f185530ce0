// The offline queue's two bounds, and byte counting.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { OfflineQueue } from '../../dist/queue.js';
import { utf8Length, byteSize } from '../../dist/frames.js';

test('refuses the frame beyond the count bound, and takes one again after a removal', () => {
  const q = new OfflineQueue(3, 1_000);
  assert.equal(q.offer({ payload: 'a', bytes: 1, key: '1' }), true);
  assert.equal(q.offer({ payload: 'b', bytes: 1, key: '2' }), true);
  assert.equal(q.offer({ payload: 'c', bytes: 1 }), true);
  assert.equal(q.offer({ payload: 'd', bytes: 1 }), false);
  assert.equal(q.length, 3);
  assert.equal(q.remove('2'), true);
  assert.equal(q.remove('2'), false);
  assert.equal(q.offer({ payload: 'd', bytes: 1 }), true);
  assert.deepEqual(q.drain().map((i) => i.payload), ['a', 'c', 'd']);
  assert.equal(q.length, 0);
  assert.equal(q.bytes, 0);
});

test('refuses the frame that would pass the byte bound, whatever the count', () => {
  const q = new OfflineQueue(100, 10);
  assert.equal(q.offer({ payload: 'x', bytes: 6 }), true);
  assert.equal(q.offer({ payload: 'y', bytes: 5 }), false, '6 + 5 > 10');
  assert.equal(q.offer({ payload: 'y', bytes: 4 }), true, '6 + 4 = 10 fits');
  assert.equal(q.bytes, 10);
  assert.equal(q.offer({ payload: 'z', bytes: 0 }), true, 'an empty frame still fits');
  assert.equal(new OfflineQueue(100, 10).offer({ payload: 'big', bytes: 11 }), false, 'one frame over the bound alone');
});

test('restore puts a cut-short flush back in front, in order', () => {
  const q = new OfflineQueue(10, 100);
  for (const p of ['a', 'b', 'c']) q.offer({ payload: p, bytes: 1 });
  const items = q.drain();
  q.offer({ payload: 'late', bytes: 1 });
  q.restore(items.slice(1));
  assert.deepEqual(q.drain().map((i) => i.payload), ['b', 'c', 'late']);
});

test('utf8Length matches the encoder for every kind of character', () => {
  const samples = ['', 'plain ascii', 'é', 'ßüö', '€ 3 bytes', '日本語', '😀 pair', 'mixed é€😀\u0000', '\u07ff\u0800\uffff'];
  for (const s of samples) assert.equal(utf8Length(s), Buffer.byteLength(s, 'utf8'), JSON.stringify(s));
  assert.equal(byteSize(new Uint8Array(7)), 7);
  assert.equal(byteSize(new ArrayBuffer(9)), 9);
  assert.equal(byteSize(new Blob(['abcd'])), 4);
});
