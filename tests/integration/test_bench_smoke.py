"""The benchmark script runs end to end (tiny sizes) and reports every figure it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import Services

BENCH = Path(__file__).resolve().parents[2] / "bench" / "relay_bench.py"
EVENTS = 2000
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
        "targets",
    }
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
