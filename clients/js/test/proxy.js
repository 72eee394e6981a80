// A real HTTP proxy in front of gale that refuses WebSocket upgrades, as
// some corporate proxies do: plain requests (and SSE streams) pass, an
// Upgrade is answered 403. What the fallback transport exists for.
import http from 'node:http';
import net from 'node:net';

/**
 * Starts the proxy to 127.0.0.1:`port` on a free port: {port, upgrades
 * (how many upgrades were asked), allowUpgrades() (pass them from now on,
 * as a proxy whose rule changed), stop()}.
 */
export async function startNoUpgradeProxy(port) {
  let allowed = false;
  const tunnels = new Set();
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
  server.on('upgrade', (req, socket, head) => {
    proxy.upgrades++;
    if (!allowed) {
      socket.end('HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n');
      return;
    }
    // Passed through as it came: the request head, then bytes both ways.
    const back = net.connect(port, '127.0.0.1', () => {
      let lines = `${req.method} ${req.url} HTTP/1.1\r\n`;
      for (let i = 0; i < req.rawHeaders.length; i += 2) lines += `${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`;
      back.write(`${lines}\r\n`);
      if (head.length > 0) back.write(head);
      socket.pipe(back).pipe(socket);
    });
    tunnels.add(back);
    back.on('close', () => (tunnels.delete(back), socket.destroy()));
    back.on('error', () => socket.destroy());
    socket.on('error', () => back.destroy());
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const { port: own } = /** @type {import('node:net').AddressInfo} */ (server.address());
  const proxy = {
    port: own,
    upgrades: 0,
    allowUpgrades() {
      allowed = true;
    },
    stop: () => new Promise((r) => {
      for (const t of tunnels) t.destroy();
      server.closeAllConnections();
      server.close(r);
    }),
  };
  return proxy;
}
