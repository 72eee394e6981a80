//! A connection's bounded outbound queue. Anything that is not the direct
//! answer to a plain-text request (event replies from the worker pool,
//! pushes) is queued here and written by the connection's own task, which
//! drains the whole queue into the socket with one flush (coalesced
//! writes).
//!
//! Full is a real outcome with a policy: `drop_oldest` drops the oldest
//! queued *push* (replies are never dropped) and counts it; `close` (or a
//! queue full of replies) marks the connection as a slow consumer, which
//! its task closes with 1013. Either way one slow client never grows
//! server memory past `connection.outbound_queue` messages (shared with
//! their other recipients; where they came in runs that carry one
//! another, see `Hub`, at most 2.5 times their bytes).
//!
//! While the connection's task writes nothing and nothing is queued, the
//! task lends its plain TCP stream to the outbox ([`Outbox::lend`]): a
//! push then goes straight into the socket from whoever sends it, with
//! no queue and no wake-up (as a bare loop over sockets would write it).
//! What the socket does not take at once is queued as usual, and the
//! task takes the stream back before it writes anything itself.
//!
//! It also counts the connection's JSON events in the router (queued or
//! running): the connection stops reading at its bound, and each event
//! that finishes wakes it, reply or not.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::transport::MAX_SLICES;
use crate::websocket::{Lendable, Prepared, Run};
use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::config::SlowConsumer;
use crate::metrics::Metrics;

/// Queue slots an emptied queue may keep allocated once its traffic is
/// light again; beyond this, the memory of a burst is returned.
pub const KEEP_CAPACITY: usize = 16;

/// One queued entry: a message, or a run of pushes. Messages are
/// shared (not copied) with every other recipient of the same push.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// One message.
    One {
        /// The encoded message.
        text: Prepared,
        /// A reply is owed to the client and is never dropped.
        reply: bool,
    },
    /// Pushes framed together ([`Run`]), from the `from`th on (the ones
    /// before were dropped to make room).
    Run {
        /// The run.
        run: Run,
        /// Its first message still queued.
        from: usize,
    },
}

impl Outgoing {
    /// The messages it holds, in order.
    pub fn messages(&self) -> &[Prepared] {
        match self {
            Outgoing::One { text, .. } => std::slice::from_ref(text),
            Outgoing::Run { run, from } => run.messages().get(*from..).unwrap_or_default(),
        }
    }

    /// How many messages it holds.
    pub fn len(&self) -> usize {
        self.messages().len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn is_reply(&self) -> bool {
        matches!(self, Outgoing::One { reply: true, .. })
    }
}

/// Messages in `entries`.
pub fn count(entries: &[Outgoing]) -> usize {
    entries.iter().map(Outgoing::len).sum()
}

/// Joins each run in `entries` with the run after it where that one
/// continues it ([`Run::continues`]): one entry, one slice to write,
/// the same messages in the same order.
pub fn coalesce(entries: &mut Vec<Outgoing>) {
    if entries.len() < 2 {
        return;
    }
    let mut kept: usize = 0;
    for i in 0..entries.len() {
        if kept > 0
            && let (
                Some(Outgoing::Run {
                    run: before,
                    from: start,
                }),
                Some(Outgoing::Run { run, from }),
            ) = (entries.get(kept - 1), entries.get(i))
            && run.continues(before, *from)
        {
            let joined = Outgoing::Run {
                run: run.clone(),
                from: *start,
            };
            entries[kept - 1] = joined;
            continue;
        }
        entries.swap(kept, i);
        kept += 1;
    }
    entries.truncate(kept);
}

#[derive(Debug, Default)]
struct State {
    /// Oldest first: dropping the oldest is O(1). [`Outbox::take`] swaps
    /// it whole with a caller's `Vec` (no copy while it starts at the
    /// front of its buffer, as it does after a take).
    queue: VecDeque<Outgoing>,
    /// Messages in `queue` (a run is one entry of many).
    len: usize,
    overflowed: bool,
    closed: bool,
    /// To be closed with this code and reason once what is queued is
    /// written (the application, or the server API, ended it).
    ending: Option<Box<(u16, String)>>,
    /// An end was set (taken or not): the first one stands.
    ended: bool,
    /// The connection's stream, lent while its task writes nothing and
    /// nothing is queued (never while anything is).
    lent: Option<Lent>,
    /// The unwritten end of a frame a lent write began: the socket's
    /// next bytes, whatever else is queued, so its task takes it first
    /// ([`Outbox::claim`]). Not a queued message (it is counted as sent,
    /// and never dropped): one frame at most, the loan ended with it.
    rest: Option<Bytes>,
}

impl State {
    /// Drops the oldest queued push (never a reply), counted; false
    /// when every queued message is a reply.
    fn drop_oldest_push(&mut self, metrics: &Metrics) -> bool {
        let Some(i) = self.queue.iter().position(|m| !m.is_reply()) else {
            return false;
        };
        match self.queue.get_mut(i) {
            Some(Outgoing::Run { run, from }) if *from + 1 < run.len() => *from += 1,
            _ => {
                self.queue.remove(i);
            }
        }
        self.len -= 1;
        metrics.outbound_dropped.inc();
        true
    }

    /// Writes `slices` into the lent stream, if it is lent; returns the
    /// bytes the socket took (`None`: not lent, or it took none). Unless
    /// it took them all, the loan ends: the connection's task, woken by
    /// what is queued next, writes the rest and whatever follows. Over
    /// TLS they are sealed first, and taken whole once sealed: records the
    /// socket does not take are the rest the task writes first.
    fn write_lent(&mut self, slices: &[IoSlice<'_>]) -> Option<usize> {
        let lent = self.lent.as_ref().filter(|_| self.queue.is_empty())?;
        let all: usize = slices.iter().map(|s| s.len()).sum();
        let tcp = match lent {
            Lent::Plain(tcp) => tcp,
            // Larger: queued for the connection's task, as before a loan.
            Lent::Tls(..) if all > crate::tls::MAX_LENT => return None,
            Lent::Tls(tcp, records) => {
                let (written, still_lent) = write_sealed(tcp, records, slices, &mut self.rest);
                if !still_lent {
                    self.lent = None;
                }
                return written.then_some(all);
            }
        };
        match crate::transport::send_now(tcp, slices) {
            Ok(n) if n == all => Some(n),
            Ok(n) => {
                self.lent = None;
                Some(n).filter(|&n| n > 0)
            }
            // Full, or the client is gone: the task finds out which.
            Err(_) => {
                self.lent = None;
                None
            }
        }
    }

    /// The front of `texts` one lent write takes: at most [`MAX_SLICES`]
    /// messages and, over TLS, at most [`crate::tls::MAX_LENT`] bytes (at
    /// least one message: a larger one is refused by the write, and
    /// queued).
    fn lent_share<'t>(&self, texts: &'t [Prepared]) -> &'t [Prepared] {
        let most = texts.get(..MAX_SLICES).unwrap_or(texts);
        if !matches!(self.lent, Some(Lent::Tls(..))) {
            return most;
        }
        let mut bytes = 0;
        let fit = most
            .iter()
            .take_while(|t| {
                bytes += t.frame().len();
                bytes <= crate::tls::MAX_LENT
            })
            .count();
        most.get(..fit.max(1)).unwrap_or(most)
    }

    /// With `n` bytes of `messages`' frames taken by a lent write: keeps
    /// the end of a frame it began aside (the task writes it first) and
    /// returns how many messages are written or begun, and how many of
    /// those are written whole.
    fn took(&mut self, messages: &[Prepared], n: usize) -> (usize, usize) {
        if self.rest.is_some() {
            // Sealed records the socket did not take (TLS): every message
            // is begun, none is on the wire whole for sure.
            return (messages.len(), 0);
        }
        let (whole, rest) = Prepared::written(messages, n);
        if rest.is_empty() {
            return (whole, whole);
        }
        self.rest = Some(rest);
        (whole + 1, whole)
    }

    /// Frees an empty queue's buffer past [`KEEP_CAPACITY`] slots.
    fn give_back(&mut self) {
        if self.queue.is_empty() && self.queue.capacity() > KEEP_CAPACITY {
            self.queue = VecDeque::new();
        }
    }
}

/// A connection's stream, lent to its outbox while its task writes
/// nothing ([`Outbox::lend`]).
#[derive(Clone)]
enum Lent {
    /// Plain TCP: a push is written as it is.
    Plain(Arc<TcpStream>),
    /// TLS on gale's record layer: a push is sealed, then written.
    Tls(Arc<TcpStream>, Arc<Mutex<crate::tls::Records>>),
}

impl std::fmt::Debug for Lent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No keys shown.
        f.write_str(match self {
            Lent::Plain(_) => "Lent::Plain",
            Lent::Tls(..) => "Lent::Tls",
        })
    }
}

thread_local! {
    /// Records sealed for a lent TLS write, per thread.
    static SEALED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Most lent writes one push makes (a default batch of 256 messages is
/// four of [`MAX_SLICES`]): the rest is queued for the connection's task,
/// so that one pusher holds the outbox's lock for a bounded time.
const MAX_LENT_WRITES: usize = 4;

/// Most of a sealing buffer a thread keeps between pushes.
const KEEP_SEALED: usize = 64 * 1024;

/// [`State::write_lent`] over TLS: `slices` sealed, then written into
/// `tcp`; records the socket does not take are kept in `rest`, for the
/// connection's task to write first. Returns whether they were written
/// (sealed, then taken whole), and whether the stream stays lent (the
/// socket took every record).
fn write_sealed(
    tcp: &TcpStream,
    records: &Mutex<crate::tls::Records>,
    slices: &[IoSlice<'_>],
    rest: &mut Option<Bytes>,
) -> (bool, bool) {
    SEALED.with_borrow_mut(|out| {
        out.clear();
        let sealed = crate::tls::seal_lent(records, slices, out).is_ok();
        let done = match crate::transport::send_now(tcp, &[IoSlice::new(out)]) {
            // The peer is gone: nothing sealed reaches it. Not written, so
            // not counted: queued for the task, as on plain TCP, which
            // finds the connection ended.
            Err(e) if gone(&e) => (false, false),
            // Full (or a passing shortage): the records wait for the task.
            sent => {
                let sent = sent.unwrap_or_default();
                let all_sent = sent == out.len();
                if !all_sent {
                    *rest = Some(Bytes::copy_from_slice(&out[sent..]));
                }
                // Not sealed: the connection is closing (a TLS 1.2 write
                // key at its limit, its close_notify the rest).
                (sealed, sealed && all_sent)
            }
        };
        if out.capacity() > KEEP_SEALED {
            *out = Vec::new();
        }
        done
    })
}

/// Whether a failed send says the connection is dead for good (reset,
/// shut, or given up on by TCP's retransmissions), rather than that the
/// socket is full for now.
fn gone(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        BrokenPipe
            | ConnectionReset
            | ConnectionAborted
            | NotConnected
            | TimedOut
            | HostUnreachable
            | NetworkUnreachable
    )
}

/// What a push to many outboxes did: how many deliveries (each message
/// to each connection) it queued or wrote, and how many of those the
/// caller itself wrote whole into idle connections' sockets
/// ([`Outbox::lend`]), none left for a connection's task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reach {
    /// Deliveries queued or written.
    pub reached: usize,
    /// Of those, written whole by the caller.
    pub written: usize,
}

impl std::ops::AddAssign for Reach {
    fn add_assign(&mut self, other: Reach) {
        self.reached += other.reached;
        self.written += other.written;
    }
}

/// What one outbox did with a push: queued or written, not added to the
/// queue (refused, written, or queued in place of a dropped one), and
/// written whole into the lent socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Pushed {
    queued: usize,
    not_added: usize,
    written: usize,
}

/// The queue. Shared between the connection task and whoever sends to it.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    ready: Notify,
    events: AtomicUsize,
    /// When the connection's identity ends (Unix seconds; 0: never).
    expires: AtomicU64,
    /// A refresh of that identity is under way.
    refreshing: AtomicBool,
    capacity: usize,
    policy: SlowConsumer,
    metrics: Arc<Metrics>,
}

/// What [`Outbox::take`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// Messages were moved out (possibly none).
    Messages,
    /// The consumer is too slow: close the connection.
    SlowConsumer,
    /// Everything queued was taken and the connection is to be closed
    /// with this code and reason.
    End(u16, String),
}

impl Taken {
    /// The close this take calls for, if any: the one the connection was
    /// ended with, or a slow consumer's (1013, counted in `metrics`).
    pub(crate) fn end(self, metrics: &Metrics) -> Option<(u16, String)> {
        match self {
            Taken::Messages => None,
            Taken::End(code, reason) => Some((code, reason)),
            Taken::SlowConsumer => {
                metrics.slow_consumers.inc();
                Some((
                    crate::websocket::close_code::TRY_AGAIN_LATER,
                    "slow consumer".to_owned(),
                ))
            }
        }
    }
}

impl Outbox {
    /// An empty queue; it allocates only when used.
    pub fn new(capacity: usize, policy: SlowConsumer, metrics: Arc<Metrics>) -> Outbox {
        Outbox {
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            events: AtomicUsize::new(0),
            expires: AtomicU64::new(0),
            refreshing: AtomicBool::new(false),
            capacity: capacity.max(1),
            policy,
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every mutation is complete before it can panic; a poisoned lock
        // still holds a consistent queue.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a message without waiting. Returns false when it was not
    /// queued (connection closed or judged too slow).
    pub fn push(&self, text: Prepared, reply: bool) -> bool {
        // Counted before it can be taken, as `push_each` does: the gauge
        // never reads below what is queued.
        self.metrics.outbound_queued.inc();
        let pushed = self.queue(std::slice::from_ref(&text), reply, true);
        if pushed.not_added > 0 {
            self.metrics.outbound_queued.dec_by(pushed.not_added as i64);
        }
        pushed.queued > 0
    }

    /// Queues `texts` (shared, not copied), in order, for each of
    /// `outboxes`; returns how many messages were queued or written in
    /// all, and how many of those were written whole here. Each
    /// outbox is locked and woken once for all of them, and the
    /// queued-messages gauge, which every core shares, moves twice per
    /// call rather than once per message: up by all of them first, so it
    /// never reads below what is queued, then down by those that did not
    /// add a message. `metrics` is the one every outbox here counts in
    /// (the server's).
    ///
    /// With `write_now`, an idle connection's share is written into its
    /// socket at once ([`Outbox::lend`]); without, it is queued for the
    /// connection's task (for a caller that holds a lock others wait on).
    pub fn push_each(
        outboxes: &[Arc<Outbox>],
        texts: &[Prepared],
        metrics: &Metrics,
        write_now: bool,
    ) -> Reach {
        Outbox::push_all(outboxes, texts.len(), metrics, |o| {
            o.queue(texts, false, write_now)
        })
    }

    /// As [`Outbox::push_each`], for a run from its `from`th message:
    /// one entry in each queue.
    pub fn push_run(
        outboxes: &[Arc<Outbox>],
        run: &Run,
        from: usize,
        metrics: &Metrics,
        write_now: bool,
    ) -> Reach {
        let each = run.len().saturating_sub(from);
        Outbox::push_all(outboxes, each, metrics, |o| {
            o.queue_run(run, from, write_now)
        })
    }

    fn push_all(
        outboxes: &[Arc<Outbox>],
        each: usize,
        metrics: &Metrics,
        queue: impl Fn(&Outbox) -> Pushed,
    ) -> Reach {
        let all = outboxes.len() * each;
        if all == 0 {
            return Reach::default();
        }
        metrics.outbound_queued.inc_by(all as i64);
        let (mut reach, mut not_added) = (Reach::default(), 0_usize);
        for o in outboxes {
            let pushed = queue(o);
            reach.reached += pushed.queued;
            reach.written += pushed.written;
            not_added += pushed.not_added;
        }
        if not_added > 0 {
            metrics.outbound_queued.dec_by(not_added as i64);
        }
        metrics.pushes.inc_by(reach.reached as u64);
        reach
    }

    /// Queues `texts` under one lock and wakes the connection's task if
    /// it was not already. Returns how many were queued (or written), how
    /// many did not add a message (refused, written, or queued in place
    /// of a dropped one: the caller moves the gauge) and how many were
    /// written whole.
    fn queue(&self, texts: &[Prepared], reply: bool, write_now: bool) -> Pushed {
        let mut st = self.lock();
        // Only the first message into an empty queue wakes the task: it
        // takes everything queued when it runs, and another wake-up would
        // only fight its core for the notifier's cache line.
        let was_empty = st.queue.is_empty();
        let (mut queued, mut not_added, mut written, mut overflowed) = (0, 0, 0, false);
        let mut texts = texts;
        // Into a lent stream, a write at a time for as long as the socket
        // takes each whole (one it does not ends the loan), at most
        // MAX_LENT_WRITES writes: the rest is queued for the task.
        for _ in 0..MAX_LENT_WRITES {
            if !write_now || st.lent.is_none() || st.closed || st.overflowed || texts.is_empty() {
                break;
            }
            let some = st.lent_share(texts);
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            for (slot, t) in slices.iter_mut().zip(some) {
                *slot = IoSlice::new(t.frame());
            }
            let Some(n) = st.write_lent(&slices[..some.len()]) else {
                break;
            };
            let (begun, whole) = st.took(some, n);
            texts = &texts[begun..];
            self.written(begun);
            // Written (or begun): reached, not left in the queue.
            queued += begun;
            not_added += begun;
            written += whole;
        }
        // Room for the whole run at once, not grown message by message.
        if !st.closed && !st.overflowed {
            let room = self.capacity.saturating_sub(st.len);
            st.queue.reserve(texts.len().min(room));
        }
        for text in texts {
            if st.closed || st.overflowed {
                not_added += 1;
                continue;
            }
            if st.len >= self.capacity {
                if self.policy == SlowConsumer::DropOldest && st.drop_oldest_push(&self.metrics) {
                    not_added += 1;
                } else {
                    // The task closes the connection: wake it.
                    st.overflowed = true;
                    overflowed = true;
                    not_added += 1;
                    continue;
                }
            }
            st.queue.push_back(Outgoing::One {
                text: text.clone(),
                reply,
            });
            st.len += 1;
            queued += 1;
        }
        self.settle(st, was_empty, overflowed);
        Pushed {
            queued,
            not_added,
            written,
        }
    }

    /// After a push: ends a loan if anything is now left for the task
    /// (queued, or the rest of a begun frame), and wakes the task if it
    /// was not already (only the first push into an empty queue wakes
    /// it), or for an overflow.
    fn settle(&self, mut st: MutexGuard<'_, State>, was_empty: bool, overflowed: bool) {
        let left = !st.queue.is_empty() || st.rest.is_some();
        if left {
            st.lent = None;
        }
        drop(st);
        if overflowed || (was_empty && left) {
            self.ready.notify_one();
        }
    }

    /// Counts `n` messages written straight into the socket.
    fn written(&self, n: usize) {
        if n > 0 {
            self.metrics.messages_out.inc_by(n as u64);
            self.metrics.outbound_direct.inc_by(n as u64);
        }
    }

    /// Queues a run of pushes from its `from`th message as one entry, as
    /// [`Outbox::queue`] queues its messages: where it does not fit,
    /// `drop_oldest` drops the oldest pushes (the run's own first, if it
    /// is longer than the queue) and `close` queues none of it and marks a
    /// slow consumer.
    fn queue_run(&self, run: &Run, from: usize, write_now: bool) -> Pushed {
        let all = run.len().saturating_sub(from);
        let mut st = self.lock();
        if st.closed || st.overflowed || all == 0 {
            return Pushed {
                not_added: all,
                ..Pushed::default()
            };
        }
        let was_empty = st.queue.is_empty();
        let (mut from, mut begun, mut whole) = (from, 0, 0);
        if write_now && let Some(n) = st.write_lent(&[IoSlice::new(run.frames_from(from))]) {
            (begun, whole) = st.took(run.messages().get(from..).unwrap_or_default(), n);
            self.written(begun);
            from += begun;
        }
        let n = run.len().saturating_sub(from);
        let mut dropped = 0;
        if n > 0 {
            let over = (st.len + n).saturating_sub(self.capacity);
            // As message by message: the first that finds the queue full
            // and no push to drop (a queue full of replies) marks it slow.
            let full_of_replies =
                || st.len >= self.capacity && st.queue.iter().all(Outgoing::is_reply);
            if over > 0 && (self.policy == SlowConsumer::Close || full_of_replies()) {
                st.overflowed = true;
                self.settle(st, was_empty, true);
                return Pushed {
                    queued: begun,
                    not_added: begun + n,
                    written: whole,
                };
            }
            // Written only: reading the queue's last entry, a cache line
            // the connection's core touched last, cost more than all the
            // rest.
            st.queue.push_back(Outgoing::Run {
                run: run.clone(),
                from,
            });
            st.len += n;
            while st.len > self.capacity && st.drop_oldest_push(&self.metrics) {
                dropped += 1;
            }
        }
        self.settle(st, was_empty, false);
        // Every message went in or out; those written, and those dropped
        // for the rest, did not add one to the queue.
        Pushed {
            queued: all,
            not_added: begun + dropped,
            written: whole,
        }
    }

    /// Lends the connection's stream: while nothing is queued, pushes are
    /// written straight into it by whoever sends them (over TLS, sealed
    /// first with its record layer), and the task is not woken for them. Its task calls this when it has
    /// nothing to write, and takes the stream back with [`Outbox::claim`]
    /// (which hands it the end of any frame begun meanwhile) before it
    /// writes anything. False when something is queued or begun (the
    /// task was woken for it) or the connection is ending.
    pub(crate) fn lend(&self, stream: Lendable<'_>) -> bool {
        let mut st = self.lock();
        if !st.queue.is_empty()
            || st.rest.is_some()
            || st.closed
            || st.overflowed
            || st.ending.is_some()
        {
            return false;
        }
        st.lent = Some(match stream {
            Lendable::Plain(tcp) => Lent::Plain(tcp.clone()),
            Lendable::Tls(tcp, records) => Lent::Tls(tcp.clone(), records.clone()),
        });
        true
    }

    /// Takes the lent stream back: once this returns, nobody else writes
    /// into the socket. Returns the unwritten end of a frame a lent write
    /// began, if one did: the socket's next bytes, before anything its
    /// task queued since it lent the stream.
    #[must_use = "the rest of a begun frame goes first into the socket"]
    pub(crate) fn claim(&self) -> Option<Bytes> {
        let mut st = self.lock();
        st.lent = None;
        st.rest.take()
    }

    /// Queued messages leaving the queue, in the gauge.
    fn left(&self, n: usize) {
        if n > 0 {
            self.metrics.outbound_queued.dec_by(n as i64);
        }
    }

    /// Resolves when something was pushed since the last wake-up. Pin it
    /// once and re-arm it after it fires, rather than creating one per
    /// wait: each creation costs a lock on the notifier.
    pub fn ready(&self) -> tokio::sync::futures::Notified<'_> {
        self.ready.notified()
    }

    /// Whether the consumer was judged too slow (the queue overflowed
    /// under the `close` policy, or filled with replies).
    pub fn overflowed(&self) -> bool {
        self.lock().overflowed
    }

    /// Wakes the connection's task, as a push does.
    pub fn wake(&self) {
        self.ready.notify_one();
    }

    /// Moves every queued message into `into`. A busy connection's take
    /// (more than [`KEEP_CAPACITY`] messages into an empty `into`) swaps
    /// the two buffers whole: no message moves and nothing is allocated,
    /// flush after flush. A light one gives back what a burst grew: an
    /// idle connection should not keep the peak of its busiest moment
    /// (see also [`Outbox::trim`]).
    pub fn take(&self, into: &mut Vec<Outgoing>) -> Taken {
        let mut st = self.lock();
        // Whoever takes is about to write.
        st.lent = None;
        if st.overflowed {
            return Taken::SlowConsumer;
        }
        self.left(st.len);
        st.len = 0;
        if into.is_empty() && st.queue.len() > KEEP_CAPACITY {
            let spare = VecDeque::from(std::mem::take(into));
            *into = Vec::from(std::mem::replace(&mut st.queue, spare));
        } else {
            into.extend(st.queue.drain(..));
            st.give_back();
        }
        match st.ending.take() {
            Some(end) => {
                let (code, reason) = *end;
                Taken::End(code, reason)
            }
            None => Taken::Messages,
        }
    }

    /// Gives back the memory a burst grew, if nothing is queued: for a
    /// connection whose last take was a busy one and which has been quiet
    /// since (its task calls this at each ping tick).
    pub fn trim(&self) {
        self.lock().give_back();
    }

    /// Ends the connection: what is queued is written, then it closes
    /// with `code` and `reason` (at most 123 bytes). Nothing more is
    /// queued. The first end of a connection stands: false when it was
    /// ended before (or is closed), and this one did nothing.
    pub fn end(&self, code: u16, reason: &str) -> bool {
        self.end_with(code, reason, true)
    }

    /// As [`Outbox::end`], but replies to what the connection asked
    /// before still arrive: the connection answers them, then closes (a
    /// drain).
    pub(crate) fn end_after_replies(&self, code: u16, reason: &str) -> bool {
        self.end_with(code, reason, false)
    }

    fn end_with(&self, code: u16, reason: &str, close: bool) -> bool {
        let mut reason = reason.to_owned();
        while reason.len() > 123 {
            reason.pop();
        }
        let mut st = self.lock();
        if st.closed || st.ended {
            return false;
        }
        st.ending = Some(Box::new((code, reason)));
        st.ended = true;
        st.closed = close;
        drop(st);
        self.ready.notify_one();
        true
    }

    /// When the connection's identity ends (Unix seconds), if it does.
    pub fn expires(&self) -> Option<u64> {
        Some(self.expires.load(Ordering::Acquire)).filter(|&at| at > 0)
    }

    /// Sets when the connection's identity ends.
    pub fn set_expires(&self, at: Option<u64>) {
        self.expires.store(at.unwrap_or(0), Ordering::Release);
    }

    /// Marks a refresh as started; false when one already runs.
    pub fn start_refresh(&self) -> bool {
        !self.refreshing.swap(true, Ordering::AcqRel)
    }

    /// Marks the refresh as done.
    pub fn refresh_done(&self) {
        self.refreshing.store(false, Ordering::Release);
    }

    /// Counts one more event of this connection in the router; true when
    /// it is the first (the connection just became busy).
    pub fn event_started(&self) -> bool {
        self.events.fetch_add(1, Ordering::AcqRel) == 0
    }

    /// Counts an event done and wakes the connection (it may read again);
    /// true when it was the last.
    pub fn event_done(&self) -> bool {
        let last = self.events.fetch_sub(1, Ordering::AcqRel) == 1;
        self.ready.notify_one();
        last
    }

    /// This connection's events queued or running in the router now.
    pub fn events(&self) -> usize {
        self.events.load(Ordering::Acquire)
    }

    /// Refuses further messages; called when the connection ends.
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.lent = None;
        st.rest = None;
        self.left(st.len);
        st.len = 0;
        st.queue = VecDeque::new();
    }

    /// Messages waiting now.
    pub fn len(&self) -> usize {
        self.lock().len
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(cap: usize, policy: SlowConsumer) -> (Outbox, Arc<Metrics>) {
        let m = Arc::new(Metrics::new());
        (Outbox::new(cap, policy, m.clone()), m)
    }

    fn texts(v: &[Outgoing]) -> Vec<&str> {
        v.iter()
            .flat_map(Outgoing::messages)
            .map(Prepared::as_str)
            .collect()
    }

    #[test]
    fn the_first_end_stands_even_once_taken() {
        let (o, _) = outbox(4, SlowConsumer::DropOldest);
        assert!(o.push("before".into(), false));
        assert!(o.end_after_replies(4001, "bye"));
        assert!(!o.end_after_replies(1012, "again"), "ended already");
        let mut buf = Vec::new();
        assert!(matches!(o.take(&mut buf), Taken::End(4001, ref r) if r == "bye"));
        assert_eq!(buf.len(), 1, "what was queued before the end comes with it");
        // Taken, it is not set again: a drain after it neither ends the
        // connection a second time nor counts it.
        assert!(!o.end(1012, "drained"));
        assert!(matches!(o.take(&mut buf), Taken::Messages));
    }

    #[test]
    fn drop_oldest_drops_pushes_but_never_replies() {
        let (o, m) = outbox(3, SlowConsumer::DropOldest);
        assert!(o.push("r1".into(), true));
        assert!(o.push("p1".into(), false));
        assert!(o.push("p2".into(), false));
        assert!(o.push("p3".into(), false), "p1 makes room");
        assert_eq!(m.outbound_dropped.get(), 1);
        let mut out = Vec::new();
        assert_eq!(o.take(&mut out), Taken::Messages);
        assert_eq!(texts(&out), ["r1", "p2", "p3"]);
    }

    #[test]
    fn a_queue_full_of_replies_marks_a_slow_consumer() {
        let (o, _) = outbox(2, SlowConsumer::DropOldest);
        assert!(o.push("r1".into(), true));
        assert!(o.push("r2".into(), true));
        assert!(!o.push("r3".into(), true));
        assert_eq!(o.take(&mut Vec::new()), Taken::SlowConsumer);
    }

    #[test]
    fn close_policy_marks_a_slow_consumer_at_the_first_overflow() {
        let (o, m) = outbox(1, SlowConsumer::Close);
        assert!(o.push("p1".into(), false));
        assert!(!o.push("p2".into(), false));
        assert_eq!(o.take(&mut Vec::new()), Taken::SlowConsumer);
        assert_eq!(m.outbound_dropped.get(), 0);
    }

    /// Pushes `n` messages "m".
    fn burst(o: &Outbox, n: usize) {
        for _ in 0..n {
            o.push("m".into(), false);
        }
    }

    #[test]
    fn a_burst_gives_its_memory_back_once_taken() {
        let (o, _) = outbox(1_000, SlowConsumer::DropOldest);
        burst(&o, 500);
        let mut out = Vec::new();
        assert_eq!(o.take(&mut out), Taken::Messages);
        assert_eq!(out.len(), 500);
        assert!(o.lock().queue.capacity() <= KEEP_CAPACITY);
    }

    #[test]
    fn a_busy_take_swaps_buffers_and_a_light_one_gives_the_burst_back() {
        let (o, _) = outbox(1_000, SlowConsumer::DropOldest);
        let mut out = Vec::with_capacity(600);
        for i in 0..500 {
            o.push(format!("m{i}").as_str().into(), false);
        }
        assert_eq!(o.take(&mut out), Taken::Messages);
        assert_eq!(out.len(), 500);
        assert_eq!(texts(&out)[499], "m499", "in order");
        assert!(
            o.lock().queue.capacity() >= 600,
            "the caller's emptied buffer is kept for the next burst"
        );

        // Light traffic: moved, and the burst's buffer released.
        out.clear();
        o.push("light".into(), false);
        assert_eq!(o.take(&mut out), Taken::Messages);
        assert_eq!(texts(&out), ["light"]);
        assert!(o.lock().queue.capacity() <= KEEP_CAPACITY);
    }

    #[test]
    fn trim_releases_a_quiet_queue_and_keeps_a_full_one() {
        let (o, _) = outbox(1_000, SlowConsumer::DropOldest);
        let mut out = Vec::with_capacity(600);
        burst(&o, 500);
        o.take(&mut out);
        o.push("queued".into(), false);
        o.trim();
        assert!(o.lock().queue.capacity() >= 600, "something is queued");
        out.clear();
        o.take(&mut out);
        assert_eq!(texts(&out), ["queued"]);
        assert!(o.lock().queue.capacity() <= KEEP_CAPACITY);
        burst(&o, 500);
        let mut other = Vec::with_capacity(600);
        o.take(&mut other);
        assert!(o.lock().queue.capacity() >= 600);
        o.trim();
        assert!(
            o.lock().queue.capacity() <= KEEP_CAPACITY,
            "quiet: given back"
        );
    }

    #[test]
    fn the_gauge_follows_the_queue() {
        let (o, m) = outbox(2, SlowConsumer::DropOldest);
        o.push("p1".into(), false);
        o.push("p2".into(), false);
        o.push("p3".into(), false);
        assert_eq!(m.outbound_queued.get(), 2, "one dropped to make room");
        o.take(&mut Vec::new());
        assert_eq!(m.outbound_queued.get(), 0);
        o.push("p4".into(), false);
        o.close();
        assert_eq!(m.outbound_queued.get(), 0);
    }

    #[test]
    fn push_each_counts_what_each_outbox_did() {
        let m = Arc::new(Metrics::new());
        let open = Arc::new(Outbox::new(4, SlowConsumer::DropOldest, m.clone()));
        let full = Arc::new(Outbox::new(1, SlowConsumer::DropOldest, m.clone()));
        let closed = Arc::new(Outbox::new(4, SlowConsumer::DropOldest, m.clone()));
        full.push("old".into(), false);
        closed.close();
        let all = [open.clone(), full.clone(), closed.clone()];
        let reach = Outbox::push_each(&all, &["new".into()], &m, true);
        let none_written = Reach {
            reached: 2,
            written: 0,
        };
        assert_eq!(reach, none_written, "the closed one refused; none lent");
        assert_eq!(m.pushes.get(), 2);
        assert_eq!(
            m.outbound_dropped.get(),
            1,
            "the full one dropped its oldest"
        );
        assert_eq!(m.outbound_queued.get(), 2, "one in each open queue");
        let mut out = Vec::new();
        full.take(&mut out);
        assert_eq!(texts(&out), ["new"]);
        open.take(&mut Vec::new());
        assert_eq!(m.outbound_queued.get(), 0);
        let nothing = Reach::default();
        assert_eq!(Outbox::push_each(&[], &["x".into()], &m, true), nothing);
        assert_eq!(Outbox::push_each(&all, &[], &m, true), nothing);
    }

    #[test]
    fn push_each_queues_a_run_in_order_within_each_bound() {
        let m = Arc::new(Metrics::new());
        let roomy = Arc::new(Outbox::new(8, SlowConsumer::DropOldest, m.clone()));
        let small = Arc::new(Outbox::new(2, SlowConsumer::DropOldest, m.clone()));
        let strict = Arc::new(Outbox::new(2, SlowConsumer::Close, m.clone()));
        let run: Vec<Prepared> = ["a", "b", "c"].into_iter().map(Prepared::from).collect();
        let all = [roomy.clone(), small.clone(), strict.clone()];
        let reach = Outbox::push_each(&all, &run, &m, true);
        assert_eq!(reach.reached, 3 + 3 + 2);
        assert_eq!(m.outbound_dropped.get(), 1, "small dropped a for c");
        assert_eq!(m.outbound_queued.get(), 3 + 2 + 2);
        let mut out = Vec::new();
        roomy.take(&mut out);
        assert_eq!(texts(&out), ["a", "b", "c"]);
        out.clear();
        small.take(&mut out);
        assert_eq!(texts(&out), ["b", "c"]);
        assert_eq!(strict.take(&mut Vec::new()), Taken::SlowConsumer);
    }

    fn run(texts: &[&str]) -> Run {
        let msgs: Vec<Prepared> = texts.iter().copied().map(Prepared::from).collect();
        Run::new(&msgs)
    }

    #[test]
    fn a_run_is_one_entry_counted_as_its_messages() {
        let m = Arc::new(Metrics::new());
        let a = Arc::new(Outbox::new(8, SlowConsumer::DropOldest, m.clone()));
        let b = Arc::new(Outbox::new(8, SlowConsumer::DropOldest, m.clone()));
        a.push("r".into(), true);
        let reach = Outbox::push_run(&[a.clone(), b.clone()], &run(&["x", "y", "z"]), 0, &m, true);
        assert_eq!((reach.reached, reach.written), (6, 0));
        assert_eq!(m.pushes.get(), 6);
        assert_eq!(a.len(), 4);
        assert_eq!(a.lock().queue.len(), 2, "the reply and the run");
        assert_eq!(m.outbound_queued.get(), 7);
        let mut out = Vec::new();
        assert_eq!(a.take(&mut out), Taken::Messages);
        assert_eq!(texts(&out), ["r", "x", "y", "z"]);
        assert_eq!(count(&out), 4);
        b.close();
        assert_eq!(m.outbound_queued.get(), 0);
        assert_eq!(
            Outbox::push_run(&[b], &run(&["late"]), 0, &m, true),
            Reach::default(),
            "closed"
        );
        assert_eq!(m.outbound_queued.get(), 0);
    }

    /// Queued (or written), and not added to the queue.
    fn counts(p: Pushed) -> (usize, usize) {
        (p.queued, p.not_added)
    }

    #[test]
    fn drop_oldest_drops_a_runs_first_messages_and_never_replies() {
        let (o, m) = outbox(4, SlowConsumer::DropOldest);
        o.push("r1".into(), true);
        o.push("p1".into(), false);
        assert_eq!(
            counts(o.queue_run(&run(&["a", "b"]), 0, true)),
            (2, 0),
            "it fits"
        );
        assert_eq!(
            counts(o.queue_run(&run(&["c", "d"]), 0, true)),
            (2, 2),
            "p1 and a make room"
        );
        assert_eq!(m.outbound_dropped.get(), 2);
        assert_eq!(o.len(), 4);
        let mut out = Vec::new();
        o.take(&mut out);
        assert_eq!(texts(&out), ["r1", "b", "c", "d"]);

        // Longer than the queue: its own first ones go, the last stay.
        let (o, _) = outbox(2, SlowConsumer::DropOldest);
        assert_eq!(
            counts(o.queue_run(&run(&["a", "b", "c", "d", "e"]), 0, true)),
            (5, 3)
        );
        let mut out = Vec::new();
        o.take(&mut out);
        assert_eq!(texts(&out), ["d", "e"]);
        assert_eq!(out.len(), 1, "still one entry");
    }

    #[test]
    fn a_run_and_the_run_that_continues_it_are_taken_as_one() {
        let m = Arc::new(Metrics::new());
        let new = || Arc::new(Outbox::new(8, SlowConsumer::DropOldest, m.clone()));
        let (waiting, written, replied, dropped) = (new(), new(), new(), new());
        let first = run(&["a", "b"]);
        let all = [
            waiting.clone(),
            written.clone(),
            replied.clone(),
            dropped.clone(),
        ];
        Outbox::push_run(&all, &first, 0, &m, true);
        written.take(&mut Vec::new());
        replied.push("r".into(), true);
        // As a full queue does to make room (the gauge moved with it).
        assert!(dropped.lock().drop_oldest_push(&m));
        m.outbound_queued.dec();
        let longer = Run::extend(&first, &["c".into()]);
        assert_eq!(
            Outbox::push_run(&all, &longer, 2, &m, true).reached,
            4,
            "c, to each"
        );
        let longest = Run::extend(&longer, &["d".into()]);
        Outbox::push_run(&all, &longest, 3, &m, true);

        let taken = |o: &Outbox| {
            let mut out = Vec::new();
            o.take(&mut out);
            coalesce(&mut out);
            let got: Vec<String> = texts(&out).into_iter().map(str::to_owned).collect();
            (got, out)
        };
        let (got, out) = taken(&waiting);
        assert_eq!(got, ["a", "b", "c", "d"]);
        assert_eq!(out.len(), 1, "one entry");
        assert!(matches!(&out[0], Outgoing::Run { run, from: 0 } if run.continues(&longer, 3)));
        assert_eq!(count(&out), 4);
        let (got, out) = taken(&written);
        assert_eq!((got, out.len()), (vec!["c".to_owned(), "d".into()], 1));
        let (got, out) = taken(&replied);
        assert_eq!(got, ["a", "b", "r", "c", "d"]);
        assert_eq!(out.len(), 3, "the reply stands between");
        let (got, out) = taken(&dropped);
        assert_eq!(got, ["b", "c", "d"], "from where it was cut");
        assert_eq!(out.len(), 1);
        assert_eq!(m.outbound_queued.get(), 0);
    }

    #[test]
    fn a_queue_full_of_replies_marks_a_slow_consumer_for_a_run_too() {
        let (o, m) = outbox(2, SlowConsumer::DropOldest);
        o.push("r1".into(), true);
        assert_eq!(
            counts(o.queue_run(&run(&["a", "b"]), 0, true)),
            (2, 1),
            "room for one: b drops a"
        );
        let (o, _) = outbox(2, SlowConsumer::DropOldest);
        o.push("r1".into(), true);
        o.push("r2".into(), true);
        assert_eq!(counts(o.queue_run(&run(&["a", "b"]), 0, true)), (0, 2));
        assert_eq!(o.take(&mut Vec::new()), Taken::SlowConsumer);
        assert_eq!(m.outbound_dropped.get(), 1);
    }

    #[test]
    fn close_policy_refuses_a_run_that_does_not_fit() {
        let (o, m) = outbox(3, SlowConsumer::Close);
        assert_eq!(counts(o.queue_run(&run(&["a", "b"]), 0, true)), (2, 0));
        assert_eq!(counts(o.queue_run(&run(&["c", "d"]), 0, true)), (0, 2));
        assert_eq!(o.take(&mut Vec::new()), Taken::SlowConsumer);
        assert_eq!(m.outbound_dropped.get(), 0);
    }

    #[test]
    fn the_gauge_never_reads_below_what_is_queued() {
        let (o, m) = outbox(usize::MAX, SlowConsumer::DropOldest);
        let o = Arc::new(o);
        let pusher = {
            let o = o.clone();
            std::thread::spawn(move || {
                for _ in 0..200_000 {
                    o.push("r".into(), true);
                }
            })
        };
        let (mut lowest, mut buf) = (0, Vec::new());
        while !pusher.is_finished() {
            o.take(&mut buf);
            buf.clear();
            lowest = lowest.min(m.outbound_queued.get());
        }
        assert!(lowest >= 0, "the gauge read {lowest}");
    }

    #[test]
    fn closed_outbox_refuses() {
        let (o, _) = outbox(4, SlowConsumer::DropOldest);
        o.close();
        assert!(!o.push("late".into(), true));
        assert!(o.is_empty());
    }

    /// A connected pair on 127.0.0.1: the server's end, shared as a
    /// connection's socket shares it, and the client's.
    async fn pair() -> (Arc<TcpStream>, TcpStream) {
        let (server, client) = crate::transport::tcp_pair().await;
        (Arc::new(server), client)
    }

    /// As [`pair`], with 16 KiB socket buffers on both ends: while the
    /// client does not read, the server's end takes little at once.
    async fn narrow_pair() -> (Arc<TcpStream>, TcpStream) {
        let (tcp, client) = pair().await;
        socket2::SockRef::from(&*tcp)
            .set_send_buffer_size(16 * 1024)
            .expect("sndbuf");
        socket2::SockRef::from(&client)
            .set_recv_buffer_size(16 * 1024)
            .expect("rcvbuf");
        (tcp, client)
    }

    /// 24 messages of 16 KiB, each starting with its number.
    fn big_names() -> Vec<String> {
        (0..24)
            .map(|i| format!("{i}:{}", "x".repeat(16 * 1024)))
            .collect()
    }

    /// Reads from `client` until `want` bytes came.
    async fn read_exactly(client: &mut TcpStream, want: usize) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut got = vec![0; want];
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            client.read_exact(&mut got),
        )
        .await
        .expect("in time")
        .expect("read");
        got
    }

    /// Every frame of `texts`, back to back.
    fn frames(texts: &[Prepared]) -> Vec<u8> {
        texts
            .iter()
            .flat_map(|t| t.frame().iter().copied())
            .collect()
    }

    /// Whether the connection's task would be woken now.
    fn woken(o: &Outbox) -> bool {
        futures_util::FutureExt::now_or_never(o.ready()).is_some()
    }

    #[tokio::test]
    async fn a_push_into_a_lent_stream_is_written_at_once_and_wakes_nobody() {
        let (o, m) = outbox(8, SlowConsumer::DropOldest);
        let o = Arc::new(o);
        let (tcp, mut client) = pair().await;
        assert!(o.lend(Lendable::Plain(&tcp)));
        let one: Prepared = "one".into();
        let run = run(&["two", "three"]);
        assert!(o.push(one.clone(), false));
        let all_written = Reach {
            reached: 2,
            written: 2,
        };
        assert_eq!(
            Outbox::push_run(std::slice::from_ref(&o), &run, 0, &m, true),
            all_written
        );
        assert_eq!(o.len(), 0, "nothing queued");
        assert!(!woken(&o), "the task was not woken");
        assert_eq!(m.outbound_direct.get(), 3);
        assert_eq!(m.messages_out.get(), 3);
        assert_eq!(m.pushes.get(), 2, "push_run counts what it reached");
        assert_eq!(m.outbound_queued.get(), 0);
        let mut want = frames(std::slice::from_ref(&one));
        want.extend(frames(run.messages()));
        assert_eq!(read_exactly(&mut client, want.len()).await, want);
    }

    /// More pushes than one write's slices: written a write at a time
    /// by the pusher, none left for the task, up to the writes one push
    /// makes; past them the rest is queued for the task.
    #[tokio::test]
    async fn more_pushes_than_one_write_takes_are_written_by_the_pusher_up_to_a_bound() {
        let (o, m) = outbox(8, SlowConsumer::DropOldest);
        let o = Arc::new(o);
        let (tcp, mut client) = pair().await;
        assert!(o.lend(Lendable::Plain(&tcp)));
        let many: Vec<Prepared> = (0..MAX_SLICES * 2 + 5)
            .map(|i| Prepared::from(format!("push {i}")))
            .collect();
        let reach = Outbox::push_each(std::slice::from_ref(&o), &many, &m, true);
        assert_eq!((reach.reached, reach.written), (many.len(), many.len()));
        assert_eq!(o.len(), 0, "nothing queued");
        assert!(!woken(&o), "the task was not woken");
        assert_eq!(m.outbound_direct.get() as usize, many.len());
        assert_eq!(m.outbound_queued.get(), 0);
        let mut want = frames(&many);

        // More than the writes one push makes: the rest is queued.
        let more: Vec<Prepared> = (0..MAX_SLICES * MAX_LENT_WRITES + 3)
            .map(|i| Prepared::from(format!("more {i}")))
            .collect();
        let reach = Outbox::push_each(std::slice::from_ref(&o), &more, &m, true);
        let most = MAX_SLICES * MAX_LENT_WRITES;
        assert_eq!((reach.reached, reach.written), (more.len(), most));
        assert_eq!(o.len(), 3, "the rest queued");
        assert!(woken(&o), "and the task woken for it");
        want.extend(frames(&more[..most]));
        assert_eq!(read_exactly(&mut client, want.len()).await, want);
    }

    #[tokio::test]
    async fn a_claimed_or_taken_stream_is_written_by_its_task_only() {
        let (o, m) = outbox(8, SlowConsumer::DropOldest);
        let (tcp, _client) = pair().await;
        assert!(o.lend(Lendable::Plain(&tcp)));
        assert_eq!(o.claim(), None, "nothing begun");
        assert!(o.push("after a claim".into(), false));
        assert_eq!((o.len(), m.outbound_direct.get()), (1, 0));
        assert!(woken(&o));
        assert!(
            !o.lend(Lendable::Plain(&tcp)),
            "not lent while something is queued"
        );
        let mut out = Vec::new();
        assert_eq!(o.take(&mut out), Taken::Messages);
        assert!(o.lend(Lendable::Plain(&tcp)));
        assert_eq!(o.take(&mut Vec::new()), Taken::Messages);
        assert!(o.push("after a take".into(), false));
        assert_eq!((o.len(), m.outbound_direct.get()), (1, 0));
        o.close();
        assert!(
            !o.lend(Lendable::Plain(&tcp)),
            "a closed outbox lends nothing"
        );
    }

    #[tokio::test]
    async fn what_the_socket_does_not_take_is_queued_in_order_and_never_dropped() {
        let (o, m) = outbox(4, SlowConsumer::DropOldest);
        let o = Arc::new(o);
        // Small buffers on both ends, and the client not reading: a run
        // of 16 KiB messages is only partly taken.
        let (tcp, mut client) = narrow_pair().await;
        let names = big_names();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let run = run(&names);
        assert!(o.lend(Lendable::Plain(&tcp)));
        let reach = Outbox::push_run(std::slice::from_ref(&o), &run, 0, &m, true);
        assert_eq!(reach.reached, 24);
        let direct = m.outbound_direct.get() as usize;
        assert!(direct < 24, "the socket took all of it");
        assert!(woken(&o), "the task is woken for the rest");
        // The loan ended: a push now queues, and the queue (4) drops the
        // oldest whole pushes; the end of a frame begun on the wire is
        // kept aside, never dropped, and handed back first.
        assert!(o.push("last".into(), false));
        let rest = o.claim().map(|b| b.to_vec()).unwrap_or_default();
        let mut out = Vec::new();
        assert_eq!(o.take(&mut out), Taken::Messages);
        assert_eq!(count(&out), 4);
        assert_eq!(m.outbound_queued.get(), 0);
        let begun = usize::from(!rest.is_empty());
        assert_eq!(
            reach.written,
            direct - begun,
            "a begun frame is not written"
        );
        let queued = texts(&out);
        assert_eq!(queued.last(), Some(&"last"));
        let from_run = &queued[..queued.len() - 1];
        assert_eq!(
            from_run,
            &names[24 - from_run.len()..],
            "the newest, in order"
        );
        assert_eq!(
            direct + from_run.len() + m.outbound_dropped.get() as usize,
            24,
            "each written (or begun), queued, or counted as dropped"
        );
        if begun == 1 {
            assert!(run.messages()[direct - 1].frame().ends_with(&rest));
        }
        // The reader gets the frames written or begun, whole (a begun
        // one's rest written by the task first), then the queued ones:
        // here the test writes what the task would.
        let mut want = frames(&run.messages()[..direct]);
        let mut left = rest.clone();
        for e in &out {
            left.extend(frames(e.messages()));
        }
        want.extend_from_slice(&left[rest.len()..]);
        let writer = tokio::spawn(async move {
            let mut at = 0;
            while at < left.len() {
                tcp.writable().await.expect("writable");
                match tcp.try_write(&left[at..]) {
                    Ok(n) => at += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
        });
        let got = read_exactly(&mut client, want.len()).await;
        writer.await.expect("written");
        assert!(got == want, "every frame whole, in order");
    }

    #[tokio::test]
    async fn a_slow_consumer_still_gets_the_end_of_a_begun_frame_first() {
        let (o, m) = outbox(4, SlowConsumer::Close);
        let o = Arc::new(o);
        let (tcp, _client) = narrow_pair().await;
        let names = big_names();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let run = run(&names);
        assert!(o.lend(Lendable::Plain(&tcp)));
        let reach = Outbox::push_run(std::slice::from_ref(&o), &run, 0, &m, true);
        let direct = m.outbound_direct.get() as usize;
        assert!(direct > 0 && direct < 24, "{direct}");
        assert!(o.overflowed(), "what is left does not fit: a slow consumer");
        assert_eq!(m.outbound_queued.get(), 0, "nothing of it queued");
        // Its task closes it, but first takes the stream back, and with
        // it the end of the frame begun on the wire: the close frame
        // goes after a whole frame, never inside one.
        let rest = o.claim().expect("a frame was begun");
        assert!(run.messages()[direct - 1].frame().ends_with(&rest));
        assert_eq!(reach.written, direct - 1, "the begun frame is not written");
        assert_eq!(o.take(&mut Vec::new()), Taken::SlowConsumer);
    }

    #[tokio::test]
    async fn a_begun_frame_alone_keeps_the_stream_until_its_task_takes_it() {
        let (o, m) = outbox(4, SlowConsumer::DropOldest);
        let (tcp, _client) = narrow_pair().await;
        assert!(o.lend(Lendable::Plain(&tcp)));
        let big: Prepared = "z".repeat(1 << 20).as_str().into();
        assert!(o.push(big.clone(), false));
        assert_eq!(
            (o.len(), m.outbound_direct.get()),
            (0, 1),
            "begun, nothing queued"
        );
        assert!(woken(&o), "its task is woken for the rest");
        assert!(
            !o.lend(Lendable::Plain(&tcp)),
            "not lent again while a frame's end waits"
        );
        let rest = o.claim().expect("the end of the frame");
        assert!(big.frame().ends_with(&rest) && rest.len() < big.frame().len());
        assert!(o.lend(Lendable::Plain(&tcp)), "lent again once it is taken");
    }
}
