-- 0005: `outbox-relay replay` remembers each replay, so an interrupted one resumes where its
-- broker confirms reached (outbox_relay/relay/replay.py). A new table only: relays of earlier
-- versions never read it.
-- relay-compatible-from: 4

CREATE TABLE {{schema}}.outbox_replays (
    name        text        PRIMARY KEY,
    -- The selection as given (--since 2h stays "2h") and as resolved (absolute times), and
    -- where the events go (the broker URL without its password, the exchange or prefix).
    selection   jsonb       NOT NULL,
    destination text        NOT NULL,
    -- Rows above this id were not sent yet when the replay started: the relay owns them.
    upper_id    bigint      NOT NULL,
    -- Every selected row up to this id is confirmed by the broker; a resume starts after it.
    position    bigint      NOT NULL DEFAULT 0,
    replayed    bigint      NOT NULL DEFAULT 0,
    dead_skipped bigint     NOT NULL DEFAULT 0,
    -- running (or killed while running), interrupted, failed, done.
    state       text        NOT NULL DEFAULT 'running'
        CHECK (state IN ('running', 'interrupted', 'failed', 'done')),
    last_error  text,
    started_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
