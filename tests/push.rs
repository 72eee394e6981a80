//! Push: the publish API to users, topics and everyone; topic and weather
//! subscriptions; a client that never reads stays within its bound.

mod common;

use std::time::Duration;

use common::{Client, TestServer, WAIT, publish, quiet, start_with};
use gale::config::Config;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const API_KEY: &str = "publish-key-0123456789";
const SECRET: &str = "push-test-secret";

fn push_config(c: &mut Config) {
    c.api.key = Some(API_KEY.into());
    c.auth.jwt_secret = Some(SECRET.into());
}

/// The backplane a push test runs on: the same assertions hold for the
/// single-node default and for a node in cluster mode, whose pushes also
/// go through Redis (and come back to it, to be ignored).
enum Backplane {
    Local,
    Redis {
        url: String,
        prefix: String,
        _server: common::services::Redis,
    },
}

impl Backplane {
    /// Cluster mode on a private Redis of the test's own.
    fn redis() -> Backplane {
        let server = common::services::Redis::start();
        let prefix = format!("p{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        Backplane::Redis {
            url: server.url(),
            prefix,
            _server: server,
        }
    }

    fn configure(&self, c: &mut Config) {
        push_config(c);
        if let Backplane::Redis { url, prefix, .. } = self {
            c.cluster.redis_url = Some(url.clone());
            c.cluster.prefix = prefix.clone();
            c.cluster.probe_interval_ms = 200;
        }
    }
}

async fn user(server: &TestServer, sub: &str) -> Client {
    server
        .client_with_token(&common::hs256_token(SECRET, sub, json!([])))
        .await
}

async fn push_to_a_user_reaches_all_their_connections_on(backplane: Backplane) {
    let server = start_with(|c| backplane.configure(c)).await;
    let mut tab1 = user(&server, "alice").await;
    let mut tab2 = user(&server, "alice").await;
    let mut bob = user(&server, "bob").await;
    server.wait_metric("users", 2).await;

    let (status, body) = publish(
        &server,
        Some(API_KEY),
        r#"{"event":"note.shared","data":{"id":7},"users":["alice"]}"#,
    )
    .await;
    assert_eq!((status, &body["reached"]), (200, &json!(2)), "{body}");
    for tab in [&mut tab1, &mut tab2] {
        assert_eq!(
            tab.next_push().await,
            json!({"event":"note.shared","data":{"id":7}})
        );
    }
    quiet(&mut bob).await;

    let (_, body) = publish(
        &server,
        Some(API_KEY),
        r#"{"event":"hi","users":["alice","bob","alice"]}"#,
    )
    .await;
    assert_eq!(body["reached"], 3, "each connection once");
}

async fn topics_subscribe_unsubscribe_and_end_with_the_connection_on(backplane: Backplane) {
    let server = start_with(|c| backplane.configure(c)).await;
    let mut a = server.client().await;
    let mut b = server.client().await;
    a.subscribe("news").await;

    let (_, body) = publish(
        &server,
        Some(API_KEY),
        r#"{"event":"headline","data":"x","topic":"news"}"#,
    )
    .await;
    assert_eq!(body["reached"], 1);
    assert_eq!(a.next_push().await["event"], "headline");
    quiet(&mut b).await;

    let r = a
        .request("topic.unsubscribe", json!({"topic": "news"}), "u")
        .await;
    assert_eq!(r["data"]["unsubscribed"], true);
    let (_, body) = publish(
        &server,
        Some(API_KEY),
        r#"{"event":"headline","topic":"news"}"#,
    )
    .await;
    assert_eq!(body["reached"], 0);

    b.request("topic.subscribe", json!({"topic": "news"}), "s2")
        .await;
    drop(b);
    server.wait_metric("connections", 1).await;
    let (_, body) = publish(
        &server,
        Some(API_KEY),
        r#"{"event":"headline","topic":"news"}"#,
    )
    .await;
    assert_eq!(
        body["reached"], 0,
        "the subscription ended with the connection"
    );
    assert_eq!(server.metric("topics").await, 0);

    let r = a
        .request("topic.subscribe", json!({"topic": "weather:paris"}), "w")
        .await;
    assert_eq!(r["error"]["code"], "invalid_data", "reserved prefix: {r}");
}

async fn broadcast_reaches_everyone_with_the_same_bytes_on(backplane: Backplane) {
    let server = start_with(|c| backplane.configure(c)).await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(server.client().await);
    }
    let (status, body) = publish(
        &server,
        Some(API_KEY),
        r#"{"event":"maintenance","data":{"in_s":60},"broadcast":true}"#,
    )
    .await;
    assert_eq!((status, body["reached"].as_u64()), (200, Some(20)));
    for c in &mut clients {
        assert_eq!(
            c.next_push().await,
            json!({"event":"maintenance","data":{"in_s":60}})
        );
    }
}

/// Delivery reuses a topic's (and everyone's) list of recipients between
/// publications: every join and leave in between must still change who
/// receives the next one.
async fn who_receives_follows_each_change_between_publications_on(backplane: Backplane) {
    let server = start_with(|c| backplane.configure(c)).await;
    let to_topic = r#"{"event":"t","topic":"room"}"#;
    let to_all = r#"{"event":"all","broadcast":true}"#;
    let mut a = server.client().await;
    let mut b = server.client().await;
    a.subscribe("room").await;
    for _ in 0..2 {
        assert_eq!(publish(&server, Some(API_KEY), to_topic).await.0, 200);
        assert_eq!(a.next_push().await["event"], "t");
    }
    quiet(&mut b).await;

    b.subscribe("room").await;
    publish(&server, Some(API_KEY), to_topic).await;
    assert_eq!(a.next_push().await["event"], "t");
    assert_eq!(
        b.next_push().await["event"],
        "t",
        "a join is heard next time"
    );

    let r = a
        .request("topic.unsubscribe", json!({"topic": "room"}), "u")
        .await;
    assert_eq!(r["data"]["unsubscribed"], true);
    publish(&server, Some(API_KEY), to_topic).await;
    assert_eq!(b.next_push().await["event"], "t");
    quiet(&mut a).await;

    publish(&server, Some(API_KEY), to_all).await;
    for c in [&mut a, &mut b] {
        assert_eq!(c.next_push().await["event"], "all");
    }
    let mut c = server.client().await;
    publish(&server, Some(API_KEY), to_all).await;
    for c in [&mut a, &mut b, &mut c] {
        assert_eq!(c.next_push().await["event"], "all", "a new connection too");
    }
    drop(b);
    server.wait_metric("connections", 2).await;
    let (_, body) = publish(&server, Some(API_KEY), to_all).await;
    assert_eq!(body["reached"], 2, "{body}");
    for c in [&mut a, &mut c] {
        assert_eq!(c.next_push().await["event"], "all");
    }
    let (_, body) = publish(&server, Some(API_KEY), to_topic).await;
    assert_eq!(
        body["reached"], 0,
        "the topic ended with its last subscriber"
    );
    quiet(&mut a).await;
}

#[tokio::test]
async fn publish_api_refuses_clearly() {
    let off = common::start().await;
    assert_eq!(
        publish(&off, Some(API_KEY), r#"{"event":"e","broadcast":true}"#)
            .await
            .0,
        404
    );

    let server = start_with(push_config).await;
    assert_eq!(
        publish(&server, None, r#"{"event":"e","broadcast":true}"#)
            .await
            .0,
        401
    );
    assert_eq!(
        publish(
            &server,
            Some("wrong-key-wrong-key"),
            r#"{"event":"e","broadcast":true}"#
        )
        .await
        .0,
        401
    );
    // The scheme is case-insensitive (RFC 7235).
    let mut ok = 0;
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let mut s = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("connect");
        let body = r#"{"event":"e","broadcast":true}"#;
        let req = format!(
            "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: {scheme} {API_KEY}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.expect("read");
        if String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200") {
            ok += 1;
        }
    }
    assert_eq!(ok, 3, "bearer, BEARER and Bearer are one scheme");
    for (body, words) in [
        ("not json", "not JSON"),
        (r#"{"event":"e"}"#, "target"),
        (r#"{"broadcast":true}"#, "event"),
        (r#"{"event":"e","topic":"t","users":["a"]}"#, "exactly one"),
    ] {
        let (status, reply) = publish(&server, Some(API_KEY), body).await;
        assert_eq!(status, 400, "{body}");
        let message = reply["error"].as_str().expect("error message");
        assert!(
            message.contains(words),
            "{body}: {message:?} should say {words:?}"
        );
    }
}

#[tokio::test]
async fn weather_subscribers_share_one_refresh_loop() {
    let server = start_with(|c| {
        c.weather.cache_ttl_s = 1;
        c.weather.refresh_s = 1;
    })
    .await;
    let mut subs = Vec::new();
    for i in 0..30 {
        let mut c = server.client().await;
        let r = c
            .request(
                "weather.subscribe",
                json!({"city": "Paris"}),
                &format!("s{i}"),
            )
            .await;
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["data"]["city"], "Paris");
        subs.push(c);
    }
    let calls_at_subscribe = server.fake.calls();
    assert_eq!(
        calls_at_subscribe, 1,
        "one lookup served all 30 subscriptions"
    );
    // The fake's readings never change: a refresh is pushed all the same
    // (the documented choice; updated_at moves).
    for c in &mut subs {
        let push = c.next_push().await;
        assert_eq!(push["event"], "weather.update");
        assert_eq!(push["data"]["city"], "Paris");
        assert!(push["data"]["updated_at"].is_string());
    }
    // Roughly one upstream call per refresh, not one per subscriber.
    let calls = server.fake.calls();
    assert!(
        calls <= 4,
        "{calls} upstream calls for 30 subscribers over a few refreshes"
    );

    for (i, c) in subs.iter_mut().enumerate() {
        let r = c
            .request(
                "weather.unsubscribe",
                json!({"city": "paris"}),
                &format!("u{i}"),
            )
            .await;
        assert_eq!(r["data"]["unsubscribed"], true);
    }
    let mut c = server.client().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stats = c.request("server.stats", Value::Null, "st").await;
        if stats["data"]["weather-feeds"] == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "feed never stopped");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_client_that_never_reads_stays_within_its_outbound_bound() {
    let server = start_with(|c| {
        push_config(c);
        c.connection.outbound_queue = 16;
    })
    .await;
    let mut stuck = server.client().await;
    stuck
        .request("topic.subscribe", json!({"topic": "firehose"}), "s")
        .await;
    let mut reader = server.client().await;
    reader
        .request("topic.subscribe", json!({"topic": "firehose"}), "s")
        .await;
    // From here `stuck` does not read. 64 KiB pushes fill the socket
    // buffers quickly; after that its outbox holds at most 16 and drops
    // the oldest.
    let pad = "x".repeat(64 * 1024);
    let reading = tokio::spawn(async move {
        for n in 0..200 {
            let push = reader.next_push().await;
            assert_eq!(push["data"]["n"], n, "the reader gets every push, in order");
        }
    });
    let mut most_queued = 0;
    for n in 0..200 {
        let body = json!({"event": "blob", "data": {"n": n, "pad": pad}, "topic": "firehose"});
        assert_eq!(
            publish(&server, Some(API_KEY), &body.to_string()).await.0,
            200
        );
        most_queued = most_queued.max(server.metric("outbound-queued").await);
    }
    reading
        .await
        .expect("the reading client got all 200, undelayed by the stuck one");
    assert!(most_queued <= 32, "two outboxes of 16 held {most_queued}");

    // Now the stuck client reads what reached it: the newest pushes, in
    // order; every other push was dropped and counted.
    let mut got = Vec::new();
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(
        Duration::from_millis(500),
        futures_util::StreamExt::next(&mut stuck.ws),
    )
    .await
    {
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).expect("json");
            got.push(v["data"]["n"].as_u64().expect("n"));
        }
    }
    let dropped = server.metric("outbound-dropped").await;
    assert!(dropped > 0, "{got:?}");
    assert_eq!(
        got.len() as u64 + dropped,
        200,
        "delivered or counted: {got:?}"
    );
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order: {got:?}");
    assert_eq!(got.last(), Some(&199), "the newest are kept");
    assert_eq!(server.metric("outbound-queued").await, 0);
}

#[tokio::test]
async fn pushes_to_idle_connections_are_written_at_once_in_order_between_replies() {
    let server = start_with(push_config).await;
    // Five plain subscribers: a batch of pushes to them is one run.
    let mut subs = Vec::new();
    for _ in 0..5 {
        let mut c = server.client().await;
        c.subscribe("news").await;
        subs.push(c);
    }
    let direct = server.sample("gale_outbound_direct_total").await;
    let out = server.sample("gale_messages_out_total").await;
    let mut pushes = 0;
    for round in 0..10 {
        // A batch of four publications, then one more on its own.
        let data: Vec<String> = (0..5).map(|i| format!("{round}-{i}")).collect();
        let commands: Vec<Value> = data[..4]
            .iter()
            .map(|d| json!({"method": "publish", "params": {"event": "e", "topic": "news", "data": d}}))
            .collect();
        let batch = json!({ "commands": commands }).to_string();
        let (status, _) = common::api_post(server.addr, Some(API_KEY), "batch", &batch).await;
        assert_eq!(status, 200);
        let one = json!({"event": "e", "topic": "news", "data": data[4]}).to_string();
        assert_eq!(publish(&server, Some(API_KEY), &one).await.0, 200);
        pushes += 5 * data.len();
        for c in &mut subs {
            for d in &data {
                assert_eq!(c.next_push().await["data"], d.as_str(), "in order");
            }
        }
        // A request between pushes: the task writes its reply itself and
        // lends the socket again; the next round's pushes still arrive.
        let r = subs[round % 5]
            .request(
                "topic.subscribe",
                json!({"topic": format!("t{round}")}),
                "r",
            )
            .await;
        assert_eq!(r["ok"], true, "{r}");
    }
    // Written by the delivery task into the idle sockets, not queued
    // (all but a push that raced a task taking its socket back).
    let written = server.sample("gale_outbound_direct_total").await - direct;
    assert!(
        written >= pushes as f64 / 2.0,
        "{written} of {pushes} pushes written at once"
    );
    assert!(server.sample("gale_messages_out_total").await - out >= pushes as f64 + 10.0);
    assert_eq!(server.metric("outbound-queued").await, 0);
}

/// A push an idle socket took only part of is not written whole: the end
/// of its frame waits for the connection's task. The publication after
/// such a batch waits for the window, as after any batch left to the
/// connections' tasks (when a begun frame counted as written, it went at
/// once, alone, and the one after it waited instead).
#[tokio::test]
async fn a_push_a_socket_took_only_part_of_does_not_pass_for_one_written_whole() {
    let server = start_with(|c| {
        push_config(c);
        // The longest window: what follows the big push must reach the
        // server within it, however loaded the machine.
        c.broadcast.batch_window_ms = 1_000;
        c.broadcast.batch_size = 1_000;
        c.server.send_buffer_bytes = 16_384;
    })
    .await;
    // A client whose kernel takes 4 KiB, and that reads nothing after
    // subscribing; the server's send buffer 16 KiB.
    let mut slow = common::raw::Raw::connect_small(server.addr, "/ws", 4096).await;
    let sub = json!({"event": "topic.subscribe", "data": {"topic": "news"}, "ref": "s"});
    slow.text(&sub.to_string()).await;
    let (_, reply) = slow.next_json().await; // after the greeting
    assert_eq!(reply["ok"], true, "{reply}");
    // Idle: its task has lent the socket for pushes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let direct = server.sample("gale_outbound_direct_total").await;

    // 900 KB into a socket that takes a few KiB: a frame begun, its end
    // left to the task.
    let big = json!({"event": "e", "topic": "news", "data": "x".repeat(900_000)}).to_string();
    assert_eq!(publish(&server, Some(API_KEY), &big).await.0, 200);
    server.wait_metric("pushes", 1).await;
    assert_eq!(
        server.sample("gale_outbound_direct_total").await - direct,
        1.0,
        "begun by the delivery task in the lent socket"
    );

    // Two more, one after the other, within the window of that batch.
    let batches = server.sample("gale_broadcast_batch_count").await;
    for d in ["a", "b"] {
        let one = json!({"event": "e", "topic": "news", "data": d}).to_string();
        assert_eq!(publish(&server, Some(API_KEY), &one).await.0, 200);
    }
    server.wait_metric("pushes", 3).await;
    assert_eq!(
        server.sample("gale_broadcast_batch_count").await - batches,
        1.0,
        "a waited for the window and b joined it"
    );
}

/// More subscribers than the fan-out from which the writes into idle
/// sockets move the core's other tasks aside: every one gets every push,
/// in order, written at once. Lone publications first, each delivered
/// before the next (one push per connection each: the fan-outs helper
/// threads take chunks of), at least three and, `until_helped`, until a
/// helper has taken a chunk (at most 20); then three at once. Returns how
/// many chunks helper threads wrote (`broadcast.fanout_threads`).
async fn a_crowd_gets_every_push_written_at_once(
    fanout_threads: gale::config::Threads,
    until_helped: bool,
) -> f64 {
    const CROWD: usize = 1_100;
    common::open_files(4 * CROWD as u64 + 1_000);
    let server = start_with(|c| {
        push_config(c);
        c.broadcast.fanout_threads = fanout_threads;
    })
    .await;
    let mut subs = Vec::with_capacity(CROWD);
    for _ in 0..CROWD {
        let mut c = server.client().await;
        c.subscribe("crowd").await;
        subs.push(c);
    }
    // Idle: every task has lent its socket for pushes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let direct = server.sample("gale_outbound_direct_total").await;
    let publish_one = |i: usize| {
        let body = json!({"event": "e", "topic": "crowd", "data": i}).to_string();
        let server = &server;
        async move {
            let (status, reply) = publish(server, Some(API_KEY), &body).await;
            assert_eq!(status, 200, "{reply}");
        }
    };
    let mut lone = 0;
    while lone < 3
        || (until_helped && lone < 20 && server.sample("gale_fanout_helped_total").await == 0.0)
    {
        publish_one(lone).await;
        lone += 1;
        server.wait_metric("pushes", (CROWD * lone) as u64).await;
    }
    // Every chunk, the helpers' too, written into the sockets, not queued
    // (a connection or two may be writing something of its own).
    let written = server.sample("gale_outbound_direct_total").await - direct;
    assert!(
        written >= 0.98 * (lone * CROWD) as f64,
        "{written} of {} written at once",
        lone * CROWD
    );
    for i in lone..lone + 3 {
        publish_one(i).await;
    }
    for c in &mut subs {
        for i in 0..lone + 3 {
            assert_eq!(c.next_push().await["data"], i, "in order");
        }
    }
    server.sample("gale_fanout_helped_total").await
}

// Where nothing can be moved aside: the writes are done in place, by the
// delivering thread alone.
#[tokio::test]
async fn a_crowd_gets_every_push_on_a_current_thread_runtime() {
    let helped = a_crowd_gets_every_push_written_at_once(gale::config::Threads::Auto, false).await;
    assert_eq!(helped, 0.0);
}

// Two workers: one helper thread takes chunks of the lone pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_gets_every_push_on_a_multi_threaded_runtime() {
    let helped = a_crowd_gets_every_push_written_at_once(gale::config::Threads::Auto, true).await;
    assert!(helped >= 1.0, "{helped} chunks written by a helper");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_gets_every_push_without_fanout_threads() {
    let helped =
        a_crowd_gets_every_push_written_at_once(gale::config::Threads::Count(0), false).await;
    assert_eq!(helped, 0.0);
}

/// A client with a small receive buffer, subscribed to `topic`: while it
/// does not read, the server's socket cannot take large pushes whole.
async fn small_window_subscriber(server: &TestServer, topic: &str) -> Client {
    let tcp = tokio::net::TcpSocket::new_v4().expect("socket");
    tcp.set_recv_buffer_size(4096).expect("rcvbuf");
    let tcp = tcp.connect(server.addr).await.expect("connect");
    let mut sub = Client::over(&server.ws_url(), tcp).await.greeted().await;
    sub.subscribe(topic).await;
    sub
}

#[tokio::test]
async fn a_push_the_socket_takes_only_part_of_arrives_whole_without_another_write() {
    let server = start_with(push_config).await;
    // Pushes of 900 KB written at once into an idle socket whose client
    // does not read yet: the first few are taken whole, then one only in
    // part, its end left to the connection's task. When that one is the
    // last, nothing else is queued behind it, and its end must still go
    // out at once, not at the next push, reply or ping. Which push it is
    // depends on the kernel's buffers: each count in turn is the last.
    for n in 1..=8 {
        let topic = format!("big{n}");
        let mut sub = small_window_subscriber(&server, &topic).await;
        let direct = server.sample("gale_outbound_direct_total").await;
        for i in 0..n {
            let data = format!("{i}{}", "y".repeat(900_000));
            let body = json!({"event": "blob", "data": data, "topic": topic}).to_string();
            assert_eq!(publish(&server, Some(API_KEY), &body).await.0, 200);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for i in 0..n {
            let push = tokio::time::timeout(Duration::from_secs(3), sub.next_push())
                .await
                .unwrap_or_else(|_| panic!("push {i} of {n} never arrived whole"));
            let data = push["data"].as_str().expect("data");
            assert!(data.starts_with(&i.to_string()) && data.len() > 900_000);
        }
        assert!(server.sample("gale_outbound_direct_total").await > direct);
    }
}

#[tokio::test]
async fn with_slow_consumer_close_a_client_that_never_reads_gets_1013() {
    let server = start_with(|c| {
        push_config(c);
        c.connection.outbound_queue = 4;
        c.connection.slow_consumer = gale::config::SlowConsumer::Close;
    })
    .await;
    let mut stuck = server.client().await;
    stuck
        .request("topic.subscribe", json!({"topic": "firehose"}), "s")
        .await;
    let body =
        json!({"event": "blob", "data": "x".repeat(64 * 1024), "topic": "firehose"}).to_string();
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.metric("slow-consumers").await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never judged slow");
        assert_eq!(publish(&server, Some(API_KEY), &body).await.0, 200);
    }
    // It reads at last: what was already on its way, then the close.
    let frame = stuck.expect_close().await;
    assert_eq!(u16::from(frame.code), 1013);
    assert_eq!(frame.reason.as_str(), "slow consumer");
    server.wait_metric("connections", 0).await;
}

async fn lifecycle_events_reach_application_hooks_not_the_wire_on(backplane: Backplane) {
    use gale::broadcast::SystemEvent;
    let server = start_with(|c| backplane.configure(c)).await;
    let mut hooks = server.app.hub.system_events();
    let tab1 = user(&server, "gina").await;
    let tab2 = user(&server, "gina").await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(
            tokio::time::timeout(WAIT, hooks.recv())
                .await
                .expect("event")
                .expect("recv"),
        );
    }
    assert!(matches!(&seen[0], SystemEvent::Opened { user: Some(u), .. } if &**u == "gina"));
    assert_eq!(
        seen[1],
        SystemEvent::UserOnline("gina".into()),
        "first connection only"
    );
    assert!(matches!(&seen[2], SystemEvent::Opened { .. }));
    drop(tab2);
    assert!(matches!(
        tokio::time::timeout(WAIT, hooks.recv())
            .await
            .expect("event")
            .expect("recv"),
        SystemEvent::Closed { .. }
    ));
    drop(tab1.ws);
    let mut last = Vec::new();
    for _ in 0..2 {
        last.push(
            tokio::time::timeout(WAIT, hooks.recv())
                .await
                .expect("event")
                .expect("recv"),
        );
    }
    assert_eq!(
        last[1],
        SystemEvent::UserOffline("gina".into()),
        "last connection gone"
    );

    // Application code can push too, and nothing of the above was sent
    // on the wire to other clients.
    let mut other = server.client().await;
    let reached = server
        .app
        .hub
        .send_now(
            &gale::broadcast::Target::Everyone,
            "hello",
            &json!({"from": "app"}),
        )
        .expect("small enough");
    assert_eq!(reached, 1);
    assert_eq!(
        other.next_push().await,
        json!({"event":"hello","data":{"from":"app"}})
    );
}

async fn pushes_of_100_kb_reach_their_subscriber_on(backplane: Backplane) {
    let server = start_with(|c| backplane.configure(c)).await;
    let mut sub = server.client().await;
    sub.request("topic.subscribe", json!({"topic": "big"}), "s")
        .await;
    let body = json!({"event": "blob", "data": "x".repeat(100_000), "topic": "big"}).to_string();
    for _ in 0..3 {
        let (status, reply) = publish(&server, Some(API_KEY), &body).await;
        assert_eq!((status, &reply["reached"]), (200, &json!(1)), "{reply}");
    }
    for _ in 0..3 {
        let push = sub.next_push().await;
        assert_eq!(push["data"].as_str().map(str::len), Some(100_000));
    }
    let r = sub.request("server.stats", Value::Null, "after").await;
    assert_eq!(r["ok"], true, "the connection is still open: {r}");
}

async fn a_push_too_big_to_send_is_refused_at_the_api_with_413_on(backplane: Backplane) {
    let server = start_with(|c| backplane.configure(c)).await;
    let limit = server.app.config.server.max_outbound_message_bytes;
    let mut sub = server.client().await;
    sub.request("topic.subscribe", json!({"topic": "big"}), "s")
        .await;
    // A body under the body limit whose push would not be: numbers that
    // re-encode longer (9e15 is sent as 9000000000000000.0).
    let numbers = vec!["9e15"; limit / 10].join(",");
    let body = format!(r#"{{"event":"n","topic":"big","data":[{numbers}]}}"#);
    assert!(body.len() < limit, "{}", body.len());
    let (status, reply) = publish(&server, Some(API_KEY), &body).await;
    assert_eq!(status, 413, "{reply}");
    let message = reply["error"].as_str().expect("error");
    assert!(message.contains("max_outbound_message_bytes"), "{message}");

    // A body over the body limit.
    let huge = json!({"event": "n", "topic": "big", "data": "x".repeat(3 * limit)}).to_string();
    let (status, reply) = publish(&server, Some(API_KEY), &huge).await;
    assert_eq!(status, 413, "{reply}");
    assert!(reply["error"].is_string(), "a JSON error: {reply}");

    // The subscriber never noticed.
    let (status, _) = publish(&server, Some(API_KEY), r#"{"event":"small","topic":"big"}"#).await;
    assert_eq!(status, 200);
    assert_eq!(sub.next_push().await["event"], "small");
    assert_eq!(server.metric("connections").await, 1);
}

#[tokio::test]
async fn push_to_a_user_reaches_all_their_connections() {
    push_to_a_user_reaches_all_their_connections_on(Backplane::Local).await;
}

#[tokio::test]
async fn push_to_a_user_reaches_all_their_connections_over_redis() {
    {
        let b = Backplane::redis();
        push_to_a_user_reaches_all_their_connections_on(b).await;
    }
}

#[tokio::test]
async fn topics_subscribe_unsubscribe_and_end_with_the_connection() {
    topics_subscribe_unsubscribe_and_end_with_the_connection_on(Backplane::Local).await;
}

#[tokio::test]
async fn topics_subscribe_unsubscribe_and_end_with_the_connection_over_redis() {
    {
        let b = Backplane::redis();
        topics_subscribe_unsubscribe_and_end_with_the_connection_on(b).await;
    }
}

#[tokio::test]
async fn broadcast_reaches_everyone_with_the_same_bytes() {
    broadcast_reaches_everyone_with_the_same_bytes_on(Backplane::Local).await;
}

#[tokio::test]
async fn broadcast_reaches_everyone_with_the_same_bytes_over_redis() {
    {
        let b = Backplane::redis();
        broadcast_reaches_everyone_with_the_same_bytes_on(b).await;
    }
}

#[tokio::test]
async fn who_receives_follows_each_change_between_publications() {
    who_receives_follows_each_change_between_publications_on(Backplane::Local).await;
}

#[tokio::test]
async fn who_receives_follows_each_change_between_publications_over_redis() {
    who_receives_follows_each_change_between_publications_on(Backplane::redis()).await;
}

#[tokio::test]
async fn lifecycle_events_reach_application_hooks_not_the_wire() {
    lifecycle_events_reach_application_hooks_not_the_wire_on(Backplane::Local).await;
}

#[tokio::test]
async fn lifecycle_events_reach_application_hooks_not_the_wire_over_redis() {
    {
        let b = Backplane::redis();
        lifecycle_events_reach_application_hooks_not_the_wire_on(b).await;
    }
}

#[tokio::test]
async fn pushes_of_100_kb_reach_their_subscriber() {
    pushes_of_100_kb_reach_their_subscriber_on(Backplane::Local).await;
}

#[tokio::test]
async fn pushes_of_100_kb_reach_their_subscriber_over_redis() {
    {
        let b = Backplane::redis();
        pushes_of_100_kb_reach_their_subscriber_on(b).await;
    }
}

#[tokio::test]
async fn a_push_too_big_to_send_is_refused_at_the_api_with_413() {
    a_push_too_big_to_send_is_refused_at_the_api_with_413_on(Backplane::Local).await;
}

#[tokio::test]
async fn a_push_too_big_to_send_is_refused_at_the_api_with_413_over_redis() {
    {
        let b = Backplane::redis();
        a_push_too_big_to_send_is_refused_at_the_api_with_413_on(b).await;
    }
}

async fn presence_online_knows_this_nodes_users_on(backplane: Backplane) {
    let server = start_with(|c| backplane.configure(c)).await;
    let mut kim = user(&server, "kim").await;
    let _lee = user(&server, "lee").await;
    let r = kim
        .request("presence.online", json!({"users": ["lee", "max"]}), "p")
        .await;
    assert_eq!(
        r["data"],
        json!({"online": {"lee": true, "max": false}}),
        "{r}"
    );
}

#[tokio::test]
async fn presence_online_knows_this_nodes_users() {
    presence_online_knows_this_nodes_users_on(Backplane::Local).await;
}

#[tokio::test]
async fn presence_online_knows_this_nodes_users_over_redis() {
    {
        let b = Backplane::redis();
        presence_online_knows_this_nodes_users_on(b).await;
    }
}

/// A node-wide bound on topics has a share per client: one address
/// cannot take every topic, and the refusal says it was a limit.
#[tokio::test]
async fn one_address_cannot_take_every_topic_on_the_node() {
    let server = start_with(|c| {
        push_config(c);
        c.broadcast.max_topics = 100;
    })
    .await;
    let mut held = Vec::new();
    let mut c = server.client().await;
    let mut refused = None;
    for i in 0..100 {
        if i > 0 && i % 64 == 0 {
            held.push(std::mem::replace(&mut c, server.client().await));
        }
        let r = c
            .request(
                "topic.subscribe",
                json!({"topic": format!("mine{i}")}),
                &i.to_string(),
            )
            .await;
        if r["ok"] != true {
            refused = Some(r);
            break;
        }
    }
    let r = refused.expect("one address is refused before the node is full");
    assert_eq!(r["error"]["code"], "limit_exceeded", "{r}");

    let mut other = server.client_from("127.0.0.2").await;
    let r = other
        .request("topic.subscribe", json!({"topic": "theirs"}), "o")
        .await;
    assert_eq!(r["ok"], true, "another address still subscribes: {r}");
    let r = other
        .request("weather.subscribe", json!({"city": "Oslo"}), "w")
        .await;
    assert_eq!(r["ok"], true, "{r}");
}

#[tokio::test]
async fn a_connection_past_its_topic_limit_is_told_it_is_a_limit() {
    let server = start_with(push_config).await;
    let mut c = server.client().await;
    for i in 0..64 {
        let r = c
            .request(
                "topic.subscribe",
                json!({"topic": format!("t{i}")}),
                &i.to_string(),
            )
            .await;
        assert_eq!(r["ok"], true, "{r}");
    }
    let r = c
        .request("topic.subscribe", json!({"topic": "one-too-many"}), "x")
        .await;
    assert_eq!(r["error"]["code"], "limit_exceeded", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_topics_per_connection")),
        "{r}"
    );
}
