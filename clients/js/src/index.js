// @ts-check
/**
 * A client for gale's JSON event protocol (docs/protocol.md): requests
 * that settle with their reply, pushes by event name, weather and topic
 * subscriptions that survive reconnects and recover what was missed
 * meanwhile (topics with history), subscription tokens fetched again for
 * every resubscribe, publishing, presence, join/leave notices, calls
 * answered by the application's backend (rpc), automatic reconnection with
 * exponential backoff and jitter (or after the delay a draining server
 * suggests), a bounded queue while disconnected, and
 * a fallback to Server-Sent Events + POST when a WebSocket cannot be
 * opened, with a move back to the WebSocket once one opens again. No
 * dependencies: it uses the platform's WebSocket (browsers; Node 22+, or
 * Node 20 with --experimental-websocket) unless one is passed in, and
 * fetch for SSE.
 */

/** An error reply from the server, or a failure on the client's side. */
export class GaleError extends Error {
  /**
   * @param {string} code e.g. "not_found", "timeout", "disconnected"
   * @param {string} message
   * @param {string} [field] the field at fault, for "invalid_data"
   * @param {string | number} [appCode] the application backend's own code
   */
  constructor(code, message, field, appCode) {
    super(message);
    this.name = 'GaleError';
    this.code = code;
    if (field !== undefined) this.field = field;
    if (appCode !== undefined) this.appCode = appCode;
  }
}

/**
 * The GaleError of a reply's `error`: `code` always a string; `appCode`
 * the backend's code as it gave it (a string or a number) when the error
 * is the application backend's (the server marks it `application: true`).
 */
function replyError(e) {
  const raw = e.code ?? 'error';
  const app = e.application === true ? raw : undefined;
  return new GaleError(String(raw), e.message ?? 'request failed', e.field, app);
}

const DEFAULTS = {
  timeoutMs: 10_000,
  maxQueue: 100,
  reconnect: true,
  minDelayMs: 500,
  maxDelayMs: 30_000,
  transports: ['websocket', 'sse'],
  upgrade: true,
  upgradeDelayMs: 5_000,
  maxUpgradeDelayMs: 300_000,
};

/**
 * How long a connection reached by moving back to the preferred
 * transport must stay up before that move counts as a success (the probe
 * delay starts again from `upgradeDelayMs`); one that drops sooner sends
 * the client back to the fallback at once, and the next probe waits
 * twice as long.
 */
const PROBATION_MS = 60_000;

/**
 * The codes of a renewal refused for good (the subscription itself is
 * not allowed, on any connection): these do not call a move off, as a
 * timeout or a limit does.
 */
const REFUSALS = new Set(['permission_denied', 'forbidden', 'unauthorized', 'invalid_data', 'not_found', 'unknown_event']);

/** Transports, as `client.transport` names them. */
export const Transport = Object.freeze({ WEBSOCKET: 'websocket', SSE: 'sse' });

/**
 * gale's fallback transport with a WebSocket's shape (readyState, send,
 * close, onopen/onmessage/onclose): GET /sse read as a stream through
 * fetch, each message sent with POST /sse/SESSION, in order.
 */
export class SseTransport {
  /**
   * @param {string} url http(s):// URL of gale's /sse (with ?token=…)
   * @param {typeof fetch} [fetchImpl]
   */
  constructor(url, fetchImpl = globalThis.fetch) {
    this.url = url;
    // Called as a plain function: browsers refuse fetch with another `this`.
    this.fetch = (input, init) => fetchImpl(input, init);
    this.readyState = 0;
    this.session = null;
    this.onopen = null;
    this.onmessage = null;
    this.onclose = null;
    this.onerror = null;
    this.abort = new AbortController();
    this.sending = Promise.resolve();
    this.ended = null;
    this.#run();
  }

  async #run() {
    try {
      const res = await this.fetch(this.url, {
        headers: { accept: 'text/event-stream' },
        cache: 'no-store',
        signal: this.abort.signal,
      });
      if (!res.ok || !res.body) {
        this.#closed(1006, `GET /sse answered ${res.status}`);
        return;
      }
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let at;
        while ((at = buf.indexOf('\n\n')) >= 0) {
          const raw = buf.slice(0, at);
          buf = buf.slice(at + 2);
          this.#message(raw);
        }
      }
      this.#closed(this.ended?.code ?? 1006, this.ended?.reason ?? 'the event stream ended');
    } catch (e) {
      this.#closed(1006, String(e));
    }
  }

  #message(raw) {
    let event = 'message';
    const data = [];
    for (const line of raw.split('\n')) {
      if (line.startsWith('data:')) data.push(line.slice(line[5] === ' ' ? 6 : 5));
      else if (line.startsWith('event:')) event = line.slice(6).trim();
    }
    if (data.length === 0) return; // a keep-alive comment
    const text = data.join('\n');
    if (event === 'close') {
      try {
        this.ended = JSON.parse(text);
      } catch {}
      return;
    }
    if (this.readyState === 0) {
      try {
        this.session = JSON.parse(text).session ?? null;
      } catch {}
      this.readyState = 1;
      this.onopen?.();
    }
    this.onmessage?.({ data: text });
  }

  /** Sends one message (POSTs go one at a time, so order holds). */
  send(text) {
    const base = new URL(this.url);
    base.search = '';
    const url = `${base.toString().replace(/\/$/, '')}/${this.session}`;
    this.sending = this.sending.then(async () => {
      for (let tries = 0; tries < 30 && this.readyState === 1; tries++) {
        let res;
        try {
          res = await this.fetch(url, { method: 'POST', body: text, headers: { 'content-type': 'text/plain' } });
        } catch {
          return; // the stream's end reports the drop
        }
        // 429: too much in flight for this session; 503: the server is
        // moving to a new process (a takeover), which will take it. Wait,
        // then resend.
        if (res.status !== 429 && res.status !== 503) {
          if (res.status === 404) this.close(4404, 'session ended');
          return;
        }
        await new Promise((r) => setTimeout(r, 100 * (tries + 1)));
      }
    });
  }

  close(code = 1000, reason = 'client closed') {
    this.ended ??= { code, reason };
    this.abort.abort();
    this.#closed(code, reason);
  }

  #closed(code, reason) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
}

/**
 * What a handler learns besides a push's data: its topic's position
 * (topics with history) and its publisher's user (`topic.message` from a
 * signed-in client); undefined when the push carries none of these.
 */
function pushMeta(msg) {
  let meta;
  for (const k of ['topic', 'offset', 'epoch', 'user']) {
    if (msg[k] !== undefined) (meta ??= {})[k] = msg[k];
  }
  return meta;
}

const NO_WEBSOCKET_FIX = 'Node 20 needs --experimental-websocket (Node 22+ has one), or pass options.WebSocket';
/** The warning when the platform has no WebSocket and SSE stands in. */
const NO_WEBSOCKET = `no WebSocket in this runtime (${NO_WEBSOCKET_FIX}); using SSE`;
/** The warning is printed once per process, however many clients. */
let warnedNoWebSocket = false;

/** The close code of a server that goes away on purpose (a draining node). */
const SERVICE_RESTART = 1012;

/**
 * The reconnect delay a draining server suggests in its close: code 1012
 * with a JSON reason `{"reconnect_ms": N}`, N a finite number >= 0 (each
 * connection is told its own, drawn at random, so that they do not all
 * come back at once); capped at `maxMs`. null for any other close, and
 * for a reason that is not such JSON (the backoff applies then).
 * @param {number} code
 * @param {unknown} reason
 * @param {number} maxMs
 * @returns {number | null}
 */
function suggestedDelay(code, reason, maxMs) {
  if (code !== SERVICE_RESTART || typeof reason !== 'string') return null;
  let ms;
  try {
    ms = JSON.parse(reason)?.reconnect_ms;
  } catch {
    return null;
  }
  if (typeof ms !== 'number' || !Number.isFinite(ms) || ms < 0) return null;
  return Math.max(0, Math.min(ms, maxMs));
}

/**
 * Closes a connection the client no longer uses: its handlers first, so
 * that nothing it still reports reaches the client.
 */
function discard(ws, code, reason) {
  ws.onopen = ws.onmessage = ws.onclose = null;
  ws.onerror = () => {};
  try {
    ws.close(code, reason);
  } catch {}
}

/** Connection states, as reported to `onState`. */
export const State = Object.freeze({
  CONNECTING: 'connecting',
  OPEN: 'open',
  RECONNECTING: 'reconnecting',
  CLOSED: 'closed',
});

export class GaleClient {
  /**
   * A reconnect a draining server asked for is under way: `attempt` is
   * back at 0, yet the next open is a reconnect, not a first connect.
   */
  #resuming = false;

  /**
   * After a reconnect, what waited is held back until the renewed
   * subscriptions are answered: the server runs a connection's events
   * concurrently, so sending them first is not enough for a publish that
   * needs its subscription. The hold of the current connection, if any.
   */
  #hold = null;

  /** For the next `request`: where to note the connection it goes out on. */
  #sent = null;

  /** The timer of the next probe of the preferred transport. */
  #probeTimer = null;

  /** A probe under way: {ws, timer}. */
  #probe = null;

  /** The delay before the next probe (jittered), doubled by each failure. */
  #upgradeDelay = 0;

  /**
   * The connection left behind by a move, kept open until the requests
   * sent on it are answered and the subscriptions are renewed on the new
   * one (see `#move` for its fields).
   */
  #draining = null;

  /** The timer of a moved connection's probation (see PROBATION_MS). */
  #probation = null;

  /**
   * @param {string} url ws:// or wss:// URL of gale's /ws
   * @param {object} [options]
   * @param {string} [options.token] a JWT, sent as ?token=… (browsers
   *   cannot set headers on a WebSocket)
   * @param {number} [options.timeoutMs] default per-request timeout
   * @param {number} [options.maxQueue] requests held while disconnected;
   *   past this a request fails at once with code "queue_full"
   * @param {boolean} [options.reconnect] reconnect after a drop (default true)
   * @param {number} [options.minDelayMs] first reconnect delay
   * @param {number} [options.maxDelayMs] largest reconnect delay, a
   *   draining server's suggestion included (see `onState`)
   * @param {typeof WebSocket} [options.WebSocket] a WebSocket class to use
   * @param {string[]} [options.transports] in the order tried:
   *   "websocket", "sse" (default both; the first that opens is kept)
   * @param {string} [options.sseUrl] gale's /sse URL (default: `url` with
   *   http(s) and /sse in place of ws(s) and /ws)
   * @param {boolean} [options.upgrade] on a fallback transport, try the
   *   first one again now and then, and move to it once it opens
   *   (default true)
   * @param {number} [options.upgradeDelayMs] the wait before the first
   *   such try (5,000; jittered), doubled after each that fails
   * @param {number} [options.maxUpgradeDelayMs] the largest wait between
   *   tries (300,000)
   */
  constructor(url, options = {}) {
    // An option given as undefined keeps its default.
    this.options = { ...DEFAULTS };
    for (const [k, v] of Object.entries(options)) if (v !== undefined) this.options[k] = v;
    for (const k of ['upgradeDelayMs', 'maxUpgradeDelayMs']) {
      const v = this.options[k];
      if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) {
        throw new Error(`options.${k}: a number of milliseconds above 0, not ${String(v)}`);
      }
    }
    this.#upgradeDelay = this.options.upgradeDelayMs;
    const u = new URL(url);
    if (this.options.token) u.searchParams.set('token', this.options.token);
    this.url = u.toString();
    const sse = new URL(this.options.sseUrl ?? u.toString());
    if (!this.options.sseUrl) {
      sse.protocol = u.protocol === 'wss:' ? 'https:' : 'http:';
      sse.pathname = u.pathname.replace(/\/ws$/, '') + '/sse';
    }
    if (this.options.token) sse.searchParams.set('token', this.options.token);
    this.sseUrl = sse.toString();
    this.transports = this.options.transports.filter((t) => t === 'websocket' || t === 'sse');
    if (this.transports.length === 0) throw new Error('options.transports: name "websocket" and/or "sse"');
    this.WebSocket = this.options.WebSocket ?? globalThis.WebSocket;
    /**
     * Why the client does not work as asked, when it works all the same
     * (no WebSocket in this runtime: SSE only); null otherwise. Also in
     * `onState`'s `info.warning`.
     * @type {string | null}
     */
    this.warning = null;
    if (!this.WebSocket && this.transports.includes('websocket')) {
      if (!this.transports.includes('sse')) {
        throw new Error(`no WebSocket in this runtime: ${NO_WEBSOCKET_FIX}`);
      }
      this.transports = ['sse'];
      this.warning = NO_WEBSOCKET;
      if (!warnedNoWebSocket) {
        warnedNoWebSocket = true;
        console.warn(`@gale/client: ${NO_WEBSOCKET}`);
      }
    }
    /** The transport of the current (or last) connection. */
    this.transport = null;
    /** Index in `transports` of the one to try next. */
    this.tryIndex = 0;
    /**
     * Last known position per topic with history: topic → {offset, epoch}.
     * @type {Map<string, {offset: number, epoch: string}>}
     */
    this.positions = new Map();
    /** @type {Map<string, string>} weather city → its topic */
    this.cityTopics = new Map();
    /** @type {Map<string, any[]>} pushes that overtook a recovering subscribe */
    this.held = new Map();
    /** @type {WebSocket | null} */
    this.ws = null;
    this.state = State.CLOSED;
    this.clientId = null;
    this.nextRef = 1;
    /** @type {Map<string, {resolve: Function, reject: Function, timer: any}>} */
    this.pending = new Map();
    /** @type {{ref: string, text: string}[]} requests waiting for the socket to open */
    this.queue = [];
    /** @type {Map<string, Set<Function>>} */
    this.handlers = new Map();
    /** @type {Set<Function>} */
    this.stateHandlers = new Set();
    /** @type {Set<string>} cities with weather.update pushes */
    this.cities = new Set();
    /** @type {Set<string>} */
    this.topics = new Set();
    /**
     * Subscription tokens per topic, as `subscribeTopic` was given them:
     * a string, or a function asked again for every resubscribe.
     * @type {Map<string, string | ((topic: string) => string | Promise<string>)>}
     */
    this.topicTokens = new Map();
    this.attempt = 0;
    this.reconnectTimer = null;
    this.stopped = true;
    /** Details of the last close: {code, reason}. */
    this.lastClose = null;
  }

  /**
   * Opens the connection; resolves once it is open (and keeps
   * reconnecting after drops until `close()`).
   * @returns {Promise<void>}
   */
  connect() {
    this.stopped = false;
    return new Promise((resolve, reject) => {
      const off = this.onState((state, info) => {
        if (state === State.OPEN) {
          off();
          resolve();
        } else if (state === State.CLOSED) {
          off();
          reject(new GaleError('closed', `connection closed (${info?.code ?? 'no code'})`));
        }
      });
      this.#open();
    });
  }

  /**
   * Sends an event and resolves with the reply's `data`, or rejects with a
   * GaleError carrying the server's code (or "timeout", "disconnected",
   * "queue_full", "closed").
   * @param {string} event
   * @param {unknown} [data]
   * @param {{timeoutMs?: number}} [opts]
   * @returns {Promise<any>}
   */
  request(event, data, opts = {}) {
    const sent = this.#sent ?? {};
    this.#sent = null;
    return this.#request(event, data, opts, sent);
  }

  /**
   * `request`, with `sent.via` set to the connection the request goes
   * out on, once it does.
   */
  #request(event, data, opts, sent) {
    if (this.stopped) return Promise.reject(new GaleError('closed', 'the client is closed'));
    const ref = String(this.nextRef++);
    const message = { event, ref };
    if (data !== undefined) message.data = data;
    const text = JSON.stringify(message);
    if ((this.state !== State.OPEN || this.#hold) && this.queue.length >= this.options.maxQueue) {
      const why = this.state === State.OPEN ? 'subscriptions are being renewed' : 'not connected';
      return Promise.reject(new GaleError('queue_full', `${why} and ${this.options.maxQueue} requests already wait`));
    }
    return new Promise((resolve, reject) => {
      const timeoutMs = opts.timeoutMs ?? this.options.timeoutMs;
      const timer = setTimeout(() => {
        this.pending.delete(ref);
        this.queue = this.queue.filter((q) => q.ref !== ref);
        reject(new GaleError('timeout', `${event}: no reply within ${timeoutMs} ms`));
        if (this.#draining) this.#settleDrain(this.#draining);
      }, timeoutMs);
      this.pending.set(ref, { resolve, reject, timer, sent });
      this.#send(ref, text);
    });
  }

  /**
   * Calls `handler(data, event, meta)` for every push of `event` ("*"
   * for all); `meta` has the push's `topic` (any topic push), with
   * `offset` and `epoch` on a topic with history,
   * plus `user` when the push names its publisher (`topic.message` from a
   * signed-in client), undefined when the push has none of these. Client
   * events: `gale.recovered` ({topic, count}) after a
   * resubscribe delivered what was missed, `gale.recovery_failed` ({topic,
   * from, to}) when it could not (resync from your source of truth),
   * `gale.gap` ({topic, from, to}) when a push skipped offsets (the
   * topic is then subscribed again from `from` to fill them),
   * `gale.resubscribe_failed`.
   * @param {string} event
   * @param {(data: any, event: string, meta?: {topic?: string, offset?: number, epoch?: string, user?: string}) => void} handler
   * @returns {() => void} removes the handler
   */
  on(event, handler) {
    let set = this.handlers.get(event);
    if (!set) this.handlers.set(event, (set = new Set()));
    set.add(handler);
    return () => set.delete(handler);
  }

  /**
   * Calls `handler(state, info)` on every change of connection state.
   * `info` has `delayMs` when reconnecting, `code` and `reason` when closed,
   * `transport` when connecting or open, and `warning` when the client
   * works other than asked (no WebSocket in this runtime: SSE only).
   *
   * A draining server (a node going away) closes with code 1012 and a
   * reason `{"reconnect_ms": N}`: the client then waits N ms (at most
   * `maxDelayMs`) instead of its backoff, which starts again from
   * `minDelayMs` afterwards, and reports `reconnecting` with `{delayMs: N,
   * suggested: true, code: 1012, reason}`. A 1012 whose reason is not
   * such JSON gets the usual backoff. Subscriptions are renewed from their
   * last position on the node the client lands on, as after any drop.
   * @param {(state: string, info?: any) => void} handler
   * @returns {() => void}
   */
  onState(handler) {
    this.stateHandlers.add(handler);
    return () => this.stateHandlers.delete(handler);
  }

  /** The weather now for `city`. */
  weather(city, opts) {
    return this.request('weather.get', { city }, opts);
  }

  /**
   * Subscribes to `weather.update` pushes for `city`; resolves with the
   * current reading. Renewed after every reconnect.
   */
  async subscribe(city, opts) {
    const sent = {};
    const reading = await this.#subscribeAt('weather.subscribe', { city }, opts, undefined, sent);
    this.cities.add(city);
    this.#renewIfMoved(sent.via, 'weather.subscribe', { city });
    return reading;
  }

  async unsubscribe(city, opts) {
    this.cities.delete(city);
    const topic = this.cityTopics.get(city);
    if (topic) this.positions.delete(topic);
    return this.request('weather.unsubscribe', { city }, opts);
  }

  /**
   * Subscribes to a topic's pushes; renewed after every reconnect, from
   * the last position seen when the topic keeps history, so what was
   * published meanwhile is delivered (or `gale.recovery_failed` says it
   * could not be).
   *
   * `opts.token`: a subscription token, for topics with `subscribe =
   * "token"`: a string, or a function `(topic) => token` (it may return a
   * promise), called for this subscribe and again for every resubscribe
   * (after a reconnect, or to fill a gap), so a short-lived token is
   * fresh each time. A function that throws, returns no string or takes
   * longer than the timeout fails the subscribe with code "token_error".
   * @param {string} topic
   * @param {{timeoutMs?: number, token?: string | ((topic: string) => string | Promise<string>)}} [opts]
   */
  async subscribeTopic(topic, opts = {}) {
    const sent = {};
    const r = await this.#subscribeAt('topic.subscribe', { topic }, opts, opts.token, sent);
    this.topics.add(topic);
    if (opts.token !== undefined) this.topicTokens.set(topic, opts.token);
    else this.topicTokens.delete(topic);
    this.#renewIfMoved(sent.via, 'topic.subscribe', { topic }, opts.token);
    return r;
  }

  /**
   * A subscribe answered on a connection a move has left since it was
   * sent: the subscription lives on that one only (the move renewed what
   * was subscribed before it), so it is made on the connection too.
   */
  #renewIfMoved(via, event, data, token) {
    if (!via || via === this.ws || !this.ws || this.stopped) return;
    const drain = this.#draining;
    if (!drain || via !== drain.ws) {
      this.#renew(event, data, token);
      return;
    }
    // Mid-move: made once the move is done; not at all if it is called off
    // (the subscription is on the connection the client stays on).
    if (drain.renewed) this.#renewLate(drain, [event, data, token]);
    else drain.late.push([event, data, token]);
  }

  /**
   * A subscribe made on the new connection of a move, after the move's
   * own renewals: until it is answered, the old connection (kept open
   * for it) delivers the topic's pushes.
   */
  #renewLate(drain, [event, data, token]) {
    const topic = this.#topicOf(data);
    if (topic) drain.waiting.add(topic);
    drain.running++;
    this.#renew(event, data, token).then(() => {
      if (topic) drain.waiting.delete(topic);
      drain.running--;
      this.#settleDrain(drain);
    });
  }

  async unsubscribeTopic(topic, opts) {
    this.topics.delete(topic);
    this.topicTokens.delete(topic);
    this.positions.delete(topic);
    return this.request('topic.unsubscribe', { topic }, opts);
  }

  /**
   * Publishes `data` on `topic` (`topic.publish`), as the topic's rules
   * allow (`publish = "subscribers"`, `"users"`, or the backend decides);
   * its subscribers get a `topic.message` push naming the publisher's
   * user. Resolves with `{topic, accepted: true}`; rejects with a
   * GaleError, `permission_denied` when the topic does not take it.
   * @param {string} topic
   * @param {unknown} data
   * @param {{timeoutMs?: number}} [opts]
   */
  publish(topic, data, opts) {
    return this.request('topic.publish', { topic, data }, opts);
  }

  /**
   * Who is subscribed to `topic` (`topic.presence`), on every node: for
   * a subscriber of a topic with `presence = true` (else
   * `permission_denied`). Resolves with `{topic, clients: [{client, user,
   * info}], count, users}` (`users`: distinct signed-in users).
   * @param {string} topic
   * @param {{timeoutMs?: number}} [opts]
   */
  presence(topic, opts) {
    return this.request('topic.presence', { topic }, opts);
  }

  /**
   * Calls an event the server forwards to the application's backend
   * (`[proxy] rpc_events`): the same as `request`, named for what it is.
   * Resolves with the backend's `result`; a refusal by the backend
   * rejects with a GaleError whose `code` (a string) and `appCode` (as
   * the backend gave it: a string or a number) are the backend's code.
   * @param {string} event
   * @param {unknown} [data]
   * @param {{timeoutMs?: number}} [opts]
   * @returns {Promise<any>}
   */
  rpc(event, data, opts) {
    return this.request(event, data, opts);
  }

  /**
   * Calls `handler({topic, client, user, info})` when a client joins
   * `topic` (`topic.join` pushes, on topics with `join_leave = true`, to
   * their subscribers; your own subscribe included).
   * @param {string} topic
   * @param {(who: {topic: string, client: string, user: string | null, info: any}) => void} handler
   * @returns {() => void} removes the handler
   */
  onJoin(topic, handler) {
    return this.on('topic.join', (data) => {
      if (data?.topic === topic) handler(data);
    });
  }

  /**
   * Calls `handler({topic, client, user, info})` when a client leaves
   * `topic` (unsubscribed or disconnected: `topic.leave`).
   * @param {string} topic
   * @param {(who: {topic: string, client: string, user: string | null, info: any}) => void} handler
   * @returns {() => void} removes the handler
   */
  onLeave(topic, handler) {
    return this.on('topic.leave', (data) => {
      if (data?.topic === topic) handler(data);
    });
  }

  /**
   * The token `source` gives for `topic`: a string as is, a function's
   * answer (a promise when it is asynchronous), undefined without one.
   * Throws (or rejects) with a GaleError "token_error".
   * @returns {string | undefined | Promise<string>}
   */
  #token(topic, source, timeoutMs) {
    if (source === undefined || typeof source === 'string') return source;
    const fail = (why, cause) => {
      const e = new GaleError('token_error', `subscription token for ${topic}: ${why}`);
      if (cause !== undefined) e.cause = cause;
      return e;
    };
    const check = (t) => {
      if (typeof t !== 'string' || t === '') throw fail(`the function gave ${t === '' ? 'an empty string' : typeof t}, not a token`);
      return t;
    };
    let t;
    try {
      t = source(topic);
    } catch (e) {
      throw fail(String(e?.message ?? e), e);
    }
    if (typeof t?.then !== 'function') return check(t);
    const ms = timeoutMs ?? this.options.timeoutMs;
    let timer;
    const late = new Promise((_, reject) => {
      timer = setTimeout(() => reject(fail(`no token within ${ms} ms`)), ms);
    });
    return Promise.race([
      Promise.resolve(t).then(check, (e) => {
        throw e instanceof GaleError ? e : fail(String(e?.message ?? e), e);
      }),
      late,
    ]).finally(() => clearTimeout(timer));
  }

  /** The topic a subscribe is about: known for topics, learnt for cities. */
  #topicOf(data) {
    return data.topic ?? this.cityTopics.get(data.city) ?? null;
  }

  /**
   * A subscribe that asks to recover from the last known position, holds
   * the pushes that overtake its reply, then delivers what was missed and
   * what was held, in order, without duplicates. `token`: the topic's
   * subscription token, or its source (see `subscribeTopic`). `sent.via`
   * is set to the connection the subscribe went out on.
   */
  async #subscribeAt(event, data, opts, token, sent = {}) {
    const topic = this.#topicOf(data);
    const at = topic ? this.positions.get(topic) : undefined;
    const ask = at ? { ...data, since: { offset: at.offset, epoch: at.epoch } } : { ...data };
    if (topic) this.held.set(topic, []);
    let reply;
    try {
      // A string, or a synchronous function's answer, is sent at once: no
      // await, so the subscribe keeps its place among what is sent.
      let t = this.#token(data.topic, token, opts?.timeoutMs);
      if (typeof t === 'object') t = await t;
      if (t !== undefined) ask.token = t;
      // Through `request`, which an application may wrap (the page counts
      // its own messages so); `sent` rides along in a field.
      this.#sent = sent;
      reply = await this.request(event, ask, opts);
    } catch (e) {
      if (topic) this.#release(topic);
      throw e;
    }
    const t = reply?.topic ?? topic;
    if (data.city !== undefined && reply?.topic) this.cityTopics.set(data.city, reply.topic);
    if (t && typeof reply?.epoch === 'string') {
      if (at && reply.recovered === true) {
        // What was missed, in order; then what overtook the reply, less
        // what the recovery already gave.
        const missed = reply.publications ?? [];
        for (const p of missed) this.#deliver(p);
        if (missed.length > 0) this.#emit('gale.recovered', { topic: t, count: missed.length });
      } else {
        if (at && reply.recovered === false) {
          this.#emit('gale.recovery_failed', { topic: t, from: at, to: { offset: reply.offset, epoch: reply.epoch } });
        }
        // A fresh position: every push that overtook the reply is new.
        this.positions.delete(t);
      }
      this.#release(t);
      if (t !== topic && topic) this.#release(topic);
      const now = this.positions.get(t);
      if (!now || now.epoch !== reply.epoch || now.offset < reply.offset) {
        this.positions.set(t, { offset: reply.offset, epoch: reply.epoch });
      }
    } else {
      if (topic) this.#release(topic);
      if (t && t !== topic) this.#release(t);
    }
    return reply;
  }

  /**
   * Resubscribes to `msg.topic` from its last position, holding `msg`
   * until the missing pushes came; false when the topic is not one this
   * client subscribed to (nothing to refill from).
   */
  #refill(msg) {
    const topic = msg.topic;
    let sub = null;
    if (this.topics.has(topic)) sub = ['topic.subscribe', { topic }, this.topicTokens.get(topic)];
    else {
      for (const [city, t] of this.cityTopics) {
        if (t === topic && this.cities.has(city)) sub = ['weather.subscribe', { city }];
      }
    }
    if (!sub) return false;
    this.#emit('gale.gap', { topic, from: this.positions.get(topic)?.offset, to: msg.offset });
    // Holds the topic's pushes synchronously, before its first await.
    this.#subscribeAt(sub[0], sub[1], undefined, sub[2]).catch((e) => {
      this.#emit('gale.resubscribe_failed', { event: sub[0], data: sub[1], code: e.code, message: e.message });
    });
    this.held.get(topic)?.push(msg);
    return true;
  }

  /** Delivers the pushes held for `topic` while its subscribe ran. */
  #release(topic) {
    const held = this.held.get(topic);
    this.held.delete(topic);
    for (const m of held ?? []) this.#push(m);
  }

  /** A push: held while its topic's subscribe runs, else delivered. */
  #push(msg) {
    const held = typeof msg.topic === 'string' ? this.held.get(msg.topic) : undefined;
    if (held) held.push(msg);
    else this.#deliver(msg);
  }

  /**
   * Emits a push, unless its position was delivered already. Only pushes
   * with a `topic` and an `offset` take part in this: `topic.join` and
   * `topic.leave` (no offset, never in a topic's history) are emitted as
   * they come and leave positions alone. A push past
   * the next offset means some were lost on the way (the server dropped
   * them for a slow reader, a cross-node message was lost): the topic is
   * subscribed again from the last position, which delivers the missing
   * ones first.
   */
  #deliver(msg) {
    if (typeof msg.topic === 'string' && typeof msg.offset === 'number') {
      const at = this.positions.get(msg.topic);
      if (at && at.epoch === msg.epoch && msg.offset <= at.offset) return; // a duplicate
      if (at && at.epoch === msg.epoch && msg.offset > at.offset + 1 && this.#refill(msg)) return;
      this.positions.set(msg.topic, { offset: msg.offset, epoch: msg.epoch });
    }
    this.#emit(msg.event, msg.data, pushMeta(msg));
  }

  /** Closes for good: no reconnect; waiting requests fail with "closed". */
  close(code = 1000, reason = 'client closed') {
    this.stopped = true;
    clearTimeout(this.reconnectTimer);
    this.#failAll('closed', 'the client was closed');
    this.queue = [];
    this.#cancelProbe();
    if (this.#draining) this.#endDrain(this.#draining);
    this.#endProbation();
    if (this.ws && this.ws.readyState <= 1) this.ws.close(code, reason);
    else this.#setState(State.CLOSED, { code, reason });
  }

  #setState(state, info) {
    this.state = state;
    if (this.warning) info = { ...info, warning: this.warning };
    for (const h of [...this.stateHandlers]) {
      try {
        h(state, info);
      } catch (e) {
        queueMicrotask(() => { throw e; });
      }
    }
  }

  /** A new connection over `transport`: a WebSocket, or gale's SSE. */
  #create(transport) {
    return transport === 'sse' ? new SseTransport(this.sseUrl) : new this.WebSocket(this.url);
  }

  #open() {
    if (this.stopped) return;
    const transport = this.transports[this.tryIndex % this.transports.length];
    this.transport = transport;
    const first = this.attempt === 0 && !this.#resuming;
    this.#setState(first ? State.CONNECTING : State.RECONNECTING, { delayMs: 0, transport });
    let ws;
    try {
      ws = this.#create(transport);
    } catch (e) {
      this.#dropped(1006, String(e), false);
      return;
    }
    this.ws = ws;
    const conn = { opened: false };
    ws.onopen = () => {
      conn.opened = true;
      this.attempt = 0;
      this.#resuming = false;
      this.#opened(ws, transport, { transport });
    };
    this.#watch(ws, conn);
  }

  /** The current connection's messages, close and errors. */
  #watch(ws, conn) {
    ws.onmessage = (ev) => this.#receive(ev.data);
    ws.onclose = (ev) => {
      if (this.ws === ws) this.#dropped(ev.code, ev.reason, conn.opened);
    };
    ws.onerror = () => {
      // Once open, a close event follows with the details. Before, some
      // runtimes (Node 20's WebSocket on a refused upgrade) fire no close:
      // the attempt has failed either way.
      if (!conn.opened && this.ws === ws) {
        this.#dropped(1006, 'could not connect', false);
        try {
          ws.close();
        } catch {}
      }
    };
  }

  /**
   * The connection `ws` is open: renews the subscriptions, then sends
   * what waited; requests made meanwhile wait behind the renewals, so
   * that none runs ahead of its subscription (the server runs a
   * connection's events concurrently). Resolves, once the renewals are
   * answered, with those that failed (empty: all renewed; null: `ws`
   * dropped first).
   * `move`: a move to `ws` is under way. It is not announced here, the
   * failures are not reported (the move decides), and what waits is left
   * for the move to send.
   * @returns {Promise<{event: string, data: any, code: string, message?: string}[] | null>}
   */
  #opened(ws, transport, info, move = false) {
    // Token functions are asked first, while requests still queue, so
    // that the subscriptions are renewed before anything else is sent.
    // What is subscribed now is renewed: a subscribe answered while the
    // tokens are asked for was made on a connection the client keeps, or
    // is made again on this one by `#renewIfMoved`.
    const cities = [...this.cities];
    const tokens = new Map();
    const asked = [];
    for (const topic of this.topics) {
      let t;
      try {
        t = this.#token(topic, this.topicTokens.get(topic));
      } catch (e) {
        t = e;
      }
      if (t instanceof Promise) asked.push(t.then((v) => tokens.set(topic, v), (e) => tokens.set(topic, e)));
      else tokens.set(topic, t);
    }
    const ready = () => {
      if (this.ws !== ws || this.stopped) return null; // dropped meanwhile
      const held = this.#hold;
      this.#hold = null;
      // Open from here on, so that the renewals go out; handlers hear of
      // it once they are sent and what waits is held behind them.
      this.state = State.OPEN;
      // Renewals first, sent here at once (their tokens are in hand).
      const renewals = [];
      for (const city of cities) renewals.push(this.#renew('weather.subscribe', { city }, undefined, move));
      for (const [topic, token] of tokens) renewals.push(this.#renew('topic.subscribe', { topic }, token, move));
      const failures = Promise.all(renewals).then((all) => all.filter((f) => f !== null));
      if (move) {
        this.#hold = held;
        return failures;
      }
      if (renewals.length === 0) {
        this.#flush(ws);
        this.#announce(ws, transport, info);
        return failures;
      }
      const hold = {};
      this.#hold = hold;
      this.#announce(ws, transport, info);
      return failures.then((failed) => {
        if (this.#hold !== hold) return failed; // dropped and reopened meanwhile
        this.#hold = null;
        if (this.ws === ws) this.#flush(ws);
        return failed;
      });
    };
    return asked.length === 0 ? Promise.resolve(ready()) : Promise.all(asked).then(ready);
  }

  /** Reports `ws` open (unless a handler of an earlier state dropped it). */
  #announce(ws, transport, info) {
    if (this.ws !== ws || this.stopped) return;
    this.#setState(State.OPEN, info);
    if (transport !== this.transports[0]) this.#scheduleProbe();
  }

  /**
   * On a fallback transport: the first one is tried again after a
   * jittered wait, which doubles after every try that fails.
   */
  #scheduleProbe() {
    if (!this.options.upgrade || this.#probe || this.#probeTimer) return;
    const preferred = this.transports[0];
    if (preferred === 'websocket' && !this.WebSocket) return;
    const d = this.#upgradeDelay;
    this.#probeTimer = setTimeout(() => {
      this.#probeTimer = null;
      this.#startProbe(preferred);
    }, Math.round(d / 2 + Math.random() * (d / 2)));
  }

  /** Opens a trial connection over `transport`; moves to it if it opens. */
  #startProbe(transport) {
    const current = this.ws;
    if (this.stopped || this.state !== State.OPEN || !current || this.transport === transport) return;
    let ws;
    try {
      ws = this.#create(transport);
    } catch {
      this.#probeFailed();
      return;
    }
    const failed = () => {
      if (this.#probe !== probe) return;
      this.#cancelProbe();
      this.#probeFailed();
    };
    // As long as a request may take: a trial that hangs counts as failed.
    const timer = setTimeout(failed, this.options.timeoutMs);
    const probe = { ws, timer };
    this.#probe = probe;
    ws.onerror = failed;
    ws.onclose = failed;
    ws.onopen = () => {
      if (this.#probe !== probe) return;
      clearTimeout(timer);
      this.#probe = null;
      if (this.stopped || this.ws !== current || this.state !== State.OPEN) {
        discard(ws);
        return;
      }
      this.#move(ws, transport);
    };
  }

  /** The next probe waits twice as long (up to `maxUpgradeDelayMs`). */
  #probeFailed() {
    this.#doubleUpgradeDelay();
    if (!this.stopped && this.state === State.OPEN) this.#scheduleProbe();
  }

  /** After a failed way back: the next try waits twice as long, up to the cap. */
  #doubleUpgradeDelay() {
    this.#upgradeDelay = Math.min(this.#upgradeDelay * 2, this.options.maxUpgradeDelayMs);
  }

  /** Stops a probe that waits or runs; its connection is closed unused. */
  #cancelProbe() {
    clearTimeout(this.#probeTimer);
    this.#probeTimer = null;
    const probe = this.#probe;
    if (!probe) return;
    this.#probe = null;
    clearTimeout(probe.timer);
    discard(probe.ws);
  }

  /**
   * Moves to `ws`, a trial connection that opened: it becomes the
   * connection, the subscriptions are renewed on it from their last
   * position (what waits is held back until they are answered), and the
   * old one stays open until the requests sent on it are answered and the
   * renewals are (at most `timeoutMs`). A renewal that fails for a
   * passing reason (a timeout, a limit, a token that could not be had)
   * calls the move off: the old connection stays, as it was.
   */
  #move(ws, transport) {
    const old = this.ws;
    const drain = {
      ws: old,
      transport: this.transport,
      inflight: new Set(this.#unanswered()),
      renewed: false,
      timer: null,
      clientId: this.clientId,
      /** Subscribes answered on the old connection since the move began. */
      late: [],
      /** Of those, the ones made on the new connection and not yet answered. */
      running: 0,
      /** Their topics: the old connection delivers these meanwhile. */
      waiting: new Set(),
    };
    this.#draining = drain;
    old.onmessage = (ev) => this.#receive(ev.data, drain);
    old.onclose = () => this.#endDrain(drain);
    const hold = {};
    this.#hold = hold;
    this.ws = ws;
    this.transport = transport;
    this.tryIndex = this.transports.indexOf(transport);
    this.#watch(ws, { opened: true });
    this.#opened(ws, transport, undefined, true).then((failed) => {
      if (failed === null || this.ws !== ws || this.stopped) return; // dropped meanwhile
      if (this.#draining === drain && failed.some((f) => !REFUSALS.has(f.code))) {
        this.#abortMove(drain);
        return;
      }
      // Refused for good: they would be over SSE too; reported as after a
      // reconnect.
      for (const f of failed) this.#emit('gale.resubscribe_failed', f);
      clearTimeout(this.#probation);
      this.#probation = setTimeout(() => {
        this.#probation = null;
        this.#upgradeDelay = this.options.upgradeDelayMs;
      }, PROBATION_MS);
      drain.renewed = true;
      for (const late of drain.late) this.#renewLate(drain, late);
      if (this.#hold === hold) this.#hold = null;
      this.#flush(ws);
      this.#announce(ws, transport, { transport, upgraded: true, from: drain.transport });
      // What was sent on the old connection gets `timeoutMs` more.
      if (this.#draining === drain) drain.timer = setTimeout(() => this.#endDrain(drain), this.options.timeoutMs);
      this.#settleDrain(drain);
    });
  }

  /**
   * Calls a move off before it is done: the old connection is the
   * connection again, the new one is closed (what was sent on it fails
   * with "disconnected"), and the next probe waits twice as long.
   */
  #abortMove(drain) {
    const ws = this.ws;
    this.#draining = null;
    clearTimeout(drain.timer);
    if (ws) discard(ws, 1000, 'move called off');
    const sentHere = this.#unanswered().filter((ref) => !drain.inflight.has(ref));
    this.#fail(sentHere, 'disconnected', `connection lost (the move to ${this.transport} was called off)`);
    this.ws = drain.ws;
    this.transport = drain.transport;
    this.tryIndex = this.transports.indexOf(drain.transport);
    this.clientId = drain.clientId;
    this.#endProbation();
    this.#watch(drain.ws, { opened: true });
    this.#hold = null;
    this.#flush(drain.ws);
    this.#probeFailed();
  }

  /** Ends the drain once nothing sent on the old connection waits. */
  #settleDrain(drain) {
    if (this.#draining !== drain || !drain.renewed) return;
    for (const ref of drain.inflight) if (!this.pending.has(ref)) drain.inflight.delete(ref);
    if (drain.inflight.size === 0 && drain.running === 0) this.#endDrain(drain);
  }

  /**
   * Closes the connection left by a move; what was sent on it and is
   * still unanswered fails with "disconnected", as after a drop.
   */
  #endDrain(drain) {
    if (this.#draining !== drain) return;
    this.#draining = null;
    clearTimeout(drain.timer);
    this.#fail(drain.inflight, 'disconnected', `connection lost (moved from ${drain.transport} before the reply came)`);
    discard(drain.ws, 1000, 'moved');
  }

  /** A moved connection that dropped in its probation; ends it either way. */
  #endProbation() {
    const within = this.#probation !== null;
    clearTimeout(this.#probation);
    this.#probation = null;
    return within;
  }

  /**
   * A resubscribe; `token`: the topic's token, or why there is none.
   * Resolves once it is answered: null, or how it failed (reported as
   * `gale.resubscribe_failed` unless `quiet`).
   * @returns {Promise<{event: string, data: any, code: string, message?: string} | null>}
   */
  #renew(event, data, token, quiet = false) {
    const run = token instanceof Error ? Promise.reject(token) : this.#subscribeAt(event, data, undefined, token);
    return run.then(
      () => null,
      (e) => {
        const failed = { event, data, code: String(e?.code ?? 'error'), message: e?.message };
        if (!quiet) this.#emit('gale.resubscribe_failed', failed);
        return failed;
      },
    );
  }

  /** Sends what waited, in order. */
  #flush(ws) {
    const waiting = this.queue;
    this.queue = [];
    for (const q of waiting) this.#sendOn(ws, q.ref, q.text);
  }

  /** Sends request `ref` on `ws`, noting there that it went out on it. */
  #sendOn(ws, ref, text) {
    const p = this.pending.get(ref);
    if (p) p.sent.via = ws;
    ws.send(text);
  }

  #send(ref, text) {
    const ws = this.ws;
    if (this.state === State.OPEN && !this.#hold && ws && ws.readyState === 1) {
      this.#sendOn(ws, ref, text);
    } else {
      this.queue.push({ ref, text });
    }
  }

  /**
   * A message from the connection, or (`drain` given) from the one a
   * move left behind. During a move, pushes with a topic position are
   * taken from both (a duplicate is dropped by its position); others from
   * the old connection until the subscriptions are renewed on the new
   * one, then from the new one only.
   */
  #receive(raw, drain = null) {
    if (typeof raw !== 'string') return; // gale sends text only
    let msg;
    try {
      msg = JSON.parse(raw);
    } catch {
      return;
    }
    if (msg === null || typeof msg !== 'object') return;
    if (msg.reply !== undefined) {
      const p = this.pending.get(String(msg.reply));
      if (!p) return;
      this.pending.delete(String(msg.reply));
      clearTimeout(p.timer);
      if (msg.ok) p.resolve(msg.data);
      else p.reject(replyError(msg.error ?? {}));
      // Once what awaits the reply has run: a subscribe answered here may
      // still have to be made on the new connection (`#renewIfMoved`).
      if (drain) setTimeout(() => this.#settleDrain(drain), 0);
    } else if (msg.type === 'connected') {
      if (!drain) this.clientId = msg.client_id ?? null;
    } else if (typeof msg.event === 'string') {
      const positioned = typeof msg.topic === 'string' && typeof msg.offset === 'number';
      const moving = drain ?? this.#draining;
      if (!positioned && moving) {
        // Which connection a push without a position comes from.
        const fromOld = !moving.renewed || (typeof msg.topic === 'string' && moving.waiting.has(msg.topic));
        if (fromOld !== (drain !== null)) return;
      }
      this.#push(msg);
    }
  }

  #emit(event, data, position) {
    for (const key of [event, '*']) {
      for (const h of [...(this.handlers.get(key) ?? [])]) {
        try {
          h(data, event, position);
        } catch (e) {
          queueMicrotask(() => { throw e; });
        }
      }
    }
  }

  #failAll(code, message) {
    this.#fail([...this.pending.keys()], code, message);
  }

  /** Fails the requests `refs` that still wait for their reply. */
  #fail(refs, code, message) {
    for (const ref of refs) {
      const p = this.pending.get(ref);
      if (!p) continue;
      clearTimeout(p.timer);
      p.reject(new GaleError(code, message));
      this.pending.delete(ref);
    }
  }

  /** The requests sent and not yet answered (the rest wait in the queue). */
  #unanswered() {
    const queued = new Set(this.queue.map((q) => q.ref));
    return [...this.pending.keys()].filter((ref) => !queued.has(ref));
  }

  #dropped(code, reason, opened) {
    const drain = this.#draining;
    if (drain && !drain.renewed && opened && !this.stopped && drain.ws.readyState === 1) {
      // The connection a move went to dropped before the move was done,
      // while the old one still works: back to the old one.
      this.#abortMove(drain);
      return;
    }
    this.ws = null;
    this.#cancelProbe();
    if (drain) this.#endDrain(drain);
    // A connection reached by a move that breaks (no close frame: 1006)
    // within its probation: the way back is not reliable yet (a proxy that
    // lets the upgrade through, then cuts it). Back to the fallback at
    // once; the next probe waits twice as long. A server that closes on
    // purpose (a drain's 1012, a shutdown's 1001) is not that.
    const moveFailed = this.#endProbation() && opened && code === 1006;
    if (moveFailed) {
      this.#doubleUpgradeDelay();
      this.lastClose = { code, reason };
      this.#resuming = true; // a reconnect, not a first connect
    }
    // What was sent may or may not have been handled: its callers decide.
    this.#fail(this.#unanswered(), 'disconnected', `connection lost (${code}${reason ? `: ${reason}` : ''})`);
    // A transport that never opened (a proxy that refuses the upgrade):
    // the next one is tried at once; after the last, the backoff applies.
    if ((!opened || moveFailed) && !this.stopped && (!opened || this.options.reconnect)) {
      this.tryIndex++;
      if (this.tryIndex % this.transports.length !== 0) {
        this.#setState(State.RECONNECTING, { delayMs: 0, code, reason, fallback: true });
        this.reconnectTimer = setTimeout(() => this.#open(), 0);
        return;
      }
    }
    this.lastClose = { code, reason };
    if (this.stopped || !this.options.reconnect) {
      this.stopped = true;
      this.#failAll('closed', 'connection closed');
      this.queue = [];
      this.#setState(State.CLOSED, { code, reason });
      return;
    }
    // A draining server suggests when to come back (each of its clients
    // told its own delay, so that they return spread out): that wait
    // instead of the backoff, which then starts again from the bottom.
    const suggested = suggestedDelay(code, reason, this.options.maxDelayMs);
    if (suggested !== null) {
      this.attempt = 0;
      this.#resuming = true;
      this.#setState(State.RECONNECTING, { delayMs: suggested, code, reason, suggested: true });
      this.reconnectTimer = setTimeout(() => this.#open(), suggested);
      return;
    }
    const delayMs = this.backoff(this.attempt++);
    this.#setState(State.RECONNECTING, { delayMs, code, reason });
    this.reconnectTimer = setTimeout(() => this.#open(), delayMs);
  }

  /**
   * The delay before reconnect attempt `n` (0-based): exponential from
   * `minDelayMs`, capped at `maxDelayMs`, with "full jitter" so that many
   * clients dropped together do not return together. (Not used after a
   * draining server's close that suggests a delay: see `onState`.)
   * @param {number} n
   */
  backoff(n) {
    const cap = Math.min(this.options.maxDelayMs, this.options.minDelayMs * 2 ** Math.min(n, 20));
    return Math.round(cap / 2 + Math.random() * (cap / 2));
  }
}
