//! The shipped server: the engine ([`gale_engine::server`]) with the
//! weather and notes applications installed, the request log they write
//! to, and the live page at `/`. Tests and the binary start it the same
//! way ([`start`] on a bound listener; tests bind port 0).

use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use gale_engine::server::{App, Builder, Running, ServerError, bind};

use crate::config::Config;

/// Starts the shipped server on `listener`; it runs until `shutdown` is
/// cancelled.
///
/// # Errors
/// [`ServerError`] when a setting is refused, the store or the weather
/// client cannot start, or cluster mode cannot.
pub async fn start(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<Running, ServerError> {
    builder(config).await?.start(listener, shutdown).await
}

/// Runs the shipped server on `listener` until `shutdown` is cancelled,
/// then shuts down cleanly. Returns once the request log is drained.
///
/// # Errors
/// As [`start`]; and [`ServerError::Application`] when the shutdown
/// loses request-log rows.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    start(listener, config, shutdown).await?.wait().await
}

/// Where the server takes its clients from.
#[derive(Debug)]
pub enum Door {
    /// A listener bound here.
    Bound(TcpListener),
    /// What a takeover handed over: the old process's listener and its
    /// live connections.
    TakenOver(gale_engine::handoff::Inherited),
}

/// As [`run`], on a bound listener or on what a takeover handed over.
///
/// # Errors
/// As [`run`].
pub async fn run_on(
    door: Door,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    if let (Door::TakenOver(from), false) = (&door, config.store.spill_dir.is_empty()) {
        // The old process lets go of the request log's spill directory as
        // it exits, moments after handing over; the connections handed
        // over wait (open, not read) until this process serves them.
        let dir = std::path::Path::new(&config.store.spill_dir);
        if !gale_store::spill::wait_until_free(dir, config.server.shutdown_grace()).await {
            tracing::warn!(
                pid = from.pid,
                "the old process still holds store.spill_dir; starting anyway"
            );
        }
    }
    let builder = builder(config).await?;
    let running = match door {
        Door::Bound(listener) => builder.start(listener, shutdown).await?,
        Door::TakenOver(inherited) => builder.start_taken_over(inherited, shutdown).await?,
    };
    running.wait().await
}

/// The engine with the shipped applications installed, ready to start.
///
/// # Errors
/// As [`start`].
pub async fn builder(config: Config) -> Result<Builder, ServerError> {
    let Config {
        engine,
        weather,
        store,
    } = config;
    let mut builder = Builder::new(engine).await?;
    if builder.cluster().is_some() && store.url.starts_with("sqlite:") {
        tracing::info!(
            store = %store.url,
            "cluster mode with SQLite: this node keeps its own notes and request log; \
             give every node the cluster's PostgreSQL (store.url) for shared ones"
        );
    }
    let metrics = gale_store::StoreMetrics::register(builder.metrics());
    let (db, log, writers) = gale_store::start(&store, metrics)
        .await
        .map_err(ServerError::application)?;
    gale_weather::WeatherApp::install(&mut builder, &weather, log)
        .map_err(ServerError::application)?;
    gale_notes::install(builder.registry(), db);
    builder.routes(axum::Router::new().route("/", get(index)));
    // Once every connection is closed: the rows of answered requests are
    // written before the process exits.
    builder.on_shutdown(move |left| async move {
        match writers.drain(left).await {
            Ok(()) => {
                tracing::info!("request log drained");
                Ok(())
            }
            Err(lost) => {
                tracing::error!(rows_lost = lost, "request log not drained in time");
                Err(gale_store::RowsLost(lost))
            }
        }
    });
    Ok(builder)
}

/// The live page: embedded in the binary, no build step, no CDN.
async fn index() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("../static/index.html"))
}
