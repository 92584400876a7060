"""Batch generation: a manifest of ECGs -> videos plus a Parquet index (Ray Data actor pool).

Each actor loads the generator once (on a GPU when the pool asks for one) and maps manifest rows
through :func:`echopulse.generate.make_generate_fn`; a row that fails (unreadable ECG, too short,
...) becomes an index row with status "error" instead of failing the job. Video names are
deterministic (the row's ``id`` or a hash of its inputs), so a rerun replaces rather than
duplicates.

Manifest: CSV with column ``ecg`` (required) and optional ``id``, ``first_frame``, ``seconds``,
``fps``, ``seed``; relative paths are relative to the manifest's folder.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from echopulse.errors import EchoPulseError
from echopulse.generate import INDEX_COLUMNS

log = logging.getLogger(__name__)

INDEX_SCHEMA = pa.schema([
    ("video_id", pa.string()), ("ecg", pa.string()), ("first_frame", pa.string()),
    ("seconds", pa.float64()), ("fps", pa.float64()), ("seed", pa.int64()), ("video", pa.string()),
    ("frames", pa.int64()), ("status", pa.string()), ("error", pa.string()),
])
assert tuple(INDEX_SCHEMA.names) == INDEX_COLUMNS


class GenerateBatch:
    """Ray Data callable class: one generator per actor, one video per manifest row."""

    def __init__(self, checkpoint: str, videos_dir: str, base_dir: str, suffix: str, panel: bool,
                 defaults: dict[str, Any], use_gpu: bool = False, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(max(1, threads))  # the actor's CPU share, not every core of the node

        from echopulse.generate import EchoGenerator, make_generate_fn

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        model = EchoGenerator.from_checkpoint(checkpoint, device=device)
        self.fn = make_generate_fn(model, videos_dir, base_dir, suffix, panel, defaults)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        keys = list(batch)
        n = len(batch[keys[0]]) if keys else 0
        rows = [self.fn({k: _scalar(batch[k][i]) for k in keys}) for i in range(n)]
        return pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)  # typed, even when a column is all null


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


@dataclass(frozen=True)
class BatchSummary:
    rows: int
    ok: int
    errors: int
    seconds: float
    videos_per_s: float
    index: str
    videos: str


def read_generate_manifest(manifest: str) -> list[dict[str, str]]:
    """The manifest's rows; a clear error when it is missing, unreadable or has no ``ecg`` column."""
    path = Path(manifest)
    if not path.is_file():
        raise EchoPulseError(f"{manifest}: manifest not found")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise EchoPulseError(f"{manifest}: unreadable CSV manifest ({exc})") from None
    if not rows or "ecg" not in rows[0]:
        raise EchoPulseError(f"{manifest}: manifest needs a header with an 'ecg' column and at least one row")
    return rows


def run_generate_batch(manifest: str, checkpoint: str, out: str, fmt: str = "mp4", actors: int = 1,
                       batch_size: int = 4, use_gpu: bool = False, panel: bool = False,
                       cpus_per_actor: int = 1,
                       seconds: float | None = None, fps: float | None = None, seed: int = 0,
                       steps: int | None = None, guidance: float | None = None) -> BatchSummary:
    """Generate one video per manifest row into ``OUT/videos/`` and index them in ``OUT/index/``.

    Args:
        manifest: CSV manifest (see the module docstring).
        checkpoint: generator checkpoint (tokenizer bundled).
        out: local output directory.
        fmt: "mp4", "gif" or "dcm".
        actors: generator actors in the pool.
        batch_size: rows per batch handed to an actor.
        use_gpu: one GPU per actor.
        cpus_per_actor: logical CPUs reserved per actor; also its torch thread count.
        panel: draw the ECG panel under each video.
        seconds, fps, seed, steps, guidance: defaults for rows that leave them out.
    """
    import ray
    from ray.data import ActorPoolStrategy

    from echopulse.models.checkpoint import read_checkpoint_info
    from echopulse.runtime import init_ray
    from echopulse.video_out import check_video_path

    if actors < 1 or cpus_per_actor < 1 or batch_size < 1:
        raise EchoPulseError(f"--actors, --cpus-per-actor and --batch-size must be >= 1, got "
                             f"{actors}, {cpus_per_actor}, {batch_size}")
    suffix = "." + fmt.lstrip(".").lower()
    check_video_path("video" + suffix)
    rows = read_generate_manifest(manifest)
    if os.path.isdir(checkpoint):
        try:
            read_checkpoint_info(checkpoint)
        except ValueError as exc:
            raise EchoPulseError(f"{checkpoint}: {exc}") from None
    elif "://" not in checkpoint:
        raise EchoPulseError(f"{checkpoint}: no such checkpoint directory")
    base_dir = str(Path(manifest).resolve().parent)
    out_dir = Path(out).resolve()
    videos_dir = out_dir / "videos"
    videos_dir.mkdir(parents=True, exist_ok=True)
    columns = ("id", "ecg", "first_frame", "seconds", "fps", "seed")
    table = [{c: (r.get(c) or "") for c in columns} for r in rows]
    defaults = {"seconds": seconds, "fps": fps, "seed": seed, "steps": steps, "guidance": guidance}

    init_ray()
    started = time.time()
    ds = ray.data.from_items(table).map_batches(
        GenerateBatch,
        fn_constructor_kwargs={"checkpoint": checkpoint, "videos_dir": str(videos_dir),
                               "base_dir": base_dir, "suffix": suffix, "panel": panel,
                               "defaults": defaults, "use_gpu": use_gpu, "threads": cpus_per_actor},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
    )
    index_dir = out_dir / "index"
    if index_dir.exists():
        for part in index_dir.glob("*.parquet"):
            part.unlink()
    ds.write_parquet(str(index_dir))
    elapsed = time.time() - started
    import pyarrow.dataset as pads

    status = pads.dataset(str(index_dir), format="parquet").to_table(columns=["status"])
    statuses = status.column("status").to_pylist()
    ok = sum(s == "ok" for s in statuses)
    log.info("generated %d/%d videos in %.1f s", ok, len(statuses), elapsed)
    return BatchSummary(rows=len(statuses), ok=ok, errors=len(statuses) - ok,
                        seconds=round(elapsed, 3), videos_per_s=round(ok / elapsed, 4) if elapsed else 0.0,
                        index=str(index_dir), videos=str(videos_dir))
