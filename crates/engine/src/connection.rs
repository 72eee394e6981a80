//! One WebSocket connection: read messages, answer plain text through the
//! application's text handler concurrently, hand events to the router,
//! write the replies, ping when idle, and close with the right code.
//!
//! A connection is one task. Its plain-text answers in flight live in a
//! `FuturesUnordered` inside that task: no spawn per message, each
//! progresses independently (one slow answer never delays another), and
//! their number is bounded by `server.max_inflight_per_connection`: at the
//! bound the task stops reading, so TCP pushes back on the client instead
//! of the server buffering without limit.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::time::Instant;
use tokio_util::task::task_tracker::TaskTrackerToken;
use uuid::Uuid;

use crate::admission::Admitted;
use crate::identity::Identity;
use crate::outbox::{KEEP_CAPACITY, Outbox, Outgoing, Taken};
use crate::protocol::{ErrorBody, ErrorCode, Incoming, ServerMessage, classify, reply_json};
use crate::router::Caller;
use crate::server::App;
use crate::websocket::{self, Message, Socket, Utf8Bytes, close_code};

/// A client that has not taken a frame for this long is dropped.
pub(crate) const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long to wait for the peer's answer to our close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the read loop ended.
#[derive(Debug)]
enum End {
    /// The server is shutting down: finish in-flight work, close 1001.
    Shutdown,
    /// The client sent a close frame (its answer is queued).
    ClientClosed,
    /// The socket is gone (reset, EOF, write failure).
    Gone,
    /// No frame from the peer for two ping intervals.
    Dead,
    /// The client broke the protocol: close with this code.
    Violation(u16, &'static str),
    /// The client reads too slowly for its outbound queue.
    SlowConsumer,
    /// The connection's token expired (`auth.close_on_expiry`).
    Expired,
    /// The application (or the server API) ended it: close with this code
    /// and reason.
    Ended(u16, String),
    /// A takeover: hand the connection to the new process.
    Handoff,
}

/// Counts an open connection in the gauges for as long as it lives.
pub(crate) struct Counted(Arc<crate::metrics::Metrics>);

impl Counted {
    pub(crate) fn open(app: &App) -> Counted {
        app.metrics.connections_total.inc();
        Counted::resumed(app)
    }

    /// A connection taken over from the previous process: open now, not
    /// opened now.
    pub(crate) fn resumed(app: &App) -> Counted {
        app.metrics.connections.inc();
        Counted(app.metrics.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.connections.dec();
    }
}

/// What a connection holds for its whole life besides its state, let go
/// when it ends: its address's place in the admission counts, and a token
/// of the server's task tracker (shutdown waits for every one).
pub(crate) struct Held {
    _admitted: Option<Admitted>,
    _tracked: TaskTrackerToken,
}

impl Held {
    pub(crate) fn new(admitted: Option<Admitted>, tracked: TaskTrackerToken) -> Held {
        Held {
            _admitted: admitted,
            _tracked: tracked,
        }
    }
}

/// Serves one upgraded connection until it ends.
///
/// Not an `async fn`: the connection's task is the one state machine of
/// [`run`], not one nested in another that would hold its arguments
/// twice (every idle connection pays for the task's size). Spawn the
/// future as it is: an `async` block around it would keep its own
/// captures beside it.
pub(crate) fn serve(
    app: Arc<App>,
    socket: Box<Socket>,
    client_id: Uuid,
    who: Identity,
    address: std::net::IpAddr,
    held: Held,
) -> impl Future<Output = ()> + Send {
    let counted = Counted::open(&app);
    tracing::debug!(%client_id, user = ?who.user, "connected");
    let caller = opened(&app, client_id, address, who);
    run(app, socket, caller, true, held, counted)
}

/// Serves a connection taken over from the previous process, from where
/// it was: joined already, no greeting (it had one).
pub(crate) fn resume(
    app: Arc<App>,
    socket: Box<Socket>,
    caller: Caller,
    held: Held,
) -> impl Future<Output = ()> + Send {
    let counted = Counted::resumed(&app);
    tracing::debug!(client_id = %caller.conn_id, "taken over");
    run(app, socket, caller, false, held, counted)
}

/// The connection's life. Not an `async fn`: one would copy each argument
/// into its state beside the argument itself (an `async` block uses what
/// it captures in place), and every connection's task pays for its size.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn holds its arguments twice"
)]
fn run(
    app: Arc<App>,
    socket: Box<Socket>,
    caller: Caller,
    greet: bool,
    held: Held,
    counted: Counted,
) -> impl Future<Output = ()> + Send {
    async move {
        // Captured (named, so the block takes them) and left in place: a
        // local would hold them twice. Captures drop when the block ends,
        // after its locals, so after the socket (its descriptor and its
        // place under `max_connections`): the count first, then what is
        // held, as they are named here.
        let _ = (&counted, &held);
        let mut socket = socket;
        let client_id = caller.conn_id;
        // Connections take part in a takeover from the start (a
        // connection that opens while one is under way is handed over too).
        let handing = app.handoff.as_ref().map(|h| h.join());
        let (end, mut inflight) =
            read_loop(&app, &caller, &mut socket, greet, handing.is_some()).await;
        tracing::debug!(%client_id, reason = ?end, "closing");
        if let (End::Handoff, Some(handing)) = (&end, handing) {
            // Boxed: a takeover's state (the connection's whole state, the
            // send to the writer) would otherwise make every connection's
            // task, idle or not, as large as it.
            let handed = Box::pin(crate::handoff::hand(
                &app,
                socket,
                &caller,
                inflight.drain(),
                handing,
            ));
            match handed.await {
                Ok(()) => {
                    // Moved, not closed: no leave, no disconnect hook.
                    app.hub.forget(client_id);
                    app.router.connection_closed(client_id);
                    caller.outbox.close();
                    return;
                }
                Err((back, ended)) => {
                    // It could not move: what is queued goes, then it
                    // closes with the end the takeover found (the
                    // application's, a slow consumer's) or, as its outbox
                    // now says, as a drain would.
                    socket = back;
                    let flushed =
                        flush_outbox(&app, &mut socket, &caller.outbox, &mut Vec::new()).await;
                    let end = match (ended, flushed) {
                        (Some((code, reason)), _) => End::Ended(code, reason),
                        (None, Err(end)) if !matches!(end, End::Handoff) => end,
                        _ => End::Ended(
                            crate::drain::SERVICE_RESTART,
                            crate::drain::reason(app.config.server.drain_reconnect_ms),
                        ),
                    };
                    close_for(&app, &mut socket, &end).await;
                    finish(&app, &caller, Lookups::default()).await;
                    return;
                }
            }
        }

        let drained = matches!(end, End::Ended(crate::drain::SERVICE_RESTART, _));
        if matches!(end, End::Shutdown) || drained {
            // Answer what was asked and flush what was queued (on shutdown
            // the router has drained by now; a drained connection waits for
            // its own events) before saying goodbye.
            while let Some(reply) = inflight.next().await {
                send(&app, &mut socket, reply).await;
            }
            if drained {
                let events = async {
                    while caller.outbox.events() > 0 {
                        caller.outbox.ready().await;
                    }
                };
                // Boxed, as the takeover: a timer is large, and every task
                // would carry room for it.
                let grace = app.config.server.shutdown_grace();
                let _ = Box::pin(tokio::time::timeout(grace, events)).await;
            }
            let _ = flush_outbox(&app, &mut socket, &caller.outbox, &mut Vec::new()).await;
        }
        close_for(&app, &mut socket, &end).await;
        finish(&app, &caller, inflight).await;
    }
}

/// A closed connection's goodbye: out of the hub, the application told.
async fn finish(app: &App, caller: &Caller, mut inflight: Lookups) {
    let client_id = caller.conn_id;
    app.hub.leave(client_id);
    app.hooks.disconnected(caller.who());
    app.router.connection_closed(client_id);
    caller.outbox.close();
    // Nobody is left to read these replies, but each lookup still ends
    // and writes its request-log row.
    while inflight.next().await.is_some() {}
    tracing::debug!(%client_id, "disconnected");
}

/// A connection that opened (WebSocket or SSE): its caller, joined to the
/// hub, its identity's expiry set, subscribed to the topics the
/// application gave it at connect.
pub(crate) fn opened(
    app: &Arc<App>,
    conn_id: Uuid,
    address: std::net::IpAddr,
    who: Identity,
) -> Caller {
    let (expires, topics) = (who.expires, who.topics.clone());
    let caller = new_caller(app, conn_id, address, who);
    join(app, &caller, expires, topics);
    caller
}

/// Joins `caller` to the hub: its identity's end (`expires`), and the
/// topics the application subscribed it to at connect (no rules asked,
/// no recovery: the application's own choice).
pub(crate) fn join(app: &Arc<App>, caller: &Caller, expires: Option<u64>, topics: Vec<String>) {
    caller.outbox.set_expires(expires);
    app.hub.join(caller);
    for topic in topics {
        let announce = app.hooks.join_leave(&topic);
        if let Err(e) = app
            .hub
            .subscribe_announced(caller.conn_id, &topic, announce)
        {
            tracing::debug!(client_id = %caller.conn_id, topic, error = %e, "server-side subscription refused");
        }
    }
}

/// Asks the application to extend the connection's identity once it is
/// near its end (`at`, Unix seconds): within a minute of it. One refresh
/// at a time; one that cannot reach the application is tried again at the
/// next tick, until the end, when the connection closes with 1008.
pub(crate) fn refresh_if_due(app: &Arc<App>, caller: &Caller, at: u64) {
    if at.saturating_sub(unix_now()) > REFRESH_AHEAD_S || !caller.outbox.start_refresh() {
        return;
    }
    let Some(refresh) = app.hooks.refresh(caller.who()) else {
        // Nobody extends identities: it ends at `at`. Left marked as
        // refreshing, so this is not asked again.
        return;
    };
    let outbox = caller.outbox.clone();
    app.tracker.spawn(async move {
        match refresh.await {
            Ok(r) => outbox.set_expires(Some(r.expire_at)),
            Err(crate::hooks::Refusal::Disconnect { code, reason }) => {
                outbox.end(code, &reason);
            }
            Err(crate::hooks::Refusal::Denied(e))
                if matches!(
                    e.code,
                    ErrorCode::UpstreamUnavailable | ErrorCode::Timeout | ErrorCode::SystemOverloaded
                ) =>
            {
                tracing::debug!(error = %e.message, "refresh failed; trying again at the next tick");
            }
            Err(crate::hooks::Refusal::Denied(e)) => {
                tracing::debug!(error = %e.message, "refresh refused");
                outbox.end(
                    close_code::POLICY_VIOLATION,
                    "the application did not extend this connection",
                );
            }
        }
        outbox.refresh_done();
    });
}

/// How soon before its identity ends a connection asks for a refresh.
const REFRESH_AHEAD_S: u64 = 60;

/// A connection's caller: who it is, and its own bounded outbox.
pub(crate) fn new_caller(
    app: &App,
    conn_id: Uuid,
    address: std::net::IpAddr,
    who: Identity,
) -> Caller {
    let c = &app.config.connection;
    Caller {
        conn_id,
        address,
        user: who.user,
        roles: who.roles,
        info: who.info,
        outbox: Arc::new(Outbox::new(
            c.outbound_queue,
            c.slow_consumer,
            app.metrics.clone(),
        )),
    }
}

/// Ends the WebSocket the way `end` calls for: the matching close frame,
/// or flushing the answer to the client's own close.
async fn close_for(app: &App, socket: &mut Socket, end: &End) {
    let m = &app.metrics;
    match end {
        End::Shutdown => close(socket, close_code::GOING_AWAY, "server shutting down").await,
        End::SlowConsumer => {
            m.slow_consumers.inc();
            close(socket, close_code::TRY_AGAIN_LATER, "slow consumer").await;
        }
        End::Violation(code, reason) => {
            m.protocol_errors.inc();
            close(socket, *code, reason).await;
        }
        End::Expired => close(socket, close_code::POLICY_VIOLATION, "token expired").await,
        End::Ended(code, reason) => close(socket, *code, reason).await,
        End::ClientClosed => {
            let _ = write_all(socket).await;
        }
        End::Gone | End::Dead | End::Handoff => {}
    }
}

/// Serves one `/echo` connection: every text or binary message is sent
/// back unchanged. Same limits, buffers, close codes and shutdown as
/// [`serve`]; nothing else.
// `held` first: an async fn's arguments drop in reverse order, so it goes
// after the socket, as for `run`.
pub(crate) async fn echo(_held: Held, app: Arc<App>, mut socket: Box<Socket>) {
    let _counted = Counted::open(&app);
    let m = &app.metrics;
    let closing = app.closing.cancelled();
    tokio::pin!(closing);
    let end = loop {
        tokio::select! {
            biased;
            () = &mut closing => break End::Shutdown,
            msg = socket.recv() => match msg {
                Ok(msg @ (Message::Text(_) | Message::Binary(_))) => {
                    m.messages_in.inc();
                    match msg {
                        Message::Text(t) => socket.queue_text(&t),
                        Message::Binary(b) => socket.queue_binary(&b),
                        _ => {}
                    }
                    if !flushed(&mut socket).await {
                        break End::Gone;
                    }
                    m.messages_out.inc();
                }
                Ok(Message::Close) => break End::ClientClosed,
                Ok(Message::Ping | Message::Pong | Message::Owed) => {
                    if !flushed(&mut socket).await {
                        break End::Gone;
                    }
                }
                Err(e) => break read_error(e),
            }
        }
    };
    close_for(&app, &mut socket, &end).await;
}

/// One plain-text message being answered. Boxed: a `FuturesUnordered` allocates a
/// stub task the size of its future type up front.
type Lookup = std::pin::Pin<Box<dyn Future<Output = String> + Send>>;

/// The plain-text messages being answered on one connection. The set exists only
/// while a lookup does: a `FuturesUnordered` allocates about 200 bytes
/// (its ready queue and stub task) that an idle connection need not pay.
#[derive(Default)]
pub(crate) struct Lookups(Option<FuturesUnordered<Lookup>>);

impl Lookups {
    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, FuturesUnordered::len)
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&mut self, lookup: Lookup) {
        self.0
            .get_or_insert_with(FuturesUnordered::new)
            .push(lookup);
    }

    /// Every lookup in flight, taken out (a takeover finishes them).
    fn drain(&mut self) -> Lookups {
        Lookups(self.0.take())
    }

    /// The next reply; `None` when no lookup is in flight.
    pub(crate) async fn next(&mut self) -> Option<String> {
        let set = self.0.as_mut()?;
        let reply = set.next().await;
        if set.is_empty() {
            self.0 = None;
        }
        reply
    }
}

/// Unix seconds now.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn read_loop(
    app: &Arc<App>,
    caller: &Caller,
    socket: &mut Socket,
    greet: bool,
    handing: bool,
) -> (End, Lookups) {
    let s = &app.config.server;
    let max_inflight = s.max_inflight_per_connection;
    let ping_every = Duration::from_secs(s.ping_interval_s);
    let pinging = !ping_every.is_zero();
    let mut tick = app.ping_clock.subscribe();
    let mut last_seen = Instant::now();
    // A ping went out and no frame has come back since.
    let mut awaiting_pong = false;
    let client_id = caller.conn_id;
    let mut inflight = Lookups::default();
    let mut outgoing = Vec::new();

    if greet {
        let hello = ServerMessage::Connected {
            message: &app.text.greeting,
            client_id,
        }
        .to_json();
        if !send(app, socket, hello).await {
            return (End::Gone, inflight);
        }
    } else if !flushed(socket).await {
        // Taken over: what the previous process had queued goes first.
        return (End::Gone, inflight);
    }
    // Created once, not per pass through the loop: both register with a
    // shared notifier when first polled, which costs a lock each time.
    let closing = app.closing.cancelled();
    tokio::pin!(closing);
    // A takeover wakes every outbox once it starts: checked there, at no
    // cost in the task's size.
    let handing_off = || handing && crate::handoff::started(app);
    if handing_off() {
        return (End::Handoff, inflight);
    }
    let ready = caller.outbox.ready();
    tokio::pin!(ready);
    // Whether the outbox holds the stream (`Outbox::lend`): pushes are
    // then written by whoever sends them, and this task is not woken.
    let mut lent = false;
    let _lent_back = LentBack(&caller.outbox);
    let end = loop {
        if !lent && let Some(stream) = socket.lendable() {
            lent = caller.outbox.lend(stream);
            if lent {
                socket.lent();
            }
        }
        // Lookups and events in the router share the connection's bound;
        // events are also held to the connection's share of the router
        // queue. At either limit the socket is not read: TCP pushes back.
        // A finished event wakes this loop through the outbox.
        let events = caller.outbox.events();
        let may_read = inflight.len() + events < max_inflight
            && (events == 0 || events < app.router.share(max_inflight));
        // The select decides; the write comes after it, so the task never
        // holds a write's state beside the select's (every connection's
        // task is as large as its largest state).
        let write = tokio::select! {
            biased;
            () = &mut closing => break End::Shutdown,
            Some(reply) = inflight.next(), if !inflight.is_empty() => Write::Text(reply),
            () = &mut ready => {
                if handing_off() {
                    break End::Handoff;
                }
                ready.set(caller.outbox.ready());
                Write::Outbox
            }
            msg = socket.recv(), if may_read => {
                last_seen = Instant::now();
                awaiting_pong = false;
                match msg {
                    Ok(Message::Text(text)) => {
                        app.metrics.messages_in.inc();
                        received(app, caller, &mut inflight, text)
                    }
                    Ok(Message::Binary(_)) => {
                        app.metrics.messages_in.inc();
                        Write::Text(ServerMessage::Error {
                            code: ErrorCode::InvalidMessage,
                            message: "binary messages are not supported: send text",
                        }.to_json())
                    }
                    // A ping's pong is queued: it goes out now.
                    Ok(Message::Ping) => Write::Queued,
                    Ok(Message::Pong) => Write::Nothing,
                    // The stream comes back, and the answer goes out.
                    Ok(Message::Owed) => Write::Queued,
                    Ok(Message::Close) => break End::ClientClosed,
                    Err(e) => break read_error(e),
                }
            }
            Ok(()) = tick.changed(), if pinging => {
                // Dead: our ping has gone a whole interval unanswered.
                // Judged from the ping, not from wall-clock silence, so
                // timer jitter never drops a peer that answers.
                if awaiting_pong {
                    break End::Dead;
                }
                // A connection quiet since a burst gives its buffers back.
                caller.outbox.trim();
                release(socket, &mut outgoing);
                if let Some(at) = caller.outbox.expires() {
                    if unix_now() >= at {
                        break End::Expired;
                    }
                    refresh_if_due(app, caller, at);
                }
                if last_seen.elapsed() >= ping_every / 2 {
                    awaiting_pong = true;
                    Write::Ping
                } else {
                    Write::Nothing
                }
            }
        };
        // Whatever this task writes, it writes alone: the stream comes
        // back first, with the end of any frame a lent write began.
        if lent && !matches!(write, Write::Nothing) {
            take_back(&caller.outbox, socket);
            lent = false;
        }
        let written = match write {
            Write::Nothing => true,
            Write::Text(text) => send(app, socket, text).await,
            Write::Ping => {
                socket.queue_ping();
                flushed(socket).await
            }
            Write::Queued => flushed(socket).await,
            Write::Outbox => match flush_outbox(app, socket, &caller.outbox, &mut outgoing).await {
                Ok(()) => true,
                Err(end) => break end,
            },
        };
        if !written {
            break End::Gone;
        }
    };
    // Closing or moving, the socket is this task's alone again.
    take_back(&caller.outbox, socket);
    (end, inflight)
}

/// Takes the socket's stream back from its outbox; the end of a frame a
/// lent write began goes first into the socket, before anything queued
/// since the stream was lent.
fn take_back(outbox: &Outbox, socket: &mut Socket) {
    socket.taken_back(outbox.claim());
}

/// Takes the stream back however the connection's loop ends, a panic
/// included: an outbox must not keep a socket open, or written into,
/// once its task is gone.
struct LentBack<'a>(&'a Outbox);

impl Drop for LentBack<'_> {
    fn drop(&mut self) {
        let _ = self.0.claim();
    }
}

/// One clock for every connection's ping checks, in place of a timer in
/// each (an `Interval` and its boxed `Sleep`: ~160 bytes per connection,
/// idle or not). It ticks every `server.ping_interval_s`; at each tick a
/// connection silent for at least half an interval is pinged, and one
/// whose ping went a whole tick unanswered is dropped.
#[derive(Debug)]
pub struct PingClock(tokio::sync::watch::Sender<()>);

impl PingClock {
    /// A clock that ticks every `every` (never when zero) until `stop`.
    pub(crate) fn start(every: Duration, stop: tokio_util::sync::CancellationToken) -> PingClock {
        let (tx, _) = tokio::sync::watch::channel(());
        if !every.is_zero() {
            let ticks = tx.clone();
            let every = every.max(Duration::from_secs(1));
            tokio::spawn(async move {
                let mut interval = tokio::time::interval_at(Instant::now() + every, every);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        _ = interval.tick() => ticks.send_replace(()),
                    };
                }
            });
        }
        PingClock(tx)
    }

    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<()> {
        self.0.subscribe()
    }
}

/// What one pass of the connection loop leaves to write.
enum Write {
    Nothing,
    /// A reply.
    Text(String),
    /// What the outbox holds.
    Outbox,
    /// A ping.
    Ping,
    /// What the socket queued itself (a pong).
    Queued,
}

/// A text message from the client: plain text goes to the application's
/// text handler, an event to the router, anything else is answered with
/// an error.
fn received(app: &Arc<App>, caller: &Caller, inflight: &mut Lookups, text: Utf8Bytes) -> Write {
    match classify(text.as_str()) {
        Incoming::Text(_) => match &app.text.handler {
            Some(handler) => {
                let ctx = crate::router::Ctx {
                    app: app.clone(),
                    caller: caller.clone(),
                };
                inflight.push(handler(ctx, text));
                Write::Nothing
            }
            None => Write::Text(invalid_reply(None, NO_TEXT)),
        },
        Incoming::Event(event) => {
            app.router.dispatch(app, caller, event);
            Write::Nothing
        }
        Incoming::Invalid { reply_to, message } => {
            app.router.count_invalid_message();
            Write::Text(invalid_reply(reply_to, &message))
        }
    }
}

/// What plain text is told when the application serves none.
pub(crate) const NO_TEXT: &str =
    "this server takes JSON events only: send {\"event\":…,\"data\":…,\"ref\":…}";

/// The answer to a message that is neither plain text nor an event.
pub(crate) fn invalid_reply(reply_to: Option<serde_json::Value>, message: &str) -> String {
    match reply_to {
        Some(r) => reply_json(&r, &Err(ErrorBody::new(ErrorCode::InvalidMessage, message))),
        None => ServerMessage::Error {
            code: ErrorCode::InvalidMessage,
            message,
        }
        .to_json(),
    }
}

/// Maps a read error to how the connection ends.
fn read_error(e: websocket::Error) -> End {
    match e {
        websocket::Error::Violation(code, reason) => {
            tracing::debug!(code, reason, "protocol violation");
            End::Violation(code, reason)
        }
        other => {
            tracing::debug!(error = %other, "connection error");
            End::Gone
        }
    }
}

/// Writes everything queued in the outbox with one flush.
async fn flush_outbox(
    app: &App,
    socket: &mut Socket,
    outbox: &Outbox,
    buf: &mut Vec<Outgoing>,
) -> Result<(), End> {
    let ending = match outbox.take(buf) {
        Taken::SlowConsumer => return Err(End::SlowConsumer),
        Taken::End(code, reason) => Some(End::Ended(code, reason)),
        Taken::Messages => None,
    };
    // Nothing taken may still leave the end of a frame a lent write
    // began (`take_back`): it is written now, not at the next push.
    if buf.is_empty() && !socket.has_queued() {
        return ending.map_or(Ok(()), Err);
    }
    let n = queue_taken(socket, buf) as u64;
    let write = write_all(socket);
    // A client that stops reading blocks this write; meanwhile its outbox
    // may overflow, and the slow-consumer policy must act then, not after
    // the send timeout (the close frame queues behind what is on its way).
    // Biased: a write that completes at once (a client that reads) never
    // registers the overflow waiter, which would cost a lock per flush.
    let mut watched = false;
    // A takeover does not wait for a write a client holds up: what is
    // left of it stays queued in the socket (over TLS, what was sealed
    // stays in the stream) and moves with it.
    let handing = app.handoff.as_ref().map(|h| &h.started_flag);
    let written = tokio::select! {
        biased;
        written = write => Some(written),
        stop = overflowed(outbox, &mut watched, handing) => match stop {
            Stop::Overflow => None,
            Stop::Handoff => {
                buf.clear();
                app.metrics.messages_out.inc_by(n);
                return Err(End::Handoff);
            }
        },
    };
    match written {
        Some(Some(Ok(()))) => {
            app.metrics.messages_out.inc_by(n);
            // A burst's buffers are kept while it lasts (allocating them
            // again for every flush cost more than the flush's own work)
            // and given back at the first light flush, or at the next ping
            // tick (`release`); with pings off there is no tick, so after
            // every flush.
            if n as usize <= KEEP_CAPACITY || app.config.server.ping_interval_s == 0 {
                release(socket, buf);
            }
            // Wake-ups that came while `overflowed` watched were taken by
            // it: wake the loop again, so what queued meanwhile goes out.
            if watched {
                outbox.wake();
            }
            ending.map_or(Ok(()), Err)
        }
        None => {
            buf.clear();
            Err(End::SlowConsumer)
        }
        Some(_) => {
            buf.clear();
            Err(End::Gone)
        }
    }
}

/// Moves what was taken from the outbox into the socket's write queue;
/// returns how many messages. Each message's frame was made once for
/// all its recipients, a run's frames in one buffer (runs that continue
/// one another as one): queued here without a copy, and written with the
/// rest in one vectored write.
pub(crate) fn queue_taken(socket: &mut Socket, buf: &mut Vec<Outgoing>) -> usize {
    // A compressing socket writes message by message anyway; joined, it
    // would compress again a message another run's copy of it has.
    if !socket.compresses() {
        crate::outbox::coalesce(buf);
    }
    let mut n = 0;
    socket.reserve(buf.len());
    for m in buf.drain(..) {
        n += m.len();
        match m {
            Outgoing::One { text, .. } => socket.queue_prepared(text),
            Outgoing::Run { run, from } => socket.queue_run(run, from),
        }
    }
    n
}

/// Gives back what a burst grew in the socket's write queue and the
/// flush buffer, once they are empty.
fn release(socket: &mut Socket, buf: &mut Vec<Outgoing>) {
    socket.trim();
    if buf.is_empty() && buf.capacity() > KEEP_CAPACITY {
        *buf = Vec::new();
    }
}

/// Resolves once the outbox is marked as a slow consumer; sets `watched`
/// once it starts taking the outbox's wake-ups.
async fn overflowed(
    outbox: &Outbox,
    watched: &mut bool,
    handing: Option<&std::sync::atomic::AtomicBool>,
) -> Stop {
    *watched = true;
    loop {
        outbox.ready().await;
        if outbox.overflowed() {
            return Stop::Overflow;
        }
        if handing.is_some_and(|h| h.load(std::sync::atomic::Ordering::Acquire)) {
            return Stop::Handoff;
        }
    }
}

/// Why a blocked write stopped being waited for.
enum Stop {
    /// The outbox overflowed: a slow consumer.
    Overflow,
    /// A takeover began.
    Handoff,
}

/// Sends a text message; false when the client is gone or too slow.
async fn send(app: &App, socket: &mut Socket, text: String) -> bool {
    socket.queue_text(&text);
    let sent = flushed(socket).await;
    if sent {
        app.metrics.messages_out.inc();
    }
    sent
}

/// Writes what the socket has queued; false when the client is gone or
/// too slow.
async fn flushed(socket: &mut Socket) -> bool {
    matches!(write_all(socket).await, Some(Ok(())))
}

/// Writes everything the socket has queued, under [`SEND_TIMEOUT`];
/// `None` when it timed out. The timer is made (boxed) only once a write
/// has to wait: every connection's task carries room for this future,
/// idle or not, so it is kept small.
fn write_all(socket: &mut Socket) -> impl Future<Output = Option<std::io::Result<()>>> {
    let mut timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(move |cx| match socket.poll_flush(cx) {
        std::task::Poll::Ready(r) => std::task::Poll::Ready(Some(r)),
        std::task::Poll::Pending => {
            let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(SEND_TIMEOUT)));
            timer.as_mut().poll(cx).map(|()| None)
        }
    })
}

/// Sends a close frame and waits briefly for the peer's answer, unless
/// the peer's close came already (an invalid one, answered with 1002 or
/// 1007): then the connection closes at once, as RFC 6455 prefers of a
/// server.
async fn close(socket: &mut Socket, code: u16, reason: &str) {
    socket.queue_close(code, reason);
    if flushed(socket).await && !socket.got_close() {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            while let Ok(msg) = socket.recv().await {
                if let Message::Close = msg {
                    break;
                }
            }
        })
        .await;
    }
}
