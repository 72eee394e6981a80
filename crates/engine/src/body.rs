//! Request bodies: every one has a deadline, and is read whole up to a
//! limit.
//!
//! The listener hands every request to the routes with its body wrapped
//! in a `Deadline`: once `server.handshake_timeout_ms` has passed since
//! the request's head arrived, the next read of the body fails (and is
//! counted in `gale_http_timeouts_total{stage="Body"}`). So a client that
//! declares a body and never sends it holds its connection no longer
//! than the deadline, on every route, whatever its handler does.
//! [`read`] reads a body whole, at most a limit, and says in an answer
//! the client can act on why it could not (413, 408, 400).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::body::Frame;
use tokio::time::{Instant, Sleep};

use crate::metrics::{HttpStage, Metrics};

/// The body did not arrive within the deadline.
#[derive(Debug, thiserror::Error)]
#[error("the body did not arrive within server.handshake_timeout_ms")]
pub(crate) struct TimedOut;

/// A request body that fails once its deadline has passed. Its timer is
/// made only when a read has to wait, so a request whose body is empty,
/// or never read, costs nothing.
pub(crate) struct Deadline<B> {
    inner: B,
    deadline: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    metrics: Arc<Metrics>,
    expired: bool,
}

impl<B> Deadline<B> {
    /// `inner`, failing after `deadline`.
    pub(crate) fn new(inner: B, deadline: Instant, metrics: Arc<Metrics>) -> Self {
        Deadline {
            inner,
            deadline,
            sleep: None,
            metrics,
            expired: false,
        }
    }
}

impl<B> hyper::body::Body for Deadline<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.expired {
            return Poll::Ready(Some(Err(TimedOut.into())));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                let deadline = this.deadline;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match sleep.as_mut().poll(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(()) => {
                        this.expired = true;
                        this.metrics.http_timeout(HttpStage::Body).inc();
                        Poll::Ready(Some(Err(TimedOut.into())))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    /// Longer than the limit (declared or sent).
    #[error("the body is larger than {limit} bytes ({setting})")]
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
        /// The setting that makes it.
        setting: &'static str,
    },
    /// Not all of it arrived within the deadline.
    #[error(transparent)]
    TimedOut(#[from] TimedOut),
    /// The connection broke while it was read.
    #[error("cannot read the body: {0}")]
    Broken(String),
}

impl BodyError {
    /// The HTTP status that says it: 413, 408 or 400.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::TimedOut(_) => StatusCode::REQUEST_TIMEOUT,
            BodyError::Broken(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// Adds `Connection: close` to `response` when the rest of the body
    /// may never come (past the deadline, broken off).
    pub(crate) fn close(&self, mut response: Response) -> Response {
        if !matches!(self, BodyError::TooLarge { .. }) {
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }
        response
    }

    /// The answer as plain text.
    pub(crate) fn into_response(self) -> Response {
        self.close((self.status(), format!("{self}\n")).into_response())
    }
}

/// Reads `body` whole: at most `limit` bytes (`setting` names the limit
/// in the refusal), refused at once when `Content-Length` says more.
///
/// # Errors
/// [`BodyError`]: too large, past the deadline, or broken off.
pub(crate) async fn read(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    setting: &'static str,
) -> Result<Bytes, BodyError> {
    let too_large = || BodyError::TooLarge { limit, setting };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut stream = body.into_data_stream();
    let mut buf = Vec::with_capacity(declared.map_or(0, |n| n as usize));
    while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
        let chunk = chunk.map_err(|e| {
            // axum wraps the body's own error: look for ours underneath.
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(c) = cause {
                if c.is::<TimedOut>() {
                    return BodyError::TimedOut(TimedOut);
                }
                cause = c.source();
            }
            BodyError::Broken(e.to_string())
        })?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.into())
}
