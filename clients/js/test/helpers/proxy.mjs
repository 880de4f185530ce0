// A TCP proxy between the client and the router that can break the path the
// ways real networks do: cut every connection at once (both sides closed, as
// when a NAT or a Wi-Fi handover drops it), or blackhole it (bytes vanish, no
// close: the dead network a liveness check must notice). With
// `refuseUpgrade` it is the proxy that lets no WebSocket through: a request
// asking for `Upgrade: websocket` is answered `HTTP/1.1 403` (`'403'`) or has
// its connection closed (`'close'`); every other request passes.

import net from 'node:net';

const HEAD_END = '\r\n\r\n';
const MAX_HEAD = 64 * 1024;

export async function startProxy(targetHost, targetPort, { refuseUpgrade } = {}) {
  const pairs = new Set();
  let accepted = 0;
  let refused = 0;
  const server = net.createServer((client) => {
    accepted++;
    const pair = { client, upstream: undefined, blackholed: false };
    pairs.add(pair);
    const end = () => {
      pairs.delete(pair);
      client.destroy();
      pair.upstream?.destroy();
    };
    client.on('close', end).on('error', end);
    const connect = (first) => {
      const upstream = net.connect(targetPort, targetHost);
      pair.upstream = upstream;
      if (first) upstream.write(first);
      client.on('data', (d) => pair.blackholed || upstream.write(d));
      upstream.on('data', (d) => pair.blackholed || client.write(d));
      upstream.on('close', end).on('error', end);
    };
    if (!refuseUpgrade) return connect();
    // Read the first request's head before deciding.
    let head = Buffer.alloc(0);
    const onHead = (d) => {
      head = Buffer.concat([head, d]);
      const text = head.toString('latin1');
      if (!text.includes(HEAD_END) && head.length < MAX_HEAD) return;
      client.off('data', onHead);
      if (/^upgrade:\s*websocket\s*$/im.test(text.slice(0, text.indexOf(HEAD_END)))) {
        refused++;
        if (refuseUpgrade === 'close') return end();
        client.end('HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: 24\r\nconnection: close\r\n\r\nno WebSocket through me\n');
        return;
      }
      connect(head);
    };
    client.on('data', onHead);
  });
  await new Promise((res) => server.listen(0, '127.0.0.1', res));
  return {
    port: server.address().port,
    /** Connections accepted so far. */
    get accepted() {
      return accepted;
    },
    /** WebSocket upgrades refused so far. */
    get refused() {
      return refused;
    },
    /** Connections open now. */
    get open() {
      return pairs.size;
    },
    /** Closes every connection now, both sides (`reset`: with a TCP RST). */
    cut(reset = false) {
      for (const p of [...pairs]) {
        pairs.delete(p);
        for (const s of [p.client, p.upstream]) if (s) reset && s.resetAndDestroy ? s.resetAndDestroy() : s.destroy();
      }
    },
    /** From now on the open connections carry nothing, and nothing closes them. */
    blackhole() {
      for (const p of pairs) p.blackholed = true;
    },
    async close() {
      this.cut();
      await new Promise((res) => server.close(res));
    },
  };
}
