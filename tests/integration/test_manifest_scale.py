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


def test_each_group_reaches_the_next_stage_as_its_own_block(tmp_path, ray_session):
    """A hash partition often holds several groups; a decode task must still get one group, so that
    its output (the group's clip chunks) does not grow with the run (bench/scale.py's object store)."""
    manifest = tmp_path / "manifest.csv"
    rows = [f"echo/s_{i:03d}.dcm,ecg/s_{i:03d}.hea,A4C" for i in range(40)]
    manifest.write_text("echo,ecg,view\n" + "\n".join(rows) + "\n")
    plan = plan_dataset(str(manifest), str(tmp_path / "out"), ShardConfig(inputs_per_task=4), False)

    def block_size(batch):  # the next stage as decoding runs it: a 1-CPU task over whole blocks
        return {"plan_rows": [len(batch["group"])], "inputs": [int(sum(batch["inputs"]))]}

    blocks = list(plan.map_batches(block_size, batch_size=None, num_cpus=1).iter_rows())
    assert sum(b["inputs"] for b in blocks) == 40
    assert [b["plan_rows"] for b in blocks] == [1] * 10  # ten groups of four, one per block
