//! A fault-injecting TCP proxy: put it between gale and a dependency
//! (PostgreSQL, the weather API, Redis) or between a client and gale, then
//! change what it does while traffic flows.
//!
//! Faults apply to connections already open as well as to new ones:
//! - `Pass`: bytes flow untouched;
//! - `Refuse`: new connections are reset at once (as a dead host's port);
//!   open ones are reset too;
//! - `Reset`: open connections are reset (RST) mid-stream; new ones pass;
//! - `Stall`: nothing is forwarded either way and nothing is closed (a
//!   black hole, a half-open peer); bytes already read wait until the
//!   fault changes;
//! - `Latency(d)`: each chunk waits `d` before it is forwarded;
//! - `Bandwidth(n)`: at most `n` bytes a second each way per connection;
//! - `Garbage`: open connections are reset; new ones get random bytes
//!   back and are closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    Pass,
    Refuse,
    Reset,
    Stall,
    Latency(Duration),
    Bandwidth(u64),
    Garbage,
}

/// The current fault and how many times open connections were told to
/// reset (each connection remembers the count it started under).
#[derive(Debug, Clone, Copy)]
struct State {
    fault: Fault,
    resets: u64,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    state: watch::Sender<State>,
    accepted: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let (state, rx) = watch::channel(State {
            fault: Fault::Pass,
            resets: 0,
        });
        let stop = CancellationToken::new();
        let accepted = Arc::new(AtomicU64::new(0));
        tokio::spawn(accept_loop(
            listener,
            upstream,
            rx,
            stop.clone(),
            accepted.clone(),
        ));
        FaultProxy {
            addr,
            state,
            accepted,
            stop,
        }
    }

    /// Changes the fault; `Refuse`, `Reset` and `Garbage` also reset every
    /// open connection.
    pub fn set(&self, fault: Fault) {
        self.state.send_modify(|s| {
            s.fault = fault;
            if matches!(fault, Fault::Refuse | Fault::Reset | Fault::Garbage) {
                s.resets += 1;
            }
        });
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    state: watch::Receiver<State>,
    stop: CancellationToken,
    accepted: Arc<AtomicU64>,
) {
    loop {
        let (client, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => continue,
            },
            () = stop.cancelled() => return,
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        let now = *state.borrow();
        match now.fault {
            Fault::Refuse => {
                reset(client);
                continue;
            }
            Fault::Garbage => {
                tokio::spawn(garbage(client));
                continue;
            }
            _ => {}
        }
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                reset(client);
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let born = now.resets;
            let up = tokio::spawn(pipe(cr, sw, state.clone(), born, stop.clone()));
            let down = tokio::spawn(pipe(sr, cw, state, born, stop));
            let (a, b) = (up.await, down.await);
            // A reset ends both halves with RST: put them back together.
            if let (Ok(Some((r1, w1))), Ok(Some((r2, w2)))) = (a, b)
                && let (Ok(c), Ok(s)) = (r1.reunite(w2), r2.reunite(w1))
            {
                reset(c);
                reset(s);
            }
        });
    }
}

/// Closes with RST instead of FIN.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn garbage(mut client: TcpStream) {
    let mut junk = vec![0u8; 512];
    let mut x = 0x9e37_79b9_u32;
    for b in &mut junk {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_millis(200), client.read(&mut buf)).await;
    let _ = client.write_all(&junk).await;
    let _ = client.shutdown().await;
}

/// Forwards one direction under the current fault. Returns the halves
/// when the connection is to be reset, `None` when it ended by itself.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut state: watch::Receiver<State>,
    born: u64,
    stop: CancellationToken,
) -> Option<(
    tokio::net::tcp::OwnedReadHalf,
    tokio::net::tcp::OwnedWriteHalf,
)> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Wait while stalled; leave when told to reset.
        loop {
            let s = *state.borrow_and_update();
            if s.resets != born {
                return Some((from, to));
            }
            if s.fault != Fault::Stall {
                break;
            }
            tokio::select! {
                r = state.changed() => if r.is_err() { return None },
                () = stop.cancelled() => return None,
            }
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return None;
                }
                Ok(n) => n,
            },
            r = state.changed() => {
                if r.is_err() { return None }
                continue;
            }
            () = stop.cancelled() => return None,
        };
        // Hold the chunk while stalled, delayed or throttled.
        loop {
            let s = *state.borrow_and_update();
            if s.resets != born {
                return Some((from, to));
            }
            let wait = match s.fault {
                Fault::Stall => None,
                Fault::Latency(d) => Some(d),
                Fault::Bandwidth(rate) => {
                    Some(Duration::from_secs_f64(n as f64 / rate.max(1) as f64))
                }
                _ => Some(Duration::ZERO),
            };
            match wait {
                Some(d) => {
                    if !d.is_zero() {
                        tokio::time::sleep(d).await;
                    }
                    break;
                }
                None => {
                    tokio::select! {
                        r = state.changed() => if r.is_err() { return None },
                        () = stop.cancelled() => return None,
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return None;
        }
    }
}
