//! The request log: one row per request in SQLite and PostgreSQL, batched
//! inserts, and the queue-full policy (drop, count, never delay replies).

mod common;

use std::time::Duration;

use common::{Client, WriteLock, count_rows, postgres_url, rows_for, start_with};

/// Asks for a good, an unknown and an invalid city and checks the rows.
async fn every_request_becomes_one_row(store_url: Option<String>) {
    let server = start_with(|c| {
        if let Some(url) = store_url {
            c.store.url = url;
        }
    })
    .await;
    let mut c = server.client().await;
    let ok = c.ask("Dublin").await;
    assert_eq!(ok["type"], "weather");
    assert_eq!(c.ask("Atlantis").await["code"], "not_found");
    assert_eq!(c.ask("").await["code"], "invalid_data");
    server.wait_metric("db-completed", 3).await;

    let rows = rows_for(&server.store_url, &c.client_id).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    let (city, okay, temp, err, latency) = &rows[0];
    assert_eq!((city.as_str(), *okay, err), ("Dublin", true, &None));
    assert_eq!(
        *temp,
        ok["temperature"].as_f64(),
        "the temperature sent is stored"
    );
    assert!(*latency >= 0);
    assert_eq!(rows[1].0, "Atlantis");
    assert!(!rows[1].1);
    assert_eq!(rows[1].2, None);
    assert_eq!(rows[1].3.as_deref(), Some("not_found"));
    assert_eq!(rows[2].3.as_deref(), Some("invalid_data"));
}

#[tokio::test]
async fn sqlite_every_request_becomes_one_row() {
    every_request_becomes_one_row(None).await;
}

#[tokio::test]
async fn postgres_every_request_becomes_one_row() {
    let url = postgres_url().await;
    every_request_becomes_one_row(Some(url)).await;
}

/// A server with a queue of 3 rows and one writer writing one row at a
/// time, its database locked, asked 30 cities: every reply comes at once.
/// Returns the server, the client and the lock.
async fn thirty_rows_into_a_full_queue(spill: bool) -> (common::TestServer, Client, WriteLock) {
    let server = start_with(|c| {
        if !spill {
            c.store.spill_dir = String::new();
        }
        c.store.queue_size = 3;
        c.store.workers = 1;
        c.store.batch_size = 1;
    })
    .await;
    let mut c = server.client().await;
    let lock = WriteLock::take(&server).await;
    let started = std::time::Instant::now();
    for i in 0..30 {
        assert_eq!(c.ask(&format!("Stuck{i}")).await["type"], "weather");
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "replies never wait for the database"
    );
    (server, c, lock)
}

#[tokio::test]
async fn without_a_spill_a_full_queue_drops_and_counts_rows_without_delaying_replies() {
    let (server, c, lock) = thirty_rows_into_a_full_queue(false).await;
    let m = server.metrics().await;
    let queued = m["db-queued"].as_u64().expect("n");
    let dropped = m["db-dropped"].as_u64().expect("n");
    assert_eq!(queued + dropped, 30, "{m}");
    assert!(dropped >= 25, "queue of 3 + one batch in hand: {m}");

    lock.release().await;
    server.wait_metric("db-completed", queued).await;
    assert_eq!(
        count_rows(&server.store_url, &c.client_id).await,
        queued as i64
    );
}

#[tokio::test]
async fn rows_are_inserted_in_batches() {
    let server = start_with(|c| {
        c.store.workers = 1;
        c.store.batch_size = 100;
    })
    .await;
    let mut c = server.client().await;
    let lock = WriteLock::take(&server).await;
    for i in 0..200 {
        c.ask(&format!("Batch{i}")).await;
    }
    lock.release().await;
    server.wait_metric("db-completed", 200).await;
    assert_eq!(count_rows(&server.store_url, &c.client_id).await, 200);

    let (_, text) = server.get("/metrics").await.expect("metrics");
    let inserts: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("gale_db_batch_rows_count "))
        .and_then(|v| v.trim().parse().ok())
        .expect("batch count metric");
    assert!(
        inserts <= 5,
        "200 rows in {inserts} inserts; expected a few batches"
    );
}

#[tokio::test]
async fn without_a_spill_database_errors_are_retried_until_the_database_recovers() {
    let server = start_with(|c| {
        c.store.spill_dir = String::new();
        c.store.workers = 1;
    })
    .await;
    let mut c = server.client().await;
    // Longer than SQLite's 5 s busy timeout: the first insert fails and is
    // retried with backoff.
    let lock = WriteLock::take(&server).await;
    c.ask("Retry").await;
    tokio::time::sleep(Duration::from_millis(5_600)).await;
    lock.release().await;
    server.wait_metric("db-completed", 1).await;
    assert_eq!(server.metric("db-failed").await, 0);
    let (_, text) = server.get("/metrics").await.expect("metrics");
    assert!(
        text.contains("gale_db_insert_errors_total 1")
            || text.contains("gale_db_insert_errors_total 2"),
        "the failed attempt was counted:\n{text}"
    );
    assert_eq!(count_rows(&server.store_url, &c.client_id).await, 1);
}

/// Five writers share SQLite's two connections. With the database locked
/// past its 5 s busy timeout, the writers that got a connection fail and
/// retry while the others wait their turn for one; once it is free every
/// row is written, and written once.
#[tokio::test]
async fn five_writers_on_two_sqlite_connections_write_every_row_once_after_a_lock() {
    let server = start_with(|c| {
        c.store.spill_dir = String::new();
        c.store.workers = 5;
        c.store.batch_size = 1;
    })
    .await;
    let mut c = server.client().await;
    let lock = WriteLock::take(&server).await;
    for i in 0..10 {
        assert_eq!(c.ask(&format!("Locked{i}")).await["type"], "weather");
    }
    tokio::time::sleep(Duration::from_millis(6_000)).await;
    lock.release().await;
    server.wait_metric("db-completed", 10).await;
    assert_eq!(server.metric("db-failed").await, 0);
    let mut cities: Vec<String> = rows_for(&server.store_url, &c.client_id)
        .await
        .into_iter()
        .map(|r| r.0)
        .collect();
    cities.sort();
    let mut asked: Vec<String> = (0..10).map(|i| format!("Locked{i}")).collect();
    asked.sort();
    assert_eq!(cities, asked, "each row once");
}

#[tokio::test]
async fn postgres_batches_from_many_clients() {
    let url = postgres_url().await;
    let server = start_with(|c| c.store.url = url).await;
    let mut clients: Vec<Client> = Vec::new();
    for _ in 0..10 {
        clients.push(server.client().await);
    }
    for round in 0..20 {
        for c in &mut clients {
            c.send(&format!("Pg{round}")).await;
        }
    }
    for c in &mut clients {
        for _ in 0..20 {
            c.recv_json().await;
        }
    }
    server.wait_metric("db-completed", 200).await;
    for c in &clients {
        assert_eq!(count_rows(&server.store_url, &c.client_id).await, 20);
    }
}

/// Sends `good` clients a cached city and one client `bad`, all within
/// one batch window, and returns (good clients, the bad one).
async fn one_batch_with_a_bad_row(server: &common::TestServer, bad: &str) -> (Vec<Client>, Client) {
    // Warm the cache so every good reply is immediate.
    let mut warm = server.client().await;
    assert_eq!(warm.ask("London").await["type"], "weather");
    server.wait_metric("db-completed", 1).await;
    let mut good = Vec::new();
    for _ in 0..20 {
        good.push(server.client().await);
    }
    let mut odd = server.client().await;
    for c in &mut good {
        c.send("London").await;
    }
    odd.send(bad).await;
    for c in &mut good {
        assert_eq!(c.recv_json().await["type"], "weather");
    }
    (good, odd)
}

#[tokio::test]
async fn postgres_a_control_character_never_costs_other_rows() {
    let url = postgres_url().await;
    let server = start_with(|c| {
        c.store.url = url;
        c.store.workers = 1;
        c.store.batch_window_ms = 300;
    })
    .await;
    let (good, mut odd) = one_batch_with_a_bad_row(&server, "Lon\u{0}don").await;
    let reply = odd.recv_json().await;
    assert_eq!(reply["code"], "invalid_data", "{reply}");
    assert_eq!(
        reply["city"], "Lon\u{0}don",
        "the reply echoes what was sent"
    );

    server.wait_metric("db-completed", 22).await;
    for c in &good {
        assert_eq!(count_rows(&server.store_url, &c.client_id).await, 1);
    }
    let rows = rows_for(&server.store_url, &odd.client_id).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].0, "Lon\\u0000don", "stored in its escaped form");
    assert_eq!(rows[0].3.as_deref(), Some("invalid_data"));
    let m = server.metrics().await;
    assert_eq!(
        (m["db-failed"].as_u64(), m["db-rejected"].as_u64()),
        (Some(0), Some(0)),
        "{m}"
    );
}

#[tokio::test]
async fn a_row_the_database_refuses_is_set_aside_and_its_batch_written() {
    let server = start_with(|c| {
        c.store.workers = 1;
        c.store.batch_window_ms = 300;
    })
    .await;
    // A rule the application does not know about refuses one city, as a
    // CHECK constraint or a trigger added by a DBA would.
    let pool = sqlx::SqlitePool::connect(&server.store_url)
        .await
        .expect("open");
    sqlx::query(
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON weather_requests \
         WHEN NEW.city = 'Poison' BEGIN SELECT RAISE(ABORT, 'poisoned row'); END",
    )
    .execute(&pool)
    .await
    .expect("trigger");
    pool.close().await;

    let (good, mut odd) = one_batch_with_a_bad_row(&server, "Poison").await;
    assert_eq!(odd.recv_json().await["type"], "weather");
    server.wait_metric("db-completed", 21).await;
    server.wait_metric("db-rejected", 1).await;
    for c in &good {
        assert_eq!(count_rows(&server.store_url, &c.client_id).await, 1);
    }
    assert_eq!(count_rows(&server.store_url, &odd.client_id).await, 0);
    assert_eq!(server.metric("db-failed").await, 0);
    let (_, text) = server.get("/metrics").await.expect("metrics");
    assert!(text.contains("gale_db_rows_rejected_total 1"), "{text}");
}

#[tokio::test]
async fn postgres_a_row_postgres_refuses_does_not_take_its_batch() {
    use gale::config::StoreConfig;
    use gale::store::{Db, RequestRecord, StoreMetrics, spawn_writers};
    let url = postgres_url().await;
    let db = Db::connect(&url, 2).await.expect("connect");
    db.migrate().await.expect("migrate");
    let metrics = std::sync::Arc::new(StoreMetrics::default());
    let cfg = StoreConfig {
        workers: 1,
        batch_window_ms: 300,
        ..StoreConfig::default()
    };
    let (log, writers) = spawn_writers(db, &cfg, metrics.clone());
    let client_id = uuid::Uuid::new_v4();
    for i in 0..50 {
        // Bypasses the escaping the server applies: the raw NUL is what
        // PostgreSQL refuses in TEXT.
        let city = if i == 25 { "Bad\u{0}Row" } else { "Good" };
        assert!(log.record(RequestRecord {
            client_id,
            city: city.to_owned(),
            ok: true,
            temperature: Some(1.0),
            error: None,
            latency_ms: 1,
            created_at: chrono::Utc::now(),
        }));
    }
    writers
        .drain(Duration::from_secs(10))
        .await
        .expect("drained");
    assert_eq!(count_rows(&url, &client_id.to_string()).await, 49);
    assert_eq!(metrics.db_completed.get(), 49);
    assert_eq!(metrics.db_rejected.get(), 1);
    assert_eq!(metrics.db_failed.get(), 0);
}

#[tokio::test]
async fn postgres_notes_blocked_in_the_database_do_not_stall_the_request_log() {
    let url = postgres_url().await;
    const SECRET: &str = "store-test-secret";
    let server = start_with(|c| {
        c.store.url = url.clone();
        c.auth.jwt_secret = Some(SECRET.into());
    })
    .await;
    // Another session locks the notes table: every notes query waits,
    // holding a connection of the notes' pool.
    let mut locker = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .expect("connect");
    sqlx::query("BEGIN")
        .execute(&mut locker)
        .await
        .expect("begin");
    sqlx::query("LOCK TABLE notes IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .expect("lock");
    let user = format!("blocked-{}", uuid::Uuid::new_v4().simple());
    let token = common::hs256_token(SECRET, &user, serde_json::json!([]));
    let mut writers = Vec::new();
    for i in 0..8 {
        let mut c = server.client_with_token(&token).await;
        c.send(
            &serde_json::json!({"event":"notes.save","data":{"title":"t","content":"c"},"ref":format!("n{i}")})
                .to_string(),
        )
        .await;
        writers.push(c);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = server.client().await;
    for i in 0..10 {
        assert_eq!(c.ask(&format!("Free{i}")).await["type"], "weather");
    }
    // Written while the notes are still blocked.
    server.wait_metric("db-completed", 10).await;
    assert_eq!(count_rows(&server.store_url, &c.client_id).await, 10);
    sqlx::query("COMMIT")
        .execute(&mut locker)
        .await
        .expect("unlock");
    for (i, w) in writers.iter_mut().enumerate() {
        assert_eq!(w.reply_to(&format!("n{i}")).await["ok"], true);
    }
}

#[tokio::test]
async fn server_stats_shows_the_live_request_log_queue() {
    let server = start_with(|c| {
        c.store.workers = 1;
        c.store.batch_size = 1;
    })
    .await;
    let mut c = server.client().await;
    let lock = WriteLock::take(&server).await;
    for i in 0..10 {
        c.ask(&format!("Queued{i}")).await;
    }
    // No HTTP scrape in between: the figure must be live.
    let stats = c
        .request("server.stats", serde_json::Value::Null, "st")
        .await;
    assert_eq!(
        stats["data"]["db-queue-depth"], 9,
        "one row in hand: {stats}"
    );
    lock.release().await;
    server.wait_metric("db-completed", 10).await;
    assert_eq!(server.metric("db-queue-depth").await, 0);
}

#[tokio::test]
async fn with_a_spill_a_full_queue_loses_nothing_and_every_row_lands() {
    let (server, c, lock) = thirty_rows_into_a_full_queue(true).await;
    let m = server.metrics().await;
    assert_eq!(m["db-dropped"], 0, "{m}");
    // Queue of 3 + one row in hand; the rest overflowed to the spill.
    server
        .wait_metric("spill-rows", 30 - m["db-queued"].as_u64().expect("n"))
        .await;
    assert!(server.metric("spill-rows").await >= 25);
    assert!(server.metric("spill-bytes").await > 0);
    lock.release().await;
    server.wait_metric("spill-bytes", 0).await;
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while count_rows(&server.store_url, &c.client_id).await < 30 {
        assert!(tokio::time::Instant::now() < deadline, "rows missing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count_rows(&server.store_url, &c.client_id).await, 30);
    assert_eq!(server.metric("spill-dropped").await, 0);
}

#[tokio::test]
async fn rows_spilled_when_the_database_stays_down_through_shutdown_land_after_a_restart() {
    let configure = |c: &mut gale::config::Config| {
        c.store.workers = 1;
        c.server.shutdown_grace_ms = 1_000;
    };
    let mut server = start_with(configure).await;
    let mut c = server.client().await;
    // Longer than SQLite's 5 s busy timeout: the first insert fails, the
    // database is taken to be down, and everything after goes to the
    // spill.
    let lock = WriteLock::take(&server).await;
    c.ask("Down0").await;
    server.wait_metric("spill-rows", 1).await;
    for i in 1..20 {
        assert_eq!(c.ask(&format!("Down{i}")).await["type"], "weather");
    }
    let client_id = c.client_id.clone();
    let closer = tokio::spawn(async move { c.expect_close().await });
    server
        .stop()
        .await
        .expect("nothing lost: a clean exit though the database is down");
    closer.await.expect("closed");
    let m = server.app.metrics.to_json();
    assert_eq!(m["spill-rows"], 20);
    assert_eq!(
        m["db-abandoned"].as_u64().expect("a count") + m["db-dropped"].as_u64().expect("a count"),
        0
    );
    lock.release().await;
    assert_eq!(count_rows(&server.store_url, &client_id).await, 0);

    // The next start finds the spill and replays it.
    let dir = std::mem::replace(&mut server.dir, tempfile::tempdir().expect("tmp"));
    let again = common::start_in(dir, configure).await;
    again.wait_metric("spill-replayed", 20).await;
    assert_eq!(count_rows(&again.store_url, &client_id).await, 20);
    assert_eq!(again.metric("spill-bytes").await, 0);
}

/// PostgreSQL keeps the request log's inserts prepared (in the database),
/// each connection at most sixteen batch shapes: a hundred, sqlx's
/// default, of ~80 KiB statements each had added up.
#[tokio::test]
async fn postgres_keeps_at_most_sixteen_batch_shapes_prepared() {
    let db = gale_store::Db::connect(&postgres_url().await, 1)
        .await
        .expect("open");
    db.migrate().await.expect("migrate");
    for size in 1..=40 {
        let rows: Vec<_> = (0..size)
            .map(|n| gale_store::RequestRecord {
                client_id: uuid::Uuid::new_v4(),
                city: format!("City{n}"),
                ok: true,
                temperature: Some(1.0),
                error: None,
                latency_ms: n,
                created_at: chrono::Utc::now(),
            })
            .collect();
        db.insert_requests(&rows, Duration::from_secs(5))
            .await
            .expect("insert");
    }
    let gale_store::Db::Postgres(pool) = &db else {
        unreachable!("opened as PostgreSQL")
    };
    let conn = pool.acquire().await.expect("the pool's one connection");
    assert_eq!(sqlx::Connection::cached_statements_size(&*conn), 16);
}
