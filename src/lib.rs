//! The `gale` binary's library: the shipped server, composed of the
//! engine ([`gale_engine`]) and the applications built on its public API
//! (weather, notes, with the request log of `gale_store`), and the
//! command line. Everything of substance lives in those crates; this one
//! only puts them together:
//!
//! - [`config`]: one `gale.toml` for all of them (the engine's sections,
//!   `[weather]`, `[store]`), as it always was.
//! - [`server`]: starts the engine with the weather and notes
//!   applications installed.
//! - [`cli`]: `gale serve`, `client`, `token`, `bench`, `fake-upstream`.
//!
//! The crates are re-exported under their old names (`gale::broadcast`,
//! `gale::weather`, `gale::bench`, …), so code and tests written against
//! the single crate keep working.

pub mod cli;
pub mod config;
pub mod server;

pub use gale_bench::{bench, client, fake_upstream};
pub use gale_engine::{
    breaker, broadcast, builtin, cluster, handle, history, hooks, http_client, identity, listener,
    metrics, outbox, protocol, router, shutdown, tls, websocket,
};
pub use gale_store as store;
pub use gale_weather as weather;
