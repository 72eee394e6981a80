//! Lifecycle notifications to the application's backend
//! (`[proxy] events_url`): `user.online` when a user's first connection
//! opens anywhere in the cluster, `user.offline` when their last one has
//! stayed closed for `[proxy] offline_grace_ms` (a page reload is not an
//! offline), and, when asked for, `connection.closed` for every
//! connection.
//!
//! They are sent in batches of at most `events_batch`:
//!
//! ```json
//! {"events": [{"type": "user.online", "user": "alice", "at": 1733184000123, "node": "n1"}]}
//! ```
//!
//! at least once (a batch the backend did not answer 2xx is sent again,
//! with backoff from 250 ms to 10 s, until it is), in the order they
//! happened on this node (one sender); `at` (milliseconds) orders them
//! across nodes. The queue is bounded (`events_queue`): past it a
//! notification is dropped and counted (`gale_proxy_events_dropped_total`).
//!
//! Who is online is decided once for the whole cluster. On a single node
//! it is this node's memory; in cluster mode, Redis: each node keeps the
//! users it has connections for in `{P}:uconn:NODE` (a HASH, its TTL
//! renewed while the node lives), and `{P}:online` holds the users the
//! backend was told are online. The first node to add a user there says
//! `user.online`; after the grace, the node whose last connection closed
//! removes the user only if no live node has them, and then says
//! `user.offline`. A node that dies without a word: every node sweeps
//! `{P}:online` every `cluster.presence_ttl_s` for users no live node has.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broadcast::SystemEvent;
use crate::cluster::Cluster;
use crate::metrics::ProxyKind;
use crate::proxy::Backend;
use crate::server::App;

/// What the backend asked to hear.
#[derive(Debug, Clone, Copy)]
struct Wanted {
    online: bool,
    offline: bool,
    closed: bool,
}

/// Starts the notifications, when `[proxy] events_url` is set; they stop
/// at `stop` (what is queued then is sent for at most 2 s more).
pub(crate) fn start(
    app: &Arc<App>,
    stop: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let backend = app.backend.clone().filter(|b| b.has(ProxyKind::Events))?;
    let cfg = &app.config.proxy;
    let wanted = Wanted {
        online: cfg.events.iter().any(|e| e == "user.online"),
        offline: cfg.events.iter().any(|e| e == "user.offline"),
        closed: cfg.events.iter().any(|e| e == "connection.closed"),
    };
    let (tx, rx) = mpsc::channel(cfg.events_queue);
    let sender = tokio::spawn(send(
        backend,
        rx,
        cfg.events_batch,
        app.metrics.clone(),
        stop.clone(),
    ));
    // Subscribed here, not in the task: what happens from now on (the
    // connections a takeover brings, joined next) is seen.
    let events = app.hub.system_events();
    let watcher = tokio::spawn(watch(app.clone(), events, wanted, tx, stop));
    Some(tokio::spawn(async move {
        let _ = watcher.await;
        let _ = sender.await;
    }))
}

/// Milliseconds since the epoch.
fn now_ms() -> u64 {
    chrono::Utc::now().timestamp_millis().max(0) as u64
}

/// Turns the hub's lifecycle events into notifications.
async fn watch(
    app: Arc<App>,
    mut events: tokio::sync::broadcast::Receiver<SystemEvent>,
    wanted: Wanted,
    tx: mpsc::Sender<Value>,
    stop: CancellationToken,
) {
    let grace = Duration::from_millis(app.config.proxy.offline_grace_ms);
    let node = app.node_id().to_owned();
    let online = Online::new(app.cluster.clone());
    // Users whose last connection closed, oldest first (one grace for
    // all: the deadlines come in order).
    let mut closing: VecDeque<(Instant, Arc<str>)> = VecDeque::new();
    let mut sweep = tokio::time::interval(if app.config.cluster.enabled() {
        Duration::from_secs(app.config.cluster.presence_ttl_s)
    } else {
        Duration::from_secs(3600)
    });
    let queue = |n: Value| {
        if tx.try_send(n).is_err() {
            app.metrics.proxy.events_dropped.inc();
        } else {
            app.metrics.proxy.events_queued.inc();
        }
    };
    let note =
        |kind: &str, user: &str| json!({"type": kind, "user": user, "at": now_ms(), "node": node});
    loop {
        let due = closing.front().map(|(at, _)| *at);
        tokio::select! {
            () = stop.cancelled() => return,
            e = events.recv() => match e {
                Ok(SystemEvent::UserOnline(user)) => {
                    if online.came(&user).await && wanted.online {
                        queue(note("user.online", &user));
                    }
                }
                Ok(SystemEvent::UserResumed(user)) => {
                    // Moved here by a takeover: counted as this node's,
                    // its backend told already.
                    let _ = online.came(&user).await;
                }
                Ok(SystemEvent::UserOffline(user)) => {
                    online.left_here(&user).await;
                    closing.push_back((Instant::now() + grace, user));
                }
                Ok(SystemEvent::Closed { conn_id, user }) if wanted.closed => {
                    queue(json!({"type": "connection.closed", "client": conn_id, "user": user.as_deref(), "at": now_ms(), "node": node}));
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    app.metrics.proxy.events_dropped.inc_by(n);
                    tracing::warn!(missed = n, "lifecycle notifications fell behind the hub: some were lost");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            () = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some((_, user)) = closing.pop_front()
                    && !app.hub.is_online(&user)
                    && online.gone(&user).await
                    && wanted.offline
                {
                    queue(note("user.offline", &user));
                }
            }
            _ = sweep.tick() => {
                for user in online.sweep().await {
                    if wanted.offline {
                        queue(note("user.offline", &user));
                    }
                }
            }
        }
    }
}

/// Sends the queued notifications in batches, each until the backend
/// takes it.
async fn send(
    backend: Arc<Backend>,
    mut rx: mpsc::Receiver<Value>,
    batch: usize,
    metrics: Arc<crate::metrics::Metrics>,
    stop: CancellationToken,
) {
    let mut events = Vec::with_capacity(batch);
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut events, batch) => n,
            () = stop.cancelled() => {
                // What is queued goes out, for a moment more.
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while rx.recv_many(&mut events, batch).await > 0 {
                        deliver(&backend, &mut events, &metrics, None).await;
                    }
                }).await;
                return;
            }
        };
        if n == 0 {
            return;
        }
        deliver(&backend, &mut events, &metrics, Some(&stop)).await;
    }
}

/// Delivers one batch, trying again with backoff until the backend takes
/// it (or `stop`).
async fn deliver(
    backend: &Backend,
    events: &mut Vec<Value>,
    metrics: &crate::metrics::Metrics,
    stop: Option<&CancellationToken>,
) {
    let body = json!({"events": &*events});
    let mut backoff = Duration::from_millis(250);
    loop {
        match backend.call(ProxyKind::Events, &body).await {
            Ok(_) => break,
            Err(e) => {
                tracing::debug!(error = %e, "lifecycle notifications not delivered; trying again");
                let wait = tokio::time::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
                match stop {
                    Some(stop) => tokio::select! {
                        () = wait => {}
                        () = stop.cancelled() => return,
                    },
                    None => return,
                }
            }
        }
    }
    let n = events.len() as u64;
    metrics.proxy.events_sent.inc_by(n);
    metrics.proxy.events_queued.dec_by(n as i64);
    events.clear();
}

/// Who the backend was told is online: this node's memory, or the
/// cluster's in Redis.
struct Online {
    cluster: Option<Arc<Cluster>>,
    /// Single node: the users told online.
    told: std::sync::Mutex<HashSet<Arc<str>>>,
}

impl Online {
    fn new(cluster: Option<Arc<Cluster>>) -> Online {
        Online {
            cluster,
            told: std::sync::Mutex::new(HashSet::new()),
        }
    }

    fn told(&self) -> std::sync::MutexGuard<'_, HashSet<Arc<str>>> {
        self.told.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `user`'s first connection here opened: whether the backend is to
    /// hear that they are online (nobody told it yet).
    async fn came(&self, user: &Arc<str>) -> bool {
        match &self.cluster {
            None => self.told().insert(user.clone()),
            Some(c) => c.user_came(user).await.unwrap_or_else(|e| {
                tracing::debug!(error = %e, "online state unavailable: told as online");
                true
            }),
        }
    }

    /// `user`'s last connection here closed.
    async fn left_here(&self, user: &str) {
        if let Some(c) = &self.cluster
            && let Err(e) = c.user_left_here(user).await
        {
            tracing::debug!(error = %e, "online state unavailable");
        }
    }

    /// After the grace, no connection of `user` here: whether the backend
    /// is to hear that they are offline (no node has them, and it was
    /// told they were online).
    async fn gone(&self, user: &str) -> bool {
        match &self.cluster {
            None => self.told().remove(user),
            Some(c) => c.user_gone(user).await.unwrap_or(false),
        }
    }

    /// Users told online that no live node has any more (their node
    /// died): to be told offline.
    async fn sweep(&self) -> Vec<String> {
        match &self.cluster {
            None => Vec::new(),
            Some(c) => c.sweep_online().await.unwrap_or_default(),
        }
    }
}
