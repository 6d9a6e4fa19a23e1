"""Many outboxes, one relay process (issue 14): fairness and schema-per-tenant figures.

    .venv/bin/python bench/many_outboxes.py                        # both parts, full sizes
    .venv/bin/python bench/many_outboxes.py --only fairness --backlog 20000 --rounds 1
    .venv/bin/python bench/many_outboxes.py --only tenants --schemas 20

(a) fairness: 10 outboxes (schemas o0..o9 of one database) served by one ``outbox-relay serve
--config`` process. A trickle (``--rate`` events/s into each of o1..o9) runs for ``--seconds``,
once with nothing else pending and once right after ``--backlog`` events were committed into o0
at once; the two runs alternate for ``--rounds`` rounds. The trickle's commit-to-confirm latency
is measured at a RabbitMQ consumer of a queue bound to the trickle's routing key only: receive
time minus the commit time the producer wrote into the payload just before its one-statement
commit. Reported: p50/p99 per run, their medians, and the ratio backlog/baseline of the p99
(target: within 2x).

(b) tenants: ``--schemas`` tenant schemas in one database (created and migrated by the script,
50 events each, pending before the relay starts), relayed through one ``schemas = "tenant_*"``
table. Measured: time from the relay's start until every event reached the queue (drain), a new
tenant schema created and migrated mid-run (after the drain) and the time until its event
arrives (discovery delay), the relay's CPU while idle (percent of one core over ``--idle-seconds``,
from /proc), and the most connections to that database at once (pg_stat_activity by datname,
sampled every 0.25 s over the whole part).

Every relay is the real console script, configured by a config file the script writes. Creates
its own database, exchange and queues (bench/bench_setup.py) and removes them; prints a table and
writes bench/results/many-outboxes-latest.json. Not a CI test. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pika
import psycopg
from bench_setup import PAYLOAD_SQL, BenchEnv, bench_env
from cpu_usage import CpuMeter
from relay_bench import (
    DEFAULT_ADMIN_URL,
    DEFAULT_BROKER_URL,
    RESULTS,
    code_version,
    log,
    median,
    percentile,
    uptime,
)
from scale_bench import relay_command

from outbox_relay.db.migrations import migrate

PARTS = ("fairness", "tenants")
FAIR_OUTBOXES = 10
TRICKLE_TYPE = "bench.trickle"
BACKLOG_TYPE = "bench.backlog"
EVENTS_PER_TENANT = 50
TARGET_FAIRNESS_RATIO = 2.0
TARGET_CONNECTIONS = 10
TARGET_DISCOVERY_S = 30.0
TARGET_IDLE_CPU = 2.0
# Connections one outbox opens today (three claiming lanes, a lease connection, a LISTEN
# connection in notify mode): to refuse a run that would exhaust a shared server's
# max_connections. A relay with a connection budget (--max-db-connections) is given one instead.
CONNECTIONS_PER_OUTBOX = 5
BUDGET = 8  # --max-db-connections, when the relay has the option
HEADROOM = 20  # connections left for everyone else on the server


# -- the relay: `outbox-relay serve --config` -----------------------------------------------------


def has_connection_budget() -> bool:
    done = subprocess.run(
        [*relay_command(), "serve", "--help"], capture_output=True, text=True, check=False
    )
    return "--max-db-connections" in done.stdout


class ConfigRelay:
    """One ``outbox-relay serve --config FILE`` child; JSON logs to a file."""

    def __init__(self, config: str, log_dir: Path, extra: list[str]) -> None:
        self.config_path = log_dir / f"relay-{time.time_ns()}.toml"
        self.config_path.write_text(config)
        self.log_path = self.config_path.with_suffix(".log")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_RELAY_", "OTEL_"))}
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(
                [*relay_command(), "serve", "--config", str(self.config_path), *extra],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.process.pid

    def check(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"relay exited ({self.process.returncode}):\n{self.tail()}")

    def entries(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                entry = {"level": "raw", "message": line}
            found.append(entry if isinstance(entry, dict) else {"message": line})
        return found

    def problems(self) -> list[str]:
        return [
            str(e.get("message"))
            for e in self.entries()
            if str(e.get("level", "")).lower() in ("error", "critical", "raw")
        ]

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 60) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def config_text(env: BenchEnv, tables: list[dict[str, str]], mode: str) -> str:
    lines = [
        "[defaults]",
        f'broker_url = "{env.broker_url}"',
        f'exchange = "{env.exchange}"',
        f'mode = "{mode}"',
        'log_format = "json"',
        "",
    ]
    for table in tables:
        lines.append("[[outbox]]")
        lines += [f'{key} = "{value}"' for key, value in table.items()]
        lines.append(f'database_url = "{env.database_url}"')
        lines.append("")
    return "\n".join(lines)


# -- broker and database helpers -------------------------------------------------------------


@contextmanager
def channel(url: str) -> Iterator[Any]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        yield connection.channel()
    finally:
        connection.close()


def queue_depth(env: BenchEnv, queue: str) -> int:
    with channel(env.broker_url) as ch:
        return int(ch.queue_declare(queue, passive=True).method.message_count)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, relay: ConfigRelay) -> float:
    """Seconds until ``condition`` holds (polled every 50 ms); raises after ``timeout``."""
    started = time.monotonic()
    while not condition():
        relay.check()
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.05)
    return time.monotonic() - started


def server_room(admin_url: str) -> int:
    """Connections still free on the server, minus the headroom left for everyone else."""
    with psycopg.connect(admin_url) as conn:
        row = conn.execute(
            "SELECT current_setting('max_connections')::int - count(*) FROM pg_stat_activity"
        ).fetchone()
    assert row is not None
    return int(row[0]) - HEADROOM


class ConnectionSampler:
    """The most connections to one database at once (pg_stat_activity), sampled in a thread."""

    def __init__(self, admin_url: str, database: str, interval: float = 0.25) -> None:
        self.admin_url, self.database, self.interval = admin_url, database, interval
        self.most = 0
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-conns", daemon=True)

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            while not self._stop.wait(self.interval):
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (self.database,)
                ).fetchone()
                count = int(row[0]) if row else 0
                self.samples.append(count)
                self.most = max(self.most, count)


# -- (a) fairness ----------------------------------------------------------------------------------


class TrickleConsumer:
    """Latency of each trickle event: receive time minus the commit time in its payload."""

    def __init__(self, env: BenchEnv, queue: str) -> None:
        self.latencies: list[float] = []
        self.received = 0  # every trickle event, recorded or not
        self.recording = False
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(env.broker_url, queue), name="bench-trickle", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("trickle consumer did not start")

    def _run(self, url: str, queue: str) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        ch = connection.channel()
        ch.basic_qos(prefetch_count=1000)
        self._ready.set()
        for _method, _properties, body in ch.consume(queue, auto_ack=True, inactivity_timeout=0.2):
            if self._stop.is_set():
                break
            if body is None:
                continue
            received = time.time()
            if self.recording:
                self.latencies.append(received - float(json.loads(body)["t"]))
            self.received += 1
        ch.cancel()
        connection.close()

    def take(self) -> list[float]:
        taken, self.latencies = self.latencies, []
        return taken

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


def trickle(env: BenchEnv, schemas: list[str], rate: float, seconds: float) -> int:
    """``rate`` events/s into each schema for ``seconds``, each committed on its own; the
    payload carries the time just before the commit. Returns how many were written."""
    connections = [psycopg.connect(env.database_url, autocommit=True) for _ in schemas]
    written = 0
    try:
        started = time.monotonic()
        tick = 1.0 / rate
        n = 0
        while (due := started + n * tick) < started + seconds:
            time.sleep(max(0.0, due - time.monotonic()))
            for schema, conn in zip(schemas, connections, strict=True):
                conn.execute(
                    f"INSERT INTO {schema}.outbox (event_type, aggregate_type, aggregate_id,"
                    " payload) VALUES (%s, 'bench', %s, jsonb_build_object('t', %s::float8))",
                    (TRICKLE_TYPE, f"{schema}-{n % 50}", time.time()),
                )
                written += 1
            n += 1
    finally:
        for conn in connections:
            conn.close()
    return written


def insert_backlog(env: BenchEnv, schema: str, count: int) -> None:
    with psycopg.connect(env.database_url) as conn:
        conn.execute(
            f"INSERT INTO {schema}.outbox (event_type, aggregate_type, aggregate_id, payload)"
            f" SELECT %s, 'bench', mod(g, 1000)::text, {PAYLOAD_SQL}"
            " FROM generate_series(0::bigint, %s::bigint) AS g",
            (BACKLOG_TYPE, count - 1),
        )
        conn.execute(f"ANALYZE {schema}.outbox")
        conn.commit()


def pending_in(env: BenchEnv, schema: str) -> int:
    with psycopg.connect(env.database_url) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM {schema}.outbox WHERE published_at IS NULL AND dead_at IS NULL"
        ).fetchone()
    return int(row[0]) if row else 0


def latency_summary(latencies: list[float], written: int) -> dict[str, Any]:
    ordered = sorted(latencies)
    return {
        "events": written,
        "received": len(ordered),
        "p50_ms": round(1000 * percentile(ordered, 50), 1),
        "p99_ms": round(1000 * percentile(ordered, 99), 1),
        "max_ms": round(1000 * ordered[-1], 1) if ordered else None,
    }


def fairness(env: BenchEnv, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    schemas = [f"o{n}" for n in range(FAIR_OUTBOXES)]
    busy, quiet = schemas[0], schemas[1:]
    with psycopg.connect(env.database_url, autocommit=True) as conn:
        for schema in schemas:
            migrate(conn, schema)
    trickle_queue = f"{env.queue}.trickle"
    with channel(env.broker_url) as ch:
        ch.queue_declare(trickle_queue, durable=True)
        ch.queue_bind(trickle_queue, env.exchange, TRICKLE_TYPE)
    tables = [{"name": s, "schema": s} for s in schemas]
    extra = ["--max-db-connections", str(BUDGET)] if args.budget else []
    relay = ConfigRelay(config_text(env, tables, args.mode), work, extra)
    consumer = TrickleConsumer(env, trickle_queue)
    runs: list[dict[str, Any]] = []
    try:
        log(f"fairness: {len(schemas)} outboxes, relay pid {relay.pid}; warming up")
        # Until every outbox's relay is connected and holds its partitions: the warm-up's
        # events have all arrived.
        sent = trickle(env, quiet, args.rate, 3.0)
        wait_for(lambda: consumer.received >= sent, 120, "warm-up events", relay)
        for round_number in range(1, args.rounds + 1):
            for kind in ("baseline", "backlog"):
                if kind == "backlog":
                    insert_backlog(env, busy, args.backlog)
                consumer.recording = True
                written = trickle(env, quiet, args.rate, args.seconds)
                sent += written
                wait_for(
                    lambda total=sent: consumer.received >= total, 300, "trickle events", relay
                )
                consumer.recording = False
                left = pending_in(env, busy)
                run = {
                    "round": round_number,
                    "kind": kind,
                    **latency_summary(consumer.take(), written),
                }
                if kind == "backlog":
                    run["backlog_pending_at_end"] = left
                    wait_for(lambda: pending_in(env, busy) == 0, 600, "backlog drain", relay)
                runs.append(run)
                log(f"fairness round {round_number} {kind}: {run}")
                with channel(env.broker_url) as ch:
                    ch.queue_purge(env.queue)
        problems = relay.problems()
    finally:
        consumer.close()
        relay.stop()
        with channel(env.broker_url) as ch:
            ch.queue_delete(trickle_queue)

    def medians(kind: str, key: str) -> float:
        return round(median([r[key] for r in runs if r["kind"] == kind]), 1)

    summary = {
        kind: {key: medians(kind, key) for key in ("p50_ms", "p99_ms")}
        for kind in ("baseline", "backlog")
    }
    ratio = summary["backlog"]["p99_ms"] / max(summary["baseline"]["p99_ms"], 1e-9)
    return {
        "outboxes": FAIR_OUTBOXES,
        "backlog": args.backlog,
        "rate_per_outbox": args.rate,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "mode": args.mode,
        "runs": runs,
        "median": summary,
        "p99_ratio": round(ratio, 2),
        "target_ratio": TARGET_FAIRNESS_RATIO,
        "meets_target": ratio <= TARGET_FAIRNESS_RATIO,
        "relay_problems": problems[:10],
    }


# -- (b) tenants ----------------------------------------------------------------------------------


def create_tenants(env: BenchEnv, names: list[str]) -> None:
    with psycopg.connect(env.database_url, autocommit=True) as conn:
        for name in names:
            migrate(conn, name)
            conn.execute(
                f"INSERT INTO {name}.outbox (event_type, aggregate_type, aggregate_id, payload)"
                f" SELECT %s, 'bench', mod(g, 10)::text, {PAYLOAD_SQL}"
                " FROM generate_series(0, %s) AS g",
                (BACKLOG_TYPE, EVENTS_PER_TENANT - 1),
            )


def tenants(env: BenchEnv, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    names = [f"tenant_{n:04d}" for n in range(args.schemas)]
    expected = args.schemas * EVENTS_PER_TENANT
    log(f"tenants: creating {args.schemas} schemas with {EVENTS_PER_TENANT} events each")
    started = time.monotonic()
    create_tenants(env, names)
    log(f"tenants: created in {time.monotonic() - started:.1f}s")
    tables = [{"name": "tenants", "schemas": "tenant_*"}]
    extra = ["--max-db-connections", str(BUDGET)] if args.budget else []
    with ConnectionSampler(env.admin_url, env.database) as sampler:
        relay = ConfigRelay(config_text(env, tables, args.mode), work, extra)
        try:
            wait_for(lambda: queue_depth(env, env.queue) >= expected, 900, "tenants drain", relay)
            drain = time.monotonic() - relay.started  # from the relay's start
            log(f"tenants: {expected} events relayed {drain:.1f}s after the relay started")
            # A tenant arrives mid-run: created and migrated, one event written at once.
            create_tenants(env, ["tenant_zz_new"])
            created_at = time.monotonic()  # migrated, its events committed
            wait_for(
                lambda: queue_depth(env, env.queue) >= expected + EVENTS_PER_TENANT,
                120,
                "the new tenant's events",
                relay,
            )
            discovery = time.monotonic() - created_at
            log(f"tenants: new schema's events arrived {discovery:.1f}s after it was created")
            time.sleep(2.0)  # let the last batches settle before measuring idle
            meter = CpuMeter({relay.pid}).start()
            time.sleep(args.idle_seconds)
            cpu = meter.stop()
            relay.check()
            problems = relay.problems()
        finally:
            relay.stop()
    most = sampler.most
    return {
        "schemas": args.schemas,
        "events": expected,
        "mode": args.mode,
        "connection_budget": BUDGET if args.budget else None,
        "drain_seconds": round(drain, 2),
        "discovery_seconds": round(discovery, 2),
        "max_connections": most,
        "connections_per_schema": round(most / (args.schemas + 1), 2),
        "idle_cpu_percent_of_core": cpu["relay"],
        "idle_seconds": args.idle_seconds,
        "targets": {
            "max_connections": TARGET_CONNECTIONS,
            "discovery_seconds": TARGET_DISCOVERY_S,
            "idle_cpu_percent": TARGET_IDLE_CPU,
        },
        "meets_targets": {
            "max_connections": most <= TARGET_CONNECTIONS,
            "discovery_seconds": discovery <= TARGET_DISCOVERY_S,
            "idle_cpu_percent": cpu["relay"] <= TARGET_IDLE_CPU,
        },
        "machine": {"busy_percent": cpu["machine_busy"], "load1": cpu["machine_load1"]},
        "relay_problems": problems[:10],
    }


# -- the run -------------------------------------------------------------------------------------


def check_room(args: argparse.Namespace, outboxes: int) -> None:
    """Refuse a run that would take a shared server's last connections from everyone else."""
    if args.budget:
        return
    room = server_room(args.admin_url)
    wanted = outboxes * CONNECTIONS_PER_OUTBOX
    if wanted > room and not args.force:
        sys.exit(
            f"error: {outboxes} outboxes would open about {wanted} connections; the server has "
            f"{room} to spare (keeping {HEADROOM} for others). Use fewer --schemas, a relay "
            "with --max-db-connections, or --force."
        )


def print_table(results: dict[str, Any]) -> None:
    fair = results.get("fairness")
    if fair:
        print("\n(a) fairness: trickle commit-to-confirm, ms (medians over rounds)")
        print(f"{'run':<10}{'p50':>10}{'p99':>10}")
        for kind in ("baseline", "backlog"):
            row = fair["median"][kind]
            print(f"{kind:<10}{row['p50_ms']:>10}{row['p99_ms']:>10}")
        verdict = "meets" if fair["meets_target"] else "MISSES"
        print(f"p99 backlog/baseline: {fair['p99_ratio']}x ({verdict} <= {TARGET_FAIRNESS_RATIO}x)")
    ten = results.get("tenants")
    if ten:
        print(f"\n(b) {ten['schemas']} tenant schemas, {ten['events']} events")
        checks = ten["meets_targets"]
        rows = [
            ("max connections to the database", ten["max_connections"], checks["max_connections"]),
            (
                "relay idle CPU, % of a core",
                ten["idle_cpu_percent_of_core"],
                checks["idle_cpu_percent"],
            ),
            ("time to drain, s", ten["drain_seconds"], None),
            (
                "discovery delay of a new schema, s",
                ten["discovery_seconds"],
                checks["discovery_seconds"],
            ),
        ]
        for label, value, ok in rows:
            mark = "" if ok is None else ("  ok" if ok else "  over target")
            print(f"{label:<38}{value:>10}{mark}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=PARTS, help="run one part only")
    parser.add_argument("--schemas", type=int, default=200, help="tenant schemas (b)")
    parser.add_argument("--rounds", type=int, default=3, help="baseline/backlog pairs (a)")
    parser.add_argument(
        "--backlog", type=int, default=100_000, help="events pending in one outbox (a)"
    )
    parser.add_argument("--rate", type=float, default=20.0, help="trickle events/s per outbox (a)")
    parser.add_argument("--seconds", type=float, default=15.0, help="each trickle run (a)")
    parser.add_argument("--idle-seconds", type=float, default=20.0, help="idle CPU sample (b)")
    parser.add_argument("--mode", choices=("notify", "poll"), default="notify")
    parser.add_argument("--force", action="store_true", help="run even if connections run short")
    parser.add_argument(
        "--admin-url", default=os.environ.get("OUTBOX_RELAY_TEST_DATABASE_URL", DEFAULT_ADMIN_URL)
    )
    parser.add_argument(
        "--broker-url", default=os.environ.get("OUTBOX_RELAY_TEST_BROKER_URL", DEFAULT_BROKER_URL)
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "many-outboxes-latest.json")
    args = parser.parse_args()
    args.budget = has_connection_budget()
    parts = [args.only] if args.only else list(PARTS)
    if "fairness" in parts:
        check_room(args, FAIR_OUTBOXES)
    if "tenants" in parts:
        check_room(args, args.schemas + 1)
    results: dict[str, Any] = {
        "meta": {
            "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {os.cpu_count()} cores",
            "code": code_version(),
            "uptime_before": uptime(),
            "connection_budget": args.budget,
        }
    }
    with tempfile.TemporaryDirectory(prefix="many-outboxes-") as directory:
        work = Path(directory)
        for part in parts:
            with bench_env(args.admin_url, args.broker_url) as env:
                results[part] = (fairness if part == "fairness" else tenants)(env, args, work)
    results["meta"]["uptime_after"] = uptime()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"\nwritten: {args.output}")


if __name__ == "__main__":
    main()
