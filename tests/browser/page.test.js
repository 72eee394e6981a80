// The page at / in Debian's headless Chromium (never a downloaded browser),
// against a real `gale serve` and the fake weather API (the provider is
// external, so it is the one stand-in). Saves screenshots under
// target/browser/ for review. Run: npm test (after `cargo build`).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { startGale, startUpstream } from '../../clients/js/test/server.js';
import { startNoUpgradeProxy } from '../../clients/js/test/proxy.js';

const here = dirname(fileURLToPath(import.meta.url));
const shots = resolve(here, '../../target/browser');
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
// Readings expire after a second and subscribed cities are re-checked
// every second, so weather.update pushes arrive within the test.
const FAST_FEEDS = { GALE_WEATHER__CACHE_TTL_S: '1', GALE_WEATHER__REFRESH_S: '1', GALE_SERVER__ECHO: 'true' };

let upstream;
let gale;
let browser;
let page;
const problems = [];

before(async () => {
  mkdirSync(shots, { recursive: true });
  upstream = await startUpstream();
  gale = await startGale(upstream.url, undefined, FAST_FEEDS);
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox'] });
  page = await browser.newPage({ viewport: { width: 390, height: 844 } }); // a phone
  page.on('console', (m) => {
    if (m.type() === 'error') problems.push(`console: ${m.text()}`);
  });
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  await page.goto(`http://127.0.0.1:${gale.port}/`);
  await page.locator('#status', { hasText: 'open' }).waitFor();
});

after(async () => {
  await browser?.close();
  await gale?.stop();
  upstream?.stop();
});

test('looking up a city shows its weather card', async () => {
  await page.fill('#city', 'Paris');
  await page.keyboard.press('Enter'); // keyboard alone
  const card = page.locator('#card');
  await card.waitFor();
  const text = await card.innerText();
  assert.match(text, /Paris/);
  assert.match(text, /°C/);
  assert.match(text, /Feels like/);
  assert.match(text, /Humidity/);
  await page.screenshot({ path: `${shots}/lookup.png`, fullPage: true });
});

test('an unknown city shows a readable error', async () => {
  await page.fill('#city', 'Atlantis');
  await page.click('#get');
  const error = page.locator('#error');
  await error.waitFor();
  assert.match(await error.innerText(), /not_found: No such city/);
});

test('subscribing lists the city and its weather.update pushes arrive with their time', async () => {
  await page.fill('#city', 'Oslo');
  await page.click('#sub');
  await page.locator('#subs li[data-city="Oslo"]').waitFor();
  const update = page.locator('#log li', { hasText: 'Oslo' }).first();
  await update.waitFor({ timeout: 15_000 });
  assert.match(await update.innerText(), /\d{1,2}:\d{2}:\d{2}.*Oslo: .* °C/);
  await page.screenshot({ path: `${shots}/subscribed.png`, fullPage: true });
});

test('the stats panel fills from server.stats', async () => {
  const connections = page.locator('#stat-connections b');
  await page.waitForFunction(() => Number(document.querySelector('#stat-connections b').textContent) >= 1);
  assert.ok(Number(await connections.innerText()) >= 1);
  await page.waitForFunction(() => document.querySelector('#spark-line').getAttribute('points').length > 0);
  assert.notEqual(await page.locator('#stat-requests b').innerText(), '–');
});

test('a dropped connection gets back the updates it missed, and the page says so', async () => {
  assert.equal(await page.locator('#status').innerText(), 'open · WebSocket');
  // Another subscriber of Oslo keeps its feed running while the page is
  // away (a city's feed stops with its last subscriber).
  await page.evaluate(
    (url) =>
      new Promise((resolve) => {
        const ws = new WebSocket(url);
        window.otherSubscriber = ws;
        ws.onopen = () => ws.send(JSON.stringify({ event: 'weather.subscribe', data: { city: 'Oslo' }, ref: 'x' }));
        ws.onmessage = (e) => {
          if (JSON.parse(e.data).reply === 'x') resolve();
        };
      }),
    `ws://127.0.0.1:${gale.port}/ws`,
  );
  // Away for 1.25 to 2.5 s (the client's jittered backoff) while Oslo
  // refreshes every second: at least one update is published meanwhile.
  await page.evaluate(() => {
    window.gale.options.minDelayMs = 2_500;
    window.gale.options.maxDelayMs = 2_500;
    window.gale.ws.close();
  });
  const note = page.locator('#log li.note', { hasText: /recovered \d+ missed updates? \(weather:oslo\)/ });
  await note.waitFor({ timeout: 15_000 });
  await page.locator('#status', { hasText: 'open · WebSocket' }).waitFor();
  await page.screenshot({ path: `${shots}/recovered.png`, fullPage: true });
  await page.evaluate(() => {
    window.gale.options.minDelayMs = 500;
    window.gale.options.maxDelayMs = 10_000;
    window.otherSubscriber.close();
  });
});

test('a stopped server shows "reconnecting"; a restarted one is used again', async () => {
  const port = gale.port;
  await gale.stop();
  await page.locator('#status', { hasText: /reconnecting in \d+ s/ }).waitFor({ timeout: 10_000 });
  assert.match(await page.locator('#status').innerText(), /closed 1001/);
  await page.screenshot({ path: `${shots}/reconnecting.png`, fullPage: true });
  gale = await startGale(upstream.url, port, FAST_FEEDS);
  await page.locator('#status', { hasText: /^open · WebSocket$/ }).waitFor({ timeout: 20_000 });
  // Usable again, and the subscription was renewed on the new connection.
  await page.fill('#city', 'Madrid');
  await page.keyboard.press('Enter');
  await page.locator('#card', { hasText: 'Madrid' }).waitFor();
  const before = await page.locator('#log li').count();
  await page.waitForFunction((n) => document.querySelectorAll('#log li').length > n, before, { timeout: 15_000 });
  await page.screenshot({ path: `${shots}/page.png`, fullPage: true });
});

test('unsubscribing removes the city, and its updates stop', async () => {
  await page.click('#subs li[data-city="Oslo"] button');
  await page.locator('#subs li[data-city="Oslo"]').waitFor({ state: 'detached' });
  assert.ok(await page.locator('#no-subs').isVisible(), '"None yet" is back');
  await new Promise((r) => setTimeout(r, 500)); // an update already on its way
  const settled = await page.locator('#log li').count();
  await new Promise((r) => setTimeout(r, 3_000)); // readings refresh every second
  assert.equal(await page.locator('#log li').count(), settled);
});

test('the browser agrees to permessage-deflate and reads compressed messages', async () => {
  const metric = async (name) => {
    const text = await (await fetch(`${gale.http}/metrics`)).text();
    const line = text.split('\n').find((l) => l.startsWith(`${name} `));
    return Number(line?.split(' ')[1]);
  };
  const before = await metric('gale_compressed_messages_total');
  const big = JSON.stringify(Array.from({ length: 100 }, (_, i) => ({ city: `City${i}`, temperature_c: 12.5 })));
  const got = await page.evaluate(
    ([url, text]) =>
      new Promise((resolve, reject) => {
        const ws = new WebSocket(url);
        ws.onopen = () => ws.send(text);
        ws.onmessage = (e) => {
          resolve({ extensions: ws.extensions, same: e.data === text });
          ws.close();
        };
        ws.onerror = () => reject(new Error('echo socket failed'));
      }),
    [`ws://127.0.0.1:${gale.port}/echo`, big],
  );
  assert.match(got.extensions, /^permessage-deflate/);
  assert.equal(got.same, true, 'the compressed echo inflates to what was sent');
  assert.ok((await metric('gale_compressed_messages_total')) > before, 'the echo went out compressed');
  assert.ok((await metric('gale_compressed_connections_total')) >= 2, 'the page and the echo socket');
});

test('behind a proxy that refuses WebSocket upgrades, the page falls back to SSE and works', async () => {
  const proxy = await startNoUpgradeProxy(gale.port);
  const behind = await browser.newPage({ viewport: { width: 390, height: 844 } });
  const errors = [];
  behind.on('pageerror', (e) => errors.push(e.message));
  try {
    await behind.goto(`http://127.0.0.1:${proxy.port}/`);
    await behind.locator('#status', { hasText: 'open · SSE (fallback)' }).waitFor({ timeout: 15_000 });
    await behind.fill('#city', 'Vienna');
    await behind.keyboard.press('Enter');
    await behind.locator('#card', { hasText: 'Vienna' }).waitFor();
    await behind.click('#sub');
    await behind.locator('#subs li[data-city="Vienna"]').waitFor();
    await behind.locator('#log li', { hasText: 'Vienna' }).first().waitFor({ timeout: 15_000 });
    await behind.waitForFunction(() => Number(document.querySelector('#stat-connections b').textContent) >= 1);
    await behind.screenshot({ path: `${shots}/sse-fallback.png`, fullPage: true });
    assert.deepEqual(errors, []);
  } finally {
    await behind.close();
    await proxy.stop();
  }
});

test('no console errors', () => {
  // The reconnect attempts while the server is down make Chromium log
  // failed WebSocket connections; those are the test's own doing.
  const real = problems.filter((p) => !/WebSocket connection to .* failed/.test(p));
  assert.deepEqual(real, []);
});
