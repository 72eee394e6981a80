//! `examples/chat.rs`, the chat server built on the engine's public API,
//! run as its own process and spoken to over real WebSocket: rooms with
//! permissions, `chat.send` pushing `chat.message`, its rate limit,
//! presence, and recovery from history.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Client, hs256_token};
use serde_json::json;

const SECRET: &str = "a-chat-secret-of-at-least-32-bytes!!";

/// The example's process, stopped when dropped.
struct Chat {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Chat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds the example if this test run did not, starts it on a free
/// port in an empty directory (no gale.toml) and reads its address from
/// its log.
fn start() -> Chat {
    let exe = std::env::current_exe().expect("test exe");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join("examples/chat");
    if !bin.exists() {
        let built = Command::new(env!("CARGO"))
            .args(["build", "--example", "chat"])
            .status()
            .expect("cargo build --example chat");
        assert!(built.success(), "the example builds");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(&bin)
        .current_dir(dir.path())
        .env("GALE_SERVER__LISTEN", "127.0.0.1:0")
        .env("GALE_AUTH__JWT_SECRET", SECRET)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the example");
    let out = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(out).lines().map_while(Result::ok);
    let url = lines
        .find_map(|line| {
            let rest = line.split("chat rooms at ").nth(1)?;
            let end = rest.find(|c: char| c.is_whitespace() || c == '\x1b');
            Some(rest[..end.unwrap_or(rest.len())].to_owned())
        })
        .expect("the example says where it listens");
    // The rest of its log is read (and dropped) so its writes never fail.
    std::thread::spawn(move || lines.for_each(drop));
    Chat {
        child,
        url,
        _dir: dir,
    }
}

async fn join(chat: &Chat, user: &str) -> Client {
    let token = hs256_token(SECRET, user, json!([]));
    let mut c = Client::connect(&format!("{}?token={token}", chat.url)).await;
    assert_eq!(c.recv_json().await["type"], "connected");
    c
}

#[tokio::test]
async fn rooms_messages_limits_presence_and_recovery() {
    let chat = start();
    let mut alice = join(&chat, "alice").await;
    let mut bob = join(&chat, "bob").await;
    let room = json!({"topic": "room:lobby"});
    assert_eq!(
        alice.request("topic.subscribe", room.clone(), "a1").await["ok"],
        true
    );
    let joined = bob.request("topic.subscribe", room.clone(), "b1").await;
    assert_eq!(joined["ok"], true, "{joined}");
    let (offset, epoch) = (
        joined["data"]["offset"].clone(),
        joined["data"]["epoch"].clone(),
    );

    // Sent by alice, pushed to the room, bob included.
    let sent = alice
        .request("chat.send", json!({"room": "lobby", "text": " hi "}), "a2")
        .await;
    assert_eq!(sent["ok"], true, "{sent}");
    let push = loop {
        let p = bob.next_push().await;
        if p["event"] == "chat.message" {
            break p;
        }
    };
    assert_eq!(
        push["data"],
        json!({"room": "lobby", "user": "alice", "text": "hi"})
    );

    // Who is there.
    let present = bob.request("topic.presence", room.clone(), "b2").await;
    assert_eq!(present["data"]["users"], 2, "{present}");

    // Not in the room, or not signed in: refused.
    let mut carol = join(&chat, "carol").await;
    let outside = carol
        .request("chat.send", json!({"room": "lobby", "text": "x"}), "c1")
        .await;
    assert_eq!(outside["error"]["code"], "permission_denied", "{outside}");
    let mut anonymous = Client::connect(&chat.url).await;
    assert_eq!(anonymous.recv_json().await["type"], "connected");
    let denied = anonymous
        .request("topic.subscribe", room.clone(), "n1")
        .await;
    assert_eq!(denied["ok"], false, "{denied}");
    let unsigned = anonymous
        .request("chat.send", json!({"room": "lobby", "text": "x"}), "n2")
        .await;
    assert_eq!(unsigned["error"]["code"], "unauthorized", "{unsigned}");

    // Five a second: the sixth within the second is refused.
    let mut limited = false;
    for i in 0..8 {
        let r = alice
            .request(
                "chat.send",
                json!({"room": "lobby", "text": format!("m{i}")}),
                &format!("r{i}"),
            )
            .await;
        limited |= r["error"]["code"] == "rate_limited";
    }
    assert!(limited, "chat.send is rate limited");

    // Bob leaves and comes back: what he missed is recovered.
    drop(bob);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut bob = join(&chat, "bob").await;
    let back = bob
        .request(
            "topic.subscribe",
            json!({"topic": "room:lobby", "since": {"offset": offset, "epoch": epoch}}),
            "b3",
        )
        .await;
    assert_eq!(back["data"]["recovered"], true, "{back}");
    let missed = back["data"]["publications"]
        .as_array()
        .expect("publications");
    assert!(!missed.is_empty(), "{back}");
    assert!(
        missed
            .iter()
            .all(|p| p["event"] == "chat.message" && p["data"]["user"] == "alice")
    );
}
