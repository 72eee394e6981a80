//! permessage-deflate: any bytes inflated under a limit (never past it,
//! never a panic), any text as an offer, and compression round trips.
#![no_main]

use gale::websocket::deflate::{compress_frame, decompress, negotiate};
use gale::websocket::frame::{Opcode, parse_header};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    if let Ok(out) = decompress(data, LIMIT) {
        assert!(out.len() <= LIMIT);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(agreed) = negotiate([text]) {
            assert!((8..=15).contains(&agreed.server_window_bits));
        }
    }
    let bits = 8 + data.first().map_or(7, |b| b % 8);
    let frame = compress_frame(Opcode::Binary, data, bits);
    let h = parse_header(&frame, true).expect("valid").expect("whole");
    assert!(h.compressed && h.fin);
    let back = decompress(&frame[h.header_len..], data.len().max(1)).expect("round trip");
    assert_eq!(back, data);
});
