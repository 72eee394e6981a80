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

/// Longest city stored in a row; the rest is cut (the client may send up
/// to `max_message_bytes`, the log need not keep it all).
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
    /// The city as sent (cut to [`MAX_STORED_CITY_CHARS`]).
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
    /// Cuts `city` to what the log keeps.
    pub fn stored_city(city: &str) -> String {
        match city.char_indices().nth(MAX_STORED_CITY_CHARS) {
            Some((cut, _)) => city[..cut].to_owned(),
            None => city.to_owned(),
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
    db: Db,
}

impl Writers {
    /// Closes the queue, waits until every queued row is written (or given
    /// up on), at most `deadline`. Returns whether they finished in time.
    pub async fn drain(self, deadline: Duration) -> bool {
        self.stop.cancel();
        let all = futures_util::future::join_all(self.tasks);
        let drained = tokio::time::timeout(deadline, all).await.is_ok();
        if drained {
            self.db.close().await;
        }
        drained
    }
}

/// Opens the database, runs migrations and starts the writers. The
/// returned [`Db`] serves the other tables (notes).
///
/// # Errors
/// [`StoreError`] when the database cannot be opened or migrated.
pub async fn start(
    cfg: &StoreConfig,
    metrics: Arc<Metrics>,
) -> Result<(Db, RequestLog, Writers), StoreError> {
    let db = Db::connect(&cfg.url, cfg.workers as u32).await?;
    db.migrate().await?;
    let (log, writers) = spawn_writers(db.clone(), cfg, metrics);
    Ok((db, log, writers))
}

/// Starts the writers on an open, migrated database.
pub fn spawn_writers(db: Db, cfg: &StoreConfig, metrics: Arc<Metrics>) -> (RequestLog, Writers) {
    let (tx, rx) = mpsc::channel(cfg.queue_size);
    let rx = Arc::new(Mutex::new(rx));
    let stop = CancellationToken::new();
    let slow = Arc::new(WarnLimiter::new(Duration::from_secs(5)));
    let tasks = (0..cfg.workers)
        .map(|_| {
            let writer = Writer {
                rx: rx.clone(),
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
    (log, Writers { stop, tasks, db })
}

/// A batch insert slower than this is logged (at most every few seconds).
const SLOW_BATCH: Duration = Duration::from_secs(1);

struct Writer {
    rx: Arc<Mutex<mpsc::Receiver<RequestRecord>>>,
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
                let mut rx = self.rx.lock().await;
                if self.stop.is_cancelled() {
                    // Closed: recv_many returns what is left, then 0.
                    rx.close();
                    rx.recv_many(&mut batch, self.batch_size).await
                } else {
                    let n = tokio::select! {
                        n = rx.recv_many(&mut batch, self.batch_size) => n,
                        () = self.stop.cancelled() => continue,
                    };
                    // Let the batch fill for a moment: one insert of 500
                    // rows costs far less than ten of 50.
                    let until = tokio::time::Instant::now() + self.window;
                    while n > 0 && batch.len() < self.batch_size && !self.window.is_zero() {
                        let room = self.batch_size - batch.len();
                        tokio::select! {
                            m = rx.recv_many(&mut batch, room) => if m == 0 { break },
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
            batch.clear();
        }
    }

    async fn write(&self, rows: &[RequestRecord]) {
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
                    return;
                }
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
        self.metrics.db_failed.inc_by(n);
    }
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
    fn warn_limiter_allows_one_per_interval() {
        let w = WarnLimiter::new(Duration::from_secs(3600));
        assert!(w.allow());
        assert!(!w.allow());
    }
}
