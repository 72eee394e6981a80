//! OpenWeatherMap's current-weather API, as the seed calls it:
//! `GET {base}/data/2.5/weather?q=CITY&appid=KEY&units=metric`.

use futures_util::future::BoxFuture;
use serde::Deserialize;

use super::provider::{Provider, Reading, WeatherError, map_status};
use gale_engine::http_client::Client;
use std::sync::Arc;

/// The OpenWeatherMap provider.
#[derive(Debug, Clone)]
pub struct OpenWeatherMap {
    http: Arc<Client>,
    endpoint: url::Url,
    api_key: String,
    max_body: usize,
}

impl OpenWeatherMap {
    /// A provider calling `base_url` with `api_key`.
    ///
    /// # Errors
    /// When `base_url` is not a URL (config validation catches this first).
    pub fn new(
        http: Arc<Client>,
        base_url: &str,
        api_key: String,
        max_body: usize,
    ) -> Result<Self, url::ParseError> {
        let endpoint = url::Url::parse(&format!(
            "{}/data/2.5/weather",
            base_url.trim_end_matches('/')
        ))?;
        Ok(OpenWeatherMap {
            http,
            endpoint,
            api_key,
            max_body,
        })
    }

    async fn fetch(&self, city: &str) -> Result<Reading, WeatherError> {
        let mut url = self.endpoint.clone();
        // query_pairs_mut percent-encodes each value, so a city such as
        // "London&appid=x" stays one literal `q` and adds no parameter.
        url.query_pairs_mut()
            .append_pair("q", city)
            .append_pair("appid", &self.api_key)
            .append_pair("units", "metric");
        let resp = self.http.get(url, self.max_body).await?;
        if !(200..300).contains(&resp.status) {
            return Err(map_status(resp.status));
        }
        parse(&resp.body)
    }
}

impl Provider for OpenWeatherMap {
    fn current<'a>(&'a self, city: &'a str) -> BoxFuture<'a, Result<Reading, WeatherError>> {
        Box::pin(self.fetch(city))
    }
}

#[derive(Deserialize)]
struct Body {
    name: String,
    main: Main,
    weather: Vec<Condition>,
}

#[derive(Deserialize)]
struct Main {
    temp: f64,
    feels_like: f64,
    humidity: f64,
}

#[derive(Deserialize)]
struct Condition {
    description: String,
}

/// Parses a 200 body into a reading.
pub(crate) fn parse(body: &[u8]) -> Result<Reading, WeatherError> {
    let b: Body = serde_json::from_slice(body)
        .map_err(|e| WeatherError::InvalidResponse(format!("unexpected JSON: {e}")))?;
    let description = b
        .weather
        .into_iter()
        .next()
        .map(|c| c.description)
        .unwrap_or_default();
    Ok(Reading {
        city: b.name,
        temperature: b.main.temp,
        feels_like: b.main.feels_like,
        description,
        humidity: b.main.humidity.clamp(0.0, 100.0).round() as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_body() {
        let body =
            br#"{"name":"London","cod":200,"main":{"temp":12.5,"feels_like":11.0,"humidity":81},
            "weather":[{"id":500,"main":"Rain","description":"light rain"}]}"#;
        let r = parse(body).expect("parses");
        assert_eq!(r.city, "London");
        assert_eq!(r.temperature, 12.5);
        assert_eq!(r.humidity, 81);
        assert_eq!(r.description, "light rain");
    }

    #[test]
    fn garbage_is_an_invalid_response() {
        assert!(matches!(
            parse(b"<html>"),
            Err(WeatherError::InvalidResponse(_))
        ));
        assert!(matches!(
            parse(br#"{"name":"x"}"#),
            Err(WeatherError::InvalidResponse(_))
        ));
    }
}
