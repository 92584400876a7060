"""Sized shards and the outcome log (pipelines/shards.py), without Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.shards import (GROUP_STRIDE, MB, ChunkWriter, ShardConfig, read_outcomes, remove_orphans, shard_group,
                             shard_name)


def _rows(n: int, kb: int = 100) -> pa.Table:
    rng = np.random.default_rng(n)  # incompressible, so file bytes follow the rows' bytes
    return pa.table({"x": pa.array([rng.bytes(kb * 1024) for _ in range(n)], pa.binary())})


def _outcome(i: int, clips: int) -> dict:
    return {"_key": f"k{i}", "echo": f"e{i}", "ecg": "", "clips": clips, "clips_without_ecg": 0,
            "stage": "" if clips else "read_echo", "error": "" if clips else "bad", "detail": ""}


def test_chunks_close_at_the_size_and_are_named_by_their_first_input(tmp_path):
    cfg = ShardConfig(shard_mb=1.0, row_group_mb=0.25, inputs_per_task=100)
    writer = ChunkWriter(str(tmp_path), "clips", cfg)
    for i in range(10, 40):  # 30 inputs of 3 rows x 100 KiB; every fifth is quarantined
        bad = i % 5 == 0
        writer.add(i, _outcome(i, 0 if bad else 3), None if bad else _rows(3))
    writer.close_chunk()
    files = sorted((tmp_path / "clips").glob("*.parquet"))
    assert files[0].name == shard_name(10)
    for f in files[:-1]:  # each closes once it passes 1 MiB: less than one input (0.3 MiB) over
        meta = pq.ParquetFile(f).metadata
        size = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
        assert MB <= size < 1.35 * MB and meta.num_row_groups >= 2
    assert sorted(p.name for p in (tmp_path / "outcomes").glob("*")) == [f.name for f in files]
    log = read_outcomes(str(tmp_path)).to_pylist()
    assert [o["index"] for o in log] == list(range(10, 40))
    assert pq.read_table(tmp_path / "clips").num_rows == sum(o["clips"] for o in log)

    # a chunk whose outcome file is missing is unfinished: its data file goes
    (tmp_path / "outcomes" / files[1].name).unlink()
    assert remove_orphans(str(tmp_path), "clips") == 1 and not files[1].exists() and files[0].exists()


def test_shard_names_carry_the_group():
    index = 7 * GROUP_STRIDE + 42
    assert shard_name(index) == "shard-000007-000042.parquet"
    assert shard_group(f"s3://b/out/outcomes/{shard_name(index)}") == 7
