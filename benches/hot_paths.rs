//! Micro-benchmarks of the per-message hot paths (`cargo bench`):
//! classifying a text message, encoding replies and pushes, and a weather
//! lookup answered from the cache. Targets and results live in
//! docs/benchmarks.md, never in tests.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use gale::config::{Provider, WeatherConfig};
use gale::fake_upstream::FakeUpstream;
use gale::metrics::Metrics;
use gale::protocol::{ServerMessage, classify, push_json, reply_json};
use gale::weather::{Reading, Weather};
use serde_json::json;

fn protocol(c: &mut Criterion) {
    let event = r#"{"event":"weather.get","data":{"city":"Paris"},"ref":"17"}"#;
    c.bench_function("classify plain city", |b| {
        b.iter(|| classify(black_box("London")))
    });
    c.bench_function("classify JSON event", |b| {
        b.iter(|| classify(black_box(event)))
    });

    let reading = Reading {
        city: "London".into(),
        temperature: 12.5,
        feels_like: 11.0,
        description: "light rain".into(),
        humidity: 81,
    };
    c.bench_function("encode weather reply", |b| {
        b.iter(|| ServerMessage::weather(black_box(&reading)).to_json())
    });
    let data = json!({"city":"London","temperature":12.5,"feels_like":11.0,"description":"light rain","humidity":81});
    let r = json!("17");
    c.bench_function("encode event reply", |b| {
        b.iter(|| reply_json(black_box(&r), &Ok(black_box(data.clone()))))
    });
    c.bench_function("encode push (once per broadcast)", |b| {
        b.iter(|| push_json(black_box("weather.update"), black_box(&data)))
    });
}

fn cache_hit(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let weather = rt.block_on(async {
        // The real provider against the fake upstream over HTTP, to warm
        // the cache; the measured lookups never leave it.
        let fake = FakeUpstream::start("127.0.0.1:0")
            .await
            .expect("fake upstream");
        let cfg = WeatherConfig {
            provider: Provider::OpenWeatherMap,
            base_url: Some(fake.url()),
            api_key: Some("bench".into()),
            ..WeatherConfig::default()
        };
        let weather =
            Arc::new(Weather::from_config(&cfg, Arc::new(Metrics::new())).expect("weather"));
        weather.lookup("London").await.expect("warm the cache");
        (weather, fake)
    });
    c.bench_function("weather lookup, cache hit", |b| {
        b.to_async(&rt)
            .iter(|| async { weather.0.lookup(black_box("  london ")).await.expect("hit") })
    });
}

criterion_group!(benches, protocol, cache_hit);
criterion_main!(benches);
