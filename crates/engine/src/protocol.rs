//! The wire protocol of `/ws`: what the server sends and how a client's
//! text becomes a request. Pure functions and types only; the codec never
//! touches server state.
//!
//! Two protocols share `/ws`. Plain text, which the application's text
//! handler answers (the weather application: a city name, the seed's
//! protocol), after a `{"type":"connected"}` greeting. And JSON events: a
//! text message that is a JSON object `{"event":…,"data":…,"ref":…}` goes
//! to the event router; a `ref` gets exactly one `{"reply":…,"ok":…}`. See
//! `docs/protocol.md`.

use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

/// Longest `ref` accepted, in characters: every reply echoes it.
pub const MAX_REF_CHARS: usize = 256;

/// The greeting sent on connect when the application sets none
/// ([`crate::server::Builder::text`] sets one).
pub const GREETING: &str = "connected: send {\"event\":…,\"data\":…,\"ref\":…}";

/// A message from the server.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerMessage<'a> {
    /// Sent once, right after the upgrade.
    Connected {
        /// The application's greeting ([`GREETING`] by default).
        message: &'a str,
        /// This connection's id; it is also the `client_id` in the
        /// request log.
        client_id: Uuid,
    },
    /// A request failed.
    Error {
        /// Stable, machine-readable reason (see [`ErrorCode`]).
        code: ErrorCode,
        /// What a person can do about it.
        message: &'a str,
    },
}

impl ServerMessage<'_> {
    /// Serialises the message to its JSON text.
    pub fn to_json(&self) -> String {
        // Serialising these plain structs cannot fail: no maps with
        // non-string keys, no failing Serialize impls.
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","code":"internal_error","message":"internal error"}"#.to_owned()
        })
    }
}

/// Stable error codes, shared by both protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The message itself is unusable (binary frame, bad JSON, …).
    InvalidMessage,
    /// No handler is registered for the event.
    UnknownEvent,
    /// The event needs a signed-in user.
    Unauthorized,
    /// The user lacks the role the event needs.
    Forbidden,
    /// Too many events in the window (per user, connection or node).
    RateLimited,
    /// A field's value is unusable (empty city, …).
    InvalidData,
    /// The city does not exist upstream.
    NotFound,
    /// The lookup missed its deadline.
    Timeout,
    /// The upstream failed or the breaker is open.
    UpstreamUnavailable,
    /// The server is too busy to take the request now.
    SystemOverloaded,
    /// A bug on our side.
    InternalError,
    /// A bound on what one client, connection or node may hold was
    /// reached (topics, …); the message names the setting.
    LimitExceeded,
    /// The topic's rules (or the application's backend) do not let this
    /// client subscribe or publish.
    PermissionDenied,
    /// The application's backend refused, with a code of its own (which
    /// is what the client is shown).
    ApplicationError,
}

impl ErrorCode {
    /// The code as it appears on the wire and in the request log.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidMessage => "invalid_message",
            ErrorCode::UnknownEvent => "unknown_event",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::InvalidData => "invalid_data",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Timeout => "timeout",
            ErrorCode::UpstreamUnavailable => "upstream_unavailable",
            ErrorCode::SystemOverloaded => "system_overloaded",
            ErrorCode::InternalError => "internal_error",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::ApplicationError => "application_error",
        }
    }

    /// Every code, in declaration order.
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::InvalidMessage,
        ErrorCode::UnknownEvent,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::InvalidData,
        ErrorCode::NotFound,
        ErrorCode::Timeout,
        ErrorCode::UpstreamUnavailable,
        ErrorCode::SystemOverloaded,
        ErrorCode::InternalError,
        ErrorCode::LimitExceeded,
        ErrorCode::PermissionDenied,
        ErrorCode::ApplicationError,
    ];

    /// The code whose [`ErrorCode::as_str`] is `s`.
    pub fn from_wire(s: &str) -> Option<ErrorCode> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// A JSON event from a client.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event's name, e.g. `weather.get`.
    pub name: String,
    /// Its payload (`null` when absent).
    pub data: Value,
    /// The client's reference; when present the server replies once.
    pub reply_to: Option<Value>,
}

/// What a text message is.
#[derive(Debug, PartialEq)]
pub enum Incoming<'a> {
    /// Plain text, for the application's text handler (the seed's
    /// protocol: a city name).
    Text(&'a str),
    /// A JSON event.
    Event(Event),
    /// Looked like a JSON event but is not one.
    Invalid {
        /// The `ref`, when one could be read, so the error can be matched.
        reply_to: Option<Value>,
        /// What is wrong.
        message: String,
    },
}

/// Sorts a text message: anything starting with `{` must be a JSON event
/// object; everything else is plain text.
pub fn classify(text: &str) -> Incoming<'_> {
    if !text.trim_start().starts_with('{') {
        return Incoming::Text(text);
    }
    let invalid = |reply_to, message: &str| Incoming::Invalid {
        reply_to,
        message: message.to_owned(),
    };
    let mut obj = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(obj)) => obj,
        // serde_json stops at 128 levels, before the stack is at risk.
        Err(e) if e.to_string().starts_with("recursion limit exceeded") => {
            return invalid(None, "JSON nested more than 128 levels deep");
        }
        Err(e) => {
            return Incoming::Invalid {
                reply_to: None,
                message: format!("invalid JSON ({e}): send {{\"event\":…,\"data\":…,\"ref\":…}}"),
            };
        }
        Ok(_) => {
            return invalid(
                None,
                "not a JSON object: send {\"event\":…,\"data\":…,\"ref\":…}",
            );
        }
    };
    let reply_to = match obj.remove("ref") {
        None | Some(Value::Null) => None,
        Some(Value::String(r)) if r.chars().nth(MAX_REF_CHARS).is_some() => {
            return invalid(None, "\"ref\" must be at most 256 characters");
        }
        Some(r @ (Value::String(_) | Value::Number(_))) => Some(r),
        Some(_) => return invalid(None, "\"ref\" must be a string or a number"),
    };
    let name = match obj.remove("event") {
        Some(Value::String(name)) if !name.is_empty() => name,
        _ => return invalid(reply_to, "\"event\" must be a non-empty string"),
    };
    let data = obj.remove("data").unwrap_or(Value::Null);
    Incoming::Event(Event {
        name,
        data,
        reply_to,
    })
}

/// An error as the event protocol reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorBody {
    /// Stable code.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
    /// With `invalid_data`: the field at fault, e.g. `city`.
    pub field: Option<String>,
    /// With `application_error`: the code the application's backend gave
    /// (a string or a number), shown to the client in place of gale's.
    pub app_code: Option<Box<serde_json::Value>>,
}

impl Serialize for ErrorBody {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        match &self.app_code {
            Some(code) => m.serialize_entry("code", code)?,
            None => m.serialize_entry("code", &self.code)?,
        }
        m.serialize_entry("message", &self.message)?;
        // The backend's own code, told apart from gale's that may share
        // its name ("not_found", …).
        if self.app_code.is_some() {
            m.serialize_entry("application", &true)?;
        }
        if let Some(field) = &self.field {
            m.serialize_entry("field", field)?;
        }
        m.end()
    }
}

impl ErrorBody {
    /// An error without a field: what a handler returns to refuse.
    ///
    /// ```
    /// use gale_engine::protocol::{ErrorBody, ErrorCode};
    ///
    /// let e = ErrorBody::new(ErrorCode::PermissionDenied, "join the room first");
    /// assert_eq!(e.code.as_str(), "permission_denied");
    /// ```
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
            field: None,
            app_code: None,
        }
    }

    /// An error the application's backend answered, shown as it gave it.
    pub fn application(code: serde_json::Value, message: impl Into<String>) -> Self {
        ErrorBody {
            app_code: Some(Box::new(code)),
            ..ErrorBody::new(ErrorCode::ApplicationError, message)
        }
    }
}

/// The single reply to an event that carried a `ref`.
pub fn reply_json(reply_to: &Value, result: &Result<Value, ErrorBody>) -> String {
    reply_json_ref(reply_to, result.as_ref())
}

/// As [`reply_json`], from borrowed parts.
pub fn reply_json_ref(reply_to: &Value, result: Result<&Value, &ErrorBody>) -> String {
    #[derive(Serialize)]
    struct Reply<'a> {
        reply: &'a Value,
        ok: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<&'a Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<&'a ErrorBody>,
    }
    let reply = Reply {
        reply: reply_to,
        ok: result.is_ok(),
        data: result.ok(),
        error: result.err(),
    };
    serde_json::to_string(&reply).unwrap_or_else(|_| {
        r#"{"ok":false,"error":{"code":"internal_error","message":"internal error"}}"#.to_owned()
    })
}

/// A server push: `{"event":…,"data":…}`.
pub fn push_json(event: &str, data: &Value) -> String {
    serde_json::json!({ "event": event, "data": data }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_sorts_cities_events_and_garbage() {
        assert_eq!(classify("Paris"), Incoming::Text("Paris"));
        let Incoming::Event(e) =
            classify(r#"{"event":"weather.get","data":{"city":"Paris"},"ref":"17"}"#)
        else {
            panic!("an event")
        };
        assert_eq!(e.name, "weather.get");
        assert_eq!(e.data["city"], "Paris");
        assert_eq!(e.reply_to, Some(Value::from("17")));
        let Incoming::Event(e) = classify(r#"{"event":"server.stats","ref":3}"#) else {
            panic!("an event")
        };
        assert_eq!((e.data, e.reply_to), (Value::Null, Some(Value::from(3))));

        assert!(matches!(
            classify("{nope"),
            Incoming::Invalid { reply_to: None, .. }
        ));
        assert!(matches!(
            classify(r#"{"ref":"9","data":{}}"#),
            Incoming::Invalid {
                reply_to: Some(_),
                ..
            }
        ));
        assert!(matches!(
            classify(r#"{"event":"x","ref":[1]}"#),
            Incoming::Invalid { .. }
        ));
        let long_ref = format!(r#"{{"event":"x","ref":"{}"}}"#, "r".repeat(257));
        assert!(matches!(
            classify(&long_ref),
            Incoming::Invalid { reply_to: None, .. }
        ));
    }

    #[test]
    fn replies_and_pushes_have_the_documented_shape() {
        let ok: Value = serde_json::from_str(&reply_json(
            &Value::from("17"),
            &Ok(serde_json::json!({"a":1})),
        ))
        .expect("json");
        assert_eq!(
            ok,
            serde_json::json!({"reply":"17","ok":true,"data":{"a":1}})
        );
        let mut body = ErrorBody::new(ErrorCode::InvalidData, "city is empty");
        body.field = Some("city".into());
        let err: Value =
            serde_json::from_str(&reply_json(&Value::from(5), &Err(body))).expect("json");
        assert_eq!(
            err,
            serde_json::json!({"reply":5,"ok":false,"error":{"code":"invalid_data","message":"city is empty","field":"city"}})
        );
        let push: Value =
            serde_json::from_str(&push_json("notes.updated", &serde_json::json!({"id":1})))
                .expect("json");
        assert_eq!(
            push,
            serde_json::json!({"event":"notes.updated","data":{"id":1}})
        );
    }

    #[test]
    fn messages_have_the_seed_shape() {
        let id = Uuid::nil();
        let json: serde_json::Value = serde_json::from_str(
            &ServerMessage::Connected {
                message: GREETING,
                client_id: id,
            }
            .to_json(),
        )
        .expect("json");
        assert_eq!(json["type"], "connected");
        assert_eq!(json["message"], GREETING);
        assert_eq!(json["client_id"], id.to_string());

        let err: serde_json::Value = serde_json::from_str(
            &ServerMessage::Error {
                code: ErrorCode::NotFound,
                message: "city not found",
            }
            .to_json(),
        )
        .expect("json");
        assert_eq!(err["type"], "error");
        assert_eq!(err["code"], "not_found");
    }
}
