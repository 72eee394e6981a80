//! The server API, `POST /api/NAME`: every method, the read-only key,
//! batches, and the same over two nodes on a private Redis (with the
//! backend's lifecycle notifications, one `user.online` for the
//! cluster).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{API_KEY_LONG, TestServer, start_with};
use gale::config::{Config, SubscribeMode, TopicConfig};
use serde_json::{Value, json};

const SECRET: &str = "api-test-secret";
const READ_KEY: &str = "read-only-key-0123456789";

fn configured(c: &mut Config) {
    c.auth.jwt_secret = Some(SECRET.into());
    c.api.key = Some(API_KEY_LONG.into());
    c.api.read_key = Some(READ_KEY.into());
    c.topics.insert(
        "news:*".into(),
        TopicConfig {
            presence: Some(true),
            join_leave: Some(true),
            ..TopicConfig::history(10, 60)
        },
    );
}

/// `POST /api/{method}` with `key`: (status, body).
async fn api_at(addr: SocketAddr, key: &str, method: &str, params: Value) -> (u16, Value) {
    common::api_post(addr, Some(key), method, &params.to_string()).await
}

/// The offsets of a history answer's publications.
fn offsets(r: &Value) -> Vec<u64> {
    r["publications"]
        .as_array()
        .expect("pubs")
        .iter()
        .filter_map(|p| p["offset"].as_u64())
        .collect()
}

async fn api(server: &TestServer, method: &str, params: Value) -> Value {
    let (status, body) = api_at(server.addr, API_KEY_LONG, method, params).await;
    assert_eq!(status, 200, "{method}: {body}");
    body
}

async fn user(server: &TestServer, sub: &str) -> common::Client {
    let token = common::hs256_token_with(SECRET, json!({"sub": sub, "info": {"n": sub}}));
    server.client_with_token(&token).await
}

/// The next push that is not a `topic.join` / `topic.leave` (the test
/// topics announce joins, the subscriber's own included).
async fn next_publication(client: &mut common::Client) -> Value {
    loop {
        let push = client.next_push().await;
        if push["event"] != "topic.join" && push["event"] != "topic.leave" {
            return push;
        }
    }
}

#[tokio::test]
async fn every_method_on_one_node() {
    let server = start_with(configured).await;
    let mut alice = user(&server, "alice").await;
    let mut bob = user(&server, "bob").await;

    // subscribe: the user's connections, server-side.
    let r = api(
        &server,
        "subscribe",
        json!({"user": "alice", "topic": "news:eu"}),
    )
    .await;
    assert_eq!(r["subscribed"], 1, "{r}");
    let r = api(
        &server,
        "broadcast",
        json!({"topics": ["news:eu", "news:us"], "event": "headline", "data": {"t": 1}}),
    )
    .await;
    assert_eq!(r["reached"], 1, "{r}");
    let push = next_publication(&mut alice).await;
    assert_eq!(
        (
            push["event"].clone(),
            push["topic"].clone(),
            push["offset"].clone()
        ),
        (json!("headline"), json!("news:eu"), json!(1))
    );

    // presence and its stats.
    let r = api(&server, "presence", json!({"topic": "news:eu"})).await;
    assert_eq!(r["count"], 1, "{r}");
    assert_eq!(r["clients"][0]["user"], "alice");
    assert_eq!(r["clients"][0]["info"], json!({"n": "alice"}));
    assert_eq!(r["clients"][0]["client"], alice.client_id.as_str());
    let r = api(&server, "presence_stats", json!({"topic": "news:eu"})).await;
    assert_eq!(
        (r["clients"].clone(), r["users"].clone()),
        (json!(1), json!(1)),
        "{r}"
    );

    // history.
    for n in 2..=4 {
        api(
            &server,
            "publish",
            json!({"event": "headline", "data": {"t": n}, "topic": "news:eu"}),
        )
        .await;
    }
    for _ in 2..=4 {
        next_publication(&mut alice).await;
    }
    let r = api(&server, "history", json!({"topic": "news:eu"})).await;
    assert_eq!(r["offset"], 4, "{r}");
    assert_eq!(offsets(&r), vec![1, 2, 3, 4], "{r}");
    let r = api(&server, "history", json!({"topic": "news:eu", "limit": 2})).await;
    assert_eq!(offsets(&r), vec![3, 4], "{r}");
    let (status, _) = api_at(
        server.addr,
        API_KEY_LONG,
        "history",
        json!({"topic": "plain"}),
    )
    .await;
    assert_eq!(status, 400, "a topic without history");

    // topics and info.
    let sub = bob
        .request("topic.subscribe", json!({"topic": "news:us"}), "s")
        .await;
    assert_eq!(sub["ok"], true);
    let r = api(&server, "topics", json!({"pattern": "news:*"})).await;
    assert_eq!(
        r["topics"],
        json!([{"topic": "news:eu", "subscribers": 1}, {"topic": "news:us", "subscribers": 1}])
    );
    let r = api(&server, "info", json!({})).await;
    assert_eq!(r["connections"], 2, "{r}");
    assert_eq!(r["nodes"][0]["users"], 2, "{r}");

    // unsubscribe, then disconnect with a code and reason.
    let r = api(
        &server,
        "unsubscribe",
        json!({"user": "alice", "topic": "news:eu"}),
    )
    .await;
    assert_eq!(r["unsubscribed"], 1, "{r}");
    let r = api(
        &server,
        "disconnect",
        json!({"user": "bob", "code": 4100, "reason": "account closed"}),
    )
    .await;
    assert_eq!(r["disconnected"], 1, "{r}");
    let close = bob.expect_close().await;
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (4100, "account closed")
    );
    let r = api(&server, "disconnect", json!({"client": alice.client_id})).await;
    assert_eq!(r["disconnected"], 1, "{r}");
    assert_eq!(u16::from(alice.expect_close().await.code), 4000);

    // batch, in order, each with its own answer.
    let r = api(
        &server,
        "batch",
        json!({"commands": [
            {"method": "info", "params": {}},
            {"method": "nope", "params": {}},
            {"method": "publish", "params": {"event": "e", "broadcast": true}},
        ]}),
    )
    .await;
    let replies = r["replies"].as_array().expect("replies");
    assert_eq!(replies.len(), 3);
    assert!(replies[0]["result"]["nodes"].is_array(), "{r}");
    assert_eq!(replies[1]["status"], 404, "{r}");
    assert!(replies[2]["result"]["reached"].is_number(), "{r}");
}

#[tokio::test]
async fn the_read_key_reads_and_nothing_else() {
    let server = start_with(configured).await;
    let (status, _) = api_at(server.addr, READ_KEY, "info", json!({})).await;
    assert_eq!(status, 200);
    let (status, body) = api_at(
        server.addr,
        READ_KEY,
        "publish",
        json!({"event": "e", "broadcast": true}),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = api_at(
        server.addr,
        READ_KEY,
        "batch",
        json!({"commands": [{"method": "info", "params": {}}]}),
    )
    .await;
    assert_eq!(status, 403, "a batch is not read-only: {body}");
    let (status, _) = api_at(server.addr, "wrong-key-0123456789ab", "info", json!({})).await;
    assert_eq!(status, 401);
    let (status, body) = api_at(server.addr, API_KEY_LONG, "subscribe", json!({"user": ""})).await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn across_nodes_the_api_reaches_every_node_and_the_backend_hears_one_online() {
    let redis = common::services::Redis::start();
    let backend = common::backend::Backend::start().await;
    let prefix = format!("a{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let node = |name: &'static str| {
        let (url, prefix, events) = (redis.url(), prefix.clone(), backend.url("events"));
        move |c: &mut Config| {
            configured(c);
            c.topics.insert(
                "*".into(),
                TopicConfig {
                    subscribe: Some(SubscribeMode::Anyone),
                    ..TopicConfig::default()
                },
            );
            c.cluster.redis_url = Some(url);
            c.cluster.prefix = prefix;
            c.cluster.node_id = Some(name.into());
            c.cluster.probe_interval_ms = 200;
            c.cluster.presence_ttl_s = 3;
            c.proxy.events_url = Some(events);
            c.proxy.offline_grace_ms = 300;
        }
    };
    let a = start_with(node("a")).await;
    let b = start_with(node("b")).await;
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while a.metric("cluster-nodes").await != 2 || b.metric("cluster-nodes").await != 2 {
        assert!(tokio::time::Instant::now() < deadline, "nodes never met");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut carol_a = user(&a, "carol").await;
    let mut carol_b = user(&b, "carol").await;

    // Subscribe carol everywhere through node a; publish through a.
    let r = api(&a, "subscribe", json!({"user": "carol", "topic": "news:x"})).await;
    assert_eq!(
        (r["subscribed"].clone(), r["nodes"].clone()),
        (json!(2), json!(2)),
        "{r}"
    );
    api(&a, "publish", json!({"event": "hi", "topic": "news:x"})).await;
    assert_eq!(next_publication(&mut carol_b).await["event"], "hi");
    assert_eq!(next_publication(&mut carol_a).await["event"], "hi");

    let r = api(&b, "presence", json!({"topic": "news:x"})).await;
    assert_eq!(r["count"], 2, "{r}");
    let r = api(&b, "topics", json!({})).await;
    assert_eq!(
        r["topics"],
        json!([{"topic": "news:x", "subscribers": 2}]),
        "{r}"
    );
    let r = api(&a, "info", json!({})).await;
    assert_eq!(r["connections"], 2, "{r}");

    // One online for the cluster, though carol came to both nodes.
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while backend.notifications().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no notification");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let onlines = backend
        .notifications()
        .iter()
        .filter(|n| n["type"] == "user.online")
        .count();
    assert_eq!(onlines, 1, "{:?}", backend.notifications());

    // Disconnect her everywhere through b: then, once, offline.
    let r = api(
        &b,
        "disconnect",
        json!({"user": "carol", "code": 4001, "reason": "bye"}),
    )
    .await;
    assert_eq!(r["disconnected"], 2, "{r}");
    assert_eq!(u16::from(carol_a.expect_close().await.code), 4001);
    assert_eq!(u16::from(carol_b.expect_close().await.code), 4001);
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while !backend
        .notifications()
        .iter()
        .any(|n| n["type"] == "user.offline")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no offline: {:?}",
            backend.notifications()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let offlines = backend
        .notifications()
        .iter()
        .filter(|n| n["type"] == "user.offline")
        .count();
    assert_eq!(offlines, 1, "{:?}", backend.notifications());
}

#[tokio::test]
async fn history_without_since_gives_the_last_ones_kept() {
    let server = start_with(configured).await;
    // 15 published, 10 kept (history_size = 10).
    for n in 1..=15 {
        api(
            &server,
            "publish",
            json!({"event": "e", "data": n, "topic": "news:long"}),
        )
        .await;
    }
    // Publications are delivered (and kept) asynchronously.
    let deadline = tokio::time::Instant::now() + common::WAIT;
    let r = loop {
        let r = api(&server, "history", json!({"topic": "news:long"})).await;
        if r["offset"] == 15 {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "{r}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let top = 15;
    let last = |n: u64| ((top - n + 1)..=top).collect::<Vec<u64>>();
    assert_eq!(offsets(&r), last(10), "{r}");
    assert_eq!(r["complete"], true, "{r}");
    let r = api(
        &server,
        "history",
        json!({"topic": "news:long", "limit": 50}),
    )
    .await;
    assert_eq!(offsets(&r), last(10), "{r}");
    let r = api(
        &server,
        "history",
        json!({"topic": "news:long", "limit": 3}),
    )
    .await;
    assert_eq!(offsets(&r), last(3), "{r}");
    // With a since that is gone: not complete, nothing.
    let epoch = r["epoch"].clone();
    let r = api(
        &server,
        "history",
        json!({"topic": "news:long", "since": {"offset": 2, "epoch": epoch}}),
    )
    .await;
    assert_eq!(
        (r["complete"].clone(), offsets(&r).len()),
        (json!(false), 0),
        "{r}"
    );
}
