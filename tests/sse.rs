//! The SSE fallback transport: the same protocol as /ws over GET /sse
//! (server → client) and POST /sse/SESSION (client → server), with the
//! same identity, policies, rate limits, push and recovery.

mod common;

use std::time::Duration;

use common::sse::SseClient;
use common::{WAIT, publish, start_with};
use gale::config::{Config, TopicConfig};
use serde_json::json;

const API_KEY: &str = "sse-key-0123456789ab";
const SECRET: &str = "sse-test-secret";

fn configure(c: &mut Config) {
    c.api.key = Some(API_KEY.into());
    c.auth.jwt_secret = Some(SECRET.into());
    c.topics
        .insert("news:*".into(), TopicConfig::history(10, 300));
}

#[tokio::test]
async fn a_session_speaks_the_websocket_protocol_over_sse_and_post() {
    let server = start_with(configure).await;
    let mut c = SseClient::open(server.addr, "").await.expect("open");
    assert_eq!(server.metric("sse-sessions").await, 1);

    // A city as plain text: the same reply as over /ws, on the stream.
    assert_eq!(c.send("London").await, 202);
    let reply = c.recv_json().await;
    assert_eq!(reply["type"], "weather", "{reply}");
    assert_eq!(reply["city"], "London");
    let rows = common::count_rows(&server.store_url, &c.client_id);
    tokio::time::timeout(WAIT, async {
        let mut rows = rows;
        while rows.await < 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            rows = common::count_rows(&server.store_url, &c.client_id);
        }
    })
    .await
    .expect("the request was logged under the session's client_id");

    // An event and its reply.
    let r = c
        .request("weather.get", json!({"city": "Paris"}), "w")
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["data"]["city"], "Paris");

    // Bad input: the same errors as /ws.
    assert_eq!(c.send("{\"event\": 5, \"ref\": \"x\"}").await, 202);
    let err = c.recv_json().await;
    assert_eq!(err["ok"], false, "{err}");
    assert_eq!(err["error"]["code"], "invalid_message");
    let r = c.request("no.such.event", json!({}), "u").await;
    assert_eq!(r["error"]["code"], "unknown_event", "{r}");

    // Anonymous: an event that requires a user is refused.
    let r = c.request("notes.list", json!({}), "n").await;
    assert_eq!(r["error"]["code"], "unauthorized", "{r}");

    // What the POST side refuses, it says.
    assert_eq!(c.post_raw("not-a-session", b"London".to_vec()).await, 404);
    assert_eq!(c.post_raw(&c.session, vec![0xff, 0xfe]).await, 400);
    let big = vec![b'a'; server.app.config.server.max_message_bytes + 1];
    assert_eq!(c.post_raw(&c.session, big).await, 413);

    // The session ends with its stream.
    let session = c.session.clone();
    let probe = SseClient::open(server.addr, "").await.expect("open");
    drop(c);
    server.wait_metric("sse-sessions", 1).await;
    assert_eq!(probe.post_raw(&session, b"London".to_vec()).await, 404);
}

#[tokio::test]
async fn identity_push_and_rate_limits_are_the_same_as_over_websocket() {
    let server = start_with(configure).await;
    let token = common::hs256_token(SECRET, "alice", json!([]));
    let mut alice = SseClient::open(server.addr, &format!("?token={token}"))
        .await
        .expect("open");
    let mut ws = server.client_with_token(&token).await;
    server.wait_metric("users", 1).await;
    // Bad tokens are refused before a session exists.
    assert_eq!(
        SseClient::open(server.addr, "?token=nonsense").await.err(),
        Some(401)
    );

    // Push to a user reaches the SSE session and the WebSocket alike.
    let (status, body) = publish(
        &server,
        Some(API_KEY),
        r#"{"event":"note.shared","data":{"id":7},"users":["alice"]}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reached"], 2, "{body}");
    for push in [alice.next_push().await, ws.next_push().await] {
        assert_eq!(push["event"], "note.shared");
        assert_eq!(push["data"]["id"], 7);
    }
    // A signed-in event works.
    let r = alice.request("notes.list", json!({}), "n").await;
    assert_eq!(r["ok"], true, "{r}");

    // weather.subscribe's limit (30/min per user) holds over SSE too.
    let mut limited = None;
    for i in 0..31 {
        let r = alice
            .request(
                "weather.subscribe",
                json!({"city": "Oslo"}),
                &format!("s{i}"),
            )
            .await;
        if r["ok"] == false {
            limited = Some((i, r));
            break;
        }
    }
    let (i, r) = limited.expect("the 31st subscribe is refused");
    assert_eq!(i, 30, "{r}");
    assert_eq!(r["error"]["code"], "rate_limited", "{r}");
}

#[tokio::test]
async fn topics_and_recovery_work_over_sse() {
    let server = start_with(configure).await;
    let mut c = SseClient::open(server.addr, "").await.expect("open");
    let r = c
        .request("topic.subscribe", json!({"topic": "news:sse"}), "s")
        .await;
    let epoch = r["data"]["epoch"].as_str().expect("epoch").to_owned();
    let body = json!({"event": "headline", "data": 1, "topic": "news:sse"}).to_string();
    assert_eq!(publish(&server, Some(API_KEY), &body).await.0, 200);
    let push = c.next_push().await;
    assert_eq!(push["offset"], 1, "{push}");
    drop(c);
    for n in 2..=3 {
        let body = json!({"event": "headline", "data": n, "topic": "news:sse"}).to_string();
        assert_eq!(publish(&server, Some(API_KEY), &body).await.0, 200);
    }
    // The API queues; wait until both are in the history.
    let mut d = SseClient::open(server.addr, "").await.expect("open");
    let back = loop {
        let r = d
            .request(
                "topic.subscribe",
                json!({"topic": "news:sse", "since": {"offset": 1, "epoch": epoch}}),
                "r",
            )
            .await;
        if r["data"]["offset"] == 3 {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(back["data"]["recovered"], true, "{back}");
    let got: Vec<_> = back["data"]["publications"]
        .as_array()
        .expect("publications")
        .iter()
        .map(|p| p["data"].clone())
        .collect();
    assert_eq!(got, vec![json!(2), json!(3)]);
}

#[tokio::test]
async fn sessions_are_bounded_switchable_and_end_cleanly_at_shutdown() {
    let mut server = start_with(|c| {
        configure(c);
        c.sse.max_sessions = 1;
    })
    .await;
    let mut one = SseClient::open(server.addr, "").await.expect("open");
    assert_eq!(SseClient::open(server.addr, "").await.err(), Some(503));
    // Queued replies go out before the stream ends with the reason.
    assert_eq!(one.send("Berlin").await, 202);
    let reply = one.recv_json().await;
    assert_eq!(reply["city"], "Berlin", "{reply}");
    server.stop().await.expect("clean stop");
    let (event, data) = one.next_message().await.expect("a close message");
    assert_eq!(event, "close", "{data}");
    let data: serde_json::Value = serde_json::from_str(&data).expect("json");
    assert_eq!(data["code"], 1001, "{data}");
    assert!(one.next_message().await.is_none(), "the stream ended");

    let off = start_with(|c| c.sse.enabled = false).await;
    assert_eq!(SseClient::open(off.addr, "").await.err(), Some(404));
}

/// A client that stops reading its stream while pushes wait is dropped
/// after 10 s, as a WebSocket one is: its session leaves, its
/// connection closes, and the server's memory for it is bounded meanwhile.
/// 600 pushes of 1 KB fill the kernel's buffers and then the outbox.
#[tokio::test]
async fn a_session_whose_client_stopped_reading_is_ended() {
    a_stalled_session_is_ended(600, 1_000).await;
}

/// Three pushes of 60 KB: the outbox is empty, the session's task holds
/// what the socket refuses.
#[tokio::test]
async fn a_stalled_session_is_ended_when_few_large_pushes_wait() {
    a_stalled_session_is_ended(3, 60_000).await;
}

async fn a_stalled_session_is_ended(publications: usize, bytes: usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = start_with(|c| {
        configure(c);
        c.server.send_buffer_bytes = 4096;
    })
    .await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut stream = socket.connect(server.addr).await.expect("connect");
    stream
        .write_all(b"GET /sse HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .expect("write");
    let mut seen = String::new();
    let mut buf = [0u8; 1024];
    // The greeting, whole: its data line and the blank line after it.
    while !(seen.contains("\"type\":\"connected\"") && seen.contains("}\n\n")) {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("in time")
            .expect("read");
        assert!(n > 0, "stream ended: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let session = seen
        .split("\"session\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("session id")
        .to_owned();
    let probe = SseClient::open(server.addr, "").await.expect("open");
    let subscribe = r#"{"event":"topic.subscribe","data":{"topic":"firehose"}}"#;
    assert_eq!(
        probe
            .post_raw(&session, subscribe.as_bytes().to_vec())
            .await,
        202
    );
    server.wait_metric("topics", 1).await;
    // From here the client reads nothing.
    let pad = "x".repeat(bytes);
    let body = json!({"event": "big", "data": pad, "topic": "firehose"}).to_string();
    for _ in 0..publications {
        assert_eq!(publish(&server, Some(API_KEY), &body).await.0, 200);
    }
    let started = tokio::time::Instant::now();
    // `probe` is the one session left once the stalled one is ended.
    while server.metric("sse-sessions").await != 1 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the stalled session is still open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(server.metric("slow-consumers").await >= 1);
    assert!(
        server.metric("outbound-queued").await
            <= server.app.config.connection.outbound_queue as u64,
        "what waited for it was released"
    );
    assert_eq!(probe.post_raw(&session, b"London".to_vec()).await, 404);
    // Its connection is closed: what the kernel held drains, then the
    // read ends (EOF or a reset, either is the end) within the wait.
    let _ended = tokio::time::timeout(WAIT, async {
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await
    })
    .await
    .expect("the server closed the connection");
}

/// Reads from `stream` until `buf` holds `want` (or the stream ends).
async fn read_until<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, buf: &mut String, want: &str) {
    use tokio::io::AsyncReadExt;
    let mut bytes = [0u8; 4096];
    while !buf.contains(want) {
        let n = tokio::time::timeout(WAIT, stream.read(&mut bytes))
            .await
            .unwrap_or_else(|_| panic!("no {want:?} in time; got {buf:?}"))
            .expect("read");
        assert!(n > 0, "the stream ended before {want:?}: {buf:?}");
        buf.push_str(&String::from_utf8_lossy(&bytes[..n]));
    }
}

/// The session id in a greeting read raw.
fn session_of(raw: &str) -> String {
    raw.split("\"session\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("session id")
        .to_owned()
}

/// Over TLS the session's stream is served the same way: chunks of an
/// HTTP/1.1 body, each whole message in one, and the body's end (the
/// zero-length chunk) once the server stops.
#[tokio::test]
async fn a_session_streams_over_tls_in_chunks_to_its_end() {
    use rustls_pki_types::ServerName;
    use tokio::io::AsyncWriteExt;
    let mut server = start_with(|c| {
        configure(c);
        c.server.tls_cert = Some(common::key_file("tls-cert.pem"));
        c.server.tls_key = Some(common::key_file("tls-key.pem"));
    })
    .await;
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("connect");
        let name = ServerName::try_from("localhost".to_owned()).expect("name");
        common::tls_connector()
            .connect(name, tcp)
            .await
            .expect("TLS handshake")
    };
    let mut stream = connect().await;
    stream
        .write_all(b"GET /sse HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .expect("write");
    let mut raw = String::new();
    read_until(&mut stream, &mut raw, "}\n\n\r\n").await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(
        raw.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{raw}"
    );
    // The greeting is one chunk: its size, then exactly that many bytes.
    let body = raw.split("\r\n\r\n").nth(1).expect("a body");
    let (size, rest) = body.split_once("\r\n").expect("a chunk size");
    let size = usize::from_str_radix(size, 16).expect("hex size");
    assert!(rest[..size].starts_with("retry: 2000\ndata: {"), "{rest}");
    assert_eq!(&rest[size..size + 2], "\r\n", "{body}");
    let session = session_of(&raw);

    // A message posted on another connection is answered on the stream.
    let mut post = connect().await;
    let msg = "Berlin";
    post.write_all(
        format!(
            "POST /sse/{session} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{msg}",
            msg.len()
        )
        .as_bytes(),
    )
    .await
    .expect("post");
    let mut answer = String::new();
    read_until(&mut post, &mut answer, "\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    read_until(&mut stream, &mut raw, "\"city\":\"Berlin\"").await;

    server.stop().await.expect("clean stop");
    read_until(&mut stream, &mut raw, "\r\n0\r\n\r\n").await;
    assert!(raw.contains("event: close"), "{raw}");
}

/// An HTTP/1.0 client gets the stream unchunked, ended by the
/// connection's close.
#[tokio::test]
async fn an_http_1_0_session_streams_unchunked() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut server = start_with(configure).await;
    let mut stream = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    stream
        .write_all(b"GET /sse HTTP/1.0\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .expect("write");
    let mut raw = String::new();
    read_until(&mut stream, &mut raw, "}\n\n").await;
    assert!(
        raw.starts_with("HTTP/1.0 200") || raw.starts_with("HTTP/1.1 200"),
        "{raw}"
    );
    assert!(
        !raw.to_ascii_lowercase().contains("transfer-encoding"),
        "{raw}"
    );
    let body = raw.split("\r\n\r\n").nth(1).expect("a body");
    assert!(body.starts_with("retry: 2000\ndata: {"), "{body}");
    let probe = SseClient::open(server.addr, "").await.expect("open");
    assert_eq!(
        probe.post_raw(&session_of(&raw), b"Oslo".to_vec()).await,
        202
    );
    read_until(&mut stream, &mut raw, "\"city\":\"Oslo\"").await;
    server.stop().await.expect("clean stop");
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
        .await
        .expect("the server closed the connection")
        .expect("read");
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("event: close"), "{rest}");
    assert!(!rest.contains("\r\n0\r\n"), "no chunk framing: {rest}");
}
