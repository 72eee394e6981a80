//! Multi-process runs: one machine caps open files at 20,000 per process
//! and a single generator process can saturate a core, so `--procs N`
//! starts N copies of this binary as workers, each with its own share of
//! the connections and its own block of source addresses, and merges what
//! they measured.
//!
//! The protocol between parent and worker is JSON lines on the worker's
//! stdout: optionally `{"ready":N}` once its connections are set up
//! (scenarios that need every worker in place before the next phase), then
//! exactly one report ([`Report::to_worker_json`]). A worker that printed
//! `ready` waits for its stdin to close ([`Pool::release`]) before it goes
//! on, so the parent decides when the phase ends.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Report, process_cpu};

/// Running worker processes.
#[derive(Debug)]
pub struct Pool {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    lines: mpsc::UnboundedReceiver<(usize, Value)>,
    reports: Vec<Option<Value>>,
    cpu0: Duration,
}

impl Pool {
    /// Starts one worker per argument list (arguments after the program
    /// name).
    ///
    /// # Errors
    /// A message when this program cannot be found or a worker not started.
    pub fn spawn(args: Vec<Vec<String>>) -> Result<Pool, String> {
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find this program to start workers: {e}"))?;
        let cpu0 = process_cpu();
        let (tx, lines) = mpsc::unbounded_channel();
        let mut children = Vec::with_capacity(args.len());
        let mut stdins = Vec::with_capacity(args.len());
        for (w, args) in args.into_iter().enumerate() {
            let mut child = tokio::process::Command::new(&exe)
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("cannot start worker {w}: {e}"))?;
            if let Some(stdin) = child.stdin.take() {
                stdins.push(stdin);
            }
            if let Some(stdout) = child.stdout.take() {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut lines = BufReader::new(stdout).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if let Ok(v) = serde_json::from_str::<Value>(&line) {
                            let _ = tx.send((w, v));
                        }
                    }
                });
            }
            children.push(child);
        }
        let n = children.len();
        Ok(Pool {
            children,
            stdins,
            lines,
            reports: vec![None; n],
            cpu0,
        })
    }

    /// Waits until every worker has said `ready` (or reported, or `stop`
    /// fired); returns the sum of what they said.
    pub async fn ready(&mut self, stop: &CancellationToken) -> u64 {
        let mut ready = vec![None; self.children.len()];
        while ready.iter().any(Option::is_none) {
            let line = tokio::select! {
                l = self.lines.recv() => l,
                () = stop.cancelled() => None,
            };
            let Some((w, v)) = line else { break };
            if let Some(n) = v["ready"].as_u64() {
                ready[w] = Some(n);
            } else {
                // Reported early (it failed or was stopped): not coming.
                ready[w] = Some(v["connected"].as_u64().unwrap_or(0));
                self.reports[w] = Some(v);
            }
        }
        ready.into_iter().flatten().sum()
    }

    /// Lets workers waiting after `ready` go on.
    pub fn release(&mut self) {
        self.stdins.clear();
    }

    /// Waits for every worker's report and merges them into one.
    /// Returns the merged report, the workers' reports as they sent them
    /// (for scenario-specific fields), and one message per worker that
    /// gave none.
    pub async fn finish(mut self, scenario: &'static str) -> (Report, Vec<Value>, Vec<String>) {
        self.release();
        while self.reports.iter().any(Option::is_none) {
            let Some((w, v)) = self.lines.recv().await else {
                break; // every worker's stdout is closed
            };
            if v.get("ready").is_none() {
                self.reports[w] = Some(v);
            }
        }
        let mut total = Report::new(scenario);
        let mut problems = Vec::new();
        for (w, report) in self.reports.iter().enumerate() {
            let merged = report
                .as_ref()
                .ok_or_else(|| "no report".to_owned())
                .and_then(|v| total.absorb_worker_json(v));
            if let Err(e) = merged {
                problems.push(format!("worker {w}: {e}"));
            }
        }
        for mut child in self.children {
            let _ = child.wait().await;
        }
        total.add_cpu(process_cpu().saturating_sub(self.cpu0));
        (
            total,
            self.reports.into_iter().flatten().collect(),
            problems,
        )
    }
}

/// In a worker: says `ready` to the parent with `n`, then waits until the
/// parent releases it (closes stdin), at most `limit`.
pub async fn worker_ready(n: u64, limit: Duration) {
    println!("{}", serde_json::json!({ "ready": n }));
    let wait = async {
        let mut buf = [0_u8; 64];
        let mut stdin = tokio::io::stdin();
        while let Ok(read) = stdin.read(&mut buf).await {
            if read == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(limit, wait).await;
}

/// Splits `total` as evenly as it goes: the share of worker `w` of `procs`.
pub fn share(total: usize, procs: usize, w: usize) -> usize {
    total / procs.max(1) + usize::from(w < total % procs.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up() {
        for (total, procs) in [(10, 3), (19_000, 4), (1, 2), (0, 2)] {
            let sum: usize = (0..procs).map(|w| share(total, procs, w)).sum();
            assert_eq!(sum, total);
        }
    }
}
