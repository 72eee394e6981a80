// The chat example's page (examples/chat/README.md): plain JavaScript, no
// build step. It asks the backend who it is (GET /session), imports gale's
// JavaScript client from gale itself (/gale-client.js), and talks to gale
// over one WebSocket. gale asks the backend the rest: who this connection
// is (from the session cookie the browser sends with the handshake),
// whether it may join a room, what it may say there, and chat.search.
//
// Topics: room:NAME (rooms), dm:#alice,bob (direct messages: the two user
// ids, sorted), inbox:#alice (where others knock to say "I opened a DM
// with you"; gale subscribes each connection to its own at connect).

const HISTORY = 100; // gale.toml's history_size: what a room shows on joining
const $ = (sel) => document.querySelector(sel);

const me = await fetch('/session', { cache: 'no-store' }).then((r) => r.json());
if (!me.user) {
  $('#login').hidden = false;
  if (new URLSearchParams(location.search).has('error')) $('#login-error').hidden = false;
} else {
  await start();
}

async function start() {
  $('#app').hidden = false;
  $('#me').textContent = me.name;
  $('#me').style.color = me.color;

  // gale on the page's own host name (so the session cookie, which is
  // per host and not per port, goes with the handshake), on its port.
  const wsUrl = me.gale ?? `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.hostname}:${me.galePort}/ws`;
  const galeHttp = wsUrl.replace(/^ws/, 'http').replace(/\/ws$/, '');
  let GaleClient;
  try {
    ({ GaleClient } = await import(`${galeHttp}/gale-client.js`));
  } catch {
    status('closed', `gale is not running at ${galeHttp}: start it, then reload`);
    return;
  }
  // WebSocket only: the SSE fallback's requests would be cross-origin,
  // without the cookie.
  const gale = new GaleClient(wsUrl, { transports: ['websocket'] });
  // publish, presence and rpc where the client has them (a gale built
  // with the newer client); otherwise the events they send.
  const publish = (topic, data) => (gale.publish ? gale.publish(topic, data) : gale.request('topic.publish', { topic, data }));
  const presence = (topic) => (gale.presence ? gale.presence(topic) : gale.request('topic.presence', { topic }));
  const rpc = (event, data) => (gale.rpc ? gale.rpc(event, data) : gale.request(event, data));

  /** topic → conversation (a room or a DM) */
  const convs = new Map();
  let current = null;
  let seq = 0;
  const storeKey = `gale-chat:${me.user}`;
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(storeKey) ?? '{}') ?? {};
  } catch {} // a damaged entry: start afresh
  window.chat = { gale, convs, me }; // for the console (and the tests)

  const dmTopic = (a, b) => `dm:#${[a, b].sort().join(',')}`;

  function conversation(topic) {
    let c = convs.get(topic);
    if (!c) {
      const room = topic.startsWith('room:');
      c = {
        topic,
        room,
        label: room ? `#${topic.slice(5)}` : '',
        peer: null,
        peerName: null,
        peerColor: null,
        joined: false,
        joining: null,
        knocked: false,
        items: new Map(), // "m:OFFSET" (messages) or "n:SEQ" (notices) → item
        last: 0, // the highest offset seen
        unread: 0,
        people: new Map(), // client → {user, info}
        pendingPresence: null,
      };
      convs.set(topic, c);
    }
    return c;
  }

  function save() {
    const rooms = [...convs.values()].filter((c) => c.room && c.joined).map((c) => c.topic.slice(5));
    localStorage.setItem(storeKey, JSON.stringify({ rooms, open: current?.topic ?? null }));
  }

  // --- what arrives ---------------------------------------------------

  /**
   * A message (a push, or one from history): once per offset; `seen`: not
   * to be counted unread (history shown on joining).
   */
  function addMessage(c, data, meta = {}, seen = false) {
    if (!data || typeof data.text !== 'string') return;
    const offset = typeof meta.offset === 'number' ? meta.offset : null;
    const key = offset !== null ? `m:${offset}` : `x:${++seq}`;
    if (c.items.has(key)) return;
    // The push's own user is gale's word; a room's data repeats it (the
    // backend stamps it), a DM's says who sent it for clients that do not
    // pass the push's user on.
    const user = meta.user ?? data.user ?? data.from ?? '?';
    const mine = user === me.user;
    const name = c.room ? (data.name ?? user) : mine ? me.name : (c.peerName ?? user);
    const color = c.room ? data.color : mine ? me.color : c.peerColor;
    c.items.set(key, { kind: 'msg', sort: offset ?? c.last + 0.5, seq: offset !== null ? 0 : seq, user, name, color, text: data.text, at: data.at });
    if (offset !== null && offset > c.last) c.last = offset;
    if (c !== current && !mine && !seen) c.unread++;
    render(c);
  }

  function note(c, text) {
    c.items.set(`n:${++seq}`, { kind: 'note', sort: c.last, seq, text });
    render(c);
  }

  gale.on('topic.message', (data, _event, meta) => {
    const topic = meta?.topic ?? '';
    if (topic.startsWith('inbox:')) {
      // A knock on our inbox: someone opened a DM with us.
      if (data && typeof data.dm === 'string' && typeof data.from === 'string'
          && data.dm === dmTopic(me.user, data.from)) {
        openDm(data.from, data.name, data.color, { knock: false, focus: false, news: true }).catch(showError);
      }
      return;
    }
    const c = convs.get(topic);
    if (c) addMessage(c, data, meta);
  });

  const hasUser = (c, user) => [...c.people.values()].some((p) => p.user === user);

  gale.on('topic.join', (d) => {
    const c = convs.get(d?.topic);
    if (!c) return;
    if (d.client === gale.clientId) {
      // We are (back) in: who else is?
      refreshPresence(c);
      return;
    }
    const had = hasUser(c, d.user);
    c.people.set(d.client, { user: d.user, info: d.info });
    c.pendingPresence?.joined.set(d.client, { user: d.user, info: d.info });
    if (!had && d.user) note(c, `${d.info?.name ?? d.user} joined`);
    renderPeople();
  });

  gale.on('topic.leave', (d) => {
    const c = convs.get(d?.topic);
    if (!c) return;
    const who = c.people.get(d.client);
    c.people.delete(d.client);
    c.pendingPresence?.joined.delete(d.client);
    c.pendingPresence?.left.add(d.client);
    // Another tab of the same user does not make a leave.
    if (d.user && who && !hasUser(c, d.user)) note(c, `${who.info?.name ?? d.user} left`);
    renderPeople();
  });

  gale.on('gale.recovery_failed', ({ topic }) => {
    const c = convs.get(topic);
    if (c) note(c, 'some messages from while you were away are no longer kept');
  });

  gale.on('gale.resubscribe_failed', (e) => {
    // The backend forgot the session (it restarted): log in again.
    if (e.code === 'login_required') location.reload();
    else showError(e);
  });

  gale.onState((state, info) => {
    const words = {
      connecting: 'connecting…',
      open: 'connected',
      reconnecting: info?.delayMs ? `reconnecting in ${Math.ceil(info.delayMs / 1000)} s` : 'reconnecting…',
      closed: 'disconnected',
    };
    status(state, words[state] ?? state, info?.code ? `code ${info.code}${info.reason ? `, ${info.reason}` : ''}` : '');
  });

  // --- joining ------------------------------------------------------------

  /**
   * Subscribes to a conversation (renewed by the client after every
   * reconnect, recovering what was missed), then shows its recent
   * history: subscribing again from an earlier position (`since`) makes
   * gale send the publications after it in the reply.
   */
  function join(c, { news = false } = {}) {
    if (c.joined) return Promise.resolve();
    c.joining ??= (async () => {
      const r = await gale.subscribeTopic(c.topic);
      c.joined = true;
      save();
      await loadHistory(c, r, news);
    })().finally(() => {
      c.joining = null;
    });
    return c.joining;
  }

  async function loadHistory(c, r, news) {
    const top = r?.offset ?? 0;
    if (!top || typeof r.epoch !== 'string') return;
    // All that is kept: up to history_size, less what outlived
    // history_ttl_s (then a smaller window is asked for).
    for (let k = Math.min(top, HISTORY); k > 0; k = Math.floor(k / 2)) {
      const h = await gale.request('topic.subscribe', { topic: c.topic, since: { offset: top - k, epoch: r.epoch } });
      if (h.recovered) {
        for (const p of h.publications ?? []) addMessage(c, p.data, p, !news);
        return;
      }
      if (h.epoch !== r.epoch) return; // the history is gone
    }
  }

  async function refreshPresence(c) {
    if (!c.room) return;
    const pending = (c.pendingPresence = { joined: new Map(), left: new Set() });
    try {
      const p = await presence(c.topic);
      if (c.pendingPresence !== pending) return; // a newer one runs
      const people = new Map(p.clients.map((x) => [x.client, { user: x.user, info: x.info }]));
      for (const [client, who] of pending.joined) people.set(client, who);
      for (const client of pending.left) people.delete(client);
      c.people = people;
      renderPeople();
    } catch (e) {
      showError(e);
    } finally {
      if (c.pendingPresence === pending) c.pendingPresence = null;
    }
  }

  async function joinRoom(name, { focus = true } = {}) {
    const c = conversation(`room:${name}`);
    if (focus) show(c);
    try {
      await join(c);
    } catch (e) {
      showError(e);
      if (!c.joined) {
        convs.delete(c.topic);
        if (current === c) show(null);
      }
    }
    renderLists();
  }

  /**
   * Opens the DM with `peer`; `knock`: tell them (their inbox) once;
   * `news`: they knocked, so what is in its history is unread (they may
   * have written before we subscribed).
   */
  async function openDm(peer, name, color, { knock = true, focus = true, news = false } = {}) {
    if (!peer || peer === me.user) return;
    const c = conversation(dmTopic(me.user, peer));
    c.peer = peer;
    c.peerName = name ?? c.peerName ?? peer;
    c.peerColor = color ?? c.peerColor;
    c.label = `@${c.peerName}`;
    if (focus) show(c);
    renderLists();
    await join(c, { news });
    if (knock && !c.knocked) {
      c.knocked = true;
      try {
        await publish(`inbox:#${peer}`, { dm: c.topic });
      } catch (e) {
        c.knocked = false;
        throw e;
      }
    }
    renderLists();
  }

  // --- the page -----------------------------------------------------------

  function show(c) {
    current = c;
    if (c) c.unread = 0;
    $('#title').textContent = c ? c.label : 'Pick a room';
    $('#subtitle').textContent = c ? (c.room ? c.topic : 'direct message') : '';
    $('#text').disabled = $('#send').disabled = !c;
    $('#people').hidden = Boolean(c && !c.room);
    if (c) save();
    render(c);
    renderPeople();
    renderLists();
    if (c) $('#text').focus();
  }

  function render(c) {
    if (c !== current) {
      renderLists();
      return;
    }
    const list = $('#messages');
    const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 40;
    list.replaceChildren();
    if (!c) return;
    const items = [...c.items.values()].sort((a, b) => a.sort - b.sort || a.seq - b.seq);
    for (const it of items) {
      const li = document.createElement('li');
      if (it.kind === 'note') {
        li.className = 'note';
        li.textContent = it.text;
      } else {
        li.className = 'msg';
        li.dataset.user = it.user;
        const who = document.createElement('span');
        who.className = 'who';
        who.textContent = it.name;
        if (it.color) who.style.color = it.color;
        const time = document.createElement('time');
        if (typeof it.at === 'number') {
          time.dateTime = new Date(it.at).toISOString();
          time.textContent = new Date(it.at).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
        }
        const text = document.createElement('span');
        text.className = 'text';
        text.textContent = it.text;
        li.append(who, time, text);
      }
      list.append(li);
    }
    if (atBottom) list.scrollTop = list.scrollHeight;
  }

  function badge(li, n) {
    if (n > 0) {
      const b = document.createElement('span');
      b.className = 'unread';
      b.textContent = String(n);
      li.append(b);
    }
  }

  function renderLists() {
    const rooms = new Set([...me.rooms, ...[...convs.values()].filter((c) => c.room).map((c) => c.topic.slice(5))]);
    $('#rooms').replaceChildren(
      ...[...rooms].map((name) => {
        const c = convs.get(`room:${name}`);
        const li = document.createElement('li');
        li.dataset.room = name;
        li.textContent = `#${name}`;
        if (c?.joined) li.classList.add('joined');
        if (c && c === current) li.classList.add('current');
        badge(li, c?.unread ?? 0);
        li.onclick = () => joinRoom(name);
        return li;
      }),
    );
    const dms = [...convs.values()].filter((c) => !c.room);
    if (dms.length === 0) return;
    $('#dms').replaceChildren(
      ...dms.map((c) => {
        const li = document.createElement('li');
        li.dataset.dm = c.topic;
        li.textContent = c.label;
        if (c.peerColor) li.style.color = c.peerColor;
        if (c === current) li.classList.add('current');
        badge(li, c.unread);
        li.onclick = () => show(c);
        return li;
      }),
    );
  }

  function renderPeople() {
    const ul = $('#presence');
    if (!current?.room) {
      ul.replaceChildren();
      return;
    }
    const users = new Map();
    for (const p of current.people.values()) if (p.user) users.set(p.user, p.info ?? {});
    ul.replaceChildren(
      ...[...users].sort(([a], [b]) => a.localeCompare(b)).map(([user, info]) => {
        const li = document.createElement('li');
        li.dataset.user = user;
        li.textContent = info.name ?? user;
        if (info.color) li.style.color = info.color;
        if (user === me.user) {
          li.classList.add('me-too');
          li.append(' (you)');
        } else {
          li.title = `Write to ${info.name ?? user}`;
          li.onclick = () => openDm(user, info.name, info.color).catch(showError);
        }
        return li;
      }),
    );
  }

  function showError(e) {
    const p = $('#error');
    p.textContent = `${e.code ?? 'error'}: ${e.message}`;
    p.hidden = false;
  }

  $('#send-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const c = current;
    const input = $('#text');
    const text = input.value.trim();
    if (!c || !text) return;
    // A room's message is checked and stamped by the backend; a DM's goes
    // as it is, to the two of you.
    const data = c.room ? { text } : { text, from: me.user, at: Date.now() };
    try {
      await join(c); // still joining: publishing needs the subscription
      await publish(c.topic, data);
      if (input.value.trim() === text) input.value = '';
      $('#error').hidden = true;
    } catch (e) {
      showError(e);
    }
  });

  $('#join-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const name = $('#join-name').value.trim().toLowerCase();
    if (!name) return;
    $('#join-name').value = '';
    joinRoom(name);
  });

  $('#search-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const q = $('#search-q').value.trim();
    if (!q) return;
    const out = $('#search-results');
    try {
      const r = await rpc('chat.search', { q });
      out.replaceChildren(
        ...r.matches.map((m) => {
          const li = document.createElement('li');
          li.textContent = `#${m.room.slice(5)} · ${m.name}: ${m.text}`;
          li.title = new Date(m.at).toLocaleString();
          li.onclick = () => joinRoom(m.room.slice(5));
          return li;
        }),
      );
      if (r.matches.length === 0) {
        const li = document.createElement('li');
        li.className = 'none';
        li.textContent = `Nothing said in a room matches “${r.q}”.`;
        out.append(li);
      }
    } catch (e) {
      showError(e);
    }
  });

  renderLists();
  await gale.connect();
  // Back where we were: the rooms joined before, the DMs we have.
  await Promise.all((saved.rooms ?? []).map((name) => joinRoom(name, { focus: false })));
  try {
    const { conversations } = await rpc('chat.conversations');
    await Promise.all(conversations.slice(0, 40).map((x) => openDm(x.with, x.name, x.color, { knock: false, focus: false })));
  } catch (e) {
    showError(e);
  }
  const open = saved.open && convs.get(saved.open);
  if (open?.joined) show(open);
}

function status(state, text, title = '') {
  const s = $('#status');
  s.className = state;
  s.textContent = text;
  s.title = title;
}
