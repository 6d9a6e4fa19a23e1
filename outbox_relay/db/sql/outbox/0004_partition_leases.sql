-- 0004: several active relays share one outbox. The rows are split into partitions by
-- aggregate (each partition a set of the 1,024 ordering buckets), and each partition is leased
-- to one relay at a time; the lease rows are the fencing (see outbox_relay/relay/leases.py).
-- Also: the producers' bucket function (the order to write several aggregates in), and
-- created_at bounded for new rows.
-- Relays of earlier versions keep working beside these: claims lock rows FOR UPDATE and wait
-- for each other's locks, so they never publish a row twice at once nor out of order.
-- relay-compatible-from: 1

-- One row per partition: its owner (NULL: free), the lease's end, and an epoch raised at every
-- change of owner. A relay's claims hold the lease rows of the partitions they read FOR KEY
-- SHARE until the batch settles, so a lease changes hands only after what was in flight for
-- it has settled; renewing (expires_at) does not wait for them.
CREATE TABLE {{schema}}.outbox_relay_leases (
    -- 'partition' (table modes), or 'cdc-shard' (--mode cdc: one replication slot each).
    scope      text        NOT NULL CHECK (scope IN ('partition', 'cdc-shard')),
    partition  integer     NOT NULL CHECK (partition >= 0),
    relay      text,
    epoch      bigint      NOT NULL DEFAULT 0,
    expires_at timestamptz,
    changed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, partition)
);
INSERT INTO {{schema}}.outbox_relay_leases (scope, partition)
    SELECT 'partition', generate_series(0, 63);

-- The relays at work on this outbox: each holds its share of the partitions. A relay is gone
-- when its backend is (pid and backend_start no longer in pg_stat_activity: killed, its host
-- down once the server's keepalives say so) or when its heartbeat is older than the lease time.
CREATE TABLE {{schema}}.outbox_relay_members (
    relay         text        PRIMARY KEY,
    pid           integer     NOT NULL,
    backend_start timestamptz NOT NULL,
    joined_at     timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    -- The relay's claiming connections (pid and start, as pg_stat_activity shows them): ended
    -- when the relay is removed as dead, which releases the locks its claims hold.
    lane_pids     integer[]     NOT NULL DEFAULT '{}',
    lane_starts   timestamptz[] NOT NULL DEFAULT '{}'
);

-- The ordering lock's bucket of an aggregate. A transaction that writes events of several
-- aggregates takes their buckets' locks in the order it writes them; writing them in ascending
-- outbox_lock_bucket(aggregate_id) order (keeping each aggregate's own events in order) means
-- two such transactions can never deadlock on those locks.
CREATE FUNCTION {{schema}}.outbox_lock_bucket(aggregate_id text) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN hashtext(aggregate_id) & 1023;

-- A created_at no message can carry (Python, and most clients, stop at the year 9999): refused
-- for new rows; existing rows are not checked (NOT VALID) and the relay dead-letters any, which
-- is why a dead row is exempt (the check applies to every UPDATE of a row, old ones included).
ALTER TABLE {{schema}}.outbox ADD CONSTRAINT outbox_created_at_is_a_time
    CHECK (
        (created_at >= '0001-01-02 00:00:00+00' AND created_at < '9999-12-30 00:00:00+00')
        OR dead_at IS NOT NULL
    )
    NOT VALID;

-- Backing-off rows by when they are due (the claim's skip list, next_retry_in), no longer by
-- aggregate_id: an index entry is limited to about 2.7 kB, and an aggregate_id longer than that
-- made recording the row's first failure fail, so its batch could never settle.
DROP INDEX {{schema}}.outbox_retrying_v1;
CREATE INDEX outbox_retrying_v2 ON {{schema}}.outbox (next_attempt_at)
    WHERE next_attempt_at IS NOT NULL AND published_at IS NULL AND dead_at IS NULL;

-- Statistics of the ordering bucket, so the planner knows how many pending rows a relay's
-- partitions hold and reads them in id order from outbox_pending_v1 (queries.sql, claim).
CREATE STATISTICS {{schema}}.outbox_bucket_v1
    ON ((coalesce(hashtext(aggregate_id), uuid_hash(event_id)) & 1023)) FROM {{schema}}.outbox;

-- Wake-up requests, one per idle relay: with several relays, one turning busy withdraws only its
-- own request, not the others' (the one-row outbox_relay_wakeup stays for relays of earlier
-- versions during a rollout). Producers ring while any request is current.
CREATE UNLOGGED TABLE {{schema}}.outbox_relay_listeners (
    relay           text        PRIMARY KEY,
    listening_until timestamptz NOT NULL
);

CREATE OR REPLACE FUNCTION {{schema}}.outbox_before_insert_v2() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Commit order per aggregate: see 0001 (lock the aggregate's bucket, then draw the id).
    IF NEW.aggregate_id IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(1868724338, hashtext(NEW.aggregate_id) & 1023);
        NEW.id := nextval('{{schema}}.outbox_id_seq');
    END IF;
    -- Wake-up: ring only while a relay has said it is idle and listening; see 0001.
    IF EXISTS (SELECT FROM {{schema}}.outbox_relay_listeners WHERE listening_until > now())
       OR EXISTS (SELECT FROM {{schema}}.outbox_relay_wakeup WHERE listening_until > now()) THEN
        PERFORM pg_notify('outbox_relay_v1.{{schema}}', '');
    END IF;
    RETURN NEW;
END
$$;
