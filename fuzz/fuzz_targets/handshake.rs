//! The handshake's checks: Origin against an allow-list, the token from a
//! header or the query, JWT verification (HS256), and the client address
//! behind trusted proxies.
#![no_main]

use std::sync::OnceLock;

use axum::http::{HeaderMap, HeaderValue, Uri};
use gale::config::AuthConfig;
use gale::identity::{Cidr, Verifier, bearer, client_address, origin_allowed, token_from};
use libfuzzer_sys::fuzz_target;

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let cfg = AuthConfig {
            jwt_secret: Some("fuzz-secret".into()),
            audience: vec!["gale".into()],
            ..AuthConfig::default()
        };
        Verifier::from_config(&cfg).expect("verifier")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.split('\u{1}');
    let mut headers = HeaderMap::new();
    for name in ["origin", "host", "authorization", "x-forwarded-for"] {
        if let Some(v) = parts.next().and_then(|p| HeaderValue::from_str(p).ok()) {
            headers.insert(name, v);
        }
    }
    let uri: Uri = parts
        .next()
        .and_then(|q| format!("/ws?{q}").parse().ok())
        .unwrap_or_else(|| Uri::from_static("/ws"));
    let allowed = [
        String::from("https://app.example"),
        String::from("*.example.org"),
    ];
    let _ = origin_allowed(&headers, &allowed);
    let _ = origin_allowed(&headers, &[]);
    let token = token_from(&headers, &uri);
    let _ = verifier().identify(token.as_deref());
    let _ = bearer(text);
    let trusted = [
        Cidr::parse("127.0.0.1").expect("cidr"),
        Cidr::parse("10.0.0.0/8").expect("cidr"),
    ];
    let _ = client_address(&headers, "127.0.0.1".parse().expect("ip"), &trusted);
    if let Some(spec) = parts.next() {
        let _ = Cidr::parse(spec);
    }
});
