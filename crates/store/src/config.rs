//! `[store]`: where the request log and notes go, and how the log is
//! written. Read from the same file and `GALE_STORE__*` variables as the
//! engine's settings.

use serde::{Deserialize, Serialize};

use gale_engine::config::{ConfigError, check_ranges};

/// Most rows in one insert: keeps a statement under both databases'
/// bind-parameter limits (7 columns each).
pub const MAX_BATCH_SIZE: usize = 4_000;

/// `[store]`: where the request log goes and how it is written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://FILE` or `postgres://…`.
    pub url: String,
    /// Rows waiting to be written; past this new rows are dropped and
    /// counted.
    pub queue_size: usize,
    /// Writer tasks, and on PostgreSQL as many of the request log's own
    /// database connections (on SQLite, which takes one writer at a
    /// time, they share at most two).
    pub workers: usize,
    /// Database connections for notes: a pool apart from the request
    /// log's, so notes queries never hold the log's connections.
    pub notes_connections: usize,
    /// Most rows per insert statement.
    pub batch_size: usize,
    /// How long a writer waits for a batch to fill once its first row is
    /// in: fewer, larger inserts at moderate rates.
    pub batch_window_ms: u64,
    /// Attempts per batch before its rows are counted as failed (with no
    /// spill; with one, a batch the database cannot take is spilled after
    /// its first failed attempt).
    pub max_retries: u32,
    /// Directory for the disk spill: rows the database cannot take now
    /// (down, unreachable, too slow to keep the queue from filling) are
    /// appended here and replayed once it can. Created at start and locked
    /// (one gale process per directory); empty turns the spill off.
    pub spill_dir: String,
    /// Most bytes the spill holds not yet replayed; past this, rows are
    /// dropped and counted.
    pub spill_max_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: "sqlite://gale.db".to_owned(),
            queue_size: 10_000,
            workers: 5,
            notes_connections: 5,
            batch_size: 500,
            batch_window_ms: 10,
            max_retries: 8,
            spill_dir: "gale-spill".to_owned(),
            spill_max_bytes: 1 << 30,
        }
    }
}

impl StoreConfig {
    /// Checks values that parse but cannot work; errors name the setting
    /// (`store.workers`).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let (st, n) = (self, |v: usize| v as u64);
        check_ranges(&[
            ("store.queue_size", n(st.queue_size), 1, 10_000_000),
            ("store.workers", n(st.workers), 1, 1_000),
            ("store.notes_connections", n(st.notes_connections), 1, 1_000),
            ("store.batch_size", n(st.batch_size), 1, n(MAX_BATCH_SIZE)),
            ("store.batch_window_ms", st.batch_window_ms, 0, 1_000),
            ("store.max_retries", u64::from(st.max_retries), 0, 1_000),
            ("store.spill_max_bytes", st.spill_max_bytes, 65_536, 1 << 40),
        ])?;
        crate::check_url(&st.url).map_err(|m| ConfigError::invalid("store.url", m))
    }
}
