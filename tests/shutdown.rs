//! Clean shutdown: in-flight lookups are answered, every client gets close
//! 1001, and every answered request is in the database afterwards.

mod common;

use std::time::Duration;

use common::{WriteLock, count_rows, http_get, start_with};

#[tokio::test]
async fn in_flight_lookups_are_answered_then_clients_get_1001() {
    let mut server = start_with(|c| c.server.shutdown_grace_ms = 5_000).await;
    server.fake.set_latency(Duration::from_millis(600));
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(server.client().await);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(&format!("Late{i}")).await;
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    server.shutdown.cancel();

    for (i, c) in clients.iter_mut().enumerate() {
        let reply = c.recv_json().await;
        assert_eq!(reply["type"], "weather", "{reply}");
        assert_eq!(reply["city"], format!("Late{i}"));
        assert_eq!(u16::from(c.expect_close().await.code), 1001);
    }
    server.stop().await.expect("clean exit");
    for c in &clients {
        assert_eq!(count_rows(&server.store_url, &c.client_id).await, 1);
    }
    // The listener is closed.
    assert!(http_get(server.addr, "/healthz").await.is_none());
}

#[tokio::test]
async fn shutdown_drains_the_request_log() {
    let mut server = start_with(|c| {
        c.store.workers = 2;
        c.store.batch_size = 10;
        c.server.shutdown_grace_ms = 5_000;
    })
    .await;
    let mut c = server.client().await;
    // Rows pile up in the queue while the database is busy.
    let lock = WriteLock::take(&server).await;
    for i in 0..100 {
        assert_eq!(c.ask(&format!("Drain{i}")).await["type"], "weather");
    }
    let queued = server.metric("db-queued").await;
    assert_eq!(queued, 100);
    assert!(
        server.metric("db-completed").await < 100,
        "rows are still queued"
    );

    // The client answers the server's close at once, so `run` reaches the
    // drain quickly; the database stays busy for a while after that.
    let client_id = c.client_id.clone();
    let closer = tokio::spawn(async move { u16::from(c.expect_close().await.code) });
    let unlock = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        lock.release().await;
    });
    server.stop().await.expect("clean exit");
    // Counted the moment `run` returns: in the binary the process exits
    // right after, so rows written later would be lost.
    assert_eq!(
        count_rows(&server.store_url, &client_id).await,
        100,
        "every answered request is in the database when run returns"
    );
    assert_eq!(closer.await.expect("closer"), 1001);
    unlock.await.expect("unlock task");
}

#[tokio::test]
async fn queued_events_finish_and_new_ones_are_refused_during_shutdown() {
    let mut server = start_with(|c| {
        c.router.workers = 1;
        c.server.shutdown_grace_ms = 5_000;
    })
    .await;
    server.fake.set_latency(Duration::from_millis(300));
    let mut c = server.client().await;
    for i in 0..3 {
        c.send(&format!(
            r#"{{"event":"weather.get","data":{{"city":"Q{i}"}},"ref":"q{i}"}}"#
        ))
        .await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.send(r#"{"event":"server.stats","ref":"late"}"#).await;

    let mut replies = std::collections::HashMap::new();
    for _ in 0..4 {
        let r = c.recv_json().await;
        replies.insert(r["reply"].as_str().expect("reply").to_owned(), r);
    }
    for i in 0..3 {
        assert_eq!(
            replies[&format!("q{i}")]["ok"],
            true,
            "queued work finished"
        );
    }
    assert_eq!(replies["late"]["error"]["code"], "system_overloaded");
    assert_eq!(u16::from(c.expect_close().await.code), 1001);
    server.stop().await.expect("clean exit");
}

#[tokio::test]
async fn without_a_spill_rows_the_drain_cannot_write_are_counted_and_fail_the_exit() {
    let mut server = start_with(|c| {
        c.store.spill_dir = String::new();
        c.store.workers = 1;
        c.server.shutdown_grace_ms = 1_000;
    })
    .await;
    let mut c = server.client().await;
    // The database stays locked through the whole drain.
    let lock = WriteLock::take(&server).await;
    for i in 0..20 {
        assert_eq!(c.ask(&format!("Lost{i}")).await["type"], "weather");
    }
    let client_id = c.client_id.clone();
    let closer = tokio::spawn(async move { c.expect_close().await });
    let result = server.stop().await;
    let err = result.expect_err("a shutdown that lost rows is not a clean exit");
    assert!(
        err.to_string().contains("20 request-log rows"),
        "names what was lost: {err}"
    );
    let m = server.app.metrics.to_json();
    assert_eq!(m["db-abandoned"], 20, "counted");
    assert_eq!(m["db-completed"], 0);
    closer.await.expect("closed");
    // The abandoned insert was waiting on SQLite's 5 s busy timeout: let
    // it fail before the lock goes, so nothing lands after being counted.
    tokio::time::sleep(Duration::from_secs(6)).await;
    lock.release().await;
    assert_eq!(count_rows(&server.store_url, &client_id).await, 0);
}
