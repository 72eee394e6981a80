//! Topics: clients subscribe, publish and ask who is there, as the
//! application's hooks allow ([`crate::hooks`]); backends and handlers
//! publish too.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::hub_error;
use crate::broadcast::Target;
use crate::history::Since;
use crate::hooks::Refusal;
use crate::protocol::ErrorBody;
use crate::protocol::ErrorCode;
use crate::router::{
    Answer, AnswerResult, Ctx, HandlerResult, Payload, Policy, Registry, invalid_field,
};

/// Registers this application's events.
pub(crate) fn register(r: &mut Registry) {
    r.register_answer("topic.subscribe", Policy::default(), topic_subscribe);
    r.register("topic.unsubscribe", Policy::default(), topic_unsubscribe);
    r.register("topic.publish", Policy::default(), topic_publish);
    r.register("topic.presence", Policy::default(), topic_presence);
}

/// `topic.unsubscribe {topic}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicRequest {
    topic: String,
}

/// `topic.subscribe {topic, since?, token?}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscribeRequest {
    topic: String,
    /// The position to recover from.
    since: Option<Since>,
    /// A subscription token for the topic.
    token: Option<String>,
}

/// `topic.publish {topic, data}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    topic: String,
    #[serde(default)]
    data: Value,
}

impl Payload for PublishRequest {
    fn validate(&self) -> Result<(), ErrorBody> {
        TopicRequest {
            topic: self.topic.clone(),
        }
        .validate()
    }
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
pub fn validate_since(since: Option<&Since>) -> Result<(), ErrorBody> {
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
pub async fn answer_with_recovery(
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
        Ok(())
    }
}

/// What a hook's refusal does to the connection, and the reply's error.
fn refused(ctx: &Ctx, refusal: Refusal) -> ErrorBody {
    if let Refusal::Disconnect { code, reason } = &refusal {
        ctx.caller.outbox.end(*code, reason);
    }
    refusal.body()
}

/// Refuses a topic an application keeps to itself
/// ([`crate::server::Builder::reserve_topics`]).
fn not_reserved(ctx: &Ctx, topic: &str) -> Result<(), ErrorBody> {
    match ctx
        .app
        .reserved
        .iter()
        .find(|(p, _)| topic.starts_with(&**p))
    {
        Some((_, how)) => Err(invalid_field("topic", how.to_string())),
        None => Ok(()),
    }
}

async fn topic_subscribe(ctx: Ctx, req: SubscribeRequest) -> AnswerResult {
    not_reserved(&ctx, &req.topic)?;
    let app = &ctx.app;
    app.hooks
        .subscribe(ctx.caller.who(), req.topic.clone(), req.token)
        .await
        .map_err(|r| refused(&ctx, r))?;
    let announce = app.hooks.join_leave(&req.topic);
    let added = app
        .hub
        .subscribe_announced(ctx.caller.conn_id, &req.topic, announce)
        .map_err(hub_error)?;
    let mut reply = Map::new();
    reply.insert("topic".into(), json!(req.topic));
    reply.insert("subscribed".into(), Value::Bool(true));
    reply.insert("new".into(), Value::Bool(added));
    Ok(answer_with_recovery(&ctx, &req.topic, req.since, reply).await)
}

async fn topic_unsubscribe(ctx: Ctx, req: TopicRequest) -> HandlerResult {
    not_reserved(&ctx, &req.topic)?;
    let was = ctx.app.hub.unsubscribe(ctx.caller.conn_id, &req.topic);
    Ok(json!({ "topic": req.topic, "unsubscribed": was }))
}

/// `topic.publish {topic, data}`: as the hooks allow, pushed to the
/// topic's subscribers as `topic.message`, with the publisher's user,
/// exactly as a publication from the API is (history, offsets).
async fn topic_publish(ctx: Ctx, req: PublishRequest) -> HandlerResult {
    not_reserved(&ctx, &req.topic)?;
    let app = &ctx.app;
    let subscribed = app.hub.is_subscribed(ctx.caller.conn_id, &req.topic);
    let data = app
        .hooks
        .publish(ctx.caller.who(), req.topic.clone(), subscribed, req.data)
        .await
        .map_err(|r| refused(&ctx, r))?;
    app.hub
        .publish_from(
            Target::Topic(req.topic.clone()),
            "topic.message",
            &data,
            ctx.caller.user.as_deref(),
        )
        .map_err(hub_error)?;
    Ok(json!({ "topic": req.topic, "accepted": true }))
}

/// Most subscribers one `topic.presence` lists.
pub(crate) const MAX_PRESENCE: usize = 10_000;

/// `topic.presence {topic}`: who is subscribed, on every node, for a
/// subscriber of a topic whose rules turn presence on.
async fn topic_presence(ctx: Ctx, req: TopicRequest) -> HandlerResult {
    not_reserved(&ctx, &req.topic)?;
    let app = &ctx.app;
    if !app.hooks.presence(&req.topic) {
        return Err(ErrorBody::new(
            ErrorCode::PermissionDenied,
            format!(
                "{} does not show presence (no [topics] block sets presence = true)",
                req.topic
            ),
        ));
    }
    if !app.hub.is_subscribed(ctx.caller.conn_id, &req.topic) {
        return Err(ErrorBody::new(
            ErrorCode::PermissionDenied,
            format!("subscribe to {} to see who is there", req.topic),
        ));
    }
    Ok(presence_of(app, &req.topic, MAX_PRESENCE).await)
}

/// Who is subscribed to `topic` on every node (at most `limit`), with
/// how many clients and distinct users: `{"topic", "clients": [{client,
/// user, info}], "count", "users"}`.
pub(crate) async fn presence_of(app: &crate::server::App, topic: &str, limit: usize) -> Value {
    let cmd = crate::control::Command::Presence {
        topic: topic.to_owned(),
        limit,
    };
    let answers = crate::control::everywhere(&app.hub, app.node_id(), cmd).await;
    let clients: Vec<Value> = answers
        .iter()
        .filter_map(|a| a["clients"].as_array())
        .flatten()
        .take(limit)
        .cloned()
        .collect();
    let users: std::collections::HashSet<&str> =
        clients.iter().filter_map(|c| c["user"].as_str()).collect();
    json!({"topic": topic, "clients": clients, "count": clients.len(), "users": users.len()})
}
