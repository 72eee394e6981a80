//! The `connections` scenario: open, hold, and weigh the server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::raw::Conn;
use super::{Report, Target, process_cpu, progress, ramp, server_rss};

/// Runs `connections`: opens `n` at `rate` per second, holds them for
/// `hold`, reports connect-time percentiles and, when the server's memory
/// can be read (`server_pid`, or gale's `/metrics.json`), its growth per
/// connection.
pub async fn connections(
    target: Target,
    n: usize,
    rate: u32,
    hold: Duration,
    stop: CancellationToken,
    show: bool,
    server_pid: Option<u32>,
) -> Report {
    let started = Instant::now();
    let cpu0 = process_cpu();
    let addr = target.addr;
    let before = server_rss(server_pid, addr).await;
    let bar = show.then(|| progress(n as u64, "connecting"));
    let (mut r, held) = open(target, n, rate, &stop, bar.as_ref()).await;
    if let Some(bar) = &bar {
        bar.set_message(format!("holding {}", held.len()));
    }
    // Let the server settle before reading its memory.
    tokio::select! {
        () = tokio::time::sleep(hold) => {}
        () = stop.cancelled() => {}
    }
    weigh(&mut r, before, server_rss(server_pid, addr).await);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    r.elapsed = started.elapsed();
    r.cpu = process_cpu().saturating_sub(cpu0);
    drop(held);
    r
}

/// `connections` in a worker process: open, say ready, hold until the
/// parent has weighed the server (at most `hold` plus a margin).
pub async fn worker(
    target: Target,
    n: usize,
    rate: u32,
    hold: Duration,
    stop: CancellationToken,
) -> Report {
    let started = Instant::now();
    let cpu0 = process_cpu();
    let (mut r, held) = open(target, n, rate, &stop, None).await;
    super::procs::worker_ready(r.connected, hold + Duration::from_secs(300)).await;
    drop(held);
    r.elapsed = started.elapsed();
    r.cpu = process_cpu().saturating_sub(cpu0);
    r
}

/// Opens `n` connections at `rate` per second (or fewer if `stop` fires);
/// returns the report so far and the open connections.
async fn open(
    target: Target,
    n: usize,
    rate: u32,
    stop: &CancellationToken,
    bar: Option<&indicatif::ProgressBar>,
) -> (Report, Vec<Conn>) {
    let target = Arc::new(target);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Result<Conn, String>, Duration)>();
    ramp(n, rate, stop, |i| {
        let (target, tx) = (target.clone(), tx.clone());
        async move {
            let t = Instant::now();
            let res = tokio::time::timeout(Duration::from_secs(30), target.connect_any(i))
                .await
                .unwrap_or_else(|_| Err("connect timeout".into()));
            let _ = tx.send((res, t.elapsed()));
        }
    })
    .await;
    drop(tx);
    let mut r = Report::new("connections");
    let mut held = Vec::with_capacity(n);
    while let Some((res, took)) = tokio::select! {
        m = rx.recv() => m,
        () = stop.cancelled() => None,
    } {
        match res {
            Ok(ws) => {
                r.connected += 1;
                let _ = r.latency.record(took.as_micros().max(1) as u64);
                held.push(ws);
            }
            Err(e) => {
                r.connect_failed += 1;
                r.error(e);
            }
        }
        if let Some(bar) = bar {
            bar.set_position(r.connected + r.connect_failed);
        }
    }
    r.replies = r.connected;
    (r, held)
}

/// Adds the server's memory before and while holding, and the growth per
/// held connection, when both could be read.
pub fn weigh(r: &mut Report, before: Option<u64>, after: Option<u64>) {
    if let (Some(before), Some(after)) = (before, after) {
        let per = after.saturating_sub(before) as f64 / (r.connected.max(1) as f64) / 1024.0;
        r.extra
            .push(("server_rss_kib_before", json!(before / 1024)));
        r.extra.push(("server_rss_kib_held", json!(after / 1024)));
        r.extra.push((
            "server_kib_per_connection",
            json!((per * 100.0).round() / 100.0),
        ));
    }
}
