-- Storage that stays bounded at volume (outbox_relay/db/archive.py, docs/retention.md): sent
-- events kept by --on-sent keep move to outbox_sent (partitioned by the time they were sent),
-- --retention drops its partitions whole, and the outbox, a queue, is vacuumed by the relay.
-- {{schema}} is the configured schema, %(name)s are psycopg parameters.

-- name: archive_sent
-- Settling a batch in keep mode: the confirmed rows leave the outbox for the partition of now().
WITH sent AS (
    DELETE FROM {{schema}}.outbox WHERE id = ANY(%(ids)s::bigint[])
    RETURNING id, event_id, event_type, aggregate_type, aggregate_id, payload, headers,
              created_at, attempts
)
INSERT INTO {{schema}}.outbox_sent
    (id, event_id, event_type, aggregate_type, aggregate_id, payload, headers, created_at,
     published_at, attempts)
SELECT id, event_id, event_type, aggregate_type, aggregate_id, payload, headers, created_at,
       now(), attempts
FROM sent;

-- name: sent_cover
-- Partitions from now() to now() + ahead (and any gap before); returns the end of the last one
-- as seconds since the epoch.
SELECT extract(epoch FROM {{schema}}.outbox_sent_cover(
    now(), now() + make_interval(secs => %(ahead)s), make_interval(secs => %(width)s)))::float8;

-- name: sent_policy
-- The retention this relay enforces, for status to judge whether retention is behind.
INSERT INTO {{schema}}.outbox_sent_policy (retention, width)
VALUES (make_interval(secs => %(retention)s), make_interval(secs => %(width)s))
ON CONFLICT (singleton) DO UPDATE
SET retention = EXCLUDED.retention, width = EXCLUDED.width, updated_at = now();

-- name: sent_drop_expired
-- Retention: every partition whose newest possible event is older than --retention.
SELECT {{schema}}.outbox_sent_drop_before(now() - make_interval(secs => %(retention)s));

-- name: sent_analyze_closed
-- Statistics for partitions whose time is over (the planner's and status's row estimates).
SELECT {{schema}}.outbox_sent_analyze_closed();

-- name: upkeep_lock_timeout
-- Dropping a partition waits at most this long for relays settling into it (never producers).
SET LOCAL lock_timeout = '1s';

-- name: legacy_kept_from
-- Sent rows kept in the outbox itself (by relays before migration 0006): the oldest sending
-- time still within retention, to cover with partitions before moving them (NULL: none).
SELECT min(published_at) FROM {{schema}}.outbox
WHERE published_at IS NOT NULL AND published_at >= now() - make_interval(secs => %(retention)s);

-- name: legacy_cover
SELECT {{schema}}.outbox_sent_cover(%(since)s, now(), make_interval(secs => %(width)s));

-- name: archive_legacy
-- A batch of them moved to outbox_sent, oldest first; those past retention are only deleted.
-- SKIP LOCKED: a relay of an earlier version pruning the same rows is not waited for.
WITH moved AS (
    DELETE FROM {{schema}}.outbox
    WHERE id IN (SELECT id FROM {{schema}}.outbox WHERE published_at IS NOT NULL
                 ORDER BY published_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
    RETURNING id, event_id, event_type, aggregate_type, aggregate_id, payload, headers,
              created_at, published_at, attempts
), kept AS (
    INSERT INTO {{schema}}.outbox_sent
        (id, event_id, event_type, aggregate_type, aggregate_id, payload, headers, created_at,
         published_at, attempts)
    SELECT id, event_id, event_type, aggregate_type, aggregate_id, payload, headers,
           created_at, published_at, attempts
    FROM moved
    WHERE published_at >= now() - make_interval(secs => %(retention)s)
    RETURNING 1
)
SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM kept);

-- name: outbox_dead_rows
-- Dead and live row versions in the outbox (the statistics' estimates) and whether this role may
-- vacuum it (its owner, or a superuser: VACUUM by anyone else only warns and does nothing).
SELECT coalesce((SELECT n_dead_tup FROM pg_stat_user_tables
                 WHERE relid = '{{schema}}.outbox'::regclass), 0),
       coalesce((SELECT n_live_tup FROM pg_stat_user_tables
                 WHERE relid = '{{schema}}.outbox'::regclass), 0),
       (SELECT pg_has_role(c.relowner, 'USAGE') FROM pg_class AS c
        WHERE c.oid = '{{schema}}.outbox'::regclass)
       OR coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = current_user), false);

-- name: vacuum_outbox
-- Run on a connection in autocommit (VACUUM cannot run in a transaction). SKIP_LOCKED: another
-- relay vacuuming it already is enough.
VACUUM (SKIP_LOCKED) {{schema}}.outbox;

-- name: status_kept
-- `outbox-relay status`: kept sent events (the statistics' estimates, of the partitions whose time
-- is over: exact counts would read them all),
-- their size and time span, the retention recorded by the relays, and how far behind it is.
SELECT (SELECT count(*) FROM {{schema}}.outbox_sent_partitions),
       (SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint
          FROM {{schema}}.outbox_sent_partitions AS p
          JOIN pg_class AS c ON c.oid = to_regclass('{{schema}}.' || p.name)),
       (SELECT coalesce(sum(pg_total_relation_size(to_regclass('{{schema}}.' || p.name))), 0)::bigint
          FROM {{schema}}.outbox_sent_partitions AS p),
       (SELECT min(from_time) FROM {{schema}}.outbox_sent_partitions),
       (SELECT extract(epoch FROM retention)::float8 FROM {{schema}}.outbox_sent_policy),
       -- Behind: seconds the oldest partition has outlived --retention, past the two minutes
       -- the relays' passes may take to drop it (NULL: not behind).
       (SELECT extract(epoch FROM now() - pol.retention - min(p.to_time))::float8
          FROM {{schema}}.outbox_sent_policy AS pol, {{schema}}.outbox_sent_partitions AS p
          GROUP BY pol.retention
          HAVING min(p.to_time) < now() - pol.retention - interval '2 minutes'),
       (SELECT count(*) FROM {{schema}}.outbox WHERE published_at IS NOT NULL),
       (SELECT coalesce(n_dead_tup, 0) FROM pg_stat_user_tables
          WHERE relid = '{{schema}}.outbox'::regclass),
       pg_total_relation_size('{{schema}}.outbox');
