// The router console: pick a route from /routes, connect with the router's
// TypeScript client (client.js, its bundle) over WebSocket or SSE, send
// frames, and watch what comes back: every frame with its seq,
// correlation_id and latency, streamed requests grouped by id (each can be
// cancelled), topics, and the resume after a dropped connection.
// Plain DOM, no framework; every value shown goes through textContent.

import { Client } from '/console/client.js';

const $ = (id) => document.getElementById(id);
const MAX_LOG_ROWS = 500;
/** Request boxes kept (the oldest finished ones go first), and rows per request's table. */
const MAX_REQUESTS = 100;
const MAX_REQUEST_ROWS = 200;

let routes = [];
let client;
/** Connections made from this page; log rows carry theirs (request ids restart with each client). */
let conn = 0;
/** Requests by id: their row in the Requests panel and when they were sent. */
const requests = new Map();
/** Topic → its unsubscribe function. */
const topics = new Map();

// ---------------------------------------------------------------- routes

async function loadRoutes() {
  const err = $('routes-error');
  try {
    const res = await fetch('/routes', { cache: 'no-store' });
    if (!res.ok) throw new Error(`GET /routes answered ${res.status}`);
    routes = (await res.json()).routes ?? [];
    err.hidden = true;
  } catch (e) {
    err.textContent = `Cannot load the routes: ${e.message}`;
    err.hidden = false;
    return;
  }
  const body = $('routes').tBodies[0];
  body.replaceChildren(
    ...routes.map((r) =>
      row([
        r.path,
        r.service ?? '',
        r.raw ? 'raw route' : (r.types ?? ['(not announced)']).join(' '),
        (r.allowed_types ?? []).join(' '),
        String(r.live_workers ?? 0),
        r.breaker ?? '',
      ]),
    ),
  );
  const select = $('route');
  const previous = select.value;
  select.replaceChildren(
    ...routes.filter((r) => !r.raw).map((r) => new Option(`${r.path} (${r.live_workers ?? 0} workers, breaker ${r.breaker ?? '?'})`, r.path)),
  );
  if (previous && routes.some((r) => r.path === previous)) select.value = previous;
  if (!$('path').value && select.value) $('path').value = select.value;
  showTypes();
}

/** The type suggestions: what the route's workers announced, and its allowed types. */
function showTypes() {
  const r = routes.find((x) => x.path === $('route').value);
  const types = new Set([...(r?.types ?? []), ...(r?.allowed_types ?? [])]);
  $('types').replaceChildren(...[...types].sort().map((t) => new Option(t)));
  if (!$('type').value && types.size) $('type').value = types.has('echo') ? 'echo' : [...types][0];
}

// ---------------------------------------------------------------- connection

function connectNow(event) {
  event.preventDefault();
  disconnect();
  clearRequests();
  document.documentElement.dataset.conn = String(++conn);
  const transport = document.querySelector('input[name="transport"]:checked').value;
  const url = new URL($('path').value.trim(), location.href);
  url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const token = $('token').value.trim();
  if (token) url.searchParams.set('token', token);
  logEvent(`connecting to ${url.pathname} over ${transport === 'sse' ? 'SSE' : 'WebSocket'}`);
  const c = new Client(url.href, { transports: [transport] });
  client = c;
  c.on('state', ({ state }) => {
    if (client !== c) return;
    $('state').textContent = state;
    $('state').dataset.state = state;
    setConnected(state !== 'closed');
  });
  c.on('open', (o) => {
    $('welcome').textContent = JSON.stringify(o.welcome, null, 2);
    $('transport-now').textContent = `over ${o.transport === 'sse' ? 'SSE' : 'WebSocket'}`;
    const how = o.resumed
      ? `session ${c.sessionId} resumed, ${o.replayed} frame(s) replayed`
      : o.resumeError
        ? `resume failed (${o.resumeError.reason ?? o.resumeError.code}): fresh session ${c.sessionId}`
        : `session ${c.sessionId} opened`;
    logEvent(`${how} (${o.transport})`, o.resumeError ? 'error' : 'event');
    loadRoutes();
  });
  c.on('close', (i) =>
    logEvent(`connection closed: ${i.code} ${i.reason}${i.reconnectInMs === undefined ? '' : `; reconnecting in ${i.reconnectInMs} ms`}`),
  );
  c.on('frame', (f) => logFrame('in', f));
  c.on('error', (e) => logEvent(`error ${e.code}: ${e.message}`, 'error'));
  c.on('binary', (b) => logEvent(`binary frame in: ${b.length} bytes`));
  c.on('latency', (ms) => ($('latency').textContent = `ping ${ms} ms`));
}

function setConnected(on) {
  for (const id of ['disconnect', 'drop', 'send-request', 'send-message', 'subscribe']) $(id).disabled = !on;
}

function disconnect() {
  client?.close();
  for (const off of topics.values()) off();
  topics.clear();
  $('subscriptions').replaceChildren();
  $('transport-now').textContent = '';
}

// ---------------------------------------------------------------- sending

/** The data field as JSON, or undefined (shown) when it is not JSON. */
function readData() {
  const text = $('data').value.trim();
  $('send-error').textContent = '';
  if (!text) return { ok: true, value: undefined };
  try {
    return { ok: true, value: JSON.parse(text) };
  } catch (e) {
    $('send-error').textContent = `Data is not JSON: ${e.message}`;
    return { ok: false };
  }
}

/** Sends a request and follows its frames (partial ones, then the final one) in its own group. */
async function sendRequest(event) {
  event.preventDefault();
  const type = $('type').value.trim();
  const data = readData();
  if (!client || !type || !data.ok) return;
  const timeout = Number($('timeout').value) || undefined;
  const ac = new AbortController();
  const stream = client.stream(type, data.value, { signal: ac.signal, timeout });
  const id = stream.id;
  if (id === undefined) {
    // Refused before it was sent (closed, too large, queue full): the iterator says why.
    try {
      for await (const _ of stream);
    } catch (e) {
      $('send-error').textContent = `${e.code ?? e.name}: ${e.message}`;
    }
    return;
  }
  const req = addRequest(id, type, ac);
  logFrame('out', { type, id, data: data.value });
  try {
    for await (const f of stream) {
      req.frames++;
      addRequestFrame(req, f);
      if (f.done) finishRequest(req, 'done');
    }
  } catch (e) {
    if (e.name === 'AbortError') finishRequest(req, 'cancelled', 'cancel sent');
    else finishRequest(req, 'error', `${e.code}: ${e.message}`);
  }
}

function sendMessage() {
  const type = $('type').value.trim();
  const data = readData();
  if (!client || !type || !data.ok) return;
  try {
    client.send(type, data.value);
    logFrame('out', { type, data: data.value });
  } catch (e) {
    $('send-error').textContent = `${e.code}: ${e.message}`;
  }
}

function subscribeNow(event) {
  event.preventDefault();
  const topic = $('topic').value.trim();
  if (!client || !topic || topics.has(topic)) return;
  const off = client.subscribe(topic, () => {}); // publications show in the frame log
  topics.set(topic, off);
  const li = document.createElement('li');
  const stop = button('×', `Unsubscribe from ${topic}`, () => {
    off();
    topics.delete(topic);
    li.remove();
  });
  li.append(text(topic), stop);
  $('subscriptions').append(li);
  logEvent(`subscribed to ${topic}`);
}

// ---------------------------------------------------------------- requests panel

function addRequest(id, type, ac) {
  const box = document.createElement('details');
  box.open = true;
  box.dataset.id = String(id);
  const summary = document.createElement('summary');
  const status = document.createElement('span');
  const info = document.createElement('span');
  const cancel = button('Cancel', 'Cancel this request (sends cancel)', () => ac.abort());
  summary.append(text(`#${id} ${type} `), status, text(' '), info, text(' '), cancel);
  const table = document.createElement('table');
  table.append(row(['seq', 'type', 'after', 'data'], 'th'));
  box.append(summary, table);
  $('requests').prepend(box);
  const req = { id, box, status, info, cancel, table, sentAt: performance.now(), frames: 0 };
  requests.set(String(id), req);
  setStatus(req, 'running');
  if (requests.size > MAX_REQUESTS) {
    for (const [key, old] of requests) {
      if (old.state === 'running') continue;
      requests.delete(key);
      old.box.remove();
      if (requests.size <= MAX_REQUESTS) break;
    }
  }
  return req;
}

function addRequestFrame(req, f) {
  const ms = Math.round(performance.now() - req.sentAt);
  req.table.append(row([seqText(f), f.type, `${ms} ms`, json(f.data)]));
  // The header row stays; the oldest frames go (the count says how many came).
  while (req.table.rows.length > MAX_REQUEST_ROWS + 1) req.table.deleteRow(1);
  req.info.textContent = `${req.frames} frame(s), last after ${ms} ms`;
}

function finishRequest(req, state, message) {
  if (req.state !== 'running') return;
  setStatus(req, state);
  req.cancel.remove();
  if (message) req.info.textContent += ` (${message})`;
}

function setStatus(req, state) {
  req.state = state;
  req.status.textContent = state;
  req.status.className = `status-${state}`;
  req.box.dataset.state = state;
}

function clearRequests() {
  requests.clear();
  $('requests').replaceChildren();
}

// ---------------------------------------------------------------- log

function logFrame(dir, f) {
  const req = f.id === undefined ? undefined : requests.get(String(f.id));
  const latency = dir === 'in' && req ? `${Math.round(performance.now() - req.sentAt)} ms` : '';
  const tr = row([
    clock(),
    dir === 'in' ? '←' : '→',
    seqText(f),
    f.topic ? `${f.type} (${f.topic})` : f.type,
    f.id === undefined ? '' : String(f.id),
    f.correlation_id ?? '',
    latency,
    json(f.error ?? f.data),
  ]);
  tr.className = f.type === 'error' ? 'error' : dir;
  tr.dataset.dir = dir;
  tr.dataset.conn = String(conn);
  tr.dataset.type = f.type;
  if (f.id !== undefined) tr.dataset.id = String(f.id);
  if (f.done !== undefined) tr.dataset.done = String(f.done);
  append(tr);
}

function logEvent(message, kind = 'event') {
  const tr = document.createElement('tr');
  tr.className = kind;
  tr.dataset.dir = 'event';
  const time = document.createElement('td');
  time.textContent = clock();
  const td = document.createElement('td');
  td.colSpan = 7;
  td.textContent = message;
  tr.append(time, td);
  append(tr);
}

function append(tr) {
  const body = $('log').tBodies[0];
  body.append(tr);
  while (body.rows.length > MAX_LOG_ROWS) body.deleteRow(0);
  const panel = $('log-panel');
  panel.scrollTop = panel.scrollHeight;
}

// ---------------------------------------------------------------- helpers

function row(cells, tag = 'td') {
  const tr = document.createElement('tr');
  cells.forEach((c, i) => {
    const td = document.createElement(tag);
    td.textContent = c;
    if (tag === 'td' && i === cells.length - 1) td.className = 'data';
    tr.append(td);
  });
  return tr;
}

function button(label, title, onClick) {
  const b = document.createElement('button');
  b.type = 'button';
  b.textContent = label;
  b.title = title;
  b.addEventListener('click', (e) => {
    e.preventDefault();
    onClick();
  });
  return b;
}

const text = (s) => document.createTextNode(s);
const seqText = (f) => (typeof f.seq === 'number' ? String(f.seq) : '');
const clock = () => new Date().toISOString().slice(11, 23);

function json(v) {
  if (v === undefined) return '';
  const s = JSON.stringify(v);
  return s.length > 2000 ? `${s.slice(0, 2000)}…` : s;
}

// ---------------------------------------------------------------- wiring

$('refresh').addEventListener('click', loadRoutes);
$('route').addEventListener('change', () => {
  $('path').value = $('route').value;
  $('type').value = '';
  showTypes();
});
$('connect-form').addEventListener('submit', connectNow);
$('disconnect').addEventListener('click', disconnect);
$('drop').addEventListener('click', () => {
  logEvent('dropping the connection (the session stays: the client resumes it)');
  client?.reconnect();
});
$('send-form').addEventListener('submit', sendRequest);
$('send-message').addEventListener('click', sendMessage);
$('subscribe-form').addEventListener('submit', subscribeNow);
$('clear').addEventListener('click', () => $('log').tBodies[0].replaceChildren());
setConnected(false);
loadRoutes();
document.documentElement.dataset.ready = 'true';
