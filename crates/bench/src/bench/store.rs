//! The `store` scenario: rows/s the request log's batched writers sustain
//! into a database, driven in this process through the very pipeline the
//! server uses ([`gale_store::start`]: bounded queue, writer tasks,
//! multi-row inserts), at a target rate or as fast as the writers take
//! rows. With `import`, a `notes.import` of that many notes runs halfway
//! through, on the notes' own pool, and the report says how long it took
//! and how long the request log stalled meanwhile (on SQLite the two
//! share the database's one write lock).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Report, process_cpu, progress};
use gale_store::{RequestRecord, StoreConfig, StoreMetrics};

/// Runs the scenario: offers `rate` rows per second (0: keep the queue
/// full, which measures the writers' ceiling) for `duration`, from
/// `clients` distinct client ids, then drains.
///
/// # Errors
/// The store's error when the database cannot be opened.
pub async fn store(
    cfg: &StoreConfig,
    rate: u32,
    clients: usize,
    duration: Duration,
    import: usize,
    stop: CancellationToken,
    show: bool,
) -> Result<Report, gale_store::StoreError> {
    let metrics = Arc::new(StoreMetrics::default());
    let (db, log, writers) = gale_store::start(cfg, metrics.clone()).await?;
    let cpu0 = process_cpu();
    let bar = show.then(|| progress(duration.as_millis() as u64, "writing"));
    let started = Instant::now();
    // Rows come from `clients` connections, as in the server: where the
    // keys of an index are random, each batch touches many pages.
    let clients: Vec<Uuid> = (0..clients.max(1)).map(|_| Uuid::new_v4()).collect();
    let row = |n: u64| RequestRecord {
        client_id: clients[(n % clients.len() as u64) as usize],
        city: format!("City{}", n % 1000),
        ok: true,
        temperature: Some(21.5),
        error: None,
        latency_ms: 3,
        created_at: Utc::now(),
    };
    let (mut offered, mut max_depth) = (0_u64, 0_usize);
    // The longest time with rows queued and none written.
    let (mut written, mut progressed, mut stall) = (0_u64, Instant::now(), Duration::ZERO);
    let mut importing: Option<tokio::task::JoinHandle<(usize, Duration)>> = None;
    let mut imported = None;
    // Offer in 1 ms steps: the rows due by now.
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while started.elapsed() < duration && !stop.is_cancelled() {
        tick.tick().await;
        let due = if rate == 0 {
            offered + (cfg.queue_size - log.depth()) as u64
        } else {
            (started.elapsed().as_secs_f64() * f64::from(rate)) as u64
        };
        while offered < due {
            log.record(row(offered));
            offered += 1;
        }
        max_depth = max_depth.max(log.depth());
        let now = metrics.db_completed.get();
        if now != written || log.depth() == 0 {
            (written, progressed) = (now, Instant::now());
        } else {
            stall = stall.max(progressed.elapsed());
        }
        if import > 0
            && importing.is_none()
            && imported.is_none()
            && started.elapsed() >= duration / 2
        {
            let db = db.clone();
            importing = Some(tokio::spawn(async move {
                let notes: Vec<gale_store::NewNote> = (0..import)
                    .map(|i| gale_store::NewNote {
                        title: format!("bench note {i}"),
                        content: "imported by gale bench store --import".into(),
                        collaborators: if i % 10 == 0 {
                            vec!["bench-reader".into()]
                        } else {
                            Vec::new()
                        },
                    })
                    .collect();
                let began = Instant::now();
                let n = db.import_notes("gale-bench", &notes).await.unwrap_or(0);
                (n, began.elapsed())
            }));
        }
        if importing.as_ref().is_some_and(|t| t.is_finished())
            && let Some(task) = importing.take()
        {
            imported = task.await.ok();
        }
        if let Some(bar) = &bar {
            bar.set_position(started.elapsed().as_millis() as u64);
            bar.set_message(format!(
                "{} written, queue {}",
                metrics.db_completed.get(),
                log.depth()
            ));
        }
    }
    let offering = started.elapsed();
    if let Some(task) = importing.take() {
        imported = task.await.ok();
    }
    drop(log);
    let drained = writers.drain(Duration::from_secs(120)).await.is_ok();
    db.close().await;
    let mut r = Report::new("store");
    r.elapsed = started.elapsed();
    r.replies = metrics.db_completed.get();
    r.cpu = process_cpu().saturating_sub(cpu0);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let dropped = metrics.db_dropped.get();
    if dropped > 0 {
        *r.errors
            .entry("queue full: rows dropped".into())
            .or_default() += dropped;
    }
    let failed = metrics.db_failed.get();
    if failed > 0 {
        *r.errors.entry("rows failed".into()).or_default() += failed;
    }
    if !drained {
        r.error("drain did not finish in 120 s");
    }
    r.extra.push((
        "offered",
        json!(format!(
            "{offered} rows in {:.2} s ({:.0}/s)",
            offering.as_secs_f64(),
            offered as f64 / offering.as_secs_f64().max(1e-9)
        )),
    ));
    r.extra.push(("max queue depth", json!(max_depth)));
    r.extra.push((
        "longest stall",
        json!(format!(
            "{} ms with rows queued and none written",
            stall.as_millis()
        )),
    ));
    if let Some((n, took)) = imported {
        r.extra.push((
            "notes import",
            json!(format!("{n} notes in {} ms", took.as_millis())),
        ));
    }
    r.extra.push(("queue size", json!(cfg.queue_size)));
    r.extra.push(("writers", json!(cfg.workers)));
    r.extra.push(("batch size", json!(cfg.batch_size)));
    Ok(r)
}
