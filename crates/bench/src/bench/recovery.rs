//! The `recovery` scenario: N clients subscribe to a topic with history,
//! all drop, M publications go out while they are away, then all
//! reconnect at once and ask for what they missed. Reports the time until
//! every client has recovered, each client's reconnect-to-recovered
//! latency, and (given the cluster's Redis) the commands and CPU Redis
//! spent on it. With several URLs, each client reconnects to a different
//! node than the one it left.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::broadcast::{BroadcastOptions, publish};
use super::raw::{Conn, Received};
use super::{Report, Target, process_cpu, ramp};

/// What `recovery` does.
#[derive(Debug, Clone)]
pub struct RecoveryOptions {
    /// Clients.
    pub clients: usize,
    /// New connections per second, both times.
    pub connect_rate: u32,
    /// The topic (its history must hold `missed` publications).
    pub topic: String,
    /// Publications sent while the clients are away.
    pub missed: u64,
    /// Size of each publication's text, in bytes.
    pub size: usize,
    /// The publish API's key.
    pub api_key: String,
    /// The cluster's Redis, to measure its load during the reconnect.
    pub redis_url: Option<String>,
}

/// A client's position after its first subscribe.
type Position = (u64, String);

async fn subscribe(conn: &mut Conn, data: Value) -> Result<Value, String> {
    let msg = json!({"event": "topic.subscribe", "data": data, "ref": "s"});
    conn.send_text(msg.to_string()).await?;
    loop {
        match conn.next().await? {
            Received::Text(t) => {
                let v: Value =
                    serde_json::from_str(t.as_str()).map_err(|e| format!("json: {e}"))?;
                if v["reply"] == "s" {
                    if v["ok"] != true {
                        return Err(super::refusal(&v));
                    }
                    return Ok(v["data"].clone());
                }
            }
            Received::Other => {}
            Received::Closed(code, _) => return Err(format!("closed {code}")),
        }
    }
}

/// Runs `recovery` against `targets` (one per node).
///
/// # Errors
/// A message when the first phase (subscribing) or publishing fails.
pub async fn recovery(
    targets: Vec<Target>,
    o: &RecoveryOptions,
    stop: CancellationToken,
) -> Result<Report, String> {
    let targets: Arc<Vec<Target>> = Arc::new(targets);
    let nodes = targets.len().max(1);
    let first = targets.first().ok_or("no target")?.clone();

    // 1. Subscribe every client and keep its position.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let topic = o.topic.clone();
    ramp(o.clients, o.connect_rate, &stop, |i| {
        let (targets, tx, topic) = (targets.clone(), tx.clone(), topic.clone());
        async move {
            let first = async {
                let mut conn = targets[i % nodes].connect_any(i).await?;
                let reply = subscribe(&mut conn, json!({"topic": topic})).await?;
                let offset = reply["offset"].as_u64().ok_or(
                    "the topic keeps no history: give it one ([topics.\"PATTERN\"] history_size)",
                )?;
                let epoch = reply["epoch"].as_str().unwrap_or_default().to_owned();
                Ok::<_, String>((conn, (offset, epoch)))
            };
            let _ = tx.send((
                i,
                tokio::time::timeout(Duration::from_secs(30), first).await,
            ));
        }
    })
    .await;
    drop(tx);
    let mut positions: Vec<Option<Position>> = vec![None; o.clients];
    let mut conns = Vec::with_capacity(o.clients);
    while let Some((i, res)) = rx.recv().await {
        match res {
            Ok(Ok((conn, pos))) => {
                positions[i] = Some(pos);
                conns.push(conn);
            }
            Ok(Err(e)) => return Err(format!("client {i}: {e}")),
            Err(_) => return Err(format!("client {i}: no subscribe reply within 30 s")),
        }
    }
    // 2. Everyone drops.
    drop(conns);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 3. Publications while they are away.
    let published = publish(
        &first,
        &BroadcastOptions {
            subscribers: 0,
            connect_rate: 1,
            topic: o.topic.clone(),
            messages: o.missed,
            size: o.size,
            rate: 0,
            api_key: o.api_key.clone(),
            idle: Duration::from_secs(1),
            first_connection: 0,
        },
        &stop,
    )
    .await?;
    if published.accepted != o.missed {
        return Err(format!(
            "{} of {} publications accepted: {:?}",
            published.accepted, o.missed, published.errors
        ));
    }
    // The API queues; let the last one reach the history.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 4. Everyone comes back at once, each to another node, and recovers.
    let redis_before = match &o.redis_url {
        Some(url) => Some(redis_load(url).await?),
        None => None,
    };
    let mut report = Report::new("recovery");
    let started = Instant::now();
    let cpu0 = process_cpu();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let positions = Arc::new(positions);
    let topic = o.topic.clone();
    let missed = o.missed;
    ramp(o.clients, o.connect_rate, &stop, |i| {
        let (targets, tx, topic, positions) = (
            targets.clone(),
            tx.clone(),
            topic.clone(),
            positions.clone(),
        );
        async move {
            let t = Instant::now();
            let again = async {
                let (offset, epoch) = positions[i].clone().ok_or("no position")?;
                // A connection number past the first phase's: fresh ports.
                let mut conn = targets[(i + 1) % nodes].connect_any(i + 1_000_000).await?;
                let since = json!({"offset": offset, "epoch": epoch});
                let reply = subscribe(&mut conn, json!({"topic": topic, "since": since})).await?;
                if reply["recovered"] != true {
                    return Err("recovered: false".to_owned());
                }
                let got = reply["publications"].as_array().map_or(0, Vec::len) as u64;
                if got != missed {
                    return Err(format!("recovered {got} publications, not {missed}"));
                }
                Ok::<_, String>(conn)
            };
            let res = tokio::time::timeout(Duration::from_secs(60), again).await;
            let _ = tx.send((res, t.elapsed()));
        }
    })
    .await;
    drop(tx);
    let mut back = Vec::with_capacity(o.clients);
    let mut last = Duration::ZERO;
    while let Some((res, took)) = rx.recv().await {
        match res {
            Ok(Ok(conn)) => {
                report.connected += 1;
                report.replies += 1;
                let _ = report.latency.record(took.as_micros().max(1) as u64);
                last = started.elapsed();
                back.push(conn);
            }
            Ok(Err(e)) => report.error(e),
            Err(_) => report.error("no recovery within 60 s"),
        }
    }
    report.elapsed = last;
    report.cpu = process_cpu().saturating_sub(cpu0);
    report.extra.push(("clients", json!(o.clients)));
    report.extra.push(("nodes", json!(nodes)));
    report.extra.push(("missed_per_client", json!(o.missed)));
    report
        .extra
        .push(("publications_recovered", json!(report.replies * o.missed)));
    report.extra.push((
        "all_recovered_s",
        json!((last.as_secs_f64() * 1000.0).round() / 1000.0),
    ));
    if let (Some(url), Some(before)) = (&o.redis_url, redis_before) {
        let after = redis_load(url).await?;
        report
            .extra
            .push(("redis_commands", json!(after.0.saturating_sub(before.0))));
        report.extra.push((
            "redis_cpu_s",
            json!(((after.1 - before.1) * 1000.0).round() / 1000.0),
        ));
    }
    drop(back);
    Ok(report)
}

/// Redis's commands processed and CPU seconds (user + system) so far.
async fn redis_load(url: &str) -> Result<(u64, f64), String> {
    let client = redis::Client::open(url).map_err(|e| format!("--redis {url}: {e}"))?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("--redis {url}: {e}"))?;
    let info: String = redis::cmd("INFO")
        .arg("all")
        .query_async(&mut conn)
        .await
        .map_err(|e| format!("--redis {url}: {e}"))?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
            .unwrap_or("0")
            .to_owned()
    };
    let commands = field("total_commands_processed").parse().unwrap_or(0);
    let cpu = field("used_cpu_user").parse::<f64>().unwrap_or(0.0)
        + field("used_cpu_sys").parse::<f64>().unwrap_or(0.0);
    Ok((commands, cpu))
}
