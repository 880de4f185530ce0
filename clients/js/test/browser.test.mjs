// A real browser: Debian's chromium, headless, driven over CDP by
// puppeteer-core (no browser download). A tiny HTTP server serves the built
// ESM client (dist/) and a page that imports it; the page connects to the
// real router with the browser's own WebSocket, and reports back through
// page.evaluate. Chromium path: $CHROMIUM_PATH or /usr/bin/chromium
// (apt-get install chromium).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { dirname, join, normalize } from 'node:path';
import { fileURLToPath } from 'node:url';
import puppeteer from 'puppeteer-core';
import { startStack } from './helpers/stack.mjs';
import { startProxy } from './helpers/proxy.mjs';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';

const PAGE = `<!doctype html>
<meta charset="utf-8">
<title>router client test page</title>
<script type="module">
  import * as lib from '/dist/index.js';
  window.lib = lib;
  document.title = 'ready';
</script>`;

let stack;
let server;
let browser;
let page;
let proxy;

before(async () => {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`no chromium at ${CHROMIUM}: apt-get install -y chromium (or set CHROMIUM_PATH)`);
  }
  stack = await startStack({ workers: ['echo', 'vision'] });
  proxy = await startProxy('127.0.0.1', Number(stack.router.http.split(':').pop()));
  server = createServer((req, res) => {
    const path = new URL(req.url, 'http://x').pathname;
    if (path === '/' || path === '/index.html') {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
      return res.end(PAGE);
    }
    const file = normalize(join(ROOT, path));
    if (path.startsWith('/dist/') && file.startsWith(join(ROOT, 'dist')) && existsSync(file)) {
      res.writeHead(200, { 'content-type': 'text/javascript; charset=utf-8' });
      return res.end(readFileSync(file));
    }
    res.writeHead(404).end();
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu'],
  });
  page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  await page.goto(`http://127.0.0.1:${server.address().port}/`);
  await page.waitForFunction(() => document.title === 'ready', { timeout: 15_000 }).catch((e) => {
    throw new Error(`the page did not load the client: ${errors.join('; ') || e.message}`);
  });
});

after(async () => {
  await browser?.close();
  await new Promise((r) => (server ? server.close(r) : r()));
  await proxy?.close();
  await stack?.stop();
});

test('in chromium: connect, request, stream, error, abort, binary, topics, latency, close', async () => {
  const r = await page.evaluate(async (url) => {
    const { connect, RouterError } = window.lib;
    const states = [];
    const c = await connect(url, {}, { timeout: 10_000 });
    c.on('state', (s) => states.push(s.state));
    const out = { nativeWebSocket: typeof WebSocket === 'function', welcomeRoute: c.welcome.route };
    out.echo = (await c.request('echo', { from: 'browser' })).data;
    out.stream = [];
    for await (const f of c.stream('stream', { n: 5 })) out.stream.push(f.data);
    try {
      await c.request('fail', { code: 'circuit_open', message: 'open' });
    } catch (e) {
      out.error = { isRouterError: e instanceof RouterError, code: e.code, retryable: e.retryable, message: e.message };
    }
    const ac = new AbortController();
    const slow = c.stream('slow', { ms: 30_000 }, { signal: ac.signal });
    setTimeout(() => ac.abort(), 50);
    try {
      for await (const _ of slow);
    } catch (e) {
      out.abort = e.name;
    }
    out.binary = await new Promise((resolve) => {
      const off = c.on('binary', (b) => {
        off();
        resolve(Array.from(b));
      });
      c.sendBinary(new Uint8Array([7, 0, 255]));
    });
    out.topic = await new Promise((resolve) => {
      c.subscribe('browser-topic', (data) => resolve(data));
      c.request('publish', { topic: 'browser-topic', data: { hi: 'there' } });
    });
    out.rtt = await c.ping();
    out.latency = c.latency;
    c.close();
    out.states = states;
    return out;
  }, stack.url('/ws/echo'));

  assert.equal(r.nativeWebSocket, true);
  assert.equal(r.welcomeRoute, '/ws/echo');
  assert.deepEqual(r.echo, { from: 'browser' });
  assert.deepEqual(r.stream, [{ i: 0 }, { i: 1 }, { i: 2 }, { i: 3 }, { i: 4 }, { n: 5 }]);
  assert.deepEqual(r.error, { isRouterError: true, code: 'circuit_open', retryable: true, message: 'open' });
  assert.equal(r.abort, 'AbortError');
  assert.deepEqual(r.binary, [7, 0, 255]);
  assert.deepEqual(r.topic, { hi: 'there' });
  assert.ok(r.rtt >= 0 && r.rtt < 1000 && r.latency === r.rtt, JSON.stringify(r));
  assert.deepEqual(r.states, ['closed']);
});

test('in chromium: a vision analysis streams its progress', async () => {
  const stages = await page.evaluate(async (url) => {
    const c = await window.lib.connect(url);
    const got = [];
    for await (const f of c.stream('request_workspace_analysis', { from: 'browser' })) got.push(f.done ? 'result' : f.data.stage);
    c.close();
    return got;
  }, stack.url('/ws/vision'));
  assert.deepEqual(stages, ['received', 'inspecting', 'describing', 'done', 'result']);
});

test('in chromium: requests in flight survive a cut connection (resume)', async () => {
  const run = page.evaluate(async (url) => {
    const c = await window.lib.connect(url, { backoffBaseMs: 50 });
    const opens = [];
    c.on('open', (o) => opens.push({ resumed: o.resumed, error: o.resumeError?.message }));
    const frames = [];
    const stream = (async () => {
      for await (const f of c.stream('stream', { n: 3 })) frames.push(f.data);
    })();
    const slow = c.request('slow', { ms: 800 });
    window.cutNow = true; // the test cuts the proxy now
    const slept = (await slow).data;
    await stream;
    c.close();
    return { slept, frames, opens };
  }, `ws://127.0.0.1:${proxy.port}/ws/echo`);
  await page.waitForFunction(() => window.cutNow === true, { timeout: 10_000 });
  proxy.cut();
  const r = await run;
  assert.deepEqual(r.opens, [{ resumed: true }], JSON.stringify(r.opens));
  assert.deepEqual(r.slept, { slept_ms: 800 });
  assert.deepEqual(r.frames, [{ i: 0 }, { i: 1 }, { i: 2 }, { n: 3 }]);
});

test('in chromium: offline is noticed at once, online reconnects at once, and the session resumes', async () => {
  const setup = await page.evaluate(async (url) => {
    const c = await window.lib.connect(url, { pingIntervalMs: 60_000, pingTimeoutMs: 1000, backoffBaseMs: 60_000 });
    window.net = { c, events: [], t0: Date.now() };
    const log = (e) => window.net.events.push(e);
    c.on('close', (i) => log({ at: Date.now(), kind: 'close', reason: i.reason, reconnectInMs: i.reconnectInMs }));
    c.on('open', (o) => log({ at: Date.now(), kind: 'open', resumed: o.resumed, error: o.resumeError?.message }));
    window.net.slow = c.request('slow', { ms: 3000 }).then((r) => r.data, (e) => `${e.code}/${e.reason}`);
    return true;
  }, stack.url('/ws/echo'));
  assert.equal(setup, true);
  const offAt = Date.now();
  await page.setOfflineMode(true);
  await page.waitForFunction(() => window.net.events.some((e) => e.kind === 'close'), { timeout: 5000 });
  const noticedMs = Date.now() - offAt;
  const onAt = Date.now();
  await page.setOfflineMode(false);
  await page.waitForFunction(() => window.net.events.some((e) => e.kind === 'open'), { timeout: 5000 });
  const reconnectedMs = Date.now() - onAt;
  const r = await page.evaluate(async () => ({ events: window.net.events, slow: await window.net.slow }));
  const [close, open] = r.events;
  assert.match(close.reason, /no frame/);
  assert.ok(close.reconnectInMs > 2000, 'the backoff alone would have waited (base 60 s)');
  assert.ok(noticedMs < 1000 + 1500, `offline noticed after ${noticedMs} ms (ping timeout 1000)`);
  assert.ok(reconnectedMs < 2000, `online reconnected after ${reconnectedMs} ms, not after the backoff`);
  assert.equal(open.resumed, true, JSON.stringify(r.events));
  assert.deepEqual(r.slow, { slept_ms: 3000 });
  await page.evaluate(() => window.net.c.close());
});

test('in chromium over the HTTP fallback, from another origin (CORS, the custom headers preflighted): request, stream, resume after a cut', async () => {
  const run = page.evaluate(async (url) => {
    const c = await window.lib.connect(url, { transports: ['sse'], backoffBaseMs: 50 }, { timeout: 10_000 });
    const out = { transport: c.transport, echo: (await c.request('echo', { from: 'sse' })).data, stream: [], opens: [] };
    for await (const f of c.stream('stream', { n: 3 })) out.stream.push(f.data);
    c.on('open', (o) => out.opens.push({ resumed: o.resumed, transport: o.transport, error: o.resumeError?.message }));
    const slow = c.request('slow', { ms: 800 });
    window.cutSse = true; // the test cuts the proxy now
    out.slept = (await slow).data;
    c.close();
    return out;
  }, `ws://127.0.0.1:${proxy.port}/ws/echo`);
  await page.waitForFunction(() => window.cutSse === true, { timeout: 10_000 });
  proxy.cut();
  const r = await run;
  assert.equal(r.transport, 'sse');
  assert.deepEqual(r.echo, { from: 'sse' });
  assert.deepEqual(r.stream, [{ i: 0 }, { i: 1 }, { i: 2 }, { n: 3 }]);
  assert.deepEqual(r.opens, [{ resumed: true, transport: 'sse' }], JSON.stringify(r.opens));
  assert.deepEqual(r.slept, { slept_ms: 800 });
});
