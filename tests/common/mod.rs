//! Shared test harness: the real server on 127.0.0.1:0 against the fake
//! weather API (a real HTTP server) and a real SQLite file, driven by a
//! real WebSocket client.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gale::config::{Config, Provider};
use gale::fake_upstream::FakeUpstream;
use gale::server::{self, ServerError};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_util::sync::CancellationToken;

pub mod backend;
pub mod faults;
pub mod raw;
pub mod services;
pub mod sse;

/// How long any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(15);

pub const API_KEY: &str = "test-key";

/// A server API key (`[api] key` needs 16 characters or more).
pub const API_KEY_LONG: &str = "api-key-0123456789abcdef";

/// The source address of the tests' looks at `/healthz` and `/metrics`.
pub const MONITOR: &str = "127.0.0.254";

pub struct TestServer {
    pub app: std::sync::Arc<gale::server::App>,
    pub addr: SocketAddr,
    pub fake: FakeUpstream,
    pub shutdown: CancellationToken,
    pub handle: Option<JoinHandle<Result<(), ServerError>>>,
    pub store_url: String,
    pub db_path: PathBuf,
    /// Serving TLS (`server.tls_cert` set): [`TestServer::get`] speaks
    /// HTTPS.
    pub tls: bool,
    /// The server's files: the SQLite database and the spill.
    pub dir: tempfile::TempDir,
}

/// Lets this process hold at least `n` open files: raises its soft limit
/// toward the hard one (a shell's default soft limit is often 1,024).
/// Panics, naming the limit, when the hard limit is below `n`.
pub fn open_files(n: u64) {
    let got = rlimit::increase_nofile_limit(n).expect("read and raise RLIMIT_NOFILE");
    assert!(
        got >= n,
        "this test holds {n} open files, the hard limit allows {got}: raise it (ulimit -Hn)"
    );
}

/// A config for tests: OpenWeatherMap against `fake`, SQLite in `dir`.
pub fn test_config(fake: &FakeUpstream, dir: &std::path::Path) -> Config {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".into();
    config.server.shutdown_grace_ms = 10_000;
    config.weather.provider = Provider::OpenWeatherMap;
    config.weather.base_url = Some(fake.url());
    config.weather.api_key = Some(API_KEY.into());
    config.weather.timeout_ms = 3_000;
    config.store.url = format!("sqlite://{}", dir.join("gale.db").display());
    config.store.spill_dir = dir.join("spill").display().to_string();
    // Every topic open to clients, as most tests use them; the tests of
    // the rules set their own.
    config.topics.insert(
        "*".into(),
        gale::config::TopicConfig {
            subscribe: Some(gale::config::SubscribeMode::Anyone),
            ..Default::default()
        },
    );
    config
}

pub async fn start() -> TestServer {
    start_with(|_| {}).await
}

pub async fn start_with(configure: impl FnOnce(&mut Config)) -> TestServer {
    start_in(tempfile::tempdir().expect("tempdir"), configure).await
}

/// Starts a server whose files (database, spill) live in `dir`: a
/// directory an earlier server used, to see what a restart finds.
pub async fn start_in(dir: tempfile::TempDir, configure: impl FnOnce(&mut Config)) -> TestServer {
    let fake = FakeUpstream::start("127.0.0.1:0")
        .await
        .expect("fake upstream");
    let mut config = test_config(&fake, dir.path());
    configure(&mut config);
    config.validate().expect("test config is valid");
    let store_url = config.store.url.clone();
    let tls = config.server.tls_cert.is_some();
    let listener = server::bind(&config.server.listen).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let running = server::start(listener, config, shutdown.clone())
        .await
        .expect("server starts");
    let app = running.app().clone();
    let handle = tokio::spawn(running.wait());
    let server = TestServer {
        app,
        addr,
        fake,
        shutdown,
        handle: Some(handle),
        store_url,
        db_path: dir.path().join("gale.db"),
        tls,
        dir,
    };
    // Ready once /healthz answers (the store is migrated by then).
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.get("/healthz").await.map(|(s, _)| s) != Some(200) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "server never became healthy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server
}

impl TestServer {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Connects and reads the greeting.
    pub async fn client(&self) -> Client {
        Client::connect(&self.ws_url()).await.greeted().await
    }

    /// Connects from the source address `ip` (127.0.0.2, …: another
    /// client address on this machine) and reads the greeting.
    pub async fn client_from(&self, ip: &str) -> Client {
        Client::connect_from(&self.ws_url(), ip)
            .await
            .greeted()
            .await
    }

    /// Connects with `?token=…` and reads the greeting.
    pub async fn client_with_token(&self, token: &str) -> Client {
        let mut c = Client::connect(&format!("{}?token={token}", self.ws_url())).await;
        let hello = c.recv_json().await;
        assert_eq!(hello["type"], "connected", "{hello}");
        c.client_id = hello["client_id"].as_str().expect("client_id").to_owned();
        c
    }

    /// Connects to `/ws{query}` with extra handshake headers and reads the
    /// greeting; `Err` is the HTTP status of a refused handshake.
    pub async fn client_with_headers(
        &self,
        query: &str,
        headers: &[(&'static str, String)],
    ) -> Result<Client, u16> {
        let url = format!("{}{query}", self.ws_url());
        Client::connect_with_headers(&url, headers)
            .await
            .map(|(c, _)| c)
    }

    /// An HTTP GET (over TLS when the server serves TLS): (status, body).
    /// From [`MONITOR`], an address of its own, as a monitoring system
    /// would: the tests' own looks never count against the clients'
    /// per-address limits.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        if self.tls {
            let tcp = connect_tcp_from(self.addr, MONITOR).await;
            let name = rustls_pki_types::ServerName::try_from("localhost").ok()?;
            let s = tls_connector().connect(name, tcp).await.ok()?;
            return get_over(s, self.addr, path).await;
        }
        http_get_from(self.addr, MONITOR, path).await
    }

    pub async fn metrics(&self) -> Value {
        let (status, body) = self.get("/metrics.json").await.expect("metrics");
        assert_eq!(status, 200);
        serde_json::from_str(&body).expect("metrics json")
    }

    /// One sample of `/metrics` by its full name, labels included, e.g.
    /// `gale_upstream_in_flight` or `gale_http_timeouts_total{stage="Head"}`.
    pub async fn sample(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics").await.expect("metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
    }

    pub async fn metric(&self, key: &str) -> u64 {
        self.metrics().await[key]
            .as_u64()
            .unwrap_or_else(|| panic!("metric {key} missing"))
    }

    /// Waits until the `/metrics` sample `name` reaches `value`.
    pub async fn wait_sample(&self, name: &str, value: f64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let now = self.sample(name).await;
            if now == value {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} is {now}, expected {value}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `key` reaches `value`.
    pub async fn wait_metric(&self, key: &str, value: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let now = self.metric(key).await;
            if now == value {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "metric {key} is {now}, expected {value}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Cancels the server and waits for it to shut down: `Err` when it
    /// did not shut down cleanly (a panic, lost rows), as `run` reports.
    pub async fn stop(&mut self) -> Result<(), ServerError> {
        self.shutdown.cancel();
        let handle = self.handle.take().expect("running");
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("server stops in time")
            .expect("server task")
    }
}

/// Minimal HTTP/1.1 GET over a raw socket, so tests see exactly what the
/// server sends.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let s = tokio::net::TcpStream::connect(addr).await.ok()?;
    get_over(s, addr, path).await
}

/// [`http_get`] from the source address `ip`.
pub async fn http_get_from(addr: SocketAddr, ip: &str, path: &str) -> Option<(u16, String)> {
    let s = connect_tcp_from(addr, ip).await;
    get_over(s, addr, path).await
}

/// The test keys' file `name` (tests/keys).
pub fn key_file(name: &str) -> String {
    format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A TLS client that trusts the self-signed certificate in tests/keys.
pub fn tls_connector() -> tokio_rustls::TlsConnector {
    tls_connector_for(rustls::DEFAULT_VERSIONS)
}

/// POSTs `body` to `/api/publish` at `addr` over TLS with `key`; the
/// response, whole.
pub async fn https_publish_at(addr: SocketAddr, key: &str, body: &str) -> String {
    try_https_publish_at(addr, key, body)
        .await
        .expect("an HTTPS publish answered")
}

/// As [`https_publish_at`]; `None` when the connection fails or nothing
/// is answered within [`WAIT`] (as a connection to a process handing
/// over may).
pub async fn try_https_publish_at(addr: SocketAddr, key: &str, body: &str) -> Option<String> {
    let post = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let name = rustls_pki_types::ServerName::try_from("localhost").ok()?;
        let mut tls = tls_connector().connect(name, tcp).await.ok()?;
        let req = format!(
            "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        tls.write_all(req.as_bytes()).await.ok()?;
        let mut answer = String::new();
        tls.read_to_string(&mut answer).await.ok()?;
        Some(answer)
    };
    tokio::time::timeout(WAIT, post).await.ok().flatten()
}

/// A TLS connection to `addr`, the server named `name`, offering
/// `versions` (the test certificate trusted), checked to speak the one
/// offered first.
pub async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tls_over(tcp, name, versions).await
}

/// As [`tls_connect`], over `tcp`.
async fn tls_over(
    tcp: tokio::net::TcpStream,
    name: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let name = rustls_pki_types::ServerName::try_from(name.to_owned()).expect("name");
    let tls = tls_connector_for(versions)
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(versions[0].version)
    );
    tls
}

/// A WebSocket over gale's own TLS.
pub type Wss =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A WebSocket to `addr`'s `/ws` over TLS (`wss://localhost:PORT/ws`),
/// offering `versions`, as [`tls_connect`].
pub async fn wss_connect(
    addr: SocketAddr,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Wss {
    let tls = tls_connect(addr, "localhost", versions).await;
    wss_over(tls, addr).await
}

/// As [`wss_connect`], the client's receive buffer held to `rcvbuf`
/// bytes: a client that stops reading soon leaves the server's writes
/// short.
pub async fn wss_connect_small(
    addr: SocketAddr,
    versions: &[&'static rustls::SupportedProtocolVersion],
    rcvbuf: u32,
) -> Wss {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
    let tcp = socket.connect(addr).await.expect("connect");
    let tls = tls_over(tcp, "localhost", versions).await;
    wss_over(tls, addr).await
}

/// The WebSocket upgrade of `/ws` over `tls`.
async fn wss_over(
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    addr: SocketAddr,
) -> Wss {
    let url = format!("wss://localhost:{}/ws", addr.port());
    tokio_tungstenite::client_async(url, tls)
        .await
        .expect("WebSocket over TLS")
        .0
}

/// The next text message of `ws`, parsed; pings and pongs are skipped,
/// anything else (a close, the end, nothing within [`WAIT`]) fails.
pub async fn wss_next(ws: &mut Wss) -> Value {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).expect("json"),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            other => panic!("expected text, got {other:?}"),
        }
    }
}

/// As [`tls_connector`], offering `versions` alone.
pub fn tls_connector_for(
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> tokio_rustls::TlsConnector {
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls_client_config(versions)))
}

/// A TLS client's settings: `versions` offered, the self-signed
/// certificate in tests/keys trusted.
pub fn tls_client_config(
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(key_file("tls-cert.pem")).expect("pem") {
        roots.add(cert.expect("cert")).expect("root");
    }
    rustls::ClientConfig::builder_with_protocol_versions(versions)
        .with_root_certificates(roots)
        .with_no_client_auth()
}

async fn get_over(
    mut s: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    addr: SocketAddr,
    path: &str,
) -> Option<(u16, String)> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Client {
    pub ws: Ws,
    pub client_id: String,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect");
        Client {
            ws,
            client_id: String::new(),
        }
    }

    /// Connects to `url` with extra handshake headers and reads the
    /// greeting, returned beside the client; `Err` is the HTTP status of
    /// a refused handshake.
    pub async fn connect_with_headers(
        url: &str,
        headers: &[(&'static str, String)],
    ) -> Result<(Client, Value), u16> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::http::HeaderValue;
        let mut req = url.into_client_request().expect("request");
        for (k, v) in headers {
            req.headers_mut()
                .insert(*k, HeaderValue::from_str(v).expect("header"));
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => {
                let mut c = Client {
                    ws,
                    client_id: String::new(),
                };
                let hello = c.recv_json().await;
                assert_eq!(hello["type"], "connected", "{hello}");
                c.client_id = hello["client_id"].as_str().expect("client_id").to_owned();
                Ok((c, hello))
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(e) => panic!("unexpected handshake error: {e}"),
        }
    }

    /// Connects to `url` from the source address `ip`.
    pub async fn connect_from(url: &str, ip: &str) -> Client {
        Client::over(url, connect_tcp_from(url_addr(url), ip).await).await
    }

    /// The WebSocket handshake to `url` over a TCP connection already
    /// made (with the socket options a test needs).
    pub async fn over(url: &str, stream: tokio::net::TcpStream) -> Client {
        let (ws, _) =
            tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream))
                .await
                .expect("handshake");
        Client {
            ws,
            client_id: String::new(),
        }
    }

    /// Reads the greeting and keeps the client id it gives.
    pub async fn greeted(mut self) -> Client {
        let hello = self.recv_json().await;
        assert_eq!(hello["type"], "connected", "{hello}");
        self.client_id = hello["client_id"].as_str().expect("client_id").to_owned();
        self
    }

    /// Subscribes to `topic`; the server must agree.
    pub async fn subscribe(&mut self, topic: &str) {
        let r = self
            .request(
                "topic.subscribe",
                serde_json::json!({ "topic": topic }),
                "sub",
            )
            .await;
        assert_eq!(r["ok"], true, "{r}");
    }

    pub async fn send(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// The next message, whatever it is.
    pub async fn next(&mut self) -> Option<Message> {
        match tokio::time::timeout(WAIT, self.ws.next()).await {
            Ok(Some(Ok(m))) => Some(m),
            Ok(_) => None,
            Err(_) => panic!("no message within {WAIT:?}"),
        }
    }

    /// The next text message as sent (pings are skipped).
    pub async fn next_text(&mut self) -> String {
        loop {
            match self.next().await {
                Some(Message::Text(t)) => return t.to_string(),
                Some(Message::Ping(_) | Message::Pong(_)) => continue,
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// The next text message, parsed (pings are skipped).
    pub async fn recv_json(&mut self) -> Value {
        loop {
            match self.next().await {
                Some(Message::Text(t)) => return serde_json::from_str(&t).expect("json"),
                Some(Message::Ping(_) | Message::Pong(_)) => continue,
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// Sends a city and returns the reply.
    pub async fn ask(&mut self, city: &str) -> Value {
        self.send(city).await;
        self.recv_json().await
    }

    /// Sends a JSON event with `ref` `r` and returns the reply to it.
    pub async fn request(&mut self, event: &str, data: Value, r: &str) -> Value {
        let msg = serde_json::json!({"event": event, "data": data, "ref": r});
        self.send(&msg.to_string()).await;
        self.reply_to(r).await
    }

    /// Reads until the reply to `r` arrives.
    pub async fn reply_to(&mut self, r: &str) -> Value {
        loop {
            let msg = self.recv_json().await;
            if msg["reply"] == r {
                return msg;
            }
        }
    }

    /// The next push (a message with an `event`), skipping replies.
    pub async fn next_push(&mut self) -> Value {
        loop {
            let msg = self.recv_json().await;
            if msg.get("event").is_some() {
                return msg;
            }
        }
    }

    /// Reads until the server's close frame and returns it.
    pub async fn expect_close(&mut self) -> CloseFrame {
        loop {
            match self.next().await {
                Some(Message::Close(Some(frame))) => return frame,
                Some(Message::Close(None)) => panic!("close without a code"),
                Some(_) => continue,
                None => panic!("connection ended without a close frame"),
            }
        }
    }
}

/// Counts rows in `weather_requests` for the given client, in SQLite or
/// PostgreSQL.
pub async fn count_rows(store_url: &str, client_id: &str) -> i64 {
    rows_for(store_url, client_id).await.len() as i64
}

/// A row as read back: (city, ok, temperature, error, latency_ms).
pub type Row = (String, bool, Option<f64>, Option<String>, i64);

pub async fn rows_for(store_url: &str, client_id: &str) -> Vec<Row> {
    if store_url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(store_url)
            .await
            .expect("open sqlite");
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT city, ok, temperature, error, latency_ms FROM weather_requests \
             WHERE client_id = ? ORDER BY created_at, id",
        )
        .bind(client_id)
        .fetch_all(&pool)
        .await
        .expect("query sqlite");
        pool.close().await;
        rows
    } else {
        let pool = sqlx::PgPool::connect(store_url)
            .await
            .expect("open postgres");
        let id: uuid::Uuid = client_id.parse().expect("uuid");
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT city, ok, temperature, error, latency_ms::BIGINT FROM weather_requests \
             WHERE client_id = $1 ORDER BY created_at, id",
        )
        .bind(id)
        .fetch_all(&pool)
        .await
        .expect("query postgres");
        pool.close().await;
        rows
    }
}

/// An HS256 token for `sub` with `roles`, valid for ten minutes.
pub fn hs256_token(secret: &str, sub: &str, roles: Value) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": sub, "roles": roles, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

/// An HS256 token with these `claims` (an `exp` ten minutes away is
/// added when they have none).
pub fn hs256_token_with(secret: &str, mut claims: Value) -> String {
    if claims.get("exp").is_none() {
        claims["exp"] = serde_json::json!(chrono::Utc::now().timestamp() + 600);
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

/// A new, empty database on this test binary's private PostgreSQL
/// ([`services::postgres`]).
pub async fn postgres_url() -> String {
    services::postgres().await
}

/// Holds SQLite's write lock from another connection, as a slow or busy
/// database would, until dropped.
pub struct WriteLock(sqlx::SqliteConnection);

impl WriteLock {
    pub async fn take(server: &TestServer) -> WriteLock {
        let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&server.store_url)
            .await
            .expect("open");
        sqlx::query("BEGIN EXCLUSIVE")
            .execute(&mut conn)
            .await
            .expect("lock");
        WriteLock(conn)
    }

    pub async fn release(mut self) {
        sqlx::query("COMMIT")
            .execute(&mut self.0)
            .await
            .expect("unlock");
    }
}

/// POSTs to /api/publish: (status, JSON body).
pub async fn publish(server: &TestServer, key: Option<&str>, body: &str) -> (u16, Value) {
    publish_at(server.addr, key, body).await
}

/// POSTs to /api/publish at `addr`: (status, JSON body).
pub async fn publish_at(addr: SocketAddr, key: Option<&str>, body: &str) -> (u16, Value) {
    api_post(addr, key, "publish", body).await
}

/// POSTs `body` to /api/{method} at `addr`: (status, JSON body).
pub async fn api_post(
    addr: SocketAddr,
    key: Option<&str>,
    method: &str,
    body: &str,
) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST /api/{method} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("in time")
        .expect("read");
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Asserts nothing arrives for a moment.
/// The address of a `ws://HOST:PORT/…` URL.
pub fn url_addr(url: &str) -> SocketAddr {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.split('/').next().unwrap_or(rest);
    host.parse().expect("an IP:PORT URL")
}

/// A TCP connection to `addr` from the source address `ip` (any port).
pub async fn connect_tcp_from(addr: SocketAddr, ip: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    let local: std::net::IpAddr = ip.parse().expect("source ip");
    socket
        .bind(SocketAddr::new(local, 0))
        .expect("bind the source address");
    socket.connect(addr).await.expect("connect")
}

pub async fn quiet(c: &mut Client) {
    let got = tokio::time::timeout(
        Duration::from_millis(300),
        futures_util::StreamExt::next(&mut c.ws),
    )
    .await;
    assert!(got.is_err(), "expected nothing, got {got:?}");
}
