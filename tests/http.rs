//! The front door: a client that stalls before its request is read or its
//! WebSocket is open is closed at `server.handshake_timeout_ms` and
//! counted, so stalled sockets cannot hold every connection permit.

mod common;

use std::time::{Duration, Instant};

use common::{WAIT, start_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DEADLINE_MS: u64 = 500;

async fn server(configure: impl FnOnce(&mut gale::config::Config)) -> common::TestServer {
    start_with(|c| {
        c.server.handshake_timeout_ms = DEADLINE_MS;
        configure(c);
    })
    .await
}

/// Reads until the server closes the socket; returns what it sent and
/// when it closed, measured from `since`.
async fn until_closed(s: &mut TcpStream, since: Instant) -> (String, Duration) {
    let mut got = Vec::new();
    let mut buf = [0_u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return (String::from_utf8_lossy(&got).into(), since.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("still open after {WAIT:?}"),
        }
    }
}

async fn timeouts(server: &common::TestServer, stage: &str) -> f64 {
    server
        .sample(&format!("gale_http_timeouts_total{{stage=\"{stage}\"}}"))
        .await
}

fn near_the_deadline(took: Duration) {
    let d = Duration::from_millis(DEADLINE_MS);
    assert!(
        took >= d - Duration::from_millis(50) && took < d + Duration::from_millis(1_500),
        "closed after {took:?}, deadline {d:?}"
    );
}

#[tokio::test]
async fn stalled_request_heads_are_closed_at_the_deadline_and_counted() {
    let server = server(|_| {}).await;
    let started = Instant::now();
    let mut half = TcpStream::connect(server.addr).await.expect("connect");
    half.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    // One byte every 100 ms: progress, but never a whole head.
    let mut trickle = TcpStream::connect(server.addr).await.expect("connect");
    let (mut trickle_read, mut trickle_write) = trickle.split();
    let dripping = async {
        for b in b"GET /ws HTTP/1.1\r\nX-Slow: ".iter().cycle() {
            if trickle_write.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let closed = async {
        let mut buf = [0_u8; 1024];
        loop {
            match trickle_read.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    };
    let took = tokio::select! {
        t = closed => t,
        () = dripping => panic!("the trickle was never cut"),
        () = tokio::time::sleep(WAIT) => panic!("trickle still open after {WAIT:?}"),
    };
    near_the_deadline(took);
    for s in [&mut half, &mut silent] {
        let (_, took) = until_closed(s, started).await;
        near_the_deadline(took);
    }
    assert_eq!(timeouts(&server, "Head").await, 3.0);
    assert_eq!(server.metric("http-timeouts").await, 3);
}

#[tokio::test]
async fn stalled_sockets_cannot_lock_users_out() {
    let server = server(|c| c.server.max_connections = 2).await;
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(server.addr).await.expect("connect");
        s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Both permits are taken; this user waits in the backlog until the
    // deadline frees one, then is served.
    let started = Instant::now();
    let mut user = tokio::time::timeout(WAIT, server.client())
        .await
        .expect("served once the stalled sockets were closed");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(user.ask("Lima").await["type"], "weather");
}

#[tokio::test]
async fn a_kept_alive_connection_may_not_idle_past_the_deadline() {
    let server = server(|_| {}).await;
    let mut s = TcpStream::connect(server.addr).await.expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0_u8; 1024];
    let n = s.read(&mut buf).await.expect("response");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let answered = Instant::now();
    let (_, took) = until_closed(&mut s, answered).await;
    near_the_deadline(took);
}

#[tokio::test]
async fn a_stalled_publish_body_gets_408() {
    let server = server(|c| c.api.key = Some("publish-key-0123456789".into())).await;
    let mut s = TcpStream::connect(server.addr).await.expect("connect");
    s.write_all(
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer publish-key-0123456789\r\n\
          Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"event\":",
    )
    .await
    .expect("write");
    let started = Instant::now();
    let (response, took) = until_closed(&mut s, started).await;
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    near_the_deadline(took);
    assert_eq!(timeouts(&server, "Body").await, 1.0);
}

#[tokio::test]
async fn a_body_no_route_reads_does_not_hold_the_connection() {
    let server = server(|_| {}).await;
    let mut s = TcpStream::connect(server.addr).await.expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    let (response, took) = until_closed(&mut s, started).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        took < Duration::from_millis(DEADLINE_MS + 1_500),
        "{took:?}"
    );
}

#[tokio::test]
async fn an_http2_preface_is_refused() {
    let server = server(|_| {}).await;
    let mut s = TcpStream::connect(server.addr).await.expect("connect");
    // HTTP/2 with prior knowledge: the connection preface, then a SETTINGS
    // frame. gale serves HTTP/1.1 only (no header-read limits exist for
    // HTTP/2 streams here).
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("write");
    let started = Instant::now();
    let (got, took) = until_closed(&mut s, started).await;
    assert!(
        took < Duration::from_millis(DEADLINE_MS),
        "refused at once: {took:?}"
    );
    assert!(!got.contains("HTTP/2"), "nothing served: {got:?}");
}

#[tokio::test]
async fn a_burst_of_connects_finds_room_in_the_listen_backlog() {
    // 1,500 clients connect at once to a listener nobody accepts from: the
    // kernel completes each handshake only while the backlog has room.
    // With tokio's default of 1,024, a burst past it has its SYNs dropped
    // and waits a second for the retransmit (the seed's scenario saw this
    // as 1 % of replies a second late).
    let listener = gale::server::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..1_500 {
        tasks.spawn(async move {
            tokio::time::timeout(Duration::from_millis(700), TcpStream::connect(addr))
                .await
                .map(|c| c.map(|_s| ()))
        });
    }
    let mut connected = 0;
    while let Some(r) = tasks.join_next().await {
        if matches!(r, Ok(Ok(Ok(())))) {
            connected += 1;
        }
    }
    drop(listener);
    assert_eq!(connected, 1_500, "handshakes completed without an accept");
}
