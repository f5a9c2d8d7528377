-- API v2 users get ids of their own namespace, `v2:<uuid>`, which an API v1 `userId` (a label
-- the client declares) may not take. Rows that are a v2 user's own (orders placed through v2,
-- which always carry an Idempotency-Key, with their tickets and payments, and the user's
-- Idempotency-Key records) move to the new id; a v1 purchase that only named a v2 user's id
-- stays a v1 label, apart from that user.
UPDATE tickets SET user_id = 'v2:' || user_id
WHERE order_id IN (
    SELECT id FROM orders
    WHERE idempotency_key IS NOT NULL AND user_id IN (SELECT id FROM users)
);
UPDATE payments SET user_id = 'v2:' || user_id
WHERE order_id IN (
    SELECT id FROM orders
    WHERE idempotency_key IS NOT NULL AND user_id IN (SELECT id FROM users)
);
UPDATE orders SET user_id = 'v2:' || user_id
WHERE idempotency_key IS NOT NULL AND user_id IN (SELECT id FROM users);
UPDATE idempotency_keys SET user_id = 'v2:' || user_id
WHERE user_id IN (SELECT id FROM users);
UPDATE users SET id = 'v2:' || id WHERE id NOT LIKE 'v2:%';
