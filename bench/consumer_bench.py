"""Consumer throughput: events/s applied exactly once (inbox dedupe), unordered and ``--ordered``,
by 1 and 4 worker processes, and how many pairs of one aggregate's events were applied out of order.

    python bench/consumer_bench.py [--events 6000] [--aggregates 1000] [--work-ms 0 5]
        [--modes unordered ordered] [--workers 1 4] [--rounds 3] [--duplicates 0.1]
        [--prefetch 200] [--partition-queues 16] [--output bench/results/consumer-latest.json]

Needs the local PostgreSQL and RabbitMQ (override with OUTBOX_RELAY_BENCH_DATABASE_URL, an admin
URL, and OUTBOX_RELAY_BENCH_BROKER_URL), with the rabbitmq_consistent_hash_exchange plugin for the
ordered runs. Each run gets a fresh database and queue. The workers start first; once they consume
(ordered: once the partitions are spread over all of them) the events are published, each for a
random one of ``--aggregates`` aggregates (numbered in sequence per aggregate), a share of them
twice back to back (a relay republish, which the inbox absorbs). The rate is measured between the
first and the last handler commit; "out of order" counts the pairs of one aggregate's events whose
handler writes came in the opposite order of their sequence. ``--work-ms`` makes each handler
wait that long inside its transaction, as a handler waiting on I/O (an HTTP call, a slow query)
does; with 0 the handler is one INSERT and the run is CPU-bound (broker, PostgreSQL and workers
share the machine's cores).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pika
import pika.exceptions
import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table

from outbox_relay.consumer import Consumer, ConsumerSettings, Event
from outbox_relay.consumer import topology as topo
from outbox_relay.errors import OutboxRelayError

ADMIN_URL = os.environ.get(
    "OUTBOX_RELAY_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
BROKER_URL = os.environ.get(
    "OUTBOX_RELAY_BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"
)
EXCHANGE = "events.bench"
OUTPUT = Path(__file__).parent / "results" / "consumer-latest.json"

consumer = Consumer("bench")
# Seconds each handler waits inside its transaction (set in each worker process).
WORK_SECONDS = 0.0


@consumer.handler("order.*")
def apply(event: Event, db: psycopg.Connection[Any]) -> None:
    db.execute(
        "INSERT INTO effects (event_id, aggregate_id, seq) VALUES (%s, %s, %s)",
        (event.event_id, event.aggregate_id, event.payload["seq"]),
    )
    if WORK_SECONDS:
        time.sleep(WORK_SECONDS)  # waiting on I/O, inside the transaction


def _worker(settings: ConsumerSettings, work_seconds: float) -> None:
    global WORK_SECONDS
    WORK_SECONDS = work_seconds
    # SIGTERM from the parent: finish the message in flight, then exit.
    worker = consumer.worker(settings)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    worker.run()


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _database(name: str) -> str:
    return urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{name}"))


def _publish(events: int, aggregates: int, duplicates: float) -> int:
    """Events as the relay sends them; no confirms, so the publisher never holds the workers up
    (every event is counted at the end)."""
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    sent = 0
    rng = random.Random(20)
    seqs = [0] * aggregates
    try:
        channel = connection.channel()
        every = round(1 / duplicates) if duplicates > 0 else 0
        for n in range(events):
            # A random aggregate each time, so one aggregate's events are sometimes close together.
            aggregate = rng.randrange(aggregates)
            seq, seqs[aggregate] = seqs[aggregate], seqs[aggregate] + 1
            event_id = str(uuid.uuid4())
            properties = pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=event_id,
                type="order.updated",
                headers={"aggregate_type": "order", "aggregate_id": f"o-{aggregate}"},
            )
            body = json.dumps({"n": n, "seq": seq}).encode()
            for _ in range(2 if every and n % every == 0 else 1):
                channel.basic_publish(EXCHANGE, "order.updated", body, properties)
                sent += 1
    finally:
        connection.close()
    return sent


def _applied(url: str) -> int:
    """Effects written so far; -1 while PostgreSQL is unreachable (others restart it, the
    workers reconnect)."""
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute("SELECT count(*) FROM effects").fetchone()
    except psycopg.OperationalError:
        return -1
    return int(row[0]) if row else 0


def _consumers(queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.consumer_count)
    finally:
        connection.close()


def _wait_for_workers(topology: topo.Topology, workers: int, interval: float) -> None:
    """Until every worker consumes and, ordered, the partitions are spread: all claimed, nobody
    below its share, three looks in a row."""
    deadline = time.monotonic() + 120
    steady = 0
    while steady < 3:
        if time.monotonic() > deadline:
            raise SystemExit("the workers did not settle within 120 s")
        time.sleep(interval)
        if not topology.ordered:
            steady = 3 if _consumers(topology.queue) == workers else 0
            continue
        settled = (
            _consumers(topology.workers_queue) == workers
            and _consumers(topology.hungry_queue) == 0
            and all(_consumers(q) == 1 for q in topology.partition_queues)
        )
        steady = steady + 1 if settled else 0


def run(
    ordered: bool,
    workers: int,
    *,
    events: int,
    aggregates: int,
    duplicates: float,
    prefetch: int,
    partitions: int,
    work_ms: float,
) -> dict[str, Any]:
    name = f"consumer_bench_{uuid.uuid4().hex[:8]}"
    queue = f"bench.consumer.{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = _database(name)
    settings = ConsumerSettings(
        broker_url=BROKER_URL,
        database_url=url,
        queue=queue,
        bindings=("order.*",),
        exchange=EXCHANGE,
        prefetch=prefetch,
        ordered=ordered,
        # Options of the ordered consumer only (refused without --ordered).
        **({"partition_queues": partitions, "rebalance_interval": 0.5} if ordered else {}),
    )
    topology = settings.topology()
    processes: list[multiprocessing.process.BaseProcess] = []
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE effects (id bigint GENERATED ALWAYS AS IDENTITY,"
                " event_id text NOT NULL, aggregate_id text NOT NULL, seq int NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
            )
        topo.apply(BROKER_URL, topology)
        context = multiprocessing.get_context("spawn")
        processes = [
            context.Process(target=_worker, args=(settings, work_ms / 1000)) for _ in range(workers)
        ]
        for process in processes:
            process.start()
        _wait_for_workers(topology, workers, settings.rebalance_interval)
        cpu_before = sum(_cpu_seconds(p.pid) for p in processes)
        published = _publish(events, aggregates, duplicates)
        deadline = time.monotonic() + 900
        while (count := _applied(url)) < events:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {count} of {events} applied in 900s")
            time.sleep(0.1)
        cpu = sum(_cpu_seconds(p.pid) for p in processes) - cpu_before
        with psycopg.connect(url, autocommit=True) as conn:
            stats = conn.execute(
                "SELECT count(*), count(DISTINCT event_id),"
                " extract(epoch FROM max(applied_at) - min(applied_at)) FROM effects"
            ).fetchone()
            # Deliveries after a lost connection (a restart of the broker or the database by
            # someone else on this machine): a round with some was slowed by it.
            redelivered = conn.execute(
                "SELECT count(*) FROM processed_events WHERE redelivered"
            ).fetchone()
            # Pairs of one aggregate's events written in the opposite order of their sequence.
            inverted = conn.execute(
                "SELECT count(*) FROM effects a JOIN effects b"
                " ON a.aggregate_id = b.aggregate_id AND a.id < b.id AND a.seq > b.seq"
            ).fetchone()
        assert stats is not None
        assert inverted is not None
        assert redelivered is not None
        applied, distinct, seconds = int(stats[0]), int(stats[1]), float(stats[2])
        if applied != distinct:
            raise SystemExit(f"{applied - distinct} event(s) applied twice")
        return {
            "mode": "ordered" if ordered else "unordered",
            "workers": workers,
            "work_ms": work_ms,
            "aggregates": aggregates,
            "partitions": partitions if ordered else None,
            "published": published,
            "applied": applied,
            "skipped": published - applied,
            "inversions": int(inverted[0]),
            "redelivered": int(redelivered[0]),
            "seconds": seconds,
            "rate": (applied - 1) / seconds if seconds > 0 else float("inf"),
            # Steadier than the rate on a shared machine: the workers' own CPU per event.
            "worker_cpu_us_per_event": cpu / published * 1e6,
        }
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(30)
        try:
            _delete_topology(topology)
        finally:
            _drop_database(name)


def _drop_database(name: str) -> None:
    """Drop the run's database; waits out a PostgreSQL restart (up to a minute)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _delete_topology(topology: topo.Topology) -> None:
    """Everything the run declared; waits out a broker restart (up to a minute)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
            break
        except pika.exceptions.AMQPConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    try:
        channel = connection.channel()
        for queue_name in (
            topology.queue,
            topology.dead_letter_queue,
            *topology.retry_queues,
            *topology.partition_queues,
            topology.workers_queue,
            topology.hungry_queue,
        ):
            channel.queue_delete(queue_name)
        channel.exchange_delete(topology.dead_letter_exchange)
        channel.exchange_delete(topology.hash_exchange)
    finally:
        connection.close()


def summarize(results: list[dict[str, Any]], single_workers: int) -> list[dict[str, Any]]:
    """One row per (handler wait, mode, workers): the median run of the rounds by rate, its
    speedup over the median single-worker run of the same mode, and every round's rate."""
    groups: dict[tuple[float, str, int], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["work_ms"], r["mode"], r["workers"]), []).append(r)
    rows = []
    for runs in groups.values():
        ranked = sorted(runs, key=lambda r: r["rate"])
        rows.append(
            {
                **ranked[len(ranked) // 2],
                "rates": [round(r["rate"]) for r in runs],
                "inversions_max": max(r["inversions"] for r in runs),
            }
        )
    single = {(r["work_ms"], r["mode"]): r["rate"] for r in rows if r["workers"] == single_workers}
    for row in rows:
        row["speedup"] = row["rate"] / single[(row["work_ms"], row["mode"])]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=6_000)
    parser.add_argument("--aggregates", type=int, default=1_000)
    parser.add_argument("--duplicates", type=float, default=0.1, help="share published twice")
    parser.add_argument("--prefetch", type=int, default=200, help="ordered: per partition")
    parser.add_argument("--partition-queues", dest="partitions", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--modes", nargs="+", choices=["unordered", "ordered"], default=["unordered", "ordered"]
    )
    parser.add_argument(
        "--work-ms", type=float, nargs="+", default=[0.0, 5.0], help="handler I/O wait per event"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs of each case (modes alternate); medians shown"
    )
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    started, load_before = time.strftime("%Y-%m-%d %H:%M:%S"), os.getloadavg()
    results = []
    run_again: list[str] = []
    for work_ms in args.work_ms:
        for round_number in range(args.rounds):
            # Alternate which mode goes first, so a change in the machine's load hits both.
            modes = args.modes if round_number % 2 == 0 else args.modes[::-1]
            for mode in modes:
                for workers in args.workers:
                    print(
                        f"round {round_number + 1}: {mode}, {workers} worker(s), {work_ms:g} ms",
                        file=sys.stderr,
                    )
                    for attempt in range(3):
                        try:
                            result = run(
                                mode == "ordered",
                                workers,
                                events=args.events,
                                aggregates=args.aggregates,
                                duplicates=args.duplicates,
                                prefetch=args.prefetch,
                                partitions=args.partitions,
                                work_ms=work_ms,
                            )
                            break
                        except (OutboxRelayError, pika.exceptions.AMQPError, psycopg.Error) as exc:
                            # Others share these services and sometimes restart them.
                            if attempt == 2:
                                raise
                            print(f"  interrupted ({exc!r}); running it again", file=sys.stderr)
                            run_again.append(
                                f"{mode}/{workers}/{work_ms:g}ms/round {round_number + 1}"
                            )
                            time.sleep(10)
                    results.append({**result, "round": round_number + 1})
    rows = summarize(results, min(args.workers))
    table = Table(
        title=f"consumer throughput, applied once with inbox dedupe, {args.aggregates} aggregates, "
        f"median of {args.rounds} round(s) ({os.cpu_count()} CPUs, load "
        f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after)"
    )
    columns = ("handler wait", "mode", "workers", "published", "duplicates skipped")
    for column in (*columns, "out of order (max)", "events/s", "speedup", "rounds", "CPU us/msg"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            f"{r['work_ms']:g} ms",
            r["mode"],
            str(r["workers"]),
            str(r["published"]),
            str(r["skipped"]),
            str(r["inversions_max"]),
            f"{r['rate']:,.0f}",
            f"{r['speedup']:.2f}x",
            " / ".join(f"{rate:,}" for rate in r["rates"]),
            f"{r['worker_cpu_us_per_event']:.0f}",
        )
    Console(width=180).print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "started": started,
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "events": args.events,
        "aggregates": args.aggregates,
        "duplicates": args.duplicates,
        "partitions": args.partitions,
        "rounds": args.rounds,
        # Cases a restart of PostgreSQL or RabbitMQ interrupted (by others on this machine).
        "run_again": run_again,
    }
    output = {"meta": meta, "summary": rows, "runs": results}
    args.output.write_text(json.dumps(output, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
