//! Config parsing: any text as gale.toml, with an override variable made
//! from the input's first line. Errors are fine; panics and configs that
//! load but do not validate are not.
#![no_main]

use gale::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (first, rest) = text.split_once('\n').unwrap_or((text, ""));
    let env: Vec<(String, String)> = first
        .split_once('=')
        .map(|(k, v)| vec![(format!("GALE_{k}"), v.to_owned())])
        .unwrap_or_default();
    if let Ok(config) = Config::from_text(rest, "fuzz.toml", env) {
        config.validate().expect("a loaded config is valid");
    }
});
