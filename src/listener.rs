//! The front door: accepting TCP connections and serving HTTP/1.1 on them
//! until each is upgraded to a WebSocket or closed.
//!
//! A connection permit is taken *before* `accept`, so the server never
//! holds more than `server.max_connections` sockets; further clients wait
//! in the kernel's backlog. The permit lives in the accepted stream and is
//! released when the connection (upgraded or not) is dropped.
//!
//! A socket holds its permit only while it makes progress: the first
//! request head must arrive within `server.handshake_timeout_ms` of the
//! accept (a watchdog here: zero bytes, a partial head, a trickle), each
//! later one within the same time of the previous response on a
//! kept-alive connection (hyper's header timer), and request bodies are
//! read under the same deadline (by their handlers). A
//! WebSocket upgrade is complete once its 101 is written: hyper hands the
//! socket to the WebSocket task at once, whose own deadlines (pings, the
//! send timeout) apply from then on. Each connection closed this way is
//! counted in `gale_http_timeouts_total{stage}`, so a few thousand stalled
//! sockets cannot lock every user out.
//!
//! HTTP/1.1 only: hyper's HTTP/1 parser refuses an HTTP/2 preface. Its
//! connection state, with an 8 KiB read buffer, is built only once the
//! socket has something to read (the task first waits with `peek`): a
//! socket that has sent nothing costs 2.0 KiB rather than 10.2 KiB (2.8
//! under `axum::serve`), which was 13 MiB of peak RSS in the seed's
//! scenario (docs/benchmarks.md).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::ConnectInfo;
use axum::http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::{HttpStage, Metrics};
use crate::transport::Stream;

/// The listen backlog asked of the kernel (which caps it at
/// `net.core.somaxconn`, 4096 here). tokio's `TcpListener::bind` asks for
/// 128: a burst of connects past it (9,000 users arriving within a
/// second) has SYNs dropped, and each such client waits a second or more
/// for its retransmit.
pub const BACKLOG: u32 = 4096;

/// A listener on `addr` (the first address it resolves to) with a
/// [`BACKLOG`]-deep accept queue.
///
/// # Errors
/// When `addr` does not resolve or cannot be bound.
pub async fn bind(addr: &str) -> io::Result<TcpListener> {
    let at = tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "resolves to no address"))?;
    let socket = if at.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(at)?;
    socket.listen(BACKLOG)
}

/// What serving HTTP needs, shared by every connection.
#[derive(Debug, Clone)]
pub(crate) struct Front {
    /// The routes.
    pub(crate) router: axum::Router,
    /// `server.handshake_timeout_ms`.
    pub(crate) deadline: Duration,
    /// Counts what the deadline closes.
    pub(crate) metrics: Arc<Metrics>,
    /// `server.send_buffer_bytes`: the kernel send buffer of each accepted
    /// socket; 0 leaves the kernel to size it.
    pub(crate) send_buffer: usize,
    /// Serve TLS with this (`server.tls_cert`, `server.tls_key`).
    pub(crate) tls: Option<crate::tls::Tls>,
}

/// Accepts connections until `shutdown`, serving each on a task in
/// `conns`; at shutdown, each connection finishes the request it is
/// serving and closes (upgraded WebSockets are not its concern).
pub(crate) async fn serve(
    listener: TcpListener,
    max_connections: usize,
    front: Front,
    shutdown: CancellationToken,
    conns: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return, // never closed
            },
            () = shutdown.cancelled() => return,
        };
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        if front.send_buffer > 0
            && let Err(e) = socket2::SockRef::from(&stream).set_send_buffer_size(front.send_buffer)
        {
            tracing::debug!(error = %e, "cannot set SO_SNDBUF");
        }
        conns.spawn(connection(
            stream,
            permit,
            addr,
            front.clone(),
            shutdown.clone(),
        ));
    }
}

/// An accept error: a peer that gave up before we accepted is nothing;
/// anything else (out of file descriptors) is logged and waited out.
async fn accept_error(e: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept failed; retrying in 100 ms");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Serves one connection under the handshake deadline.
async fn connection(
    tcp: TcpStream,
    permit: OwnedSemaphorePermit,
    addr: SocketAddr,
    front: Front,
    shutdown: CancellationToken,
) {
    let deadline = tokio::time::Instant::now() + front.deadline;
    // Nothing of hyper's until the client sends something.
    let mut byte = [0_u8; 1];
    tokio::select! {
        peeked = tokio::time::timeout_at(deadline, tcp.peek(&mut byte)) => match peeked {
            Ok(Ok(1..)) => {}
            Ok(_) => return, // closed, or an error: nothing to serve
            Err(_) => {
                front.metrics.http_timeout(HttpStage::Head).inc();
                tracing::debug!(%addr, "no request in time: closed");
                return;
            }
        },
        () = shutdown.cancelled() => return,
    }
    let stream = match &front.tls {
        None => Stream::Plain(tcp),
        Some(acceptor) => {
            let handshake = tokio::time::timeout_at(deadline, acceptor.accept(tcp));
            tokio::select! {
                done = handshake => match done {
                    Ok(Ok(tls)) => Stream::Tls(Box::new(tls)),
                    Ok(Err(e)) => {
                        front.metrics.tls_failures.inc();
                        tracing::debug!(%addr, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        front.metrics.http_timeout(HttpStage::Tls).inc();
                        tracing::debug!(%addr, "TLS handshake not finished in time: closed");
                        return;
                    }
                },
                () = shutdown.cancelled() => return,
            }
        }
    };
    let io = LimitedStream {
        stream,
        _permit: permit,
    };
    let served = Arc::new(AtomicBool::new(false));
    let abort = ConnAbort::default();
    let service = Service {
        router: front.router.clone(),
        addr,
        served: served.clone(),
        abort: abort.clone(),
    };
    let mut http = hyper::server::conn::http1::Builder::new();
    // Every head after the first: a kept-alive connection may not idle
    // past the deadline either. The first is held to the deadline from
    // the accept, below.
    http.timer(TokioTimer::new())
        .header_read_timeout(front.deadline);
    let mut conn = pin!(
        http.serve_connection(TokioIo::new(io), service)
            .with_upgrades()
    );
    let mut first = pin!(tokio::time::sleep_until(deadline));
    let (mut watching, mut stopping) = (true, false);
    loop {
        tokio::select! {
            ended = conn.as_mut() => return finished(ended, addr, &front.metrics),
            () = abort.0.cancelled() => {
                tracing::debug!(%addr, "connection ended by its handler");
                return;
            }
            () = &mut first, if watching => {
                watching = false;
                if !served.load(Ordering::Acquire) {
                    front.metrics.http_timeout(HttpStage::Head).inc();
                    tracing::debug!(%addr, "no request in time: closed");
                    return;
                }
            }
            () = shutdown.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

fn finished(ended: Result<(), hyper::Error>, addr: SocketAddr, metrics: &Metrics) {
    match ended {
        Ok(()) => {}
        Err(e) if e.is_timeout() => {
            metrics.http_timeout(HttpStage::Head).inc();
            tracing::debug!(%addr, "request head not received in time: closed");
        }
        Err(e) => tracing::debug!(%addr, error = %e, "HTTP connection error"),
    }
}

/// The routes as hyper sees them, for one connection: each request learns
/// the client's address, and the first one stops the watchdog.
#[derive(Clone)]
struct Service {
    router: axum::Router,
    addr: SocketAddr,
    served: Arc<AtomicBool>,
    abort: ConnAbort,
}

/// Ends the HTTP connection a request came on, from its handler's side:
/// the accept loop drops the connection (and the response in progress)
/// once it fires. Every request carries its connection's in its
/// extensions. An SSE session whose client stopped reading is ended this
/// way: hyper stops polling a response body whose socket is full, so the
/// body itself can never notice.
#[derive(Debug, Clone, Default)]
pub struct ConnAbort(pub tokio_util::sync::CancellationToken);

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = axum::routing::future::RouteFuture<Infallible>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        self.served.store(true, Ordering::Release);
        req.extensions_mut().insert(ConnectInfo(self.addr));
        req.extensions_mut().insert(self.abort.clone());
        tower_service::Service::call(&mut self.router.clone(), req)
    }
}

/// An accepted stream holding its connection permit.
pub(crate) struct LimitedStream {
    stream: Stream,
    _permit: OwnedSemaphorePermit,
}

impl LimitedStream {
    /// The stream and its permit, for a connection upgraded to WebSocket.
    pub(crate) fn into_parts(self) -> (Stream, OwnedSemaphorePermit) {
        (self.stream, self._permit)
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
