//! TLS served directly: when `server.tls_cert` and `server.tls_key` are
//! set, every connection is TLS (rustls, TLS 1.2 and 1.3, ALPN
//! `http/1.1`), so `wss://` and `https://` work without a proxy in front.
//!
//! The handshake runs on the connection's task, after the first bytes
//! arrive and under `server.handshake_timeout_ms` (a handshake past it is
//! closed and counted in `gale_http_timeouts_total{stage="Tls"}`); a
//! failed handshake (a plain-HTTP client, an unknown CA on the client's
//! side) is counted in `gale_tls_handshake_failures_total`.
//!
//! A connection runs on rustls's unbuffered API ([`TlsStream`]): gale
//! holds the bytes between the socket and rustls (received records,
//! decrypted data not yet read, encrypted data not yet written) and lets
//! each buffer go once it is empty, as it does for plain sockets. rustls's
//! buffered connection keeps a 4 KiB receive buffer, among others, for the
//! connection's whole life.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::ConfigError;

/// The server's TLS settings, loaded; cheap to clone.
#[derive(Clone)]
pub struct Tls(Arc<ServerConfig>);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls(rustls)")
    }
}

impl Tls {
    /// Runs the server side of the handshake on `tcp`.
    pub(crate) async fn accept(&self, tcp: TcpStream) -> io::Result<TlsStream> {
        let conn = UnbufferedServerConnection::new(self.0.clone()).map_err(invalid)?;
        let mut stream = TlsStream {
            tcp,
            conn,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            sent: 0,
            plain: Vec::new(),
            read_at: 0,
            eof: false,
            close: Close::Open,
        };
        std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
        Ok(stream)
    }
}

/// Builds the acceptor from PEM files: `cert` holds the certificate chain
/// (leaf first), `key` its private key (PKCS#8, PKCS#1 or SEC1).
///
/// # Errors
/// A [`ConfigError`] naming the setting whose file is missing, unreadable
/// or unusable, or a key that does not match the certificate.
pub fn acceptor(cert: &str, key: &str) -> Result<Tls, ConfigError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let chain = CertificateDer::pem_file_iter(Path::new(cert))
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ConfigError::invalid("server.tls_cert", format!("{cert}: {e}")))?;
    if chain.is_empty() {
        return Err(ConfigError::invalid(
            "server.tls_cert",
            format!("{cert}: no CERTIFICATE in the file"),
        ));
    }
    let key_der = PrivateKeyDer::from_pem_file(Path::new(key))
        .map_err(|e| ConfigError::invalid("server.tls_key", format!("{key}: {e}")))?;
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            ConfigError::invalid(
                "server.tls_key",
                format!("{key} does not go with {cert}: {e}"),
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Tls(Arc::new(config)))
}

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 4096;

/// Most TLS bytes held waiting for the rest of a record or a handshake
/// flight: a handshake message may be up to 64 KiB here (rustls's own
/// limit), a record 16 KiB and change.
const MAX_INCOMING: usize = 0x1_0000 + 2 * READ_CHUNK;

/// Most plaintext encrypted by one write.
const MAX_WRITE: usize = 64 * 1024;

/// Where our side of the connection is in closing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    Open,
    /// Our close_notify is to be queued.
    Asked,
    /// It is queued (or sent).
    Queued,
}

/// What rustls wants once what it holds is processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// More bytes from the peer (a handshake flight, or nothing yet).
    Read,
    /// Application data may be sent.
    Write,
    /// Both sides closed.
    Closed,
}

/// A TLS connection over TCP, its handshake done (see the module's doc).
pub(crate) struct TlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// TLS bytes received and not yet processed (part of a record).
    incoming: Vec<u8>,
    /// TLS bytes to send, from `sent` on.
    outgoing: Vec<u8>,
    sent: usize,
    /// Plaintext received and not yet read, from `read_at` on.
    plain: Vec<u8>,
    read_at: usize,
    /// The peer closed: its close_notify, or the end of the TCP stream.
    eof: bool,
    close: Close,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("incoming", &self.incoming.len())
            .field("outgoing", &(self.outgoing.len() - self.sent))
            .field("plain", &(self.plain.len() - self.read_at))
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

/// Appends what `fill` writes to `out`, growing it to the size `fill`
/// asks for when `guess` is too small.
fn append(
    out: &mut Vec<u8>,
    guess: usize,
    mut fill: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) -> io::Result<()> {
    let start = out.len();
    let mut room = guess;
    for _ in 0..3 {
        out.resize(start + room, 0);
        match fill(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(Some(needed)) if needed > room => room = needed,
            Err(_) => break,
        }
    }
    out.truncate(start);
    Err(invalid("a record could not be encoded"))
}

/// The room an encryption asked for, when too little was given.
fn needed(e: EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

impl TlsStream {
    /// Runs rustls on what it holds and what came in, until it needs the
    /// peer or may send; encrypts `data` (whole) once it may. Handshake
    /// records and encrypted data are queued in `outgoing`, in order;
    /// decrypted data in `plain`.
    fn process(&mut self, mut data: Option<&[u8]>) -> io::Result<Want> {
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let want = match state.map_err(invalid)? {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(invalid)?;
                        discard += record.discard;
                        self.plain.extend_from_slice(record.payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    append(&mut self.outgoing, 1024, |out| {
                        encode.encode(out).map_err(|e| match e {
                            EncodeError::InsufficientSize(s) => Some(s.required_size),
                            _ => None,
                        })
                    })?;
                    None
                }
                // Queued in `outgoing`, which goes out in order before
                // anything later.
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    None
                }
                ConnectionState::BlockedHandshake => Some(Want::Read),
                ConnectionState::PeerClosed => {
                    self.eof = true;
                    None
                }
                ConnectionState::Closed => {
                    self.eof = true;
                    Some(Want::Closed)
                }
                ConnectionState::WriteTraffic(mut traffic) => {
                    if let Some(data) = data.take().filter(|d| !d.is_empty()) {
                        let guess = data.len() + 64 * (data.len() / 16_384 + 1);
                        append(&mut self.outgoing, guess, |out| {
                            traffic.encrypt(data, out).map_err(needed)
                        })?;
                    }
                    if self.close == Close::Asked {
                        self.close = Close::Queued;
                        append(&mut self.outgoing, 64, |out| {
                            traffic.queue_close_notify(out).map_err(needed)
                        })?;
                    }
                    Some(Want::Write)
                }
                _ => return Err(invalid("early data is not accepted")),
            };
            if discard > 0 {
                self.incoming.drain(..discard);
            }
            if self.incoming.is_empty() && self.incoming.capacity() > 0 {
                self.incoming = Vec::new();
            }
            if let Some(want) = want {
                return Ok(want);
            }
        }
    }

    /// Writes what is queued; ready once all of it is written.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        if self.outgoing.capacity() > 0 {
            self.outgoing = Vec::new();
        }
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Reads what the socket has into `incoming` (growing it only once
    /// the socket is readable); `eof` at the stream's end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            let start = self.incoming.len();
            if start >= MAX_INCOMING {
                return Poll::Ready(Err(invalid("a record or handshake message too large")));
            }
            self.incoming.resize(start + READ_CHUNK, 0);
            let read = self.tcp.try_read(&mut self.incoming[start..]);
            self.incoming.truncate(start + *read.as_ref().unwrap_or(&0));
            if self.incoming.is_empty() && self.incoming.capacity() > 0 {
                self.incoming = Vec::new();
            }
            match read {
                Ok(0) => {
                    self.eof = true;
                    return Poll::Ready(Ok(()));
                }
                Ok(_) => return Poll::Ready(Ok(())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Drives the handshake to its end.
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let want = self.process(None)?;
            // Every flight goes out before the peer's answer is awaited.
            ready!(self.poll_send(cx))?;
            match want {
                Want::Write if !self.conn.is_handshaking() => return Poll::Ready(Ok(())),
                Want::Closed => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                _ if self.eof => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                _ => ready!(self.poll_fill(cx))?,
            }
        }
    }

    /// Ready when a read would find data (or the end) without waiting.
    pub(crate) fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.read_at < self.plain.len() || self.eof || !self.incoming.is_empty() {
            return Poll::Ready(Ok(()));
        }
        self.tcp.poll_read_ready(cx)
    }

    /// Encrypts `data` (up to [`MAX_WRITE`] of it) once what was queued
    /// before is written; returns how much was taken.
    fn poll_write_plain(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_send(cx))?;
        if self.close != Close::Open {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let data = &data[..data.len().min(MAX_WRITE)];
        match self.process(Some(data))? {
            Want::Write => {}
            Want::Read => return Poll::Ready(Err(invalid("write before the handshake's end"))),
            Want::Closed => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
        // Sent as far as the socket takes it now; the rest by the next
        // write or flush.
        if let Poll::Ready(Err(e)) = self.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(data.len()))
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.read_at < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.read_at);
                buf.put_slice(&this.plain[this.read_at..this.read_at + n]);
                this.read_at += n;
                if this.read_at == this.plain.len() {
                    this.plain = Vec::new();
                    this.read_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.process(None)? == Want::Closed {
                return Poll::Ready(Ok(()));
            }
            if this.read_at < this.plain.len() || this.eof {
                continue;
            }
            // What rustls answered (a key update, say) goes out; a socket
            // that takes nothing now does not stop the read.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            ready!(this.poll_fill(cx))?;
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_plain(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match bufs.iter().find(|b| !b.is_empty()) {
            None => Poll::Ready(Ok(0)),
            Some(first) if first.len() >= MAX_WRITE => this.poll_write_plain(cx, first),
            Some(_) => {
                // One record for many slices: gathered first.
                let mut gathered =
                    Vec::with_capacity(bufs.iter().map(|b| b.len()).sum::<usize>().min(MAX_WRITE));
                for b in bufs {
                    let room = MAX_WRITE - gathered.len();
                    gathered.extend_from_slice(&b[..b.len().min(room)]);
                    if gathered.len() == MAX_WRITE {
                        break;
                    }
                }
                this.poll_write_plain(cx, &gathered)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_send(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.close == Close::Open {
            this.close = Close::Asked;
            // A peer that already closed both ways leaves nothing to say.
            let _ = this.process(None)?;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}
