"""bench/scale_bench.py runs end to end (tiny sizes) and reports what it promises: 1, 2 and 3
`outbox-relay serve` processes draining a backlog, a take-over after a SIGKILL, and the pauses of
a rebalance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import Services

BENCH = Path(__file__).resolve().parents[2] / "bench" / "scale_bench.py"
EVENTS = 2000
TAKEOVER_EVENTS = 6000  # enough that the kill comes mid-stream however fast the relays are
PARTITIONS = 64


@pytest.mark.integration
def test_scale_bench_measures_drains_takeover_and_rebalance(
    services: Services, tmp_path: Path
) -> None:
    output = tmp_path / "scale.json"
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            f"--events={EVENTS}",
            "--rounds=1",
            f"--takeover-events={TAKEOVER_EVENTS}",
            "--rebalance-rate=400",
            "--rebalance-seconds=8",
            f"--admin-url={services.postgres_admin_url}",
            f"--broker-url={services.rabbitmq_url}",
            f"--output={output}",
            f"--log-dir={tmp_path / 'logs'}",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(output.read_text())
    assert set(results) == {"meta", "drain", "takeover", "rebalance", "targets"}
    assert results["meta"]["sizes"]["events"] == EVENTS

    # 1. Drain rate: each profile with its raw ceiling and 1, 2 and 3 relays; every event reached
    # the queue exactly once, and with several relays each published a part of it.
    drain = results["drain"]
    assert set(drain["profiles"]) == {"distinct", "1000"}
    for key, profile in drain["profiles"].items():
        assert profile["aggregates"] == (EVENTS if key == "distinct" else 1000)
        (raw,) = profile["raw"]["runs"]
        assert raw["queued"] == EVENTS
        assert raw["window"] == 1000
        assert profile["raw"]["median"]["msg_per_s"] > 0
        assert set(profile["relays"]) == {"1", "2", "3"}
        for count, relays in profile["relays"].items():
            (run,) = relays["runs"]
            assert run["relays"] == int(count)
            assert run["queued"] == EVENTS
            assert run["events_per_s"] > 0
            assert run["relay_cpu_us_per_event"] > 0
            assert run["broker_cpu_percent"] >= 0
            assert run["limited_by"]
            assert set(run["limited_by"]) <= {"broker", "relay_cpu", "machine", "waits"}
            assert set(run["per_relay"]) == {f"scale-{n}" for n in range(1, int(count) + 1)}
            published = [r["published"] for r in run["per_relay"].values()]
            assert sum(published) == EVENTS, run["per_relay"]
            assert all(p > 0 for p in published), run["per_relay"]
            assert relays["median"]["events_per_s"] == run["events_per_s"]
        assert profile["relays"]["1"]["median"]["ratio_vs_one_relay"] == 1.0

    # 2. Take-over: the victim's partitions went to the two survivors, every event arrived, and
    # the longest partition gap after the kill is a positive duration within the run.
    takeover = results["takeover"]
    assert len(takeover["victim_partitions"]) in (21, 22)
    assert takeover["holders_after"] == {"scale-1": 32, "scale-3": 32}
    assert takeover["deliveries"] - takeover["duplicates"] == TAKEOVER_EVENTS
    assert 0 <= takeover["duplicates"] <= 4000  # at most the victim's --batch-size in flight
    assert 0 < takeover["published_at_kill"] < TAKEOVER_EVENTS
    gap = takeover["longest_gap_after_kill"]
    assert 0 < gap["seconds"] < 60
    assert gap["to_t"] > takeover["killed_at_t"]
    assert 0 <= gap["partition"] < PARTITIONS
    assert takeover["leases_moved_after_s"] is not None
    assert 0 <= takeover["leases_moved_after_s"] < 30
    assert any("removed a relay" in line["message"] for line in takeover["relay_log"])

    # 3. Rebalance: the events happened in order, and both pauses were measured.
    rebalance = results["rebalance"]
    assert rebalance["events"] > 0
    assert rebalance["deliveries"] >= rebalance["events"]
    assert (
        rebalance["spawned_at_t"]
        <= rebalance["joined_at_t"]
        <= rebalance["balanced_3_at_t"]
        < rebalance["terminated_at_t"]
        <= rebalance["balanced_2_at_t"]
    )
    assert rebalance["leave_observed_seconds"] > 0
    for what in ("join", "leave"):
        assert rebalance[f"longest_gap_{what}"]["seconds"] > 0
        assert rebalance["gap_counts"][what]["gaps"] > 0
    assert rebalance["lease_timeline"][-1]["holders"] == {"scale-2": 32, "scale-3": 32}

    assert set(results["targets"]) == {
        "drain_distinct_2_relays_vs_1",
        "drain_distinct_3_relays_vs_1",
        "drain_1000_2_relays_vs_1",
        "drain_1000_3_relays_vs_1",
        "takeover_longest_gap_s",
        "rebalance_join_longest_gap_s",
        "rebalance_leave_longest_gap_s",
    }
    assert "Drain rate" in done.stdout
    assert "take-over" in done.stdout
