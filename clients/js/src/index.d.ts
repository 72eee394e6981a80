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

export interface StateInfo {
  /** When reconnecting: the wait before the next attempt. */
  delayMs?: number;
  /** The close code of the connection that ended. */
  code?: number;
  reason?: string;
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
}

export interface Reading {
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
  connect(): Promise<void>;
  request<T = any>(event: string, data?: unknown, opts?: { timeoutMs?: number }): Promise<T>;
  on(event: string, handler: (data: any, event: string) => void): () => void;
  onState(handler: (state: ConnectionState, info?: StateInfo) => void): () => void;
  weather(city: string, opts?: { timeoutMs?: number }): Promise<Reading>;
  subscribe(city: string, opts?: { timeoutMs?: number }): Promise<Reading>;
  unsubscribe(city: string, opts?: { timeoutMs?: number }): Promise<{ city: string; unsubscribed: boolean }>;
  subscribeTopic(topic: string, opts?: { timeoutMs?: number }): Promise<{ topic: string; subscribed: boolean; new: boolean }>;
  unsubscribeTopic(topic: string, opts?: { timeoutMs?: number }): Promise<{ topic: string; unsubscribed: boolean }>;
  close(code?: number, reason?: string): void;
  /** The delay before reconnect attempt `n`, with jitter. */
  backoff(n: number): number;
}
