-- Ticketflow's SQLite schema. The CHECKs and unique indexes back the invariants of SPEC section 5,
-- so a bug in code becomes a constraint error instead of silent corruption.

CREATE TABLE events (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    name              TEXT    NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    venue             TEXT    NOT NULL CHECK (length(venue) BETWEEN 1 AND 200),
    date              TEXT    NOT NULL,
    total_tickets     INTEGER NOT NULL CHECK (total_tickets BETWEEN 1 AND 1000000),
    available_tickets INTEGER NOT NULL CHECK (available_tickets BETWEEN 0 AND total_tickets),
    price_cents       INTEGER NOT NULL CHECK (price_cents BETWEEN 0 AND 100000000),
    created_at        TEXT    NOT NULL
);

CREATE TABLE tickets (
    id            TEXT    PRIMARY KEY,
    event_id      INTEGER NOT NULL REFERENCES events (id),
    user_id       TEXT    NOT NULL CHECK (length(user_id) BETWEEN 1 AND 200),
    purchase_date TEXT    NOT NULL,
    price_cents   INTEGER NOT NULL CHECK (price_cents >= 0),
    status        TEXT    NOT NULL CHECK (status IN ('pending', 'confirmed', 'cancelled')),
    cancel_reason TEXT    CHECK (cancel_reason IN ('payment_declined', 'hold_expired', 'interrupted')),
    -- a reason exactly when cancelled
    CHECK ((status = 'cancelled') = (cancel_reason IS NOT NULL))
);

CREATE INDEX tickets_by_user ON tickets (user_id);
CREATE INDEX tickets_by_event_status ON tickets (event_id, status);

CREATE TABLE payments (
    id              TEXT    PRIMARY KEY,
    ticket_id       TEXT    NOT NULL REFERENCES tickets (id),
    user_id         TEXT    NOT NULL,
    amount_cents    INTEGER NOT NULL CHECK (amount_cents >= 0),
    status          TEXT    NOT NULL CHECK (status IN ('pending', 'completed', 'failed', 'refunded')),
    -- the key used with the payment gateway; the gateway deduplicates on it
    idempotency_key TEXT    NOT NULL UNIQUE,
    processed_at    TEXT,
    created_at      TEXT    NOT NULL,
    CHECK ((status = 'pending') = (processed_at IS NULL))
);

-- I3: at most one completed payment per ticket, whatever the code does.
CREATE UNIQUE INDEX one_completed_payment_per_ticket ON payments (ticket_id) WHERE status = 'completed';
CREATE INDEX payments_by_ticket ON payments (ticket_id);
