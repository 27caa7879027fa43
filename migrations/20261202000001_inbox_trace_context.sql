-- The trace context an inbox message carries (W3C `traceparent` and
-- `tracestate`, from the message's attributes of those names or Google's
-- `googclient_` ones), kept with the row so that the processor runs the
-- handler inside a span of the producer's trace. NULL: the message started
-- no trace.
--
-- Nullable columns without a default: a change of the catalog only, but it
-- needs the table's lock for a moment. Rather than queue behind a long
-- transaction (and make every statement on the inbox queue behind it), the
-- migration gives up after 10 s; run `outbox-worker migrate` again.
SET LOCAL lock_timeout = '10s';
ALTER TABLE inbox ADD COLUMN IF NOT EXISTS traceparent TEXT;
ALTER TABLE inbox ADD COLUMN IF NOT EXISTS tracestate  TEXT;
