"""Parquet contracts between stages (``clips/v1``, ``tokens/v1``, quarantine) and deterministic ids.

Every dataset directory written by a stage holds Parquet parts plus ``dataset.json``
(:func:`write_dataset_info`, :func:`read_dataset_info`): the schema name, the config and code
version that made it, and counts. Every stage that sets inputs aside writes the same quarantine
table (:data:`QUARANTINE_COLUMNS`, :func:`write_quarantine`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from echopulse import __version__, storage
from echopulse.errors import EchoPulseError

CLIPS_SCHEMA = "clips/v1"
TOKENS_SCHEMA = "tokens/v1"
DATASET_INFO_FILE = "dataset.json"

# uuid5 namespace for clip ids: reruns over the same source and span give the same id
_CLIP_NAMESPACE = uuid.UUID("6f1f4a1e-2c55-5b8e-9d1e-ec40a05e0001")
SALT_ENV = "ECHOPULSE_STUDY_SALT"
_DEFAULT_SALT = "echopulse-default-salt"  # documented: set ECHOPULSE_STUDY_SALT for real archives

SPLITS = ("train", "val", "test")


def clip_schema(frames: int, size: int, ecg_samples: int) -> pa.Schema:
    """The ``clips/v1`` Arrow schema for a given clip geometry."""
    return pa.schema(
        [
            ("clip_id", pa.string()),
            ("study_key", pa.string()),
            ("split", pa.string()),
            ("view", pa.string()),
            ("frames", pa.fixed_shape_tensor(pa.uint8(), [frames, size, size])),
            ("fps", pa.float32()),
            ("ecg", pa.fixed_shape_tensor(pa.float32(), [12, ecg_samples])),
            ("ecg_leads", pa.list_(pa.bool_())),
            ("ecg_source", pa.string()),
            ("ecg_sync", pa.bool_()),
            ("heart_rate_bpm", pa.float32()),
            ("r_peaks", pa.list_(pa.int32())),
            ("t_start_s", pa.float32()),
            ("t_end_s", pa.float32()),
            ("ef", pa.float32()),
            ("source_uri", pa.string()),
            ("provenance", pa.string()),
        ],
        metadata={b"schema": CLIPS_SCHEMA.encode()},
    )


CLIP_COLUMNS = tuple(clip_schema(1, 1, 1).names)
# added to clips/v1 after its first release: readers accept datasets without them (see README,
# "Synchronized or not"); ingest always writes them
OPTIONAL_CLIP_COLUMNS = ("ecg_sync",)
REQUIRED_CLIP_COLUMNS = tuple(c for c in CLIP_COLUMNS if c not in OPTIONAL_CLIP_COLUMNS)
TOKEN_COLUMNS = ("clip_id", "tokens", "token_grid", "tokenizer_id", "ecg", "view", "ef", "split")
# one quarantine table for every stage: what was set aside (the input's URI and, once known, the
# clip), in which stage, why (one line) and the longer detail
QUARANTINE_COLUMNS = ("source_uri", "clip_id", "stage", "error", "detail")
QUARANTINE_SCHEMA = pa.schema([(c, pa.string()) for c in QUARANTINE_COLUMNS])
QUARANTINE_FILE = "quarantine/quarantine.parquet"


class QuarantineSink:
    """The one writer of ``OUT/quarantine/quarantine.parquet``: rows go out batch by batch, never
    all in memory (an archive-scale ingest can set aside millions); missing columns are empty.
    Use as a context manager, or call :meth:`close`."""

    def __init__(self, out: str, batch: int = 8192) -> None:
        self.path = storage.join(out, QUARANTINE_FILE)
        storage.makedirs(storage.parent(self.path))
        fs, path = storage.filesystem(self.path)
        self._file = fs.open(path, "wb")
        self._writer = pq.ParquetWriter(self._file, QUARANTINE_SCHEMA)
        self._rows: list[dict[str, str]] = []
        self._batch = batch

    def add(self, row: dict[str, Any]) -> None:
        self._rows.append({c: str(row.get(c) or "") for c in QUARANTINE_COLUMNS})
        if len(self._rows) >= self._batch:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=QUARANTINE_SCHEMA))
            self._rows = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._file.close()

    def __enter__(self) -> "QuarantineSink":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_quarantine(out: str, rows: list[dict[str, Any]]) -> str:
    """Write ``OUT/quarantine/quarantine.parquet`` from ``rows`` (possibly none) with
    :class:`QuarantineSink`.

    Returns:
        The path written.
    """
    with QuarantineSink(out) as sink:
        for row in rows:
            sink.add(row)
    return sink.path


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


def clip_id(source_uri: str, t_start_s: float, t_end_s: float) -> str:
    """Deterministic clip id: uuid5 over the source and the span (ms resolution)."""
    key = f"{source_uri}|{round(t_start_s * 1000)}|{round(t_end_s * 1000)}"
    return str(uuid.uuid5(_CLIP_NAMESPACE, key))


def study_key(study_uid: str, salt: str | None = None) -> str:
    """Salted hash of a study identifier; the raw identifier never leaves ingestion.

    The salt comes from ``salt``, else the ``ECHOPULSE_STUDY_SALT`` environment variable, else a
    fixed default (fine for the phantom, not for real archives).
    """
    salt = salt if salt is not None else os.environ.get(SALT_ENV, _DEFAULT_SALT)
    return hashlib.sha256(f"{salt}|{study_uid}".encode()).hexdigest()[:24]


def split_for(key: str, val_fraction: float = 0.2, test_fraction: float = 0.0) -> str:
    """Assign a split from a study key, stable across reruns."""
    u = int(key[:8], 16) / 0xFFFFFFFF
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def missing_columns(names: list[str] | tuple[str, ...], expected: tuple[str, ...]) -> list[str]:
    """Columns of ``expected`` absent from ``names`` (for clear wrong-schema errors)."""
    return [c for c in expected if c not in names]


def tensor_column_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-shape tensor column as one stacked numpy array (n, *shape)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.to_numpy_ndarray()
