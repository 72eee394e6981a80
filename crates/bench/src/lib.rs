//! gale's tools for measuring and trying a server: the load generator
//! behind `gale bench` ([`mod@bench`]), the client behind `gale client`
//! ([`client`]) and a fake weather API with a fake application backend
//! ([`fake_upstream`]), for tests, demos and benchmarks.

pub mod bench;
pub mod client;
pub mod fake_upstream;
