//! Notes in the same database as the request log: one code path for
//! SQLite and PostgreSQL. Each query body is written once and run against
//! either pool; `QueryBuilder` writes the right placeholders for each.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::QueryBuilder;

use super::Db;

/// A stored note.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Note {
    /// Its id.
    pub id: i64,
    /// The user who wrote it.
    pub owner: String,
    /// Title.
    pub title: String,
    /// Body.
    pub content: String,
    /// Users it is shared with.
    pub collaborators: Vec<String>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it was last saved.
    pub updated_at: DateTime<Utc>,
}

/// A note to save.
#[derive(Debug, Clone, PartialEq)]
pub struct NewNote {
    /// Title.
    pub title: String,
    /// Body.
    pub content: String,
    /// Users to share it with.
    pub collaborators: Vec<String>,
}

/// Notes per insert statement in an import: 5 bound values each, well
/// under both databases' limits on bound parameters.
pub(super) const IMPORT_CHUNK: usize = 1_000;

/// Most notes one `notes.list` page holds.
pub const LIST_LIMIT: i64 = 500;

/// Runs `$body` with `$pool` bound to whichever pool `$db` holds.
macro_rules! on_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            Db::Sqlite($pool) => $body,
            Db::Postgres($pool) => $body,
        }
    };
}

/// Inserts one note row in transaction `$tx`; evaluates to its
/// `(id, created_at)`.
macro_rules! insert_note {
    ($tx:expr, $owner:expr, $note:expr, $now:expr) => {{
        let mut q = QueryBuilder::new(
            "INSERT INTO notes (owner, title, content, created_at, updated_at) VALUES (",
        );
        let mut v = q.separated(", ");
        v.push_bind($owner.to_owned())
            .push_bind($note.title.clone())
            .push_bind($note.content.clone())
            .push_bind($now)
            .push_bind($now);
        q.push(") RETURNING id, created_at");
        let row: (i64, DateTime<Utc>) = q.build_query_as().fetch_one(&mut *$tx).await?;
        row
    }};
}

/// Inserts the collaborator rows of note `$id` in transaction `$tx`.
macro_rules! insert_collaborators {
    ($tx:expr, $id:expr, $users:expr) => {
        if !$users.is_empty() {
            let mut q = QueryBuilder::new("INSERT INTO note_collaborators (note_id, user_id) ");
            q.push_values($users, |mut b, user| {
                b.push_bind($id).push_bind(user.clone());
            });
            q.build().execute(&mut *$tx).await?;
        }
    };
}

type NoteRow = (i64, String, String, String, DateTime<Utc>, DateTime<Utc>);

impl Db {
    /// Inserts a note (`id` None) or updates the caller's own note `id`,
    /// replacing its collaborators, in one transaction. `Ok(None)` when
    /// `id` names no note of `owner`'s.
    ///
    /// # Errors
    /// The driver's error.
    pub async fn save_note(
        &self,
        owner: &str,
        id: Option<i64>,
        note: &NewNote,
    ) -> Result<Option<Note>, sqlx::Error> {
        let now = Utc::now();
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let row: Option<(i64, DateTime<Utc>)> = match id {
                None => Some(insert_note!(tx, owner, note, now)),
                Some(id) => {
                    let mut q = QueryBuilder::new("UPDATE notes SET title = ");
                    q.push_bind(note.title.clone())
                        .push(", content = ")
                        .push_bind(note.content.clone())
                        .push(", updated_at = ")
                        .push_bind(now)
                        .push(" WHERE id = ")
                        .push_bind(id)
                        .push(" AND owner = ")
                        .push_bind(owner.to_owned())
                        .push(" RETURNING id, created_at");
                    let found = q.build_query_as().fetch_optional(&mut *tx).await?;
                    if found.is_some() {
                        let mut q = QueryBuilder::new("DELETE FROM note_collaborators WHERE note_id = ");
                        q.push_bind(id);
                        q.build().execute(&mut *tx).await?;
                    }
                    found
                }
            };
            let Some((id, created_at)) = row else {
                return Ok(None);
            };
            insert_collaborators!(tx, id, &note.collaborators);
            tx.commit().await?;
            Ok(Some(Note {
                id,
                owner: owner.to_owned(),
                title: note.title.clone(),
                content: note.content.clone(),
                collaborators: note.collaborators.clone(),
                created_at,
                updated_at: now,
            }))
        })
    }

    /// Inserts many notes for `owner` in one transaction (all or none).
    /// Returns how many.
    ///
    /// Rows go in with multi-row statements of `IMPORT_CHUNK` notes: on
    /// SQLite the transaction holds the database's one write lock, which
    /// the request log needs too, so it must be short (10,000 notes: from
    /// 412–634 ms one statement per note to the figure in
    /// docs/benchmarks.md).
    ///
    /// # Errors
    /// The driver's error; nothing is inserted then.
    pub async fn import_notes(&self, owner: &str, notes: &[NewNote]) -> Result<usize, sqlx::Error> {
        let now = Utc::now();
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            for chunk in notes.chunks(IMPORT_CHUNK) {
                let mut q = QueryBuilder::new(
                    "INSERT INTO notes (owner, title, content, created_at, updated_at) ",
                );
                q.push_values(chunk, |mut b, note| {
                    b.push_bind(owner.to_owned())
                        .push_bind(note.title.clone())
                        .push_bind(note.content.clone())
                        .push_bind(now)
                        .push_bind(now);
                });
                q.push(" RETURNING id");
                // Neither insert is kept prepared: their shapes vary with
                // the import, and on SQLite each compiled one (up to 1,000
                // rows) would stay in gale's memory, on every connection.
                let mut ids: Vec<(i64,)> =
                    q.build_query_as().persistent(false).fetch_all(&mut *tx).await?;
                // Ids are handed out in the order of the VALUES list (one
                // statement, a sequence or SQLite's rowid counting up), but
                // RETURNING's order is not promised: sort to pair them up.
                ids.sort_unstable();
                let pairs: Vec<(i64, &String)> = ids
                    .iter()
                    .zip(chunk)
                    .flat_map(|((id, ), note)| note.collaborators.iter().map(move |u| (*id, u)))
                    .collect();
                for pairs in pairs.chunks(IMPORT_CHUNK * 5) {
                    let mut q =
                        QueryBuilder::new("INSERT INTO note_collaborators (note_id, user_id) ");
                    q.push_values(pairs, |mut b, (id, user)| {
                        b.push_bind(*id).push_bind((*user).clone());
                    });
                    q.build().persistent(false).execute(&mut *tx).await?;
                }
            }
            tx.commit().await?;
            Ok(notes.len())
        })
    }

    /// The user's own notes and those shared with them, newest first
    /// (by `updated_at`, then `id`), at most `limit`, starting after
    /// `before` (the `(updated_at, id)` of the last note already read).
    ///
    /// # Errors
    /// The driver's error.
    pub async fn list_notes(
        &self,
        user: &str,
        before: Option<(DateTime<Utc>, i64)>,
        limit: i64,
    ) -> Result<Vec<Note>, sqlx::Error> {
        on_pool!(self, pool => {
            let mut q = QueryBuilder::new(
                "SELECT id, owner, title, content, created_at, updated_at FROM notes WHERE (owner = ",
            );
            q.push_bind(user.to_owned())
                .push(" OR id IN (SELECT note_id FROM note_collaborators WHERE user_id = ")
                .push_bind(user.to_owned())
                .push("))");
            if let Some((at, id)) = before {
                q.push(" AND (updated_at < ")
                    .push_bind(at)
                    .push(" OR (updated_at = ")
                    .push_bind(at)
                    .push(" AND id < ")
                    .push_bind(id)
                    .push("))");
            }
            q.push(" ORDER BY updated_at DESC, id DESC LIMIT ")
                .push_bind(limit);
            let rows: Vec<NoteRow> = q.build_query_as().fetch_all(pool).await?;
            let mut shared: HashMap<i64, Vec<String>> = HashMap::new();
            if !rows.is_empty() {
                let mut q = QueryBuilder::new(
                    "SELECT note_id, user_id FROM note_collaborators WHERE note_id IN (",
                );
                let mut ids = q.separated(", ");
                for row in &rows {
                    ids.push_bind(row.0);
                }
                q.push(") ORDER BY user_id");
                let pairs: Vec<(i64, String)> = q.build_query_as().fetch_all(pool).await?;
                for (id, user) in pairs {
                    shared.entry(id).or_default().push(user);
                }
            }
            Ok(rows
                .into_iter()
                .map(|(id, owner, title, content, created_at, updated_at)| Note {
                    collaborators: shared.remove(&id).unwrap_or_default(),
                    id,
                    owner,
                    title,
                    content,
                    created_at,
                    updated_at,
                })
                .collect())
        })
    }
}
