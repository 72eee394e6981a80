//! The request log: every weather request becomes one row in
//! `weather_requests`, written off the reply path.
//!
//! Rows go through a bounded queue to a fixed set of writer tasks that
//! insert in batches (one multi-row `INSERT` per batch; a writer waits up
//! to `store.batch_window_ms` for a batch to fill). When the queue is
//! full the row is dropped, counted and logged (rate-limited): the reply to
//! the client never waits for the database. Database errors are retried
//! with backoff. On shutdown the queue is closed and drained.

mod db;
mod notes;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use db::{Db, check_url};
pub use notes::{LIST_LIMIT, NewNote, Note};

use crate::config::StoreConfig;
use crate::metrics::Metrics;

/// Longest city stored in a row, in characters after escaping; the rest
/// is cut (the client may send up to `max_message_bytes`, the log need not
/// keep it all).
pub const MAX_STORED_CITY_CHARS: usize = 200;

/// Why the store could not start.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or opened.
    #[error("cannot open the database {url}: {source}")]
    Connect {
        /// The URL with any password hidden.
        url: String,
        /// The driver's error.
        source: sqlx::Error,
    },
    /// The schema migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// One row of `weather_requests`.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    /// The connection that asked.
    pub client_id: Uuid,
    /// The city as sent, in its stored form ([`RequestRecord::stored_city`]).
    pub city: String,
    /// Whether a reading was returned.
    pub ok: bool,
    /// The reading's temperature; `None` on failure.
    pub temperature: Option<f64>,
    /// The error code on failure (`not_found`, `timeout`, …).
    pub error: Option<&'static str>,
    /// Time from receiving the request to having the reply.
    pub latency_ms: u32,
    /// When the request arrived.
    pub created_at: DateTime<Utc>,
}

impl RequestRecord {
    /// The form of a client's city text the log keeps: every control
    /// character written as a `\uXXXX` escape (PostgreSQL refuses NUL in
    /// `TEXT`, and a log line should not carry raw control codes), then
    /// cut to [`MAX_STORED_CITY_CHARS`].
    pub fn stored_city(city: &str) -> String {
        let mut stored = String::with_capacity(city.len().min(4 * MAX_STORED_CITY_CHARS));
        for c in city.chars().take(MAX_STORED_CITY_CHARS) {
            if c.is_control() {
                use std::fmt::Write;
                let _ = write!(stored, "\\u{:04x}", u32::from(c));
            } else {
                stored.push(c);
            }
        }
        match stored.char_indices().nth(MAX_STORED_CITY_CHARS) {
            Some((cut, _)) => stored[..cut].to_owned(),
            None => stored,
        }
    }
}

/// The sending side of the request log; cheap to clone and never blocks.
#[derive(Debug, Clone)]
pub struct RequestLog {
    tx: mpsc::Sender<RequestRecord>,
    metrics: Arc<Metrics>,
    warn: Arc<WarnLimiter>,
}

impl RequestLog {
    /// Queues a row. A full queue drops it, counts it in `db-dropped` and
    /// logs a warning at most every few seconds. Returns whether it was
    /// queued.
    pub fn record(&self, row: RequestRecord) -> bool {
        match self.tx.try_send(row) {
            Ok(()) => {
                self.metrics.db_queued.inc();
                self.metrics.db_queue_depth.inc();
                true
            }
            Err(mpsc::error::TrySendError::Full(row)) => {
                let dropped = self.metrics.db_dropped.inc() + 1;
                if self.warn.allow() {
                    tracing::warn!(
                        dropped_total = dropped,
                        city = %row.city,
                        "request log queue full: dropping rows (raise store.queue_size or store.workers)"
                    );
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.metrics.db_dropped.inc();
                tracing::debug!("request log closed: row dropped");
                false
            }
        }
    }

    /// Rows waiting in the queue now.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// At most one warning per interval.
#[derive(Debug)]
struct WarnLimiter {
    start: Instant,
    next_ms: AtomicU64,
    every: Duration,
}

impl WarnLimiter {
    fn new(every: Duration) -> Self {
        WarnLimiter {
            start: Instant::now(),
            next_ms: AtomicU64::new(0),
            every,
        }
    }

    fn allow(&self) -> bool {
        let now = self.start.elapsed().as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + self.every.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }
}

/// The writer tasks. [`Writers::drain`] stops them after they have written
/// everything queued.
#[derive(Debug)]
pub struct Writers {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    rx: Arc<Mutex<mpsc::Receiver<RequestRecord>>>,
    in_hand: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    db: Db,
}

impl Writers {
    /// Closes the queue and waits until every queued row is written (or
    /// set aside, or given up on), at most `deadline`.
    ///
    /// # Errors
    /// The number of rows abandoned when the deadline passed (still queued,
    /// or in a batch being written or retried), counted in
    /// `gale_db_rows_abandoned_total`. The writers are stopped then: an
    /// insert already sent may still land.
    pub async fn drain(mut self, deadline: Duration) -> Result<(), u64> {
        self.stop.cancel();
        let all = futures_util::future::join_all(self.tasks.iter_mut());
        if tokio::time::timeout(deadline, all).await.is_ok() {
            self.db.close().await;
            return Ok(());
        }
        for task in &self.tasks {
            task.abort();
        }
        // Cancelled at their next await: nothing moves after this.
        futures_util::future::join_all(self.tasks.iter_mut()).await;
        let queued = self.rx.try_lock().map_or(0, |rx| rx.len()) as u64;
        self.metrics.db_queue_depth.dec_by(queued as i64);
        let lost = self.in_hand.load(Ordering::Acquire) + queued;
        self.metrics.db_abandoned.inc_by(lost);
        Err(lost)
    }
}

/// Opens the database, runs migrations and starts the writers. The
/// request log gets a pool of its own (`store.workers` connections); the
/// returned [`Db`], another pool (`store.notes_connections`), serves the
/// other tables (notes), so notes queries, however slow or many, never
/// hold the connections the log writes with.
///
/// # Errors
/// [`StoreError`] when the database cannot be opened or migrated.
pub async fn start(
    cfg: &StoreConfig,
    metrics: Arc<Metrics>,
) -> Result<(Db, RequestLog, Writers), StoreError> {
    let log_db = Db::connect(&cfg.url, cfg.workers as u32).await?;
    log_db.migrate().await?;
    let notes_db = Db::connect(&cfg.url, cfg.notes_connections as u32).await?;
    let (log, writers) = spawn_writers(log_db, cfg, metrics);
    Ok((notes_db, log, writers))
}

/// Starts the writers on an open, migrated database.
pub fn spawn_writers(db: Db, cfg: &StoreConfig, metrics: Arc<Metrics>) -> (RequestLog, Writers) {
    let (tx, rx) = mpsc::channel(cfg.queue_size);
    let rx = Arc::new(Mutex::new(rx));
    let stop = CancellationToken::new();
    let slow = Arc::new(WarnLimiter::new(Duration::from_secs(5)));
    let in_hand = Arc::new(AtomicU64::new(0));
    let tasks = (0..cfg.workers)
        .map(|_| {
            let writer = Writer {
                rx: rx.clone(),
                in_hand: in_hand.clone(),
                slow: slow.clone(),
                window: Duration::from_millis(cfg.batch_window_ms),
                db: db.clone(),
                batch_size: cfg.batch_size,
                max_retries: cfg.max_retries.max(1),
                metrics: metrics.clone(),
                stop: stop.clone(),
            };
            tokio::spawn(writer.run())
        })
        .collect();
    let log = RequestLog {
        tx,
        metrics,
        warn: Arc::new(WarnLimiter::new(Duration::from_secs(5))),
    };
    let writers = Writers {
        stop,
        tasks,
        rx,
        in_hand,
        metrics: log.metrics.clone(),
        db,
    };
    (log, writers)
}

/// A batch insert slower than this is logged (at most every few seconds).
const SLOW_BATCH: Duration = Duration::from_secs(1);

struct Writer {
    rx: Arc<Mutex<mpsc::Receiver<RequestRecord>>>,
    /// Rows taken from the queue and not yet written, set aside or given
    /// up on, across all writers: what a drain cut short loses.
    in_hand: Arc<AtomicU64>,
    slow: Arc<WarnLimiter>,
    window: Duration,
    db: Db,
    batch_size: usize,
    max_retries: u32,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
}

impl Writer {
    async fn run(self) {
        let mut batch = Vec::with_capacity(self.batch_size);
        loop {
            let received = {
                // One writer at a time takes a batch; the others wait for
                // the lock, then for rows. The lock is not held while
                // writing.
                // Rows count as in hand in the same poll that takes them
                // from the queue, so an abort can never lose them uncounted.
                let mut rx = self.rx.lock().await;
                if self.stop.is_cancelled() {
                    // Closed: recv_many returns what is left, then 0.
                    rx.close();
                    let n = rx.recv_many(&mut batch, self.batch_size).await;
                    self.took(n);
                    n
                } else {
                    let n = tokio::select! {
                        n = rx.recv_many(&mut batch, self.batch_size) => n,
                        () = self.stop.cancelled() => continue,
                    };
                    self.took(n);
                    // Let the batch fill for a moment: one insert of 500
                    // rows costs far less than ten of 50.
                    let until = tokio::time::Instant::now() + self.window;
                    while n > 0 && batch.len() < self.batch_size && !self.window.is_zero() {
                        let room = self.batch_size - batch.len();
                        tokio::select! {
                            m = rx.recv_many(&mut batch, room) => {
                                self.took(m);
                                if m == 0 { break }
                            }
                            () = tokio::time::sleep_until(until) => break,
                            () = self.stop.cancelled() => break,
                        }
                    }
                    n
                }
            };
            if received == 0 {
                return;
            }
            self.write(&batch).await;
            self.in_hand.fetch_sub(batch.len() as u64, Ordering::AcqRel);
            batch.clear();
        }
    }

    /// Counts `n` rows just taken from the queue as in hand.
    fn took(&self, n: usize) {
        self.in_hand.fetch_add(n as u64, Ordering::AcqRel);
        self.metrics.db_queue_depth.dec_by(n as i64);
    }

    /// Writes `rows`. A batch the database refuses because of what one of
    /// its rows holds (a data or constraint error) is split in halves
    /// until the refused rows stand alone; they are set aside and counted
    /// as rejected, and every other row is written. Any other error
    /// (database down, locked, timed out) is retried with backoff.
    async fn write(&self, rows: &[RequestRecord]) {
        // Halves still to write, the next one last; order is kept.
        let mut parts = vec![rows];
        while let Some(part) = parts.pop() {
            match self.insert_retrying(part).await {
                Inserted::Ok => {}
                Inserted::Refused(_) if part.len() > 1 => {
                    let (first, second) = part.split_at(part.len() / 2);
                    parts.push(second);
                    parts.push(first);
                }
                Inserted::Refused(e) => {
                    let rejected = self.metrics.db_rejected.inc() + 1;
                    if self.slow.allow() {
                        tracing::warn!(
                            rejected_total = rejected,
                            city = %part[0].city,
                            error = %e,
                            "request log: the database refused a row; set aside, the rest of its batch written"
                        );
                    }
                }
                Inserted::GaveUp => {
                    self.metrics.db_failed.inc_by(part.len() as u64);
                }
            }
        }
    }

    /// One insert of `rows`, retried with backoff while the error is not
    /// the rows' own fault.
    async fn insert_retrying(&self, rows: &[RequestRecord]) -> Inserted {
        let n = rows.len() as u64;
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=self.max_retries {
            let began = Instant::now();
            match self.db.insert_requests(rows).await {
                Ok(()) => {
                    self.metrics.db_completed.inc_by(n);
                    self.metrics.db_batch_size.observe(n as f64);
                    let took = began.elapsed();
                    if took > SLOW_BATCH && self.slow.allow() {
                        tracing::warn!(
                            rows = n,
                            took_ms = took.as_millis() as u64,
                            "request log: slow batch insert (the database or the CPU is saturated)"
                        );
                    }
                    return Inserted::Ok;
                }
                Err(e) if db::refuses_row(&e) => return Inserted::Refused(e),
                Err(e) => {
                    self.metrics.db_errors.inc();
                    if attempt == self.max_retries {
                        tracing::error!(rows = n, error = %e, "request log: giving up on a batch");
                        break;
                    }
                    tracing::warn!(rows = n, attempt, error = %e, "request log insert failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        Inserted::GaveUp
    }
}

/// How one insert ended.
enum Inserted {
    /// Written.
    Ok,
    /// The database refused what a row holds; retrying cannot help.
    Refused(sqlx::Error),
    /// Failed every attempt.
    GaveUp,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_city_is_cut_on_a_char_boundary() {
        let long = "é".repeat(300);
        let cut = RequestRecord::stored_city(&long);
        assert_eq!(cut.chars().count(), MAX_STORED_CITY_CHARS);
        assert_eq!(RequestRecord::stored_city("Oslo"), "Oslo");
    }

    #[test]
    fn stored_city_escapes_control_characters() {
        assert_eq!(RequestRecord::stored_city("Lon\0don"), "Lon\\u0000don");
        assert_eq!(
            RequestRecord::stored_city("a\nb\u{7f}\u{85}"),
            "a\\u000ab\\u007f\\u0085"
        );
        let nuls = "\0".repeat(300);
        let stored = RequestRecord::stored_city(&nuls);
        assert_eq!(stored.chars().count(), MAX_STORED_CITY_CHARS);
        assert!(!stored.contains('\0'));
    }

    #[test]
    fn warn_limiter_allows_one_per_interval() {
        let w = WarnLimiter::new(Duration::from_secs(3600));
        assert!(w.allow());
        assert!(!w.allow());
    }
}
