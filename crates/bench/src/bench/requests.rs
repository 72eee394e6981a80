//! The `requests` scenario: weather requests in a closed loop.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::{Live, Report, Target, merge, process_cpu, progress, ramp};

/// The fields of a reply the generator looks at; everything else is
/// skipped without being copied.
#[derive(serde::Deserialize)]
struct Reply<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    city: Option<Cow<'a, str>>,
    #[serde(borrow)]
    reply: Option<Cow<'a, str>>,
    #[serde(borrow)]
    code: Option<Cow<'a, str>>,
    ok: Option<bool>,
    #[serde(borrow)]
    error: Option<ReplyError<'a>>,
}

#[derive(serde::Deserialize)]
struct ReplyError<'a> {
    #[serde(borrow)]
    code: Option<Cow<'a, str>>,
}

/// What a `requests` connection sends and how it matches replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ask {
    /// A plain-text city name; the reply names the city.
    City,
    /// A JSON event (`weather.get`, or the one named) with data
    /// `{"city"}` or the data given; the reply carries its `ref`.
    Event(String, Option<serde_json::Value>),
    /// A text any echo server sends back unchanged (for baselines such as
    /// gale's `/echo` or another crate's echo example).
    Echo,
}

/// Options of the `requests` scenario.
#[derive(Debug, Clone)]
pub struct RequestsOptions {
    /// Connections.
    pub connections: usize,
    /// How long to send.
    pub duration: Duration,
    /// Cities drawn from `City0` … `City{K-1}`.
    pub cities: usize,
    /// Requests outstanding per connection (closed loop).
    pub window: usize,
    /// What each request is.
    pub ask: Ask,
    /// New connections per second while connecting.
    pub connect_rate: u32,
    /// How long to wait for a reply before counting a timeout.
    pub reply_timeout: Duration,
    /// Requests each connection sends before it stops; 0 = no limit.
    pub per_connection: u64,
    /// Number of this process's first connection (workers of one run take
    /// disjoint ranges, so they do not ask for the same cities in step).
    pub first_connection: usize,
}

/// Runs `requests`: closed loop, `window` requests outstanding per
/// connection, until `duration` or `stop`.
pub async fn requests(
    target: Target,
    o: RequestsOptions,
    stop: CancellationToken,
    show: bool,
) -> Report {
    let started = Instant::now();
    let cpu0 = process_cpu();
    let live = Arc::new(Live::default());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Report>();
    let deadline = tokio::time::Instant::now() + o.duration;
    let run_stop = stop.child_token();
    {
        let stopper = run_stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            stopper.cancel();
        });
    }
    let bar = show.then(|| progress(o.duration.as_millis() as u64, "connecting"));
    let ramp_stop = run_stop.clone();
    let target = Arc::new(target);
    let o2 = o.clone();
    let live2 = live.clone();
    let started_conns = ramp(o.connections, o.connect_rate, &ramp_stop, move |i| {
        let (target, o, tx, stop, live) = (
            target.clone(),
            o2.clone(),
            tx.clone(),
            run_stop.clone(),
            live2.clone(),
        );
        async move {
            let report = one_connection(&target, o.first_connection + i, &o, &stop, &live).await;
            let _ = tx.send(report);
        }
    })
    .await;

    // Every started connection reports once: at the deadline (or Ctrl-C)
    // it stops sending and waits, at most reply_timeout, for what is in
    // flight.
    let mut total = Report::new("requests");
    let mut done = 0;
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    while done < started_conns {
        tokio::select! {
            r = rx.recv() => match r {
                Some(r) => {
                    merge(&mut total, r);
                    done += 1;
                }
                None => break,
            },
            _ = ticker.tick() => {
                if let Some(bar) = &bar {
                    bar.set_position(started.elapsed().as_millis() as u64);
                    bar.set_message(format!(
                        "{} connected, {} replies",
                        live.connected.load(Ordering::Relaxed),
                        live.replies.load(Ordering::Relaxed)
                    ));
                }
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // Rates are per second of sending, which ends at the deadline.
    total.elapsed = started.elapsed().min(o.duration);
    total.cpu = process_cpu().saturating_sub(cpu0);
    total
}

/// One connection of `requests`.
async fn one_connection(
    target: &Target,
    i: usize,
    o: &RequestsOptions,
    stop: &CancellationToken,
    live: &Live,
) -> Report {
    let mut r = Report::new("requests");
    let mut ws = match target.connect(i).await {
        Ok(ws) => ws,
        Err(e) => {
            r.connect_failed = 1;
            r.error(e);
            return r;
        }
    };
    r.connected = 1;
    live.connected.fetch_add(1, Ordering::Relaxed);
    // Requests in flight: by ref (events), by city (plain text) or by the
    // text itself (echo).
    let mut pending: HashMap<String, VecDeque<Instant>> = HashMap::new();
    let mut in_flight = 0_usize;
    let mut sent = 0_u64;
    let mut seq = i.wrapping_mul(7919);
    loop {
        while in_flight < o.window.max(1)
            && !stop.is_cancelled()
            && (o.per_connection == 0 || sent < o.per_connection)
        {
            seq = seq.wrapping_add(1);
            let city = format!("City{}", seq % o.cities.max(1));
            let (key, text) = if let Ask::Event(event, data) = &o.ask {
                let key = seq.to_string();
                let data = data.clone().unwrap_or_else(|| json!({ "city": city }));
                let text = json!({"event":event,"data":data,"ref":key}).to_string();
                (key, text)
            } else {
                (city.clone(), city)
            };
            if ws.send(Message::text(text)).await.is_err() {
                r.error("send failed");
                return r;
            }
            pending.entry(key).or_default().push_back(Instant::now());
            in_flight += 1;
            sent += 1;
        }
        if in_flight == 0 {
            break;
        }
        let text = match tokio::time::timeout(o.reply_timeout, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(Message::Close(f)))) => {
                r.error(format!(
                    "closed {}",
                    f.map(|f| u16::from(f.code)).unwrap_or(1005)
                ));
                return r;
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => {
                r.error(format!("read: {e}"));
                return r;
            }
            Ok(None) => {
                r.error("connection ended");
                return r;
            }
            Err(_) => {
                r.error("no reply in time");
                return r;
            }
        };
        // Which request this answers, and why it failed if it did. An echo
        // is its own key; anything else is JSON, read with a typed,
        // borrowing parse: the generator must stay cheaper per reply than
        // the server it measures.
        let (key, failure) = if o.ask == Ask::Echo {
            (Some(Cow::Borrowed(text.as_str())), None)
        } else {
            let Ok(v) = serde_json::from_str::<Reply<'_>>(&text) else {
                r.error("unparsable reply");
                continue;
            };
            if v.kind.as_deref() == Some("connected") {
                continue; // the greeting
            }
            let failed = v.kind.as_deref() == Some("error") || v.ok == Some(false);
            let (key, code) = if matches!(o.ask, Ask::Event(..)) {
                (v.reply, v.error.and_then(|e| e.code))
            } else {
                (v.city, v.code)
            };
            let failure = failed.then(|| format!("reply {}", code.as_deref().unwrap_or("error")));
            (key, failure)
        };
        let Some(sent) =
            key.and_then(|k| pending.get_mut(k.as_ref()).and_then(VecDeque::pop_front))
        else {
            r.error("unmatched reply");
            continue;
        };
        in_flight -= 1;
        match failure {
            Some(kind) => r.error(kind),
            None => {
                r.replies += 1;
                live.replies.fetch_add(1, Ordering::Relaxed);
                let _ = r.latency.record(sent.elapsed().as_micros().max(1) as u64);
            }
        }
        if stop.is_cancelled() && in_flight == 0 {
            break;
        }
    }
    let _ = ws.close(None).await;
    r
}
