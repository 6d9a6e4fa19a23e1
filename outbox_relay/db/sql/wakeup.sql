-- The relay's wake-up connection (outbox_relay/relay/wakeup.py). {channel} is filled in with
-- psycopg.sql.Identifier: the channel name holds a dot (outbox_relay_v1.<schema>).

-- name: listen
LISTEN {channel};
