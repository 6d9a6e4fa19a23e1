"""Named SQL queries, loaded once from the ``*.sql`` files of ``db/sql/`` and bound to a schema.

Each file groups the queries of one concern (``queries.sql`` the relay's, ``migrations.sql``,
``grants.sql``, ``inbox.sql``, ...); a ``-- name: x`` line starts query ``x`` and a name is
unique across all files; the comment lines under it document it and are not sent. In a query,
``{{schema}}`` is the schema, ``%(name)s`` a parameter and ``{ident}`` an identifier (or literal)
the caller fills in with ``psycopg.sql``. The subfolders hold scripts run whole (migrations,
grants) and ``<set>_schema.sql`` the current schemas.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

from psycopg import sql

from outbox_relay.errors import ConfigError

SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,39}")
_NAME_MARKER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
# Whole schemas for readers (and the test that the migrations produce them), not named queries.
SCHEMA_FILE_SUFFIX = "_schema.sql"
_PSYCOPG_PARAMETER = re.compile(r"%\((\w+)\)s|%%")


def check_schema_name(schema: str) -> str:
    """Schema names are plain lowercase identifiers, so they never need quoting in SQL."""
    if not SCHEMA_NAME.fullmatch(schema):
        raise ConfigError(
            f"--schema: {schema!r} is not a plain lowercase identifier "
            "(letters, digits and '_', at most 40 characters, e.g. 'public' or 'outbox')"
        )
    return schema


def render(text: str, schema: str) -> str:
    return text.replace("{{schema}}", check_schema_name(schema))


def query_files() -> dict[str, str]:
    """File name -> text of every named-query file directly in ``db/sql/``."""
    folder = resources.files("outbox_relay.db").joinpath("sql")
    return {
        entry.name: entry.read_text("utf-8")
        for entry in sorted(folder.iterdir(), key=lambda entry: entry.name)
        if entry.is_file()
        and entry.name.endswith(".sql")
        and not entry.name.endswith(SCHEMA_FILE_SUFFIX)
    }


@cache
def raw_queries() -> dict[str, str]:
    queries: dict[str, str] = {}
    defined_in: dict[str, str] = {}
    for file_name, text in query_files().items():
        parts = _NAME_MARKER.split(text)
        # parts = [preamble, name1, body1, name2, body2, ...]
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in queries:
                raise ValueError(
                    f"query {name!r} is defined in both {defined_in[name]} and {file_name}"
                )
            queries[name] = _without_comment_lines(body).strip().rstrip(";")
            defined_in[name] = file_name
    return queries


def _without_comment_lines(body: str) -> str:
    """The comment lines of a query document it in its file; only its SQL is sent. (Left in, a
    ``:word`` or ``%`` in the prose would read as a parameter to SQLAlchemy or psycopg.)"""
    return "\n".join(line for line in body.splitlines() if not line.lstrip().startswith("--"))


def sqlalchemy_text(query: str) -> str:
    """A psycopg query as SQLAlchemy's ``text()`` takes it: ``%(name)s`` becomes ``:name``."""
    return _PSYCOPG_PARAMETER.sub(lambda match: f":{match[1]}" if match[1] else "%", query)


def schemaless_query(name: str) -> sql.SQL:
    """A named query that names no schema (LISTEN on a channel given whole)."""
    text = raw_queries()[name]
    if "{{schema}}" in text:
        raise ValueError(f"query {name!r} names the schema: use Queries(schema)[{name!r}]")
    return sql.SQL(text)


class Queries:
    """All named queries, rendered for one schema."""

    def __init__(self, schema: str) -> None:
        self.schema = check_schema_name(schema)
        # Rendered on first use: most callers need a few of the queries, the relay the same
        # ones for every batch.
        self._rendered: dict[str, str] = {}

    def _text(self, name: str) -> str:
        text = self._rendered.get(name)
        if text is None:
            text = self._rendered[name] = render(raw_queries()[name], self.schema)
        return text

    def __getitem__(self, name: str) -> sql.SQL:
        return sql.SQL(self._text(name))

    def sqlalchemy(self, name: str) -> str:
        """The same query for SQLAlchemy's ``text()``."""
        return sqlalchemy_text(self._text(name))

    @property
    def notify_channel(self) -> str:
        return f"outbox_relay_v1.{self.schema}"

    @property
    def application_name(self) -> str:
        return f"outbox-relay:{self.schema}"
