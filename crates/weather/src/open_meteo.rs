//! Open-Meteo: a keyless provider. One lookup is two calls: geocoding
//! (`{geocoding}/v1/search?name=CITY&count=1`) then the forecast's current
//! conditions (`{base}/v1/forecast?latitude=…&longitude=…&current=…`).

use futures_util::future::BoxFuture;
use serde::Deserialize;

use super::provider::{Provider, Reading, WeatherError, map_status};
use gale_engine::http_client::Client;
use std::sync::Arc;

/// The Open-Meteo provider.
#[derive(Debug, Clone)]
pub struct OpenMeteo {
    http: Arc<Client>,
    search: url::Url,
    forecast: url::Url,
    max_body: usize,
}

impl OpenMeteo {
    /// A provider calling the given forecast and geocoding base URLs.
    ///
    /// # Errors
    /// When a URL does not parse (config validation catches this first).
    pub fn new(
        http: Arc<Client>,
        base_url: &str,
        geocoding_url: &str,
        max_body: usize,
    ) -> Result<Self, url::ParseError> {
        let join = |base: &str, path: &str| {
            url::Url::parse(&format!("{}{path}", base.trim_end_matches('/')))
        };
        Ok(OpenMeteo {
            http,
            search: join(geocoding_url, "/v1/search")?,
            forecast: join(base_url, "/v1/forecast")?,
            max_body,
        })
    }

    async fn get(&self, url: url::Url) -> Result<Vec<u8>, WeatherError> {
        let resp = self.http.get(url, self.max_body).await?;
        if !(200..300).contains(&resp.status) {
            // Open-Meteo answers 400 for coordinates it cannot serve; a
            // 404 from either endpoint is still "not found".
            return Err(map_status(resp.status));
        }
        Ok(resp.body)
    }

    async fn fetch(&self, city: &str) -> Result<Reading, WeatherError> {
        let mut url = self.search.clone();
        url.query_pairs_mut()
            .append_pair("name", city)
            .append_pair("count", "1")
            .append_pair("language", "en")
            .append_pair("format", "json");
        let place = parse_search(&self.get(url).await?)?;

        let mut url = self.forecast.clone();
        url.query_pairs_mut()
            .append_pair("latitude", &place.latitude.to_string())
            .append_pair("longitude", &place.longitude.to_string())
            .append_pair(
                "current",
                "temperature_2m,relative_humidity_2m,apparent_temperature,weather_code",
            );
        let current = parse_forecast(&self.get(url).await?)?;
        Ok(Reading {
            city: place.name,
            temperature: current.temperature_2m,
            feels_like: current.apparent_temperature,
            description: describe(current.weather_code).to_owned(),
            humidity: current.relative_humidity_2m.clamp(0.0, 100.0).round() as u32,
        })
    }
}

impl Provider for OpenMeteo {
    fn current<'a>(&'a self, city: &'a str) -> BoxFuture<'a, Result<Reading, WeatherError>> {
        Box::pin(self.fetch(city))
    }
}

#[derive(Deserialize)]
struct Search {
    #[serde(default)]
    results: Vec<Place>,
}

#[derive(Deserialize)]
struct Place {
    name: String,
    latitude: f64,
    longitude: f64,
}

#[derive(Deserialize)]
struct Forecast {
    current: Current,
}

#[derive(Deserialize)]
struct Current {
    temperature_2m: f64,
    relative_humidity_2m: f64,
    apparent_temperature: f64,
    weather_code: u16,
}

fn parse_search(body: &[u8]) -> Result<Place, WeatherError> {
    let s: Search = serde_json::from_slice(body)
        .map_err(|e| WeatherError::InvalidResponse(format!("unexpected geocoding JSON: {e}")))?;
    s.results.into_iter().next().ok_or(WeatherError::NotFound)
}

fn parse_forecast(body: &[u8]) -> Result<Current, WeatherError> {
    let f: Forecast = serde_json::from_slice(body)
        .map_err(|e| WeatherError::InvalidResponse(format!("unexpected forecast JSON: {e}")))?;
    Ok(f.current)
}

/// WMO weather interpretation codes, as Open-Meteo documents them.
pub fn describe(code: u16) -> &'static str {
    match code {
        0 => "clear sky",
        1 => "mainly clear",
        2 => "partly cloudy",
        3 => "overcast",
        45 => "fog",
        48 => "depositing rime fog",
        51 => "light drizzle",
        53 => "moderate drizzle",
        55 => "dense drizzle",
        56 => "light freezing drizzle",
        57 => "dense freezing drizzle",
        61 => "slight rain",
        63 => "moderate rain",
        65 => "heavy rain",
        66 => "light freezing rain",
        67 => "heavy freezing rain",
        71 => "slight snow fall",
        73 => "moderate snow fall",
        75 => "heavy snow fall",
        77 => "snow grains",
        80 => "slight rain showers",
        81 => "moderate rain showers",
        82 => "violent rain showers",
        85 => "slight snow showers",
        86 => "heavy snow showers",
        95 => "thunderstorm",
        96 => "thunderstorm with slight hail",
        99 => "thunderstorm with heavy hail",
        _ => "unknown conditions",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_results_is_not_found() {
        assert!(matches!(
            parse_search(br#"{"generationtime_ms":0.5}"#),
            Err(WeatherError::NotFound)
        ));
    }

    #[test]
    fn parses_search_and_forecast() {
        let p =
            parse_search(br#"{"results":[{"name":"Paris","latitude":48.85,"longitude":2.35}]}"#)
                .expect("place");
        assert_eq!(p.name, "Paris");
        let c = parse_forecast(
            br#"{"current":{"time":"2026-11-23T10:00","temperature_2m":8.5,
                "relative_humidity_2m":77,"apparent_temperature":6.1,"weather_code":61}}"#,
        )
        .expect("current");
        assert_eq!(describe(c.weather_code), "slight rain");
        assert!(matches!(
            parse_forecast(b"{}"),
            Err(WeatherError::InvalidResponse(_))
        ));
    }
}
