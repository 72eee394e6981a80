//! Topics: clients subscribe, backends and handlers publish.

use serde::Deserialize;
use serde_json::json;

use super::hub_error;
use crate::protocol::ErrorBody;
use crate::router::{Ctx, HandlerResult, Payload, Policy, Registry, invalid_field};

/// Registers this application's events.
pub(crate) fn register(r: &mut Registry) {
    r.register("topic.subscribe", Policy::default(), topic_subscribe);
    r.register("topic.unsubscribe", Policy::default(), topic_unsubscribe);
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
