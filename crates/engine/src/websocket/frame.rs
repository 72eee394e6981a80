//! The RFC 6455 frame codec: headers parsed and encoded, payloads
//! unmasked, close frames checked. Pure functions over bytes: no socket,
//! no state.

use bytes::{BufMut, Bytes, BytesMut};

/// Frame opcodes (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// The next fragment of a message.
    Continuation,
    /// A text message (UTF-8).
    Text,
    /// A binary message.
    Binary,
    /// Close.
    Close,
    /// Ping.
    Ping,
    /// Pong.
    Pong,
}

impl Opcode {
    fn from_bits(bits: u8) -> Option<Opcode> {
        Some(match bits {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xA,
        }
    }

    /// Close, ping and pong.
    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The last frame of its message.
    pub fin: bool,
    /// RSV1: the message is compressed (permessage-deflate).
    pub compressed: bool,
    /// What the frame carries.
    pub opcode: Opcode,
    /// The masking key (every client frame has one).
    pub mask: Option<[u8; 4]>,
    /// Payload bytes after the header.
    pub len: u64,
    /// Bytes the header itself took.
    pub header_len: usize,
}

/// Why a frame cannot be accepted. Each maps to a close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// RSV bits set that no extension allows.
    #[error("reserved bits set")]
    ReservedBits,
    /// An opcode RFC 6455 reserves.
    #[error("unknown opcode")]
    UnknownOpcode,
    /// A control frame without FIN.
    #[error("fragmented control frame")]
    FragmentedControl,
    /// A control frame over 125 bytes.
    #[error("control frame longer than 125 bytes")]
    ControlTooLong,
    /// A client frame without a mask.
    #[error("client frame not masked")]
    Unmasked,
    /// A length in a longer form than needed, or past 2^63.
    #[error("payload length not minimally encoded")]
    LengthEncoding,
}

/// Parses the header at the start of `buf`; `Ok(None)` when more bytes
/// are needed. `compression` says whether RSV1 may be set.
pub fn parse_header(buf: &[u8], compression: bool) -> Result<Option<Header>, FrameError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    let fin = b0 & 0x80 != 0;
    let compressed = b0 & 0x40 != 0;
    if b0 & 0x30 != 0 || (compressed && !compression) {
        return Err(FrameError::ReservedBits);
    }
    let opcode = Opcode::from_bits(b0 & 0x0F).ok_or(FrameError::UnknownOpcode)?;
    if opcode.is_control() {
        if !fin {
            return Err(FrameError::FragmentedControl);
        }
        if compressed {
            return Err(FrameError::ReservedBits);
        }
    }
    if compressed && opcode == Opcode::Continuation {
        // RSV1 marks the first frame of a compressed message only.
        return Err(FrameError::ReservedBits);
    }
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7F {
        126 => {
            let Some(b) = buf.get(2..4) else {
                return Ok(None);
            };
            let len = u64::from(u16::from_be_bytes([b[0], b[1]]));
            if len < 126 {
                return Err(FrameError::LengthEncoding);
            }
            (len, 4)
        }
        127 => {
            let Some(b) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut be = [0; 8];
            be.copy_from_slice(b);
            let len = u64::from_be_bytes(be);
            if len <= u64::from(u16::MAX) || len >> 63 != 0 {
                return Err(FrameError::LengthEncoding);
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    if opcode.is_control() && len > 125 {
        return Err(FrameError::ControlTooLong);
    }
    let mask = if masked {
        let Some(b) = buf.get(at..at + 4) else {
            return Ok(None);
        };
        at += 4;
        Some([b[0], b[1], b[2], b[3]])
    } else {
        None
    };
    Ok(Some(Header {
        fin,
        compressed,
        opcode,
        mask,
        len,
        header_len: at,
    }))
}

/// Unmasks (or masks) `data` in place with `key`, as if `data` started
/// `offset` bytes into the payload.
pub fn apply_mask(data: &mut [u8], key: [u8; 4], offset: usize) {
    let mut key = key;
    key.rotate_left(offset % 4);
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// Writes an unmasked server frame's header for a payload of `len`.
pub fn put_header(out: &mut impl BufMut, opcode: Opcode, compressed: bool, len: usize) {
    let rsv1 = if compressed { 0x40 } else { 0 };
    out.put_u8(0x80 | rsv1 | opcode.bits());
    match len {
        0..=125 => out.put_u8(len as u8),
        126..=0xFFFF => {
            out.put_u8(126);
            out.put_u16(len as u16);
        }
        _ => {
            out.put_u8(127);
            out.put_u64(len as u64);
        }
    }
}

/// The length of the header [`put_header`] writes for `len`.
pub fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

/// One whole unmasked frame: header and payload in one buffer.
pub fn encode(opcode: Opcode, compressed: bool, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(header_len(payload.len()) + payload.len());
    put_header(&mut out, opcode, compressed, payload.len());
    out.put_slice(payload);
    out.freeze()
}

/// A close frame's payload: the code and a reason (≤ 123 bytes).
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut p = Vec::with_capacity(2 + end);
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(&reason.as_bytes()[..end]);
    p
}

/// Checks a received close frame's payload; `Ok(None)` when it carries
/// no code. RFC 6455 §7.4: codes a peer may send, and a UTF-8 reason.
pub fn parse_close(payload: &[u8]) -> Result<Option<u16>, CloseError> {
    match payload {
        [] => Ok(None),
        [_] => Err(CloseError::Truncated),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close_code_allowed(code) {
                return Err(CloseError::Code(code));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(CloseError::Reason);
            }
            Ok(Some(code))
        }
    }
}

/// Why a received close frame is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CloseError {
    /// A one-byte payload.
    #[error("close frame with a one-byte payload")]
    Truncated,
    /// A code no peer may send.
    #[error("close code {0} may not be sent")]
    Code(u16),
    /// A reason that is not UTF-8.
    #[error("close reason is not UTF-8")]
    Reason,
}

/// Close codes a peer may put on the wire: the defined ones (1004-1006
/// and 1015 are reserved for local use) and those for libraries and
/// applications.
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_at_each_length_encoding() {
        for len in [0, 1, 125, 126, 65_535, 65_536, 1 << 20] {
            let mut out = BytesMut::new();
            put_header(&mut out, Opcode::Text, len == 126, len);
            assert_eq!(out.len(), header_len(len));
            let h = parse_header(&out, true).expect("valid").expect("whole");
            assert_eq!(h.len, len as u64);
            assert_eq!(h.header_len, out.len());
            assert_eq!(
                (h.fin, h.compressed, h.opcode),
                (true, len == 126, Opcode::Text)
            );
            assert_eq!(h.mask, None);
            // Any prefix is "need more", never an error.
            for cut in 0..out.len() {
                assert_eq!(
                    parse_header(&out[..cut], true),
                    Ok(None),
                    "{len} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn masked_client_header_is_parsed() {
        let frame = [
            0x81,
            0x85,
            1,
            2,
            3,
            4,
            b'h' ^ 1,
            b'e' ^ 2,
            b'l' ^ 3,
            b'l' ^ 4,
            b'o' ^ 1,
        ];
        let h = parse_header(&frame, false).expect("valid").expect("whole");
        assert_eq!(h.mask, Some([1, 2, 3, 4]));
        assert_eq!((h.len, h.header_len), (5, 6));
        let mut payload = frame[6..].to_vec();
        apply_mask(&mut payload, [1, 2, 3, 4], 0);
        assert_eq!(payload, b"hello");
    }

    #[test]
    fn masking_from_any_offset_matches_bytewise() {
        let key = [0x12, 0x34, 0x56, 0x78];
        let data: Vec<u8> = (0..100).collect();
        for offset in 0..8 {
            let mut fast = data.clone();
            apply_mask(&mut fast, key, offset);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[(i + offset) % 4])
                .collect();
            assert_eq!(fast, slow, "offset {offset}");
        }
    }

    #[test]
    fn bad_headers_are_refused() {
        assert_eq!(
            parse_header(&[0xC1, 0x80], false),
            Err(FrameError::ReservedBits)
        );
        assert_eq!(
            parse_header(&[0xA1, 0x80], true),
            Err(FrameError::ReservedBits)
        );
        assert_eq!(
            parse_header(&[0x83, 0x80], false),
            Err(FrameError::UnknownOpcode)
        );
        assert_eq!(
            parse_header(&[0x09, 0x80], false),
            Err(FrameError::FragmentedControl)
        );
        assert_eq!(
            parse_header(&[0x89, 0xFE, 0, 126], false),
            Err(FrameError::ControlTooLong)
        );
        assert_eq!(
            parse_header(&[0xC9, 0x80], true),
            Err(FrameError::ReservedBits)
        );
        assert_eq!(
            parse_header(&[0x40, 0x80], true),
            Err(FrameError::ReservedBits)
        );
        assert_eq!(
            parse_header(&[0x81, 0xFE, 0, 5], false),
            Err(FrameError::LengthEncoding)
        );
        let huge = [0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(parse_header(&huge, false), Err(FrameError::LengthEncoding));
    }

    #[test]
    fn close_payloads_are_checked() {
        assert_eq!(parse_close(&[]), Ok(None));
        assert_eq!(parse_close(&[3]), Err(CloseError::Truncated));
        assert_eq!(parse_close(&close_payload(1000, "bye")), Ok(Some(1000)));
        assert_eq!(parse_close(&close_payload(4999, "")), Ok(Some(4999)));
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert_eq!(
                parse_close(&close_payload(bad, "")),
                Err(CloseError::Code(bad))
            );
        }
        assert_eq!(parse_close(&[3, 232, 0xFF]), Err(CloseError::Reason));
        // A long reason is cut at a character boundary within 123 bytes.
        let long = "é".repeat(100);
        let p = close_payload(1000, &long);
        assert!(p.len() <= 125);
        assert_eq!(parse_close(&p), Ok(Some(1000)));
    }
}
