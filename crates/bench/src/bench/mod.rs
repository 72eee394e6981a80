//! `gale bench`: load scenarios against any WebSocket URL on this machine,
//! with latency percentiles from an HDR histogram, errors by kind, and the
//! generator's own CPU use printed beside the results, so it is plain when
//! the generator, not the server, is the bottleneck.
//!
//! Safety: targets must be on 127.0.0.0/8 (or `localhost`); every run is
//! bounded by a duration; Ctrl-C stops it and still prints what it
//! measured. Connections are spread over source addresses 127.0.0.2… so
//! ephemeral ports do not run out at tens of thousands of connections.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::net::TcpSocket;
use tokio_util::sync::CancellationToken;

pub mod broadcast;
pub mod connections;
pub mod deploy;
pub mod floor;
pub mod procs;
mod raw;
pub mod recovery;
pub mod requests;
pub mod store;

pub use requests::{Ask, RequestsOptions, requests};

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The URL is not a ws:// or wss:// URL on the loopback network.
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
    /// Offer permessage-deflate (and require it).
    deflate: bool,
    /// Open SSE sessions (`GET /sse`) instead of WebSockets.
    sse: bool,
    /// For `wss://`: one TLS client configuration for every connection
    /// (building one per connection, roots and all, made the generator
    /// the bottleneck).
    tls: Option<Arc<rustls::ClientConfig>>,
    /// tungstenite's read buffer per connection (its default, 128 KiB,
    /// is zeroed on every read: with many connections each receiving
    /// small messages often, the generator spends its time in memset).
    read_buffer: Option<usize>,
}

impl Target {
    /// Checks that `url` is `ws://` or `wss://` on 127.0.0.0/8 or
    /// localhost. Over `wss://` the server's certificate is checked against
    /// the system's roots (`SSL_CERT_FILE` adds one).
    ///
    /// # Errors
    /// [`BenchError::Target`] saying why the URL is refused.
    pub fn new(url: &str, sources: u8) -> Result<Target, BenchError> {
        let bad = |m: &str| BenchError::Target(format!("{url}: {m}"));
        let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        if !matches!(parsed.scheme(), "ws" | "wss") {
            return Err(bad("only ws:// and wss:// URLs"));
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
        let tls = if parsed.scheme() == "wss" {
            Some(Arc::new(
                tls_client(rustls::ALL_VERSIONS).map_err(|m| bad(&m))?,
            ))
        } else {
            None
        };
        Ok(Target {
            url: parsed,
            addr: SocketAddr::new(IpAddr::V4(ip), port),
            sources: sources.max(1),
            first_source: 0,
            deflate: false,
            sse: false,
            tls,
            read_buffer: None,
        })
    }

    /// The server's address, for reading its metrics.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's HTTP base: `http://ADDR`, or `https://HOST:PORT` for a
    /// `wss://` target (the name its certificate carries).
    pub fn http_base(&self) -> String {
        match (&self.tls, self.url.host_str()) {
            (Some(_), Some(host)) => format!("https://{host}:{}", self.addr.port()),
            _ => format!("http://{}", self.addr),
        }
    }

    /// The TLS client configuration of a `wss://` target.
    pub fn tls_config(&self) -> Option<&Arc<rustls::ClientConfig>> {
        self.tls.as_ref()
    }

    /// Connections that offer permessage-deflate and fail if the server
    /// does not agree.
    pub fn with_deflate(mut self, on: bool) -> Target {
        self.deflate = on;
        self
    }

    /// SSE sessions (`GET /sse`; over HTTPS for a `wss://` target)
    /// instead of WebSockets.
    pub fn with_sse(mut self, on: bool) -> Target {
        self.sse = on;
        self
    }

    /// Over `wss://`, connections that offer TLS 1.2 alone (a server's
    /// TLS 1.2 path; no effect on `ws://`).
    ///
    /// # Errors
    /// [`BenchError::Target`] when no trusted root certificate is found.
    pub fn with_tls12(mut self, on: bool) -> Result<Target, BenchError> {
        if on && self.tls.is_some() {
            let config = tls_client(&[&rustls::version::TLS12])
                .map_err(|m| BenchError::Target(format!("{}: {m}", self.url)))?;
            self.tls = Some(Arc::new(config));
        }
        Ok(self)
    }

    /// Connections with a tungstenite read buffer of `bytes`.
    pub fn with_read_buffer(mut self, bytes: usize) -> Target {
        self.read_buffer = Some(bytes);
        self
    }

    /// This target for worker `index` of a multi-process run: its own
    /// block of `sources` addresses.
    pub fn for_worker(mut self, index: u8) -> Target {
        self.first_source = index.saturating_mul(self.sources);
        self
    }

    /// Opens connection number `i` from source address 127.0.0.(2 + i mod
    /// sources), or from any address with one source.
    pub(crate) async fn connect(&self, i: usize) -> Result<Ws, String> {
        let stream = self.tcp(i).await?;
        // TLS for wss://, plain for ws://.
        let connector = self.tls.clone().map(tokio_tungstenite::Connector::Rustls);
        let config = self.read_buffer.map(|n| {
            tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(n)
        });
        let (ws, _) = tokio_tungstenite::client_async_tls_with_config(
            self.url.as_str(),
            stream,
            config,
            connector,
        )
        .await
        .map_err(handshake_error)?;
        Ok(ws)
    }

    /// As [`Target::connect`], compressed when the target says so.
    pub(crate) async fn connect_any(&self, i: usize) -> Result<raw::Conn, String> {
        if self.sse {
            let tcp = self.tcp(i).await?;
            // HTTPS for a wss:// target, plain HTTP for ws://.
            let stream = match (&self.tls, self.url.host_str()) {
                (Some(config), Some(host)) => {
                    let name = rustls_pki_types::ServerName::try_from(host.to_owned())
                        .map_err(|e| format!("TLS name: {e}"))?;
                    let tls = tokio_rustls::TlsConnector::from(config.clone())
                        .connect(name, tcp)
                        .await
                        .map_err(|e| format!("TLS handshake: {e}"))?;
                    tokio_tungstenite::MaybeTlsStream::Rustls(tls)
                }
                _ => tokio_tungstenite::MaybeTlsStream::Plain(tcp),
            };
            return Ok(raw::Conn::Sse(Box::new(
                raw::SseSession::open(stream, &self.url).await?,
            )));
        }
        if self.deflate {
            if self.url.scheme() == "wss" {
                return Err("--deflate speaks ws:// only".into());
            }
            let stream = self.tcp(i).await?;
            return Ok(raw::Conn::Deflate(Box::new(
                raw::Deflating::handshake(stream, &self.url).await?,
            )));
        }
        Ok(raw::Conn::Plain(Box::new(self.connect(i).await?)))
    }

    /// The TCP connection for connection number `i`.
    async fn tcp(&self, i: usize) -> Result<tokio::net::TcpStream, String> {
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
        Ok(stream)
    }
}

/// A TLS client offering `versions` and trusting the system's roots
/// (`SSL_CERT_FILE` and `SSL_CERT_DIR` honoured).
fn tls_client(
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<rustls::ClientConfig, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) =
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if added == 0 {
        return Err("no trusted root certificates found (set SSL_CERT_FILE)".into());
    }
    Ok(
        rustls::ClientConfig::builder_with_protocol_versions(versions)
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

pub(crate) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What a scenario measured.
#[derive(Debug)]
pub struct Report {
    pub(crate) scenario: &'static str,
    pub(crate) elapsed: Duration,
    pub(crate) connected: u64,
    pub(crate) connect_failed: u64,
    pub(crate) replies: u64,
    pub(crate) latency: Histogram<u64>,
    pub(crate) errors: BTreeMap<String, u64>,
    pub(crate) cpu: Duration,
    pub(crate) extra: Vec<(&'static str, Value)>,
}

impl Report {
    /// An empty report; worker reports are merged into one like it.
    pub fn new(scenario: &'static str) -> Report {
        Report::with_histogram(scenario, new_histogram())
    }

    fn with_histogram(scenario: &'static str, latency: Histogram<u64>) -> Report {
        Report {
            scenario,
            elapsed: Duration::ZERO,
            connected: 0,
            connect_failed: 0,
            replies: 0,
            latency,
            errors: BTreeMap::new(),
            cpu: Duration::ZERO,
            extra: Vec::new(),
        }
    }

    /// An empty report whose histogram starts tiny and grows with what is
    /// recorded: for per-connection reports that record nothing
    /// themselves.
    pub(crate) fn light(scenario: &'static str) -> Report {
        Report::with_histogram(scenario, Histogram::new(3).expect("valid precision"))
    }

    /// Errors by kind, as the report counts them.
    pub fn errors(&self) -> &BTreeMap<String, u64> {
        &self.errors
    }

    pub(crate) fn error(&mut self, kind: impl Into<String>) {
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
            "failure": self.failure(),
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

    /// A scenario-specific number in the report (0 when absent).
    pub fn extra_u64(&self, key: &str) -> u64 {
        self.extra
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.as_u64())
            .unwrap_or(0)
    }

    /// Adds CPU time (the parent's own, in a multi-process run).
    pub fn add_cpu(&mut self, cpu: Duration) {
        self.cpu += cpu;
    }

    /// The generator's CPU over the run, in percent of one core; none
    /// for a run too short to say (nothing was delivered, say).
    fn cpu_percent(&self) -> Option<f64> {
        let elapsed = self.elapsed.as_secs_f64();
        (elapsed >= 0.01).then(|| 100.0 * self.cpu.as_secs_f64() / elapsed)
    }

    /// Why the run failed, in words, when nothing it set out to do
    /// happened: no connection opened, no request answered, no push
    /// delivered. Partial failures are in the errors, not here.
    pub fn failure(&self) -> Option<String> {
        let top = self
            .errors
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(kind, n)| format!("{kind} ({n} times)"))
            .unwrap_or_else(|| "no error was reported".into());
        let why = if self.scenario != "store" && self.connected == 0 && self.connect_failed > 0 {
            format!("no connection could be opened: {top}")
        } else if self.replies == 0 && !self.errors.is_empty() {
            match self.scenario {
                "broadcast" => format!("nothing was delivered: {top}"),
                "store" => format!("no row was written: {top}"),
                "connections" | "recovery" => return None,
                _ => format!("every request failed: {top}"),
            }
        } else {
            return None;
        };
        Some(match hint(&self.errors) {
            Some(hint) => format!("{why}. {hint}"),
            None => why,
        })
    }

    /// A table for people.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let mut row = |k: &str, v: String| out.push_str(&format!("  {k:<26} {v}\n"));
        row("scenario", self.scenario.to_owned());
        row("elapsed", format!("{:.2} s", self.elapsed.as_secs_f64()));
        if self.scenario != "store" {
            row(
                "connections",
                format!("{} ok, {} failed", self.connected, self.connect_failed),
            );
        }
        match self.scenario {
            "requests" => row(
                "replies",
                format!("{} ({:.0}/s)", self.replies, self.rate()),
            ),
            "broadcast" => row(
                "deliveries",
                format!("{} ({:.0}/s)", self.replies, self.rate()),
            ),
            "store" => row(
                "rows written",
                format!("{} ({:.0}/s)", self.replies, self.rate()),
            ),
            _ => {}
        }
        if !self.latency.is_empty() {
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
        }
        for (k, v) in &self.extra {
            match v {
                Value::String(s) => row(k, s.clone()),
                v => row(k, v.to_string()),
            }
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
            match self.cpu_percent() {
                Some(pct) => format!("{pct:.0}% of one core"),
                None => "- (the run was too short to say)".into(),
            },
        );
        out
    }
}

/// A refused handshake in words, with the server's own explanation (the
/// body of its answer) when it gave one.
fn handshake_error(e: tokio_tungstenite::tungstenite::Error) -> String {
    match e {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .map(|b| b.trim().chars().take(200).collect::<String>())
                .unwrap_or_default();
            match body.is_empty() {
                true => format!("handshake: HTTP {}", response.status()),
                false => format!("handshake: HTTP {}: {body}", response.status()),
            }
        }
        e => format!("handshake: {e}"),
    }
}

/// A refused subscribe, as the error a run counts: the server's code and
/// message.
pub(crate) fn refusal(reply: &Value) -> String {
    let error = &reply["error"];
    format!(
        "subscribe refused: {}: {}",
        error["code"].as_str().unwrap_or("?"),
        error["message"].as_str().unwrap_or("")
    )
}

/// What a person can do about the errors a run met, when one of them says.
fn hint(errors: &BTreeMap<String, u64>) -> Option<&'static str> {
    let seen = |s: &str| errors.keys().any(|k| k.contains(s));
    if seen("publish 404") {
        Some(
            "The publish API is off: start the server with an [api] key \
             (GALE_API__KEY=…) and give gale bench the same key (--api-key or GALE_API__KEY)",
        )
    } else if seen("publish 401") {
        Some("The server refused the API key: give gale bench the key the server was started with")
    } else if seen("permission_denied") {
        Some(
            "The topic is closed to clients: start the server with a config that opens it, \
             like scripts/bench.toml ([topics.\"bench\"] subscribe = \"anyone\")",
        )
    } else if seen("Connection refused") || seen("connection refused") {
        Some("Nothing listens there: start the server first (cargo run --release -- serve)")
    } else {
        None
    }
}

pub(crate) fn new_histogram() -> Histogram<u64> {
    // 1 µs to 10 min at 3 significant digits: constant, valid bounds.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// CPU time (user + system) this process has used, from /proc.
pub fn process_cpu() -> Duration {
    cpu_of("self").unwrap_or(Duration::ZERO)
}

/// CPU time (user + system) process `pid` has used, when it can be read.
pub fn server_cpu(pid: u32) -> Option<Duration> {
    cpu_of(&pid.to_string())
}

fn cpu_of(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let total = ticks(11)? + ticks(12)?;
    Some(Duration::from_millis(total * 10)) // USER_HZ is 100 on Linux
}

/// Adds the server's CPU use over the run, given its CPU time at the
/// start: percent of one core, and microseconds per reply. A report that
/// already has them (a scenario that measured its own phase) keeps them.
pub fn add_server_cpu(r: &mut Report, pid: u32, before: Option<Duration>) {
    if r.extra.iter().any(|(k, _)| *k == "server_cpu_percent") {
        return;
    }
    let (Some(before), Some(after)) = (before, server_cpu(pid)) else {
        return;
    };
    let used = after.saturating_sub(before).as_secs_f64();
    let pct = 100.0 * used / r.elapsed.as_secs_f64().max(1e-9);
    r.extra
        .push(("server_cpu_percent", json!((pct * 10.0).round() / 10.0)));
    if r.replies > 0 {
        let per = 1e6 * used / r.replies as f64;
        r.extra.push((
            "server_cpu_us_per_reply",
            json!((per * 100.0).round() / 100.0),
        ));
    }
}

/// Starts `n` connection tasks at `rate` per second, or fewer if `stop`
/// fires first. Returns how many were started.
pub(crate) async fn ramp<F, Fut>(
    n: usize,
    rate: u32,
    stop: &CancellationToken,
    mut start: F,
) -> usize
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
pub(crate) struct Live {
    pub(crate) connected: AtomicU64,
    pub(crate) replies: AtomicU64,
}

pub(crate) fn progress(total_ms: u64, label: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total_ms);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} [{bar:30}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(label.to_owned());
    bar
}

pub(crate) fn merge(total: &mut Report, r: Report) {
    total.connected += r.connected;
    total.connect_failed += r.connect_failed;
    total.replies += r.replies;
    let _ = total.latency.add(&r.latency);
    for (k, n) in r.errors {
        *total.errors.entry(k).or_default() += n;
    }
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
    use std::time::Instant;

    #[test]
    fn only_loopback_ws_targets() {
        assert!(Target::new("ws://127.0.0.1:8080/ws", 1).is_ok());
        assert!(Target::new("ws://127.9.9.9:80/ws", 4).is_ok());
        assert!(Target::new("ws://localhost:8080/ws", 1).is_ok());
        assert!(Target::new("wss://localhost:8443/ws", 1).is_ok());
        for bad in [
            "ws://10.0.0.1/ws",
            "ws://192.168.1.1/ws",
            "ws://example.com/ws",
            "wss://example.com/ws",
            "wss://10.0.0.1/ws",
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
