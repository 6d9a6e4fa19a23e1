"""bench/consumer_bench.py runs end to end (tiny sizes) and reports what it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.consumer_harness import require_consistent_hash
from tests.services import Services

BENCH = Path(__file__).resolve().parents[2] / "bench" / "consumer_bench.py"


@pytest.mark.integration
def test_consumer_bench_measures_both_modes_and_the_ordered_one_keeps_order(
    services: Services, tmp_path: Path
) -> None:
    require_consistent_hash(services.rabbitmq_url)
    output = tmp_path / "consumer.json"
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--events=400",
            "--aggregates=20",
            "--workers",
            "1",
            "2",
            "--work-ms",
            "0",
            "--partition-queues=4",
            "--rounds=1",
            f"--output={output}",
        ],
        env={
            **os.environ,
            "OUTBOX_RELAY_BENCH_DATABASE_URL": services.postgres_admin_url,
            "OUTBOX_RELAY_BENCH_BROKER_URL": services.rabbitmq_url,
        },
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(output.read_text())
    runs = results["runs"]
    assert [(r["mode"], r["workers"]) for r in runs] == [
        ("unordered", 1),
        ("unordered", 2),
        ("ordered", 1),
        ("ordered", 2),
    ]
    for run in runs:
        assert run["applied"] == 400
        assert run["published"] > run["applied"]  # duplicates were published, and skipped
        assert run["rate"] > 0
        assert run["worker_cpu_us_per_event"] > 0
    assert all(r["inversions"] == 0 for r in runs if r["mode"] == "ordered")
    summary = {(r["mode"], r["workers"]): r for r in results["summary"]}
    assert summary["ordered", 1]["speedup"] == 1.0
    assert summary["ordered", 2]["rates"] == [round(summary["ordered", 2]["rate"])]
    assert "events/s" in done.stdout
