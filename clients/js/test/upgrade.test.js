// The way back from the SSE fallback: a client that fell back to SSE
// tries the WebSocket again now and then and moves to it once it opens.
// Against a real `gale serve`, behind a real HTTP proxy that refuses,
// passes, hangs or cuts WebSocket upgrades as each test asks.
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { GaleClient, State } from '../src/index.js';
import { startGale, startUpstream, publish, until, signJwt, API_KEY, HISTORY } from './server.js';
import { startNoUpgradeProxy } from './proxy.js';

const SECRET = 'js-upgrade-secret-0123456789';

let upstream;
let gale;
let backend;

before(async () => {
  // Every weather request takes 1.5 s: one is still in flight when the
  // client moves.
  upstream = await startUpstream(['--latency-ms', '1500']);
  backend = await startSlowBackend();
  // Rooms take publications from their subscribers only; secrets need a
  // subscription token; slow:* are admitted by the backend, in 400 ms.
  const config = `${HISTORY}
[topics."room:*"]
publish = "subscribers"

[topics."secret:*"]
subscribe = "token"
history_size = 100
history_ttl_s = 300

[topics."slow:*"]
subscribe = "proxy"

[proxy]
subscribe_url = "http://127.0.0.1:${backend.address().port}/subscribe"
`;
  gale = await startGale(upstream.url, 0, { GALE_AUTH__JWT_SECRET: SECRET }, config);
});

/** The application's backend, in the tests' place: admits every subscribe, in 400 ms. */
async function startSlowBackend() {
  const server = http.createServer((req, res) => {
    req.resume();
    req.on('end', () =>
      setTimeout(() => {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end('{"result":{}}');
      }, 400),
    );
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return server;
}

after(async () => {
  await gale?.stop();
  upstream?.stop();
  backend?.close();
});

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** The server's count of open SSE sessions. */
async function sseSessions() {
  const r = await fetch(`${gale.http}/metrics.json`, { headers: { authorization: `Bearer ${API_KEY}` } });
  return (await r.json())['sse-sessions'];
}

/**
 * Once the SSE session is closed, a publication on `topic` reaches `c`:
 * its WebSocket holds the subscription.
 */
async function heardOnWebSocket(c, topic) {
  await until(async () => (await sseSessions()) === 0);
  const got = [];
  c.on('note', (d) => got.push(d));
  await publish(gale.http, topic, 'note', 'on the WebSocket');
  await until(() => got.length === 1);
}

/**
 * What a test opened, closed after it even when it fails (a client left
 * reconnecting would keep the suite from ending).
 */
const opened = { clients: [], proxies: [] };
afterEach(async () => {
  for (const c of opened.clients.splice(0)) c.close();
  for (const p of opened.proxies.splice(0)) await p.stop();
});

/** The proxy in front of the tests' gale. */
async function proxyToGale() {
  const proxy = await startNoUpgradeProxy(gale.port);
  opened.proxies.push(proxy);
  return proxy;
}

/** A client through `proxy`, with every state change it reports. */
function client(proxy, options) {
  const c = new GaleClient(`ws://127.0.0.1:${proxy.port}/ws`, { minDelayMs: 300, maxDelayMs: 300, ...options });
  opened.clients.push(c);
  const states = [];
  c.onState((state, info) => states.push({ state, ...info }));
  return { c, states };
}

/** The states from the first `open` on, as [state, transport, upgraded, from]. */
function fromOpen(states) {
  return states
    .slice(states.findIndex((s) => s.state === State.OPEN))
    .map((s) => [s.state, s.transport ?? null, s.upgraded ?? false, s.from ?? null]);
}

test('back to the WebSocket once it opens: one move, nothing lost or repeated, the request in flight answered', async () => {
  const proxy = await proxyToGale();
  const { c, states } = client(proxy, { upgradeDelayMs: 1_000 });
  await c.connect();
  assert.equal(c.transport, 'sse');
  proxy.upgrades = 'pass'; // the first probe comes 500–1,000 ms after SSE opened
  await until(() => c.clientId !== null);
  const sseClient = c.clientId;
  const got = [];
  c.on('headline', (n) => got.push(n));
  await c.subscribeTopic('news:move');
  let answeredOver = null;
  assert.equal(c.transport, 'sse', 'the request goes out over SSE');
  const inFlight = c.weather('Movetown').then((r) => ((answeredOver = c.transport), r));
  // Publications all through the move.
  for (let n = 1; n <= 60 && c.transport !== 'websocket'; n++) {
    await publish(gale.http, 'news:move', 'headline', n);
    await sleep(25);
  }
  await until(() => c.transport === 'websocket');
  for (let n = got.length + 1, end = got.length + 10; n <= end; n++) {
    await publish(gale.http, 'news:move', 'headline', n);
  }
  await publish(gale.http, 'news:move', 'headline', 'last');
  await until(() => got.at(-1) === 'last');
  assert.deepEqual(
    got.slice(0, -1),
    Array.from({ length: got.length - 1 }, (_, i) => i + 1),
    'every publication once, in order',
  );
  assert.equal((await inFlight).city, 'Movetown');
  assert.equal(answeredOver, 'websocket', 'the reply came over SSE after the move: the session waited for it');

  // One seamless move: open over SSE, then open over the WebSocket, with
  // no reconnect between.
  assert.deepEqual(fromOpen(states), [
    ['open', 'sse', false, null],
    ['open', 'websocket', true, 'sse'],
  ]);
  assert.notEqual(c.clientId, sseClient, 'the WebSocket is a connection of its own');
  // The SSE session is closed once nothing waits on it.
  await until(async () => (await sseSessions()) === 0);

  // Requests and the subscription go on over the WebSocket.
  assert.equal((await c.weather('Paris')).city, 'Paris');
  assert.equal(proxy.tries.length, 2, 'the first connect and the one probe');
  c.close();
  await proxy.stop();
});

test('a subscribe and publishes sent during the move: the subscription is made on the WebSocket, no publish runs ahead of it', async () => {
  const proxy = await proxyToGale();
  // A slow token function keeps the move's renewal of secret:move open for
  // 300 ms, while the publishes below go out.
  let slow = false;
  const token = async (topic) => {
    if (slow) await sleep(300);
    return signJwt(SECRET, { sub: '', topic });
  };
  const { c, states } = client(proxy, { upgradeDelayMs: 200 });
  await c.connect();
  await c.subscribeTopic('room:a');
  await c.subscribeTopic('secret:move', { token });
  slow = true;
  // A subscribe sent over SSE as the probe goes out: its answer (400 ms,
  // from the backend) comes after the move began.
  let late = null;
  proxy.onUpgrade = () => (late ??= c.subscribeTopic('slow:late'));
  proxy.upgrades = 'pass';
  const outcomes = [];
  const moved = () => states.some((s) => s.upgraded);
  while (!moved()) {
    // Each publish on room:a needs this connection's subscription of room:a.
    if (c.transport === 'websocket') c.publish('room:a', 'x').then(() => outcomes.push('ok'), (e) => outcomes.push(e.code));
    await sleep(10);
  }
  await late;
  await until(() => c.pending.size === 0);
  assert.ok(outcomes.length >= 3, `${outcomes.length} publishes during the move`);
  assert.deepEqual([...new Set(outcomes)], ['ok'], 'every publish after its subscription');
  // slow:late was subscribed on SSE, after the move began; once SSE is
  // closed, the WebSocket holds it too.
  await heardOnWebSocket(c, 'slow:late');
  c.close();
  await proxy.stop();
});

test('a renewal that fails for a passing reason calls the move off: SSE stays, the next probe moves', async () => {
  const proxy = await proxyToGale();
  // Refused after 100 ms: the WebSocket has greeted the client by then.
  let refuse = false;
  let asked = 0;
  const token = async (topic) => {
    if (refuse) {
      asked++;
      await sleep(100);
      throw new Error('the token service is down');
    }
    return signJwt(SECRET, { sub: '', topic });
  };
  const { c, states } = client(proxy, { upgradeDelayMs: 200 });
  const failed = [];
  c.on('gale.resubscribe_failed', (e) => failed.push(e.code));
  await c.connect();
  await c.subscribeTopic('secret:off', { token });
  await until(() => c.clientId !== null);
  const sseClient = c.clientId;
  refuse = true;
  proxy.upgrades = 'pass';
  await until(() => asked > 0);
  // The move is called off when the token fails, 100 ms later. Checked at
  // once: the next probe may begin 200 ms after that and move again.
  await until(() => c.transport === 'sse');
  assert.deepEqual(failed, [], 'nothing failed: the subscription is intact on SSE');
  assert.equal(c.clientId, sseClient, 'on the same SSE session');
  assert.equal((await c.weather('Stayville')).city, 'Stayville');
  refuse = false;
  await until(() => c.transport === 'websocket' && c.state === State.OPEN, 5_000);
  const got = [];
  c.on('headline', (d) => got.push(d));
  await publish(gale.http, 'secret:off', 'headline', 'moved');
  await until(() => got.length === 1);
  assert.deepEqual(fromOpen(states), [
    ['open', 'sse', false, null],
    ['open', 'websocket', true, 'sse'],
  ]);
  c.close();
  await proxy.stop();
});

test('a subscribe queued before SSE opened and answered after the move began is made on the WebSocket too', async () => {
  const proxy = await proxyToGale();
  proxy.onUpgrade = () => {
    // The first try (the connect) is refused; the probe passes.
    if (proxy.tries.length === 1) setTimeout(() => (proxy.upgrades = 'pass'), 0);
  };
  const { c } = client(proxy, { upgradeDelayMs: 100 });
  const opening = c.connect();
  // Queued, sent over SSE as it opens, answered 400 ms later (the backend).
  const subscribed = c.subscribeTopic('slow:queued');
  await opening;
  await subscribed;
  assert.equal(c.transport, 'websocket', 'the move began before the answer');
  await heardOnWebSocket(c, 'slow:queued');
  c.close();
  await proxy.stop();
});

test('a WebSocket cut after the move is done, while SSE waits for a reply, is an ordinary failed move', async () => {
  const proxy = await proxyToGale();
  const { c, states } = client(proxy, { upgradeDelayMs: 200 });
  await c.connect();
  proxy.upgrades = 'cut';
  proxy.cutAfterMs = 600;
  // Answered in 1.5 s, over SSE: the SSE session waits for it past the cut.
  const inFlight = c.weather('Waitville').catch((e) => e.code);
  await until(() => states.some((s) => s.upgraded));
  proxy.upgrades = 'refuse';
  const got = [];
  c.on('headline', (d) => got.push(d));
  await c.subscribeTopic('news:after'); // on the WebSocket only
  await until(() => c.transport === 'sse' && c.state === State.OPEN);
  assert.deepEqual(
    fromOpen(states).slice(1).map(([state, transport]) => [state, transport]),
    [
      ['open', 'websocket'],
      ['reconnecting', null],
      ['reconnecting', 'sse'],
      ['open', 'sse'],
    ],
  );
  assert.equal(await inFlight, 'disconnected', 'the SSE session it was on is closed with the move');
  await publish(gale.http, 'news:after', 'headline', 'renewed over SSE');
  await until(() => got.length === 1);
  c.close();
  await proxy.stop();
});

test('probes that fail wait twice as long each time, and leave the SSE connection alone', async () => {
  const proxy = await proxyToGale();
  const { c, states } = client(proxy, { upgradeDelayMs: 100 });
  await c.connect();
  const opened = states.length;
  await sleep(2_000);
  // Waits drawn from [50, 100], [100, 200], [200, 400], [400, 800],
  // [800, 1600] ms: 4 or 5 probes in 2 s (at a steady 100 ms, about 20).
  const probes = proxy.tries.length - 1;
  assert.ok(probes >= 3 && probes <= 5, `${probes} probes in 2 s`);
  const gaps = proxy.tries.slice(1).map((t, i) => t - proxy.tries[i]);
  for (let i = 3; i < gaps.length; i++) assert.ok(gaps[i] > gaps[i - 2], `gaps grow: ${gaps}`);
  assert.equal(states.length, opened, 'no state change while probing');
  assert.equal(c.transport, 'sse');
  assert.equal((await c.weather('Probeville')).city, 'Probeville');
  c.close();
  await proxy.stop();
});

test('a probe that hangs is given up after timeoutMs, and the next one comes', async () => {
  const proxy = await proxyToGale();
  const { c } = client(proxy, { upgradeDelayMs: 50, timeoutMs: 400 });
  await c.connect();
  proxy.upgrades = 'hang';
  await until(() => proxy.hung.length === 1);
  const hung = Date.now();
  await until(() => proxy.hung[0].gone === true, 2_000);
  assert.ok(Date.now() - hung >= 300, 'given up after its timeout, not before');
  assert.equal(c.transport, 'sse');
  assert.equal(c.state, State.OPEN);
  await until(() => proxy.hung.length === 2, 2_000);
  c.close();
  await proxy.stop();
});

test('close() stops a probe under way at once', async () => {
  const proxy = await proxyToGale();
  const { c, states } = client(proxy, { upgradeDelayMs: 50, timeoutMs: 10_000 });
  await c.connect();
  proxy.upgrades = 'hang';
  await until(() => proxy.hung.length === 1);
  c.close();
  await until(() => proxy.hung[0].gone === true, 1_000);
  const tries = proxy.tries.length;
  await sleep(300);
  assert.equal(proxy.tries.length, tries, 'no probe after close()');
  assert.equal(states.at(-1).state, State.CLOSED);
  await until(async () => (await sseSessions()) === 0);
  await proxy.stop();
});

test('a WebSocket cut soon after the move sends the client back to SSE at once; the next probe waits longer', async () => {
  const proxy = await proxyToGale();
  const { c, states } = client(proxy, { upgradeDelayMs: 200 });
  await c.connect();
  const got = [];
  c.on('headline', (n) => got.push(n));
  await c.subscribeTopic('news:cut');
  proxy.upgrades = 'cut';
  proxy.cutAfterMs = 400;
  const moves = () => states.filter((s) => s.upgraded).length;
  const back = () => states.filter((s) => s.state === State.RECONNECTING && s.transport === undefined);
  let n = 0;
  // Three moves, each cut; publications all the while.
  const deadline = Date.now() + 20_000;
  while (moves() < 3) {
    assert.ok(Date.now() < deadline, `${moves()} moves in 20 s`);
    await publish(gale.http, 'news:cut', 'headline', ++n);
    await sleep(20);
  }
  proxy.upgrades = 'refuse';
  // The last move is cut too: back on SSE, open.
  await until(() => back().length === moves() + 1 && c.transport === 'sse' && c.state === State.OPEN);
  await publish(gale.http, 'news:cut', 'headline', ++n);
  await until(() => got.length === n);
  await sleep(200);
  assert.deepEqual(got, Array.from({ length: n }, (_, i) => i + 1), 'every publication once, in order');

  // The refused first connect and each cut: on to SSE with no wait (no
  // backoff), told as a fallback, then reported as a reconnect.
  for (const b of back()) {
    assert.equal(b.delayMs, 0);
    assert.equal(b.fallback, true);
  }
  const cuts = states.filter((s) => s.upgraded).map((s) => states.indexOf(s));
  for (const at of cuts) {
    assert.deepEqual(
      states.slice(at + 1, at + 4).map((s) => [s.state, s.transport ?? null]),
      [
        ['reconnecting', null],
        ['reconnecting', 'sse'],
        ['open', 'sse'],
      ],
    );
  }
  assert.equal(c.lastClose?.code, 1006);
  // The waits before the probes double (drawn from [100, 200], then
  // [200, 400], then [400, 800] ms after each return to SSE).
  const gaps = proxy.tries.slice(1).map((t, i) => t - proxy.tries[i]);
  assert.ok(gaps[2] > gaps[0], `gaps grow: ${gaps}`);
  c.close();
  await proxy.stop();
});

test('a moved WebSocket closed on purpose is not a failed move: the usual backoff, back over the WebSocket', async () => {
  const proxy = await proxyToGale();
  const { c, states } = client(proxy, { upgradeDelayMs: 100 });
  await c.connect();
  await until(() => c.clientId !== null);
  const sseClient = c.clientId;
  proxy.upgrades = 'pass';
  await until(() => c.transport === 'websocket' && c.state === State.OPEN);
  // The WebSocket's greeting may come just after it is reported open.
  await until(() => c.clientId !== sseClient);
  const r = await fetch(`${gale.http}/api/disconnect`, {
    method: 'POST',
    headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
    body: JSON.stringify({ client: c.clientId, code: 4000, reason: 'by the application' }),
  });
  assert.equal(r.status, 200, await r.text());
  await until(() => states.filter((s) => s.state === State.OPEN).length === 3);
  const dropped = states.find((s) => s.code === 4000);
  assert.ok(dropped.delayMs > 0 && !dropped.fallback, JSON.stringify(dropped));
  assert.equal(c.transport, 'websocket');
  c.close();
  await proxy.stop();
});

test('upgrade: false stays on the fallback; bad delays are refused', async () => {
  const proxy = await proxyToGale();
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
