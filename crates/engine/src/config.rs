//! Typed configuration: embedded defaults, an optional TOML file, and
//! environment overrides, merged and validated once at start-up.
//!
//! Precedence, lowest first: defaults < `--config FILE` <
//! `GALE_<SECTION>__<KEY>` variables. An application's own sections
//! ([`Sections`]) are read from the same sources. Every error names the setting at
//! fault so an operator can fix it from the message alone.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Prefix of the environment variables that override settings.
pub const ENV_PREFIX: &str = "GALE_";

/// Why a configuration could not be loaded. The message is one line that
/// names the setting (or file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file named by `--config`.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML.
    #[error("config file {path} line {line}: {message}")]
    Syntax {
        /// The file named by `--config`.
        path: String,
        /// 1-based line of the error.
        line: usize,
        /// What the TOML parser said.
        message: String,
    },
    /// An environment override could not be used.
    #[error("environment variable {var}: {message}")]
    Env {
        /// The variable's name.
        var: String,
        /// What is wrong with it.
        message: String,
    },
    /// A setting has a value that cannot be used.
    #[error("invalid setting {key}: {message}")]
    Invalid {
        /// Dotted path of the setting, e.g. `weather.provider`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

impl ConfigError {
    /// A refused value: `key` is the setting's dotted path
    /// (`weather.timeout_ms`), `message` what is wrong with it.
    pub fn invalid(key: &str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.to_owned(),
            message: message.into(),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Listener, connection limits and lifecycle.
    pub server: ServerConfig,
    /// The event router's worker pool and limits.
    pub router: RouterConfig,
    /// Per-connection outbound queue.
    pub connection: ConnectionConfig,
    /// Per-event policy overrides, keyed by event name.
    pub events: BTreeMap<String, EventOverride>,
    /// Who may connect, and how they prove it.
    pub auth: AuthConfig,
    /// Push and the broadcast queue.
    pub broadcast: BroadcastConfig,
    /// The HTTP publish API.
    pub api: ApiConfig,
    /// Cluster mode: many nodes as one, over Redis.
    pub cluster: ClusterConfig,
    /// Topic history: how much memory it may take on this node.
    pub history: HistoryConfig,
    /// Per-topic settings (who may subscribe and publish, history, …),
    /// keyed by a topic name or a pattern with `*` (any characters):
    /// `[topics."weather:*"]`.
    pub topics: BTreeMap<String, TopicConfig>,
    /// The HTTP fallback transport: Server-Sent Events plus POST.
    pub sse: SseConfig,
    /// The application's backend in the loop.
    pub proxy: ProxyConfig,
}

/// `[history]`: the bounds of the topic histories this node keeps in
/// memory (single node; in cluster mode history lives in Redis).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// Bytes of publications kept for every topic together; past this the
    /// streams published to least recently are dropped whole (their epoch
    /// changes) and counted.
    pub max_bytes: usize,
    /// Most topics with a history (a position) at once; past this the
    /// least recently published is dropped.
    pub max_streams: usize,
    /// How long a topic's position (epoch and offset) outlives its last
    /// publication, so a client away longer than `history_ttl_s` while
    /// nothing was published still recovers (with nothing missed).
    pub meta_ttl_s: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            max_bytes: 64 << 20,
            max_streams: 100_000,
            meta_ttl_s: 86_400,
        }
    }
}

/// `[topics."PATTERN"]`: settings of the topics a name or pattern matches.
/// Each setting comes from the most specific block that sets it: an exact
/// name first, then patterns, longest first; a block that leaves one out
/// leaves it to the next block that matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicConfig {
    /// Publications kept for recovery (0: no history, the default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history_size: Option<usize>,
    /// Seconds a publication stays recoverable (required with
    /// `history_size`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history_ttl_s: Option<u64>,
    /// Who may subscribe from a client (default: nobody).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<SubscribeMode>,
    /// Who may publish from a client with `topic.publish` (default:
    /// nobody).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<PublishMode>,
    /// Subscribers hear `topic.join` / `topic.leave` (default: false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join_leave: Option<bool>,
    /// `topic.presence` answers who is subscribed (default: false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence: Option<bool>,
    /// Roles a subscriber or publisher needs one of (default: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<String>>,
}

impl TopicConfig {
    /// A block that only keeps history: `size` publications for `ttl_s`.
    pub fn history(size: usize, ttl_s: u64) -> TopicConfig {
        TopicConfig {
            history_size: Some(size),
            history_ttl_s: Some(ttl_s),
            ..TopicConfig::default()
        }
    }
}

/// Who may subscribe to a topic from a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SubscribeMode {
    /// Anyone, signed in or not.
    Anyone,
    /// Signed-in users.
    Users,
    /// A client with a subscription token for the topic.
    Token,
    /// Whoever the backend's `[proxy] subscribe_url` allows.
    Proxy,
    /// No client (the backend subscribes users through the server API).
    Nobody,
}

/// Who may publish on a topic from a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// No client (the backend publishes through the server API).
    Nobody,
    /// The topic's subscribers.
    Subscribers,
    /// Signed-in users.
    Users,
    /// Whoever the backend's `[proxy] publish_url` allows, with the data
    /// it answers.
    Proxy,
}

/// `[proxy]`: the application's backend in the loop, over HTTP. Every
/// URL is optional; each call is a `POST` with a JSON body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Decides who a connection without a valid JWT is.
    pub connect_url: Option<String>,
    /// Extends a connection's identity before it expires.
    pub refresh_url: Option<String>,
    /// Decides subscriptions to topics with `subscribe = "proxy"`.
    pub subscribe_url: Option<String>,
    /// Decides (and may rewrite) publications on topics with
    /// `publish = "proxy"`.
    pub publish_url: Option<String>,
    /// Answers the events `rpc_events` names.
    pub rpc_url: Option<String>,
    /// Event names (or patterns with `*`) forwarded to `rpc_url`.
    pub rpc_events: Vec<String>,
    /// Receives lifecycle notifications, batched.
    pub events_url: Option<String>,
    /// Which: `user.online`, `user.offline`, `connection.closed`.
    pub events: Vec<String>,
    /// How long a user's last connection must stay closed before
    /// `user.offline` (a page reload is not an offline).
    pub offline_grace_ms: u64,
    /// Notifications waiting to be sent; past this they are dropped and
    /// counted.
    pub events_queue: usize,
    /// Notifications per `POST` at most.
    pub events_batch: usize,
    /// Handshake headers forwarded to `connect_url` (e.g. `Cookie`).
    pub headers: Vec<String>,
    /// Headers sent with every call (a shared secret the backend checks).
    pub static_headers: BTreeMap<String, String>,
    /// Deadline of one call.
    pub timeout_ms: u64,
    /// Calls in flight at once, every kind together; past this a call
    /// waits for a slot within its deadline (`timeout` past it).
    pub max_concurrent: usize,
    /// Consecutive failures that open the circuit breaker.
    pub breaker_failures: u32,
    /// How long the breaker stays open before a trial call.
    pub breaker_cooldown_ms: u64,
    /// Largest answer read, in bytes.
    pub max_response_bytes: usize,
}

impl ProxyConfig {
    /// Lifecycle notifications the backend may ask for.
    pub const EVENTS: [&'static str; 3] = ["user.online", "user.offline", "connection.closed"];

    /// Checks what parses but cannot work, naming the setting.
    fn validate(&self) -> Result<(), ConfigError> {
        for (key, url) in [
            ("proxy.connect_url", &self.connect_url),
            ("proxy.refresh_url", &self.refresh_url),
            ("proxy.subscribe_url", &self.subscribe_url),
            ("proxy.publish_url", &self.publish_url),
            ("proxy.rpc_url", &self.rpc_url),
            ("proxy.events_url", &self.events_url),
        ] {
            if let Some(url) = url {
                check_http_url(key, url)?;
            }
        }
        if !self.rpc_events.is_empty() && self.rpc_url.is_none() {
            return Err(ConfigError::invalid(
                "proxy.rpc_events",
                "needs proxy.rpc_url: where should the events go?",
            ));
        }
        if let Some(bad) = self.rpc_events.iter().find(|e| {
            e.is_empty() || e.len() > 128 || e.chars().any(|c| c.is_whitespace() || c.is_control())
        }) {
            return Err(ConfigError::invalid(
                "proxy.rpc_events",
                format!("{bad:?} is not an event name or pattern (1 to 128 characters, no spaces)"),
            ));
        }
        if let Some(bad) = self
            .events
            .iter()
            .find(|e| !Self::EVENTS.contains(&e.as_str()))
        {
            return Err(ConfigError::invalid(
                "proxy.events",
                format!("{bad:?} is not one of {}", Self::EVENTS.join(", ")),
            ));
        }
        for h in &self.headers {
            if axum::http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(ConfigError::invalid(
                    "proxy.headers",
                    format!("{h:?} is not a header name"),
                ));
            }
        }
        for (name, value) in &self.static_headers {
            if axum::http::HeaderName::from_bytes(name.as_bytes()).is_err()
                || axum::http::HeaderValue::from_str(value).is_err()
            {
                return Err(ConfigError::invalid(
                    &format!("proxy.static_headers.{name}"),
                    "is not a header name with a header value",
                ));
            }
        }
        let ranges: [(&str, u64, u64, u64); 7] = [
            ("proxy.timeout_ms", self.timeout_ms, 1, 600_000),
            (
                "proxy.max_concurrent",
                self.max_concurrent as u64,
                1,
                1_000_000,
            ),
            (
                "proxy.breaker_failures",
                u64::from(self.breaker_failures),
                1,
                1_000_000,
            ),
            (
                "proxy.breaker_cooldown_ms",
                self.breaker_cooldown_ms,
                1,
                3_600_000,
            ),
            (
                "proxy.events_queue",
                self.events_queue as u64,
                1,
                10_000_000,
            ),
            ("proxy.events_batch", self.events_batch as u64, 1, 100_000),
            (
                "proxy.max_response_bytes",
                self.max_response_bytes as u64,
                1,
                64 << 20,
            ),
        ];
        for (key, value, min, max) in ranges {
            if !(min..=max).contains(&value) {
                return Err(ConfigError::invalid(
                    key,
                    format!("must be from {min} to {max}"),
                ));
            }
        }
        if self.offline_grace_ms > 3_600_000 {
            return Err(ConfigError::invalid(
                "proxy.offline_grace_ms",
                "must be at most 3600000",
            ));
        }
        Ok(())
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_url: None,
            refresh_url: None,
            subscribe_url: None,
            publish_url: None,
            rpc_url: None,
            rpc_events: Vec::new(),
            events_url: None,
            events: vec!["user.online".into(), "user.offline".into()],
            offline_grace_ms: 5_000,
            events_queue: 10_000,
            events_batch: 100,
            headers: vec!["Cookie".into(), "Authorization".into()],
            static_headers: BTreeMap::new(),
            timeout_ms: 3_000,
            max_concurrent: 256,
            breaker_failures: 5,
            breaker_cooldown_ms: 5_000,
            max_response_bytes: 1 << 20,
        }
    }
}

/// `[sse]`: the fallback transport for clients that cannot open a
/// WebSocket: `GET /sse` streams server → client, `POST /sse/SESSION`
/// carries client → server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SseConfig {
    /// Whether `/sse` is served.
    pub enabled: bool,
    /// Most SSE sessions at once; past this `GET /sse` answers 503.
    pub max_sessions: usize,
}

impl Default for SseConfig {
    fn default() -> Self {
        SseConfig {
            enabled: true,
            max_sessions: 100_000,
        }
    }
}

/// What a cluster node does when Redis cannot be reached at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterStartup {
    /// Start anyway, serve local connections, and join the cluster once
    /// Redis answers (`/healthz` says "degraded" until then).
    #[default]
    Degraded,
    /// Refuse to start (exit 2) until Redis answers.
    Refuse,
}

/// `[cluster]`: many gale nodes serving as one over Redis.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// `redis://…` or `rediss://…`; several seed URLs (separated by commas
    /// or spaces) for a Redis Cluster. Unset: a single node.
    pub redis_url: Option<String>,
    /// This node's name in logs, metrics and presence; generated when
    /// unset.
    pub node_id: Option<String>,
    /// Namespace of every key and channel.
    pub prefix: String,
    /// A node that stops refreshing its presence disappears after this.
    pub presence_ttl_s: u64,
    /// Deadline of every Redis call on a request's path.
    pub call_timeout_ms: u64,
    /// How often the subscriber connection is probed end to end.
    pub probe_interval_ms: u64,
    /// Cross-node messages waiting to be sent to Redis; past this they are
    /// counted as lost.
    pub publish_queue: usize,
    /// Messages from other nodes waiting to be handed out here; past this
    /// they are counted as lost.
    pub receive_queue: usize,
    /// Most messages sent to Redis in one pipeline.
    pub publish_batch: usize,
    /// Whether a node starts when Redis is unreachable.
    pub startup: ClusterStartup,
    /// The status `/healthz` answers while the node is degraded (Redis
    /// unreachable): 503 takes it out of a load balancer, 200 keeps it in.
    pub degraded_status: u16,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            redis_url: None,
            node_id: None,
            prefix: "gale".to_owned(),
            presence_ttl_s: 15,
            call_timeout_ms: 1_000,
            probe_interval_ms: 1_000,
            publish_queue: 100_000,
            receive_queue: 10_000,
            publish_batch: 512,
            startup: ClusterStartup::Degraded,
            degraded_status: 503,
        }
    }
}

impl ClusterConfig {
    /// The configured Redis URLs; empty in single-node mode.
    pub fn redis_urls(&self) -> Vec<String> {
        self.redis_url
            .as_deref()
            .unwrap_or("")
            .split([',', ' '])
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Whether cluster mode is on.
    pub fn enabled(&self) -> bool {
        !self.redis_urls().is_empty()
    }
}

/// `[broadcast]`: the batching broadcast queue and topic limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BroadcastConfig {
    /// Most broadcasts delivered together.
    pub batch_size: usize,
    /// How long the delivery task gathers a batch after its first message.
    pub batch_window_ms: u64,
    /// Broadcasts waiting for delivery; past this they are dropped and
    /// counted.
    pub queue_size: usize,
    /// Most topics on the node.
    pub max_topics: usize,
    /// Most topics one connection may subscribe to.
    pub max_topics_per_connection: usize,
    /// The part (0–1) of `max_topics` one client (a signed-in user, or an
    /// anonymous client address) may bring into existence on the node, so
    /// no one client can take them all.
    pub max_topics_share: f64,
    /// Helper threads that write chunks of a push to 1,024 recipients or
    /// more beside the thread delivering it, when each gets that one push.
    /// `"auto"`: the runtime's worker threads less one; 0: none, every
    /// fan-out on one thread.
    pub fanout_threads: Threads,
}

impl Default for BroadcastConfig {
    fn default() -> Self {
        BroadcastConfig {
            batch_size: 256,
            batch_window_ms: 2,
            queue_size: 10_000,
            max_topics: 100_000,
            max_topics_per_connection: 64,
            max_topics_share: 0.1,
            fanout_threads: Threads::Auto,
        }
    }
}

/// `[api]`: the backend-facing HTTP API.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Bearer key for the server API (`POST /api/…`); the API is off
    /// when unset.
    pub key: Option<String>,
    /// A second key that may only read: presence, presence_stats,
    /// history, topics, info.
    pub read_key: Option<String>,
}

/// `[auth]`: JSON Web Tokens presented at the handshake.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 shared secret.
    pub jwt_secret: Option<String>,
    /// PEM public key for RS256 or EdDSA (Ed25519) tokens.
    pub jwt_public_key_file: Option<std::path::PathBuf>,
    /// Refuse connections without a valid token.
    pub required: bool,
    /// Accepted `aud` values: a token must name one of them. Empty: `aud`
    /// is not checked.
    pub audience: Vec<String>,
    /// Accepted `iss` values: a token must carry one of them. Empty: `iss`
    /// is not checked.
    pub issuer: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_s: u64,
    /// Close a connection once its token has expired (1008, within a ping
    /// interval of `exp` + leeway). Off: a token is checked at the
    /// handshake only.
    pub close_on_expiry: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt_secret: None,
            jwt_public_key_file: None,
            required: false,
            audience: Vec::new(),
            issuer: Vec::new(),
            leeway_s: 30,
            close_on_expiry: true,
        }
    }
}

/// `server.compression`: whether permessage-deflate may be agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Never compress.
    Off,
    /// Agree to permessage-deflate when the client offers it.
    Deflate,
}

impl<'de> Deserialize<'de> for Compression {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Flag(bool),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Flag(on) => Ok(if on {
                Compression::Deflate
            } else {
                Compression::Off
            }),
            Raw::Name(n) => match n.to_ascii_lowercase().as_str() {
                "deflate" | "permessage-deflate" | "on" | "true" => Ok(Compression::Deflate),
                "off" | "none" | "false" => Ok(Compression::Off),
                other => Err(serde::de::Error::custom(format!(
                    "unknown compression {other:?}: use \"deflate\" or \"off\""
                ))),
            },
        }
    }
}

/// A number of threads, or `"auto"` for one the runtime decides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Threads {
    /// Decided by the runtime: for `broadcast.fanout_threads`, its worker
    /// threads less one.
    #[default]
    Auto,
    /// This many.
    Count(usize),
}

impl Serialize for Threads {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Threads::Auto => s.serialize_str("auto"),
            Threads::Count(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for Threads {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(i64),
            Name(String),
        }
        let bad = |what: &dyn std::fmt::Display| {
            serde::de::Error::custom(format!(
                "expected \"auto\" or a whole number of threads (0 or more), got {what}"
            ))
        };
        match Raw::deserialize(d)? {
            Raw::Count(n) => usize::try_from(n).map(Threads::Count).map_err(|_| bad(&n)),
            Raw::Name(name) => match name.trim() {
                n if n.eq_ignore_ascii_case("auto") => Ok(Threads::Auto),
                // From an environment variable, a number comes as text.
                n => n
                    .parse()
                    .map(Threads::Count)
                    .map_err(|_| bad(&format!("{name:?}"))),
            },
        }
    }
}

/// `[server]`: the listener and per-connection limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on, `host:port`.
    pub listen: String,
    /// Largest WebSocket message accepted; larger ones close the
    /// connection with 1009. The default carries a `notes.save` of the
    /// largest note (100,000 bytes of content).
    pub max_message_bytes: usize,
    /// Largest message the server sends: a push, a reply. What would be
    /// larger is refused where it enters (413 from the publish API, an
    /// error reply, a paged `notes.list`), never by dropping a recipient.
    /// Every connection can carry one this large at any time.
    pub max_outbound_message_bytes: usize,
    /// Most TCP connections held at once; further clients wait in the
    /// kernel's accept backlog until one closes.
    pub max_connections: usize,
    /// Most WebSocket connections one client address may hold at once
    /// (IPv6 by /64); past it the handshake is answered 503. 0: no limit.
    /// The default sits above what one source address can open to one
    /// port (~28,000 ephemeral ports), so it never limits a benchmark.
    pub max_connections_per_ip: usize,
    /// WebSocket handshakes one client address may make per second (a
    /// second's worth may come at once); past it the handshake is
    /// answered 429 with `Retry-After`. 0: no limit.
    pub handshake_rate_per_ip: u32,
    /// WebSocket and SSE handshakes the whole node accepts per second (a
    /// second's worth may come at once); past it a handshake is answered
    /// 503 with a jittered `Retry-After`, so a reconnect wave (another
    /// node draining into this one) is spread out instead of accepted
    /// into overload. 0: no limit.
    pub handshake_rate: u32,
    /// How long shutdown waits for in-flight work before giving up.
    pub shutdown_grace_ms: u64,
    /// On shutdown, close the connections spread evenly over this many
    /// seconds (close code 1012, with a suggested reconnect delay), with
    /// `/healthz` answering 503 `draining` from the first moment, so
    /// clients come back gradually to the nodes that stay. 0: close them
    /// all at once (1001).
    pub drain_s: u64,
    /// The largest reconnect delay a drain suggests: each connection's
    /// close reason carries `{"reconnect_ms":N}`, N drawn uniformly from
    /// 0 to this.
    pub drain_reconnect_ms: u64,
    /// A Unix socket path on which this server listens for a takeover:
    /// `gale serve --takeover` started with the same setting connects
    /// here and is handed the listening socket and every live WebSocket
    /// connection, which carry on without a reconnect. Only the same user
    /// (or root) may connect. Empty (the default): no takeover.
    pub handoff_socket: String,
    /// How long a client has to send a request head (from the accept, or
    /// from the previous response on a kept-alive connection), a request
    /// body, and to complete a WebSocket upgrade; past it the socket is
    /// closed and counted, so stalled sockets cannot hold every
    /// connection permit.
    pub handshake_timeout_ms: u64,
    /// A PEM file with the certificate chain (leaf first) to serve TLS
    /// with: set it and `tls_key` and every connection is TLS (`wss://`,
    /// `https://`). Unset (the default), gale speaks plain TCP, for a
    /// proxy in front to terminate TLS.
    pub tls_cert: Option<String>,
    /// The PEM file with `tls_cert`'s private key.
    pub tls_key: Option<String>,
    /// Every this many seconds a connection silent for half of it is
    /// pinged; a peer that leaves a ping unanswered for a whole interval
    /// is dropped. 0 disables pings.
    pub ping_interval_s: u64,
    /// Requests one connection may have in flight; past this the server
    /// stops reading from that connection until one completes.
    pub max_inflight_per_connection: usize,
    /// Per-connection read buffer. Small by design: each idle connection
    /// holds one (512 rather than 1024 B took 19,000 idle connections from
    /// 4.31 to 3.81 KiB each, 256 rather than 512 from 3.27 to 2.98, at no
    /// measured cost in replies/s). A larger message takes more reads.
    pub read_buffer_bytes: usize,
    /// Accepted and ignored, so existing files still load: it sized
    /// tungstenite's write buffer, and gale's own socket has none (queued
    /// frames go out from the buffers they were framed in, in one
    /// vectored write).
    pub write_buffer_bytes: usize,
    /// The kernel send buffer (`SO_SNDBUF`) of each accepted socket. 0,
    /// the default, lets the kernel size it, and Linux grows it with the
    /// connection's window (to `net.ipv4.tcp_wmem`'s maximum, 4 MiB here):
    /// a client that stops reading can then hold that much kernel memory
    /// before gale's own queue (`connection.outbound_queue`) sees any back
    /// pressure. A fixed size (e.g. 65536) bounds it, at some cost to one
    /// connection's throughput on long fat links.
    pub send_buffer_bytes: usize,
    /// permessage-deflate (RFC 7692): `"deflate"` agrees to it when a
    /// client offers it, `"off"` never does (`true`/`false` also work).
    /// Agreed without context takeover either way, so a compressed
    /// connection keeps no compression state while idle.
    pub compression: Compression,
    /// Messages shorter than this go out uncompressed even on a
    /// compressed connection (small JSON barely shrinks and still costs
    /// a compression).
    pub compression_min_bytes: usize,
    /// Serve `GET /echo`: every message sent back on the same connection
    /// stack as `/ws` (the bare-echo baseline and the conformance target).
    pub echo: bool,
    /// Origins allowed to open a WebSocket (`"*"` allows any). Empty: the
    /// server's own host and localhost. Handshakes without an Origin
    /// header (non-browser clients) are always allowed.
    pub allowed_origins: Vec<String>,
    /// Proxies (addresses or blocks like `10.0.0.0/8`) whose
    /// `X-Forwarded-For` names the client; from anyone else the header is
    /// ignored and the TCP peer is the client.
    pub trusted_proxies: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".to_owned(),
            max_message_bytes: 131_072,
            max_outbound_message_bytes: MIN_OUTBOUND_MESSAGE_BYTES,
            max_connections: 50_000,
            max_connections_per_ip: 30_000,
            handshake_rate_per_ip: 10_000,
            handshake_rate: 0,
            shutdown_grace_ms: 30_000,
            drain_s: 0,
            drain_reconnect_ms: 5_000,
            handoff_socket: String::new(),
            handshake_timeout_ms: 10_000,
            tls_cert: None,
            tls_key: None,
            ping_interval_s: 30,
            max_inflight_per_connection: 32,
            read_buffer_bytes: 256,
            write_buffer_bytes: 4096,
            send_buffer_bytes: 0,
            compression: Compression::Deflate,
            compression_min_bytes: 256,
            allowed_origins: Vec::new(),
            trusted_proxies: Vec::new(),
            echo: false,
        }
    }
}

impl ServerConfig {
    /// The shutdown grace period.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    /// `trusted_proxies`, parsed.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `server.trusted_proxies` for an
    /// entry that is neither an address nor a block.
    pub fn trusted_proxies(&self) -> Result<Vec<crate::cidr::Cidr>, ConfigError> {
        self.trusted_proxies
            .iter()
            .map(|p| crate::cidr::Cidr::parse(p))
            .collect::<Result<_, _>>()
            .map_err(|m| ConfigError::invalid("server.trusted_proxies", m))
    }

    /// The handshake deadline.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
}

/// `[router]`: the worker pool that runs event handlers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    /// Worker tasks running handlers; each runs one handler at a time.
    pub workers: usize,
    /// Most events queued for the workers, all priorities together.
    pub queue_size: usize,
    /// Queue fill (0–1) above which a warning is logged and counted.
    pub alert_threshold: f64,
    /// Queue fill (0–1) above which new events are refused with
    /// `system_overloaded`.
    pub drop_threshold: f64,
    /// Events per second accepted by the whole node; 0 means no limit.
    pub global_rate_limit: u32,
    /// Anonymous callers' per-event limits count per connection and per
    /// client address; the address may use this many times the event's
    /// rate for each connection it holds open.
    pub address_limit_factor: u32,
    /// The part (0–1) of `global_rate_limit` one client address may take
    /// (or its part of the node's connections, when larger), so one
    /// client cannot spend the whole node's budget.
    pub global_rate_share: f64,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            workers: 512,
            queue_size: 10_000,
            alert_threshold: 0.7,
            drop_threshold: 0.9,
            global_rate_limit: 50_000,
            address_limit_factor: 1,
            global_rate_share: 0.1,
        }
    }
}

/// What to do with a client that reads too slowly to keep up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlowConsumer {
    /// Drop the oldest queued pushes (never replies), counting each.
    #[serde(rename = "drop_oldest")]
    DropOldest,
    /// Close the connection with 1013 (try again later).
    #[serde(rename = "close")]
    Close,
}

/// `[connection]`: the per-connection outbound queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionConfig {
    /// Messages queued for one connection before the slow-consumer policy
    /// applies.
    pub outbound_queue: usize,
    /// The policy when that queue is full.
    pub slow_consumer: SlowConsumer,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            outbound_queue: 256,
            slow_consumer: SlowConsumer::DropOldest,
        }
    }
}

/// Handler priority: under load, high runs before normal before low.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Runs first.
    High = 0,
    /// The default.
    Normal = 1,
    /// Runs when nothing else waits.
    Low = 2,
}

/// `[events."NAME"]`: overrides of one event's built-in policy.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventOverride {
    /// `"N/s"`, `"N/min"` or `"N/h"`; `"off"` removes the limit.
    pub rate_limit: Option<String>,
    /// Handler deadline.
    pub timeout_ms: Option<u64>,
    /// `"high"`, `"normal"` or `"low"`.
    pub priority: Option<Priority>,
    /// Refuse anonymous connections.
    pub requires_auth: Option<bool>,
    /// Refuse users without this role.
    pub requires_role: Option<String>,
}

/// A rate: `count` events per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Events allowed in one window.
    pub count: u32,
    /// The window.
    pub per: Duration,
}

impl Rate {
    /// This rate with `factor` times the count.
    pub fn times(self, factor: u32) -> Rate {
        Rate {
            count: self.count.saturating_mul(factor),
            per: self.per,
        }
    }

    /// Parses `"20/min"`, `"5/s"`, `"100/h"`.
    ///
    /// # Errors
    /// A message saying what is expected.
    pub fn parse(text: &str) -> Result<Rate, String> {
        let bad = || format!("{text:?} is not a rate like \"20/min\", \"5/s\" or \"100/h\"");
        let (n, unit) = text.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        if count == 0 {
            return Err(format!(
                "{text:?}: the count must be at least 1 (or use \"off\")"
            ));
        }
        Ok(Rate { count, per })
    }
}

/// The least `server.max_outbound_message_bytes` may be: room for the
/// largest note (100,000 bytes of content, escaped, plus its title and 100
/// collaborators) in one push or one `notes.list` page.
pub const MIN_OUTBOUND_MESSAGE_BYTES: usize = 1 << 20;

/// The most `server.max_outbound_message_bytes` may be: the largest frame
/// common client libraries accept by default (tungstenite: 16 MiB).
pub const MAX_OUTBOUND_MESSAGE_BYTES: usize = 16 << 20;

/// An application's own sections of the configuration, read from the
/// same file and `GALE_<SECTION>__<KEY>` variables as the engine's and
/// checked the same way: a struct whose fields are top-level sections
/// (`[weather]`, `[chat]`), each with defaults.
///
/// ```
/// use gale_engine::config::{Config, ConfigError, Sections, check_ranges};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Default, Serialize, Deserialize)]
/// #[serde(default, deny_unknown_fields)]
/// struct Mine {
///     chat: Chat,
/// }
///
/// #[derive(Debug, Serialize, Deserialize)]
/// #[serde(default, deny_unknown_fields)]
/// struct Chat {
///     max_rooms: u64,
/// }
///
/// impl Default for Chat {
///     fn default() -> Self {
///         Chat { max_rooms: 100 }
///     }
/// }
///
/// impl Sections for Mine {
///     fn validate(&self, _engine: &Config) -> Result<(), ConfigError> {
///         check_ranges(&[("chat.max_rooms", self.chat.max_rooms, 1, 10_000)])
///     }
/// }
///
/// let env = [("GALE_CHAT__MAX_ROOMS".to_owned(), "7".to_owned())];
/// let (engine, mine) =
///     Config::from_text_with::<Mine>("[server]\nlisten = \"127.0.0.1:0\"", "gale.toml", env)?;
/// assert_eq!(engine.server.listen, "127.0.0.1:0");
/// assert_eq!(mine.chat.max_rooms, 7);
///
/// let e = Config::from_text_with::<Mine>("[chat]\nmax_roms = 1", "gale.toml", []).unwrap_err();
/// assert!(e.to_string().contains("did you mean chat.max_rooms?"), "{e}");
/// # Ok::<(), ConfigError>(())
/// ```
pub trait Sections: Serialize + serde::de::DeserializeOwned + Default {
    /// Checks values that parse but cannot work, as
    /// [`Config::validate`] does for the engine's (see [`check_ranges`]).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad setting.
    fn validate(&self, engine: &Config) -> Result<(), ConfigError> {
        let _ = engine;
        Ok(())
    }
}

/// No sections of an application's own: the engine's configuration
/// alone.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct NoSections {}

impl Sections for NoSections {}

impl Config {
    /// Loads the configuration: defaults, then `file` if given, then the
    /// process environment.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file, variable or setting at fault.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// As [`Config::load`], with the environment given explicitly (tests).
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file, variable or setting at fault.
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        Self::load_with::<NoSections>(file, env).map(|(config, _)| config)
    }

    /// As [`Config::load_from`], from a file's text rather than its path
    /// (errors name the file as `path`). What the config fuzz target runs.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the line, variable or setting at fault.
    pub fn from_text(
        text: &str,
        path: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        Self::from_text_with::<NoSections>(text, path, env).map(|(config, _)| config)
    }

    /// Loads the engine's configuration and the application's sections
    /// `A` from the same sources: defaults, then `file` if given, then
    /// `env` (`GALE_<SECTION>__<KEY>`, for either).
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file, variable or setting at fault.
    pub fn load_with<A: Sections>(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, A), ConfigError> {
        let table = match file {
            Some(path) => read_file(path)?,
            None => toml::Table::new(),
        };
        Self::from_table(table, env)
    }

    /// As [`Config::load_with`], from a file's text (errors name the file
    /// as `path`).
    ///
    /// # Errors
    /// A [`ConfigError`] naming the line, variable or setting at fault.
    pub fn from_text_with<A: Sections>(
        text: &str,
        path: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, A), ConfigError> {
        Self::from_table(parse_text(text, path)?, env)
    }

    fn from_table<A: Sections>(
        mut table: toml::Table,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, A), ConfigError> {
        let defaults_of = |v: Result<toml::Table, toml::ser::Error>| {
            v.map_err(|e| ConfigError::Invalid {
                key: "(defaults)".into(),
                message: e.to_string(),
            })
        };
        let mut defaults = defaults_of(toml::Table::try_from(Config::default()))?;
        let theirs = defaults_of(toml::Table::try_from(A::default()))?;
        let sections: Vec<String> = theirs.keys().cloned().collect();
        defaults.extend(theirs);
        let from_env = apply_env(&mut table, &defaults, env)?;
        let mut own = toml::Table::new();
        for name in &sections {
            if let Some(section) = table.remove(name) {
                own.insert(name.clone(), section);
            }
        }
        let config: Config = deserialize(table, &from_env, &sections)?;
        let app: A = deserialize(own, &from_env, &[])?;
        config.validate()?;
        app.validate(&config)?;
        Ok((config, app))
    }

    /// Checks values that parse but cannot work.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // Every number within what the server can actually run with: a
        // zero that would build an empty channel, a huge value that would
        // overflow a deadline or spawn without end, is refused here by
        // name (exit 2) rather than panicking later. Bounds are wide;
        // they only exclude values that cannot work.
        const DAY_S: u64 = 86_400;
        const HOUR_MS: u64 = 3_600_000;
        const MIB: u64 = 1 << 20;
        let (s, r) = (&self.server, &self.router);
        let (c, b) = (&self.connection, &self.broadcast);
        let n = |v: usize| v as u64;
        let ranges: &[(&str, u64, u64, u64)] = &[
            (
                "server.max_message_bytes",
                n(s.max_message_bytes),
                1,
                64 * MIB,
            ),
            (
                "server.max_outbound_message_bytes",
                n(s.max_outbound_message_bytes),
                n(MIN_OUTBOUND_MESSAGE_BYTES),
                n(MAX_OUTBOUND_MESSAGE_BYTES),
            ),
            (
                "server.max_connections",
                n(s.max_connections),
                1,
                10_000_000,
            ),
            ("server.shutdown_grace_ms", s.shutdown_grace_ms, 0, HOUR_MS),
            ("server.drain_s", s.drain_s, 0, DAY_S),
            (
                "server.drain_reconnect_ms",
                s.drain_reconnect_ms,
                0,
                HOUR_MS,
            ),
            (
                "server.handshake_timeout_ms",
                s.handshake_timeout_ms,
                1,
                HOUR_MS,
            ),
            ("server.ping_interval_s", s.ping_interval_s, 0, DAY_S),
            ("auth.leeway_s", self.auth.leeway_s, 0, DAY_S),
            (
                "server.max_inflight_per_connection",
                n(s.max_inflight_per_connection),
                1,
                100_000,
            ),
            (
                "server.read_buffer_bytes",
                n(s.read_buffer_bytes),
                256,
                16 * MIB,
            ),
            (
                "server.send_buffer_bytes",
                n(s.send_buffer_bytes),
                0,
                64 * MIB,
            ),
            (
                "server.write_buffer_bytes",
                n(s.write_buffer_bytes),
                1,
                16 * MIB,
            ),
            (
                "server.max_connections_per_ip",
                n(s.max_connections_per_ip),
                0,
                10_000_000,
            ),
            (
                "server.handshake_rate_per_ip",
                u64::from(s.handshake_rate_per_ip),
                0,
                10_000_000,
            ),
            (
                "server.compression_min_bytes",
                n(s.compression_min_bytes),
                0,
                64 * MIB,
            ),
            ("router.workers", n(r.workers), 1, 100_000),
            ("router.queue_size", n(r.queue_size), 1, 10_000_000),
            (
                "router.global_rate_limit",
                u64::from(r.global_rate_limit),
                0,
                u64::from(u32::MAX),
            ),
            (
                "router.address_limit_factor",
                u64::from(r.address_limit_factor),
                1,
                1_000_000,
            ),
            (
                "connection.outbound_queue",
                n(c.outbound_queue),
                1,
                1_000_000,
            ),
            ("broadcast.batch_size", n(b.batch_size), 1, 100_000),
            ("broadcast.batch_window_ms", b.batch_window_ms, 0, 1_000),
            ("broadcast.queue_size", n(b.queue_size), 1, 10_000_000),
            ("broadcast.max_topics", n(b.max_topics), 0, 100_000_000),
            (
                "broadcast.fanout_threads",
                match b.fanout_threads {
                    Threads::Auto => 0,
                    Threads::Count(c) => n(c),
                },
                0,
                1_024,
            ),
            ("history.max_bytes", n(self.history.max_bytes), 0, 1 << 40),
            (
                "history.max_streams",
                n(self.history.max_streams),
                1,
                100_000_000,
            ),
            (
                "history.meta_ttl_s",
                self.history.meta_ttl_s,
                1,
                366 * DAY_S,
            ),
            ("sse.max_sessions", n(self.sse.max_sessions), 1, 100_000_000),
            (
                "broadcast.max_topics_per_connection",
                n(b.max_topics_per_connection),
                0,
                100_000,
            ),
            (
                "cluster.presence_ttl_s",
                self.cluster.presence_ttl_s,
                3,
                DAY_S,
            ),
            (
                "cluster.call_timeout_ms",
                self.cluster.call_timeout_ms,
                1,
                60_000,
            ),
            (
                "cluster.probe_interval_ms",
                self.cluster.probe_interval_ms,
                100,
                HOUR_MS,
            ),
            (
                "cluster.publish_queue",
                n(self.cluster.publish_queue),
                1,
                10_000_000,
            ),
            (
                "cluster.receive_queue",
                n(self.cluster.receive_queue),
                1,
                10_000_000,
            ),
            (
                "cluster.publish_batch",
                n(self.cluster.publish_batch),
                1,
                100_000,
            ),
            (
                "cluster.degraded_status",
                u64::from(self.cluster.degraded_status),
                200,
                599,
            ),
        ];
        check_ranges(ranges)?;
        s.trusted_proxies()?;
        if s.listen.trim().is_empty() {
            return Err(ConfigError::invalid("server.listen", "must be host:port"));
        }

        for (key, v) in [
            ("router.alert_threshold", r.alert_threshold),
            ("router.drop_threshold", r.drop_threshold),
            ("router.global_rate_share", r.global_rate_share),
            (
                "broadcast.max_topics_share",
                self.broadcast.max_topics_share,
            ),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                return Err(ConfigError::invalid(key, "must be above 0 and at most 1"));
            }
        }
        for (pattern, t) in &self.topics {
            let key = |k: &str| format!("topics.\"{pattern}\".{k}");
            if pattern.is_empty() {
                return Err(ConfigError::invalid("topics", "a topic pattern is empty"));
            }
            if t.history_size.unwrap_or(0) > 100_000 {
                return Err(ConfigError::invalid(
                    &key("history_size"),
                    "must be at most 100000",
                ));
            }
            if t.history_size.unwrap_or(0) > 0
                && !(1..=366 * DAY_S).contains(&t.history_ttl_s.unwrap_or(0))
            {
                return Err(ConfigError::invalid(
                    &key("history_ttl_s"),
                    format!("must be from 1 to {} when history_size is set", 366 * DAY_S),
                ));
            }
        }
        for (name, o) in &self.events {
            if let Some(rate) = o.rate_limit.as_deref().filter(|r| *r != "off") {
                Rate::parse(rate).map_err(|m| {
                    ConfigError::invalid(&format!("events.\"{name}\".rate_limit"), m)
                })?;
            }
            if o.timeout_ms.is_some_and(|t| !(1..=HOUR_MS).contains(&t)) {
                return Err(ConfigError::invalid(
                    &format!("events.\"{name}\".timeout_ms"),
                    format!("must be from 1 to {HOUR_MS}"),
                ));
            }
        }
        match (&s.tls_cert, &s.tls_key) {
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "server.tls_key",
                    "is missing: server.tls_cert is set, and TLS needs both",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "server.tls_cert",
                    "is missing: server.tls_key is set, and TLS needs both",
                ));
            }
            _ => {}
        }
        if let Some(key) = &self.api.key
            && key.chars().count() < MIN_API_KEY_CHARS
        {
            return Err(ConfigError::invalid(
                "api.key",
                format!(
                    "must be at least {MIN_API_KEY_CHARS} characters (it guards pushes to every user)"
                ),
            ));
        }
        if let Some(key) = &self.api.read_key {
            if key.chars().count() < MIN_API_KEY_CHARS {
                return Err(ConfigError::invalid(
                    "api.read_key",
                    format!("must be at least {MIN_API_KEY_CHARS} characters"),
                ));
            }
            if self.api.key.is_none() {
                return Err(ConfigError::invalid(
                    "api.read_key",
                    "needs api.key: the API is off without it",
                ));
            }
        }
        self.proxy.validate()?;
        // A topic the backend decides needs the backend's endpoint.
        for (name, t) in &self.topics {
            if t.subscribe == Some(SubscribeMode::Proxy) && self.proxy.subscribe_url.is_none() {
                return Err(ConfigError::invalid(
                    &format!("topics.\"{name}\".subscribe"),
                    "is \"proxy\": set proxy.subscribe_url (the backend that decides)",
                ));
            }
            if t.publish == Some(PublishMode::Proxy) && self.proxy.publish_url.is_none() {
                return Err(ConfigError::invalid(
                    &format!("topics.\"{name}\".publish"),
                    "is \"proxy\": set proxy.publish_url (the backend that decides)",
                ));
            }
        }
        for url in self.cluster.redis_urls() {
            check_redis_url(&url)?;
        }
        if self.cluster.redis_url.is_some() && !self.cluster.enabled() {
            return Err(ConfigError::invalid(
                "cluster.redis_url",
                "is empty: remove it for a single node, or give redis://HOST:PORT",
            ));
        }
        let p = &self.cluster.prefix;
        if p.is_empty() || p.len() > 64 || p.contains(['{', '}', ' ', ':']) {
            return Err(ConfigError::invalid(
                "cluster.prefix",
                "must be 1 to 64 characters, without spaces, ':', '{' or '}'",
            ));
        }
        if let Some(id) = &self.cluster.node_id
            && (id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_graphic()))
        {
            return Err(ConfigError::invalid(
                "cluster.node_id",
                "must be 1 to 64 printable ASCII characters without spaces",
            ));
        }
        Ok(())
    }
}

/// The shortest `[api] key` accepted.
pub const MIN_API_KEY_CHARS: usize = 16;

/// Checks that each `(key, value, min, max)` has its value within
/// `min..=max`; the error names the first that does not. How every
/// section (the engine's and the applications') bounds its numbers.
///
/// ```
/// use gale_engine::config::check_ranges;
/// assert!(check_ranges(&[("chat.max_rooms", 10, 1, 1_000)]).is_ok());
/// let e = check_ranges(&[("chat.max_rooms", 0, 1, 1_000)]).unwrap_err();
/// assert_eq!(e.to_string(), "invalid setting chat.max_rooms: must be greater than 0");
/// ```
///
/// # Errors
/// [`ConfigError::Invalid`] naming the setting out of range.
pub fn check_ranges(ranges: &[(&str, u64, u64, u64)]) -> Result<(), ConfigError> {
    for &(key, value, min, max) in ranges {
        if !(min..=max).contains(&value) {
            let message = match (min, max) {
                (1, _) if value == 0 => "must be greater than 0".to_owned(),
                _ => format!("must be from {min} to {max}"),
            };
            return Err(ConfigError::invalid(key, message));
        }
    }
    Ok(())
}

/// Checks that `value` is an `http://` or `https://` URL with a host.
///
/// # Errors
/// [`ConfigError::Invalid`] naming `key`.
pub fn check_http_url(key: &str, value: &str) -> Result<(), ConfigError> {
    let url = url::Url::parse(value)
        .map_err(|e| ConfigError::invalid(key, format!("{value:?} is not a URL: {e}")))?;
    match url.scheme() {
        "http" | "https" if url.host().is_some() => Ok(()),
        _ => Err(ConfigError::invalid(
            key,
            format!("{value:?} must be an http:// or https:// URL with a host"),
        )),
    }
}

fn check_redis_url(value: &str) -> Result<(), ConfigError> {
    let url = url::Url::parse(value).map_err(|e| {
        ConfigError::invalid("cluster.redis_url", format!("{value:?} is not a URL: {e}"))
    })?;
    match url.scheme() {
        "redis" | "rediss" if url.host().is_some() => Ok(()),
        _ => Err(ConfigError::invalid(
            "cluster.redis_url",
            format!("{value:?} must be a redis:// or rediss:// URL with a host"),
        )),
    }
}

fn read_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    parse_text(&text, &shown)
}

/// A file's text as a TOML table; a syntax error names its line.
fn parse_text(text: &str, shown: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|e| {
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].lines().count().max(1))
            .unwrap_or(1);
        ConfigError::Syntax {
            path: shown.to_owned(),
            line,
            message: e.message().trim().replace('\n', " "),
        }
    })
}

/// `table` as a `T`; an error names the setting, and the variable that
/// set it when one did. `also` are top-level sections read elsewhere
/// (suggested for a misspelt one).
fn deserialize<T: serde::de::DeserializeOwned>(
    table: toml::Table,
    from_env: &BTreeMap<String, String>,
    also: &[String],
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let key = e.path().to_string();
        let message = humanize(&key, e.into_inner().message(), also);
        // A value that came from a variable: name the variable the
        // user typed, not only the setting it became.
        let var = from_env.iter().find(|(set, _)| {
            **set == key
                || set
                    .strip_prefix(key.as_str())
                    .is_some_and(|r| r.starts_with('.'))
        });
        match var {
            Some((set, var)) => ConfigError::Env {
                var: var.clone(),
                message: format!("{set}: {message}"),
            },
            None => ConfigError::invalid(&key, message),
        }
    })
}

/// A serde message for people: "a whole number" rather than `usize`, an
/// address for the listen address, and the nearest real setting for a
/// misspelt one.
fn humanize(key: &str, message: &str, also: &[String]) -> String {
    let mut m = message.to_owned();
    for t in ["usize", "u64", "u32", "u16", "u8", "i64", "i32"] {
        m = m.replace(
            &format!("expected {t}"),
            "expected a whole number (0 or more)",
        );
    }
    for t in ["f64", "f32"] {
        m = m.replace(&format!("expected {t}"), "expected a number, like 0.5");
    }
    if key.ends_with("listen") && m.contains("expected a string") {
        m = m.replace(
            "expected a string",
            "expected an address like \"127.0.0.1:8080\" (in quotes)",
        );
    }
    if let Some(rest) = m.strip_prefix("unknown field `")
        && let Some((name, known)) = rest.split_once('`')
    {
        let section = key.rsplit_once('.').map_or("", |(s, _)| s);
        let mut known: Vec<&str> = known
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|k| !k.is_empty())
            .collect();
        if section.is_empty() {
            known.extend(also.iter().map(String::as_str));
        }
        let nearest = known
            .iter()
            .map(|k| (strsim::levenshtein(name, k), *k))
            .filter(|(d, k)| *d <= 2.max(k.len() / 3))
            .min();
        let dotted = |k: &str| match section {
            "" => k.to_owned(),
            s => format!("{s}.{k}"),
        };
        m = match nearest {
            Some((_, k)) => format!("no such setting; did you mean {}?", dotted(k)),
            None => format!("no such setting (known here: {})", known.join(", ")),
        };
    }
    m
}

/// Merges every `GALE_<SECTION>__<KEY>` variable into
/// `table`. A value is read as the type the default has at that key
/// (integer, float, boolean, array), else as a string, so
/// `GALE_WEATHER__API_KEY=12345` stays a string. Returns which setting
/// (`section.key`) each variable set.
fn apply_env(
    table: &mut toml::Table,
    defaults: &toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut applied = BTreeMap::new();
    // Sorted so that the result never depends on the environment's order.
    let vars: BTreeMap<String, String> = env.into_iter().collect();
    for (var, raw) in &vars {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let Some((sec, key)) = rest.split_once("__") else {
            // Not an override. A near-miss on a real section (one
            // underscore instead of two) is surely a typo; other GALE_
            // variables (GALE_TEST_DATABASE_URL, …) are not ours.
            let lower = rest.to_ascii_lowercase();
            if let Some(section) = defaults
                .keys()
                .find(|s| lower.starts_with(&format!("{s}_")))
            {
                let key = &rest[section.len() + 1..];
                return Err(ConfigError::Env {
                    var: var.clone(),
                    message: format!(
                        "settings use two underscores after the section: {ENV_PREFIX}{}__{key}",
                        section.to_ascii_uppercase()
                    ),
                });
            }
            continue;
        };
        let (sec, key) = (sec.to_ascii_lowercase(), key.to_ascii_lowercase());
        let default = defaults
            .get(&sec)
            .and_then(|s| s.as_table())
            .and_then(|s| s.get(&key));
        let value = env_value(raw, default).map_err(|message| ConfigError::Env {
            var: var.clone(),
            message,
        })?;
        applied.insert(format!("{sec}.{key}"), var.clone());
        section(table, &sec).insert(key, value);
    }
    Ok(applied)
}

fn section<'a>(table: &'a mut toml::Table, name: &str) -> &'a mut toml::Table {
    let entry = table
        .entry(name.to_owned())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if !entry.is_table() {
        *entry = toml::Value::Table(toml::Table::new());
    }
    match entry {
        toml::Value::Table(t) => t,
        _ => unreachable!("made a table just above"),
    }
}

fn env_value(raw: &str, default: Option<&toml::Value>) -> Result<toml::Value, String> {
    let raw = raw.trim();
    match default {
        Some(toml::Value::Integer(_)) => raw
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| format!("expected a whole number, got {raw:?}")),
        Some(toml::Value::Float(_)) => raw
            .parse::<f64>()
            .map(toml::Value::Float)
            .map_err(|_| format!("expected a number, like 0.5, got {raw:?}")),
        Some(toml::Value::Boolean(_)) => raw
            .parse::<bool>()
            .map(toml::Value::Boolean)
            .map_err(|_| format!("expected true or false, got {raw:?}")),
        Some(toml::Value::Array(_)) => format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .filter(toml::Value::is_array)
            .ok_or_else(|| format!("expected a TOML array like [\"a\", \"b\"], got {raw:?}")),
        _ => Ok(toml::Value::String(raw.to_owned())),
    }
}
