// The real router and real workers as child processes, the way the Rust
// end-to-end tests start them (tests/src/lib.rs): the router on port 0 with
// fresh ipc:// endpoints and its own routes file, workers pointed at the
// endpoints the router reports. Readiness is each process's stdout line
// (`{"event":"listening"}`, `{"event":"registered"}`), waited for with a bound;
// nothing sleeps. Every child is killed when the stack stops, and on process
// exit, so a failing test leaves no orphans.

import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '../../../..');
const TARGET = process.env.CARGO_TARGET_DIR ? resolve(REPO, process.env.CARGO_TARGET_DIR) : join(REPO, 'target');
const ROUTER_BIN = join(TARGET, 'debug', 'router');
const EXAMPLES = join(TARGET, 'debug', 'examples');
const PYTHON = process.env.ROUTER_TEST_PYTHON ?? join(REPO, '.venv', 'bin', 'python');
const START_TIMEOUT_MS = 30_000;

/** Variables of the router and workers a developer's shell may set; children start without them. */
const STACK_ENV = [
  'WEBSOCKET_HOST', 'WEBSOCKET_PORT', 'WEBSOCKET_ROUTES', 'BRIDGE_ENDPOINT', 'PUBLISH_ENDPOINT',
  'ENABLE_RATE_LIMIT', 'ENABLE_DYNAMIC_ROUTING', 'ROUTER_HEARTBEAT_MS', 'DRAIN_TIMEOUT_MS', 'BRIDGE_SECRET',
  'PUBLISH_UNAUTHENTICATED', 'ALLOW_INSECURE_BRIDGE', 'BRIDGE_MAX_FRAME_BYTES', 'WORKER_SEND_QUEUE_BYTES',
  'MAX_OUTBOUND_BYTES', 'MAX_HELD_REQUEST_BYTES', 'CANCEL_GRACE_MS', 'MAX_DYNAMIC_ROUTES', 'RESUME_MAX_BYTES',
];

const live = new Set();
process.on('exit', () => {
  for (const p of live) p.child.kill('SIGKILL');
});

function childEnv(extra = {}) {
  const env = { ...process.env };
  for (const k of STACK_ENV) delete env[k];
  return { ...env, RUST_LOG: env.RUST_LOG ?? 'warn', ...extra };
}

/** A child process whose stdout lines can be waited on. */
export class Proc {
  constructor(name, cmd, args, env) {
    this.name = name;
    this.lines = [];
    this.stderr = [];
    this.waiters = new Set();
    this.exit = undefined;
    if (!existsSync(cmd)) throw new Error(`${name}: ${cmd} not found: build the binaries first (cargo build --workspace --bins --examples)`);
    this.child = spawn(cmd, args, { cwd: REPO, env, stdio: ['ignore', 'pipe', 'pipe'] });
    live.add(this);
    let out = '';
    this.child.stdout.setEncoding('utf8').on('data', (chunk) => {
      out += chunk;
      let i;
      while ((i = out.indexOf('\n')) >= 0) {
        const line = out.slice(0, i);
        out = out.slice(i + 1);
        this.lines.push(line);
        for (const w of [...this.waiters]) w.check(line);
      }
    });
    let err = '';
    this.child.stderr.setEncoding('utf8').on('data', (chunk) => {
      err += chunk;
      const parts = err.split('\n');
      err = parts.pop();
      this.stderr.push(...parts);
      if (this.stderr.length > 200) this.stderr.splice(0, this.stderr.length - 200);
    });
    this.exited = new Promise((res) =>
      this.child.on('exit', (code, signal) => {
        this.exit = { code, signal };
        live.delete(this);
        for (const w of [...this.waiters]) w.fail(new Error(`${this.name} exited (${code ?? signal}) while waiting for ${w.what}\n${this.tail()}`));
        res(this.exit);
      }),
    );
  }

  tail() {
    return `--- ${this.name} stdout ---\n${this.lines.slice(-10).join('\n')}\n--- ${this.name} stderr ---\n${this.stderr.slice(-30).join('\n')}`;
  }

  /** The first stdout line (past or future) that `pred` accepts, within `timeoutMs`. */
  waitLine(what, pred, timeoutMs = START_TIMEOUT_MS) {
    const seen = this.lines.find(pred);
    if (seen !== undefined) return Promise.resolve(seen);
    if (this.exit) return Promise.reject(new Error(`${this.name} already exited (${this.exit.code ?? this.exit.signal})\n${this.tail()}`));
    return new Promise((res, rej) => {
      const w = {
        what,
        check: (line) => {
          if (!pred(line)) return;
          done();
          res(line);
        },
        fail: (e) => {
          done();
          rej(e);
        },
      };
      const timer = setTimeout(() => w.fail(new Error(`${this.name}: no ${what} within ${timeoutMs} ms\n${this.tail()}`)), timeoutMs);
      const done = () => {
        clearTimeout(timer);
        this.waiters.delete(w);
      };
      this.waiters.add(w);
    });
  }

  async kill() {
    if (!this.exit) this.child.kill('SIGKILL');
    await this.exited;
  }
}

const jsonLine = (event) => (line) => {
  try {
    return JSON.parse(line).event === event;
  } catch {
    return false;
  }
};

function unique(tag) {
  return join(tmpdir(), `jsclient-${process.pid}-${randomBytes(4).toString('hex')}-${tag}`);
}

/** What the session resume settings look like in a routes file (README, "Resume"). */
export const RESUME = { ttlMs: 60_000, maxFrames: 65_536, maxBytes: 64 << 20 };

/**
 * The routes the tests use. `resume: true` adds the per-route resume block;
 * a router that does not know it yet rejects the file, and startRouter then
 * falls back to the routes without it.
 */
export function testRoutes({ resume = true } = {}) {
  const r = resume ? { resume: RESUME } : {};
  return {
    routes: [
      { path: '/ws/echo', service: 'echo', maxInFlight: 256, ...r },
      { path: '/ws/vision', service: 'vision', maxInFlight: 256, ...r },
      { path: '/ws/automation', service: 'automation', affinity: true, maxInFlight: 256, requestTimeoutMs: 120_000, ...r },
    ],
  };
}

/** Starts a router; resolves once it printed its listening line. */
export async function startRouter({ routes = testRoutes(), env = {} } = {}) {
  const routesFile = `${unique('routes')}.json`;
  const bridgeSock = `${unique('bridge')}.sock`;
  const publishSock = `${unique('pub')}.sock`;
  const files = [routesFile, bridgeSock, publishSock];
  const attempt = async (r) => {
    writeFileSync(routesFile, JSON.stringify(r, null, 2));
    const proc = new Proc('router', ROUTER_BIN, [
      '--host', '127.0.0.1', '--port', '0', '--routes', routesFile,
      '--bridge-endpoint', `ipc://${bridgeSock}`, '--publish-endpoint', `ipc://${publishSock}`,
    ], childEnv({ ENABLE_RATE_LIMIT: 'false', ...env }));
    try {
      return { proc, line: JSON.parse(await proc.waitLine('its listening line', jsonLine('listening'))) };
    } catch (e) {
      await proc.kill();
      return { proc, error: e };
    }
  };
  let resumeConfig = routes.routes.some((r) => r.resume);
  let { proc, line, error } = await attempt(routes);
  if (error && resumeConfig && proc.exit?.code === 2) {
    // This router does not know the `resume` block (resume not there yet): run without it.
    resumeConfig = false;
    ({ proc, line, error } = await attempt({ routes: routes.routes.map(({ resume, ...rest }) => rest) }));
  }
  if (error) throw error;
  return {
    proc,
    http: line.http,
    bridge: line.bridge,
    publish: line.publish,
    /** Whether the routes file's `resume` block was accepted. */
    resumeConfig,
    url: (path) => `ws://${line.http}${path}`,
    files,
    async stop() {
      await proc.kill();
      for (const f of files) rmSync(f, { force: true });
    },
  };
}

/** Worker kinds: a Rust example or the Python automation worker. */
const WORKERS = {
  echo: () => [join(EXAMPLES, 'echo_worker'), ['--capacity', '256']],
  vision: () => [join(EXAMPLES, 'vision_worker'), ['--capacity', '256']],
  chat: () => [join(EXAMPLES, 'chat_worker'), []],
  automation: () => [PYTHON, [join(REPO, 'worker-sdk/python/examples/automation_worker.py'), '--capacity', '128', '--log-level', 'WARNING']],
};

/** Starts a worker against `router`; resolves once it printed its registered line. */
export async function startWorker(router, kind) {
  const [cmd, args] = WORKERS[kind]();
  const proc = new Proc(kind, cmd, [...args, '--bridge-endpoint', router.bridge, '--publish-endpoint', router.publish], childEnv());
  await proc.waitLine('its registered line', jsonLine('registered'));
  return proc;
}

/** A router and the given workers; `stop()` kills them all. */
export async function startStack({ workers = ['echo'], routes, env } = {}) {
  const router = await startRouter({ routes, env });
  const procs = [];
  try {
    for (const w of await Promise.all(workers.map((k) => startWorker(router, k)))) procs.push(w);
  } catch (e) {
    await Promise.all(procs.map((p) => p.kill()));
    await router.stop();
    throw e;
  }
  return {
    router,
    workers: procs,
    url: router.url,
    async stop() {
      await Promise.all(procs.map((p) => p.kill()));
      await router.stop();
    },
  };
}

/** Polls `pred` every 10 ms until it holds, failing after `timeoutMs`. */
export async function until(what, pred, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await pred()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}
