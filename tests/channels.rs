//! Channels with permissions: who may subscribe to and publish on which
//! topics, from the `[topics."PATTERN"]` blocks; user-limited topics;
//! subscription tokens; client publications; join/leave; presence. On one
//! node, and across nodes on a private Redis.

mod common;

use common::{Client, TestServer, start_with};
use gale::config::{Config, PublishMode, SubscribeMode, TopicConfig};
use serde_json::{Value, json};

const SECRET: &str = "channels-test-secret";

fn token(sub: &str, roles: Value) -> String {
    common::hs256_token(SECRET, sub, roles)
}

/// A subscription token for `topic`.
fn sub_token(sub: &str, topic: &str, exp_from_now: i64) -> String {
    let exp = chrono::Utc::now().timestamp() + exp_from_now;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": sub, "topic": topic, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

fn block(f: impl FnOnce(&mut TopicConfig)) -> TopicConfig {
    let mut t = TopicConfig::default();
    f(&mut t);
    t
}

/// Only the given blocks: the harness's open `*` is removed.
fn rules(c: &mut Config, blocks: Vec<(&str, TopicConfig)>) {
    c.auth.jwt_secret = Some(SECRET.into());
    c.api.key = Some(common::API_KEY_LONG.into());
    c.topics.clear();
    for (k, v) in blocks {
        c.topics.insert(k.into(), v);
    }
}

fn code(r: &Value) -> &str {
    r["error"]["code"].as_str().unwrap_or("")
}

async fn subscribe(c: &mut Client, topic: &str, r: &str) -> Value {
    c.request("topic.subscribe", json!({"topic": topic}), r)
        .await
}

async fn user(server: &TestServer, sub: &str, roles: Value) -> Client {
    server.client_with_token(&token(sub, roles)).await
}

#[tokio::test]
async fn topics_no_block_opens_are_closed_to_clients() {
    let server = start_with(|c| rules(c, vec![("news:*", TopicConfig::history(10, 60))])).await;
    let mut c = server.client().await;
    let r = subscribe(&mut c, "news:eu", "s").await;
    assert_eq!(code(&r), "permission_denied", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not open")),
        "{r}"
    );
    let r = c
        .request("topic.publish", json!({"topic": "news:eu", "data": 1}), "p")
        .await;
    assert_eq!(code(&r), "permission_denied", "{r}");
    // The backend still reaches it.
    let (status, _) = common::publish(
        &server,
        Some(common::API_KEY_LONG),
        r#"{"event":"e","topic":"news:eu"}"#,
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn subscribe_modes_roles_and_user_limited_topics() {
    let server = start_with(|c| {
        rules(
            c,
            vec![
                (
                    "open:*",
                    block(|t| t.subscribe = Some(SubscribeMode::Anyone)),
                ),
                (
                    "members:*",
                    block(|t| t.subscribe = Some(SubscribeMode::Users)),
                ),
                (
                    "ops:*",
                    block(|t| {
                        t.subscribe = Some(SubscribeMode::Users);
                        t.roles = Some(vec!["admin".into(), "ops".into()]);
                    }),
                ),
                ("dm:*", block(|t| t.subscribe = Some(SubscribeMode::Anyone))),
                (
                    "paid:*",
                    block(|t| t.subscribe = Some(SubscribeMode::Token)),
                ),
            ],
        );
    })
    .await;
    let mut anon = server.client().await;
    let mut alice = user(&server, "alice", json!([])).await;
    let mut root = user(&server, "root", json!(["admin"])).await;

    assert_eq!(subscribe(&mut anon, "open:x", "1").await["ok"], true);
    assert_eq!(
        code(&subscribe(&mut anon, "members:x", "2").await),
        "permission_denied"
    );
    assert_eq!(subscribe(&mut alice, "members:x", "3").await["ok"], true);
    assert_eq!(
        code(&subscribe(&mut alice, "ops:x", "4").await),
        "forbidden"
    );
    assert_eq!(subscribe(&mut root, "ops:x", "5").await["ok"], true);

    assert_eq!(
        subscribe(&mut alice, "dm:#alice,bob", "6").await["ok"],
        true
    );
    assert_eq!(
        code(&subscribe(&mut root, "dm:#alice,bob", "7").await),
        "permission_denied"
    );
    assert_eq!(
        code(&subscribe(&mut anon, "dm:#alice,bob", "8").await),
        "permission_denied"
    );

    // A token-only topic.
    assert_eq!(
        code(&subscribe(&mut alice, "paid:a", "9").await),
        "permission_denied"
    );
    let with = |t: String| json!({"topic": "paid:a", "token": t});
    let r = alice
        .request(
            "topic.subscribe",
            with(sub_token("alice", "paid:a", 60)),
            "10",
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    for (bad, why) in [
        (sub_token("alice", "paid:b", 60), "another topic"),
        (sub_token("bob", "paid:a", 60), "another user"),
        (sub_token("alice", "paid:a", -120), "expired"),
        ("not-a-jwt".to_owned(), "garbage"),
    ] {
        let r = root.request("topic.subscribe", with(bad), why).await;
        assert_eq!(code(&r), "permission_denied", "{why}: {r}");
    }
    // A token grants a subscription whatever the block says.
    let r = anon
        .request(
            "topic.subscribe",
            json!({"topic": "members:y", "token": sub_token("", "members:y", 60)}),
            "11",
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
}

#[tokio::test]
async fn client_publications_are_pushed_like_the_apis_with_history() {
    let server = start_with(|c| {
        rules(
            c,
            vec![
                (
                    "room:*",
                    block(|t| {
                        t.subscribe = Some(SubscribeMode::Users);
                        t.publish = Some(PublishMode::Subscribers);
                        t.history_size = Some(10);
                        t.history_ttl_s = Some(60);
                    }),
                ),
                (
                    "wall",
                    block(|t| {
                        t.subscribe = Some(SubscribeMode::Anyone);
                        t.publish = Some(PublishMode::Users);
                    }),
                ),
            ],
        );
    })
    .await;
    let mut alice = user(&server, "alice", json!([])).await;
    let mut bob = user(&server, "bob", json!([])).await;
    let mut anon = server.client().await;
    let publish = |topic: &str, data: Value| json!({"topic": topic, "data": data});

    let r = alice
        .request("topic.publish", publish("room:1", json!("hi")), "p0")
        .await;
    assert_eq!(code(&r), "permission_denied", "not subscribed yet: {r}");
    assert_eq!(subscribe(&mut alice, "room:1", "s1").await["ok"], true);
    assert_eq!(subscribe(&mut bob, "room:1", "s2").await["ok"], true);
    let r = alice
        .request(
            "topic.publish",
            publish("room:1", json!({"text": "hi"})),
            "p1",
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["data"], json!({"topic": "room:1", "accepted": true}));
    let push = bob.next_push().await;
    assert_eq!(push["event"], "topic.message", "{push}");
    assert_eq!(push["data"], json!({"text": "hi"}));
    assert_eq!(push["user"], "alice");
    assert_eq!(push["topic"], "room:1");
    assert_eq!(push["offset"], 1, "in the topic's history: {push}");

    // Recovered like any publication.
    let r = anon_recover(&mut bob, "room:1", push["epoch"].clone()).await;
    assert_eq!(r["publications"][0]["user"], "alice", "{r}");

    assert_eq!(subscribe(&mut anon, "wall", "w").await["ok"], true);
    let r = anon
        .request("topic.publish", publish("wall", json!(1)), "a")
        .await;
    assert_eq!(code(&r), "permission_denied", "wall takes users: {r}");
    let r = bob
        .request("topic.publish", publish("wall", json!(2)), "b")
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let push = anon.next_push().await;
    assert_eq!(
        (push["data"].clone(), push["user"].clone()),
        (json!(2), json!("bob"))
    );
}

async fn anon_recover(c: &mut Client, topic: &str, epoch: Value) -> Value {
    let r = c
        .request(
            "topic.subscribe",
            json!({"topic": topic, "since": {"offset": 0, "epoch": epoch}}),
            "rec",
        )
        .await;
    assert_eq!(r["data"]["recovered"], true, "{r}");
    r["data"].clone()
}

fn lobby() -> TopicConfig {
    block(|t| {
        t.subscribe = Some(SubscribeMode::Anyone);
        t.join_leave = Some(true);
        t.presence = Some(true);
    })
}

#[tokio::test]
async fn joins_leaves_and_presence_show_users_and_their_info() {
    let server = start_with(|c| {
        rules(
            c,
            vec![
                ("lobby", lobby()),
                (
                    "quiet",
                    block(|t| t.subscribe = Some(SubscribeMode::Anyone)),
                ),
            ],
        )
    })
    .await;
    let alice_token =
        common::hs256_token_with(SECRET, json!({"sub": "alice", "info": {"name": "Alice"}}));
    let mut watcher = server.client().await;
    assert_eq!(subscribe(&mut watcher, "lobby", "w").await["ok"], true);
    let mut alice = server.client_with_token(&alice_token).await;
    assert_eq!(subscribe(&mut alice, "lobby", "a").await["ok"], true);

    let join = watcher.next_push().await;
    assert_eq!(join["event"], "topic.join", "{join}");
    assert_eq!(join["data"]["topic"], "lobby");
    assert_eq!(join["data"]["user"], "alice");
    assert_eq!(join["data"]["info"], json!({"name": "Alice"}));
    assert_eq!(join["data"]["client"], alice.client_id.as_str());
    assert!(join.get("offset").is_none(), "never in history: {join}");

    let r = watcher
        .request("topic.presence", json!({"topic": "lobby"}), "p")
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["data"]["count"], 2, "{r}");
    assert_eq!(r["data"]["users"], 1, "{r}");
    let listed: Vec<&Value> = r["data"]["clients"]
        .as_array()
        .expect("clients")
        .iter()
        .collect();
    assert!(
        listed
            .iter()
            .any(|c| c["user"] == "alice" && c["info"]["name"] == "Alice"),
        "{r}"
    );

    let mut outsider = server.client().await;
    let r = outsider
        .request("topic.presence", json!({"topic": "lobby"}), "o")
        .await;
    assert_eq!(code(&r), "permission_denied", "only subscribers: {r}");
    assert_eq!(subscribe(&mut outsider, "quiet", "q").await["ok"], true);
    let r = outsider
        .request("topic.presence", json!({"topic": "quiet"}), "q2")
        .await;
    assert_eq!(code(&r), "permission_denied", "presence is off there: {r}");

    // Unsubscribing and disconnecting both announce a leave.
    alice
        .request("topic.unsubscribe", json!({"topic": "lobby"}), "u")
        .await;
    let leave = watcher.next_push().await;
    assert_eq!(
        (leave["event"].clone(), leave["data"]["user"].clone()),
        (json!("topic.leave"), json!("alice"))
    );
    assert_eq!(leave["data"]["info"], json!({"name": "Alice"}), "{leave}");
    assert_eq!(subscribe(&mut alice, "lobby", "a2").await["ok"], true);
    assert_eq!(watcher.next_push().await["event"], "topic.join");
    drop(alice);
    let leave = watcher.next_push().await;
    assert_eq!(leave["event"], "topic.leave", "{leave}");
    assert_eq!(leave["data"]["info"], json!({"name": "Alice"}), "{leave}");
}

#[tokio::test]
async fn across_nodes_presence_joins_and_client_publications_are_the_clusters() {
    let redis = common::services::Redis::start();
    let prefix = format!("c{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let node = |name: &'static str| {
        let (url, prefix) = (redis.url(), prefix.clone());
        move |c: &mut Config| {
            rules(
                c,
                vec![(
                    "lobby",
                    block(|t| {
                        t.subscribe = Some(SubscribeMode::Anyone);
                        t.publish = Some(PublishMode::Users);
                        t.join_leave = Some(true);
                        t.presence = Some(true);
                    }),
                )],
            );
            c.cluster.redis_url = Some(url);
            c.cluster.prefix = prefix;
            c.cluster.node_id = Some(name.into());
            c.cluster.probe_interval_ms = 200;
            c.cluster.presence_ttl_s = 3;
        }
    };
    let a = start_with(node("a")).await;
    let b = start_with(node("b")).await;
    for n in [&a, &b] {
        n.wait_sample("gale_cluster_up", 1.0).await;
    }
    let mut on_a = a.client().await;
    assert_eq!(subscribe(&mut on_a, "lobby", "s").await["ok"], true);
    // Both nodes in presence before asking across them.
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while a.metric("cluster-nodes").await != 2 {
        assert!(tokio::time::Instant::now() < deadline, "nodes never met");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut bob = user(&b, "bob", json!([])).await;
    assert_eq!(subscribe(&mut bob, "lobby", "b").await["ok"], true);
    let join = on_a.next_push().await;
    assert_eq!(
        (join["event"].clone(), join["data"]["user"].clone()),
        (json!("topic.join"), json!("bob"))
    );

    let r = on_a
        .request("topic.presence", json!({"topic": "lobby"}), "p")
        .await;
    assert_eq!(r["data"]["count"], 2, "both nodes' subscribers: {r}");
    assert_eq!(r["data"]["users"], 1, "{r}");

    let r = bob
        .request(
            "topic.publish",
            json!({"topic": "lobby", "data": "from b"}),
            "pub",
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let push = on_a.next_push().await;
    assert_eq!(
        (
            push["event"].clone(),
            push["data"].clone(),
            push["user"].clone()
        ),
        (json!("topic.message"), json!("from b"), json!("bob"))
    );
}
