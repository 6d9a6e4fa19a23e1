-- The consumer's inbox (outbox_relay/consumer/inbox.py), in the consumer's own database.
-- {{schema}} is the inbox's schema, %(name)s are parameters (the SQLAlchemy inbox runs the same
-- text with :name parameters).

-- name: inbox_claim
-- No row inserted: the event was applied already (or a racer holds it, see inbox.py).
INSERT INTO {{schema}}.processed_events (consumer, event_id, event_type, attempt, redelivered)
VALUES (%(consumer)s, %(event_id)s, %(event_type)s, %(attempt)s, %(redelivered)s)
ON CONFLICT DO NOTHING;

-- name: inbox_statement_timeout
-- For the session: the handler's queries too (a query merely slow fails as a query, before
-- the worker's longer wait for an answer gives the link up as dead).
SELECT set_config('statement_timeout', %(ms)s, false);

-- name: inbox_record_latency
UPDATE {{schema}}.processed_events SET handler_ms = %(ms)s
WHERE consumer = %(consumer)s AND event_id = %(event_id)s;

-- name: inbox_cleanup
-- Batched so a large backlog of old rows never holds one long transaction.
DELETE FROM {{schema}}.processed_events WHERE ctid = ANY (ARRAY(
    SELECT ctid FROM {{schema}}.processed_events
    WHERE consumer = %(consumer)s AND processed_at < now() - make_interval(secs => %(secs)s)
    LIMIT %(limit)s));

-- name: inbox_stats
SELECT count(*),
       count(*) FILTER (WHERE redelivered OR attempt > 1),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY handler_ms),
       percentile_cont(0.95) WITHIN GROUP (ORDER BY handler_ms),
       max(handler_ms)
FROM {{schema}}.processed_events
WHERE consumer = %(consumer)s AND processed_at > now() - make_interval(secs => %(secs)s);
