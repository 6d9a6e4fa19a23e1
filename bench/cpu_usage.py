"""Who used the CPU during a phase: the relay, RabbitMQ, PostgreSQL (from /proc, Linux only).

On a 2-core machine the relay, the broker and the database compete for the same cores, so a
throughput figure means little without knowing who was busy.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_ticks(pid: int) -> tuple[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm is in parentheses and may hold spaces; fields after it are space-separated.
    comm = text[text.index("(") + 1 : text.rindex(")")]
    rest = text[text.rindex(")") + 2 :].split()
    return comm, int(rest[11]) + int(rest[12])  # utime + stime


def _group(comm: str, pid: int, relay_pids: set[int], database: str | None) -> str | None:
    if pid in relay_pids:
        return "relay"
    if comm.startswith("beam"):
        return "rabbitmq"  # the whole broker: other people's traffic included
    if comm.startswith(("postgres", "postmaster")):
        if database is not None and _is_backend_of(pid, database):
            return "postgres_bench"
        return "postgres_other"  # WAL writer, checkpointer, other databases' backends
    if comm == "pgbench":
        return "pgbench"
    return None


def _is_backend_of(pid: int, database: str) -> bool:
    # A backend's title reads "postgres: 15/main: <user> <database> <client> <state>".
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return f" {database} " in title


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all cores since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _snapshot(relay_pids: set[int], database: str | None) -> dict[int, tuple[str, int]]:
    found: dict[int, tuple[str, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        sample = _cpu_ticks(pid)
        if sample is None:
            continue
        group = _group(sample[0], pid, relay_pids, database)
        if group is not None:
            found[pid] = (group, sample[1])
    return found


class CpuMeter:
    """``meter = CpuMeter(relay_pids).start(); ...; meter.stop()`` -> percent of one core per
    group, plus ``machine_busy`` (percent of all cores) and the 1-minute load average.

    A background thread samples /proc twice a second, so processes that exit before ``stop()``
    (pgbench and its backends, the producers' backends, a relay killed on purpose) still count,
    up to their last sample.

    After ``stop()``, ``cpu_seconds`` holds each group's user+sys CPU seconds, ``pid_seconds``
    each relay pid's, and ``wall`` the seconds measured (for CPU time per event).
    """

    def __init__(
        self,
        relay_pids: set[int] | None = None,
        database: str | None = None,
        interval: float = 0.5,
    ) -> None:
        self.relay_pids = set(relay_pids or ())
        self.database = database
        self._interval = interval
        self._start: dict[int, tuple[str, int]] = {}
        self._last: dict[int, tuple[str, int]] = {}
        self._started_at = 0.0
        self._machine = (0, 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cpu_seconds: dict[str, float] = {}
        self.pid_seconds: dict[int, float] = {}
        self.wall = 0.0

    def start(self) -> CpuMeter:
        self._start = _snapshot(self.relay_pids, self.database)
        self._last = dict(self._start)
        self._machine = _machine_ticks()
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._sample, name="bench-cpu", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self._last.update(_snapshot(self.relay_pids, self.database))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._last.update(_snapshot(self.relay_pids, self.database))
        busy, total = _machine_ticks()
        wall = max(time.monotonic() - self._started_at, 1e-9)
        used = dict.fromkeys(
            ("relay", "rabbitmq", "postgres_bench", "postgres_other", "pgbench"), 0.0
        )
        for pid, (group, ticks) in self._last.items():
            before = self._start.get(pid, (group, 0))[1]
            used[group] += (ticks - before) / _TICKS
            if group == "relay":
                self.pid_seconds[pid] = (ticks - before) / _TICKS
        self.cpu_seconds = used
        self.wall = wall
        percent = {group: round(100 * seconds / wall, 1) for group, seconds in used.items()}
        # Everything on the machine (other engineers' tests included), 100 = every core busy.
        spent = max(total - self._machine[1], 1)
        percent["machine_busy"] = round(100 * (busy - self._machine[0]) / spent, 1)
        percent["machine_load1"] = round(os.getloadavg()[0], 2)
        return percent
