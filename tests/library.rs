//! The engine as a library: an application built on `gale_engine`'s
//! public API alone (no weather, no notes), started on 127.0.0.1:0 and
//! spoken to over real WebSocket. Each seam of the Builder is checked
//! from the client's side: events, the plain-text slot, reserved topics,
//! the connect, subscribe, publish and disconnect hooks, pushes and
//! history through a Handle, metrics parts and shutdown steps.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::Client;
use gale_engine::config::{Config, PublishMode, SubscribeMode, TopicConfig};
use gale_engine::handle::Handle;
use gale_engine::hooks::{Connected, Refusal};
use gale_engine::metrics::Part;
use gale_engine::router::{Ctx, HandlerResult, Policy};
use gale_engine::server::{Builder, bind};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The application's own state, captured by its handlers.
#[derive(Default)]
struct Counts {
    greeted: AtomicUsize,
    left: AtomicUsize,
    stopped: AtomicUsize,
}

impl Part for Counts {
    fn json(&self, out: &mut serde_json::Map<String, Value>) {
        out.insert(
            "greeted".into(),
            self.greeted.load(Ordering::Relaxed).into(),
        );
    }
}

async fn greet(counts: Arc<Counts>, ctx: Ctx, data: Value) -> HandlerResult {
    counts.greeted.fetch_add(1, Ordering::Relaxed);
    Ok(json!({ "hello": ctx.caller.user.as_deref(), "name": data["name"] }))
}

/// Connects with `x-api-key: key` when given, and checks the
/// application's greeting.
async fn connect(url: &str, key: Option<&str>) -> Client {
    let headers: Vec<(&'static str, String)> = key
        .map(|k| ("x-api-key", k.to_owned()))
        .into_iter()
        .collect();
    let (c, hello) = Client::connect_with_headers(url, &headers)
        .await
        .expect("connected");
    assert_eq!(hello["message"], "say something");
    c
}

#[tokio::test]
async fn an_application_on_the_public_api_alone() {
    let mut config = Config::default();
    config.proxy.headers = vec!["x-api-key".into()];
    config.topics.insert(
        "room:*".into(),
        TopicConfig {
            subscribe: Some(SubscribeMode::Anyone),
            publish: Some(PublishMode::Subscribers),
            ..TopicConfig::history(10, 60)
        },
    );
    let listener = bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://{}/ws", listener.local_addr().expect("addr"));
    let shutdown = CancellationToken::new();
    let counts = Arc::new(Counts::default());

    let mut builder = Builder::new(config).await.expect("builds");
    let c = counts.clone();
    builder
        .registry()
        .register("greet", Policy::default(), move |ctx, data| {
            greet(c.clone(), ctx, data)
        });
    builder.text("say something", |ctx, text| async move {
        format!(
            "{} said {}",
            ctx.caller.conn_id,
            text.as_str().to_uppercase()
        )
    });
    builder.reserve_topics("private:", "private: topics are the server's");
    builder.on_connect(|req| async move {
        match req.headers.iter().find(|(h, _)| h == "x-api-key") {
            Some((_, k)) if k == "open-sesame" => Ok(Some(Connected {
                user: Some("ann".into()),
                ..Connected::default()
            })),
            Some(_) => Err(Refusal::denied("unknown key")),
            None => Ok(None),
        }
    });
    builder.on_subscribe(|_who, topic| async move {
        if topic == "room:secret" {
            return Err(Refusal::denied("not this one"));
        }
        Ok(())
    });
    builder.on_publish(|who, _topic, mut data| async move {
        data["by"] = who.user.as_deref().unwrap_or("someone").into();
        Ok(data)
    });
    let c = counts.clone();
    builder.on_disconnect(move |_who| {
        c.left.fetch_add(1, Ordering::Relaxed);
    });
    builder.metrics().add_part(counts.clone());
    let c = counts.clone();
    builder.on_shutdown(move |_left| async move {
        c.stopped.fetch_add(1, Ordering::Relaxed);
        Ok::<(), std::io::Error>(())
    });
    let running = builder
        .start(listener, shutdown.clone())
        .await
        .expect("starts");
    let gale: Handle = running.handle();

    // An event of the application's, with its state and the caller.
    let mut ann = connect(&url, Some("open-sesame")).await;
    let r = ann.request("greet", json!({"name": "x"}), "1").await;
    assert_eq!(r["data"], json!({"hello": "ann", "name": "x"}), "{r}");
    assert_eq!(gale.app().metrics.to_json()["greeted"], 1);

    // Plain text goes to the text handler.
    ann.send("hi").await;
    assert!(ann.next_text().await.ends_with("said HI"));

    // A wrong key is refused at the handshake; no key is anonymous.
    let refused = Client::connect_with_headers(&url, &[("x-api-key", "wrong".to_owned())]).await;
    assert_eq!(refused.err(), Some(403));
    let mut anon = connect(&url, None).await;
    let r = anon.request("greet", Value::Null, "2").await;
    assert_eq!(r["data"]["hello"], Value::Null, "{r}");

    // Reserved topics and the subscribe hook refuse; the rest is open.
    let r = ann
        .request("topic.subscribe", json!({"topic": "private:x"}), "3")
        .await;
    assert_eq!(r["error"]["field"], "topic", "{r}");
    let r = ann
        .request("topic.subscribe", json!({"topic": "room:secret"}), "4")
        .await;
    assert_eq!(r["error"]["code"], "permission_denied", "{r}");
    let r = ann
        .request("topic.subscribe", json!({"topic": "room:a"}), "5")
        .await;
    assert_eq!(r["ok"], true, "{r}");

    // A client's publication passes the publish hook; a Handle's does not.
    let r = ann
        .request(
            "topic.publish",
            json!({"topic": "room:a", "data": {"text": "yo"}}),
            "6",
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let push = ann.next_push().await;
    assert_eq!(push["data"], json!({"text": "yo", "by": "ann"}), "{push}");
    gale.to_topic("room:a", "notice", &json!({"n": 1}))
        .expect("pushed");
    let push = ann.next_push().await;
    assert_eq!(
        (push["event"].clone(), push["data"].clone()),
        ("notice".into(), json!({"n": 1})),
        "{push}"
    );
    gale.to_user("ann", "dm", &json!({})).expect("pushed");
    assert_eq!(ann.next_push().await["event"], "dm");

    // History and presence through the Handle.
    let history = gale.history("room:a", 10).await.expect("history");
    assert_eq!(
        history["publications"].as_array().map(Vec::len),
        Some(2),
        "{history}"
    );
    assert_eq!(gale.presence("room:a").await["count"], 1);
    assert!(gale.is_online("ann"));

    // Disconnects are seen once each; the shutdown step runs.
    drop(anon);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while counts.left.load(Ordering::Relaxed) < 1 {
        assert!(tokio::time::Instant::now() < deadline, "disconnect seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    running.wait().await.expect("clean shutdown");
    assert_eq!(counts.left.load(Ordering::Relaxed), 2, "both connections");
    assert_eq!(counts.stopped.load(Ordering::Relaxed), 1);
}
