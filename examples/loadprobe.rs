//! A small standalone load probe: one process, one WebSocket client per
//! connection (tokio-tungstenite), plain-text city requests only. It took
//! the earliest figures under "History" in docs/benchmarks.md and is kept
//! as a short example of driving gale from Rust. For real load runs
//! (several processes and source addresses, HDR histograms, the server's
//! CPU and memory, JSON events, broadcast) use `gale bench`; see
//! docs/benchmarks.md.
//!
//! ```sh
//! cargo run --release --example loadprobe -- idle ws://127.0.0.1:8282/ws 10000 20
//! cargo run --release --example loadprobe -- load ws://127.0.0.1:8282/ws 1000 10
//! ```
//!
//! `idle URL N SECS` opens N connections and holds them for SECS seconds.
//! `load URL N SECS` runs N connections in a closed loop for SECS seconds,
//! each sending one of 100 city names and waiting for its reply, and
//! prints replies/s and latency percentiles. Traffic goes only to the URL
//! given (use 127.0.0.0/8); every run ends by itself.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [mode, url, n, secs] => n
            .parse::<usize>()
            .ok()
            .zip(secs.parse::<u64>().ok())
            .map(|(n, secs)| (mode.clone(), url.clone(), n, Duration::from_secs(secs))),
        _ => None,
    };
    let Some((mode, url, n, secs)) = parsed else {
        eprintln!("usage: loadprobe idle|load URL CONNECTIONS SECONDS");
        return ExitCode::from(2);
    };
    match mode.as_str() {
        "idle" => idle(&url, n, secs).await,
        "load" => load(&url, n, secs).await,
        _ => {
            eprintln!("mode must be idle or load");
            ExitCode::from(2)
        }
    }
}

async fn idle(url: &str, n: usize, hold: Duration) -> ExitCode {
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => held.push(ws),
            Err(e) => {
                eprintln!("connection {i} failed: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("held {n}");
    tokio::time::sleep(hold).await;
    ExitCode::SUCCESS
}

async fn load(url: &str, n: usize, run_for: Duration) -> ExitCode {
    let end = Instant::now() + run_for;
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let Ok((mut ws, _)) = tokio_tungstenite::connect_async(&url).await else {
                return latencies;
            };
            let _greeting = ws.next().await;
            let mut k = i;
            while Instant::now() < end {
                k += 1;
                let sent = Instant::now();
                if ws
                    .send(Message::text(format!("City{}", k % 100)))
                    .await
                    .is_err()
                {
                    break;
                }
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(_))) => break,
                        Some(Ok(_)) => continue,
                        _ => return latencies,
                    }
                }
                latencies.push(sent.elapsed().as_micros() as u64);
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        if let Ok(l) = t.await {
            all.extend(l);
        }
    }
    if all.is_empty() {
        eprintln!("no replies");
        return ExitCode::FAILURE;
    }
    all.sort_unstable();
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    println!(
        "replies {} rate {:.0}/s p50 {}us p99 {}us max {}us",
        all.len(),
        all.len() as f64 / run_for.as_secs_f64(),
        at(0.5),
        at(0.99),
        all[all.len() - 1]
    );
    ExitCode::SUCCESS
}
