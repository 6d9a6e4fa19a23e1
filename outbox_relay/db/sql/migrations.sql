-- The migration runner's queries (outbox_relay/db/migrations.py), shared by the outbox and the
-- inbox. {schema} and {version_table} are filled in with psycopg.sql.Identifier, {lock_timeout}
-- with psycopg.sql.Literal; %(name)s are psycopg parameters.

-- name: relation_exists
-- The relation is named 'schema.table'; to_regclass gives NULL when there is none.
SELECT to_regclass(%(relation)s) IS NOT NULL;

-- name: namespace_exists
SELECT to_regnamespace(%(schema)s) IS NOT NULL;

-- name: migration_lock
-- One migrator of a migration set at a time per database, until the transaction ends.
SELECT pg_advisory_xact_lock(%(key)s);

-- name: create_schema
CREATE SCHEMA {schema};

-- name: create_version_table
CREATE TABLE {version_table} (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    relay_compatible_from integer
);

-- name: version_table_has_compatibility_column
-- Version tables made before relay_compatible_from existed lack it.
SELECT EXISTS (SELECT FROM pg_attribute
               WHERE attrelid = to_regclass(%(version_table)s)
                 AND attname = 'relay_compatible_from' AND NOT attisdropped);

-- name: add_version_compatibility_column
ALTER TABLE {version_table} ADD COLUMN relay_compatible_from integer;

-- name: migration_applied
SELECT 1 FROM {version_table} WHERE version = %(version)s;

-- name: set_migration_lock_timeout
-- SET takes no parameters: the value is a literal.
SET LOCAL lock_timeout = {lock_timeout};

-- name: record_migration
INSERT INTO {version_table} (version, name, relay_compatible_from)
VALUES (%(version)s, %(name)s, %(relay_compatible_from)s);
