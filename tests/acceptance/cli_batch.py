"""Many short CLI runs at once: each is mostly interpreter start-up, so running them side by side
keeps suites with dozens of error cases fast."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from tests.acceptance.conftest import run_cli


def run_all(
    runs: Sequence[tuple[Sequence[str], dict[str, str]]], *, timeout: float = 30.0
) -> list[subprocess.CompletedProcess[str]]:
    """``outbox-relay ARGS`` with ENV for each (args, env), four at a time, results in order."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda run: run_cli(*run[0], env=run[1], timeout=timeout), runs))
