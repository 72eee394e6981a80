//! The fallback transport, for clients that cannot open a WebSocket (a
//! proxy that strips `Upgrade`, an old corporate network): Server-Sent
//! Events carry server → client, `POST` carries client → server, on the
//! same events, identity, limits, push and recovery as `/ws`.
//!
//! `GET /sse` passes the same checks as a WebSocket handshake (admission,
//! Origin, token) and opens a session: a [`Caller`] with its own bounded
//! outbox, joined to the hub like any connection. The response is an
//! event stream whose first message is the `connected` greeting with the
//! session's id; every reply and push follows as one `data:` message, and
//! a comment line keeps the stream alive every `server.ping_interval_s`.
//! `POST /sse/SESSION` takes one message (exactly what a WebSocket text
//! frame would carry) and answers 202; its reply comes on the stream.
//!
//! The session id is a 128-bit random bearer secret, distinct from the
//! `client_id` others may see. A session lives as long as its stream:
//! when the client goes (or the stream ends for shutdown, a slow consumer
//! or an expired token) it leaves the hub and a POST to it answers 404.
//! Sessions are bounded by `sse.max_sessions` (503 past it) and, like
//! WebSocket connections, by the per-address admission limits.
//!
//! Once the response head is written, the session's connection is taken
//! from hyper (`ConnAbort::detach`) and served by the session's own task,
//! as a WebSocket is after its upgrade: an idle session holds no HTTP
//! buffers. The task writes each message as it comes (a chunk of the
//! response body), watches the socket for the client's end, and ends a
//! client that stops reading while something waits for it after 10 s,
//! as on a WebSocket.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, Version, header};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::connection::{Counted, SEND_TIMEOUT, invalid_reply, join, new_caller, refresh_if_due};
use crate::listener::{ConnAbort, Detached};
use crate::outbox::{Outgoing, Taken};
use crate::protocol::{Incoming, classify};
use crate::router::Caller;
use crate::server::App;
use crate::transport::Stream;

/// One open session.
struct Session {
    caller: Caller,
    /// Plain-text messages being answered for it.
    lookups: AtomicUsize,
}

/// The open sessions, by id.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Arc<Session>>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("open", &self.len())
            .finish()
    }
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        // Inserts and removes are single map operations.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sessions open now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.lock().get(id).cloned()
    }
}

/// Ends a session when its stream is dropped, however that happens.
struct Open {
    app: Arc<App>,
    id: String,
    session: Arc<Session>,
    /// Handed to a new process: it leaves nothing and says no goodbye.
    moved: bool,
    _counted: Counted,
    _admitted: crate::admission::Admitted,
    _tracked: tokio_util::task::task_tracker::TaskTrackerToken,
}

impl Drop for Open {
    fn drop(&mut self) {
        let app = &self.app;
        let conn_id = self.session.caller.conn_id;
        {
            let mut map = app.sessions.lock();
            map.remove(&self.id);
            app.metrics.sse_sessions.set(map.len() as i64);
        }
        if self.moved {
            app.hub.forget(conn_id);
        } else {
            app.hub.leave(conn_id);
            app.hooks.disconnected(self.session.caller.who());
        }
        app.router.connection_closed(conn_id);
        self.session.caller.outbox.close();
        tracing::debug!(client_id = %conn_id, moved = self.moved, "sse session closed");
    }
}

/// The stream's state between two chunks.
struct Feed {
    open: Open,
    hello: Option<Bytes>,
    tick: tokio::sync::watch::Receiver<()>,
    buf: Vec<Outgoing>,
    done: bool,
    /// It takes part in a takeover (a handoff socket is set).
    handing: bool,
}

impl Feed {
    /// A session's stream, `first` written before anything queued.
    fn new(
        app: Arc<App>,
        id: String,
        session: Arc<Session>,
        counted: Counted,
        admitted: crate::admission::Admitted,
        first: Option<Bytes>,
    ) -> Feed {
        Feed {
            hello: first,
            tick: app.ping_clock.subscribe(),
            buf: Vec::new(),
            done: false,
            handing: false,
            open: Open {
                _counted: counted,
                _admitted: admitted,
                _tracked: app.tracker.token(),
                app,
                id,
                session,
                moved: false,
            },
        }
    }
}

/// What a stream does next.
enum Next {
    /// Writes these bytes.
    Send(Bytes),
    /// Ends the body.
    End,
    /// Moves to the process taking over.
    Handoff,
}

/// `GET /sse`: opens a session and streams it.
pub(crate) async fn open(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    abort: Option<axum::Extension<ConnAbort>>,
    counted: Option<axum::Extension<crate::listener::Counted>>,
    version: Version,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    // The session's task takes the connection from gale's listener.
    let Some(axum::Extension(abort)) = abort else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "SSE sessions are served only by gale's own listener\n",
        )
            .into_response();
    };
    let crate::server::Admitted {
        admission,
        who,
        address,
        client,
    } = match crate::server::admit(&app, peer, counted.is_some(), &headers, &uri, "sse").await {
        Ok(ok) => ok,
        Err(refused) => return refused,
    };
    // Counted as a connection at the accept, or with its session behind a
    // proxy; a session either way.
    let admitted = admission.unwrap_or_else(|| app.admission.session(address));
    let (expires, topics) = (who.expires, who.topics.clone());
    let caller = new_caller(&app, client, address, who);
    let id = Uuid::new_v4().simple().to_string();
    let session = Arc::new(Session {
        caller,
        lookups: AtomicUsize::new(0),
    });
    {
        let mut map = app.sessions.lock();
        if map.len() >= app.config.sse.max_sessions {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the server holds its maximum of {} SSE sessions (sse.max_sessions)\n",
                    app.config.sse.max_sessions
                ),
            )
                .into_response();
        }
        map.insert(id.clone(), session.clone());
        app.metrics.sse_sessions.set(map.len() as i64);
    }
    join(&app, &session.caller, expires, topics);
    let client_id = session.caller.conn_id;
    tracing::debug!(%client_id, user = ?session.caller.user, "sse session opened");
    let hello = serde_json::json!({
        "type": "connected",
        "message": &*app.text.greeting,
        "client_id": client_id,
        "session": id,
        "transport": "sse",
    })
    .to_string();
    let hello = Bytes::from(format!("retry: 2000\ndata: {hello}\n\n"));
    let counted = Counted::open(&app);
    let feed = Feed::new(app, id, session, counted, admitted, Some(hello));
    // hyper writes the head, then the session's own task serves the
    // connection (the body is polled once, to ask for it). hyper frames an
    // HTTP/1.1 body of unknown length in chunks, an HTTP/1.0 one by the
    // connection's end; the task goes on the same way.
    let chunked = version >= Version::HTTP_11;
    let body = futures_util::stream::once(async move {
        abort.detach(move |conn| {
            tokio::spawn(run(conn, feed, chunked));
        });
        std::future::pending::<Result<Bytes, Infallible>>().await
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache, no-transform"),
            // Proxies that buffer responses (nginx) would hold pushes.
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// Serves a session on its connection: each message as it comes, until
/// the stream ends (shutdown, a slow consumer, an expired token), the
/// client goes, a write waits past [`SEND_TIMEOUT`], or a takeover moves
/// it to a new process.
async fn run(conn: Detached, mut feed: Feed, chunked: bool) {
    let Detached {
        mut stream,
        permit: _permit,
        counted: _counted,
    } = conn;
    let app = feed.open.app.clone();
    // Sessions take part in a takeover, as WebSockets do, over TLS too.
    let member = app.handoff.as_ref().map(|gate| gate.join());
    feed.handing = member.is_some();
    // A TLS stream taken over may hold records the previous process
    // sealed and did not write: they go out now, not with the next push.
    if matches!(stream, Stream::Tls(_))
        && !matches!(
            tokio::time::timeout(SEND_TIMEOUT, stream.flush()).await,
            Ok(Ok(()))
        )
    {
        return;
    }
    loop {
        let next = tokio::select! {
            next = next_chunk(&mut feed) => next,
            () = client_gone(&mut stream) => return,
        };
        let bytes = match next {
            Next::Send(bytes) => bytes,
            Next::End => break,
            Next::Handoff => {
                let Some(member) = member else {
                    return;
                };
                // Boxed: a takeover's state would otherwise make every
                // session's task as large as it.
                return Box::pin(hand(stream, feed, member, chunked)).await;
            }
        };
        let bytes = framed(bytes, chunked);
        match tokio::time::timeout(SEND_TIMEOUT, write(&mut stream, &bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                tracing::debug!(client_id = %feed.open.session.caller.conn_id, "sse session: the client stopped reading");
                app.metrics.slow_consumers.inc();
                return;
            }
        }
    }
    end(&mut stream, chunked).await;
}

/// Ends the body, then the connection.
async fn end(stream: &mut Stream, chunked: bool) {
    let _ = tokio::time::timeout(SEND_TIMEOUT, async {
        if chunked {
            write(stream, b"0\r\n\r\n").await?;
        }
        stream.shutdown().await
    })
    .await;
}

/// Hands the session to the process taking over: the same session id,
/// stream and subscriptions go on there. One that cannot move ends as a
/// drain would end it (1012, with a reconnect delay).
async fn hand(stream: Stream, mut feed: Feed, member: crate::handoff::Member, chunked: bool) {
    let app = feed.open.app.clone();
    let session = feed.open.session.clone();
    let moving = crate::handoff::SseSession {
        session: feed.open.id.clone(),
        chunked,
    };
    match crate::handoff::hand_sse(
        &app,
        stream,
        &session.caller,
        &session.lookups,
        member,
        moving,
    )
    .await
    {
        Ok(()) => feed.open.moved = true,
        Err((mut stream, unmoved)) => {
            // What was taken for the move goes first, then anything since;
            // then the end the application gave it, its outbox's (a slow
            // consumer), or a drain's.
            feed.buf = unmoved.taken;
            let taken = feed.open.session.caller.outbox.take(&mut feed.buf);
            let (code, reason) = unmoved
                .end
                .or_else(|| taken.end(&app.metrics))
                .unwrap_or_else(|| {
                    (
                        crate::drain::SERVICE_RESTART,
                        crate::drain::reason(app.config.server.drain_reconnect_ms),
                    )
                });
            let out = farewell(&mut feed.buf, code, &reason);
            let out = framed(out, chunked);
            if let Ok(Ok(())) = tokio::time::timeout(SEND_TIMEOUT, write(&mut stream, &out)).await {
                end(&mut stream, chunked).await;
            }
        }
    }
}

/// Carries a session handed over by the previous process on in this one:
/// the same id (its POSTs go on), what was queued for it written first.
pub(crate) fn resume(
    app: &Arc<App>,
    caller: Caller,
    id: String,
    chunked: bool,
    conn: Detached,
    queued: Bytes,
) {
    let address = caller.address;
    let session = Arc::new(Session {
        caller,
        lookups: AtomicUsize::new(0),
    });
    {
        let mut map = app.sessions.lock();
        map.insert(id.clone(), session.clone());
        app.metrics.sse_sessions.set(map.len() as i64);
    }
    tracing::debug!(client_id = %session.caller.conn_id, "sse session taken over");
    let feed = Feed::new(
        app.clone(),
        id,
        session,
        Counted::resumed(app),
        app.admission.session(address),
        (!queued.is_empty()).then_some(queued),
    );
    tokio::spawn(run(conn, feed, chunked));
}

/// Writes `bytes` whole (over TLS, flushed too).
async fn write(stream: &mut Stream, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// Returns once the client has closed its side (or the connection
/// failed). What it sends meanwhile, which no SSE client does, is
/// dropped. Reads into a few bytes on the task's stack: an idle session
/// holds no read buffer.
async fn client_gone(stream: &mut Stream) {
    let mut sink = [0_u8; 64];
    while let Ok(1..) = stream.read(&mut sink).await {}
}

/// `bytes` as the body's next bytes: one chunk of an HTTP/1.1 chunked
/// body, or as they are for HTTP/1.0.
fn framed(bytes: Bytes, chunked: bool) -> Bytes {
    if !chunked {
        return bytes;
    }
    let mut out = Vec::with_capacity(bytes.len() + 12);
    out.extend_from_slice(format!("{:x}\r\n", bytes.len()).as_bytes());
    out.extend_from_slice(&bytes);
    out.extend_from_slice(b"\r\n");
    Bytes::from(out)
}

/// The queued messages `buf` holds, then the stream's closing message.
fn farewell(buf: &mut Vec<Outgoing>, code: u16, reason: &str) -> Bytes {
    let mut out = encode(buf).to_vec();
    out.extend_from_slice(&closing(code, reason));
    Bytes::from(out)
}

/// The next bytes of a stream: what the outbox holds, a keep-alive, or
/// the end.
async fn next_chunk(st: &mut Feed) -> Next {
    if let Some(hello) = st.hello.take() {
        return Next::Send(hello);
    }
    if st.done {
        return Next::End;
    }
    let app = st.open.app.clone();
    let outbox = &st.open.session.caller.outbox;
    loop {
        // A takeover wakes every outbox once it starts.
        if st.handing && crate::handoff::started(&app) {
            return Next::Handoff;
        }
        match outbox.take(&mut st.buf) {
            Taken::SlowConsumer => {
                app.metrics.slow_consumers.inc();
                st.done = true;
                return Next::Send(closing(1013, "slow consumer"));
            }
            Taken::End(code, reason) => {
                st.done = true;
                return Next::Send(farewell(&mut st.buf, code, &reason));
            }
            Taken::Messages => {}
        }
        if !st.buf.is_empty() {
            app.metrics
                .messages_out
                .inc_by(crate::outbox::count(&st.buf) as u64);
            return Next::Send(encode(&mut st.buf));
        }
        tokio::select! {
            biased;
            () = app.closing.cancelled() => {
                // The router has drained: what is queued goes out first.
                st.done = true;
                let _ = outbox.take(&mut st.buf);
                return Next::Send(farewell(&mut st.buf, 1001, "server shutting down"));
            }
            () = outbox.ready() => {}
            Ok(()) = st.tick.changed() => {
                if let Some(at) = outbox.expires() {
                    if crate::connection::unix_now() >= at {
                        st.done = true;
                        return Next::Send(closing(1008, "token expired"));
                    }
                    refresh_if_due(&app, &st.open.session.caller, at);
                }
                return Next::Send(Bytes::from_static(b":\n\n"));
            }
        }
    }
}

/// Queued messages as SSE `data:` messages. A message with a line break
/// (never one gale encodes, but a handler's text could hold one) becomes
/// several `data:` lines, which the client joins back.
pub(crate) fn encode(buf: &mut Vec<Outgoing>) -> Bytes {
    let all = buf.iter().flat_map(Outgoing::messages);
    let mut out = Vec::with_capacity(all.map(|m| m.len() + 8).sum());
    for entry in buf.drain(..) {
        for m in entry.messages() {
            for line in m.as_str().split('\n') {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(line.trim_end_matches('\r').as_bytes());
                out.push(b'\n');
            }
            out.push(b'\n');
        }
    }
    if buf.capacity() > crate::outbox::KEEP_CAPACITY {
        *buf = Vec::new();
    }
    Bytes::from(out)
}

/// The stream's last message: why it ends, with the WebSocket close code
/// the same end would have had.
fn closing(code: u16, reason: &str) -> Bytes {
    let msg = serde_json::json!({"type": "close", "code": code, "reason": reason});
    // A drain's suggested delay is also the stream's `retry:`, which a
    // browser's EventSource honours by itself when it reconnects.
    let retry = serde_json::from_str::<serde_json::Value>(reason)
        .ok()
        .and_then(|r| r["reconnect_ms"].as_u64())
        .filter(|_| code == crate::drain::SERVICE_RESTART)
        .map(|ms| format!("retry: {ms}\n"))
        .unwrap_or_default();
    Bytes::from(format!("{retry}event: close\ndata: {msg}\n\n"))
}

/// `POST /sse/SESSION`: one message from the client.
pub(crate) async fn receive(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // A takeover under way: the session goes on in the new process, which
    // takes this message once it accepts (the client sends it again).
    if crate::handoff::started(&app) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "the server is moving to a new process; send this message again\n",
        )
            .into_response();
    }
    let Some(session) = app.sessions.get(&id) else {
        return (
            StatusCode::NOT_FOUND,
            "no such SSE session: it ended or never existed; open a new one with GET /sse\n",
        )
            .into_response();
    };
    let limit = app.config.server.max_message_bytes;
    let bytes = match crate::body::read(&headers, body, limit, "server.max_message_bytes").await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let Ok(text) = String::from_utf8(bytes.to_vec()) else {
        return (StatusCode::BAD_REQUEST, "a message must be UTF-8 text\n").into_response();
    };
    // A draining server still serves its open sessions (the router
    // answers "shutting down" once it stops taking events).
    if app.closing.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    // The same bound as a WebSocket connection's: lookups and events in
    // flight together, and events within the connection's router share.
    let max = app.config.server.max_inflight_per_connection;
    let caller = &session.caller;
    let events = caller.outbox.events();
    let lookups = session.lookups.load(Ordering::Acquire);
    if lookups + events >= max || (events > 0 && events >= app.router.share(max)) {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "1")],
            format!(
                "{max} messages of this session are in flight (server.max_inflight_per_connection); \
                 wait for their replies\n"
            ),
        )
            .into_response();
    }
    app.metrics.messages_in.inc();
    match classify(&text) {
        Incoming::Text(_) => match app.text.handler.clone() {
            Some(handler) => {
                session.lookups.fetch_add(1, Ordering::AcqRel);
                let ctx = crate::router::Ctx {
                    app: app.clone(),
                    caller: session.caller.clone(),
                };
                let session = session.clone();
                app.tracker.spawn(async move {
                    let reply = handler(ctx, text.into()).await;
                    session.caller.outbox.push(reply.into(), true);
                    session.lookups.fetch_sub(1, Ordering::AcqRel);
                });
            }
            None => {
                caller
                    .outbox
                    .push(invalid_reply(None, crate::connection::NO_TEXT).into(), true);
            }
        },
        Incoming::Event(event) => app.router.dispatch(&app, caller, event),
        Incoming::Invalid { reply_to, message } => {
            app.router.count_invalid_message();
            caller
                .outbox
                .push(invalid_reply(reply_to, &message).into(), true);
        }
    }
    StatusCode::ACCEPTED.into_response()
}
