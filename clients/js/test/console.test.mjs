// The router's console page (GET /console, router/assets/console/) in a real
// browser: Debian's chromium, headless, driven by puppeteer-core. The router
// serves the page and the bundled client itself; the page loads the routes,
// connects over WebSocket and over SSE, sends an echo and a vision analysis,
// cancels a slow request, subscribes to a topic, drops the connection and
// shows the resume. No console error may appear. Screenshots go to
// test-artifacts/ (gitignored).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import puppeteer from 'puppeteer-core';
import { REPO, startStack } from './helpers/stack.mjs';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const ARTIFACTS = join(ROOT, 'test-artifacts');
const ASSETS = join(REPO, 'router', 'assets', 'console');
const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const WAIT = { timeout: 15_000 };

let stack;
let browser;
let page;
let origin;
const problems = [];

before(async () => {
  if (!existsSync(CHROMIUM)) throw new Error(`no chromium at ${CHROMIUM}: apt-get install -y chromium (or set CHROMIUM_PATH)`);
  mkdirSync(ARTIFACTS, { recursive: true });
  stack = await startStack({ workers: ['echo', 'vision'] });
  origin = `http://${stack.router.http}`;
  browser = await puppeteer.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox', '--disable-gpu'] });
  page = await browser.newPage();
  await page.setViewport({ width: 1280, height: 1000 });
  page.on('console', (m) => m.type() === 'error' && problems.push(`console error: ${m.text()}`));
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('requestfailed', (r) => {
    // Aborted on purpose: the event stream of a connection the page dropped or closed.
    if (r.failure()?.errorText !== 'net::ERR_ABORTED') problems.push(`request failed: ${r.url()} ${r.failure()?.errorText}`);
  });
});

after(async () => {
  await browser?.close();
  await stack?.stop();
});

/** The page's current connection number (log rows carry it). */
const conn = () => page.$eval('html', (el) => el.dataset.conn);

/** Fills an input (replacing its value). */
async function fill(selector, value) {
  await page.$eval(selector, (el, v) => {
    el.value = v;
    el.dispatchEvent(new Event('input', { bubbles: true }));
  }, value);
}

/** Connects the page to `path` over `transport`; resolves with the welcome it shows. */
async function connectTo(path, transport) {
  await page.select('#route', path);
  await page.click(`#transport-${transport}`);
  await page.click('#connect');
  await page.waitForFunction(() => document.getElementById('state').dataset.state === 'open', WAIT);
  return JSON.parse(await page.$eval('#welcome', (el) => el.textContent));
}

/** Sends a request from the form; resolves with its id. */
async function request(type, data) {
  await fill('#type', type);
  await fill('#data', JSON.stringify(data));
  const before = await page.$$eval('#requests details', (d) => d.length);
  await page.click('#send-request');
  await page.waitForFunction((n) => document.querySelectorAll('#requests details').length > n, WAIT, before);
  return page.$eval('#requests details', (d) => d.dataset.id); // the newest is first
}

/** The log rows of incoming frames for request `id` of the current connection. */
async function inRows(id) {
  return page.$$eval(`#log tr[data-dir="in"][data-conn="${await conn()}"][data-id="${id}"]`, (rows) =>
    rows.map((r) => {
      const c = [...r.cells].map((td) => td.textContent);
      return { seq: c[2], type: c[3], id: c[4], correlationId: c[5], latency: c[6], data: c[7], done: r.dataset.done };
    }),
  );
}

test('the router serves the console files of router/assets/console (the binary is not stale)', async () => {
  for (const [path, file, type] of [
    ['/console', 'index.html', 'text/html'],
    ['/console/console.js', 'console.js', 'text/javascript'],
    ['/console/console.css', 'console.css', 'text/css'],
    ['/console/client.js', 'client.js', 'text/javascript'],
  ]) {
    const res = await fetch(origin + path);
    assert.equal(res.status, 200, path);
    assert.match(res.headers.get('content-type'), new RegExp(`^${type}`), path);
    const served = await res.text();
    assert.ok(
      served === readFileSync(join(ASSETS, file), 'utf8'),
      `${path} differs from router/assets/console/${file}: the router binary embeds older assets (rebuild it: cargo build -p router)`,
    );
  }
});

test('in chromium: routes, connect over WebSocket, an echo with seq, correlation_id and latency', async () => {
  await page.goto(`${origin}/console`);
  await page.waitForFunction(() => document.querySelectorAll('#route option').length >= 2, WAIT);
  const routes = await page.$$eval('#routes tbody tr', (rows) => rows.map((r) => [...r.cells].map((c) => c.textContent)));
  const echoRoute = routes.find((r) => r[0] === '/ws/echo');
  assert.ok(echoRoute, JSON.stringify(routes));
  assert.match(echoRoute[2], /\becho\b/, 'the types its worker announced');
  assert.equal(echoRoute[4], '1', 'one live worker');
  assert.equal(echoRoute[5], 'closed', 'breaker state');

  const welcome = await connectTo('/ws/echo', 'websocket');
  assert.equal(welcome.route, '/ws/echo');
  assert.match(await page.$eval('#transport-now', (el) => el.textContent), /WebSocket/);
  const id = await request('echo', { hello: 'console' });
  await page.waitForSelector(`#log tr[data-dir="in"][data-conn="${await conn()}"][data-id="${id}"][data-done="true"]`, WAIT);
  const [reply] = await inRows(id);
  assert.equal(reply.type, 'echo');
  assert.deepEqual(JSON.parse(reply.data), { hello: 'console' });
  assert.match(reply.seq, /^\d+$/);
  assert.ok(reply.correlationId.length > 0, 'correlation_id shown');
  assert.match(reply.latency, /^\d+ ms$/);
  assert.equal(await page.$eval(`#requests details[data-id="${id}"]`, (d) => d.dataset.state), 'done');
  await page.screenshot({ path: join(ARTIFACTS, 'console-echo.png'), fullPage: true });

  // Frames come from workers, which are not trusted: markup in them is text.
  const markup = '<img src=x onerror="window.__pwned=1"><b id="injected">b</b>';
  const xid = await request('echo', { html: markup });
  await page.waitForSelector(`#log tr[data-dir="in"][data-conn="${await conn()}"][data-id="${xid}"][data-done="true"]`, WAIT);
  const [echoed] = await inRows(xid);
  assert.deepEqual(JSON.parse(echoed.data), { html: markup }, 'shown as text');
  assert.equal(await page.$('#injected'), null, 'no element made from a frame');
  assert.equal(await page.$$eval('img', (imgs) => imgs.length), 0);
  assert.equal(await page.evaluate(() => window.__pwned), undefined);
});

test('in chromium: cancel a running request; subscribe to a topic; drop the connection and see the resume', async () => {
  const id = await request('slow', { ms: 60_000 });
  await page.click(`#requests details[data-id="${id}"] summary button`);
  await page.waitForSelector(`#requests details[data-id="${id}"][data-state="cancelled"]`, WAIT);

  await fill('#topic', 'console-news');
  await page.click('#subscribe');
  await page.waitForFunction(() => document.querySelector('#log tr[data-type="subscribed"]'), WAIT);
  await request('publish', { topic: 'console-news', data: { headline: 'hi' } });
  // The publication: a frame with the topic, shown as "<type> (<topic>)".
  await page.waitForFunction(() => [...document.querySelectorAll('#log tr[data-dir="in"]')].some((r) => r.cells[3].textContent.endsWith('(console-news)')), WAIT);

  await page.click('#drop');
  await page.waitForFunction(() => [...document.querySelectorAll('#log tr.event')].some((r) => /resumed, \d+ frame\(s\) replayed/.test(r.textContent)), WAIT);
  await page.waitForFunction(() => document.getElementById('state').dataset.state === 'open', WAIT);
  const again = await request('echo', 'after the drop');
  await page.waitForSelector(`#log tr[data-dir="in"][data-conn="${await conn()}"][data-id="${again}"][data-done="true"]`, WAIT);
  await page.screenshot({ path: join(ARTIFACTS, 'console-resume.png'), fullPage: true });
});

for (const transport of ['websocket', 'sse']) {
  test(`in chromium: a vision analysis streams over ${transport}, grouped under its request id`, async () => {
    const welcome = await connectTo('/ws/vision', transport);
    assert.equal(welcome.route, '/ws/vision');
    assert.match(await page.$eval('#transport-now', (el) => el.textContent), transport === 'sse' ? /SSE/ : /WebSocket/);
    const id = await request('request_workspace_analysis', { from: 'console' });
    await page.waitForSelector(`#requests details[data-id="${id}"][data-state="done"]`, WAIT);
    const frames = await page.$$eval(`#requests details[data-id="${id}"] tr`, (rows) =>
      rows.slice(1).map((r) => [...r.cells].map((c) => c.textContent)),
    );
    const stages = frames.map(([, , , data]) => JSON.parse(data).stage ?? 'result');
    assert.deepEqual(stages, ['received', 'inspecting', 'describing', 'done', 'result']);
    const seqs = frames.map(([seq]) => Number(seq));
    assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b));
    assert.equal((await inRows(id)).length, 5, 'every frame in the log too');
    await page.screenshot({ path: join(ARTIFACTS, `console-vision-${transport}.png`), fullPage: true });
  });
}

test('in chromium: an echo over SSE, then a dropped event stream resumes', async () => {
  await connectTo('/ws/echo', 'sse');
  const id = await request('echo', { over: 'sse' });
  await page.waitForSelector(`#log tr[data-dir="in"][data-conn="${await conn()}"][data-id="${id}"][data-done="true"]`, WAIT);
  assert.deepEqual(JSON.parse((await inRows(id))[0].data), { over: 'sse' });
  const resumes = () => page.$$eval('#log tr.event', (rows) => rows.filter((r) => /resumed/.test(r.textContent)).length);
  const before = await resumes();
  await page.click('#drop');
  await page.waitForFunction((n) => [...document.querySelectorAll('#log tr.event')].filter((r) => /resumed/.test(r.textContent)).length > n, WAIT, before);
  assert.match(await page.$eval('#transport-now', (el) => el.textContent), /SSE/);
  await page.click('#disconnect');
  await page.waitForFunction(() => document.getElementById('state').dataset.state === 'closed', WAIT);
});

test('no console errors, page errors or failed requests', () => {
  assert.deepEqual(problems, []);
});
