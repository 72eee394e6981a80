//! A fake of the team's backend: a real HTTP server on 127.0.0.1 that
//! answers gale's proxy calls (`POST /connect`, `/refresh`, `/subscribe`,
//! `/publish`, `/rpc`, `/events`) as a test programs it, and records
//! every call.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// How the fake answers one kind of call.
#[derive(Clone)]
pub enum Reply {
    /// 200 with this JSON body.
    Json(Value),
    /// Computed from the call's body.
    With(Arc<dyn Fn(&Value) -> Value + Send + Sync>),
    /// This HTTP status, with a short body.
    Status(u16),
    /// 200 with a body that is not JSON.
    Garbage,
    /// Waits this long, then answers as the inner reply.
    Slow(Duration, Box<Reply>),
}

/// One recorded call.
#[derive(Debug, Clone)]
pub struct Call {
    pub kind: String,
    pub body: Value,
    pub headers: HashMap<String, String>,
    /// Answered with a well-formed 200 (not a failure status or garbage).
    pub answered: bool,
}

#[derive(Default)]
struct Shared {
    replies: Mutex<HashMap<String, Reply>>,
    calls: Mutex<Vec<Call>>,
}

/// The running fake.
#[derive(Clone)]
pub struct Backend {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Backend {
    /// Starts it on a free port; every kind answers `{"result": {}}` until
    /// told otherwise.
    pub async fn start() -> Backend {
        let shared = Arc::new(Shared::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new()
            .route("/{kind}", axum::routing::post(answer))
            .with_state(shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Backend { addr, shared }
    }

    /// The URL of `kind`'s endpoint, e.g. `http://127.0.0.1:PORT/connect`.
    pub fn url(&self, kind: &str) -> String {
        format!("http://{}/{kind}", self.addr)
    }

    /// How `kind` answers from now on.
    pub fn set(&self, kind: &str, reply: Reply) {
        self.shared
            .replies
            .lock()
            .expect("lock")
            .insert(kind.to_owned(), reply);
    }

    /// Every call so far, oldest first.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.calls.lock().expect("lock").clone()
    }

    /// The calls of `kind` so far.
    pub fn calls_of(&self, kind: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.kind == kind)
            .collect()
    }

    /// Waits until `cond` holds of the calls of `kind`.
    pub async fn wait_calls(&self, kind: &str, cond: impl Fn(&[Call]) -> bool) -> Vec<Call> {
        let deadline = tokio::time::Instant::now() + super::WAIT;
        loop {
            let calls = self.calls_of(kind);
            if cond(&calls) {
                return calls;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "calls of {kind} never matched: {calls:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every lifecycle notification received (and answered) so far, in
    /// order.
    pub fn notifications(&self) -> Vec<Value> {
        self.calls_of("events")
            .into_iter()
            .filter(|c| c.answered)
            .flat_map(|c| c.body["events"].as_array().cloned().unwrap_or_default())
            .collect()
    }
}

async fn answer(
    State(s): State<Arc<Shared>>,
    Path(kind): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let headers = headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let reply = s
        .replies
        .lock()
        .expect("lock")
        .get(&kind)
        .cloned()
        .unwrap_or(Reply::Json(json!({"result": {}})));
    let mut inner = &reply;
    while let Reply::Slow(_, r) = inner {
        inner = r;
    }
    s.calls.lock().expect("lock").push(Call {
        kind: kind.clone(),
        body: body.clone(),
        headers,
        answered: matches!(inner, Reply::Json(_) | Reply::With(_)),
    });
    render(reply, &body).await
}

fn render(reply: Reply, body: &Value) -> futures_util::future::BoxFuture<'static, Response> {
    let body = body.clone();
    Box::pin(async move {
        match reply {
            Reply::Json(v) => axum::Json(v).into_response(),
            Reply::With(f) => axum::Json(f(&body)).into_response(),
            Reply::Status(code) => (
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                "backend failure",
            )
                .into_response(),
            Reply::Garbage => "<html>not json</html>".into_response(),
            Reply::Slow(wait, inner) => {
                tokio::time::sleep(wait).await;
                render(*inner, &body).await
            }
        }
    })
}
