//! The two database backends behind one small type. The writer pipeline
//! (queue, batching, retries) is shared; only the SQL dialect differs.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Postgres, QueryBuilder, Sqlite};

use super::{RequestRecord, StoreError};

const INSERT: &str = "INSERT INTO weather_requests \
    (client_id, city, ok, temperature, error, latency_ms, created_at) ";

/// Prepared statements each connection keeps (sqlx's default is 100).
/// Every batch size of the request log's insert is its own SQL text, and a
/// prepared 500-row insert holds ~80 KiB: under a varying load the default
/// cache filled with a hundred sizes per connection, 29 MiB of the soak's
/// heap. Sixteen keep the common sizes (full batches under load) and the
/// notes queries. On SQLite the request log's inserts are not kept
/// (`insert_requests`): only each connection's last one stays compiled.
const STATEMENT_CACHE: usize = 16;

/// An open database: SQLite or PostgreSQL.
#[derive(Debug, Clone)]
pub enum Db {
    /// A SQLite file (WAL mode).
    Sqlite(SqlitePool),
    /// A PostgreSQL server.
    Postgres(PgPool),
}

/// Checks that a store URL names a supported database.
///
/// # Errors
/// A message saying what is wrong.
pub fn check_url(url: &str) -> Result<(), String> {
    if url.starts_with("sqlite:") {
        SqliteConnectOptions::from_str(url)
            .map(drop)
            .map_err(|e| format!("{url:?}: {e}"))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        PgConnectOptions::from_str(url)
            .map(drop)
            .map_err(|e| format!("{}: {e}", redact(url)))
    } else {
        Err(format!(
            "{:?} is not supported: use sqlite://FILE or postgres://USER@HOST/DB",
            redact(url)
        ))
    }
}

/// The URL with any password replaced, for messages and logs.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// Whether the database refused `e`'s statement because of what a row
/// holds, so that retrying the same rows cannot succeed: PostgreSQL's data
/// exceptions (SQLSTATE class 22, e.g. NUL in `TEXT`) and integrity
/// violations (class 23); SQLite's constraint violations (including a
/// trigger's `RAISE(ABORT)`), type mismatches and oversized values.
/// Everything else (connection lost, pool timeout, database locked, disk
/// full) may pass on a retry.
pub(super) fn refuses_row(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(e) = e else {
        return false;
    };
    let Some(code) = e.code() else {
        return false;
    };
    if e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .is_some()
    {
        return code.starts_with("22") || code.starts_with("23");
    }
    // SQLite reports its extended result code; the primary code is the
    // low byte. 18 TOOBIG, 19 CONSTRAINT, 20 MISMATCH.
    code.parse::<i32>()
        .is_ok_and(|c| matches!(c & 0xff, 18..=20))
}

impl Db {
    /// Opens a pool of at most `max_connections`.
    ///
    /// # Errors
    /// [`StoreError::Connect`] when the database cannot be opened.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Db, StoreError> {
        Self::open(url, max_connections, false).await
    }

    /// A pool that connects on first use: for starting while the database
    /// is down.
    ///
    /// # Errors
    /// [`StoreError::Connect`] when the URL cannot be used at all.
    pub async fn connect_lazy(url: &str, max_connections: u32) -> Result<Db, StoreError> {
        Self::open(url, max_connections, true).await
    }

    async fn open(url: &str, max_connections: u32, lazy: bool) -> Result<Db, StoreError> {
        let err = |source| StoreError::Connect {
            url: redact(url),
            source,
        };
        let max = max_connections.max(1);
        if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)
                .map_err(err)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(5))
                .statement_cache_capacity(STATEMENT_CACHE)
                // sqlx would log each slow statement whole: thousands of
                // placeholders per batch. The writers report slow batches
                // themselves, in one line.
                .disable_statement_logging();
            // A writer waits here while the others' inserts (15 s at most
            // each, 5 s of it on the database's lock) hold the log's
            // connections: longer than PostgreSQL's wait, which is for a
            // connection per writer.
            let pool = SqlitePoolOptions::new()
                .max_connections(max)
                .acquire_timeout(Duration::from_secs(30));
            let pool = if lazy {
                pool.connect_lazy_with(opts)
            } else {
                pool.connect_with(opts).await.map_err(err)?
            };
            Ok(Db::Sqlite(pool))
        } else {
            let opts = PgConnectOptions::from_str(url)
                .map_err(err)?
                .statement_cache_capacity(STATEMENT_CACHE)
                .disable_statement_logging();
            let pool = PgPoolOptions::new()
                .max_connections(max)
                .acquire_timeout(Duration::from_secs(5));
            let pool = if lazy {
                pool.connect_lazy_with(opts)
            } else {
                pool.connect_with(opts).await.map_err(err)?
            };
            Ok(Db::Postgres(pool))
        }
    }

    /// Brings the schema up to date.
    ///
    /// # Errors
    /// When a migration fails.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Db::Sqlite(pool) => sqlx::migrate!("./migrations/sqlite").run(pool).await?,
            Db::Postgres(pool) => sqlx::migrate!("./migrations/postgres").run(pool).await?,
        }
        Ok(())
    }

    /// Inserts `rows` in one statement, which has `timeout` once it has a
    /// connection: waiting for one (the writers outnumber SQLite's
    /// connections) is bounded by the pool, and does not eat into the
    /// insert's own time, so a timeout never cuts short an insert that
    /// may still land.
    ///
    /// # Errors
    /// The driver's error (a timeout as [`sqlx::Error::PoolTimedOut`]);
    /// the caller retries.
    pub async fn insert_requests(
        &self,
        rows: &[RequestRecord],
        timeout: Duration,
    ) -> Result<(), sqlx::Error> {
        if rows.is_empty() {
            return Ok(());
        }
        match self {
            Db::Sqlite(pool) => {
                let mut q = QueryBuilder::<Sqlite>::new(INSERT);
                q.push_values(rows, |mut b, r| {
                    b.push_bind(r.client_id.to_string())
                        .push_bind(r.city.clone())
                        .push_bind(r.ok)
                        .push_bind(r.temperature)
                        .push_bind(r.error)
                        .push_bind(i64::from(r.latency_ms))
                        .push_bind(r.created_at);
                });
                // Not kept prepared: on SQLite the compiled statement lives
                // in gale's own memory (~80 KiB of SQL and more of program
                // per batch size, on each of the writers' connections; only
                // the last one stays, until the next replaces it), and
                // compiling it again costs ~9 % of the log's ceiling.
                // PostgreSQL keeps its prepared statements in the database.
                let mut conn = pool.acquire().await?;
                in_time(timeout, q.build().persistent(false).execute(&mut *conn)).await?;
            }
            Db::Postgres(pool) => {
                let mut q = QueryBuilder::<Postgres>::new(INSERT);
                q.push_values(rows, |mut b, r| {
                    b.push_bind(r.client_id)
                        .push_bind(r.city.clone())
                        .push_bind(r.ok)
                        .push_bind(r.temperature)
                        .push_bind(r.error)
                        .push_bind(i32::try_from(r.latency_ms).unwrap_or(i32::MAX))
                        .push_bind(r.created_at);
                });
                let mut conn = pool.acquire().await?;
                in_time(timeout, q.build().execute(&mut *conn)).await?;
            }
        }
        Ok(())
    }

    /// One round trip to the database.
    ///
    /// # Errors
    /// The driver's error.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        match self {
            Db::Sqlite(pool) => sqlx::query("SELECT 1").execute(pool).await.map(drop),
            Db::Postgres(pool) => sqlx::query("SELECT 1").execute(pool).await.map(drop),
        }
    }

    /// Closes the pool.
    pub async fn close(&self) {
        match self {
            Db::Sqlite(pool) => pool.close().await,
            Db::Postgres(pool) => pool.close().await,
        }
    }
}

/// `fut`, or [`sqlx::Error::PoolTimedOut`] once `timeout` has passed.
async fn in_time<T>(
    timeout: Duration,
    fut: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or(Err(sqlx::Error::PoolTimedOut))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A migrated SQLite file with a pool of one connection, kept while
    /// the directory is.
    async fn sqlite() -> (tempfile::TempDir, Db, SqlitePool) {
        let tmp = tempfile::tempdir().expect("tmp");
        let url = format!("sqlite://{}", tmp.path().join("t.db").display());
        let db = Db::connect(&url, 1).await.expect("open");
        db.migrate().await.expect("migrate");
        let Db::Sqlite(pool) = &db else {
            unreachable!("opened as SQLite")
        };
        let pool = pool.clone();
        (tmp, db, pool)
    }

    /// The statements the pool's one connection keeps prepared.
    async fn cached(pool: &SqlitePool) -> usize {
        let conn = pool.acquire().await.expect("the pool's one connection");
        sqlx::Connection::cached_statements_size(&*conn)
    }

    fn row(n: u32) -> RequestRecord {
        RequestRecord {
            client_id: uuid::Uuid::new_v4(),
            city: format!("City{n}"),
            ok: true,
            temperature: Some(1.0),
            error: None,
            latency_ms: n,
            created_at: chrono::Utc::now(),
        }
    }

    #[tokio::test]
    async fn an_inserts_time_starts_once_it_has_a_connection() {
        let (_tmp, db, pool) = sqlite().await;
        // Another writer holds the only connection for 300 ms.
        let held = pool.acquire().await.expect("the pool's one connection");
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(held);
        });
        db.insert_requests(&[row(1)], Duration::from_millis(100))
            .await
            .expect("the wait for the connection is not the insert's time");
        release.await.expect("release");
    }

    #[tokio::test]
    async fn a_notes_import_keeps_none_of_its_inserts_prepared() {
        let (_tmp, db, pool) = sqlite().await;
        let before = cached(&pool).await;
        for size in [1_500, 7, 333] {
            let notes: Vec<_> = (0..size)
                .map(|n| crate::NewNote {
                    title: format!("t{n}"),
                    content: "c".to_owned(),
                    collaborators: vec!["bob".to_owned()],
                })
                .collect();
            db.import_notes("alice", &notes).await.expect("import");
        }
        assert_eq!(cached(&pool).await, before);
    }

    #[tokio::test]
    async fn sqlite_keeps_none_of_the_request_logs_inserts_prepared() {
        let (_tmp, db, pool) = sqlite().await;
        // The migrations' own statements.
        let before = cached(&pool).await;
        // Every batch size is its own statement text.
        for size in 1..=40 {
            let rows: Vec<_> = (0..size).map(row).collect();
            db.insert_requests(&rows, Duration::from_secs(5))
                .await
                .expect("insert");
        }
        assert_eq!(
            cached(&pool).await,
            before,
            "a cached 500-row insert holds ~80 KiB of SQL and more of program, in gale's memory"
        );
    }
}
