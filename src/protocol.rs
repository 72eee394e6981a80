//! The wire protocol of `/ws`: what the server sends and how a client's
//! text becomes a request. Pure functions and types only; the codec never
//! touches server state.
//!
//! Two protocols share `/ws`. The seed's, kept exactly: each text message
//! is a city name; replies are JSON objects with a `type` of `connected`,
//! `weather` or `error`. And JSON events: a text message that is a JSON
//! object `{"event":…,"data":…,"ref":…}` goes to the event router; a `ref`
//! gets exactly one `{"reply":…,"ok":…}`. See `docs/protocol.md`.

use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::weather::Reading;

/// Longest city name accepted, in characters.
pub const MAX_CITY_CHARS: usize = 100;

/// Longest `ref` accepted, in characters: every reply echoes it.
pub const MAX_REF_CHARS: usize = 256;

/// The greeting sent on connect.
pub const GREETING: &str = "Send city name to get weather";

/// A message from the server.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerMessage<'a> {
    /// Sent once, right after the upgrade.
    Connected {
        /// Always [`GREETING`].
        message: &'a str,
        /// This connection's id; it is also the `client_id` in the
        /// request log.
        client_id: Uuid,
    },
    /// A reading for the requested city.
    Weather {
        /// The city as the provider names it.
        city: &'a str,
        /// Degrees Celsius.
        temperature: f64,
        /// Degrees Celsius.
        feels_like: f64,
        /// Human description, e.g. "light rain".
        description: &'a str,
        /// Relative humidity, percent.
        humidity: u32,
    },
    /// A request failed.
    Error {
        /// Stable, machine-readable reason (see [`ErrorCode`]).
        code: ErrorCode,
        /// What a person can do about it.
        message: &'a str,
        /// The city as the client sent it, so a client with several
        /// requests in flight can match the reply.
        #[serde(skip_serializing_if = "Option::is_none")]
        city: Option<&'a str>,
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

    /// The reply for a reading.
    pub fn weather(r: &Reading) -> ServerMessage<'_> {
        ServerMessage::Weather {
            city: &r.city,
            temperature: r.temperature,
            feels_like: r.feels_like,
            description: &r.description,
            humidity: r.humidity,
        }
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
    /// Plain text: a city name (the seed's protocol).
    City(&'a str),
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
/// object (no city starts with a brace); everything else is a city.
pub fn classify(text: &str) -> Incoming<'_> {
    if !text.trim_start().starts_with('{') {
        return Incoming::City(text);
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
    /// An error without a field.
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

/// Why a city name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidCity {
    /// Nothing but white space.
    #[error("invalid city: the name is empty; send a city name such as \"London\"")]
    Empty,
    /// Longer than [`MAX_CITY_CHARS`].
    #[error("invalid city: the name is too long (at most 100 characters)")]
    TooLong,
    /// Contains control characters (newlines, NUL, …).
    #[error("invalid city: the name contains control characters")]
    ControlCharacters,
}

/// Checks a city name as the client sent it and returns it trimmed.
///
/// # Errors
/// [`InvalidCity`] when the name is empty, too long or has control
/// characters.
pub fn parse_city(text: &str) -> Result<&str, InvalidCity> {
    let city = text.trim();
    if city.is_empty() {
        return Err(InvalidCity::Empty);
    }
    if city.chars().nth(MAX_CITY_CHARS).is_some() {
        return Err(InvalidCity::TooLong);
    }
    if city.chars().any(char::is_control) {
        return Err(InvalidCity::ControlCharacters);
    }
    Ok(city)
}

/// Longest city echoed in an error reply, in characters.
pub const MAX_ECHOED_CITY_CHARS: usize = 200;

/// The city an error reply echoes: what the client sent, trimmed and cut
/// to [`MAX_ECHOED_CITY_CHARS`] (JSON escaping keeps it safe on the wire).
pub fn echoed_city(text: &str) -> &str {
    let city = text.trim();
    match city.char_indices().nth(MAX_ECHOED_CITY_CHARS) {
        Some((cut, _)) => &city[..cut],
        None => city,
    }
}

/// A city's canonical form: the text gale both caches under and asks the
/// provider for, so no spelling can fill the cache entry of another.
/// Compatibility characters are folded (NFKC: `K` U+212A KELVIN SIGN is
/// `K`, full-width `Ｋ` is `K`), case does not matter (lower case), nor does
/// white space (trimmed, runs of it one space): "New  York", "new york"
/// and "ＮＥＷ ＹＯＲＫ" are one city, asked as "new york". Providers match
/// names without regard to case.
pub fn normalise_city(city: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    let folded: String;
    let text = if city.is_ascii() {
        city
    } else {
        // Lower-casing can undo NFKC (rarely), hence once more after it.
        folded = city.nfkc().flat_map(char::to_lowercase).nfkc().collect();
        &folded
    };
    let mut key = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !key.is_empty() {
            key.push(' ');
        }
        key.extend(word.chars().flat_map(char::to_lowercase));
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn city_validation() {
        assert_eq!(parse_city("  London "), Ok("London"));
        assert_eq!(parse_city(" \t "), Err(InvalidCity::Empty));
        assert_eq!(parse_city(&"a".repeat(100)), Ok("a".repeat(100).as_str()));
        assert_eq!(parse_city(&"a".repeat(101)), Err(InvalidCity::TooLong));
        assert_eq!(parse_city("São Paulo"), Ok("São Paulo"));
        assert_eq!(
            parse_city("Lon\u{0}don"),
            Err(InvalidCity::ControlCharacters)
        );
        assert_eq!(parse_city("Lon\ndon"), Err(InvalidCity::ControlCharacters));
    }

    #[test]
    fn normalisation_ignores_case_and_spacing() {
        assert_eq!(normalise_city("New   York"), "new york");
        assert_eq!(normalise_city("ZÜRICH"), "zürich");
        // Decomposed Ü (U + combining diaeresis) is the same city.
        assert_eq!(normalise_city("ZU\u{308}RICH"), "zürich");
    }

    #[test]
    fn look_alike_spellings_are_one_canonical_form() {
        for spelling in [
            "\u{212A}yiv",
            "\u{FF2B}\u{FF59}\u{FF49}\u{FF56}",
            "KYIV",
            " kyiv\u{3000}",
        ] {
            assert_eq!(normalise_city(spelling), "kyiv", "{spelling:?}");
        }
        // Idempotent: the canonical form is its own key.
        for city in ["Straße", "İstanbul", "ΣΊΣΥΦΟΣ", "\u{FDFA}", "ǅemal"] {
            let once = normalise_city(city);
            assert_eq!(normalise_city(&once), once, "{city:?}");
        }
    }

    #[test]
    fn classify_sorts_cities_events_and_garbage() {
        assert_eq!(classify("Paris"), Incoming::City("Paris"));
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
        assert_eq!(json["message"], "Send city name to get weather");
        assert_eq!(json["client_id"], id.to_string());

        let err: serde_json::Value = serde_json::from_str(
            &ServerMessage::Error {
                code: ErrorCode::NotFound,
                message: "city not found",
                city: Some("Atlantis"),
            }
            .to_json(),
        )
        .expect("json");
        assert_eq!(err["type"], "error");
        assert_eq!(err["code"], "not_found");
        assert_eq!(err["city"], "Atlantis");
    }
}
