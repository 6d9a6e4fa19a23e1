"""The soak bench runs end to end (a few seconds per mode, a tiny rate) and reports every figure
of every sample."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import Services

BENCH = Path(__file__).resolve().parents[2] / "bench" / "outbox_soak.py"


@pytest.mark.integration
def test_soak_bench_samples_both_modes_and_records_the_degradation(
    services: Services, tmp_path: Path
) -> None:
    output = tmp_path / "soak.json"
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--rate=100",
            "--minutes=0.1",
            "--sample-seconds=2",
            "--connections=2",
            "--aggregates=50",
            f"--admin-url={services.postgres_admin_url}",
            f"--broker-url={services.rabbitmq_url}",
            f"--output={output}",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    results = json.loads(output.read_text())
    assert [run["mode"] for run in results["runs"]] == ["delete", "keep"]
    for run in results["runs"]:
        samples = run["samples"]
        assert len(samples) >= 3
        for sample in samples:
            assert sample["producer_tx_per_s"] > 0
            assert sample["confirmed"] > 0
            assert 0 < sample["commit_to_confirm_p50_ms"] <= sample["commit_to_confirm_p99_ms"]
            assert sample["total_bytes"] >= sample["table_bytes"] > 0
            assert sample["index_bytes"] > 0
            assert sample["dead_tuples"] >= 0
            assert sample["autovacuum_count"] >= 0
        verdict = run["degradation"]
        assert set(verdict["last_vs_first"]) >= {"commit_to_confirm_p99_ms", "total_bytes"}
        assert set(verdict["last_vs_first_5min_medians"]) == {
            "commit_to_confirm_p99_ms",
            "producer_tx_per_s",
            "total_bytes",
        }
        assert isinstance(verdict["p99_within_1_5x"], bool)
        for sample in samples:
            assert sample["producer_lock_wait_max_ms"] >= 0
            assert sample["producer_ordering_lock_wait_max_ms"] >= 0
        assert verdict["longest_producer_lock_wait_ms"] >= 0
    # Kept rows go to partitions of outbox_sent (delete mode keeps none).
    delete, keep = results["runs"]
    assert delete["samples"][-1]["kept_bytes"] == 0
    assert keep["samples"][-1]["kept_bytes"] > 0
    assert keep["samples"][-1]["kept_partitions"] >= 2  # made ahead of the sending time
    assert "--on-sent keep" in done.stdout
    assert "p99 ms" in done.stdout
