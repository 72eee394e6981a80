//! The front door: accepting TCP connections and serving HTTP/1.1 on them
//! until each is upgraded to a WebSocket or closed.
//!
//! A connection permit is taken *before* `accept`, so the server never
//! holds more than `server.max_connections` sockets; further clients wait
//! in the kernel's backlog. The permit lives in the accepted stream and is
//! released when the connection (upgraded or not) is dropped.
//!
//! Every accepted connection also counts against its peer's address
//! (`server.max_connections_per_ip`, `admission`) until it
//! closes, upgraded or not; one past the limit is answered 503 and closed
//! at once, so one address cannot hold every permit. Connections from a
//! trusted proxy are counted at their handshake instead, against the
//! client the proxy names.
//!
//! A socket holds its permit only while it makes progress: the first
//! request head must arrive within `server.handshake_timeout_ms` of the
//! accept (a watchdog here: zero bytes, a partial head, a trickle), each
//! later one within the same time of the previous response on a
//! kept-alive connection (hyper's header timer), and every request body
//! within the same time of its head (`body::Deadline`, on every
//! route). A
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
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::ConnectInfo;
use axum::http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1::UpgradeableConnection;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{Admission, Admitted};
use crate::identity::Cidr;
use crate::metrics::{HttpStage, Metrics};
use crate::transport::Stream;

/// Refused connections being answered 503 at once (each for at most a
/// second, reading what the client sends so it sees the answer); past
/// this many they are closed without one.
const MAX_REFUSING: usize = 256;

/// How long a connection accepted just before the door closed has to
/// send its request.
const LAST_REQUEST: Duration = Duration::from_secs(1);

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
    /// Counts every connection against its address.
    pub(crate) admission: Arc<Admission>,
    /// `server.trusted_proxies`: their connections count at the handshake.
    pub(crate) proxies: Arc<[Cidr]>,
}

/// Accepts connections until `stop` (a draining server accepts on, so
/// `/healthz` can say it drains), serving each on a task in `conns`; at
/// `stop`, each connection finishes the request it is serving and closes
/// (upgraded WebSockets are not its concern). `permits` bound the
/// connections held, taken-over ones included.
pub(crate) async fn serve(
    listener: TcpListener,
    permits: Arc<Semaphore>,
    front: Front,
    stop: CancellationToken,
    conns: TaskTracker,
) {
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return, // never closed
            },
            () = stop.cancelled() => return,
        };
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        if front.send_buffer > 0
            && let Err(e) = socket2::SockRef::from(&stream).set_send_buffer_size(front.send_buffer)
        {
            tracing::debug!(error = %e, "cannot set SO_SNDBUF");
        }
        let ip = addr.ip().to_canonical();
        let counted = if front.proxies.iter().any(|c| c.contains(ip)) {
            None
        } else {
            match front.admission.connect(crate::identity::rate_key(ip)) {
                Ok(admitted) => Some(admitted),
                Err(refused) => {
                    drop(permit);
                    tracing::debug!(%addr, "connection refused: connections per address");
                    refuse(stream, &refused.to_string(), front.tls.is_some(), &refusing);
                    continue;
                }
            }
        };
        conns.spawn(connection(
            stream,
            permit,
            counted,
            addr,
            front.clone(),
            stop.clone(),
        ));
    }
}

/// Answers a connection refused at the accept with 503 and closes it.
/// The answer is written at once; the socket then lingers (at most a
/// second, up to [`MAX_REFUSING`] at a time) reading what the client
/// sends, since closing with unread bytes would reset the connection and
/// could discard the answer before the client reads it. Over TLS, or
/// with too many lingering, it is closed at once.
fn refuse(stream: TcpStream, why: &str, tls: bool, refusing: &Arc<Semaphore>) {
    if tls {
        return;
    }
    let Ok(slot) = refusing.clone().try_acquire_owned() else {
        return;
    };
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{why}\n",
        why.len() + 1
    );
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _slot = slot;
        let mut stream = stream;
        let linger = async {
            stream.write_all(answer.as_bytes()).await?;
            stream.shutdown().await?;
            let mut sink = [0_u8; 4096];
            let mut read = 0;
            while read < 65_536 {
                match stream.read(&mut sink).await? {
                    0 => break,
                    n => read += n,
                }
            }
            Ok::<(), io::Error>(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), linger).await;
    });
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
    counted: Option<Admitted>,
    addr: SocketAddr,
    front: Front,
    shutdown: CancellationToken,
) {
    let mut deadline = tokio::time::Instant::now() + front.deadline;
    // Nothing of hyper's until the client sends something. A connection
    // accepted just before the door closed still has its request served
    // (its client sent it to a server that accepted it), if it comes
    // within a moment.
    let mut byte = [0_u8; 1];
    let peeked = {
        let peek = tokio::time::timeout_at(deadline, tcp.peek(&mut byte));
        tokio::pin!(peek);
        tokio::select! {
            peeked = &mut peek => peeked,
            () = shutdown.cancelled() => {
                deadline = deadline.min(tokio::time::Instant::now() + LAST_REQUEST);
                tokio::time::timeout_at(deadline, &mut peek).await.unwrap_or(Ok(Ok(0)))
            }
        }
    };
    match peeked {
        Ok(Ok(1..)) => {}
        Ok(_) => return, // closed, or an error: nothing to serve
        Err(_) => {
            front.metrics.http_timeout(HttpStage::Head).inc();
            tracing::debug!(%addr, "no request in time: closed");
            return;
        }
    }
    let stream = match &front.tls {
        None => Stream::Plain(tcp),
        Some(acceptor) => {
            // Boxed: the handshake's state is larger than the rest of the
            // task, and would make every connection's task as large while
            // it waits for its request (a task is its largest state).
            let handshake = Box::pin(tokio::time::timeout_at(deadline, acceptor.accept(tcp)));
            tokio::select! {
                done = handshake => match done {
                    Ok(Ok(tls)) => {
                        front.metrics.tls_handshake(tls.version()).inc();
                        Stream::Tls(Box::new(tls))
                    }
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
    let is_counted = counted.is_some();
    let abort = ConnAbort::default();
    let io = LimitedStream {
        stream,
        _permit: permit,
        counted,
        detach: abort.detach.clone(),
    };
    let served = Arc::new(AtomicBool::new(false));
    let service = Service {
        router: front.router.clone(),
        addr,
        served: served.clone(),
        abort: abort.clone(),
        counted: is_counted,
        deadline: front.deadline,
        metrics: front.metrics.clone(),
    };
    let mut conn = {
        // Dropped once the connection is built, not kept in the task.
        let mut http = hyper::server::conn::http1::Builder::new();
        // Every head after the first: a kept-alive connection may not idle
        // past the deadline either. The first is held to the deadline from
        // the accept, below.
        http.timer(TokioTimer::new())
            .header_read_timeout(front.deadline);
        http.serve_connection(TokioIo::new(io), service)
            .with_upgrades()
    };
    let mut first = pin!(tokio::time::sleep_until(deadline));
    let (mut watching, mut stopping) = (true, false);
    loop {
        tokio::select! {
            ended = &mut conn => return finished(ended, addr, &front.metrics),
            () = abort.token.cancelled() => {
                if let Some(carry) = abort.detach.take() {
                    // Boxed, as the TLS handshake: only a connection
                    // leaving hyper pays for this state.
                    Box::pin(detach(conn, &abort.detach, carry, front.deadline, addr)).await;
                } else {
                    tracing::debug!(%addr, "connection ended by its handler");
                }
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
                // Once its first request is read: hyper closes an idle
                // connection at once, and this one has a request coming.
                while !served.load(Ordering::Acquire) && !first.is_elapsed() {
                    tokio::select! {
                        ended = &mut conn => return finished(ended, addr, &front.metrics),
                        () = tokio::time::sleep(Duration::from_millis(5)) => {}
                    }
                }
                stopping = true;
                Pin::new(&mut conn).graceful_shutdown();
            }
        }
    }
}

/// Takes a connection from hyper once its response head is out (hyper
/// flushes the socket only when its own buffer is empty), and hands it to
/// `carry`. A head not written within `deadline` (a client that reads
/// nothing) ends the connection.
async fn detach(
    mut conn: UpgradeableConnection<TokioIo<LimitedStream>, Service>,
    detach: &Detach,
    carry: Carry,
    deadline: Duration,
    addr: SocketAddr,
) {
    let written = tokio::time::timeout(
        deadline,
        std::future::poll_fn(|cx| {
            if detach.flushed() {
                return Poll::Ready(true);
            }
            match Pin::new(&mut conn).poll(cx) {
                // The connection ended (the client went) before.
                Poll::Ready(_) => Poll::Ready(false),
                Poll::Pending if detach.flushed() => Poll::Ready(true),
                Poll::Pending => Poll::Pending,
            }
        }),
    )
    .await;
    if written != Ok(true) {
        tracing::debug!(%addr, "response head not written in time: closed");
        return;
    }
    let Some(parts) = conn.into_parts() else {
        return;
    };
    let (stream, permit, counted) = parts.io.into_inner().into_parts();
    carry(Detached {
        stream,
        permit,
        counted,
    });
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
    /// The connection is counted against the peer's address already.
    counted: bool,
    /// `server.handshake_timeout_ms`: each request's body arrives within
    /// it.
    deadline: Duration,
    metrics: Arc<Metrics>,
}

/// In a request's extensions when its connection is counted against its
/// peer's address already (`Admission::connect`): a handshake on it
/// does not count it again.
#[derive(Debug, Clone, Copy)]
pub struct Counted;

/// Ends the HTTP connection a request came on, or takes it from hyper,
/// from its handler's side: the accept loop acts once `token` fires.
/// Every request carries its connection's in its extensions.
///
/// A handler that streams for a connection's whole life (an SSE session)
/// takes the connection over with [`ConnAbort::detach`]: hyper writes the
/// response head, then gives the socket up, and its buffers (an 8 KiB read
/// buffer and its write buffer) go with it, as at a WebSocket upgrade.
#[derive(Clone, Default)]
pub struct ConnAbort {
    /// Cancelled to drop the connection (or detach it, when a handler
    /// asked to).
    pub token: tokio_util::sync::CancellationToken,
    detach: Arc<Detach>,
}

impl std::fmt::Debug for ConnAbort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnAbort")
            .field("cancelled", &self.token.is_cancelled())
            .finish_non_exhaustive()
    }
}

/// A connection taken from hyper after its response head.
pub(crate) struct Detached {
    /// The socket, the head written.
    pub(crate) stream: Stream,
    /// Its place under `server.max_connections`.
    pub(crate) permit: OwnedSemaphorePermit,
    /// Its count against its peer's address, when counted at the accept.
    pub(crate) counted: Option<Admitted>,
}

/// What carries a detached connection on.
type Carry = Box<dyn FnOnce(Detached) + Send>;

/// A handler's request to take its connection over, and the socket's
/// flush count that tells when hyper has written the head.
#[derive(Default)]
struct Detach {
    carry: std::sync::Mutex<Option<Carry>>,
    /// Flushes of the socket when the request was made.
    asked_at: AtomicU64,
    /// Flushes of the socket that completed. hyper flushes the socket
    /// only once its own write buffer is empty.
    flushes: AtomicU64,
}

impl Detach {
    fn take(&self) -> Option<Carry> {
        self.carry.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Whether the socket was flushed since the request.
    fn flushed(&self) -> bool {
        self.flushes.load(Ordering::Acquire) > self.asked_at.load(Ordering::Acquire)
    }
}

impl ConnAbort {
    /// Takes the connection from hyper once it has written the response
    /// head (the response's body is never polled again; make it one that
    /// stays pending), and runs `carry` with it. If the connection ends
    /// first, `carry` is dropped unrun.
    pub(crate) fn detach(&self, carry: impl FnOnce(Detached) + Send + 'static) {
        *self.detach.carry.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(carry));
        self.detach.asked_at.store(
            self.detach.flushes.load(Ordering::Acquire),
            Ordering::Release,
        );
        self.token.cancel();
    }
}

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = axum::routing::future::RouteFuture<Infallible>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.served.store(true, Ordering::Release);
        let deadline = tokio::time::Instant::now() + self.deadline;
        let metrics = self.metrics.clone();
        let mut req = req.map(|b| Body::new(crate::body::Deadline::new(b, deadline, metrics)));
        req.extensions_mut().insert(ConnectInfo(self.addr));
        req.extensions_mut().insert(self.abort.clone());
        if self.counted {
            req.extensions_mut().insert(Counted);
        }
        tower_service::Service::call(&mut self.router.clone(), req)
    }
}

/// An accepted stream holding its connection permit and its count
/// against its address.
pub(crate) struct LimitedStream {
    stream: Stream,
    _permit: OwnedSemaphorePermit,
    counted: Option<Admitted>,
    /// Counts the flushes a detach waits for.
    detach: Arc<Detach>,
}

impl LimitedStream {
    /// The stream, its permit and its count, for a connection upgraded to
    /// WebSocket.
    pub(crate) fn into_parts(self) -> (Stream, OwnedSemaphorePermit, Option<Admitted>) {
        (self.stream, self._permit, self.counted)
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
        let flushed = Pin::new(&mut self.stream).poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            self.detach.flushes.fetch_add(1, Ordering::AcqRel);
        }
        flushed
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
