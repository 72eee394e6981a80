//! permessage-deflate (RFC 7692): the offer a client makes, the answer
//! the server gives, and the compression of one message.
//!
//! The server always answers with `server_no_context_takeover` and
//! `client_no_context_takeover` (§7.1.1: a server may require both).
//! Every message is then compressed on its own, so a connection keeps no
//! compression state between messages: one compressor and one
//! decompressor per worker thread serve every connection, an idle
//! compressed connection costs what an uncompressed one does, and a
//! broadcast is compressed once for all of its recipients.

use std::cell::RefCell;

use bytes::{BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::frame::{Opcode, header_len, put_header};

/// The extension's token.
pub const NAME: &str = "permessage-deflate";

/// The largest LZ77 window, which a client accepts unless it asks
/// otherwise: every connection using it can share one compressed frame.
pub const MAX_WINDOW_BITS: u8 = 15;

/// The zlib level: the fastest. Chatty JSON compresses about as well at
/// 1 as at 6 (measured: docs/benchmarks.md), for a fraction of the CPU.
const LEVEL: u32 = 1;

/// The empty stored block a sync flush ends with, which the sender
/// removes and the receiver appends back (§7.2.1, §7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xFF, 0xFF];

/// What was agreed for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// The LZ77 window the server compresses with (8 to 15 bits).
    pub server_window_bits: u8,
}

impl Agreed {
    /// The `Sec-WebSocket-Extensions` value of the server's answer.
    pub fn response(self) -> String {
        let mut r = format!("{NAME}; server_no_context_takeover; client_no_context_takeover");
        if self.server_window_bits < 15 {
            r.push_str(&format!(
                "; server_max_window_bits={}",
                self.server_window_bits
            ));
        }
        r
    }
}

/// Picks the first acceptable permessage-deflate offer among the
/// `Sec-WebSocket-Extensions` header values; `None` when there is none.
/// An offer with an unknown, repeated or malformed parameter is declined
/// (§7.1: the server must not accept it) and the next one is considered.
pub fn negotiate<'a>(headers: impl IntoIterator<Item = &'a str>) -> Option<Agreed> {
    headers
        .into_iter()
        .flat_map(|h| h.split(','))
        .find_map(accept_offer)
}

fn accept_offer(offer: &str) -> Option<Agreed> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(NAME) {
        return None;
    }
    let mut seen = Vec::new();
    let mut agreed = Agreed {
        server_window_bits: 15,
    };
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (param, None),
        };
        let name = name.to_ascii_lowercase();
        if seen.contains(&name) {
            return None;
        }
        match (name.as_str(), value) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => {}
            ("server_max_window_bits", Some(v)) => agreed.server_window_bits = window_bits(v)?,
            // The client's window is its own concern: it is told to take
            // no context over, and our decompressor reads any window.
            ("client_max_window_bits", None) => {}
            ("client_max_window_bits", Some(v)) => {
                window_bits(v)?;
            }
            _ => return None,
        }
        seen.push(name);
    }
    Some(agreed)
}

fn window_bits(v: &str) -> Option<u8> {
    // Digits only: "+9" and " 9" are not a value here.
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|b| (8..=15).contains(b))
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(u8, Compress)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// One whole compressed frame (RSV1 set) of `payload`, as `opcode`, with
/// a window of `window_bits`.
pub fn compress_frame(opcode: Opcode, payload: &[u8], window_bits: u8) -> Bytes {
    // zlib refuses a raw window of 8 bits and uses 9, as every zlib-based
    // implementation does.
    let bits = window_bits.max(9);
    COMPRESSOR.with_borrow_mut(|slot| {
        let c = match slot {
            Some((b, c)) if *b == bits => {
                c.reset();
                c
            }
            _ => {
                &mut slot
                    .insert((
                        bits,
                        Compress::new_with_window_bits(Compression::new(LEVEL), false, bits),
                    ))
                    .1
            }
        };
        let mut out = Vec::with_capacity(payload.len() / 2 + 64);
        let mut input = payload;
        loop {
            let before = c.total_in();
            if out.len() == out.capacity() {
                out.reserve(out.capacity().max(64));
            }
            // A sync flush never fails on a valid stream: an error here
            // would be a zlib bug, and the message goes out uncompressed.
            let Ok(_) = c.compress_vec(input, &mut out, FlushCompress::Sync) else {
                return super::frame::encode(opcode, false, payload);
            };
            input = &input[(c.total_in() - before) as usize..];
            // Done once all input is taken and zlib had room to spare.
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
        }
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        let mut frame = BytesMut::with_capacity(header_len(out.len()) + out.len());
        put_header(&mut frame, opcode, true, out.len());
        frame.put_slice(&out);
        frame.freeze()
    })
}

/// The message was larger than allowed once inflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// Past the limit.
    #[error("message too big once decompressed")]
    TooBig,
    /// Not deflate data.
    #[error("invalid compressed data")]
    Corrupt,
}

/// Inflates one message's payload, refusing output past `max` bytes (a
/// small message must not become a large one unchecked).
pub fn decompress(payload: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
    DECOMPRESSOR.with_borrow_mut(|slot| {
        let d = match slot {
            Some(d) => {
                d.reset(false);
                d
            }
            None => slot.insert(Decompress::new_with_window_bits(false, 15)),
        };
        let mut out = Vec::with_capacity((payload.len() * 3).clamp(64, max.max(64)));
        for input in [payload, &TAIL[..]] {
            let mut input = input;
            loop {
                if out.len() == out.capacity() {
                    // Room up to one byte past the limit: a message of
                    // exactly `max` bytes is accepted, one byte more is
                    // not (found by the deflate fuzz target).
                    let room = (max + 1).saturating_sub(out.len());
                    if room == 0 {
                        return Err(InflateError::TooBig);
                    }
                    out.reserve_exact(out.capacity().max(64).min(room));
                }
                let before = d.total_in();
                let status = d
                    .decompress_vec(input, &mut out, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Corrupt)?;
                input = &input[(d.total_in() - before) as usize..];
                if out.len() > max {
                    return Err(InflateError::TooBig);
                }
                match status {
                    Status::StreamEnd => break,
                    _ if input.is_empty() && out.len() < out.capacity() => break,
                    Status::BufError if !input.is_empty() && out.len() < out.capacity() => {
                        return Err(InflateError::Corrupt);
                    }
                    _ => {}
                }
            }
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::websocket::frame::parse_header;

    #[test]
    fn offers_are_accepted_or_declined_by_the_rfc() {
        let ok = |h: &str| negotiate([h]);
        let full = Some(Agreed {
            server_window_bits: 15,
        });
        assert_eq!(ok("permessage-deflate"), full);
        assert_eq!(ok("permessage-deflate; client_max_window_bits"), full);
        assert_eq!(ok("Permessage-Deflate; client_max_window_bits=10"), full);
        assert_eq!(
            ok("permessage-deflate; server_max_window_bits=10; client_no_context_takeover"),
            Some(Agreed {
                server_window_bits: 10
            })
        );
        assert_eq!(
            ok("permessage-deflate; server_max_window_bits=\"12\""),
            Some(Agreed {
                server_window_bits: 12
            })
        );
        for bad in [
            "x-webkit-deflate-frame",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=+9",
            "permessage-deflate; client_max_window_bits=20",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; unknown",
        ] {
            assert_eq!(ok(bad), None, "{bad}");
        }
        // The first acceptable offer wins, across values and headers.
        assert_eq!(
            negotiate([
                "permessage-deflate; bogus, permessage-deflate; server_max_window_bits=9",
                "permessage-deflate"
            ]),
            Some(Agreed {
                server_window_bits: 9
            })
        );
        assert_eq!(
            Agreed {
                server_window_bits: 9
            }
            .response(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=9"
        );
    }

    #[test]
    fn a_message_survives_compression_and_shrinks() {
        let text = r#"{"event":"weather","data":{"city":"Paris","temperature_c":12.5}}"#.repeat(40);
        for bits in [8, 9, 12, 15] {
            let frame = compress_frame(Opcode::Text, text.as_bytes(), bits);
            let h = parse_header(&frame, true).expect("valid").expect("whole");
            assert!(h.compressed && h.fin);
            let payload = &frame[h.header_len..];
            assert!(
                payload.len() < text.len() / 4,
                "{} of {}",
                payload.len(),
                text.len()
            );
            assert!(!payload.ends_with(&TAIL));
            let back = decompress(payload, 1 << 20).expect("inflates");
            assert_eq!(back, text.as_bytes(), "window {bits}");
        }
        // The empty message too (§7.2.3.6).
        let frame = compress_frame(Opcode::Text, b"", 15);
        let h = parse_header(&frame, true).expect("valid").expect("whole");
        assert_eq!(decompress(&frame[h.header_len..], 10), Ok(Vec::new()));
    }

    #[test]
    fn a_message_of_exactly_the_limit_inflates_and_one_byte_more_does_not() {
        // The deflate fuzz target's first finding: a message that inflated
        // to exactly the limit was refused as too big.
        for len in [1, 63, 64, 65, 66, 1000, 4096] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let frame = compress_frame(Opcode::Binary, &data, 15);
            let h = parse_header(&frame, true).expect("valid").expect("whole");
            let payload = &frame[h.header_len..];
            assert_eq!(
                decompress(payload, len).as_deref(),
                Ok(&data[..]),
                "{len} at {len}"
            );
            assert_eq!(
                decompress(payload, len - 1),
                Err(InflateError::TooBig),
                "{len} at {}",
                len - 1
            );
        }
    }

    #[test]
    fn inflating_past_the_limit_or_garbage_is_refused() {
        let zeros = vec![0_u8; 1 << 20];
        let frame = compress_frame(Opcode::Binary, &zeros, 15);
        let h = parse_header(&frame, true).expect("valid").expect("whole");
        assert!(
            frame.len() < zeros.len() / 50,
            "a bomb: {} bytes",
            frame.len()
        );
        assert_eq!(
            decompress(&frame[h.header_len..], 65_536),
            Err(InflateError::TooBig)
        );
        assert_eq!(
            decompress(&[0xFF, 0xFF, 0xFF, 0xFF, 0x12], 65_536),
            Err(InflateError::Corrupt)
        );
        // And the thread's decompressor still works afterwards.
        let ok = compress_frame(Opcode::Text, b"hello hello hello", 15);
        assert_eq!(
            decompress(&ok[2..], 100).as_deref(),
            Ok(&b"hello hello hello"[..])
        );
    }
}
