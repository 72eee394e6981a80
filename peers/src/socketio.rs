//! A Socket.IO server on socketioxide, as its README's axum example
//! writes it (`SocketIo::new_layer()`, default settings): every client
//! that connects to the default namespace joins the room "bench", and
//! `POST /publish` emits its body (JSON) to that room as the event
//! "bench". The emit encodes the packet once and queues it on every
//! socket of the room before the HTTP answer is sent; the sockets' own
//! tasks write it out after.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use socketioxide::SocketIo;
use socketioxide::extract::SocketRef;
use tokio::net::TcpListener;

/// Emits that could not reach every socket (a full per-socket buffer,
/// socketioxide's `max_buffer_size`): printed, so a run shows them.
static PARTIAL: AtomicU64 = AtomicU64::new(0);

pub(crate) async fn serve(listener: TcpListener) {
    let (layer, io) = SocketIo::new_layer();
    io.ns("/", async |socket: SocketRef| {
        socket.join("bench");
    });
    let app = axum::Router::new()
        .route("/publish", post(publish))
        .with_state(io)
        .layer(layer);
    let _ = axum::serve(listener, app).await;
}

async fn publish(State(io): State<SocketIo>, body: Bytes) -> StatusCode {
    let Ok(data) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    if let Err(e) = io.to("bench").emit("bench", &data).await {
        let n = PARTIAL.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            eprintln!("socketioxide: {n} emits did not reach every socket: {e}");
        }
    }
    StatusCode::NO_CONTENT
}
