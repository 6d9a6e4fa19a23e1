-- Several active relays (outbox_relay/relay/leases.py): membership and partition leases.
-- Every statement runs on the relay's coordinator connection, in its own short transaction.
-- A relay is alive while its member row is fresh and its backend (pid, backend_start) exists.

-- name: lease_count
SELECT count(*) FROM {{schema}}.outbox_relay_leases WHERE scope = %(scope)s;

-- name: member_alive_elsewhere
-- Another live relay already goes by this name (two relays must never share one).
SELECT EXISTS (
    SELECT FROM {{schema}}.outbox_relay_members AS m
    JOIN pg_stat_activity AS a ON a.pid = m.pid AND a.backend_start = m.backend_start
    WHERE m.relay = %(relay)s AND m.pid <> pg_backend_pid()
      AND m.heartbeat_at > now() - make_interval(secs => %(ttl)s));

-- name: member_join
-- A relay restarted under the same name starts afresh: what its earlier run held is released
-- (epoch raised), so that run can settle nothing more even if it is somehow still alive.
WITH previous AS (
    UPDATE {{schema}}.outbox_relay_leases
    SET relay = NULL, epoch = epoch + 1, expires_at = NULL, changed_at = now()
    WHERE relay = %(relay)s
)
INSERT INTO {{schema}}.outbox_relay_members (relay, pid, backend_start, lane_pids, lane_starts)
SELECT %(relay)s, a.pid, a.backend_start, l.pids, l.starts
FROM pg_stat_activity AS a,
     (SELECT coalesce(array_agg(pid), '{}') AS pids,
             coalesce(array_agg(backend_start), '{}') AS starts
      FROM pg_stat_activity WHERE pid = ANY(%(lanes)s::integer[])) AS l
WHERE a.pid = pg_backend_pid()
ON CONFLICT (relay) DO UPDATE
SET pid = EXCLUDED.pid, backend_start = EXCLUDED.backend_start, joined_at = now(),
    heartbeat_at = now(), lane_pids = EXCLUDED.lane_pids, lane_starts = EXCLUDED.lane_starts;

-- name: member_beat
-- The heartbeat in one round trip: refresh this relay's membership, extend its leases, and tell
-- what the rest of the beat needs (relay/leases.py): whether it is still a member (false: it
-- was removed as dead and must rejoin), the partitions it still holds, the live members, and
-- whether a dead one waits to be removed. Nothing else runs while all that is unchanged.
WITH me AS (
    UPDATE {{schema}}.outbox_relay_members SET heartbeat_at = now()
    WHERE relay = %(relay)s AND pid = pg_backend_pid()
    RETURNING relay
), renewed AS (
    UPDATE {{schema}}.outbox_relay_leases
    SET expires_at = now() + make_interval(secs => %(ttl)s)
    WHERE scope = %(scope)s AND relay = %(relay)s AND EXISTS (SELECT FROM me)
    RETURNING partition
), members AS (
    SELECT m.relay,
           m.heartbeat_at > now() - make_interval(secs => %(ttl)s)
           AND EXISTS (SELECT FROM pg_stat_activity AS a
                       WHERE a.pid = m.pid AND a.backend_start = m.backend_start) AS alive
    FROM {{schema}}.outbox_relay_members AS m
)
SELECT EXISTS (SELECT FROM me),
       coalesce((SELECT array_agg(partition ORDER BY partition) FROM renewed), '{}'),
       coalesce((SELECT array_agg(relay ORDER BY relay) FROM members WHERE alive), '{}'),
       EXISTS (SELECT FROM members WHERE NOT alive);

-- name: live_members
SELECT m.relay FROM {{schema}}.outbox_relay_members AS m
WHERE m.heartbeat_at > now() - make_interval(secs => %(ttl)s)
  AND EXISTS (SELECT FROM pg_stat_activity AS a
              WHERE a.pid = m.pid AND a.backend_start = m.backend_start)
ORDER BY m.relay;

-- name: remove_dead_members
-- Members whose backend is gone (killed relay) or whose heartbeat is stale (a host cut off or
-- paused): removed, and the connections of a stale one still open are ended, which releases
-- the locks its claims hold (fencing: it can settle nothing more).
WITH dead AS (
    DELETE FROM {{schema}}.outbox_relay_members AS m
    WHERE m.heartbeat_at <= now() - make_interval(secs => %(ttl)s)
       OR NOT EXISTS (SELECT FROM pg_stat_activity AS a
                      WHERE a.pid = m.pid AND a.backend_start = m.backend_start)
    RETURNING m.relay, m.lane_pids, m.lane_starts
), lanes AS (
    SELECT d.relay, l.pid, l.started
    FROM dead AS d, unnest(d.lane_pids, d.lane_starts) AS l(pid, started)
)
SELECT d.relay, count(pg_terminate_backend(a.pid))
FROM dead AS d
LEFT JOIN lanes AS l ON l.relay = d.relay
LEFT JOIN pg_stat_activity AS a
    ON a.pid = l.pid AND a.backend_start = l.started AND a.pid <> pg_backend_pid()
GROUP BY d.relay;

-- name: release_leases
-- Hands partitions over. FOR UPDATE waits until the batches this relay has in flight for them
-- have settled (their claims hold the rows FOR KEY SHARE): no overlap at hand-over.
WITH handed AS (
    SELECT scope, partition FROM {{schema}}.outbox_relay_leases
    WHERE scope = %(scope)s AND relay = %(relay)s AND partition = ANY(%(partitions)s)
    FOR UPDATE
)
UPDATE {{schema}}.outbox_relay_leases AS l
SET relay = NULL, epoch = l.epoch + 1, expires_at = NULL, changed_at = now()
FROM handed AS h
WHERE l.scope = h.scope AND l.partition = h.partition
RETURNING l.partition;

-- name: take_leases
-- Free leases, lapsed ones, and those of relays no longer alive, up to %(wanted)s. A lease whose
-- row another relay's claim still holds (SKIP LOCKED) is taken at a later heartbeat, once that
-- claim's batch has settled.
WITH alive AS (
    SELECT m.relay FROM {{schema}}.outbox_relay_members AS m
    WHERE m.heartbeat_at > now() - make_interval(secs => %(ttl)s)
      AND EXISTS (SELECT FROM pg_stat_activity AS a
                  WHERE a.pid = m.pid AND a.backend_start = m.backend_start)
), free AS (
    SELECT scope, partition FROM {{schema}}.outbox_relay_leases
    WHERE scope = %(scope)s
      AND (relay IS NULL OR expires_at < now() OR relay NOT IN (SELECT relay FROM alive))
    ORDER BY partition
    LIMIT %(wanted)s
    FOR UPDATE SKIP LOCKED
)
UPDATE {{schema}}.outbox_relay_leases AS l
SET relay = %(relay)s, epoch = l.epoch + 1,
    expires_at = now() + make_interval(secs => %(ttl)s), changed_at = now()
FROM free AS f
WHERE l.scope = f.scope AND l.partition = f.partition
RETURNING l.partition, l.epoch;

-- name: leave
-- Stopping: every lease handed over at once (in flight has settled), membership ended.
WITH released AS (
    UPDATE {{schema}}.outbox_relay_leases
    SET relay = NULL, epoch = epoch + 1, expires_at = NULL, changed_at = now()
    WHERE relay = %(relay)s
)
DELETE FROM {{schema}}.outbox_relay_members WHERE relay = %(relay)s AND pid = pg_backend_pid();

-- name: set_lease_count
-- `migrate --partitions N` / `--cdc-shards S`: the scope's leases become 0..N-1, all free, each
-- epoch raised, so every relay gives its share up and takes a new one.
WITH dropped AS (
    DELETE FROM {{schema}}.outbox_relay_leases
    WHERE scope = %(scope)s AND partition >= %(count)s
), raised AS (
    UPDATE {{schema}}.outbox_relay_leases
    SET relay = NULL, epoch = epoch + 1, expires_at = NULL, changed_at = now()
    WHERE scope = %(scope)s AND partition < %(count)s
)
INSERT INTO {{schema}}.outbox_relay_leases (scope, partition)
SELECT %(scope)s, generate_series(0, %(count)s - 1)
ON CONFLICT (scope, partition) DO NOTHING;
