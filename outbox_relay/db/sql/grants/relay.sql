-- The relay role: exactly what `outbox-relay serve` (notify and poll modes), `status` and
-- `dead list|retry` need. `outbox-relay migrate --grants` applies this after revoking whatever
-- the role held on the outbox objects, so the result is exact. {relay} is the role.

GRANT USAGE ON SCHEMA {{schema}} TO {relay};
-- Claim pending rows (SELECT ... FOR UPDATE needs UPDATE), record attempts, mark or delete sent
-- rows, prune kept ones. No INSERT: the relay never writes events.
GRANT SELECT, UPDATE, DELETE ON {{schema}}.outbox TO {relay};
GRANT SELECT ON {{schema}}.outbox_schema_version TO {relay};
-- Soft state: whether the relay is listening (wake-ups) and published counts per minute.
GRANT SELECT, INSERT, UPDATE, DELETE ON {{schema}}.outbox_relay_wakeup TO {relay};
GRANT SELECT, INSERT, UPDATE, DELETE ON {{schema}}.outbox_relay_stats TO {relay};
