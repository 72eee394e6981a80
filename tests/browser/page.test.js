// The page at / in Debian's headless Chromium (never a downloaded browser),
// against a real `gale serve` and the fake weather API (the provider is
// external, so it is the one stand-in). Saves screenshots under
// target/browser/ for review. Run: npm test (after `cargo build`).
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync } from 'node:fs';
import { resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { requireGale, startGale, startUpstream } from '../../clients/js/test/server.js';
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
  // Fail at once, saying what is missing, rather than time out later.
  requireGale();
  if (!existsSync(CHROMIUM)) {
    throw new Error(`Chromium not found at ${CHROMIUM}: install Debian's (apt-get install chromium) or set CHROMIUM`);
  }
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

test('a stopped server is named in plain words, the close code in the tooltip; a restarted one is used again', async () => {
  const port = gale.port;
  await gale.stop();
  // Text and tooltip read together: the next attempt soon replaces both.
  const shown = await page.waitForFunction(
    () => {
      const s = document.querySelector('#status');
      return /^The server stopped — reconnecting in \d+ s$/.test(s.textContent) && { text: s.textContent, title: s.title };
    },
    undefined,
    { timeout: 10_000 },
  );
  const { title } = await shown.jsonValue();
  assert.match(title, /code 1001, server shutting down/);
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

test('behind a proxy that refuses WebSocket upgrades, the page falls back to SSE and works, and moves back once they pass', async () => {
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
    // The proxy lets WebSockets through now: the client's next try moves
    // the page back, its subscription with it. Tries that came before this
    // line were refused and doubled the wait (2.5–5 s after SSE opened,
    // then 5–10 s, then 10–20 s): hence the long wait below.
    proxy.upgrades = 'pass';
    await behind.locator('#status', { hasText: /^open · WebSocket$/ }).waitFor({ timeout: 45_000 });
    const seen = await behind.locator('#log li', { hasText: 'Vienna' }).count();
    await behind.waitForFunction(
      (n) => [...document.querySelectorAll('#log li')].filter((li) => li.textContent.includes('Vienna')).length > n,
      seen,
      { timeout: 15_000 },
    );
    await behind.fill('#city', 'Prague');
    await behind.keyboard.press('Enter');
    await behind.locator('#card', { hasText: 'Prague' }).waitFor();
    assert.deepEqual(errors, []);
  } finally {
    await behind.close();
    await proxy.stop();
  }
});

// ---- Layout, colours and words, each on a page of its own ----

/** A new page at `url` whose page errors land in `errors`. */
async function openPage(url, viewport, errors, options = {}) {
  const p = await browser.newPage({ viewport, ...options });
  p.on('pageerror', (e) => errors.push(`page error: ${e.message}`));
  p.on('console', (m) => {
    if (m.type() === 'error' && !/WebSocket connection to .* failed|Failed to load resource/.test(m.text())) {
      errors.push(`console: ${m.text()}`);
    }
  });
  await p.goto(url);
  await p.locator('#status', { hasText: 'open' }).waitFor();
  return p;
}

test('every row of panels fills the width: no empty column, at 1280 px nor elsewhere', async () => {
  const errors = [];
  const p = await openPage(`http://127.0.0.1:${gale.port}/`, { width: 1280, height: 800 }, errors);
  try {
    for (const width of [1280, 1920, 1024, 800, 390, 320]) {
      await p.setViewportSize({ width, height: 800 });
      const { content, rows } = await p.evaluate(() => {
        const main = document.querySelector('main');
        const r = main.getBoundingClientRect();
        const cs = getComputedStyle(main);
        const content = { left: r.left + parseFloat(cs.paddingLeft), right: r.right - parseFloat(cs.paddingRight) };
        const rows = {};
        for (const s of main.querySelectorAll(':scope > section')) {
          const b = s.getBoundingClientRect();
          (rows[Math.round(b.top)] ??= []).push({ id: s.getAttribute('aria-labelledby'), left: b.left, right: b.right });
        }
        return { content, rows: Object.values(rows) };
      });
      for (const row of rows) {
        const left = Math.min(...row.map((b) => b.left));
        const right = Math.max(...row.map((b) => b.right));
        const what = `${width} px, row ${row.map((b) => b.id).join(' + ')}: ${left}..${right} in ${content.left}..${content.right}`;
        assert.ok(Math.abs(left - content.left) <= 1, what);
        assert.ok(Math.abs(right - content.right) <= 1, `blank area at the right: ${what}`);
      }
      if (width === 1280) {
        assert.deepEqual(rows.map((r) => r.length), [2, 1], 'two panels side by side, the stats below');
        await p.screenshot({ path: `${shots}/desktop-1280.png`, fullPage: true });
      }
      if (width === 390) assert.ok(rows.every((r) => r.length === 1), 'one panel a row on a phone');
    }
    assert.deepEqual(errors, []);
  } finally {
    await p.close();
  }
});

/** [r, g, b, a] of a computed CSS colour, "rgb(…)" or "rgba(…)". */
function rgba(css) {
  const [r, g, b, a = 1] = css.match(/[\d.]+/g).map(Number);
  return [r, g, b, a];
}
/** WCAG 2 contrast ratio of two opaque colours. */
function contrast(fg, bg) {
  const lum = ([r, g, b]) => {
    const [R, G, B] = [r, g, b].map((v) => {
      const c = v / 255;
      return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * R + 0.7152 * G + 0.0722 * B;
  };
  const [hi, lo] = [lum(fg), lum(bg)].sort((x, y) => y - x);
  return (hi + 0.05) / (lo + 0.05);
}

for (const colorScheme of ['light', 'dark']) {
  test(`buttons meet WCAG AA contrast (4.5:1) in ${colorScheme} mode`, async () => {
    const errors = [];
    const p = await openPage(`http://127.0.0.1:${gale.port}/`, { width: 1280, height: 800 }, errors);
    try {
      await p.emulateMedia({ colorScheme });
      assert.equal(await p.evaluate(() => matchMedia('(prefers-color-scheme: dark)').matches), colorScheme === 'dark');
      for (const id of ['get', 'sub']) {
        // The button's text colour on what is behind it: its own
        // background, or (transparent) the nearest ancestor's.
        const { color, background, disabled } = await p.evaluate((id) => {
          const b = document.getElementById(id);
          let e = b;
          let bg = getComputedStyle(e).backgroundColor;
          while (e && /rgba\(.*, 0\)|transparent/.test(bg)) {
            e = e.parentElement;
            bg = e ? getComputedStyle(e).backgroundColor : 'rgb(255, 255, 255)';
          }
          return { color: getComputedStyle(b).color, background: bg, disabled: b.disabled };
        }, id);
        assert.equal(disabled, false);
        const ratio = contrast(rgba(color), rgba(background));
        assert.ok(ratio >= 4.5, `#${id} in ${colorScheme} mode: ${color} on ${background} is ${ratio.toFixed(2)}:1`);
      }
      await p.screenshot({ path: `${shots}/scheme-${colorScheme}.png`, fullPage: true });
      assert.deepEqual(errors, []);
    } finally {
      await p.close();
    }
  });
}

describe('on a quiet server of its own (default feeds, no other client)', () => {
  let quiet;
  let p;
  const errors = [];
  before(async () => {
    quiet = await startGale(upstream.url);
    p = await openPage(`http://127.0.0.1:${quiet.port}/`, { width: 1280, height: 800 }, errors);
  });
  after(async () => {
    await p?.close();
    await quiet?.stop();
  });

  test('the Updates panel says in plain words what will appear there, and when', async () => {
    const empty = p.locator('#no-log');
    const first = await empty.innerText();
    assert.doesNotMatch(first, /weather\.update|push/);
    assert.match(first, /^Nothing yet\. Subscribe to a city, and its new readings appear here .*about every 10 minutes/);
    await p.fill('#city', 'Lyon');
    await p.click('#sub');
    await p.locator('#subs li[data-city="Lyon"]').waitFor();
    assert.match(await empty.innerText(), /^Following Lyon\. Its next reading appears here when the weather service refreshes it: about every 10 minutes/);
    await p.screenshot({ path: `${shots}/waiting-for-updates.png`, fullPage: true });
    await p.click('#subs li[data-city="Lyon"] button');
    await p.locator('#subs li[data-city="Lyon"]').waitFor({ state: 'detached' });
    assert.match(await empty.innerText(), /^Nothing yet\./);
  });

  test("messages/s leaves out the page's own polling: an idle server reads 0, other clients' messages count", async () => {
    const msgs = p.locator('#stat-msgs b');
    // A few polls in: the rate is computed from the second on.
    await p.waitForFunction(() => document.querySelector('#spark-line').getAttribute('points').split(' ').length >= 3);
    const seen = [];
    for (let i = 0; i < 4; i++) {
      seen.push(await msgs.innerText());
      await new Promise((r) => setTimeout(r, 1_000));
    }
    assert.deepEqual(seen, ['0', '0', '0', '0'], 'only this page polls the server');
    assert.equal(await p.locator('#spark-peak').innerText(), '0');
    // Another client sends 10 messages a second for 3 s.
    await p.evaluate(
      (url) =>
        new Promise((resolve, reject) => {
          const ws = new WebSocket(url);
          ws.onerror = () => reject(new Error('the other client could not connect'));
          ws.onopen = () => {
            let n = 0;
            const t = setInterval(() => {
              ws.send(JSON.stringify({ event: 'no.such.event', ref: String(n) }));
              if (++n === 30) {
                clearInterval(t);
                setTimeout(() => (ws.close(), resolve()), 200);
              }
            }, 100);
          };
        }),
      `ws://127.0.0.1:${quiet.port}/ws`,
    );
    await p.waitForFunction(() => Number(document.querySelector('#spark-peak').textContent) >= 5);
    assert.deepEqual(errors, []);
  });
});

describe('when the server dies', () => {
  let doomed;
  let p;
  const errors = [];
  before(async () => {
    doomed = await startGale(upstream.url);
    p = await openPage(`http://127.0.0.1:${doomed.port}/`, { width: 1280, height: 800 }, errors);
    await p.waitForFunction(() => Number(document.querySelector('#stat-connections b').textContent) >= 1);
    await doomed.kill(); // SIGKILL: no goodbye, as in a crash
  });
  after(async () => {
    await p?.close();
    await doomed?.stop();
  });

  test('the status says in plain words that the server cannot be reached', async () => {
    const status = p.locator('#status');
    await status.filter({ hasText: /^Cannot reach the server/ }).waitFor({ timeout: 10_000 });
    const text = await status.innerText();
    assert.match(text, /^Cannot reach the server — retrying in \d+ s$/);
    assert.doesNotMatch(text, /TypeError|1006|Failed to fetch|closed/);
    // The technical reason stays available, in the tooltip.
    assert.match(await status.getAttribute('title'), /code 1006/);
    await p.screenshot({ path: `${shots}/server-down.png`, fullPage: true });
  });

  test('the stats are marked stale, with the time they are from', async () => {
    const panel = p.locator('#stats-panel');
    await panel.and(p.locator('.stale')).waitFor({ timeout: 10_000 });
    assert.equal(await panel.getAttribute('data-stale'), 'true');
    assert.match(await p.locator('#stats-age').innerText(), /^not live · last update \d{1,2}:\d{2}:\d{2}/);
    assert.notEqual(await p.locator('#stat-connections b').innerText(), '–', 'the last values stay');
  });

  test('back to live once the server is back', async () => {
    const port = doomed.port;
    doomed = await startGale(upstream.url, port);
    await p.locator('#status', { hasText: /^open · WebSocket$/ }).waitFor({ timeout: 20_000 });
    await p.waitForFunction(() => document.querySelector('#stats-age').textContent.startsWith('live'), undefined, {
      timeout: 5_000,
    });
    assert.equal(await p.locator('#stats-panel').getAttribute('data-stale'), 'false');
    assert.equal(await p.locator('#stats-panel.stale').count(), 0);
    assert.deepEqual(errors, []);
  });
});

test('no console errors', () => {
  // The reconnect attempts while the server is down make Chromium log
  // failed WebSocket connections; those are the test's own doing.
  const real = problems.filter((p) => !/WebSocket connection to .* failed/.test(p));
  assert.deepEqual(real, []);
});
