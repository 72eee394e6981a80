//! A handle on the running server, for the application's code outside
//! its event handlers (a background task, an HTTP handler of its own, a
//! queue consumer): push to users, topics or everyone, and read presence
//! and history, on this node and, in cluster mode, every node.

use std::sync::Arc;

use serde_json::Value;

use crate::broadcast::{HubError, Target};
use crate::server::App;

/// Why a history read failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HistoryError {
    /// What went wrong, for people (the server API's message).
    pub message: String,
}

/// A cheap, cloneable handle on the running server
/// ([`crate::server::Running::handle`], or [`Handle::new`] with a
/// handler's `ctx.app`).
///
/// ```no_run
/// # async fn example(running: gale_engine::server::Running) -> Result<(), Box<dyn std::error::Error>> {
/// let gale = running.handle();
/// // To every subscriber of a topic, on every node (kept in its
/// // history when a [topics] block gives it one):
/// gale.to_topic("room:lobby", "chat.message", &serde_json::json!({"text": "hi"}))?;
/// // To every connection of a user, and to everyone:
/// gale.to_user("alice", "notice", &serde_json::json!({"unread": 3}))?;
/// gale.to_everyone("maintenance", &serde_json::json!({"in_minutes": 5}))?;
/// // Who is in a room, and what it said lately:
/// let present = gale.presence("room:lobby").await;
/// let last = gale.history("room:lobby", 10).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Handle {
    app: Arc<App>,
}

/// The most clients [`Handle::presence`] lists.
pub const MAX_PRESENCE: usize = 1_000;

impl Handle {
    /// The handle of the server whose state `app` is.
    pub fn new(app: Arc<App>) -> Handle {
        Handle { app }
    }

    /// The server's shared state, for what this handle does not wrap.
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Pushes `{"event", "data"}` to `target`. Returns how many of this
    /// node's connections it reaches (other nodes deliver theirs).
    ///
    /// # Errors
    /// [`HubError`]: too large, the broadcast queue full, shutting down.
    pub fn publish(&self, target: Target, event: &str, data: &Value) -> Result<usize, HubError> {
        self.app.hub.publish(target, event, data)
    }

    /// Pushes to every subscriber of `topic` (see [`Handle::publish`]).
    ///
    /// # Errors
    /// As [`Handle::publish`].
    pub fn to_topic(&self, topic: &str, event: &str, data: &Value) -> Result<usize, HubError> {
        self.publish(Target::Topic(topic.to_owned()), event, data)
    }

    /// Pushes to every connection of `user` (see [`Handle::publish`]).
    ///
    /// # Errors
    /// As [`Handle::publish`].
    pub fn to_user(&self, user: &str, event: &str, data: &Value) -> Result<usize, HubError> {
        self.publish(Target::Users(vec![user.to_owned()]), event, data)
    }

    /// Pushes to every connection (see [`Handle::publish`]).
    ///
    /// # Errors
    /// As [`Handle::publish`].
    pub fn to_everyone(&self, event: &str, data: &Value) -> Result<usize, HubError> {
        self.publish(Target::Everyone, event, data)
    }

    /// Who is subscribed to `topic` on every node (at most
    /// [`MAX_PRESENCE`]): `{"topic", "clients": [{client, user, info}],
    /// "count", "users"}`.
    pub async fn presence(&self, topic: &str) -> Value {
        crate::builtin::topics::presence_of(&self.app, topic, MAX_PRESENCE).await
    }

    /// Whether `user` has a connection on this node.
    pub fn is_online(&self, user: &str) -> bool {
        self.app.hub.is_online(user)
    }

    /// The last `limit` publications `topic` still keeps, oldest first:
    /// `{"topic", "offset", "epoch", "complete", "publications"}`, as the
    /// server API's `history` answers.
    ///
    /// # Errors
    /// [`HistoryError`] when the topic keeps no history or it cannot be
    /// read now.
    pub async fn history(&self, topic: &str, limit: usize) -> Result<Value, HistoryError> {
        let params = serde_json::json!({ "topic": topic, "limit": limit.max(1) });
        crate::api::history(&self.app, params)
            .await
            .map_err(|(_, message)| HistoryError { message })
    }
}
