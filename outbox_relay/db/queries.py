"""Named SQL queries, loaded once from ``sql/queries.sql`` and bound to a schema."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

from psycopg import sql

from outbox_relay.errors import ConfigError

SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,39}")
_NAME_MARKER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


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


@cache
def raw_queries() -> dict[str, str]:
    text = resources.files("outbox_relay.db").joinpath("sql/queries.sql").read_text("utf-8")
    parts = _NAME_MARKER.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    return {
        name: body.strip().rstrip(";") for name, body in zip(parts[1::2], parts[2::2], strict=False)
    }


class Queries:
    """All named queries, rendered for one schema."""

    def __init__(self, schema: str) -> None:
        self.schema = check_schema_name(schema)
        self._rendered = {name: render(body, schema) for name, body in raw_queries().items()}

    def __getitem__(self, name: str) -> sql.SQL:
        return sql.SQL(self._rendered[name])

    @property
    def notify_channel(self) -> str:
        return f"outbox_relay_v1.{self.schema}"

    @property
    def application_name(self) -> str:
        return f"outbox-relay:{self.schema}"
