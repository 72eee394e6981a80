//! The RFC 6455 frame codec: any bytes as a frame header, masking, and a
//! close frame's payload.
#![no_main]

use gale::websocket::frame::{apply_mask, parse_close, parse_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for compression in [false, true] {
        if let Ok(Some(h)) = parse_header(data, compression) {
            assert!((2..=14).contains(&h.header_len) && h.header_len <= data.len());
            assert!(!h.compressed || compression);
            if h.opcode.is_control() {
                assert!(h.fin && h.len <= 125);
            }
            let end = data.len().min(h.header_len + h.len.min(1 << 20) as usize);
            let mut payload = data[h.header_len..end].to_vec();
            let key = h.mask.unwrap_or([1, 2, 3, 4]);
            let offset = data.len() % 7;
            apply_mask(&mut payload, key, offset);
            apply_mask(&mut payload, key, offset);
            assert_eq!(
                payload,
                &data[h.header_len..end],
                "masking twice is nothing"
            );
        }
    }
    if let Ok(Some(code)) = parse_close(data) {
        assert!(data.len() >= 2 && u16::from_be_bytes([data[0], data[1]]) == code);
    }
});
