-- Recovery at start (and a services node taking a shard) looks up the purchases left pending:
-- partial indexes keep that lookup to the pending rows, however many orders are settled.
CREATE INDEX orders_pending ON orders (created_at) WHERE status = 'pending';
CREATE INDEX payments_pending ON payments (order_id) WHERE status = 'pending';
