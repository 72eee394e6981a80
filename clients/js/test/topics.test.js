// Channels against a real `gale serve`: publishing, permissions,
// subscription tokens, presence, join/leave, and events answered by the
// application's backend (a small node:http server standing in for the
// team's backend: what gale calls over HTTP, not gale itself).
// Run: npm test
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { GaleClient, GaleError, State } from '../src/index.js';
import { startGale, startUpstream, publish, signJwt, until as eventually } from './server.js';

const SECRET = 'js-topics-secret-0123456789';
const ENV = { GALE_AUTH__JWT_SECRET: SECRET };

/**
 * Every topic open to subscribers (as the other tests have it); rooms
 * take publications from their subscribers and show who is there;
 * logs keep history and announce joins; secrets need a subscription
 * token; orders.* go to the backend.
 */
function config(backendPort) {
  return `
[topics."*"]
subscribe = "anyone"

[topics."room:*"]
publish = "subscribers"
join_leave = true
presence = true

[topics."log:*"]
publish = "subscribers"
join_leave = true
history_size = 100
history_ttl_s = 300

[topics."secret:*"]
subscribe = "token"
publish = "subscribers"

[topics."slow:*"]
subscribe = "proxy"
publish = "subscribers"

[proxy]
rpc_url = "http://127.0.0.1:${backendPort}/rpc"
subscribe_url = "http://127.0.0.1:${backendPort}/subscribe"
rpc_events = ["orders.*"]
`;
}

/** An HS256 JWT with `claims`, valid for ten minutes. */
const sign = (claims) => signJwt(SECRET, claims);

/**
 * The application's backend: answers `orders.*` as gale forwards them
 * (POST /rpc, JSON {client, user, roles, event, data}) and keeps what it
 * was sent.
 */
async function startBackend() {
  const calls = [];
  const server = http.createServer((req, res) => {
    let body = '';
    req.on('data', (c) => (body += c));
    req.on('end', () => {
      const call = JSON.parse(body);
      calls.push({ path: req.url, ...call });
      if (req.url === '/subscribe') {
        // Admits everyone to slow:*, slowly.
        setTimeout(() => {
          res.writeHead(200, { 'content-type': 'application/json' });
          res.end('{"result":{}}');
        }, 300);
        return;
      }
      const answer = {
        'orders.create': { result: { order: `o-${calls.length}`, user: call.user, item: call.data?.item } },
        'orders.sold_out': { error: { code: 'out_of_stock', message: 'no more tea' } },
        'orders.conflict': { error: { code: 409, message: 'already ordered' } },
        'orders.missing': { error: { code: 'not_found', message: 'no such order' } },
      }[call.event];
      if (!answer) {
        res.writeHead(500);
        res.end('no such order event');
        return;
      }
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(answer));
    });
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return {
    calls,
    port: /** @type {import('node:net').AddressInfo} */ (server.address()).port,
    stop: () => new Promise((r) => {
      server.closeAllConnections();
      server.close(r);
    }),
  };
}

let upstream;
let backend;
let gale;

before(async () => {
  upstream = await startUpstream();
  backend = await startBackend();
  gale = await startGale(upstream.url, 0, ENV, config(backend.port));
});

/** Clients of the running test: closed after it, passed or failed (a
 * client left open reconnects forever and keeps the run alive). */
const clients = [];

afterEach(() => {
  for (const c of clients.splice(0)) c.close();
});

after(async () => {
  await gale?.stop();
  await backend?.stop();
  upstream?.stop();
});

/** Waits for `predicate`, 5 s at most. */
const until = (predicate, ms = 5_000) => eventually(predicate, ms);

/** A connected client: signed in as `user`, or anonymous. */
async function client(user, url = gale.url, options = {}) {
  const c = new GaleClient(url, { token: user ? sign({ sub: user }) : undefined, ...options });
  clients.push(c);
  await c.connect();
  await until(() => c.clientId !== null);
  return c;
}

/** Pushes of `event` as handlers get them: {data, meta}. */
function collect(c, event) {
  const got = [];
  c.on(event, (data, _event, meta) => got.push({ data, meta }));
  return got;
}

test('publish: accepted, and delivered to the other subscribers as topic.message with the user', async () => {
  const alice = await client('alice');
  const bob = await client();
  await alice.subscribeTopic('room:chat');
  await bob.subscribeTopic('room:chat');
  const toBob = collect(bob, 'topic.message');
  const toAlice = collect(alice, 'topic.message');

  const reply = await alice.publish('room:chat', { text: 'hi' });
  assert.deepEqual(reply, { topic: 'room:chat', accepted: true });
  await until(() => toBob.length === 1 && toAlice.length === 1);
  assert.deepEqual(toBob[0], { data: { text: 'hi' }, meta: { topic: 'room:chat', user: 'alice' } });

  // An anonymous publisher is named by no user.
  await bob.publish('room:chat', 'hello');
  await until(() => toAlice.length === 2);
  assert.deepEqual(toAlice[1], { data: 'hello', meta: { topic: 'room:chat' } });
  alice.close();
  bob.close();
});

test('publish refused where the topic does not allow it: permission_denied, and nothing delivered', async () => {
  const alice = await client('alice');
  const bob = await client('bob');
  // Rooms take publications from their subscribers only.
  await assert.rejects(
    bob.publish('room:closed-door', 'knock'),
    (e) => e instanceof GaleError && e.code === 'permission_denied' && e.appCode === undefined,
  );
  // Topics open only to subscribers ([topics."*"]) take none from clients.
  await alice.subscribeTopic('plain:x');
  await bob.subscribeTopic('plain:x');
  const got = collect(alice, '*');
  await assert.rejects(bob.publish('plain:x', 'spam'), (e) => e.code === 'permission_denied');
  await publish(gale.http, 'plain:x', 'marker', 1);
  await until(() => got.length === 1);
  assert.deepEqual(got.map((g) => g.data), [1], 'the refused publication reached no one');
  alice.close();
  bob.close();
});

test('presence: who is subscribed, with users; only for subscribers of topics that show it', async () => {
  const alice = await client('alice');
  const bob = await client();
  await alice.subscribeTopic('room:presence');
  await bob.subscribeTopic('room:presence');
  const p = await alice.presence('room:presence');
  assert.equal(p.topic, 'room:presence');
  assert.equal(p.count, 2);
  assert.equal(p.users, 1, 'one signed-in user; bob is anonymous');
  const byClient = Object.fromEntries(p.clients.map((c) => [c.client, c.user]));
  assert.deepEqual(byClient, { [alice.clientId]: 'alice', [bob.clientId]: null });

  await assert.rejects(bob.presence('room:elsewhere'), (e) => e.code === 'permission_denied');
  await bob.subscribeTopic('plain:presence');
  await assert.rejects(bob.presence('plain:presence'), (e) => e.code === 'permission_denied');
  alice.close();
  bob.close();
});

test('onJoin/onLeave fire for their topic with the client and user', async () => {
  const watcher = await client();
  const joins = [];
  const leaves = [];
  const other = [];
  watcher.onJoin('room:door', (who) => joins.push(who));
  watcher.onLeave('room:door', (who) => leaves.push(who));
  watcher.onJoin('room:another', (who) => other.push(who));
  await watcher.subscribeTopic('room:door');
  await until(() => joins.length === 1);
  assert.equal(joins[0].client, watcher.clientId, 'your own join too');

  const alice = await client('alice');
  await alice.subscribeTopic('room:door');
  await until(() => joins.length === 2);
  assert.deepEqual(joins[1], { topic: 'room:door', client: alice.clientId, user: 'alice', info: null });
  await alice.unsubscribeTopic('room:door');
  await until(() => leaves.length === 1);
  assert.deepEqual(leaves[0], { topic: 'room:door', client: alice.clientId, user: 'alice', info: null });

  const bob = await client();
  await bob.subscribeTopic('room:door');
  await until(() => joins.length === 3);
  const bobId = bob.clientId;
  bob.close(); // a disconnect is a leave too
  await until(() => leaves.length === 2);
  assert.deepEqual(leaves[1], { topic: 'room:door', client: bobId, user: null, info: null });
  assert.equal(other.length, 0, 'a handler for another topic');
  alice.close();
  watcher.close();
});

test('joins and leaves on a topic with history leave its position and gap-filling alone', async () => {
  const watcher = await client();
  const got = collect(watcher, 'topic.message');
  const gaps = [];
  watcher.on('gale.gap', (g) => gaps.push(g));
  const events = [];
  watcher.on('*', (_d, event) => events.push(event));
  const first = await watcher.subscribeTopic('log:j');
  await publish(gale.http, 'log:j', 'topic.message', 'one');
  await until(() => got.length === 1);
  assert.deepEqual(watcher.positions.get('log:j'), { offset: 1, epoch: first.epoch });

  const alice = await client('alice');
  await alice.subscribeTopic('log:j');
  await alice.unsubscribeTopic('log:j');
  await until(() => events.filter((e) => e === 'topic.leave').length === 1);
  assert.deepEqual(watcher.positions.get('log:j'), { offset: 1, epoch: first.epoch }, 'no position moved');

  await alice.subscribeTopic('log:j');
  await alice.publish('log:j', 'two');
  await until(() => got.length === 2);
  assert.deepEqual(got[1], { data: 'two', meta: { topic: 'log:j', offset: 2, epoch: first.epoch, user: 'alice' } });
  assert.deepEqual(gaps, [], 'no gap was seen');
  assert.deepEqual(watcher.positions.get('log:j'), { offset: 2, epoch: first.epoch });
  assert.deepEqual(got.map((g) => g.data), ['one', 'two'], 'each once');
  alice.close();
  watcher.close();
});

test('subscription tokens: refused without one or for another topic; a string token works', async () => {
  const alice = await client('alice');
  await assert.rejects(alice.subscribeTopic('secret:s'), (e) => e.code === 'permission_denied');
  await assert.rejects(
    alice.subscribeTopic('secret:s', { token: sign({ sub: 'alice', topic: 'secret:other' }) }),
    (e) => e.code === 'permission_denied' && /secret:other/.test(e.message),
  );
  await assert.rejects(
    alice.subscribeTopic('secret:s', { token: sign({ sub: 'bob', topic: 'secret:s' }) }),
    (e) => e.code === 'permission_denied',
  );
  assert.ok(!alice.topics.has('secret:s'));
  const r = await alice.subscribeTopic('secret:s', { token: sign({ sub: 'alice', topic: 'secret:s' }) });
  assert.equal(r.subscribed, true);
  // A token function that fails fails the subscribe, on the client's side.
  await assert.rejects(
    alice.subscribeTopic('secret:t', { token: () => { throw new Error('no session'); } }),
    (e) => e.code === 'token_error' && /no session/.test(e.message),
  );
  await assert.rejects(
    alice.subscribeTopic('secret:t', { token: async () => undefined }),
    (e) => e.code === 'token_error',
  );
  await assert.rejects(
    alice.subscribeTopic('secret:t', { token: () => new Promise(() => {}), timeoutMs: 200 }),
    (e) => e.code === 'token_error' && /200 ms/.test(e.message),
  );
  assert.ok(!alice.topics.has('secret:t'));
  alice.close();
});

test('a token function is asked again after the server restarts, before anything queued is sent', async () => {
  let own = await startGale(upstream.url, 0, ENV, config(backend.port));
  let alice;
  try {
    alice = await client('alice', own.url, { minDelayMs: 100, maxDelayMs: 300 });
    const asked = [];
    // Asynchronous, and slow enough that a resubscribe waiting for it
    // would be overtaken by the queued publish, were it not held back.
    const token = async (topic) => {
      asked.push(topic);
      await new Promise((r) => setTimeout(r, 100));
      return sign({ sub: 'alice', topic });
    };
    const got = collect(alice, 'topic.message');
    await alice.subscribeTopic('secret:restart', { token });
    assert.deepEqual(asked, ['secret:restart']);
    await publish(own.http, 'secret:restart', 'topic.message', 'before');
    await until(() => got.length === 1);

    const port = own.port;
    await own.stop();
    own = null;
    await until(() => alice.state === State.RECONNECTING);
    // Queued while down; secret:* takes publications from subscribers
    // only, so it is accepted only if the resubscribe went first.
    // (Its refusal is an outcome to check, not an unhandled rejection.)
    const queued = alice.publish('secret:restart', 'queued', { timeoutMs: 10_000 }).catch((e) => e);
    own = await startGale(upstream.url, port, ENV, config(backend.port));
    assert.deepEqual(await queued, { topic: 'secret:restart', accepted: true });
    assert.deepEqual(asked, ['secret:restart', 'secret:restart'], 'asked again for the new connection');
    await until(() => got.length === 2);
    await publish(own.http, 'secret:restart', 'topic.message', 'after');
    await until(() => got.length === 3);
    assert.deepEqual(got.map((g) => g.data), ['before', 'queued', 'after']);
    assert.deepEqual(got[1].meta, { topic: 'secret:restart', user: 'alice' });
  } finally {
    alice?.close();
    await own?.stop();
  }
});

test('after a reconnect, what was queued waits until the subscriptions are renewed', async () => {
  let own = await startGale(upstream.url, 0, ENV, config(backend.port));
  let alice;
  try {
    alice = await client('alice', own.url, { minDelayMs: 100, maxDelayMs: 300 });
    const got = collect(alice, 'topic.message');
    await alice.subscribeTopic('slow:renewed');
    const port = own.port;
    await own.stop();
    own = null;
    await until(() => alice.state === State.RECONNECTING);
    // The server runs a connection's events concurrently and the backend
    // takes 300 ms to admit the renewed subscription: a publish sent right
    // behind the resubscribe would be handled first, and refused.
    const queued = alice.publish('slow:renewed', 'queued', { timeoutMs: 10_000 }).catch((e) => e);
    own = await startGale(upstream.url, port, ENV, config(backend.port));
    assert.deepEqual(await queued, { topic: 'slow:renewed', accepted: true });
    await until(() => got.length === 1);
    assert.equal(got[0].data, 'queued');
  } finally {
    alice?.close();
    await own?.stop();
  }
});

test('a token function that fails on reconnect is reported, and the other subscriptions are renewed', async () => {
  const c = await client('alice', gale.url, { minDelayMs: 100, maxDelayMs: 100 });
  let fail = false;
  await c.subscribeTopic('secret:flaky', {
    token: async (topic) => {
      if (fail) throw new Error('session expired');
      return sign({ sub: 'alice', topic });
    },
  });
  await c.subscribeTopic('room:steady');
  const failed = [];
  c.on('gale.resubscribe_failed', (f) => failed.push(f));
  const got = collect(c, 'news');
  fail = true;
  c.ws.close();
  await until(() => failed.length === 1);
  assert.equal(failed[0].code, 'token_error');
  assert.deepEqual(failed[0].data, { topic: 'secret:flaky' }, 'the token is not in the event');
  assert.match(failed[0].message, /session expired/);
  await until(() => c.state === State.OPEN);
  // Open is not yet renewed: a request made now is held until every
  // renewal is answered, so once it is, room:steady is subscribed again
  // (a publish sent before could reach the server first).
  await c.subscribeTopic('room:sync');
  await publish(gale.http, 'room:steady', 'news', 'still here');
  await until(() => got.length === 1);
  c.close();
});

test('rpc: the backend answers forwarded events; its refusals reach the client with its code', async () => {
  const alice = await client('alice');
  const order = await alice.rpc('orders.create', { item: 'tea' });
  assert.equal(order.user, 'alice');
  assert.equal(order.item, 'tea');
  assert.match(order.order, /^o-\d+$/);
  const call = backend.calls.at(-1);
  assert.equal(call.path, '/rpc');
  assert.equal(call.event, 'orders.create');
  assert.equal(call.user, 'alice');
  assert.equal(call.client, alice.clientId);
  assert.deepEqual(call.data, { item: 'tea' });

  await assert.rejects(alice.rpc('orders.sold_out', {}), (e) => {
    assert.ok(e instanceof GaleError);
    assert.equal(e.code, 'out_of_stock');
    assert.equal(e.appCode, 'out_of_stock');
    assert.equal(e.message, 'no more tea');
    return true;
  });
  await assert.rejects(alice.rpc('orders.conflict'), (e) => e.code === '409' && e.appCode === 409);
  // A backend code that is also one of gale's is still the backend's.
  await assert.rejects(alice.rpc('orders.missing'), (e) => e.code === 'not_found' && e.appCode === 'not_found');
  // gale's own refusals on the way are not the backend's.
  await assert.rejects(alice.rpc('orders.unknown'), (e) => e.code === 'upstream_unavailable' && e.appCode === undefined);
  await assert.rejects(alice.rpc('billing.pay'), (e) => e.code === 'unknown_event' && e.appCode === undefined);
  alice.close();
});
