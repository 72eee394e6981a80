//! Helper threads that write shares of a large fan-out beside the thread
//! delivering it.
//!
//! A push to idle connections is written into their sockets, one after
//! another, by whoever delivers it (`Outbox::lend`). One publication to
//! 10,000 sockets is 10,000 system calls of a few microseconds each: on
//! one core, its last socket is written tens of milliseconds after its
//! first. With helpers, the recipients are cut into shares; idle helpers
//! write some while the deliverer writes its own, and the deliverer
//! returns once every share is written. Each connection is in one share,
//! so its messages keep their order.
//!
//! Bounded: a fixed number of threads, started at the first fan-out that
//! needs them, each writing one share at a time. A share is handed only
//! to an idle helper (one that has written its last share, or none yet),
//! so one no helper is free to take is written by the deliverer itself:
//! a deliverer never waits behind another's fan-out, and helpers never
//! wait on anything.

use std::ops::{AddAssign, Range};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, OnceLock};

type Job = Box<dyn FnOnce() + Send>;

/// One share's work: writes the recipients in a range of the list.
pub(crate) type Share<R> = Arc<dyn Fn(Range<usize>) -> R + Send + Sync>;

/// A fixed set of helper threads.
pub(crate) struct Helpers {
    threads: usize,
    started: OnceLock<Vec<Helper>>,
}

/// How a fan-out was split.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Split {
    /// Shares a helper wrote.
    pub(crate) helped: usize,
    /// Shares meant for a helper that the deliverer wrote itself: every
    /// helper was busy.
    pub(crate) busy: usize,
}

impl std::fmt::Debug for Helpers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Helpers")
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

impl Helpers {
    /// Up to `threads` helpers, none started yet.
    pub(crate) fn new(threads: usize) -> Helpers {
        Helpers {
            threads,
            started: OnceLock::new(),
        }
    }

    fn helpers(&self) -> &[Helper] {
        self.started
            .get_or_init(|| (0..self.threads).filter_map(start).collect())
    }

    /// Runs `share` over `0..n` cut into parts of at least `min`, one
    /// per helper and one for the caller: the caller's first, here, while
    /// idle helpers write theirs; a part no helper took, here after it.
    /// Returns once every part is written: their results added up, and
    /// how the parts went.
    pub(crate) fn split<R>(&self, n: usize, min: usize, share: Share<R>) -> (R, Split)
    where
        R: Default + AddAssign + Send + 'static,
    {
        let parts = (n / min.max(1)).clamp(1, self.threads + 1);
        if parts == 1 {
            return (share(0..n), Split::default());
        }
        let part = |i: usize| n * i / parts..n * (i + 1) / parts;
        let (done, results) = mpsc::sync_channel::<R>(parts - 1);
        let mut idle = self.helpers().iter().filter(|h| h.claim());
        let (mut mine, mut split) = (vec![part(0)], Split::default());
        for i in 1..parts {
            let handed = idle.next().is_some_and(|helper| {
                let (range, share) = (part(i), share.clone());
                let finish = Finish {
                    idle: helper.idle.clone(),
                    done: Some(done.clone()),
                };
                // Never waits: its slot is empty (it took its last job
                // before it was idle); fails only if the thread is gone.
                helper
                    .jobs
                    .try_send(Box::new(move || finish.send(share(range))))
                    .is_ok()
            });
            if handed {
                split.helped += 1;
            } else {
                split.busy += 1;
                mine.push(part(i));
            }
        }
        drop(done);
        let mut all = R::default();
        for range in mine {
            all += share(range);
        }
        // Every helper's result; fewer only if one panicked, its part
        // then left as far as it went.
        for r in results.iter().take(split.helped) {
            all += r;
        }
        (all, split)
    }
}

/// One helper thread: where its share is handed, and whether it is free
/// to take one.
struct Helper {
    /// Holds one job, handed only while the helper is idle.
    jobs: SyncSender<Job>,
    idle: Arc<AtomicBool>,
}

impl Helper {
    /// Takes the helper for one share, if it is idle.
    fn claim(&self) -> bool {
        self.idle
            .compare_exchange(true, false, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }
}

/// The end of a helper's share: the helper is idle again before its
/// result reaches the deliverer (so the deliverer's next fan-out finds it
/// free), and even if the share panicked.
struct Finish<R> {
    idle: Arc<AtomicBool>,
    done: Option<SyncSender<R>>,
}

impl<R> Finish<R> {
    fn send(mut self, r: R) {
        if let Some(done) = self.done.take() {
            self.idle.store(true, Ordering::Release);
            let _ = done.send(r);
        }
    }
}

impl<R> Drop for Finish<R> {
    fn drop(&mut self) {
        // Unwinding from a share: idle again, then the sender goes.
        if self.done.is_some() {
            self.idle.store(true, Ordering::Release);
        }
    }
}

/// Starts helper `i`, idle: it writes one share at a time, and ends when
/// its sender is dropped with the hub. A share handed to it before the
/// thread runs waits in its slot.
fn start(i: usize) -> Option<Helper> {
    let (jobs, rx) = mpsc::sync_channel::<Job>(1);
    let spawned = std::thread::Builder::new()
        .name(format!("gale-fanout-{i}"))
        .spawn(move || {
            while let Ok(job) = rx.recv() {
                // A panic ends the share, not the helper.
                let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
            }
        });
    match spawned {
        Ok(_) => Some(Helper {
            jobs,
            idle: Arc::new(AtomicBool::new(true)),
        }),
        Err(e) => {
            tracing::warn!(error = %e, "could not start a fan-out helper thread; its shares are written by the deliverer");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::thread::ThreadId;

    type Seen = Arc<Mutex<Vec<(usize, ThreadId)>>>;

    /// A share that records which thread wrote which indices.
    fn recorder(seen: &Seen) -> Share<usize> {
        let seen = seen.clone();
        Arc::new(move |r: Range<usize>| {
            let me = std::thread::current().id();
            seen.lock()
                .expect("seen")
                .extend(r.clone().map(|i| (i, me)));
            r.len()
        })
    }

    fn threads(seen: &Seen) -> std::collections::HashSet<ThreadId> {
        seen.lock().expect("seen").iter().map(|(_, t)| *t).collect()
    }

    #[test]
    fn every_index_is_written_once_each_share_on_its_own_thread() {
        let helpers = Helpers::new(3);
        for round in 0..3 {
            let seen = Seen::default();
            let (n, split) = helpers.split(1000, 100, recorder(&seen));
            assert_eq!(n, 1000);
            // Idle from the start, and again before their results came.
            assert_eq!(split, Split { helped: 3, busy: 0 }, "round {round}");
            let threads = threads(&seen);
            assert_eq!(threads.len(), 4, "the caller and three helpers");
            assert!(threads.contains(&std::thread::current().id()));
            let mut indices: Vec<usize> =
                seen.lock().expect("seen").iter().map(|(i, _)| *i).collect();
            indices.sort_unstable();
            assert_eq!(indices, (0..1000).collect::<Vec<_>>());
        }
    }

    #[test]
    fn small_fan_outs_and_no_helpers_stay_on_the_caller() {
        let seen = Seen::default();
        let (n, split) = Helpers::new(0).split(10_000, 10, recorder(&seen));
        assert_eq!((n, split), (10_000, Split::default()));
        let (n, split) = Helpers::new(4).split(150, 100, recorder(&seen));
        assert_eq!((n, split), (150, Split::default()));
        // Two parts of 1,000 from 2,500 with one helper: 1,250 each.
        let (n, split) = Helpers::new(1).split(2_500, 1_000, recorder(&seen));
        assert_eq!((n, split), (2_500, Split { helped: 1, busy: 0 }));
        assert_eq!(threads(&seen).len(), 2);
    }

    #[test]
    fn a_busy_helper_leaves_its_share_to_the_caller() {
        let helpers = Arc::new(Helpers::new(1));
        // Another deliverer's share keeps the one helper busy.
        let (started_tx, started) = mpsc::channel();
        let release = Arc::new(Mutex::new(()));
        let hold = release.lock().expect("release");
        let other = {
            let (helpers, release) = (helpers.clone(), release.clone());
            std::thread::spawn(move || {
                let started_tx = Mutex::new(started_tx);
                helpers.split(
                    2,
                    1,
                    Arc::new(move |r: Range<usize>| {
                        if r.start == 1 {
                            let _ = started_tx.lock().expect("started_tx").send(());
                            drop(release.lock());
                        }
                        r.len()
                    }),
                )
            })
        };
        started.recv().expect("started");
        let seen = Seen::default();
        let (n, split) = helpers.split(100, 10, recorder(&seen));
        assert_eq!((n, split), (100, Split { helped: 0, busy: 1 }));
        assert_eq!(threads(&seen), [std::thread::current().id()].into());
        drop(hold);
        assert_eq!(
            other.join().expect("other deliverer"),
            (2, Split { helped: 1, busy: 0 })
        );
        // Free again once its share is done.
        let (n, split) = helpers.split(100, 10, recorder(&seen));
        assert_eq!((n, split), (100, Split { helped: 1, busy: 0 }));
    }

    #[test]
    fn a_panicking_share_ends_that_share_not_the_helper() {
        let helpers = Helpers::new(1);
        let (n, split) = helpers.split(
            2,
            1,
            Arc::new(|r: Range<usize>| {
                assert_ne!(
                    std::thread::current().name(),
                    Some("gale-fanout-0"),
                    "a bug in a share"
                );
                r.len()
            }),
        );
        assert_eq!(
            (n, split),
            (1, Split { helped: 1, busy: 0 }),
            "the caller's share counts; the panicked one does not"
        );
        let (n, split) = helpers.split(2, 1, Arc::new(|r: Range<usize>| r.len()));
        assert_eq!((n, split), (2, Split { helped: 1, busy: 0 }));
    }
}
