-- 0006: sent events kept by --on-sent keep leave the outbox for outbox_sent, a table partitioned
-- by the time they were sent, and retention drops whole partitions instead of deleting rows
-- (docs/retention.md). The outbox then holds only pending, retrying and dead rows in every mode:
-- producers insert into a table that stays small, and pruning never touches it.
-- Online: this creates new objects only and takes no lock on the outbox. Rows kept before it
-- (published_at set in the outbox) stay there, readable through outbox_history, until a relay
-- moves them over in small batches (db/sql/archive.sql, archive_legacy). Relays of version 4 and
-- 5 keep working beside it: they still mark kept rows in the outbox, which the new ones move.
-- relay-compatible-from: 4

-- A queue: every event is inserted once and deleted once, so dead rows pile up at the event
-- rate. The relay vacuums it itself when it may (db/archive.py); where autovacuum runs, vacuum
-- it by dead rows rather than by a fraction of a table that is nearly empty, at full speed.
-- (Storage parameters take SHARE UPDATE EXCLUSIVE: producers' inserts do not wait.)
ALTER TABLE {{schema}}.outbox SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 20000,
    autovacuum_vacuum_cost_delay = 0
);

-- Sent events (--on-sent keep), the outbox's columns as they were at the moment of sending.
-- The relay creates the partitions (outbox_sent_cover) ahead of time and drops those past
-- --retention (outbox_sent_drop_before); no default partition, so each one is dropped whole.
CREATE TABLE {{schema}}.outbox_sent (
    id             bigint      NOT NULL,
    event_id       uuid        NOT NULL,
    event_type     text        NOT NULL,
    aggregate_type text,
    aggregate_id   text,
    payload        jsonb       NOT NULL,
    headers        jsonb       NOT NULL,
    created_at     timestamptz NOT NULL,
    published_at   timestamptz NOT NULL,
    attempts       integer     NOT NULL
) PARTITION BY RANGE (published_at);
-- Replay reads in id (= per-aggregate commit) order.
CREATE INDEX outbox_sent_id_v1 ON {{schema}}.outbox_sent (id);

-- The partitions, one row each, kept by the two functions below (reading bounds from the
-- catalog would mean parsing pg_get_expr).
CREATE TABLE {{schema}}.outbox_sent_partitions (
    name      text        PRIMARY KEY,
    from_time timestamptz NOT NULL,
    to_time   timestamptz NOT NULL,
    CHECK (from_time < to_time)
);

-- The retention the relays enforce, as the last one to prepare partitions recorded it, so
-- `outbox-relay status` can tell when retention is behind.
CREATE TABLE {{schema}}.outbox_sent_policy (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    retention  interval    NOT NULL,
    width      interval    NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Partitions covering [from_time, to_time), each `width` long on boundaries aligned to `width`
-- since the epoch, clipped where a partition of another width already exists. Returns the end
-- of the partition holding to_time. SECURITY DEFINER: attaching a partition needs the table's
-- owner, and the relay role (migrate --grants) owns nothing; it may run exactly this.
-- ATTACH PARTITION takes SHARE UPDATE EXCLUSIVE on outbox_sent, which the relays' INSERTs
-- (ROW EXCLUSIVE) do not wait for; CREATE TABLE ... PARTITION OF would take ACCESS EXCLUSIVE.
CREATE FUNCTION {{schema}}.outbox_sent_cover(from_time timestamptz, to_time timestamptz, width interval)
RETURNS timestamptz
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    step      float8 := extract(epoch FROM width);
    part_from timestamptz;
    part_to   timestamptz;
    existing  timestamptz;
    part_name text;
BEGIN
    IF step < 60 THEN
        RAISE EXCEPTION 'outbox_sent_cover: width % is under a minute', width;
    END IF;
    -- One coverer at a time per schema: two relays would create the same partition.
    PERFORM pg_advisory_xact_lock(1868724350, hashtext('{{schema}}'));
    part_from := to_timestamp(floor(extract(epoch FROM from_time) / step) * step);
    WHILE part_from <= to_time LOOP
        SELECT p.to_time INTO existing FROM {{schema}}.outbox_sent_partitions AS p
        WHERE p.from_time <= part_from AND p.to_time > part_from;
        IF FOUND THEN
            part_from := existing;
            CONTINUE;
        END IF;
        part_to := to_timestamp(floor(extract(epoch FROM part_from) / step) * step + step);
        SELECT min(p.from_time) INTO existing FROM {{schema}}.outbox_sent_partitions AS p
        WHERE p.from_time > part_from;
        part_to := least(part_to, coalesce(existing, part_to));
        part_name := 'outbox_sent_' || to_char(part_from AT TIME ZONE 'UTC', 'YYYYMMDD"t"HH24MISS');
        EXECUTE format('CREATE TABLE {{schema}}.%I (LIKE {{schema}}.outbox_sent)', part_name);
        EXECUTE format('ALTER TABLE {{schema}}.outbox_sent ATTACH PARTITION {{schema}}.%I '
                       'FOR VALUES FROM (%L) TO (%L)', part_name, part_from, part_to);
        INSERT INTO {{schema}}.outbox_sent_partitions AS p (name, from_time, to_time)
        VALUES (part_name, part_from, part_to);
        part_from := part_to;
    END LOOP;
    RETURN part_from;
END
$$;

-- Drops every partition that ends at or before `before`, oldest first; returns how many.
-- Dropping a partition takes ACCESS EXCLUSIVE on outbox_sent, which only relays settling a batch
-- and readers of kept events (replay, status) use: producers never wait for it. The caller's
-- lock_timeout bounds how long those wait behind it.
CREATE FUNCTION {{schema}}.outbox_sent_drop_before(before timestamptz) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    dropped integer := 0;
    old     record;
BEGIN
    PERFORM pg_advisory_xact_lock(1868724350, hashtext('{{schema}}'));
    FOR old IN SELECT p.name FROM {{schema}}.outbox_sent_partitions AS p
               WHERE p.to_time <= before ORDER BY p.from_time LOOP
        EXECUTE format('DROP TABLE IF EXISTS {{schema}}.%I', old.name);
        DELETE FROM {{schema}}.outbox_sent_partitions AS p WHERE p.name = old.name;
        dropped := dropped + 1;
    END LOOP;
    RETURN dropped;
END
$$;

-- Statistics for partitions whose time is over, once each (nothing is added to them any more):
-- the planner's row counts, and `outbox-relay status`'s estimate of the kept events. Returns how
-- many it analyzed.
CREATE FUNCTION {{schema}}.outbox_sent_analyze_closed() RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    analyzed integer := 0;
    closed   record;
BEGIN
    FOR closed IN SELECT p.name FROM {{schema}}.outbox_sent_partitions AS p
                  JOIN pg_class AS c ON c.oid = to_regclass('{{schema}}.' || p.name)
                  WHERE p.to_time <= now() AND c.reltuples < 0 LOOP
        EXECUTE format('ANALYZE {{schema}}.%I', closed.name);
        analyzed := analyzed + 1;
    END LOOP;
    RETURN analyzed;
END
$$;

-- Only the owner and the roles granted it (the relay role, `migrate --grants`) may run them.
REVOKE EXECUTE ON FUNCTION {{schema}}.outbox_sent_cover(timestamptz, timestamptz, interval),
    {{schema}}.outbox_sent_drop_before(timestamptz), {{schema}}.outbox_sent_analyze_closed()
    FROM PUBLIC;

-- Everything ever sent or dead that is still kept, in one place: kept sent events (outbox_sent),
-- sent rows kept in the outbox before this migration, and dead rows (dead_at set). What replay
-- and status read; users may too.
CREATE VIEW {{schema}}.outbox_history AS
    SELECT s.id, s.event_id, s.event_type, s.aggregate_type, s.aggregate_id, s.payload, s.headers,
           s.created_at, s.published_at, s.attempts, NULL::timestamptz AS dead_at
    FROM {{schema}}.outbox_sent AS s
    UNION ALL
    SELECT o.id, o.event_id, o.event_type, o.aggregate_type, o.aggregate_id, o.payload, o.headers,
           o.created_at, o.published_at, o.attempts, o.dead_at
    FROM {{schema}}.outbox AS o
    WHERE o.published_at IS NOT NULL OR o.dead_at IS NOT NULL;
