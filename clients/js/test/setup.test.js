// What a newcomer meets before the first request: installing the package
// by its name, a runtime without WebSocket, and running the tests without
// a built binary. Run: npm test (with the other test files).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { startGale, startUpstream } from './server.js';

const here = dirname(fileURLToPath(import.meta.url));
const pkg = resolve(here, '..');

/** The environment of a child process: this run's, less the test runner's own marker. */
function childEnv(extra = {}) {
  const env = { ...process.env, ...extra };
  delete env.NODE_TEST_CONTEXT; // else a nested `node --test` reports to this runner
  delete env.NODE_OPTIONS;
  return env;
}

/** Runs `file args` to its end: {code, stdout, stderr, ms}. */
function run(file, args, opts = {}) {
  const start = Date.now();
  return new Promise((resolve) => {
    execFile(file, args, { timeout: 60_000, ...opts, env: childEnv(opts.env) }, (err, stdout, stderr) => {
      resolve({ code: err ? (err.code ?? err.signal) : 0, stdout, stderr, ms: Date.now() - start });
    });
  });
}

let upstream;
let gale;

before(async () => {
  upstream = await startUpstream();
  gale = await startGale(upstream.url);
});

after(async () => {
  await gale?.stop();
  upstream?.stop();
});

test('`npm install <path to clients/js>` makes `import … from "@gale/client"` work', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'gale-install-'));
  try {
    writeFileSync(join(dir, 'package.json'), JSON.stringify({ name: 'gale-install-check', version: '1.0.0', private: true }));
    // A local folder: npm needs no registry for it.
    const npm = process.platform === 'win32' ? 'npm.cmd' : 'npm';
    const install = await run(npm, ['install', '--offline', '--no-audit', '--no-fund', pkg], { cwd: dir });
    assert.equal(install.code, 0, `npm install failed:\n${install.stdout}\n${install.stderr}`);
    writeFileSync(
      join(dir, 'check.mjs'),
      `import { GaleClient, GaleError, State, Transport, SseTransport } from '@gale/client';
const gale = new GaleClient(process.argv[2], { transports: ['sse'] });
await gale.connect();
const reading = await gale.weather('Paris');
gale.close();
console.log(JSON.stringify({
  city: reading.city,
  exports: [typeof GaleClient, typeof GaleError, typeof SseTransport, State.OPEN, Transport.SSE],
  resolved: import.meta.resolve('@gale/client'),
}));
`,
    );
    // SSE, so that this runs on Node 20 without --experimental-websocket.
    const check = await run(process.execPath, ['check.mjs', gale.url], { cwd: dir });
    assert.equal(check.code, 0, check.stderr);
    const out = JSON.parse(check.stdout);
    assert.equal(out.city, 'Paris');
    assert.deepEqual(out.exports, ['function', 'function', 'function', 'open', 'sse']);
    assert.match(out.resolved, /\/src\/index\.js$/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('without a WebSocket (Node 20 without the flag) the client says so once, and works over SSE', async () => {
  const major = Number(process.versions.node.split('.')[0]);
  // Node 22+ has a global WebSocket: the child then removes it, to be the
  // runtime this is about. On Node 20 a child without
  // --experimental-websocket has none to begin with.
  const script = `
if (globalThis.WebSocket) delete globalThis.WebSocket;
if (globalThis.WebSocket) throw new Error('could not remove the global WebSocket');
const { GaleClient } = await import(${JSON.stringify(resolve(pkg, 'src/index.js'))});
const url = process.argv[1];
const a = new GaleClient(url);
const b = new GaleClient(url); // a second client: no second warning
const infos = [];
a.onState((state, info) => infos.push({ state, warning: info?.warning ?? null }));
await a.connect();
const reading = await a.weather('Paris');
console.log(JSON.stringify({ city: reading.city, transport: a.transport, warning: a.warning, infos }));
a.close();
b.close();
`;
  const r = await run(process.execPath, ['--input-type=module', '-e', script, gale.url]);
  assert.equal(r.code, 0, r.stderr);
  if (major < 22) assert.equal(typeof globalThis.WebSocket, 'function', 'this run has the flag; the child had not');
  const warnings = r.stderr.split('\n').filter((l) => l.includes('no WebSocket in this runtime'));
  assert.equal(warnings.length, 1, `one warning on stderr, got:\n${r.stderr}`);
  assert.match(warnings[0], /^@gale\/client: no WebSocket in this runtime \(Node 20 needs --experimental-websocket.*\); using SSE$/);
  const out = JSON.parse(r.stdout);
  assert.equal(out.city, 'Paris');
  assert.equal(out.transport, 'sse');
  assert.match(out.warning, /no WebSocket in this runtime/);
  const open = out.infos.find((i) => i.state === 'open');
  assert.ok(open, JSON.stringify(out.infos));
  assert.equal(open.warning, out.warning, 'onState reports it too');
});

test('without a built binary the tests fail at once and say how to build it', async () => {
  const missing = join(tmpdir(), 'gale-missing', 'gale');
  const r = await run(process.execPath, ['--experimental-websocket', '--test', 'test/client.test.js'], {
    cwd: pkg,
    env: { GALE_BIN: missing },
  });
  const output = r.stdout + r.stderr;
  assert.notEqual(r.code, 0, 'the run fails');
  assert.ok(
    output.includes(`gale binary not found at ${missing}: build it with \`cargo build\` (or set GALE_BIN)`),
    output.slice(0, 2_000),
  );
  assert.doesNotMatch(output, /no start-up line|never answered/);
  assert.ok(r.ms < 3_000, `failed after ${r.ms} ms`);
});
