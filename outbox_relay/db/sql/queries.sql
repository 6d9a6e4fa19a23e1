-- Every query the relay, status and admin commands run. Loaded by outbox_relay/queries.py;
-- {{schema}} is the configured schema, %(name)s are psycopg parameters.

-- name: schema_version
-- The highest migration applied and the oldest relay it allows (see migrations.py); works on
-- a version table from before relay_compatible_from existed.
SELECT max(version), max(coalesce((to_jsonb(v) ->> 'relay_compatible_from')::int, version))
FROM {{schema}}.outbox_schema_version AS v;

-- name: session_keepalives
-- Server-side TCP keepalives for the relay's sessions: a vanished relay's session (and what it
-- holds: its leadership, its claimed rows' locks) ends within about a minute (30 s idle + 3
-- probes 10 s apart). Ignored on Unix-socket connections.
SELECT set_config('tcp_keepalives_idle', '30', false),
       set_config('tcp_keepalives_interval', '10', false),
       set_config('tcp_keepalives_count', '3', false);

-- name: claim
-- Pending rows in id (= per-aggregate commit) order, of the partitions this relay leases,
-- skipping every aggregate whose earliest pending event is backing off after a failure, so
-- later events never overtake it, and the rows of the batches this relay has in flight on its
-- other connections. Rows locked by anyone else are waited for, never skipped: skipping them
-- could let a later event of their aggregate overtake. The lease rows are held FOR KEY SHARE
-- until the batch settles: the lease cannot change hands meanwhile (relay/leases.py); unless
-- every partition asked for is still leased, nothing is claimed. Rows are matched by their
-- ordering bucket against the buckets of those partitions, given as values rather than joined
-- from ``mine``: with the bucket's statistics (outbox_bucket_v1) the planner knows how many rows
-- they hold and walks the pending index in id order, stopping at the limit, instead of sorting
-- the whole backlog (the store runs this unprepared, so each claim is planned with its values).
WITH mine AS (
    SELECT partition FROM {{schema}}.outbox_relay_leases
    WHERE scope = %(scope)s AND relay = %(relay)s AND partition = ANY(%(partitions)s::integer[])
      AND expires_at > now()
    FOR KEY SHARE
)
SELECT o.id, o.event_id::text, o.event_type, o.aggregate_type, o.aggregate_id,
       o.payload::text, o.headers::text,
       -- A timestamp Python cannot hold ('infinity', year 10000) comes as NULL plus its text,
       -- so the row is dead-lettered with a reason instead of failing the whole claim.
       CASE WHEN o.created_at >= '0001-01-02 00:00:00+00' AND o.created_at < '9999-12-30 00:00:00+00'
            THEN o.created_at END,
       CASE WHEN o.created_at >= '0001-01-02 00:00:00+00' AND o.created_at < '9999-12-30 00:00:00+00'
            THEN NULL ELSE o.created_at::text END,
       o.attempts
FROM {{schema}}.outbox AS o
WHERE (SELECT count(*) FROM mine) = cardinality(%(partitions)s::integer[])
  AND o.published_at IS NULL AND o.dead_at IS NULL
  -- The row's ordering bucket (the event id's hash without an aggregate); its partition is
  -- the bucket modulo the number of partitions.
  AND (coalesce(hashtext(o.aggregate_id), uuid_hash(o.event_id)) & 1023)
      = ANY(%(buckets)s::integer[])
  -- A hashed set: the batches in flight hold thousands of ids.
  AND o.id NOT IN (SELECT unnest(%(in_flight)s::bigint[]))
  AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= now())
  AND (o.aggregate_id IS NULL OR o.aggregate_id NOT IN (
        SELECT aggregate_id FROM {{schema}}.outbox
        WHERE next_attempt_at > now() AND published_at IS NULL AND dead_at IS NULL
          AND aggregate_id IS NOT NULL))
ORDER BY o.id
LIMIT %(limit)s
FOR UPDATE OF o;

-- name: delete_sent
DELETE FROM {{schema}}.outbox WHERE id = ANY(%(ids)s::bigint[]);

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
-- This relay's own request: another relay turning busy leaves it in place.
INSERT INTO {{schema}}.outbox_relay_listeners (relay, listening_until)
VALUES (%(relay)s, now() + make_interval(secs => %(seconds)s))
ON CONFLICT (relay) DO UPDATE SET listening_until = EXCLUDED.listening_until;

-- name: transactions_in_progress
-- Writers that may have read the wake-up flag before the relay set it; once they have all ended,
-- one more claim sees every row whose producer did not ring.
SELECT coalesce(array_agg(x::text::bigint), '{}') FROM pg_snapshot_xip(pg_current_snapshot()) AS x;

-- name: all_ended
SELECT coalesce(bool_and(pg_xact_status(x::text::xid8) IS DISTINCT FROM 'in progress'), true)
FROM unnest(%(xids)s::bigint[]) AS x;

-- name: stop_listening
DELETE FROM {{schema}}.outbox_relay_listeners WHERE relay = %(relay)s;

-- name: anything_due
-- An idle relay's poll (relay/sources.py): is any row pending and due? Only then does it claim.
-- Run in the shared rounds of statements, so it takes no parameters.
SELECT EXISTS (SELECT FROM {{schema}}.outbox
               WHERE published_at IS NULL AND dead_at IS NULL
                 AND (next_attempt_at IS NULL OR next_attempt_at <= now()));

-- name: next_retry_in
SELECT extract(epoch FROM min(next_attempt_at) - now())::float8
FROM {{schema}}.outbox
WHERE next_attempt_at IS NOT NULL AND published_at IS NULL AND dead_at IS NULL;

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
    -- Relays at work (live members), and, for the leader_pid key kept from the one-leader
    -- days, the lowest backend pid among them.
    (SELECT count(*) FROM {{schema}}.outbox_relay_members AS m
       WHERE m.heartbeat_at > now() - interval '10 seconds'
         AND EXISTS (SELECT FROM pg_stat_activity AS a
                     WHERE a.pid = m.pid AND a.backend_start = m.backend_start)),
    (SELECT min(m.pid) FROM {{schema}}.outbox_relay_members AS m
       WHERE m.heartbeat_at > now() - interval '10 seconds'
         AND EXISTS (SELECT FROM pg_stat_activity AS a
                     WHERE a.pid = m.pid AND a.backend_start = m.backend_start)),
    (SELECT max(version) FROM {{schema}}.outbox_schema_version);

-- name: status_relays
-- Each relay at work: its partitions (or CDC shards), and its lag: the age of the oldest pending
-- event in them.
WITH live AS (
    SELECT m.relay, m.pid, m.joined_at, m.heartbeat_at
    FROM {{schema}}.outbox_relay_members AS m
    WHERE m.heartbeat_at > now() - interval '10 seconds'
      AND EXISTS (SELECT FROM pg_stat_activity AS a
                  WHERE a.pid = m.pid AND a.backend_start = m.backend_start)
), counts AS (
    SELECT scope, count(*)::integer AS n FROM {{schema}}.outbox_relay_leases GROUP BY scope
)
SELECT l.relay, l.pid, l.joined_at,
       coalesce(array_agg(ls.partition ORDER BY ls.partition)
                FILTER (WHERE ls.scope = 'partition'), '{}'),
       coalesce(array_agg(ls.partition ORDER BY ls.partition)
                FILTER (WHERE ls.scope = 'cdc-shard'), '{}'),
       (SELECT extract(epoch FROM now() - min(o.created_at))::float8
        FROM {{schema}}.outbox AS o
        WHERE o.published_at IS NULL AND o.dead_at IS NULL
          AND EXISTS (
              SELECT FROM {{schema}}.outbox_relay_leases AS own JOIN counts AS c USING (scope)
              WHERE own.relay = l.relay AND own.expires_at > now()
                AND own.partition = mod(coalesce(hashtext(o.aggregate_id), uuid_hash(o.event_id))
                                        & 1023, c.n)))
FROM live AS l
LEFT JOIN {{schema}}.outbox_relay_leases AS ls ON ls.relay = l.relay AND ls.expires_at > now()
GROUP BY l.relay, l.pid, l.joined_at
ORDER BY l.relay;

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

-- name: sweep_request
-- Rows made pending without an insert reach no CDC relay through the WAL: this transactional
-- message (committed with them) asks the relays streaming the outbox to read the table at once.
SELECT pg_logical_emit_message(true, %(prefix)s, '')::text;

-- ------------------------------------------------------------------------------------------
-- CDC mode (--mode cdc, outbox_relay/cdc.py and slots.py). {publication} and {slot} are
-- filled in with psycopg.sql.Identifier / Literal.

-- name: cdc_claim_ids
-- The rows the WAL says were committed, if still pending (the table path may have published them
-- first), locked until settle() like claim, with the lease of their shard.
WITH mine AS (
    SELECT partition FROM {{schema}}.outbox_relay_leases
    WHERE scope = %(scope)s AND relay = %(relay)s AND partition = ANY(%(partitions)s::integer[])
      AND expires_at > now()
    FOR KEY SHARE
)
SELECT o.id, o.event_id::text, o.event_type, o.aggregate_type, o.aggregate_id,
       o.payload::text, o.headers::text,
       CASE WHEN o.created_at >= '0001-01-02 00:00:00+00' AND o.created_at < '9999-12-30 00:00:00+00'
            THEN o.created_at END,
       CASE WHEN o.created_at >= '0001-01-02 00:00:00+00' AND o.created_at < '9999-12-30 00:00:00+00'
            THEN NULL ELSE o.created_at::text END,
       o.attempts
FROM {{schema}}.outbox AS o
WHERE o.id = ANY(%(ids)s::bigint[]) AND o.published_at IS NULL AND o.dead_at IS NULL
  AND mod(coalesce(hashtext(o.aggregate_id), uuid_hash(o.event_id)) & 1023, %(count)s)
      IN (SELECT partition FROM mine)
ORDER BY o.id
FOR UPDATE OF o;

-- name: cdc_transactions_visible
-- Whether these transactions, committed by the WAL's account, show in a new snapshot: the
-- walsender can send a commit a moment before the committing session makes it visible. The
-- WAL's xids are 32 bits: each is put in the epoch that places it nearest the snapshot's xmax.
WITH s AS (
    SELECT pg_current_snapshot() AS snap,
           pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax
), wal AS (
    SELECT (s.xmax & ~4294967295::bigint) | x AS xid FROM s, unnest(%(xids)s::bigint[]) AS x
)
SELECT coalesce(bool_and(pg_visible_in_snapshot(
           greatest(0, CASE WHEN wal.xid > s.xmax + 2147483648 THEN wal.xid - 4294967296
                            WHEN wal.xid < s.xmax - 2147483648 THEN wal.xid + 4294967296
                            ELSE wal.xid END)::text::xid8,
           s.snap)), true)
FROM s, wal;

-- name: cdc_earliest_pending
-- Per aggregate, its earliest pending event outside the batch that precedes one in it: such an
-- event (retrying, held back, or committed while no slot existed) must be published first, by
-- the table path.
SELECT o.aggregate_id, min(o.id)
FROM {{schema}}.outbox AS o
WHERE o.published_at IS NULL AND o.dead_at IS NULL
  AND o.aggregate_id IN (SELECT unnest(%(aggregates)s::text[]))
  AND o.id < %(before)s
  AND o.id NOT IN (SELECT unnest(%(ids)s::bigint[]))
GROUP BY o.aggregate_id;

-- name: cdc_heartbeat
-- Non-transactional: reaches the slot at once, so an idle slot still gets a position to
-- confirm while other tables fill the WAL.
SELECT pg_logical_emit_message(false, %(prefix)s, '')::text;

-- name: cdc_wal_level
SELECT current_setting('wal_level');

-- name: cdc_publication_exists
SELECT EXISTS (SELECT FROM pg_publication WHERE pubname = %(publication)s);

-- name: cdc_publication_columns
-- The outbox columns a publication streams (every column for one made before the column list).
SELECT attnames FROM pg_publication_tables
WHERE pubname = %(publication)s AND schemaname || '.' || tablename = '{{schema}}.outbox';

-- The publications stream only the id column: the relay reads each row back by id in the
-- transaction that settles it, so the rest of the row would be sent and decoded for nothing
-- (decoding a whole 300-byte event cost more relay CPU than claiming it).

-- name: cdc_create_publication
CREATE PUBLICATION {publication} FOR TABLE {{schema}}.outbox (id) WITH (publish = 'insert');

-- name: cdc_create_shard_publication
-- One of several CDC shards: its rows only, by partition (the claim queries' expression).
CREATE PUBLICATION {publication} FOR TABLE {{schema}}.outbox (id)
    WHERE (mod(coalesce(hashtext(aggregate_id), uuid_hash(event_id)) & 1023, {shards}) = {shard})
    WITH (publish = 'insert');

-- name: cdc_narrow_publication
-- A publication made by an earlier version (every column) narrowed to the id column.
ALTER PUBLICATION {publication} SET TABLE {{schema}}.outbox (id);

-- name: cdc_narrow_shard_publication
ALTER PUBLICATION {publication} SET TABLE {{schema}}.outbox (id)
    WHERE (mod(coalesce(hashtext(aggregate_id), uuid_hash(event_id)) & 1023, {shards}) = {shard});

-- name: cdc_slot
SELECT slot_type, plugin, database = current_database(), active, active_pid,
       confirmed_flush_lsn::text,
       pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint
FROM pg_replication_slots WHERE slot_name = %(slot)s;

-- name: cdc_create_slot
SELECT lsn::text FROM pg_create_logical_replication_slot(%(slot)s, 'pgoutput');

-- name: cdc_drop_slot
SELECT pg_drop_replication_slot(%(slot)s);

-- name: cdc_drop_publication
DROP PUBLICATION IF EXISTS {publication};

-- name: pending_summary
-- The backlog gauges of the metrics endpoint (sampled every few seconds, not per scrape).
SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8
  FROM {{schema}}.outbox WHERE published_at IS NULL AND dead_at IS NULL;

-- name: cdc_materialize
-- Events written straight to the WAL (pg_logical_emit_message) become pending rows here, in WAL
-- order, so they take the same publish / settle / retry path as rows; an event seen again after
-- a restart (same event_id) is not added twice.
INSERT INTO {{schema}}.outbox
    (event_id, event_type, aggregate_type, aggregate_id, payload, headers, created_at)
SELECT e.event_id, e.event_type, e.aggregate_type, e.aggregate_id, e.payload, e.headers, e.created_at
FROM unnest(%(event_ids)s::uuid[], %(event_types)s::text[], %(aggregate_types)s::text[],
            %(aggregate_ids)s::text[], %(payloads)s::jsonb[], %(headers)s::jsonb[],
            %(created)s::timestamptz[])
     WITH ORDINALITY AS e(event_id, event_type, aggregate_type, aggregate_id, payload, headers,
                          created_at, n)
ORDER BY e.n
ON CONFLICT (event_id) DO NOTHING;

-- name: cdc_ids_of_events
SELECT event_id::text, id FROM {{schema}}.outbox WHERE event_id = ANY(%(event_ids)s::uuid[]);
