//! The HTTP server: routes, the connection limit, and the shutdown
//! sequence.
//!
//! [`run`] takes a bound listener and a cancellation token, so the binary
//! and the tests start the server the same way (tests bind port 0).
//! Shutdown: stop accepting; every WebSocket connection stops reading,
//! finishes its in-flight lookups and closes with 1001; the server waits
//! for them (they are tracked: axum does not track upgraded connections)
//! up to the grace period; then the request log is drained.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::connect_info::ConnectInfo;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::future::{BoxFuture, Either};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{Admission, Refused};
use crate::broadcast::{Backplane, Hub, LocalOnly};
use crate::cluster::{Cluster, RedisBackplane};
use crate::config::{Compression, Config};
use crate::identity::{self, Verifier};
use crate::listener::Counted;
use crate::metrics::Metrics;
use crate::router::{Registry, Router};
use crate::websocket::{Limits, Upgrade, UpgradeError, Utf8Bytes};

/// An application's error, whatever its type.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen address could not be bound (in use, not local, …).
    #[error("cannot listen on server.listen = {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// A setting was refused while building the server (e.g. an
    /// `[events."…"]` override naming no event).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Cluster mode could not start.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// The application's backend's HTTP client could not be built.
    #[error("cannot create the HTTP client of [proxy]: {0}")]
    Backend(reqwest::Error),
    /// The listener failed while serving.
    #[error("server I/O error: {0}")]
    Io(#[from] io::Error),
    /// A task of the server panicked: a bug.
    #[error("the server's {task} panicked: {message}")]
    Panicked {
        /// Which task.
        task: &'static str,
        /// The panic's message.
        message: String,
    },
    /// An application could not start, or its shutdown step failed
    /// (e.g. the request log lost rows): its own error, as it says it.
    #[error(transparent)]
    Application(BoxError),
}

impl ServerError {
    /// An application's error as a server error.
    pub fn application(e: impl std::error::Error + Send + Sync + 'static) -> ServerError {
        ServerError::Application(Box::new(e))
    }
}

impl ServerError {
    /// A task's join error as a server error.
    fn joined(task: &'static str, e: tokio::task::JoinError) -> ServerError {
        let message = match e.try_into_panic() {
            Ok(panic) => panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".to_owned()),
            Err(e) => e.to_string(),
        };
        ServerError::Panicked { task, message }
    }
}

/// Everything a request or a connection needs, shared by all of them.
#[derive(Debug)]
pub struct App {
    /// Per-address limits on WebSocket handshakes and connections.
    pub admission: Arc<Admission>,
    /// The configuration in force.
    pub config: Config,
    /// The application's plain-text handler and greeting.
    pub(crate) text: Text,
    /// Topic prefixes applications keep to themselves, with what a
    /// client is told instead.
    pub(crate) reserved: Vec<(Box<str>, Box<str>)>,
    /// Metric handles.
    pub metrics: Arc<Metrics>,
    /// JSON events.
    pub router: Router,
    /// Checks handshake tokens.
    pub verifier: Verifier,
    /// What the application decides about connections, subscriptions and
    /// publications.
    pub hooks: Arc<dyn crate::hooks::Hooks>,
    /// The application's backend, when `[proxy]` names one.
    pub backend: Option<Arc<crate::proxy::Backend>>,
    /// `server.trusted_proxies`, parsed.
    pub proxies: Vec<identity::Cidr>,
    /// Connections, users, topics; push.
    pub hub: Arc<Hub>,
    /// Open SSE sessions.
    pub sessions: crate::sse::Sessions,
    /// This node's cluster membership; `None` on a single node.
    pub cluster: Option<Arc<Cluster>>,
    /// Cancelled when the server starts to shut down: stop accepting,
    /// refuse new events.
    pub shutdown: CancellationToken,
    /// Cancelled once queued handlers are done: connections finish their
    /// lookups, flush their queues and close with 1001.
    pub closing: CancellationToken,
    /// Every upgraded WebSocket connection, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// The ticks of every connection's ping check.
    pub ping_clock: crate::connection::PingClock,
    /// TLS for every connection, when `server.tls_cert` and `tls_key` are
    /// set.
    pub tls: Option<crate::tls::Tls>,
    /// The takeover connections take part in (`server.handoff_socket`
    /// set).
    pub(crate) handoff: Option<crate::handoff::Gate>,
}

/// Binds the configured listen address (with gale's listen backlog);
/// port 0 lets the OS choose, as tests do.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), gale_engine::server::ServerError> {
/// let listener = gale_engine::server::bind("127.0.0.1:0").await?;
/// assert_ne!(listener.local_addr()?.port(), 0);
/// # Ok(()) }
/// ```
///
/// # Errors
/// [`ServerError::Bind`] naming `server.listen`.
pub async fn bind(addr: &str) -> Result<TcpListener, ServerError> {
    crate::listener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind {
            addr: addr.to_owned(),
            source,
        })
}

/// Checks what a server would refuse at its start and can be checked
/// without starting one: the TLS certificate and key, and the token
/// settings (keys read, algorithms known). `gale serve --takeover` runs
/// it before asking the running process to hand over, so a new process
/// that could not start does not take the connections down with it.
///
/// # Errors
/// [`ServerError::Config`] naming the setting.
pub fn preflight(config: &Config) -> Result<(), ServerError> {
    if let (Some(cert), Some(key)) = (&config.server.tls_cert, &config.server.tls_key) {
        crate::tls::acceptor(cert, key)?;
    }
    Verifier::from_config(&config.auth)?;
    Ok(())
}

/// Runs the engine alone (its built-in events, no application) on
/// `listener` until `shutdown` is cancelled, then shuts down cleanly.
///
/// # Errors
/// [`ServerError`] when a setting is refused, cluster mode cannot start,
/// or a server task panics.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    Builder::new(config)
        .await?
        .start(listener, shutdown)
        .await?
        .wait()
        .await
}

/// A started server. Application code reaches the running server through
/// [`Running::app`]: push with `app.hub`, listen to lifecycle events with
/// `app.hub.system_events()`.
#[derive(Debug)]
pub struct Running {
    app: Arc<App>,
    task: tokio::task::JoinHandle<Result<(), ServerError>>,
}

impl Running {
    /// The shared state of the running server.
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// A handle to push, publish and read presence and history from
    /// anywhere in the program.
    pub fn handle(&self) -> crate::handle::Handle {
        crate::handle::Handle::new(self.app.clone())
    }

    /// Waits until the server has shut down (after `shutdown` is
    /// cancelled) and every application's shutdown step has run.
    ///
    /// # Errors
    /// [`ServerError::Panicked`] when a server task panicked (the server
    /// shuts down then), [`ServerError::Application`] when a shutdown
    /// step failed (e.g. the request log could not write every row).
    pub async fn wait(self) -> Result<(), ServerError> {
        self.task
            .await
            .unwrap_or_else(|e| Err(ServerError::joined("serve task", e)))
    }
}

/// What a plain-text message gets: the reply's text.
pub type TextHandler =
    Arc<dyn Fn(crate::router::Ctx, Utf8Bytes) -> BoxFuture<'static, String> + Send + Sync>;

/// The application's plain-text slot: its greeting and its handler.
#[derive(Clone)]
pub(crate) struct Text {
    pub(crate) greeting: Arc<str>,
    pub(crate) handler: Option<TextHandler>,
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Text")
            .field("greeting", &self.greeting)
            .field("handler", &self.handler.is_some())
            .finish()
    }
}

/// An application's step in the shutdown sequence, given how long it may
/// take; it runs once every connection is closed.
type Stop = Box<dyn FnOnce(Duration) -> BoxFuture<'static, Result<(), BoxError>> + Send>;

/// An application's step after a takeover (see [`Builder::on_resume`]).
type Resume = Box<dyn Fn(Arc<App>, Vec<String>) + Send + Sync>;

/// Builds a server: the engine's configuration, then the application's
/// events, text handler, routes and shutdown steps, then
/// [`Builder::start`].
///
/// ```no_run
/// use gale_engine::config::Config;
/// use gale_engine::router::{Ctx, HandlerResult, Policy};
/// use gale_engine::server::{Builder, ServerError, bind};
///
/// async fn hello(ctx: Ctx, data: serde_json::Value) -> HandlerResult {
///     Ok(serde_json::json!({ "hello": ctx.caller.user.as_deref(), "you_sent": data }))
/// }
///
/// # async fn example() -> Result<(), ServerError> {
/// let config = Config::load(None)?;
/// let listener = bind(&config.server.listen).await?;
/// let shutdown = tokio_util::sync::CancellationToken::new();
/// let mut builder = Builder::new(config).await?;
/// builder.registry().register("hello", Policy::default(), hello);
/// builder.start(listener, shutdown).await?.wait().await
/// # }
/// ```
pub struct Builder {
    config: Config,
    metrics: Arc<Metrics>,
    cluster: Option<Arc<Cluster>>,
    registry: Registry,
    text: Text,
    routes: axum::Router,
    stops: Vec<Stop>,
    resumes: Vec<Resume>,
    reserved: Vec<(Box<str>, Box<str>)>,
    hooks: crate::hooks::AppHooks,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("registry", &self.registry)
            .field("text", &self.text)
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// A server with `config` and the engine's built-in events
    /// (`topic.*`, `presence.online`, `server.stats`); in cluster mode it
    /// joins the cluster here, so an application can use
    /// [`Builder::cluster`] before it starts.
    ///
    /// # Errors
    /// [`ServerError::Cluster`] when cluster mode cannot start.
    pub async fn new(config: Config) -> Result<Builder, ServerError> {
        let node_id = config.cluster.enabled().then(|| {
            config
                .cluster
                .node_id
                .clone()
                .unwrap_or_else(crate::cluster::generate_node_id)
        });
        let metrics = Arc::new(Metrics::for_node(node_id.as_deref()));
        let cluster = match (node_id, &metrics.cluster) {
            (Some(id), Some(m)) => Some(Cluster::connect(&config.cluster, id, m.clone()).await?),
            _ => None,
        };
        Ok(Builder {
            config,
            metrics,
            cluster,
            registry: Registry::builtin(),
            text: Text {
                greeting: Arc::from(crate::protocol::GREETING),
                handler: None,
            },
            routes: axum::Router::new(),
            stops: Vec::new(),
            resumes: Vec::new(),
            reserved: Vec::new(),
            hooks: Default::default(),
        })
    }

    /// The configuration the server will run with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The server's metrics: register the application's own with
    /// [`Metrics::register`] and [`Metrics::add_part`].
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// This node's cluster membership (`None` on a single node): shared
    /// values and leases across nodes.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// The table of events: register the application's here
    /// ([`Registry::register`]).
    pub fn registry(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Serves plain text (a message that is not a JSON event) with
    /// `handler`, whose return value is the reply, and greets each new
    /// connection with `greeting`. Without one, plain text is answered
    /// with an `invalid_message` error.
    pub fn text<F, Fut>(&mut self, greeting: &str, handler: F) -> &mut Builder
    where
        F: Fn(crate::router::Ctx, Utf8Bytes) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = String> + Send + 'static,
    {
        self.text = Text {
            greeting: Arc::from(greeting),
            handler: Some(Arc::new(move |ctx, text| Box::pin(handler(ctx, text)))),
        };
        self
    }

    /// Keeps the topics starting with `prefix` to the application: the
    /// `topic.*` events refuse them (`invalid_data`, field `topic`) with
    /// `how`, which says how a client does join them (e.g. through an
    /// event of the application's that checks more).
    pub fn reserve_topics(&mut self, prefix: &str, how: &str) -> &mut Builder {
        self.reserved.push((prefix.into(), how.into()));
        self
    }

    /// Decides who a handshake without a valid token is (before the
    /// backend's connect hook, which is asked when this returns
    /// `Ok(None)`). Only the headers `[proxy] headers` names are passed.
    ///
    /// ```no_run
    /// # async fn example(builder: &mut gale_engine::server::Builder) {
    /// use gale_engine::hooks::{Connected, Refusal};
    ///
    /// builder.on_connect(|req| async move {
    ///     let Some((_, key)) = req.headers.iter().find(|(h, _)| h == "x-api-key") else {
    ///         return Ok(None); // anonymous, or refused when auth.required
    ///     };
    ///     if key != "letmein" {
    ///         return Err(Refusal::denied("unknown API key"));
    ///     }
    ///     Ok(Some(Connected {
    ///         user: Some("service".into()),
    ///         ..Connected::default()
    ///     }))
    /// });
    /// # }
    /// ```
    pub fn on_connect<F, Fut>(&mut self, hook: F) -> &mut Builder
    where
        F: Fn(crate::hooks::ConnectRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Option<crate::hooks::Connected>, crate::hooks::Refusal>>
            + Send
            + 'static,
    {
        self.hooks.connect = Some(Arc::new(move |req| Box::pin(hook(req))));
        self
    }

    /// Adds a check to every `topic.subscribe`, after the topic's
    /// `[topics]` rules (and the backend, where one decides) let it
    /// through: `Err` refuses it with the refusal's error.
    ///
    /// ```no_run
    /// # async fn example(builder: &mut gale_engine::server::Builder) {
    /// use gale_engine::hooks::Refusal;
    ///
    /// builder.on_subscribe(|who, topic| async move {
    ///     match (topic.strip_prefix("team:"), who.user.as_deref()) {
    ///         (Some(team), Some(user)) if !user.ends_with(&format!("@{team}")) => {
    ///             Err(Refusal::denied("not your team"))
    ///         }
    ///         _ => Ok(()),
    ///     }
    /// });
    /// # }
    /// ```
    pub fn on_subscribe<F, Fut>(&mut self, hook: F) -> &mut Builder
    where
        F: Fn(crate::hooks::Who, String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), crate::hooks::Refusal>> + Send + 'static,
    {
        self.hooks
            .subscribe
            .push(Arc::new(move |who, topic| Box::pin(hook(who, topic))));
        self
    }

    /// Adds a check to every client's `topic.publish`, after the topic's
    /// `[topics]` rules (and the backend) let it through: `Ok(data)` is
    /// what is published (the data as it came, or a replacement), `Err`
    /// refuses it. Publications from the server (a [`Handle`], the
    /// server API) do not pass here.
    ///
    /// [`Handle`]: crate::handle::Handle
    ///
    /// ```no_run
    /// # async fn example(builder: &mut gale_engine::server::Builder) {
    /// builder.on_publish(|_who, _topic, mut data| async move {
    ///     data["checked"] = true.into();
    ///     Ok(data)
    /// });
    /// # }
    /// ```
    pub fn on_publish<F, Fut>(&mut self, hook: F) -> &mut Builder
    where
        F: Fn(crate::hooks::Who, String, serde_json::Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<serde_json::Value, crate::hooks::Refusal>> + Send + 'static,
    {
        self.hooks.publish.push(Arc::new(move |who, topic, data| {
            Box::pin(hook(who, topic, data))
        }));
        self
    }

    /// Calls `hook` once for every connection that closes, whatever
    /// closed it, on the connection's task: spawn anything slow.
    pub fn on_disconnect<F>(&mut self, hook: F) -> &mut Builder
    where
        F: Fn(crate::hooks::Who) + Send + Sync + 'static,
    {
        self.hooks.disconnect.push(Arc::new(hook));
        self
    }

    /// Adds the application's own HTTP routes beside the engine's (`/ws`,
    /// `/sse`, `/sse/{session}`, `/echo`, `/api/{method}`, `/metrics`,
    /// `/metrics.json`, `/healthz`, `/gale-client.js`). The router keeps
    /// its own state (`with_state` before passing it) and sets no
    /// fallback: the engine answers unknown paths with 404. As axum's
    /// `Router::merge`, starting panics on a path both define.
    pub fn routes(&mut self, routes: axum::Router) -> &mut Builder {
        self.routes = std::mem::take(&mut self.routes).merge(routes);
        self
    }

    /// Runs `step` in the shutdown sequence once every connection is
    /// closed, with how long it may take (what is left of
    /// `server.shutdown_grace_ms`, at least 5 s): an application drains
    /// its queues here. Its error is what [`Running::wait`] returns.
    pub fn on_shutdown<F, Fut, E>(&mut self, step: F) -> &mut Builder
    where
        F: FnOnce(Duration) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        self.stops.push(Box::new(move |left| {
            let done = step(left);
            Box::pin(async move { done.await.map_err(|e| Box::new(e) as BoxError) })
        }));
        self
    }

    /// Runs `step` once after a takeover, with every topic the
    /// connections taken over are subscribed to, before anything new is
    /// accepted: an application restarts what it ran for them (a feed per
    /// topic, say). The connections moved without a subscribe, so the
    /// events and hooks that set such things up did not run here.
    ///
    /// ```
    /// # async fn example(builder: &mut gale_engine::server::Builder) {
    /// builder.on_resume(|_app, topics| {
    ///     for topic in topics.iter().filter(|t| t.starts_with("prices:")) {
    ///         tracing::info!(topic, "restarting the price feed");
    ///     }
    /// });
    /// # }
    /// ```
    pub fn on_resume<F>(&mut self, step: F) -> &mut Builder
    where
        F: Fn(Arc<App>, Vec<String>) + Send + Sync + 'static,
    {
        self.resumes.push(Box::new(step));
        self
    }

    /// Starts the server on `listener`; it runs until `shutdown` is
    /// cancelled.
    ///
    /// # Errors
    /// [`ServerError`] when a setting is refused (an `[events."…"]`
    /// override naming no event, a TLS file that cannot be read, …).
    pub async fn start(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<Running, ServerError> {
        self.launch(listener, None, shutdown).await
    }

    /// Starts the server on what a takeover handed over
    /// ([`crate::handoff::take_over`]): the old process's listening
    /// socket and, before anything is accepted, every live connection it
    /// held, carried on from where it was. The old process exits once
    /// this has taken them.
    ///
    /// # Errors
    /// As [`Builder::start`]. A takeover that breaks half way is logged:
    /// the connections received are served, and the server runs.
    pub async fn start_taken_over(
        self,
        inherited: crate::handoff::Inherited,
        shutdown: CancellationToken,
    ) -> Result<Running, ServerError> {
        let (listener, history, conns) = crate::handoff::into_parts(inherited);
        let listener = TcpListener::from_std(listener)?;
        self.launch(listener, Some((history, conns)), shutdown)
            .await
    }

    async fn launch(
        self,
        listener: TcpListener,
        taken_over: Option<(
            Option<crate::history::Snapshot>,
            Vec<crate::handoff::Handed>,
        )>,
        shutdown: CancellationToken,
    ) -> Result<Running, ServerError> {
        let Builder {
            config,
            metrics,
            cluster,
            mut registry,
            text,
            routes,
            stops,
            resumes,
            reserved,
            hooks: mine,
        } = self;
        let verifier = Verifier::from_config(&config.auth)?;
        let proxies = config.server.trusted_proxies()?;
        let backend = crate::proxy::Backend::new(&config.proxy, metrics.clone())
            .map_err(ServerError::Backend)?
            .map(Arc::new);
        let rules = crate::channels::Rules::new(&config.topics);
        match rules.open() {
            open if open.is_empty() => tracing::info!(
                "no [topics] block opens a topic to clients: topic.subscribe and topic.publish are \
                 refused (permission_denied) until one does, e.g. [topics.\"*\"] subscribe = \"anyone\""
            ),
            open => tracing::info!(
                open = %open.join("; "),
                "topics open to clients as these [topics] blocks say; every other topic is closed \
                 to them (permission_denied)"
            ),
        }
        let gale: Arc<dyn crate::hooks::Hooks> = Arc::new(crate::hooks::Permissions::new(
            rules,
            Verifier::from_config(&config.auth)?,
            backend.clone(),
            &config.proxy.headers,
        ));
        let hooks: Arc<dyn crate::hooks::Hooks> = if mine.is_empty() {
            gale
        } else {
            Arc::new(crate::hooks::Chain { gale, app: mine })
        };
        crate::proxy::register_rpc(&mut registry, &config.proxy);
        let events = Router::new(registry, &config, metrics.clone())?;
        let tls = match (&config.server.tls_cert, &config.server.tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::acceptor(cert, key)?),
            _ => None,
        };
        // In cluster mode, the membership and its backplane, built together.
        let joined = cluster.as_ref().map(|c| {
            let bp = RedisBackplane::new(
                c.clone(),
                config.cluster.publish_queue,
                config.cluster.receive_queue,
                config.cluster.publish_batch,
                config.history.meta_ttl_s,
            );
            (c.clone(), bp)
        });
        let (hub, delivery) = Hub::start(
            &config.broadcast,
            (
                crate::history::Policies::new(&config.topics),
                &config.history,
            ),
            config.server.max_outbound_message_bytes,
            metrics.clone(),
            match &joined {
                Some((_, bp)) => bp.clone() as Arc<dyn Backplane>,
                None => Arc::new(LocalOnly),
            },
        );
        let cluster_stop = CancellationToken::new();
        // Presence starts once connections taken over (if any) have
        // joined: its first write then names their users.
        let presence = joined.map(|(c, bp)| {
            bp.attach(&hub, cluster_stop.clone());
            c
        });
        let grace = config.server.shutdown_grace();
        let config_handoff = config.server.handoff_socket.clone();
        let closing = CancellationToken::new();
        let ping_clock = crate::connection::PingClock::start(
            Duration::from_secs(config.server.ping_interval_s),
            closing.clone(),
        );
        let admission = Arc::new(Admission::new(&config.server, metrics.clone()));
        let app = Arc::new(App {
            admission,
            config,
            text,
            reserved,
            metrics,
            router: events,
            verifier,
            hooks,
            backend,
            proxies,
            hub,
            sessions: Default::default(),
            cluster,
            shutdown: shutdown.clone(),
            closing,
            tracker: TaskTracker::new(),
            ping_clock,
            tls,
            handoff: (!config_handoff.is_empty()).then(crate::handoff::Gate::default),
        });
        let permits = Arc::new(tokio::sync::Semaphore::new(
            app.config.server.max_connections,
        ));
        let lifecycle_stop = CancellationToken::new();
        let lifecycle = crate::lifecycle::start(&app, lifecycle_stop.clone());
        if let Some((history, conns)) = taken_over {
            // Before anything is accepted: the connections handed over go
            // on first, so none misses what new clients publish.
            let topics = crate::handoff::import(&app, history, conns, &permits);
            for resume in &resumes {
                resume(app.clone(), topics.clone());
            }
        }
        let presence = presence.map(|c| {
            tokio::spawn(crate::cluster::presence::run(
                c,
                Arc::downgrade(&app.hub),
                cluster_stop.clone(),
            ))
        });
        let takeovers = if config_handoff.is_empty() {
            None
        } else {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            crate::handoff::listen(&config_handoff, tx, shutdown.clone())?;
            Some(rx)
        };

        let local = listener.local_addr()?;
        let task = tokio::spawn(serve(
            app.clone(),
            listener,
            local,
            delivery,
            routes,
            grace,
            Membership {
                stop: cluster_stop,
                presence,
                lifecycle_stop,
                lifecycle,
                stops,
            },
            Door { permits, takeovers },
        ));
        Ok(Running { app, task })
    }
}

/// The cluster tasks, stopped once this node's connections are closed.
struct Membership {
    stop: CancellationToken,
    presence: Option<tokio::task::JoinHandle<()>>,
    /// The lifecycle notifications: what the closed connections queued
    /// goes out before the node leaves.
    lifecycle_stop: CancellationToken,
    lifecycle: Option<tokio::task::JoinHandle<()>>,
    /// The applications' shutdown steps, run once the node has left.
    stops: Vec<Stop>,
}

/// The door's permits, and the takeovers asked of this server.
struct Door {
    /// `server.max_connections`, shared by accepted and taken-over
    /// connections.
    permits: Arc<tokio::sync::Semaphore>,
    /// Takeovers accepted on `server.handoff_socket`.
    takeovers: Option<tokio::sync::mpsc::Receiver<crate::handoff::Successor>>,
}

/// The next takeover; never, once none can come.
async fn next_takeover(
    rx: &mut Option<tokio::sync::mpsc::Receiver<crate::handoff::Successor>>,
) -> crate::handoff::Successor {
    if let Some(r) = rx {
        if let Some(stream) = r.recv().await {
            return stream;
        }
        *rx = None;
    }
    std::future::pending().await
}

/// Serves until shutdown or a takeover, then runs the shutdown sequence
/// (handing the connections over first, on a takeover).
#[allow(clippy::too_many_arguments)]
async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    local: SocketAddr,
    delivery: crate::broadcast::Delivery,
    extra: axum::Router,
    grace: Duration,
    membership: Membership,
    door: Door,
) -> Result<(), ServerError> {
    let Door {
        permits,
        mut takeovers,
    } = door;
    let shutdown = app.shutdown.clone();
    let scheme = if app.tls.is_some() { "wss" } else { "ws" };
    tracing::info!(addr = %local, "gale listening; WebSocket at {scheme}://{local}/ws");
    let front = crate::listener::Front {
        router: routes(app.clone(), extra),
        deadline: app.config.server.handshake_timeout(),
        metrics: app.metrics.clone(),
        send_buffer: app.config.server.send_buffer_bytes,
        tls: app.tls.clone(),
        admission: app.admission.clone(),
        proxies: app.proxies.clone().into(),
    };
    let conns = TaskTracker::new();
    // Kept to hand to a successor: the accept loop owns the listener.
    let listeners: Vec<(String, std::os::fd::OwnedFd)> = {
        use std::os::fd::AsFd;
        listener
            .as_fd()
            .try_clone_to_owned()
            .map(|fd| vec![(local.to_string(), fd)])
            .unwrap_or_default()
    };
    let stop_accepting = CancellationToken::new();
    let mut accepting = tokio::spawn(crate::listener::serve(
        listener,
        permits,
        front,
        stop_accepting.clone(),
        conns.clone(),
    ));

    // The accept loop returns only at shutdown; if it ends first (a
    // panic), the server shuts down at once and says why.
    let mut handover = None;
    let accept_ended = loop {
        tokio::select! {
            () = shutdown.cancelled() => break None,
            ended = &mut accepting => {
                shutdown.cancel();
                if let Err(e) = &ended {
                    tracing::error!(error = %e, "the accept loop failed: shutting down");
                }
                break Some(ended);
            }
            successor = next_takeover(&mut takeovers) => {
                match crate::handoff::begin(&app, successor, &listeners) {
                    Ok(h) => {
                        tracing::info!(
                            connections = app.metrics.connections.get(),
                            "takeover: listening socket handed over; handing the connections"
                        );
                        handover = Some(h);
                        shutdown.cancel();
                        break None;
                    }
                    Err(e) => tracing::error!(error = %e, "takeover failed before anything moved; serving on"),
                }
            }
        }
    };
    drop(listeners);
    let drain_s = app.config.server.drain_s;
    if handover.is_none() && accept_ended.is_none() && drain_s > 0 {
        // Still accepting, so /healthz says "draining" and handshakes are
        // told when to come back, while the connections go gradually.
        crate::drain::run(&app, Duration::from_secs(drain_s)).await;
    }
    stop_accepting.cancel();
    if let Some(handover) = &handover {
        // Every connection handed over stops reading and has its events
        // answered before the router stops taking any.
        handover.quiet(&app, grace).await;
    }
    let deadline = Instant::now() + grace;
    tracing::info!(
        connections = app.metrics.connections.get(),
        grace_ms = grace.as_millis() as u64,
        "shutting down: closing connections"
    );
    // New events are refused from here on; queued and running handlers
    // finish and queue their replies before connections start closing.
    if !app.router.drain(grace).await {
        tracing::warn!("grace period over with event handlers still running");
    }
    // Pending broadcasts reach the outboxes before connections flush them.
    let left = deadline.saturating_duration_since(Instant::now());
    if !delivery.flush(left.max(Duration::from_secs(1))).await {
        tracing::warn!("broadcast queue not flushed in time");
    }
    if let Some(handover) = handover {
        match handover.finish(&app).await {
            Ok(handed) => {
                tracing::info!(handed, "takeover done: connections handed over");
                if let Some(c) = &app.cluster {
                    c.hand_presence_over();
                }
            }
            Err(e) => tracing::error!(error = %e, "the takeover broke off"),
        }
        // What could not move goes at once, each told a jittered
        // reconnect delay: a drain over `drain_s` would keep this
        // process, and what it holds (the request log's spill), from the
        // new one for that long.
        crate::drain::run(&app, Duration::ZERO).await;
    }
    app.closing.cancel();
    app.tracker.close();
    if tokio::time::timeout_at(deadline, app.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = app.tracker.len(),
            "grace period over with connections still open"
        );
    }
    // The accept loop stopped at the shutdown signal; plain HTTP
    // connections finish the request they are serving and close.
    let accept_result = match accept_ended {
        Some(ended) => ended,
        None => accepting.await,
    };
    let mut failure = accept_result
        .err()
        .map(|e| ServerError::joined("accept loop", e));
    conns.close();
    if tokio::time::timeout_at(deadline, conns.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = conns.len(),
            "HTTP connections still open after the grace period"
        );
    }

    membership.lifecycle_stop.cancel();
    if let Some(lifecycle) = membership.lifecycle {
        let _ = lifecycle.await;
    }
    // Leaving the cluster: what is queued for other nodes goes out, and
    // this node's presence is removed (bounded by the call deadline).
    membership.stop.cancel();
    if let Some(presence) = membership.presence
        && let Err(e) = presence.await
    {
        failure.get_or_insert(ServerError::joined("cluster presence", e));
    }

    // Each application's shutdown step gets what is left of the grace
    // period, and never less than a few seconds: rows of answered
    // requests must not be abandoned.
    for stop in membership.stops {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(5));
        if let Err(e) = stop(left).await {
            tracing::error!(error = %e, "an application's shutdown step failed");
            failure.get_or_insert(ServerError::Application(e));
        }
    }
    tracing::info!("shut down; bye");
    failure.map_or(Ok(()), Err)
}

fn routes(app: Arc<App>, extra: axum::Router) -> axum::Router {
    let router = if app.config.server.echo {
        axum::Router::new().route("/echo", get(echo_upgrade))
    } else {
        axum::Router::new().route("/echo", get(echo_off))
    };
    let engine = router
        .route("/gale-client.js", get(client_js))
        .route("/ws", get(ws_upgrade))
        .route("/sse", get(sse_open))
        .route("/sse/{session}", axum::routing::post(sse_receive))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/metrics.json", get(metrics_json))
        // The handler reads the body under its own limit.
        .route("/api/{method}", axum::routing::post(crate::api::call))
        .with_state(app);
    engine.merge(extra).fallback(not_found)
}

/// The JavaScript client. Any page may import it (a team's own site,
/// on another origin): it is public code, fetched without credentials;
/// its WebSocket still passes the Origin check (`server.allowed_origins`).
async fn client_js() -> impl IntoResponse {
    (
        [
            (
                axum::http::header::CONTENT_TYPE,
                "text/javascript; charset=utf-8",
            ),
            (axum::http::header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        ],
        include_str!("../../../clients/js/src/index.js"),
    )
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    if app.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "draining: this node is shutting down ({} connections open); send new clients \
                 elsewhere\n",
                app.metrics.connections.get()
            ),
        )
            .into_response();
    }
    match &app.cluster {
        Some(c) if !c.is_up() => (
            StatusCode::from_u16(app.config.cluster.degraded_status)
                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            format!(
                "degraded: node {} cannot reach the cluster's Redis; serving its own \
                 connections only (cross-node pushes are lost and counted)\n",
                c.node_id()
            ),
        )
            .into_response(),
        Some(c) => format!("ok: node {} joined\n", c.node_id()).into_response(),
        None => "ok\n".into_response(),
    }
}

impl App {
    /// This node's id: the cluster's name for it, or `"local"` on a
    /// single node.
    pub fn node_id(&self) -> &str {
        self.cluster.as_ref().map_or("local", |c| c.node_id())
    }

    /// Brings the gauges that depend on time alone up to date; every
    /// reader of the metrics (`/metrics`, `/metrics.json`, `server.stats`)
    /// calls it first. The others are kept live where they change.
    pub fn refresh_gauges(&self) {
        self.metrics.refresh_parts();
        self.metrics
            .rate_buckets
            .set(self.router.rate_buckets() as i64);
        self.metrics
            .rate_shares
            .set(self.router.share_buckets() as i64);
    }
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    app.refresh_gauges();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.encode_text(),
    )
        .into_response()
}

async fn metrics_json(State(app): State<Arc<App>>) -> Response {
    app.refresh_gauges();
    axum::Json(app.metrics.to_json()).into_response()
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

/// What an upgraded connection serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `/ws`: plain text (the application's text handler) and events.
    Protocol,
    /// `/echo`: every message sent back (baseline and conformance target).
    Echo,
}

async fn sse_open(
    state: State<Arc<App>>,
    peer: ConnectInfo<SocketAddr>,
    abort: Option<axum::Extension<crate::listener::ConnAbort>>,
    counted: Option<axum::Extension<Counted>>,
    version: axum::http::Version,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    if !state.0.config.sse.enabled {
        return not_found().await;
    }
    crate::sse::open(state, peer, abort, counted, version, headers, uri).await
}

async fn sse_receive(
    state: State<Arc<App>>,
    session: axum::extract::Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    if !state.0.config.sse.enabled {
        return not_found().await;
    }
    crate::sse::receive(state, session, headers, body).await
}

async fn ws_upgrade(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    counted: Option<axum::Extension<Counted>>,
    headers: HeaderMap,
    uri: Uri,
    ws: Result<Upgrade, UpgradeError>,
) -> Response {
    accept(
        app,
        peer,
        counted.is_some(),
        headers,
        uri,
        ws,
        Mode::Protocol,
    )
    .await
}

/// `/echo` while `[server] echo` is off: 404, saying how to turn it on.
async fn echo_off() -> Response {
    (
        StatusCode::NOT_FOUND,
        "the /echo endpoint is off: start the server with [server] echo = true \
         (GALE_SERVER__ECHO=true)\n",
    )
        .into_response()
}

async fn echo_upgrade(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    counted: Option<axum::Extension<Counted>>,
    headers: HeaderMap,
    uri: Uri,
    ws: Result<Upgrade, UpgradeError>,
) -> Response {
    accept(app, peer, counted.is_some(), headers, uri, ws, Mode::Echo).await
}

/// The upgrade path both WebSocket routes share: the same checks, limits
/// and buffers, so `/echo` measures the stack `/ws` runs on.
async fn accept(
    app: Arc<App>,
    peer: SocketAddr,
    counted: bool,
    headers: HeaderMap,
    uri: Uri,
    ws: Result<Upgrade, UpgradeError>,
    mode: Mode,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            // RFC 6455 §4.4: the versions the server speaks.
            return (
                StatusCode::UPGRADE_REQUIRED,
                [
                    (header::UPGRADE, "websocket"),
                    (header::SEC_WEBSOCKET_VERSION, "13"),
                ],
                format!(
                    "{} is a WebSocket endpoint: connect with a WebSocket client \
                     (e.g. `gale client ws://HOST:PORT/ws`). {rejection}.\n",
                    uri.path(),
                ),
            )
                .into_response();
        }
    };
    let Admitted {
        admission: admitted,
        who,
        address,
        client,
    } = match admit(&app, peer, counted, &headers, &uri, "websocket").await {
        Ok(ok) => ok,
        Err(refused) => return refused,
    };
    // Taken before the upgrade completes, so shutdown also waits for a
    // connection that is between the 101 response and its task.
    let tracked = app.tracker.token();
    let s = &app.config.server;
    let limits = limits(s);
    let compression = s.compression == Compression::Deflate;
    ws.on_upgrade(
        compression,
        limits,
        app.metrics.clone(),
        move |socket, counted| {
            // Boxed once, here: every async fn the socket passes through
            // would otherwise keep it inline in the connection's task.
            let socket = Box::new(socket);
            // Counted at the accept (now a session too), or (behind a
            // proxy) at the handshake.
            let admitted = counted.map(|c| c.with_session()).or(admitted);
            let held = crate::connection::Held::new(admitted, tracked);
            // The connection's future itself, no `async` block around it:
            // one would keep these captures for the connection's life.
            match mode {
                Mode::Protocol => Either::Left(crate::connection::serve(
                    app, socket, client, who, address, held,
                )),
                Mode::Echo => Either::Right(crate::connection::echo(held, app, socket)),
            }
        },
    )
}

/// The per-socket limits of `[server]`.
pub(crate) fn limits(s: &crate::config::ServerConfig) -> Limits {
    Limits {
        max_message: s.max_message_bytes,
        read_buffer: s.read_buffer_bytes,
        compress_min: s.compression_min_bytes,
    }
}

/// A handshake let in: what the connection holds and is.
pub(crate) struct Admitted {
    /// Counted against its address for its life (`None`: counted at the
    /// accept already).
    pub(crate) admission: Option<crate::admission::Admitted>,
    /// Who it is.
    pub(crate) who: identity::Identity,
    /// The address rate limits key it by.
    pub(crate) address: std::net::IpAddr,
    /// Its `client_id` (the application's connect hook was told it).
    pub(crate) client: uuid::Uuid,
}

/// The checks every client connection passes, WebSocket or SSE, cheapest
/// first: shutting down, the address's admission, Origin, token; and,
/// without a valid token, the application's connect hook. Returns what
/// the connection holds and is, or the refusal to answer.
#[allow(clippy::result_large_err)]
pub(crate) async fn admit(
    app: &App,
    peer: SocketAddr,
    counted: bool,
    headers: &HeaderMap,
    uri: &Uri,
    transport: &'static str,
) -> Result<Admitted, Response> {
    if app.shutdown.is_cancelled() {
        // Draining (or handing over): come back, to another node or to
        // this one's successor, after a jittered wait.
        let wait = Duration::from_millis(crate::drain::jitter(
            app.config.server.drain_reconnect_ms.max(1_000),
        ));
        return Err(retry_later(wait, "shutting down"));
    }
    // Before the Origin and token checks: a flood is refused before it
    // costs a signature check.
    let address = identity::rate_key(identity::client_address(headers, peer.ip(), &app.proxies));
    let admitted = if counted {
        // The connection is counted; its session is, once it is one.
        app.admission.handshake(address).map(|()| None)
    } else {
        app.admission.admit(address).map(Some)
    };
    let admission = match admitted {
        Ok(a) => a,
        Err(refused @ Refused::Connections(_)) => {
            tracing::debug!(%address, "handshake refused: connections per address");
            return Err((StatusCode::SERVICE_UNAVAILABLE, format!("{refused}\n")).into_response());
        }
        Err(refused @ Refused::Node(_, wait)) => {
            tracing::debug!(%address, "handshake refused: the node's handshake rate");
            return Err(retry_later(wait, &refused.to_string()));
        }
        Err(refused @ Refused::Rate(_, wait)) => {
            tracing::debug!(%address, "handshake refused: handshake rate");
            let retry = wait.as_secs().max(1).to_string();
            return Err((
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, retry)],
                format!("{refused}\n"),
            )
                .into_response());
        }
    };
    if !identity::origin_allowed(headers, &app.config.server.allowed_origins) {
        tracing::debug!(origin = ?headers.get(header::ORIGIN), "handshake refused: origin");
        return Err((
            StatusCode::FORBIDDEN,
            "this Origin may not connect here (server.allowed_origins)\n",
        )
            .into_response());
    }
    let client = uuid::Uuid::new_v4();
    let verdict = app
        .verifier
        .identify(identity::token_from(headers, uri).as_deref());
    let who = match verdict {
        Ok(who) if who.user.is_some() || !app.hooks.connects() => who,
        // No valid token: the application decides who this is.
        verdict => match connect(app, client, address, headers, transport).await? {
            // auth.required: the backend must name a user too.
            Some(who) if who.user.is_none() && app.config.auth.required => {
                return Err((
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    "sign-in required (auth.required): no valid token, and the application's \
                     backend named no user\n",
                )
                    .into_response());
            }
            Some(who) => who,
            None => verdict.map_err(|e| {
                tracing::debug!(error = %e, "handshake refused: token");
                (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    format!("{e}\n"),
                )
                    .into_response()
            })?,
        },
    };
    Ok(Admitted {
        admission,
        who,
        address,
        client,
    })
}

/// 503 with `Retry-After` (whole seconds, at least one) and `why`.
fn retry_later(wait: Duration, why: &str) -> Response {
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, secs.to_string())],
        format!("{why}\n"),
    )
        .into_response()
}

/// Asks the application's connect hook who a handshake without a valid
/// token is: `None` when it leaves that open.
#[allow(clippy::result_large_err)]
async fn connect(
    app: &App,
    client: uuid::Uuid,
    address: std::net::IpAddr,
    headers: &HeaderMap,
    transport: &'static str,
) -> Result<Option<identity::Identity>, Response> {
    let forwarded = app
        .config
        .proxy
        .headers
        .iter()
        .filter_map(|name| {
            let value = headers.get(name.as_str())?.to_str().ok()?;
            Some((name.to_ascii_lowercase(), value.to_owned()))
        })
        .collect();
    let req = crate::hooks::ConnectRequest {
        client,
        transport,
        address,
        headers: forwarded,
    };
    match app.hooks.connect(req).await {
        Ok(None) => Ok(None),
        Ok(Some(c)) => Ok(Some(identity::Identity {
            user: c.user.map(Arc::from),
            roles: c.roles.into(),
            expires: c.expire_at,
            info: c.info.map(|i| Arc::from(i.to_string())),
            topics: c.topics,
        })),
        Err(refusal) => {
            let body = refusal.body();
            tracing::debug!(error = %body.message, "handshake refused by the application");
            let status = match body.code {
                crate::protocol::ErrorCode::UpstreamUnavailable
                | crate::protocol::ErrorCode::Timeout
                | crate::protocol::ErrorCode::SystemOverloaded => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::FORBIDDEN,
            };
            let json = serde_json::json!({ "error": body }).to_string();
            Err((status, [(header::CONTENT_TYPE, "application/json")], json).into_response())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real server whose serve task is swapped for one that panics, as
    /// a bug in the shutdown sequence would: `wait` must say so.
    #[tokio::test]
    async fn a_panic_in_the_serve_task_is_not_a_clean_exit() {
        let listener = bind("127.0.0.1:0").await.expect("bind");
        let shutdown = CancellationToken::new();
        let mut running = Builder::new(Config::default())
            .await
            .expect("builds")
            .start(listener, shutdown.clone())
            .await
            .expect("starts");
        let real = std::mem::replace(
            &mut running.task,
            tokio::spawn(async { panic!("deliberate, in a test") }),
        );
        let err = running.wait().await.expect_err("a panic is a failure");
        assert!(
            matches!(&err, ServerError::Panicked { message, .. } if message.contains("deliberate")),
            "{err}"
        );
        shutdown.cancel();
        real.await
            .expect("the real task")
            .expect("and it shut down cleanly");
    }
}
