-- 0003: outbox_emit() no longer reads the row back. RETURNING needs SELECT on the outbox, and an
-- application role (`outbox-relay migrate --grants`) may only insert; the id it returns is its
-- own event_id argument, which is what was inserted.
-- relay-compatible-from: 1

CREATE OR REPLACE FUNCTION {{schema}}.outbox_emit(
    event_type     text,
    aggregate_id   text,
    payload        jsonb,
    aggregate_type text  DEFAULT NULL,
    headers        jsonb DEFAULT '{}',
    event_id       uuid  DEFAULT gen_random_uuid()
) RETURNS uuid LANGUAGE sql AS $$
    INSERT INTO {{schema}}.outbox (event_id, event_type, aggregate_type, aggregate_id, payload, headers)
    VALUES ($6, $1, $4, $2, $3, coalesce($5, '{}'));
    SELECT $6;
$$;
