//! gale's real-time engine: WebSocket and SSE transports, the event
//! router with its policies and worker pool, push to users, topics and
//! everyone, topic history and recovery, presence, cluster mode over
//! Redis, metrics and a clean shutdown. It knows no application: an
//! application registers its events, its plain-text handler, its routes
//! and its shutdown steps on a [`server::Builder`] and pushes through a
//! [`handle::Handle`]. The walk-through is `docs/library.md`.
//!
//! ```no_run
//! use gale_engine::config::Config;
//! use gale_engine::router::{Ctx, HandlerResult, Policy};
//! use gale_engine::server::{Builder, ServerError, bind};
//!
//! async fn echo(_ctx: Ctx, data: serde_json::Value) -> HandlerResult {
//!     Ok(data)
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), ServerError> {
//!     let config = Config::load(None)?; // defaults < GALE_* variables
//!     let listener = bind(&config.server.listen).await?;
//!     let shutdown = tokio_util::sync::CancellationToken::new();
//!     gale_engine::shutdown::cancel_on_signal(shutdown.clone());
//!     let mut builder = Builder::new(config).await?;
//!     builder.registry().register("echo", Policy::default(), echo);
//!     builder.start(listener, shutdown).await?.wait().await
//! }
//! ```
//!
//! One module per concern:
//!
//! - [`config`]: typed settings from defaults, a TOML file and the
//!   environment; an application's own sections ([`config::Sections`]).
//! - [`server`]: the [`server::Builder`], routes and the shutdown
//!   sequence.
//! - [`handle`]: push, presence and history from anywhere in the program.
//! - [`router`]: JSON events: registry, policies, worker pool.
//! - [`builtin`]: the events every server has: `topic.*`,
//!   `presence.online`, `server.stats`.
//! - [`hooks`]: the one seam where the application decides about its
//!   clients (connect, refresh, subscribe, publish), and gale's own
//!   decisions (topic rules, tokens, the backend).
//! - `channels`: who may subscribe to and publish on which topics.
//! - `proxy`: the application's backend in the loop, over HTTP.
//! - `lifecycle`: user online/offline notifications to the
//!   application's backend.
//! - [`broadcast`]: push to users, topics and everyone, and the backplane
//!   seam between nodes.
//! - [`history`]: topic history and recovery on one node.
//! - [`cluster`]: cluster mode over Redis: the backplane, presence,
//!   shared rate limits, shared values and leases.
//! - [`listener`]: accepting connections: the connection limit, the
//!   handshake deadline, HTTP/1.1.
//! - `admission`: per-address limits on handshakes and connections.
//! - `body`: request bodies: the deadline every one has, read whole
//!   within a limit.
//! - [`tls`]: serving TLS directly (`server.tls_cert`, `server.tls_key`).
//! - `transport`: a connection's stream, plain TCP or TLS.
//! - [`websocket`]: the WebSocket codec, handshake and permessage-deflate.
//! - [`identity`]: JWT at the handshake, the Origin check.
//! - [`cidr`]: address blocks (trusted proxies).
//! - `connection`: one WebSocket connection's read/reply loop.
//! - `sse`: the HTTP fallback: Server-Sent Events plus POST.
//! - [`outbox`]: a connection's bounded outbound queue.
//! - `control`: commands every node runs (the server API's operations
//!   on users' connections, presence, topics, counts).
//! - `api`: the server API, `POST /api/{method}`, for backends.
//! - [`protocol`]: the wire messages; no state.
//! - [`breaker`]: a circuit breaker for calls to the services behind.
//! - [`http_client`]: the HTTP client of calls to the services behind
//!   (an application's upstream, the application's backend).
//! - [`metrics`]: Prometheus and JSON counters; an application's own
//!   ([`metrics::Metrics::register`], [`metrics::Part`]).
//! - [`shutdown`]: signals to a cancellation token.

mod admission;
mod api;
mod body;
pub mod breaker;
pub mod broadcast;
pub mod builtin;
mod channels;
pub mod cidr;
pub mod cluster;
pub mod config;
mod connection;
mod control;
mod drain;
mod fanout;
pub mod handle;
pub mod handoff;
pub mod history;
pub mod hooks;
pub mod http_client;
pub mod identity;
mod lifecycle;
pub mod listener;
pub mod metrics;
pub mod outbox;
pub mod protocol;
mod proxy;
pub mod router;
pub mod server;
pub mod shutdown;
mod sse;
pub mod tls;
mod transport;
pub mod websocket;
