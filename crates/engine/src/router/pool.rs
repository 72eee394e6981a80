//! The worker pool: a fixed set of tasks running handlers from one bounded
//! queue with three priority lanes. Under load, high runs before normal
//! before low. Past `alert_threshold` of `queue_size` a warning is logged
//! (rate-limited) and counted; past `drop_threshold` new work is refused at
//! once. Submitting never waits, so a connection's read loop never blocks
//! on the pool.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::config::{Priority, RouterConfig};
use crate::metrics::Metrics;

/// Why work was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue is past its drop threshold.
    Overloaded,
    /// The pool is shutting down.
    Closed,
}

struct Inner<T> {
    lanes: Mutex<[VecDeque<T>; 3]>,
    ready: Semaphore,
    drop_at: usize,
    alert_at: usize,
    closed: AtomicBool,
    next_alert_ms: AtomicU64,
    started: Instant,
    metrics: Arc<Metrics>,
}

/// A pool running `T`s with `run`.
pub struct Pool<T> {
    inner: Arc<Inner<T>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    size: usize,
}

impl<T> std::fmt::Debug for Pool<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static> Pool<T> {
    /// Starts `cfg.workers` workers, each calling `run` for one item at a
    /// time.
    pub fn start<F, Fut>(cfg: &RouterConfig, metrics: Arc<Metrics>, run: F) -> Pool<T>
    where
        F: Fn(T) -> Fut + Send + Sync + Clone + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let threshold = |f: f64| ((cfg.queue_size as f64 * f).ceil() as usize).max(1);
        let inner = Arc::new(Inner {
            lanes: Mutex::new([VecDeque::new(), VecDeque::new(), VecDeque::new()]),
            ready: Semaphore::new(0),
            drop_at: threshold(cfg.drop_threshold),
            alert_at: threshold(cfg.alert_threshold),
            closed: AtomicBool::new(false),
            next_alert_ms: AtomicU64::new(0),
            started: Instant::now(),
            metrics,
        });
        let workers = (0..cfg.workers)
            .map(|_| {
                let inner = inner.clone();
                let run = run.clone();
                tokio::spawn(async move {
                    loop {
                        match inner.ready.acquire().await {
                            Ok(permit) => permit.forget(),
                            Err(_) => return,
                        }
                        let Some(item) = inner.pop() else {
                            if inner.closed.load(Ordering::Acquire) {
                                return;
                            }
                            continue;
                        };
                        run(item).await;
                    }
                })
            })
            .collect();
        Pool {
            inner,
            workers: Mutex::new(workers),
            size: cfg.workers,
        }
    }

    /// Queues `item` at `priority`, or refuses it at once.
    ///
    /// # Errors
    /// [`Refused`] with the item when the pool is closed or past its drop
    /// threshold.
    pub fn submit(&self, priority: Priority, item: T) -> Result<(), (Refused, T)> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err((Refused::Closed, item));
        }
        let depth = {
            let mut lanes = inner.lanes.lock().unwrap_or_else(|p| p.into_inner());
            let depth: usize = lanes.iter().map(VecDeque::len).sum();
            if depth >= inner.drop_at {
                return Err((Refused::Overloaded, item));
            }
            lanes[priority as usize].push_back(item);
            depth + 1
        };
        inner.metrics.router_queue_depth.set(depth as i64);
        if depth >= inner.alert_at {
            inner.alert(depth);
        }
        inner.ready.add_permits(1);
        Ok(())
    }

    /// Items waiting now.
    pub fn depth(&self) -> usize {
        self.inner.depth()
    }

    /// The depth at which new work is refused.
    pub fn drop_at(&self) -> usize {
        self.inner.drop_at
    }

    /// Refuses new work; workers finish what is queued, then stop. Waits
    /// for them at most `deadline`; returns whether they all finished.
    pub async fn drain(&self, deadline: Duration) -> bool {
        self.inner.closed.store(true, Ordering::Release);
        // One wake-up per worker so each sees the closed flag once the
        // queue is empty.
        self.inner.ready.add_permits(self.size);
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        let all = futures_util::future::join_all(workers);
        tokio::time::timeout(deadline, all).await.is_ok()
    }
}

impl<T> Inner<T> {
    fn pop(&self) -> Option<T> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        let item = lanes.iter_mut().find_map(VecDeque::pop_front);
        let depth: usize = lanes.iter().map(VecDeque::len).sum();
        drop(lanes);
        self.metrics.router_queue_depth.set(depth as i64);
        item
    }

    fn depth(&self) -> usize {
        let lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        lanes.iter().map(VecDeque::len).sum()
    }

    /// Counts every crossing; logs at most every 5 s.
    fn alert(&self, depth: usize) {
        self.metrics.router_queue_alerts.inc();
        let now = self.started.elapsed().as_millis() as u64;
        let next = self.next_alert_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_alert_ms
                .compare_exchange(next, now + 5_000, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                depth,
                drop_at = self.drop_at,
                "router queue above its alert threshold"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(workers: usize, queue_size: usize) -> RouterConfig {
        RouterConfig {
            workers,
            queue_size,
            alert_threshold: 0.5,
            drop_threshold: 1.0,
            ..RouterConfig::default()
        }
    }

    #[tokio::test]
    async fn higher_priority_runs_first_when_saturated() {
        let done = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(tokio::sync::Notify::new());
        let (d, g) = (done.clone(), gate.clone());
        let pool = Pool::start(
            &cfg(1, 100),
            Arc::new(Metrics::new()),
            move |name: &'static str| {
                let (d, g) = (d.clone(), g.clone());
                async move {
                    if name == "blocker" {
                        g.notified().await;
                    }
                    d.lock().expect("lock").push(name);
                }
            },
        );
        pool.submit(Priority::Normal, "blocker").expect("queued");
        tokio::time::sleep(Duration::from_millis(20)).await; // the worker is busy now
        for (p, name) in [
            (Priority::Low, "low"),
            (Priority::Normal, "normal"),
            (Priority::High, "high"),
            (Priority::Low, "low2"),
        ] {
            pool.submit(p, name).expect("queued");
        }
        gate.notify_one();
        assert!(pool.drain(Duration::from_secs(5)).await);
        assert_eq!(
            *done.lock().expect("lock"),
            ["blocker", "high", "normal", "low", "low2"]
        );
    }

    #[tokio::test]
    async fn past_the_drop_threshold_work_is_refused_and_counted_alerts() {
        let metrics = Arc::new(Metrics::new());
        let gate = Arc::new(tokio::sync::Notify::new());
        let g = gate.clone();
        let mut c = cfg(1, 4);
        c.drop_threshold = 0.75; // 3 waiting at most
        let pool = Pool::start(&c, metrics.clone(), move |_: u32| {
            let g = g.clone();
            async move { g.notified().await }
        });
        pool.submit(Priority::Normal, 0)
            .expect("taken by the worker");
        tokio::time::sleep(Duration::from_millis(20)).await;
        for i in 1..=3 {
            pool.submit(Priority::Normal, i).expect("queued");
        }
        assert_eq!(
            pool.submit(Priority::High, 9).map_err(|e| e.0),
            Err(Refused::Overloaded)
        );
        assert!(metrics.router_queue_alerts.get() >= 1);
        for _ in 0..4 {
            gate.notify_one();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(pool.drain(Duration::from_secs(5)).await);
        assert_eq!(
            pool.submit(Priority::High, 10).map_err(|e| e.0),
            Err(Refused::Closed)
        );
    }
}
