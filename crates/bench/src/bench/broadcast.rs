//! The `broadcast` scenario: N connections subscribe to one topic, a
//! publisher sends M messages through gale's `POST /api/publish`, and every
//! subscriber times each delivery against the publish time carried in the
//! message (`sent_us`, microseconds since the Unix epoch: one clock, since
//! all processes run on this machine).
//!
//! Phases: subscribe everyone (in every worker process), publish, then
//! drain: each process stops when it has every message it expects or when
//! deliveries stall for `idle`. Messages a subscriber never got are
//! reported as `missed` (the server's slow-consumer policy drops pushes,
//! never replies).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::raw::Received;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{Report, Target, merge, process_cpu, progress, ramp};

/// Options of the `broadcast` scenario.
#[derive(Debug, Clone)]
pub struct BroadcastOptions {
    /// Subscribers (in this process).
    pub subscribers: usize,
    /// New connections per second while connecting.
    pub connect_rate: u32,
    /// The topic.
    pub topic: String,
    /// Messages to publish.
    pub messages: u64,
    /// Size of each pushed frame's text, in bytes (approximately: the
    /// padding is sized so that the frame is this long).
    pub size: usize,
    /// Messages published per second (0: back to back).
    pub rate: u32,
    /// gale's `[api] key`, for `POST /api/publish`.
    pub api_key: String,
    /// Stop draining when no delivery arrived for this long.
    pub idle: Duration,
    /// Number of this process's first connection (workers of one run
    /// take disjoint source addresses).
    pub first_connection: usize,
}

/// Live counters shared by a process's subscribers.
#[derive(Debug, Default)]
struct Live {
    subscribed: AtomicU64,
    deliveries: AtomicU64,
    /// Unix µs of the latest delivery.
    last_us: AtomicU64,
    /// Every subscriber's latencies, added as each one ends: one
    /// histogram per process, not one per subscriber (about 0.5 MB each,
    /// which 100,000 subscribers could not afford).
    latency: std::sync::Mutex<Option<hdrhistogram::Histogram<u64>>>,
}

/// Microseconds since the Unix epoch.
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Subscribers set up and receiving in this process.
#[derive(Debug)]
pub struct Subscribers {
    live: Arc<Live>,
    rx: tokio::sync::mpsc::UnboundedReceiver<Report>,
    started: usize,
    drain: CancellationToken,
    expected_each: u64,
    bar: Option<indicatif::ProgressBar>,
}

/// Opens the subscribers and waits until each has subscribed (or failed),
/// or `stop` fires.
pub async fn subscribe(
    target: Target,
    o: &BroadcastOptions,
    stop: &CancellationToken,
    show: bool,
) -> Subscribers {
    let live = Arc::new(Live::default());
    let drain = stop.child_token();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let bar = show.then(|| progress(o.subscribers as u64, "subscribing"));
    let target = Arc::new(target);
    let started = ramp(o.subscribers, o.connect_rate, stop, |i| {
        let (target, live, drain, tx, done) = (
            target.clone(),
            live.clone(),
            drain.clone(),
            tx.clone(),
            done_tx.clone(),
        );
        let (topic, expected) = (o.topic.clone(), o.messages);
        let i = o.first_connection + i;
        async move {
            let r = subscriber(&target, i, &topic, expected, &live, done, &drain).await;
            let _ = tx.send(r);
        }
    })
    .await;
    drop(done_tx);
    // Each subscriber says once that it is subscribed or has given up.
    let mut settled = 0;
    while settled < started {
        tokio::select! {
            d = done_rx.recv() => match d {
                Some(()) => settled += 1,
                None => break,
            },
            () = stop.cancelled() => break,
        }
        if let Some(bar) = &bar {
            bar.set_position(settled as u64);
        }
    }
    Subscribers {
        live,
        rx,
        started,
        drain,
        expected_each: o.messages,
        bar,
    }
}

impl Subscribers {
    /// Connections subscribed now.
    pub fn subscribed(&self) -> u64 {
        self.live.subscribed.load(Ordering::Relaxed)
    }

    /// Waits until every subscriber has every message, or deliveries stall
    /// for `idle`, or `stop` fires; then collects the report. `idle` only
    /// counts once the first delivery has arrived or `grace` has passed.
    pub async fn drain(mut self, idle: Duration, grace: Duration) -> Report {
        let expected = self.subscribed() * self.expected_each;
        if let Some(bar) = &self.bar {
            bar.set_length(expected);
            bar.set_position(0);
            bar.set_message("deliveries");
        }
        // CPU is counted over the delivery phase only, the one measured.
        let cpu0 = process_cpu();
        let began = Instant::now();
        let mut last = (0, Instant::now());
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.drain.cancelled() => break,
            }
            let got = self.live.deliveries.load(Ordering::Relaxed);
            if let Some(bar) = &self.bar {
                bar.set_position(got);
            }
            if got >= expected {
                break;
            }
            if got != last.0 {
                last = (got, Instant::now());
            } else if (got > 0 || began.elapsed() > grace) && last.1.elapsed() > idle {
                break;
            }
        }
        self.drain.cancel();
        let mut total = Report::new("broadcast");
        for _ in 0..self.started {
            match self.rx.recv().await {
                Some(r) => merge(&mut total, r),
                None => break,
            }
        }
        let shared = self
            .live
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = shared {
            let _ = total.latency.add(&h);
        }
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let missed = expected.saturating_sub(total.replies);
        total.extra.push(("expected", json!(expected)));
        total.extra.push(("missed", json!(missed)));
        total.extra.push((
            "last_delivery_us",
            json!(self.live.last_us.load(Ordering::Relaxed)),
        ));
        total.cpu = process_cpu().saturating_sub(cpu0);
        total
    }
}

/// A subscriber's latencies, added to the process's histogram when it
/// ends, however it ends.
struct Latencies<'a> {
    live: &'a Live,
    values: Vec<u64>,
}

impl Drop for Latencies<'_> {
    fn drop(&mut self) {
        if self.values.is_empty() {
            return;
        }
        let mut shared = self.live.latency.lock().unwrap_or_else(|p| p.into_inner());
        let h = shared.get_or_insert_with(super::new_histogram);
        for &l in &self.values {
            let _ = h.record(l);
        }
    }
}

/// One subscriber: connect, subscribe, count deliveries until it has
/// `expected` or `drain` fires. Its report holds no histogram of its own:
/// latencies go to the process's (see [`Latencies`]).
async fn subscriber(
    target: &Target,
    i: usize,
    topic: &str,
    expected: u64,
    live: &Live,
    done: tokio::sync::mpsc::UnboundedSender<()>,
    drain: &CancellationToken,
) -> Report {
    let mut latencies = Latencies {
        live,
        values: Vec::new(),
    };
    let mut r = Report::light("broadcast");
    let settle = |r: &mut Report, e: &str| {
        r.error(e);
        let _ = done.send(());
    };
    let mut ws = match target.connect_any(i).await {
        Ok(ws) => ws,
        Err(e) => {
            r.connect_failed = 1;
            settle(&mut r, &e);
            return r;
        }
    };
    r.connected = 1;
    let sub = json!({"event":"topic.subscribe","data":{"topic":topic},"ref":"sub"}).to_string();
    if ws.send_text(sub).await.is_err() {
        settle(&mut r, "send failed");
        return r;
    }
    // Until the subscription is confirmed, every text is parsed; after it,
    // deliveries are recognised by their `sent_us` without a full parse.
    let confirmed = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(m) = ws.next().await {
            if let Received::Text(t) = m {
                let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                if v["reply"] == "sub" {
                    return match v["ok"] == true {
                        true => Ok(()),
                        false => Err(super::refusal(&v)),
                    };
                }
            }
        }
        Err("subscribe: the connection closed".to_owned())
    })
    .await;
    match confirmed {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            settle(&mut r, &e);
            return r;
        }
        Err(_) => {
            settle(&mut r, "subscribe timed out");
            return r;
        }
    }
    live.subscribed.fetch_add(1, Ordering::Relaxed);
    let _ = done.send(());
    while r.replies < expected {
        let m = tokio::select! {
            m = ws.next() => m,
            () = drain.cancelled() => break,
        };
        match m {
            Ok(Received::Text(t)) => {
                let Some(sent) = sent_us(&t) else { continue };
                let now = now_us();
                r.replies += 1;
                latencies.values.push(now.saturating_sub(sent).max(1));
                live.deliveries.fetch_add(1, Ordering::Relaxed);
                live.last_us.fetch_max(now, Ordering::Relaxed);
            }
            Ok(Received::Closed(code, _)) => {
                r.error(format!("closed {code}"));
                return r;
            }
            Ok(Received::Other) => {}
            Err(e) => {
                r.error(e);
                return r;
            }
        }
    }
    ws.close().await;
    r
}

/// The `sent_us` number in a pushed message, found without parsing the
/// whole (padded) JSON.
fn sent_us(text: &str) -> Option<u64> {
    const KEY: &str = "\"sent_us\":";
    let at = text.find(KEY)? + KEY.len();
    let digits = text[at..]
        .find(|c: char| !c.is_ascii_digit())
        .map_or(&text[at..], |end| &text[at..at + end]);
    digits.parse().ok()
}

/// The data of message `seq`, padded so the pushed frame is about `size`
/// bytes.
fn message(seq: u64, size: usize) -> Value {
    let bare = json!({"seq": seq, "sent_us": now_us(), "padding": ""});
    let frame = gale_engine::protocol::push_json("bench", &bare).len();
    json!({
        "seq": seq,
        "sent_us": now_us(),
        "padding": padding(seq, size.saturating_sub(frame)),
    })
}

/// `len` bytes of words drawn pseudo-randomly (from `seed`) from a small
/// weather vocabulary: text that compresses about as well as real chatty
/// JSON does (a run of one letter would compress to nearly nothing and
/// flatter `--deflate`).
fn padding(seed: u64, len: usize) -> String {
    const WORDS: [&str; 24] = [
        "paris",
        "london",
        "tokyo",
        "temperature",
        "feels_like",
        "humidity",
        "wind",
        "north",
        "light",
        "rain",
        "cloudy",
        "sunny",
        "12.5",
        "81",
        "7.2",
        "1013",
        "gusts",
        "south",
        "overcast",
        "drizzle",
        "-3.4",
        "28.9",
        "visibility",
        "east",
    ];
    let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let mut out = String::with_capacity(len + 16);
    while out.len() < len {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        out.push_str(WORDS[(state >> 33) as usize % WORDS.len()]);
        out.push(' ');
    }
    out.truncate(len);
    out
}

/// What the publisher did.
#[derive(Debug)]
pub struct Published {
    /// Messages the server accepted.
    pub accepted: u64,
    /// Refusals and failures by kind.
    pub errors: Vec<(String, u64)>,
    /// Unix µs when publishing began.
    pub began_us: u64,
    /// Paced: publications sent more than [`LATE`] after their time (the
    /// publisher waits for each answer, so a slow answer delays the next).
    pub late: u64,
    /// Paced: the most any publication was behind its time.
    pub behind_max: Duration,
}

/// How far behind its time a paced publication may go out and not count
/// as late: a few of the timer's ticks (it wakes 1–2 ms late on a busy
/// machine).
pub const LATE: Duration = Duration::from_millis(5);

/// Publishes `o.messages` messages to `o.topic` through the target's
/// `POST /api/publish` (over HTTPS for a `wss://` target), at `o.rate`
/// per second (0: back to back), until done or `stop`.
///
/// # Errors
/// A message when the HTTP client cannot be built.
pub async fn publish(
    to: &super::Target,
    o: &BroadcastOptions,
    stop: &CancellationToken,
) -> Result<Published, String> {
    // reqwest is built without a default TLS provider; plain HTTP still
    // needs one installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut client = reqwest::Client::builder().timeout(Duration::from_secs(10));
    if let Some(tls) = to.tls_config() {
        client = client.tls_backend_preconfigured(tls.as_ref().clone());
    }
    let client = client.build().map_err(|e| format!("HTTP client: {e}"))?;
    let url = format!("{}/api/publish", to.http_base());
    let mut tick = (o.rate > 0).then(|| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(o.rate)));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    let mut errors = std::collections::BTreeMap::<String, u64>::new();
    let (mut accepted, mut late, mut behind_max) = (0, 0, Duration::ZERO);
    let began_us = now_us();
    for seq in 0..o.messages {
        if let Some(t) = &mut tick {
            let due = tokio::select! {
                due = t.tick() => due,
                () = stop.cancelled() => break,
            };
            let behind = due.elapsed();
            behind_max = behind_max.max(behind);
            if behind > LATE {
                late += 1;
            }
        } else if stop.is_cancelled() {
            break;
        }
        let body = json!({"event": "bench", "topic": o.topic, "data": message(seq, o.size)});
        let sent = client
            .post(&url)
            .bearer_auth(&o.api_key)
            .json(&body)
            .send()
            .await;
        match sent {
            Ok(resp) if resp.status().is_success() => accepted += 1,
            Ok(resp) => {
                *errors
                    .entry(format!("publish {}", resp.status()))
                    .or_default() += 1
            }
            Err(e) => *errors.entry(format!("publish: {e}")).or_default() += 1,
        }
    }
    Ok(Published {
        accepted,
        errors: errors.into_iter().collect(),
        began_us,
        late,
        behind_max,
    })
}

/// Adds the publisher's side to a merged report: deliveries/s over the
/// time from the first publish to the last delivery, and what the
/// publisher saw. `last_delivery_us` is the latest of every process's.
pub fn finish(total: &mut Report, published: &Published, subscribed: u64, last_delivery_us: u64) {
    let expected = subscribed * published.accepted;
    total
        .extra
        .retain(|(k, _)| !matches!(*k, "expected" | "missed" | "last_delivery_us"));
    total.extra.push(("subscribers", json!(subscribed)));
    total.extra.push(("published", json!(published.accepted)));
    if published.late > 0 || published.behind_max > Duration::ZERO {
        total.extra.push((
            "published late (> 5 ms behind the pace)",
            json!(published.late),
        ));
        total.extra.push((
            "most behind the pace, ms",
            json!((published.behind_max.as_secs_f64() * 1e4).round() / 10.0),
        ));
    }
    total.extra.push(("expected deliveries", json!(expected)));
    total.extra.push((
        "missed deliveries",
        json!(expected.saturating_sub(total.replies)),
    ));
    for (kind, n) in &published.errors {
        *total.errors.entry(kind.clone()).or_default() += n;
    }
    total.elapsed =
        Duration::from_micros(last_delivery_us.saturating_sub(published.began_us).max(1));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sent_us_is_found_in_a_push() {
        let data = message(7, 1024);
        let text = gale_engine::protocol::push_json("bench", &data);
        assert_eq!(sent_us(&text), data["sent_us"].as_u64());
        assert!((1000..=1040).contains(&text.len()), "{}", text.len());
        assert_eq!(sent_us("{\"event\":\"other\"}"), None);
    }

    #[test]
    fn padding_compresses_like_text_not_like_a_run_of_one_letter() {
        let text = gale_engine::protocol::push_json("bench", &message(7, 1024));
        let frame = gale_engine::websocket::deflate::compress_frame(
            gale_engine::websocket::frame::Opcode::Text,
            text.as_bytes(),
            15,
        );
        // Real chatty JSON deflates 2-5 times at level 1; a run of one
        // letter, 20 times or more.
        let ratio = text.len() as f64 / frame.len() as f64;
        assert!((1.5..6.0).contains(&ratio), "{ratio:.1}x");
        assert_ne!(message(7, 1024)["padding"], message(8, 1024)["padding"]);
    }
}
