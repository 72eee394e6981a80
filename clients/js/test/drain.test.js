// A node going away without a reconnect storm (server.drain_s): its
// clients are closed with 1012 and a suggested delay, which the client
// waits instead of its backoff, and land on another node of the cluster
// with what was published meanwhile recovered from the shared history.
// Run: npm test (the cluster test starts a private redis-server).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { randomBytes } from 'node:crypto';
import { GaleClient, State } from '../src/index.js';
import { startGale, startUpstream, publish, until } from './server.js';
import { startRedis, startForwarder } from './cluster.js';

/** A drain of 2 s, each connection told to come back within 300 ms. */
const DRAIN = { GALE_SERVER__DRAIN_S: '2', GALE_SERVER__DRAIN_RECONNECT_MS: '300' };
const MAX_SUGGESTED_MS = 300;

let upstream;

before(async () => {
  upstream = await startUpstream();
});

after(() => {
  upstream?.stop();
});

/** Every state `c` reports, as {state, ...info, at (Date.now())}, in order. */
function watch(c) {
  const states = [];
  c.onState((state, info) => states.push({ state, ...info, at: Date.now() }));
  return states;
}

/** The index in `states` of the reconnect a drain caused (close code 1012); -1 before it. */
const drainedAt = (states) => states.findIndex((s) => s.state === State.RECONNECTING && s.code === 1012);

/** Checks the reconnect a drain caused: the server's suggestion, waited as is. */
function assertSuggested(info) {
  const what = JSON.stringify(info);
  assert.equal(info.suggested, true, what);
  assert.equal(typeof info.delayMs, 'number', what);
  assert.ok(info.delayMs >= 0 && info.delayMs <= MAX_SUGGESTED_MS, `delay outside 0..${MAX_SUGGESTED_MS}: ${what}`);
  const reason = JSON.parse(info.reason);
  assert.ok(Number.isInteger(reason.reconnect_ms), what);
  // Below maxDelayMs: the client waits exactly what was suggested.
  assert.equal(info.delayMs, reason.reconnect_ms, what);
}

/** The first /healthz answer of `base` (http://…) that is not 200 (polled every 10 ms, 2 s at most): {status, body}. */
async function firstUnhealthy(base, ms = 2_000) {
  const start = Date.now();
  for (;;) {
    const r = await fetch(`${base}/healthz`);
    const body = await r.text();
    if (r.status !== 200) return { status: r.status, body };
    if (Date.now() - start > ms) throw new Error(`/healthz still answered 200 after ${ms} ms`);
    await new Promise((res) => setTimeout(res, 10));
  }
}

/** A WebSocket handshake on `port`'s /ws: {status, retryAfter} (101 when accepted). */
function wsHandshake(port) {
  return new Promise((resolve, reject) => {
    const req = http.request({
      host: '127.0.0.1',
      port,
      path: '/ws',
      agent: false,
      headers: {
        connection: 'Upgrade',
        upgrade: 'websocket',
        'sec-websocket-version': '13',
        'sec-websocket-key': randomBytes(16).toString('base64'),
      },
    });
    req.on('upgrade', (_res, socket) => {
      socket.destroy();
      resolve({ status: 101, retryAfter: undefined });
    });
    req.on('response', (res) => {
      res.resume();
      resolve({ status: res.statusCode, retryAfter: res.headers['retry-after'] });
    });
    req.on('error', reject);
    req.setTimeout(5_000, () => req.destroy(new Error('no answer to the handshake within 5 s')));
    req.end();
  });
}

test('a draining node closes with 1012 and a suggested delay, which the client waits instead of its backoff', async () => {
  const own = await startGale(upstream.url, 0, DRAIN);
  let stopping;
  const clients = [];
  try {
    const ws = new GaleClient(own.url, { minDelayMs: 100, maxDelayMs: 1_000 });
    const sse = new GaleClient(own.url, { transports: ['sse'], minDelayMs: 100, maxDelayMs: 1_000 });
    clients.push(ws, sse);
    const states = clients.map(watch);
    await ws.connect();
    await sse.connect();
    assert.equal(sse.transport, 'sse');
    const got = [];
    ws.on('headline', (data) => got.push(data));
    await ws.subscribeTopic('news:drain');
    for (const n of [1, 2, 3]) await publish(own.http, 'news:drain', 'headline', n);
    await until(() => got.length === 3, 5_000);

    stopping = own.stop(); // SIGTERM: the drain begins; awaited at the end
    const health = await firstUnhealthy(own.http);
    assert.equal(health.status, 503, JSON.stringify(health));
    assert.ok(health.body.startsWith('draining'), `healthz body: ${JSON.stringify(health.body)}`);
    // New handshakes are refused meanwhile, with when to come back.
    const hs = await wsHandshake(own.port);
    assert.equal(hs.status, 503, JSON.stringify(hs));
    assert.match(String(hs.retryAfter), /^\d+$/, 'Retry-After in seconds');
    const refused = await fetch(`${own.http}/sse`, { headers: { accept: 'text/event-stream' } });
    await refused.body?.cancel();
    assert.equal(refused.status, 503);
    assert.match(String(refused.headers.get('retry-after')), /^\d+$/);

    // Both are closed within the drain (2 s), over WebSocket and over SSE.
    await until(() => states.every((s) => drainedAt(s) >= 0), 8_000);
    for (const s of states) assertSuggested(s[drainedAt(s)]);
    // Two connections spread evenly over 2 s: about a second apart, not
    // both at once.
    const [t0, t1] = states.map((s) => s[drainedAt(s)].at);
    assert.ok(Math.abs(t1 - t0) >= 500, `closed ${Math.abs(t1 - t0)} ms apart: not spread over the drain`);
    assert.equal(ws.positions.get('news:drain')?.offset, 3, 'the position to resubscribe from is kept');

    // The suggested wait over, the client tries again (the draining node
    // refuses it): a reconnect, reported as one, then the backoff from
    // its first step (minDelayMs 100: 50..100 ms).
    for (const s of states) {
      const after = () => s.slice(drainedAt(s) + 1);
      await until(() => after().some((x) => x.state === State.RECONNECTING && x.delayMs > 0), 5_000);
      assert.ok(!after().some((x) => x.state === State.CONNECTING), JSON.stringify(after()));
      const backoff = after().find((x) => x.state === State.RECONNECTING && x.delayMs > 0);
      assert.notEqual(backoff.suggested, true, JSON.stringify(backoff));
      assert.ok(backoff.delayMs <= 100, `first backoff after the drain: ${JSON.stringify(backoff)}`);
    }
  } finally {
    for (const c of clients) c.close();
    await (stopping ?? own.stop());
  }
});

test('drained onto another node: what was published meanwhile is recovered there, in order and once', async () => {
  let redis;
  let a;
  let b;
  let fwd;
  let c;
  let stopping;
  try {
    redis = await startRedis();
    // Two nodes sharing history in Redis; only A drains.
    a = await startGale(upstream.url, 0, { GALE_CLUSTER__REDIS_URL: redis.url, ...DRAIN });
    b = await startGale(upstream.url, 0, { GALE_CLUSTER__REDIS_URL: redis.url });
    // The load balancer: the first healthy node, A while it is up.
    fwd = await startForwarder([a.port, b.port]);
    c = new GaleClient(fwd.url, { minDelayMs: 100, maxDelayMs: 1_000 });
    const states = watch(c);
    const got = [];
    c.on('headline', (data, _event, meta) => got.push({ data, offset: meta?.offset, epoch: meta?.epoch }));
    const recovered = [];
    c.on('gale.recovered', (r) => recovered.push(r));
    const lost = [];
    c.on('gale.recovery_failed', (f) => lost.push(f));
    await c.connect();
    assert.equal(c.transport, 'websocket');
    assert.deepEqual(fwd.routes, [a.port], 'the client is on node A');
    await c.subscribeTopic('news:drain2');
    for (const n of [1, 2, 3]) await publish(a.http, 'news:drain2', 'headline', n);
    await until(() => got.length === 3, 5_000);

    // The client's way back waits at the load balancer until what it
    // misses has been published, so that surely comes from the history.
    fwd.hold();
    stopping = a.stop(); // SIGTERM: A drains
    await until(() => drainedAt(states) >= 0, 8_000);
    assertSuggested(states[drainedAt(states)]);
    for (const n of [4, 5, 6]) await publish(b.http, 'news:drain2', 'headline', n);
    assert.equal(got.length, 3, 'nothing reached the client while it was away');
    fwd.release();

    await until(() => got.length === 6 && c.state === State.OPEN, 10_000);
    assert.equal(fwd.routes.at(-1), b.port, 'it came back on node B');
    assert.ok(fwd.routes.slice(1).every((p) => p === b.port), `never back to the draining A: ${fwd.routes}`);
    assert.deepEqual(recovered, [{ topic: 'news:drain2', count: 3 }], 'the three missed came from the history');
    assert.deepEqual(lost, []);

    // Live again, on B.
    await publish(b.http, 'news:drain2', 'headline', 7);
    await until(() => got.length === 7, 5_000);
    await new Promise((r) => setTimeout(r, 200)); // a duplicate would have come by now
    assert.deepEqual(got.map((g) => g.data), [1, 2, 3, 4, 5, 6, 7], 'every publication once, in order');
    const offsets = got.map((g) => g.offset);
    assert.ok(offsets.every((o, i) => o === offsets[0] + i), `contiguous offsets: ${offsets}`);
    assert.equal(offsets[0], 1, 'a new topic in a new Redis starts at 1');
    assert.equal(new Set(got.map((g) => g.epoch)).size, 1, 'one epoch, shared by both nodes');
    assert.equal(typeof got[0].epoch, 'string');
    assert.deepEqual(c.positions.get('news:drain2'), { offset: offsets[6], epoch: got[0].epoch });
  } finally {
    c?.close();
    await fwd?.stop();
    await (stopping ?? a?.stop());
    await b?.stop();
    await redis?.stop();
  }
});
