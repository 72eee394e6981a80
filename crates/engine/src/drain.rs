//! Draining: a node going away closes its connections spread evenly over
//! `server.drain_s`, each with close code 1012 (service restart) and a
//! reason that suggests a jittered reconnect delay, `{"reconnect_ms":N}`,
//! so its clients come back to the other nodes as a trickle rather than
//! a wave. `/healthz` answers 503 `draining` from the first moment and
//! new handshakes are refused (503, `Retry-After`), so a load balancer
//! stops sending new clients at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::server::App;

/// Close code 1012: the service is restarting; come back.
pub(crate) const SERVICE_RESTART: u16 = 1012;

/// How often the drain closes the connections that are due.
const STEP: Duration = Duration::from_millis(10);

/// A number drawn uniformly from 0 to `max` (inclusive).
pub(crate) fn jitter(max: u64) -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0 % (max + 1)
}

/// A close reason suggesting a reconnect delay of up to `max_ms`:
/// `{"reconnect_ms":N}`.
pub(crate) fn reason(max_ms: u64) -> String {
    format!("{{\"reconnect_ms\":{}}}", jitter(max_ms))
}

/// Closes every connection open now (WebSocket and SSE), spread evenly
/// over `over` (the first at once, the last at (n-1)/n of it), each with
/// 1012 and a suggested delay, and returns at the end of the window.
/// Returns how many it closed.
pub(crate) async fn run(app: &Arc<App>, over: Duration) -> usize {
    let outboxes = app.hub.outboxes();
    let n = outboxes.len();
    tracing::info!(
        connections = n,
        over_s = over.as_secs_f64(),
        "draining: closing connections spread over the window"
    );
    let max_ms = app.config.server.drain_reconnect_ms;
    let start = Instant::now();
    let mut closed = 0;
    while closed < n {
        // Connection i goes at i/n of the window: those due by now.
        let elapsed = start.elapsed().as_secs_f64();
        let due = if over.is_zero() {
            n
        } else {
            ((elapsed / over.as_secs_f64() * n as f64).floor() as usize + 1).min(n)
        };
        for outbox in &outboxes[closed..due] {
            // One the application (or a takeover) ended already is not
            // counted again.
            if outbox.end_after_replies(SERVICE_RESTART, &reason(max_ms)) {
                app.metrics.drained.inc();
            }
        }
        closed = due;
        if closed < n {
            tokio::time::sleep(STEP).await;
        }
    }
    // The node stays for the whole window, answering /healthz "draining"
    // and telling handshakes when to come back, so a load balancer that
    // checks every few seconds sees it go before the door shuts.
    tokio::time::sleep_until(start + over).await;
    closed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reason_is_json_with_a_delay_within_the_bound() {
        for _ in 0..1_000 {
            let r: serde_json::Value = serde_json::from_str(&reason(300)).expect("test");
            let ms = r["reconnect_ms"].as_u64().expect("test");
            assert!(ms <= 300, "{ms}");
        }
        assert_eq!(jitter(0), 0);
    }

    #[test]
    fn delays_are_spread_not_all_the_same() {
        let seen: std::collections::HashSet<u64> = (0..200).map(|_| jitter(5_000)).collect();
        assert!(seen.len() > 100, "{}", seen.len());
    }
}
