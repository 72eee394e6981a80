//! `gale client`: a WebSocket client for people and scripts. Interactive,
//! it sends each line typed and prints every message received (like
//! wscat), with a `  # …` line under each push or subscribe reply that
//! has a position in a topic's history; with `--send` it sends once,
//! prints the reply and exits 0, or non-zero on an error reply, a closed
//! connection or a timeout.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Why the client stopped unhappily; the message is printed as is.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection could not be opened.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The URL.
        url: String,
        /// What went wrong.
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
    /// The server refused the handshake, and said why.
    #[error("the server refused the connection: HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Refused {
        /// The HTTP status (401 for a bad token, 403 for an Origin, …).
        status: u16,
        /// The server's explanation, the body of its answer.
        body: String,
    },
    /// The connection failed while in use.
    #[error("connection error: {0}")]
    Socket(#[from] Box<tokio_tungstenite::tungstenite::Error>),
    /// The server closed the connection before replying.
    #[error("connection closed by the server{0}")]
    Closed(String),
    /// No reply in time.
    #[error("timeout: no reply within {0} ms")]
    Timeout(u64),
    /// The server answered with an error.
    #[error("{0}")]
    ErrorReply(String),
    /// Reading standard input failed.
    #[error("cannot read standard input: {0}")]
    Stdin(#[from] std::io::Error),
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str, token: Option<&str>) -> Result<Socket, ClientError> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let fail = |e| ClientError::Connect {
        url: url.to_owned(),
        source: Box::new(e),
    };
    let mut request = url.into_client_request().map_err(fail)?;
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().map_err(|_| {
            fail(tokio_tungstenite::tungstenite::Error::Url(
                tokio_tungstenite::tungstenite::error::UrlError::UnableToConnect(
                    "the token is not a valid header value".into(),
                ),
            ))
        })?;
        request.headers_mut().insert("authorization", value);
    }
    let (socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(response) => ClientError::Refused {
                status: response.status().as_u16(),
                body: response
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).trim().to_owned())
                    .unwrap_or_default(),
            },
            e => fail(e),
        })?;
    Ok(socket)
}

fn closed_reason(frame: Option<&CloseFrame>) -> String {
    frame
        .map(|f| format!(" ({} {})", u16::from(f.code), f.reason))
        .unwrap_or_default()
}

/// Whether a reply is an error: the plain protocol's `"type":"error"` or a
/// JSON event reply's `"ok":false`.
pub fn is_error_reply(text: &str) -> bool {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) => v["type"] == "error" || v["ok"] == false,
        Err(_) => false,
    }
}

/// A note on a message's place in a topic's history, for people: where a
/// positioned push sits, or what a recovering subscribe recovered.
pub fn position_note(text: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    if let (Some(topic), Some(offset), Some(epoch)) = (
        v["topic"].as_str(),
        v["offset"].as_u64(),
        v["epoch"].as_str(),
    ) {
        return Some(format!("{topic} at offset {offset}, epoch {epoch}"));
    }
    let data = &v["data"];
    let (offset, epoch) = (data["offset"].as_u64()?, data["epoch"].as_str()?);
    let topic = data["topic"].as_str().unwrap_or("the topic");
    Some(match data["recovered"].as_bool() {
        Some(true) => {
            let n = data["publications"].as_array().map_or(0, Vec::len);
            format!(
                "recovered {n} missed publication(s) on {topic}; now at offset {offset}, epoch {epoch}"
            )
        }
        Some(false) => format!(
            "not recovered: what was missed on {topic} is no longer kept; now at offset {offset}, epoch {epoch}"
        ),
        None => format!(
            "{topic} is at offset {offset}, epoch {epoch} (send it as \"since\" to recover later)"
        ),
    })
}

/// Whether `text` answers the message sent with `reference` (any text
/// does when the message had none: the plain protocol).
fn answers(text: &str, reference: Option<&serde_json::Value>) -> bool {
    let Some(reference) = reference else {
        return true;
    };
    // An error the server could not tie to the message (a ref it refused,
    // a rate limit) answers it too.
    serde_json::from_str::<serde_json::Value>(text)
        .map(|v| {
            v.get("reply") == Some(reference)
                || v["type"] == "error"
                || (v["ok"] == false && v["reply"].is_null())
        })
        .unwrap_or(false)
}

/// Whether a message is the server's greeting rather than a reply.
fn is_greeting(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text).is_ok_and(|v| v["type"] == "connected")
}

/// Sends `message` once and returns the first reply.
///
/// # Errors
/// [`ClientError`] on connection failure, close, timeout or an error reply
/// (the reply text is in [`ClientError::ErrorReply`]).
pub async fn send_once(
    url: &str,
    token: Option<&str>,
    message: &str,
    timeout: Duration,
) -> Result<String, ClientError> {
    let ms = timeout.as_millis() as u64;
    // A JSON event's reply carries its ref; pushes that come first (a
    // server-side subscription's, say) are not it.
    let reference = serde_json::from_str::<serde_json::Value>(message)
        .ok()
        .and_then(|v| v.get("ref").cloned());
    let work = async {
        let mut socket = connect(url, token).await?;
        socket
            .send(Message::text(message))
            .await
            .map_err(Box::new)?;
        let reply = loop {
            match socket.next().await {
                Some(Ok(Message::Text(t))) if is_greeting(&t) => continue,
                Some(Ok(Message::Text(t))) if !answers(&t, reference.as_ref()) => continue,
                Some(Ok(Message::Text(t))) => break t.to_string(),
                Some(Ok(Message::Close(f))) => {
                    return Err(ClientError::Closed(closed_reason(f.as_ref())));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(Box::new(e).into()),
                None => return Err(ClientError::Closed(String::new())),
            }
        };
        let _ = socket.close(None).await;
        Ok(reply)
    };
    let reply = tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ClientError::Timeout(ms))??;
    if is_error_reply(&reply) {
        Err(ClientError::ErrorReply(reply))
    } else {
        Ok(reply)
    }
}

/// Interactive session: lines from standard input go out, everything that
/// comes in is printed. At the end of input it waits (up to `linger`) for
/// the replies still due, then closes. Ends early when the server closes.
///
/// # Errors
/// [`ClientError`] when the connection cannot be opened or fails.
pub async fn interactive(
    url: &str,
    token: Option<&str>,
    linger: Duration,
) -> Result<(), ClientError> {
    let socket = connect(url, token).await?;
    eprintln!("connected to {url} (type a city and press Enter; Ctrl-D to quit)");
    let (mut tx, mut rx) = socket.split();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    // Replies still due: one per message sent.
    let mut due: usize = 0;
    let mut input_open = true;
    let give_up = tokio::time::sleep(Duration::MAX);
    tokio::pin!(give_up);
    loop {
        if !input_open && due == 0 {
            let close = CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            };
            tx.send(Message::Close(Some(close)))
                .await
                .map_err(Box::new)?;
            // Wait for the server's answer to the close.
            while let Ok(Some(Ok(_))) =
                tokio::time::timeout(Duration::from_secs(2), rx.next()).await
            {}
            return Ok(());
        }
        tokio::select! {
            line = lines.next_line(), if input_open => match line? {
                Some(line) => {
                    tx.send(Message::text(line)).await.map_err(Box::new)?;
                    due += 1;
                }
                None => {
                    input_open = false;
                    give_up.as_mut().reset(tokio::time::Instant::now() + linger);
                }
            },
            msg = rx.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    if !is_greeting(&t) {
                        due = due.saturating_sub(1);
                    }
                    println!("< {t}");
                    if let Some(note) = position_note(&t) {
                        println!("  # {note}");
                    }
                }
                Some(Ok(Message::Binary(b))) => println!("< ({} bytes of binary)", b.len()),
                Some(Ok(Message::Close(f))) => {
                    eprintln!("closed{}", closed_reason(f.as_ref()));
                    return Ok(());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(Box::new(e).into()),
                None => return Ok(()),
            },
            () = &mut give_up, if !input_open => {
                eprintln!("{due} replies still due after {} ms; closing", linger.as_millis());
                due = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::position_note;

    #[test]
    fn positions_are_described() {
        let push = r#"{"event":"e","data":1,"topic":"news","offset":5,"epoch":"ab"}"#;
        assert_eq!(
            position_note(push).as_deref(),
            Some("news at offset 5, epoch ab")
        );
        let back = r#"{"reply":"1","ok":true,"data":{"topic":"news","offset":7,"epoch":"ab","recovered":true,"publications":[{},{}]}}"#;
        assert_eq!(
            position_note(back).as_deref(),
            Some("recovered 2 missed publication(s) on news; now at offset 7, epoch ab")
        );
        let lost = r#"{"reply":"1","ok":true,"data":{"topic":"news","offset":7,"epoch":"cd","recovered":false}}"#;
        assert!(position_note(lost).is_some_and(|n| n.starts_with("not recovered")));
        assert_eq!(position_note(r#"{"event":"e","data":1}"#), None);
        assert_eq!(position_note("not json"), None);
    }
}
