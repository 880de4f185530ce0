// The built client stays small enough to drop into any page (README: the
// best-known clients are 3 to 23 KB gzipped). A budget, so growth is a decision:
// 12 KB until the HTTP fallback (an SSE transport, its parser and POST
// batching: about 4.7 KB gzipped) raised it to 14 KB.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { measure } from '../../scripts/size.mjs';

const BUDGET_GZIP_BYTES = 14 * 1024;

test(`the built client is under ${BUDGET_GZIP_BYTES} bytes gzipped`, () => {
  const { gzip, rows } = measure();
  assert.ok(rows.some((r) => r.file === 'index.js'), 'dist/ is built');
  assert.ok(gzip < BUDGET_GZIP_BYTES, `${gzip} bytes gzipped`);
});
