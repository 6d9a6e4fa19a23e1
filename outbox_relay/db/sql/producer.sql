-- What applications run through outbox_relay.emit() (outbox_relay/producer.py), in their own
-- transaction. {{schema}} is the outbox's schema, %(name)s are parameters (SQLAlchemy runs the
-- same text with :name parameters).

-- name: emit_event
-- CAST rather than ::jsonb, which SQLAlchemy's :name parameters would not parse.
INSERT INTO {{schema}}.outbox (event_id, event_type, aggregate_type, aggregate_id, payload, headers)
VALUES (%(event_id)s, %(event_type)s, %(aggregate_type)s, %(aggregate_id)s,
        CAST(%(payload)s AS jsonb), CAST(%(headers)s AS jsonb));
