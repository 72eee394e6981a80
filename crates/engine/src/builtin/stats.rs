//! `server.stats`: the live counters dashboards (and the page) poll:
//! the engine's and every application's part ([`crate::metrics::Part`]).

use std::time::Duration;

use serde_json::{Value, json};

use crate::config::{Priority, Rate};
use crate::router::{Ctx, HandlerResult, Policy, Registry};

/// Registers this application's events.
pub(crate) fn register(r: &mut Registry) {
    r.register(
        "server.stats",
        Policy {
            rate_limit: Some(Rate {
                count: 10,
                per: Duration::from_secs(1),
            }),
            timeout: Duration::from_secs(2),
            priority: Priority::High,
            ..Policy::default()
        },
        server_stats,
    );
}

/// `server.stats`: live counters for dashboards.
async fn server_stats(ctx: Ctx, _: Value) -> HandlerResult {
    let app = &ctx.app;
    app.refresh_gauges();
    let mut stats = app.metrics.to_json();
    stats["router-queue-depth"] = json!(app.router.queue_depth());
    Ok(stats)
}
