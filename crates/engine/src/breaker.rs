//! A circuit breaker for a service behind gale (the weather provider, the
//! application's backend): after `threshold` consecutive
//! failures it opens and fails fast for `cooldown`, then lets one trial
//! call through (half-open); the trial's result closes or re-opens it.
//!
//! Only results of calls made since the breaker last opened count: each
//! opening starts a new generation, and a call started before it (a late
//! success or failure) is ignored, so a slow call from before an outage
//! cannot close the breaker in the middle of one.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::BreakerState;

#[derive(Debug)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { trial_running: bool },
}

/// The breaker. Its lock is held for a few instructions, never across an
/// await.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<(State, u64)>,
}

/// Leave to make one upstream call. Dropping it without [`Permit::record`]
/// (the call was cancelled) frees the half-open trial slot for another.
#[derive(Debug)]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    generation: u64,
    trial: bool,
    recorded: bool,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Breaker {
            threshold: threshold.max(1),
            cooldown,
            state: Mutex::new((State::Closed { failures: 0 }, 0)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (State, u64)> {
        // A panic while holding this lock cannot leave State half-written
        // (every write is one assignment), so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails fast while the breaker is open (or its half-open trial is
    /// running), without taking a permit: checked before a lookup waits
    /// for an upstream slot.
    ///
    /// # Errors
    /// The time left in the cool-down.
    pub fn check(&self) -> Result<(), Duration> {
        let now = Instant::now();
        match &self.lock().0 {
            State::Open { until } if now < *until => Err(*until - now),
            State::HalfOpen {
                trial_running: true,
            } => Err(Duration::from_secs(1)),
            _ => Ok(()),
        }
    }

    /// Asks to make a call.
    ///
    /// # Errors
    /// The time left in the cool-down while the breaker is open (or a
    /// half-open trial is already running).
    pub fn try_acquire(&self) -> Result<Permit<'_>, Duration> {
        let mut guard = self.lock();
        let (state, generation) = &mut *guard;
        let now = Instant::now();
        let trial = match state {
            State::Closed { .. } => false,
            State::Open { until } if now < *until => return Err(*until - now),
            State::Open { .. } => {
                *state = State::HalfOpen {
                    trial_running: true,
                };
                true
            }
            State::HalfOpen { trial_running } if *trial_running => {
                return Err(Duration::from_secs(1));
            }
            State::HalfOpen { trial_running } => {
                *trial_running = true;
                true
            }
        };
        Ok(Permit {
            breaker: self,
            generation: *generation,
            trial,
            recorded: false,
        })
    }

    /// The state, for the metrics gauge.
    pub fn state(&self) -> BreakerState {
        match &self.lock().0 {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { until } if Instant::now() < *until => BreakerState::Open,
            State::Open { .. } | State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    fn record(&self, generation: u64, success: bool) {
        let mut guard = self.lock();
        let (state, current) = &mut *guard;
        if generation != *current {
            // Started before the breaker last opened: says nothing about
            // the upstream now.
            return;
        }
        *state = match (&*state, success) {
            (_, true) => State::Closed { failures: 0 },
            (State::Closed { failures }, false) if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            (_, false) => {
                tracing::warn!(
                    cooldown_ms = self.cooldown.as_millis() as u64,
                    "upstream failing: circuit breaker open"
                );
                *current += 1;
                State::Open {
                    until: Instant::now() + self.cooldown,
                }
            }
        };
    }
}

impl Permit<'_> {
    /// Records the call's result.
    pub fn record(mut self, success: bool) {
        self.recorded = true;
        self.breaker.record(self.generation, success);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.trial && !self.recorded {
            let mut state = self.breaker.lock();
            if let (State::HalfOpen { trial_running }, generation) = &mut *state
                && *generation == self.generation
            {
                *trial_running = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_and_recovers_after_cooldown() {
        let b = Breaker::new(3, Duration::from_secs(10));
        for _ in 0..2 {
            b.try_acquire().expect("closed").record(false);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.try_acquire().expect("closed").record(false);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.try_acquire().is_err(), "fails fast while open");

        tokio::time::advance(Duration::from_secs(10)).await;
        let trial = b.try_acquire().expect("half-open trial");
        assert!(b.try_acquire().is_err(), "one trial at a time");
        trial.record(true);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.try_acquire().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn failed_trial_reopens_and_dropped_trial_frees_the_slot() {
        let b = Breaker::new(1, Duration::from_secs(5));
        b.try_acquire().expect("closed").record(false);
        tokio::time::advance(Duration::from_secs(5)).await;
        drop(b.try_acquire().expect("trial"));
        let trial = b.try_acquire().expect("slot freed by the dropped trial");
        trial.record(false);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn results_of_calls_started_before_it_opened_are_ignored() {
        let b = Breaker::new(2, Duration::from_secs(10));
        let early = b.try_acquire().expect("closed");
        let early_failure = b.try_acquire().expect("closed");
        b.try_acquire().expect("closed").record(false);
        b.try_acquire().expect("closed").record(false);
        assert_eq!(b.state(), BreakerState::Open);
        early.record(true);
        assert_eq!(
            b.state(),
            BreakerState::Open,
            "a late success keeps it open"
        );
        assert!(b.check().is_err());

        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(b.check().is_ok(), "the cool-down is over");
        let trial = b.try_acquire().expect("trial");
        assert!(b.check().is_err(), "one trial at a time");
        trial.record(true);
        early_failure.record(false);
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "a late failure too is ignored"
        );
    }

    #[test]
    fn success_resets_the_failure_count() {
        let b = Breaker::new(2, Duration::from_secs(5));
        b.try_acquire().expect("closed").record(false);
        b.try_acquire().expect("closed").record(true);
        b.try_acquire().expect("closed").record(false);
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
