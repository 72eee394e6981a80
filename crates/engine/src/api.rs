//! The server API: `POST /api/NAME` with a JSON body, for the
//! application's backend. Off unless `[api] key` is set; the key comes as
//! `Authorization: Bearer <key>`. `[api] read_key`, when set, may call the
//! methods that only read (presence, presence_stats, history, topics,
//! info). Every method answers 200 with its result object, or an HTTP
//! error status with `{"error": "…"}`; in cluster mode each reaches every
//! node ([`crate::control`]).
//!
//! - `publish`: below.
//! - `broadcast {topics, event, data}`: one push to many topics.
//! - `subscribe` / `unsubscribe {user, topic}`: that user's connections.
//! - `disconnect {user | client, code?, reason?}`.
//! - `presence {topic}`, `presence_stats {topic}`.
//! - `history {topic, since?, limit?}`.
//! - `topics {pattern?}`: active topics with their subscribers.
//! - `info {}`: nodes, connections, users, version.
//! - `batch {commands: [{method, params}]}`: answered in order.
//!
//! `publish` body: `{"event":…,"data":…}` plus exactly one target: `"users":[…]`,
//! `"topic":"…"` or `"broadcast":true`. Answers 200 with
//! `{"reached":N}`, the connections the target has on this node now. In
//! cluster mode the push also goes to every other node with recipients
//! (at most once each, not counted in `reached`), and the answer adds
//! `"cluster":{"node":…,"up":…}`: with `up` false the other nodes could
//! not be told.
//!
//! Size: the push (`{"event":…,"data":…}` as the server encodes it) must
//! fit `server.max_outbound_message_bytes`, so that every recipient can be
//! sent it; the body may be up to 1 MiB more than that (room for a long
//! `users` list). Past either limit the answer is 413 and nothing is sent.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::broadcast::{Ending, HubError, Target};
use crate::control::Command;
use crate::server::App;

/// Most users named in one publish.
pub(crate) const MAX_USERS: usize = 10_000;

/// What a publish body may hold beyond the push itself (the target list).
pub(crate) const BODY_ALLOWANCE: usize = 1 << 20;

fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

/// Compares in constant time, so timing does not reveal the key (only
/// its length, which is not secret).
fn same(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Everything.
    Full,
    /// The methods that only read.
    Read,
}

/// The methods that only read.
const READ_ONLY: [&str; 5] = ["presence", "presence_stats", "history", "topics", "info"];

/// Most commands in one batch.
pub(crate) const MAX_BATCH: usize = 1_000;

/// Most topics in one broadcast.
pub(crate) const MAX_TOPICS: usize = 1_000;

/// Most clients a presence answer lists.
const MAX_PRESENCE: usize = 10_000;

/// An API failure: its status and message.
type Failure = (StatusCode, String);

fn failed(status: StatusCode, message: impl Into<String>) -> Failure {
    (status, message.into())
}

/// `POST /api/{method}`: checks the key, reads the body, runs the method.
pub(crate) async fn call(
    State(app): State<Arc<App>>,
    axum::extract::Path(method): axum::extract::Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let access = match authorized(&app, &headers) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let limit = app.config.server.max_outbound_message_bytes + BODY_ALLOWANCE;
    let body = match crate::body::read(
        &headers,
        body,
        limit,
        "server.max_outbound_message_bytes + 1 MiB",
    )
    .await
    {
        Ok(body) => body,
        Err(e) => return json_error(e),
    };
    let params: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return error(StatusCode::BAD_REQUEST, "the body must be a JSON object"),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("the body is not JSON: {e}"),
            );
        }
    };
    match run(&app, access, &method, params).await {
        Ok(result) => axum::Json(result).into_response(),
        Err((status, message)) => error(status, &message),
    }
}

/// Which key came, and what it may do.
#[allow(clippy::result_large_err)]
fn authorized(app: &App, headers: &HeaderMap) -> Result<Access, Response> {
    let Some(key) = app.config.api.key.as_deref() else {
        return Err(error(
            StatusCode::NOT_FOUND,
            "the server API is off: set [api] key",
        ));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::identity::bearer);
    match presented {
        Some(p) if same(p.as_bytes(), key.as_bytes()) => Ok(Access::Full),
        Some(p)
            if app
                .config
                .api
                .read_key
                .as_deref()
                .is_some_and(|r| same(p.as_bytes(), r.as_bytes())) =>
        {
            Ok(Access::Read)
        }
        _ => Err((
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            axum::Json(json!({"error": "missing or wrong API key: send Authorization: Bearer <[api] key>"})),
        )
            .into_response()),
    }
}

/// Runs one method.
fn run<'a>(
    app: &'a Arc<App>,
    access: Access,
    method: &'a str,
    params: Value,
) -> futures_util::future::BoxFuture<'a, Result<Value, Failure>> {
    Box::pin(async move {
        if access == Access::Read && !READ_ONLY.contains(&method) {
            return Err(failed(
                StatusCode::FORBIDDEN,
                format!("the read-only key ([api] read_key) may not call {method}"),
            ));
        }
        match method {
            "publish" => publish_params(app, params),
            "broadcast" => broadcast(app, params),
            "subscribe" | "unsubscribe" => subscription(app, method, params).await,
            "disconnect" => disconnect(app, params).await,
            "presence" => {
                let topic = topic_param(&params)?;
                Ok(crate::builtin::topics::presence_of(app, &topic, MAX_PRESENCE).await)
            }
            "presence_stats" => {
                let topic = topic_param(&params)?;
                let p = crate::builtin::topics::presence_of(app, &topic, usize::MAX).await;
                Ok(json!({"topic": topic, "clients": p["count"], "users": p["users"]}))
            }
            "history" => history(app, params).await,
            "topics" => topics(app, params).await,
            "info" => Ok(info(app).await),
            "batch" => batch(app, access, params).await,
            _ => Err(failed(
                StatusCode::NOT_FOUND,
                format!(
                    "no API method {:?}: publish, broadcast, subscribe, unsubscribe, disconnect, presence, presence_stats, history, topics, info, batch",
                    method.chars().take(64).collect::<String>()
                ),
            )),
        }
    })
}

/// A string field of the parameters.
fn string_param(params: &Value, name: &str) -> Result<String, Failure> {
    match &params[name] {
        Value::String(s) if !s.is_empty() => Ok(s.clone()),
        _ => Err(failed(
            StatusCode::BAD_REQUEST,
            format!("\"{name}\" must be a non-empty string"),
        )),
    }
}

fn topic_param(params: &Value) -> Result<String, Failure> {
    let topic = string_param(params, "topic")?;
    if topic.chars().count() > 128 {
        return Err(failed(
            StatusCode::BAD_REQUEST,
            "\"topic\" is at most 128 characters",
        ));
    }
    Ok(topic)
}

/// A hub refusal as an API failure.
fn hub_failure(e: HubError) -> Failure {
    let status = match e {
        HubError::QueueFull | HubError::Closed => StatusCode::SERVICE_UNAVAILABLE,
        HubError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::BAD_REQUEST,
    };
    failed(status, e.to_string())
}

/// What every answer about a push adds in cluster mode.
fn with_cluster(app: &App, mut result: Value) -> Value {
    if let Some(c) = &app.cluster {
        // Other nodes deliver on their own; whether they could be told is
        // what `cluster.up` says (when false, their part is lost and
        // counted in gale_cluster_lost_total).
        result["cluster"] = json!({"node": c.node_id(), "up": c.is_up()});
    }
    result
}

/// `publish`: one push to users, a topic or everyone.
fn publish_params(app: &App, params: Value) -> Result<Value, Failure> {
    let (event, data, target) =
        parse_value(params).map_err(|m| failed(StatusCode::BAD_REQUEST, m))?;
    let reached = app
        .hub
        .publish(target, &event, &data)
        .map_err(hub_failure)?;
    Ok(with_cluster(app, json!({ "reached": reached })))
}

/// `broadcast {topics, event, data}`: one push to each topic.
fn broadcast(app: &App, params: Value) -> Result<Value, Failure> {
    let topics: Vec<String> = match &params["topics"] {
        Value::Array(list) if !list.is_empty() && list.len() <= MAX_TOPICS => list
            .iter()
            .map(|t| match t {
                Value::String(s) if !s.is_empty() => Ok(s.clone()),
                _ => Err(failed(
                    StatusCode::BAD_REQUEST,
                    "\"topics\" must be a list of non-empty strings",
                )),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(failed(
                StatusCode::BAD_REQUEST,
                format!("\"topics\" must list 1 to {MAX_TOPICS} topics"),
            ));
        }
    };
    let event = match &params["event"] {
        Value::String(e) if !e.is_empty() && e.chars().count() <= 128 => e.clone(),
        _ => {
            return Err(failed(
                StatusCode::BAD_REQUEST,
                "\"event\" must be a string of 1 to 128 characters",
            ));
        }
    };
    let data = params.get("data").cloned().unwrap_or(Value::Null);
    let mut reached = 0;
    for topic in topics {
        reached += app
            .hub
            .publish(Target::Topic(topic), &event, &data)
            .map_err(hub_failure)?;
    }
    Ok(with_cluster(app, json!({ "reached": reached })))
}

/// Adds up one number field over every node's answer (another node's
/// numbers, saturating rather than wrapping).
fn total(answers: &[Value], field: &str) -> u64 {
    answers
        .iter()
        .filter_map(|a| a[field].as_u64())
        .fold(0, u64::saturating_add)
}

/// `subscribe` / `unsubscribe {user, topic}`: that user's connections on
/// every node.
async fn subscription(app: &Arc<App>, method: &str, params: Value) -> Result<Value, Failure> {
    let user = string_param(&params, "user")?;
    let topic = topic_param(&params)?;
    let (cmd, field) = if method == "subscribe" {
        let announce = app.hooks.join_leave(&topic);
        (
            Command::Subscribe {
                user,
                topic: topic.clone(),
                announce,
            },
            "subscribed",
        )
    } else {
        (
            Command::Unsubscribe {
                user,
                topic: topic.clone(),
            },
            "unsubscribed",
        )
    };
    let answers = crate::control::everywhere(&app.hub, app.node_id(), cmd).await;
    Ok(json!({"topic": topic, field: total(&answers, field), "nodes": answers.len()}))
}

/// `disconnect {user | client, code?, reason?}`.
async fn disconnect(app: &Arc<App>, params: Value) -> Result<Value, Failure> {
    let who = match (&params["user"], &params["client"]) {
        (Value::String(u), Value::Null) if !u.is_empty() => Ending::User(u.clone()),
        (Value::Null, Value::String(c)) => Ending::Client(c.parse().map_err(|_| {
            failed(
                StatusCode::BAD_REQUEST,
                "\"client\" must be a client_id (a UUID)",
            )
        })?),
        _ => {
            return Err(failed(
                StatusCode::BAD_REQUEST,
                "name exactly one of \"user\" or \"client\"",
            ));
        }
    };
    let code = match &params["code"] {
        Value::Null => 4000,
        v => v
            .as_u64()
            .filter(|c| *c == 1000 || (3000..=4999).contains(c))
            .ok_or_else(|| {
                failed(
                    StatusCode::BAD_REQUEST,
                    "\"code\" must be 1000, or from 3000 to 4999",
                )
            })? as u16,
    };
    let reason = match &params["reason"] {
        Value::Null => "disconnected by the application".to_owned(),
        Value::String(r) if r.len() <= 123 => r.clone(),
        _ => {
            return Err(failed(
                StatusCode::BAD_REQUEST,
                "\"reason\" must be a string of at most 123 bytes",
            ));
        }
    };
    let answers = crate::control::everywhere(
        &app.hub,
        app.node_id(),
        Command::Disconnect { who, code, reason },
    )
    .await;
    Ok(json!({"disconnected": total(&answers, "disconnected"), "nodes": answers.len()}))
}

/// `history {topic, since?, limit?}`: the publications kept, oldest
/// first: after `since` (a position), or the last `limit` (default: all
/// kept).
pub(crate) async fn history(app: &App, params: Value) -> Result<Value, Failure> {
    let topic = topic_param(&params)?;
    let since: Option<crate::history::Since> = match params.get("since") {
        None | Some(Value::Null) => None,
        Some(v) => Some(serde_json::from_value(v.clone()).map_err(|e| {
            failed(
                StatusCode::BAD_REQUEST,
                format!("\"since\" must be {{\"offset\", \"epoch\"}}: {e}"),
            )
        })?),
    };
    let limit = match &params["limit"] {
        Value::Null => usize::MAX,
        v => v.as_u64().filter(|n| *n > 0).ok_or_else(|| {
            failed(
                StatusCode::BAD_REQUEST,
                "\"limit\" must be a whole number above 0",
            )
        })? as usize,
    };
    let Some(read) = app.hub.recover(&topic, None).await else {
        return Err(failed(
            StatusCode::BAD_REQUEST,
            format!("{topic} keeps no history (no [topics] block sets history_size)"),
        ));
    };
    let position = read.map_err(hub_failure)?.position;
    let found = match since {
        Some(since) => read_since(app, &topic, since).await?,
        None => latest(app, &topic, &position, limit).await?,
    };
    let (complete, publications) = match found.publications {
        Some(p) => (true, p),
        None => (false, Vec::new()),
    };
    let publications: Vec<Value> = publications
        .iter()
        .rev()
        .take(limit)
        .rev()
        .filter_map(|p| serde_json::from_str(p.as_str()).ok())
        .collect();
    Ok(json!({
        "topic": topic,
        "offset": found.position.offset,
        "epoch": &*found.position.epoch,
        "complete": complete,
        "publications": publications,
    }))
}

/// The publications after `since` (all or none: `publications` is
/// `None` when some are gone).
async fn read_since(
    app: &App,
    topic: &str,
    since: crate::history::Since,
) -> Result<crate::history::Recovery, Failure> {
    app.hub
        .recover(topic, Some(since))
        .await
        .into_iter()
        .flatten()
        .next()
        .ok_or_else(|| {
            failed(
                StatusCode::SERVICE_UNAVAILABLE,
                "the history is unavailable",
            )
        })
}

/// The last `limit` publications the topic still keeps (fewer when
/// fewer are kept): the largest window behind `position` that is whole,
/// found by halving (a read per step, so at most ~17 for 100,000).
async fn latest(
    app: &App,
    topic: &str,
    position: &crate::history::Position,
    limit: usize,
) -> Result<crate::history::Recovery, Failure> {
    let at = |n: u64| crate::history::Since {
        offset: position.offset - n,
        epoch: position.epoch.to_string(),
    };
    let mut want = position.offset.min(limit.min(100_000) as u64);
    let found = read_since(app, topic, at(want)).await?;
    if found.publications.is_some() || want == 0 {
        return Ok(found);
    }
    // `ok` publications are known to be kept, `want` not.
    let (mut ok, mut best) = (0, read_since(app, topic, at(0)).await?);
    while want - ok > 1 {
        let mid = ok + (want - ok) / 2;
        let r = read_since(app, topic, at(mid)).await?;
        if r.publications.is_some() {
            (ok, best) = (mid, r);
        } else {
            want = mid;
        }
    }
    Ok(best)
}

/// `topics {pattern?}`: topics with subscribers on any node.
async fn topics(app: &Arc<App>, params: Value) -> Result<Value, Failure> {
    let pattern = match &params["pattern"] {
        Value::Null => None,
        Value::String(p) => Some(p.clone()),
        _ => {
            return Err(failed(
                StatusCode::BAD_REQUEST,
                "\"pattern\" must be a string",
            ));
        }
    };
    let answers = crate::control::everywhere(
        &app.hub,
        app.node_id(),
        Command::Topics {
            pattern,
            limit: MAX_PRESENCE,
        },
    )
    .await;
    let mut counts: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for t in answers
        .iter()
        .filter_map(|a| a["topics"].as_array())
        .flatten()
    {
        if let (Some(name), Some(n)) = (t["topic"].as_str(), t["subscribers"].as_u64()) {
            let count = counts.entry(name.to_owned()).or_default();
            *count = count.saturating_add(n);
        }
    }
    let topics: Vec<Value> = counts
        .into_iter()
        .take(MAX_PRESENCE)
        .map(|(topic, n)| json!({"topic": topic, "subscribers": n}))
        .collect();
    Ok(json!({ "topics": topics }))
}

/// `info {}`: every node's counts and the version.
async fn info(app: &Arc<App>) -> Value {
    let nodes = crate::control::everywhere(&app.hub, app.node_id(), Command::Info).await;
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "connections": total(&nodes, "connections"),
        "nodes": nodes,
    })
}

/// `batch {commands: [{method, params}]}`: each run in order; each answer
/// `{"result": …}` or `{"error": "…", "status": N}`.
async fn batch(app: &Arc<App>, access: Access, params: Value) -> Result<Value, Failure> {
    let Some(commands) = params["commands"]
        .as_array()
        .filter(|c| !c.is_empty() && c.len() <= MAX_BATCH)
    else {
        return Err(failed(
            StatusCode::BAD_REQUEST,
            format!("\"commands\" must list 1 to {MAX_BATCH} {{\"method\", \"params\"}}"),
        ));
    };
    let mut replies = Vec::with_capacity(commands.len());
    for c in commands {
        let reply = match (
            c["method"].as_str(),
            c.get("params").cloned().unwrap_or(json!({})),
        ) {
            (Some("batch"), _) => json!({"error": "a batch may not hold a batch", "status": 400}),
            (Some(method), params @ Value::Object(_)) => {
                match run(app, access, method, params).await {
                    Ok(result) => json!({ "result": result }),
                    Err((status, message)) => json!({"error": message, "status": status.as_u16()}),
                }
            }
            _ => {
                json!({"error": "each command is {\"method\": NAME, \"params\": {…}}", "status": 400})
            }
        };
        replies.push(reply);
    }
    Ok(json!({ "replies": replies }))
}

/// A body that could not be read, answered as the API answers: JSON
/// `{"error": …}` with its status.
fn json_error(e: crate::body::BodyError) -> Response {
    e.close(error(e.status(), &e.to_string()))
}

/// Reads and checks a publish body.
#[cfg(test)]
fn parse(body: &[u8]) -> Result<(String, Value, Target), String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    parse_value(v)
}

/// Checks a publish request's parameters.
fn parse_value(v: Value) -> Result<(String, Value, Target), String> {
    let Value::Object(mut obj) = v else {
        return Err("the body must be a JSON object".into());
    };
    let event = match obj.remove("event") {
        Some(Value::String(e)) if !e.is_empty() && e.len() <= 128 => e,
        _ => return Err("\"event\" must be a string of 1 to 128 characters".into()),
    };
    let data = obj.remove("data").unwrap_or(Value::Null);
    let users = obj.remove("users");
    let topic = obj.remove("topic");
    let broadcast = obj.remove("broadcast");
    if let Some(extra) = obj.keys().next() {
        return Err(format!("unknown field {extra:?}"));
    }
    let target = match (users, topic, broadcast) {
        (Some(Value::Array(list)), None, None) => {
            if list.is_empty() || list.len() > MAX_USERS {
                return Err(format!("\"users\" must list 1 to {MAX_USERS} user ids"));
            }
            let ids = list
                .into_iter()
                .map(|u| match u {
                    Value::String(s) if !s.is_empty() => Ok(s),
                    _ => Err("\"users\" must be a list of non-empty strings".to_owned()),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Target::Users(ids)
        }
        (None, Some(Value::String(t)), None) if !t.is_empty() => Target::Topic(t),
        (None, None, Some(Value::Bool(true))) => Target::Everyone,
        (None, None, None) => {
            return Err(
                "name a target: \"users\":[…], \"topic\":\"…\" or \"broadcast\":true".into(),
            );
        }
        (Some(_), None, None) => return Err("\"users\" must be a list of user ids".into()),
        (None, Some(_), None) => return Err("\"topic\" must be a non-empty string".into()),
        (None, None, Some(_)) => return Err("\"broadcast\" must be true".into()),
        _ => return Err("name exactly one target: users, topic or broadcast".into()),
    };
    Ok((event, data, target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_nodes_numbers_add_up_without_wrapping() {
        let answers = [
            json!({"connections": u64::MAX}),
            json!({"connections": 2}),
            json!({"connections": "many"}),
        ];
        assert_eq!(total(&answers, "connections"), u64::MAX);
        assert_eq!(total(&answers[1..], "connections"), 2);
    }

    #[test]
    fn bodies() {
        let ok = |b: &str| parse(b.as_bytes()).expect(b);
        assert_eq!(
            ok(r#"{"event":"e","data":1,"users":["a","b"]}"#).2,
            Target::Users(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            ok(r#"{"event":"e","topic":"t"}"#).2,
            Target::Topic("t".into())
        );
        assert_eq!(ok(r#"{"event":"e","broadcast":true}"#).2, Target::Everyone);
        for bad in [
            "nope",
            "[]",
            r#"{"data":1,"broadcast":true}"#,
            r#"{"event":"e"}"#,
            r#"{"event":"e","topic":"t","broadcast":true}"#,
            r#"{"event":"e","users":[]}"#,
            r#"{"event":"e","users":[1]}"#,
            r#"{"event":"e","broadcast":false}"#,
            r#"{"event":"e","broadcast":true,"extra":1}"#,
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad} must be refused");
        }
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"ab", b"abc"));
    }
}
