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
    let url = postgres_url().await;
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

/// Reads every page of `notes.list` for `c`: (pages, notes in order).
async fn list_all(c: &mut Client) -> (Vec<Value>, Vec<Value>) {
    let (mut pages, mut notes) = (Vec::new(), Vec::new());
    let mut before = Value::Null;
    loop {
        let data = if before.is_null() {
            Value::Null
        } else {
            json!({ "before": before })
        };
        let r = c
            .request("notes.list", data, &format!("p{}", pages.len()))
            .await;
        assert_eq!(r["ok"], true, "{r}");
        notes.extend(
            r["data"]["notes"]
                .as_array()
                .expect("notes")
                .iter()
                .cloned(),
        );
        before = r["data"]["next"].clone();
        pages.push(r);
        if before.is_null() {
            return (pages, notes);
        }
        assert!(pages.len() < 50, "paging never ends");
    }
}

async fn large_notes_and_long_lists(store_url: Option<String>) {
    let server = start_with(|c| {
        c.auth.jwt_secret = Some(SECRET.into());
        c.events.entry("notes.save".into()).or_default().rate_limit = Some("off".into());
        if let Some(url) = store_url {
            c.store.url = url;
        }
    })
    .await;
    let limit = server.app.config.server.max_outbound_message_bytes;
    let (alice, bob) = (unique("alice"), unique("bob"));
    let mut a = connect_as(&server, &alice, json!(["admin"])).await;
    let mut b = connect_as(&server, &bob, json!([])).await;

    // A few hundred notes: one list reply of ~100 KB.
    let many: Vec<Value> = (0..300)
        .map(|i| json!({"title": format!("n{i}"), "content": "y".repeat(250)}))
        .collect();
    let r = a
        .request("notes.import", json!({"notes": many}), "imp")
        .await;
    assert_eq!(r["data"]["imported"], 300, "{r}");
    let (pages, listed) = list_all(&mut a).await;
    assert_eq!((pages.len(), listed.len()), (1, 300));

    // Notes of the documented maximum, 100,000 bytes, shared with bob: every
    // push reaches him, and his connection stays open.
    for i in 0..12 {
        let content = format!("{i:02}").repeat(50_000);
        let r = a
            .request(
                "notes.save",
                json!({"title": format!("big{i}"), "content": content, "collaborators": [bob]}),
                &format!("big{i}"),
            )
            .await;
        assert_eq!(r["ok"], true, "{}", r["error"]);
        let push = b.next_push().await;
        assert_eq!(push["event"], "notes.updated");
        assert_eq!(
            push["data"]["content"].as_str().map(str::len),
            Some(100_000)
        );
    }

    // 312 notes, 1.3 MB of them: pages that each fit the outbound limit,
    // newest first, every note exactly once.
    let (pages, listed) = list_all(&mut a).await;
    assert!(pages.len() >= 2, "{} pages", pages.len());
    for p in &pages {
        assert!(p.to_string().len() <= limit, "a page within {limit} bytes");
    }
    assert_eq!(listed.len(), 312);
    let mut ids: Vec<i64> = listed
        .iter()
        .map(|n| n["id"].as_i64().expect("id"))
        .collect();
    assert_eq!(listed[0]["title"], "big11", "newest first");
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 312, "no note twice");
    let (_, shared) = list_all(&mut b).await;
    assert_eq!(shared.len(), 12);

    let r = b
        .request("notes.list", json!({"before": "not a cursor"}), "bad")
        .await;
    assert_eq!(r["error"]["field"], "before", "{r}");
    let r = b.request("server.stats", Value::Null, "alive").await;
    assert_eq!(r["ok"], true, "bob's connection survived: {r}");
}

#[tokio::test]
async fn sqlite_large_notes_and_long_lists_reach_their_readers() {
    large_notes_and_long_lists(None).await;
}

#[tokio::test]
async fn postgres_large_notes_and_long_lists_reach_their_readers() {
    let url = postgres_url().await;
    large_notes_and_long_lists(Some(url)).await;
}

async fn imports_attach_collaborators_to_the_right_notes(store_url: Option<String>) {
    let server = start_with(|c| {
        c.auth.jwt_secret = Some(SECRET.into());
        c.server.max_message_bytes = 1 << 20;
        if let Some(url) = store_url {
            c.store.url = url;
        }
    })
    .await;
    let readers: Vec<String> = (0..3).map(|i| unique(&format!("reader{i}"))).collect();
    // 2,500 notes: several insert statements; every 7th shared with one
    // of three readers, picked by its number.
    let notes: Vec<Value> = (0..2_500)
        .map(|i| {
            let shared: Vec<&String> = if i % 7 == 0 {
                vec![&readers[i % 3]]
            } else {
                vec![]
            };
            json!({"title": format!("imp{i}"), "content": "", "collaborators": shared})
        })
        .collect();
    let mut admin = connect_as(&server, &unique("importer"), json!(["admin"])).await;
    let r = admin
        .request("notes.import", json!({"notes": notes}), "imp")
        .await;
    assert_eq!(r["data"]["imported"], 2_500, "{r}");
    for (k, reader) in readers.iter().enumerate() {
        let mut c = connect_as(&server, reader, json!([])).await;
        let (_, listed) = list_all(&mut c).await;
        let mut titles: Vec<String> = listed
            .iter()
            .map(|n| n["title"].as_str().expect("title").to_owned())
            .collect();
        titles.sort();
        let mut want: Vec<String> = (0..2_500)
            .filter(|i| i % 7 == 0 && i % 3 == k)
            .map(|i| format!("imp{i}"))
            .collect();
        want.sort();
        assert_eq!(
            titles, want,
            "{reader} sees exactly the notes shared with them"
        );
    }
}

#[tokio::test]
async fn sqlite_imports_attach_collaborators_to_the_right_notes() {
    imports_attach_collaborators_to_the_right_notes(None).await;
}

#[tokio::test]
async fn postgres_imports_attach_collaborators_to_the_right_notes() {
    let url = postgres_url().await;
    imports_attach_collaborators_to_the_right_notes(Some(url)).await;
}
