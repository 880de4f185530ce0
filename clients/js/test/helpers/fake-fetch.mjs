// A scripted stand-in for the router's HTTP fallback, for unit tests of the
// client over SSE without a network: `fetch` records every event-stream GET
// (the test writes events into it, ends or breaks it) and every POST (the
// test answers it, or `autoAccept` answers 202 at once).

const encoder = new TextEncoder();

/** One event-stream GET: the test writes the router's side. */
export class FakeStream {
  constructor(url, init, status, body) {
    this.url = new URL(url);
    this.headers = lower(init.headers);
    this.aborted = false;
    this.status = status;
    this.refusal = body;
    this.stream = new ReadableStream({
      start: (c) => {
        this.controller = c;
      },
    });
    init.signal?.addEventListener('abort', () => {
      this.aborted = true;
      try {
        this.controller.error(new DOMException('This operation was aborted', 'AbortError'));
      } catch {
        // already closed
      }
    });
  }

  /** Writes raw text. */
  write(text) {
    this.controller.enqueue(encoder.encode(text));
  }
  /** A frame as the router writes it: `id: <seq>` unless welcome or resumed. */
  frame(f) {
    const id = typeof f.seq === 'number' && f.type !== 'welcome' ? `id: ${f.seq}\n` : '';
    this.write(`${id}data: ${JSON.stringify(f)}\n\n`);
  }
  welcome(data) {
    this.frame({ type: 'welcome', data, seq: 0 });
  }
  keepAlive() {
    this.write(': keep-alive\n\n');
  }
  binary(bytes) {
    this.write(`event: binary\ndata: ${Buffer.from(bytes).toString('base64')}\n\n`);
  }
  closeEvent(code, reason = '') {
    this.write(`event: close\ndata: ${JSON.stringify({ code, reason })}\n\n`);
    this.end();
  }
  /** The body ends (as when the router's side closes without a close event). */
  end() {
    try {
      this.controller.close();
    } catch {
      // already closed
    }
  }
  /** The body breaks (a cut connection). */
  fail() {
    try {
      this.controller.error(new TypeError('terminated'));
    } catch {
      // already closed
    }
  }
}

export class FakeRouter {
  streams = [];
  posts = [];
  /** DELETEs (the client ending its session), answered 204. */
  deletes = [];
  /** Answer POSTs at once with 202. */
  autoAccept = true;
  /** The status of the next GETs (200: an event stream). */
  getStatus = 200;
  getBody = undefined;
  /** A GET rejects (cannot connect). */
  getError = undefined;

  fetch = async (url, init = {}) => {
    if (init.signal?.aborted) throw new DOMException('This operation was aborted', 'AbortError');
    const method = init.method ?? 'GET';
    if (method === 'GET') {
      if (this.getError) throw this.getError;
      const s = new FakeStream(url, init, this.getStatus, this.getBody);
      this.streams.push(s);
      if (this.getStatus !== 200) {
        return new Response(JSON.stringify(this.getBody ?? { error: { code: 'bad_request', message: 'refused' } }), {
          status: this.getStatus,
          headers: { 'content-type': 'application/json' },
        });
      }
      return new Response(s.stream, { status: 200, headers: { 'content-type': 'text/event-stream' } });
    }
    if (method === 'DELETE') {
      this.deletes.push({ url: new URL(url), headers: lower(init.headers) });
      return new Response(null, { status: 204 });
    }
    const post = {
      url: new URL(url),
      headers: lower(init.headers),
      body: JSON.parse(init.body),
      signal: init.signal,
    };
    this.posts.push(post);
    return new Promise((resolve, reject) => {
      post.answer = (status, body, headers = {}) =>
        resolve(new Response(body === undefined ? '' : JSON.stringify(body), { status, headers: { 'content-type': 'application/json', ...headers } }));
      post.error = reject;
      init.signal?.addEventListener('abort', () => reject(new DOMException('This operation was aborted', 'AbortError')));
      if (this.autoAccept) post.answer(202, { accepted: Array.isArray(post.body) ? post.body.length : 1 });
    });
  };

  get last() {
    return this.streams[this.streams.length - 1];
  }

  /** Every frame POSTed so far, in order, flattened from the bodies. */
  frames() {
    return this.posts.flatMap((p) => (Array.isArray(p.body) ? p.body : [p.body]));
  }
  framesOf(type) {
    return this.frames().filter((f) => f.type === type);
  }
}

function lower(headers = {}) {
  return Object.fromEntries(Object.entries(headers).map(([k, v]) => [k.toLowerCase(), v]));
}

/** Lets streams, fetches and promise callbacks run (setImmediate is not mocked by the tests). */
export async function flush(rounds = 3) {
  for (let i = 0; i < rounds; i++) await new Promise((r) => setImmediate(r));
}
