//! Hostile input against a live server, while a well-behaved client keeps
//! asking: every attack is refused with the right answer, the server stays
//! up, and the bystander is answered normally throughout.

mod common;

use std::time::{Duration, Instant};

use common::raw::Raw;
use common::{TestServer, start_with};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The bystander: one request, answered normally and in time.
async fn bystander_is_served(server: &TestServer, step: &str) {
    let started = Instant::now();
    let mut c = server.client().await;
    let r = c.request("server.stats", Value::Null, "b").await;
    assert_eq!(r["ok"], true, "after {step}: {r}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "after {step}: {took:?}");
}

fn event(name: &str, data: Value, r: usize) -> String {
    json!({"event": name, "data": data, "ref": r.to_string()}).to_string()
}

/// Reads until the reply to `r`, skipping everything else.
async fn reply(ws: &mut Raw, r: &str) -> Value {
    loop {
        let f = ws.next().await;
        assert_eq!(f.opcode, 1, "{f:?}");
        let v: Value = serde_json::from_str(&f.text()).expect("JSON");
        if v["reply"] == r {
            return v;
        }
    }
}

#[tokio::test]
async fn broken_frames_are_closed_with_their_codes() {
    let server = start_with(|_| {}).await;
    // Random bytes as a frame: an unknown opcode, reserved bits.
    let mut ws = Raw::connect(server.addr, "/ws", None).await;
    ws.stream
        .write_all(&[0x83, 0x80, 1, 2, 3, 4])
        .await
        .expect("write");
    assert_eq!(skip_to_close(&mut ws).await, 1002);
    let mut ws = Raw::connect(server.addr, "/ws", None).await;
    ws.stream
        .write_all(&[0xF1, 0x80, 1, 2, 3, 4])
        .await
        .expect("write");
    assert_eq!(skip_to_close(&mut ws).await, 1002);
    // Unmasked.
    let mut ws = Raw::connect(server.addr, "/ws", None).await;
    ws.stream
        .write_all(&[0x81, 0x02, b'h', b'i'])
        .await
        .expect("write");
    assert_eq!(skip_to_close(&mut ws).await, 1002);
    // A truncated frame, then the client vanishes.
    let mut ws = Raw::connect(server.addr, "/ws", None).await;
    ws.stream
        .write_all(&[0x81, 0xFE, 0x10])
        .await
        .expect("write");
    drop(ws);
    // Invalid UTF-8 in a text message.
    let mut ws = Raw::connect(server.addr, "/ws", None).await;
    ws.frame(true, false, 1, &[b'{', 0xC3, 0x28, b'}']).await;
    assert_eq!(skip_to_close(&mut ws).await, 1007);
    // A message in fragments that together pass the size limit.
    let mut ws = Raw::connect(server.addr, "/ws", None).await;
    let chunk = vec![b'a'; 16 * 1024];
    ws.frame(false, false, 1, &chunk).await;
    for _ in 0..8 {
        ws.frame(false, false, 0, &chunk).await;
    }
    ws.frame(true, false, 0, &chunk).await;
    assert_eq!(skip_to_close(&mut ws).await, 1009);
    bystander_is_served(&server, "broken frames").await;
    assert!(server.sample("gale_protocol_errors_total").await >= 5.0);
}

async fn skip_to_close(ws: &mut Raw) -> u16 {
    loop {
        let f = ws.next().await;
        if f.opcode == 8 {
            return f.close_code();
        }
    }
}

#[tokio::test]
async fn bad_json_gets_clear_errors_and_the_connection_stays() {
    let server = start_with(|_| {}).await;
    let mut ws = Raw::connect(server.addr, "/ws", None).await;
    let deep = format!(
        "{{\"event\":\"weather.get\",\"data\":{}1{}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    ws.text(&deep).await;
    let f = loop {
        let f = ws.next().await;
        let v: Value = serde_json::from_str(&f.text()).expect("JSON");
        if v["type"] != "connected" {
            break v;
        }
    };
    assert_eq!(f["code"], "invalid_message", "{f}");
    assert!(
        f["message"]
            .as_str()
            .is_some_and(|m| m.contains("nested more than 128")),
        "{f}"
    );
    // Huge numbers and strings where a city goes: refused by field.
    ws.text(r#"{"event":"weather.get","data":{"city":1e999999},"ref":"n"}"#)
        .await;
    let r = reply_or_error(&mut ws, "n").await;
    assert!(
        r["error"]["code"] == "invalid_message" || r["code"] == "invalid_message",
        "{r}"
    );
    ws.text(&event(
        "weather.get",
        json!({"city": "x".repeat(100_000)}),
        1,
    ))
    .await;
    let r = reply(&mut ws, "1").await;
    assert_eq!(r["error"]["code"], "invalid_data", "{r}");
    ws.text(&event(
        "weather.get",
        json!({"city": 12345678901234567890_u64}),
        2,
    ))
    .await;
    let r = reply(&mut ws, "2").await;
    assert_eq!(r["error"]["code"], "invalid_data", "{r}");
    // And it is still served.
    ws.text(&event("server.stats", Value::Null, 3)).await;
    assert_eq!(reply(&mut ws, "3").await["ok"], true);
    bystander_is_served(&server, "bad JSON").await;
}

/// The reply to `r`, or an error with no `ref` (JSON too broken to read
/// one from).
async fn reply_or_error(ws: &mut Raw, r: &str) -> Value {
    loop {
        let f = ws.next().await;
        let v: Value = serde_json::from_str(&f.text()).expect("JSON");
        if v["reply"] == r || v["type"] == "error" {
            return v;
        }
    }
}

#[tokio::test]
async fn ten_thousand_subscribes_and_unknown_events_at_line_rate_are_answered_and_bounded() {
    let server = start_with(|_| {}).await;
    let mut ws = Raw::connect(server.addr, "/ws", None).await;
    let started = Instant::now();
    let (mut ok, mut refused) = (0, 0);
    // In batches, reading each batch's replies: a client that never
    // reads is the slow-consumer case, tested elsewhere.
    for batch in 0..100 {
        for i in 0..100 {
            let n = batch * 100 + i;
            ws.text(&event(
                "topic.subscribe",
                json!({"topic": format!("t{n}")}),
                n,
            ))
            .await;
        }
        for i in 0..100 {
            let r = reply(&mut ws, &(batch * 100 + i).to_string()).await;
            if r["ok"] == true {
                ok += 1;
            } else {
                refused += 1;
            }
        }
    }
    assert_eq!(ok + refused, 10_000, "every subscribe answered");
    let per_conn = gale::config::Config::default()
        .broadcast
        .max_topics_per_connection;
    assert!(ok <= per_conn, "{ok} topics held, the limit is {per_conn}");
    let subscribes = started.elapsed();

    let started = Instant::now();
    for batch in 0..50 {
        for i in 0..100 {
            ws.text(&event("no.such.event", Value::Null, batch * 100 + i))
                .await;
        }
        for i in 0..100 {
            let r = reply(&mut ws, &(batch * 100 + i).to_string()).await;
            assert!(
                r["error"]["code"] == "unknown_event" || r["error"]["code"] == "rate_limited",
                "{r}"
            );
        }
    }
    eprintln!(
        "hostile: 10,000 subscribes in {subscribes:?} ({ok} held), 5,000 unknown events in {:?}",
        started.elapsed()
    );
    bystander_is_served(&server, "a subscribe and unknown-event flood").await;
}

#[tokio::test]
async fn a_ping_flood_from_a_client_that_never_reads_stays_bounded() {
    let server = start_with(|_| {}).await;
    let mut ws = Raw::connect(server.addr, "/ws", None).await;
    // 25 MB of pongs owed: far past what the kernel buffers between the
    // two, so the server's writes block while the flood goes on.
    let payload = [7_u8; 125];
    let flood = tokio::spawn(async move {
        let mut sent = 0;
        for _ in 0..200_000 {
            let write = ws.try_frame(true, false, 9, &payload);
            match tokio::time::timeout(Duration::from_secs(15), write).await {
                Ok(Ok(())) => {}
                // The server stopped reading (TCP pushes back), or dropped
                // a client that does not read.
                Err(_) | Ok(Err(_)) => break,
            }
            sent += 1;
        }
        (ws, sent)
    });
    // The bystander is answered while the flood goes on.
    tokio::time::sleep(Duration::from_millis(200)).await;
    bystander_is_served(&server, "during a ping flood").await;
    let rss_during = rss_kib();
    let (mut ws, sent) = tokio::time::timeout(Duration::from_secs(60), flood)
        .await
        .expect("the flood ends")
        .expect("flood task");
    // Its pongs: at most one per ping, fewer when the queue was full.
    let mut pongs = 0;
    while let Ok(f) = tokio::time::timeout(Duration::from_millis(500), ws.next_any()).await {
        match f {
            Some(f) if f.opcode == 10 => pongs += 1,
            Some(_) => {}
            None => break, // dropped as a client that does not read
        }
    }
    assert!(pongs <= sent, "{pongs} pongs for {sent} pings");
    eprintln!(
        "hostile: {sent} pings sent, {pongs} pongs read; test process RSS {} MiB during",
        rss_during / 1024
    );
    // Server and generator share this process: 25 MB of owed pongs
    // held anywhere would show.
    assert!(rss_during < 200 * 1024, "{rss_during} KiB");
    bystander_is_served(&server, "a ping flood").await;
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn oversized_http_headers_are_refused_and_the_server_stays_up() {
    let server = start_with(|_| {}).await;
    let mut s = TcpStream::connect(server.addr).await.expect("connect");
    let big = "x".repeat(1 << 20);
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Big: {big}\r\n\r\n"
    );
    // The server may stop reading (and close) before all of it is sent.
    let _ = s.write_all(req.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    let head = String::from_utf8_lossy(&answer);
    assert!(
        head.is_empty() || head.starts_with("HTTP/1.1 431"),
        "refused, never upgraded: {head}"
    );
    bystander_is_served(&server, "oversized headers").await;
}

/// What a stalled request's connection ended with: a response status, a
/// close without one, or nothing by `limit`.
async fn ending(mut s: TcpStream, limit: Duration) -> Result<Option<u16>, &'static str> {
    let mut got = Vec::new();
    match tokio::time::timeout(limit, s.read_to_end(&mut got)).await {
        Err(_) => Err("still open"),
        Ok(_) => Ok(String::from_utf8_lossy(&got)
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())),
    }
}

/// POSTs that declare a body and never send it, on an SSE session's
/// route: each is cut at the handshake deadline (408), one address holds
/// no more than its share of connections (the rest are refused at once
/// with 503), and another address is served all along.
#[tokio::test]
async fn stalled_sse_posts_are_cut_at_the_deadline_and_one_address_holds_only_its_share() {
    let server = start_with(|c| {
        c.server.max_connections = 60;
        c.server.handshake_timeout_ms = 1_000;
        c.server.max_connections_per_ip = 5;
    })
    .await;
    let session = common::sse::SseClient::open(server.addr, "")
        .await
        .expect("an SSE session");
    let started = Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..59 {
        let mut s = TcpStream::connect(server.addr).await.expect("connect");
        let head = format!(
            "POST /sse/{} HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\nab",
            session.session
        );
        // A refused connection may be closed before all of it is sent.
        let _ = s.write_all(head.as_bytes()).await;
        stalled.push(tokio::spawn(ending(s, Duration::from_secs(6))));
    }
    // Another address is served while they stall.
    let health = common::http_get_from(server.addr, "127.0.0.2", "/healthz").await;
    assert_eq!(health.map(|h| h.0), Some(200), "another address is served");

    let mut statuses = Vec::new();
    for s in stalled {
        match s.await.expect("join") {
            Ok(status) => statuses.push(status),
            Err(why) => panic!("a stalled POST was {why} after {:?}", started.elapsed()),
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "every stall ended by the deadline: {:?}",
        started.elapsed()
    );
    let timed_out = statuses.iter().filter(|s| **s == Some(408)).count();
    let refused = statuses.iter().filter(|s| **s == Some(503)).count();
    assert!(
        timed_out <= 4,
        "the address holds 5 connections, one of them the session: {statuses:?}"
    );
    assert_eq!(timed_out + refused, 59, "{statuses:?}");
    assert!(
        server
            .sample("gale_http_timeouts_total{stage=\"Body\"}")
            .await
            >= timed_out as f64
    );
    bystander_is_served(&server, "stalled SSE posts").await;
}
