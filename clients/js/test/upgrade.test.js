// The way back from the SSE fallback: a client that fell back to SSE
// tries the WebSocket again now and then and moves to it once it opens.
// Against a real `gale serve`, behind a real HTTP proxy that refuses,
// passes, hangs or cuts WebSocket upgrades as each test asks.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { GaleClient, State } from '../src/index.js';
import { startGale, startUpstream, publish, until, API_KEY } from './server.js';
import { startNoUpgradeProxy } from './proxy.js';

let upstream;
let gale;

before(async () => {
  // Every weather request takes 600 ms: one is still in flight when the
  // client moves.
  upstream = await startUpstream(['--latency-ms', '600']);
  gale = await startGale(upstream.url);
});

after(async () => {
  await gale?.stop();
  upstream?.stop();
});

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** The server's count of open SSE sessions. */
async function sseSessions() {
  const r = await fetch(`${gale.http}/metrics.json`, { headers: { authorization: `Bearer ${API_KEY}` } });
  return (await r.json())['sse-sessions'];
}

/** A client through `proxy`, with every state change it reports. */
function client(proxy, options) {
  const c = new GaleClient(`ws://127.0.0.1:${proxy.port}/ws`, { minDelayMs: 300, maxDelayMs: 300, ...options });
  const states = [];
  c.onState((state, info) => states.push({ state, ...info }));
  return { c, states };
}

test('back to the WebSocket once it opens: one move, nothing lost or repeated, the request in flight answered', async () => {
  const proxy = await startNoUpgradeProxy(gale.port);
  const { c, states } = client(proxy, { upgradeDelayMs: 300 });
  await c.connect();
  assert.equal(c.transport, 'sse');
  await until(() => c.clientId !== null);
  const sseClient = c.clientId;
  const got = [];
  c.on('headline', (n) => got.push(n));
  await c.subscribeTopic('news:move');
  const inFlight = c.weather('Movetown'); // answered 600 ms later, on the SSE session
  proxy.upgrades = 'pass';
  // Publications all through the move.
  for (let n = 1; n <= 40; n++) {
    await publish(gale.http, 'news:move', 'headline', n);
    await sleep(15);
  }
  await until(() => c.transport === 'websocket');
  assert.equal((await inFlight).city, 'Movetown');
  await until(() => got.length >= 40);
  await sleep(200);
  assert.deepEqual(got, Array.from({ length: 40 }, (_, i) => i + 1), 'every publication once, in order');

  // One seamless move: open over SSE, then open over the WebSocket, with
  // no reconnect between.
  const afterOpen = states.slice(states.findIndex((s) => s.state === State.OPEN));
  assert.deepEqual(
    afterOpen.map((s) => [s.state, s.transport, s.upgraded ?? false, s.from ?? null]),
    [
      ['open', 'sse', false, null],
      ['open', 'websocket', true, 'sse'],
    ],
  );
  assert.notEqual(c.clientId, sseClient, 'the WebSocket is a connection of its own');
  // The SSE session is closed once nothing waits on it.
  await until(async () => (await sseSessions()) === 0);
  assert.equal(await sseSessions(), 0);

  // Requests, publications and the subscription go on over the WebSocket.
  assert.equal((await c.weather('Paris')).city, 'Paris');
  await publish(gale.http, 'news:move', 'headline', 41);
  await until(() => got.length === 41);
  assert.equal(got.at(-1), 41);
  assert.equal(proxy.tries.length, 2, 'the first connect and the one probe');
  c.close();
  await proxy.stop();
});

test('probes that fail wait twice as long each time, and leave the SSE connection alone', async () => {
  const proxy = await startNoUpgradeProxy(gale.port);
  const { c, states } = client(proxy, { upgradeDelayMs: 100 });
  await c.connect();
  const opened = states.length;
  await sleep(2_000);
  // Waits drawn from [50, 100], [100, 200], [200, 400], [400, 800],
  // [800, 1600] ms: 4 or 5 probes in 2 s (at a steady 100 ms, about 20).
  const probes = proxy.tries.length - 1;
  assert.ok(probes >= 3 && probes <= 5, `${probes} probes in 2 s`);
  const gaps = proxy.tries.slice(1).map((t, i) => t - proxy.tries[i]);
  for (let i = 2; i < gaps.length; i++) assert.ok(gaps[i] > gaps[i - 2], `gaps grow: ${gaps}`);
  assert.equal(states.length, opened, 'no state change while probing');
  assert.equal(c.transport, 'sse');
  assert.equal((await c.weather('Probeville')).city, 'Probeville');
  c.close();
  await proxy.stop();
});

test('a probe that hangs is given up after timeoutMs; close() stops a probe under way', async () => {
  const proxy = await startNoUpgradeProxy(gale.port);
  const { c, states } = client(proxy, { upgradeDelayMs: 50, timeoutMs: 400 });
  await c.connect();
  proxy.upgrades = 'hang';
  await until(() => proxy.hung.length === 1);
  await until(() => proxy.hung[0].gone === true, 2_000);
  assert.equal(c.transport, 'sse');
  assert.equal(c.state, State.OPEN);
  // The next probe (after 50–100 ms, doubled: 100–200) hangs too; close()
  // while it does.
  await until(() => proxy.hung.length === 2, 2_000);
  c.close();
  await until(() => proxy.hung[1].gone === true, 2_000);
  const tries = proxy.tries.length;
  await sleep(600);
  assert.equal(proxy.tries.length, tries, 'no probe after close()');
  assert.equal(states.at(-1).state, State.CLOSED);
  await until(async () => (await sseSessions()) === 0);
  await proxy.stop();
});

test('a WebSocket cut soon after the move sends the client back to SSE at once; the next probe waits longer', async () => {
  const proxy = await startNoUpgradeProxy(gale.port);
  const { c, states } = client(proxy, { upgradeDelayMs: 200 });
  await c.connect();
  const got = [];
  c.on('headline', (n) => got.push(n));
  await c.subscribeTopic('news:cut');
  proxy.upgrades = 'cut';
  proxy.cutAfterMs = 150;
  let n = 0;
  // Three moves, each cut; publications all the while.
  while (proxy.tries.length < 4) {
    await publish(gale.http, 'news:cut', 'headline', ++n);
    await sleep(20);
  }
  proxy.upgrades = 'refuse';
  // The last move is cut too: back on SSE, open, with no probe under way.
  const back = () => states.filter((s) => s.state === State.RECONNECTING && s.transport === undefined);
  await until(() => back().length === 4 && c.transport === 'sse' && c.state === State.OPEN);
  await publish(gale.http, 'news:cut', 'headline', ++n);
  await until(() => got.length === n);
  await sleep(200);
  assert.deepEqual(got, Array.from({ length: n }, (_, i) => i + 1), 'every publication once, in order');

  // The refused first connect and each cut: on to SSE with no wait (no
  // backoff), told as a fallback.
  for (const b of back()) {
    assert.equal(b.delayMs, 0);
    assert.equal(b.fallback, true);
  }
  // The waits before the probes double (drawn from [100, 200], then
  // [200, 400], then [400, 800] ms after each return to SSE).
  const gaps = proxy.tries.slice(1).map((t, i) => t - proxy.tries[i]);
  assert.ok(gaps[2] > gaps[0], `gaps grow: ${gaps}`);
  c.close();
  await proxy.stop();
});

test('upgrade: false stays on the fallback; bad delays are refused', async () => {
  const proxy = await startNoUpgradeProxy(gale.port);
  const { c } = client(proxy, { upgrade: false, upgradeDelayMs: 50 });
  await c.connect();
  proxy.upgrades = 'pass';
  await sleep(500);
  assert.equal(c.transport, 'sse');
  assert.equal(proxy.tries.length, 1);
  c.close();
  await proxy.stop();
  for (const bad of [0, -1, NaN, Infinity, '5000']) {
    assert.throws(() => new GaleClient(gale.url, { upgradeDelayMs: bad }), /options\.upgradeDelayMs/);
  }
  assert.throws(() => new GaleClient(gale.url, { maxUpgradeDelayMs: 0 }), /options\.maxUpgradeDelayMs/);
});
