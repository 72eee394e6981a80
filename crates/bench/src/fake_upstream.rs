//! A fake *external* weather API: a real HTTP server on 127.0.0.1 that
//! speaks OpenWeatherMap's and Open-Meteo's JSON, with controllable
//! latency and failures, counting every call. There is no internet here,
//! so the tests, the README's demo and the load tools use it in place of
//! the real providers. It is the only stand-in in the project.
//!
//! Cities named `Atlantis` or starting with `Nowhere` do not exist; every
//! other city does, with a reading derived from its name (stable across
//! runs). The API key `bad-key` (or none) is refused with 401.
//!
//! For the load tools it also stands in for an application's backend:
//! `POST /backend/ANYTHING` answers every proxy call (connect, subscribe,
//! publish, RPC, notifications) with `{"result": {}}` after the same
//! latency, counted with the weather calls.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// How the fake answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Real-looking answers.
    Normal,
    /// Every call answers this HTTP status with a JSON error body.
    Status(u16),
    /// Every call answers 200 with a body that is not the provider's JSON.
    Garbage,
}

/// Most recent query strings kept for inspection.
const KEPT_QUERIES: usize = 1_000;

#[derive(Debug)]
struct Shared {
    calls: AtomicU64,
    /// Calls being answered now, and the most at once.
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
    latency_ms: AtomicU64,
    /// Errors per million calls (500 answers), spread evenly.
    error_ppm: AtomicU64,
    mode: Mutex<Mode>,
    city_latency_ms: Mutex<HashMap<String, u64>>,
    city_status: Mutex<HashMap<String, u16>>,
    /// Statuses for query texts exactly as sent (no case folding).
    exact_status: Mutex<HashMap<String, u16>>,
    queries: Mutex<VecDeque<Vec<(String, String)>>>,
}

/// A running fake upstream. Dropping it leaves it running until the
/// runtime ends; [`FakeUpstream::stop`] stops it.
#[derive(Debug, Clone)]
pub struct FakeUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeUpstream {
    /// Starts the fake on `addr` (use `127.0.0.1:0` for a free port).
    ///
    /// # Errors
    /// When `addr` cannot be bound.
    pub async fn start(addr: &str) -> std::io::Result<FakeUpstream> {
        // As deep a backlog as gale's own: the seed's burst of 1,000 calls
        // must not wait for SYN retransmits here either.
        let listener = gale_engine::listener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            calls: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            peak_in_flight: AtomicU64::new(0),
            latency_ms: AtomicU64::new(0),
            error_ppm: AtomicU64::new(0),
            mode: Mutex::new(Mode::Normal),
            city_latency_ms: Mutex::new(HashMap::new()),
            city_status: Mutex::new(HashMap::new()),
            exact_status: Mutex::new(HashMap::new()),
            queries: Mutex::new(VecDeque::new()),
        });
        let stop = CancellationToken::new();
        let app = Router::new()
            .route("/data/2.5/weather", get(owm_weather))
            .route("/v1/search", get(om_search))
            .route("/v1/forecast", get(om_forecast))
            .route("/stats", get(stats))
            .route("/backend/{*kind}", post(backend))
            .with_state(shared.clone());
        let token = stop.clone();
        tokio::spawn(async move {
            let server = axum::serve(listener, app).with_graceful_shutdown(token.cancelled_owned());
            if let Err(e) = server.await {
                tracing::error!(error = %e, "fake upstream failed");
            }
        });
        Ok(FakeUpstream { addr, shared, stop })
    }

    /// Its base URL, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// HTTP calls answered so far (Open-Meteo lookups make two).
    pub fn calls(&self) -> u64 {
        self.shared.calls.load(Ordering::SeqCst)
    }

    /// The most calls it was answering at once.
    pub fn peak_in_flight(&self) -> u64 {
        self.shared.peak_in_flight.load(Ordering::SeqCst)
    }

    /// Delay before every answer.
    pub fn set_latency(&self, latency: Duration) {
        self.shared
            .latency_ms
            .store(latency.as_millis() as u64, Ordering::SeqCst);
    }

    /// Delay for one city (case-insensitive), instead of the global one.
    pub fn set_city_latency(&self, city: &str, latency: Duration) {
        lock(&self.shared.city_latency_ms).insert(city.to_lowercase(), latency.as_millis() as u64);
    }

    /// Answer calls for one city (case-insensitive) with this HTTP status,
    /// as a provider does for a name it cannot parse (400), whatever the
    /// mode.
    pub fn set_city_status(&self, city: &str, status: u16) {
        lock(&self.shared.city_status).insert(city.to_lowercase(), status);
    }

    /// Answer calls whose city is exactly `text` (byte for byte) with this
    /// HTTP status: a provider that does not know an unusual spelling
    /// (a look-alike character, say) of a name it knows.
    pub fn set_exact_status(&self, text: &str, status: u16) {
        lock(&self.shared.exact_status).insert(text.to_owned(), status);
    }

    /// Fraction of calls (0.0–1.0) answered with 500, spread evenly.
    pub fn set_error_rate(&self, rate: f64) {
        let ppm = (rate.clamp(0.0, 1.0) * 1_000_000.0) as u64;
        self.shared.error_ppm.store(ppm, Ordering::SeqCst);
    }

    /// How every call is answered.
    pub fn set_mode(&self, mode: Mode) {
        *lock(&self.shared.mode) = mode;
    }

    /// The query parameters of recent calls, oldest first.
    pub fn queries(&self) -> Vec<Vec<(String, String)>> {
        lock(&self.shared.queries).iter().cloned().collect()
    }

    /// Stops serving.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

type Params = Query<Vec<(String, String)>>;

fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Counts the call, records it, sleeps, and applies the failure mode.
/// `Err` is the response to send instead of a normal answer.
async fn admit(s: &Shared, q: &[(String, String)], city: Option<&str>) -> Result<(), Response> {
    let n = s.calls.fetch_add(1, Ordering::SeqCst);
    let _answering = Answering::enter(s);
    {
        let mut queries = lock(&s.queries);
        if queries.len() == KEPT_QUERIES {
            queries.pop_front();
        }
        queries.push_back(q.to_vec());
    }
    let latency = city
        .and_then(|c| lock(&s.city_latency_ms).get(&c.to_lowercase()).copied())
        .unwrap_or_else(|| s.latency_ms.load(Ordering::SeqCst));
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    if let Some(code) = city.and_then(|c| lock(&s.city_status).get(&c.to_lowercase()).copied()) {
        return Err(status(code));
    }
    if let Some(code) = city.and_then(|c| lock(&s.exact_status).get(c).copied()) {
        return Err(status(code));
    }
    let ppm = s.error_ppm.load(Ordering::SeqCst);
    // Evenly spread: call n fails when the running total of errors steps up.
    if ppm > 0 && (n + 1) * ppm / 1_000_000 > n * ppm / 1_000_000 {
        return Err(status(500));
    }
    match *lock(&s.mode) {
        Mode::Normal => Ok(()),
        Mode::Status(code) => Err(status(code)),
        Mode::Garbage => Err((StatusCode::OK, "<html>not json</html>").into_response()),
    }
}

/// `POST /backend/…`: an application backend that allows everything,
/// for measuring what the proxies cost.
async fn backend(State(s): State<Arc<Shared>>) -> Response {
    match admit(&s, &[], None).await {
        Ok(()) => axum::Json(json!({"result": {}})).into_response(),
        Err(failure) => failure,
    }
}

/// One call being answered, for the in-flight count (left however the
/// handler ends, the caller hanging up included).
struct Answering<'a>(&'a Shared);

impl<'a> Answering<'a> {
    fn enter(s: &'a Shared) -> Self {
        let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        s.peak_in_flight.fetch_max(now, Ordering::SeqCst);
        Answering(s)
    }
}

impl Drop for Answering<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn status(code: u16) -> Response {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        axum::Json(json!({"cod": code.as_u16(), "message": "fake upstream failure"})),
    )
        .into_response()
}

/// The name a provider gives a city, whatever case it was asked in:
/// each word capitalised ("new york" → "New York").
fn display_name(city: &str) -> String {
    city.split_whitespace()
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect::<String>())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn exists(city: &str) -> bool {
    let c = city.trim().to_lowercase();
    !(c == "atlantis" || c.starts_with("nowhere"))
}

/// A stable pseudo-reading derived from the city's name.
fn reading(city: &str) -> (f64, f64, u32, u16) {
    let h = city
        .to_lowercase()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    // Whole tenths, so the JSON shows 12.5 rather than 12.499999999.
    let temp = ((h % 400) as i64 - 50) as f64 / 10.0;
    let feels = ((h % 400) as i64 - 50 - (h % 30) as i64) as f64 / 10.0;
    let humidity = 30 + (h % 70) as u32;
    (
        temp,
        feels,
        humidity,
        CONDITIONS[(h % CONDITIONS.len() as u64) as usize].0,
    )
}

/// The conditions the fake reports: WMO codes (as Open-Meteo gives them)
/// with the words OpenWeatherMap gives instead.
const CONDITIONS: [(u16, &str); 10] = [
    (0, "clear sky"),
    (1, "mainly clear"),
    (2, "partly cloudy"),
    (3, "overcast"),
    (45, "fog"),
    (61, "slight rain"),
    (63, "moderate rain"),
    (71, "slight snow fall"),
    (80, "slight rain showers"),
    (95, "thunderstorm"),
];

/// What OpenWeatherMap would say for `code`.
fn describe(code: u16) -> &'static str {
    CONDITIONS
        .iter()
        .find(|(c, _)| *c == code)
        .map_or("unknown conditions", |(_, d)| *d)
}

async fn owm_weather(State(s): State<Arc<Shared>>, Query(q): Params) -> Response {
    let city = param(&q, "q").unwrap_or_default().to_owned();
    if let Err(resp) = admit(&s, &q, Some(&city)).await {
        return resp;
    }
    match param(&q, "appid") {
        None | Some("") | Some("bad-key") => {
            return (
                StatusCode::UNAUTHORIZED,
                axum::Json(json!({"cod": 401, "message": "Invalid API key."})),
            )
                .into_response();
        }
        Some(_) => {}
    }
    if !exists(&city) {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"cod": "404", "message": "city not found"})),
        )
            .into_response();
    }
    let (temp, feels, humidity, code) = reading(&city);
    axum::Json(json!({
        "name": display_name(&city),
        "cod": 200,
        "main": {"temp": temp, "feels_like": feels, "humidity": humidity, "pressure": 1012},
        "weather": [{"id": 800, "main": "Weather", "description": describe(code)}],
    }))
    .into_response()
}

async fn om_search(State(s): State<Arc<Shared>>, Query(q): Params) -> Response {
    let city = param(&q, "name").unwrap_or_default().to_owned();
    if let Err(resp) = admit(&s, &q, Some(&city)).await {
        return resp;
    }
    if !exists(&city) {
        return axum::Json(json!({"generationtime_ms": 0.1})).into_response();
    }
    let (temp, feels, _, _) = reading(&city);
    // Encode the city in the coordinates so the forecast call can find
    // the same reading again.
    axum::Json(json!({
        "results": [{"name": display_name(&city), "latitude": temp, "longitude": feels, "country": "Fakeland"}],
    }))
    .into_response()
}

async fn om_forecast(State(s): State<Arc<Shared>>, Query(q): Params) -> Response {
    if let Err(resp) = admit(&s, &q, None).await {
        return resp;
    }
    let num = |name| param(&q, name).and_then(|v| v.parse::<f64>().ok());
    let (Some(temp), Some(feels)) = (num("latitude"), num("longitude")) else {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": true, "reason": "latitude and longitude required"})),
        )
            .into_response();
    };
    let code = ((temp * 10.0).abs() as u64 % 4) as u16;
    axum::Json(json!({
        "current": {
            "time": "2026-11-23T12:00",
            "interval": 900,
            "temperature_2m": temp,
            "relative_humidity_2m": 30 + ((feels * 10.0).abs() as u64 % 70),
            "apparent_temperature": feels,
            "weather_code": code,
        }
    }))
    .into_response()
}

async fn stats(State(s): State<Arc<Shared>>) -> Response {
    axum::Json(json!({
        "calls": s.calls.load(Ordering::SeqCst),
        "in_flight": s.in_flight.load(Ordering::SeqCst),
        "peak_in_flight": s.peak_in_flight.load(Ordering::SeqCst),
    }))
    .into_response()
}
