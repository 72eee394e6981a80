//! gale: a real-time WebSocket server for very many concurrent users.
//!
//! Its first application: a client sends a city name over WebSocket and
//! gets the current weather back at once, while every request is written
//! to a database in the background. One module per concern:
//!
//! - [`config`]: typed settings from defaults, a TOML file and the
//!   environment.
//! - [`server`]: routes and the shutdown sequence.
//! - [`listener`]: accepting connections: the connection limit, the
//!   handshake deadline, HTTP/1.1.
//! - [`body`]: request bodies: the deadline every one has, read whole
//!   within a limit.
//! - [`tls`]: serving TLS directly (`server.tls_cert`, `server.tls_key`).
//! - `transport`: a connection's stream, plain TCP or TLS.
//! - [`identity`]: JWT at the handshake, the Origin check.
//! - [`lifecycle`]: user online/offline notifications to the
//!   application's backend.
//! - [`hooks`]: the one seam where the application decides about its
//!   clients (connect, refresh, subscribe, publish), and gale's own
//!   decisions (topic rules, tokens, the backend).
//! - [`connection`]: one WebSocket connection's read/reply loop.
//! - [`control`]: commands every node runs (the server API's operations
//!   on users' connections, presence, topics, counts).
//! - [`protocol`]: the wire messages; no state.
//! - [`proxy`]: the application's backend in the loop, over HTTP.
//! - [`router`]: JSON events: registry, policies, worker pool.
//! - [`weather`]: providers, cache, single-flight, limits, breaker.
//! - [`breaker`]: the circuit breaker of gale's calls to those services.
//! - [`http_client`]: the HTTP client of gale's calls to the services
//!   behind it (the weather provider, the application's backend).
//! - [`apps`]: the applications on the engine: weather (with its feeds),
//!   topics, notes, stats; each registers its events on the router.
//! - [`store`]: the batched, bounded request log (SQLite/PostgreSQL).
//! - [`outbox`]: a connection's bounded outbound queue.
//! - [`api`]: `POST /api/publish` for backends.
//! - [`bench`]: `gale bench`, load scenarios that report honestly.
//! - [`channels`]: who may subscribe to and publish on which topics.
//! - [`broadcast`]: push to users, topics and everyone, and the backplane
//!   seam between nodes.
//! - [`cluster`]: cluster mode over Redis: the backplane, presence,
//!   shared rate limits, the shared weather cache and leases.
//! - [`metrics`]: Prometheus and JSON counters.
//! - [`shutdown`]: signals to a cancellation token.
//! - [`client`]: `gale client`.
//! - [`fake_upstream`]: a fake weather API for tests and demos.

pub mod admission;
pub mod api;
pub mod apps;
pub mod bench;
pub mod body;
pub mod breaker;
pub mod broadcast;
pub mod channels;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod control;
pub mod fake_upstream;
pub mod history;
pub mod hooks;
pub mod http_client;
pub mod identity;
pub mod lifecycle;
pub mod listener;
pub mod metrics;
pub mod outbox;
pub mod protocol;
pub mod proxy;
pub mod router;
pub mod server;
pub mod shutdown;
pub mod sse;
pub mod store;
pub mod tls;
mod transport;
pub mod weather;
pub mod websocket;
