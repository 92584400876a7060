"""The manifest read as a Ray dataset: a million rows are planned without the driver holding them,
and repeated rows are counted once per input (pipelines/plan.py)."""

from __future__ import annotations

import threading

import psutil
import pytest

from pipelines.plan import PlanCounts, plan_counts, plan_dataset
from pipelines.shards import ShardConfig

pytestmark = pytest.mark.integration

ROWS = 1_000_000


class PeakRSS:
    """The driver's peak resident memory while the block runs (sampled every 50 ms)."""

    def __init__(self) -> None:
        self.proc, self.peak = psutil.Process(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(0.05)

    def __enter__(self):
        self.start = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_a_million_row_manifest_is_planned_without_the_driver_holding_its_rows(tmp_path, ray_session):
    # every tenth row repeats the row before it (a duplicate); the files need not exist to plan
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w") as f:
        f.write("echo,ecg,view\n")
        for i in range(ROWS):
            j = i - 1 if i % 10 == 9 else i
            f.write(f"echo/study_{j:07d}.dcm,ecg/study_{j:07d}.hea,A4C\n")
    unique = ROWS - ROWS // 10
    counts = PlanCounts()
    with PeakRSS() as rss:
        plan = plan_dataset(str(manifest), str(tmp_path / "out"), ShardConfig(inputs_per_task=50_000), False)
        for row in plan.map(plan_counts).iter_rows():  # what the tasks send the driver
            counts.add(row)
    assert (counts.inputs, counts.duplicates, counts.done) == (unique, ROWS - unique, 0)
    # the rows as driver dicts (the old plan) take ~450 MiB; the plan's driver grows by far less
    grown = (rss.peak - rss.start) / 2**20
    assert grown < 150, f"driver grew {grown:.0f} MiB planning {ROWS} rows"
