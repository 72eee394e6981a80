//! The weather application: a city name sent as plain text, the
//! `weather.get` event, and live updates for a city (its refresh loop is
//! in [`crate::feeds`]). Every request, however it came, is counted and
//! written to the request log ([`Recording`]).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use gale_engine::builtin::{answer_with_recovery, hub_error, topics::validate_since};
use gale_engine::config::Rate;
use gale_engine::metrics::{Outcome, Part};
use gale_engine::protocol::{ErrorBody, ErrorCode};
use gale_engine::router::{AnswerResult, Ctx, HandlerResult, Payload, Policy, invalid_field};
use gale_engine::server::{App, Builder};
use gale_engine::websocket::Utf8Bytes;
use gale_store::{RequestLog, RequestRecord};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::Instant;
use uuid::Uuid;

use crate::city::{echoed_city, normalise_city, parse_city};
use crate::feeds::{self, Feeds};
use crate::metrics::WeatherMetrics;
use crate::{BuildError, Reading, Weather, WeatherConfig, WeatherError};

/// What a new connection is told: the seed's greeting.
pub const GREETING: &str = "Send city name to get weather";

/// The weather service, installed on a server: its lookups, its request
/// log, its metrics and its live feeds.
#[derive(Debug)]
pub struct WeatherApp {
    weather: Weather,
    log: RequestLog,
    metrics: Arc<WeatherMetrics>,
    feeds: Arc<Feeds>,
    refresh: Duration,
}

impl WeatherApp {
    /// Builds the weather service from `[weather]` and installs it on
    /// `builder`: the plain-text handler (a city name) and its greeting,
    /// `weather.get`, `weather.subscribe` and `weather.unsubscribe`, the
    /// `weather:` topics (joined with `weather.subscribe` only), its
    /// metrics, and, in cluster mode, the cache shared by every node.
    /// Every request is written to `log`.
    ///
    /// # Errors
    /// [`BuildError`] when the provider's HTTP client cannot be built.
    pub fn install(
        builder: &mut Builder,
        cfg: &WeatherConfig,
        log: RequestLog,
    ) -> Result<Arc<WeatherApp>, BuildError> {
        let metrics = WeatherMetrics::register(builder.metrics());
        let mut weather = Weather::from_config(cfg, metrics.clone())?;
        weather.share(builder.cluster().cloned());
        let me = Arc::new(WeatherApp {
            weather,
            log,
            metrics,
            feeds: Arc::default(),
            refresh: Duration::from_secs(cfg.refresh_s),
        });
        builder.metrics().add_part(me.clone());
        let m = me.clone();
        // Only the connection's id goes into the answer: every request in
        // flight holds its future (9,000 at once in the seed's scenario).
        builder.text(GREETING, move |ctx, text| {
            answer_text(m.clone(), ctx.caller.conn_id, text)
        });
        builder.reserve_topics(
            "weather:",
            "weather: topics are joined with weather.subscribe",
        );
        me.register(builder);
        let m = me.clone();
        builder.on_resume(move |app, topics| m.resume_feeds(&app, &topics));
        tracing::info!(provider = ?cfg.provider, "weather service ready");
        Ok(me)
    }

    /// After a takeover: the feeds of the cities the connections taken
    /// over are subscribed to, which `weather.subscribe` started in the
    /// previous process.
    fn resume_feeds(self: &Arc<Self>, app: &Arc<App>, topics: &[String]) {
        for key in topics.iter().filter_map(|t| t.strip_prefix("weather:")) {
            let (me, app, key) = (self.clone(), app.clone(), key.to_owned());
            tokio::spawn(async move {
                match me.weather.lookup(&key).await {
                    Ok(reading) => {
                        let m = me.clone();
                        let lookup = move |city: String| {
                            let m = m.clone();
                            async move { m.weather.lookup(&city).await }
                        };
                        me.feeds
                            .ensure(&app, me.refresh, lookup, (key.clone(), key), reading);
                    }
                    Err(e) => {
                        tracing::warn!(city = %key, error = %e, "weather feed not resumed")
                    }
                }
            });
        }
    }

    /// Registers this application's events.
    fn register(self: &Arc<Self>, builder: &mut Builder) {
        let r = builder.registry();
        let m = self.clone();
        r.register(
            "weather.get",
            Policy {
                // Longer than any lookup deadline: the lookup's own
                // deadline answers first, with its own message.
                timeout: Duration::from_secs(60),
                ..Policy::default()
            },
            move |ctx, req| weather_get(m.clone(), ctx, req),
        );
        let m = self.clone();
        r.register_answer(
            "weather.subscribe",
            Policy {
                rate_limit: Some(Rate {
                    count: 30,
                    per: Duration::from_secs(60),
                }),
                timeout: Duration::from_secs(60),
                ..Policy::default()
            },
            move |ctx, req| weather_subscribe(m.clone(), ctx, req),
        );
        r.register(
            "weather.unsubscribe",
            Policy::default(),
            weather_unsubscribe,
        );
    }

    /// The weather lookups, for callers outside an event (benchmarks, an
    /// application's own routes).
    pub fn weather(&self) -> &Weather {
        &self.weather
    }

    /// The service's metrics.
    pub fn metrics(&self) -> &Arc<WeatherMetrics> {
        &self.metrics
    }
}

impl Part for WeatherApp {
    fn refresh(&self) {
        // Open turns half-open with time alone, with no call to say so.
        self.metrics
            .breaker_state
            .set(self.weather.breaker_state() as i64);
    }

    fn json(&self, out: &mut serde_json::Map<String, serde_json::Value>) {
        self.metrics.json(out);
        out.insert("cached-cities".into(), self.weather.cached_cities().into());
        out.insert(
            "cities-in-flight".into(),
            self.weather.cities_in_flight().into(),
        );
        out.insert("weather-feeds".into(), self.feeds.len().into());
    }
}

/// `weather.get {city}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CityRequest {
    city: String,
}

/// `weather.subscribe {city, since?}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscribeRequest {
    city: String,
    /// The position to recover from.
    since: Option<gale_engine::history::Since>,
}

impl Payload for SubscribeRequest {
    fn validate(&self) -> Result<(), ErrorBody> {
        parse_city(&self.city)
            .map(drop)
            .map_err(|e| invalid_field("city", e.to_string()))?;
        validate_since(self.since.as_ref())
    }
}

impl Payload for CityRequest {
    fn validate(&self) -> Result<(), ErrorBody> {
        parse_city(&self.city)
            .map(drop)
            .map_err(|e| invalid_field("city", e.to_string()))
    }
}

fn lookup_error(e: WeatherError) -> ErrorBody {
    match e {
        WeatherError::InvalidCity(_) | WeatherError::Refused(_) => {
            invalid_field("city", e.to_string())
        }
        e => ErrorBody::new(e.code(), e.to_string()),
    }
}

async fn weather_get(me: Arc<WeatherApp>, ctx: Ctx, req: CityRequest) -> HandlerResult {
    match recorded_lookup(&me, ctx.caller.conn_id, &req.city).await {
        Ok(r) => Ok(json!({
            "city": r.city,
            "temperature": r.temperature,
            "feels_like": r.feels_like,
            "description": r.description,
            "humidity": r.humidity,
        })),
        Err(e) => Err(lookup_error(e)),
    }
}

/// `weather.subscribe {city}`: replies with the current reading, then
/// `weather.update` pushes follow whenever it refreshes.
async fn weather_subscribe(me: Arc<WeatherApp>, ctx: Ctx, req: SubscribeRequest) -> AnswerResult {
    let app = &ctx.app;
    let reading = recorded_lookup(&me, ctx.caller.conn_id, &req.city)
        .await
        .map_err(lookup_error)?;
    let key = normalise_city(req.city.trim());
    let topic = feeds::topic(&key);
    app.hub
        .subscribe(ctx.caller.conn_id, &topic)
        .map_err(hub_error)?;
    let mut fields = match feeds::reading_json(&reading) {
        serde_json::Value::Object(fields) => fields,
        _ => serde_json::Map::new(),
    };
    fields.insert("topic".into(), json!(topic));
    let answer = answer_with_recovery(&ctx, &topic, req.since, fields).await;
    let m = me.clone();
    let lookup = move |city: String| {
        let m = m.clone();
        async move { m.weather.lookup(&city).await }
    };
    let city = req.city.trim().to_owned();
    me.feeds
        .ensure(app, me.refresh, lookup, (key, city), reading);
    Ok(answer)
}

async fn weather_unsubscribe(ctx: Ctx, req: CityRequest) -> HandlerResult {
    let key = normalise_city(req.city.trim());
    let was = ctx
        .app
        .hub
        .unsubscribe(ctx.caller.conn_id, &feeds::topic(&key));
    Ok(json!({ "city": req.city.trim(), "unsubscribed": was }))
}

/// The reply to a plain-text message, in the seed's shape.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum TextReply<'a> {
    /// A reading for the requested city.
    Weather {
        city: &'a str,
        temperature: f64,
        feels_like: f64,
        description: &'a str,
        humidity: u32,
    },
    /// The lookup failed.
    Error {
        code: ErrorCode,
        message: &'a str,
        /// The city as the client sent it, so a client with several
        /// requests in flight can match the reply.
        city: &'a str,
    },
}

impl TextReply<'_> {
    fn to_json(&self) -> String {
        // Plain structs with string keys: serialising cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","code":"internal_error","message":"internal error"}"#.to_owned()
        })
    }
}

/// The seed's reply to a city name that was found:
/// `{"type":"weather","city",…}`.
pub fn reading_reply(r: &Reading) -> String {
    TextReply::Weather {
        city: &r.city,
        temperature: r.temperature,
        feels_like: r.feels_like,
        description: &r.description,
        humidity: r.humidity,
    }
    .to_json()
}

/// The plain-text path: a city name as a text message. Looks up the
/// city, records the request, and returns the reply text.
async fn answer_text(me: Arc<WeatherApp>, client_id: Uuid, text: Utf8Bytes) -> String {
    match recorded_lookup(&me, client_id, text.as_str()).await {
        Ok(reading) => reading_reply(&reading),
        Err(e) => {
            let message = e.to_string();
            TextReply::Error {
                code: e.code(),
                message: &message,
                city: echoed_city(text.as_str()),
            }
            .to_json()
        }
    }
}

/// A client's weather request, however it came (plain text or a
/// `weather.get` / `weather.subscribe` event): the lookup, counted in the
/// request metrics, and one row in the request log.
pub(crate) async fn recorded_lookup(
    me: &WeatherApp,
    client_id: Uuid,
    city: &str,
) -> Result<Arc<Reading>, WeatherError> {
    let recording = Recording::start(&me.metrics, &me.log, client_id, city);
    let result = me.weather.lookup(city).await;
    recording.finish(
        result
            .as_ref()
            .map(|r| r.temperature)
            .map_err(WeatherError::code),
    );
    result
}

/// One weather request being recorded: counted in `requests` when it
/// starts, and in exactly one outcome with one request-log row when it
/// ends, however it ends. A lookup dropped before it finished (its
/// handler's timeout cut it off) is recorded as `timeout`; one unwound by
/// a panic as `internal_error`. So `requests = successful + failed` and
/// every request has its row.
pub(crate) struct Recording<'a> {
    metrics: &'a WeatherMetrics,
    log: &'a RequestLog,
    client_id: Uuid,
    city: &'a str,
    started: Instant,
    created_at: chrono::DateTime<Utc>,
    done: bool,
}

impl<'a> Recording<'a> {
    /// Counts the request.
    pub(crate) fn start(
        metrics: &'a WeatherMetrics,
        log: &'a RequestLog,
        client_id: Uuid,
        city: &'a str,
    ) -> Self {
        metrics.requests.inc();
        Recording {
            metrics,
            log,
            client_id,
            city,
            started: Instant::now(),
            created_at: Utc::now(),
            done: false,
        }
    }

    /// Records how the request ended: the temperature sent, or the error.
    pub(crate) fn finish(mut self, result: Result<f64, ErrorCode>) {
        self.done = true;
        self.record(result);
    }

    fn record(&self, result: Result<f64, ErrorCode>) {
        let latency_ms = u32::try_from(self.started.elapsed().as_millis()).unwrap_or(u32::MAX);
        let (ok, temperature, error) = match result {
            Ok(t) => {
                self.metrics.outcome(Outcome::Ok).inc();
                (true, Some(t), None)
            }
            Err(code) => {
                self.metrics.outcome(Outcome::from(code)).inc();
                (false, None, Some(code.as_str()))
            }
        };
        self.log.record(RequestRecord {
            client_id: self.client_id,
            city: RequestRecord::stored_city(self.city.trim()),
            ok,
            temperature,
            error,
            latency_ms,
            created_at: self.created_at,
        });
    }
}

impl Drop for Recording<'_> {
    fn drop(&mut self) {
        if !self.done {
            let code = if std::thread::panicking() {
                ErrorCode::InternalError
            } else {
                ErrorCode::Timeout
            };
            self.record(Err(code));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[tokio::test]
    async fn a_request_cut_short_is_still_counted_and_logged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let db = gale_store::Db::connect(&url, 1).await.expect("open");
        db.migrate().await.expect("migrate");
        let metrics = Arc::new(WeatherMetrics::default());
        let cfg = gale_store::StoreConfig::default();
        let store_metrics = Arc::new(gale_store::StoreMetrics::default());
        let (log, writers) = gale_store::spawn_writers(db.clone(), &cfg, store_metrics);
        let client_id = Uuid::new_v4();

        // Unwound by a panic (a provider bug, say), as the router's
        // catch_unwind sees it.
        let caught = std::panic::AssertUnwindSafe(async {
            let _recording = Recording::start(&metrics, &log, client_id, "Oslo");
            tokio::task::yield_now().await;
            panic!("deliberate, in a test");
        })
        .catch_unwind()
        .await;
        assert!(caught.is_err());
        // Dropped unfinished, as a handler timeout drops it.
        let cut = tokio::time::timeout(Duration::from_millis(10), async {
            let _recording = Recording::start(&metrics, &log, client_id, "Lima");
            std::future::pending::<()>().await;
        })
        .await;
        assert!(cut.is_err());
        // Finished normally.
        Recording::start(&metrics, &log, client_id, "Rome").finish(Ok(21.5));

        writers
            .drain(Duration::from_secs(5))
            .await
            .expect("drained");
        assert_eq!(metrics.requests.get(), 3);
        assert_eq!(metrics.successful() + metrics.failed(), 3);
        assert_eq!(metrics.outcome(Outcome::InternalError).get(), 1);
        assert_eq!(metrics.outcome(Outcome::Timeout).get(), 1);
        let pool = sqlx::SqlitePool::connect(&url).await.expect("open");
        let rows: Vec<(String, Option<String>)> =
            sqlx::query_as("SELECT city, error FROM weather_requests ORDER BY id")
                .fetch_all(&pool)
                .await
                .expect("rows");
        assert_eq!(
            rows,
            [
                ("Oslo".to_owned(), Some("internal_error".to_owned())),
                ("Lima".to_owned(), Some("timeout".to_owned())),
                ("Rome".to_owned(), None),
            ]
        );
    }
}
