// The client against a real `gale serve` (and the fake weather API).
// Run: npm test  (node --experimental-websocket --test; Node 22+ needs no flag)
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { GaleClient, GaleError, State } from '../src/index.js';
import { createHmac } from 'node:crypto';
import { startGale, startUpstream, publish, until } from './server.js';
import { startNoUpgradeProxy } from './proxy.js';

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


test('request resolves with the reading and the greeting gives a client id', async () => {
  const c = new GaleClient(gale.url);
  await c.connect();
  const r = await c.weather('Paris');
  assert.equal(r.city, 'Paris');
  assert.equal(typeof r.temperature, 'number');
  assert.equal(typeof r.description, 'string');
  await until(() => c.clientId !== null);
  c.close();
});

test('an error reply rejects with the server code, and invalid data names the field', async () => {
  const c = new GaleClient(gale.url);
  await c.connect();
  await assert.rejects(c.weather('Atlantis'), (e) => e instanceof GaleError && e.code === 'not_found');
  await assert.rejects(c.request('weather.get', {}), (e) => e.code === 'invalid_data' && e.field === 'data');
  await assert.rejects(c.request('no.such.event'), (e) => e.code === 'unknown_event');
  c.close();
});

test('many requests in flight settle with their own replies', async () => {
  const c = new GaleClient(gale.url);
  await c.connect();
  const cities = Array.from({ length: 20 }, (_, i) => `Town${i}`);
  const readings = await Promise.all(cities.map((city) => c.weather(city)));
  assert.deepEqual(readings.map((r) => r.city), cities);
  c.close();
});

test('a request times out with code "timeout" and its late reply is ignored', async () => {
  const slow = await startUpstream(['--latency-ms', '800']);
  const own = await startGale(slow.url);
  const c = new GaleClient(own.url);
  await c.connect();
  await assert.rejects(c.weather('Slowtown', { timeoutMs: 200 }), (e) => e.code === 'timeout');
  assert.equal(c.pending.size, 0);
  // The reply arrives later and is dropped; the connection stays usable.
  await new Promise((r) => setTimeout(r, 900));
  assert.equal((await c.weather('Slowtown')).city, 'Slowtown');
  c.close();
  await own.stop();
  slow.stop();
});

test('pushes reach on() handlers; topic and weather subscriptions', async () => {
  const c = new GaleClient(gale.url);
  await c.connect();
  const got = [];
  c.on('news', (data) => got.push(data));
  const r = await c.subscribeTopic('js-news');
  assert.equal(r.subscribed, true);
  await publish(gale.http, 'js-news', 'news', { n: 1 });
  await until(() => got.length === 1);
  assert.deepEqual(got[0], { n: 1 });
  const reading = await c.subscribe('Oslo');
  assert.equal(reading.city, 'Oslo');
  assert.ok(c.cities.has('Oslo'));
  await c.unsubscribe('Oslo');
  assert.ok(!c.cities.has('Oslo'));
  c.close();
});

test('requests wait in a bounded queue while disconnected', async () => {
  const c = new GaleClient('ws://127.0.0.1:9/ws', { maxQueue: 2, minDelayMs: 10_000 });
  c.connect().catch(() => {});
  const a = c.weather('A', { timeoutMs: 200 });
  const b = c.weather('B', { timeoutMs: 200 });
  await assert.rejects(c.weather('C'), (e) => e.code === 'queue_full');
  assert.equal(c.queue.length, 2);
  await assert.rejects(a, (e) => e.code === 'timeout');
  await assert.rejects(b, (e) => e.code === 'timeout');
  assert.equal(c.queue.length, 0, 'timed-out requests leave the queue');
  c.close();
});

test('backoff grows exponentially, is capped, and jitters', () => {
  const c = new GaleClient('ws://127.0.0.1:9/ws', { minDelayMs: 100, maxDelayMs: 1_000 });
  for (let n = 0; n < 10; n++) {
    const cap = Math.min(1_000, 100 * 2 ** n);
    for (let i = 0; i < 20; i++) {
      const d = c.backoff(n);
      assert.ok(d >= cap / 2 && d <= cap, `attempt ${n}: ${d} outside [${cap / 2}, ${cap}]`);
    }
  }
  const spread = new Set(Array.from({ length: 20 }, () => c.backoff(5)));
  assert.ok(spread.size > 1, 'jitter');
});

/** Resolves once the fake upstream's /stats satisfies `predicate`. */
async function upstreamStats(url, predicate, ms = 10_000) {
  const start = Date.now();
  for (;;) {
    const stats = await (await fetch(`${url}/stats`)).json();
    if (predicate(stats)) return stats;
    if (Date.now() - start > ms) throw new Error(`upstream never got there: ${JSON.stringify(stats)}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

test('reconnects after the server restarts, renews subscriptions, sends what waited', async () => {
  // A slow upstream, so a lookup is surely in flight when the server stops.
  const slow = await startUpstream(['--latency-ms', '500']);
  const own = await startGale(slow.url);
  const c = new GaleClient(own.url, { minDelayMs: 100, maxDelayMs: 400 });
  const states = [];
  c.onState((s, info) => states.push([s, info]));
  await c.connect();
  const got = [];
  c.on('news', (d) => got.push(d));
  await c.subscribeTopic('js-restart');

  const inFlight = c.weather('Lisbon', { timeoutMs: 20_000 });
  // The server has the request: its lookup is waiting on the upstream.
  await upstreamStats(slow.url, (s) => s.in_flight >= 1);
  await own.stop();
  await until(() => c.state === State.RECONNECTING);
  const reconnecting = states.find(([s, i]) => s === State.RECONNECTING && i?.delayMs > 0);
  assert.ok(reconnecting, JSON.stringify(states));
  assert.equal(reconnecting[1].code, 1001, 'the server said it was going away');
  // In flight when the server began to shut down: answered before 1001.
  assert.equal((await inFlight).city, 'Lisbon');
  const waited = c.weather('Madrid', { timeoutMs: 20_000 });

  const again = await startGale(slow.url, own.port);
  await until(() => c.state === State.OPEN);
  assert.equal((await waited).city, 'Madrid', 'queued while down, sent on reconnect');
  // The topic subscription was renewed on the new connection.
  let delivered = false;
  for (let i = 0; i < 50 && !delivered; i++) {
    await publish(again.http, 'js-restart', 'news', { after: 'restart' });
    await new Promise((r) => setTimeout(r, 100));
    delivered = got.some((d) => d.after === 'restart');
  }
  assert.ok(delivered, 'push after restart');
  c.close();
  await until(() => c.state === State.CLOSED);
  await again.stop();
  slow.stop();
});

test('close() ends for good: no reconnect, later requests fail with "closed"', async () => {
  const c = new GaleClient(gale.url);
  await c.connect();
  c.close();
  await until(() => c.state === State.CLOSED);
  await assert.rejects(c.weather('Paris'), (e) => e.code === 'closed');
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(c.state, State.CLOSED);
});

/** An HS256 JWT for `sub`, valid for ten minutes. */
function jwt(secret, sub) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub, exp: Math.floor(Date.now() / 1000) + 600 })}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}

test('a token signs the connection in; without one, signed-in events are refused', async () => {
  const secret = 'js-test-secret-0123456789';
  const own = await startGale(upstream.url, 0, { GALE_AUTH__JWT_SECRET: secret });
  const anonymous = new GaleClient(own.url);
  await anonymous.connect();
  await assert.rejects(anonymous.request('notes.list'), (e) => e.code === 'unauthorized');
  anonymous.close();

  const alice = new GaleClient(own.url, { token: jwt(secret, 'alice') });
  await alice.connect();
  const saved = await alice.request('notes.save', { title: 'from js', content: 'hello' });
  assert.equal(saved.owner, 'alice');
  const { notes } = await alice.request('notes.list');
  assert.ok(notes.some((n) => n.title === 'from js'));
  alice.close();
  await own.stop();
});

/** Resolves with `count` pushes of `event` (data, in order). */
function collect(c, event) {
  const got = [];
  c.on(event, (data) => got.push(data));
  return got;
}

test('a dropped connection recovers, in order and once, what was published meanwhile', async () => {
  const c = new GaleClient(gale.url, { minDelayMs: 400, maxDelayMs: 400 });
  await c.connect();
  const got = collect(c, 'headline');
  const recovered = [];
  c.on('gale.recovered', (r) => recovered.push(r));
  const first = await c.subscribeTopic('news:js');
  assert.equal(first.offset, 0);
  assert.equal(typeof first.epoch, 'string');
  await publish(gale.http, 'news:js', 'headline', 1);
  await until(() => got.length === 1);
  assert.deepEqual(c.positions.get('news:js'), { offset: 1, epoch: first.epoch });

  // The network drops; three are published before the client is back.
  c.ws.close();
  for (const n of [2, 3, 4]) await publish(gale.http, 'news:js', 'headline', n);
  await until(() => got.length === 4);
  assert.deepEqual(got, [1, 2, 3, 4]);
  assert.deepEqual(recovered, [{ topic: 'news:js', count: 3 }]);
  await publish(gale.http, 'news:js', 'headline', 5);
  await until(() => got.length === 5);
  assert.deepEqual(got, [1, 2, 3, 4, 5]);
  c.close();
});

test('weather subscriptions recover too, and a lost history is reported', async () => {
  const c = new GaleClient(gale.url, { minDelayMs: 200, maxDelayMs: 200 });
  await c.connect();
  const reading = await c.subscribe('Lisbon');
  assert.equal(reading.topic, 'weather:lisbon');
  assert.ok(c.positions.has('weather:lisbon'));

  const failed = [];
  c.on('gale.recovery_failed', (f) => failed.push(f));
  // A position the server never gave (an epoch from before a restart).
  c.positions.set('news:gone', { offset: 5, epoch: 'lost' });
  c.topics.add('news:gone');
  c.ws.close();
  await until(() => failed.length === 1);
  assert.equal(failed[0].topic, 'news:gone');
  assert.equal(failed[0].to.offset, 0);
  assert.notEqual(c.positions.get('news:gone').epoch, 'lost');
  c.close();
});

test('falls back to SSE when a proxy refuses the WebSocket upgrade, and works the same', async () => {
  const proxy = await startNoUpgradeProxy(gale.port);
  const c = new GaleClient(`ws://127.0.0.1:${proxy.port}/ws`, { minDelayMs: 300, maxDelayMs: 300 });
  const seen = [];
  c.onState((state, info) => seen.push([state, info?.transport ?? null]));
  await c.connect();
  assert.equal(c.transport, 'sse');
  assert.deepEqual(seen.at(-1), ['open', 'sse']);
  assert.ok(seen.some(([s, t]) => s === 'connecting' && t === 'websocket'), JSON.stringify(seen));
  await until(() => c.clientId !== null);

  const r = await c.weather('Paris');
  assert.equal(r.city, 'Paris');
  await assert.rejects(c.weather('Atlantis'), (e) => e.code === 'not_found');
  const readings = await Promise.all(['A1', 'A2', 'A3', 'A4', 'A5'].map((city) => c.weather(city)));
  assert.deepEqual(readings.map((x) => x.city), ['A1', 'A2', 'A3', 'A4', 'A5']);

  // Push and recovery over SSE.
  const got = collect(c, 'headline');
  await c.subscribeTopic('news:sse');
  await publish(gale.http, 'news:sse', 'headline', 'a');
  await until(() => got.length === 1);
  c.ws.close(); // the stream drops; the client reconnects over SSE again
  await publish(gale.http, 'news:sse', 'headline', 'b');
  await until(() => got.length === 2);
  assert.deepEqual(got, ['a', 'b']);
  assert.equal(c.transport, 'sse');
  c.close();
  await proxy.stop();
});

test('transports: ["sse"] skips the WebSocket', async () => {
  const c = new GaleClient(gale.url, { transports: ['sse'] });
  await c.connect();
  assert.equal(c.transport, 'sse');
  assert.equal((await c.weather('Rome')).city, 'Rome');
  c.close();
});

test('a push that skips offsets makes the client fill the gap from the history', async () => {
  const c = new GaleClient(gale.url);
  await c.connect();
  const got = collect(c, 'headline');
  const gaps = [];
  c.on('gale.gap', (g) => gaps.push(g));
  await c.subscribeTopic('news:gap');
  for (const n of [1, 2, 3]) await publish(gale.http, 'news:gap', 'headline', n);
  await until(() => got.length === 3);
  // Two pushes lost on the way (as when the server drops them for a slow
  // reader): the client's position is two behind what was published.
  const at = c.positions.get('news:gap');
  c.positions.set('news:gap', { offset: at.offset - 2, epoch: at.epoch });
  got.length = 0;
  await publish(gale.http, 'news:gap', 'headline', 4);
  await until(() => got.length === 3);
  assert.deepEqual(got, [2, 3, 4], 'the missing two first, then the push that showed the gap');
  assert.deepEqual(gaps, [{ topic: 'news:gap', from: at.offset - 2, to: at.offset + 1 }]);
  await publish(gale.http, 'news:gap', 'headline', 5);
  await until(() => got.length === 4);
  assert.deepEqual(got, [2, 3, 4, 5]);
  c.close();
});
