//! The weather application on gale: a client sends a city name (as plain
//! text or the `weather.get` event) and gets the current weather back at
//! once; `weather.subscribe` keeps it coming. Built on `gale_engine`'s
//! public API alone ([`WeatherApp::install`]).
//!
//! Lookups are protected: validation, a TTL cache with single-flight
//! (concurrent requests for one uncached city share one upstream call), a
//! bound on concurrent and waiting upstream calls, a deadline, and a
//! circuit breaker ([`Weather`]); in cluster mode the cache is shared
//! through Redis. Providers behind [`Provider`] only make HTTP calls.
//! Every request, however it came, is written to the request log
//! (`gale_store`), off the reply path.

mod app;
pub mod city;
pub mod config;
pub mod feeds;
pub mod metrics;
mod open_meteo;
mod openweathermap;
mod provider;
mod shared;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::sync::Cache;
use tokio::sync::{Semaphore, watch};

pub use app::{GREETING, WeatherApp, reading_reply};
pub use config::WeatherConfig;
pub use gale_engine::breaker::Breaker;
pub use open_meteo::{OpenMeteo, describe};
pub use openweathermap::OpenWeatherMap;
pub use provider::{Provider, Reading, WeatherError};

use crate::city::{normalise_city, parse_city};
use crate::metrics::{UpstreamResult, WeatherMetrics};

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

/// What the lookups waiting on one city's upstream call see: nothing
/// yet, then its outcome. The sender is dropped, with nothing sent, when
/// the lookup making the call is cancelled; a waiter then takes over.
type Outcome = Option<Result<Entry, WeatherError>>;

/// The single-flight table: one entry per city being fetched, removed
/// when its call ends. Bounded by the lookups in flight (each connection's
/// `max_inflight_per_connection`, `max_connections`), since an entry
/// lives only as long as the lookup that made it.
#[derive(Default)]
struct Flights(std::sync::Mutex<std::collections::HashMap<String, watch::Receiver<Outcome>>>);

/// A lookup's part in a city's single flight.
enum Role {
    /// Make the call and send its outcome.
    Lead(watch::Sender<Outcome>),
    /// Wait for the outcome of the lookup that leads.
    Wait(watch::Receiver<Outcome>),
}

impl Flights {
    fn join(&self, key: &str) -> Role {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(rx) = map.get(key)
            && rx.has_changed().is_ok()
        {
            return Role::Wait(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        map.insert(key.to_owned(), rx);
        Role::Lead(tx)
    }

    fn leave(&self, key: &str) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }

    fn len(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

/// Removes a city's flight however its leading lookup ends (finished or
/// cancelled), after the outcome, if any, is in the cache and sent.
struct Leading<'a> {
    flights: &'a Flights,
    key: &'a str,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        self.flights.leave(self.key);
    }
}

/// The weather service shared by every connection.
pub struct Weather {
    provider: Box<dyn Provider>,
    cache: Cache<String, Entry>,
    flights: Flights,
    slots: Semaphore,
    max_concurrent: usize,
    /// How long recent upstream calls took, in µs (a moving average; 0
    /// before the first call).
    call_us: AtomicU64,
    pending: AtomicUsize,
    /// Lookups that have started waiting for a slot, and those that have
    /// stopped: a waiter's place in the queue.
    tickets: AtomicU64,
    departed: AtomicU64,
    max_pending: usize,
    timeout: Duration,
    breaker: Breaker,
    metrics: Arc<WeatherMetrics>,
    ttl: TtlByOutcome,
    /// Cluster mode: the shared cache and the cross-node single-flight.
    cluster: Option<Arc<gale_engine::cluster::Cluster>>,
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
    pub fn from_config(
        cfg: &WeatherConfig,
        metrics: Arc<WeatherMetrics>,
    ) -> Result<Self, BuildError> {
        // The client's own timeout is a backstop: the lookup deadline in
        // `fetch` fires first and is what the client is told.
        let http = Arc::new(gale_engine::http_client::Client::new(
            cfg.timeout() + Duration::from_secs(1),
            cfg.timeout().min(Duration::from_secs(3)),
            cfg.max_concurrent,
        )?);
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
    pub fn new(
        provider: Box<dyn Provider>,
        cfg: &WeatherConfig,
        metrics: Arc<WeatherMetrics>,
    ) -> Self {
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
            flights: Flights::default(),
            slots: Semaphore::new(cfg.max_concurrent),
            max_concurrent: cfg.max_concurrent,
            call_us: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            tickets: AtomicU64::new(0),
            departed: AtomicU64::new(0),
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
    pub fn share(&mut self, cluster: Option<Arc<gale_engine::cluster::Cluster>>) {
        self.cluster = cluster;
    }

    /// The current weather for `city` as a client typed it. The provider
    /// is asked for its canonical form, the text the cache keys.
    ///
    /// # Errors
    /// [`WeatherError`]: invalid city, not found, timeout, busy, breaker
    /// open, or an upstream failure.
    pub async fn lookup(&self, city: &str) -> Result<Arc<Reading>, WeatherError> {
        let city = parse_city(city)?;
        let key = normalise_city(city);
        let cached = loop {
            if let Some(hit) = self.cache.get(&key) {
                self.metrics.cache_hits.inc();
                break hit;
            }
            // Concurrent misses for one city share one call. The state a
            // waiting lookup keeps is small: thousands wait at once.
            match self.flights.join(&key) {
                Role::Lead(tx) => {
                    let _leading = Leading {
                        flights: &self.flights,
                        key: &key,
                    };
                    self.metrics.cache_misses.inc();
                    // Boxed: the upstream call's state is ~2 KiB, and
                    // only the leading lookup needs it.
                    let outcome = Box::pin(self.fetch_shared(&key)).await;
                    if let Ok(entry) = &outcome {
                        self.cache.insert(key.clone(), entry.clone());
                    }
                    tx.send_replace(Some(outcome.clone()));
                    break outcome?;
                }
                Role::Wait(mut rx) => {
                    // Err: the leading lookup was cancelled; try again.
                    if let Ok(outcome) = rx.wait_for(Option::is_some).await {
                        self.metrics.cache_coalesced.inc();
                        if let Some(outcome) = outcome.as_ref() {
                            break outcome.clone()?;
                        }
                    }
                }
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
        self.observe_call(in_flight);
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

    /// An upstream slot: at once, or after waiting. Refused at once past
    /// `max_pending`; refused as soon as the wait plus a call, as recent
    /// calls have taken, would end past `deadline` (checked on arrival and
    /// again every [`RECHECK`] while waiting, so a cold start, with no call
    /// timed yet, is caught once the first calls end); given up at
    /// `deadline`.
    async fn slot(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<tokio::sync::SemaphorePermit<'_>, WeatherError> {
        if let Ok(slot) = self.slots.try_acquire() {
            return Ok(slot);
        }
        let waiting = Pending::enter(self)?;
        // One acquire for the whole wait: the semaphore is fair, and a
        // new acquire would go to the back of its queue.
        let acquire = self.slots.acquire();
        tokio::pin!(acquire);
        loop {
            let now = tokio::time::Instant::now();
            if let Some(finish) = self.expected_finish(&waiting, now)
                && finish > deadline
            {
                self.metrics.upstream_refused_early.inc();
                let ms = finish.saturating_duration_since(now).as_millis() as u64;
                return Err(WeatherError::WouldMissDeadline(ms));
            }
            match tokio::time::timeout_at(deadline.min(now + RECHECK), &mut acquire).await {
                Ok(Ok(slot)) => return Ok(slot),
                Ok(Err(_)) => return Err(WeatherError::Upstream("shutting down".into())),
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    return Err(WeatherError::QueueTimeout(self.timeout.as_millis() as u64));
                }
                Err(_) => {}
            }
        }
    }

    /// When a waiting lookup should expect its call to end: the earlier of
    /// two estimates, one from when it started waiting with the queue it
    /// found, one from now with the queue left before it (each alone
    /// errs late: the first if some ahead gave up, the second by the
    /// part of a round already run). `None` until a call has been timed.
    fn expected_finish(
        &self,
        waiting: &Pending<'_>,
        now: tokio::time::Instant,
    ) -> Option<tokio::time::Instant> {
        let from_entry = waiting.entered + self.expected_wait(waiting.ahead_at_entry)?;
        let from_now = now + self.expected_wait(waiting.ahead())?;
        Some(from_entry.min(from_now))
    }

    /// How long a lookup with `ahead` others waiting before it would take:
    /// slots free at `max_concurrent` per call time, then its own call.
    /// `None` until a call has been timed.
    fn expected_wait(&self, ahead: usize) -> Option<Duration> {
        let call = self.call_us.load(Ordering::Relaxed);
        if call == 0 {
            return None;
        }
        let rounds = (ahead + 1) as f64 / self.max_concurrent as f64;
        Some(Duration::from_micros(call).mul_f64(rounds + 1.0))
    }

    /// Folds one call's time into the moving average (weight 1/8).
    fn observe_call(&self, took: Duration) {
        let x = took.as_micros().min(u128::from(u64::MAX / 2)) as u64;
        let old = self.call_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            x.max(1)
        } else {
            (old - old / 8 + x / 8).max(1)
        };
        self.call_us.store(new, Ordering::Relaxed);
    }

    /// The breaker's state now (it moves from open to half-open with time
    /// alone), for the gauge.
    pub fn breaker_state(&self) -> gale_engine::metrics::BreakerState {
        self.breaker.state()
    }

    /// Cities being fetched now, each by one lookup that others wait on.
    pub fn cities_in_flight(&self) -> usize {
        self.flights.len()
    }

    /// Cities in the cache now.
    pub fn cached_cities(&self) -> u64 {
        self.cache.entry_count()
    }
}

/// How often a lookup waiting for a slot checks whether it can still
/// finish in time.
const RECHECK: Duration = Duration::from_millis(100);

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
    metrics: &'a WeatherMetrics,
    started: Instant,
    result: UpstreamResult,
}

impl<'a> Call<'a> {
    fn start(metrics: &'a WeatherMetrics) -> Self {
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
struct Pending<'a> {
    weather: &'a Weather,
    /// How many lookups had started waiting before this one.
    ticket: u64,
    /// When it started waiting, and how many were waiting before it then.
    entered: tokio::time::Instant,
    ahead_at_entry: usize,
}

impl<'a> Pending<'a> {
    fn enter(w: &'a Weather) -> Result<Self, WeatherError> {
        if w.pending.fetch_add(1, Ordering::AcqRel) >= w.max_pending {
            w.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(WeatherError::Busy);
        }
        w.metrics.upstream_pending.inc();
        let ticket = w.tickets.fetch_add(1, Ordering::AcqRel);
        let mut waiting = Pending {
            weather: w,
            ticket,
            entered: tokio::time::Instant::now(),
            ahead_at_entry: 0,
        };
        waiting.ahead_at_entry = waiting.ahead();
        Ok(waiting)
    }

    /// Lookups still waiting before this one: those that came before it,
    /// less all that have left the wait (served or given up). The queue is
    /// first come, first served, so this is exact unless a later lookup
    /// gave up first.
    fn ahead(&self) -> usize {
        let gone = self.weather.departed.load(Ordering::Acquire);
        usize::try_from(self.ticket.saturating_sub(gone)).unwrap_or(usize::MAX)
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.weather.pending.fetch_sub(1, Ordering::AcqRel);
        self.weather.departed.fetch_add(1, Ordering::AcqRel);
        self.weather.metrics.upstream_pending.dec();
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
            Arc::new(WeatherMetrics::default()),
        );
        let err = weather.lookup("Paris").await.expect_err("refused");
        assert!(matches!(err, WeatherError::InvalidResponse(_)), "{err:?}");
        let fine = Weather::new(
            Box::new(Fixed(reading("Paris".into()))),
            &cfg,
            Arc::new(WeatherMetrics::default()),
        );
        assert_eq!(fine.lookup("Paris").await.expect("reading").city, "Paris");
    }
}
