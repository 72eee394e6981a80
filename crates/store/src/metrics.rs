//! The request log's metrics (`gale_db_*`, `gale_spill_*`), registered
//! beside the engine's, and its part of `/metrics.json`.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Every counter of the request log and its spill.
#[derive(Debug)]
pub struct StoreMetrics {
    /// Rows accepted into the request-log queue (the seed's `db-queued`).
    pub db_queued: Counter,
    /// Rows written to the database (the seed's `db-completed`).
    pub db_completed: Counter,
    /// Rows dropped because the queue was full.
    pub db_dropped: Counter,
    /// Rows given up on after the database kept failing.
    pub db_failed: Counter,
    /// Rows the database refused for what they hold (set aside; the rest
    /// of their batch was written).
    pub db_rejected: Counter,
    /// Rows still queued or being written when the shutdown drain's
    /// deadline passed.
    pub db_abandoned: Counter,
    /// Failed insert attempts (each retried with backoff).
    pub db_errors: Counter,
    /// Rows waiting in the queue now (kept live: counted in as a row is
    /// queued, out as a writer takes it).
    pub db_queue_depth: Gauge,
    /// Rows written to the disk spill (the database could not take them).
    pub spill_rows: Counter,
    /// Spilled rows replayed into the database.
    pub spill_replayed: Counter,
    /// Rows dropped because the spill was full or failed.
    pub spill_dropped: Counter,
    /// Spill records found torn or corrupt and skipped (their rows lost).
    pub spill_torn: Counter,
    /// Spill segments that could not be read and were set aside.
    pub spill_unreadable: Counter,
    /// Bytes in the spill not yet replayed.
    pub spill_bytes: Gauge,
    /// Rows per insert.
    pub db_batch_size: Histogram,
}

impl StoreMetrics {
    /// The request log's metrics, registered with the engine's (`/metrics`
    /// and `/metrics.json`).
    pub fn register(engine: &gale_engine::metrics::Metrics) -> Arc<StoreMetrics> {
        let made = Arc::new(engine.register(StoreMetrics::new_in));
        engine.add_part(made.clone());
        made
    }

    fn new_in(r: &mut Registry) -> StoreMetrics {
        let db_queued = Counter::default();
        r.register(
            "db_rows_queued",
            "Request-log rows queued",
            db_queued.clone(),
        );
        let db_completed = Counter::default();
        r.register(
            "db_rows_written",
            "Request-log rows written",
            db_completed.clone(),
        );
        let db_dropped = Counter::default();
        r.register(
            "db_rows_dropped",
            "Request-log rows dropped: queue full",
            db_dropped.clone(),
        );
        let db_failed = Counter::default();
        r.register(
            "db_rows_failed",
            "Request-log rows lost after retries",
            db_failed.clone(),
        );
        let db_rejected = Counter::default();
        r.register(
            "db_rows_rejected",
            "Request-log rows the database refused for their content, set aside",
            db_rejected.clone(),
        );
        let db_abandoned = Counter::default();
        r.register(
            "db_rows_abandoned",
            "Request-log rows not written by the shutdown drain's deadline",
            db_abandoned.clone(),
        );
        let db_errors = Counter::default();
        r.register(
            "db_insert_errors",
            "Failed insert attempts",
            db_errors.clone(),
        );
        let db_queue_depth = Gauge::default();
        r.register(
            "db_queue_depth",
            "Request-log rows waiting to be written",
            db_queue_depth.clone(),
        );
        let spill_rows = Counter::default();
        r.register(
            "spill_rows",
            "Request-log rows written to the disk spill",
            spill_rows.clone(),
        );
        let spill_replayed = Counter::default();
        r.register(
            "spill_replayed_rows",
            "Spilled request-log rows replayed into the database",
            spill_replayed.clone(),
        );
        let spill_dropped = Counter::default();
        r.register(
            "spill_dropped_rows",
            "Request-log rows dropped: the disk spill full or failing",
            spill_dropped.clone(),
        );
        let spill_torn = Counter::default();
        r.register(
            "spill_torn_records",
            "Disk spill records found torn or corrupt and skipped",
            spill_torn.clone(),
        );
        let spill_unreadable = Counter::default();
        r.register(
            "spill_unreadable_segments",
            "Disk spill segments that could not be read, set aside as .unreadable",
            spill_unreadable.clone(),
        );
        let spill_bytes = Gauge::default();
        r.register(
            "spill_bytes",
            "Bytes in the disk spill not yet replayed",
            spill_bytes.clone(),
        );
        let db_batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 13));
        r.register("db_batch_rows", "Rows per insert", db_batch_size.clone());
        StoreMetrics {
            db_queued,
            db_completed,
            db_dropped,
            db_failed,
            db_rejected,
            db_abandoned,
            db_errors,
            db_queue_depth,
            spill_rows,
            spill_replayed,
            spill_dropped,
            spill_torn,
            spill_unreadable,
            spill_bytes,
            db_batch_size,
        }
    }
}

impl Default for StoreMetrics {
    /// Metrics registered nowhere (tests, the store benchmark).
    fn default() -> Self {
        StoreMetrics::new_in(&mut Registry::default())
    }
}

impl gale_engine::metrics::Part for StoreMetrics {
    fn json(&self, out: &mut serde_json::Map<String, serde_json::Value>) {
        for (k, v) in [
            ("db-queued", self.db_queued.get()),
            ("db-completed", self.db_completed.get()),
            ("db-dropped", self.db_dropped.get()),
            ("db-failed", self.db_failed.get()),
            ("db-rejected", self.db_rejected.get()),
            ("db-abandoned", self.db_abandoned.get()),
        ] {
            out.insert(k.into(), v.into());
        }
        out.insert("db-queue-depth".into(), self.db_queue_depth.get().into());
        for (k, v) in [
            ("spill-rows", self.spill_rows.get()),
            ("spill-replayed", self.spill_replayed.get()),
            ("spill-dropped", self.spill_dropped.get()),
            ("spill-torn", self.spill_torn.get()),
            ("spill-unreadable", self.spill_unreadable.get()),
        ] {
            out.insert(k.into(), v.into());
        }
        out.insert("spill-bytes".into(), self.spill_bytes.get().into());
    }
}
