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
