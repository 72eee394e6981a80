-- Notes: owned by a user, shared with collaborators.
CREATE TABLE IF NOT EXISTS notes (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    owner      TEXT NOT NULL,
    title      TEXT NOT NULL,
    content    TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS notes_owner ON notes (owner);
CREATE TABLE IF NOT EXISTS note_collaborators (
    note_id INTEGER NOT NULL REFERENCES notes (id) ON DELETE CASCADE,
    user_id TEXT    NOT NULL,
    PRIMARY KEY (note_id, user_id)
);
CREATE INDEX IF NOT EXISTS note_collaborators_user ON note_collaborators (user_id);
