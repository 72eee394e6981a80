//! Cluster mode: one upstream call per city per TTL for the whole
//! cluster.
//!
//! A node that misses its own cache (concurrent local misses have already
//! coalesced into this one call) reads `P:w:{CITY}`, or, if no node has
//! it, takes the short lease `P:wl:{CITY}` (the lookup deadline plus a
//! second), in one Lua script, so no node can take the lease between
//! another's write and its own read. The holder calls upstream; the
//! others, finding the lease taken, poll for the result (25 ms, growing
//! to 200 ms) until the deadline. A holder that dies lets
//! its lease expire and the next waiter takes over. Whenever Redis does
//! not answer within `cluster.call_timeout_ms`, the node looks up alone
//! (counted: `gale_cluster_fallbacks_total{what="Cache"}`).

use std::sync::Arc;
use std::time::Duration;

use super::{Cached, Entry, Weather, WeatherError};
use gale_engine::cluster::{Cluster, ClusterError, Shared};
use gale_engine::metrics::Fallback;

/// How soon a waiter first looks for another node's result; each look
/// after waits half as long again, up to [`POLL_MAX`], so thousands of
/// waiters do not keep Redis busy with GETs.
const POLL: Duration = Duration::from_millis(25);
/// The longest wait between two looks.
const POLL_MAX: Duration = Duration::from_millis(200);
/// What the shared cache holds for a city the provider does not know.
const NOT_FOUND: &str = "-";

impl Weather {
    /// The single-flight body for `city` in its canonical form
    /// ([`crate::protocol::normalise_city`]: what is cached is what the
    /// provider was asked): through the cluster when there is one.
    pub(super) async fn fetch_shared(&self, city: &str) -> Result<Entry, WeatherError> {
        let Some(cluster) = &self.cluster else {
            return self.fetch(city).await.map(Entry::from);
        };
        match self.through(cluster, city).await {
            Ok(result) => result,
            Err(e) => {
                cluster.fell_back(Fallback::Cache, &e);
                self.fetch(city).await.map(Entry::from)
            }
        }
    }

    /// `Err` only when Redis failed: the caller looks up alone.
    async fn through(
        &self,
        cluster: &Cluster,
        city: &str,
    ) -> Result<Result<Entry, WeatherError>, ClusterError> {
        // One hash tag per city: the value and its lease share a slot, so
        // the script reading one and taking the other runs on one Redis
        // Cluster node.
        let tagged = Cluster::tag(city);
        let value_key = cluster.key(&["w", &tagged]);
        let lease_key = cluster.key(&["wl", &tagged]);
        let lease = self.timeout + Duration::from_secs(1);
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut waited = false;
        let mut poll = POLL;
        loop {
            match cluster.read_or_lease(&value_key, &lease_key, lease).await? {
                Shared::Value(value, ttl) => {
                    if let Some(cached) = parse_shared(&value) {
                        cluster.metrics().shared_cache_hits.inc();
                        return Ok(Ok(Entry { cached, ttl }));
                    }
                    // Not ours, or an older format: look up alone.
                    return Ok(self.fetch(city).await.map(Entry::from));
                }
                Shared::Leased => {
                    let result = self.fetch(city).await;
                    if let Ok(cached) = &result {
                        self.write_shared(cluster, &value_key, cached).await;
                    }
                    let _ = cluster.release_lease(&lease_key).await;
                    return Ok(result.map(Entry::from));
                }
                Shared::Busy => {}
            }
            if !waited {
                waited = true;
                cluster.metrics().lease_waits.inc();
            }
            if tokio::time::Instant::now() + poll >= deadline {
                return Ok(Err(WeatherError::Timeout(self.timeout.as_millis() as u64)));
            }
            tokio::time::sleep(poll).await;
            poll = (poll * 3 / 2).min(POLL_MAX);
        }
    }

    /// Stores a fresh result for the other nodes (best effort: a failure
    /// costs them one more upstream call, nothing else).
    async fn write_shared(&self, cluster: &Cluster, value_key: &str, cached: &Cached) {
        let (value, ttl) = match cached {
            Cached::Found(r) => match serde_json::to_string(&**r) {
                Ok(v) => (v, self.ttl.found),
                Err(_) => return,
            },
            Cached::NotFound => (NOT_FOUND.to_owned(), self.ttl.not_found),
        };
        if ttl.is_zero() {
            return;
        }
        if let Err(e) = cluster.put_shared(value_key, &value, ttl).await {
            cluster.fell_back(Fallback::Cache, &e);
        }
    }
}

/// A shared cache value: "-" for a city the provider does not know, else
/// a reading's JSON.
fn parse_shared(value: &str) -> Option<Cached> {
    if value == NOT_FOUND {
        return Some(Cached::NotFound);
    }
    serde_json::from_str(value)
        .ok()
        .map(|r| Cached::Found(Arc::new(r)))
}
