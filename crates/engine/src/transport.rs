//! The byte stream a client connection runs on: plain TCP, or TLS over
//! TCP when `server.tls_cert` and `server.tls_key` are set.
//!
//! HTTP (hyper) uses it through `AsyncRead`/`AsyncWrite`. The WebSocket
//! socket uses the calls below, which keep plain TCP on its fast path:
//! it waits for readability before it takes a read buffer (an idle
//! connection holds none) and writes queued frames with one `writev`.
//! Over TLS (`tls::TlsStream`) the same holds: a read buffer only once
//! the socket is readable, and the frames of one write encrypted together
//! into one buffer, let go once it is written.
//!
//! A WebSocket on plain TCP holds its stream shared ([`Stream::Shared`]):
//! while the connection's own task writes nothing, its outbox lends the
//! stream to whoever pushes, who writes the push at once (`outbox`).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Most queued frames handed to one vectored write.
pub(crate) const MAX_SLICES: usize = 64;

/// A client connection's stream.
#[derive(Debug)]
pub(crate) enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// Plain TCP that others may write into while its owner does not: a
    /// WebSocket's, lent by its outbox when it is idle.
    Shared(Arc<TcpStream>),
    /// TLS, its handshake done. Boxed: rustls's connection state is large
    /// and a plain connection should not carry its size.
    Tls(Box<crate::tls::TlsStream>),
}

impl Stream {
    /// Reads what is available into `buf`, growing it by up to `chunk`
    /// bytes first; `Ok(0)` is the end of the stream. Over plain TCP the
    /// buffer grows only once the socket is readable.
    pub(crate) fn poll_read_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        chunk: usize,
    ) -> Poll<io::Result<usize>> {
        match self {
            Stream::Plain(s) => read_tcp(s, cx, buf, chunk),
            Stream::Shared(s) => read_tcp(s, cx, buf, chunk),
            Stream::Tls(s) => {
                // As over plain TCP: the buffer grows once there is
                // something to read.
                ready!(s.poll_readable(cx))?;
                let start = buf.len();
                buf.resize(start + chunk, 0);
                let mut read = ReadBuf::new(&mut buf[start..]);
                let polled = Pin::new(&mut **s).poll_read(cx, &mut read);
                let n = read.filled().len();
                buf.truncate(start + n);
                ready!(polled)?;
                Poll::Ready(Ok(n))
            }
        }
    }

    /// Writes from the front of `frames` (up to [`MAX_SLICES`] of them in
    /// one vectored write); returns how many bytes were taken.
    pub(crate) fn poll_write_frames<'a>(
        &mut self,
        cx: &mut Context<'_>,
        frames: impl Iterator<Item = &'a [u8]>,
    ) -> Poll<io::Result<usize>> {
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let mut n = 0;
        for (slot, frame) in slices.iter_mut().zip(frames) {
            *slot = IoSlice::new(frame);
            n += 1;
        }
        match self {
            Stream::Plain(s) => write_tcp(s, cx, &slices[..n]),
            Stream::Shared(s) => write_tcp(s, cx, &slices[..n]),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, &slices[..n]),
        }
    }

    /// Over TLS, whether the stream is lent to its outbox and the peer came
    /// to be owed an answer meanwhile (see `tls::TlsStream::owes_answer`).
    pub(crate) fn owes_answer(&self) -> bool {
        matches!(self, Stream::Tls(s) if s.owes_answer())
    }

    /// Pushes out what TLS holds back (nothing to do over plain TCP).
    pub(crate) fn poll_flush_buffered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(_) | Stream::Shared(_) => Poll::Ready(Ok(())),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }
}

/// Reads what is available on plain TCP into `buf`, growing it by up
/// to `chunk` bytes once the socket is readable.
fn read_tcp(
    s: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    chunk: usize,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(s.poll_read_ready(cx))?;
        if buf.capacity() - buf.len() < chunk {
            buf.reserve(chunk);
        }
        match s.try_read_buf(buf) {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// Writes `slices` on plain TCP, waiting for room.
fn write_tcp(
    s: &TcpStream,
    cx: &mut Context<'_>,
    slices: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    loop {
        match try_write(s, slices) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                ready!(s.poll_write_ready(cx))?;
            }
            other => return Poll::Ready(other),
        }
    }
}

/// Writes what of `slices` the socket takes now, without waiting:
/// `WouldBlock` when it takes nothing.
fn try_write(s: &TcpStream, slices: &[IoSlice<'_>]) -> io::Result<usize> {
    match slices {
        [] => Ok(0),
        // One frame (a reply): a plain write costs the kernel less than
        // a one-slice writev.
        [one] => s.try_write(one),
        _ => s.try_write_vectored(slices),
    }
}

/// Writes what of `slices` the socket takes now, straight through the
/// system call: for a stream lent to others while its own task waits
/// only to read. tokio's own `try_write` first reads the stream's
/// readiness, a cache line of each connection's that a loop over many
/// sockets misses every time; its task, which waits on that readiness,
/// writes with [`try_write`], which keeps it true.
pub(crate) fn send_now(s: &TcpStream, slices: &[IoSlice<'_>]) -> io::Result<usize> {
    let sock = socket2::SockRef::from(s);
    // A peer gone is an error to return, not a signal to the process
    // (whatever the program embedding the engine does with SIGPIPE).
    let flags = libc::MSG_NOSIGNAL;
    match slices {
        [] => Ok(0),
        [one] => sock.send_with_flags(one, flags),
        _ => sock.send_vectored_with_flags(slices, flags),
    }
}

/// As `AsyncRead` over a shared stream.
fn read_shared(s: &TcpStream, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
    loop {
        ready!(s.poll_read_ready(cx))?;
        match s.try_read(buf.initialize_unfilled()) {
            Ok(n) => {
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Shared(s) => read_shared(s, cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Shared(s) => write_tcp(s, cx, &[IoSlice::new(buf)]),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Shared(_) => Poll::Ready(Ok(())),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Shared(s) => {
                Poll::Ready(socket2::SockRef::from(&**s).shutdown(std::net::Shutdown::Write))
            }
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Shared(s) => write_tcp(s, cx, bufs),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Shared(_) => true,
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// A connected pair on 127.0.0.1, the server's end first, for tests of
/// what is written into a socket.
#[cfg(test)]
pub(crate) async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (server, _) = accepted.expect("accept");
    (server, client.expect("connect"))
}
