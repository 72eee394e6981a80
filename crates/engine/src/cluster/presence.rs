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

    /// Marks this node's connections as handed to a new process: on
    /// leaving, its presence is left to expire (within
    /// `cluster.presence_ttl_s`) instead of being removed, so no user it
    /// held looks gone before the new node has written them.
    pub(crate) fn hand_presence_over(&self) {
        self.handed_over
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Removes this node's presence (clean shutdown).
    pub async fn leave(&self) {
        if self.handed_over.load(std::sync::atomic::Ordering::Acquire) {
            tracing::info!(
                node = %self.node_id,
                "cluster: left; presence left to expire (its connections moved to a new process)"
            );
            return;
        }
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

/// KEYS[1]: this node's users (`{P}:uconn:NODE`), KEYS[2]: the users told
/// online (`{P}:online`). ARGV: the user, the TTL (ms) of KEYS[1].
/// Returns 1 when the backend is to hear the user is online.
const USER_CAME: &str = r"
redis.call('HSET', KEYS[1], ARGV[1], '1')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('HSETNX', KEYS[2], ARGV[1], '1')
";

/// KEYS[1]: the live nodes (`{P}:nodes`), KEYS[2]: the users told online.
/// ARGV: the prefix of the nodes' user keys (`{P}:uconn:`), then users.
/// Returns the users no live node has that were told online, removing
/// them: the backend is to hear they are offline.
const USERS_GONE: &str = r"
local nodes = redis.call('HKEYS', KEYS[1])
local gone = {}
for i = 2, #ARGV do
  local here = false
  for _, n in ipairs(nodes) do
    if redis.call('HEXISTS', ARGV[1] .. n, ARGV[i]) == 1 then here = true break end
  end
  if not here and redis.call('HDEL', KEYS[2], ARGV[i]) == 1 then
    table.insert(gone, ARGV[i])
  end
end
return gone
";

impl Cluster {
    fn online_key(&self) -> String {
        format!("{{{}}}:online", self.prefix)
    }

    fn uconn_prefix(&self) -> String {
        format!("{{{}}}:uconn:", self.prefix)
    }

    fn uconn_ttl_ms(&self) -> u64 {
        3 * self.presence_ttl.as_millis() as u64
    }

    /// `user`'s first connection on this node opened: whether the
    /// application is to hear they are online (no node had them).
    ///
    /// # Errors
    /// When Redis does not answer.
    pub(crate) async fn user_came(&self, user: &str) -> Result<bool, ClusterError> {
        let mine = format!("{}{}", self.uconn_prefix(), self.node_id);
        let script = redis::Script::new(USER_CAME);
        let mut inv = script.key(mine);
        inv.key(self.online_key())
            .arg(user)
            .arg(self.uconn_ttl_ms());
        let told: i64 = self.script(inv).await?;
        Ok(told == 1)
    }

    /// `user`'s last connection on this node closed.
    ///
    /// # Errors
    /// When Redis does not answer.
    pub(crate) async fn user_left_here(&self, user: &str) -> Result<(), ClusterError> {
        let mine = format!("{}{}", self.uconn_prefix(), self.node_id);
        let _: i64 = self.query(redis::cmd("HDEL").arg(mine).arg(user)).await?;
        Ok(())
    }

    /// After the grace: whether `user` is gone from every node and was
    /// told online (then no longer is).
    ///
    /// # Errors
    /// When Redis does not answer.
    pub(crate) async fn user_gone(&self, user: &str) -> Result<bool, ClusterError> {
        Ok(!self.users_gone(&[user.to_owned()]).await?.is_empty())
    }

    async fn users_gone(&self, users: &[String]) -> Result<Vec<String>, ClusterError> {
        let script = redis::Script::new(USERS_GONE);
        let mut inv = script.key(self.nodes_key());
        inv.key(self.online_key()).arg(self.uconn_prefix());
        for u in users {
            inv.arg(u);
        }
        self.script(inv).await
    }

    /// Renews this node's users' TTL and finds the users told online that
    /// no live node has (their node died): they are removed, to be told
    /// offline. Looks at up to 10,000 users a round.
    ///
    /// # Errors
    /// When Redis does not answer.
    pub(crate) async fn sweep_online(&self) -> Result<Vec<String>, ClusterError> {
        let mine = format!("{}{}", self.uconn_prefix(), self.node_id);
        let _: i64 = self
            .query(redis::cmd("PEXPIRE").arg(mine).arg(self.uconn_ttl_ms()))
            .await?;
        let (_, users): (u64, Vec<String>) = self
            .query(
                redis::cmd("HSCAN")
                    .arg(self.online_key())
                    .arg(
                        self.online_cursor
                            .load(std::sync::atomic::Ordering::Relaxed),
                    )
                    .arg("COUNT")
                    .arg(1_000),
            )
            .await
            .map(|(c, fields): (u64, Vec<String>)| {
                self.online_cursor
                    .store(c, std::sync::atomic::Ordering::Relaxed);
                (c, fields.into_iter().step_by(2).collect())
            })?;
        let mut gone = Vec::new();
        for chunk in users.chunks(500) {
            gone.extend(self.users_gone(chunk).await?);
        }
        Ok(gone)
    }
}
