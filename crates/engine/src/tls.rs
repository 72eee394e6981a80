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
//! The handshake runs on rustls's unbuffered API ([`TlsStream`]): gale
//! holds the bytes between the socket and rustls (received records,
//! decrypted data not yet read, encrypted data not yet written) and lets
//! each buffer go once it is empty, as it does for plain sockets. rustls's
//! buffered connection keeps a 4 KiB receive buffer, among others, for the
//! connection's whole life.
//!
//! Once the handshake is done, gale seals and opens the records itself
//! with the keys rustls derived (`records`), TLS 1.3 and 1.2 alike, and
//! keeps nothing of rustls: an idle connection holds neither rustls's
//! connection object nor expanded cipher state. For TLS 1.3's key
//! updates gale keeps the two application traffic secrets, which rustls
//! hands it in the handshake through its key log ([`SecretCatcher`]).
//!
//! While a WebSocket's task writes nothing, its outbox may hold the
//! socket and the record layer ([`TlsStream::lendable`]): whoever pushes
//! then seals and writes ([`seal_lent`]), as on plain TCP, and the
//! stream's own side seals nothing until it has them back
//! ([`TlsStream::taken_back`]), so every record goes out in the order
//! it was sealed.

use std::cell::RefCell;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

use crate::config::ConfigError;
use crate::metrics::TlsVersion;

mod records;

pub(crate) use records::Records;

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
            tcp: Arc::new(tcp),
            lent: false,
            owed: false,
            session: Session::Rustls(Box::new(Handshake {
                conn,
                caught: Caught::default(),
            })),
            incoming: Vec::new(),
            shown: 0,
            outgoing: Vec::new(),
            sent: 0,
            plain: Vec::new(),
            read_at: 0,
            eof: false,
            close: Close::Open,
        };
        std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
        stream.take_over()?;
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
    // For gale's own record layer (`records`): the keys, and TLS 1.3's
    // traffic secrets for its key updates.
    config.enable_secret_extraction = true;
    config.key_log = Arc::new(SecretCatcher);
    Ok(Tls(Arc::new(config)))
}

/// rustls's key-log labels of TLS 1.3's first application traffic
/// secrets.
const CLIENT_TRAFFIC_SECRET: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_TRAFFIC_SECRET: &str = "SERVER_TRAFFIC_SECRET_0";

/// A handshake's TLS 1.3 application traffic secrets, as rustls logged
/// them.
#[derive(Default)]
struct Caught {
    client: Zeroizing<Vec<u8>>,
    server: Zeroizing<Vec<u8>>,
}

thread_local! {
    /// The secrets rustls logs while a handshake runs on this thread
    /// (set around each call into rustls, which logs inside it).
    static CATCHING: RefCell<Option<Caught>> = const { RefCell::new(None) };
}

/// rustls's key log, turned to hand a connection its own TLS 1.3 traffic
/// secrets: rustls logs them inside the call that runs the handshake, on
/// the connection's thread, where [`Handshake::process`] waits for them.
/// Nothing is written anywhere.
#[derive(Debug)]
struct SecretCatcher;

impl rustls::KeyLog for SecretCatcher {
    fn will_log(&self, label: &str) -> bool {
        label == CLIENT_TRAFFIC_SECRET || label == SERVER_TRAFFIC_SECRET
    }

    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        CATCHING.with_borrow_mut(|caught| {
            let Some(caught) = caught else { return };
            let slot = match label {
                CLIENT_TRAFFIC_SECRET => &mut caught.client,
                SERVER_TRAFFIC_SECRET => &mut caught.server,
                _ => return,
            };
            *slot = Zeroizing::new(secret.to_vec());
        });
    }
}

/// A connection's handshake: rustls's side, and the secrets it logged.
struct Handshake {
    conn: UnbufferedServerConnection,
    caught: Caught,
}

impl Handshake {
    /// Runs rustls on `incoming`, catching the secrets it logs.
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, rustls::server::ServerConnectionData> {
        let Handshake { conn, caught } = self;
        CATCHING.set(Some(std::mem::take(caught)));
        let status = conn.process_tls_records(incoming);
        *caught = CATCHING.take().unwrap_or_default();
        status
    }
}

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 4096;

/// Most TLS bytes held waiting for the rest of a record or a handshake
/// flight: a handshake message may be up to 64 KiB here (rustls's own
/// limit), a record 16 KiB and change.
const MAX_INCOMING: usize = 0x1_0000 + 2 * READ_CHUNK;

/// Most plaintext encrypted by one write.
const MAX_WRITE: usize = 64 * 1024;

/// Most plaintext a push into a lent stream is sealed from (see
/// [`seal_lent`]): what the socket does not take of it is held until the
/// connection's task writes it, outside the queue's bound, as a write of
/// the task's own would be. A larger push is queued for the task.
pub(crate) const MAX_LENT: usize = MAX_WRITE;

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

/// Who seals and opens a connection's records.
enum Session {
    /// rustls: the handshake.
    Rustls(Box<Handshake>),
    /// gale, after the handshake: shared with the connection's outbox
    /// while it lends the stream (see [`TlsStream::lendable`]).
    Records(Arc<Mutex<Records>>),
    /// Neither: for the moment rustls hands over, and for good after a
    /// fault in gale's records.
    Gone,
}

/// A TLS connection's state on its way to the next process in a
/// takeover (`handoff`).
pub(crate) struct Moving {
    /// The record layer's state: keys and secrets, zeroized when dropped.
    pub(crate) records: Zeroizing<Vec<u8>>,
    /// TLS bytes received and not yet opened.
    pub(crate) incoming: Vec<u8>,
    /// TLS bytes sealed and not yet written: the first to go out.
    pub(crate) outgoing: Vec<u8>,
}

impl std::fmt::Debug for Moving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The keys are not shown.
        f.debug_struct("Moving")
            .field("incoming", &self.incoming.len())
            .field("outgoing", &self.outgoing.len())
            .finish_non_exhaustive()
    }
}

/// A TLS connection over TCP, its handshake done (see the module's doc).
pub(crate) struct TlsStream {
    /// Shared with the connection's outbox while it lends the stream.
    tcp: Arc<TcpStream>,
    /// The outbox holds the stream: whoever pushes seals and writes, so
    /// this side seals nothing (what it owes the peer goes with the next
    /// record sealed, by either side), until [`TlsStream::taken_back`].
    lent: bool,
    /// While lent, the peer came to be owed an answer: it is sealed once
    /// the stream is taken back ([`TlsStream::owes_answer`]).
    owed: bool,
    session: Session,
    /// TLS bytes received and not yet processed (part of a record).
    incoming: Vec<u8>,
    /// During the handshake, where the whole records shown to rustls end.
    shown: usize,
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

/// Where the records rustls is shown during the handshake end (see
/// [`TlsStream::process`]): from `shown`, the end of those it was shown
/// before (bytes before it are rustls's, which may have joined them in
/// place), `more` whole records at most. Returns the new end of whole
/// records shown, and how much of `incoming` to give rustls: up to there,
/// or all of it when a record not yet whole comes next (rustls reads its
/// header and waits).
fn handshake_records(incoming: &[u8], shown: usize, mut more: usize) -> (usize, usize) {
    let mut at = shown;
    loop {
        let Some(header) = incoming.get(at..).and_then(|r| r.first_chunk::<5>()) else {
            return (at, incoming.len());
        };
        let end = at + 5 + usize::from(u16::from_be_bytes([header[3], header[4]]));
        if end > incoming.len() {
            return (at, incoming.len());
        }
        if more == 0 {
            return (at, at);
        }
        more -= 1;
        at = end;
    }
}

/// The record layer, locked: by the connection's task, or by whoever
/// pushes into a lent stream (a lock held only to seal or open).
fn lock(records: &Mutex<Records>) -> MutexGuard<'_, Records> {
    records
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes `bytes` into the socket, waiting for room.
fn write_tcp(tcp: &TcpStream, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<io::Result<usize>> {
    loop {
        match tcp.try_write(bytes) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(tcp.poll_write_ready(cx))?,
            other => return Poll::Ready(other),
        }
    }
}

/// Seals `frames` into `out`, as one run of records, for a push written
/// straight into a lent stream (`outbox`): the records the socket does
/// not take go out first once the connection's task has the stream back
/// ([`TlsStream::taken_back`]). An error once the connection is closing
/// (`out` may then hold its `close_notify`, to send like any record).
pub(crate) fn seal_lent(
    records: &Mutex<Records>,
    frames: &[io::IoSlice<'_>],
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let mut records = lock(records);
    match frames {
        [one] => records.seal(one, out),
        // The caller seals no more than `MAX_LENT`: nothing is left out.
        _ => gathered(frames, usize::MAX, |all| records.seal(all, out)),
    }
}

/// Runs `f` on the first `max` bytes of `bufs`, gathered into one buffer
/// (a per-thread one: one record for many slices, with no allocation per
/// write).
fn gathered<T>(bufs: &[io::IoSlice<'_>], max: usize, f: impl FnOnce(&[u8]) -> T) -> T {
    GATHER.with_borrow_mut(|gathered| {
        gathered.clear();
        for b in bufs {
            let room = max - gathered.len();
            gathered.extend_from_slice(&b[..b.len().min(room)]);
            if gathered.len() == max {
                break;
            }
        }
        let done = f(gathered);
        if gathered.capacity() > KEEP_GATHERED {
            *gathered = Vec::new();
        }
        done
    })
}

thread_local! {
    /// Slices gathered before sealing, per thread ([`gathered`]).
    static GATHER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Most of a gathering buffer a thread keeps between writes.
const KEEP_GATHERED: usize = 64 * 1024;

/// Frees an empty buffer's memory (an idle connection holds none).
fn let_go_if_empty(buf: &mut Vec<u8>) {
    if buf.is_empty() && buf.capacity() > 0 {
        *buf = Vec::new();
    }
}

impl TlsStream {
    /// Runs rustls's handshake on what it holds and what came in, until it
    /// needs the peer or may send (its records queued in `outgoing`, in
    /// order); once gale runs the records, opens what came in (to
    /// `plain`) and seals `data` (whole).
    fn process(&mut self, data: Option<&[u8]>) -> io::Result<Want> {
        let handshake = match &mut self.session {
            Session::Rustls(handshake) => handshake,
            Session::Records(_) => {
                let processed = self.process_records(data);
                if processed.is_err() {
                    // Nothing more is opened or sealed.
                    self.session = Session::Gone;
                }
                return processed;
            }
            Session::Gone => return Err(invalid("the connection has failed")),
        };
        // Records rustls may be shown beyond those it was.
        let mut more = 0;
        loop {
            // During the handshake rustls is shown the records one at a
            // time, only when it waits for more, so that it reads none
            // past the client's Finished (data, an alert, a key update in
            // the same flight); after the handshake, none: those records
            // are gale's (`take_over`), and rustls must hold none of their
            // state then.
            self.shown = self.shown.min(self.incoming.len());
            let given = if handshake.conn.is_handshaking() {
                let (shown, given) = handshake_records(&self.incoming, self.shown, more);
                self.shown = shown;
                more = 0;
                given
            } else {
                0
            };
            let held_back = given < self.incoming.len();
            let UnbufferedStatus { discard, state } =
                handshake.process(&mut self.incoming[..given]);
            let want = match state.map_err(invalid)? {
                // rustls is shown no record past the client's Finished,
                // so it reads no application data: the records are
                // gale's, and the hand-over would refuse them anyway.
                ConnectionState::ReadTraffic(_) => {
                    return Err(invalid("application data read during the handshake"));
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
                ConnectionState::BlockedHandshake if held_back => {
                    more = 1;
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
                // The handshake is done: gale takes over before anything
                // is written or closed.
                ConnectionState::WriteTraffic(_) => {
                    if data.is_some_and(|d| !d.is_empty()) || self.close != Close::Open {
                        return Err(invalid("rustls runs only the handshake"));
                    }
                    Some(Want::Write)
                }
                _ => return Err(invalid("early data is not accepted")),
            };
            if discard > 0 {
                self.incoming.drain(..discard);
                self.shown = self.shown.saturating_sub(discard);
            }
            let_go_if_empty(&mut self.incoming);
            // rustls may offer to send before the handshake's end (it
            // does not with gale's settings): records held back are shown.
            if want == Some(Want::Write) && held_back && handshake.conn.is_handshaking() {
                more = 1;
                continue;
            }
            if let Some(want) = want {
                return Ok(want);
            }
        }
    }

    /// Opens what came in and seals `data` with gale's own record layer
    /// (after the handshake); as [`Self::process`].
    fn process_records(&mut self, data: Option<&[u8]>) -> io::Result<Want> {
        let Session::Records(shared) = &self.session else {
            return Err(invalid("no record layer"));
        };
        let mut records = lock(shared);
        if !records.peer_closed() && !self.incoming.is_empty() {
            match records.open(&mut self.incoming, &mut self.plain) {
                Ok(used) => {
                    self.incoming.drain(..used);
                }
                Err(fault) => {
                    // While lent, records sealed by a pusher may follow:
                    // no alert then, the connection ends all the same.
                    if let Some(alert) = fault.alert.filter(|_| !self.lent) {
                        records.fatal_alert(alert, &mut self.outgoing);
                        drop(records);
                        self.send_last();
                    }
                    return Err(invalid(fault));
                }
            }
        }
        if records.peer_closed() {
            // What follows the peer's close_notify is ignored.
            self.eof = true;
            self.incoming.clear();
        }
        let_go_if_empty(&mut self.incoming);
        // A key update the peer asked for goes out now if nothing of ours
        // waits; else before our next record (while lent, before the next
        // record a pusher seals, or this side once it has the stream back).
        if self.outgoing.len() == self.sent && !self.lent {
            records.answer(&mut self.outgoing)?;
        } else if self.lent && records.owes_answer() {
            self.owed = true;
        }
        if let Some(data) = data.filter(|d| !d.is_empty())
            && let Err(e) = records.seal(data, &mut self.outgoing)
        {
            if records.closing() {
                // A TLS 1.2 connection at its write key's limit: its
                // close_notify is sealed, and goes out now if the socket
                // takes it, else as any close does (a flush, the
                // shutdown); nothing more is written.
                tracing::debug!(error = %e, "TLS connection closed");
                drop(records);
                self.close = Close::Queued;
                self.send_last();
                return Ok(Want::Closed);
            }
            drop(records);
            self.send_last();
            return Err(e);
        }
        if self.close == Close::Asked {
            self.close = Close::Queued;
            records.close_notify(&mut self.outgoing)?;
        }
        Ok(if self.eof && self.close == Close::Queued {
            Want::Closed
        } else {
            Want::Write
        })
    }

    /// Takes the stream apart for a takeover: its socket, its state, and
    /// the plaintext received and not yet read. `Err` gives it back when
    /// it cannot move: a close begun by either side, or a failed
    /// connection.
    pub(crate) fn into_moving(self) -> Result<(TcpStream, Moving, Vec<u8>), Box<TlsStream>> {
        let records = match &self.session {
            Session::Records(shared) if !self.lent && Arc::strong_count(shared) == 1 => {
                let records = lock(shared);
                if records.peer_closed()
                    || records.closing()
                    || self.eof
                    || self.close != Close::Open
                {
                    None
                } else {
                    Some(records.export())
                }
            }
            _ => None,
        };
        let Some(records) = records else {
            return Err(Box::new(self));
        };
        let tcp = match Arc::try_unwrap(self.tcp) {
            Ok(tcp) => tcp,
            Err(tcp) => {
                return Err(Box::new(TlsStream { tcp, ..self }));
            }
        };
        let moving = Moving {
            records,
            incoming: self.incoming,
            outgoing: self.outgoing.get(self.sent..).unwrap_or_default().to_vec(),
        };
        let plain = self.plain.get(self.read_at..).unwrap_or_default().to_vec();
        Ok((tcp, moving, plain))
    }

    /// The socket and record layer to lend the connection's outbox while
    /// its task writes nothing: gale's records running, nothing of this
    /// side's waiting to be written, no close begun. Once the outbox took
    /// them, [`TlsStream::lent`]; [`TlsStream::taken_back`] when it gives
    /// them back.
    pub(crate) fn lendable(&self) -> Option<(&Arc<TcpStream>, &Arc<Mutex<Records>>)> {
        match &self.session {
            Session::Records(records)
                if !self.lent
                    && self.sent == self.outgoing.len()
                    && self.close == Close::Open
                    && !self.eof =>
            {
                Some((&self.tcp, records))
            }
            _ => None,
        }
    }

    /// Whether records wait to be written.
    pub(crate) fn has_unsent(&self) -> bool {
        self.sent < self.outgoing.len()
    }

    /// Whether the stream is lent and the peer came to be owed an answer
    /// meanwhile: its reader takes the stream back, and the answer goes
    /// out then ([`TlsStream::taken_back`]), not only before the next push.
    pub(crate) fn owes_answer(&self) -> bool {
        self.lent && self.owed
    }

    /// The outbox holds the stream (see [`TlsStream::lendable`]).
    pub(crate) fn lent(&mut self) {
        self.lent = true;
    }

    /// The stream is back from the outbox, with `rest`, records a pusher
    /// sealed and the socket did not take: they go out first.
    pub(crate) fn taken_back(&mut self, rest: Option<bytes::Bytes>) {
        self.lent = false;
        if let Some(rest) = rest.filter(|r| !r.is_empty()) {
            // Nothing of this side's was queued while lent.
            let mut outgoing = Vec::with_capacity(rest.len() + self.outgoing.len() - self.sent);
            outgoing.extend_from_slice(&rest);
            outgoing.extend_from_slice(&self.outgoing[self.sent..]);
            self.outgoing = outgoing;
            self.sent = 0;
        }
        // An answer owed since the loan began, if no pusher's record paid
        // it: after what was sealed before it, and out with the next
        // flush. (Failing, it is paid by the next record sealed.)
        if std::mem::take(&mut self.owed)
            && let Session::Records(records) = &self.session
        {
            let _ = lock(records).answer(&mut self.outgoing);
        }
    }

    /// A stream taken over from the previous process, going on from
    /// `moving`: what it had sealed and not written goes out first.
    pub(crate) fn resume(tcp: TcpStream, moving: Moving) -> io::Result<TlsStream> {
        let records = Records::import(&moving.records)?;
        Ok(TlsStream {
            tcp: Arc::new(tcp),
            lent: false,
            owed: false,
            session: Session::Records(Arc::new(Mutex::new(records))),
            incoming: moving.incoming,
            shown: 0,
            outgoing: moving.outgoing,
            sent: 0,
            plain: Vec::new(),
            read_at: 0,
            eof: false,
            close: Close::Open,
        })
    }

    /// The protocol version the handshake agreed (a stream [`Tls::accept`]
    /// returned runs gale's records).
    pub(crate) fn version(&self) -> TlsVersion {
        match &self.session {
            Session::Records(records) if lock(records).tls12() => TlsVersion::Tls12,
            _ => TlsVersion::Tls13,
        }
    }

    /// Writes what the socket takes now of what is queued, before the
    /// connection ends on a fault (the alert that says why, say); the
    /// connection ends either way.
    fn send_last(&mut self) {
        if let Ok(n) = self.tcp.try_write(&self.outgoing[self.sent..]) {
            self.sent += n;
        }
    }

    /// Whether the handshake is still under way.
    fn handshaking(&self) -> bool {
        match &self.session {
            Session::Rustls(handshake) => handshake.conn.is_handshaking(),
            Session::Records(_) | Session::Gone => false,
        }
    }

    /// Hands a connection, its handshake done and sent, from rustls to
    /// gale's own record layer.
    fn take_over(&mut self) -> io::Result<()> {
        match std::mem::replace(&mut self.session, Session::Gone) {
            Session::Rustls(handshake) => {
                let Handshake { conn, caught } = *handshake;
                let records = Records::new(conn, &caught.client, &caught.server)?;
                self.session = Session::Records(Arc::new(Mutex::new(records)));
                Ok(())
            }
            other => {
                self.session = other;
                Ok(())
            }
        }
    }

    /// Writes what is queued; ready once all of it is written.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let n = ready!(write_tcp(&self.tcp, cx, &self.outgoing[self.sent..]))?;
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
            let_go_if_empty(&mut self.incoming);
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
                Want::Write if !self.handshaking() => return Poll::Ready(Ok(())),
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
        if self.lent {
            // Records a pusher seals could go out between this write's.
            return Poll::Ready(Err(io::Error::other(
                "a TLS write while the stream is lent",
            )));
        }
        ready!(self.poll_send(cx))?;
        if self.close != Close::Open {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let data = &data[..data.len().min(MAX_WRITE)];
        match self.process(Some(data))? {
            Want::Write => {}
            Want::Read => return Poll::Ready(Err(invalid("write before the handshake's end"))),
            Want::Closed => {
                // What is queued (our close_notify) goes as far as the
                // socket takes it.
                let _ = self.poll_send(cx);
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
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
            let want = this.process(None)?;
            // What came with the end is read before the end.
            if this.read_at < this.plain.len() || this.eof {
                continue;
            }
            if want == Want::Closed {
                return Poll::Ready(Ok(()));
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
            // One record for many slices: gathered first.
            Some(_) => gathered(bufs, MAX_WRITE, |all| this.poll_write_plain(cx, all)),
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
        if this.lent {
            return Poll::Ready(Err(io::Error::other(
                "a TLS close while the stream is lent",
            )));
        }
        if this.close == Close::Open {
            this.close = Close::Asked;
            // A peer that already closed both ways leaves nothing to say.
            let _ = this.process(None)?;
        }
        ready!(this.poll_send(cx))?;
        Poll::Ready(socket2::SockRef::from(&*this.tcp).shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    //! The server's side against a real rustls client over 127.0.0.1.

    use std::io::{Read, Write};
    use std::net::TcpStream as StdTcp;

    use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    type Client = StreamOwned<ClientConnection, StdTcp>;

    fn key_file(name: &str) -> String {
        format!("{}/../../tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    fn client_config(versions: &[&'static rustls::SupportedProtocolVersion]) -> Arc<ClientConfig> {
        client_config_with(versions, rustls::crypto::ring::default_provider())
    }

    /// A client offering `suite` alone (and its version).
    fn suite_client(suite: rustls::SupportedCipherSuite) -> Arc<ClientConfig> {
        let version = match suite {
            rustls::SupportedCipherSuite::Tls12(_) => &rustls::version::TLS12,
            rustls::SupportedCipherSuite::Tls13(_) => &rustls::version::TLS13,
        };
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: vec![suite],
            ..rustls::crypto::ring::default_provider()
        };
        client_config_with(&[version], provider)
    }

    fn client_config_with(
        versions: &[&'static rustls::SupportedProtocolVersion],
        provider: rustls::crypto::CryptoProvider,
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(key_file("tls-cert.pem")).expect("cert") {
            roots.add(cert.expect("cert")).expect("root");
        }
        let provider = Arc::new(provider);
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        // For the tests that seal their own records.
        config.enable_secret_extraction = true;
        Arc::new(config)
    }

    /// The server's stream, its handshake done, and a blocking client
    /// running `client` on a thread.
    async fn pair<T: Send + 'static>(
        versions: &[&'static rustls::SupportedProtocolVersion],
        client: impl FnOnce(Client) -> T + Send + 'static,
    ) -> (TlsStream, std::thread::JoinHandle<T>) {
        pair_early(versions, 2, 1, |_| {}, client).await
    }

    /// As [`pair`], over TLS 1.2 with `suite`.
    async fn pair12<T: Send + 'static>(
        suite: rustls::SupportedCipherSuite,
        client: impl FnOnce(Client) -> T + Send + 'static,
    ) -> (TlsStream, std::thread::JoinHandle<T>) {
        let tls = test_acceptor();
        pair_with(&tls, suite_client(suite), 1, |_| {}, client).await
    }

    /// Writes what the client has to send, in one write.
    fn flush(conn: &mut ClientConnection, tcp: &mut StdTcp) {
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).expect("encode");
        }
        if !out.is_empty() {
            tcp.write_all(&out).expect("write");
        }
    }

    /// As [`pair`], the server sending `tickets` session tickets, the
    /// client its ClientHello in `hello_records` records written apart,
    /// and `early` queuing what the client sends in the same write as the
    /// last flight of its handshake.
    async fn pair_early<T: Send + 'static>(
        versions: &[&'static rustls::SupportedProtocolVersion],
        tickets: usize,
        hello_records: usize,
        early: impl FnOnce(&mut ClientConnection) + Send + 'static,
        client: impl FnOnce(Client) -> T + Send + 'static,
    ) -> (TlsStream, std::thread::JoinHandle<T>) {
        let tls = test_acceptor();
        let mut config = (*tls.0).clone();
        config.send_tls13_tickets = tickets;
        let tls = Tls(Arc::new(config));
        pair_with(&tls, client_config(versions), hello_records, early, client).await
    }

    /// As [`pair_early`], with the server's and the client's settings
    /// given.
    async fn pair_with<T: Send + 'static>(
        tls: &Tls,
        config: Arc<ClientConfig>,
        hello_records: usize,
        early: impl FnOnce(&mut ClientConnection) + Send + 'static,
        client: impl FnOnce(Client) -> T + Send + 'static,
    ) -> (TlsStream, std::thread::JoinHandle<T>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let thread = std::thread::spawn(move || {
            let tcp = StdTcp::connect(addr).expect("connect");
            let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
            let mut conn = ClientConnection::new(config, name).expect("client");
            let mut tcp = tcp;
            let mut hello = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut hello).expect("hello");
            }
            let (header, body) = hello.split_at(5);
            for piece in body.chunks(body.len().div_ceil(hello_records)) {
                let [hi, lo] = (piece.len() as u16).to_be_bytes();
                let mut record = vec![header[0], header[1], header[2], hi, lo];
                record.extend_from_slice(piece);
                tcp.write_all(&record).expect("hello");
                if hello_records > 1 {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
            while conn.is_handshaking() {
                let n = conn.read_tls(&mut tcp).expect("read");
                assert!(n > 0, "the server closed in the handshake");
                conn.process_new_packets().expect("client handshake");
                if conn.is_handshaking() {
                    flush(&mut conn, &mut tcp);
                }
            }
            early(&mut conn);
            flush(&mut conn, &mut tcp);
            client(StreamOwned::new(conn, tcp))
        });
        let (tcp, _) = listener.accept().await.expect("accept");
        let stream = tls.accept(tcp).await.expect("handshake");
        (stream, thread)
    }

    async fn read_some(stream: &mut TlsStream) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; 64 * 1024];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("read in time")?;
        buf.truncate(n);
        Ok(buf)
    }

    async fn read_exact(stream: &mut TlsStream, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            stream.read_exact(&mut buf),
        )
        .await
        .expect("read in time")
        .expect("read");
        buf
    }

    fn records(stream: &mut TlsStream) -> MutexGuard<'_, Records> {
        match &stream.session {
            Session::Records(records) => lock(records),
            _ => panic!("the records should be gale's after the handshake"),
        }
    }

    /// A stream lent to its outbox: a key update the client asks for is
    /// read and not answered by the reading side; the pusher's sealing
    /// pays it before its record, and what the socket did not take of
    /// that goes out before anything the stream's own side writes next.
    #[tokio::test]
    async fn a_lent_stream_is_sealed_by_the_pusher_in_order_with_the_answer_owed() {
        let tls = test_acceptor();
        let (mut server, client) = pair_with(
            &tls,
            suite_client(TLS13_SUITES[0]),
            1,
            |_| {},
            |mut c: Client| {
                c.conn.refresh_traffic_keys().expect("key update");
                c.write_all(b"ping").expect("write");
                c.flush().expect("flush");
                let mut got = vec![0; 3 * 1000];
                c.read_exact(&mut got).expect("pushes");
                got
            },
        )
        .await;
        let (tcp, shared) = {
            let (tcp, records) = server.lendable().expect("idle: lendable");
            (tcp.clone(), records.clone())
        };
        server.lent();
        assert!(server.lendable().is_none(), "lent once");
        assert_eq!(read_exact(&mut server, 4).await, b"ping");
        assert!(!server.has_unsent(), "nothing sealed by the reading side");
        assert_eq!(lock(&shared).write_updates(), 0);

        let mut out = Vec::new();
        seal_lent(&shared, &[io::IoSlice::new(&[b'a'; 1000])], &mut out).expect("sealed");
        assert_eq!(
            lock(&shared).write_updates(),
            1,
            "the answer, before the push"
        );
        let half = out.len() / 2;
        let mut at = 0;
        while at < half {
            tcp.writable().await.expect("writable");
            at += tcp.try_write(&out[at..half]).unwrap_or(0);
        }
        drop((tcp, shared));
        server.taken_back(Some(bytes::Bytes::copy_from_slice(&out[half..])));
        assert!(server.has_unsent(), "the records left go first");
        server.write_all(&[b'b'; 1000]).await.expect("write");
        server.write_all(&[b'c'; 1000]).await.expect("write");
        server.flush().await.expect("flush");
        let got = client.join().expect("client");
        assert!(got[..1000].iter().all(|&b| b == b'a'));
        assert!(got[1000..2000].iter().all(|&b| b == b'b'));
        assert!(got[2000..].iter().all(|&b| b == b'c'));
    }

    /// An outbox holding `server`'s idle stream on loan, and its metrics.
    fn lent_outbox(
        server: &TlsStream,
    ) -> (Arc<crate::outbox::Outbox>, Arc<crate::metrics::Metrics>) {
        let (tcp, records) = server.lendable().expect("idle: lendable");
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let outbox = Arc::new(crate::outbox::Outbox::new(
            8,
            crate::config::SlowConsumer::DropOldest,
            metrics.clone(),
        ));
        assert!(outbox.lend(crate::websocket::Lendable::Tls(tcp, records)));
        (outbox, metrics)
    }

    /// A push sealed for a lent stream whose peer is gone (reset) is not
    /// counted as written: it is queued for the connection's task, as on
    /// plain TCP, and the task is woken to find the connection ended.
    #[tokio::test]
    async fn a_lent_push_to_a_peer_gone_is_queued_not_counted_as_written() {
        let tls = test_acceptor();
        let (mut server, client) = pair_with(
            &tls,
            suite_client(TLS13_SUITES[0]),
            1,
            |_| {},
            |mut c: Client| {
                // Once the server has the stream: a reset, not a close,
                // so the server's next send fails.
                let mut go = [0; 1];
                c.read_exact(&mut go).expect("go");
                socket2::SockRef::from(&c.sock)
                    .set_linger(Some(std::time::Duration::ZERO))
                    .expect("linger");
            },
        )
        .await;
        server.write_all(b"g").await.expect("write");
        server.flush().await.expect("flush");
        client.join().expect("client");
        let (outbox, metrics) = lent_outbox(&server);
        let tcp = &server.tcp;
        // The reset taken by the kernel (its error, taken here, leaves
        // the socket shut: the next send fails with a broken pipe).
        let reset = async {
            loop {
                match socket2::SockRef::from(tcp.as_ref()).take_error() {
                    Ok(Some(e)) => break e,
                    _ => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
                }
            }
        };
        let reset = tokio::time::timeout(std::time::Duration::from_secs(10), reset)
            .await
            .expect("the reset in time");
        assert_eq!(reset.kind(), io::ErrorKind::ConnectionReset);

        let reach = crate::outbox::Outbox::push_each(
            std::slice::from_ref(&outbox),
            &["after the reset".into()],
            &metrics,
            true,
        );
        assert_eq!((reach.reached, reach.written), (1, 0));
        assert_eq!(metrics.messages_out.get(), 0, "nothing reached the peer");
        assert_eq!(metrics.outbound_direct.get(), 0);
        assert_eq!(outbox.len(), 1, "queued for the task");
        assert!(
            futures_util::FutureExt::now_or_never(outbox.ready()).is_some(),
            "the task is woken"
        );
        assert!(outbox.claim().is_none(), "no sealed records kept");
    }

    /// A batch of pushes larger than one sealed write: sealed and written
    /// by the pusher a write of at most `MAX_LENT` bytes at a time, in
    /// order, none left for the task.
    #[tokio::test]
    async fn a_lent_batch_larger_than_one_sealed_write_goes_a_write_at_a_time() {
        use crate::websocket::Prepared;

        let many: Vec<Prepared> = (0..100)
            .map(|i| Prepared::from(format!("{i:04}{}", "x".repeat(2000))))
            .collect();
        let want: Vec<u8> = many.iter().flat_map(|p| p.frame().to_vec()).collect();
        assert!(want.len() > 3 * MAX_LENT, "several writes");
        let len = want.len();
        let tls = test_acceptor();
        let (server, client) = pair_with(
            &tls,
            suite_client(TLS13_SUITES[2]),
            1,
            |_| {},
            move |mut c: Client| {
                let mut got = vec![0; len];
                c.read_exact(&mut got).expect("pushes");
                got
            },
        )
        .await;
        // Room for the whole batch, so that every write is taken whole.
        socket2::SockRef::from(server.tcp.as_ref())
            .set_send_buffer_size(1 << 20)
            .expect("send buffer");
        let (outbox, metrics) = lent_outbox(&server);

        let reach =
            crate::outbox::Outbox::push_each(std::slice::from_ref(&outbox), &many, &metrics, true);
        assert_eq!((reach.reached, reach.written), (many.len(), many.len()));
        assert_eq!(metrics.outbound_direct.get() as usize, many.len());
        assert_eq!(outbox.len(), 0, "nothing queued");
        assert_eq!(client.join().expect("client"), want);
    }

    /// A key update asked of an idle lent stream, with nothing pushed:
    /// the reading side says it owes an answer, and the answer is sealed
    /// when the stream is taken back, before anything else of its own.
    #[tokio::test]
    async fn a_lent_stream_owing_an_answer_says_so_and_pays_it_when_taken_back() {
        let tls = test_acceptor();
        let (mut server, client) = pair_with(
            &tls,
            suite_client(TLS13_SUITES[1]),
            1,
            |_| {},
            |mut c: Client| {
                c.conn.refresh_traffic_keys().expect("key update");
                c.flush().expect("flush");
                let mut got = [0; 5];
                c.read_exact(&mut got).expect("after");
                got
            },
        )
        .await;
        assert!(server.lendable().is_some());
        server.lent();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while !server.owes_answer() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the key update read"
            );
            let mut buf = [0; 16];
            let read =
                tokio::time::timeout(std::time::Duration::from_millis(50), server.read(&mut buf));
            assert!(read.await.is_err(), "no data, only the key update");
        }
        assert!(!server.has_unsent(), "nothing sealed while lent");
        server.taken_back(None);
        assert!(!server.owes_answer());
        assert!(server.has_unsent(), "the answer, sealed");
        assert_eq!(records(&mut server).write_updates(), 1);
        server.flush().await.expect("flush");
        server.write_all(b"after").await.expect("write");
        server.flush().await.expect("flush");
        assert_eq!(&client.join().expect("client"), b"after");
    }

    #[tokio::test]
    async fn tls13_records_are_sealed_and_opened_by_gale_across_key_updates() {
        // Each suite: SHA-256 and SHA-384 derive the keys of an update.
        let tls = test_acceptor();
        for suite in TLS13_SUITES {
            key_updates_over(&tls, suite).await;
        }
    }

    async fn key_updates_over(tls: &Tls, suite: rustls::SupportedCipherSuite) {
        let (mut server, client) = pair_with(
            tls,
            suite_client(suite),
            1,
            |_| {},
            |mut c: Client| {
                let mut got = Vec::new();
                for round in 0..5u8 {
                    // The client moves its keys on and asks the server to.
                    c.conn.refresh_traffic_keys().expect("key update");
                    c.write_all(&[b'a' + round; 100]).expect("write");
                    c.flush().expect("flush");
                    let mut reply = [0; 1000];
                    c.read_exact(&mut reply).expect("reply");
                    got.push(reply);
                }
                // 10 records the server seals with a limit of 3 per key.
                let mut pushes = vec![0; 10 * 300];
                c.read_exact(&mut pushes).expect("pushes");
                (got, pushes)
            },
        )
        .await;
        for round in 0..5u8 {
            assert_eq!(read_exact(&mut server, 100).await, vec![b'a' + round; 100]);
            // Its answer to the request went out under the old key, and
            // what follows under the new one.
            assert_eq!(records(&mut server).write_seq(), 0, "round {round}");
            server
                .write_all(&[b'A' + round; 1000])
                .await
                .expect("reply");
        }
        records(&mut server).set_limit(3);
        for i in 0..10u8 {
            server.write_all(&[i; 300]).await.expect("push");
            // The key moved on after 3 records: 2 pushes and the update.
            assert!(records(&mut server).write_seq() <= 2, "push {i}");
        }
        let (got, pushes) = client.join().expect("client");
        for (round, reply) in got.iter().enumerate() {
            assert!(
                reply.iter().all(|&b| b == b'A' + round as u8),
                "round {round}"
            );
        }
        for (i, chunk) in pushes.chunks(300).enumerate() {
            assert!(chunk.iter().all(|&b| usize::from(b) == i), "push {i}");
        }
    }

    #[tokio::test]
    async fn large_writes_span_records_and_close_notify_ends_both_ways() {
        let (mut server, client) = pair(&[&rustls::version::TLS13], |mut c: Client| {
            send_and_read_to_the_close(&mut c)
        })
        .await;
        assert_eq!(read_exact(&mut server, 100_000).await, vec![7; 100_000]);
        server.write_all(&vec![9; 70_000]).await.expect("write");
        server.shutdown().await.expect("close_notify");
        assert!(read_some(&mut server).await.expect("end").is_empty());
        assert_eq!(client.join().expect("client"), vec![9; 70_000]);
    }

    /// The client's side of a large exchange: 100,000 bytes sent, then
    /// what comes read up to the server's close_notify (a clean end),
    /// and its own sent.
    fn send_and_read_to_the_close(c: &mut Client) -> Vec<u8> {
        c.write_all(&vec![7; 100_000]).expect("write");
        c.flush().expect("flush");
        let mut got = Vec::new();
        c.read_to_end(&mut got).expect("read to the close");
        c.conn.send_close_notify();
        c.flush().expect("close_notify");
        got
    }

    /// The server's TLS settings, with the test certificate.
    fn test_acceptor() -> Tls {
        acceptor(&key_file("tls-cert.pem"), &key_file("tls-key.pem")).expect("acceptor")
    }

    const TLS13_SUITES: [rustls::SupportedCipherSuite; 3] = [
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];

    const TLS12_SUITES: [rustls::SupportedCipherSuite; 3] = [
        rustls::crypto::ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        rustls::crypto::ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ];

    #[tokio::test]
    async fn tls12_records_are_sealed_and_opened_by_gale_on_each_suite() {
        let tls = test_acceptor();
        for suite in TLS12_SUITES {
            // The second connection resumes the first's session.
            let config = suite_client(suite);
            for resumed in [false, true] {
                let (mut server, client) = pair_with(
                    &tls,
                    config.clone(),
                    1,
                    |_| {},
                    |mut c: Client| {
                        let got = send_and_read_to_the_close(&mut c);
                        (got, c.conn.handshake_kind())
                    },
                )
                .await;
                let name = format!("{:?}, resumed {resumed}", suite.suite());
                assert!(records(&mut server).tls12(), "{name}");
                assert_eq!(server.version(), TlsVersion::Tls12, "{name}");
                assert_eq!(read_exact(&mut server, 100_000).await, vec![7; 100_000]);
                server.write_all(&vec![9; 70_000]).await.expect("write");
                server.write_all(b"end").await.expect("write");
                server.shutdown().await.expect("close_notify");
                assert!(read_some(&mut server).await.expect("end").is_empty());
                let (got, kind) = client.join().expect("client");
                assert_eq!(got.len(), 70_003, "{name}");
                assert!(got[..70_000].iter().all(|&b| b == 9), "{name}");
                assert_eq!(&got[70_000..], b"end", "{name}");
                let expected = if resumed {
                    rustls::HandshakeKind::Resumed
                } else {
                    rustls::HandshakeKind::Full
                };
                assert_eq!(kind, Some(expected), "{name}");
            }
        }
    }

    #[tokio::test]
    async fn what_comes_with_a_resumed_tls12_handshake_s_last_flight_is_read_by_gale() {
        // A resumed TLS 1.2 handshake ends with the client's Finished,
        // and a client may send more in the same write.
        let tls = test_acceptor();
        for suite in TLS12_SUITES {
            for data in [&b""[..], b"early"] {
                let config = suite_client(suite);
                let (mut server, client) =
                    pair_with(&tls, config.clone(), 1, |_| {}, |_c: Client| {}).await;
                drop(server.shutdown().await);
                client.join().expect("client");
                let (mut server, client) = pair_with(
                    &tls,
                    config,
                    1,
                    move |conn| {
                        conn.writer().write_all(data).expect("queue");
                        conn.send_close_notify();
                    },
                    |c: Client| c.conn.handshake_kind(),
                )
                .await;
                let name = format!("{:?} {data:?}", suite.suite());
                assert_eq!(read_exact(&mut server, data.len()).await, data, "{name}");
                assert!(
                    read_some(&mut server).await.expect("end").is_empty(),
                    "{name}"
                );
                let kind = client.join().expect("client");
                assert_eq!(kind, Some(rustls::HandshakeKind::Resumed), "{name}");
            }
        }
    }

    #[tokio::test]
    async fn a_moved_stream_goes_on_where_it_was() {
        let tls = test_acceptor();
        for suite in TLS13_SUITES.into_iter().chain(TLS12_SUITES) {
            let tls13 = matches!(suite, rustls::SupportedCipherSuite::Tls13(_));
            let (mut server, client) = pair_with(
                &tls,
                suite_client(suite),
                1,
                |_| {},
                move |mut c: Client| {
                    c.write_all(b"before").expect("write");
                    c.flush().expect("flush");
                    let mut first = [0; 5];
                    c.read_exact(&mut first).expect("first");
                    if tls13 {
                        // Asked of the moved stream.
                        c.conn.refresh_traffic_keys().expect("key update");
                    }
                    c.write_all(b"after").expect("write");
                    c.flush().expect("flush");
                    let mut second = [0; 6];
                    c.read_exact(&mut second).expect("second");
                    (first, second)
                },
            )
            .await;
            let name = format!("{:?}", suite.suite());
            assert_eq!(read_exact(&mut server, 3).await, b"bef", "{name}");
            let (tcp, moving, plain) = server.into_moving().expect("movable");
            // Opened and not read: the socket's to carry.
            assert_eq!(plain, b"ore", "{name}");
            let mut server = TlsStream::resume(tcp, moving).expect("resumed");
            server.write_all(b"first").await.expect("write");
            assert_eq!(read_exact(&mut server, 5).await, b"after", "{name}");
            server.write_all(b"second").await.expect("write");
            let (first, second) = client.join().expect("client");
            assert_eq!((&first, &second), (b"first", b"second"), "{name}");
            if tls13 {
                assert_eq!(records(&mut server).write_updates(), 1, "{name}");
            }
        }
    }

    #[tokio::test]
    async fn a_moved_stream_sends_what_it_had_sealed_first() {
        let tls = test_acceptor();
        let pattern = |at: usize| (at % 251) as u8;
        for suite in [TLS13_SUITES[0], TLS12_SUITES[0]] {
            let (go, wait) = std::sync::mpsc::channel::<usize>();
            let (mut server, client) = pair_with(
                &tls,
                suite_client(suite),
                1,
                |_| {},
                move |mut c: Client| {
                    // Reads nothing until the server has moved.
                    let total = wait.recv().expect("total");
                    let mut got = vec![0; total + 3];
                    c.read_exact(&mut got).expect("everything");
                    got
                },
            )
            .await;
            // Writes until the socket takes no more: what was sealed last
            // waits in the stream.
            let mut total = 0;
            loop {
                let chunk: Vec<u8> = (total..total + 16_384).map(pattern).collect();
                let wrote = tokio::time::timeout(
                    std::time::Duration::from_millis(100),
                    server.write(&chunk),
                )
                .await;
                match wrote {
                    Ok(Ok(n)) => total += n,
                    Ok(Err(e)) => panic!("{e}"),
                    Err(_) => break,
                }
            }
            let (tcp, moving, _) = server.into_moving().expect("movable");
            assert!(!moving.outgoing.is_empty(), "sealed and not written");
            let mut server = TlsStream::resume(tcp, moving).expect("resumed");
            go.send(total).expect("go");
            server.write_all(b"end").await.expect("write");
            server.flush().await.expect("flush");
            let got = client.join().expect("client");
            let name = format!("{:?}", suite.suite());
            assert!(
                got[..total]
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| b == pattern(i)),
                "{name}: every byte once, in order"
            );
            assert_eq!(&got[total..], b"end", "{name}");
        }
    }

    #[tokio::test]
    async fn a_malformed_moved_state_is_refused_without_a_panic() {
        let tls = test_acceptor();
        for suite in TLS13_SUITES.into_iter().chain(TLS12_SUITES) {
            let name = format!("{:?}", suite.suite());
            let tls13 = matches!(suite, rustls::SupportedCipherSuite::Tls13(_));
            let (mut server, client) =
                pair_with(&tls, suite_client(suite), 1, |_| {}, |_c: Client| {}).await;
            let good = records(&mut server).export();
            assert!(Records::import(&good).is_ok(), "{name}");
            for len in 0..good.len() {
                assert!(
                    Records::import(&good[..len]).is_err(),
                    "{name}: cut at {len}"
                );
            }
            let changed = |at: usize, to: u8| {
                let mut bad = good.to_vec();
                bad[at] = to;
                Records::import(&bad)
            };
            let mut longer = good.to_vec();
            longer.push(0);
            assert!(Records::import(&longer).is_err(), "{name}: a byte more");
            assert!(changed(0, 9).is_err(), "{name}: another format");
            // The flags last: closed, closing; then the counters, the
            // bytes to skip and how much of a handshake message came.
            let n = good.len();
            assert!(changed(n - 2, 1).is_err(), "{name}: closed");
            assert!(changed(n - 1, 1).is_err(), "{name}: closing");
            let begun = n - 12;
            let most = if tls13 { 4 } else { 3 };
            assert!(changed(begun, most).is_ok(), "{name}: {most} bytes begun");
            assert!(changed(begun, most + 1).is_err(), "{name}: more");
            // The other TLS 1.2 cipher's layout (both ways), or the
            // other hash.
            if !tls13 {
                let mut bad = good.to_vec();
                bad[2] = 3 - bad[2];
                bad[2 + 54] = 3 - bad[2 + 54];
                assert!(Records::import(&bad).is_err(), "{name}: layout");
            } else {
                assert!(changed(109, 3 - good[109]).is_err(), "{name}: hash");
            }
            // Any one byte changed: refused or taken, never a panic.
            for at in 0..good.len() {
                for flip in [0x01, 0x80, 0xff] {
                    let mut bad = good.to_vec();
                    bad[at] ^= flip;
                    let _ = Records::import(&bad);
                }
            }
            client.join().expect("client");
        }
    }

    #[tokio::test]
    async fn tls12_ends_with_close_notify_at_the_write_key_s_limit() {
        for suite in TLS12_SUITES {
            let name = format!("{:?}", suite.suite());
            let (mut server, client) = limited(suite, 3).await;
            server.write_all(b"one").await.expect("under the limit");
            server.write_all(b"two").await.expect("under the limit");
            let err = server.write_all(b"three").await.expect_err("at the limit");
            assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{err}");
            // Dropped as a connection whose write failed is: its
            // close_notify went out with the failed write.
            drop(server);
            // What fit went out, then close_notify: a clean end.
            let got = client.join().expect("client").expect("a clean end");
            assert_eq!(got, b"onetwo", "{name}");

            // And the shutdown after it finishes cleanly.
            let (mut server, client) = limited(suite, 2).await;
            server.write_all(b"one").await.expect("under the limit");
            server.write_all(b"two").await.expect_err("at the limit");
            server.write_all(b"four").await.expect_err("closed");
            server.shutdown().await.expect("close_notify");
            let got = client.join().expect("client").expect("a clean end");
            assert_eq!(got, b"one", "{name}");

            // The last record under the limit is left for close_notify.
            let (mut server, client) = limited(suite, 3).await;
            server.write_all(b"one").await.expect("under the limit");
            server.write_all(b"two").await.expect("under the limit");
            server.shutdown().await.expect("close_notify");
            let got = client.join().expect("client").expect("a clean end");
            assert_eq!(got, b"onetwo", "{name}");
        }
    }

    /// A TLS 1.2 stream on `suite` whose write key reaches its limit
    /// after `left` more records, and a client that reads to the end.
    async fn limited(
        suite: rustls::SupportedCipherSuite,
        left: u64,
    ) -> (TlsStream, std::thread::JoinHandle<io::Result<Vec<u8>>>) {
        let (mut server, client) = pair12(suite, |mut c: Client| {
            let mut got = Vec::new();
            c.read_to_end(&mut got).map(|_| got)
        })
        .await;
        {
            let mut layer = records(&mut server);
            let at = layer.write_seq();
            layer.set_limit(at + left);
        }
        (server, client)
    }

    #[tokio::test]
    async fn a_forged_record_is_refused_with_an_alert() {
        let (mut server, client) = pair(&[&rustls::version::TLS13], |mut c: Client| {
            c.read_exact(&mut [0; 2]).expect("go");
            // A record the client's keys did not seal, on the socket.
            let mut forged = vec![APPLICATION_DATA_RECORD, 3, 3, 0, 40];
            forged.extend_from_slice(&[0x55; 40]);
            c.sock.write_all(&forged).expect("write");
            let mut buf = [0; 16];
            c.read(&mut buf)
        })
        .await;
        drop(records(&mut server));
        server.write_all(b"go").await.expect("go");
        let err = read_some(&mut server).await.expect_err("refused");
        assert!(err.to_string().contains("does not decrypt"), "{err}");
        // Nothing more is opened or sealed.
        let again = read_some(&mut server).await.expect_err("failed");
        assert!(again.to_string().contains("has failed"), "{again}");
        server.write_all(b"x").await.expect_err("failed");
        let answer = client.join().expect("client");
        let err = answer.expect_err("the client hears the alert");
        assert!(err.to_string().contains("BadRecordMac"), "{err}");
    }

    #[tokio::test]
    async fn key_updates_without_data_between_are_limited() {
        let (mut server, client) = pair(&[&rustls::version::TLS13], |mut c: Client| {
            // Once the server has taken over the records.
            c.read_exact(&mut [0; 2]).expect("go");
            for _ in 0..40 {
                if c.conn.refresh_traffic_keys().is_err() {
                    break;
                }
                // Sent, not waiting for the answer.
                while c.conn.wants_write() {
                    if c.conn.write_tls(&mut c.sock).is_err() {
                        return;
                    }
                }
            }
            // Open until the server ends it.
            let _ = c.read(&mut [0; 16]);
        })
        .await;
        drop(records(&mut server));
        server.write_all(b"go").await.expect("go");
        let err = read_some(&mut server).await.expect_err("refused");
        assert!(err.to_string().contains("too many key updates"), "{err}");
        client.join().expect("client");
    }

    #[tokio::test]
    async fn what_comes_with_the_handshake_s_last_flight_is_read_by_gale() {
        // No session ticket: nothing stops rustls between the client's
        // Finished and what follows it.
        let (mut server, client) = pair_early(
            &[&rustls::version::TLS13],
            0,
            1,
            |conn| {
                conn.writer().write_all(b"early").expect("queue");
                conn.send_close_notify();
            },
            |_c: Client| {},
        )
        .await;
        // rustls read none of it: the hand-over took place.
        drop(records(&mut server));
        assert_eq!(read_exact(&mut server, 5).await, b"early");
        assert!(read_some(&mut server).await.expect("end").is_empty());
        client.join().expect("client");
    }

    #[tokio::test]
    async fn key_update_requests_that_come_together_get_one_answer() {
        let (mut server, client) = pair(&[&rustls::version::TLS13], |mut c: Client| {
            c.read_exact(&mut [0; 2]).expect("go");
            for _ in 0..10 {
                c.conn.refresh_traffic_keys().expect("key update");
            }
            c.conn.writer().write_all(b"x").expect("queue");
            // All of it in one write.
            let mut flight = Vec::new();
            while c.conn.wants_write() {
                c.conn.write_tls(&mut flight).expect("encode");
            }
            c.sock.write_all(&flight).expect("write");
            let mut reply = [0; 5];
            c.read_exact(&mut reply).expect("reply under the new keys");
            reply
        })
        .await;
        drop(records(&mut server));
        server.write_all(b"go").await.expect("go");
        assert_eq!(read_exact(&mut server, 1).await, b"x");
        assert_eq!(records(&mut server).write_updates(), 1);
        server.write_all(b"reply").await.expect("reply");
        assert_eq!(&client.join().expect("client"), b"reply");
    }

    #[tokio::test]
    async fn a_client_hello_in_several_records_is_joined() {
        for versions in [&[&rustls::version::TLS13], &[&rustls::version::TLS12]] {
            let (mut server, client) = pair_early(
                versions,
                2,
                3,
                |conn| conn.writer().write_all(b"hi").expect("queue"),
                |_c: Client| {},
            )
            .await;
            assert_eq!(read_exact(&mut server, 2).await, b"hi");
            client.join().expect("client");
        }
    }

    #[tokio::test]
    async fn a_handshake_message_joined_by_rustls_is_not_read_as_records() {
        let tls = test_acceptor();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = std::thread::spawn(move || {
            let mut tcp = StdTcp::connect(addr).expect("connect");
            // A ClientHello of 4 KiB begun, then continued by a record
            // whose content looks like two record headers, then a byte.
            let pieces: [&[u8]; 3] = [
                &[22, 3, 1, 0, 4, 1, 0, 16, 0],
                &[22, 3, 1, 0, 10, 23, 3, 3, 0, 0, 23, 3, 3, 0, 0],
                &[22],
            ];
            for piece in pieces {
                if tcp.write_all(piece).is_err() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = tcp.read(&mut [0; 16]);
        });
        let (tcp, _) = listener.accept().await.expect("accept");
        let accepted =
            tokio::time::timeout(std::time::Duration::from_millis(500), tls.accept(tcp)).await;
        // Still waiting for the rest of the ClientHello, or refused: no
        // panic, no records read out of its contents.
        assert!(!matches!(accepted, Ok(Ok(_))), "no handshake was made");
        client.join().expect("client");
    }

    /// What a client's key log caught of a TLS 1.2 handshake: its random
    /// and the master secret.
    #[derive(Debug, Default)]
    struct MasterLog(std::sync::Mutex<Option<(Vec<u8>, Vec<u8>)>>);

    impl rustls::KeyLog for MasterLog {
        fn will_log(&self, label: &str) -> bool {
            label == "CLIENT_RANDOM"
        }

        fn log(&self, label: &str, client_random: &[u8], secret: &[u8]) {
            if label == "CLIENT_RANDOM" {
                *self.0.lock().expect("lock") = Some((client_random.to_vec(), secret.to_vec()));
            }
        }
    }

    /// TLS 1.2's PRF with SHA-256 (RFC 5246 §5).
    fn prf12(secret: &[u8], label: &[u8], seed: &[u8], out: &mut [u8]) {
        use ring::hmac;
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let label_seed = [label, seed].concat();
        let mut a = hmac::sign(&key, &label_seed);
        let mut at = 0;
        while at < out.len() {
            let mut ctx = hmac::Context::with_key(&key);
            ctx.update(a.as_ref());
            ctx.update(&label_seed);
            let block = ctx.sign();
            let n = (out.len() - at).min(block.as_ref().len());
            out[at..at + n].copy_from_slice(&block.as_ref()[..n]);
            at += n;
            a = hmac::sign(&key, a.as_ref());
        }
    }

    /// A TLS 1.2 client's AES-128-GCM write key and IV (the 4-byte salt,
    /// then the 8 bytes rustls starts the explicit nonce from), from the
    /// master secret and the two randoms (RFC 5246 §6.3, RFC 5288).
    fn client_keys12(
        master: &[u8],
        server_random: &[u8],
        client_random: &[u8],
    ) -> ([u8; 16], [u8; 12]) {
        let mut block = [0; 48];
        prf12(
            master,
            b"key expansion",
            &[server_random, client_random].concat(),
            &mut block,
        );
        let mut key = [0; 16];
        key.copy_from_slice(&block[..16]);
        let mut iv = [0; 12];
        iv[..4].copy_from_slice(&block[32..36]);
        iv[4..].copy_from_slice(&block[40..48]);
        (key, iv)
    }

    /// Seals (or, `open`, opens) one TLS 1.2 AES-GCM record's payload as
    /// the client, record `seq`: the explicit nonce, the ciphertext, the
    /// tag; opening returns the plaintext.
    fn gcm12(
        key: &[u8; 16],
        iv: &[u8; 12],
        seq: u64,
        typ: u8,
        payload: &[u8],
        open: bool,
    ) -> Vec<u8> {
        use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
        let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, key).expect("key"));
        let mut nonce = *iv;
        let (explicit, body) = if open {
            payload.split_at(8)
        } else {
            for (b, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
                *b ^= s;
            }
            (&nonce[4..], payload)
        };
        let explicit = explicit.to_vec();
        nonce[4..].copy_from_slice(&explicit);
        let plain_len = if open { body.len() - 16 } else { body.len() };
        let mut aad = seq.to_be_bytes().to_vec();
        aad.extend_from_slice(&[typ, 3, 3]);
        aad.extend_from_slice(&(plain_len as u16).to_be_bytes());
        let nonce = Nonce::assume_unique_for_key(nonce);
        let mut buf = body.to_vec();
        if open {
            let plain = key
                .open_in_place(nonce, Aad::from(aad), &mut buf)
                .expect("the derived key opens the client's record");
            return plain.to_vec();
        }
        key.seal_in_place_append_tag(nonce, Aad::from(aad), &mut buf)
            .expect("seal");
        let mut record = vec![typ, 3, 3];
        record.extend_from_slice(&((8 + buf.len()) as u16).to_be_bytes());
        record.extend_from_slice(&explicit);
        record.extend_from_slice(&buf);
        record
    }

    /// The records of `bytes`: type and payload.
    fn records_of(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while bytes.len() >= 5 {
            let len = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
            out.push((bytes[0], bytes[5..5 + len].to_vec()));
            bytes = &bytes[5 + len..];
        }
        out
    }

    /// A TLS 1.2 client whose Finished reaches the server after a warning
    /// alert, or split over two records (both legal, though rustls's
    /// client sends neither): the server takes the handshake and hands it
    /// to gale's records at the right sequence number, which then open
    /// the client's data and seal the server's.
    #[tokio::test]
    async fn a_tls12_finished_after_a_warning_or_split_over_records_is_taken() {
        let tls = test_acceptor();
        for split in [false, true] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let client = std::thread::spawn(move || {
                let log = Arc::new(MasterLog::default());
                let mut config = (*suite_client(TLS12_SUITES[0])).clone();
                config.key_log = log.clone();
                let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
                let mut conn = ClientConnection::new(Arc::new(config), name).expect("client");
                let mut tcp = StdTcp::connect(addr).expect("connect");
                flush(&mut conn, &mut tcp);
                // The server's first flight, kept for its random.
                let mut seen = Vec::new();
                while !conn.wants_write() {
                    let mut buf = [0; 16 * 1024];
                    let n = tcp.read(&mut buf).expect("read");
                    assert!(n > 0, "closed in the handshake");
                    seen.extend_from_slice(&buf[..n]);
                    conn.read_tls(&mut &buf[..n]).expect("read_tls");
                    conn.process_new_packets().expect("handshake");
                }
                assert_eq!((seen[0], seen[5]), (22, 2), "a ServerHello first");
                let server_random = seen[11..43].to_vec();
                let (client_random, master) =
                    log.0.lock().expect("lock").clone().expect("master secret");
                let (key, iv) = client_keys12(&master, &server_random, &client_random);
                let mut flight = Vec::new();
                while conn.wants_write() {
                    conn.write_tls(&mut flight).expect("encode");
                }
                let records = records_of(&flight);
                assert_eq!(records.len(), 3, "key exchange, CCS, Finished");
                let finished = gcm12(&key, &iv, 0, 22, &records[2].1, true);
                assert_eq!(finished[0], 20, "a Finished");
                let mut out = Vec::new();
                for (typ, payload) in &records[..2] {
                    out.extend_from_slice(&[*typ, 3, 3]);
                    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
                    out.extend_from_slice(payload);
                }
                if split {
                    out.extend(gcm12(&key, &iv, 0, 22, &finished[..6], false));
                    out.extend(gcm12(&key, &iv, 1, 22, &finished[6..], false));
                } else {
                    // A warning alert (user_canceled), then the Finished.
                    out.extend(gcm12(&key, &iv, 0, 21, &[1, 90], false));
                    out.extend(gcm12(&key, &iv, 1, 22, &finished, false));
                }
                tcp.write_all(&out).expect("write");
                while conn.is_handshaking() {
                    let n = conn.read_tls(&mut tcp).expect("read");
                    assert!(n > 0, "the server closed in the handshake");
                    conn.process_new_packets().expect("the server's Finished");
                }
                // Data from record 2 on, sealed here (rustls counts one
                // record fewer).
                tcp.write_all(&gcm12(&key, &iv, 2, 23, b"hello", false))
                    .expect("data");
                let mut got = Vec::new();
                while got.len() < 5 {
                    conn.read_tls(&mut tcp).expect("read");
                    conn.process_new_packets().expect("data");
                    let mut buf = [0; 16];
                    if let Ok(n) = conn.reader().read(&mut buf) {
                        got.extend_from_slice(&buf[..n]);
                    }
                }
                got
            });
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut server = tls.accept(tcp).await.expect("handshake");
            assert!(records(&mut server).tls12());
            assert_eq!(read_exact(&mut server, 5).await, b"hello", "split: {split}");
            server.write_all(b"world").await.expect("write");
            server.flush().await.expect("flush");
            assert_eq!(client.join().expect("client"), b"world", "split: {split}");
        }
    }

    /// A record's inner type and content.
    type Sealed = (u8, Vec<u8>);

    /// The server's stream and a client that sends `records` sealed under
    /// its own keys, in one write, after a TLS 1.3 handshake (TLS 1.2 with
    /// `suite`), then reads until the server ends the connection; the
    /// client's thread returns what it read, still sealed.
    async fn send_sealed(
        suite: Option<rustls::SupportedCipherSuite>,
        records: Vec<Sealed>,
    ) -> (TlsStream, std::thread::JoinHandle<Vec<u8>>) {
        let client = move |c: Client| {
            let StreamOwned { conn, mut sock } = c;
            let secrets = conn.dangerous_extract_secrets().expect("secrets");
            let (seq, tx) = secrets.tx;
            let mut sealer = records::Sealer::new(seq, &tx, suite.is_some());
            let mut flight = Vec::new();
            for (typ, content) in &records {
                flight.extend(sealer.seal(*typ, content));
            }
            sock.write_all(&flight).expect("write");
            // Open until the server ends it.
            let mut got = Vec::new();
            let _ = sock.read_to_end(&mut got);
            got
        };
        match suite {
            None => pair(&[&rustls::version::TLS13], client).await,
            Some(suite) => pair12(suite, client).await,
        }
    }

    #[tokio::test]
    async fn records_a_client_must_not_send_end_the_connection() {
        let ku = |request: u8| vec![24, 0, 0, 1, request];
        let cases: Vec<(&str, Vec<Sealed>)> = vec![
            ("too many empty records", vec![(23, vec![]); 33]),
            ("no content type", vec![(0, vec![])]),
            ("plaintext too large", vec![(23, vec![1; 16_385])]),
            ("of an unexpected type", vec![(20, vec![1])]),
            (
                "not at the end of its record",
                vec![(22, [ku(0), ku(0)].concat())],
            ),
            ("other than a key update", vec![(22, vec![4, 0, 0, 1, 0])]),
            ("of the wrong length", vec![(22, vec![24, 0, 0, 2, 0, 0])]),
            ("request unknown", vec![(22, ku(2))]),
            (
                "inside a handshake message",
                vec![(22, vec![24, 0]), (23, b"x".to_vec())],
            ),
            ("an empty handshake record", vec![(22, vec![])]),
            ("not 2 bytes", vec![(21, vec![1])]),
            ("too many warning alerts", vec![(21, vec![1, 90]); 5]),
            ("TLS 1.3 does not have", vec![(21, vec![1, 10])]),
            ("the peer sent a fatal alert", vec![(21, vec![2, 40])]),
            ("of an unknown level", vec![(21, vec![3, 40])]),
        ];
        refused_each(None, cases).await;
    }

    /// Sends each case's records, sealed after a TLS 1.3 handshake (TLS
    /// 1.2 with `suite`), and checks that the connection ends saying why.
    async fn refused_each(
        suite: Option<rustls::SupportedCipherSuite>,
        cases: Vec<(&'static str, Vec<Sealed>)>,
    ) {
        for (why, records) in cases {
            let (mut server, client) = send_sealed(suite, records).await;
            let err = read_some(&mut server).await.expect_err(why);
            assert!(err.to_string().contains(why), "{why}: {err}");
            drop(server);
            client.join().expect("client");
        }
    }

    #[tokio::test]
    async fn tls12_records_a_client_must_not_send_end_the_connection() {
        let hello = |len: u32| {
            let mut m = vec![1];
            m.extend_from_slice(&len.to_be_bytes()[1..]);
            m.extend(vec![0; len as usize]);
            m
        };
        let cases: Vec<(&str, Vec<Sealed>)> = vec![
            ("too many empty records", vec![(23, vec![]); 33]),
            ("plaintext too large", vec![(23, vec![1; 16_385])]),
            ("a change_cipher_spec after", vec![(20, vec![1])]),
            ("of an unexpected type", vec![(24, vec![1])]),
            ("other than a ClientHello", vec![(22, vec![0, 0, 0, 0])]),
            (
                "a renegotiation asked again",
                vec![(22, hello(40)), (22, hello(40))],
            ),
            (
                "a handshake message too large",
                vec![(22, hello(70_000)[..100].to_vec())],
            ),
            (
                "inside a handshake message",
                vec![(22, hello(40)[..20].to_vec()), (23, b"x".to_vec())],
            ),
            (
                "inside a handshake message",
                vec![(22, vec![1, 0]), (21, vec![1, 90])],
            ),
            ("an empty handshake record", vec![(22, vec![])]),
            ("not 2 bytes", vec![(21, vec![1])]),
            ("too many warning alerts", vec![(21, vec![1, 10]); 5]),
            ("the peer sent a fatal alert", vec![(21, vec![2, 40])]),
            ("of an unknown level", vec![(21, vec![3, 40])]),
        ];
        for suite in TLS12_SUITES {
            refused_each(Some(suite), cases.clone()).await;
        }
    }

    #[tokio::test]
    async fn tls12_records_a_client_may_send_are_let_by() {
        for suite in TLS12_SUITES {
            // Empty records, 4 warnings of any kind, and a ClientHello
            // asking to renegotiate, split over three records and a
            // record with data after it: let by, the renegotiation
            // refused with a warning before the server's next record.
            let mut hello = vec![1, 0, 1, 0];
            hello.extend(vec![0x42; 256]);
            let mut records: Vec<Sealed> = vec![(23, vec![]); 32];
            records.extend([(21, vec![1, 90]), (21, vec![1, 10]), (21, vec![1, 41])]);
            records.push((21, vec![1, 44]));
            records.push((22, hello[..2].to_vec()));
            records.push((22, hello[2..100].to_vec()));
            records.push((22, hello[100..].to_vec()));
            records.push((23, b"ok".to_vec()));
            let (mut server, client) = send_sealed(Some(suite), records).await;
            assert_eq!(read_exact(&mut server, 2).await, b"ok");
            server.write_all(b"reply").await.expect("reply");
            drop(server);
            let got = client.join().expect("client");
            // The warning, then the reply: two records.
            let first = usize::from(u16::from_be_bytes([got[3], got[4]]));
            assert_eq!(got[0], 21, "{:?}", suite.suite());
            assert_eq!(got[5 + first], 23, "{:?}", suite.suite());
            let second = usize::from(u16::from_be_bytes([got[5 + first + 3], got[5 + first + 4]]));
            assert_eq!(got.len(), 5 + first + 5 + second, "{:?}", suite.suite());

            // After close_notify nothing is read.
            let (mut server, client) =
                send_sealed(Some(suite), vec![(21, vec![1, 0]), (23, b"late".to_vec())]).await;
            assert!(read_some(&mut server).await.expect("end").is_empty());
            drop(server);
            client.join().expect("client");
        }
    }

    #[tokio::test]
    async fn records_a_client_may_send_are_let_by() {
        // 32 empty records, 4 user_canceled warnings: let by.
        let mut records = vec![(23, vec![]); 32];
        records.extend(vec![(21, vec![1, 90]); 4]);
        records.push((23, b"ok".to_vec()));
        let (mut server, client) = send_sealed(None, records).await;
        assert_eq!(read_exact(&mut server, 2).await, b"ok");
        drop(server);
        client.join().expect("client");

        // After close_notify nothing is read.
        let (mut server, client) =
            send_sealed(None, vec![(21, vec![1, 0]), (23, b"late".to_vec())]).await;
        assert!(read_some(&mut server).await.expect("end").is_empty());
        drop(server);
        client.join().expect("client");

        // A key update split over two records is joined: the read keys
        // move on, so the server waits for records under the new ones.
        let (mut server, client) =
            send_sealed(None, vec![(22, vec![24, 0]), (22, vec![0, 1, 0])]).await;
        let mut buf = [0; 16];
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(300), server.read(&mut buf))
                .await;
        assert!(waited.is_err(), "no error and nothing read: {waited:?}");
        drop(server);
        client.join().expect("client");
    }

    #[tokio::test]
    async fn record_headers_a_client_must_not_send_end_the_connection() {
        let cases: [(&str, &[u8]); 2] = [
            ("not encrypted", &[22, 3, 3, 0, 1, 1]),
            // Refused on its header, before its body comes.
            ("a record too large", &[23, 3, 3, 0x41, 0x01]),
        ];
        for (why, bytes) in cases {
            let (mut server, client) = pair(&[&rustls::version::TLS13], move |mut c: Client| {
                c.sock.write_all(bytes).expect("write");
                while let Ok(1..) = c.sock.read(&mut [0; 512]) {}
            })
            .await;
            let err = read_some(&mut server).await.expect_err(why);
            assert!(err.to_string().contains(why), "{why}: {err}");
            drop(server);
            client.join().expect("client");
        }
    }

    const APPLICATION_DATA_RECORD: u8 = 23;
}
