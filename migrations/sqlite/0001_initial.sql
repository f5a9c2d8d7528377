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

-- A purchase: 1..=100 tickets of one event, all or nothing. An API v1 purchase is an order of one.
CREATE TABLE orders (
    id              TEXT    PRIMARY KEY,
    event_id        INTEGER NOT NULL REFERENCES events (id),
    user_id         TEXT    NOT NULL CHECK (length(user_id) BETWEEN 1 AND 200),
    quantity        INTEGER NOT NULL CHECK (quantity BETWEEN 1 AND 100),
    amount_cents    INTEGER NOT NULL CHECK (amount_cents >= 0),
    status          TEXT    NOT NULL CHECK (status IN ('pending', 'confirmed', 'cancelled')),
    cancel_reason   TEXT    CHECK (cancel_reason IN ('payment_declined', 'hold_expired', 'interrupted')),
    -- the client's Idempotency-Key (API v2), scoped to the user: at most one order per key
    idempotency_key TEXT,
    created_at      TEXT    NOT NULL,
    updated_at      TEXT    NOT NULL,
    CHECK ((status = 'cancelled') = (cancel_reason IS NOT NULL))
);

CREATE INDEX orders_by_user_event ON orders (user_id, event_id);
CREATE UNIQUE INDEX one_order_per_idempotency_key ON orders (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Tickets move with their order: same status, same reason.
CREATE TABLE tickets (
    id            TEXT    PRIMARY KEY,
    order_id      TEXT    NOT NULL REFERENCES orders (id),
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
CREATE INDEX tickets_by_order ON tickets (order_id);
CREATE INDEX tickets_by_event_status ON tickets (event_id, status);

-- One payment per order, charged at the gateway under `idempotency_key`.
CREATE TABLE payments (
    id              TEXT    PRIMARY KEY,
    order_id        TEXT    NOT NULL UNIQUE REFERENCES orders (id),
    user_id         TEXT    NOT NULL,
    amount_cents    INTEGER NOT NULL CHECK (amount_cents >= 0),
    status          TEXT    NOT NULL CHECK (status IN ('pending', 'completed', 'failed', 'refunded')),
    -- the key used with the payment gateway; the gateway deduplicates on it
    idempotency_key TEXT    NOT NULL UNIQUE,
    processed_at    TEXT,
    created_at      TEXT    NOT NULL,
    CHECK ((status = 'pending') = (processed_at IS NULL))
);
