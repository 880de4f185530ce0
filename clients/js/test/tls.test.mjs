// wss:// with the router serving TLS itself (README "TLS"): a certificate
// made here with openssl, the client in Node with a `ws` WebSocket that
// trusts it, a request and a stream over the encrypted connection.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import WebSocket from 'ws';
import { connect } from '../dist/index.js';
import { startStack } from './helpers/stack.mjs';

let stack;
let dir;

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'jsclient-tls-'));
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem'), '-days', '2',
    '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
    '-addext', 'basicConstraints=critical,CA:FALSE',
  ], { stdio: 'pipe' });
  stack = await startStack({
    workers: ['echo'],
    env: { TLS_CERT: join(dir, 'cert.pem'), TLS_KEY: join(dir, 'key.pem') },
  });
});
after(async () => {
  await stack?.stop();
  rmSync(dir, { recursive: true, force: true });
});

test('requests and streams over wss://', async () => {
  const ca = readFileSync(join(dir, 'cert.pem'));
  // A WebSocket that trusts the test certificate (a browser would use its
  // own trust store; in Node the `ws` options carry it).
  class TrustingWebSocket extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols, { ca });
    }
  }
  const url = stack.url('/ws/echo').replace('ws://127.0.0.1', 'wss://localhost');
  const client = await connect(url, { WebSocket: TrustingWebSocket }, { timeout: 15_000 });
  try {
    const r = await client.request('echo', { over: 'tls', pi: 3.141592653589793 });
    assert.deepEqual(r.data, { over: 'tls', pi: 3.141592653589793 });
    const seen = [];
    for await (const f of client.stream('stream', { n: 5 })) seen.push(f.data);
    assert.deepEqual(seen.slice(0, 5).map((d) => d.i), [0, 1, 2, 3, 4]);
  } finally {
    client.close();
  }
  // A client that does not trust the certificate never opens.
  await assert.rejects(
    connect(url, { WebSocket }, { timeout: 3_000 }),
    (e) => e != null,
  );
});
