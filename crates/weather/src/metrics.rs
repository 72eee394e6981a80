//! The weather service's metrics (`gale_requests_total`,
//! `gale_upstream_*`, `gale_cache_*`), registered beside the engine's,
//! and its part of `/metrics.json` and `server.stats`.

use std::sync::Arc;

use gale_engine::metrics::Outcome;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// How one upstream HTTP call ended: every call counts once.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum UpstreamResult {
    /// A reading.
    Ok,
    /// City not found (a valid answer, not a failure).
    NotFound,
    /// A 4xx for the city name itself (not a failure of the upstream).
    Refused,
    /// Failed: error status, bad body, connection error.
    Error,
    /// No answer before the lookup's deadline.
    Timeout,
    /// Dropped unfinished because its lookup was cancelled.
    Cancelled,
}

impl UpstreamResult {
    /// Every result, in declaration order (index = `as usize`).
    pub const ALL: [UpstreamResult; 6] = [
        UpstreamResult::Ok,
        UpstreamResult::NotFound,
        UpstreamResult::Refused,
        UpstreamResult::Error,
        UpstreamResult::Timeout,
        UpstreamResult::Cancelled,
    ];

    /// The label for a call's result.
    pub fn of<T>(result: &Result<T, crate::WeatherError>) -> UpstreamResult {
        use crate::WeatherError;
        match result {
            Ok(_) => UpstreamResult::Ok,
            Err(WeatherError::NotFound) => UpstreamResult::NotFound,
            Err(WeatherError::Refused(_)) => UpstreamResult::Refused,
            Err(WeatherError::Timeout(_)) => UpstreamResult::Timeout,
            Err(_) => UpstreamResult::Error,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: Outcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    result: UpstreamResult,
}

/// Every counter of the weather service.
#[derive(Debug)]
pub struct WeatherMetrics {
    /// Weather requests received (the seed's `requests`).
    pub requests: Counter,
    outcomes: [Counter; Outcome::COUNT],
    upstream_calls: [Counter; 6],
    /// Upstream call latency in seconds.
    pub upstream_latency: Histogram,
    /// Upstream calls running now.
    pub upstream_in_flight: Gauge,
    /// Lookups waiting for an upstream slot now.
    pub upstream_pending: Gauge,
    /// Lookups refused at once: their wait plus a call would have ended
    /// past the deadline.
    pub upstream_refused_early: Counter,
    /// Breaker state (0 closed, 1 open, 2 half-open).
    pub breaker_state: Gauge,
    /// Lookups refused at once because the breaker was open.
    pub breaker_rejected: Counter,
    /// Lookups answered from the cache.
    pub cache_hits: Counter,
    /// Lookups that called upstream themselves.
    pub cache_misses: Counter,
    /// Lookups that waited on another's identical upstream call.
    pub cache_coalesced: Counter,
}

impl WeatherMetrics {
    /// The weather service's metrics, registered with the engine's.
    pub fn register(engine: &gale_engine::metrics::Metrics) -> Arc<WeatherMetrics> {
        Arc::new(engine.register(WeatherMetrics::new_in))
    }

    fn new_in(r: &mut Registry) -> WeatherMetrics {
        let requests = Counter::default();
        r.register("requests", "Weather requests received", requests.clone());
        let by_outcome = Family::<OutcomeLabels, Counter>::default();
        r.register(
            "request_outcomes",
            "Weather requests by how they ended",
            by_outcome.clone(),
        );
        let outcomes =
            Outcome::ALL.map(|o| by_outcome.get_or_create_owned(&OutcomeLabels { outcome: o }));

        let upstream = Family::<UpstreamLabels, Counter>::default();
        r.register(
            "upstream_calls",
            "Upstream weather calls by result",
            upstream.clone(),
        );
        let upstream_calls = UpstreamResult::ALL
            .map(|r| upstream.get_or_create_owned(&UpstreamLabels { result: r }));
        let upstream_latency = Histogram::new(exponential_buckets(0.005, 2.0, 13));
        r.register(
            "upstream_latency_seconds",
            "Upstream weather call latency",
            upstream_latency.clone(),
        );
        let upstream_in_flight = Gauge::default();
        r.register(
            "upstream_in_flight",
            "Upstream calls running now",
            upstream_in_flight.clone(),
        );
        let upstream_pending = Gauge::default();
        r.register(
            "upstream_pending",
            "Lookups waiting for an upstream slot",
            upstream_pending.clone(),
        );
        let upstream_refused_early = Counter::default();
        r.register(
                "upstream_refused_early",
                "Lookups refused at once as busy: their wait for a slot plus a call, as recent calls took, would end past the deadline",
                upstream_refused_early.clone(),
            );
        let breaker_state = Gauge::default();
        r.register(
            "upstream_breaker_state",
            "Circuit breaker: 0 closed, 1 open, 2 half-open",
            breaker_state.clone(),
        );
        let breaker_rejected = Counter::default();
        r.register(
            "upstream_breaker_rejected",
            "Lookups failed fast by the open breaker",
            breaker_rejected.clone(),
        );

        let cache_hits = Counter::default();
        r.register(
            "cache_hits",
            "Lookups answered from the cache",
            cache_hits.clone(),
        );
        let cache_misses = Counter::default();
        r.register(
            "cache_misses",
            "Lookups that called upstream",
            cache_misses.clone(),
        );
        let cache_coalesced = Counter::default();
        r.register(
            "cache_coalesced",
            "Lookups that shared another's upstream call",
            cache_coalesced.clone(),
        );
        WeatherMetrics {
            requests,
            outcomes,
            upstream_calls,
            upstream_latency,
            upstream_in_flight,
            upstream_pending,
            upstream_refused_early,
            breaker_state,
            breaker_rejected,
            cache_hits,
            cache_misses,
            cache_coalesced,
        }
    }

    /// The counter of upstream calls that ended with `result`.
    pub fn upstream_call(&self, result: UpstreamResult) -> &Counter {
        &self.upstream_calls[result as usize]
    }

    /// The counter for one request outcome.
    pub fn outcome(&self, outcome: Outcome) -> &Counter {
        &self.outcomes[outcome as usize]
    }

    /// Requests that got a reading (the seed's `successful`).
    pub fn successful(&self) -> u64 {
        self.outcome(Outcome::Ok).get()
    }

    /// Requests that got an error reply (the seed's `failed`).
    pub fn failed(&self) -> u64 {
        self.outcomes.iter().skip(1).map(Counter::get).sum()
    }

    /// The seed's counters and the cache's, for `/metrics.json`.
    pub(crate) fn json(&self, out: &mut serde_json::Map<String, serde_json::Value>) {
        for (k, v) in [
            ("requests", self.requests.get()),
            ("successful", self.successful()),
            ("failed", self.failed()),
            ("cache-hits", self.cache_hits.get()),
            ("cache-misses", self.cache_misses.get()),
            ("cache-coalesced", self.cache_coalesced.get()),
            (
                "upstream-calls",
                self.upstream_calls.iter().map(Counter::get).sum::<u64>(),
            ),
        ] {
            out.insert(k.into(), v.into());
        }
    }
}

impl Default for WeatherMetrics {
    /// Metrics registered nowhere (tests, benchmarks).
    fn default() -> Self {
        WeatherMetrics::new_in(&mut Registry::default())
    }
}
