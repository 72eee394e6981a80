//! The Redis backplane: pushes between nodes over Redis pub/sub.
//!
//! Outbound, every push the hub delivers is queued (bounded:
//! `cluster.publish_queue`; full means lost and counted) and a publisher
//! task sends what has queued as one pipeline of `PUBLISH`es, so Redis
//! sees one round trip per batch, not per message. A push is encoded once
//! per node: the payload is the origin's node id, a newline, and the exact
//! text every recipient gets.
//!
//! Inbound, one subscriber connection listens to `P:all`, the node's probe
//! channel, and the channel of every user and topic the hub has local
//! connections for, and no other: a node receives only the traffic it has
//! recipients for. The hub reports each change (first connection of a
//! user, last subscriber of a topic, …); the subscriber applies them in
//! batches. After every (re)connect it subscribes again from the hub's own
//! state, and every `cluster.probe_interval_ms` it publishes a probe to
//! itself over the command connection: a probe that does not come back
//! through the subscriber within the interval means the subscription is
//! dead even if the socket looks alive (a failover, a proxy), and the
//! subscriber reconnects. `gale_cluster_up` and `/healthz` follow. The
//! subscriber only reads: what other nodes send (pushes and commands) it
//! queues (bounded: `cluster.receive_queue`; full means lost and counted)
//! for one task that hands it out in order, the pushes to one target that
//! came together as one run (`Hub::deliver_remote`).
//!
//! Commands every node runs (`control`) go out on `P:ctl`, each
//! `{"id", "cmd"}` behind the sender's node id; every other node runs it
//! and answers `{"id", "answer"}` on the sender's `P:ctl:NODE`. The
//! sender waits for as many answers as presence counts other nodes, or
//! `cluster.call_timeout_ms`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::websocket::Prepared;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Cluster;
use crate::broadcast::{Backplane, Channel, Hub, HubError, Target};
use crate::history::{self, Recovery, Since};
use crate::metrics::{Fallback, LostReason};

/// Most pending interest changes kept; past this the subscriber resyncs
/// from the hub's whole state instead.
const MAX_PENDING_CHANGES: usize = 100_000;
/// Channels per SUBSCRIBE / UNSUBSCRIBE command.
const SUBSCRIBE_CHUNK: usize = 500;
/// The longest pause between two attempts to reconnect the subscriber.
/// Short: once Redis is back, pushes published before this node has
/// subscribed again are lost without anyone counting them (PUBLISH
/// succeeds with no listener), so the subscriber must be back first. A
/// refused connect four times a second costs nothing.
const MAX_BACKOFF: Duration = Duration::from_millis(250);
/// Deadline of a batch of (un)subscriptions.
const SUBSCRIBE_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Interest {
    /// Changes the subscriber has not applied yet, in order.
    changes: Vec<(String, bool)>,
    /// Too many changes piled up: resubscribe from the hub's state.
    resync: bool,
}

/// One message for other nodes.
enum Outgoing {
    /// A push, published as it is.
    Publish { channel: String, payload: Vec<u8> },
    /// A publication on a topic with history: positioned, stored and
    /// published by Redis ([`super::history::APPEND`]).
    Append {
        list: String,
        meta: String,
        channel: String,
        /// The push with its topic, without its closing brace.
        body: String,
        size: usize,
        ttl_s: u64,
    },
}

/// What came from other nodes, handed out by one task in the order it
/// came.
enum Inbound {
    /// A push for this node's recipients of the target.
    Push(Target, Prepared),
    /// A command every node runs, its payload as it came.
    Command(Vec<u8>),
}

/// Most messages from other nodes handed out at a time.
const HAND_OUT_BATCH: usize = 256;

/// The cluster's [`Backplane`].
pub struct RedisBackplane {
    cluster: Arc<Cluster>,
    interest: Mutex<Interest>,
    changed: Notify,
    out: mpsc::Sender<Outgoing>,
    out_rx: Mutex<Option<mpsc::Receiver<Outgoing>>>,
    inbound: mpsc::Sender<Inbound>,
    inbound_rx: Mutex<Option<mpsc::Receiver<Inbound>>>,
    batch: usize,
    /// `history.meta_ttl_s`.
    meta_ttl_s: u64,
    /// Interest changes reported so far.
    requested: AtomicU64,
    /// The last of those the subscriber has applied.
    applied: watch::Sender<u64>,
    /// Commands sent to the other nodes and waiting for their answers, by
    /// id.
    asked: Arc<Asked>,
    next_ask: AtomicU64,
}

/// Commands waiting for answers, by id.
type Asked = Mutex<HashMap<u64, mpsc::Sender<serde_json::Value>>>;

/// Forgets a command's id when its wait ends, however it ends.
struct Forget(u64, Arc<Asked>);

impl Drop for Forget {
    fn drop(&mut self) {
        self.1
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.0);
    }
}

impl std::fmt::Debug for RedisBackplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackplane")
            .field("node", &self.cluster.node_id)
            .finish_non_exhaustive()
    }
}

impl RedisBackplane {
    /// A backplane over `cluster`; [`RedisBackplane::attach`] starts it.
    /// `queue` and `receive_queue` bound the messages waiting to go to
    /// Redis and to be handed out here.
    pub fn new(
        cluster: Arc<Cluster>,
        queue: usize,
        receive_queue: usize,
        batch: usize,
        meta_ttl_s: u64,
    ) -> Arc<RedisBackplane> {
        let (out, rx) = mpsc::channel(queue.max(1));
        let (inbound, inbound_rx) = mpsc::channel(receive_queue.max(1));
        Arc::new(RedisBackplane {
            cluster,
            interest: Mutex::new(Interest::default()),
            changed: Notify::new(),
            out,
            out_rx: Mutex::new(Some(rx)),
            inbound,
            inbound_rx: Mutex::new(Some(inbound_rx)),
            batch: batch.max(1),
            meta_ttl_s,
            requested: AtomicU64::new(0),
            applied: watch::Sender::new(0),
            asked: Arc::new(Mutex::new(HashMap::new())),
            next_ask: AtomicU64::new(1),
        })
    }

    /// Where every node hears commands.
    fn control_channel(&self) -> String {
        self.cluster.key(&["ctl"])
    }

    /// Where node `node` hears the answers to its commands.
    fn answers_channel(&self, node: &str) -> String {
        self.cluster.key(&["ctl", node])
    }

    fn asked(&self) -> std::sync::MutexGuard<'_, HashMap<u64, mpsc::Sender<serde_json::Value>>> {
        self.asked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `payload` for `channel` (lost and counted when the queue is
    /// full).
    fn publish_raw(&self, channel: String, payload: Vec<u8>) {
        if self
            .out
            .try_send(Outgoing::Publish { channel, payload })
            .is_err()
        {
            self.cluster.metrics.lost(LostReason::QueueFull).inc();
        }
    }

    /// A command from another node: run it here and answer.
    fn on_command(&self, hub: &Hub, payload: &[u8]) {
        let Some(cut) = payload.iter().position(|&b| b == b'\n') else {
            return;
        };
        let (origin, body) = (&payload[..cut], &payload[cut + 1..]);
        if origin == self.cluster.node_id.as_bytes() {
            return; // run here already, by the sender
        }
        let Ok(origin) = std::str::from_utf8(origin) else {
            return;
        };
        #[derive(serde::Deserialize)]
        struct Envelope {
            id: u64,
            cmd: crate::control::Command,
        }
        let Ok(env) = serde_json::from_slice::<Envelope>(body) else {
            tracing::debug!("cluster: a command gale cannot read, ignored");
            return;
        };
        let answer = crate::control::run(hub, &self.cluster.node_id, &env.cmd);
        let reply = serde_json::json!({"id": env.id, "answer": answer});
        self.publish_raw(self.answers_channel(origin), reply.to_string().into_bytes());
    }

    /// An answer to one of this node's commands.
    fn on_answer(&self, payload: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Reply {
            id: u64,
            answer: serde_json::Value,
        }
        let Ok(r) = serde_json::from_slice::<Reply>(payload) else {
            return;
        };
        if let Some(tx) = self.asked().get(&r.id) {
            let _ = tx.try_send(r.answer);
        }
    }

    /// Starts the publisher, the subscriber and the task that hands out
    /// what the subscriber receives, for `hub`; they stop at `stop`. Call
    /// once.
    pub fn attach(self: &Arc<Self>, hub: &Arc<Hub>, stop: CancellationToken) {
        let rx = self.out_rx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(rx) = rx {
            tokio::spawn(publish(self.clone(), rx, stop.clone()));
        }
        let rx = self
            .inbound_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(rx) = rx {
            tokio::spawn(hand_out(
                self.clone(),
                Arc::downgrade(hub),
                rx,
                stop.clone(),
            ));
        }
        tokio::spawn(subscribe(self.clone(), Arc::downgrade(hub), stop));
    }

    fn channel(&self, c: &Channel) -> String {
        match c {
            Channel::User(u) => self.cluster.key(&["u", u]),
            Channel::Topic(t) => self.cluster.key(&["t", t]),
        }
    }

    fn everyone(&self) -> String {
        self.cluster.key(&["all"])
    }

    fn probe_channel(&self) -> String {
        self.cluster.key(&["probe", &self.cluster.node_id])
    }

    /// The target a channel's messages go to on this node.
    fn target(&self, channel: &str) -> Option<Target> {
        let rest = channel
            .strip_prefix(self.cluster.prefix.as_str())?
            .strip_prefix(':')?;
        if rest == "all" {
            return Some(Target::Everyone);
        }
        let (kind, name) = rest.split_at_checked(2)?;
        match kind {
            "u:" => Some(Target::Users(vec![name.to_owned()])),
            "t:" => Some(Target::Topic(name.to_owned())),
            _ => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Interest> {
        self.interest.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, channel: String, text: &Prepared) {
        let node = self.cluster.node_id.as_bytes();
        let mut payload = Vec::with_capacity(node.len() + 1 + text.len());
        payload.extend_from_slice(node);
        payload.push(b'\n');
        payload.extend_from_slice(text.as_str().as_bytes());
        if self
            .out
            .try_send(Outgoing::Publish { channel, payload })
            .is_err()
        {
            self.cluster.metrics.lost(LostReason::QueueFull).inc();
        }
    }
}

impl Backplane for RedisBackplane {
    fn forward(&self, target: &Target, text: &Prepared) {
        match target {
            Target::Everyone => self.send(self.everyone(), text),
            Target::Topic(t) => self.send(self.cluster.key(&["t", t]), text),
            Target::Users(users) => {
                let unique: HashSet<&str> = users.iter().map(String::as_str).collect();
                for u in unique {
                    self.send(self.cluster.key(&["u", u]), text);
                }
            }
        }
    }

    fn interest(&self, channel: Channel, on: bool) {
        let name = self.channel(&channel);
        {
            let mut st = self.lock();
            self.requested.fetch_add(1, Ordering::SeqCst);
            if st.changes.len() >= MAX_PENDING_CHANGES {
                st.changes.clear();
                st.resync = true;
            } else if !st.resync {
                st.changes.push((name, on));
            }
        }
        self.changed.notify_one();
    }

    fn shares_history(&self) -> bool {
        true
    }

    fn append(&self, topic: &str, policy: history::Policy, text: &Prepared) -> bool {
        if !self.cluster.is_up() {
            // Pushed here without a position: counted like any decision
            // taken without Redis.
            self.cluster.metrics.fallback(Fallback::History).inc();
            return false;
        }
        let (list, meta) = self.cluster.history_keys(topic);
        let body = history::head(text.as_str(), topic);
        let out = Outgoing::Append {
            list,
            meta,
            channel: self.cluster.key(&["t", topic]),
            body,
            size: policy.size,
            ttl_s: policy.ttl.as_secs().max(1),
        };
        if self.out.try_send(out).is_err() {
            self.cluster.metrics.lost(LostReason::QueueFull).inc();
            return false;
        }
        true
    }

    fn everywhere(
        &self,
        cmd: crate::control::Command,
    ) -> BoxFuture<'static, Vec<serde_json::Value>> {
        let others = usize::try_from(self.cluster.metrics.nodes.get() - 1).unwrap_or(0);
        if others == 0 || !self.cluster.is_up() {
            return Box::pin(std::future::ready(Vec::new()));
        }
        let id = self.next_ask.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel(others.min(1024));
        self.asked().insert(id, tx);
        let mut payload = self.cluster.node_id.as_bytes().to_vec();
        payload.push(b'\n');
        payload.extend_from_slice(
            serde_json::json!({"id": id, "cmd": cmd})
                .to_string()
                .as_bytes(),
        );
        self.publish_raw(self.control_channel(), payload);
        let deadline = Instant::now() + self.cluster.call_timeout.max(Duration::from_millis(100));
        let me = self.cluster.clone();
        let asked = Forget(id, self.asked.clone());
        Box::pin(async move {
            let _asked = asked;
            let mut answers = Vec::with_capacity(others);
            while answers.len() < others {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(a)) => answers.push(a),
                    _ => break,
                }
            }
            if answers.len() < others {
                tracing::debug!(node = %me.node_id, got = answers.len(), of = others, "cluster: not every node answered a command in time");
            }
            answers
        })
    }

    fn settled(&self) -> BoxFuture<'static, ()> {
        let wanted = self.requested.load(Ordering::SeqCst);
        let mut applied = self.applied.subscribe();
        let deadline = self.cluster.call_timeout.max(Duration::from_millis(100));
        Box::pin(async move {
            let _ = tokio::time::timeout(deadline, applied.wait_for(|a| *a >= wanted)).await;
        })
    }

    fn recover(
        &self,
        topic: &str,
        policy: history::Policy,
        since: Option<Since>,
    ) -> BoxFuture<'static, Result<Recovery, HubError>> {
        let cluster = self.cluster.clone();
        let topic = topic.to_owned();
        let meta_ttl_s = self.meta_ttl_s;
        Box::pin(async move {
            cluster
                .recover(
                    &topic,
                    policy.ttl.as_secs().max(1),
                    meta_ttl_s,
                    since.as_ref(),
                )
                .await
                .map_err(|e| {
                    cluster.fell_back(Fallback::History, &e);
                    HubError::HistoryUnavailable(e.to_string())
                })
        })
    }
}

/// Sends queued messages to Redis, a pipeline per batch.
async fn publish(
    bp: Arc<RedisBackplane>,
    mut rx: mpsc::Receiver<Outgoing>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(bp.batch);
    let metrics = &bp.cluster.metrics;
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, bp.batch) => n,
            () = stop.cancelled() => {
                // What is queued at shutdown still goes out.
                rx.close();
                rx.recv_many(&mut batch, bp.batch).await
            }
        };
        if n == 0 {
            return;
        }
        let mut pipe = redis::pipe();
        for m in &batch {
            match m {
                Outgoing::Publish { channel, payload } => {
                    pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
                }
                Outgoing::Append {
                    list,
                    meta,
                    channel,
                    body,
                    size,
                    ttl_s,
                } => {
                    pipe.cmd("EVAL")
                        .arg(super::history::APPEND.as_str())
                        .arg(2)
                        .arg(list)
                        .arg(meta)
                        .arg(channel)
                        .arg(body)
                        .arg(size)
                        .arg(ttl_s)
                        .arg(bp.meta_ttl_s)
                        .ignore();
                }
            }
        }
        match bp
            .cluster
            .pipeline::<()>(&pipe, bp.cluster.call_timeout)
            .await
        {
            Ok(()) => {
                metrics.published.inc_by(batch.len() as u64);
            }
            Err(e) => {
                metrics
                    .lost(LostReason::RedisError)
                    .inc_by(batch.len() as u64);
                tracing::debug!(error = %e, lost = batch.len(), "cross-node messages lost");
            }
        }
        batch.clear();
    }
}

/// Why a subscriber session ended.
enum Ended {
    Stopped,
    Lost(String),
}

/// Keeps the subscriber connection up, subscribed and probed.
async fn subscribe(bp: Arc<RedisBackplane>, hub: Weak<Hub>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    let mut seed = 0usize;
    loop {
        let (url, client) = &bp.cluster.sub_clients[seed % bp.cluster.sub_clients.len()];
        let connected = tokio::select! {
            c = tokio::time::timeout(bp.cluster.call_timeout.max(Duration::from_secs(1)), client.get_async_pubsub()) => c,
            () = stop.cancelled() => break,
        };
        let pubsub = match connected {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                down(&bp, &format!("{url}: {e}"));
                seed += 1;
                if pause(&stop, &mut backoff).await {
                    break;
                }
                continue;
            }
            Err(_) => {
                down(&bp, &format!("{url}: connect timed out"));
                seed += 1;
                if pause(&stop, &mut backoff).await {
                    break;
                }
                continue;
            }
        };
        match session(&bp, &hub, pubsub, &stop).await {
            Ended::Stopped => break,
            Ended::Lost(why) => {
                down(&bp, &why);
                seed += 1;
                // A session that was up starts the backoff over.
                backoff = Duration::from_millis(100);
                if pause(&stop, &mut backoff).await {
                    break;
                }
            }
        }
    }
    bp.cluster.metrics.up.set(0);
}

fn down(bp: &RedisBackplane, why: &str) {
    if bp.cluster.metrics.up.get() == 1 {
        tracing::warn!(node = %bp.cluster.node_id, reason = why, "cluster: degraded, reconnecting to Redis");
    } else {
        tracing::debug!(reason = why, "cluster: still reconnecting");
    }
    bp.cluster.metrics.up.set(0);
    bp.cluster.metrics.channels.set(0);
}

/// Sleeps the backoff (with jitter), then doubles it up to
/// [`MAX_BACKOFF`]. Returns true when stopped meanwhile.
async fn pause(stop: &CancellationToken, backoff: &mut Duration) -> bool {
    let jitter = Duration::from_millis(u64::from(uuid::Uuid::new_v4().as_bytes()[0]) % 50);
    let wait = *backoff + jitter;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    tokio::select! {
        () = tokio::time::sleep(wait) => false,
        () = stop.cancelled() => true,
    }
}

/// One subscriber connection's life: subscribe everything, then deliver,
/// apply interest changes and probe until it fails or the node stops.
async fn session(
    bp: &Arc<RedisBackplane>,
    hub: &Weak<Hub>,
    pubsub: redis::aio::PubSub,
    stop: &CancellationToken,
) -> Ended {
    let (mut sink, mut stream) = pubsub.split();
    let metrics = &bp.cluster.metrics;
    // Everything the hub has recipients for now; changes reported from
    // here on are applied after.
    let mut snapshot_at = 0;
    let mut current: HashSet<String> = {
        let Some(hub) = hub.upgrade() else {
            return Ended::Stopped;
        };
        // Under the hub's lock (the order the hub takes them in), so no
        // change falls between the snapshot and the cleared log.
        hub.channels_then(|| {
            let mut st = bp.lock();
            st.changes.clear();
            st.resync = false;
            snapshot_at = bp.requested.load(Ordering::SeqCst);
        })
        .iter()
        .map(|c| bp.channel(c))
        .collect()
    };
    let fixed = [
        bp.everyone(),
        bp.probe_channel(),
        bp.control_channel(),
        bp.answers_channel(&bp.cluster.node_id),
    ];
    let all: Vec<&String> = fixed.iter().chain(current.iter()).collect();
    for chunk in all.chunks(SUBSCRIBE_CHUNK) {
        match tokio::time::timeout(SUBSCRIBE_DEADLINE, sink.subscribe(chunk)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Ended::Lost(format!("subscribe: {e}")),
            Err(_) => return Ended::Lost("subscribe timed out".to_owned()),
        }
    }
    bp.applied.send_replace(snapshot_at);
    metrics.connects.inc();
    metrics.channels.set((current.len() + fixed.len()) as i64);
    tracing::info!(node = %bp.cluster.node_id, channels = current.len(), "cluster: subscribed");

    let probe = bp.probe_channel();
    let mut nonce: u64 = 0;
    // The probe sent and not yet seen back, with when it was sent.
    let mut waiting: Option<(u64, Instant)> = None;
    let mut tick = tokio::time::interval(bp.cluster.probe_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ended::Stopped,
            msg = stream.next() => {
                let Some(msg) = msg else {
                    return Ended::Lost("subscriber connection closed".to_owned());
                };
                let channel = msg.get_channel_name();
                if channel == probe {
                    let seen = std::str::from_utf8(msg.get_payload_bytes())
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok());
                    if seen.is_some() && seen == waiting.map(|w| w.0) {
                        waiting = None;
                        if bp.cluster.commands_ok() && metrics.up.get() == 0 {
                            metrics.up.set(1);
                            tracing::info!(node = %bp.cluster.node_id, "cluster: up");
                        }
                    }
                    continue;
                }
                let item = if channel == fixed[2] {
                    Inbound::Command(msg.get_payload_bytes().to_vec())
                } else if channel == fixed[3] {
                    bp.on_answer(msg.get_payload_bytes());
                    continue;
                } else if let Some(push) = received(bp, channel, msg.get_payload_bytes()) {
                    push
                } else {
                    continue;
                };
                // Read on whatever happens to it: the Redis client buffers
                // what is not read without a bound, so this queue is the
                // bound, and a probe behind unread messages would be late.
                metrics.receive_queued.inc();
                if bp.inbound.try_send(item).is_err() {
                    metrics.receive_queued.dec();
                    metrics.lost(LostReason::ReceiveQueueFull).inc();
                }
            }
            () = bp.changed.notified() => {
                if let Err(why) = apply_changes(bp, hub, &mut sink, &mut current).await {
                    return Ended::Lost(why);
                }
                metrics.channels.set((current.len() + fixed.len()) as i64);
            }
            _ = tick.tick() => {
                if let Some((_, sent)) = waiting {
                    if sent.elapsed() >= bp.cluster.probe_every {
                        metrics.probe_failures.inc();
                        return Ended::Lost("probe did not come back".to_owned());
                    }
                    continue;
                }
                nonce += 1;
                let sent = Instant::now();
                let published: Result<i64, _> = bp
                    .cluster
                    .query(redis::cmd("PUBLISH").arg(&probe).arg(nonce.to_string()))
                    .await;
                match published {
                    Ok(_) => {
                        bp.cluster.commands_answered(true);
                        waiting = Some((nonce, sent));
                    }
                    Err(e) => {
                        // Commands fail: degraded, though the subscriber
                        // socket may live on.
                        bp.cluster.commands_answered(false);
                        metrics.probe_failures.inc();
                        if metrics.up.get() == 1 {
                            tracing::warn!(error = %e, "cluster: degraded, Redis commands fail");
                        }
                        metrics.up.set(0);
                    }
                }
            }
        }
    }
}

/// A push from another node, for this node's recipients; `None` for this
/// node's own (delivered here when it was sent) and what is not gale's.
fn received(bp: &RedisBackplane, channel: &str, payload: &[u8]) -> Option<Inbound> {
    let cut = payload.iter().position(|&b| b == b'\n')?;
    let (origin, text) = (&payload[..cut], &payload[cut + 1..]);
    if origin == bp.cluster.node_id.as_bytes() {
        return None;
    }
    let (Some(target), Ok(text)) = (bp.target(channel), std::str::from_utf8(text)) else {
        tracing::debug!(channel, "cluster: message not for gale, ignored");
        return None;
    };
    bp.cluster.metrics.received.inc();
    Some(Inbound::Push(target, Prepared::new(text)))
}

/// Hands what other nodes sent to the hub, in the order it came: the
/// pushes to one target that came one after another as one run (each
/// connection's share of them written at once), a command in its place
/// between them, so that it acts after the pushes sent before it. At
/// `stop`, hands out what is queued, then ends.
async fn hand_out(
    bp: Arc<RedisBackplane>,
    hub: Weak<Hub>,
    mut rx: mpsc::Receiver<Inbound>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(HAND_OUT_BATCH);
    let mut run = Vec::new();
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, HAND_OUT_BATCH) => n,
            () = stop.cancelled() => {
                rx.close();
                rx.recv_many(&mut batch, HAND_OUT_BATCH).await
            }
        };
        if n == 0 {
            return;
        }
        bp.cluster.metrics.receive_queued.dec_by(n as i64);
        let Some(hub) = hub.upgrade() else { return };
        let mut items = batch.drain(..).peekable();
        while let Some(item) = items.next() {
            match item {
                Inbound::Command(payload) => bp.on_command(&hub, &payload),
                Inbound::Push(target, text) => {
                    run.push(text);
                    while let Some(Inbound::Push(_, next)) =
                        items.next_if(|i| matches!(i, Inbound::Push(t, _) if *t == target))
                    {
                        run.push(next);
                    }
                    hub.deliver_remote(&target, &run);
                    run.clear();
                }
            }
        }
    }
}

/// Applies the interest changes reported since the last call.
async fn apply_changes(
    bp: &RedisBackplane,
    hub: &Weak<Hub>,
    sink: &mut redis::aio::PubSubSink,
    current: &mut HashSet<String>,
) -> Result<(), String> {
    let (changes, resync, upto) = {
        let mut st = bp.lock();
        (
            std::mem::take(&mut st.changes),
            std::mem::take(&mut st.resync),
            bp.requested.load(Ordering::SeqCst),
        )
    };
    // The last change per channel wins.
    let mut want: HashMap<String, bool> = HashMap::new();
    if resync {
        let Some(hub) = hub.upgrade() else {
            return Ok(());
        };
        let all: HashSet<String> = hub.channels().iter().map(|c| bp.channel(c)).collect();
        for c in current.iter() {
            want.insert(c.clone(), all.contains(c));
        }
        for c in all {
            want.insert(c, true);
        }
    }
    for (c, on) in changes {
        want.insert(c, on);
    }
    let add: Vec<String> = want
        .iter()
        .filter(|(c, on)| **on && !current.contains(*c))
        .map(|(c, _)| c.clone())
        .collect();
    let remove: Vec<String> = want
        .iter()
        .filter(|(c, on)| !**on && current.contains(*c))
        .map(|(c, _)| c.clone())
        .collect();
    for chunk in add.chunks(SUBSCRIBE_CHUNK) {
        tokio::time::timeout(SUBSCRIBE_DEADLINE, sink.subscribe(chunk))
            .await
            .map_err(|_| "subscribe timed out".to_owned())?
            .map_err(|e| format!("subscribe: {e}"))?;
    }
    for chunk in remove.chunks(SUBSCRIBE_CHUNK) {
        tokio::time::timeout(SUBSCRIBE_DEADLINE, sink.unsubscribe(chunk))
            .await
            .map_err(|_| "unsubscribe timed out".to_owned())?
            .map_err(|e| format!("unsubscribe: {e}"))?;
    }
    current.extend(add);
    for c in &remove {
        current.remove(c);
    }
    bp.applied.send_replace(upto);
    Ok(())
}
