-- `outbox-relay replay` (outbox_relay/db/replays.py): sent events kept by --on-sent keep, read
-- again in id (= per-aggregate commit) order from outbox_history (kept events and dead rows,
-- see migration 0006), and the progress of each named replay.
-- {{schema}} is the configured schema, %(name)s are psycopg parameters.
--
-- The selection, the same in replay_count and replay_page: created_at from since (inclusive) to
-- until (exclusive), event types matching any of the patterns (regular expressions over
-- '.' || event_type, made from AMQP topic patterns by messages.topic_regex), aggregate types
-- and ids among those given; an empty list selects all. A kept row was published after it was
-- created, so published_at >= since holds for every row created since then: only the partitions
-- of outbox_sent sent since then are read.

-- name: replay_kept_range
-- Whether anything is kept at all (--on-sent delete keeps nothing), and from when to when it
-- was sent: the sending times of the first and last kept events by id (each an index probe;
-- exact to within the few events a retry sent out of id order), and of sent rows kept in the
-- outbox by relays before migration 0006.
SELECT least((SELECT published_at FROM {{schema}}.outbox_sent ORDER BY id LIMIT 1),
             (SELECT min(published_at) FROM {{schema}}.outbox WHERE published_at IS NOT NULL)),
       greatest((SELECT published_at FROM {{schema}}.outbox_sent ORDER BY id DESC LIMIT 1),
                (SELECT max(published_at) FROM {{schema}}.outbox WHERE published_at IS NOT NULL));

-- name: replay_upper_id
-- Rows above this were not sent when the replay started: they are the relay's.
SELECT greatest(coalesce((SELECT max(id) FROM {{schema}}.outbox), 0),
                coalesce((SELECT max(id) FROM {{schema}}.outbox_sent), 0));

-- name: replay_count
-- Per event type: kept rows and dead rows of the selection after a position.
SELECT o.event_type,
       count(*) FILTER (WHERE o.published_at IS NOT NULL),
       count(*) FILTER (WHERE o.dead_at IS NOT NULL)
FROM {{schema}}.outbox_history AS o
WHERE o.id > %(after)s AND o.id <= %(upper_id)s
  AND (o.published_at IS NOT NULL OR o.dead_at IS NOT NULL)
  AND (%(since)s::timestamptz IS NULL
       OR (o.created_at >= %(since)s::timestamptz
           AND (o.published_at >= %(since)s::timestamptz OR o.dead_at IS NOT NULL)))
  AND (%(until)s::timestamptz IS NULL OR o.created_at < %(until)s::timestamptz)
  AND (cardinality(%(patterns)s::text[]) = 0 OR ('.' || o.event_type) ~ ANY(%(patterns)s::text[]))
  AND (cardinality(%(aggregate_types)s::text[]) = 0
       OR o.aggregate_type = ANY(%(aggregate_types)s::text[]))
  AND (cardinality(%(aggregate_ids)s::text[]) = 0
       OR o.aggregate_id = ANY(%(aggregate_ids)s::text[]))
GROUP BY o.event_type
ORDER BY o.event_type;

-- name: replay_page
-- The next rows of the selection after a position, in id order, as the claim query returns
-- them (see rows.message_from_row), plus whether the row is dead.
SELECT o.id, o.event_id::text, o.event_type, o.aggregate_type, o.aggregate_id,
       o.payload::text, o.headers::text,
       CASE WHEN o.created_at >= '0001-01-02 00:00:00+00' AND o.created_at < '9999-12-30 00:00:00+00'
            THEN o.created_at END,
       CASE WHEN o.created_at >= '0001-01-02 00:00:00+00' AND o.created_at < '9999-12-30 00:00:00+00'
            THEN NULL ELSE o.created_at::text END,
       o.attempts,
       o.dead_at IS NOT NULL
FROM {{schema}}.outbox_history AS o
WHERE o.id > %(after)s AND o.id <= %(upper_id)s
  AND (o.published_at IS NOT NULL OR (%(include_dead)s AND o.dead_at IS NOT NULL))
  AND (%(since)s::timestamptz IS NULL
       OR (o.created_at >= %(since)s::timestamptz
           AND (o.published_at >= %(since)s::timestamptz OR o.dead_at IS NOT NULL)))
  AND (%(until)s::timestamptz IS NULL OR o.created_at < %(until)s::timestamptz)
  AND (cardinality(%(patterns)s::text[]) = 0 OR ('.' || o.event_type) ~ ANY(%(patterns)s::text[]))
  AND (cardinality(%(aggregate_types)s::text[]) = 0
       OR o.aggregate_type = ANY(%(aggregate_types)s::text[]))
  AND (cardinality(%(aggregate_ids)s::text[]) = 0
       OR o.aggregate_id = ANY(%(aggregate_ids)s::text[]))
ORDER BY o.id
LIMIT %(limit)s;

-- name: replay_lock
-- One process per named replay: a session lock, gone with the process that held it.
SELECT pg_try_advisory_lock(1868724349, hashtext(%(name)s));

-- name: replay_get
SELECT name, selection, destination, upper_id, position, replayed, dead_skipped, state,
       last_error, started_at, updated_at, finished_at
FROM {{schema}}.outbox_replays
WHERE name = %(name)s;

-- name: replay_list
SELECT name, selection, destination, upper_id, position, replayed, dead_skipped, state,
       last_error, started_at, updated_at, finished_at
FROM {{schema}}.outbox_replays
ORDER BY started_at DESC
LIMIT %(limit)s;

-- name: replay_start
-- A new replay, or one started over under the same name.
INSERT INTO {{schema}}.outbox_replays (name, selection, destination, upper_id)
VALUES (%(name)s, %(selection)s, %(destination)s, %(upper_id)s)
ON CONFLICT (name) DO UPDATE
SET selection = EXCLUDED.selection, destination = EXCLUDED.destination,
    upper_id = EXCLUDED.upper_id, position = 0, replayed = 0, dead_skipped = 0,
    state = 'running', last_error = NULL, started_at = now(), updated_at = now(),
    finished_at = NULL;

-- name: replay_resume
UPDATE {{schema}}.outbox_replays
SET state = 'running', last_error = NULL, updated_at = now()
WHERE name = %(name)s;

-- name: replay_checkpoint
-- Every selected row up to position is confirmed; replayed counts every confirmed event.
UPDATE {{schema}}.outbox_replays
SET position = %(position)s, replayed = %(replayed)s, dead_skipped = %(dead_skipped)s,
    updated_at = now()
WHERE name = %(name)s;

-- name: replay_finish
UPDATE {{schema}}.outbox_replays
SET position = %(position)s, replayed = %(replayed)s, dead_skipped = %(dead_skipped)s,
    state = %(state)s, last_error = %(last_error)s, updated_at = now(),
    finished_at = CASE WHEN %(state)s = 'done' THEN now() END
WHERE name = %(name)s;
