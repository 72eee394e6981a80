//! A WebSocket client speaking raw RFC 6455 (and RFC 7692) frames, for
//! what a library client will not send: compressed frames, fragments,
//! broken frames.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::WAIT;

pub const TAIL: [u8; 4] = [0, 0, 0xFF, 0xFF];

/// A frame as received.
#[derive(Debug)]
pub struct Frame {
    pub compressed: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The message's text, inflated if it was compressed.
    pub fn text(&self) -> String {
        let bytes = if self.compressed {
            inflate(&self.payload)
        } else {
            self.payload.clone()
        };
        String::from_utf8(bytes).expect("UTF-8")
    }

    pub fn close_code(&self) -> u16 {
        assert_eq!(self.opcode, 8, "a close frame: {self:?}");
        u16::from_be_bytes([self.payload[0], self.payload[1]])
    }
}

pub fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    c.compress_vec(data, &mut out, FlushCompress::Sync)
        .expect("compress");
    assert!(out.ends_with(&TAIL));
    out.truncate(out.len() - 4);
    out
}

pub fn inflate(data: &[u8]) -> Vec<u8> {
    let mut d = Decompress::new(false);
    let mut input = data.to_vec();
    input.extend_from_slice(&TAIL);
    let mut out = Vec::with_capacity(1 << 20);
    d.decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .expect("inflate");
    out
}

/// A client speaking raw RFC 6455 frames.
pub struct Raw {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// The server's `Sec-WebSocket-Extensions`, if any.
    pub extensions: Option<String>,
}

impl Raw {
    pub async fn connect(addr: std::net::SocketAddr, path: &str, offer: Option<&str>) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Self::handshake(stream, path, offer).await
    }

    /// Connects with a receive buffer of `rcvbuf` bytes: a client whose
    /// kernel takes little before the server's writes block.
    pub async fn connect_small(addr: std::net::SocketAddr, path: &str, rcvbuf: u32) -> Raw {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.expect("connect");
        Self::handshake(stream, path, None).await
    }

    async fn handshake(mut stream: TcpStream, path: &str, offer: Option<&str>) -> Raw {
        let offer = offer
            .map(|o| format!("Sec-WebSocket-Extensions: {o}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
        );
        stream.write_all(req.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0; 1024];
            let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
                .await
                .expect("in time")
                .expect("read");
            assert!(n > 0, "closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..end].to_vec()).expect("head");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "{head}"
        );
        let extensions = head
            .lines()
            .find_map(|l| l.strip_prefix("sec-websocket-extensions: "))
            .map(str::to_owned);
        Raw {
            stream,
            buf: buf[end..].to_vec(),
            extensions,
        }
    }

    /// Sends one masked frame.
    pub async fn frame(&mut self, fin: bool, rsv1: bool, opcode: u8, payload: &[u8]) {
        self.try_frame(fin, rsv1, opcode, payload)
            .await
            .expect("write");
    }

    /// As [`Raw::frame`]; an error when the server has gone.
    pub async fn try_frame(
        &mut self,
        fin: bool,
        rsv1: bool,
        opcode: u8,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let mut f = vec![(u8::from(fin) << 7) | (u8::from(rsv1) << 6) | opcode];
        match payload.len() {
            n @ 0..=125 => f.push(0x80 | n as u8),
            n @ 126..=65535 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let key = [0x37, 0xfa, 0x21, 0x3d];
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        self.stream.write_all(&f).await
    }

    pub async fn text(&mut self, text: &str) {
        self.frame(true, false, 1, text.as_bytes()).await;
    }

    pub async fn compressed_text(&mut self, text: &str) {
        self.frame(true, true, 1, &deflate(text.as_bytes())).await;
    }

    /// The next whole frame from the server (which never masks).
    pub async fn next(&mut self) -> Frame {
        loop {
            if let Some(f) = self.take_frame() {
                return f;
            }
            let mut chunk = [0; 16384];
            let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .expect("a frame in time")
                .expect("read");
            assert!(n > 0, "closed with no frame");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// A whole frame from what was read, if there is one.
    fn take_frame(&mut self) -> Option<Frame> {
        let [b0, b1, ..] = self.buf[..] else {
            return None;
        };
        assert_eq!(b1 & 0x80, 0, "server frames are not masked");
        let (len, at) = match b1 & 0x7F {
            126 if self.buf.len() >= 4 => {
                (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
            }
            127 if self.buf.len() >= 10 => {
                let mut be = [0; 8];
                be.copy_from_slice(&self.buf[2..10]);
                (u64::from_be_bytes(be) as usize, 10)
            }
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        if self.buf.len() < at + len {
            return None;
        }
        assert!(b0 & 0x80 != 0, "the server sends whole messages");
        let payload = self.buf[at..at + len].to_vec();
        self.buf.drain(..at + len);
        Some(Frame {
            compressed: b0 & 0x40 != 0,
            opcode: b0 & 0x0F,
            payload,
        })
    }

    /// The next frame, or `None` once the server has closed the TCP
    /// connection.
    pub async fn next_any(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = self.take_frame() {
                return Some(f);
            }
            let mut chunk = [0; 16384];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next text message, skipping the greeting.
    pub async fn next_json(&mut self) -> (bool, Value) {
        loop {
            let f = self.next().await;
            assert_eq!(f.opcode, 1, "{f:?}");
            let v: Value = serde_json::from_str(&f.text()).expect("JSON");
            if v["type"] != "connected" {
                return (f.compressed, v);
            }
        }
    }
}
