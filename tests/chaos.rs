//! Faults injected for real around a live server: a TCP proxy
//! (`common::faults`) between gale and PostgreSQL, between gale and the
//! weather API, and between clients and gale; clients that never read,
//! vanish mid-handshake or go half-open.
//!
//! The outage test's size comes from the environment, so the same test
//! gives the figure in docs/reliability.md:
//! `GALE_CHAOS_OUTAGE_S=60 GALE_CHAOS_RATE=2000 cargo test --release --test chaos -- outage --nocapture`.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::faults::{Fault, FaultProxy};
use common::{Client, postgres_url, start_with};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

fn env_u64(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A new PostgreSQL test database behind a fault proxy: (proxy, URL
/// through it, URL direct to it).
async fn postgres_behind_proxy() -> (FaultProxy, String, String) {
    let url = postgres_url().await;
    let parsed = url::Url::parse(&url).expect("postgres URL");
    let host = parsed.host_str().expect("host");
    let port = parsed.port().unwrap_or(5432);
    let target: SocketAddr = tokio::net::lookup_host((host, port))
        .await
        .expect("resolve")
        .next()
        .expect("an address");
    let proxy = FaultProxy::start(target).await;
    let mut through = parsed.clone();
    through.set_host(Some("127.0.0.1")).expect("host");
    through.set_port(Some(proxy.addr.port())).expect("port");
    (proxy, through.to_string(), url)
}

/// A server whose `/metrics.json` a test reads: one in this process, or
/// a `gale serve` child at its address.
trait Metrics {
    async fn metrics_json(&self) -> Value;
}

impl Metrics for common::TestServer {
    async fn metrics_json(&self) -> Value {
        self.metrics().await
    }
}

impl Metrics for SocketAddr {
    async fn metrics_json(&self) -> Value {
        let (_, body) = common::http_get(*self, "/metrics.json")
            .await
            .expect("metrics");
        serde_json::from_str(&body).expect("json")
    }
}

/// Waits until `cond` holds of the server's metrics, or fails naming
/// `what`.
async fn wait_until(
    server: &impl Metrics,
    what: &str,
    limit: Duration,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let m = server.metrics_json().await;
        if cond(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "{what}: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn rows_of(store_url: &str, client_id: &str) -> i64 {
    common::count_rows(store_url, client_id).await
}

/// Whether gale has created its tables in the PostgreSQL database at
/// `url` (a database it could never reach has none).
async fn migrated(url: &str) -> bool {
    let pool = sqlx::PgPool::connect(url).await.expect("open postgres");
    let found: Option<String> = sqlx::query_scalar("SELECT to_regclass('weather_requests')::TEXT")
        .fetch_one(&pool)
        .await
        .expect("query postgres");
    pool.close().await;
    found.is_some()
}

#[tokio::test]
async fn postgres_down_at_start_gale_serves_spills_and_every_row_lands_once_it_is_back() {
    let (proxy, url, direct) = postgres_behind_proxy().await;
    proxy.set(Fault::Refuse);
    let server = start_with(|c| c.store.url = url.clone()).await;
    let mut c = server.client().await;
    for i in 0..40 {
        assert_eq!(c.ask(&format!("DownAtStart{i}")).await["type"], "weather");
    }
    wait_until(&server, "rows spilled", common::WAIT, |m| {
        m["spill-rows"].as_u64() == Some(40)
    })
    .await;
    assert!(!migrated(&direct).await, "nothing reached the database");
    assert!(server.metric("spill-bytes").await > 0);

    proxy.set(Fault::Pass);
    let m = wait_until(&server, "spill replayed", Duration::from_secs(30), |m| {
        m["spill-replayed"].as_u64() == Some(40)
    })
    .await;
    assert_eq!(m["spill-bytes"], 0, "{m}");
    assert_eq!(rows_of(&direct, &c.client_id).await, 40);
    // New rows go straight to the database again.
    c.ask("AfterTheOutage").await;
    wait_until(&server, "written directly", common::WAIT, |m| {
        m["db-completed"].as_u64() == Some(41)
    })
    .await;
    assert_eq!(server.metric("spill-dropped").await, 0);
    assert_eq!(server.metric("db-dropped").await, 0);
}

#[tokio::test]
async fn postgres_lost_mid_run_costs_no_reply_time_and_no_row() {
    let (proxy, url, direct) = postgres_behind_proxy().await;
    let server = start_with(|c| c.store.url = url.clone()).await;
    let mut c = server.client().await;
    for i in 0..20 {
        c.ask(&format!("Before{i}")).await;
    }
    wait_until(&server, "written", common::WAIT, |m| {
        m["db-completed"].as_u64() == Some(20)
    })
    .await;

    // Every open connection to PostgreSQL is reset, and new ones too.
    proxy.set(Fault::Refuse);
    let mut slowest = Duration::ZERO;
    for i in 0..60 {
        let began = Instant::now();
        assert_eq!(c.ask(&format!("During{i}")).await["type"], "weather");
        slowest = slowest.max(began.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        slowest < Duration::from_millis(500),
        "replies never wait for the database: slowest {slowest:?}"
    );
    wait_until(&server, "spilled", common::WAIT, |m| {
        m["spill-rows"].as_u64().unwrap_or(0) > 0
    })
    .await;

    proxy.set(Fault::Pass);
    wait_until(&server, "every row written", Duration::from_secs(30), |m| {
        m["db-completed"].as_u64() == Some(80)
    })
    .await;
    assert_eq!(rows_of(&direct, &c.client_id).await, 80);
    assert_eq!(server.metric("db-failed").await, 0);
    assert_eq!(server.metric("spill-dropped").await, 0);
}

#[tokio::test]
async fn a_slow_postgres_one_second_a_query_does_not_slow_replies() {
    let (proxy, url, direct) = postgres_behind_proxy().await;
    let server = start_with(|c| {
        c.store.url = url.clone();
        c.store.batch_window_ms = 0;
    })
    .await;
    let mut c = server.client().await;
    c.ask("Warm").await;
    // 500 ms each way: every statement takes a second or more.
    proxy.set(Fault::Latency(Duration::from_millis(500)));
    let mut slowest = Duration::ZERO;
    for i in 0..50 {
        let began = Instant::now();
        assert_eq!(c.ask(&format!("Slow{i}")).await["type"], "weather");
        slowest = slowest.max(began.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        slowest < Duration::from_millis(500),
        "slowest reply {slowest:?}"
    );
    wait_until(&server, "every row written", Duration::from_secs(60), |m| {
        m["db-completed"].as_u64().unwrap_or(0) + m["spill-replayed"].as_u64().unwrap_or(0) >= 51
            && m["db-queue-depth"] == 0
            && m["spill-bytes"] == 0
    })
    .await;
    proxy.set(Fault::Pass);
    assert_eq!(rows_of(&direct, &c.client_id).await, 51);
}

/// Sends cities at `rate` a second from `clients` connections until
/// `stop`; records each reply's latency in `lat` (µs) with the phase it
/// was sent in. Returns (client ids, replies received).
async fn load(
    url: String,
    clients: usize,
    rate: u64,
    phase: Arc<AtomicU64>,
    stop: tokio_util::sync::CancellationToken,
) -> (Vec<String>, u64, Vec<Vec<u64>>) {
    let per_client = (rate as f64 / clients as f64).max(0.1);
    let mut tasks = Vec::new();
    for n in 0..clients {
        let (url, phase, stop) = (url.clone(), phase.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&url).await;
            let hello = c.recv_json().await;
            let id = hello["client_id"].as_str().expect("id").to_owned();
            let (mut tx, mut rx) = c.ws.split();
            let sent_at = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
            let sent = sent_at.clone();
            let stop2 = stop.clone();
            let writer = tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_client));
                let mut i = 0u64;
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        () = stop2.cancelled() => break,
                    }
                    sent.lock()
                        .expect("lock")
                        .push_back((Instant::now(), phase.load(Ordering::Relaxed)));
                    // A few cities, so replies come from the cache.
                    let city = format!("Load{}", (n as u64 + i) % 8);
                    i += 1;
                    if tx.send(Message::text(city)).await.is_err() {
                        break;
                    }
                }
                tx
            });
            let mut lat: Vec<Vec<u64>> = vec![Vec::new(); 3];
            let mut replies = 0u64;
            loop {
                let outstanding = !sent_at.lock().expect("lock").is_empty();
                if stop.is_cancelled() && !outstanding {
                    break;
                }
                let msg = match tokio::time::timeout(Duration::from_secs(5), rx.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => t,
                    Ok(Some(Ok(_))) => continue,
                    _ => break,
                };
                let v: Value = serde_json::from_str(&msg).expect("json");
                if v["type"] != "weather" {
                    continue;
                }
                replies += 1;
                if let Some((at, ph)) = sent_at.lock().expect("lock").pop_front() {
                    lat[ph as usize].push(at.elapsed().as_micros() as u64);
                }
            }
            let tx = writer.await.expect("writer");
            // Say goodbye (the server may already have closed).
            if let Ok(mut ws) = rx.reunite(tx) {
                let _ = ws.close(None).await;
            }
            (id, replies, lat)
        }));
    }
    let mut ids = Vec::new();
    let mut replies = 0;
    let mut lat = vec![Vec::new(); 3];
    for t in tasks {
        let (id, r, l) = t.await.expect("client");
        ids.push(id);
        replies += r;
        for (all, mine) in lat.iter_mut().zip(l) {
            all.extend(mine);
        }
    }
    (ids, replies, lat)
}

fn p99_ms(v: &mut [u64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    v[(v.len() * 99 / 100).min(v.len() - 1)] as f64 / 1000.0
}

#[tokio::test]
async fn postgres_outage_under_load_every_answered_request_has_its_row() {
    let (proxy, url, direct) = postgres_behind_proxy().await;
    let outage = Duration::from_secs(env_u64("GALE_CHAOS_OUTAGE_S", 3));
    let rate = env_u64("GALE_CHAOS_RATE", 300);
    let phase_len = Duration::from_secs(env_u64("GALE_CHAOS_PHASE_S", 3));
    let server = start_with(|c| {
        c.store.url = url.clone();
        c.server.shutdown_grace_ms = 30_000;
    })
    .await;
    let phase = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let clients = (rate / 20).clamp(10, 200) as usize;
    let running = tokio::spawn(load(
        server.ws_url(),
        clients,
        rate,
        phase.clone(),
        stop.clone(),
    ));
    tokio::time::sleep(phase_len).await;
    phase.store(1, Ordering::Relaxed);
    proxy.set(Fault::Refuse);
    tokio::time::sleep(outage).await;
    let spilled_in_outage = server.metric("spill-rows").await;
    phase.store(2, Ordering::Relaxed);
    proxy.set(Fault::Pass);
    let back = Instant::now();
    let metrics_url = server.addr;
    // How long the spill takes to empty once the database is back.
    let drained = tokio::spawn(async move {
        loop {
            let json = common::http_get(metrics_url, "/metrics.json").await;
            let bytes = json
                .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
                .and_then(|m| m["spill-bytes"].as_u64());
            if bytes == Some(0) {
                return back.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    tokio::time::sleep(phase_len).await;
    stop.cancel();
    let (ids, replies, mut lat) = running.await.expect("load");
    let m = wait_until(&server, "spill replayed", Duration::from_secs(120), |m| {
        m["spill-bytes"] == 0
            && m["db-queue-depth"] == 0
            && m["db-completed"].as_u64() == Some(replies)
    })
    .await;
    let drained = drained.await.expect("drain timer");
    let pool = sqlx::PgPool::connect(&direct).await.expect("connect");
    let ids: Vec<uuid::Uuid> = ids.iter().map(|i| i.parse().expect("uuid")).collect();
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM weather_requests WHERE client_id = ANY($1)")
            .bind(&ids)
            .fetch_one(&pool)
            .await
            .expect("count");
    let (before, during, after) = (
        p99_ms(&mut lat[0]),
        p99_ms(&mut lat[1]),
        p99_ms(&mut lat[2]),
    );
    println!(
        "outage {} s at {rate}/s from {clients} connections: {replies} replies, {rows} rows; \
         spilled {} ({spilled_in_outage} during the outage), replayed {} (spill empty {drained:?} \
         after the database came back), dropped {}; \
         reply p99 before {before:.1} ms, during {during:.1} ms, after {after:.1} ms",
        outage.as_secs(),
        m["spill-rows"],
        m["spill-replayed"],
        m["spill-dropped"],
    );
    assert!(replies > 0);
    assert_eq!(rows, replies as i64, "every answered request has its row");
    assert!(spilled_in_outage > 0, "the outage was felt: {m}");
    assert_eq!(m["spill-dropped"], 0);
    assert_eq!(m["db-dropped"], 0);
}

#[tokio::test]
async fn upstream_faults_open_the_breaker_no_lookup_outlives_its_deadline_and_it_recovers() {
    let fake = gale::fake_upstream::FakeUpstream::start("127.0.0.1:0")
        .await
        .expect("fake");
    let proxy = FaultProxy::start(fake.addr()).await;
    let server = start_with(|c| {
        c.weather.base_url = Some(format!("http://{}", proxy.addr));
        c.weather.timeout_ms = 400;
        c.weather.breaker_failures = 3;
        c.weather.breaker_cooldown_ms = 500;
        c.weather.cache_ttl_s = 1;
    })
    .await;
    let mut c = server.client().await;
    assert_eq!(c.ask("Oslo").await["type"], "weather");

    let deadline = Duration::from_millis(400 + 300);
    let mut n = 0;
    for (fault, name) in [
        (Fault::Refuse, "down"),
        (Fault::Stall, "stalled past the deadline"),
        (Fault::Garbage, "garbage"),
        (Fault::Reset, "reset mid-stream"),
    ] {
        proxy.set(fault);
        if fault == Fault::Reset {
            // Reset applies to connections open at the time: hold one open
            // (a stalled call) and reset it mid-stream.
            proxy.set(Fault::Stall);
            let ask = tokio::spawn({
                let url = server.ws_url();
                async move {
                    let mut c = Client::connect(&url).await;
                    c.recv_json().await;
                    let began = Instant::now();
                    (c.ask("ResetCity").await, began.elapsed())
                }
            });
            tokio::time::sleep(Duration::from_millis(150)).await;
            proxy.set(Fault::Reset);
            let (reply, took) = ask.await.expect("ask");
            assert_eq!(reply["type"], "error", "{name}: {reply}");
            assert!(took < deadline, "{name}: {took:?}");
            continue;
        }
        for _ in 0..4 {
            n += 1;
            let began = Instant::now();
            let reply = c.ask(&format!("Fault{n}")).await;
            let took = began.elapsed();
            assert_eq!(reply["type"], "error", "{name}: {reply}");
            let code = reply["code"].as_str().unwrap_or_default().to_owned();
            assert!(
                ["upstream_unavailable", "timeout"].contains(&code.as_str()),
                "{name}: {reply}"
            );
            assert!(took < deadline, "{name}: a lookup took {took:?}");
        }
        // Enough failures in a row: the breaker is open and fails fast.
        let began = Instant::now();
        let reply = c.ask(&format!("Fast{n}")).await;
        assert_eq!(reply["code"], "upstream_unavailable", "{name}: {reply}");
        assert!(
            began.elapsed() < Duration::from_millis(100),
            "{name}: open breaker answers at once ({:?})",
            began.elapsed()
        );
        // Let the cooldown pass so the next fault is met by a live call.
        proxy.set(Fault::Pass);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            c.ask(&format!("Heal{n}")).await["type"],
            "weather",
            "{name}"
        );
    }
    // Recovery: the breaker closed, lookups succeed, nothing is left in
    // flight and nothing waits.
    proxy.set(Fault::Pass);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(c.ask("Bergen").await["type"], "weather");
    let deadline = Instant::now() + common::WAIT;
    while server.sample("gale_upstream_in_flight").await != 0.0 {
        assert!(Instant::now() < deadline, "upstream calls left in flight");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        server.sample("gale_upstream_pending").await,
        0.0,
        "no lookup left waiting for a slot"
    );
    assert_eq!(
        server.sample("gale_upstream_breaker_state").await,
        0.0,
        "closed again"
    );
    assert!(
        server.sample("gale_upstream_breaker_rejected_total").await >= 4.0,
        "the open breaker failed lookups fast after each fault"
    );
}

#[tokio::test]
async fn a_thousand_clients_that_never_read_neither_grow_memory_nor_slow_the_others() {
    const SILENT: usize = 1_000;
    let queue = 64;
    let server = start_with(|c| {
        c.api.key = Some("chaos-publish-key-0123".into());
        c.connection.outbound_queue = queue;
        // Bound the kernel's share too (by default Linux lets each
        // socket's send buffer grow to 4 MiB before gale sees any back
        // pressure).
        c.server.send_buffer_bytes = 16_384;
        c.server.max_connections = 5_000;
    })
    .await;
    let body = json!({"topic": "storm", "payload": "x".repeat(900)});
    let sub =
        json!({"event": "topic.subscribe", "data": {"topic": "storm"}, "ref": "s"}).to_string();
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        let mut r = common::raw::Raw::connect_small(server.addr, "/ws", 4096).await;
        r.next().await; // the greeting
        r.text(&sub).await;
        r.next().await; // the reply
        silent.push(r);
    }
    let mut reader = server.client().await;
    reader
        .request("topic.subscribe", json!({"topic": "storm"}), "s")
        .await;
    let rss_before = server.metric("rss-bytes").await;
    let publishes = 400;
    let mut worst = Duration::ZERO;
    let mut peak_queued = 0u64;
    for i in 0..publishes {
        let event =
            json!({"event": "storm", "topic": "storm", "data": {"n": i, "pad": body["payload"]}});
        let began = Instant::now();
        let (status, _) =
            common::publish(&server, Some("chaos-publish-key-0123"), &event.to_string()).await;
        assert_eq!(status, 200);
        let push = reader.next_push().await;
        assert_eq!(push["data"]["n"], i);
        worst = worst.max(began.elapsed());
        if i % 50 == 0 {
            peak_queued = peak_queued.max(server.metric("outbound-queued").await);
        }
    }
    let m = server.metrics().await;
    peak_queued = peak_queued.max(m["outbound-queued"].as_u64().unwrap_or(0));
    let rss_after = m["rss-bytes"].as_u64().unwrap_or(0);
    println!(
        "{SILENT} silent clients, {publishes} publishes of ~1 KB: a reading client's worst \
         publish-to-push {worst:?}; peak queued frames {peak_queued} (bound {}); dropped {}; \
         test process RSS {} -> {} MiB",
        queue * (SILENT + 1),
        m["outbound-dropped"],
        rss_before >> 20,
        rss_after >> 20,
    );
    assert!(
        m["outbound-dropped"].as_u64().unwrap_or(0) > 0,
        "the silent clients' queues filled: {m}"
    );
    assert!(
        peak_queued <= (queue * (SILENT + 1)) as u64,
        "queued frames stay within outbound_queue × connections"
    );
    assert!(
        worst < Duration::from_secs(2),
        "the reading client is not held up by the silent ones: {worst:?}"
    );
    drop(silent);
}

#[tokio::test]
async fn half_open_clients_are_dropped_by_the_ping_timeout() {
    let server = start_with(|c| c.server.ping_interval_s = 1).await;
    let proxy = FaultProxy::start(server.addr).await;
    let url = format!("ws://{}/ws", proxy.addr);
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut c = Client::connect(&url).await;
        c.recv_json().await;
        clients.push(c);
    }
    wait_until(&server, "connected", common::WAIT, |m| {
        m["connections"] == 20
    })
    .await;
    // The peers stop answering and never close: half-open connections.
    proxy.set(Fault::Stall);
    let began = Instant::now();
    wait_until(&server, "half-open dropped", Duration::from_secs(10), |m| {
        m["connections"] == 0
    })
    .await;
    println!("20 half-open connections dropped in {:?}", began.elapsed());
    assert!(
        began.elapsed() >= Duration::from_millis(900),
        "not before a ping went unanswered"
    );
    drop(clients);
}

#[tokio::test]
async fn clients_that_vanish_mid_handshake_leave_nothing_behind() {
    let server = start_with(|c| c.server.handshake_timeout_ms = 500).await;
    // Half a request head, then silence.
    let mut stalled = Vec::new();
    for _ in 0..50 {
        let mut s = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("connect");
        s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgr")
            .await
            .expect("write");
        stalled.push(s);
    }
    // A whole upgrade request, then gone before reading the 101.
    for _ in 0..50 {
        let mut s = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("connect");
        s.write_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .expect("write");
        let _ = s.set_zero_linger();
        drop(s);
    }
    // Every stalled socket is closed by the server at the timeout.
    for mut s in stalled {
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(_)) | Ok(Err(_))),
            "closed by the server, not left open"
        );
    }
    wait_until(&server, "nothing left", common::WAIT, |m| {
        m["connections"] == 0
    })
    .await;
    let m = server.metrics().await;
    assert!(
        m["http-timeouts"].as_u64().unwrap_or(0) >= 50,
        "each stalled head counted: {m}"
    );
    // And the server serves on.
    let mut c = server.client().await;
    assert_eq!(c.ask("Oslo").await["type"], "weather");
}

#[tokio::test]
async fn sigterm_under_load_every_answered_request_has_its_row() {
    let rate = env_u64("GALE_CHAOS_SIGTERM_RATE", 5_000);
    let fake = gale::fake_upstream::FakeUpstream::start("127.0.0.1:0")
        .await
        .expect("fake");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = postgres_url().await;
    let (child, addr) = serve_binary(&[
        ("GALE_WEATHER__BASE_URL", fake.url()),
        ("GALE_STORE__URL", store.clone()),
        (
            "GALE_STORE__SPILL_DIR",
            dir.path().join("spill").display().to_string(),
        ),
        ("GALE_SERVER__SHUTDOWN_GRACE_MS", "10000".into()),
        ("GALE_ROUTER__GLOBAL_RATE_LIMIT", "0".into()),
    ])
    .await;
    let stop = tokio_util::sync::CancellationToken::new();
    let clients = (rate / 50).clamp(10, 200) as usize;
    let running = tokio::spawn(load(
        format!("ws://{addr}/ws"),
        clients,
        rate,
        Arc::new(AtomicU64::new(0)),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = child.id().expect("pid").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("exits after SIGTERM")
        .expect("wait");
    stop.cancel();
    let (ids, replies, _) = running.await.expect("load");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Counted once the process is gone: nothing can land later.
    let ids: Vec<uuid::Uuid> = ids.iter().map(|i| i.parse().expect("uuid")).collect();
    let rows: i64 = if store.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(&store).await.expect("open");
        let mut n = 0;
        for id in &ids {
            let c: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM weather_requests WHERE client_id = ? AND ok",
            )
            .bind(id.to_string())
            .fetch_one(&pool)
            .await
            .expect("count");
            n += c;
        }
        n
    } else {
        let pool = sqlx::PgPool::connect(&store).await.expect("connect");
        sqlx::query_scalar("SELECT count(*) FROM weather_requests WHERE client_id = ANY($1) AND ok")
            .bind(&ids)
            .fetch_one(&pool)
            .await
            .expect("count")
    };
    println!(
        "SIGTERM after 3 s at {rate}/s from {clients} connections ({}): {replies} replies, \
         {rows} rows",
        store.split(':').next().unwrap_or_default()
    );
    // At least a second's worth (a busy CI machine runs behind).
    assert!(replies > rate, "the load ran: {replies}");
    assert_eq!(rows, replies as i64, "every answered request has its row");
}

/// `gale serve` (the binary) on a free port with `env`; returns the child
/// and its address once `/healthz` answers.
async fn serve_binary(env: &[(&str, String)]) -> (tokio::process::Child, SocketAddr) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_gale"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn serve");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let deadline = Instant::now() + Duration::from_secs(30);
    while common::http_get(addr, "/healthz").await.map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "serve never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (child, addr)
}

#[tokio::test]
async fn sigkill_loses_nothing_already_spilled() {
    let (proxy, url, direct) = postgres_behind_proxy().await;
    let fake = gale::fake_upstream::FakeUpstream::start("127.0.0.1:0")
        .await
        .expect("fake");
    let dir = tempfile::tempdir().expect("tempdir");
    let env = [
        ("GALE_WEATHER__BASE_URL", fake.url()),
        ("GALE_STORE__URL", url.clone()),
        (
            "GALE_STORE__SPILL_DIR",
            dir.path().join("spill").display().to_string(),
        ),
    ];
    proxy.set(Fault::Refuse);
    let (mut child, addr) = serve_binary(&env).await;
    let mut c = Client::connect(&format!("ws://{addr}/ws")).await;
    let hello = c.recv_json().await;
    let id = hello["client_id"].as_str().expect("id").to_owned();
    for i in 0..100 {
        assert_eq!(c.ask(&format!("Killed{i}")).await["type"], "weather");
    }
    // Every row in the spill, then killed without a chance to flush.
    wait_until(&addr, "spilled", common::WAIT, |m| m["spill-rows"] == 100).await;
    child.kill().await.expect("SIGKILL");
    drop(c);

    proxy.set(Fault::Pass);
    let (_again, addr) = serve_binary(&env).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while rows_of(&direct, &id).await < 100 {
        assert!(
            Instant::now() < deadline,
            "the spill was replayed after the kill"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rows_of(&direct, &id).await, 100);
    // The replay counts a batch once its rows are committed: a moment
    // after the rows are there.
    let m = wait_until(&addr, "replayed", common::WAIT, |m| {
        m["spill-replayed"] == 100
    })
    .await;
    assert_eq!(m["spill-torn"], 0, "{m}");
}
