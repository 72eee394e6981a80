//! `POST /api/publish`: lets a backend push an event to users, a topic or
//! everyone on this node. Off unless `[api] key` is set; the key comes as
//! `Authorization: Bearer <key>`.
//!
//! Body: `{"event":…,"data":…}` plus exactly one target: `"users":[…]`,
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

use crate::broadcast::{HubError, Target};
use crate::server::App;

/// Most users named in one publish.
pub const MAX_USERS: usize = 10_000;

/// What a publish body may hold beyond the push itself (the target list).
pub const BODY_ALLOWANCE: usize = 1 << 20;

fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

/// Compares in constant time, so timing does not reveal the key (only
/// its length, which is not secret).
fn same(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}

/// The handler.
pub(crate) async fn publish(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(key) = app.config.api.key.as_deref() else {
        return error(
            StatusCode::NOT_FOUND,
            "the publish API is off: set [api] key",
        );
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::identity::bearer);
    if !presented.is_some_and(|p| same(p.as_bytes(), key.as_bytes())) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            axum::Json(json!({"error": "missing or wrong API key: send Authorization: Bearer <[api] key>"})),
        )
            .into_response();
    }
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
    let (event, data, target) = match parse(&body) {
        Ok(p) => p,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    match app.hub.publish(target, &event, &data) {
        Ok(reached) => match &app.cluster {
            None => axum::Json(json!({ "reached": reached })).into_response(),
            // Other nodes deliver on their own; whether they could be told
            // is what `cluster.up` says (when false, their part is lost and
            // counted in gale_cluster_lost_total).
            Some(c) => axum::Json(json!({
                "reached": reached,
                "cluster": {"node": c.node_id(), "up": c.is_up()},
            }))
            .into_response(),
        },
        Err(e @ (HubError::QueueFull | HubError::Closed)) => {
            error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
        }
        Err(e @ HubError::TooLarge { .. }) => error(StatusCode::PAYLOAD_TOO_LARGE, &e.to_string()),
        Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

/// A body that could not be read, answered as the API answers: JSON
/// `{"error": …}` with its status.
fn json_error(e: crate::body::BodyError) -> Response {
    e.close(error(e.status(), &e.to_string()))
}

/// Reads and checks a publish body.
fn parse(body: &[u8]) -> Result<(String, Value, Target), String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
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
