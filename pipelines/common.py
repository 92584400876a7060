"""Shared pieces of the pipelines: reading datasets with Ray Data.

(``dataset.json`` and the quarantine table are written and read by :mod:`echopulse.schema`.)
"""

from __future__ import annotations

from echopulse import storage


def read_parquet_dir(uri: str):
    """A Ray Dataset over the Parquet files under ``uri``."""
    import ray

    fs, path = storage.arrow_filesystem(uri)
    return ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"])


def match_torch_threads_to_actor() -> int:
    """Set torch's CPU threads to the CPUs this Ray actor reserved (at least 1), so that N actors
    share a node's cores instead of each spreading over all of them; the thread count."""
    import ray
    import torch

    threads = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    torch.set_num_threads(threads)
    return threads
