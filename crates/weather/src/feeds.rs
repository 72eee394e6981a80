//! Live weather feeds: one refresh loop per subscribed city, however many
//! subscribers it has. Each loop reads the city through the weather cache
//! every `weather.refresh_s`, so 10,000 subscribers of Paris cost one
//! upstream call per cache refresh, and pushes `weather.update` to the
//! city's topic whenever the reading was refreshed (a new cache entry),
//! changed or not: `updated_at` tells subscribers it is current. A loop
//! stops when its last subscriber leaves.
//!
//! In cluster mode every node with subscribers of a city runs its loop,
//! but only the holder of the city's lease (`P:feed:CITY`, three refresh
//! periods long, renewed each period) looks the city up and pushes; the
//! push reaches the subscribers on every node through the backplane. A
//! holder that dies stops renewing, and another node's loop takes the
//! lease within three periods. When Redis does not answer, each node
//! refreshes for its own subscribers (counted as a fallback).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use gale_engine::broadcast::Target;
use gale_engine::server::App;

use crate::{Reading, WeatherError};

/// The topic a city's updates go to.
pub fn topic(city_key: &str) -> String {
    format!("weather:{city_key}")
}

/// The push (and reply) payload for a reading.
pub fn reading_json(r: &Reading) -> Value {
    json!({
        "city": r.city,
        "temperature": r.temperature,
        "feels_like": r.feels_like,
        "description": r.description,
        "humidity": r.humidity,
        "updated_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    })
}

/// The running loops, by city key.
#[derive(Debug, Default)]
pub struct Feeds {
    running: Mutex<HashSet<String>>,
}

impl Feeds {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loops running now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no loop runs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts the loop for `key` unless it runs: every `every`, it reads
    /// the city with `lookup` (through the cache) and pushes a fresh
    /// reading. Call after subscribing, with the reading the subscriber
    /// was just given.
    pub(crate) fn ensure<F, Fut>(
        self: &Arc<Self>,
        app: &Arc<App>,
        every: Duration,
        lookup: F,
        (key, city): (String, String),
        current: Arc<Reading>,
    ) where
        F: Fn(String) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Arc<Reading>, WeatherError>> + Send,
    {
        if !self.lock().insert(key.clone()) {
            return;
        }
        tracing::debug!(city = %key, "weather feed started");
        let (feeds, app) = (self.clone(), app.clone());
        let every = every.max(Duration::from_secs(1));
        tokio::spawn(async move {
            let topic = topic(&key);
            let mut last = current;
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = app.closing.cancelled() => break,
                }
                // Checked under the feeds lock, so a subscriber who
                // arrives now either is counted here or starts a new loop
                // after this one is gone.
                let stopped = {
                    let mut running = feeds.lock();
                    let none = app.hub.subscribers(&topic) == 0;
                    if none {
                        running.remove(&key);
                    }
                    none
                };
                if stopped {
                    tracing::debug!(city = %key, "weather feed stopped: no subscribers");
                    release(&app, &key).await;
                    return;
                }
                if !refreshes_here(&app, &key, every).await {
                    continue;
                }
                match lookup(city.clone()).await {
                    // A new Arc means the cache fetched a fresh reading.
                    Ok(r) if !Arc::ptr_eq(&r, &last) => {
                        // A reading is a few hundred bytes: never too large.
                        if let Err(e) = app.hub.send_now(
                            &Target::Topic(topic.clone()),
                            "weather.update",
                            &reading_json(&r),
                        ) {
                            tracing::warn!(city = %key, error = %e, "weather update not pushed");
                        }
                        last = r;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(city = %key, error = %e, "weather feed lookup failed")
                    }
                }
            }
            feeds.lock().remove(&key);
            release(&app, &key).await;
        });
    }
}

/// Whether this node refreshes `key` this period: always on a single
/// node; in a cluster, when it holds (or just took) the city's lease.
async fn refreshes_here(app: &App, key: &str, every: Duration) -> bool {
    let Some(cluster) = &app.cluster else {
        return true;
    };
    match cluster
        .hold_lease(&cluster.key(&["feed", key]), every * 3)
        .await
    {
        Ok(held) => held,
        Err(e) => {
            cluster.fell_back(gale_engine::metrics::Fallback::Feed, &e);
            true
        }
    }
}

/// Gives up the city's lease (the loop stopped), so another node's loop
/// takes it at once.
async fn release(app: &App, key: &str) {
    if let Some(cluster) = &app.cluster {
        let _ = cluster.release_lease(&cluster.key(&["feed", key])).await;
    }
}
