//! The applications that run on gale's real-time engine (server,
//! connection, outbox, identity, router, hub and backplane). Each
//! registers its events, with their payload types and built-in policies
//! (overridable per event in the config file), on the router's
//! [`Registry`]:
//!
//! - [`weather`]: a city name as a plain text message, `weather.get`,
//!   `weather.subscribe`, `weather.unsubscribe`, with [`feeds`], one
//!   refresh loop per subscribed city;
//! - [`topics`]: `topic.subscribe`, `topic.unsubscribe`;
//! - [`notes`]: `notes.save`, `notes.list`, `notes.import`;
//! - [`stats`]: the `server.stats` event;
//! - [`presence`]: `presence.online`, who is connected, cluster-wide.
//!
//! The connection hands a plain-text message to [`weather`] and every
//! event to the router; it knows no application.

pub mod feeds;
mod notes;
mod presence;
mod stats;
pub(crate) mod topics;
pub(crate) mod weather;

use crate::broadcast::HubError;
use crate::protocol::{ErrorBody, ErrorCode};
use crate::router::Registry;

/// Registers every shipped application's events.
pub(crate) fn register(r: &mut Registry) {
    weather::register(r);
    topics::register(r);
    notes::register(r);
    stats::register(r);
    presence::register(r);
}

/// A refused subscription or publication, as the client is told: a code
/// that says what happened, and the hub's message (naming the setting).
pub(crate) fn hub_error(e: HubError) -> ErrorBody {
    let code = match e {
        HubError::TooManyTopics(_) | HubError::TopicLimit(_) | HubError::ClientTopicLimit(_) => {
            ErrorCode::LimitExceeded
        }
        HubError::QueueFull | HubError::Closed => ErrorCode::SystemOverloaded,
        HubError::HistoryUnavailable(_) => ErrorCode::UpstreamUnavailable,
        HubError::TooLarge { .. } => ErrorCode::InvalidData,
    };
    ErrorBody::new(code, e.to_string())
}
