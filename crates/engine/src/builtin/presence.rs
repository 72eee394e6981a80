//! `presence.online {users}`: which of these users are connected now, on
//! any node (Sente's `connected-uids`, asked about specific users).
//!
//! On a single node the hub answers. In cluster mode this node's hub is
//! asked first (exact, at once), then the cluster's presence, which is as
//! fresh as the last refresh of each node (a third of
//! `cluster.presence_ttl_s`). When Redis does not answer, only this node's
//! users are known (counted as a fallback).

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::metrics::Fallback;
use crate::protocol::ErrorBody;
use crate::router::{Ctx, HandlerResult, Payload, Policy, Registry, invalid_field};

/// Most users asked about at once.
const MAX_USERS: usize = 100;

/// Registers this application's events.
pub(crate) fn register(r: &mut Registry) {
    r.register(
        "presence.online",
        Policy {
            requires_auth: true,
            ..Policy::default()
        },
        online,
    );
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnlineRequest {
    users: Vec<String>,
}

impl Payload for OnlineRequest {
    fn validate(&self) -> Result<(), ErrorBody> {
        if self.users.is_empty() || self.users.len() > MAX_USERS {
            return Err(invalid_field(
                "users",
                format!("name 1 to {MAX_USERS} users"),
            ));
        }
        if self.users.iter().any(|u| u.is_empty() || u.len() > 256) {
            return Err(invalid_field("users", "a user id is 1 to 256 bytes"));
        }
        Ok(())
    }
}

/// Replies `{"online": {"alice": true, "bob": false}}`.
async fn online(ctx: Ctx, req: OnlineRequest) -> HandlerResult {
    let app = &ctx.app;
    let mut found: Vec<bool> = req.users.iter().map(|u| app.hub.is_online(u)).collect();
    if let Some(cluster) = &app.cluster {
        match cluster.online(&req.users).await {
            Ok(anywhere) => {
                for (f, a) in found.iter_mut().zip(anywhere) {
                    *f |= a;
                }
            }
            Err(e) => cluster.fell_back(Fallback::Presence, &e),
        }
    }
    let online: Map<String, Value> = req
        .users
        .into_iter()
        .zip(found)
        .map(|(u, f)| (u, Value::Bool(f)))
        .collect();
    Ok(serde_json::json!({ "online": online }))
}
