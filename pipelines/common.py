"""Shared pieces of the pipelines: the dataset description file and reading datasets."""

from __future__ import annotations

import json
import time
from typing import Any

from echopulse import __version__, storage
from echopulse.errors import EchoPulseError
from echopulse.schema import DATASET_INFO_FILE


def write_dataset_info(out: str, schema: str, config: dict[str, Any], counts: dict[str, int],
                       **extra: Any) -> dict[str, Any]:
    """Write ``OUT/dataset.json``: what this dataset is and what made it."""
    info = {
        "schema": schema,
        "echopulse_version": __version__,
        "created_unix": int(time.time()),
        "config": config,
        "counts": counts,
        **extra,
    }
    storage.write_text(storage.join(out, DATASET_INFO_FILE), json.dumps(info, indent=2))
    return info


def read_dataset_info(uri: str, expected_schema: str) -> dict[str, Any]:
    """Read and check ``URI/dataset.json``; a clear error when absent or of another schema."""
    path = storage.join(uri, DATASET_INFO_FILE)
    if not storage.exists(path):
        raise EchoPulseError(f"{uri}: not a {expected_schema} dataset (no {DATASET_INFO_FILE})")
    info = json.loads(storage.read_text(path))
    if info.get("schema") != expected_schema:
        raise EchoPulseError(
            f"{uri}: dataset schema is {info.get('schema')!r}, expected {expected_schema!r}"
        )
    return info


def read_parquet_dir(uri: str):
    """A Ray Dataset over the Parquet files under ``uri``."""
    import ray

    fs, path = storage.arrow_filesystem(uri)
    return ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"])
