// The console page's client (router/assets/console/client.js, embedded in the
// router's binary) is the bundle of these sources: a fresh bundle must be
// byte for byte the file in the tree, or the router serves a stale client.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { bundle, OUT } from '../../scripts/bundle.mjs';

test('router/assets/console/client.js is a fresh bundle of src/ (else: npm run bundle)', async () => {
  assert.ok(existsSync(OUT), `${OUT} is missing: run npm run bundle in clients/js`);
  const fresh = await bundle();
  const committed = readFileSync(OUT, 'utf8');
  if (committed !== fresh) {
    const a = committed.split('\n');
    const b = fresh.split('\n');
    const at = a.findIndex((line, i) => line !== b[i]);
    assert.fail(
      `router/assets/console/client.js differs from a fresh bundle of src/ (first at line ${at + 1}: ` +
        `${JSON.stringify(a[at]?.slice(0, 80))} vs ${JSON.stringify(b[at]?.slice(0, 80))}): run npm run bundle in clients/js`,
    );
  }
});

test('the bundle is one ES module with the public API and no imports', async () => {
  const text = await bundle();
  assert.doesNotMatch(text, /^\s*import\s/m, 'nothing imported: one file');
  assert.match(text, /^export \{\n {2}Client,\n {2}RouterError,\n {2}connect,\n {2}fullJitter\n\};\s*$/m);
});
