"""The longest enqueue while ``alembic upgrade head`` runs on a populated outbox (a test and bench/upgrade.py).

An outbox at revision 0001 (the first release's) holding ROWS pending rows; producer processes
spill steadily into it (Redis is down: a dead port); the deploy's upgrade runs in the middle.
Every enqueue's latency is measured by the producers themselves.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from checks import Producers
from helpers import ROOT
from releases import env_for, populated_first_release_outbox
from servers import free_port


@dataclass
class UpgradeUnderLoad:
    rows: int
    upgrade_seconds: float
    longest_enqueue: float  # over every producer's every enqueue, before, during and after the upgrade
    enqueued: dict[str, int]


def upgrade_under_load(
    url: str, rows: int, workdir: Path, names: list[str], trees: dict[str, Path] | None = None, upgrade: bool = True
) -> UpgradeUnderLoad:
    """Producers spill at a steady pace while the upgrade runs (or, ``upgrade=False``, for as long, as a baseline)."""
    populated_first_release_outbox(url, rows)
    workdir.mkdir(parents=True, exist_ok=True)
    producers = Producers(workdir, url, free_port(), names, pace=0.005, trees=trees)
    try:
        producers.wait(spilled=50)
        started = time.perf_counter()
        if upgrade:
            done = subprocess.run(
                [sys.executable, "-m", "alembic", "upgrade", "head"],
                cwd=ROOT,
                env=env_for(None, SPILLOVER_DATABASE_URL=url),
                capture_output=True,
                text=True,
                timeout=1800,
            )
            assert done.returncode == 0, done.stderr[-3000:]
        else:
            time.sleep(2.0)
        took = time.perf_counter() - started
        producers.wait(spilled=50)  # and on, after it
    except BaseException:
        for proc in producers.procs:  # a bench run has no fixture to end them
            proc.kill()
        raise
    enqueued, reports = producers.finish()
    return UpgradeUnderLoad(rows, took, max(report["max"] for report in reports), enqueued)
