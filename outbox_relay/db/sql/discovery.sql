-- Schema discovery (serve --config with `schemas = "GLOB"`): outbox_relay/db/discovery.py.

-- name: outbox_schemas
-- Every schema holding the migration set's version table (an outbox); which of them match the glob and are
-- migrated far enough for this relay is decided in Python (db/migrations.py's rules).
SELECT n.nspname
FROM pg_namespace n
JOIN pg_class c ON c.relnamespace = n.oid
WHERE c.relname = %(version_table)s AND c.relkind IN ('r', 'p')
ORDER BY n.nspname;

-- name: user_schemas
-- Every schema but PostgreSQL's own: `migrate --schemas GLOB` reports those the glob matches that
-- hold no outbox (skipped) next to those it migrates.
SELECT nspname
FROM pg_namespace
WHERE NOT starts_with(nspname, 'pg_') AND nspname <> 'information_schema'
ORDER BY nspname;
