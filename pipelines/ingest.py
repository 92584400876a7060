"""Ingest: a manifest of echo + ECG pairs -> ``clips/v1`` Parquet (Ray Data).

The manifest is a CSV or Parquet file (columns in ``echopulse.ingest``), or EchoNet-Dynamic's
``FileList.csv`` (its ``Videos/*.avi`` become ECG-less clips).

Each input (manifest row, duplicates dropped and counted) runs through the plain stage function
from ``echopulse.ingest``. Ray Data runs one task per fixed group of consecutive inputs; the task
writes the clips into sized shards and every input's outcome into the compact outcome log
(:mod:`pipelines.shards`), so every input ends as clips or as a quarantine row, never dropped, and
``--resume`` skips what the log already holds. The driver only sees one counts row per task.

Layout of OUT::

    clips/shard-<index>.parquet    clips/v1 rows, files of about --shard-mb
    outcomes/shard-<index>.parquet per-input outcomes (for accounting and --resume)
    quarantine/quarantine.parquet  source_uri, clip_id, stage, error, detail (the echo, and the ECG
                                   in detail)
    summary.json, dataset.json
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from echopulse import storage
from echopulse.config import ClipConfig, to_dict
from echopulse.errors import ConfigError, EchoPulseError
from echopulse.ingest import IngestOptions
from echopulse.manifests.common import cell_text
from echopulse.manifests.echonet_dynamic import filelist_row, video_name
from echopulse.schema import CLIPS_SCHEMA, clip_schema, write_dataset_info, write_quarantine
from pipelines.shards import (OUTCOMES, ChunkWriter, ShardConfig, clear_out, groups, list_out, read_outcomes,
                             remove_orphans, run_or_explain)

log = logging.getLogger(__name__)

REQUIRED_MANIFEST_COLUMNS = ("echo",)
ECHONET_COLUMNS = ("FileName", "EF", "FPS")


@dataclass(frozen=True)
class IngestSummary:
    inputs: int
    inputs_with_clips: int
    quarantined: int
    clips: int
    out: str
    clips_without_ecg: int = 0
    duplicates: int = 0
    clips_ecg_synchronized: int = 0
    clips_ecg_unsynchronized: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "inputs_with_clips": self.inputs_with_clips,
                "quarantined": self.quarantined, "clips": self.clips,
                "clips_without_ecg": self.clips_without_ecg, "duplicates": self.duplicates,
                "clips_ecg_synchronized": self.clips_ecg_synchronized,
                "clips_ecg_unsynchronized": self.clips_ecg_unsynchronized}


def read_manifest(manifest: str) -> list[dict[str, Any]]:
    """Rows of a manifest (CSV, Parquet, or EchoNet-Dynamic's FileList.csv) as dicts.

    Values are strings (empty for a missing value), so a row reads the same from either format.
    Raises a clear :class:`EchoPulseError` for a missing or malformed file.
    """
    if not storage.exists(manifest):
        raise EchoPulseError(f"{manifest}: manifest not found")
    data = storage.read_bytes(manifest)
    if data[:4] == b"PAR1" or manifest.lower().endswith((".parquet", ".pq")):
        try:
            rows = pq.read_table(io.BytesIO(data)).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise EchoPulseError(f"{manifest}: not a readable Parquet manifest ({exc})") from exc
    else:
        try:
            rows = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
        except (UnicodeDecodeError, csv.Error) as exc:
            raise EchoPulseError(f"{manifest}: not a readable CSV manifest ({exc})") from exc
    if not rows:
        raise EchoPulseError(f"{manifest}: manifest has no rows")
    if all(c in rows[0] for c in ECHONET_COLUMNS) and "echo" not in rows[0]:
        rows = echonet_rows(rows)
    rows = [{"ecg": "", **{str(k): cell_text(v) for k, v in r.items()}} for r in rows]
    missing = [c for c in REQUIRED_MANIFEST_COLUMNS if c not in rows[0]]
    if missing:
        raise EchoPulseError(f"{manifest}: manifest lacks column(s) {', '.join(missing)}")
    return rows


def echonet_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """EchoNet-Dynamic's FileList.csv rows as manifest rows (``echonet_dynamic.filelist_row``, what
    ``echopulse manifest echonet-dynamic`` writes): the videos at ``Videos/<FileName>.avi`` beside
    the list (read, not checked, here), no traced frames."""
    return [filelist_row(r, f"Videos/{video_name(cell_text(r['FileName']))}") for r in rows]


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


def make_input_fn(clip: ClipConfig, base_dir: str, salt: str | None,
                  options: IngestOptions | None = None):
    """One input -> ``(outcome, clips/v1 table or None)``; never raises for bad data."""
    from echopulse.ingest import NO_ECG, IngestError, make_ingest_fn

    ingest_one = make_ingest_fn(clip, base_dir=base_dir, salt=salt, options=options)

    def process(row: dict[str, Any]) -> tuple[dict[str, Any], pa.Table | None]:
        manifest_row = {k: v for k, v in row.items() if not k.startswith("_")}
        outcome = {"_key": row["_key"], "echo": str(row.get("echo")), "ecg": str(row.get("ecg")),
                   "clips": 0, "clips_without_ecg": 0, "clips_ecg_synchronized": 0,
                   "stage": "", "error": "", "detail": ""}
        table = None
        try:
            clips = ingest_one(manifest_row)
            if not clips:
                raise IngestError("clip", "no clip fits inside both the echo and the ECG")
            table = clips_to_table(clips, clip)
            outcome["clips"] = len(clips)
            outcome["clips_without_ecg"] = sum(1 for c in clips if c["ecg_source"] == NO_ECG)
            outcome["clips_ecg_synchronized"] = sum(1 for c in clips if c["ecg_sync"])
        except IngestError as exc:
            outcome.update(stage=exc.stage, error=str(exc), detail=exc.detail or "")
        except Exception as exc:  # an unexpected failure is quarantined too, with its type
            log.debug("unexpected failure on %s", outcome["echo"], exc_info=True)
            outcome.update(stage="ingest", error=f"{type(exc).__name__}: {exc}",
                           detail=f"{type(exc).__name__}: {exc}")
        return outcome, table

    return process


def make_ingest_task_fn(clip: ClipConfig, base_dir: str, out: str, salt: str | None,
                        options: IngestOptions | None, shards: ShardConfig):
    """The Ray Data row function: one group of inputs -> sized clip shards + outcome log; counts."""

    def run(group: dict[str, Any]) -> dict[str, Any]:
        process = make_input_fn(clip, base_dir, salt, options)
        writer = ChunkWriter(out, "clips", shards)
        clips = 0
        rows = json.loads(group["rows"])
        for row in rows:
            outcome, table = process(row)
            writer.add(int(row["_index"]), outcome, table)
            clips += outcome["clips"]
        writer.close_chunk()
        return {"inputs": len(rows), "clips": clips, "files": writer.files}

    return run


def quarantine_row(outcome: dict[str, Any]) -> dict[str, str]:
    """The quarantine row of a failed input: the echo is its source; the ECG, if any, leads the detail."""
    ecg = outcome.get("ecg") or ""
    detail = outcome["detail"]
    if ecg and ecg != "None":
        detail = f"ecg={ecg}; {detail}" if detail else f"ecg={ecg}"
    return {"source_uri": outcome["echo"], "clip_id": "", "stage": outcome["stage"],
            "error": outcome["error"], "detail": detail}


def plan_inputs(manifest: str) -> tuple[list[dict[str, Any]], int]:
    """The manifest's rows, each input once (``_key``, ``_index``), and how many duplicates were dropped."""
    rows = read_manifest(manifest)
    seen: set[str] = set()
    unique = []
    for row in rows:
        key = input_key(row)
        if key in seen:
            continue
        seen.add(key)
        unique.append({**row, "_key": key, "_index": len(unique)})
    return unique, len(rows) - len(unique)


def run_ingest(
    manifest: str,
    out: str,
    clip: ClipConfig,
    salt: str | None = None,
    resume: bool = False,
    num_cpus_per_task: float = 1.0,
    options: IngestOptions | None = None,
    shards: ShardConfig | None = None,
) -> IngestSummary:
    """Ingest every manifest row into ``out`` with Ray Data.

    Args:
        manifest: CSV or Parquet with columns echo, ecg (+ optional ecg_offset_s, view, ef, split,
            study, fps, ecg_fs, ecg_leads, ecg_units), or EchoNet-Dynamic's FileList.csv; relative
            paths resolve against the manifest's folder and may not climb out of it unless
            ``options.allow_roots`` names where they land. A row repeating an earlier echo/ecg
            pair is ingested once and counted in ``duplicates``.
        out: output directory or URI.
        clip: clip geometry (frames, size, fps, ECG samples).
        salt: salt for study keys (default: ``ECHOPULSE_STUDY_SALT`` or the built-in one).
        resume: skip inputs already in ``out``'s outcome log.
        num_cpus_per_task: CPUs reserved per task.
        options: clip mode, allowed roots, ECG rate default, memory limit.
        shards: file sizes and inputs per task (:class:`pipelines.shards.ShardConfig`).

    Returns:
        The counts also written to ``out/summary.json``.
    """
    shards = shards or ShardConfig()
    rows, duplicates = plan_inputs(manifest)
    base_dir = storage.parent(manifest)
    storage.makedirs(out)
    done = prepare_out(out, "clips", resume)
    todo = [r for r in rows if r["_key"] not in done]
    if resume:
        log.info("resume: %d of %d inputs already done", len(rows) - len(todo), len(rows))
    if todo:
        task = make_ingest_task_fn(clip, base_dir, out, salt, options, shards)
        run_groups(todo, task, shards, num_cpus_per_task,
                   remote=storage.is_remote(manifest) or storage.is_remote(out), out=out)
    summary = finish(out, rows, duplicates)
    write_dataset_info(out, CLIPS_SCHEMA, {"clip": to_dict(clip), "shards": to_dict(shards)},
                       summary.as_dict(), manifest=manifest)  # lineage: the manifest behind the clips
    return summary


def prepare_out(out: str, kind: str, resume: bool) -> set[str]:
    """Clear ``out``'s data, quarantine and outcome log (or, resuming, drop unfinished chunks);
    the keys of the inputs already done."""
    if resume:
        listing = list_out(out)  # one listing for both
        remove_orphans(out, kind, listing)
        return set(read_outcomes(out, ["_key"], listing).column("_key").to_pylist())
    clear_out(out, (kind, "quarantine", OUTCOMES))
    return set()


def run_groups(todo: list[dict[str, Any]], task, shards: ShardConfig, num_cpus_per_task: float,
               remote: bool, out: str) -> list[dict[str, Any]]:
    """Run ``task`` over the fixed groups of ``todo`` as Ray tasks (one block per group)."""
    import ray

    from echopulse.runtime import init_ray

    init_ray()
    by_index = {r["_index"]: r for r in todo}
    items = [{"rows": json.dumps([by_index[i] for i in g])}
             for g in groups(sorted(by_index), shards.inputs_per_task)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    remote_args: dict[str, Any] = {"num_cpus": num_cpus_per_task}
    env = storage.aws_env()
    if env and remote:
        # workers of a cluster started elsewhere do not share this process's environment
        remote_args["runtime_env"] = {"env_vars": env}
    # one small counts row per group
    return run_or_explain(out, ds.map(task, **remote_args).take_all)


def finish(out: str, rows: list[dict[str, Any]], duplicates: int) -> IngestSummary:
    """Counts and quarantine from the outcome log of ``out`` (the manifest's inputs only)."""
    keys = {r["_key"] for r in rows}
    log_rows = [o for o in read_outcomes(out).to_pylist() if o["_key"] in keys]
    by_key = {o["_key"]: o for o in log_rows}
    missing = keys - set(by_key)
    if missing:
        raise EchoPulseError(f"{out}: {len(missing)} input(s) have no outcome; rerun with --resume")
    ordered = sorted(by_key.values(), key=lambda o: o["index"])
    # one-pass runs log the tokens each input got: an input with clips but no tokens is quarantined
    bad = [o for o in ordered if o["clips"] == 0 or o.get("tokens") == 0]
    # every failure gets a quarantine row (also an input some of whose clips failed to encode)
    write_quarantine(out, [quarantine_row(o) for o in ordered if o["stage"] or o in bad])
    summary = IngestSummary(
        inputs=len(ordered),
        inputs_with_clips=len(ordered) - len(bad),
        quarantined=len(bad),
        clips=sum(o["clips"] for o in ordered),
        out=out,
        clips_without_ecg=sum(o["clips_without_ecg"] for o in ordered),
        duplicates=duplicates,
        clips_ecg_synchronized=sum(o["clips_ecg_synchronized"] or 0 for o in ordered),
        clips_ecg_unsynchronized=sum(o["clips"] - o["clips_without_ecg"] - (o["clips_ecg_synchronized"] or 0)
                                     for o in ordered),
    )
    storage.write_text(storage.join(out, "summary.json"), json.dumps(summary.as_dict(), indent=2))
    for o in bad[:20]:
        log.warning("quarantined %s: %s", o["echo"], o["error"])
    if len(bad) > 20:
        log.warning("... and %d more quarantined inputs (see %s)", len(bad) - 20,
                    storage.join(out, "quarantine"))
    return summary


def clip_for_mode(clip: ClipConfig, mode: str, seconds: float | None = None,
                  fps: float | None = None) -> ClipConfig:
    """The recipe's clip geometry with the CLI's window overrides applied.

    Window mode: ``--seconds S --fps F`` give ``round(S * F)`` frames at ``F`` fps (which must be
    1 + 2k, what the tokenizer takes). Cycle mode keeps the recipe's frame count per cycle and
    takes neither.

    Raises:
        ConfigError: overrides in cycle mode, non-positive values, or an even frame count.
    """
    from echopulse.config import replace

    if mode == "cycle":
        if seconds is not None or fps is not None:
            raise ConfigError("--seconds/--fps apply to --clip-mode window; a cycle clip spans one R-R "
                              "interval with the recipe's frame count")
        return clip
    if seconds is None and fps is None:
        return clip
    fps = float(fps if fps is not None else clip.fps)
    seconds = float(seconds if seconds is not None else clip.seconds)
    if fps <= 0 or seconds <= 0:
        raise ConfigError(f"--seconds and --fps must be positive (got {seconds}, {fps})")
    frames = int(round(seconds * fps))
    if frames < 1 or (frames - 1) % 2:
        raise ConfigError(f"--seconds {seconds:g} x --fps {fps:g} gives {frames} frames; the tokenizer "
                          f"takes 1 + 2k frames (e.g. --seconds {(frames + 1) / fps:g})")
    return replace(clip, frames=frames, fps=fps)
