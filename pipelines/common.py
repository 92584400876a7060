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
