//! History and recovery: positions on pushes, recovery after a reconnect,
//! no gap while publications race a recovery, on a single node (memory)
//! and in cluster mode (Redis), where a client recovers on another node.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Client, TestServer, publish, start_with};
use gale::config::{Config, TopicConfig};
use serde_json::{Value, json};

const API_KEY: &str = "history-key-0123456789";

/// Where history lives in a test: this node's memory, or Redis under a
/// fresh prefix.
#[derive(Clone)]
enum Keeper {
    Memory,
    Redis {
        url: String,
        prefix: String,
        server: std::sync::Arc<common::services::Redis>,
    },
}

impl Keeper {
    /// A private Redis of the test's own.
    fn redis() -> Keeper {
        let server = common::services::Redis::start();
        let prefix = format!("h{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        Keeper::Redis {
            url: server.url(),
            prefix,
            server: std::sync::Arc::new(server),
        }
    }

    fn configure(&self, c: &mut Config, size: usize) {
        c.api.key = Some(API_KEY.into());
        c.topics
            .insert("news:*".into(), TopicConfig::history(size, 300));
        c.topics
            .insert("weather:*".into(), TopicConfig::history(size, 300));
        if let Keeper::Redis { url, prefix, .. } = self {
            c.cluster.redis_url = Some(url.clone());
            c.cluster.prefix = prefix.clone();
            c.cluster.probe_interval_ms = 200;
        }
    }

    async fn start(&self, size: usize) -> TestServer {
        self.start_with(size, |_| {}).await
    }

    async fn start_with(&self, size: usize, more: impl FnOnce(&mut Config)) -> TestServer {
        let server = start_with(|c| {
            self.configure(c, size);
            more(c);
        })
        .await;
        if let Keeper::Redis { .. } = self {
            server.wait_sample("gale_cluster_up", 1.0).await;
        }
        server
    }
}

async fn publish_to(server: &TestServer, topic: &str, n: u64) {
    let body = json!({"event": "headline", "data": {"n": n}, "topic": topic}).to_string();
    let (status, reply) = publish(server, Some(API_KEY), &body).await;
    assert_eq!(status, 200, "{reply}");
}

async fn subscribe(c: &mut Client, topic: &str, since: Option<Value>, r: &str) -> Value {
    subscribe_seeing(c, topic, since, r).await.0
}

/// Subscribes; returns the reply's data and the offsets of the pushes that
/// arrived before it (a push may overtake the reply).
async fn subscribe_seeing(
    c: &mut Client,
    topic: &str,
    since: Option<Value>,
    r: &str,
) -> (Value, Vec<u64>) {
    let mut data = json!({"topic": topic});
    if let Some(s) = since {
        data["since"] = s;
    }
    c.send(&json!({"event": "topic.subscribe", "data": data, "ref": r}).to_string())
        .await;
    let mut early = Vec::new();
    loop {
        let msg = c.recv_json().await;
        if msg["reply"] == r {
            assert_eq!(msg["ok"], true, "{msg}");
            return (msg["data"].clone(), early);
        }
        if let Some(o) = msg["offset"].as_u64() {
            early.push(o);
        }
    }
}

fn offsets(publications: &Value) -> Vec<u64> {
    publications
        .as_array()
        .expect("publications")
        .iter()
        .map(|p| p["offset"].as_u64().expect("offset"))
        .collect()
}

async fn pushes_carry_positions_and_a_reconnect_recovers_what_it_missed_on(keeper: Keeper) {
    let server = keeper.start(5).await;
    let mut a = server.client().await;
    let first = subscribe(&mut a, "news:1", None, "s").await;
    assert_eq!(first["offset"], 0, "{first}");
    let epoch = first["epoch"].as_str().expect("epoch").to_owned();
    assert!(
        first.get("recovered").is_none(),
        "nothing was asked: {first}"
    );

    for n in 1..=3 {
        publish_to(&server, "news:1", n).await;
    }
    for n in 1..=3u64 {
        let push = a.next_push().await;
        assert_eq!(push["event"], "headline");
        assert_eq!(push["data"]["n"], n);
        assert_eq!(push["offset"], n, "{push}");
        assert_eq!(push["epoch"], epoch.as_str());
        assert_eq!(push["topic"], "news:1", "{push}");
    }
    // A watcher stays to tell when publications have been delivered (the
    // API queues them for the delivery task).
    let mut watcher = server.client().await;
    subscribe(&mut watcher, "news:1", None, "w").await;
    drop(a);
    // Missed while away.
    for n in 4..=6 {
        publish_to(&server, "news:1", n).await;
    }
    while watcher.next_push().await["offset"] != 6 {}

    let mut b = server.client().await;
    let since = json!({"offset": 3, "epoch": epoch});
    let back = subscribe(&mut b, "news:1", Some(since), "r").await;
    assert_eq!(back["recovered"], true, "{back}");
    assert_eq!(offsets(&back["publications"]), vec![4, 5, 6]);
    let p = &back["publications"][0];
    assert_eq!(p["event"], "headline");
    assert_eq!(p["data"]["n"], 4);
    assert_eq!(p["epoch"], epoch.as_str());
    assert_eq!(back["offset"], 6);
    assert_eq!(back["epoch"], epoch.as_str());

    // Live again from where recovery ended.
    publish_to(&server, "news:1", 7).await;
    let push = b.next_push().await;
    assert_eq!(push["offset"], 7, "{push}");
    while watcher.next_push().await["offset"] != 7 {}

    // Only 5 are kept (3..=7): from 1 it cannot be done, and says so.
    let mut c = server.client().await;
    let lost = subscribe(
        &mut c,
        "news:1",
        Some(json!({"offset": 1, "epoch": epoch})),
        "l",
    )
    .await;
    assert_eq!(lost["recovered"], false, "{lost}");
    assert_eq!(lost["publications"], json!([]));
    assert_eq!(lost["offset"], 7, "the position to continue from: {lost}");
    // Another epoch (history lost, e.g. a restart) is never recovered.
    let mut d = server.client().await;
    let other = subscribe(
        &mut d,
        "news:1",
        Some(json!({"offset": 7, "epoch": "x"})),
        "e",
    )
    .await;
    assert_eq!(other["recovered"], false, "{other}");
    // Nothing missed is a recovery of nothing.
    let mut e = server.client().await;
    let none = subscribe(
        &mut e,
        "news:1",
        Some(json!({"offset": 7, "epoch": epoch})),
        "n",
    )
    .await;
    assert_eq!(none["recovered"], true, "{none}");
    assert_eq!(none["publications"], json!([]));

    // A topic without history: no positions; asking to recover says no.
    let mut f = server.client().await;
    let plain = subscribe(
        &mut f,
        "plain",
        Some(json!({"offset": 1, "epoch": epoch})),
        "p",
    )
    .await;
    assert_eq!(plain["recovered"], false, "{plain}");
    assert!(plain.get("offset").is_none(), "{plain}");
    publish_to(&server, "plain", 1).await;
    let push = f.next_push().await;
    assert!(push.get("offset").is_none(), "{push}");

    // Bad positions are refused clearly.
    let bad = f
        .request(
            "topic.subscribe",
            json!({"topic": "news:1", "since": {"offset": -1, "epoch": epoch}}),
            "b",
        )
        .await;
    assert_eq!(bad["ok"], false, "{bad}");
    assert_eq!(bad["error"]["code"], "invalid_data", "{bad}");
    let bad = f
        .request(
            "topic.subscribe",
            json!({"topic": "news:1", "since": {"offset": 1, "epoch": ""}}),
            "b2",
        )
        .await;
    assert_eq!(bad["error"]["code"], "invalid_data", "{bad}");
    assert!(server.metric("recovered").await >= 2);
    assert!(server.metric("recovery-lost").await >= 3);
}

#[tokio::test]
async fn pushes_carry_positions_and_a_reconnect_recovers_what_it_missed() {
    pushes_carry_positions_and_a_reconnect_recovers_what_it_missed_on(Keeper::Memory).await;
}

#[tokio::test]
async fn pushes_carry_positions_and_a_reconnect_recovers_what_it_missed_in_redis() {
    {
        let k = Keeper::redis();
        pushes_carry_positions_and_a_reconnect_recovers_what_it_missed_on(k).await;
    }
}

/// Publications race a stream of reconnecting clients: each client's
/// recovered publications plus the pushes it then receives cover every
/// offset from its position to the last publication, with no gap.
async fn no_publication_falls_between_recovery_and_live_pushes_on(keeper: Keeper) {
    let server = keeper.start(1000).await;
    let mut first = server.client().await;
    let start = subscribe(&mut first, "news:race", None, "s").await;
    let epoch = start["epoch"].as_str().expect("epoch").to_owned();
    const TOTAL: u64 = 300;
    let addr = server.addr;
    let publisher = tokio::spawn(async move {
        for n in 1..=TOTAL {
            let body =
                json!({"event": "headline", "data": {"n": n}, "topic": "news:race"}).to_string();
            let (status, _) = common::publish_at(addr, Some(API_KEY), &body).await;
            assert_eq!(status, 200);
        }
    });
    let mut clients = Vec::new();
    let mut position = 0u64;
    for i in 0..15 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let mut c = server.client().await;
        let since = json!({"offset": position, "epoch": epoch});
        let (back, early) =
            subscribe_seeing(&mut c, "news:race", Some(since), &format!("r{i}")).await;
        assert_eq!(back["recovered"], true, "{back}");
        let mut seen: BTreeSet<u64> = offsets(&back["publications"]).into_iter().collect();
        seen.extend(early);
        clients.push((position, c, seen));
        position = back["offset"].as_u64().expect("offset");
    }
    publisher.await.expect("publisher");
    for (from, mut c, mut seen) in clients {
        while seen.last().copied().unwrap_or(from) < TOTAL {
            let push = c.next_push().await;
            seen.insert(push["offset"].as_u64().expect("offset"));
        }
        let missing: Vec<u64> = (from + 1..=TOTAL).filter(|o| !seen.contains(o)).collect();
        assert!(missing.is_empty(), "from {from}: missing {missing:?}");
    }
}

#[tokio::test]
async fn no_publication_falls_between_recovery_and_live_pushes() {
    no_publication_falls_between_recovery_and_live_pushes_on(Keeper::Memory).await;
}

#[tokio::test]
async fn no_publication_falls_between_recovery_and_live_pushes_in_redis() {
    {
        let k = Keeper::redis();
        no_publication_falls_between_recovery_and_live_pushes_on(k).await;
    }
}

/// A client that reconnects to another node recovers there: positions are
/// the cluster's, not a node's.
#[tokio::test]
async fn a_client_recovers_on_another_node() {
    let keeper = Keeper::redis();
    let one = keeper.start(10).await;
    let two = keeper.start(10).await;
    let mut a = one.client().await;
    let first = subscribe(&mut a, "news:x", None, "s").await;
    let epoch = first["epoch"].as_str().expect("epoch").to_owned();
    publish_to(&one, "news:x", 1).await;
    assert_eq!(a.next_push().await["offset"], 1);
    let mut watcher = one.client().await;
    subscribe(&mut watcher, "news:x", None, "w").await;
    drop(a);
    // Published on both nodes while the client is away.
    publish_to(&two, "news:x", 2).await;
    while watcher.next_push().await["offset"] != 2 {}
    publish_to(&one, "news:x", 3).await;
    while watcher.next_push().await["offset"] != 3 {}
    let mut b = two.client().await;
    let back = subscribe(
        &mut b,
        "news:x",
        Some(json!({"offset": 1, "epoch": epoch})),
        "r",
    )
    .await;
    assert_eq!(back["recovered"], true, "{back}");
    assert_eq!(offsets(&back["publications"]), vec![2, 3]);
    assert_eq!(back["epoch"], epoch.as_str());
    publish_to(&one, "news:x", 4).await;
    assert_eq!(b.next_push().await["offset"], 4);
}

/// `weather.subscribe` takes `since` too, and its updates carry positions.
async fn weather_updates_are_recovered_on(keeper: Keeper) {
    let server = start_with(|c| {
        keeper.configure(c, 10);
        c.weather.cache_ttl_s = 1;
        c.weather.refresh_s = 1;
    })
    .await;
    let mut a = server.client().await;
    let first = a
        .request("weather.subscribe", json!({"city": "Paris"}), "s")
        .await;
    assert_eq!(first["ok"], true, "{first}");
    let epoch = first["data"]["epoch"].as_str().expect("epoch").to_owned();
    let from = first["data"]["offset"].as_u64().expect("offset");
    // A second subscriber keeps the feed running while the first is away.
    let mut keep = server.client().await;
    let k = keep
        .request("weather.subscribe", json!({"city": "Paris"}), "k")
        .await;
    assert_eq!(k["ok"], true, "{k}");
    drop(a);
    let mut last = from;
    while last < from + 2 {
        let push = keep.next_push().await;
        assert_eq!(push["event"], "weather.update");
        last = push["offset"].as_u64().expect("offset");
    }
    let mut b = server.client().await;
    let back = b
        .request(
            "weather.subscribe",
            json!({"city": "Paris", "since": {"offset": from, "epoch": epoch}}),
            "r",
        )
        .await;
    assert_eq!(back["data"]["recovered"], true, "{back}");
    let got = offsets(&back["data"]["publications"]);
    assert!(got.len() >= 2 && got[0] == from + 1, "{got:?}");
    assert_eq!(back["data"]["publications"][0]["event"], "weather.update");
    assert_eq!(back["data"]["city"], "Paris");
    assert_eq!(back["data"]["topic"], "weather:paris");
    assert_eq!(back["data"]["publications"][0]["topic"], "weather:paris");
}

#[tokio::test]
async fn weather_updates_are_recovered() {
    weather_updates_are_recovered_on(Keeper::Memory).await;
}

#[tokio::test]
async fn weather_updates_are_recovered_in_redis() {
    {
        let k = Keeper::redis();
        weather_updates_are_recovered_on(k).await;
    }
}

/// A recovering subscriber on a node with no other subscriber of the
/// topic: the node's Redis subscription to the topic starts with it, and
/// the recovery read waits for it, so publications racing the two are
/// not lost. Each round's client drops before the next one comes, so
/// every round starts unsubscribed.
#[tokio::test]
async fn recovery_on_a_node_that_was_not_subscribed_misses_nothing() {
    let keeper = Keeper::redis();
    let one = keeper.start(1000).await;
    let two = keeper.start(1000).await;
    let mut first = one.client().await;
    let start = subscribe(&mut first, "news:cold", None, "s").await;
    let epoch = start["epoch"].as_str().expect("epoch").to_owned();
    let stop = tokio_util::sync::CancellationToken::new();
    let addr = one.addr;
    let publishing = stop.clone();
    let publisher = tokio::spawn(async move {
        let mut n = 0u64;
        while !publishing.is_cancelled() {
            n += 1;
            let body =
                json!({"event": "headline", "data": {"n": n}, "topic": "news:cold"}).to_string();
            let (status, _) = common::publish_at(addr, Some(API_KEY), &body).await;
            assert_eq!(status, 200);
        }
        n
    });
    let mut position = 0u64;
    for round in 0..10 {
        two.wait_metric("topics", 0).await;
        let mut c = two.client().await;
        let since = json!({"offset": position, "epoch": epoch});
        let (back, early) =
            subscribe_seeing(&mut c, "news:cold", Some(since), &format!("r{round}")).await;
        assert_eq!(back["recovered"], true, "{back}");
        let mut seen: BTreeSet<u64> = offsets(&back["publications"]).into_iter().collect();
        seen.extend(early);
        // Live pushes for a moment, then drop.
        let until = tokio::time::Instant::now() + Duration::from_millis(100);
        while let Ok(push) = tokio::time::timeout_at(until, c.next_push()).await {
            seen.insert(push["offset"].as_u64().expect("offset"));
        }
        let last = seen.last().copied().unwrap_or(position);
        let missing: Vec<u64> = (position + 1..=last)
            .filter(|o| !seen.contains(o))
            .collect();
        assert!(
            missing.is_empty(),
            "round {round}, from {position}: missing {missing:?}"
        );
        assert!(last > position, "round {round}: nothing published?");
        position = last;
    }
    stop.cancel();
    let published = publisher.await.expect("publisher");
    assert!(published > 10, "{published} publications");
}

/// One anonymous client subscribes to `n` never-published topics, 64 per
/// connection, reconnecting.
async fn subscribe_to_junk(server: &TestServer, n: usize) {
    let mut c = server.client().await;
    for i in 0..n {
        if i > 0 && i % 64 == 0 {
            c = server.client().await;
        }
        let r = c
            .request(
                "topic.subscribe",
                json!({"topic": format!("news:junk{i}"), "since": {"offset": 0, "epoch": "x"}}),
                &i.to_string(),
            )
            .await;
        assert_eq!(r["ok"], true, "{r}");
    }
}

/// Reads leave no state that outranks publications: a flood of
/// subscribes to never-published topics does not cost a real topic its
/// history or its epoch.
async fn subscribes_do_not_evict_history_on(keeper: Keeper) {
    let server = keeper.start_with(10, |c| c.history.max_streams = 100).await;
    let mut reader = server.client().await;
    let first = subscribe(&mut reader, "news:real", None, "s").await;
    for n in 1..=3 {
        publish_to(&server, "news:real", n).await;
    }
    let mut epoch = first["epoch"].clone();
    let mut offset = 0;
    while offset < 3 {
        let push = reader.next_push().await;
        offset = push["offset"].as_u64().expect("offset");
        epoch = push["epoch"].clone();
    }
    drop(reader);

    subscribe_to_junk(&server, 300).await;

    let mut back = server.client().await;
    let r = subscribe(
        &mut back,
        "news:real",
        Some(json!({"offset": 3, "epoch": epoch})),
        "r",
    )
    .await;
    assert_eq!(r["recovered"], true, "nothing was missed: {r}");
    assert_eq!(r["epoch"], epoch, "{r}");
    assert_eq!(offsets(&r["publications"]), Vec::<u64>::new());
    if let Keeper::Redis {
        server: redis,
        prefix,
        ..
    } = &keeper
    {
        let keys = redis
            .command(&["--scan", "--pattern", &format!("{prefix}*junk*")])
            .await;
        assert_eq!(keys.lines().count(), 0, "a read writes nothing: {keys}");
    }
}

#[tokio::test]
async fn subscribes_do_not_evict_history() {
    subscribes_do_not_evict_history_on(Keeper::Memory).await;
}

#[tokio::test]
async fn subscribes_do_not_evict_history_or_write_to_redis() {
    subscribes_do_not_evict_history_on(Keeper::redis()).await;
}

/// A client that subscribed while a topic had no publications yet, and
/// was away for the first ones, recovers them all.
async fn the_first_publications_are_recovered_on(keeper: Keeper) {
    let server = keeper.start(10).await;
    let mut a = server.client().await;
    let first = subscribe(&mut a, "news:fresh", None, "s").await;
    assert_eq!(first["offset"], 0, "{first}");
    let position = json!({"offset": 0, "epoch": first["epoch"]});
    drop(a);
    // The API queues publications: a watcher tells when they are out.
    let mut watcher = server.client().await;
    subscribe(&mut watcher, "news:fresh", None, "w").await;
    for n in 1..=2 {
        publish_to(&server, "news:fresh", n).await;
    }
    while watcher.next_push().await["offset"] != 2 {}
    let mut b = server.client().await;
    let r = subscribe(&mut b, "news:fresh", Some(position.clone()), "r").await;
    assert_eq!(r["recovered"], true, "{r}");
    assert_eq!(offsets(&r["publications"]), vec![1, 2]);
    // From an empty topic's position, on a topic still empty: nothing
    // missed.
    let mut c = server.client().await;
    let empty = subscribe(&mut c, "news:still-empty", None, "e").await;
    let since = json!({"offset": 0, "epoch": empty["epoch"]});
    drop(c);
    let mut d = server.client().await;
    let r = subscribe(&mut d, "news:still-empty", Some(since), "r").await;
    assert_eq!(r["recovered"], true, "{r}");
    assert_eq!(offsets(&r["publications"]), Vec::<u64>::new());
    // A made-up position is not taken for an empty topic's.
    let r = subscribe(
        &mut d,
        "news:fresh",
        Some(json!({"offset": 0, "epoch": "~0000"})),
        "m",
    )
    .await;
    assert_eq!(r["recovered"], false, "{r}");
}

#[tokio::test]
async fn the_first_publications_are_recovered() {
    the_first_publications_are_recovered_on(Keeper::Memory).await;
}

#[tokio::test]
async fn the_first_publications_are_recovered_in_redis() {
    the_first_publications_are_recovered_on(Keeper::redis()).await;
}
