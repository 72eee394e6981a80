//! gale's own WebSocket layer (RFC 6455, with RFC 7692 compression):
//! the handshake, the frame codec, and a socket that reads into a buffer
//! only while bytes are arriving and writes whole queues of frames with
//! one vectored write.
//!
//! Why not a library's socket: a broadcast is framed once ([`Prepared`])
//! and the same bytes are written to every recipient, with no copy per
//! recipient into a per-connection buffer; an idle connection holds no
//! read or write buffer at all; and permessage-deflate compresses a
//! broadcast once, not once per recipient. tungstenite (behind axum's
//! socket) copies each message into each connection's buffer and has no
//! compression. Conformance is held by the Autobahn suite
//! (`scripts/autobahn.sh`), cases 1 to 13.

pub mod deflate;
pub mod frame;
mod handshake;

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::sync::OwnedSemaphorePermit;

use crate::metrics::Metrics;
use crate::transport::Stream;

pub use handshake::{Upgrade, UpgradeError};
pub use tokio_tungstenite::tungstenite::Utf8Bytes;

use deflate::Agreed;
use frame::{FrameError, Opcode};

/// RFC 6455 close codes the server sends.
pub(crate) mod close_code {
    pub(crate) const GOING_AWAY: u16 = 1001;
    pub(crate) const PROTOCOL_ERROR: u16 = 1002;
    pub(crate) const INVALID_PAYLOAD: u16 = 1007;
    pub(crate) const POLICY_VIOLATION: u16 = 1008;
    pub(crate) const TOO_BIG: u16 = 1009;
    pub(crate) const TRY_AGAIN_LATER: u16 = 1013;
}

/// Frames a socket keeps queued at most; past it a pong is skipped
/// (RFC 6455 §5.5.3 allows answering only the latest ping), so a client
/// that floods pings and never reads cannot grow the queue.
const MAX_QUEUED_FRAMES: usize = 1024;

/// Queue slots an emptied write queue may keep.
const KEEP_SLOTS: usize = 16;

/// A message received.
#[derive(Debug)]
pub enum Message {
    /// A whole text message, UTF-8 checked.
    Text(Utf8Bytes),
    /// A whole binary message.
    Binary(Bytes),
    /// A ping; its pong is queued already.
    Ping,
    /// A pong.
    Pong,
    /// The peer's close frame; the answer is queued unless the server
    /// sent its own close first.
    Close,
    /// No message: over TLS, while the socket's stream is lent to its
    /// outbox ([`Socket::lendable`]), the peer came to be owed an answer
    /// (a key update it asked for): take the stream back and flush, and
    /// it goes out.
    Owed,
}

/// Why reading ended.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer closed the TCP connection.
    #[error("connection closed")]
    Closed,
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The peer broke the protocol: close with this code.
    #[error("{1}")]
    Violation(u16, &'static str),
}

impl From<FrameError> for Error {
    fn from(e: FrameError) -> Error {
        Error::Violation(
            close_code::PROTOCOL_ERROR,
            match e {
                FrameError::ReservedBits => "reserved bits set",
                FrameError::UnknownOpcode => "unknown opcode",
                FrameError::FragmentedControl => "fragmented control frame",
                FrameError::ControlTooLong => "control frame too long",
                FrameError::Unmasked => "client frames must be masked",
                FrameError::LengthEncoding => "bad payload length",
            },
        )
    }
}

/// Per-socket limits and choices, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest message accepted, whole or inflated.
    pub max_message: usize,
    /// Bytes asked of the kernel per read.
    pub read_buffer: usize,
    /// Messages shorter than this go out uncompressed.
    pub compress_min: usize,
}

/// A text message framed once, written as the same bytes to every
/// recipient (gorilla's `PreparedMessage`). Its compressed frame is made
/// the first time a recipient with permessage-deflate needs it, once.
#[derive(Debug, Clone)]
pub struct Prepared(Arc<PreparedInner>);

#[derive(Debug)]
struct PreparedInner {
    frame: Bytes,
    text: Utf8Bytes,
    deflated: OnceLock<Bytes>,
}

impl Prepared {
    /// Frames `text`.
    pub fn new(text: &str) -> Prepared {
        let frame = frame::encode(Opcode::Text, false, text.as_bytes());
        let payload = frame.slice(frame::header_len(text.len())..);
        // Valid by construction; checked again rather than assumed.
        let text = Utf8Bytes::try_from(payload).unwrap_or_default();
        Prepared(Arc::new(PreparedInner {
            frame,
            text,
            deflated: OnceLock::new(),
        }))
    }

    /// The message.
    pub fn as_str(&self) -> &str {
        self.0.text.as_str()
    }

    /// Its frame, uncompressed.
    pub(crate) fn frame(&self) -> &Bytes {
        &self.0.frame
    }

    /// With `n` bytes of `messages`' frames written, back to back: how
    /// many went whole, and what is left of the next one's frame (empty
    /// when none was begun). A run's messages are slices of its buffer,
    /// so this serves a run's frames as well.
    pub(crate) fn written(messages: &[Prepared], mut n: usize) -> (usize, Bytes) {
        for (whole, m) in messages.iter().enumerate() {
            let frame = m.frame();
            if n < frame.len() {
                let rest = if n > 0 {
                    frame.slice(n..)
                } else {
                    Bytes::new()
                };
                return (whole, rest);
            }
            n -= frame.len();
        }
        (messages.len(), Bytes::new())
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.0.text.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The frame for a socket, compressed when the socket agreed to it:
    /// the shared frame held by the message itself, no copy and no other
    /// reference count.
    fn frame_for(self, deflate: Option<Agreed>, min: usize, metrics: &Metrics) -> Frame {
        match deflate {
            Some(a) if self.len() >= min && a.server_window_bits == deflate::MAX_WINDOW_BITS => {
                self.0
                    .deflated
                    .get_or_init(|| compress(metrics, Opcode::Text, self.as_str().as_bytes(), a));
                Frame::Deflated(self, 0)
            }
            // A smaller window cannot share the common compressed frame.
            Some(a) if self.len() >= min => {
                Frame::Own(compress(metrics, Opcode::Text, self.as_str().as_bytes(), a))
            }
            _ => Frame::Plain(self, 0),
        }
    }
}

/// Pushes framed together: their frames copied once, back to back,
/// into one buffer that a socket writes as one slice. The kernel copies
/// one slice into its buffers for much less than one per message
/// (measured: the floor written one slice per message costs 10 % more,
/// all of it in the kernel's copy and `writev`), and a recipient's queue
/// holds the run as one entry: one reference count per run, not one per
/// message. Worth it when many connections get the same run; the copy
/// is made once for all of them.
#[derive(Debug, Clone)]
pub struct Run(Arc<RunInner>);

#[derive(Debug)]
struct RunInner {
    /// Every frame, back to back.
    all: Bytes,
    /// Each message, its frame a slice of `all`.
    messages: Vec<Prepared>,
    /// Where each message's frame starts in `all`.
    starts: Vec<usize>,
    /// The run whose messages this one begins with ([`Run::extend`]).
    base: Option<Weak<RunInner>>,
    /// How many runs before it it carries (0: none).
    depth: usize,
}

impl Run {
    /// Copies the frames of `messages` into one buffer.
    pub fn new(messages: &[Prepared]) -> Run {
        Run::build(messages, None, 0)
    }

    /// `base`'s messages and then `more`, in one buffer. Where a queue
    /// holds `base` followed by this run from `more` on, the two are
    /// written as this one slice ([`Run::continues`]).
    pub fn extend(base: &Run, more: &[Prepared]) -> Run {
        Run::build(
            &[base.messages(), more].concat(),
            Some(Arc::downgrade(&base.0)),
            base.0.depth + 1,
        )
    }

    /// How many runs before it this one carries: each is a copy a
    /// connection that holds them all keeps alive.
    pub fn depth(&self) -> usize {
        self.0.depth
    }

    /// How many handles to it there are (queues and sockets holding it,
    /// and the caller's).
    pub fn holders(&self) -> usize {
        Arc::strong_count(&self.0)
    }

    /// Whether this run, from its `from`th message, is what follows
    /// `before` in the run it extends: then `before` and it are one run,
    /// this one, from where `before` starts.
    pub fn continues(&self, before: &Run, from: usize) -> bool {
        from == before.len()
            && self
                .0
                .base
                .as_ref()
                .is_some_and(|b| std::ptr::eq(b.as_ptr(), Arc::as_ptr(&before.0)))
    }

    fn build(messages: &[Prepared], base: Option<Weak<RunInner>>, depth: usize) -> Run {
        let mut all = BytesMut::with_capacity(Run::bytes_of(messages));
        let mut starts = Vec::with_capacity(messages.len());
        for p in messages {
            starts.push(all.len());
            all.extend_from_slice(&p.0.frame);
        }
        let all = all.freeze();
        let messages = messages
            .iter()
            .zip(&starts)
            .map(|(p, &at)| {
                let frame = all.slice(at..at + p.0.frame.len());
                let header = frame.len() - p.0.text.len();
                // The same bytes as the message's own text: valid.
                let text = Utf8Bytes::try_from(frame.slice(header..)).unwrap_or_default();
                Prepared(Arc::new(PreparedInner {
                    frame,
                    text,
                    deflated: p.0.deflated.clone(),
                }))
            })
            .collect();
        Run(Arc::new(RunInner {
            all,
            messages,
            starts,
            base,
            depth,
        }))
    }

    /// Its messages, in order.
    pub fn messages(&self) -> &[Prepared] {
        &self.0.messages
    }

    /// How many messages it holds.
    pub fn len(&self) -> usize {
        self.0.messages.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.0.messages.is_empty()
    }

    /// Its frames' bytes.
    pub fn bytes(&self) -> usize {
        self.0.all.len()
    }

    /// The bytes of `messages`' frames.
    pub fn bytes_of(messages: &[Prepared]) -> usize {
        messages.iter().map(|p| p.0.frame.len()).sum()
    }

    /// Its frames from the `from`th message's on, back to back.
    pub(crate) fn frames_from(&self, from: usize) -> &[u8] {
        let at = self.0.starts.get(from).copied().unwrap_or(self.0.all.len());
        self.0.all.get(at..).unwrap_or_default()
    }
}

/// One frame waiting to be written.
#[derive(Debug)]
enum Frame {
    /// A frame of this socket's own; written bytes are advanced past.
    Own(Bytes),
    /// A prepared message's frame, and how many of its bytes are written.
    Plain(Prepared, usize),
    /// A prepared message's shared compressed frame, likewise.
    Deflated(Prepared, usize),
    /// A run's frames from this byte of its buffer on.
    Run(Run, usize),
}

impl Frame {
    /// What is left to write.
    fn bytes(&self) -> &[u8] {
        match self {
            Frame::Own(b) => b,
            Frame::Plain(p, at) => p.0.frame.get(*at..).unwrap_or_default(),
            Frame::Deflated(p, at) => {
                p.0.deflated
                    .get()
                    .and_then(|b| b.get(*at..))
                    .unwrap_or_default()
            }
            Frame::Run(r, at) => r.0.all.get(*at..).unwrap_or_default(),
        }
    }

    fn len(&self) -> usize {
        self.bytes().len()
    }

    /// Marks `n` more bytes written (at most [`Frame::len`]).
    fn advance(&mut self, n: usize) {
        match self {
            Frame::Own(b) => b.advance(n),
            Frame::Plain(_, at) | Frame::Deflated(_, at) | Frame::Run(_, at) => *at += n,
        }
    }
}

impl From<String> for Prepared {
    fn from(text: String) -> Prepared {
        Prepared::new(&text)
    }
}

impl From<&str> for Prepared {
    fn from(text: &str) -> Prepared {
        Prepared::new(text)
    }
}

/// One compressed frame, counted.
fn compress(metrics: &Metrics, opcode: Opcode, payload: &[u8], agreed: Agreed) -> Bytes {
    let frame = deflate::compress_frame(opcode, payload, agreed.server_window_bits);
    metrics.compressed_messages.inc();
    metrics.compression_in_bytes.inc_by(payload.len() as u64);
    let header = frame::parse_header(&frame, true).ok().flatten();
    let payload_len = header.map_or(frame.len(), |h| frame.len() - h.header_len);
    metrics.compression_out_bytes.inc_by(payload_len as u64);
    frame
}

/// A message arriving in fragments.
struct Partial {
    opcode: Opcode,
    compressed: bool,
    data: BytesMut,
    /// Bytes of `data` known to be valid UTF-8 so far (text only).
    valid: usize,
}

/// Largest message copied out of the read chunk it came in (when that
/// chunk is larger: `server.read_buffer_bytes`), so that a handler keeping
/// it does not keep the chunk; larger ones are split off, no copy.
const MAX_COPIED: usize = 1024;

/// One upgraded WebSocket connection.
pub struct Socket {
    stream: Stream,
    /// Bytes read and not yet parsed. Released whenever it is empty, so
    /// an idle connection holds no read buffer.
    read: BytesMut,
    partial: Option<Partial>,
    /// Payload bytes of the text frame at the front of `read`, still
    /// arriving, already checked as UTF-8 (up to a character's end).
    arriving: u32,
    /// Whole frames waiting to be written; the front may be partly
    /// written already (advanced).
    out: VecDeque<Frame>,
    deflate: Option<Agreed>,
    limits: Limits,
    /// The server's close frame is queued or sent.
    sent_close: bool,
    /// The client's close frame came (valid or not): the closing
    /// handshake waits for nothing more from it.
    got_close: bool,
    metrics: Arc<Metrics>,
    /// The listener's permit: the connection counts against
    /// `server.max_connections` until the socket is dropped.
    _permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("deflate", &self.deflate)
            .field("queued", &self.out.len())
            .finish_non_exhaustive()
    }
}

impl Socket {
    pub(crate) fn new(
        stream: Stream,
        read: Bytes,
        deflate: Option<Agreed>,
        limits: Limits,
        metrics: Arc<Metrics>,
        permit: OwnedSemaphorePermit,
    ) -> Socket {
        if deflate.is_some() {
            metrics.compressed_connections.inc();
        }
        // Shared, so that its outbox can lend it while it is idle.
        let stream = match stream {
            Stream::Plain(tcp) => Stream::Shared(Arc::new(tcp)),
            other => other,
        };
        Socket {
            stream,
            read: BytesMut::from(&read[..]),
            partial: None,
            arriving: 0,
            out: VecDeque::new(),
            deflate,
            limits,
            sent_close: false,
            got_close: false,
            metrics,
            _permit: permit,
        }
    }

    /// The next message. Cancel-safe: all state lives in the socket.
    pub async fn recv(&mut self) -> Result<Message, Error> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Message, Error>> {
        loop {
            if let Some(msg) = self.parse()? {
                return Poll::Ready(Ok(msg));
            }
            if self.read.is_empty() && self.read.capacity() > 0 {
                self.read = BytesMut::new();
            }
            let read = self
                .stream
                .poll_read_buf(cx, &mut self.read, self.limits.read_buffer);
            let Poll::Ready(read) = read else {
                if self.stream.owes_answer() {
                    return Poll::Ready(Ok(Message::Owed));
                }
                return Poll::Pending;
            };
            match read {
                Ok(0) => return Poll::Ready(Err(Error::Closed)),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }

    /// Takes one whole message (or control frame) out of the read buffer.
    fn parse(&mut self) -> Result<Option<Message>, Error> {
        loop {
            let Some(h) = frame::parse_header(&self.read, self.deflate.is_some())? else {
                return Ok(None);
            };
            let Some(mask) = h.mask else {
                return Err(FrameError::Unmasked.into());
            };
            let so_far = self.partial.as_ref().map_or(0, |p| p.data.len());
            if !h.opcode.is_control()
                && h.len > (self.limits.max_message - so_far.min(self.limits.max_message)) as u64
            {
                return Err(Error::Violation(close_code::TOO_BIG, "message too big"));
            }
            let need = h.header_len + h.len as usize;
            if self.read.len() < need {
                self.check_arriving(&h, mask)?;
                self.read.reserve(need - self.read.len());
                return Ok(None);
            }
            self.arriving = 0;
            self.read.advance(h.header_len);
            let len = h.len as usize;
            let mut payload = if matches!(h.opcode, Opcode::Text | Opcode::Binary)
                && !h.compressed
                && len <= self.limits.read_buffer.min(MAX_COPIED)
            {
                // Copied out: a message a handler keeps (a city name
                // waiting on an upstream call) would otherwise pin the
                // whole read chunk it came in, for as long as it waits.
                let copy = BytesMut::from(&self.read[..len]);
                self.read.advance(len);
                copy
            } else {
                self.read.split_to(len)
            };
            frame::apply_mask(&mut payload, mask, 0);
            match h.opcode {
                Opcode::Ping => {
                    if self.out.len() < MAX_QUEUED_FRAMES && !self.sent_close {
                        self.out.push_back(Frame::Own(frame::encode(
                            Opcode::Pong,
                            false,
                            &payload,
                        )));
                    }
                    return Ok(Some(Message::Ping));
                }
                Opcode::Pong => return Ok(Some(Message::Pong)),
                Opcode::Close => {
                    self.got_close = true;
                    let code = frame::parse_close(&payload).map_err(|e| match e {
                        frame::CloseError::Reason => Error::Violation(
                            close_code::INVALID_PAYLOAD,
                            "close reason is not UTF-8",
                        ),
                        _ => Error::Violation(close_code::PROTOCOL_ERROR, "invalid close frame"),
                    })?;
                    if !self.sent_close {
                        self.sent_close = true;
                        let answer = code
                            .map(|c| frame::close_payload(c, ""))
                            .unwrap_or_default();
                        self.out.push_back(Frame::Own(frame::encode(
                            Opcode::Close,
                            false,
                            &answer,
                        )));
                    }
                    return Ok(Some(Message::Close));
                }
                Opcode::Text | Opcode::Binary => {
                    if self.partial.is_some() {
                        return Err(Error::Violation(
                            close_code::PROTOCOL_ERROR,
                            "new message before the last one ended",
                        ));
                    }
                    let mut p = Partial {
                        opcode: h.opcode,
                        compressed: h.compressed,
                        data: payload,
                        valid: 0,
                    };
                    if h.fin {
                        return self.finish(p).map(Some);
                    }
                    check_utf8(&mut p)?;
                    self.partial = Some(p);
                }
                Opcode::Continuation => {
                    let Some(mut p) = self.partial.take() else {
                        return Err(Error::Violation(
                            close_code::PROTOCOL_ERROR,
                            "continuation with no message",
                        ));
                    };
                    p.data.extend_from_slice(&payload);
                    if h.fin {
                        return self.finish(p).map(Some);
                    }
                    check_utf8(&mut p)?;
                    self.partial = Some(p);
                }
            }
        }
    }

    /// Fails a text frame still arriving at its first byte that cannot be
    /// UTF-8, not once the whole frame is in: a client cannot make the
    /// server hold up to `max_message` bytes of a frame already known bad.
    /// Each byte is checked once: `arriving` keeps how far the check got.
    fn check_arriving(&mut self, h: &frame::Header, mask: [u8; 4]) -> Result<(), Error> {
        // The end of a character the fragment before began.
        let carry = match (h.opcode, &self.partial) {
            (Opcode::Text, None) if !h.compressed => &[][..],
            (Opcode::Continuation, Some(p)) if p.opcode == Opcode::Text && !p.compressed => {
                p.data.get(p.valid..).unwrap_or_default()
            }
            _ => return Ok(()),
        };
        // Never more than a character's first three bytes; if it were (a
        // fragment taken over unchecked), the whole message is checked
        // once it ends.
        if carry.len() > 3 {
            return Ok(());
        }
        let from = self.arriving as usize;
        let arrived = self.read.get(h.header_len..).unwrap_or_default();
        // Bytes unmasked a piece at a time, behind the start of a
        // character the piece before ended in (at most 3 bytes).
        const PIECE: usize = 256;
        let mut buf = [0_u8; PIECE + 3];
        let mut held = 0;
        if from == 0 {
            buf[..carry.len()].copy_from_slice(carry);
            held = carry.len();
        }
        let mut at = from;
        while at < arrived.len() {
            let take = (arrived.len() - at).min(PIECE);
            let piece = &mut buf[held..held + take];
            piece.copy_from_slice(&arrived[at..at + take]);
            frame::apply_mask(piece, mask, at);
            at += take;
            let filled = held + take;
            let whole = utf8_prefix(&buf[..filled])?;
            buf.copy_within(whole..filled, 0);
            held = filled - whole;
        }
        // Where the last whole character ends: held bytes come after
        // `from`, except a carried character still unfinished, which
        // leaves the check at the frame's start.
        let checked = at.saturating_sub(held);
        self.arriving = u32::try_from(checked).unwrap_or(self.arriving);
        Ok(())
    }

    fn finish(&self, p: Partial) -> Result<Message, Error> {
        let data = if p.compressed {
            Bytes::from(
                deflate::decompress(&p.data, self.limits.max_message).map_err(|e| match e {
                    deflate::InflateError::TooBig => {
                        Error::Violation(close_code::TOO_BIG, "message too big")
                    }
                    deflate::InflateError::Corrupt => {
                        Error::Violation(close_code::INVALID_PAYLOAD, "invalid compressed data")
                    }
                })?,
            )
        } else {
            p.data.freeze()
        };
        Ok(match p.opcode {
            Opcode::Text => Message::Text(Utf8Bytes::try_from(data).map_err(|_| {
                Error::Violation(close_code::INVALID_PAYLOAD, "invalid UTF-8 in text")
            })?),
            _ => Message::Binary(data),
        })
    }

    /// Queues a text message, compressed when agreed and long enough.
    pub fn queue_text(&mut self, text: &str) {
        self.queue_data(Opcode::Text, text.as_bytes());
    }

    /// Queues a binary message, compressed when agreed and long enough.
    pub fn queue_binary(&mut self, data: &[u8]) {
        self.queue_data(Opcode::Binary, data);
    }

    fn queue_data(&mut self, opcode: Opcode, data: &[u8]) {
        let frame = match self.deflate {
            Some(a) if data.len() >= self.limits.compress_min => {
                compress(&self.metrics, opcode, data, a)
            }
            _ => frame::encode(opcode, false, data),
        };
        self.out.push_back(Frame::Own(frame));
    }

    /// Makes room for `frames` more frames at once, rather than growing
    /// the queue frame by frame.
    pub fn reserve(&mut self, frames: usize) {
        self.out.reserve(frames);
    }

    /// Queues a prepared message: the shared frame, no copy.
    pub fn queue_prepared(&mut self, msg: Prepared) {
        let frame = msg.frame_for(self.deflate, self.limits.compress_min, &self.metrics);
        self.out.push_back(frame);
    }

    /// Queues a run's messages from the `from`th on: the rest of its
    /// buffer as one frame, or, where each message may be compressed,
    /// message by message.
    pub fn queue_run(&mut self, run: Run, from: usize) {
        let Some(&at) = run.0.starts.get(from) else {
            return;
        };
        if self.compresses() {
            for p in &run.0.messages[from..] {
                self.queue_prepared(p.clone());
            }
        } else {
            self.out.push_back(Frame::Run(run, at));
        }
    }

    /// Queues a ping.
    pub fn queue_ping(&mut self) {
        self.out
            .push_back(Frame::Own(frame::encode(Opcode::Ping, false, &[])));
    }

    /// Queues the server's close frame (once).
    pub fn queue_close(&mut self, code: u16, reason: &str) {
        if !self.sent_close {
            self.sent_close = true;
            self.out.push_back(Frame::Own(frame::encode(
                Opcode::Close,
                false,
                &frame::close_payload(code, reason),
            )));
        }
    }

    /// Writes every queued frame: as many as fit in one vectored write at
    /// a time. Cancel-safe.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let frames = self.out.iter().map(Frame::bytes);
            let mut wrote = ready!(self.stream.poll_write_frames(cx, frames))?;
            if wrote == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            while let Some(front) = self.out.front_mut() {
                if wrote < front.len() {
                    front.advance(wrote);
                    break;
                }
                wrote -= front.len();
                self.out.pop_front();
                if wrote == 0 {
                    break;
                }
            }
        }
        self.stream.poll_flush_buffered(cx)
    }

    /// Gives back the write queue's memory beyond a few slots once it is
    /// empty. Not done by every flush: a connection under a burst would
    /// allocate its queue again for the next one. Its owner calls this
    /// once the traffic is light again, or the connection quiet.
    pub fn trim(&mut self) {
        if self.out.is_empty() && self.out.capacity() > KEEP_SLOTS {
            self.out = VecDeque::new();
        }
    }

    /// Flushes what is queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_flush(cx)).await
    }
}

/// A socket's stream as its outbox may hold it while the socket writes
/// nothing ([`Socket::lendable`]).
pub(crate) enum Lendable<'a> {
    /// Plain TCP.
    Plain(&'a Arc<tokio::net::TcpStream>),
    /// TLS on gale's records: its socket and record layer.
    Tls(
        &'a Arc<tokio::net::TcpStream>,
        &'a Arc<std::sync::Mutex<crate::tls::Records>>,
    ),
}

/// A socket between two messages, taken apart for a takeover: its TCP
/// stream and every byte of state it holds, so the new process goes on
/// from exactly where this one stopped.
#[derive(Debug)]
pub(crate) struct Parts {
    /// The connection.
    pub(crate) tcp: tokio::net::TcpStream,
    /// Over TLS, the stream's state.
    pub(crate) tls: Option<crate::tls::Moving>,
    /// Bytes read and not yet parsed.
    pub(crate) read: Bytes,
    /// A message begun in fragments: whether binary, whether compressed,
    /// the UTF-8-checked prefix, and its bytes so far.
    pub(crate) partial: Option<(bool, bool, usize, Bytes)>,
    /// Frames queued and not yet (wholly) written, back to back.
    pub(crate) queued: Bytes,
    /// The permessage-deflate window agreed, if any.
    pub(crate) deflate: Option<u8>,
}

impl Socket {
    /// Whether the client's close frame has come.
    pub(crate) fn got_close(&self) -> bool {
        self.got_close
    }

    /// Whether permessage-deflate was agreed.
    pub(crate) fn compresses(&self) -> bool {
        self.deflate.is_some()
    }

    /// Its stream, for its outbox to lend while the socket writes
    /// nothing: not compressing (a push is written as its shared frame),
    /// nothing queued or half-written, and no close sent; plain TCP, or
    /// TLS on gale's records with nothing of its own waiting (a push is
    /// then sealed by whoever sends it). Once the outbox took it,
    /// [`Socket::lent`].
    pub(crate) fn lendable(&self) -> Option<Lendable<'_>> {
        if self.compresses() || !self.out.is_empty() || self.sent_close {
            return None;
        }
        match &self.stream {
            Stream::Shared(tcp) => Some(Lendable::Plain(tcp)),
            Stream::Tls(tls) => tls
                .lendable()
                .map(|(tcp, records)| Lendable::Tls(tcp, records)),
            Stream::Plain(_) => None,
        }
    }

    /// Its outbox holds the stream ([`Socket::lendable`]).
    pub(crate) fn lent(&mut self) {
        if let Stream::Tls(tls) = &mut self.stream {
            tls.lent();
        }
    }

    /// The stream is back from its outbox, with `rest`, the end of what a
    /// lent write began (a frame's end, or over TLS records sealed and not
    /// written): it goes first.
    pub(crate) fn taken_back(&mut self, rest: Option<Bytes>) {
        match &mut self.stream {
            Stream::Tls(tls) => tls.taken_back(rest),
            _ => {
                if let Some(rest) = rest {
                    self.queue_rest(rest);
                }
            }
        }
    }

    /// Whether anything waits to be written: in its frame queue, or over
    /// TLS sealed and not yet written (records a lent write left).
    pub(crate) fn has_queued(&self) -> bool {
        !self.out.is_empty() || matches!(&self.stream, Stream::Tls(tls) if tls.has_unsent())
    }

    /// Queues the rest of a frame someone else began to write into this
    /// socket while it was lent, first: its bytes, as they are, before
    /// whatever was queued since (nothing queued was written since the
    /// stream was lent, which it was only with nothing queued).
    pub(crate) fn queue_rest(&mut self, rest: Bytes) {
        if !rest.is_empty() {
            self.out.push_front(Frame::Own(rest));
        }
    }

    /// Takes the socket apart for a takeover; `Err` gives it back when it
    /// cannot move (a close already sent or answered, or a TLS stream
    /// that cannot, see [`crate::tls::TlsStream::into_moving`]).
    pub(crate) fn into_parts(self) -> Result<Parts, Box<Socket>> {
        let Socket {
            stream,
            read,
            partial,
            // Checked again from the frame's start after the takeover.
            arriving: _,
            out,
            deflate,
            limits,
            sent_close,
            got_close,
            metrics,
            _permit,
        } = self;
        // A stream still lent stays (its outbox gives it back first).
        let stream = match stream {
            Stream::Shared(tcp) => Arc::try_unwrap(tcp).map_or_else(Stream::Shared, Stream::Plain),
            other => other,
        };
        let closing = sent_close || got_close;
        let moved = match stream {
            Stream::Plain(tcp) if !closing => Ok((tcp, None)),
            Stream::Tls(tls) if !closing => tls
                .into_moving()
                .map(|(tcp, moving, plain)| (tcp, Some((moving, plain))))
                .map_err(Stream::Tls),
            stream => Err(stream),
        };
        let (tcp, tls) = match moved {
            Ok(moved) => moved,
            Err(stream) => {
                return Err(Box::new(Socket {
                    stream,
                    read,
                    partial,
                    arriving: 0,
                    out,
                    deflate,
                    limits,
                    sent_close,
                    got_close,
                    metrics,
                    _permit,
                }));
            }
        };
        let mut queued = BytesMut::with_capacity(out.iter().map(Frame::len).sum());
        for frame in &out {
            queued.extend_from_slice(frame.bytes());
        }
        // Plaintext the TLS stream opened and the socket has not read
        // comes after what the socket read.
        let (tls, read) = match tls {
            None => (None, read),
            Some((moving, plain)) => {
                let mut read = read;
                read.extend_from_slice(&plain);
                (Some(moving), read)
            }
        };
        Ok(Parts {
            tcp,
            tls,
            read: read.freeze(),
            partial: partial.map(|p| {
                (
                    p.opcode == Opcode::Binary,
                    p.compressed,
                    p.valid,
                    p.data.freeze(),
                )
            }),
            queued: queued.freeze(),
            deflate: deflate.map(|a| a.server_window_bits),
        })
    }

    /// A socket taken over from the previous process, going on from
    /// `parts`.
    ///
    /// # Errors
    /// A TLS stream whose state does not import.
    pub(crate) fn resume(
        parts: Parts,
        limits: Limits,
        metrics: Arc<Metrics>,
        permit: OwnedSemaphorePermit,
    ) -> io::Result<Socket> {
        let deflate = parts.deflate.map(|bits| Agreed {
            server_window_bits: bits.clamp(8, deflate::MAX_WINDOW_BITS),
        });
        let stream = match parts.tls {
            None => Stream::Plain(parts.tcp),
            Some(moving) => {
                Stream::Tls(Box::new(crate::tls::TlsStream::resume(parts.tcp, moving)?))
            }
        };
        let mut socket = Socket::new(stream, parts.read, deflate, limits, metrics, permit);
        socket.partial = parts
            .partial
            .map(|(binary, compressed, valid, data)| Partial {
                opcode: if binary { Opcode::Binary } else { Opcode::Text },
                compressed,
                valid: valid.min(data.len()),
                data: BytesMut::from(&data[..]),
            });
        if !parts.queued.is_empty() {
            socket.out.push_back(Frame::Own(parts.queued));
        }
        Ok(socket)
    }
}

/// Fails a fragmented text message as soon as its bytes cannot be UTF-8,
/// rather than at its end. Compressed messages are checked once inflated.
fn check_utf8(p: &mut Partial) -> Result<(), Error> {
    if p.opcode != Opcode::Text || p.compressed {
        return Ok(());
    }
    p.valid += utf8_prefix(&p.data[p.valid..])?;
    Ok(())
}

/// How many bytes of `bytes` are whole UTF-8 characters, the rest being
/// the start of one still to come; an error if they cannot be UTF-8.
fn utf8_prefix(bytes: &[u8]) -> Result<usize, Error> {
    match std::str::from_utf8(bytes) {
        Ok(_) => Ok(bytes.len()),
        Err(e) if e.error_len().is_some() => Err(Error::Violation(
            close_code::INVALID_PAYLOAD,
            "invalid UTF-8 in text",
        )),
        Err(e) => Ok(e.valid_up_to()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(msgs: &[Prepared]) -> Vec<u8> {
        msgs.iter().flat_map(|p| p.0.frame.to_vec()).collect()
    }

    fn run(texts: &[&str]) -> (Vec<Prepared>, Run) {
        let msgs: Vec<Prepared> = texts.iter().map(|t| Prepared::new(t)).collect();
        let run = Run::new(&msgs);
        (msgs, run)
    }

    #[test]
    fn a_run_keeps_each_message_and_its_frame() {
        let (msgs, run) = run(&["a", "bb", &"x".repeat(300)]);
        assert_eq!(run.len(), 3);
        for (j, p) in run.messages().iter().zip(&msgs) {
            assert_eq!(j.as_str(), p.as_str());
            assert_eq!(j.0.frame, p.0.frame);
        }
        assert_eq!(run.0.all, frames(&msgs), "back to back");
    }

    #[test]
    fn a_run_is_written_as_one_frame_from_where_it_starts() {
        let (msgs, r) = run(&["one", "two", "three"]);
        let mut out = VecDeque::new();
        out.push_back(Frame::Run(r.clone(), 0));
        assert_eq!(out[0].bytes(), frames(&msgs), "one slice, the same bytes");
        out[0].advance(2);
        assert_eq!(out[0].bytes(), &frames(&msgs)[2..], "partly written");
        let rest = Frame::Run(r.clone(), r.0.starts[1]);
        assert_eq!(rest.bytes(), frames(&msgs[1..]), "the first one dropped");
    }

    #[test]
    fn an_extended_run_continues_its_base_and_nothing_else() {
        let (msgs, base) = run(&["a", "b"]);
        let more = [Prepared::new("c")];
        let longer = Run::extend(&base, &more);
        assert_eq!(
            longer.0.all,
            frames(&[msgs.clone(), more.to_vec()].concat())
        );
        assert!(longer.continues(&base, 2));
        assert!(!longer.continues(&base, 1), "only from where the base ends");
        let (_, copy) = run(&["a", "b"]);
        assert!(!longer.continues(&copy, 2), "the same bytes, another run");
        assert!(!base.continues(&longer, 3));
        let longest = Run::extend(&longer, &[Prepared::new("d")]);
        assert!(longest.continues(&longer, 3));
        assert!(!longest.continues(&base, 2), "one step at a time");
    }

    /// A socket over plain TCP, reading in chunks of `read_buffer`, and
    /// its client's end.
    async fn plain_socket(read_buffer: usize) -> (Socket, tokio::net::TcpStream) {
        let (server, client) = crate::transport::tcp_pair().await;
        let permit = Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .expect("permit");
        let limits = Limits {
            max_message: 1024,
            read_buffer,
            compress_min: 1024,
        };
        let socket = Socket::new(
            Stream::Plain(server),
            Bytes::new(),
            None,
            limits,
            Arc::new(Metrics::new()),
            permit,
        );
        (socket, client)
    }

    #[tokio::test]
    async fn a_small_message_keeps_nothing_of_the_read_chunk() {
        use tokio::io::AsyncWriteExt;
        let (mut socket, mut client) = plain_socket(256).await;
        // "Oslo", masked with a zero key.
        let frame = [0x81, 0x84, 0, 0, 0, 0, b'O', b's', b'l', b'o'];
        client.write_all(&frame).await.expect("write");
        let Message::Text(text) = socket.recv().await.expect("recv") else {
            panic!("a text message")
        };
        assert_eq!(text.as_str(), "Oslo");
        // Split off the chunk, it would share the chunk's allocation with
        // the socket's read buffer and keep all of it once that is gone.
        let bytes = Bytes::from(text);
        assert!(bytes.is_unique(), "its own four bytes, not the chunk");
    }

    /// The masking key of the client frames below.
    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// `payload` masked with `KEY`, as if it began `offset` bytes into
    /// its frame's payload.
    fn masked(payload: &[u8], offset: usize) -> Vec<u8> {
        let mut bytes = payload.to_vec();
        frame::apply_mask(&mut bytes, KEY, offset);
        bytes
    }

    /// A client frame's header: FIN, the opcode, the length, `KEY`.
    fn header(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
        let first = if fin { 0x80 } else { 0 } | opcode;
        let mut h = match u8::try_from(len) {
            Ok(short) if short < 126 => vec![first, 0x80 | short],
            _ => {
                let [hi, lo] = u16::try_from(len).expect("a test frame").to_be_bytes();
                vec![first, 0x80 | 126, hi, lo]
            }
        };
        h.extend_from_slice(&KEY);
        h
    }

    /// What `recv` gives within `secs`: `None` if it is still waiting.
    async fn recv_within(socket: &mut Socket, secs: u64) -> Option<Result<Message, Error>> {
        tokio::time::timeout(std::time::Duration::from_secs(secs), socket.recv())
            .await
            .ok()
    }

    /// Fails unless `got` is a close with 1007.
    fn assert_invalid(got: Option<Result<Message, Error>>) {
        match got {
            Some(Err(Error::Violation(close_code::INVALID_PAYLOAD, _))) => {}
            other => panic!("failed at once with 1007, got {other:?}"),
        }
    }

    /// Writes `parts` one after another, a pause between them, and gives
    /// the client back.
    fn write_slowly(
        mut client: tokio::net::TcpStream,
        parts: Vec<Vec<u8>>,
    ) -> tokio::task::JoinHandle<tokio::net::TcpStream> {
        use tokio::io::AsyncWriteExt;
        tokio::spawn(async move {
            for part in parts {
                client.write_all(&part).await.expect("write");
                tokio::time::sleep(std::time::Duration::from_millis(3)).await;
            }
            client
        })
    }

    /// Reads one message within 10 s: it must be the text `want`.
    async fn assert_text(socket: &mut Socket, want: &str) {
        match recv_within(socket, 10).await {
            Some(Ok(Message::Text(got))) => assert_eq!(got.as_str(), want),
            other => panic!("the text message, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_text_frame_fails_at_its_first_bad_byte_not_at_its_end() {
        use tokio::io::AsyncWriteExt;
        let (mut socket, mut client) = plain_socket(256).await;
        // 40 bytes announced; valid text (7 bytes: the bad ones start off
        // the key's phase), then a sequence past U+10FFFF, the rest unsent.
        let mut bytes = header(true, 0x1, 40);
        bytes.extend(masked("Zürich".as_bytes(), 0));
        client.write_all(&bytes).await.expect("write");
        assert!(
            recv_within(&mut socket, 1).await.is_none(),
            "valid so far: waits"
        );
        client
            .write_all(&masked(&[0xf4, 0x90, 0x80, 0x80], 7))
            .await
            .expect("write");
        assert_invalid(recv_within(&mut socket, 1).await);
    }

    #[tokio::test]
    async fn a_continuation_fails_at_a_character_the_fragment_before_began() {
        use tokio::io::AsyncWriteExt;
        let (mut socket, mut client) = plain_socket(256).await;
        // "a" and the first byte of "€", not final; then a continuation
        // whose first byte goes on with that character but whose second
        // cannot end it, the rest unsent.
        let mut bytes = header(false, 0x1, 2);
        bytes.extend(masked(&[b'a', 0xe2], 0));
        bytes.extend(header(true, 0x0, 30));
        bytes.extend(masked(&[0x82], 0));
        client.write_all(&bytes).await.expect("write");
        assert!(
            recv_within(&mut socket, 1).await.is_none(),
            "valid so far: waits"
        );
        client.write_all(&masked(b"A", 1)).await.expect("write");
        assert_invalid(recv_within(&mut socket, 1).await);
    }

    #[tokio::test]
    async fn a_long_text_frame_is_checked_across_reads_and_pieces() {
        use tokio::io::AsyncWriteExt;
        // 999 bytes of three-byte characters: reads of 256 bytes in
        // writes of 143, then one read of 600 (checked in pieces of 256,
        // each ending inside a character) and the rest.
        let text = "€".repeat(333);
        let mut bytes = header(true, 0x1, text.len());
        bytes.extend(masked(text.as_bytes(), 0));
        for (read_buffer, write) in [(256, 143), (1024, 600)] {
            let (mut socket, client) = plain_socket(read_buffer).await;
            let writer = write_slowly(client, bytes.chunks(write).map(<[u8]>::to_vec).collect());
            assert_text(&mut socket, &text).await;
            let _client = writer.await.expect("writer");
        }

        // With a stray continuation byte at 600: the 600 bytes before it
        // wait for the rest, the byte fails the frame at once.
        let mut bad = text.into_bytes();
        bad[600] = 0x80;
        let mut bytes = header(true, 0x1, bad.len());
        bytes.extend(masked(&bad, 0));
        let (mut socket, client) = plain_socket(1024).await;
        let writer = write_slowly(client, vec![bytes[..4 + 4 + 600].to_vec()]);
        assert!(
            recv_within(&mut socket, 1).await.is_none(),
            "valid so far: waits"
        );
        let mut client = writer.await.expect("writer");
        client
            .write_all(&bytes[4 + 4 + 600..4 + 4 + 700])
            .await
            .expect("write");
        assert_invalid(recv_within(&mut socket, 1).await);
    }

    #[tokio::test]
    async fn text_arriving_a_byte_at_a_time_is_whole_when_its_characters_are() {
        // Two-, three- and four-byte characters split at every byte, and
        // "☀" split between the first fragment and its continuation.
        let whole = "Zü€☀ Göteborg 𝄞";
        let (first, second) = whole.as_bytes().split_at(7);
        let mut bytes = header(false, 0x1, first.len());
        bytes.extend(masked(first, 0));
        bytes.extend(header(true, 0x0, second.len()));
        bytes.extend(masked(second, 0));
        let (mut socket, client) = plain_socket(256).await;
        let writer = write_slowly(client, bytes.iter().map(|&b| vec![b]).collect());
        assert_text(&mut socket, whole).await;
        let _client = writer.await.expect("writer");
    }

    #[tokio::test]
    async fn the_rest_of_a_begun_frame_goes_before_what_was_queued_since() {
        use tokio::io::AsyncReadExt;
        let (mut socket, mut client) = plain_socket(1024).await;
        assert!(socket.lendable().is_some(), "plain, idle: lendable");
        // Queued by the socket's task while the stream was lent (a pong,
        // say), then the stream taken back with the end of a frame that
        // a lent write began.
        socket.queue_ping();
        assert!(socket.lendable().is_none(), "not with something queued");
        socket.queue_rest(Bytes::from_static(b"rest of a frame"));
        socket.flush().await.expect("flush");
        let mut got = [0; 17];
        client.read_exact(&mut got).await.expect("read");
        assert_eq!(&got[..15], b"rest of a frame", "the begun frame ends first");
        assert_eq!(got[15..], [0x89, 0x00], "then the ping");
    }
}
