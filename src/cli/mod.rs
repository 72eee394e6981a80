//! The `gale` command line: `serve`, `client`, `token`, `bench` and
//! `fake-upstream`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

mod bench;

pub use bench::{BenchCommon, BenchScenario};

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
    #[command(after_help = CONFIG_HELP)]
    Serve {
        /// A TOML config file; every key is optional. Without it,
        /// ./gale.toml is read when it exists.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Listen address, overriding server.listen.
        #[arg(long, value_name = "HOST:PORT", conflicts_with = "takeover")]
        listen: Option<String>,
        /// Take over from the gale running with the same
        /// server.handoff_socket: its listening socket and every live
        /// WebSocket connection move to this process without a reconnect,
        /// and it exits (docs/operations.md).
        #[arg(long, conflicts_with = "takeover_if_running")]
        takeover: bool,
        /// As --takeover when a gale answers on server.handoff_socket;
        /// otherwise start as usual (one unit file for the first start and
        /// every upgrade).
        #[arg(long)]
        takeover_if_running: bool,
    },
    /// Talk to a WebSocket server: interactive, or once with --send.
    Client {
        /// e.g. ws://127.0.0.1:8080/ws
        url: String,
        /// Send this message, print the reply and exit (0 = success).
        #[arg(long, value_name = "MESSAGE", conflicts_with_all = ["call", "publish"])]
        send: Option<String>,
        /// Call this event with --data (a local event or one the server
        /// proxies to the application's backend), print the reply and
        /// exit (0 = success).
        #[arg(long, value_name = "EVENT", conflicts_with = "publish")]
        call: Option<String>,
        /// Publish --data to this topic (topic.publish; the topic's
        /// `publish` setting decides who may), print the reply and exit.
        #[arg(long, value_name = "TOPIC")]
        publish: Option<String>,
        /// The JSON data of --call or --publish.
        #[arg(long, value_name = "JSON", default_value = "{}")]
        data: String,
        /// How long to wait for a reply (with --send), or for the replies
        /// still due at the end of input.
        #[arg(long, default_value_t = 10_000, value_name = "MS")]
        timeout_ms: u64,
        /// A JWT, sent as `Authorization: Bearer …` (or put `?token=…` in
        /// the URL). `GALE_TOKEN` sets it too.
        #[arg(long, env = "GALE_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Print a JWT the server accepts, for a first try without writing
    /// code: signed with the server's auth.jwt_secret (from --config,
    /// ./gale.toml or GALE_AUTH__JWT_SECRET, as serve reads it), with its
    /// audience and issuer when it checks them.
    #[command(after_help = CONFIG_HELP)]
    Token {
        /// The user id (the token's `sub`).
        #[arg(long)]
        sub: String,
        /// Roles, comma-separated (e.g. admin,editor).
        #[arg(long, value_delimiter = ',', value_name = "ROLE,…")]
        roles: Vec<String>,
        /// A subscription token for this topic instead (the `token` of
        /// topic.subscribe on a `subscribe = "token"` topic), for the
        /// user --sub ("" for an anonymous connection).
        #[arg(long, value_name = "TOPIC")]
        topic: Option<String>,
        /// How long it is valid: e.g. 90s, 15m, 1h, 7d.
        #[arg(long, default_value = "1h", value_name = "DURATION")]
        ttl: String,
        /// The server's TOML config file. Without it, ./gale.toml is read
        /// when it exists.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
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

/// Where settings come from, for `--help`.
const CONFIG_HELP: &str = "Settings come from, each over the one before: embedded defaults; \
the file given with --config, or ./gale.toml when it exists; environment variables \
GALE_<SECTION>__<KEY> (two underscores), e.g. GALE_SERVER__LISTEN=0.0.0.0:8080, \
GALE_AUTH__JWT_SECRET=…, GALE_WEATHER__BASE_URL=http://127.0.0.1:9090 (WEATHER_API_KEY \
is read as weather.api_key); then --listen. Every key: docs/configuration.md and \
gale.example.toml.";

/// Parses the command line, runs the command, and returns the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Client { .. } => "warn",
        _ => "info",
    };
    init_tracing(default_level);
    if matches!(cli.command, Command::Serve { .. } | Command::Bench { .. }) {
        open_files();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gale: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli.command))
}

/// A server and a load generator hold a socket per connection: raise the
/// soft limit on open files to the hard one (often 1,024 against 524,288),
/// as a user would with `ulimit -n`.
fn open_files() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(open_files = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
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
        Command::Serve {
            config,
            listen,
            takeover,
            takeover_if_running,
        } => {
            let takeover = match (takeover, takeover_if_running) {
                (true, _) => Takeover::Required,
                (_, true) => Takeover::IfRunning,
                _ => Takeover::No,
            };
            serve(config, listen, takeover).await
        }
        Command::Client {
            url,
            send,
            call,
            publish,
            data,
            timeout_ms,
            token,
        } if send.is_some() || call.is_some() || publish.is_some() => {
            let message = match one_message(send, call, publish, &data) {
                Ok(message) => message,
                Err(e) => {
                    eprintln!("gale client: {e}");
                    return ExitCode::FAILURE;
                }
            };
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
        Command::Token {
            sub,
            roles,
            topic,
            ttl,
            config,
        } => token(&sub, &roles, topic.as_deref(), &ttl, config),
        Command::Bench { scenario } => bench::run(scenario).await,
    }
}

/// The one message `gale client` sends: --send as given, or the event of
/// --call / --publish carrying --data.
fn one_message(
    send: Option<String>,
    call: Option<String>,
    publish: Option<String>,
    data: &str,
) -> Result<String, String> {
    if let Some(message) = send {
        return Ok(message);
    }
    let data: serde_json::Value =
        serde_json::from_str(data).map_err(|e| format!("--data is not JSON: {e}"))?;
    let (event, data) = match (call, publish) {
        (Some(event), _) => (event, data),
        (None, Some(topic)) => (
            "topic.publish".to_owned(),
            serde_json::json!({"topic": topic, "data": data}),
        ),
        (None, None) => return Err("nothing to send".to_owned()),
    };
    Ok(serde_json::json!({"event": event, "data": data, "ref": "1"}).to_string())
}

/// The config file to read: the one given, else ./gale.toml when it
/// exists (as Centrifugo reads its file from the working directory).
fn config_file(given: Option<PathBuf>) -> Option<PathBuf> {
    given.or_else(|| {
        let here = PathBuf::from("gale.toml");
        here.is_file().then_some(here)
    })
}

/// The configuration from `given` (or ./gale.toml) and the environment.
fn load_config(given: Option<PathBuf>) -> Result<(Config, Option<PathBuf>), ExitCode> {
    let file = config_file(given);
    match Config::load(file.as_deref()) {
        Ok(c) => Ok((c, file)),
        Err(e) => {
            eprintln!("gale: {e}");
            Err(ExitCode::from(EXIT_CONFIG))
        }
    }
}

fn token(
    sub: &str,
    roles: &[String],
    topic: Option<&str>,
    ttl: &str,
    config: Option<PathBuf>,
) -> ExitCode {
    let Some(ttl) = parse_duration(ttl) else {
        eprintln!("gale token: --ttl {ttl:?} is not a duration like 90s, 15m, 1h or 7d");
        return ExitCode::from(EXIT_CONFIG);
    };
    let (config, _) = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match crate::identity::issue(&config.auth, sub, roles, topic, ttl) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gale token: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `90s`, `15m`, `1h`, `7d`, or a number of seconds.
fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (n, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = n.parse().ok()?;
    let secs = match unit.trim() {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3_600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    (secs > 0).then(|| Duration::from_secs(secs))
}

/// Whether `gale serve` takes over from a running gale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Takeover {
    No,
    /// `--takeover`: it must.
    Required,
    /// `--takeover-if-running`: when one answers.
    IfRunning,
}

async fn serve(file: Option<PathBuf>, listen: Option<String>, takeover: Takeover) -> ExitCode {
    let (mut config, file) = match load_config(file) {
        Ok(c) => c,
        Err(code) => return code,
    };

    if let Some(listen) = listen {
        config.server.listen = listen;
    }
    // A new process that would fail to start must not take the
    // connections over: what can be checked is, before asking.
    if takeover != Takeover::No
        && let Err(e) = gale_engine::server::preflight(&config.engine)
    {
        eprintln!("gale: {e} (nothing was taken over; the running gale serves on)");
        return ExitCode::from(EXIT_CONFIG);
    }
    let taken = match takeover {
        Takeover::No => None,
        _ => match gale_engine::handoff::take_over(&config).await {
            Ok(inherited) => Some(inherited),
            Err(gale_engine::handoff::HandoffError::Unreachable { path, .. })
                if takeover == Takeover::IfRunning =>
            {
                tracing::info!(%path, "no gale running to take over from: starting");
                None
            }
            Err(e) => {
                eprintln!("gale: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let door = match taken {
        Some(inherited) => crate::server::Door::TakenOver(inherited),
        None => match crate::server::bind(&config.server.listen).await {
            Ok(l) => crate::server::Door::Bound(l),
            Err(e) => {
                eprintln!("gale: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    // Said once the server is sure to start: a refusal stays one line.
    match &file {
        Some(path) => tracing::info!(
            file = %path.display(),
            "configuration: {} and GALE_* variables over the defaults",
            path.display()
        ),
        None => tracing::info!(
            "configuration: embedded defaults and GALE_* variables (no --config, no ./gale.toml)"
        ),
    }
    let shutdown = CancellationToken::new();
    crate::shutdown::cancel_on_signal(shutdown.clone());
    match crate::server::run_on(door, config, shutdown).await {
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

pub(crate) async fn fake_upstream(listen: &str, latency_ms: u64, error_rate: f64) -> ExitCode {
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
