//! The `deploy` scenario: what clients see while a node is upgraded in
//! place (`gale serve --takeover`) or drained into another node.
//!
//! N connections, spread over `topics` topics with history, each
//! subscribed to one; a publication every `publish_every` (round the
//! topics) through `POST /api/publish`; some connections ask one
//! `topic.subscribe` of their topic a second (answered with its position). At `event_at` the scenario runs the
//! operator's command (`--exec`: start the successor, or signal the node
//! to drain), and it measures what every client saw: closes, pushes
//! missed or repeated (by topic offset), the longest pause between two
//! pushes, reply latency before, during and after the event, and, for
//! connections that were closed, how long they took to be back
//! (reconnected, resubscribed with `since`, recovered) and at what rate
//! the nodes took them. A closed connection waits the delay its close
//! reason suggests (`{"reconnect_ms":N}`), then reconnects to the next
//! URL and recovers from its last position.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::Target;
use super::raw::Received;

/// Options of the `deploy` scenario.
#[derive(Debug, Clone)]
pub struct DeployOptions {
    /// Where to connect; a closed connection reconnects to the next.
    pub targets: Vec<Target>,
    /// Connections.
    pub connections: usize,
    /// New connections per second while connecting.
    pub connect_rate: u32,
    /// Topics (`deploy:0` …), each with history on the server.
    pub topics: usize,
    /// One publication every this long, round the topics.
    pub publish_every: Duration,
    /// `http://HOST:PORT` publications go to.
    pub publish_to: String,
    /// gale's `[api] key`.
    pub api_key: String,
    /// Requests per second, all connections together (one connection
    /// asks at most once a second).
    pub requests_per_s: usize,
    /// How long to run, connected.
    pub duration: Duration,
    /// When the event happens, from the end of connecting.
    pub event_at: Duration,
    /// How long after the event counts as "during" for reply latency.
    pub event_window: Duration,
    /// A shell command run at `event_at` (the event).
    pub exec: Option<String>,
    /// The pid of the node the event replaces: the report says when it
    /// exited.
    pub server_pid: Option<u32>,
}

/// What every client adds to.
#[derive(Debug)]
struct Stats {
    began: Instant,
    event: Mutex<Option<Instant>>,
    event_window: Duration,
    subscribed: AtomicU64,
    pushes: AtomicU64,
    missed: AtomicU64,
    duplicates: AtomicU64,
    /// Pushes a recovery had already delivered (skipped by offset).
    overlap: AtomicU64,
    epoch_changes: AtomicU64,
    reconnects: AtomicU64,
    recovered: AtomicU64,
    recovery_failed: AtomicU64,
    connect_failures: AtomicU64,
    request_errors: AtomicU64,
    closes: Mutex<BTreeMap<u16, u64>>,
    /// Handshakes per (target, second since the start).
    handshakes: Mutex<BTreeMap<(usize, u64), u64>>,
    /// Reply latency (µs) before, during and after the event.
    replies: Mutex<[Histogram<u64>; 3]>,
    /// Each client's longest pause between two pushes (µs).
    pauses: Mutex<Histogram<u64>>,
    /// Close to resubscribed (µs).
    back: Mutex<Histogram<u64>>,
}

fn histogram() -> Histogram<u64> {
    super::new_histogram()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Stats {
    fn phase(&self, at: Instant) -> usize {
        match *lock(&self.event) {
            None => 0,
            Some(e) if at < e => 0,
            Some(e) if at < e + self.event_window => 1,
            Some(_) => 2,
        }
    }
}

/// Runs the scenario; returns its report as JSON.
///
/// # Errors
/// When nothing could connect, or the publisher could not be built.
pub async fn run(o: DeployOptions, stop: CancellationToken) -> Result<Value, String> {
    if o.targets.is_empty() {
        return Err("no target".into());
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let stats = Arc::new(Stats {
        began: Instant::now(),
        event: Mutex::new(None),
        event_window: o.event_window,
        subscribed: AtomicU64::new(0),
        pushes: AtomicU64::new(0),
        missed: AtomicU64::new(0),
        duplicates: AtomicU64::new(0),
        overlap: AtomicU64::new(0),
        epoch_changes: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        recovered: AtomicU64::new(0),
        recovery_failed: AtomicU64::new(0),
        connect_failures: AtomicU64::new(0),
        request_errors: AtomicU64::new(0),
        closes: Mutex::new(BTreeMap::new()),
        handshakes: Mutex::new(BTreeMap::new()),
        replies: Mutex::new([histogram(), histogram(), histogram()]),
        pauses: Mutex::new(histogram()),
        back: Mutex::new(histogram()),
    });
    let done = CancellationToken::new();
    let targets = Arc::new(o.targets.clone());
    let askers = o.requests_per_s.min(o.connections);
    let ask_every = (askers > 0).then(|| o.connections / askers.max(1));
    let clients = tokio_util::task::TaskTracker::new();
    let every = Duration::from_secs_f64(1.0 / f64::from(o.connect_rate.max(1)));
    let mut tick = tokio::time::interval(every);
    for i in 0..o.connections {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        let asks = ask_every.is_some_and(|k| i % k == 0);
        clients.spawn(client(
            i,
            format!("deploy:{}", i % o.topics.max(1)),
            asks,
            targets.clone(),
            stats.clone(),
            done.clone(),
        ));
    }
    // Everyone subscribed (or as many as will), then the clock starts.
    let settle = Instant::now() + Duration::from_secs(30);
    while stats.subscribed.load(Ordering::Relaxed) < o.connections as u64 && Instant::now() < settle
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let subscribed = stats.subscribed.load(Ordering::Relaxed);
    eprintln!(
        "gale bench deploy: {subscribed} of {} subscribed; publishing",
        o.connections
    );
    let publisher = tokio::spawn(publish(o.clone(), done.clone()));
    let started = Instant::now();
    tokio::select! {
        () = tokio::time::sleep(o.event_at) => {}
        () = stop.cancelled() => {}
    }
    let event_at = Instant::now();
    *lock(&stats.event) = Some(event_at);
    let exited = match &o.exec {
        Some(cmd) => {
            eprintln!("gale bench deploy: running {cmd:?}");
            let status = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .status()
                .await
                .map_err(|e| format!("--exec: {e}"))?;
            if !status.success() {
                eprintln!("gale bench deploy: --exec exited {status}");
            }
            match o.server_pid {
                Some(pid) => wait_exit(pid, o.duration)
                    .await
                    .map(|d| d.as_millis() as u64),
                None => None,
            }
        }
        None => None,
    };
    let left = (started + o.duration).saturating_duration_since(Instant::now());
    tokio::select! {
        () = tokio::time::sleep(left) => {}
        () = stop.cancelled() => {}
    }
    done.cancel();
    let published = publisher.await.map_err(|e| e.to_string())?;
    clients.close();
    let _ = tokio::time::timeout(Duration::from_secs(30), clients.wait()).await;

    let replies = lock(&stats.replies);
    let q = |h: &Histogram<u64>, p: f64| {
        (h.value_at_quantile(p) as f64 / 1000.0 * 100.0).round() / 100.0
    };
    let pauses = lock(&stats.pauses);
    let back = lock(&stats.back);
    let handshakes = lock(&stats.handshakes);
    let mut per_target = vec![0u64; o.targets.len()];
    for ((t, _), n) in handshakes.iter() {
        per_target[*t] = per_target[*t].max(*n);
    }
    Ok(json!({
        "scenario": "deploy",
        "connections": o.connections,
        "subscribed": subscribed,
        "published": published.0,
        "publish_errors": published.1,
        "pushes": stats.pushes.load(Ordering::Relaxed),
        "missed": stats.missed.load(Ordering::Relaxed),
        "duplicates": stats.duplicates.load(Ordering::Relaxed),
        "overlap_skipped": stats.overlap.load(Ordering::Relaxed),
        "epoch_changes": stats.epoch_changes.load(Ordering::Relaxed),
        "closes": lock(&stats.closes).iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "reconnects": stats.reconnects.load(Ordering::Relaxed),
        "recovered": stats.recovered.load(Ordering::Relaxed),
        "recovery_failed": stats.recovery_failed.load(Ordering::Relaxed),
        "connect_failures": stats.connect_failures.load(Ordering::Relaxed),
        "request_errors": stats.request_errors.load(Ordering::Relaxed),
        "longest_pause_ms": {"max": q(&pauses, 1.0), "p99": q(&pauses, 0.99), "p50": q(&pauses, 0.5)},
        "reply_ms": {
            "before": {"n": replies[0].len(), "p50": q(&replies[0], 0.5), "p99": q(&replies[0], 0.99), "max": q(&replies[0], 1.0)},
            "during": {"n": replies[1].len(), "p50": q(&replies[1], 0.5), "p99": q(&replies[1], 0.99), "max": q(&replies[1], 1.0)},
            "after": {"n": replies[2].len(), "p50": q(&replies[2], 0.5), "p99": q(&replies[2], 0.99), "max": q(&replies[2], 1.0)},
        },
        "back_ms": {"n": back.len(), "p50": q(&back, 0.5), "p99": q(&back, 0.99), "max": q(&back, 1.0)},
        "handshakes_per_s_max": per_target,
        "old_exit_ms": exited,
        "elapsed_s": stats.began.elapsed().as_secs_f64().round(),
    }))
}

/// Waits until process `pid` is gone; how long that took.
async fn wait_exit(pid: u32, limit: Duration) -> Option<Duration> {
    let began = Instant::now();
    let proc = format!("/proc/{pid}");
    while began.elapsed() < limit {
        if !std::path::Path::new(&proc).exists() {
            return Some(began.elapsed());
        }
        // A zombie has exited, too.
        if std::fs::read_to_string(format!("{proc}/stat"))
            .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"))
        {
            return Some(began.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// Publishes round the topics until `done`; (accepted, refused).
async fn publish(o: DeployOptions, done: CancellationToken) -> (u64, u64) {
    let Ok(client) = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    else {
        return (0, 0);
    };
    let url = format!("{}/api/publish", o.publish_to.trim_end_matches('/'));
    let mut tick = tokio::time::interval(o.publish_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (mut ok, mut refused) = (0, 0);
    for k in 0u64.. {
        tokio::select! {
            _ = tick.tick() => {}
            () = done.cancelled() => break,
        }
        let topic = format!("deploy:{}", k % o.topics.max(1) as u64);
        let body = json!({"event": "tick", "topic": topic, "data": {"k": k}});
        match client
            .post(&url)
            .bearer_auth(&o.api_key)
            .json(&body)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => ok += 1,
            _ => refused += 1,
        }
    }
    (ok, refused)
}

/// One client's view of its topic.
#[derive(Debug, Default)]
struct Position {
    offset: u64,
    epoch: String,
    last_push: Option<Instant>,
    longest: Duration,
    /// Since a recovering resubscribe, until a push past its position:
    /// pushes the recovery already held may still come (in cluster mode
    /// a publication reaches the history before it reaches this node's
    /// subscribers), and are skipped, as protocol.md says a client does.
    recovering: bool,
}

impl Position {
    /// Accounts for a push (or a recovered publication) at `offset`.
    fn push(&mut self, stats: &Stats, offset: u64, epoch: &str, at: Instant) {
        stats.pushes.fetch_add(1, Ordering::Relaxed);
        if epoch != self.epoch {
            if !self.epoch.is_empty() {
                stats.epoch_changes.fetch_add(1, Ordering::Relaxed);
            }
            self.epoch = epoch.to_owned();
        } else if offset <= self.offset {
            if self.recovering {
                stats.overlap.fetch_add(1, Ordering::Relaxed);
            } else {
                stats.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            return;
        } else if offset > self.offset + 1 {
            stats
                .missed
                .fetch_add(offset - self.offset - 1, Ordering::Relaxed);
        }
        self.offset = offset;
        self.recovering = false;
        if let Some(last) = self.last_push {
            self.longest = self.longest.max(at - last);
        }
        self.last_push = Some(at);
    }
}

/// One connection, reconnected (to the next target) whenever it closes.
async fn client(
    i: usize,
    topic: String,
    asks: bool,
    targets: Arc<Vec<Target>>,
    stats: Arc<Stats>,
    done: CancellationToken,
) {
    let mut pos = Position::default();
    let mut at = 0;
    let mut closed_at: Option<Instant> = None;
    let mut first = true;
    let mut ask = tokio::time::interval(Duration::from_secs(1));
    ask.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'connect: while !done.is_cancelled() {
        let conn = tokio::select! {
            c = targets[at].connect_any(i) => c,
            () = done.cancelled() => break,
        };
        let mut conn = match conn {
            Ok(c) => c,
            Err(_) => {
                stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                at = (at + 1) % targets.len();
                tokio::time::sleep(Duration::from_millis(200 + (i % 300) as u64)).await;
                continue;
            }
        };
        let second = stats.began.elapsed().as_secs();
        *lock(&stats.handshakes).entry((at, second)).or_default() += 1;
        let since =
            (!pos.epoch.is_empty()).then(|| json!({"offset": pos.offset, "epoch": pos.epoch}));
        let mut data = json!({"topic": topic});
        if let Some(s) = &since {
            data["since"] = s.clone();
        }
        let sub = json!({"event": "topic.subscribe", "data": data, "ref": "s"}).to_string();
        if conn.send_text(sub).await.is_err() {
            continue;
        }
        let mut asked: Option<Instant> = None;
        // Pushes that come before the subscribe's reply: the reply's
        // position (and what it recovered) goes first, then these, less
        // the ones it already held (protocol.md, history and recovery).
        let mut early: Option<Vec<(u64, String, Instant)>> = Some(Vec::new());
        loop {
            let msg = tokio::select! {
                m = conn.next() => m,
                _ = ask.tick(), if asks && asked.is_none() && !first => {
                    // A request through the router: subscribing again
                    // answers the topic's position.
                    let q = json!({"event": "topic.subscribe", "data": {"topic": topic}, "ref": "q"}).to_string();
                    if conn.send_text(q).await.is_ok() {
                        asked = Some(Instant::now());
                    }
                    continue;
                }
                () = done.cancelled() => {
                    finish(&stats, &pos);
                    conn.close().await;
                    return;
                }
            };
            let now = Instant::now();
            match msg {
                Ok(Received::Text(t)) => {
                    let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
                        continue;
                    };
                    if let Some(r) = v["reply"].as_str() {
                        if r == "s" {
                            subscribed(&stats, &mut pos, &v, since.is_some(), now);
                            for (offset, epoch, at) in early.take().unwrap_or_default() {
                                if epoch != pos.epoch || offset > pos.offset {
                                    pos.push(&stats, offset, &epoch, at);
                                }
                            }
                            if first {
                                stats.subscribed.fetch_add(1, Ordering::Relaxed);
                                first = false;
                            }
                            if let Some(t) = closed_at.take() {
                                stats.reconnects.fetch_add(1, Ordering::Relaxed);
                                let _ = lock(&stats.back).record(t.elapsed().as_micros() as u64);
                            }
                        } else if r == "q"
                            && let Some(sent) = asked.take()
                        {
                            if v["ok"] == true {
                                let phase = stats.phase(sent);
                                let _ = lock(&stats.replies)[phase]
                                    .record(sent.elapsed().as_micros() as u64);
                            } else {
                                stats.request_errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    } else if v["topic"] == topic.as_str()
                        && let Some(offset) = v["offset"].as_u64()
                    {
                        let epoch = v["epoch"].as_str().unwrap_or("");
                        match &mut early {
                            Some(held) => held.push((offset, epoch.to_owned(), now)),
                            None => pos.push(&stats, offset, epoch, now),
                        }
                    }
                }
                Ok(Received::Other) => {}
                Ok(Received::Closed(code, reason)) => {
                    *lock(&stats.closes).entry(code).or_default() += 1;
                    if asked.is_some() {
                        stats.request_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    closed_at = Some(now);
                    at = (at + 1) % targets.len();
                    let wait = serde_json::from_str::<Value>(&reason)
                        .ok()
                        .and_then(|r| r["reconnect_ms"].as_u64())
                        .unwrap_or(1_000);
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    continue 'connect;
                }
                Err(_) => {
                    *lock(&stats.closes).entry(1006).or_default() += 1;
                    if asked.is_some() {
                        stats.request_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    closed_at = Some(now);
                    at = (at + 1) % targets.len();
                    tokio::time::sleep(Duration::from_millis(500 + (i % 1000) as u64)).await;
                    continue 'connect;
                }
            }
        }
    }
    finish(&stats, &pos);
}

/// A subscribe reply: the position, and on a resubscribe what was
/// recovered.
fn subscribed(stats: &Stats, pos: &mut Position, v: &Value, resumed: bool, now: Instant) {
    let data = &v["data"];
    if v["ok"] != true {
        stats.recovery_failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if resumed {
        if data["recovered"] == true {
            stats.recovered.fetch_add(1, Ordering::Relaxed);
            for p in data["publications"].as_array().into_iter().flatten() {
                if let Some(offset) = p["offset"].as_u64() {
                    pos.push(stats, offset, p["epoch"].as_str().unwrap_or(""), now);
                }
            }
        } else {
            stats.recovery_failed.fetch_add(1, Ordering::Relaxed);
        }
    }
    if let (Some(offset), Some(epoch)) = (data["offset"].as_u64(), data["epoch"].as_str()) {
        if pos.epoch.is_empty() || (epoch == pos.epoch && offset > pos.offset && !resumed) {
            pos.offset = offset;
            pos.epoch = epoch.to_owned();
        } else if epoch != pos.epoch {
            stats.epoch_changes.fetch_add(1, Ordering::Relaxed);
            pos.offset = offset;
            pos.epoch = epoch.to_owned();
        } else if offset > pos.offset {
            // Recovered publications that were not in the reply.
            stats
                .missed
                .fetch_add(offset - pos.offset, Ordering::Relaxed);
            pos.offset = offset;
        }
    }
    // What the recovery held may still be pushed after it.
    pos.recovering = resumed;
}

fn finish(stats: &Stats, pos: &Position) {
    let _ = lock(&stats.pauses).record(pos.longest.as_micros().max(1) as u64);
}
