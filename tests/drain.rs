//! Draining (`server.drain_s`): connections closed spread over the
//! window with 1012 and a suggested reconnect delay, `/healthz` saying
//! "draining" at once, handshakes refused with `Retry-After`; and the
//! node-wide handshake rate (`server.handshake_rate`) that smooths a
//! reconnect wave.

mod common;

use std::time::Duration;

use common::{Client, http_get};
use tokio::time::Instant;

#[tokio::test]
async fn a_drain_spreads_closes_over_the_window_with_1012_and_a_reconnect_delay() {
    const N: usize = 6;
    let mut server = common::start_with(|c| {
        c.server.drain_s = 2;
        c.server.drain_reconnect_ms = 700;
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..N {
        let mut c = Client::connect(&server.ws_url()).await;
        c.recv_json().await; // greeting
        clients.push(c);
    }
    let started = Instant::now();
    server.shutdown.cancel();

    // /healthz says so at once, and the door answers with Retry-After.
    let (status, body) = http_get(server.addr, "/healthz").await.expect("answer");
    assert_eq!(status, 503);
    assert!(body.starts_with("draining"), "{body}");
    let refused = Client::connect_with_headers(&server.ws_url(), &[]).await;
    assert_eq!(refused.err(), Some(503), "a new handshake is refused");

    // Every connection closes with 1012 and a JSON reason; the closes are
    // spread over the two seconds, not all at once.
    let waits: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let frame = c.expect_close().await;
                (started.elapsed(), frame)
            })
        })
        .collect();
    let mut at = Vec::new();
    for w in waits {
        let (when, frame) = w.await.expect("reader");
        at.push(when);
        assert_eq!(u16::from(frame.code), 1012);
        let reason: serde_json::Value =
            serde_json::from_str(frame.reason.as_str()).expect("a JSON reason");
        let ms = reason["reconnect_ms"].as_u64().expect("reconnect_ms");
        assert!(ms <= 700, "{ms}");
    }
    at.sort();
    let spread = at[N - 1] - at[0];
    assert!(
        spread >= Duration::from_millis(1_000),
        "closes spread over the window: {at:?}"
    );
    assert!(at[N - 1] < Duration::from_secs(5), "{at:?}");
    server
        .handle
        .take()
        .expect("running")
        .await
        .expect("task")
        .expect("clean");
    assert_eq!(
        server.app.metrics.drained.get(),
        N as u64,
        "every connection counted as drained"
    );
}

#[tokio::test]
async fn a_handshake_during_a_drain_is_told_when_to_come_back() {
    let mut server = common::start_with(|c| {
        c.server.drain_s = 2;
    })
    .await;
    // One connection keeps the drain going.
    let mut held = Client::connect(&server.ws_url()).await;
    held.recv_json().await;
    server.shutdown.cancel();
    let mut s = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let head = raw_upgrade(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    let retry: u64 = header(&head, "retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("Retry-After in {head}"));
    assert!((1..=60).contains(&retry), "{retry}");
    let _ = held.expect_close().await;
    let _ = server.stop().await;
}

#[tokio::test]
async fn without_drain_s_shutdown_closes_at_once_with_1001() {
    let mut server = common::start().await;
    let mut c = Client::connect(&server.ws_url()).await;
    c.recv_json().await;
    server.shutdown.cancel();
    let frame = c.expect_close().await;
    assert_eq!(u16::from(frame.code), 1001);
    server.stop().await.expect("clean");
}

#[tokio::test]
async fn handshakes_past_the_node_rate_are_refused_503_with_a_jittered_retry_after() {
    let server = common::start_with(|c| {
        c.server.handshake_rate = 5;
    })
    .await;
    let mut accepted = 0;
    let mut retries = Vec::new();
    let mut held = Vec::new();
    for _ in 0..40 {
        let mut s = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("connect");
        let head = raw_upgrade(&mut s).await;
        if head.starts_with("HTTP/1.1 101") {
            accepted += 1;
            held.push(s);
        } else {
            assert!(head.starts_with("HTTP/1.1 503"), "{head}");
            assert!(
                head.contains("server.handshake_rate"),
                "says which limit: {head}"
            );
            let retry: u64 = header(&head, "retry-after")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("Retry-After in {head}"));
            retries.push(retry);
        }
    }
    // A second's worth at once (5), maybe one more refilled meanwhile.
    assert!((5..=8).contains(&accepted), "{accepted}");
    assert!(retries.iter().all(|r| *r >= 1), "{retries:?}");
    // 35 refused at 5/s: their retries are spread over several seconds,
    // not all told "1".
    let distinct: std::collections::HashSet<_> = retries.iter().collect();
    assert!(distinct.len() >= 3, "jittered: {retries:?}");
    let refused = server
        .sample("gale_handshakes_refused_total{reason=\"NodeRate\"}")
        .await;
    assert_eq!(refused as usize, retries.len());
}

/// Sends a WebSocket upgrade on `s` and returns the response head.
async fn raw_upgrade(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(common::WAIT, s.read(&mut chunk))
            .await
            .expect("in time")
            .expect("read");
        assert!(
            n > 0,
            "closed before answering: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
    // A refusal's body, too, so the reason can be checked.
    let text = String::from_utf8_lossy(&buf).into_owned();
    let end = text.find("\r\n\r\n").map_or(0, |i| i + 4);
    let length: usize = header(&text, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < end + length {
        match tokio::time::timeout(common::WAIT, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}
