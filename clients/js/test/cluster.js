// What the cluster tests need around gale: a private `redis-server` (the
// binary installed on the machine, as the Rust tests use it), and a TCP
// forwarder standing in for a load balancer in front of several nodes.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** A port free right now on 127.0.0.1 (listened on with port 0, then closed). */
export async function freePort() {
  const server = net.createServer();
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const { port } = /** @type {net.AddressInfo} */ (server.address());
  await new Promise((r) => server.close(r));
  return port;
}

/** Whether a Redis answers PING on `port` (over a raw TCP socket). */
function ping(port) {
  return new Promise((resolve) => {
    const socket = net.connect({ host: '127.0.0.1', port });
    let seen = '';
    const done = (ok) => {
      clearTimeout(timer);
      socket.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), 500);
    socket.on('connect', () => socket.write('PING\r\n'));
    socket.on('data', (chunk) => {
      seen += chunk;
      if (seen.includes('\r\n')) done(seen.startsWith('+PONG'));
    });
    socket.on('error', () => done(false));
  });
}

/**
 * A `redis-server` of the calling test's own, on a free port, keeping
 * nothing on disk (`--save '' --appendonly no`, its files in a temporary
 * dir). Resolves once it answers PING: {port, url, stop()}; stop kills it
 * (SIGKILL: nothing to save) and removes its dir. A port taken between
 * the check and the start is retried on another.
 */
export async function startRedis() {
  const dir = mkdtempSync(join(tmpdir(), 'gale-js-redis-'));
  try {
    for (let tries = 0; tries < 5; tries++) {
      const port = await freePort();
      const child = spawn(
        'redis-server',
        ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir],
        { stdio: ['ignore', 'pipe', 'pipe'] },
      );
      let log = '';
      const keep = (chunk) => {
        log = (log + chunk).slice(-4_000);
      };
      child.stdout.on('data', keep);
      child.stderr.on('data', keep);
      /** @type {string | null} why it ended, once it did */
      let ended = null;
      const exited = new Promise((r) => {
        child.on('exit', (code, signal) => {
          ended ??= `exited (${code ?? signal})`;
          r(undefined);
        });
        child.on('error', (e) => {
          ended ??= e.message;
          r(undefined);
        });
      });
      const until = Date.now() + 10_000;
      let up = false;
      while (!up && ended === null && Date.now() < until) {
        up = await ping(port);
        if (!up) await new Promise((r) => setTimeout(r, 50));
      }
      if (up) {
        return {
          port,
          url: `redis://127.0.0.1:${port}`,
          async stop() {
            if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
            await exited;
            rmSync(dir, { recursive: true, force: true });
          },
        };
      }
      if (ended === null) {
        child.kill('SIGKILL');
        await exited;
        throw new Error(`redis-server did not answer PING on port ${port} within 10 s; its output:\n${log}`);
      }
      if (/ENOENT/.test(ended)) {
        throw new Error('redis-server not found: install it (apt-get install redis-server)');
      }
      if (!/already in use|Address in use/i.test(log)) {
        throw new Error(`redis-server ${ended} at start; its output:\n${log}`);
      }
      // The port was taken meanwhile: another one.
    }
    throw new Error('redis-server found every port taken (5 tries)');
  } catch (e) {
    rmSync(dir, { recursive: true, force: true });
    throw e;
  }
}

/** Whether the node on `port` answers /healthz with 200 (within a second). */
async function healthy(port) {
  try {
    const r = await fetch(`http://127.0.0.1:${port}/healthz`, { signal: AbortSignal.timeout(1_000) });
    await r.arrayBuffer();
    return r.status === 200;
  } catch {
    return false;
  }
}

/**
 * A TCP forwarder in front of gale nodes, as a load balancer with health
 * checks: each new connection goes to the first of `ports` whose
 * `/healthz` answers 200 at that moment (checked before connecting), and
 * is piped both ways; with none healthy it is closed. Returns {port, url
 * (ws://…/ws), http, routes, hold(), release(), stop()}: `routes` lists
 * the backend port of every connection forwarded, in order; `hold()`
 * makes new connections wait, unrouted, until `release()` (to publish
 * something surely while a client is away); stop closes everything.
 * @param {number[]} ports
 */
export async function startForwarder(ports) {
  /** @type {number[]} */
  const routes = [];
  /** @type {Set<net.Socket>} */
  const sockets = new Set();
  /** @type {{promise: Promise<void>, resolve: Function} | null} */
  let held = null;
  const track = (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  };
  const server = net.createServer(async (client) => {
    track(client);
    client.on('error', () => client.destroy());
    // Nothing is read from the client until it is piped: its bytes wait.
    if (held) await held.promise;
    let target;
    for (const port of ports) {
      if (client.destroyed) return;
      if (await healthy(port)) {
        target = port;
        break;
      }
    }
    if (target === undefined || client.destroyed) {
      client.destroy();
      return;
    }
    routes.push(target);
    const backend = net.connect({ host: '127.0.0.1', port: target });
    track(backend);
    backend.on('error', () => {
      backend.destroy();
      client.destroy();
    });
    client.on('error', () => backend.destroy());
    // An end is passed on (after what was written before it).
    client.on('close', () => backend.end());
    backend.on('close', () => client.end());
    client.pipe(backend);
    backend.pipe(client);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const { port } = /** @type {net.AddressInfo} */ (server.address());
  const release = () => {
    held?.resolve();
    held = null;
  };
  return {
    port,
    url: `ws://127.0.0.1:${port}/ws`,
    http: `http://127.0.0.1:${port}`,
    routes,
    hold() {
      if (held) return;
      let resolve;
      const promise = new Promise((r) => (resolve = r));
      held = { promise, resolve };
    },
    release,
    stop() {
      release();
      for (const s of sockets) s.destroy();
      return new Promise((r) => server.close(() => r(undefined)));
    },
  };
}
