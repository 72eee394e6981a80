/** An error reply from the server, or a failure on the client's side. */
export class GaleError extends Error {
  constructor(code: string, message: string, field?: string);
  /** The server's code (`not_found`, `invalid_data`, `rate_limited`, …) or
   * the client's (`timeout`, `disconnected`, `queue_full`, `closed`). */
  readonly code: string;
  /** For `invalid_data`: the field at fault. */
  readonly field?: string;
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

export interface StateInfo {
  /** When reconnecting: the wait before the next attempt. */
  delayMs?: number;
  /** When connecting or open: the transport in use. */
  transport?: TransportName;
  /** True when a transport failed to open and the next is tried. */
  fallback?: boolean;
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
  /** Largest reconnect delay (30,000). */
  maxDelayMs?: number;
  /** A WebSocket class, where the platform has none. */
  WebSocket?: typeof WebSocket;
  /** Transports in the order tried (["websocket", "sse"]); the first
   * that opens is kept for later reconnects. */
  transports?: TransportName[];
  /** gale's /sse URL (default: the WebSocket URL with http(s), /sse). */
  sseUrl?: string;
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
  /** Pushes of `event` ("*": all). Client events: `gale.recovered`
   * ({topic, count}), `gale.recovery_failed` ({topic, from, to}),
   * `gale.gap` ({topic, from, to}: a push skipped offsets; refilled),
   * `gale.resubscribe_failed`. */
  on(event: string, handler: (data: any, event: string, position?: PushPosition) => void): () => void;
  onState(handler: (state: ConnectionState, info?: StateInfo) => void): () => void;
  weather(city: string, opts?: { timeoutMs?: number }): Promise<Reading>;
  subscribe(city: string, opts?: { timeoutMs?: number }): Promise<Reading>;
  unsubscribe(city: string, opts?: { timeoutMs?: number }): Promise<{ city: string; unsubscribed: boolean }>;
  subscribeTopic(
    topic: string,
    opts?: { timeoutMs?: number },
  ): Promise<{ topic: string; subscribed: boolean; new: boolean } & Recovery>;
  unsubscribeTopic(topic: string, opts?: { timeoutMs?: number }): Promise<{ topic: string; unsubscribed: boolean }>;
  close(code?: number, reason?: string): void;
  /** The delay before reconnect attempt `n`, with jitter. */
  backoff(n: number): number;
}
