//! Every counter the server keeps, registered once and handed out as
//! cheap handles, exported as Prometheus text at `/metrics` and as the
//! seed's JSON object at `/metrics.json`.
//!
//! Labels come only from the small enums below, so the number of series
//! is fixed however many clients or cities the server sees.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::protocol::ErrorCode;

/// How a request or event ended: `Ok` or one of the protocol's error
/// codes, one to one.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Outcome {
    /// Success.
    Ok,
    /// `invalid_message`.
    InvalidMessage,
    /// `unknown_event`.
    UnknownEvent,
    /// `unauthorized`.
    Unauthorized,
    /// `forbidden`.
    Forbidden,
    /// `rate_limited`.
    RateLimited,
    /// `invalid_data`.
    InvalidData,
    /// `not_found`.
    NotFound,
    /// `timeout`.
    Timeout,
    /// `upstream_unavailable`.
    UpstreamUnavailable,
    /// `system_overloaded`.
    SystemOverloaded,
    /// `internal_error`.
    InternalError,
    /// `limit_exceeded`.
    LimitExceeded,
    /// `permission_denied`.
    PermissionDenied,
    /// An error of the application's backend.
    ApplicationError,
}

impl Outcome {
    /// How many there are.
    pub const COUNT: usize = 15;

    /// Every outcome, in declaration order (index = `as usize`).
    pub const ALL: [Outcome; Outcome::COUNT] = [
        Outcome::Ok,
        Outcome::InvalidMessage,
        Outcome::UnknownEvent,
        Outcome::Unauthorized,
        Outcome::Forbidden,
        Outcome::RateLimited,
        Outcome::InvalidData,
        Outcome::NotFound,
        Outcome::Timeout,
        Outcome::UpstreamUnavailable,
        Outcome::SystemOverloaded,
        Outcome::InternalError,
        Outcome::LimitExceeded,
        Outcome::PermissionDenied,
        Outcome::ApplicationError,
    ];
}

impl From<ErrorCode> for Outcome {
    fn from(code: ErrorCode) -> Self {
        match code {
            ErrorCode::InvalidMessage => Outcome::InvalidMessage,
            ErrorCode::UnknownEvent => Outcome::UnknownEvent,
            ErrorCode::Unauthorized => Outcome::Unauthorized,
            ErrorCode::Forbidden => Outcome::Forbidden,
            ErrorCode::RateLimited => Outcome::RateLimited,
            ErrorCode::InvalidData => Outcome::InvalidData,
            ErrorCode::NotFound => Outcome::NotFound,
            ErrorCode::Timeout => Outcome::Timeout,
            ErrorCode::UpstreamUnavailable => Outcome::UpstreamUnavailable,
            ErrorCode::SystemOverloaded => Outcome::SystemOverloaded,
            ErrorCode::InternalError => Outcome::InternalError,
            ErrorCode::LimitExceeded => Outcome::LimitExceeded,
            ErrorCode::PermissionDenied => Outcome::PermissionDenied,
            ErrorCode::ApplicationError => Outcome::ApplicationError,
        }
    }
}

/// Where a stalled HTTP connection was closed by the handshake deadline.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum HttpStage {
    /// No complete request head in time (nothing, a partial head, or an
    /// idle kept-alive connection).
    Head,
    /// A request body not received in time.
    Body,
    /// A TLS handshake not finished in time.
    Tls,
}

/// Why a WebSocket or SSE handshake was refused by an admission limit (`admission`).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Refusal {
    /// `server.max_connections_per_ip` reached (503).
    ConnectionsPerIp,
    /// `server.handshake_rate_per_ip` exceeded (429).
    HandshakeRate,
    /// `server.handshake_rate` (the whole node's) exceeded (503).
    NodeRate,
}

/// A TLS connection's protocol version (`gale_tls_handshakes_total`).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2.
    Tls12,
    /// TLS 1.3.
    Tls13,
}

impl EncodeLabelValue for TlsVersion {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        encoder.write_str(match self {
            TlsVersion::Tls12 => "1.2",
            TlsVersion::Tls13 => "1.3",
        })
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TlsLabels {
    version: TlsVersion,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: Refusal,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: HttpStage,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: String,
    outcome: Outcome,
}

/// Circuit breaker state, as the `gale_upstream_breaker_state` gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow.
    Closed = 0,
    /// Calls fail fast.
    Open = 1,
    /// One trial call is allowed.
    HalfOpen = 2,
}

/// All metric handles. Cloning a handle is an `Arc` clone; updating one is
/// an atomic add.
pub struct Metrics {
    /// Behind a lock so applications can register their own metrics
    /// ([`Metrics::register`]); read only by `/metrics`.
    registry: std::sync::Mutex<Registry>,
    /// The applications' parts of `/metrics.json` and `server.stats`.
    parts: std::sync::RwLock<Vec<std::sync::Arc<dyn Part>>>,
    /// WebSocket connections open now.
    pub connections: Gauge,
    /// WebSocket connections ever opened.
    pub connections_total: Counter,
    /// WebSocket messages received.
    pub messages_in: Counter,
    /// WebSocket messages sent.
    pub messages_out: Counter,
    /// Connections closed for a protocol violation (1007, 1009, …).
    pub protocol_errors: Counter,
    http_timeouts: [Counter; 3],
    /// TLS handshakes that failed.
    pub tls_failures: Counter,
    tls_handshakes: [Counter; 2],
    handshakes_refused: [Counter; 3],
    /// Pushes dropped from full outbound queues (`drop_oldest`).
    pub outbound_dropped: Counter,
    /// Messages written (or begun: the task writes a frame's end the
    /// socket did not take) straight into an idle connection's socket by
    /// whoever sent them (no queue, no wake-up of its task).
    pub outbound_direct: Counter,
    /// Chunks of a large fan-out written by a helper thread beside the
    /// thread delivering it (`broadcast.fanout_threads`).
    pub fanout_helped: Counter,
    /// Helper threads a large fan-out wanted and found busy (helping
    /// another, or not yet back from a job that came too late).
    pub fanout_busy: Counter,
    /// Messages waiting in connections' outbound queues now.
    pub outbound_queued: Gauge,
    /// Connections closed as slow consumers (1013).
    pub slow_consumers: Counter,
    /// Connections closed by a drain (1012, with a reconnect delay).
    pub drained: Counter,
    /// Connections handed to a new process by a takeover (counted by the
    /// process that handed them over).
    pub handed_over: Counter,
    /// Connections taken over from the previous process (counted by the
    /// process that took them).
    pub taken_over: Counter,
    /// Connections that agreed to permessage-deflate.
    pub compressed_connections: Counter,
    /// Messages compressed: a broadcast counts once, however many
    /// compressed connections receive it.
    pub compressed_messages: Counter,
    /// Bytes given to the compressor.
    pub compression_in_bytes: Counter,
    /// Bytes it gave back (frame payloads).
    pub compression_out_bytes: Counter,
    events: Family<EventLabels, Counter>,
    /// Events waiting for a router worker now.
    pub router_queue_depth: Gauge,
    /// Times the router queue crossed its alert threshold.
    pub router_queue_alerts: Counter,
    /// Handler run time in seconds.
    pub handler_latency: Histogram,
    /// Users with at least one connection.
    pub users: Gauge,
    /// Topics with at least one subscriber.
    pub topics: Gauge,
    /// Per-event rate-limit buckets held (user, connection, address).
    pub rate_buckets: Gauge,
    /// Client addresses whose part of the node's event budget is tracked.
    pub rate_shares: Gauge,
    /// Topics with a history (a position) in this node's memory.
    pub history_streams: Gauge,
    /// Bytes of publications held in those histories.
    pub history_bytes: Gauge,
    /// Histories dropped whole to stay within `history.max_bytes` or
    /// `history.max_streams` (their epoch changes).
    pub history_evicted: Counter,
    /// Subscribes that asked to recover and got every missed publication.
    pub recovered: Counter,
    /// Subscribes that asked to recover and could not (`recovered: false`).
    pub recovery_lost: Counter,
    /// SSE sessions open now.
    pub sse_sessions: Gauge,
    /// Pushes queued into connections' outboxes.
    pub pushes: Counter,
    /// Broadcasts dropped because the broadcast queue was full.
    pub broadcast_dropped: Counter,
    /// Broadcasts per delivery batch.
    pub broadcast_batch: Histogram,
    /// Cluster metrics; `None` on a single node.
    pub cluster: Option<ClusterMetrics>,
    /// Calls to the application's backend (`gale_proxy_*`).
    pub proxy: ProxyMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("connections", &self.connections.get())
            .finish_non_exhaustive()
    }
}

/// Why a cross-node message was lost.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum LostReason {
    /// The queue to Redis was full.
    QueueFull,
    /// Redis did not take it (unreachable, error, deadline).
    RedisError,
    /// From another node: the queue of what waits to be handed out here
    /// was full.
    ReceiveQueueFull,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LostLabels {
    reason: LostReason,
}

/// What fell back to this node alone because Redis did not answer.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Fallback {
    /// A per-user rate limit checked by the local limiter.
    RateLimit,
    /// A weather lookup made without the shared cache or its lease.
    Cache,
    /// A weather feed refreshed without its cluster lease.
    Feed,
    /// `presence.online` answered from this node's users alone.
    Presence,
    /// A recovery answered `recovered: false` (or a publication delivered
    /// without a position) because Redis did not answer.
    History,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FallbackLabels {
    what: Fallback,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node_id: String,
}

/// A kind of call to the application's backend.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ProxyKind {
    /// `connect_url`.
    Connect,
    /// `refresh_url`.
    Refresh,
    /// `subscribe_url`.
    Subscribe,
    /// `publish_url`.
    Publish,
    /// `rpc_url`.
    Rpc,
    /// `events_url`.
    Events,
}

impl ProxyKind {
    /// Every kind, in declaration order (index = `as usize`).
    pub const ALL: [ProxyKind; 6] = [
        ProxyKind::Connect,
        ProxyKind::Refresh,
        ProxyKind::Subscribe,
        ProxyKind::Publish,
        ProxyKind::Rpc,
        ProxyKind::Events,
    ];
}

/// How one call to the backend ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ProxyResult {
    /// It answered `result`.
    Ok,
    /// It answered `error`.
    Refused,
    /// It answered `disconnect`.
    Disconnect,
    /// No answer by the deadline.
    Timeout,
    /// No connection, or an answer that breaks the protocol.
    Failed,
    /// Not made: the circuit breaker was open.
    Open,
}

impl ProxyResult {
    const ALL: [ProxyResult; 6] = [
        ProxyResult::Ok,
        ProxyResult::Refused,
        ProxyResult::Disconnect,
        ProxyResult::Timeout,
        ProxyResult::Failed,
        ProxyResult::Open,
    ];
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProxyCallLabels {
    kind: ProxyKind,
    result: ProxyResult,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProxyKindLabels {
    kind: ProxyKind,
}

/// The application's backend's metrics (`gale_proxy_*`), looked up once.
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    calls: Vec<Counter>,
    latency: Vec<Histogram>,
    /// Calls in flight now.
    pub in_flight: Gauge,
    /// Lifecycle notifications delivered.
    pub events_sent: Counter,
    /// Lifecycle notifications dropped: the queue was full.
    pub events_dropped: Counter,
    /// Lifecycle notifications waiting to be sent.
    pub events_queued: Gauge,
}

impl ProxyMetrics {
    fn register(reg: &mut Registry) -> ProxyMetrics {
        let calls = Family::<ProxyCallLabels, Counter>::default();
        reg.register(
            "proxy_calls",
            "Calls to the application's backend, by kind and result",
            calls.clone(),
        );
        let latency = Family::<ProxyKindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        reg.register(
            "proxy_latency_seconds",
            "Latency of calls to the application's backend, by kind",
            latency.clone(),
        );
        let gauge = |reg: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            reg.register(name, help, g.clone());
            g
        };
        let counter = |reg: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            reg.register(name, help, c.clone());
            c
        };
        ProxyMetrics {
            calls: ProxyKind::ALL
                .iter()
                .flat_map(|&kind| {
                    ProxyResult::ALL
                        .map(|result| calls.get_or_create_owned(&ProxyCallLabels { kind, result }))
                })
                .collect(),
            latency: ProxyKind::ALL
                .map(|kind| latency.get_or_create_owned(&ProxyKindLabels { kind }))
                .to_vec(),
            in_flight: gauge(
                reg,
                "proxy_in_flight",
                "Calls to the application's backend running now",
            ),
            events_sent: counter(
                reg,
                "proxy_events_sent",
                "Lifecycle notifications delivered to the application's backend",
            ),
            events_dropped: counter(
                reg,
                "proxy_events_dropped",
                "Lifecycle notifications dropped: their queue ([proxy] events_queue) was full",
            ),
            events_queued: gauge(
                reg,
                "proxy_events_queued",
                "Lifecycle notifications waiting to be sent",
            ),
        }
    }

    /// The counter of calls of `kind` that ended with `result`.
    pub fn call(&self, kind: ProxyKind, result: ProxyResult) -> &Counter {
        &self.calls[kind as usize * ProxyResult::ALL.len() + result as usize]
    }

    /// The latency histogram of `kind`.
    pub fn latency(&self, kind: ProxyKind) -> &Histogram {
        &self.latency[kind as usize]
    }
}

/// Cluster mode's metrics (`gale_cluster_*`).
#[derive(Debug, Clone)]
pub struct ClusterMetrics {
    /// This node's id.
    pub node_id: String,
    /// 1 while Redis answers and the subscriber connection delivers.
    pub up: Gauge,
    /// Messages sent to Redis for other nodes.
    pub published: Counter,
    /// Messages received from other nodes.
    pub received: Counter,
    /// Messages from other nodes waiting to be handed out.
    pub receive_queued: Gauge,
    lost: [Counter; 3],
    /// Times the subscriber connection was (re)established.
    pub connects: Counter,
    /// Channels subscribed now.
    pub channels: Gauge,
    /// Probes of the subscriber connection that did not come back.
    pub probe_failures: Counter,
    fallbacks: [Counter; 5],
    /// Live nodes in the cluster (as of the last presence sweep).
    pub nodes: Gauge,
    /// Connections on every live node.
    pub connections: Gauge,
    /// Distinct users connected on any live node.
    pub users: Gauge,
    /// Upstream weather results taken from the shared cache.
    pub shared_cache_hits: Counter,
    /// Lookups that waited for another node's upstream call.
    pub lease_waits: Counter,
}

impl ClusterMetrics {
    fn register(reg: &mut Registry, node_id: &str) -> ClusterMetrics {
        let info = Family::<NodeLabels, Gauge>::default();
        reg.register("cluster_node", "This node's id (value 1)", info.clone());
        info.get_or_create(&NodeLabels {
            node_id: node_id.to_owned(),
        })
        .set(1);
        let gauge = |reg: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            reg.register(name, help, g.clone());
            g
        };
        let counter = |reg: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            reg.register(name, help, c.clone());
            c
        };
        let lost = Family::<LostLabels, Counter>::default();
        reg.register(
            "cluster_lost",
            "Cross-node messages lost, by reason",
            lost.clone(),
        );
        let fallbacks = Family::<FallbackLabels, Counter>::default();
        reg.register(
            "cluster_fallbacks",
            "Work done by this node alone because Redis did not answer",
            fallbacks.clone(),
        );
        ClusterMetrics {
            node_id: node_id.to_owned(),
            up: gauge(
                reg,
                "cluster_up",
                "1 while this node is joined to the cluster",
            ),
            published: counter(reg, "cluster_published", "Messages sent to other nodes"),
            received: counter(
                reg,
                "cluster_received",
                "Messages received from other nodes",
            ),
            receive_queued: gauge(
                reg,
                "cluster_receive_queued",
                "Messages from other nodes waiting to be handed out",
            ),
            lost: [
                LostReason::QueueFull,
                LostReason::RedisError,
                LostReason::ReceiveQueueFull,
            ]
            .map(|reason| lost.get_or_create_owned(&LostLabels { reason })),
            connects: counter(
                reg,
                "cluster_subscriber_connects",
                "Times the subscriber connection was established",
            ),
            channels: gauge(reg, "cluster_channels", "Channels subscribed now"),
            probe_failures: counter(
                reg,
                "cluster_probe_failures",
                "Subscriber probes that did not come back in time",
            ),
            fallbacks: [
                Fallback::RateLimit,
                Fallback::Cache,
                Fallback::Feed,
                Fallback::Presence,
                Fallback::History,
            ]
            .map(|what| fallbacks.get_or_create_owned(&FallbackLabels { what })),
            nodes: gauge(reg, "cluster_nodes", "Live nodes in the cluster"),
            connections: gauge(reg, "cluster_connections", "Connections on all live nodes"),
            users: gauge(
                reg,
                "cluster_users",
                "Distinct users connected to the cluster",
            ),
            shared_cache_hits: counter(
                reg,
                "cluster_cache_hits",
                "Weather readings taken from the shared cache",
            ),
            lease_waits: counter(
                reg,
                "cluster_lease_waits",
                "Lookups that waited for another node's upstream call",
            ),
        }
    }

    /// The counter of messages lost for `reason`.
    pub fn lost(&self, reason: LostReason) -> &Counter {
        &self.lost[reason as usize]
    }

    /// Every lost message.
    pub fn lost_total(&self) -> u64 {
        self.lost.iter().map(Counter::get).sum()
    }

    /// The counter of fallbacks of one kind.
    pub fn fallback(&self, what: Fallback) -> &Counter {
        &self.fallbacks[what as usize]
    }
}

impl Metrics {
    /// Creates and registers every metric of a single node.
    pub fn new() -> Metrics {
        Self::for_node(None)
    }

    /// Creates and registers every metric; with `Some(node_id)`, the
    /// cluster's too.
    pub fn for_node(node_id: Option<&str>) -> Metrics {
        let mut registry = Registry::with_prefix("gale");
        let cluster = node_id.map(|id| ClusterMetrics::register(&mut registry, id));
        let proxy = ProxyMetrics::register(&mut registry);
        let reg = &mut registry;

        let connections = Gauge::default();
        reg.register(
            "connections",
            "WebSocket connections open now",
            connections.clone(),
        );
        let connections_total = Counter::default();
        reg.register(
            "connections_opened",
            "WebSocket connections ever opened",
            connections_total.clone(),
        );
        let messages_in = Counter::default();
        reg.register(
            "messages_in",
            "WebSocket messages received",
            messages_in.clone(),
        );
        let messages_out = Counter::default();
        reg.register(
            "messages_out",
            "WebSocket messages sent",
            messages_out.clone(),
        );
        let protocol_errors = Counter::default();
        reg.register(
            "protocol_errors",
            "Connections closed for a protocol violation",
            protocol_errors.clone(),
        );

        let stages = Family::<StageLabels, Counter>::default();
        reg.register(
            "http_timeouts",
            "HTTP connections closed by the handshake deadline, by stage",
            stages.clone(),
        );
        let http_timeouts = [HttpStage::Head, HttpStage::Body, HttpStage::Tls]
            .map(|stage| stages.get_or_create_owned(&StageLabels { stage }));
        let tls_failures = Counter::default();
        reg.register(
            "tls_handshake_failures",
            "TLS handshakes that failed (not TLS, no shared protocol, the peer gave up)",
            tls_failures.clone(),
        );
        let tls_family = Family::<TlsLabels, Counter>::default();
        reg.register(
            "tls_handshakes",
            "TLS handshakes completed, by protocol version",
            tls_family.clone(),
        );
        let tls_handshakes = [TlsVersion::Tls12, TlsVersion::Tls13]
            .map(|version| tls_family.get_or_create_owned(&TlsLabels { version }));
        let refusals = Family::<RefusalLabels, Counter>::default();
        reg.register(
            "handshakes_refused",
            "WebSocket and SSE handshakes refused by an admission limit (per address, or the node's handshake rate), by reason",
            refusals.clone(),
        );
        let handshakes_refused = [
            Refusal::ConnectionsPerIp,
            Refusal::HandshakeRate,
            Refusal::NodeRate,
        ]
        .map(|reason| refusals.get_or_create_owned(&RefusalLabels { reason }));

        let outbound_dropped = Counter::default();
        reg.register(
            "outbound_dropped",
            "Pushes dropped from full per-connection queues",
            outbound_dropped.clone(),
        );
        let outbound_direct = Counter::default();
        reg.register(
            "outbound_direct",
            "Messages written (or begun) straight into an idle connection's socket by whoever sent them, without its queue",
            outbound_direct.clone(),
        );
        let fanout_helped = Counter::default();
        reg.register(
            "fanout_helped",
            "Chunks of a large fan-out written by a helper thread beside the thread delivering it",
            fanout_helped.clone(),
        );
        let fanout_busy = Counter::default();
        reg.register(
            "fanout_busy",
            "Helper threads a large fan-out wanted and found busy (helping another, or not yet back from a job that came too late)",
            fanout_busy.clone(),
        );
        let outbound_queued = Gauge::default();
        reg.register(
            "outbound_queued",
            "Messages waiting in connections' outbound queues",
            outbound_queued.clone(),
        );
        let slow_consumers = Counter::default();
        reg.register(
            "slow_consumers",
            "Connections closed for not reading fast enough",
            slow_consumers.clone(),
        );
        let drained = Counter::default();
        reg.register(
            "drained_connections",
            "Connections closed by a drain (1012 with a suggested reconnect delay)",
            drained.clone(),
        );
        let handed_over = Counter::default();
        reg.register(
            "handoff_sent_connections",
            "Live connections handed to a new process by a takeover",
            handed_over.clone(),
        );
        let taken_over = Counter::default();
        reg.register(
            "handoff_received_connections",
            "Live connections taken over from the previous process",
            taken_over.clone(),
        );
        let compressed_connections = Counter::default();
        reg.register(
            "compressed_connections",
            "WebSocket connections that agreed to permessage-deflate",
            compressed_connections.clone(),
        );
        let compressed_messages = Counter::default();
        reg.register(
            "compressed_messages",
            "Messages compressed (a broadcast once, whatever its recipients)",
            compressed_messages.clone(),
        );
        let compression_in_bytes = Counter::default();
        reg.register(
            "compression_in_bytes",
            "Bytes of messages compressed",
            compression_in_bytes.clone(),
        );
        let compression_out_bytes = Counter::default();
        reg.register(
            "compression_out_bytes",
            "Bytes those messages compressed to",
            compression_out_bytes.clone(),
        );
        let events = Family::<EventLabels, Counter>::default();
        reg.register("events", "Events by name and outcome", events.clone());
        let router_queue_depth = Gauge::default();
        reg.register(
            "router_queue_depth",
            "Events waiting for a router worker",
            router_queue_depth.clone(),
        );
        let router_queue_alerts = Counter::default();
        reg.register(
            "router_queue_alerts",
            "Times the router queue crossed its alert threshold",
            router_queue_alerts.clone(),
        );
        let handler_latency = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        reg.register(
            "handler_latency_seconds",
            "Event handler run time",
            handler_latency.clone(),
        );

        let users = Gauge::default();
        reg.register("users", "Users with at least one connection", users.clone());
        let topics = Gauge::default();
        reg.register(
            "topics",
            "Topics with at least one subscriber",
            topics.clone(),
        );
        let rate_buckets = Gauge::default();
        reg.register(
            "rate_limit_buckets",
            "Per-event rate-limit buckets held (at most 200,000)",
            rate_buckets.clone(),
        );
        let rate_shares = Gauge::default();
        reg.register(
            "rate_limit_shares",
            "Client addresses whose part of router.global_rate_limit is tracked (at most 100,000)",
            rate_shares.clone(),
        );
        let history_streams = Gauge::default();
        reg.register(
            "history_streams",
            "Topics with a history in this node's memory (at most history.max_streams)",
            history_streams.clone(),
        );
        let history_bytes = Gauge::default();
        reg.register(
            "history_bytes",
            "Bytes of publications held in topic histories (at most history.max_bytes)",
            history_bytes.clone(),
        );
        let history_evicted = Counter::default();
        reg.register(
            "history_evicted",
            "Topic histories dropped whole to stay within their bounds",
            history_evicted.clone(),
        );
        let recovered = Counter::default();
        reg.register(
            "recovered",
            "Subscribes that recovered every missed publication",
            recovered.clone(),
        );
        let recovery_lost = Counter::default();
        reg.register(
            "recovery_lost",
            "Subscribes that asked to recover and could not",
            recovery_lost.clone(),
        );
        let sse_sessions = Gauge::default();
        reg.register(
            "sse_sessions",
            "SSE sessions open now (at most sse.max_sessions)",
            sse_sessions.clone(),
        );
        let pushes = Counter::default();
        reg.register("pushes", "Pushes queued for connections", pushes.clone());
        let broadcast_dropped = Counter::default();
        reg.register(
            "broadcast_dropped",
            "Broadcasts dropped: broadcast queue full",
            broadcast_dropped.clone(),
        );
        let broadcast_batch = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        reg.register(
            "broadcast_batch",
            "Broadcasts per delivery batch",
            broadcast_batch.clone(),
        );

        Metrics {
            users,
            topics,
            rate_buckets,
            rate_shares,
            history_streams,
            history_bytes,
            history_evicted,
            recovered,
            recovery_lost,
            sse_sessions,
            pushes,
            broadcast_dropped,
            broadcast_batch,
            outbound_dropped,
            outbound_direct,
            fanout_helped,
            fanout_busy,
            outbound_queued,
            slow_consumers,
            drained,
            handed_over,
            taken_over,
            compressed_connections,
            compressed_messages,
            compression_in_bytes,
            compression_out_bytes,
            events,
            router_queue_depth,
            router_queue_alerts,
            handler_latency,
            connections,
            connections_total,
            messages_in,
            messages_out,
            protocol_errors,
            http_timeouts,
            tls_failures,
            tls_handshakes,
            handshakes_refused,
            cluster,
            proxy,
            registry: std::sync::Mutex::new(registry),
            parts: Default::default(),
        }
    }

    /// The counter of handshakes refused for `reason`.
    pub fn handshake_refused(&self, reason: Refusal) -> &Counter {
        &self.handshakes_refused[reason as usize]
    }

    /// The counter of connections the handshake deadline closed at
    /// `stage`.
    pub fn http_timeout(&self, stage: HttpStage) -> &Counter {
        &self.http_timeouts[stage as usize]
    }

    /// The counter of TLS handshakes completed on `version`.
    pub fn tls_handshake(&self, version: TlsVersion) -> &Counter {
        &self.tls_handshakes[version as usize]
    }

    /// Registers an application's own metrics beside the engine's: `f`
    /// gets the registry `/metrics` exports (every name is prefixed
    /// `gale_`), and what `f` returns comes back. Register once, at start;
    /// keep the handles.
    ///
    /// ```
    /// use gale_engine::metrics::Metrics;
    /// use prometheus_client::metrics::counter::Counter;
    ///
    /// let metrics = Metrics::new();
    /// let sent = Counter::<u64>::default();
    /// metrics.register(|r| r.register("chat_messages", "Chat messages sent", sent.clone()));
    /// sent.inc();
    /// assert!(metrics.encode_text().contains("gale_chat_messages_total 1"));
    /// ```
    pub fn register<T>(&self, f: impl FnOnce(&mut Registry) -> T) -> T {
        f(&mut self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Adds an application's part to `/metrics.json` and `server.stats`
    /// (see [`Part`]).
    pub fn add_part(&self, part: std::sync::Arc<dyn Part>) {
        self.parts
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(part);
    }

    /// Brings every part's gauges that depend on time alone up to date
    /// ([`Part::refresh`]); every reader of the metrics calls it first.
    pub fn refresh_parts(&self) {
        for part in self.parts() {
            part.refresh();
        }
    }

    fn parts(&self) -> Vec<std::sync::Arc<dyn Part>> {
        self.parts
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The counters of one event, one per outcome, indexed by
    /// `Outcome as usize`. Look them up once, when the event is
    /// registered: event names come from the registry, so the number of
    /// series stays bounded.
    pub fn event_counters(&self, event: &str) -> [Counter; Outcome::COUNT] {
        Outcome::ALL.map(|outcome| {
            self.events.get_or_create_owned(&EventLabels {
                event: event.to_owned(),
                outcome,
            })
        })
    }

    /// Prometheus text exposition of every metric.
    pub fn encode_text(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            // Writing into a String cannot fail; keep the endpoint alive
            // with what was written if it ever does.
            tracing::error!("metrics encoding failed");
        }
        out
    }

    /// The seed's counters under its exact keys, plus the drop count and
    /// the connection gauge.
    pub fn to_json(&self) -> serde_json::Value {
        let mut json = serde_json::Map::new();
        for part in self.parts() {
            part.json(&mut json);
        }
        if let serde_json::Value::Object(node) = self.node_json() {
            json.extend(node);
        }
        let mut json = serde_json::Value::Object(json);
        if let (Some(c), Some(map)) = (&self.cluster, json.as_object_mut()) {
            for (k, v) in Self::cluster_json(c) {
                map.insert(k.to_owned(), v);
            }
        }
        json
    }

    /// The cluster fields of `/metrics.json` and `server.stats`.
    pub fn cluster_json(c: &ClusterMetrics) -> [(&'static str, serde_json::Value); 6] {
        [
            ("cluster-node", c.node_id.clone().into()),
            ("cluster-up", (c.up.get() == 1).into()),
            ("cluster-nodes", c.nodes.get().into()),
            ("cluster-connections", c.connections.get().into()),
            ("cluster-users", c.users.get().into()),
            ("cluster-lost", c.lost_total().into()),
        ]
    }

    fn node_json(&self) -> serde_json::Value {
        serde_json::json!({
            "connections": self.connections.get(),
            "rss-bytes": resident_bytes(),
            "users": self.users.get(),
            "topics": self.topics.get(),
            "rate-limit-buckets": self.rate_buckets.get(),
            "rate-limit-shares": self.rate_shares.get(),
            "history-streams": self.history_streams.get(),
            "history-bytes": self.history_bytes.get(),
            "history-evicted": self.history_evicted.get(),
            "recovered": self.recovered.get(),
            "recovery-lost": self.recovery_lost.get(),
            "sse-sessions": self.sse_sessions.get(),
            "pushes": self.pushes.get(),
            "outbound-dropped": self.outbound_dropped.get(),
            "outbound-queued": self.outbound_queued.get(),
            "slow-consumers": self.slow_consumers.get(),
            "drained": self.drained.get(),
            "handed-over": self.handed_over.get(),
            "taken-over": self.taken_over.get(),
            "connections-total": self.connections_total.get(),
            "http-timeouts": self.http_timeouts.iter().map(Counter::get).sum::<u64>(),
            "messages-in": self.messages_in.get(),
            "messages-out": self.messages_out.get(),
        })
    }
}

/// An application's part of the JSON metrics (`/metrics.json` and the
/// `server.stats` event), beside the engine's fields.
///
/// ```
/// use std::sync::Arc;
/// use gale_engine::metrics::{Metrics, Part};
///
/// struct Rooms;
/// impl Part for Rooms {
///     fn json(&self, out: &mut serde_json::Map<String, serde_json::Value>) {
///         out.insert("rooms".into(), 3.into());
///     }
/// }
///
/// let metrics = Metrics::new();
/// metrics.add_part(Arc::new(Rooms));
/// assert_eq!(metrics.to_json()["rooms"], 3);
/// ```
pub trait Part: Send + Sync + 'static {
    /// Brings gauges that depend on time alone up to date; called before
    /// every read of the metrics.
    fn refresh(&self) {}

    /// Adds this part's fields (names in kebab-case, like the engine's).
    fn json(&self, out: &mut serde_json::Map<String, serde_json::Value>);
}

/// This process's resident memory, from `/proc/self/statm` (Linux); 0
/// where that cannot be read.
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
