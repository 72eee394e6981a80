//! `gale bench` measures correctly: against a server whose latency is
//! known (the fake upstream's), it reports that latency and the matching
//! throughput; it counts errors by kind; it opens and holds connections.
//! No timing targets here: those live in docs/benchmarks.md.

mod common;

use std::time::Duration;

use common::start_with;
use gale::bench::{self, RequestsOptions, Target};
use tokio_util::sync::CancellationToken;

fn options(connections: usize, secs: u64) -> RequestsOptions {
    RequestsOptions {
        connections,
        duration: Duration::from_secs(secs),
        // Distinct cities: every request misses the cache and pays the
        // upstream's latency.
        cities: 1_000_000,
        window: 1,
        events: false,
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
    o.events = true;
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
    let r = bench::connections(
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
