//! Helper threads that write parts of a large fan-out beside the thread
//! delivering it.
//!
//! A push to idle connections is written into their sockets, one after
//! another, by whoever delivers it (`Outbox::lend`). One publication to
//! 10,000 sockets is 10,000 system calls of a few microseconds each: on
//! one core, its last socket is written tens of milliseconds after its
//! first. With helpers, the deliverer and the idle helpers it claims take
//! chunks of the recipients in turn from one cursor until none is left;
//! the deliverer returns once every chunk taken is written. Each
//! connection is in one chunk, so its messages keep their order. A helper
//! that has not begun by the time the deliverer finds the cursor empty is
//! not waited for: the deliverer never sits idle while work remains.
//!
//! Bounded: a fixed number of threads, each started at the first fan-out
//! that wants it, each helping one fan-out at a time. Only idle helpers
//! are claimed, so a fan-out that finds them busy is written by its
//! deliverer alone: a deliverer never waits behind another's fan-out, and
//! helpers never wait on anything.

use std::ops::{AddAssign, Range};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, OnceLock};

type Job = Box<dyn FnOnce() + Send>;

/// One chunk's work: writes the recipients in a range of the list.
pub(crate) type Share<R> = Arc<dyn Fn(Range<usize>) -> R + Send + Sync>;

/// A fixed set of helper threads, each started when first wanted.
pub(crate) struct Helpers {
    slots: Box<[OnceLock<Option<Helper>>]>,
}

impl std::fmt::Debug for Helpers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Helpers")
            .field("threads", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl Helpers {
    /// Up to `threads` helpers, none started yet.
    pub(crate) fn new(threads: usize) -> Helpers {
        Helpers {
            slots: (0..threads).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Whether there are helpers at all.
    pub(crate) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Claims up to `want` idle helpers, starting them as needed.
    pub(crate) fn claim(&self, want: usize) -> Crew<'_> {
        let mut crew = Crew {
            helpers: Vec::new(),
            busy: 0,
        };
        for (i, slot) in self.slots.iter().enumerate() {
            if crew.helpers.len() >= want {
                break;
            }
            // A thread that could not start is left out, not counted busy.
            let Some(helper) = slot.get_or_init(|| start(i)) else {
                continue;
            };
            if helper.claim() {
                crew.helpers.push(helper);
            } else {
                crew.busy += 1;
            }
        }
        crew
    }
}

/// Helpers claimed for one fan-out; released unused when dropped.
pub(crate) struct Crew<'h> {
    helpers: Vec<&'h Helper>,
    /// Helpers found busy while more were wanted.
    pub(crate) busy: usize,
}

impl Crew<'_> {
    /// Whether no helper was claimed.
    pub(crate) fn is_empty(&self) -> bool {
        self.helpers.is_empty()
    }

    /// Runs `share` over `0..n` in chunks of `chunk`, taken in turn from
    /// one cursor by the caller and the crew until none is left. Returns
    /// once every chunk taken is written: their results added up, and how
    /// many chunks the helpers wrote.
    pub(crate) fn run<R>(mut self, n: usize, chunk: usize, share: Share<R>) -> (R, usize)
    where
        R: Default + AddAssign + Send + 'static,
    {
        let cursor = Arc::new(Cursor {
            next: AtomicUsize::new(0),
            n,
            chunk: chunk.max(1),
        });
        let (done, results) = mpsc::sync_channel::<(R, usize)>(self.helpers.len());
        let mut handed = Vec::with_capacity(self.helpers.len());
        for helper in std::mem::take(&mut self.helpers) {
            let state = Arc::new(AtomicU8::new(PENDING));
            let finish = Finish {
                idle: helper.idle.clone(),
                done: Some(done.clone()),
            };
            let (cursor, share, begun) = (cursor.clone(), share.clone(), state.clone());
            let job: Job = Box::new(move || {
                if begun
                    .compare_exchange(PENDING, RUNNING, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    finish.send(cursor.drain(&share));
                }
                // Too late (the deliverer found nothing left): idle again
                // as `finish` drops.
            });
            // Never waits: an idle helper's slot is empty (it took its
            // last job before it was idle); fails only if the thread is
            // gone, and the dropped job leaves it idle.
            if helper.jobs.try_send(job).is_ok() {
                handed.push(state);
            }
        }
        drop(done);
        let (mut all, _) = cursor.drain(&share);
        // Those that have not begun find nothing left: not waited for.
        let running = handed
            .iter()
            .filter(|s| {
                s.compare_exchange(PENDING, LATE, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
            })
            .count();
        let mut helped = 0;
        // Fewer only if a chunk panicked (logged by its helper).
        for (r, chunks) in results.iter().take(running) {
            all += r;
            helped += chunks;
        }
        (all, helped)
    }
}

impl Drop for Crew<'_> {
    fn drop(&mut self) {
        for helper in &self.helpers {
            helper.idle.store(true, Ordering::Release);
        }
    }
}

/// A handed job's state: not yet begun, begun, or found too late.
const PENDING: u8 = 0;
const RUNNING: u8 = 1;
const LATE: u8 = 2;

/// The next chunk of a fan-out to write.
struct Cursor {
    next: AtomicUsize,
    n: usize,
    chunk: usize,
}

impl Cursor {
    /// Writes chunks until none is left: their results added up, and how
    /// many.
    fn drain<R: Default + AddAssign>(&self, share: &Share<R>) -> (R, usize) {
        let (mut all, mut chunks) = (R::default(), 0);
        loop {
            let start = self.next.fetch_add(self.chunk, Ordering::Relaxed);
            if start >= self.n {
                return (all, chunks);
            }
            all += share(start..(start + self.chunk).min(self.n));
            chunks += 1;
        }
    }
}

/// One helper thread: where its job is handed, and whether it is free to
/// take one.
struct Helper {
    /// Holds one job, handed only while the helper is idle.
    jobs: SyncSender<Job>,
    idle: Arc<AtomicBool>,
}

impl Helper {
    /// Takes the helper for one fan-out, if it is idle.
    fn claim(&self) -> bool {
        self.idle
            .compare_exchange(true, false, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }
}

/// The end of a helper's job: the helper is idle again before its result
/// reaches the deliverer (so the deliverer's next fan-out finds it free),
/// and also if the job came too late or panicked.
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
        // Not sent: idle again, then the sender goes.
        if self.done.is_some() {
            self.idle.store(true, Ordering::Release);
        }
    }
}

/// Starts helper `i`, idle: it runs one job at a time, and ends when its
/// sender is dropped with the hub. A job handed to it before the thread
/// runs waits in its slot.
fn start(i: usize) -> Option<Helper> {
    let (jobs, rx) = mpsc::sync_channel::<Job>(1);
    let spawned = std::thread::Builder::new()
        .name(format!("gale-fanout-{i}"))
        .spawn(move || {
            while let Ok(job) = rx.recv() {
                // A panic (a bug) ends the chunk, not the helper.
                if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(job)) {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(panic = %what, "a fan-out chunk panicked: the rest of its recipients did not get that push");
                }
            }
        });
    match spawned {
        Ok(_) => Some(Helper {
            jobs,
            idle: Arc::new(AtomicBool::new(true)),
        }),
        Err(e) => {
            tracing::warn!(error = %e, "could not start a fan-out helper thread; fan-outs go on without it");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::thread::ThreadId;
    use std::time::Duration;

    type Seen = Arc<Mutex<Vec<(usize, ThreadId)>>>;

    /// A chunk's work that takes `pause` and records which thread wrote
    /// which indices.
    fn recorder(seen: &Seen, pause: Duration) -> Share<usize> {
        let seen = seen.clone();
        Arc::new(move |r: Range<usize>| {
            std::thread::sleep(pause);
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
    fn every_index_is_written_once_and_helpers_take_chunks() {
        let helpers = Helpers::new(3);
        for round in 0..3 {
            let crew = helpers.claim(3);
            // Idle from the start, and again before their results came.
            assert_eq!((crew.helpers.len(), crew.busy), (3, 0), "round {round}");
            let seen = Seen::default();
            let (n, helped) = crew.run(1000, 100, recorder(&seen, Duration::from_millis(10)));
            assert_eq!(n, 1000);
            let threads = threads(&seen);
            assert!(threads.contains(&std::thread::current().id()));
            assert!(helped >= 1, "a helper took a chunk within 100 ms");
            assert!((2..=4).contains(&threads.len()), "{}", threads.len());
            let mut indices: Vec<usize> =
                seen.lock().expect("seen").iter().map(|(i, _)| *i).collect();
            indices.sort_unstable();
            assert_eq!(indices, (0..1000).collect::<Vec<_>>(), "round {round}");
        }
    }

    #[test]
    fn no_helpers_no_crew() {
        assert!(Helpers::new(0).is_empty());
        let crew = Helpers::new(0).claim(5).is_empty();
        assert!(crew);
        assert!(Helpers::new(4).claim(0).is_empty());
    }

    #[test]
    fn a_claimed_helper_is_busy_for_others_until_released() {
        let helpers = Helpers::new(1);
        let first = helpers.claim(2);
        assert_eq!((first.helpers.len(), first.busy), (1, 0));
        let second = helpers.claim(1);
        assert_eq!((second.helpers.len(), second.busy), (0, 1));
        // The second writes alone.
        let seen = Seen::default();
        let (n, helped) = second.run(10, 1, recorder(&seen, Duration::ZERO));
        assert_eq!((n, helped), (10, 0));
        assert_eq!(threads(&seen), [std::thread::current().id()].into());
        // Released unused, it is claimed again.
        drop(first);
        assert_eq!(helpers.claim(1).helpers.len(), 1);
    }

    #[test]
    fn a_panicking_chunk_ends_that_chunk_not_the_helper() {
        let helpers = Helpers::new(1);
        // 20 chunks of 10 ms: the helper takes one well before the caller
        // is done, and panics on it.
        let (n, helped) = helpers.claim(1).run(
            200,
            10,
            Arc::new(|r: Range<usize>| {
                std::thread::sleep(Duration::from_millis(10));
                assert_ne!(
                    std::thread::current().name(),
                    Some("gale-fanout-0"),
                    "a bug"
                );
                r.len()
            }),
        );
        assert_eq!(
            (n, helped),
            (190, 0),
            "the chunk it took is lost, the rest written"
        );
        let crew = helpers.claim(1);
        assert_eq!(crew.helpers.len(), 1, "idle again");
        let seen = Seen::default();
        let (n, _) = crew.run(100, 10, recorder(&seen, Duration::from_millis(5)));
        assert_eq!(n, 100);
    }
}
