// The examples are true: the 5-line example of this package's README and of
// the repository README's "Frontend" section are the same text, and it runs,
// as written (only the router's address and the package specifier are
// pointed at this test's router and at dist/), against the real router and
// vision worker.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFileSync, writeFileSync, rmSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { startStack, REPO } from './helpers/stack.mjs';

const HERE = dirname(fileURLToPath(import.meta.url));
let stack;

before(async () => {
  stack = await startStack({ workers: ['vision'] });
});
after(async () => {
  await stack?.stop();
});

/** The first ```js block after `heading` in `file`. */
function example(file, heading) {
  const text = readFileSync(file, 'utf8');
  const at = text.indexOf(heading);
  assert.ok(at >= 0, `${file} has no ${heading}`);
  const m = /```js\n([\s\S]*?)```/.exec(text.slice(at));
  assert.ok(m, `${file}: no js block after ${heading}`);
  return m[1];
}

test('the README example is the same in both READMEs and runs as written', async () => {
  const own = example(join(HERE, '..', 'README.md'), '## Example');
  const top = example(join(REPO, 'README.md'), '## Frontend');
  assert.equal(top, own, 'the repository README shows the package README\'s example');
  assert.ok(own.includes("ws://127.0.0.1:8001/ws/vision"), own);
  const dist = resolve(HERE, '..', 'dist', 'index.js');
  // Node 20 has no global WebSocket: the `ws` package stands in for the
  // browser's, as the README says.
  const script =
    `import WebSocket from 'ws'; globalThis.WebSocket = WebSocket;\n` +
    own
      .replace("'@websocket-router/client'", JSON.stringify(dist))
      .replace('ws://127.0.0.1:8001/ws/vision', stack.url('/ws/vision'));
  const file = join(resolve(HERE, '..'), `.readme-example-${process.pid}.mjs`);
  writeFileSync(file, script);
  try {
    const out = await new Promise((ok, fail) =>
      execFile(process.execPath, [file], { timeout: 30_000 }, (err, stdout, stderr) =>
        err ? fail(new Error(`${err.message}\n${stderr}`)) : ok(stdout)));
    const lines = out.trim().split('\n');
    // The stream's frames, then the request's final reply.
    assert.ok(lines.length >= 2, out);
  } finally {
    rmSync(file, { force: true });
  }
});
