//! The notes application on gale: notes saved, listed and imported by
//! signed-in users, shared with collaborators (who get `notes.updated`
//! pushes on every node), stored in the database of `gale_store`. Built
//! on `gale_engine`'s public API alone ([`install`]).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;

use gale_engine::broadcast::Target;
use gale_engine::config::{Priority, Rate};
use gale_engine::protocol::{ErrorBody, ErrorCode};
use gale_engine::router::{Ctx, HandlerResult, Payload, Policy, Registry, invalid_field};
use gale_store::{Db, LIST_LIMIT, NewNote, Note};

/// Registers the notes events on `r`, storing notes in `db`:
/// `notes.save`, `notes.list` (signed-in users) and `notes.import`
/// (role `admin`).
pub fn install(r: &mut Registry, db: Db) {
    let d = db.clone();
    r.register(
        "notes.save",
        Policy {
            requires_auth: true,
            rate_limit: Some(Rate {
                count: 20,
                per: Duration::from_secs(60),
            }),
            ..Policy::default()
        },
        move |ctx, req| notes_save(d.clone(), ctx, req),
    );
    let d = db.clone();
    r.register(
        "notes.list",
        Policy {
            requires_auth: true,
            ..Policy::default()
        },
        move |ctx, req| notes_list(d.clone(), ctx, req),
    );
    r.register(
        "notes.import",
        Policy {
            requires_auth: true,
            requires_role: Some("admin".into()),
            rate_limit: Some(Rate {
                count: 1,
                per: Duration::from_secs(60),
            }),
            timeout: Duration::from_secs(30),
            priority: Priority::Low,
        },
        move |ctx, req| notes_import(db.clone(), ctx, req),
    );
}

/// Longest note title, in characters.
const MAX_TITLE_CHARS: usize = 200;
/// Largest note body, in bytes.
const MAX_CONTENT_BYTES: usize = 100_000;
/// Most collaborators per note.
const MAX_COLLABORATORS: usize = 100;
/// Most notes per import.
const MAX_IMPORT: usize = 10_000;

/// A note as a client sends it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoteData {
    title: String,
    content: String,
    #[serde(default)]
    collaborators: Vec<String>,
}

impl NoteData {
    /// Checks the fields; `at` prefixes field names (`notes[3].`).
    fn check(&self, at: &str) -> Result<(), ErrorBody> {
        let title = self.title.trim();
        if title.is_empty() || title.chars().nth(MAX_TITLE_CHARS).is_some() {
            return Err(invalid_field(
                &format!("{at}title"),
                format!("title must be 1 to {MAX_TITLE_CHARS} characters"),
            ));
        }
        if self.content.len() > MAX_CONTENT_BYTES {
            return Err(invalid_field(
                &format!("{at}content"),
                format!("content must be at most {MAX_CONTENT_BYTES} bytes"),
            ));
        }
        if self.collaborators.len() > MAX_COLLABORATORS {
            return Err(invalid_field(
                &format!("{at}collaborators"),
                format!("at most {MAX_COLLABORATORS} collaborators"),
            ));
        }
        if self
            .collaborators
            .iter()
            .any(|c| c.is_empty() || c.len() > 128 || c.chars().any(char::is_control))
        {
            return Err(invalid_field(
                &format!("{at}collaborators"),
                "collaborators must be user ids of 1 to 128 characters",
            ));
        }
        Ok(())
    }

    fn into_new(self) -> NewNote {
        let mut collaborators = self.collaborators;
        collaborators.sort();
        collaborators.dedup();
        NewNote {
            title: self.title.trim().to_owned(),
            content: self.content,
            collaborators,
        }
    }
}

/// `notes.save {id?, title, content, collaborators[]}`.
#[derive(Debug, Deserialize)]
struct SaveNote {
    #[serde(default)]
    id: Option<i64>,
    #[serde(flatten)]
    note: NoteData,
}

impl Payload for SaveNote {
    fn validate(&self) -> Result<(), ErrorBody> {
        self.note.check("")
    }
}

fn db_error(event: &str, e: &sqlx::Error) -> ErrorBody {
    tracing::error!(event, error = %e, "database error");
    ErrorBody::new(
        ErrorCode::InternalError,
        "the note could not be stored; try again",
    )
}

/// The signed-in user; the router's auth check guarantees one.
fn user(ctx: &Ctx) -> Result<&str, ErrorBody> {
    ctx.caller
        .user
        .as_deref()
        .ok_or_else(|| ErrorBody::new(ErrorCode::Unauthorized, "sign in first"))
}

async fn notes_save(db: Db, ctx: Ctx, req: SaveNote) -> HandlerResult {
    let owner = user(&ctx)?;
    let note = req.note.into_new();
    let saved = db
        .save_note(owner, req.id, &note)
        .await
        .map_err(|e| db_error("notes.save", &e))?
        .ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::NotFound,
                format!("no note {} of yours to update", req.id.unwrap_or_default()),
            )
        })?;
    let data = json!(saved);
    let others: Vec<String> = saved
        .collaborators
        .iter()
        .filter(|c| c.as_str() != owner)
        .cloned()
        .collect();
    if !others.is_empty() {
        // A note within its limits always fits an outbound message
        // (server.max_outbound_message_bytes is at least 1 MiB).
        if let Err(e) = ctx
            .app
            .hub
            .send_now(&Target::Users(others), "notes.updated", &data)
        {
            tracing::error!(id = saved.id, error = %e, "notes.updated not pushed");
        }
    }
    Ok(data)
}

/// `notes.list {before?}`: one page of notes. `before` is the `next`
/// cursor of the previous page.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListNotes {
    #[serde(default)]
    before: Option<String>,
}

impl Payload for ListNotes {
    fn validate(&self) -> Result<(), ErrorBody> {
        match self.before.as_deref() {
            Some(c) => parse_cursor(c).map(drop),
            None => Ok(()),
        }
    }
}

/// Room a reply needs around a page of notes: `{"reply":…,"ok":true,
/// "data":{"notes":[…],"next":"…"}}`, with a `ref` of at most
/// [`gale_engine::protocol::MAX_REF_CHARS`] characters, escaped.
const REPLY_ROOM: usize = 4096;

/// Notes read from the database at a time while a page fills.
const LIST_CHUNK: i64 = 50;

/// A page's `next`: where the following page starts.
fn cursor(note: &Note) -> String {
    format!(
        "{}:{}:{}",
        note.updated_at.timestamp(),
        note.updated_at.timestamp_subsec_nanos(),
        note.id
    )
}

fn parse_cursor(text: &str) -> Result<(DateTime<Utc>, i64), ErrorBody> {
    let bad = || {
        invalid_field(
            "before",
            "before must be the next cursor of a notes.list page",
        )
    };
    let mut parts = text.splitn(3, ':');
    let mut next = || parts.next().ok_or_else(bad);
    let (secs, nanos, id) = (next()?, next()?, next()?);
    let at = DateTime::from_timestamp(
        secs.parse().map_err(|_| bad())?,
        nanos.parse().map_err(|_| bad())?,
    )
    .ok_or_else(bad)?;
    Ok((at, id.parse().map_err(|_| bad())?))
}

/// Pages hold at most [`LIST_LIMIT`] notes and fit in
/// `server.max_outbound_message_bytes`; `next` is null on the last page.
async fn notes_list(db: Db, ctx: Ctx, req: Option<ListNotes>) -> HandlerResult {
    let me = user(&ctx)?;
    let db = &db;
    let mut before = match req.and_then(|r| r.before) {
        Some(c) => Some(parse_cursor(&c)?),
        None => None,
    };
    let budget = ctx
        .app
        .config
        .server
        .max_outbound_message_bytes
        .saturating_sub(REPLY_ROOM);
    let (mut notes, mut used, mut more) = (Vec::<Note>::new(), 0, false);
    'fill: while (notes.len() as i64) < LIST_LIMIT {
        let want = (LIST_LIMIT - notes.len() as i64).min(LIST_CHUNK);
        let chunk = db
            .list_notes(me, before, want)
            .await
            .map_err(|e| db_error("notes.list", &e))?;
        let exhausted = (chunk.len() as i64) < want;
        for note in chunk {
            // Its size in the reply, with the comma before it.
            let size = serde_json::to_vec(&note).map_or(usize::MAX, |v| v.len()) + 1;
            if used + size > budget {
                if notes.is_empty() {
                    tracing::error!(id = note.id, size, "a note larger than a whole page");
                    return Err(ErrorBody::new(
                        ErrorCode::InternalError,
                        "a note is too large to send (server.max_outbound_message_bytes)",
                    ));
                }
                more = true;
                break 'fill;
            }
            used += size;
            before = Some((note.updated_at, note.id));
            notes.push(note);
        }
        if exhausted {
            break;
        }
    }
    if !more && notes.len() as i64 == LIST_LIMIT {
        more = !db
            .list_notes(me, before, 1)
            .await
            .map_err(|e| db_error("notes.list", &e))?
            .is_empty();
    }
    let next = if more { notes.last().map(cursor) } else { None };
    Ok(json!({ "notes": notes, "next": next }))
}

/// `notes.import {notes[]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportNotes {
    notes: Vec<NoteData>,
}

impl Payload for ImportNotes {
    fn validate(&self) -> Result<(), ErrorBody> {
        if self.notes.is_empty() || self.notes.len() > MAX_IMPORT {
            return Err(invalid_field(
                "notes",
                format!("import 1 to {MAX_IMPORT} notes at a time"),
            ));
        }
        for (i, n) in self.notes.iter().enumerate() {
            n.check(&format!("notes[{i}]."))?;
        }
        Ok(())
    }
}

async fn notes_import(db: Db, ctx: Ctx, req: ImportNotes) -> HandlerResult {
    let owner = user(&ctx)?;
    let notes: Vec<NewNote> = req.notes.into_iter().map(NoteData::into_new).collect();
    let imported = db
        .import_notes(owner, &notes)
        .await
        .map_err(|e| db_error("notes.import", &e))?;
    Ok(json!({ "imported": imported }))
}
