"""bench/replay_bench.py runs end to end (tiny sizes) and reports what it promises: kept events
sent by a real relay, replayed by time window and by aggregate to a second exchange complete and
in order, and a replay interrupted by SIGINT and SIGKILL resumed within the in-flight bound."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import Services

BENCH = Path(__file__).resolve().parents[2] / "bench" / "replay_bench.py"
EVENTS = 600
AGGREGATES = 20
# Smaller than the selection, so that a SIGINT leaves something to resume.
BATCH = 100


@pytest.mark.integration
def test_replay_bench_replays_complete_in_order_and_resumes_within_the_bound(
    services: Services, tmp_path: Path
) -> None:
    output = tmp_path / "replay.json"
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            f"--events={EVENTS}",
            f"--aggregates={AGGREGATES}",
            "--replay-aggregates=5",
            f"--batch-size={BATCH}",
            f"--admin-url={services.postgres_admin_url}",
            f"--broker-url={services.rabbitmq_url}",
            f"--output={output}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    results = json.loads(output.read_text())
    assert done.returncode == 0, (results.get("verdicts"), done.stderr[-4000:])
    assert all(results["verdicts"].values()), results["verdicts"]

    assert results["fill"]["kept"] == EVENTS
    assert results["meta"]["in_flight_bound"] == BATCH + BATCH // 2
    window, aggregate = results["window"], results["aggregate"]
    assert window["check"]["expected"] == EVENTS * 3 // 5  # the middle 60 % by creation time
    assert aggregate["check"]["expected"] == 5 * EVENTS // AGGREGATES
    for entry in (window, aggregate):
        assert entry["check"]["received"] == entry["check"]["expected"]
        # Tiny replays may end within the summary's tenth of a second: no rate then.
        replay = entry["replay"]
        assert replay["under_resolution"] or replay["events_per_s"] > 0
        assert replay["replayed"] == entry["check"]["expected"]
        assert entry["raw"]["msg_per_s"] > 0
    sigint, sigkill = results["interrupt"]
    assert sigint["first"]["exit_code"] == 130
    assert sigint["check"]["duplicates"] == 0
    assert sigkill["first"]["exit_code"] == -9
    assert sigkill["check"]["duplicates"] <= BATCH + BATCH // 2
    for entry in (sigint, sigkill):
        assert 0 < entry["first"]["received_at_signal"] < EVENTS
        assert entry["check"]["distinct"] == EVENTS
    assert "time window" in done.stdout
    assert "SIGKILL + resume" in done.stdout
