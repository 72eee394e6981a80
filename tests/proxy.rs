//! The application's backend in the loop: connect, refresh, subscribe,
//! publish, RPC and lifecycle notifications, against a real HTTP backend
//! (`common::backend`), including a slow, failing and garbage-answering
//! one.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::backend::{Backend, Reply};
use common::{TestServer, start_with};
use gale::config::{Config, PublishMode, SubscribeMode, TopicConfig};
use serde_json::{Value, json};

fn code(r: &Value) -> &str {
    r["error"]["code"].as_str().unwrap_or("")
}

/// The server with `backend` for every kind of call and a few topics.
fn wired(c: &mut Config, backend: &Backend) {
    c.api.key = Some(common::API_KEY_LONG.into());
    c.auth.jwt_secret = Some("proxy-secret".into());
    c.proxy.connect_url = Some(backend.url("connect"));
    c.proxy.refresh_url = Some(backend.url("refresh"));
    c.proxy.subscribe_url = Some(backend.url("subscribe"));
    c.proxy.publish_url = Some(backend.url("publish"));
    c.proxy.rpc_url = Some(backend.url("rpc"));
    c.proxy.rpc_events = vec!["orders.*".into()];
    c.proxy.timeout_ms = 500;
    c.proxy
        .static_headers
        .insert("X-Gale-Secret".into(), "s3cret".into());
    c.topics.insert(
        "room:*".into(),
        TopicConfig {
            subscribe: Some(SubscribeMode::Proxy),
            publish: Some(PublishMode::Proxy),
            ..TopicConfig::default()
        },
    );
}

/// Connects with a `Cookie` header (the backend decides who it is).
async fn with_cookie(server: &TestServer, cookie: &str) -> Result<common::Client, u16> {
    server
        .client_with_headers("", &[("cookie", cookie.to_owned())])
        .await
}

/// The backend's connect: the cookie `session=NAME` is the user NAME.
fn sessions() -> Reply {
    Reply::With(Arc::new(|body: &Value| {
        let cookie = body["headers"]["cookie"].as_str().unwrap_or("");
        match cookie.strip_prefix("session=") {
            Some(name) => {
                json!({"result": {"user": name, "roles": ["member"], "info": {"name": name.to_uppercase()}, "topics": ["room:welcome"]}})
            }
            None => json!({"error": {"code": "no_session", "message": "log in first"}}),
        }
    }))
}

#[tokio::test]
async fn the_backend_says_who_a_connection_is_from_its_cookie() {
    let backend = Backend::start().await;
    backend.set("connect", sessions());
    let server = start_with(|c| wired(c, &backend)).await;
    let mut alice = with_cookie(&server, "session=alice").await.expect("in");
    // Signed in as the backend said: notes need a user.
    let r = alice.request("notes.list", Value::Null, "n").await;
    assert_eq!(r["ok"], true, "{r}");
    let call = &backend.calls_of("connect")[0];
    assert_eq!(call.body["headers"]["cookie"], "session=alice");
    assert_eq!(call.body["transport"], "websocket");
    assert_eq!(
        call.body["client"],
        alice.client_id.as_str(),
        "the client_id it will have"
    );
    assert_eq!(call.headers["x-gale-secret"], "s3cret", "static headers");
    assert!(
        call.body["headers"].get("user-agent").is_none(),
        "only the allowed headers"
    );
    // Subscribed at once to what the backend named: a push reaches it.
    let (status, _) = common::publish(
        &server,
        Some(common::API_KEY_LONG),
        r#"{"event":"hello","topic":"room:welcome"}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(alice.next_push().await["event"], "hello");

    // Refused: the backend's error is the handshake's answer.
    assert_eq!(with_cookie(&server, "other=1").await.err(), Some(403));
    backend.set(
        "connect",
        Reply::Json(json!({"disconnect": {"code": 4003, "reason": "banned"}})),
    );
    assert_eq!(
        with_cookie(&server, "session=mallory").await.err(),
        Some(403)
    );
}

#[tokio::test]
async fn a_dead_or_slow_backend_refuses_at_its_deadline_and_opens_the_breaker() {
    let backend = Backend::start().await;
    backend.set(
        "connect",
        Reply::Slow(
            Duration::from_secs(5),
            Box::new(Reply::Json(json!({"result": {}}))),
        ),
    );
    let server = start_with(|c| {
        wired(c, &backend);
        c.proxy.breaker_failures = 3;
        c.proxy.breaker_cooldown_ms = 60_000;
    })
    .await;
    let started = Instant::now();
    assert_eq!(with_cookie(&server, "session=a").await.err(), Some(503));
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1_500),
        "at the 500 ms deadline: {took:?}"
    );
    // Others are served meanwhile: a plain-text lookup needs no backend…
    // …and a JWT connection needs no connect call at all.
    backend.set("connect", Reply::Status(500));
    assert_eq!(with_cookie(&server, "session=a").await.err(), Some(503));
    backend.set("connect", Reply::Garbage);
    assert_eq!(with_cookie(&server, "session=a").await.err(), Some(503));
    // Three failures in a row: the breaker is open, and fails fast.
    let before = backend.calls_of("connect").len();
    let started = Instant::now();
    assert_eq!(with_cookie(&server, "session=a").await.err(), Some(503));
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        backend.calls_of("connect").len(),
        before,
        "not called while open"
    );
    assert!(
        server
            .sample("gale_proxy_calls_total{kind=\"Connect\",result=\"Open\"}")
            .await
            >= 1.0
    );
    assert_eq!(
        server
            .sample("gale_proxy_calls_total{kind=\"Connect\",result=\"Timeout\"}")
            .await,
        1.0
    );
    // The breaker is the connect endpoint's: an RPC still reaches the
    // backend.
    let token = common::hs256_token_with("proxy-secret", json!({"sub": "bo"}));
    let mut bo = server.client_with_token(&token).await;
    let r = bo.request("orders.get", json!({}), "1").await;
    assert_eq!(r["ok"], true, "{r}");
}

#[tokio::test]
async fn with_auth_required_the_backend_must_name_a_user() {
    let backend = Backend::start().await;
    backend.set(
        "connect",
        Reply::With(Arc::new(|body: &Value| {
            match body["headers"]["cookie"].as_str() {
                Some("session=alice") => json!({"result": {"user": "alice"}}),
                _ => json!({"result": {}}),
            }
        })),
    );
    let server = start_with(|c| {
        wired(c, &backend);
        c.auth.required = true;
    })
    .await;
    assert!(with_cookie(&server, "session=alice").await.is_ok());
    assert_eq!(
        with_cookie(&server, "session=none").await.err(),
        Some(401),
        "no user named: not let in anonymously"
    );
}

#[tokio::test]
async fn subscriptions_and_publications_are_the_backends_to_decide() {
    let backend = Backend::start().await;
    backend.set("connect", sessions());
    backend.set(
        "subscribe",
        Reply::With(Arc::new(|b: &Value| {
            if b["topic"] == "room:vip" && b["user"] != "alice" {
                json!({"error": {"code": 4031, "message": "VIPs only"}})
            } else {
                json!({"result": {}})
            }
        })),
    );
    backend.set(
        "publish",
        Reply::With(Arc::new(|b: &Value| {
            let text = b["data"]["text"].as_str().unwrap_or("");
            if text.contains("spam") {
                json!({"error": {"code": "spam", "message": "no spam"}})
            } else {
                json!({"result": {"data": {"text": text.to_uppercase(), "by": b["user"]}}})
            }
        })),
    );
    let server = start_with(|c| wired(c, &backend)).await;
    let mut alice = with_cookie(&server, "session=alice").await.expect("in");
    let mut bob = with_cookie(&server, "session=bob").await.expect("in");
    let sub = |t: &str| json!({"topic": t});
    assert_eq!(
        alice.request("topic.subscribe", sub("room:vip"), "1").await["ok"],
        true
    );
    let r = bob.request("topic.subscribe", sub("room:vip"), "2").await;
    assert_eq!(
        r["error"],
        json!({"code": 4031, "message": "VIPs only", "application": true}),
        "the backend's own: {r}"
    );
    assert_eq!(
        bob.request("topic.subscribe", sub("room:1"), "3").await["ok"],
        true
    );
    assert_eq!(
        alice.request("topic.subscribe", sub("room:1"), "4").await["ok"],
        true
    );

    let r = bob
        .request(
            "topic.publish",
            json!({"topic": "room:1", "data": {"text": "hello"}}),
            "5",
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let push = alice.next_push().await;
    assert_eq!(
        push["data"],
        json!({"text": "HELLO", "by": "bob"}),
        "rewritten: {push}"
    );
    let r = bob
        .request(
            "topic.publish",
            json!({"topic": "room:1", "data": {"text": "buy spam"}}),
            "6",
        )
        .await;
    assert_eq!(r["error"]["code"], "spam", "{r}");

    // A backend that answers a disconnect closes the connection.
    backend.set(
        "subscribe",
        Reply::Json(json!({"disconnect": {"code": 4009, "reason": "go away"}})),
    );
    bob.send(&json!({"event": "topic.subscribe", "data": sub("room:2"), "ref": "7"}).to_string())
        .await;
    let close = bob.expect_close().await;
    assert_eq!(u16::from(close.code), 4009);
    assert_eq!(close.reason.as_str(), "go away");
}

#[tokio::test]
async fn rpc_events_are_answered_by_the_backend_under_the_routers_policies() {
    let backend = Backend::start().await;
    backend.set("connect", sessions());
    backend.set(
        "rpc",
        Reply::With(Arc::new(|b: &Value| match b["event"].as_str() {
            Some("orders.create") => {
                json!({"result": {"id": 7, "by": b["user"], "echo": b["data"]}})
            }
            _ => json!({"error": {"code": "unknown_order_op", "message": "no such operation"}}),
        })),
    );
    let server = start_with(|c| {
        wired(c, &backend);
        c.events.insert(
            "orders.create".into(),
            toml::from_str(r#"rate_limit = "2/min""#).expect("override"),
        );
    })
    .await;
    let mut alice = with_cookie(&server, "session=alice").await.expect("in");
    let r = alice
        .request("orders.create", json!({"item": "book"}), "1")
        .await;
    assert_eq!(
        r["data"],
        json!({"id": 7, "by": "alice", "echo": {"item": "book"}}),
        "{r}"
    );
    let r = alice.request("orders.cancel", json!({}), "2").await;
    assert_eq!(r["error"]["code"], "unknown_order_op", "{r}");
    assert_eq!(
        r["error"]["application"], true,
        "the backend's, not gale's: {r}"
    );
    let r = alice.request("billing.pay", json!({}), "3").await;
    assert_eq!(code(&r), "unknown_event", "not forwarded: {r}");
    assert!(r["error"].get("application").is_none(), "gale's own: {r}");
    // The override's rate limit: 2 a minute.
    alice.request("orders.create", json!({}), "4").await;
    let r = alice.request("orders.create", json!({}), "5").await;
    assert_eq!(code(&r), "rate_limited", "{r}");
    assert_eq!(
        backend.calls_of("rpc").len(),
        3,
        "the refused one never left"
    );
    // A backend that does not answer: the event's own error, at the
    // proxy's deadline; the connection goes on.
    backend.set(
        "rpc",
        Reply::Slow(
            Duration::from_secs(3),
            Box::new(Reply::Json(json!({"result": {}}))),
        ),
    );
    let r = alice.request("orders.cancel", json!({}), "6").await;
    assert_eq!(code(&r), "timeout", "{r}");
    assert_eq!(alice.ask("Oslo").await["type"], "weather");
}

#[tokio::test]
async fn identities_are_refreshed_before_they_end_or_closed() {
    let backend = Backend::start().await;
    let expire = || chrono::Utc::now().timestamp() as u64 + 2;
    backend.set(
        "connect",
        Reply::With(Arc::new(
            move |_| json!({"result": {"user": "alice", "expire_at": expire()}}),
        )),
    );
    backend.set(
        "refresh",
        Reply::With(Arc::new(
            move |_| json!({"result": {"expire_at": chrono::Utc::now().timestamp() as u64 + 60}}),
        )),
    );
    let server = start_with(|c| {
        wired(c, &backend);
        c.server.ping_interval_s = 1;
    })
    .await;
    let mut alice = with_cookie(&server, "session=alice").await.expect("in");
    backend.wait_calls("refresh", |c| !c.is_empty()).await;
    // Past the first expiry (2 s), reading all along (a client that does
    // not read misses the pings of a 1 s interval).
    for i in 0..8 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let r = alice
            .request("notes.list", Value::Null, &i.to_string())
            .await;
        assert_eq!(r["ok"], true, "still open: {r}");
    }
    assert_eq!(backend.calls_of("refresh")[0].body["user"], "alice");

    // Refused: closed.
    backend.set(
        "refresh",
        Reply::Json(json!({"error": {"code": "expired", "message": "log in again"}})),
    );
    let mut bob = with_cookie(&server, "session=bob").await.expect("in");
    let close = bob.expect_close().await;
    assert_eq!(u16::from(close.code), 1008, "{close:?}");
}

#[tokio::test]
async fn lifecycle_notifications_say_online_once_and_offline_after_the_grace() {
    let backend = Backend::start().await;
    backend.set("connect", sessions());
    let server = start_with(|c| {
        wired(c, &backend);
        c.proxy.events_url = Some(backend.url("events"));
        c.proxy.events = vec![
            "user.online".into(),
            "user.offline".into(),
            "connection.closed".into(),
        ];
        c.proxy.offline_grace_ms = 500;
    })
    .await;
    let tab1 = with_cookie(&server, "session=alice").await.expect("in");
    let tab2 = with_cookie(&server, "session=alice").await.expect("in");
    drop(tab1);
    // A reload within the grace: no offline.
    let tab3 = with_cookie(&server, "session=alice").await.expect("in");
    drop(tab2);
    drop(tab3);
    let deadline = Instant::now() + common::WAIT;
    let kinds = loop {
        let seen = backend.notifications();
        let kinds: Vec<String> = seen
            .iter()
            .filter(|n| n["user"] == "alice" && n["type"] != "connection.closed")
            .map(|n| n["type"].as_str().unwrap_or("").to_owned())
            .collect();
        if kinds.len() >= 2 || Instant::now() > deadline {
            break kinds;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        kinds,
        ["user.online", "user.offline"],
        "{:?}",
        backend.notifications()
    );
    let closed = backend
        .notifications()
        .iter()
        .filter(|n| n["type"] == "connection.closed")
        .count();
    assert_eq!(closed, 3);

    // The backend down: notifications wait and arrive once it is back.
    backend.set("events", Reply::Status(503));
    let again = with_cookie(&server, "session=bob").await.expect("in");
    backend
        .wait_calls("events", |c| {
            c.iter()
                .filter(|c| c.body.to_string().contains("bob"))
                .count()
                >= 2
        })
        .await;
    backend.set("events", Reply::Json(json!({"result": {}})));
    let deadline = Instant::now() + common::WAIT;
    while !backend
        .notifications()
        .iter()
        .any(|n| n["user"] == "bob" && n["type"] == "user.online")
    {
        assert!(Instant::now() < deadline, "never delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(again);
}
