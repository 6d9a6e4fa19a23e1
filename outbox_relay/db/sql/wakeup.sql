-- The relays' shared wake-up connection (outbox_relay/db/pool.py, Listener). {channel} is filled in with
-- psycopg.sql.Identifier: the channel name holds a dot (outbox_relay_v1.<schema>).

-- name: listen
LISTEN {channel};
