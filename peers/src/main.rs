//! `gale-peers CRATE [ADDR]`: a bare WebSocket echo server built on CRATE
//! (`axum`, `fastwebsockets` or `tokio-websockets`), as each crate's own
//! example writes it, default settings. Every text or binary message is
//! sent back on the same connection. Listens on 127.0.0.1:9100 unless
//! ADDR is given.
//!
//! `gale-peers socketioxide [ADDR]`: a Socket.IO server on socketioxide
//! (room "bench", `POST /publish`), one of the servers gale is compared
//! with (scripts/peers.sh).
//!
//! `gale-peers client --proto gale|socketio|pusher|raw ...`: the benchmark
//! client that speaks each of those servers' protocols (see `client.rs`,
//! or `gale-peers client --help`).

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;

mod client;
mod socketio;

const USAGE: &str = "usage: gale-peers axum|fastwebsockets|tokio-websockets|socketioxide [ADDR]\n       gale-peers client --help";

fn main() {
    let mut args = std::env::args().skip(1);
    let which = args.next().unwrap_or_default();
    if which == "client" {
        std::process::exit(client::main(args.collect()));
    }
    let addr: SocketAddr = match args
        .next()
        .unwrap_or_else(|| "127.0.0.1:9100".into())
        .parse()
    {
        Ok(a) => a,
        Err(e) => {
            eprintln!("gale-peers: bad address: {e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(serve(which, addr));
}

async fn serve(which: String, addr: SocketAddr) {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("gale-peers: cannot listen on {addr}: {e}");
            std::process::exit(2);
        }
    };
    match which.as_str() {
        "axum" => eprintln!("{which} echo on ws://{addr}/"),
        "fastwebsockets" => eprintln!("{which} echo on ws://{addr}/"),
        "tokio-websockets" => eprintln!("{which} echo on ws://{addr}/"),
        "socketioxide" => {
            eprintln!("socketioxide on ws://{addr}/socket.io/, POST http://{addr}/publish")
        }
        _ => {}
    }
    match which.as_str() {
        "axum" => axum_echo(listener).await,
        "fastwebsockets" => fastwebsockets_echo(listener).await,
        "tokio-websockets" => tokio_websockets_echo(listener).await,
        "socketioxide" => socketio::serve(listener).await,
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    }
}

async fn axum_echo(listener: TcpListener) {
    use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
    async fn echo(mut socket: WebSocket) {
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Text(_) | Message::Binary(_))
                && socket.send(msg).await.is_err()
            {
                break;
            }
        }
    }
    let app = axum::Router::new().fallback(axum::routing::get(|ws: WebSocketUpgrade| async {
        ws.on_upgrade(echo)
    }));
    let _ = axum::serve(listener, app).await;
}

async fn fastwebsockets_echo(listener: TcpListener) {
    use fastwebsockets::{FragmentCollector, OpCode, WebSocketError};
    use http_body_util::Empty;
    use hyper::body::{Bytes, Incoming};
    use hyper::{Request, Response};

    async fn echo(fut: fastwebsockets::upgrade::UpgradeFut) -> Result<(), WebSocketError> {
        let mut ws = FragmentCollector::new(fut.await?);
        loop {
            let frame = ws.read_frame().await?;
            match frame.opcode {
                OpCode::Close => break,
                OpCode::Text | OpCode::Binary => ws.write_frame(frame).await?,
                _ => {}
            }
        }
        Ok(())
    }
    async fn upgrade(mut req: Request<Incoming>) -> Result<Response<Empty<Bytes>>, WebSocketError> {
        let (response, fut) = fastwebsockets::upgrade::upgrade(&mut req)?;
        tokio::spawn(async move {
            let _ = echo(fut).await;
        });
        Ok(response)
    }
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, hyper::service::service_fn(upgrade))
                .with_upgrades()
                .await;
        });
    }
}

async fn tokio_websockets_echo(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let Ok((_request, mut ws)) =
                tokio_websockets::ServerBuilder::new().accept(stream).await
            else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                    break;
                }
            }
        });
    }
}
