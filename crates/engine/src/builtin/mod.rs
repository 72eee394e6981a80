//! The events every gale server has, registered on the router's
//! [`Registry`] like an application's own (and overridable per event in
//! the config file the same way):
//!
//! - [`topics`]: `topic.subscribe`, `topic.unsubscribe`, `topic.publish`,
//!   `topic.presence`;
//! - `stats`: the `server.stats` event;
//! - `presence`: `presence.online`, who is connected, cluster-wide.

mod presence;
mod stats;
pub mod topics;

pub use topics::answer_with_recovery;

use crate::broadcast::HubError;
use crate::protocol::{ErrorBody, ErrorCode};
use crate::router::Registry;

/// Registers the engine's own events.
pub(crate) fn register(r: &mut Registry) {
    topics::register(r);
    stats::register(r);
    presence::register(r);
}

/// A refused subscription or publication, as the client is told: a code
/// that says what happened, and the hub's message (naming the setting).
pub fn hub_error(e: HubError) -> ErrorBody {
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
