// Starts the real `gale serve` (and the fake weather API, the only
// stand-in: the provider is external) on port 0, for the tests.
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { accessSync, constants, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
export const GALE = process.env.GALE_BIN ?? resolve(here, '../../../target/debug/gale');
export const API_KEY = 'js-test-key-0123456789';

/**
 * Throws at once, with what to do, when there is no gale binary to run:
 * without it every start would wait for a start-up line that never comes.
 */
export function requireGale() {
  let ok = false;
  try {
    accessSync(GALE, constants.X_OK);
    ok = statSync(GALE).isFile();
  } catch {}
  if (!ok) {
    throw new Error(`gale binary not found at ${GALE}: build it with \`cargo build\` (or set GALE_BIN)`);
  }
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

/** The fake weather API, `gale fake-upstream [args]`, on port 0. */
export async function startUpstream(args = []) {
  requireGale();
  const child = spawn(GALE, ['fake-upstream', '--listen', '127.0.0.1:0', ...args], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const url = await logged(child, /fake weather API at (http:\/\/127\.0\.0\.1:\d+)/);
  await waitFor(`${url}/stats`);
  return { url, stop: () => child.kill('SIGTERM') };
}

/** Resolves with the first group of `pattern` in the child's stderr. */
function logged(child, pattern) {
  return new Promise((resolve, reject) => {
    let seen = '';
    const timer = setTimeout(() => reject(new Error(`no start-up line in:\n${seen}`)), 15_000);
    const onData = (chunk) => {
      seen += chunk;
      const m = pattern.exec(seen);
      if (m) {
        clearTimeout(timer);
        child.stderr.off('data', onData);
        child.stderr.resume(); // keep draining its log
        resolve(m[1]);
      }
    };
    child.stderr.on('data', onData);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(new Error(`${GALE} could not be started: ${e.message}`));
    });
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`exited (${code ?? signal}) before starting:\n${seen}`));
    });
  });
}

/**
 * The tests' config file: the tests' topics open to anonymous clients
 * (topics are closed unless the config opens them), history on for news
 * and weather topics.
 */
export const HISTORY = `
[topics."*"]
subscribe = "anyone"

[topics."news:*"]
history_size = 100
history_ttl_s = 300

[topics."weather:*"]
history_size = 10
history_ttl_s = 300
`;

/**
 * `gale serve` on 127.0.0.1:`port`, or on port 0 (the OS picks; the port
 * is read from the server's "listening" log line), against `upstreamUrl`.
 * Returns {url, http, port, stop(), kill()}; stop and kill resolve once it
 * exited.
 */
export async function startGale(upstreamUrl, port = 0, env = {}, config = HISTORY) {
  requireGale();
  const dir = mkdtempSync(join(tmpdir(), 'gale-js-'));
  const file = join(dir, 'gale.toml');
  writeFileSync(file, config);
  const child = spawn(GALE, ['serve', '--listen', `127.0.0.1:${port}`, '--config', file], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: {
      ...process.env,
      RUST_LOG: 'warn,gale_engine::server=info',
      GALE_WEATHER__BASE_URL: upstreamUrl,
      GALE_STORE__URL: `sqlite://${dir}/gale.db`,
      GALE_STORE__SPILL_DIR: `${dir}/spill`,
      GALE_API__KEY: API_KEY,
      ...env,
    },
  });
  const exited = new Promise((r) => child.on('exit', r));
  const bound = Number(await logged(child, /WebSocket at ws:\/\/127\.0\.0\.1:(\d+)\/ws/));
  await waitFor(`http://127.0.0.1:${bound}/healthz`);
  return {
    port: bound,
    url: `ws://127.0.0.1:${bound}/ws`,
    http: `http://127.0.0.1:${bound}`,
    async stop() {
      child.kill('SIGTERM');
      await exited;
      rmSync(dir, { recursive: true, force: true });
    },
    /** Kills it without a goodbye (SIGKILL: no close frames), as a crash would. */
    async kill() {
      child.kill('SIGKILL');
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

/** Resolves once `predicate()` holds (checked every 20 ms; it may
 * return a promise); rejects after `ms`. */
export async function until(predicate, ms = 10_000) {
  const start = Date.now();
  for (;;) {
    if (await predicate()) return;
    if (Date.now() - start > ms) throw new Error('condition never held');
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** An HS256 JWT signed with `secret`, with `claims`, valid for ten minutes. */
export function signJwt(secret, claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ exp: Math.floor(Date.now() / 1000) + 600, ...claims })}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}
