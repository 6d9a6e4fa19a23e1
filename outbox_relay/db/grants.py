"""Least-privilege roles for one outbox schema (``outbox-relay migrate --grants``).

The application role may only add events; the relay role gets exactly what the relay needs,
and the REPLICATION attribute only for ``--mode cdc``. The grant scripts live in
``db/sql/grants/``, the checks around them in ``db/sql/grants.sql``.
Each run first revokes whatever the two roles held on the outbox objects, so re-running after an
upgrade (or switching between notify and cdc) leaves exactly the listed rights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from outbox_relay.db.migrations import MIGRATION_LOCK, check_schema, sql_dir
from outbox_relay.db.queries import Queries, render
from outbox_relay.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_APP_ROLE = "outbox_app"
DEFAULT_RELAY_ROLE = "outbox_relay"


@dataclass(frozen=True, slots=True)
class GrantReport:
    created: list[str] = field(default_factory=list)  # roles that did not exist before
    replication: bool = False  # the relay role may stream a replication slot afterwards
    warnings: list[str] = field(default_factory=list)  # done, but not everything was possible


# Names PostgreSQL reserves or treats specially in GRANT / CREATE ROLE.
_RESERVED_ROLES = {"public", "none", "current_user", "current_role", "session_user"}


def _script(name: str, schema: str, app_role: str, relay_role: str) -> sql.Composed:
    text = render(sql_dir("grants").joinpath(name).read_text("utf-8"), schema)
    return sql.SQL(text).format(app=sql.Identifier(app_role), relay=sql.Identifier(relay_role))


def role_name_problem(role: str) -> str | None:
    """Why ``role`` cannot be one of the outbox roles, or None."""
    if (
        not role
        or len(role.encode()) > 63
        or role.startswith("pg_")
        or role.lower() in _RESERVED_ROLES
    ):
        return (
            f"{role!r} is not a usable role name (1-63 bytes, not starting with pg_, not a "
            "reserved name such as public)"
        )
    return None


def check_role_name(option: str, role: str) -> str:
    problem = role_name_problem(role)
    if problem:
        raise ConfigError(f"{option}: {problem}")
    return role


def apply_grants(
    conn: psycopg.Connection[Any], schema: str, *, app_role: str, relay_role: str, cdc: bool
) -> GrantReport:
    """Create the roles if missing and give them exactly their rights on ``schema``'s outbox.

    ``conn`` must be in autocommit mode and connected as the outbox's owner (or a superuser),
    with CREATEROLE when a role is missing; the schema must be migrated.
    """
    check_role_name("--app-role", app_role)
    check_role_name("--relay-role", relay_role)
    if app_role == relay_role:
        raise ConfigError("--app-role and --relay-role must be different roles")
    check_schema(conn, schema)
    try:
        report = _apply(conn, schema, app_role=app_role, relay_role=relay_role, cdc=cdc)
    except pg_errors.InsufficientPrivilege as exc:
        raise ConfigError(
            f"cannot grant rights on {schema}.outbox: {exc.diag.message_primary}; run "
            "`outbox-relay migrate --grants` as the owner of the outbox tables (the role that "
            "ran `outbox-relay migrate`) or a superuser"
        ) from exc
    # The role attribute last, on its own: the rights above stay granted if it cannot be set.
    replication, warning = _set_replication(conn, Queries(schema), relay_role, cdc)
    if warning and cdc:
        raise ConfigError(warning)
    log.info(
        "applied grants",
        extra={"schema": schema, "app_role": app_role, "relay_role": relay_role, "cdc": cdc},
    )
    return GrantReport(
        created=report.created, replication=replication, warnings=[warning] if warning else []
    )


def _apply(
    conn: psycopg.Connection[Any], schema: str, *, app_role: str, relay_role: str, cdc: bool
) -> GrantReport:
    report = GrantReport()
    queries = Queries(schema)
    roles = {"app": sql.Identifier(app_role), "relay": sql.Identifier(relay_role)}
    with conn.transaction():
        conn.execute(queries["migration_lock"], {"key": MIGRATION_LOCK})
        for role, login in ((app_role, False), (relay_role, True)):
            if _create_role_if_missing(conn, queries, role, login=login):
                report.created.append(role)
        _refuse_powerful_roles(conn, queries, (app_role, relay_role))
        database = conn.execute(queries["current_database"]).fetchone()
        assert database is not None
        conn.execute(queries["grant_connect"].format(database=sql.Identifier(database[0]), **roles))
        _check_connect(conn, queries, database[0], (app_role, relay_role))
        conn.execute(queries["revoke_outbox_tables"].format(**roles))
        conn.execute(queries["revoke_outbox_sequence"].format(**roles))
        conn.execute(queries["revoke_outbox_emit"].format(**roles))
        conn.execute(queries["revoke_outbox_schema"].format(**roles))
        for script in ("app.sql", "relay.sql", *(("relay_cdc.sql",) if cdc else ())):
            conn.execute(_script(script, schema, app_role, relay_role))
    return report


def _create_role_if_missing(
    conn: psycopg.Connection[Any], queries: Queries, role: str, *, login: bool
) -> bool:
    if conn.execute(queries["role_exists"], {"role": role}).fetchone():
        return False
    create = queries["create_login_role" if login else "create_nologin_role"].format(
        role=sql.Identifier(role)
    )
    try:
        with conn.transaction():
            conn.execute(create)
    except (pg_errors.DuplicateObject, pg_errors.UniqueViolation):
        return False  # made by a migrate on another database a moment ago
    except pg_errors.InsufficientPrivilege as exc:
        raise ConfigError(
            f"cannot create role {role!r}: {exc.diag.message_primary}; run `outbox-relay "
            "migrate --grants` as a role with CREATEROLE, or create the role first "
            f"(CREATE ROLE {role} {'LOGIN' if login else 'NOLOGIN'})"
        ) from exc
    return True


def _refuse_powerful_roles(
    conn: psycopg.Connection[Any], queries: Queries, roles: tuple[str, ...]
) -> None:
    """Revoking rights from the table's owner or a superuser would be wrong or pointless."""
    schema = queries.schema
    rows = conn.execute(
        queries["role_powers"], {"roles": list(roles), "table": f"{schema}.outbox"}
    ).fetchall()
    for name, superuser, owns in rows:
        if superuser or owns:
            what = "a superuser" if superuser else f"the owner of {schema}.outbox (or a member)"
            raise ConfigError(
                f"role {name!r} is {what}: least-privilege roles must be separate, ordinary "
                "roles (pick others with --app-role / --relay-role)"
            )
    app, relay = roles
    row = conn.execute(queries["roles_related"], {"app": app, "relay": relay}).fetchone()
    if row and row[0]:
        raise ConfigError(
            f"roles {app!r} and {relay!r} are members of one another: the relay would get the "
            "application's rights or the reverse; use two unrelated roles"
        )


def _check_connect(
    conn: psycopg.Connection[Any], queries: Queries, database: str, roles: tuple[str, ...]
) -> None:
    """GRANT CONNECT by anyone but the database's owner only warns; make the gap an error."""
    for role in roles:
        row = conn.execute(queries["may_connect"], {"role": role}).fetchone()
        if not (row and row[0]):
            raise ConfigError(
                f"role {role!r} may not connect to database {database!r} and this role cannot "
                f'grant it: have the database owner run GRANT CONNECT ON DATABASE "{database}" '
                f'TO "{role}"'
            )


def _may_replicate(conn: psycopg.Connection[Any], queries: Queries, role: str) -> bool:
    """The REPLICATION attribute, or Amazon RDS's stand-in, membership of rds_replication."""
    row = conn.execute(queries["may_replicate"], {"role": role}).fetchone()
    return bool(row and row[0])


def _set_replication(
    conn: psycopg.Connection[Any], queries: Queries, role: str, wanted: bool
) -> tuple[bool, str | None]:
    """Give (``wanted``) or take away the relay role's REPLICATION attribute.

    Only a superuser may change it on PostgreSQL 15 and older, and managed services have none:
    returns (may replicate afterwards, what could not be done and how to do it by hand).
    """
    if _may_replicate(conn, queries, role) == wanted:
        return wanted, None
    change = queries["grant_replication" if wanted else "revoke_replication"]
    try:
        conn.execute(change.format(role=sql.Identifier(role)))
    except pg_errors.InsufficientPrivilege as exc:
        if wanted:
            return False, (
                f"granted the outbox rights, but cannot make role {role!r} REPLICATION "
                f"(--cdc): {exc.diag.message_primary}; have a superuser run ALTER ROLE "
                f'"{role}" REPLICATION (Amazon RDS / Aurora: GRANT rds_replication TO "{role}"; '
                "Cloud SQL: ALTER ROLE as cloudsqlsuperuser), then run this again"
            )
        return True, (
            f"role {role!r} keeps REPLICATION (only a superuser can remove it: ALTER ROLE "
            f'"{role}" NOREPLICATION); notify and poll modes do not need it'
        )
    return wanted, None
