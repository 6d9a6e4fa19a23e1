-- The application role: may add events to {{schema}}.outbox and nothing else (it cannot read,
-- change or delete them). `outbox-relay migrate --grants` applies this after revoking whatever
-- the role held on the outbox objects, so the result is exact. {app} is the role.

GRANT USAGE ON SCHEMA {{schema}} TO {app};
-- The producer's columns only: the id is drawn by the outbox (an explicit one could collide
-- with a later one), and the bookkeeping columns (published_at, attempts, next_attempt_at,
-- last_error, dead_at) are the relay's.
GRANT INSERT (event_id, event_type, aggregate_type, aggregate_id, payload, headers, created_at)
    ON {{schema}}.outbox TO {app};
-- The insert trigger draws the id under the ordering lock (nextval) and reads whether a relay is
-- listening before it rings; it runs with the inserting role's rights.
GRANT USAGE ON SEQUENCE {{schema}}.outbox_id_seq TO {app};
GRANT SELECT ON {{schema}}.outbox_relay_wakeup, {{schema}}.outbox_relay_listeners TO {app};
REVOKE EXECUTE ON FUNCTION {{schema}}.outbox_emit(text, text, jsonb, text, jsonb, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION {{schema}}.outbox_emit(text, text, jsonb, text, jsonb, uuid) TO {app};
GRANT EXECUTE ON FUNCTION {{schema}}.outbox_lock_bucket(text) TO {app};
-- Nothing on the relays' leases and membership: an application cannot take, hold or fake a
-- relay's share of the outbox (advisory locks, which any role can take, play no part in it).
