//! Push: to a user (all their connections), to a set of users, to a
//! topic's subscribers, or to everyone.
//!
//! The [`Hub`] keeps who is connected: connection → (outbox, user, topics),
//! user → connections, topic → (connection, outbox). Both directions are indexed so
//! a connection's clean-up costs only its own topics. A message is encoded
//! once; every recipient's outbox gets a reference-counted copy of the same
//! bytes, and each connection writes whatever has queued with one flush.
//!
//! [`Hub::publish`] goes through a bounded broadcast queue: a delivery task
//! delivers a broadcast that finds the server quiet at once; under load it
//! takes up to `batch_size` messages, or what arrives within
//! `batch_window_ms` of the first, and delivers them together, so a burst
//! costs each connection one write. A batch it wrote whole into idle
//! sockets itself is no load: what came meanwhile goes next, unwaited.
//! A full queue drops the message and counts it. [`Hub::send_now`]
//! delivers at once (replies to a handler's own action).
//!
//! Every push is also handed to the hub's [`Backplane`]: on a single node
//! that does nothing; in cluster mode it carries the encoded push to the
//! other nodes that have recipients for it (see `crate::cluster`), and
//! what other nodes send arrives through [`Hub::deliver_remote`]. Delivery
//! itself never knows whether a recipient is local or remote: the hub
//! delivers to its own connections and tells the backplane which users
//! and topics it has connections for.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::websocket::{Prepared, Run};
use serde_json::Value;
use tokio::sync::{broadcast as events, mpsc};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::config::{BroadcastConfig, Threads};
use crate::fanout::Helpers;
use crate::history::{self, Memory, Policies, Recovery, Since};
use crate::metrics::Metrics;
use crate::outbox::{Outbox, Reach};
use crate::protocol::push_json;
use crate::router::Caller;
use futures_util::future::BoxFuture;

/// Recipients from which a run of pushes is copied into one buffer
/// ([`Run`]): below it the copy costs more than it saves.
const JOIN_RECIPIENTS: usize = 4;

/// Bytes a run grows to at most by taking in the next batch's pushes
/// ([`Hub::queue_here`]).
const MAX_RUN_BYTES: usize = 64 * 1024;

/// Runs one run carries at most. A connection that holds a run and the
/// ones that carry it keeps each copy alive: with at most three, a slow
/// connection's queue keeps at most 2.5 times its messages' bytes (for
/// runs of like sizes).
const MAX_RUN_DEPTH: usize = 3;

/// Recipients from which pushes written straight into idle sockets are
/// written with the core's other tasks moved aside
/// (`tokio::task::block_in_place`): below it the writes are done sooner
/// than the tasks would move.
const SWEEP_ASIDE: usize = 1024;

/// Recipients in one chunk of a fan-out that helper threads share
/// ([`crate::fanout`]): a push to [`SWEEP_ASIDE`] sockets or more is four
/// chunks at least.
const CHUNK: usize = SWEEP_ASIDE / 4;

/// Whether this thread may move its core's other tasks aside
/// (`tokio::task::block_in_place` panics on a current-thread runtime).
fn on_multi_thread_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

/// Writes `texts`, or `run` from a message on, into `to`'s idle sockets
/// at once (queued for the others): a chunk of [`Hub::write_shared`], or
/// all of it when no helper is free.
fn write_share(
    to: &[Arc<Outbox>],
    texts: &[Prepared],
    run: Option<(&Run, usize)>,
    metrics: &Metrics,
) -> Reach {
    match run {
        Some((run, from)) => Outbox::push_run(to, run, from, metrics, true),
        None => Outbox::push_each(to, texts, metrics, true),
    }
}

/// Who a push goes to.
///
/// ```
/// use gale_engine::broadcast::Target;
///
/// let room = Target::Topic("room:lobby".into());
/// let two = Target::Users(vec!["alice".into(), "bob".into()]);
/// # let _ = (room, two, Target::Everyone);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every connection of each of these users.
    Users(Vec<String>),
    /// Every subscriber of the topic.
    Topic(String),
    /// Every connection.
    Everyone,
}

/// Lifecycle events for application hooks (never sent on the wire): the
/// equivalents of Sente's `uidport-open` / `uidport-close`.
#[derive(Debug, Clone, PartialEq)]
pub enum SystemEvent {
    /// A connection opened.
    Opened {
        /// The connection.
        conn_id: Uuid,
        /// Its user, if signed in.
        user: Option<Arc<str>>,
    },
    /// A connection closed.
    Closed {
        /// The connection.
        conn_id: Uuid,
        /// Its user, if signed in.
        user: Option<Arc<str>>,
    },
    /// A user's first connection opened.
    UserOnline(Arc<str>),
    /// A user's last connection closed.
    UserOffline(Arc<str>),
    /// A user's first connection here came from the previous process by
    /// a takeover: online already, and still (nobody is told again).
    UserResumed(Arc<str>),
}

/// Why a subscription or a publish was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    /// The connection holds `broadcast.max_topics_per_connection` already.
    #[error("at most {0} topics per connection (broadcast.max_topics_per_connection)")]
    TooManyTopics(usize),
    /// The node holds `broadcast.max_topics` topics already.
    #[error("the server holds its maximum of {0} topics (broadcast.max_topics)")]
    TopicLimit(usize),
    /// The client (its user, or its address when anonymous) brought its
    /// share of the node's topics into existence already.
    #[error(
        "this client has started its share of {0} topics on this server \
         (broadcast.max_topics_share): subscribe to topics others hold, or leave some"
    )]
    ClientTopicLimit(usize),
    /// The broadcast queue is full; the message was dropped.
    #[error("the broadcast queue is full: message dropped")]
    QueueFull,
    /// The hub is shutting down.
    #[error("the server is shutting down")]
    Closed,
    /// The shared history (Redis, in cluster mode) did not answer.
    #[error("the topic's history is unavailable: {0}")]
    HistoryUnavailable(String),
    /// The encoded push is larger than any connection may be sent.
    #[error(
        "the push would be {size} bytes, over server.max_outbound_message_bytes = {limit}: nothing was sent"
    )]
    TooLarge {
        /// The encoded push, in bytes.
        size: usize,
        /// `server.max_outbound_message_bytes`.
        limit: usize,
    },
}

/// A stream of pushes other nodes may have recipients for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Channel {
    /// A user's connections.
    User(Arc<str>),
    /// A topic's subscribers.
    Topic(Arc<str>),
}

/// Carries pushes between nodes. The hub calls it with its lock held:
/// implementations must not block.
pub trait Backplane: Send + Sync + std::fmt::Debug {
    /// A push this node encoded and delivered locally: send it to the
    /// other nodes' recipients of `target`.
    fn forward(&self, target: &Target, text: &Prepared);
    /// This node now has (`true`) or no longer has (`false`) local
    /// recipients on `channel`.
    fn interest(&self, channel: Channel, on: bool);
    /// Whether topic history lives in this backplane (shared by every
    /// node) rather than in the hub's memory.
    fn shares_history(&self) -> bool {
        false
    }
    /// A publication on a topic with history: the backplane gives it its
    /// position and delivers it to every node, this one included.
    /// `false` when it cannot now (the hub then delivers it here,
    /// without a position).
    fn append(&self, _topic: &str, _policy: history::Policy, _text: &Prepared) -> bool {
        false
    }
    /// Resolves once every interest change reported so far is in effect
    /// (this node receives what is published on those channels), or when
    /// that takes longer than the backplane's deadline.
    fn settled(&self) -> BoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }
    /// Runs `cmd` on every other node; their answers, as many as came
    /// within the backplane's deadline (none on a single node).
    fn everywhere(&self, cmd: crate::control::Command) -> BoxFuture<'static, Vec<Value>> {
        let _ = cmd;
        Box::pin(std::future::ready(Vec::new()))
    }
    /// Reads a shared history (see [`Backplane::shares_history`]).
    fn recover(
        &self,
        topic: &str,
        policy: history::Policy,
        since: Option<Since>,
    ) -> BoxFuture<'static, Result<Recovery, HubError>> {
        let _ = (topic, policy, since);
        Box::pin(std::future::ready(Err(HubError::HistoryUnavailable(
            "no shared history".to_owned(),
        ))))
    }
}

/// A subscriber of a topic, as presence shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Present {
    /// Its connection.
    pub client: Uuid,
    /// Its user.
    pub user: Option<Arc<str>>,
    /// Its user's public data (JSON).
    pub info: Option<Arc<str>>,
}

/// Whose connections to end.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// Every connection of a user.
    User(String),
    /// One connection.
    Client(Uuid),
}

/// The single-node backplane: there is no other node.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalOnly;

impl Backplane for LocalOnly {
    fn forward(&self, _: &Target, _: &Prepared) {}
    fn interest(&self, _: Channel, _: bool) {}
}

struct Member {
    outbox: Arc<Outbox>,
    user: Option<Arc<str>>,
    topics: Vec<Arc<str>>,
    /// Who a topic this connection brings into existence counts against.
    owner: Owner,
    /// Public data about its user (JSON), for presence and join/leave.
    info: Option<Arc<str>>,
}

/// A subscription [`Hub::remove`] ended: whether its topic announces
/// leaves, and who left.
struct Removed {
    announced: bool,
    user: Option<Arc<str>>,
    info: Option<Arc<str>>,
}

/// Who the topics a connection creates count against: its user, or, when
/// anonymous, its client address (so reconnecting does not escape it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Owner {
    User(Arc<str>),
    Address(std::net::IpAddr),
}

/// Outboxes as one shared list: a delivery to many takes one reference
/// count for the list rather than one per recipient.
type Shared = Arc<[Arc<Outbox>]>;

/// A topic's subscribers, with their outboxes: a delivery walks one table
/// instead of looking each one up in `conns`.
#[derive(Default)]
struct Members {
    by_conn: HashMap<Uuid, Arc<Outbox>>,
    /// Every subscriber's outbox as one list, made at the first delivery
    /// after a change and dropped by the next change: a topic's
    /// publications between two joins or leaves share it.
    snapshot: Option<Shared>,
}

impl Members {
    fn insert(&mut self, conn_id: Uuid, outbox: Arc<Outbox>) {
        self.snapshot = None;
        self.by_conn.insert(conn_id, outbox);
    }

    fn remove(&mut self, conn_id: &Uuid) {
        if self.by_conn.remove(conn_id).is_some() {
            self.snapshot = None;
        }
    }

    fn len(&self) -> usize {
        self.by_conn.len()
    }

    fn is_empty(&self) -> bool {
        self.by_conn.is_empty()
    }

    fn shared(&mut self) -> Shared {
        let by_conn = &self.by_conn;
        self.snapshot
            .get_or_insert_with(|| by_conn.values().cloned().collect())
            .clone()
    }
}

/// The outboxes a push goes to.
enum Recipients {
    /// A list shared with other deliveries (a topic's, or everyone's).
    Shared(Shared),
    /// A list made for this delivery (a set of users').
    Listed(Vec<Arc<Outbox>>),
}

impl Recipients {
    /// The list, shareable with the threads that write parts of it.
    fn shared(&self) -> Shared {
        match self {
            Recipients::Shared(s) => s.clone(),
            Recipients::Listed(l) => l.as_slice().into(),
        }
    }
}

impl std::ops::Deref for Recipients {
    type Target = [Arc<Outbox>];

    fn deref(&self) -> &[Arc<Outbox>] {
        match self {
            Recipients::Shared(s) => s,
            Recipients::Listed(l) => l,
        }
    }
}

#[derive(Default)]
struct State {
    conns: HashMap<Uuid, Member>,
    /// Every connection's outbox as one list, as [`Members::snapshot`]
    /// for pushes to everyone.
    everyone: Option<Shared>,
    users: HashMap<Arc<str>, Vec<Uuid>>,
    /// Each topic's subscribers.
    topics: HashMap<Arc<str>, Members>,
    /// Who brought each topic into existence (bounded by `topics`).
    created_by: HashMap<Arc<str>, Owner>,
    /// How many of the topics each owner brought into existence.
    owned: HashMap<Owner, usize>,
    /// Topics whose subscribers hear joins and leaves.
    announced: HashSet<Arc<str>>,
}

impl State {
    /// Forgets a topic that no connection holds any more.
    fn topic_gone(&mut self, topic: &str) {
        self.announced.remove(topic);
        if let Some(owner) = self.created_by.remove(topic)
            && let Some(n) = self.owned.get_mut(&owner)
        {
            *n -= 1;
            if *n == 0 {
                self.owned.remove(&owner);
            }
        }
    }

    /// Adds a connection.
    fn insert_conn(&mut self, conn_id: Uuid, member: Member) {
        self.everyone = None;
        self.conns.insert(conn_id, member);
    }

    /// Removes a connection (its topics and user are the caller's).
    fn remove_conn(&mut self, conn_id: &Uuid) -> Option<Member> {
        let member = self.conns.remove(conn_id)?;
        self.everyone = None;
        Some(member)
    }

    /// The outboxes of `target`'s connections.
    fn recipients(&mut self, target: &Target) -> Recipients {
        match target {
            Target::Everyone => {
                let conns = &self.conns;
                Recipients::Shared(
                    self.everyone
                        .get_or_insert_with(|| conns.values().map(|m| m.outbox.clone()).collect())
                        .clone(),
                )
            }
            Target::Topic(t) => match self.topics.get_mut(t.as_str()) {
                Some(members) => Recipients::Shared(members.shared()),
                None => Recipients::Listed(Vec::new()),
            },
            Target::Users(users) => {
                Recipients::Listed(self.user_conns(users).map(|m| m.outbox.clone()).collect())
            }
        }
    }

    /// How many connections `target` reaches.
    fn reach(&self, target: &Target) -> usize {
        match target {
            Target::Everyone => self.conns.len(),
            Target::Topic(t) => self.topics.get(t.as_str()).map_or(0, Members::len),
            Target::Users(users) => self.user_conns(users).count(),
        }
    }

    /// Every connection of each of `users` (each user once).
    fn user_conns<'a>(&'a self, users: &'a [String]) -> impl Iterator<Item = &'a Member> {
        let unique: HashSet<&str> = users.iter().map(String::as_str).collect();
        unique
            .into_iter()
            .filter_map(|u| self.users.get(u))
            .flatten()
            .filter_map(|id| self.conns.get(id))
    }
}

struct Queued {
    target: Target,
    text: Prepared,
    /// The topic's history policy, looked up once when encoded.
    history: Option<history::Policy>,
}

/// The registry of connections, users and topics, and the push paths.
pub struct Hub {
    state: Mutex<State>,
    queue: mpsc::Sender<Queued>,
    system: events::Sender<SystemEvent>,
    max_topics: usize,
    max_topics_per_conn: usize,
    /// `broadcast.max_topics_share` of `max_topics`: what one owner may
    /// bring into existence.
    max_topics_per_owner: usize,
    max_message_bytes: usize,
    metrics: Arc<Metrics>,
    backplane: Arc<dyn Backplane>,
    /// Which topics keep history.
    policies: Policies,
    /// Their streams, on a single node.
    memory: Memory,
    /// The last run of pushes to many, and its target, while connections
    /// still hold it: the next run to that target is written after it in
    /// one buffer ([`Hub::queue_here`]).
    open: Mutex<Option<(Target, Run)>>,
    /// Threads that write chunks of a large fan-out beside the one
    /// delivering it.
    helpers: Helpers,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

/// The running delivery task; [`Delivery::flush`] delivers what is queued
/// and stops it.
#[derive(Debug)]
pub struct Delivery {
    stop: tokio_util::sync::CancellationToken,
    task: JoinHandle<()>,
}

impl Delivery {
    /// Delivers every queued broadcast, then stops; at most `deadline`.
    pub async fn flush(self, deadline: Duration) -> bool {
        self.stop.cancel();
        tokio::time::timeout(deadline, self.task).await.is_ok()
    }
}

impl Hub {
    /// A hub and its delivery task. No push larger than
    /// `max_message_bytes` (`server.max_outbound_message_bytes`) is ever
    /// queued for a connection.
    pub fn start(
        cfg: &BroadcastConfig,
        history: (Policies, &crate::config::HistoryConfig),
        max_message_bytes: usize,
        metrics: Arc<Metrics>,
        backplane: Arc<dyn Backplane>,
    ) -> (Arc<Hub>, Delivery) {
        let (tx, rx) = mpsc::channel(cfg.queue_size);
        let (system, _) = events::channel(1024);
        let hub = Arc::new(Hub {
            state: Mutex::new(State::default()),
            queue: tx,
            system,
            max_topics: cfg.max_topics,
            max_topics_per_conn: cfg.max_topics_per_connection,
            max_topics_per_owner: ((cfg.max_topics as f64 * cfg.max_topics_share) as usize).max(1),
            max_message_bytes,
            memory: Memory::new(history.1, metrics.clone()),
            metrics,
            backplane,
            policies: history.0,
            open: Mutex::new(None),
            helpers: Helpers::new(match cfg.fanout_threads {
                Threads::Count(n) => n,
                Threads::Auto => tokio::runtime::Handle::current()
                    .metrics()
                    .num_workers()
                    .saturating_sub(1),
            }),
        });
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(deliver(
            Arc::downgrade(&hub),
            rx,
            cfg.batch_size.max(1),
            Duration::from_millis(cfg.batch_window_ms),
            stop.clone(),
        ));
        (hub, Delivery { stop, task })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Each mutation leaves the maps consistent before anything that
        // could panic; a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lifecycle events for application code. A receiver that falls more
    /// than 1,024 events behind skips ahead (`Lagged`).
    pub fn system_events(&self) -> events::Receiver<SystemEvent> {
        self.system.subscribe()
    }

    fn emit(&self, e: SystemEvent) {
        // No receiver is not an error: hooks are optional.
        let _ = self.system.send(e);
    }

    /// Registers a connection.
    pub fn join(&self, caller: &Caller) {
        self.register(caller, true);
    }

    /// Registers a connection handed over by the previous process: it
    /// did not open, so no `Opened` or `UserOnline` is told.
    pub(crate) fn join_resumed(&self, caller: &Caller) {
        self.register(caller, false);
    }

    fn register(&self, caller: &Caller, tell: bool) {
        let first = {
            let mut st = self.lock();
            st.insert_conn(
                caller.conn_id,
                Member {
                    outbox: caller.outbox.clone(),
                    user: caller.user.clone(),
                    topics: Vec::new(),
                    owner: match &caller.user {
                        Some(u) => Owner::User(u.clone()),
                        None => Owner::Address(caller.address),
                    },
                    info: caller.info.clone(),
                },
            );
            let first = caller.user.as_ref().map(|u| {
                let ids = st.users.entry(u.clone()).or_default();
                ids.push(caller.conn_id);
                let first = ids.len() == 1;
                if first {
                    self.backplane.interest(Channel::User(u.clone()), true);
                }
                first
            });
            self.metrics.users.set(st.users.len() as i64);
            first
        };
        if !tell {
            if let (Some(true), Some(user)) = (first, &caller.user) {
                self.emit(SystemEvent::UserResumed(user.clone()));
            }
            return;
        }
        self.emit(SystemEvent::Opened {
            conn_id: caller.conn_id,
            user: caller.user.clone(),
        });
        if let (Some(true), Some(user)) = (first, &caller.user) {
            tracing::debug!(%user, "user online");
            self.emit(SystemEvent::UserOnline(user.clone()));
        }
    }

    /// Unregisters a connection and ends its subscriptions.
    pub fn leave(&self, conn_id: Uuid) {
        let mut leaves = Vec::new();
        let (user, info, last) = {
            let mut st = self.lock();
            let Some(member) = st.remove_conn(&conn_id) else {
                return;
            };
            for topic in &member.topics {
                if st.announced.contains(topic) {
                    leaves.push(topic.clone());
                }
                if let Some(ids) = st.topics.get_mut(topic) {
                    ids.remove(&conn_id);
                    if ids.is_empty() {
                        st.topics.remove(topic);
                        st.topic_gone(topic);
                        self.backplane
                            .interest(Channel::Topic(topic.clone()), false);
                    }
                }
            }
            let mut last = false;
            if let Some(u) = &member.user
                && let Some(ids) = st.users.get_mut(u)
            {
                ids.retain(|id| *id != conn_id);
                if ids.is_empty() {
                    st.users.remove(u);
                    self.backplane.interest(Channel::User(u.clone()), false);
                    last = true;
                }
            }
            self.metrics.users.set(st.users.len() as i64);
            self.metrics.topics.set(st.topics.len() as i64);
            (member.user, member.info, last)
        };
        for topic in leaves {
            self.announce(
                &topic,
                "topic.leave",
                conn_id,
                user.as_deref(),
                info.as_deref(),
            );
        }
        self.emit(SystemEvent::Closed {
            conn_id,
            user: user.clone(),
        });
        if let (true, Some(user)) = (last, user) {
            tracing::debug!(%user, "user offline");
            self.emit(SystemEvent::UserOffline(user));
        }
    }

    /// Subscribes a connection to a topic. Returns false if it already was.
    ///
    /// # Errors
    /// [`HubError`] past the per-connection or node topic limit.
    pub fn subscribe(&self, conn_id: Uuid, topic: &str) -> Result<bool, HubError> {
        self.subscribe_announced(conn_id, topic, false)
    }

    /// As [`Hub::subscribe`]; with `announce`, the topic's subscribers
    /// (here and on every node) hear `topic.join` with the new
    /// subscriber, and `topic.leave` when it goes.
    ///
    /// # Errors
    /// [`HubError`] past the per-connection or node topic limit.
    pub fn subscribe_announced(
        &self,
        conn_id: Uuid,
        topic: &str,
        announce: bool,
    ) -> Result<bool, HubError> {
        let Some((user, info)) = self.add(conn_id, topic, announce)? else {
            return Ok(false);
        };
        if announce {
            self.announce(
                topic,
                "topic.join",
                conn_id,
                user.as_deref(),
                info.as_deref(),
            );
        }
        Ok(true)
    }

    /// Adds the subscription; `Some((user, info))` of the subscriber when
    /// it is new.
    #[allow(clippy::type_complexity)]
    fn add(
        &self,
        conn_id: Uuid,
        topic: &str,
        announce: bool,
    ) -> Result<Option<(Option<Arc<str>>, Option<Arc<str>>)>, HubError> {
        let mut st = self.lock();
        let st = &mut *st;
        let Some(member) = st.conns.get_mut(&conn_id) else {
            return Err(HubError::Closed);
        };
        if member.topics.iter().any(|t| &**t == topic) {
            return Ok(None);
        }
        if member.topics.len() >= self.max_topics_per_conn {
            return Err(HubError::TooManyTopics(self.max_topics_per_conn));
        }
        let key: Arc<str> = match st.topics.get_key_value(topic) {
            Some((k, _)) => k.clone(),
            None if st.topics.len() >= self.max_topics => {
                return Err(HubError::TopicLimit(self.max_topics));
            }
            None => {
                let owned = st.owned.entry(member.owner.clone()).or_default();
                if *owned >= self.max_topics_per_owner {
                    if *owned == 0 {
                        st.owned.remove(&member.owner);
                    }
                    return Err(HubError::ClientTopicLimit(self.max_topics_per_owner));
                }
                *owned += 1;
                let key: Arc<str> = topic.into();
                st.created_by.insert(key.clone(), member.owner.clone());
                self.backplane.interest(Channel::Topic(key.clone()), true);
                key
            }
        };
        member.topics.push(key.clone());
        let who = (member.user.clone(), member.info.clone());
        let outbox = member.outbox.clone();
        if announce {
            st.announced.insert(key.clone());
        }
        st.topics.entry(key).or_default().insert(conn_id, outbox);
        self.metrics.topics.set(st.topics.len() as i64);
        Ok(Some(who))
    }

    /// Subscribes a connection handed over by the previous process to
    /// a topic it held there, keeping whether the topic announces joins
    /// and leaves, without announcing a join (it never left).
    ///
    /// # Errors
    /// [`HubError`] past this node's limits.
    pub(crate) fn resubscribe(
        &self,
        conn_id: Uuid,
        topic: &str,
        announced: bool,
    ) -> Result<(), HubError> {
        self.add(conn_id, topic, announced).map(drop)
    }

    /// A connection's topics, each with whether it announces joins and
    /// leaves.
    pub(crate) fn subscriptions(&self, conn_id: Uuid) -> Vec<(String, bool)> {
        let st = self.lock();
        st.conns.get(&conn_id).map_or_else(Vec::new, |m| {
            m.topics
                .iter()
                .map(|t| (t.to_string(), st.announced.contains(t)))
                .collect()
        })
    }

    /// Every connection's outbox (WebSocket and SSE).
    pub(crate) fn outboxes(&self) -> Vec<Arc<Outbox>> {
        self.lock().recipients(&Target::Everyone).to_vec()
    }

    /// Forgets a connection handed to another process: no leave is
    /// announced and no `Closed` told (it did not close).
    pub(crate) fn forget(&self, conn_id: Uuid) {
        let mut st = self.lock();
        let Some(member) = st.remove_conn(&conn_id) else {
            return;
        };
        for topic in &member.topics {
            if let Some(ids) = st.topics.get_mut(topic) {
                ids.remove(&conn_id);
                if ids.is_empty() {
                    st.topics.remove(topic);
                    st.topic_gone(topic);
                }
            }
        }
        if let Some(u) = &member.user
            && let Some(ids) = st.users.get_mut(u)
        {
            ids.retain(|id| *id != conn_id);
            if ids.is_empty() {
                st.users.remove(u);
            }
        }
        self.metrics.users.set(st.users.len() as i64);
        self.metrics.topics.set(st.topics.len() as i64);
    }

    /// Whether topic history lives in the backplane (cluster mode), not
    /// in this process.
    pub(crate) fn shares_history(&self) -> bool {
        self.backplane.shares_history()
    }

    /// The in-memory history (single node), for a takeover.
    pub(crate) fn memory(&self) -> &Memory {
        &self.memory
    }

    /// Tells `topic`'s subscribers, here and on every node, that
    /// `conn_id` joined or left (`event`): never in the topic's history.
    fn announce(
        &self,
        topic: &str,
        event: &str,
        conn_id: Uuid,
        user: Option<&str>,
        info: Option<&str>,
    ) {
        let info: Value = info
            .and_then(|i| serde_json::from_str(i).ok())
            .unwrap_or(Value::Null);
        let data =
            serde_json::json!({"topic": topic, "client": conn_id, "user": user, "info": info});
        let text = Prepared::from(push_json(event, &data));
        if text.len() <= self.max_message_bytes {
            self.deliver(&Target::Topic(topic.to_owned()), &text, None);
        }
    }

    /// Ends a subscription (its topic's subscribers hear `topic.leave`
    /// when it announces). Returns whether there was one.
    pub fn unsubscribe(&self, conn_id: Uuid, topic: &str) -> bool {
        match self.remove(conn_id, topic) {
            None => false,
            Some(Removed {
                announced,
                user,
                info,
            }) => {
                if announced {
                    self.announce(
                        topic,
                        "topic.leave",
                        conn_id,
                        user.as_deref(),
                        info.as_deref(),
                    );
                }
                true
            }
        }
    }

    /// Removes a subscription: `Some((whether its topic announces, the
    /// subscriber's user))` when there was one.
    fn remove(&self, conn_id: Uuid, topic: &str) -> Option<Removed> {
        let mut st = self.lock();
        let st = &mut *st;
        let member = st.conns.get_mut(&conn_id)?;
        let before = member.topics.len();
        member.topics.retain(|t| &**t != topic);
        if member.topics.len() == before {
            return None;
        }
        let (user, info) = (member.user.clone(), member.info.clone());
        let announced = st.announced.contains(topic);
        if let Some(ids) = st.topics.get_mut(topic) {
            ids.remove(&conn_id);
            if ids.is_empty()
                && let Some((key, _)) = st.topics.remove_entry(topic)
            {
                st.topic_gone(&key);
                self.backplane.interest(Channel::Topic(key), false);
            }
        }
        self.metrics.topics.set(st.topics.len() as i64);
        Some(Removed {
            announced,
            user,
            info,
        })
    }

    /// Whether `conn_id` is subscribed to `topic`.
    pub fn is_subscribed(&self, conn_id: Uuid, topic: &str) -> bool {
        self.lock()
            .topics
            .get(topic)
            .is_some_and(|ids| ids.by_conn.contains_key(&conn_id))
    }

    /// Who is subscribed to `topic` here: at most `limit` of them.
    pub fn presence(&self, topic: &str, limit: usize) -> Vec<Present> {
        let st = self.lock();
        let Some(ids) = st.topics.get(topic) else {
            return Vec::new();
        };
        ids.by_conn
            .keys()
            .take(limit)
            .filter_map(|id| {
                let m = st.conns.get(id)?;
                Some(Present {
                    client: *id,
                    user: m.user.clone(),
                    info: m.info.clone(),
                })
            })
            .collect()
    }

    /// Topics with subscribers here whose name matches `pattern` (`*`:
    /// any characters; `None`: every topic), with how many: at most
    /// `limit` of them.
    pub fn topics_matching(&self, pattern: Option<&str>, limit: usize) -> Vec<(Arc<str>, usize)> {
        let st = self.lock();
        st.topics
            .iter()
            .filter(|(t, _)| pattern.is_none_or(|p| history::matches(p, t)))
            .take(limit)
            .map(|(t, ids)| (t.clone(), ids.len()))
            .collect()
    }

    /// Subscribes every connection of `user` here to `topic` (announced
    /// as [`Hub::subscribe_announced`] says); how many were subscribed
    /// anew.
    pub fn subscribe_user(&self, user: &str, topic: &str, announce: bool) -> usize {
        self.conns_of(user)
            .into_iter()
            .filter(|id| matches!(self.subscribe_announced(*id, topic, announce), Ok(true)))
            .count()
    }

    /// Unsubscribes every connection of `user` here from `topic`; how
    /// many were subscribed.
    pub fn unsubscribe_user(&self, user: &str, topic: &str) -> usize {
        self.conns_of(user)
            .into_iter()
            .filter(|id| self.unsubscribe(*id, topic))
            .count()
    }

    /// Ends every connection of `user` here, or the one connection
    /// `client`, with `code` and `reason` once what is queued for it is
    /// written; how many.
    pub fn end(&self, who: &Ending, code: u16, reason: &str) -> usize {
        let outboxes: Vec<Arc<Outbox>> = {
            let st = self.lock();
            match who {
                Ending::User(user) => st
                    .users
                    .get(user.as_str())
                    .into_iter()
                    .flatten()
                    .filter_map(|id| st.conns.get(id).map(|m| m.outbox.clone()))
                    .collect(),
                Ending::Client(id) => st
                    .conns
                    .get(id)
                    .map(|m| m.outbox.clone())
                    .into_iter()
                    .collect(),
            }
        };
        for o in &outboxes {
            o.end(code, reason);
        }
        outboxes.len()
    }

    fn conns_of(&self, user: &str) -> Vec<Uuid> {
        self.lock().users.get(user).cloned().unwrap_or_default()
    }

    /// Runs `cmd` on every other node (the `control` commands).
    pub fn everywhere(&self, cmd: crate::control::Command) -> BoxFuture<'static, Vec<Value>> {
        self.backplane.everywhere(cmd)
    }

    /// Topics with subscribers here now.
    pub fn topic_count(&self) -> usize {
        self.lock().topics.len()
    }

    /// Subscribers of a topic now.
    pub fn subscribers(&self, topic: &str) -> usize {
        self.lock().topics.get(topic).map_or(0, Members::len)
    }

    /// Users with at least one connection now.
    pub fn users_online(&self) -> usize {
        self.lock().users.len()
    }

    /// Whether `user` has a connection here now.
    pub fn is_online(&self, user: &str) -> bool {
        self.lock().users.contains_key(user)
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.lock().conns.len()
    }

    /// Every user and topic this node has connections for now: what the
    /// backplane subscribes to (again, after a reconnect).
    pub fn channels(&self) -> Vec<Channel> {
        self.channels_then(|| {})
    }

    /// As [`Hub::channels`], running `during` under the hub's lock.
    pub fn channels_then(&self, during: impl FnOnce()) -> Vec<Channel> {
        let st = self.lock();
        during();
        st.users
            .keys()
            .map(|u| Channel::User(u.clone()))
            .chain(st.topics.keys().map(|t| Channel::Topic(t.clone())))
            .collect()
    }

    /// Users with a connection here now.
    pub fn user_ids(&self) -> Vec<Arc<str>> {
        self.lock().users.keys().cloned().collect()
    }

    /// Connections `target` reaches now.
    pub fn reach(&self, target: &Target) -> usize {
        self.lock().reach(target)
    }

    /// Encodes a push once, for every recipient, with its topic's history
    /// policy (looked up here, once).
    ///
    /// # Errors
    /// [`HubError::TooLarge`] past `server.max_outbound_message_bytes`
    /// (with room for a position on a topic with history).
    fn encode(
        &self,
        target: &Target,
        event: &str,
        data: &Value,
    ) -> Result<(Prepared, Option<history::Policy>), HubError> {
        self.encode_from(target, event, data, None)
    }

    /// As [`Hub::encode`], naming the publisher's `user` when given.
    fn encode_from(
        &self,
        target: &Target,
        event: &str,
        data: &Value,
        user: Option<&str>,
    ) -> Result<(Prepared, Option<history::Policy>), HubError> {
        let text = match user {
            None => push_json(event, data),
            Some(user) => {
                serde_json::json!({"event": event, "data": data, "user": user}).to_string()
            }
        };
        let policy = match target {
            Target::Topic(t) => self.policies.get(t),
            _ => None,
        };
        // Every topic push names its topic: with history the position
        // brings it (at delivery); without, it goes in here.
        let text = match (target, &policy) {
            (Target::Topic(t), None) => history::with_topic(&text, t),
            _ => text,
        };
        let room = if policy.is_some() {
            history::POSITION_BYTES
        } else {
            0
        };
        if text.len() + room > self.max_message_bytes {
            return Err(HubError::TooLarge {
                size: text.len() + room,
                limit: self.max_message_bytes,
            });
        }
        Ok((text.into(), policy))
    }

    /// Delivers one push to `target`'s connections here and forwards it
    /// to the other nodes'; on a topic with history, gives it its
    /// position first. Returns the local connections it was queued for,
    /// and how many of them got it written whole into their sockets here.
    fn deliver(&self, target: &Target, text: &Prepared, history: Option<history::Policy>) -> Reach {
        let mut named = None;
        if let Target::Topic(topic) = target
            && let Some(policy) = history
        {
            if self.backplane.shares_history() {
                if self.backplane.append(topic, policy, text) {
                    // Positioned by Redis, delivered here as on every node
                    // (by the task that hands out what Redis sends).
                    return Reach {
                        reached: self.reach(target),
                        written: 0,
                    };
                }
                // Redis could not take it: pushed without a position,
                // still naming its topic.
                named = Some(Prepared::from(history::with_topic(text.as_str(), topic)));
            } else {
                let mut reach = Reach::default();
                self.memory.append(topic, policy, text, |positioned| {
                    // Under the history's lock (which keeps each topic's
                    // pushes in the order of their positions): queued
                    // for each connection's task, not written here.
                    reach = self.queue_here(target, std::slice::from_ref(positioned), false);
                });
                return reach;
            }
        }
        let text = named.as_ref().unwrap_or(text);
        self.deliver_run(target, std::slice::from_ref(text))
    }

    /// Delivers pushes without history to `target`'s connections here,
    /// in order, each connection's share queued at once, and forwards
    /// each to the other nodes'. Returns how many deliveries were queued
    /// or written, and how many of them were written here.
    fn deliver_run(&self, target: &Target, texts: &[Prepared]) -> Reach {
        let reach = self.queue_here(target, texts, true);
        for text in texts {
            self.backplane.forward(target, text);
        }
        reach
    }

    /// Queues `texts` for `target`'s connections on this node only (with
    /// `write_now`, written at once into idle ones: `Outbox::lend`);
    /// returns how many deliveries were queued or written, and how many
    /// of those were written whole here.
    fn queue_here(&self, target: &Target, texts: &[Prepared], write_now: bool) -> Reach {
        let to = self.lock().recipients(target);
        // Idle connections' shares are written here, socket after socket
        // (`Outbox::lend`), by whoever delivers: the delivery task, a
        // handler's `send_now`, the task handing out what other nodes sent.
        // A large fan-out holds a core for as long as it takes, so the
        // core's other tasks move to another thread meanwhile rather than
        // wait behind it, and idle helper threads write chunks of it.
        if write_now && to.len() >= SWEEP_ASIDE && on_multi_thread_runtime() {
            return tokio::task::block_in_place(|| self.queue_to(&to, target, texts, true, true));
        }
        self.queue_to(&to, target, texts, write_now, false)
    }

    /// [`Hub::queue_here`] for `to`; `aside` when the caller's core's
    /// other tasks have moved aside, so it may wait for helper threads.
    fn queue_to(
        &self,
        to: &Recipients,
        target: &Target,
        texts: &[Prepared],
        write_now: bool,
        aside: bool,
    ) -> Reach {
        if to.len() < JOIN_RECIPIENTS {
            return Outbox::push_each(to, texts, &self.metrics, write_now);
        }
        // Copied once into one buffer, written as one slice by each. Under
        // load, most connections have not written the last run when the
        // next comes: it is copied again with the new pushes after it, and
        // a connection that still holds it writes both as one slice of the
        // new buffer (the kernel's cost is per slice as well as per byte).
        // Each copy is made once for all; a run that carries none is made
        // for a run of pushes only. Taken and put back, not held: a
        // concurrent delivery finds no run to carry and makes its own.
        // (Only a run that can carry more is kept open.)
        let prev = self.open_run().take().filter(|(t, prev)| {
            t == target
                && prev.holders() > to.len() / 2
                && prev.bytes() + Run::bytes_of(texts) <= MAX_RUN_BYTES
        });
        // One push for each: helper threads may take chunks of it.
        let shared = aside && texts.len() == 1;
        let (run, from) = match prev {
            Some((_, prev)) => (Run::extend(&prev, texts), prev.len()),
            None if texts.len() > 1 => (Run::new(texts), 0),
            None if shared => return self.write_shared(to, texts, None),
            None => return Outbox::push_each(to, texts, &self.metrics, write_now),
        };
        let reach = if shared {
            self.write_shared(to, &[], Some((&run, from)))
        } else {
            Outbox::push_run(to, &run, from, &self.metrics, write_now)
        };
        // Kept for the next run, unless it can carry no more.
        if run.depth() < MAX_RUN_DEPTH && run.bytes() < MAX_RUN_BYTES {
            *self.open_run() = Some((target.clone(), run));
        }
        reach
    }

    /// Writes `texts`, or `run` from a message on, into `to`'s idle
    /// sockets (queued for the others), with idle helper threads taking
    /// chunks of the recipients beside this one. Each connection is in
    /// one chunk, and this returns once every chunk is written, so a
    /// connection's pushes keep their order.
    fn write_shared(
        &self,
        to: &Recipients,
        texts: &[Prepared],
        run: Option<(&Run, usize)>,
    ) -> Reach {
        let crew = self
            .helpers
            .claim(to.len().div_ceil(CHUNK).saturating_sub(1));
        self.metrics.fanout_busy.inc_by(crew.busy as u64);
        if crew.is_empty() {
            return write_share(to, texts, run, &self.metrics);
        }
        let (list, metrics) = (to.shared(), self.metrics.clone());
        let (texts, run): (Arc<[Prepared]>, _) = (texts.into(), run.map(|(r, f)| (r.clone(), f)));
        let (reach, helped) = crew.run(
            list.len(),
            CHUNK,
            Arc::new(move |chunk| {
                let to = list.get(chunk).unwrap_or_default();
                let run = run.as_ref().map(|(run, from)| (run, *from));
                write_share(to, &texts, run, &metrics)
            }),
        );
        self.metrics.fanout_helped.inc_by(helped as u64);
        reach
    }

    fn open_run(&self) -> std::sync::MutexGuard<'_, Option<(Target, Run)>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pushes `{"event":…,"data":…}` to `target` at once. Returns the
    /// connections it was queued for.
    ///
    /// # Errors
    /// [`HubError::TooLarge`] when the push could not be sent to anyone.
    pub fn send_now(&self, target: &Target, event: &str, data: &Value) -> Result<usize, HubError> {
        let (text, history) = self.encode(target, event, data)?;
        Ok(self.deliver(target, &text, history).reached)
    }

    /// `topic`'s position and, given `since`, what was published after
    /// it. Call after subscribing the connection: whatever is published
    /// from then on is pushed to it, so nothing falls between. `None`
    /// when the topic keeps no history.
    pub async fn recover(
        &self,
        topic: &str,
        since: Option<Since>,
    ) -> Option<Result<Recovery, HubError>> {
        let policy = self.policies.get(topic)?;
        if !self.backplane.shares_history() {
            return Some(Ok(self.memory.recover(topic, policy, since.as_ref())));
        }
        self.backplane.settled().await;
        Some(self.backplane.recover(topic, policy, since).await)
    }

    /// Pushes another node encoded, in order, for this node's recipients
    /// of `target`: each connection's share of them queued at once
    /// (written at once into an idle one: `Outbox::lend`), never
    /// forwarded again. Delivered here, not through the batching queue:
    /// they were gathered on their way (the sender pipelines, the
    /// backplane's receiving task hands out what came together), and a
    /// full queue of this node's own publications does not hold them up.
    /// Returns how many deliveries were queued or written.
    pub fn deliver_remote(&self, target: &Target, texts: &[Prepared]) -> usize {
        self.queue_here(target, texts, true).reached
    }

    /// As [`Hub::publish`], for a publication from a client: the push
    /// names the publisher's `user` (`{"event":…,"data":…,"user":…}`).
    ///
    /// # Errors
    /// As [`Hub::publish`].
    pub fn publish_from(
        &self,
        target: Target,
        event: &str,
        data: &Value,
        user: Option<&str>,
    ) -> Result<usize, HubError> {
        let (text, history) = self.encode_from(&target, event, data, user)?;
        self.enqueue(target, text, history)
    }

    /// Queues a push for batched delivery. Returns how many connections
    /// `target` reaches now.
    ///
    /// # Errors
    /// [`HubError::TooLarge`], [`HubError::QueueFull`] (counted in
    /// `gale_broadcast_dropped_total`) or [`HubError::Closed`].
    pub fn publish(&self, target: Target, event: &str, data: &Value) -> Result<usize, HubError> {
        let (text, history) = self.encode(&target, event, data)?;
        self.enqueue(target, text, history)
    }

    fn enqueue(
        &self,
        target: Target,
        text: Prepared,
        history: Option<history::Policy>,
    ) -> Result<usize, HubError> {
        let reach = self.reach(&target);
        match self.queue.try_send(Queued {
            target,
            text,
            history,
        }) {
            Ok(()) => Ok(reach),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.broadcast_dropped.inc();
                Err(HubError::QueueFull)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(HubError::Closed),
        }
    }
}

/// The delivery task: batches queued broadcasts and hands them to the
/// recipients' outboxes.
///
/// A broadcast that finds the server quiet goes at once: waiting for
/// company that is not coming would only add the window to every push.
/// Under load it gathers for the window, so a burst costs each
/// connection one write. Load is: more broadcasts already queued, the
/// last batch out less than a window ago, or a quarter of the last
/// batch's fan-out still waiting in the outboxes (its connections are
/// busy writing, and a publisher sharing the CPU with them is slowed, so
/// the queue alone would look quiet). A batch this task wrote whole into
/// idle sockets itself (every delivery, counted by the outboxes it wrote
/// into, not by the node's counter, which other writers move too) is no
/// load: publications sent meanwhile wait in the queue and go together
/// next, and waiting for more would only delay them.
async fn deliver(
    hub: std::sync::Weak<Hub>,
    mut rx: mpsc::Receiver<Queued>,
    batch_size: usize,
    window: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut batch = Vec::with_capacity(batch_size);
    // A run of consecutive pushes to one target (at most a batch).
    let mut run = Vec::new();
    // When the last batch was handed out, how many connections it
    // reached, and the outboxes' messages just before it.
    let mut last: Option<tokio::time::Instant> = None;
    let (mut reach, mut before) = (Reach::default(), 0_i64);
    loop {
        let first = tokio::select! {
            m = rx.recv() => m,
            () = stop.cancelled() => {
                rx.close();
                rx.recv().await
            }
        };
        let Some(first) = first else { return };
        batch.push(first);
        let Some(hub) = hub.upgrade() else { return };
        let queued_out = hub.metrics.outbound_queued.get();
        // Every delivery of the last batch written whole by this task.
        let written_here = reach.reached > 0 && reach.written == reach.reached;
        let busy = !written_here
            && (!rx.is_empty()
                || last.is_some_and(|at| at.elapsed() < window)
                || (queued_out - before) * 4 > reach.reached as i64);
        if busy && !stop.is_cancelled() && batch_size > 1 {
            let until = tokio::time::Instant::now() + window;
            while batch.len() < batch_size {
                tokio::select! {
                    m = rx.recv() => match m {
                        Some(m) => batch.push(m),
                        None => break,
                    },
                    () = tokio::time::sleep_until(until) => break,
                }
            }
        } else {
            while batch.len() < batch_size {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
        }
        hub.metrics.broadcast_batch.observe(batch.len() as f64);
        before = hub.metrics.outbound_queued.get();
        // Consecutive pushes to one target go to each connection together:
        // one lock and at most one wake-up per connection for the run.
        reach = Reach::default();
        let mut pushes = batch.drain(..).peekable();
        while let Some(q) = pushes.next() {
            if q.history.is_some() {
                reach += hub.deliver(&q.target, &q.text, q.history);
                continue;
            }
            run.push(q.text);
            while let Some(next) = pushes.next_if(|n| n.history.is_none() && n.target == q.target) {
                run.push(next.text);
            }
            reach += hub.deliver_run(&q.target, &run);
            run.clear();
        }
        last = Some(tokio::time::Instant::now());
    }
}
