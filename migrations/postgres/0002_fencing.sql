-- The `locked` stage's fencing: the newest lock token that wrote an event's inventory. A write
-- carrying an older token comes from a holder whose lease ran out, and is refused.
ALTER TABLE events ADD COLUMN fence BIGINT NOT NULL DEFAULT 0 CHECK (fence >= 0);
