-- The relay role: exactly what `outbox-relay serve` (notify and poll modes), `status`,
-- `dead list|retry` and `replay` need. `outbox-relay migrate --grants` applies this after
-- revoking whatever the role held on the outbox objects, so the result is exact. {relay} is the
-- role.

GRANT USAGE ON SCHEMA {{schema}} TO {relay};
-- Claim pending rows (SELECT ... FOR UPDATE needs UPDATE on a column), record attempts, mark or
-- delete sent rows, prune kept ones. It may change only the bookkeeping columns, never an
-- event's type, payload or headers; no INSERT: the relay never writes events.
GRANT SELECT, DELETE ON {{schema}}.outbox TO {relay};
GRANT UPDATE (published_at, attempts, next_attempt_at, last_error, dead_at)
    ON {{schema}}.outbox TO {relay};
GRANT SELECT ON {{schema}}.outbox_schema_version TO {relay};
-- Soft state: whether the relay is listening (wake-ups) and published counts per minute.
GRANT SELECT, INSERT, UPDATE, DELETE ON {{schema}}.outbox_relay_wakeup, {{schema}}.outbox_relay_listeners
    TO {relay};
GRANT SELECT, INSERT, UPDATE, DELETE ON {{schema}}.outbox_relay_stats TO {relay};
-- Its share of the outbox: leases on partitions and membership (see relay/leases.py).
GRANT SELECT, INSERT, UPDATE, DELETE ON {{schema}}.outbox_relay_leases TO {relay};
GRANT SELECT, INSERT, UPDATE, DELETE ON {{schema}}.outbox_relay_members TO {relay};
-- --on-sent keep: sent rows move to outbox_sent; its partitions are made ahead and dropped past
-- --retention through the two functions (they run as the owner: partitions need ownership).
-- The relay reads the statistics to vacuum the outbox, which only its owner may (else
-- autovacuum's job).
GRANT SELECT, INSERT ON {{schema}}.outbox_sent TO {relay};
GRANT SELECT ON {{schema}}.outbox_sent_partitions TO {relay};
GRANT SELECT, INSERT, UPDATE ON {{schema}}.outbox_sent_policy TO {relay};
GRANT EXECUTE ON FUNCTION {{schema}}.outbox_sent_cover(timestamptz, timestamptz, interval),
    {{schema}}.outbox_sent_drop_before(timestamptz), {{schema}}.outbox_sent_analyze_closed()
    TO {relay};
-- `outbox-relay replay`: reads kept and dead events (outbox_history) and records its progress.
GRANT SELECT ON {{schema}}.outbox_history TO {relay};
GRANT SELECT, INSERT, UPDATE, DELETE ON {{schema}}.outbox_replays TO {relay};
