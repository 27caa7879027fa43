-- no-transaction
-- Parked rows wait for an operator; the inbox worker counts them for the
-- `inbox_parked_rows` gauge (and its alert) without scanning the table.
-- Built CONCURRENTLY (so on its own, outside a transaction): a large inbox
-- keeps taking inserts and claims while it is built.
CREATE INDEX CONCURRENTLY IF NOT EXISTS inbox_parked_idx ON inbox (id) WHERE parked_at IS NOT NULL
