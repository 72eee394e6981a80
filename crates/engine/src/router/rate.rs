//! Rate limits: token buckets, one per (event, user-or-connection), held
//! in a bounded cache that forgets idle keys, plus one for the whole node.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use crate::config::Rate;

/// A token bucket: `count` events at once, refilled at `count` per `per`.
/// So the (N+1)th event inside a window is refused, and a full window
/// later N are allowed again.
///
/// It keeps what was spent rather than what is left, so it can be shared
/// by a number of members that changes ([`Bucket::take_shared`]): its
/// room and its refill are that many times one member's, and a newcomer
/// finds room at once.
#[derive(Debug)]
pub struct Bucket {
    state: Mutex<(f64, Instant)>,
    capacity: f64,
    per_second: f64,
}

impl Bucket {
    /// A full bucket for `rate`.
    pub fn new(rate: Rate) -> Bucket {
        let capacity = f64::from(rate.count);
        Bucket {
            state: Mutex::new((0.0, Instant::now())),
            capacity,
            per_second: capacity / rate.per.as_secs_f64(),
        }
    }

    /// Takes one token. `Err` holds the wait until the next one.
    pub fn take(&self) -> Result<(), Duration> {
        self.take_shared(1.0)
    }

    /// Takes one token from a bucket shared by `members` (at least 1):
    /// `members` times the room and the refill of one.
    pub fn take_shared(&self, members: f64) -> Result<(), Duration> {
        let members = members.max(1.0);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (spent, last) = *st;
        let refill = self.per_second * members;
        let spent = (spent - now.duration_since(last).as_secs_f64() * refill).max(0.0);
        let room = self.capacity * members;
        if spent + 1.0 <= room {
            *st = (spent + 1.0, now);
            Ok(())
        } else {
            *st = (spent, now);
            Err(Duration::from_secs_f64((spent + 1.0 - room) / refill))
        }
    }

    /// The part (0–1) of its room in use now.
    pub fn fill(&self) -> f64 {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (spent, last) = *st;
        let spent =
            (spent - Instant::now().duration_since(last).as_secs_f64() * self.per_second).max(0.0);
        spent / self.capacity
    }
}

/// Who a per-event limit counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    /// A signed-in user, across all their connections.
    User(Arc<str>),
    /// An anonymous connection.
    Connection(Uuid),
    /// Every anonymous connection from one client address
    /// ([`crate::identity::rate_key`]).
    Address(std::net::IpAddr),
}

/// Most (event, subject) buckets kept; the least recently used go first.
const MAX_BUCKETS: u64 = 200_000;

/// Per-event, per-subject buckets. Memory is bounded: at most
/// `MAX_BUCKETS` entries, and a bucket idle for an hour is forgotten (it
/// would have refilled anyway: the longest window is an hour).
#[derive(Debug)]
pub struct Limits {
    buckets: moka::sync::Cache<(usize, Subject), Arc<Bucket>>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            buckets: moka::sync::Cache::builder()
                .max_capacity(MAX_BUCKETS)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
        }
    }
}

impl Limits {
    /// Takes a token from `subject`'s bucket for event number `event`.
    ///
    /// # Errors
    /// The wait until the next token.
    pub fn take(&self, event: usize, subject: Subject, rate: Rate) -> Result<(), Duration> {
        self.take_shared(event, subject, rate, 1.0)
    }

    /// Takes a token from `subject`'s bucket for event number `event`,
    /// shared by `members` ([`Bucket::take_shared`]).
    ///
    /// # Errors
    /// The wait until the next token.
    pub fn take_shared(
        &self,
        event: usize,
        subject: Subject,
        rate: Rate,
        members: f64,
    ) -> Result<(), Duration> {
        self.buckets
            .get_with((event, subject), || Arc::new(Bucket::new(rate)))
            .take_shared(members)
    }

    /// Forgets connection `id`'s buckets for events `0..events`: once it
    /// has closed they can never be used again, and would otherwise hold
    /// their place for an hour.
    pub fn forget_connection(&self, id: Uuid, events: usize) {
        for event in 0..events {
            self.buckets.invalidate(&(event, Subject::Connection(id)));
        }
    }

    /// Buckets held now, after pending removals have run.
    pub fn sync_len(&self) -> u64 {
        self.buckets.run_pending_tasks();
        self.buckets.entry_count()
    }

    /// Buckets held now (approximate).
    pub fn len(&self) -> u64 {
        self.buckets.entry_count()
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn n_per_window_then_refused_then_recovers() {
        let b = Bucket::new(Rate {
            count: 3,
            per: Duration::from_secs(60),
        });
        for _ in 0..3 {
            b.take().expect("within the limit");
        }
        let wait = b.take().expect_err("the 4th is refused");
        assert!(wait <= Duration::from_secs(20), "{wait:?}");
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..3 {
            b.take().expect("a window later: recovered");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn subjects_are_counted_apart() {
        let limits = Limits::default();
        let rate = Rate {
            count: 1,
            per: Duration::from_secs(10),
        };
        let a = Subject::User("alice".into());
        let b = Subject::Connection(Uuid::nil());
        limits.take(0, a.clone(), rate).expect("alice");
        limits.take(0, b, rate).expect("anonymous connection");
        limits.take(1, a.clone(), rate).expect("another event");
        assert!(limits.take(0, a, rate).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_shared_bucket_grows_with_its_members_at_once() {
        let b = Bucket::new(Rate {
            count: 2,
            per: Duration::from_secs(60),
        });
        b.take_shared(1.0).expect("1 of 2");
        b.take_shared(1.0).expect("2 of 2");
        assert!(b.take_shared(1.0).is_err(), "one member's room is spent");
        // A second and third member arrive: room for them at once.
        for _ in 0..4 {
            b.take_shared(3.0).expect("three members' room");
        }
        assert!(b.take_shared(3.0).is_err());
        // Back to one member, whose share was spent: it waits.
        assert!(b.take_shared(1.0).is_err());
        // Six spent, refilled at one member's 2 a minute.
        tokio::time::advance(Duration::from_secs(180)).await;
        b.take_shared(1.0).expect("refilled");
    }

    #[test]
    fn a_closed_connections_buckets_are_forgotten() {
        let limits = Limits::default();
        let rate = Rate {
            count: 1,
            per: Duration::from_secs(3600),
        };
        let (gone, stays) = (Uuid::new_v4(), Uuid::new_v4());
        for event in 0..3 {
            limits
                .take(event, Subject::Connection(gone), rate)
                .expect("first");
            limits
                .take(event, Subject::Connection(stays), rate)
                .expect("first");
        }
        limits.forget_connection(gone, 3);
        limits.buckets.run_pending_tasks();
        assert_eq!(
            limits.len(),
            3,
            "only the open connection's buckets are left"
        );
        assert!(limits.take(0, Subject::Connection(stays), rate).is_err());
    }
}
