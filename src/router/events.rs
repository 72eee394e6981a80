//! The events gale ships, each registered with its payload type and its
//! built-in policy (overridable per event in the config file).

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Ctx, HandlerResult, Payload, Policy, Registry, invalid_field};
use crate::config::{Priority, Rate};
use crate::protocol::{ErrorBody, parse_city};
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

async fn weather_get(ctx: Ctx, req: CityRequest) -> HandlerResult {
    match ctx.app.weather.lookup(&req.city).await {
        Ok(r) => Ok(json!({
            "city": r.city,
            "temperature": r.temperature,
            "feels_like": r.feels_like,
            "description": r.description,
            "humidity": r.humidity,
        })),
        Err(WeatherError::InvalidCity(e)) => Err(invalid_field("city", e.to_string())),
        Err(e) => Err(ErrorBody::new(e.code(), e.to_string())),
    }
}

/// `server.stats`: live counters for dashboards.
async fn server_stats(ctx: Ctx, _: Value) -> HandlerResult {
    let app = &ctx.app;
    let mut stats = app.metrics.to_json();
    stats["router-queue-depth"] = json!(app.router.queue_depth());
    stats["cached-cities"] = json!(app.weather.cached_cities());
    Ok(stats)
}
