//! `gale bench` measures correctly: against a server whose latency is
//! known (the fake upstream's), it reports that latency and the matching
//! throughput; it counts errors by kind; it opens and holds connections.
//! No timing targets here: those live in docs/benchmarks.md.

mod common;

use std::time::Duration;

use common::start_with;
use gale::bench::broadcast::{self, BroadcastOptions};
use gale::bench::{self, Ask, RequestsOptions, Target};
use tokio_util::sync::CancellationToken;

fn options(connections: usize, secs: u64) -> RequestsOptions {
    RequestsOptions {
        connections,
        duration: Duration::from_secs(secs),
        // Distinct cities: every request misses the cache and pays the
        // upstream's latency.
        cities: 1_000_000,
        window: 1,
        ask: Ask::City,
        connect_rate: 1_000,
        reply_timeout: Duration::from_secs(5),
        per_connection: 0,
        first_connection: 0,
    }
}

#[tokio::test]
async fn requests_report_the_known_upstream_latency_and_matching_throughput() {
    let server = start_with(|_| {}).await;
    server.fake.set_latency(Duration::from_millis(150));
    let target = Target::new(&server.ws_url(), 1).expect("target");
    let r = bench::requests(target, options(4, 2), CancellationToken::new(), false).await;
    let json = r.to_json();
    assert_eq!(json["connected"], 4, "{json}");
    assert_eq!(json["errors"], serde_json::json!({}), "{json}");
    let p50 = r.latency_ms(0.5);
    assert!(
        (150.0..400.0).contains(&p50),
        "p50 {p50} ms for a 150 ms upstream"
    );
    // 4 connections, one request at a time each, ~150 ms per request, 2 s.
    let replies = json["replies"].as_u64().expect("replies");
    assert!(
        (30..=56).contains(&replies),
        "{replies} replies: expected about 53"
    );
    assert_eq!(
        server.fake.calls(),
        replies,
        "every reply was one upstream call"
    );
}

#[tokio::test]
async fn json_events_with_a_window_match_every_reply() {
    let server = start_with(|_| {}).await;
    server.fake.set_latency(Duration::from_millis(50));
    let target = Target::new(&server.ws_url(), 2).expect("target");
    let mut o = options(3, 1);
    o.ask = Ask::Event("weather.get".into(), None);
    o.window = 4;
    let r = bench::requests(target, o, CancellationToken::new(), false).await;
    let json = r.to_json();
    assert_eq!(
        json["errors"],
        serde_json::json!({}),
        "every reply matched by ref: {json}"
    );
    // 3 connections × 4 in flight × ~50 ms per reply over 1 s: about 240.
    let replies = json["replies"].as_u64().expect("replies");
    assert!((100..=260).contains(&replies), "{replies}");
}

#[tokio::test]
async fn error_replies_are_counted_by_kind() {
    let server = start_with(|c| c.weather.breaker_failures = 1_000).await;
    server.fake.set_mode(gale::fake_upstream::Mode::Status(503));
    let target = Target::new(&server.ws_url(), 1).expect("target");
    let r = bench::requests(target, options(2, 1), CancellationToken::new(), false).await;
    let json = r.to_json();
    assert_eq!(json["replies"], 0);
    let n = json["errors"]["reply upstream_unavailable"]
        .as_u64()
        .expect("counted");
    assert!(n > 0, "{json}");
}

#[tokio::test]
async fn ctrl_c_style_stop_still_reports() {
    let server = start_with(|_| {}).await;
    server.fake.set_latency(Duration::from_millis(20));
    let target = Target::new(&server.ws_url(), 1).expect("target");
    let stop = CancellationToken::new();
    let stopper = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        stopper.cancel();
    });
    let started = std::time::Instant::now();
    let r = bench::requests(target, options(2, 30), stop, false).await;
    assert!(started.elapsed() < Duration::from_secs(5), "stopped early");
    assert!(r.to_json()["replies"].as_u64().expect("n") > 0);
}

#[tokio::test]
async fn connections_are_opened_held_and_measured() {
    let server = start_with(|_| {}).await;
    let target = Target::new(&server.ws_url(), 4).expect("target");
    let watch = server.app.clone();
    let peak = tokio::spawn(async move {
        let mut peak = 0;
        for _ in 0..100 {
            peak = peak.max(watch.metrics.connections.get());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        peak
    });
    let r = bench::connections::connections(
        target,
        50,
        1_000,
        Duration::from_millis(300),
        CancellationToken::new(),
        false,
        None,
    )
    .await;
    assert_eq!(
        peak.await.expect("watch"),
        50,
        "the server held all 50 at once"
    );
    let json = r.to_json();
    assert_eq!(json["connected"], 50, "{json}");
    assert_eq!(json["connect_failed"], 0);
    assert!(
        json["server_kib_per_connection"].is_number(),
        "read from /metrics.json: {json}"
    );
    assert!(json["latency_ms"]["p50"].as_f64().expect("p50") > 0.0);
}

#[tokio::test]
async fn per_connection_limit_sends_exactly_that_many() {
    let server = start_with(|_| {}).await;
    let target = Target::new(&server.ws_url(), 1).expect("target");
    let mut o = options(7, 20);
    o.per_connection = 3;
    let started = std::time::Instant::now();
    let r = bench::requests(target, o, CancellationToken::new(), false).await;
    assert_eq!(r.to_json()["replies"], 21, "7 connections x 3");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "ends when done, not at -d"
    );
    assert_eq!(server.metric("requests").await, 21);
}

fn broadcast_options(subscribers: usize, messages: u64, key: &str) -> BroadcastOptions {
    BroadcastOptions {
        subscribers,
        connect_rate: 1_000,
        topic: "bench".into(),
        messages,
        size: 1024,
        rate: 0,
        api_key: key.into(),
        idle: Duration::from_secs(2),
        first_connection: 0,
    }
}

const KEY: &str = "bench-key-0123456789";

/// Runs the broadcast scenario against `addr` (its `/ws` for the
/// subscribers, `sources` source addresses) and checks that every
/// publication was accepted and every delivery counted and timed; the
/// merged report.
async fn every_delivery(
    addr: std::net::SocketAddr,
    sources: u8,
    subscribers: usize,
    messages: u64,
    rate: u32,
) -> bench::Report {
    let target = Target::new(&format!("ws://{addr}/ws"), sources).expect("target");
    let mut o = broadcast_options(subscribers, messages, KEY);
    o.rate = rate;
    let stop = CancellationToken::new();
    let publisher = target.clone();
    let subs = broadcast::subscribe(target, &o, &stop, false).await;
    assert_eq!(subs.subscribed(), subscribers as u64);
    let (published, mut r) = tokio::join!(
        broadcast::publish(&publisher, &o, &stop),
        subs.drain(o.idle, Duration::from_secs(5))
    );
    let published = published.expect("publisher");
    assert_eq!(published.accepted, messages);
    let last = r.extra_u64("last_delivery_us");
    broadcast::finish(&mut r, &published, subscribers as u64, last);
    let json = r.to_json();
    let expected = subscribers as u64 * messages;
    assert_eq!(
        json["replies"], expected,
        "{subscribers} subscribers x {messages} messages: {json}"
    );
    assert_eq!(json["missed deliveries"], 0, "{json}");
    assert_eq!(json["latency_ms"]["samples"], expected);
    r
}

/// 20 subscribers, 3 messages at `rate`, against a fresh server with a
/// 300 ms batch window: the slowest delivery's latency, in ms, once the
/// server has counted all 60 pushes.
async fn slowest_of_three_publications(rate: u32) -> f64 {
    let server = start_with(window_of_300_ms).await;
    let r = every_delivery(server.addr, 2, 20, 3, rate).await;
    assert_eq!(server.metric("pushes").await, 60);
    r.latency_ms(1.0)
}

fn window_of_300_ms(c: &mut gale::config::Config) {
    c.api.key = Some(KEY.into());
    c.broadcast.batch_window_ms = 300;
    c.broadcast.batch_size = 1_000;
}

/// `gale bench floor` on a free port, gathering bursts for `window`: its
/// address, its stop and its task.
async fn start_floor(
    window: Duration,
) -> (
    std::net::SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let floor = tokio::spawn(gale::bench::floor::serve(
        listener,
        window,
        256,
        stop.clone(),
    ));
    (addr, stop, floor)
}

#[tokio::test]
async fn broadcast_counts_every_delivery_and_times_it_from_publish() {
    // The floor holds every batch for its window from the batch's first
    // publication, so the first publication's deliveries come 300 ms or
    // more after its stamp (those that join it wait less, by how late
    // they were sent): a known floor under the latencies the bench must
    // report, timed from the publish.
    let (addr, stop, floor) = start_floor(Duration::from_millis(300)).await;
    let r = every_delivery(addr, 2, 20, 3, 0).await;
    let last = r.latency_ms(1.0);
    assert!(
        (290.0..1_000.0).contains(&last),
        "{last} ms behind a 300 ms window"
    );
    stop.cancel();
    floor.await.expect("the floor stops");
}

#[tokio::test]
async fn publications_after_a_batch_written_whole_do_not_wait_for_the_window() {
    // Back to back to idle connections: the delivery task writes each
    // batch into the sockets itself, and what is published meanwhile
    // waits in the queue and goes next, so none waits for the 300 ms
    // window (it did: two of the three waited for it).
    let max = slowest_of_three_publications(0).await;
    assert!(max < 150.0, "max {max} ms: a push waited for the window");
}

#[tokio::test]
async fn a_publication_that_finds_the_server_quiet_does_not_wait_for_the_window() {
    // Two a second: each finds nothing queued and the last batch long
    // gone, so none waits for the 300 ms window.
    let max = slowest_of_three_publications(2).await;
    assert!(max < 150.0, "max {max} ms: a quiet server held a push");
}

#[tokio::test]
async fn the_floor_serves_the_broadcast_scenario_as_gale_does() {
    // The same client, subscribe and publish as against gale; every
    // delivery counted and timed.
    let (addr, stop, floor) = start_floor(Duration::from_millis(2)).await;
    every_delivery(addr, 1, 5, 4, 0).await;
    stop.cancel();
    floor.await.expect("the floor stops");
}

#[tokio::test]
async fn broadcast_counts_refused_publishes_by_kind() {
    // A publish the API refuses (wrong key) delivers nothing and is
    // counted as an error of its kind.
    let server = start_with(|c| c.api.key = Some(KEY.into())).await;
    let target = Target::new(&server.ws_url(), 1).expect("target");
    let o = broadcast_options(5, 4, "wrong-key-0123456789");
    let stop = CancellationToken::new();
    let publisher = target.clone();
    let subs = broadcast::subscribe(target, &o, &stop, false).await;
    let (published, mut r) = tokio::join!(
        broadcast::publish(&publisher, &o, &stop),
        subs.drain(Duration::from_millis(300), Duration::from_millis(500))
    );
    let published = published.expect("publisher");
    assert_eq!(published.accepted, 0);
    broadcast::finish(&mut r, &published, 5, 0);
    let json = r.to_json();
    assert_eq!(json["replies"], 0);
    assert_eq!(
        json["errors"]["publish 401 Unauthorized"], 4,
        "every refused publish counted: {json}"
    );
}

#[tokio::test]
async fn store_bench_writes_every_offered_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let cfg = gale::config::StoreConfig {
        url: url.clone(),
        // Nothing in the working directory (a server there holds
        // ./gale-spill).
        spill_dir: dir.path().join("spill").display().to_string(),
        ..Default::default()
    };
    let r = bench::store::store(
        &cfg,
        3_000,
        100,
        Duration::from_secs(1),
        0,
        CancellationToken::new(),
        false,
    )
    .await
    .expect("store opens");
    let json = r.to_json();
    let written = json["replies"].as_u64().expect("written");
    assert!((2_500..=3_100).contains(&written), "{json}");
    assert_eq!(json["errors"], serde_json::json!({}), "{json}");
    let mut db = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
        .await
        .expect("open");
    let (rows,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM weather_requests")
        .fetch_one(&mut db)
        .await
        .expect("count");
    assert_eq!(rows as u64, written, "the report counts rows in the table");
}

/// Runs the `gale` binary's bench with `args`, returns its JSON report.
async fn gale_bench(args: &[&str]) -> serde_json::Value {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_gale"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .await
        .expect("gale runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON report")
}

#[tokio::test]
async fn connections_spread_over_worker_processes_are_merged_and_weighed() {
    let server = start_with(|_| {}).await;
    let url = server.ws_url();
    let json = gale_bench(&[
        "connections",
        &url,
        "-n",
        "30",
        "--procs",
        "3",
        "--sources",
        "2",
        "--hold",
        "1",
    ])
    .await;
    assert_eq!(json["connected"], 30, "{json}");
    assert_eq!(json["latency_ms"]["samples"], 30, "{json}");
    assert!(json["server_kib_per_connection"].is_number(), "{json}");
    assert_eq!(
        server.metric("connections").await,
        0,
        "released after weighing"
    );
}

#[tokio::test]
async fn broadcast_spread_over_worker_processes_counts_every_delivery() {
    let server = start_with(|c| c.api.key = Some(KEY.into())).await;
    let url = server.ws_url();
    let json = gale_bench(&[
        "broadcast",
        &url,
        "-n",
        "16",
        "--procs",
        "2",
        "--messages",
        "5",
        "--rate",
        "0",
        "--api-key",
        KEY,
        "--idle-ms",
        "1000",
    ])
    .await;
    assert_eq!(json["connected"], 16, "{json}");
    assert_eq!(json["replies"], 80, "16 x 5: {json}");
    assert_eq!(json["missed deliveries"], 0, "{json}");
    assert_eq!(json["latency_ms"]["samples"], 80, "{json}");
}

#[tokio::test]
async fn a_deflate_broadcast_inflates_every_delivery_and_compresses_each_message_once() {
    let server = start_with(|c| c.api.key = Some(KEY.into())).await;
    let url = server.ws_url();
    let json = gale_bench(&[
        "broadcast",
        &url,
        "-n",
        "12",
        "--procs",
        "2",
        "--messages",
        "4",
        "--rate",
        "0",
        "--size",
        "2000",
        "--api-key",
        KEY,
        "--idle-ms",
        "1000",
        "--deflate",
    ])
    .await;
    assert_eq!(json["connected"], 12, "{json}");
    assert_eq!(json["replies"], 48, "12 x 4, every one inflated: {json}");
    assert_eq!(json["missed deliveries"], 0, "{json}");
    assert_eq!(
        server.sample("gale_compressed_connections_total").await,
        12.0
    );
    assert_eq!(
        server.sample("gale_compressed_messages_total").await,
        4.0,
        "each push compressed once for its 12 recipients"
    );
}

#[tokio::test]
async fn deflate_connections_fail_where_the_server_does_not_compress() {
    let server = start_with(|c| c.server.compression = gale::config::Compression::Off).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_gale"))
        .args([
            "bench",
            "connections",
            &server.ws_url(),
            "-n",
            "3",
            "--hold",
            "0",
            "--deflate",
            "--json",
        ])
        .output()
        .await
        .expect("gale runs");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON report");
    assert_eq!(json["connected"], 0, "{json}");
    let errors = json["errors"].to_string();
    assert!(
        errors.contains("did not agree to permessage-deflate"),
        "{json}"
    );
}

#[tokio::test]
async fn echo_mode_matches_every_text_sent_back() {
    let server = start_with(|c| c.server.echo = true).await;
    let url = format!("ws://{}/echo", server.addr);
    let target = Target::new(&url, 1).expect("target");
    let mut o = options(3, 1);
    o.ask = Ask::Echo;
    o.window = 8;
    o.per_connection = 50;
    let r = bench::requests(target, o, CancellationToken::new(), false).await;
    let json = r.to_json();
    assert_eq!(json["replies"], 150, "3 x 50 echoed: {json}");
    assert_eq!(json["errors"], serde_json::json!({}), "{json}");
    // The same texts on /ws get weather replies, which echo mode cannot
    // match: proof that it checks what comes back.
    let target = Target::new(&server.ws_url(), 1).expect("target");
    let mut o = options(1, 1);
    o.ask = Ask::Echo;
    o.per_connection = 1;
    o.reply_timeout = Duration::from_millis(500);
    let r = bench::requests(target, o, CancellationToken::new(), false).await;
    assert_eq!(r.to_json()["replies"], 0);
}

#[tokio::test]
async fn server_cpu_per_reply_is_reported_given_its_pid() {
    // The server runs in this test process: its pid is ours.
    let server = start_with(|c| c.server.echo = true).await;
    let url = format!("ws://{}/echo", server.addr);
    let pid = std::process::id().to_string();
    let json = gale_bench(&[
        "requests",
        &url,
        "--echo",
        "-n",
        "4",
        "-d",
        "1",
        "--server-pid",
        &pid,
    ])
    .await;
    assert!(json["replies"].as_u64().expect("replies") > 100, "{json}");
    let per = json["server_cpu_us_per_reply"].as_f64().expect("per reply");
    assert!(per > 0.0, "{json}");
    assert!(json["server_cpu_percent"].as_f64().expect("percent") > 0.0);
}
