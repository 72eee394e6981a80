//! The weather application's events: a lookup, and live updates for a
//! city (its refresh loop is in [`super::feeds`]).

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use super::feeds::{self, Feeds};
use super::hub_error;
use crate::config::Rate;
use crate::connection::recorded_lookup;
use crate::protocol::{ErrorBody, normalise_city, parse_city};
use crate::router::{Ctx, HandlerResult, Payload, Policy, Registry, invalid_field};
use crate::weather::WeatherError;

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
async fn weather_subscribe(ctx: Ctx, req: CityRequest) -> HandlerResult {
    let app = &ctx.app;
    let reading = recorded_lookup(app, ctx.caller.conn_id, &req.city)
        .await
        .map_err(lookup_error)?;
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
