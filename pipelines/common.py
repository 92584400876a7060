"""Shared pieces of the pipelines: reading datasets with Ray Data, and a few columns without it.

(``dataset.json`` and the quarantine table are written and read by :mod:`echopulse.schema`.)
"""

from __future__ import annotations

import os
from typing import Any

from echopulse import storage


def ray_remote_args(*uris: str | None) -> dict[str, Any]:
    """Ray task options every stage of a run needs: the AWS settings (endpoint, region; no keys)
    when it touches S3; the keys go to the tasks as :func:`worker_credentials`."""
    env = storage.aws_settings()
    if env and any(storage.is_remote(u) for u in uris if u):
        return {"runtime_env": {"env_vars": env}}
    return {}


def worker_credentials(*uris: str | None) -> storage.Credentials | None:
    """This process's AWS keys for the tasks of a run that touches S3 (never printed by Ray)."""
    if any(storage.is_remote(u) for u in uris if u):
        return storage.Credentials.from_env()
    return None


def machine_cores(cpus: float) -> float:
    """The cores behind a local cluster of ``cpus`` logical CPUs: fewer where the cluster claims more
    CPUs than this machine has (:func:`echopulse.runtime.init_ray` asks for at least 4).

    Decode tasks and encoders are sized by these: on 2 cores, a local cluster of 4 CPUs had sized
    the one pass's encoder for 2 torch threads beside 2 decoders, and torch's threads, short of a
    core each, spent 20 s encoding what 1 thread encodes in 4.6 s (the run: 29-31 s instead of
    17.5-22 s at 1,000 inputs; BENCHMARKS stop 33).
    """
    try:
        machine = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity on this platform
        machine = os.cpu_count() or 1
    return min(cpus, float(machine))


def read_parquet_dir(uri: str):
    """A Ray Dataset over the Parquet files under ``uri``."""
    import ray

    fs, path = storage.arrow_filesystem(uri)
    return ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"])


def parquet_dataset(uri: str):
    """The Parquet files under ``uri`` as a pyarrow dataset, read by this process (no Ray Data
    execution), or ``None`` when there are none.

    For the small per-row columns a job counts before it starts (split, ECG flags): Parquet reads
    only the columns asked for, so this costs milliseconds where a Ray Data pass costs seconds of
    start-up.
    """
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    fs, path = storage.arrow_filesystem(uri)
    fs = fs or pafs.LocalFileSystem()
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = sorted(f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(".parquet"))
    return pads.dataset(files, format="parquet", filesystem=fs) if files else None


def read_columns(uri: str, columns: list[str]):
    """Record batches of ``columns`` (those the files have) of :func:`parquet_dataset`."""
    dataset = parquet_dataset(uri)
    if dataset is not None:
        yield from dataset.to_batches(columns=[c for c in columns if c in dataset.schema.names])


def match_torch_threads_to_actor() -> int:
    """Set torch's CPU threads to the CPUs this Ray actor reserved (at least 1), so that N actors
    share a node's cores instead of each spreading over all of them; the thread count."""
    import ray
    import torch

    threads = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    torch.set_num_threads(threads)
    return threads
