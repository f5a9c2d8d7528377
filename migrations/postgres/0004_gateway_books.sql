-- The payment simulator's own books, kept as an external gateway keeps them: the ledger of every
-- charge, decline and refund it made, each line under the payment key it answered. A key's
-- first line (its charge or its decline) is the gateway's deduplication record, the answer
-- every retry under that key gets, so the books survive a restart: a charge retried after
-- `kill -9` gets the same answer, and the audit reconciles against everything ever charged.
-- Only the gateway writes here. One table with one index on the key keeps the cost of a charge
-- to two b-tree inserts (the line, in order, and the key).

CREATE TABLE gateway_ledger (
    -- the order written, and the paging cursor of the admin ledger routes
    seq          BIGINT  PRIMARY KEY CHECK (seq > 0),
    payment_key  TEXT    NOT NULL CHECK (length(payment_key) BETWEEN 1 AND 255),
    kind         TEXT    NOT NULL CHECK (kind IN ('charge', 'decline', 'refund')),
    amount_cents BIGINT  NOT NULL CHECK (amount_cents >= 0),
    -- the gateway's id for an approved charge: on its charge line, and only there
    charge_id    TEXT,
    at           TEXT    NOT NULL,
    CHECK ((kind = 'charge') = (charge_id IS NOT NULL))
);

-- A key has one answer (charged or declined, never both, never twice) and at most one refund:
-- charging or refunding a key twice is a constraint error instead of a silent double charge.
CREATE UNIQUE INDEX gateway_ledger_once ON gateway_ledger (payment_key, (kind = 'refund'));
