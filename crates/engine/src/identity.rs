//! Who is connecting: a JSON Web Token checked at the WebSocket handshake,
//! and the Origin check against cross-site WebSocket hijacking.
//!
//! A token comes as `Authorization: Bearer …` or, because browsers cannot
//! set headers on a WebSocket, as `?token=…`. Its `sub` is the user id and
//! its `roles` claim (a list, or one string) the roles. A bad, expired or
//! wrongly signed token is refused with 401 before the upgrade; so is a
//! missing one when `[auth] required = true`.
//!
//! Also where a connection comes from: the TCP peer, or, when the peer is
//! one of `server.trusted_proxies`, the client that proxy names in
//! `X-Forwarded-For`. Anonymous rate limits count per client address.

use std::net::IpAddr;
use std::sync::Arc;

use axum::http::{HeaderMap, Uri, header};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

pub use crate::cidr::Cidr;
use crate::config::{AuthConfig, ConfigError};

/// A connection's identity.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Identity {
    /// The user id (`sub`), `None` for anonymous connections.
    pub user: Option<Arc<str>>,
    /// The user's roles.
    pub roles: Arc<[String]>,
    /// When the token stops being valid (Unix seconds, leeway included),
    /// if the connection is to be closed then (`auth.close_on_expiry`), or
    /// when the application's backend said it ends (`expire_at`).
    pub expires: Option<u64>,
    /// Public data about the user (the token's `info` claim, or what the
    /// backend's connect answer gave), JSON: what presence and join/leave
    /// show others.
    pub info: Option<Arc<str>>,
    /// Topics to subscribe the connection to at once (the backend's
    /// connect answer).
    pub topics: Vec<String>,
}

/// Why a handshake was refused; the text is the 401 body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token, and `[auth] required = true`.
    #[error("a token is required: send Authorization: Bearer <jwt> or ?token=<jwt>")]
    Missing,
    /// A token was sent but the server has no key to check it with.
    #[error("this server accepts no tokens (no [auth] key is configured)")]
    NotAccepted,
    /// The token has expired.
    #[error("the token has expired")]
    Expired,
    /// Signature, algorithm or format is wrong.
    #[error("invalid token: {0}")]
    Invalid(String),
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    roles: Roles,
    #[serde(default)]
    info: Option<serde_json::Value>,
    /// Set on subscription tokens only: such a token never signs a
    /// connection in.
    #[serde(default)]
    topic: Option<serde_json::Value>,
}

/// A subscription token's claims: the user it is for and the topic.
#[derive(Deserialize)]
struct SubscriptionClaims {
    sub: String,
    topic: String,
}

#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Roles {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

/// What is wrong with a token, in words a person can act on.
fn why_invalid(kind: &jsonwebtoken::errors::ErrorKind) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::InvalidToken | K::Base64(_) | K::Utf8(_) => {
            "not a JWT (three base64url parts joined by dots)".into()
        }
        K::Json(e) => format!("its header or claims are not what the server reads ({e})"),
        K::InvalidSignature => "its signature does not match the server's key".into(),
        K::InvalidAlgorithm | K::InvalidAlgorithmName => {
            "signed with another algorithm than the server's key".into()
        }
        K::InvalidAudience => "its aud is not one the server accepts (auth.audience)".into(),
        K::InvalidIssuer => "its iss is not one the server accepts (auth.issuer)".into(),
        K::ImmatureSignature => "not valid yet (nbf is in the future)".into(),
        K::MissingRequiredClaim(c) => format!("the claim {c} is missing"),
        other => format!("{other:?}"),
    }
}

/// Why `gale token` cannot make a token the server would accept.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The server checks tokens with a public key (RS256, EdDSA): only
    /// the holder of the private key can sign them.
    #[error(
        "the server checks tokens with auth.jwt_public_key_file: sign them with your private key; \
         gale token signs with an HS256 auth.jwt_secret"
    )]
    PublicKey,
    /// No key at all: the server accepts no token.
    #[error(
        "no auth.jwt_secret is set, so the server accepts no token: set one in gale.toml \
         ([auth] jwt_secret = \"…\") or GALE_AUTH__JWT_SECRET, for both the server and gale token"
    )]
    NoSecret,
    /// The signing library refused.
    #[error("cannot sign the token: {0}")]
    Sign(String),
}

/// A token the server configured by `auth` accepts: `sub`, `roles`,
/// `iat`, `exp` (`ttl` from now), with `topic` a subscription token for
/// that topic, and, when the server checks them, its first `aud` and
/// `iss`; HS256 with `auth.jwt_secret`.
///
/// # Errors
/// [`IssueError`] when the server has no secret to sign with.
pub fn issue(
    auth: &AuthConfig,
    sub: &str,
    roles: &[String],
    topic: Option<&str>,
    ttl: std::time::Duration,
) -> Result<String, IssueError> {
    let Some(secret) = auth.jwt_secret.as_deref().filter(|s| !s.is_empty()) else {
        return Err(match auth.jwt_public_key_file {
            Some(_) => IssueError::PublicKey,
            None => IssueError::NoSecret,
        });
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut claims = serde_json::json!({
        "sub": sub,
        "roles": roles,
        "iat": now,
        "exp": now.saturating_add(ttl.as_secs()),
    });
    if let Some(topic) = topic {
        claims["topic"] = serde_json::json!(topic);
    }
    if let Some(aud) = auth.audience.first() {
        claims["aud"] = serde_json::json!(aud);
    }
    if let Some(iss) = auth.issuer.first() {
        claims["iss"] = serde_json::json!(iss);
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| IssueError::Sign(e.to_string()))
}

/// Checks tokens with the configured key.
pub struct Verifier {
    key: Option<(DecodingKey, Validation)>,
    required: bool,
    /// `auth.leeway_s`, when connections close at expiry.
    expiry_leeway: Option<u64>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field(
                "algorithm",
                &self.key.as_ref().map(|k| k.1.algorithms.clone()),
            )
            .field("required", &self.required)
            .finish()
    }
}

impl Verifier {
    /// Builds the verifier from `[auth]`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key: both kinds of key set, an unreadable
    /// key file, or a key that is neither RSA nor Ed25519 PEM.
    pub fn from_config(cfg: &AuthConfig) -> Result<Verifier, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: key.to_owned(),
            message,
        };
        let key = match (&cfg.jwt_secret, &cfg.jwt_public_key_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "auth.jwt_secret",
                    "set jwt_secret or jwt_public_key_file, not both".into(),
                ));
            }
            (Some(secret), None) if secret.is_empty() => {
                return Err(invalid("auth.jwt_secret", "must not be empty".into()));
            }
            (Some(secret), None) => Some((
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            )),
            (None, Some(path)) => {
                let key = "auth.jwt_public_key_file";
                let pem = std::fs::read(path)
                    .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
                let decoded = DecodingKey::from_rsa_pem(&pem)
                    .map(|k| (k, Algorithm::RS256))
                    .or_else(|_| DecodingKey::from_ed_pem(&pem).map(|k| (k, Algorithm::EdDSA)))
                    .map_err(|_| {
                        invalid(
                            key,
                            format!(
                                "{} is not an RSA or Ed25519 public key in PEM",
                                path.display()
                            ),
                        )
                    })?;
                Some(decoded)
            }
            (None, None) => None,
        };
        if cfg.required && key.is_none() {
            return Err(invalid(
                "auth.required",
                "needs auth.jwt_secret or auth.jwt_public_key_file".into(),
            ));
        }
        Ok(Verifier {
            key: key.map(|(k, alg)| (k, validation(alg, cfg))),
            required: cfg.required,
            expiry_leeway: cfg.close_on_expiry.then_some(cfg.leeway_s),
        })
    }

    /// The identity for a handshake's token (or lack of one).
    ///
    /// # Errors
    /// [`AuthError`]: the reason for the 401.
    pub fn identify(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return if self.required {
                Err(AuthError::Missing)
            } else {
                Ok(Identity::default())
            };
        };
        let Some((key, validation)) = &self.key else {
            return Err(AuthError::NotAccepted);
        };
        let data =
            jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                kind => AuthError::Invalid(why_invalid(kind)),
            })?;
        let Claims {
            sub,
            exp,
            roles,
            info,
            topic,
        } = data.claims;
        if topic.is_some() {
            return Err(AuthError::Invalid(
                "a subscription token (it names a topic) signs no connection in".into(),
            ));
        }
        if sub.is_empty() {
            return Err(AuthError::Invalid("empty sub".into()));
        }
        let roles: Vec<String> = match roles {
            Roles::None => Vec::new(),
            Roles::One(r) => vec![r],
            Roles::Many(v) => v,
        };
        Ok(Identity {
            user: Some(sub.into()),
            roles: roles.into(),
            expires: self.expiry_leeway.map(|l| exp.saturating_add(l)),
            info: info
                .filter(|i| !i.is_null())
                .map(|i| Arc::from(i.to_string())),
            topics: Vec::new(),
        })
    }

    /// Checks a subscription token: signed with the connection tokens'
    /// key and checked the same way (algorithm, `exp`, `aud`, `iss`,
    /// leeway), its `topic` is `topic` and its `sub` is `user` (`""` for
    /// an anonymous connection).
    ///
    /// # Errors
    /// [`AuthError`] saying what is wrong with it.
    pub fn subscription(
        &self,
        token: &str,
        topic: &str,
        user: Option<&str>,
    ) -> Result<(), AuthError> {
        let Some((key, validation)) = &self.key else {
            return Err(AuthError::NotAccepted);
        };
        let data = jsonwebtoken::decode::<SubscriptionClaims>(token, key, validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                kind => AuthError::Invalid(why_invalid(kind)),
            },
        )?;
        if data.claims.topic != topic {
            return Err(AuthError::Invalid(format!(
                "it is for the topic {:?}",
                data.claims.topic
            )));
        }
        if data.claims.sub != user.unwrap_or("") {
            return Err(AuthError::Invalid("it is for another user".into()));
        }
        Ok(())
    }
}

/// What a token must satisfy. The algorithm is the key's, from the
/// config, never the token's header (a token naming another is refused).
fn validation(alg: Algorithm, cfg: &AuthConfig) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = cfg.leeway_s;
    v.validate_exp = true;
    v.validate_nbf = true;
    let mut required = vec!["exp", "sub"];
    if cfg.audience.is_empty() {
        v.validate_aud = false;
    } else {
        v.set_audience(&cfg.audience);
        required.push("aud");
    }
    if !cfg.issuer.is_empty() {
        v.set_issuer(&cfg.issuer);
        required.push("iss");
    }
    v.set_required_spec_claims(&required);
    v
}

/// The credentials of an `Authorization` value in the `Bearer` scheme,
/// whose name is case-insensitive (RFC 7235): `bearer x`, `BEARER x`.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.trim().split_once(char::is_whitespace)?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim())
        .filter(|c| !c.is_empty())
}

/// The token from `Authorization: Bearer …` or the `token` query
/// parameter, header first.
pub fn token_from(headers: &HeaderMap, uri: &Uri) -> Option<String> {
    if let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
    {
        return Some(token.to_owned());
    }
    let query = uri.query()?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
}

/// The client a connection comes from: the TCP peer, unless the peer is a
/// trusted proxy, in which case the right-most `X-Forwarded-For` address
/// that is not itself a trusted proxy (the standard reading: everything to
/// its left was written by the client and may be forged).
pub fn client_address(headers: &HeaderMap, peer: IpAddr, trusted: &[Cidr]) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().unwrap_or(""))
        .flat_map(|v| v.split(','))
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) if is_trusted(ip.to_canonical()) => client = ip.to_canonical(),
            Ok(ip) => return ip.to_canonical(),
            // Unreadable: nothing further left can be trusted either.
            Err(_) => return client,
        }
    }
    client
}

/// The key anonymous rate limits count an address under: IPv4 as is,
/// IPv6 by its /64 (one subscriber's share; anyone can have a whole /64).
pub fn rate_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let masked = u128::from(v6) & (u128::MAX << 64);
            IpAddr::V6(masked.into())
        }
        v4 => v4,
    }
}

/// Whether a handshake's Origin is allowed. No Origin header (a
/// non-browser client) is allowed. With an empty allow-list, the server's
/// own host (from the Host header) and localhost are allowed.
pub fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    if !allowed.is_empty() {
        return allowed
            .iter()
            .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin));
    }
    let Ok(url) = url::Url::parse(origin) else {
        return false;
    };
    let Some(origin_host) = url.host_str() else {
        return false;
    };
    let origin_host = origin_host.trim_start_matches('[').trim_end_matches(']');
    if matches!(origin_host, "localhost" | "127.0.0.1" | "::1") {
        return true;
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| url::Url::parse(&format!("http://{h}")).ok())
        .and_then(|u| u.host_str().map(str::to_owned));
    host.is_some_and(|h| h.eq_ignore_ascii_case(origin_host))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn a_subscription_token_signs_no_connection_in() {
        let cfg = AuthConfig {
            jwt_secret: Some("identity-test-secret".into()),
            ..AuthConfig::default()
        };
        let v = Verifier::from_config(&cfg).expect("verifier");
        let hour = std::time::Duration::from_secs(3600);
        let login = issue(&cfg, "mallory", &[], None, hour).expect("sign");
        assert!(v.identify(Some(&login)).is_ok());
        let sub = issue(&cfg, "mallory", &[], Some("sec:1"), hour).expect("sign");
        assert!(v.subscription(&sub, "sec:1", Some("mallory")).is_ok());
        match v.identify(Some(&sub)) {
            Err(AuthError::Invalid(why)) => assert!(why.contains("subscription token"), "{why}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        // A claim missing is named, not called "not a JWT".
        let no_topic = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &serde_json::json!({"sub": "a", "exp": u64::MAX / 2}),
            &jsonwebtoken::EncodingKey::from_secret(b"identity-test-secret"),
        )
        .expect("sign");
        match v.subscription(&no_topic, "sec:1", Some("a")) {
            Err(AuthError::Invalid(why)) => assert!(why.contains("topic"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn client_address_trusts_forwarded_for_only_from_trusted_proxies() {
        let trusted = [Cidr::parse("10.0.0.0/8").expect("block")];
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let xff = |v: &str| headers(&[(header::HeaderName::from_static("x-forwarded-for"), v)]);
        let h = xff("6.6.6.6, 203.0.113.7, 10.0.0.2");
        assert_eq!(
            client_address(&h, ip("10.0.0.1"), &trusted),
            ip("203.0.113.7")
        );
        assert_eq!(
            client_address(&h, ip("198.51.100.1"), &trusted),
            ip("198.51.100.1"),
            "an untrusted peer's header is ignored"
        );
        assert_eq!(
            client_address(&xff("junk, 10.0.0.3"), ip("10.0.0.1"), &trusted),
            ip("10.0.0.3")
        );
        assert_eq!(
            client_address(&HeaderMap::new(), ip("10.0.0.1"), &trusted),
            ip("10.0.0.1")
        );
        assert_eq!(rate_key(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
        assert_eq!(rate_key(ip("::ffff:1.2.3.4")), ip("1.2.3.4"));
    }

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k.clone(), HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    #[test]
    fn origins() {
        let none: &[String] = &[];
        let host = (header::HOST, "gale.example.com:8080");
        assert!(
            origin_allowed(&headers(std::slice::from_ref(&host)), none),
            "no Origin: allowed"
        );
        assert!(origin_allowed(
            &headers(&[host.clone(), (header::ORIGIN, "https://gale.example.com")]),
            none
        ));
        assert!(origin_allowed(
            &headers(&[host.clone(), (header::ORIGIN, "http://localhost:3000")]),
            none
        ));
        assert!(!origin_allowed(
            &headers(&[host.clone(), (header::ORIGIN, "https://evil.example")]),
            none
        ));
        let list = vec!["https://app.example".to_owned()];
        assert!(origin_allowed(
            &headers(&[host.clone(), (header::ORIGIN, "https://app.example")]),
            &list
        ));
        assert!(!origin_allowed(
            &headers(&[host, (header::ORIGIN, "http://localhost:3000")]),
            &list
        ));
    }

    #[test]
    fn token_sources() {
        let uri: Uri = "/ws?x=1&token=abc%2Edef".parse().expect("uri");
        assert_eq!(
            token_from(&HeaderMap::new(), &uri).as_deref(),
            Some("abc.def")
        );
        let h = headers(&[(header::AUTHORIZATION, "Bearer hdr")]);
        assert_eq!(token_from(&h, &uri).as_deref(), Some("hdr"), "header first");
        assert_eq!(
            token_from(&HeaderMap::new(), &"/ws".parse().expect("uri")),
            None
        );
    }

    #[test]
    fn required_needs_a_key_and_both_keys_conflict() {
        let err = Verifier::from_config(&AuthConfig {
            required: true,
            ..AuthConfig::default()
        })
        .expect_err("no key");
        assert!(err.to_string().contains("auth.required"));
        let anonymous = Verifier::from_config(&AuthConfig::default()).expect("ok");
        assert_eq!(anonymous.identify(None), Ok(Identity::default()));
        assert_eq!(
            anonymous.identify(Some("x.y.z")),
            Err(AuthError::NotAccepted)
        );
    }
}
