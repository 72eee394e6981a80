/** An error reply from the server, or a failure on the client's side. */
export class GaleError extends Error {
  constructor(code: string, message: string, field?: string, appCode?: string | number);
  /** The server's code (`not_found`, `invalid_data`, `rate_limited`,
   * `permission_denied`, …), the application backend's (as a string), or
   * the client's (`timeout`, `disconnected`, `queue_full`, `closed`,
   * `token_error`). */
  readonly code: string;
  /** For `invalid_data`: the field at fault. */
  readonly field?: string;
  /** The application backend's own code, as it gave it (a string or a
   * number), when it refused (an rpc event, a proxied subscribe or
   * publish): the server marks its errors `"application": true`. */
  readonly appCode?: string | number;
}

export declare const State: {
  readonly CONNECTING: 'connecting';
  readonly OPEN: 'open';
  readonly RECONNECTING: 'reconnecting';
  readonly CLOSED: 'closed';
};
export type ConnectionState = (typeof State)[keyof typeof State];

export declare const Transport: {
  readonly WEBSOCKET: 'websocket';
  readonly SSE: 'sse';
};
export type TransportName = (typeof Transport)[keyof typeof Transport];

/** A position in a topic's history. */
export interface Position {
  offset: number;
  epoch: string;
}

/** Where a push sits in its topic's history (topics with history only). */
export interface PushPosition extends Position {
  topic: string;
}

/** What a handler learns besides a push's data: its position on a topic
 * with history, and the publisher's user on a `topic.message` from a
 * signed-in client. */
export interface PushMeta extends Partial<PushPosition> {
  /** The publisher's user (`topic.message`; absent when anonymous). */
  user?: string;
}

/** A subscription token, or a function giving one (asked again for
 * every resubscribe). */
export type TokenSource = string | ((topic: string) => string | Promise<string>);

/** A client on a topic: in `presence()`, `topic.join`, `topic.leave`. */
export interface TopicClient {
  /** Its connection's id (the other client's `clientId`). */
  client: string;
  /** Its user; null when anonymous. */
  user: string | null;
  /** Its user's public data (the token's `info`), or null. */
  info: any;
}

/** A `topic.join` or `topic.leave` push's data. */
export interface JoinLeave extends TopicClient {
  topic: string;
}

/** `presence()`: who is subscribed to a topic, on every node. */
export interface Presence {
  topic: string;
  clients: TopicClient[];
  /** How many clients. */
  count: number;
  /** How many distinct signed-in users. */
  users: number;
}

export interface StateInfo {
  /** When reconnecting: the wait before the next attempt. */
  delayMs?: number;
  /** True when `delayMs` is the wait a draining server suggested (close
   * code 1012 with reason `{"reconnect_ms": N}`), not the backoff's. */
  suggested?: boolean;
  /** When connecting or open: the transport in use. */
  transport?: TransportName;
  /** True when a transport failed to open and the next is tried, or
   * when a connection reached by an upgrade broke (1006) within its first
   * minute and the client goes back to the fallback at once. */
  fallback?: boolean;
  /** On `open`: true when the client has moved back to its first
   * transport (see `upgrade`) without a disconnect; `from` is the
   * transport it left. */
  upgraded?: boolean;
  from?: TransportName;
  /** The close code of the connection that ended. */
  code?: number;
  reason?: string;
  /** Set when the client works other than asked: no WebSocket in this
   * runtime (Node 20 without `--experimental-websocket`), so SSE only. */
  warning?: string;
}

export interface GaleOptions {
  /** A JWT, sent as `?token=…`. */
  token?: string;
  /** Default per-request timeout (10,000). */
  timeoutMs?: number;
  /** Requests held while disconnected (100); past this `queue_full`. */
  maxQueue?: number;
  /** Reconnect after a drop (true). */
  reconnect?: boolean;
  /** First reconnect delay (500). */
  minDelayMs?: number;
  /** Largest reconnect delay (30,000); also caps a draining server's
   * suggested delay. */
  maxDelayMs?: number;
  /** A WebSocket class, where the platform has none. */
  WebSocket?: typeof WebSocket;
  /** Transports in the order tried (["websocket", "sse"]); the first
   * that opens is kept for later reconnects. */
  transports?: TransportName[];
  /** gale's /sse URL (default: the WebSocket URL with http(s), /sse). */
  sseUrl?: string;
  /** On a fallback transport, try the first one again now and then and
   * move to it once it opens (true). */
  upgrade?: boolean;
  /** The wait before the first such try (5,000; jittered to half–all of
   * it), doubled after each try that fails. */
  upgradeDelayMs?: number;
  /** The largest wait between tries (300,000). */
  maxUpgradeDelayMs?: number;
}

/** What a topic or weather subscribe's reply adds on a topic with history. */
export interface Recovery {
  /** The topic (weather.subscribe: `weather:CITY`). */
  topic?: string;
  /** The topic's position now. */
  offset?: number;
  epoch?: string;
  /** When the client asked to recover: whether everything missed came. */
  recovered?: boolean;
  /** The missed pushes, in order. */
  publications?: Array<{ event: string; data: any; topic: string; offset: number; epoch: string }>;
}

/** gale's fallback transport, shaped like a WebSocket. */
export class SseTransport {
  constructor(url: string, fetchImpl?: typeof fetch);
  readonly readyState: number;
  readonly session: string | null;
  onopen: (() => void) | null;
  onmessage: ((ev: { data: string }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: (() => void) | null;
  send(text: string): void;
  close(code?: number, reason?: string): void;
}

export interface Reading extends Recovery {
  city: string;
  temperature: number;
  feels_like: number;
  description: string;
  humidity: number;
  updated_at?: string;
}

export class GaleClient {
  constructor(url: string, options?: GaleOptions);
  readonly state: ConnectionState;
  /** The server's id for this connection, from its greeting. */
  readonly clientId: string | null;
  /** How the last connection ended. */
  readonly lastClose: { code: number; reason: string } | null;
  /** The transport of the current (or last) connection. */
  readonly transport: TransportName | null;
  /** Why the client works other than asked (no WebSocket in this runtime:
   * SSE only, also printed once per process with `console.warn`), or null. */
  readonly warning: string | null;
  /** The last position seen per topic with history. */
  readonly positions: Map<string, Position>;
  connect(): Promise<void>;
  request<T = any>(event: string, data?: unknown, opts?: { timeoutMs?: number }): Promise<T>;
  /** Pushes of `event` ("*": all); `meta`: the push's position on a
   * topic with history, and its publisher's `user` (`topic.message`).
   * Client events: `gale.recovered` ({topic, count}),
   * `gale.recovery_failed` ({topic, from, to}), `gale.gap` ({topic, from,
   * to}: a push skipped offsets; refilled), `gale.resubscribe_failed`
   * ({event, data, code, message}). */
  on(event: string, handler: (data: any, event: string, meta?: PushMeta) => void): () => void;
  onState(handler: (state: ConnectionState, info?: StateInfo) => void): () => void;
  weather(city: string, opts?: { timeoutMs?: number }): Promise<Reading>;
  subscribe(city: string, opts?: { timeoutMs?: number }): Promise<Reading>;
  unsubscribe(city: string, opts?: { timeoutMs?: number }): Promise<{ city: string; unsubscribed: boolean }>;
  /** `token`: a subscription token (topics with `subscribe = "token"`),
   * or a function asked for one for this subscribe and every resubscribe. */
  subscribeTopic(
    topic: string,
    opts?: { timeoutMs?: number; token?: TokenSource },
  ): Promise<{ topic: string; subscribed: boolean; new: boolean } & Recovery>;
  unsubscribeTopic(topic: string, opts?: { timeoutMs?: number }): Promise<{ topic: string; unsubscribed: boolean }>;
  /** `topic.publish`: subscribers get a `topic.message` push with `data`
   * and the publisher's user; rejects with `permission_denied` when the
   * topic's rules do not allow it. */
  publish(topic: string, data: unknown, opts?: { timeoutMs?: number }): Promise<{ topic: string; accepted: true }>;
  /** `topic.presence`: for a subscriber of a topic with `presence = true`. */
  presence(topic: string, opts?: { timeoutMs?: number }): Promise<Presence>;
  /** An event the server forwards to the application's backend (`[proxy]
   * rpc_events`): resolves with the backend's result; its refusals reject
   * with `code` and `appCode` the backend's code. */
  rpc<T = any>(event: string, data?: unknown, opts?: { timeoutMs?: number }): Promise<T>;
  /** `topic.join` pushes for `topic` (topics with `join_leave = true`). */
  onJoin(topic: string, handler: (who: JoinLeave) => void): () => void;
  /** `topic.leave` pushes for `topic`. */
  onLeave(topic: string, handler: (who: JoinLeave) => void): () => void;
  close(code?: number, reason?: string): void;
  /** The delay before reconnect attempt `n`, with jitter. */
  backoff(n: number): number;
}
