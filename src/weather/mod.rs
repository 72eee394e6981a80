//! Weather lookups, protected: validation, a TTL cache with single-flight
//! (concurrent requests for one uncached city share one upstream call), a
//! bound on concurrent and waiting upstream calls, a deadline, and a
//! circuit breaker. Providers behind [`Provider`] only make HTTP calls.

mod breaker;
mod open_meteo;
mod openweathermap;
mod provider;
mod shared;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;
use tokio::sync::Semaphore;

pub use breaker::Breaker;
pub use open_meteo::{OpenMeteo, describe};
pub use openweathermap::OpenWeatherMap;
pub use provider::{Provider, Reading, WeatherError};

use crate::config::{self, WeatherConfig};
use crate::metrics::{Metrics, UpstreamResult};
use crate::protocol::{normalise_city, parse_city};

/// What the cache holds for a city: a reading, or the knowledge that the
/// provider does not know it (cached for a shorter time).
#[derive(Debug, Clone)]
enum Cached {
    Found(Arc<Reading>),
    NotFound,
}

/// A cache entry: what is known, and for how long when that is not the
/// configured TTL (an entry from the cluster's shared cache lives here
/// only as long as it has left there).
#[derive(Debug, Clone)]
struct Entry {
    cached: Cached,
    ttl: Option<Duration>,
}

impl From<Cached> for Entry {
    fn from(cached: Cached) -> Entry {
        Entry { cached, ttl: None }
    }
}

struct TtlByOutcome {
    found: Duration,
    not_found: Duration,
}

impl Expiry<String, Entry> for TtlByOutcome {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Entry,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl.unwrap_or(match value.cached {
            Cached::Found(_) => self.found,
            Cached::NotFound => self.not_found,
        }))
    }
}

/// Why the weather service could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The HTTP client could not be created (TLS set-up).
    #[error("cannot create the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    /// A provider URL does not parse.
    #[error("invalid weather URL: {0}")]
    Url(#[from] url::ParseError),
}

/// The weather service shared by every connection.
pub struct Weather {
    provider: Box<dyn Provider>,
    cache: Cache<String, Entry>,
    slots: Semaphore,
    pending: AtomicUsize,
    max_pending: usize,
    timeout: Duration,
    breaker: Breaker,
    metrics: Arc<Metrics>,
    ttl: TtlByOutcome,
    /// Cluster mode: the shared cache and the cross-node single-flight.
    cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl std::fmt::Debug for Weather {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weather")
            .field("cached", &self.cache.entry_count())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Weather {
    /// Builds the configured provider and the protections around it.
    ///
    /// # Errors
    /// [`BuildError`] when the HTTP client or a URL cannot be made.
    pub fn from_config(cfg: &WeatherConfig, metrics: Arc<Metrics>) -> Result<Self, BuildError> {
        // reqwest is built without a default TLS backend; ring builds
        // faster than aws-lc. Installing twice is harmless (the first wins).
        let _ = rustls::crypto::ring::default_provider().install_default();
        // The client's own timeout is a backstop: the lookup deadline in
        // `fetch` fires first and is what the client is told.
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout() + Duration::from_secs(1))
            .connect_timeout(cfg.timeout().min(Duration::from_secs(3)))
            .pool_max_idle_per_host(cfg.max_concurrent)
            .user_agent(concat!("gale/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let provider: Box<dyn Provider> = match cfg.provider {
            config::Provider::OpenWeatherMap => Box::new(OpenWeatherMap::new(
                http,
                cfg.effective_base_url(),
                cfg.api_key.clone().unwrap_or_default(),
                cfg.max_response_bytes,
            )?),
            config::Provider::OpenMeteo => Box::new(OpenMeteo::new(
                http,
                cfg.effective_base_url(),
                cfg.effective_geocoding_url(),
                cfg.max_response_bytes,
            )?),
        };
        Ok(Self::new(provider, cfg, metrics))
    }

    /// Wraps any provider with the configured protections.
    pub fn new(provider: Box<dyn Provider>, cfg: &WeatherConfig, metrics: Arc<Metrics>) -> Self {
        let ttl = || TtlByOutcome {
            found: Duration::from_secs(cfg.cache_ttl_s),
            not_found: Duration::from_secs(cfg.not_found_ttl_s),
        };
        let cache = Cache::builder()
            .max_capacity(cfg.cache_capacity)
            .expire_after(ttl())
            .build();
        Weather {
            provider,
            cache,
            slots: Semaphore::new(cfg.max_concurrent),
            pending: AtomicUsize::new(0),
            max_pending: cfg.max_pending,
            timeout: cfg.timeout(),
            breaker: Breaker::new(
                cfg.breaker_failures,
                Duration::from_millis(cfg.breaker_cooldown_ms),
            ),
            metrics,
            ttl: ttl(),
            cluster: None,
        }
    }

    /// Shares the cache and the upstream calls with the other nodes of
    /// `cluster` (cluster mode).
    pub fn share(&mut self, cluster: Option<Arc<crate::cluster::Cluster>>) {
        self.cluster = cluster;
    }

    /// The current weather for `city` as a client typed it.
    ///
    /// # Errors
    /// [`WeatherError`]: invalid city, not found, timeout, busy, breaker
    /// open, or an upstream failure.
    pub async fn lookup(&self, city: &str) -> Result<Arc<Reading>, WeatherError> {
        let city = parse_city(city)?;
        let key = normalise_city(city);
        let cached = match self.cache.get(&key).await {
            Some(hit) => {
                self.metrics.cache_hits.inc();
                hit
            }
            None => {
                let mut called = false;
                let fetched = self
                    .cache
                    .entry_by_ref(&key)
                    .or_try_insert_with(async {
                        called = true;
                        // Boxed, and only by the caller that fetches: the
                        // upstream call's state is ~2 KiB, and every
                        // request waiting on the cache would otherwise
                        // carry room for it.
                        Box::pin(self.fetch_shared(city, &key)).await
                    })
                    .await;
                if called {
                    self.metrics.cache_misses.inc();
                } else {
                    self.metrics.cache_coalesced.inc();
                }
                fetched.map_err(|e| (*e).clone())?.into_value()
            }
        };
        match cached.cached {
            Cached::Found(reading) => Ok(reading),
            Cached::NotFound => Err(WeatherError::NotFound),
        }
    }

    /// One upstream lookup under the breaker, the slot limits and the
    /// deadline. "Not found" is a cacheable answer, not an error.
    ///
    /// The breaker hears only about the upstream's own behaviour: a call
    /// that failed, answered 5xx, 429 or garbage, or was still unanswered
    /// after at least half the deadline. Waiting for a slot, being refused
    /// as busy, a call cut short by a deadline mostly spent waiting, and a
    /// 4xx the client's city provoked are not failures.
    async fn fetch(&self, city: &str) -> Result<Cached, WeatherError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        // Fail fast while open, before queueing for a slot.
        self.breaker.check().map_err(|left| self.open(left))?;
        let _slot = self.slot(deadline).await?;
        // Taken only now: a half-open trial must not wait behind others.
        let permit = self.breaker.try_acquire().map_err(|left| self.open(left))?;
        let mut call = Call::start(&self.metrics);
        let answer = tokio::time::timeout_at(deadline, self.provider.current(city)).await;
        let in_flight = call.started.elapsed();
        let result = match answer {
            Ok(result) => result.and_then(checked),
            Err(_) => Err(WeatherError::Timeout(self.timeout.as_millis() as u64)),
        };
        call.result = UpstreamResult::of(&result);
        drop(call);
        match &result {
            Ok(_) | Err(WeatherError::NotFound | WeatherError::Refused(_)) => permit.record(true),
            Err(WeatherError::Timeout(_)) if in_flight < self.timeout / 2 => drop(permit),
            Err(_) => permit.record(false),
        }
        self.metrics.breaker_state.set(self.breaker.state() as i64);
        match result {
            Ok(reading) => Ok(Cached::Found(Arc::new(reading))),
            Err(WeatherError::NotFound) => Ok(Cached::NotFound),
            Err(e) => Err(e),
        }
    }

    /// Counts a lookup failed fast by the open breaker.
    fn open(&self, left: Duration) -> WeatherError {
        self.metrics.breaker_rejected.inc();
        WeatherError::CircuitOpen(left.as_secs().max(1))
    }

    /// An upstream slot: at once, or after waiting (refused at once past
    /// `max_pending`, given up at `deadline`).
    async fn slot(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<tokio::sync::SemaphorePermit<'_>, WeatherError> {
        if let Ok(slot) = self.slots.try_acquire() {
            return Ok(slot);
        }
        let _waiting = Pending::enter(self)?;
        match tokio::time::timeout_at(deadline, self.slots.acquire()).await {
            Ok(Ok(slot)) => Ok(slot),
            Ok(Err(_)) => Err(WeatherError::Upstream("shutting down".into())),
            Err(_) => Err(WeatherError::QueueTimeout(self.timeout.as_millis() as u64)),
        }
    }

    /// The breaker's state now (it moves from open to half-open with time
    /// alone), for the gauge.
    pub fn breaker_state(&self) -> crate::metrics::BreakerState {
        self.breaker.state()
    }

    /// Cities in the cache now.
    pub fn cached_cities(&self) -> u64 {
        self.cache.entry_count()
    }
}

/// Longest city name or description accepted from a provider, in
/// characters: a reading becomes a reply, and replies stay small.
const MAX_READING_TEXT_CHARS: usize = 200;

/// Refuses a reading whose text fields are longer than any real one.
fn checked(r: Reading) -> Result<Reading, WeatherError> {
    let too_long = |t: &str| t.chars().nth(MAX_READING_TEXT_CHARS).is_some();
    if too_long(&r.city) || too_long(&r.description) {
        return Err(WeatherError::InvalidResponse(
            "a name or description longer than 200 characters".into(),
        ));
    }
    Ok(r)
}

/// One upstream call in the metrics: in flight from [`Call::start`] until
/// dropped, then counted by its result (a call dropped before it set one,
/// because its lookup was cancelled, counts as `Cancelled`) with its
/// latency. Whatever ends the call, the gauge comes back down.
struct Call<'a> {
    metrics: &'a Metrics,
    started: Instant,
    result: UpstreamResult,
}

impl<'a> Call<'a> {
    fn start(metrics: &'a Metrics) -> Self {
        metrics.upstream_in_flight.inc();
        Call {
            metrics,
            started: Instant::now(),
            result: UpstreamResult::Cancelled,
        }
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        let m = self.metrics;
        m.upstream_in_flight.dec();
        m.upstream_latency
            .observe(self.started.elapsed().as_secs_f64());
        m.upstream_call(self.result).inc();
    }
}

/// Counts one lookup waiting for a slot, for as long as it waits.
struct Pending<'a>(&'a Weather);

impl<'a> Pending<'a> {
    fn enter(w: &'a Weather) -> Result<Self, WeatherError> {
        if w.pending.fetch_add(1, Ordering::AcqRel) >= w.max_pending {
            w.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(WeatherError::Busy);
        }
        w.metrics.upstream_pending.inc();
        Ok(Pending(w))
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.upstream_pending.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::future::BoxFuture;

    /// A provider that answers every city with one fixed reading.
    struct Fixed(Reading);

    impl Provider for Fixed {
        fn current<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Reading, WeatherError>> {
            Box::pin(async move { Ok(self.0.clone()) })
        }
    }

    fn reading(city: String) -> Reading {
        Reading {
            city,
            temperature: 1.0,
            feels_like: 0.0,
            description: "clear sky".into(),
            humidity: 50,
        }
    }

    #[tokio::test]
    async fn a_reading_with_an_absurd_name_is_an_invalid_response() {
        let cfg = WeatherConfig::default();
        let weather = Weather::new(
            Box::new(Fixed(reading("x".repeat(200_000)))),
            &cfg,
            Arc::new(Metrics::new()),
        );
        let err = weather.lookup("Paris").await.expect_err("refused");
        assert!(matches!(err, WeatherError::InvalidResponse(_)), "{err:?}");
        let fine = Weather::new(
            Box::new(Fixed(reading("Paris".into()))),
            &cfg,
            Arc::new(Metrics::new()),
        );
        assert_eq!(fine.lookup("Paris").await.expect("reading").city, "Paris");
    }
}
