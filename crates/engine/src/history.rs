//! Topic history: the last publications of a topic, kept so a client that
//! reconnects gets exactly what it missed, or learns it cannot.
//!
//! A topic has history when a `[topics."PATTERN"]` block gives it a
//! `history_size` ([`Policies`]). Every publication on such a topic gets a
//! position: an `offset` (1, 2, 3, … within the stream) and the stream's
//! `epoch`, an opaque string that changes whenever the history is lost (a
//! restart, an eviction, the position expiring), so "nothing missed" and
//! "history gone" are never confused. The position is part of the pushed
//! text itself (`{"event":…,"data":…,"offset":N,"epoch":"E"}`), encoded
//! once for every recipient.
//!
//! On a single node the streams live here, in memory ([`Memory`]), bounded
//! by `history.max_bytes` and `history.max_streams`: past either, the
//! streams published to least recently are dropped whole (their epoch
//! changes) and counted. Only a publication makes a stream: a read
//! stores nothing, so subscribes cannot push real history out. Each entry stays recoverable for its topic's
//! `history_ttl_s`; a stream's position outlives its entries for
//! `history.meta_ttl_s`. In cluster mode the same streams live in Redis
//! (`crate::cluster::history`) so any node answers a recovery.
//!
//! No gap: a subscriber is registered before its recovery read, and a
//! publication gets its position and its recipients in one step under the
//! stream's lock, so each publication is either in the history the read
//! returns or pushed to the new subscriber afterwards (or both: a client
//! skips a push whose offset it already has).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use crate::config::{HistoryConfig, TopicConfig};
use crate::metrics::Metrics;
use crate::websocket::Prepared;

/// One topic's history settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Publications kept.
    pub size: usize,
    /// How long each stays recoverable.
    pub ttl: Duration,
}

/// The `[topics."PATTERN"]` blocks that turn history on.
#[derive(Debug, Default, Clone)]
pub struct Policies {
    exact: HashMap<String, Policy>,
    /// Patterns with `*`, longest first.
    patterns: Vec<(String, Policy)>,
}

impl Policies {
    /// The policies of `topics` (blocks that do not set `history_size`
    /// are left out: they leave it to the next block that matches).
    pub fn new<'a>(topics: impl IntoIterator<Item = (&'a String, &'a TopicConfig)>) -> Policies {
        let mut p = Policies::default();
        for (name, t) in topics {
            let Some(size) = t.history_size else {
                continue;
            };
            let policy = (size > 0).then_some(Policy {
                size,
                ttl: Duration::from_secs(t.history_ttl_s.unwrap_or(0)),
            });
            // A block with history_size = 0 still wins over a pattern:
            // it turns history off for what it matches.
            let policy = policy.unwrap_or(Policy {
                size: 0,
                ttl: Duration::ZERO,
            });
            if name.contains('*') {
                p.patterns.push((name.clone(), policy));
            } else {
                p.exact.insert(name.clone(), policy);
            }
        }
        p.patterns.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        p
    }

    /// `topic`'s history policy, if it has one.
    pub fn get(&self, topic: &str) -> Option<Policy> {
        let p = match self.exact.get(topic) {
            Some(p) => *p,
            None => self.patterns.iter().find(|(pat, _)| matches(pat, topic))?.1,
        };
        (p.size > 0).then_some(p)
    }
}

/// Whether `name` matches `pattern`, where `*` matches any characters.
pub(crate) fn matches(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return pattern == name;
    };
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

/// A client's last known position, sent to recover from it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Since {
    /// The last offset it has.
    pub offset: u64,
    /// The epoch that offset belongs to.
    pub epoch: String,
}

/// A stream's position: the offset of its last publication (0 before the
/// first) in its epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The last publication's offset.
    pub offset: u64,
    /// The stream's epoch.
    pub epoch: Arc<str>,
}

/// What a recovery read found.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// The stream's position now.
    pub position: Position,
    /// Every publication after the client's position, oldest first;
    /// `None` when some are no longer kept (or the epoch changed).
    pub publications: Option<Vec<Prepared>>,
}

/// `text` (a push, `{…}`) with its topic and without its closing brace:
/// what a position is appended to.
pub fn head(text: &str, topic: &str) -> String {
    let body = text.strip_suffix('}').unwrap_or(text);
    let topic = serde_json::Value::from(topic);
    format!("{body},\"topic\":{topic}")
}

/// `text` (a push, `{…}`) with its topic as a top-level field: a topic
/// push without a position.
pub fn with_topic(text: &str, topic: &str) -> String {
    format!("{}}}", head(text, topic))
}

/// `text` (a push, `{…}`) with its topic and position as top-level
/// fields: `{"event":…,"data":…,"topic":…,"offset":N,"epoch":"E"}`.
pub fn positioned(text: &str, topic: &str, offset: u64, epoch: &str) -> String {
    format!(
        "{},\"offset\":{offset},\"epoch\":\"{epoch}\"}}",
        head(text, topic)
    )
}

/// Bytes a topic name (at most 128 characters, escaped) and a position
/// add to a push, at most.
pub const POSITION_BYTES: usize = 6 * 128 + 80;

/// 64 random bits.
fn rand_u64() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}

struct Entry {
    offset: u64,
    at: Instant,
    text: Prepared,
}

/// Every in-memory stream, as a takeover carries it to the new process.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Snapshot {
    instance: u64,
    losses: u64,
    streams: Vec<SnapshotStream>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SnapshotStream {
    topic: String,
    epoch: String,
    top: u64,
    idle_ms: u64,
    entries: Vec<SnapshotEntry>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SnapshotEntry {
    offset: u64,
    age_ms: u64,
    text: String,
}

/// What an entry costs beyond its text.
const ENTRY_OVERHEAD: usize = 64;

fn entry_bytes(text: &Prepared) -> usize {
    // The prepared frame keeps the text and its framed copy.
    2 * text.len() + ENTRY_OVERHEAD
}

struct Stream {
    epoch: Arc<str>,
    top: u64,
    entries: VecDeque<Entry>,
    bytes: usize,
    last_publish: Instant,
}

impl Stream {
    fn new(epoch: Arc<str>, now: Instant) -> Stream {
        Stream {
            epoch,
            top: 0,
            entries: VecDeque::new(),
            bytes: 0,
            last_publish: now,
        }
    }

    /// Drops entries past `ttl` or beyond `size`; returns the bytes freed.
    fn trim(&mut self, size: usize, ttl: Duration, now: Instant) -> usize {
        let mut freed = 0;
        while let Some(e) = self.entries.front() {
            if self.entries.len() > size || now.duration_since(e.at) >= ttl {
                freed += entry_bytes(&e.text);
                self.entries.pop_front();
            } else {
                break;
            }
        }
        self.bytes -= freed;
        freed
    }

    fn position(&self) -> Position {
        Position {
            offset: self.top,
            epoch: self.epoch.clone(),
        }
    }
}

#[derive(Default)]
struct Streams {
    map: HashMap<Arc<str>, Stream>,
    bytes: usize,
    /// Streams dropped (expired or evicted) so far: part of every epoch
    /// made after, so no topic's new stream repeats a lost one's epoch.
    losses: u64,
}

/// The in-memory streams of a single node.
///
/// Only a publication creates a stream; a read (a subscribe, with or
/// without `since`) leaves nothing behind. A topic's epoch is known before
/// its first publication: a digest of this process, the streams lost so
/// far and the topic's name. A subscriber of a topic without publications
/// is at offset 0 of that epoch, which the first publication's stream
/// takes, so it recovers the first publications like any others. Once
/// any stream is lost the digest changes, so a stream made after a loss
/// never repeats the epoch of one before it (a position from before the
/// loss is not recovered from: "history gone", never a wrong "nothing
/// missed").
pub struct Memory {
    state: Mutex<Streams>,
    max_bytes: usize,
    max_streams: usize,
    meta_ttl: Duration,
    metrics: Arc<Metrics>,
    /// This process, in epochs: random, so a restart changes them all
    /// (a takeover carries it over: the streams go on).
    instance: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory").finish_non_exhaustive()
    }
}

impl Memory {
    /// Empty streams within `cfg`'s bounds.
    pub fn new(cfg: &HistoryConfig, metrics: Arc<Metrics>) -> Memory {
        Memory {
            state: Mutex::new(Streams::default()),
            max_bytes: cfg.max_bytes,
            max_streams: cfg.max_streams.max(1),
            meta_ttl: Duration::from_secs(cfg.meta_ttl_s),
            metrics,
            instance: std::sync::atomic::AtomicU64::new(rand_u64()),
        }
    }

    /// `topic`'s epoch for a stream made now: this process, the losses so
    /// far, the name.
    fn epoch_for(&self, topic: &str, losses: u64) -> Arc<str> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let instance = self.instance.load(std::sync::atomic::Ordering::Relaxed);
        (instance, losses, topic).hash(&mut h);
        Arc::from(format!("{:08x}", h.finish() as u32))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Streams> {
        // Every mutation leaves the maps consistent; a poisoned lock is
        // still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a publication to `topic`'s stream and, still under the
    /// stream's lock, hands its positioned text to `deliver`, so no
    /// recovery read falls between the two.
    pub fn append(
        &self,
        topic: &str,
        policy: Policy,
        text: &Prepared,
        deliver: impl FnOnce(&Prepared),
    ) {
        let now = Instant::now();
        let mut st = self.lock();
        let st = &mut *st;
        self.ensure(st, topic, now);
        let Some(stream) = st.map.get_mut(topic) else {
            return;
        };
        stream.top += 1;
        stream.last_publish = now;
        let text = Prepared::from(positioned(text.as_str(), topic, stream.top, &stream.epoch));
        let added = entry_bytes(&text);
        stream.entries.push_back(Entry {
            offset: stream.top,
            at: now,
            text: text.clone(),
        });
        stream.bytes += added;
        st.bytes += added;
        st.bytes -= stream.trim(policy.size, policy.ttl, now);
        deliver(&text);
        if st.bytes > self.max_bytes {
            self.make_room(st, now, 0);
        }
        self.gauges(st);
    }

    /// `topic`'s position and, when asked, the publications after `since`.
    /// Creates nothing: a topic without a stream is at offset 0 of the
    /// epoch its first publication will have (see [`Memory`]).
    pub fn recover(&self, topic: &str, policy: Policy, since: Option<&Since>) -> Recovery {
        let now = Instant::now();
        let mut st = self.lock();
        let st = &mut *st;
        let Some(stream) = st.map.get_mut(topic) else {
            let epoch = self.epoch_for(topic, st.losses);
            let publications =
                since.and_then(|s| (s.offset == 0 && *s.epoch == *epoch).then(Vec::new));
            return Recovery {
                position: Position { offset: 0, epoch },
                publications,
            };
        };
        st.bytes -= stream.trim(policy.size, policy.ttl, now);
        let position = stream.position();
        let publications = since.and_then(|s| {
            if *s.epoch != *stream.epoch || s.offset > stream.top {
                return None;
            }
            let wanted = stream.top - s.offset;
            let kept = stream.entries.len() as u64;
            if wanted > kept {
                return None;
            }
            let from = (kept - wanted) as usize;
            let out: Vec<Prepared> = stream
                .entries
                .range(from..)
                .map(|e| e.text.clone())
                .collect();
            debug_assert!(out.is_empty() || stream.entries[from].offset == s.offset + 1);
            Some(out)
        });
        self.gauges(st);
        Recovery {
            position,
            publications,
        }
    }

    /// Gives `topic` a stream (a new epoch) if it has none, making room.
    fn ensure(&self, st: &mut Streams, topic: &str, now: Instant) {
        if !st.map.contains_key(topic) {
            self.make_room(st, now, 1);
            let epoch = self.epoch_for(topic, st.losses);
            st.map.insert(topic.into(), Stream::new(epoch, now));
        }
    }

    /// Drops expired streams, then the least recently published ones,
    /// until `extra` more streams and the bytes fit.
    fn make_room(&self, st: &mut Streams, now: Instant, extra: usize) {
        let over =
            |st: &Streams| st.map.len() + extra > self.max_streams || st.bytes > self.max_bytes;
        if !over(st) {
            return;
        }
        // Positions past their meta TTL go first: no client can recover
        // from them anyway.
        let meta_ttl = self.meta_ttl;
        let before = st.map.len();
        let mut freed = 0;
        st.map.retain(|_, s| {
            let keep = now.duration_since(s.last_publish) < meta_ttl;
            if !keep {
                freed += s.bytes;
            }
            keep
        });
        st.bytes -= freed;
        st.losses += (before - st.map.len()) as u64;
        if !over(st) {
            return;
        }
        // Then whole streams, least recently published first, down to
        // 90 % of the bounds so the next append does not sweep again.
        let mut by_age: Vec<(Instant, Arc<str>)> = st
            .map
            .iter()
            .map(|(k, s)| (s.last_publish, k.clone()))
            .collect();
        by_age.sort_unstable_by_key(|(at, _)| *at);
        let bytes_goal = self.max_bytes - self.max_bytes / 10;
        let streams_goal = (self.max_streams - self.max_streams / 10).min(self.max_streams - extra);
        let mut evicted = 0u64;
        for (_, key) in by_age {
            if st.map.len() + extra <= streams_goal.max(1) && st.bytes <= bytes_goal {
                break;
            }
            if let Some(s) = st.map.remove(&key) {
                st.bytes -= s.bytes;
                evicted += 1;
            }
        }
        st.losses += evicted;
        self.metrics.history_evicted.inc_by(evicted);
        tracing::debug!(
            expired = before - st.map.len() - evicted as usize,
            evicted,
            "topic histories dropped to stay within history.max_bytes / max_streams"
        );
    }

    fn gauges(&self, st: &Streams) {
        self.metrics.history_streams.set(st.map.len() as i64);
        self.metrics.history_bytes.set(st.bytes as i64);
    }

    /// Every stream as it is now, for a takeover: the new process goes
    /// on from the same positions and epochs.
    pub(crate) fn export(&self) -> Snapshot {
        let now = Instant::now();
        let st = self.lock();
        Snapshot {
            instance: self.instance.load(std::sync::atomic::Ordering::Relaxed),
            losses: st.losses,
            streams: st
                .map
                .iter()
                .map(|(topic, s)| SnapshotStream {
                    topic: topic.to_string(),
                    epoch: s.epoch.to_string(),
                    top: s.top,
                    idle_ms: now.duration_since(s.last_publish).as_millis() as u64,
                    entries: s
                        .entries
                        .iter()
                        .map(|e| SnapshotEntry {
                            offset: e.offset,
                            age_ms: now.duration_since(e.at).as_millis() as u64,
                            text: e.text.as_str().to_owned(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// Replaces every stream with the previous process's (see
    /// [`Memory::export`]); this node's own bounds apply from the next
    /// publication on.
    pub(crate) fn import(&self, snap: Snapshot) {
        let now = Instant::now();
        let ago = |ms: u64| now.checked_sub(Duration::from_millis(ms)).unwrap_or(now);
        let mut st = self.lock();
        self.instance
            .store(snap.instance, std::sync::atomic::Ordering::Relaxed);
        st.losses = snap.losses;
        st.map.clear();
        st.bytes = 0;
        for s in snap.streams {
            let mut stream = Stream::new(Arc::from(s.epoch), ago(s.idle_ms));
            stream.top = s.top;
            for e in s.entries {
                let text = Prepared::from(e.text);
                stream.bytes += entry_bytes(&text);
                stream.entries.push_back(Entry {
                    offset: e.offset,
                    at: ago(e.age_ms),
                    text,
                });
            }
            st.bytes += stream.bytes;
            st.map.insert(Arc::from(s.topic), stream);
        }
        self.gauges(&st);
    }

    /// Topics with a stream now.
    #[cfg(test)]
    fn streams(&self) -> usize {
        self.lock().map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(size: usize) -> Policy {
        Policy {
            size,
            ttl: Duration::from_secs(300),
        }
    }

    fn memory(max_bytes: usize, max_streams: usize) -> Memory {
        Memory::new(
            &HistoryConfig {
                max_bytes,
                max_streams,
                meta_ttl_s: 86_400,
            },
            Arc::new(Metrics::new()),
        )
    }

    fn publish(m: &Memory, topic: &str, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        for i in 0..n {
            let text = Prepared::from(format!("{{\"event\":\"e\",\"data\":{i}}}"));
            m.append(topic, policy(3), &text, |t| out.push(t.as_str().to_owned()));
        }
        out
    }

    #[test]
    fn patterns_match_with_stars_and_exact_names_win() {
        assert!(matches("weather:*", "weather:paris"));
        assert!(matches("*", "x"));
        assert!(matches("a*b*c", "a-b-c"));
        assert!(!matches("a*b*c", "a-c-b"));
        assert!(!matches("weather:*", "weathe"));
        assert!(matches("news", "news"));
        let topics = [
            (
                "news:*".to_owned(),
                TopicConfig {
                    history_size: Some(5),
                    history_ttl_s: Some(60),
                    ..Default::default()
                },
            ),
            (
                "news:sport:*".to_owned(),
                TopicConfig {
                    history_size: Some(9),
                    history_ttl_s: Some(60),
                    ..Default::default()
                },
            ),
            (
                "news:quiet".to_owned(),
                TopicConfig {
                    history_size: Some(0),
                    ..Default::default()
                },
            ),
        ];
        let p = Policies::new(topics.iter().map(|(k, v)| (k, v)));
        assert_eq!(p.get("news:x").map(|p| p.size), Some(5));
        assert_eq!(p.get("news:sport:f1").map(|p| p.size), Some(9));
        assert_eq!(p.get("news:quiet"), None);
        assert_eq!(p.get("other"), None);
        assert_eq!(Policies::default().get("news:x"), None);
    }

    #[test]
    fn publications_carry_consecutive_offsets_and_recover_exactly() {
        let m = memory(1 << 20, 10);
        let first = m.recover("t", policy(3), None).position;
        assert_eq!(first.offset, 0);
        let sent = publish(&m, "t", 5);
        // The epoch a read gave before the first publication is the
        // stream's.
        let epoch = m.recover("t", policy(3), None).position.epoch;
        assert_eq!(epoch, first.epoch);
        assert!(sent[4].ends_with(&format!(
            ",\"topic\":\"t\",\"offset\":5,\"epoch\":\"{epoch}\"}}"
        )));
        let since = |offset| Since {
            offset,
            epoch: epoch.to_string(),
        };
        // Offsets 3, 4, 5 are kept (size 3).
        let r = m.recover("t", policy(3), Some(&since(2)));
        let got: Vec<&str> = r
            .publications
            .as_ref()
            .expect("recovered")
            .iter()
            .map(Prepared::as_str)
            .collect();
        assert_eq!(
            got,
            sent[2..].iter().map(String::as_str).collect::<Vec<_>>()
        );
        assert_eq!(
            m.recover("t", policy(3), Some(&since(5)))
                .publications
                .map(|p| p.len()),
            Some(0)
        );
        // Offset 2 was trimmed: 1 → 5 cannot be recovered.
        assert!(
            m.recover("t", policy(3), Some(&since(1)))
                .publications
                .is_none()
        );
        // A position ahead of the stream, or another epoch, is not ours.
        assert!(
            m.recover("t", policy(3), Some(&since(6)))
                .publications
                .is_none()
        );
        let other = Since {
            offset: 5,
            epoch: "nope".into(),
        };
        assert!(
            m.recover("t", policy(3), Some(&other))
                .publications
                .is_none()
        );
    }

    #[test]
    fn entries_expire_after_their_ttl() {
        let m = memory(1 << 20, 10);
        let short = Policy {
            size: 10,
            ttl: Duration::from_millis(1),
        };
        let epoch = m.recover("t", short, None).position.epoch;
        m.append(
            "t",
            short,
            &Prepared::from("{\"event\":\"e\",\"data\":1}"),
            |_| {},
        );
        std::thread::sleep(Duration::from_millis(5));
        let since = Since {
            offset: 0,
            epoch: epoch.to_string(),
        };
        let r = m.recover("t", short, Some(&since));
        assert!(
            r.publications.is_none(),
            "an expired entry is not recoverable"
        );
        assert_eq!(r.position.offset, 1, "the position survives its entries");
        let since = Since {
            offset: 1,
            epoch: epoch.to_string(),
        };
        assert_eq!(
            m.recover("t", short, Some(&since))
                .publications
                .map(|p| p.len()),
            Some(0)
        );
    }

    #[test]
    fn the_bounds_hold_and_an_evicted_stream_gets_a_new_epoch() {
        let m = memory(1 << 20, 4);
        let old = m.recover("t0", policy(3), None).position.epoch;
        for i in 0..10 {
            publish(&m, &format!("t{}", i + 1), 1);
        }
        assert!(m.streams() <= 4, "{} streams", m.streams());
        assert!(m.metrics.history_evicted.get() > 0);
        let r = m.recover(
            "t0",
            policy(3),
            Some(&Since {
                offset: 0,
                epoch: old.to_string(),
            }),
        );
        assert!(r.publications.is_none());
        assert_ne!(r.position.epoch, old);

        // Reads leave nothing behind: no stream, nothing to evict.
        let m = memory(1 << 20, 4);
        publish(&m, "real", 2);
        for i in 0..1_000 {
            let r = m.recover(&format!("junk{i}"), policy(3), None);
            assert_eq!(r.position.offset, 0);
        }
        assert_eq!(m.streams(), 1);
        assert_eq!(m.recover("real", policy(3), None).position.offset, 2);

        let small = memory(4_000, 100);
        for i in 0..100 {
            publish(&small, &format!("s{i}"), 3);
            assert!(small.lock().bytes <= 4_000, "{} bytes", small.lock().bytes);
        }
    }
}
