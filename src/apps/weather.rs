//! The weather application: a city name sent as plain text, the
//! `weather.get` event, and live updates for a city (its refresh loop is
//! in [`super::feeds`]). Every request, however it came, is counted and
//! written to the request log ([`Recording`]).

use std::sync::Arc;
use std::time::Duration;

use crate::websocket::Utf8Bytes;
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;
use uuid::Uuid;

use super::feeds::{self, Feeds};
use super::hub_error;
use crate::config::Rate;
use crate::metrics::Outcome;
use crate::protocol::{
    ErrorBody, ErrorCode, ServerMessage, echoed_city, normalise_city, parse_city,
};
use crate::router::{AnswerResult, Ctx, HandlerResult, Payload, Policy, Registry, invalid_field};
use crate::server::App;
use crate::store::RequestRecord;
use crate::weather::{Reading, WeatherError};

/// Registers this application's events.
pub(crate) fn register(r: &mut Registry) {
    r.register(
        "weather.get",
        Policy {
            // Longer than any lookup deadline: the lookup's own deadline
            // answers first, with its own message.
            timeout: Duration::from_secs(60),
            ..Policy::default()
        },
        weather_get,
    );
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
        weather_subscribe,
    );
    r.register(
        "weather.unsubscribe",
        Policy::default(),
        weather_unsubscribe,
    );
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
    since: Option<crate::history::Since>,
}

impl Payload for SubscribeRequest {
    fn validate(&self) -> Result<(), ErrorBody> {
        parse_city(&self.city)
            .map(drop)
            .map_err(|e| invalid_field("city", e.to_string()))?;
        super::topics::validate_since(self.since.as_ref())
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

async fn weather_get(ctx: Ctx, req: CityRequest) -> HandlerResult {
    match recorded_lookup(&ctx.app, ctx.caller.conn_id, &req.city).await {
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
async fn weather_subscribe(ctx: Ctx, req: SubscribeRequest) -> AnswerResult {
    let app = &ctx.app;
    let reading = recorded_lookup(app, ctx.caller.conn_id, &req.city)
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
    let answer = super::topics::answer_with_recovery(&ctx, &topic, req.since, fields).await;
    Feeds::ensure(app, key, req.city.trim().to_owned(), reading);
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

/// The plain-text path: a city name as a text message. Looks up the
/// city, records the request, and returns the reply text.
pub(crate) async fn answer_text(app: Arc<App>, client_id: Uuid, text: Utf8Bytes) -> String {
    match recorded_lookup(&app, client_id, text.as_str()).await {
        Ok(reading) => ServerMessage::weather(&reading).to_json(),
        Err(e) => {
            let message = e.to_string();
            ServerMessage::Error {
                code: e.code(),
                message: &message,
                city: Some(echoed_city(text.as_str())),
            }
            .to_json()
        }
    }
}

/// A client's weather request, however it came (plain text or a
/// `weather.get` / `weather.subscribe` event): the lookup, counted in the
/// request metrics, and one row in the request log.
pub(crate) async fn recorded_lookup(
    app: &App,
    client_id: Uuid,
    city: &str,
) -> Result<Arc<Reading>, WeatherError> {
    let recording = Recording::start(&app.metrics, &app.log, client_id, city);
    let result = app.weather.lookup(city).await;
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
    metrics: &'a crate::metrics::Metrics,
    log: &'a crate::store::RequestLog,
    client_id: Uuid,
    city: &'a str,
    started: Instant,
    created_at: chrono::DateTime<Utc>,
    done: bool,
}

impl<'a> Recording<'a> {
    /// Counts the request.
    pub(crate) fn start(
        metrics: &'a crate::metrics::Metrics,
        log: &'a crate::store::RequestLog,
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
        let db = crate::store::Db::connect(&url, 1).await.expect("open");
        db.migrate().await.expect("migrate");
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let cfg = crate::config::StoreConfig::default();
        let (log, writers) = crate::store::spawn_writers(db.clone(), &cfg, metrics.clone());
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
