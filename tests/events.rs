//! JSON events over the same /ws endpoint: replies, error codes, per-event
//! policies from the config, the worker pool's priorities and drop
//! threshold.

mod common;

use std::time::{Duration, Instant};

use common::{start, start_with};
use gale::config::{Config, EventOverride, Priority};
use serde_json::{Value, json};

fn override_event(c: &mut Config, name: &str, f: impl FnOnce(&mut EventOverride)) {
    f(c.events.entry(name.to_owned()).or_default());
}

fn code(reply: &Value) -> &str {
    reply["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn weather_get_replies_once_with_the_reading() {
    let server = start().await;
    let mut c = server.client().await;
    let reply = c
        .request("weather.get", json!({"city": "Paris"}), "17")
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["data"]["city"], "Paris");
    assert!(reply["data"]["temperature"].is_number());
    assert!(reply.get("error").is_none());

    // Plain text still works on the same connection, and shares the cache.
    assert_eq!(c.ask("Paris").await["type"], "weather");
    assert_eq!(server.fake.calls(), 1);

    let reply = c
        .request("weather.get", json!({"city": "Atlantis"}), "18")
        .await;
    assert_eq!(reply["ok"], false);
    assert_eq!(code(&reply), "not_found");

    server.fake.set_mode(gale::fake_upstream::Mode::Status(503));
    let reply = c
        .request("weather.get", json!({"city": "Bergen"}), "19")
        .await;
    assert_eq!(code(&reply), "upstream_unavailable", "{reply}");
}

#[tokio::test]
async fn numeric_refs_are_echoed_and_events_without_ref_get_no_reply() {
    let server = start().await;
    let mut c = server.client().await;
    c.send(r#"{"event":"weather.get","data":{"city":"Oslo"}}"#)
        .await;
    c.send(r#"{"event":"server.stats","ref":42}"#).await;
    let reply = c.recv_json().await;
    assert_eq!(
        reply["reply"], 42,
        "the only message is the reply to ref 42: {reply}"
    );
    assert_eq!(reply["ok"], true);
    // The fire-and-forget event still ran.
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.fake.calls() < 1 {
        assert!(
            Instant::now() < deadline,
            "weather.get without ref never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn each_refusal_has_its_code() {
    let server = start_with(|c| {
        override_event(c, "server.stats", |o| o.requires_auth = Some(true));
    })
    .await;
    let mut c = server.client().await;

    let r = c.request("no.such.event", json!({}), "a").await;
    assert_eq!(code(&r), "unknown_event", "{r}");

    let r = c.request("server.stats", Value::Null, "b").await;
    assert_eq!(code(&r), "unauthorized", "{r}");

    let r = c.request("weather.get", json!({}), "c").await;
    assert_eq!(code(&r), "invalid_data", "{r}");
    assert_eq!(
        r["error"]["field"], "data",
        "missing field is reported on data: {r}"
    );

    let r = c.request("weather.get", json!({"city": 12}), "d").await;
    assert_eq!(code(&r), "invalid_data", "{r}");
    assert_eq!(r["error"]["field"], "city");

    let r = c.request("weather.get", json!({"city": "  "}), "e").await;
    assert_eq!(code(&r), "invalid_data", "{r}");
    assert_eq!(r["error"]["field"], "city");
    assert!(r["error"]["message"].as_str().expect("m").contains("empty"));

    c.send(r#"{"event":42,"ref":"f"}"#).await;
    let r = c.reply_to("f").await;
    assert_eq!(code(&r), "invalid_message", "{r}");

    c.send("{not json").await;
    let r = c.recv_json().await;
    assert_eq!(r["type"], "error", "no ref readable: a plain error: {r}");
    assert_eq!(r["code"], "invalid_message");

    assert_eq!(server.fake.calls(), 0, "no refused event reached upstream");
    let (_, text) = server.get("/metrics").await.expect("metrics");
    assert!(
        text.contains(r#"gale_events_total{event="weather.get",outcome="InvalidData"} 3"#),
        "outcomes are labelled by event:\n{text}"
    );
    assert!(text.contains(r#"gale_events_total{event="unknown",outcome="UnknownEvent"} 1"#));
    assert!(text.contains(r#"gale_events_total{event="invalid",outcome="InvalidMessage"} 2"#));
    assert_eq!(
        server.metric("failed").await,
        0,
        "events are not weather requests"
    );
}

#[tokio::test]
async fn rate_limit_refuses_the_next_one_in_the_window_and_recovers() {
    let server = start_with(|c| {
        override_event(c, "server.stats", |o| o.rate_limit = Some("3/s".into()));
    })
    .await;
    let mut c = server.client().await;
    for i in 0..3 {
        let r = c
            .request("server.stats", Value::Null, &format!("ok{i}"))
            .await;
        assert_eq!(r["ok"], true, "{r}");
    }
    let r = c.request("server.stats", Value::Null, "over").await;
    assert_eq!(code(&r), "rate_limited", "{r}");

    // Anonymous limits count per connection and per client address, and
    // an address's allowance is one connection's for each it holds open:
    // a second user behind the same address has an allowance of its own
    // (reconnecting does not reset one: see below).
    let mut other = server.client().await;
    assert_eq!(
        other.request("server.stats", Value::Null, "x").await["ok"],
        true
    );

    tokio::time::sleep(Duration::from_millis(1_100)).await;
    for i in 0..3 {
        let r = c
            .request("server.stats", Value::Null, &format!("again{i}"))
            .await;
        assert_eq!(r["ok"], true, "window recovered: {r}");
    }
}

#[tokio::test]
async fn handler_timeout_from_config() {
    let server = start_with(|c| {
        override_event(c, "weather.get", |o| o.timeout_ms = Some(200));
    })
    .await;
    server.fake.set_latency(Duration::from_secs(2));
    let mut c = server.client().await;
    let started = Instant::now();
    let r = c.request("weather.get", json!({"city": "Lima"}), "t").await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(code(&r), "timeout", "{r}");
}

#[tokio::test]
async fn high_priority_runs_before_low_on_a_saturated_pool() {
    let server = start_with(|c| {
        c.router.workers = 1;
        override_event(c, "weather.get", |o| o.priority = Some(Priority::High));
        override_event(c, "server.stats", |o| {
            o.priority = Some(Priority::Low);
            o.rate_limit = Some("off".into());
        });
    })
    .await;
    server
        .fake
        .set_city_latency("Blocker", Duration::from_millis(600));
    let mut c = server.client().await;
    let send =
        |e: &str, data: Value, r: &str| json!({"event": e, "data": data, "ref": r}).to_string();
    c.send(&send("weather.get", json!({"city": "Blocker"}), "blocker"))
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await; // the only worker is busy
    c.send(&send("server.stats", Value::Null, "low")).await;
    c.send(&send("weather.get", json!({"city": "Fast"}), "high"))
        .await;
    let mut order = Vec::new();
    for _ in 0..3 {
        order.push(
            c.recv_json().await["reply"]
                .as_str()
                .expect("reply")
                .to_owned(),
        );
    }
    assert_eq!(order, ["blocker", "high", "low"]);
}

#[tokio::test]
async fn past_the_drop_threshold_events_are_refused_at_once() {
    let server = start_with(|c| {
        c.router.workers = 1;
        c.router.queue_size = 2;
        c.router.drop_threshold = 1.0;
    })
    .await;
    server.fake.set_latency(Duration::from_millis(500));
    // One connection may not fill the queue by itself (it would stop being
    // read); three, one event each, do: one runs, two wait.
    let mut senders = Vec::new();
    for i in 0..3 {
        let mut c = server.client().await;
        c.send(
            &json!({"event":"weather.get","data":{"city":format!("Q{i}")},"ref":format!("q{i}")})
                .to_string(),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        senders.push(c);
    }
    let mut c = server.client().await;
    let started = Instant::now();
    let r = c.request("weather.get", json!({"city": "Q3"}), "q3").await;
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "refused at once"
    );
    assert_eq!(code(&r), "system_overloaded", "{r}");
    for (i, c) in senders.iter_mut().enumerate() {
        assert_eq!(c.reply_to(&format!("q{i}")).await["ok"], true);
    }
}

#[tokio::test]
async fn an_override_for_an_unknown_event_stops_start_up() {
    let fake = gale::fake_upstream::FakeUpstream::start("127.0.0.1:0")
        .await
        .expect("fake");
    let dir = tempfile::tempdir().expect("dir");
    let mut config = common::test_config(&fake, dir.path());
    override_event(&mut config, "no.such", |o| o.timeout_ms = Some(5));
    let listener = gale::server::bind("127.0.0.1:0").await.expect("bind");
    let err = gale::server::run(listener, config, Default::default())
        .await
        .expect_err("refused");
    assert!(err.to_string().contains(r#"events."no.such""#), "{err}");
}

#[tokio::test]
async fn weather_events_are_logged_and_counted_like_plain_requests() {
    let server = start().await;
    let mut c = server.client().await;
    assert!(!c.client_id.is_empty(), "greeting read");
    c.request("weather.get", json!({"city": "Paris"}), "1")
        .await;
    c.request("weather.get", json!({"city": "Atlantis"}), "2")
        .await;
    c.request("weather.subscribe", json!({"city": "Oslo"}), "3")
        .await;
    server.wait_metric("requests", 3).await;
    server.wait_metric("db-completed", 3).await;
    let rows = common::rows_for(&server.store_url, &c.client_id).await;
    let cities: Vec<(&str, bool)> = rows.iter().map(|r| (r.0.as_str(), r.1)).collect();
    assert_eq!(
        cities,
        [("Paris", true), ("Atlantis", false), ("Oslo", true)],
        "one row per weather event, in order"
    );
    assert_eq!(rows[1].3.as_deref(), Some("not_found"));
}

#[tokio::test]
async fn one_connection_cannot_fill_the_router_queue() {
    let server = start_with(|c| {
        c.router.workers = 1;
        c.server.max_inflight_per_connection = 8;
    })
    .await;
    server.fake.set_latency(Duration::from_millis(20));
    let mut hog = server.client().await;
    // 200 events without ref: no reply ever pushes back on the sender.
    let sending = tokio::spawn(async move {
        for i in 0..200 {
            hog.send(&format!(
                r#"{{"event":"weather.get","data":{{"city":"Hog{i}"}}}}"#
            ))
            .await;
        }
        hog
    });
    let mut deepest = 0.0_f64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.fake.calls() < 200 {
        deepest = deepest.max(server.sample("gale_router_queue_depth").await);
        assert!(
            Instant::now() < deadline,
            "{} of 200 ran",
            server.fake.calls()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(deepest <= 8.0, "one connection held {deepest} queue slots");
    let mut hog = sending.await.expect("sender");
    assert_eq!(
        hog.request("server.stats", Value::Null, "after").await["ok"],
        true,
        "read again once its events ran"
    );
    assert_eq!(
        server.sample("gale_router_queue_depth").await,
        0.0,
        "back to idle"
    );
}

#[tokio::test]
async fn a_crowd_of_busy_connections_leaves_room_for_others() {
    let server = start_with(|c| {
        c.router.workers = 1;
        c.router.queue_size = 100; // refused from 90 waiting
    })
    .await;
    server.fake.set_latency(Duration::from_millis(20));
    // Ten connections that never stop sending events.
    let mut crowd = Vec::new();
    for _ in 0..10 {
        crowd.push(server.client().await);
    }
    let mut hogs = Vec::new();
    for (h, mut hog) in crowd.into_iter().enumerate() {
        hogs.push(tokio::spawn(async move {
            for i in 0.. {
                hog.send(&format!(
                    r#"{{"event":"weather.get","data":{{"city":"Crowd{h}x{i}"}}}}"#
                ))
                .await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    // A connection read before the others were busy was held to a lone
    // connection's larger share, and on a loaded machine the crowd's
    // first events can all be read that way. The queue is first in,
    // first out, so once as many events have run as it holds, what was
    // admitted before the crowd was whole has run too.
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.fake.calls() < 100 {
        assert!(Instant::now() < deadline, "{} ran", server.fake.calls());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // From then on each holds at most its share, 90 / (10 + 1) = 8: the
    // queue keeps room below its drop threshold for anyone else.
    let mut deepest = 0.0_f64;
    for _ in 0..5 {
        deepest = deepest.max(server.sample("gale_router_queue_depth").await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(deepest > 40.0, "the crowd kept the queue busy: {deepest}");
    assert!(deepest <= 80.0, "the crowd filled {deepest} of 90");
    let mut light = server.client().await;
    let r = light
        .request("weather.get", json!({"city": "Newcomer"}), "me")
        .await;
    assert_eq!(r["ok"], true, "a newcomer is served: {r}");
    for hog in hogs {
        hog.abort();
    }
}

#[tokio::test]
async fn reconnecting_does_not_reset_an_anonymous_limit() {
    let server = start_with(|c| {
        override_event(c, "server.stats", |o| o.rate_limit = Some("2/min".into()));
        c.router.address_limit_factor = 2;
    })
    .await;
    let mut outcomes = Vec::new();
    for n in 0..3 {
        let mut c = server.client().await;
        for i in 0..2 {
            let r = c
                .request("server.stats", Value::Null, &format!("{n}.{i}"))
                .await;
            outcomes.push(r["ok"] == true);
        }
        // Gone before the next one comes: a reconnect, not a second user.
        drop(c);
        server.wait_metric("connections", 0).await;
    }
    assert_eq!(
        outcomes,
        [true, true, true, true, false, false],
        "two per connection, four per address"
    );
}

#[tokio::test]
async fn forwarded_addresses_count_only_from_trusted_proxies() {
    let limited = |c: &mut Config| {
        override_event(c, "server.stats", |o| o.rate_limit = Some("1/min".into()));
    };
    // A new connection from `ip` (as a proxy forwards it) asks for stats.
    async fn ask_from(server: &common::TestServer, ip: &str) -> Value {
        let mut c = server
            .client_with_headers("", &[("x-forwarded-for", ip.to_owned())])
            .await
            .expect("connect");
        c.request("server.stats", Value::Null, "s").await
    }

    // Not trusted: the header is ignored, both are 127.0.0.1.
    let server = start_with(limited).await;
    assert_eq!(ask_from(&server, "203.0.113.1").await["ok"], true);
    assert_eq!(
        code(&ask_from(&server, "203.0.113.2").await),
        "rate_limited"
    );

    // Behind a trusted proxy, two clients are two addresses.
    let server = start_with(|c| {
        limited(c);
        c.server.trusted_proxies = vec!["127.0.0.0/8".into()];
    })
    .await;
    assert_eq!(ask_from(&server, "203.0.113.1").await["ok"], true);
    assert_eq!(ask_from(&server, "203.0.113.2").await["ok"], true);
    assert_eq!(
        code(&ask_from(&server, "203.0.113.1").await),
        "rate_limited"
    );
}

#[tokio::test]
async fn a_weather_event_cut_off_by_its_handler_timeout_is_still_counted_and_logged() {
    let server = start_with(|c| {
        override_event(c, "weather.get", |o| o.timeout_ms = Some(200));
        override_event(c, "weather.subscribe", |o| o.timeout_ms = Some(200));
    })
    .await;
    server.fake.set_latency(Duration::from_secs(2));
    let mut c = server.client().await;
    let r = c.request("weather.get", json!({"city": "Lima"}), "g").await;
    assert_eq!(code(&r), "timeout", "{r}");
    let r = c
        .request("weather.subscribe", json!({"city": "Quito"}), "s")
        .await;
    assert_eq!(code(&r), "timeout", "{r}");
    server.wait_metric("db-completed", 2).await;
    let m = server.metrics().await;
    assert_eq!(m["requests"], 2, "{m}");
    assert_eq!(
        m["failed"], 2,
        "every request counted is failed or successful: {m}"
    );
    let rows = common::rows_for(&server.store_url, &c.client_id).await;
    let got: Vec<(&str, Option<&str>)> = rows
        .iter()
        .map(|r| (r.0.as_str(), r.3.as_deref()))
        .collect();
    assert_eq!(got, [("Lima", Some("timeout")), ("Quito", Some("timeout"))]);
}

#[tokio::test]
async fn a_closed_connections_rate_limit_buckets_are_forgotten() {
    let server = common::start().await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut c = server.client().await;
        let r = c
            .request(
                "weather.subscribe",
                serde_json::json!({"city": "Oslo"}),
                &i.to_string(),
            )
            .await;
        assert_eq!(r["ok"], true, "{r}");
        clients.push(c);
    }
    // One bucket per connection, and one for their shared address.
    assert_eq!(server.metric("rate-limit-buckets").await, 21);
    for mut c in clients {
        c.ws.close(None).await.expect("close");
    }
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while server.metric("connections").await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "connections closed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        server.metric("rate-limit-buckets").await,
        1,
        "only the address's bucket outlives its connections"
    );
}

/// Fifty users behind one address (a carrier's NAT) each make their
/// first subscribe at once: each has a user's allowance, not a fiftieth.
#[tokio::test]
async fn users_behind_one_address_each_have_a_full_allowance() {
    let server = start().await;
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(server.client().await);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let msg =
            json!({"event": "weather.subscribe", "data": {"city": "Oslo"}, "ref": i.to_string()});
        c.send(&msg.to_string()).await;
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let r = c.reply_to(&i.to_string()).await;
        assert_eq!(r["ok"], true, "user {i}: {r}");
    }
}

/// A client that floods events is stopped by its own limits before it
/// can spend the node's budget: another client is served.
#[tokio::test]
async fn one_client_cannot_spend_the_nodes_event_budget() {
    let server = start_with(|c| c.router.global_rate_limit = 40).await;
    let mut hog = server.client().await;
    for (event, n) in [("server.stats", 100), ("topic.unsubscribe", 200)] {
        for i in 0..n {
            let data = if event == "server.stats" {
                Value::Null
            } else {
                json!({"topic": "nothing"})
            };
            let msg = json!({"event": event, "data": data, "ref": format!("{event}{i}")});
            hog.send(&msg.to_string()).await;
        }
        hog.reply_to(&format!("{event}{}", n - 1)).await;
        let mut other = server.client_from("127.0.0.2").await;
        let r = other.request("server.stats", Value::Null, "o").await;
        assert_eq!(r["ok"], true, "after {n} {event} from another address: {r}");
    }
}
