"""The named-query loader: every query the code asks for exists and renders for any schema."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import outbox_relay
from outbox_relay.db.queries import Queries, check_schema_name, query_files, raw_queries, render
from outbox_relay.errors import ConfigError

PACKAGE = Path(outbox_relay.__file__).parent
# Every way the package names a query: store._fetch("x"), queries["x"], Queries(schema)["x"],
# queries.sqlalchemy("x"), schemaless_query("x"), and the on-sent choice in store.settle.
USES = re.compile(
    r"(?:_fetch\(\s*|queries\[|\)\[|query = |sqlalchemy\(|schemaless_query\()"
    r'"(\w+)"(?: if .* else "(\w+)")?'
)


def names_used_by_the_package() -> set[str]:
    names: set[str] = set()
    for source in PACKAGE.rglob("*.py"):
        for match in USES.finditer(source.read_text("utf-8")):
            names.update(name for name in match.groups() if name)
    return names


def test_every_query_the_package_runs_is_defined() -> None:
    used = names_used_by_the_package()
    # A sanity check on the scan itself, so a refactor cannot make this test vacuous.
    assert {
        "claim",
        "delete_sent",
        "archive_sent",
        "record_failures",
        "status",
        "dead_retry",
    } <= used
    queries = Queries("public")
    missing = []
    for name in sorted(used):
        try:
            queries[name]
        except KeyError:
            missing.append(name)
    assert missing == []


def test_every_named_query_is_run_by_the_package() -> None:
    assert sorted(set(raw_queries()) - names_used_by_the_package()) == []


def test_query_names_are_unique_across_files() -> None:
    names = [
        name
        for text in query_files().values()
        for name in re.findall(r"^-- name: (\w+)\s*$", text, re.MULTILINE)
    ]
    assert len(names) == len(set(names)) == len(raw_queries())


@pytest.mark.parametrize("name", sorted(raw_queries()))
def test_every_named_query_renders_for_a_custom_schema(name: str) -> None:
    queries = Queries("outbox_custom")
    text = queries[name].as_string()
    assert text.strip()
    assert "{{" not in text
    assert not text.rstrip().endswith(";"), "psycopg runs one statement; the loader strips ';'"
    assert "-- name:" not in text, "a query swallowed the next one"
    if "outbox" in raw_queries()[name]:
        assert "outbox_custom." in text
        assert "public." not in text
    # Placeholders are psycopg named parameters only; a stray % would break execution.
    assert "%" not in re.sub(r"%\(\w+\)s|%%", "", text)


def test_notify_channel_and_application_name_are_per_schema_and_versioned() -> None:
    queries = Queries("billing")
    assert queries.notify_channel == "outbox_relay_v1.billing"
    assert queries.application_name == "outbox-relay:billing"


@pytest.mark.parametrize("schema", ["public", "outbox", "_private", "app_2", "a" * 40])
def test_plain_lowercase_identifiers_are_schema_names(schema: str) -> None:
    assert check_schema_name(schema) == schema
    assert Queries(schema).schema == schema


@pytest.mark.parametrize(
    "schema",
    [
        "",
        "Public",
        "2fast",
        "outbox-relay",
        "outbox.relay",
        'public"; DROP TABLE outbox; --',
        "public ",
        "a" * 41,
        "schéma",
    ],
)
def test_other_schema_names_are_refused_naming_the_option(schema: str) -> None:
    with pytest.raises(ConfigError, match=r"^--schema: "):
        check_schema_name(schema)
    with pytest.raises(ConfigError, match=r"^--schema: "):
        Queries(schema)
    with pytest.raises(ConfigError, match=r"^--schema: "):
        render("SELECT 1 FROM {{schema}}.outbox", schema)
