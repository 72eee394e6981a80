// A real HTTP proxy in front of gale that refuses WebSocket upgrades, as
// some corporate proxies do: plain requests (and SSE streams) pass, an
// Upgrade is answered 403. What the fallback transport exists for; and,
// switched to let upgrades through (or to hang or cut them), the way back.
import http from 'node:http';
import net from 'node:net';

/**
 * Starts the proxy to 127.0.0.1:`port` on a free port. `proxy.upgrades`
 * says what an Upgrade gets, and can be changed at any time:
 * - "refuse" (the default): 403;
 * - "pass": tunnelled to gale, as a proxy that allows WebSockets;
 * - "hang": read and never answered (the socket kept open);
 * - "cut": tunnelled, then cut `proxy.cutAfterMs` later, as a proxy that
 *   lets the upgrade through and then breaks the connection.
 * `proxy.tries` holds the time (Date.now()) of every Upgrade seen;
 * `proxy.hung` the sockets left hanging (each has `.gone` once the
 * client gave up on it).
 */
export async function startNoUpgradeProxy(port) {
  const sockets = new Set();
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
  const proxy = {
    port: 0,
    upgrades: 'refuse',
    cutAfterMs: 150,
    /** @type {(() => void) | null} called as each Upgrade comes in */
    onUpgrade: null,
    /** @type {number[]} */
    tries: [],
    /** @type {(import('node:net').Socket & {gone?: boolean})[]} */
    hung: [],
    stop: () => new Promise((r) => {
      for (const s of sockets) s.destroy();
      server.closeAllConnections();
      server.close(r);
    }),
  };
  server.on('upgrade', (req, socket, head) => {
    proxy.tries.push(Date.now());
    proxy.onUpgrade?.();
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => {});
    const mode = proxy.upgrades;
    if (mode === 'refuse') {
      socket.end('HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n');
      return;
    }
    if (mode === 'hang') {
      proxy.hung.push(socket);
      // The server's sockets are half-open: the client's end is seen as
      // 'end', not 'close'.
      socket.on('end', () => {
        socket.gone = true;
        socket.destroy();
      });
      return;
    }
    const up = net.connect(port, '127.0.0.1', () => {
      let lines = `${req.method} ${req.url} HTTP/1.1\r\n`;
      for (let i = 0; i < req.rawHeaders.length; i += 2) lines += `${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`;
      up.write(`${lines}\r\n`);
      up.write(head);
      socket.pipe(up).pipe(socket);
    });
    sockets.add(up);
    up.on('close', () => {
      sockets.delete(up);
      socket.destroy();
    });
    up.on('error', () => {});
    socket.on('close', () => up.destroy());
    if (mode === 'cut') setTimeout(() => socket.destroy(), proxy.cutAfterMs);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  proxy.port = /** @type {import('node:net').AddressInfo} */ (server.address()).port;
  return proxy;
}
