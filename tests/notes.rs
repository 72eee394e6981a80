//! Notes: saved and listed through events, persisted in SQLite and
//! PostgreSQL, pushed to collaborators, imported in bulk by admins.

mod common;

use common::{Client, TestServer, postgres_url, start_with};
use serde_json::{Value, json};

const SECRET: &str = "notes-test-secret";

async fn connect_as(server: &TestServer, sub: &str, roles: Value) -> Client {
    server
        .client_with_token(&common::hs256_token(SECRET, sub, roles))
        .await
}

/// A unique user name per run, so runs sharing a PostgreSQL database do
/// not see each other's notes.
fn unique(name: &str) -> String {
    format!("{name}-{}", uuid::Uuid::new_v4().simple())
}

async fn notes_round_trip(store_url: Option<String>) {
    let server = start_with(|c| {
        c.auth.jwt_secret = Some(SECRET.into());
        if let Some(url) = store_url {
            c.store.url = url;
        }
    })
    .await;
    let (alice, bob, carol) = (unique("alice"), unique("bob"), unique("carol"));
    let mut a = connect_as(&server, &alice, json!([])).await;
    let mut b = connect_as(&server, &bob, json!([])).await;
    let mut c = connect_as(&server, &carol, json!([])).await;

    let saved = a
        .request(
            "notes.save",
            json!({"title": " Plan ", "content": "ship it", "collaborators": [bob, bob, alice]}),
            "1",
        )
        .await;
    assert_eq!(saved["ok"], true, "{saved}");
    let note = &saved["data"];
    assert_eq!(note["title"], "Plan");
    assert_eq!(note["owner"], alice.as_str());
    let id = note["id"].as_i64().expect("id");

    let push = b.next_push().await;
    assert_eq!(push["event"], "notes.updated");
    assert_eq!(push["data"]["id"], id);

    let listed = b.request("notes.list", Value::Null, "2").await;
    let notes = listed["data"]["notes"].as_array().expect("notes");
    assert_eq!(notes.len(), 1, "shared with bob: {listed}");
    let mut shared: Vec<&str> = notes[0]["collaborators"]
        .as_array()
        .expect("collaborators")
        .iter()
        .map(|v| v.as_str().expect("str"))
        .collect();
    shared.sort_unstable();
    let mut want = vec![alice.as_str(), bob.as_str()];
    want.sort_unstable();
    assert_eq!(shared, want, "deduplicated");
    assert_eq!(
        c.request("notes.list", Value::Null, "3").await["data"]["notes"],
        json!([]),
        "not shared with carol"
    );

    // Update own note; someone else's is not found.
    let updated = a
        .request(
            "notes.save",
            json!({"id": id, "title": "Plan v2", "content": "ship it now"}),
            "4",
        )
        .await;
    assert_eq!(updated["data"]["title"], "Plan v2", "{updated}");
    let stolen = c
        .request(
            "notes.save",
            json!({"id": id, "title": "mine", "content": ""}),
            "5",
        )
        .await;
    assert_eq!(stolen["error"]["code"], "not_found", "{stolen}");
    let listed = a.request("notes.list", Value::Null, "6").await;
    assert_eq!(listed["data"]["notes"][0]["content"], "ship it now");
    assert_eq!(
        listed["data"]["notes"][0]["collaborators"],
        json!([]),
        "collaborators replaced by the update"
    );

    // Bulk import: admins only, one transaction.
    let mut admin = connect_as(&server, &unique("admin"), json!(["admin"])).await;
    let many: Vec<Value> = (0..120)
        .map(|i| json!({"title": format!("n{i}"), "content": "x"}))
        .collect();
    let refused = a.request("notes.import", json!({"notes": many}), "7").await;
    assert_eq!(refused["error"]["code"], "forbidden");
    let imported = admin
        .request("notes.import", json!({"notes": many}), "8")
        .await;
    assert_eq!(imported["data"]["imported"], 120, "{imported}");
    let listed = admin.request("notes.list", Value::Null, "9").await;
    assert_eq!(
        listed["data"]["notes"].as_array().expect("notes").len(),
        120
    );
    let again = admin
        .request("notes.import", json!({"notes": [many[0]]}), "10")
        .await;
    assert_eq!(again["error"]["code"], "rate_limited", "1/min");
}

#[tokio::test]
async fn sqlite_notes_are_saved_shared_listed_and_imported() {
    notes_round_trip(None).await;
}

#[tokio::test]
async fn postgres_notes_are_saved_shared_listed_and_imported() {
    let Some(url) = postgres_url() else {
        eprintln!("skipped: GALE_TEST_DATABASE_URL is not set");
        return;
    };
    notes_round_trip(Some(url)).await;
}

#[tokio::test]
async fn notes_need_a_user_and_valid_fields() {
    let server = start_with(|c| c.auth.jwt_secret = Some(SECRET.into())).await;
    let mut anon = server.client().await;
    let r = anon
        .request("notes.save", json!({"title": "t", "content": "c"}), "a")
        .await;
    assert_eq!(r["error"]["code"], "unauthorized");

    let mut u = connect_as(&server, &unique("val"), json!([])).await;
    for (data, field) in [
        (json!({"title": "  ", "content": "c"}), "title"),
        (json!({"title": "x".repeat(201), "content": "c"}), "title"),
        (
            json!({"title": "t", "content": "c", "collaborators": vec!["u"; 101]}),
            "collaborators",
        ),
        (
            json!({"title": "t", "content": "c", "collaborators": [""]}),
            "collaborators",
        ),
        (json!({"title": "t"}), "data"),
    ] {
        let r = u.request("notes.save", data.clone(), "v").await;
        assert_eq!(r["error"]["code"], "invalid_data", "{data}: {r}");
        assert_eq!(r["error"]["field"], field, "{data}: {r}");
    }
    let mut admin = connect_as(&server, &unique("adm"), json!(["admin"])).await;
    let r = admin
        .request(
            "notes.import",
            json!({"notes": [{"title": "ok", "content": ""}, {"title": "", "content": ""}]}),
            "i",
        )
        .await;
    assert_eq!(r["error"]["field"], "notes[1].title", "{r}");

    // 20 saves a minute per user, then rate_limited. (A fresh user: the
    // refused saves above counted too, since the rate check comes before
    // validation, in the seed's order.)
    let mut u = connect_as(&server, &unique("rate"), json!([])).await;
    for i in 0..20 {
        let r = u
            .request(
                "notes.save",
                json!({"title": "t", "content": ""}),
                &format!("s{i}"),
            )
            .await;
        assert_eq!(r["ok"], true, "{r}");
    }
    let r = u
        .request("notes.save", json!({"title": "t", "content": ""}), "s20")
        .await;
    assert_eq!(r["error"]["code"], "rate_limited");
}

#[tokio::test]
async fn a_failing_database_is_an_internal_error_without_details() {
    let server = start_with(|c| c.auth.jwt_secret = Some(SECRET.into())).await;
    let mut u = connect_as(&server, &unique("locked"), json!([])).await;
    // Another connection holds SQLite's write lock past the 5 s busy
    // timeout: the save fails inside the handler.
    let lock = common::WriteLock::take(&server).await;
    let r = u
        .request("notes.save", json!({"title": "t", "content": "c"}), "x")
        .await;
    lock.release().await;
    assert_eq!(r["error"]["code"], "internal_error", "{r}");
    let message = r["error"]["message"].as_str().expect("message");
    assert!(
        !message.contains("locked"),
        "no driver internals: {message:?}"
    );
    let r = u
        .request("notes.save", json!({"title": "t", "content": "c"}), "y")
        .await;
    assert_eq!(r["ok"], true, "works again once the database is free");
}
