//! Cluster mode: several real nodes against a real Redis, a private
//! `redis-server` of each test's own (`common::services`), or a Redis
//! Cluster of three of them.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::services::{Redis, free_port};
use common::{Client, TestServer, WAIT, publish, quiet, start_with};
use gale::config::Config;
use gale::fake_upstream::FakeUpstream;
use serde_json::{Value, json};

const API_KEY: &str = "cluster-publish-key-0123";
const SECRET: &str = "cluster-test-secret";
const GALE: &str = env!("CARGO_BIN_EXE_gale");

/// A key prefix no other test uses.
fn prefix() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

fn cluster(c: &mut Config, redis: &str, prefix: &str, node: &str, upstream: &str) {
    c.cluster.redis_url = Some(redis.to_owned());
    c.cluster.prefix = prefix.to_owned();
    c.cluster.node_id = Some(node.to_owned());
    c.cluster.presence_ttl_s = 3;
    c.cluster.probe_interval_ms = 200;
    c.weather.base_url = Some(upstream.to_owned());
    c.api.key = Some(API_KEY.to_owned());
    c.auth.jwt_secret = Some(SECRET.to_owned());
}

/// What most tests start from: a private Redis, a fresh prefix and a
/// fake upstream.
async fn setup() -> (Redis, String, FakeUpstream) {
    (Redis::start(), prefix(), upstream().await)
}

async fn upstream() -> FakeUpstream {
    FakeUpstream::start("127.0.0.1:0").await.expect("fake")
}

async fn node(redis: &str, prefix: &str, name: &str, upstream: &FakeUpstream) -> TestServer {
    node_with(redis, prefix, name, upstream, |_| {}).await
}

async fn node_with(
    redis: &str,
    prefix: &str,
    name: &str,
    upstream: &FakeUpstream,
    more: impl FnOnce(&mut Config),
) -> TestServer {
    start_with(|c| {
        cluster(c, redis, prefix, name, &upstream.url());
        more(c);
    })
    .await
}

async fn user(server: &TestServer, sub: &str) -> Client {
    server
        .client_with_token(&common::hs256_token(SECRET, sub, json!([])))
        .await
}

/// Waits until `cond` holds of the server's `/metrics.json`.
async fn wait_json(server: &TestServer, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let m = server.metrics().await;
        if cond(&m) {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: never true; metrics now {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The channels a node subscribes to besides its four own: `all`, its
/// probe, the commands to every node and the answers to its own.
async fn wait_channels(server: &TestServer, n: usize) {
    server
        .wait_sample("gale_cluster_channels", (n + 4) as f64)
        .await;
}

#[tokio::test]
async fn a_user_push_reaches_their_connections_on_every_node_once() {
    let (private, p, up) = setup().await;
    let redis = private.url();
    let a = node(&redis, &p, "a", &up).await;
    let b = node(&redis, &p, "b", &up).await;
    let c = node(&redis, &p, "c", &up).await;
    let mut alice_a = user(&a, "alice").await;
    let mut alice_b = user(&b, "alice").await;
    let mut bob_b = user(&b, "bob").await;
    wait_channels(&a, 1).await;
    wait_channels(&b, 2).await;
    wait_channels(&c, 0).await;

    // Published on c, which has no connection at all.
    let (status, body) = publish(
        &c,
        Some(API_KEY),
        r#"{"event":"note.shared","data":{"id":7},"users":["alice"]}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reached"], 0, "reached counts this node's connections");
    for tab in [&mut alice_a, &mut alice_b] {
        assert_eq!(
            tab.next_push().await,
            json!({"event":"note.shared","data":{"id":7}})
        );
        quiet(tab).await;
    }
    quiet(&mut bob_b).await;

    // From a, where alice also is: her tab there gets it once, not twice.
    let (_, body) = publish(
        &a,
        Some(API_KEY),
        r#"{"event":"hi","users":["alice","bob"]}"#,
    )
    .await;
    assert_eq!(body["reached"], 1);
    for tab in [&mut alice_a, &mut alice_b, &mut bob_b] {
        assert_eq!(tab.next_push().await["event"], "hi");
        quiet(tab).await;
    }
    // c received nothing: it has no recipients, so it subscribed to none.
    assert_eq!(c.sample("gale_cluster_received_total").await, 0.0);
}

/// `n` clients of `node` subscribed to "burst", once the node has
/// subscribed to its channel and is up.
async fn burst_subscribers(node: &TestServer, n: usize) -> Vec<Client> {
    let mut subs = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = node.client().await;
        c.subscribe("burst").await;
        subs.push(c);
    }
    wait_channels(node, 1).await;
    node.wait_sample("gale_cluster_up", 1.0).await;
    subs
}

/// Publishes pushes 0..n to "burst" through `node` in one request, so
/// they leave it back to back.
async fn publish_burst(node: &TestServer, n: usize) {
    let commands: Vec<Value> = (0..n)
        .map(
            |i| json!({"method": "publish", "params": {"event": "e", "topic": "burst", "data": i}}),
        )
        .collect();
    let body = json!({ "commands": commands }).to_string();
    let (status, reply) = common::api_post(node.addr, Some(API_KEY), "batch", &body).await;
    assert_eq!(status, 200, "{reply}");
}

/// A burst from another node that takes the receiving node longer to hand
/// out than its probe interval: its subscriber reads on meanwhile, so the
/// probe is not held up behind the burst; the node stays subscribed and
/// every push arrives, in order. On a multi-threaded runtime, as the
/// server runs: on one thread the handing out holds up everything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_longer_than_the_probe_interval_arrives_whole() {
    const SUBS: usize = 400;
    const PUSHES: usize = 400;
    common::open_files(4 * SUBS as u64 + 1_000);
    let (private, p, up) = setup().await;
    let redis = private.url();
    let a = node(&redis, &p, "a", &up).await;
    let b = node_with(&redis, &p, "b", &up, |c| c.cluster.probe_interval_ms = 200).await;
    let mut subs = burst_subscribers(&b, SUBS).await;
    let connects = b.sample("gale_cluster_subscriber_connects_total").await;
    let failures = b.sample("gale_cluster_probe_failures_total").await;
    publish_burst(&a, PUSHES).await;
    for c in &mut subs {
        for i in 0..PUSHES {
            assert_eq!(c.next_push().await["data"], i, "in order");
        }
    }
    assert_eq!(
        b.sample("gale_cluster_probe_failures_total").await,
        failures
    );
    b.wait_sample("gale_cluster_receive_queued", 0.0).await;
    assert_eq!(b.metric("cluster-lost").await, 0);
    assert_eq!(
        b.sample("gale_cluster_subscriber_connects_total").await,
        connects,
        "the subscriber was never reconnected"
    );
}

/// What arrives while the receiving node's queue is full is lost and
/// counted, not buffered: the rest arrives in order, the node stays
/// subscribed, and the next push arrives.
#[tokio::test]
async fn a_full_receive_queue_loses_counted_pushes_and_the_rest_arrive_in_order() {
    const SUBS: usize = 50;
    const PUSHES: usize = 400;
    let (private, p, up) = setup().await;
    let redis = private.url();
    let a = node(&redis, &p, "a", &up).await;
    let b = node_with(&redis, &p, "b", &up, |c| c.cluster.receive_queue = 1).await;
    let mut subs = burst_subscribers(&b, SUBS).await;
    let connects = b.sample("gale_cluster_subscriber_connects_total").await;
    let received = b.sample("gale_cluster_received_total").await;
    let lost = r#"gale_cluster_lost_total{reason="ReceiveQueueFull"}"#;
    publish_burst(&a, PUSHES).await;
    b.wait_sample("gale_cluster_received_total", received + PUSHES as f64)
        .await;
    b.wait_sample("gale_cluster_receive_queued", 0.0).await;
    let dropped = b.sample(lost).await as usize;
    assert!(dropped > 0, "a queue of one took a burst of {PUSHES} whole");
    assert!(dropped < PUSHES, "{dropped} of {PUSHES} lost");
    // Then one more, into an empty queue.
    let (status, _) = publish(&a, Some(API_KEY), r#"{"event":"end","topic":"burst"}"#).await;
    assert_eq!(status, 200);
    for c in &mut subs {
        let mut got = Vec::new();
        loop {
            let push = c.next_push().await;
            if push["event"] == "end" {
                break;
            }
            got.push(push["data"].as_u64().expect("data"));
        }
        assert_eq!(
            got.len(),
            PUSHES - dropped,
            "each push handed out reached everyone"
        );
        assert!(got.windows(2).all(|w| w[0] < w[1]), "in order");
    }
    assert_eq!(
        b.sample("gale_cluster_subscriber_connects_total").await,
        connects,
        "the subscriber was never reconnected"
    );
}

#[tokio::test]
async fn topic_and_everyone_pushes_cross_nodes_and_only_subscribed_nodes_receive() {
    let (private, p, up) = setup().await;
    let redis = private.url();
    let a = node(&redis, &p, "a", &up).await;
    let b = node(&redis, &p, "b", &up).await;
    let c = node(&redis, &p, "c", &up).await;
    let mut on_a = a.client().await;
    let mut on_b = b.client().await;
    let mut plain_b = b.client().await;
    on_a.subscribe("news").await;
    on_b.subscribe("news").await;
    wait_channels(&a, 1).await;
    wait_channels(&b, 1).await;

    let (status, _) = publish(
        &c,
        Some(API_KEY),
        r#"{"event":"headline","data":"x","topic":"news"}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(on_a.next_push().await["event"], "headline");
    assert_eq!(on_b.next_push().await["event"], "headline");
    quiet(&mut plain_b).await;

    // Everyone, from b: every connection on every node, once.
    let (_, body) = publish(
        &b,
        Some(API_KEY),
        r#"{"event":"all","data":1,"broadcast":true}"#,
    )
    .await;
    assert_eq!(body["reached"], 2);
    for cl in [&mut on_a, &mut on_b, &mut plain_b] {
        assert_eq!(cl.next_push().await["event"], "all");
        quiet(cl).await;
    }

    // Unsubscribed on a: a leaves the topic's channel.
    let reply = on_a
        .request("topic.unsubscribe", json!({"topic": "news"}), "u1")
        .await;
    assert_eq!(reply["ok"], true);
    wait_channels(&a, 0).await;
    let before = a.sample("gale_cluster_received_total").await;
    publish(&c, Some(API_KEY), r#"{"event":"late","topic":"news"}"#).await;
    assert_eq!(on_b.next_push().await["event"], "late");
    quiet(&mut on_a).await;
    assert_eq!(a.sample("gale_cluster_received_total").await, before);
}

#[tokio::test]
async fn presence_counts_the_cluster_and_a_clean_stop_leaves_it() {
    let (private, p, up) = setup().await;
    let redis = private.url();
    let a = node(&redis, &p, "a", &up).await;
    let mut b = node(&redis, &p, "b", &up).await;
    let _x = user(&a, "alice").await;
    let _y = user(&b, "alice").await;
    let _z = user(&b, "bob").await;
    let _anon = a.client().await;
    let m = wait_json(&a, "4 connections, 2 users on 2 nodes", |m| {
        m["cluster-nodes"] == 2 && m["cluster-connections"] == 4 && m["cluster-users"] == 2
    })
    .await;
    assert_eq!(m["cluster-node"], "a");
    assert_eq!(m["cluster-up"], true);
    let stats = {
        let mut cl = a.client().await;
        cl.request("server.stats", json!({}), "st").await
    };
    assert_eq!(stats["data"]["cluster-nodes"], 2, "{stats}");

    b.stop().await.expect("b stops cleanly");
    // Removed at once on a clean stop, not after the TTL.
    let started = tokio::time::Instant::now();
    wait_json(&a, "b gone", |m| {
        m["cluster-nodes"] == 1 && m["cluster-users"] == 1 && m["cluster-connections"] == 2
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// A node run as its own process, so a test can SIGKILL it.
struct Process {
    child: tokio::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Process {
    async fn start(redis: &str, prefix: &str, name: &str, upstream: &FakeUpstream) -> Process {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let child = tokio::process::Command::new(GALE)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env("GALE_CLUSTER__REDIS_URL", redis)
            .env("GALE_CLUSTER__PREFIX", prefix)
            .env("GALE_CLUSTER__NODE_ID", name)
            .env("GALE_CLUSTER__PRESENCE_TTL_S", "3")
            .env("GALE_CLUSTER__PROBE_INTERVAL_MS", "200")
            .env("GALE_WEATHER__BASE_URL", upstream.url())
            .env("GALE_WEATHER__REFRESH_S", "1")
            .env("GALE_WEATHER__CACHE_TTL_S", "1")
            .env("GALE_AUTH__JWT_SECRET", SECRET)
            .env(
                "GALE_STORE__URL",
                format!("sqlite://{}/g.db", dir.path().display()),
            )
            .env("GALE_STORE__SPILL_DIR", dir.path().join("spill"))
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn gale serve");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let deadline = tokio::time::Instant::now() + WAIT;
        while common::http_get(addr, "/healthz").await.map(|r| r.0) != Some(200) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} never came up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Process {
            child,
            addr,
            _dir: dir,
        }
    }

    async fn client(&self) -> Client {
        let mut c = Client::connect(&format!("ws://{}/ws", self.addr)).await;
        c.recv_json().await;
        c
    }

    async fn user(&self, sub: &str) -> Client {
        let token = common::hs256_token(SECRET, sub, json!([]));
        let mut c = Client::connect(&format!("ws://{}/ws?token={token}", self.addr)).await;
        c.recv_json().await;
        c
    }

    async fn kill(&mut self) {
        self.child.start_kill().expect("kill");
        let _ = self.child.wait().await;
    }
}

#[tokio::test]
async fn a_killed_node_leaves_presence_within_the_ttl() {
    let (private, p, up) = setup().await;
    let redis = private.url();
    let a = node(&redis, &p, "a", &up).await;
    let mut doomed = Process::start(&redis, &p, "doomed", &up).await;
    let _u = doomed.user("carol").await;
    let _v = doomed.client().await;
    wait_json(&a, "the process node counted", |m| {
        m["cluster-nodes"] == 2 && m["cluster-users"] == 1 && m["cluster-connections"] == 2
    })
    .await;
    doomed.kill().await;
    let killed = tokio::time::Instant::now();
    wait_json(&a, "the killed node expired", |m| {
        m["cluster-nodes"] == 1 && m["cluster-users"] == 0 && m["cluster-connections"] == 0
    })
    .await;
    // presence_ttl_s = 3, refreshed every second: gone within the TTL
    // (plus one sweep).
    assert!(
        killed.elapsed() <= Duration::from_secs(5),
        "{:?}",
        killed.elapsed()
    );
}

#[tokio::test]
async fn a_users_rate_limit_is_shared_by_their_connections_on_all_nodes() {
    let (private, p, up) = setup().await;
    let redis = private.url();
    let limit = |c: &mut Config| {
        c.events.insert(
            "server.stats".to_owned(),
            toml::from_str(r#"rate_limit = "3/min""#).expect("override"),
        );
    };
    let a = node_with(&redis, &p, "a", &up, limit).await;
    let b = node_with(&redis, &p, "b", &up, limit).await;
    let c = node_with(&redis, &p, "c", &up, limit).await;
    let mut tabs = [
        user(&a, "dave").await,
        user(&b, "dave").await,
        user(&c, "dave").await,
    ];
    let mut ok = 0;
    let mut limited = Vec::new();
    for i in 0..6 {
        let reply = tabs[i % 3]
            .request("server.stats", json!({}), &format!("r{i}"))
            .await;
        if reply["ok"] == true {
            ok += 1;
        } else {
            assert_eq!(reply["error"]["code"], "rate_limited", "{reply}");
            limited.push(i);
        }
    }
    assert_eq!(
        ok, 3,
        "one budget of 3 across three nodes; limited: {limited:?}"
    );
    // Another user has a budget of their own.
    let mut erin = user(&b, "erin").await;
    let reply = erin.request("server.stats", json!({}), "e").await;
    assert_eq!(reply["ok"], true);
    assert_eq!(
        a.sample("gale_cluster_fallbacks_total{what=\"RateLimit\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn a_city_costs_one_upstream_call_for_the_whole_cluster() {
    let (private, p, up) = setup().await;
    let redis = private.url();
    up.set_latency(Duration::from_millis(400));
    let nodes = [
        node(&redis, &p, "a", &up).await,
        node(&redis, &p, "b", &up).await,
        node(&redis, &p, "c", &up).await,
    ];
    // Three clients per node ask for Paris at the same moment.
    let mut asks = Vec::new();
    for n in &nodes {
        for _ in 0..3 {
            let mut cl = n.client().await;
            asks.push(tokio::spawn(async move { cl.ask("Paris").await }));
        }
    }
    for ask in asks {
        let reply = ask.await.expect("join");
        assert_eq!(reply["city"], "Paris", "{reply}");
    }
    assert_eq!(
        up.calls(),
        1,
        "concurrent misses on three nodes share one call"
    );
    // Later lookups on any node: from the shared cache.
    for n in &nodes {
        let mut cl = n.client().await;
        assert_eq!(cl.ask("paris").await["city"], "Paris");
    }
    assert_eq!(up.calls(), 1);
    let waits: f64 = {
        let mut total = 0.0;
        for n in &nodes {
            total += n.sample("gale_cluster_lease_waits_total").await;
        }
        total
    };
    assert!(waits >= 1.0, "the other nodes waited for the lease holder");
}

#[tokio::test]
async fn the_weather_refresh_lease_moves_when_its_holder_dies() {
    let (private, p, up) = setup().await;
    let redis = private.url();
    let mut first = Process::start(&redis, &p, "first", &up).await;
    let mut on_first = first.client().await;
    let r = on_first
        .request("weather.subscribe", json!({"city": "Oslo"}), "s")
        .await;
    assert_eq!(r["ok"], true, "{r}");
    // The first node's loop holds the lease from its first refresh.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let b = node_with(&redis, &p, "b", &up, |c| {
        c.weather.refresh_s = 1;
        c.weather.cache_ttl_s = 1;
    })
    .await;
    let mut on_b = b.client().await;
    let r = on_b
        .request("weather.subscribe", json!({"city": "Oslo"}), "s")
        .await;
    assert_eq!(r["ok"], true, "{r}");
    wait_channels(&b, 1).await;
    // b's subscriber gets updates from the first node's loop.
    assert_eq!(on_b.next_push().await["event"], "weather.update");
    first.kill().await;
    // Then from b's own loop, once the lease (3 periods) has expired.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    let calls = up.calls();
    while up.calls() == calls {
        assert!(tokio::time::Instant::now() < deadline, "b never took over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(on_b.next_push().await["event"], "weather.update");
}

async fn wait_health(server: &TestServer, status: u16) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (s, body) = server.get("/healthz").await.expect("healthz answers");
        if s == status {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/healthz stayed {s} {body:?}, expected {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_redis_outage_degrades_nodes_which_serve_locally_and_recover_by_themselves() {
    let mut redis = Redis::start();
    let (p, up) = (prefix(), upstream().await);
    let a = node(&redis.url(), &p, "a", &up).await;
    let b = node(&redis.url(), &p, "b", &up).await;
    let mut alice_a = user(&a, "alice").await;
    let mut alice_b = user(&b, "alice").await;
    wait_channels(&b, 1).await;

    redis.kill();
    let body = wait_health(&a, 503).await;
    assert!(body.contains("degraded"), "{body}");
    assert_eq!(a.sample("gale_cluster_up").await, 0.0);
    // Local service unbroken: lookups, replies, local push.
    let mut cl = a.client().await;
    let started = tokio::time::Instant::now();
    assert_eq!(cl.ask("Paris").await["city"], "Paris");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let (status, body) = publish(&a, Some(API_KEY), r#"{"event":"local","users":["alice"]}"#).await;
    assert_eq!(status, 200);
    assert_eq!(body["reached"], 1);
    assert_eq!(body["cluster"]["up"], false, "{body}");
    assert_eq!(alice_a.next_push().await["event"], "local");
    // The copy for b could not be sent: counted, not buffered.
    let deadline = tokio::time::Instant::now() + WAIT;
    while a.metric("cluster-lost").await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "loss never counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    quiet(&mut alice_b).await;

    redis.restart();
    wait_health(&a, 200).await;
    wait_health(&b, 200).await;
    // Re-subscribed from the hub's own state: alice's channel is back.
    wait_channels(&b, 1).await;
    let (_, body) = publish(&a, Some(API_KEY), r#"{"event":"back","users":["alice"]}"#).await;
    assert_eq!(body["cluster"]["up"], true);
    assert_eq!(alice_a.next_push().await["event"], "back");
    assert_eq!(alice_b.next_push().await["event"], "back");
}

#[tokio::test]
async fn a_subscriber_killed_by_redis_is_resubscribed_within_seconds() {
    let redis = Redis::start();
    let (p, up) = (prefix(), upstream().await);
    let a = node(&redis.url(), &p, "a", &up).await;
    let b = node(&redis.url(), &p, "b", &up).await;
    let mut on_b = b.client().await;
    on_b.subscribe("t1").await;
    let _frank = user(&b, "frank").await;
    wait_channels(&b, 2).await;
    assert_eq!(
        b.sample("gale_cluster_subscriber_connects_total").await,
        1.0
    );

    let killed = redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    assert_eq!(killed.trim(), "2", "both nodes' subscribers killed");
    let started = tokio::time::Instant::now();
    b.wait_sample("gale_cluster_subscriber_connects_total", 2.0)
        .await;
    wait_channels(&b, 2).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let channels = redis
        .command(&["PUBSUB", "CHANNELS", &format!("{p}:*")])
        .await;
    assert!(channels.contains(&format!("{p}:t:t1")), "{channels}");
    assert!(channels.contains(&format!("{p}:u:frank")), "{channels}");
    publish(&a, Some(API_KEY), r#"{"event":"again","topic":"t1"}"#).await;
    assert_eq!(on_b.next_push().await["event"], "again");
}

#[tokio::test]
async fn a_black_holed_redis_fails_every_request_path_call_within_its_deadline() {
    let redis = Redis::start();
    let target: SocketAddr = redis.addr().parse().expect("redis address");
    let hole = common::faults::FaultProxy::start(target).await;
    let (p, up) = (prefix(), upstream().await);
    let a = node_with(&format!("redis://{}", hole.addr), &p, "a", &up, |c| {
        c.cluster.call_timeout_ms = 500;
        c.events.insert(
            "server.stats".to_owned(),
            toml::from_str(r#"rate_limit = "100/min""#).expect("override"),
        );
    })
    .await;
    let mut gina = user(&a, "gina").await;
    assert_eq!(
        gina.request("server.stats", json!({}), "0").await["ok"],
        true
    );

    hole.set(common::faults::Fault::Stall);
    // A rate-limited event: its Redis check fails within 500 ms and the
    // local limiter answers.
    for i in 1..=3 {
        let started = tokio::time::Instant::now();
        let reply = gina
            .request("server.stats", json!({}), &format!("r{i}"))
            .await;
        assert_eq!(reply["ok"], true, "{reply}");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "call {i} took {:?}",
            started.elapsed()
        );
    }
    // A lookup: the shared cache fails fast, the node looks up alone.
    let mut cl = a.client().await;
    let started = tokio::time::Instant::now();
    assert_eq!(cl.ask("Rome").await["city"], "Rome");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    assert!(
        a.sample("gale_cluster_fallbacks_total{what=\"RateLimit\"}")
            .await
            >= 3.0
    );
    assert!(
        a.sample("gale_cluster_fallbacks_total{what=\"Cache\"}")
            .await
            >= 1.0
    );
    let body = wait_health(&a, 503).await;
    assert!(body.contains("degraded"), "{body}");
}

/// Three `redis-server --cluster-enabled` masters on free ports, joined
/// into one Redis Cluster.
struct RedisCluster {
    nodes: Vec<Redis>,
}

impl RedisCluster {
    async fn start() -> RedisCluster {
        Self::with_replicas(0).await
    }

    /// Three masters, each with `replicas` replicas.
    async fn with_replicas(replicas: usize) -> RedisCluster {
        let nodes: Vec<Redis> = (0..3 * (1 + replicas))
            .map(|_| {
                Redis::with_args(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = tokio::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .await
            .expect("redis-cli --cluster create");
        assert!(out.status.success(), "{out:?}");
        let deadline = tokio::time::Instant::now() + WAIT;
        for n in &nodes {
            while !n
                .command(&["CLUSTER", "INFO"])
                .await
                .contains("cluster_state:ok")
            {
                assert!(tokio::time::Instant::now() < deadline, "cluster never ok");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // A replica that has not synced with its master yet refuses to
        // take over (its data is too old).
        for n in &nodes[3..] {
            while !n
                .command(&["INFO", "replication"])
                .await
                .contains("master_link_status:up")
            {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "replica never synced"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        RedisCluster { nodes }
    }

    /// Seed URLs of its first three nodes (the masters, as `redis-cli
    /// --cluster create` assigns them), as `cluster.redis_url` takes them.
    fn seeds(&self) -> String {
        self.nodes[..3]
            .iter()
            .map(Redis::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[tokio::test]
async fn nodes_work_over_a_three_master_redis_cluster() {
    let rc = RedisCluster::start().await;
    let (p, up) = (prefix(), upstream().await);
    up.set_latency(Duration::from_millis(300));
    let limit = |c: &mut Config| {
        c.events.insert(
            "server.stats".to_owned(),
            toml::from_str(r#"rate_limit = "2/min""#).expect("override"),
        );
    };
    let a = node_with(&rc.seeds(), &p, "a", &up, limit).await;
    let b = node_with(&rc.seeds(), &p, "b", &up, limit).await;

    // User push and topic push across nodes.
    let mut hal_a = user(&a, "hal").await;
    let mut hal_b = user(&b, "hal").await;
    hal_b.subscribe("ops").await;
    wait_channels(&b, 2).await;
    publish(&a, Some(API_KEY), r#"{"event":"x","users":["hal"]}"#).await;
    assert_eq!(hal_a.next_push().await["event"], "x");
    assert_eq!(hal_b.next_push().await["event"], "x");
    publish(&a, Some(API_KEY), r#"{"event":"y","topic":"ops"}"#).await;
    assert_eq!(hal_b.next_push().await["event"], "y");

    // Shared rate limit: keys on whichever master owns their slot.
    let mut ok = 0;
    for i in 0..4 {
        let tab = if i % 2 == 0 { &mut hal_a } else { &mut hal_b };
        let reply = tab
            .request("server.stats", json!({}), &format!("r{i}"))
            .await;
        ok += usize::from(reply["ok"] == true);
    }
    assert_eq!(ok, 2);

    // Shared cache and single-flight.
    let mut asks = Vec::new();
    for n in [&a, &b] {
        for _ in 0..2 {
            let mut cl = n.client().await;
            asks.push(tokio::spawn(async move { cl.ask("Lima").await }));
        }
    }
    for ask in asks {
        assert_eq!(ask.await.expect("join")["city"], "Lima");
    }
    assert_eq!(up.calls(), 1);

    // Presence: both nodes, one user.
    wait_json(&a, "presence over the cluster", |m| {
        m["cluster-nodes"] == 2 && m["cluster-users"] == 1
    })
    .await;
    for n in [&a, &b] {
        assert_eq!(
            n.sample("gale_cluster_fallbacks_total{what=\"RateLimit\"}")
                .await
                + n.sample("gale_cluster_fallbacks_total{what=\"Cache\"}")
                    .await,
            0.0,
            "nothing fell back"
        );
    }
}

#[tokio::test]
async fn presence_online_answers_for_users_on_any_node() {
    let (private, p, up) = setup().await;
    let redis = private.url();
    let a = node(&redis, &p, "a", &up).await;
    let b = node(&redis, &p, "b", &up).await;
    let _ivy = user(&a, "ivy").await;
    let mut jo = user(&b, "jo").await;
    // a's presence reaches Redis with its next refresh (every second).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = jo
            .request(
                "presence.online",
                json!({"users": ["ivy", "jo", "nobody"]}),
                "p",
            )
            .await;
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["data"]["online"]["jo"], true, "this node's own, at once");
        assert_eq!(r["data"]["online"]["nobody"], false);
        if r["data"]["online"]["ivy"] == true {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ivy never online: {r}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut anon = a.client().await;
    let r = anon
        .request("presence.online", json!({"users": ["ivy"]}), "x")
        .await;
    assert_eq!(r["error"]["code"], "unauthorized", "{r}");
    let r = jo
        .request("presence.online", json!({"users": []}), "e")
        .await;
    assert_eq!(r["error"]["code"], "invalid_data", "{r}");
}

#[tokio::test]
async fn nodes_keep_working_when_a_redis_cluster_master_fails_over() {
    let mut rc = RedisCluster::with_replicas(1).await;
    let (p, up) = (prefix(), upstream().await);
    let a = node(&rc.seeds(), &p, "a", &up).await;
    let b = node(&rc.seeds(), &p, "b", &up).await;
    let mut kay_a = user(&a, "kay").await;
    let mut kay_b = user(&b, "kay").await;
    wait_channels(&b, 1).await;
    publish(&a, Some(API_KEY), r#"{"event":"before","users":["kay"]}"#).await;
    assert_eq!(kay_a.next_push().await["event"], "before");
    assert_eq!(kay_b.next_push().await["event"], "before");

    // The first seed's master dies: its replica takes over its slots, and
    // the subscribers connected to it move to the next seed.
    let master = rc.nodes[0].port;
    rc.nodes[0].kill();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let info = rc.nodes[1].command(&["CLUSTER", "INFO"]).await;
        let slots = rc.nodes[1].command(&["CLUSTER", "SLOTS"]).await;
        // Done when the dead master serves no slot any more (its line in
        // CLUSTER NODES says "fail?" before the vote, "fail" after).
        let failed_over = !slots.lines().any(|l| l.trim() == master.to_string());
        if info.contains("cluster_state:ok") && failed_over {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failover: {info}\n{slots}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_health(&a, 200).await;
    wait_health(&b, 200).await;
    wait_channels(&b, 1).await;
    // Cross-node push and every kind of key work again.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        publish(&a, Some(API_KEY), r#"{"event":"after","users":["kay"]}"#).await;
        assert_eq!(kay_a.next_push().await["event"], "after");
        let got = tokio::time::timeout(
            Duration::from_millis(500),
            futures_util::StreamExt::next(&mut kay_b.ws),
        )
        .await;
        if let Ok(Some(Ok(m))) = got {
            assert!(m.to_text().unwrap_or("").contains("after"), "{m:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no delivery after failover"
        );
    }
    // Every lookup is answered in time, and once the client has followed
    // the failover no lookup falls back: the dead master's slots are
    // served by its promoted replica. Fresh cities each round, so that
    // each lookup reaches Redis and their keys spread over every master.
    let fallbacks = async |n: &TestServer| {
        n.sample("gale_cluster_fallbacks_total{what=\"Cache\"}")
            .await
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    for round in 0.. {
        let before = fallbacks(&a).await;
        for i in 0..12 {
            let city = format!("Fo{round}x{i}");
            let mut cl = a.client().await;
            let started = tokio::time::Instant::now();
            assert_eq!(cl.ask(&city).await["city"], city.as_str());
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{:?}",
                started.elapsed()
            );
        }
        if fallbacks(&a).await == before {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "lookups still fall back after the failover"
        );
    }
}

fn with_history(c: &mut Config) {
    c.topics
        .insert("hist:*".into(), gale::config::TopicConfig::history(10, 60));
}

/// Topic history over a three-master Redis Cluster: the script's keys
/// share a hash tag, so each append and recovery runs on one master.
#[tokio::test]
async fn history_and_recovery_work_over_a_three_master_redis_cluster() {
    let rc = RedisCluster::start().await;
    let (p, up) = (prefix(), upstream().await);
    let a = node_with(&rc.seeds(), &p, "a", &up, with_history).await;
    let b = node_with(&rc.seeds(), &p, "b", &up, with_history).await;
    for topic in ["hist:1", "hist:2", "hist:3"] {
        let mut watcher = b.client().await;
        let first = watcher
            .request("topic.subscribe", json!({"topic": topic}), "w")
            .await;
        let epoch = first["data"]["epoch"].as_str().expect("epoch").to_owned();
        wait_channels(&b, 1).await;
        for n in 1..=3 {
            let body = json!({"event": "e", "data": n, "topic": topic}).to_string();
            publish(&a, Some(API_KEY), &body).await;
        }
        let mut last = 0;
        while last < 3 {
            last = watcher.next_push().await["offset"]
                .as_u64()
                .expect("offset");
        }
        let mut back = a.client().await;
        let r = back
            .request(
                "topic.subscribe",
                json!({"topic": topic, "since": {"offset": 1, "epoch": epoch}}),
                "r",
            )
            .await;
        assert_eq!(r["data"]["recovered"], true, "{r}");
        let got: Vec<_> = r["data"]["publications"]
            .as_array()
            .expect("publications")
            .iter()
            .map(|p| p["data"].clone())
            .collect();
        assert_eq!(got, vec![json!(2), json!(3)], "{topic}");
    }
}

/// With Redis gone, a publication on a topic with history still reaches
/// this node's subscribers (without a position), a recovery says it
/// cannot, both are counted, and positions resume when Redis is back.
#[tokio::test]
async fn without_redis_history_falls_back_visibly() {
    let mut redis = Redis::start();
    let (p, up) = (prefix(), upstream().await);
    let a = node_with(&redis.url(), &p, "a", &up, with_history).await;
    let mut sub = a.client().await;
    let first = sub
        .request("topic.subscribe", json!({"topic": "hist:x"}), "s")
        .await;
    let epoch = first["data"]["epoch"].as_str().expect("epoch").to_owned();

    redis.kill();
    wait_health(&a, 503).await;
    let (status, _) = publish(
        &a,
        Some(API_KEY),
        r#"{"event":"e","data":1,"topic":"hist:x"}"#,
    )
    .await;
    assert_eq!(status, 200);
    let push = sub.next_push().await;
    assert_eq!(push["data"], 1);
    assert!(push.get("offset").is_none(), "{push}");
    let mut late = a.client().await;
    let r = late
        .request(
            "topic.subscribe",
            json!({"topic": "hist:x", "since": {"offset": 0, "epoch": epoch}}),
            "r",
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["data"]["recovered"], false, "{r}");
    assert!(
        a.sample("gale_cluster_fallbacks_total{what=\"History\"}")
            .await
            >= 2.0
    );

    redis.restart();
    wait_health(&a, 200).await;
    let (status, _) = publish(
        &a,
        Some(API_KEY),
        r#"{"event":"e","data":2,"topic":"hist:x"}"#,
    )
    .await;
    assert_eq!(status, 200);
    let push = sub.next_push().await;
    assert_eq!(push["data"], 2);
    assert!(push["offset"].as_u64().is_some(), "{push}");
}

/// Names that begin with `}` (or hold braces) keep their keys in one
/// slot of a Redis Cluster: history and the shared weather cache work for
/// them as for any other name.
#[tokio::test]
async fn braces_in_names_keep_their_keys_in_one_slot() {
    let rc = RedisCluster::start().await;
    let (p, up) = (prefix(), upstream().await);
    let everything = |c: &mut Config| {
        c.topics.insert(
            "*".into(),
            gale::config::TopicConfig {
                subscribe: Some(gale::config::SubscribeMode::Anyone),
                ..gale::config::TopicConfig::history(10, 60)
            },
        );
    };
    let a = node_with(&rc.seeds(), &p, "a", &up, everything).await;
    for topic in ["}x", "}", "{}", "a}b{c", "{x}y"] {
        let mut watcher = a.client().await;
        let first = watcher
            .request("topic.subscribe", json!({"topic": topic}), "w")
            .await;
        assert_eq!(first["ok"], true, "{topic}: {first}");
        let body = json!({"event": "e", "data": 1, "topic": topic}).to_string();
        let (status, reply) = publish(&a, Some(API_KEY), &body).await;
        assert_eq!(status, 200, "{topic}: {reply}");
        let push = watcher.next_push().await;
        assert_eq!(push["offset"], 1, "{topic}: {push}");
        let epoch = push["epoch"].clone();
        let mut back = a.client().await;
        let r = back
            .request(
                "topic.subscribe",
                json!({"topic": topic, "since": {"offset": 0, "epoch": epoch}}),
                "r",
            )
            .await;
        assert_eq!(r["data"]["recovered"], true, "{topic}: {r}");
    }
    let mut c = a.client().await;
    for city in ["}Paris", "Ro{me}", "Oslo}"] {
        assert_eq!(c.ask(city).await["type"], "weather", "{city}");
    }
    assert_eq!(
        a.sample("gale_cluster_lost_total{reason=\"RedisError\"}")
            .await,
        0.0,
        "no publication was lost"
    );
    assert_eq!(
        a.sample("gale_cluster_fallbacks_total{what=\"Cache\"}")
            .await,
        0.0,
        "the cache never fell back"
    );
}
