//! The opening handshake (RFC 6455 §4.2): an axum extractor that checks
//! the upgrade request and negotiates compression, and the 101 answer
//! that hands the connection to a [`Socket`].

use axum::extract::FromRequestParts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::deflate::{self, Agreed};
use super::{Limits, Socket};
use crate::listener::LimitedStream;
use crate::metrics::Metrics;
use std::sync::Arc;

/// A valid WebSocket upgrade request, not yet answered.
pub struct Upgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
    deflate: Option<Agreed>,
}

impl std::fmt::Debug for Upgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgrade")
            .field("deflate", &self.deflate)
            .finish_non_exhaustive()
    }
}

/// Why a request is not a WebSocket upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeError {
    /// Not a GET.
    #[error("a WebSocket handshake is a GET request")]
    Method,
    /// No `Connection: upgrade` / `Upgrade: websocket`.
    #[error("the request asks for no WebSocket upgrade (Connection: upgrade, Upgrade: websocket)")]
    NotUpgrade,
    /// `Sec-WebSocket-Version` is not 13.
    #[error("Sec-WebSocket-Version must be 13")]
    Version,
    /// `Sec-WebSocket-Key` is missing or malformed.
    #[error("Sec-WebSocket-Key is missing or not 16 bytes in base64")]
    Key,
    /// The connection cannot be taken over (HTTP/2, or already upgraded).
    #[error("this connection cannot be upgraded")]
    NotUpgradable,
}

impl IntoResponse for UpgradeError {
    fn into_response(self) -> Response {
        (StatusCode::BAD_REQUEST, format!("{self}\n")).into_response()
    }
}

/// Whether a comma-separated header holds `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = UpgradeError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        if parts.method != Method::GET {
            return Err(UpgradeError::Method);
        }
        let h = &parts.headers;
        if !has_token(h, header::CONNECTION, "upgrade")
            || !has_token(h, header::UPGRADE, "websocket")
        {
            return Err(UpgradeError::NotUpgrade);
        }
        if h.get(header::SEC_WEBSOCKET_VERSION)
            .map(HeaderValue::as_bytes)
            != Some(b"13")
        {
            return Err(UpgradeError::Version);
        }
        // 16 bytes in base64: 24 characters ending in "==".
        let key = match h.get(header::SEC_WEBSOCKET_KEY) {
            Some(k) if k.len() == 24 && k.as_bytes().ends_with(b"==") => k.clone(),
            _ => return Err(UpgradeError::Key),
        };
        let deflate = deflate::negotiate(
            h.get_all(header::SEC_WEBSOCKET_EXTENSIONS)
                .iter()
                .filter_map(|v| v.to_str().ok()),
        );
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or(UpgradeError::NotUpgradable)?;
        Ok(Upgrade {
            key,
            on_upgrade,
            deflate,
        })
    }
}

impl Upgrade {
    /// Answers 101 and runs `serve` on the socket once hyper hands the
    /// connection over. `compression`: whether permessage-deflate may be
    /// agreed (when the client offered it).
    ///
    /// The future `serve` returns runs as a task of its own, not inside
    /// the one that waited for the upgrade: that task would keep `serve`,
    /// the upgrade's parts and its own state beside the connection's for
    /// the connection's whole life (about 0.5 KiB per connection).
    pub fn on_upgrade<F, Fut>(
        self,
        compression: bool,
        limits: Limits,
        metrics: Arc<Metrics>,
        serve: F,
    ) -> Response
    where
        F: FnOnce(Socket, Option<crate::admission::Admitted>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let deflate = self.deflate.filter(|_| compression);
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(error = %e, "WebSocket upgrade failed");
                    return;
                }
            };
            let parts = match upgraded.downcast::<TokioIo<LimitedStream>>() {
                Ok(p) => p,
                Err(_) => {
                    tracing::error!("upgraded connection of an unknown kind: dropped");
                    return;
                }
            };
            let (stream, permit, counted) = parts.io.into_inner().into_parts();
            tokio::spawn(serve(
                Socket::new(stream, parts.read_buf, deflate, limits, metrics, permit),
                counted,
            ));
        });
        let mut response = (
            StatusCode::SWITCHING_PROTOCOLS,
            [
                (header::CONNECTION, HeaderValue::from_static("upgrade")),
                (header::UPGRADE, HeaderValue::from_static("websocket")),
            ],
        )
            .into_response();
        let h = response.headers_mut();
        if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(self.key.as_bytes())) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        if let Some(v) = deflate.and_then(|a| HeaderValue::from_str(&a.response()).ok()) {
            h.insert(header::SEC_WEBSOCKET_EXTENSIONS, v);
        }
        response
    }
}
