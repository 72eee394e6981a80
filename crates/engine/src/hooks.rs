//! The one seam where an application decides about its clients: who a
//! connection is when it brings no valid token (connect), whether it may
//! stay once its identity expires (refresh), subscribe to a topic, or
//! publish on one (with the data it publishes). The engine asks here and
//! nowhere else; what it is told, it does.
//!
//! [`Hooks`] is that seam. gale's own answer is [`Permissions`]: the
//! `[topics."PATTERN"]` rules (`channels`), subscription tokens,
//! and the application's backend over HTTP (`proxy`) where the
//! rules say `"proxy"` or a `[proxy]` URL is set.

use std::net::IpAddr;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::channels::{self, Asker, Decision, Rules};
use crate::identity::Verifier;
use crate::metrics::ProxyKind;
use crate::protocol::{ErrorBody, ErrorCode};
use crate::proxy::{Answer, Backend};

/// Who asks: a connection, as the hooks see it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Who {
    /// The connection (`client_id`).
    pub client: Uuid,
    /// The signed-in user, if any.
    pub user: Option<Arc<str>>,
    /// Their roles.
    pub roles: Arc<[String]>,
    /// The client's address.
    pub address: IpAddr,
}

/// A refusal: the client is told why, or its connection is closed.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// Refused with this error; the connection stays.
    Denied(ErrorBody),
    /// Refused, and the connection is closed with this code and reason.
    Disconnect {
        /// The close code (3000–4999: registered and application codes).
        code: u16,
        /// Why.
        reason: String,
    },
}

impl Refusal {
    /// Refused with `permission_denied` and `message`; the connection
    /// stays. (A handshake refused so is answered 403.)
    pub fn denied(message: impl Into<String>) -> Refusal {
        Refusal::Denied(ErrorBody::new(ErrorCode::PermissionDenied, message))
    }

    /// What the client is told in a reply.
    pub fn body(&self) -> ErrorBody {
        match self {
            Refusal::Denied(e) => e.clone(),
            Refusal::Disconnect { reason, .. } => ErrorBody::new(
                ErrorCode::PermissionDenied,
                format!("the application closed the connection: {reason}"),
            ),
        }
    }
}

/// A handshake that brought no valid token.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// The connection it will be.
    pub client: Uuid,
    /// `"websocket"` or `"sse"`.
    pub transport: &'static str,
    /// The client's address.
    pub address: IpAddr,
    /// The handshake's headers the application asked for
    /// (`[proxy] headers`).
    pub headers: Vec<(String, String)>,
}

/// Who a connection is, as the application says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Connected {
    /// The user (none: anonymous).
    pub user: Option<String>,
    /// Their roles.
    pub roles: Vec<String>,
    /// Public data about them, for presence and join/leave.
    pub info: Option<Value>,
    /// Topics to subscribe the connection to at once.
    pub topics: Vec<String>,
    /// When this identity ends (Unix seconds): refreshed before then.
    pub expire_at: Option<u64>,
}

/// An identity extended.
#[derive(Debug, Clone, PartialEq)]
pub struct Refreshed {
    /// When it ends now (Unix seconds).
    pub expire_at: u64,
}

/// The application's decisions. Every method may take its time (a call to
/// a backend): the engine awaits them off the connection's task.
pub trait Hooks: Send + Sync + std::fmt::Debug + 'static {
    /// Whether [`Hooks::connect`] decides anything (a handshake without a
    /// token is asked only then).
    fn connects(&self) -> bool;

    /// Who a connection is when its handshake brought no valid token:
    /// `Ok(None)` leaves it as it was (anonymous, or refused when a token
    /// is required).
    fn connect(
        &self,
        req: ConnectRequest,
    ) -> BoxFuture<'static, Result<Option<Connected>, Refusal>>;

    /// Whether `who` may stay once its identity expires, and until when;
    /// `None`: nobody extends identities (the connection closes at expiry).
    fn refresh(&self, who: Who) -> Option<BoxFuture<'static, Result<Refreshed, Refusal>>>;

    /// Whether `who` may subscribe to `topic` (with a subscription token,
    /// when one came).
    fn subscribe(
        &self,
        who: Who,
        topic: String,
        token: Option<String>,
    ) -> BoxFuture<'static, Result<(), Refusal>>;

    /// Whether `who` may publish `data` on `topic` (`subscribed`: whether
    /// it is subscribed to it), and the data to publish.
    fn publish(
        &self,
        who: Who,
        topic: String,
        subscribed: bool,
        data: Value,
    ) -> BoxFuture<'static, Result<Value, Refusal>>;

    /// Whether `topic` announces joins and leaves to its subscribers.
    fn join_leave(&self, topic: &str) -> bool;

    /// Whether `topic` answers who is subscribed to it.
    fn presence(&self, topic: &str) -> bool;

    /// `who`'s connection has closed (whatever closed it). Called once per
    /// connection, on its task: anything slow belongs in a task of its own.
    fn disconnected(&self, who: Who) {
        let _ = who;
    }
}

/// gale's own decisions: the topic rules, subscription tokens, and the
/// application's backend.
pub struct Permissions {
    rules: Rules,
    verifier: Verifier,
    backend: Option<Arc<Backend>>,
    /// `[proxy] headers`, lower case.
    headers: Vec<String>,
}

impl std::fmt::Debug for Permissions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permissions").finish_non_exhaustive()
    }
}

/// A backend's answer as a refusal, or its result.
fn answered(answer: Answer) -> Result<Value, Refusal> {
    match answer {
        Answer::Result(v) => Ok(v),
        Answer::Error { code, message } => {
            Err(Refusal::Denied(ErrorBody::application(code, message)))
        }
        Answer::Disconnect { code, reason } => Err(Refusal::Disconnect { code, reason }),
    }
}

/// The backend's `result` read as a type, or a refusal saying what is off.
fn read<T: serde::de::DeserializeOwned>(v: Value, kind: &str) -> Result<T, Refusal> {
    serde_json::from_value(v).map_err(|e| {
        Refusal::Denied(ErrorBody::new(
            ErrorCode::UpstreamUnavailable,
            format!(
                "the application's backend answered {kind} with a result gale cannot read: {e}"
            ),
        ))
    })
}

/// What a connect answer's `result` may hold.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectResult {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    info: Option<Value>,
    #[serde(default)]
    topics: Vec<String>,
    #[serde(default)]
    expire_at: Option<u64>,
}

/// What a refresh answer's `result` holds.
#[derive(serde::Deserialize)]
struct RefreshResult {
    expire_at: u64,
}

impl Permissions {
    /// The decisions of `rules`, tokens checked by `verifier`, the
    /// backend (when one is configured) and the handshake headers it is
    /// shown.
    pub fn new(
        rules: Rules,
        verifier: Verifier,
        backend: Option<Arc<Backend>>,
        headers: &[String],
    ) -> Permissions {
        Permissions {
            rules,
            verifier,
            backend,
            headers: headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
        }
    }

    /// The handshake headers the backend is shown.
    pub fn forwarded_headers(&self) -> &[String] {
        &self.headers
    }

    /// The backend, when it answers `kind`.
    fn backend(&self, kind: ProxyKind) -> Option<Arc<Backend>> {
        self.backend.clone().filter(|b| b.has(kind))
    }

    /// The rules.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }
}

/// The body of a call about `who`.
fn about(who: &Who) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("client".into(), json!(who.client));
    m.insert("user".into(), json!(who.user.as_deref()));
    m.insert("roles".into(), json!(&*who.roles));
    m
}

impl Hooks for Permissions {
    fn connects(&self) -> bool {
        self.backend(ProxyKind::Connect).is_some()
    }

    fn connect(
        &self,
        req: ConnectRequest,
    ) -> BoxFuture<'static, Result<Option<Connected>, Refusal>> {
        let Some(backend) = self.backend(ProxyKind::Connect) else {
            return Box::pin(async { Ok(None) });
        };
        Box::pin(async move {
            let headers: serde_json::Map<String, Value> = req
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect();
            let body = json!({
                "client": req.client,
                "transport": req.transport,
                "address": req.address.to_string(),
                "headers": headers,
            });
            let answer = backend
                .call(ProxyKind::Connect, &body)
                .await
                .map_err(|e| Refusal::Denied(e.to_body()))?;
            let r: ConnectResult = read(answered(answer)?, "connect")?;
            Ok(Some(Connected {
                user: r.user.filter(|u| !u.is_empty()),
                roles: r.roles,
                info: r.info.filter(|i| !i.is_null()),
                topics: r.topics,
                expire_at: r.expire_at,
            }))
        })
    }

    fn refresh(&self, who: Who) -> Option<BoxFuture<'static, Result<Refreshed, Refusal>>> {
        let backend = self.backend(ProxyKind::Refresh)?;
        Some(Box::pin(async move {
            let body = Value::Object(about(&who));
            let answer = backend
                .call(ProxyKind::Refresh, &body)
                .await
                .map_err(|e| Refusal::Denied(e.to_body()))?;
            let r: RefreshResult = read(answered(answer)?, "refresh")?;
            Ok(Refreshed {
                expire_at: r.expire_at,
            })
        }))
    }

    fn subscribe(
        &self,
        who: Who,
        topic: String,
        token: Option<String>,
    ) -> BoxFuture<'static, Result<(), Refusal>> {
        // A valid subscription token grants the subscription whatever the
        // rules say: the application issued it for this user and topic.
        if let Some(token) = &token {
            let checked = self
                .verifier
                .subscription(token, &topic, who.user.as_deref());
            return Box::pin(async move {
                checked.map_err(|e| {
                    Refusal::Denied(ErrorBody::new(
                        ErrorCode::PermissionDenied,
                        format!("the subscription token is refused: {e}"),
                    ))
                })
            });
        }
        let channel = self.rules.channel(&topic);
        let asker = Asker {
            user: who.user.as_deref(),
            roles: &who.roles,
            subscribed: false,
        };
        let decision = channels::may_subscribe(&channel, &topic, asker);
        let backend = self.backend(ProxyKind::Subscribe);
        Box::pin(async move {
            match decision {
                Decision::Allow => Ok(()),
                Decision::Deny(e) => Err(Refusal::Denied(e)),
                Decision::Token => Err(Refusal::Denied(ErrorBody::new(
                    ErrorCode::PermissionDenied,
                    format!(
                        "{topic} needs a subscription token: send \"token\" with topic.subscribe"
                    ),
                ))),
                Decision::Proxy => {
                    let Some(backend) = backend else {
                        return Err(Refusal::Denied(ErrorBody::new(
                            ErrorCode::PermissionDenied,
                            format!(
                                "{topic} is decided by the application's backend, and [proxy] subscribe_url is not set"
                            ),
                        )));
                    };
                    let mut body = about(&who);
                    body.insert("topic".into(), json!(topic));
                    let answer = backend
                        .call(ProxyKind::Subscribe, &Value::Object(body))
                        .await
                        .map_err(|e| Refusal::Denied(e.to_body()))?;
                    answered(answer).map(|_| ())
                }
            }
        })
    }

    fn publish(
        &self,
        who: Who,
        topic: String,
        subscribed: bool,
        data: Value,
    ) -> BoxFuture<'static, Result<Value, Refusal>> {
        let channel = self.rules.channel(&topic);
        let asker = Asker {
            user: who.user.as_deref(),
            roles: &who.roles,
            subscribed,
        };
        let decision = channels::may_publish(&channel, &topic, asker);
        let backend = self.backend(ProxyKind::Publish);
        Box::pin(async move {
            match decision {
                Decision::Allow => Ok(data),
                Decision::Deny(e) => Err(Refusal::Denied(e)),
                Decision::Token => Err(Refusal::Denied(ErrorBody::new(
                    ErrorCode::PermissionDenied,
                    format!("{topic} takes no publications from clients"),
                ))),
                Decision::Proxy => {
                    let Some(backend) = backend else {
                        return Err(Refusal::Denied(ErrorBody::new(
                            ErrorCode::PermissionDenied,
                            format!(
                                "{topic} is decided by the application's backend, and [proxy] publish_url is not set"
                            ),
                        )));
                    };
                    let mut body = about(&who);
                    body.insert("topic".into(), json!(topic));
                    body.insert("data".into(), data.clone());
                    let answer = backend
                        .call(ProxyKind::Publish, &Value::Object(body))
                        .await
                        .map_err(|e| Refusal::Denied(e.to_body()))?;
                    let mut result = answered(answer)?;
                    // The backend may replace what is published.
                    Ok(match result.get_mut("data").map(Value::take) {
                        Some(replaced) => replaced,
                        None => data,
                    })
                }
            }
        })
    }

    fn join_leave(&self, topic: &str) -> bool {
        self.rules.channel(topic).join_leave
    }

    fn presence(&self, topic: &str) -> bool {
        self.rules.channel(topic).presence
    }
}

type ConnectFn = Arc<
    dyn Fn(ConnectRequest) -> BoxFuture<'static, Result<Option<Connected>, Refusal>> + Send + Sync,
>;
type SubscribeFn =
    Arc<dyn Fn(Who, String) -> BoxFuture<'static, Result<(), Refusal>> + Send + Sync>;
type PublishFn =
    Arc<dyn Fn(Who, String, Value) -> BoxFuture<'static, Result<Value, Refusal>> + Send + Sync>;
type DisconnectFn = Arc<dyn Fn(Who) + Send + Sync>;

/// The application's own hooks, set on the
/// [`Builder`](crate::server::Builder) (`on_connect`, `on_subscribe`,
/// `on_publish`, `on_disconnect`).
#[derive(Clone, Default)]
pub(crate) struct AppHooks {
    pub(crate) connect: Option<ConnectFn>,
    pub(crate) subscribe: Vec<SubscribeFn>,
    pub(crate) publish: Vec<PublishFn>,
    pub(crate) disconnect: Vec<DisconnectFn>,
}

impl AppHooks {
    pub(crate) fn is_empty(&self) -> bool {
        self.connect.is_none()
            && self.subscribe.is_empty()
            && self.publish.is_empty()
            && self.disconnect.is_empty()
    }
}

/// gale's own decisions, then the application's: a subscription or a
/// publication passes the topic rules (and the backend, where one is
/// configured) first, then every hook of the application's in the order
/// they were set; a publication's data is what the last one returns. A
/// handshake without a valid token asks the application's connect hook
/// first, and the backend when that leaves it open.
#[derive(Clone)]
pub(crate) struct Chain {
    pub(crate) gale: Arc<dyn Hooks>,
    pub(crate) app: AppHooks,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("gale", &self.gale)
            .field("connect", &self.app.connect.is_some())
            .field("subscribe", &self.app.subscribe.len())
            .field("publish", &self.app.publish.len())
            .field("disconnect", &self.app.disconnect.len())
            .finish()
    }
}

impl Hooks for Chain {
    fn connects(&self) -> bool {
        self.app.connect.is_some() || self.gale.connects()
    }

    fn connect(
        &self,
        req: ConnectRequest,
    ) -> BoxFuture<'static, Result<Option<Connected>, Refusal>> {
        let Some(mine) = self.app.connect.clone() else {
            return self.gale.connect(req);
        };
        let gale = self.gale.clone();
        Box::pin(async move {
            match mine(req.clone()).await? {
                Some(connected) => Ok(Some(connected)),
                None if gale.connects() => gale.connect(req).await,
                None => Ok(None),
            }
        })
    }

    fn refresh(&self, who: Who) -> Option<BoxFuture<'static, Result<Refreshed, Refusal>>> {
        self.gale.refresh(who)
    }

    fn subscribe(
        &self,
        who: Who,
        topic: String,
        token: Option<String>,
    ) -> BoxFuture<'static, Result<(), Refusal>> {
        let gale = self.gale.subscribe(who.clone(), topic.clone(), token);
        let mine = self.app.subscribe.clone();
        Box::pin(async move {
            gale.await?;
            for hook in mine {
                hook(who.clone(), topic.clone()).await?;
            }
            Ok(())
        })
    }

    fn publish(
        &self,
        who: Who,
        topic: String,
        subscribed: bool,
        data: Value,
    ) -> BoxFuture<'static, Result<Value, Refusal>> {
        let gale = self
            .gale
            .publish(who.clone(), topic.clone(), subscribed, data);
        let mine = self.app.publish.clone();
        Box::pin(async move {
            let mut data = gale.await?;
            for hook in mine {
                data = hook(who.clone(), topic.clone(), data).await?;
            }
            Ok(data)
        })
    }

    fn join_leave(&self, topic: &str) -> bool {
        self.gale.join_leave(topic)
    }

    fn presence(&self, topic: &str) -> bool {
        self.gale.presence(topic)
    }

    fn disconnected(&self, who: Who) {
        self.gale.disconnected(who.clone());
        for hook in &self.app.disconnect {
            hook(who.clone());
        }
    }
}
