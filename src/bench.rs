//! `gale bench`: load scenarios against any WebSocket URL on this machine,
//! with latency percentiles from an HDR histogram, errors by kind, and the
//! generator's own CPU use printed beside the results, so it is plain when
//! the generator, not the server, is the bottleneck.
//!
//! Safety: targets must be on 127.0.0.0/8 (or `localhost`); every run is
//! bounded by a duration; Ctrl-C stops it and still prints what it
//! measured. Connections are spread over source addresses 127.0.0.2… so
//! ephemeral ports do not run out at tens of thousands of connections.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The URL is not a ws:// URL on the loopback network.
    #[error("{0}")]
    Target(String),
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Target {
    url: url::Url,
    addr: SocketAddr,
    /// Source addresses used round-robin: 127.0.0.(2+first), …
    sources: u8,
    /// Offset of this process's first source address (worker processes
    /// take disjoint blocks).
    first_source: u8,
}

impl Target {
    /// Checks that `url` is `ws://` on 127.0.0.0/8 or localhost.
    ///
    /// # Errors
    /// [`BenchError::Target`] saying why the URL is refused.
    pub fn new(url: &str, sources: u8) -> Result<Target, BenchError> {
        let bad = |m: &str| BenchError::Target(format!("{url}: {m}"));
        let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        if parsed.scheme() != "ws" {
            return Err(bad("only ws:// URLs"));
        }
        let ip: Ipv4Addr = match parsed.host_str() {
            Some("localhost") => Ipv4Addr::LOCALHOST,
            Some(h) => h
                .parse()
                .map_err(|_| bad("the host must be an IPv4 address on 127.0.0.0/8 or localhost"))?,
            None => return Err(bad("no host")),
        };
        if !ip.is_loopback() {
            return Err(bad("load goes only to 127.0.0.0/8"));
        }
        let port = parsed.port_or_known_default().unwrap_or(80);
        Ok(Target {
            url: parsed,
            addr: SocketAddr::new(IpAddr::V4(ip), port),
            sources: sources.max(1),
            first_source: 0,
        })
    }

    /// The server's address, for reading its metrics.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// This target for worker `index` of a multi-process run: its own
    /// block of `sources` addresses.
    pub fn for_worker(mut self, index: u8) -> Target {
        self.first_source = index.saturating_mul(self.sources);
        self
    }

    /// Opens connection number `i` from source address 127.0.0.(2 + i mod
    /// sources), or from any address with one source.
    async fn connect(&self, i: usize) -> Result<Ws, String> {
        let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
        if self.sources > 1 || self.first_source > 0 {
            let last = 2_u8
                .saturating_add(self.first_source)
                .saturating_add((i % usize::from(self.sources)) as u8);
            let from = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), 0);
            socket.bind(from).map_err(|e| format!("bind {from}: {e}"))?;
        }
        let stream = socket
            .connect(self.addr)
            .await
            .map_err(|e| format!("connect: {}", e.kind()))?;
        let _ = stream.set_nodelay(true);
        let (ws, _) = tokio_tungstenite::client_async(self.url.as_str(), stream)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        Ok(ws)
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Options of the `requests` scenario.
#[derive(Debug, Clone)]
pub struct RequestsOptions {
    /// Connections.
    pub connections: usize,
    /// How long to send.
    pub duration: Duration,
    /// Cities drawn from `City0` … `City{K-1}`.
    pub cities: usize,
    /// Requests outstanding per connection (closed loop).
    pub window: usize,
    /// Send JSON `weather.get` events instead of plain text.
    pub events: bool,
    /// New connections per second while connecting.
    pub connect_rate: u32,
    /// How long to wait for a reply before counting a timeout.
    pub reply_timeout: Duration,
    /// Requests each connection sends before it stops; 0 = no limit.
    pub per_connection: u64,
    /// Number of this process's first connection (workers of one run take
    /// disjoint ranges, so they do not ask for the same cities in step).
    pub first_connection: usize,
}

/// What a scenario measured.
#[derive(Debug)]
pub struct Report {
    scenario: &'static str,
    elapsed: Duration,
    connected: u64,
    connect_failed: u64,
    replies: u64,
    latency: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    cpu: Duration,
    extra: Vec<(&'static str, Value)>,
}

impl Report {
    /// An empty report; worker reports are merged into one like it.
    pub fn new(scenario: &'static str) -> Report {
        Report {
            scenario,
            elapsed: Duration::ZERO,
            connected: 0,
            connect_failed: 0,
            replies: 0,
            latency: new_histogram(),
            errors: BTreeMap::new(),
            cpu: Duration::ZERO,
            extra: Vec::new(),
        }
    }

    fn error(&mut self, kind: impl Into<String>) {
        *self.errors.entry(kind.into()).or_default() += 1;
    }

    /// Replies (or connections) per second over the run.
    pub fn rate(&self) -> f64 {
        self.replies as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency at quantile `q` (0–1) in milliseconds.
    pub fn latency_ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    /// The report as JSON (for `--json`).
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "scenario": self.scenario,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "connected": self.connected,
            "connect_failed": self.connect_failed,
            "replies": self.replies,
            "rate_per_s": self.rate(),
            "latency_ms": {
                "p50": self.latency_ms(0.5),
                "p90": self.latency_ms(0.9),
                "p99": self.latency_ms(0.99),
                "p99.9": self.latency_ms(0.999),
                "max": self.latency.max() as f64 / 1000.0,
                "samples": self.latency.len(),
            },
            "errors": self.errors,
            "generator_cpu_percent": self.cpu_percent(),
        });
        for (k, val) in &self.extra {
            v[*k] = val.clone();
        }
        v
    }

    /// Everything needed to merge this report into another process's:
    /// the JSON report plus the histogram's recorded values and CPU time.
    pub fn to_worker_json(&self) -> Value {
        let mut v = self.to_json();
        let recorded: Vec<[u64; 2]> = self
            .latency
            .iter_recorded()
            .map(|x| [x.value_iterated_to(), x.count_at_value()])
            .collect();
        v["histogram"] = json!(recorded);
        v["cpu_s"] = json!(self.cpu.as_secs_f64());
        v
    }

    /// Merges a worker's [`Report::to_worker_json`] into this report.
    ///
    /// # Errors
    /// A message when the JSON is not a worker report.
    pub fn absorb_worker_json(&mut self, v: &Value) -> Result<(), String> {
        let n = |k: &str| {
            v[k].as_u64()
                .ok_or_else(|| format!("worker report lacks {k}"))
        };
        self.connected += n("connected")?;
        self.connect_failed += n("connect_failed")?;
        self.replies += n("replies")?;
        for pair in v["histogram"]
            .as_array()
            .ok_or("worker report lacks histogram")?
        {
            let (Some(value), Some(count)) = (pair[0].as_u64(), pair[1].as_u64()) else {
                return Err("bad histogram entry".into());
            };
            self.latency
                .record_n(value, count)
                .map_err(|e| e.to_string())?;
        }
        if let Some(errors) = v["errors"].as_object() {
            for (kind, count) in errors {
                *self.errors.entry(kind.clone()).or_default() += count.as_u64().unwrap_or(0);
            }
        }
        self.cpu += Duration::from_secs_f64(v["cpu_s"].as_f64().unwrap_or(0.0).max(0.0));
        let elapsed = Duration::from_secs_f64(v["elapsed_s"].as_f64().unwrap_or(0.0).max(0.0));
        self.elapsed = self.elapsed.max(elapsed);
        Ok(())
    }

    /// Adds CPU time (the parent's own, in a multi-process run).
    pub fn add_cpu(&mut self, cpu: Duration) {
        self.cpu += cpu;
    }

    fn cpu_percent(&self) -> f64 {
        100.0 * self.cpu.as_secs_f64() / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A table for people.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let mut row = |k: &str, v: String| out.push_str(&format!("  {k:<26} {v}\n"));
        row("scenario", self.scenario.to_owned());
        row("elapsed", format!("{:.2} s", self.elapsed.as_secs_f64()));
        row(
            "connections",
            format!("{} ok, {} failed", self.connected, self.connect_failed),
        );
        if self.scenario == "requests" {
            row(
                "replies",
                format!("{} ({:.0}/s)", self.replies, self.rate()),
            );
        }
        row(
            "latency ms",
            format!(
                "p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
                self.latency_ms(0.5),
                self.latency_ms(0.9),
                self.latency_ms(0.99),
                self.latency_ms(0.999),
                self.latency.max() as f64 / 1000.0
            ),
        );
        for (k, v) in &self.extra {
            row(k, v.to_string());
        }
        if self.errors.is_empty() {
            row("errors", "none".into());
        } else {
            for (kind, n) in &self.errors {
                row(&format!("error {kind}"), n.to_string());
            }
        }
        row(
            "generator CPU",
            format!("{:.0}% of one core", self.cpu_percent()),
        );
        out
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 10 min at 3 significant digits: constant, valid bounds.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// CPU time (user + system) this process has used, from /proc.
pub fn process_cpu() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may contain spaces).
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let total = ticks(11) + ticks(12);
    Duration::from_millis(total * 10) // USER_HZ is 100 on Linux
}

/// Starts `n` connection tasks at `rate` per second, or fewer if `stop`
/// fires first. Returns how many were started.
async fn ramp<F, Fut>(n: usize, rate: u32, stop: &CancellationToken, mut start: F) -> usize
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let every = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..n {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return i,
        }
        tokio::spawn(start(i));
    }
    n
}

/// Live counters for the progress bar.
#[derive(Debug, Default)]
struct Live {
    connected: AtomicU64,
    replies: AtomicU64,
}

fn progress(total_ms: u64, label: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total_ms);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} [{bar:30}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(label.to_owned());
    bar
}

/// Runs `requests`: closed loop, `window` requests outstanding per
/// connection, until `duration` or `stop`.
pub async fn requests(
    target: Target,
    o: RequestsOptions,
    stop: CancellationToken,
    show: bool,
) -> Report {
    let started = Instant::now();
    let cpu0 = process_cpu();
    let live = Arc::new(Live::default());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Report>();
    let deadline = tokio::time::Instant::now() + o.duration;
    let run_stop = stop.child_token();
    {
        let stopper = run_stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            stopper.cancel();
        });
    }
    let bar = show.then(|| progress(o.duration.as_millis() as u64, "connecting"));
    let ramp_stop = run_stop.clone();
    let target = Arc::new(target);
    let o2 = o.clone();
    let live2 = live.clone();
    let started_conns = ramp(o.connections, o.connect_rate, &ramp_stop, move |i| {
        let (target, o, tx, stop, live) = (
            target.clone(),
            o2.clone(),
            tx.clone(),
            run_stop.clone(),
            live2.clone(),
        );
        async move {
            let report = one_connection(&target, o.first_connection + i, &o, &stop, &live).await;
            let _ = tx.send(report);
        }
    })
    .await;

    // Every started connection reports once: at the deadline (or Ctrl-C)
    // it stops sending and waits, at most reply_timeout, for what is in
    // flight.
    let mut total = Report::new("requests");
    let mut done = 0;
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    while done < started_conns {
        tokio::select! {
            r = rx.recv() => match r {
                Some(r) => {
                    merge(&mut total, r);
                    done += 1;
                }
                None => break,
            },
            _ = ticker.tick() => {
                if let Some(bar) = &bar {
                    bar.set_position(started.elapsed().as_millis() as u64);
                    bar.set_message(format!(
                        "{} connected, {} replies",
                        live.connected.load(Ordering::Relaxed),
                        live.replies.load(Ordering::Relaxed)
                    ));
                }
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // Rates are per second of sending, which ends at the deadline.
    total.elapsed = started.elapsed().min(o.duration);
    total.cpu = process_cpu().saturating_sub(cpu0);
    total
}

fn merge(total: &mut Report, r: Report) {
    total.connected += r.connected;
    total.connect_failed += r.connect_failed;
    total.replies += r.replies;
    let _ = total.latency.add(&r.latency);
    for (k, n) in r.errors {
        *total.errors.entry(k).or_default() += n;
    }
}

/// One connection of `requests`.
async fn one_connection(
    target: &Target,
    i: usize,
    o: &RequestsOptions,
    stop: &CancellationToken,
    live: &Live,
) -> Report {
    let mut r = Report::new("requests");
    let mut ws = match target.connect(i).await {
        Ok(ws) => ws,
        Err(e) => {
            r.connect_failed = 1;
            r.error(e);
            return r;
        }
    };
    r.connected = 1;
    live.connected.fetch_add(1, Ordering::Relaxed);
    // Requests in flight: by ref (events) or by city (plain text).
    let mut pending: HashMap<String, VecDeque<Instant>> = HashMap::new();
    let mut in_flight = 0_usize;
    let mut sent = 0_u64;
    let mut seq = i.wrapping_mul(7919);
    loop {
        while in_flight < o.window.max(1)
            && !stop.is_cancelled()
            && (o.per_connection == 0 || sent < o.per_connection)
        {
            seq = seq.wrapping_add(1);
            let city = format!("City{}", seq % o.cities.max(1));
            let (key, text) = if o.events {
                let key = seq.to_string();
                let text =
                    json!({"event":"weather.get","data":{"city":city},"ref":key}).to_string();
                (key, text)
            } else {
                (city.clone(), city)
            };
            if ws.send(Message::text(text)).await.is_err() {
                r.error("send failed");
                return r;
            }
            pending.entry(key).or_default().push_back(Instant::now());
            in_flight += 1;
            sent += 1;
        }
        if in_flight == 0 {
            break;
        }
        let text = match tokio::time::timeout(o.reply_timeout, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(Message::Close(f)))) => {
                r.error(format!(
                    "closed {}",
                    f.map(|f| u16::from(f.code)).unwrap_or(1005)
                ));
                return r;
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => {
                r.error(format!("read: {e}"));
                return r;
            }
            Ok(None) => {
                r.error("connection ended");
                return r;
            }
            Err(_) => {
                r.error("no reply in time");
                return r;
            }
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            r.error("unparsable reply");
            continue;
        };
        if v["type"] == "connected" {
            continue; // the greeting
        }
        let key = if o.events {
            v["reply"].as_str().map(str::to_owned)
        } else {
            v["city"].as_str().map(str::to_owned)
        };
        let Some(sent) = key.and_then(|k| pending.get_mut(&k).and_then(VecDeque::pop_front)) else {
            r.error("unmatched reply");
            continue;
        };
        in_flight -= 1;
        let failed = v["type"] == "error" || v["ok"] == false;
        if failed {
            let code = if o.events {
                &v["error"]["code"]
            } else {
                &v["code"]
            };
            r.error(format!("reply {}", code.as_str().unwrap_or("error")));
        } else {
            r.replies += 1;
            live.replies.fetch_add(1, Ordering::Relaxed);
            let _ = r.latency.record(sent.elapsed().as_micros().max(1) as u64);
        }
        if stop.is_cancelled() && in_flight == 0 {
            break;
        }
    }
    let _ = ws.close(None).await;
    r
}

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
    let rss_before = server_rss(server_pid, addr).await;
    let target = Arc::new(target);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Result<Ws, String>, Duration)>();
    let bar = show.then(|| progress(n as u64, "connecting"));
    let ramp_stop = stop.clone();
    ramp(n, rate, &ramp_stop, |i| {
        let (target, tx) = (target.clone(), tx.clone());
        async move {
            let t = Instant::now();
            let res = tokio::time::timeout(Duration::from_secs(30), target.connect(i))
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
        if let Some(bar) = &bar {
            bar.set_position(r.connected + r.connect_failed);
        }
    }
    if let Some(bar) = &bar {
        bar.set_message(format!("holding {}", held.len()));
    }
    // Let the server settle before reading its memory.
    tokio::select! {
        () = tokio::time::sleep(hold) => {}
        () = stop.cancelled() => {}
    }
    if let (Some(before), Some(after)) = (rss_before, server_rss(server_pid, addr).await) {
        let per = after.saturating_sub(before) as f64 / (r.connected.max(1) as f64) / 1024.0;
        r.extra
            .push(("server_rss_kib_before", json!(before / 1024)));
        r.extra.push(("server_rss_kib_held", json!(after / 1024)));
        r.extra.push((
            "server_kib_per_connection",
            json!((per * 100.0).round() / 100.0),
        ));
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    r.replies = r.connected;
    r.elapsed = started.elapsed();
    r.cpu = process_cpu().saturating_sub(cpu0);
    drop(held);
    r
}

/// The server's resident memory: from `/proc/PID/status` when a pid is
/// given, else from gale's `/metrics.json` (`rss-bytes`).
pub async fn server_rss(pid: Option<u32>, metrics_addr: SocketAddr) -> Option<u64> {
    if let Some(pid) = pid {
        let status = tokio::fs::read_to_string(format!("/proc/{pid}/status"))
            .await
            .ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        return Some(kb * 1024);
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(metrics_addr).await.ok()?;
        s.write_all(b"GET /metrics.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        let json = body.split_once("\r\n\r\n")?.1.to_owned();
        serde_json::from_str::<Value>(&json).ok()?["rss-bytes"].as_u64()
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .ok()?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_ws_targets() {
        assert!(Target::new("ws://127.0.0.1:8080/ws", 1).is_ok());
        assert!(Target::new("ws://127.9.9.9:80/ws", 4).is_ok());
        assert!(Target::new("ws://localhost:8080/ws", 1).is_ok());
        for bad in [
            "ws://10.0.0.1/ws",
            "ws://192.168.1.1/ws",
            "ws://example.com/ws",
            "wss://127.0.0.1/ws",
            "http://127.0.0.1/",
        ] {
            assert!(Target::new(bad, 1).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn cpu_time_is_read() {
        let spin = Instant::now();
        let mut x = 0_u64;
        while spin.elapsed() < Duration::from_millis(150) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(
            process_cpu() >= Duration::from_millis(50),
            "{:?}",
            process_cpu()
        );
    }
}
