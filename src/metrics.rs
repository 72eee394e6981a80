//! Every counter the server keeps, registered once and handed out as
//! cheap handles, exported as Prometheus text at `/metrics` and as the
//! seed's JSON object at `/metrics.json`.
//!
//! Labels come only from the small enums below, so the number of series
//! is fixed however many clients or cities the server sees.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
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

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: Outcome,
}

/// How one upstream HTTP call ended: every call counts once.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum UpstreamResult {
    /// A reading.
    Ok,
    /// City not found (a valid answer, not a failure).
    NotFound,
    /// A 4xx for the city name itself (not a failure of the upstream).
    Refused,
    /// Failed: error status, bad body, connection error.
    Error,
    /// No answer before the lookup's deadline.
    Timeout,
    /// Dropped unfinished because its lookup was cancelled.
    Cancelled,
}

impl UpstreamResult {
    /// Every result, in declaration order (index = `as usize`).
    pub const ALL: [UpstreamResult; 6] = [
        UpstreamResult::Ok,
        UpstreamResult::NotFound,
        UpstreamResult::Refused,
        UpstreamResult::Error,
        UpstreamResult::Timeout,
        UpstreamResult::Cancelled,
    ];

    /// The label for a call's result.
    pub fn of<T>(result: &Result<T, crate::weather::WeatherError>) -> UpstreamResult {
        use crate::weather::WeatherError;
        match result {
            Ok(_) => UpstreamResult::Ok,
            Err(WeatherError::NotFound) => UpstreamResult::NotFound,
            Err(WeatherError::Refused(_)) => UpstreamResult::Refused,
            Err(WeatherError::Timeout(_)) => UpstreamResult::Timeout,
            Err(_) => UpstreamResult::Error,
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

/// Why a WebSocket handshake was refused by [`crate::admission`].
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Refusal {
    /// `server.max_connections_per_ip` reached (503).
    ConnectionsPerIp,
    /// `server.handshake_rate_per_ip` exceeded (429).
    HandshakeRate,
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

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    result: UpstreamResult,
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
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
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
    handshakes_refused: [Counter; 2],
    /// Weather requests received (the seed's `requests`).
    pub requests: Counter,
    outcomes: [Counter; Outcome::COUNT],
    upstream_calls: [Counter; 6],
    /// Upstream call latency in seconds.
    pub upstream_latency: Histogram,
    /// Upstream calls running now.
    pub upstream_in_flight: Gauge,
    /// Lookups waiting for an upstream slot now.
    pub upstream_pending: Gauge,
    /// Lookups refused at once: their wait plus a call would have ended
    /// past the deadline.
    pub upstream_refused_early: Counter,
    /// Breaker state (0 closed, 1 open, 2 half-open).
    pub breaker_state: Gauge,
    /// Lookups refused at once because the breaker was open.
    pub breaker_rejected: Counter,
    /// Lookups answered from the cache.
    pub cache_hits: Counter,
    /// Lookups that called upstream themselves.
    pub cache_misses: Counter,
    /// Lookups that waited on another's identical upstream call.
    pub cache_coalesced: Counter,
    /// Rows accepted into the request-log queue (the seed's `db-queued`).
    pub db_queued: Counter,
    /// Rows written to the database (the seed's `db-completed`).
    pub db_completed: Counter,
    /// Rows dropped because the queue was full.
    pub db_dropped: Counter,
    /// Rows given up on after the database kept failing.
    pub db_failed: Counter,
    /// Rows the database refused for what they hold (set aside; the rest
    /// of their batch was written).
    pub db_rejected: Counter,
    /// Rows still queued or being written when the shutdown drain's
    /// deadline passed.
    pub db_abandoned: Counter,
    /// Failed insert attempts (each retried with backoff).
    pub db_errors: Counter,
    /// Rows waiting in the queue now (kept live: counted in as a row is
    /// queued, out as a writer takes it).
    pub db_queue_depth: Gauge,
    /// Rows written to the disk spill (the database could not take them).
    pub spill_rows: Counter,
    /// Spilled rows replayed into the database.
    pub spill_replayed: Counter,
    /// Rows dropped because the spill was full or failed.
    pub spill_dropped: Counter,
    /// Spill records found torn or corrupt and skipped (their rows lost).
    pub spill_torn: Counter,
    /// Spill segments that could not be read and were set aside.
    pub spill_unreadable: Counter,
    /// Bytes in the spill not yet replayed.
    pub spill_bytes: Gauge,
    /// Rows per insert.
    pub db_batch_size: Histogram,
    /// Pushes dropped from full outbound queues (`drop_oldest`).
    pub outbound_dropped: Counter,
    /// Messages waiting in connections' outbound queues now.
    pub outbound_queued: Gauge,
    /// Connections closed as slow consumers (1013).
    pub slow_consumers: Counter,
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

/// Why a cross-node message was lost.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum LostReason {
    /// The queue to Redis was full.
    QueueFull,
    /// Redis did not take it (unreachable, error, deadline).
    RedisError,
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
    lost: [Counter; 2],
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
            lost: [LostReason::QueueFull, LostReason::RedisError]
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
        let refusals = Family::<RefusalLabels, Counter>::default();
        reg.register(
            "handshakes_refused",
            "WebSocket handshakes refused by a per-address limit, by reason",
            refusals.clone(),
        );
        let handshakes_refused = [Refusal::ConnectionsPerIp, Refusal::HandshakeRate]
            .map(|reason| refusals.get_or_create_owned(&RefusalLabels { reason }));

        let requests = Counter::default();
        reg.register("requests", "Weather requests received", requests.clone());
        let by_outcome = Family::<OutcomeLabels, Counter>::default();
        reg.register(
            "request_outcomes",
            "Weather requests by how they ended",
            by_outcome.clone(),
        );
        let outcomes =
            Outcome::ALL.map(|o| by_outcome.get_or_create_owned(&OutcomeLabels { outcome: o }));

        let upstream = Family::<UpstreamLabels, Counter>::default();
        reg.register(
            "upstream_calls",
            "Upstream weather calls by result",
            upstream.clone(),
        );
        let upstream_calls = UpstreamResult::ALL
            .map(|r| upstream.get_or_create_owned(&UpstreamLabels { result: r }));
        let upstream_latency = Histogram::new(exponential_buckets(0.005, 2.0, 13));
        reg.register(
            "upstream_latency_seconds",
            "Upstream weather call latency",
            upstream_latency.clone(),
        );
        let upstream_in_flight = Gauge::default();
        reg.register(
            "upstream_in_flight",
            "Upstream calls running now",
            upstream_in_flight.clone(),
        );
        let upstream_pending = Gauge::default();
        reg.register(
            "upstream_pending",
            "Lookups waiting for an upstream slot",
            upstream_pending.clone(),
        );
        let upstream_refused_early = Counter::default();
        reg.register(
            "upstream_refused_early",
            "Lookups refused at once as busy: their wait for a slot plus a call, as recent calls took, would end past the deadline",
            upstream_refused_early.clone(),
        );
        let breaker_state = Gauge::default();
        reg.register(
            "upstream_breaker_state",
            "Circuit breaker: 0 closed, 1 open, 2 half-open",
            breaker_state.clone(),
        );
        let breaker_rejected = Counter::default();
        reg.register(
            "upstream_breaker_rejected",
            "Lookups failed fast by the open breaker",
            breaker_rejected.clone(),
        );

        let cache_hits = Counter::default();
        reg.register(
            "cache_hits",
            "Lookups answered from the cache",
            cache_hits.clone(),
        );
        let cache_misses = Counter::default();
        reg.register(
            "cache_misses",
            "Lookups that called upstream",
            cache_misses.clone(),
        );
        let cache_coalesced = Counter::default();
        reg.register(
            "cache_coalesced",
            "Lookups that shared another's upstream call",
            cache_coalesced.clone(),
        );

        let db_queued = Counter::default();
        reg.register(
            "db_rows_queued",
            "Request-log rows queued",
            db_queued.clone(),
        );
        let db_completed = Counter::default();
        reg.register(
            "db_rows_written",
            "Request-log rows written",
            db_completed.clone(),
        );
        let db_dropped = Counter::default();
        reg.register(
            "db_rows_dropped",
            "Request-log rows dropped: queue full",
            db_dropped.clone(),
        );
        let db_failed = Counter::default();
        reg.register(
            "db_rows_failed",
            "Request-log rows lost after retries",
            db_failed.clone(),
        );
        let db_rejected = Counter::default();
        reg.register(
            "db_rows_rejected",
            "Request-log rows the database refused for their content, set aside",
            db_rejected.clone(),
        );
        let db_abandoned = Counter::default();
        reg.register(
            "db_rows_abandoned",
            "Request-log rows not written by the shutdown drain's deadline",
            db_abandoned.clone(),
        );
        let db_errors = Counter::default();
        reg.register(
            "db_insert_errors",
            "Failed insert attempts",
            db_errors.clone(),
        );
        let db_queue_depth = Gauge::default();
        reg.register(
            "db_queue_depth",
            "Request-log rows waiting to be written",
            db_queue_depth.clone(),
        );
        let spill_rows = Counter::default();
        reg.register(
            "spill_rows",
            "Request-log rows written to the disk spill",
            spill_rows.clone(),
        );
        let spill_replayed = Counter::default();
        reg.register(
            "spill_replayed_rows",
            "Spilled request-log rows replayed into the database",
            spill_replayed.clone(),
        );
        let spill_dropped = Counter::default();
        reg.register(
            "spill_dropped_rows",
            "Request-log rows dropped: the disk spill full or failing",
            spill_dropped.clone(),
        );
        let spill_torn = Counter::default();
        reg.register(
            "spill_torn_records",
            "Disk spill records found torn or corrupt and skipped",
            spill_torn.clone(),
        );
        let spill_unreadable = Counter::default();
        reg.register(
            "spill_unreadable_segments",
            "Disk spill segments that could not be read, set aside as .unreadable",
            spill_unreadable.clone(),
        );
        let spill_bytes = Gauge::default();
        reg.register(
            "spill_bytes",
            "Bytes in the disk spill not yet replayed",
            spill_bytes.clone(),
        );
        let db_batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 13));
        reg.register("db_batch_rows", "Rows per insert", db_batch_size.clone());

        let outbound_dropped = Counter::default();
        reg.register(
            "outbound_dropped",
            "Pushes dropped from full per-connection queues",
            outbound_dropped.clone(),
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
            outbound_queued,
            slow_consumers,
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
            handshakes_refused,
            requests,
            outcomes,
            upstream_calls,
            upstream_latency,
            upstream_in_flight,
            upstream_pending,
            upstream_refused_early,
            breaker_state,
            breaker_rejected,
            cache_hits,
            cache_misses,
            cache_coalesced,
            db_queued,
            db_completed,
            db_dropped,
            db_failed,
            db_rejected,
            db_abandoned,
            db_errors,
            db_queue_depth,
            spill_rows,
            spill_replayed,
            spill_dropped,
            spill_torn,
            spill_unreadable,
            spill_bytes,
            db_batch_size,
            cluster,
            proxy,
            registry,
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

    /// The counter of upstream calls that ended with `result`.
    pub fn upstream_call(&self, result: UpstreamResult) -> &Counter {
        &self.upstream_calls[result as usize]
    }

    /// The counter for one request outcome.
    pub fn outcome(&self, outcome: Outcome) -> &Counter {
        &self.outcomes[outcome as usize]
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

    /// Requests that got a reading (the seed's `successful`).
    pub fn successful(&self) -> u64 {
        self.outcome(Outcome::Ok).get()
    }

    /// Requests that got an error reply (the seed's `failed`).
    pub fn failed(&self) -> u64 {
        self.outcomes.iter().skip(1).map(Counter::get).sum()
    }

    /// Prometheus text exposition of every metric.
    pub fn encode_text(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            // Writing into a String cannot fail; keep the endpoint alive
            // with what was written if it ever does.
            tracing::error!("metrics encoding failed");
        }
        out
    }

    /// The seed's counters under its exact keys, plus the drop count and
    /// the connection gauge.
    pub fn to_json(&self) -> serde_json::Value {
        let mut json = self.node_json();
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
            "requests": self.requests.get(),
            "successful": self.successful(),
            "failed": self.failed(),
            "db-queued": self.db_queued.get(),
            "db-completed": self.db_completed.get(),
            "db-dropped": self.db_dropped.get(),
            "db-failed": self.db_failed.get(),
            "db-rejected": self.db_rejected.get(),
            "db-abandoned": self.db_abandoned.get(),
            "db-queue-depth": self.db_queue_depth.get(),
            "spill-rows": self.spill_rows.get(),
            "spill-replayed": self.spill_replayed.get(),
            "spill-dropped": self.spill_dropped.get(),
            "spill-torn": self.spill_torn.get(),
            "spill-unreadable": self.spill_unreadable.get(),
            "spill-bytes": self.spill_bytes.get(),
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
            "connections-total": self.connections_total.get(),
            "http-timeouts": self.http_timeouts.iter().map(Counter::get).sum::<u64>(),
            "messages-in": self.messages_in.get(),
            "messages-out": self.messages_out.get(),
            "cache-hits": self.cache_hits.get(),
            "cache-misses": self.cache_misses.get(),
            "cache-coalesced": self.cache_coalesced.get(),
            "upstream-calls": self.upstream_calls.iter().map(Counter::get).sum::<u64>(),
        })
    }
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
