// A real HTTP proxy in front of gale that refuses WebSocket upgrades, as
// some corporate proxies do: plain requests (and SSE streams) pass, an
// Upgrade is answered 403. What the fallback transport exists for.
import http from 'node:http';

/** Starts the proxy to 127.0.0.1:`port` on a free port: {port, stop()}. */
export async function startNoUpgradeProxy(port) {
  const server = http.createServer((req, res) => {
    const headers = { ...req.headers };
    delete headers.upgrade;
    const out = http.request({ host: '127.0.0.1', port, path: req.url, method: req.method, headers }, (back) => {
      res.writeHead(back.statusCode ?? 502, back.headers);
      back.pipe(res);
    });
    out.on('error', () => res.destroy());
    req.pipe(out);
    res.on('close', () => out.destroy());
  });
  server.on('upgrade', (_req, socket) => {
    socket.end('HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n');
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const { port: own } = /** @type {import('node:net').AddressInfo} */ (server.address());
  return {
    port: own,
    stop: () => new Promise((r) => {
      server.closeAllConnections();
      server.close(r);
    }),
  };
}
