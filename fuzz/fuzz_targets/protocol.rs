//! The wire protocol's text paths: classifying a message (plain city or
//! JSON event, with its size and depth checks) and city parsing.
#![no_main]

use gale::protocol::{Incoming, classify};
use gale::weather::city::{echoed_city, normalise_city, parse_city};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Anything that is not an event is a city to be validated next.
    if let Incoming::Text(city) = classify(text) {
        assert_eq!(city, text);
    }
    if let Ok(city) = parse_city(text) {
        let normal = normalise_city(city);
        assert_eq!(normalise_city(&normal), normal, "normalising is idempotent");
    }
    let _ = echoed_city(text);
});
