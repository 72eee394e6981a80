//! The events gale ships, each registered with its payload type and its
//! built-in policy (overridable per event in the config file).

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Ctx, HandlerResult, Payload, Policy, Registry, invalid_field};
use crate::broadcast::HubError;
use crate::config::{Priority, Rate};
use crate::feeds::{self, Feeds};
use crate::protocol::{ErrorBody, ErrorCode, normalise_city, parse_city};
use crate::weather::WeatherError;

pub(super) fn register(r: &mut Registry) {
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
    r.register(
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
    r.register("topic.subscribe", Policy::default(), topic_subscribe);
    r.register("topic.unsubscribe", Policy::default(), topic_unsubscribe);
    r.register(
        "server.stats",
        Policy {
            rate_limit: Some(Rate {
                count: 10,
                per: Duration::from_secs(1),
            }),
            timeout: Duration::from_secs(2),
            priority: Priority::High,
            ..Policy::default()
        },
        server_stats,
    );
}

/// `weather.get {city}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CityRequest {
    city: String,
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
        WeatherError::InvalidCity(e) => invalid_field("city", e.to_string()),
        e => ErrorBody::new(e.code(), e.to_string()),
    }
}

async fn weather_get(ctx: Ctx, req: CityRequest) -> HandlerResult {
    match ctx.app.weather.lookup(&req.city).await {
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

fn hub_error(e: HubError) -> ErrorBody {
    ErrorBody::new(ErrorCode::Forbidden, e.to_string())
}

/// `weather.subscribe {city}`: replies with the current reading, then
/// `weather.update` pushes follow whenever it refreshes.
async fn weather_subscribe(ctx: Ctx, req: CityRequest) -> HandlerResult {
    let app = &ctx.app;
    let reading = app.weather.lookup(&req.city).await.map_err(lookup_error)?;
    let key = normalise_city(req.city.trim());
    app.hub
        .subscribe(ctx.caller.conn_id, &feeds::topic(&key))
        .map_err(hub_error)?;
    let reply = feeds::reading_json(&reading);
    Feeds::ensure(app, key, req.city.trim().to_owned(), reading);
    Ok(reply)
}

async fn weather_unsubscribe(ctx: Ctx, req: CityRequest) -> HandlerResult {
    let key = normalise_city(req.city.trim());
    let was = ctx
        .app
        .hub
        .unsubscribe(ctx.caller.conn_id, &feeds::topic(&key));
    Ok(json!({ "city": req.city.trim(), "unsubscribed": was }))
}

/// `topic.subscribe {topic}` / `topic.unsubscribe {topic}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicRequest {
    topic: String,
}

/// Longest topic name.
const MAX_TOPIC_CHARS: usize = 128;

impl Payload for TopicRequest {
    fn validate(&self) -> Result<(), ErrorBody> {
        let t = &self.topic;
        if t.is_empty() || t.chars().nth(MAX_TOPIC_CHARS).is_some() {
            return Err(invalid_field("topic", "topic must be 1 to 128 characters"));
        }
        if t.chars().any(char::is_control) {
            return Err(invalid_field("topic", "topic contains control characters"));
        }
        if t.starts_with("weather:") {
            return Err(invalid_field(
                "topic",
                "weather: topics are joined with weather.subscribe",
            ));
        }
        Ok(())
    }
}

async fn topic_subscribe(ctx: Ctx, req: TopicRequest) -> HandlerResult {
    let added = ctx
        .app
        .hub
        .subscribe(ctx.caller.conn_id, &req.topic)
        .map_err(hub_error)?;
    Ok(json!({ "topic": req.topic, "subscribed": true, "new": added }))
}

async fn topic_unsubscribe(ctx: Ctx, req: TopicRequest) -> HandlerResult {
    let was = ctx.app.hub.unsubscribe(ctx.caller.conn_id, &req.topic);
    Ok(json!({ "topic": req.topic, "unsubscribed": was }))
}

/// `server.stats`: live counters for dashboards.
async fn server_stats(ctx: Ctx, _: Value) -> HandlerResult {
    let app = &ctx.app;
    let mut stats = app.metrics.to_json();
    stats["router-queue-depth"] = json!(app.router.queue_depth());
    stats["cached-cities"] = json!(app.weather.cached_cities());
    stats["weather-feeds"] = json!(app.feeds.len());
    Ok(stats)
}
