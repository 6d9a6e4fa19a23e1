-- 0001: the consumer's inbox: one row per event a consumer has applied.
-- Lives in the CONSUMER's database, next to the tables its handlers write, so the handler's work
-- and this row commit in one transaction. {{schema}} is replaced by the configured schema.

CREATE TABLE {{schema}}.processed_events (
    -- One consumer (by default its queue name) applies an event once; another consumer sharing
    -- the database (say email and inventory) applies it once too.
    consumer      text        NOT NULL,
    event_id      text        NOT NULL,
    event_type    text        NOT NULL,
    attempt       integer     NOT NULL DEFAULT 1,
    redelivered   boolean     NOT NULL DEFAULT false,
    handler_ms    real,
    processed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- Retention cleanup and the status command's recent-activity queries.
CREATE INDEX processed_events_processed_at_v1 ON {{schema}}.processed_events (consumer, processed_at);
