// Starts the real `gale serve` (and the fake weather API, the only
// stand-in: the provider is external) on free ports, for the tests.
import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
export const GALE = process.env.GALE_BIN ?? resolve(here, '../../../target/debug/gale');
export const API_KEY = 'js-test-key-0123456789';

export function freePort() {
  return new Promise((res, rej) => {
    const s = createServer();
    s.on('error', rej);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
  });
}

async function waitFor(url, ms = 15_000) {
  const until = Date.now() + ms;
  while (Date.now() < until) {
    try {
      const r = await fetch(url);
      if (r.ok) return;
    } catch {}
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`${url} never answered`);
}

/** The fake weather API: `gale fake-upstream [args]`. */
export async function startUpstream(args = []) {
  const port = await freePort();
  const child = spawn(GALE, ['fake-upstream', '--listen', `127.0.0.1:${port}`, ...args], {
    stdio: 'ignore',
  });
  const url = `http://127.0.0.1:${port}`;
  await waitFor(`${url}/stats`);
  return { url, stop: () => child.kill('SIGTERM') };
}

/**
 * `gale serve` on `port` (a free one by default), against `upstreamUrl`.
 * Returns {url, port, stop()} where stop resolves once it exited.
 */
export async function startGale(upstreamUrl, port, env = {}) {
  port ??= await freePort();
  const dir = mkdtempSync(join(tmpdir(), 'gale-js-'));
  const child = spawn(GALE, ['serve', '--listen', `127.0.0.1:${port}`], {
    stdio: ['ignore', 'ignore', 'inherit'],
    env: {
      ...process.env,
      RUST_LOG: 'warn',
      GALE_WEATHER__BASE_URL: upstreamUrl,
      GALE_STORE__URL: `sqlite://${dir}/gale.db`,
      GALE_API__KEY: API_KEY,
      ...env,
    },
  });
  const exited = new Promise((r) => child.on('exit', r));
  await waitFor(`http://127.0.0.1:${port}/healthz`);
  return {
    port,
    url: `ws://127.0.0.1:${port}/ws`,
    http: `http://127.0.0.1:${port}`,
    async stop() {
      child.kill('SIGTERM');
      await exited;
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Pushes `data` as `event` to `topic` through POST /api/publish. */
export async function publish(http, topic, event, data) {
  const r = await fetch(`${http}/api/publish`, {
    method: 'POST',
    headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
    body: JSON.stringify({ event, data, topic }),
  });
  if (!r.ok) throw new Error(`publish: ${r.status} ${await r.text()}`);
  return r.json();
}
