-- The consumer inbox's schema as every migration in inbox/ leaves it, to read in one place.
-- `outbox-relay consume` (or outbox_relay.consumer.inbox.migrate_inbox) creates it, from the
-- migrations; a new migration updates this file too, and
-- tests/integration/test_migrations_match_schema.py fails until both give the same schema.
-- It lives in the CONSUMER's database, next to the tables its handlers write, so the handler's
-- work and its inbox row commit in one transaction. {{schema}} is the configured schema name.

-- The migrations applied, one row each (written by the migration runner, db/migrations.py).
CREATE TABLE {{schema}}.inbox_schema_version (
    version               integer     PRIMARY KEY,
    name                  text        NOT NULL,
    applied_at            timestamptz NOT NULL DEFAULT now(),
    relay_compatible_from integer
);

-- One row per event a consumer has applied.
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
