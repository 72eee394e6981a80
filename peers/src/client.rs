//! `gale-peers client`: one benchmark client for every server
//! scripts/peers.sh compares, speaking each one's protocol:
//!
//! - `gale`: `GET /ws`, `{"event":"topic.subscribe","data":{"topic":"bench"},"ref":"sub"}`,
//!   publications through `POST /api/publish` with the API key;
//! - `socketio`: engine.io v4 over WebSocket (`/socket.io/?EIO=4&transport=websocket`,
//!   `40` to connect, `2` answered with `3`, events `42[...]`); the server
//!   puts every socket in the room; publications through `POST /publish`;
//! - `pusher`: `/app/KEY?protocol=7`, `pusher:subscribe` to the public
//!   channel `bench`, publications through the Pusher HTTP API
//!   (`POST /apps/ID/events`, signed with HMAC-SHA256);
//! - `raw`: a plain WebSocket that receives every broadcast text (the
//!   gorilla/websocket hub; it joins queued messages with newlines in one
//!   frame, so each line counts); publications through `POST /publish`.
//!
//! Three measurements, on one set of N connections:
//! 1. idle memory: the server's VmRSS before connecting and once all N
//!    are subscribed and settled, per connection;
//! 2. burst: M publications of about 1 KB back to back (each waits for
//!    its HTTP answer); deliveries/s from the first publish to the last
//!    delivery, and the server's CPU time (utime + stime) per delivery;
//! 3. paced: P publications at R per second, each stamped with its send
//!    time; publish-to-delivery latency over every delivery.
//!
//! The client shares the machine with the server; its own CPU is reported
//! so the reader sees how much of the cores it took.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio_websockets::Message;

const HELP: &str = "\
gale-peers client --proto gale|socketio|pusher|raw --server HOST:PORT --name NAME
    [-n CONNECTIONS=1000] [-m BURST=100] [--paced P=50] [--rate R=10]
    [--size BYTES=1024] [--sources S=4] [--connect-rate PER_S=5000]
    [--server-pid PID] [--api-key KEY] [--pusher APP_ID:KEY:SECRET]
    [--settle-ms 2000] [--idle-ms 3000] [--procs P=1]

Connections come from 127.0.0.2 .. 127.0.0.(1+S), shared among P
processes (each holds one file per connection: keep N/P under the
open-file limit). Prints one markdown
table row on stdout (server, idle KiB/conn, burst deliveries/s, µs server
CPU per delivery, paced p50 / p99 / p99.9 / max ms, missed deliveries) and
the details on stderr.";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Proto {
    Gale,
    SocketIo,
    Pusher,
    Raw,
}

#[derive(Debug, Clone)]
struct Options {
    proto: Proto,
    server: SocketAddr,
    name: String,
    connections: usize,
    burst: u64,
    paced: u64,
    rate: u32,
    size: usize,
    sources: u8,
    connect_rate: u32,
    server_pid: Option<u32>,
    api_key: String,
    pusher: (String, String, String),
    settle: Duration,
    idle: Duration,
    /// Processes sharing the connections (this one and procs - 1 workers).
    procs: usize,
    /// Set in a worker: its index (1..procs).
    worker: Option<usize>,
}

fn parse(args: Vec<String>) -> Result<Options, String> {
    let mut o = Options {
        proto: Proto::Gale,
        server: "127.0.0.1:8080".parse().expect("address"),
        name: String::new(),
        connections: 1000,
        burst: 100,
        paced: 50,
        rate: 10,
        size: 1024,
        sources: 4,
        connect_rate: 5000,
        server_pid: None,
        api_key: String::new(),
        pusher: ("app".into(), "key".into(), "secret".into()),
        settle: Duration::from_millis(2000),
        idle: Duration::from_millis(3000),
        procs: 1,
        worker: None,
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a == "-h" || a == "--help" {
            return Err(HELP.into());
        }
        let v = it
            .next()
            .ok_or_else(|| format!("{a} needs a value\n{HELP}"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{a} {v}: {e}"));
        match a.as_str() {
            "--proto" => {
                o.proto = match v.as_str() {
                    "gale" => Proto::Gale,
                    "socketio" => Proto::SocketIo,
                    "pusher" => Proto::Pusher,
                    "raw" => Proto::Raw,
                    _ => return Err(format!("--proto {v}: gale, socketio, pusher or raw")),
                }
            }
            "--server" => o.server = v.parse().map_err(|e| format!("--server {v}: {e}"))?,
            "--name" => o.name = v,
            "-n" => o.connections = num(&v)? as usize,
            "-m" => o.burst = num(&v)?,
            "--paced" => o.paced = num(&v)?,
            "--rate" => o.rate = num(&v)?.max(1) as u32,
            "--size" => o.size = num(&v)? as usize,
            "--sources" => o.sources = num(&v)?.clamp(1, 250) as u8,
            "--connect-rate" => o.connect_rate = num(&v)?.max(1) as u32,
            "--server-pid" => o.server_pid = Some(num(&v)? as u32),
            "--api-key" => o.api_key = v,
            "--pusher" => {
                let mut p = v.splitn(3, ':').map(str::to_owned);
                match (p.next(), p.next(), p.next()) {
                    (Some(a), Some(b), Some(c)) => o.pusher = (a, b, c),
                    _ => return Err("--pusher APP_ID:KEY:SECRET".into()),
                }
            }
            "--settle-ms" => o.settle = Duration::from_millis(num(&v)?),
            "--idle-ms" => o.idle = Duration::from_millis(num(&v)?),
            "--procs" => o.procs = num(&v)?.clamp(1, 64) as usize,
            "--worker" => o.worker = Some(num(&v)? as usize),
            _ => return Err(format!("unknown option {a}\n{HELP}")),
        }
    }
    if o.name.is_empty() {
        o.name = format!("{:?}", o.proto).to_lowercase();
    }
    if !o.server.ip().is_loopback() {
        return Err("--server must be on 127.0.0.0/8".into());
    }
    Ok(o)
}

pub(crate) fn main(args: Vec<String>) -> i32 {
    let o = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = match o.worker {
        Some(_) => rt.block_on(worker(o)),
        None => rt.block_on(run(o)),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("gale-peers client: {e}");
            1
        }
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Counters shared by every connection of the run.
#[derive(Default)]
struct Live {
    subscribed: AtomicU64,
    failed: AtomicU64,
    /// Deliveries of burst publications (seq < M) and of paced ones.
    burst: AtomicU64,
    paced: AtomicU64,
    /// Unix µs of the latest delivery.
    last_us: AtomicU64,
    /// Every connection's latencies (µs), added when it ends.
    burst_lat: Mutex<Option<Histogram<u64>>>,
    paced_lat: Mutex<Option<Histogram<u64>>>,
    /// Fires when the run is over: every connection merges and closes.
    end: Notify,
    /// Connections that have merged their latencies.
    merged: AtomicU64,
    errors: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Live {
    fn error(&self, e: impl Into<String>) {
        *self.errors.lock().unwrap().entry(e.into()).or_default() += 1;
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

async fn run(o: Options) -> Result<(), String> {
    let live = Arc::new(Live::default());
    let rss0 = o.server_pid.and_then(rss_kib);
    let began = Instant::now();
    eprintln!(
        "== {}: {} connections ({:?}) to {}",
        o.name, o.connections, o.proto, o.server
    );

    let mut workers = Vec::new();
    for k in 1..o.procs {
        workers.push(Worker::spawn(k)?);
    }
    let tasks = open_share(&o, &live).await;
    let mut subscribed = live.subscribed.load(Ordering::Relaxed);
    let mut failed = live.failed.load(Ordering::Relaxed);
    for w in &mut workers {
        let (s, f) = w.ready().await?;
        subscribed += s;
        failed += f;
    }
    eprintln!(
        "   {subscribed} subscribed, {failed} failed, in {:.1} s ({} processes)",
        began.elapsed().as_secs_f64(),
        o.procs
    );
    if subscribed == 0 {
        print_errors(&live);
        return Err("no connection subscribed".into());
    }

    // Idle memory.
    tokio::time::sleep(o.settle).await;
    let rss1 = o.server_pid.and_then(rss_kib);
    let idle_kib = match (rss0, rss1) {
        (Some(a), Some(b)) => Some((b as f64 - a as f64) / subscribed as f64),
        _ => None,
    };
    eprintln!(
        "   server RSS {} KiB -> {} KiB",
        rss0.map_or("?".into(), |v| v.to_string()),
        rss1.map_or("?".into(), |v| v.to_string())
    );

    let mut publisher = Publisher::connect(&o).await?;

    // Burst.
    let client_cpu = || {
        self_cpu_us()
            + workers
                .iter()
                .filter_map(|w| w.child.id().and_then(cpu_us))
                .sum::<u64>()
    };
    let cpu0 = o.server_pid.and_then(cpu_us);
    let self0 = client_cpu();
    let t0 = now_us();
    let mut accepted = 0;
    for seq in 0..o.burst {
        accepted += u64::from(publisher.publish(&o, seq, &live).await);
    }
    let publish_s = (now_us() - t0) as f64 / 1e6;
    let expected = subscribed * accepted;
    let burst_total = || {
        live.burst.load(Ordering::Relaxed)
            + workers
                .iter()
                .map(|w| w.burst.load(Ordering::Relaxed))
                .sum::<u64>()
    };
    let last_us = || {
        workers
            .iter()
            .map(|w| w.last_us.load(Ordering::Relaxed))
            .fold(live.last_us.load(Ordering::Relaxed), u64::max)
    };
    drain(&burst_total, expected, o.idle).await;
    let cpu1 = o.server_pid.and_then(cpu_us);
    let self1 = client_cpu();
    let got = burst_total();
    let span_s = (last_us().saturating_sub(t0)).max(1) as f64 / 1e6;
    let rate = got as f64 / span_s;
    let cpu_per = match (cpu0, cpu1) {
        (Some(a), Some(b)) if got > 0 => Some((b - a) as f64 / got as f64),
        _ => None,
    };
    eprintln!(
        "   burst: {accepted} published in {publish_s:.3} s, {got}/{expected} delivered in {span_s:.3} s: \
         {rate:.0}/s; server CPU {} ms, client CPU {} ms",
        match (cpu0, cpu1) {
            (Some(a), Some(b)) => ((b - a) / 1000).to_string(),
            _ => "?".into(),
        },
        (self1 - self0) / 1000
    );
    let burst_missed = expected - got.min(expected);

    // Paced.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut late = 0;
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(o.rate)));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut paced_ok = 0;
    let (pcpu0, pself0) = (o.server_pid.and_then(cpu_us), client_cpu());
    for k in 0..o.paced {
        let due = pace.tick().await;
        if due.elapsed() > Duration::from_millis(5) {
            late += 1;
        }
        paced_ok += u64::from(publisher.publish(&o, o.burst + k, &live).await);
    }
    let paced_expected = subscribed * paced_ok;
    let paced_total = || {
        live.paced.load(Ordering::Relaxed)
            + workers
                .iter()
                .map(|w| w.paced.load(Ordering::Relaxed))
                .sum::<u64>()
    };
    drain(&paced_total, paced_expected, o.idle).await;
    let paced_got = paced_total();
    let (pcpu1, pself1) = (o.server_pid.and_then(cpu_us), client_cpu());
    if publisher.opened > 1 {
        eprintln!(
            "   the server closed the publisher's connection after each answer: {} opened",
            publisher.opened
        );
    }

    // Collect.
    live.end.notify_waiters();
    for t in tasks {
        let _ = t.await;
    }
    let mut lat = live
        .paced_lat
        .lock()
        .unwrap()
        .take()
        .unwrap_or_else(histogram);
    let mut blat = live
        .burst_lat
        .lock()
        .unwrap()
        .take()
        .unwrap_or_else(histogram);
    for w in workers {
        w.finish(&mut blat, &mut lat, &live).await?;
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    eprintln!(
        "   burst latency ms: p50 {:.1} p99 {:.1} max {:.1}",
        ms(&blat, 0.5),
        ms(&blat, 0.99),
        blat.max() as f64 / 1000.0
    );
    eprintln!(
        "   paced: {paced_ok} published at {}/s ({late} sent > 5 ms late), {paced_got}/{paced_expected} delivered; \
         latency ms p50 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}; server CPU {} ms, client CPU {} ms",
        o.rate,
        ms(&lat, 0.5),
        ms(&lat, 0.99),
        ms(&lat, 0.999),
        lat.max() as f64 / 1000.0,
        match (pcpu0, pcpu1) {
            (Some(a), Some(b)) => ((b - a) / 1000).to_string(),
            _ => "?".into(),
        },
        (pself1 - pself0) / 1000
    );
    print_errors(&live);
    let missed = burst_missed + (paced_expected - paced_got.min(paced_expected));
    println!(
        "| {} | {} | {} | {} | {:.1} / {:.1} / {:.1} / {:.1} | {} |",
        o.name,
        idle_kib.map_or("?".into(), |v| format!("{v:.1}")),
        group(rate as u64),
        cpu_per.map_or("?".into(), |v| format!("{v:.2}")),
        ms(&lat, 0.5),
        ms(&lat, 0.99),
        ms(&lat, 0.999),
        lat.max() as f64 / 1000.0,
        missed,
    );
    Ok(())
}

/// This process's share of the connections: its first index and count.
fn share(o: &Options) -> (usize, usize) {
    let (p, k) = (o.procs, o.worker.unwrap_or(0));
    let (base, rem) = (o.connections / p, o.connections % p);
    (k * base + k.min(rem), base + usize::from(k < rem))
}

/// Opens this process's share of the connections, at most its part of
/// `connect_rate` a second, and waits until each has subscribed or failed.
async fn open_share(o: &Options, live: &Arc<Live>) -> Vec<tokio::task::JoinHandle<()>> {
    let (first, count) = share(o);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<()>();
    let per_tick = (o.connect_rate as usize / o.procs / 100).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut tasks = Vec::with_capacity(count);
    for i in first..first + count {
        if (i - first) % per_tick == 0 {
            tick.tick().await;
        }
        let (o, live, ready) = (o.clone(), live.clone(), ready_tx.clone());
        tasks.push(tokio::spawn(async move {
            connection(&o, i, &live, ready).await
        }));
    }
    drop(ready_tx);
    let mut settled = 0;
    let deadline = tokio::time::sleep(Duration::from_secs(60));
    tokio::pin!(deadline);
    while settled < count {
        tokio::select! {
            r = ready_rx.recv() => match r { Some(()) => settled += 1, None => break },
            () = &mut deadline => break,
        }
    }
    tasks
}

/// A worker process: opens its share, says `ready SUBSCRIBED FAILED`,
/// then `live BURST PACED LAST_US` every 20 ms until a line on stdin
/// ends the run; then its latencies (`hist burst|paced V:C ...`), its
/// errors (`error N TEXT`) and `done`.
async fn worker(o: Options) -> Result<(), String> {
    use tokio::io::AsyncBufReadExt;
    let live = Arc::new(Live::default());
    let tasks = open_share(&o, &live).await;
    println!(
        "ready {} {}",
        live.subscribed.load(Ordering::Relaxed),
        live.failed.load(Ordering::Relaxed)
    );
    let mut line = String::new();
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    let end = stdin.read_line(&mut line);
    tokio::pin!(end);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            _ = &mut end => break,
            _ = tick.tick() => println!(
                "live {} {} {}",
                live.burst.load(Ordering::Relaxed),
                live.paced.load(Ordering::Relaxed),
                live.last_us.load(Ordering::Relaxed)
            ),
        }
    }
    live.end.notify_waiters();
    for t in tasks {
        let _ = t.await;
    }
    for (name, h) in [("burst", &live.burst_lat), ("paced", &live.paced_lat)] {
        if let Some(h) = h.lock().unwrap().as_ref() {
            let pairs: Vec<String> = h
                .iter_recorded()
                .map(|v| format!("{}:{}", v.value_iterated_to(), v.count_at_value()))
                .collect();
            println!("hist {name} {}", pairs.join(" "));
        }
    }
    for (e, n) in live.errors.lock().unwrap().iter() {
        println!("error {n} {}", e.replace('\n', " "));
    }
    println!("done");
    Ok(())
}

/// A worker process as the main one sees it.
struct Worker {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: mpsc::UnboundedReceiver<String>,
    burst: Arc<AtomicU64>,
    paced: Arc<AtomicU64>,
    last_us: Arc<AtomicU64>,
}

impl Worker {
    fn spawn(k: usize) -> Result<Worker, String> {
        use tokio::io::AsyncBufReadExt;
        let exe = std::env::current_exe().map_err(|e| format!("worker: {e}"))?;
        let mut child = tokio::process::Command::new(exe)
            .args(std::env::args().skip(1))
            .args(["--worker", &k.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("worker: {e}"))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (burst, paced, last_us) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let (tx, lines) = mpsc::unbounded_channel();
        let (b, p, l) = (burst.clone(), paced.clone(), last_us.clone());
        tokio::spawn(async move {
            let mut rd = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = rd.next_line().await {
                if let Some(rest) = line.strip_prefix("live ") {
                    let v: Vec<u64> = rest.split(' ').filter_map(|x| x.parse().ok()).collect();
                    if let [bv, pv, lv] = v[..] {
                        b.store(bv, Ordering::Relaxed);
                        p.store(pv, Ordering::Relaxed);
                        l.store(lv, Ordering::Relaxed);
                    }
                } else if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Worker {
            child,
            stdin,
            lines,
            burst,
            paced,
            last_us,
        })
    }

    /// Waits for the worker's `ready`: its subscribed and failed counts.
    async fn ready(&mut self) -> Result<(u64, u64), String> {
        let line = self.lines.recv().await.ok_or("a worker ended early")?;
        let mut it = line.split(' ').skip(1).filter_map(|x| x.parse().ok());
        match (line.starts_with("ready "), it.next(), it.next()) {
            (true, Some(s), Some(f)) => Ok((s, f)),
            _ => Err(format!("worker: {line:.80}")),
        }
    }

    /// Ends the worker's run and adds its latencies and errors.
    async fn finish(
        mut self,
        burst: &mut Histogram<u64>,
        paced: &mut Histogram<u64>,
        live: &Live,
    ) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        let _ = self.stdin.write_all(b"end\n").await;
        while let Some(line) = self.lines.recv().await {
            let mut words = line.splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("hist"), Some(which), Some(pairs)) => {
                    let h = if which == "burst" {
                        &mut *burst
                    } else {
                        &mut *paced
                    };
                    for pair in pairs.split(' ') {
                        if let Some((v, c)) = pair.split_once(':') {
                            let (Ok(v), Ok(c)) = (v.parse::<u64>(), c.parse::<u64>()) else {
                                continue;
                            };
                            let _ = h.record_n(v, c);
                        }
                    }
                }
                (Some("error"), Some(n), Some(text)) => {
                    *live
                        .errors
                        .lock()
                        .unwrap()
                        .entry(text.to_owned())
                        .or_default() += n.parse::<u64>().unwrap_or(1);
                }
                (Some("done"), _, _) => break,
                _ => {}
            }
        }
        let _ = self.child.wait().await;
        Ok(())
    }
}

fn print_errors(live: &Live) {
    for (e, n) in live.errors.lock().unwrap().iter() {
        eprintln!("   error x{n}: {e}");
    }
}

/// 1234567 -> "1,234,567".
fn group(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Waits until `counter` reaches `expected` or stops moving for `idle`.
async fn drain(counter: &dyn Fn() -> u64, expected: u64, idle: Duration) {
    let mut last = (counter(), Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let got = counter();
        if got >= expected {
            return;
        }
        if got != last.0 {
            last = (got, Instant::now());
        } else if last.1.elapsed() > idle {
            return;
        }
    }
}

/// VmRSS of a process, KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime of a process (all its threads), µs. Linux counts them
/// in clock ticks of 1/100 s (USER_HZ on every Linux architecture but
/// alpha/ia64).
fn cpu_us(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of the line; 3 is the first after the name.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 10_000)
}

fn self_cpu_us() -> u64 {
    cpu_us(std::process::id()).unwrap_or(0)
}

/// The payload of publication `seq`: a JSON object of about `size` bytes
/// carrying its send time.
fn payload(seq: u64, size: usize) -> String {
    let head = format!("{{\"seq\":{seq},\"sent_us\":{},\"padding\":\"", now_us());
    let pad = size.saturating_sub(head.len() + 2);
    let words = "light rain north wind humidity 81 feels_like 12.5 overcast ";
    let mut s = String::with_capacity(size + 8);
    s.push_str(&head);
    while s.len() < head.len() + pad {
        s.push_str(words);
    }
    s.truncate(head.len() + pad);
    s.push_str("\"}");
    s
}

/// The number after `key` in a delivery, JSON-escaped or not
/// (`"sent_us":1` and `\"sent_us\":1` alike).
fn number_after(text: &str, key: &str) -> Option<u64> {
    let at = text.find(key)? + key.len();
    let rest = &text[at..];
    let start = rest.find(|c: char| c.is_ascii_digit())?;
    if start > 4 {
        return None;
    }
    let digits = &rest[start..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

type Ws = tokio_websockets::WebSocketStream<TcpStream>;

async fn open(o: &Options, i: usize, path: &str) -> Result<Ws, String> {
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    let from = Ipv4Addr::new(127, 0, 0, 2 + (i % usize::from(o.sources)) as u8);
    socket
        .bind(SocketAddr::V4(SocketAddrV4::new(from, 0)))
        .map_err(|e| format!("bind {from}: {e}"))?;
    let stream = tokio::time::timeout(Duration::from_secs(20), socket.connect(o.server))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let uri: http::Uri = format!("ws://{}{path}", o.server)
        .parse()
        .map_err(|e| format!("uri: {e}"))?;
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(20),
        tokio_websockets::ClientBuilder::from_uri(uri).connect_on(stream),
    )
    .await
    .map_err(|_| "handshake timed out".to_owned())?
    .map_err(|e| format!("handshake: {e}"))?;
    Ok(ws)
}

async fn next_text(ws: &mut Ws) -> Result<String, String> {
    loop {
        match ws.next().await {
            Some(Ok(m)) if m.is_text() => return Ok(m.as_text().unwrap_or_default().to_owned()),
            Some(Ok(m)) if m.is_close() => return Err("closed by the server".into()),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("read: {e}")),
            None => return Err("closed".into()),
        }
    }
}

async fn send(ws: &mut Ws, t: String) -> Result<(), String> {
    ws.send(Message::text(t))
        .await
        .map_err(|e| format!("send: {e}"))
}

/// Opens and subscribes connection `i` in the protocol's way.
async fn subscribe(o: &Options, i: usize) -> Result<Ws, String> {
    match o.proto {
        Proto::Gale => {
            let mut ws = open(o, i, "/ws").await?;
            send(
                &mut ws,
                r#"{"event":"topic.subscribe","data":{"topic":"bench"},"ref":"sub"}"#.into(),
            )
            .await?;
            loop {
                let t = next_text(&mut ws).await?;
                if t.contains(r#""reply":"sub""#) {
                    return if t.contains(r#""ok":true"#) {
                        Ok(ws)
                    } else {
                        Err(format!("subscribe refused: {t}"))
                    };
                }
            }
        }
        Proto::SocketIo => {
            let mut ws = open(o, i, "/socket.io/?EIO=4&transport=websocket").await?;
            let t = next_text(&mut ws).await?;
            if !t.starts_with('0') {
                return Err(format!("engine.io: expected the open packet, got {t:.40}"));
            }
            send(&mut ws, "40".into()).await?;
            loop {
                let t = next_text(&mut ws).await?;
                if t == "2" {
                    send(&mut ws, "3".into()).await?;
                } else if t.starts_with("40") {
                    return Ok(ws);
                } else if t.starts_with("44") {
                    return Err(format!("connect refused: {t}"));
                }
            }
        }
        Proto::Pusher => {
            let path = format!(
                "/app/{}?protocol=7&client=gale-peers&version=1.0",
                o.pusher.1
            );
            let mut ws = open(o, i, &path).await?;
            let t = next_text(&mut ws).await?;
            if !t.contains("pusher:connection_established") {
                return Err(format!("pusher: {t:.120}"));
            }
            send(
                &mut ws,
                r#"{"event":"pusher:subscribe","data":{"channel":"bench"}}"#.into(),
            )
            .await?;
            loop {
                let t = next_text(&mut ws).await?;
                if t.contains("pusher_internal:subscription_succeeded") {
                    return Ok(ws);
                } else if t.contains("pusher:ping") {
                    send(&mut ws, r#"{"event":"pusher:pong","data":{}}"#.into()).await?;
                } else if t.contains("pusher:error") || t.contains("subscription_error") {
                    return Err(format!("pusher: {t:.120}"));
                }
            }
        }
        Proto::Raw => open(o, i, "/ws").await,
    }
}

/// One connection: subscribe, then time every delivery until the run ends.
async fn connection(o: &Options, i: usize, live: &Live, ready: mpsc::UnboundedSender<()>) {
    let end = live.end.notified();
    tokio::pin!(end);
    end.as_mut().enable();
    let mut ws = match subscribe(o, i).await {
        Ok(ws) => ws,
        Err(e) => {
            live.failed.fetch_add(1, Ordering::Relaxed);
            live.error(e);
            let _ = ready.send(());
            return;
        }
    };
    live.subscribed.fetch_add(1, Ordering::Relaxed);
    let _ = ready.send(());
    let (mut burst, mut paced) = (Vec::<u32>::new(), Vec::<u32>::new());
    let mut record = |line: &str| {
        let Some(sent) = number_after(line, "sent_us") else {
            return;
        };
        let now = now_us();
        let lat = now.saturating_sub(sent).clamp(1, u64::from(u32::MAX)) as u32;
        live.last_us.fetch_max(now, Ordering::Relaxed);
        if number_after(line, "\"seq").is_some_and(|s| s < o.burst) {
            burst.push(lat);
            live.burst.fetch_add(1, Ordering::Relaxed);
        } else {
            paced.push(lat);
            live.paced.fetch_add(1, Ordering::Relaxed);
        }
    };
    loop {
        let m = tokio::select! {
            m = ws.next() => m,
            () = &mut end => break,
        };
        let m = match m {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                live.error(format!("read: {e}"));
                break;
            }
            None => {
                live.error("closed by the server");
                break;
            }
        };
        let Some(t) = m.as_text() else {
            if m.is_close() {
                live.error("closed by the server");
                break;
            }
            continue;
        };
        let reply = match o.proto {
            Proto::Raw => {
                for line in t.split('\n') {
                    record(line);
                }
                None
            }
            Proto::SocketIo if t == "2" => Some("3"),
            Proto::Pusher if t.contains("pusher:ping") => {
                Some(r#"{"event":"pusher:pong","data":{}}"#)
            }
            _ => {
                record(t);
                None
            }
        };
        if let Some(r) = reply
            && ws.send(Message::text(r.to_owned())).await.is_err()
        {
            break;
        }
    }
    for (values, into) in [(&burst, &live.burst_lat), (&paced, &live.paced_lat)] {
        if values.is_empty() {
            continue;
        }
        let mut h = into.lock().unwrap();
        let h = h.get_or_insert_with(histogram);
        for &v in values {
            let _ = h.record(u64::from(v));
        }
    }
    live.merged.fetch_add(1, Ordering::Relaxed);
    let _ = ws.close().await;
}

/// One keep-alive HTTP/1.1 connection to the server's publish endpoint,
/// opened again when the server closes it (sockudo answers every API call
/// with `Connection: close`).
struct Publisher {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    /// The server said it closes the connection after its answer.
    closing: bool,
    /// Connections opened (1 when the server keeps it alive).
    opened: u64,
}

impl Publisher {
    async fn connect(o: &Options) -> Result<Publisher, String> {
        let stream = TcpStream::connect(o.server)
            .await
            .map_err(|e| format!("publisher: connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("publisher: {e}"))?;
        tokio::spawn(conn);
        Ok(Publisher {
            sender,
            closing: false,
            opened: 1,
        })
    }

    /// Publishes `seq`; true when the server accepted it.
    async fn publish(&mut self, o: &Options, seq: u64, live: &Live) -> bool {
        let data = payload(seq, o.size);
        let req = http::Request::post("/").header(http::header::HOST, o.server.to_string());
        let (req, body) = match o.proto {
            Proto::Gale => (
                req.uri("/api/publish")
                    .header(http::header::AUTHORIZATION, format!("Bearer {}", o.api_key)),
                format!(r#"{{"event":"bench","topic":"bench","data":{data}}}"#),
            ),
            Proto::SocketIo | Proto::Raw => (req.uri("/publish"), data),
            Proto::Pusher => {
                let body =
                    serde_json::json!({"name": "bench", "channels": ["bench"], "data": data})
                        .to_string();
                let (id, key, secret) = &o.pusher;
                let path = format!("/apps/{id}/events");
                let query = pusher_query(key, secret, &path, body.as_bytes());
                (req.uri(format!("{path}?{query}")), body)
            }
        };
        let req = req
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        if self.closing || self.sender.is_closed() {
            match Publisher::connect(o).await {
                Ok(p) => {
                    let opened = self.opened + 1;
                    *self = p;
                    self.opened = opened;
                }
                Err(e) => {
                    live.error(e);
                    return false;
                }
            }
        }
        if let Err(e) = futures_util::future::poll_fn(|cx| self.sender.poll_ready(cx)).await {
            live.error(format!("publish: {e}"));
            return false;
        }
        match self.sender.send_request(req).await {
            Ok(resp) => {
                let status = resp.status();
                self.closing = resp
                    .headers()
                    .get(http::header::CONNECTION)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                if status.is_success() {
                    true
                } else {
                    let text = body
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default();
                    live.error(format!("publish {status}: {text:.100}"));
                    false
                }
            }
            Err(e) => {
                live.error(format!("publish: {e}"));
                false
            }
        }
    }
}

/// The Pusher HTTP API's signed query string: the parameters in order,
/// `auth_signature` = hex HMAC-SHA256(secret, "POST\nPATH\nPARAMS").
fn pusher_query(key: &str, secret: &str, path: &str, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    use md5::Digest;
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let md5 = hex(&md5::Md5::digest(body));
    let params = format!("auth_key={key}&auth_timestamp={ts}&auth_version=1.0&body_md5={md5}");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("POST\n{path}\n{params}").as_bytes());
    let sig = hex(&mac.finalize().into_bytes());
    format!("{params}&auth_signature={sig}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_found_plain_and_escaped() {
        let p = payload(7, 1024);
        assert!((1020..=1030).contains(&p.len()), "{}", p.len());
        let sent = number_after(&p, "sent_us").unwrap();
        let escaped = serde_json::to_string(&p).unwrap();
        assert_eq!(number_after(&escaped, "sent_us"), Some(sent));
        assert_eq!(number_after(&escaped, "\"seq"), Some(7));
        assert_eq!(
            number_after(&format!("42[\"bench\",{p}]"), "\"seq"),
            Some(7)
        );
        assert!(serde_json::from_str::<serde_json::Value>(&p).is_ok());
    }

    #[test]
    fn pusher_signature_matches_the_documented_example() {
        // https://pusher.com/docs/channels/library_auth_reference/rest-api/#worked-authentication-example
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"7ad3773142a6692b25b8").unwrap();
        mac.update(
            b"POST\n/apps/3/events\nauth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0&body_md5=ec365a775a4cd0599faeb73354201b6f",
        );
        assert_eq!(
            hex(&mac.finalize().into_bytes()),
            "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
    }
}
