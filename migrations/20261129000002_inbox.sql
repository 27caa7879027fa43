-- The inbox: what `outbox-worker inbox` received from Pub/Sub, stored exactly
-- once, and processed by the application (see worker/INBOX.md).
--
-- The inbox worker inserts each message with
--     INSERT INTO inbox (message_id, ...) VALUES (...) ON CONFLICT (message_id) DO NOTHING
-- and acknowledges it only after that commit, so a redelivered or republished
-- message (same `message-id` attribute) is stored once. Applications claim
-- unprocessed rows in `id` order, apply their effects and set `processed_at`
-- in the same transaction.
CREATE TABLE IF NOT EXISTS inbox (
    -- Receive order; processing order within an ordering key.
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The dedup key: the `message-id` attribute, or Pub/Sub's messageId when
    -- the attribute is absent.
    message_id        TEXT        NOT NULL UNIQUE,
    -- Pub/Sub's own id of the delivery that was stored.
    pubsub_message_id TEXT,
    -- Where it came from (`projects/P/subscriptions/S`).
    subscription      TEXT,
    payload           BYTEA       NOT NULL,
    -- A JSON object of string -> string (the message attributes).
    attributes        JSONB       NOT NULL DEFAULT '{}',
    -- NULL when the message had none.
    ordering_key      TEXT,
    published_at      TIMESTAMPTZ,
    received_at       TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    -- Set by the application in the transaction that applied the message.
    processed_at      TIMESTAMPTZ,
    -- Failed processing attempts so far, when to try next, and why the last
    -- one failed.
    attempts          INT         NOT NULL DEFAULT 0,
    next_attempt_at   TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    last_error        TEXT,
    -- Set after the configured number of failed attempts: no more retries
    -- until an operator clears it (UPDATE inbox SET parked_at = NULL, attempts = 0 ...).
    parked_at         TIMESTAMPTZ
);

-- What the processors scan: unprocessed, unparked rows in id order.
CREATE INDEX IF NOT EXISTS inbox_pending_idx ON inbox (id)
    WHERE processed_at IS NULL AND parked_at IS NULL;
-- Per-key order: "is there an older unprocessed row of this key?"
CREATE INDEX IF NOT EXISTS inbox_pending_key_idx ON inbox (ordering_key, id)
    WHERE processed_at IS NULL;
-- Retention deletes processed rows by age.
CREATE INDEX IF NOT EXISTS inbox_processed_at_idx ON inbox (processed_at)
    WHERE processed_at IS NOT NULL;

-- Messages the inbox cannot store as they are (an attribute or ordering key
-- holding a NUL character, which PostgreSQL's text and jsonb reject). Text
-- fields are kept in an escaped form: `attributes` is the JSON text of the
-- attributes (NUL written as \u0000), `message_id` and `ordering_key` have NUL
-- written as \u0000 too. The payload is kept as is.
CREATE TABLE IF NOT EXISTS inbox_dead_letter (
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id        TEXT        NOT NULL UNIQUE,
    pubsub_message_id TEXT,
    subscription      TEXT,
    payload           BYTEA       NOT NULL,
    attributes        TEXT        NOT NULL,
    ordering_key      TEXT,
    published_at      TIMESTAMPTZ,
    received_at       TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    error             TEXT        NOT NULL
);
