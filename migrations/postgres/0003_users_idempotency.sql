-- API v2: users with bearer tokens, and stored answers for Idempotency-Key.

CREATE TABLE users (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    -- SHA-256 of the bearer token, hex; the token itself is shown once and never stored
    token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);

-- One row per (user, key): the request's fingerprint and, once it finished, its answer.
CREATE TABLE idempotency_keys (
    user_id      TEXT    NOT NULL,
    key          TEXT    NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    fingerprint  TEXT    NOT NULL,
    state        TEXT    NOT NULL CHECK (state IN ('in_flight', 'done')),
    status       BIGINT,
    body         TEXT,
    created_at   TEXT    NOT NULL,
    completed_at TEXT,
    PRIMARY KEY (user_id, key),
    CHECK ((state = 'done') = (status IS NOT NULL AND body IS NOT NULL AND completed_at IS NOT NULL))
);
