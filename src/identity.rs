//! Who is connecting: a JSON Web Token checked at the WebSocket handshake,
//! and the Origin check against cross-site WebSocket hijacking.
//!
//! A token comes as `Authorization: Bearer …` or, because browsers cannot
//! set headers on a WebSocket, as `?token=…`. Its `sub` is the user id and
//! its `roles` claim (a list, or one string) the roles. A bad, expired or
//! wrongly signed token is refused with 401 before the upgrade; so is a
//! missing one when `[auth] required = true`.

use std::sync::Arc;

use axum::http::{HeaderMap, Uri, header};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::{AuthConfig, ConfigError};

/// A connection's identity.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Identity {
    /// The user id (`sub`), `None` for anonymous connections.
    pub user: Option<Arc<str>>,
    /// The user's roles.
    pub roles: Arc<[String]>,
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
    #[serde(default)]
    roles: Roles,
}

#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Roles {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

/// Checks tokens with the configured key.
pub struct Verifier {
    key: Option<(DecodingKey, Validation)>,
    required: bool,
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
            key: key.map(|(k, alg)| {
                let mut v = Validation::new(alg);
                v.leeway = 30;
                v.validate_exp = true;
                v.set_required_spec_claims(&["exp", "sub"]);
                (k, v)
            }),
            required: cfg.required,
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
                _ => AuthError::Invalid(e.to_string()),
            })?;
        let Claims { sub, roles } = data.claims;
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
        })
    }
}

/// The token from `Authorization: Bearer …` or the `token` query
/// parameter, header first.
pub fn token_from(headers: &HeaderMap, uri: &Uri) -> Option<String> {
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(token) = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
        {
            return Some(token.trim().to_owned());
        }
    }
    let query = uri.query()?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
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
