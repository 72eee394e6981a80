//! TLS served directly (`server.tls_cert` / `server.tls_key`): a real
//! rustls client speaks `wss://` and `https://` to the real server, which
//! trusts the self-signed certificate in tests/keys as its root.

mod common;

use std::time::Duration;

use common::{key_file, start_with, wss_next};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;

async fn tls_server() -> common::TestServer {
    tls_server_with(|_| {}).await
}

/// A server on gale's own TLS (the test key pair), with `more` settings.
async fn tls_server_with(more: impl FnOnce(&mut gale::config::Config)) -> common::TestServer {
    start_with(|c| {
        c.server.tls_cert = Some(key_file("tls-cert.pem"));
        c.server.tls_key = Some(key_file("tls-key.pem"));
        more(c);
    })
    .await
}

async fn tls_connect(server: &common::TestServer, name: &str) -> TlsStream<TcpStream> {
    common::tls_connect(server.addr, name, rustls::DEFAULT_VERSIONS).await
}

/// TLS 1.3 and TLS 1.2, each offered alone: gale runs both versions'
/// records itself after the handshake.
const EACH_VERSION: [&[&rustls::SupportedProtocolVersion]; 2] =
    [&[&rustls::version::TLS13], &[&rustls::version::TLS12]];

#[tokio::test]
async fn wss_serves_weather_events_and_many_frames_at_once() {
    let server = tls_server().await;
    for versions in EACH_VERSION {
        wss_serves_weather_events_and_many_frames_over(&server, versions).await;
    }
}

async fn wss_serves_weather_events_and_many_frames_over(
    server: &common::TestServer,
    versions: &[&'static rustls::SupportedProtocolVersion],
) {
    let mut ws = common::wss_connect(server.addr, versions).await;
    let hello = wss_next(&mut ws).await;
    assert!(hello["client_id"].is_string(), "{hello}");
    ws.send(Message::text("Oslo")).await.expect("send");
    let reply = wss_next(&mut ws).await;
    assert_eq!(reply["type"], "weather", "{reply}");
    assert_eq!(reply["city"], "Oslo");

    // Many requests at once: replies queue and go out many frames to a
    // write, through rustls.
    for i in 0..300 {
        let msg = json!({"event": "weather.get", "data": {"city": format!("Tls{}", i % 7)}, "ref": i.to_string()});
        ws.feed(Message::text(msg.to_string())).await.expect("feed");
    }
    ws.flush().await.expect("flush");
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 300 {
        let v = wss_next(&mut ws).await;
        if let Some(r) = v["reply"].as_str() {
            assert_eq!(v["ok"], true, "{v}");
            seen.insert(r.to_owned());
        }
    }
    // A large message both ways (past the TLS record size of 16 KiB).
    let big = "x".repeat(40_000);
    ws.send(Message::text(big)).await.expect("send");
    let reply = wss_next(&mut ws).await;
    assert_eq!(reply["type"], "error", "a 40 KB city is refused: {reply}");
    ws.close(None).await.expect("close");
}

#[tokio::test]
async fn https_answers_and_a_plain_client_is_refused_without_harm() {
    let server = tls_server().await;
    let mut tls = tls_connect(&server, "127.0.0.1").await;
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut body = String::new();
    tls.read_to_string(&mut body).await.expect("read");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        None,
        "no ALPN asked, none chosen"
    );

    // Plain HTTP to the TLS port: not TLS, closed, counted.
    let before = server.sample("gale_tls_handshake_failures_total").await;
    let mut plain = TcpStream::connect(server.addr).await.expect("connect");
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while server.sample("gale_tls_handshake_failures_total").await <= before {
        assert!(tokio::time::Instant::now() < deadline, "failure counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A client that starts a handshake and stalls is closed at the
    // handshake deadline.
    let mut stalled = TcpStream::connect(server.addr).await.expect("connect");
    stalled.write_all(&[0x16, 0x03, 0x01]).await.expect("write");
    // Still serving meanwhile.
    let mut again = tls_connect(&server, "localhost").await;
    again
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut body = String::new();
    again.read_to_string(&mut body).await.expect("read");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    drop(stalled);
}

#[tokio::test]
async fn a_tls_handshake_that_stalls_is_closed_at_the_deadline() {
    let server = tls_server_with(|c| {
        c.server.handshake_timeout_ms = 300;
    })
    .await;
    let mut stalled = TcpStream::connect(server.addr).await.expect("connect");
    // The start of a ClientHello record, and nothing more.
    stalled.write_all(&[0x16, 0x03, 0x01]).await.expect("write");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf))
        .await
        .expect("closed by the server in time");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_eq!(
        server
            .sample("gale_http_timeouts_total{stage=\"Tls\"}")
            .await,
        1.0
    );
}

#[test]
fn unusable_tls_files_are_refused_by_name() {
    let missing = gale::tls::acceptor("/no/such/cert.pem", &key_file("tls-key.pem"))
        .expect_err("missing file");
    assert!(missing.to_string().contains("server.tls_cert"), "{missing}");
    let not_a_cert = gale::tls::acceptor(&key_file("tls-key.pem"), &key_file("tls-key.pem"))
        .expect_err("a key is not a certificate");
    assert!(
        not_a_cert.to_string().contains("server.tls_cert"),
        "{not_a_cert}"
    );
    let wrong_key = gale::tls::acceptor(&key_file("tls-cert.pem"), &key_file("rsa-private.pem"))
        .expect_err("another key");
    assert!(
        wrong_key.to_string().contains("server.tls_key"),
        "{wrong_key}"
    );
    assert!(gale::tls::acceptor(&key_file("tls-cert.pem"), &key_file("tls-key.pem")).is_ok());
}

#[tokio::test]
async fn gale_client_speaks_wss_trusting_the_system_roots_or_ssl_cert_file() {
    let server = tls_server().await;
    let url = format!("wss://localhost:{}/ws", server.addr.port());
    let run = |url: String, trust: bool| {
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_gale"));
            cmd.args(["client", &url, "--send", "Paris"]);
            if trust {
                cmd.env("SSL_CERT_FILE", key_file("tls-cert.pem"));
            }
            cmd.output().expect("gale client")
        })
    };
    let out = run(url.clone(), true).await.expect("join");
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(r#""city":"Paris""#),
        "{out:?}"
    );
    // Not trusted: refused, and says why.
    let out = run(url, false).await.expect("join");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("certificate"), "{err}");
}

#[tokio::test]
async fn gale_bench_loads_a_wss_server() {
    let server = tls_server().await;
    let url = format!("wss://localhost:{}/ws", server.addr.port());
    let report = bench_json(&["requests", &url, "-n", "3", "-d", "1"]).await;
    assert!(report["replies"].as_u64().unwrap_or(0) > 0, "{report}");
    assert_eq!(report["connect_failed"], 0, "{report}");
    assert!(
        report["errors"].as_object().is_some_and(|e| e.is_empty()),
        "{report}"
    );
}

#[tokio::test]
async fn gale_bench_loads_a_wss_server_over_tls12() {
    let server = tls_server().await;
    let url = format!("wss://localhost:{}/ws", server.addr.port());
    let handshakes = |version: &'static str| {
        let server = &server;
        async move {
            let name = format!("gale_tls_handshakes_total{{version=\"{version}\"}}");
            server.sample(&name).await
        }
    };
    for procs in ["1", "2"] {
        let (tls12, tls13) = (handshakes("1.2").await, handshakes("1.3").await);
        let args = [
            "connections",
            &url,
            "-n",
            "4",
            "--hold",
            "0",
            "--procs",
            procs,
            "--tls12",
        ];
        let report = bench_json(&args).await;
        assert_eq!(report["connected"], 4, "{report}");
        assert_eq!(report["connect_failed"], 0, "{report}");
        // Every connection was TLS 1.2 (the bench's and the test's own
        // reads of /metrics may add a few of either).
        assert!(handshakes("1.2").await - tls12 >= 4.0, "{procs} processes");
        assert!(handshakes("1.3").await - tls13 < 4.0, "{procs} processes");
    }
}

/// `gale bench connections --sse` against a `wss://` target holds SSE
/// sessions over HTTPS, on both versions.
#[tokio::test]
async fn gale_bench_holds_sse_sessions_over_tls() {
    let server = tls_server().await;
    let url = format!("wss://localhost:{}/ws", server.addr.port());
    for tls12 in [false, true] {
        let mut args = vec!["connections", &url, "-n", "4", "--hold", "0", "--sse"];
        if tls12 {
            args.push("--tls12");
        }
        let report = bench_json(&args).await;
        assert_eq!(report["connected"], 4, "{report}");
        assert_eq!(report["connect_failed"], 0, "{report}");
    }
}

/// POSTs `body` to `/api/publish` over TLS; the response, whole.
async fn https_publish(server: &common::TestServer, body: &str) -> String {
    common::https_publish_at(server.addr, common::API_KEY_LONG, body).await
}

/// Pushes queued together go out encrypted together, one larger than a
/// write encrypts at once (64 KiB) among them; every one arrives whole
/// and in order, and the close is clean both ways.
#[tokio::test]
async fn many_pushes_and_a_large_one_arrive_whole_over_wss() {
    let server = tls_server_with(|c| {
        c.api.key = Some(common::API_KEY_LONG.into());
        c.topics
            .insert("big:*".into(), gale::config::TopicConfig::history(10, 60));
    })
    .await;
    for versions in EACH_VERSION {
        many_pushes_and_a_large_one_arrive_whole_over(&server, versions).await;
    }
}

async fn many_pushes_and_a_large_one_arrive_whole_over(
    server: &common::TestServer,
    versions: &[&'static rustls::SupportedProtocolVersion],
) {
    let mut ws = common::wss_connect(server.addr, versions).await;
    wss_next(&mut ws).await;
    let sub = json!({"event": "topic.subscribe", "data": {"topic": "big:one"}, "ref": "s"});
    ws.send(Message::text(sub.to_string())).await.expect("send");
    let reply = wss_next(&mut ws).await;
    assert_eq!(reply["ok"], true, "{reply}");

    for i in 0..50 {
        let body = json!({"topic": "big:one", "event": "small", "data": i}).to_string();
        let answer = https_publish(server, &body).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let big = "y".repeat(300_000);
    let body = json!({"topic": "big:one", "event": "big", "data": big}).to_string();
    assert!(
        https_publish(server, &body)
            .await
            .starts_with("HTTP/1.1 200")
    );
    for i in 0..50 {
        let v = wss_next(&mut ws).await;
        assert_eq!(v["event"], "small", "{v}");
        assert_eq!(v["data"], i, "in order: {v}");
    }
    let v = wss_next(&mut ws).await;
    assert_eq!(v["event"], "big");
    assert_eq!(v["data"].as_str().map(str::len), Some(300_000), "whole");

    ws.close(None).await.expect("close");
    let end = tokio::time::timeout(common::WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | None => return true,
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("the close was not clean: {e}"),
            }
        }
    })
    .await
    .expect("closed in time");
    assert!(end);
}

/// Pushes into an idle `wss://` connection are sealed and written by
/// whoever publishes (its task is not woken), as on plain TCP. One the
/// socket does not take whole leaves records behind: they go out first,
/// whole, with nothing after them to carry them out; one past 64 KiB is
/// queued for the connection's task; and the next push follows them. A TLS 1.3 key update the client asks for meanwhile is
/// answered before the next record, whoever seals it.
#[tokio::test]
async fn pushes_are_sealed_by_the_publisher_into_idle_wss_sockets() {
    let server = tls_server_with(|c| {
        c.server.send_buffer_bytes = 4096;
        c.api.key = Some(common::API_KEY_LONG.into());
        c.topics
            .insert("direct:*".into(), gale::config::TopicConfig::default());
    })
    .await;
    for versions in EACH_VERSION {
        let mut ws = common::wss_connect_small(server.addr, versions, 4096).await;
        wss_next(&mut ws).await;
        let sub = json!({"event": "topic.subscribe", "data": {"topic": "direct:a"}, "ref": "s"});
        ws.send(Message::text(sub.to_string())).await.expect("send");
        assert_eq!(wss_next(&mut ws).await["ok"], true);
        let publish = |event: &'static str, data: Value| {
            let body = json!({"topic": "direct:a", "event": event, "data": data}).to_string();
            let server = &server;
            async move {
                let answer = https_publish(server, &body).await;
                assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            }
        };

        let direct = server.sample("gale_outbound_direct_total").await;
        for i in 0..20 {
            publish("small", json!(i)).await;
            assert_eq!(wss_next(&mut ws).await["data"], i);
        }
        let written = server.sample("gale_outbound_direct_total").await - direct;
        assert!(written >= 20.0, "written by the publisher: {written}");

        if versions[0].version == rustls::ProtocolVersion::TLSv1_3 {
            // Answered by the next record sealed, the publisher's.
            ws.get_mut()
                .get_mut()
                .1
                .refresh_traffic_keys()
                .expect("key update");
            ws.flush().await.expect("flush");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // More than the two socket buffers hold, and still sealed by the
        // publisher: most of its records are left for the connection's
        // task, and nothing follows them.
        let direct = server.sample("gale_outbound_direct_total").await;
        publish("big", json!("z".repeat(50_000))).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let written = server.sample("gale_outbound_direct_total").await - direct;
        assert_eq!(written, 1.0, "begun by the publisher");
        let v = wss_next(&mut ws).await;
        assert_eq!(v["event"], "big", "{v}");
        assert_eq!(v["data"].as_str().map(str::len), Some(50_000), "whole");
        // Past what a publisher seals (64 KiB): queued for the task.
        publish("larger", json!("z".repeat(400_000))).await;
        publish("after", json!(1)).await;
        let v = wss_next(&mut ws).await;
        assert_eq!(v["data"].as_str().map(str::len), Some(400_000), "whole");
        assert_eq!(wss_next(&mut ws).await["event"], "after");
    }
}

/// A TLS 1.3 client that asks for a key update on an idle `wss://`
/// connection (its stream lent to its outbox, nothing pushed) gets the
/// server's answer at once, not with the next push or ping.
#[tokio::test]
async fn an_idle_wss_connection_answers_a_key_update_at_once() {
    let server = tls_server_with(|c| {
        c.server.ping_interval_s = 600;
    })
    .await;
    let addr = server.addr;
    let answered = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let config = std::sync::Arc::new(common::tls_client_config(&[&rustls::version::TLS13]));
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let conn = rustls::ClientConnection::new(config, name).expect("client");
        let tcp = std::net::TcpStream::connect(addr).expect("connect");
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(
            b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .expect("upgrade");
        // The 101, then the greeting (a text frame of its own length).
        let mut got = Vec::new();
        let mut buf = [0; 4096];
        while !got.windows(9).any(|w| w == b"connected") {
            let n = tls.read(&mut buf).expect("read");
            assert!(n > 0, "closed");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 101"));
        // Idle: the stream is lent by now.
        std::thread::sleep(std::time::Duration::from_millis(300));
        tls.conn.refresh_traffic_keys().expect("key update");
        tls.flush().expect("flush");
        // The answer is a record on the wire: read raw, under TLS.
        tls.sock
            .set_read_timeout(Some(std::time::Duration::from_secs(3)))
            .expect("timeout");
        let mut raw = [0; 64];
        tls.sock.read(&mut raw).map(|n| n > 0).unwrap_or(false)
    })
    .await
    .expect("client");
    assert!(answered, "the key update was answered within 3 s");
}

/// `gale bench broadcast` against a TLS server publishes over HTTPS and
/// counts every delivery.
#[tokio::test]
async fn gale_bench_broadcasts_to_a_wss_server() {
    let server = tls_server_with(|c| {
        c.api.key = Some(common::API_KEY_LONG.into());
        c.topics
            .insert("bench".into(), gale::config::TopicConfig::default());
    })
    .await;
    let url = format!("wss://localhost:{}/ws", server.addr.port());
    let report = bench_json(&[
        "broadcast",
        &url,
        "-n",
        "20",
        "-m",
        "10",
        "--rate",
        "0",
        "--api-key",
        common::API_KEY_LONG,
    ])
    .await;
    assert_eq!(report["published"], 10, "{report}");
    assert_eq!(report["missed deliveries"], 0, "{report}");
}

/// Runs `gale bench ARGS --json` trusting the test certificate; its
/// report, once it succeeded.
async fn bench_json(args: &[&str]) -> Value {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_gale"))
            .arg("bench")
            .args(&args)
            .arg("--json")
            .env("SSL_CERT_FILE", key_file("tls-cert.pem"))
            .output()
            .expect("gale bench")
    })
    .await
    .expect("join");
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("json report")
}
