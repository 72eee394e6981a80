//! Admission per client address: at most `server.max_connections_per_ip`
//! connections open at once (503 past it) and
//! `server.handshake_rate_per_ip` new WebSocket or SSE handshakes a
//! second (429 past it), so one address cannot take every connection
//! permit or flood the server with handshakes. IPv6 addresses count by
//! /64 ([`crate::identity::rate_key`]).
//!
//! Every TCP connection counts against its peer's address from the
//! accept on ([`Admission::connect`], by the listener), whatever it is
//! used for: an upgrade, an SSE stream, a request, or nothing. A
//! connection from a trusted proxy (`server.trusted_proxies`) counts
//! instead at its handshake, against the client the proxy names
//! ([`Admission::admit`]). The count of open connections per address is
//! kept even without a limit: the router scales an address's rate limits
//! by it, so users behind one NAT each get a user's allowance.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{Rate, ServerConfig};
use crate::metrics::{Metrics, Refusal};
use crate::router::rate::Bucket;

/// Addresses whose handshake rate is tracked at most; the least recently
/// seen are forgotten first (a forgotten address starts with a full
/// second's allowance, which is what an address seen long ago has).
const MAX_TRACKED: u64 = 100_000;

/// Why a handshake was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The address already holds `max_connections_per_ip` connections.
    #[error("too many connections from this address (server.max_connections_per_ip = {0})")]
    Connections(usize),
    /// The address opened more than `handshake_rate_per_ip` a second;
    /// try again after the duration.
    #[error("too many handshakes from this address (server.handshake_rate_per_ip = {0}/s)")]
    Rate(u32, Duration),
    /// The whole node took `handshake_rate` handshakes this second; try
    /// again after the duration (jittered by the size of the wave).
    #[error(
        "this node is taking handshakes at its limit (server.handshake_rate = {0}/s): retry later"
    )]
    Node(u32, Duration),
}

/// The per-address limits and what they count.
pub struct Admission {
    max_connections: usize,
    rate: Option<Rate>,
    open: Mutex<Open>,
    handshakes: moka::sync::Cache<IpAddr, Arc<Bucket>>,
    /// `server.handshake_rate`: the node's own allowance.
    node: Option<Node>,
    metrics: Arc<Metrics>,
}

/// The node-wide handshake rate, and the wave it is refusing: how many
/// handshakes it refused this second sizes how far their retries are
/// spread.
#[derive(Debug)]
struct Node {
    rate: u32,
    bucket: Bucket,
    /// (the second, refusals in it).
    refused: Mutex<(u64, u64)>,
}

impl Node {
    /// The wait to suggest to one more refused handshake: at least a
    /// second, spread uniformly over the seconds the refused wave needs
    /// at `rate`, so the wave comes back as a trickle, not a second wave.
    fn retry_after(&self) -> Duration {
        let now = crate::connection::unix_now();
        let mut r = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        if r.0 != now {
            *r = (now, 0);
        }
        r.1 += 1;
        let spread = r.1 / u64::from(self.rate.max(1));
        let jitter = uuid::Uuid::new_v4().as_u64_pair().0 % (spread + 1);
        Duration::from_secs(1 + jitter)
    }
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("max_connections", &self.max_connections)
            .field("rate", &self.rate)
            .finish_non_exhaustive()
    }
}

/// An admitted connection: counted against its address until dropped,
/// as a connection, a session (a WebSocket or an SSE stream: a client),
/// or both.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    ip: IpAddr,
    connection: bool,
    session: bool,
}

impl Admitted {
    /// The same connection, now also a session (upgraded to WebSocket).
    pub fn with_session(mut self) -> Admitted {
        if !self.session {
            let mut open = self.admission.lock();
            open.by_ip.entry(self.ip).or_default().sessions += 1;
            open.sessions += 1;
            self.session = true;
        }
        self
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.admission.lock();
        if self.session {
            open.sessions -= 1;
        }
        if let Some(n) = open.by_ip.get_mut(&self.ip) {
            n.connections -= usize::from(self.connection);
            n.sessions -= usize::from(self.session);
            if n.connections == 0 && n.sessions == 0 {
                open.by_ip.remove(&self.ip);
            }
        }
    }
}

/// What one address holds open.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    connections: usize,
    sessions: usize,
}

/// Connections and sessions open now, per address, and sessions in all.
#[derive(Debug, Default)]
struct Open {
    by_ip: HashMap<IpAddr, Counts>,
    sessions: usize,
}

impl Admission {
    /// The limits of `[server]` (0: no limit).
    pub fn new(s: &ServerConfig, metrics: Arc<Metrics>) -> Admission {
        Admission {
            max_connections: s.max_connections_per_ip,
            rate: (s.handshake_rate_per_ip > 0).then(|| Rate {
                count: s.handshake_rate_per_ip,
                per: Duration::from_secs(1),
            }),
            open: Mutex::new(Open::default()),
            handshakes: moka::sync::Cache::builder()
                .max_capacity(MAX_TRACKED)
                .time_to_idle(Duration::from_secs(60))
                .build(),
            node: (s.handshake_rate > 0).then(|| Node {
                rate: s.handshake_rate,
                bucket: Bucket::new(Rate {
                    count: s.handshake_rate,
                    per: Duration::from_secs(1),
                }),
                refused: Mutex::new((0, 0)),
            }),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        // Every update is complete before it could panic.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a connection (and a session with it, when `session`).
    fn count(self: &Arc<Self>, ip: IpAddr, session: bool) -> Result<Admitted, Refused> {
        let mut open = self.lock();
        let n = open.by_ip.entry(ip).or_default();
        if self.max_connections > 0 && n.connections >= self.max_connections {
            if n.connections == 0 && n.sessions == 0 {
                open.by_ip.remove(&ip);
            }
            drop(open);
            self.metrics
                .handshake_refused(Refusal::ConnectionsPerIp)
                .inc();
            return Err(Refused::Connections(self.max_connections));
        }
        n.connections += 1;
        n.sessions += usize::from(session);
        open.sessions += usize::from(session);
        Ok(Admitted {
            admission: self.clone(),
            ip,
            connection: true,
            session,
        })
    }

    /// Counts a connection from `ip` until the guard is dropped, or says
    /// why not (and counts that).
    ///
    /// # Errors
    /// [`Refused::Connections`] when `ip` holds its maximum already.
    pub fn connect(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Refused> {
        self.count(ip, false)
    }

    /// Counts a session (a client: an SSE stream) from `ip`, whose
    /// connection is counted already, until the guard is dropped.
    pub fn session(self: &Arc<Self>, ip: IpAddr) -> Admitted {
        let mut open = self.lock();
        open.by_ip.entry(ip).or_default().sessions += 1;
        open.sessions += 1;
        Admitted {
            admission: self.clone(),
            ip,
            connection: false,
            session: true,
        }
    }

    /// Takes one handshake from `ip`'s allowance, or says why not (and
    /// counts it).
    ///
    /// # Errors
    /// [`Refused::Rate`] past `handshake_rate_per_ip`, [`Refused::Node`]
    /// past `handshake_rate`.
    pub fn handshake(&self, ip: IpAddr) -> Result<(), Refused> {
        if let Some(rate) = self.rate {
            let bucket = self.handshakes.get_with(ip, || Arc::new(Bucket::new(rate)));
            if let Err(wait) = bucket.take() {
                self.metrics.handshake_refused(Refusal::HandshakeRate).inc();
                return Err(Refused::Rate(rate.count, wait));
            }
        }
        if let Some(node) = &self.node
            && node.bucket.take().is_err()
        {
            self.metrics.handshake_refused(Refusal::NodeRate).inc();
            return Err(Refused::Node(node.rate, node.retry_after()));
        }
        Ok(())
    }

    /// A handshake, a connection and a session from `ip` (a client behind
    /// a trusted proxy, not counted at the accept).
    ///
    /// # Errors
    /// [`Refused`] when either limit is reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Refused> {
        self.handshake(ip)?;
        self.count(ip, true)
    }

    /// Addresses with a connection open now.
    pub fn addresses(&self) -> usize {
        self.lock().by_ip.len()
    }

    /// Sessions (WebSocket and SSE clients) open now from `ip`, and from
    /// every address: what rate limits are shared by.
    pub fn sessions(&self, ip: IpAddr) -> (usize, usize) {
        let open = self.lock();
        (open.by_ip.get(&ip).map_or(0, |n| n.sessions), open.sessions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max: usize, rate: u32) -> Arc<Admission> {
        let s = ServerConfig {
            max_connections_per_ip: max,
            handshake_rate_per_ip: rate,
            ..ServerConfig::default()
        };
        Arc::new(Admission::new(&s, Arc::new(Metrics::new())))
    }

    #[test]
    fn connections_are_counted_per_address_and_released() {
        let a = admission(2, 0);
        let (x, y): (IpAddr, IpAddr) = (
            "10.0.0.1".parse().expect("ip"),
            "10.0.0.2".parse().expect("ip"),
        );
        let first = a.admit(x).expect("1 of 2");
        let _second = a.admit(x).expect("2 of 2");
        assert_eq!(a.admit(x).expect_err("3 of 2"), Refused::Connections(2));
        let _other = a.admit(y).expect("another address is counted apart");
        drop(first);
        let _again = a.admit(x).expect("a slot came back");
        assert_eq!(a.addresses(), 2);
    }

    #[test]
    fn no_entry_outlives_its_connections() {
        let a = admission(5, 0);
        let held: Vec<_> = (0..100_u8)
            .map(|i| a.admit(IpAddr::from([10, 0, 1, i])).expect("admitted"))
            .collect();
        assert_eq!(a.addresses(), 100);
        drop(held);
        assert_eq!(a.addresses(), 0, "the map is bounded by what is open");
    }

    #[tokio::test(start_paused = true)]
    async fn handshakes_past_the_rate_wait_a_second() {
        let a = admission(0, 3);
        let x: IpAddr = "10.0.0.1".parse().expect("ip");
        for _ in 0..3 {
            a.admit(x).expect("within the rate");
        }
        match a.admit(x) {
            Err(Refused::Rate(3, wait)) => assert!(wait <= Duration::from_secs(1), "{wait:?}"),
            other => panic!("expected a rate refusal, got {other:?}"),
        }
        a.admit("10.0.0.2".parse().expect("ip"))
            .expect("another address");
        tokio::time::advance(Duration::from_secs(1)).await;
        a.admit(x).expect("a second later");
    }

    #[test]
    fn zero_means_no_limit_and_still_counts() {
        let a = admission(0, 0);
        let x: IpAddr = "10.0.0.1".parse().expect("ip");
        let held: Vec<_> = (0..10_000).map(|_| a.admit(x).expect("no limit")).collect();
        assert_eq!(held.len(), 10_000);
        assert_eq!(
            a.sessions(x),
            (10_000, 10_000),
            "counted for the rate limits"
        );
        drop(held);
        assert_eq!((a.addresses(), a.sessions(x)), (0, (0, 0)));
    }
}
