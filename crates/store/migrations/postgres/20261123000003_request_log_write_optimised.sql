-- The request log is append-only and written at tens of thousands of rows
-- per second. An index on the random client ids made every batch touch
-- pages all over the index: SQLite sustained 68k rows/s with it and
-- 438k/s without (gale bench store --rate 0, 1,000 clients). Range scans
-- by created_at stay indexed.
DROP INDEX IF EXISTS weather_requests_client_id;
