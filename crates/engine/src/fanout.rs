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
//! not waited for (it then writes nothing): the deliverer waits only for
//! the chunks being written.
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
            let mut finish = Finish {
                idle: helper.idle.clone(),
                done: Some(done.clone()),
                begun: false,
            };
            let (cursor, share, begun) = (cursor.clone(), share.clone(), state.clone());
            let job: Job = Box::new(move || {
                if begun
                    .compare_exchange(PENDING, RUNNING, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    finish.begun = true;
                    finish.send(cursor.drain(&share));
                }
                // Too late (the deliverer found nothing left): idle again
                // as `finish` drops, having written nothing.
            });
            // Never waits: an idle helper's slot is empty (it took its
            // last job before it was idle); fails only if the thread is
            // gone, and the dropped job leaves it idle.
            if helper.jobs.try_send(job).is_ok() {
                handed.push(state);
            }
        }
        drop(done);
        let mut close = Close {
            handed: &handed,
            cursor: &cursor,
            running: None,
        };
        let (mut all, _) = cursor.drain(&share);
        let running = close.now();
        let mut helped = 0;
        // One answer from each that began, even one that panicked.
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

/// The end of the deliverer's own part: the handed jobs that have not
/// begun are too late, and write nothing. Done on unwinding too, so a
/// panic in the deliverer's part never leaves a job to write after it
/// (and its push behind a later one); the cursor is then spent as well.
struct Close<'a> {
    handed: &'a [Arc<AtomicU8>],
    cursor: &'a Cursor,
    running: Option<usize>,
}

impl Close<'_> {
    /// Marks the jobs not yet begun too late; how many began.
    fn now(&mut self) -> usize {
        *self.running.get_or_insert_with(|| {
            self.handed
                .iter()
                .filter(|s| {
                    s.compare_exchange(PENDING, LATE, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                })
                .count()
        })
    }
}

impl Drop for Close<'_> {
    fn drop(&mut self) {
        if self.running.is_none() {
            self.cursor.next.store(usize::MAX / 2, Ordering::Relaxed);
            self.now();
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

/// The end of a helper's job: the helper is idle again before its answer
/// reaches the deliverer (so the deliverer's next fan-out finds it free),
/// and also if the job came too late or panicked. A job that began always
/// answers, so the deliverer waits for no other.
struct Finish<T: Default> {
    idle: Arc<AtomicBool>,
    done: Option<SyncSender<T>>,
    begun: bool,
}

impl<T: Default> Finish<T> {
    fn send(mut self, answer: T) {
        if let Some(done) = self.done.take() {
            self.idle.store(true, Ordering::Release);
            let _ = done.send(answer);
        }
    }
}

impl<T: Default> Drop for Finish<T> {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            self.idle.store(true, Ordering::Release);
            // Begun and panicked: nothing counted of what it wrote.
            if self.begun {
                let _ = done.send(T::default());
            }
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

    /// All `want` helpers, once they are idle again (a job found too late
    /// keeps its helper until the thread has run it).
    fn claim_all(helpers: &Helpers, want: usize) -> Crew<'_> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let crew = helpers.claim(want);
            if crew.helpers.len() == want {
                return crew;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "helpers never idle again"
            );
            drop(crew);
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn every_index_is_written_once_and_helpers_take_chunks() {
        let helpers = Helpers::new(3);
        // Idle from the start.
        assert_eq!(helpers.claim(3).helpers.len(), 3);
        for round in 0..3 {
            let crew = claim_all(&helpers, 3);
            let seen = Seen::default();
            // 20 chunks of 10 ms: 200 ms for the caller alone, so the
            // helpers begin well before the cursor runs out.
            let (n, helped) = crew.run(1000, 50, recorder(&seen, Duration::from_millis(10)));
            assert_eq!(n, 1000);
            let threads = threads(&seen);
            assert!(threads.contains(&std::thread::current().id()));
            assert!(helped >= 1, "a helper took a chunk within 200 ms");
            assert!((2..=4).contains(&threads.len()), "{}", threads.len());
            let mut indices: Vec<usize> =
                seen.lock().expect("seen").iter().map(|(i, _)| *i).collect();
            indices.sort_unstable();
            assert_eq!(indices, (0..1000).collect::<Vec<_>>(), "round {round}");
        }
    }

    #[test]
    fn no_helpers_no_crew() {
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
        // 40 chunks of 10 ms: the helper takes one well before the caller
        // is done, and panics on it.
        let (n, helped) = helpers.claim(1).run(
            400,
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
            (390, 0),
            "the chunk it took is lost, the rest written"
        );
        let crew = claim_all(&helpers, 1);
        let seen = Seen::default();
        let (n, _) = crew.run(100, 10, recorder(&seen, Duration::from_millis(5)));
        assert_eq!(n, 100);
    }
}
