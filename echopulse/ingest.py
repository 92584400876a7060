"""The ingest stage as a plain function: one manifest row (echo + ECG paths) -> ``clips/v1`` rows.

Ray (``pipelines/ingest``) only maps :func:`make_ingest_fn` over manifest rows and routes
:class:`IngestError` to the quarantine table. Nothing here logs or returns patient names, IDs,
birth dates or raw UIDs: the study UID is only hashed (:func:`echopulse.schema.study_key`) and the
frames are cropped to the ultrasound region, which drops burned-in header text.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from echopulse import schema
from echopulse.config import ECG_FS, ClipConfig
from echopulse.io.dicom_echo import EchoReadError, read_echo_dicom
from echopulse.io.ecg import ECGReadError, read_ecg
from echopulse.transforms.clips import cut_clip, window_spans
from echopulse.transforms.ecg import ECGError, prepare_ecg
from echopulse.transforms.video import crop_region, estimate_region

log = logging.getLogger(__name__)


class IngestError(Exception):
    """A manifest row that could not be turned into clips.

    Attributes:
        stage: where it failed: "manifest", "read_echo", "read_ecg", "ecg", "pair" or "clip".
        detail: a human-readable reason (no patient identifiers).
    """

    def __init__(self, stage: str, detail: str):
        super().__init__(f"{stage}: {detail}")
        self.stage = stage
        self.detail = detail


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("echopulse")
    except metadata.PackageNotFoundError:
        import echopulse

        return str(getattr(echopulse, "__version__", "0+unknown"))


def _resolve(base_dir: str, value: str) -> Path:
    return Path(value) if os.path.isabs(value) else Path(base_dir) / value


def _optional_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def make_ingest_fn(clip: ClipConfig, base_dir: str, salt: str | None = None) -> Callable[[dict], list[dict]]:
    """Build the ingest function for one clip geometry.

    Args:
        clip: clip geometry (frames, size, fps, ecg_samples, stride).
        base_dir: folder that relative ``echo``/``ecg`` paths in the manifest are relative to.
        salt: study-key salt (default: ``ECHOPULSE_STUDY_SALT`` or the built-in default).

    Returns:
        ``fn(row) -> list[dict]`` mapping a manifest row (``echo``, ``ecg``; optional ``view``, ``ef``,
        ``split``, ``heart_rate_bpm``) to clip rows with exactly ``schema.CLIP_COLUMNS``; it raises
        :class:`IngestError` on any failure.
    """
    version = _version()

    def ingest(row: dict) -> list[dict]:
        echo_uri, ecg_uri = row.get("echo"), row.get("ecg")
        if not echo_uri or not ecg_uri:
            raise IngestError("manifest", f"row needs both 'echo' and 'ecg' paths (got echo={echo_uri!r})")
        echo_uri, ecg_uri = str(echo_uri), str(ecg_uri)

        try:
            frames, echo_meta = read_echo_dicom(_resolve(base_dir, echo_uri))
        except EchoReadError as exc:
            raise IngestError("read_echo", _relabel(str(exc), base_dir, echo_uri)) from None
        except Exception as exc:  # a reader bug must still quarantine, not kill the dataset
            raise IngestError("read_echo", f"{echo_uri}: {type(exc).__name__}: {exc}") from None
        try:
            ecg_raw, ecg_meta = read_ecg(_resolve(base_dir, ecg_uri))
        except ECGReadError as exc:
            raise IngestError("read_ecg", _relabel(str(exc), base_dir, ecg_uri)) from None
        except Exception as exc:
            raise IngestError("read_ecg", f"{ecg_uri}: {type(exc).__name__}: {exc}") from None
        try:
            prepared = prepare_ecg(ecg_raw, ecg_meta["fs"], ecg_meta["leads"])
        except ECGError as exc:
            raise IngestError("ecg", f"{ecg_uri}: {exc}") from None

        region = echo_meta["region"]
        region_source = "dicom"
        if region is None:
            region, region_source = estimate_region(frames), "estimated"
        frames = crop_region(frames, region)
        fps = float(echo_meta["fps"])
        video_s = frames.shape[0] / fps
        spans = window_spans(video_s, prepared.duration_s, clip)
        if not spans:
            raise IngestError(
                "pair",
                f"{echo_uri}: no clip fits: cine {video_s:.2f} s, ECG {prepared.duration_s:.2f} s; a clip "
                f"needs {clip.seconds:.2f} s of cine and {clip.ecg_samples / ECG_FS:.2f} s of ECG",
            )

        uid = echo_meta["study_uid"] or echo_meta["sop_uid"] or echo_uri
        key = schema.study_key(uid, salt)
        split = str(row["split"]) if row.get("split") in schema.SPLITS else schema.split_for(key)
        provenance = json.dumps(
            {
                "ecg": ecg_uri,
                "reader": {"echo": "pydicom", "ecg": ecg_meta["source"], "region": region_source},
                "source_fps": fps,
                "ecg_fs": float(ecg_meta["fs"]),
                "echopulse": version,
            },
            sort_keys=True,
        )
        out = []
        for span in spans:
            try:
                video, ecg, peaks = cut_clip(frames, fps, prepared, span, clip)
            except ValueError as exc:
                raise IngestError("clip", f"{echo_uri} at {span.t_start_s:.2f} s: {exc}") from None
            out.append(
                {
                    "clip_id": schema.clip_id(echo_uri, span.t_start_s, span.t_end_s),
                    "study_key": key,
                    "split": split,
                    "view": str(row.get("view") or "unknown"),
                    "frames": video,
                    "fps": float(clip.fps),
                    "ecg": ecg,
                    "ecg_leads": [bool(m) for m in prepared.lead_mask],
                    "ecg_source": ecg_meta["source"],
                    "heart_rate_bpm": float(prepared.heart_rate_bpm),
                    "r_peaks": [int(p) for p in peaks],
                    "t_start_s": float(span.t_start_s),
                    "t_end_s": float(span.t_end_s),
                    "ef": _optional_float(row.get("ef")),
                    "source_uri": echo_uri,
                    "provenance": provenance,
                }
            )
        log.info("ingested %s: %d clips", echo_uri, len(out))
        return out

    return ingest


def _relabel(message: str, base_dir: str, uri: str) -> str:
    """Show the manifest's own path in messages instead of the resolved absolute one."""
    return message.replace(str(_resolve(base_dir, uri)), uri)
