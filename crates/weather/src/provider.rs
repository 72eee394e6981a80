//! The provider trait, the reading it returns, and the errors every
//! provider maps its failures to.

use futures_util::future::BoxFuture;

use gale_engine::protocol::ErrorCode;

/// Current weather for one city.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Reading {
    /// The city as the provider names it.
    pub city: String,
    /// Degrees Celsius.
    pub temperature: f64,
    /// Degrees Celsius.
    pub feels_like: f64,
    /// Human description.
    pub description: String,
    /// Relative humidity, percent.
    pub humidity: u32,
}

/// Why a lookup produced no reading. Cloneable because one upstream
/// failure is handed to every request that waited on it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WeatherError {
    /// The city name was refused before any lookup.
    #[error("{0}")]
    InvalidCity(#[from] crate::city::InvalidCity),
    /// The provider does not know the city.
    #[error("city not found: check the spelling, or add a country (\"Paris, FR\")")]
    NotFound,
    /// The lookup missed its deadline with its upstream call in flight.
    #[error("weather lookup timeout: no answer from the weather service within {0} ms, try again")]
    Timeout(u64),
    /// The lookup missed its deadline waiting for a free upstream slot:
    /// local congestion, the upstream was never asked.
    #[error(
        "weather lookup timeout: the server's upstream calls stayed busy for {0} ms, try again"
    )]
    QueueTimeout(u64),
    /// The provider refused the request for this city (a 4xx other than
    /// not found, a bad key or a rate limit): the name, not the upstream,
    /// is at fault.
    #[error("the weather service refused this city name (status {0})")]
    Refused(u16),
    /// Too many lookups are waiting already.
    #[error("server busy: too many weather lookups waiting, try again in a few seconds")]
    Busy,
    /// The wait for a slot plus a call, as recent calls have taken,
    /// would end past the deadline: refused at once rather than at it.
    #[error(
        "server busy: a weather lookup would take about {0} ms now, past its deadline; try again in a few seconds"
    )]
    WouldMissDeadline(u64),
    /// The breaker is open after repeated upstream failures.
    #[error("weather service unavailable: too many recent upstream failures, retry in {0} s")]
    CircuitOpen(u64),
    /// The provider refused our API key.
    #[error("weather service unavailable: the server's weather API key was rejected")]
    BadKey,
    /// The provider failed (error status, connection error).
    #[error("weather service unavailable: {0}")]
    Upstream(String),
    /// The provider answered something we cannot read.
    #[error("weather service unavailable: invalid upstream response ({0})")]
    InvalidResponse(String),
}

impl WeatherError {
    /// The stable code for replies and the request log.
    pub fn code(&self) -> ErrorCode {
        match self {
            WeatherError::InvalidCity(_) => ErrorCode::InvalidData,
            WeatherError::NotFound => ErrorCode::NotFound,
            WeatherError::Timeout(_) | WeatherError::QueueTimeout(_) => ErrorCode::Timeout,
            WeatherError::Refused(_) => ErrorCode::InvalidData,
            WeatherError::Busy | WeatherError::WouldMissDeadline(_) => ErrorCode::SystemOverloaded,
            WeatherError::CircuitOpen(_)
            | WeatherError::BadKey
            | WeatherError::Upstream(_)
            | WeatherError::InvalidResponse(_) => ErrorCode::UpstreamUnavailable,
        }
    }
}

/// One weather API. Implementations make the HTTP calls and map every
/// answer to a [`Reading`] or a [`WeatherError`]; limits, caching and the
/// breaker live in [`super::Weather`], shared by all providers.
pub trait Provider: Send + Sync + 'static {
    /// Fetches the current weather for `city` (trimmed, validated).
    fn current<'a>(&'a self, city: &'a str) -> BoxFuture<'a, Result<Reading, WeatherError>>;
}

/// A failed HTTP call, as the weather service's failure.
impl From<gale_engine::http_client::HttpError> for WeatherError {
    fn from(e: gale_engine::http_client::HttpError) -> WeatherError {
        use gale_engine::http_client::HttpError as H;
        match e {
            H::Timeout => WeatherError::Upstream(
                "the weather service did not answer in time (timeout)".into(),
            ),
            H::Unreachable(how) => {
                WeatherError::Upstream(format!("cannot reach the weather service{how}"))
            }
            H::Failed => WeatherError::Upstream("request to the weather service failed".into()),
            H::TooLarge(limit) => {
                WeatherError::InvalidResponse(format!("body larger than {limit} bytes"))
            }
            H::Unreadable(what) => {
                WeatherError::InvalidResponse(format!("unreadable response: {what}"))
            }
        }
    }
}

/// Maps a non-success status the seed's way: 404 (and 410) not found,
/// 401/403/407 bad key, 429 and 408 the upstream's own trouble; any other
/// 4xx refuses the city name itself; everything else is unavailable.
pub(crate) fn map_status(status: u16) -> WeatherError {
    match status {
        404 | 410 => WeatherError::NotFound,
        401 | 403 | 407 => WeatherError::BadKey,
        429 => WeatherError::Upstream("rate limited by the weather service (429)".into()),
        code @ 400..=499 if code != 408 => WeatherError::Refused(code),
        code => WeatherError::Upstream(format!("the weather service returned status {code}")),
    }
}
