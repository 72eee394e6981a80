-- One row per weather request, success or failure.
CREATE TABLE IF NOT EXISTS weather_requests (
    id          BIGSERIAL PRIMARY KEY,
    client_id   UUID             NOT NULL,
    city        TEXT             NOT NULL,
    ok          BOOLEAN          NOT NULL,
    temperature DOUBLE PRECISION,
    error       TEXT,
    latency_ms  INTEGER          NOT NULL,
    created_at  TIMESTAMPTZ      NOT NULL
);
CREATE INDEX IF NOT EXISTS weather_requests_created_at ON weather_requests (created_at);
CREATE INDEX IF NOT EXISTS weather_requests_client_id ON weather_requests (client_id);
