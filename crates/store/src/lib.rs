//! The database gale's applications write to (SQLite or PostgreSQL,
//! migrated at start: [`Db`]), its notes tables ([`Note`]), and the
//! request log: every weather request becomes one row in
//! `weather_requests`, written off the reply path.
//!
//! Rows go through a bounded queue to a fixed set of writer tasks that
//! insert in batches (one multi-row `INSERT` per batch; a writer waits up
//! to `store.batch_window_ms` for a batch to fill). When the queue is
//! full the row goes to the disk spill ([`spill`]) or, with none, is
//! dropped, counted and logged (rate-limited): the reply to the client
//! never waits for the database. With a spill, a batch the database cannot
//! take (down, unreachable, timed out) is spilled at once and replayed
//! when it is back; with none, it is retried with backoff. On shutdown the
//! queue is closed and drained.

mod config;
mod db;
mod metrics;
mod notes;
pub mod spill;

use std::path::Path;
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
pub use spill::{Spill, SpillError};

pub use config::{MAX_BATCH_SIZE, StoreConfig};
pub use metrics::StoreMetrics;

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
    /// The spill directory could not be read.
    #[error(transparent)]
    Spill(#[from] SpillError),
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

/// The shutdown drain's deadline passed with request-log rows still
/// unwritten (counted in `gale_db_rows_abandoned_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "shutdown lost {0} request-log rows: the database did not take them before the drain deadline"
)]
pub struct RowsLost(pub u64);

/// The sending side of the request log; cheap to clone and never blocks.
#[derive(Debug, Clone)]
pub struct RequestLog {
    tx: mpsc::Sender<RequestRecord>,
    /// Rows the full queue could not take, on their way to the spill.
    overflow: Option<mpsc::Sender<RequestRecord>>,
    metrics: Arc<StoreMetrics>,
    warn: Arc<WarnLimiter>,
}

impl RequestLog {
    /// Queues a row. When the queue is full it goes to the spill; with no
    /// spill (or the spill's own queue full too) it is dropped, counted in
    /// `db-dropped` and a warning is logged at most every few seconds.
    /// Returns whether it was kept.
    pub fn record(&self, row: RequestRecord) -> bool {
        match self.tx.try_send(row) {
            Ok(()) => {
                self.metrics.db_queued.inc();
                self.metrics.db_queue_depth.inc();
                true
            }
            Err(mpsc::error::TrySendError::Full(row)) => {
                let row = match &self.overflow {
                    Some(spill) => match spill.try_send(row) {
                        Ok(()) => return true,
                        Err(e) => e.into_inner(),
                    },
                    None => row,
                };
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
    /// The overflow task and the replayer, when there is a spill.
    spill_tasks: Vec<JoinHandle<()>>,
    spill: Option<Arc<Spill>>,
    /// The spill's overflow queue, so a drain cut short can still spill
    /// what it holds.
    overflow_rx: Option<Arc<Mutex<mpsc::Receiver<RequestRecord>>>>,
    rx: Arc<Mutex<mpsc::Receiver<RequestRecord>>>,
    in_hand: Arc<AtomicU64>,
    metrics: Arc<StoreMetrics>,
    db: Db,
}

impl Writers {
    /// Closes the queue and waits until every queued row is written (or
    /// spilled, set aside, or given up on), at most `deadline`. When the
    /// deadline passes the writers are stopped (an insert already sent
    /// may still land) and rows still queued go to the spill.
    ///
    /// # Errors
    /// The number of rows abandoned when the deadline passed (in a batch
    /// being written or retried, or still queued with no spill to take
    /// them), counted in `gale_db_rows_abandoned_total`.
    pub async fn drain(mut self, deadline: Duration) -> Result<(), u64> {
        self.stop.cancel();
        let all = futures_util::future::join_all(
            self.tasks.iter_mut().chain(self.spill_tasks.iter_mut()),
        );
        if tokio::time::timeout(deadline, all).await.is_ok() {
            self.sync_spill().await;
            self.db.close().await;
            return Ok(());
        }
        for task in self.tasks.iter().chain(&self.spill_tasks) {
            task.abort();
        }
        // Cancelled at their next await: nothing moves after this.
        futures_util::future::join_all(self.tasks.iter_mut().chain(self.spill_tasks.iter_mut()))
            .await;
        let mut queued = Vec::new();
        if let Ok(mut rx) = self.rx.try_lock() {
            while let Ok(row) = rx.try_recv() {
                queued.push(row);
            }
        }
        self.metrics.db_queue_depth.dec_by(queued.len() as i64);
        if let Some(Ok(mut rx)) = self.overflow_rx.as_ref().map(|rx| rx.try_lock()) {
            while let Ok(row) = rx.try_recv() {
                queued.push(row);
            }
        }
        let mut lost = self.in_hand.load(Ordering::Acquire);
        let n = queued.len() as u64;
        // Still queued: the spill keeps them for the next start.
        let kept = match &self.spill {
            Some(spill) => n == 0 || spill_blocking(spill, queued).await,
            None => false,
        };
        if !kept {
            lost += n;
        }
        self.sync_spill().await;
        if lost == 0 {
            return Ok(());
        }
        self.metrics.db_abandoned.inc_by(lost);
        Err(lost)
    }

    async fn sync_spill(&self) {
        if let Some(spill) = self.spill.clone() {
            let _ = tokio::task::spawn_blocking(move || spill.sync()).await;
        }
    }
}

/// Opens the database, runs migrations and starts the writers. The
/// request log gets a pool of its own ([`log_connections`]); the
/// returned [`Db`], another pool (`store.notes_connections`), serves the
/// other tables (notes), so notes queries, however slow or many, never
/// hold the connections the log writes with.
///
/// # Errors
/// [`StoreError`] when the database cannot be opened or migrated.
///
/// With a spill (`store.spill_dir` set), a database that cannot be reached
/// at start does not stop gale: it serves, spills the log's rows, and
/// connects and migrates as soon as the database answers.
pub async fn start(
    cfg: &StoreConfig,
    metrics: Arc<StoreMetrics>,
) -> Result<(Db, RequestLog, Writers), StoreError> {
    if cfg.spill_dir.is_empty() {
        let (log_db, notes_db) = connect_both(cfg).await?;
        let (log, writers) = spawn_writers(log_db, cfg, metrics);
        return Ok((notes_db, log, writers));
    }
    let spill = Arc::new(Spill::open(
        Path::new(&cfg.spill_dir),
        cfg.spill_max_bytes,
        metrics.clone(),
    )?);
    let opened = tokio::time::timeout(START_TIMEOUT, connect_both(cfg)).await;
    let (log_db, notes_db, migrated) = match opened {
        Ok(Ok((log_db, notes_db))) => (log_db, notes_db, true),
        failed => {
            let error = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no answer in {} s", START_TIMEOUT.as_secs()),
            };
            tracing::error!(
                %error,
                spill = %cfg.spill_dir,
                "the database is unavailable at start: serving anyway; request-log rows go \
                 to the spill until it is back, notes fail until then"
            );
            spill.set_down(true);
            let log_db = Db::connect_lazy(&cfg.url, log_connections(cfg)).await?;
            let notes_db = Db::connect_lazy(&cfg.url, cfg.notes_connections as u32).await?;
            (log_db, notes_db, false)
        }
    };
    let (log, writers) = spawn_with_spill(log_db, cfg, metrics, Some((spill, migrated)));
    Ok((notes_db, log, writers))
}

/// How long start waits for the database before serving without it (with
/// a spill).
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest one insert may take, from when it has a connection, before
/// it counts as failed (the database or the network to it stalled). An
/// insert cut off may still land: with a spill its rows are then written
/// twice.
const INSERT_TIMEOUT: Duration = Duration::from_secs(15);

/// The request log's own connections: one per writer, except on SQLite,
/// which takes one writer at a time. There the writers share at most two:
/// one batch is compiled and bound while the other is written (the
/// ceiling: 615-629k rows/s on two, 438-482k on one, 657-716k on five).
/// More would only wait on the database's lock, and each costs its
/// thread, page cache and statements (~0.7 MiB each at the seed
/// scenario's peak).
fn log_connections(cfg: &StoreConfig) -> u32 {
    let workers = u32::try_from(cfg.workers).unwrap_or(u32::MAX);
    if cfg.url.starts_with("sqlite:") {
        workers.min(SQLITE_LOG_CONNECTIONS)
    } else {
        workers
    }
}

/// See [`log_connections`].
const SQLITE_LOG_CONNECTIONS: u32 = 2;

async fn connect_both(cfg: &StoreConfig) -> Result<(Db, Db), StoreError> {
    let log_db = Db::connect(&cfg.url, log_connections(cfg)).await?;
    log_db.migrate().await?;
    let notes_db = Db::connect(&cfg.url, cfg.notes_connections as u32).await?;
    Ok((log_db, notes_db))
}

/// Starts the writers on an open, migrated database, with no spill.
pub fn spawn_writers(
    db: Db,
    cfg: &StoreConfig,
    metrics: Arc<StoreMetrics>,
) -> (RequestLog, Writers) {
    spawn_with_spill(db, cfg, metrics, None)
}

/// Starts the writers and, with a spill, its overflow task and replayer
/// (`migrated`: whether the schema is known to be up to date).
fn spawn_with_spill(
    db: Db,
    cfg: &StoreConfig,
    metrics: Arc<StoreMetrics>,
    spill: Option<(Arc<Spill>, bool)>,
) -> (RequestLog, Writers) {
    let (tx, rx) = mpsc::channel(cfg.queue_size);
    let rx = Arc::new(Mutex::new(rx));
    let stop = CancellationToken::new();
    let in_hand = Arc::new(AtomicU64::new(0));
    let inserter = Arc::new(Inserter {
        db: db.clone(),
        slow: WarnLimiter::new(Duration::from_secs(5)),
        max_retries: cfg.max_retries.max(1),
        metrics: metrics.clone(),
        spill: spill.as_ref().map(|(s, _)| s.clone()),
    });
    let tasks = (0..cfg.workers)
        .map(|_| {
            let writer = Writer {
                rx: rx.clone(),
                in_hand: in_hand.clone(),
                window: Duration::from_millis(cfg.batch_window_ms),
                batch_size: cfg.batch_size,
                inserter: inserter.clone(),
                stop: stop.clone(),
            };
            tokio::spawn(writer.run())
        })
        .collect();
    let mut spill_tasks = Vec::new();
    let mut overflow = None;
    let mut overflow_rx = None;
    if let Some((spill, migrated)) = &spill {
        let (otx, orx) = mpsc::channel(cfg.queue_size.max(SPILL_BATCH));
        let orx = Arc::new(Mutex::new(orx));
        overflow = Some(otx);
        overflow_rx = Some(orx.clone());
        spill_tasks.push(tokio::spawn(spill_overflow(
            orx,
            spill.clone(),
            stop.clone(),
        )));
        spill_tasks.push(tokio::spawn(replay(
            inserter.clone(),
            spill.clone(),
            *migrated,
            stop.clone(),
        )));
    }
    let log = RequestLog {
        tx,
        overflow,
        metrics,
        warn: Arc::new(WarnLimiter::new(Duration::from_secs(5))),
    };
    let writers = Writers {
        stop,
        tasks,
        spill_tasks,
        spill: spill.map(|(s, _)| s),
        overflow_rx,
        rx,
        in_hand,
        metrics: log.metrics.clone(),
        db,
    };
    (log, writers)
}

/// Appends `rows` to the spill off the async threads; whether it kept them.
async fn spill_blocking(spill: &Arc<Spill>, rows: Vec<RequestRecord>) -> bool {
    let spill = spill.clone();
    let n = rows.len() as u64;
    match tokio::task::spawn_blocking(move || spill.append(&rows)).await {
        Ok(kept) => kept,
        Err(_) => {
            tracing::error!(rows = n, "request log: the spill task failed; rows lost");
            false
        }
    }
}

/// Most rows the overflow task appends to the spill at once, and least
/// its queue holds: one append is one write, so it takes what waits,
/// whatever the database's batch size.
const SPILL_BATCH: usize = 1024;

/// Moves the rows the full queue could not take into the spill, all that
/// wait at a time; at shutdown, what is left too.
async fn spill_overflow(
    rx: Arc<Mutex<mpsc::Receiver<RequestRecord>>>,
    spill: Arc<Spill>,
    stop: CancellationToken,
) {
    // The only reader: held for the task's life, released if it is
    // aborted, so the drain can take what is left.
    let mut rx = rx.lock().await;
    let mut batch = Vec::new();
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, SPILL_BATCH) => n,
            () = stop.cancelled(), if !rx.is_closed() => {
                rx.close();
                continue;
            }
        };
        if n == 0 {
            return;
        }
        spill_blocking(&spill, std::mem::take(&mut batch)).await;
    }
}

/// Replays the spill into the database, oldest record first, while the
/// database takes it; probes it (and migrates, if that never happened)
/// with backoff while it does not. `fsync`s the spill once a second.
async fn replay(
    inserter: Arc<Inserter>,
    spill: Arc<Spill>,
    mut migrated: bool,
    stop: CancellationToken,
) {
    const MAX_DELAY: Duration = Duration::from_secs(5);
    let mut delay = Duration::from_millis(250);
    let mut synced = Instant::now();
    while !stop.is_cancelled() {
        if synced.elapsed() >= Duration::from_secs(1) {
            let s = spill.clone();
            let _ = tokio::task::spawn_blocking(move || s.sync()).await;
            synced = Instant::now();
        }
        let up = if !migrated {
            let done = tokio::time::timeout(INSERT_TIMEOUT, inserter.db.migrate()).await;
            migrated = matches!(done, Ok(Ok(())));
            migrated
        } else if spill.is_down() {
            tokio::time::timeout(INSERT_TIMEOUT, inserter.db.ping())
                .await
                .is_ok_and(|r| r.is_ok())
        } else {
            let s = spill.clone();
            match tokio::task::spawn_blocking(move || s.next_batch()).await {
                Ok(Some((rows, to))) => {
                    if inserter.write(&rows, true).await.is_empty() {
                        let s = spill.clone();
                        let n = rows.len();
                        let _ = tokio::task::spawn_blocking(move || s.commit(to, n)).await;
                        delay = Duration::from_millis(250);
                        continue;
                    }
                    false
                }
                _ => {
                    // Nothing to replay: wait for more, or for a second.
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = stop.cancelled() => {}
                    }
                    continue;
                }
            }
        };
        spill.set_down(!up);
        if !up {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop.cancelled() => {}
            }
            delay = (delay * 2).min(MAX_DELAY);
        } else {
            delay = Duration::from_millis(250);
        }
    }
}

/// A batch insert slower than this is logged (at most every few seconds).
const SLOW_BATCH: Duration = Duration::from_secs(1);

struct Writer {
    rx: Arc<Mutex<mpsc::Receiver<RequestRecord>>>,
    /// Rows taken from the queue and not yet written, set aside or given
    /// up on, across all writers: what a drain cut short loses.
    in_hand: Arc<AtomicU64>,
    window: Duration,
    batch_size: usize,
    inserter: Arc<Inserter>,
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
        self.inserter.metrics.db_queue_depth.dec_by(n as i64);
    }

    /// Writes a batch; what the database cannot take goes to the spill,
    /// or with none is counted as failed. While the database is known to
    /// be down, the batch goes straight to the spill.
    async fn write(&self, rows: &[RequestRecord]) {
        let ins = &self.inserter;
        if let Some(spill) = ins.spill.as_ref().filter(|s| s.is_down()) {
            spill_blocking(spill, rows.to_vec()).await;
            return;
        }
        for part in ins.write(rows, false).await {
            match &ins.spill {
                Some(spill) => {
                    spill_blocking(spill, part.to_vec()).await;
                }
                None => {
                    ins.metrics.db_failed.inc_by(part.len() as u64);
                }
            }
        }
    }
}

/// Inserts rows, for the writers and the replayer alike.
struct Inserter {
    db: Db,
    slow: WarnLimiter,
    max_retries: u32,
    metrics: Arc<StoreMetrics>,
    /// With a spill, an insert the database cannot take is not retried
    /// here: its rows are spilled and the spill marked down.
    spill: Option<Arc<Spill>>,
}

impl Inserter {
    /// Writes `rows`. A batch the database refuses because of what one of
    /// its rows holds (a data or constraint error) is split in halves
    /// until the refused rows stand alone; they are set aside and counted
    /// as rejected, and every other row is written. Any other error
    /// (database down, locked, timed out) is retried with backoff, or with
    /// a spill (or `once`) not at all. Returns the parts not written for
    /// such errors, in order.
    async fn write<'r>(&self, rows: &'r [RequestRecord], once: bool) -> Vec<&'r [RequestRecord]> {
        let mut unwritten = Vec::new();
        // Halves still to write, the next one last; order is kept.
        let mut parts = vec![rows];
        while let Some(part) = parts.pop() {
            match self.insert_retrying(part, once).await {
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
                Inserted::Unavailable => unwritten.push(part),
            }
        }
        unwritten
    }

    /// One insert of `rows`, retried with backoff while the error is not
    /// the rows' own fault (with a spill, or `once`, tried once).
    async fn insert_retrying(&self, rows: &[RequestRecord], once: bool) -> Inserted {
        let n = rows.len() as u64;
        let attempts = if once || self.spill.is_some() {
            1
        } else {
            self.max_retries
        };
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=attempts {
            let began = Instant::now();
            let result = self.db.insert_requests(rows, INSERT_TIMEOUT).await;
            match result {
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
                    if let Some(spill) = &self.spill {
                        spill.set_down(true);
                        if self.slow.allow() {
                            tracing::warn!(rows = n, error = %e, "request log insert failed; spilling");
                        }
                        break;
                    }
                    if attempt == attempts {
                        if !once {
                            tracing::error!(rows = n, error = %e, "request log: giving up on a batch");
                        }
                        break;
                    }
                    tracing::warn!(rows = n, attempt, error = %e, "request log insert failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        Inserted::Unavailable
    }
}

/// How one insert ended.
enum Inserted {
    /// Written.
    Ok,
    /// The database refused what a row holds; retrying cannot help.
    Refused(sqlx::Error),
    /// The database could not take it (down, unreachable, timed out),
    /// after every attempt.
    Unavailable,
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
    fn sqlite_writers_share_two_connections() {
        let cfg = |url: &str, workers| StoreConfig {
            url: url.to_owned(),
            workers,
            ..StoreConfig::default()
        };
        assert_eq!(log_connections(&cfg("sqlite://gale.db", 5)), 2);
        assert_eq!(log_connections(&cfg("sqlite://gale.db", 1)), 1);
        assert_eq!(log_connections(&cfg("postgres://db/gale", 5)), 5);
    }

    #[test]
    fn warn_limiter_allows_one_per_interval() {
        let w = WarnLimiter::new(Duration::from_secs(3600));
        assert!(w.allow());
        assert!(!w.allow());
    }
}
