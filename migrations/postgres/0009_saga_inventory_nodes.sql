-- Stage `saga`, step B: the inventory participant is the `services` inventory node owning the
-- event's shard. The node writes a command's effect on `saga_holds`/`saga_seats` (and the
-- event's `available_tickets`, which are its own now) together with the command's inbox row,
-- in its epoch-fenced writer's transaction. The row keeps what the node answered, so a
-- redelivered command is answered the same and applied once.
ALTER TABLE saga_inbox ADD COLUMN outcome JSONB;
