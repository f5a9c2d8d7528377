-- Stage `saga` (PostgreSQL only): an order is a saga whose every change is an event in an
-- append-only log. The read models (orders, tickets, payments, events.available_tickets) are
-- projections of it, written in the same transaction as the events; effects leave through an
-- outbox written in that transaction too, and each consumer dedupes by message id in its inbox.

-- The log. `(stream_id, version)` unique is the optimistic concurrency check: two decisions
-- taken on the same version of a saga cannot both be appended. `seq` orders the whole log.
CREATE TABLE saga_events (
    seq            BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id      TEXT    NOT NULL,
    version        BIGINT  NOT NULL CHECK (version >= 1),
    kind           TEXT    NOT NULL,
    schema_version INTEGER NOT NULL CHECK (schema_version >= 1),
    body           JSONB   NOT NULL,
    at_ms          BIGINT  NOT NULL,
    recorded_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (stream_id, version)
);

-- The latest snapshot of a stream (taken every few events): its state at `version`, so a load
-- reads the snapshot and the events after it. `schema` is the state's own format version; a
-- snapshot of another format is ignored and the stream replayed from its start.
CREATE TABLE saga_snapshots (
    stream_id TEXT    PRIMARY KEY,
    version   BIGINT  NOT NULL CHECK (version >= 1),
    schema    INTEGER NOT NULL,
    state     JSONB   NOT NULL
);

-- Messages waiting to be relayed: commands to the participants, replies and timers to the
-- orchestrator. A relay claims due rows with FOR UPDATE SKIP LOCKED and a lease
-- (`claimed_until`), delivers them, then deletes them; a claim whose relay died runs out and
-- the row is delivered again (at least once; the consumer's inbox makes it once in effect).
CREATE TABLE saga_outbox (
    id            BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id    TEXT    NOT NULL UNIQUE,
    saga_id       TEXT    NOT NULL,
    destination   TEXT    NOT NULL CHECK (destination IN ('orchestrator', 'inventory', 'payments')),
    kind          TEXT    NOT NULL,
    body          JSONB   NOT NULL,
    is_timer      BOOLEAN NOT NULL DEFAULT FALSE,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    deliver_after TIMESTAMPTZ NOT NULL DEFAULT now(),
    claimed_until TIMESTAMPTZ,
    attempts      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX saga_outbox_due ON saga_outbox (deliver_after, id);
CREATE INDEX saga_outbox_by_saga ON saga_outbox (saga_id);

-- Every message a consumer has applied, so a redelivery is recognised and dropped in the same
-- transaction that would have applied it again.
CREATE TABLE saga_inbox (
    consumer    TEXT NOT NULL CHECK (consumer IN ('orchestrator', 'inventory', 'payments')),
    message_id  TEXT NOT NULL,
    saga_id     TEXT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- The inventory participant's own truth: free seats per event, and each saga's hold.
CREATE TABLE saga_seats (
    event_id  BIGINT PRIMARY KEY REFERENCES events (id),
    total     BIGINT NOT NULL CHECK (total >= 0),
    available BIGINT NOT NULL CHECK (available BETWEEN 0 AND total)
);

CREATE TABLE saga_holds (
    order_id TEXT   PRIMARY KEY,
    event_id BIGINT NOT NULL REFERENCES saga_seats (event_id),
    user_id  TEXT   NOT NULL,
    quantity BIGINT NOT NULL CHECK (quantity BETWEEN 1 AND 100),
    status   TEXT   NOT NULL CHECK (status IN ('held', 'released', 'confirmed'))
);
CREATE INDEX saga_holds_by_event_user ON saga_holds (event_id, user_id);

-- Messages whose delivery failed `attempts` times (a message no consumer can apply: a bug, or
-- data edited by hand), moved out of the outbox so they stop being retried, with the last
-- error, for an operator to look at. The admin stats count them.
CREATE TABLE saga_dead_letters (
    id          BIGINT  PRIMARY KEY,
    message_id  TEXT    NOT NULL UNIQUE,
    saga_id     TEXT    NOT NULL,
    destination TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    body        JSONB   NOT NULL,
    attempts    INTEGER NOT NULL,
    error       TEXT    NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    dead_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
