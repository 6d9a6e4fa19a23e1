-- The application role: may add events to {{schema}}.outbox and nothing else (it cannot read,
-- change or delete them). `outbox-relay migrate --grants` applies this after revoking whatever
-- the role held on the outbox objects, so the result is exact. {app} is the role.

GRANT USAGE ON SCHEMA {{schema}} TO {app};
GRANT INSERT ON {{schema}}.outbox TO {app};
-- The insert trigger draws the id under the ordering lock (nextval) and reads whether a relay is
-- listening before it rings; it runs with the inserting role's rights.
GRANT USAGE ON SEQUENCE {{schema}}.outbox_id_seq TO {app};
GRANT SELECT ON {{schema}}.outbox_relay_wakeup TO {app};
REVOKE EXECUTE ON FUNCTION {{schema}}.outbox_emit(text, text, jsonb, text, jsonb, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION {{schema}}.outbox_emit(text, text, jsonb, text, jsonb, uuid) TO {app};
