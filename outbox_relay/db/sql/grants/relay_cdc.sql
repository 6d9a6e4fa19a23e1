-- The relay role's extra rights for `serve --mode cdc`, on top of relay.sql. The REPLICATION
-- attribute (to stream from the slot) is set by `migrate --grants --cdc` itself; the publication
-- and the first slot are made by `migrate --cdc`, which must run as the outbox table's owner.

-- Events written straight to the WAL (pg_logical_emit_message) become outbox rows first, so
-- they share the publish and retry path; the insert trigger draws their ids.
GRANT INSERT (event_id, event_type, aggregate_type, aggregate_id, payload, headers, created_at)
    ON {{schema}}.outbox TO {relay};
GRANT USAGE ON SEQUENCE {{schema}}.outbox_id_seq TO {relay};
