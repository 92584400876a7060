"""Ingest: a manifest of echo + ECG pairs -> ``clips/v1`` Parquet (Ray Data).

The manifest is a CSV or Parquet file (columns in ``echopulse.ingest``), or EchoNet-Dynamic's
``FileList.csv`` (its ``Videos/*.avi`` become ECG-less clips).

Ray Data reads the manifest and plans the run (:mod:`pipelines.plan`: hash groups of about
``inputs_per_task`` inputs, duplicates dropped and counted, done inputs skipped on ``--resume``);
the driver never holds the manifest's rows. One task per group runs each input through the plain
stage function from ``echopulse.ingest`` in a memory-limited child process
(:mod:`pipelines.isolate`: an input that kills its decoder is quarantined, the rest of the group
goes on), writes the clips into sized shards and every input's outcome into the compact outcome
log (:mod:`pipelines.shards`), so every input ends as clips or as a quarantine row, never dropped,
and ``--resume`` skips what the log already holds. The driver only sees one counts row per task
and reads the outcome log back one file at a time.

Layout of OUT::

    clips/shard-<index>.parquet    clips/v1 rows, files of about --shard-mb
    outcomes/shard-<index>.parquet per-input outcomes (for accounting and --resume)
    quarantine/quarantine.parquet  source_uri, clip_id, stage, error, detail (the echo, and the ECG
                                   in detail)
    summary.json, dataset.json
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from echopulse import storage
from echopulse.config import ClipConfig, to_dict
from echopulse.errors import ConfigError, EchoPulseError
from echopulse.ingest import IngestOptions
from echopulse.schema import CLIPS_SCHEMA, QuarantineSink, clip_schema, write_dataset_info
from pipelines.common import ray_remote_args, worker_credentials
from pipelines.isolate import isolated_inputs
from pipelines.plan import PlanCounts, plan_counts, plan_dataset
from pipelines.shards import (OUTCOMES, ChunkWriter, ShardConfig, clear_out, iter_outcomes, list_out, remove_orphans,
                             run_or_explain)

log = logging.getLogger(__name__)


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
                        options: IngestOptions | None, shards: ShardConfig,
                        credentials: storage.Credentials | None = None):
    """The Ray Data row function: one plan row (a group of inputs) -> sized clip shards + outcome
    log; one counts row (with the plan's counts) for the driver."""

    def run(group: dict[str, Any]) -> dict[str, Any]:
        storage.apply_credentials(credentials)
        rows = json.loads(group["rows"])
        clips, files = 0, 0
        if rows:
            writer = ChunkWriter(out, "clips", shards)
            with isolated_inputs(lambda: make_input_fn(clip, base_dir, salt, options), options) as process:
                for row in rows:
                    outcome, table = process(row)
                    writer.add(int(row["_index"]), outcome, table)
                    clips += outcome["clips"]
            writer.close_chunk()
            files = writer.files
        return {"inputs": len(rows), "clips": clips, "files": files, **plan_counts(group)}

    return run


def quarantine_row(outcome: dict[str, Any]) -> dict[str, str]:
    """The quarantine row of a failed input: the echo is its source; the ECG, if any, leads the detail."""
    ecg = outcome.get("ecg") or ""
    detail = outcome["detail"]
    if ecg and ecg != "None":
        detail = f"ecg={ecg}; {detail}" if detail else f"ecg={ecg}"
    return {"source_uri": outcome["echo"], "clip_id": "", "stage": outcome["stage"],
            "error": outcome["error"], "detail": detail}


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
            pair is ingested once and counted in ``duplicates``. Read as a Ray dataset
            (:mod:`pipelines.plan`), never into the driver.
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
    storage.makedirs(out)
    listing = prepare_out(out, "clips", resume)
    remote_args = ray_remote_args(manifest, out)
    plan = plan_dataset(manifest, out, shards, resume, remote_args, listing)
    task = make_ingest_task_fn(clip, storage.parent(manifest), out, salt, options, shards,
                               worker_credentials(manifest, out))
    counts = collect_counts(out, plan.map(task, num_cpus=num_cpus_per_task, **remote_args))
    if resume:
        log.info("resume: %d of %d inputs already done", counts.done, counts.inputs)
    summary = finish(out, counts)
    write_dataset_info(out, CLIPS_SCHEMA, {"clip": to_dict(clip), "shards": to_dict(shards)},
                       summary.as_dict(), manifest=manifest)  # lineage: the manifest behind the clips
    return summary


def prepare_out(out: str, kind: str, resume: bool) -> dict[str, list[str]] | None:
    """Clear ``out``'s data, quarantine and outcome log, or, resuming, drop unfinished chunks;
    resuming, the listing of ``out`` it made (``shards.list_out``: the plan reuses it)."""
    if resume:
        listing = list_out(out)
        remove_orphans(out, kind, listing)
        return listing
    clear_out(out, (kind, "quarantine", OUTCOMES))
    return None


def collect_counts(out: str, ds) -> PlanCounts:
    """Run a planned Ray Data pass, streaming its small counts rows; the plan's counts."""
    counts = PlanCounts()

    def execute() -> None:
        for row in ds.iter_rows():
            counts.add(row)

    run_or_explain(out, execute)
    return counts


def finish(out: str, plan: PlanCounts) -> IngestSummary:
    """Counts and quarantine from the outcome log of ``out``, read one outcome file at a time.

    Raises:
        EchoPulseError: the log does not hold exactly one outcome per planned input.
    """
    t = {"inputs": 0, "bad": 0, "clips": 0, "no_ecg": 0, "sync": 0}
    with QuarantineSink(out) as sink:
        for table in iter_outcomes(out):
            for o in table.to_pylist():
                t["inputs"] += 1
                t["clips"] += o["clips"]
                t["no_ecg"] += o["clips_without_ecg"]
                t["sync"] += o["clips_ecg_synchronized"] or 0
                # one-pass runs log the tokens each input got: an input with clips but no tokens is bad
                bad = o["clips"] == 0 or o.get("tokens") == 0
                if o["stage"] or bad:  # every failure gets a row (also clips that failed to encode)
                    sink.add(quarantine_row(o))
                if bad:
                    t["bad"] += 1
                    if t["bad"] <= 20:
                        log.warning("quarantined %s: %s", o["echo"], o["error"])
    if t["inputs"] != plan.inputs:
        raise EchoPulseError(f"{out}: the outcome log holds {t['inputs']} of {plan.inputs} input(s); "
                             "rerun with --resume")
    if t["bad"] > 20:
        log.warning("... and %d more quarantined inputs (see %s)", t["bad"] - 20,
                    storage.join(out, "quarantine"))
    summary = IngestSummary(
        inputs=t["inputs"], inputs_with_clips=t["inputs"] - t["bad"], quarantined=t["bad"], clips=t["clips"],
        out=out, clips_without_ecg=t["no_ecg"], duplicates=plan.duplicates, clips_ecg_synchronized=t["sync"],
        clips_ecg_unsynchronized=t["clips"] - t["no_ecg"] - t["sync"])
    storage.write_text(storage.join(out, "summary.json"), json.dumps(summary.as_dict(), indent=2))
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
