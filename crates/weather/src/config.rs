//! `[weather]`: the upstream provider and the protections around it.
//! Read from the same file and `GALE_WEATHER__*` variables as the
//! engine's settings; the seed's `WEATHER_API_KEY` sets the key too.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use gale_engine::config::{ConfigError, check_http_url, check_ranges};

/// The seed's variable for the weather provider key.
pub const API_KEY_ENV: &str = "WEATHER_API_KEY";

/// Which upstream weather API to call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Provider {
    /// Open-Meteo: keyless geocoding + forecast.
    #[serde(rename = "open-meteo")]
    OpenMeteo,
    /// OpenWeatherMap's current-weather API (needs a key).
    #[serde(rename = "openweathermap")]
    OpenWeatherMap,
}

/// `[weather]`: the upstream provider and the protections around it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WeatherConfig {
    /// The provider.
    pub provider: Provider,
    /// Provider base URL; defaults to the provider's public URL.
    pub base_url: Option<String>,
    /// Open-Meteo's geocoding base URL; defaults to `base_url` when that
    /// is set (one server, as the fake upstream is), else the public URL.
    pub geocoding_url: Option<String>,
    /// API key (OpenWeatherMap). `WEATHER_API_KEY` sets it too.
    pub api_key: Option<String>,
    /// Deadline for one lookup, including the wait for an upstream slot.
    pub timeout_ms: u64,
    /// Most upstream calls in flight at once. 1,000 by default: the
    /// seed's scenario (1,000 cities at once, 2 s each) needs them all in
    /// flight to answer within the deadline; this bounds gale's sockets
    /// and memory, not the provider's rate (its 429s open the breaker).
    pub max_concurrent: usize,
    /// Most lookups waiting for an upstream slot; past this new ones are
    /// refused at once with "server busy".
    pub max_pending: usize,
    /// How long a reading is served from the cache.
    pub cache_ttl_s: u64,
    /// How long a "city not found" answer is cached.
    pub not_found_ttl_s: u64,
    /// Most cities held in the cache.
    pub cache_capacity: u64,
    /// Consecutive upstream failures that open the circuit breaker.
    pub breaker_failures: u32,
    /// How long the open breaker fails fast before it tries again.
    pub breaker_cooldown_ms: u64,
    /// Largest upstream response body read, in bytes.
    pub max_response_bytes: usize,
    /// Seconds between checks for a fresh reading of a subscribed city
    /// (`weather.subscribe`); a reading refreshes when its cache entry
    /// expires.
    pub refresh_s: u64,
}

impl Default for WeatherConfig {
    fn default() -> Self {
        WeatherConfig {
            provider: Provider::OpenMeteo,
            base_url: None,
            geocoding_url: None,
            api_key: None,
            timeout_ms: 5_000,
            max_concurrent: 1_000,
            max_pending: 5_000,
            cache_ttl_s: 600,
            not_found_ttl_s: 60,
            cache_capacity: 100_000,
            breaker_failures: 5,
            breaker_cooldown_ms: 10_000,
            max_response_bytes: 256 * 1024,
            refresh_s: 60,
        }
    }
}

impl WeatherConfig {
    /// The base URL in effect: the configured one or the provider's.
    pub fn effective_base_url(&self) -> &str {
        match (&self.base_url, self.provider) {
            (Some(url), _) => url,
            (None, Provider::OpenWeatherMap) => "https://api.openweathermap.org",
            (None, Provider::OpenMeteo) => "https://api.open-meteo.com",
        }
    }

    /// Open-Meteo's geocoding URL in effect.
    pub fn effective_geocoding_url(&self) -> &str {
        match (&self.geocoding_url, &self.base_url) {
            (Some(url), _) | (None, Some(url)) => url,
            (None, None) => "https://geocoding-api.open-meteo.com",
        }
    }

    /// The lookup deadline.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

impl WeatherConfig {
    /// Checks values that parse but cannot work; errors name the setting
    /// (`weather.timeout_ms`).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        const DAY_S: u64 = 86_400;
        const HOUR_MS: u64 = 3_600_000;
        const MIB: u64 = 1 << 20;
        let (w, n) = (self, |v: usize| v as u64);
        check_ranges(&[
            ("weather.timeout_ms", w.timeout_ms, 1, HOUR_MS),
            ("weather.max_concurrent", n(w.max_concurrent), 1, 1_000_000),
            ("weather.max_pending", n(w.max_pending), 0, 10_000_000),
            ("weather.cache_ttl_s", w.cache_ttl_s, 0, 30 * DAY_S),
            ("weather.not_found_ttl_s", w.not_found_ttl_s, 0, 30 * DAY_S),
            ("weather.cache_capacity", w.cache_capacity, 1, 100_000_000),
            (
                "weather.breaker_failures",
                u64::from(w.breaker_failures),
                1,
                1_000_000,
            ),
            (
                "weather.breaker_cooldown_ms",
                w.breaker_cooldown_ms,
                0,
                24 * HOUR_MS,
            ),
            (
                "weather.max_response_bytes",
                n(w.max_response_bytes),
                1,
                64 * MIB,
            ),
            ("weather.refresh_s", w.refresh_s, 1, DAY_S),
        ])?;
        check_http_url("weather.base_url", w.effective_base_url())?;
        if w.provider == Provider::OpenMeteo {
            check_http_url("weather.geocoding_url", w.effective_geocoding_url())?;
        }
        if w.provider == Provider::OpenWeatherMap
            && w.api_key.as_deref().is_none_or(|k| k.trim().is_empty())
        {
            return Err(ConfigError::invalid(
                "weather.api_key",
                format!("provider openweathermap needs a key (set it or {API_KEY_ENV})"),
            ));
        }
        Ok(())
    }
}
