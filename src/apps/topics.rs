//! Topics: clients subscribe, backends and handlers publish.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::hub_error;
use crate::history::Since;
use crate::protocol::ErrorBody;
use crate::router::{
    Answer, AnswerResult, Ctx, HandlerResult, Payload, Policy, Registry, invalid_field,
};

/// Registers this application's events.
pub(crate) fn register(r: &mut Registry) {
    r.register_answer("topic.subscribe", Policy::default(), topic_subscribe);
    r.register("topic.unsubscribe", Policy::default(), topic_unsubscribe);
}

/// `topic.unsubscribe {topic}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicRequest {
    topic: String,
}

/// `topic.subscribe {topic, since?}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscribeRequest {
    topic: String,
    /// The position to recover from.
    since: Option<Since>,
}

impl Payload for SubscribeRequest {
    fn validate(&self) -> Result<(), ErrorBody> {
        TopicRequest {
            topic: self.topic.clone(),
        }
        .validate()?;
        validate_since(self.since.as_ref())
    }
}

/// Checks a `since` as a client sent it.
pub(crate) fn validate_since(since: Option<&Since>) -> Result<(), ErrorBody> {
    match since {
        Some(s) if s.epoch.is_empty() || s.epoch.len() > 64 => Err(invalid_field(
            "since",
            "since.epoch must be the epoch of a push or reply (1 to 64 characters)",
        )),
        _ => Ok(()),
    }
}

/// Adds a topic's position to a subscribe reply (`fields`) and, given
/// `since`, what the client missed: `recovered` and `publications`. The
/// publications are spliced in as the exact texts once pushed, not parsed
/// and encoded again: a reconnecting crowd's replies are mostly these.
/// Only a position when the topic keeps no history is added nothing to.
pub(crate) async fn answer_with_recovery(
    ctx: &Ctx,
    topic: &str,
    since: Option<Since>,
    mut fields: Map<String, Value>,
) -> Answer {
    let asked = since.is_some();
    let found = match ctx.app.hub.recover(topic, since).await {
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => {
            tracing::debug!(topic, error = %e, "recovery read failed");
            None
        }
        // A topic without history has nothing to recover from.
        None => None,
    };
    let Some(r) = found else {
        if asked {
            fields.insert("recovered".into(), Value::Bool(false));
            ctx.app.metrics.recovery_lost.inc();
        }
        return Answer::Value(Value::Object(fields));
    };
    fields.insert("offset".into(), json!(r.position.offset));
    fields.insert("epoch".into(), json!(&*r.position.epoch));
    if !asked {
        return Answer::Value(Value::Object(fields));
    }
    // The reply must fit in one message: past that the client resyncs.
    let room = ctx
        .app
        .config
        .server
        .max_outbound_message_bytes
        .saturating_sub(4096);
    let publications = r
        .publications
        .filter(|p| p.iter().map(|t| t.len() + 1).sum::<usize>() <= room);
    fields.insert("recovered".into(), Value::Bool(publications.is_some()));
    let Some(publications) = publications else {
        ctx.app.metrics.recovery_lost.inc();
        fields.insert("publications".into(), Value::Array(Vec::new()));
        return Answer::Value(Value::Object(fields));
    };
    ctx.app.metrics.recovered.inc();
    let head = Value::Object(fields).to_string();
    let head = head.strip_suffix('}').unwrap_or(&head);
    let mut out = String::with_capacity(
        head.len() + 20 + publications.iter().map(|t| t.len() + 1).sum::<usize>(),
    );
    out.push_str(head);
    out.push_str(if head.len() > 1 { "," } else { "" });
    out.push_str("\"publications\":[");
    for (i, p) in publications.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(p.as_str());
    }
    out.push_str("]}");
    Answer::Encoded(out)
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

async fn topic_subscribe(ctx: Ctx, req: SubscribeRequest) -> AnswerResult {
    let added = ctx
        .app
        .hub
        .subscribe(ctx.caller.conn_id, &req.topic)
        .map_err(hub_error)?;
    let mut reply = Map::new();
    reply.insert("topic".into(), json!(req.topic));
    reply.insert("subscribed".into(), Value::Bool(true));
    reply.insert("new".into(), Value::Bool(added));
    Ok(answer_with_recovery(&ctx, &req.topic, req.since, reply).await)
}

async fn topic_unsubscribe(ctx: Ctx, req: TopicRequest) -> HandlerResult {
    let was = ctx.app.hub.unsubscribe(ctx.caller.conn_id, &req.topic);
    Ok(json!({ "topic": req.topic, "unsubscribed": was }))
}
