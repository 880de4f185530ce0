// Compile-time checks of the published declarations (dist/*.d.ts), as a
// TypeScript application sees them: `npm run typecheck` fails if one breaks.
import WebSocket from 'ws';
import { Client, connect, RouterError, type Reply, type ClientOptions, type ConnectionState, type TransportKind } from '../dist/index.js';

interface Stage {
  stage: string;
  progress: number;
}

export async function typedUsage(): Promise<void> {
  // The `ws` package is accepted where Node has no global WebSocket.
  const options: ClientOptions = { WebSocket, pingIntervalMs: 5000, reconnect: (info) => info.code !== 4001 };
  const client: Client = await connect('ws://127.0.0.1:8001/ws/vision', options);

  const reply: Reply<{ n: number }> = await client.request<{ n: number }>('stream', { n: 1 }, { timeout: 1000 });
  const n: number = reply.data.n;
  void n;

  for await (const frame of client.stream<Stage>('request_workspace_analysis', {}, { signal: AbortSignal.timeout(5000) })) {
    const s: string = frame.data.stage;
    void s;
  }

  const off: () => void = client.subscribe<{ text: string }>('room', (data, frame) => {
    const text: string = data.text;
    const topic: string | undefined = frame.topic;
    void text;
    void topic;
  });
  off();

  client.on('state', ({ state, previous }) => {
    const s: ConnectionState = state;
    void s;
    void previous;
  });
  client.on('error', (e) => {
    const code: string = e.code;
    const retry: number | undefined = e.retryAfterMs;
    void code;
    void retry;
  });
  client.sendBinary(new Uint8Array([1]));
  client.send('note', { any: 'json' });

  try {
    await client.request('x');
  } catch (e) {
    if (e instanceof RouterError && e.retryable) {
      const wait: number = e.retryAfterMs ?? 0;
      void wait;
    }
  }
  // @ts-expect-error the event map is typed: no such event
  client.on('nonsense', () => {});
  // @ts-expect-error request options are typed
  client.request('x', {}, { timeout: '1s' });
  client.close();
}

export async function fallbackUsage(): Promise<void> {
  // The HTTP fallback: no WebSocket needed when only SSE is asked for.
  const sse = await connect('ws://127.0.0.1:8001/ws/echo', { transports: ['sse'], headers: { Authorization: 'Bearer x' }, fetch });
  const kind: TransportKind = sse.transport;
  sse.on('open', (o) => {
    const k: 'websocket' | 'sse' = o.transport;
    void k;
  });
  void kind;
  // @ts-expect-error only the two transports exist
  new Client('ws://x/ws', { transports: ['longpoll'] });
  sse.close();
}
