//! Per-address admission of WebSocket handshakes against the real
//! server: `server.max_connections_per_ip` (503) and
//! `server.handshake_rate_per_ip` (429 with Retry-After).

mod common;

use common::start_with;
use tokio_tungstenite::tungstenite::Error;

/// A refused handshake: (status, Retry-After, body).
async fn refused(url: &str, headers: &[(&'static str, &str)]) -> (u16, Option<String>, String) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue;
    let mut req = url.into_client_request().expect("request");
    for (k, v) in headers {
        req.headers_mut()
            .insert(*k, HeaderValue::from_str(v).expect("header"));
    }
    match tokio_tungstenite::connect_async(req).await {
        Err(Error::Http(resp)) => (
            resp.status().as_u16(),
            resp.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        Ok(_) => panic!("the handshake was admitted"),
        Err(e) => panic!("unexpected handshake error: {e}"),
    }
}

#[tokio::test]
async fn an_address_past_its_connections_gets_503_until_one_closes() {
    let server = start_with(|c| c.server.max_connections_per_ip = 2).await;
    let a = server.client().await;
    let _b = server.client().await;
    let (status, _, body) = refused(&server.ws_url(), &[]).await;
    assert_eq!(status, 503);
    assert!(body.contains("server.max_connections_per_ip = 2"), "{body}");
    assert_eq!(
        server
            .sample("gale_handshakes_refused_total{reason=\"ConnectionsPerIp\"}")
            .await,
        1.0
    );
    drop(a);
    // The closed connection's slot comes back once its task has ended.
    server.wait_metric("connections", 1).await;
    let _c = server.client().await;
}

#[tokio::test]
async fn handshakes_past_the_rate_get_429_with_retry_after() {
    let server = start_with(|c| c.server.handshake_rate_per_ip = 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(server.client().await);
    }
    let (status, retry, body) = refused(&server.ws_url(), &[]).await;
    assert_eq!(status, 429);
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(
        body.contains("server.handshake_rate_per_ip = 3/s"),
        "{body}"
    );
    assert_eq!(
        server
            .sample("gale_handshakes_refused_total{reason=\"HandshakeRate\"}")
            .await,
        1.0
    );
    // A second later the address may connect again.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    held.push(server.client().await);
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_client_address_is_counted_apart() {
    let server = start_with(|c| {
        c.server.max_connections_per_ip = 1;
        c.server.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await;
    let from = |ip: &str| vec![("x-forwarded-for", ip.to_owned())];
    let _a = server
        .client_with_headers("", &from("203.0.113.7"))
        .await
        .expect("the first client");
    let _b = server
        .client_with_headers("", &from("203.0.113.8"))
        .await
        .expect("another client behind the same proxy");
    let (status, _, _) = refused(&server.ws_url(), &[("x-forwarded-for", "203.0.113.7")]).await;
    assert_eq!(status, 503, "the first client's second connection");
}
