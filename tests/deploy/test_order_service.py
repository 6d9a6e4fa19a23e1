"""examples/order_service.py, the demo's producer: run for real against a migrated database."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import psycopg
import pytest

import examples.order_service as order_service
from tests.conftest import wait_until
from tests.deploy.test_compose import variables_read_by

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "order_service.py"


def start(database_url: str, **variables: str) -> subprocess.Popen[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    env.update(OUTBOX_RELAY_DATABASE_URL=database_url, **variables)
    return subprocess.Popen(
        [sys.executable, "-m", "examples.order_service"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def orders_placed(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        exists = conn.execute("SELECT to_regclass('demo_orders') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return 0
        row = conn.execute("SELECT count(*) FROM demo_orders").fetchone()
        return int(row[0]) if row else 0


def events_by_order(database_url: str) -> tuple[set[int], dict[str, list[tuple[str, dict]]]]:
    with psycopg.connect(database_url) as conn:
        orders = {row[0] for row in conn.execute("SELECT id FROM demo_orders")}
        events: dict[str, list[tuple[str, dict]]] = defaultdict(list)
        for aggregate_type, aggregate_id, event_type, payload in conn.execute(
            "SELECT aggregate_type, aggregate_id, event_type, payload FROM outbox ORDER BY id"
        ):
            assert aggregate_type == "order"
            events[aggregate_id].append((event_type, payload))
    return orders, events


@pytest.mark.integration
def test_places_orders_with_their_events_until_sigterm(database_url: str) -> None:
    # Given the service running with a short interval
    service = start(database_url, ORDER_SERVICE_INTERVAL="0.05")
    try:
        # When it has placed a few orders and gets SIGTERM
        wait_until(lambda: service.poll() is not None or orders_placed(database_url) >= 3, 30)
        assert service.poll() is None, f"exited early: {service.communicate()}"
        service.send_signal(signal.SIGTERM)
        out, err = service.communicate(timeout=15)
    finally:
        if service.poll() is None:
            service.kill()
            service.communicate()

    # Then it finished the order in progress and exited 0
    assert service.returncode == 0, err
    assert "received SIGTERM" in out
    # and every order row came with exactly its two events: one transaction each
    orders, events = events_by_order(database_url)
    assert len(orders) >= 3
    assert set(events) == {str(order_id) for order_id in orders}
    assert sum(len(found) for found in events.values()) == 2 * len(orders)
    for order_id in orders:
        found = events[str(order_id)]
        assert [event_type for event_type, _ in found] == ["order.created", "order.paid"]
        created = found[0][1]
        assert created["order_id"] == order_id
        # The shape examples/order_consumer.py validates and handles
        assert created["lines"][0]["quantity"] == 1
        assert created["lines"][0]["sku"] in {"book", "pen"}
        assert "@" in created["customer_email"]


@pytest.mark.integration
def test_stops_by_itself_after_max_orders(database_url: str) -> None:
    service = start(database_url, ORDER_SERVICE_INTERVAL="0.01", ORDER_SERVICE_MAX_ORDERS="4")
    out, err = service.communicate(timeout=30)
    assert service.returncode == 0, err
    assert "placed 4 order(s)" in out
    assert orders_placed(database_url) == 4
    # Its table exists now: a second run reuses it and continues the order ids
    again = start(database_url, ORDER_SERVICE_INTERVAL="0.01", ORDER_SERVICE_MAX_ORDERS="1")
    again.communicate(timeout=30)
    assert again.returncode == 0
    orders, events = events_by_order(database_url)
    assert len(orders) == 5
    assert sum(len(found) for found in events.values()) == 10


@pytest.mark.integration
@pytest.mark.parametrize(
    ("variable", "value"), [("ORDER_SERVICE_INTERVAL", "0"), ("ORDER_SERVICE_MAX_ORDERS", "-1")]
)
def test_rejects_a_bad_setting_naming_the_variable(
    database_url: str, variable: str, value: str
) -> None:
    service = start(database_url, **{variable: value})
    _, err = service.communicate(timeout=30)
    assert service.returncode != 0
    assert variable in err
    assert orders_placed(database_url) == 0


def test_environment_lists_and_documents_every_variable_the_script_reads() -> None:
    """compose.yaml is checked against ENVIRONMENT, so it must be exactly what the script reads."""
    read = variables_read_by(SCRIPT)
    assert set(order_service.ENVIRONMENT) == read
    docstring = ast.get_docstring(ast.parse(SCRIPT.read_text("utf-8"))) or ""
    for name in order_service.ENVIRONMENT:
        assert f"``{name}``" in docstring, f"the docstring does not document {name}"
