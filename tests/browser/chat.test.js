// The chat example (examples/chat) end to end: its Python backend, a real
// `gale serve` with the example's gale.toml (ports and secret rewritten in
// a temporary copy), and two people, alice and bob, in Debian's headless
// Chromium. Saves screenshots under target/browser/. Run: npm test (after
// `cargo build`; needs python3).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { requireGale, startGale } from '../../clients/js/test/server.js';

const here = dirname(fileURLToPath(import.meta.url));
const example = resolve(here, '../../examples/chat');
const shots = resolve(here, '../../target/browser');
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const PYTHON = process.env.PYTHON ?? 'python3';
const SECRET = randomBytes(18).toString('hex');
// The example never asks for the weather; gale wants a URL all the same.
const NO_WEATHER = 'http://127.0.0.1:9';

let backend;
let gale;
let browser;
const people = {};
const problems = [];
/** What this file started, killed even if the runner itself dies. */
const children = new Set();
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL');
});

/** A free port on 127.0.0.1 (for the backend, which gale's config names before it starts). */
function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.on('error', fail);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

/** examples/chat/backend.py on `port`, telling pages gale is on `galePort`. */
function startBackend(port, galePort) {
  const child = spawn(PYTHON, [`${example}/backend.py`, '--port', String(port), '--gale-port', String(galePort)], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, CHAT_GALE_SECRET: SECRET, PYTHONUNBUFFERED: '1' },
  });
  children.add(child);
  const exited = new Promise((r) => {
    child.on('exit', r);
    child.on('error', r);
  }).then(() => children.delete(child));
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    await exited;
  };
  let log = '';
  return new Promise((ok, fail) => {
    let settled = false;
    const settle = (why) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (why === undefined) ok({ url: `http://127.0.0.1:${port}`, log: () => log, stop });
      else stop().then(() => fail(new Error(`${why}:\n${log}`)));
    };
    const timer = setTimeout(() => settle('the chat backend did not start within 10 s'), 10_000);
    child.on('error', (e) => settle(`${PYTHON} could not be started (${e.message})`));
    child.on('exit', (code) => settle(`the chat backend exited (${code}) before starting`));
    child.stderr.on('data', (chunk) => {
      log += chunk;
      if (/chat backend at http:\/\/127\.0\.0\.1:\d+\//.test(log)) settle();
    });
  });
}

/** The example's gale.toml, pointing at the backend on `port`, with this run's secret. */
function galeConfig(port) {
  const toml = readFileSync(`${example}/gale.toml`, 'utf8');
  const config = toml
    .replaceAll('http://127.0.0.1:8000/', `http://127.0.0.1:${port}/`)
    .replace('chat-example-secret-change-me', SECRET);
  assert.ok(config.includes(`127.0.0.1:${port}/gale/connect`) && config.includes(SECRET), 'the config was rewritten');
  return config;
}

/** A browser context of its own (its own cookies) with a page on the chat. */
async function person() {
  const context = await browser.newContext({ viewport: { width: 1200, height: 800 } });
  context.setDefaultTimeout(10_000);
  const page = await context.newPage();
  page.on('console', (m) => {
    if (m.type() === 'error') problems.push(`console: ${m.text()}`);
  });
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  await page.goto(`${backend.url}/`);
  return { context, page };
}

async function logIn(name) {
  const p = await person();
  await p.page.locator('#login').waitFor();
  await p.page.fill('#name', name);
  await p.page.click('#login-button');
  await p.page.locator('#status', { hasText: 'connected' }).waitFor();
  assert.equal(await p.page.locator('#me').innerText(), name);
  return p;
}

const messages = (page) => page.locator('#messages li.msg');

/**
 * One step of alice and bob's story: each builds on the ones before, so
 * after a failed step the rest are skipped (at once, not each after its
 * own timeouts).
 */
let broken = null;
function step(name, fn) {
  test(name, { timeout: 20_000 }, async (t) => {
    if (broken) {
      t.skip(`after the failed step "${broken}"`);
      return;
    }
    try {
      await fn();
    } catch (e) {
      broken = name;
      throw e;
    }
  });
}

before(async () => {
  requireGale();
  if (!existsSync(CHROMIUM)) {
    throw new Error(`Chromium not found at ${CHROMIUM}: install Debian's (apt-get install chromium) or set CHROMIUM`);
  }
  if (spawnSync(PYTHON, ['--version']).status !== 0) {
    throw new Error(`${PYTHON} not found: the chat example's backend needs Python 3 (or set PYTHON)`);
  }
  mkdirSync(shots, { recursive: true });
  const port = await freePort();
  gale = await startGale(NO_WEATHER, 0, {}, galeConfig(port));
  backend = await startBackend(port, gale.port);
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox'] });
});

after(async () => {
  for (const p of Object.values(people)) await p.context.close().catch(() => {});
  await browser?.close();
  await gale?.stop();
  await backend?.stop();
  if (backend) writeFileSync(`${shots}/chat-backend.log`, backend.log());
});

test('the backend answers gale alone: a call without the shared secret is refused', { timeout: 20_000 }, async () => {
  const call = (headers) =>
    fetch(`${backend.url}/gale/connect`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...headers },
      body: JSON.stringify({ client: 'x', transport: 'websocket', address: '127.0.0.1', headers: {} }),
    });
  const refused = await call({});
  assert.equal(refused.status, 403);
  const wrong = await call({ 'x-gale-secret': 'guess' });
  assert.equal(wrong.status, 403);
  const anonymous = await call({ 'x-gale-secret': SECRET });
  assert.deepEqual(await anonymous.json(), { result: {} }, 'no session cookie: anonymous');
});

step('alice and bob log in, join a room and see each other there', async () => {
  people.alice = await logIn('alice');
  people.bob = await logIn('bob');
  const { alice, bob } = people;
  await alice.page.click('#rooms li[data-room="general"]');
  await alice.page.locator('#presence li[data-user="alice"]').waitFor();
  await bob.page.click('#rooms li[data-room="general"]');
  // bob sees who was there; alice hears him come.
  await bob.page.locator('#presence li[data-user="alice"]').waitFor();
  await bob.page.locator('#presence li[data-user="bob"]', { hasText: '(you)' }).waitFor();
  await alice.page.locator('#presence li[data-user="bob"]').waitFor();
  await alice.page.locator('#messages li.note', { hasText: 'bob joined' }).waitFor();
  assert.equal(await alice.page.locator('#title').innerText(), '#general');
});

step('messages go both ways, with their author, checked by the backend', async () => {
  const { alice, bob } = people;
  await alice.page.fill('#text', 'hello bob, how is the weather?');
  await alice.page.keyboard.press('Enter');
  const atBob = messages(bob.page).filter({ hasText: 'hello bob, how is the weather?' });
  await atBob.waitFor();
  assert.equal(await atBob.locator('.who').innerText(), 'alice');
  await bob.page.fill('#text', 'sunny, alice!');
  await bob.page.click('#send');
  const atAlice = messages(alice.page).filter({ hasText: 'sunny, alice!' });
  await atAlice.waitFor();
  assert.equal(await atAlice.locator('.who').innerText(), 'bob');
  // The backend's publish check: too long is refused, with its code.
  await alice.page.evaluate(() => {
    document.querySelector('#text').removeAttribute('maxlength');
  });
  await alice.page.fill('#text', 'x'.repeat(501));
  await alice.page.click('#send');
  await alice.page.locator('#error', { hasText: 'too_long' }).waitFor();
  assert.equal(await messages(alice.page).count(), 2);
  await alice.page.screenshot({ path: `${shots}/chat-room.png` });
});

step('a direct message reaches bob alone, and he answers', async () => {
  const { alice, bob } = people;
  await alice.page.click('#presence li[data-user="bob"]');
  await alice.page.locator('#title', { hasText: '@bob' }).waitFor();
  await alice.page.fill('#text', 'psst, a secret for bob');
  await alice.page.keyboard.press('Enter');
  await messages(alice.page).filter({ hasText: 'psst, a secret for bob' }).waitFor();
  // bob is told (alice knocked on his inbox), with the count unread.
  const dm = bob.page.locator('#dms li[data-dm="dm:#alice,bob"]');
  await dm.locator('.unread', { hasText: '1' }).waitFor();
  await dm.click();
  const got = messages(bob.page).filter({ hasText: 'psst, a secret for bob' });
  await got.waitFor();
  assert.equal(await got.locator('.who').innerText(), 'alice');
  await bob.page.fill('#text', 'got it');
  await bob.page.keyboard.press('Enter');
  await messages(alice.page).filter({ hasText: 'got it' }).waitFor();
  // The room did not get it.
  await bob.page.click('#rooms li[data-room="general"]');
  assert.equal(await messages(bob.page).filter({ hasText: 'psst' }).count(), 0);
  await bob.page.screenshot({ path: `${shots}/chat-dm.png` });
});

step('after a reload the room and the DM come back with their history', async () => {
  const { alice, bob } = people;
  await bob.page.reload();
  await bob.page.locator('#status', { hasText: 'connected' }).waitFor();
  // Rejoined (the page remembers its rooms), and gale's history shows
  // what was said before.
  await bob.page.locator('#title', { hasText: '#general' }).waitFor();
  await messages(bob.page).filter({ hasText: 'hello bob, how is the weather?' }).waitFor();
  await messages(bob.page).filter({ hasText: 'sunny, alice!' }).waitFor();
  const texts = await messages(bob.page).locator('.text').allInnerTexts();
  assert.deepEqual(texts, ['hello bob, how is the weather?', 'sunny, alice!'], 'in order, once each');
  // The DM, from the backend's chat.conversations, with its history.
  await bob.page.click('#dms li[data-dm="dm:#alice,bob"]');
  await messages(bob.page).filter({ hasText: 'psst, a secret for bob' }).waitFor();
  await messages(bob.page).filter({ hasText: 'got it' }).waitFor();
  // alice heard bob's old connection leave and the new one join: bob is
  // there once.
  await alice.page.click('#rooms li[data-room="general"]');
  await alice.page.locator('#presence li[data-user="bob"]').waitFor();
  await alice.page.waitForFunction(() => {
    const people = [...window.chat.convs.get('room:general').people.values()];
    return people.filter((p) => p.user === 'bob').length === 1;
  });
});

step('chat.search finds what was said in rooms, never in DMs', async () => {
  const { alice } = people;
  await alice.page.fill('#search-q', 'WEATHER');
  await alice.page.click('#search-form button');
  const hit = alice.page.locator('#search-results li', { hasText: 'hello bob, how is the weather?' });
  await hit.waitFor();
  assert.match(await hit.innerText(), /^#general · alice: /);
  await alice.page.fill('#search-q', 'secret');
  await alice.page.keyboard.press('Enter');
  await alice.page.locator('#search-results li.none', { hasText: 'secret' }).waitFor();
  await alice.page.screenshot({ path: `${shots}/chat-search.png` });
});

test('without a session: the log-in form, and gale lets no one join a room or a DM', { timeout: 20_000 }, async () => {
  const stranger = await person();
  people.stranger = stranger;
  await stranger.page.locator('#login').waitFor();
  assert.equal(await stranger.page.locator('#app').isHidden(), true);
  // The same gale, from the same origin, with no cookie.
  const result = await stranger.page.evaluate(async (port) => {
    const { GaleClient } = await import(`http://127.0.0.1:${port}/gale-client.js`);
    const gale = new GaleClient(`ws://127.0.0.1:${port}/ws`, { transports: ['websocket'], reconnect: false });
    await gale.connect();
    const code = (p) => p.then(() => 'allowed', (e) => e.code);
    const out = {
      room: await code(gale.request('topic.subscribe', { topic: 'room:general' })),
      publish: await code(gale.request('topic.publish', { topic: 'room:general', data: { text: 'hi' } })),
      dm: await code(gale.request('topic.subscribe', { topic: 'dm:#alice,bob' })),
      inbox: await code(gale.request('topic.subscribe', { topic: 'inbox:#alice' })),
      search: await code(gale.request('chat.search', { q: 'hello' })),
    };
    gale.close();
    return out;
  }, gale.port);
  assert.deepEqual(result, {
    room: 'login_required',
    publish: 'login_required',
    dm: 'permission_denied',
    inbox: 'permission_denied',
    search: 'unauthorized',
  });
});

test('no page logged an error', { timeout: 20_000 }, () => {
  assert.deepEqual(problems, []);
});
