//! City names as clients send them: checked, echoed in errors, and
//! folded to the one canonical form the cache and the provider use.

/// Longest city name accepted, in characters.
pub const MAX_CITY_CHARS: usize = 100;

/// Why a city name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidCity {
    /// Nothing but white space.
    #[error("invalid city: the name is empty; send a city name such as \"London\"")]
    Empty,
    /// Longer than [`MAX_CITY_CHARS`].
    #[error("invalid city: the name is too long (at most 100 characters)")]
    TooLong,
    /// Contains control characters (newlines, NUL, …).
    #[error("invalid city: the name contains control characters")]
    ControlCharacters,
}

/// Checks a city name as the client sent it and returns it trimmed.
///
/// # Errors
/// [`InvalidCity`] when the name is empty, too long or has control
/// characters.
pub fn parse_city(text: &str) -> Result<&str, InvalidCity> {
    let city = text.trim();
    if city.is_empty() {
        return Err(InvalidCity::Empty);
    }
    if city.chars().nth(MAX_CITY_CHARS).is_some() {
        return Err(InvalidCity::TooLong);
    }
    if city.chars().any(char::is_control) {
        return Err(InvalidCity::ControlCharacters);
    }
    Ok(city)
}

/// Longest city echoed in an error reply, in characters.
pub const MAX_ECHOED_CITY_CHARS: usize = 200;

/// The city an error reply echoes: what the client sent, trimmed and cut
/// to [`MAX_ECHOED_CITY_CHARS`] (JSON escaping keeps it safe on the wire).
pub fn echoed_city(text: &str) -> &str {
    let city = text.trim();
    match city.char_indices().nth(MAX_ECHOED_CITY_CHARS) {
        Some((cut, _)) => &city[..cut],
        None => city,
    }
}

/// A city's canonical form: the text gale both caches under and asks the
/// provider for, so no spelling can fill the cache entry of another.
/// Compatibility characters are folded (NFKC: `K` U+212A KELVIN SIGN is
/// `K`, full-width `Ｋ` is `K`), case does not matter (lower case), nor does
/// white space (trimmed, runs of it one space): "New  York", "new york"
/// and "ＮＥＷ ＹＯＲＫ" are one city, asked as "new york". Providers match
/// names without regard to case.
pub fn normalise_city(city: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    let folded: String;
    let text = if city.is_ascii() {
        city
    } else {
        // Lower-casing can undo NFKC (rarely), hence once more after it.
        folded = city.nfkc().flat_map(char::to_lowercase).nfkc().collect();
        &folded
    };
    let mut key = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !key.is_empty() {
            key.push(' ');
        }
        key.extend(word.chars().flat_map(char::to_lowercase));
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn city_validation() {
        assert_eq!(parse_city("  London "), Ok("London"));
        assert_eq!(parse_city(" \t "), Err(InvalidCity::Empty));
        assert_eq!(parse_city(&"a".repeat(100)), Ok("a".repeat(100).as_str()));
        assert_eq!(parse_city(&"a".repeat(101)), Err(InvalidCity::TooLong));
        assert_eq!(parse_city("São Paulo"), Ok("São Paulo"));
        assert_eq!(
            parse_city("Lon\u{0}don"),
            Err(InvalidCity::ControlCharacters)
        );
        assert_eq!(parse_city("Lon\ndon"), Err(InvalidCity::ControlCharacters));
    }

    #[test]
    fn normalisation_ignores_case_and_spacing() {
        assert_eq!(normalise_city("New   York"), "new york");
        assert_eq!(normalise_city("ZÜRICH"), "zürich");
        // Decomposed Ü (U + combining diaeresis) is the same city.
        assert_eq!(normalise_city("ZU\u{308}RICH"), "zürich");
    }

    #[test]
    fn look_alike_spellings_are_one_canonical_form() {
        for spelling in [
            "\u{212A}yiv",
            "\u{FF2B}\u{FF59}\u{FF49}\u{FF56}",
            "KYIV",
            " kyiv\u{3000}",
        ] {
            assert_eq!(normalise_city(spelling), "kyiv", "{spelling:?}");
        }
        // Idempotent: the canonical form is its own key.
        for city in ["Straße", "İstanbul", "ΣΊΣΥΦΟΣ", "\u{FDFA}", "ǅemal"] {
            let once = normalise_city(city);
            assert_eq!(normalise_city(&once), once, "{city:?}");
        }
    }
}
