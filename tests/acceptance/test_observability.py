"""Tracing, metrics and health probes of the installed CLI, run as subprocesses.

One event goes ``outbox-relay emit`` -> ``outbox-relay serve`` -> RabbitMQ ->
``outbox-relay consume``, each process printing its spans (OTEL_TRACES_EXPORTER=console), and the
three show one trace; the relay's /metrics and /readyz tell the truth during a run.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbox_relay.consumer import topology as topo
from tests.acceptance.conftest import (
    HANDLER,
    RelayProcess,
    WorkerProcess,
    cli_env,
    rabbitmq_start_app,
    rabbitmq_stop_app,
    run_cli,
)
from tests.conftest import RabbitQueue, wait_until
from tests.integration.consumer_harness import ConsumerEnv, consumer_env

pytestmark = pytest.mark.acceptance

TRACING = {
    "OTEL_TRACES_EXPORTER": "console",
    "OTEL_BSP_SCHEDULE_DELAY": "100",  # print spans within 0.1 s rather than 5 s
}


@pytest.fixture
def env(broker_url: str, database_url: str, exchange: str) -> Iterator[ConsumerEnv]:
    yield from consumer_env(broker_url, database_url, exchange)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def console_spans(text: str) -> list[dict[str, Any]]:
    """The spans a ConsoleSpanExporter printed (pretty JSON objects between log lines)."""
    spans: list[dict[str, Any]] = []
    block: list[str] | None = None
    for line in text.splitlines():
        if line == "{":
            block = [line]
        elif block is not None:
            block.append(line)
            if line == "}":
                spans.append(json.loads("\n".join(block)))
                block = None
    return spans


def span_named(spans: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((s for s in spans if s["name"] == name), None)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return 0, ""  # not listening (yet)


def test_one_trace_runs_through_emit_relay_and_consumer_processes(
    env: ConsumerEnv,
    relay_factory: Callable[..., RelayProcess],
    tmp_path: Path,
) -> None:
    variables = cli_env(
        database_url=env.database_url,
        broker_url=env.broker_url,
        exchange=env.exchange,
        poll_interval=0.2,
    )
    variables.update(TRACING)
    settings = env.settings()
    relay = relay_factory(variables).start()
    worker = WorkerProcess(
        {**variables, "OUTBOX_RELAY_QUEUE": settings.queue},
        tmp_path / "worker.log",
        "--handler",
        HANDLER,
        "--binding",
        "order.*",
    )
    try:
        relay.wait_for_log("holding 64 of 64 partitions")
        wait_until(
            lambda: topo.queue_depths(env.broker_url, [settings.queue])[0].messages is not None,
            timeout=30,
        )

        emitted = run_cli(
            "emit", "order.created", "--aggregate-id", "o-7", "--payload", "{}", env=variables
        )
        assert emitted.returncode == 0, emitted.stderr
        event_id = emitted.stdout.strip()  # stdout stays the event id alone
        emit_span = span_named(console_spans(emitted.stderr), "outbox emit order.created")
        assert emit_span is not None, emitted.stderr
        trace_id = emit_span["context"]["trace_id"]

        def relay_span() -> dict[str, Any] | None:
            return span_named(console_spans(relay.log()), "publish order.created")

        def consumer_span() -> dict[str, Any] | None:
            return span_named(console_spans(worker.log()), "process order.created")

        published = wait_until(relay_span, timeout=30)
        processed = wait_until(consumer_span, timeout=30)
    finally:
        worker.stop()

    assert published["context"]["trace_id"] == trace_id
    assert published["parent_id"] == emit_span["context"]["span_id"]
    assert published["kind"] == "SpanKind.PRODUCER"
    assert published["attributes"]["messaging.message.id"] == event_id
    assert processed["context"]["trace_id"] == trace_id
    assert processed["parent_id"] == published["context"]["span_id"]
    assert processed["kind"] == "SpanKind.CONSUMER"
    assert env.effect_counts() == {event_id: 1}
    assert relay.terminate() == 0


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of the first sample ``name{...labels...}`` in a Prometheus exposition."""
    for line in text.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if match and all(f'{k}="{v}"' in (match[1] or "") for k, v in labels.items()):
            return float(match[2])
    return None


def test_metrics_endpoint_serves_real_values_and_probes_answer(
    database_url: str,
    broker_url: str,
    exchange: str,
    bind_queue: Callable[..., RabbitQueue],
    relay_factory: Callable[..., RelayProcess],
) -> None:
    queue = bind_queue("order.*")
    metrics_port, health_port = free_port(), free_port()
    variables = cli_env(
        database_url=database_url,
        broker_url=broker_url,
        exchange=exchange,
        poll_interval=0.2,
        max_attempts=1,
        metrics_port=metrics_port,
        health_port=health_port,
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        for n in range(20):
            conn.execute(
                "INSERT INTO outbox (event_id, event_type, aggregate_id, payload)"
                " VALUES (gen_random_uuid(), 'order.created', %s, '{}')",
                [f"o-{n % 3}"],
            )
        # Nobody binds 'invoice.*': unroutable, and dead after one attempt.
        conn.execute(
            "INSERT INTO outbox (event_id, event_type, payload)"
            " VALUES (gen_random_uuid(), 'invoice.sent', '{}')"
        )
    relay = relay_factory(variables).start()
    relay.wait_for_log("serving metrics")
    url = f"http://127.0.0.1:{metrics_port}/metrics"

    def scraped() -> str | None:
        status, text = get(url)
        done = status == 200 and metric(text, "outbox_relay_events_dead_lettered_total") == 1
        drained = metric(text, "outbox_relay_pending") == 0
        return text if done and drained else None

    text = wait_until(scraped, timeout=30)
    assert queue.count() == 20
    assert metric(text, "outbox_relay_events_published_total") == 20
    assert metric(text, "outbox_relay_publish_failures_total", reason="unroutable") == 1
    assert metric(text, "outbox_relay_delivery_lag_seconds_count") == 20
    assert (metric(text, "outbox_relay_delivery_lag_seconds_sum") or 0) > 0
    assert (metric(text, "outbox_relay_publish_duration_seconds_count") or 0) >= 1
    assert metric(text, "outbox_relay_batch_size_sum") == 21
    assert metric(text, "outbox_relay_pending_oldest_age_seconds") == 0
    assert metric(text, "outbox_relay_events_published_total", messaging_system="rabbitmq")

    assert get(f"http://127.0.0.1:{health_port}/livez")[0] == 200
    assert get(f"http://127.0.0.1:{health_port}/readyz") == (200, '{"status": "ready"}')
    assert get(f"http://127.0.0.1:{health_port}/nope")[0] == 404
    assert relay.terminate() == 0


@pytest.mark.disruptive
def test_readyz_turns_unready_within_5s_of_the_broker_going_down_and_recovers(
    env: ConsumerEnv,
    relay_factory: Callable[..., RelayProcess],
    tmp_path: Path,
) -> None:
    relay_port, consumer_port = free_port(), free_port()
    variables = cli_env(
        database_url=env.database_url,
        broker_url=env.broker_url,
        exchange=env.exchange,
        poll_interval=0.2,
    )
    relay = relay_factory({**variables, "OUTBOX_RELAY_HEALTH_PORT": str(relay_port)}).start()
    worker = WorkerProcess(
        {
            **variables,
            "OUTBOX_RELAY_QUEUE": env.settings().queue,
            "OUTBOX_RELAY_HEALTH_PORT": str(consumer_port),
        },
        tmp_path / "worker.log",
        "--handler",
        HANDLER,
        "--binding",
        "order.*",
    )
    probes = {
        "relay": f"http://127.0.0.1:{relay_port}",
        "consumer": f"http://127.0.0.1:{consumer_port}",
    }

    def all_ready(code: int) -> bool:
        return all(get(f"{base}/readyz")[0] == code for base in probes.values())

    try:
        relay.wait_for_log("holding 64 of 64 partitions")
        wait_until(lambda: all_ready(200), timeout=30)
        try:
            rabbitmq_stop_app()
            stopped = time.monotonic()
            wait_until(lambda: all_ready(503), timeout=5, interval=0.1)
            assert time.monotonic() - stopped <= 5
            for base in probes.values():  # degraded, not stuck: no restart wanted
                assert get(f"{base}/livez")[0] == 200
        finally:
            rabbitmq_start_app()
        wait_until(lambda: all_ready(200), timeout=60, interval=0.2)
        assert worker.running(), worker.log()
    finally:
        exit_code = worker.stop()
    assert exit_code == 0, worker.log()
    assert relay.terminate() == 0
