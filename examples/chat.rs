//! A chat server on gale's engine, configured like the `gale` binary
//! (defaults < ./gale.toml < `GALE_*` variables):
//!
//! ```text
//! GALE_AUTH__JWT_SECRET=change-me GALE_SERVER__LISTEN=127.0.0.1:9000 \
//!     cargo run --release --example chat
//! ```
//!
//! A room is the topic `room:NAME`: signed-in users join it with
//! `topic.subscribe` (recovering what they missed with `since`), see who
//! is there with `topic.presence`, and talk with `chat.send {"room",
//! "text"}`, which pushes `chat.message {"room", "user", "text"}` to the
//! room. Its ./gale.toml holds the engine's sections only (`[server]`,
//! `[auth]`, `[topics."room:*"]`, …): the binary's `[weather]` and
//! `[store]` are not this program's. Walk-through: docs/library.md.

use std::path::Path;
use std::time::Duration;

use gale_engine::config::{Config, Rate, SubscribeMode, TopicConfig};
use gale_engine::handle::Handle;
use gale_engine::protocol::{ErrorBody, ErrorCode};
use gale_engine::router::{Ctx, HandlerResult, Payload, Policy, invalid_field};
use gale_engine::server::{Builder, ServerError, bind};
use serde::Deserialize;
use serde_json::json;

/// `chat.send {"room", "text"}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Send {
    room: String,
    text: String,
}

impl Payload for Send {
    fn validate(&self) -> Result<(), ErrorBody> {
        if self.room.is_empty() || self.room.len() > 64 {
            return Err(invalid_field("room", "a room name is 1 to 64 bytes"));
        }
        match self.text.trim().len() {
            1..=2000 => Ok(()),
            _ => Err(invalid_field("text", "a message is 1 to 2,000 bytes")),
        }
    }
}

/// Pushes the message to everyone in the room (the sender included), on
/// every node, and keeps it in the room's history.
async fn send(ctx: Ctx, msg: Send) -> HandlerResult {
    let topic = format!("room:{}", msg.room);
    if !ctx.app.hub.is_subscribed(ctx.caller.conn_id, &topic) {
        let message = format!("join {topic} with topic.subscribe first");
        return Err(ErrorBody::new(ErrorCode::PermissionDenied, message));
    }
    let user = ctx.caller.user.as_deref().unwrap_or_default();
    let data = json!({ "room": msg.room, "user": user, "text": msg.text.trim() });
    let reached = Handle::new(ctx.app.clone())
        .to_topic(&topic, "chat.message", &data)
        .map_err(gale_engine::builtin::hub_error)?;
    Ok(json!({ "sent": true, "reached": reached }))
}

#[tokio::main]
async fn main() -> Result<(), ServerError> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let file = Path::new("gale.toml");
    let mut config = Config::load(file.exists().then_some(file))?;
    // Rooms, unless the configuration says otherwise: signed-in users
    // join; the last 100 messages of the hour are kept for recovery; who
    // is in a room is public to its members.
    config.topics.entry("room:*".into()).or_insert(TopicConfig {
        subscribe: Some(SubscribeMode::Users),
        presence: Some(true),
        join_leave: Some(true),
        ..TopicConfig::history(100, 3_600)
    });
    let listener = bind(&config.server.listen).await?;
    let addr = listener.local_addr()?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    gale_engine::shutdown::cancel_on_signal(shutdown.clone());

    let mut builder = Builder::new(config).await?;
    let policy = Policy {
        requires_auth: true,
        rate_limit: Some(Rate {
            count: 5,
            per: Duration::from_secs(1),
        }),
        ..Policy::default()
    };
    builder.registry().register("chat.send", policy, send);
    let running = builder.start(listener, shutdown).await?;
    tracing::info!("chat rooms at ws://{addr}/ws");
    running.wait().await
}
