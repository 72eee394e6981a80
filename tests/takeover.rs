//! `gale serve --takeover`, end to end: two real processes of the
//! binary, several hundred live WebSocket connections (subscribed to
//! topics with history, some compressed, some not reading so frames
//! queue in the server, some with requests in flight) handed from the
//! old process to the new one while publications go on every 10 ms. No
//! client may see a close, a gap, a duplicate or a lost reply.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::raw::Raw;
use common::{publish_at, wss_next};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const KEY: &str = "takeover-test-api-key-0123456789";
const TOPICS: usize = 3;

/// A `gale serve` process; killed when dropped.
struct Gale {
    child: Child,
    /// Its log lines, as they come.
    log: mpsc::UnboundedReceiver<String>,
}

impl Drop for Gale {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gale {
    fn start(dir: &std::path::Path, takeover: bool) -> Gale {
        Gale::start_with(dir, if takeover { &["--takeover"] } else { &[] })
    }

    fn start_with(dir: &std::path::Path, args: &[&str]) -> Gale {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gale"));
        cmd.arg("serve")
            .arg("--config")
            .arg(dir.join("gale.toml"))
            .args(args);
        let mut child = cmd
            .current_dir(dir)
            .env(
                "RUST_LOG",
                "warn,gale_engine::server=info,gale_engine::handoff=info",
            )
            .env("NO_COLOR", "1")
            .env(
                "GALE_STORE__URL",
                format!("sqlite://{}/gale.db", dir.display()),
            )
            .env("GALE_STORE__SPILL_DIR", dir.join("spill"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start gale");
        let err = child.stderr.take().expect("stderr");
        let (tx, log) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Gale { child, log }
    }

    /// Waits for it to exit, and asserts that it exited cleanly.
    async fn exits_cleanly(mut self) {
        let status = tokio::task::spawn_blocking(move || {
            let status = self.child.wait().expect("wait");
            (status, self)
        })
        .await
        .expect("join")
        .0;
        assert!(status.success(), "exited {status:?}");
    }

    /// Waits until it listens; its address.
    async fn listening(&mut self) -> SocketAddr {
        let line = self.wait_for("WebSocket at ").await;
        let port: u16 = line
            .rsplit("://127.0.0.1:")
            .next()
            .and_then(|r| r.split('/').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("a port in {line:?}"));
        ([127, 0, 0, 1], port).into()
    }

    /// Waits for a log line containing `needle`; returns it.
    async fn wait_for(&mut self, needle: &str) -> String {
        let seek = async {
            while let Some(line) = self.log.recv().await {
                if line.contains(needle) {
                    return line;
                }
            }
            panic!("gale exited before logging {needle:?}");
        };
        tokio::time::timeout(Duration::from_secs(60), seek)
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} in time"))
    }
}

fn config(dir: &std::path::Path) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
handoff_socket = "{}/handoff.sock"
# Small kernel buffers: a client that stops reading leaves frames queued
# in the server, which the takeover must carry.
send_buffer_bytes = 4096

[api]
key = "{KEY}"

[topics."news:*"]
subscribe = "anyone"
presence = true
history_size = 10000
history_ttl_s = 600
"#,
        dir.display()
    )
}

/// What one client saw.
#[derive(Debug, Default)]
struct Seen {
    topic: String,
    offsets: Vec<u64>,
    epochs: Vec<String>,
    replies: u64,
    asked: u64,
    closed: Option<String>,
}

/// Reads a client's frames until told to stop and nothing more arrives;
/// records offsets, replies and any close.
async fn read_all(
    mut raw: Raw,
    topic: String,
    ask: bool,
    pause: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Seen {
    let mut seen = Seen {
        topic,
        ..Seen::default()
    };
    let mut next_ref = 0u64;
    let mut waiting = false;
    let mut idle_after_stop = 0;
    loop {
        // A client that stops reading: the server queues for it.
        while pause.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if ask && !waiting && !stop.load(Ordering::Relaxed) {
            next_ref += 1;
            let req = json!({"event": "topic.presence", "data": {"topic": seen.topic}, "ref": format!("q{next_ref}")});
            if raw
                .try_frame(true, false, 1, req.to_string().as_bytes())
                .await
                .is_err()
            {
                seen.closed = Some("write failed".into());
                return seen;
            }
            seen.asked += 1;
            waiting = true;
        }
        // After the stop, a long wait: the last publication may still be
        // on its way.
        let stopped = stop.load(Ordering::Relaxed);
        let wait = if stopped {
            Duration::from_secs(2)
        } else {
            Duration::from_millis(200)
        };
        let frame = match tokio::time::timeout(wait, raw.next_any()).await {
            Err(_) if stopped => {
                idle_after_stop += 1;
                if !waiting || idle_after_stop > 10 {
                    return seen;
                }
                continue;
            }
            Err(_) => continue,
            Ok(None) => {
                seen.closed = Some("TCP closed".into());
                return seen;
            }
            Ok(Some(f)) => f,
        };
        match frame.opcode {
            1 => {
                let v: Value = serde_json::from_str(&frame.text()).expect("JSON");
                if let Some(offset) = v["offset"].as_u64() {
                    seen.offsets.push(offset);
                    seen.epochs
                        .push(v["epoch"].as_str().unwrap_or("").to_owned());
                } else if v["reply"].is_string() {
                    assert_eq!(v["ok"], true, "{v}");
                    assert_eq!(v["reply"], format!("q{next_ref}"), "replies in order, once");
                    seen.replies += 1;
                    waiting = false;
                }
            }
            8 => {
                seen.closed = Some(format!("close frame {:?}", frame.payload));
                return seen;
            }
            9 | 10 => {}
            other => panic!("unexpected opcode {other}"),
        }
    }
}

async fn subscribe(raw: &mut Raw, topic: &str) {
    // The greeting first.
    let hello = raw.next().await;
    assert!(hello.text().contains("connected"), "{}", hello.text());
    let req = json!({"event": "topic.subscribe", "data": {"topic": topic}, "ref": "s"});
    raw.text(&req.to_string()).await;
    let reply = raw.next().await;
    let v: Value = serde_json::from_str(&reply.text()).expect("JSON");
    assert_eq!(v["reply"], "s", "{v}");
    assert_eq!(v["ok"], true, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_hands_every_live_connection_over_without_a_close_a_gap_or_a_duplicate() {
    const CLIENTS: usize = 300;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("gale.toml"), config(dir.path())).expect("config");
    let mut old = Gale::start(dir.path(), false);
    let addr = old.listening().await;

    // The clients: a third compressed, a tenth not reading during the
    // takeover, a tenth asking all along.
    let pause = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for i in 0..CLIENTS {
        let topic = format!("news:t{}", i % TOPICS);
        let slow = i % 10 == 3;
        let mut raw = if slow {
            Raw::connect_small(addr, "/ws", 4096).await
        } else if i % 3 == 0 {
            Raw::connect(addr, "/ws", Some("permessage-deflate")).await
        } else {
            Raw::connect(addr, "/ws", None).await
        };
        if i % 3 == 0 && !slow {
            assert!(raw.extensions.is_some(), "compression agreed");
        }
        subscribe(&mut raw, &topic).await;
        let pause = if slow {
            pause.clone()
        } else {
            Arc::new(AtomicBool::new(false))
        };
        readers.push(tokio::spawn(read_all(
            raw,
            topic,
            i % 10 == 7,
            pause,
            stop.clone(),
        )));
    }

    // Publications every 10 ms, round the topics, each 2,000 bytes.
    let published: Arc<Vec<AtomicU64>> = Arc::new((0..TOPICS).map(|_| AtomicU64::new(0)).collect());
    let publishing = Arc::new(AtomicBool::new(true));
    let publisher = {
        let (published, publishing) = (published.clone(), publishing.clone());
        tokio::spawn(async move {
            let pad = "x".repeat(2_000);
            let mut k = 0usize;
            while publishing.load(Ordering::Relaxed) {
                let t = k % TOPICS;
                let body = json!({"topic": format!("news:t{t}"), "event": "tick", "data": {"k": k, "pad": pad}});
                let (status, _) = publish_at(addr, Some(KEY), &body.to_string()).await;
                if status == 200 {
                    published[t].fetch_add(1, Ordering::Relaxed);
                }
                k += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The slow clients stop reading. At ~33 pushes/s of 2 KB each, 1.5 s
    // is some 100 KB for each: far past what its two kernel buffers
    // (4 KB asked, about 10 KB of data between them) hold, so frames wait
    // in the server when the new process takes over.
    pause.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let mut new = Gale::start(dir.path(), true);
    let sent = old
        .wait_for("every connection sent to the new process")
        .await;
    old.exits_cleanly().await;
    new.wait_for("connections taken over").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    pause.store(false, Ordering::Relaxed);

    // The new process serves on: more publications, a new client.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut fresh = Raw::connect(addr, "/ws", None).await;
    subscribe(&mut fresh, "news:t0").await;
    publishing.store(false, Ordering::Relaxed);
    publisher.await.expect("publisher");
    stop.store(true, Ordering::Relaxed);

    let totals: Vec<u64> = published
        .iter()
        .map(|p| p.load(Ordering::Relaxed))
        .collect();
    let mut by_topic: HashMap<String, u64> = HashMap::new();
    for (t, n) in totals.iter().enumerate() {
        by_topic.insert(format!("news:t{t}"), *n);
    }
    let mut replies = 0;
    for (i, r) in readers.into_iter().enumerate() {
        let seen = r.await.expect("reader");
        assert_eq!(seen.closed, None, "client {i} saw its connection end");
        let want = by_topic[&seen.topic];
        // Every accepted publication once, in order, from the first one
        // after the subscription: contiguous offsets, one epoch.
        let first = *seen.offsets.first().expect("pushes");
        let expected: Vec<u64> = (first..=want).collect();
        assert_eq!(
            seen.offsets, expected,
            "client {i} on {}: offsets without gap or duplicate",
            seen.topic
        );
        assert!(
            seen.epochs.windows(2).all(|w| w[0] == w[1]),
            "client {i}: one epoch throughout"
        );
        assert_eq!(
            seen.replies, seen.asked,
            "client {i}: every request answered once"
        );
        replies += seen.replies;
    }
    assert!(replies > 0, "requests were asked across the takeover");

    // The old process carried queued frames over, not only idle sockets.
    let queued: u64 = sent
        .split("queued_bytes=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("queued bytes in {sent:?}"));
    assert!(queued > 0, "frames were queued at the takeover: {sent}");
    assert!(sent.contains(&format!("handed={CLIENTS}")), "{sent}");
    drop(new);
}

#[tokio::test]
async fn an_incompatible_successor_is_refused_and_the_old_process_serves_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, addr, mut client) = serving_one_client(dir.path()).await;

    // A successor speaking another handoff format, over the real socket.
    let path = dir.path().join("handoff.sock");
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect");
        let hello = json!({"kind": "hello", "format": 999, "version": "9.9.9", "pid": 1});
        send_head(&mut s, &hello);
        recv_head(&mut s).to_string()
    })
    .await
    .expect("join");
    let v: Value = serde_json::from_str(&answer).expect("JSON");
    assert_eq!(v["kind"], "refuse", "{v}");
    assert!(
        v["reason"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("format {}", gale_engine::handoff::FORMAT)),
        "the refusal says why: {v}"
    );

    // The old process serves on: its client gets a publication.
    published_and_seen(addr, &mut client, "news:x", "still").await;

    // And a successor of the same format still can take over after.
    let mut new = Gale::start(dir.path(), true);
    new.wait_for("connections taken over").await;
    old.exits_cleanly().await;
    let push = published_and_seen(addr, &mut client, "news:x", "moved").await;
    assert_eq!(push["offset"], 2, "offsets go on: {push}");
}

/// Sends one handoff message with `head` and no tail or descriptors
/// (the wire: a 9-byte prefix, the head, the tail).
fn send_head(s: &mut std::os::unix::net::UnixStream, head: &Value) {
    use std::io::Write;
    let head = head.to_string();
    let mut msg = Vec::new();
    msg.extend_from_slice(&(head.len() as u32).to_le_bytes());
    msg.extend_from_slice(&0u32.to_le_bytes());
    msg.push(0);
    msg.extend_from_slice(head.as_bytes());
    s.write_all(&msg).expect("write");
}

/// Receives one handoff message's head; its tail is read and dropped,
/// and its descriptors, read with no room for them, are closed.
fn recv_head(s: &mut std::os::unix::net::UnixStream) -> Value {
    use std::io::Read;
    let mut prefix = [0u8; 9];
    s.read_exact(&mut prefix).expect("prefix");
    let len = |at: usize| {
        u32::from_le_bytes([prefix[at], prefix[at + 1], prefix[at + 2], prefix[at + 3]]) as usize
    };
    let mut head = vec![0; len(0)];
    s.read_exact(&mut head).expect("head");
    let mut tail = vec![0; len(4)];
    s.read_exact(&mut tail).expect("tail");
    serde_json::from_slice(&head).expect("a JSON head")
}

/// A successor of the same format that does not say it takes SSE
/// sessions over TLS (a binary from before they moved) is handed none:
/// each is closed as a drain closes it, told when to come back, rather
/// than handed to a process that would drop it.
#[tokio::test]
async fn a_successor_that_does_not_take_sse_over_tls_gets_none() {
    use common::sse::SseClient;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("gale.toml"), tls_config(dir.path())).expect("config");
    let mut old = Gale::start(dir.path(), false);
    let addr = old.listening().await;
    let mut session = SseClient::open_tls(addr, "", &[&rustls::version::TLS13])
        .await
        .expect("open");

    let path = dir.path().join("handoff.sock");
    let successor = tokio::task::spawn_blocking(move || {
        let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect");
        let hello = json!({
            "kind": "hello",
            "format": gale_engine::handoff::FORMAT,
            "version": "0.0.1",
            "pid": 1,
        });
        send_head(&mut s, &hello);
        let mut conns = 0;
        loop {
            let head = recv_head(&mut s);
            match head["kind"].as_str() {
                Some("accept" | "listeners" | "history") => {}
                Some("conn") => conns += 1,
                Some("done") => break,
                other => panic!("unexpected {other:?}: {head}"),
            }
        }
        send_head(&mut s, &json!({"kind": "ack", "taken": conns}));
        conns
    });
    let (event, data) = session.next_message().await.expect("a last message");
    assert_eq!(event, "close", "{data}");
    let close: Value = serde_json::from_str(&data).expect("JSON");
    assert_eq!(close["code"], 1012, "{close}");
    assert!(
        close["reason"]
            .as_str()
            .is_some_and(|r| r.contains("reconnect_ms")),
        "{close}"
    );
    assert_eq!(successor.await.expect("successor"), 0, "nothing handed");
    old.exits_cleanly().await;
}

/// A connection the application ends while a takeover waits for its
/// events (here the backend answers a forwarded event with a disconnect)
/// does not move: it closes with the application's code and reason, not
/// the 1012 of a connection that could not move, on WebSocket and SSE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_application_ends_during_a_takeover_closes_with_its_code() {
    use common::backend::{Backend, Reply};
    use common::sse::SseClient;
    let backend = Backend::start().await;
    let bye = json!({"disconnect": {"code": 4001, "reason": "bye"}});
    backend.set(
        "rpc",
        Reply::Slow(Duration::from_millis(1500), Box::new(Reply::Json(bye))),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        "{}\n[proxy]\nrpc_url = \"{}\"\nrpc_events = [\"orders.*\"]\ntimeout_ms = 5000\n",
        config(dir.path()),
        backend.url("rpc")
    );
    std::fs::write(dir.path().join("gale.toml"), toml).expect("config");
    let mut old = Gale::start(dir.path(), false);
    let addr = old.listening().await;
    let mut ws = Raw::connect(addr, "/ws", None).await;
    subscribe(&mut ws, "news:x").await;
    let mut sse = SseClient::open(addr, "").await.expect("open");
    let ask = json!({"event": "orders.cancel", "data": {}, "ref": "o"}).to_string();
    ws.text(&ask).await;
    assert_eq!(sse.send(&ask).await, 202);
    backend.wait_calls("rpc", |calls| calls.len() == 2).await;

    let mut new = Gale::start(dir.path(), true);
    let close = loop {
        let frame = ws.next().await;
        if frame.opcode == 8 {
            break frame;
        }
    };
    assert_eq!(close.close_code(), 4001, "{close:?}");
    assert_eq!(&close.payload[2..], b"bye");
    let last = loop {
        let (event, data) = sse.next_message().await.expect("a last message");
        if event == "close" {
            break data;
        }
    };
    let last: Value = serde_json::from_str(&last).expect("JSON");
    assert_eq!(last["code"], 4001, "{last}");
    assert_eq!(last["reason"], "bye", "{last}");
    new.wait_for("connections taken over").await;
    old.exits_cleanly().await;
}

/// A gale started in `dir` with one client subscribed to `news:x`.
async fn serving_one_client(dir: &std::path::Path) -> (Gale, SocketAddr, Raw) {
    std::fs::write(dir.join("gale.toml"), config(dir)).expect("config");
    let mut old = Gale::start(dir, false);
    let addr = old.listening().await;
    let mut client = Raw::connect(addr, "/ws", None).await;
    subscribe(&mut client, "news:x").await;
    (old, addr, client)
}

/// A new process that could not start (here, its TLS certificate is
/// missing) refuses before asking: nothing moves and the old process
/// serves on.
#[tokio::test]
async fn a_successor_that_could_not_start_takes_nothing_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, addr, mut client) = serving_one_client(dir.path()).await;

    let out = Command::new(env!("CARGO_BIN_EXE_gale"))
        .arg("serve")
        .arg("--config")
        .arg(dir.path().join("gale.toml"))
        .arg("--takeover")
        .current_dir(dir.path())
        .env("GALE_SERVER__TLS_CERT", dir.path().join("missing-cert.pem"))
        .env("GALE_SERVER__TLS_KEY", dir.path().join("missing-key.pem"))
        .output()
        .expect("run gale");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("server.tls_cert"), "says which setting: {err}");
    assert!(err.contains("nothing was taken over"), "{err}");

    // The old process still serves its client, on the same socket.
    published_and_seen(addr, &mut client, "news:x", "still").await;
    drop(old);
}

#[tokio::test]
async fn takeover_without_a_running_server_says_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("gale.toml"), config(dir.path())).expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_gale"))
        .args(["serve", "--takeover", "--config"])
        .arg(dir.path().join("gale.toml"))
        .current_dir(dir.path())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no running gale to take over"), "{err}");

    let empty = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_gale"))
        .args(["serve", "--takeover"])
        .current_dir(empty.path())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--takeover needs server.handoff_socket"),
        "{err}"
    );
}

#[tokio::test]
async fn takeover_if_running_starts_alone_and_takes_over_when_one_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("gale.toml"), config(dir.path())).expect("config");
    // Nothing runs: it starts as usual.
    let mut first = Gale::start_with(dir.path(), &["--takeover-if-running"]);
    let addr = first.listening().await;
    let mut client = Raw::connect(addr, "/ws", None).await;
    subscribe(&mut client, "news:y").await;
    // The same command again takes over from it.
    let mut second = Gale::start_with(dir.path(), &["--takeover-if-running"]);
    second.wait_for("connections taken over").await;
    first.exits_cleanly().await;
    published_and_seen(addr, &mut client, "news:y", "after").await;
}

/// In cluster mode the node's presence and Redis subscriptions move with
/// its connections: another node never sees the user go offline, and
/// publications from the other node reach the connection in the new
/// process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_cluster_mode_other_nodes_see_no_gap_in_presence_and_pushes_follow() {
    use common::services::Redis;
    const SECRET: &str = "takeover-cluster-secret-0123456789";
    let redis = Redis::start();
    let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        r#"{}
[cluster]
redis_url = "{}"
prefix = "{prefix}"
presence_ttl_s = 3
probe_interval_ms = 200

[auth]
jwt_secret = "{SECRET}"
"#,
        config(dir.path()),
        redis.url()
    );
    std::fs::write(dir.path().join("gale.toml"), toml).expect("config");
    let b = common::start_with(|c| {
        c.cluster.redis_url = Some(redis.url());
        c.cluster.prefix = prefix.clone();
        c.cluster.node_id = Some("b".into());
        c.cluster.presence_ttl_s = 3;
        c.cluster.probe_interval_ms = 200;
        c.api.key = Some(KEY.into());
        c.auth.jwt_secret = Some(SECRET.into());
        c.topics.insert(
            "news:*".into(),
            gale::config::TopicConfig {
                subscribe: Some(gale::config::SubscribeMode::Anyone),
                history_size: Some(100),
                history_ttl_s: Some(600),
                ..Default::default()
            },
        );
    })
    .await;

    let mut old = Gale::start(dir.path(), false);
    let addr = old.listening().await;
    let token = common::hs256_token(SECRET, "ivy", json!([]));
    let mut ivy = Raw::connect(addr, &format!("/ws?token={token}"), None).await;
    subscribe(&mut ivy, "news:c").await;

    // jo, on node b, watches whether ivy is online, all along.
    let mut jo = b
        .client_with_token(&common::hs256_token(SECRET, "jo", json!([])))
        .await;
    let online = |r: &Value| r["data"]["online"]["ivy"] == true;
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let r = jo
            .request("presence.online", json!({"users": ["ivy"]}), "p")
            .await;
        if online(&r) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ivy never online: {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let watching = watching.clone();
        tokio::spawn(async move {
            let (mut asked, mut offline) = (0u64, Vec::new());
            while watching.load(Ordering::Relaxed) {
                let r = jo
                    .request("presence.online", json!({"users": ["ivy"]}), "w")
                    .await;
                asked += 1;
                if !online(&r) {
                    offline.push(r.to_string());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (asked, offline)
        })
    };

    let mut new = Gale::start(dir.path(), true);
    new.wait_for("connections taken over").await;
    old.exits_cleanly().await;
    // Past the old node's presence TTL: only the new node's entry is left.
    tokio::time::sleep(Duration::from_secs(5)).await;
    watching.store(false, Ordering::Relaxed);
    let (asked, offline) = watcher.await.expect("watcher");
    assert!(asked > 50, "watched all along: {asked}");
    assert!(
        offline.is_empty(),
        "ivy looked offline {} times: {:?}",
        offline.len(),
        offline.first()
    );

    // A publication on node b reaches ivy, now in the new process.
    let body = json!({"topic": "news:c", "event": "from-b", "data": 1});
    assert_eq!(
        common::publish(&b, Some(KEY), &body.to_string()).await.0,
        200
    );
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let v: Value = serde_json::from_str(&ivy.next().await.text()).expect("JSON");
        if v["event"] == "from-b" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no push from b");
    }
    drop(new);
}

/// What an application started for a subscription in the old process
/// (the weather feed of a city) runs again in the new one: updates keep
/// coming after the takeover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_weather_updates_go_on_after_a_takeover() {
    let fake = gale::fake_upstream::FakeUpstream::start("127.0.0.1:0")
        .await
        .expect("fake upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        r#"{}
[weather]
provider = "openweathermap"
base_url = "{}"
api_key = "takeover-test-weather-key"
cache_ttl_s = 1
refresh_s = 1
"#,
        config(dir.path()),
        fake.url()
    );
    std::fs::write(dir.path().join("gale.toml"), toml).expect("config");
    let mut old = Gale::start(dir.path(), false);
    let addr = old.listening().await;
    let mut raw = Raw::connect(addr, "/ws", None).await;
    assert!(raw.next().await.text().contains("connected"));
    raw.text(
        &json!({"event": "weather.subscribe", "data": {"city": "Paris"}, "ref": "w"}).to_string(),
    )
    .await;
    next_update(&mut raw).await;

    let mut new = Gale::start(dir.path(), true);
    new.wait_for("connections taken over").await;
    old.exits_cleanly().await;
    // Two more, both from the new process's feed.
    next_update(&mut raw).await;
    let v = next_update(&mut raw).await;
    assert_eq!(v["data"]["city"], "Paris", "{v}");
    drop(new);
}

/// The next `weather.update` push.
async fn next_update(raw: &mut Raw) -> Value {
    loop {
        let v: Value = serde_json::from_str(&raw.next().await.text()).expect("JSON");
        if v["event"] == "weather.update" {
            return v;
        }
    }
}

/// Publishes `event` on `topic` through the API at `addr` and returns
/// the push `client` receives.
async fn published_and_seen(addr: SocketAddr, client: &mut Raw, topic: &str, event: &str) -> Value {
    let body = json!({"topic": topic, "event": event, "data": 1});
    assert_eq!(publish_at(addr, Some(KEY), &body.to_string()).await.0, 200);
    let push: Value = serde_json::from_str(&client.next().await.text()).expect("JSON");
    assert_eq!(push["event"], event, "{push}");
    push
}

/// SSE sessions move too: each keeps its session id (its POSTs are taken
/// by the new process), its stream never ends, and its pushes go on
/// without a gap or a duplicate while publications come every 10 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_sessions_are_handed_over_with_their_ids_and_no_gap() {
    sse_sessions_handed_over(false).await;
}

/// As [`sse_sessions_are_handed_over_with_their_ids_and_no_gap`], the
/// streams over gale's own TLS, half on TLS 1.3 and half on 1.2: the
/// record layer's state moves with each, and its client sees no new
/// handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_sessions_over_tls_are_handed_over_on_both_versions() {
    sse_sessions_handed_over(true).await;
}

async fn sse_sessions_handed_over(tls: bool) {
    use common::sse::SseClient;
    const SESSIONS: usize = 20;
    const TOPIC: &str = "news:sse";
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = if tls {
        tls_config(dir.path())
    } else {
        config(dir.path())
    };
    std::fs::write(dir.path().join("gale.toml"), toml).expect("config");
    let mut old = Gale::start(dir.path(), false);
    let addr = old.listening().await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for i in 0..SESSIONS {
        let mut c = if tls {
            let versions: &[_] = if i % 2 == 0 {
                &[&rustls::version::TLS13]
            } else {
                &[&rustls::version::TLS12]
            };
            SseClient::open_tls(addr, "", versions).await
        } else {
            SseClient::open(addr, "").await
        }
        .expect("open");
        let r = c
            .request("topic.subscribe", json!({"topic": TOPIC}), "s")
            .await;
        assert_eq!(r["ok"], true, "{r}");
        let stop = stop.clone();
        readers.push(tokio::spawn(async move {
            let (mut offsets, mut closed) = (Vec::new(), None);
            loop {
                let wait = if stop.load(Ordering::Relaxed) { 2 } else { 1 };
                match tokio::time::timeout(Duration::from_secs(wait), c.next_message()).await {
                    Err(_) if stop.load(Ordering::Relaxed) => break,
                    Err(_) => {}
                    Ok(None) => {
                        closed = Some("the stream ended".to_owned());
                        break;
                    }
                    Ok(Some((event, data))) => {
                        if event == "close" {
                            closed = Some(data);
                            break;
                        }
                        let v: Value = serde_json::from_str(&data).expect("JSON");
                        if let Some(o) = v["offset"].as_u64() {
                            offsets.push(o);
                        }
                    }
                }
            }
            (c, offsets, closed)
        }));
    }

    let published = Arc::new(AtomicU64::new(0));
    let publishing = Arc::new(AtomicBool::new(true));
    let publisher = {
        let (published, publishing) = (published.clone(), publishing.clone());
        tokio::spawn(async move {
            let mut k = 0u64;
            while publishing.load(Ordering::Relaxed) {
                let body = json!({"topic": TOPIC, "event": "tick", "data": {"k": k}});
                let ok = if tls {
                    // A connection to the old process may fail as it
                    // hands over: that publication is not counted.
                    common::try_https_publish_at(addr, KEY, &body.to_string())
                        .await
                        .is_some_and(|a| a.starts_with("HTTP/1.1 200"))
                } else {
                    publish_at(addr, Some(KEY), &body.to_string()).await.0 == 200
                };
                if ok {
                    published.fetch_add(1, Ordering::Relaxed);
                }
                k += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut new = Gale::start(dir.path(), true);
    let sent = old
        .wait_for("every connection sent to the new process")
        .await;
    assert!(sent.contains(&format!("handed={SESSIONS}")), "{sent}");
    old.exits_cleanly().await;
    new.wait_for("connections taken over").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    publishing.store(false, Ordering::Relaxed);
    publisher.await.expect("publisher");
    stop.store(true, Ordering::Relaxed);

    let want = published.load(Ordering::Relaxed);
    for (i, r) in readers.into_iter().enumerate() {
        let (mut c, offsets, closed) = r.await.expect("reader");
        assert_eq!(closed, None, "session {i} saw its stream end");
        let first = *offsets.first().expect("pushes");
        let expected: Vec<u64> = (first..=want).collect();
        assert_eq!(
            offsets, expected,
            "session {i}: offsets without gap or duplicate"
        );
        // The same session id, served by the new process.
        let reply = c
            .request("topic.presence", json!({"topic": TOPIC}), "after")
            .await;
        assert_eq!(reply["ok"], true, "session {i}: {reply}");
    }
    drop(new);
}

/// [`config`], serving TLS with the test key pair.
fn tls_config(dir: &std::path::Path) -> String {
    config(dir).replace(
        "[server]\n",
        &format!(
            "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            common::key_file("tls-cert.pem"),
            common::key_file("tls-key.pem")
        ),
    )
}

/// A `wss://` client on `versions`, subscribed to `topic`.
async fn wss_subscribed(
    addr: SocketAddr,
    versions: &[&'static rustls::SupportedProtocolVersion],
    topic: &str,
) -> common::Wss {
    use futures_util::SinkExt;
    let mut ws = common::wss_connect(addr, versions).await;
    assert!(wss_next(&mut ws).await["client_id"].is_string());
    let req = json!({"event": "topic.subscribe", "data": {"topic": topic}, "ref": "s"});
    ws.send(req.to_string().into()).await.expect("send");
    let reply = wss_next(&mut ws).await;
    assert_eq!(reply["ok"], true, "{reply}");
    ws
}

/// `wss://` connections move too, on TLS 1.3 and on TLS 1.2: no new
/// handshake, no close, what was queued for the clients that do not read
/// moved with them, pushes on without a gap or a duplicate, requests read
/// and answered by the new process, and a TLS 1.3 key update asked after
/// the move followed on its reads (the traffic secrets moved too; its
/// answer is checked in `tls::tests`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_are_handed_over_on_both_versions() {
    use futures_util::SinkExt;
    const PER_VERSION: usize = 10;
    const TOPIC: &str = "news:tls";
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("gale.toml"), tls_config(dir.path())).expect("config");
    let mut old = Gale::start(dir.path(), false);
    let addr = old.listening().await;
    let versions: [&[&rustls::SupportedProtocolVersion]; 2] =
        [&[&rustls::version::TLS13], &[&rustls::version::TLS12]];
    let mut clients = Vec::new();
    for v in versions {
        for _ in 0..PER_VERSION {
            clients.push((v, wss_subscribed(addr, v, TOPIC).await));
        }
    }
    // 16 KB each: what the clients that do not read leave behind fills
    // their sockets and stays queued in the old process, as frames and
    // as TLS records sealed and not written.
    let pad = "x".repeat(16_000);
    let publish = |i: usize| {
        let body = json!({"topic": TOPIC, "event": "n", "data": {"i": i, "pad": pad}});
        let body = body.to_string();
        async move {
            let answer = common::https_publish_at(addr, KEY, &body).await;
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        }
    };
    for i in 0..40 {
        publish(i).await;
    }
    // Half read what came before the move; the rest is queued in the
    // old process, or in its TLS stream, and moves with them.
    for (_, ws) in clients.iter_mut().step_by(2) {
        for i in 0..40 {
            assert_eq!(wss_next(ws).await["data"]["i"], i);
        }
    }

    let mut new = Gale::start(dir.path(), true);
    let taken = new.wait_for("connections taken over").await;
    assert!(
        taken.contains(&format!("taken={}", 2 * PER_VERSION)),
        "{taken}"
    );
    let sent = old.wait_for("every connection sent").await;
    let bytes = |field: &str| -> u64 {
        sent.split(&format!("{field}="))
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{field} in {sent:?}"))
    };
    // What the clients that do not read left moved with them.
    assert!(
        bytes("queued_bytes") + bytes("tls_unsent_bytes") > 0,
        "{sent}"
    );
    old.exits_cleanly().await;

    for (v, ws) in &mut clients {
        if v[0].version == rustls::ProtocolVersion::TLSv1_3 {
            // Asked of the new process, which must derive the next keys.
            ws.get_mut()
                .get_mut()
                .1
                .refresh_traffic_keys()
                .expect("key update");
        }
        let req =
            json!({"event": "topic.subscribe", "data": {"topic": "news:after"}, "ref": "after"});
        ws.send(req.to_string().into()).await.expect("send");
    }
    for i in 40..60 {
        publish(i).await;
    }
    for (n, (_, ws)) in clients.iter_mut().enumerate() {
        let mut next = if n % 2 == 0 { 40 } else { 0 };
        let mut answered = false;
        while next < 60 || !answered {
            let v = wss_next(ws).await;
            if v["reply"] == "after" {
                assert_eq!(v["ok"], true, "{v}");
                answered = true;
            } else {
                assert_eq!(v["data"]["i"], next, "client {n}: in order, once");
                next += 1;
            }
        }
    }
    drop(new);
}
