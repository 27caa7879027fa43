-- The outbox: the contract between applications and the relay.
--
-- An application writes a row in the same transaction as its business rows:
--     INSERT INTO outbox (payload) VALUES ($1);
-- Everything but `payload` is optional. The relay publishes each committed row
-- to Pub/Sub and deletes it once Pub/Sub acknowledged it, so the table only
-- ever holds pending messages.
CREATE TABLE IF NOT EXISTS outbox (
    -- Claim and per-key publish order.
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Stable across re-publication; sent as the `message-id` attribute so
    -- that subscribers can deduplicate.
    message_id   UUID        NOT NULL DEFAULT gen_random_uuid(),
    -- Sent unchanged as the message data (Pub/Sub allows up to 10 MB).
    payload      BYTEA       NOT NULL,
    -- Messages with the same key reach subscribers in insertion order.
    ordering_key TEXT,
    -- A JSON object of string -> string, sent as message attributes.
    attributes   JSONB,
    -- A short topic id or `projects/P/topics/T`; NULL means the relay's topic.
    topic        TEXT,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

-- Rows that can never be published (too large, malformed attributes, a routed
-- topic that does not exist) are moved here with the reason, so that the rest
-- keep flowing. Operators inspect and replay them by hand.
CREATE TABLE IF NOT EXISTS outbox_dead_letter (
    id             BIGINT      PRIMARY KEY,
    message_id     UUID        NOT NULL,
    payload        BYTEA       NOT NULL,
    ordering_key   TEXT,
    attributes     JSONB,
    topic          TEXT,
    created_at     TIMESTAMPTZ NOT NULL,
    dead_lettered_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    error          TEXT        NOT NULL
);

-- Wake the relay as soon as rows commit (notifications are delivered at
-- commit). One notification per statement, not per row; PostgreSQL also folds
-- identical notifications within a transaction.
CREATE OR REPLACE FUNCTION outbox_notify_relay() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_relay', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS outbox_notify_relay ON outbox;
CREATE TRIGGER outbox_notify_relay
    AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify_relay();
