//! The `gale` command line: `serve`, `client` and `fake-upstream`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// Exit code for a configuration the server cannot start with.
pub const EXIT_CONFIG: u8 = 2;

/// gale: a real-time WebSocket server.
#[derive(Debug, Parser)]
#[command(name = "gale", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (embedded defaults; see docs/configuration.md).
    Serve {
        /// A TOML config file; every key is optional.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Listen address, overriding server.listen.
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<String>,
    },
    /// Talk to a WebSocket server: interactive, or once with --send.
    Client {
        /// e.g. ws://127.0.0.1:8080/ws
        url: String,
        /// Send this message, print the reply and exit (0 = success).
        #[arg(long, value_name = "MESSAGE")]
        send: Option<String>,
        /// How long to wait for a reply (with --send), or for the replies
        /// still due at the end of input.
        #[arg(long, default_value_t = 10_000, value_name = "MS")]
        timeout_ms: u64,
        /// A JWT, sent as `Authorization: Bearer …` (or put `?token=…` in
        /// the URL). `GALE_TOKEN` sets it too.
        #[arg(long, env = "GALE_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Load scenarios against a WebSocket URL on this machine.
    Bench {
        /// The scenario.
        #[command(subcommand)]
        scenario: BenchScenario,
    },
    /// Run a fake weather API (OpenWeatherMap and Open-Meteo JSON) on
    /// 127.0.0.1 for offline demos and tests.
    FakeUpstream {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: String,
        /// Delay before every answer.
        #[arg(long, default_value_t = 0, value_name = "MS")]
        latency_ms: u64,
        /// Fraction of calls answered with HTTP 500 (0.0–1.0).
        #[arg(long, default_value_t = 0.0)]
        error_rate: f64,
    },
}

/// Options every bench scenario shares.
#[derive(Debug, clap::Args)]
pub struct BenchCommon {
    /// Target, e.g. ws://127.0.0.1:8080/ws (only 127.0.0.0/8).
    pub url: String,
    /// Connections.
    #[arg(short = 'n', long, default_value_t = 100)]
    pub connections: usize,
    /// New connections per second while connecting.
    #[arg(long, default_value_t = 2_000)]
    pub connect_rate: u32,
    /// Spread connections over this many source addresses, 127.0.0.2
    /// onwards, so ephemeral ports do not run out (1: the OS picks).
    #[arg(long, default_value_t = 1)]
    pub sources: u8,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Spread the connections over this many worker processes (requests
    /// scenario), so one process's CPU and open-file limit do not cap the
    /// run; each worker gets its own block of source addresses.
    #[arg(long, default_value_t = 1)]
    pub procs: u8,
    /// Internal: run as worker N of a multi-process run.
    #[arg(long, hide = true)]
    pub worker: Option<u8>,
}

/// `gale bench` scenarios.
#[derive(Debug, Subcommand)]
pub enum BenchScenario {
    /// Weather requests in a closed loop; throughput and latency.
    Requests {
        /// Target and connections.
        #[command(flatten)]
        common: BenchCommon,
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
        #[arg(long)]
        events: bool,
        /// Seconds to wait for a reply before counting a timeout.
        #[arg(long, default_value_t = 10)]
        reply_timeout: u64,
        /// Requests each connection sends, then stops (0: until the
        /// duration ends). `--per-connection 1` is the seed's scenario:
        /// every user asks once.
        #[arg(long, default_value_t = 0)]
        per_connection: u64,
    },
    /// Open connections and hold them; connect times and server memory.
    Connections {
        /// Target and connections.
        #[command(flatten)]
        common: BenchCommon,
        /// Seconds to hold the connections once open.
        #[arg(long, default_value_t = 5)]
        hold: u64,
        /// Read the server's memory from /proc/PID/status (default: gale's
        /// /metrics.json).
        #[arg(long)]
        server_pid: Option<u32>,
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

/// Parses the command line, runs the command, and returns the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Client { .. } => "warn",
        _ => "info",
    };
    init_tracing(default_level);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gale: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli.command))
}

fn init_tracing(default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

async fn run(command: Command) -> ExitCode {
    match command {
        Command::Serve { config, listen } => serve(config, listen).await,
        Command::Client {
            url,
            send: Some(message),
            timeout_ms,
            token,
        } => {
            let timeout = Duration::from_millis(timeout_ms);
            match crate::client::send_once(&url, token.as_deref(), &message, timeout).await {
                Ok(reply) => {
                    println!("{reply}");
                    ExitCode::SUCCESS
                }
                Err(crate::client::ClientError::ErrorReply(reply)) => {
                    println!("{reply}");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("gale client: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Client {
            url,
            timeout_ms,
            token,
            ..
        } => match crate::client::interactive(
            &url,
            token.as_deref(),
            Duration::from_millis(timeout_ms),
        )
        .await
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gale client: {e}");
                ExitCode::FAILURE
            }
        },
        Command::FakeUpstream {
            listen,
            latency_ms,
            error_rate,
        } => fake_upstream(&listen, latency_ms, error_rate).await,
        Command::Bench { scenario } => bench(scenario).await,
    }
}

async fn serve(file: Option<PathBuf>, listen: Option<String>) -> ExitCode {
    let mut config = match Config::load(file.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gale: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(listen) = listen {
        config.server.listen = listen;
    }
    let listener = match crate::server::bind(&config.server.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("gale: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let shutdown = CancellationToken::new();
    crate::shutdown::cancel_on_signal(shutdown.clone());
    match crate::server::run(listener, config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ crate::server::ServerError::Config(_)) => {
            eprintln!("gale: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("gale: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn fake_upstream(listen: &str, latency_ms: u64, error_rate: f64) -> ExitCode {
    let fake = match crate::fake_upstream::FakeUpstream::start(listen).await {
        Ok(f) => f,
        Err(e) => {
            eprintln!("gale fake-upstream: cannot listen on {listen}: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    fake.set_latency(Duration::from_millis(latency_ms));
    fake.set_error_rate(error_rate);
    eprintln!(
        "fake weather API at {} (OpenWeatherMap: /data/2.5/weather, Open-Meteo: /v1/search + /v1/forecast); Ctrl-C stops it",
        fake.url()
    );
    let _ = tokio::signal::ctrl_c().await;
    fake.stop();
    eprintln!("answered {} calls", fake.calls());
    ExitCode::SUCCESS
}

async fn bench(scenario: BenchScenario) -> ExitCode {
    use crate::bench;
    let common = match &scenario {
        BenchScenario::Requests { common, .. } | BenchScenario::Connections { common, .. } => {
            common
        }
        BenchScenario::Upstream {
            listen,
            latency_ms,
            error_rate,
        } => return fake_upstream(listen, *latency_ms, *error_rate).await,
    };
    let target = match bench::Target::new(&common.url, common.sources) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("gale bench: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("stopping: reporting what was measured");
                stop.cancel();
            }
        });
    }
    let show = !common.json
        && common.worker.is_none()
        && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let json = common.json;
    let worker = common.worker;
    let target = match worker {
        Some(index) => target.for_worker(index),
        None => target,
    };
    if common.procs > 1 && worker.is_none() {
        return match scenario {
            BenchScenario::Requests { .. } => bench_procs(&scenario, json).await,
            _ => {
                eprintln!("gale bench: --procs applies to the requests scenario (so far)");
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    let report = match scenario {
        BenchScenario::Requests {
            common,
            duration,
            cities,
            window,
            events,
            reply_timeout,
            per_connection,
        } => {
            let options = bench::RequestsOptions {
                connections: common.connections,
                duration: Duration::from_secs(duration),
                cities,
                window,
                events,
                connect_rate: common.connect_rate,
                reply_timeout: Duration::from_secs(reply_timeout),
                per_connection,
                first_connection: worker.map_or(0, |w| usize::from(w) * common.connections),
            };
            bench::requests(target, options, stop, show).await
        }
        BenchScenario::Connections {
            common,
            hold,
            server_pid,
        } => {
            bench::connections(
                target,
                common.connections,
                common.connect_rate,
                Duration::from_secs(hold),
                stop,
                show,
                server_pid,
            )
            .await
        }
        // Served above.
        BenchScenario::Upstream { .. } => return ExitCode::SUCCESS,
    };
    if worker.is_some() {
        println!("{}", report.to_worker_json());
    } else if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    ExitCode::SUCCESS
}

/// Runs `requests` as `procs` worker processes (this same binary) and
/// merges their reports, histograms included.
async fn bench_procs(scenario: &BenchScenario, json: bool) -> ExitCode {
    let BenchScenario::Requests {
        common,
        duration,
        cities,
        window,
        events,
        reply_timeout,
        per_connection,
    } = scenario
    else {
        return ExitCode::from(EXIT_CONFIG);
    };
    let Ok(exe) = std::env::current_exe() else {
        eprintln!("gale bench: cannot find this program to start workers");
        return ExitCode::FAILURE;
    };
    let procs = usize::from(common.procs);
    let cpu0 = crate::bench::process_cpu();
    let mut children = Vec::with_capacity(procs);
    for w in 0..procs {
        // Connections split as evenly as they go.
        let share = common.connections / procs + usize::from(w < common.connections % procs);
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args(["bench", "requests", &common.url])
            .args(["-n", &share.to_string()])
            .args(["-d", &duration.to_string()])
            .args(["--cities", &cities.to_string()])
            .args(["--window", &window.to_string()])
            .args(["--reply-timeout", &reply_timeout.to_string()])
            .args(["--per-connection", &per_connection.to_string()])
            .args([
                "--connect-rate",
                &(common.connect_rate / u32::from(common.procs))
                    .max(1)
                    .to_string(),
            ])
            .args(["--sources", &common.sources.to_string()])
            .args(["--worker", &w.to_string()])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        if *events {
            cmd.arg("--events");
        }
        match cmd.spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                eprintln!("gale bench: cannot start worker {w}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    eprintln!("gale bench: {procs} worker processes running");
    let mut total = crate::bench::Report::new("requests");
    let mut failed = false;
    for (w, child) in children.into_iter().enumerate() {
        // Ctrl-C reaches the workers too (same process group); each stops
        // and reports what it measured, so the parent just waits.
        let parsed = child
            .wait_with_output()
            .await
            .map_err(|e| e.to_string())
            .and_then(|o| {
                serde_json::from_slice::<serde_json::Value>(&o.stdout).map_err(|e| e.to_string())
            })
            .and_then(|v| total.absorb_worker_json(&v));
        if let Err(e) = parsed {
            eprintln!("gale bench: worker {w} gave no report: {e}");
            failed = true;
        }
    }
    total.add_cpu(crate::bench::process_cpu().saturating_sub(cpu0));
    if json {
        println!("{}", total.to_json());
    } else {
        print!("{}", total.to_table());
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
