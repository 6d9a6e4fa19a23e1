-- `outbox-relay migrate --grants` (outbox_relay/db/grants.py): the checks around the grant
-- scripts in grants/. {app}, {relay}, {role} and {database} are filled in with
-- psycopg.sql.Identifier; %(name)s are psycopg parameters.

-- name: role_exists
SELECT FROM pg_roles WHERE rolname = %(role)s;

-- name: create_login_role
CREATE ROLE {role} LOGIN;

-- name: create_nologin_role
CREATE ROLE {role} NOLOGIN;

-- name: role_powers
-- Per role: a superuser, and whether it owns the given table (or is a member of its owner).
SELECT r.rolname, r.rolsuper, pg_has_role(r.oid, c.relowner, 'USAGE')
FROM pg_roles AS r, pg_class AS c
WHERE r.rolname = ANY(%(roles)s) AND c.oid = to_regclass(%(table)s);

-- name: roles_related
SELECT pg_has_role(%(relay)s, %(app)s, 'MEMBER') OR pg_has_role(%(app)s, %(relay)s, 'MEMBER');

-- name: current_database
SELECT current_database();

-- name: grant_connect
GRANT CONNECT ON DATABASE {database} TO {app}, {relay};

-- name: may_connect
SELECT has_database_privilege(%(role)s, current_database(), 'CONNECT');

-- name: revoke_outbox_tables
-- Each run starts from nothing, so the grant scripts leave exactly the rights they list.
REVOKE ALL ON {{schema}}.outbox, {{schema}}.outbox_schema_version, {{schema}}.outbox_relay_wakeup,
    {{schema}}.outbox_relay_listeners, {{schema}}.outbox_relay_stats, {{schema}}.outbox_relay_leases,
    {{schema}}.outbox_relay_members, {{schema}}.outbox_replays, {{schema}}.outbox_sent,
    {{schema}}.outbox_sent_partitions, {{schema}}.outbox_sent_policy, {{schema}}.outbox_history
FROM {app}, {relay};

-- name: revoke_outbox_sequence
REVOKE ALL ON SEQUENCE {{schema}}.outbox_id_seq FROM {app}, {relay};

-- name: revoke_outbox_emit
REVOKE ALL ON FUNCTION {{schema}}.outbox_emit(text, text, jsonb, text, jsonb, uuid),
    {{schema}}.outbox_lock_bucket(text),
    {{schema}}.outbox_sent_cover(timestamptz, timestamptz, interval),
    {{schema}}.outbox_sent_drop_before(timestamptz),
    {{schema}}.outbox_sent_analyze_closed()
FROM {app}, {relay};

-- name: revoke_outbox_schema
REVOKE ALL ON SCHEMA {{schema}} FROM {app}, {relay};

-- name: may_replicate
-- The REPLICATION attribute, or Amazon RDS's stand-in, membership of rds_replication.
SELECT r.rolreplication OR coalesce(pg_has_role(r.oid, rds.oid, 'MEMBER'), false)
FROM pg_roles AS r LEFT JOIN pg_roles AS rds ON rds.rolname = 'rds_replication'
WHERE r.rolname = %(role)s;

-- name: grant_replication
ALTER ROLE {role} REPLICATION;

-- name: revoke_replication
ALTER ROLE {role} NOREPLICATION;
