//! Weather replies over a real WebSocket, against the fake upstream.

mod common;

use std::time::{Duration, Instant};

use common::{API_KEY, start, start_with};
use gale::config::Provider;
use gale::fake_upstream::Mode;

#[tokio::test]
async fn a_city_gets_the_seed_shaped_reading() {
    let server = start().await;
    let mut c = server.client().await;
    uuid::Uuid::parse_str(&c.client_id).expect("client_id is a uuid");

    let reply = c.ask("  London ").await;
    assert_eq!(reply["type"], "weather", "{reply}");
    assert_eq!(reply["city"], "London", "city as the provider names it");
    for field in ["temperature", "feels_like", "humidity"] {
        assert!(reply[field].is_number(), "{field} in {reply}");
    }
    assert!(reply["description"].is_string(), "{reply}");
    assert_eq!(server.fake.calls(), 1);
    assert_eq!(server.metric("successful").await, 1);
}

#[tokio::test]
async fn unknown_city_says_not_found_and_names_the_city() {
    let server = start().await;
    let mut c = server.client().await;
    let reply = c.ask("Atlantis").await;
    assert_eq!(reply["type"], "error");
    assert_eq!(reply["code"], "not_found");
    assert_eq!(reply["city"], "Atlantis");
    assert!(
        reply["message"]
            .as_str()
            .expect("message")
            .contains("not found")
    );

    // Not-found answers are cached briefly too.
    let again = c.ask("atlantis").await;
    assert_eq!(again["code"], "not_found");
    assert_eq!(server.fake.calls(), 1, "second not-found served from cache");
}

#[tokio::test]
async fn slow_upstream_gives_a_timeout_error() {
    let server = start_with(|c| c.weather.timeout_ms = 300).await;
    server.fake.set_latency(Duration::from_secs(3));
    let mut c = server.client().await;
    let started = Instant::now();
    let reply = c.ask("Lima").await;
    assert!(started.elapsed() < Duration::from_secs(2), "deadline kept");
    assert_eq!(reply["code"], "timeout", "{reply}");
    assert_eq!(reply["city"], "Lima");
    assert!(
        reply["message"]
            .as_str()
            .expect("message")
            .contains("timeout")
    );
}

#[tokio::test]
async fn upstream_failures_are_reported_as_such() {
    let server = start_with(|c| c.weather.breaker_failures = 100).await;
    let mut c = server.client().await;
    let cases = [
        (Mode::Status(500), "Oslo", "status 500"),
        (Mode::Status(503), "Bergen", "status 503"),
        (Mode::Status(429), "Tromso", "429"),
        (Mode::Status(401), "Narvik", "API key"),
        (Mode::Garbage, "Bodo", "invalid upstream response"),
    ];
    for (mode, city, words) in cases {
        server.fake.set_mode(mode);
        let reply = c.ask(city).await;
        assert_eq!(reply["type"], "error", "{mode:?}: {reply}");
        assert_eq!(reply["code"], "upstream_unavailable", "{mode:?}: {reply}");
        assert_eq!(reply["city"], city);
        let message = reply["message"].as_str().expect("message");
        assert!(
            message.contains(words),
            "{mode:?}: {message:?} should say {words:?}"
        );
    }
    // Failures are not cached: once the upstream heals, the city works.
    server.fake.set_mode(Mode::Normal);
    assert_eq!(c.ask("Oslo").await["type"], "weather");
}

#[tokio::test]
async fn invalid_cities_are_refused_without_calling_upstream() {
    let server = start().await;
    let mut c = server.client().await;
    for (city, words) in [
        ("   ", "empty"),
        (&"x".repeat(101)[..], "too long"),
        ("Lon\u{7}don", "control characters"),
    ] {
        let reply = c.ask(city).await;
        assert_eq!(reply["code"], "invalid_data", "{reply}");
        let message = reply["message"].as_str().expect("message");
        assert!(message.contains(words), "{message:?} should say {words:?}");
    }
    assert_eq!(server.fake.calls(), 0);
    assert_eq!(server.metric("failed").await, 3);
}

#[tokio::test]
async fn city_cannot_inject_query_parameters() {
    let server = start().await;
    let mut c = server.client().await;
    let reply = c.ask("London&appid=x&units=imperial").await;
    assert_eq!(reply["type"], "weather", "{reply}");

    let queries = server.fake.queries();
    assert_eq!(queries.len(), 1);
    let q = &queries[0];
    let names: Vec<&str> = q.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        ["q", "appid", "units"],
        "exactly our three parameters"
    );
    assert_eq!(
        q[0].1, "london&appid=x&units=imperial",
        "the city is one literal value (in its canonical form)"
    );
    assert_eq!(q[1].1, API_KEY);
    assert_eq!(q[2].1, "metric");
}

#[tokio::test]
async fn a_slow_lookup_delays_neither_its_connection_nor_others() {
    let server = start().await;
    server
        .fake
        .set_city_latency("Slowtown", Duration::from_secs(2));
    let mut a = server.client().await;
    let mut b = server.client().await;

    let started = Instant::now();
    a.send("Slowtown").await;
    a.send("Quickville").await;
    b.send("Elsewhere").await;
    let first = a.recv_json().await;
    assert_eq!(
        first["city"], "Quickville",
        "the fast reply overtakes the slow one"
    );
    assert_eq!(b.recv_json().await["city"], "Elsewhere");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(a.recv_json().await["city"], "Slowtown");
}

#[tokio::test]
async fn many_requests_in_flight_on_one_connection_all_answered() {
    let server = start_with(|c| c.server.max_inflight_per_connection = 4).await;
    server.fake.set_latency(Duration::from_millis(50));
    let mut c = server.client().await;
    let cities: Vec<String> = (0..40).map(|i| format!("Town{i}")).collect();
    for city in &cities {
        c.send(city).await;
    }
    let mut got = Vec::new();
    for _ in &cities {
        let reply = c.recv_json().await;
        assert_eq!(reply["type"], "weather", "{reply}");
        got.push(reply["city"].as_str().expect("city").to_owned());
    }
    got.sort();
    let mut want = cities.clone();
    want.sort();
    assert_eq!(got, want, "every request answered exactly once");
    assert_eq!(
        server.fake.peak_in_flight(),
        4,
        "never more than the connection's 4 lookups at once, and all 4 used"
    );
}

#[tokio::test]
async fn cache_serves_repeat_cities_ignoring_case_and_spacing() {
    let server = start().await;
    let mut c = server.client().await;
    assert_eq!(c.ask("New York").await["type"], "weather");
    assert_eq!(c.ask("new   york").await["type"], "weather");
    assert_eq!(c.ask("NEW YORK").await["type"], "weather");
    assert_eq!(server.fake.calls(), 1);
    assert_eq!(server.metric("cache-hits").await, 2);
}

#[tokio::test]
async fn two_hundred_clients_asking_at_once_cause_one_upstream_call() {
    let server = start().await;
    server.fake.set_latency(Duration::from_millis(500));
    let mut clients = Vec::new();
    for _ in 0..200 {
        clients.push(server.client().await);
    }
    for c in &mut clients {
        c.send("Rome").await;
    }
    for c in &mut clients {
        let reply = c.recv_json().await;
        assert_eq!(reply["type"], "weather", "{reply}");
        assert_eq!(reply["city"], "Rome");
    }
    assert_eq!(server.fake.calls(), 1, "single-flight");
    let m = server.metrics().await;
    assert_eq!(m["cache-misses"], 1);
    assert_eq!(
        m["cache-coalesced"].as_u64().expect("n") + m["cache-hits"].as_u64().expect("n"),
        199
    );
}

#[tokio::test]
async fn lookups_waiting_on_a_cancelled_call_take_it_over() {
    // A weather.get cut off by its handler's timeout drops its lookup,
    // and with it the upstream call others were waiting on.
    let server = start_with(|c| {
        c.events.insert(
            "weather.get".to_owned(),
            toml::from_str("timeout_ms = 150").expect("override"),
        );
    })
    .await;
    server.fake.set_latency(Duration::from_millis(400));
    let mut leader = server.client().await;
    let r = serde_json::json!({"event": "weather.get", "data": {"city": "Rome"}, "ref": "l"});
    leader.send(&r.to_string()).await;
    server.wait_sample("gale_upstream_in_flight", 1.0).await;
    let mut waiters = Vec::new();
    for _ in 0..5 {
        let mut c = server.client().await;
        c.send("Rome").await;
        waiters.push(c);
    }
    assert_eq!(leader.reply_to("l").await["error"]["code"], "timeout");
    for c in &mut waiters {
        let reply = c.recv_json().await;
        assert_eq!(reply["type"], "weather", "{reply}");
    }
    // One waiter made a second call; the others shared it.
    assert_eq!(server.fake.calls(), 2);
}

/// One upstream slot, a 400 ms upstream and a 1 s deadline; after an
/// optional first lookup that times a call, one connection asks for A, B,
/// C and D at once. A takes the slot (done near 400 ms) and B waits for
/// it (near 800 ms); C and D would end near 1,200 and 1,600 ms, past the
/// deadline. Checks that A and B are answered and that C and D are told
/// "server busy" within `refused_within` rather than at their deadline.
async fn two_of_four_cannot_make_it(warm: bool, refused_within: Duration) -> common::TestServer {
    let server = start_with(|c| {
        c.weather.max_concurrent = 1;
        c.weather.timeout_ms = 1_000;
    })
    .await;
    server.fake.set_latency(Duration::from_millis(400));
    let mut c = server.client().await;
    if warm {
        assert_eq!(c.ask("Warm").await["type"], "weather");
    }
    let started = Instant::now();
    for city in ["A", "B", "C", "D"] {
        c.send(city).await;
    }
    let mut replies = std::collections::HashMap::new();
    for _ in 0..4 {
        let r = c.recv_json().await;
        let city = r["city"].as_str().expect("city").to_owned();
        replies.insert(city, (r, started.elapsed()));
    }
    for city in ["A", "B"] {
        let (r, _) = &replies[city];
        assert_eq!(r["type"], "weather", "{city}: {r}");
    }
    for city in ["C", "D"] {
        let (r, at) = &replies[city];
        assert_eq!(r["code"], "system_overloaded", "{city}: {r}");
        assert!(
            r["message"].as_str().expect("m").contains("server busy"),
            "{r}"
        );
        assert!(*at < refused_within, "{city} refused after {at:?}");
    }
    assert_eq!(
        server.sample("gale_upstream_refused_early_total").await,
        2.0
    );
    server
}

#[tokio::test]
async fn a_lookup_that_cannot_finish_in_time_is_refused_at_once() {
    // One call has taught the server how long calls take: C and D are
    // refused on arrival.
    let server = two_of_four_cannot_make_it(true, Duration::from_millis(300)).await;
    assert_eq!(server.fake.calls(), 3);
}

#[tokio::test]
async fn waiting_lookups_are_refused_as_soon_as_they_cannot_finish_in_time() {
    // A cold start: no call has been timed when the lookups come, so none
    // can be refused on arrival; once A's call has taken 400 ms, C and D
    // hear at their next check, not at their deadline.
    let server = two_of_four_cannot_make_it(false, Duration::from_millis(750)).await;
    assert_eq!(server.fake.calls(), 2);
}

#[tokio::test]
async fn past_max_pending_lookups_are_refused_at_once() {
    let server = start_with(|c| {
        c.weather.max_concurrent = 1;
        c.weather.max_pending = 1;
    })
    .await;
    server.fake.set_latency(Duration::from_millis(800));
    let mut c = server.client().await;
    c.send("First").await; // holds the only upstream slot
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.send("Second").await; // waits for the slot
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    c.send("Third").await; // nothing left: refused now
    let reply = c.recv_json().await;
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "refused at once"
    );
    assert_eq!(reply["city"], "Third", "{reply}");
    assert_eq!(reply["code"], "system_overloaded");
    assert!(
        reply["message"]
            .as_str()
            .expect("m")
            .contains("server busy")
    );
    assert_eq!(c.recv_json().await["city"], "First");
    assert_eq!(c.recv_json().await["city"], "Second");
}

#[tokio::test]
async fn breaker_opens_after_failures_fails_fast_and_closes_by_itself() {
    let server = start_with(|c| {
        c.weather.breaker_failures = 3;
        c.weather.breaker_cooldown_ms = 700;
    })
    .await;
    server.fake.set_mode(Mode::Status(500));
    let mut c = server.client().await;
    for city in ["A1", "A2", "A3"] {
        assert_eq!(c.ask(city).await["code"], "upstream_unavailable");
    }
    assert_eq!(server.fake.calls(), 3);

    let reply = c.ask("A4").await;
    assert_eq!(reply["code"], "upstream_unavailable");
    assert!(
        reply["message"]
            .as_str()
            .expect("m")
            .contains("too many recent upstream failures"),
        "{reply}"
    );
    assert_eq!(server.fake.calls(), 3, "open breaker makes no call");

    server.fake.set_mode(Mode::Normal);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        c.ask("A5").await["type"],
        "weather",
        "half-open trial succeeds"
    );
    assert_eq!(c.ask("A6").await["type"], "weather", "closed again");
    assert_eq!(server.fake.calls(), 5);
}

#[tokio::test]
async fn open_meteo_provider_geocodes_then_reads_current_weather() {
    let server = start_with(|c| {
        c.weather.provider = Provider::OpenMeteo;
        c.weather.api_key = None;
    })
    .await;
    let mut c = server.client().await;
    let reply = c.ask("Paris").await;
    assert_eq!(reply["type"], "weather", "{reply}");
    assert_eq!(reply["city"], "Paris");
    let description = reply["description"].as_str().expect("description");
    assert!(
        ["clear sky", "mainly clear", "partly cloudy", "overcast"].contains(&description),
        "WMO code mapped: {description}"
    );
    assert_eq!(server.fake.calls(), 2, "geocoding + forecast");

    let reply = c.ask("Nowhere Special").await;
    assert_eq!(reply["code"], "not_found", "{reply}");
    assert_eq!(
        server.fake.calls(),
        3,
        "no forecast call for an unknown place"
    );
}

#[tokio::test]
async fn waiting_for_a_slot_is_not_an_upstream_failure() {
    let server = start_with(|c| {
        c.weather.max_concurrent = 2;
        c.weather.timeout_ms = 700;
    })
    .await;
    server.fake.set_latency(Duration::from_millis(300));
    let mut a = server.client().await;
    let mut b = server.client().await;
    for i in 0..20 {
        a.send(&format!("Crowd{i}")).await;
        b.send(&format!("Crowd{}", i + 20)).await;
    }
    let mut codes = std::collections::HashMap::<String, usize>::new();
    for c in [&mut a, &mut b] {
        for _ in 0..20 {
            let r = c.recv_json().await;
            let code = r["code"].as_str().unwrap_or("weather").to_owned();
            *codes.entry(code).or_default() += 1;
        }
    }
    // Refused for local congestion: at their deadline ("timeout"), or as
    // soon as the first calls showed they could not make it ("server
    // busy").
    let congested = codes.get("timeout").copied().unwrap_or(0)
        + codes.get("system_overloaded").copied().unwrap_or(0);
    assert!(congested >= 25, "{codes:?}");
    assert!(!codes.contains_key("upstream_unavailable"), "{codes:?}");

    // The upstream is perfectly healthy: a new city is looked up.
    let reply = a.ask("Fresh").await;
    assert_eq!(reply["type"], "weather", "{reply}");
    assert_eq!(server.sample("gale_upstream_breaker_state").await, 0.0);
    assert_eq!(server.sample("gale_upstream_in_flight").await, 0.0);
    assert_eq!(server.sample("gale_upstream_pending").await, 0.0);
}

#[tokio::test]
async fn timeouts_in_flight_are_counted_and_every_gauge_returns_to_idle() {
    let server = start_with(|c| {
        c.weather.timeout_ms = 300;
        c.weather.breaker_failures = 100;
    })
    .await;
    server.fake.set_latency(Duration::from_secs(2));
    let mut c = server.client().await;
    for i in 0..5 {
        c.send(&format!("Stalled{i}")).await;
    }
    for _ in 0..5 {
        assert_eq!(c.recv_json().await["code"], "timeout");
    }
    assert_eq!(server.sample("gale_upstream_in_flight").await, 0.0);
    assert_eq!(server.sample("gale_upstream_pending").await, 0.0);
    assert_eq!(
        server
            .sample(r#"gale_upstream_calls_total{result="Timeout"}"#)
            .await,
        5.0
    );
    assert_eq!(
        server.sample("gale_upstream_latency_seconds_count").await,
        5.0
    );
    assert!(server.sample("gale_upstream_latency_seconds_sum").await >= 1.4);
    assert_eq!(server.metric("upstream-calls").await, 5);
}

#[tokio::test]
async fn a_city_the_provider_refuses_is_not_an_upstream_failure() {
    let server = start_with(|c| c.weather.breaker_failures = 2).await;
    server.fake.set_city_status("Bad//Name", 400);
    let mut c = server.client().await;
    for _ in 0..4 {
        let reply = c.ask("Bad//Name").await;
        assert_eq!(reply["code"], "invalid_data", "{reply}");
        let message = reply["message"].as_str().expect("message");
        assert!(message.contains("400"), "{message}");
    }
    assert_eq!(
        server.fake.calls(),
        4,
        "each one asked upstream: not cached, not refused"
    );
    assert_eq!(c.ask("Goodtown").await["type"], "weather", "breaker closed");
}

#[tokio::test]
async fn a_late_success_does_not_close_an_open_breaker() {
    let server = start_with(|c| {
        c.weather.breaker_failures = 3;
        c.weather.breaker_cooldown_ms = 10_000;
    })
    .await;
    server
        .fake
        .set_city_latency("Slowpoke", Duration::from_millis(1_500));
    let mut slow = server.client().await;
    slow.send("Slowpoke").await; // started while the breaker is closed
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.fake.set_mode(Mode::Status(500));
    let mut c = server.client().await;
    for city in ["F1", "F2", "F3"] {
        assert_eq!(c.ask(city).await["code"], "upstream_unavailable");
    }
    server.fake.set_mode(Mode::Normal);
    // The early call now succeeds, after the breaker opened.
    assert_eq!(slow.recv_json().await["type"], "weather");
    let reply = c.ask("After").await;
    assert!(
        reply["message"]
            .as_str()
            .expect("message")
            .contains("too many recent upstream failures"),
        "still open: {reply}"
    );
}

#[tokio::test]
async fn an_upstream_slower_than_the_deadline_opens_the_breaker() {
    let server = start_with(|c| {
        c.weather.timeout_ms = 300;
        c.weather.breaker_failures = 3;
    })
    .await;
    server.fake.set_latency(Duration::from_secs(2));
    let mut c = server.client().await;
    for city in ["S1", "S2", "S3"] {
        assert_eq!(c.ask(city).await["code"], "timeout");
    }
    let started = Instant::now();
    let reply = c.ask("S4").await;
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "failed fast"
    );
    assert_eq!(reply["code"], "upstream_unavailable", "{reply}");
    assert_eq!(server.fake.calls(), 3);
}

/// The provider is asked with exactly the text the cache keys: a name
/// spelled with a look-alike character (K as U+212A KELVIN SIGN, full-width
/// letters) is asked as its plain form, so it cannot poison the cache
/// entry of the city it looks like.
#[tokio::test]
async fn a_look_alike_spelling_cannot_poison_the_cache() {
    let server = start_with(|c| c.weather.not_found_ttl_s = 300).await;
    // A provider that knows Kyiv but not these spellings of it.
    server.fake.set_exact_status("\u{212A}yiv", 404);
    server
        .fake
        .set_exact_status("\u{FF2B}\u{FF59}\u{FF49}\u{FF56}", 404);
    let mut c = server.client().await;
    for asked in [
        "\u{212A}yiv",
        "\u{FF2B}\u{FF59}\u{FF49}\u{FF56}",
        "Kyiv",
        "KYIV",
        " kyiv ",
    ] {
        let reply = c.ask(asked).await;
        assert_eq!(reply["type"], "weather", "{asked:?}: {reply}");
        assert_eq!(reply["city"], "Kyiv", "{asked:?}: {reply}");
    }
    assert_eq!(server.fake.calls(), 1, "one entry for every spelling");
    let asked: Vec<String> = server
        .fake
        .queries()
        .iter()
        .filter_map(|q| q.iter().find(|(k, _)| k == "q").map(|(_, v)| v.clone()))
        .collect();
    assert_eq!(asked, ["kyiv"], "upstream is asked the canonical form");
}
