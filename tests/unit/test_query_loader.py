"""The loader's files and its SQLAlchemy form: what ``db/queries.py`` promises besides lookup."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import outbox_relay
from outbox_relay.db import queries as loader
from outbox_relay.db.queries import (
    SCHEMA_FILE_SUFFIX,
    Queries,
    query_files,
    raw_queries,
    schemaless_query,
    sqlalchemy_text,
)


def test_every_sql_file_of_the_folder_is_loaded_but_the_schema_files() -> None:
    files = set(query_files())
    assert {"queries.sql", "migrations.sql", "grants.sql", "inbox.sql", "producer.sql"} <= files
    assert not any(name.endswith(SCHEMA_FILE_SUFFIX) for name in files)
    # The migration and grant scripts of the subfolders are not named queries.
    assert "app.sql" not in files
    assert "0001_outbox.sql" not in files


@pytest.mark.parametrize("file_name", sorted(query_files()))
def test_nothing_but_comments_precedes_the_first_named_query(file_name: str) -> None:
    """A statement above the first ``-- name:`` line would belong to no query and never run."""
    preamble = re.split(r"^-- name: ", query_files()[file_name], maxsplit=1, flags=re.MULTILINE)[0]
    code = [line for line in preamble.splitlines() if line.strip() and not line.startswith("--")]
    assert code == []


def test_a_name_defined_in_two_files_is_refused_naming_both(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        loader,
        "query_files",
        lambda: {"a.sql": "-- name: twice\nSELECT 1;\n", "b.sql": "-- name: twice\nSELECT 2;\n"},
    )
    with pytest.raises(ValueError, match=r"'twice' is defined in both a\.sql and b\.sql"):
        raw_queries.__wrapped__()


def test_sqlalchemy_reads_the_same_query_with_colon_parameters() -> None:
    queries = Queries("shop")
    psycopg_text = queries["inbox_claim"].as_string()
    sqlalchemy = queries.sqlalchemy("inbox_claim")
    assert "%(" not in sqlalchemy
    assert sqlalchemy == re.sub(r"%\((\w+)\)s", r":\1", psycopg_text)
    assert "shop.processed_events" in sqlalchemy


def test_sqlalchemy_text_unescapes_percent_signs() -> None:
    assert sqlalchemy_text("SELECT 'a%%b' WHERE x = %(x)s") == "SELECT 'a%b' WHERE x = :x"


def test_a_query_naming_the_schema_needs_one() -> None:
    assert schemaless_query("listen").as_string() == "LISTEN {channel}"
    with pytest.raises(ValueError, match="names the schema"):
        schemaless_query("inbox_claim")


def queries_run_through_sqlalchemy() -> set[str]:
    package = Path(outbox_relay.__file__).parent
    return {
        name
        for source in package.rglob("*.py")
        for name in re.findall(r'\.sqlalchemy\("(\w+)"\)', source.read_text("utf-8"))
    }


def test_sqlalchemy_binds_exactly_the_parameters_psycopg_does() -> None:
    """SQLAlchemy reads any ``:word`` as a parameter; a stray one would demand a value."""
    from sqlalchemy import text

    names = queries_run_through_sqlalchemy()
    assert {"emit_event", "inbox_claim", "inbox_cleanup", "relation_exists"} <= names
    queries = Queries("shop")
    for name in sorted(names):
        expected = set(re.findall(r"%\((\w+)\)s", queries[name].as_string()))
        assert set(text(queries.sqlalchemy(name)).compile().params) == expected, name
