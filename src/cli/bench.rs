//! `gale bench`: the scenarios' command-line options, and running them in
//! one process or spread over `--procs` worker processes.

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use tokio_util::sync::CancellationToken;

use super::EXIT_CONFIG;
use crate::bench::{self, Report, Target, procs::Pool};

/// Options every WebSocket scenario shares.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchCommon {
    /// Target, e.g. ws://127.0.0.1:8080/ws (only 127.0.0.0/8). Several,
    /// comma-separated, drive a cluster: connections are spread over them
    /// by worker process (at least one process per URL).
    pub url: String,
    /// Connections.
    #[arg(short = 'n', long, default_value_t = 100)]
    pub connections: usize,
    /// New connections per second while connecting.
    #[arg(long, default_value_t = 2_000)]
    pub connect_rate: u32,
    /// Spread connections over this many source addresses, 127.0.0.2
    /// onwards, so ephemeral ports do not run out (1: the OS picks). With
    /// --procs each worker gets its own block of this many.
    #[arg(long, default_value_t = 1)]
    pub sources: u8,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Spread the connections over this many worker processes, so one
    /// process's CPU and open-file limit do not cap the run.
    #[arg(long, default_value_t = 1)]
    pub procs: u8,
    /// The server's process id (same machine): its CPU use over the run
    /// is reported, per reply too; `connections` reads its memory from
    /// /proc/PID/status instead of gale's /metrics.json.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Over wss://, offer TLS 1.2 alone (the server's TLS 1.2 path).
    #[arg(long)]
    pub tls12: bool,
    /// Offer permessage-deflate (`--deflate` of connections and
    /// broadcast).
    #[arg(skip)]
    pub deflate: bool,
    /// Open SSE sessions instead of WebSockets (`--sse` of connections).
    #[arg(skip)]
    pub sse: bool,
    /// Internal: run as worker N of a multi-process run.
    #[arg(long, hide = true)]
    pub worker: Option<u8>,
}

impl BenchCommon {
    /// The target URLs, in order.
    pub fn urls(&self) -> Vec<&str> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }

    /// Every target URL, checked; at least one.
    fn targets(&self) -> Result<Vec<Target>, String> {
        let targets = self
            .urls()
            .iter()
            .map(|u| Target::new(u, self.sources).and_then(|t| t.with_tls12(self.tls12)))
            .collect::<Result<Vec<Target>, _>>()
            .map_err(|e| e.to_string())?;
        if targets.is_empty() {
            return Err("no target URL".into());
        }
        Ok(targets)
    }

    /// The arguments a worker gets: its URL, its share of connections and
    /// of the connect rate, and its index.
    fn worker_args(&self, w: usize) -> Vec<String> {
        let procs = usize::from(self.procs.max(1));
        let rate = (self.connect_rate / u32::from(self.procs.max(1))).max(1);
        let urls = self.urls();
        let mut args = vec![
            urls.get(w % urls.len().max(1))
                .copied()
                .unwrap_or_default()
                .to_owned(),
            "-n".into(),
            bench::procs::share(self.connections, procs, w).to_string(),
            "--connect-rate".into(),
            rate.to_string(),
            "--sources".into(),
            self.sources.to_string(),
            "--worker".into(),
            w.to_string(),
        ];
        if self.deflate {
            args.push("--deflate".into());
        }
        if self.sse {
            args.push("--sse".into());
        }
        if self.tls12 {
            args.push("--tls12".into());
        }
        args
    }
}

/// `--deflate`, for the scenarios that can compress.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct DeflateArg {
    /// Offer permessage-deflate and fail any connection the server does
    /// not agree to compress.
    #[arg(long)]
    pub deflate: bool,
}

/// `--sse`, for the scenario that can hold SSE sessions.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct SseArg {
    /// Open SSE sessions (GET /sse, the fallback transport) instead of
    /// WebSockets.
    #[arg(long)]
    pub sse: bool,
}

fn parse_json(text: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))
}

/// Options of `gale bench requests`.
#[derive(Debug, Clone, clap::Args)]
pub struct RequestsArgs {
    /// How long to send, in seconds.
    #[arg(short, long, default_value_t = 10)]
    duration: u64,
    /// Cities drawn from City0 … City{K-1}.
    #[arg(long, default_value_t = 1_000)]
    cities: usize,
    /// Requests outstanding per connection.
    #[arg(long, default_value_t = 1)]
    window: usize,
    /// Send JSON weather.get events instead of plain text.
    #[arg(long, conflicts_with = "echo")]
    events: bool,
    /// With --events: this event instead of weather.get, with data
    /// {"city": …} (e.g. one the server proxies to a backend).
    #[arg(
        long,
        default_value = "weather.get",
        requires = "events",
        value_name = "EVENT"
    )]
    event: String,
    /// With --events: this JSON as every event's data instead of
    /// {"city": …} (e.g. --event topic.subscribe --data '{"topic":"bench"}').
    #[arg(long, requires = "events", value_name = "JSON", value_parser = parse_json)]
    data: Option<serde_json::Value>,
    /// Send texts and expect them back unchanged: for echo servers
    /// (gale's /echo, or a peer crate's echo example).
    #[arg(long)]
    echo: bool,
    /// Seconds to wait for a reply before counting a timeout.
    #[arg(long, default_value_t = 10)]
    reply_timeout: u64,
    /// Requests each connection sends, then stops (0: until the
    /// duration ends). `--per-connection 1` is the seed's scenario:
    /// every user asks once.
    #[arg(long, default_value_t = 0)]
    per_connection: u64,
}

impl RequestsArgs {
    fn options(&self, common: &BenchCommon) -> bench::RequestsOptions {
        bench::RequestsOptions {
            connections: common.connections,
            duration: Duration::from_secs(self.duration),
            cities: self.cities,
            window: self.window,
            ask: match (self.events, self.echo) {
                (true, _) => bench::Ask::Event(self.event.clone(), self.data.clone()),
                (_, true) => bench::Ask::Echo,
                _ => bench::Ask::City,
            },
            connect_rate: common.connect_rate,
            reply_timeout: Duration::from_secs(self.reply_timeout),
            per_connection: self.per_connection,
            first_connection: common
                .worker
                .map_or(0, |w| usize::from(w) * common.connections),
        }
    }

    /// The same options, as a worker's arguments.
    fn worker_args(&self) -> Vec<String> {
        let mut a = vec![
            "-d".into(),
            self.duration.to_string(),
            "--cities".into(),
            self.cities.to_string(),
            "--window".into(),
            self.window.to_string(),
            "--reply-timeout".into(),
            self.reply_timeout.to_string(),
            "--per-connection".into(),
            self.per_connection.to_string(),
        ];
        if self.events {
            a.extend(["--events".into(), "--event".into(), self.event.clone()]);
            if let Some(data) = &self.data {
                a.extend(["--data".into(), data.to_string()]);
            }
        }
        if self.echo {
            a.push("--echo".into());
        }
        a
    }
}

/// Options of `gale bench broadcast`.
#[derive(Debug, Clone, clap::Args)]
pub struct BroadcastArgs {
    /// The topic.
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Messages to publish.
    #[arg(short, long, default_value_t = 100)]
    messages: u64,
    /// Bytes per pushed message.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Messages published per second (0: back to back).
    #[arg(long, default_value_t = 20)]
    rate: u32,
    /// The server's `[api]` key.
    #[arg(long, env = "GALE_API__KEY", hide_env_values = true)]
    api_key: String,
    /// Stop waiting when no delivery arrived for this long.
    #[arg(long, default_value_t = 3_000, value_name = "MS")]
    idle_ms: u64,
    /// Publish through this node (its ws:// URL) instead of the first
    /// target: with the subscribers on other nodes, a cross-node run.
    #[arg(long)]
    publish_url: Option<String>,
}

impl BroadcastArgs {
    fn options(&self, common: &BenchCommon) -> bench::broadcast::BroadcastOptions {
        bench::broadcast::BroadcastOptions {
            subscribers: common.connections,
            connect_rate: common.connect_rate,
            topic: self.topic.clone(),
            messages: self.messages,
            size: self.size,
            rate: self.rate,
            api_key: self.api_key.clone(),
            idle: Duration::from_millis(self.idle_ms),
            first_connection: 0,
        }
    }

    /// What a subscribing worker needs (it does not publish: no key).
    fn worker_args(&self) -> Vec<String> {
        vec![
            "--topic".into(),
            self.topic.clone(),
            "--messages".into(),
            self.messages.to_string(),
            "--idle-ms".into(),
            self.idle_ms.to_string(),
            "--api-key".into(),
            "-".into(),
        ]
    }
}

/// `gale bench` scenarios.
#[derive(Debug, Subcommand)]
pub enum BenchScenario {
    /// Weather requests in a closed loop; throughput and latency.
    Requests {
        /// Target and connections.
        #[command(flatten)]
        common: BenchCommon,
        /// What to send.
        #[command(flatten)]
        args: RequestsArgs,
    },
    /// Open connections and hold them; connect times and server memory.
    Connections {
        /// Target and connections.
        #[command(flatten)]
        common: BenchCommon,
        /// Compression.
        #[command(flatten)]
        deflate: DeflateArg,
        /// The fallback transport.
        #[command(flatten)]
        sse: SseArg,
        /// Seconds to hold the connections once open before weighing the
        /// server.
        #[arg(long, default_value_t = 5)]
        hold: u64,
    },
    /// N subscribers of one topic; a publisher sends M messages through
    /// gale's POST /api/publish; deliveries/s and publish-to-receive
    /// latency.
    Broadcast {
        /// Target and subscribers.
        #[command(flatten)]
        common: BenchCommon,
        /// Compression.
        #[command(flatten)]
        deflate: DeflateArg,
        /// What to publish.
        #[command(flatten)]
        args: BroadcastArgs,
    },
    /// N clients subscribe to a topic with history, drop, miss M
    /// publications, then all reconnect at once (each to another node,
    /// given several URLs) and recover them; time until all recovered,
    /// and Redis's load with --redis.
    Recovery {
        /// Target(s) and clients.
        #[command(flatten)]
        common: BenchCommon,
        /// The topic: the server must keep history for it, at least
        /// --missed publications ([topics."PATTERN"] history_size).
        #[arg(long, default_value = "bench:recovery")]
        topic: String,
        /// Publications sent while the clients are away.
        #[arg(short, long, default_value_t = 100)]
        missed: u64,
        /// Bytes per publication.
        #[arg(long, default_value_t = 200)]
        size: usize,
        /// The server's `[api]` key.
        #[arg(long, env = "GALE_API__KEY", hide_env_values = true)]
        api_key: String,
        /// The cluster's Redis (redis://…): its commands and CPU during
        /// the reconnect are reported.
        #[arg(long)]
        redis: Option<String>,
    },
    /// What clients see during a deploy: N subscribers of topics with
    /// history, a publication every --publish-every-ms, requests; at
    /// --event-at-s the --exec command runs (start `gale serve --takeover`,
    /// or SIGTERM a draining node). Closes, missed and repeated pushes,
    /// the longest pause between pushes, reply latency before, during and
    /// after, and how fast closed clients were back (each reconnects to
    /// the next URL after the delay its close suggests, and recovers).
    Deploy {
        /// Target(s) and clients (one process: --procs 1).
        #[command(flatten)]
        common: BenchCommon,
        /// Topics `deploy:0`…: the server must keep history for them
        /// ([topics."deploy:*"] history_size).
        #[arg(long, default_value_t = 10)]
        topics: usize,
        /// One publication every this many milliseconds, round the
        /// topics.
        #[arg(long, default_value_t = 10)]
        publish_every_ms: u64,
        /// Where publications go (http://HOST:PORT); default: the first
        /// URL's host.
        #[arg(long)]
        publish_to: Option<String>,
        /// The server's `[api]` key.
        #[arg(long, env = "GALE_API__KEY", hide_env_values = true)]
        api_key: String,
        /// Requests per second, all clients together.
        #[arg(long, default_value_t = 180)]
        requests_per_s: usize,
        /// Seconds to run once everyone subscribed.
        #[arg(short, long, default_value_t = 40)]
        duration: u64,
        /// When the event happens, in seconds from then.
        #[arg(long, default_value_t = 15)]
        event_at_s: u64,
        /// Seconds after the event that count as "during" (reply latency).
        #[arg(long, default_value_t = 10)]
        event_window_s: u64,
        /// The shell command that makes the event.
        #[arg(long)]
        exec: Option<String>,
    },
    /// Rows/s the request log's batched writers sustain into a database
    /// (the server's own pipeline, run in this process).
    Store {
        /// sqlite://FILE or postgres://USER@HOST/DB.
        #[arg(long, default_value = "sqlite://gale-bench.db")]
        url: String,
        /// Rows offered per second (0: keep the queue full).
        #[arg(long, default_value_t = 50_000)]
        rate: u32,
        /// How long to offer rows, in seconds.
        #[arg(short, long, default_value_t = 10)]
        duration: u64,
        /// Distinct client ids the rows come from (connections).
        #[arg(long, default_value_t = 1_000)]
        clients: usize,
        /// Writer tasks (store.workers).
        #[arg(long)]
        workers: Option<usize>,
        /// Rows per insert (store.batch_size).
        #[arg(long)]
        batch_size: Option<usize>,
        /// Queue bound (store.queue_size).
        #[arg(long)]
        queue_size: Option<usize>,
        /// Halfway through, import this many notes into the same database
        /// (as notes.import does) and report the request log's stall.
        #[arg(long, default_value_t = 0)]
        import: usize,
        /// A disk spill for rows the database cannot take (store.spill_dir;
        /// it must not be a running server's). Without it there is none:
        /// the run measures the database, and counts what it drops.
        #[arg(long, value_name = "DIR")]
        spill_dir: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The floor: a bare server that accepts `gale bench broadcast`'s
    /// subscribers and publishes and delivers each batch with one write
    /// per connection, nothing else. Its server CPU per delivery,
    /// measured beside gale's, is what the kernel alone costs.
    Floor {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:9095")]
        listen: std::net::SocketAddr,
        /// Publications arriving within this long of the first go out
        /// together (gale's `broadcast.batch_window_ms` under load).
        #[arg(long, default_value_t = 2, value_name = "MS")]
        window_ms: u64,
        /// Most publications in one batch (one write per connection).
        #[arg(long, default_value_t = 256)]
        max_batch: usize,
    },
    /// The fake weather API with the seed's 2 s latency.
    Upstream {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: String,
        /// Delay before every answer.
        #[arg(long, default_value_t = 2_000, value_name = "MS")]
        latency_ms: u64,
        /// Fraction of calls answered with HTTP 500 (0.0–1.0).
        #[arg(long, default_value_t = 0.0)]
        error_rate: f64,
    },
}

/// Ctrl-C cancels the returned token (workers get the signal too: same
/// process group).
fn stop_on_ctrl_c() -> CancellationToken {
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("stopping: reporting what was measured");
            token.cancel();
        }
    });
    stop
}

fn print(report: &Report, json: bool, worker: bool) {
    if worker {
        println!("{}", report.to_worker_json());
    } else if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
}

/// Runs a scenario.
pub(super) async fn run(mut scenario: BenchScenario) -> ExitCode {
    let common = match scenario {
        BenchScenario::Upstream {
            listen,
            latency_ms,
            error_rate,
        } => return super::fake_upstream(&listen, latency_ms, error_rate).await,
        BenchScenario::Floor {
            listen,
            window_ms,
            max_batch,
        } => {
            let listener = match tokio::net::TcpListener::bind(listen).await {
                Ok(l) => l,
                Err(e) => return fail(&format!("gale bench floor: {listen}: {e}")),
            };
            let bound = listener.local_addr().map_or(listen, |a| a);
            eprintln!("gale bench floor: listening on {bound}");
            let window = Duration::from_millis(window_ms);
            bench::floor::serve(listener, window, max_batch, stop_on_ctrl_c()).await;
            return ExitCode::SUCCESS;
        }
        BenchScenario::Store {
            url,
            rate,
            duration,
            clients,
            workers,
            batch_size,
            queue_size,
            import,
            spill_dir,
            json,
        } => {
            let mut cfg = crate::config::StoreConfig {
                url,
                spill_dir: spill_dir.unwrap_or_default(),
                ..Default::default()
            };
            cfg.workers = workers.unwrap_or(cfg.workers).max(1);
            cfg.batch_size = batch_size.unwrap_or(cfg.batch_size).max(1);
            cfg.queue_size = queue_size.unwrap_or(cfg.queue_size).max(1);
            let show = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
            let stop = stop_on_ctrl_c();
            let took = Duration::from_secs(duration);
            return match bench::store::store(&cfg, rate, clients, took, import, stop, show).await {
                Ok(report) => {
                    print(&report, json, false);
                    outcome(&report)
                }
                Err(e) => {
                    eprintln!("gale bench store: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
            };
        }
        BenchScenario::Deploy {
            common,
            topics,
            publish_every_ms,
            publish_to,
            api_key,
            requests_per_s,
            duration,
            event_at_s,
            event_window_s,
            exec,
        } => {
            let targets = match common.targets() {
                Ok(t) => t,
                Err(why) => return fail(&why),
            };
            if common.procs > 1 {
                return fail("deploy runs in one process");
            }
            // Small pushes to many connections: tungstenite's default read
            // buffer would make the generator the bottleneck.
            let targets: Vec<Target> = targets
                .into_iter()
                .map(|t| t.with_read_buffer(4096))
                .collect();
            let publish_to = publish_to.unwrap_or_else(|| format!("http://{}", targets[0].addr()));
            let o = bench::deploy::DeployOptions {
                targets,
                connections: common.connections,
                connect_rate: common.connect_rate,
                topics,
                publish_every: Duration::from_millis(publish_every_ms.max(1)),
                publish_to,
                api_key,
                requests_per_s,
                duration: Duration::from_secs(duration),
                event_at: Duration::from_secs(event_at_s),
                event_window: Duration::from_secs(event_window_s),
                exec,
                server_pid: common.server_pid,
            };
            return match bench::deploy::run(o, stop_on_ctrl_c()).await {
                Ok(report) => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&report).unwrap_or_default()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            };
        }
        BenchScenario::Recovery {
            common,
            topic,
            missed,
            size,
            api_key,
            redis,
        } => {
            let targets = match common.targets() {
                Ok(t) => t,
                Err(why) => return fail(&why),
            };
            if common.procs > 1 || common.deflate {
                return fail("recovery runs in one process, without --deflate");
            }
            let o = bench::recovery::RecoveryOptions {
                clients: common.connections,
                connect_rate: common.connect_rate,
                topic,
                missed,
                size,
                api_key,
                redis_url: redis,
            };
            let cpu_before = common.server_pid.and_then(bench::server_cpu);
            return match bench::recovery::recovery(targets, &o, stop_on_ctrl_c()).await {
                Ok(mut report) => {
                    if let Some(pid) = common.server_pid {
                        bench::add_server_cpu(&mut report, pid, cpu_before);
                    }
                    print(&report, common.json, false);
                    if report.errors().is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => fail(&e),
            };
        }
        BenchScenario::Requests { ref common, .. } => common.clone(),
        BenchScenario::Connections {
            ref mut common,
            deflate,
            sse,
            ..
        } => {
            common.deflate = deflate.deflate;
            common.sse = sse.sse;
            common.clone()
        }
        BenchScenario::Broadcast {
            ref mut common,
            deflate,
            ..
        } => {
            common.deflate = deflate.deflate;
            common.clone()
        }
    };
    let mut common = common;
    let urls = common.urls();
    let checked: Result<Vec<Target>, _> = urls
        .iter()
        .map(|u| Target::new(u, common.sources))
        .collect();
    let target = match checked.map(|t| t.into_iter().next()) {
        Ok(Some(t)) => match t.with_tls12(common.tls12) {
            Ok(t) => t.with_deflate(common.deflate).with_sse(common.sse),
            Err(e) => {
                eprintln!("gale bench: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        Ok(None) => {
            eprintln!("gale bench: no target URL");
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            eprintln!("gale bench: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if urls.len() > 1 && common.worker.is_none() {
        common.procs = common
            .procs
            .max(u8::try_from(urls.len()).unwrap_or(u8::MAX));
    }
    let publisher = match &scenario {
        BenchScenario::Broadcast { args, .. } => match args.publish_url.as_deref() {
            None => target.clone(),
            Some(u) => match Target::new(u, 1) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("gale bench: --publish-url {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            },
        },
        _ => target.clone(),
    };
    let stop = stop_on_ctrl_c();
    if common.procs > 1 && common.worker.is_none() {
        return run_procs(scenario, &common, target, publisher, &stop).await;
    }
    let worker = common.worker;
    let show =
        !common.json && worker.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let target = match worker {
        Some(index) => target.for_worker(index),
        None => target,
    };
    let cpu_before = common.server_pid.and_then(bench::server_cpu);
    let mut report = match scenario {
        BenchScenario::Requests { common, args } => {
            bench::requests(target, args.options(&common), stop, show).await
        }
        BenchScenario::Connections { common, hold, .. } => {
            let (n, rate, hold) = (
                common.connections,
                common.connect_rate,
                Duration::from_secs(hold),
            );
            if worker.is_some() {
                bench::connections::worker(target, n, rate, hold, stop).await
            } else {
                bench::connections::connections(
                    target,
                    n,
                    rate,
                    hold,
                    stop,
                    show,
                    common.server_pid,
                )
                .await
            }
        }
        BenchScenario::Broadcast { common, args, .. } => {
            let o = args.options(&common);
            let subs = bench::broadcast::subscribe(target, &o, &stop, show).await;
            let grace = Duration::from_secs(10);
            if worker.is_some() {
                bench::procs::worker_ready(subs.subscribed(), Duration::from_secs(600)).await;
                subs.drain(o.idle, grace).await
            } else {
                let subscribed = subs.subscribed();
                let server_cpu0 = common.server_pid.and_then(bench::server_cpu);
                let (published, mut report) = tokio::join!(
                    bench::broadcast::publish(&publisher, &o, &stop),
                    subs.drain(o.idle, grace)
                );
                let published = match published {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("gale bench: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                let last = report.extra_u64("last_delivery_us");
                bench::broadcast::finish(&mut report, &published, subscribed, last);
                if let Some(pid) = common.server_pid {
                    bench::add_server_cpu(&mut report, pid, server_cpu0);
                }
                report
            }
        }
        BenchScenario::Store { .. }
        | BenchScenario::Floor { .. }
        | BenchScenario::Upstream { .. }
        | BenchScenario::Deploy { .. }
        | BenchScenario::Recovery { .. } => {
            return ExitCode::SUCCESS; // run above
        }
    };
    if let (Some(pid), None) = (common.server_pid, worker) {
        bench::add_server_cpu(&mut report, pid, cpu_before);
    }
    print(&report, common.json, worker.is_some());
    if worker.is_some() {
        return ExitCode::SUCCESS; // its parent judges the merged run
    }
    outcome(&report)
}

/// Success, or the run's failure said in words and a non-zero exit.
fn outcome(report: &Report) -> ExitCode {
    match report.failure() {
        None => ExitCode::SUCCESS,
        Some(why) => {
            eprintln!("gale bench: the run failed: {why}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a scenario as `--procs` worker processes (this same binary) and
/// merges their reports, histograms included.
async fn run_procs(
    scenario: BenchScenario,
    common: &BenchCommon,
    target: Target,
    publisher: Target,
    stop: &CancellationToken,
) -> ExitCode {
    let procs = usize::from(common.procs);
    let cpu_before = common.server_pid.and_then(bench::server_cpu);
    let args = |w: usize, name: &str, extra: Vec<String>| {
        let mut a = vec!["bench".to_owned(), name.to_owned()];
        a.extend(common.worker_args(w));
        a.extend(extra);
        a
    };
    let (mut report, problems) = match scenario {
        BenchScenario::Requests { args: r, .. } => {
            let all = (0..procs)
                .map(|w| args(w, "requests", r.worker_args()))
                .collect();
            let pool = match Pool::spawn(all) {
                Ok(p) => p,
                Err(e) => return fail(&e),
            };
            eprintln!("gale bench: {procs} worker processes running");
            let (report, _, problems) = pool.finish("requests").await;
            (report, problems)
        }
        BenchScenario::Connections { hold, .. } => {
            let server_pid = common.server_pid;
            let before = bench::server_rss(server_pid, target.addr()).await;
            let all = (0..procs)
                .map(|w| args(w, "connections", vec!["--hold".into(), hold.to_string()]))
                .collect();
            let mut pool = match Pool::spawn(all) {
                Ok(p) => p,
                Err(e) => return fail(&e),
            };
            let held = pool.ready(stop).await;
            eprintln!("gale bench: {held} connections open in {procs} processes; holding {hold} s");
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(hold)) => {}
                () = stop.cancelled() => {}
            }
            let after = bench::server_rss(server_pid, target.addr()).await;
            let (mut report, _, problems) = pool.finish("connections").await;
            bench::connections::weigh(&mut report, before, after);
            (report, problems)
        }
        BenchScenario::Broadcast { args: b, .. } => {
            let all = (0..procs)
                .map(|w| args(w, "broadcast", b.worker_args()))
                .collect();
            let mut pool = match Pool::spawn(all) {
                Ok(p) => p,
                Err(e) => return fail(&e),
            };
            let subscribed = pool.ready(stop).await;
            eprintln!("gale bench: {subscribed} subscribers in {procs} processes; publishing");
            pool.release();
            let server_cpu0 = common.server_pid.and_then(bench::server_cpu);
            let o = b.options(common);
            let published = bench::broadcast::publish(&publisher, &o, stop).await;
            let (mut report, raw, problems) = pool.finish("broadcast").await;
            let published = match published {
                Ok(p) => p,
                Err(e) => return fail(&e),
            };
            let last = raw
                .iter()
                .filter_map(|v| v["last_delivery_us"].as_u64())
                .max()
                .unwrap_or(0);
            bench::broadcast::finish(&mut report, &published, subscribed, last);
            if let Some(pid) = common.server_pid {
                // Over the delivery phase only, like the deliveries/s.
                bench::add_server_cpu(&mut report, pid, server_cpu0);
            }
            (report, problems)
        }
        BenchScenario::Store { .. }
        | BenchScenario::Floor { .. }
        | BenchScenario::Upstream { .. }
        | BenchScenario::Deploy { .. }
        | BenchScenario::Recovery { .. } => {
            return fail("--procs applies to requests, connections and broadcast");
        }
    };
    for p in &problems {
        eprintln!("gale bench: {p}");
    }
    if let Some(pid) = common.server_pid {
        bench::add_server_cpu(&mut report, pid, cpu_before);
    }
    print(&report, common.json, false);
    if problems.is_empty() {
        outcome(&report)
    } else {
        ExitCode::FAILURE
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("gale bench: {message}");
    ExitCode::FAILURE
}
