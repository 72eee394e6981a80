//! Private Redis and PostgreSQL servers for the tests, started from the
//! binaries installed on the machine (`redis-server`; PostgreSQL's
//! `initdb` and `postgres`, on `PATH` or under /usr/lib/postgresql), on
//! free ports in temporary directories. Nothing here depends on a
//! service the machine may or may not run, or on a variable.
//!
//! - [`Redis::start`]: a `redis-server` of the calling test's own, killed
//!   when dropped.
//! - [`postgres`]: a fresh database on this test binary's one PostgreSQL
//!   (`initdb` once, then one `CREATE DATABASE` per call).
//!
//! A port chosen free can be taken by someone else before the server
//! binds it; a start that fails that way is retried on another port. A
//! start that fails otherwise panics with the server's own output. A
//! missing binary fails the test with one line naming the package that
//! installs it. Every server is watched by a small shell loop that kills
//! it once this test process is gone, however it ended.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a server may take to accept connections.
const START: Duration = Duration::from_secs(30);
/// Starts tried, each on another port, before giving up.
const ATTEMPTS: usize = 5;

/// A port nothing listens on now (it may be taken before it is used:
/// see the retries).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("addr").port()
}

/// Kills `pid` (with SIGKILL) once this process has exited, so no server
/// outlives an interrupted test run, then removes `cleanup`. The loop
/// ends by itself when `pid` goes first.
fn watchdog(pid: u32, cleanup: Option<&Path>) {
    let me = std::process::id();
    let rm = cleanup.map_or(String::new(), |p| format!("; rm -rf '{}'", p.display()));
    let script = format!(
        "while kill -0 {me} 2>/dev/null && kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         kill -0 {pid} 2>/dev/null && kill -9 {pid}; sleep 0.2{rm}"
    );
    let _ = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

/// The last lines of a server's log, to show why it did not start.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Whether `log` says the port was taken (someone bound it between our
/// check and the server's bind).
fn port_taken(log: &Path) -> bool {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.contains("Address already in use") || text.contains("could not bind")
}

/// Spawns `cmd` with its output to `log`, or fails the test saying how
/// to install `program`.
fn spawn(
    mut cmd: Command,
    log: &Path,
    program: &str,
    package: &str,
    cleanup: Option<&Path>,
) -> Child {
    let out = std::fs::File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    match cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn() {
        Ok(child) => {
            watchdog(child.id(), cleanup);
            child
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "{program} not found: install it with `apt-get install {package}` (the tests start private instances of it)"
        ),
        Err(e) => panic!("cannot start {program}: {e}"),
    }
}

/// Waits until `port` accepts connections, or `child` exits (Err: whether
/// because its port was taken).
fn wait_listening(child: &mut Child, port: u16, log: &Path, what: &str) -> Result<(), bool> {
    let deadline = Instant::now() + START;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return Err(port_taken(log));
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not accept connections on port {port} within {START:?}; its output:\n{}",
                tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `redis-server` of one test's own.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    extra: Vec<String>,
    dir: tempfile::TempDir,
}

impl Redis {
    /// A plain Redis, nothing kept on disk.
    pub fn start() -> Redis {
        Redis::with_args(&[])
    }

    /// A Redis with more `redis-server` arguments (e.g. cluster mode).
    pub fn with_args(extra: &[&str]) -> Redis {
        let mut r = Redis {
            port: 0,
            child: None,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        for _ in 0..ATTEMPTS {
            r.port = free_port();
            if r.try_start() {
                return r;
            }
        }
        panic!(
            "redis-server found every port taken ({ATTEMPTS} tries); its output:\n{}",
            tail(&r.log())
        );
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Starts the server on its port: true once it listens, false when
    /// the port was taken.
    fn try_start(&mut self) -> bool {
        let mut cmd = Command::new("redis-server");
        cmd.current_dir(self.dir.path())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(&self.extra);
        let log = self.log();
        let mut child = spawn(cmd, &log, "redis-server", "redis-server", None);
        match wait_listening(&mut child, self.port, &log, "redis-server") {
            Ok(()) => {
                self.child = Some(child);
                true
            }
            Err(true) => false,
            Err(false) => panic!("redis-server exited at start; its output:\n{}", tail(&log)),
        }
    }

    /// Starts it again on the same port, after [`Redis::kill`].
    pub fn restart(&mut self) {
        let deadline = Instant::now() + START;
        while !self.try_start() {
            assert!(
                Instant::now() < deadline,
                "port {} stayed taken: redis-server cannot come back on it",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills it at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `redis-cli` against it; its standard output.
    pub async fn command(&self, args: &[&str]) -> String {
        let out = tokio::process::Command::new("redis-cli")
            .arg("-p")
            .arg(self.port.to_string())
            .args(args)
            .output()
            .await
            .expect("redis-cli (package redis-tools)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// This test binary's PostgreSQL.
/// Never dropped (a static): its watchdog stops it and removes its
/// directory once the test binary exits.
struct Postgres {
    port: u16,
    _child: Child,
}

static POSTGRES: OnceLock<Postgres> = OnceLock::new();

/// Where PostgreSQL's server binaries are: beside `initdb` on `PATH`, or
/// the newest /usr/lib/postgresql/VERSION/bin.
fn postgres_bin() -> PathBuf {
    if let Ok(out) = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        && out.status.success()
    {
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let real = std::fs::canonicalize(&path).unwrap_or(path);
        if let Some(dir) = real.parent()
            && dir.join("postgres").exists()
        {
            return dir.to_owned();
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("initdb").exists() && bin.join("postgres").exists())
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL's initdb not found (on PATH or under /usr/lib/postgresql/*/bin): \
             install it with `apt-get install postgresql` (the tests start a private instance)"
        ),
    }
}

/// PostgreSQL refuses to run as root: as root, its commands run as the
/// `postgres` user (uid, gid).
fn run_as() -> Option<(u32, u32)> {
    let id = |args: &[&str]| -> Option<u32> {
        let out = Command::new("id").args(args).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    if id(&["-u"])? != 0 {
        return None;
    }
    match (id(&["-u", "postgres"]), id(&["-g", "postgres"])) {
        (Some(u), Some(g)) => Some((u, g)),
        _ => panic!(
            "the tests run as root and PostgreSQL refuses to: create a `postgres` user \
             (Debian's postgresql package does) or run the tests as another user"
        ),
    }
}

/// `program` in `bin`, run as `user` when given.
fn pg_command(bin: &Path, program: &str, user: Option<(u32, u32)>) -> Command {
    let path = bin.join(program);
    match user {
        None => Command::new(path),
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg("--clear-groups")
                .arg("--")
                .arg(path);
            c
        }
    }
}

fn start_postgres() -> Postgres {
    let bin = postgres_bin();
    let user = run_as();
    let top = tempfile::tempdir().expect("tempdir").keep();
    let data = top.join("data");
    let sockets = top.join("sockets");
    std::fs::create_dir(&sockets).expect("socket dir");
    if let Some((uid, gid)) = user {
        for p in [&top, &sockets] {
            std::os::unix::fs::chown(p, Some(uid), Some(gid)).expect("chown to postgres");
        }
    }
    let log = top.join("postgres.log");
    let init = pg_command(&bin, "initdb", user)
        .args(["-D"])
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run initdb");
    assert!(
        init.status.success(),
        "initdb failed: {}{}",
        String::from_utf8_lossy(&init.stdout),
        String::from_utf8_lossy(&init.stderr)
    );
    for _ in 0..ATTEMPTS {
        let port = free_port();
        let mut cmd = pg_command(&bin, "postgres", user);
        cmd.arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&sockets)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "max_connections=400", "-c", "shared_buffers=32MB"])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"]);
        let mut child = spawn(cmd, &log, "postgres", "postgresql", Some(&top));
        match wait_listening(&mut child, port, &log, "postgres") {
            Ok(()) => {
                return Postgres {
                    port,
                    _child: child,
                };
            }
            Err(true) => continue,
            Err(false) => panic!("postgres exited at start; its output:\n{}", tail(&log)),
        }
    }
    panic!(
        "postgres found every port taken; its output:\n{}",
        tail(&log)
    )
}

/// A URL to a new, empty database on this test binary's private
/// PostgreSQL (started by the first call).
pub async fn postgres() -> String {
    use sqlx::Connection;
    let port = tokio::task::spawn_blocking(|| POSTGRES.get_or_init(start_postgres).port)
        .await
        .expect("postgres start");
    let name = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let admin = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    // The server accepts TCP a moment before it accepts logins.
    let deadline = Instant::now() + START;
    let mut conn = loop {
        match sqlx::PgConnection::connect(&admin).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "postgres never took a login: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create the test's database");
    format!("postgres://postgres@127.0.0.1:{port}/{name}")
}
