-- Every query the relay, status and admin commands run. Loaded by outbox_relay/queries.py;
-- {{schema}} is the configured schema, %(name)s are psycopg parameters.

-- name: schema_version
SELECT max(version) FROM {{schema}}.outbox_schema_version;

-- name: try_lead
-- One relay per schema publishes at a time; the others wait as standbys. A session lock on the
-- relay's working connection: it dies with the connection, so a killed leader frees it at once.
SELECT pg_try_advisory_lock(1868724339, hashtext(%(schema)s) & 2147483647);

-- name: claim
-- Pending rows in id (= per-aggregate commit) order, skipping every aggregate whose earliest
-- pending event is backing off after a failure, so later events never overtake it.
SELECT id, event_id::text, event_type, aggregate_type, aggregate_id, payload::text,
       headers::text, created_at, attempts
FROM {{schema}}.outbox
WHERE published_at IS NULL AND dead_at IS NULL
  AND (next_attempt_at IS NULL OR next_attempt_at <= now())
  AND (aggregate_id IS NULL OR aggregate_id NOT IN (
        SELECT aggregate_id FROM {{schema}}.outbox
        WHERE next_attempt_at > now() AND published_at IS NULL AND dead_at IS NULL
          AND aggregate_id IS NOT NULL))
ORDER BY id
LIMIT %(limit)s
FOR UPDATE;

-- name: delete_sent
DELETE FROM {{schema}}.outbox WHERE id = ANY(%(ids)s);

-- name: mark_sent
UPDATE {{schema}}.outbox
SET published_at = now(), next_attempt_at = NULL, last_error = NULL
WHERE id = ANY(%(ids)s);

-- name: record_failures
-- Exponential backoff per event; dead after max_attempts, or at once when the failure is permanent.
UPDATE {{schema}}.outbox AS o
SET attempts = o.attempts + 1,
    last_error = f.reason,
    next_attempt_at = CASE
        WHEN f.permanent OR o.attempts + 1 >= %(max_attempts)s THEN NULL
        ELSE now() + make_interval(secs => least(%(backoff_max)s, %(backoff_base)s * 2 ^ o.attempts))
    END,
    dead_at = CASE WHEN f.permanent OR o.attempts + 1 >= %(max_attempts)s THEN now() END
FROM unnest(%(ids)s::bigint[], %(reasons)s::text[], %(permanent)s::boolean[])
    AS f(id, reason, permanent)
WHERE o.id = f.id
RETURNING o.id, o.dead_at IS NOT NULL;

-- name: count_published
INSERT INTO {{schema}}.outbox_relay_stats (minute, published, dead)
VALUES (date_trunc('second', now()), %(published)s, %(dead)s)
ON CONFLICT (minute) DO UPDATE
SET published = outbox_relay_stats.published + EXCLUDED.published,
    dead = outbox_relay_stats.dead + EXCLUDED.dead;

-- name: start_listening
INSERT INTO {{schema}}.outbox_relay_wakeup (singleton, listening_until)
VALUES (true, now() + make_interval(secs => %(seconds)s))
ON CONFLICT (singleton) DO UPDATE SET listening_until = EXCLUDED.listening_until;

-- name: transactions_in_progress
-- Writers that may have read the wake-up flag before the relay set it; once they have all ended,
-- one more claim sees every row whose producer did not ring.
SELECT coalesce(array_agg(x::text::bigint), '{}') FROM pg_snapshot_xip(pg_current_snapshot()) AS x;

-- name: all_ended
SELECT coalesce(bool_and(pg_xact_status(x::text::xid8) IS DISTINCT FROM 'in progress'), true)
FROM unnest(%(xids)s::bigint[]) AS x;

-- name: stop_listening
DELETE FROM {{schema}}.outbox_relay_wakeup;

-- name: next_retry_in
SELECT extract(epoch FROM min(next_attempt_at) - now())::float8
FROM {{schema}}.outbox
WHERE next_attempt_at IS NOT NULL AND published_at IS NULL AND dead_at IS NULL;

-- name: prune_published
DELETE FROM {{schema}}.outbox
WHERE id IN (SELECT id FROM {{schema}}.outbox
             WHERE published_at < now() - make_interval(secs => %(retention)s)
             LIMIT 10000);

-- name: prune_stats
DELETE FROM {{schema}}.outbox_relay_stats WHERE minute < now() - interval '2 hours';

-- name: status
SELECT
    (SELECT count(*) FROM {{schema}}.outbox WHERE published_at IS NULL AND dead_at IS NULL),
    (SELECT extract(epoch FROM now() - min(created_at))::float8
       FROM {{schema}}.outbox WHERE published_at IS NULL AND dead_at IS NULL),
    (SELECT count(*) FROM {{schema}}.outbox
       WHERE next_attempt_at IS NOT NULL AND published_at IS NULL AND dead_at IS NULL),
    (SELECT count(*) FROM {{schema}}.outbox WHERE dead_at IS NOT NULL),
    (SELECT coalesce(sum(published), 0) FROM {{schema}}.outbox_relay_stats
       WHERE minute > now() - interval '1 minute'),
    (SELECT coalesce(sum(published), 0) FROM {{schema}}.outbox_relay_stats
       WHERE minute > now() - interval '1 hour'),
    (SELECT count(*) FROM pg_stat_activity
       WHERE datname = current_database() AND application_name = %(application_name)s),
    (SELECT pid FROM pg_locks
       WHERE locktype = 'advisory' AND granted AND classid = 1868724339
         AND objid = (hashtext(%(schema)s) & 2147483647)::oid AND objsubid = 2
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())),
    (SELECT max(version) FROM {{schema}}.outbox_schema_version);

-- name: dead_list
SELECT event_id::text, event_type, aggregate_id, attempts, last_error, dead_at, created_at
FROM {{schema}}.outbox
WHERE dead_at IS NOT NULL
ORDER BY id
LIMIT %(limit)s;

-- name: dead_retry
UPDATE {{schema}}.outbox
SET dead_at = NULL, attempts = 0, next_attempt_at = NULL, last_error = NULL
WHERE dead_at IS NOT NULL AND (%(all)s OR event_id = ANY(%(event_ids)s::uuid[]))
RETURNING event_id::text;
