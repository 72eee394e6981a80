// @ts-check
/**
 * A client for gale's JSON event protocol (docs/protocol.md): requests
 * that settle with their reply, pushes by event name, weather and topic
 * subscriptions that survive reconnects, automatic reconnection with
 * exponential backoff and jitter, and a bounded queue while disconnected.
 * No dependencies: it uses the platform's WebSocket (browsers; Node 22+,
 * or Node 20 with --experimental-websocket) unless one is passed in.
 */

/** An error reply from the server, or a failure on the client's side. */
export class GaleError extends Error {
  /**
   * @param {string} code e.g. "not_found", "timeout", "disconnected"
   * @param {string} message
   * @param {string} [field] the field at fault, for "invalid_data"
   */
  constructor(code, message, field) {
    super(message);
    this.name = 'GaleError';
    this.code = code;
    if (field !== undefined) this.field = field;
  }
}

const DEFAULTS = {
  timeoutMs: 10_000,
  maxQueue: 100,
  reconnect: true,
  minDelayMs: 500,
  maxDelayMs: 30_000,
};

/** Connection states, as reported to `onState`. */
export const State = Object.freeze({
  CONNECTING: 'connecting',
  OPEN: 'open',
  RECONNECTING: 'reconnecting',
  CLOSED: 'closed',
});

export class GaleClient {
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
   * @param {number} [options.maxDelayMs] largest reconnect delay
   * @param {typeof WebSocket} [options.WebSocket] a WebSocket class to use
   */
  constructor(url, options = {}) {
    this.options = { ...DEFAULTS, ...options };
    const u = new URL(url);
    if (this.options.token) u.searchParams.set('token', this.options.token);
    this.url = u.toString();
    this.WebSocket = this.options.WebSocket ?? globalThis.WebSocket;
    if (!this.WebSocket) {
      throw new Error('no WebSocket: pass options.WebSocket, or use Node 22+ (Node 20: --experimental-websocket)');
    }
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
    if (this.stopped) return Promise.reject(new GaleError('closed', 'the client is closed'));
    const ref = String(this.nextRef++);
    const message = { event, ref };
    if (data !== undefined) message.data = data;
    const text = JSON.stringify(message);
    if (this.state !== State.OPEN && this.queue.length >= this.options.maxQueue) {
      return Promise.reject(new GaleError('queue_full', `not connected and ${this.options.maxQueue} requests already wait`));
    }
    return new Promise((resolve, reject) => {
      const timeoutMs = opts.timeoutMs ?? this.options.timeoutMs;
      const timer = setTimeout(() => {
        this.pending.delete(ref);
        this.queue = this.queue.filter((q) => q.ref !== ref);
        reject(new GaleError('timeout', `${event}: no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(ref, { resolve, reject, timer });
      this.#send(ref, text);
    });
  }

  /**
   * Calls `handler(data, event)` for every push of `event` ("*" for all).
   * @param {string} event
   * @param {(data: any, event: string) => void} handler
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
   * `info` has `delayMs` when reconnecting, `code` and `reason` when closed.
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
    const reading = await this.request('weather.subscribe', { city }, opts);
    this.cities.add(city);
    return reading;
  }

  async unsubscribe(city, opts) {
    this.cities.delete(city);
    return this.request('weather.unsubscribe', { city }, opts);
  }

  /** Subscribes to a topic's pushes; renewed after every reconnect. */
  async subscribeTopic(topic, opts) {
    const r = await this.request('topic.subscribe', { topic }, opts);
    this.topics.add(topic);
    return r;
  }

  async unsubscribeTopic(topic, opts) {
    this.topics.delete(topic);
    return this.request('topic.unsubscribe', { topic }, opts);
  }

  /** Closes for good: no reconnect; waiting requests fail with "closed". */
  close(code = 1000, reason = 'client closed') {
    this.stopped = true;
    clearTimeout(this.reconnectTimer);
    this.#failAll('closed', 'the client was closed');
    this.queue = [];
    if (this.ws && this.ws.readyState <= 1) this.ws.close(code, reason);
    else this.#setState(State.CLOSED, { code, reason });
  }

  #setState(state, info) {
    this.state = state;
    for (const h of [...this.stateHandlers]) {
      try {
        h(state, info);
      } catch (e) {
        queueMicrotask(() => { throw e; });
      }
    }
  }

  #open() {
    this.#setState(this.attempt === 0 ? State.CONNECTING : State.RECONNECTING, { delayMs: 0 });
    let ws;
    try {
      ws = new this.WebSocket(this.url);
    } catch (e) {
      this.#dropped(1006, String(e));
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      this.attempt = 0;
      this.#setState(State.OPEN);
      // Renew subscriptions first, then what waited.
      for (const city of this.cities) this.#renew('weather.subscribe', { city });
      for (const topic of this.topics) this.#renew('topic.subscribe', { topic });
      const waiting = this.queue;
      this.queue = [];
      for (const q of waiting) ws.send(q.text);
    };
    ws.onmessage = (ev) => this.#receive(ev.data);
    ws.onclose = (ev) => {
      if (this.ws === ws) this.#dropped(ev.code, ev.reason);
    };
    ws.onerror = () => {}; // a close event follows with the details
  }

  #renew(event, data) {
    this.request(event, data).catch((e) => {
      this.#emit('gale.resubscribe_failed', { event, data, code: e.code, message: e.message });
    });
  }

  #send(ref, text) {
    if (this.state === State.OPEN && this.ws && this.ws.readyState === 1) {
      this.ws.send(text);
    } else {
      this.queue.push({ ref, text });
    }
  }

  #receive(raw) {
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
      else {
        const e = msg.error ?? {};
        p.reject(new GaleError(e.code ?? 'error', e.message ?? 'request failed', e.field));
      }
    } else if (msg.type === 'connected') {
      this.clientId = msg.client_id ?? null;
    } else if (typeof msg.event === 'string') {
      this.#emit(msg.event, msg.data);
    }
  }

  #emit(event, data) {
    for (const key of [event, '*']) {
      for (const h of [...(this.handlers.get(key) ?? [])]) {
        try {
          h(data, event);
        } catch (e) {
          queueMicrotask(() => { throw e; });
        }
      }
    }
  }

  #failAll(code, message) {
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new GaleError(code, message));
    }
    this.pending.clear();
  }

  #dropped(code, reason) {
    this.ws = null;
    this.lastClose = { code, reason };
    // What was sent may or may not have been handled: its callers decide.
    const waiting = new Set(this.queue.map((q) => q.ref));
    for (const [ref, p] of this.pending) {
      if (!waiting.has(ref)) {
        clearTimeout(p.timer);
        p.reject(new GaleError('disconnected', `connection lost (${code}${reason ? `: ${reason}` : ''})`));
        this.pending.delete(ref);
      }
    }
    if (this.stopped || !this.options.reconnect) {
      this.stopped = true;
      this.#failAll('closed', 'connection closed');
      this.queue = [];
      this.#setState(State.CLOSED, { code, reason });
      return;
    }
    const delayMs = this.backoff(this.attempt++);
    this.#setState(State.RECONNECTING, { delayMs, code, reason });
    this.reconnectTimer = setTimeout(() => this.#open(), delayMs);
  }

  /**
   * The delay before reconnect attempt `n` (0-based): exponential from
   * `minDelayMs`, capped at `maxDelayMs`, with "full jitter" so that many
   * clients dropped together do not return together.
   * @param {number} n
   */
  backoff(n) {
    const cap = Math.min(this.options.maxDelayMs, this.options.minDelayMs * 2 ** Math.min(n, 20));
    return Math.round(cap / 2 + Math.random() * (cap / 2));
  }
}
