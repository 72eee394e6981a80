//! The application's backend in the loop, over HTTP: gale asks the team's
//! backend (in any language) who a connection is (`connect_url`), whether
//! it may stay (`refresh_url`), subscribe (`subscribe_url`) or publish
//! (`publish_url`, which may rewrite the data), and to answer the events
//! it forwards (`rpc_url`); `crate::lifecycle` tells it who came and
//! went (`events_url`).
//!
//! Every call is a `POST` with a JSON body, answered with one of
//!
//! ```json
//! {"result": {…}}
//! {"error": {"code": "…", "message": "…"}}
//! {"disconnect": {"code": 4001, "reason": "…"}}
//! ```
//!
//! Calls share one keep-alive pool (`http_client`), `[proxy]
//! max_concurrent` slots (a call waits for one within its deadline), a
//! deadline (`timeout_ms`) and a circuit breaker per endpoint:
//! `breaker_failures` failures in a row (no answer, an answer that is not
//! HTTP 2xx with one of the three bodies) stop calls to that endpoint for
//! `breaker_cooldown_ms`, after which one trial call decides. A slow or dead backend is refused with a clear
//! error at the deadline and never holds other connections; what it
//! answers with `error` reaches the client with its code and message.
//! Counted in `gale_proxy_calls_total{kind,result}`,
//! `gale_proxy_latency_seconds{kind}` and `gale_proxy_in_flight`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::breaker::Breaker;
use crate::config::ProxyConfig;
use crate::http_client::{self, Client};
use crate::metrics::{Metrics, ProxyKind, ProxyResult};
use crate::protocol::{ErrorBody, ErrorCode};

/// What the backend answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Allowed, with what it says (an object; `{}` when it says nothing).
    Result(Value),
    /// Refused: the client is told this code (a string or a number) and
    /// message.
    Error {
        /// The backend's code.
        code: Value,
        /// For people.
        message: String,
    },
    /// Refused, and the connection is to be closed with this code and
    /// reason.
    Disconnect {
        /// A WebSocket close code (3000–4999: registered and application codes).
        code: u16,
        /// Why, for people (at most 123 bytes).
        reason: String,
    },
}

impl Answer {
    /// A refusal as the client is told it (`None` for a result).
    pub fn refusal(&self) -> Option<ErrorBody> {
        match self {
            Answer::Result(_) => None,
            Answer::Error { code, message } => {
                Some(ErrorBody::application(code.clone(), message.clone()))
            }
            Answer::Disconnect { reason, .. } => Some(ErrorBody::new(
                ErrorCode::PermissionDenied,
                format!("the application closed the connection: {reason}"),
            )),
        }
    }
}

/// Why no answer came.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// No URL is configured for this kind of call.
    #[error("the application's backend takes no {0} calls (set [proxy] {1})")]
    NotConfigured(&'static str, &'static str),
    /// The breaker is open after repeated failures.
    #[error(
        "the application's backend is failing: calls stopped for {0} ms after repeated failures"
    )]
    Open(u64),
    /// No answer within the deadline (waiting for a slot included).
    #[error("the application's backend did not answer within {0} ms ([proxy] timeout_ms)")]
    Timeout(u64),
    /// An answer that is not what the protocol says, or no connection.
    #[error("the application's backend failed: {0}")]
    Failed(String),
}

impl BackendError {
    /// What the client is told.
    pub fn to_body(&self) -> ErrorBody {
        let code = match self {
            BackendError::NotConfigured(..) => ErrorCode::InternalError,
            BackendError::Timeout(_) => ErrorCode::Timeout,
            BackendError::Open(_) | BackendError::Failed(_) => ErrorCode::UpstreamUnavailable,
        };
        ErrorBody::new(code, self.to_string())
    }
}

/// The backend's endpoints and the bounds on calling them.
pub struct Backend {
    client: Client,
    urls: [Option<url::Url>; ProxyKind::ALL.len()],
    headers: Vec<(String, String)>,
    slots: Arc<Semaphore>,
    /// One per kind: a failing endpoint (say events_url) does not stop
    /// calls to the others.
    breakers: [Breaker; ProxyKind::ALL.len()],
    timeout: Duration,
    limit: usize,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("urls", &self.urls)
            .finish_non_exhaustive()
    }
}

/// The setting that names each kind's URL.
fn setting(kind: ProxyKind) -> &'static str {
    match kind {
        ProxyKind::Connect => "connect_url",
        ProxyKind::Refresh => "refresh_url",
        ProxyKind::Subscribe => "subscribe_url",
        ProxyKind::Publish => "publish_url",
        ProxyKind::Rpc => "rpc_url",
        ProxyKind::Events => "events_url",
    }
}

/// The kind of call, in words.
fn word(kind: ProxyKind) -> &'static str {
    match kind {
        ProxyKind::Connect => "connect",
        ProxyKind::Refresh => "refresh",
        ProxyKind::Subscribe => "subscribe",
        ProxyKind::Publish => "publish",
        ProxyKind::Rpc => "RPC",
        ProxyKind::Events => "lifecycle event",
    }
}

impl Backend {
    /// The backend `cfg` describes; `None` when it names no URL at all.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(
        cfg: &ProxyConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Option<Backend>, reqwest::Error> {
        let parse = |u: &Option<String>| u.as_deref().and_then(|u| url::Url::parse(u).ok());
        let urls = [
            parse(&cfg.connect_url),
            parse(&cfg.refresh_url),
            parse(&cfg.subscribe_url),
            parse(&cfg.publish_url),
            parse(&cfg.rpc_url),
            parse(&cfg.events_url),
        ];
        if urls.iter().all(Option::is_none) {
            return Ok(None);
        }
        let timeout = Duration::from_millis(cfg.timeout_ms);
        Ok(Some(Backend {
            // Idle connections are left after 4 s: common backends (Node's
            // http) close theirs after 5.
            client: http_client::Client::with_idle(
                timeout + Duration::from_secs(1),
                timeout,
                cfg.max_concurrent,
                Duration::from_secs(4),
            )?,
            urls,
            headers: cfg
                .static_headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            slots: Arc::new(Semaphore::new(cfg.max_concurrent)),
            breakers: ProxyKind::ALL.map(|_| {
                Breaker::new(
                    cfg.breaker_failures,
                    Duration::from_millis(cfg.breaker_cooldown_ms),
                )
            }),
            timeout,
            limit: cfg.max_response_bytes,
            metrics,
        }))
    }

    /// Whether a URL is configured for `kind`.
    pub fn has(&self, kind: ProxyKind) -> bool {
        self.urls[kind as usize].is_some()
    }

    /// Asks the backend; its answer, or why none came.
    ///
    /// # Errors
    /// [`BackendError`]: not configured, breaker open, no answer within
    /// the deadline, or an answer that breaks the protocol.
    pub async fn call(&self, kind: ProxyKind, body: &Value) -> Result<Answer, BackendError> {
        let Some(url) = self.urls[kind as usize].clone() else {
            return Err(BackendError::NotConfigured(word(kind), setting(kind)));
        };
        let m = &self.metrics.proxy;
        let breaker = &self.breakers[kind as usize];
        if let Err(left) = breaker.check() {
            m.call(kind, ProxyResult::Open).inc();
            return Err(BackendError::Open(left.as_millis() as u64));
        }
        let started = Instant::now();
        let deadline = started + self.timeout;
        let timeout_ms = self.timeout.as_millis() as u64;
        let Ok(Ok(_slot)) =
            tokio::time::timeout_at(deadline, self.slots.clone().acquire_owned()).await
        else {
            m.call(kind, ProxyResult::Timeout).inc();
            return Err(BackendError::Timeout(timeout_ms));
        };
        let Ok(permit) = breaker.try_acquire() else {
            m.call(kind, ProxyResult::Open).inc();
            let left = breaker.check().err().unwrap_or_default();
            return Err(BackendError::Open(left.as_millis() as u64));
        };
        m.in_flight.inc();
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        let sent = tokio::time::timeout_at(
            deadline,
            self.client.post_json(url, &self.headers, bytes, self.limit),
        )
        .await;
        m.in_flight.dec();
        m.latency(kind).observe(started.elapsed().as_secs_f64());
        let outcome = match sent {
            Err(_) => Err(BackendError::Timeout(timeout_ms)),
            Ok(Err(e)) => Err(BackendError::Failed(http_failure(&e))),
            Ok(Ok(resp)) if !(200..300).contains(&resp.status) => Err(BackendError::Failed(
                format!("HTTP {} from {}", resp.status, setting(kind)),
            )),
            Ok(Ok(resp)) => parse(&resp.body).map_err(BackendError::Failed),
        };
        permit.record(outcome.is_ok());
        m.call(
            kind,
            match &outcome {
                Ok(Answer::Result(_)) => ProxyResult::Ok,
                Ok(Answer::Error { .. }) => ProxyResult::Refused,
                Ok(Answer::Disconnect { .. }) => ProxyResult::Disconnect,
                Err(BackendError::Timeout(_)) => ProxyResult::Timeout,
                Err(_) => ProxyResult::Failed,
            },
        )
        .inc();
        if let Err(e) = &outcome {
            tracing::debug!(kind = word(kind), error = %e, "proxy call failed");
        }
        outcome
    }
}

/// Registers the events `[proxy] rpc_events` names on the router: each is
/// forwarded to `rpc_url` with its caller, and the backend's `result` is
/// the reply's `data`. The router's policies apply to them as to any
/// event (`[events."orders.create"]` overrides, rate limits, timeouts,
/// priorities, the connection's bound).
pub(crate) fn register_rpc(registry: &mut crate::router::Registry, cfg: &ProxyConfig) {
    for pattern in &cfg.rpc_events {
        registry.register_pattern(pattern, crate::router::Policy::default(), rpc);
    }
}

/// One forwarded event.
async fn rpc(ctx: crate::router::Ctx, event: String, data: Value) -> crate::router::HandlerResult {
    let Some(backend) = ctx.app.backend.clone().filter(|b| b.has(ProxyKind::Rpc)) else {
        return Err(
            BackendError::NotConfigured(word(ProxyKind::Rpc), setting(ProxyKind::Rpc)).to_body(),
        );
    };
    let caller = &ctx.caller;
    let body = serde_json::json!({
        "client": caller.conn_id,
        "user": caller.user.as_deref(),
        "roles": &*caller.roles,
        "event": event,
        "data": data,
    });
    match backend.call(ProxyKind::Rpc, &body).await {
        Ok(Answer::Result(v)) => Ok(v),
        Ok(answer @ Answer::Error { .. }) => Err(answer.refusal().unwrap_or_else(|| {
            ErrorBody::new(ErrorCode::InternalError, "no refusal in an error answer")
        })),
        Ok(answer @ Answer::Disconnect { .. }) => {
            if let Answer::Disconnect { code, reason } = &answer {
                caller.outbox.end(*code, reason);
            }
            Err(answer.refusal().unwrap_or_else(|| {
                ErrorBody::new(
                    ErrorCode::InternalError,
                    "no refusal in a disconnect answer",
                )
            }))
        }
        Err(e) => Err(e.to_body()),
    }
}

fn http_failure(e: &http_client::HttpError) -> String {
    match e {
        http_client::HttpError::Unreachable(how) => format!("cannot reach it{how}"),
        e => e.to_string(),
    }
}

/// Reads an answer: exactly one of `result`, `error`, `disconnect`.
fn parse(body: &[u8]) -> Result<Answer, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the answer is not JSON ({e})"))?;
    let Value::Object(mut obj) = v else {
        return Err("the answer is not a JSON object".into());
    };
    let (result, error, disconnect) = (
        obj.remove("result"),
        obj.remove("error"),
        obj.remove("disconnect"),
    );
    match (result, error, disconnect) {
        (Some(r), None, None) => Ok(Answer::Result(match r {
            Value::Null => Value::Object(Default::default()),
            r => r,
        })),
        (None, Some(e), None) => {
            let code = match &e["code"] {
                c @ (Value::String(_) | Value::Number(_)) => c.clone(),
                _ => return Err("error.code must be a string or a number".into()),
            };
            let message = e["message"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(1000)
                .collect();
            Ok(Answer::Error { code, message })
        }
        (None, None, Some(d)) => {
            let code = d["code"]
                .as_u64()
                .filter(|c| (3000..=4999).contains(c))
                .ok_or("disconnect.code must be from 3000 to 4999")? as u16;
            let mut reason: String = d["reason"].as_str().unwrap_or("").to_owned();
            // A close frame's reason is at most 123 bytes.
            while reason.len() > 123 {
                reason.pop();
            }
            Ok(Answer::Disconnect { code, reason })
        }
        _ => Err("the answer must hold exactly one of result, error, disconnect".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_strictly() {
        assert_eq!(
            parse(br#"{"result":{"user":"a"}}"#),
            Ok(Answer::Result(serde_json::json!({"user":"a"})))
        );
        assert_eq!(
            parse(br#"{"result":null}"#),
            Ok(Answer::Result(serde_json::json!({})))
        );
        assert_eq!(
            parse(br#"{"error":{"code":403,"message":"no"}}"#),
            Ok(Answer::Error {
                code: serde_json::json!(403),
                message: "no".into()
            })
        );
        assert!(matches!(
            parse(br#"{"disconnect":{"code":4001,"reason":"bye"}}"#),
            Ok(Answer::Disconnect { code: 4001, .. })
        ));
        for bad in [
            &b"<html>"[..],
            b"[]",
            b"{}",
            br#"{"result":{},"error":{}}"#,
            br#"{"error":{"message":"no code"}}"#,
            br#"{"disconnect":{"code":1000}}"#,
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
