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

use std::io::{self, IoSlice};
use std::pin::Pin;
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
            Stream::Plain(s) => loop {
                ready!(s.poll_read_ready(cx))?;
                if buf.capacity() - buf.len() < chunk {
                    buf.reserve(chunk);
                }
                match s.try_read_buf(buf) {
                    Ok(n) => return Poll::Ready(Ok(n)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            },
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
            Stream::Plain(s) => loop {
                let wrote = match n {
                    0 => Ok(0),
                    // One frame (a reply): a plain write costs the kernel
                    // less than a one-slice writev.
                    1 => s.try_write(&slices[0]),
                    _ => s.try_write_vectored(&slices[..n]),
                };
                match wrote {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        ready!(s.poll_write_ready(cx))?;
                    }
                    other => return Poll::Ready(other),
                }
            },
            Stream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, &slices[..n]),
        }
    }

    /// Pushes out what TLS holds back (nothing to do over plain TCP).
    pub(crate) fn poll_flush_buffered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(_) => Poll::Ready(Ok(())),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
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
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
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
            Stream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}
