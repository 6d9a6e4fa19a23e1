"""The benchmark script runs end to end (tiny sizes) and reports every figure it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.services import Services

BENCH = Path(__file__).resolve().parents[2] / "bench" / "relay_bench.py"
EVENTS = 2000
DRAIN_EVENTS = 1000
MAY_BE_ZERO = {
    "cpu_percent",
    # The per-step time breakdown: in a short run a step (stop_listening, say) may never happen.
    "relay_steps",
    "pending_at_end",
    "nacked",
    "returned",
    "catch_up_seconds",
    "notifications",
    "notifying_share",
    # Drain matrix verdicts: the broker's CPU difference to raw's may be 0 or negative.
    "verdicts",
}


def _positive_numbers(value: object, where: str = "") -> list[str]:
    """Paths of every number in ``value`` that is not > 0, except those that may be 0 or less
    (CPU shares, counts of failures, backlogs, overheads)."""
    bad: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in MAY_BE_ZERO and not key.startswith("overhead_pct"):
                bad += _positive_numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            bad += _positive_numbers(item, f"{where}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and not value > 0:
        bad.append(f"{where}={value}")
    return bad


@pytest.mark.integration
def test_bench_quick_mode_reports_every_figure(services: Services, tmp_path: Path) -> None:
    # Given tiny sizes, when the bench runs in quick mode against the real services
    output = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--quick",
            f"--events={EVENTS}",
            "--seconds=1",
            "--pgbench-seconds=1",
            "--busy-backlog=3000",
            "--rate=200",
            f"--drain-events={DRAIN_EVENTS}",
            "--drain-profiles=a,d",
            "--rounds=1",
            # The stronger ceiling's path (the plain one runs in the other benches' smoke tests).
            "--raw-batched-writes",
            f"--admin-url={services.postgres_admin_url}",
            f"--broker-url={services.rabbitmq_url}",
            f"--output={output}",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    # Then the JSON holds every measurement, with positive figures
    results = json.loads(output.read_text())
    assert set(results) >= {
        "meta",
        "raw",
        "relay_backlog",
        "relay_steady",
        "latency",
        "producer",
        "drain",
        "targets",
    }
    assert results["meta"]["raw_batched_writes"] is True
    assert [run["aggregates"] for run in results["relay_backlog"]] == [EVENTS, 200]
    assert set(results["latency"]) == {"notify", "poll"}
    assert set(results["producer"]) >= {
        "plain",
        "outbox",
        "outbox_notify_every_tx",
        "outbox_relay_live",
        "plain_relay_busy",
        "outbox_relay_busy",
    }
    assert set(results["targets"]) == {
        "relay_throughput_ratio",
        "p99_commit_to_confirm_ms_notify",
        "producer_overhead_pct",
        "drain_matrix",
    }
    bad = _positive_numbers({k: v for k, v in results.items() if k not in {"meta", "targets"}})
    assert not bad, f"non-positive figures: {bad}"

    # And every event measured really travelled: each backlog (and the raw run) reached the queue
    # exactly once, and every paced event was confirmed and consumed.
    assert [run["queued"] for run in results["raw"]] == [EVENTS, EVENTS]
    assert [run["queued"] for run in results["relay_backlog"]] == [EVENTS, EVENTS]
    for run in results["latency"].values():
        assert run["events"] > 0
        assert run["confirmed"] == run["received"] == run["events"]
    # The drain matrix: each profile held against its raw window, in every mode, one relay run
    # per raw run, every event drained and queued once, with the figures the verdicts use.
    drain = results["drain"]
    assert (drain["events"], drain["rounds"], drain["modes"]) == (
        DRAIN_EVENTS,
        1,
        ["notify", "poll", "cdc"],
    )
    profiles = drain["profiles"]
    assert {key: (p["aggregates"], p["raw_window"]) for key, p in profiles.items()} == {
        "a": (DRAIN_EVENTS, 1000),
        "d": (200, 200),
    }
    for profile in profiles.values():
        assert len(profile["raw"]["runs"]) == 3  # one right before each relay run
        assert all(run["queued"] == DRAIN_EVENTS for run in profile["raw"]["runs"])
        assert profile["raw"]["median"]["publisher_cpu_us_per_msg"] > 0
        for mode, relay in profile["relay"].items():
            (run,) = relay["runs"]
            assert run["mode"] == mode
            assert run["queued"] == DRAIN_EVENTS
            assert run["relay_cpu_us_per_event"] > 0
            assert run["ratio_vs_raw_median"] == round(
                run["events_per_s"] / profile["raw"]["median"]["msg_per_s"], 3
            )
            expected = {"broker_cpu", "relay_cpu_us_per_event"}
            if mode != "poll":
                expected.add("ratio")
            assert set(relay["verdicts"]) == expected
    # CDC runs leave no replication slot behind.
    with psycopg.connect(services.postgres_admin_url, autocommit=True) as conn:
        left = conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE slot_name = %s",
            (results["meta"]["database"],),
        ).fetchall()
    assert left == []
    assert "Drain matrix" in done.stdout

    # The worst-case scenario really made every producer transaction NOTIFY.
    assert results["producer"]["outbox_notify_every_tx"]["notifying_share"] > 0.8
    assert "measurement" in done.stdout  # the table was printed


@pytest.mark.integration
def test_memory_bench_reports_idle_and_peak_rss(services: Services, tmp_path: Path) -> None:
    output = tmp_path / "memory.json"
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH.with_name("memory_bench.py")),
            "--events=500",
            "--batch-sizes",
            "100",
            "--payloads",
            "300",
            f"--admin-url={services.postgres_admin_url}",
            f"--broker-url={services.rabbitmq_url}",
            f"--output={output}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (run,) = json.loads(output.read_text())
    assert run["batch_size"] == 100
    assert run["events"] == 500
    # A Python process with psycopg, pika and the relay loaded is tens of MiB.
    assert 10 < run["idle_rss_mib"] <= run["peak_rss_mib"] < 1024
    assert run["seconds"] > 0


@pytest.mark.integration
def test_brokers_bench_pairs_message_formats_on_rabbitmq(
    services: Services, tmp_path: Path
) -> None:
    # Given two rounds of native and cloudevents-binary on RabbitMQ, tiny backlogs, each run
    # beside a raw publisher sending the relay's messages in that format
    output = tmp_path / "brokers.json"
    env = {
        **os.environ,
        "OUTBOX_RELAY_TEST_DATABASE_URL": services.postgres_admin_url,
        "OUTBOX_RELAY_TEST_BROKER_URL": services.rabbitmq_url,
    }
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH.with_name("brokers_bench.py")),
            "--events=3000",
            "--batch-size=100",  # several batches: the clock starts after the first settles
            "--brokers=rabbitmq",
            "--message-formats=native,cloudevents-binary",
            "--rounds=2",
            "--raw-ceiling",
            f"--output={output}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )

    # Then every run is recorded, relay and raw, and the binary format's paired ratios to
    # native, and each format's ratio to its own raw ceiling
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(output.read_text())
    runs = {(r["broker"], r["message_format"], r["round"]) for r in results["results"]}
    assert runs == {
        (b, f, n)
        for b in ("rabbitmq", "rabbitmq raw")
        for f in ("native", "cloudevents-binary")
        for n in (1, 2)
    }
    summary = {(s["broker"], s["message_format"]): s for s in results["summary"]}
    for broker in ("rabbitmq", "rabbitmq raw"):
        binary = summary[broker, "cloudevents-binary"]
        assert len(binary["ratios_to_native"]) == 2
        assert binary["median_ratio_to_native"] > 0
    for fmt in ("native", "cloudevents-binary"):
        assert summary["rabbitmq", fmt]["median_ratio_to_raw_ceiling"] > 0
    assert "vs native" in done.stdout
    assert "vs raw" in done.stdout


def _drain_results(relay_runs: dict[str, tuple[float, float]]) -> dict[str, object]:
    """A saved drain matrix of one profile: a raw publisher at 10,000 msg/s with the broker at
    90% of a core, and per mode one relay run at (events/s, broker CPU %)."""
    raw = {"msg_per_s": 10_000.0, "cpu_us_per_msg": 20.0, "cpu_percent": {"rabbitmq": 90.0}}
    return {
        "meta": {"uptime_before": "-", "uptime_after": "-", "seconds": 1.0},
        "drain": {
            "events": 100_000,
            "rounds": 1,
            "batch_size": 4000,
            "profiles": {
                "c": {
                    "label": "1,000 aggregates",
                    "raw_window": 1000,
                    "target_ratio": 0.85,
                    "raw": {"runs": [raw]},
                    "relay": {
                        mode: {
                            "runs": [
                                {
                                    "events_per_s": rate,
                                    "raw_just_before": 10_000.0,
                                    "relay_cpu_us_per_event": 20.0,
                                    "broker_cpu_percent": broker,
                                }
                            ]
                        }
                        for mode, (rate, broker) in relay_runs.items()
                    },
                }
            },
        },
    }


def test_summarise_recomputes_the_verdicts_of_a_saved_run(tmp_path: Path) -> None:
    # Given a saved run where the broker works 15 points more than under the raw publisher:
    # in notify mode because the relay drains 20% faster (at raw's rate: 87.5%, within 10
    # points), in cdc mode at raw's rate (harder per message), in poll mode 15 points less
    saved = tmp_path / "saved.json"
    saved.write_text(
        json.dumps(
            _drain_results({"notify": (12_000, 105), "cdc": (10_000, 105), "poll": (9_000, 75)})
        )
    )
    output = tmp_path / "summarised.json"

    # When the bench recomputes it
    done = subprocess.run(
        [sys.executable, str(BENCH), "--summarise", str(saved), "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    # Then only a broker left idler or made to work harder per message misses
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(output.read_text())
    relay = results["drain"]["profiles"]["c"]["relay"]
    broker = {mode: entry["verdicts"]["broker_cpu"] for mode, entry in relay.items()}
    assert {mode: verdict["met"] for mode, verdict in broker.items()} == {
        "notify": True,
        "cdc": False,
        "poll": False,
    }
    assert broker["notify"]["value_at_raw_rate"] == -2.5
    assert relay["notify"]["median"]["ratio_vs_raw_median"] == 1.2
    assert results["targets"]["drain_matrix"]["value"] == "6 of 8"
    assert "broker MISSED" in done.stdout
