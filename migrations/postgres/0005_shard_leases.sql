-- Stage `services` (PostgreSQL only): events are sharded over inventory nodes. Each shard is
-- owned through a lease whose expiry is kept by this database's clock, never a node's, and
-- whose epoch grows on every takeover. An inventory write checks its shard's epoch in its own
-- transaction, so a node that paused past its lease can no longer write.
CREATE TABLE shard_leases (
    shard      INTEGER PRIMARY KEY CHECK (shard >= 0),
    owner      TEXT,
    epoch      BIGINT NOT NULL DEFAULT 0 CHECK (epoch >= 0),
    expires_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The nodes of a `services` deployment, as each last reported itself (for the topology and
-- for counting the live inventory nodes that share the shards).
CREATE TABLE service_nodes (
    id      TEXT PRIMARY KEY,
    role    TEXT NOT NULL CHECK (role IN ('gateway', 'catalog', 'inventory', 'payments')),
    addr    TEXT NOT NULL,
    pid     BIGINT NOT NULL,
    seen_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
