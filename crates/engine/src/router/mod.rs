//! The event router: handlers as data. Each event name maps to a handler
//! and a [`Policy`] (auth, role, rate limit, timeout, priority), whose
//! built-in values the config file can override per event
//! (`[events."weather.get"]`). Checks run in the seed's order (unknown →
//! auth → role → rate limit → validate → run with timeout); each outcome is
//! a distinct reply code and a metric labelled by event.
//!
//! Dispatch runs on the connection's task and never waits: a validated
//! event is queued on the [`pool`] and its reply goes to the connection's
//! [`Outbox`].

pub mod pool;
pub mod rate;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;
use serde::de::DeserializeOwned;
use serde_json::Value;
use uuid::Uuid;

use crate::config::{Config, ConfigError, Priority, Rate};
use crate::metrics::{Metrics, Outcome};
use crate::outbox::Outbox;
use crate::protocol::{ErrorBody, ErrorCode, Event, reply_json, reply_json_ref};
use crate::server::App;

pub use pool::{Pool, Refused};
pub use rate::{Bucket, Limits, Subject};

/// What a handler returns: the reply's `data`, or an error.
pub type HandlerResult = Result<Value, ErrorBody>;

/// What a handler registered with [`Registry::register_answer`] returns:
/// its reply's `data` as a value to encode, or already encoded (JSON
/// text spliced into the reply as it is: a recovery's publications, each
/// the exact text once pushed, are not parsed and encoded again).
#[derive(Debug, Clone)]
pub enum Answer {
    /// Encoded with the reply.
    Value(Value),
    /// Valid JSON text, spliced in.
    Encoded(String),
}

/// A handler's outcome, as the worker replies with it.
pub type AnswerResult = Result<Answer, ErrorBody>;

/// Who sent an event. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The connection.
    pub conn_id: Uuid,
    /// The client's address, as anonymous rate limits key it
    /// ([`crate::identity::rate_key`]).
    pub address: std::net::IpAddr,
    /// The signed-in user, if any.
    pub user: Option<Arc<str>>,
    /// The user's roles.
    pub roles: Arc<[String]>,
    /// Public data about the user (JSON), for presence and join/leave.
    pub info: Option<Arc<str>>,
    /// Where replies and pushes for this connection go.
    pub outbox: Arc<Outbox>,
}

impl Caller {
    /// The caller as the application's hooks see it.
    pub fn who(&self) -> crate::hooks::Who {
        crate::hooks::Who {
            client: self.conn_id,
            user: self.user.clone(),
            roles: self.roles.clone(),
            address: self.address,
        }
    }
}

/// What a handler gets: the app and the caller.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Shared server state.
    pub app: Arc<App>,
    /// Who asked.
    pub caller: Caller,
}

/// An event's policy: who may call it, how often, for how long, in which
/// lane. `[events."NAME"]` in the configuration overrides any of it.
///
/// ```
/// use std::time::Duration;
/// use gale_engine::config::{Priority, Rate};
/// use gale_engine::router::Policy;
///
/// // Admins only, once a minute each, 30 s to finish, behind the rest.
/// let import = Policy {
///     requires_auth: true,
///     requires_role: Some("admin".into()),
///     rate_limit: Some(Rate { count: 1, per: Duration::from_secs(60) }),
///     timeout: Duration::from_secs(30),
///     priority: Priority::Low,
/// };
/// assert!(Policy::default().rate_limit.is_none());
/// # let _ = import;
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Refuse anonymous callers (`unauthorized`).
    pub requires_auth: bool,
    /// Refuse users without this role (`forbidden`).
    pub requires_role: Option<String>,
    /// Per user (or per connection when anonymous).
    pub rate_limit: Option<Rate>,
    /// Handler deadline (`timeout`).
    pub timeout: Duration,
    /// Queue lane.
    pub priority: Priority,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            requires_auth: false,
            requires_role: None,
            rate_limit: None,
            timeout: Duration::from_secs(10),
            priority: Priority::Normal,
        }
    }
}

/// A payload type: deserialised from `data`, then checked. Derive
/// `serde::Deserialize` (with `#[serde(deny_unknown_fields)]` to refuse
/// unknown fields) and implement this trait, with [`Payload::validate`]
/// for checks beyond the types (see [`Registry::register`]). Take
/// `serde_json::Value` for any data, `Option<T>` for data that may be
/// absent.
pub trait Payload: DeserializeOwned + Send + 'static {
    /// Checks beyond the types.
    ///
    /// # Errors
    /// An `invalid_data` [`ErrorBody`] naming the field.
    fn validate(&self) -> Result<(), ErrorBody> {
        Ok(())
    }
}

impl Payload for Value {}

/// An optional payload: `data` absent (or `null`) is `None`; present, it
/// is checked as `T` is.
impl<T: Payload> Payload for Option<T> {
    fn validate(&self) -> Result<(), ErrorBody> {
        self.as_ref().map_or(Ok(()), Payload::validate)
    }
}

/// An `invalid_data` error for `field`: the client's reply names the
/// field, `{"code": "invalid_data", "message": …, "field": "room"}`.
///
/// ```
/// use gale_engine::protocol::ErrorCode;
/// use gale_engine::router::invalid_field;
///
/// let e = invalid_field("room", "a room name is 1 to 64 bytes");
/// assert_eq!((e.code, e.field.as_deref()), (ErrorCode::InvalidData, Some("room")));
/// ```
pub fn invalid_field(field: &str, message: impl Into<String>) -> ErrorBody {
    ErrorBody {
        field: Some(field.to_owned()),
        ..ErrorBody::new(ErrorCode::InvalidData, message)
    }
}

type Job = Box<dyn FnOnce(Ctx) -> BoxFuture<'static, AnswerResult> + Send>;
/// Reads an event's payload (given the event's name) into its job.
type Prepare = Arc<dyn Fn(&str, Value) -> Result<Job, ErrorBody> + Send + Sync>;

/// One registered event (or, for a pattern, every event it matches that
/// has no route of its own).
struct Route {
    name: Arc<str>,
    index: usize,
    policy: Policy,
    prepare: Prepare,
    outcomes: [Counter; Outcome::COUNT],
}

impl Route {
    fn count(&self, outcome: Outcome) {
        self.outcomes[outcome as usize].inc();
    }
}

/// Builds the table of events.
pub struct Registry {
    routes: Vec<(&'static str, Policy, Prepare)>,
    /// Handlers of every event a pattern (`orders.*`) matches.
    patterns: Vec<(String, Policy, Prepare)>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.routes.iter().map(|r| r.0).collect();
        f.debug_struct("Registry").field("events", &names).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry {
            routes: Vec::new(),
            patterns: Vec::new(),
        }
    }

    /// Registers a handler for every event whose name matches `pattern`
    /// (`*`: any characters) and has no handler of its own; the handler
    /// gets the event's name and its `data` as it came. An
    /// `[events."NAME"]` override of a name the pattern matches gives
    /// that name a policy (and a rate limit, metrics) of its own.
    pub fn register_pattern<F, Fut>(&mut self, pattern: &str, policy: Policy, handler: F)
    where
        F: Fn(Ctx, String, Value) -> Fut + Send + Sync + Clone + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let prepare: Prepare = Arc::new(move |name: &str, data: Value| {
            let handler = handler.clone();
            let name = name.to_owned();
            let job: Job = Box::new(move |ctx| {
                Box::pin(async move { handler(ctx, name, data).await.map(Answer::Value) })
            });
            Ok(job)
        });
        self.patterns.push((pattern.to_owned(), policy, prepare));
    }

    /// The events gale ships.
    pub fn builtin() -> Registry {
        let mut r = Registry::new();
        crate::builtin::register(&mut r);
        r
    }

    /// The registered events with their built-in policies, in order.
    pub fn policies(&self) -> impl Iterator<Item = (&'static str, &Policy)> {
        self.routes.iter().map(|(name, policy, _)| (*name, policy))
    }

    /// Registers `name`: its payload type `T`, its policy, its handler.
    /// Adding an event is this one call. The reply to `{"event": name,
    /// "data": …, "ref": …}` is `{"reply": ref, "ok": true, "data": …}`
    /// with what the handler returns, or `"ok": false` with its error;
    /// `data` that does not fit `T` is refused (`invalid_data`, naming
    /// the field) before the handler runs.
    ///
    /// ```
    /// use std::time::Duration;
    /// use gale_engine::config::Rate;
    /// use gale_engine::router::{Ctx, HandlerResult, Payload, Policy, Registry, invalid_field};
    ///
    /// #[derive(serde::Deserialize)]
    /// struct Vote {
    ///     poll: u64,
    ///     choice: String,
    /// }
    ///
    /// impl Payload for Vote {
    ///     fn validate(&self) -> Result<(), gale_engine::protocol::ErrorBody> {
    ///         if self.choice.is_empty() {
    ///             return Err(invalid_field("choice", "choose something"));
    ///         }
    ///         Ok(())
    ///     }
    /// }
    ///
    /// async fn vote(ctx: Ctx, v: Vote) -> HandlerResult {
    ///     Ok(serde_json::json!({ "poll": v.poll, "by": ctx.caller.user.as_deref() }))
    /// }
    ///
    /// let mut registry = Registry::new();
    /// let policy = Policy {
    ///     requires_auth: true,
    ///     rate_limit: Some(Rate { count: 1, per: Duration::from_secs(10) }),
    ///     ..Policy::default()
    /// };
    /// registry.register("poll.vote", policy, vote);
    /// assert_eq!(registry.policies().next().map(|(name, _)| name), Some("poll.vote"));
    /// ```
    pub fn register<T, F, Fut>(&mut self, name: &'static str, policy: Policy, handler: F)
    where
        T: Payload,
        F: Fn(Ctx, T) -> Fut + Send + Sync + Clone + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.register_answer(name, policy, move |ctx, payload: T| {
            let answered = handler(ctx, payload);
            async move { answered.await.map(Answer::Value) }
        });
    }

    /// As [`Registry::register`], for a handler that may answer with
    /// data already encoded ([`Answer::Encoded`]).
    pub fn register_answer<T, F, Fut>(&mut self, name: &'static str, policy: Policy, handler: F)
    where
        T: Payload,
        F: Fn(Ctx, T) -> Fut + Send + Sync + Clone + 'static,
        Fut: Future<Output = AnswerResult> + Send + 'static,
    {
        let prepare: Prepare = Arc::new(move |_: &str, data: Value| {
            let payload: T = serde_path_to_error::deserialize(data).map_err(|e| {
                let path = e.path().to_string();
                let field = if path == "." { "data".to_owned() } else { path };
                invalid_field(&field, format!("{field}: {}", e.into_inner()))
            })?;
            payload.validate()?;
            let handler = handler.clone();
            let job: Job = Box::new(move |ctx| Box::pin(handler(ctx, payload)));
            Ok(job)
        });
        self.routes.push((name, policy, prepare));
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

/// A queued event.
struct Task {
    route: Arc<Route>,
    job: Job,
    ctx: Ctx,
    reply_to: Option<Value>,
    /// Cluster mode: the user's rate limit, checked in Redis when the
    /// task runs (it needs a round trip; dispatch never waits).
    shared_rate: Option<(Rate, Arc<str>)>,
    _slot: Slot,
}

/// An event counted against its connection from dispatch until it is
/// done (replied, or dropped unrun at shutdown): the connection's bound
/// and its share of the queue both read this count.
struct Slot {
    outbox: Arc<Outbox>,
    busy: Arc<AtomicUsize>,
}

impl Slot {
    fn take(outbox: &Arc<Outbox>, busy: &Arc<AtomicUsize>) -> Slot {
        if outbox.event_started() {
            busy.fetch_add(1, Ordering::AcqRel);
        }
        Slot {
            outbox: outbox.clone(),
            busy: busy.clone(),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.outbox.event_done() {
            self.busy.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Applies an `[events."NAME"]` override to `policy`.
fn override_policy(
    policy: &mut Policy,
    name: &str,
    o: &crate::config::EventOverride,
) -> Result<(), ConfigError> {
    let key = |k: &str| format!("events.\"{name}\".{k}");
    if let Some(rate) = &o.rate_limit {
        policy.rate_limit = match rate.as_str() {
            "off" => None,
            r => Some(Rate::parse(r).map_err(|m| ConfigError::Invalid {
                key: key("rate_limit"),
                message: m,
            })?),
        };
    }
    if let Some(ms) = o.timeout_ms {
        policy.timeout = Duration::from_millis(ms);
    }
    if let Some(p) = o.priority {
        policy.priority = p;
    }
    if let Some(a) = o.requires_auth {
        policy.requires_auth = a;
    }
    if let Some(role) = &o.requires_role {
        policy.requires_role = Some(role.clone()).filter(|r| !r.is_empty());
    }
    Ok(())
}

/// Client addresses whose part of the node's event budget is tracked at
/// most; the least recently seen are forgotten first (and start again
/// with their whole part).
const MAX_SHARES: u64 = 100_000;

/// The router: routes, limits and the worker pool.
pub struct Router {
    routes: HashMap<Arc<str>, Arc<Route>>,
    /// Routes of the events a pattern matches, most recently registered
    /// last.
    patterns: Vec<(String, Arc<Route>)>,
    unknown: [Counter; Outcome::COUNT],
    invalid: Counter,
    limits: Limits,
    global: Option<Bucket>,
    /// Each client address's part of `global`, by address.
    shares: moka::sync::Cache<std::net::IpAddr, Arc<Bucket>>,
    /// `global_rate_limit × global_rate_share` a second: the least part
    /// of the node's budget an address may take.
    share_rate: Rate,
    global_share: f64,
    address_factor: u32,
    /// Connections with at least one event in the pool now.
    busy: Arc<AtomicUsize>,
    pool: Pool<Task>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.routes.keys().collect();
        names.sort();
        f.debug_struct("Router")
            .field("events", &names)
            .finish_non_exhaustive()
    }
}

impl Router {
    /// Applies the config's per-event overrides to `registry` and starts
    /// the worker pool.
    ///
    /// # Errors
    /// [`ConfigError`] for an override naming no registered event or with
    /// a bad value.
    pub fn new(
        registry: Registry,
        config: &Config,
        metrics: Arc<Metrics>,
    ) -> Result<Router, ConfigError> {
        let mut routes: HashMap<Arc<str>, Arc<Route>> = HashMap::new();
        let mut index = 0;
        let mut route = |name: &str, mut policy: Policy, prepare: Prepare| {
            if let Some(o) = config.events.get(name) {
                override_policy(&mut policy, name, o)?;
            }
            let route = Arc::new(Route {
                name: Arc::from(name),
                index,
                policy,
                prepare,
                outcomes: metrics.event_counters(name),
            });
            index += 1;
            Ok::<_, ConfigError>(route)
        };
        for (name, policy, prepare) in registry.routes {
            routes.insert(Arc::from(name), route(name, policy, prepare)?);
        }
        let mut patterns = Vec::new();
        for (pattern, policy, prepare) in registry.patterns {
            // A name the pattern matches with an override of its own gets
            // a route of its own.
            let own: Vec<&String> = config
                .events
                .keys()
                .filter(|n| {
                    !routes.contains_key(n.as_str()) && crate::history::matches(&pattern, n)
                })
                .collect();
            for name in own {
                routes.insert(
                    Arc::from(name.as_str()),
                    route(name, policy.clone(), prepare.clone())?,
                );
            }
            patterns.push((pattern.clone(), route(&pattern, policy, prepare)?));
        }
        if let Some(name) = config
            .events
            .keys()
            .find(|n| !routes.contains_key(n.as_str()))
        {
            let mut known: Vec<_> = routes.keys().map(|k| k.to_string()).collect();
            known.sort_unstable();
            return Err(ConfigError::Invalid {
                key: format!("events.\"{name}\""),
                message: format!("no such event (known: {})", known.join(", ")),
            });
        }
        let global = (config.router.global_rate_limit > 0).then(|| {
            Bucket::new(Rate {
                count: config.router.global_rate_limit,
                per: Duration::from_secs(1),
            })
        });
        let pool = Pool::start(&config.router, metrics.clone(), |task: Task| run(task));
        Ok(Router {
            routes,
            patterns,
            unknown: metrics.event_counters("unknown"),
            invalid: metrics.event_counters("invalid")[Outcome::InvalidMessage as usize].clone(),
            limits: Limits::default(),
            global,
            shares: moka::sync::Cache::builder()
                .max_capacity(MAX_SHARES)
                .time_to_idle(Duration::from_secs(10))
                .build(),
            share_rate: Rate {
                count: ((f64::from(config.router.global_rate_limit)
                    * config.router.global_rate_share)
                    .ceil() as u32)
                    .max(1),
                per: Duration::from_secs(1),
            },
            global_share: config.router.global_rate_share,
            address_factor: config.router.address_limit_factor.max(1),
            busy: Arc::new(AtomicUsize::new(0)),
            pool,
        })
    }

    /// How many events one connection may have queued or running now: its
    /// share of the queue below the drop threshold, split between the
    /// connections with events in it and one more (room for a newcomer),
    /// at least 1, at most `max`. With few busy connections this is `max`;
    /// under a crowd each gets an equal part and nobody fills the queue.
    pub fn share(&self, max: usize) -> usize {
        let busy = self.busy.load(Ordering::Acquire);
        (self.pool.drop_at() / (busy + 1)).clamp(1, max.max(1))
    }

    /// Counts a message that looked like an event but was not one.
    pub fn count_invalid_message(&self) {
        self.invalid.inc();
    }

    /// The policy in force for `event`, if it is registered.
    pub fn policy(&self, event: &str) -> Option<&Policy> {
        self.routes.get(event).map(|r| &r.policy)
    }

    /// Checks and queues one event. Never waits; every refusal is replied
    /// to (when the event has a `ref`) and counted.
    pub fn dispatch(&self, app: &Arc<App>, caller: &Caller, event: Event) {
        let Event {
            name,
            data,
            reply_to,
        } = event;
        let refuse = |outcomes: &[Counter; Outcome::COUNT], body: ErrorBody| {
            outcomes[Outcome::from(body.code) as usize].inc();
            if let Some(r) = &reply_to {
                caller.outbox.push(reply_json(r, &Err(body)).into(), true);
            }
        };
        let route = self.routes.get(name.as_str()).or_else(|| {
            self.patterns
                .iter()
                .find(|(p, _)| crate::history::matches(p, &name))
                .map(|(_, r)| r)
        });
        let Some(route) = route else {
            let shown: String = name.chars().take(64).collect();
            return refuse(
                &self.unknown,
                ErrorBody::new(ErrorCode::UnknownEvent, format!("no event named {shown:?}")),
            );
        };
        let shared = app.cluster.is_some();
        let shared_rate = match self.check(app, route, caller, shared) {
            Ok(deferred) => deferred,
            Err(body) => return refuse(&route.outcomes, body),
        };
        let job = match (route.prepare)(&name, data) {
            Ok(job) => job,
            Err(body) => return refuse(&route.outcomes, body),
        };
        let task = Task {
            route: route.clone(),
            job,
            ctx: Ctx {
                app: app.clone(),
                caller: caller.clone(),
            },
            reply_to: reply_to.clone(),
            shared_rate,
            _slot: Slot::take(&caller.outbox, &self.busy),
        };
        if let Err((why, _)) = self.pool.submit(route.policy.priority, task) {
            let message = match why {
                Refused::Overloaded => "the server is overloaded: try again shortly",
                Refused::Closed => "the server is shutting down",
            };
            refuse(
                &route.outcomes,
                ErrorBody::new(ErrorCode::SystemOverloaded, message),
            );
        }
    }

    /// Auth, role and rate checks, in that order: the caller's own limits
    /// before the node's, so a caller over its own limits spends nothing
    /// of everyone's budget. With `shared` (cluster mode) a signed-in
    /// user's rate limit is left to the task: it is returned, to be
    /// checked in Redis.
    fn check(
        &self,
        app: &App,
        route: &Route,
        caller: &Caller,
        shared: bool,
    ) -> Result<Option<(Rate, Arc<str>)>, ErrorBody> {
        let p = &route.policy;
        if (p.requires_auth || p.requires_role.is_some()) && caller.user.is_none() {
            return Err(ErrorBody::new(
                ErrorCode::Unauthorized,
                format!(
                    "{} needs a signed-in user: sign in first (a token, or the connect proxy)",
                    route.name
                ),
            ));
        }
        if let Some(role) = &p.requires_role
            && !caller.roles.iter().any(|r| r == role)
        {
            return Err(ErrorBody::new(
                ErrorCode::Forbidden,
                format!("{} needs the role {role:?}", route.name),
            ));
        }
        let mut deferred = None;
        if let Some(rate) = p.rate_limit {
            // Anonymous callers count per connection and per address, so a
            // reconnect does not start a fresh allowance. The address's
            // allowance is a connection's for each client (WebSocket or
            // SSE session) it holds open: users behind one NAT each have
            // their own.
            let taken = match &caller.user {
                Some(user) if shared => {
                    deferred = Some((rate, user.clone()));
                    Ok(())
                }
                Some(user) => self.take_local(route, user, rate),
                None => {
                    let (open, _) = app.admission.sessions(caller.address);
                    self.limits
                        .take_shared(
                            route.index,
                            Subject::Address(caller.address),
                            rate.times(self.address_factor),
                            open as f64,
                        )
                        .and_then(|()| {
                            self.limits
                                .take(route.index, Subject::Connection(caller.conn_id), rate)
                        })
                }
            };
            taken.map_err(|wait| rate_limited(route, rate, wait))?;
        }
        self.take_global(app, caller)?;
        Ok(deferred)
    }

    /// One event from the node's budget (`router.global_rate_limit`), and
    /// first from the caller's address's part of it: at least
    /// `global_rate_share`, or the address's part of the node's
    /// connections when larger, and never more than all but that share,
    /// so one client cannot spend what everyone else needs.
    fn take_global(&self, app: &App, caller: &Caller) -> Result<(), ErrorBody> {
        let Some(global) = &self.global else {
            return Ok(());
        };
        let over = || {
            ErrorBody::new(
                ErrorCode::RateLimited,
                "the server is receiving too many events: slow down",
            )
        };
        let (mine, all) = app.admission.sessions(caller.address);
        let part = (mine as f64 / all.max(1) as f64)
            .max(self.global_share)
            .min((1.0 - self.global_share).max(self.global_share));
        let rate = self.share_rate;
        self.shares
            .get_with(caller.address, || Arc::new(Bucket::new(rate)))
            .take_shared(part / self.global_share)
            .map_err(|_| over())?;
        global.take().map_err(|_| over())
    }

    /// Takes one event from a user's budget on this node.
    fn take_local(&self, route: &Route, user: &Arc<str>, rate: Rate) -> Result<(), Duration> {
        self.limits
            .take(route.index, Subject::User(user.clone()), rate)
    }

    /// Forgets what a closed connection held: its per-connection rate
    /// limit buckets.
    pub fn connection_closed(&self, conn_id: Uuid) {
        let events = self.routes.values().map(|r| r.index + 1).max().unwrap_or(0);
        self.limits.forget_connection(conn_id, events);
    }

    /// Client addresses whose part of the node's event budget is tracked
    /// now (each forgotten 10 s after its last event).
    pub fn share_buckets(&self) -> u64 {
        self.shares.run_pending_tasks();
        self.shares.entry_count()
    }

    /// Rate-limit buckets held now (approximate until pending evictions
    /// run; this runs them).
    pub fn rate_buckets(&self) -> u64 {
        self.limits.sync_len()
    }

    /// Events waiting for a worker.
    pub fn queue_depth(&self) -> usize {
        self.pool.depth()
    }

    /// Refuses new events and waits (at most `deadline`) for the queued
    /// and running handlers. Returns whether they all finished.
    pub async fn drain(&self, deadline: Duration) -> bool {
        self.pool.drain(deadline).await
    }
}

/// The refusal of an event over its rate limit.
fn rate_limited(route: &Route, rate: Rate, wait: Duration) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::RateLimited,
        format!(
            "{}: at most {} per {} s; retry in {} ms",
            route.name,
            rate.count,
            rate.per.as_secs(),
            wait.as_millis().max(1)
        ),
    )
}

/// A user's cluster-wide budget, in Redis; this node's own limiter when
/// Redis does not answer in time (counted).
async fn take_shared(
    ctx: &Ctx,
    route: &Route,
    rate: Rate,
    user: &Arc<str>,
) -> Result<(), ErrorBody> {
    let app = &ctx.app;
    let taken = match &app.cluster {
        Some(cluster) => match cluster.take_rate(&route.name, user, rate).await {
            Ok(taken) => taken,
            Err(e) => {
                cluster.fell_back(crate::metrics::Fallback::RateLimit, &e);
                app.router.take_local(route, user, rate)
            }
        },
        None => app.router.take_local(route, user, rate),
    };
    taken.map_err(|wait| rate_limited(route, rate, wait))
}

/// The reply to `reply_to` with a handler's outcome.
fn answer_json(reply_to: &Value, result: &AnswerResult) -> String {
    match result {
        Ok(Answer::Value(v)) => reply_json_ref(reply_to, Ok(v)),
        Ok(Answer::Encoded(data)) => {
            let r = serde_json::to_string(reply_to).unwrap_or_else(|_| "null".to_owned());
            format!("{{\"reply\":{r},\"ok\":true,\"data\":{data}}}")
        }
        Err(e) => reply_json_ref(reply_to, Err(e)),
    }
}

/// Runs one handler under its deadline, catching a panic, and replies.
async fn run(task: Task) {
    let Task {
        route,
        job,
        ctx,
        reply_to,
        shared_rate,
        _slot,
    } = task;
    if let Some((rate, user)) = &shared_rate
        && let Err(body) = take_shared(&ctx, &route, *rate, user).await
    {
        route.count(Outcome::from(body.code));
        if let Some(r) = &reply_to {
            ctx.caller
                .outbox
                .push(reply_json(r, &Err(body)).into(), true);
        }
        return;
    }
    let outbox = ctx.caller.outbox.clone();
    let metrics = ctx.app.metrics.clone();
    let limit = ctx.app.config.server.max_outbound_message_bytes;
    let started = Instant::now();
    let work = std::panic::AssertUnwindSafe(job(ctx)).catch_unwind();
    let mut result = match tokio::time::timeout(route.policy.timeout, work).await {
        Ok(Ok(result)) => result,
        Ok(Err(_panic)) => {
            tracing::error!(event = &*route.name, "handler panicked");
            Err(ErrorBody::new(ErrorCode::InternalError, "internal error"))
        }
        Err(_) => Err(ErrorBody::new(
            ErrorCode::Timeout,
            format!(
                "{} did not finish within {} ms (timeout)",
                route.name,
                route.policy.timeout.as_millis()
            ),
        )),
    };
    metrics
        .handler_latency
        .observe(started.elapsed().as_secs_f64());
    let mut reply = reply_to.as_ref().map(|r| answer_json(r, &result));
    if let (Some(r), Some(text)) = (&reply_to, &reply)
        && text.len() > limit
    {
        // A handler's bug: every shipped event keeps its replies within
        // the limit. The client gets an error, not a dropped connection.
        tracing::error!(
            event = &*route.name,
            bytes = text.len(),
            limit,
            "reply over server.max_outbound_message_bytes: replaced by an error"
        );
        result = Err(ErrorBody::new(
            ErrorCode::InternalError,
            "the reply would be larger than the server may send",
        ));
        reply = Some(answer_json(r, &result));
    }
    route.count(match &result {
        Ok(_) => Outcome::Ok,
        Err(e) => Outcome::from(e.code),
    });
    if let Some(text) = reply {
        outbox.push(text.into(), true);
    }
}
