"""Ingest: a manifest of DICOM echo + ECG pairs -> ``clips/v1`` Parquet (Ray Data).

Each input (manifest row) is one Ray Data row. A task runs the plain stage function from
``echopulse.ingest`` on it and writes that input's clips to its own Parquet part, named by a hash
of the input, so reruns replace rather than duplicate and ``--resume`` can skip finished inputs.
The dataset Ray materializes is the small per-input outcome table, which gives exact accounting:
every input ends as clips or as a quarantine row, never dropped.

Layout of OUT::

    clips/part-<input>.parquet   clips/v1 rows
    quarantine/quarantine.parquet  echo, ecg, stage, error, detail
    outcomes/<input>.json        per-input outcome (for --resume)
    summary.json, dataset.json
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from echopulse import storage
from echopulse.config import ClipConfig, to_dict
from echopulse.errors import ConfigError, EchoPulseError
from echopulse.schema import CLIPS_SCHEMA, QUARANTINE_SCHEMA, clip_schema
from pipelines.common import write_dataset_info

log = logging.getLogger(__name__)

REQUIRED_MANIFEST_COLUMNS = ("echo", "ecg")


@dataclass(frozen=True)
class IngestSummary:
    inputs: int
    inputs_with_clips: int
    quarantined: int
    clips: int
    out: str

    def as_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "inputs_with_clips": self.inputs_with_clips,
                "quarantined": self.quarantined, "clips": self.clips}


def read_manifest(manifest: str) -> list[dict[str, str]]:
    """Rows of a manifest CSV as dicts; a clear error for a missing or malformed file."""
    if not storage.exists(manifest):
        raise EchoPulseError(f"{manifest}: manifest not found")
    try:
        text = storage.read_text(manifest)
        rows = list(csv.DictReader(io.StringIO(text)))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise EchoPulseError(f"{manifest}: not a readable CSV manifest ({exc})") from exc
    if not rows:
        raise EchoPulseError(f"{manifest}: manifest has no rows")
    missing = [c for c in REQUIRED_MANIFEST_COLUMNS if c not in rows[0]]
    if missing:
        raise EchoPulseError(f"{manifest}: manifest lacks column(s) {', '.join(missing)}")
    return rows


def input_key(row: dict[str, Any]) -> str:
    """Stable name of one input (a hash, so no path or identifier leaks into file names)."""
    return hashlib.sha256(f"{row.get('echo')}|{row.get('ecg')}".encode()).hexdigest()[:20]


def clips_to_table(clips: list[dict[str, Any]], clip: ClipConfig) -> pa.Table:
    """Clip dicts from the stage function as a ``clips/v1`` Arrow table."""
    schema = clip_schema(clip.frames, clip.size, clip.ecg_samples)
    columns = {}
    for field in schema:
        values = [c[field.name] for c in clips]
        if isinstance(field.type, pa.FixedShapeTensorType):
            columns[field.name] = pa.FixedShapeTensorArray.from_numpy_ndarray(
                np.ascontiguousarray(np.stack(values)).astype(field.type.value_type.to_pandas_dtype())
            )
        else:
            columns[field.name] = pa.array(values, type=field.type)
    return pa.Table.from_pydict(columns, schema=schema)


def make_process_input_fn(clip: ClipConfig, base_dir: str, out: str, salt: str | None):
    """The Ray Data row function: run the stage on one input, write its part, return its outcome."""

    def process(row: dict[str, Any]) -> dict[str, Any]:
        from echopulse.ingest import IngestError, make_ingest_fn

        ingest_one = make_ingest_fn(clip, base_dir=base_dir, salt=salt)
        manifest_row = {k: v for k, v in row.items() if k != "_key"}
        outcome = {"_key": row["_key"], "echo": str(row.get("echo")), "ecg": str(row.get("ecg")),
                   "clips": 0, "stage": "", "error": "", "detail": ""}
        try:
            clips = ingest_one(manifest_row)
            if not clips:
                raise IngestError("clip", "no clip fits inside both the echo and the ECG")
            table = clips_to_table(clips, clip)
            fs, path = storage.filesystem(storage.join(out, "clips", f"part-{row['_key']}.parquet"))
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with fs.open(path, "wb") as f:
                pq.write_table(table, f)
            outcome["clips"] = len(clips)
        except IngestError as exc:
            outcome.update(stage=exc.stage, error=str(exc), detail=exc.detail or "")
        except Exception as exc:  # an unexpected failure is quarantined too, with its type
            outcome.update(stage="ingest", error=f"{type(exc).__name__}: {exc}",
                           detail=traceback.format_exc(limit=3))
        storage.write_text(storage.join(out, "outcomes", f"{row['_key']}.json"),
                           json.dumps(outcome))
        return outcome

    return process


def run_ingest(
    manifest: str,
    out: str,
    clip: ClipConfig,
    salt: str | None = None,
    resume: bool = False,
    num_cpus_per_task: float = 1.0,
) -> IngestSummary:
    """Ingest every manifest row into ``out`` with Ray Data.

    Args:
        manifest: CSV with columns echo, ecg (+ optional view, ef, split, heart_rate_bpm); relative
            paths resolve against the manifest's folder.
        out: output directory or URI.
        clip: clip geometry (frames, size, fps, ECG samples).
        salt: salt for study keys (default: ``ECHOPULSE_STUDY_SALT`` or the built-in one).
        resume: skip inputs that already have an outcome in ``out``.
        num_cpus_per_task: CPUs reserved per input task.

    Returns:
        The counts also written to ``out/summary.json``.
    """
    import ray

    from echopulse.runtime import init_ray

    rows = read_manifest(manifest)
    if storage.is_remote(manifest):
        base_dir = manifest.rsplit("/", 1)[0]
    else:
        base_dir = str(Path(manifest).resolve().parent)
    storage.makedirs(out)
    for row in rows:
        row["_key"] = input_key(row)
    keys = [r["_key"] for r in rows]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{manifest}: the same echo/ecg pair appears more than once")

    done: dict[str, dict[str, Any]] = {}
    if resume:
        for key in keys:
            p = storage.join(out, "outcomes", f"{key}.json")
            if storage.exists(p):
                done[key] = json.loads(storage.read_text(p))
        log.info("resume: %d of %d inputs already done", len(done), len(rows))
    else:
        for sub in ("clips", "quarantine", "outcomes"):
            target = storage.join(out, sub)
            if storage.exists(target):
                sfs, spath = storage.filesystem(target)
                sfs.rm(spath, recursive=True)

    todo = [r for r in rows if r["_key"] not in done]
    outcomes = list(done.values())
    if todo:
        init_ray()
        process = make_process_input_fn(clip, base_dir, out, salt)
        ds = ray.data.from_items(todo, override_num_blocks=min(len(todo), 200))
        outcomes += ds.map(process, num_cpus=num_cpus_per_task).take_all()

    by_key = {o["_key"]: o for o in outcomes}
    ordered = [by_key[k] for k in keys]
    bad = [o for o in ordered if o["clips"] == 0]
    quarantine = pa.Table.from_pylist(
        [{c: o[c] for c in QUARANTINE_SCHEMA.names} for o in bad], schema=QUARANTINE_SCHEMA)
    qpath = storage.join(out, "quarantine", "quarantine.parquet")
    storage.makedirs(storage.join(out, "quarantine"))
    qfs, qp = storage.filesystem(qpath)
    with qfs.open(qp, "wb") as f:
        pq.write_table(quarantine, f)

    summary = IngestSummary(
        inputs=len(ordered),
        inputs_with_clips=sum(1 for o in ordered if o["clips"] > 0),
        quarantined=len(bad),
        clips=sum(o["clips"] for o in ordered),
        out=out,
    )
    storage.write_text(storage.join(out, "summary.json"), json.dumps(summary.as_dict(), indent=2))
    write_dataset_info(out, CLIPS_SCHEMA, {"clip": to_dict(clip)}, summary.as_dict())
    for o in bad:
        log.warning("quarantined %s: %s", o["echo"], o["error"])
    return summary
