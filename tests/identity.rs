//! Identity at the handshake: JWTs (HS256, RS256, EdDSA) by header or
//! query, refusals with 401 before any upgrade, the Origin check (403),
//! and the router's auth, role and per-user rate checks that use them.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{Client, TestServer, start_with};
use gale::config::Config;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const SECRET: &str = "test-secret-for-hs256";

fn keys(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/keys")
        .join(name)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn token(alg: Algorithm, key: &EncodingKey, sub: &str, roles: Value, exp: u64) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        &json!({"sub": sub, "roles": roles, "exp": exp}),
        key,
    )
    .expect("sign")
}

fn hs256(sub: &str, roles: Value) -> String {
    common::hs256_token(SECRET, sub, roles)
}

fn with_secret(c: &mut Config) {
    c.auth.jwt_secret = Some(SECRET.into());
}

/// Opens a WebSocket with extra headers; `Err(status)` when refused.
async fn connect(
    server: &TestServer,
    query: &str,
    headers: &[(&'static str, String)],
) -> Result<Client, u16> {
    server.client_with_headers(query, headers).await
}

async fn stats(c: &mut Client, r: &str) -> Value {
    c.request("server.stats", Value::Null, r).await
}

fn bearer(t: &str) -> Vec<(&'static str, String)> {
    vec![("authorization", format!("Bearer {t}"))]
}

#[tokio::test]
async fn hs256_token_by_header_or_query_identifies_the_user() {
    let server = start_with(|c| {
        with_secret(c);
        c.events
            .entry("server.stats".into())
            .or_default()
            .requires_auth = Some(true);
    })
    .await;
    let t = hs256("alice", json!(["reader"]));
    let mut by_header = connect(&server, "", &bearer(&t)).await.expect("accepted");
    assert_eq!(stats(&mut by_header, "1").await["ok"], true);
    let mut by_query = connect(&server, &format!("?token={t}"), &[])
        .await
        .expect("accepted");
    assert_eq!(stats(&mut by_query, "2").await["ok"], true);

    // Anonymous is still allowed to connect, but not to this event.
    let mut anon = connect(&server, "", &[]).await.expect("anonymous allowed");
    assert_eq!(stats(&mut anon, "3").await["error"]["code"], "unauthorized");
}

#[tokio::test]
async fn bad_tokens_are_refused_with_401_before_the_upgrade() {
    let server = start_with(with_secret).await;
    let expired = token(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        "alice",
        json!([]),
        now() - 3600,
    );
    let wrong_key = token(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"another secret"),
        "alice",
        json!([]),
        now() + 3600,
    );
    for t in [expired.as_str(), wrong_key.as_str(), "not.a.jwt"] {
        assert_eq!(
            connect(&server, "", &bearer(t)).await.err(),
            Some(401),
            "{t}"
        );
        assert_eq!(
            connect(&server, &format!("?token={t}"), &[]).await.err(),
            Some(401)
        );
    }
    assert_eq!(
        server.metric("connections-total").await,
        0,
        "nothing was upgraded"
    );
}

#[tokio::test]
async fn required_auth_refuses_anonymous_connections() {
    let server = start_with(|c| {
        with_secret(c);
        c.auth.required = true;
    })
    .await;
    assert_eq!(connect(&server, "", &[]).await.err(), Some(401));
    assert!(
        connect(&server, "", &bearer(&hs256("bob", json!([]))))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn rs256_and_eddsa_public_keys() {
    for (public, private, alg) in [
        ("rsa-public.pem", "rsa-private.pem", Algorithm::RS256),
        (
            "ed25519-public.pem",
            "ed25519-private.pem",
            Algorithm::EdDSA,
        ),
    ] {
        let server = start_with(|c| c.auth.jwt_public_key_file = Some(keys(public))).await;
        let pem = std::fs::read(keys(private)).expect("private key");
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
            _ => EncodingKey::from_ed_pem(&pem),
        }
        .expect("encoding key");
        let good = token(alg, &key, "carol", json!("admin"), now() + 60);
        assert!(
            connect(&server, "", &bearer(&good)).await.is_ok(),
            "{alg:?}"
        );
        let hs = hs256("carol", json!([]));
        assert_eq!(
            connect(&server, "", &bearer(&hs)).await.err(),
            Some(401),
            "{alg:?} server refuses an HS256 token"
        );
    }
}

#[tokio::test]
async fn roles_gate_events() {
    let server = start_with(|c| {
        with_secret(c);
        c.events
            .entry("server.stats".into())
            .or_default()
            .requires_role = Some("admin".into());
    })
    .await;
    let mut admin = connect(&server, "", &bearer(&hs256("root", json!(["admin", "x"]))))
        .await
        .expect("ok");
    assert_eq!(stats(&mut admin, "a").await["ok"], true);
    let mut single = connect(&server, "", &bearer(&hs256("root2", json!("admin"))))
        .await
        .expect("ok");
    assert_eq!(
        stats(&mut single, "s").await["ok"],
        true,
        "a single-string role"
    );
    let mut user = connect(&server, "", &bearer(&hs256("dave", json!(["reader"]))))
        .await
        .expect("ok");
    assert_eq!(stats(&mut user, "u").await["error"]["code"], "forbidden");
    let mut anon = connect(&server, "", &[]).await.expect("ok");
    assert_eq!(stats(&mut anon, "n").await["error"]["code"], "unauthorized");
}

#[tokio::test]
async fn rate_limits_count_per_user_across_connections() {
    let server = start_with(|c| {
        with_secret(c);
        c.events
            .entry("server.stats".into())
            .or_default()
            .rate_limit = Some("2/min".into());
    })
    .await;
    let t = hs256("erin", json!([]));
    let mut tab1 = connect(&server, "", &bearer(&t)).await.expect("ok");
    let mut tab2 = connect(&server, "", &bearer(&t)).await.expect("ok");
    assert_eq!(stats(&mut tab1, "1").await["ok"], true);
    assert_eq!(stats(&mut tab2, "2").await["ok"], true);
    assert_eq!(stats(&mut tab1, "3").await["error"]["code"], "rate_limited");
    let mut other = connect(&server, "", &bearer(&hs256("frank", json!([]))))
        .await
        .expect("ok");
    assert_eq!(
        stats(&mut other, "4").await["ok"],
        true,
        "another user's own allowance"
    );
}

#[tokio::test]
async fn foreign_origins_are_refused_with_403() {
    let server = start_with(|_| {}).await;
    let origin = |o: &str| vec![("origin", o.to_owned())];
    assert_eq!(
        connect(&server, "", &origin("https://evil.example"))
            .await
            .err(),
        Some(403)
    );
    assert!(
        connect(&server, "", &origin("http://localhost:3000"))
            .await
            .is_ok()
    );
    assert!(
        connect(&server, "", &origin("http://127.0.0.1"))
            .await
            .is_ok(),
        "own host"
    );

    let listed =
        start_with(|c| c.server.allowed_origins = vec!["https://app.example".into()]).await;
    assert!(
        connect(&listed, "", &origin("https://app.example"))
            .await
            .is_ok()
    );
    assert_eq!(
        connect(&listed, "", &origin("http://localhost:3000"))
            .await
            .err(),
        Some(403),
        "an explicit list replaces the default"
    );
}

/// An HS256 token with these claims (plus `sub`).
fn signed(claims: Value) -> String {
    let mut claims = claims;
    claims["sub"] = json!("alice");
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

#[tokio::test]
async fn audience_and_issuer_are_checked_only_when_configured() {
    let exp = now() + 600;
    let with_aud = signed(json!({"exp": exp, "aud": "gale", "iss": "https://id.example"}));
    // Not configured: a token carrying aud and iss is accepted (it was
    // refused whatever its aud before).
    let open = start_with(with_secret).await;
    connect(&open, "", &bearer(&with_aud))
        .await
        .expect("aud not checked");

    let strict = start_with(|c| {
        with_secret(c);
        c.auth.audience = vec!["other".into(), "gale".into()];
        c.auth.issuer = vec!["https://id.example".into()];
    })
    .await;
    connect(&strict, "", &bearer(&with_aud))
        .await
        .expect("one of the audiences, the issuer");
    for bad in [
        signed(json!({"exp": exp, "aud": "elsewhere", "iss": "https://id.example"})),
        signed(json!({"exp": exp, "aud": "gale", "iss": "https://evil.example"})),
        signed(json!({"exp": exp, "iss": "https://id.example"})),
        signed(json!({"exp": exp, "aud": "gale"})),
    ] {
        assert_eq!(
            connect(&strict, "", &bearer(&bad)).await.err(),
            Some(401),
            "{bad}"
        );
    }
}

#[tokio::test]
async fn not_before_is_honoured_within_the_leeway_and_the_algorithm_is_the_configs() {
    let server = start_with(|c| {
        with_secret(c);
        c.auth.leeway_s = 5;
    })
    .await;
    let exp = now() + 600;
    connect(
        &server,
        "",
        &bearer(&signed(json!({"exp": exp, "nbf": now() + 3}))),
    )
    .await
    .expect("not valid for 3 s more: inside the 5 s leeway");
    assert_eq!(
        connect(
            &server,
            "",
            &bearer(&signed(json!({"exp": exp, "nbf": now() + 60})))
        )
        .await
        .err(),
        Some(401),
        "not valid for another minute"
    );
    // The same secret under another HMAC: the token's header does not
    // choose the algorithm.
    let hs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &json!({"sub": "alice", "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign");
    assert_eq!(connect(&server, "", &bearer(&hs512)).await.err(), Some(401));
    // And no signature at all.
    let unsigned = format!(
        "{}.{}.",
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0", "eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0"
    );
    assert_eq!(
        connect(&server, "", &bearer(&unsigned)).await.err(),
        Some(401)
    );
}

#[tokio::test]
async fn a_connection_is_closed_with_1008_once_its_token_expires() {
    let server = start_with(|c| {
        with_secret(c);
        c.auth.leeway_s = 0;
        c.server.ping_interval_s = 1;
    })
    .await;
    let short = signed(json!({"exp": now() + 2}));
    let mut c = connect(&server, "", &bearer(&short))
        .await
        .expect("valid for 2 s");
    let long = signed(json!({"exp": now() + 600}));
    let other = connect(&server, "", &bearer(&long))
        .await
        .expect("valid for 10 min");
    // The other connection keeps talking (a client that never reads
    // would not answer the 1 s pings) through and past the expiry.
    let talking = tokio::spawn(busy(other, 4));
    let close = c.expect_close().await;
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "token expired");
    talking.await.expect("the other stays open and answered");

    // With close_on_expiry off, the token is checked at the handshake only.
    let lenient = start_with(|c| {
        with_secret(c);
        c.auth.leeway_s = 0;
        c.auth.close_on_expiry = false;
        c.server.ping_interval_s = 1;
    })
    .await;
    let short = signed(json!({"exp": now() + 1}));
    let c = connect(&lenient, "", &bearer(&short))
        .await
        .expect("valid for 1 s");
    busy(c, 3).await;
}

/// Asks `server.stats` every 250 ms for `secs` seconds; panics if an
/// answer is missing.
async fn busy(mut c: Client, secs: u64) {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let mut i = 0;
    while std::time::Instant::now() < until {
        i += 1;
        assert_eq!(
            stats(&mut c, &i.to_string()).await["ok"],
            true,
            "answer {i}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}
