"""No SQL statement lives in a Python string: the package runs named queries from ``db/sql/``.

The source is read with ``ast`` (not grep), so comments never count, and docstrings and other bare
string expressions are skipped: they document, they never run. A string counts as a statement
when it starts with a statement's keyword *and* the shape that keyword has in SQL (``DELETE
FROM``, ``CREATE TABLE``, ``SET x =`` ...), so prose such as "Delete every message" or an enum
value "delete" does not.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import outbox_relay

PACKAGE = Path(outbox_relay.__file__).parent

_SQL_OBJECT = (
    r"(?:TABLE|INDEX|SCHEMA|ROLE|USER|FUNCTION|PROCEDURE|TRIGGER|VIEW|MATERIALIZED\s+VIEW|"
    r"SEQUENCE|PUBLICATION|SUBSCRIPTION|EXTENSION|TYPE|DOMAIN|DATABASE|POLICY|RULE)\b"
)
# How each statement the check knows begins in SQL.
_STATEMENT_SHAPES = [
    r"SELECT\s+\S",
    r"INSERT\s+INTO\s",
    r"UPDATE\s+\S+\s+(?:AS\s+\S+\s+)?SET\s",
    r"DELETE\s+FROM\s",
    r"CREATE\s+(?:OR\s+REPLACE\s+|UNLOGGED\s+|TEMP(?:ORARY)?\s+|UNIQUE\s+)*" + _SQL_OBJECT,
    r"(?:ALTER|DROP)\s+" + _SQL_OBJECT,
    r"GRANT\s+\S.*?\s(?:ON|TO)\s",
    r"REVOKE\s+\S.*?\sFROM\s",
    r'LISTEN\s+[\w"{]',
    r"SET\s+(?:LOCAL\s+|SESSION\s+)?[\w.]+\s*(?:=|TO\s)",
    r"WITH\s+(?:RECURSIVE\s+)?\w+(?:\s*\([^)]*\))?\s+AS\s+(?:NOT\s+)?(?:MATERIALIZED\s+)?\(",
    r'LOCK\s+(?:TABLE\s+)?[\w"{]',
]
SQL_STATEMENT = re.compile(r"\s*(?:" + "|".join(_STATEMENT_SHAPES) + ")", re.IGNORECASE | re.DOTALL)

# (file under outbox_relay/, how the statement starts): the only SQL allowed in Python strings.
ALLOWED = {
    # A replication connection (cdc/stream.py) speaks the walsender's simple query protocol: its
    # commands (IDENTIFY_SYSTEM, CREATE_REPLICATION_SLOT, START_REPLICATION) and the slot look-up
    # sent over it stay named next to the streaming code.
    ("cdc/stream.py", "SELECT slot_type, plugin, database = current_database()"),
}


def sql_statements(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string in ``source`` that reads as a SQL statement.

    An f-string is read whole, each placeholder as ``{}``, so ``f"LISTEN {channel}"`` counts.
    """
    tree = ast.parse(source)
    skipped: set[int] = set()  # ids of constants not to read on their own
    for node in ast.walk(tree):
        # Docstrings and other bare string expressions are never sent to a database.
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            skipped.add(id(node.value))
        elif isinstance(node, ast.JoinedStr):
            skipped.update(id(part) for part in node.values)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            value: object = "".join(
                part.value if isinstance(part, ast.Constant) else "{}" for part in node.values
            )
        elif isinstance(node, ast.Constant) and id(node) not in skipped:
            value = node.value
        else:
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str) and SQL_STATEMENT.match(value):
            found.append((node.lineno, " ".join(value.split())))
    return sorted(found)


def test_no_sql_statement_lives_in_a_python_string() -> None:
    offenders = []
    allowed_and_seen = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        for line, text in sql_statements(path.read_text("utf-8")):
            allowance = next(
                (
                    (file, start)
                    for file, start in ALLOWED
                    if file == relative and text.startswith(start)
                ),
                None,
            )
            if allowance:
                allowed_and_seen.add(allowance)
            else:
                offenders.append(f"outbox_relay/{relative}:{line}: {text[:80]}")
    assert offenders == [], (
        "SQL in Python strings; move each statement into a named query in "
        "outbox_relay/db/sql/*.sql (see db/queries.py):\n" + "\n".join(offenders)
    )
    assert allowed_and_seen == ALLOWED, f"stale ALLOWED entries: {ALLOWED - allowed_and_seen}"


# Every line ending in "# SQL" holds a statement the detector must report, and only those.
PLANTED = '''
"""Module docstring: SELECT what you need and DELETE FROM your mind the rest."""

from psycopg import sql

CLAIM = "SELECT id FROM outbox WHERE published_at IS NULL"  # SQL
ROLE = sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier("x"))  # SQL
SPLIT = (
    "delete from outbox"  # SQL
    " where id = %s"
)
RAW = b"update outbox set attempts = 0"  # SQL
FORMATTED = f"  LISTEN {CLAIM}"  # SQL
SETTING = "SET LOCAL lock_timeout = '5s'"  # SQL
CTE = "WITH recent AS (SELECT 1) SELECT * FROM recent"  # SQL
KEEPALIVES = "SET tcp_keepalives_idle = 30; SET tcp_keepalives_count = 3"  # SQL
REVOKE = "REVOKE ALL ON outbox FROM app"  # SQL
CONCAT = "ALTER ROLE " + "x"  # SQL


def helper() -> None:
    """Create the table if missing (a docstring, never run)."""
    mode = "delete"
    help_text = "Delete every message in the queue."
    prose = "insert is for relation oid 7"
    choice = "With --grants: the application role"
    message = f"drop {mode} later"
    print(mode, help_text, prose, choice, message)
'''


def test_the_detector_finds_planted_statements_and_passes_prose() -> None:
    found = sql_statements(PLANTED)
    planted = {
        number
        for number, line in enumerate(PLANTED.splitlines(), start=1)
        if line.endswith("# SQL")
    }
    assert {line for line, _ in found} == planted
    assert (9, "delete from outbox where id = %s") in found
    assert (13, "LISTEN {}") in found
