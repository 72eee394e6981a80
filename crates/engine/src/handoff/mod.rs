//! Takeover: a new process is handed the listening socket and every live
//! WebSocket connection and SSE session of the running one, and carries
//! each on from exactly where it was. No client sees a close, a reconnect, a lost or a
//! repeated message.
//!
//! The running server listens on `server.handoff_socket` (a Unix socket,
//! mode 0600, and only a peer of the same user or root is served). `gale
//! serve --takeover`, started with the same setting, connects and the two
//! speak the protocol below; the descriptors travel by SCM_RIGHTS.
//!
//! 1. **Hello.** The new process says its handoff format, its version
//!    and what it takes beyond its format (`TAKES`: SSE sessions over
//!    TLS); the old one answers `accept`, or `refuse` with why (another
//!    format, a takeover already under way, shutting down), and then
//!    keeps serving. It hands the new process only what it takes.
//! 2. **Listeners.** The listening socket goes first, so no connect is
//!    refused: from here on connects wait in the kernel's backlog until
//!    the new process accepts them, once everything has moved. The old
//!    process stops accepting and refuses new handshakes (503,
//!    `Retry-After`).
//! 3. **Quiet.** Every WebSocket stops reading. What it had
//!    asked is answered first: replies of its plain-text requests and of
//!    its events in the router are queued behind what it was sent (they
//!    are answered by the old process, never re-run). The router drains,
//!    and the broadcast queue is flushed into the connections' outboxes:
//!    every publication made before the takeover reaches every
//!    subscriber's queue here.
//! 4. **History.** On a single node, the topics' in-memory streams
//!    (positions, epochs, retained publications) move, so offsets go on
//!    without a gap; in cluster mode they are in Redis already.
//! 5. **Connections.** Each connection, one message each: its descriptor,
//!    its client id, user, roles, info and identity expiry, its topics,
//!    the compression agreed (no context is kept between messages, so the
//!    window size is all), the bytes read but not parsed, a message begun
//!    in fragments, and the frames queued but not yet written. The new
//!    process writes those frames first and goes on. Over TLS the record
//!    layer's state goes too (`tls::Moving`: keys, sequence numbers, TLS
//!    1.3's traffic secrets, the records received and not opened, those
//!    sealed and not written, which go out before anything else),
//!    zeroized once sent and once taken. An SSE session moves the same
//!    way, over TLS too, with its session id (its client's
//!    POSTs go on to the new process) and its queued messages; from the
//!    takeover's start the old process answers its POSTs 503 with
//!    `Retry-After` (nothing is run there), and the client sends again.
//! 6. **Done.** The count. The new process answers with how many it
//!    received (it now holds every descriptor), builds its server,
//!    carries each connection on, and only then accepts. The old process
//!    closes at once what could not move (a connection closing, a slow
//!    consumer, one whose requests were not answered in time, an SSE
//!    session over TLS for a successor that does not take it), each with
//!    1012 and a jittered reconnect delay unless the application ended it
//!    with its own code, and exits, letting go of what it held (the
//!    request log's spill directory, which the new process waits for).
//!
//! Publications are never lost or doubled across the move: before step 5
//! every publication has reached the old outboxes and goes with them, and
//! every later one is made in the new process (the old one publishes
//! nothing more: its applications stopped at step 2).

mod wire;

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;
use uuid::Uuid;
use zeroize::{Zeroize, Zeroizing};

use crate::config::Config;
use crate::connection::Lookups;
use crate::router::Caller;
use crate::server::App;
use crate::transport::Stream;
use crate::websocket::{Parts, Socket};

/// The handoff format this binary speaks. Two binaries hand over only
/// when they speak the same one; it changes whenever a message does.
pub const FORMAT: u32 = 3;

/// What this binary takes beyond its format, named in its hello: a
/// process hands a successor only what the successor says it takes, so
/// binaries of the same format hand over both ways.
const TAKES: &[&str] = &[TAKES_SSE_TLS];

/// SSE sessions over gale's own TLS (before, only plain-TCP ones moved).
const TAKES_SSE_TLS: &str = "sse-tls";

/// Connections in flight between the connection tasks and the socket.
const QUEUE: usize = 1024;

/// Why a takeover failed (the running process keeps serving).
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// `server.handoff_socket` is empty.
    #[error(
        "--takeover needs server.handoff_socket: the Unix socket the running gale listens on for \
         a takeover (give both processes the same path, in gale.toml or \
         GALE_SERVER__HANDOFF_SOCKET)"
    )]
    NotConfigured,
    /// Nothing answers at the path.
    #[error(
        "no running gale to take over at {path}: {source} (was it started with \
         server.handoff_socket = \"{path}\"?)"
    )]
    Unreachable {
        /// The socket's path.
        path: String,
        /// What connecting said.
        source: io::Error,
    },
    /// The running process said no; it keeps serving.
    #[error("the running gale refused the takeover, and keeps serving: {0}")]
    Refused(String),
    /// The other side broke the protocol.
    #[error("the takeover failed: {0}")]
    Protocol(String),
    /// The socket failed.
    #[error("the takeover failed: {0}")]
    Io(#[from] io::Error),
}

/// One message of the protocol (its head; the descriptors and bytes ride
/// along, see `wire`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Msg {
    Hello {
        format: u32,
        version: String,
        pid: u32,
        /// What it takes beyond its format ([`TAKES`]); absent from
        /// binaries before there was anything.
        #[serde(default)]
        takes: Vec<String>,
    },
    Accept {
        format: u32,
        version: String,
        pid: u32,
    },
    Refuse {
        reason: String,
    },
    Listeners {
        addrs: Vec<String>,
    },
    History {
        snapshot: crate::history::Snapshot,
    },
    Conn(Box<ConnState>),
    Done {
        handed: u64,
    },
    Ack {
        taken: u64,
    },
}

/// One connection's state (its bytes travel in the message's tail: the
/// unparsed bytes, then the fragments so far, then the queued frames).
#[derive(Debug, Serialize, Deserialize)]
struct ConnState {
    id: Uuid,
    address: IpAddr,
    user: Option<String>,
    roles: Vec<String>,
    info: Option<String>,
    expires: Option<u64>,
    /// Topics, each with whether it announces joins and leaves.
    topics: Vec<(String, bool)>,
    deflate: Option<u8>,
    read: usize,
    /// A message begun in fragments: binary, compressed, the UTF-8
    /// checked prefix, its length.
    partial: Option<(bool, bool, usize, usize)>,
    queued: usize,
    /// An SSE session rather than a WebSocket: its queued bytes are SSE
    /// messages, not yet framed.
    sse: Option<SseSession>,
    /// Over TLS, the lengths of what follows the queued frames in the
    /// tail: the record layer's state, the TLS bytes received and not
    /// yet opened, those sealed and not yet written.
    #[serde(default)]
    tls: Option<TlsLengths>,
}

/// Over TLS, the lengths of the record layer's state, the TLS bytes
/// received and not yet opened, and those sealed and not yet written.
type TlsLengths = (usize, usize, usize);

/// What an SSE session carries beyond a connection's state.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SseSession {
    /// Its id, which its client POSTs to.
    pub(crate) session: String,
    /// Whether its body is chunked (HTTP/1.1) or ends with the connection
    /// (HTTP/1.0).
    pub(crate) chunked: bool,
}

fn head(msg: &Msg) -> Vec<u8> {
    // Serializing plain data cannot fail.
    serde_json::to_vec(msg).unwrap_or_default()
}

fn parse(bytes: &[u8]) -> Result<Msg, HandoffError> {
    serde_json::from_slice(bytes).map_err(|e| HandoffError::Protocol(format!("bad message: {e}")))
}

fn version() -> String {
    env!("CARGO_PKG_VERSION").to_owned()
}

// ---------------------------------------------------------------------
// The running (old) process.
// ---------------------------------------------------------------------

/// The takeover as the connection tasks see it.
#[derive(Debug)]
pub(crate) struct Gate {
    /// Set when a takeover begins (connections stop reading).
    pub(crate) started_flag: AtomicBool,
    /// The successor takes SSE sessions over TLS; set before the takeover
    /// begins.
    sse_tls: AtomicBool,
    extract: CancellationToken,
    members: TaskTracker,
    /// Members that stopped reading and whose requests are answered.
    quiet: Arc<std::sync::atomic::AtomicUsize>,
    tx: mpsc::Sender<Handed>,
    rx: Mutex<Option<mpsc::Receiver<Handed>>>,
}

/// A connection taking part in a takeover, for as long as it lives.
#[derive(Debug)]
pub(crate) struct Member {
    _token: TaskTrackerToken,
    quiet: Arc<std::sync::atomic::AtomicUsize>,
    is_quiet: bool,
}

impl Member {
    /// It reads no more and everything it asked is answered.
    fn quiet(&mut self) {
        if !self.is_quiet {
            self.is_quiet = true;
            self.quiet.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if self.is_quiet {
            self.quiet.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A connection ready to go: its state, its bytes and its descriptor.
#[derive(Debug)]
pub(crate) struct Handed {
    state: ConnState,
    tail: Zeroizing<Vec<u8>>,
    fd: OwnedFd,
}

impl Default for Gate {
    fn default() -> Gate {
        let (tx, rx) = mpsc::channel(QUEUE);
        Gate {
            started_flag: AtomicBool::new(false),
            sse_tls: AtomicBool::new(false),
            extract: CancellationToken::new(),
            members: TaskTracker::new(),
            quiet: Arc::default(),
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }
}

impl Gate {
    /// Counts a connection in: a takeover waits for it.
    pub(crate) fn join(&self) -> Member {
        Member {
            _token: self.members.token(),
            quiet: self.quiet.clone(),
            is_quiet: false,
        }
    }

    /// Whether a takeover has started: connections stop reading.
    pub(crate) fn is_started(&self) -> bool {
        self.started_flag.load(Ordering::Acquire)
    }
}

/// Whether a takeover of `app` has started (never, without a handoff
/// socket).
pub(crate) fn started(app: &App) -> bool {
    app.handoff.as_ref().is_some_and(Gate::is_started)
}

/// A takeover accepted: the new process's socket, and what it takes.
#[derive(Debug)]
pub(crate) struct Successor {
    stream: UnixStream,
    takes_sse_tls: bool,
}

/// Listens on `path` for a takeover until `stop`; a takeover accepted is
/// sent on `takeovers` (the server's serve task carries it out).
///
/// # Errors
/// When the path cannot be bound, or another live gale listens there.
pub(crate) fn listen(
    path: &str,
    takeovers: mpsc::Sender<Successor>,
    stop: CancellationToken,
) -> io::Result<()> {
    let listener = match tokio::net::UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "server.handoff_socket {path}: another gale listens there (to take it \
                         over, start this one with --takeover)"
                    ),
                ));
            }
            // Left by a process that is gone.
            std::fs::remove_file(path)?;
            tokio::net::UnixListener::bind(path)?
        }
        Err(e) => return Err(e),
    };
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    let path = path.to_owned();
    tracing::info!(path, "listening for a takeover (gale serve --takeover)");
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                () = stop.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "handoff socket: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            // Served on after a takeover is accepted: if it fails before
            // anything moved, the next one can still come.
            if let Err(e) = hello(stream, &takeovers).await {
                tracing::warn!(error = %e, "handoff socket: a takeover attempt failed");
            }
        }
        // Stopped by a takeover (or a shutdown): the new process binds its
        // own once it has taken over.
        let _ = std::fs::remove_file(&path);
    });
    Ok(())
}

/// Answers one would-be successor: a refusal, or the takeover passed to
/// the serve task.
async fn hello(
    stream: tokio::net::UnixStream,
    takeovers: &mpsc::Sender<Successor>,
) -> Result<(), HandoffError> {
    let peer = rustix::net::sockopt::socket_peercred(&stream).map_err(io::Error::from)?;
    let me = rustix::process::geteuid();
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    if peer.uid != me && !peer.uid.is_root() {
        tracing::warn!(
            uid = peer.uid.as_raw(),
            "handoff socket: a process of another user tried a takeover; refused"
        );
        return Ok(());
    }
    let reserved = takeovers.clone().try_reserve_owned();
    tokio::task::spawn_blocking(move || {
        let msg = parse(&wire::recv(&stream)?.head)?;
        let refuse = |reason: String| -> Result<(), HandoffError> {
            tracing::warn!(reason, "takeover refused; serving on");
            wire::send(&stream, &head(&Msg::Refuse { reason }), &[], &[])?;
            Ok(())
        };
        let Msg::Hello {
            format,
            version: theirs,
            pid,
            takes,
        } = msg
        else {
            return refuse("the first message must be a hello".into());
        };
        if format != FORMAT {
            return refuse(format!(
                "this gale ({}) speaks handoff format {FORMAT}; the new one ({theirs}, pid {pid}) \
                 speaks {format}: upgrade through a drain instead (docs/operations.md)",
                version()
            ));
        }
        let Ok(slot) = reserved else {
            return refuse("a takeover is already under way, or this gale is shutting down".into());
        };
        wire::send(
            &stream,
            &head(&Msg::Accept {
                format: FORMAT,
                version: version(),
                pid: std::process::id(),
            }),
            &[],
            &[],
        )?;
        stream.set_read_timeout(None)?;
        // The listeners are sent from the serve task: a successor that
        // stops reading must not hold it.
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        tracing::info!(pid, version = theirs, "takeover accepted: handing over");
        slot.send(Successor {
            stream,
            takes_sse_tls: takes.iter().any(|t| t == TAKES_SSE_TLS),
        });
        Ok(())
    })
    .await
    .map_err(|e| HandoffError::Protocol(e.to_string()))?
}

/// What is sent to the successor, in order, by the writer thread.
struct Out {
    head: Vec<u8>,
    tail: Zeroizing<Vec<u8>>,
    fds: Vec<OwnedFd>,
}

/// A takeover under way, in the old process.
#[derive(Debug)]
pub(crate) struct Handover {
    out: mpsc::Sender<Out>,
    writer: std::thread::JoinHandle<Result<u64, HandoffError>>,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Out").finish_non_exhaustive()
    }
}

/// Starts handing over on `stream`: the listening sockets go first, then
/// every connection stops reading. The caller then drains the router and
/// flushes the broadcast queue, and calls [`Handover::finish`].
///
/// # Errors
/// When the listeners could not be sent: nothing has changed, the server
/// serves on.
pub(crate) fn begin(
    app: &App,
    successor: Successor,
    listeners: &[(String, OwnedFd)],
) -> Result<Handover, HandoffError> {
    let Successor {
        stream,
        takes_sse_tls,
    } = successor;
    let fds = listeners
        .iter()
        .map(|(_, fd)| fd.try_clone())
        .collect::<io::Result<Vec<_>>>()?;
    let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
    let addrs = listeners.iter().map(|(a, _)| a.clone()).collect();
    wire::send(&stream, &head(&Msg::Listeners { addrs }), &[], &borrowed)?;
    let (out, rx) = mpsc::channel(QUEUE);
    let writer = std::thread::Builder::new()
        .name("gale-handoff".into())
        .spawn(move || write(stream, rx))?;
    if let Some(gate) = &app.handoff {
        gate.sse_tls.store(takes_sse_tls, Ordering::Release);
        gate.started_flag.store(true, Ordering::Release);
    }
    // Every connection wakes, sees the takeover and stops reading.
    for outbox in app.hub.outboxes() {
        outbox.wake();
    }
    Ok(Handover { out, writer })
}

/// The writer thread: sends what it is given, then reads the answer.
fn write(stream: UnixStream, mut rx: mpsc::Receiver<Out>) -> Result<u64, HandoffError> {
    while let Some(o) = rx.blocking_recv() {
        let fds: Vec<_> = o.fds.iter().map(AsFd::as_fd).collect();
        wire::send(&stream, &o.head, &o.tail, &fds)?;
    }
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    match parse(&wire::recv(&stream)?.head)? {
        Msg::Ack { taken } => Ok(taken),
        other => Err(HandoffError::Protocol(format!(
            "expected the count taken, got {other:?}"
        ))),
    }
}

impl Handover {
    /// Waits, at most `deadline`, until every connection taking part has
    /// stopped reading and has its requests answered: only then may the
    /// router stop taking events (none of theirs is refused).
    pub(crate) async fn quiet(&self, app: &App, deadline: Duration) {
        let Some(gate) = &app.handoff else { return };
        let until = tokio::time::Instant::now() + deadline;
        while gate.quiet.load(Ordering::Acquire) < gate.members.len()
            && tokio::time::Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Sends the history and every connection, then waits for the
    /// successor's count. Returns how many connections were handed.
    ///
    /// # Errors
    /// When the successor went away: the connections handed so far are
    /// its (or lost with it); the rest are closed here as a drain would.
    pub(crate) async fn finish(self, app: &App) -> Result<u64, HandoffError> {
        let Handover { out, writer } = self;
        let gone = || HandoffError::Protocol("the new process stopped reading".into());
        if !app.hub.shares_history() {
            let snapshot = app.hub.memory().export();
            out.send(Out {
                head: head(&Msg::History { snapshot }),
                tail: Zeroizing::default(),
                fds: Vec::new(),
            })
            .await
            .map_err(|_| gone())?;
        }
        let (mut handed, mut queued, mut unread, mut sealed) = (0, 0, 0, 0);
        if let Some(gate) = &app.handoff {
            let rx = gate.rx.lock().unwrap_or_else(|p| p.into_inner()).take();
            gate.extract.cancel();
            gate.members.close();
            if let Some(mut rx) = rx {
                loop {
                    let h = tokio::select! {
                        biased;
                        h = rx.recv() => h,
                        () = gate.members.wait() => rx.try_recv().ok(),
                    };
                    let Some(h) = h else { break };
                    queued += h.state.queued;
                    unread += h.state.read + h.state.partial.map_or(0, |p| p.3);
                    sealed += h.state.tls.map_or(0, |t| t.2);
                    let conn = Out {
                        head: head(&Msg::Conn(Box::new(h.state))),
                        tail: h.tail,
                        fds: vec![h.fd],
                    };
                    out.send(conn).await.map_err(|_| gone())?;
                    handed += 1;
                }
            }
        }
        app.metrics.handed_over.inc_by(handed);
        tracing::info!(
            handed,
            queued_bytes = queued,
            unread_bytes = unread,
            tls_unsent_bytes = sealed,
            "every connection sent to the new process"
        );
        out.send(Out {
            head: head(&Msg::Done { handed }),
            tail: Zeroizing::default(),
            fds: Vec::new(),
        })
        .await
        .map_err(|_| gone())?;
        drop(out);
        let taken = tokio::task::spawn_blocking(move || writer.join())
            .await
            .map_err(|e| HandoffError::Protocol(e.to_string()))?
            .map_err(|_| HandoffError::Protocol("the handoff writer panicked".into()))??;
        if taken != handed {
            tracing::warn!(
                handed,
                taken,
                "the new process took fewer connections than were handed"
            );
        }
        Ok(handed)
    }
}

/// Hands one connection over (its task calls this once its read loop
/// saw the takeover): its answers in flight are queued, its events
/// finish, the broadcasts made before the takeover reach its outbox, and
/// it goes to the writer. `Err` gives the socket back when it cannot
/// move, what it had taken from the outbox queued in it, with the
/// application's end of it if one came; it is then closed with that, or
/// as a drain would close it.
pub(crate) async fn hand(
    app: &App,
    mut socket: Box<Socket>,
    caller: &Caller,
    mut lookups: Lookups,
    mut member: Member,
) -> Result<(), (Box<Socket>, Option<(u16, String)>)> {
    let Some(gate) = &app.handoff else {
        return Err((socket, unmovable(app, caller, Unmoved::default()).end));
    };
    let grace = app.config.server.shutdown_grace();
    // Answers to plain text asked before the takeover: answered here.
    while let Some(reply) = lookups.next().await {
        socket.queue_text(&reply);
        app.metrics.messages_out.inc();
    }
    // Its events in the router: their replies land in the outbox.
    let events = async {
        while caller.outbox.events() > 0 {
            caller.outbox.ready().await;
        }
    };
    let _ = tokio::time::timeout(grace, events).await;
    let mut queued = match released(app, gate, &mut member, caller).await {
        Ok(queued) => queued,
        Err(unmoved) => {
            let mut unmoved = unmovable(app, caller, unmoved);
            let n = crate::connection::queue_taken(&mut socket, &mut unmoved.taken);
            app.metrics.messages_out.inc_by(n as u64);
            return Err((socket, unmoved.end));
        }
    };
    let n = crate::connection::queue_taken(&mut socket, &mut queued);
    app.metrics.messages_out.inc_by(n as u64);
    let parts = socket
        .into_parts()
        .map_err(|socket| (socket, unmovable(app, caller, Unmoved::default()).end))?;
    let Parts {
        tcp,
        tls,
        read,
        partial,
        queued,
        deflate,
    } = parts;
    let fragments = partial.as_ref().map_or(&[][..], |p| &p.3[..]);
    let (tail, tls) = tail_of(&[&read, fragments, &queued], tls);
    let state = ConnState {
        deflate,
        read: read.len(),
        partial: partial
            .map(|(binary, compressed, valid, data)| (binary, compressed, valid, data.len())),
        queued: queued.len(),
        tls,
        ..state_of(app, caller)
    };
    send(gate, tcp, state, tail).await;
    drop(member);
    Ok(())
}

/// Hands one SSE session over (its task calls this once it saw the
/// takeover), as [`hand`] does a WebSocket: its answers in flight land in
/// its outbox, the broadcasts made before the takeover too, and what is
/// queued goes as SSE messages for the new process to write first; over
/// TLS the record layer's state goes too. `Err` gives the stream back
/// when it cannot move, with what was taken from its outbox (and the
/// application's end of it, if that came).
pub(crate) async fn hand_sse(
    app: &App,
    stream: Stream,
    caller: &Caller,
    lookups: &std::sync::atomic::AtomicUsize,
    mut member: Member,
    sse: SseSession,
) -> Result<(), (Stream, Unmoved)> {
    let unmoved = |taken| unmovable(app, caller, Unmoved { taken, end: None });
    let Some(gate) = &app.handoff else {
        return Err((stream, unmoved(Vec::new())));
    };
    // A successor that does not take SSE over TLS (an older binary of the
    // same format) would drop it: it stays, and is closed as a drain
    // would close it.
    if matches!(stream, Stream::Tls(_)) && !gate.sse_tls.load(Ordering::Acquire) {
        return Err((stream, unmoved(Vec::new())));
    }
    let grace = app.config.server.shutdown_grace();
    // Its plain-text lookups and its events in the router: their replies
    // land in the outbox. (Its POSTs are refused from the takeover's
    // start, so nothing new comes.)
    let answered = async {
        while lookups.load(Ordering::Acquire) > 0 || caller.outbox.events() > 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    let _ = tokio::time::timeout(grace, answered).await;
    let mut queued = match released(app, gate, &mut member, caller).await {
        Ok(queued) => queued,
        Err(left) => return Err((stream, unmovable(app, caller, left))),
    };
    // Plaintext the client sent and nothing read is dropped, as the
    // session's own task drops it (an SSE client sends nothing).
    let (tcp, tls) = match stream {
        Stream::Plain(tcp) => (tcp, None),
        Stream::Tls(tls) => match tls.into_moving() {
            Ok((tcp, moving, _unread)) => (tcp, Some(moving)),
            Err(tls) => return Err((Stream::Tls(tls), unmoved(queued))),
        },
        shared @ Stream::Shared(_) => return Err((shared, unmoved(queued))),
    };
    app.metrics
        .messages_out
        .inc_by(crate::outbox::count(&queued) as u64);
    let messages = crate::sse::encode(&mut queued);
    let (tail, tls) = tail_of(&[&messages], tls);
    let state = ConnState {
        queued: messages.len(),
        sse: Some(sse),
        tls,
        ..state_of(app, caller)
    };
    send(gate, tcp, state, tail).await;
    drop(member);
    Ok(())
}

/// A connection's tail: `plain`'s bytes one after the other, then over
/// TLS the record layer's state, the TLS bytes received and not opened
/// and those sealed and not written, with their three lengths. Sized
/// once: a TLS connection's keys ride in it, and a buffer grown would
/// leave a copy behind unwiped.
fn tail_of(
    plain: &[&[u8]],
    tls: Option<crate::tls::Moving>,
) -> (Zeroizing<Vec<u8>>, Option<TlsLengths>) {
    let tls_len = tls
        .as_ref()
        .map_or(0, |m| m.records.len() + m.incoming.len() + m.outgoing.len());
    let plain_len: usize = plain.iter().map(|p| p.len()).sum();
    let mut tail = Zeroizing::new(Vec::with_capacity(plain_len + tls_len));
    for p in plain {
        tail.extend_from_slice(p);
    }
    let tls = tls.map(|moving| {
        tail.extend_from_slice(&moving.records);
        tail.extend_from_slice(&moving.incoming);
        tail.extend_from_slice(&moving.outgoing);
        (
            moving.records.len(),
            moving.incoming.len(),
            moving.outgoing.len(),
        )
    });
    (tail, tls)
}

/// What a connection that cannot move had taken from its outbox: the
/// messages, to be written before it closes, and the application's end
/// of it (code and reason), if that came with them.
#[derive(Debug, Default)]
pub(crate) struct Unmoved {
    pub(crate) taken: Vec<crate::outbox::Outgoing>,
    pub(crate) end: Option<(u16, String)>,
}

/// Marks a connection quiet, waits until the coordinator lets the
/// connections go (every broadcast made before the takeover is in the
/// outbox by then) and takes what its outbox holds. `Err` when it cannot
/// move: the wait ran out, the client is a slow consumer, or the
/// application ended the connection (what was queued before its end is
/// kept, and the end with it).
async fn released(
    app: &App,
    gate: &Gate,
    member: &mut Member,
    caller: &Caller,
) -> Result<Vec<crate::outbox::Outgoing>, Unmoved> {
    let grace = app.config.server.shutdown_grace();
    member.quiet();
    if tokio::time::timeout(grace * 2, gate.extract.cancelled())
        .await
        .is_err()
    {
        return Err(Unmoved::default());
    }
    let mut taken = Vec::new();
    match caller.outbox.take(&mut taken).end(&app.metrics) {
        None => Ok(taken),
        end => Err(Unmoved { taken, end }),
    }
}

/// A connection that cannot move, ended as a drain ends one (1012, a
/// suggested reconnect delay, counted as drained) unless it was ended
/// already: its outbox then says so to whoever takes from it next.
fn unmovable(app: &App, caller: &Caller, unmoved: Unmoved) -> Unmoved {
    if unmoved.end.is_none() {
        let reason = crate::drain::reason(app.config.server.drain_reconnect_ms);
        if caller
            .outbox
            .end_after_replies(crate::drain::SERVICE_RESTART, &reason)
        {
            app.metrics.drained.inc();
        }
    }
    unmoved
}

/// A connection's identity and subscriptions, with no bytes.
fn state_of(app: &App, caller: &Caller) -> ConnState {
    ConnState {
        id: caller.conn_id,
        address: caller.address,
        user: caller.user.as_deref().map(str::to_owned),
        roles: caller.roles.to_vec(),
        info: caller.info.as_deref().map(str::to_owned),
        expires: caller.outbox.expires(),
        topics: app.hub.subscriptions(caller.conn_id),
        deflate: None,
        read: 0,
        partial: None,
        queued: 0,
        sse: None,
        tls: None,
    }
}

/// Sends a connection to the writer: its descriptor, state and bytes.
async fn send(gate: &Gate, tcp: tokio::net::TcpStream, state: ConnState, tail: Zeroizing<Vec<u8>>) {
    let id = state.id;
    let fd: OwnedFd = match tcp.into_std() {
        Ok(tcp) => tcp.into(),
        Err(e) => {
            tracing::warn!(client_id = %id, error = %e, "a connection could not be taken off the reactor: dropped");
            return;
        }
    };
    if gate.tx.send(Handed { state, tail, fd }).await.is_err() {
        tracing::warn!(client_id = %id, "the takeover ended before this connection went: dropped");
    }
}

// ---------------------------------------------------------------------
// The new process.
// ---------------------------------------------------------------------

/// What a takeover gave the new process before it starts: the listening
/// socket, the history and every connection, received whole before the
/// server is built, so the old process can exit (and let go of what it
/// holds, such as the request log's spill directory) while this one
/// builds. The connections are carried on by
/// [`crate::server::Builder::start_taken_over`], before anything new is
/// accepted.
#[derive(Debug)]
pub struct Inherited {
    pub(crate) listener: std::net::TcpListener,
    history: Option<crate::history::Snapshot>,
    conns: Vec<Handed>,
    /// The old process's pid.
    pub pid: u32,
    /// The old process's version.
    pub version: String,
}

/// Connects to the running gale at `server.handoff_socket`, asks to take
/// over and receives everything: the listening socket, the history and
/// every live connection. Once this returns the old process is closing
/// what could not move and exiting.
///
/// # Errors
/// [`HandoffError`]: nothing configured, nobody there, a refusal (an
/// incompatible format, a takeover already under way), or a broken
/// exchange. Before the listeners come the running process serves on in
/// every case.
pub async fn take_over(config: &Config) -> Result<Inherited, HandoffError> {
    let path = config.server.handoff_socket.clone();
    if path.is_empty() {
        return Err(HandoffError::NotConfigured);
    }
    tokio::task::spawn_blocking(move || {
        let stream = UnixStream::connect(&path).map_err(|source| HandoffError::Unreachable {
            path: path.clone(),
            source,
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let hello = Msg::Hello {
            format: FORMAT,
            version: version(),
            pid: std::process::id(),
            takes: TAKES.iter().map(|t| (*t).to_owned()).collect(),
        };
        wire::send(&stream, &head(&hello), &[], &[])?;
        let (pid, theirs) = match parse(&wire::recv(&stream)?.head)? {
            Msg::Accept {
                format: FORMAT,
                version,
                pid,
            } => (pid, version),
            Msg::Refuse { reason } => return Err(HandoffError::Refused(reason)),
            other => {
                return Err(HandoffError::Protocol(format!(
                    "expected accept or refuse, got {other:?}"
                )));
            }
        };
        let got = wire::recv(&stream)?;
        let Msg::Listeners { addrs } = parse(&got.head)? else {
            return Err(HandoffError::Protocol("expected the listeners".into()));
        };
        let Some(fd) = got.fds.into_iter().next() else {
            return Err(HandoffError::Protocol("no listening socket came".into()));
        };
        let listener = std::net::TcpListener::from(fd);
        listener.set_nonblocking(true)?;
        tracing::info!(
            from_pid = pid,
            version = theirs,
            ?addrs,
            "took the listening socket over"
        );
        // The old process quiets its connections (its events finish, its
        // broadcasts flush) before the rest comes.
        stream.set_read_timeout(None)?;
        let (mut history, mut conns) = (None, Vec::new());
        let handed = loop {
            let got = wire::recv(&stream)?;
            match parse(&got.head)? {
                Msg::History { snapshot } => history = Some(snapshot),
                Msg::Conn(state) => {
                    let Some(fd) = got.fds.into_iter().next() else {
                        return Err(HandoffError::Protocol(
                            "a connection came without its socket".into(),
                        ));
                    };
                    conns.push(Handed {
                        state: *state,
                        tail: Zeroizing::new(got.tail),
                        fd,
                    });
                }
                Msg::Done { handed } => break handed,
                other => return Err(HandoffError::Protocol(format!("unexpected {other:?}"))),
            }
        };
        let taken = conns.len() as u64;
        wire::send(&stream, &head(&Msg::Ack { taken }), &[], &[])?;
        tracing::info!(handed, taken, "connections received");
        Ok(Inherited {
            listener,
            history,
            conns,
            pid,
            version: theirs,
        })
    })
    .await
    .map_err(|e| HandoffError::Protocol(e.to_string()))?
}

/// Carries the history and every connection received on in this
/// process; runs before it accepts anything, so none of them misses what
/// new clients publish. Returns the topics they are subscribed to.
pub(crate) fn import(
    app: &Arc<App>,
    history: Option<crate::history::Snapshot>,
    conns: Vec<Handed>,
    permits: &Arc<tokio::sync::Semaphore>,
) -> Vec<String> {
    if let Some(snapshot) = history {
        app.hub.memory().import(snapshot);
    }
    let mut taken = 0;
    let mut topics = std::collections::BTreeSet::new();
    for h in conns {
        topics.extend(h.state.topics.iter().map(|(t, _)| t.clone()));
        match resume(app, h.state, h.tail, h.fd, permits) {
            Ok(()) => taken += 1,
            Err(e) => tracing::warn!(error = %e, "a connection could not be taken over"),
        }
    }
    app.metrics.taken_over.inc_by(taken);
    tracing::info!(taken, topics = topics.len(), "connections taken over");
    topics.into_iter().collect()
}

/// The history and connections of an [`Inherited`], and its listener.
pub(crate) fn into_parts(
    inherited: Inherited,
) -> (
    std::net::TcpListener,
    Option<crate::history::Snapshot>,
    Vec<Handed>,
) {
    (inherited.listener, inherited.history, inherited.conns)
}

/// Whether a connection's parts (read, partial message, queued, and over
/// TLS the record layer, received and unsent bytes) are its tail's bytes
/// exactly: lengths the old process sent, summed without wrapping, so
/// that none can slice past the tail.
fn adds_up(parts: &[usize], tail: usize) -> bool {
    parts
        .iter()
        .try_fold(0_usize, |sum, n| sum.checked_add(*n))
        .is_some_and(|n| n == tail)
}

/// What a taken-over connection goes on as.
enum Going {
    Ws(Box<Socket>),
    Sse(SseSession, crate::listener::Detached),
}

/// Carries one connection on in this process.
fn resume(
    app: &Arc<App>,
    state: ConnState,
    mut tail: Zeroizing<Vec<u8>>,
    fd: OwnedFd,
    permits: &Arc<tokio::sync::Semaphore>,
) -> io::Result<()> {
    // A TLS connection's keys ride in its tail, zeroized however this
    // ends (what the connection goes on with is copied out first).
    let tcp = std::net::TcpStream::from(fd);
    tcp.set_nonblocking(true)?;
    let tcp = tokio::net::TcpStream::from_std(tcp)?;
    let partial_len = state.partial.map_or(0, |p| p.3);
    let (records, incoming, outgoing) = state.tls.unwrap_or_default();
    let lengths = [
        state.read,
        partial_len,
        state.queued,
        records,
        incoming,
        outgoing,
    ];
    if !adds_up(&lengths, tail.len()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a connection's bytes do not add up",
        ));
    }
    let plain_end = state.read + partial_len + state.queued;
    let tls = state.tls.map(|_| {
        let at = plain_end;
        let moving = crate::tls::Moving {
            records: Zeroizing::new(tail[at..at + records].to_vec()),
            incoming: tail[at + records..at + records + incoming].to_vec(),
            outgoing: tail[at + records + incoming..].to_vec(),
        };
        tail[at..].zeroize();
        moving
    });
    tail.truncate(plain_end);
    let Ok(permit) = permits.clone().try_acquire_owned() else {
        return Err(io::Error::other(
            "server.max_connections reached: the connection is dropped",
        ));
    };
    let tail = bytes::Bytes::from(std::mem::take(&mut *tail));
    // The stream is made first: one that cannot go on (a TLS state that
    // does not import) leaves nothing behind in the hub.
    let going = match state.sse {
        Some(sse) => {
            if state.read + partial_len > 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "an SSE session with bytes read",
                ));
            }
            let stream = match tls {
                None => Stream::Plain(tcp),
                Some(moving) => Stream::Tls(Box::new(crate::tls::TlsStream::resume(tcp, moving)?)),
            };
            Going::Sse(
                sse,
                crate::listener::Detached {
                    stream,
                    permit,
                    counted: None,
                },
            )
        }
        None => {
            let read = tail.slice(..state.read);
            let partial = state.partial.map(|(binary, compressed, valid, len)| {
                (
                    binary,
                    compressed,
                    valid,
                    tail.slice(state.read..state.read + len),
                )
            });
            let queued = tail.slice(state.read + partial_len..);
            let parts = Parts {
                tcp,
                tls,
                read,
                partial,
                queued,
                deflate: state.deflate,
            };
            Going::Ws(Box::new(Socket::resume(
                parts,
                crate::server::limits(&app.config.server),
                app.metrics.clone(),
                permit,
            )?))
        }
    };
    let who = crate::identity::Identity {
        user: state.user.map(Arc::from),
        roles: state.roles.into(),
        expires: state.expires,
        info: state.info.map(Arc::from),
        topics: Vec::new(),
    };
    let caller = crate::connection::new_caller(app, state.id, state.address, who);
    caller.outbox.set_expires(state.expires);
    app.hub.join_resumed(&caller);
    for (topic, announced) in &state.topics {
        if let Err(e) = app.hub.resubscribe(state.id, topic, *announced) {
            tracing::warn!(client_id = %state.id, topic, error = %e, "a subscription could not be taken over");
        }
    }
    let socket = match going {
        Going::Ws(socket) => socket,
        Going::Sse(sse, conn) => {
            crate::sse::resume(app, caller, sse.session, sse.chunked, conn, tail);
            return Ok(());
        }
    };
    let held = crate::connection::Held::new(
        Some(app.admission.session(state.address)),
        app.tracker.token(),
    );
    // The connection's future itself, no `async` block around it (see
    // `connection::serve`).
    tokio::spawn(crate::connection::resume(app.clone(), socket, caller, held));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::adds_up;

    #[test]
    fn a_connections_parts_add_up_without_wrapping() {
        assert!(adds_up(&[3, 4, 5], 12));
        assert!(adds_up(&[3, 4, 5, 229, 0, 7], 248));
        assert!(!adds_up(&[3, 4, 5], 13));
        // Lengths that wrap around to the tail's: refused, not sliced.
        assert!(!adds_up(&[usize::MAX, 0, 11], 10));
        assert!(!adds_up(&[0, usize::MAX, 11], 10));
        assert!(!adds_up(&[0, 0, 0, usize::MAX, 11, 0], 10));
    }
}
