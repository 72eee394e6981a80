//! The WebSocket protocol's edges (RFC 6455 close codes, binary frames,
//! pings, dead peers) and the plain HTTP routes.

mod common;

use std::time::Duration;

use common::{WAIT, http_get, start, start_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

#[tokio::test]
async fn oversized_message_closes_with_1009() {
    let server = start_with(|c| c.server.max_message_bytes = 1024).await;
    let mut c = server.client().await;
    c.send(&"a".repeat(2048)).await;
    let frame = c.expect_close().await;
    assert_eq!(u16::from(frame.code), 1009);
    assert_eq!(server.fake.calls(), 0);

    // A message just under the limit is an ordinary (too long) city.
    let mut c = server.client().await;
    let reply = c.ask(&"a".repeat(1000)).await;
    assert_eq!(reply["code"], "invalid_data");
}

#[tokio::test]
async fn invalid_utf8_text_closes_with_1007() {
    let server = start().await;
    let mut c = server.client().await;
    let frame = Frame::message(vec![0x4c, 0xff, 0xfe, 0x6e], OpCode::Data(Data::Text), true);
    futures_util::SinkExt::send(&mut c.ws, Message::Frame(frame))
        .await
        .expect("send raw frame");
    let frame = c.expect_close().await;
    assert_eq!(u16::from(frame.code), 1007);
}

#[tokio::test]
async fn binary_message_gets_an_error_and_the_connection_stays_open() {
    let server = start().await;
    let mut c = server.client().await;
    futures_util::SinkExt::send(&mut c.ws, Message::binary(vec![1_u8, 2, 3]))
        .await
        .expect("send");
    let reply = c.recv_json().await;
    assert_eq!(reply["type"], "error");
    assert_eq!(reply["code"], "invalid_message");
    assert!(reply["message"].as_str().expect("m").contains("binary"));
    assert_eq!(c.ask("Madrid").await["type"], "weather");
}

#[tokio::test]
async fn http_routes() {
    let server = start().await;
    let (status, body) = server.get("/").await.expect("/");
    assert_eq!(status, 200);
    assert!(body.contains("<!doctype html>"), "the live page");
    assert!(body.contains("/gale-client.js"), "{body}");
    let (status, js) = server.get("/gale-client.js").await.expect("client");
    assert_eq!(status, 200);
    assert!(
        js.contains("export class GaleClient"),
        "the JS client module"
    );

    let (status, body) = server.get("/ws").await.expect("/ws");
    assert_eq!(status, 426, "plain GET on /ws is refused clearly");
    assert!(body.contains("WebSocket"), "{body}");

    assert_eq!(server.get("/healthz").await.expect("healthz").0, 200);
    assert_eq!(server.get("/nope").await.expect("404").0, 404);

    let mut c = server.client().await;
    c.ask("Vienna").await;
    let m = server.metrics().await;
    for key in [
        "requests",
        "successful",
        "failed",
        "db-queued",
        "db-completed",
        "db-dropped",
        "connections",
    ] {
        assert!(m[key].is_u64(), "metrics.json has {key}: {m}");
    }
    assert_eq!(m["requests"], 1);
    assert_eq!(m["connections"], 1);

    let (status, text) = server.get("/metrics").await.expect("metrics");
    assert_eq!(status, 200);
    for name in [
        "gale_connections ",
        "gale_requests_total 1",
        "gale_request_outcomes_total{outcome=\"Ok\"} 1",
        "gale_upstream_calls_total{result=\"Ok\"} 1",
        "gale_upstream_latency_seconds_bucket",
        "gale_cache_misses_total 1",
        "gale_upstream_breaker_state 0",
        "gale_db_queue_depth",
        "gale_db_rows_dropped_total 0",
        "gale_db_batch_rows_bucket",
        "gale_messages_in_total 1",
    ] {
        assert!(text.contains(name), "/metrics lacks {name:?}:\n{text}");
    }
}

#[tokio::test]
async fn idle_connections_are_pinged() {
    let server = start_with(|c| c.server.ping_interval_s = 1).await;
    let mut c = server.client().await;
    // Keep reading for three intervals: the client library answers each
    // ping while it reads, so the connection stays up.
    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_millis(3500);
    while let Ok(msg) = tokio::time::timeout_at(until, c.next()).await {
        match msg {
            Some(Message::Ping(_)) => pings += 1,
            other => panic!("expected only pings, got {other:?}"),
        }
    }
    assert!(
        pings >= 2,
        "pinged {pings} times in 3.5 s at a 1 s interval"
    );
    assert_eq!(c.ask("Prague").await["type"], "weather");
}

#[tokio::test]
async fn a_peer_that_never_answers_is_dropped() {
    let server = start_with(|c| c.server.ping_interval_s = 1).await;
    // A raw handshake, then silence: no pongs, no reads of our own.
    let mut s = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        server.addr
    );
    s.write_all(req.as_bytes()).await.expect("handshake");
    server.wait_metric("connections", 1).await;
    // Two silent intervals later the server gives up on it.
    server.wait_metric("connections", 0).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "server closed the socket");
}

#[tokio::test]
async fn a_second_plain_request_is_still_served_during_websocket_load() {
    // The HTTP routes share the listener with /ws; a burst of connections
    // does not stop /healthz from answering.
    let server = start().await;
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(server.client().await);
    }
    let (status, _) = http_get(server.addr, "/healthz").await.expect("healthz");
    assert_eq!(status, 200);
    assert_eq!(server.metric("connections").await, 50);
}

#[tokio::test]
async fn echo_endpoint_is_off_by_default_and_echoes_on_the_same_stack() {
    let server = start().await;
    assert_eq!(
        server.get("/echo").await.expect("get").0,
        404,
        "off by default"
    );

    let server = start_with(|c| {
        c.server.echo = true;
        c.server.max_message_bytes = 1024;
    })
    .await;
    let (status, _) = server.get("/echo").await.expect("get");
    assert_eq!(status, 426, "a WebSocket endpoint");
    let url = format!("ws://{}/echo", server.addr);
    let mut c = common::Client::connect(&url).await;
    c.send("London").await;
    assert_eq!(
        c.next().await,
        Some(Message::text("London")),
        "echoed, no greeting"
    );
    futures_util::SinkExt::send(&mut c.ws, Message::binary(vec![0_u8, 1, 2]))
        .await
        .expect("send");
    assert_eq!(c.next().await, Some(Message::binary(vec![0_u8, 1, 2])));
    c.send(&"a".repeat(2048)).await;
    assert_eq!(
        u16::from(c.expect_close().await.code),
        1009,
        "same limits as /ws"
    );
    assert_eq!(server.fake.calls(), 0);
}

#[tokio::test]
async fn echo_sends_back_messages_as_large_as_it_accepts() {
    // Larger than max_outbound_message_bytes (1 MiB): /echo's replies are
    // bounded by what it accepts, and must be written whole.
    let server = start_with(|c| {
        c.server.echo = true;
        c.server.max_message_bytes = 4 << 20;
    })
    .await;
    let url = format!("ws://{}/echo", server.addr);
    let mut c = common::Client::connect(&url).await;
    let big = "e".repeat(3 << 20);
    c.send(&big).await;
    match c.next().await {
        Some(Message::Text(t)) => assert_eq!(t.len(), big.len()),
        other => panic!("expected the echo, got {other:?}"),
    }
}

#[tokio::test]
async fn a_handshake_with_another_version_or_a_bad_key_gets_426_naming_version_13() {
    let server = start().await;
    for (version, key) in [
        ("8", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("13", "short"),
        ("13", "not-base64-but-24-chars!"),
    ] {
        let mut s = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("connect");
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.expect("handshake");
        let mut answer = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut answer))
            .await
            .expect("answered")
            .expect("read");
        let head = String::from_utf8_lossy(&answer).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 426"), "{version} {key}: {head}");
        assert!(head.contains("sec-websocket-version: 13"), "{head}");
    }
    assert_eq!(server.metric("connections-total").await, 0);
}

/// The raw head of `GET path`.
async fn head_of(server: &common::TestServer, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    text.split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase()
}

#[tokio::test]
async fn any_page_may_import_the_js_client() {
    let server = start().await;
    let head = head_of(&server, "/gale-client.js").await;
    assert!(head.contains("access-control-allow-origin: *"), "{head}");
    assert!(head.contains("content-type: text/javascript"), "{head}");
}

/// Fields come in the documented order, in every kind of message.
#[tokio::test]
async fn replies_and_pushes_keep_the_documented_field_order() {
    let server = start_with(|c| c.api.key = Some("order-key-0123456789".into())).await;
    let mut c = server.client().await;
    let order = |text: &str, keys: &[&str]| {
        let at: Vec<usize> = keys
            .iter()
            .map(|k| {
                text.find(&format!("\"{k}\":"))
                    .unwrap_or_else(|| panic!("{k} in {text}"))
            })
            .collect();
        assert!(
            at.windows(2).all(|w| w[0] < w[1]),
            "{keys:?} in order: {text}"
        );
    };
    let reading = [
        "city",
        "temperature",
        "feels_like",
        "description",
        "humidity",
    ];
    c.send("Paris").await;
    let text = c.next_text().await;
    order(&text, &[&["type"][..], &reading[..]].concat());
    c.send(r#"{"event":"weather.get","data":{"city":"Oslo"},"ref":"1"}"#)
        .await;
    let text = c.next_text().await;
    order(
        &text,
        &[&["reply", "ok", "data"][..], &reading[..]].concat(),
    );
    c.send(r#"{"event":"topic.subscribe","data":{"topic":"news"},"ref":"2"}"#)
        .await;
    c.next_text().await;
    let (status, _) = common::publish(
        &server,
        Some("order-key-0123456789"),
        r#"{"event":"headline","data":{"z":1,"a":2},"topic":"news"}"#,
    )
    .await;
    assert_eq!(status, 200);
    let text = c.next_text().await;
    order(&text, &["event", "data", "z", "a"]);
}

/// A client whose close frame is invalid (code 0 here) gets 1002, and the
/// server then closes the TCP connection itself at once, rather than
/// waiting for a second close that will not come (Autobahn 7.9.x: "it is
/// preferred that the server close the TCP connection").
#[tokio::test]
async fn an_invalid_close_is_answered_1002_and_the_server_closes_tcp_first() {
    let server = start().await;
    let mut raw = common::raw::Raw::connect(server.addr, "/ws", None).await;
    let hello = raw.next().await;
    assert!(hello.text().contains("connected"), "{}", hello.text());
    raw.frame(true, false, 8, &0u16.to_be_bytes()).await;
    let close = raw.next().await;
    assert_eq!(close.close_code(), 1002);
    // The server's closing wait is 2 s; it must not be spent here.
    let ended = tokio::time::timeout(Duration::from_millis(1_000), raw.next_any()).await;
    assert!(
        matches!(ended, Ok(None)),
        "the server closed the TCP connection at once: {ended:?}"
    );
}
