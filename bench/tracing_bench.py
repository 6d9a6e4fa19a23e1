"""Relay throughput with tracing off versus on (issue: tracing must cost at most 10%).

Each run loads the same backlog of events whose rows carry a producer's ``traceparent`` (as a
traced ``emit()`` writes them), then times a real ``Relay`` publishing all of it to RabbitMQ with
confirms, in a child process of its own:

* ``off``: no hooks, exactly what ``outbox-relay serve`` runs with no OTEL_* variables;
* ``on``: :class:`~outbox_relay.observability.tracing.RelayTracing` on an SDK ``TracerProvider`` with a
  ``BatchSpanProcessor`` and an exporter that drops the spans (what exporting costs the relay is
  the batch processor's queue; the network work happens on its own thread);
* ``on-10%``: the same relay, but only 10% of the producers' traces are sampled (producers with
  ``OTEL_TRACES_SAMPLER=parentbased_traceidratio``, ``OTEL_TRACES_SAMPLER_ARG=0.1``); the relay's
  default parent-based sampler follows their decision and forwards unsampled contexts as is.

Modes alternate (off, on, on-10%, off, ...) so a drift of the machine hits all of them; the
median of ``--rounds`` is reported.

    .venv/bin/python bench/tracing_bench.py [--events 50000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import pika.exceptions
import psycopg
from bench_setup import EVENT_TYPE, PAYLOAD_SQL, BenchEnv, bench_env

from outbox_relay.publishers import create_publisher
from outbox_relay.relay.loop import Relay
from outbox_relay.relay.settings import DEFAULT_BATCH_SIZE, Mode, RelaySettings

MODES = ("off", "on", "on-10%")
# Diagnostics, not run by default: the SDK loaded and a provider running, but no hooks.
EXTRA_MODES = ("sdk-idle",)


def load_backlog(database_url: str, events: int, *, sampled: float) -> None:
    """``events`` rows, 200 aggregates, each with its own producer trace context, a ``sampled``
    fraction of them sampled."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO outbox (event_id, event_type, aggregate_type, aggregate_id, payload,"
            " headers)"
            f" SELECT gen_random_uuid(), '{EVENT_TYPE}', 'bench', 'agg-' || mod(g, 200),"
            f" {PAYLOAD_SQL}, jsonb_build_object('traceparent', '00-' ||"
            " md5(g::text) || '-' || substr(md5((g + 1)::text), 1, 16) ||"
            " CASE WHEN random() < %s THEN '-01' ELSE '-00' END)"
            " FROM generate_series(1, %s) AS g",
            [sampled, events],
        )
        conn.execute("VACUUM ANALYZE outbox")


class DroppingExporter:
    """A SpanExporter that counts spans and throws them away."""

    def __init__(self) -> None:
        self.exported = 0

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _child(mode: str, settings_kwargs: dict[str, Any], pipe: Connection) -> None:
    try:
        pipe.send(asyncio.run(_relay_until_empty(mode, settings_kwargs)))
    except Exception as exc:
        pipe.send({"error": repr(exc)})
    finally:
        pipe.close()


async def _relay_until_empty(mode: str, settings_kwargs: dict[str, Any]) -> dict[str, Any]:
    settings = RelaySettings(**settings_kwargs, mode=Mode.POLL)
    hooks = None
    provider = exporter = None
    if mode != "off":
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from outbox_relay.observability.tracing import INSTRUMENTATION, RelayTracing

        exporter = DroppingExporter()
        provider = TracerProvider()  # the default sampler: parentbased_always_on
        provider.add_span_processor(BatchSpanProcessor(exporter))  # type: ignore[arg-type]  # a duck-typed exporter
        if mode != "sdk-idle":
            hooks = RelayTracing(
                provider.get_tracer(INSTRUMENTATION),
                system="rabbitmq",
                destination=settings.publisher.exchange,
            )
    relay = Relay(settings, create_publisher(settings.publisher), hooks)
    async with await psycopg.AsyncConnection.connect(
        settings.database_url, autocommit=True
    ) as conn:
        started, cpu_started = time.perf_counter(), time.process_time()
        running = asyncio.create_task(relay.run())
        while True:
            await asyncio.sleep(0.05)
            cur = await conn.execute("SELECT count(*) FROM outbox")
            row = await cur.fetchone()
            if row is not None and row[0] == 0:
                break
            if running.done():
                running.result()
                raise RuntimeError("the relay stopped early")
        seconds = time.perf_counter() - started
        # CPU of the whole relay process (the span processor's thread included): steadier than
        # wall time on a machine shared with other work.
        cpu = time.process_time() - cpu_started
        relay.stop()
        await running
    spans = 0
    if provider is not None and exporter is not None:
        provider.shutdown()
        spans = exporter.exported
    return {"seconds": seconds, "cpu_seconds": cpu, "spans": spans}


def run_once(env: BenchEnv, mode: str, events: int, batch_size: int) -> dict[str, Any]:
    """One timed run; rerun (up to three times) when a shared service restarted under it."""
    for attempt in range(3):
        try:
            return _run_once(env, mode, events, batch_size)
        except (RuntimeError, psycopg.OperationalError, pika.exceptions.AMQPError) as exc:
            print(f"{mode}: interrupted ({exc!r}); running it again", file=sys.stderr)
            if attempt == 2:
                raise
            time.sleep(10)
            with psycopg.connect(env.database_url, autocommit=True) as conn:
                conn.execute("DELETE FROM outbox")
            env.purge_queue()
    raise AssertionError("unreachable")


def _run_once(env: BenchEnv, mode: str, events: int, batch_size: int) -> dict[str, Any]:
    load_backlog(env.database_url, events, sampled=0.1 if mode == "on-10%" else 1.0)
    settings_kwargs = {
        "database_url": env.database_url,
        "broker_url": env.broker_url,
        "exchange": env.exchange,
        "batch_size": batch_size,
        "poll_interval": 0.05,
    }
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_child, args=(mode, settings_kwargs, child))
    process.start()
    result: dict[str, Any] = parent.recv()
    process.join(60)
    env.purge_queue()
    if "error" in result:
        raise RuntimeError(f"{mode}: {result['error']}")
    result["events_per_second"] = events / result["seconds"]
    result["cpu_us_per_event"] = 1e6 * result["cpu_seconds"] / events
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        # argparse %-formats help: "on-10%" must be escaped or --help fails.
        help=f"of {', '.join(MODES + EXTRA_MODES)}".replace("%", "%%"),
    )
    parser.add_argument(
        "--admin-url",
        default=os.environ.get(
            "OUTBOX_RELAY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument(
        "--broker-url",
        default=os.environ.get(
            "OUTBOX_RELAY_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"
        ),
    )
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",")]
    if "off" not in modes or not set(modes) <= set(MODES + EXTRA_MODES):
        parser.error(f"--modes: 'off' plus any of {', '.join(MODES + EXTRA_MODES)}")
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu: dict[str, list[float]] = {mode: [] for mode in modes}
    spans: dict[str, int] = dict.fromkeys(modes, 0)
    with bench_env(args.admin_url, args.broker_url) as env:
        run_once(env, "off", min(args.events, 5000), args.batch_size)  # warm up both services
        for round_ in range(args.rounds):
            for mode in modes:
                result = run_once(env, mode, args.events, args.batch_size)
                rates[mode].append(result["events_per_second"])
                cpu[mode].append(result["cpu_us_per_event"])
                spans[mode] = result["spans"]
                print(
                    f"round {round_ + 1} {mode:>7}: {result['events_per_second']:8.0f} events/s"
                    f", {result['cpu_us_per_event']:6.1f} CPU us/event ({result['spans']} spans)",
                    file=sys.stderr,
                )
    off = statistics.median(rates["off"])
    off_cpu = statistics.median(cpu["off"])
    summary = {
        mode: {
            "median_events_per_second": round(statistics.median(values)),
            "runs": [round(v) for v in values],
            "throughput_cost_vs_off_percent": round(100 * (1 - statistics.median(values) / off), 1),
            "median_cpu_us_per_event": round(statistics.median(cpu[mode]), 1),
            "cpu_cost_vs_off_percent": round(100 * (statistics.median(cpu[mode]) / off_cpu - 1), 1),
            "spans_last_run": spans[mode],
        }
        for mode, values in rates.items()
    }
    print(json.dumps({"events": args.events, "batch_size": args.batch_size, **summary}, indent=2))


if __name__ == "__main__":
    main()
