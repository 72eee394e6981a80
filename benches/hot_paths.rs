//! Micro-benchmarks of the per-message hot paths (`cargo bench`):
//! classifying a text message, encoding replies and pushes, and a weather
//! lookup answered from the cache, and the WebSocket frame path: a push
//! framed once, handed to each recipient, compressed once, and a client
//! frame parsed and unmasked. Targets and results live in
//! docs/benchmarks.md, never in tests.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use gale::config::{Provider, WeatherConfig};
use gale::fake_upstream::FakeUpstream;
use gale::protocol::{classify, push_json, reply_json};
use gale::weather::metrics::WeatherMetrics;
use gale::weather::{Reading, Weather};
use gale::websocket::{Prepared, deflate, frame};
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
        b.iter(|| gale::weather::reading_reply(black_box(&reading)))
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
        let weather = Arc::new(
            Weather::from_config(&cfg, Arc::new(WeatherMetrics::default())).expect("weather"),
        );
        weather.lookup("London").await.expect("warm the cache");
        (weather, fake)
    });
    c.bench_function("weather lookup, cache hit", |b| {
        b.to_async(&rt)
            .iter(|| async { weather.0.lookup(black_box("  london ")).await.expect("hit") })
    });
}

/// About 1 KB of push JSON, as `gale bench broadcast` sends.
fn push_1k() -> String {
    let item = json!({"city":"London","temperature":12.5,"feels_like":11.0,"description":"light rain","humidity":81});
    let items: Vec<_> = std::iter::repeat_n(item, 9).collect();
    push_json("weather.update", &json!(items))
}

fn frames(c: &mut Criterion) {
    let text = push_1k();
    c.bench_function("frame a 1 KB push (once per broadcast)", |b| {
        b.iter(|| Prepared::new(black_box(&text)))
    });
    // Per recipient, the frame is shared: what each connection's queue
    // takes. Before gale's own socket, each recipient copied the message
    // into its write buffer behind a header, as the second line does.
    let prepared = Prepared::new(&text);
    let shared = frame::encode(frame::Opcode::Text, false, text.as_bytes());
    c.bench_function("per recipient: share the framed push", |b| {
        b.iter(|| black_box(&shared).clone())
    });
    c.bench_function("per recipient: copy into a write buffer (before)", |b| {
        let mut buf = Vec::with_capacity(4096);
        b.iter(|| {
            buf.clear();
            frame::put_header(&mut buf, frame::Opcode::Text, false, text.len());
            buf.extend_from_slice(black_box(prepared.as_str()).as_bytes());
            black_box(buf.len())
        })
    });
    c.bench_function("compress a 1 KB push (once per broadcast)", |b| {
        b.iter(|| deflate::compress_frame(frame::Opcode::Text, black_box(text.as_bytes()), 15))
    });
    let packed = deflate::compress_frame(frame::Opcode::Text, text.as_bytes(), 15);
    let payload = &packed[frame::header_len(packed.len() - 2)..];
    c.bench_function("inflate a 1 KB message", |b| {
        b.iter(|| deflate::decompress(black_box(payload), 1 << 20).expect("inflates"))
    });
    let mut client = vec![0x81, 0xFE];
    client.extend_from_slice(&(text.len() as u16).to_be_bytes());
    client.extend_from_slice(&[1, 2, 3, 4]);
    client.extend_from_slice(text.as_bytes());
    c.bench_function("parse and unmask a 1 KB client frame", |b| {
        let mut body = client.clone();
        b.iter(|| {
            let h = frame::parse_header(black_box(&client), false)
                .expect("valid")
                .expect("whole");
            body.copy_from_slice(&client);
            frame::apply_mask(&mut body[h.header_len..], h.mask.unwrap_or_default(), 0);
            black_box(body[h.header_len])
        })
    });
}

criterion_group!(benches, protocol, cache_hit, frames);
criterion_main!(benches);
