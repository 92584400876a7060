"""Ingest: a manifest of echo + ECG pairs -> ``clips/v1`` Parquet (Ray Data).

The manifest is a CSV or Parquet file (columns in ``echopulse.ingest``), or EchoNet-Dynamic's
``FileList.csv`` (its ``Videos/*.avi`` become ECG-less clips).

Each input (manifest row) is one Ray Data row. A task runs the plain stage function from
``echopulse.ingest`` on it and writes that input's clips to its own Parquet part, named by a hash
of the input, so reruns replace rather than duplicate and ``--resume`` can skip finished inputs.
The dataset Ray materializes is the small per-input outcome table, which gives exact accounting:
every input ends as clips or as a quarantine row, never dropped.

Layout of OUT::

    clips/part-<input>.parquet   clips/v1 rows
    quarantine/quarantine.parquet  source_uri, clip_id, stage, error, detail (the echo, and the ECG
                                   in detail)
    outcomes/<input>.json        per-input outcome (for --resume)
    summary.json, dataset.json
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from echopulse import storage
from echopulse.config import ClipConfig, to_dict
from echopulse.errors import ConfigError, EchoPulseError
from echopulse.ingest import IngestOptions
from echopulse.schema import CLIPS_SCHEMA, clip_schema, write_dataset_info, write_quarantine

log = logging.getLogger(__name__)

REQUIRED_MANIFEST_COLUMNS = ("echo",)
INPUTS_PER_BLOCK = 4
MAX_BLOCKS = 2000
ECHONET_COLUMNS = ("FileName", "EF", "FPS")


@dataclass(frozen=True)
class IngestSummary:
    inputs: int
    inputs_with_clips: int
    quarantined: int
    clips: int
    out: str
    clips_without_ecg: int = 0
    clips_ecg_synchronized: int = 0
    clips_ecg_unsynchronized: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "inputs_with_clips": self.inputs_with_clips,
                "quarantined": self.quarantined, "clips": self.clips,
                "clips_without_ecg": self.clips_without_ecg,
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
    rows = [{"ecg": "", **{str(k): _cell(v) for k, v in r.items()}} for r in rows]
    missing = [c for c in REQUIRED_MANIFEST_COLUMNS if c not in rows[0]]
    if missing:
        raise EchoPulseError(f"{manifest}: manifest lacks column(s) {', '.join(missing)}")
    return rows


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value)


def echonet_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """EchoNet-Dynamic's FileList.csv rows as manifest rows: ``Videos/<FileName>.avi``, no ECG.

    EF is given in percent there and becomes a fraction (clips/v1 stores EF as 0-1); FPS is the
    video's frame rate; Split (TRAIN/VAL/TEST) is kept; every video is an apical four-chamber view.
    """
    out = []
    for r in rows:
        name = str(r["FileName"]).strip()
        if not name.lower().endswith(".avi"):
            name += ".avi"
        ef = r.get("EF")
        try:
            ef_fraction = f"{float(ef) / 100.0:.6g}" if ef not in (None, "") else ""
        except ValueError:
            ef_fraction = ""
        out.append({"echo": f"Videos/{name}", "ecg": "", "view": "A4C", "ef": ef_fraction,
                    "fps": _cell(r.get("FPS")), "split": _cell(r.get("Split")).lower(),
                    "study": name.rsplit(".", 1)[0]})
    return out


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


def make_process_input_fn(clip: ClipConfig, base_dir: str, out: str, salt: str | None,
                          options: IngestOptions | None = None):
    """The Ray Data row function: run the stage on one input, write its part, return its outcome."""
    ingest_one = None

    def process(row: dict[str, Any]) -> dict[str, Any]:
        nonlocal ingest_one
        from echopulse.ingest import NO_ECG, IngestError, make_ingest_fn

        if ingest_one is None:
            ingest_one = make_ingest_fn(clip, base_dir=base_dir, salt=salt, options=options)
        manifest_row = {k: v for k, v in row.items() if k != "_key"}
        outcome = {"_key": row["_key"], "echo": str(row.get("echo")), "ecg": str(row.get("ecg")),
                   "clips": 0, "clips_without_ecg": 0, "clips_ecg_synchronized": 0,
                   "stage": "", "error": "", "detail": ""}
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
            outcome["clips_without_ecg"] = sum(1 for c in clips if c["ecg_source"] == NO_ECG)
            outcome["clips_ecg_synchronized"] = sum(1 for c in clips if c["ecg_sync"])
        except IngestError as exc:
            outcome.update(stage=exc.stage, error=str(exc), detail=exc.detail or "")
        except Exception as exc:  # an unexpected failure is quarantined too, with its type
            log.debug("unexpected failure on %s", outcome["echo"], exc_info=True)
            outcome.update(stage="ingest", error=f"{type(exc).__name__}: {exc}",
                           detail=f"{type(exc).__name__}: {exc}")
        storage.write_text(storage.join(out, "outcomes", f"{row['_key']}.json"),
                           json.dumps(outcome))
        return outcome

    return process


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
) -> IngestSummary:
    """Ingest every manifest row into ``out`` with Ray Data.

    Args:
        manifest: CSV or Parquet with columns echo, ecg (+ optional ecg_offset_s, view, ef, split,
            study, fps, ecg_fs, ecg_leads, ecg_units), or EchoNet-Dynamic's FileList.csv; relative
            paths resolve against the manifest's folder and may not climb out of it unless
            ``options.allow_roots`` names where they land.
        out: output directory or URI.
        clip: clip geometry (frames, size, fps, ECG samples).
        salt: salt for study keys (default: ``ECHOPULSE_STUDY_SALT`` or the built-in one).
        resume: skip inputs that already have an outcome in ``out``.
        num_cpus_per_task: CPUs reserved per input task.
        options: clip mode, allowed roots, ECG rate default, memory limit.

    Returns:
        The counts also written to ``out/summary.json``.
    """
    import ray

    from echopulse.runtime import init_ray

    rows = read_manifest(manifest)
    base_dir = storage.parent(manifest)
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
        process = make_process_input_fn(clip, base_dir, out, salt, options)
        # a few inputs per block: one Ray task per input costs more than a small cine's decode,
        # and blocks must still outnumber the CPUs for balance
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        blocks = min(len(todo), MAX_BLOCKS, max(2 * cpus, math.ceil(len(todo) / INPUTS_PER_BLOCK)))
        ds = ray.data.from_items(todo, override_num_blocks=blocks)
        remote_args: dict[str, Any] = {"num_cpus": num_cpus_per_task}
        env = storage.aws_env()
        if env and (storage.is_remote(manifest) or storage.is_remote(out)):
            # workers of a cluster started elsewhere do not share this process's environment
            remote_args["runtime_env"] = {"env_vars": env}
        outcomes += ds.map(process, **remote_args).take_all()

    by_key = {o["_key"]: o for o in outcomes}
    ordered = [by_key[k] for k in keys]
    bad = [o for o in ordered if o["clips"] == 0]
    write_quarantine(out, [quarantine_row(o) for o in bad])

    summary = IngestSummary(
        inputs=len(ordered),
        inputs_with_clips=sum(1 for o in ordered if o["clips"] > 0),
        quarantined=len(bad),
        clips=sum(o["clips"] for o in ordered),
        out=out,
        clips_without_ecg=sum(o.get("clips_without_ecg", 0) for o in ordered),
        clips_ecg_synchronized=sum(o.get("clips_ecg_synchronized", 0) for o in ordered),
        clips_ecg_unsynchronized=sum(o["clips"] - o.get("clips_without_ecg", 0)
                                     - o.get("clips_ecg_synchronized", 0) for o in ordered),
    )
    storage.write_text(storage.join(out, "summary.json"), json.dumps(summary.as_dict(), indent=2))
    write_dataset_info(out, CLIPS_SCHEMA, {"clip": to_dict(clip)}, summary.as_dict())
    for o in bad:
        log.warning("quarantined %s: %s", o["echo"], o["error"])
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
