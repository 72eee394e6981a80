//! Cluster mode: one upstream call per city per TTL for the whole
//! cluster.
//!
//! A node that misses its own cache (concurrent local misses have already
//! coalesced into this one call) reads `P:w:CITY`. If no node has it, the
//! node takes the short lease `P:wl:CITY` (SET NX, the lookup deadline
//! plus a second) and calls upstream; the others, finding the lease
//! taken, poll for the result until the deadline. A holder that dies lets
//! its lease expire and the next waiter takes over. Whenever Redis does
//! not answer within `cluster.call_timeout_ms`, the node looks up alone
//! (counted: `gale_cluster_fallbacks_total{what="Cache"}`).

use std::sync::Arc;
use std::time::Duration;

use super::{Cached, Entry, Weather, WeatherError};
use crate::cluster::{Cluster, ClusterError};
use crate::metrics::Fallback;

/// How often a waiter looks for another node's result.
const POLL: Duration = Duration::from_millis(25);
/// What the shared cache holds for a city the provider does not know.
const NOT_FOUND: &str = "-";

impl Weather {
    /// The single-flight body: through the cluster when there is one.
    pub(super) async fn fetch_shared(&self, city: &str, key: &str) -> Result<Entry, WeatherError> {
        let Some(cluster) = &self.cluster else {
            return self.fetch(city).await.map(Entry::from);
        };
        match self.through(cluster, city, key).await {
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
        key: &str,
    ) -> Result<Result<Entry, WeatherError>, ClusterError> {
        let value_key = cluster.key(&["w", key]);
        let lease_key = cluster.key(&["wl", key]);
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut waited = false;
        loop {
            if let Some(entry) = self.read_shared(cluster, &value_key).await? {
                cluster.metrics().shared_cache_hits.inc();
                return Ok(Ok(entry));
            }
            let lease_ms = (self.timeout + Duration::from_secs(1)).as_millis() as u64;
            let took: Option<String> = cluster
                .query(
                    redis::cmd("SET")
                        .arg(&lease_key)
                        .arg(cluster.node_id())
                        .arg("NX")
                        .arg("PX")
                        .arg(lease_ms),
                )
                .await?;
            if took.is_some() {
                let result = self.fetch(city).await;
                if let Ok(cached) = &result {
                    self.write_shared(cluster, &value_key, cached).await;
                }
                let _ = cluster.release_lease(&lease_key).await;
                return Ok(result.map(Entry::from));
            }
            if !waited {
                waited = true;
                cluster.metrics().lease_waits.inc();
            }
            if tokio::time::Instant::now() + POLL >= deadline {
                return Ok(Err(WeatherError::Timeout(self.timeout.as_millis() as u64)));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The shared entry and its remaining TTL, if any.
    async fn read_shared(
        &self,
        cluster: &Cluster,
        value_key: &str,
    ) -> Result<Option<Entry>, ClusterError> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(value_key).cmd("PTTL").arg(value_key);
        let (value, pttl): (Option<String>, i64) =
            cluster.pipeline(&pipe, cluster.call_timeout()).await?;
        let Some(value) = value else { return Ok(None) };
        let ttl = (pttl > 0).then(|| Duration::from_millis(pttl as u64));
        let cached = if value == NOT_FOUND {
            Cached::NotFound
        } else {
            match serde_json::from_str(&value) {
                Ok(reading) => Cached::Found(Arc::new(reading)),
                // Not ours, or an older format: as if absent.
                Err(_) => return Ok(None),
            }
        };
        Ok(Some(Entry { cached, ttl }))
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
        let set: Result<(), _> = cluster
            .query(
                redis::cmd("SET")
                    .arg(value_key)
                    .arg(value)
                    .arg("PX")
                    .arg(ttl.as_millis() as u64),
            )
            .await;
        if let Err(e) = set {
            cluster.fell_back(Fallback::Cache, &e);
        }
    }
}
