//! The `gale` binary itself: start-up errors exit 2 with a one-line
//! message naming the setting; `gale client --send` round-trips; `gale
//! serve` stops cleanly on SIGTERM.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::start;

const GALE: &str = env!("CARGO_BIN_EXE_gale");

/// Runs `gale serve` with the given environment and expects exit 2 with a
/// one-line error that mentions `needle`.
fn refuses_to_start(env: &[(&str, &str)], args: &[&str], needle: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(GALE)
        .arg("serve")
        .args(args)
        .env(
            "GALE_STORE__URL",
            format!("sqlite://{}/g.db", dir.path().display()),
        )
        .env("GALE_SERVER__LISTEN", "127.0.0.1:0")
        .env_remove("WEATHER_API_KEY")
        .envs(env.iter().copied())
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run gale");
    // A server that starts after all must not hang the test.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("gale serve started with {env:?} {args:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{env:?} {args:?}: {stderr}");
    let line = stderr.trim();
    assert!(!line.contains('\n'), "one line: {line:?}");
    assert!(line.contains(needle), "{line:?} should name {needle}");
}

#[test]
fn bad_settings_stop_start_up_with_exit_2() {
    refuses_to_start(
        &[("GALE_WEATHER__PROVIDER", "darksky")],
        &[],
        "weather.provider",
    );
    refuses_to_start(
        &[("GALE_WEATHER__BASE_URL", "not a url")],
        &[],
        "weather.base_url",
    );
    refuses_to_start(&[("GALE_STORE__WORKERS", "0")], &[], "store.workers");
    refuses_to_start(&[("GALE_STORE__URL", "mysql://db/x")], &[], "store.url");
    refuses_to_start(
        &[("GALE_SERVER__MAX_CONNECTIONS", "0")],
        &[],
        "server.max_connections",
    );
    refuses_to_start(
        &[],
        &["--config", "/no/such/file.toml"],
        "/no/such/file.toml",
    );
}

#[test]
fn port_in_use_stops_start_up_with_exit_2() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    refuses_to_start(&[], &["--listen", &addr], "server.listen");
}

#[tokio::test]
async fn client_send_prints_the_reply_and_sets_the_exit_code() {
    let server = start().await;
    let url = server.ws_url();
    let run = |city: &'static str| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(GALE)
                .args(["client", &url, "--send", city])
                .output()
                .expect("run gale client")
        })
    };
    let out = run("London").await.expect("join");
    assert!(out.status.success(), "{out:?}");
    let reply: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is the JSON reply");
    assert_eq!(reply["type"], "weather");
    assert_eq!(reply["city"], "London");

    let out = run("Atlantis").await.expect("join");
    assert_eq!(out.status.code(), Some(1), "error reply exits non-zero");
    assert!(String::from_utf8_lossy(&out.stdout).contains("not found"));
}

#[tokio::test]
async fn client_token_flag_signs_in() {
    let server = common::start_with(|c| {
        c.auth.jwt_secret = Some("cli-secret".into());
        c.auth.required = true;
    })
    .await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": "cli-user", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(b"cli-secret"),
    )
    .expect("sign");
    let url = server.ws_url();
    let out = tokio::task::spawn_blocking(move || {
        let with = Command::new(GALE)
            .args(["client", &url, "--token", &token, "--send"])
            .arg(r#"{"event":"notes.list","ref":"1"}"#)
            .output()
            .expect("run");
        let without = Command::new(GALE)
            .args(["client", &url, "--send", "Oslo"])
            .env_remove("GALE_TOKEN")
            .output()
            .expect("run");
        (with, without)
    })
    .await
    .expect("join");
    assert!(out.0.status.success(), "{:?}", out.0);
    let reply: serde_json::Value = serde_json::from_slice(&out.0.stdout).expect("json");
    assert_eq!(
        reply,
        serde_json::json!({"reply":"1","ok":true,"data":{"notes":[],"next":null}})
    );
    assert_eq!(out.1.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.1.stderr).contains("401"),
        "{:?}",
        out.1
    );
}

#[tokio::test]
async fn client_publishes_and_calls_the_backend() {
    let backend = common::backend::Backend::start().await;
    backend.set(
        "rpc",
        common::backend::Reply::With(std::sync::Arc::new(
            |body| serde_json::json!({"result": {"echo": body["data"], "by": body["user"]}}),
        )),
    );
    let rpc_url = backend.url("rpc");
    let server = common::start_with(move |c| {
        c.auth.jwt_secret = Some("cli-secret".into());
        c.topics.insert(
            "room:*".into(),
            gale::config::TopicConfig {
                publish: Some(gale::config::PublishMode::Users),
                ..gale::config::TopicConfig::default()
            },
        );
        c.proxy.rpc_url = Some(rpc_url);
        c.proxy.rpc_events = vec!["orders.*".into()];
    })
    .await;
    let mut watcher = server.client().await;
    let sub = watcher
        .request(
            "topic.subscribe",
            serde_json::json!({"topic": "room:1"}),
            "s",
        )
        .await;
    assert_eq!(sub["ok"], true, "{sub}");
    let token = common::hs256_token_with("cli-secret", serde_json::json!({"sub": "ann"}));
    let url = server.ws_url();
    let run = move |args: Vec<String>| {
        let token = token.clone();
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(GALE)
                .args(["client", &url, "--token", &token])
                .args(args)
                .output()
                .expect("run")
        })
    };
    let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();

    let out = run(args(&["--publish", "room:1", "--data", r#"{"text":"hi"}"#]))
        .await
        .expect("join");
    assert!(out.status.success(), "{out:?}");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        reply["data"],
        serde_json::json!({"topic": "room:1", "accepted": true})
    );
    let push = watcher.next_push().await;
    assert_eq!(
        (
            push["event"].clone(),
            push["data"].clone(),
            push["user"].clone()
        ),
        (
            serde_json::json!("topic.message"),
            serde_json::json!({"text": "hi"}),
            serde_json::json!("ann")
        )
    );

    let out = run(args(&["--call", "orders.create", "--data", r#"{"n":2}"#]))
        .await
        .expect("join");
    assert!(out.status.success(), "{out:?}");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        reply["data"],
        serde_json::json!({"echo": {"n": 2}, "by": "ann"})
    );

    // Refused: printed, and the exit code says so.
    let out = run(args(&["--publish", "closed", "--data", "1"]))
        .await
        .expect("join");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("permission_denied"),
        "{out:?}"
    );
    let out = run(args(&["--call", "x", "--data", "{nope"]))
        .await
        .expect("join");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--data is not JSON"),
        "{out:?}"
    );
}

#[tokio::test]
async fn client_send_fails_when_nothing_listens() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("ws://{}/ws", free.local_addr().expect("addr"));
    drop(free);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(GALE)
            .args(["client", &url, "--send", "London", "--timeout-ms", "2000"])
            .output()
            .expect("run")
    })
    .await
    .expect("join");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}

#[tokio::test]
async fn serve_binary_round_trips_and_exits_0_on_sigterm() {
    let fake = gale::fake_upstream::FakeUpstream::start("127.0.0.1:0")
        .await
        .expect("fake");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let child = tokio::process::Command::new(GALE)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("GALE_WEATHER__BASE_URL", fake.url())
        .env(
            "GALE_STORE__URL",
            format!("sqlite://{}/g.db", dir.path().display()),
        )
        .env("GALE_STORE__SPILL_DIR", dir.path().join("spill"))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while common::http_get(addr, "/healthz").await.map(|r| r.0) != Some(200) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "serve never came up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Default provider (Open-Meteo) against the fake.
    let url = format!("ws://{addr}/ws");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(GALE)
            .args(["client", &url, "--send", "Paris"])
            .output()
            .expect("client")
    })
    .await
    .expect("join");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(r#""city":"Paris""#));

    let pid = child.id().expect("pid").to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("exits after SIGTERM")
        .expect("wait");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn bench_prints_json_and_refuses_non_loopback_targets() {
    let server = start().await;
    let url = server.ws_url();
    let (ok, refused) = tokio::task::spawn_blocking(move || {
        let ok = Command::new(GALE)
            .args(["bench", "requests", &url, "-n", "3", "-d", "1", "--json"])
            .output()
            .expect("run");
        let refused = Command::new(GALE)
            .args(["bench", "requests", "ws://10.0.0.1:8080/ws", "-d", "1"])
            .output()
            .expect("run");
        (ok, refused)
    })
    .await
    .expect("join");
    assert!(ok.status.success(), "{ok:?}");
    let report: serde_json::Value = serde_json::from_slice(&ok.stdout).expect("JSON on stdout");
    assert_eq!(report["scenario"], "requests");
    assert_eq!(report["connected"], 3);
    assert!(report["replies"].as_u64().expect("replies") > 0);
    for key in ["p50", "p90", "p99", "p99.9", "max"] {
        assert!(report["latency_ms"][key].is_number(), "{key} in {report}");
    }
    assert!(report["generator_cpu_percent"].is_number());
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("127.0.0.0/8"));
}

#[tokio::test]
async fn bench_procs_merges_worker_reports_exactly() {
    let server = start().await;
    let url = server.ws_url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(GALE)
            .args([
                "bench",
                "requests",
                &url,
                "-n",
                "9",
                "--procs",
                "3",
                "--sources",
                "2",
            ])
            .args(["--per-connection", "4", "-d", "20", "--json"])
            .output()
            .expect("run")
    })
    .await
    .expect("join");
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("merged JSON");
    assert_eq!(
        report["connected"], 9,
        "3 workers x 3 connections: {report}"
    );
    assert_eq!(report["replies"], 36, "9 connections x 4 requests");
    assert_eq!(
        report["latency_ms"]["samples"], 36,
        "histograms merged sample by sample"
    );
    assert_eq!(server.metric("requests").await, 36);
}

/// Runs `gale serve` with `var=value`: it must either exit 2 with one line
/// naming `key`, or start and exit 0 on SIGTERM. Never a panic.
fn start_or_refuse(key: &str, var: &str, value: &str, db: &str) -> Result<(), String> {
    use std::io::{BufRead, BufReader};
    // Each run its own spill: one process per spill directory.
    let spill = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut child = Command::new(GALE)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env(var, value)
        .env("GALE_STORE__URL", db)
        .env("GALE_STORE__SPILL_DIR", spill.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let case = format!("{var}={value}");
    let mut log = Vec::new();
    let started = loop {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => {
                let up = line.contains("gale listening");
                log.push(line);
                if up {
                    break true;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break false,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                return Err(format!(
                    "{case}: neither started nor exited in 20 s: {log:?}"
                ));
            }
        }
    };
    if started {
        let pid = child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .map_err(|e| e.to_string())?;
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    log.extend(rx.try_iter());
    let text = log.join("\n");
    match (started, status.code()) {
        (true, Some(0)) => Ok(()),
        (false, Some(2)) if text.contains(key) && log.len() == 1 => Ok(()),
        _ => Err(format!("{case}: {status} (started: {started}):\n{text}")),
    }
}

#[tokio::test]
async fn every_number_setting_at_zero_or_its_largest_value_starts_or_exits_2() {
    let defaults = toml::Table::try_from(gale::config::Config::default()).expect("table");
    let mut cases = Vec::new();
    for (section, keys) in &defaults {
        for (key, value) in keys.as_table().into_iter().flatten() {
            if value.is_integer() {
                for v in ["0", "9223372036854775807"] {
                    let var = format!("GALE_{}__{}", section.to_uppercase(), key.to_uppercase());
                    cases.push((format!("{section}.{key}"), var, v));
                }
            }
        }
    }
    assert!(cases.len() > 60, "{} cases", cases.len());
    let dir = tempfile::tempdir().expect("tempdir");
    let mut failures = Vec::new();
    for (n, chunk) in cases.chunks(8).enumerate() {
        let runs: Vec<_> = chunk
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, (key, var, value))| {
                let db = format!("sqlite://{}/c{n}-{i}.db", dir.path().display());
                tokio::task::spawn_blocking(move || start_or_refuse(&key, &var, value, &db))
            })
            .collect();
        for run in runs {
            if let Err(e) = run.await.expect("join") {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test]
async fn an_api_key_shorter_than_16_characters_is_refused() {
    let out = tokio::task::spawn_blocking(|| {
        Command::new(GALE)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("GALE_API__KEY", "short-key")
            .output()
            .expect("run")
    })
    .await
    .expect("join");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("api.key") && stderr.contains("16"),
        "{stderr}"
    );
}

/// Interactive `gale client` shows where each push sits in its topic's
/// history, and what a subscribe's position is.
#[tokio::test]
async fn client_shows_positions_of_pushes() {
    use std::io::{BufRead, Write};
    let server = common::start_with(|c| {
        c.api.key = Some("cli-key-0123456789ab".into());
        c.topics
            .insert("news:*".into(), gale::config::TopicConfig::history(10, 60));
    })
    .await;
    let mut child = Command::new(GALE)
        .args(["client", &server.ws_url()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run gale client");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut wait_for = async |needle: &str| loop {
        let line = tokio::time::timeout(common::WAIT, rx.recv())
            .await
            .expect("in time")
            .expect("a line");
        if line.contains(needle) {
            return line;
        }
    };
    writeln!(
        stdin,
        r#"{{"event":"topic.subscribe","data":{{"topic":"news:cli"}},"ref":"1"}}"#
    )
    .expect("write");
    let note = wait_for("# news:cli is at offset 0").await;
    assert!(note.contains("epoch"), "{note}");
    let body = r#"{"event":"headline","data":"hi","topic":"news:cli"}"#;
    let (status, _) = common::publish(&server, Some("cli-key-0123456789ab"), body).await;
    assert_eq!(status, 200);
    wait_for("# news:cli at offset 1, epoch").await;
    drop(stdin);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success());
}

/// Runs `gale ARGS` in a fresh directory with `env`; (exit code, stdout,
/// stderr).
async fn gale_in_temp(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new(GALE)
            .args(&args)
            .envs(env)
            .env_remove("GALE_TOKEN")
            .current_dir(dir.path())
            .output()
            .expect("run gale");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .expect("join")
}

#[tokio::test]
async fn token_signs_what_the_server_accepts_roles_audience_and_all() {
    let server = common::start_with(|c| {
        c.auth.jwt_secret = Some("token-cli-secret".into());
        c.auth.required = true;
        c.auth.audience = vec!["gale-app".into()];
        c.auth.issuer = vec!["my-backend".into()];
    })
    .await;
    let (code, token, stderr) = gale_in_temp(
        &[
            "token",
            "--sub",
            "alice",
            "--roles",
            "admin,editor",
            "--ttl",
            "10m",
        ],
        &[
            ("GALE_AUTH__JWT_SECRET", "token-cli-secret"),
            ("GALE_AUTH__AUDIENCE", r#"["gale-app"]"#),
            ("GALE_AUTH__ISSUER", r#"["my-backend"]"#),
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let mut c = server.client_with_token(token.trim()).await;
    // notes.import needs the role admin.
    let r = c
        .request(
            "notes.import",
            serde_json::json!({"notes": [{"title": "t", "content": "c"}]}),
            "i",
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["data"]["imported"], 1, "{r}");
}

#[tokio::test]
async fn token_topic_signs_a_subscription_token() {
    let server = common::start_with(|c| {
        c.auth.jwt_secret = Some("token-cli-secret".into());
        c.topics.insert(
            "vip".into(),
            gale::config::TopicConfig {
                subscribe: Some(gale::config::SubscribeMode::Token),
                ..gale::config::TopicConfig::default()
            },
        );
    })
    .await;
    let env = [("GALE_AUTH__JWT_SECRET", "token-cli-secret")];
    let (code, token, stderr) = gale_in_temp(&["token", "--sub", "", "--topic", "vip"], &env).await;
    assert_eq!(code, Some(0), "{stderr}");
    let mut anonymous = server.client().await;
    let r = anonymous
        .request("topic.subscribe", serde_json::json!({"topic": "vip"}), "1")
        .await;
    assert_eq!(r["error"]["code"], "permission_denied", "no token: {r}");
    let data = serde_json::json!({"topic": "vip", "token": token.trim()});
    let r = anonymous.request("topic.subscribe", data, "2").await;
    assert_eq!(r["ok"], true, "{r}");
    // A token for another topic grants nothing here.
    let (_, other, _) = gale_in_temp(&["token", "--sub", "", "--topic", "vip2"], &env).await;
    let data = serde_json::json!({"topic": "vip", "token": other.trim()});
    let r = anonymous.request("topic.subscribe", data, "3").await;
    assert_eq!(r["ok"], false, "{r}");
}

#[tokio::test]
async fn token_without_a_secret_says_how_to_set_one() {
    let (code, stdout, stderr) = gale_in_temp(&["token", "--sub", "alice"], &[]).await;
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("GALE_AUTH__JWT_SECRET"), "{stderr}");
    let (code, _, stderr) = gale_in_temp(
        &["token", "--sub", "alice", "--ttl", "soon"],
        &[("GALE_AUTH__JWT_SECRET", "x")],
    )
    .await;
    assert_eq!(code, Some(2));
    assert!(stderr.contains("90s, 15m, 1h or 7d"), "{stderr}");
}

#[tokio::test]
async fn client_prints_why_the_server_refused_the_handshake() {
    let server = common::start_with(|c| {
        c.auth.jwt_secret = Some("refusal-secret".into());
        c.auth.required = true;
    })
    .await;
    let url = server.ws_url();
    let (code, _, stderr) = gale_in_temp(
        &["client", &url, "--token", "not.a.jwt", "--send", "Oslo"],
        &[],
    )
    .await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("HTTP 401"), "{stderr}");
    assert!(
        stderr.contains("invalid token"),
        "the server's reason: {stderr}"
    );
}

#[tokio::test]
async fn serve_reads_gale_toml_from_the_working_directory_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = common::services::free_port();
    std::fs::write(
        dir.path().join("gale.toml"),
        format!("[server]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .expect("write gale.toml");
    let child = tokio::process::Command::new(GALE)
        .arg("serve")
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while common::http_get(addr, "/healthz").await.map(|r| r.0) != Some(200) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gale did not listen where ./gale.toml says"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = child.id().expect("pid").to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    let out = child.wait_with_output().await.expect("exit");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("gale.toml"), "names the file it read: {log}");
}

#[tokio::test]
async fn bench_runs_that_fail_exit_non_zero_and_say_why() {
    let server = start().await;
    let echo = format!("ws://{}/echo", server.addr);
    let (code, _, stderr) = gale_in_temp(
        &["bench", "requests", &echo, "--echo", "-n", "3", "-d", "1"],
        &[],
    )
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("the run failed"), "{stderr}");
    assert!(stderr.contains("GALE_SERVER__ECHO=true"), "{stderr}");

    let url = server.ws_url();
    let (code, stdout, stderr) = gale_in_temp(
        &[
            "bench",
            "broadcast",
            &url,
            "-n",
            "2",
            "-m",
            "2",
            "--idle-ms",
            "500",
            "--api-key",
            "bench-key-0123456789",
        ],
        &[],
    )
    .await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("publish API is off"), "{stderr}");
    assert!(
        !stdout.contains("e+") && !stdout.contains("00000%"),
        "{stdout}"
    );
}

#[test]
fn bench_help_lists_only_the_options_a_scenario_takes() {
    let help = |scenario: &str| {
        let out = Command::new(GALE)
            .args(["bench", scenario, "--help"])
            .output()
            .expect("run");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let requests = help("requests");
    assert!(
        !requests.contains("--sse") && !requests.contains("--deflate"),
        "{requests}"
    );
    let connections = help("connections");
    assert!(
        connections.contains("--sse") && connections.contains("--deflate"),
        "{connections}"
    );
    let broadcast = help("broadcast");
    assert!(
        !broadcast.contains("--sse") && broadcast.contains("--deflate"),
        "{broadcast}"
    );
    let serve = Command::new(GALE)
        .args(["serve", "--help"])
        .output()
        .expect("run");
    let serve = String::from_utf8_lossy(&serve.stdout);
    assert!(
        serve.contains("GALE_<SECTION>__<KEY>") && serve.contains("gale.toml"),
        "{serve}"
    );
}
