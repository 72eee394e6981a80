//! A client connection for `--deflate` runs: the handshake offers
//! permessage-deflate, and frames are read and written with gale's own
//! codec in the client's role (tungstenite, the bench's usual client,
//! refuses compressed frames).

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::MaybeTlsStream;

use gale_engine::websocket::frame::{self, Opcode};
use gale_engine::websocket::{Utf8Bytes, deflate};

/// The largest message accepted, whole or inflated.
const MAX_MESSAGE: usize = 16 << 20;

/// A client WebSocket with permessage-deflate agreed.
#[derive(Debug)]
pub(crate) struct Deflating {
    stream: TcpStream,
    buf: BytesMut,
    /// Varies the masking key from frame to frame.
    mask: u32,
}

/// What a read brought.
#[derive(Debug)]
pub(crate) enum Received {
    /// A text message (inflated when it was compressed).
    Text(Utf8Bytes),
    /// Anything else that is not the end (binary, ping, pong).
    Other,
    /// The server's close frame, with its code and reason.
    Closed(u16, String),
}

impl Deflating {
    /// Opens the WebSocket on `stream`, offering permessage-deflate; an
    /// error if the server does not agree to it.
    pub(crate) async fn handshake(mut stream: TcpStream, url: &url::Url) -> Result<Self, String> {
        let host = url.host_str().unwrap_or("127.0.0.1");
        let port = url.port_or_known_default().unwrap_or(80);
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: Z2FsZS1iZW5jaC1rZXkhIQ==\r\n\
             Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover\r\n\r\n",
            &url[url::Position::BeforePath..]
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let mut buf = BytesMut::with_capacity(1024);
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 16 * 1024 {
                return Err("handshake: response head too long".into());
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) => return Err("handshake: connection closed".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("handshake: {e}")),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 101") {
            let status = head.lines().next().unwrap_or_default().to_owned();
            return Err(format!("handshake: {status}"));
        }
        if !head.contains("sec-websocket-extensions: permessage-deflate") {
            return Err("handshake: the server did not agree to permessage-deflate".into());
        }
        buf.advance(end);
        Ok(Deflating {
            stream,
            buf,
            mask: 0x9e37_79b9,
        })
    }

    /// Sends a text message, compressed and masked.
    pub(crate) async fn send_text(&mut self, text: &str) -> Result<(), String> {
        let framed =
            deflate::compress_frame(Opcode::Text, text.as_bytes(), deflate::MAX_WINDOW_BITS);
        self.send_masked(&framed).await
    }

    /// Sends a server-style (unmasked) frame as a client must: masked.
    async fn send_masked(&mut self, framed: &[u8]) -> Result<(), String> {
        let header = frame::parse_header(framed, true)
            .ok()
            .flatten()
            .ok_or("frame: unreadable header")?;
        self.mask = self
            .mask
            .wrapping_mul(0x0101_0101)
            .wrapping_add(0x7f4a_7c15);
        let key = self.mask.to_be_bytes();
        let mut out = Vec::with_capacity(framed.len() + 4);
        out.extend_from_slice(&framed[..header.header_len]);
        out[1] |= 0x80;
        out.extend_from_slice(&key);
        let start = out.len();
        out.extend_from_slice(&framed[header.header_len..]);
        frame::apply_mask(&mut out[start..], key, 0);
        self.stream
            .write_all(&out)
            .await
            .map_err(|e| format!("send: {e}"))
    }

    /// The next message from the server.
    pub(crate) async fn next(&mut self) -> Result<Received, String> {
        loop {
            if let Some(h) =
                frame::parse_header(&self.buf, true).map_err(|e| format!("frame: {e}"))?
            {
                let need = h.header_len + h.len as usize;
                if h.len as usize > MAX_MESSAGE {
                    return Err("frame: too large".into());
                }
                if self.buf.len() >= need {
                    self.buf.advance(h.header_len);
                    let payload = self.buf.split_to(h.len as usize);
                    if !h.fin {
                        return Err("frame: the server sent a fragment".into());
                    }
                    return match h.opcode {
                        Opcode::Text => {
                            let bytes = if h.compressed {
                                deflate::decompress(&payload, MAX_MESSAGE)
                                    .map_err(|e| format!("inflate: {e}"))?
                                    .into()
                            } else {
                                payload.freeze()
                            };
                            Utf8Bytes::try_from(bytes)
                                .map(Received::Text)
                                .map_err(|_| "text: not UTF-8".into())
                        }
                        Opcode::Close => Ok(match payload[..] {
                            [hi, lo, ref reason @ ..] => Received::Closed(
                                u16::from_be_bytes([hi, lo]),
                                String::from_utf8_lossy(reason).into_owned(),
                            ),
                            _ => Received::Closed(1005, String::new()),
                        }),
                        Opcode::Ping => {
                            let pong = frame::encode(Opcode::Pong, false, &payload);
                            self.send_masked(&pong).await?;
                            Ok(Received::Other)
                        }
                        _ => Ok(Received::Other),
                    };
                }
                self.buf.reserve(need - self.buf.len());
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Err("connection ended".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }
}

/// An SSE session held open (`--sse`): `GET /sse` read up to the
/// greeting, over plain TCP or TLS. It only listens; what it would send
/// goes by POST, which the scenarios that use `--sse` (connections)
/// never do.
#[derive(Debug)]
pub(crate) struct SseSession {
    stream: MaybeTlsStream<TcpStream>,
    buf: BytesMut,
}

impl SseSession {
    /// Opens `GET /sse` (the path of `url` with `/sse` for `/ws`) and reads
    /// the response head and the greeting.
    pub(crate) async fn open(
        mut stream: MaybeTlsStream<TcpStream>,
        url: &url::Url,
    ) -> Result<Self, String> {
        let host = url.host_str().unwrap_or("127.0.0.1");
        let path = url.path().strip_suffix("/ws").unwrap_or("");
        let query = url.query().map(|q| format!("?{q}")).unwrap_or_default();
        let req = format!(
            "GET {path}/sse{query} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n"
        );
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut s = SseSession {
            stream,
            buf: BytesMut::with_capacity(1024),
        };
        let head = s.read_until(b"\r\n\r\n").await?;
        if !head.starts_with(b"HTTP/1.1 200") {
            let line = String::from_utf8_lossy(&head[..head.len().min(40)]).into_owned();
            return Err(format!("GET /sse: {}", line.lines().next().unwrap_or("")));
        }
        s.read_until(b"\n\n").await?;
        // What a held session keeps: no read buffer beyond this.
        s.buf = BytesMut::new();
        Ok(s)
    }

    /// Reads until `end` and returns what came up to it, consumed.
    async fn read_until(&mut self, end: &[u8]) -> Result<BytesMut, String> {
        loop {
            if let Some(at) = self.buf.windows(end.len()).position(|w| w == end) {
                return Ok(self.buf.split_to(at + end.len()));
            }
            if self.buf.len() > MAX_MESSAGE {
                return Err("no end of message in 16 MiB".into());
            }
            self.buf.reserve(1024);
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Err("connection ended".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// The next `data:` message's text (chunk framing and keep-alive
    /// comments skipped).
    async fn next(&mut self) -> Result<Received, String> {
        loop {
            let block = self.read_until(b"\n\n").await?;
            let text = String::from_utf8_lossy(&block);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            if !data.is_empty() {
                return Ok(Received::Text(data.join("\n").into()));
            }
        }
    }
}

/// A bench connection: tungstenite's, [`Deflating`] for `--deflate`, or
/// an [`SseSession`] for `--sse`.
#[derive(Debug)]
pub(crate) enum Conn {
    /// No compression.
    Plain(Box<super::Ws>),
    /// permessage-deflate agreed.
    Deflate(Box<Deflating>),
    /// The SSE fallback, listening only.
    Sse(Box<SseSession>),
}

impl Conn {
    /// Sends a text message.
    pub(crate) async fn send_text(&mut self, text: String) -> Result<(), String> {
        use futures_util::SinkExt;
        match self {
            Conn::Plain(ws) => ws
                .send(tokio_tungstenite::tungstenite::Message::text(text))
                .await
                .map_err(|e| format!("send: {e}")),
            Conn::Deflate(ws) => ws.send_text(&text).await,
            Conn::Sse(_) => Err("--sse sessions only listen (connections scenario)".into()),
        }
    }

    /// The next message.
    pub(crate) async fn next(&mut self) -> Result<Received, String> {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        match self {
            Conn::Plain(ws) => match ws.next().await {
                Some(Ok(Message::Text(t))) => Ok(Received::Text(t)),
                Some(Ok(Message::Close(f))) => Ok(f
                    .map_or(Received::Closed(1005, String::new()), |f| {
                        Received::Closed(u16::from(f.code), f.reason.to_string())
                    })),
                Some(Ok(_)) => Ok(Received::Other),
                Some(Err(e)) => Err(format!("read: {e}")),
                None => Err("connection ended".into()),
            },
            Conn::Deflate(ws) => ws.next().await,
            Conn::Sse(s) => s.next().await,
        }
    }

    /// Closes politely (plain) or just drops (deflate).
    pub(crate) async fn close(self) {
        if let Conn::Plain(mut ws) = self {
            let _ = ws.close(None).await;
        }
    }
}
