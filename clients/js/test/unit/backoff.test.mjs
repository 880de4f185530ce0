// Backoff: full-jitter bounds, growth, cap, and the reset after a stable connection.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Backoff, fullJitter } from '../../dist/backoff.js';

const ALMOST_ONE = 1 - Number.EPSILON;

test('each delay lies in [0, min(cap, base * 2^attempt))', () => {
  const cases = [
    // attempt, base, cap, expected ceiling
    [0, 500, 25_000, 500],
    [1, 500, 25_000, 1_000],
    [2, 500, 25_000, 2_000],
    [5, 500, 25_000, 16_000],
    [6, 500, 25_000, 25_000], // 32 000 capped
    [40, 500, 25_000, 25_000], // no overflow far out
    [1_000, 500, 25_000, 25_000],
  ];
  for (const [attempt, base, cap, ceiling] of cases) {
    assert.equal(fullJitter(attempt, base, cap, () => 0), 0, `attempt ${attempt}: lowest`);
    const top = fullJitter(attempt, base, cap, () => ALMOST_ONE);
    assert.ok(top < ceiling && top >= ceiling - 1, `attempt ${attempt}: highest ${top} just under ${ceiling}`);
    for (let i = 0; i < 200; i++) {
      const d = fullJitter(attempt, base, cap);
      assert.ok(Number.isInteger(d) && d >= 0 && d < ceiling, `attempt ${attempt}: ${d} outside [0, ${ceiling})`);
    }
  }
});

test('the jitter is spread over the whole window (not a fixed delay)', () => {
  const n = 4000;
  const samples = Array.from({ length: n }, () => fullJitter(3, 500, 25_000)); // window [0, 4000)
  const mean = samples.reduce((a, b) => a + b, 0) / n;
  assert.ok(Math.abs(mean - 2000) < 150, `mean ${mean} should be near 2000`);
  const low = samples.filter((d) => d < 1000).length / n;
  const high = samples.filter((d) => d >= 3000).length / n;
  assert.ok(low > 0.2 && high > 0.2, `quartiles used: low ${low}, high ${high}`);
});

test('attempts grow until a connection stays up for stableMs', () => {
  const b = new Backoff({ baseMs: 500, capMs: 25_000, stableMs: 10_000 }, () => ALMOST_ONE);
  const first = [b.next(), b.next(), b.next(), b.next()];
  assert.deepEqual(first, [499, 999, 1999, 3999]);
  b.ended(9_999); // not stable: keeps growing
  assert.equal(b.next(), 7999);
  b.ended(10_000); // stable: starts over
  assert.equal(b.attempt, 0);
  assert.equal(b.next(), 499);
});
