//! Cluster mode: many gale nodes serving as one, over Redis.
//!
//! A [`Cluster`] is this node's membership: one command connection
//! (multiplexed, pipelined; a Redis Cluster connection when several seed
//! URLs are given) and one subscriber connection. What lives in Redis
//! (`P` is `cluster.prefix`):
//!
//! - channels `P:u:USER`, `P:t:TOPIC`, `P:all`: pushes to a user, a topic
//!   and everyone. A node subscribes to a user's or topic's channel only
//!   while it has a connection for it ([`backplane`]); `P:probe:NODE`
//!   carries the node's own end-to-end probe.
//! - `{P}:nodes` (HASH node → counts) and `{P}:nodes:exp` (ZSET node →
//!   expiry), `{P}:users:NODE` (SET, with a TTL): presence ([`presence`]).
//! - `P:rate:EVENT:USER`: a GCRA rate limit state (a Lua script).
//! - `P:w:{CITY}`, `P:wl:{CITY}`: the shared weather cache and the lease of
//!   the node fetching a city; `P:feed:CITY`: the lease of the node
//!   refreshing a subscribed city (the weather application's feeds).
//!
//! Every call on a request's path has `cluster.call_timeout_ms` as its
//! deadline, and falls back to this node alone when Redis does not
//! answer (counted in `gale_cluster_fallbacks_total`).

pub mod backplane;
pub mod history;
pub mod presence;
mod scripts;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, Value};
use tokio::sync::Mutex as AsyncMutex;

use crate::config::{ClusterConfig, ClusterStartup, Rate};
use crate::metrics::{ClusterMetrics, Fallback};

pub use backplane::RedisBackplane;

/// Why cluster mode could not start, or a Redis call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A `cluster.redis_url` the client refuses.
    #[error("cluster.redis_url {url:?}: {source}")]
    Url {
        /// The URL as configured (without a password).
        url: String,
        /// Why.
        source: redis::RedisError,
    },
    /// Redis did not answer at start and `cluster.startup = "refuse"`.
    #[error(
        "cluster.redis_url: Redis at {url} is unreachable ({message}); not starting (cluster.startup = \"refuse\")"
    )]
    Unreachable {
        /// Where.
        url: String,
        /// Why.
        message: String,
    },
    /// A call failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A call passed `cluster.call_timeout_ms`.
    #[error("redis did not answer within {0} ms")]
    Timeout(u64),
}

/// A connection for commands: one Redis, or a Redis Cluster.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

enum Commands {
    Single(ConnectionManager),
    /// Connected on first use (and again after a failed attempt), so a
    /// node can start while the cluster is away.
    Cluster(Box<LazyCluster>),
}

struct LazyCluster {
    client: redis::cluster::ClusterClient,
    conn: AsyncMutex<Option<ClusterConnection>>,
}

/// What [`Cluster::read_or_lease`] found.
#[derive(Debug)]
pub enum Shared {
    /// The value, and how long it has left.
    Value(String, Option<Duration>),
    /// None: this node holds the lease to fill it.
    Leased,
    /// None: another node holds the lease.
    Busy,
}

/// This node's membership of the cluster.
pub struct Cluster {
    node_id: String,
    prefix: String,
    commands: Commands,
    /// One per seed URL; the subscriber connects to the first that
    /// answers (Redis Cluster propagates classic PUBLISH to every node).
    sub_clients: Vec<(String, redis::Client)>,
    call_timeout: Duration,
    probe_every: Duration,
    presence_ttl: Duration,
    /// Where the sweep of the users told online goes on from.
    online_cursor: std::sync::atomic::AtomicU64,
    metrics: ClusterMetrics,
    /// Redis answered the last command (probe, presence).
    commands_up: AtomicBool,
    /// This node's connections moved to a new process (a takeover): its
    /// presence is left to expire rather than removed, so the users it
    /// held never look gone while the new node writes theirs.
    handed_over: AtomicBool,
    scripts: scripts::Scripts,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node_id", &self.node_id)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// A generated node id: short, unique enough, readable in logs.
pub fn generate_node_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().chars().take(24).collect::<String>())
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_graphic()))
        .unwrap_or_else(|| "gale".to_owned());
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &id[..8])
}

/// A URL fit for logs: the password replaced.
fn shown(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

impl Cluster {
    /// Connects this node to the cluster `cfg` names. With
    /// `cluster.startup = "degraded"` an unreachable Redis is one warning
    /// and the node starts (it joins once Redis answers); with "refuse" it
    /// is an error.
    ///
    /// # Errors
    /// [`ClusterError::Url`] for a URL the client refuses,
    /// [`ClusterError::Unreachable`] as above.
    pub async fn connect(
        cfg: &ClusterConfig,
        node_id: String,
        metrics: ClusterMetrics,
    ) -> Result<Arc<Cluster>, ClusterError> {
        // rediss:// uses rustls with the process-wide provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let urls = cfg.redis_urls();
        let call_timeout = Duration::from_millis(cfg.call_timeout_ms);
        let mut sub_clients = Vec::new();
        for url in &urls {
            let client = redis::Client::open(url.as_str()).map_err(|source| ClusterError::Url {
                url: shown(url),
                source,
            })?;
            sub_clients.push((shown(url), client));
        }
        let commands = if let [(_, client)] = sub_clients.as_slice() {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(call_timeout))
                .set_response_timeout(Some(call_timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(2));
            Commands::Single(ConnectionManager::new_lazy_with_config(
                client.clone(),
                config,
            )?)
        } else {
            let client = redis::cluster::ClusterClient::builder(urls.clone())
                .connection_timeout(call_timeout)
                .response_timeout(call_timeout)
                .retries(2)
                .build()
                .map_err(|source| ClusterError::Url {
                    url: urls.iter().map(|u| shown(u)).collect::<Vec<_>>().join(","),
                    source,
                })?;
            Commands::Cluster(Box::new(LazyCluster {
                client,
                conn: AsyncMutex::new(None),
            }))
        };
        let cluster = Arc::new(Cluster {
            node_id,
            prefix: cfg.prefix.clone(),
            commands,
            sub_clients,
            call_timeout,
            probe_every: Duration::from_millis(cfg.probe_interval_ms),
            presence_ttl: Duration::from_secs(cfg.presence_ttl_s),
            online_cursor: std::sync::atomic::AtomicU64::new(0),
            metrics,
            commands_up: AtomicBool::new(false),
            handed_over: AtomicBool::new(false),
            scripts: scripts::Scripts::new(),
        });
        let ping: Result<String, _> = cluster.query(&redis::cmd("PING")).await;
        let where_ = urls.iter().map(|u| shown(u)).collect::<Vec<_>>().join(",");
        match ping {
            Ok(_) => {
                cluster.commands_up.store(true, Ordering::Release);
                tracing::info!(node = %cluster.node_id, redis = %where_, "cluster mode: joined");
            }
            Err(e) if cfg.startup == ClusterStartup::Refuse => {
                return Err(ClusterError::Unreachable {
                    url: where_,
                    message: e.to_string(),
                });
            }
            Err(e) => tracing::warn!(
                node = %cluster.node_id,
                redis = %where_,
                error = %e,
                "cluster mode: Redis unreachable at start; serving this node's connections \
                 alone (degraded) and joining once it answers"
            ),
        }
        Ok(cluster)
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The deadline of a call on a request's path.
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// The metrics handles.
    pub fn metrics(&self) -> &ClusterMetrics {
        &self.metrics
    }

    /// Whether this node is joined: the subscriber delivers (its last
    /// probe came back) and commands are answered.
    pub fn is_up(&self) -> bool {
        self.metrics.up.get() == 1
    }

    /// `name` as a Redis Cluster hash tag, `{…}`: every key built with
    /// the same tag lands in one slot. Redis takes the tag to end at the
    /// first `}`, so a `}` in the name (and `%`, which escapes it) is
    /// percent-encoded: a name that begins with `}` would otherwise give
    /// an empty tag, and its keys would scatter over slots.
    pub fn tag(name: &str) -> String {
        let mut t = String::with_capacity(name.len() + 2);
        t.push('{');
        for c in name.chars() {
            match c {
                '%' => t.push_str("%25"),
                '}' => t.push_str("%7D"),
                c => t.push(c),
            }
        }
        t.push('}');
        t
    }

    /// A key or channel in this cluster's namespace.
    pub fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        for p in parts {
            k.push(':');
            k.push_str(p);
        }
        k
    }

    async fn conn(&self) -> Result<Conn, ClusterError> {
        match &self.commands {
            Commands::Single(m) => Ok(Conn::Single(m.clone())),
            Commands::Cluster(lazy) => {
                let LazyCluster { client, conn } = &**lazy;
                let mut slot = conn.lock().await;
                if let Some(c) = slot.as_ref() {
                    return Ok(Conn::Cluster(c.clone()));
                }
                let c = tokio::time::timeout(self.call_timeout, client.get_async_connection())
                    .await
                    .map_err(|_| self.timeout())??;
                *slot = Some(c.clone());
                Ok(Conn::Cluster(c))
            }
        }
    }

    fn timeout(&self) -> ClusterError {
        ClusterError::Timeout(self.call_timeout.as_millis() as u64)
    }

    /// One command under the call deadline.
    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, ClusterError> {
        let work = async {
            let mut c = self.conn().await?;
            Ok::<T, ClusterError>(cmd.query_async(&mut c).await?)
        };
        tokio::time::timeout(self.call_timeout, work)
            .await
            .map_err(|_| self.timeout())?
    }

    /// One pipeline under `deadline`.
    pub(crate) async fn pipeline<T: FromRedisValue>(
        &self,
        pipe: &Pipeline,
        deadline: Duration,
    ) -> Result<T, ClusterError> {
        let work = async {
            let mut c = self.conn().await?;
            Ok::<T, ClusterError>(pipe.query_async(&mut c).await?)
        };
        tokio::time::timeout(deadline, work)
            .await
            .map_err(|_| ClusterError::Timeout(deadline.as_millis() as u64))?
    }

    /// A Lua script under the call deadline.
    pub(crate) async fn script<T: FromRedisValue>(
        &self,
        inv: redis::ScriptInvocation<'_>,
    ) -> Result<T, ClusterError> {
        let work = async {
            let mut c = self.conn().await?;
            Ok::<T, ClusterError>(inv.invoke_async(&mut c).await?)
        };
        tokio::time::timeout(self.call_timeout, work)
            .await
            .map_err(|_| self.timeout())?
    }

    /// Takes one event from `user`'s cluster-wide budget for `event`
    /// (GCRA in Lua: atomic, one round trip). `Ok(Err(wait))` is a
    /// refusal; `Err` means Redis did not answer in time.
    ///
    /// # Errors
    /// [`ClusterError`] when Redis fails or is too slow.
    pub async fn take_rate(
        &self,
        event: &str,
        user: &str,
        rate: Rate,
    ) -> Result<Result<(), Duration>, ClusterError> {
        let key = self.key(&["rate", event, user]);
        let mut inv = self.scripts.gcra.key(key);
        inv.arg(rate.count).arg(rate.per.as_millis() as u64);
        let (allowed, wait_ms): (i64, i64) = self.script(inv).await?;
        Ok(if allowed == 1 {
            Ok(())
        } else {
            Err(Duration::from_millis(wait_ms.max(1) as u64))
        })
    }

    /// Counts a piece of work done by this node alone.
    pub fn fell_back(&self, what: Fallback, error: &ClusterError) {
        self.metrics.fallback(what).inc();
        tracing::debug!(?what, %error, "redis did not answer: this node alone");
    }

    /// Takes or renews the lease `key` for this node for `ttl`. Returns
    /// whether this node holds it.
    ///
    /// # Errors
    /// [`ClusterError`] when Redis fails or is too slow.
    pub async fn hold_lease(&self, key: &str, ttl: Duration) -> Result<bool, ClusterError> {
        let mut inv = self.scripts.lease.key(key);
        inv.arg(&self.node_id).arg(ttl.as_millis() as u64);
        let held: i64 = self.script(inv).await?;
        Ok(held == 1)
    }

    /// Reads the shared value `value_key`, or takes the lease
    /// `lease_key` for `lease` when there is none, atomically.
    ///
    /// # Errors
    /// [`ClusterError`] when Redis fails or is too slow.
    pub async fn read_or_lease(
        &self,
        value_key: &str,
        lease_key: &str,
        lease: Duration,
    ) -> Result<Shared, ClusterError> {
        let mut inv = self.scripts.read_or_lease.key(value_key);
        inv.key(lease_key)
            .arg(&self.node_id)
            .arg(lease.as_millis() as u64);
        let (state, value, pttl): (i64, String, i64) = self.script(inv).await?;
        Ok(match state {
            1 => Shared::Value(
                value,
                (pttl > 0).then(|| Duration::from_millis(pttl as u64)),
            ),
            2 => Shared::Leased,
            _ => Shared::Busy,
        })
    }

    /// Sets the shared value `value_key` (what [`Cluster::read_or_lease`]
    /// reads) for `ttl`, under the call deadline.
    ///
    /// # Errors
    /// [`ClusterError`] when Redis does not take it.
    pub async fn put_shared(
        &self,
        value_key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<(), ClusterError> {
        self.query(
            redis::cmd("SET")
                .arg(value_key)
                .arg(value)
                .arg("PX")
                .arg(ttl.as_millis() as u64),
        )
        .await
    }

    /// Gives up the lease `key` if this node holds it.
    ///
    /// # Errors
    /// [`ClusterError`] when Redis fails or is too slow.
    pub async fn release_lease(&self, key: &str) -> Result<(), ClusterError> {
        let mut inv = self.scripts.release.key(key);
        inv.arg(&self.node_id);
        let _: i64 = self.script(inv).await?;
        Ok(())
    }

    /// Marks whether Redis answered a command just now.
    fn commands_answered(&self, ok: bool) {
        self.commands_up.store(ok, Ordering::Release);
    }

    fn commands_ok(&self) -> bool {
        self.commands_up.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::Cluster;

    /// What Redis Cluster hashes: the text between the first `{` and the
    /// first `}` after it, when not empty.
    fn hashed(key: &str) -> &str {
        let Some(open) = key.find('{') else {
            return key;
        };
        match key[open + 1..].find('}') {
            Some(0) | None => key,
            Some(len) => &key[open + 1..open + 1 + len],
        }
    }

    #[test]
    fn a_hash_tag_is_the_whole_name_whatever_braces_it_holds() {
        let names = ["}x", "}", "{}", "a}b{c", "{x}y", "%7D", "plain", "%", "x%}"];
        let mut seen = std::collections::HashSet::new();
        for name in names {
            let tag = Cluster::tag(name);
            let list = format!("P:h:{tag}");
            let meta = format!("P:hm:{tag}");
            assert_eq!(hashed(&list), hashed(&meta), "{name}: one slot");
            assert_eq!(
                format!("{{{}}}", hashed(&list)),
                tag,
                "{name}: the whole tag"
            );
            assert!(seen.insert(tag), "{name}: no two names share a tag");
        }
    }
}
