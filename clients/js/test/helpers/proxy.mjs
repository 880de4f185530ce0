// A TCP proxy between the client and the router that can break the path the
// ways real networks do: cut every connection at once (both sides closed, as
// when a NAT or a Wi-Fi handover drops it), or blackhole it (bytes vanish, no
// close: the dead network a liveness check must notice).

import net from 'node:net';

export async function startProxy(targetHost, targetPort) {
  const pairs = new Set();
  let accepted = 0;
  const server = net.createServer((client) => {
    accepted++;
    const upstream = net.connect(targetPort, targetHost);
    const pair = { client, upstream, blackholed: false };
    pairs.add(pair);
    const end = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on('data', (d) => pair.blackholed || upstream.write(d));
    upstream.on('data', (d) => pair.blackholed || client.write(d));
    client.on('close', end).on('error', end);
    upstream.on('close', end).on('error', end);
  });
  await new Promise((res) => server.listen(0, '127.0.0.1', res));
  return {
    port: server.address().port,
    /** Connections accepted so far. */
    get accepted() {
      return accepted;
    },
    /** Connections open now. */
    get open() {
      return pairs.size;
    },
    /** Closes every connection now, both sides (`reset`: with a TCP RST). */
    cut(reset = false) {
      for (const p of [...pairs]) {
        pairs.delete(p);
        for (const s of [p.client, p.upstream]) (reset && s.resetAndDestroy ? s.resetAndDestroy() : s.destroy());
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
