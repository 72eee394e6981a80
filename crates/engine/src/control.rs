//! Commands every node runs: what the server API does to a user's
//! connections (subscribe, unsubscribe, disconnect) and the questions
//! every node answers (a topic's presence, the active topics, the node's
//! counts). On a single node they run here; in cluster mode the backplane
//! carries them to every other node and brings back the answers that come
//! within the cluster's call deadline ([`crate::broadcast::Backplane::everywhere`]).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::broadcast::{Ending, Hub};

/// One command, as it travels between nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Subscribe every connection of `user` to `topic`.
    Subscribe {
        /// The user.
        user: String,
        /// The topic.
        topic: String,
        /// Whether its subscribers hear joins and leaves.
        announce: bool,
    },
    /// Unsubscribe every connection of `user` from `topic`.
    Unsubscribe {
        /// The user.
        user: String,
        /// The topic.
        topic: String,
    },
    /// End a user's connections, or one connection.
    Disconnect {
        /// Whose.
        who: Ending,
        /// The close code.
        code: u16,
        /// Why.
        reason: String,
    },
    /// Who is subscribed to `topic`.
    Presence {
        /// The topic.
        topic: String,
        /// At most this many per node.
        limit: usize,
    },
    /// Topics with subscribers whose name matches `pattern`.
    Topics {
        /// `*` matches any characters; none: every topic.
        pattern: Option<String>,
        /// At most this many per node.
        limit: usize,
    },
    /// The node's counts.
    Info,
}

/// Runs `cmd` on this node (`node` is its id); its answer.
pub(crate) fn run(hub: &Hub, node: &str, cmd: &Command) -> Value {
    match cmd {
        Command::Subscribe {
            user,
            topic,
            announce,
        } => json!({"node": node, "subscribed": hub.subscribe_user(user, topic, *announce)}),
        Command::Unsubscribe { user, topic } => {
            json!({"node": node, "unsubscribed": hub.unsubscribe_user(user, topic)})
        }
        Command::Disconnect { who, code, reason } => {
            json!({"node": node, "disconnected": hub.end(who, *code, reason)})
        }
        Command::Presence { topic, limit } => {
            let clients: Vec<Value> = hub
                .presence(topic, *limit)
                .into_iter()
                .map(|p| {
                    let info = p
                        .info
                        .as_deref()
                        .and_then(|i| serde_json::from_str(i).ok())
                        .unwrap_or(Value::Null);
                    json!({"client": p.client, "user": p.user.as_deref(), "info": info})
                })
                .collect();
            json!({"node": node, "clients": clients})
        }
        Command::Topics { pattern, limit } => {
            let topics: Vec<Value> = hub
                .topics_matching(pattern.as_deref(), *limit)
                .into_iter()
                .map(|(t, n)| json!({"topic": &*t, "subscribers": n}))
                .collect();
            json!({"node": node, "topics": topics})
        }
        Command::Info => json!({
            "node": node,
            "connections": hub.connections(),
            "users": hub.users_online(),
            "topics": hub.topic_count(),
        }),
    }
}

/// Runs `cmd` on every node: this one's answer first, then the other
/// nodes' that came within the cluster's call deadline.
pub(crate) async fn everywhere(hub: &Arc<Hub>, node: &str, cmd: Command) -> Vec<Value> {
    let mut all = vec![run(hub, node, &cmd)];
    all.extend(hub.everywhere(cmd).await);
    all
}
