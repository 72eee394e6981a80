//! The HTTP client of gale's calls to the services behind it (the
//! weather provider, the application's backend): `GET` or `POST` a URL,
//! get its status and body (up to a limit).
//!
//! `https://` goes through reqwest (rustls). `http://` goes through a lean
//! HTTP/1.1 client written here, because memory per call in flight is
//! what the seed's scenario is made of: 1,000 calls at once, each on its
//! own connection. reqwest (hyper) holds ~28–33 KiB per connection (an
//! 8 KiB read buffer, its dispatch channel's 8.8 KiB block, the request's
//! futures; measured with massif, docs/benchmarks.md); this client holds
//! the socket, a buffer the size of the response (1 KiB to start) and its
//! future. It speaks the small part of HTTP/1.1 a JSON call needs: one
//! request at a time per connection (`GET`, or `POST` with a body),
//! `Content-Length`, chunked or close-delimited bodies, keep-alive with a
//! bounded idle pool. Over TLS the session's own buffers dominate, so
//! reqwest stays there.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why a call got no usable response; each says what to tell a person.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// No answer in time.
    #[error("did not answer in time (timeout)")]
    Timeout,
    /// Could not connect.
    #[error("cannot reach it{0}")]
    Unreachable(&'static str),
    /// The call broke off.
    #[error("the request failed")]
    Failed,
    /// The body was larger than the limit.
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    /// Not HTTP as this client reads it.
    #[error("unreadable response: {0}")]
    Unreadable(String),
}

/// A reqwest error as an [`HttpError`].
fn map_reqwest(e: reqwest::Error) -> HttpError {
    if e.is_timeout() {
        HttpError::Timeout
    } else if e.is_connect() {
        HttpError::Unreachable("")
    } else if e.is_decode() || e.is_body() {
        HttpError::Unreadable("unreadable body".into())
    } else {
        HttpError::Failed
    }
}

/// How long a pooled connection may sit idle before it is not reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// Headers parsed at most.
const MAX_HEADERS: usize = 48;

/// A response: its status and body.
#[derive(Debug)]
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    /// The body, whole.
    pub body: Vec<u8>,
}

/// A client for one kind of call (one per service: its pool is its own).
#[derive(Debug)]
pub struct Client {
    tls: reqwest::Client,
    plain: Plain,
    /// `http://` through the lean client; false when a proxy is set in
    /// the environment (`HTTP_PROXY`, `ALL_PROXY`), which reqwest honours.
    direct: bool,
    /// The backstop on a whole call (the lookup deadline fires first).
    timeout: Duration,
    connect_timeout: Duration,
}

impl Client {
    /// A client whose calls give up after `timeout` (connecting after
    /// `connect_timeout`), keeping at most `max_idle` idle connections
    /// (each for at most a minute, or `idle` when shorter: a server that
    /// closes idle connections sooner is better left before it does).
    ///
    /// # Errors
    /// When reqwest's TLS client cannot be built.
    pub fn new(
        timeout: Duration,
        connect_timeout: Duration,
        max_idle: usize,
    ) -> Result<Client, reqwest::Error> {
        Self::with_idle(timeout, connect_timeout, max_idle, IDLE_TIMEOUT)
    }

    /// As [`Client::new`], keeping idle connections at most `idle`.
    ///
    /// # Errors
    /// When reqwest's TLS client cannot be built.
    pub fn with_idle(
        timeout: Duration,
        connect_timeout: Duration,
        max_idle: usize,
        idle: Duration,
    ) -> Result<Client, reqwest::Error> {
        // reqwest is built without a default TLS backend; ring builds
        // faster than aws-lc. Installing twice is harmless (the first wins).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tls = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(connect_timeout)
            .pool_max_idle_per_host(max_idle)
            .pool_idle_timeout(idle.min(IDLE_TIMEOUT))
            .user_agent(USER_AGENT)
            .build()?;
        Ok(Client {
            tls,
            plain: Plain {
                idle: Mutex::new(VecDeque::new()),
                max_idle,
                idle_timeout: idle.min(IDLE_TIMEOUT),
            },
            direct: !proxied(|k| std::env::var(k).ok()),
            timeout,
            connect_timeout,
        })
    }

    /// `GET url`, reading at most `limit` bytes of body.
    ///
    /// # Errors
    /// [`HttpError`] when no usable response came.
    pub async fn get(&self, url: url::Url, limit: usize) -> Result<Response, HttpError> {
        self.call(&Request::get(url), limit).await
    }

    /// `POST url` with a JSON `body` and `headers`, reading at most
    /// `limit` bytes of body.
    ///
    /// # Errors
    /// [`HttpError`] when no usable response came.
    pub async fn post_json(
        &self,
        url: url::Url,
        headers: &[(String, String)],
        body: Vec<u8>,
        limit: usize,
    ) -> Result<Response, HttpError> {
        let request = Request {
            url,
            body: Some(body),
            headers,
        };
        self.call(&request, limit).await
    }

    async fn call(&self, request: &Request<'_>, limit: usize) -> Result<Response, HttpError> {
        if request.url.scheme() != "http" || !self.direct {
            return self.call_tls(request, limit).await;
        }
        match tokio::time::timeout(
            self.timeout,
            self.plain.call(request, limit, self.connect_timeout),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(HttpError::Timeout),
        }
    }

    async fn call_tls(&self, request: &Request<'_>, limit: usize) -> Result<Response, HttpError> {
        let mut builder = match &request.body {
            None => self.tls.get(request.url.clone()),
            Some(body) => self
                .tls
                .post(request.url.clone())
                .header("content-type", "application/json")
                .body(body.clone()),
        };
        for (name, value) in request.headers {
            builder = builder.header(name, value);
        }
        let mut resp = builder.send().await.map_err(map_reqwest)?;
        let status = resp.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(map_reqwest)? {
            if body.len() + chunk.len() > limit {
                return Err(HttpError::TooLarge(limit));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Response { status, body })
    }
}

/// One call: `GET` without a body, `POST` (JSON) with one.
struct Request<'a> {
    url: url::Url,
    body: Option<Vec<u8>>,
    headers: &'a [(String, String)],
}

impl Request<'static> {
    fn get(url: url::Url) -> Request<'static> {
        Request {
            url,
            body: None,
            headers: &[],
        }
    }
}

/// Whether the environment names a proxy for plain HTTP, in any of the
/// spellings reqwest reads.
fn proxied(var: impl Fn(&str) -> Option<String>) -> bool {
    ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"]
        .iter()
        .any(|k| var(k).is_some_and(|v| !v.trim().is_empty()))
}

const USER_AGENT: &str = concat!("gale/", env!("CARGO_PKG_VERSION"));

fn too_large(limit: usize) -> HttpError {
    HttpError::TooLarge(limit)
}

fn unreadable(what: &str) -> HttpError {
    HttpError::Unreadable(what.to_owned())
}

fn failed() -> HttpError {
    HttpError::Failed
}

/// An idle keep-alive connection.
#[derive(Debug)]
struct Idle {
    authority: String,
    stream: TcpStream,
    since: Instant,
}

/// Whether nothing waits to be read on an idle connection: no byte and no
/// close from the server (a non-blocking peek).
fn quiet(stream: &TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    matches!(
        socket2::SockRef::from(stream).peek(&mut byte),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    )
}

/// The plain-HTTP side: a bounded pool of idle connections.
#[derive(Debug)]
struct Plain {
    idle: Mutex<VecDeque<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Plain {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently idled live connection to `authority`, if any.
    /// A connection with anything waiting to be read (bytes the server
    /// sent after its response, or its close) is dropped, never reused:
    /// those bytes would be read as the next city's response.
    fn take(&self, authority: &str) -> Option<TcpStream> {
        let mut idle = self.lock();
        // Oldest first (put appends): the expired ones are at the front,
        // so the scan stops at the first live one, with one clock read.
        let now = Instant::now();
        while idle
            .front()
            .is_some_and(|c| now.duration_since(c.since) >= self.idle_timeout)
        {
            idle.pop_front();
        }
        loop {
            let i = idle.iter().rposition(|c| c.authority == authority)?;
            let stream = idle.remove(i)?.stream;
            if quiet(&stream) {
                return Some(stream);
            }
        }
    }

    fn put(&self, authority: String, stream: TcpStream) {
        let mut idle = self.lock();
        if idle.len() >= self.max_idle {
            idle.pop_front();
        }
        idle.push_back(Idle {
            authority,
            stream,
            since: Instant::now(),
        });
    }

    async fn call(
        &self,
        req: &Request<'_>,
        limit: usize,
        connect_timeout: Duration,
    ) -> Result<Response, HttpError> {
        let url = &req.url;
        let host = url
            .host_str()
            .ok_or_else(|| unreadable("no host in the URL"))?;
        let port = url.port_or_known_default().unwrap_or(80);
        let authority = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        };
        let target = &url[url::Position::BeforePath..url::Position::AfterQuery];
        let mut request = match &req.body {
            None => format!(
                "GET {target} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: {USER_AGENT}\r\n\
                 Accept: application/json\r\n"
            ),
            Some(body) => format!(
                "POST {target} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: {USER_AGENT}\r\n\
                 Accept: application/json\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n",
                body.len()
            ),
        }
        .into_bytes();
        for (name, value) in req.headers {
            request.extend_from_slice(name.as_bytes());
            request.extend_from_slice(b": ");
            request.extend_from_slice(value.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"\r\n");
        if let Some(body) = &req.body {
            request.extend_from_slice(body);
        }
        // A pooled connection the server has meanwhile closed fails before
        // any byte of a response: the request is sent again, once, on a
        // new connection (a server closing its side as the request
        // arrives has not acted on it).
        if let Some(stream) = self.take(&authority) {
            match exchange(stream, &request, limit).await {
                Ok(done) => return Ok(self.finish(authority, done)),
                Err(Exchange::Stale) => {}
                Err(Exchange::Failed(e)) => return Err(e),
            }
        }
        // An IPv6 literal comes bracketed in URLs, bare in addresses.
        let address = host.trim_start_matches('[').trim_end_matches(']');
        let stream = tokio::time::timeout(connect_timeout, TcpStream::connect((address, port)))
            .await
            .map_err(|_| HttpError::Unreachable(" (connect timeout)"))?
            .map_err(|_| HttpError::Unreachable(""))?;
        let _ = stream.set_nodelay(true);
        match exchange(stream, &request, limit).await {
            Ok(done) => Ok(self.finish(authority, done)),
            Err(Exchange::Stale) => Err(failed()),
            Err(Exchange::Failed(e)) => Err(e),
        }
    }

    fn finish(&self, authority: String, done: Done) -> Response {
        if let Some(stream) = done.reusable {
            self.put(authority, stream);
        }
        done.response
    }
}

/// A finished exchange: the response, and the connection if it may be
/// used again.
struct Done {
    response: Response,
    reusable: Option<TcpStream>,
}

enum Exchange {
    /// Nothing came back at all: the connection was already closed.
    Stale,
    Failed(HttpError),
}

impl From<HttpError> for Exchange {
    fn from(e: HttpError) -> Exchange {
        Exchange::Failed(e)
    }
}

/// How the body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// A parsed response head.
#[derive(Debug)]
struct Head {
    status: u16,
    len: usize,
    framing: Framing,
    keep_alive: bool,
}

/// Parses the head at the start of `buf`; `None` when incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut headers);
    let len = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(unreadable(&e.to_string())),
    };
    let status = r.code.unwrap_or(0);
    let mut framing = Framing::UntilClose;
    let mut keep_alive = r.version == Some(1);
    for h in r.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse()
                .map_err(|_| unreadable("bad Content-Length"))?;
            if framing == Framing::UntilClose {
                framing = Framing::Length(n);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if value.to_ascii_lowercase().ends_with("chunked") {
                framing = Framing::Chunked;
            }
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            if v.contains("close") {
                keep_alive = false;
            } else if v.contains("keep-alive") {
                keep_alive = true;
            }
        }
    }
    if matches!(status, 204 | 304) {
        framing = Framing::Length(0);
    }
    Ok(Some(Head {
        status,
        len,
        framing,
        keep_alive: keep_alive && framing != Framing::UntilClose,
    }))
}

/// Sends `request` and reads one response.
async fn exchange(mut stream: TcpStream, request: &[u8], limit: usize) -> Result<Done, Exchange> {
    if stream.write_all(request).await.is_err() {
        return Err(Exchange::Stale);
    }
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    // The head; 1xx interim responses are skipped.
    let head = loop {
        if let Some(head) = parse_head(&buf)? {
            if (100..200).contains(&head.status) {
                buf.drain(..head.len);
                continue;
            }
            break head;
        }
        if buf.len() > MAX_HEAD {
            return Err(unreadable("response head too long").into());
        }
        match read_more(&mut stream, &mut buf).await {
            Ok(0) if buf.is_empty() => return Err(Exchange::Stale),
            Ok(0) => return Err(unreadable("closed inside the response head").into()),
            Ok(_) => {}
            Err(_) if buf.is_empty() => return Err(Exchange::Stale),
            Err(_) => return Err(failed().into()),
        }
    };
    buf.drain(..head.len);
    let body = match head.framing {
        Framing::Length(n) => {
            if n > limit {
                return Err(too_large(limit).into());
            }
            while buf.len() < n {
                if read_more(&mut stream, &mut buf)
                    .await
                    .map_err(|_| failed())?
                    == 0
                {
                    return Err(unreadable("closed inside the body").into());
                }
            }
            if buf.len() > n {
                // Bytes past the body: the connection is not in a state
                // to be reused.
                buf.truncate(n);
                return Ok(Done {
                    response: Response {
                        status: head.status,
                        body: buf,
                    },
                    reusable: None,
                });
            }
            buf
        }
        Framing::Chunked => {
            let (body, clean) = dechunk(&mut stream, buf, limit).await?;
            return Ok(Done {
                response: Response {
                    status: head.status,
                    body,
                },
                reusable: (head.keep_alive && clean).then_some(stream),
            });
        }
        Framing::UntilClose => {
            loop {
                if buf.len() > limit {
                    return Err(too_large(limit).into());
                }
                if read_more(&mut stream, &mut buf)
                    .await
                    .map_err(|_| failed())?
                    == 0
                {
                    break;
                }
            }
            buf
        }
    };
    Ok(Done {
        response: Response {
            status: head.status,
            body,
        },
        reusable: head.keep_alive.then_some(stream),
    })
}

/// Reads what is available into `buf`, growing it when full.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    if buf.len() == buf.capacity() {
        buf.reserve(buf.capacity().max(1024));
    }
    stream.read_buf(buf).await
}

/// Decodes a chunked body; `buf` holds what was read after the head.
/// Also says whether the body ended exactly where the bytes read did
/// (otherwise the connection is not reused).
async fn dechunk(
    stream: &mut TcpStream,
    mut buf: Vec<u8>,
    limit: usize,
) -> Result<(Vec<u8>, bool), Exchange> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        match next_chunk(&buf[at..]).map_err(|w| Exchange::Failed(unreadable(w)))? {
            Some(Chunk::Data { start, len, end }) => {
                if body.len().saturating_add(len) > limit {
                    return Err(too_large(limit).into());
                }
                body.extend_from_slice(&buf[at + start..at + start + len]);
                at += end;
                continue;
            }
            Some(Chunk::Last { end }) => return Ok((body, at + end == buf.len())),
            Some(Chunk::Need { len }) if body.len().saturating_add(len) > limit => {
                return Err(too_large(limit).into());
            }
            Some(Chunk::Need { .. }) | None => {}
        }
        // Keep only what is not decoded yet.
        buf.drain(..at);
        at = 0;
        if buf.len() > limit + MAX_HEAD {
            return Err(too_large(limit).into());
        }
        if read_more(stream, &mut buf).await.map_err(|_| failed())? == 0 {
            return Err(unreadable("closed inside a chunked body").into());
        }
    }
}

/// One step of a chunked body.
#[derive(Debug, PartialEq, Eq)]
enum Chunk {
    /// `len` bytes of data at `start`; the next chunk begins at `end`.
    Data {
        start: usize,
        len: usize,
        end: usize,
    },
    /// The last chunk and its trailers end at `end`.
    Last { end: usize },
    /// A chunk of `len` bytes whose data has not all arrived.
    Need { len: usize },
}

/// The chunk at the start of `buf`; `None` when more bytes are needed.
fn next_chunk(buf: &[u8]) -> Result<Option<Chunk>, &'static str> {
    let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() > 1024 {
            Err("chunk size line too long")
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&buf[..line_end]).map_err(|_| "chunk size not ASCII")?;
    let size = line.split(';').next().unwrap_or("").trim();
    let len = usize::from_str_radix(size, 16).map_err(|_| "bad chunk size")?;
    let start = line_end + 2;
    if len == 0 {
        // Trailers, if any, end with an empty line.
        let rest = &buf[start..];
        let mut at = 0;
        loop {
            let Some(end) = rest[at..].windows(2).position(|w| w == b"\r\n") else {
                return Ok(None);
            };
            if end == 0 {
                return Ok(Some(Chunk::Last {
                    end: start + at + 2,
                }));
            }
            at += end + 2;
        }
    }
    let end = start
        .checked_add(len)
        .and_then(|e| e.checked_add(2))
        .ok_or("bad chunk size")?;
    if buf.len() < end {
        return Ok(Some(Chunk::Need { len }));
    }
    if &buf[end - 2..end] != b"\r\n" {
        return Err("chunk not followed by CRLF");
    }
    Ok(Some(Chunk::Data { start, len, end }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn a_proxy_in_the_environment_sends_plain_http_through_reqwest() {
        assert!(!proxied(|_| None));
        assert!(!proxied(|k| (k == "HTTP_PROXY").then(|| " ".to_owned())));
        assert!(proxied(
            |k| (k == "http_proxy").then(|| "http://p:3128".to_owned())
        ));
        assert!(proxied(
            |k| (k == "ALL_PROXY").then(|| "socks5://p".to_owned())
        ));
    }

    #[tokio::test]
    async fn an_ipv6_literal_is_reached() {
        let listener = TcpListener::bind("[::1]:0")
            .await
            .expect("an IPv6 loopback");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let mut b = [0; 512];
                let _ = s.read(&mut b).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nv6")
                    .await;
            }
        });
        let url = url::Url::parse(&format!("http://[::1]:{port}/")).expect("url");
        let r = client().get(url, 100).await.expect("answered over IPv6");
        assert_eq!(r.body, b"v6");
    }

    #[test]
    fn chunks_are_found_whole_or_asked_for() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-Trailer: 1\r\n\r\n";
        assert_eq!(
            next_chunk(body),
            Ok(Some(Chunk::Data {
                start: 3,
                len: 4,
                end: 9
            }))
        );
        assert_eq!(
            next_chunk(&body[9..]),
            Ok(Some(Chunk::Data {
                start: 9,
                len: 5,
                end: 16
            }))
        );
        assert_eq!(next_chunk(&body[25..]), Ok(Some(Chunk::Last { end: 19 })));
        for cut in 0..3 {
            assert_eq!(next_chunk(&body[..cut]), Ok(None), "cut at {cut}");
        }
        for cut in 3..9 {
            assert_eq!(
                next_chunk(&body[..cut]),
                Ok(Some(Chunk::Need { len: 4 })),
                "cut at {cut}"
            );
        }
        assert_eq!(next_chunk(b"zz\r\n"), Err("bad chunk size"));
        assert_eq!(next_chunk(b"2\r\nabXY"), Err("chunk not followed by CRLF"));
        assert_eq!(next_chunk(b"ffffffffffffffffff\r\n"), Err("bad chunk size"));
    }

    /// A server that answers each connection's requests with `replies`,
    /// in turn, then closes; counts connections.
    async fn serve(
        replies: Vec<&'static str>,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/v1?q=x", listener.local_addr().expect("addr"));
        let conns = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let replies = replies.clone();
                tokio::spawn(async move {
                    for reply in replies {
                        let mut req = Vec::new();
                        while !req.ends_with(b"\r\n\r\n") {
                            let mut b = [0; 1];
                            if s.read(&mut b).await.unwrap_or(0) == 0 {
                                return;
                            }
                            req.push(b[0]);
                        }
                        assert!(req.starts_with(b"GET /v1?q=x HTTP/1.1\r\nHost: 127.0.0.1:"));
                        // In two writes: the client must join them.
                        let (a, b) = reply.split_at(reply.len() / 2);
                        let _ = s.write_all(a.as_bytes()).await;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        let _ = s.write_all(b.as_bytes()).await;
                    }
                });
            }
        });
        (url, conns)
    }

    fn client() -> Client {
        Client::new(Duration::from_secs(5), Duration::from_secs(1), 4).expect("client")
    }

    #[tokio::test]
    async fn bodies_of_every_framing_are_read_and_connections_reused() {
        let (url, conns) = serve(vec![
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end",
        ])
        .await;
        let c = client();
        let url = url::Url::parse(&url).expect("url");
        let r = c.get(url.clone(), 100).await.expect("first");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
        let r = c.get(url.clone(), 100).await.expect("second");
        assert_eq!((r.status, r.body.as_slice()), (404, &b"abcde"[..]));
        let r = c.get(url.clone(), 100).await.expect("third");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"until the end"[..]));
        assert_eq!(
            conns.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one kept-alive connection"
        );
        // The server closed after the third: the pool holds nothing
        // reusable, and the next call opens a new connection.
        let r = c.get(url, 100).await.expect("fourth");
        assert_eq!(r.status, 200);
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_pooled_connection_closed_by_the_server_is_replaced_once() {
        // Each connection answers once and closes, but says keep-alive.
        let (url, conns) = serve(vec!["HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]).await;
        let c = client();
        let url = url::Url::parse(&url).expect("url");
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let r = c.get(url.clone(), 100).await.expect("answered");
            assert_eq!(r.body, b"ok");
        }
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    /// A server that sends bytes nobody asked for after a complete
    /// response: the next lookup must not read them as its answer.
    #[tokio::test]
    async fn a_pooled_connection_with_unasked_bytes_is_not_reused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/v1?q=x", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                n += 1;
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    while !req.ends_with(b"\r\n\r\n") {
                        let mut b = [0; 1];
                        if s.read(&mut b).await.unwrap_or(0) == 0 {
                            return;
                        }
                        req.push(b[0]);
                    }
                    let body = format!("reply{n}");
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(reply.as_bytes()).await;
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged")
                        .await;
                    // Hold the connection open, as a keep-alive server does.
                    tokio::time::sleep(Duration::from_secs(5)).await;
                });
            }
        });
        let c = client();
        let url = url::Url::parse(&url).expect("url");
        let r = c.get(url.clone(), 100).await.expect("first");
        assert_eq!(r.body, b"reply1");
        tokio::time::sleep(Duration::from_millis(150)).await;
        let r = c.get(url, 100).await.expect("second");
        assert_eq!(
            r.body, b"reply2",
            "answered on a new connection, never by the unasked bytes"
        );
    }

    #[tokio::test]
    async fn limits_and_garbage_are_errors_not_hangs() {
        let c = client();
        for (reply, error) in [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n",
                "larger than 100",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n80\r\n",
                "larger than 100",
            ),
            // A chunk size near 2^64 after a first chunk: no overflow.
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n0123456789abcdef0123456789abcdef\r\nffffffffffffffe0\r\n",
                "larger than 100",
            ),
            ("SMTP ready\r\n\r\n", "unreadable response"),
        ] {
            let (url, _) = serve(vec![reply]).await;
            let err = c
                .get(url::Url::parse(&url).expect("url"), 100)
                .await
                .expect_err(error);
            assert!(err.to_string().contains(error), "{reply:?}: {err}");
        }

        let err = c
            .get(url::Url::parse("http://127.0.0.1:1/").expect("url"), 100)
            .await
            .expect_err("nobody listens");
        assert!(err.to_string().contains("cannot reach"), "{err}");
    }
}
