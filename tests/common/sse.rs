//! A real SSE client for tests: `GET /sse` read as it streams, `POST
//! /sse/SESSION` to send.

use std::net::SocketAddr;

use serde_json::Value;

use super::WAIT;

pub struct SseClient {
    http: reqwest::Client,
    base: String,
    resp: reqwest::Response,
    buf: String,
    pub session: String,
    pub client_id: String,
}

impl SseClient {
    /// Opens `/sse{query}`; `Err` is the status of a refusal.
    pub async fn open(addr: SocketAddr, query: &str) -> Result<SseClient, u16> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        SseClient::open_at(reqwest::Client::new(), format!("http://{addr}"), query).await
    }

    /// Opens `/sse{query}` over gale's own TLS
    /// (`https://localhost:PORT`), offering `versions`, the test
    /// certificate trusted; its POSTs go over TLS too.
    pub async fn open_tls(
        addr: SocketAddr,
        query: &str,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Result<SseClient, u16> {
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(super::tls_client_config(versions))
            .build()
            .expect("an HTTPS client");
        let base = format!("https://localhost:{}", addr.port());
        SseClient::open_at(http, base, query).await
    }

    async fn open_at(http: reqwest::Client, base: String, query: &str) -> Result<SseClient, u16> {
        let resp = tokio::time::timeout(WAIT, http.get(format!("{base}/sse{query}")).send())
            .await
            .expect("in time")
            .expect("GET /sse");
        if resp.status() != 200 {
            return Err(resp.status().as_u16());
        }
        assert_eq!(
            resp.headers()["content-type"],
            "text/event-stream",
            "an event stream"
        );
        let mut c = SseClient {
            http,
            base,
            resp,
            buf: String::new(),
            session: String::new(),
            client_id: String::new(),
        };
        let hello = c.recv_json().await;
        assert_eq!(hello["type"], "connected", "{hello}");
        assert_eq!(hello["transport"], "sse", "{hello}");
        c.session = hello["session"].as_str().expect("session").to_owned();
        c.client_id = hello["client_id"].as_str().expect("client_id").to_owned();
        Ok(c)
    }

    /// POSTs one message; the status.
    pub async fn send(&self, text: &str) -> u16 {
        self.post_raw(&self.session, text.as_bytes().to_vec()).await
    }

    /// POSTs `body` to `/sse/{session}`; the status.
    pub async fn post_raw(&self, session: &str, body: Vec<u8>) -> u16 {
        let url = format!("{}/sse/{session}", self.base);
        tokio::time::timeout(WAIT, self.http.post(url).body(body).send())
            .await
            .expect("in time")
            .expect("POST")
            .status()
            .as_u16()
    }

    /// The next SSE message as (event name, data), comments skipped;
    /// `None` when the stream ended.
    pub async fn next_message(&mut self) -> Option<(String, String)> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let raw: String = self.buf.drain(..end + 2).collect();
                let mut event = "message".to_owned();
                let mut data = Vec::new();
                for line in raw.lines() {
                    if let Some(d) = line.strip_prefix("data: ") {
                        data.push(d.to_owned());
                    } else if let Some(e) = line.strip_prefix("event: ") {
                        event = e.to_owned();
                    }
                }
                if data.is_empty() {
                    continue; // a comment (keep-alive) or a retry: line
                }
                return Some((event, data.join("\n")));
            }
            let chunk = tokio::time::timeout(WAIT, self.resp.chunk())
                .await
                .unwrap_or_else(|_| panic!("no SSE message within {WAIT:?}"));
            match chunk {
                Ok(Some(bytes)) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                _ => return None,
            }
        }
    }

    /// The next data message, parsed.
    pub async fn recv_json(&mut self) -> Value {
        let (event, data) = self.next_message().await.expect("the stream ended");
        assert_eq!(event, "message", "{data}");
        serde_json::from_str(&data).expect("json")
    }

    /// Sends an event with `ref` `r` and reads until its reply.
    pub async fn request(&mut self, event: &str, data: Value, r: &str) -> Value {
        let msg = serde_json::json!({"event": event, "data": data, "ref": r});
        assert_eq!(self.send(&msg.to_string()).await, 202);
        loop {
            let m = self.recv_json().await;
            if m["reply"] == r {
                return m;
            }
        }
    }

    /// The next push (a message with an `event`).
    pub async fn next_push(&mut self) -> Value {
        loop {
            let m = self.recv_json().await;
            if m.get("event").is_some() {
                return m;
            }
        }
    }
}
