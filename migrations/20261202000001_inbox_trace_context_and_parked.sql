-- The trace context an inbox message carries (W3C `traceparent` and
-- `tracestate`, from the message's attributes of those names or Google's
-- `googclient_` ones), kept with the row so that the processor runs the
-- handler inside a span of the producer's trace. NULL: the message started
-- no trace.
ALTER TABLE inbox ADD COLUMN IF NOT EXISTS traceparent TEXT;
ALTER TABLE inbox ADD COLUMN IF NOT EXISTS tracestate  TEXT;

-- Parked rows wait for an operator; the inbox worker counts them for the
-- `inbox_parked_rows` gauge (and its alert) without scanning the table.
CREATE INDEX IF NOT EXISTS inbox_parked_idx ON inbox (id) WHERE parked_at IS NOT NULL;
