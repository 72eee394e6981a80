-- One row per weather request, success or failure.
CREATE TABLE IF NOT EXISTS weather_requests (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    client_id   TEXT    NOT NULL,
    city        TEXT    NOT NULL,
    ok          BOOLEAN NOT NULL,
    temperature REAL,
    error       TEXT,
    latency_ms  INTEGER NOT NULL,
    created_at  TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS weather_requests_created_at ON weather_requests (created_at);
CREATE INDEX IF NOT EXISTS weather_requests_client_id ON weather_requests (client_id);
