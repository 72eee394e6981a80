//! The wire protocol of `/ws`: what the server sends and how a client's
//! text becomes a request. Pure functions and types only; the codec never
//! touches server state.
//!
//! The seed's protocol, kept exactly: each text message is a city name;
//! replies are JSON objects with a `type` of `connected`, `weather` or
//! `error`. See `docs/protocol.md`.

use serde::Serialize;
use uuid::Uuid;

use crate::weather::Reading;

/// Longest city name accepted, in characters.
pub const MAX_CITY_CHARS: usize = 100;

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

/// Stable error codes; the same names the JSON event protocol uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The message itself is unusable (binary frame, bad JSON, …).
    InvalidMessage,
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
}

impl ErrorCode {
    /// The code as it appears on the wire and in the request log.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidMessage => "invalid_message",
            ErrorCode::InvalidData => "invalid_data",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Timeout => "timeout",
            ErrorCode::UpstreamUnavailable => "upstream_unavailable",
            ErrorCode::SystemOverloaded => "system_overloaded",
            ErrorCode::InternalError => "internal_error",
        }
    }
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

/// The cache key for a city: case and inner white space do not matter, so
/// "new  york" and "New York" share one upstream call.
pub fn normalise_city(city: &str) -> String {
    let mut key = String::with_capacity(city.len());
    for word in city.split_whitespace() {
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
