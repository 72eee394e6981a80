//! The floor: what delivering broadcasts costs with nothing but the
//! kernel in the way.
//!
//! `gale bench floor` is a server that accepts the clients `gale bench
//! broadcast` sends to gale: a WebSocket handshake, a `topic.subscribe`
//! answered with its reply, and `POST /api/publish`. It then delivers each
//! batch of publications with one plain write per connection of the same
//! bytes gale would send: no per-connection queue, no task, no wake-up,
//! one frame built per publication. Run the same `gale bench broadcast
//! --server-pid` against it and against gale in one session: gale's µs
//! of server CPU per delivery over the floor's is what gale adds to what
//! the kernel itself costs.
//!
//! It batches as gale does under load: the publications that arrive
//! within `window` of the first go out together, at most `max_batch` of
//! them. Its writer is one thread that a batch's writes hold up, so in a
//! burst it gathers far more than gale's delivery task (which hands the
//! writes to the connections' tasks): give `max_batch` gale's average
//! batch (`gale_broadcast_batch_sum / _count`) to compare like with like. Connections are only
//! ever written to once subscribed; what clients send after the
//! subscribe is never read.

use std::io::Write;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gale_engine::websocket::frame::{self, Opcode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Most bytes of a request head, or of a publish's body.
const MAX_REQUEST: usize = 1 << 20;
/// Publications waiting for the writer; past it a publish gets 503.
const QUEUE: usize = 10_000;

/// The subscribed connections, written to by the writer thread.
type Subscribers = Arc<Mutex<Vec<std::net::TcpStream>>>;

/// Serves on `listener` until `stop`: accepts, answers handshakes,
/// subscribes and publishes; one thread writes the batches.
pub async fn serve(
    listener: TcpListener,
    window: Duration,
    max_batch: usize,
    stop: CancellationToken,
) {
    let subscribers: Subscribers = Arc::default();
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(QUEUE);
    let writer = {
        let subscribers = subscribers.clone();
        std::thread::spawn(move || write_batches(&rx, &subscribers, window, max_batch.max(1)))
    };
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("gale bench floor: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let (tx, subscribers) = (tx.clone(), subscribers.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(stream, tx, subscribers).await {
                tracing::debug!(error = %e, "floor: connection ended");
            }
        });
    }
    drop(tx);
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
}

/// Why a floor connection ended early.
#[derive(Debug, thiserror::Error)]
enum FloorError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Bad(&'static str),
}

/// One accepted connection: a WebSocket that subscribes and is handed to
/// the writer, or HTTP publishes on a kept-alive connection.
async fn connection(
    mut stream: TcpStream,
    tx: SyncSender<Vec<u8>>,
    subscribers: Subscribers,
) -> Result<(), FloorError> {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        let Some(head_len) = read_head(&mut stream, &mut buf).await? else {
            return Ok(());
        };
        let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
        buf.drain(..head_len);
        if head.starts_with("GET ") {
            return subscribe(stream, &head, buf, &subscribers).await;
        }
        if !head.starts_with("POST /api/publish ") {
            stream
                .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                .await?;
            continue;
        }
        let length: usize = header(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .ok_or(FloorError::Bad("a publish without content-length"))?;
        if length > MAX_REQUEST {
            return Err(FloorError::Bad("a publish past 1 MiB"));
        }
        while buf.len() < length {
            if read_more(&mut stream, &mut buf).await? == 0 {
                return Ok(());
            }
        }
        let body: Vec<u8> = buf.drain(..length).collect();
        let status = match serde_json::from_slice::<Value>(&body) {
            Ok(v) => {
                let event = v["event"].as_str().unwrap_or("message");
                let mut text = gale_engine::protocol::push_json(event, &v["data"]);
                if let Some(topic) = v["topic"].as_str() {
                    // The bytes gale sends to a topic's subscribers.
                    text = gale_engine::history::with_topic(&text, topic);
                }
                match tx.try_send(frame::encode(Opcode::Text, false, text.as_bytes()).to_vec()) {
                    Ok(()) => "200 OK",
                    Err(TrySendError::Full(_)) => "503 Service Unavailable",
                    Err(TrySendError::Disconnected(_)) => return Ok(()),
                }
            }
            Err(_) => "400 Bad Request",
        };
        let answer = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{{}}"
        );
        stream.write_all(answer.as_bytes()).await?;
    }
}

/// Reads until `buf` holds a whole request head; its length, or `None`
/// at a clean end.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Option<usize>, FloorError> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(end + 4));
        }
        if buf.len() > MAX_REQUEST {
            return Err(FloorError::Bad("a request head past 1 MiB"));
        }
        if read_more(stream, buf).await? == 0 {
            return Ok(None);
        }
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut chunk = [0u8; 16 * 1024];
    let n = stream.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// A header's value in a request head (names compared without case).
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The handshake, then the client's first message (its subscribe)
/// answered with its reply; then the socket goes to the writer.
async fn subscribe(
    mut stream: TcpStream,
    head: &str,
    mut buf: Vec<u8>,
    subscribers: &Subscribers,
) -> Result<(), FloorError> {
    let key = header(head, "sec-websocket-key").ok_or(FloorError::Bad("no Sec-WebSocket-Key"))?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
    );
    stream.write_all(answer.as_bytes()).await?;
    let (header, payload) = loop {
        if let Ok(Some(h)) = frame::parse_header(&buf, false) {
            let end = h.header_len + h.len as usize;
            if buf.len() >= end {
                let mut payload = buf[h.header_len..end].to_vec();
                if let Some(mask) = h.mask {
                    frame::apply_mask(&mut payload, mask, 0);
                }
                break (h, payload);
            }
        }
        if buf.len() > MAX_REQUEST {
            return Err(FloorError::Bad("a first message past 1 MiB"));
        }
        if read_more(&mut stream, &mut buf).await? == 0 {
            return Ok(());
        }
    };
    if header.opcode != Opcode::Text {
        return Err(FloorError::Bad("the first message was not a subscribe"));
    }
    let asked: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
    let reply = json!({"reply": asked["ref"], "ok": true}).to_string();
    stream
        .write_all(&frame::encode(Opcode::Text, false, reply.as_bytes()))
        .await?;
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    subscribers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(stream);
    Ok(())
}

/// The bare loop: gathers the publications that arrive within `window`
/// of the first (at most `max_batch`), then writes them, as one buffer, to every subscriber
/// with one write each. Says each batch on stderr (a run's batches are
/// a few hundred at most).
fn write_batches(
    rx: &Receiver<Vec<u8>>,
    subscribers: &Subscribers,
    window: Duration,
    max_batch: usize,
) {
    let mut batch = Vec::new();
    let (mut batches, mut publications) = (0_u64, 0_u64);
    while let Ok(first) = rx.recv() {
        batch.clear();
        batch.extend_from_slice(&first);
        let mut n = 1;
        let until = Instant::now() + window;
        while n < max_batch {
            match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(more) => {
                    batch.extend_from_slice(&more);
                    n += 1;
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let subscribers = subscribers.lock().unwrap_or_else(|p| p.into_inner());
        for mut s in subscribers.iter() {
            // A subscriber that went away is skipped; the others go on.
            let _ = s.write_all(&batch);
        }
        batches += 1;
        publications += n as u64;
        eprintln!(
            "gale bench floor: batch {batches}: {n} publications to {} connections ({publications} so far)",
            subscribers.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_found_whatever_their_case() {
        let head = "GET /ws HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Key: abc==\r\n\r\n";
        assert_eq!(header(head, "sec-websocket-key"), Some("abc=="));
        assert_eq!(header(head, "content-length"), None);
    }
}
