//! Cluster presence: which nodes are alive, how many connections they
//! hold, which users are connected anywhere.
//!
//! Redis 7.0 has no per-field expiry on a HASH, so, as Centrifugo does,
//! presence is a HASH plus a ZSET of expiry times: `{P}:nodes` maps a node
//! to "connections users", `{P}:nodes:exp` holds when it expires. Each
//! node rewrites its entry every third of `cluster.presence_ttl_s` and
//! keeps its users in `{P}:users:NODE` (a SET with the same TTL, updated
//! by difference). A node that dies without a word expires within the TTL:
//! the sweep (a Lua script, run by every node each round) removes it and
//! its users. A clean shutdown removes its own at once.

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Cluster, ClusterError};
use crate::broadcast::Hub;

/// Users added or removed per command.
const CHUNK: usize = 1_000;

impl Cluster {
    fn nodes_key(&self) -> String {
        format!("{{{}}}:nodes", self.prefix)
    }

    fn expiry_key(&self) -> String {
        format!("{{{}}}:nodes:exp", self.prefix)
    }

    fn users_prefix(&self) -> String {
        format!("{{{}}}:users:", self.prefix)
    }

    /// Writes this node's entry and its users' changes since `synced`
    /// (all of them when `synced` is empty after an error).
    async fn write_presence(
        &self,
        hub: &Hub,
        synced: &mut HashSet<Arc<str>>,
        full: bool,
    ) -> Result<(), ClusterError> {
        let users: HashSet<Arc<str>> = hub.user_ids().into_iter().collect();
        let connections = hub.connections();
        let ttl_ms = self.presence_ttl.as_millis() as u64;
        let users_key = format!("{}{}", self.users_prefix(), self.node_id);
        let mut pipe = redis::pipe();
        let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
        pipe.cmd("HSET")
            .arg(self.nodes_key())
            .arg(&self.node_id)
            .arg(format!("{connections} {}", users.len()))
            .ignore();
        pipe.cmd("ZADD")
            .arg(self.expiry_key())
            .arg(now_ms + ttl_ms)
            .arg(&self.node_id)
            .ignore();
        if full {
            pipe.cmd("DEL").arg(&users_key).ignore();
        }
        let added: Vec<&Arc<str>> = if full {
            users.iter().collect()
        } else {
            users.difference(synced).collect()
        };
        let removed: Vec<&Arc<str>> = if full {
            Vec::new()
        } else {
            synced.difference(&users).collect()
        };
        for chunk in added.chunks(CHUNK) {
            pipe.cmd("SADD")
                .arg(&users_key)
                .arg(chunk.iter().map(|u| u.as_bytes()).collect::<Vec<_>>())
                .ignore();
        }
        for chunk in removed.chunks(CHUNK) {
            pipe.cmd("SREM")
                .arg(&users_key)
                .arg(chunk.iter().map(|u| u.as_bytes()).collect::<Vec<_>>())
                .ignore();
        }
        pipe.cmd("PEXPIRE").arg(&users_key).arg(ttl_ms).ignore();
        let deadline = self.call_timeout.max(Duration::from_secs(5));
        self.pipeline::<()>(&pipe, deadline).await?;
        *synced = users;
        Ok(())
    }

    /// Drops expired nodes and reads the cluster's totals into the gauges.
    async fn sweep(&self) -> Result<(), ClusterError> {
        let mut inv = self.scripts.sweep.key(self.nodes_key());
        inv.key(self.expiry_key()).arg(self.users_prefix());
        let (nodes, connections, users): (i64, i64, i64) = self.script(inv).await?;
        self.metrics.nodes.set(nodes);
        self.metrics.connections.set(connections);
        self.metrics.users.set(users);
        Ok(())
    }

    /// Removes this node's presence (clean shutdown).
    pub async fn leave(&self) {
        let mut pipe = redis::pipe();
        pipe.cmd("HDEL")
            .arg(self.nodes_key())
            .arg(&self.node_id)
            .ignore();
        pipe.cmd("ZREM")
            .arg(self.expiry_key())
            .arg(&self.node_id)
            .ignore();
        pipe.cmd("DEL")
            .arg(format!("{}{}", self.users_prefix(), self.node_id))
            .ignore();
        match self.pipeline::<()>(&pipe, self.call_timeout).await {
            Ok(()) => tracing::info!(node = %self.node_id, "cluster: left (presence removed)"),
            Err(e) => tracing::warn!(
                node = %self.node_id,
                error = %e,
                "cluster: presence not removed; it expires within cluster.presence_ttl_s"
            ),
        }
    }

    /// Whether each of `users` is connected to any live node now.
    ///
    /// # Errors
    /// [`ClusterError`] when Redis fails or is too slow.
    pub async fn online(&self, users: &[String]) -> Result<Vec<bool>, ClusterError> {
        let now_ms = chrono::Utc::now().timestamp_millis().max(0);
        let live: Vec<String> = self
            .query(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(self.expiry_key())
                    .arg(now_ms)
                    .arg("+inf"),
            )
            .await?;
        let mut pipe = redis::pipe();
        for node in &live {
            pipe.cmd("SMISMEMBER")
                .arg(format!("{}{node}", self.users_prefix()))
                .arg(users);
        }
        let found: Vec<Vec<bool>> = self.pipeline(&pipe, self.call_timeout).await?;
        Ok((0..users.len())
            .map(|i| found.iter().any(|f| f.get(i).copied().unwrap_or(false)))
            .collect())
    }
}

/// Keeps this node's presence fresh and the cluster totals current until
/// `stop`; then removes this node's entry.
pub async fn run(cluster: Arc<Cluster>, hub: Weak<Hub>, stop: CancellationToken) {
    let every = (cluster.presence_ttl / 3).max(Duration::from_millis(500));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut synced = HashSet::new();
    // After an error the node's user SET is rewritten whole.
    let mut full = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        let Some(h) = hub.upgrade() else { break };
        let wrote = cluster.write_presence(&h, &mut synced, full).await;
        drop(h);
        full = wrote.is_err();
        let result = match wrote {
            Ok(()) => cluster.sweep().await,
            Err(e) => Err(e),
        };
        cluster.commands_answered(result.is_ok());
        if let Err(e) = result {
            tracing::debug!(error = %e, "cluster: presence not refreshed");
        }
    }
    cluster.leave().await;
}
